//! Layer blobs: one streaming pass tar -> compress -> sha256 of both sides.

use std::io::{self, Read, Write};

use crate::compression::{Compression, CompressionOpts, Encoder};
use crate::digest::{Hasher, HashingWriter};
use crate::manifest::media_types;
use crate::{Digest, ImageError};

/// What [`encode_layer`] learned about the blob it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerDigests {
    /// sha256 of the uncompressed tar (goes into the config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// sha256 of the blob as written (goes into the manifest).
    pub digest: Digest,
    /// Size in bytes of the blob as written.
    pub size: u64,
    /// Size in bytes of the uncompressed tar.
    pub uncompressed_size: u64,
    /// The layer media type for the manifest.
    pub media_type: String,
}

/// The layer media type for `kind`. With Docker media types zstd still uses
/// the OCI zstd type (Docker schema2 has none; BuildKit does the same).
pub fn layer_media_type(kind: Compression, oci_media_types: bool) -> &'static str {
    match (kind, oci_media_types) {
        (Compression::Uncompressed, true) => media_types::OCI_LAYER,
        (Compression::Gzip, true) => media_types::OCI_LAYER_GZIP,
        (Compression::Zstd, _) => media_types::OCI_LAYER_ZSTD,
        (Compression::Uncompressed, false) => media_types::DOCKER_LAYER,
        (Compression::Gzip, false) => media_types::DOCKER_LAYER_GZIP,
    }
}

/// Read an uncompressed layer tar from `tar`, compress it into `out`, and
/// hash both sides on the way. Memory use is a fixed buffer plus the
/// compressor's window, whatever the layer size.
pub fn encode_layer(
    mut tar: impl Read,
    out: impl Write,
    opts: CompressionOpts,
    oci_media_types: bool,
) -> Result<LayerDigests, ImageError> {
    let mut diff = Hasher::new();
    let mut enc = Encoder::new(HashingWriter::new(out), opts)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match tar.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        diff.update(&buf[..n]);
        enc.write_all(&buf[..n])?;
    }
    let mut hw = enc.finish()?;
    hw.flush()?;
    let uncompressed_size = diff.len();
    let (_, digest, size) = hw.finish();
    Ok(LayerDigests {
        diff_id: diff.finish(),
        digest,
        size,
        uncompressed_size,
        media_type: layer_media_type(opts.kind, oci_media_types).to_string(),
    })
}
