//! What a caller hands the executor and what it gets back.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

/// How a rootfs mount is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsKind {
    /// An overlay mount; `options` carry `lowerdir=`, `upperdir=`, `workdir=`.
    Overlay,
    /// A bind mount of `source` (options may contain `ro`).
    Bind,
}

/// One rootfs mount, as the snapshotter hands it out (containerd-style:
/// mounts are data, the executor performs them inside the sandbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsMount {
    /// Overlay or bind.
    pub kind: RootfsKind,
    /// Source: `overlay` for overlays, the directory for binds.
    pub source: PathBuf,
    /// Mount options, e.g. `["lowerdir=/l1:/l2", "upperdir=/u", "workdir=/w"]`.
    pub options: Vec<String>,
}

impl RootfsMount {
    /// An overlay of `lowers` (topmost first) with a writable `upper`/`work`.
    pub fn overlay(lowers: &[PathBuf], upper: PathBuf, work: PathBuf) -> Self {
        let lower = lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        RootfsMount {
            kind: RootfsKind::Overlay,
            source: PathBuf::from("overlay"),
            options: vec![
                format!("lowerdir={lower}"),
                format!("upperdir={}", upper.display()),
                format!("workdir={}", work.display()),
            ],
        }
    }

    /// A bind mount of the directory `dir`.
    pub fn bind(dir: PathBuf) -> Self {
        RootfsMount {
            kind: RootfsKind::Bind,
            source: dir,
            options: vec!["rbind".into()],
        }
    }

    /// The value of option `key=` if present.
    pub(crate) fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find_map(|o| o.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }
}

/// Largest inline file accepted (BuildKit caps a secret at 500 KB).
pub const MAX_INLINE_FILE: usize = 512 * 1024;

/// A file handed to the step by value (a build secret): the init writes it
/// on a tmpfs that exists only in the sandbox's mount namespace and binds it
/// read-only, nosuid, nodev, noexec onto `destination`. It never touches a
/// file the host can see. Its `Debug` output shows the size, never the
/// bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlineFile {
    /// Absolute path in the sandbox.
    pub destination: PathBuf,
    /// The contents (at most [`MAX_INLINE_FILE`] bytes).
    pub contents: Vec<u8>,
    /// Permission bits of the file.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

impl fmt::Debug for InlineFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineFile")
            .field("destination", &self.destination)
            .field("contents", &format_args!("<{} bytes>", self.contents.len()))
            .field("mode", &format_args!("{:o}", self.mode))
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .finish()
    }
}

/// One step to run.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Name of the step, used in every error message (e.g. `RUN make`).
    pub name: String,
    /// The OCI runtime spec: process (args, env, cwd, user, capabilities,
    /// rlimits, no_new_privileges), hostname, linux (namespaces, masked and
    /// read-only paths, resources, seccomp) and extra mounts.
    ///
    /// Seccomp: with a `linux.seccomp` section (as [`crate::default_spec`]
    /// sets it, see [`crate::default_seccomp`]) the step runs under Docker's
    /// default profile, its capability rules taken from the bounding set;
    /// without one it is unconfined. Custom profiles are refused.
    ///
    /// Mounts whose destination is one the executor provides itself
    /// (`/proc`, `/dev`, `/dev/pts`, `/dev/shm`, `/dev/mqueue`, `/sys`,
    /// `/sys/fs/cgroup`) are skipped, so a runc-style default spec can be
    /// passed as is.
    pub spec: Spec,
    /// Rootfs mounts, mounted in order on the sandbox root.
    pub rootfs: Vec<RootfsMount>,
    /// A Docker-style `USER` (`name`, `uid`, `uid:gid`, `name:group`),
    /// resolved inside the rootfs; when set it overrides `spec.process.user`.
    pub user: Option<String>,
    /// Kill the step after this long.
    pub timeout: Option<Duration>,
    /// Files handed over by value (build secrets), placed after the spec's
    /// mounts.
    pub files: Vec<InlineFile>,
    /// The process's stdin (`kiln run -i`): this descriptor instead of
    /// /dev/null.
    pub stdin: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// `kiln run -t`: the slave side of a pseudo-terminal, which becomes
    /// the process's stdin, stdout, stderr and controlling terminal (the
    /// caller reads and writes the master; no output lines are sent).
    /// Takes precedence over `stdin`.
    pub tty: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// Answer the step's flush calls (`fsync`, `fdatasync`,
    /// `sync_file_range`, `syncfs`, `sync`) with success without running
    /// them (see [`crate::ANSWERED_WITHOUT_SYNC`]), under the default
    /// seccomp profile. For build steps, whose writes all land in trees
    /// kiln owns and never syncs itself; not for `kiln run`, whose `-v`
    /// mounts are the user's own files. Default `false`.
    pub skip_flushes: bool,
}

impl ExecRequest {
    /// A request with no user override and no timeout.
    pub fn new(name: impl Into<String>, spec: Spec, rootfs: Vec<RootfsMount>) -> Self {
        ExecRequest {
            name: name.into(),
            spec,
            rootfs,
            user: None,
            timeout: None,
            files: Vec::new(),
            stdin: None,
            tty: None,
            skip_flushes: false,
        }
    }
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of output (without its trailing `\n`; a very long line is cut
/// into pieces of at most [`MAX_LINE`] bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// Where it came from.
    pub stream: Stream,
    /// The bytes (not necessarily UTF-8), without the newline.
    pub bytes: Vec<u8>,
    /// True when the line ended with a newline (false for a last partial
    /// line, or a line split at [`MAX_LINE`]).
    pub newline: bool,
}

/// Longest piece of a line delivered at once.
pub const MAX_LINE: usize = 64 * 1024;

impl fmt::Display for OutputLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.bytes))
    }
}

/// How the step's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code: {c}"),
            ExitStatus::Signal(s) => match nix::sys::signal::Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by signal {s} ({})", sig.as_str()),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// A step that ran to its end (whatever its status).
#[derive(Debug, Clone)]
pub struct ExecOutcome {
    /// Exit code or signal of the step's process.
    pub status: ExitStatus,
    /// The last lines of output (both streams, in arrival order).
    pub tail: Vec<OutputLine>,
    /// Wall time from start of the init to the end of the step.
    pub duration: Duration,
}

impl ExecOutcome {
    /// A message for a failed step, in BuildKit's words, with the tail.
    pub fn failure_message(&self, step: &str) -> String {
        let mut m = format!(
            "process {step:?} did not complete successfully: {}",
            self.status
        );
        for l in &self.tail {
            m.push_str("\n  ");
            m.push_str(&l.to_string());
        }
        m
    }
}

/// What is wrong with a request (detected before anything starts).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// `spec.process` or its args are missing.
    #[error("spec has no process args to run")]
    NoArgs,
    /// No rootfs mount given.
    #[error("no rootfs mount given")]
    NoRootfs,
    /// An overlay mount without `lowerdir=`.
    #[error("overlay rootfs mount has no lowerdir= option")]
    NoLowerdir,
    /// A namespace the executor does not support.
    #[error("unsupported namespace in spec: {0}")]
    UnsupportedNamespace(String),
    /// An rlimit above the host's hard limit.
    #[error("rlimit {name} hard limit {requested} exceeds the host's hard limit {host}")]
    RlimitAboveHard {
        /// e.g. `RLIMIT_NOFILE`.
        name: String,
        /// Requested hard limit.
        requested: u64,
        /// The host's hard limit.
        host: u64,
    },
    /// An rlimit whose soft limit exceeds its hard limit.
    #[error("rlimit {name}: soft limit {soft} exceeds hard limit {hard}")]
    RlimitSoftAboveHard {
        /// e.g. `RLIMIT_NOFILE`.
        name: String,
        /// Requested soft limit.
        soft: u64,
        /// Requested hard limit.
        hard: u64,
    },
    /// A capability name the kernel does not know.
    #[error("unknown capability {0}")]
    UnknownCapability(String),
    /// An inline file that cannot be placed.
    #[error("invalid file {destination}: {reason}")]
    InvalidFile {
        /// Destination in the sandbox.
        destination: String,
        /// Why.
        reason: String,
    },
    /// A `linux.seccomp` section kiln cannot apply (only Docker's default
    /// profile, as `default_spec()` sets it, or none).
    #[error("seccomp: {0}")]
    UnsupportedSeccomp(String),
    /// A mount in the spec that cannot be performed.
    #[error("invalid mount {destination}: {reason}")]
    InvalidMount {
        /// Destination in the sandbox.
        destination: String,
        /// Why.
        reason: String,
    },
}
