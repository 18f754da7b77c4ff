//! [`Backend`] on kiln's on-disk store (`kiln-cache`): images resolve
//! through the image table and are unpacked once into snapshots named by
//! their OCI chain IDs; a step's layer is the snapshot's upperdir, of which
//! only the diffID and size are computed at build time (the tar is written
//! again from the snapshot, and compressed, on export or push);
//! the cache index maps step keys to committed snapshots; a lease keeps a
//! running build's work safe from a concurrent `kiln prune`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_cache::{FileStat, Snapshotter, Store};
use kiln_executor::{RootfsKind, RootfsMount};
use kiln_image::config::ImageConfig;
use kiln_image::diff::DiffOptions;
use kiln_image::manifest::{media_types, Descriptor, ImageManifest};
use kiln_image::Digest;

use crate::backend::{
    Active, Backend, BackendError, BackendResult, BaseImage, Exported, LayerRecord,
};
use crate::copy::{HashCache, StatKey};
use crate::flatten::Block;

/// The store-backed backend. Holds a lease for its whole life: its store
/// handle is made with the lease, so everything the build writes through
/// it (and nothing written through other handles) joins that lease.
pub struct StoreBackend {
    store: Store,
    /// Registry access for FROM: (settings, always pull).
    registry: Option<(kiln_registry::RegistryConfig, bool)>,
    /// Merged blocks of deep chains made or found by this build, by
    /// snapshot name (immutable; those found are added to the build's
    /// lease, those made are in it).
    flats: std::sync::Mutex<std::collections::HashMap<String, PathBuf>>,
    /// Annotations of the manifests [`Backend::export`] writes.
    annotations: std::collections::BTreeMap<String, String>,
}

static ACTIVE: AtomicU64 = AtomicU64::new(0);

/// Keeps the first `keep` lowerdirs of an overlay mount and puts `flats`
/// (the merged blocks of the rest, top first) after them.
fn cap_lowers(m: &mut RootfsMount, keep: usize, flats: &[PathBuf]) {
    if m.kind != RootfsKind::Overlay {
        return;
    }
    for o in &mut m.options {
        if let Some(lower) = o.strip_prefix("lowerdir=") {
            let mut dirs: Vec<String> = lower.split(':').take(keep).map(str::to_string).collect();
            dirs.extend(flats.iter().map(|f| f.display().to_string()));
            *o = format!("lowerdir={}", dirs.join(":"));
        }
    }
}

/// The OCI chain ID of `parent` (a chain ID) plus a layer `diff_id`.
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    match parent {
        None => diff_id.to_string(),
        Some(p) => Digest::sha256_of(format!("{p} {diff_id}").as_bytes()).to_string(),
    }
}

/// Proves each layer of an image to be the diffID its config names — the
/// blob against its digest and size, the tar it decompresses to against
/// the diffID, in one streaming pass that writes nothing, whatever the
/// store already holds for that diffID — and records it as a lazy layer
/// (see [`Store::prove_layer`]): what a load or an OCI layout brings, and
/// a pull that moves a name, does so before the name points at it.
/// On failure: the 1-based number of the layer, and why.
pub fn prove_layers(
    store: &Store,
    layers: &[kiln_image::manifest::Descriptor],
    diff_ids: &[Digest],
) -> Result<(), (usize, kiln_cache::Error)> {
    // The chain names first (cheap), then the layers checked on as many
    // threads as there are cores: each is one decompression and two
    // hashes of its own.
    let mut parent: Option<String> = None;
    let mut work = Vec::with_capacity(layers.len());
    for (i, (l, diff_id)) in layers.iter().zip(diff_ids).enumerate() {
        let parse = |d: &Digest| {
            d.as_str()
                .parse::<kiln_cache::Digest>()
                .map_err(|_| (i + 1, kiln_cache::Error::InvalidDigest(d.to_string())))
        };
        let chain = chain_id(parent.as_deref(), diff_id.as_str());
        work.push((
            parse(&l.digest)?,
            parse(diff_id)?,
            parent.take(),
            chain.clone(),
            l,
        ));
        parent = Some(chain);
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    crate::transfer::parallel(
        work.len(),
        threads,
        &|k| {
            let (blob, diff, parent, chain, l) = &work[k];
            store
                .prove_layer(
                    chain,
                    parent.as_deref(),
                    kiln_cache::LayerBlob {
                        digest: blob,
                        size: Some(l.size),
                        diff_id: diff,
                    },
                    &l.media_type,
                )
                .map_err(|e| (k + 1, e))
        },
        &|m| (0, kiln_cache::Error::InvalidState(m.to_string())),
    )
    .map(|_| ())
}

/// The OCI media type for a layer blob of `media_type` (a base image may
/// come with Docker's; the bytes are the same format).
fn oci_layer_type(media_type: &str) -> String {
    match media_type {
        media_types::DOCKER_LAYER_GZIP => media_types::OCI_LAYER_GZIP.to_string(),
        media_types::DOCKER_LAYER => media_types::OCI_LAYER.to_string(),
        other => other.to_string(),
    }
}

fn cache_digest(d: &Digest) -> BackendResult<kiln_cache::Digest> {
    d.as_str().parse().map_err(BackendError::ctx("digest"))
}

impl StoreBackend {
    /// Wraps an open store and takes a lease for this build (released
    /// when the backend drops).
    pub fn new(store: Store) -> Self {
        // Without a lease (the database refused one) the build still
        // runs, as before; only a concurrent prune could then take its work.
        let store = store.leased(None).unwrap_or(store);
        StoreBackend {
            store,
            registry: None,
            flats: Default::default(),
            annotations: Default::default(),
        }
    }

    /// Lets FROM pull from registries: images missing from the store, or
    /// every image when `always` (`--pull`).
    pub fn with_registry(mut self, cfg: kiln_registry::RegistryConfig, always: bool) -> Self {
        self.registry = Some((cfg, always));
        self
    }

    /// Puts `annotations` in the manifest of the image the build writes
    /// (`--annotation`).
    pub fn with_annotations(
        mut self,
        annotations: std::collections::BTreeMap<String, String>,
    ) -> Self {
        self.annotations = annotations;
        self
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn sn(&self) -> &dyn Snapshotter {
        self.store.snapshotter()
    }

    fn to_rootfs(m: &kiln_cache::Mount) -> RootfsMount {
        RootfsMount {
            kind: if m.kind == "overlay" {
                RootfsKind::Overlay
            } else {
                RootfsKind::Bind
            },
            source: PathBuf::from(&m.source),
            options: m.options.clone(),
        }
    }

    fn layer_of(&self, snapshot: &str, diff_id: &str, created: i64) -> BackendResult<LayerRecord> {
        let diff = diff_id
            .parse::<Digest>()
            .map_err(BackendError::ctx("diff id"))?;
        let blob = cache_digest(&diff)?;
        let size = self
            .store
            .blob_size(&blob)
            .map_err(BackendError::ctx("layer blob"))?;
        Ok(LayerRecord {
            diff_id: diff.clone(),
            digest: diff,
            size,
            media_type: media_types::OCI_LAYER.to_string(),
            snapshot: snapshot.to_string(),
            created,
        })
    }

    /// Unpacks `snapshot` if it is a lazy layer not unpacked yet (a
    /// result taken from a registry cache, kept as its compressed blob;
    /// see [`kiln_cache::Store::unpack_lazy`]).
    fn ensure(&self, snapshot: &str) -> BackendResult<()> {
        if self.sn().stat(snapshot).is_ok() {
            return Ok(());
        }
        self.store
            .unpack_lazy(snapshot)
            .map(|_| ())
            .map_err(BackendError::ctx("unpacking a layer taken from a cache"))
    }

    /// A step whose layer is a lazy layer (see [`StoreBackend::ensure`])
    /// that can still be had: its record, described by its blob.
    fn lazy_hit(&self, key: &str) -> BackendResult<Option<LayerRecord>> {
        let meta = self.store.meta();
        let Some((snapshot, blob, created)) = meta
            .lazy_cache(key)
            .map_err(BackendError::ctx("cache index"))?
        else {
            return Ok(None);
        };
        let Some(l) = self
            .store
            .lazy_ready_with(&snapshot, &blob)
            .map_err(BackendError::ctx("cache index"))?
        else {
            return Ok(None);
        };
        let digest = |d: &kiln_cache::Digest| {
            d.to_string()
                .parse::<Digest>()
                .map_err(BackendError::ctx("digest"))
        };
        Ok(Some(LayerRecord {
            diff_id: digest(&l.diff_id)?,
            digest: digest(&l.blob)?,
            size: l.size,
            media_type: l.media_type,
            snapshot,
            created,
        }))
    }

    /// The tree of the snapshot with directory id `id`.
    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.store.root().join("snapshots").join(id).join("fs")
    }

    /// The committed snapshot `snapshot` and its ancestors, nearest first.
    /// The snapshotter remembers chains, so a deep stack costs a row or
    /// two per step, not a query over all.
    fn chain(&self, snapshot: &str) -> BackendResult<Vec<std::sync::Arc<kiln_cache::Info>>> {
        self.sn()
            .chain(snapshot)
            .map_err(BackendError::ctx("snapshot chain"))
    }

    /// The directory of the merged `block` of the chain `rows` (top
    /// first): made once (from the blocks one level down, or from the
    /// layers at level 0) and kept as a committed snapshot named after the
    /// block's top layer and level, so a lease protects it, prune can
    /// reclaim it, and every chain sharing those layers finds it.
    fn block_dir(
        &self,
        rows: &[std::sync::Arc<kiln_cache::Info>],
        block: Block,
    ) -> BackendResult<PathBuf> {
        let depth = rows.len();
        let (Some(top), Some(end)) = (
            depth.checked_sub(block.start + block.len),
            depth.checked_sub(block.start),
        ) else {
            return Err(BackendError::invalid(
                "snapshot chain shorter than a merged block",
            ));
        };
        let row = rows
            .get(top)
            .ok_or_else(|| BackendError::invalid("snapshot chain shorter than a merged block"))?;
        let name = format!(
            "flat-{}-{}",
            block.level,
            Digest::sha256_of(row.key.as_bytes()).hex()
        );
        let known = self
            .flats
            .lock()
            .ok()
            .and_then(|m| m.get(&name).cloned())
            .filter(|p| p.is_dir());
        if let Some(dir) = known {
            return Ok(dir);
        }
        let remember = |dir: PathBuf| {
            if let Ok(mut m) = self.flats.lock() {
                m.insert(name.clone(), dir.clone());
            }
            dir
        };
        if let Ok(info) = self.sn().stat(&name) {
            // Made by an earlier build: no need for its parts.
            let _ = self.sn().meta().lease_snapshot(&name);
            return Ok(remember(self.snapshot_dir(&info.id)));
        }
        let sources: Vec<PathBuf> = if block.level == 0 {
            rows[top..end]
                .iter()
                .map(|r| self.snapshot_dir(&r.id))
                .collect()
        } else {
            block
                .parts()
                .into_iter()
                .rev()
                .map(|b| self.block_dir(rows, b))
                .collect::<BackendResult<_>>()?
        };
        let info = kiln_cache::apply_into(self.sn(), &name, None, |dir, _mode| {
            crate::flatten::squash(&sources, dir, block.start == 0)
                .map_err(|err| kiln_cache::Error::InvalidState(format!("merging layers: {err}")))?;
            cache_digest(&Digest::sha256_of(name.as_bytes()))
                .map_err(|err| kiln_cache::Error::InvalidState(err.to_string()))
        })
        .map_err(BackendError::ctx("merging a deep layer stack"))?;
        Ok(remember(self.snapshot_dir(&info.id)))
    }

    /// Verifies an image's layers and returns the layer records; each
    /// snapshot is made when a step first needs it (a build whose every
    /// step is a cache hit unpacks no base layer). Each layer is verified
    /// here all the same — its blob against the manifest's digest and
    /// size, its tar against the config's diffID (see
    /// [`kiln_cache::Store::keep_layer_lazy`]), and again when it is
    /// unpacked; `image` names it in errors.
    fn verify_layers(
        &self,
        image: &str,
        manifest: &ImageManifest,
        config: &ImageConfig,
    ) -> BackendResult<Vec<LayerRecord>> {
        if manifest.layers.len() != config.rootfs.diff_ids.len() {
            return Err(BackendError::Invalid(format!(
                "image {image} has {} layers but {} diffIDs",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let mut parent: Option<String> = None;
        let mut out = Vec::new();
        for (i, (desc, diff_id)) in manifest
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .enumerate()
        {
            let name = chain_id(parent.as_deref(), diff_id.as_str());
            let blob = cache_digest(&desc.digest)?;
            let diff = cache_digest(diff_id)?;
            self.store
                .keep_layer_lazy(
                    &name,
                    parent.as_deref(),
                    kiln_cache::LayerBlob {
                        digest: &blob,
                        size: Some(desc.size),
                        diff_id: &diff,
                    },
                    &desc.media_type,
                )
                .map_err(BackendError::ctx(format!(
                    "image {image}: verifying layer {} of {} ({})",
                    i + 1,
                    manifest.layers.len(),
                    desc.digest
                )))?;
            out.push(LayerRecord {
                diff_id: diff_id.clone(),
                digest: desc.digest.clone(),
                size: desc.size,
                media_type: desc.media_type.clone(),
                snapshot: name.clone(),
                created: 0,
            });
            parent = Some(name);
        }
        Ok(out)
    }
}

impl HashCache for StoreBackend {
    fn lookup(&self, keys: &[StatKey]) -> Vec<Option<[u8; 32]>> {
        let paths: Vec<String> = keys.iter().map(|k| path_key(&k.path)).collect();
        let entries: Vec<(&str, FileStat)> = keys
            .iter()
            .zip(&paths)
            .map(|(k, p)| (p.as_str(), stat_of(k)))
            .collect();
        match self.store.meta().file_hashes_get(&entries) {
            Ok(v) => v
                .into_iter()
                .map(|h| {
                    h.and_then(|h| {
                        let mut out = [0u8; 32];
                        hex::decode_to_slice(h.trim_start_matches("sha256:"), &mut out).ok()?;
                        Some(out)
                    })
                })
                .collect(),
            Err(_) => vec![None; keys.len()],
        }
    }

    fn store(&self, entries: &[(StatKey, [u8; 32])]) {
        let rows: Vec<(String, FileStat, String)> = entries
            .iter()
            .map(|(k, h)| (path_key(&k.path), stat_of(k), hex::encode(h)))
            .collect();
        let refs: Vec<(&str, FileStat, &str)> = rows
            .iter()
            .map(|(p, s, h)| (p.as_str(), *s, h.as_str()))
            .collect();
        let _ = self.store.meta().file_hashes_put(&refs);
    }
}

/// The hash cache's key for a host path: the path itself when it is
/// UTF-8, else `hex:` and its bytes in hex (never an absolute path, so
/// two names that differ only in bytes that are not UTF-8 keep two rows).
fn path_key(p: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let b = p.as_os_str().as_bytes();
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => format!("hex:{}", hex::encode(b)),
    }
}

fn stat_of(k: &StatKey) -> FileStat {
    FileStat {
        dev: k.dev,
        ino: k.ino,
        size: k.size,
        mtime_ns: k.mtime_ns,
        ctime_ns: k.ctime_ns,
        mode: k.mode,
    }
}

/// The registry domain under which `oci-layout://` build contexts are
/// imported: reserved (`.invalid`), never pulled.
pub const OCI_LAYOUT_DOMAIN: &str = "oci-layout.kiln.invalid";

impl StoreBackend {
    /// [`Backend::commit`], taking the layer's digest from `streamed`
    /// (for an overlay snapshot) instead of diffing the snapshot.
    fn commit_with(
        &self,
        active: Active,
        key: &str,
        opts: &DiffOptions,
        streamed: Option<kiln_cache::StreamedDiff>,
    ) -> BackendResult<LayerRecord> {
        let sn = self.sn();

        let result = (|| {
            let parent = sn
                .stat(&active.key)
                .map_err(BackendError::ctx("snapshot"))?
                .parent;
            // The layer's bytes stay in the snapshot: only its diffID and
            // size are computed here (one streaming pass, nothing written);
            // the tar is written again when the blob is read (export,
            // push) — see `Store::record_layer_source`.
            let source = sn
                .diff_source(&active.key)
                .map_err(BackendError::ctx("diff source"))?;
            // A layer streamed while the snapshot was written is taken
            // only for an overlay upperdir (what the stream was checked
            // against); the tar written again on export is verified
            // against this diffID.
            let (blob, size, usage) = match (streamed, &source) {
                (Some(s), kiln_cache::DiffSource::Overlay { .. }) => (s.diff_id, s.size, s.usage),
                _ => source.digest(opts).map_err(BackendError::ctx("diff"))?,
            };
            let diff_id: Digest = blob
                .to_string()
                .parse()
                .map_err(BackendError::ctx("digest"))?;
            let name = chain_id(parent.as_deref(), diff_id.as_str());
            let committed = match usage {
                Some(u) => sn.commit_measured(&name, &active.key, u),
                None => sn.commit(&name, &active.key),
            };
            match committed {
                Ok(()) => {
                    let _ = sn.meta().set_snapshot_diff_id(&name, &blob);
                }
                Err(_) if sn.stat(&name).is_ok() => {
                    // The same layer on the same parent exists already
                    // (a --no-cache rebuild): keep that one; this copy is
                    // left for prune rather than deleted now.
                    let _ = sn.retire(&active.key);
                }
                Err(err) => return Err(BackendError::ctx("commit snapshot")(err)),
            }
            self.store
                .record_layer_source(&blob, size, &name, opts)
                .map_err(BackendError::ctx("recording layer"))?;
            self.store
                .meta()
                .cache_put(key, Some(&name), Some(&blob), std::slice::from_ref(&blob))
                .map_err(BackendError::ctx("cache index"))?;
            Ok(LayerRecord {
                diff_id: diff_id.clone(),
                digest: diff_id,
                size,
                media_type: media_types::OCI_LAYER.to_string(),
                snapshot: name,
                created: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0),
            })
        })();
        if result.is_err() {
            let _ = sn.remove(&active.key);
        }
        result
    }

    /// Stored manifest `md`: its bytes, config digest and layer digests.
    fn manifest_parts(
        &self,
        md: &kiln_cache::Digest,
    ) -> BackendResult<(Vec<u8>, kiln_cache::Digest, Vec<kiln_cache::Digest>)> {
        let bytes = self
            .store
            .content()
            .read(md)
            .map_err(BackendError::ctx("manifest"))?;
        let m: ImageManifest =
            serde_json::from_slice(&bytes).map_err(BackendError::ctx("parsing manifest"))?;
        let layers = m
            .layers
            .iter()
            .map(|l| cache_digest(&l.digest))
            .collect::<BackendResult<Vec<_>>>()?;
        Ok((bytes, cache_digest(&m.config.digest)?, layers))
    }

    /// After a pull of one platform from index `index`: `name` points at
    /// the index, with every child the store holds, so that a build
    /// pulling another platform of the same name keeps this one.
    fn record_stored_index(&self, name: &str, index: &Digest) -> BackendResult<()> {
        let idig = cache_digest(index)?;
        let bytes = self
            .store
            .content()
            .read(&idig)
            .map_err(BackendError::ctx("index"))?;
        let raw = kiln_image::manifest::RawManifest::new(bytes, None)
            .map_err(BackendError::ctx("index"))?;
        let children = crate::platforms::stored_children(&self.store, &raw)
            .map_err(BackendError::ctx(name.to_string()))?;
        let mut parts = Vec::with_capacity(children.len());
        for d in children {
            let md = cache_digest(&d.digest)?;
            let (_, config, layers) = self.manifest_parts(&md)?;
            // Only children whose config is here too (a child of an
            // earlier pull may have been pruned in part).
            if !self.store.meta().has_blob(&config).unwrap_or(false) {
                continue;
            }
            parts.push((md, config, layers));
        }
        self.store
            .record_index(name, &idig, &parts)
            .map_err(BackendError::ctx("tagging"))
    }
}

impl Backend for StoreBackend {
    fn resolve_image(
        &self,
        reference: &str,
        platform: Option<&kiln_image::manifest::Platform>,
        progress: &(dyn Fn(kiln_registry::Transfer) + Sync),
    ) -> BackendResult<Option<BaseImage>> {
        // Docker/BuildKit word every unparsable name "invalid reference
        // format"; the detail follows.
        // An untagged image is found by the ID it is kept under, and only
        // in the store.
        let untagged = kiln_cache::is_untagged_name(reference)
            && self
                .store
                .meta()
                .image(reference)
                .map_err(BackendError::ctx("image table"))?
                .is_some();
        let name = if untagged {
            reference.to_string()
        } else {
            kiln_cache::normalize_reference(reference).map_err(|err| {
                BackendError::Invalid(format!(
                    "failed to parse stage name {reference:?}: invalid reference format ({err})"
                ))
            })?
        };
        let want = platform;
        // The stored image for `want` (a name pointing at an index, or an
        // explicit platform: the platform's image; else the one stored).
        let local = |name: &str| -> BackendResult<Option<(Vec<u8>, String)>> {
            let Some(rec) = self
                .store
                .meta()
                .image(name)
                .map_err(BackendError::ctx("image table"))?
            else {
                return Ok(None);
            };
            let md: kiln_cache::Digest = rec
                .manifest
                .parse()
                .map_err(BackendError::ctx("manifest digest"))?;
            if !self.store.pin_holds(name, &md) {
                // Pinned to another digest (see `Store::pin_holds`): not
                // this image; pulled by its digest instead.
                return Ok(None);
            }
            let bytes = self
                .store
                .content()
                .read(&md)
                .map_err(BackendError::ctx("manifest"))?;
            if want.is_none()
                && !kiln_image::manifest::RawManifest::new(bytes.clone(), None)
                    .is_ok_and(|r| r.is_index())
            {
                return Ok(Some((bytes, rec.manifest)));
            }
            let m = crate::platforms::select(&self.store, &rec.manifest, want, false)
                .map_err(BackendError::ctx(name.to_string()))?
                .manifest;
            Ok(Some((m.bytes, m.digest.to_string())))
        };
        let imported = untagged || name.starts_with(&format!("{OCI_LAYOUT_DOMAIN}/"));
        let found = match self.registry.as_ref().filter(|_| !imported) {
            Some((cfg, always)) => {
                // A stored name for another platform is pulled for this
                // one (the pulled manifest is used as it is: another
                // platform's pull of the same name may move the name).
                let have = if *always {
                    None
                } else {
                    local(&name).ok().flatten()
                };
                match have {
                    Some(h) => Some(h),
                    None => {
                        let pulled = crate::transfer::pull_platform(
                            &self.store,
                            cfg,
                            &name,
                            want,
                            4,
                            progress,
                        )
                        .map_err(BackendError::src)?;
                        if let Some(index) = &pulled.index_digest {
                            self.record_stored_index(&name, index)?;
                        }
                        let md = cache_digest(&pulled.manifest_digest)?;
                        let bytes = self
                            .store
                            .content()
                            .read(&md)
                            .map_err(BackendError::ctx("manifest"))?;
                        Some((bytes, pulled.manifest_digest.to_string()))
                    }
                }
            }
            None => local(&name)?,
        };
        let Some((bytes, manifest_digest)) = found else {
            return Ok(None);
        };
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(BackendError::ctx("parsing manifest"))?;
        let cd = cache_digest(&manifest.config.digest)?;
        let cbytes = self
            .store
            .content()
            .read(&cd)
            .map_err(BackendError::ctx("config"))?;
        let config =
            ImageConfig::from_bytes(&cbytes).map_err(BackendError::ctx("parsing config"))?;
        let layers = self.verify_layers(&name, &manifest, &config)?;
        Ok(Some(BaseImage {
            reference: name,
            manifest_digest,
            config,
            layers,
        }))
    }

    fn cache_alias(&self, key: &str, layer: &LayerRecord) -> BackendResult<()> {
        if self.sn().stat(&layer.snapshot).is_err() {
            let lazy = self
                .store
                .meta()
                .lazy_layers(&layer.snapshot)
                .map_err(BackendError::ctx("cache index"))?;
            if !lazy.is_empty() {
                let blob: kiln_cache::Digest = layer
                    .digest
                    .to_string()
                    .parse()
                    .map_err(BackendError::ctx("digest"))?;
                return self
                    .store
                    .meta()
                    .put_lazy_cache(key, &layer.snapshot, &blob, layer.created)
                    .map_err(BackendError::ctx("cache index"));
            }
        }
        self.store
            .meta()
            .cache_put(
                key,
                Some(&layer.snapshot),
                Some(&layer.diff_id),
                std::slice::from_ref(&layer.digest),
            )
            .map_err(BackendError::ctx("cache index"))
    }

    /// A snapshot's name is the chain ID of its parent and its diffID.
    fn hit_on(&self, hit: &LayerRecord, parent: Option<&str>) -> bool {
        hit.snapshot == chain_id(parent, hit.diff_id.as_str())
    }

    fn cache_get(&self, key: &str) -> BackendResult<Option<LayerRecord>> {
        let Some(rec) = self
            .store
            .meta()
            .cache_get(key)
            .map_err(BackendError::ctx("cache index"))?
        else {
            return self.lazy_hit(key);
        };
        let (Some(snap), Some(diff)) = (rec.snapshot, rec.diff_id) else {
            return Ok(None);
        };
        if self.sn().stat(&snap).is_err() {
            return Ok(None);
        }
        match self.layer_of(&snap, &diff, rec.created) {
            Ok(l) => Ok(Some(l)),
            Err(_) => Ok(None),
        }
    }

    fn prepare(&self, parent: Option<&str>) -> BackendResult<Active> {
        if let Some(p) = parent {
            self.ensure(p)?;
        }
        let key = format!(
            "build-{}-{}-{}",
            std::process::id(),
            ACTIVE.fetch_add(1, Ordering::Relaxed),
            kiln_image::Digest::sha256_of(format!("{:?}", std::time::SystemTime::now()).as_bytes())
                .hex()
                .get(..8)
                .unwrap_or_default()
        );
        let mounts = self
            .sn()
            .prepare(&key, parent)
            .map_err(BackendError::ctx("prepare snapshot"))?;
        let top = self
            .sn()
            .writable_dir(&key)
            .map_err(BackendError::ctx("snapshot dir"))?;
        let mut layers = vec![top];
        let mut mounts: Vec<RootfsMount> = mounts.iter().map(Self::to_rootfs).collect();
        if self.sn().name() == "overlay" {
            if let Some(p) = parent {
                let dirs = self.layer_dirs(p)?;
                let (blocks, keep) = crate::flatten::plan(dirs.len());
                if blocks.is_empty() {
                    layers.extend(dirs);
                } else {
                    // A deep chain: its top layers over merged blocks of
                    // the rest (see `flatten`), topmost block first.
                    let rows = self.chain(p)?;
                    let flats = blocks
                        .iter()
                        .rev()
                        .map(|b| self.block_dir(&rows, *b))
                        .collect::<BackendResult<Vec<_>>>()?;
                    for m in &mut mounts {
                        cap_lowers(m, keep, &flats);
                    }
                    layers.extend(dirs[..keep].iter().cloned());
                    layers.extend(flats);
                }
            }
        }
        Ok(Active {
            key,
            mounts,
            layers,
        })
    }

    fn commit(&self, active: Active, key: &str, opts: &DiffOptions) -> BackendResult<LayerRecord> {
        self.commit_with(active, key, opts, None)
    }

    fn commit_streamed(
        &self,
        active: Active,
        key: &str,
        opts: &DiffOptions,
        streamed: kiln_cache::StreamedDiff,
    ) -> BackendResult<LayerRecord> {
        self.commit_with(active, key, opts, Some(streamed))
    }

    fn abort(&self, active: Active) {
        let _ = self.sn().remove(&active.key);
    }

    fn layer_dirs(&self, snapshot: &str) -> BackendResult<Vec<PathBuf>> {
        self.ensure(snapshot)?;
        let sn = self.sn();
        if sn.name() != "overlay" {
            // A committed native snapshot is a full, immutable tree: read it
            // where it is.
            let row = sn.stat(snapshot).map_err(BackendError::ctx("snapshot"))?;
            return Ok(vec![self.snapshot_dir(&row.id)]);
        }
        Ok(self
            .chain(snapshot)?
            .iter()
            .map(|row| self.snapshot_dir(&row.id))
            .collect())
    }

    fn hash_cache(&self) -> &dyn HashCache {
        self
    }

    fn export(
        &self,
        config: &ImageConfig,
        layers: &[LayerRecord],
        tags: &[String],
    ) -> BackendResult<Exported> {
        let mut config = config.clone();
        config.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.clone()).collect();
        let cbytes = config.to_bytes().map_err(BackendError::ctx("config"))?;
        let config_desc = Descriptor::of_bytes(media_types::OCI_CONFIG, &cbytes);
        let layer_descs: Vec<Descriptor> = layers
            .iter()
            .map(|l| Descriptor::new(oci_layer_type(&l.media_type), l.digest.clone(), l.size))
            .collect();
        let mut manifest = ImageManifest::new(config_desc, layer_descs, true);
        if !self.annotations.is_empty() {
            manifest.annotations = Some(self.annotations.clone());
        }
        let mbytes = manifest.to_bytes().map_err(BackendError::ctx("manifest"))?;
        // Config and manifest are stored together (synced at once).
        let stored = self
            .store
            .put_bytes_all(&[
                (&cbytes, Some(media_types::OCI_CONFIG)),
                (&mbytes, Some(media_types::OCI_MANIFEST)),
            ])
            .map_err(BackendError::ctx("storing the config and manifest"))?;
        let [cdigest, mdigest]: [kiln_cache::Digest; 2] = stored
            .try_into()
            .map_err(|_| BackendError::ctx("storing")(std::io::Error::other("two blobs")))?;
        let layer_blobs = layers
            .iter()
            .map(|l| cache_digest(&l.digest))
            .collect::<BackendResult<Vec<_>>>()?;
        for tag in tags {
            self.store
                .record_image(tag, &mdigest, &cdigest, &layer_blobs)
                .map_err(BackendError::ctx("tagging"))?;
        }
        if tags.is_empty() {
            // Reachable by its ID (`kiln run $(kiln build -q .)`) until it
            // is named or the next prune removes it, as docker's dangling
            // images.
            self.store
                .record_untagged(&mdigest, &cdigest, &layer_blobs)
                .map_err(BackendError::ctx("recording the untagged image"))?;
        }
        Ok(Exported {
            image_id: cdigest.to_string(),
            manifest_digest: mdigest.to_string(),
        })
    }

    fn export_index(
        &self,
        children: &[(kiln_image::manifest::Platform, Exported)],
        tags: &[String],
    ) -> BackendResult<Exported> {
        let mut descs = Vec::with_capacity(children.len());
        let mut parts = Vec::with_capacity(children.len());
        for (platform, child) in children {
            let md = child
                .manifest_digest
                .parse::<kiln_cache::Digest>()
                .map_err(BackendError::ctx("manifest digest"))?;
            let (bytes, config, layers) = self.manifest_parts(&md)?;
            let mut d = Descriptor::of_bytes(media_types::OCI_MANIFEST, &bytes);
            d.platform = Some(kiln_image::platform::normalize(platform));
            descs.push(d);
            parts.push((md, config, layers));
        }
        let ibytes = kiln_image::manifest::ImageIndex::new(descs)
            .to_bytes()
            .map_err(BackendError::ctx("index"))?;
        let idigest = self
            .store
            .put_bytes(&ibytes, Some(media_types::OCI_INDEX))
            .map_err(BackendError::ctx("storing index"))?;
        for tag in tags {
            self.store
                .record_index(tag, &idigest, &parts)
                .map_err(BackendError::ctx("tagging"))?;
        }
        Ok(Exported {
            image_id: idigest.to_string(),
            manifest_digest: idigest.to_string(),
        })
    }

    fn cache_mount(
        &self,
        id: &str,
        sharing: kiln_cache::CacheSharing,
        cancelled: &dyn Fn() -> bool,
    ) -> BackendResult<crate::backend::CacheMountHold> {
        let m = self
            .store
            .cache_mount(id, sharing, cancelled)
            .map_err(BackendError::ctx("cache mount"))?;
        Ok(crate::backend::CacheMountHold {
            dir: m.dir.clone(),
            created: m.created,
            guard: Box::new(m),
        })
    }

    fn scratch_dir(&self) -> PathBuf {
        self.store.tmp_dir().to_path_buf()
    }

    fn stack_layer(
        &self,
        parent: Option<&str>,
        layer: &LayerRecord,
        key: &str,
    ) -> BackendResult<LayerRecord> {
        self.ensure(&layer.snapshot)?;
        if let Some(p) = parent {
            self.ensure(p)?;
        }
        crate::link::stack_layer(&self.store, parent, layer, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the copying snapshotter, a committed layer is read where it is
    /// (COPY --from, flattening): one full tree, no view snapshot left over.
    #[test]
    fn native_layer_dirs_are_the_committed_tree() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = Store::open_with(
            root.path(),
            kiln_cache::StoreOptions {
                snapshotter: kiln_cache::SnapshotterKind::Native,
            },
        )
        .expect("store");
        let b = StoreBackend::new(store);
        let active = b.prepare(None).expect("prepare");
        let top = active.layers[0].clone();
        std::fs::write(top.join("hello"), "hi").expect("write");
        let layer = b
            .commit(active, "key-1", &DiffOptions::default())
            .expect("commit");
        let before = b.store().meta().snapshots().expect("rows").len();
        let dirs = b.layer_dirs(&layer.snapshot).expect("dirs");
        assert_eq!(dirs.len(), 1);
        assert_eq!(
            std::fs::read_to_string(dirs[0].join("hello")).expect("read"),
            "hi"
        );
        assert_eq!(b.store().meta().snapshots().expect("rows").len(), before);
    }
}
