//! A pipe between two threads of this process that moves whole buffers
//! (no kernel copy, no wake-up per 64 KiB as with an OS pipe).

use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// Bytes per buffer handed across.
const CHUNK: usize = 1 << 20;
/// Buffers in flight before the writer waits.
const DEPTH: usize = 4;

/// A connected writer/reader pair.
pub(crate) fn chunk_pipe() -> (ChunkWriter, ChunkReader) {
    let (tx, rx) = sync_channel(DEPTH);
    (
        ChunkWriter {
            tx: Some(tx),
            buf: Vec::with_capacity(CHUNK),
        },
        ChunkReader {
            rx,
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
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
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
    }
}

/// The reading end.
pub(crate) struct ChunkReader {
    rx: Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(next) => {
                    self.cur = next;
                    self.pos = 0;
                }
                Err(_) => return Ok(0), // writer dropped: end of stream
            }
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
    fn a_gone_reader_is_a_broken_pipe() {
        let (mut w, r) = chunk_pipe();
        drop(r);
        let e = w.write_all(&vec![0u8; CHUNK]).expect_err("no reader");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
