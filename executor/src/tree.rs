//! Creating mount points inside a tree by file descriptor.
//!
//! The executor makes mount points in three trees: the stub layer it
//! stacks on an overlay rootfs, a bind rootfs (a real directory that
//! becomes the sandbox root) and the sandbox's /dev tmpfs. Destinations come
//! from the request (RUN --mount targets, `kiln run -v`, secrets) and trees
//! from images: a path is never handed to `std::fs`. Every component is
//! cleaned lexically (`..` never climbs above the root), looked at with
//! `fstatat(AT_SYMLINK_NOFOLLOW)` relative to its parent's descriptor and
//! created with `mkdirat`/`openat(O_EXCL|O_NOFOLLOW)`; a symlink already in
//! the tree is followed *inside* the root (`openat2(RESOLVE_IN_ROOT)`).
//! (The shared `kiln-fs` crate is meant to take this over once it lands.)

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// The components of `p` below `/`, cleaned lexically as Docker cleans a
/// mount destination (`.` dropped, `..` removes the previous component and
/// stops at the root).
pub(crate) fn clean_components(p: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Open `rel` inside `root` with `flags`, resolving every symlink inside
/// the root; with `nofollow` the last component is not followed.
pub(crate) fn open_in_root(
    root: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlag,
    nofollow: bool,
) -> nix::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let mut f = flags | OFlag::O_CLOEXEC;
    if nofollow {
        f |= OFlag::O_NOFOLLOW;
    }
    let how = OpenHow::new()
        .flags(f)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    nix::fcntl::openat2(root, rel, how)
}

/// `lstat` of `rel` inside `root` (intermediate symlinks followed inside
/// the root, the last one not).
pub(crate) fn lstat_in_root(root: BorrowedFd<'_>, rel: &Path) -> nix::Result<FileStat> {
    let fd = open_in_root(root, rel, OFlag::O_PATH, true)?;
    nix::sys::stat::fstat(&fd)
}

/// Whether a stat is of the given type.
pub(crate) fn is_type(st: &FileStat, t: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == t
}

/// One entry [`make_path`] created: its parent directory, name, whether it
/// is a directory, and its path below the root.
pub(crate) struct Made<'a> {
    /// The directory it was created in.
    pub parent: &'a OwnedFd,
    /// Its name there.
    pub name: &'a OsStr,
    /// Directory (else an empty file).
    pub is_dir: bool,
    /// Its path relative to the root.
    pub rel: &'a Path,
}

/// Create every missing component of `comps` inside `root`: directories
/// (0755), and the last one as a directory or, with `leaf_dir` false, an
/// empty file (0644). Existing components are used as they are; a symlink
/// is followed inside the root (a dangling one leaves the path alone:
/// `Ok(false)`, the mount then fails with a clear message). `made` sees
/// each entry created, in order.
pub(crate) fn make_path(
    root: BorrowedFd<'_>,
    comps: &[OsString],
    leaf_dir: bool,
    made: &mut dyn FnMut(Made<'_>) -> nix::Result<()>,
) -> nix::Result<bool> {
    let mut parent = open_in_root(
        root,
        Path::new("."),
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        false,
    )?;
    let mut rel = PathBuf::new();
    for (i, name) in comps.iter().enumerate() {
        rel.push(name);
        let leaf = i + 1 == comps.len();
        let want_dir = !leaf || leaf_dir;
        let next = match nix::sys::stat::fstatat(
            &parent,
            name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) if is_type(&st, SFlag::S_IFLNK) => {
                match open_in_root(root, &rel, OFlag::O_PATH, false) {
                    Ok(fd) => fd,
                    Err(nix::Error::ENOENT) => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            Ok(_) => nix::fcntl::openat(
                &parent,
                name.as_os_str(),
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?,
            Err(nix::Error::ENOENT) => {
                if want_dir {
                    nix::sys::stat::mkdirat(
                        &parent,
                        name.as_os_str(),
                        Mode::from_bits_truncate(0o755),
                    )?;
                } else {
                    drop(nix::fcntl::openat(
                        &parent,
                        name.as_os_str(),
                        OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_WRONLY
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o644),
                    )?);
                }
                made(Made {
                    parent: &parent,
                    name,
                    is_dir: want_dir,
                    rel: &rel,
                })?;
                nix::fcntl::openat(
                    &parent,
                    name.as_os_str(),
                    OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?
            }
            Err(e) => return Err(e),
        };
        parent = next;
    }
    Ok(true)
}

/// Open an entry of `parent` for changing its metadata (never following a
/// symlink).
pub(crate) fn open_entry(parent: &OwnedFd, name: &OsStr, is_dir: bool) -> nix::Result<OwnedFd> {
    let mut f = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    if is_dir {
        f |= OFlag::O_DIRECTORY;
    }
    nix::fcntl::openat(parent.as_fd(), name, f, Mode::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_never_climb_above_the_root() {
        let c = |s: &str| -> Vec<String> {
            clean_components(Path::new(s))
                .iter()
                .map(|o| o.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(c("/a/./b/../c"), ["a", "c"]);
        assert_eq!(c("/../../etc/x"), ["etc", "x"]);
        assert_eq!(c("/"), Vec::<String>::new());
    }

    #[test]
    fn make_path_stays_inside_and_follows_links_inside() {
        let outside = tempfile::tempdir().unwrap();
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        // An absolute link to a host directory, and a relative one that
        // climbs: both resolve inside the root.
        std::os::unix::fs::symlink(outside.path(), root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("up")).unwrap();
        let fd =
            nix::fcntl::open(&root, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        let mut names = Vec::new();
        let mut rec = |m: Made<'_>| {
            names.push(m.rel.to_path_buf());
            Ok(())
        };
        let p = clean_components(Path::new("/up/x/y"));
        assert!(make_path(fd.as_fd(), &p, false, &mut rec).unwrap());
        assert!(root.join("x/y").is_file(), "created at the root");
        let p = clean_components(Path::new("/../../z"));
        assert!(make_path(fd.as_fd(), &p, true, &mut rec).unwrap());
        assert!(root.join("z").is_dir());
        // The absolute link points at a path that does not exist in the
        // root: dangling there, nothing is created anywhere.
        let p = clean_components(Path::new("/abs/f"));
        assert!(!make_path(fd.as_fd(), &p, false, &mut rec).unwrap());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert_eq!(
            names,
            [
                PathBuf::from("up/x"),
                PathBuf::from("up/x/y"),
                PathBuf::from("z")
            ]
        );
    }
}
