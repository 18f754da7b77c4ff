//! Safe trees: the one way kiln writes into a directory tree it does not
//! trust.
//!
//! **What this room is for.** Every write into a snapshot, a layer being
//! built (an overlay upperdir), a container rootfs or an export directory
//! goes through this crate. Such trees hold symlinks planted by a build
//! context, a base image or a RUN step; a write that names a host path and
//! lets the kernel follow those links (`std::fs::write`, `set_permissions`,
//! `create_dir_all`) can land anywhere on the host. Here a path is never
//! handed to the kernel whole: a [`Root`] is an open directory descriptor,
//! paths inside it are resolved with `openat2(2)` (`RESOLVE_IN_ROOT` or
//! `RESOLVE_NO_SYMLINKS`, always `RESOLVE_NO_MAGICLINKS`) or one component
//! at a time with `O_NOFOLLOW`, and every change is an `*at` call relative
//! to an open parent [`Dir`] that never follows the final component.
//!
//! **What it owns.** Resolution inside a root, in the two ways a caller
//! must choose between explicitly ([`Follow`]):
//!
//! * [`Follow::InRoot`] — symlinks met on the way are followed *as if the
//!   root were `/`* (an absolute link or a `..` never leaves it). This is
//!   how BuildKit resolves a destination inside an image: the link stays,
//!   the write lands at its target inside the image.
//! * [`Follow::Never`] — any symlink on the way is an error. For trees
//!   whose links were already resolved elsewhere, e.g. an overlay
//!   upperdir whose paths kiln resolves through the merged view of all its
//!   layers: a link in the upper alone means nothing, and following it on
//!   the host would be an escape.
//!
//! The final component of a path is never followed by a write: [`Dir`]'s
//! operations take a single name and use `O_NOFOLLOW`,
//! `AT_SYMLINK_NOFOLLOW`, `O_EXCL` or their equivalents.
//!
//! **What it must not do.** Know about images, layers, whiteouts policy,
//! Dockerfiles or the store: it depends on no other kiln crate. It never
//! opens a device node it meets for reading or writing (only `O_PATH`),
//! and never resolves a path through the host's `/`.
//!
//! Also here, because every crate that handles trees needs them and this
//! one depends on none: [`overlay`] (the overlay format — whiteouts, opaque
//! markers, the `trusted.`/`user.` xattr namespace, lowerdir compaction),
//! [`path`] (Go's `path.Clean` over byte paths), [`userdb`] (passwd/group
//! parsing and user resolution), [`idmap`] (this process's user namespace
//! id maps: rootless or not, which ids exist) and [`Root::walk`] (the tree
//! walker).
//!
//! Keeping per-directory work cheap is the caller's side of the bargain:
//! open a parent [`Dir`] once and make many `*at` calls on it, rather than
//! resolving a full path per file.
//!
//! ```no_run
//! use kiln_fs::{Create, DirSpec, Follow, Root};
//! # fn main() -> Result<(), kiln_fs::Error> {
//! let root = Root::open("/var/lib/kiln/snapshots/42/fs")?;
//! // `/etc` may be a symlink planted by the image: it resolves inside.
//! let etc = root.mkdir_all("etc/app", Follow::InRoot, &DirSpec::default())?;
//! let mut f = etc.create_file("conf", 0o644, Create::Replace)?;
//! std::io::Write::write_all(&mut f, b"x=1\n").map_err(|e| etc.error("write", "conf", e))?;
//! etc.chown("conf", 0, 0)?;
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The process umask (read from `/proc/self/status`, which leaves it
/// unchanged; 022 when it cannot be read). Files kiln writes for the user
/// outside its store (`save -o`, `-o type=oci,tar=false`) get
/// `0666 & !umask`, as an ordinary `creat(2)` would.
pub fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Gives a file opened through a [`Dir`] (e.g. by [`Dir::create_file`],
/// once its content is written) its owner, when given, then its permission
/// bits: chown first, because it clears set-id bits. Works on the
/// descriptor, never on a path.
pub fn set_owner_mode(f: &File, owner: Option<(u32, u32)>, mode: u32) -> io::Result<()> {
    if let Some((uid, gid)) = owner {
        // SAFETY: a valid descriptor.
        if unsafe { libc::fchown(f.as_raw_fd(), uid, gid) } != 0 {
            return Err(chown_errno(uid, gid));
        }
    }
    // SAFETY: a valid descriptor.
    if unsafe { libc::fchmod(f.as_raw_fd(), mode & 0o7777) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// The error of a chown to `uid:gid` that just failed (read from errno):
/// errno, or, when the ids do not exist in this user namespace (EINVAL
/// under a rootless map), an error that names the id and the map.
pub fn chown_errno(uid: u32, gid: u32) -> io::Error {
    let e = errno();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return e;
    }
    let maps = idmap::IdMaps::current();
    let message = if maps.in_userns && !maps.maps_uid(uid) {
        maps.unmapped_message(idmap::IdKind::Uid, uid)
    } else if maps.in_userns && !maps.maps_gid(gid) {
        maps.unmapped_message(idmap::IdKind::Gid, gid)
    } else {
        return e;
    };
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// How many symlinks one resolution may follow (Linux's own limit).
const MAX_HOPS: usize = 40;

/// A failed operation on a tree, with the operation and the path it was
/// about (the root's host path joined with the path inside it).
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct Error {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl Error {
    /// An error of `op` on `path`.
    pub fn new(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error {
            op,
            path: path.into(),
            source,
        }
    }

    /// The operation that failed (`"open"`, `"mkdir"`, …).
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The path it failed on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying I/O error's kind.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }

    /// The underlying OS error number, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// The underlying I/O error.
    pub fn io(&self) -> &io::Error {
        &self.source
    }

    /// True when the error says the entry does not exist.
    pub fn is_not_found(&self) -> bool {
        self.raw_os_error() == Some(libc::ENOENT)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// How symlinks met while resolving a path inside a [`Root`] are treated.
/// (The final component of a write is never followed; see [`Dir`].)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// Follow them as if the root were `/`: absolute targets and `..`
    /// stay inside the root (`RESOLVE_IN_ROOT`). Image semantics.
    InRoot,
    /// A symlink anywhere on the way is an error (`ELOOP`). For trees
    /// whose paths were resolved elsewhere (an overlay upperdir).
    Never,
}

/// What [`Root::mkdir_all_ext`] does with a directory that is missing
/// because a symlink on the way names something that does not exist (a
/// dangling link).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dangling {
    /// Create the link's target inside the root, as BuildKit's (and
    /// containerd's) `MkdirAll` through `fs.RootPath` does.
    Create,
    /// Fail with `ENOENT` and create nothing there: how kiln's layer
    /// applier has always treated a member below a dangling link (and how
    /// Docker's chrooted unpacker does), and how mount points are made (a
    /// mount then fails with a clear message instead of creating a
    /// directory the image never had).
    Fail,
}

/// How [`Dir::create_file`] treats an existing entry of that name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    /// Fail with `EEXIST` if anything has the name.
    Exclusive,
    /// Open an existing regular file and truncate it (its other hard
    /// links see the change); fail on a symlink (`ELOOP`) or a directory.
    Truncate,
    /// Remove whatever has the name (a directory with everything below
    /// it, a symlink itself, never its target), then create afresh: other
    /// hard links of an old file keep their content.
    Replace,
}

/// Mode, owner and time given to directories that [`Root::mkdir_all`]
/// creates (existing ones are left as they are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirSpec {
    /// Permission bits (applied with chmod, so the umask does not apply).
    pub mode: u32,
    /// Owner (uid, gid); `None` keeps the creating process's.
    pub owner: Option<(u32, u32)>,
    /// Access and modification time (seconds, nanoseconds); `None` = now.
    pub mtime: Option<(i64, i64)>,
}

impl Default for DirSpec {
    fn default() -> Self {
        DirSpec {
            mode: 0o755,
            owner: None,
            mtime: None,
        }
    }
}

/// What `lstat` says about an entry (never a symlink's target).
#[derive(Clone, Copy, Debug)]
pub struct Stat(libc::stat);

impl Stat {
    /// `st_mode`: type and permission bits.
    pub fn mode(&self) -> u32 {
        self.0.st_mode
    }
    /// The type bits (`libc::S_IFMT` part of the mode).
    pub fn kind(&self) -> u32 {
        self.0.st_mode & libc::S_IFMT
    }
    /// A directory.
    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
    /// A regular file.
    pub fn is_file(&self) -> bool {
        self.kind() == libc::S_IFREG
    }
    /// A symlink.
    pub fn is_symlink(&self) -> bool {
        self.kind() == libc::S_IFLNK
    }
    /// A character or block device.
    pub fn is_device(&self) -> bool {
        matches!(self.kind(), libc::S_IFCHR | libc::S_IFBLK)
    }
    /// Owner uid.
    pub fn uid(&self) -> u32 {
        self.0.st_uid
    }
    /// Owner gid.
    pub fn gid(&self) -> u32 {
        self.0.st_gid
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.0.st_size as u64
    }
    /// Device number of a device node.
    pub fn rdev(&self) -> u64 {
        self.0.st_rdev
    }
    /// Is this an overlay whiteout (a character device 0:0)?
    pub fn is_whiteout(&self) -> bool {
        overlay::is_whiteout_stat(self.kind(), self.rdev())
    }
    /// Device of the file system holding the entry.
    pub fn dev(&self) -> u64 {
        self.0.st_dev
    }
    /// Inode number.
    pub fn ino(&self) -> u64 {
        self.0.st_ino
    }
    /// Number of hard links.
    pub fn nlink(&self) -> u64 {
        self.0.st_nlink
    }
    /// Disk space allocated, in bytes (`st_blocks` × 512).
    pub fn allocated(&self) -> u64 {
        (self.0.st_blocks as u64).saturating_mul(512)
    }
    /// Modification time (seconds, nanoseconds).
    pub fn mtime(&self) -> (i64, i64) {
        (self.0.st_mtime, self.0.st_mtime_nsec)
    }
    /// Access time (seconds, nanoseconds).
    pub fn atime(&self) -> (i64, i64) {
        (self.0.st_atime, self.0.st_atime_nsec)
    }
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn einval(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

/// One name inside a directory: non-empty, no `/`, no NUL, not `.`/`..`.
fn name_c(name: &OsStr) -> io::Result<CString> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(einval("not a single path component"));
    }
    CString::new(b).map_err(|_| einval("a NUL byte in a name"))
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| einval("a NUL byte in a path"))
}

fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: a valid descriptor (or AT_FDCWD) and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat2(dir: RawFd, path: &CStr, flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; zeroed is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    loop {
        // SAFETY: a valid descriptor, a NUL-terminated path and an
        // open_how of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: openat2 returned a fresh descriptor that nothing
            // else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let e = errno();
        // EAGAIN: a concurrent rename raced the resolution; try again.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
}

fn fstatat(dir: RawFd, name: &CStr, flags: i32) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a valid descriptor, a NUL-terminated name and room for the
    // result, which the call fills in full when it returns 0.
    if unsafe { libc::fstatat(dir, name.as_ptr(), st.as_mut_ptr(), flags) } != 0 {
        return Err(errno());
    }
    // SAFETY: filled by the successful call above.
    Ok(unsafe { st.assume_init() })
}

/// The clean components of a path inside a root ([`path::components_in_root`]).
fn clean(rel: &Path) -> Vec<OsString> {
    path::components_in_root(rel.as_os_str().as_bytes())
        .into_iter()
        .map(|c| OsStr::from_bytes(c).to_os_string())
        .collect()
}

/// The components of `p` below `/`, cleaned lexically as Docker cleans a
/// mount destination and Go's `path.Clean` an image path: `.` and empty
/// components dropped, a leading `/` ignored, `..` removes the previous
/// component and never climbs above the root. This is exactly how every
/// [`Root`] method reads the paths it is given.
pub fn clean_components(p: impl AsRef<Path>) -> Vec<OsString> {
    clean(p.as_ref())
}

fn join(comps: &[OsString]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            v.push(b'/');
        }
        v.extend_from_slice(c.as_bytes());
    }
    if v.is_empty() {
        v.push(b'.');
    }
    v
}

fn resolve_flags(follow: Follow) -> u64 {
    match follow {
        Follow::InRoot => libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
        Follow::Never => {
            libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS
        }
    }
}

/// What [`Root::mkdir_all_ext`] calls for each directory it made.
type Made<'a> = &'a mut dyn FnMut(&Dir, &OsStr) -> Result<()>;

/// How the walker creates what is missing.
struct Maker<'a> {
    spec: &'a mut dyn FnMut(&Path) -> DirSpec,
    dangling: Dangling,
    made: Option<Made<'a>>,
}

/// A directory tree kiln writes into: an open `O_PATH` descriptor of its
/// top. Nothing done through it leaves the tree.
#[derive(Debug)]
pub struct Root {
    dir: Dir,
}

impl Root {
    /// Opens the directory `path` (which itself is trusted: a host path
    /// kiln chose, e.g. a snapshot's directory) as a root.
    pub fn open(path: impl AsRef<Path>) -> Result<Root> {
        let path = path.as_ref();
        let c = cstring(path.as_os_str().as_bytes()).map_err(|e| Error::new("open", path, e))?;
        let fd = openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| Error::new("open", path, e))?;
        Ok(Root {
            dir: Dir {
                fd,
                path: path.to_path_buf(),
            },
        })
    }

    /// A directory already opened inside a tree (e.g. a tmpfs mounted in
    /// a rootfs) as a root of its own: nothing done through it leaves it.
    pub fn from_dir(dir: Dir) -> Root {
        Root { dir }
    }

    /// The root's host path (for messages).
    pub fn path(&self) -> &Path {
        &self.dir.path
    }

    /// The root directory itself.
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    fn host(&self, comps: &[OsString]) -> PathBuf {
        let mut p = self.dir.path.clone();
        for c in comps {
            p.push(c);
        }
        p
    }

    /// Opens the directory `rel` inside the root (one `openat2`). The last
    /// component is followed too under [`Follow::InRoot`] (a directory
    /// reached through a link is still that directory).
    pub fn open_dir(&self, rel: impl AsRef<Path>, follow: Follow) -> Result<Dir> {
        let comps = clean(rel.as_ref());
        let host = self.host(&comps);
        let c = cstring(&join(&comps)).map_err(|e| Error::new("open", &host, e))?;
        let fd = openat2(
            self.dir.fd.as_raw_fd(),
            &c,
            libc::O_PATH | libc::O_DIRECTORY,
            resolve_flags(follow),
        )
        .map_err(|e| Error::new("open", &host, e))?;
        Ok(Dir { fd, path: host })
    }

    /// Opens the parent directory of `rel` (resolved as
    /// [`Root::open_dir`]) and returns it with the final name, which is
    /// not resolved at all. `rel` naming the root itself is an error.
    pub fn parent(&self, rel: impl AsRef<Path>, follow: Follow) -> Result<(Dir, OsString)> {
        let mut comps = clean(rel.as_ref());
        let Some(name) = comps.pop() else {
            return Err(Error::new(
                "resolve",
                self.path(),
                einval("the root has no parent"),
            ));
        };
        let dir = self.open_dir(PathBuf::from(OsString::from_vec(join(&comps))), follow)?;
        Ok((dir, name))
    }

    /// Like [`Root::parent`], creating missing directories of the parent
    /// path with `spec` (see [`Root::mkdir_all`]).
    pub fn parent_mkdir(
        &self,
        rel: impl AsRef<Path>,
        follow: Follow,
        spec: &DirSpec,
    ) -> Result<(Dir, OsString)> {
        let mut comps = clean(rel.as_ref());
        let Some(name) = comps.pop() else {
            return Err(Error::new(
                "resolve",
                self.path(),
                einval("the root has no parent"),
            ));
        };
        let dir = self.mkdir_all(
            PathBuf::from(OsString::from_vec(join(&comps))),
            follow,
            spec,
        )?;
        Ok((dir, name))
    }

    /// `mkdir -p` inside the root: walks `rel` one component at a time
    /// with `O_NOFOLLOW`, creating what is missing with `spec`. A symlink
    /// on the way is followed inside the root ([`Follow::InRoot`], where a
    /// dangling one gets its target created, as BuildKit does) or is an
    /// error ([`Follow::Never`]). Returns the final directory.
    pub fn mkdir_all(&self, rel: impl AsRef<Path>, follow: Follow, spec: &DirSpec) -> Result<Dir> {
        self.mkdir_all_with(rel, follow, &mut |_: &Path| *spec)
    }

    /// [`Root::mkdir_all`] with a spec per created directory: `spec` gets
    /// the directory's resolved path inside the root (with a leading `/`).
    pub fn mkdir_all_with(
        &self,
        rel: impl AsRef<Path>,
        follow: Follow,
        spec: &mut dyn FnMut(&Path) -> DirSpec,
    ) -> Result<Dir> {
        let maker = Maker {
            spec,
            dangling: Dangling::Create,
            made: None,
        };
        self.descend(rel.as_ref(), follow, Some(maker), true)
            .map(|(d, _)| d)
    }

    /// [`Root::mkdir_all_with`] choosing what a dangling link on the way
    /// means ([`Dangling`]) and seeing every directory it creates: `made`
    /// gets the parent and the name of each, right after it was made (and
    /// given its spec), in order; an error from it ends the walk.
    pub fn mkdir_all_ext(
        &self,
        rel: impl AsRef<Path>,
        follow: Follow,
        dangling: Dangling,
        spec: &mut dyn FnMut(&Path) -> DirSpec,
        made: &mut dyn FnMut(&Dir, &OsStr) -> Result<()>,
    ) -> Result<Dir> {
        let maker = Maker {
            spec,
            dangling,
            made: Some(made),
        };
        self.descend(rel.as_ref(), follow, Some(maker), true)
            .map(|(d, _)| d)
    }

    /// Resolves `rel` inside the root following every symlink, the last
    /// one too, as [`Follow::InRoot`] does, and returns the resolved path
    /// (with a leading `/`). Components that do not exist are kept as
    /// named. Creates nothing.
    pub fn resolve(&self, rel: impl AsRef<Path>) -> Result<PathBuf> {
        self.descend(rel.as_ref(), Follow::InRoot, None, false)
            .map(|(_, p)| p)
    }

    /// An `O_PATH` descriptor of whatever `rel` names inside the root, of
    /// any type, for calls that take a descriptor (`mount(2)` through its
    /// `/proc/self/fd` link, `fstat`). The last component is followed too
    /// under [`Follow::InRoot`] (inside the root, like every other one).
    /// One `openat2`; nothing is created.
    pub fn open_path(&self, rel: impl AsRef<Path>, follow: Follow) -> Result<OwnedFd> {
        let comps = clean(rel.as_ref());
        let host = self.host(&comps);
        let c = cstring(&join(&comps)).map_err(|e| Error::new("open", &host, e))?;
        openat2(
            self.dir.fd.as_raw_fd(),
            &c,
            libc::O_PATH,
            resolve_flags(follow),
        )
        .map_err(|e| Error::new("open", &host, e))
    }

    /// `lstat` of `rel` inside the root: the parent resolved as
    /// [`Root::parent`] does, the last component never followed (`rel`
    /// naming the root stats the root). `None` when nothing has the final
    /// name; a missing parent is an error.
    pub fn lstat(&self, rel: impl AsRef<Path>, follow: Follow) -> Result<Option<Stat>> {
        let rel = rel.as_ref();
        if clean(rel).is_empty() {
            return self.dir.stat_self().map(Some);
        }
        let (dir, name) = self.parent(rel, follow)?;
        dir.stat(&name)
    }

    /// Visits the root and every entry below it, never following a
    /// symlink: `f` gets each entry's path relative to the root (`""` for
    /// the root itself, first) and its lstat, parents before children and
    /// the names of one directory in byte order. Returning
    /// [`Walk::Skip`] for a directory leaves its contents out. Each
    /// directory is opened from the root with [`Follow::Never`] when its
    /// turn comes (no descriptor is held per pending directory, so a wide
    /// tree costs no more than a narrow one); an entry that vanishes
    /// meanwhile is passed over.
    pub fn walk(&self, f: &mut dyn FnMut(&Path, &Stat) -> Result<Walk>) -> Result<()> {
        let top = self.dir.stat_self()?;
        if f(Path::new(""), &top)? == Walk::Skip || !top.is_dir() {
            return Ok(());
        }
        let mut pending = vec![PathBuf::new()];
        while let Some(rel) = pending.pop() {
            let dir = match self.open_dir(&rel, Follow::Never) {
                Ok(d) => d,
                Err(e) if !rel.as_os_str().is_empty() && e.raw_os_error() == Some(libc::ENOENT) => {
                    continue
                }
                Err(e) => return Err(e),
            };
            let mut names = dir.read_dir()?;
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            let mut below = Vec::new();
            for name in names {
                let Some(st) = dir.stat(&name)? else {
                    continue;
                };
                let child = rel.join(&name);
                if f(&child, &st)? == Walk::Into && st.is_dir() {
                    below.push(child);
                }
            }
            pending.extend(below.into_iter().rev());
        }
        Ok(())
    }

    /// The walker behind [`Root::mkdir_all`] and [`Root::resolve`]. With
    /// `create` missing directories are made; without, a missing
    /// component ends the walk and the rest is appended lexically. With
    /// `dirs_only` a non-directory on the way is `ENOTDIR`.
    fn descend(
        &self,
        rel: &Path,
        follow: Follow,
        mut create: Option<Maker<'_>>,
        dirs_only: bool,
    ) -> Result<(Dir, PathBuf)> {
        // Each pending component carries whether it came from a symlink's
        // target (for [`Dangling::Fail`]).
        let mut pending: Vec<(OsString, bool)> =
            clean(rel).into_iter().rev().map(|c| (c, false)).collect();
        // The directories resolved so far below the root, with their fds.
        let mut stack: Vec<(OsString, OwnedFd)> = Vec::new();
        let mut hops = 0;
        let mut missing: Vec<OsString> = Vec::new();
        let names = |stack: &[(OsString, OwnedFd)]| -> Vec<OsString> {
            stack.iter().map(|(n, _)| n.clone()).collect()
        };
        while let Some((c, from_link)) = pending.pop() {
            if !missing.is_empty() {
                // Resolving only, below a missing component: lexical.
                if c == ".." {
                    missing.pop();
                } else {
                    missing.push(c);
                }
                continue;
            }
            if c == ".." {
                stack.pop();
                continue;
            }
            let here = stack
                .last()
                .map_or(self.dir.fd.as_raw_fd(), |(_, fd)| fd.as_raw_fd());
            let mut path = names(&stack);
            path.push(c.clone());
            let host = self.host(&path);
            let cn = name_c(&c).map_err(|e| Error::new("resolve", &host, e))?;
            match openat(
                here,
                &cn,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            ) {
                Ok(fd) => {
                    stack.push((c, fd));
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let Some(make) = create.as_mut() else {
                        missing.push(c);
                        continue;
                    };
                    if from_link && make.dangling == Dangling::Fail {
                        return Err(Error::new("resolve", &host, e));
                    }
                    let inside =
                        Path::new("/").join(PathBuf::from(OsString::from_vec(join(&path))));
                    let spec = (make.spec)(&inside);
                    // SAFETY: a valid descriptor and a NUL-terminated name.
                    if unsafe { libc::mkdirat(here, cn.as_ptr(), 0o700) } != 0 {
                        let e = errno();
                        if e.raw_os_error() == Some(libc::EEXIST) {
                            // Made by someone else meanwhile: look again.
                            pending.push((c, from_link));
                            continue;
                        }
                        return Err(Error::new("mkdir", &host, e));
                    }
                    let fd = openat(
                        here,
                        &cn,
                        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    )
                    .map_err(|e| Error::new("open", &host, e))?;
                    apply_spec(here, &cn, &host, &spec)?;
                    if let Some(made) = make.made.as_mut() {
                        // SAFETY: `here` is open for this whole call (owned
                        // by the stack or by the root).
                        let here_fd = unsafe { BorrowedFd::borrow_raw(here) };
                        let parent = Dir {
                            fd: here_fd
                                .try_clone_to_owned()
                                .map_err(|e| Error::new("dup", &host, e))?,
                            path: host.parent().map(Path::to_path_buf).unwrap_or_default(),
                        };
                        made(&parent, &c)?;
                    }
                    stack.push((c, fd));
                    continue;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ELOOP)) => {
                    let st = fstatat(here, &cn, libc::AT_SYMLINK_NOFOLLOW)
                        .map_err(|e| Error::new("lstat", &host, e))?;
                    if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                        if !dirs_only && pending.is_empty() {
                            // The last component of a resolve: any type.
                            missing.push(c);
                            continue;
                        }
                        return Err(Error::new(
                            "resolve",
                            &host,
                            io::Error::from_raw_os_error(libc::ENOTDIR),
                        ));
                    }
                    if follow == Follow::Never {
                        return Err(Error::new(
                            "resolve",
                            &host,
                            io::Error::from_raw_os_error(libc::ELOOP),
                        ));
                    }
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(Error::new(
                            "resolve",
                            &host,
                            io::Error::from_raw_os_error(libc::ELOOP),
                        ));
                    }
                    let target =
                        readlinkat(here, &cn).map_err(|e| Error::new("readlink", &host, e))?;
                    if target.as_bytes().starts_with(b"/") {
                        stack.clear();
                    }
                    for t in target.as_bytes().split(|b| *b == b'/').rev() {
                        if t.is_empty() || t == b"." {
                            continue;
                        }
                        pending.push((OsString::from_vec(t.to_vec()), true));
                    }
                }
                Err(e) => return Err(Error::new("open", &host, e)),
            }
        }
        let mut resolved = names(&stack);
        let dir = match (missing.is_empty(), stack.pop()) {
            (true, Some((_, fd))) => Dir {
                fd,
                path: self.host(&resolved),
            },
            (true, None) => self.dir.try_clone()?,
            (false, _) => Dir {
                // Only `resolve` gets here; its caller uses the path.
                fd: self.dir.try_clone()?.fd,
                path: self.dir.path.clone(),
            },
        };
        resolved.extend(missing);
        let p = Path::new("/").join(PathBuf::from(OsString::from_vec(join(&resolved))));
        let p = if resolved.is_empty() {
            PathBuf::from("/")
        } else {
            p
        };
        Ok((dir, p))
    }

    /// Writes `data` as the file `rel` (parents resolved with `follow`
    /// and created with default modes; the final name is replaced, never
    /// followed), with `mode` and, when given, `owner`.
    pub fn write_file(
        &self,
        rel: impl AsRef<Path>,
        follow: Follow,
        data: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<()> {
        let (dir, name) = self.parent_mkdir(rel, follow, &DirSpec::default())?;
        dir.write_file(&name, data, mode, owner)
    }

    /// Opens the file `rel` for reading without following its last
    /// component.
    pub fn open_file(&self, rel: impl AsRef<Path>, follow: Follow) -> Result<File> {
        let (dir, name) = self.parent(rel, follow)?;
        dir.open_file(&name)
    }
}

fn readlinkat(dir: RawFd, name: &CStr) -> io::Result<OsString> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: a valid descriptor, a NUL-terminated name and a buffer
        // of the given length.
        let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(errno());
        }
        let n = n as usize;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(OsString::from_vec(buf));
        }
        if buf.len() >= 1 << 16 {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        buf.resize(buf.len() * 4, 0);
    }
}

/// An open directory inside a tree (an `O_PATH` descriptor). Every
/// operation takes one name in it and never follows that name if it is a
/// symlink: the link itself is what is created, changed or removed.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Dir {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Dir {
    /// The directory's host path (for messages only: never open it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error of `op` on `name` in this directory.
    pub fn error(&self, op: &'static str, name: impl AsRef<OsStr>, e: io::Error) -> Error {
        Error::new(op, self.path.join(name.as_ref()), e)
    }

    fn name(&self, op: &'static str, name: &OsStr) -> Result<CString> {
        name_c(name).map_err(|e| self.error(op, name, e))
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Another descriptor of the same directory.
    pub fn try_clone(&self) -> Result<Dir> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| Error::new("dup", &self.path, e))?;
        Ok(Dir {
            fd,
            path: self.path.clone(),
        })
    }

    /// `lstat` of `name`; `None` when nothing has that name.
    pub fn stat(&self, name: impl AsRef<OsStr>) -> Result<Option<Stat>> {
        let name = name.as_ref();
        let c = self.name("lstat", name)?;
        match fstatat(self.raw(), &c, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Stat(st))),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(self.error("lstat", name, e)),
        }
    }

    /// `fstat` of this directory itself.
    pub fn stat_self(&self) -> Result<Stat> {
        fstatat(self.raw(), c"", libc::AT_EMPTY_PATH)
            .map(Stat)
            .map_err(|e| Error::new("stat", &self.path, e))
    }

    /// Opens the subdirectory `name` (not following a symlink).
    pub fn open_dir(&self, name: impl AsRef<OsStr>) -> Result<Dir> {
        let name = name.as_ref();
        let c = self.name("open", name)?;
        let fd = openat(
            self.raw(),
            &c,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| self.error("open", name, e))?;
        Ok(Dir {
            fd,
            path: self.path.join(name),
        })
    }

    /// Opens the relative path `rel` below this directory, symlinks on the
    /// way handled as `follow` says with this directory as the root.
    pub fn open_below(&self, rel: impl AsRef<Path>, follow: Follow) -> Result<Dir> {
        let comps = clean(rel.as_ref());
        let mut host = self.path.clone();
        for c in &comps {
            host.push(c);
        }
        let c = cstring(&join(&comps)).map_err(|e| Error::new("open", &host, e))?;
        let fd = openat2(
            self.raw(),
            &c,
            libc::O_PATH | libc::O_DIRECTORY,
            resolve_flags(follow),
        )
        .map_err(|e| Error::new("open", &host, e))?;
        Ok(Dir { fd, path: host })
    }

    /// Makes the directory `name` with `mode` (chmod'ed, so the umask does
    /// not apply). Returns false (and changes nothing) when something has
    /// the name already.
    pub fn mkdir(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<bool> {
        let name = name.as_ref();
        let c = self.name("mkdir", name)?;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        if unsafe { libc::mkdirat(self.raw(), c.as_ptr(), 0o700) } != 0 {
            let e = errno();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Ok(false);
            }
            return Err(self.error("mkdir", name, e));
        }
        self.chmod(name, mode)?;
        Ok(true)
    }

    /// Creates (see [`Create`]) the regular file `name` for writing, with
    /// `mode` (chmod'ed after creation, so the umask does not apply).
    pub fn create_file(&self, name: impl AsRef<OsStr>, mode: u32, how: Create) -> Result<File> {
        let name = name.as_ref();
        let f = self.create_file_unset(name, how)?;
        // SAFETY: a valid descriptor.
        if unsafe { libc::fchmod(f.as_raw_fd(), mode & 0o7777) } != 0 {
            return Err(self.error("chmod", name, errno()));
        }
        Ok(f)
    }

    /// [`Dir::create_file`] without the mode: the file is created 0600
    /// less the umask, for a caller that gives it its owner and mode
    /// through the descriptor anyway (COPY, the layer applier, snapshot
    /// copies: one `fchmod` a file fewer).
    pub fn create_file_unset(&self, name: impl AsRef<OsStr>, how: Create) -> Result<File> {
        let name = name.as_ref();
        let c = self.name("create", name)?;
        let base = libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CREAT;
        let flags = match how {
            Create::Exclusive => base | libc::O_EXCL,
            Create::Truncate => base | libc::O_TRUNC,
            Create::Replace => {
                self.remove_all(name)?;
                base | libc::O_EXCL
            }
        };
        let fd = openat(self.raw(), &c, flags, 0o600).map_err(|e| self.error("create", name, e))?;
        let f = File::from(fd);
        // A truncated file may not be a regular one (a fifo, a device):
        // refuse to have opened it.
        if how == Create::Truncate {
            let st = fstatat(f.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
                .map_err(|e| self.error("stat", name, e))?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(self.error("create", name, einval("not a regular file")));
            }
        }
        Ok(f)
    }

    /// Gives `name` (never followed) the owner, permission bits and
    /// access and modification times `st` describes (e.g. those of the
    /// same path in a layer below). Owner first: chown clears set-id bits.
    pub fn copy_meta(&self, name: impl AsRef<OsStr>, st: &Stat) -> Result<()> {
        let name = name.as_ref();
        self.chown(name, st.uid(), st.gid())?;
        self.chmod(name, st.mode())?;
        let c = self.name("utimensat", name)?;
        utimes2_at(
            self.raw(),
            &c,
            st.atime(),
            st.mtime(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.error("utimensat", name, e))
    }

    /// [`Dir::copy_meta`] for this directory itself.
    pub fn copy_meta_self(&self, st: &Stat) -> Result<()> {
        self.chown_self(st.uid(), st.gid())?;
        self.chmod_self(st.mode())?;
        let p = self.proc_link("utimensat")?;
        utimes2_at(libc::AT_FDCWD, &p, st.atime(), st.mtime(), 0)
            .map_err(|e| Error::new("utimensat", &self.path, e))
    }

    /// Writes `data` as the file `name` (replacing what had the name),
    /// then sets `owner` (when given) and `mode`.
    pub fn write_file(
        &self,
        name: impl AsRef<OsStr>,
        data: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<()> {
        let name = name.as_ref();
        let mut f = self.create_file(name, 0o600, Create::Replace)?;
        io::Write::write_all(&mut f, data).map_err(|e| self.error("write", name, e))?;
        if let Some((uid, gid)) = owner {
            // SAFETY: a valid descriptor.
            if unsafe { libc::fchown(f.as_raw_fd(), uid, gid) } != 0 {
                return Err(self.error("chown", name, chown_errno(uid, gid)));
            }
        }
        // After chown, which clears set-id bits.
        // SAFETY: a valid descriptor.
        if unsafe { libc::fchmod(f.as_raw_fd(), mode & 0o7777) } != 0 {
            return Err(self.error("chmod", name, errno()));
        }
        Ok(())
    }

    /// Opens the regular file `name` for reading (not following a
    /// symlink; a device node or fifo is refused without being opened).
    pub fn open_file(&self, name: impl AsRef<OsStr>) -> Result<File> {
        let name = name.as_ref();
        let c = self.name("open", name)?;
        let p = openat(self.raw(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(|e| self.error("open", name, e))?;
        let st = fstatat(p.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
            .map_err(|e| self.error("stat", name, e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            let code = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                libc::ELOOP
            } else {
                libc::EINVAL
            };
            return Err(self.error("open", name, io::Error::from_raw_os_error(code)));
        }
        // Reopen the very inode found, for reading, through its O_PATH fd.
        let proc = cstring(format!("/proc/self/fd/{}", p.as_raw_fd()).as_bytes())
            .map_err(|e| self.error("open", name, e))?;
        match openat(libc::AT_FDCWD, &proc, libc::O_RDONLY, 0) {
            Ok(fd) => Ok(File::from(fd)),
            // No /proc: the name again, still not following it.
            Err(_) => openat(
                self.raw(),
                &c,
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                0,
            )
            .map(File::from)
            .map_err(|e| self.error("open", name, e)),
        }
    }

    /// This directory opened for reading (listing, extended attributes
    /// through the file's own calls).
    pub fn open_self(&self) -> Result<File> {
        openat(self.raw(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map(File::from)
            .map_err(|e| Error::new("open", &self.path, e))
    }

    /// The target of the symlink `name`.
    pub fn read_link(&self, name: impl AsRef<OsStr>) -> Result<OsString> {
        let name = name.as_ref();
        let c = self.name("readlink", name)?;
        readlinkat(self.raw(), &c).map_err(|e| self.error("readlink", name, e))
    }

    /// The names in this directory (not `.` and `..`), unsorted.
    pub fn read_dir(&self) -> Result<Vec<OsString>> {
        let fd = openat(self.raw(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| Error::new("opendir", &self.path, e))?;
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        // SAFETY: raw is an open directory descriptor; fdopendir owns it
        // from here on.
        let dp = unsafe { libc::fdopendir(raw) };
        if dp.is_null() {
            let e = errno();
            // SAFETY: fdopendir failed, so raw is still ours to close.
            unsafe { libc::close(raw) };
            return Err(Error::new("opendir", &self.path, e));
        }
        let mut names = Vec::new();
        loop {
            // SAFETY: dp is a valid DIR*.
            let ent = unsafe { libc::readdir(dp) };
            if ent.is_null() {
                break;
            }
            // SAFETY: readdir returned a valid dirent whose d_name is
            // NUL-terminated.
            let n = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
            if n != b"." && n != b".." {
                names.push(OsString::from_vec(n.to_vec()));
            }
        }
        // SAFETY: dp is valid and closed once.
        unsafe { libc::closedir(dp) };
        Ok(names)
    }

    /// Makes the symlink `name` -> `target` (the target is stored as
    /// given and never resolved here).
    pub fn symlink(&self, name: impl AsRef<OsStr>, target: impl AsRef<OsStr>) -> Result<()> {
        let name = name.as_ref();
        let c = self.name("symlink", name)?;
        let t = cstring(target.as_ref().as_bytes()).map_err(|e| self.error("symlink", name, e))?;
        // SAFETY: a valid descriptor and NUL-terminated strings.
        if unsafe { libc::symlinkat(t.as_ptr(), self.raw(), c.as_ptr()) } != 0 {
            return Err(self.error("symlink", name, errno()));
        }
        Ok(())
    }

    /// Makes `name` a hard link of `from_name` in `from` (a link is linked
    /// itself, never its target). Both must be in the same file system.
    pub fn hard_link(
        &self,
        name: impl AsRef<OsStr>,
        from: &Dir,
        from_name: impl AsRef<OsStr>,
    ) -> Result<()> {
        let name = name.as_ref();
        let c = self.name("link", name)?;
        let f = from.name("link", from_name.as_ref())?;
        // SAFETY: valid descriptors and NUL-terminated names; flags 0 do
        // not follow a symlink.
        if unsafe { libc::linkat(from.raw(), f.as_ptr(), self.raw(), c.as_ptr(), 0) } != 0 {
            return Err(self.error("link", name, errno()));
        }
        Ok(())
    }

    /// `mknod` of `name` (`mode` holds the type bits: fifo, character or
    /// block device).
    pub fn mknod(&self, name: impl AsRef<OsStr>, mode: u32, rdev: u64) -> Result<()> {
        let name = name.as_ref();
        let c = self.name("mknod", name)?;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        if unsafe { libc::mknodat(self.raw(), c.as_ptr(), mode, rdev) } != 0 {
            return Err(self.error("mknod", name, errno()));
        }
        Ok(())
    }

    /// Sets the permission bits of `name`, not following a symlink (a
    /// symlink's own mode means nothing on Linux: left as it is).
    pub fn chmod(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<()> {
        let name = name.as_ref();
        let c = self.name("chmod", name)?;
        chmod_at(self.raw(), &c, mode).map_err(|e| self.error("chmod", name, e))
    }

    /// Sets the owner of `name` (a symlink itself, not its target).
    pub fn chown(&self, name: impl AsRef<OsStr>, uid: u32, gid: u32) -> Result<()> {
        let name = name.as_ref();
        let c = self.name("chown", name)?;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        if unsafe { libc::fchownat(self.raw(), c.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }
            != 0
        {
            return Err(self.error("chown", name, chown_errno(uid, gid)));
        }
        Ok(())
    }

    /// Sets access and modification time of `name` (a symlink itself) to
    /// `(seconds, nanoseconds)`.
    pub fn set_times(&self, name: impl AsRef<OsStr>, t: (i64, i64)) -> Result<()> {
        let name = name.as_ref();
        let c = self.name("utimensat", name)?;
        utimes_at(self.raw(), &c, t).map_err(|e| self.error("utimensat", name, e))
    }

    /// Sets the owner of this directory itself.
    pub fn chown_self(&self, uid: u32, gid: u32) -> Result<()> {
        // SAFETY: a valid descriptor; AT_EMPTY_PATH acts on it.
        if unsafe { libc::fchownat(self.raw(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) } != 0 {
            return Err(Error::new("chown", &self.path, chown_errno(uid, gid)));
        }
        Ok(())
    }

    /// The `/proc` link of this descriptor, which names exactly its inode
    /// (an `O_PATH` descriptor cannot be fchmod'ed or futimens'ed).
    fn proc_link(&self, op: &'static str) -> Result<CString> {
        cstring(format!("/proc/self/fd/{}", self.raw()).as_bytes())
            .map_err(|e| Error::new(op, &self.path, e))
    }

    /// Sets the permission bits of this directory itself.
    pub fn chmod_self(&self, mode: u32) -> Result<()> {
        let p = self.proc_link("chmod")?;
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::chmod(p.as_ptr(), mode & 0o7777) } != 0 {
            return Err(Error::new("chmod", &self.path, errno()));
        }
        Ok(())
    }

    /// Sets access and modification time of this directory itself.
    pub fn set_times_self(&self, t: (i64, i64)) -> Result<()> {
        let p = self.proc_link("utimensat")?;
        let ts = libc::timespec {
            tv_sec: t.0 as _,
            tv_nsec: t.1 as libc::c_long,
        };
        let times = [ts, ts];
        // SAFETY: a NUL-terminated path and two timespecs.
        if unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) } != 0 {
            return Err(Error::new("utimensat", &self.path, errno()));
        }
        Ok(())
    }

    /// Removes `name` (a file, symlink, node or empty directory).
    /// Nothing there is not an error.
    pub fn remove(&self, name: impl AsRef<OsStr>) -> Result<()> {
        let name = name.as_ref();
        let c = self.name("remove", name)?;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        if unsafe { libc::unlinkat(self.raw(), c.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let e = errno();
        match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(()),
            Some(libc::EISDIR) | Some(libc::EPERM) => {
                // SAFETY: as above.
                if unsafe { libc::unlinkat(self.raw(), c.as_ptr(), libc::AT_REMOVEDIR) } == 0 {
                    return Ok(());
                }
                Err(self.error("remove", name, errno()))
            }
            _ => Err(self.error("remove", name, e)),
        }
    }

    /// Removes `name` and, if it is a directory, everything below it,
    /// never following a symlink. Nothing there is not an error.
    pub fn remove_all(&self, name: impl AsRef<OsStr>) -> Result<()> {
        let name = name.as_ref();
        let c = self.name("remove", name)?;
        remove_all_at(self.raw(), &c).map_err(|e| self.error("remove", name, e))
    }

    /// Renames `name` to `to_name` in `to` (replacing a file there).
    pub fn rename(
        &self,
        name: impl AsRef<OsStr>,
        to: &Dir,
        to_name: impl AsRef<OsStr>,
    ) -> Result<()> {
        let name = name.as_ref();
        let c = self.name("rename", name)?;
        let t = to.name("rename", to_name.as_ref())?;
        // SAFETY: valid descriptors and NUL-terminated names.
        if unsafe { libc::renameat(self.raw(), c.as_ptr(), to.raw(), t.as_ptr()) } != 0 {
            return Err(self.error("rename", name, errno()));
        }
        Ok(())
    }

    /// Sets the extended attribute `key` on `name` (not following a
    /// symlink: the attribute goes on the entry's own inode).
    pub fn set_xattr(&self, name: impl AsRef<OsStr>, key: &[u8], value: &[u8]) -> Result<()> {
        let name = name.as_ref();
        let c = self.name("setxattr", name)?;
        let k = cstring(key).map_err(|e| self.error("setxattr", name, e))?;
        let p = openat(self.raw(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(|e| self.error("setxattr", name, e))?;
        let proc = cstring(format!("/proc/self/fd/{}", p.as_raw_fd()).as_bytes())
            .map_err(|e| self.error("setxattr", name, e))?;
        // setxattr follows the magic link to exactly the pinned inode
        // (the symlink itself, if the entry is one).
        setxattr_path(&proc, &k, value).map_err(|e| self.error("setxattr", name, e))
    }

    /// Sets the extended attribute `key` on this directory itself (e.g.
    /// an overlay opaque marker).
    pub fn set_xattr_self(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let k = cstring(key).map_err(|e| Error::new("setxattr", &self.path, e))?;
        let p = self.proc_link("setxattr")?;
        // The magic link names exactly this directory's inode.
        setxattr_path(&p, &k, value).map_err(|e| Error::new("setxattr", &self.path, e))
    }
}

/// `setxattr(2)` on `path` (a `/proc/self/fd/N` magic link of a pinned
/// inode).
fn setxattr_path(path: &CStr, key: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: NUL-terminated strings and a buffer of the given length.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(errno());
    }
    Ok(())
}

fn remove_all_at(dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: a valid descriptor and a NUL-terminated name.
    if unsafe { libc::unlinkat(dir, name.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = errno();
    match e.raw_os_error() {
        Some(libc::ENOENT) => return Ok(()),
        Some(libc::EISDIR) | Some(libc::EPERM) => {}
        _ => return Err(e),
    }
    // Depth first without recursion and with one directory open at a
    // time (a tree a step made 30,000 levels deep overflowed the stack,
    // or ran out of descriptors, and every later prune failed on it): the
    // names still to remove at each level are kept, the way back up is
    // `..`.
    let open_dir = |at: RawFd, n: &CStr| {
        openat(
            at,
            n,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
    };
    let mut cur = open_dir(dir, name)?;
    let id = |fd: &OwnedFd| -> io::Result<(u64, u64)> {
        let st = fstatat(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH)?;
        Ok((st.st_dev, st.st_ino))
    };
    // Per level below `dir`: the directory's own name, its identity (the
    // way back up is checked against it: a directory moved meanwhile —
    // by a step renaming in a bind mount — would send `..` out of the
    // tree) and the subdirectories of it still to empty.
    let mut levels: Vec<(CString, (u64, u64), Vec<CString>)> =
        vec![(name.to_owned(), id(&cur)?, Vec::new())];
    let mut fresh = true;
    loop {
        if fresh {
            // First visit of `cur`: remove what is not a directory, note
            // the directories.
            let d = Dir {
                fd: cur,
                path: PathBuf::new(),
            };
            let names = d
                .read_dir()
                .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
            cur = d.fd;
            let mut subdirs = Vec::new();
            for n in names {
                let c = cstring(n.as_bytes())?;
                // SAFETY: a valid descriptor and a NUL-terminated name.
                if unsafe { libc::unlinkat(cur.as_raw_fd(), c.as_ptr(), 0) } == 0 {
                    continue;
                }
                let e = errno();
                match e.raw_os_error() {
                    Some(libc::ENOENT) => {}
                    Some(libc::EISDIR) | Some(libc::EPERM) => subdirs.push(c),
                    Some(libc::EACCES) => {
                        // A directory the owner may not write (rootless):
                        // opened up, then tried again.
                        // SAFETY: a valid descriptor.
                        unsafe { libc::fchmod(cur.as_raw_fd(), 0o700) };
                        // SAFETY: as above.
                        if unsafe { libc::unlinkat(cur.as_raw_fd(), c.as_ptr(), 0) } != 0 {
                            let e = errno();
                            match e.raw_os_error() {
                                Some(libc::EISDIR) | Some(libc::EPERM) => subdirs.push(c),
                                Some(libc::ENOENT) => {}
                                _ => return Err(e),
                            }
                        }
                    }
                    _ => return Err(e),
                }
            }
            if let Some(top) = levels.last_mut() {
                top.2 = subdirs;
            }
        }
        let next = levels.last_mut().and_then(|(_, _, subs)| subs.pop());
        match next {
            Some(sub) => {
                // SAFETY: a valid descriptor.
                unsafe { libc::fchmod(cur.as_raw_fd(), 0o700) };
                match open_dir(cur.as_raw_fd(), &sub) {
                    Ok(fd) => {
                        let me = id(&fd)?;
                        cur = fd;
                        levels.push((sub, me, Vec::new()));
                        fresh = true;
                    }
                    // Gone meanwhile, or not a directory after all.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => fresh = false,
                    Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                        // SAFETY: a valid descriptor and a NUL-terminated name.
                        if unsafe { libc::unlinkat(cur.as_raw_fd(), sub.as_ptr(), 0) } != 0 {
                            return Err(errno());
                        }
                        fresh = false;
                    }
                    Err(e) => return Err(e),
                }
            }
            None => {
                // `cur` is empty: up one level and remove it there.
                let Some((own, _, _)) = levels.pop() else {
                    return Ok(());
                };
                let up = match levels.last() {
                    None => None,
                    Some((_, want, _)) => {
                        let up = openat(
                            cur.as_raw_fd(),
                            c"..",
                            libc::O_RDONLY | libc::O_DIRECTORY,
                            0,
                        )?;
                        if id(&up)? != *want {
                            return Err(io::Error::other(
                                "the tree moved while it was removed: stopped",
                            ));
                        }
                        Some(up)
                    }
                };
                let at = up.as_ref().map_or(dir, |u| u.as_raw_fd());
                // SAFETY: a valid descriptor and a NUL-terminated name.
                if unsafe { libc::unlinkat(at, own.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
                    let e = errno();
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        return Err(e);
                    }
                }
                match up {
                    Some(u) => {
                        cur = u;
                        fresh = false;
                    }
                    None => return Ok(()),
                }
            }
        }
    }
}

/// The extended attributes of `path` (read without following it: the
/// link's own when it is one), names with their values; an attribute
/// that vanishes while read is left out.
pub fn xattrs_of(path: &Path) -> io::Result<Vec<(CString, Vec<u8>)>> {
    let s = cstring(path.as_os_str().as_bytes())?;
    // SAFETY: a size query with a null buffer.
    let len = unsafe { libc::llistxattr(s.as_ptr(), std::ptr::null_mut(), 0) };
    if len <= 0 {
        return Ok(Vec::new());
    }
    let mut names = vec![0u8; len as usize];
    // SAFETY: a buffer of the size just queried.
    let len = unsafe { libc::llistxattr(s.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        return Err(errno());
    }
    names.truncate(len as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        // SAFETY: a size query.
        let vlen = unsafe { libc::lgetxattr(s.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        if vlen < 0 {
            continue;
        }
        let mut value = vec![0u8; vlen as usize];
        // SAFETY: a buffer of the queried size.
        let vlen = unsafe {
            libc::lgetxattr(
                s.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if vlen < 0 {
            continue;
        }
        value.truncate(vlen as usize);
        out.push((cname, value));
    }
    Ok(out)
}

/// Removes `path` and, if it is a directory, everything below it, never
/// following a symlink, without recursion and with one directory open at
/// a time (any depth). Nothing there is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no name to remove",
        ));
    };
    let c = cstring(parent.as_os_str().as_bytes())?;
    let pfd = openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    remove_all_at(pfd.as_raw_fd(), &cstring(name.as_bytes())?)
}

/// Gives the entry `name` in `dir` the owner, mode and times of `spec`,
/// never following it.
fn apply_spec(dir: RawFd, name: &CStr, host: &Path, spec: &DirSpec) -> Result<()> {
    if let Some((uid, gid)) = spec.owner {
        // SAFETY: a valid descriptor and a NUL-terminated name.
        if unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
            return Err(Error::new("chown", host, chown_errno(uid, gid)));
        }
    }
    chmod_at(dir, name, spec.mode).map_err(|e| Error::new("chmod", host, e))?;
    if let Some(t) = spec.mtime {
        utimes_at(dir, name, t).map_err(|e| Error::new("utimensat", host, e))?;
    }
    Ok(())
}

fn utimes_at(dir: RawFd, name: &CStr, t: (i64, i64)) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: t.0 as _,
        tv_nsec: t.1 as libc::c_long,
    };
    let times = [ts, ts];
    // SAFETY: a valid descriptor, a NUL-terminated name and two timespecs.
    if unsafe {
        libc::utimensat(
            dir,
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(errno());
    }
    Ok(())
}

/// utimensat with separate access and modification times; `flags` is
/// `AT_SYMLINK_NOFOLLOW` for a name, 0 for a `/proc/self/fd` link (which
/// must be followed to reach the inode it names).
fn utimes2_at(
    dir: RawFd,
    name: &CStr,
    atime: (i64, i64),
    mtime: (i64, i64),
    flags: i32,
) -> io::Result<()> {
    let ts = |t: (i64, i64)| libc::timespec {
        tv_sec: t.0 as _,
        tv_nsec: t.1 as libc::c_long,
    };
    let times = [ts(atime), ts(mtime)];
    // SAFETY: a valid descriptor (or AT_FDCWD), a NUL-terminated name and
    // two timespecs.
    if unsafe { libc::utimensat(dir, name.as_ptr(), times.as_ptr(), flags) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// chmod of `name` in `dir` without following it; a symlink is left
/// alone (its mode means nothing on Linux).
fn chmod_at(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // fchmodat2 (Linux 6.6) takes AT_SYMLINK_NOFOLLOW.
    // SAFETY: a valid descriptor and a NUL-terminated name.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir,
            name.as_ptr(),
            (mode & 0o7777) as libc::c_uint,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = errno();
    match e.raw_os_error() {
        // A symlink.
        Some(libc::EOPNOTSUPP) => return Ok(()),
        Some(libc::ENOSYS) => {}
        _ => return Err(e),
    }
    // Older kernels: pin the inode with O_PATH and chmod it through its
    // /proc link, which names exactly that inode.
    let p = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    let st = fstatat(p.as_raw_fd(), c"", libc::AT_EMPTY_PATH)?;
    if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Ok(());
    }
    let proc = cstring(format!("/proc/self/fd/{}", p.as_raw_fd()).as_bytes())?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::chmod(proc.as_ptr(), mode & 0o7777) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// What a [`Root::walk`] callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// Go on (into this entry, when it is a directory).
    Into,
    /// Leave this directory's contents out.
    Skip,
}

pub mod idmap;
pub mod overlay;
pub mod path;
pub mod userdb;

#[cfg(test)]
mod tests;
