//! A read (and, for the top layer, write) view of a root file system made of
//! stacked layer directories, as an overlay mount would show it — without
//! mounting anything. COPY and ADD write straight into a snapshot's
//! upperdir through it, USER/--chown names are resolved through the stack's
//! own /etc/passwd, and `COPY --from` reads another stage's stack.
//!
//! Paths inside the view are absolute, slash-separated and resolved
//! component by component inside the root: `..` and symlinks never leave
//! it. In `strict` mode (the build context) an escape is an error instead.
//!
//! File names are bytes: a view path is a `[u8]` (a name need not be
//! UTF-8), and only messages show it lossily.

use kiln_fs::overlay::{is_whiteout, XattrNs, OPAQUE_VALUE};
use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Go's `path.Clean` for absolute slash paths: the result starts with `/`.
pub fn clean_abs(p: &str) -> String {
    // Cleaning only removes whole components: UTF-8 in, UTF-8 out.
    String::from_utf8_lossy(&clean_bytes(p.as_bytes())).into_owned()
}

/// Joins `p` onto the directory `base` (when `p` is relative) and cleans.
pub fn join_abs(base: &str, p: &str) -> String {
    String::from_utf8_lossy(&join_bytes(base.as_bytes(), p.as_bytes())).into_owned()
}

/// The non-empty components of a slash path.
pub fn components(p: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    p.split(|b| *b == b'/').filter(|c| !c.is_empty())
}

/// [`clean_abs`] of a path whose names are bytes
/// ([`kiln_fs::path::clean_abs`]).
pub fn clean_bytes(p: &[u8]) -> Vec<u8> {
    kiln_fs::path::clean_abs(p)
}

/// [`join_abs`] of paths whose names are bytes.
pub fn join_bytes(base: &[u8], p: &[u8]) -> Vec<u8> {
    if p.starts_with(b"/") {
        clean_bytes(p)
    } else {
        let mut v = Vec::with_capacity(base.len() + p.len() + 1);
        v.extend_from_slice(base);
        v.push(b'/');
        v.extend_from_slice(p);
        clean_bytes(&v)
    }
}

/// A path's bytes as text, for messages only (lossy).
pub fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// The most [`LayerView::read`] reads (`/etc/passwd`, `/etc/group`).
pub const MAX_SMALL_FILE: u64 = 16 << 20;

/// Errors of the view.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The path does not exist.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    /// The path leaves the root (strict views only).
    #[error("{0}: forbidden path outside the build context")]
    Escape(String),
    /// Too many symlinks.
    #[error("{0}: too many levels of symbolic links")]
    Loop(String),
    /// A path component is not a directory.
    #[error("{0}: not a directory")]
    NotDir(String),
    /// A file read whole is not a regular file (a device node, fifo,
    /// socket or directory).
    #[error("{0}: not a regular file")]
    NotRegular(String),
    /// A file read whole is larger than [`MAX_SMALL_FILE`].
    #[error("{0}: larger than 16 MiB")]
    TooLarge(String),
    /// A write into the top layer failed (or met a symlink it must not
    /// follow).
    #[error(transparent)]
    Fs(#[from] kiln_fs::Error),
    /// An I/O error on a host path.
    #[error("{path}: {source}")]
    Io {
        /// The host path.
        path: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(path: &Path, source: io::Error) -> ViewError {
    ViewError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Where a path was found.
#[derive(Debug, Clone)]
pub struct Found {
    /// Index of the layer (0 = top).
    pub layer: usize,
    /// The host path of the entry in that layer.
    pub host: PathBuf,
    /// Its metadata (lstat).
    pub meta: fs::Metadata,
}

/// A stack of layer directories, top first.
#[derive(Debug, Clone)]
pub struct LayerView {
    layers: Vec<PathBuf>,
    strict: bool,
}

fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = CString::new(name).ok()?;
    let mut buf = [0u8; 16];
    // SAFETY: valid NUL-terminated strings and a buffer of the given size.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

fn is_opaque(path: &Path) -> bool {
    getxattr(path, XattrNs::current().opaque()).is_some_and(|v| v == OPAQUE_VALUE)
}

impl LayerView {
    /// A view of `layers` (top first). `strict` makes escapes errors.
    pub fn new(layers: Vec<PathBuf>, strict: bool) -> Self {
        LayerView { layers, strict }
    }

    /// The top (writable) layer directory.
    pub fn top(&self) -> Option<&Path> {
        self.layers.first().map(PathBuf::as_path)
    }

    /// The layer directories, top first.
    pub fn layers(&self) -> &[PathBuf] {
        &self.layers
    }

    /// Looks up an already-resolved path (no symlinks in its parents)
    /// without following a final symlink.
    pub fn lookup(&self, resolved: impl AsRef<[u8]>) -> Option<Found> {
        let comps: Vec<&OsStr> = components(resolved.as_ref())
            .map(OsStr::from_bytes)
            .collect();
        if let ([layer], Some((last, parents))) = (self.layers.as_slice(), comps.split_last()) {
            // One layer (the build context, a named context, a bind
            // source): its tree may be changing under us, so the parent is
            // opened from the layer's top with no symlink followed and
            // the name is stat'ed in that very directory — a directory
            // swapped for a link to the host's `/etc` is never walked.
            let mut host = layer.clone();
            host.extend(parents);
            let dir = open_dir_below(layer, &host).ok()?;
            let meta = fs::symlink_metadata(fd_path(&dir).join(last)).ok()?;
            if is_whiteout(&meta) {
                return None;
            }
            host.push(last);
            return Some(Found {
                layer: 0,
                host,
                meta,
            });
        }
        'layers: for (i, layer) in self.layers.iter().enumerate() {
            // A whiteout of any ancestor, or an opaque ancestor in an upper
            // layer, hides this layer's entry.
            let mut host = layer.clone();
            for (n, c) in comps.iter().enumerate() {
                host.push(c);
                let Ok(meta) = fs::symlink_metadata(&host) else {
                    continue 'layers;
                };
                if is_whiteout(&meta) {
                    return None;
                }
                if n + 1 == comps.len() {
                    return Some(Found {
                        layer: i,
                        host,
                        meta,
                    });
                }
                if !meta.is_dir() {
                    return None;
                }
                if self.layers.len() > 1 && is_opaque(&host) {
                    // Lower layers are hidden below this directory: finish
                    // the lookup in this layer only — its directories
                    // opened with no symlink followed: a layer's own
                    // `o/x -> /` under an upper layer's directory `o/x`
                    // is not a way to the host's `/`.
                    let mut h = host.clone();
                    for c in &comps[n + 1..] {
                        h.push(c);
                    }
                    let (Some(parent), Some(last)) = (h.parent(), h.file_name()) else {
                        return None;
                    };
                    let dir = open_dir_below(layer, parent).ok()?;
                    return fs::symlink_metadata(fd_path(&dir).join(last))
                        .ok()
                        .filter(|m| !is_whiteout(m))
                        .map(|meta| Found {
                            layer: i,
                            host: h,
                            meta,
                        });
                }
            }
            if comps.is_empty() {
                if let Ok(meta) = fs::symlink_metadata(&host) {
                    return Some(Found {
                        layer: i,
                        host,
                        meta,
                    });
                }
            }
        }
        None
    }

    /// The entries of the resolved directory `dir` (found at `dir_host`, a
    /// real directory), sorted by name, whiteouts left out. In a one-layer
    /// view each entry is `lstat`ed relative to the open directory (no
    /// walk of its whole path); views of several layers merge the layers'
    /// listings and look each name up through the stack.
    pub fn children(
        &self,
        dir: &[u8],
        dir_host: &Path,
    ) -> Result<Vec<(Vec<u8>, Found)>, ViewError> {
        if self.layers.len() != 1 {
            return Ok(self
                .read_dir(dir)?
                .into_iter()
                .filter_map(|n| {
                    let f = self.lookup(join_bytes(dir, &n))?;
                    Some((n, f))
                })
                .collect());
        }
        let mut out = Vec::new();
        // Listed through a directory opened with no symlink followed below
        // the layer's top (see `lookup`); each entry's lstat is relative to
        // that open directory.
        let listed =
            open_dir_below(&self.layers[0], dir_host).and_then(|d| fs::read_dir(fd_path(&d)));
        let rd = match listed {
            Ok(rd) => rd,
            // Gone, or no longer a directory, since it was found: as
            // `read_dir`, nothing to list.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(out)
            }
            Err(e) => return Err(io_err(dir_host, e)),
        };
        for e in rd {
            let e = e.map_err(|e| io_err(dir_host, e))?;
            // A name is its bytes, UTF-8 or not.
            let name = e.file_name().into_vec();
            let meta = match e.metadata() {
                Ok(m) => m,
                // Removed since it was listed.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io_err(&dir_host.join(OsStr::from_bytes(&name)), err)),
            };
            if is_whiteout(&meta) {
                continue;
            }
            let host = dir_host.join(OsStr::from_bytes(&name));
            out.push((
                name,
                Found {
                    layer: 0,
                    host,
                    meta,
                },
            ));
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The target of the symlink found at `host` (a path in one of the
    /// layers). In a one-layer view it is read in its parent directory
    /// opened from the layer's top with no symlink followed (see
    /// [`LayerView::lookup`]): a parent swapped for a link meanwhile never
    /// shows a host link's target.
    pub fn read_link(&self, host: &Path) -> io::Result<PathBuf> {
        match (self.layers.as_slice(), host.parent(), host.file_name()) {
            ([layer], Some(parent), Some(name)) => {
                let dir = open_dir_below(layer, parent)?;
                fs::read_link(fd_path(&dir).join(name))
            }
            _ => fs::read_link(host),
        }
    }

    /// Resolves `path` inside the root, following symlinks in every
    /// component (and in the last one when `follow_last`). Returns the
    /// clean resolved path; the entry itself may not exist.
    pub fn resolve(&self, path: impl AsRef<[u8]>, follow_last: bool) -> Result<Vec<u8>, ViewError> {
        let path = path.as_ref();
        if self.strict && escapes(path) {
            return Err(ViewError::Escape(show(path)));
        }
        let mut pending: Vec<Vec<u8>> = components(path)
            .filter(|c| *c != b".")
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        let mut cur: Vec<Vec<u8>> = Vec::new();
        let mut hops = 0;
        while let Some(c) = pending.pop() {
            if c == b".." {
                if cur.pop().is_none() && self.strict {
                    return Err(ViewError::Escape(show(path)));
                }
                continue;
            }
            cur.push(c);
            let is_last = pending.is_empty();
            if is_last && !follow_last {
                break;
            }
            let here = abs_of(&cur);
            let Some(found) = self.lookup(&here) else {
                continue;
            };
            if !found.meta.file_type().is_symlink() {
                continue;
            }
            hops += 1;
            if hops > 40 {
                return Err(ViewError::Loop(show(path)));
            }
            let target = self
                .read_link(&found.host)
                .map_err(|e| io_err(&found.host, e))?
                .into_os_string()
                .into_vec();
            cur.pop();
            if target.starts_with(b"/") {
                if self.strict {
                    return Err(ViewError::Escape(format!(
                        "{} -> {}",
                        show(&here),
                        show(&target)
                    )));
                }
                cur.clear();
            }
            for t in components(&target).filter(|c| *c != b".").rev() {
                pending.push(t.to_vec());
            }
        }
        Ok(abs_of(&cur))
    }

    /// Resolves and looks up `path`, following all symlinks.
    pub fn stat(&self, path: impl AsRef<[u8]>) -> Result<Found, ViewError> {
        let path = path.as_ref();
        let r = self.resolve(path, true)?;
        self.lookup(&r)
            .ok_or_else(|| ViewError::NotFound(show(path)))
    }

    /// Reads a whole small file (at most [`MAX_SMALL_FILE`] bytes),
    /// following symlinks inside the view. The layers are untrusted: a
    /// device node or fifo at `path` is refused without being opened (on
    /// the host side nothing is `nodev`), and a larger file is an error.
    pub fn read(&self, path: impl AsRef<[u8]>) -> Result<Vec<u8>, ViewError> {
        use std::io::Read;
        let path = path.as_ref();
        let f = self.stat(path)?;
        if !f.meta.file_type().is_file() {
            return Err(ViewError::NotRegular(show(path)));
        }
        let (Some(parent), Some(name)) = (f.host.parent(), f.host.file_name()) else {
            return Err(ViewError::NotRegular(show(path)));
        };
        let file = kiln_fs::Root::open(parent)?.open_file(name, kiln_fs::Follow::Never)?;
        let mut out = Vec::new();
        file.take(MAX_SMALL_FILE + 1)
            .read_to_end(&mut out)
            .map_err(|e| io_err(&f.host, e))?;
        if out.len() as u64 > MAX_SMALL_FILE {
            return Err(ViewError::TooLarge(show(path)));
        }
        Ok(out)
    }

    /// The merged, sorted entry names of a resolved directory path.
    pub fn read_dir(&self, resolved: impl AsRef<[u8]>) -> Result<Vec<Vec<u8>>, ViewError> {
        let rel = rel(resolved.as_ref());
        let mut names = std::collections::BTreeMap::<Vec<u8>, bool>::new();
        for layer in &self.layers {
            // Opened below the layer's top with no symlink followed: a
            // layer's link on the way (`o/x -> /` under an upper layer's
            // directory `o/x`) lists nothing of the host's.
            let opened = open_dir_below(layer, &layer.join(rel));
            let dir = match &opened {
                Ok(d) => fd_path(d),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                // A whiteout, a file or a symlink here hides the layers
                // below.
                Err(_) => break,
            };
            let rd = fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
            for e in rd {
                let e = e.map_err(|e| io_err(&dir, e))?;
                let name = e.file_name().into_vec();
                if names.contains_key(&name) {
                    continue;
                }
                // Only a character device can be a whiteout: the entry's
                // type comes with the listing, so most names need no stat.
                let whiteout = match e.file_type() {
                    Ok(t) if !std::os::unix::fs::FileTypeExt::is_char_device(&t) => false,
                    _ => {
                        let m = e.metadata().map_err(|err| io_err(&e.path(), err))?;
                        is_whiteout(&m)
                    }
                };
                names.insert(name, whiteout);
            }
            if self.layers.len() > 1 && is_opaque(&dir) {
                break;
            }
        }
        Ok(names
            .into_iter()
            .filter(|(_, whiteout)| !whiteout)
            .map(|(n, _)| n)
            .collect())
    }

    /// The top (writable) layer as a [`kiln_fs::Root`]: every write into
    /// it goes through one, and never follows a symlink on the host (its
    /// paths are resolved through the whole view first).
    pub fn top_root(&self) -> Result<kiln_fs::Root, ViewError> {
        let top = self
            .top()
            .ok_or_else(|| ViewError::NotFound("(no layers)".into()))?;
        Ok(kiln_fs::Root::open(top)?)
    }

    /// Makes sure directory `resolved` exists in the top layer, creating
    /// missing parents: a directory present in a lower layer is recreated
    /// with its mode, owner and mtime (so the overlay shows it unchanged);
    /// a new one gets mode 0755 and `owner`. `resolved` has no symlinks
    /// left in the view; one met in the top layer is an error (never
    /// followed on the host). Returns the directory, open.
    pub fn ensure_dir(
        &self,
        resolved: impl AsRef<[u8]>,
        owner: (u32, u32),
    ) -> Result<kiln_fs::Dir, ViewError> {
        let root = self.top_root()?;
        self.ensure_dir_in(&root, resolved, owner)
    }

    /// [`LayerView::ensure_dir`] in an already open top layer `root`.
    pub fn ensure_dir_in(
        &self,
        root: &kiln_fs::Root,
        resolved: impl AsRef<[u8]>,
        owner: (u32, u32),
    ) -> Result<kiln_fs::Dir, ViewError> {
        let mut dir = root.dir().try_clone()?;
        let mut view_path = Vec::new();
        for c in components(resolved.as_ref()) {
            view_path.push(b'/');
            view_path.extend_from_slice(c);
            let c = OsStr::from_bytes(c);
            match dir.stat(c)? {
                Some(st) if st.is_dir() => {
                    dir = dir.open_dir(c)?;
                    continue;
                }
                Some(st) if st.is_whiteout() => dir.remove(c)?,
                Some(_) => return Err(ViewError::NotDir(show(&view_path))),
                None => {}
            }
            match self.lookup(&view_path) {
                Some(f) if f.meta.is_dir() => {
                    dir.mkdir(c, 0o700)?;
                    dir.chown(c, f.meta.uid(), f.meta.gid())?;
                    dir.chmod(c, f.meta.mode() & 0o7777)?;
                    dir.set_times(c, (f.meta.mtime(), f.meta.mtime_nsec()))?;
                }
                Some(_) => return Err(ViewError::NotDir(show(&view_path))),
                None => {
                    dir.mkdir(c, 0o700)?;
                    dir.chown(c, owner.0, owner.1)?;
                    dir.chmod(c, 0o755)?;
                }
            }
            dir = dir.open_dir(c)?;
        }
        Ok(dir)
    }
}

/// `/` and the components joined: an absolute view path.
fn abs_of(comps: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in comps {
        out.push(b'/');
        out.extend_from_slice(c);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

/// True when a relative or absolute path climbs above its root.
fn escapes(p: &[u8]) -> bool {
    kiln_fs::path::components_strict(p).is_none()
}

/// Sets atime and mtime of `path` (not following a symlink when `nofollow`).
/// For kiln's own files (downloads, scratch): never a path into a layer
/// or rootfs, whose writes go through `kiln_fs`.
pub fn set_mtime(path: &Path, secs: i64, nsecs: i64, nofollow: bool) -> Result<(), ViewError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io_err(path, io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let ts = libc::timespec {
        tv_sec: secs as _,
        tv_nsec: nsecs as libc::c_long,
    };
    let times = [ts, ts];
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: a valid path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) };
    if r != 0 {
        return Err(io_err(path, io::Error::last_os_error()));
    }
    Ok(())
}

/// The file name of a slash path.
pub fn base_name(p: &str) -> &str {
    p.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

/// [`base_name`] of a path whose names are bytes.
pub fn base_bytes(p: &[u8]) -> &[u8] {
    components(p).next_back().unwrap_or(b"")
}

/// The parent directory of an absolute slash path (`/` for `/`).
pub fn parent_bytes(p: &[u8]) -> Vec<u8> {
    let mut comps: Vec<Vec<u8>> = components(p).map(<[u8]>::to_vec).collect();
    comps.pop();
    abs_of(&comps)
}

/// The directory `host`, a path at or below the (trusted) layer directory
/// `layer`, opened from the layer's top with no symlink followed on the
/// way (`RESOLVE_NO_SYMLINKS`): a component swapped for a symlink
/// meanwhile is an error (`ELOOP`), never followed out of the tree.
fn open_dir_below(layer: &Path, host: &Path) -> io::Result<kiln_fs::Dir> {
    let rel = host
        .strip_prefix(layer)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "outside its layer"))?;
    kiln_fs::Root::open(layer)
        .and_then(|r| r.open_dir(rel, kiln_fs::Follow::Never))
        .map_err(|e| io::Error::new(e.kind(), e))
}

/// A path naming the open directory `dir` itself (its `/proc/self/fd`
/// link), for std calls that take a path: resolution starts at that very
/// directory, whatever its host path names by now.
fn fd_path(dir: &kiln_fs::Dir) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
}

/// Opens for reading the regular file a walk found at `host`, and only
/// that file: the name is opened `O_PATH` without
/// following a final symlink, and refused (`the file changed while it was
/// read`) unless it is still the very inode the walk saw (`dev`,
/// `ino`) and a regular file; only then is it opened for reading, through
/// its descriptor. A build context a user can write to may swap a
/// directory for a symlink to the host's `/etc` between the walk and this
/// open: the swapped path names another inode and is refused, and a
/// device or fifo put in its place is never opened.
pub fn open_found(host: &Path, (dev, ino): (u64, u64)) -> io::Result<fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let open = |p: &Path, flags: i32| -> io::Result<OwnedFd> {
        let c = CString::new(p.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just opened and owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let p = open(host, libc::O_PATH | libc::O_NOFOLLOW)?;
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut at: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: an open (O_PATH) descriptor, which fstat(2) takes, and a
    // stat buffer.
    if unsafe { libc::fstat(p.as_raw_fd(), &mut at) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if at.st_mode & libc::S_IFMT != libc::S_IFREG || (at.st_dev, at.st_ino) != (dev, ino) {
        return Err(io::Error::other(
            "the file changed while it was read (another file is at its path now)",
        ));
    }
    let fd = open(
        Path::new(&format!("/proc/self/fd/{}", p.as_raw_fd())),
        libc::O_RDONLY,
    )?;
    Ok(fs::File::from(fd))
}

/// An `OsStr` view of a slash path relative to its root.
pub fn rel(p: &[u8]) -> &OsStr {
    let mut p = p;
    while let Some(r) = p.strip_prefix(b"/") {
        p = r;
    }
    OsStr::from_bytes(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Only this process's overlay namespace marks a directory opaque: in
    /// a root store `user.overlay.opaque` is an ordinary xattr a RUN step
    /// may set (the live overlay ignores it, so must the views).
    #[test]
    fn only_the_stores_own_namespace_marks_a_directory_opaque() {
        let d = tempfile::tempdir().expect("tmp");
        let other = match XattrNs::current() {
            XattrNs::Trusted => XattrNs::User,
            XattrNs::User => XattrNs::Trusted,
        };
        let p = CString::new(d.path().as_os_str().as_bytes()).expect("c");
        let set = |ns: XattrNs| {
            let n = CString::new(ns.opaque()).expect("c");
            // SAFETY: valid NUL-terminated strings and a 1-byte value.
            unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), b"y".as_ptr().cast(), 1, 0) }
        };
        if set(other) != 0 {
            return; // this file system keeps no such xattrs
        }
        assert!(
            !is_opaque(d.path()),
            "the other namespace's marker was read"
        );
        if set(XattrNs::current()) == 0 {
            assert!(is_opaque(d.path()));
        }
    }

    #[test]
    fn clean_and_join() {
        assert_eq!(clean_abs("/a/../../b/./c/"), "/b/c");
        assert_eq!(join_abs("/app", "x/y"), "/app/x/y");
        assert_eq!(join_abs("/app", "/x"), "/x");
        assert!(escapes(b"../x"));
        assert!(escapes(b"a/../../x"));
        assert!(!escapes(b"a/../x"));
    }

    #[test]
    fn layered_lookup_and_symlinks_stay_inside() {
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("lower");
        let upper = t.path().join("upper");
        fs::create_dir_all(lower.join("etc")).unwrap();
        fs::create_dir_all(lower.join("usr/bin")).unwrap();
        fs::write(lower.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        symlink("/usr/bin", lower.join("bin")).unwrap();
        symlink("../../../../etc/passwd", lower.join("usr/bin/evil")).unwrap();
        fs::create_dir_all(&upper).unwrap();
        fs::write(upper.join("new"), "x").unwrap();
        let v = LayerView::new(vec![upper.clone(), lower.clone()], false);
        assert_eq!(v.resolve("/bin/sh", true).unwrap(), b"/usr/bin/sh");
        assert_eq!(v.resolve("/usr/bin/evil", true).unwrap(), b"/etc/passwd");
        assert!(v.read("/usr/bin/evil").unwrap().starts_with(b"root"));
        assert_eq!(
            v.read_dir("/").unwrap(),
            vec![
                b"bin".to_vec(),
                b"etc".to_vec(),
                b"new".to_vec(),
                b"usr".to_vec()
            ]
        );
        let dir = v.ensure_dir("/usr/bin/sub", (0, 0)).unwrap();
        assert!(dir.path().starts_with(&upper) && upper.join("usr/bin/sub").is_dir());
        // A symlink in the top layer is never followed on the host.
        symlink(t.path(), upper.join("hostlink")).unwrap();
        assert!(v.ensure_dir("/hostlink/x", (0, 0)).is_err());
        assert!(!t.path().join("x").exists());

        let strict = LayerView::new(vec![lower], true);
        assert!(matches!(
            strict.resolve("/usr/bin/evil", true),
            Err(ViewError::Escape(_))
        ));
        assert!(matches!(
            strict.resolve("../x", true),
            Err(ViewError::Escape(_))
        ));
    }

    /// A lower layer's opaque directory holding a symlink to the host's
    /// `/` under an upper layer's real directory of that name: neither a
    /// lookup nor a listing below it reaches the host (a `COPY --from` of
    /// `/o/x/etc/passwd` read the host's file).
    #[test]
    fn a_lower_layers_link_under_an_opaque_dir_never_reaches_the_host() {
        let t = tempfile::tempdir().unwrap();
        let (upper, lower) = (t.path().join("b"), t.path().join("a"));
        fs::create_dir_all(upper.join("o/x")).unwrap();
        fs::write(upper.join("o/x/mine"), "upper").unwrap();
        fs::create_dir_all(lower.join("o")).unwrap();
        symlink("/", lower.join("o/x")).unwrap();
        // The opaque marker in the user namespace (no privilege needed).
        let p = CString::new(lower.join("o").as_os_str().as_bytes()).unwrap();
        let n = CString::new(XattrNs::User.opaque()).unwrap();
        // SAFETY: valid NUL-terminated strings and value.
        let r = unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                n.as_ptr(),
                OPAQUE_VALUE.as_ptr().cast(),
                OPAQUE_VALUE.len(),
                0,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        let v = LayerView::new(vec![upper, lower], false);
        assert!(
            v.lookup("/o/x/etc/passwd").is_none(),
            "the host's /etc/passwd was found through the lower layer's link"
        );
        assert!(v.lookup("/o/x/etc").is_none());
        assert_eq!(v.read_dir("/o/x").unwrap(), vec![b"mine".to_vec()]);
    }
}
