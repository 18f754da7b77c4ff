//! `kiln build --progress=tty|json` end to end: the live view draws into a
//! pipe when asked for, ends with the image it made, and the JSON stream
//! ends with the build's result.

mod common;

use common::{context, prerequisites, Kiln};
use serde_json::Value;

/// The text of ANSI output without its escape sequences (CSI and the
/// cursor show/hide ones).
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

#[test]
fn tty_progress_into_a_pipe_draws_frames_and_ends_with_the_image() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN echo first-line; sleep 1; echo second-line\nRUN echo two > /two\n",
    )]);
    let o = k
        .cmd()
        .args(["build", "--progress=tty", "-t", "app:1.0"])
        .arg(ctx.path())
        .env("COLUMNS", "70")
        .env_remove("NO_COLOR")
        .output()
        .expect("run kiln");
    let raw = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{raw}");
    let id = k.inspect("app:1.0")["Id"].as_str().unwrap().to_string();
    // Frames: drawn over each other with the cursor moved up, in colour.
    let frames = raw.matches("[+] Building").count();
    assert!(frames >= 3, "a frame every 100ms over a second: {raw:?}");
    assert!(raw.contains("\x1b[34m"), "finished steps in blue: {raw:?}");
    assert!(
        raw.contains("\x1b[2m => => # first-line"),
        "output tail: {raw:?}"
    );
    let text = strip_ansi(&raw);
    // The last frame: finished, every step, the image and its name.
    let last = &text[text.rfind("[+] Building").unwrap()..];
    let lines: Vec<&str> = last.lines().collect();
    assert!(
        lines[0].starts_with("[+] Building") && lines[0].ends_with("(4/4) FINISHED"),
        "{last}"
    );
    assert!(lines[1].contains(" 1/3] FROM busybox"), "{last}");
    assert!(lines
        .iter()
        .any(|l| l.contains(" 2/3] RUN echo first-line")));
    assert!(!last.contains("first-line; sleep 1; echo second-line\n => => #"));
    let writing = format!(" => => writing image {}", &id[..30]);
    assert!(lines.iter().any(|l| l.starts_with(&writing)), "{last}");
    assert!(lines
        .iter()
        .any(|l| l.starts_with(" => => naming to docker.io/library/app:1.0")));
    for l in &lines {
        assert!(l.chars().count() < 70, "cut to COLUMNS: {l:?}");
    }
    // Timers are right-aligned: every step line ends in column 69.
    for l in lines.iter().filter(|l| l.starts_with(" =>")) {
        assert!(l.ends_with('s') && l.chars().count() == 69, "{l:?}");
    }
    // The cursor is shown again at the end.
    assert!(raw.trim_end().ends_with("\x1b[?25h"), "{raw:?}");

    // NO_COLOR: the same view without colours.
    let o = k
        .cmd()
        .args(["build", "--progress=tty", "--no-cache"])
        .arg(ctx.path())
        .env("NO_COLOR", "1")
        .output()
        .expect("run kiln");
    let raw = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{raw}");
    assert!(raw.contains("[+] Building"));
    assert!(
        !raw.contains("\x1b[34m") && !raw.contains("\x1b[2m"),
        "{raw:?}"
    );
}

#[test]
fn json_progress_ends_with_the_result() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUN echo hi > /hi\n")]);
    let o = k.run(&[
        "build",
        "--progress=json",
        "-t",
        "j:1",
        ctx.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let events: Vec<Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let last = events.last().expect("events");
    assert_eq!(last["event"], "result", "{events:#?}");
    let cfg = k.inspect("j:1");
    assert_eq!(last["image_id"], cfg["Id"]);
    let digest = last["digest"].as_str().unwrap();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    assert_ne!(
        last["digest"], last["image_id"],
        "the manifest, not the config"
    );
    let planned = events.iter().find(|e| e["event"] == "planned").unwrap();
    let started = events.iter().filter(|e| e["event"] == "started").count();
    assert_eq!(planned["steps"], started, "the plan counts every step");
}

/// A base image pulled during the build shows its blobs under the FROM
/// step in the tty view (`=> => sha256:… 1.20MB / 1.20MB`), as BuildKit's
/// does; the build's pull used to report nothing.
#[test]
fn a_base_pulled_during_the_build_shows_its_blobs_under_from() {
    if !common::registry::ready(&["docker-registry"]) {
        return;
    }
    let reg = common::registry::Reg::start(common::registry::RegOpts::default());
    let c = common::registry::Client::new(true);
    let name = format!("{}/kiln/progress-base:1", reg.host());
    c.ok(&["tag", "busybox:latest", &name]);
    c.ok(&["push", "-q", &name]);
    let fresh = common::registry::Client::new(false);
    let ctx = context(&[("Dockerfile", &format!("FROM {name}\nRUN true\n"))]);
    let o = fresh
        .cmd()
        .args(["build", "--progress=tty", "-t", "pulled:1"])
        .arg(ctx.path())
        .env("COLUMNS", "120")
        .output()
        .expect("run kiln");
    let raw = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{raw}");
    let text = strip_ansi(&raw);
    let last = text.rsplit("[+] Building").next().unwrap_or_default();
    let from = last
        .lines()
        .position(|l| l.contains("FROM ") && l.contains("progress-base"))
        .unwrap_or_else(|| panic!("a FROM line: {last}"));
    let blob = last
        .lines()
        .nth(from + 1)
        .unwrap_or_else(|| panic!("a line after FROM: {last}"));
    assert!(blob.starts_with(" => => sha256:"), "{last}");
    assert!(blob.contains("B"), "a size: {last}");
}

/// The exporters are steps of the tty view, as BuildKit shows them:
/// `=> exporting to oci image format`, `=> exporting cache to client
/// directory` with their lines as `=> =>` sub-steps, inside the last
/// frame (nothing printed below it); `-t X` named once.
#[test]
fn exporters_are_steps_of_the_tty_view() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUN echo x > /x\n")]);
    let out = tempfile::tempdir().expect("tmp");
    let oci = out.path().join("o.tar");
    let cache = out.path().join("cache");
    let o = k
        .cmd()
        .args(["build", "--progress=tty", "-t", "exp:1", "-o"])
        .arg(format!("type=oci,dest={}", oci.display()))
        .arg("--cache-to")
        .arg(format!("type=local,dest={}", cache.display()))
        .arg(ctx.path())
        .env("COLUMNS", "150")
        .output()
        .expect("run kiln");
    let raw = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{raw}");
    let text = strip_ansi(&raw);
    let last = &text[text.rfind("[+] Building").unwrap()..];
    let lines: Vec<&str> = last.lines().collect();
    // FROM, RUN, the image and the two exporters.
    assert!(lines[0].ends_with("(5/5) FINISHED"), "{last}");
    let at = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in the last frame:\n{last}"))
    };
    let oci_step = at(" => exporting to oci image format");
    let cache_step = at(" => exporting cache to client directory");
    assert!(oci_step < cache_step, "{last}");
    let manifest = at(" => => exported cache manifest sha256:");
    assert!(manifest > cache_step, "{last}");
    assert_eq!(
        lines.iter().filter(|l| l.contains("naming to")).count(),
        1,
        "{last}"
    );
    // Every line of the last frame is the header or a step's.
    for l in &lines[1..] {
        assert!(
            l.starts_with(" =>"),
            "a line outside the view: {l:?}\n{last}"
        );
    }
    assert!(oci.exists() && cache.join("index.json").exists());
}
