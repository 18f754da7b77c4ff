//! `kiln run` passes the signals it receives on to the application, as
//! `docker run` (`--sig-proxy=true`) does, and exits with the
//! application's status: a trapped SIGTERM/SIGINT/SIGHUP/… runs the trap,
//! an untrapped one kills the application by its default action (it is the
//! child of kiln's init, as under `docker run --init`: 128+N), an ignored
//! one changes nothing, and the third SIGINT/SIGTERM kills the container.
//! Whatever happens, nothing is left: processes, mounts, the step's
//! cgroup and state directory.

mod common;

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::{prerequisites, Kiln};

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Step cgroups (named `<kiln pid>-…`) of the kiln process `pid` that are
/// still there.
fn cgroups_of(pid: u32) -> Vec<String> {
    let out = std::process::Command::new("find")
        .args(["/sys/fs/cgroup", "-maxdepth", "8", "-type", "d", "-name"])
        .arg(format!("{pid}-*"))
        .stderr(Stdio::null())
        .output()
        .expect("find");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// A running `kiln run` with its output lines (stdout and stderr, in
/// arrival order per stream) coming through a channel.
struct Running {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    /// `kiln run --rm busybox ARGS…`, in a process group of its own when
    /// `own_group` (as a shell puts a foreground job, so that the test can
    /// signal the group as a terminal's Ctrl-C does).
    fn start(k: &Kiln, args: &[&str], own_group: bool) -> Running {
        let mut cmd = k.cmd();
        cmd.args(["run", "--rm", "busybox"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if own_group {
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().expect("spawn kiln");
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {l}"));
            }
        });
        Running {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (up to 30 s) for an output line equal to `line`.
    fn wait_for(&mut self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    let hit = l == line;
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!("no line {line:?} within 30 s:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits (up to `within`) for kiln to exit; returns its status and all
    /// its output.
    fn finish(mut self, within: Duration) -> (ExitStatus, String) {
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if t.elapsed() > within {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.seen.extend(self.lines.try_iter());
                panic!(
                    "kiln run did not exit within {within:?}:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The readers end when kiln's pipes close.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        (status, self.seen.join("\n"))
    }
}

/// Nothing of a `kiln run` (kiln's pid `pid`, a process whose command line
/// holds `needle`) is left: processes, host mounts of the store, its step
/// cgroups, its executor state.
fn assert_clean(k: &Kiln, pid: u32, needle: &str) {
    let t = Instant::now();
    while !processes_with(needle).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{needle:?} outlived kiln run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let root = k.root.path().to_str().expect("utf-8");
    assert_eq!(common::host_mounts_with(root), Vec::<String>::new());
    assert_eq!(cgroups_of(pid), Vec::<String>::new(), "cgroups left");
    let state = k.root.path().join("tmp/executor");
    let left: Vec<_> = std::fs::read_dir(&state)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "executor state left: {left:?}");
    k.ok(&["system", "check"]);
}

/// A shell app that traps `name`, says `ready`, and on the signal prints
/// `got NAME` and exits with `code`.
fn trapping_app(name: &str, code: u8, tag: &str) -> String {
    format!(
        "trap 'echo got {name}; exit {code}' {name}; echo ready; \
         while :; do sleep 0.1; done; : {tag}"
    )
}

/// Sends `sig` (named `name`) to `kiln run` of an app that traps it:
/// the trap runs and kiln exits with the app's status.
fn trapped_signal_reaches_the_app(sig: libc::c_int, name: &str, code: u8) {
    let k = Kiln::with_busybox();
    let tag = format!("trap-{name}-{}", std::process::id());
    let mut r = Running::start(&k, &["sh", "-c", &trapping_app(name, code, &tag)], false);
    let pid = r.child.id();
    r.wait_for("ready");
    r.signal(sig);
    let (status, out) = r.finish(Duration::from_secs(15));
    assert!(
        out.lines().any(|l| l == format!("got {name}")),
        "the app never saw {name}:\n{out}"
    );
    assert_eq!(status.code(), Some(code.into()), "{out}");
    assert!(!out.contains("Error"), "{out}");
    assert_clean(&k, pid, &tag);
}

#[test]
fn sigterm_reaches_the_app_and_kiln_run_exits_with_its_status() {
    if !prerequisites() {
        return;
    }
    trapped_signal_reaches_the_app(libc::SIGTERM, "TERM", 3);
}

#[test]
fn sigint_reaches_the_app_and_kiln_run_exits_with_its_status() {
    if !prerequisites() {
        return;
    }
    trapped_signal_reaches_the_app(libc::SIGINT, "INT", 4);
}

#[test]
fn sighup_sigquit_sigusr1_sigusr2_reach_the_app() {
    if !prerequisites() {
        return;
    }
    for (sig, name, code) in [
        (libc::SIGHUP, "HUP", 5),
        (libc::SIGQUIT, "QUIT", 6),
        (libc::SIGUSR1, "USR1", 7),
        (libc::SIGUSR2, "USR2", 8),
    ] {
        trapped_signal_reaches_the_app(sig, name, code);
    }
}

/// The app is not PID 1 (kiln's init is): a signal it has no handler for
/// kills it by its default action, and kiln exits 128+N, as `docker run
/// --init` does.
#[test]
fn an_untrapped_sigterm_kills_the_app_and_kiln_run_exits_143() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let secs = format!("4{}", std::process::id());
    let needle = format!("sleep {secs}");
    let r = Running::start(&k, &["sleep", &secs], false);
    let pid = r.child.id();
    let t = Instant::now();
    // kiln's own command line holds the needle too.
    while processes_with(&needle).iter().all(|p| *p as u32 == pid) {
        assert!(t.elapsed() < Duration::from_secs(30), "sleep never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    r.signal(libc::SIGTERM);
    let (status, out) = r.finish(Duration::from_secs(15));
    assert_eq!(status.code(), Some(143), "{out}");
    assert!(!out.contains("Error"), "{out}");
    assert_clean(&k, pid, &needle);
}

/// An app that ignores SIGTERM keeps running; kiln keeps waiting and
/// returns its status when it ends on its own.
#[test]
fn an_ignored_sigterm_changes_nothing_and_kiln_run_waits() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let tag = format!("ignore-{}", std::process::id());
    let script = format!("trap '' TERM; echo ready; sleep 1; echo still here; exit 9; : {tag}");
    let mut r = Running::start(&k, &["sh", "-c", &script], false);
    let pid = r.child.id();
    r.wait_for("ready");
    r.signal(libc::SIGTERM);
    let (status, out) = r.finish(Duration::from_secs(15));
    assert!(out.lines().any(|l| l == "still here"), "{out}");
    assert_eq!(status.code(), Some(9), "{out}");
    assert_clean(&k, pid, &tag);
}

/// Hostile image: an app that ignores every signal it can. The third
/// SIGINT/SIGTERM kills the container (status 137, like `docker kill`),
/// and kiln still cleans up.
#[test]
fn the_third_interrupt_kills_an_app_that_ignores_them_all() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let tag = format!("deaf-{}", std::process::id());
    let script = format!(
        "trap '' INT TERM HUP QUIT USR1 USR2 WINCH ALRM; echo ready; \
         while :; do sleep 0.1; done; : {tag}"
    );
    let mut r = Running::start(&k, &["sh", "-c", &script], false);
    let pid = r.child.id();
    r.wait_for("ready");
    for sig in [libc::SIGINT, libc::SIGTERM] {
        r.signal(sig);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            r.child.try_wait().expect("wait").is_none(),
            "kiln run ended before the third interrupt"
        );
    }
    r.signal(libc::SIGINT);
    let (status, out) = r.finish(Duration::from_secs(15));
    assert_eq!(status.code(), Some(137), "{out}");
    assert!(out.contains("killing the container"), "{out}");
    assert_clean(&k, pid, &tag);
}

/// A terminal's Ctrl-C signals the whole foreground process group: the
/// sandbox is not in kiln's group, so the app gets it through kiln only
/// (and kiln's count of interrupts is the whole story).
#[test]
fn ctrl_c_to_the_process_group_reaches_the_app_once() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let tag = format!("group-{}", std::process::id());
    let script = format!(
        "n=0; trap 'n=$((n+1))' INT; echo ready; i=0; \
         while [ $i -lt 15 ]; do sleep 0.1; i=$((i+1)); done; echo ints=$n; : {tag}"
    );
    let mut r = Running::start(&k, &["sh", "-c", &script], true);
    let pid = r.child.id();
    r.wait_for("ready");
    // The sandbox is not in kiln's group: only kiln hears the terminal.
    let app: Vec<i32> = processes_with(&tag)
        .into_iter()
        .filter(|p| *p as u32 != pid)
        .collect();
    assert!(!app.is_empty(), "the app is not running");
    for p in app {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let pgrp = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2))
            .and_then(|g| g.parse::<u32>().ok());
        assert!(
            pgrp.is_some_and(|g| g != pid),
            "process {p} is in kiln's group ({pgrp:?})"
        );
    }
    // SAFETY: the group is kiln's own (process_group(0)), not ours.
    assert_eq!(unsafe { libc::kill(-(pid as i32), libc::SIGINT) }, 0);
    let (status, out) = r.finish(Duration::from_secs(15));
    assert!(out.lines().any(|l| l == "ints=1"), "{out}");
    assert_eq!(status.code(), Some(0), "{out}");
    assert_clean(&k, pid, &tag);
}

/// `--init` is accepted (docker's flag): kiln always runs an init.
#[test]
fn run_accepts_docker_s_init_flag() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let out = k.ok(&["run", "--rm", "--init", "busybox", "sh", "-c", "echo $$"]);
    assert_ne!(out.trim(), "1", "the app is not PID 1");
}

/// `kiln run -it` follows its terminal's window size, as `docker run -t`
/// does: kiln runs on a pseudo-terminal of the test's (its controlling
/// terminal), the test resizes it (the kernel sends kiln SIGWINCH), and
/// `stty size` inside the container reports the new size.
#[test]
fn run_tty_follows_the_window_size() {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let (mut master, slave) = {
        let (mut m, mut s) = (-1, -1);
        let ws = libc::winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty fills two descriptors, which we own from here.
        let r =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        unsafe { (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
    };
    let mut cmd = k.cmd();
    cmd.args(["run", "--rm", "-it", "busybox", "sh", "-c"])
        .arg("stty size; read x; stty size; echo done")
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave.try_clone().expect("dup")));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn kiln");
    drop(slave);
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = master.try_clone().expect("dup master");
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // EIO once kiln and the container have closed the slave.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !seen.contains(what) {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("no {what:?} within 30 s:\n{seen}"),
            }
        }
    };
    wait_for("24 80");
    let ws = libc::winsize {
        ws_row: 50,
        ws_col: 132,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ on our master; the kernel signals kiln (the
    // foreground process group of the slave).
    assert_eq!(
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
    // Kiln handles the SIGWINCH asynchronously: give it a moment before
    // the application reads the size again.
    std::thread::sleep(Duration::from_millis(500));
    master.write_all(b"\n").expect("write to the terminal");
    wait_for("done");
    let status = child.wait().expect("wait kiln");
    let sizes: Vec<&str> = seen
        .lines()
        .map(str::trim)
        .filter(|l| l.split(' ').count() == 2 && l.split(' ').all(|n| n.parse::<u32>().is_ok()))
        .collect();
    assert_eq!(sizes, ["24 80", "50 132"], "{seen}");
    assert!(status.success(), "{seen}");
}
