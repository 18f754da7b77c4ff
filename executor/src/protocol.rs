//! The typed message pipe between the executor (parent) and its init.
//!
//! A `SOCK_SEQPACKET` socketpair: every message is one JSON datagram, so
//! messages written by the init's several processes (supervisor, PID 1, the
//! step before exec) never interleave. The parent sends one [`InitConfig`];
//! the init answers with [`ChildMessage`]s and closes its end when done.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use nix::sys::socket::{recv, send, MsgFlags};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::request::{ExitStatus, InlineFile, RootfsMount};

/// The fd number the init finds its end of the socket on: its standard
/// input. Handing it over as stdin needs no code between fork and exec, so
/// the executor's spawn is a `posix_spawn` (vfork-like, O(1) in the size of
/// kiln's memory) rather than a `fork` that copies kiln's page tables for
/// every step; the init moves it to a close-on-exec descriptor at once and
/// puts /dev/null on stdin.
pub(crate) const INIT_FD: i32 = 0;
/// Largest message accepted.
const MAX_MESSAGE: usize = 8 << 20;

/// Failures of the message pipe.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The socket could not be created or used.
    #[error("init message pipe: {0}")]
    Io(#[from] nix::Error),
    /// A message did not (de)serialise.
    #[error("init message pipe: bad message: {0}")]
    Json(#[from] serde_json::Error),
    /// A message is larger than the pipe accepts.
    #[error("init message pipe: message of {0} bytes is too large")]
    TooLarge(usize),
}

/// One mount to make inside the sandbox (after the rootfs, before pivot_root).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MountEntry {
    pub destination: PathBuf,
    pub typ: String,
    pub source: PathBuf,
    pub options: Vec<String>,
}

/// The user to run as.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum UserSpec {
    /// Docker-style string, resolved in the sandbox's /etc/passwd and /etc/group.
    Docker(String),
    /// Numeric ids as the spec gives them (HOME still comes from passwd).
    Ids {
        uid: u32,
        gid: u32,
        additional_gids: Vec<u32>,
    },
}

/// Capability masks (bit n = capability n).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

/// Everything the init needs, computed by the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InitConfig {
    pub step: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: UserSpec,
    pub caps: CapSets,
    /// (resource, soft, hard)
    pub rlimits: Vec<(i32, u64, u64)>,
    pub no_new_privs: bool,
    pub umask: u32,
    pub oom_score_adj: Option<i32>,
    pub hostname: Option<String>,
    pub new_net: bool,
    pub new_uts: bool,
    pub new_ipc: bool,
    pub new_cgroup: bool,
    pub rootfs_dir: PathBuf,
    pub rootfs: Vec<RootfsMount>,
    pub readonly_rootfs: bool,
    pub mounts: Vec<MountEntry>,
    /// Files carried by value (secrets), placed after `mounts`.
    #[serde(default)]
    pub inline_files: Vec<InlineFile>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    /// Seccomp programs to install in order (none: unconfined).
    pub seccomp: Vec<Vec<crate::seccomp::Insn>>,
    /// Size of the /dev/shm tmpfs in bytes (default 64 MiB).
    #[serde(default)]
    pub shm_size: Option<u64>,
    /// The step's stdin (the descriptor the init got as fd 3) is a
    /// terminal: it becomes stdout, stderr and the controlling terminal.
    #[serde(default)]
    pub tty: bool,
}

/// What the init tells the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ChildMessage {
    /// The sandbox is set up; the step is being started.
    Ready,
    /// Preparing the step failed at `stage`.
    Error { stage: String, message: String },
    /// The step's process ended.
    Exited(ExitStatus),
}

/// Send one message (one datagram).
pub(crate) fn send_msg<T: Serialize>(fd: BorrowedFd<'_>, msg: &T) -> Result<(), ProtocolError> {
    let buf = serde_json::to_vec(msg)?;
    if buf.len() > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge(buf.len()));
    }
    loop {
        match send(fd.as_raw_fd(), &buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::EMSGSIZE) => return Err(ProtocolError::TooLarge(buf.len())),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receive one message; `Ok(None)` at end of stream. With `nonblocking`,
/// `Err(Io(EAGAIN))` when nothing is there.
pub(crate) fn recv_msg<T: DeserializeOwned>(
    fd: BorrowedFd<'_>,
    nonblocking: bool,
) -> Result<Option<T>, ProtocolError> {
    let extra = if nonblocking {
        MsgFlags::MSG_DONTWAIT
    } else {
        MsgFlags::empty()
    };
    let len = loop {
        let mut probe = [0u8; 1];
        match recv(
            fd.as_raw_fd(),
            &mut probe,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC | extra,
        ) {
            Ok(n) => break n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if len == 0 {
        // A zero-length read on a seqpacket socket is the end of stream.
        let mut probe = [0u8; 1];
        let _ = recv(fd.as_raw_fd(), &mut probe, MsgFlags::MSG_DONTWAIT);
        return Ok(None);
    }
    if len > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    let n = loop {
        match recv(fd.as_raw_fd(), &mut buf, extra) {
            Ok(n) => break n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    buf.truncate(n);
    Ok(Some(serde_json::from_slice(&buf)?))
}

/// A connected SEQPACKET pair, both ends close-on-exec: (parent, child).
pub(crate) fn socketpair() -> Result<(OwnedFd, OwnedFd), ProtocolError> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // Room for a large config in one datagram (root may force the size).
    let size: libc::c_int = (MAX_MESSAGE as libc::c_int) + 4096;
    for fd in [&a, &b] {
        // SAFETY: valid fd, pointer to a c_int of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    Ok((a, b))
}
