//! Errors, worded so the user learns which registry refused and why.

use thiserror::Error;

/// Anything that went wrong talking to a registry.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The registry wants credentials, or rejected the ones sent (HTTP 401).
    #[error("{registry}: authentication required or credentials rejected (401){}: {detail}", hint_login(.registry))]
    Unauthorized {
        /// Registry host.
        registry: String,
        /// What the registry said.
        detail: String,
    },
    /// Authenticated, but not allowed (HTTP 403).
    #[error("{registry}: access denied (403): {detail}")]
    Forbidden {
        /// Registry host.
        registry: String,
        /// What the registry said.
        detail: String,
    },
    /// No such repository, tag, manifest or blob (HTTP 404).
    #[error("{registry}: {what} not found (404){}", fmt_detail(.detail))]
    NotFound {
        /// Registry host.
        registry: String,
        /// What was asked for (`manifest app:1.0`, `blob sha256:…`).
        what: String,
        /// What the registry said.
        detail: String,
    },
    /// Any other unexpected HTTP status.
    #[error("{registry}: HTTP {status} for {method} {url}{}", fmt_detail(.detail))]
    Status {
        /// Registry host.
        registry: String,
        /// The status code.
        status: u16,
        /// Request method.
        method: String,
        /// Request URL.
        url: String,
        /// What the registry said.
        detail: String,
    },
    /// Could not reach the registry (DNS, connect, TLS, dropped connection).
    #[error("{registry}: network error: {detail}")]
    Network {
        /// Registry host.
        registry: String,
        /// The transport error.
        detail: String,
    },
    /// The registry (or its token server) accepted no connection, or sent
    /// nothing, within the connect or idle timeout. Not retried: a server
    /// that stays silent would hold the command for retries × timeout.
    #[error("{registry}: timed out: {detail} (timeouts: KILN_CONNECT_TIMEOUT, KILN_IDLE_TIMEOUT)")]
    TimedOut {
        /// Registry host.
        registry: String,
        /// The request and what timed out.
        detail: String,
    },
    /// Content did not match its digest.
    #[error("{registry}: {what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Registry host.
        registry: String,
        /// What was being checked.
        what: String,
        /// Expected digest.
        expected: String,
        /// Actual digest.
        actual: String,
    },
    /// An index had no manifest for the wanted platform.
    #[error("{registry}: {reference} has no image for platform {platform}")]
    NoPlatform {
        /// Registry host.
        registry: String,
        /// The reference.
        reference: String,
        /// The wanted platform, `os/arch[/variant]`.
        platform: String,
    },
    /// The registry answered something that is not a valid manifest etc.
    #[error("{registry}: invalid response: {detail}")]
    Protocol {
        /// Registry host.
        registry: String,
        /// What was wrong.
        detail: String,
    },
    /// Reading or running a credential source failed.
    #[error("credentials: {0}")]
    Credentials(String),
    /// A configuration file (kiln's or docker's) is unreadable or invalid.
    #[error("config {path}: {detail}")]
    Config {
        /// The file.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// An image reference that cannot be parsed.
    #[error("invalid reference {0:?}: {1}")]
    Reference(String, String),
    /// Where the blobs go (or come from) failed.
    #[error("{0}")]
    Local(String),
    /// The transfer was cancelled ([`crate::RegistryConfig::cancel`]).
    #[error("{registry}: cancelled")]
    Cancelled {
        /// The registry.
        registry: String,
    },
    /// An image-format error.
    #[error(transparent)]
    Image(#[from] kiln_image::ImageError),
    /// The trusted CA certificates could not be read.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

fn hint_login(registry: &str) -> String {
    format!(" (try `kiln login {registry}`)")
}

fn fmt_detail(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(": {d}")
    }
}

impl RegistryError {
    /// Whether a retry could help (5xx, 429, network trouble).
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Network { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// Whether a failed [`crate::Registry::push_blob_streamed`] is worth
    /// repeating as an ordinary sized upload: the network failed, or the
    /// registry turned down the streamed body or its completion (not the
    /// start of the upload, and not for want of permission).
    pub fn stream_refused(&self) -> bool {
        match self {
            RegistryError::Network { .. } => true,
            RegistryError::Status { method, .. } => method != "POST",
            _ => false,
        }
    }
}

/// Result with [`RegistryError`].
pub type Result<T> = std::result::Result<T, RegistryError>;
