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
