//! `--debug` / `KILN_DEBUG`: the library's `tracing` logs on stderr (build
//! start and end, each step started, cached or done, exports); silent
//! without them.

mod common;

use common::{context, prerequisites, Kiln};

fn stderr_of(k: &Kiln, args: &[&str], env: Option<(&str, &str)>) -> String {
    let mut c = k.cmd();
    c.args(args);
    c.env_remove("KILN_DEBUG");
    c.env_remove("RUST_LOG");
    if let Some((key, v)) = env {
        c.env(key, v);
    }
    let o = c.output().expect("run kiln");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn debug_logs_the_build_its_steps_cache_hits_and_exports() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUN echo hi > /hi\n")]);
    let dir = ctx.path().to_str().expect("utf-8 path");
    let out = tempfile::tempdir().expect("tempdir");
    let tar = out.path().join("fs.tar");
    let dest = format!("type=tar,dest={}", tar.display());
    // Without --debug: no log lines.
    let quiet = stderr_of(&k, &["build", "--progress=plain", "-t", "d:1", dir], None);
    assert!(!quiet.contains("build started"), "{quiet}");
    // With --debug: the build, its (now cached) step, the export.
    let e = stderr_of(
        &k,
        &["--debug", "build", "--progress=plain", "-o", &dest, dir],
        None,
    );
    for want in [
        "build started",
        "step started",
        "cache hit",
        "step cache key",
        "build done",
        "export",
    ] {
        assert!(e.contains(want), "no {want:?} in:\n{e}");
    }
    // The RUN's cache key is logged with its step.
    assert!(
        e.lines().any(|l| l.contains("step cache key")
            && l.contains("RUN echo hi")
            && l.contains("key=")),
        "{e}"
    );
    assert!(tar.exists());
    // KILN_DEBUG=1 does the same.
    let e = stderr_of(
        &k,
        &["build", "--progress=plain", dir],
        Some(("KILN_DEBUG", "1")),
    );
    assert!(e.contains("build started"), "{e}");
}
