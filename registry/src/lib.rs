//! # kiln-registry — the OCI distribution API
//!
//! **What this room is for.** Resolving image references to digests,
//! pulling and pushing manifests and blobs (HEAD checks, cross-repository
//! mounts, chunked uploads, retries), and authentication (anonymous, basic,
//! bearer tokens, `~/.docker/config.json` auths and credential helpers).
//!
//! **What it owns.** Everything that crosses the network to a registry:
//! the HTTP client (`ureq` on rustls/ring), TLS trust for every https
//! client kiln has ([`tls`]: the system store, `SSL_CERT_FILE`/`SSL_CERT_DIR`
//! and `certs.d/HOST:PORT/*.crt`), which hosts may use plain HTTP, the
//! pull mirrors of each registry (kiln's config file; tried in order by
//! [`Registry::through_mirrors`], never for pushes), and the reading and
//! writing of Docker's `config.json` credentials.
//!
//! **What it must not do.** It never writes the local store directly: blobs
//! flow through the [`BlobSink`] and [`PushSource`] traits whose
//! implementations live elsewhere (the solver), and it depends on no kiln
//! crate but `kiln-image`.
//!
//! **Where to start.** [`Registry::new`] (one client per registry host),
//! [`Registry::pull_image`], [`Registry::push_image`], [`RegistryConfig::load`].
//!
//! ```no_run
//! use kiln_registry::{Reference, Registry, RegistryConfig, Transfer};
//! use kiln_image::manifest::Platform;
//!
//! # fn main() -> Result<(), kiln_registry::RegistryError> {
//! let cfg = RegistryConfig::load(&[])?;
//! let r = Reference::parse("127.0.0.1:5000/busybox:latest")?;
//! let reg = Registry::new(&r.registry, &cfg)?;
//! let resolved = reg.resolve(&r, &Platform::host())?;
//! println!("{} -> {}", r, resolved.manifest.digest);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
// ureq's `Result<Response, ureq::Error>` (a large error) is passed on as
// ureq returns it, through the helpers that bound its requests.
#![allow(clippy::result_large_err)]

mod auth;
mod client;
pub mod config;
mod error;
pub mod http;
mod reference;
pub mod tls;
mod transfer;

pub use auth::{parse_challenge, Challenge};
pub use client::{
    ClientOptions, PushOutcome, Registry, StreamBody, VerifyingReader, MANIFEST_ACCEPT,
    MAX_WHOLE_BODY, MIRROR_RETRIES,
};
pub use config::{Credentials, RegistryConfig};
pub use error::{RegistryError, Result};
pub use reference::{api_host, Reference, ReferenceError, DOCKER_HUB};
pub use transfer::{BlobSink, Pulled, PushSource, Resolved, SinkError, Transfer};
