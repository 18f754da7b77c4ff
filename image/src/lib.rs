//! # kiln-image — OCI image formats
//!
//! **What this room is for.** Turning filesystem changes into OCI layers and
//! back: the overlay-aware differ (upperdir -> tar, whiteouts and opaque
//! directories translated), the applier (tar -> directory, safe against
//! hostile archives), gzip/zstd compression streamed with sha256 in one pass,
//! image config / manifest / index types (wrapping `oci-spec` where Docker
//! adds fields), and the `oci-layout` and `docker-archive` readers and
//! writers.
//!
//! **What it owns.** Byte formats and their digests.
//!
//! **What it must not do.** It does not decide where blobs live (that is
//! `kiln-cache`) or how they travel (that is `kiln-registry`), and depends on
//! no other kiln crate.
#![deny(missing_docs)]

pub mod apply;
pub mod archive;
pub mod blob;
pub mod compression;
pub mod config;
pub mod diff;
mod digest;
mod error;
pub mod manifest;
pub mod rootfs_tar;
pub mod tarw;

pub use digest::{Digest, Hasher, HashingReader, HashingWriter};
pub use error::ImageError;
