//! The differs: directory trees -> OCI layer tars.
//!
//! [`write_overlay_diff`] reads an overlayfs upperdir directly (O(change));
//! [`write_tree_diff`] compares two trees (the native snapshotter's way).
//! Both write entries in a fixed order — inside each directory: the opaque
//! marker, then whiteouts, then the other names in byte order — so equal
//! trees give byte-identical tars.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::tarw::{Kind, Meta, TarWriter, Xattrs};
use crate::ImageError;

/// What the differs use of an entry's `lstat`.
#[derive(Clone, Copy, Debug)]
struct St {
    /// `st_mode`: file type and permission bits.
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    dev: u64,
    ino: u64,
    rdev: u64,
    size: u64,
    /// 512-byte blocks allocated.
    blocks: u64,
    mtime: i64,
}

impl St {
    fn of(md: &Metadata) -> St {
        St {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            nlink: md.nlink(),
            dev: md.dev(),
            ino: md.ino(),
            rdev: md.rdev(),
            size: md.len(),
            blocks: md.blocks(),
            mtime: md.mtime(),
        }
    }

    // `st_nlink` is 32 bits wide on some architectures.
    #[allow(clippy::unnecessary_cast)]
    fn of_stat(s: &libc::stat) -> St {
        St {
            mode: s.st_mode,
            uid: s.st_uid,
            gid: s.st_gid,
            nlink: s.st_nlink as u64,
            dev: s.st_dev,
            ino: s.st_ino,
            rdev: s.st_rdev,
            size: s.st_size.max(0) as u64,
            blocks: s.st_blocks.max(0) as u64,
            mtime: s.st_mtime,
        }
    }

    fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
    fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }
    fn is_file(&self) -> bool {
        self.file_type() == libc::S_IFREG
    }
    fn is_symlink(&self) -> bool {
        self.file_type() == libc::S_IFLNK
    }
    /// An overlay whiteout: a 0/0 character device.
    fn is_whiteout(&self) -> bool {
        kiln_fs::overlay::is_whiteout_stat(self.file_type(), self.rdev)
    }
}

/// A cancellation check for long work (a diff of a big tree, the copy of a
/// big file): asked between entries and between reads of a file's
/// content; once it answers true the work stops with
/// [`ImageError::Cancelled`].
#[derive(Clone)]
pub struct Cancel(std::sync::Arc<dyn Fn() -> bool + Send + Sync>);

impl Cancel {
    /// A check that asks `is_cancelled`.
    pub fn new(is_cancelled: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Cancel(std::sync::Arc::new(is_cancelled))
    }

    /// Whether the work should stop.
    pub fn is_cancelled(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Cancel").field(&self.is_cancelled()).finish()
    }
}

/// Whether `cancel` (if any) fired, as an error.
pub(crate) fn check_cancel(cancel: Option<&Cancel>) -> Result<(), ImageError> {
    match cancel {
        Some(c) if c.is_cancelled() => Err(ImageError::Cancelled),
        _ => Ok(()),
    }
}

/// A reader that fails with [`ImageError::Cancelled`] (as an I/O error)
/// once its check fires, asked before every read.
struct CancelRead<'a, R: ?Sized> {
    inner: &'a mut R,
    cancel: &'a Cancel,
}

impl<R: Read + ?Sized> Read for CancelRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(std::io::Error::other(ImageError::Cancelled));
        }
        self.inner.read(buf)
    }
}

/// Options shared by both differs.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DiffOptions {
    /// `SOURCE_DATE_EPOCH`: every mtime later than this is written as this.
    pub clamp_mtime: Option<i64>,
    /// Paths relative to the layer root to leave out with everything below
    /// them (e.g. mount points the executor created).
    pub exclude: Vec<PathBuf>,
    /// Stops the diff part way (Ctrl-C during a commit); not part of a
    /// recorded layer source.
    #[serde(skip)]
    pub cancel: Option<Cancel>,
}

/// Counts from one diff.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Entries written (whiteouts and opaque markers included).
    pub entries: u64,
    /// `.wh.NAME` entries written.
    pub whiteouts: u64,
    /// `.wh..wh..opq` entries written.
    pub opaques: u64,
    /// Bytes of regular-file content.
    pub content_bytes: u64,
    /// Size of the tar stream.
    pub tar_bytes: u64,
    /// Disk space of the walked directory itself — bytes allocated and
    /// inodes, each inode once, the root directory included — when the
    /// walk saw all of it (an overlay upperdir with nothing excluded), so
    /// the caller need not walk it again to measure it.
    pub usage: Option<(u64, u64)>,
}

use kiln_fs::overlay::{is_overlay_xattr, XattrNs};
pub use kiln_fs::overlay::{WHITEOUT_OPAQUE, WHITEOUT_PREFIX};

/// Extended attributes left out of layers: overlay bookkeeping and the
/// host's SELinux label.
fn skip_xattr(name: &[u8]) -> bool {
    is_overlay_xattr(name) || name == b"security.selinux"
}

fn read_xattrs(path: &Path) -> Result<Xattrs, ImageError> {
    let names: Vec<std::ffi::OsString> = match xattr::list(path) {
        Ok(n) => n.collect(),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::path("listxattr", path, e)),
    };
    layer_xattrs(&XattrAt::Path(path), &names, path)
}

/// Where an entry's extended attributes are read: through a descriptor
/// opened on it (no path walk) or by path.
enum XattrAt<'a> {
    Fd(&'a File),
    Path(&'a Path),
}

impl XattrAt<'_> {
    fn list(&self) -> std::io::Result<Vec<std::ffi::OsString>> {
        use xattr::FileExt;
        match self {
            XattrAt::Fd(f) => f.list_xattr().map(|l| l.collect()),
            XattrAt::Path(p) => xattr::list(p).map(|l| l.collect()),
        }
    }

    fn get(&self, name: &OsStr) -> std::io::Result<Option<Vec<u8>>> {
        use xattr::FileExt;
        match self {
            XattrAt::Fd(f) => f.get_xattr(name),
            XattrAt::Path(p) => xattr::get(p, name),
        }
    }
}

/// The values of `names` that belong in a layer, sorted.
fn layer_xattrs(
    at: &XattrAt,
    names: &[std::ffi::OsString],
    path: &Path,
) -> Result<Xattrs, ImageError> {
    let mut out = Vec::new();
    for name in names {
        let nb = name.as_bytes();
        if skip_xattr(nb) {
            continue;
        }
        match at.get(name) {
            Ok(Some(v)) => out.push((nb.to_vec(), v)),
            Ok(None) => {}
            Err(e) => return Err(ImageError::path("getxattr", path, e)),
        }
    }
    out.sort();
    Ok(out)
}

/// The value of overlayfs's `key` flag (`trusted.overlay.<key>`, or
/// `user.overlay.<key>` for an unprivileged mount), looked up among the
/// entry's listed attribute `names`.
fn overlay_flag(
    at: &XattrAt,
    names: &[std::ffi::OsString],
    key: &str,
    path: &Path,
) -> Result<Option<Vec<u8>>, ImageError> {
    for prefix in [XattrNs::current().prefix()] {
        let Some(name) = names.iter().find(|n| {
            let b = n.as_bytes();
            b.len() == prefix.len() + key.len()
                && b.starts_with(prefix.as_bytes())
                && b.ends_with(key.as_bytes())
        }) else {
            continue;
        };
        match at.get(name) {
            Ok(Some(v)) => return Ok(Some(v)),
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
            Err(e) => return Err(ImageError::path("getxattr", path, e)),
        }
    }
    Ok(None)
}

fn normalize_rel(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

struct Ctx<W: Write> {
    tar: TarWriter<W>,
    opts: DiffOptions,
    exclude: HashSet<PathBuf>,
    links: HashMap<(u64, u64), Vec<u8>>,
    stats: DiffStats,
    /// Disk usage of what was walked (see [`DiffStats::usage`]): bytes,
    /// inodes, the multiply-linked inodes counted, and whether anything
    /// was left out.
    usage: (u64, u64),
    counted: HashSet<(u64, u64)>,
    partial: bool,
    /// Headers only ([`overlay_fingerprint`]): each entry's
    /// [`Meta::fingerprint`] goes here and nothing is written or read.
    headers: Option<crate::Hasher>,
    /// [`write_tree_diff_since`]: entries of the upper tree changed
    /// (ctime) after this instant have their contents compared whatever
    /// their size and mtime say.
    since: Option<(i64, i64)>,
}

impl<W: Write> Ctx<W> {
    fn new(out: W, opts: &DiffOptions) -> Self {
        Ctx {
            tar: TarWriter::new(out),
            exclude: opts.exclude.iter().map(|p| normalize_rel(p)).collect(),
            opts: opts.clone(),
            links: HashMap::new(),
            stats: DiffStats::default(),
            usage: (0, 0),
            counted: HashSet::new(),
            partial: false,
            headers: None,
            since: None,
        }
    }

    /// Counts `st` into the walked tree's disk usage.
    fn count(&mut self, st: &St) {
        if st.nlink > 1 && !st.is_dir() && !self.counted.insert((st.dev, st.ino)) {
            return;
        }
        self.usage.0 += st.blocks * 512;
        self.usage.1 += 1;
    }

    fn excluded(&self, rel: &[u8]) -> bool {
        !self.exclude.is_empty() && self.exclude.contains(Path::new(OsStr::from_bytes(rel)))
    }

    fn clamp(&self, t: i64) -> i64 {
        match self.opts.clamp_mtime {
            Some(e) if t > e => e,
            _ => t,
        }
    }

    /// Whether the diff was cancelled, as an error.
    fn check(&self) -> Result<(), ImageError> {
        check_cancel(self.opts.cancel.as_ref())
    }

    fn put(&mut self, meta: &Meta, data: Option<&mut dyn Read>) -> Result<(), ImageError> {
        self.check()?;
        if let Some(h) = &mut self.headers {
            meta.fingerprint(h);
            self.stats.entries += 1;
            return Ok(());
        }
        let appended = match (data, &self.opts.cancel) {
            (Some(r), Some(cancel)) => self
                .tar
                .append(meta, Some(&mut CancelRead { inner: r, cancel })),
            (data, _) => self.tar.append(meta, data),
        };
        if appended.is_err() {
            self.check()?;
        }
        appended?;
        self.stats.entries += 1;
        if let Kind::Regular(n) = meta.kind {
            self.stats.content_bytes += n;
        }
        Ok(())
    }

    fn whiteout(&mut self, rel_dir: &[u8], name: &[u8]) -> Result<(), ImageError> {
        let mut path = join(rel_dir, WHITEOUT_PREFIX.as_bytes());
        path.extend_from_slice(name);
        let m = Meta {
            path,
            kind: Kind::Regular(0),
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime: self.clamp(0),
            xattrs: Vec::new(),
        };
        self.put(&m, None)?;
        self.stats.whiteouts += 1;
        Ok(())
    }

    fn opaque(&mut self, dir: &Meta) -> Result<(), ImageError> {
        let m = Meta {
            path: join(&dir.path, WHITEOUT_OPAQUE.as_bytes()),
            kind: Kind::Regular(0),
            mode: 0o600,
            uid: dir.uid,
            gid: dir.gid,
            mtime: dir.mtime,
            xattrs: Vec::new(),
        };
        self.put(&m, None)?;
        self.stats.opaques += 1;
        Ok(())
    }

    /// Describe the entry at `abs` (lstat'ed as `st`, with the layer
    /// attributes `xattrs`; `link` reads a symlink's target) as a tar
    /// entry at `rel`.
    fn meta(
        &self,
        abs: &Path,
        rel: Vec<u8>,
        st: &St,
        xattrs: Xattrs,
        link: impl FnOnce() -> std::io::Result<PathBuf>,
    ) -> Result<Meta, ImageError> {
        let kind = match st.file_type() {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => {
                let t = link().map_err(|e| ImageError::path("readlink", abs, e))?;
                Kind::Symlink(std::os::unix::ffi::OsStringExt::into_vec(
                    t.into_os_string(),
                ))
            }
            libc::S_IFCHR => Kind::Char(dev_major(st.rdev), dev_minor(st.rdev)),
            libc::S_IFBLK => Kind::Block(dev_major(st.rdev), dev_minor(st.rdev)),
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFREG => Kind::Regular(st.size),
            _ => {
                return Err(ImageError::Unsupported(format!(
                    "{}: sockets cannot be stored in a layer",
                    abs.display()
                )))
            }
        };
        Ok(Meta {
            path: rel,
            kind,
            mode: st.mode & 0o7777,
            uid: u64::from(st.uid),
            gid: u64::from(st.gid),
            mtime: self.clamp(st.mtime),
            xattrs: if st.is_symlink() { Vec::new() } else { xattrs },
        })
    }

    /// Write `meta` (from [`Ctx::meta`]) with the content of `abs` (read
    /// through `open` when the caller has the file open already); a second
    /// name of an inode already in this layer becomes a hardlink entry.
    fn emit(
        &mut self,
        abs: &Path,
        meta: &Meta,
        st: &St,
        open: Option<File>,
    ) -> Result<(), ImageError> {
        if st.is_file() && st.nlink > 1 {
            let key = (st.dev, st.ino);
            if let Some(first) = self.links.get(&key) {
                let link = Meta {
                    kind: Kind::Hardlink(first.clone()),
                    xattrs: Vec::new(),
                    ..meta.clone()
                };
                return self.put(&link, None);
            }
            self.links.insert(key, meta.path.clone());
        }
        if let (Kind::Regular(n), None) = (&meta.kind, &self.headers) {
            if *n > 0 {
                let mut f = match open {
                    Some(f) => f,
                    None => open_nofollow(abs)?,
                };
                return self.put(meta, Some(&mut f));
            }
        }
        self.put(meta, None)
    }

    fn finish(self) -> Result<DiffStats, ImageError> {
        let mut stats = self.stats;
        let tar = self.tar;
        // the end marker is part of the stream size
        let before = tar.written();
        tar.finish()?;
        stats.tar_bytes = before + 1024;
        Ok(stats)
    }

    /// [`Ctx::finish`], with the disk usage of the walk when it was whole.
    fn finish_measured(self) -> Result<DiffStats, ImageError> {
        let usage = (!self.partial).then_some(self.usage);
        let mut stats = self.finish()?;
        stats.usage = usage;
        Ok(stats)
    }
}

fn open_nofollow(abs: &Path) -> Result<File, ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(abs)
        .map_err(|e| ImageError::path("open", abs, e))
}

pub(crate) fn dev_major(rdev: u64) -> u32 {
    libc::major(rdev as libc::dev_t)
}
pub(crate) fn dev_minor(rdev: u64) -> u32 {
    libc::minor(rdev as libc::dev_t)
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + name.len() + 1);
    if !dir.is_empty() {
        p.extend_from_slice(dir);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Names in `dir`, sorted bytewise.
fn sorted_names(dir: &Path) -> Result<Vec<Vec<u8>>, ImageError> {
    let rd = fs::read_dir(dir).map_err(|e| ImageError::path("readdir", dir, e))?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| ImageError::path("readdir", dir, e))?;
        names.push(e.file_name().as_bytes().to_vec());
    }
    names.sort();
    Ok(names)
}

fn lstat(p: &Path) -> Result<Metadata, ImageError> {
    fs::symlink_metadata(p).map_err(|e| ImageError::path("lstat", p, e))
}

/// Write the layer of an overlayfs upperdir to `out` as an uncompressed tar.
///
/// Only the upperdir is walked, so the cost is proportional to what changed.
/// Whiteout devices (char 0/0) become `.wh.NAME` entries and opaque
/// directories (`trusted.overlay.opaque=y` or `user.overlay.opaque=y`) get a
/// `.wh..wh..opq` entry right after their own header. Upperdirs written with
/// `redirect_dir` or `metacopy` are refused ([`ImageError::Unsupported`]):
/// mount overlays for builds with `redirect_dir=off,metacopy=off`.
pub fn write_overlay_diff(
    upper: &Path,
    out: impl Write,
    opts: &DiffOptions,
) -> Result<DiffStats, ImageError> {
    let mut ctx = Ctx::new(out, opts);
    walk_upper(&mut ctx, upper)?;
    ctx.finish_measured()
}

/// Walks the upperdir `upper` into `ctx`, its root counted in the usage.
fn walk_upper<W: Write>(ctx: &mut Ctx<W>, upper: &Path) -> Result<(), ImageError> {
    let root = File::open(upper).map_err(|e| ImageError::path("open", upper, e))?;
    let md = root
        .metadata()
        .map_err(|e| ImageError::path("stat", upper, e))?;
    ctx.count(&St::of(&md));
    overlay_dir(ctx, &root, upper, &[])
}

/// The fingerprint ([`Meta::fingerprint`], in order) of the headers
/// [`write_overlay_diff`] would write for `upper`, without reading any
/// file's content, and the walked directory's disk usage (bytes,
/// inodes). A writer that streamed a layer while making the upperdir
/// compares its own entries' fingerprint with this one: equal, its tar
/// has the headers the differ would write — provided that no regular
/// file has any extended attribute (nor overlay flag), which this walk
/// does not look at (it never opens a file: a `COPY` of 20,000 files
/// checks their attributes through the descriptors it wrote them with).
pub fn overlay_fingerprint(
    upper: &Path,
    opts: &DiffOptions,
) -> Result<(crate::Digest, Option<(u64, u64)>), ImageError> {
    let mut ctx = Ctx::new(std::io::sink(), opts);
    ctx.headers = Some(crate::Hasher::new());
    walk_upper(&mut ctx, upper)?;
    let usage = (!ctx.partial).then_some(ctx.usage);
    let h = ctx
        .headers
        .take()
        .ok_or_else(|| ImageError::from(std::io::Error::other("no fingerprint")))?;
    Ok((h.finish(), usage))
}

/// `openat(dir, name)` for reading, never following a symlink;
/// `O_NOATIME` where the caller may use it, so that reading a layer
/// dirties no inodes.
fn open_at(dir: &File, name: &[u8], directory: bool) -> std::io::Result<File> {
    use nix::fcntl::OFlag;
    let mut flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOATIME;
    if directory {
        flags |= OFlag::O_DIRECTORY;
    }
    loop {
        match nix::fcntl::openat(
            dir,
            OsStr::from_bytes(name),
            flags,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => return Ok(File::from(fd)),
            Err(nix::errno::Errno::EINTR) => {}
            // O_NOATIME needs the file's owner or CAP_FOWNER.
            Err(nix::errno::Errno::EPERM) if flags.contains(OFlag::O_NOATIME) => {
                flags.remove(OFlag::O_NOATIME)
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
fn lstat_at(dir: &File, name: &[u8]) -> std::io::Result<St> {
    nix::sys::stat::fstatat(
        dir,
        OsStr::from_bytes(name),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map(|s| St::of_stat(&s))
    .map_err(std::io::Error::from)
}

/// `readlinkat(dir, name)`.
fn readlink_at(dir: &File, name: &[u8]) -> std::io::Result<PathBuf> {
    nix::fcntl::readlinkat(dir, OsStr::from_bytes(name))
        .map(PathBuf::from)
        .map_err(std::io::Error::from)
}

/// One upperdir directory (`dir`, open, at `abs_dir`). Each entry is
/// stat'ed and opened from the open directory by its name alone, and a
/// subdirectory or regular file is opened once: its attributes, and a
/// file's content, are read through that descriptor (devices, fifos and
/// files we may not open are still described by path). Walking whole
/// paths several times per file cost more than reading the files. One
/// descriptor stays open per directory level being walked.
/// The deepest directory tree a layer is made of, in levels: a step that
/// made a deeper one (30,000 levels is a loop of `mkdir a && mv`) crashed
/// kiln with a stack overflow; it is now an error that says so.
pub const MAX_TREE_DEPTH: usize = 1000;

/// A file of the tree whose name a layer tar reads as a deletion
/// (`.wh.NAME`, `.wh..wh..opq`) cannot be in a layer: it was a plain file
/// while the build ran and a deletion wherever the image is unpacked.
fn not_a_whiteout_name(at: &Path, name: &[u8]) -> Result<(), ImageError> {
    if name.starts_with(b".wh.") {
        return Err(ImageError::Unsupported(format!(
            "{}: a file named .wh.* reads as a deletion in a layer; rename it",
            at.display()
        )));
    }
    Ok(())
}

fn check_depth(at: &Path, rel_dir: &[u8]) -> Result<(), ImageError> {
    let depth = rel_dir.iter().filter(|b| **b == b'/').count() + 1;
    if depth > MAX_TREE_DEPTH {
        let mut shown = at.display().to_string();
        if shown.len() > 160 {
            let mut cut = 160;
            while !shown.is_char_boundary(cut) {
                cut -= 1;
            }
            shown.truncate(cut);
            shown.push_str("...");
        }
        return Err(ImageError::Unsupported(format!(
            "a directory tree deeper than {MAX_TREE_DEPTH} levels ({shown})"
        )));
    }
    Ok(())
}

fn overlay_dir<W: Write>(
    ctx: &mut Ctx<W>,
    dir: &File,
    abs_dir: &Path,
    rel_dir: &[u8],
) -> Result<(), ImageError> {
    check_depth(abs_dir, rel_dir)?;
    let names = sorted_names(abs_dir)?;
    let mut rest = Vec::with_capacity(names.len());
    for name in names {
        ctx.check()?;
        let rel = join(rel_dir, &name);
        if ctx.excluded(&rel) {
            ctx.partial = true;
            continue;
        }
        let abs = abs_dir.join(OsStr::from_bytes(&name));
        let st = lstat_at(dir, &name).map_err(|e| ImageError::path("lstat", &abs, e))?;
        ctx.count(&st);
        if st.is_whiteout() {
            ctx.whiteout(rel_dir, &name)?;
        } else {
            not_a_whiteout_name(&abs, &name)?;
            rest.push((name, abs, rel, st));
        }
    }
    for (name, abs, rel, st) in rest {
        if st.is_file() && ctx.headers.is_some() {
            // Headers only: a file's attributes were checked by whoever
            // streamed it (see `overlay_fingerprint`); it is not opened.
            let meta = ctx.meta(&abs, rel, &st, Vec::new(), || readlink_at(dir, &name))?;
            ctx.emit(&abs, &meta, &st, None)?;
            continue;
        }
        let mut fd = if st.is_dir() || st.is_file() {
            match open_at(dir, &name, st.is_dir()) {
                Ok(f) => Some(f),
                // A file we may not read is still described (by path);
                // its content, if any, then fails to open with this error.
                Err(e) if st.is_file() && e.raw_os_error() == Some(libc::EACCES) => None,
                Err(e) => return Err(ImageError::path("open", &abs, e)),
            }
        } else {
            None
        };
        let at = match &fd {
            Some(f) => XattrAt::Fd(f),
            None => XattrAt::Path(&abs),
        };
        let xnames = if st.is_symlink() {
            Vec::new()
        } else {
            match at.list() {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
                Err(e) => return Err(ImageError::path("listxattr", &abs, e)),
            }
        };
        if st.is_dir() {
            if overlay_flag(&at, &xnames, "redirect", &abs)?.is_some() {
                return Err(ImageError::Unsupported(format!(
                    "{}: overlay redirect_dir is in use; mount with redirect_dir=off",
                    abs.display()
                )));
            }
        } else if st.is_file() && overlay_flag(&at, &xnames, "metacopy", &abs)?.is_some() {
            return Err(ImageError::Unsupported(format!(
                "{}: overlay metacopy is in use; mount with metacopy=off",
                abs.display()
            )));
        }
        let opaque =
            st.is_dir() && overlay_flag(&at, &xnames, "opaque", &abs)?.as_deref() == Some(b"y");
        let xattrs = layer_xattrs(&at, &xnames, &abs)?;
        let meta = ctx.meta(&abs, rel.clone(), &st, xattrs, || readlink_at(dir, &name))?;
        if st.is_dir() {
            ctx.emit(&abs, &meta, &st, None)?;
            if opaque {
                ctx.opaque(&meta)?;
            }
            let sub = fd.take().ok_or_else(|| {
                ImageError::path("open", &abs, std::io::Error::from_raw_os_error(libc::EBADF))
            })?;
            overlay_dir(ctx, &sub, &abs, &rel)?;
        } else {
            ctx.emit(&abs, &meta, &st, fd.take())?;
        }
    }
    Ok(())
}

/// Write the difference from `lower` (None: the empty tree) to `upper` as an
/// uncompressed layer tar: added and changed entries with their content, and
/// a `.wh.NAME` whiteout for each name that disappeared. Parent directories
/// of changes are included so the layer also applies onto a fresh root.
///
/// Files count as unchanged when type, mode, owner, size, mtime (to the
/// nanosecond), xattrs, device numbers and link targets are equal; when the
/// mtime has no sub-second part (a coarse filesystem), contents are compared
/// too. Directory mtimes are ignored, as Docker and containerd do.
pub fn write_tree_diff(
    lower: Option<&Path>,
    upper: &Path,
    out: impl Write,
    opts: &DiffOptions,
) -> Result<DiffStats, ImageError> {
    write_tree_diff_since(lower, upper, out, opts, None)
}

/// [`write_tree_diff`] of an upper tree that began as a copy of the lower
/// one, finished at `since` (seconds, nanoseconds): a file whose inode
/// changed after that (its ctime, which no unprivileged process can set
/// back) has its contents compared even when its size and mtime are the
/// lower file's — a step that changed a file and put its mtime back
/// (`touch -r`) hides nothing.
pub fn write_tree_diff_since(
    lower: Option<&Path>,
    upper: &Path,
    out: impl Write,
    opts: &DiffOptions,
    since: Option<(i64, i64)>,
) -> Result<DiffStats, ImageError> {
    let mut ctx = Ctx::new(out, opts);
    ctx.since = since;
    let mut pending = Vec::new();
    tree_dir(&mut ctx, lower, upper, &[], &mut pending)?;
    ctx.finish()
}

fn flush_pending<W: Write>(
    ctx: &mut Ctx<W>,
    pending: &mut [Option<Meta>],
) -> Result<(), ImageError> {
    for p in pending.iter_mut() {
        if let Some(m) = p.take() {
            ctx.put(&m, None)?;
        }
    }
    Ok(())
}

fn tree_dir<W: Write>(
    ctx: &mut Ctx<W>,
    lower: Option<&Path>,
    upper: &Path,
    rel_dir: &[u8],
    pending: &mut Vec<Option<Meta>>,
) -> Result<(), ImageError> {
    check_depth(upper, rel_dir)?;
    let unames = sorted_names(upper)?;
    let lnames = match lower {
        Some(l) => sorted_names(l)?,
        None => Vec::new(),
    };
    let uset: HashSet<&[u8]> = unames.iter().map(|n| n.as_slice()).collect();
    // deletions first
    for name in &lnames {
        if uset.contains(name.as_slice()) {
            continue;
        }
        let rel = join(rel_dir, name);
        if ctx.excluded(&rel) {
            continue;
        }
        flush_pending(ctx, pending)?;
        ctx.whiteout(rel_dir, name)?;
    }
    let lset: HashSet<&[u8]> = lnames.iter().map(|n| n.as_slice()).collect();
    for name in &unames {
        ctx.check()?;
        let rel = join(rel_dir, name);
        if ctx.excluded(&rel) {
            continue;
        }
        let uabs = upper.join(OsStr::from_bytes(name));
        not_a_whiteout_name(&uabs, name)?;
        let umd = lstat(&uabs)?;
        let lower_child = match lower {
            Some(l) if lset.contains(name.as_slice()) => {
                let labs = l.join(OsStr::from_bytes(name));
                let lmd = lstat(&labs)?;
                Some((labs, lmd))
            }
            _ => None,
        };
        let ust = St::of(&umd);
        let xattrs = if umd.is_symlink() {
            Vec::new()
        } else {
            read_xattrs(&uabs)?
        };
        let meta = ctx.meta(&uabs, rel.clone(), &ust, xattrs, || fs::read_link(&uabs))?;
        let changed = match &lower_child {
            None => true,
            Some((labs, lmd)) => {
                !same_entry(labs, lmd, &uabs, &umd, ctx.since, ctx.opts.cancel.as_ref())?
            }
        };
        if umd.is_dir() {
            let lower_dir = match &lower_child {
                Some((labs, lmd)) if lmd.is_dir() => Some(labs.as_path()),
                _ => None,
            };
            if changed {
                flush_pending(ctx, pending)?;
                ctx.emit(&uabs, &meta, &ust, None)?;
                pending.push(None);
            } else {
                pending.push(Some(meta));
            }
            let r = tree_dir(ctx, lower_dir, &uabs, &rel, pending);
            pending.pop();
            r?;
        } else if changed {
            flush_pending(ctx, pending)?;
            ctx.emit(&uabs, &meta, &ust, None)?;
        }
    }
    Ok(())
}

fn same_entry(
    labs: &Path,
    l: &Metadata,
    uabs: &Path,
    u: &Metadata,
    since: Option<(i64, i64)>,
    cancel: Option<&Cancel>,
) -> Result<bool, ImageError> {
    if l.mode() != u.mode() || l.uid() != u.uid() || l.gid() != u.gid() || l.rdev() != u.rdev() {
        return Ok(false);
    }
    if read_xattrs(labs)? != read_xattrs(uabs)? && !u.file_type().is_symlink() {
        return Ok(false);
    }
    let ft = u.file_type();
    if ft.is_dir() {
        return Ok(true);
    }
    if ft.is_symlink() {
        let a = fs::read_link(labs).map_err(|e| ImageError::path("readlink", labs, e))?;
        let b = fs::read_link(uabs).map_err(|e| ImageError::path("readlink", uabs, e))?;
        return Ok(a == b && l.mtime() == u.mtime() && l.mtime_nsec() == u.mtime_nsec());
    }
    if !ft.is_file() {
        return Ok(l.mtime() == u.mtime() && l.mtime_nsec() == u.mtime_nsec());
    }
    if l.len() != u.len() || l.mtime() != u.mtime() || l.mtime_nsec() != u.mtime_nsec() {
        return Ok(false);
    }
    let touched = since.is_some_and(|t| (u.ctime(), u.ctime_nsec()) >= t);
    if u.mtime_nsec() != 0 && !touched {
        return Ok(true);
    }
    same_content(labs, uabs, cancel)
}

fn same_content(a: &Path, b: &Path, cancel: Option<&Cancel>) -> Result<bool, ImageError> {
    let mut fa = open_nofollow(a)?;
    let mut fb = open_nofollow(b)?;
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        check_cancel(cancel)?;
        let na = read_full(&mut fa, &mut ba).map_err(|e| ImageError::path("read", a, e))?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| ImageError::path("read", b, e))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
