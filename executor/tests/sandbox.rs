//! Real sandbox tests, as root, on an overlay of a busybox rootfs.
//!
//! This binary is its own sandbox init: `main()` calls
//! `kiln_executor::maybe_run_init()` first. It speaks enough of libtest's
//! command line for `cargo test` and `cargo nextest run` (`--list --format
//! terse`, name filters, `--exact`).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_executor::oci::{PosixRlimitBuilder, PosixRlimitType, Spec};
use kiln_executor::{
    default_spec, set_network, CancellationToken, Error, ExecOutcome, ExecRequest, Executor,
    ExecutorConfig, ExitStatus, NetworkMode, OutputLine, RootfsMount, Stream,
};

type TestResult = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// One test's world: a busybox rootfs, an overlay upper/work, a state dir.
struct Fixture {
    tmp: tempfile::TempDir,
    rootfs: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    executor: Executor,
}

impl Fixture {
    fn new() -> Result<Fixture, String> {
        let bb = busybox().ok_or("busybox not installed")?;
        let tmp = tempfile::Builder::new()
            .prefix("kiln-exec-test-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let rootfs = tmp.path().join("rootfs");
        make_rootfs(&bb, &rootfs)?;
        let upper = tmp.path().join("upper");
        let work = tmp.path().join("work");
        fs::create_dir(&upper).map_err(|e| e.to_string())?;
        fs::create_dir(&work).map_err(|e| e.to_string())?;
        let executor = Executor::new(ExecutorConfig {
            state_dir: tmp.path().join("state"),
            tail_lines: 5,
            ..ExecutorConfig::default()
        });
        Ok(Fixture {
            tmp,
            rootfs,
            upper,
            work,
            executor,
        })
    }

    fn overlay(&self) -> RootfsMount {
        RootfsMount::overlay(
            std::slice::from_ref(&self.rootfs),
            self.upper.clone(),
            self.work.clone(),
        )
    }

    fn req(&self, args: &[&str]) -> ExecRequest {
        let spec = default_spec(args.iter().map(|s| s.to_string()).collect());
        ExecRequest::new(
            format!("RUN {}", args.join(" ")),
            spec,
            vec![self.overlay()],
        )
    }

    fn sh(&self, script: &str) -> ExecRequest {
        self.req(&["/bin/sh", "-c", script])
    }

    /// Run and collect every line sent to the output channel.
    fn run(&self, req: ExecRequest) -> (Result<ExecOutcome, Error>, Vec<OutputLine>) {
        self.run_with(req, CancellationToken::new())
    }

    fn run_with(
        &self,
        req: ExecRequest,
        cancel: CancellationToken,
    ) -> (Result<ExecOutcome, Error>, Vec<OutputLine>) {
        let rt = runtime();
        rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            let collect = tokio::spawn(async move {
                let mut v = Vec::new();
                while let Some(l) = rx.recv().await {
                    v.push(l);
                }
                v
            });
            let r = self.executor.run(req, Some(tx), cancel).await;
            let lines = collect.await.unwrap_or_default();
            (r, lines)
        })
    }

    /// Run a shell script that must succeed; return its stdout.
    fn stdout(&self, req: ExecRequest) -> Result<String, String> {
        let (r, lines) = self.run(req);
        let o = r.map_err(|e| e.to_string())?;
        let text = text(&lines, Stream::Stdout);
        ensure!(
            o.status.success(),
            "status {} stdout {text:?} stderr {:?}",
            o.status,
            self::text(&lines, Stream::Stderr)
        );
        Ok(text)
    }

    /// Every path in the upperdir, relative.
    fn upper_entries(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        walk(&self.upper, &self.upper, &mut out);
        out
    }

    /// Nothing of this test is mounted on the host, and its state is gone.
    fn host_clean(&self) -> TestResult {
        let mounts = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let me = self.tmp.path().to_string_lossy().into_owned();
        let leaked: Vec<&str> = mounts.lines().filter(|l| l.contains(&me)).collect();
        ensure!(leaked.is_empty(), "mounts leaked on the host: {leaked:?}");
        let state = self.tmp.path().join("state");
        let left: Vec<_> = fs::read_dir(&state)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        ensure!(left.is_empty(), "state left behind: {left:?}");
        Ok(())
    }
}

fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if let Ok(rel) = p.strip_prefix(base) {
            out.insert(rel.to_string_lossy().into_owned());
        }
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(base, &p, out);
        }
    }
}

fn text(lines: &[OutputLine], s: Stream) -> String {
    lines
        .iter()
        .filter(|l| l.stream == s)
        .map(|l| format!("{l}\n"))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The same rootfs as `shared/tools/peer-env.sh make_rootfs`, plus a user
/// `alice` with supplementary groups for the identity tests.
fn make_rootfs(bb: &Path, r: &Path) -> TestResult {
    let e = |e: std::io::Error| e.to_string();
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "tmp",
        "root",
        "proc",
        "sys",
        "dev",
        "var",
        "home/alice",
    ] {
        fs::create_dir_all(r.join(d)).map_err(e)?;
    }
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(r.join("tmp"), fs::Permissions::from_mode(0o1777)).map_err(e)?;
    fs::set_permissions(r.join("root"), fs::Permissions::from_mode(0o700)).map_err(e)?;
    fs::copy(bb, r.join("bin/busybox")).map_err(e)?;
    let list = Command::new(bb).arg("--list-full").output().map_err(e)?;
    for p in String::from_utf8_lossy(&list.stdout).lines() {
        if p.is_empty() || p == "bin/busybox" || p == "linuxrc" {
            continue;
        }
        let dst = r.join(p);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(e)?;
        }
        let _ = symlink("/bin/busybox", dst);
    }
    fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n\
         nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
         alice:x:1000:1000:Alice:/home/alice:/bin/sh\n",
    )
    .map_err(e)?;
    fs::write(
        r.join("etc/group"),
        "root:x:0:\nnogroup:x:65534:\nalice:x:1000:\nstaff:x:50:alice\nwheel:x:10:bob,alice\n",
    )
    .map_err(e)?;
    std::os::unix::fs::chown(r.join("home/alice"), Some(1000), Some(1000)).map_err(e)?;
    Ok(())
}

/// Processes on the host whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(c) = fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) {
                v.push(format!("{name}: {c}"));
            }
        }
    }
    v
}

fn wait_no_processes(needle: &str, within: Duration) -> TestResult {
    let t = Instant::now();
    loop {
        let p = processes_with(needle);
        if p.is_empty() {
            return Ok(());
        }
        ensure!(t.elapsed() < within, "processes survived: {p:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rlimit(t: PosixRlimitType, soft: u64, hard: u64) -> kiln_executor::oci::PosixRlimit {
    PosixRlimitBuilder::default()
        .typ(t)
        .soft(soft)
        .hard(hard)
        .build()
        .expect("rlimit")
}

fn set_resources(spec: &mut Spec, f: impl FnOnce(&mut kiln_executor::oci::LinuxResources)) {
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut res = linux.resources().clone().unwrap_or_default();
    f(&mut res);
    linux.set_resources(Some(res));
    spec.set_linux(Some(linux));
}

// ---------------------------------------------------------------- tests

fn exit_code_and_streams() -> TestResult {
    let f = Fixture::new()?;
    let (r, lines) = f.run(f.sh("echo out1; echo err1 >&2; echo out2; exit 3"));
    let o = r.map_err(|e| e.to_string())?;
    ensure!(o.status == ExitStatus::Code(3), "status {:?}", o.status);
    ensure!(
        text(&lines, Stream::Stdout) == "out1\nout2\n",
        "stdout {lines:?}"
    );
    ensure!(text(&lines, Stream::Stderr) == "err1\n", "stderr {lines:?}");
    ensure!(
        o.failure_message("RUN x").contains("exit code: 3"),
        "{}",
        o.failure_message("RUN x")
    );
    f.host_clean()
}

fn signal_reported() -> TestResult {
    let f = Fixture::new()?;
    let (r, _) = f.run(f.sh("kill -9 $$"));
    let o = r.map_err(|e| e.to_string())?;
    ensure!(o.status == ExitStatus::Signal(9), "status {:?}", o.status);
    ensure!(o.status.to_string().contains("SIGKILL"), "{}", o.status);
    f.host_clean()
}

/// Runs `req` with `run_with_signals`, sending `sig` once a stdout line
/// equal to `after` has come (at once if `None`: before the sandbox is
/// even up); returns the outcome and stdout.
fn run_signalled(
    f: &Fixture,
    req: ExecRequest,
    sig: i32,
    after: Option<&str>,
) -> (Result<ExecOutcome, Error>, String) {
    runtime().block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<OutputLine>(16);
        let (stx, srx) = tokio::sync::mpsc::channel(4);
        if after.is_none() {
            let _ = stx.send(sig).await;
        }
        let ex = f.executor.clone();
        let h = tokio::spawn(async move {
            ex.run_with_signals(req, Some(tx), CancellationToken::new(), srx)
                .await
        });
        let mut out = String::new();
        while let Some(l) = rx.recv().await {
            if l.stream == Stream::Stdout {
                out.push_str(&format!("{l}\n"));
                if after == Some(l.to_string().as_str()) {
                    let _ = stx.send(sig).await;
                }
            }
        }
        drop(stx);
        let r = h.await.unwrap_or_else(|e| panic!("{e}"));
        (r, out)
    })
}

fn a_forwarded_signal_runs_the_step_s_trap() -> TestResult {
    let f = Fixture::new()?;
    let req = f.sh("trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.1; done");
    let t = Instant::now();
    let (r, out) = run_signalled(&f, req, libc::SIGTERM, Some("ready"));
    let o = r.map_err(|e| e.to_string())?;
    ensure!(out == "ready\ngot TERM\n", "{out:?}");
    ensure!(o.status == ExitStatus::Code(3), "status {:?}", o.status);
    ensure!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    f.host_clean()
}

/// The step is the child of the sandbox's PID 1: an untrapped SIGTERM
/// kills it (PID 1 itself would ignore it).
fn a_forwarded_signal_kills_a_step_without_a_handler() -> TestResult {
    let f = Fixture::new()?;
    let (r, out) = run_signalled(
        &f,
        f.sh("echo ready; exec sleep 30"),
        libc::SIGTERM,
        Some("ready"),
    );
    let o = r.map_err(|e| e.to_string())?;
    ensure!(
        o.status == ExitStatus::Signal(15),
        "status {:?} {out:?}",
        o.status
    );
    f.host_clean()
}

/// A signal sent the moment the init starts is held until the step runs
/// (it used to find the init without its handlers and kill it: "sandbox
/// init died").
fn a_signal_sent_at_once_waits_for_the_step() -> TestResult {
    let f = Fixture::new()?;
    for _ in 0..5 {
        let (r, out) = run_signalled(&f, f.req(&["sleep", "30"]), libc::SIGTERM, None);
        let o = r.map_err(|e| e.to_string())?;
        ensure!(
            o.status == ExitStatus::Signal(15),
            "status {:?} {out:?}",
            o.status
        );
    }
    f.host_clean()
}

/// Numbers that are not forwarded signals (SIGKILL for the init, SIGSTOP,
/// nonsense) are ignored: the step runs to its end.
fn signals_that_are_not_forwarded_are_ignored() -> TestResult {
    let f = Fixture::new()?;
    for sig in [libc::SIGKILL, libc::SIGSTOP, libc::SIGCHLD, 0, -1, 999] {
        let (r, out) = run_signalled(
            &f,
            f.sh("echo ready; sleep 0.3; echo done"),
            sig,
            Some("ready"),
        );
        let o = r.map_err(|e| e.to_string())?;
        ensure!(
            o.status == ExitStatus::Code(0) && out == "ready\ndone\n",
            "signal {sig}: status {:?} {out:?}",
            o.status
        );
    }
    f.host_clean()
}

/// Red-team finding: the init (a Rust binary) ignores SIGPIPE and the step
/// inherited that, so `yes | head` spun forever.
fn signals_start_at_their_defaults() -> TestResult {
    let f = Fixture::new()?;
    let out =
        f.stdout(f.sh("grep -E '^Sig(Ign|Blk):' /proc/self/status; yes kiln | head -c 9; echo"))?;
    ensure!(
        out == "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\nkiln\nkiln\n",
        "{out:?}"
    );
    f.host_clean()
}

fn exec_form_without_shell() -> TestResult {
    let f = Fixture::new()?;
    let out = f.stdout(f.req(&["echo", "a  b", "$HOME"]))?;
    ensure!(out == "a  b $HOME\n", "{out:?}");
    f.host_clean()
}

fn output_streamed_in_order_and_tail_kept() -> TestResult {
    let f = Fixture::new()?;
    let rt = runtime();
    rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let ex = f.executor.clone();
        let req = f
            .sh("echo first; sleep 1; i=0; while [ $i -lt 200 ]; do echo line$i; i=$((i+1)); done");
        let h = tokio::spawn(async move { ex.run(req, Some(tx), CancellationToken::new()).await });
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .map_err(|_| "no first line within 5s".to_string())?
            .ok_or("channel closed")?;
        ensure!(first.to_string() == "first", "{first:?}");
        ensure!(
            !h.is_finished(),
            "first line only arrived after the step ended"
        );
        let mut rest = Vec::new();
        while let Some(l) = rx.recv().await {
            rest.push(l.to_string());
        }
        let want: Vec<String> = (0..200).map(|i| format!("line{i}")).collect();
        ensure!(
            rest == want,
            "out of order or missing: {} lines",
            rest.len()
        );
        let o = h
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let tail: Vec<String> = o.tail.iter().map(|l| l.to_string()).collect();
        ensure!(tail == want[195..], "tail {tail:?}");
        Ok::<(), String>(())
    })?;
    f.host_clean()
}

fn long_line_is_split() -> TestResult {
    let f = Fixture::new()?;
    let (r, lines) = f.run(f.sh("head -c 200000 /dev/zero | tr '\\0' a; echo; echo end"));
    r.map_err(|e| e.to_string())?;
    let sizes: Vec<usize> = lines.iter().map(|l| l.bytes.len()).collect();
    ensure!(
        sizes == vec![65536, 65536, 65536, 200000 - 3 * 65536, 3],
        "{sizes:?}"
    );
    Ok(())
}

fn upperdir_holds_only_the_commands_writes() -> TestResult {
    let f = Fixture::new()?;
    // A spec mount on a path missing from the image, too.
    let cache = f.tmp.path().join("cache");
    fs::create_dir(&cache).map_err(|e| e.to_string())?;
    let mut req = f.sh(
        "cat /etc/resolv.conf /etc/hosts /etc/hostname >/dev/null && \
         echo hi > /created && mkdir -p /var/lib/x && touch /var/lib/x/y && \
         echo c > /mnt/cache/c && ls /proc/1 >/dev/null",
    );
    let m = kiln_executor::oci::MountBuilder::default()
        .destination("/mnt/cache")
        .typ("bind")
        .source(cache.clone())
        .options(vec!["rbind".to_string()])
        .build()
        .map_err(|e| e.to_string())?;
    req.spec.set_mounts(Some(vec![m]));
    f.stdout(req)?;
    let got = f.upper_entries();
    let want: BTreeSet<String> = ["created", "var", "var/lib", "var/lib/x", "var/lib/x/y"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    ensure!(got == want, "upperdir has {got:?}");
    ensure!(
        cache.join("c").exists(),
        "bind mount did not receive the write"
    );
    // The rootfs (lower) is untouched too.
    ensure!(!f.rootfs.join("etc/hostname").exists(), "lower modified");
    ensure!(!f.rootfs.join("mnt/cache").exists(), "lower modified");
    f.host_clean()
}

fn provided_etc_files() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh("cat /etc/hostname; grep -c localhost /etc/hosts; hostname");
    req.spec.set_hostname(Some("builder".into()));
    let out = f.stdout(req)?;
    ensure!(out == "builder\n2\nbuilder\n", "{out:?}");
    let out = f.stdout(f.sh("hostname"))?;
    ensure!(out == "kiln\n", "{out:?}");
    f.host_clean()
}

fn pid1_is_init_and_reaps() -> TestResult {
    let f = Fixture::new()?;
    // `true` is orphaned to PID 1, which must reap it.
    let out = f.stdout(f.sh(
        "tr '\\0' ' ' < /proc/1/cmdline; echo; echo $$; (true &); (true &); sleep 0.3; \
         grep -l '^State:.*Z' /proc/[0-9]*/status | wc -l",
    ))?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 3, "{out:?}");
    ensure!(lines[0].contains("__init"), "pid 1 is {:?}", lines[0]);
    ensure!(lines[1] == "2", "the step is pid {}", lines[1]);
    ensure!(lines[2].trim() == "0", "zombies: {}", lines[2]);
    f.host_clean()
}

fn capabilities_docker_default() -> TestResult {
    let f = Fixture::new()?;
    let out = f.stdout(
        f.sh("grep -E '^(CapEff|CapPrm|CapBnd|CapInh|CapAmb|NoNewPrivs)' /proc/self/status"),
    )?;
    for want in [
        "CapInh:\t0000000000000000",
        "CapPrm:\t00000000a80425fb",
        "CapEff:\t00000000a80425fb",
        "CapBnd:\t00000000a80425fb",
        "CapAmb:\t0000000000000000",
        "NoNewPrivs:\t0",
    ] {
        ensure!(out.contains(want), "missing {want:?} in {out:?}");
    }
    let mut req = f.sh("grep -E '^(CapEff|CapBnd)' /proc/self/status");
    req.user = Some("nobody".into());
    let out = f.stdout(req)?;
    ensure!(out.contains("CapEff:\t0000000000000000"), "{out:?}");
    ensure!(out.contains("CapBnd:\t00000000a80425fb"), "{out:?}");
    f.host_clean()
}

fn no_new_privs_when_asked() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh("grep NoNewPrivs /proc/self/status");
    if let Some(p) = req.spec.process_mut() {
        p.set_no_new_privileges(Some(true));
    }
    let out = f.stdout(req)?;
    ensure!(out.contains("NoNewPrivs:\t1"), "{out:?}");
    Ok(())
}

fn sys_readonly_proc_masked() -> TestResult {
    let f = Fixture::new()?;
    let out = f.stdout(f.sh("touch /sys/x 2>/dev/null && echo sys-writable; \
         echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && echo procsys-writable; \
         ls /proc/acpi 2>/dev/null | wc -l; \
         grep -E ' /sys | /proc/sys ' /proc/mounts | cut -d' ' -f2,4 | cut -d, -f1"))?;
    ensure!(!out.contains("writable"), "{out:?}");
    // Every default masked file that exists reads empty (kcore may not exist).
    for p in kiln_executor::rootfs::DEFAULT_MASKED_PATHS {
        let host = Path::new(p);
        if host.is_file() && fs::read(host).map(|c| !c.is_empty()).unwrap_or(false) {
            let out = f.stdout(f.sh(&format!("wc -c < {p}")))?;
            ensure!(out.trim() == "0", "{p} not masked: {out:?}");
        }
    }
    ensure!(out.contains("/sys ro"), "{out:?}");
    ensure!(out.contains("/proc/sys ro"), "{out:?}");
    f.host_clean()
}

fn dev_has_the_minimal_nodes() -> TestResult {
    let f = Fixture::new()?;
    let out = f.stdout(f.sh(
        "ls /dev | tr '\\n' ' '; echo; echo x > /dev/null; head -c 5 /dev/urandom | wc -c; \
         head -c 3 /dev/zero | wc -c; for l in ptmx fd stdin stdout stderr; do readlink /dev/$l; done; \
         grep -E ' /dev/(pts|shm|mqueue) ' /proc/mounts | cut -d' ' -f3 | tr '\\n' ' '",
    ))?;
    let l: Vec<&str> = out.lines().collect();
    let names: BTreeSet<&str> = l
        .first()
        .copied()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    for want in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue", "fd",
        "stdin", "stdout", "stderr",
    ] {
        ensure!(names.contains(want), "/dev lacks {want}: {names:?}");
    }
    ensure!(l.get(1) == Some(&"5") && l.get(2) == Some(&"3"), "{out:?}");
    ensure!(
        l.get(3..8)
            == Some(
                &[
                    "pts/ptmx",
                    "/proc/self/fd",
                    "/proc/self/fd/0",
                    "/proc/self/fd/1",
                    "/proc/self/fd/2"
                ][..]
            ),
        "{out:?}"
    );
    let mut fs_types: Vec<&str> = l.get(8).copied().unwrap_or("").split_whitespace().collect();
    fs_types.sort_unstable();
    ensure!(fs_types == ["devpts", "mqueue", "tmpfs"], "{out:?}");
    f.host_clean()
}

fn network_none_has_only_lo() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh("ls /sys/class/net | tr '\\n' ' '; echo; cat /sys/class/net/lo/flags");
    set_network(&mut req.spec, NetworkMode::None);
    let out = f.stdout(req)?;
    let l: Vec<&str> = out.lines().collect();
    ensure!(l.first().map(|s| s.trim()) == Some("lo"), "{out:?}");
    // IFF_UP = 0x1
    let flags = l
        .get(1)
        .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);
    ensure!(flags & 1 == 1, "lo not up: {out:?}");
    // Host network (default): the host's interfaces are there.
    let host: BTreeSet<String> = fs::read_dir("/sys/class/net")
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let out = f.stdout(f.sh("ls /sys/class/net"))?;
    let inside: BTreeSet<String> = out.lines().map(str::to_string).collect();
    ensure!(inside == host, "host net: inside {inside:?} host {host:?}");
    f.host_clean()
}

fn namespaces_are_fresh_except_the_host_network() -> TestResult {
    let f = Fixture::new()?;
    let kinds = ["ipc", "uts", "mnt", "pid", "cgroup", "net"];
    let script = kinds
        .iter()
        .map(|k| format!("readlink /proc/self/ns/{k}"))
        .collect::<Vec<_>>()
        .join("; ");
    let out = f.stdout(f.sh(&script))?;
    let inside: Vec<&str> = out.lines().collect();
    ensure!(inside.len() == kinds.len(), "{out:?}");
    for (k, ns) in kinds.iter().zip(&inside) {
        let host = fs::read_link(format!("/proc/self/ns/{k}"))
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned();
        if *k == "net" {
            ensure!(*ns == host, "host network by default: {ns} vs {host}");
        } else {
            ensure!(*ns != host, "{k} namespace is the host's ({ns})");
        }
    }
    // IPC objects made inside stay inside: the step sees an empty SysV
    // namespace (no host segments).
    let ipcs = f.stdout(f.sh("cat /proc/sysvipc/shm | wc -l"))?;
    ensure!(ipcs.trim() == "1", "only the header line: {ipcs:?}");
    f.host_clean()
}

fn user_forms_resolve_in_rootfs() -> TestResult {
    let f = Fixture::new()?;
    let cases = [
        // id -G sorted: primary group plus supplementary ones.
        ("alice", "1000 1000 10 50 1000 /home/alice"),
        ("1000", "1000 1000 10 50 1000 /home/alice"),
        ("4242", "4242 0 0 /"),
        ("1000:50", "1000 50 50 /home/alice"),
        ("alice:staff", "1000 50 50 /home/alice"),
        ("nobody", "65534 65534 65534 /nonexistent"),
        ("root", "0 0 0 /root"),
    ];
    for (user, want) in cases {
        let mut req =
            f.sh("echo $(id -u) $(id -g) $(id -G | tr ' ' '\\n' | sort -n | tr '\\n' ' ')$HOME");
        req.user = Some(user.into());
        let out = f.stdout(req)?;
        ensure!(
            out.trim() == want,
            "USER {user}: got {:?}, want {want:?}",
            out.trim()
        );
    }
    // The public helper agrees, and does not follow symlinks out of the rootfs.
    let u = kiln_executor::resolve_user(&f.rootfs, "alice").map_err(|e| e.to_string())?;
    ensure!(u.uid == 1000 && u.additional_gids == vec![50, 10], "{u:?}");
    let evil = f.tmp.path().join("evil");
    fs::create_dir_all(evil.join("etc")).map_err(|e| e.to_string())?;
    symlink("/etc/passwd", evil.join("etc/passwd")).map_err(|e| e.to_string())?;
    let r = kiln_executor::resolve_user(&evil, "root");
    // /etc/passwd resolves inside `evil`, where it does not exist: no user
    // "root" by name... but root is uid 0 by default only for numeric forms.
    ensure!(r.is_err(), "followed a symlink out of the rootfs: {r:?}");
    f.host_clean()
}

fn unknown_user_is_a_clear_error() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh("true");
    req.user = Some("nosuch".into());
    let (r, _) = f.run(req);
    match r {
        Err(Error::Setup { message, .. }) => {
            ensure!(message.contains("unable to find user nosuch"), "{message}");
        }
        other => return Err(format!("expected a setup error, got {other:?}")),
    }
    f.host_clean()
}

fn missing_executable_is_a_clear_error() -> TestResult {
    let f = Fixture::new()?;
    let (r, _) = f.run(f.req(&["nosuch", "arg"]));
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        msg == r#"step "RUN nosuch arg": exec: "nosuch": executable file not found in $PATH"#,
        "{msg}"
    );
    let (r, _) = f.run(f.req(&["/no/such"]));
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        msg.contains(r#"exec: "/no/such": stat /no/such: no such file or directory"#),
        "{msg}"
    );
    // Shell form: the shell reports it, exit 127.
    let (r, lines) = f.run(f.sh("nosuch"));
    let o = r.map_err(|e| e.to_string())?;
    ensure!(
        o.status == ExitStatus::Code(127),
        "{:?} {lines:?}",
        o.status
    );
    f.host_clean()
}

fn workdir_created_or_clear_error() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh("pwd; stat -c %u /home/alice/a/b");
    if let Some(p) = req.spec.process_mut() {
        p.set_cwd("/home/alice/a/b".into());
    }
    req.user = Some("alice".into());
    let out = f.stdout(req)?;
    ensure!(out == "/home/alice/a/b\n1000\n", "{out:?}");
    let mut req = f.sh("true");
    if let Some(p) = req.spec.process_mut() {
        p.set_cwd("/etc/passwd/sub".into());
    }
    let (r, _) = f.run(req);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        msg.contains("creating working directory /etc/passwd/sub")
            && msg.contains("not a directory"),
        "{msg}"
    );
    // A directory the user may not enter.
    let mut req = f.sh("true");
    if let Some(p) = req.spec.process_mut() {
        p.set_cwd("/root".into());
    }
    req.user = Some("nobody".into());
    let (r, _) = f.run(req);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        msg.contains("chdir to working directory /root: permission denied"),
        "{msg}"
    );
    f.host_clean()
}

fn rlimits_applied_within_hard_limit() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh("ulimit -n; ulimit -Hn");
    if let Some(p) = req.spec.process_mut() {
        p.set_rlimits(Some(vec![rlimit(PosixRlimitType::RlimitNofile, 512, 1000)]));
    }
    let out = f.stdout(req)?;
    ensure!(out == "512\n1000\n", "{out:?}");
    let mut host = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut host) };
    let mut req = f.sh("true");
    let too_much = host.rlim_max.saturating_add(10_000);
    if let Some(p) = req.spec.process_mut() {
        p.set_rlimits(Some(vec![rlimit(
            PosixRlimitType::RlimitNofile,
            1024,
            too_much,
        )]));
    }
    let (r, _) = f.run(req);
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        msg.contains(&format!(
            "rlimit RLIMIT_NOFILE hard limit {too_much} exceeds the host's hard limit {}",
            host.rlim_max
        )),
        "{msg}"
    );
    f.host_clean()
}

fn memory_limit_enforced() -> TestResult {
    let f = Fixture::new()?;
    let args = ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"];
    let out = f.run(f.req(&args)).0.map_err(|e| e.to_string())?;
    ensure!(out.status.success(), "without limit: {:?}", out.status);
    let mut req = f.req(&args);
    set_resources(&mut req.spec, |r| {
        r.set_memory(
            kiln_executor::oci::LinuxMemoryBuilder::default()
                .limit(16i64 << 20)
                .build()
                .ok(),
        );
    });
    let o = f.run(req).0.map_err(|e| e.to_string())?;
    ensure!(
        o.status == ExitStatus::Signal(9),
        "with 16M limit: {:?}",
        o.status
    );
    f.host_clean()
}

fn pids_limit_enforced() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh("for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 5 & done; echo spawned");
    set_resources(&mut req.spec, |r| {
        r.set_pids(
            kiln_executor::oci::LinuxPidsBuilder::default()
                .limit(6i64)
                .build()
                .ok(),
        );
    });
    let t = Instant::now();
    let (r, lines) = f.run(req);
    r.map_err(|e| e.to_string())?;
    let err = text(&lines, Stream::Stderr);
    ensure!(err.contains("fork"), "no fork failure: {lines:?}");
    ensure!(
        t.elapsed() < Duration::from_secs(4),
        "background sleeps were waited for"
    );
    f.host_clean()
}

fn cpu_quota_accepted() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh("echo ok");
    set_resources(&mut req.spec, |r| {
        r.set_cpu(
            kiln_executor::oci::LinuxCpuBuilder::default()
                .quota(50_000i64)
                .period(100_000u64)
                .build()
                .ok(),
        );
    });
    let out = f.stdout(req)?;
    ensure!(out == "ok\n", "{out:?}");
    f.host_clean()
}

fn background_process_killed_with_step() -> TestResult {
    let f = Fixture::new()?;
    let out = f.stdout(f.sh("sleep 987001 & echo started"))?;
    ensure!(out == "started\n", "{out:?}");
    wait_no_processes("987001", Duration::from_millis(200))?;
    f.host_clean()
}

fn timeout_kills_the_tree() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh("echo before; sleep 987002 & sleep 987002");
    req.timeout = Some(Duration::from_millis(800));
    let t = Instant::now();
    let (r, _) = f.run(req);
    match r {
        Err(Error::TimedOut { tail, .. }) => {
            ensure!(
                tail.first().map(|l| l.to_string()).as_deref() == Some("before"),
                "{tail:?}"
            )
        }
        other => return Err(format!("expected timeout, got {other:?}")),
    }
    ensure!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    wait_no_processes("987002", Duration::from_millis(200))?;
    f.host_clean()
}

fn cancellation_kills_the_tree() -> TestResult {
    let f = Fixture::new()?;
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        c2.cancel();
    });
    let t = Instant::now();
    let (r, _) = f.run_with(f.sh("sleep 987004 & sleep 987004"), cancel);
    ensure!(matches!(r, Err(Error::Cancelled { .. })), "{r:?}");
    ensure!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    wait_no_processes("987004", Duration::from_millis(200))?;
    f.host_clean()
}

/// Child mode for the PDEATHSIG test: run a long step, print "started".
fn pdeathsig_child(dir: &Path, cgroup_parent: &str) -> ! {
    let rootfs = dir.join("rootfs");
    let ex = Executor::new(ExecutorConfig {
        state_dir: dir.join("state"),
        cgroup_parent: cgroup_parent.to_string(),
        ..ExecutorConfig::default()
    });
    let rt = runtime();
    rt.block_on(async {
        let spec = default_spec(vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo started; sleep 987003 & sleep 987003".into(),
        ]);
        let m = RootfsMount::overlay(&[rootfs], dir.join("upper"), dir.join("work"));
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let run = tokio::spawn(async move {
            ex.run(
                ExecRequest::new("RUN sleep", spec, vec![m]),
                Some(tx),
                CancellationToken::new(),
            )
            .await
        });
        if let Some(l) = rx.recv().await {
            println!("{l}");
        }
        let _ = run.await;
    });
    std::process::exit(0)
}

fn sigkill_of_kiln_takes_the_sandbox_down() -> TestResult {
    let mut f = Fixture::new()?;
    // A cgroup parent of its own: the other sandbox tests run at the same
    // time, and any executor's first step sweeps its parent's dead runs;
    // the dead run below must be there to see until this test sweeps it.
    let parent = format!("kiln-sigkill-test-{}", std::process::id());
    f.executor = Executor::new(ExecutorConfig {
        state_dir: f.tmp.path().join("state"),
        tail_lines: 5,
        cgroup_parent: parent.clone(),
        ..ExecutorConfig::default()
    });
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("__pdeathsig_child")
        .arg(f.tmp.path())
        .arg(&parent)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut buf = [0u8; 8];
    use std::io::Read;
    let n = out.read(&mut buf).map_err(|e| e.to_string())?;
    ensure!(&buf[..n] == b"started\n", "child said {:?}", &buf[..n]);
    // The shell says "started" before it forks the sleeps: give them a
    // moment to appear (under load that takes more than no time).
    let t = Instant::now();
    while processes_with("sleep 987003").is_empty() {
        ensure!(t.elapsed() < Duration::from_secs(3), "step not running");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().map_err(|e| e.to_string())?; // SIGKILL
    let _ = child.wait();
    wait_no_processes("sleep 987003", Duration::from_secs(3))?;
    // Mounts lived in the dead sandbox's namespace only.
    let mounts = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let me = f.tmp.path().to_string_lossy().into_owned();
    ensure!(!mounts.contains(&me), "mounts leaked after SIGKILL");
    // The dead executor's cgroup and state are swept by the next run.
    let state = f.tmp.path().join("state");
    let dead: Vec<String> = fs::read_dir(&state)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(
        dead.len() == 1,
        "expected the dead run's state, got {dead:?}"
    );
    let cgroups_of_dead = || -> Vec<PathBuf> {
        let mut v = Vec::new();
        for base in cgroup_parents_named(&parent) {
            let p = base.join(&dead[0]);
            if p.exists() {
                v.push(p);
            }
        }
        v
    };
    ensure!(
        !cgroups_of_dead().is_empty(),
        "no cgroup of the dead run found"
    );
    let out = f.stdout(f.sh("echo again"))?;
    ensure!(out == "again\n", "{out:?}");
    ensure!(
        cgroups_of_dead().is_empty(),
        "stale cgroups: {:?}",
        cgroups_of_dead()
    );
    for base in cgroup_parents_named(&parent) {
        let _ = fs::remove_dir(base);
    }
    f.host_clean()
}

/// `<hierarchy>/<our cgroup>/kiln` for every cgroup hierarchy mounted.
fn cgroup_parents() -> Vec<PathBuf> {
    cgroup_parents_named("kiln")
}

/// `<hierarchy>/<our cgroup>/<parent>` for every cgroup hierarchy mounted.
fn cgroup_parents_named(parent: &str) -> Vec<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut v = Vec::new();
    for l in own.lines() {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next(), it.next().unwrap_or(""), it.next().unwrap_or(""));
        let base = if ctrls.is_empty() {
            PathBuf::from("/sys/fs/cgroup/unified")
        } else {
            PathBuf::from("/sys/fs/cgroup").join(ctrls.trim_start_matches("name="))
        };
        v.push(base.join(path.trim_start_matches('/')).join(parent));
    }
    v
}

fn devices_restricted() -> TestResult {
    if !Path::new("/sys/fs/cgroup/devices").exists() {
        println!("    (no v1 devices controller: skipped)");
        return Ok(());
    }
    let f = Fixture::new()?;
    // CAP_MKNOD is in the default set, but the node cannot be opened.
    let out = f.stdout(f.sh(
        "mknod /tmp/disk b 7 0 && echo made; head -c 1 /tmp/disk >/dev/null 2>&1 || echo denied; \
         echo ok > /dev/null && echo null-ok",
    ))?;
    ensure!(out == "made\ndenied\nnull-ok\n", "{out:?}");
    f.host_clean()
}

fn step_cgroups_removed() -> TestResult {
    let f = Fixture::new()?;
    let rt = runtime();
    let dirs = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let ex = f.executor.clone();
        let req = f.sh("cat /proc/self/cgroup; echo ready 987006; sleep 987006 & sleep 1");
        let h = tokio::spawn(async move { ex.run(req, Some(tx), CancellationToken::new()).await });
        let mut inside = Vec::new();
        loop {
            let l = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .map_err(|_| "no ready line")?
                .ok_or("closed")?
                .to_string();
            if l == "ready 987006" {
                break;
            }
            inside.push(l);
        }
        // Inside, the cgroup namespace hides the step's path.
        ensure!(
            inside.iter().all(|l| l.ends_with(":/")),
            "cgroup namespace not in effect: {inside:?}"
        );
        // On the host, the step (here: its background child; busybox sh
        // execs its last command) is in <hierarchy>/<ours>/kiln/<id>. The
        // shell says "ready" before it forks the sleep, and the shell's own
        // command line (and its fork's, until it execs) holds the words
        // too, while an exec in progress reads as empty: wait for the
        // sleep itself, and keep the pid the same listing gave.
        let t = Instant::now();
        let pid = loop {
            let sleep = processes_with("sleep 987006").into_iter().find_map(|l| {
                let (pid, cmd) = l.split_once(": ")?;
                cmd.starts_with("sleep 987006").then(|| pid.to_string())
            });
            if let Some(pid) = sleep {
                break pid;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(3),
                "step not found; inside {inside:?}; {:?}",
                processes_with("987006")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut dirs = Vec::new();
        for base in cgroup_parents() {
            for e in fs::read_dir(&base).into_iter().flatten().flatten() {
                let procs = fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
                if procs.lines().any(|l| l == pid) {
                    dirs.push(e.path());
                }
            }
        }
        // The unified hierarchy is used on a hybrid host only when no v1
        // freezer is there to kill with (no limit is asked for here).
        let wanted: &[&str] = if Path::new("/sys/fs/cgroup/freezer").exists() {
            &["memory", "pids", "freezer", "devices"]
        } else {
            &["memory", "pids", "freezer", "devices", "unified"]
        };
        let n_hier = cgroup_parents()
            .iter()
            .filter(|p| {
                wanted
                    .iter()
                    .any(|h| p.starts_with(format!("/sys/fs/cgroup/{h}")))
            })
            .count();
        ensure!(
            dirs.len() >= n_hier,
            "step in {dirs:?}, expected {n_hier} hierarchies"
        );
        let _ = h.await;
        Ok::<_, String>(dirs)
    })?;
    let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
    ensure!(left.is_empty(), "cgroups not removed: {left:?}");
    wait_no_processes("987006", Duration::from_secs(3))?;
    f.host_clean()
}

/// Child mode: run steps (one with a pids limit) from this process, then
/// check that every thread of it is back in the process's own cgroups
/// (the thread that starts a sandbox steps into the step's v1 cgroups for
/// the spawn). Exits 0 when all are, else prints the strays.
fn thread_cgroups_child(dir: &Path, parent: &str) -> ! {
    let ex = Executor::new(ExecutorConfig {
        state_dir: dir.join("state"),
        cgroup_parent: parent.to_string(),
        ..ExecutorConfig::default()
    });
    let rt = runtime();
    let mut failed = Vec::new();
    rt.block_on(async {
        for i in 0..4 {
            let mut spec = default_spec(vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("echo step {i}"),
            ]);
            if i == 2 {
                set_resources(&mut spec, |r| {
                    r.set_pids(
                        kiln_executor::oci::LinuxPidsBuilder::default()
                            .limit(64i64)
                            .build()
                            .ok(),
                    );
                });
            }
            let m =
                RootfsMount::overlay(&[dir.join("rootfs")], dir.join("upper"), dir.join("work"));
            match ex
                .run(
                    ExecRequest::new("RUN echo", spec, vec![m]),
                    None,
                    CancellationToken::new(),
                )
                .await
            {
                Ok(o) if o.status.success() => {}
                other => failed.push(format!("step {i}: {other:?}")),
            }
        }
    });
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for t in fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let cg = fs::read_to_string(t.path().join("cgroup")).unwrap_or_default();
        if !cg.is_empty() && cg != own {
            failed.push(format!(
                "thread {:?} in {cg:?}",
                t.file_name().to_string_lossy()
            ));
        }
    }
    for base in cgroup_parents_named(parent) {
        let _ = fs::remove_dir(base);
    }
    if failed.is_empty() {
        std::process::exit(0);
    }
    println!("{}", failed.join("\n"));
    std::process::exit(1)
}

/// The executor's threads never stay in a step's cgroup, with or without
/// limits (a stray thread would carry the step's device rules and be
/// listed, so killed, with the step's processes).
fn threads_leave_the_step_cgroups() -> TestResult {
    let f = Fixture::new()?;
    let parent = format!("kiln-threads-test-{}", std::process::id());
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let o = Command::new(exe)
        .arg("__thread_cgroups_child")
        .arg(f.tmp.path())
        .arg(&parent)
        .output()
        .map_err(|e| e.to_string())?;
    ensure!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    f.host_clean()
}

fn signals_forwarded_to_the_step() -> TestResult {
    let f = Fixture::new()?;
    let rt = runtime();
    rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let ex = f.executor.clone();
        let req = f.sh(
            "trap 'echo got-term; exit 7' TERM; echo ready 987005; while true; do sleep 0.05; done",
        );
        let h = tokio::spawn(async move { ex.run(req, Some(tx), CancellationToken::new()).await });
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .map_err(|_| "no ready")?;
        ensure!(
            first.map(|l| l.to_string()).as_deref() == Some("ready 987005"),
            "not ready"
        );
        // The step's shell -> its parent is PID 1 of the sandbox -> its
        // parent is the supervisor we started. Signal the supervisor.
        let ppid = |p: &str| -> Option<String> {
            let st = fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            st.lines()
                .find_map(|l| l.strip_prefix("PPid:").map(|v| v.trim().to_string()))
        };
        // The shell's forks (before they exec `sleep`) carry its command
        // line too: the shell is the match whose parent is not one.
        let matches: Vec<String> = processes_with("ready 987005")
            .iter()
            .filter_map(|l| l.split(':').next().map(str::to_string))
            .collect();
        let pid = matches
            .iter()
            .find(|p| ppid(p).is_some_and(|pp| !matches.contains(&pp)))
            .ok_or("step not found")?
            .clone();
        let pid1 = ppid(&pid).ok_or("no pid 1")?;
        let sup = ppid(&pid1).ok_or("no supervisor")?;
        let sup: i32 = sup.parse().map_err(|_| "bad pid")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sup),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        while let Some(l) = rx.recv().await {
            rest.push(l.to_string());
        }
        let o = h
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        ensure!(rest == ["got-term"], "{rest:?}");
        ensure!(o.status == ExitStatus::Code(7), "{:?}", o.status);
        Ok::<(), String>(())
    })?;
    f.host_clean()
}

fn bind_rootfs_leaves_no_stubs() -> TestResult {
    let f = Fixture::new()?;
    let spec = default_spec(vec![
        "/bin/sh".into(),
        "-c".into(),
        "cat /etc/hostname; echo x > /written".into(),
    ]);
    let req = ExecRequest::new("RUN bind", spec, vec![RootfsMount::bind(f.rootfs.clone())]);
    let out = f.stdout(req)?;
    ensure!(out == "kiln\n", "{out:?}");
    ensure!(f.rootfs.join("written").exists(), "write lost");
    for stub in ["etc/hostname", "etc/hosts", "etc/resolv.conf"] {
        ensure!(
            !f.rootfs.join(stub).exists(),
            "stub {stub} left in the rootfs"
        );
    }
    f.host_clean()
}

/// The fds kiln's caller left open (here: a non-CLOEXEC descriptor of a
/// host directory, as `exec 7</` leaves one) reach neither the step nor the
/// sandbox's PID 1.
fn inherited_fds_do_not_reach_the_step() -> TestResult {
    let f = Fixture::new()?;
    let host = f.tmp.path().join("host");
    fs::create_dir(&host).map_err(|e| e.to_string())?;
    fs::write(host.join("marker"), "HOST-FD-MARKER\n").map_err(|e| e.to_string())?;
    let c =
        std::ffi::CString::new(host.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: plain descriptor calls on numbers this test owns.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    ensure!(fd >= 0, "open {}", std::io::Error::last_os_error());
    // dup2 leaves the new descriptor without FD_CLOEXEC.
    ensure!(unsafe { libc::dup2(fd, 77) } == 77, "dup2");
    unsafe { libc::close(fd) };
    let r = f.stdout(f.sh(
        "ls /proc/self/fd | tr '\\n' ' '; echo; cat /proc/self/fd/77/marker 2>&1; \
         cat /proc/1/fd/77/marker 2>&1; true",
    ));
    // Without a shell in between: what the step's own process holds.
    let direct = f.stdout(f.req(&["/bin/ls", "/proc/self/fd"]));
    // SAFETY: ours.
    unsafe { libc::close(77) };
    let out = r?;
    ensure!(
        !out.contains("HOST-FD-MARKER"),
        "host fd reached the sandbox: {out:?}"
    );
    let l: Vec<&str> = out.lines().collect();
    // ls sees its own 0, 1, 2 and the directory it is listing.
    ensure!(l.first().map(|s| s.trim()) == Some("0 1 2 3"), "{out:?}");
    let direct = direct?;
    ensure!(direct == "0\n1\n2\n3\n", "the step's fds: {direct:?}");
    f.host_clean()
}

/// A small file behind a loop device, standing in for a host disk.
struct LoopDisk {
    dev: String,
    minor: u64,
    file: PathBuf,
    content: Vec<u8>,
}

const DISK_MARKER: &str = "KILN-HOST-DISK-CONTENT";

impl LoopDisk {
    fn new(dir: &Path) -> Result<LoopDisk, String> {
        let file = dir.join("disk.img");
        let content = DISK_MARKER.as_bytes().repeat(65536 / DISK_MARKER.len() + 1);
        fs::write(&file, &content).map_err(|e| e.to_string())?;
        // Concurrent `losetup -f` may race for the same free device.
        let mut last = String::new();
        for _ in 0..10 {
            let o = Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&file)
                .output()
                .map_err(|e| format!("losetup: {e}"))?;
            if o.status.success() {
                let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
                let st = nix::sys::stat::stat(dev.as_str()).map_err(|e| e.to_string())?;
                let disk = LoopDisk {
                    minor: libc::minor(st.st_rdev) as u64,
                    dev,
                    file,
                    content,
                };
                ensure!(
                    libc::major(st.st_rdev) == 7,
                    "{} is not a loop device",
                    disk.dev
                );
                return Ok(disk);
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("losetup failed: {last}"))
    }

    /// Detach and check that nothing was written to the disk.
    fn detach_and_check(mut self) -> TestResult {
        self.detach();
        let now = fs::read(&self.file).map_err(|e| e.to_string())?;
        ensure!(now == self.content, "the host disk was written to");
        Ok(())
    }

    fn detach(&mut self) {
        if !self.dev.is_empty() {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
            self.dev.clear();
        }
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        self.detach();
    }
}

/// A script that makes a node of the loop disk in each of `dirs`, reads and
/// writes it, and checks that the allowed nodes work.
fn device_probe_script(minor: u64, dirs: &[&str]) -> String {
    let mut s = String::new();
    for d in dirs {
        s.push_str(&format!(
            "mknod {d}/kdisk b 7 {minor} && echo 'mknod {d} ok'; \
             head -c 64 {d}/kdisk 2>&1; echo \"read {d} rc=$?\"; \
             dd if=/dev/zero of={d}/kdisk bs=512 count=1 conv=notrunc 2>&1; echo \"write {d} rc=$?\"; \
             rm -f {d}/kdisk; "
        ));
    }
    s.push_str(
        "echo x > /dev/null && head -c 3 /dev/zero | wc -c && head -c 3 /dev/urandom | wc -c && \
         exec 3<>/dev/ptmx && echo allowed-ok",
    );
    s
}

/// Checks the probe's output: every mknod worked, no read or write did.
fn check_probe(out: &str, dirs: &[&str]) -> TestResult {
    ensure!(!out.contains(DISK_MARKER), "host disk read: {out:?}");
    for d in dirs {
        ensure!(
            out.contains(&format!("mknod {d} ok")),
            "mknod in {d} failed: {out:?}"
        );
        for op in ["read", "write"] {
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("{op} {d} rc=")))
                .ok_or_else(|| format!("no {op} {d} line: {out:?}"))?;
            ensure!(!line.ends_with("rc=0"), "{op} in {d} worked: {out:?}");
        }
    }
    ensure!(out.contains("Permission denied"), "{out:?}");
    ensure!(
        out.contains("3\n3\nallowed-ok"),
        "allowed nodes broken: {out:?}"
    );
    Ok(())
}

const PROBE_DIRS: &[&str] = &["/dev", "/tmp", "/cache", "/scratch"];

/// A request for the device probe, with a writable bind mount of a host
/// directory (what a cache mount is) and a tmpfs asking for nothing but
/// nosuid.
fn device_probe_request(
    tmp: &Path,
    rootfs: RootfsMount,
    minor: u64,
) -> Result<ExecRequest, String> {
    let cache = tmp.join("cache-dir");
    fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
    let mut spec = default_spec(vec![
        "/bin/sh".into(),
        "-c".into(),
        device_probe_script(minor, PROBE_DIRS),
    ]);
    let mounts = vec![
        kiln_executor::oci::MountBuilder::default()
            .destination("/cache")
            .typ("bind")
            .source(&cache)
            .options(vec!["rbind".to_string(), "rw".to_string()])
            .build()
            .map_err(|e| e.to_string())?,
        kiln_executor::oci::MountBuilder::default()
            .destination("/scratch")
            .typ("tmpfs")
            .source("tmpfs")
            .options(vec!["nosuid".to_string()])
            .build()
            .map_err(|e| e.to_string())?,
    ];
    spec.set_mounts(Some(mounts));
    Ok(ExecRequest::new("RUN probe devices", spec, vec![rootfs]))
}

/// On the host's own cgroup layout: a mknod'ed host disk opens nowhere.
fn host_devices_unreachable() -> TestResult {
    let f = Fixture::new()?;
    let disk = LoopDisk::new(f.tmp.path())?;
    let out = f.stdout(device_probe_request(f.tmp.path(), f.overlay(), disk.minor)?)?;
    check_probe(&out, PROBE_DIRS)?;
    disk.detach_and_check()?;
    f.host_clean()
}

/// The same with the cgroup hierarchies hidden in a private mount
/// namespace: v1 hierarchies gone (a cgroup-v2-only host), and everything
/// gone (no cgroups at all). Steps still run (without limits) and the
/// disk still cannot be opened.
fn host_devices_unreachable_without_cgroups() -> TestResult {
    let f = Fixture::new()?;
    let disk = LoopDisk::new(f.tmp.path())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    for mode in ["v2only", "none"] {
        let o = Command::new(&exe)
            .arg("__hidden_cgroups_child")
            .arg(mode)
            .arg(f.tmp.path())
            .arg(disk.minor.to_string())
            .output()
            .map_err(|e| e.to_string())?;
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        ensure!(o.status.success(), "{mode}: child failed: {out}\n{err}");
        check_probe(&out, PROBE_DIRS).map_err(|e| format!("{mode}: {e}\n{err}"))?;
    }
    disk.detach_and_check()?;
    f.host_clean()
}

/// Child mode: hide cgroups as `mode` says in a private mount namespace,
/// then run the device probe and print its output.
fn hidden_cgroups_child(mode: &str, dir: &Path, minor: u64) -> ! {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let fail = |m: String| -> ! {
        eprintln!("{m}");
        std::process::exit(1)
    };
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS) {
        fail(format!("unshare: {e}"));
    }
    let none = None::<&str>;
    if let Err(e) = mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none) {
        fail(format!("rprivate: {e}"));
    }
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    match mode {
        "v2only" => {
            for l in info.lines() {
                let Some((pre, post)) = l.split_once(" - ") else {
                    continue;
                };
                if post.starts_with("cgroup ") {
                    if let Some(mp) = pre.split(' ').nth(4) {
                        if let Err(e) = umount2(mp, MntFlags::MNT_DETACH) {
                            fail(format!("umount {mp}: {e}"));
                        }
                    }
                }
            }
        }
        _ => {
            if let Err(e) = mount(
                Some("tmpfs"),
                "/sys/fs/cgroup",
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                none,
            ) {
                fail(format!("tmpfs over /sys/fs/cgroup: {e}"));
            }
        }
    }
    let left = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" - cgroup"))
        .count();
    eprintln!("{mode}: {left} cgroup mounts still listed in mountinfo");
    let sub = dir.join(format!("child-{mode}"));
    let (upper, work) = (sub.join("upper"), sub.join("work"));
    for d in [&upper, &work] {
        if let Err(e) = fs::create_dir_all(d) {
            fail(e.to_string());
        }
    }
    let ex = Executor::new(ExecutorConfig {
        state_dir: dir.join("state"),
        cgroup_parent: format!("kiln-hidden-{mode}"),
        ..ExecutorConfig::default()
    });
    let rootfs = RootfsMount::overlay(&[dir.join("rootfs")], upper, work);
    let req = match device_probe_request(&sub, rootfs, minor) {
        Ok(r) => r,
        Err(e) => fail(e),
    };
    let rt = runtime();
    let r = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let collect = tokio::spawn(async move {
            let mut v = Vec::new();
            while let Some(l) = rx.recv().await {
                v.push(l);
            }
            v
        });
        let r = ex.run(req, Some(tx), CancellationToken::new()).await;
        (r, collect.await.unwrap_or_default())
    });
    match r {
        (Ok(o), lines) if o.status.success() => {
            print!("{}", text(&lines, Stream::Stdout));
            std::process::exit(0)
        }
        (r, lines) => fail(format!("{r:?}: {}", text(&lines, Stream::Stdout))),
    }
}

/// An inline file (a secret) is there with its mode and owner, read-only,
/// and leaves nothing in the layer, /dev or the state directory.
fn inline_file_placed_privately() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh(
        "stat -c '%a %u %g' /run/secrets/tok; cat /run/secrets/tok; echo; \
         grep ' /run/secrets/tok ' /proc/mounts | cut -d' ' -f4; \
         ls -a /dev | grep -c kiln; echo x > /run/secrets/tok 2>/dev/null || echo read-only",
    );
    req.files.push(kiln_executor::InlineFile {
        destination: PathBuf::from("/run/secrets/tok"),
        contents: b"INLINE-SECRET-VALUE".to_vec(),
        mode: 0o440,
        uid: 1000,
        gid: 50,
    });
    let dbg = format!("{req:?}");
    ensure!(
        !dbg.contains("INLINE-SECRET-VALUE"),
        "Debug shows the value"
    );
    let out = f.stdout(req)?;
    let l: Vec<&str> = out.lines().collect();
    ensure!(l.first() == Some(&"440 1000 50"), "{out:?}");
    ensure!(l.get(1) == Some(&"INLINE-SECRET-VALUE"), "{out:?}");
    let opts = l.get(2).copied().unwrap_or("");
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        ensure!(opts.split(',').any(|x| x == o), "mount options {opts:?}");
    }
    ensure!(l.get(3) == Some(&"0"), "staging left in /dev: {out:?}");
    ensure!(l.get(4) == Some(&"read-only"), "{out:?}");
    ensure!(
        f.upper_entries().is_empty(),
        "layer: {:?}",
        f.upper_entries()
    );
    f.host_clean()
}

/// A mount destination that climbs with `..` (`kiln run -v SRC:/../../x`
/// passes it through as given) gets its mount point inside the sandbox,
/// never on the host, for an overlay and a bind rootfs.
fn dotdot_mount_point_stays_in_the_root() -> TestResult {
    let f = Fixture::new()?;
    let escaped = f.tmp.path().join("escaped");
    let rel = escaped
        .strip_prefix("/")
        .map_err(|e| e.to_string())?
        .display()
        .to_string();
    let dest = format!("{}/{rel}/mnt", "/..".repeat(30));
    let inside = format!("/{rel}/mnt");
    for bind in [false, true] {
        let mut req = f.sh(&format!(
            "grep -c ' {inside} tmpfs ' /proc/mounts; test -d {inside} && echo dir"
        ));
        if bind {
            req.rootfs = vec![RootfsMount::bind(f.rootfs.clone())];
        }
        req.spec
            .set_mounts(Some(vec![kiln_executor::oci::MountBuilder::default()
                .destination(&dest)
                .typ("tmpfs")
                .source("tmpfs")
                .options(vec!["nosuid".to_string()])
                .build()
                .map_err(|e| e.to_string())?]));
        let out = f.stdout(req);
        ensure!(
            !escaped.exists(),
            "a mount point was made on the host (bind={bind})"
        );
        let out = out?;
        ensure!(out == "1\ndir\n", "bind={bind}: {out:?}");
    }
    ensure!(
        !f.rootfs.join(&rel).exists(),
        "stubs left in the bind rootfs"
    );
    f.host_clean()
}

/// Nothing is mounted inside the sandbox's procfs, by its path or through
/// a symlink to it: a step that chose what `/proc/sys/kernel/cap_last_cap`
/// says could keep capabilities (the bounding set is dropped in full
/// anyway: checked here with such a file in place at another path).
fn nothing_is_mounted_inside_proc() -> TestResult {
    let f = Fixture::new()?;
    let fake = f.tmp.path().join("fake-kernel");
    fs::create_dir_all(&fake).map_err(|e| e.to_string())?;
    fs::write(fake.join("cap_last_cap"), "0\n").map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink("/proc", f.upper.join("p")).map_err(|e| e.to_string())?;
    for dest in [
        "/proc/sys/kernel",
        "/p/sys/kernel",
        "/proc/self/../sys/kernel",
    ] {
        let mut req = f.sh("grep CapBnd /proc/self/status");
        req.spec
            .set_mounts(Some(vec![kiln_executor::oci::MountBuilder::default()
                .destination(dest)
                .typ("bind")
                .source(fake.to_string_lossy().into_owned())
                .options(vec!["rbind".to_string(), "ro".to_string()])
                .build()
                .map_err(|e| e.to_string())?]));
        let (r, lines) = f.run(req);
        match r {
            Err(e) => {
                let m = e.to_string();
                ensure!(m.contains("inside /proc"), "{dest}: {m}");
            }
            Ok(o) => {
                return Err(format!(
                    "{dest}: mounted inside /proc (status {}): {:?}",
                    o.status,
                    text(&lines, Stream::Stdout)
                ))
            }
        }
    }
    f.host_clean()
}

/// An image whose `/proc` is a symlink (here `/proc -> /dev/x -> /realproc`,
/// the middle link hidden by the sandbox's /dev once mounted) is refused:
/// followed, procfs would land at `/realproc`, out of reach of the masked
/// and read-only paths (`/realproc/sys` writable).
fn a_symlinked_proc_in_the_image_is_refused() -> TestResult {
    let f = Fixture::new()?;
    let bind_root = f.tmp.path().join("bind-root");
    let o = std::process::Command::new("cp")
        .arg("-a")
        .arg(&f.rootfs)
        .arg(&bind_root)
        .output()
        .map_err(|e| e.to_string())?;
    ensure!(
        o.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = fs::remove_dir(bind_root.join("proc"));
    fs::create_dir_all(bind_root.join("dev")).map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink("/dev/x", bind_root.join("proc")).map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink("/realproc", bind_root.join("dev/x")).map_err(|e| e.to_string())?;
    fs::create_dir_all(bind_root.join("realproc")).map_err(|e| e.to_string())?;
    let spec = default_spec(vec![
        "/bin/sh".into(),
        "-c".into(),
        "test -e /realproc/self && echo PROC-ESCAPED; echo ran".into(),
    ]);
    let req = ExecRequest::new(
        "RUN symlinked proc",
        spec,
        vec![RootfsMount::bind(bind_root)],
    );
    let (r, lines) = f.run(req);
    match r {
        Err(e) => {
            let m = e.to_string();
            ensure!(m.contains("/proc") && m.contains("symlink"), "{m}");
        }
        Ok(_) => {
            return Err(format!(
                "ran on a symlinked /proc: {:?}",
                text(&lines, Stream::Stdout)
            ))
        }
    }
    f.host_clean()
}

/// The step has a session of its own (runc's `setsid`): kiln's terminal,
/// if any, is never its controlling terminal. The sandbox's PID 1 (which
/// keeps its capabilities) is not dumpable: its /proc files are closed to
/// the step.
fn the_step_leads_its_own_session() -> TestResult {
    let f = Fixture::new()?;
    let out = f.stdout(f.sh("echo $$; cut -d' ' -f6 /proc/self/stat; \
         cat /proc/1/environ >/dev/null 2>&1 && echo PID1-READABLE; \
         readlink /proc/1/exe 2>/dev/null && echo PID1-EXE; true"))?;
    let v: Vec<&str> = out.lines().collect();
    ensure!(
        v.len() == 2 && v[0] == v[1],
        "session is not the step's, or PID 1 is open to it: {out:?}"
    );
    f.host_clean()
}

/// A state directory someone else owns, or others can write to (made
/// first in a shared /tmp), is refused before anything is written in it.
fn a_state_dir_of_another_user_is_refused() -> TestResult {
    let f = Fixture::new()?;
    for (uid, mode) in [(65534u32, 0o700u32), (0, 0o777)] {
        let planted = f.tmp.path().join(format!("planted-{uid}-{mode:o}"));
        fs::create_dir(&planted).map_err(|e| e.to_string())?;
        std::os::unix::fs::chown(&planted, Some(uid), Some(uid)).map_err(|e| e.to_string())?;
        fs::set_permissions(&planted, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|e| e.to_string())?;
        let ex = Executor::new(ExecutorConfig {
            state_dir: planted.clone(),
            ..ExecutorConfig::default()
        });
        let rt = runtime();
        let r = rt.block_on(ex.run(f.sh("true"), None, CancellationToken::new()));
        let m = match r {
            Err(e) => e.to_string(),
            Ok(_) => return Err(format!("ran with state dir {mode:o} of uid {uid}")),
        };
        ensure!(m.contains("refused"), "{m}");
        let left: Vec<_> = fs::read_dir(&planted).map_err(|e| e.to_string())?.collect();
        ensure!(left.is_empty(), "wrote into the planted directory");
    }
    f.host_clean()
}

fn bad_namespace_request_rejected() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh("true");
    if let Some(l) = req.spec.linux_mut() {
        let mut ns = l.namespaces().clone().unwrap_or_default();
        ns.extend(
            kiln_executor::oci::LinuxNamespaceBuilder::default()
                .typ(kiln_executor::oci::LinuxNamespaceType::User)
                .build()
                .ok(),
        );
        l.set_namespaces(Some(ns));
    }
    let (r, _) = f.run(req);
    ensure!(matches!(r, Err(Error::Request { .. })), "{r:?}");
    f.host_clean()
}

// ---------------------------------------------------------------- seccomp

fn ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Compile the syscall probe (`tests/data/syscall_probe.c`) statically into
/// the fixture's rootfs as `/bin/probe`. `Ok(false)` when there is no C
/// compiler outside CI (scripts/test.sh installs gcc and libc6-dev).
fn install_probe(f: &Fixture) -> Result<bool, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/syscall_probe.c");
    let out = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(f.rootfs.join("bin/probe"))
        .arg(&src)
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(true),
        Ok(o) => Err(format!(
            "cc -static {}: {} (install gcc and libc6-dev)",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !ci() => {
            println!("    (no C compiler: the syscall probe is not run)");
            Ok(false)
        }
        Err(e) => Err(format!("cc: {e} (install gcc and libc6-dev)")),
    }
}

/// A key in the host root user's keyring, invalidated on drop.
struct HostKey {
    id: libc::c_long,
    desc: String,
}

impl HostKey {
    fn add(payload: &str) -> Result<HostKey, String> {
        let desc = format!(
            "kiln-test-secret-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        );
        let c_desc = std::ffi::CString::new(desc.clone()).map_err(|e| e.to_string())?;
        // SAFETY: add_key with valid strings and a payload of the given size.
        let id = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                c"user".as_ptr(),
                c_desc.as_ptr(),
                payload.as_ptr(),
                payload.len(),
                -4 as libc::c_long, // KEY_SPEC_USER_KEYRING
            )
        };
        ensure!(
            id >= 0,
            "add_key on the host: {}",
            std::io::Error::last_os_error()
        );
        Ok(HostKey { id, desc })
    }
}

impl Drop for HostKey {
    fn drop(&mut self) {
        // SAFETY: KEYCTL_INVALIDATE (21) of a key we created.
        unsafe { libc::syscall(libc::SYS_keyctl, 21 as libc::c_long, self.id) };
    }
}

fn host_session_keyring() -> libc::c_long {
    // SAFETY: KEYCTL_GET_KEYRING_ID (0) of KEY_SPEC_SESSION_KEYRING (-3).
    unsafe { libc::syscall(libc::SYS_keyctl, 0 as libc::c_long, -3 as libc::c_long, 0) }
}

fn unconfined(req: &mut ExecRequest) {
    if let Some(l) = req.spec.linux_mut() {
        l.set_seccomp(None);
    }
}

fn seccomp_mode_and_namespaces_denied() -> TestResult {
    let f = Fixture::new()?;
    let script = "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; \
                  unshare -U true 2>/dev/null && echo userns-created; \
                  unshare -n true 2>/dev/null && echo netns-created; \
                  unshare -m true 2>/dev/null && echo mntns-created; \
                  echo done";
    let out = f.stdout(f.sh(script))?;
    for want in ["Seccomp:\t2", "NoNewPrivs:\t0", "done"] {
        ensure!(out.contains(want), "missing {want:?} in {out:?}");
    }
    ensure!(!out.contains("created"), "a namespace was created: {out:?}");
    // A non-root user too.
    let mut req = f.sh("grep '^Seccomp:' /proc/self/status");
    req.user = Some("nobody".into());
    let out = f.stdout(req)?;
    ensure!(out.contains("Seccomp:\t2"), "{out:?}");
    // With no_new_privs the filter goes on just before exec.
    let mut req = f.sh("grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status");
    if let Some(p) = req.spec.process_mut() {
        p.set_no_new_privileges(Some(true));
    }
    let out = f.stdout(req)?;
    ensure!(
        out.contains("Seccomp:\t2") && out.contains("NoNewPrivs:\t1"),
        "{out:?}"
    );
    // Without the spec's seccomp section: unconfined.
    let mut req = f.sh("grep '^Seccomp:' /proc/self/status");
    unconfined(&mut req);
    let out = f.stdout(req)?;
    ensure!(out.contains("Seccomp:\t0"), "{out:?}");
    f.host_clean()
}

fn seccomp_denies_docker_denials_and_keyring_is_fresh() -> TestResult {
    let f = Fixture::new()?;
    if !install_probe(&f)? {
        return Ok(());
    }
    let key = HostKey::add("hunter2")?;
    // A build step's flushes are answered without running (no EBADF for
    // a bad descriptor); `kiln run`'s (the default) reach the kernel.
    let mut build_step = f.req(&["/bin/probe", &key.desc]);
    build_step.skip_flushes = true;
    let out = f.stdout(build_step)?;
    ensure!(
        !out.contains("hunter2"),
        "the step read the host root user's keyring: {out:?}"
    );
    for want in [
        "keyctl-search-user errno=1",
        "keyctl-session errno=1",
        "add_key errno=1",
        "request_key errno=1",
        "socket-vsock errno=1",
        "socket-alg errno=1",
        // On the host's network: no link-level sniffing, no raw IP
        // sockets (a raw TCP socket gets a copy of every TCP segment the
        // host receives), no obsolete SOCK_PACKET; netlink and ordinary
        // sockets as usual.
        "socket-packet errno=1",
        "socket-inet-raw errno=1",
        "socket-inet6-raw errno=1",
        "socket-inet-packet errno=1",
        "socket-inet-dgram ok",
        "socket-netlink-raw ok",
        "socket-inet ok",
        "socket-unix ok",
        "unshare-user errno=1",
        "unshare-net errno=1",
        "clone-newuser errno=1",
        "fork ok",
        // ENOSYS, so that libc falls back to clone(2).
        "clone3 errno=38",
        "bpf errno=1",
        "perf_event_open errno=1",
        "personality-query ok",
        "personality-read-implies-exec errno=1",
        "fsync-badfd ok",
        "fdatasync-badfd ok",
        "syncfs-badfd ok",
        "sync_file_range-badfd ok",
    ] {
        ensure!(
            out.lines().any(|l| l == want),
            "missing {want:?} in {out:?}"
        );
    }
    // In a network namespace of its own a step may open packet sockets
    // (Docker's rule; CAP_NET_RAW is in the default set). Not a build
    // step: its flushes run.
    let mut req = f.req(&["/bin/probe", &key.desc]);
    set_network(&mut req.spec, NetworkMode::None);
    let out = f.stdout(req)?;
    ensure!(
        out.lines().any(|l| l == "socket-packet ok")
            && out.lines().any(|l| l == "socket-inet-raw ok")
            && out.lines().any(|l| l == "socket-vsock errno=1")
            && out.lines().any(|l| l == "fsync-badfd errno=9")
            && !out.contains("hunter2"),
        "{out:?}"
    );
    // Unconfined, the step still has a session keyring of its own.
    let mut req = f.req(&["/bin/probe", &key.desc]);
    unconfined(&mut req);
    let out = f.stdout(req)?;
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("session-id "))
        .ok_or_else(|| format!("no session keyring id in {out:?}"))?;
    ensure!(
        id != host_session_keyring().to_string(),
        "the step shares kiln's session keyring {id}: {out:?}"
    );
    ensure!(
        out.lines()
            .any(|l| l.starts_with("session-describe ") && l.ends_with(";_ses")),
        "the session keyring is not a fresh anonymous one: {out:?}"
    );
    ensure!(
        out.contains("clone3 errno=14") || out.contains("clone3 errno=22"),
        "unconfined clone3 should reach the kernel: {out:?}"
    );
    ensure!(
        out.lines().any(|l| l == "fsync-badfd errno=9"),
        "unconfined fsync should reach the kernel: {out:?}"
    );
    drop(key);
    f.host_clean()
}

fn custom_seccomp_profile_refused() -> TestResult {
    let f = Fixture::new()?;
    let mut req = f.sh("true");
    if let Some(l) = req.spec.linux_mut() {
        let mut s = kiln_executor::default_seccomp();
        s.set_default_action(kiln_executor::oci::LinuxSeccompAction::ScmpActAllow);
        l.set_seccomp(Some(s));
    }
    let (r, _) = f.run(req);
    ensure!(
        matches!(&r, Err(Error::Request { .. }))
            && format!("{r:?}").to_lowercase().contains("seccomp"),
        "{r:?}"
    );
    f.host_clean()
}

// ---------------------------------------------------------------- harness

type TestFn = fn() -> TestResult;

const TESTS: &[(&str, TestFn)] = &[
    ("exit_code_and_streams", exit_code_and_streams),
    (
        "signals_start_at_their_defaults",
        signals_start_at_their_defaults,
    ),
    ("signal_reported", signal_reported),
    (
        "a_forwarded_signal_runs_the_step_s_trap",
        a_forwarded_signal_runs_the_step_s_trap,
    ),
    (
        "a_forwarded_signal_kills_a_step_without_a_handler",
        a_forwarded_signal_kills_a_step_without_a_handler,
    ),
    (
        "a_signal_sent_at_once_waits_for_the_step",
        a_signal_sent_at_once_waits_for_the_step,
    ),
    (
        "signals_that_are_not_forwarded_are_ignored",
        signals_that_are_not_forwarded_are_ignored,
    ),
    ("exec_form_without_shell", exec_form_without_shell),
    (
        "output_streamed_in_order_and_tail_kept",
        output_streamed_in_order_and_tail_kept,
    ),
    ("long_line_is_split", long_line_is_split),
    (
        "upperdir_holds_only_the_commands_writes",
        upperdir_holds_only_the_commands_writes,
    ),
    ("provided_etc_files", provided_etc_files),
    ("pid1_is_init_and_reaps", pid1_is_init_and_reaps),
    ("capabilities_docker_default", capabilities_docker_default),
    ("no_new_privs_when_asked", no_new_privs_when_asked),
    ("sys_readonly_proc_masked", sys_readonly_proc_masked),
    ("dev_has_the_minimal_nodes", dev_has_the_minimal_nodes),
    ("network_none_has_only_lo", network_none_has_only_lo),
    (
        "namespaces_are_fresh_except_the_host_network",
        namespaces_are_fresh_except_the_host_network,
    ),
    ("user_forms_resolve_in_rootfs", user_forms_resolve_in_rootfs),
    (
        "unknown_user_is_a_clear_error",
        unknown_user_is_a_clear_error,
    ),
    (
        "missing_executable_is_a_clear_error",
        missing_executable_is_a_clear_error,
    ),
    (
        "workdir_created_or_clear_error",
        workdir_created_or_clear_error,
    ),
    (
        "rlimits_applied_within_hard_limit",
        rlimits_applied_within_hard_limit,
    ),
    ("memory_limit_enforced", memory_limit_enforced),
    ("pids_limit_enforced", pids_limit_enforced),
    ("cpu_quota_accepted", cpu_quota_accepted),
    (
        "background_process_killed_with_step",
        background_process_killed_with_step,
    ),
    ("timeout_kills_the_tree", timeout_kills_the_tree),
    ("cancellation_kills_the_tree", cancellation_kills_the_tree),
    (
        "sigkill_of_kiln_takes_the_sandbox_down",
        sigkill_of_kiln_takes_the_sandbox_down,
    ),
    ("bind_rootfs_leaves_no_stubs", bind_rootfs_leaves_no_stubs),
    ("devices_restricted", devices_restricted),
    ("step_cgroups_removed", step_cgroups_removed),
    (
        "threads_leave_the_step_cgroups",
        threads_leave_the_step_cgroups,
    ),
    (
        "signals_forwarded_to_the_step",
        signals_forwarded_to_the_step,
    ),
    (
        "bad_namespace_request_rejected",
        bad_namespace_request_rejected,
    ),
    (
        "inherited_fds_do_not_reach_the_step",
        inherited_fds_do_not_reach_the_step,
    ),
    ("host_devices_unreachable", host_devices_unreachable),
    (
        "host_devices_unreachable_without_cgroups",
        host_devices_unreachable_without_cgroups,
    ),
    ("inline_file_placed_privately", inline_file_placed_privately),
    (
        "dotdot_mount_point_stays_in_the_root",
        dotdot_mount_point_stays_in_the_root,
    ),
    (
        "seccomp_mode_and_namespaces_denied",
        seccomp_mode_and_namespaces_denied,
    ),
    (
        "seccomp_denies_docker_denials_and_keyring_is_fresh",
        seccomp_denies_docker_denials_and_keyring_is_fresh,
    ),
    (
        "custom_seccomp_profile_refused",
        custom_seccomp_profile_refused,
    ),
    (
        "nothing_is_mounted_inside_proc",
        nothing_is_mounted_inside_proc,
    ),
    (
        "a_symlinked_proc_in_the_image_is_refused",
        a_symlinked_proc_in_the_image_is_refused,
    ),
    (
        "the_step_leads_its_own_session",
        the_step_leads_its_own_session,
    ),
    (
        "a_state_dir_of_another_user_is_refused",
        a_state_dir_of_another_user_is_refused,
    ),
];

fn main() {
    kiln_executor::maybe_run_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__pdeathsig_child") {
        let dir = PathBuf::from(args.get(1).cloned().unwrap_or_default());
        let parent = args.get(2).cloned().unwrap_or_else(|| "kiln".into());
        pdeathsig_child(&dir, &parent);
    }
    if args.first().map(String::as_str) == Some("__thread_cgroups_child") {
        let dir = PathBuf::from(args.get(1).cloned().unwrap_or_default());
        let parent = args.get(2).cloned().unwrap_or_else(|| "kiln".into());
        thread_cgroups_child(&dir, &parent);
    }
    if args.first().map(String::as_str) == Some("__hidden_cgroups_child") {
        let mode = args.get(1).cloned().unwrap_or_default();
        let dir = PathBuf::from(args.get(2).cloned().unwrap_or_default());
        let minor = args.get(3).and_then(|m| m.parse().ok()).unwrap_or(0);
        hidden_cgroups_child(&mode, &dir, minor);
    }
    let list = args.iter().any(|a| a == "--list");
    let exact = args.iter().any(|a| a == "--exact");
    let ignored = args.iter().any(|a| a == "--ignored");
    let mut filters = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--format" | "--test-threads" | "--color" | "-Z" | "--logfile" | "--skip" => {
                it.next();
            }
            s if s.starts_with('-') => {}
            s => filters.push(s.to_string()),
        }
    }
    let selected: Vec<&(&str, TestFn)> = TESTS
        .iter()
        .filter(|(n, _)| {
            filters.is_empty()
                || filters.iter().any(|f| {
                    if exact {
                        n == f
                    } else {
                        n.contains(f.as_str())
                    }
                })
        })
        .collect();
    if list {
        if !ignored {
            for (n, _) in &selected {
                println!("{n}: test");
            }
        }
        return;
    }
    if ignored {
        println!("\ntest result: ok. 0 passed; 0 failed; 0 ignored");
        return;
    }
    let ci = std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false);
    if busybox().is_none() || !nix::unistd::Uid::effective().is_root() {
        let why = if busybox().is_none() {
            "busybox (Debian busybox-static) is not installed"
        } else {
            "these tests need root"
        };
        if ci {
            eprintln!("FAILED: {why}; the sandbox tests cannot run (CI=true)");
            std::process::exit(1);
        }
        println!("sandbox tests not run: {why}");
        return;
    }
    println!("\nrunning {} tests", selected.len());
    let start = Instant::now();
    // A few at a time: the machine is small and shared.
    let queue = std::sync::Mutex::new(selected.iter());
    let out = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let next = queue.lock().ok().and_then(|mut q| q.next());
                let Some((name, f)) = next else { break };
                let t = Instant::now();
                let r = std::panic::catch_unwind(f).unwrap_or_else(|_| Err("panicked".to_string()));
                let d = t.elapsed();
                match &r {
                    Ok(()) => println!("test {name} ... ok ({:.2}s)", d.as_secs_f64()),
                    Err(e) => println!("test {name} ... FAILED ({:.2}s)\n    {e}", d.as_secs_f64()),
                }
                if let Ok(mut o) = out.lock() {
                    o.push((name.to_string(), r, d));
                }
            });
        }
    });
    let results: Vec<(String, TestResult, Duration)> = out.into_inner().unwrap_or_default();
    let failed: Vec<&(String, TestResult, Duration)> =
        results.iter().filter(|(_, r, _)| r.is_err()).collect();
    let passed = results.len() - failed.len();
    if !failed.is_empty() {
        println!("\nfailures:");
        for (n, r, _) in &failed {
            println!("    {n}: {}", r.as_ref().err().cloned().unwrap_or_default());
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; finished in {:.2}s",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        start.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        std::process::exit(101);
    }
}
