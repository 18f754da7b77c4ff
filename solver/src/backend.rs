//! What the solver needs from the store, as one narrow trait: resolving
//! base images, unpacking them into snapshots, the cache index, preparing
//! and committing snapshots, and writing the final image. The store-backed
//! implementation is [`crate::store::StoreBackend`].

use std::path::PathBuf;

use kiln_executor::RootfsMount;
use kiln_image::config::ImageConfig;
use kiln_image::diff::DiffOptions;
use kiln_image::Digest;

use crate::copy::HashCache;

/// A layer of an image or a build result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Digest of the stored blob.
    pub digest: Digest,
    /// Size of the stored blob.
    pub size: u64,
    /// Media type of the stored blob.
    pub media_type: String,
    /// The committed snapshot holding the layer's files.
    pub snapshot: String,
    /// When the layer was built (Unix seconds; 0 for base-image layers).
    pub created: i64,
}

/// A base image found in the store.
#[derive(Debug, Clone)]
pub struct BaseImage {
    /// The normalised reference it was found under.
    pub reference: String,
    /// Digest of its manifest (what cache keys of the stage start from).
    pub manifest_digest: String,
    /// Its configuration.
    pub config: ImageConfig,
    /// Its layers, bottom first, unpacked into snapshots.
    pub layers: Vec<LayerRecord>,
}

/// A writable snapshot prepared on top of a parent.
#[derive(Debug)]
pub struct Active {
    /// Snapshot key.
    pub key: String,
    /// How to mount it (handed to the executor).
    pub mounts: Vec<RootfsMount>,
    /// The layer directories, writable top first, then the parents' (for
    /// COPY through [`crate::fsview::LayerView`]).
    pub layers: Vec<PathBuf>,
}

/// The image the build produced.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The image ID (digest of the config).
    pub image_id: String,
    /// Digest of the manifest.
    pub manifest_digest: String,
}

/// A cache-mount directory held for one RUN step (`RUN
/// --mount=type=cache`); its lock is released when this is dropped.
pub struct CacheMountHold {
    /// The directory to bind-mount.
    pub dir: PathBuf,
    /// True when it was just made (empty: seed it, set owner and mode).
    pub created: bool,
    /// Keeps the lock; dropped with the hold.
    pub guard: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for CacheMountHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheMountHold")
            .field("dir", &self.dir)
            .field("created", &self.created)
            .finish()
    }
}

crate::error::module_error! {
    /// An error from the store, worded for the user, with its typed cause
    /// (e.g. [`kiln_cache::Error::NoSpace`]) kept as the source.
    pub enum BackendError {
        /// The operation needs a store-backed build.
        #[error("{0} needs a store-backed build")]
        Unsupported(&'static str),
    }
}

/// A result of a [`Backend`] method.
pub type BackendResult<T> = Result<T, BackendError>;

/// The solver's view of the store. Methods block: call them from
/// `spawn_blocking`.
///
/// [`crate::remote_cache::RemoteCacheBackend`] wraps the store backend and
/// forwards every method: a method added here needs a forwarding there too
/// (a default implementation would otherwise answer for `--cache-from`
/// builds).
pub trait Backend: Send + Sync + 'static {
    /// Finds `reference` (normalised Docker-style) in the local store (or
    /// pulls it) for `platform` and makes sure its layers are unpacked
    /// into snapshots. `None` is the host's platform, leniently: the
    /// host's image of an index, or the one image stored whatever it is
    /// for. With a platform, a name pointing at an index gives that
    /// platform's child and a single image must be for it. A pull reports
    /// its blobs to `progress`.
    fn resolve_image(
        &self,
        reference: &str,
        platform: Option<&kiln_image::manifest::Platform>,
        progress: &(dyn Fn(kiln_registry::Transfer) + Sync),
    ) -> BackendResult<Option<BaseImage>>;
    /// The layer stored under a cache key, if its snapshot still exists.
    fn cache_get(&self, key: &str) -> BackendResult<Option<LayerRecord>>;
    /// Whether the cache hit `hit` is a layer on the snapshot `parent`
    /// (the step's parent): a record naming a layer on another parent (an
    /// imported cache's claim) must not be used — the step would go on
    /// another build's files. Backends whose snapshot names say nothing of
    /// their parents (the in-memory test backend) take every hit.
    fn hit_on(&self, hit: &LayerRecord, parent: Option<&str>) -> bool {
        let _ = (hit, parent);
        true
    }
    /// Records `layer` under one more key (e.g. a COPY's shape key, which
    /// leads a later run with changed content to the files it can reuse).
    fn cache_alias(&self, key: &str, layer: &LayerRecord) -> BackendResult<()> {
        let _ = (key, layer);
        Ok(())
    }
    /// A writable snapshot on top of `parent` (`None`: empty).
    fn prepare(&self, parent: Option<&str>) -> BackendResult<Active>;
    /// Turns the writable snapshot into a layer: diff, store the blob,
    /// commit the snapshot and record `key` in the cache index.
    fn commit(&self, active: Active, key: &str, opts: &DiffOptions) -> BackendResult<LayerRecord>;
    /// [`Backend::commit`] of a snapshot whose layer was digested while
    /// it was written ([`kiln_cache::LayerStream`], checked against the
    /// snapshot): a backend that diffs overlay upperdirs takes `streamed`
    /// instead of diffing again; any other diffs as `commit` does.
    fn commit_streamed(
        &self,
        active: Active,
        key: &str,
        opts: &DiffOptions,
        streamed: kiln_cache::StreamedDiff,
    ) -> BackendResult<LayerRecord> {
        let _ = streamed;
        self.commit(active, key, opts)
    }
    /// Drops a writable snapshot.
    fn abort(&self, active: Active);
    /// The layer directories of a committed snapshot chain, top first.
    fn layer_dirs(&self, snapshot: &str) -> BackendResult<Vec<PathBuf>>;
    /// The stat-keyed file-hash cache for build contexts.
    fn hash_cache(&self) -> &dyn HashCache;
    /// Writes the image (config, manifest) and points `tags` at it. Tags
    /// move only after everything else is durable.
    fn export(
        &self,
        config: &ImageConfig,
        layers: &[LayerRecord],
        tags: &[String],
    ) -> BackendResult<Exported>;
    /// Writes an OCI image index of the per-platform images `children`
    /// (written by [`Backend::export`], in this order) and points `tags`
    /// at it: a multi-platform build's result.
    fn export_index(
        &self,
        children: &[(kiln_image::manifest::Platform, Exported)],
        tags: &[String],
    ) -> BackendResult<Exported> {
        let _ = (children, tags);
        Err(BackendError::Unsupported("a multi-platform build"))
    }
    /// The persistent cache-mount directory `id` (see
    /// [`kiln_cache::CacheSharing`] for how concurrent users share it); a
    /// wait for its lock ends when `cancelled` says so.
    fn cache_mount(
        &self,
        id: &str,
        sharing: kiln_cache::CacheSharing,
        cancelled: &dyn Fn() -> bool,
    ) -> BackendResult<CacheMountHold> {
        let _ = (id, sharing, cancelled);
        Err(BackendError::Unsupported("RUN --mount=type=cache"))
    }
    /// A directory for throwaway files of a step (writable upper layers of
    /// `rw` bind mounts); on the store's filesystem when there is one.
    fn scratch_dir(&self) -> PathBuf {
        std::env::temp_dir()
    }
    /// `COPY --link`: stacks `layer` (committed on an empty parent) onto
    /// `parent` as a new snapshot, recorded under `key`.
    fn stack_layer(
        &self,
        parent: Option<&str>,
        layer: &LayerRecord,
        key: &str,
    ) -> BackendResult<LayerRecord> {
        let _ = (parent, layer, key);
        Err(BackendError::Unsupported("COPY --link"))
    }
}
