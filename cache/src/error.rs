//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a path of the store.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("create", "rename", ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The metadata database failed.
    #[error("metadata database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A digest string that is not `sha256:<64 hex>`.
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
    /// Written content did not match what the caller said it would be.
    #[error("content mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The expected digest (and size).
        expected: String,
        /// What was actually written.
        actual: String,
    },
    /// A blob whose content is the digest it is named by, but not the
    /// size a descriptor claims for it: the claim is wrong, the blob is
    /// not (it stays where it is).
    #[error("blob {digest} is {actual} bytes, not the {claimed} its descriptor says")]
    WrongSize {
        /// The blob's digest.
        digest: String,
        /// The size claimed.
        claimed: u64,
        /// Its size.
        actual: u64,
    },
    /// A blob, snapshot, image or record that does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// "blob", "snapshot", "image", ...
        kind: &'static str,
        /// Its name or digest.
        name: String,
    },
    /// Something with this name already exists.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// "snapshot", ...
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// An operation not allowed in the object's current state (e.g.
    /// committing a committed snapshot, removing a snapshot with children).
    #[error("{0}")]
    InvalidState(String),
    /// An image reference that cannot be normalised.
    #[error("invalid reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The store's database was written by a newer kiln.
    #[error("store schema version {found} is newer than this kiln supports ({supported})")]
    SchemaTooNew {
        /// Version in the database.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },
    /// The filesystem ran out of space.
    #[error("no space left on the store's filesystem ({path}); free space or run `kiln prune`")]
    NoSpace {
        /// The path being written.
        path: PathBuf,
    },
    /// A layer's content is not the layer its image's config names: its
    /// uncompressed tar has another digest than the diffID. Nothing of it
    /// was kept.
    #[error(
        "layer {blob}: its content has diffID {actual}, but the image config says {expected}; \
         nothing was unpacked"
    )]
    DiffIdMismatch {
        /// The layer blob's digest.
        blob: String,
        /// The diffID the config names.
        expected: String,
        /// The digest of the content.
        actual: String,
    },
    /// A stored blob no longer matches its digest (a disk error, a change
    /// behind kiln's back).
    #[error("blob {digest} in the store is corrupt: its content is {actual}; {what_now}")]
    CorruptBlob {
        /// The blob's digest (its name in the store).
        digest: String,
        /// What its content hashes to (and its size).
        actual: String,
        /// What was done and what to do.
        what_now: String,
    },
    /// The store's directory belongs to another user than the one kiln
    /// runs as (root opening a rootless user's store, say): a store is
    /// its owner's alone; another's is neither trusted nor written.
    #[error(
        "the store at {path} belongs to uid {owner}, not to this kiln's uid {me}: stores are per user (pass --root with a store of your own)"
    )]
    ForeignStore {
        /// The store's root.
        path: PathBuf,
        /// Its owner (as seen here).
        owner: u32,
        /// The effective uid kiln runs as (as seen here).
        me: u32,
    },
    /// The store root is a directory with other files and no store in it
    /// (a `--root` that names, perhaps through a symlink another user
    /// planted, a directory such as `/etc`).
    #[error("{path} is not a kiln store (it holds other files and no meta.db): pass --root with an empty or new directory")]
    NotAStore {
        /// The store's root.
        path: PathBuf,
    },
    /// A layer format error from kiln-image.
    #[error("layer: {0}")]
    Image(String),
    /// A blob kept in a registry (a registry cache's layer, see
    /// [`crate::RemoteBlob`]) could not be fetched when it was needed.
    #[error(
        "blob {digest} is kept in the registry {} ({}), where a cache import found it, \
         and fetching it failed: {source}",
        from.registry,
        from.repo
    )]
    Fetch {
        /// The blob's digest.
        digest: String,
        /// Where it is kept.
        from: Box<crate::RemoteBlob>,
        /// Why the download failed (no fetcher on this handle, the
        /// network, a digest mismatch).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path and an operation name to an I/O error (turning ENOSPC into
/// [`Error::NoSpace`]).
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| io_err(op, path, source))
    }
}

pub(crate) fn io_err(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
    let path = path.into();
    if source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT) {
        Error::NoSpace { path }
    } else {
        Error::Io { op, path, source }
    }
}
