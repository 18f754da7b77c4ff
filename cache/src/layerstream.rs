//! A layer digested while its files are written: a COPY into a fresh
//! overlay upperdir describes each entry as it makes it, in the order the
//! overlay differ walks ([`kiln_image::diff::write_overlay_diff`]), and
//! hands over the bytes it writes; the tar of those entries is hashed on
//! a second thread as they come. The commit then needs neither a second
//! read of the files nor a second sha256 pass.
//!
//! The digest is only used when it describes the upperdir exactly: at
//! the end the upperdir is walked as the differ walks it, headers only
//! (names, types, modes, owners, mtimes, sizes, link targets, xattrs,
//! hard links; no content read), and the fingerprint of those headers
//! must equal that of the entries streamed. Content is what the writer
//! wrote into files it created itself (or what it read from the files it
//! hard-linked), the same bytes that went into the hash. Anything else
//! — an entry the stream could not describe, a mismatch — gives `None`
//! and the commit diffs the snapshot as before.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;

use kiln_image::diff::DiffOptions;
use kiln_image::tarw::{Kind, Meta, TarWriter};

use crate::chunkpipe::{chunk_pipe, ChunkWriter};
use crate::{Digest, Hasher, Usage};

/// The layer a [`LayerStream`] digested: what a commit would otherwise
/// compute by diffing the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamedDiff {
    /// sha256 of the uncompressed layer tar.
    pub diff_id: Digest,
    /// Size of that tar.
    pub size: u64,
    /// Disk usage of the upperdir, as the differ's walk measures it.
    pub usage: Option<Usage>,
}

/// A layer tar hashed as its entries are written (see the module doc).
pub struct LayerStream {
    tar: Option<TarWriter<ChunkWriter>>,
    hasher: Option<std::thread::JoinHandle<(Digest, u64)>>,
    headers: Hasher,
    clamp: Option<i64>,
    /// Regular files streamed so far, by (device, inode): a second name
    /// of one is a hard-link entry, as the differ writes it.
    links: HashMap<(u64, u64), Vec<u8>>,
    live: bool,
}

impl std::fmt::Debug for LayerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerStream")
            .field("live", &self.live)
            .finish()
    }
}

impl LayerStream {
    /// A stream for a layer whose mtimes are clamped to `clamp_mtime`
    /// (the commit's [`DiffOptions::clamp_mtime`]).
    pub fn start(clamp_mtime: Option<i64>) -> Self {
        let (w, mut r) = chunk_pipe();
        let hasher = std::thread::spawn(move || {
            let mut h = Hasher::new();
            r.for_each_chunk(|c| h.update(c));
            let len = h.len();
            (h.finish(), len)
        });
        LayerStream {
            tar: Some(TarWriter::new(w)),
            hasher: Some(hasher),
            headers: Hasher::new(),
            clamp: clamp_mtime,
            links: HashMap::new(),
            live: true,
        }
    }

    /// Whether entries are still being streamed (no [`LayerStream::give_up`]).
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Stops streaming: the writer met something it does not describe
    /// here (the commit diffs the snapshot instead).
    pub fn give_up(&mut self) {
        self.live = false;
        self.tar = None;
    }

    fn clamp(&self, t: i64) -> i64 {
        match self.clamp {
            Some(c) if t > c => c,
            _ => t,
        }
    }

    fn put(&mut self, meta: &Meta, data: Option<&mut dyn Read>) -> io::Result<()> {
        let Some(tar) = self.tar.as_mut() else {
            return Ok(());
        };
        meta.fingerprint(&mut self.headers);
        tar.append(meta, data)
    }

    /// A directory at `path` (relative to the layer root) with its final
    /// mode, owner and mtime.
    pub fn dir(&mut self, path: &[u8], mode: u32, owner: (u32, u32), mtime: i64) -> io::Result<()> {
        let m = Meta {
            path: path.to_vec(),
            kind: Kind::Dir,
            mode: mode & 0o7777,
            uid: u64::from(owner.0),
            gid: u64::from(owner.1),
            mtime: self.clamp(mtime),
            xattrs: Vec::new(),
        };
        self.put(&m, None)
    }

    /// A symlink at `path` to `target`.
    pub fn symlink(
        &mut self,
        path: &[u8],
        target: &[u8],
        owner: (u32, u32),
        mtime: i64,
    ) -> io::Result<()> {
        let m = Meta {
            path: path.to_vec(),
            kind: Kind::Symlink(target.to_vec()),
            mode: 0o777,
            uid: u64::from(owner.0),
            gid: u64::from(owner.1),
            mtime: self.clamp(mtime),
            xattrs: Vec::new(),
        };
        self.put(&m, None)
    }

    /// A regular file at `path`, open as `file` (its extended attributes
    /// are looked at through it: a file with any gives up the stream, as
    /// the final check does not read them): the inode `(dev, ino)` with
    /// its final mode, owner and mtime, `size` bytes read from `data`
    /// (which must yield exactly that many). A second name of an inode
    /// streamed already is written as a hard link and `data` is not read.
    /// The stream gives up (rather than fail) when `data` runs short;
    /// errors of `data` itself are returned.
    #[allow(clippy::too_many_arguments)]
    pub fn file(
        &mut self,
        path: &[u8],
        file: &std::fs::File,
        inode: (u64, u64),
        mode: u32,
        owner: (u32, u32),
        mtime: i64,
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let mut m = Meta {
            path: path.to_vec(),
            kind: Kind::Regular(size),
            mode: mode & 0o7777,
            uid: u64::from(owner.0),
            gid: u64::from(owner.1),
            mtime: self.clamp(mtime),
            xattrs: Vec::new(),
        };
        if has_xattrs(file) {
            self.give_up();
            return Ok(());
        }
        if let Some(first) = self.links.get(&inode) {
            m.kind = Kind::Hardlink(first.clone());
            return self.put(&m, None);
        }
        self.links.insert(inode, path.to_vec());
        let mut counted = Counted {
            inner: data,
            n: 0,
            failed: false,
        };
        match self.put(&m, Some(&mut counted)) {
            Ok(()) => Ok(()),
            Err(e) if counted.failed => Err(e),
            // Short: the file shrank under us. What was read is written;
            // the tar is no longer whole.
            Err(_) => {
                self.give_up();
                Ok(())
            }
        }
    }

    /// Ends the stream and checks it against `upper` (see the module
    /// doc): the digest when the streamed entries are exactly what the
    /// overlay differ would write for `upper` with `opts`, else `None`.
    pub fn finish(
        mut self,
        upper: &Path,
        opts: &DiffOptions,
    ) -> Result<Option<StreamedDiff>, kiln_image::ImageError> {
        let tar = self.tar.take();
        let finished = match tar {
            Some(t) if self.live => t.finish().map(drop).is_ok(),
            _ => false,
        };
        let hashed = self.hasher.take().and_then(|h| h.join().ok());
        let (Some((diff_id, size)), true) = (hashed, finished) else {
            return Ok(None);
        };
        if opts.clamp_mtime != self.clamp || !opts.exclude.is_empty() {
            return Ok(None);
        }
        let (walked, usage) = kiln_image::diff::overlay_fingerprint(upper, opts)?;
        let streamed = std::mem::take(&mut self.headers).finish();
        if walked != streamed {
            return Ok(None);
        }
        Ok(Some(StreamedDiff {
            diff_id,
            size,
            usage: usage.map(|(size, inodes)| Usage { size, inodes }),
        }))
    }
}

impl Drop for LayerStream {
    fn drop(&mut self) {
        // The hasher ends once the writer is gone.
        self.tar = None;
        if let Some(h) = self.hasher.take() {
            let _ = h.join();
        }
    }
}

/// Whether the open file has any extended attribute (or its file system
/// cannot say).
fn has_xattrs(f: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: an open descriptor; a null buffer of size 0 only asks for
    // the size of the name list.
    let n = unsafe { libc::flistxattr(f.as_raw_fd(), std::ptr::null_mut(), 0) };
    n != 0 && !(n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTSUP))
}

/// Tells a read error of the data apart from the tar writer's own
/// complaint that the data ran short.
struct Counted<'a> {
    inner: &'a mut dyn Read,
    n: u64,
    failed: bool,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.n += n as u64;
                Ok(n)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }
}
