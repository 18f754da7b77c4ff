//! A layer digested while its files are written: a COPY into a fresh
//! overlay upperdir describes each entry as it makes it, in the order the
//! overlay differ walks ([`kiln_image::diff::write_overlay_diff`]), and
//! hands over each file it wrote, open; a second thread reads those files
//! and hashes the tar of the entries as they come (the headers from here,
//! the content from the files). The commit then needs no second walk of
//! the snapshot, and the copying thread neither reads nor hashes.
//!
//! The digest is only used when it describes the upperdir exactly: at
//! the end the upperdir is walked as the differ walks it, headers only
//! (names, types, modes, owners, mtimes, sizes, link targets, directory
//! xattrs and overlay flags, hard links; no file opened), and the
//! fingerprint of those headers must equal that of the entries streamed.
//! Files' extended attributes are looked at through the descriptors the
//! writer hands over (any at all: the stream gives up). Content is read
//! from the files in the snapshot themselves, and a file that gives other
//! than its size in bytes fails the stream. Anything else — an entry the
//! stream could not describe, a mismatch — gives `None` and the commit
//! diffs the snapshot as before. The snapshot is the kiln process's own
//! until it is committed: nothing else writes into it meanwhile.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;

use kiln_image::diff::DiffOptions;
use kiln_image::tarw::{Kind, Meta, TarWriter};

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

/// A piece of the tar, in order: bytes written here, or a file's content
/// (so many bytes, then zeros to a 512-byte boundary) read by the hasher.
enum Piece {
    Bytes(Vec<u8>),
    /// The file `name` in the directory `dir`, opened (never following a
    /// symlink) and read by the hasher.
    At(Arc<std::fs::File>, std::ffi::CString, u64),
}

/// Pieces per batch handed to the hasher, and batches in flight (so at
/// most `BATCH * DEPTH` files are held open).
const BATCH: usize = 32;
const DEPTH: usize = 4;
/// Header bytes gathered before they are handed over.
const BYTES: usize = 256 << 10;

/// A layer tar hashed as its entries are written (see the module doc).
pub struct LayerStream {
    tar: Option<TarWriter<Vec<u8>>>,
    batch: Vec<Piece>,
    tx: Option<SyncSender<Vec<Piece>>>,
    hasher: Option<std::thread::JoinHandle<Option<(Digest, u64)>>>,
    /// Tells the hasher to stop early (the stream was dropped).
    stop: Arc<AtomicBool>,
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

/// The hasher thread: the pieces' bytes in order through sha256, or
/// `None` when a file did not give its size in bytes or could not be read.
fn hash_pieces(
    rx: std::sync::mpsc::Receiver<Vec<Piece>>,
    stop: &AtomicBool,
) -> Option<(Digest, u64)> {
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    let zeros = [0u8; 512];
    let mut whole = true;
    for batch in rx {
        for piece in batch {
            if !whole || stop.load(Ordering::Relaxed) {
                whole = false;
                continue;
            }
            match piece {
                Piece::Bytes(b) => h.update(&b),
                Piece::At(dir, name, size) => {
                    let Some(mut f) = open_at(&dir, &name).filter(|f| !has_xattrs(f)) else {
                        whole = false;
                        continue;
                    };
                    let mut left = size;
                    while left > 0 {
                        let want = buf.len().min(usize::try_from(left).unwrap_or(buf.len()));
                        match f.read(&mut buf[..want]) {
                            Ok(0) => break,
                            Ok(n) => {
                                h.update(&buf[..n]);
                                left -= n as u64;
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                    if left > 0 {
                        whole = false;
                        continue;
                    }
                    let rem = (size % 512) as usize;
                    if rem != 0 {
                        h.update(&zeros[..512 - rem]);
                    }
                }
            }
        }
    }
    if !whole {
        return None;
    }
    let len = h.len();
    Some((h.finish(), len))
}

impl LayerStream {
    /// A stream for a layer whose mtimes are clamped to `clamp_mtime`
    /// (the commit's [`DiffOptions::clamp_mtime`]).
    pub fn start(clamp_mtime: Option<i64>) -> Self {
        let (tx, rx) = sync_channel(DEPTH);
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        // Without a thread to hash on, nothing is streamed (the commit
        // diffs as before).
        let hasher = std::thread::Builder::new()
            .name("kiln-layer-hash".into())
            .spawn(move || hash_pieces(rx, &s2))
            .ok();
        let mut tar = TarWriter::new(Vec::with_capacity(BYTES));
        tar.defer_content();
        let live = hasher.is_some();
        LayerStream {
            tar: live.then_some(tar),
            batch: Vec::with_capacity(BATCH),
            tx: live.then_some(tx),
            hasher,
            stop,
            headers: Hasher::new(),
            clamp: clamp_mtime,
            links: HashMap::new(),
            live,
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
        self.batch.clear();
        self.stop.store(true, Ordering::Relaxed);
        self.tx = None;
    }

    fn clamp(&self, t: i64) -> i64 {
        match self.clamp {
            Some(c) if t > c => c,
            _ => t,
        }
    }

    /// Moves the header bytes gathered so far into the batch.
    fn take_bytes(&mut self) {
        if let Some(tar) = self.tar.as_mut() {
            let out = tar.get_mut();
            if !out.is_empty() {
                let b = std::mem::replace(out, Vec::with_capacity(BYTES));
                self.batch.push(Piece::Bytes(b));
            }
        }
    }

    /// Hands the batch to the hasher (a gone hasher gives up the stream).
    fn send(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(batch).is_ok());
        if !sent {
            self.give_up();
        }
    }

    fn put(
        &mut self,
        meta: &Meta,
        file: Option<(&Arc<std::fs::File>, &std::ffi::CStr)>,
    ) -> io::Result<()> {
        let Some(tar) = self.tar.as_mut() else {
            return Ok(());
        };
        meta.fingerprint(&mut self.headers);
        tar.append(meta, None)?;
        match (file, &meta.kind) {
            // Empty files too: the hasher looks at their attributes.
            (Some((dir, name)), Kind::Regular(n)) => {
                self.take_bytes();
                self.batch.push(Piece::At(dir.clone(), name.to_owned(), *n));
                if self.batch.len() >= BATCH {
                    self.send();
                }
            }
            _ => {
                if self
                    .tar
                    .as_mut()
                    .is_some_and(|t| t.get_mut().len() >= BYTES)
                {
                    self.take_bytes();
                    self.send();
                }
            }
        }
        Ok(())
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

    /// A regular file at `path`, which is `name` in the snapshot's open
    /// directory `dir`: the inode `(dev, ino)` with its final mode, owner
    /// and mtime, and `size` bytes. The hasher opens it there and reads
    /// them (fewer, a read error, or any extended attribute on the file —
    /// which the final check does not read — fail the stream). A second
    /// name of an inode streamed already is a hard-link entry.
    #[allow(clippy::too_many_arguments)]
    pub fn file(
        &mut self,
        path: &[u8],
        (dir, name): (&Arc<std::fs::File>, &std::ffi::CStr),
        inode: (u64, u64),
        mode: u32,
        owner: (u32, u32),
        mtime: i64,
        size: u64,
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
        if let Some(first) = self.links.get(&inode) {
            m.kind = Kind::Hardlink(first.clone());
            return self.put(&m, None);
        }
        self.links.insert(inode, path.to_vec());
        self.put(&m, Some((dir, name)))
    }

    /// Ends the stream and checks it against `upper` (see the module
    /// doc): the digest when the streamed entries are exactly what the
    /// overlay differ would write for `upper` with `opts`, else `None`.
    pub fn finish(
        mut self,
        upper: &Path,
        opts: &DiffOptions,
    ) -> Result<Option<StreamedDiff>, kiln_image::ImageError> {
        let finished = match self.tar.take() {
            Some(t) if self.live => match t.finish() {
                Ok(rest) => {
                    self.batch.push(Piece::Bytes(rest));
                    true
                }
                Err(_) => false,
            },
            _ => false,
        };
        self.send();
        self.tx = None;
        if !finished || !self.live || opts.clamp_mtime != self.clamp || !opts.exclude.is_empty() {
            return Ok(None);
        }
        // The check walks while the hasher finishes.
        let walked = kiln_image::diff::overlay_fingerprint(upper, opts);
        let hashed = self.hasher.take().and_then(|h| h.join().ok()).flatten();
        let (walked, usage) = walked?;
        let streamed = std::mem::take(&mut self.headers).finish();
        let Some((diff_id, size)) = hashed.filter(|_| walked == streamed) else {
            return Ok(None);
        };
        Ok(Some(StreamedDiff {
            diff_id,
            size,
            usage: usage.map(|(size, inodes)| Usage { size, inodes }),
        }))
    }
}

impl Drop for LayerStream {
    fn drop(&mut self) {
        // The hasher stops at its next piece and ends once the sender is
        // gone.
        self.stop.store(true, Ordering::Relaxed);
        self.tx = None;
        if let Some(h) = self.hasher.take() {
            let _ = h.join();
        }
    }
}

/// `openat(dir, name)` for reading: no symlink followed, no atime
/// update where the caller may skip it.
fn open_at(dir: &std::fs::File, name: &std::ffi::CStr) -> Option<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOATIME;
    loop {
        // SAFETY: an open directory descriptor and a NUL-terminated name.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: a descriptor just opened, owned by nothing else.
            return Some(unsafe { std::fs::File::from_raw_fd(fd) });
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EPERM) if flags & libc::O_NOATIME != 0 => flags &= !libc::O_NOATIME,
            _ => return None,
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
    n != 0 && !(n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTSUP))
}
