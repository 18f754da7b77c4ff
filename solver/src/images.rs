//! The store's images, for the commands around a build: list them, find
//! one by name, ID or ID prefix, their layer sizes and history, name and
//! unname them, load an archive, import a root filesystem tar, pull,
//! push, save, export a filesystem, and the store-wide prune, disk usage
//! and check. Everything here is a [`Session`] method returning data and
//! typed errors; rendering (tables, JSON, docker's wording) is the
//! caller's.
//!
//! ```no_run
//! use kiln_solver::session::Session;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let session = Session::open("/var/lib/kiln")?;
//! for image in session.images()? {
//!     println!("{:?} {} bytes", image.names, session.image_size(&image)?);
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_cache::{normalize_reference, Store};
use kiln_executor::CancellationToken;
use kiln_image::archive::ArchiveImage;
use kiln_image::config::{History, ImageConfig};
use kiln_image::manifest::{ImageManifest, Platform};
use kiln_registry::RegistryConfig;

use crate::export::{
    self, ArchiveExporter, ArchiveFormat, Dest, ExportError, ExportInput, Exporter,
    RegistryExporter, TarExporter,
};
use crate::session::Session;
use crate::transfer::{self, LayerEncoding, PullResult};

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be opened.
    #[error("opening the store at {}: {source}", path.display())]
    OpenStore {
        /// The store root.
        path: PathBuf,
        /// Why.
        #[source]
        source: kiln_cache::Error,
    },
    /// A name that is not an image reference (a usage error).
    #[error("invalid {what} {reference:?}: {source}")]
    InvalidReference {
        /// "reference", "destination".
        what: &'static str,
        /// As given.
        reference: String,
        /// Why.
        #[source]
        source: kiln_cache::Error,
    },
    /// No image has that name or ID.
    #[error("No such image: {0}")]
    NoSuchImage(String),
    /// An ID prefix that several images share (the prefix, then the IDs
    /// it matches).
    #[error("{0}: ambiguous image ID prefix, it matches {1}")]
    AmbiguousId(String, String),
    /// `rmi` of an image by ID that has several names, without `force`.
    #[error(
        "unable to delete {0} (must be forced) - image is referenced in multiple repositories"
    )]
    MustForce(String),
    /// A stored image record or manifest that does not parse.
    #[error("image {name}: {detail}")]
    Corrupt {
        /// The image name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// A file kiln was asked to read.
    #[error("opening {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An archive given to [`Session::load`].
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A `--change` given to [`Session::import`] (a usage error).
    #[error(transparent)]
    Change(#[from] crate::change::ChangeError),
    /// Reading the root filesystem tar of [`Session::import`].
    #[error("importing {what}: {source}")]
    Import {
        /// The tar's name.
        what: String,
        /// Why.
        #[source]
        source: kiln_image::ImageError,
    },
    /// The store's filesystem is full.
    #[error("no space left on the store's filesystem ({}); free space or run `kiln prune`: {source}", root.display())]
    NoSpace {
        /// The store root.
        root: PathBuf,
        /// What failed.
        #[source]
        source: Box<Error>,
    },
    /// Registry settings (`~/.docker/config.json`, certificates).
    #[error(transparent)]
    Registry(#[from] kiln_registry::RegistryError),
    /// A pull or push between the store and a registry.
    #[error(transparent)]
    Transfer(#[from] crate::transfer::TransferError),
    /// The pull or push was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A push of an image given by ID without a destination.
    #[error("{0}: an image given by ID needs a destination to push to (kiln push ID NAME[:TAG])")]
    NoDestination(String),
    /// A push that named no destination (should not happen).
    #[error("{0}: nothing was pushed")]
    NothingPushed(String),
    /// A save, export or push through the export path.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// An OCI format error.
    #[error(transparent)]
    Image(#[from] kiln_image::ImageError),
    /// The store.
    #[error(transparent)]
    Store(#[from] kiln_cache::Error),
    /// No image for the platform asked for (or a stored index that does
    /// not read).
    #[error(transparent)]
    Platform(Box<crate::platforms::PlatformError>),
}

impl From<crate::platforms::PlatformError> for Error {
    fn from(e: crate::platforms::PlatformError) -> Self {
        Error::Platform(Box::new(e))
    }
}

impl Error {
    /// Whether the caller asked for something invalid (exit status 2 in
    /// the CLI) rather than the work failing.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::InvalidReference { .. }
                | Error::NoDestination(_)
                | Error::Change(_)
                | Error::Export(ExportError::Usage(_))
                | Error::Export(ExportError::Terminal)
        )
    }

    /// Whether the error comes from a full filesystem, whichever layer
    /// noticed (kiln-image's spill, the content store, SQLite).
    fn is_no_space(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
                || matches!(
                    e.downcast_ref::<kiln_cache::Error>(),
                    Some(kiln_cache::Error::NoSpace { .. })
                )
            {
                return true;
            }
            let s = e.to_string();
            if s.contains("No space left on device") || s.contains("database or disk is full") {
                return true;
            }
            cur = e.source();
        }
        false
    }
}

/// An archive that [`Session::load`] turns away.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Unreadable as a docker-archive or OCI layout.
    #[error("reading archive {}: {source}", path.display())]
    Read {
        /// The archive.
        path: PathBuf,
        /// Why.
        #[source]
        source: kiln_image::ImageError,
    },
    /// No image inside.
    #[error("{}: the archive holds no image", .0.display())]
    Empty(PathBuf),
    /// A manifest of the archive does not parse.
    #[error("parsing manifest: {0}")]
    Manifest(#[source] kiln_image::ImageError),
    /// A blob the manifest names is not in the archive.
    #[error("blob {0} missing from the archive")]
    MissingBlob(kiln_image::Digest),
    /// A blob's size differs from its descriptor's.
    #[error("{what}: blob {digest} is {size} bytes in the archive, its manifest says {want}")]
    SizeMismatch {
        /// The image.
        what: String,
        /// The blob.
        digest: kiln_image::Digest,
        /// Its size in the archive.
        size: u64,
        /// The descriptor's size.
        want: u64,
    },
    /// The image config does not parse.
    #[error("{what}: parsing config: {source}")]
    Config {
        /// The image.
        what: String,
        /// Why.
        #[source]
        source: kiln_image::ImageError,
    },
    /// Layers and diffIDs do not pair up.
    #[error("{what}: manifest has {layers} layers, config {diff_ids} diffIDs")]
    LayerCount {
        /// The image.
        what: String,
        /// Layers in the manifest.
        layers: usize,
        /// DiffIDs in the config.
        diff_ids: usize,
    },
    /// An uncompressed layer whose digest is not its diffID.
    #[error(
        "{what}: layer {index} ({digest}): its content has diffID {digest}, but the image config says {diff_id}; nothing was loaded"
    )]
    DiffId {
        /// The image.
        what: String,
        /// 1-based layer number.
        index: usize,
        /// The layer's digest (its diffID, being uncompressed).
        digest: kiln_image::Digest,
        /// What the config says.
        diff_id: kiln_image::Digest,
    },
    /// A layer that is not the layer its image's config names (or could
    /// not be read to tell).
    #[error("{what}: layer {index}: {source}; nothing was loaded")]
    Layer {
        /// The image.
        what: String,
        /// 1-based layer number.
        index: usize,
        /// Why.
        #[source]
        source: kiln_cache::Error,
    },
    /// A name in the archive that is not a reference.
    #[error("image name {name:?}: {source}")]
    Name {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: kiln_cache::Error,
    },
    /// Storing a blob failed.
    #[error("storing blob {digest}: {source}")]
    Store {
        /// The blob.
        digest: kiln_image::Digest,
        /// Why.
        #[source]
        source: kiln_cache::Error,
    },
}

/// An image in the store with every name it has.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// Its normalised names (`docker.io/library/busybox:latest`); empty
    /// for an untagged ("dangling") image.
    pub names: Vec<String>,
    /// The name of a store record of it, for the store's lookups: its
    /// first name, or for an untagged image the ID it is kept under.
    pub key: String,
    /// When it got the name (or, untagged, was made), Unix seconds.
    pub recorded: i64,
    /// Where it is known to be in registries, `repo@digest` (normalised;
    /// docker's RepoDigests): pushed there, pulled from there, or named
    /// by digest.
    pub repo_digests: Vec<String>,
    /// What the names point at: the manifest, or an index (an image for
    /// several platforms, of which this is one).
    pub stored_digest: String,
    /// The platforms of a stored index's images (empty for one image).
    pub platforms: Vec<String>,
    /// The manifest digest (of the platform's image, for an index).
    pub manifest_digest: String,
    /// The config digest (the image ID).
    pub config_digest: String,
    /// The config.
    pub config: ImageConfig,
    /// The manifest.
    pub manifest: ImageManifest,
}

/// One entry of an image's history with the size of its layer.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    /// The config's entry.
    pub entry: History,
    /// The size of the layer it made (0 for an empty layer).
    pub size: u64,
}

/// What [`Session::untag`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The names removed (normalised).
    pub untagged: Vec<String>,
    /// The image's ID when no record of it is left (its data goes with
    /// the next prune).
    pub deleted: Option<String>,
}

/// What [`Session::load`] took in, one per name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// An image without a name, kept under its ID.
    Untagged(kiln_cache::Digest),
    /// An image under this normalised name.
    Named(String),
}

/// How [`Session::pull`] and [`Session::push`] reach a registry.
#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// Registries reachable over plain HTTP (`HOST:PORT`).
    pub insecure_registries: Vec<String>,
    /// Blobs moved at once.
    pub jobs: usize,
    /// Stops the transfer between blobs and between reads of one; the
    /// call then fails with [`Error::Cancelled`], having written nothing
    /// under the image's name (blobs already stored stay, unreferenced
    /// until the next prune).
    pub cancel: CancellationToken,
    /// Pull: from an index, this platform's image (default: the host's).
    pub platform: Option<Platform>,
    /// Pull: keep an index whole (every platform's image, the name
    /// pointing at the index).
    pub all_platforms: bool,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            insecure_registries: Vec::new(),
            jobs: 4,
            cancel: CancellationToken::new(),
            platform: None,
            all_platforms: false,
        }
    }
}

/// `docker.io/library/busybox:latest` -> (`busybox`, `latest`): docker's
/// familiar form of a normalised name (`<none>` for a name without tag,
/// and for a name by digest, `busybox@sha256:…`, as docker lists an
/// image pulled by digest).
pub fn familiar(name: &str) -> (String, String) {
    if let Some((repo, _)) = name.split_once('@') {
        return (
            kiln_image::reference::familiar(repo).to_string(),
            "<none>".to_string(),
        );
    }
    let (repo, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], &name[i + 1..]),
        _ => (name, "<none>"),
    };
    (
        kiln_image::reference::familiar(repo).to_string(),
        tag.to_string(),
    )
}

/// The repository of a normalised name: the name without its tag or
/// digest (`docker.io/library/busybox`).
pub fn repository(name: &str) -> &str {
    let name = name.split_once('@').map_or(name, |(r, _)| r);
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    }
}

/// The registry a `kiln login SERVER` / `kiln logout SERVER` names:
/// Docker Hub by default and for its API hosts, scheme and path dropped.
pub fn server_name(server: Option<&str>) -> String {
    let s = server.unwrap_or("docker.io");
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    match s {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        o => o.to_string(),
    }
}

/// Checks `credentials` against `server` (see [`server_name`]), then
/// stores them as `docker login` does; returns the file written.
pub fn login(
    server: &str,
    insecure_registries: &[String],
    credentials: kiln_registry::Credentials,
) -> Result<String, Error> {
    let cfg = RegistryConfig::load(insecure_registries)?;
    let reg = kiln_registry::Registry::with_credentials(server, &cfg, Some(credentials.clone()))?;
    reg.check_login()?;
    Ok(kiln_registry::config::store_credentials(
        &cfg,
        server,
        &credentials,
    )?)
}

/// Removes the stored credentials for `server`; whether there were any.
pub fn logout(server: &str) -> Result<bool, Error> {
    let cfg = RegistryConfig::load(&[])?;
    Ok(kiln_registry::config::erase_credentials(&cfg, server)?)
}

fn invalid<'a>(
    what: &'static str,
    reference: &'a str,
) -> impl FnOnce(kiln_cache::Error) -> Error + 'a {
    move |source| Error::InvalidReference {
        what,
        reference: reference.to_string(),
        source,
    }
}

/// The image stored under `digest` (a manifest, or an index: then
/// `platform`'s image, else the host's, else — `any`, for listings — its
/// first).
fn read_image(
    store: &Store,
    names: Vec<String>,
    digest: &str,
    platform: Option<&Platform>,
    any: bool,
) -> Result<ImageInfo, Error> {
    let corrupt = |detail: String| Error::Corrupt {
        name: digest.to_string(),
        detail,
    };
    let sel = crate::platforms::select(store, digest, platform, any)?;
    let m: ImageManifest = serde_json::from_slice(&sel.manifest.bytes)
        .map_err(|e| corrupt(format!("manifest: {e}")))?;
    let cd: kiln_cache::Digest = m.config.digest.as_str().parse()?;
    let config = ImageConfig::from_bytes(&store.content().read(&cd)?)?;
    let mut repo_digests: Vec<String> = names.iter().filter(|n| n.contains('@')).cloned().collect();
    for (repo, d) in store.meta().repo_digests(digest)? {
        let rd = format!("{repo}@{d}");
        if !repo_digests.contains(&rd) {
            repo_digests.push(rd);
        }
    }
    Ok(ImageInfo {
        key: names.first().cloned().unwrap_or_default(),
        recorded: 0,
        repo_digests,
        names,
        stored_digest: digest.to_string(),
        platforms: sel.platforms.iter().map(|p| p.to_string()).collect(),
        manifest_digest: sel.manifest.digest.to_string(),
        config_digest: cd.to_string(),
        config,
        manifest: m,
    })
}

/// Every image of `store`, names grouped by image, newest first.
fn all_images(store: &Store) -> Result<Vec<ImageInfo>, Error> {
    let mut by_manifest: BTreeMap<String, ImageInfo> = BTreeMap::new();
    for rec in store.meta().images()? {
        let untagged = kiln_cache::is_untagged_name(&rec.name);
        if let Some(l) = by_manifest.get_mut(&rec.manifest) {
            if !untagged {
                if l.names.is_empty() {
                    l.key = rec.name.clone();
                }
                if rec.name.contains('@') && !l.repo_digests.contains(&rec.name) {
                    l.repo_digests.push(rec.name.clone());
                }
                l.names.push(rec.name.clone());
                l.recorded = l.recorded.max(rec.created);
            }
            continue;
        }
        let names = if untagged {
            Vec::new()
        } else {
            vec![rec.name.clone()]
        };
        let mut info = read_image(store, names, &rec.manifest, None, true)?;
        info.key = rec.name.clone();
        info.recorded = rec.created;
        by_manifest.insert(rec.manifest.clone(), info);
    }
    let mut v: Vec<ImageInfo> = by_manifest.into_values().collect();
    v.sort_by(|a, b| b.config.created.cmp(&a.config.created));
    Ok(v)
}

/// Finds an image as docker does: by name first, then by ID (the config
/// digest, `sha256:…` or bare hex) or any unique prefix of it. Names of an
/// image (tagged or untagged) all share its ID; a prefix that several IDs
/// share is [`Error::AmbiguousId`].
fn find(store: &Store, reference: &str) -> Result<ImageInfo, Error> {
    let images = all_images(store)?;
    let explicit = reference.strip_prefix("sha256:");
    let hex = explicit.unwrap_or(reference);
    let named = if explicit.is_none() {
        normalize_reference(reference).map_err(invalid("reference", reference))
    } else {
        Err(Error::NoSuchImage(reference.to_string()))
    };
    if let Ok(name) = &named {
        // A name pinned to a digest counts only where the digest is the
        // image's (a store written before names were checked may hold
        // another: see `Store::pin_holds`).
        if let Some(l) = images.iter().find(|l| {
            l.names.contains(name)
                && l.stored_digest
                    .parse()
                    .is_ok_and(|d| store.pin_holds(name, &d))
        }) {
            return Ok(l.clone());
        }
    }
    let is_hex = !hex.is_empty()
        && hex.len() <= 64
        && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if is_hex {
        let hits: Vec<&ImageInfo> = images
            .iter()
            .filter(|l| {
                l.config_digest
                    .strip_prefix("sha256:")
                    .is_some_and(|h| h.starts_with(hex))
            })
            .collect();
        let mut ids: Vec<&str> = hits.iter().map(|l| l.config_digest.as_str()).collect();
        ids.dedup();
        ids.sort_unstable();
        ids.dedup();
        match ids.len() {
            0 => {}
            1 => {
                // The named record first (an image both named and kept
                // untagged under another manifest is one image).
                let best = hits
                    .iter()
                    .find(|l| !l.names.is_empty())
                    .or(hits.first())
                    .copied();
                if let Some(l) = best {
                    return Ok(l.clone());
                }
            }
            _ => {
                let shown: Vec<String> = ids
                    .iter()
                    .take(3)
                    .map(|i| i.trim_start_matches("sha256:").chars().take(12).collect())
                    .collect();
                let more = if ids.len() > 3 { ", …" } else { "" };
                return Err(Error::AmbiguousId(
                    reference.to_string(),
                    format!("{}{more}", shown.join(", ")),
                ));
            }
        }
    }
    named?;
    Err(Error::NoSuchImage(reference.to_string()))
}

/// [`find`], then (with a platform) that platform's image of it.
fn find_for(
    store: &Store,
    reference: &str,
    platform: Option<&Platform>,
) -> Result<ImageInfo, Error> {
    let l = find(store, reference)?;
    match platform {
        None => Ok(l),
        Some(p) => {
            let mut one = read_image(store, l.names.clone(), &l.stored_digest, Some(p), false)?;
            one.key = l.key;
            one.recorded = l.recorded;
            Ok(one)
        }
    }
}

/// Each layer's uncompressed size, as docker reports it (see
/// [`Store::layer_size`]); the blob's size where the config names no
/// diffID for it.
fn layer_sizes(store: &Store, l: &ImageInfo) -> Result<Vec<u64>, Error> {
    let diff_ids = &l.config.rootfs.diff_ids;
    l.manifest
        .layers
        .iter()
        .enumerate()
        .map(|(i, d)| match diff_ids.get(i) {
            Some(diff_id) => Ok(store.layer_size(kiln_cache::LayerBlob {
                digest: &d.digest,
                size: Some(d.size),
                diff_id,
            })?),
            None => Ok(d.size),
        })
        .collect()
}

/// A layer stored uncompressed is its own tar: its digest must be the
/// diffID the config names for it. Checked at load (free: the archive's
/// files were hashed as they were read), so that an image whose config
/// claims another layer's diffID is turned away at once; every layer,
/// compressed or not, is verified again when it is unpacked.
fn check_uncompressed_diff_ids(
    what: &str,
    man: &ImageManifest,
    config: &[u8],
) -> Result<(), LoadError> {
    use kiln_image::manifest::media_types;
    let cfg = ImageConfig::from_bytes(config).map_err(|source| LoadError::Config {
        what: what.to_string(),
        source,
    })?;
    if cfg.rootfs.diff_ids.len() != man.layers.len() {
        return Err(LoadError::LayerCount {
            what: what.to_string(),
            layers: man.layers.len(),
            diff_ids: cfg.rootfs.diff_ids.len(),
        });
    }
    for (i, (l, d)) in man.layers.iter().zip(&cfg.rootfs.diff_ids).enumerate() {
        let plain = matches!(
            l.media_type.as_str(),
            media_types::DOCKER_LAYER | media_types::OCI_LAYER
        );
        if plain && &l.digest != d {
            return Err(LoadError::DiffId {
                what: what.to_string(),
                index: i + 1,
                digest: l.digest.clone(),
                diff_id: d.clone(),
            });
        }
    }
    Ok(())
}

/// `reference` normalised as a name to give an image: never one pinned
/// to a digest (docker: "refusing to create a tag with a digest
/// reference" — a name `alpine@sha256:…` for another image would serve
/// every `FROM` pinned to that digest).
fn tag_name(reference: &str) -> Result<String, kiln_cache::Error> {
    let name = normalize_reference(reference)?;
    if name.contains('@') {
        return Err(kiln_cache::Error::InvalidReference {
            reference: reference.to_string(),
            reason: "refusing to create a tag with a digest reference",
        });
    }
    Ok(name)
}

fn store_digest(d: &kiln_image::Digest) -> Result<kiln_cache::Digest, Error> {
    Ok(d.as_str().parse()?)
}

impl Session {
    fn open_images(&self) -> Result<Store, Error> {
        Store::open(self.root())
            .map(|s| {
                s.with_fetcher(std::sync::Arc::new(
                    crate::transfer::RegistryFetcher::default(),
                ))
            })
            .map_err(|source| Error::OpenStore {
                path: self.root().to_path_buf(),
                source,
            })
    }

    /// Wraps a failure of a writing operation in [`Error::NoSpace`] when
    /// the store's filesystem is full.
    fn explain_no_space(&self, e: Error) -> Error {
        if e.is_no_space() {
            Error::NoSpace {
                root: self.root().to_path_buf(),
                source: Box::new(e),
            }
        } else {
            e
        }
    }

    /// Every image in the store, names grouped by image, newest first.
    pub fn images(&self) -> Result<Vec<ImageInfo>, Error> {
        all_images(&self.open_images()?)
    }

    /// The image with this name, else this full ID (`sha256:…` or bare
    /// hex) or unique ID prefix, as docker finds images.
    pub fn find_image(&self, reference: &str) -> Result<ImageInfo, Error> {
        find(&self.open_images()?, reference)
    }

    /// [`Session::find_image`]; of an index, `platform`'s image (default:
    /// the host's). A single image must be for `platform`.
    pub fn find_image_for(
        &self,
        reference: &str,
        platform: Option<&Platform>,
    ) -> Result<ImageInfo, Error> {
        find_for(&self.open_images()?, reference, platform)
    }

    /// The media type and size of the stored manifest or index `digest`
    /// (`sha256:…`), e.g. a built image's for `--metadata-file`'s
    /// descriptor.
    pub fn manifest_descriptor(&self, digest: &str) -> Result<(String, u64), Error> {
        let d: kiln_cache::Digest = digest.parse()?;
        let bytes = self.open_images()?.content().read(&d)?;
        let size = bytes.len() as u64;
        let raw = kiln_image::manifest::RawManifest::new(bytes, None)?;
        Ok((raw.media_type, size))
    }

    /// Each layer's uncompressed size (docker's sizes).
    pub fn layer_sizes(&self, image: &ImageInfo) -> Result<Vec<u64>, Error> {
        layer_sizes(&self.open_images()?, image)
    }

    /// The image's size: the sum of its layers' uncompressed sizes
    /// (docker's `SIZE` and `.Size`).
    pub fn image_size(&self, image: &ImageInfo) -> Result<u64, Error> {
        Ok(self.layer_sizes(image)?.iter().sum())
    }

    /// The image and its history, oldest first, each entry with the size
    /// of the layer it made.
    pub fn history(&self, reference: &str) -> Result<(ImageInfo, Vec<HistoryEntry>), Error> {
        self.history_for(reference, None)
    }

    /// [`Session::history`] of `platform`'s image of an index.
    pub fn history_for(
        &self,
        reference: &str,
        platform: Option<&Platform>,
    ) -> Result<(ImageInfo, Vec<HistoryEntry>), Error> {
        let store = self.open_images()?;
        let l = find_for(&store, reference, platform)?;
        let mut sizes = layer_sizes(&store, &l)?.into_iter();
        let rows = l
            .config
            .history
            .iter()
            .map(|h| HistoryEntry {
                entry: h.clone(),
                size: if h.empty_layer {
                    0
                } else {
                    sizes.next().unwrap_or(0)
                },
            })
            .collect();
        Ok((l, rows))
    }

    /// Gives the image `source` (name or ID) the name `target`.
    pub fn tag(&self, source: &str, target: &str) -> Result<(), Error> {
        let store = self.open_images()?;
        let l = find(&store, source)?;
        let name = tag_name(target).map_err(invalid("tag", target))?;
        if !l.platforms.is_empty() {
            // An index: the new name points at the same index.
            let id: kiln_cache::Digest = l.stored_digest.parse()?;
            store.meta().tag_image(&name, &id, None)?;
            return Ok(());
        }
        let md: kiln_cache::Digest = l.manifest_digest.parse()?;
        let cd: kiln_cache::Digest = l.config_digest.parse()?;
        let layers = l
            .manifest
            .layers
            .iter()
            .map(|d| store_digest(&d.digest))
            .collect::<Result<Vec<_>, _>>()?;
        store.record_image(&name, &md, &cd, &layers)?;
        Ok(())
    }

    /// Removes names of an image (`kiln rmi`): the name given, or every
    /// name of an image given by ID (which needs `force` when it has
    /// several); an untagged image given by ID is removed. Returns the
    /// names removed and, when the image has no record left, its ID
    /// (docker's "Deleted:"); the data goes with the next prune.
    pub fn untag(&self, reference: &str, force: bool) -> Result<Removed, Error> {
        let store = self.open_images()?;
        let l = find(&store, reference)?;
        if l.names.is_empty() {
            store.meta().untag_image(&l.key)?;
            return Ok(Removed {
                untagged: Vec::new(),
                deleted: Some(l.config_digest),
            });
        }
        let by_name = normalize_reference(reference)
            .ok()
            .filter(|n| l.names.contains(n));
        let names = match by_name {
            Some(n) => vec![n],
            None if l.names.len() > 1 && !force => {
                let id: String = l
                    .config_digest
                    .trim_start_matches("sha256:")
                    .chars()
                    .take(12)
                    .collect();
                return Err(Error::MustForce(id));
            }
            None => l.names.clone(),
        };
        for n in &names {
            store.meta().untag_image(n)?;
        }
        let deleted = (names.len() == l.names.len()).then(|| l.config_digest.clone());
        Ok(Removed {
            untagged: names,
            deleted,
        })
    }

    /// Loads a docker-archive or OCI layout tar (plain, gzip or zstd):
    /// every blob verified and stored, every image named (an unnamed one
    /// under its ID). `loaded` hears of each name as it is recorded.
    pub fn load(&self, archive: &Path, loaded: &mut dyn FnMut(Loaded)) -> Result<(), Error> {
        let file = std::fs::File::open(archive).map_err(|source| Error::Open {
            path: archive.to_path_buf(),
            source,
        })?;
        self.load_from(Box::new(file), archive, loaded)
    }

    /// [`Session::load`] of an archive read from `input` (stdin: `kiln
    /// load < image.tar`); `what` names it in errors.
    pub fn load_from(
        &self,
        input: Box<dyn Read>,
        what: &Path,
        loaded: &mut dyn FnMut(Loaded),
    ) -> Result<(), Error> {
        self.load_inner(input, what, loaded)
            .map_err(|e| self.explain_no_space(e))
    }

    fn load_inner(
        &self,
        input: Box<dyn Read>,
        path: &Path,
        loaded: &mut dyn FnMut(Loaded),
    ) -> Result<(), Error> {
        let store = self.open_images()?;
        // The lease keeps what we write from a concurrent prune until
        // tagged; the GC guard keeps prune from reclaiming our spill
        // directory.
        let store = store.leased(None)?;
        let _gc = store.gc_guard()?;
        use kiln_image::archive::BlobSource;
        let archive =
            kiln_image::archive::read_archive(input, store.tmp_dir()).map_err(|source| {
                LoadError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        if archive.images.is_empty() {
            return Err(LoadError::Empty(path.to_path_buf()).into());
        }
        // Every image checked and stored first, then every name recorded:
        // a bad image anywhere in the archive moves no name (the lease
        // keeps the stored blobs from prune until then; unnamed, the next
        // prune takes them). A name pinned to a digest must be the image's
        // own (docker refuses digest references as tags).
        let mut named = Vec::new();
        for img in &archive.images {
            let mut names = Vec::new();
            for n in &img.names {
                names.push(tag_name(n).map_err(|source| LoadError::Name {
                    name: n.clone(),
                    source,
                })?);
            }
            named.push(names);
        }
        let mut stored = Vec::new();
        for img in &archive.images {
            let man = img.manifest.manifest().map_err(LoadError::Manifest)?;
            let what = img
                .names
                .first()
                .cloned()
                .unwrap_or_else(|| man.config.digest.to_string());
            check_uncompressed_diff_ids(&what, &man, &img.config)?;
            let mut layers = Vec::new();
            for desc in std::iter::once(&man.config).chain(&man.layers) {
                let want = store_digest(&desc.digest)?;
                let size = archive
                    .blob_size(&desc.digest)
                    .map_err(|_| LoadError::MissingBlob(desc.digest.clone()))?;
                if size != desc.size {
                    return Err(LoadError::SizeMismatch {
                        what,
                        digest: desc.digest.clone(),
                        size,
                        want: desc.size,
                    }
                    .into());
                }
                // The archive's files were hashed as they were read: each
                // is taken into the store as it is (no copy), replacing a
                // stored copy that may have gone bad.
                let file = archive
                    .blob_file(&desc.digest)
                    .ok_or_else(|| LoadError::MissingBlob(desc.digest.clone()))?;
                store
                    .put_blob_file(file, &want, desc.size, Some(&desc.media_type))
                    .map_err(|source| LoadError::Store {
                        digest: desc.digest.clone(),
                        source,
                    })?;
                layers.push(want);
            }
            let config = layers.remove(0);
            // Each layer proved to be its config's before any name moves
            // (a compressed layer's diffID was not checked before).
            let cfg = ImageConfig::from_bytes(&img.config).map_err(|source| LoadError::Config {
                what: what.clone(),
                source,
            })?;
            crate::store::prove_layers(&store, &man.layers, &cfg.rootfs.diff_ids).map_err(
                |(index, source)| LoadError::Layer {
                    what: what.clone(),
                    index,
                    source,
                },
            )?;
            let manifest = store.put_bytes(&img.manifest.bytes, Some(&img.manifest.media_type))?;
            stored.push((manifest, config, layers));
        }
        for ((manifest, config, layers), names) in stored.iter().zip(named) {
            if names.is_empty() {
                // Keep it reachable: an untagged load would be pruned at
                // once.
                store.record_untagged(manifest, config, layers)?;
                loaded(Loaded::Untagged(config.clone()));
            }
            for name in names {
                store.record_image(&name, manifest, config, layers)?;
                loaded(Loaded::Named(name));
            }
        }
        Ok(())
    }

    /// Imports a root filesystem tar (plain, gzip or zstd) read from
    /// `input` as a one-layer image named `name`, with `changes` (one
    /// Dockerfile instruction each) applied to its config and `message`
    /// in its history. `what` names the input in errors. Returns the
    /// image ID.
    pub fn import(
        &self,
        input: Box<dyn Read>,
        what: &str,
        name: &str,
        message: Option<String>,
        changes: &[String],
    ) -> Result<kiln_cache::Digest, Error> {
        self.import_inner(input, what, name, message, changes, None)
            .map_err(|e| self.explain_no_space(e))
    }

    /// [`Session::import`] with the config naming `platform` (default: the
    /// host's), as `docker import --platform`.
    pub fn import_for(
        &self,
        input: Box<dyn Read>,
        what: &str,
        name: &str,
        message: Option<String>,
        changes: &[String],
        platform: Option<Platform>,
    ) -> Result<kiln_cache::Digest, Error> {
        self.import_inner(input, what, name, message, changes, platform)
            .map_err(|e| self.explain_no_space(e))
    }

    fn import_inner(
        &self,
        input: Box<dyn Read>,
        what: &str,
        name: &str,
        message: Option<String>,
        changes: &[String],
        platform: Option<Platform>,
    ) -> Result<kiln_cache::Digest, Error> {
        let name = tag_name(name).map_err(|source| LoadError::Name {
            name: name.to_string(),
            source,
        })?;
        // The changes first: a bad one fails before the tar is read.
        let mut config = kiln_image::config::ContainerConfig::default();
        crate::change::apply_changes(&mut config, changes)?;
        let store = self.open_images()?;
        let store = store.leased(None)?;
        let _gc = store.gc_guard()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let opts = kiln_image::rootfs_tar::ImportOptions {
            created: Some(kiln_image::config::rfc3339(now)),
            comment: message,
            config: Some(config),
            platform,
            ..Default::default()
        };
        let mut writer = store.content().writer()?;
        let imported =
            kiln_image::rootfs_tar::import_rootfs(input, &mut writer, &opts).map_err(|source| {
                Error::Import {
                    what: what.to_string(),
                    source,
                }
            })?;
        let layer = store_digest(&imported.layer.digest)?;
        let (layer, _) = store.commit_blob(
            writer,
            Some(&layer),
            Some(imported.layer.size),
            Some(&imported.layer.media_type),
        )?;
        let config = store.put_bytes(&imported.config, None)?;
        let manifest = store.put_bytes(
            &imported.manifest.bytes,
            Some(&imported.manifest.media_type),
        )?;
        store.record_image(&name, &manifest, &config, &[layer])?;
        Ok(config)
    }

    /// Pulls `reference` for the host platform (or `opts.platform`; or,
    /// with `opts.all_platforms`, every platform of an index, the name
    /// then pointing at the index) into the store and names it there;
    /// notes and blob transfers go to the session's reporter.
    pub fn pull(&self, reference: &str, opts: &TransferOptions) -> Result<PullResult, Error> {
        crate::transfer::fetch_insecure_registries(&opts.insecure_registries);
        let cfg = RegistryConfig::load(&opts.insecure_registries)?.with_cancel(opts.cancel.clone());
        let store = self.open_images()?;
        let store = store.leased(None)?;
        let name = normalize_reference(reference).map_err(invalid("reference", reference))?;
        let report = self.reporter();
        report.note(&format!("pulling {name}"));
        let progress = |t| report.transfer("pull", t);
        let r = if opts.all_platforms {
            transfer::pull_all_platforms(&store, &cfg, &name, opts.jobs, &progress)
        } else {
            transfer::pull_platform(
                &store,
                &cfg,
                &name,
                opts.platform.as_ref(),
                opts.jobs,
                &progress,
            )
        }
        .map_err(|e| {
            if opts.cancel.is_cancelled() {
                Error::Cancelled
            } else {
                Error::Transfer(e)
            }
        })?;
        // docker's RepoDigests: the digest the registry gave for the name.
        if let Some(rec) = store.meta().image(&r.name)? {
            let d = r.index_digest.as_ref().unwrap_or(&r.manifest_digest);
            store
                .meta()
                .put_repo_digest(&rec.manifest, repository(&r.name), d.as_str())?;
        }
        Ok(r)
    }

    /// Records that the stored image `image` (name or ID) was pushed to
    /// `destination` with manifest digest `digest` (its RepoDigests).
    pub fn record_push(&self, image: &str, destination: &str, digest: &str) -> Result<(), Error> {
        let store = self.open_images()?;
        let l = find(&store, image)?;
        let dest = normalize_reference(destination).map_err(invalid("destination", destination))?;
        store
            .meta()
            .put_repo_digest(&l.stored_digest, repository(&dest), digest)?;
        Ok(())
    }

    /// Pushes the stored image `image` to `destination` (default: its own
    /// name), layers encoded as `encoding` says; returns the destination
    /// and the pushed manifest's digest.
    pub fn push(
        &self,
        image: &str,
        destination: Option<&str>,
        encoding: LayerEncoding,
        opts: &TransferOptions,
    ) -> Result<(String, kiln_image::Digest), Error> {
        crate::transfer::fetch_insecure_registries(&opts.insecure_registries);
        let cfg = RegistryConfig::load(&opts.insecure_registries)?.with_cancel(opts.cancel.clone());
        let store = self.open_images()?;
        // A name, or (with a destination) an ID.
        let found = find(&store, image)?;
        let name = match normalize_reference(image) {
            Ok(n) if found.names.contains(&n) => n,
            _ => found.key.clone(),
        };
        let dest = match destination {
            Some(d) => d,
            None if found.names.contains(&name) => name.as_str(),
            None => {
                return Err(Error::NoDestination(image.to_string()));
            }
        };
        let dest = normalize_reference(dest).map_err(invalid("destination", dest))?;
        // A name that points at an index goes out whole: every stored
        // platform's image, then the index.
        let stored = store
            .meta()
            .image(&name)?
            .ok_or_else(|| Error::NoSuchImage(name.clone()))?;
        let sel = crate::platforms::select(&store, &stored.manifest, None, true)?;
        if let Some(index) = sel.index {
            let platforms: Vec<String> = sel.platforms.iter().map(|p| p.to_string()).collect();
            let report = self.reporter();
            report.note(&format!(
                "pushing {name} ({}) to {dest}",
                platforms.join(", ")
            ));
            let d = transfer::push_index(
                &store,
                &cfg,
                &index,
                &dest,
                encoding,
                opts.jobs,
                &|line| report.note(line),
                &|t| report.transfer("push", t),
            )
            .map_err(|e| {
                if opts.cancel.is_cancelled() {
                    Error::Cancelled
                } else {
                    Error::Transfer(e)
                }
            })?;
            store
                .meta()
                .put_repo_digest(&stored.manifest, repository(&dest), d.as_str())?;
            return Ok((dest, d));
        }
        let manifest = transfer::local_manifest(&store, &name).map_err(Error::Transfer)?;
        self.reporter().note(&format!("pushing {name} to {dest}"));
        let input = ExportInput {
            store: &store,
            images: vec![ArchiveImage {
                names: Vec::new(),
                manifest,
            }],
            source_date_epoch: None,
            cache: None,
        };
        let push: Box<dyn Exporter> = Box::new(RegistryExporter {
            registry: cfg,
            names: vec![dest.clone()],
            encoding,
            jobs: opts.jobs,
        });
        let done = export::run(&input, &[push], &*self.reporter()).map_err(|e| {
            if opts.cancel.is_cancelled() {
                Error::Cancelled
            } else {
                Error::Export(e)
            }
        })?;
        let d = done
            .pushed
            .into_iter()
            .next()
            .map(|(_, d)| d)
            .ok_or_else(|| Error::NothingPushed(dest.clone()))?;
        store
            .meta()
            .put_repo_digest(&stored.manifest, repository(&dest), d.as_str())?;
        Ok((dest, d))
    }

    /// Saves images (names or IDs) as a docker-archive or OCI layout tar
    /// to `dest`. Each image carries the name asked for, or all its names
    /// when asked for by ID, in docker's familiar form.
    pub fn save(&self, images: &[String], format: ArchiveFormat, dest: Dest) -> Result<(), Error> {
        self.save_for(images, format, dest, None)
    }

    /// [`Session::save`] of `platform`'s image of each index (default:
    /// the host's).
    pub fn save_for(
        &self,
        images: &[String],
        format: ArchiveFormat,
        dest: Dest,
        platform: Option<&Platform>,
    ) -> Result<(), Error> {
        let store = self.open_images()?;
        let mut out = Vec::new();
        for r in images {
            let l = find(&store, r)?;
            let l = read_image(&store, l.names.clone(), &l.stored_digest, platform, false)?;
            let md: kiln_cache::Digest = l.manifest_digest.parse()?;
            let bytes = store.content().read(&md)?;
            let raw = kiln_image::manifest::RawManifest::new(bytes, None)?;
            let names = match normalize_reference(r) {
                Ok(n) if l.names.contains(&n) => vec![n],
                _ => l.names.clone(),
            };
            let names = names
                .iter()
                .map(|n| {
                    let (repo, tag) = familiar(n);
                    format!("{repo}:{tag}")
                })
                .collect();
            out.push(ArchiveImage {
                names,
                manifest: raw,
            });
        }
        let exporter: Box<dyn Exporter> = Box::new(ArchiveExporter {
            format,
            // A failed or killed save leaves nothing under the name or
            // beside it.
            dest,
            names: None,
            encoding: None,
        });
        let input = ExportInput {
            store: &store,
            images: out,
            source_date_epoch: None,
            cache: None,
        };
        export::run(&input, &[exporter], &*self.reporter())?;
        Ok(())
    }

    /// Writes the stored image `image`'s final filesystem as one tar.
    pub fn export_filesystem(&self, image: &str, dest: Dest) -> Result<(), Error> {
        self.export_filesystem_for(image, dest, None)
    }

    /// [`Session::export_filesystem`] of `platform`'s image of an index
    /// (default: the host's).
    pub fn export_filesystem_for(
        &self,
        image: &str,
        dest: Dest,
        platform: Option<&Platform>,
    ) -> Result<(), Error> {
        let store = self.open_images()?;
        let l = find(&store, image)?;
        let manifest =
            crate::platforms::select(&store, &l.stored_digest, platform, false)?.manifest;
        let input = ExportInput {
            store: &store,
            images: vec![ArchiveImage {
                names: Vec::new(),
                manifest,
            }],
            source_date_epoch: None,
            cache: None,
        };
        let tar: Box<dyn Exporter> = Box::new(TarExporter {
            dest,
            rewrite_timestamp: false,
        });
        export::run(&input, &[tar], &*self.reporter())?;
        Ok(())
    }

    /// Removes unreferenced data and, per `opts`, build cache.
    pub fn prune(&self, opts: &kiln_cache::PruneOptions) -> Result<kiln_cache::PruneReport, Error> {
        Ok(self.open_images()?.prune(opts)?)
    }

    /// What uses the store's space.
    pub fn disk_usage(&self) -> Result<kiln_cache::DiskUsage, Error> {
        Ok(self.open_images()?.df()?)
    }

    /// Verifies the store (`deep`: every layer re-hashed against its
    /// diffID too).
    pub fn check_store(&self, deep: bool) -> Result<kiln_cache::CheckReport, Error> {
        Ok(self.open_images()?.check_with(deep)?)
    }

    /// How kiln runs here: the store's snapshotter, and whether this
    /// process is rootless (in a user namespace) with which id maps.
    pub fn system_info(&self) -> Result<SystemInfo, Error> {
        use kiln_fs::idmap::{describe, IdMaps, ENTERED_ENV};
        let store = self.open_images()?;
        let maps = IdMaps::current();
        let snapshotter = store.snapshotter().name().to_string();
        let entered = std::env::var(ENTERED_ENV).unwrap_or_default();
        let id_mapping = if !maps.in_userns {
            IdMapping::None
        } else if maps.single_id() {
            IdMapping::OneId
        } else if entered == "subids" {
            IdMapping::SubordinateIds
        } else {
            IdMapping::EnclosingNamespace
        };
        Ok(SystemInfo {
            root: self.root().to_path_buf(),
            overlay_xattrs: (snapshotter == "overlay").then(|| {
                maps.overlay_xattrs()
                    .prefix()
                    .trim_end_matches('.')
                    .to_string()
            }),
            snapshotter,
            rootless: maps.in_userns,
            id_mapping,
            uid_map: describe(&maps.uid_map),
            gid_map: describe(&maps.gid_map),
        })
    }
}

/// What [`Session::system_info`] reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemInfo {
    /// The store root.
    pub root: PathBuf,
    /// The store's snapshotter: `overlay` or `native`.
    pub snapshotter: String,
    /// The overlay's xattr namespace (`trusted.overlay` as real root,
    /// `user.overlay` rootless), for the overlay snapshotter.
    pub overlay_xattrs: Option<String>,
    /// Whether kiln runs in a user namespace (rootless).
    pub rootless: bool,
    /// Which ids that namespace has.
    pub id_mapping: IdMapping,
    /// The uid map, `inside:outside:count,…`.
    pub uid_map: String,
    /// The gid map.
    pub gid_map: String,
}

/// Which ids a rootless kiln's user namespace maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdMapping {
    /// Not in a user namespace: real root.
    None,
    /// The user as 0 and its subordinate ids (`newuidmap`).
    SubordinateIds,
    /// The ids of the namespace kiln started in (root of a container).
    EnclosingNamespace,
    /// One id (the one-id fallback): files of other ids cannot exist.
    OneId,
}

impl std::fmt::Display for IdMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IdMapping::None => "none (real root)",
            IdMapping::SubordinateIds => "subordinate ids",
            IdMapping::EnclosingNamespace => {
                "the ids of the enclosing user namespace (a container's)"
            }
            IdMapping::OneId => "one id (no subordinate ids: files of other ids cannot exist)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn familiar_names_drop_docker_hub_prefixes() {
        assert_eq!(
            familiar("docker.io/library/busybox:latest"),
            ("busybox".into(), "latest".into())
        );
        assert_eq!(
            familiar("docker.io/me/app:1"),
            ("me/app".into(), "1".into())
        );
        assert_eq!(
            familiar("localhost:5000/app"),
            ("localhost:5000/app".into(), "<none>".into())
        );
    }

    #[test]
    fn a_store_without_images_lists_none_and_finds_none() {
        let dir = tempfile::tempdir().unwrap();
        let s = Session::open(dir.path()).unwrap();
        assert!(s.images().unwrap().is_empty());
        assert!(matches!(
            s.find_image("busybox"),
            Err(Error::NoSuchImage(r)) if r == "busybox"
        ));
        assert!(matches!(
            s.find_image("UPPER CASE!"),
            Err(e) if e.is_usage()
        ));
    }
}
