//! Layer blobs: one streaming pass tar -> compress -> sha256 of both sides
//! (of the tar only when its reader does not verify itself).

use std::io::{self, Read, Write};

use crate::compression::{Compression, CompressionOpts, Encoder};
use crate::digest::Hasher;
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
/// hash both sides on the way. Memory use is bounded whatever the layer
/// size: a 1 MiB read buffer plus the compressor's blocks in flight (a
/// few MiB per core for gzip).
pub fn encode_layer(
    tar: impl Read,
    out: impl Write,
    opts: CompressionOpts,
    oci_media_types: bool,
) -> Result<LayerDigests, ImageError> {
    encode(tar, out, opts, oci_media_types, None)
}

/// [`encode_layer`] for a `tar` reader that checks its own bytes against
/// `diff_id` (failing the read on a mismatch): the tar is not hashed a
/// second time, and `diff_id` is reported as the layer's.
pub fn encode_verified_layer(
    tar: impl Read,
    out: impl Write,
    opts: CompressionOpts,
    oci_media_types: bool,
    diff_id: &Digest,
) -> Result<LayerDigests, ImageError> {
    encode(tar, out, opts, oci_media_types, Some(diff_id))
}

fn encode(
    tar: impl Read,
    mut out: impl Write,
    opts: CompressionOpts,
    oci_media_types: bool,
    verified: Option<&Digest>,
) -> Result<LayerDigests, ImageError> {
    let mut r = EncodingReader::new(tar, opts, oci_media_types, verified.cloned())?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    r.digests()
        .ok_or_else(|| ImageError::Io(io::Error::other("layer stream ended early")))
}

/// The capacity of an [`EncodingReader`]'s output buffers: one block of
/// the parallel gzip ([`crate::pargz::BLOCK`]) deflated at worst, with
/// room to spare.
const OUT_CAPACITY: usize = crate::pargz::BLOCK + crate::pargz::BLOCK / 4;

/// A layer tar compressed as it is read, for a consumer that pulls (an
/// upload whose digest is known only at its end). Both sides are hashed
/// on the way (the tar side unless its reader verifies itself); after the
/// end of the stream, [`EncodingReader::digests`] says what was produced.
pub struct EncodingReader<R> {
    src: R,
    enc: Option<Encoder<Vec<u8>>>,
    out: Vec<u8>,
    pos: usize,
    buf: Vec<u8>,
    diff: Hasher,
    tar_len: u64,
    known_diff: Option<Digest>,
    blob: Option<Hasher>,
    media_type: String,
    done: bool,
}

impl<R: Read> EncodingReader<R> {
    /// Compresses `tar` per `opts`. `verified`: the diffID, when `tar`
    /// checks its own bytes against it (then the tar is not hashed here).
    pub fn new(
        tar: R,
        opts: CompressionOpts,
        oci_media_types: bool,
        verified: Option<Digest>,
    ) -> io::Result<Self> {
        // The two output buffers take turns (the encoder writes into one
        // while the other is read out); each holds about one compressed
        // block, and comes from the pool so that it is not grown (and its
        // pages faulted in) again for every layer.
        Ok(EncodingReader {
            src: tar,
            enc: Some(Encoder::new(crate::bufpool::take(OUT_CAPACITY), opts)?),
            out: crate::bufpool::take(OUT_CAPACITY),
            pos: 0,
            buf: crate::bufpool::take_filled(1 << 20),
            diff: Hasher::new(),
            tar_len: 0,
            known_diff: verified,
            blob: Some(Hasher::new()),
            media_type: layer_media_type(opts.kind, oci_media_types).to_string(),
            done: false,
        })
    }

    /// For a consumer that hashes the compressed bytes itself (an upload
    /// does): they are not hashed here, and [`EncodingReader::digests`]
    /// has nothing to say; [`EncodingReader::tar_digest`] still does.
    pub fn without_blob_digest(mut self) -> Self {
        self.blob = None;
        self
    }

    /// The tar's digest (the diffID) and size, once the whole stream has
    /// been read.
    pub fn tar_digest(&self) -> Option<(Digest, u64)> {
        if !self.done {
            return None;
        }
        let diff_id = match &self.known_diff {
            Some(d) => d.clone(),
            None => self.diff.clone().finish(),
        };
        Some((diff_id, self.tar_len))
    }

    /// The layer's digests, once the whole stream has been read (and
    /// unless [`EncodingReader::without_blob_digest`]).
    pub fn digests(&self) -> Option<LayerDigests> {
        let (diff_id, uncompressed_size) = self.tar_digest()?;
        let blob = self.blob.as_ref()?;
        Some(LayerDigests {
            diff_id,
            digest: blob.clone().finish(),
            size: blob.len(),
            uncompressed_size,
            media_type: self.media_type.clone(),
        })
    }

    /// Feeds the encoder until it has output or the input ends.
    fn fill(&mut self) -> io::Result<()> {
        self.out.clear();
        self.pos = 0;
        while self.out.is_empty() {
            let Some(enc) = self.enc.as_mut() else {
                self.done = true;
                return Ok(());
            };
            let n = loop {
                match self.src.read(&mut self.buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            if n == 0 {
                let enc = self
                    .enc
                    .take()
                    .ok_or_else(|| io::Error::other("encoder gone"))?;
                let emptied = std::mem::replace(&mut self.out, enc.finish()?);
                crate::bufpool::give(emptied);
            } else {
                let piece = &self.buf[..n];
                if self.known_diff.is_none() {
                    self.diff.update(piece);
                }
                self.tar_len += n as u64;
                enc.write_all(piece)?;
                if let Some(produced) = enc.get_mut() {
                    std::mem::swap(&mut self.out, produced);
                }
            }
        }
        if let Some(h) = self.blob.as_mut() {
            h.update(&self.out);
        }
        Ok(())
    }
}

impl<R> Drop for EncodingReader<R> {
    fn drop(&mut self) {
        crate::bufpool::give(std::mem::take(&mut self.buf));
        crate::bufpool::give(std::mem::take(&mut self.out));
    }
}

impl<R: Read> EncodingReader<R> {
    /// The next piece of the compressed stream, lent rather than copied
    /// (what [`Read::read`] would copy out); empty at the end.
    pub fn next_chunk(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.out.len() {
            self.fill()?;
        }
        let start = self.pos;
        self.pos = self.out.len();
        Ok(&self.out[start..])
    }
}

impl<R: Read> Read for EncodingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos == self.out.len() {
            self.fill()?;
        }
        let n = (self.out.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
