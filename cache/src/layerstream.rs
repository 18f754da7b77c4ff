//! A layer digested while its files are written: a COPY into a fresh
//! overlay upperdir describes each entry as it makes it, in the order the
//! overlay differ walks ([`kiln_image::diff::write_overlay_diff`]), and
//! hands over each file it wrote by its name in a directory descriptor; a
//! second thread opens and reads those files and hashes the tar of the
//! entries as they come (the headers from here, the content from the
//! files). The commit then needs no second walk of the snapshot, and the
//! copying thread neither reads nor hashes.
//!
//! A rerun of the same COPY (its unchanged files hard-linked from the
//! previous run's snapshot) resumes the hash: the previous layer's
//! [`Marks`] give the sha256 state at entry boundaries with the identity
//! of the entries before them, and the stream starts hashing at the last
//! mark its own first entries share — those files are never read.
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
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

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
    /// Where the hash starts: a state after `offset` bytes (the first
    /// piece the hasher gets).
    Start([u32; 8], u64),
    /// Record the hash's state here, at the start of entry `idx` whose
    /// identity so far is the digest given (see [`Mark`]).
    Mark(u64, [u8; 32]),
    Bytes(Vec<u8>),
    /// The file `name` in the directory `dir`, opened (never following a
    /// symlink) and read by the hasher.
    At(Arc<std::fs::File>, std::ffi::CString, u64),
}

/// Files per batch handed to the hasher.
const BATCH: usize = 32;
/// Header bytes gathered before they are handed over.
const BYTES: usize = 256 << 10;
/// What the batches in flight may hold (see [`Budget`]): directory
/// descriptors (each piece naming a file holds its directory open) and
/// bytes. Deep enough that the writer runs far ahead of the hasher —
/// thousands of small files are written while it reads a big one — and
/// bounded so that neither memory nor descriptors grow with the layer.
const DIRS_IN_FLIGHT: usize = 256;
const BYTES_IN_FLIGHT: usize = 16 << 20;

/// What a batch holds: (directory descriptors, bytes).
type Cost = (usize, usize);

/// The batches handed to the hasher and not yet hashed, counted so the
/// writer waits when they hold too much (see [`DIRS_IN_FLIGHT`]).
#[derive(Default)]
struct Budget {
    used: Mutex<Cost>,
    freed: Condvar,
}

impl Budget {
    /// Takes `cost`, waiting while the batches in flight hold too much
    /// (a batch is always let through when nothing is in flight). False
    /// when the hasher is gone (`alive` says no) before there was room.
    fn take(&self, cost: Cost, alive: &dyn Fn() -> bool) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used != (0, 0)
            && (used.0 + cost.0 > DIRS_IN_FLIGHT || used.1 + cost.1 > BYTES_IN_FLIGHT)
        {
            if !alive() {
                return false;
            }
            used = match self.freed.wait_timeout(used, Duration::from_millis(50)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        used.0 += cost.0;
        used.1 += cost.1;
        true
    }

    /// Gives back what a hashed batch held.
    fn give(&self, cost: Cost) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.0 = used.0.saturating_sub(cost.0);
        used.1 = used.1.saturating_sub(cost.1);
        self.freed.notify_all();
    }
}

/// What `batch` holds: its bytes, and the directories its files are
/// named in, counted each time the directory changes from the piece
/// before it — in the batch or, for its first piece, the last piece of
/// the batch before (`last`). Summed over the batches in flight that is
/// at least the number of directories they hold open, less one (a
/// directory whose run began in a batch already hashed).
fn cost(batch: &[Piece], last: &mut Option<Arc<std::fs::File>>) -> Cost {
    let mut dirs = 0;
    let mut bytes = 0;
    for p in batch {
        bytes += 64;
        match p {
            Piece::Bytes(b) => bytes += b.len(),
            Piece::At(dir, name, _) => {
                bytes += name.as_bytes().len();
                if !last.as_ref().is_some_and(|l| Arc::ptr_eq(l, dir)) {
                    dirs += 1;
                    *last = Some(dir.clone());
                }
            }
            Piece::Start(..) | Piece::Mark(..) => {}
        }
    }
    (dirs, bytes)
}

/// A layer tar hashed as its entries are written (see the module doc).
pub struct LayerStream {
    tar: Option<TarWriter<Vec<u8>>>,
    batch: Vec<Piece>,
    tx: Option<Sender<(Vec<Piece>, Cost)>>,
    hasher: Option<std::thread::JoinHandle<Option<Hashed>>>,
    budget: Arc<Budget>,
    /// The directory of the last file handed over (see [`cost`]).
    last_dir: Option<Arc<std::fs::File>>,
    /// Tells the hasher to stop early (the stream was dropped).
    stop: Arc<AtomicBool>,
    headers: Hasher,
    /// Every entry so far: header fingerprints and files' inodes (see
    /// [`Mark`]).
    identity: Hasher,
    /// Entries streamed so far.
    entry: u64,
    /// Tar offset of the last mark.
    last_mark: u64,
    /// The previous layer's marks by entry, while this layer's first
    /// entries may still be its (the pieces are held, not hashed, until
    /// an entry differs).
    prev: HashMap<u64, Mark>,
    resuming: bool,
    /// The last of the previous layer's marks this layer shares.
    best: Option<Mark>,
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

/// sha256 whose state can be taken at a 64-byte boundary and resumed
/// (a layer rebuilt with its first entries unchanged starts hashing
/// where they end, see [`Mark`]).
struct Sha {
    state: [u32; 8],
    buf: [u8; 64],
    fill: usize,
    len: u64,
}

/// sha256's initial state.
const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

impl Sha {
    fn at(state: [u32; 8], len: u64) -> Self {
        Sha {
            state,
            buf: [0; 64],
            fill: 0,
            len,
        }
    }

    fn blocks(&mut self, data: &[u8]) {
        use sha2::digest::generic_array::{typenum::U64, GenericArray};
        let n = data.len() / 64;
        // SAFETY: `GenericArray<u8, U64>` is 64 bytes with alignment 1,
        // and `data` holds `n` whole blocks.
        let blocks: &[GenericArray<u8, U64>] =
            unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), n) };
        sha2::compress256(&mut self.state, blocks);
    }

    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.fill > 0 {
            let take = (64 - self.fill).min(data.len());
            self.buf[self.fill..self.fill + take].copy_from_slice(&data[..take]);
            self.fill += take;
            data = &data[take..];
            if self.fill < 64 {
                return;
            }
            let b = self.buf;
            self.blocks(&b);
            self.fill = 0;
        }
        let whole = data.len() / 64 * 64;
        self.blocks(&data[..whole]);
        let rest = &data[whole..];
        self.buf[..rest.len()].copy_from_slice(rest);
        self.fill = rest.len();
    }

    /// The state, when at a block boundary.
    fn state(&self) -> Option<[u32; 8]> {
        (self.fill == 0).then_some(self.state)
    }

    fn finish(mut self) -> (Digest, u64) {
        let len = self.len;
        let mut tail = vec![0x80u8];
        let pad = (55usize.wrapping_sub(self.fill)) % 64;
        tail.extend(std::iter::repeat_n(0u8, pad));
        tail.extend((len * 8).to_be_bytes());
        self.update(&tail);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        let d = format!("sha256:{}", hex::encode(out));
        // A well-formed digest by construction.
        (d.parse().unwrap_or_else(|_| Digest::sha256_of(&[])), len)
    }
}

/// A point of a layer tar where a rebuild may resume hashing: before
/// entry `idx`, at byte `offset`, with `state` the sha256 state there and
/// `identity` the digest of every entry before it (its header fingerprint
/// and, for a regular file, its inode). Entries with the same identity
/// are the same bytes (same headers; content from the same inodes of
/// committed snapshots, which are never written again), so a later
/// layer whose first entries have this identity has this state there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    idx: u64,
    offset: u64,
    identity: [u8; 32],
    state: [u32; 8],
}

/// The marks of a layer tar (see [`Mark`]), kept beside its snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks(Vec<Mark>);

/// The file beside a layer's directory that holds its [`Marks`].
pub const MARKS_FILE: &str = "kiln-layer-marks";
const MARKS_MAGIC: &[u8] = b"kiln-layer-marks 1\n";
/// One mark per this many bytes of tar, at most.
const MARK_EVERY: u64 = 1 << 20;

impl Marks {
    /// Reads the marks stored beside the layer directory `fs` (none if
    /// there are none or they do not parse).
    pub fn load(fs: &Path) -> Marks {
        let Some(bytes) = fs
            .parent()
            .and_then(|d| std::fs::read(d.join(MARKS_FILE)).ok())
        else {
            return Marks::default();
        };
        let Some(mut rest) = bytes.strip_prefix(MARKS_MAGIC) else {
            return Marks::default();
        };
        let mut out = Vec::with_capacity(rest.len() / 80);
        while rest.len() >= 80 {
            let (r, tail) = rest.split_at(80);
            rest = tail;
            let u64_at = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&r[i..i + 8]);
                u64::from_le_bytes(b)
            };
            let mut identity = [0u8; 32];
            identity.copy_from_slice(&r[16..48]);
            let mut state = [0u32; 8];
            for (i, w) in state.iter_mut().enumerate() {
                let mut b = [0u8; 4];
                b.copy_from_slice(&r[48 + 4 * i..52 + 4 * i]);
                *w = u32::from_le_bytes(b);
            }
            out.push(Mark {
                idx: u64_at(0),
                offset: u64_at(8),
                identity,
                state,
            });
        }
        if !rest.is_empty() {
            return Marks::default();
        }
        Marks(out)
    }

    /// Writes these marks beside the layer directory `fs`.
    pub fn store(&self, fs: &Path) -> io::Result<()> {
        let Some(dir) = fs.parent() else {
            return Ok(());
        };
        let mut b = MARKS_MAGIC.to_vec();
        for m in &self.0 {
            b.extend(m.idx.to_le_bytes());
            b.extend(m.offset.to_le_bytes());
            b.extend(m.identity);
            for w in m.state {
                b.extend(w.to_le_bytes());
            }
        }
        std::fs::write(dir.join(MARKS_FILE), b)
    }
}

/// What the hasher gives: the tar's digest and size, and the marks taken.
type Hashed = (Digest, u64, Vec<Mark>);

/// The hasher thread: the pieces' bytes in order through sha256, or
/// `None` when a file did not give its size in bytes or could not be read;
/// and the marks it was asked to take.
fn hash_pieces(
    rx: std::sync::mpsc::Receiver<(Vec<Piece>, Cost)>,
    stop: &AtomicBool,
    budget: &Budget,
) -> Option<Hashed> {
    let mut h = Sha::at(IV, 0);
    let mut marks = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let zeros = [0u8; 512];
    let mut whole = true;
    for (batch, held) in rx {
        // Gives the batch's budget back once its pieces (and the
        // directories they hold open) are dropped, whatever happens.
        struct Done<'a>(&'a Budget, Cost);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.give(self.1);
            }
        }
        let _done = Done(budget, held);
        for piece in batch {
            if !whole || stop.load(Ordering::Relaxed) {
                whole = false;
                continue;
            }
            match piece {
                Piece::Start(state, len) => h = Sha::at(state, len),
                Piece::Mark(idx, identity) => match h.state() {
                    Some(state) => marks.push(Mark {
                        idx,
                        offset: h.len,
                        identity,
                        state,
                    }),
                    None => whole = false,
                },
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
    let (d, len) = h.finish();
    Some((d, len, marks))
}

impl LayerStream {
    /// A stream for a layer whose mtimes are clamped to `clamp_mtime`
    /// (the commit's [`DiffOptions::clamp_mtime`]).
    pub fn start(clamp_mtime: Option<i64>) -> Self {
        Self::resuming(clamp_mtime, Marks::default())
    }

    /// [`LayerStream::start`] for a layer whose first entries may be
    /// those of a previous layer with marks `prev` (a COPY run again with
    /// its unchanged files hard-linked from that layer): the hash starts
    /// at the last of those marks this layer shares, and the files before
    /// it are not read.
    pub fn resuming(clamp_mtime: Option<i64>, prev: Marks) -> Self {
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let budget = Arc::new(Budget::default());
        let b2 = budget.clone();
        // Without a thread to hash on, nothing is streamed (the commit
        // diffs as before).
        let hasher = std::thread::Builder::new()
            .name("kiln-layer-hash".into())
            .spawn(move || hash_pieces(rx, &s2, &b2))
            .ok();
        let mut tar = TarWriter::new(Vec::with_capacity(BYTES));
        tar.defer_content();
        let live = hasher.is_some();
        let prev: HashMap<u64, Mark> = prev.0.into_iter().map(|m| (m.idx, m)).collect();
        let resuming = !prev.is_empty();
        let mut batch = Vec::with_capacity(BATCH);
        if !resuming {
            batch.push(Piece::Start(IV, 0));
        }
        LayerStream {
            tar: live.then_some(tar),
            batch,
            tx: live.then_some(tx),
            hasher,
            budget,
            last_dir: None,
            stop,
            headers: Hasher::new(),
            identity: Hasher::new(),
            entry: 0,
            last_mark: 0,
            prev,
            resuming,
            best: None,
            clamp: clamp_mtime,
            links: HashMap::new(),
            live,
        }
    }

    /// Where hashing resumed from a previous layer's mark (tar offset;
    /// 0: from the start).
    pub fn resumed_from(&self) -> u64 {
        self.best.as_ref().map_or(0, |m| m.offset)
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
                // A copy of just these bytes: the buffer keeps its
                // capacity for the next headers (a fresh 256 KiB buffer
                // per file cost an mmap and munmap each).
                self.batch.push(Piece::Bytes(out.clone()));
                out.clear();
            }
        }
    }

    /// The identity of the entries so far (see [`Mark`]).
    fn identity_now(&self) -> [u8; 32] {
        let d = self.identity.clone().finish();
        let mut out = [0u8; 32];
        if hex::decode_to_slice(d.hex(), &mut out).is_err() {
            // Never matches a stored mark's (nor is stored: see `mark`).
            return [0xff; 32];
        }
        out
    }

    /// At the start of an entry: take a shared mark of the previous
    /// layer (dropping the pieces it covers) or stop resuming at the
    /// first that is not shared; and mark this layer every
    /// [`MARK_EVERY`] bytes.
    fn mark(&mut self) {
        let Some(offset) = self.tar.as_ref().map(|t| t.written()) else {
            return;
        };
        let idx = self.entry;
        self.entry += 1;
        let mut id = None;
        if self.resuming {
            if let Some(m) = self.prev.get(&idx) {
                let now = self.identity_now();
                id = Some(now);
                if m.identity == now && m.offset == offset {
                    self.best = Some(m.clone());
                    self.take_bytes();
                    self.batch.clear();
                    self.last_mark = offset;
                    return;
                }
                self.stop_resuming();
            }
        }
        if offset - self.last_mark >= MARK_EVERY {
            let now = id.unwrap_or_else(|| self.identity_now());
            self.take_bytes();
            self.batch.push(Piece::Mark(idx, now));
            self.last_mark = offset;
        }
    }

    /// Hands what is held to the hasher, starting at the best shared
    /// mark (or the beginning).
    fn stop_resuming(&mut self) {
        if !self.resuming {
            return;
        }
        self.resuming = false;
        let start = match &self.best {
            Some(m) => Piece::Start(m.state, m.offset),
            None => Piece::Start(IV, 0),
        };
        self.batch.insert(0, start);
        self.send();
    }

    /// Hands the batch to the hasher (a gone hasher gives up the stream).
    fn send(&mut self) {
        if self.batch.is_empty() || self.resuming {
            return;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        let held = cost(&batch, &mut self.last_dir);
        let hasher = self.hasher.as_ref();
        let alive = || hasher.is_some_and(|h| !h.is_finished());
        let sent = self.budget.take(held, &alive)
            && self.tx.as_ref().is_some_and(|tx| {
                tx.send((batch, held)).is_ok() || {
                    self.budget.give(held);
                    false
                }
            });
        if !sent {
            self.give_up();
        }
    }

    fn put(
        &mut self,
        meta: &Meta,
        file: Option<(&Arc<std::fs::File>, &std::ffi::CStr)>,
        inode: Option<(u64, u64)>,
    ) -> io::Result<()> {
        if self.tar.is_none() {
            return Ok(());
        }
        self.mark();
        meta.fingerprint(&mut self.headers);
        meta.fingerprint(&mut self.identity);
        if let Some((dev, ino)) = inode {
            self.identity.update(&dev.to_le_bytes());
            self.identity.update(&ino.to_le_bytes());
        }
        let Some(tar) = self.tar.as_mut() else {
            return Ok(());
        };
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
        self.put(&m, None, None)
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
        self.put(&m, None, None)
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
            return self.put(&m, None, None);
        }
        self.links.insert(inode, path.to_vec());
        self.put(&m, Some((dir, name)), Some(inode))
    }

    /// Ends the stream and checks it against `upper` (see the module
    /// doc): the digest when the streamed entries are exactly what the
    /// overlay differ would write for `upper` with `opts`, else `None`.
    pub fn finish(
        mut self,
        upper: &Path,
        opts: &DiffOptions,
    ) -> Result<Option<(StreamedDiff, Marks)>, kiln_image::ImageError> {
        self.stop_resuming();
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
        let Some((diff_id, size, taken)) = hashed.filter(|_| walked == streamed) else {
            return Ok(None);
        };
        // The shared marks up to where hashing started are this layer's
        // too.
        let mut marks: Vec<Mark> = match &self.best {
            Some(b) => self
                .prev
                .values()
                .filter(|m| m.idx <= b.idx)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        marks.extend(taken);
        marks.sort_by_key(|m| m.idx);
        Ok(Some((
            StreamedDiff {
                diff_id,
                size,
                usage: usage.map(|(size, inodes)| Usage { size, inodes }),
            },
            Marks(marks),
        )))
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

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    /// The writer waits while the batches in flight hold too many
    /// directories or bytes, goes on as the hasher gives them back, and
    /// stops waiting once the hasher is gone; a batch bigger than the
    /// whole budget still goes when nothing else is in flight.
    #[test]
    fn the_budget_bounds_what_is_in_flight() {
        let b = Arc::new(Budget::default());
        let yes = || true;
        assert!(b.take((DIRS_IN_FLIGHT, 10), &yes));
        let b2 = b.clone();
        let waiter = std::thread::spawn(move || {
            let t = std::time::Instant::now();
            assert!(b2.take((1, 10), &|| true));
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(200));
        b.give((DIRS_IN_FLIGHT, 10));
        let waited = waiter.join().unwrap();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(!b.take((1, BYTES_IN_FLIGHT), &|| false), "hasher gone");
        b.give((1, 10));
        assert!(b.take((DIRS_IN_FLIGHT * 2, BYTES_IN_FLIGHT * 2), &yes));
    }

    /// The resumable sha256 is sha256, fed in any pieces, and resumed
    /// from a state taken at a block boundary it goes on the same.
    #[test]
    fn resumable_sha256_is_sha256_and_resumes() {
        let data: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for cuts in [
            vec![],
            vec![1, 63, 64, 65, 1000],
            vec![64 * 100, 64 * 101 + 3],
        ] {
            for len in [0usize, 1, 55, 56, 63, 64, 65, 119, 120, 128, 4096, 200_000] {
                let d = &data[..len];
                let mut h = Sha::at(IV, 0);
                let mut at = 0;
                for &c in &cuts {
                    if c <= len && c >= at {
                        h.update(&d[at..c]);
                        at = c;
                    }
                }
                h.update(&d[at..]);
                let want = format!("sha256:{}", hex::encode(sha2::Sha256::digest(d)));
                assert_eq!(h.finish().0.to_string(), want, "len {len} cuts {cuts:?}");
            }
        }
        let mut h = Sha::at(IV, 0);
        h.update(&data[..64 * 1000]);
        let state = h.state().unwrap();
        let mut r = Sha::at(state, 64 * 1000);
        r.update(&data[64 * 1000..]);
        let want = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)));
        assert_eq!(r.finish(), (want.parse().unwrap(), data.len() as u64));
    }

    /// Marks survive their file; a file that does not parse gives none.
    #[test]
    fn marks_store_and_load() {
        let t = tempfile::tempdir().unwrap();
        let fs_dir = t.path().join("fs");
        let m = Marks(vec![Mark {
            idx: 7,
            offset: 1 << 20,
            identity: [3; 32],
            state: IV,
        }]);
        m.store(&fs_dir).unwrap();
        assert_eq!(Marks::load(&fs_dir), m);
        std::fs::write(t.path().join(MARKS_FILE), b"junk").unwrap();
        assert_eq!(Marks::load(&fs_dir), Marks::default());
    }
}
