//! gzip on all cores, in the manner of pigz: the input is cut into blocks
//! of [`BLOCK`] bytes, each block is deflated on a worker (primed with the
//! previous block's last 32 KiB as its dictionary, ended with a sync flush
//! so the pieces join on a byte boundary), and the pieces are written in
//! order between one gzip header and one trailer whose CRC-32 is combined
//! from the blocks' CRCs. The result is a single ordinary gzip member.
//! Within a block, 64 KiB pieces that look incompressible (random or
//! already-compressed data) go out as stored deflate blocks instead of
//! being deflated.
//!
//! The bytes depend only on the input and the level — never on the number
//! of workers or on timing — so a layer compresses to the same digest on
//! every machine (the store memoises compressed layers by digest).
//!
//! The workers are the process's, shared by every stream (a push
//! compresses several layers at once: one set of workers per core, not
//! per layer), each keeping its deflate state for the next block; the
//! blocks' buffers come from and go back to [`crate::bufpool`].

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};

use crate::bufpool;

use flate2::{Compress, Crc, FlushCompress, Status};

/// Input bytes per independently deflated block.
pub const BLOCK: usize = 1 << 20;
/// The deflate window: how much of the previous block primes the next.
const WINDOW: usize = 32 * 1024;

/// A compressed block and its CRC-32, or why it failed.
type BlockResult = io::Result<(Vec<u8>, Crc)>;

/// One block's work and where its result goes.
struct Job {
    data: Vec<u8>,
    dict: Vec<u8>,
    last: bool,
    level: u32,
    reply: SyncSender<BlockResult>,
}

impl Job {
    /// Compresses the block, gives its input buffer back and sends the
    /// result.
    fn run(self) {
        let result = deflate_block(&self.data, &self.dict, self.last, self.level);
        bufpool::give(self.data);
        let _ = self.reply.send(result);
    }
}

/// The process's gzip workers (one per core, started at the first
/// stream that outgrows a block), or `None` when none could start.
fn workers() -> Option<&'static SyncSender<Job>> {
    static WORKERS: OnceLock<Option<SyncSender<Job>>> = OnceLock::new();
    WORKERS
        .get_or_init(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            let (tx, rx) = mpsc::sync_channel::<Job>(n);
            let rx = Arc::new(Mutex::new(rx));
            let mut started = 0;
            for _ in 0..n {
                let rx = rx.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("kiln-gzip".into())
                        .spawn(move || loop {
                            // The lock is held only while waiting for a job.
                            let job = match rx.lock() {
                                Ok(r) => r.recv(),
                                Err(_) => return,
                            };
                            let Ok(job) = job else { return };
                            job.run();
                        });
                if spawned.is_ok() {
                    started += 1;
                }
            }
            (started > 0).then_some(tx)
        })
        .as_ref()
}

/// A parallel gzip writer; [`ParGzEncoder::finish`] writes the trailer.
pub struct ParGzEncoder<W: Write> {
    out: Option<W>,
    level: u32,
    threads: usize,
    buf: Vec<u8>,
    /// The tail of the previous block (the next block's dictionary).
    dict: Vec<u8>,
    crc: Crc,
    /// Blocks go to the shared workers (set at the first full block).
    parallel: bool,
    pending: VecDeque<Receiver<BlockResult>>,
}

impl<W: Write> ParGzEncoder<W> {
    /// A gzip writer at `level` (0–9); with `threads` > 1 its blocks go to
    /// the process's workers once the input outgrows one block, up to
    /// `2 × threads` in flight (with 1, it compresses on the caller's
    /// thread). The header carries no name and mtime 0.
    pub fn new(mut out: W, level: u32, threads: usize) -> io::Result<Self> {
        // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=255 (unknown).
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
        Ok(ParGzEncoder {
            out: Some(out),
            level: level.min(9),
            threads: threads.max(1),
            buf: bufpool::take(BLOCK),
            dict: Vec::new(),
            crc: Crc::new(),
            parallel: false,
            pending: VecDeque::new(),
        })
    }

    /// The writer compressed blocks go to (they arrive in order, a few
    /// blocks behind the input).
    pub fn get_mut(&mut self) -> Option<&mut W> {
        self.out.as_mut()
    }

    fn out(&mut self) -> io::Result<&mut W> {
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::other("gzip stream already finished"))
    }

    /// Hands the current block to a worker (or compresses it here when
    /// single-threaded) and writes finished blocks in order.
    fn submit(&mut self, last: bool) -> io::Result<()> {
        let next = if last {
            Vec::new()
        } else {
            bufpool::take(BLOCK)
        };
        let data = std::mem::replace(&mut self.buf, next);
        let next_dict = if last {
            Vec::new()
        } else {
            data[data.len().saturating_sub(WINDOW)..].to_vec()
        };
        let dict = std::mem::replace(&mut self.dict, next_dict);
        let (reply, result) = mpsc::sync_channel(1);
        let job = Job {
            data,
            dict,
            last,
            level: self.level,
            reply,
        };
        // A stream of one block is compressed here, without workers.
        if self.threads > 1 && !last {
            self.parallel = true;
        }
        match workers().filter(|_| self.parallel) {
            Some(jobs) => {
                if let Err(mpsc::SendError(job)) = jobs.send(job) {
                    // No worker left: compress here.
                    job.run();
                }
            }
            None => job.run(),
        }
        self.pending.push_back(result);
        // Keep a bounded number of blocks in flight.
        while self.pending.len() > self.threads * 2 || (last && !self.pending.is_empty()) {
            self.collect_one()?;
        }
        Ok(())
    }

    fn collect_one(&mut self) -> io::Result<()> {
        let Some(rx) = self.pending.pop_front() else {
            return Ok(());
        };
        let (bytes, crc) = rx
            .recv()
            .map_err(|_| io::Error::other("a gzip worker stopped"))??;
        self.crc.combine(&crc);
        let written = self.out()?.write_all(&bytes);
        bufpool::give(bytes);
        written
    }

    /// Compresses what is left, writes the trailer, returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.submit(true)?;
        let (sum, amount) = (self.crc.sum(), self.crc.amount());
        let mut out = self
            .out
            .take()
            .ok_or_else(|| io::Error::other("gzip stream already finished"))?;
        out.write_all(&sum.to_le_bytes())?;
        out.write_all(&amount.to_le_bytes())?;
        Ok(out)
    }
}

impl<W: Write> Write for ParGzEncoder<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            let room = BLOCK - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == BLOCK {
                self.submit(false)?;
            }
        }
        Ok(total)
    }

    /// Writes the blocks already compressed; the current partial block
    /// stays buffered (flushing it would change the output's bytes).
    fn flush(&mut self) -> io::Result<()> {
        self.out()?.flush()
    }
}

/// Bytes per piece whose compressibility is judged on its own.
const PIECE: usize = 64 * 1024;
/// A piece is stored when `Σ count² × STORE_RATIO ≤ n²` over its byte
/// histogram: its collision (Rényi-2) entropy is at least
/// log2(251) ≈ 7.97 bits per byte. Random or already-compressed data
/// measures 7.99+ over 64 KiB; Huffman coding alone could save under
/// 0.3 % of such a piece (collision entropy never exceeds Shannon's), and
/// deflating it costs as much CPU as compressing text. The test is exact
/// integer arithmetic, so every machine makes the same choice and the
/// output's digest does not depend on a maths library. (A piece that
/// looks random but repeats itself within the 32 KiB window would
/// compress; such data is rare in layers, and storing it is still
/// correct.)
const STORE_RATIO: u64 = 251;

/// Bytes at the start of a piece that can settle the test alone.
const PROBE: usize = 4096;

/// Whether `piece` looks incompressible (see [`STORE_RATIO`]). A piece
/// whose first [`PROBE`] bytes are far from random (collision entropy
/// under about 7 bits per byte: text, tables, code) is judged on them
/// alone — deflated — without counting the rest; random data is about 30
/// standard deviations away from that line, so it is always counted in
/// full. The choice stays exact integer arithmetic over the piece's bytes.
fn incompressible(piece: &[u8]) -> bool {
    if piece.len() < PROBE {
        return false;
    }
    // Four histograms side by side, so that runs of one byte value do not
    // serialise on one counter.
    let mut h = [[0u32; 256]; 4];
    let (probe, rest) = piece.split_at(PROBE);
    count(&mut h, probe);
    let n = PROBE as u64;
    if collisions(&h).saturating_mul(STORE_RATIO) > 2 * n * n {
        return false;
    }
    count(&mut h, rest);
    let n = piece.len() as u64;
    collisions(&h).saturating_mul(STORE_RATIO) <= n * n
}

/// Adds the bytes of `data` to the histograms `h`.
fn count(h: &mut [[u32; 256]; 4], data: &[u8]) {
    let mut quads = data.chunks_exact(4);
    for q in &mut quads {
        h[0][q[0] as usize] += 1;
        h[1][q[1] as usize] += 1;
        h[2][q[2] as usize] += 1;
        h[3][q[3] as usize] += 1;
    }
    for &b in quads.remainder() {
        h[0][b as usize] += 1;
    }
}

/// Σ count² over the byte values of the histograms `h`.
fn collisions(h: &[[u32; 256]; 4]) -> u64 {
    let [a, b, c, d] = h;
    a.iter()
        .zip(b)
        .zip(c)
        .zip(d)
        .map(|(((a, b), c), d)| u64::from(a + b + c + d).pow(2))
        .sum()
}

/// Appends `data` as stored deflate blocks (the stream must be at a byte
/// boundary; it is again afterwards). `last` marks the final one.
fn store_blocks(out: &mut Vec<u8>, data: &[u8], last: bool) {
    let mut chunks = data.chunks(usize::from(u16::MAX)).peekable();
    while let Some(c) = chunks.next() {
        let fin = last && chunks.peek().is_none();
        let len = c.len() as u16;
        out.push(u8::from(fin)); // BFINAL, BTYPE=00 (stored), padding
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
}

/// Raw deflate of one block: primed with `dict`, ended with a sync flush
/// (more blocks follow) or the final block. Pieces of [`PIECE`] bytes that
/// look incompressible are stored as they are; runs of the others are
/// deflated. Returns the bytes and the block's CRC-32.
fn deflate_block(data: &[u8], dict: &[u8], last: bool, level: u32) -> BlockResult {
    let mut crc = Crc::new();
    crc.update(data);
    let mut out = bufpool::take(data.len() + data.len() / 8 + 64);
    let stored: Vec<bool> = data.chunks(PIECE).map(incompressible).collect();
    if data.is_empty() {
        // Nothing to add: just the sync flush or the final empty block.
        deflate_run(&mut out, data, dict, last, level)?;
        return Ok((out, crc));
    }
    let mut start = 0;
    let mut i = 0;
    while i < stored.len() {
        // A run of pieces with the same verdict.
        let verdict = stored.get(i).copied().unwrap_or(false);
        let mut j = i;
        while j < stored.len() && stored[j] == verdict {
            j += 1;
        }
        let end = (j * PIECE).min(data.len());
        let run = &data[start..end];
        let fin = last && end == data.len();
        if verdict {
            store_blocks(&mut out, run, fin);
        } else {
            // The window the decoder has at `start`: up to 32 KiB of what
            // came before, from this block and the previous one.
            let mut window = Vec::new();
            if start < WINDOW {
                window.extend_from_slice(&dict[dict.len().saturating_sub(WINDOW - start)..]);
            }
            window.extend_from_slice(&data[start.saturating_sub(WINDOW)..start]);
            deflate_run(&mut out, run, &window, fin, level)?;
        }
        start = end;
        i = j;
    }
    Ok((out, crc))
}

/// Deflates `data` into `out` primed with `dict`, ending with a sync flush
/// or, when `last`, the final block.
fn deflate_run(
    out: &mut Vec<u8>,
    data: &[u8],
    dict: &[u8],
    last: bool,
    level: u32,
) -> io::Result<()> {
    // This thread's deflate state from its last run, reset (a reset
    // stream compresses exactly as a new one: the output does not depend
    // on which thread ran before), else a new one.
    let mut c = DEFLATE
        .with(|d| d.borrow_mut().take())
        .filter(|(l, _)| *l == level)
        .map(|(_, mut c)| {
            c.reset();
            c
        })
        .unwrap_or_else(|| Compress::new(flate2::Compression::new(level), false));
    let r = deflate_with(&mut c, out, data, dict, last);
    if r.is_ok() {
        DEFLATE.with(|d| *d.borrow_mut() = Some((level, c)));
    }
    r
}

thread_local! {
    /// The deflate state a thread keeps between runs (with its level).
    static DEFLATE: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
}

fn deflate_with(
    c: &mut Compress,
    out: &mut Vec<u8>,
    data: &[u8],
    dict: &[u8],
    last: bool,
) -> io::Result<()> {
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    out.reserve(data.len() + data.len() / 8 + 64);
    let base = c.total_in();
    loop {
        let consumed = usize::try_from(c.total_in() - base).unwrap_or(usize::MAX);
        let rest = data.get(consumed..).unwrap_or_default();
        let status = c.compress_vec(rest, out, flush).map_err(io::Error::other)?;
        let all_in = c.total_in() - base == data.len() as u64;
        // Done when everything is in and the flush fit (zlib's rule: room
        // left in the output after a flush means it is complete).
        let done = match status {
            Status::StreamEnd => true,
            _ => !last && all_in && out.len() < out.capacity(),
        };
        if done {
            return Ok(());
        }
        out.reserve(out.capacity().max(64 * 1024));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut d = flate2::read::GzDecoder::new(bytes);
        let mut out = Vec::new();
        d.read_to_end(&mut out).expect("valid gzip");
        // One member: nothing after the trailer.
        assert!(d.into_inner().is_empty(), "trailing bytes after the member");
        out
    }

    fn sample(n: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_u64;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 100_000) % 2 == 0 {
                    (x & 0xff) as u8
                } else {
                    b"the quick brown fox "[i % 20]
                }
            })
            .collect()
    }

    fn encode(data: &[u8], threads: usize, chunks: usize) -> Vec<u8> {
        let mut e = ParGzEncoder::new(Vec::new(), 6, threads).expect("new");
        for piece in data.chunks(chunks.max(1)) {
            e.write_all(piece).expect("write");
        }
        e.finish().expect("finish")
    }

    #[test]
    fn round_trips_at_every_size() {
        for n in [0, 1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12_345] {
            let data = sample(n);
            assert_eq!(gunzip(&encode(&data, 2, 70_000)), data, "size {n}");
        }
    }

    #[test]
    fn a_kept_deflate_state_compresses_as_a_new_one() {
        let data = sample(2 * BLOCK + 99);
        let first = encode(&data, 1, 1 << 20);
        // The same thread again (its state kept and reset), at another
        // level in between, and on a new thread (a new state).
        let _ = encode(&data[..5000], 1, 1 << 20);
        let mut e = ParGzEncoder::new(Vec::new(), 1, 1).expect("new");
        e.write_all(&data[..BLOCK + 5]).expect("write");
        let _ = e.finish().expect("finish");
        assert_eq!(encode(&data, 1, 1 << 20), first);
        let other = std::thread::spawn(move || encode(&data, 1, 333))
            .join()
            .expect("thread");
        assert_eq!(other, first);
    }

    #[test]
    fn output_is_the_same_whatever_the_threads_or_write_sizes() {
        let data = sample(4 * BLOCK + 777);
        let one = encode(&data, 1, 4096);
        assert_eq!(encode(&data, 2, 1 << 20), one);
        assert_eq!(encode(&data, 5, 333_333), one);
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn random_data_is_stored_not_deflated() {
        let data = random(3 * BLOCK + 5_000, 7);
        let z = encode(&data, 2, 100_000);
        assert_eq!(gunzip(&z), data);
        // Stored blocks cost 5 bytes per 64 KiB, plus the joins.
        assert!(z.len() < data.len() + data.len() / 1000, "{}", z.len());
        assert!(incompressible(&data[..PIECE]));
    }

    #[test]
    fn text_after_random_still_uses_the_window() {
        // Random, then text that repeats a random stretch from just before
        // it: the deflated run must be primed with the stored bytes.
        let mut data = random(PIECE + 10_000, 3);
        let tail: Vec<u8> = data[data.len() - 20_000..].to_vec();
        data.extend_from_slice(&tail);
        data.extend_from_slice(&[b'x'; 50_000]);
        for (threads, chunk) in [(1, 4096), (2, 1 << 20)] {
            let z = encode(&data, threads, chunk);
            assert_eq!(gunzip(&z), data);
            // The repeat is found: about the random part's size, not
            // 20,000 bytes more.
            assert!(z.len() < PIECE + 10_000 + 4_000, "{}", z.len());
        }
        // A stream that ends in a stored piece has a stored final block.
        let mut ends_random = vec![b'a'; 200_000];
        ends_random.extend_from_slice(&random(2 * PIECE, 9));
        assert_eq!(gunzip(&encode(&ends_random, 2, 65_536)), ends_random);
        assert!(!incompressible(&ends_random[..PIECE]));
    }

    #[test]
    fn dictionary_keeps_the_ratio_of_one_stream() {
        let text: Vec<u8> = (0..6 * BLOCK).map(|i| b"abcdefgh01234"[i % 13]).collect();
        let par = encode(&text, 2, 1 << 16);
        let mut one = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        one.write_all(&text).expect("write");
        let one = one.finish().expect("finish");
        assert!(
            par.len() <= one.len() + 64 * 6,
            "{} vs {}",
            par.len(),
            one.len()
        );
    }
}
