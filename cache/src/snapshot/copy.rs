//! Copy a tree exactly: modes, ownership, timestamps, xattrs, hardlinks,
//! symlinks, device nodes and fifos; file data reflinked (`FICLONE`) where
//! the filesystem allows, else copied with `copy_file_range`.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{io_err, IoContext, Result};

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io_err(
            "path",
            p,
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })
}

fn check(rc: libc::c_int, op: &'static str, p: &Path) -> Result<()> {
    if rc != 0 {
        return Err(io_err(op, p, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Copy `src` (a directory) to `dst` (which must not exist).
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, std::fs::Metadata)> = Vec::new();
    for entry in walkdir::WalkDir::new(src).follow_links(false) {
        let entry = entry.map_err(|e| {
            let p = e
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| src.to_path_buf());
            io_err("walk", p, e.into())
        })?;
        let rel = entry.path().strip_prefix(src).unwrap_or(Path::new(""));
        let to = dst.join(rel);
        let m = entry.path().symlink_metadata().ctx("stat", entry.path())?;
        let ft = m.file_type();
        if ft.is_dir() {
            std::fs::create_dir(&to).ctx("mkdir", &to)?;
            copy_xattrs(entry.path(), &to)?;
            dirs.push((to, m));
            continue;
        }
        if m.nlink() > 1 {
            if let Some(first) = links.get(&(m.dev(), m.ino())) {
                std::fs::hard_link(first, &to).ctx("link", &to)?;
                continue;
            }
            links.insert((m.dev(), m.ino()), to.clone());
        }
        if ft.is_symlink() {
            let target = std::fs::read_link(entry.path()).ctx("readlink", entry.path())?;
            std::os::unix::fs::symlink(&target, &to).ctx("symlink", &to)?;
        } else if ft.is_file() {
            copy_file(entry.path(), &to, m.mode())?;
        } else {
            // char/block device, fifo, socket
            let c = cstr(&to)?;
            // SAFETY: valid C string; mode/rdev from the source's stat.
            let rc = unsafe { libc::mknod(c.as_ptr(), m.mode(), m.rdev()) };
            check(rc, "mknod", &to)?;
        }
        copy_xattrs(entry.path(), &to)?;
        set_owner_mode_times(&to, &m, ft.is_symlink())?;
    }
    // Directories last, deepest first, so their mtimes survive the copy of
    // their children and read-only directories could be filled.
    for (to, m) in dirs.iter().rev() {
        set_owner_mode_times(to, m, false)?;
    }
    Ok(())
}

fn copy_file(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    let from = File::open(src).ctx("open", src)?;
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o7777)
        .open(dst)
        .ctx("create", dst)?;
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
                let mut w = &to;
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

fn set_owner_mode_times(p: &Path, m: &std::fs::Metadata, symlink: bool) -> Result<()> {
    let c = cstr(p)?;
    // SAFETY: valid C string and plain values.
    let rc = unsafe {
        libc::fchownat(
            libc::AT_FDCWD,
            c.as_ptr(),
            m.uid(),
            m.gid(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(rc, "chown", p)?;
    if !symlink {
        // chown clears setuid/setgid: set the mode after it.
        // SAFETY: as above.
        let rc = unsafe { libc::chmod(c.as_ptr(), m.mode() & 0o7777) };
        check(rc, "chmod", p)?;
    }
    let times = [
        libc::timespec {
            tv_sec: m.atime(),
            tv_nsec: m.atime_nsec(),
        },
        libc::timespec {
            tv_sec: m.mtime(),
            tv_nsec: m.mtime_nsec(),
        },
    ];
    // SAFETY: valid C string, two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(rc, "utimensat", p)
}

fn copy_xattrs(src: &Path, dst: &Path) -> Result<()> {
    let s = cstr(src)?;
    let d = cstr(dst)?;
    // SAFETY: size query with a null buffer.
    let len = unsafe { libc::llistxattr(s.as_ptr(), std::ptr::null_mut(), 0) };
    if len <= 0 {
        return Ok(());
    }
    let mut names = vec![0u8; len as usize];
    // SAFETY: buffer of the size just queried.
    let len = unsafe { libc::llistxattr(s.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        return Err(io_err("listxattr", src, std::io::Error::last_os_error()));
    }
    names.truncate(len as usize);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        // SAFETY: size query.
        let vlen = unsafe { libc::lgetxattr(s.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        if vlen < 0 {
            continue;
        }
        let mut value = vec![0u8; vlen as usize];
        // SAFETY: buffer of the queried size.
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
        // SAFETY: valid strings and buffer.
        let rc = unsafe {
            libc::lsetxattr(
                d.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                vlen as usize,
                0,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // Filesystems without user xattrs on symlinks etc.: not fatal.
            if !matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::EPERM)) {
                return Err(io_err("setxattr", dst, e));
            }
        }
    }
    Ok(())
}
