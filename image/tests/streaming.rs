//! encode_layer streams: a 200 MiB generated tar with flat memory. Alone in
//! its own test binary so no other test's allocations disturb the peak RSS.

use std::io::{Read, Write};

use kiln_image::blob::encode_layer;
use kiln_image::compression::{Compression, CompressionOpts};

/// A generated tar stream of 200 MiB (never materialised).
struct GenTar {
    files: u64,
    file_size: u64,
    pos: u64,
    state: u64,
}

impl GenTar {
    fn total(&self) -> u64 {
        self.files * (512 + self.file_size) + 1024
    }
}

impl Read for GenTar {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let total = self.total();
        if self.pos >= total {
            return Ok(0);
        }
        let per = 512 + self.file_size;
        let idx = self.pos / per;
        let off = self.pos % per;
        if idx >= self.files {
            let n = buf.len().min((total - self.pos) as usize);
            buf[..n].fill(0);
            self.pos += n as u64;
            return Ok(n);
        }
        if off < 512 {
            let mut h = tar::Header::new_ustar();
            h.set_path(format!("f{idx}"))
                .map_err(std::io::Error::other)?;
            h.set_size(self.file_size);
            h.set_mode(0o644);
            h.set_cksum();
            let hb = h.as_bytes();
            let n = buf.len().min(512 - off as usize);
            buf[..n].copy_from_slice(&hb[off as usize..off as usize + n]);
            self.pos += n as u64;
            return Ok(n);
        }
        let n = buf.len().min((per - off) as usize);
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            // half-random bytes: compressible but not trivially
            let v = (self.state & 0x0f0f_0f0f_0f0f_0f0f).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

struct CountSink(u64);
impl Write for CountSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// 200 MiB through encode_layer (zstd) with peak RSS growing far less than
/// the stream: nothing buffers a whole layer.
#[test]
fn streaming_200mib_flat_memory() {
    let before = vm_hwm_kib().unwrap_or(0);
    let gen = GenTar {
        files: 200,
        file_size: 1 << 20,
        pos: 0,
        state: 0x9e37_79b9_7f4a_7c15,
    };
    let total = gen.total();
    let mut sink = CountSink(0);
    let d = encode_layer(
        gen,
        &mut sink,
        CompressionOpts::new(Compression::Zstd),
        true,
    )
    .expect("encode");
    assert_eq!(d.uncompressed_size, total);
    assert_eq!(d.size, sink.0);
    let after = vm_hwm_kib().unwrap_or(0);
    let grew_mib = after.saturating_sub(before) / 1024;
    assert!(
        grew_mib < 64,
        "peak RSS grew by {grew_mib} MiB for a {} MiB stream",
        total >> 20
    );
}
