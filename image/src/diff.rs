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
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::tarw::{Kind, Meta, TarWriter};
use crate::ImageError;

/// Options shared by both differs.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DiffOptions {
    /// `SOURCE_DATE_EPOCH`: every mtime later than this is written as this.
    pub clamp_mtime: Option<i64>,
    /// Paths relative to the layer root to leave out with everything below
    /// them (e.g. mount points the executor created).
    pub exclude: Vec<PathBuf>,
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
}

/// The whiteout prefix of the OCI layer format.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// The opaque-directory marker of the OCI layer format.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";

/// Extended attributes that are overlayfs bookkeeping, never layer content.
pub(crate) fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// Extended attributes left out of layers: overlay bookkeeping and the
/// host's SELinux label.
fn skip_xattr(name: &[u8]) -> bool {
    is_overlay_xattr(name) || name == b"security.selinux"
}

fn read_xattrs(path: &Path) -> Result<crate::tarw::Xattrs, ImageError> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::path("listxattr", path, e)),
    };
    let mut out = Vec::new();
    for name in names {
        let nb = name.as_bytes();
        if skip_xattr(nb) {
            continue;
        }
        match xattr::get(path, &name) {
            Ok(Some(v)) => out.push((nb.to_vec(), v)),
            Ok(None) => {}
            Err(e) => return Err(ImageError::path("getxattr", path, e)),
        }
    }
    out.sort();
    Ok(out)
}

fn overlay_flag(path: &Path, key: &str) -> Result<Option<Vec<u8>>, ImageError> {
    for prefix in ["trusted.overlay.", "user.overlay."] {
        match xattr::get(path, format!("{prefix}{key}")) {
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
}

impl<W: Write> Ctx<W> {
    fn new(out: W, opts: &DiffOptions) -> Self {
        Ctx {
            tar: TarWriter::new(out),
            exclude: opts.exclude.iter().map(|p| normalize_rel(p)).collect(),
            opts: opts.clone(),
            links: HashMap::new(),
            stats: DiffStats::default(),
        }
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

    fn put(&mut self, meta: &Meta, data: Option<&mut dyn Read>) -> Result<(), ImageError> {
        self.tar.append(meta, data)?;
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

    /// Describe `abs` (already lstat'ed as `md`) as a tar entry at `rel`.
    fn meta(&mut self, abs: &Path, rel: Vec<u8>, md: &Metadata) -> Result<Meta, ImageError> {
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            let t = fs::read_link(abs).map_err(|e| ImageError::path("readlink", abs, e))?;
            Kind::Symlink(t.as_os_str().as_bytes().to_vec())
        } else if ft.is_char_device() {
            Kind::Char(dev_major(md.rdev()), dev_minor(md.rdev()))
        } else if ft.is_block_device() {
            Kind::Block(dev_major(md.rdev()), dev_minor(md.rdev()))
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_file() {
            Kind::Regular(md.len())
        } else {
            return Err(ImageError::Unsupported(format!(
                "{}: sockets cannot be stored in a layer",
                abs.display()
            )));
        };
        let xattrs = if ft.is_symlink() {
            Vec::new()
        } else {
            read_xattrs(abs)?
        };
        Ok(Meta {
            path: rel,
            kind,
            mode: md.mode() & 0o7777,
            uid: u64::from(md.uid()),
            gid: u64::from(md.gid()),
            mtime: self.clamp(md.mtime()),
            xattrs,
        })
    }

    /// Write `meta` (from [`Ctx::meta`]) with the content of `abs`; a second
    /// name of an inode already in this layer becomes a hardlink entry.
    fn emit(&mut self, abs: &Path, meta: &Meta, md: &Metadata) -> Result<(), ImageError> {
        if md.is_file() && md.nlink() > 1 {
            let key = (md.dev(), md.ino());
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
        if let Kind::Regular(n) = meta.kind {
            if n > 0 {
                let mut f = open_nofollow(abs)?;
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

fn is_whiteout_dev(md: &Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
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
    overlay_dir(&mut ctx, upper, &[])?;
    ctx.finish()
}

fn overlay_dir<W: Write>(
    ctx: &mut Ctx<W>,
    abs_dir: &Path,
    rel_dir: &[u8],
) -> Result<(), ImageError> {
    let names = sorted_names(abs_dir)?;
    let mut rest = Vec::with_capacity(names.len());
    for name in names {
        let abs = abs_dir.join(OsStr::from_bytes(&name));
        let rel = join(rel_dir, &name);
        if ctx.excluded(&rel) {
            continue;
        }
        let md = lstat(&abs)?;
        if is_whiteout_dev(&md) {
            ctx.whiteout(rel_dir, &name)?;
        } else {
            rest.push((abs, rel, md));
        }
    }
    for (abs, rel, md) in rest {
        if md.is_dir() {
            if overlay_flag(&abs, "redirect")?.is_some() {
                return Err(ImageError::Unsupported(format!(
                    "{}: overlay redirect_dir is in use; mount with redirect_dir=off",
                    abs.display()
                )));
            }
        } else if md.is_file() && overlay_flag(&abs, "metacopy")?.is_some() {
            return Err(ImageError::Unsupported(format!(
                "{}: overlay metacopy is in use; mount with metacopy=off",
                abs.display()
            )));
        }
        let meta = ctx.meta(&abs, rel.clone(), &md)?;
        ctx.emit(&abs, &meta, &md)?;
        if md.is_dir() {
            if overlay_flag(&abs, "opaque")?.as_deref() == Some(b"y") {
                ctx.opaque(&meta)?;
            }
            overlay_dir(ctx, &abs, &rel)?;
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
    let mut ctx = Ctx::new(out, opts);
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
        let rel = join(rel_dir, name);
        if ctx.excluded(&rel) {
            continue;
        }
        let uabs = upper.join(OsStr::from_bytes(name));
        let umd = lstat(&uabs)?;
        let lower_child = match lower {
            Some(l) if lset.contains(name.as_slice()) => {
                let labs = l.join(OsStr::from_bytes(name));
                let lmd = lstat(&labs)?;
                Some((labs, lmd))
            }
            _ => None,
        };
        let meta = ctx.meta(&uabs, rel.clone(), &umd)?;
        let changed = match &lower_child {
            None => true,
            Some((labs, lmd)) => !same_entry(labs, lmd, &uabs, &umd)?,
        };
        if umd.is_dir() {
            let lower_dir = match &lower_child {
                Some((labs, lmd)) if lmd.is_dir() => Some(labs.as_path()),
                _ => None,
            };
            if changed {
                flush_pending(ctx, pending)?;
                ctx.emit(&uabs, &meta, &umd)?;
                pending.push(None);
            } else {
                pending.push(Some(meta));
            }
            let r = tree_dir(ctx, lower_dir, &uabs, &rel, pending);
            pending.pop();
            r?;
        } else if changed {
            flush_pending(ctx, pending)?;
            ctx.emit(&uabs, &meta, &umd)?;
        }
    }
    Ok(())
}

fn same_entry(labs: &Path, l: &Metadata, uabs: &Path, u: &Metadata) -> Result<bool, ImageError> {
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
    if u.mtime_nsec() != 0 {
        return Ok(true);
    }
    same_content(labs, uabs)
}

fn same_content(a: &Path, b: &Path) -> Result<bool, ImageError> {
    let mut fa = open_nofollow(a)?;
    let mut fb = open_nofollow(b)?;
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
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
