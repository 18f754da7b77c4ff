//! docker command lines, as CI scripts and Makefiles write them, run
//! against kiln: the cases are data (`data/docker_compat.toml`), each a
//! shell script in which `docker` is kiln, with the exit status and the
//! shape of the output (regular expressions) it must give.
//!
//! Every case runs with `sh -e` in a fresh context directory holding its
//! `dockerfile` (default: a small busybox build), against one store
//! (busybox imported) and a real registry (`$REGISTRY`, plain HTTP on
//! 127.0.0.1), in the file's order: later cases may use earlier images.

mod common;

use std::process::Command;

use common::registry::{ready, Reg, RegOpts};
use common::{context, Kiln};

#[derive(serde::Deserialize)]
struct Cases {
    case: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    /// What it shows.
    name: String,
    /// Where the command line comes from (kept for readers).
    #[allow(dead_code)]
    source: Option<String>,
    /// The script (`sh -e`).
    run: String,
    /// The context's Dockerfile.
    dockerfile: Option<String>,
    /// The exit status wanted.
    #[serde(default)]
    exit: i32,
    /// A regular expression stdout must match.
    stdout: Option<String>,
    /// A regular expression stderr must match.
    stderr: Option<String>,
    /// A regular expression stderr must not match.
    stderr_not: Option<String>,
}

const DEFAULT_DOCKERFILE: &str =
    "FROM busybox\nRUN echo built > /built\nCMD [\"cat\", \"/built\"]\n";

#[test]
fn docker_command_lines_from_ci_run_against_kiln() {
    if !ready(&["docker-registry"]) {
        return;
    }
    let text = include_str!("data/docker_compat.toml");
    let cases: Cases = toml::from_str(text).expect("docker_compat.toml parses");
    let k = Kiln::with_busybox();
    let reg = Reg::start(RegOpts::default());
    let conf = tempfile::tempdir().expect("tmp");
    let bin = std::env::var_os("KILN_E2E_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_kiln").into());
    let bindir = tempfile::tempdir().expect("tmp");
    std::os::unix::fs::symlink(&bin, bindir.path().join("kiln")).expect("symlink");
    let path = format!(
        "{}:{}",
        bindir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut failures = Vec::new();
    for c in &cases.case {
        let ctx = context(&[(
            "Dockerfile",
            c.dockerfile.as_deref().unwrap_or(DEFAULT_DOCKERFILE),
        )]);
        let script = format!("docker() {{ kiln \"$@\"; }}\n{}", c.run);
        let o = Command::new("sh")
            .arg("-e")
            .arg("-c")
            .arg(&script)
            .current_dir(ctx.path())
            .env("PATH", &path)
            .env("KILN_ROOT", k.root.path())
            .env("REGISTRY", reg.host())
            .env("DOCKER_CONFIG", conf.path().join("docker"))
            .env("KILN_CONFIG_DIR", conf.path().join("kiln"))
            .env("XDG_CONFIG_HOME", conf.path().join("xdg"))
            .env_remove("SOURCE_DATE_EPOCH")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("sh");
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        let mut why = Vec::new();
        if o.status.code() != Some(c.exit) {
            why.push(format!("exit {:?}, want {}", o.status.code(), c.exit));
        }
        let re = |r: &str| regex::Regex::new(r).expect("case regex");
        if let Some(r) = &c.stdout {
            if !re(r).is_match(&out) {
                why.push(format!("stdout does not match {r:?}"));
            }
        }
        if let Some(r) = &c.stderr {
            if !re(r).is_match(&err) {
                why.push(format!("stderr does not match {r:?}"));
            }
        }
        if let Some(r) = &c.stderr_not {
            if re(r).is_match(&err) {
                why.push(format!("stderr matches {r:?}"));
            }
        }
        if !why.is_empty() {
            failures.push(format!(
                "case {:?}: {}\n--- script\n{}\n--- stdout\n{out}\n--- stderr\n{err}",
                c.name,
                why.join("; "),
                c.run
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.case.len(),
        failures.join("\n\n")
    );
}
