//! The crate error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in `kiln-image`.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O error while touching `path`.
    #[error("{op} {path}: {source}")]
    Path {
        /// What we were doing ("open", "mknod", ...).
        op: &'static str,
        /// The path involved (relative to a layer root where applicable).
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An I/O error on a stream (tar input, compressed output, ...).
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// A digest string that is not `sha256:<64 lowercase hex>`.
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
    /// A compression name that is not `gzip`, `zstd` or `uncompressed`.
    #[error("unknown compression {0:?} (expected gzip, zstd or uncompressed)")]
    UnknownCompression(String),
    /// A tar entry whose name or link target would leave the root.
    #[error("unsafe path in layer: {0}")]
    UnsafePath(String),
    /// Content whose digest or size differs from what was announced.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which object.
        what: String,
        /// The announced digest.
        expected: String,
        /// The computed digest.
        actual: String,
    },
    /// A config, manifest or index over its size limit
    /// ([`crate::config::MAX_CONFIG_SIZE`], [`crate::manifest::MAX_MANIFEST_SIZE`]).
    #[error("{what} is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        /// Which object (`image config`, `manifest`).
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// JSON (config, manifest, index, archive metadata) that does not parse.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// An upperdir feature the differ cannot express as a tar layer
    /// (overlay `redirect_dir` or `metacopy`).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A malformed archive (docker-archive / OCI layout).
    #[error("archive: {0}")]
    Archive(String),
    /// A manifest or index whose JSON says it is the other kind (both
    /// `manifests` and `layers`, or a `mediaType` of the other kind): one
    /// digest must name one image.
    #[error("ambiguous manifest: {0}")]
    Ambiguous(String),
    /// The work was cancelled (a [`crate::diff::Cancel`] fired).
    #[error("cancelled")]
    Cancelled,
}

impl ImageError {
    pub(crate) fn path(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Path {
            op,
            path: path.into(),
            source,
        }
    }
}
