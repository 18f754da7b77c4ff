//! Small filesystem and process helpers: durable writes, random names,
//! advisory locks, process identity.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{io_err, IoContext, Result};

/// fsync a directory (after a rename or create in it).
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .ctx("open dir", dir)?;
    f.sync_all().ctx("fsync dir", dir)
}

/// `N` random bytes from the kernel (falling back to hashing time, pid and
/// a counter should `getrandom` ever fail).
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use sha2::Digest as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most N - filled bytes into our own buffer.
        let rc = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if rc > 0 {
            filled += rc as usize;
            continue;
        }
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut h = sha2::Sha256::new();
        h.update(t.to_le_bytes());
        h.update(std::process::id().to_le_bytes());
        h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        let seed: [u8; 32] = h.finalize().into();
        for (i, b) in buf.iter_mut().enumerate().skip(filled) {
            *b = seed[i % 32];
        }
        break;
    }
    buf
}

/// A random lowercase hex id of 2*N characters.
pub(crate) fn random_hex<const N: usize>() -> String {
    hex::encode(random_bytes::<N>())
}

/// A random name of `len` characters from `[a-z0-9]`.
pub(crate) fn random_short(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let bytes = random_bytes::<16>();
    bytes
        .iter()
        .take(len)
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A process identity robust against pid reuse: pid plus its start time
/// (clock ticks since boot, field 22 of `/proc/<pid>/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    /// The pid.
    pub pid: i64,
    /// Its start time in clock ticks since boot (0 if unknown).
    pub start: i64,
}

impl ProcessId {
    /// This process.
    pub fn current() -> Self {
        let pid = std::process::id() as i64;
        ProcessId {
            pid,
            start: start_time(pid).unwrap_or(0),
        }
    }

    /// Whether this process still runs (same pid, same start time).
    pub fn is_alive(&self) -> bool {
        match start_time(self.pid) {
            Some(start) => self.start == 0 || start == self.start,
            None => false,
        }
    }
}

fn start_time(pid: i64) -> Option<i64> {
    let mut s = String::new();
    File::open(format!("/proc/{pid}/stat"))
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    // The comm field may contain spaces and parens: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    // rest starts at field 3 (state); starttime is field 22 -> index 19.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A held advisory lock (`flock`) on a file; released on drop (or when the
/// process dies, which is what makes it crash safe).
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    fn lock(path: &Path, op: libc::c_int) -> Result<Option<FileLock>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .ctx("open lock", path)?;
        loop {
            // SAFETY: flock on a valid fd we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(Some(FileLock { _file: file }));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Ok(None),
                _ => return Err(io_err("flock", path, e)),
            }
        }
    }

    /// Shared lock, waiting for it.
    pub(crate) fn shared(path: &Path) -> Result<FileLock> {
        Self::lock(path, libc::LOCK_SH)?.ok_or_else(|| {
            io_err(
                "flock",
                path,
                std::io::Error::other("unexpected EWOULDBLOCK"),
            )
        })
    }

    /// Exclusive lock, waiting for it.
    pub(crate) fn exclusive(path: &Path) -> Result<FileLock> {
        Self::lock(path, libc::LOCK_EX)?.ok_or_else(|| {
            io_err(
                "flock",
                path,
                std::io::Error::other("unexpected EWOULDBLOCK"),
            )
        })
    }
}

/// Recursively remove `path` if it exists (no error if it does not).
pub(crate) fn remove_all(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        // Any depth, one directory open at a time, read-only directories
        // opened up on the way (see `kiln_fs::remove_tree`).
        Ok(m) if m.is_dir() => kiln_fs::remove_tree(path)
            .or_else(ignore_not_found)
            .ctx("remove", path),
        Ok(_) => std::fs::remove_file(path)
            .or_else(ignore_not_found)
            .ctx("remove", path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", path, e)),
    }
}

fn ignore_not_found(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Disk usage of a tree: (bytes allocated, inodes), hardlinks counted once.
/// Walked with [`kiln_fs::Root::walk`] (descriptors, no link followed).
pub(crate) fn disk_usage(path: &Path) -> Result<(u64, u64)> {
    use std::collections::HashSet;
    let root = kiln_fs::Root::open(path).map_err(|e| fs_error("walk", path, e))?;
    let mut seen = HashSet::new();
    let (mut size, mut inodes) = (0u64, 0u64);
    root.walk(&mut |_, st| {
        if seen.insert((st.dev(), st.ino())) {
            size += st.allocated();
            inodes += 1;
        }
        Ok(kiln_fs::Walk::Into)
    })
    .map_err(|e| fs_error("walk", path, e))?;
    Ok((size, inodes))
}

fn fs_error(op: &'static str, path: &Path, e: kiln_fs::Error) -> crate::error::Error {
    io_err(op, path, e.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn remove_all_opens_read_only_dirs_but_never_a_link_target() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o500)).unwrap();
        let tree = t.path().join("tree");
        std::fs::create_dir_all(tree.join("ro/deeper")).unwrap();
        symlink(&outside, tree.join("ro/deeper/esc")).unwrap();
        symlink("../../../outside", tree.join("ro/rel")).unwrap();
        for d in ["ro/deeper", "ro"] {
            std::fs::set_permissions(tree.join(d), std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        remove_all(&tree).unwrap();
        assert!(!tree.exists() && outside.is_dir());
        assert_eq!(mode(&outside), 0o500, "a link's target is never changed");
    }
}
