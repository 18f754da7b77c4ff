//! Copy a tree exactly (every write through kiln-fs): modes, ownership, timestamps, xattrs, hardlinks,
//! symlinks, device nodes and fifos; file data reflinked (`FICLONE`) where
//! the filesystem allows, else copied with `copy_file_range`.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use kiln_fs::{Create, Dir, Follow, Root, Stat};

use crate::error::{io_err, IoContext, Result};

pub(crate) fn fs_err(e: kiln_fs::Error) -> crate::error::Error {
    let io = match e.raw_os_error() {
        Some(n) => std::io::Error::from_raw_os_error(n),
        None => std::io::Error::new(e.kind(), e.to_string()),
    };
    io_err(e.op(), e.path(), io)
}

/// Copy `src` (a directory) to `dst` (which must not exist).
///
/// Every write goes through kiln-fs inside `dst` with [`Follow::Never`]:
/// the copy makes every directory on the way itself, so a symlink met on
/// a destination path can only be one the copy made from the source and
/// is refused rather than followed. The source (a committed snapshot) is
/// only read, and its entries are looked at without following them.
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    // `dst` itself is the store's own path for the new snapshot.
    std::fs::create_dir(dst).ctx("mkdir", dst)?;
    let src_root = Root::open(src).map_err(fs_err)?;
    let root = Root::open(dst).map_err(fs_err)?;
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, Stat)> = Vec::new();
    let mut copy_one = |rel: &Path, st: &Stat| -> Result<()> {
        let host = src.join(rel);
        if rel.as_os_str().is_empty() {
            // The top: its metadata, last.
            copy_xattrs(&host, root.dir(), None)?;
            dirs.push((rel.to_path_buf(), *st));
            return Ok(());
        }
        let (dir, name) = root.parent(rel, Follow::Never).map_err(fs_err)?;
        if st.is_dir() {
            dir.mkdir(&name, 0o700).map_err(fs_err)?;
            copy_xattrs(&host, &dir, Some(&name))?;
            dirs.push((rel.to_path_buf(), *st));
            return Ok(());
        }
        if st.nlink() > 1 {
            if let Some(first) = links.get(&(st.dev(), st.ino())) {
                let (fdir, fname) = root.parent(first, Follow::Never).map_err(fs_err)?;
                dir.hard_link(&name, &fdir, &fname).map_err(fs_err)?;
                return Ok(());
            }
            links.insert((st.dev(), st.ino()), rel.to_path_buf());
        }
        if st.is_symlink() {
            let target = std::fs::read_link(&host).ctx("readlink", &host)?;
            dir.symlink(&name, &target).map_err(fs_err)?;
        } else if st.is_file() {
            let to = dir
                .create_file_unset(&name, Create::Exclusive)
                .map_err(fs_err)?;
            copy_file(&host, &to, &dst.join(rel))?;
        } else {
            // char/block device, fifo, socket
            dir.mknod(&name, st.mode(), st.rdev()).map_err(fs_err)?;
        }
        copy_xattrs(&host, &dir, Some(&name))?;
        dir.copy_meta(&name, st).map_err(fs_err)?;
        Ok(())
    };
    // Entries are read with descriptors from the source root (never
    // following a link); the first error stops the walk and is returned.
    let mut failed = None;
    let walked = src_root.walk(&mut |rel, st| match copy_one(rel, st) {
        Ok(()) => Ok(kiln_fs::Walk::Into),
        Err(e) => {
            failed = Some(e);
            Err(kiln_fs::Error::new(
                "copy",
                rel,
                std::io::Error::other("copy failed"),
            ))
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    walked.map_err(fs_err)?;
    // Directories last, deepest first, so their mtimes survive the copy of
    // their children and read-only directories could be filled.
    for (rel, st) in dirs.iter().rev() {
        if rel.as_os_str().is_empty() {
            root.dir().copy_meta_self(st).map_err(fs_err)?;
            continue;
        }
        let (dir, name) = root.parent(rel, Follow::Never).map_err(fs_err)?;
        dir.copy_meta(&name, st).map_err(fs_err)?;
    }
    Ok(())
}

/// The content of `src` into `to` (a new, empty file made through kiln-fs):
/// reflinked where the file system allows, else copied.
fn copy_file(src: &Path, to: &File, dst: &Path) -> Result<()> {
    let from = File::open(src).ctx("open", src)?;
    // SAFETY: FICLONE takes the source fd as its argument.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    let len = from.metadata().ctx("stat", src)?.len();
    let mut copied = 0u64;
    while copied < len {
        // SAFETY: both fds valid; null offsets use and advance file offsets.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                std::ptr::null_mut(),
                to.as_raw_fd(),
                std::ptr::null_mut(),
                (len - copied).min(1 << 30) as usize,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if matches!(
                e.raw_os_error(),
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
            ) && copied == 0
            {
                let mut r = &from;
                let mut w = to;
                std::io::copy(&mut r, &mut w).ctx("copy", dst)?;
                return Ok(());
            }
            return Err(io_err("copy_file_range", dst, e));
        }
        if n == 0 {
            break;
        }
        copied += n as u64;
    }
    Ok(())
}

/// The source entry's extended attributes (read without following it)
/// onto `name` in `dir` (or `dir` itself), through kiln-fs.
fn copy_xattrs(src: &Path, dir: &Dir, entry: Option<&std::ffi::OsStr>) -> Result<()> {
    let all = kiln_fs::xattrs_of(src).map_err(|e| io_err("listxattr", src, e))?;
    for (cname, value) in all {
        let set = match entry {
            Some(n) => dir.set_xattr(n, cname.as_bytes(), &value),
            None => dir.set_xattr_self(cname.as_bytes(), &value),
        };
        if let Err(e) = set {
            // Filesystems without user xattrs on symlinks etc.: not fatal.
            if !matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::EPERM)) {
                return Err(fs_err(e));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    #[test]
    fn hostile_links_are_copied_as_links_and_never_written_through() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        symlink(&outside, src.join("abs")).unwrap();
        symlink("../../../../..", src.join("d/up")).unwrap();
        std::fs::write(src.join("d/f"), "content").unwrap();
        std::fs::set_permissions(src.join("d/f"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::fs::hard_link(src.join("d/f"), src.join("again")).unwrap();
        let dst = t.path().join("dst");
        copy_tree(&src, &dst).unwrap();
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert_eq!(std::fs::read_link(dst.join("abs")).unwrap(), outside);
        assert_eq!(
            std::fs::read_link(dst.join("d/up")).unwrap(),
            Path::new("../../../../..")
        );
        let f = std::fs::metadata(dst.join("d/f")).unwrap();
        assert_eq!(f.mode() & 0o7777, 0o4755);
        assert_eq!(f.ino(), std::fs::metadata(dst.join("again")).unwrap().ino());
        assert_eq!(std::fs::read(dst.join("again")).unwrap(), b"content");
    }
}
