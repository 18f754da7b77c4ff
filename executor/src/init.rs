//! The sandbox init: the re-executed, single-threaded side of the executor.
//!
//! Three processes, like `runc init` plus a tini-style PID 1:
//!
//! 1. **supervisor** (host pid namespace): the re-executed binary. Sets
//!    PDEATHSIG, reads the [`InitConfig`], `unshare(CLONE_NEWPID)`, forks
//!    PID 1, forwards signals to it and exits with its status.
//! 2. **PID 1**: unshares mount/uts/ipc/cgroup(/net) namespaces, makes `/`
//!    rprivate, mounts the rootfs and /proc, /dev, /sys and the provided
//!    files, pivot_roots, masks paths, then forks the step, forwards signals
//!    to it, reaps every zombie and, when the step ends, reports its status,
//!    kills what is left in the namespace and exits.
//! 3. **the step**: resolves the user, creates the working directory, sets
//!    rlimits, groups, uid/gid, capabilities, looks the executable up and
//!    execs it.
//!
//! Failures before exec are sent to the parent as [`ChildMessage::Error`]
//! with the stage that failed.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{
    kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal,
};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Gid, Pid, Uid};

use crate::caps;
use crate::protocol::{recv_msg, send_msg, ChildMessage, InitConfig, UserSpec, INIT_FD};
use crate::request::ExitStatus;
use crate::rootfs;
use crate::user::resolve_user;

/// The hidden first argument that selects the init.
pub const INIT_ARG: &str = "__init";
/// Environment variable carrying the executor's pid to the init.
pub(crate) const PARENT_PID_ENV: &str = "_KILN_EXECUTOR_PID";
/// Set when the executor hands the init the step's stdin as fd 3.
pub(crate) const STDIN_FD_ENV: &str = "_KILN_EXECUTOR_STDIN";
/// Docker's default PATH.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The signals the sandbox init forwards to the step, as raw numbers: a
/// signal sent to the init (its supervisor, the process
/// [`crate::Executor::run_with_signals`] signals) goes to PID 1 of the
/// sandbox, which passes it to the step. The step is PID 1's child, not
/// PID 1 itself, so a signal it has no handler for takes its default
/// action (a `sleep` dies of SIGTERM), as under `docker run --init`.
/// Others are not forwarded: SIGCHLD, SIGPIPE and SIGURG concern the init
/// itself, SIGKILL and SIGSTOP cannot be caught, the job-control stops
/// (SIGTSTP, SIGTTIN, SIGTTOU) stay with kiln, and fault signals are not
/// sent by users.
pub const FORWARDED_SIGNALS: &[i32] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGALRM,
];

/// Run the sandbox init if this process was started as one.
///
/// Call this first thing in `main()` of every binary that may serve as the
/// executor's init (the `kiln` CLI, test binaries), before any thread or
/// async runtime starts. If `argv[1]` is `__init` it runs the init and never
/// returns; otherwise it returns at once.
///
/// ```no_run
/// kiln_executor::maybe_run_init(); // first line of main()
/// // ... then start tokio, parse arguments, etc.
/// ```
pub fn maybe_run_init() {
    if std::env::args_os().nth(1).as_deref() != Some(OsStr::new(INIT_ARG)) {
        return;
    }
    let code = supervisor();
    std::process::exit(code);
}

fn report(sock: BorrowedFd<'_>, stage: &str, message: String) {
    let _ = send_msg(
        sock,
        &ChildMessage::Error {
            stage: stage.to_string(),
            message,
        },
    );
}

extern "C" fn noop_handler(_: libc::c_int) {}

/// Install no-op handlers (so signals from outside reach a namespace's
/// PID 1) and block the forwarded signals and SIGCHLD for `sigwait`.
fn block_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    let act = SigAction::new(
        SigHandler::Handler(noop_handler),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in FORWARDED_SIGNALS
        .iter()
        .filter_map(|n| Signal::try_from(*n).ok())
    {
        set.add(s);
        // SAFETY: the handler does nothing.
        let _ = unsafe { sigaction(s, &act) };
    }
    let _ = set.thread_block();
    set
}

/// Wait for `child`, forwarding signals to it; with `reap_all` reap every
/// zombie on the way (PID 1 duty).
fn supervise(child: Pid, set: &SigSet, reap_all: bool) -> ExitStatus {
    loop {
        // Check first: SIGCHLD may have arrived before we waited.
        let target = if reap_all { Pid::from_raw(-1) } else { child };
        loop {
            match waitpid(target, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => return ExitStatus::Code(code),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                    return ExitStatus::Signal(sig as i32)
                }
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(nix::Error::EINTR) => continue,
                Err(_) => return ExitStatus::Code(255),
            }
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(child, sig);
            }
        }
    }
}

fn exit_code(s: ExitStatus) -> i32 {
    match s {
        ExitStatus::Code(c) => c,
        ExitStatus::Signal(s) => 128 + s,
    }
}

/// Close (or, with `cloexec`, mark close-on-exec) every descriptor from
/// `first` up: what kiln's caller left open (a directory on `exec 7</`, a
/// lock file, a CI log pipe) must not reach the sandbox (runc's fix for
/// CVE-2024-21626). `close_range(2)`, else a walk of /proc/self/fd.
pub(crate) fn close_fds_from(first: i32, cloexec: bool) {
    let flags = if cloexec {
        libc::CLOSE_RANGE_CLOEXEC as libc::c_long
    } else {
        0
    };
    // SAFETY: close_range only affects descriptor numbers; no memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            flags,
        )
    };
    if r == 0 {
        return;
    }
    // Older kernels: list first (the listing holds a descriptor of its
    // own), then act.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .filter(|fd| *fd >= first)
        .collect();
    for fd in fds {
        // SAFETY: as above; a number that is no longer open fails harmlessly.
        unsafe {
            if cloexec {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            } else {
                libc::close(fd);
            }
        }
    }
}

/// Stage 1: runs in the host pid namespace.
fn supervisor() -> i32 {
    // SAFETY: fstat on an fd number; it is only adopted if it is a socket.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let is_sock = unsafe { libc::fstat(INIT_FD, &mut st) } == 0
        && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK;
    if !is_sock {
        eprintln!("kiln init: not started by kiln-executor (no message socket on fd {INIT_FD})");
        return 2;
    }
    // Catch the forwarded signals before anything else: one that arrives
    // while the sandbox is being set up waits (pending) for the step.
    let set = block_signals();
    // Only stdin (the socket), stdout and stderr were meant for us, and
    // fd 3 when the executor says it is the step's stdin.
    let given_stdin = std::env::var_os(STDIN_FD_ENV).is_some();
    close_fds_from(if given_stdin { 4 } else { 3 }, false);
    // Move the socket off stdin to a close-on-exec descriptor, and give
    // stdin /dev/null (what the step reads).
    // SAFETY: fcntl/open/dup2/close on descriptor numbers we own.
    let moved = unsafe {
        libc::fcntl(
            INIT_FD,
            libc::F_DUPFD_CLOEXEC,
            if given_stdin { 4 } else { 3 },
        )
    };
    if moved < 0 {
        eprintln!(
            "kiln init: moving the message socket: {}",
            std::io::Error::last_os_error()
        );
        return 2;
    }
    let null = if given_stdin {
        3
    } else {
        unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) }
    };
    if null < 0 || unsafe { libc::dup2(null, INIT_FD) } < 0 {
        eprintln!(
            "kiln init: the step's stdin: {}",
            std::io::Error::last_os_error()
        );
        return 2;
    }
    unsafe { libc::close(null) };
    // SAFETY: `moved` is the socket the executor handed us; we own it now.
    let sock = unsafe { OwnedFd::from_raw_fd(moved) };
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if let Some(ppid) = std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        if nix::unistd::getppid().as_raw() != ppid {
            return 1; // the executor died before PDEATHSIG was set
        }
    }
    let cfg: InitConfig = match recv_msg(sock.as_fd(), false) {
        Ok(Some(c)) => c,
        Ok(None) => return 1,
        Err(e) => {
            report(sock.as_fd(), "init", e.to_string());
            return 1;
        }
    };
    if let Err(e) = unshare(CloneFlags::CLONE_NEWPID) {
        report(
            sock.as_fd(),
            "namespaces",
            format!("unshare pid namespace: {e}"),
        );
        return 1;
    }
    // SAFETY: this process is single-threaded (freshly exec'd).
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let code = pid1(&cfg, sock.as_fd(), &set);
            // SAFETY: leave without running atexit handlers of the parent image.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => exit_code(supervise(child, &set, false)),
        Err(e) => {
            report(sock.as_fd(), "namespaces", format!("fork pid 1: {e}"));
            1
        }
    }
}

/// Stage 2: PID 1 of the new pid namespace.
fn pid1(cfg: &InitConfig, sock: BorrowedFd<'_>, set: &SigSet) -> i32 {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if let Err((stage, msg)) = prepare(cfg) {
        report(sock, stage, msg);
        return 1;
    }
    let _ = send_msg(sock, &ChildMessage::Ready);
    // SAFETY: single-threaded.
    let step = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let (stage, msg) = exec_step(cfg);
            report(sock, stage, msg);
            // SAFETY: see above.
            unsafe { libc::_exit(127) }
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            report(sock, "exec", format!("fork: {e}"));
            return 1;
        }
    };
    // PID 1 keeps its capabilities and has no seccomp filter: not
    // dumpable, so the step cannot ptrace it nor open its /proc files
    // (`/proc/1/exe`, `/proc/1/mem`) whatever it holds (runc's init is
    // not dumpable either).
    let _ = nix::sys::prctl::set_dumpable(false);
    let status = supervise(step, set, true);
    let _ = send_msg(sock, &ChildMessage::Exited(status));
    // The step is over: nothing it left behind may outlive it.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while let Ok(s) = waitpid(Pid::from_raw(-1), None) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
    exit_code(status)
}

type StageResult = Result<(), (&'static str, String)>;

fn stage<T, E: std::fmt::Display>(
    r: Result<T, E>,
    stage: &'static str,
    what: impl FnOnce() -> String,
) -> Result<T, (&'static str, String)> {
    r.map_err(|e| (stage, format!("{}: {e}", what())))
}

/// Namespaces and the filesystem, up to and including pivot_root.
fn prepare(cfg: &InitConfig) -> StageResult {
    let mut flags = CloneFlags::CLONE_NEWNS;
    if cfg.new_uts {
        flags |= CloneFlags::CLONE_NEWUTS;
    }
    if cfg.new_ipc {
        flags |= CloneFlags::CLONE_NEWIPC;
    }
    if cfg.new_net {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if cfg.new_cgroup {
        flags |= CloneFlags::CLONE_NEWCGROUP;
    }
    stage(unshare(flags), "namespaces", || "unshare namespaces".into())?;
    if cfg.new_net {
        stage(crate::net::loopback_up(), "network", || {
            "bringing up lo".into()
        })?;
    }
    if let (Some(h), true) = (&cfg.hostname, cfg.new_uts) {
        stage(nix::unistd::sethostname(h), "hostname", || {
            format!("setting hostname {h:?}")
        })?;
    }
    stage(
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
        "mount",
        || "making / rprivate".into(),
    )?;
    stage(
        rootfs::mount_rootfs(&cfg.rootfs_dir, &cfg.rootfs),
        "rootfs",
        || "rootfs".into(),
    )?;
    stage(rootfs::setup_mounts(cfg), "mount", || "mounts".into())?;
    stage(rootfs::pivot(&cfg.rootfs_dir), "mount", || {
        "pivot_root".into()
    })?;
    stage(rootfs::mask_paths(&cfg.masked_paths), "mount", || {
        "masked paths".into()
    })?;
    stage(rootfs::readonly_paths(&cfg.readonly_paths), "mount", || {
        "read-only paths".into()
    })?;
    if cfg.readonly_rootfs {
        stage(rootfs::readonly_root(), "mount", || {
            "read-only rootfs".into()
        })?;
    }
    Ok(())
}

fn errno_text(e: nix::Error) -> String {
    let d = e.desc();
    let mut c = d.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `mkdir -p` as root inside the sandbox's root (after pivot_root),
/// chowning the components it creates (best effort), through kiln-fs:
/// symlinks on the way are followed inside the root and a dangling one is
/// an error (as before: nothing is created at its target), each directory
/// is made (0755) and chowned by descriptor. Runs in the step process, forked from the
/// single-threaded init, so allocating is fine.
fn mkdir_all_chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let root = kiln_fs::Root::open("/").map_err(|e| e.to_string())?;
    root.mkdir_all_ext(
        path,
        kiln_fs::Follow::InRoot,
        kiln_fs::Dangling::Fail,
        &mut |_| kiln_fs::DirSpec::default(),
        // Best effort, as before (an unmapped id in a user namespace).
        &mut |parent, name| {
            let _ = parent.chown(name, uid, gid);
            Ok(())
        },
    )
    .map(drop)
    .map_err(|e| {
        let errno = nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        format!("mkdir {}: {}", e.path().display(), errno_text(errno))
    })
}

/// Go's `exec.LookPath`, with Go's messages.
fn look_path(name: &str, path_env: &str) -> Result<PathBuf, String> {
    let check = |p: &Path| -> Result<(), String> {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => Err("is a directory".into()),
            Ok(m) if m.permissions().mode() & 0o111 != 0 => Ok(()),
            Ok(_) => Err("permission denied".into()),
            Err(e) => Err(format!(
                "stat {}: {}",
                p.display(),
                errno_text(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            )),
        }
    };
    if name.contains('/') {
        return check(Path::new(name))
            .map(|()| PathBuf::from(name))
            .map_err(|e| format!("exec: {name:?}: {e}"));
    }
    for dir in path_env.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let p = Path::new(dir).join(name);
        if check(&p).is_ok() {
            return Ok(p);
        }
    }
    Err(format!(
        "exec: {name:?}: executable file not found in $PATH"
    ))
}

/// Stage 3: become the step. Returns only on failure.
fn exec_step(cfg: &InitConfig) -> (&'static str, String) {
    match exec_step_inner(cfg) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn exec_step_inner(cfg: &InitConfig) -> Result<Never, (&'static str, String)> {
    if !cfg.tty {
        // A session of its own, as runc gives every container process:
        // never kiln's terminal as its controlling terminal (`/dev/tty`
        // would reach it: TIOCSTI could type into the user's shell).
        // SAFETY: plain syscall; the step is not a group leader (forked).
        if unsafe { libc::setsid() } < 0 {
            return Err((
                "session",
                format!("setsid: {}", std::io::Error::last_os_error()),
            ));
        }
    }
    if cfg.tty {
        // A session of its own with the terminal (stdin) as controlling
        // terminal, and the terminal as stdout and stderr too.
        // SAFETY: plain syscalls on our own descriptors.
        let ok = unsafe {
            libc::setsid() >= 0
                && libc::ioctl(0, libc::TIOCSCTTY, 0) == 0
                && libc::dup2(0, 1) >= 0
                && libc::dup2(0, 2) >= 0
        };
        if !ok {
            return Err((
                "tty",
                format!("terminal: {}", std::io::Error::last_os_error()),
            ));
        }
    }
    let (uid, gid, groups, home) = match &cfg.user {
        UserSpec::Docker(s) => {
            let u = stage(resolve_user(Path::new("/"), s), "user", || {
                format!("user {s:?}")
            })?;
            (u.uid, u.gid, u.additional_gids, u.home)
        }
        UserSpec::Ids {
            uid,
            gid,
            additional_gids,
        } => {
            let home = resolve_user(Path::new("/"), &uid.to_string())
                .map(|u| u.home)
                .unwrap_or_else(|_| "/".into());
            (*uid, *gid, additional_gids.clone(), home)
        }
    };
    let mut env = cfg.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={home}"));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    let path_env = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_string();

    let cwd = Path::new(&cfg.cwd);
    mkdir_all_chown(cwd, uid, gid).map_err(|e| {
        (
            "cwd",
            format!("creating working directory {}: {e}", cfg.cwd),
        )
    })?;

    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(cfg.umask));
    if let Some(adj) = cfg.oom_score_adj {
        stage(
            std::fs::write("/proc/self/oom_score_adj", adj.to_string()),
            "oom_score_adj",
            || "setting oom_score_adj".into(),
        )?;
    }
    for &(res, soft, hard) in &cfg.rlimits {
        let rl = libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: valid rlimit struct.
        if unsafe { libc::setrlimit(res as _, &rl) } != 0 {
            let e = nix::Error::last();
            return Err((
                "rlimits",
                format!(
                    "setting rlimit {res} to soft={soft} hard={hard}: {}",
                    errno_text(e)
                ),
            ));
        }
    }

    let mut c = cfg.caps;
    if uid != 0 {
        // Docker: a non-root user starts with no effective capabilities;
        // only what is ambient survives.
        c.effective = c.ambient;
        c.permitted = c.ambient;
    }
    // A fresh session keyring, then seccomp while CAP_SYS_ADMIN is held
    // (runc's order; with no_new_privs it waits until just before exec).
    stage(crate::seccomp::join_session_keyring(), "keyring", || {
        "joining a new session keyring".into()
    })?;
    if !cfg.no_new_privs {
        stage(crate::seccomp::install(&cfg.seccomp), "seccomp", || {
            "installing the seccomp filter".into()
        })?;
    }
    stage(caps::drop_bounding(c.bounding), "capabilities", || {
        "dropping bounding capabilities".into()
    })?;
    stage(nix::sys::prctl::set_keepcaps(true), "user", || {
        "keepcaps".into()
    })?;
    let maps = kiln_fs::idmap::IdMaps::current();
    use kiln_fs::idmap::IdKind;
    if let Some(message) = std::iter::once(uid)
        .filter(|_| maps.in_userns)
        .filter(|u| !maps.maps_uid(*u))
        .map(|u| maps.unmapped_message(IdKind::Uid, u))
        .chain(
            std::iter::once(&gid)
                .chain(groups.iter())
                .filter(|g| !maps.maps_gid(**g))
                .map(|g| maps.unmapped_message(IdKind::Gid, *g)),
        )
        .next()
    {
        return Err(("user", message));
    }
    let gids: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    // Where setgroups is denied (a one-id rootless map) only the group
    // list that is already ours can be had: none beyond the primary group.
    let denied = std::fs::read_to_string("/proc/self/setgroups").is_ok_and(|s| s.trim() == "deny");
    if !(denied && groups.iter().all(|g| *g == gid)) {
        stage(nix::unistd::setgroups(&gids), "user", || {
            format!("setgroups {groups:?}")
        })?;
    }
    let g = Gid::from_raw(gid);
    stage(nix::unistd::setresgid(g, g, g), "user", || {
        format!("setgid {gid}")
    })?;
    let u = Uid::from_raw(uid);
    stage(nix::unistd::setresuid(u, u, u), "user", || {
        format!("setuid {uid}")
    })?;
    stage(nix::sys::prctl::set_keepcaps(false), "user", || {
        "keepcaps".into()
    })?;
    stage(
        caps::capset(c.effective, c.permitted, c.inheritable | c.ambient),
        "capabilities",
        || "setting capabilities".into(),
    )?;
    stage(caps::set_ambient(c.ambient), "capabilities", || {
        "setting ambient capabilities".into()
    })?;
    if cfg.no_new_privs {
        stage(nix::sys::prctl::set_no_new_privs(), "capabilities", || {
            "no_new_privs".into()
        })?;
    }
    nix::unistd::chdir(cwd).map_err(|e| {
        (
            "cwd",
            format!("chdir to working directory {}: {}", cfg.cwd, errno_text(e)),
        )
    })?;

    let arg0 = cfg.args.first().cloned().unwrap_or_default();
    let exe = look_path(&arg0, &path_env).map_err(|e| ("exec", e))?;
    let to_c =
        |s: &str| CString::new(s).map_err(|_| ("exec", format!("argument {s:?} contains NUL")));
    let argv = cfg
        .args
        .iter()
        .map(|a| to_c(a))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env.iter().map(|a| to_c(a)).collect::<Result<Vec<_>, _>>()?;
    let exe_c = CString::new(exe.as_os_str().as_encoded_bytes())
        .map_err(|_| ("exec", "path contains NUL".to_string()))?;

    // The message socket is close-on-exec (moved there at start): it does
    // not leak into the step; nor does anything else past stderr.
    close_fds_from(3, true);
    if cfg.no_new_privs {
        stage(crate::seccomp::install(&cfg.seccomp), "seccomp", || {
            "installing the seccomp filter".into()
        })?;
    }
    // Rust ignores SIGPIPE at start-up, and ignored signals stay ignored
    // across exec: the step gets every disposition back at its default,
    // as runc gives it (`yes | head` must end).
    reset_signal_dispositions();
    let _ = SigSet::all().thread_unblock();
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let e = nix::unistd::execve(&exe_c, &argv, &envp).unwrap_err();
    Err(("exec", format!("exec {}: {}", exe.display(), errno_text(e))))
}

/// Every catchable signal back to `SIG_DFL` (what a fresh process has).
/// The raw system call, because glibc's wrapper refuses its own two
/// real-time signals (32 and 33), which kiln's parent may have ignored.
fn reset_signal_dispositions() {
    // The kernel's `struct sigaction`, all zero: SIG_DFL, no flags, no
    // restorer, empty mask (four words covers every architecture's layout).
    let dfl = [0u64; 4];
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: a valid pointer to a zeroed kernel sigaction and the
        // kernel's sigset size; no handler is installed.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            );
        }
    }
}
