//! The parent side: prepares a step, starts the init, streams output,
//! enforces timeout and cancellation, and cleans up.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_fs::{Create, Dangling, Dir, DirSpec, Follow, Root, Stat};
use oci_spec::runtime::{LinuxNamespaceType, PosixRlimitType, Spec};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::caps::{mask_of, DEFAULT_CAPS};
use crate::cgroup::{Limits, StepCgroup};
use crate::error::Error;
use crate::init::{INIT_ARG, PARENT_PID_ENV};
use crate::protocol::{
    recv_msg, send_msg, socketpair, CapSets, ChildMessage, InitConfig, MountEntry, UserSpec,
};
use crate::request::{
    ExecOutcome, ExecRequest, InlineFile, OutputLine, RequestError, RootfsKind, RootfsMount,
    Stream, MAX_INLINE_FILE, MAX_LINE,
};
use crate::rootfs::{DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS, SYSTEM_DESTINATIONS};

/// How the executor itself is set up (shared by all steps).
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// The binary re-executed as init (`<init_path> __init`); it must call
    /// [`crate::maybe_run_init`] first thing. Default `/proc/self/exe`.
    pub init_path: PathBuf,
    /// Where per-step state (provided files, mount points) is kept while a
    /// step runs. Default `$TMPDIR/kiln-executor`.
    pub state_dir: PathBuf,
    /// Name of the cgroup that holds the steps' cgroups. Default `kiln`.
    pub cgroup_parent: String,
    /// How many last lines of output to keep. Default 20.
    pub tail_lines: usize,
    /// The host file copied to the sandbox's /etc/resolv.conf.
    pub resolv_conf: PathBuf,
    /// Extra `/etc/hosts` entries (host name, address), as docker's
    /// `--add-host`; checked by [`crate::check_extra_host`].
    pub extra_hosts: Vec<(String, String)>,
    /// Size of each sandbox's /dev/shm tmpfs in bytes (default 64 MiB).
    pub shm_size: Option<u64>,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            init_path: PathBuf::from("/proc/self/exe"),
            // Per user (another's is refused: see `Executor::run`).
            // SAFETY: geteuid has no failure mode.
            state_dir: std::env::temp_dir()
                .join(format!("kiln-executor-{}", unsafe { libc::geteuid() })),
            cgroup_parent: "kiln".into(),
            tail_lines: 20,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            extra_hosts: Vec::new(),
            shm_size: None,
        }
    }
}

/// Runs build steps. Cheap to clone; steps may run concurrently.
#[derive(Debug, Clone, Default)]
pub struct Executor {
    config: ExecutorConfig,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn step_id() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{n}-{t:08x}", std::process::id())
}

/// Per-step state directory, removed on drop.
struct StateDir {
    path: PathBuf,
    /// Stubs created inside a bind rootfs, removed (if still empty) on drop.
    bind_stubs: Vec<BindStub>,
}

/// A mount point made inside a bind rootfs: removed through its parent's
/// descriptor, never by path.
struct BindStub {
    parent: Dir,
    name: std::ffi::OsString,
    is_dir: bool,
}

impl Drop for StateDir {
    fn drop(&mut self) {
        for s in self.bind_stubs.iter().rev() {
            if s.is_dir {
                // Only an empty directory goes (rmdir semantics).
                if matches!(s.parent.stat(&s.name), Ok(Some(st)) if st.is_dir()) {
                    let _ = s.parent.remove(&s.name);
                }
                continue;
            }
            if matches!(s.parent.stat(&s.name), Ok(Some(st)) if st.is_file() && st.size() == 0) {
                let _ = s.parent.remove(&s.name);
            }
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

struct Tail {
    cap: usize,
    lines: VecDeque<OutputLine>,
}

impl Tail {
    fn push(&mut self, l: OutputLine) {
        if self.cap == 0 {
            return;
        }
        if self.lines.len() == self.cap {
            self.lines.pop_front();
        }
        self.lines.push_back(l);
    }
}

fn rlimit_resource(t: PosixRlimitType) -> (i32, &'static str) {
    use PosixRlimitType as T;
    let (r, n) = match t {
        T::RlimitCpu => (libc::RLIMIT_CPU, "RLIMIT_CPU"),
        T::RlimitFsize => (libc::RLIMIT_FSIZE, "RLIMIT_FSIZE"),
        T::RlimitData => (libc::RLIMIT_DATA, "RLIMIT_DATA"),
        T::RlimitStack => (libc::RLIMIT_STACK, "RLIMIT_STACK"),
        T::RlimitCore => (libc::RLIMIT_CORE, "RLIMIT_CORE"),
        T::RlimitRss => (libc::RLIMIT_RSS, "RLIMIT_RSS"),
        T::RlimitNproc => (libc::RLIMIT_NPROC, "RLIMIT_NPROC"),
        T::RlimitNofile => (libc::RLIMIT_NOFILE, "RLIMIT_NOFILE"),
        T::RlimitMemlock => (libc::RLIMIT_MEMLOCK, "RLIMIT_MEMLOCK"),
        T::RlimitAs => (libc::RLIMIT_AS, "RLIMIT_AS"),
        T::RlimitLocks => (libc::RLIMIT_LOCKS, "RLIMIT_LOCKS"),
        T::RlimitSigpending => (libc::RLIMIT_SIGPENDING, "RLIMIT_SIGPENDING"),
        T::RlimitMsgqueue => (libc::RLIMIT_MSGQUEUE, "RLIMIT_MSGQUEUE"),
        T::RlimitNice => (libc::RLIMIT_NICE, "RLIMIT_NICE"),
        T::RlimitRtprio => (libc::RLIMIT_RTPRIO, "RLIMIT_RTPRIO"),
        T::RlimitRttime => (libc::RLIMIT_RTTIME, "RLIMIT_RTTIME"),
    };
    (r as i32, n)
}

/// Translate the spec into the init's config (without mounts), checking it.
fn init_config(req: &ExecRequest) -> Result<InitConfig, RequestError> {
    let spec: &Spec = &req.spec;
    let process = spec.process().as_ref().ok_or(RequestError::NoArgs)?;
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(RequestError::NoArgs);
    }
    if req.rootfs.is_empty() {
        return Err(RequestError::NoRootfs);
    }
    let linux = spec.linux().as_ref();
    let (mut new_uts, mut new_ipc, mut new_cgroup, mut new_net) = (true, true, true, false);
    if let Some(list) = linux.and_then(|l| l.namespaces().as_ref()) {
        new_uts = false;
        new_ipc = false;
        new_cgroup = false;
        for n in list {
            if let Some(p) = n.path() {
                return Err(RequestError::UnsupportedNamespace(format!(
                    "joining the {} namespace at {}",
                    n.typ(),
                    p.display()
                )));
            }
            match n.typ() {
                LinuxNamespaceType::Mount | LinuxNamespaceType::Pid => {}
                LinuxNamespaceType::Uts => new_uts = true,
                LinuxNamespaceType::Ipc => new_ipc = true,
                LinuxNamespaceType::Cgroup => new_cgroup = true,
                LinuxNamespaceType::Network => new_net = true,
                other => return Err(RequestError::UnsupportedNamespace(other.to_string())),
            }
        }
    }
    let caps = match process.capabilities() {
        Some(c) => {
            let m = |s: &Option<oci_spec::runtime::Capabilities>| -> Result<u64, RequestError> {
                s.as_ref()
                    .map(mask_of)
                    .transpose()
                    .map(|v| v.unwrap_or(0))
                    .map_err(RequestError::UnknownCapability)
            };
            CapSets {
                bounding: m(c.bounding())?,
                effective: m(c.effective())?,
                permitted: m(c.permitted())?,
                inheritable: m(c.inheritable())?,
                ambient: m(c.ambient())?,
            }
        }
        None => CapSets {
            bounding: DEFAULT_CAPS,
            effective: DEFAULT_CAPS,
            permitted: DEFAULT_CAPS,
            inheritable: 0,
            ambient: 0,
        },
    };
    let mut rlimits = Vec::new();
    for r in process.rlimits().iter().flatten() {
        let (res, name) = rlimit_resource(r.typ());
        if r.soft() > r.hard() {
            return Err(RequestError::RlimitSoftAboveHard {
                name: name.into(),
                soft: r.soft(),
                hard: r.hard(),
            });
        }
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        if unsafe { libc::getrlimit(res as _, &mut cur) } == 0 {
            let host = cur.rlim_max;
            if cur.rlim_max != libc::RLIM_INFINITY && r.hard() > host {
                return Err(RequestError::RlimitAboveHard {
                    name: name.into(),
                    requested: r.hard(),
                    host,
                });
            }
        }
        rlimits.push((res, r.soft(), r.hard()));
    }
    let user = match &req.user {
        Some(u) => UserSpec::Docker(u.clone()),
        None => {
            let u = process.user();
            UserSpec::Ids {
                uid: u.uid(),
                gid: u.gid(),
                additional_gids: u.additional_gids().clone().unwrap_or_default(),
            }
        }
    };
    let cwd = process.cwd().to_string_lossy().into_owned();
    let cwd = if cwd.starts_with('/') {
        cwd
    } else {
        format!("/{cwd}")
    };
    let seccomp = match linux.and_then(|l| l.seccomp().as_ref()) {
        Some(section) => {
            crate::seccomp::compile(section, caps.bounding, !new_net, req.skip_flushes)?
        }
        None => Vec::new(),
    };
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    Ok(InitConfig {
        step: req.name.clone(),
        args,
        env: process.env().clone().unwrap_or_default(),
        cwd,
        user,
        caps,
        rlimits,
        no_new_privs: process.no_new_privileges().unwrap_or(false),
        umask: process.user().umask().unwrap_or(0o022),
        oom_score_adj: process.oom_score_adj(),
        hostname: Some(spec.hostname().clone().unwrap_or_else(|| "kiln".into())),
        new_net,
        new_uts,
        new_ipc,
        new_cgroup,
        rootfs_dir: PathBuf::new(),
        rootfs: req.rootfs.clone(),
        readonly_rootfs: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        mounts: Vec::new(),
        inline_files: inline_files(&req.files)?,
        masked_paths: linux
            .and_then(|l| l.masked_paths().clone())
            .unwrap_or_else(|| strings(DEFAULT_MASKED_PATHS)),
        readonly_paths: linux
            .and_then(|l| l.readonly_paths().clone())
            .unwrap_or_else(|| strings(DEFAULT_READONLY_PATHS)),
        seccomp,
        shm_size: None,
        tty: req.tty.is_some(),
    })
}

/// The request's inline files, checked.
fn inline_files(files: &[InlineFile]) -> Result<Vec<InlineFile>, RequestError> {
    for f in files {
        let destination = f.destination.display().to_string();
        let bad = |reason: &str| RequestError::InvalidFile {
            destination: destination.clone(),
            reason: reason.into(),
        };
        if !f.destination.is_absolute() {
            return Err(bad("destination is not absolute"));
        }
        let norm = destination.trim_end_matches('/');
        if norm.is_empty() || SYSTEM_DESTINATIONS.contains(&norm) {
            return Err(bad("destination is a system mount point"));
        }
        if f.contents.len() > MAX_INLINE_FILE {
            return Err(bad(&format!(
                "{} bytes is over the limit of {MAX_INLINE_FILE}",
                f.contents.len()
            )));
        }
    }
    Ok(files.to_vec())
}

/// Spec mounts that the executor performs (system destinations skipped).
fn spec_mounts(spec: &Spec) -> Result<Vec<MountEntry>, RequestError> {
    let mut out = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination().to_string_lossy().into_owned();
        let norm = dest.trim_end_matches('/');
        if SYSTEM_DESTINATIONS.contains(&norm) {
            continue;
        }
        if !dest.starts_with('/') {
            return Err(RequestError::InvalidMount {
                destination: dest,
                reason: "destination is not absolute".into(),
            });
        }
        let options = m.options().clone().unwrap_or_default();
        let is_bind = m.typ().as_deref() == Some("bind")
            || options.iter().any(|o| o == "bind" || o == "rbind");
        let mut options = options;
        if is_bind && !options.iter().any(|o| o == "bind" || o == "rbind") {
            options.push("rbind".into());
        }
        let source = m.source().clone().unwrap_or_default();
        if is_bind && source.as_os_str().is_empty() {
            return Err(RequestError::InvalidMount {
                destination: dest,
                reason: "bind mount without source".into(),
            });
        }
        out.push(MountEntry {
            destination: m.destination().clone(),
            typ: m.typ().clone().unwrap_or_else(|| "bind".into()),
            source,
            options,
        });
    }
    Ok(out)
}

/// The entry at `rel` in the first (topmost) lower that has it, resolved
/// inside that lower (its symlinks never reach the host; the last
/// component is not followed).
fn lookup_lowers(lowers: &[Root], rel: &Path) -> Option<Stat> {
    for l in lowers {
        if let Ok(Some(st)) = l.lstat(rel, Follow::InRoot) {
            // A whiteout (0/0 char device) hides everything below.
            if st.is_whiteout() {
                return None;
            }
            return Some(st);
        }
    }
    None
}

/// One mount point made by [`make_mount_point`]: the directory it was
/// created in, its name there, whether it is a directory (else an empty
/// file) and its path inside the root.
pub(crate) struct MadeStub<'a> {
    parent: &'a Dir,
    name: &'a OsStr,
    is_dir: bool,
    rel: &'a Path,
}

/// Create every missing component of the mount point `dest` inside `root`
/// with kiln-fs: directories (0755), and the last one as a directory or,
/// with `leaf_dir` false, an empty file (0644). `..` never climbs above
/// the root; what exists is used as it is; a symlink on the way is
/// followed inside the root, and a dangling one leaves the path alone
/// (`Ok(false)`: the mount then fails with a clear message). `made` sees
/// each entry created, in order.
pub(crate) fn make_mount_point(
    root: &Root,
    dest: &Path,
    leaf_dir: bool,
    made: &mut dyn FnMut(MadeStub<'_>) -> kiln_fs::Result<()>,
) -> kiln_fs::Result<bool> {
    let mut comps = kiln_fs::clean_components(dest);
    let Some(leaf) = comps.pop() else {
        return Ok(true);
    };
    let parent_rel: PathBuf = comps.iter().collect();
    let mut on_dir = |parent: &Dir, name: &OsStr| -> kiln_fs::Result<()> {
        let rel = rel_of(root, parent, name);
        made(MadeStub {
            parent,
            name,
            is_dir: true,
            rel: &rel,
        })
    };
    let dir = match root.mkdir_all_ext(
        &parent_rel,
        Follow::InRoot,
        Dangling::Fail,
        &mut |_| DirSpec::default(),
        &mut on_dir,
    ) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(e),
    };
    match dir.stat(&leaf)? {
        // A link is resolved by the mount (inside the root); one that
        // dangles is left alone.
        Some(st) if st.is_symlink() => Ok(root
            .open_path(parent_rel.join(&leaf), Follow::InRoot)
            .is_ok()),
        Some(_) => Ok(true),
        None => {
            let created = if leaf_dir {
                dir.mkdir(&leaf, 0o755)?
            } else {
                match dir.create_file(&leaf, 0o644, Create::Exclusive) {
                    Ok(_) => true,
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
                    Err(e) => return Err(e),
                }
            };
            if created {
                let rel = rel_of(root, &dir, &leaf);
                made(MadeStub {
                    parent: &dir,
                    name: &leaf,
                    is_dir: leaf_dir,
                    rel: &rel,
                })?;
            }
            Ok(true)
        }
    }
}

/// The path inside `root` of `name` in `parent` (a directory kiln-fs
/// resolved inside it, so its host path lies below the root's).
fn rel_of(root: &Root, parent: &Dir, name: &OsStr) -> PathBuf {
    parent
        .path()
        .strip_prefix(root.path())
        .map(|p| p.join(name))
        .unwrap_or_else(|_| PathBuf::from(name))
}

/// Build the stub layer: a lowerdir placed on top of the image's lowers
/// that holds every mount point the sandbox needs (directories copy the
/// metadata of the real ones below). Mounting over these never writes to the
/// upperdir, so the layer holds only what the step wrote. Everything is
/// made through kiln-fs inside the stub directory (a destination's `..`
/// cannot leave it) and the lowers are only looked at inside themselves.
fn build_stub_layer(
    stub: &Path,
    lowers: &[PathBuf],
    entries: &[(PathBuf, bool)],
) -> std::io::Result<()> {
    // The stub directory itself is kiln's (in the step's state directory).
    fs::DirBuilder::new().mode(0o755).create(stub)?;
    let lower_roots: Vec<Root> = lowers.iter().filter_map(|l| Root::open(l).ok()).collect();
    let root = Root::open(stub)?;
    if let Some(st) = lookup_lowers(&lower_roots, Path::new("")) {
        root.dir().copy_meta_self(&st)?;
    }
    for (dest, is_dir) in entries {
        make_mount_point(&root, dest, *is_dir, &mut |m| {
            let below = lookup_lowers(&lower_roots, m.rel).filter(|st| {
                if m.is_dir {
                    st.is_dir()
                } else {
                    st.is_file()
                }
            });
            // Without one below, the defaults it was made with stay.
            match below {
                Some(st) => m.parent.copy_meta(m.name, &st),
                None => Ok(()),
            }
        })?;
    }
    Ok(())
}

/// Create missing mount points inside a bind rootfs, through kiln-fs
/// inside it (its symlinks are followed inside the root; a dangling one
/// leaves the entry alone and the mount then fails with a clear message);
/// returns what was created, to be removed afterwards.
fn create_bind_stubs(root: &Path, entries: &[(PathBuf, bool)]) -> std::io::Result<Vec<BindStub>> {
    let root = Root::open(root)?;
    let mut created = Vec::new();
    for (dest, is_dir) in entries {
        make_mount_point(&root, dest, *is_dir, &mut |m| {
            created.push(BindStub {
                parent: m.parent.try_clone()?,
                name: m.name.to_os_string(),
                is_dir: m.is_dir,
            });
            Ok(())
        })?;
    }
    Ok(created)
}

fn hosts_file(hostname: &str, extra: &[(String, String)]) -> String {
    let mut s =
        format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for (name, addr) in extra {
        s.push_str(&format!("{addr}\t{name}\n"));
    }
    s
}

/// Checks an `--add-host` entry (`name`, `address`) before it is written
/// to a sandbox's /etc/hosts: a host name (letters, digits, `.`, `-`,
/// `_`, at most 253 bytes) and an IPv4 or IPv6 address, so that nothing
/// else (a newline, another entry) can be slipped into the file.
pub fn check_extra_host(name: &str, addr: &str) -> Result<(), ExtraHostError> {
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !name_ok {
        return Err(ExtraHostError::Name(name.to_string()));
    }
    if addr.parse::<std::net::IpAddr>().is_err() {
        return Err(ExtraHostError::Address {
            name: name.to_string(),
            addr: addr.to_string(),
        });
    }
    Ok(())
}

/// Why an `--add-host` entry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExtraHostError {
    /// Not a host name.
    #[error("invalid host name {0:?}")]
    Name(String),
    /// Not an IPv4 or IPv6 address.
    #[error("invalid IP address {addr:?} for {name}")]
    Address {
        /// The host name.
        name: String,
        /// The address given.
        addr: String,
    },
}

async fn pump<R: AsyncRead + Unpin>(
    r: R,
    stream: Stream,
    tail: Arc<Mutex<Tail>>,
    out: Option<mpsc::Sender<OutputLine>>,
) {
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut line = Vec::new();
    let emit = |bytes: Vec<u8>, newline: bool| {
        let l = OutputLine {
            stream,
            bytes,
            newline,
        };
        if let Ok(mut t) = tail.lock() {
            t.push(l.clone());
        }
        l
    };
    while let Ok(buf) = r.fill_buf().await {
        if buf.is_empty() {
            if !line.is_empty() {
                let l = emit(std::mem::take(&mut line), false);
                if let Some(tx) = &out {
                    let _ = tx.send(l).await;
                }
            }
            break;
        }
        let room = MAX_LINE - line.len();
        let (take, complete) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) if i <= room => (i + 1, true),
            _ => {
                let n = buf.len().min(room);
                (n, line.len() + n >= MAX_LINE)
            }
        };
        let chunk = &buf[..take];
        let ended = chunk.ends_with(b"\n");
        line.extend_from_slice(chunk.strip_suffix(b"\n").unwrap_or(chunk));
        r.consume(take);
        if complete {
            let l = emit(std::mem::take(&mut line), ended);
            if let Some(tx) = &out {
                let _ = tx.send(l).await;
            }
        }
    }
}

impl Executor {
    /// An executor with `config`.
    pub fn new(config: ExecutorConfig) -> Self {
        Executor { config }
    }

    /// The configuration.
    pub fn config(&self) -> &ExecutorConfig {
        &self.config
    }

    /// Run one step to its end.
    ///
    /// Output lines are sent to `output` as they come (the step is slowed
    /// down, not lines dropped, if the receiver is slow; a dropped receiver
    /// is ignored). A step that ran returns `Ok` whatever its exit status;
    /// setup failures, timeout and cancellation are errors. In every case the
    /// step's cgroup is killed and removed and its state directory deleted
    /// before this returns; all its mounts lived in its own mount namespace.
    ///
    /// The init is started with PDEATHSIG=SIGKILL, which the kernel ties to
    /// the *thread* that spawned it: call this from a tokio worker thread
    /// (any `async` context of a runtime that outlives the step), not from a
    /// short-lived thread.
    ///
    /// The init runs in a process group of its own: a Ctrl-C at the
    /// terminal reaches the caller, never the step directly; what the step
    /// gets is the caller's choice (cancellation, or
    /// [`Executor::run_with_signals`]).
    pub async fn run(
        &self,
        req: ExecRequest,
        output: Option<mpsc::Sender<OutputLine>>,
        cancel: CancellationToken,
    ) -> Result<ExecOutcome, Error> {
        self.run_inner(req, output, cancel, None).await
    }

    /// [`Executor::run`], passing on to the step each signal number that
    /// comes through `signals` while it runs (what `docker run` does with
    /// the signals it receives): one of [`crate::FORWARDED_SIGNALS`] goes
    /// to the sandbox's init, which forwards it to the step; other numbers
    /// are ignored. The step decides what a signal means: its exit status
    /// is returned as usual (`ExitStatus::Signal` if a signal killed it),
    /// and a step that ignores the signal keeps running. Only
    /// cancellation, the timeout or the step's end stop the wait.
    ///
    /// A signal sent before the sandbox is ready is held until the step
    /// has started (it then takes its default action, as the step has had
    /// no chance to install a handler).
    pub async fn run_with_signals(
        &self,
        req: ExecRequest,
        output: Option<mpsc::Sender<OutputLine>>,
        cancel: CancellationToken,
        signals: mpsc::Receiver<i32>,
    ) -> Result<ExecOutcome, Error> {
        self.run_inner(req, output, cancel, Some(signals)).await
    }

    async fn run_inner(
        &self,
        req: ExecRequest,
        output: Option<mpsc::Sender<OutputLine>>,
        cancel: CancellationToken,
        signals: Option<mpsc::Receiver<i32>>,
    ) -> Result<ExecOutcome, Error> {
        let step = req.name.clone();
        let req_err = |source| Error::Request {
            step: step.clone(),
            source,
        };
        let io_err = |what: String| {
            let step = step.clone();
            move |source| Error::Io { step, what, source }
        };
        let mut cfg = init_config(&req).map_err(req_err)?;
        let mut mounts = spec_mounts(&req.spec).map_err(req_err)?;

        // State directory with the provided files and the rootfs mount point.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.config.state_dir)
            .map_err(io_err(format!(
                "creating {}",
                self.config.state_dir.display()
            )))?;
        // Root writes each step's files in there: a directory someone else
        // owns or can write to (made first in a shared /tmp) could have
        // them renamed and replaced by symlinks to anywhere.
        let st = fs::symlink_metadata(&self.config.state_dir).map_err(io_err(format!(
            "checking {}",
            self.config.state_dir.display()
        )))?;
        // SAFETY: geteuid has no failure mode.
        let me = unsafe { libc::geteuid() };
        if !st.is_dir() || st.uid() != me || st.mode() & 0o022 != 0 {
            return Err(io_err(format!(
                "using {} (a directory of uid {me}, writable by no one else)",
                self.config.state_dir.display()
            ))(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "it belongs to uid {} with mode {:o}: refused",
                    st.uid(),
                    st.mode() & 0o7777
                ),
            )));
        }
        // State of executors that were SIGKILLed (their mounts died with
        // their namespaces; only files are left).
        for e in fs::read_dir(&self.config.state_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            if crate::cgroup::stale_owner(&e.file_name().to_string_lossy()) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        let id = step_id();
        let dir = self.config.state_dir.join(&id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(format!("creating {}", dir.display())))?;
        let mut state = StateDir {
            path: dir.clone(),
            bind_stubs: Vec::new(),
        };
        let rootfs_dir = dir.join("rootfs");
        fs::create_dir(&rootfs_dir)
            .map_err(io_err(format!("creating {}", rootfs_dir.display())))?;
        cfg.rootfs_dir = rootfs_dir;
        cfg.shm_size = self.config.shm_size;
        let hostname = cfg.hostname.clone().unwrap_or_else(|| "kiln".into());
        let resolv = fs::read(&self.config.resolv_conf).unwrap_or_default();
        let provided = [
            ("resolv.conf", resolv),
            (
                "hosts",
                hosts_file(&hostname, &self.config.extra_hosts).into_bytes(),
            ),
            ("hostname", format!("{hostname}\n").into_bytes()),
        ];
        for (name, content) in &provided {
            let p = dir.join(name);
            fs::write(&p, content).map_err(io_err(format!("writing {}", p.display())))?;
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o644));
            mounts.push(MountEntry {
                destination: PathBuf::from("/etc").join(name),
                typ: "bind".into(),
                source: p,
                options: vec!["bind".into(), "nosuid".into(), "nodev".into()],
            });
        }
        // Mount points the sandbox needs.
        let mut stubs: Vec<(PathBuf, bool)> = vec![
            (PathBuf::from("/proc"), true),
            (PathBuf::from("/sys"), true),
            (PathBuf::from("/dev"), true),
        ];
        for m in &mounts {
            let is_dir = !(m.options.iter().any(|o| o == "bind" || o == "rbind")
                && fs::metadata(&m.source)
                    .map(|s| !s.is_dir())
                    .unwrap_or(false));
            stubs.push((m.destination.clone(), is_dir));
        }
        for f in &cfg.inline_files {
            stubs.push((f.destination.clone(), false));
        }
        let top = req.rootfs.len() - 1;
        match cfg.rootfs[top].kind {
            RootfsKind::Overlay => {
                let lower = cfg.rootfs[top]
                    .option("lowerdir")
                    .ok_or_else(|| req_err(RequestError::NoLowerdir))?
                    .to_string();
                let lowers: Vec<PathBuf> = lower.split(':').map(PathBuf::from).collect();
                let stub = dir.join("stub");
                build_stub_layer(&stub, &lowers, &stubs)
                    .map_err(io_err("building the mount-point layer".into()))?;
                let m: &mut RootfsMount = &mut cfg.rootfs[top];
                for o in m.options.iter_mut() {
                    if o.starts_with("lowerdir=") {
                        *o = format!("lowerdir={}:{lower}", stub.display());
                    }
                }
            }
            RootfsKind::Bind => {
                let src = cfg.rootfs[top].source.clone();
                state.bind_stubs = create_bind_stubs(&src, &stubs).map_err(io_err(format!(
                    "creating mount points in {}",
                    src.display()
                )))?;
            }
        }
        cfg.mounts = mounts;

        let limits = Limits::from_spec(&req.spec);
        let parent = self.config.cgroup_parent.clone();
        let cg_id = id.clone();
        let cgroup =
            tokio::task::spawn_blocking(move || StepCgroup::create(&parent, &cg_id, &limits))
                .await
                .map_err(|e| io_err("creating cgroup".into())(std::io::Error::other(e)))?
                .map_err(|source| Error::Cgroup {
                    step: step.clone(),
                    source,
                })?;
        let cgroup = Arc::new(cgroup);
        let result = self
            .run_in_cgroup(
                &step,
                cfg,
                output,
                Control {
                    timeout: req.timeout,
                    cancel,
                    signals,
                    stdin: req.tty.clone().or_else(|| req.stdin.clone()),
                },
                cgroup.clone(),
            )
            .await;
        let cg = cgroup.clone();
        let removed = tokio::task::spawn_blocking(move || cg.remove()).await;
        drop(state);
        let outcome = result?;
        match removed {
            Ok(Err(source)) => Err(Error::Cgroup { step, source }),
            _ => Ok(outcome),
        }
    }

    async fn run_in_cgroup(
        &self,
        step: &str,
        cfg: InitConfig,
        output: Option<mpsc::Sender<OutputLine>>,
        control: Control,
        cgroup: Arc<StepCgroup>,
    ) -> Result<ExecOutcome, Error> {
        let Control {
            timeout,
            cancel,
            mut signals,
            stdin,
        } = control;
        let start = Instant::now();
        let proto = |source| Error::Protocol {
            step: step.to_string(),
            source,
        };
        let (parent_end, child_end) = socketpair().map_err(proto)?;
        // Never the host's file itself (see `exe`).
        let init = crate::exe::init_exe(&self.config.init_path).map_err(|source| Error::Io {
            step: step.to_string(),
            what: format!(
                "making a read-only copy of the sandbox init {}",
                self.config.init_path.display()
            ),
            source,
        })?;
        let mut cmd = tokio::process::Command::new(&init);
        cmd.arg(INIT_ARG)
            .env_clear()
            .env(PARENT_PID_ENV, std::process::id().to_string())
            // Rootless: the init must know (its maps may not show it).
            .envs(
                std::env::var_os(kiln_fs::idmap::ENTERED_ENV)
                    .map(|v| (kiln_fs::idmap::ENTERED_ENV, v)),
            )
            // The message socket goes in as the init's stdin (INIT_FD).
            .stdin(Stdio::from(child_end))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Signals from the terminal are for kiln, which decides.
            .process_group(0);
        if let Some(fd) = &stdin {
            use std::os::fd::AsRawFd;
            let raw = fd.as_raw_fd();
            cmd.env(crate::init::STDIN_FD_ENV, "3");
            // The step's stdin goes in as fd 3 (dup2 clears close-on-exec).
            // SAFETY: dup2 is async-signal-safe; `raw` stays open (the Arc
            // lives in this frame) until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    // dup2 onto itself keeps close-on-exec: clear it then.
                    let r = if raw == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(raw, 3)
                    };
                    if r < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if signals.is_some() {
            // Keep the forwarded signals blocked across exec until the init
            // has its handlers: one sent in that window must not kill it.
            // SAFETY: pthread_sigmask is async-signal-safe and touches only
            // the new process's mask; nothing is allocated.
            unsafe {
                cmd.pre_exec(|| {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    for s in crate::init::FORWARDED_SIGNALS {
                        libc::sigaddset(&mut set, *s);
                    }
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                    Ok(())
                });
            }
        }
        // Started from inside the step's v1 cgroups (see `cgroup`): the
        // init begins there; the unified hierarchy gets its pid below.
        let inside = cgroup.enter_thread();
        let spawned = cmd.spawn();
        let entered = inside.leave();
        let mut child = spawned.map_err(|source| Error::Io {
            step: step.to_string(),
            what: format!("starting sandbox init {}", self.config.init_path.display()),
            source,
        })?;
        // Our copy of the init's end closes with the command.
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        let kill_tree = |cg: Arc<StepCgroup>| async move {
            let _ = tokio::task::spawn_blocking(move || cg.kill_all()).await;
        };
        if let Err(source) = entered.and_then(|entered| cgroup.add_except(pid, &entered)) {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(Error::Cgroup {
                step: step.to_string(),
                source,
            });
        }
        if let Err(e) = send_msg(parent_end.as_fd(), &cfg) {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(proto(e));
        }

        let tail = Arc::new(Mutex::new(Tail {
            cap: self.config.tail_lines,
            lines: VecDeque::new(),
        }));
        let mut pumps = Vec::new();
        if let Some(o) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(
                o,
                Stream::Stdout,
                tail.clone(),
                output.clone(),
            )));
        }
        if let Some(e) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(
                e,
                Stream::Stderr,
                tail.clone(),
                output.clone(),
            )));
        }
        drop(output);
        let messages = tokio::task::spawn_blocking(move || read_messages(parent_end));

        enum End {
            Exited(std::io::Result<std::process::ExitStatus>),
            TimedOut(Duration),
            Cancelled,
        }
        let sleep = async {
            match timeout {
                Some(t) => {
                    tokio::time::sleep(t).await;
                    t
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(sleep);
        let end = loop {
            let signal = async {
                match signals.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                st = child.wait() => break End::Exited(st),
                t = &mut sleep => break End::TimedOut(t),
                _ = cancel.cancelled() => break End::Cancelled,
                sig = signal => match sig {
                    Some(sig) => forward_signal(&child, sig),
                    None => signals = None,
                },
            }
        };
        // Whatever happened, nothing of the step may survive it.
        kill_tree(cgroup.clone()).await;
        let init_status = match &end {
            End::Exited(Ok(s)) => Some(*s),
            _ => {
                let _ = child.start_kill();
                child.wait().await.ok()
            }
        };
        let drain = Duration::from_secs(5);
        for p in pumps {
            let abort = p.abort_handle();
            if tokio::time::timeout(drain, p).await.is_err() {
                abort.abort();
            }
        }
        let msgs = match tokio::time::timeout(drain, messages).await {
            Ok(Ok(Ok(m))) => m,
            Ok(Ok(Err(e))) => return Err(proto(e)),
            _ => Vec::new(),
        };
        let tail: Vec<OutputLine> = tail
            .lock()
            .map(|t| t.lines.iter().cloned().collect())
            .unwrap_or_default();
        for m in &msgs {
            if let ChildMessage::Error { stage, message } = m {
                return Err(Error::Setup {
                    step: step.to_string(),
                    stage: stage.clone(),
                    message: message.clone(),
                });
            }
        }
        match end {
            End::TimedOut(after) => {
                return Err(Error::TimedOut {
                    step: step.to_string(),
                    after,
                    tail,
                })
            }
            End::Cancelled => {
                return Err(Error::Cancelled {
                    step: step.to_string(),
                })
            }
            End::Exited(_) => {}
        }
        let status = msgs.iter().find_map(|m| match m {
            ChildMessage::Exited(s) => Some(*s),
            _ => None,
        });
        match status {
            Some(status) => Ok(ExecOutcome {
                status,
                tail,
                duration: start.elapsed(),
            }),
            None => Err(Error::InitDied {
                step: step.to_string(),
                status: init_status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown".into()),
            }),
        }
    }
}

/// What may end or reach a running step from outside.
struct Control {
    /// Kill the step after this long.
    timeout: Option<Duration>,
    /// Kill the step when cancelled.
    cancel: CancellationToken,
    /// Signals to forward to the step.
    signals: Option<mpsc::Receiver<i32>>,
    /// The step's stdin (a terminal's slave with `ExecRequest::tty`).
    stdin: Option<Arc<OwnedFd>>,
}

/// Sends `sig` to the init (which forwards it to the step) if it is one
/// the init forwards and the init has not been reaped (its pid is still
/// its own).
fn forward_signal(child: &tokio::process::Child, sig: i32) {
    if !crate::init::FORWARDED_SIGNALS.contains(&sig) {
        return;
    }
    if let (Some(pid), Ok(sig)) = (child.id(), nix::sys::signal::Signal::try_from(sig)) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

fn read_messages(fd: OwnedFd) -> Result<Vec<ChildMessage>, crate::protocol::ProtocolError> {
    let mut v = Vec::new();
    while let Some(m) = recv_msg::<ChildMessage>(fd.as_fd(), false)? {
        v.push(m);
    }
    Ok(v)
}

#[cfg(test)]
mod mount_point_tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    #[test]
    fn make_mount_point_stays_inside_and_follows_links_inside() {
        let outside = tempfile::tempdir().unwrap();
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        // An absolute link to a host directory, and a relative one that
        // climbs: both resolve inside the root.
        symlink(outside.path(), root.join("abs")).unwrap();
        symlink("../../../..", root.join("up")).unwrap();
        let r = Root::open(&root).unwrap();
        let mut names = Vec::new();
        let mut rec = |m: MadeStub<'_>| {
            names.push((m.rel.to_path_buf(), m.is_dir));
            Ok(())
        };
        assert!(make_mount_point(&r, Path::new("/up/x/y"), false, &mut rec).unwrap());
        assert!(root.join("x/y").is_file(), "created at the root");
        assert!(make_mount_point(&r, Path::new("/../../z"), true, &mut rec).unwrap());
        assert!(root.join("z").is_dir());
        // The absolute link points at a path that does not exist in the
        // root: dangling there, nothing is created anywhere.
        assert!(!make_mount_point(&r, Path::new("/abs/f"), false, &mut rec).unwrap());
        assert!(!make_mount_point(&r, Path::new("/abs/d/e"), true, &mut rec).unwrap());
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        // What exists is used as it is.
        assert!(make_mount_point(&r, Path::new("/x/y"), false, &mut rec).unwrap());
        assert_eq!(
            names,
            [
                (PathBuf::from("x"), true),
                (PathBuf::from("x/y"), false),
                (PathBuf::from("z"), true)
            ]
        );
    }

    #[test]
    fn stub_layer_copies_what_is_below_and_bind_stubs_are_removed() {
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("lower");
        fs::create_dir_all(lower.join("etc")).unwrap();
        fs::set_permissions(lower.join("etc"), fs::Permissions::from_mode(0o710)).unwrap();
        std::os::unix::fs::chown(lower.join("etc"), Some(7), Some(8)).unwrap();
        fs::write(lower.join("etc/hosts"), "x").unwrap();
        fs::set_permissions(lower.join("etc/hosts"), fs::Permissions::from_mode(0o600)).unwrap();
        let stub = t.path().join("stub");
        let entries = vec![
            (PathBuf::from("/etc/hosts"), false),
            (PathBuf::from("/proc"), true),
            (PathBuf::from("/../../etc/../run/x"), true),
        ];
        build_stub_layer(&stub, std::slice::from_ref(&lower), &entries).unwrap();
        let m = fs::metadata(stub.join("etc")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o710, 7, 8));
        let m = fs::metadata(stub.join("etc/hosts")).unwrap();
        assert_eq!(
            (m.mode() & 0o7777, m.len()),
            (0o600, 0),
            "empty, with the lower's mode"
        );
        assert_eq!(
            fs::metadata(stub.join("proc")).unwrap().mode() & 0o7777,
            0o755
        );
        assert!(stub.join("run/x").is_dir());
        assert!(!t.path().join("run").exists());

        // Bind stubs: made inside, removed by descriptor when empty.
        let rootfs = t.path().join("rootfs");
        fs::create_dir_all(rootfs.join("keep")).unwrap();
        let stubs = create_bind_stubs(
            &rootfs,
            &[
                (PathBuf::from("/keep/m"), true),
                (PathBuf::from("/new/f"), false),
            ],
        )
        .unwrap();
        assert_eq!(stubs.len(), 3);
        assert!(rootfs.join("keep/m").is_dir() && rootfs.join("new/f").is_file());
        let state = t.path().join("state");
        fs::create_dir(&state).unwrap();
        drop(StateDir {
            path: state,
            bind_stubs: stubs,
        });
        assert!(rootfs.join("keep").is_dir(), "what was there stays");
        assert!(!rootfs.join("keep/m").exists() && !rootfs.join("new").exists());
    }
}
