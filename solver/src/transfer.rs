//! Images between the store and registries: pull into the store (blobs
//! verified, recorded under the current lease, then the image named), and
//! push from it (layers compressed at push time — in parallel, once per
//! (diffID, compression, level) thanks to the store's `layer_blobs` memo —
//! then blobs and manifest through `kiln-registry`).

use std::io::{Read, Write};

use kiln_cache::Store;
use kiln_image::blob::{encode_layer, encode_verified_layer, layer_media_type, EncodingReader};
use kiln_image::compression::{
    decompress_auto, Compression, CompressionOpts, GZIP_DEFAULT_LEVEL, ZSTD_DEFAULT_LEVEL,
};
use kiln_image::config::ImageConfig;
use kiln_image::manifest::{media_types, Descriptor, ImageManifest, Platform, RawManifest};
use kiln_image::Digest;
use kiln_registry::{
    BlobSink, PushSource, Reference, Registry, RegistryConfig, SinkError, Transfer,
};

crate::error::module_error! {
    /// Why a pull, push or image encoding failed.
    pub enum TransferError {}
}

fn cd(d: &Digest) -> Result<kiln_cache::Digest, TransferError> {
    d.as_str()
        .parse()
        .map_err(TransferError::ctx(format!("digest {d}")))
}

/// The normalised name and its parsed reference.
fn parse_name(reference: &str) -> Result<(String, Reference), TransferError> {
    let name = kiln_cache::normalize_reference(reference).map_err(TransferError::src)?;
    let r = Reference::parse(&name).map_err(TransferError::src)?;
    Ok((name, r))
}

/// The normalised name, its parsed reference and a client of its registry.
fn connect(
    reference: &str,
    cfg: &RegistryConfig,
) -> Result<(String, Reference, Registry), TransferError> {
    let name = kiln_cache::normalize_reference(reference).map_err(TransferError::src)?;
    let r = Reference::parse(&name).map_err(TransferError::src)?;
    let reg = Registry::new(&r.registry, cfg).map_err(TransferError::src)?;
    Ok((name, r, reg))
}

/// The store as a [`BlobSink`]: verified ingest (digest and size).
pub struct StoreSink<'a>(pub &'a Store);

impl BlobSink for StoreSink<'_> {
    fn has_blob(&self, desc: &Descriptor) -> bool {
        cd(&desc.digest).is_ok_and(|d| {
            self.0.blob_size(&d).is_ok_and(|s| s == desc.size)
                && self.0.meta().has_blob(&d).unwrap_or(false)
                && self.0.remote_blob(&d).is_ok_and(|r| r.is_none())
        })
    }
    fn put_blob(&self, desc: &Descriptor, r: &mut dyn Read) -> Result<(), SinkError> {
        let d = cd(&desc.digest).map_err(SinkError::new)?;
        self.0
            .put_blob(r, Some(&d), Some(desc.size), Some(&desc.media_type))
            .map(|_| ())
            .map_err(SinkError::new)
    }
    fn put_verified_blob(&self, desc: &Descriptor, r: &mut dyn Read) -> Result<(), SinkError> {
        let d = cd(&desc.digest).map_err(SinkError::new)?;
        self.0
            .put_verified_blob(r, &d, desc.size, Some(&desc.media_type))
            .map(|_| ())
            .map_err(SinkError::new)
    }
}

/// Downloads the blobs a store keeps in registries (a `--cache-from`
/// import's layers, see [`kiln_cache::RemoteBlob`]) when they are first
/// read: through the registry's mirrors, then the registry, each verified
/// against its digest and size as a pull's. The registry settings
/// (credentials, CAs, mirrors, plain-HTTP registries) are those of the
/// command reading it (its environment, and the `--insecure-registry`
/// hosts it was given: see [`fetch_insecure_registries`]) — never the
/// recording build's word, which a row of the shared store carries (a
/// hostile build's row marking a registry insecure would otherwise send
/// a victim's later fetch, and its credentials, over plain HTTP).
#[derive(Debug, Default)]
pub struct RegistryFetcher {
    cfg: std::sync::OnceLock<Result<RegistryConfig, String>>,
}

/// The `--insecure-registry` hosts of this command, for its fetches of
/// blobs kept in registries.
static FETCH_INSECURE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Adds the command's `--insecure-registry` hosts to those a blob kept in
/// a registry may be fetched from over plain HTTP (see
/// [`RegistryFetcher`]); called where the command loads its registry
/// settings, before anything is fetched.
pub fn fetch_insecure_registries(hosts: &[String]) {
    if let Ok(mut v) = FETCH_INSECURE.lock() {
        for h in hosts {
            if !v.contains(h) {
                v.push(h.clone());
            }
        }
    }
}

/// [`StoreSink`] that has a blob only when its file is stored (a blob kept
/// in a registry is what is being fetched).
pub(crate) struct FileSink<'a>(pub(crate) &'a Store);

impl BlobSink for FileSink<'_> {
    fn has_blob(&self, desc: &Descriptor) -> bool {
        cd(&desc.digest).is_ok_and(|d| {
            self.0.content().size(&d).is_ok_and(|s| s == desc.size)
                && self.0.meta().has_blob(&d).unwrap_or(false)
        })
    }
    fn put_blob(&self, desc: &Descriptor, r: &mut dyn Read) -> Result<(), SinkError> {
        StoreSink(self.0).put_blob(desc, r)
    }
    fn put_verified_blob(&self, desc: &Descriptor, r: &mut dyn Read) -> Result<(), SinkError> {
        StoreSink(self.0).put_verified_blob(desc, r)
    }
}

impl kiln_cache::BlobFetcher for RegistryFetcher {
    fn fetch(
        &self,
        store: &Store,
        from: &kiln_cache::RemoteBlob,
        digest: &kiln_cache::Digest,
        size: u64,
        media_type: Option<&str>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let cfg = self
            .cfg
            .get_or_init(|| {
                let insecure = FETCH_INSECURE.lock().map(|v| v.clone()).unwrap_or_default();
                RegistryConfig::load(&insecure).map_err(|e| e.to_string())
            })
            .clone()?;
        let desc = Descriptor::new(
            media_type.unwrap_or(media_types::OCI_LAYER_GZIP),
            digest.as_str().parse::<Digest>()?,
            size,
        );
        tracing::debug!(%digest, registry = %from.registry, repo = %from.repo, "fetching a blob kept in a registry");
        Registry::through_mirrors(&from.registry, &cfg, |reg| {
            reg.pull_blob(&from.repo, &desc, &FileSink(store), &|_: Transfer| {})
        })?;
        Ok(())
    }
}

/// Blobs held in memory (a cache config made for one push) in front of
/// another source.
pub(crate) struct WithBytes<'a> {
    /// Where every other blob comes from.
    pub inner: &'a dyn PushSource,
    /// The blobs held here, by digest.
    pub bytes: &'a [(Digest, &'a [u8])],
}

impl PushSource for WithBytes<'_> {
    fn open(&self, desc: &Descriptor) -> std::io::Result<Box<dyn Read + '_>> {
        match self.bytes.iter().find(|(d, _)| d == &desc.digest) {
            Some((_, b)) => Ok(Box::new(*b)),
            None => self.inner.open(desc),
        }
    }
    fn mount_from(&self, desc: &Descriptor) -> Option<String> {
        self.inner.mount_from(desc)
    }
}

/// The store as a [`PushSource`]; mounts from another repository of the
/// same registry when a local image from there lists the blob, or when
/// the store remembers pushing it there or pulling it from there.
pub struct StoreSource<'a> {
    /// The store.
    pub store: &'a Store,
    /// blob digest -> repository (same registry) known to hold it.
    pub mounts: std::collections::HashMap<Digest, String>,
    /// The registry and repository pushed to, for looking blobs up in the
    /// store's record of where they are (`None`: no lookup).
    pub target: Option<(String, String)>,
}

impl PushSource for StoreSource<'_> {
    fn open(&self, desc: &Descriptor) -> std::io::Result<Box<dyn Read + '_>> {
        let d = cd(&desc.digest).map_err(std::io::Error::other)?;
        self.store
            .open_blob(&d)
            .map(|r| -> Box<dyn Read + '_> { r })
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string()))
    }
    fn mount_from(&self, desc: &Descriptor) -> Option<String> {
        if let Some(m) = self.mounts.get(&desc.digest) {
            return Some(m.clone());
        }
        let (registry, repo) = self.target.as_ref()?;
        let d = cd(&desc.digest).ok()?;
        self.store
            .meta()
            .blob_location(&d, registry, repo)
            .ok()
            .flatten()
    }
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullResult {
    /// The normalised name recorded in the store.
    pub name: String,
    /// The manifest digest (of the platform's manifest).
    pub manifest_digest: Digest,
    /// The index digest, when the tag named an index.
    pub index_digest: Option<Digest>,
}

/// Pull `reference` for the host platform into `store` and name it there.
/// Layers go up to `jobs` at once; blobs the store has are not fetched.
pub fn pull(
    store: &Store,
    cfg: &RegistryConfig,
    reference: &str,
    jobs: usize,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<PullResult, TransferError> {
    pull_platform(store, cfg, reference, None, jobs, progress)
}

/// [`pull`] for `platform` (`None`: the host's). From an index, the
/// platform's manifest is chosen by containerd's rules (`arm64` is
/// `arm64/v8`, `arm` is `arm/v7`, older ARM variants serve newer ones);
/// its config must name the platform the index gave it (an index that
/// lies is refused). A single image asked for with an explicit platform
/// must be for that platform. The name points at the platform's manifest.
pub fn pull_platform(
    store: &Store,
    cfg: &RegistryConfig,
    reference: &str,
    platform: Option<&Platform>,
    jobs: usize,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<PullResult, TransferError> {
    let _span = tracing::info_span!("pull", reference).entered();
    tracing::info!("pull started");
    let (name, r) = parse_name(reference)?;
    let sink = StoreSink(store);
    let host = Platform::host();
    let want = platform.unwrap_or(&host);
    // Mirrors first (a mirror's bad blob fails its digest check there
    // and the next source is tried); the name stays the origin's.
    let (_, p) = Registry::through_mirrors(&r.registry, cfg, |reg| {
        reg.pull_image(&r, want, &sink, jobs, progress)
    })
    .map_err(TransferError::src)?;
    let config = ImageConfig::from_bytes(&p.config)
        .map_err(TransferError::ctx(format!("{name}: config")))?;
    let m = &p.resolved.manifest;
    match &p.resolved.index {
        Some(i) => {
            let idx = i
                .index()
                .map_err(TransferError::ctx(format!("{name}: index")))?;
            // Every entry naming the chosen manifest must tell its
            // config's truth, and that must be the platform asked for
            // (the first entry alone was checked: one without a platform,
            // or one telling the truth before a lying one, let an arm64
            // image through as the host's).
            for c in idx
                .manifests
                .iter()
                .filter(|d| d.digest == m.digest)
                .filter_map(|d| d.platform.as_ref())
            {
                check_config_platform(&name, &m.digest, c, &config)?;
            }
            // By the rules the index was chosen by (an older ARM variant,
            // an image naming no variant, serve).
            let have = Platform {
                os: config.os.clone(),
                architecture: config.architecture.clone(),
                variant: config.variant.clone(),
                ..Default::default()
            };
            let (w, h) = (
                kiln_image::platform::normalize(want),
                kiln_image::platform::normalize(&have),
            );
            let serves = want.rank(&have).is_some()
                || (w.os == h.os
                    && w.architecture == h.architecture
                    && (w.variant.is_none() || h.variant.is_none()));
            if !serves {
                return Err(TransferError::Invalid(format!(
                    "{name}: manifest {} is for platform {h}, not the {w} asked for: refusing it",
                    m.digest
                )));
            }
        }
        None => {
            if let Some(w) = platform {
                // No index to choose from: the one image is of another
                // platform (docker pull: "does not match the specified
                // platform"), not a lying index entry.
                if let Err((wanted, actual)) = platform_matches(w, &config) {
                    return Err(TransferError::Invalid(format!(
                        "{name}: no {wanted} image: {name} is a single-platform image for {actual} (a manifest, not an index of platforms)"
                    )));
                }
            }
        }
    }
    let (mdig, cdig, layers) = store_pulled(store, &name, &r, &p, &config)?;
    // The index itself is kept too (unreferenced until a name points at
    // it): a build pulling several platforms of one name records it.
    if let Some(i) = &p.resolved.index {
        store
            .put_bytes(&i.bytes, Some(&i.media_type))
            .map_err(TransferError::ctx(format!("storing {name}")))?;
    }
    store
        .record_image(&name, &mdig, &cdig, &layers)
        .map_err(TransferError::ctx(format!("storing {name}")))?;
    Ok(PullResult {
        name,
        manifest_digest: m.digest.clone(),
        index_digest: p.resolved.index.as_ref().map(|i| i.digest.clone()),
    })
}

/// Refuses an image whose config names another platform than `claimed`
/// (what the index said, or what was asked for).
fn check_config_platform(
    name: &str,
    manifest: &Digest,
    claimed: &Platform,
    config: &ImageConfig,
) -> Result<(), TransferError> {
    platform_matches(claimed, config).map_err(|(claimed, actual)| {
        TransferError::Invalid(format!(
            "{name}: manifest {manifest} is for platform {claimed}, but its config says {actual}: refusing it"
        ))
    })
}

/// Whether `config` is of platform `claimed`; else both, normalised.
fn platform_matches(claimed: &Platform, config: &ImageConfig) -> Result<(), (String, String)> {
    let actual = Platform {
        os: config.os.clone(),
        architecture: config.architecture.clone(),
        variant: config.variant.clone(),
        ..Default::default()
    };
    // A config without a variant is taken as the claimed variant (many
    // arm images leave it out).
    let lenient = Platform {
        variant: actual.variant.clone().or_else(|| claimed.variant.clone()),
        ..actual.clone()
    };
    if claimed.matches(&actual) || claimed.matches(&lenient) {
        return Ok(());
    }
    Err((
        kiln_image::platform::normalize(claimed).to_string(),
        kiln_image::platform::normalize(&actual).to_string(),
    ))
}

/// Stores a pulled image's config and manifest (layers are in already)
/// and remembers where its blobs live; returns (manifest, config,
/// layers) digests for the image record.
fn store_pulled(
    store: &Store,
    name: &str,
    r: &Reference,
    p: &kiln_registry::Pulled,
    config: &ImageConfig,
) -> Result<
    (
        kiln_cache::Digest,
        kiln_cache::Digest,
        Vec<kiln_cache::Digest>,
    ),
    TransferError,
> {
    if config.rootfs.diff_ids.len() != p.manifest.layers.len() {
        return Err(TransferError::Invalid(format!(
            "{name}: manifest has {} layers, config {} diffIDs",
            p.manifest.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    if p.manifest.layers.len() > kiln_cache::MAX_CHAIN {
        return Err(TransferError::Invalid(format!(
            "{name}: {} layers; an image may have at most {}",
            p.manifest.layers.len(),
            kiln_cache::MAX_CHAIN
        )));
    }
    let err = |e: kiln_cache::Error| TransferError::ctx(format!("storing {name}"))(e);
    // A name that points at another image moves only onto an image whose
    // every layer is proved to be the diffID its config names (blob digest
    // and size, the tar it decompresses to: one streaming pass that writes
    // nothing): a lying image never takes a working image's tag, and a
    // failed `build --pull` leaves the old one. A new name points at the
    // image as pulled, its layers proved when first unpacked or exported
    // (as BuildKit's lazy pulls): a pull costs no decompression.
    let moves = store
        .meta()
        .image(name)
        .map_err(err)?
        .is_some_and(|rec| rec.manifest != p.resolved.manifest.digest.to_string());
    if moves {
        crate::store::prove_layers(store, &p.manifest.layers, &config.rootfs.diff_ids).map_err(
            |(i, e)| {
                TransferError::ctx(format!(
                    "{name}: verifying layer {i} of {}",
                    p.manifest.layers.len()
                ))(e)
            },
        )?;
    }
    let cdig = cd(&p.manifest.config.digest)?;
    store
        .put_blob(
            &p.config[..],
            Some(&cdig),
            Some(p.config.len() as u64),
            Some(&p.manifest.config.media_type),
        )
        .map_err(err)?;
    let m = &p.resolved.manifest;
    let mdig = store
        .put_bytes(&m.bytes, Some(&m.media_type))
        .map_err(err)?;
    let layers = p
        .manifest
        .layers
        .iter()
        .map(|l| cd(&l.digest))
        .collect::<Result<Vec<_>, _>>()?;
    remember_locations(store, r, &p.manifest.config, &p.manifest.layers);
    Ok((mdig, cdig, layers))
}

/// Pull every platform of `reference` (`pull --all-platforms`): when it
/// names an index, each child image manifest with a platform (at most
/// [`crate::platforms::MAX_INDEX_ENTRIES`] entries; a child that is itself an index,
/// whose platform `--platform` would refuse
/// ([`kiln_image::platform::validate`]), or whose config lies about its
/// platform, is refused; attestation
/// entries, `unknown/unknown`, are left out), then the index; the name
/// points at the index. A single image is pulled as [`pull`] does.
pub fn pull_all_platforms(
    store: &Store,
    cfg: &RegistryConfig,
    reference: &str,
    jobs: usize,
    progress: &(dyn Fn(Transfer) + Sync),
) -> Result<PullResult, TransferError> {
    let _span = tracing::info_span!("pull", reference).entered();
    let (name, r) = parse_name(reference)?;
    let (_, first) = Registry::through_mirrors(&r.registry, cfg, |reg| {
        reg.get_manifest(&r.repository, &r.manifest_ref())
    })
    .map_err(TransferError::src)?;
    if !first.is_index() {
        return pull_platform(store, cfg, reference, None, jobs, progress);
    }
    let idx = first
        .index()
        .map_err(TransferError::ctx(format!("{name}: index")))?;
    if idx.manifests.len() > crate::platforms::MAX_INDEX_ENTRIES {
        return Err(TransferError::Invalid(format!(
            "{name}: index {} has {} entries; kiln pulls at most {}",
            first.digest,
            idx.manifests.len(),
            crate::platforms::MAX_INDEX_ENTRIES
        )));
    }
    let sink = StoreSink(store);
    let mut children = Vec::new();
    for d in &idx.manifests {
        if media_types::is_index(&d.media_type) {
            return Err(TransferError::Invalid(format!(
                "{name}: index entry {} is itself an index; kiln does not pull nested indexes",
                d.digest
            )));
        }
        let Some(claimed) = d.platform.as_ref().filter(|p| p.os != "unknown") else {
            continue;
        };
        // A platform --platform would refuse (a variant `../../../etc`,
        // a 100 KB os.version) is no platform kiln stores: the pull is
        // refused, naming the entry (nothing is stored).
        kiln_image::platform::validate(claimed).map_err(|e| {
            TransferError::Invalid(format!("{name}: index entry {}: {e}", d.digest))
        })?;
        let child = Reference {
            tag: None,
            digest: Some(d.digest.clone()),
            ..r.clone()
        };
        // Each child (by digest) through the mirrors again: one that
        // served the index may lack a child or serve a bad blob.
        let (_, p) = Registry::through_mirrors(&r.registry, cfg, |reg| {
            reg.pull_image(&child, claimed, &sink, jobs, progress)
        })
        .map_err(TransferError::src)?;
        if p.resolved.manifest.digest != d.digest
            || p.resolved.manifest.bytes.len() as u64 != d.size
        {
            return Err(TransferError::Invalid(format!(
                "{name}: index entry {} ({} bytes) resolved to {} ({} bytes)",
                d.digest,
                d.size,
                p.resolved.manifest.digest,
                p.resolved.manifest.bytes.len()
            )));
        }
        let config = ImageConfig::from_bytes(&p.config)
            .map_err(TransferError::ctx(format!("{name}: config")))?;
        check_config_platform(&name, &d.digest, claimed, &config)?;
        children.push(store_pulled(store, &name, &r, &p, &config)?);
    }
    if children.is_empty() {
        return Err(TransferError::Invalid(format!(
            "{name}: index {} names no platform's image",
            first.digest
        )));
    }
    let idig = store
        .put_bytes(&first.bytes, Some(&first.media_type))
        .map_err(TransferError::ctx(format!("storing {name}")))?;
    store
        .record_index(&name, &idig, &children)
        .map_err(TransferError::ctx(format!("storing {name}")))?;
    Ok(PullResult {
        name,
        manifest_digest: first.digest.clone(),
        index_digest: Some(first.digest.clone()),
    })
}

/// How layers are encoded for a push or export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerEncoding {
    /// Compression of layers that are stored uncompressed (and of all
    /// layers with `force`).
    pub compression: CompressionOpts,
    /// Recompress layers that are already compressed differently.
    pub force: bool,
    /// OCI media types (else Docker schema2, zstd layers keep OCI's type).
    pub oci_media_types: bool,
}

impl Default for LayerEncoding {
    fn default() -> Self {
        LayerEncoding {
            compression: CompressionOpts::new(Compression::Gzip),
            force: false,
            oci_media_types: true,
        }
    }
}

fn kind_of(media_type: &str) -> Option<Compression> {
    match media_type {
        media_types::OCI_LAYER | media_types::DOCKER_LAYER => Some(Compression::Uncompressed),
        media_types::OCI_LAYER_GZIP | media_types::DOCKER_LAYER_GZIP => Some(Compression::Gzip),
        media_types::OCI_LAYER_ZSTD => Some(Compression::Zstd),
        _ => None,
    }
}

fn level_of(c: CompressionOpts) -> i32 {
    match c.kind {
        Compression::Uncompressed => 0,
        Compression::Gzip => c.level.unwrap_or(GZIP_DEFAULT_LEVEL),
        Compression::Zstd => c.level.unwrap_or(ZSTD_DEFAULT_LEVEL),
    }
}

/// How a layer goes out in an encoding: a blob known already (the layer
/// kept as it is, or its compressed form found in the memo), or one still
/// to be compressed.
enum LayerPlan {
    /// This blob.
    Ready(Box<Descriptor>),
    /// Compress the layer.
    Compress(Target),
}

/// What a layer is compressed to: the result's media type, and the key of
/// the store's memo of compressed layers.
struct Target {
    /// The media type of the result.
    media_type: String,
    /// The compression's name, as the memo keys it.
    cname: String,
    /// The level, as the memo keys it.
    level: i32,
}

fn plan_layer(
    store: &Store,
    layer: &Descriptor,
    diff_id: &Digest,
    enc: LayerEncoding,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<LayerPlan, TransferError> {
    let have = kind_of(&layer.media_type);
    let want = enc.compression.kind;
    let keep = match have {
        None => true, // foreign/unknown: pass through
        Some(Compression::Uncompressed) => want == Compression::Uncompressed,
        Some(k) => !enc.force || k == want,
    };
    if keep {
        let kind = have.unwrap_or(Compression::Uncompressed);
        // A compressed blob sent for this diffID must be that layer: one
        // a cache import only claimed (or a pull kept unproved) is proved
        // first — once, then remembered — or a push would ship a hostile
        // cache's bytes under an honest diffID.
        if kind != Compression::Uncompressed && &layer.digest != diff_id {
            let (blob, did) = (cd(&layer.digest)?, cd(diff_id)?);
            if !store.meta().memo_has(&did, &blob).unwrap_or(false) {
                progress(&format!(
                    "{}: checking the blob against its diffID",
                    short(diff_id)
                ));
                store
                    .prove_blob(kiln_cache::LayerBlob {
                        digest: &blob,
                        size: Some(layer.size),
                        diff_id: &did,
                    })
                    .map_err(TransferError::ctx(format!("layer {}", layer.digest)))?;
                let level = level_of(CompressionOpts { kind, level: None });
                let _ = store
                    .meta()
                    .put_layer_blob(&did, &kind.to_string(), level, &blob);
            }
        }
        let mt = if have.is_some() {
            layer_media_type(kind, enc.oci_media_types).to_string()
        } else {
            layer.media_type.clone()
        };
        return Ok(LayerPlan::Ready(Box::new(Descriptor::new(
            mt,
            layer.digest.clone(),
            layer.size,
        ))));
    }
    let level = level_of(enc.compression);
    let cname = want.to_string();
    let did = cd(diff_id)?;
    let mt = layer_media_type(want, enc.oci_media_types).to_string();
    if let Ok(Some(b)) = store.meta().layer_blob(&did, &cname, level) {
        if let Ok(size) = store.blob_size(&b) {
            progress(&format!(
                "{}: {cname} blob found ({size} bytes)",
                short(diff_id)
            ));
            let d: Digest = b.to_string().parse().map_err(TransferError::src)?;
            return Ok(LayerPlan::Ready(Box::new(Descriptor::new(mt, d, size))));
        }
    }
    // A blob a remote cache brought for this diffID (at the default
    // level, as BuildKit compresses): used once it is proved to be the
    // layer (decompressing and hashing costs less than compressing), and
    // then remembered.
    let claimed: &[&str] = match (want, level) {
        (Compression::Gzip, GZIP_DEFAULT_LEVEL) => {
            &[media_types::OCI_LAYER_GZIP, media_types::DOCKER_LAYER_GZIP]
        }
        (Compression::Zstd, ZSTD_DEFAULT_LEVEL) => &[media_types::OCI_LAYER_ZSTD],
        _ => &[],
    };
    if !claimed.is_empty() {
        if let Ok(Some((b, size))) = store.verified_lazy_blob(&did, claimed) {
            let _ = store.meta().put_layer_blob(&did, &cname, level, &b);
            progress(&format!(
                "{}: {cname} blob of the imported cache checked ({size} bytes)",
                short(diff_id)
            ));
            let d: Digest = b.to_string().parse().map_err(TransferError::src)?;
            return Ok(LayerPlan::Ready(Box::new(Descriptor::new(mt, d, size))));
        }
    }
    Ok(LayerPlan::Compress(Target {
        media_type: mt,
        cname,
        level,
    }))
}

/// An uncompressed tar reader over `layer`, and whether it checks its
/// own bytes against `diff_id` (then they need no second hash).
fn layer_tar<'a>(
    store: &'a Store,
    layer: &Descriptor,
    diff_id: &Digest,
) -> Result<(Box<dyn Read + 'a>, Option<Digest>), TransferError> {
    let (src, checked) = store
        .open_blob_checked(&cd(&layer.digest)?)
        .map_err(TransferError::ctx(format!("layer {}", layer.digest)))?;
    if kind_of(&layer.media_type) == Some(Compression::Uncompressed) {
        // The blob is the tar: a checking reader verifies the diffID.
        let verified = (checked && &layer.digest == diff_id).then(|| diff_id.clone());
        return Ok((src, verified));
    }
    let tar =
        decompress_auto(src).map_err(TransferError::ctx(format!("layer {}", layer.digest)))?;
    Ok((tar, None))
}

/// The blob of a layer in `enc` (computed once, then found in the memo).
pub fn encode_one(
    store: &Store,
    layer: &Descriptor,
    diff_id: &Digest,
    enc: LayerEncoding,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Descriptor, TransferError> {
    match plan_layer(store, layer, diff_id, enc, progress)? {
        LayerPlan::Ready(d) => Ok(*d),
        LayerPlan::Compress(t) => compress_into_store(store, layer, diff_id, enc, &t, progress),
    }
}

/// Compresses a layer into the store (and the memo) as `t` says.
fn compress_into_store(
    store: &Store,
    layer: &Descriptor,
    diff_id: &Digest,
    enc: LayerEncoding,
    t: &Target,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Descriptor, TransferError> {
    progress(&format!("{}: compressing ({})", short(diff_id), t.cname));
    let (tar, verified) = layer_tar(store, layer, diff_id)?;
    let mut w = store
        .content()
        .writer_prehashed()
        .map_err(TransferError::src)?;
    let d = match &verified {
        Some(v) => encode_verified_layer(tar, &mut w, enc.compression, enc.oci_media_types, v),
        None => encode_layer(tar, &mut w, enc.compression, enc.oci_media_types),
    }
    .map_err(TransferError::ctx(format!("compressing {}", layer.digest)))?;
    if &d.diff_id != diff_id {
        return Err(TransferError::Invalid(format!(
            "layer {}: content has diffID {}, config says {diff_id}",
            layer.digest, d.diff_id
        )));
    }
    let size = remember(store, w, &d.digest, d.size, diff_id, t)?;
    Ok(Descriptor::new(t.media_type.clone(), d.digest, size))
}

/// The compressed stream of a layer being uploaded, copied into a store
/// writer on the way (the memo of the compressed blob), and checked
/// against the diffID at its end — before the upload is completed.
struct Teed<'a, R> {
    inner: EncodingReader<R>,
    copy: Option<kiln_cache::BlobWriter>,
    diff_id: &'a Digest,
    /// Where the copy goes at the end of the stream.
    slot: &'a std::sync::Mutex<Option<kiln_cache::BlobWriter>>,
}

impl<R: Read> Read for Teed<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            // The copy is a cache: if it cannot be written, the upload
            // goes on without it.
            if let Some(w) = self.copy.as_mut() {
                if w.write_all(&buf[..n]).is_err() {
                    self.copy = None;
                }
            }
            return Ok(n);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        match self.inner.tar_digest() {
            Some((d, _)) if &d == self.diff_id => {}
            Some((d, _)) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("content has diffID {d}, config says {}", self.diff_id),
                ))
            }
            None => return Err(std::io::Error::other("compressed stream ended early")),
        }
        if let (Some(w), Ok(mut slot)) = (self.copy.take(), self.slot.lock()) {
            *slot = Some(w);
        }
        Ok(0)
    }
}

/// How far a layer being compressed into the store's file has got, for
/// the upload reading that file behind it (see [`stream_layer`]).
#[derive(Default)]
struct Spool {
    state: std::sync::Mutex<SpoolState>,
    moved: std::sync::Condvar,
}

#[derive(Default)]
struct SpoolState {
    /// Bytes in the file.
    written: u64,
    /// How the compression ended (an error's text).
    end: Option<Result<(), String>>,
    /// The upload is over (it read everything, or failed): stop.
    stopped: bool,
    /// The compressed blob's digest and size, when it ended within
    /// [`WHOLE_LIMIT`] (it is then uploaded in one PUT).
    whole: Option<(Digest, u64)>,
}

/// A compressed layer at most this large that is complete by the time its
/// upload session is open goes up in one PUT with its length (one request
/// fewer than streaming it, and cheaper for the registry to take in); a
/// larger one is streamed while it is compressed.
const WHOLE_LIMIT: u64 = 8 << 20;

const _: () = assert!(WHOLE_LIMIT <= kiln_registry::MAX_WHOLE_BODY);

/// How long an upload waits for its layer to be whole (see
/// [`WHOLE_LIMIT`]) before it streams it instead.
const WHOLE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Spool {
    fn lock(&self) -> std::sync::MutexGuard<'_, SpoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Compresses `inner` into `w`, telling the reader as the file grows;
    /// at the end the tar must have been the layer `diff_id`.
    fn fill<R: Read>(
        &self,
        inner: &mut EncodingReader<R>,
        w: &mut kiln_cache::BlobWriter,
        diff_id: &Digest,
    ) -> Result<(), String> {
        let mut hasher = Some(kiln_image::Hasher::new());
        let end = self.fill_inner(inner, w, diff_id, &mut hasher);
        let mut st = self.lock();
        st.end = Some(end.clone());
        if end.is_ok() {
            st.whole = hasher.map(|h| {
                let n = h.len();
                (h.finish(), n)
            });
        }
        self.moved.notify_all();
        end
    }

    fn fill_inner<R: Read>(
        &self,
        inner: &mut EncodingReader<R>,
        w: &mut kiln_cache::BlobWriter,
        diff_id: &Digest,
        hasher: &mut Option<kiln_image::Hasher>,
    ) -> Result<(), String> {
        loop {
            if self.lock().stopped {
                return Err("the upload ended early".into());
            }
            // The compressor's output is written from its own buffer.
            let piece = match inner.next_chunk() {
                Ok([]) => break,
                Ok(p) => p,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            };
            w.write_all(piece)
                .map_err(|e| format!("writing the compressed layer into the store: {e}"))?;
            // Hashed only while the blob may still go up whole (a larger
            // one is hashed by its streamed upload).
            if let Some(h) = hasher.as_mut() {
                h.update(piece);
                if h.len() > WHOLE_LIMIT {
                    *hasher = None;
                }
            }
            let mut st = self.lock();
            st.written += piece.len() as u64;
            self.moved.notify_all();
        }
        match inner.tar_digest() {
            Some((d, _)) if &d == diff_id => Ok(()),
            Some((d, _)) => Err(format!("content has diffID {d}, config says {diff_id}")),
            None => Err("compressed stream ended early".into()),
        }
    }
}

/// The upload's side of a [`Spool`]: the file, read up to what has been
/// written; its end once the compression has ended well.
struct SpoolReader<'a> {
    spool: &'a Spool,
    file: std::fs::File,
    pos: u64,
}

impl Read for SpoolReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if buf.is_empty() {
            return Ok(0);
        }
        let avail = {
            let mut st = self.spool.lock();
            loop {
                if st.written > self.pos {
                    break st.written - self.pos;
                }
                match &st.end {
                    Some(Ok(())) => return Ok(0),
                    Some(Err(e)) => return Err(std::io::Error::other(e.clone())),
                    None => {}
                }
                st = self.spool.moved.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let want = buf.len().min(usize::try_from(avail).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the store's copy of the layer is shorter than written",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl kiln_registry::StreamBody for SpoolReader<'_> {
    /// Waits for the compression to end, to pass [`WHOLE_LIMIT`], to
    /// take longer than [`WHOLE_WAIT`] (a layer slow to compress is
    /// streamed: the upload session is not left idle), or for `stop`.
    fn whole(&mut self, stop: &dyn Fn() -> bool) -> Option<(Digest, u64)> {
        let until = std::time::Instant::now() + WHOLE_WAIT;
        let mut st = self.spool.lock();
        loop {
            match &st.end {
                Some(Ok(())) => return st.whole.clone(),
                Some(Err(_)) => return None,
                None if st.written > WHOLE_LIMIT => return None,
                None => {}
            }
            let now = std::time::Instant::now();
            if now >= until || stop() {
                return None;
            }
            let step = (until - now).min(std::time::Duration::from_millis(50));
            st = self
                .spool
                .moved
                .wait_timeout(st, step)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl<R: Read> kiln_registry::StreamBody for Teed<'_, R> {}

impl Drop for SpoolReader<'_> {
    fn drop(&mut self) {
        let mut st = self.spool.lock();
        st.stopped = true;
        self.spool.moved.notify_all();
    }
}

/// Push one layer that must be compressed: compressed while it is
/// uploaded (no wait for the whole blob before the first byte goes out),
/// then remembered in the store's memo. When the registry turns the
/// streamed upload down (or the network fails under it), the layer is
/// compressed into the store first and sent as any other blob, with
/// retries, and `streaming` is cleared so that the push's other layers go
/// that way at once. Returns its descriptor.
#[allow(clippy::too_many_arguments)]
fn stream_layer(
    store: &Store,
    reg: &Registry,
    repo: &str,
    layer: &Descriptor,
    diff_id: &Digest,
    enc: LayerEncoding,
    t: Target,
    streaming: &std::sync::atomic::AtomicBool,
    memo: &std::sync::mpsc::Sender<Memo>,
    progress: &(dyn Fn(&str) + Sync),
    transfer: &(dyn Fn(Transfer) + Sync),
) -> Result<Descriptor, TransferError> {
    let sized = || -> Result<Descriptor, TransferError> {
        let d = compress_into_store(store, layer, diff_id, enc, &t, progress)?;
        let source = StoreSource {
            store,
            mounts: Default::default(),
            target: None,
        };
        reg.push_blobs(repo, std::slice::from_ref(&d), &source, 1, transfer)
            .map_err(TransferError::ctx(format!("layer {}", short(diff_id))))?;
        Ok(d)
    };
    if !streaming.load(std::sync::atomic::Ordering::Relaxed) {
        return sized();
    }
    progress(&format!(
        "{}: compressing ({}) while uploading",
        short(diff_id),
        t.cname
    ));
    let slot = std::sync::Mutex::new(None);
    let (tar, verified) = layer_tar(store, layer, diff_id)?;
    let mut inner = EncodingReader::new(tar, enc.compression, enc.oci_media_types, verified)
        .map_err(TransferError::ctx(format!("layer {}", short(diff_id))))?
        .without_blob_digest();
    let moved = std::sync::atomic::AtomicU64::new(0);
    let count = |n: u64| {
        let total = moved.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        transfer(Transfer::Bytes(diff_id.clone(), total));
    };
    // The layer is compressed into the store's file on this thread while
    // the upload, on another, reads the file behind it: the compressor
    // never waits for the registry (random data goes out at the
    // registry's pace while the text after it is being deflated). Without
    // a file to spool to, the upload reads the compressor directly.
    let copy = store.content().writer_prehashed().ok();
    let reader = copy
        .as_ref()
        .and_then(|w| std::fs::File::open(w.temp_path()).ok());
    let pushed = match (copy, reader) {
        (Some(mut w), Some(file)) => {
            let spool = Spool::default();
            std::thread::scope(|s| {
                let up = s.spawn(|| {
                    let source = SpoolReader {
                        spool: &spool,
                        file,
                        pos: 0,
                    };
                    reg.push_blob_streamed(repo, Box::new(source), &count)
                });
                let end = spool.fill(&mut inner, &mut w, diff_id);
                if end.is_ok() {
                    if let Ok(mut sl) = slot.lock() {
                        *sl = Some(w);
                    }
                }
                up.join().unwrap_or_else(|_| {
                    Err(kiln_registry::RegistryError::Local(
                        "the upload thread panicked".into(),
                    ))
                })
            })
        }
        _ => {
            let source = Box::new(Teed {
                inner,
                copy: None,
                diff_id,
                slot: &slot,
            });
            reg.push_blob_streamed(repo, source, &count)
        }
    };
    let (digest, size) = match pushed {
        Ok(v) => v,
        Err(e) if e.stream_refused() => {
            streaming.store(false, std::sync::atomic::Ordering::Relaxed);
            progress(&format!(
                "{}: streamed upload failed ({e}); compressing first, then uploading",
                short(diff_id)
            ));
            return sized();
        }
        Err(e) => {
            return Err(TransferError::Invalid(format!(
                "layer {}: {e}",
                short(diff_id)
            )))
        }
    };
    progress(&format!(
        "{}: compressed to {} ({size} bytes)",
        short(diff_id),
        short(&digest)
    ));
    transfer(Transfer::Done(digest.clone(), size));
    let desc = Descriptor::new(t.media_type.clone(), digest.clone(), size);
    if let Some(w) = slot.lock().ok().and_then(|mut s| s.take()) {
        // Committed on the push's memo thread (its syncs off this
        // layer's path). The memo is a cache: a failure to keep it costs
        // a later push its compression, nothing else.
        let _ = memo.send(Memo {
            w,
            digest,
            size,
            diff_id: diff_id.clone(),
            t,
        });
    }
    Ok(desc)
}

/// How many threads commit a push's memo entries (see `push_layers`).
const MEMO_COMMITTERS: usize = 4;

/// A compressed layer written into a store writer, to be committed and
/// recorded in the memo.
struct Memo {
    w: kiln_cache::BlobWriter,
    digest: Digest,
    size: u64,
    diff_id: Digest,
    t: Target,
}

/// Commits a compressed layer written by a prehashed store writer and
/// records it in the memo under (diffID, compression, level).
fn remember(
    store: &Store,
    w: kiln_cache::BlobWriter,
    digest: &Digest,
    size: u64,
    diff_id: &Digest,
    t: &Target,
) -> Result<u64, TransferError> {
    let (blob, size) = store
        .commit_blob(w, Some(&cd(digest)?), Some(size), Some(&t.media_type))
        .map_err(TransferError::src)?;
    store
        .meta()
        .put_layer_blob(&cd(diff_id)?, &t.cname, t.level, &blob)
        .map_err(TransferError::src)?;
    Ok(size)
}

fn short(d: &Digest) -> &str {
    d.hex().get(..12).unwrap_or(d.hex())
}

/// An image of the store re-encoded per `enc`: the new manifest (stored,
/// so its blobs are recorded) with the same config. Layers are encoded in
/// parallel (up to `jobs`).
pub fn encode_image(
    store: &Store,
    manifest: &RawManifest,
    enc: LayerEncoding,
    jobs: usize,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<RawManifest, TransferError> {
    let (m, config) = image_parts(store, manifest)?;
    let one = |i: usize| match (m.layers.get(i), config.rootfs.diff_ids.get(i)) {
        (Some(l), Some(diff)) => encode_one(store, l, diff, enc, progress),
        _ => Err(TransferError::invalid("layer index out of range")),
    };
    let layers = parallel(m.layers.len(), jobs, &one, &|m| TransferError::invalid(m))?;
    store_manifest(store, &m, layers, enc)
}

/// A stored index re-encoded per `enc` (a multi-platform build's result
/// for `-o type=oci`): every stored child through [`encode_image`] (its
/// platform and annotations kept, in index order), then the new index,
/// stored: an OCI index, or a Docker manifest list when `enc` asks for
/// Docker media types (`oci-mediatypes=false`).
pub fn encode_index(
    store: &Store,
    index: &RawManifest,
    enc: LayerEncoding,
    jobs: usize,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<RawManifest, TransferError> {
    let mut idx = index.index().map_err(TransferError::ctx("index"))?;
    let children = crate::platforms::stored_children(store, index)
        .map_err(TransferError::ctx(format!("index {}", index.digest)))?;
    let mut out = Vec::with_capacity(children.len());
    for d in &children {
        let raw = stored_manifest(store, d)?;
        let e = encode_image(store, &raw, enc, jobs, progress)?;
        let mut nd = e.descriptor();
        nd.platform = d.platform.clone();
        nd.annotations = d.annotations.clone();
        out.push(nd);
    }
    idx.manifests = out;
    idx.media_type = Some(index_media_type(enc).to_string());
    let bytes = idx.to_bytes().map_err(TransferError::src)?;
    let raw = RawManifest::new(bytes, idx.media_type.as_deref()).map_err(TransferError::src)?;
    store
        .put_bytes(&raw.bytes, Some(&raw.media_type))
        .map_err(TransferError::src)?;
    Ok(raw)
}

/// The stored manifest `d` describes (an index's child).
fn stored_manifest(store: &Store, d: &Descriptor) -> Result<RawManifest, TransferError> {
    let bytes = store
        .content()
        .read(&cd(&d.digest)?)
        .map_err(TransferError::ctx(format!("manifest {}", d.digest)))?;
    RawManifest::new(bytes, Some(&d.media_type)).map_err(TransferError::src)
}

/// The index type that goes with `enc`'s manifests.
fn index_media_type(enc: LayerEncoding) -> &'static str {
    if enc.oci_media_types {
        media_types::OCI_INDEX
    } else {
        media_types::DOCKER_MANIFEST_LIST
    }
}

/// A stored image's manifest and config, checked to agree on the layers.
fn image_parts(
    store: &Store,
    manifest: &RawManifest,
) -> Result<(ImageManifest, ImageConfig), TransferError> {
    let m = manifest.manifest().map_err(TransferError::src)?;
    let cbytes = store
        .content()
        .read(&cd(&m.config.digest)?)
        .map_err(TransferError::ctx("config"))?;
    let config = ImageConfig::from_bytes(&cbytes).map_err(TransferError::ctx("config"))?;
    if config.rootfs.diff_ids.len() != m.layers.len() {
        return Err(TransferError::invalid(
            "manifest and config disagree on the number of layers",
        ));
    }
    Ok((m, config))
}

/// The manifest of `m`'s config with `layers` (as encoded), stored.
fn store_manifest(
    store: &Store,
    m: &ImageManifest,
    layers: Vec<Descriptor>,
    enc: LayerEncoding,
) -> Result<RawManifest, TransferError> {
    let mut out = ImageManifest::new(config_of(m), layers, enc.oci_media_types);
    // Annotations stay with the image (OCI manifests have them; Docker's
    // schema2 does not).
    if enc.oci_media_types {
        out.annotations = m.annotations.clone();
    }
    let raw = out.to_raw().map_err(TransferError::src)?;
    store
        .put_bytes(&raw.bytes, Some(&raw.media_type))
        .map_err(TransferError::src)?;
    Ok(raw)
}

/// The config descriptor of `m` as a manifest lists it (no platform).
fn config_of(m: &ImageManifest) -> Descriptor {
    let mut d = m.config.clone();
    d.platform = None;
    d
}

/// For cross-repository mounts: blobs of local images that came from
/// other repositories of `registry`.
fn mount_candidates(
    store: &Store,
    target: &Reference,
) -> std::collections::HashMap<Digest, String> {
    let mut out = std::collections::HashMap::new();
    let Ok(images) = store.meta().images() else {
        return out;
    };
    for img in images {
        let Ok(r) = Reference::parse(&img.name) else {
            continue;
        };
        if r.registry != target.registry || r.repository == target.repository {
            continue;
        }
        let Ok(md) = img.manifest.parse::<kiln_cache::Digest>() else {
            continue;
        };
        let Ok(bytes) = store.content().read(&md) else {
            continue;
        };
        let Ok(m) = serde_json::from_slice::<ImageManifest>(&bytes) else {
            continue;
        };
        for l in m.layers.iter().chain(std::iter::once(&m.config)) {
            out.entry(l.digest.clone())
                .or_insert_with(|| r.repository.clone());
        }
    }
    out
}

/// The stored manifest of local image `image` (name or ID prefix handled
/// by the caller: this takes a normalised name).
pub fn local_manifest(store: &Store, name: &str) -> Result<RawManifest, TransferError> {
    let rec = store
        .meta()
        .image(name)
        .map_err(TransferError::src)?
        .ok_or_else(|| {
            TransferError::Invalid(format!("{name}: no such image in the local store"))
        })?;
    let md: kiln_cache::Digest = rec.manifest.parse().map_err(TransferError::src)?;
    let bytes = store.content().read(&md).map_err(TransferError::src)?;
    let raw = RawManifest::new(bytes, None).map_err(TransferError::src)?;
    if raw.is_index() {
        return Err(TransferError::Invalid(format!(
            "{name}: is an index; push a single-platform image"
        )));
    }
    Ok(raw)
}

/// Push a stored image (manifest) to `target`: layers encoded per `enc`
/// (a layer not yet compressed that way is compressed while it is
/// uploaded, and remembered), blobs up to `jobs` at once (HEAD, mount,
/// upload), then the config and the manifest. An index goes whole
/// ([`push_index`]). Returns the pushed manifest (or index) digest.
#[allow(clippy::too_many_arguments)]
pub fn push(
    store: &Store,
    cfg: &RegistryConfig,
    manifest: &RawManifest,
    target: &str,
    enc: LayerEncoding,
    jobs: usize,
    progress: &(dyn Fn(&str) + Sync),
    transfer: &(dyn Fn(Transfer) + Sync),
) -> Result<Digest, TransferError> {
    if manifest.is_index() {
        return push_index(store, cfg, manifest, target, enc, jobs, progress, transfer);
    }
    let _span = tracing::info_span!("push", target).entered();
    tracing::info!("push started");
    let (_, r, reg) = connect(target, cfg)?;
    let tag = r.tag.clone();
    push_to(
        store,
        &reg,
        &r,
        tag.as_deref(),
        manifest,
        enc,
        jobs,
        progress,
        transfer,
    )
    .map(|raw| raw.digest)
}

/// Push a stored index whole (`kiln push` of a name that points at one):
/// every stored child image as [`push`] does it (under its digest), then
/// the index under `target`'s tag. When every child went out unchanged
/// the index's own bytes are pushed (same digest); otherwise (layers
/// recompressed, children the store lacks left out) a new index of the
/// same type lists what was pushed, each with its platform. Returns the
/// pushed index digest.
#[allow(clippy::too_many_arguments)]
pub fn push_index(
    store: &Store,
    cfg: &RegistryConfig,
    index: &RawManifest,
    target: &str,
    enc: LayerEncoding,
    jobs: usize,
    progress: &(dyn Fn(&str) + Sync),
    transfer: &(dyn Fn(Transfer) + Sync),
) -> Result<Digest, TransferError> {
    let _span = tracing::info_span!("push", target).entered();
    tracing::info!("index push started");
    let (name, r, reg) = connect(target, cfg)?;
    let mut idx = index
        .index()
        .map_err(TransferError::ctx(format!("{name}: index")))?;
    let children = crate::platforms::stored_children(store, index)
        .map_err(TransferError::ctx(name.clone()))?;
    if children.is_empty() {
        return Err(TransferError::Invalid(format!(
            "{name}: the store holds no image of index {}",
            index.digest
        )));
    }
    let mut pushed = Vec::with_capacity(children.len());
    for d in &children {
        let raw = stored_manifest(store, d)?;
        let out = push_to(store, &reg, &r, None, &raw, enc, jobs, progress, transfer)?;
        let mut nd = out.descriptor();
        nd.platform = d.platform.clone();
        nd.annotations = d.annotations.clone();
        pushed.push(nd);
    }
    let unchanged = pushed.len() == idx.manifests.len()
        && pushed
            .iter()
            .zip(&idx.manifests)
            .all(|(a, b)| a.digest == b.digest);
    let out = if unchanged {
        index.clone()
    } else {
        idx.manifests = pushed;
        // Docker manifests (`oci-mediatypes=false`) go in a Docker
        // manifest list; otherwise the index keeps its type.
        let media_type = if enc.oci_media_types {
            index.media_type.clone()
        } else {
            index_media_type(enc).to_string()
        };
        idx.media_type = Some(media_type.clone());
        let bytes = idx.to_bytes().map_err(TransferError::src)?;
        let raw = RawManifest::new(bytes, Some(&media_type)).map_err(TransferError::src)?;
        store
            .put_bytes(&raw.bytes, Some(&raw.media_type))
            .map_err(TransferError::src)?;
        raw
    };
    let reference = r.tag.clone().unwrap_or_else(|| out.digest.to_string());
    reg.put_manifest(&r.repository, &reference, &out)
        .map_err(TransferError::src)
}

/// [`push`] of one image through `reg` to `r`'s repository, put under
/// `tag` (else its digest); returns the manifest pushed.
#[allow(clippy::too_many_arguments)]
fn push_to(
    store: &Store,
    reg: &Registry,
    r: &Reference,
    tag: Option<&str>,
    manifest: &RawManifest,
    enc: LayerEncoding,
    jobs: usize,
    progress: &(dyn Fn(&str) + Sync),
    transfer: &(dyn Fn(Transfer) + Sync),
) -> Result<RawManifest, TransferError> {
    let (m, config) = image_parts(store, manifest)?;
    let source = StoreSource {
        store,
        mounts: mount_candidates(store, r),
        target: Some((r.registry.clone(), r.repository.clone())),
    };
    let repo = r.repository.as_str();
    if m.layers.len() != config.rootfs.diff_ids.len() {
        return Err(TransferError::invalid("layer index out of range"));
    }
    let pairs: Vec<(Descriptor, Digest)> = m
        .layers
        .iter()
        .cloned()
        .zip(config.rootfs.diff_ids.iter().cloned())
        .collect();
    // The image's config goes up beside the layers; the manifest is
    // stored and put while the last layers' memo entries are committed.
    let config_desc = config_of(&m);
    let (raw, layers) = push_layers(
        store,
        reg,
        repo,
        &source,
        &pairs,
        std::slice::from_ref(&config_desc),
        enc,
        jobs,
        progress,
        transfer,
        |layers| -> Result<_, TransferError> {
            let raw = store_manifest(store, &m, layers.clone(), enc)?;
            let reference = tag.map_or_else(|| raw.digest.to_string(), str::to_string);
            reg.put_manifest(repo, &reference, &raw)
                .map_err(TransferError::src)?;
            Ok((raw, layers))
        },
    )??;
    remember_locations(store, r, &m.config, &layers);
    Ok(raw)
}

/// Pushes `layers` (each a stored layer blob and its diffID) to `repo`
/// encoded per `enc`, up to `jobs` at once: a blob already encoded that
/// way (or remembered in the memo) is sent as it is (HEAD first, mount,
/// upload); one that must be compressed is compressed while it is
/// uploaded (a small layer whole by the time its upload session is open
/// goes up in one `PUT`), and remembered. `configs` (blobs `source`
/// reads, sent as they are) go up on a thread of their own beside the
/// layers; one refused stops the layers not yet started. Then `then` gets
/// the pushed layers' descriptors,
/// in order, and runs while the last layers' memo entries are committed;
/// every memo entry is kept before this returns `then`'s result.
#[allow(clippy::too_many_arguments)]
pub(crate) fn push_layers<R>(
    store: &Store,
    reg: &Registry,
    repo: &str,
    source: &dyn PushSource,
    layers: &[(Descriptor, Digest)],
    configs: &[Descriptor],
    enc: LayerEncoding,
    jobs: usize,
    progress: &(dyn Fn(&str) + Sync),
    transfer: &(dyn Fn(Transfer) + Sync),
    then: impl FnOnce(Vec<Descriptor>) -> R,
) -> Result<R, TransferError> {
    let streaming = std::sync::atomic::AtomicBool::new(true);
    // Layers compressed while uploaded are committed by a few threads of
    // their own while the other layers go on: each commit waits for its
    // syncs, and syncs issued together share the file system's journal
    // commits (one after another, ten layers' syncs were the push's tail).
    let (memo, kept) = std::sync::mpsc::channel::<Memo>();
    let kept = std::sync::Mutex::new(kept);
    // A config the registry refuses stops the layers not yet started.
    let config_failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..MEMO_COMMITTERS {
            s.spawn(|| loop {
                let next = match kept.lock() {
                    Ok(k) => k.recv(),
                    Err(_) => return,
                };
                let Ok(m) = next else { return };
                let _ = remember(store, m.w, &m.digest, m.size, &m.diff_id, &m.t);
            });
        }
        // The configs go up on a thread of their own beside the layers'
        // slots (a small blob's requests would hold a slot for as long as
        // a layer's compression takes a turn).
        let configs_up = s.spawn(|| {
            let r = reg
                .push_blobs(repo, configs, source, configs.len().max(1), transfer)
                .map_err(TransferError::src);
            if r.is_err() {
                config_failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            r
        });
        let one = |i: usize| -> Result<Descriptor, TransferError> {
            if config_failed.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(TransferError::invalid("stopped: the config upload failed"));
            }
            let Some((l, diff)) = layers.get(i) else {
                return Err(TransferError::invalid("layer index out of range"));
            };
            match plan_layer(store, l, diff, enc, progress)? {
                LayerPlan::Ready(d) => {
                    reg.push_blobs(repo, std::slice::from_ref(&*d), source, 1, transfer)
                        .map_err(TransferError::src)?;
                    Ok(*d)
                }
                LayerPlan::Compress(t) => stream_layer(
                    store, reg, repo, l, diff, enc, t, &streaming, &memo, progress, transfer,
                ),
            }
        };
        let pushed = parallel(layers.len(), jobs, &one, &|m| TransferError::invalid(m));
        drop(memo);
        let configs_pushed = configs_up
            .join()
            .unwrap_or_else(|_| Err(TransferError::invalid("the config upload panicked")));
        // The config's own error first (the layers' may only say they
        // stopped for it).
        configs_pushed?;
        Ok(then(pushed?))
    })
}

/// Notes that `r`'s repository holds `config` and `layers`, for
/// cross-repository mounts on later pushes to the same registry. A
/// failure only costs those mounts.
fn remember_locations(store: &Store, r: &Reference, config: &Descriptor, layers: &[Descriptor]) {
    let digests: Vec<kiln_cache::Digest> = layers
        .iter()
        .chain(std::iter::once(config))
        .filter_map(|d| cd(&d.digest).ok())
        .collect();
    let _ = store
        .meta()
        .add_blob_locations(&r.registry, &r.repository, &digests);
}

/// `f(0..n)` on up to `jobs` threads, results in order; the first error
/// stops the others from starting more, and is the one returned (the
/// lowest index that failed). `stopped` makes the error of a slot left
/// unfilled.
pub(crate) fn parallel<T: Send, E: Send>(
    n: usize,
    jobs: usize,
    f: &(dyn Fn(usize) -> Result<T, E> + Sync),
    stopped: &dyn Fn(&str) -> E,
) -> Result<Vec<T>, E> {
    let results: Vec<std::sync::Mutex<Option<Result<T, E>>>> =
        (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(slot) = results.get(i) else { return };
                let r = f(i);
                if r.is_err() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if let Ok(mut g) = slot.lock() {
                    *g = Some(r);
                }
            });
        }
    });
    let mut out = Vec::with_capacity(n);
    let mut first_err = None;
    for r in results {
        match r.into_inner() {
            Ok(Some(Ok(v))) => out.push(v),
            Ok(Some(Err(e))) => {
                first_err.get_or_insert(e);
            }
            Ok(None) => {
                first_err.get_or_insert_with(|| stopped("stopped after an earlier error"));
            }
            Err(_) => {
                first_err.get_or_insert_with(|| stopped("a worker thread panicked"));
            }
        }
    }
    match first_err {
        // A real error beats the "stopped" placeholder of a later slot.
        Some(e) => Err(e),
        None => Ok(out),
    }
}
