//! The applier: OCI layer tar -> directory, confined to the directory.
//!
//! Every path is cleaned lexically first (a `..` that would climb above the
//! root is an error). Parent directories are then opened with `openat2(2)`
//! and `RESOLVE_IN_ROOT`, so symlinks met along the way — absolute or
//! relative, planted by this layer or an earlier one — resolve as if the
//! root were `/`. The final component is always handled with `*at` calls
//! that do not follow it (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `O_EXCL`).
//! Nothing outside `root` is ever created, written or removed.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

use crate::diff::{is_overlay_xattr, WHITEOUT_OPAQUE, WHITEOUT_PREFIX};
use crate::ImageError;

/// What to do with whiteouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// The target is an overlay upperdir: write whiteouts as 0/0 character
    /// devices and opaque markers as `trusted.overlay.opaque=y`.
    Overlay,
    /// The target is a full tree: delete what whiteouts name.
    Delete,
}

/// Counts from one apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries created (files, dirs, links, nodes).
    pub entries: u64,
    /// Whiteouts and opaque markers honoured.
    pub whiteouts: u64,
    /// Bytes of regular-file content written.
    pub content_bytes: u64,
    /// Entries skipped because their tar type has no meaning here
    /// (GNU sparse files, volume labels, ...).
    pub skipped: u64,
    /// Device nodes left out because [`ApplyOptions::skip_devices`] was
    /// set (and hard links to them), by path inside the root.
    pub skipped_devices: Vec<PathBuf>,
}

/// How [`apply_layer_with`] applies a layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Leave character and block device nodes out (listed in
    /// [`ApplyStats::skipped_devices`]): for trees on the host, such as a
    /// `type=local` export, where a node from an untrusted image would
    /// give whoever can open it the host's device.
    pub skip_devices: bool,
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn cstr(b: &[u8]) -> Result<CString, ImageError> {
    CString::new(b).map_err(|_| ImageError::UnsafePath(String::from_utf8_lossy(b).into_owned()))
}

fn display(comps: &[Vec<u8>]) -> PathBuf {
    let mut p = PathBuf::new();
    for c in comps {
        p.push(OsStr::from_bytes(c));
    }
    p
}

/// Clean a tar path: drop leading `/`, `.` and empty components; resolve
/// `..` lexically; a `..` above the root is an error.
pub(crate) fn clean(raw: &[u8]) -> Result<Vec<Vec<u8>>, ImageError> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(ImageError::UnsafePath(
                        String::from_utf8_lossy(raw).into_owned(),
                    ));
                }
            }
            c => {
                if c.contains(&0) {
                    return Err(ImageError::UnsafePath(
                        String::from_utf8_lossy(raw).into_owned(),
                    ));
                }
                out.push(c.to_vec())
            }
        }
    }
    Ok(out)
}

struct Root {
    fd: OwnedFd,
}

impl Root {
    fn open(root: &Path) -> Result<Root, ImageError> {
        let fd = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| ImageError::path("open", root, io::Error::from(e)))?;
        Ok(Root { fd })
    }

    /// Open the directory `comps` inside the root (symlinks confined).
    fn open_dir(&self, comps: &[Vec<u8>], flags: OFlag) -> io::Result<OwnedFd> {
        let joined = if comps.is_empty() {
            b".".to_vec()
        } else {
            comps.join(&b'/')
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let p = OsStr::from_bytes(&joined);
        nix::fcntl::openat2(self.fd.as_fd(), p, how).map_err(io::Error::from)
    }

    /// Open (creating missing directories with mode 0755) the directory
    /// `comps` inside the root.
    fn ensure_dir(&self, comps: &[Vec<u8>]) -> io::Result<OwnedFd> {
        match self.open_dir(comps, OFlag::O_PATH) {
            Ok(fd) => Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !comps.is_empty() => {
                let parent = self.ensure_dir(&comps[..comps.len() - 1])?;
                let name = CString::new(comps[comps.len() - 1].clone())
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                // SAFETY: valid fd and NUL-terminated name.
                let r = unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) };
                if r != 0 {
                    let e = errno();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
                self.open_dir(comps, OFlag::O_PATH)
            }
            Err(e) => Err(e),
        }
    }
}

fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid fd, NUL-terminated name, out pointer to a stat.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        let e = errno();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        return Err(e);
    }
    // SAFETY: fstatat succeeded and filled the struct.
    Ok(Some(unsafe { st.assume_init() }))
}

fn openat_raw(dir: RawFd, name: &CStr, flags: i32, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: valid fd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: openat returned a fresh descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Names in the directory `dir` (excluding `.` and `..`).
fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let fd = openat_raw(dir.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: raw is an open directory fd; fdopendir takes ownership.
    let dp = unsafe { libc::fdopendir(raw) };
    if dp.is_null() {
        let e = errno();
        // SAFETY: fdopendir failed, so we still own raw.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: dp is a valid DIR*.
        let ent = unsafe { libc::readdir(dp) };
        if ent.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        let b = name.to_bytes();
        if b != b"." && b != b".." {
            names.push(name.to_owned());
        }
    }
    // SAFETY: dp is valid and closed once.
    unsafe { libc::closedir(dp) };
    Ok(names)
}

/// Remove `name` in `dir` and, if it is a directory, everything below it,
/// never following symlinks.
fn remove_all_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = errno();
    match e.raw_os_error() {
        Some(libc::ENOENT) => return Ok(()),
        Some(libc::EISDIR) | Some(libc::EPERM) => {}
        _ => return Err(e),
    }
    let sub = openat_raw(
        dir.as_raw_fd(),
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    for child in list_dir(sub.as_fd())? {
        remove_all_at(sub.as_fd(), &child)?;
    }
    // SAFETY: valid fd and NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
        let e = errno();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    Ok(())
}

fn set_xattr_fd(fd: RawFd, name: &[u8], value: &[u8], via_proc: bool) -> io::Result<()> {
    let cname = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let r = if via_proc {
        // O_PATH descriptors (device nodes, fifos) take xattrs through their
        // /proc magic link, which names exactly this inode.
        let p = CString::new(format!("/proc/self/fd/{fd}"))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: valid C strings and buffer.
        unsafe {
            libc::setxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        }
    } else {
        // SAFETY: valid fd, C string and buffer.
        unsafe { libc::fsetxattr(fd, cname.as_ptr(), value.as_ptr().cast(), value.len(), 0) }
    };
    if r != 0 {
        return Err(errno());
    }
    Ok(())
}

struct Entry {
    comps: Vec<Vec<u8>>,
    kind: tar::EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    link: Option<Vec<u8>>,
    dev: (u32, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Per-entry overrides gathered from PAX / GNU long-name headers.
#[derive(Default)]
struct Pending {
    pax: Vec<(Vec<u8>, Vec<u8>)>,
    global: Vec<(Vec<u8>, Vec<u8>)>,
    gnu_name: Option<Vec<u8>>,
    gnu_link: Option<Vec<u8>>,
}

fn read_meta_data<R: Read>(e: &mut tar::Entry<'_, R>) -> Result<Vec<u8>, ImageError> {
    let size = e.header().entry_size()?;
    if size > 16 * 1024 * 1024 {
        return Err(ImageError::Archive(format!(
            "metadata header of {size} bytes"
        )));
    }
    let mut d = Vec::with_capacity(size as usize);
    e.read_to_end(&mut d)?;
    Ok(d)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn read_entry<R: Read>(
    e: &mut tar::Entry<'_, R>,
    pending: &mut Pending,
) -> Result<Entry, ImageError> {
    let pax = std::mem::take(&mut pending.pax);
    let gnu_name = pending.gnu_name.take();
    let gnu_link = pending.gnu_link.take();
    let find = |key: &[u8]| -> Option<Vec<u8>> {
        pax.iter()
            .rev()
            .chain(pending.global.iter().rev())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let num = |key: &[u8]| -> Option<u64> {
        find(key).and_then(|v| {
            std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.split('.').next().and_then(|s| s.parse().ok()))
        })
    };
    let raw = find(b"path")
        .or(gnu_name)
        .unwrap_or_else(|| e.path_bytes().into_owned());
    let comps = clean(&raw)?;
    let h = e.header();
    let kind = h.entry_type();
    let mode = h.mode()?;
    let uid = num(b"uid").map_or_else(|| h.uid(), Ok)?;
    let gid = num(b"gid").map_or_else(|| h.gid(), Ok)?;
    let mtime = num(b"mtime").map_or_else(|| h.mtime(), Ok)? as i64;
    let dev = (
        h.device_major().ok().flatten().unwrap_or(0),
        h.device_minor().ok().flatten().unwrap_or(0),
    );
    let link = find(b"linkpath")
        .or(gnu_link)
        .or_else(|| e.link_name_bytes().map(|c| c.into_owned()));
    let mut xattrs = Vec::new();
    for (k, v) in &pax {
        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
            if !is_overlay_xattr(name) {
                xattrs.push((name.to_vec(), v.clone()));
            }
        }
    }
    let to_u32 =
        |v: u64| u32::try_from(v).map_err(|_| ImageError::Archive(format!("id {v} out of range")));
    Ok(Entry {
        comps,
        kind,
        mode,
        uid: to_u32(uid)?,
        gid: to_u32(gid)?,
        mtime,
        link,
        dev,
        xattrs,
    })
}

struct Applier {
    root: Root,
    mode: WhiteoutMode,
    opts: ApplyOptions,
    created: HashSet<Vec<Vec<u8>>>,
    skipped_devices: HashSet<Vec<Vec<u8>>>,
    dir_times: Vec<(Vec<Vec<u8>>, i64)>,
    stats: ApplyStats,
}

/// Apply an uncompressed layer tar to `root`.
///
/// Keeps modes (setuid/setgid/sticky too), ownership, mtimes, xattrs
/// (including `security.capability`), hardlinks, symlinks, device nodes and
/// fifos. Whiteouts are handled according to `mode`. Entries whose names
/// climb out of the root with `..` fail the apply with
/// [`ImageError::UnsafePath`]; absolute names and symlinks are confined to
/// `root`. For compressed layers wrap the reader with
/// [`crate::compression::decompress_auto`].
pub fn apply_layer(
    tar: impl Read,
    root: &Path,
    mode: WhiteoutMode,
) -> Result<ApplyStats, ImageError> {
    apply_layer_with(tar, root, mode, &ApplyOptions::default())
}

/// [`apply_layer`] with options (e.g. leaving device nodes out).
pub fn apply_layer_with(
    tar: impl Read,
    root: &Path,
    mode: WhiteoutMode,
    opts: &ApplyOptions,
) -> Result<ApplyStats, ImageError> {
    let mut ap = Applier {
        root: Root::open(root)?,
        mode,
        opts: *opts,
        created: HashSet::new(),
        skipped_devices: HashSet::new(),
        dir_times: Vec::new(),
        stats: ApplyStats::default(),
    };
    let mut ar = tar::Archive::new(tar);
    let mut pending = Pending::default();
    // raw mode: PAX and GNU long-name headers are parsed here, because the
    // tar crate's PAX parser splits on newlines and binary xattr values
    // (security.capability) may contain them
    for entry in ar.entries()?.raw(true) {
        let mut entry = entry?;
        match entry.header().entry_type() {
            tar::EntryType::XHeader => {
                pending.pax = crate::tarw::parse_pax(&read_meta_data(&mut entry)?)?;
                continue;
            }
            tar::EntryType::XGlobalHeader => {
                pending.global = crate::tarw::parse_pax(&read_meta_data(&mut entry)?)?;
                continue;
            }
            tar::EntryType::GNULongName => {
                pending.gnu_name = Some(trim_nul(read_meta_data(&mut entry)?));
                continue;
            }
            tar::EntryType::GNULongLink => {
                pending.gnu_link = Some(trim_nul(read_meta_data(&mut entry)?));
                continue;
            }
            _ => {}
        }
        let meta = read_entry(&mut entry, &mut pending)?;
        ap.apply(meta, &mut entry)?;
    }
    // directory mtimes last (children changed them), deepest first
    let times = std::mem::take(&mut ap.dir_times);
    for (comps, mtime) in times.into_iter().rev() {
        let (parent, name) = comps.split_at(comps.len() - 1);
        let pfd = ap
            .root
            .open_dir(parent, OFlag::O_PATH)
            .map_err(|e| ImageError::path("open", display(parent), e))?;
        let cname = cstr(&name[0])?;
        set_times(pfd.as_fd(), &cname, mtime)
            .map_err(|e| ImageError::path("utimensat", display(&comps), e))?;
    }
    Ok(ap.stats)
}

fn set_times(dir: BorrowedFd<'_>, name: &CStr, mtime: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: valid fd, C string, and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(errno());
    }
    Ok(())
}

impl Applier {
    fn apply(&mut self, e: Entry, data: &mut dyn Read) -> Result<(), ImageError> {
        let Some((name, parent)) = e.comps.split_last() else {
            // the root itself ("./"): leave the target root as it is
            return Ok(());
        };
        let path = display(&e.comps);
        let perr = |op: &'static str| {
            let path = path.clone();
            move |err: io::Error| ImageError::path(op, path, err)
        };
        if name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(parent, name, &path);
        }
        if self.opts.skip_devices {
            let device = matches!(e.kind, tar::EntryType::Char | tar::EntryType::Block);
            let link_to_device = e.kind == tar::EntryType::Link
                && e.link
                    .as_deref()
                    .is_some_and(|l| clean(l).is_ok_and(|c| self.skipped_devices.contains(&c)));
            if device || link_to_device {
                // The node would have replaced what an earlier layer had.
                if let (Ok(pfd), Ok(c)) = (self.root.open_dir(parent, OFlag::O_PATH), cstr(name)) {
                    remove_all_at(pfd.as_fd(), &c).map_err(perr("remove"))?;
                }
                self.skipped_devices.insert(e.comps.clone());
                self.stats.skipped_devices.push(path);
                return Ok(());
            }
        }
        let pfd = self
            .root
            .ensure_dir(parent)
            .map_err(perr("mkdir parents of"))?;
        let cname = cstr(name)?;
        let is_dir = e.kind == tar::EntryType::Directory;
        if let Some(st) = lstat_at(pfd.as_fd(), &cname).map_err(perr("lstat"))? {
            let existing_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            if !(is_dir && existing_dir) {
                remove_all_at(pfd.as_fd(), &cname).map_err(perr("remove"))?;
            }
        }
        let dfd = pfd.as_raw_fd();
        let mut file: Option<File> = None;
        use tar::EntryType as T;
        match e.kind {
            T::Regular | T::Continuous => {
                let fd = openat_raw(
                    dfd,
                    &cname,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                )
                .map_err(perr("create"))?;
                let mut f = File::from(fd);
                let n = io::copy(data, &mut f).map_err(perr("write"))?;
                self.stats.content_bytes += n;
                file = Some(f);
            }
            T::Directory => {
                // SAFETY: valid fd and C string.
                if unsafe { libc::mkdirat(dfd, cname.as_ptr(), 0o700) } != 0 {
                    let err = errno();
                    if err.raw_os_error() != Some(libc::EEXIST) {
                        return Err(ImageError::path("mkdir", path, err));
                    }
                }
            }
            T::Symlink => {
                let target = cstr(e.link.as_deref().unwrap_or(b""))?;
                // SAFETY: valid fd and C strings.
                if unsafe { libc::symlinkat(target.as_ptr(), dfd, cname.as_ptr()) } != 0 {
                    return Err(ImageError::path("symlink", path, errno()));
                }
            }
            T::Link => {
                let raw = e.link.as_deref().unwrap_or(b"");
                let tcomps = clean(raw)?;
                let Some((tname, tparent)) = tcomps.split_last() else {
                    return Err(ImageError::UnsafePath(format!(
                        "{}: hardlink to the root",
                        path.display()
                    )));
                };
                let tfd = self
                    .root
                    .open_dir(tparent, OFlag::O_PATH)
                    .map_err(perr("resolve hardlink target of"))?;
                let tc = cstr(tname)?;
                // SAFETY: valid fds and C strings; flags 0 = do not follow.
                if unsafe { libc::linkat(tfd.as_raw_fd(), tc.as_ptr(), dfd, cname.as_ptr(), 0) }
                    != 0
                {
                    return Err(ImageError::path("link", path, errno()));
                }
                self.created.insert(e.comps.clone());
                self.stats.entries += 1;
                // a hardlink shares the target's metadata
                return Ok(());
            }
            T::Char | T::Block | T::Fifo => {
                let kind = match e.kind {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let dev = libc::makedev(e.dev.0, e.dev.1);
                // SAFETY: valid fd and C string.
                if unsafe { libc::mknodat(dfd, cname.as_ptr(), kind | 0o600, dev) } != 0 {
                    return Err(ImageError::path("mknod", path, errno()));
                }
            }
            _ => {
                self.stats.skipped += 1;
                return Ok(());
            }
        }
        self.created.insert(e.comps.clone());
        self.stats.entries += 1;
        // ownership first: chown clears setuid bits and security.capability
        // SAFETY: valid fd and C string.
        if unsafe { libc::fchownat(dfd, cname.as_ptr(), e.uid, e.gid, libc::AT_SYMLINK_NOFOLLOW) }
            != 0
        {
            return Err(ImageError::path("chown", path, errno()));
        }
        if e.kind != T::Symlink {
            let r = match &file {
                // SAFETY: valid fd.
                Some(f) => unsafe { libc::fchmod(f.as_raw_fd(), e.mode & 0o7777) },
                // not a symlink (we just created it), so following is moot
                // SAFETY: valid fd and C string.
                None => unsafe { libc::fchmodat(dfd, cname.as_ptr(), e.mode & 0o7777, 0) },
            };
            if r != 0 {
                return Err(ImageError::path("chmod", path, errno()));
            }
        }
        if !e.xattrs.is_empty() {
            self.set_xattrs(&e, dfd, &cname, file.as_ref(), &path)?;
        }
        if e.kind == T::Directory {
            self.dir_times.push((e.comps.clone(), e.mtime));
        } else {
            drop(file);
            set_times(pfd.as_fd(), &cname, e.mtime).map_err(perr("utimensat"))?;
        }
        Ok(())
    }

    fn set_xattrs(
        &self,
        e: &Entry,
        dfd: RawFd,
        cname: &CStr,
        file: Option<&File>,
        path: &Path,
    ) -> Result<(), ImageError> {
        use tar::EntryType as T;
        let (owned, via_proc) = match (file, e.kind) {
            (Some(_), _) => (None, false),
            (None, T::Directory) => (
                Some(
                    openat_raw(
                        dfd,
                        cname,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    )
                    .map_err(|err| ImageError::path("open", path, err))?,
                ),
                false,
            ),
            (None, _) => (
                Some(
                    openat_raw(dfd, cname, libc::O_PATH | libc::O_NOFOLLOW, 0)
                        .map_err(|err| ImageError::path("open", path, err))?,
                ),
                true,
            ),
        };
        let fd = match (&owned, file) {
            (Some(o), _) => o.as_raw_fd(),
            (None, Some(f)) => f.as_raw_fd(),
            (None, None) => return Ok(()),
        };
        for (k, v) in &e.xattrs {
            if let Err(err) = set_xattr_fd(fd, k, v, via_proc) {
                // user.* xattrs are not allowed on symlinks and device nodes;
                // a filesystem may lack a namespace. Those are not fatal.
                let benign = matches!(err.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOTSUP))
                    && (e.kind == T::Symlink || !k.starts_with(b"security.capability"));
                if !benign {
                    return Err(ImageError::path("setxattr", path, err));
                }
            }
        }
        Ok(())
    }

    fn whiteout(&mut self, parent: &[Vec<u8>], name: &[u8], path: &Path) -> Result<(), ImageError> {
        let perr = |op: &'static str| {
            let path = path.to_path_buf();
            move |err: io::Error| ImageError::path(op, path, err)
        };
        self.stats.whiteouts += 1;
        if name == WHITEOUT_OPAQUE.as_bytes() {
            let dfd = self
                .root
                .ensure_dir(parent)
                .map_err(perr("mkdir opaque dir"))?;
            match self.mode {
                WhiteoutMode::Overlay => {
                    let fd = self
                        .root
                        .open_dir(parent, OFlag::O_RDONLY)
                        .map_err(perr("open opaque dir"))?;
                    set_xattr_fd(fd.as_raw_fd(), b"trusted.overlay.opaque", b"y", false)
                        .map_err(perr("setxattr trusted.overlay.opaque"))?;
                }
                WhiteoutMode::Delete => {
                    for child in list_dir(dfd.as_fd()).map_err(perr("readdir"))? {
                        let mut c = parent.to_vec();
                        c.push(child.to_bytes().to_vec());
                        if !self.created.contains(&c) {
                            remove_all_at(dfd.as_fd(), &child).map_err(perr("remove"))?;
                        }
                    }
                }
            }
            return Ok(());
        }
        if name.starts_with(b".wh..wh.") {
            // other AUFS bookkeeping names: meaningless here
            self.stats.whiteouts -= 1;
            self.stats.skipped += 1;
            return Ok(());
        }
        let target = &name[WHITEOUT_PREFIX.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(ImageError::UnsafePath(path.display().to_string()));
        }
        let ctarget = cstr(target)?;
        match self.mode {
            WhiteoutMode::Delete => {
                let dfd = match self.root.open_dir(parent, OFlag::O_PATH) {
                    Ok(fd) => fd,
                    Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                    Err(err) => return Err(ImageError::path("open", path, err)),
                };
                remove_all_at(dfd.as_fd(), &ctarget).map_err(perr("remove"))?;
            }
            WhiteoutMode::Overlay => {
                let dfd = self
                    .root
                    .ensure_dir(parent)
                    .map_err(perr("mkdir parents of"))?;
                remove_all_at(dfd.as_fd(), &ctarget).map_err(perr("remove"))?;
                // SAFETY: valid fd and C string.
                if unsafe { libc::mknodat(dfd.as_raw_fd(), ctarget.as_ptr(), libc::S_IFCHR, 0) }
                    != 0
                {
                    return Err(ImageError::path("mknod whiteout", path, errno()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_devices_leaves_nodes_and_links_to_them_out() {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, kind: tar::EntryType, link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(0o644);
            h.set_size(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            if kind == tar::EntryType::Block {
                h.set_device_major(7).unwrap();
                h.set_device_minor(0).unwrap();
            }
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            b.append_data(&mut h, name, &[][..]).unwrap();
        };
        add("dev/", tar::EntryType::Directory, None);
        add("dev/loop", tar::EntryType::Block, None);
        add("dev/again", tar::EntryType::Link, Some("dev/loop"));
        add("dev/fifo", tar::EntryType::Fifo, None);
        add("file", tar::EntryType::Regular, None);
        let bytes = b.into_inner().unwrap();
        let t = tempfile::tempdir().unwrap();
        let opts = ApplyOptions { skip_devices: true };
        let st = apply_layer_with(&bytes[..], t.path(), WhiteoutMode::Delete, &opts).unwrap();
        assert_eq!(
            st.skipped_devices,
            vec![PathBuf::from("dev/loop"), PathBuf::from("dev/again")]
        );
        assert!(std::fs::symlink_metadata(t.path().join("dev/loop")).is_err());
        assert!(std::fs::symlink_metadata(t.path().join("dev/again")).is_err());
        assert!(t.path().join("dev/fifo").exists() && t.path().join("file").exists());
    }

    #[test]
    fn clean_paths() {
        let c = |s: &str| clean(s.as_bytes()).map(|v| v.join(&b'/'));
        assert_eq!(c("./a/b/").ok(), Some(b"a/b".to_vec()));
        assert_eq!(c("/abs/x").ok(), Some(b"abs/x".to_vec()));
        assert_eq!(c("a/../b").ok(), Some(b"b".to_vec()));
        assert!(c("../../etc/x").is_err());
        assert!(c("a/../../x").is_err());
        assert_eq!(c(".").ok(), Some(Vec::new()));
    }
}
