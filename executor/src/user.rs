//! Docker-style `USER` resolution against a rootfs's own /etc/passwd and
//! /etc/group (runc's `GetExecUser` semantics, [`kiln_fs::userdb`]).
//!
//! The files are opened with `openat2(RESOLVE_IN_ROOT)`, so a symlinked
//! `/etc/passwd` in an image resolves inside the rootfs, never on the host.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

/// Largest passwd/group file read.
const MAX_FILE: u64 = 16 << 20;

pub use kiln_fs::userdb::ResolvedUser;

/// Failures of user resolution.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// No such user or group, or a bad id ([`kiln_fs::userdb`]).
    #[error(transparent)]
    Lookup(#[from] kiln_fs::userdb::UserError),
    /// The rootfs or one of its files could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// File inside the rootfs.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Resolve a Docker-style user (`name`, `uid`, `uid:gid`, `name:group`,
/// `uid:group`, empty = root) against the rootfs at `rootfs`.
///
/// ```no_run
/// let u = kiln_executor::resolve_user("/path/to/rootfs".as_ref(), "nobody").unwrap();
/// assert_eq!(u.uid, 65534);
/// ```
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<ResolvedUser, UserError> {
    let root = nix::fcntl::open(
        rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UserError::Io {
        path: rootfs.to_path_buf(),
        source: e.into(),
    })?;
    let passwd = read_in_root(&root, "etc/passwd")?;
    let group = read_in_root(&root, "etc/group")?;
    Ok(kiln_fs::userdb::resolve_exec_user(user, &passwd, &group)?)
}

/// Read a file inside `root` (missing file = empty).
fn read_in_root(root: &OwnedFd, rel: &str) -> Result<String, UserError> {
    // Never blocking on a FIFO the image put there (every later step
    // hung): a regular file only.
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let io_err = |e: std::io::Error| UserError::Io {
        path: PathBuf::from("/").join(rel),
        source: e,
    };
    let fd = match nix::fcntl::openat2(root, rel, how) {
        Ok(fd) => fd,
        Err(nix::Error::ENOENT) | Err(nix::Error::ENOTDIR) => return Ok(String::new()),
        Err(e) => return Err(io_err(e.into())),
    };
    let file = std::fs::File::from(fd);
    if !file.metadata().map_err(io_err)?.is_file() {
        return Err(io_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mut s = Vec::new();
    file.take(MAX_FILE).read_to_end(&mut s).map_err(io_err)?;
    Ok(String::from_utf8_lossy(&s).into_owned())
}
