//! A build cache shared through a registry or an OCI layout directory
//! (`--cache-from` / `--cache-to`; the format is `docs/cache-format.md`).
//!
//! [`RemoteCacheBackend`] wraps the store backend. On a local cache miss
//! it consults the imported records (step key → layer descriptor, diffID,
//! chain ID, parent chain ID); a hit is returned at once as a *pending*
//! layer, and only materialised — blob downloaded and verified,
//! decompressed into the store's uncompressed blob, applied as a snapshot
//! on its parent, recorded in the local cache index — when something needs
//! its files (a RUN or COPY on top of it, a `COPY --from` reading it) or
//! the exported image needs its blob. A hit whose layer nothing needs is
//! never downloaded.
//!
//! Every step the build ran or took from a cache is remembered, so that at
//! the end the records of the final image (`mode=min`) or of every stage
//! (`mode=max`) can be exported: layers compressed once (gzip, through the
//! store's compression memo), pushed (existing blobs are skipped after a
//! HEAD), and described by an OCI image manifest whose config
//! (`application/vnd.kiln.cache.config.v1+json`) lists the records.
//! `type=inline` puts the same record list, for the image's own layers,
//! into an annotation of the pushed image manifest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use kiln_cache::{Snapshotter, Store};
use kiln_image::compression::{
    decompress_auto, Compression, GZIP_DEFAULT_LEVEL, ZSTD_DEFAULT_LEVEL,
};
use kiln_image::config::ImageConfig;
use kiln_image::diff::DiffOptions;
use kiln_image::manifest::{
    media_types, Descriptor, ImageIndex, ImageManifest, Platform, RawManifest, ANNOTATION_REF_NAME,
};
use kiln_image::Digest;
use kiln_registry::{BlobSink, Reference, Registry, RegistryConfig, Transfer};
use serde::{Deserialize, Serialize};

use crate::backend::{
    Active, Backend, BackendError, BackendResult, BaseImage, CacheMountHold, Exported, LayerRecord,
};
use crate::context::oci_layout::{layout_io_error, open_layout_file, read_layout_file};
use crate::copy::HashCache;
use crate::store::{chain_id, StoreBackend};
use crate::transfer::{encode_image, encode_one, push_layers, LayerEncoding, StoreSource};

crate::error::module_error! {
    /// Why a cache import or export failed.
    pub enum RemoteCacheError {}
}

crate::error::wrap_from!(RemoteCacheError: BackendError, crate::transfer::TransferError);
crate::error::wrap_from!(BackendError: RemoteCacheError);

/// Media type of the cache config blob (also the manifest's `artifactType`).
pub const CACHE_CONFIG_MEDIA_TYPE: &str = "application/vnd.kiln.cache.config.v1+json";
/// Annotation of an image manifest carrying inline cache records (the
/// config JSON as a string).
pub const INLINE_ANNOTATION: &str = "dev.kiln.cache.v1";

/// The cache config blob: the records of a cache manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheConfig {
    /// Always 1.
    pub schema_version: u32,
    /// One record per cached step.
    pub records: Vec<CacheRecord>,
}

/// One cached step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The step's cache key.
    pub key: String,
    /// Index of the step's layer in the manifest's `layers`.
    pub layer: usize,
    /// sha256 of the uncompressed layer tar.
    #[serde(rename = "diffID")]
    pub diff_id: Digest,
    /// OCI chain ID of the layer on its parent (names the snapshot).
    #[serde(rename = "chainID")]
    pub chain_id: String,
    /// Chain ID of the layer below (a base-image layer or another record);
    /// absent for a layer on an empty filesystem.
    #[serde(
        rename = "parentChainID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub parent_chain_id: Option<String>,
    /// When the step ran (Unix seconds; image history times).
    #[serde(default)]
    pub created: i64,
}

/// `mode=` of `--cache-to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// The steps whose layers are in the exported image.
    #[default]
    Min,
    /// The steps of every stage of the build.
    Max,
}

/// Where `--cache-from` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheImport {
    /// A cache manifest, or an image with inline cache, in a registry.
    Registry(String),
    /// An OCI layout directory (`src=`), manifest named `tag`.
    Local {
        /// The layout directory.
        dir: PathBuf,
        /// The `org.opencontainers.image.ref.name` to pick.
        tag: String,
    },
}

/// What an export wrote.
#[derive(Debug, Clone, Default)]
pub struct ExportSummary {
    /// Records written.
    pub records: usize,
    /// Layer blobs referenced.
    pub layers: usize,
    /// Blobs actually uploaded or copied (others were there already).
    pub written: usize,
    /// Digest of the cache manifest (or annotated image manifest).
    pub manifest: Option<Digest>,
}

#[derive(Clone)]
enum Origin {
    /// A registry (by host: each blob is fetched through its mirrors
    /// first, then from it) and a repository.
    Registry {
        registry: String,
        repo: String,
    },
    Dir(PathBuf),
}

impl Remote {
    /// The key under which this imported step is remembered in the
    /// store's cache index: a record an import brought is the import's
    /// word, not the store's, so it is a hit again only for a build whose
    /// import says the same — the same source, and the same layer (chain
    /// ID) and blob for the step's key. Never for a build without
    /// `--cache-from`, nor for one importing another tag of the same
    /// repository or another cache at the same path that names other
    /// bytes for the key (a hostile job's cache naming a victim's step
    /// keys would otherwise poison the victim's later builds on a shared
    /// store).
    fn scoped(&self, key: &str) -> String {
        let source = match &self.origin {
            Origin::Registry { registry, repo } => format!("registry {registry}/{repo}"),
            Origin::Dir(dir) => format!("dir {}", dir.display()),
        };
        format!(
            "cache-from {source} {key} {} {}",
            self.rec.chain_id, self.desc.digest
        )
    }
}

#[derive(Clone)]
struct Remote {
    rec: CacheRecord,
    desc: Descriptor,
    origin: Origin,
}

#[derive(Clone)]
struct Seen {
    snapshot: String,
    diff_id: Digest,
    created: i64,
}

fn cd(d: &Digest) -> Result<kiln_cache::Digest, RemoteCacheError> {
    d.as_str()
        .parse()
        .map_err(|e| RemoteCacheError::ctx(d.as_str())(e))
}

/// The most of an OCI layout's `index.json` read back.
const INDEX_LIMIT: u64 = 16 << 20;

/// The bytes of manifests and cache configs one `--cache-from` of a
/// registry may bring in all.
const IMPORT_BUDGET: u64 = 256 << 20;

/// A layout directory's root (see [`crate::context::oci_layout::open_layout_file`]).
fn layout_root(dir: &Path) -> Result<kiln_fs::Root, RemoteCacheError> {
    kiln_fs::Root::open(dir).map_err(|e| layout_error(dir, e))
}

/// A file-system error in a cache layout (a symlink said as such).
fn layout_error(dir: &Path, e: kiln_fs::Error) -> RemoteCacheError {
    RemoteCacheError::ctx(dir.display().to_string())(layout_io_error(e))
}

/// A blob of an OCI layout opened for reading (never through a symlink,
/// never a fifo or device).
fn open_layout_blob(dir: &Path, d: &Digest) -> Result<std::fs::File, RemoteCacheError> {
    open_layout_file(&layout_root(dir)?, &layout_blob(d))
        .map_err(|e| RemoteCacheError::ctx(dir.display().to_string())(e))
}

fn layout_blob(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm(), d.hex())
}

/// Reads a blob of an OCI layout, verified against `d`.
fn read_layout_blob(dir: &Path, d: &Digest, limit: u64) -> Result<Vec<u8>, RemoteCacheError> {
    let v = read_layout_file(&layout_root(dir)?, &layout_blob(d), limit)
        .map_err(|e| RemoteCacheError::ctx(format!("blob {d}"))(e))?;
    if &Digest::sha256_of(&v) != d {
        return Err(RemoteCacheError::Invalid(format!(
            "blob {d}: content does not match its digest"
        )));
    }
    Ok(v)
}

/// The store backend plus imported remote cache records; see the module
/// documentation.
pub struct RemoteCacheBackend {
    inner: StoreBackend,
    registry: RegistryConfig,
    /// Imported records by step key (the first import naming a key wins).
    index: HashMap<String, Remote>,
    /// Remote hits not applied yet, by chain ID.
    pending: Mutex<HashMap<String, Remote>>,
    /// Steps of this build (ran or cached), by key.
    seen: Mutex<BTreeMap<String, Seen>>,
    /// Snapshots of the exported image's layers, bottom first.
    final_layers: Mutex<Vec<String>>,
    /// One materialisation at a time.
    materializing: Mutex<()>,
    /// Snapshots of the steps this build took from an import (its
    /// records, or what an earlier build remembered of them): the
    /// import's word, never remembered under a key of the store's own.
    imported: Mutex<HashSet<String>>,
}

impl RemoteCacheBackend {
    /// Wraps `inner`; `registry` is used for imports and exports.
    pub fn new(inner: StoreBackend, registry: RegistryConfig) -> Self {
        RemoteCacheBackend {
            inner,
            registry,
            index: HashMap::new(),
            pending: Mutex::new(HashMap::new()),
            seen: Mutex::new(BTreeMap::new()),
            final_layers: Mutex::new(Vec::new()),
            materializing: Mutex::new(()),
            imported: Mutex::new(HashSet::new()),
        }
    }

    /// Whether the step whose layer is `snapshot` was taken from an import.
    fn is_imported(&self, snapshot: &str) -> bool {
        self.imported
            .lock()
            .map(|i| i.contains(snapshot))
            .unwrap_or(true)
    }

    /// The store.
    pub fn store(&self) -> &Store {
        self.inner.store()
    }

    fn sn(&self) -> &dyn Snapshotter {
        self.store().snapshotter()
    }

    /// Reads the records of `src` (a manifest fetch and a config fetch; no
    /// layer is downloaded). An image index (a multi-platform image with
    /// inline cache) gives the records of every platform's image, not
    /// just the host's. Returns how many records were usable.
    pub fn import(&mut self, src: &CacheImport) -> Result<usize, RemoteCacheError> {
        let (manifest, origin, config) = match src {
            CacheImport::Registry(reference) => {
                let name = kiln_cache::normalize_reference(reference)
                    .map_err(|e| RemoteCacheError::ctx(reference)(e))?;
                let r = Reference::parse(&name).map_err(|e| RemoteCacheError::ctx(reference)(e))?;
                // Every fetch below goes through the mirrors then the
                // origin, as a pull does: a mirror that answered the tag
                // may lack a blob or serve bad bytes.
                let cfg = &self.registry.clone();
                let (_, resolved) = Registry::through_mirrors(&r.registry, cfg, |reg| {
                    reg.resolve(&r, &Platform::host())
                })
                .map_err(RemoteCacheError::src)?;
                // The other platforms' manifests of an index (a
                // multi-platform build's inline caches): each distinct
                // digest fetched once, by digest, and taken in before the
                // next is fetched, within a budget of bytes for the whole
                // import (1,024 entries naming one 4 MiB manifest took
                // 4 GB of memory before).
                let others: Vec<Descriptor> = match &resolved.index {
                    Some(i) => i
                        .index()
                        .map_err(|e| RemoteCacheError::ctx(reference)(e))?
                        .manifests
                        .into_iter()
                        .take(crate::platforms::MAX_INDEX_ENTRIES)
                        .filter(|d| {
                            d.platform
                                .as_ref()
                                .is_some_and(|p| p.os != "unknown" && !p.matches(&Platform::host()))
                        })
                        .collect(),
                    None => Vec::new(),
                };
                let origin = Origin::Registry {
                    registry: r.registry.clone(),
                    repo: r.repository.clone(),
                };
                let mut budget: u64 = IMPORT_BUDGET;
                let mut seen = HashSet::from([resolved.manifest.digest.clone()]);
                let mut n =
                    self.import_registry_manifest(&resolved.manifest, &r, &origin, &mut budget)?;
                for d in others {
                    // Each entry's own digest once (an entry naming a
                    // nested index is fetched once, then refused).
                    if !seen.insert(d.digest.clone()) {
                        continue;
                    }
                    if budget == 0 {
                        return Err(RemoteCacheError::invalid(format!(
                            "{reference}: the cache's manifests and configs pass {} MiB in all",
                            IMPORT_BUDGET >> 20
                        )));
                    }
                    let by_digest = Reference {
                        tag: None,
                        digest: Some(d.digest.clone()),
                        ..r.clone()
                    };
                    let p = d.platform.clone().unwrap_or_else(Platform::host);
                    let (_, other) = Registry::through_mirrors(&r.registry, cfg, |reg| {
                        reg.resolve(&by_digest, &p)
                    })
                    .map_err(RemoteCacheError::src)?;
                    if other.index.is_some() || other.manifest.digest != d.digest {
                        // A nested index: not a platform's manifest.
                        budget = budget.saturating_sub(other.manifest.bytes.len() as u64);
                        continue;
                    }
                    n +=
                        self.import_registry_manifest(&other.manifest, &r, &origin, &mut budget)?;
                }
                return Ok(n);
            }
            CacheImport::Local { dir, tag } => {
                let raw = read_layout_manifest(dir, tag)?;
                let m = raw
                    .manifest()
                    .map_err(|e| RemoteCacheError::ctx(dir.display().to_string())(e))?;
                let config = if is_cache_manifest(&m) {
                    Some(read_layout_blob(dir, &m.config.digest, 64 << 20)?)
                } else {
                    None
                };
                (m, Origin::Dir(dir.clone()), config)
            }
        };
        self.import_records(&manifest, &origin, config)
    }

    /// The records of one manifest fetched from the registry of `r` (a
    /// cache manifest, whose config is fetched too, or an image with
    /// inline cache); what was read is charged to `budget`.
    fn import_registry_manifest(
        &mut self,
        raw: &RawManifest,
        r: &Reference,
        origin: &Origin,
        budget: &mut u64,
    ) -> Result<usize, RemoteCacheError> {
        *budget = budget.saturating_sub(raw.bytes.len() as u64);
        let m = raw
            .manifest()
            .map_err(|e| RemoteCacheError::ctx(r.to_string())(e))?;
        let config = if is_cache_manifest(&m) {
            let bytes = Registry::through_mirrors(&r.registry, &self.registry, |reg| {
                reg.get_blob_bytes(&r.repository, &m.config)
            })
            .map_err(RemoteCacheError::src)?
            .1;
            *budget = budget.saturating_sub(bytes.len() as u64);
            Some(bytes)
        } else {
            None
        };
        self.import_records(&m, origin, config)
    }

    /// The records of one cache manifest (its `config`) or image with
    /// inline cache (`config` is `None`), whose layers come from `origin`.
    fn import_records(
        &mut self,
        manifest: &ImageManifest,
        origin: &Origin,
        config: Option<Vec<u8>>,
    ) -> Result<usize, RemoteCacheError> {
        let cfg: CacheConfig = match config {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| RemoteCacheError::ctx("parsing the cache config")(e))?,
            None => {
                let text = manifest
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(INLINE_ANNOTATION))
                    .ok_or_else(|| {
                        RemoteCacheError::invalid(
                            "neither a kiln cache manifest nor an image with inline cache",
                        )
                    })?;
                serde_json::from_str(text)
                    .map_err(|e| RemoteCacheError::ctx("parsing the inline cache")(e))?
            }
        };
        let mut n = 0;
        for rec in cfg.records {
            let Some(desc) = manifest.layers.get(rec.layer) else {
                continue;
            };
            // A record must name its snapshot consistently.
            if chain_id(rec.parent_chain_id.as_deref(), rec.diff_id.as_str()) != rec.chain_id {
                continue;
            }
            // Nor may its layer's size contradict what the store knows of
            // the blob (stored, or claimed by an earlier import): one of
            // the two is a lie, and a lie kept would describe — and break
            // the download of — every image naming the blob.
            if let Ok(known) = self.store().blob_size(&cd(&desc.digest)?) {
                if known != desc.size {
                    tracing::debug!(blob = %desc.digest, claimed = desc.size, known, "cache record skipped: its layer's size contradicts the store");
                    continue;
                }
            }
            if !self.index.contains_key(&rec.key) {
                n += 1;
                self.index.insert(
                    rec.key.clone(),
                    Remote {
                        rec,
                        desc: desc.clone(),
                        origin: origin.clone(),
                    },
                );
            }
        }
        Ok(n)
    }

    /// Whether `name` is here: committed, or a lazy layer that can be
    /// made (a base image's layers are kept lazy until a step needs them).
    fn has_snapshot(&self, name: &str) -> bool {
        self.sn()
            .stat(name)
            .is_ok_and(|i| i.kind == kiln_cache::Kind::Committed)
            || self.store().lazy_ready(name).is_ok_and(|l| l.is_some())
    }

    fn note(&self, key: &str, l: &LayerRecord) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(
                key.to_string(),
                Seen {
                    snapshot: l.snapshot.clone(),
                    diff_id: l.diff_id.clone(),
                    created: l.created,
                },
            );
        }
    }

    fn remote_hit(&self, key: &str) -> BackendResult<Option<LayerRecord>> {
        let Some(remote) = self.index.get(key) else {
            return Ok(None);
        };
        let rec = &remote.rec;
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| BackendError::invalid("lock poisoned"))?;
        if let Some(p) = &rec.parent_chain_id {
            if !pending.contains_key(p) && !self.has_snapshot(p) {
                return Ok(None);
            }
        }
        pending
            .entry(rec.chain_id.clone())
            .or_insert_with(|| remote.clone());
        Ok(Some(LayerRecord {
            diff_id: rec.diff_id.clone(),
            digest: rec.diff_id.clone(),
            // The uncompressed size is known once materialised (export).
            size: remote.desc.size,
            media_type: media_types::OCI_LAYER.to_string(),
            snapshot: rec.chain_id.clone(),
            created: rec.created,
        }))
    }

    /// Applies `snapshot` and its pending ancestors (no-op when it is not
    /// pending).
    fn materialize(&self, snapshot: &str) -> BackendResult<()> {
        let _one = self
            .materializing
            .lock()
            .map_err(|_| BackendError::invalid("lock poisoned"))?;
        let mut todo = Vec::new();
        {
            let pending = self
                .pending
                .lock()
                .map_err(|_| BackendError::invalid("lock poisoned"))?;
            let mut cur = Some(snapshot.to_string());
            while let Some(c) = cur {
                let Some(r) = pending.get(&c) else { break };
                cur = r.rec.parent_chain_id.clone();
                todo.push(r.clone());
            }
        }
        if todo.len() > 1 {
            self.prefetch(&todo);
        }
        // What the chain goes on may be a lazy layer (a base image's):
        // made first.
        if let Some(p) = todo.last().and_then(|r| r.rec.parent_chain_id.as_deref()) {
            self.store()
                .unpack_lazy(p)
                .map_err(BackendError::ctx("unpacking a base layer"))?;
        }
        for r in todo.iter().rev() {
            self.apply_remote(r).map_err(BackendError::ctx(format!(
                "importing cached layer {}",
                r.desc.digest
            )))?;
            if let Ok(mut p) = self.pending.lock() {
                p.remove(&r.rec.chain_id);
            }
        }
        Ok(())
    }

    /// Downloads the blobs of `todo` (a chain about to be applied) up to
    /// four at once, so that applying them in order waits for no
    /// download. A failure is left for [`Self::apply_remote`] to meet
    /// again and report.
    fn prefetch(&self, todo: &[Remote]) {
        let store = self.store();
        let missing: Vec<Remote> = todo
            .iter()
            .filter(|r| {
                cd(&r.rec.diff_id).is_ok_and(|diff| {
                    !(store.has_blob(&diff) && store.meta().has_blob(&diff).unwrap_or(false))
                })
            })
            .cloned()
            .collect();
        self.fetch_all(&missing, 4);
    }

    /// Downloads the blobs of `todo`, up to `at_once` at a time (a
    /// failure is left for the caller's own fetch to meet again and
    /// report).
    fn fetch_all(&self, todo: &[Remote], at_once: usize) {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..todo.len().min(at_once) {
                s.spawn(|| {
                    while let Some(r) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let _ = self.fetch(r);
                    }
                });
            }
        });
    }

    /// Keeps the compressed layer of `r` as a lazy layer, its snapshot
    /// made on first use. Its blob stays in the registry until something
    /// reads it (a push elsewhere, `kiln save`, a step or `kiln run` that
    /// needs the files), as BuildKit's lazy blobs: then it is downloaded
    /// and verified against its digest. A cache directory's blob is
    /// stored now (verified), the directory being no place to keep it.
    fn keep_lazy(&self, r: &Remote) -> Result<(), RemoteCacheError> {
        let store = self.store();
        match &r.origin {
            Origin::Registry { registry, repo } => store
                .record_remote_blob(
                    &cd(&r.desc.digest)?,
                    r.desc.size,
                    &r.desc.media_type,
                    &kiln_cache::RemoteBlob {
                        registry: registry.clone(),
                        repo: repo.clone(),
                        insecure: self.registry.is_insecure(registry),
                    },
                )
                .map_err(|e| RemoteCacheError::ctx("cache index")(e))?,
            Origin::Dir(_) => self.fetch(r)?,
        }
        store
            .meta()
            .put_lazy_layer(&kiln_cache::LazyLayer {
                snapshot: r.rec.chain_id.clone(),
                parent: r.rec.parent_chain_id.clone(),
                blob: cd(&r.desc.digest)?,
                media_type: r.desc.media_type.clone(),
                size: r.desc.size,
                diff_id: cd(&r.rec.diff_id)?,
            })
            .map_err(|e| RemoteCacheError::ctx("cache index")(e))?;
        // Not in the compression memo yet: the record's diffID is only a
        // claim until the blob is unpacked or checked (a push checks it
        // before sending the blob for that diffID: see `plan_layer`).
        Ok(())
    }

    fn fetch(&self, r: &Remote) -> Result<(), RemoteCacheError> {
        let store = self.store();
        // A file stored: a blob kept in the registry (see `keep_lazy`) is
        // fetched here too.
        let sink = crate::transfer::FileSink(store);
        if sink.has_blob(&r.desc) {
            return Ok(());
        }
        match &r.origin {
            Origin::Registry { registry, repo } => {
                Registry::through_mirrors(registry, &self.registry, |reg| {
                    reg.pull_blob(repo, &r.desc, &sink, &|_: Transfer| {})
                })
                .map(|_| ())
                .map_err(RemoteCacheError::src)
            }
            Origin::Dir(dir) => {
                let mut f = open_layout_blob(dir, &r.desc.digest)?;
                sink.put_blob(&r.desc, &mut f)
                    .map_err(RemoteCacheError::src)
            }
        }
    }

    fn apply_remote(&self, r: &Remote) -> Result<(), RemoteCacheError> {
        let store = self.store();
        let diff = cd(&r.rec.diff_id)?;
        let have_tar = store.has_blob(&diff) && store.meta().has_blob(&diff).unwrap_or(false);
        if !have_tar {
            self.fetch(r)?;
            // Whether this blob was proved here to be the layer (its tar
            // hashed to the diffID): only then is it the memo's blob for
            // the diffID. A tar another build stored meanwhile proves
            // nothing about this blob.
            let mut proved = false;
            if r.desc.digest != r.rec.diff_id {
                // One pass over the compressed blob: its files applied
                // while the verified tar is kept. The fallback below
                // (decompress into the store) is for a snapshot that
                // exists already without its tar.
                let blob = cd(&r.desc.digest)?;
                proved = store
                    .unpack_layer_keeping_tar(
                        &r.rec.chain_id,
                        r.rec.parent_chain_id.as_deref(),
                        kiln_cache::LayerBlob {
                            digest: &blob,
                            size: Some(r.desc.size),
                            diff_id: &diff,
                        },
                    )
                    .map_err(|e| RemoteCacheError::ctx("applying")(e))?;
            }
            let have_tar = store.has_blob(&diff) && store.meta().has_blob(&diff).unwrap_or(false);
            if !have_tar && r.desc.digest != r.rec.diff_id {
                let f = store
                    .open_blob(&cd(&r.desc.digest)?)
                    .map_err(RemoteCacheError::src)?;
                let mut tar =
                    decompress_auto(f).map_err(|e| RemoteCacheError::ctx("decompress")(e))?;
                let mut w = store.content().writer().map_err(RemoteCacheError::src)?;
                std::io::copy(&mut tar, &mut w)
                    .map_err(|e| RemoteCacheError::ctx("decompress")(e))?;
                store
                    .commit_blob(w, Some(&diff), None, Some(media_types::OCI_LAYER))
                    .map_err(|e| {
                        RemoteCacheError::ctx("layer content does not match its diffID")(e)
                    })?;
                proved = true;
            }
            if proved {
                remember_compressed(store, r)?;
            }
        }
        store
            .unpack_layer(
                &r.rec.chain_id,
                r.rec.parent_chain_id.as_deref(),
                kiln_cache::LayerBlob {
                    digest: &diff,
                    size: None,
                    diff_id: &diff,
                },
            )
            .map_err(|e| RemoteCacheError::ctx("applying")(e))?;
        let _ = store.meta().add_blob_snapshot(&diff, &r.rec.chain_id);
        store
            .meta()
            .cache_put_created(
                &r.scoped(&r.rec.key),
                Some(&r.rec.chain_id),
                Some(&diff),
                std::slice::from_ref(&diff),
                r.rec.created,
            )
            .map_err(|e| RemoteCacheError::ctx("cache index")(e))
    }

    /// The snapshot `snapshot` goes on: its row's, or a lazy layer's.
    fn parent_of(&self, snapshot: &str) -> Option<String> {
        match self.sn().stat(snapshot) {
            Ok(i) => i.parent,
            Err(_) => {
                self.store()
                    .meta()
                    .lazy_layers(snapshot)
                    .ok()?
                    .into_iter()
                    .next()?
                    .parent
            }
        }
    }

    /// The records to export and their layer blobs (gzip), everything
    /// materialised locally first, each layer compressed into the store
    /// (and the memo) once.
    fn collect(
        &self,
        mode: CacheMode,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<(CacheConfig, Vec<Descriptor>), RemoteCacheError> {
        let (cfg, plain) = self.collect_plain(mode)?;
        let mut layers = Vec::with_capacity(plain.len());
        for (l, diff) in &plain {
            layers.push(encode_one(
                self.store(),
                l,
                diff,
                LayerEncoding::default(),
                progress,
            )?);
        }
        Ok((cfg, layers))
    }

    /// The records to export and their layers as stored (uncompressed,
    /// each with its diffID, each once), everything materialised locally
    /// first: a record's `layer` indexes the list.
    fn collect_plain(
        &self,
        mode: CacheMode,
    ) -> Result<(CacheConfig, Vec<(Descriptor, Digest)>), RemoteCacheError> {
        let finals: HashSet<String> = self
            .final_layers
            .lock()
            .map_err(|_| BackendError::invalid("lock poisoned"))?
            .iter()
            .cloned()
            .collect();
        let seen: Vec<(String, Seen)> = self
            .seen
            .lock()
            .map_err(|_| BackendError::invalid("lock poisoned"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let store = self.store();
        let mut layers: Vec<(Descriptor, Digest)> = Vec::new();
        let mut records = Vec::new();
        for (key, sn) in seen {
            if mode == CacheMode::Min && !finals.contains(&sn.snapshot) {
                continue;
            }
            self.materialize(&sn.snapshot)?;
            let layer = match layers.iter().position(|(_, d)| d == &sn.diff_id) {
                Some(i) => i,
                None => {
                    let diff = cd(&sn.diff_id)?;
                    // A step taken from a cache imported by an earlier
                    // build has its layer as the compressed blob of that
                    // import only: its tar is made (and proved) now.
                    if !store.has_blob(&diff) {
                        store
                            .keep_lazy_tar(&diff)
                            .map_err(|e| RemoteCacheError::ctx("layer")(e))?;
                    }
                    let size = store
                        .blob_size(&diff)
                        .map_err(|e| RemoteCacheError::ctx("layer")(e))?;
                    let plain = Descriptor::new(media_types::OCI_LAYER, sn.diff_id.clone(), size);
                    layers.push((plain, sn.diff_id.clone()));
                    layers.len() - 1
                }
            };
            records.push(CacheRecord {
                key,
                layer,
                diff_id: sn.diff_id.clone(),
                parent_chain_id: self.parent_of(&sn.snapshot),
                chain_id: sn.snapshot,
                created: sn.created,
            });
        }
        Ok((
            CacheConfig {
                schema_version: 1,
                records,
            },
            layers,
        ))
    }

    /// The cache config, stored, and its descriptor.
    fn cache_config(&self, cfg: &CacheConfig) -> Result<Descriptor, RemoteCacheError> {
        let cbytes =
            serde_json::to_vec(cfg).map_err(|e| RemoteCacheError::ctx("cache config")(e))?;
        self.store()
            .put_bytes(&cbytes, Some(CACHE_CONFIG_MEDIA_TYPE))
            .map_err(|e| RemoteCacheError::ctx("storing the cache config")(e))?;
        Ok(Descriptor::of_bytes(CACHE_CONFIG_MEDIA_TYPE, &cbytes))
    }

    /// The cache manifest of `config` and `layers`, stored.
    fn cache_manifest(
        &self,
        config: Descriptor,
        layers: Vec<Descriptor>,
    ) -> Result<RawManifest, RemoteCacheError> {
        let raw = cache_manifest_raw(config, layers)?;
        self.store()
            .put_bytes(&raw.bytes, Some(&raw.media_type))
            .map_err(|e| RemoteCacheError::ctx("storing the cache manifest")(e))?;
        Ok(raw)
    }

    /// `--cache-to type=registry,ref=REF`: layers and the cache manifest
    /// pushed to `reference` (blobs the registry has are not uploaded).
    pub fn export_registry(
        &self,
        reference: &str,
        mode: CacheMode,
        jobs: usize,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<ExportSummary, RemoteCacheError> {
        let name = kiln_cache::normalize_reference(reference)
            .map_err(|e| RemoteCacheError::ctx(reference)(e))?;
        let r = Reference::parse(&name).map_err(|e| RemoteCacheError::ctx(reference)(e))?;
        let reg = Registry::new(&r.registry, &self.registry).map_err(RemoteCacheError::src)?;
        let (cfg, plain) = self.collect_plain(mode)?;
        let written = AtomicUsize::new(0);
        let count = |t: Transfer| {
            if matches!(t, Transfer::Done(..)) {
                written.fetch_add(1, Ordering::Relaxed);
            }
        };
        let source = StoreSource {
            store: self.store(),
            mounts: HashMap::new(),
            target: None,
        };
        // Layers not compressed yet are compressed while they upload
        // (as `kiln push` does), several at once, the config beside them;
        // the manifest goes up while the last memo entries are committed.
        // The config and the manifest are made for this push and sent
        // from memory: the store has no use for them (a local export
        // stores its own).
        let cbytes =
            serde_json::to_vec(&cfg).map_err(|e| RemoteCacheError::ctx("cache config")(e))?;
        let config = Descriptor::of_bytes(CACHE_CONFIG_MEDIA_TYPE, &cbytes);
        let held = [(config.digest.clone(), cbytes.as_slice())];
        let with_config = crate::transfer::WithBytes {
            inner: &source,
            bytes: &held,
        };
        let tag = r.tag.clone().unwrap_or_else(|| "latest".to_string());
        let (layers, digest) = push_layers(
            self.store(),
            &reg,
            &r.repository,
            &with_config,
            &plain,
            std::slice::from_ref(&config),
            LayerEncoding::default(),
            jobs,
            progress,
            &count,
            |layers| -> Result<_, RemoteCacheError> {
                let raw = cache_manifest_raw(config.clone(), layers.clone())?;
                let digest = reg
                    .put_manifest(&r.repository, &tag, &raw)
                    .map_err(RemoteCacheError::src)?;
                Ok((layers, digest))
            },
        )??;
        Ok(ExportSummary {
            records: cfg.records.len(),
            layers: layers.len(),
            written: written.into_inner(),
            manifest: Some(digest),
        })
    }

    /// `--cache-to type=local,dest=DIR`: the cache manifest in an OCI
    /// layout directory, named `tag` in its `index.json`.
    pub fn export_local(
        &self,
        dir: &Path,
        tag: &str,
        mode: CacheMode,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Result<ExportSummary, RemoteCacheError> {
        let (cfg, layers) = self.collect(mode, progress)?;
        let config = self.cache_config(&cfg)?;
        let raw = self.cache_manifest(config.clone(), layers.clone())?;
        // What is in `dir` already may not be ours (a CI cache restored
        // from another branch): every name below it is resolved with
        // file descriptors, never followed out of it, and replaced rather
        // than written through.
        let io = |e: std::io::Error| RemoteCacheError::ctx(dir.display().to_string())(e);
        let fs = |e: kiln_fs::Error| layout_error(dir, e);
        std::fs::create_dir_all(dir).map_err(io)?;
        let root = kiln_fs::Root::open(dir).map_err(fs)?;
        let blob_dir = root
            .mkdir_all(
                "blobs/sha256",
                kiln_fs::Follow::Never,
                &kiln_fs::DirSpec::default(),
            )
            .map_err(fs)?;
        root.dir()
            .write_file(
                "oci-layout",
                br#"{"imageLayoutVersion":"1.0.0"}"#,
                0o644,
                None,
            )
            .map_err(fs)?;
        let mut written = 0;
        let mut blobs = layers.clone();
        blobs.push(config);
        blobs.push(raw.descriptor());
        // Temporary names of this process only (another build exporting
        // to the same directory writes its own).
        let tmp_name = |what: &str| format!(".{what}.kiln-{}.tmp", std::process::id());
        for b in &blobs {
            let hex = b.digest.hex();
            // A kept blob is read back (a corrupt one would fail every
            // later import of the step instead of being written again).
            if kiln_image::archive::blob_intact(&blob_dir, hex, &b.digest) {
                continue;
            }
            let mut src = self
                .store()
                .open_blob(&cd(&b.digest)?)
                .map_err(|e| RemoteCacheError::ctx(format!("blob {}", b.digest))(e))?;
            let tmp = tmp_name(hex);
            let mut f = blob_dir
                .create_file(&tmp, 0o644, kiln_fs::Create::Replace)
                .map_err(fs)?;
            let copied = std::io::copy(&mut src, &mut f)
                .and_then(|_| f.sync_all())
                .map_err(io)
                .and_then(|()| blob_dir.rename(&tmp, &blob_dir, hex).map_err(fs));
            if copied.is_err() {
                let _ = blob_dir.remove(&tmp);
            }
            copied?;
            written += 1;
        }
        // index.json is read, changed and replaced under a lock on the
        // directory: two builds exporting here at once both keep their
        // tag.
        let locked = root.dir().open_self().map_err(fs)?;
        // SAFETY: an open descriptor.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&locked), libc::LOCK_EX) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        let index_ctx = || dir.join("index.json").display().to_string();
        let mut index = match read_layout_file(&root, "index.json", INDEX_LIMIT) {
            Ok(b) => serde_json::from_slice::<ImageIndex>(&b)
                .map_err(|e| RemoteCacheError::ctx(index_ctx())(e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ImageIndex::new(Vec::new()),
            Err(e) => return Err(RemoteCacheError::ctx(dir.display().to_string())(e)),
        };
        index
            .manifests
            .retain(|d| ref_name(d).is_none_or(|n| n != tag));
        let mut desc = raw.descriptor();
        desc.artifact_type = Some(CACHE_CONFIG_MEDIA_TYPE.to_string());
        desc.annotations = Some([(ANNOTATION_REF_NAME.to_string(), tag.to_string())].into());
        index.manifests.push(desc);
        let bytes = index
            .to_bytes()
            .map_err(|e| RemoteCacheError::ctx("index.json")(e))?;
        let tmp = tmp_name("index.json");
        let put = (|| {
            let mut f = root
                .dir()
                .create_file(&tmp, 0o644, kiln_fs::Create::Replace)
                .map_err(fs)?;
            std::io::Write::write_all(&mut f, &bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
            root.dir()
                .rename(&tmp, root.dir(), "index.json")
                .map_err(fs)
        })();
        if put.is_err() {
            let _ = root.dir().remove(&tmp);
        }
        put?;
        drop(locked);
        Ok(ExportSummary {
            records: cfg.records.len(),
            layers: layers.len(),
            written,
            manifest: Some(raw.digest.clone()),
        })
    }

    /// `--cache-to type=inline`: re-puts the image pushed as `target`
    /// (stored manifest `manifest_digest`, encoded per `enc` as the push
    /// did) with the records of its own layers in an annotation.
    pub fn push_inline(
        &self,
        manifest_digest: &str,
        target: &str,
        enc: LayerEncoding,
    ) -> Result<ExportSummary, RemoteCacheError> {
        let store = self.store();
        let finals = self
            .final_layers
            .lock()
            .map_err(|_| BackendError::invalid("lock poisoned"))?
            .clone();
        let seen = self
            .seen
            .lock()
            .map_err(|_| BackendError::invalid("lock poisoned"))?
            .clone();
        let mut records = Vec::new();
        for (i, snap) in finals.iter().enumerate() {
            for (key, sn) in seen.iter().filter(|(_, sn)| &sn.snapshot == snap) {
                records.push(CacheRecord {
                    key: key.clone(),
                    layer: i,
                    diff_id: sn.diff_id.clone(),
                    chain_id: snap.clone(),
                    parent_chain_id: self.parent_of(snap),
                    created: sn.created,
                });
            }
        }
        let cfg = CacheConfig {
            schema_version: 1,
            records,
        };
        let md: kiln_cache::Digest = manifest_digest
            .parse()
            .map_err(|e| RemoteCacheError::ctx(manifest_digest)(e))?;
        let local = RawManifest::new(
            store
                .content()
                .read(&md)
                .map_err(|e| RemoteCacheError::ctx("manifest")(e))?,
            None,
        )
        .map_err(|e| RemoteCacheError::ctx("manifest")(e))?;
        let encoded = encode_image(store, &local, enc, 4, &|_| {})?;
        let mut m = encoded
            .manifest()
            .map_err(|e| RemoteCacheError::ctx("manifest")(e))?;
        m.annotations.get_or_insert_with(BTreeMap::new).insert(
            INLINE_ANNOTATION.to_string(),
            serde_json::to_string(&cfg).map_err(|e| RemoteCacheError::ctx("inline cache")(e))?,
        );
        let raw = m
            .to_raw()
            .map_err(|e| RemoteCacheError::ctx("manifest")(e))?;
        store
            .put_bytes(&raw.bytes, Some(&raw.media_type))
            .map_err(|e| RemoteCacheError::ctx("storing the manifest")(e))?;
        let name = kiln_cache::normalize_reference(target)
            .map_err(|e| RemoteCacheError::ctx(target)(e))?;
        let r = Reference::parse(&name).map_err(|e| RemoteCacheError::ctx(target)(e))?;
        let reg = Registry::new(&r.registry, &self.registry).map_err(RemoteCacheError::src)?;
        let tag = r.tag.clone().unwrap_or_else(|| "latest".to_string());
        let digest = reg
            .put_manifest(&r.repository, &tag, &raw)
            .map_err(RemoteCacheError::src)?;
        Ok(ExportSummary {
            records: cfg.records.len(),
            layers: m.layers.len(),
            written: 0,
            manifest: Some(digest),
        })
    }
}

/// The cache manifest of `config` and `layers` (an OCI manifest whose
/// artifact type is the cache config's).
fn cache_manifest_raw(
    config: Descriptor,
    layers: Vec<Descriptor>,
) -> Result<RawManifest, RemoteCacheError> {
    ImageManifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.to_string()),
        artifact_type: Some(CACHE_CONFIG_MEDIA_TYPE.to_string()),
        config,
        layers,
        subject: None,
        annotations: None,
    }
    .to_raw()
    .map_err(|e| RemoteCacheError::ctx("cache manifest")(e))
}

/// Remembers the compressed form of the cached layer `r` (stored), so
/// that pushing it again needs no recompression. A failure to remember
/// costs only that.
fn remember_compressed(store: &Store, r: &Remote) -> Result<(), RemoteCacheError> {
    let memo = match r.desc.media_type.as_str() {
        media_types::OCI_LAYER_GZIP | media_types::DOCKER_LAYER_GZIP => {
            Some((Compression::Gzip, GZIP_DEFAULT_LEVEL))
        }
        media_types::OCI_LAYER_ZSTD => Some((Compression::Zstd, ZSTD_DEFAULT_LEVEL)),
        _ => None,
    };
    if let Some((c, level)) = memo {
        let _ = store.meta().put_layer_blob(
            &cd(&r.rec.diff_id)?,
            &c.to_string(),
            level,
            &cd(&r.desc.digest)?,
        );
    }
    Ok(())
}

fn is_cache_manifest(m: &ImageManifest) -> bool {
    m.config.media_type == CACHE_CONFIG_MEDIA_TYPE
        || m.artifact_type.as_deref() == Some(CACHE_CONFIG_MEDIA_TYPE)
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_REF_NAME))
        .map(String::as_str)
}

/// The manifest named `tag` in the OCI layout `dir` (the last one when
/// none has that name and there is just one), verified.
fn read_layout_manifest(dir: &Path, tag: &str) -> Result<RawManifest, RemoteCacheError> {
    let path = dir.join("index.json");
    let bytes = read_layout_file(&layout_root(dir)?, "index.json", INDEX_LIMIT)
        .map_err(|e| RemoteCacheError::ctx(dir.display().to_string())(e))?;
    let index: ImageIndex = serde_json::from_slice(&bytes)
        .map_err(|e| RemoteCacheError::ctx(path.display().to_string())(e))?;
    let d = index
        .manifests
        .iter()
        .rev()
        .find(|d| ref_name(d) == Some(tag))
        .or(if index.manifests.len() == 1 {
            index.manifests.first()
        } else {
            None
        })
        .ok_or_else(|| {
            RemoteCacheError::Invalid(format!("{}: no cache named {tag:?}", dir.display()))
        })?;
    let bytes = read_layout_blob(dir, &d.digest, 4 << 20)?;
    RawManifest::new(bytes, Some(&d.media_type)).map_err(|e| RemoteCacheError::ctx("manifest")(e))
}

impl Backend for RemoteCacheBackend {
    fn resolve_image(
        &self,
        reference: &str,
        platform: Option<&kiln_image::manifest::Platform>,
        progress: &(dyn Fn(kiln_registry::Transfer) + Sync),
    ) -> BackendResult<Option<BaseImage>> {
        self.inner.resolve_image(reference, platform, progress)
    }

    fn export_index(
        &self,
        children: &[(kiln_image::manifest::Platform, crate::backend::Exported)],
        tags: &[String],
    ) -> BackendResult<crate::backend::Exported> {
        self.inner.export_index(children, tags)
    }

    fn cache_alias(&self, key: &str, layer: &LayerRecord) -> BackendResult<()> {
        // An imported step's layer is the import's word: not remembered
        // under another key of the store's own.
        if self.is_imported(&layer.snapshot) {
            return Ok(());
        }
        self.inner.cache_alias(key, layer)
    }

    fn hit_on(&self, hit: &LayerRecord, parent: Option<&str>) -> bool {
        self.inner.hit_on(hit, parent)
    }

    fn cache_get(&self, key: &str) -> BackendResult<Option<LayerRecord>> {
        let hit = match self.inner.cache_get(key)? {
            Some(l) => Some(l),
            // What an earlier import from the same source brought (see
            // `Remote::scoped`), else the import's record itself.
            None => match self.index.get(key) {
                Some(r) => {
                    let l = match self.inner.cache_get(&r.scoped(key))? {
                        Some(l) => Some(l),
                        None => self.remote_hit(key)?,
                    };
                    if let (Some(l), Ok(mut i)) = (&l, self.imported.lock()) {
                        i.insert(l.snapshot.clone());
                    }
                    l
                }
                None => None,
            },
        };
        if let Some(l) = &hit {
            self.note(key, l);
        }
        Ok(hit)
    }

    fn prepare(&self, parent: Option<&str>) -> BackendResult<Active> {
        if let Some(p) = parent {
            self.materialize(p)?;
        }
        self.inner.prepare(parent)
    }

    fn commit(&self, active: Active, key: &str, opts: &DiffOptions) -> BackendResult<LayerRecord> {
        let l = self.inner.commit(active, key, opts)?;
        self.note(key, &l);
        Ok(l)
    }

    fn commit_streamed(
        &self,
        active: Active,
        key: &str,
        opts: &DiffOptions,
        streamed: kiln_cache::StreamedDiff,
    ) -> BackendResult<LayerRecord> {
        let l = self.inner.commit_streamed(active, key, opts, streamed)?;
        self.note(key, &l);
        Ok(l)
    }

    fn abort(&self, active: Active) {
        self.inner.abort(active)
    }

    fn layer_dirs(&self, snapshot: &str) -> BackendResult<Vec<PathBuf>> {
        self.materialize(snapshot)?;
        self.inner.layer_dirs(snapshot)
    }

    fn hash_cache(&self) -> &dyn HashCache {
        self.inner.hash_cache()
    }

    fn export(
        &self,
        config: &ImageConfig,
        layers: &[LayerRecord],
        tags: &[String],
    ) -> BackendResult<Exported> {
        let pending: HashMap<String, Remote> = self
            .pending
            .lock()
            .map_err(|_| BackendError::invalid("lock poisoned"))?
            .clone();
        // The image's layers taken from the cache are not unpacked: they
        // are kept as lazy layers, unpacked when something first needs
        // their files — a step on top, `kiln run`, a later build — as a
        // pulled image's are (the tar is verified against the diffID
        // then). A registry's blobs stay there until read (see
        // `keep_lazy`); a cache directory's are copied in now, up to
        // eight at once, each verified against its digest.
        let todo: Vec<Remote> = layers
            .iter()
            .filter_map(|l| pending.get(&l.snapshot).cloned())
            .filter(|r| {
                !matches!(r.origin, Origin::Registry { .. }) || r.desc.digest == r.rec.diff_id
            })
            .collect();
        // Eight at once: small layers wait mostly for the registry.
        self.fetch_all(&todo, 8);
        let mut fixed = Vec::with_capacity(layers.len());
        let mut lazy = HashSet::new();
        for l in layers {
            let mut l = l.clone();
            if let Some(r) = pending.get(&l.snapshot) {
                if r.desc.digest == r.rec.diff_id {
                    // An uncompressed cache layer: applied, as its blob
                    // is its tar.
                    self.materialize(&l.snapshot)?;
                    l.size = self
                        .store()
                        .blob_size(&cd(&l.diff_id)?)
                        .map_err(|e| RemoteCacheError::ctx("layer blob")(e))?;
                } else {
                    self.keep_lazy(r).map_err(BackendError::ctx(format!(
                        "importing cached layer {}",
                        r.desc.digest
                    )))?;
                    l.digest = r.desc.digest.clone();
                    l.size = r.desc.size;
                    l.media_type = r.desc.media_type.clone();
                    lazy.insert(l.snapshot.clone());
                }
            }
            fixed.push(l);
        }
        // The steps that made them are cache hits for later builds too.
        if !lazy.is_empty() {
            let seen: Vec<(String, Seen)> = self
                .seen
                .lock()
                .map_err(|_| BackendError::invalid("lock poisoned"))?
                .iter()
                .filter(|(_, v)| lazy.contains(&v.snapshot))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (key, v) in seen {
                // Described by the blob this build's import named for the
                // layer (not by whichever candidate was recorded first).
                let Some(p) = pending.get(&v.snapshot) else {
                    continue;
                };
                let blob = cd(&p.desc.digest)?;
                // Taken from an import: remembered for that source only.
                let key = match self.index.get(&key) {
                    Some(r) => r.scoped(&key),
                    None => key,
                };
                self.store()
                    .meta()
                    .put_lazy_cache(&key, &v.snapshot, &blob, v.created)
                    .map_err(|e| RemoteCacheError::ctx("cache index")(e))?;
            }
        }
        // A multi-platform build exports one image per platform: the
        // final layers of all of them are the build's (`mode=min`).
        if let Ok(mut f) = self.final_layers.lock() {
            for l in &fixed {
                if !f.contains(&l.snapshot) {
                    f.push(l.snapshot.clone());
                }
            }
        }
        self.inner.export(config, &fixed, tags)
    }

    fn cache_mount(
        &self,
        id: &str,
        sharing: kiln_cache::CacheSharing,
        cancelled: &dyn Fn() -> bool,
    ) -> BackendResult<CacheMountHold> {
        self.inner.cache_mount(id, sharing, cancelled)
    }

    fn scratch_dir(&self) -> PathBuf {
        self.inner.scratch_dir()
    }

    fn stack_layer(
        &self,
        parent: Option<&str>,
        layer: &LayerRecord,
        key: &str,
    ) -> BackendResult<LayerRecord> {
        if let Some(p) = parent {
            self.materialize(p)?;
        }
        self.materialize(&layer.snapshot)?;
        // An imported layer's record carries the compressed blob's size
        // until it is applied: stacked, it is its tar (see `remote_hit`).
        let mut layer = layer.clone();
        if layer.digest == layer.diff_id {
            if let Ok(n) = self.store().blob_size(&cd(&layer.diff_id)?) {
                layer.size = n;
            }
        }
        let layer = &layer;
        // A `--link` layer taken from an import, stacked: remembered under
        // a key scoped to that layer (the stacking key leaves the layer's
        // content out), never under the stacking key a build without the
        // import looks up.
        let l = if self.is_imported(&layer.snapshot) {
            let scoped = format!(
                "cache-from stacked {key} {} {}",
                layer.snapshot, layer.digest
            );
            let l = self.inner.stack_layer(parent, layer, &scoped)?;
            if let Ok(mut i) = self.imported.lock() {
                i.insert(l.snapshot.clone());
            }
            l
        } else {
            self.inner.stack_layer(parent, layer, key)?
        };
        self.note(key, &l);
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_with_documented_field_names() {
        let d = Digest::sha256_of(b"layer");
        let cfg = CacheConfig {
            schema_version: 1,
            records: vec![CacheRecord {
                key: "sha256:00".into(),
                layer: 0,
                diff_id: d.clone(),
                chain_id: chain_id(Some("sha256:11"), d.as_str()),
                parent_chain_id: Some("sha256:11".into()),
                created: 1_700_000_000,
            }],
        };
        let v: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&cfg).unwrap()).unwrap();
        assert_eq!(v["schemaVersion"], 1);
        assert_eq!(v["records"][0]["diffID"], d.as_str());
        assert_eq!(v["records"][0]["parentChainID"], "sha256:11");
        let back: CacheConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, cfg);
    }
}
