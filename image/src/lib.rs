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
//!
//! **Where to start.** [`diff::write_overlay_diff`] (upperdir -> tar),
//! [`blob::encode_layer`] (tar -> compressed blob + digests),
//! [`apply::apply_layer`] (tar -> directory), [`config::ImageConfig`] and
//! [`manifest::ImageManifest`] (the JSON), [`archive`] (save/load formats),
//! [`rootfs_tar::import_rootfs`] (`kiln import`).
//!
//! ```no_run
//! use kiln_image::apply::{apply_layer, WhiteoutMode};
//! use kiln_image::blob::encode_layer;
//! use kiln_image::compression::{decompress_auto, Compression, CompressionOpts};
//! use kiln_image::diff::{write_overlay_diff, DiffOptions};
//! use std::path::Path;
//!
//! # fn main() -> Result<(), kiln_image::ImageError> {
//! // 1. the layer of a finished RUN step: walk only its upperdir
//! let mut tar = Vec::new(); // a pipe or temp file in real code
//! let opts = DiffOptions { clamp_mtime: Some(1_700_000_000), ..Default::default() };
//! write_overlay_diff(Path::new("/var/lib/kiln/snapshots/42/fs"), &mut tar, &opts)?;
//!
//! // 2. compress and hash both sides in one pass
//! let mut blob = Vec::new();
//! let d = encode_layer(&tar[..], &mut blob, CompressionOpts::new(Compression::Zstd), true)?;
//! println!("diffID {} digest {} ({} bytes, {})", d.diff_id, d.digest, d.size, d.media_type);
//!
//! // 3. unpack a pulled layer into a fresh overlay upperdir
//! let r = decompress_auto(std::io::Cursor::new(blob))?;
//! apply_layer(r, Path::new("/var/lib/kiln/snapshots/43/fs"), WhiteoutMode::Overlay)?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod apply;
pub mod archive;
pub mod blob;
pub mod bufpool;
pub mod compression;
pub mod config;
pub mod diff;
mod digest;
mod error;
pub mod manifest;
pub mod pargz;
pub mod platform;
pub mod reference;
pub mod rootfs_tar;
pub mod tarw;

pub use digest::{Digest, Hasher, HashingReader, HashingWriter};
pub use error::ImageError;
