//! A pipe between two threads of this process that moves whole buffers
//! (no kernel copy, no wake-up per 64 KiB as with an OS pipe). Emptied
//! buffers go back to the writer, so a long stream reuses a few buffers
//! instead of allocating (and page-faulting) a fresh one per mebibyte;
//! they come from and go back to [`kiln_image::bufpool`], so the next
//! stream (the next layer of a push) reuses them too.

use std::io::{self, Read, Write};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};

use kiln_image::bufpool;

/// Bytes per buffer handed across.
const CHUNK: usize = 1 << 20;
/// Buffers in flight before the writer waits.
const DEPTH: usize = 4;

/// A connected writer/reader pair.
pub(crate) fn chunk_pipe() -> (ChunkWriter, ChunkReader) {
    let (tx, rx) = sync_channel(DEPTH);
    let (back_tx, back_rx) = channel();
    (
        ChunkWriter {
            tx: Some(tx),
            back: back_rx,
            buf: bufpool::take(CHUNK),
        },
        ChunkReader {
            rx,
            back: back_tx,
            cur: Vec::new(),
            pos: 0,
        },
    )
}

/// The writing end: buffers [`CHUNK`] bytes and hands them over. What is
/// buffered goes across on [`Write::flush`] or drop; the reader sees the
/// end of the stream once the writer is dropped.
pub(crate) struct ChunkWriter {
    tx: Option<SyncSender<Vec<u8>>>,
    /// Buffers the reader has emptied.
    back: Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = match self.back.try_recv() {
            Ok(mut b) => {
                b.clear();
                b
            }
            Err(_) => bufpool::take(CHUNK),
        };
        let full = std::mem::replace(&mut self.buf, next);
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away");
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(full)
            .map_err(|_| gone())
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = (CHUNK - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        let _ = self.send();
        bufpool::give(std::mem::take(&mut self.buf));
        while let Ok(b) = self.back.try_recv() {
            bufpool::give(b);
        }
    }
}

impl Drop for ChunkReader {
    fn drop(&mut self) {
        bufpool::give(std::mem::take(&mut self.cur));
        while let Ok(b) = self.rx.try_recv() {
            bufpool::give(b);
        }
    }
}

/// The reading end.
pub(crate) struct ChunkReader {
    rx: Receiver<Vec<u8>>,
    back: Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChunkReader {
    /// Make `cur[pos..]` non-empty; false at the end of the stream.
    fn fill(&mut self) -> bool {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(next) => {
                    let done = std::mem::replace(&mut self.cur, next);
                    if done.capacity() > 0 {
                        // The writer may be gone already: then it is freed.
                        let _ = self.back.send(done);
                    }
                    self.pos = 0;
                }
                Err(_) => return false, // writer dropped: end of stream
            }
        }
        true
    }

    /// Hands the unread bytes of the stream to `f`, buffer by buffer
    /// without copying them, until the writer is gone.
    pub(crate) fn for_each_chunk(&mut self, mut f: impl FnMut(&[u8])) {
        while self.fill() {
            f(&self.cur[self.pos..]);
            self.pos = self.cur.len();
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() || !self.fill() {
            return Ok(0);
        }
        let n = (self.cur.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_every_byte_in_order_and_ends() {
        let (mut w, mut r) = chunk_pipe();
        let data: Vec<u8> = (0..3 * CHUNK + 123).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let t = std::thread::spawn(move || {
            for piece in sent.chunks(70_001) {
                w.write_all(piece).expect("write");
            }
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).expect("read");
        t.join().expect("writer");
        assert_eq!(got, data);
    }

    #[test]
    fn chunks_are_handed_over_whole_and_buffers_come_back() {
        let (mut w, mut r) = chunk_pipe();
        let data: Vec<u8> = (0..5 * CHUNK + 7).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let t = std::thread::spawn(move || {
            for piece in sent.chunks(300_001) {
                w.write_all(piece).expect("write");
            }
        });
        let mut got = Vec::new();
        let mut reads = 0;
        // Take a little through Read first: for_each_chunk goes on from there.
        let mut head = [0u8; 10];
        r.read_exact(&mut head).expect("head");
        got.extend_from_slice(&head);
        r.for_each_chunk(|c| {
            reads += 1;
            got.extend_from_slice(c);
        });
        t.join().expect("writer");
        assert_eq!(got, data);
        assert!(reads <= 6, "{reads} chunks");
    }

    #[test]
    fn a_gone_reader_is_a_broken_pipe() {
        let (mut w, r) = chunk_pipe();
        drop(r);
        let e = w.write_all(&vec![0u8; CHUNK]).expect_err("no reader");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
