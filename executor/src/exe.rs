//! The binary the sandbox's init runs from: never the host's file itself.
//!
//! The init is kiln (`/proc/self/exe`), and a step is a fork of it until
//! its own `execve`. A step that executes `/proc/self/exe` (a command, an
//! ENTRYPOINT, a `#!` line) runs that binary inside the sandbox, and a
//! child of it reached the host's inode through `/proc/$PPID/exe`: as
//! root, the owner of the file, it could `chmod 4755` (or `chown`, or set
//! file capabilities on) the host's kiln — local root for any user
//! (runc's CVE-2019-5736 was the same door, for writing). So the init is
//! executed from a read-only clone of the binary's mount (`open_tree`,
//! `mount_setattr`; every change through it is `EROFS`), or, where those
//! calls are missing, from a sealed in-memory copy (runc's memfd).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The path to execute for the init binary `path` (`/proc/self/fd/N` of a
/// descriptor this process keeps), made once per path.
pub(crate) fn init_exe(path: &Path) -> io::Result<PathBuf> {
    static MADE: OnceLock<std::sync::Mutex<Vec<(PathBuf, OwnedFd)>>> = OnceLock::new();
    let made = MADE.get_or_init(Default::default);
    let mut made = made.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, fd)) = made.iter().find(|(p, _)| p == path) {
        return Ok(fd_path(fd));
    }
    let fd = match read_only_clone(path) {
        Ok(fd) => fd,
        Err(_) => sealed_copy(path)?,
    };
    // Above the descriptors a spawn moves into place (the init's socket
    // goes to 3): this one must still name the binary at exec.
    let fd = high(fd)?;
    let p = fd_path(&fd);
    made.push((path.to_path_buf(), fd));
    Ok(p)
}

/// `fd` moved to a number of 10 or more (close-on-exec).
fn high(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= 10 {
        return Ok(fd);
    }
    // SAFETY: a valid descriptor; F_DUPFD_CLOEXEC returns a new one.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, owned from here.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// An `O_PATH` descriptor of `path` on a detached, read-only clone of its
/// mount.
fn read_only_clone(path: &Path) -> io::Result<OwnedFd> {
    use crate::rootfs::{MountAttr, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
    let fd = crate::rootfs::open_tree_clone(path, 0).map_err(io::Error::from)?;
    crate::rootfs::mount_setattr(
        &fd,
        0,
        &MountAttr {
            attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        },
    )
    .map_err(io::Error::from)?;
    Ok(fd)
}

/// A sealed in-memory copy of `path` (no write, grow or shrink, ever).
fn sealed_copy(path: &Path) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated name and memfd_create's flags.
    let fd = unsafe {
        libc::memfd_create(
            c"kiln-init".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor memfd_create returned, owned from here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut to = std::fs::File::from(fd);
    let mut from = std::fs::File::open(path)?;
    io::copy(&mut from, &mut to)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: a valid memfd and F_ADD_SEALS with its flags.
    if unsafe { libc::fcntl(to.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(to))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the init runs from refuses every change of its metadata (the
    /// host's binary is out of reach through it), and still executes.
    #[test]
    fn the_init_binary_cannot_be_changed_through_its_path() {
        let p = init_exe(Path::new("/proc/self/exe")).expect("init exe");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("c");
        // SAFETY: a NUL-terminated path.
        let r = unsafe { libc::chmod(c.as_ptr(), 0o4755) };
        assert_ne!(r, 0, "chmod through the init's path succeeded");
        let e = io::Error::last_os_error().raw_os_error();
        assert!(matches!(e, Some(libc::EROFS) | Some(libc::EPERM)), "{e:?}");
        let before = std::fs::metadata("/proc/self/exe").expect("stat");
        let out = std::process::Command::new(&p)
            .arg("--help")
            .output()
            .expect("run");
        let _ = out;
        let after = std::fs::metadata("/proc/self/exe").expect("stat");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(before.mode(), after.mode());
    }
}
