//! The store under stress from whole builds: several kiln processes
//! building on one root at once, and kiln SIGKILLed at random moments of a
//! build, ten times in a row.

mod common;

use std::time::{Duration, Instant};

use common::{context, prerequisites, Kiln};

#[test]
fn four_builds_at_once_on_one_root_all_succeed() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctxs: Vec<_> = (0..4)
        .map(|i| {
            context(&[
                (
                    "Dockerfile",
                    &format!(
                        "FROM busybox\nRUN echo shared > /shared\nCOPY f /f\nRUN echo {i} > /n && sleep 0.2\n"
                    ),
                ),
                ("f", &"x".repeat(100_000 + i)),
            ])
        })
        .collect();
    let children: Vec<_> = ctxs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            k.cmd()
                .args(["build", "-q", "-t", &format!("par:{i}")])
                .arg(c.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn kiln")
        })
        .collect();
    for (i, ch) in children.into_iter().enumerate() {
        let o = ch.wait_with_output().expect("wait");
        assert!(
            o.status.success(),
            "build {i} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    for i in 0..4 {
        assert_eq!(
            k.ok(&["run", &format!("par:{i}"), "cat", "/n"]),
            format!("{i}\n")
        );
    }
    let o = k.run(&["system", "check"]);
    assert!(
        o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr)
    );
}

/// A small deterministic generator (no rand dependency).
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn sigkill_during_builds_ten_times_leaves_a_store_that_checks_clean() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\nCOPY big /big\nRUN sleep 0.1 && cp /big /big2\nARG N\nRUN echo $N > /n && sleep 0.2\nCOPY small /small\nRUN cat /small >> /n\n",
        ),
        ("big", &"0123456789abcdef".repeat(256 * 1024)),
        ("small", "s"),
    ]);
    // Time a full uncached build to spread the kills over it.
    let t = Instant::now();
    k.build(ctx.path(), &["--build-arg", "N=warm", "-t", "kill:ok"]);
    let full = t.elapsed().as_millis().max(200) as u64;
    let before = k.inspect("kill:ok")["Id"].clone();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..10 {
        let mut child = k
            .cmd()
            .args(["build", "-q", "-t", "kill:ok", "--build-arg"])
            .arg(format!("N={round}"))
            .arg(ctx.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        let delay = next(&mut seed) % full;
        std::thread::sleep(Duration::from_millis(delay));
        // SIGKILL: no chance to clean up.
        let _ = child.kill();
        let _ = child.wait();
        let o = k.run(&["system", "check"]);
        assert!(
            o.status.success(),
            "round {round} (kill after {delay} ms): check failed:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            common::host_mounts_with(k.root.path().to_str().unwrap_or("?")).is_empty(),
            "round {round}: mounts left on the host"
        );
    }
    // The tag is either the old image or a complete new one.
    let now = k.inspect("kill:ok")["Id"].clone();
    assert!(
        now.is_string()
            && (now == before || now.as_str().is_some_and(|s| s.starts_with("sha256:")))
    );
    // The next build succeeds, and prune reclaims what the kills left.
    k.build(ctx.path(), &["--build-arg", "N=final", "-t", "kill:ok"]);
    assert_eq!(k.ok(&["run", "kill:ok", "cat", "/n"]), "final\ns");
    k.ok(&["prune"]);
    let o = k.run(&["system", "check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(k.ok(&["run", "kill:ok", "cat", "/n"]), "final\ns");
}

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

/// The stderr lines of `child` (spawned with a piped stderr), through a
/// receiver.
fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Starts `kiln build --progress plain -t TAG CTX`; its stderr lines come
/// through the receiver.
fn spawn_build(
    k: &Kiln,
    ctx: &std::path::Path,
    tag: &str,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = k
        .cmd()
        .args(["build", "--progress", "plain", "-t", tag])
        .arg(ctx)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let rx = stderr_lines(&mut child);
    (child, rx)
}

/// Waits (up to 60 s) for a line with `needle` that is not the step's own
/// `RUN` line.
fn wait_for_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("never saw {needle:?}:\n{}", seen.join("\n")));
        if line.contains(needle) && !line.contains("RUN") {
            return;
        }
        seen.push(line);
    }
}

/// Sends `sig` to `child` and waits for it to exit, at most `limit`.
fn signal_and_wait(
    child: &mut std::process::Child,
    sig: libc::c_int,
    limit: Duration,
) -> std::process::ExitStatus {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        assert!(
            t.elapsed() < limit,
            "kiln did not exit within {limit:?} of signal {sig}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to a kiln build once its step has printed `started`, and
/// checks that kiln cancels as for Ctrl-C: it exits soon with an error, the
/// step's processes and mounts are gone, the tag is untouched, the store
/// checks clean.
fn interrupt_build(sig: libc::c_int, name: &str) {
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM busybox\nRUN echo started-{name} && sleep 4321{sig}\n"),
    )]);
    let pre = context(&[("Dockerfile", "FROM busybox\nRUN echo before > /b\n")]);
    k.build(pre.path(), &["-t", "sig:keep"]);
    let before = k.inspect("sig:keep")["Id"].clone();
    let (mut child, rx) = spawn_build(&k, ctx.path(), "sig:keep");
    wait_for_line(&rx, &format!("started-{name}"));
    let needle = format!("sleep 4321{sig}");
    // The shell may be exec'ing `sleep` right then (its cmdline reads
    // empty for that instant): looked for again for a while.
    let t = Instant::now();
    while processes_with(&needle).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5), "step not running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = signal_and_wait(&mut child, sig, Duration::from_secs(15));
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        !status.success() && status.code().is_some(),
        "kiln should fail with an exit code after {name} (not die of it): {status:?}\n{}",
        rest.join("\n")
    );
    let t = Instant::now();
    while !processes_with(&needle).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the step outlived kiln after {name}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        common::host_mounts_with(k.root.path().to_str().unwrap_or("?")).is_empty(),
        "mounts left on the host after {name}"
    );
    assert_eq!(k.inspect("sig:keep")["Id"], before, "the tag moved");
    k.ok(&["system", "check"]);
}

#[test]
fn sigterm_cancels_a_build_as_ctrl_c_does() {
    if !prerequisites() {
        return;
    }
    interrupt_build(libc::SIGTERM, "sigterm");
}

#[test]
fn sigint_cancels_a_build() {
    if !prerequisites() {
        return;
    }
    interrupt_build(libc::SIGINT, "sigint");
}

/// Builds `ctx` (tagged `big:keep`, which an earlier build made) and sends
/// SIGINT `delay` after stderr shows `wait_for` (at once when None): kiln
/// must exit 130 within 5 s, the tag unmoved and the store checking clean.
fn interrupt_big_build(k: &Kiln, ctx: &std::path::Path, wait_for: Option<&str>, delay: Duration) {
    let pre = context(&[("Dockerfile", "FROM busybox\nRUN echo before > /b\n")]);
    k.build(pre.path(), &["-t", "big:keep"]);
    let before = k.inspect("big:keep")["Id"].clone();
    let (mut child, rx) = spawn_build(k, ctx, "big:keep");
    if let Some(needle) = wait_for {
        wait_for_line(&rx, needle);
    }
    std::thread::sleep(delay);
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the build ended before the interrupt: the test needs a bigger file"
    );
    let status = signal_and_wait(&mut child, libc::SIGINT, Duration::from_secs(5));
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(
        status.code(),
        Some(130),
        "a cancelled build exits 130: {status:?}\n{}",
        rest.join("\n")
    );
    assert!(
        common::host_mounts_with(k.root.path().to_str().unwrap_or("?")).is_empty(),
        "mounts left on the host"
    );
    assert_eq!(k.inspect("big:keep")["Id"], before, "the tag moved");
    k.ok(&["system", "check"]);
}

#[test]
fn sigint_stops_the_hashing_of_a_large_context_before_the_lookup() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[("Dockerfile", "FROM busybox\nCOPY big /big\n")]);
    // 4 GiB, sparse: hashing it for the COPY's key takes many seconds.
    std::fs::File::create(ctx.path().join("big"))
        .and_then(|f| f.set_len(4 << 30))
        .expect("sparse file");
    interrupt_big_build(&k, ctx.path(), None, Duration::from_millis(1500));
}

#[test]
fn sigint_stops_the_commit_of_a_large_layer() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    // The step makes a 4 GiB sparse file: its diff takes many seconds.
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN truncate -s 4G /big && echo made-big\n",
    )]);
    interrupt_big_build(&k, ctx.path(), Some("made-big"), Duration::from_millis(700));
}

/// SIGINT or SIGTERM while the build exports (here into a FIFO nobody
/// reads, which waits a minute for a reader) ends kiln at once with 130:
/// the exporters do not watch the build's cancellation, and the signal
/// used to be taken and ignored. The store checks clean after it.
#[test]
fn a_signal_during_the_export_ends_kiln() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUN echo x > /x\n")]);
    let dir = tempfile::tempdir().expect("tmp");
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let fifo = dir.path().join(format!("out-{sig}"));
        let c = std::ffi::CString::new(fifo.to_str().expect("utf8")).expect("cstr");
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut child = k
            .cmd()
            .args(["build", "--progress", "plain", "-o"])
            .arg(format!("type=tar,dest={}", fifo.display()))
            .arg(ctx.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let rx = stderr_lines(&mut child);
        wait_for_line(&rx, "exporting to client tarball");
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            child.try_wait().expect("wait").is_none(),
            "no reader, yet done"
        );
        let status = signal_and_wait(&mut child, sig, Duration::from_secs(5));
        assert_eq!(status.code(), Some(130), "{status:?}");
    }
    k.ok(&["system", "check"]);
}

/// A build waiting for a locked cache mount another build holds stops on
/// Ctrl-C (the wait was a blocking `flock` nothing ended: SIGINT and
/// SIGTERM were taken and ignored, only SIGKILL stopped it).
#[test]
fn ctrl_c_stops_a_build_waiting_for_a_cache_lock() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let holder = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN --mount=type=cache,id=held,target=/c,sharing=locked sh -c 'echo holding && sleep 30'\n",
    )]);
    let (mut a, rx) = spawn_build(&k, holder.path(), "holder:1");
    wait_for_line(&rx, "holding");
    let waiter = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN --mount=type=cache,id=held,target=/c,sharing=locked echo got-it\n",
    )]);
    let (mut b, _rx_b) = spawn_build(&k, waiter.path(), "waiter:1");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(b.try_wait().expect("wait").is_none(), "it did not wait");
    let status = signal_and_wait(&mut b, libc::SIGINT, Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "{status:?}");
    let _ = signal_and_wait(&mut a, libc::SIGINT, Duration::from_secs(15));
    k.ok(&["system", "check"]);
}

/// `kiln system prune` while a build runs leaves that build's temporary
/// files (here its context from stdin) alone: it deleted them, and the
/// build copied an empty context, tagged its image and exited 0.
#[test]
fn prune_during_a_build_keeps_the_builds_temporary_files() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN echo sleeping && sleep 3\nCOPY . /ctx\nRUN ls /ctx | wc -l > /n\n",
    )]);
    for i in 0..50 {
        std::fs::write(ctx.path().join(format!("f{i}")), "x").expect("write");
    }
    let bin = std::env::var_os("KILN_E2E_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_kiln").into());
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("tar -C \"$1\" -cf - . | \"$2\" --root \"$3\" build --progress plain -t pruned:1 -")
        .arg("sh")
        .arg(ctx.path())
        .arg(&bin)
        .arg(k.root.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let rx = stderr_lines(&mut child);
    wait_for_line(&rx, "sleeping");
    k.ok(&["prune", "-f"]);
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    assert_eq!(common::sh(&k, "pruned:1", "cat /n").trim(), "51");
}

/// A prune while a build runs in another pid namespace (a build in a
/// container, a prune on the host, one store) leaves the build alone: its
/// lease and active snapshot were taken for a dead process's (its pid
/// means nothing here), expired and deleted, and the build failed.
#[test]
fn prune_leaves_a_build_in_another_pid_namespace_alone() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN echo one > /one\nRUN echo sleeping && sleep 3 && echo two > /two\nRUN cat /one /two\n",
    )]);
    let bin = std::env::var_os("KILN_E2E_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_kiln").into());
    let mut child = std::process::Command::new("unshare")
        .args(["-fp", "--mount-proc"])
        .arg(&bin)
        .arg("--root")
        .arg(k.root.path())
        .args(["build", "--no-cache", "--progress", "plain", "-t", "ns:1"])
        .arg(ctx.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("unshare (util-linux)");
    let rx = stderr_lines(&mut child);
    wait_for_line(&rx, "sleeping");
    k.ok(&["prune", "-f"]);
    let status = child.wait().expect("wait");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "{status:?}\n{}", rest.join("\n"));
    k.ok(&["system", "check"]);
}

/// While one build runs, prune still collects what a SIGKILLed one left:
/// a process's liveness is its lock file in the store (across pid
/// namespaces), not "no other kiln runs".
#[test]
fn prune_collects_a_killed_build_while_another_runs() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let live = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN echo live-running && sleep 6 && echo done > /d\n",
    )]);
    let doomed = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN echo doomed-running && sleep 60\n",
    )]);
    let (mut a, rx_a) = spawn_build(&k, live.path(), "live:1");
    wait_for_line(&rx_a, "live-running");
    let (mut b, rx_b) = spawn_build(&k, doomed.path(), "doomed:1");
    wait_for_line(&rx_b, "doomed-running");
    b.kill().expect("kill -9");
    let _ = b.wait();
    let out = k.ok(&["prune", "-f"]);
    assert!(out.contains("expired 1 leases"), "{out}");
    let status = a.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    k.ok(&["system", "check"]);
}
