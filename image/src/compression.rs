//! Layer compression: gzip (flate2 on zlib-rs) and zstd, plus sniffing
//! decompression for layers of unknown encoding.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use crate::ImageError;

/// A layer compression algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// Plain tar.
    Uncompressed,
    /// gzip (RFC 1952), the universal default.
    #[default]
    Gzip,
    /// zstd (RFC 8878); needs OCI media types.
    Zstd,
}

impl FromStr for Compression {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            "uncompressed" => Ok(Compression::Uncompressed),
            other => Err(ImageError::UnknownCompression(other.to_string())),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Uncompressed => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// Compression choice plus an optional level (gzip 0-9, default 6; zstd
/// 1-22, default 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CompressionOpts {
    /// The algorithm.
    pub kind: Compression,
    /// The level; `None` takes the algorithm's default.
    pub level: Option<i32>,
}

impl CompressionOpts {
    /// `kind` at its default level.
    pub fn new(kind: Compression) -> Self {
        CompressionOpts { kind, level: None }
    }
}

/// The default gzip level (as `gzip` and Go's `compress/gzip`).
pub const GZIP_DEFAULT_LEVEL: i32 = 6;
/// The default zstd level.
pub const ZSTD_DEFAULT_LEVEL: i32 = 3;

/// A streaming compressor; call [`Encoder::finish`] to flush the trailer.
pub enum Encoder<W: Write> {
    /// Pass-through.
    Plain(W),
    /// gzip, on all cores ([`crate::pargz`]).
    Gzip(crate::pargz::ParGzEncoder<W>),
    /// zstd.
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    /// A compressor writing into `out`. The gzip header carries no name and
    /// mtime 0, so equal input gives equal output.
    pub fn new(out: W, opts: CompressionOpts) -> io::Result<Self> {
        Ok(match opts.kind {
            Compression::Uncompressed => Encoder::Plain(out),
            Compression::Gzip => {
                let level = opts.level.unwrap_or(GZIP_DEFAULT_LEVEL).clamp(0, 9) as u32;
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                Encoder::Gzip(crate::pargz::ParGzEncoder::new(out, level, threads)?)
            }
            Compression::Zstd => {
                let level = opts.level.unwrap_or(ZSTD_DEFAULT_LEVEL);
                let mut enc = zstd::stream::write::Encoder::new(out, level)?;
                enc.include_checksum(true)?;
                Encoder::Zstd(enc)
            }
        })
    }

    /// The writer the compressed bytes go to (for a caller that drains
    /// it between writes). `None` only after a failed finish.
    pub fn get_mut(&mut self) -> Option<&mut W> {
        match self {
            Encoder::Plain(w) => Some(w),
            Encoder::Gzip(g) => g.get_mut(),
            Encoder::Zstd(z) => Some(z.get_mut()),
        }
    }

    /// Write the trailer and return the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(w) => Ok(w),
            Encoder::Gzip(g) => g.finish(),
            Encoder::Zstd(z) => z.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(buf),
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(z) => z.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            Encoder::Gzip(g) => g.flush(),
            Encoder::Zstd(z) => z.flush(),
        }
    }
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Detect the compression of a stream from its first bytes.
pub fn sniff(prefix: &[u8]) -> Compression {
    if prefix.starts_with(&GZIP_MAGIC) {
        Compression::Gzip
    } else if prefix.starts_with(&ZSTD_MAGIC) {
        Compression::Zstd
    } else {
        Compression::Uncompressed
    }
}

/// A reader decompressing `r` according to `kind`.
pub fn decompress(r: impl Read + 'static, kind: Compression) -> io::Result<Box<dyn Read>> {
    Ok(match kind {
        Compression::Uncompressed => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(r))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
    })
}

/// Peek at the first bytes of `r` and return a reader that yields the
/// decompressed stream (gzip, zstd, or `r` itself when it is neither).
pub fn decompress_auto(r: impl Read + 'static) -> io::Result<Box<dyn Read>> {
    let (kind, r) = sniff_reader(r)?;
    decompress(r, kind)
}

/// A reader that replays sniffed bytes before the rest of the stream.
pub type Sniffed<R> = io::Chain<io::Cursor<Vec<u8>>, R>;

/// Read up to four bytes of `r`, sniff them, and give back a reader that
/// still yields the whole stream.
pub fn sniff_reader<R: Read>(mut r: R) -> io::Result<(Compression, Sniffed<R>)> {
    let mut prefix = vec![0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        match r.read(&mut prefix[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    prefix.truncate(got);
    let kind = sniff(&prefix);
    Ok((kind, io::Cursor::new(prefix).chain(r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        assert_eq!("gzip".parse::<Compression>().ok(), Some(Compression::Gzip));
        assert_eq!("zstd".parse::<Compression>().ok(), Some(Compression::Zstd));
        assert_eq!(
            "uncompressed".parse::<Compression>().ok(),
            Some(Compression::Uncompressed)
        );
        assert!("xz".parse::<Compression>().is_err());
    }

    #[test]
    fn round_trip_all_kinds_and_sniff() {
        let data = b"some layer bytes ".repeat(5000);
        for kind in [
            Compression::Uncompressed,
            Compression::Gzip,
            Compression::Zstd,
        ] {
            let mut enc = Encoder::new(Vec::new(), CompressionOpts::new(kind)).expect("enc");
            enc.write_all(&data).expect("write");
            let blob = enc.finish().expect("finish");
            assert_eq!(sniff(&blob), kind);
            let mut out = Vec::new();
            decompress_auto(io::Cursor::new(blob))
                .expect("dec")
                .read_to_end(&mut out)
                .expect("read");
            assert_eq!(out, data, "{kind}");
        }
        // tiny inputs shorter than the magic
        let mut out = Vec::new();
        decompress_auto(io::Cursor::new(vec![1u8]))
            .expect("dec")
            .read_to_end(&mut out)
            .expect("read");
        assert_eq!(out, vec![1u8]);
    }

    #[test]
    fn gzip_output_is_deterministic() {
        let enc = |d: &[u8]| {
            let mut e =
                Encoder::new(Vec::new(), CompressionOpts::new(Compression::Gzip)).expect("e");
            e.write_all(d).expect("w");
            e.finish().expect("f")
        };
        assert_eq!(enc(b"abc"), enc(b"abc"));
    }
}
