//! `kiln build` end to end: real Dockerfiles built with the real executor
//! and store, checked through `kiln inspect`, `kiln run` and `kiln images`.

mod common;

use std::path::Path;

use common::{build_fails, context, prerequisites, sh, Kiln};
use serde_json::Value;

fn testdata(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(p)
}

fn events(stderr: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn example_image_builds_and_runs() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let id = k.build(&testdata("example"), &["-t", "example:1"]);
    assert!(id.starts_with("sha256:"), "{id}");
    let out = k.ok(&["run", "--rm", "example:1"]);
    assert_eq!(out, "hello from kiln\nHELLO, WORLD\n");
    let cfg = k.inspect("example:1");
    let c = &cfg["Config"];
    assert!(c["Env"]
        .as_array()
        .unwrap()
        .contains(&Value::from("GREETING=hello from kiln")));
    assert_eq!(
        c["Labels"]["org.opencontainers.image.title"],
        "kiln example"
    );
    assert_eq!(c["Healthcheck"]["Test"][0], "CMD-SHELL");
    assert_eq!(c["Healthcheck"]["Interval"], 30_000_000_000i64);
    assert_eq!(c["Healthcheck"]["Timeout"], 3_000_000_000i64);
    assert_eq!(c["Cmd"][0], "sh");
    assert_eq!(cfg["Id"], id);
    // base layer + COPY --from
    assert_eq!(cfg["RootFS"]["Layers"].as_array().unwrap().len(), 2);
}

#[test]
fn fully_cached_rebuild_runs_nothing_and_gives_the_same_image() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\nCOPY a.txt /a.txt\nRUN cat /a.txt > /b.txt\nENV X=1\nRUN echo $X > /x\n",
        ),
        ("a.txt", "one\n"),
    ]);
    let first = k.build(ctx.path(), &["-t", "c:1"]);
    let o = k.run(&[
        "build",
        "--progress",
        "json",
        "-t",
        "c:1",
        ctx.path().to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let ev = events(&o.stderr);
    let cached = ev.iter().filter(|e| e["event"] == "cached").count();
    let logs = ev
        .iter()
        .filter(|e| e["event"] == "log" && e["stream"] == "stderr")
        .count();
    assert_eq!(cached, 3, "COPY and both RUNs cached: {ev:?}");
    assert_eq!(logs, 0);
    let listed = k.ok(&["images", "-q"]);
    assert!(listed
        .lines()
        .any(|l| l == &first["sha256:".len().."sha256:".len() + 12]));
    assert_eq!(k.build(ctx.path(), &["-t", "c:1"]), first);

    // One changed file re-runs the COPY and what follows, nothing before.
    std::fs::write(ctx.path().join("a.txt"), "two\n").unwrap();
    let o = k.run(&[
        "build",
        "--progress",
        "json",
        "-t",
        "c:1",
        ctx.path().to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let ev = events(&o.stderr);
    assert_eq!(ev.iter().filter(|e| e["event"] == "cached").count(), 0);
    assert_eq!(k.ok(&["run", "c:1", "cat", "/b.txt"]), "two\n");
}

#[test]
fn mtime_alone_does_not_invalidate_the_cache() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[("Dockerfile", "FROM busybox\nCOPY f /f\n"), ("f", "x")]);
    let a = k.build(ctx.path(), &[]);
    let f = ctx.path().join("f");
    let t = std::fs::File::options().write(true).open(&f).unwrap();
    t.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
        .unwrap();
    drop(t);
    assert_eq!(k.build(ctx.path(), &[]), a);
}

#[test]
fn failed_run_shows_command_exit_code_output_and_keeps_the_tag() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let good = context(&[("Dockerfile", "FROM busybox\nRUN echo ok > /ok\n")]);
    let id = k.build(good.path(), &["-t", "app:1"]);
    let bad = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN echo first line && echo boom >&2 && exit 7\n",
    )]);
    let o = k.run(&[
        "build",
        "--progress",
        "plain",
        "-t",
        "app:1",
        bad.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("exit code: 7"), "{err}");
    assert!(
        err.contains("/bin/sh -c echo first line && echo boom >&2 && exit 7"),
        "{err}"
    );
    assert!(err.contains(" > boom"), "last output lines shown: {err}");
    assert!(err.contains("Dockerfile:2"), "{err}");
    assert!(err.contains(">>>  2 | RUN echo first line"), "{err}");
    assert_eq!(k.inspect("app:1")["Id"], id, "existing tag untouched");
    assert!(common::host_mounts_with(k.root.path().to_str().unwrap()).is_empty());
}

#[test]
fn bad_dockerfile_points_at_line_and_column() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[("Dockerfile", "FROM busybox\nCOPPY . /app\n")]);
    let o = k.run(&["build", ctx.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Dockerfile:2:1: unknown instruction: COPPY (did you mean COPY?)"),
        "{err}"
    );
    assert!(err.contains("   2 | COPPY . /app\n     | ^"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[("Dockerfile", "FROM busybox AS a\n")]);
    let o = k.run(&["build", "--target", "nope", ctx.path().to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = k.run(&["build", "/nonexistent/context"]);
    assert_eq!(o.status.code(), Some(2));
    let o = k.run(&["build", "--no-such-flag", "."]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn target_never_builds_unreachable_stages() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox AS base\nRUN echo base > /base\n\nFROM busybox AS broken\nRUN exit 1\n\nFROM base AS final\nRUN cat /base > /final\n\nFROM broken\n",
    )]);
    k.build(ctx.path(), &["--target", "final", "-t", "t:1"]);
    assert_eq!(k.ok(&["run", "t:1", "cat", "/final"]), "base\n");
    let o = k.run(&["build", ctx.path().to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "the default target reaches the broken stage"
    );
}

#[test]
fn independent_stages_run_concurrently() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox AS one\nRUN sleep 1 && echo 1 > /one\n\nFROM busybox AS two\nRUN sleep 1 && echo 2 > /two\n\nFROM busybox\nCOPY --from=one /one /\nCOPY --from=two /two /\n",
    )]);
    let o = k.run(&[
        "build",
        "--progress",
        "json",
        "-t",
        "p:1",
        ctx.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ev = events(&o.stderr);
    let pos = |pred: &dyn Fn(&Value) -> bool| ev.iter().position(pred).expect("event");
    let start_one =
        pos(&|e| e["event"] == "started" && e["name"].as_str().unwrap_or("").contains("[one"));
    let start_two =
        pos(&|e| e["event"] == "started" && e["name"].as_str().unwrap_or("").contains("[two"));
    let first_done = pos(&|e| e["event"] == "done");
    assert!(
        start_one < first_done && start_two < first_done,
        "both stages started before either finished: {ev:?}"
    );
    assert_eq!(k.ok(&["run", "p:1", "cat", "/one", "/two"]), "1\n2\n");
}

#[test]
fn args_env_and_history_follow_buildkit() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "ARG BASE=busybox\nARG GLOBAL=g\nFROM ${BASE}\nARG GLOBAL\nARG V=default\nARG UNUSED\nENV FROM_ENV=$V\nRUN echo \"$GLOBAL $V $FROM_ENV\" > /out\nARG V2=x\nENV V2=env-wins\nRUN echo $V2 >> /out\n",
    )]);
    k.build(ctx.path(), &["-t", "a:1", "--build-arg", "V=cli"]);
    assert_eq!(
        k.ok(&["run", "a:1", "cat", "/out"]),
        "g cli cli\nenv-wins\n"
    );
    let cfg = k.inspect("a:1");
    let env = cfg["Config"]["Env"].as_array().unwrap();
    assert!(env.contains(&Value::from("FROM_ENV=cli")));
    assert!(
        !env.iter().any(|e| e.as_str().unwrap().starts_with("V=")),
        "ARGs stay out of the image env"
    );
    let hist = k.ok(&["history", "a:1"]);
    assert!(
        hist.contains("RUN |3 GLOBAL=g V=cli UNUSED= /bin/sh -c"),
        "{hist}"
    );
}

#[test]
fn build_arg_only_changes_steps_that_use_it() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN echo before > /before\nARG V=1\nRUN echo $V > /v\n",
    )]);
    k.build(ctx.path(), &["--build-arg", "V=1"]);
    let o = k.run(&[
        "build",
        "--progress",
        "json",
        "--build-arg",
        "V=2",
        ctx.path().to_str().unwrap(),
    ]);
    let ev = events(&o.stderr);
    assert_eq!(
        ev.iter().filter(|e| e["event"] == "cached").count(),
        1,
        "{ev:?}"
    );
}

#[test]
fn copy_add_semantics() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\nWORKDIR /w\nCOPY dir/ sub/\nCOPY *.txt /glob/\nCOPY --chown=app:staff one.txt owned\nCOPY --chmod=0700 one.txt /modded\nCOPY one.txt /renamed.txt\nADD arch.tar /unpacked/\nCOPY arch.tar /kept/\nCOPY <<EOF /inline.txt\nhello $HOSTNAME\nEOF\nUSER app\nWORKDIR /home/app/work\n",
        ),
        ("dir/a", "a"),
        ("dir/nested/b", "b"),
        ("one.txt", "1"),
        ("two.txt", "2"),
        ("ignored.txt", "secret"),
        (".dockerignore", "ignored.txt\n"),
    ]);
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(ctx.path().join("dir"))
        .arg("-cf")
        .arg(ctx.path().join("arch.tar"))
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    k.build(ctx.path(), &["-t", "cp:1"]);
    let run = |cmd: &str| k.ok(&["run", "-u", "root", "cp:1", "sh", "-c", cmd]);
    assert_eq!(run("cat /w/sub/a /w/sub/nested/b"), "ab");
    assert_eq!(
        run("ls /glob"),
        "one.txt\ntwo.txt\n",
        ".dockerignore'd file excluded"
    );
    assert_eq!(run("stat -c '%u:%g' /w/owned"), "1000:50\n");
    assert_eq!(run("stat -c '%a' /modded"), "700\n");
    assert_eq!(run("cat /renamed.txt"), "1");
    assert_eq!(run("cat /unpacked/a /unpacked/nested/b"), "ab");
    assert_eq!(run("test -f /kept/arch.tar && echo kept"), "kept\n");
    assert_eq!(run("cat /inline.txt"), "hello \n");
    assert_eq!(
        k.ok(&["run", "cp:1", "sh", "-c", "id -u; pwd"]),
        "1000\n/home/app/work\n"
    );

    // A source outside the context is an error, never a read of the host.
    let bad = context(&[("Dockerfile", "FROM busybox\nCOPY ../../etc/passwd /x\n")]);
    let o = k.run(&["build", bad.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("outside the build context"));
    let link = context(&[("Dockerfile", "FROM busybox\nCOPY evil /x\n")]);
    std::os::unix::fs::symlink("/etc/passwd", link.path().join("evil")).unwrap();
    let o = k.run(&["build", link.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn ignored_files_never_affect_the_key() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        ("Dockerfile", "FROM busybox\nCOPY . /app\n"),
        (".dockerignore", "*.log\n"),
        ("keep", "k"),
        ("noise.log", "1"),
    ]);
    let a = k.build(ctx.path(), &[]);
    std::fs::write(ctx.path().join("noise.log"), "2").unwrap();
    assert_eq!(k.build(ctx.path(), &[]), a);
    std::fs::write(ctx.path().join("keep"), "changed").unwrap();
    assert_ne!(k.build(ctx.path(), &[]), a);
}

/// Found fuzzing the `.dockerignore` matcher: a 4 KiB pattern line of
/// `?{0,1000}` repetitions (upstream leaves `{n,m}` unescaped) made every
/// long file name cost seconds to minutes; the build now stops at once with
/// a typed "too costly" error.
#[test]
fn costly_dockerignore_pattern_fails_the_build_fast() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let pattern = format!("{}x\n", "?{0,1000}".repeat(400));
    let long = "n".repeat(250);
    let ctx = context(&[
        ("Dockerfile", "FROM busybox\nCOPY . /app\n"),
        (".dockerignore", &pattern),
        (&long, "x"),
    ]);
    let start = std::time::Instant::now();
    let err = build_fails(&k, ctx.path(), &[]);
    assert!(err.contains("too costly"), "{err}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn onbuild_triggers_run_in_the_child() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let base = context(&[(
        "Dockerfile",
        "FROM busybox\nONBUILD RUN echo triggered > /onbuild\nONBUILD COPY x /x\n",
    )]);
    k.build(base.path(), &["-t", "ob-base:1"]);
    assert_eq!(
        k.inspect("ob-base:1")["Config"]["OnBuild"][0],
        "RUN echo triggered > /onbuild"
    );
    let child = context(&[("Dockerfile", "FROM ob-base:1\n"), ("x", "from child")]);
    k.build(child.path(), &["-t", "ob-child:1"]);
    assert_eq!(
        k.ok(&["run", "ob-child:1", "cat", "/onbuild", "/x"]),
        "triggered\nfrom child"
    );
    assert!(k.inspect("ob-child:1")["Config"]["OnBuild"].is_null());
}

#[test]
fn entrypoint_cmd_and_metadata_instructions() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let base = context(&[(
        "Dockerfile",
        "FROM busybox\nCMD [\"echo\", \"from-base\"]\n",
    )]);
    k.build(base.path(), &["-t", "with-cmd:1"]);
    let same = context(&[(
        "Dockerfile",
        "FROM busybox\nCMD [\"x\"]\nENTRYPOINT [\"echo\"]\n",
    )]);
    k.build(same.path(), &["-t", "same:1"]);
    assert_eq!(
        k.ok(&["run", "same:1"]),
        "x\n",
        "CMD of the same stage is kept"
    );
    let ctx = context(&[(
        "Dockerfile",
        "FROM with-cmd:1\nENTRYPOINT echo ep\nEXPOSE 80 53/udp\nVOLUME /data\nSTOPSIGNAL SIGTERM\nSHELL [\"/bin/sh\", \"-ec\"]\nMAINTAINER someone\nLABEL a=b\nHEALTHCHECK NONE\n",
    )]);
    k.build(ctx.path(), &["-t", "m:1"]);
    let cfg = k.inspect("m:1");
    let c = &cfg["Config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/bin/sh", "-c", "echo ep"])
    );
    assert!(c["Cmd"].is_null(), "ENTRYPOINT clears an inherited CMD");
    assert!(c["ExposedPorts"]["80/tcp"].is_object());
    assert!(c["ExposedPorts"]["53/udp"].is_object());
    assert!(c["Volumes"]["/data"].is_object());
    assert_eq!(c["StopSignal"], "SIGTERM");
    assert_eq!(c["Shell"], serde_json::json!(["/bin/sh", "-ec"]));
    assert_eq!(c["Healthcheck"]["Test"], serde_json::json!(["NONE"]));
    assert_eq!(cfg["Author"], "someone");
    assert_eq!(k.ok(&["run", "m:1"]), "ep\n");
}

#[test]
fn source_date_epoch_gives_identical_digests_on_two_stores() {
    if !prerequisites() {
        return;
    }
    // The base comes from the context, so both stores start equal.
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM scratch\nCOPY rootfs/ /\nCOPY f /f\nRUN mkdir /d && echo x > /d/y\n",
        ),
        ("f", "content"),
    ]);
    common::make_rootfs(&ctx.path().join("rootfs"));
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let k = Kiln::new();
            let o = k
                .cmd()
                .args(["build", "-q", "--build-arg", "SOURCE_DATE_EPOCH=1700000000"])
                .arg(ctx.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        })
        .collect();
    assert_eq!(ids[0], ids[1]);
    // A store that built the same steps without SOURCE_DATE_EPOCH first:
    // the epoch's build takes none of those layers (their mtimes are not
    // clamped), and gives the same image.
    let k = Kiln::new();
    k.build(ctx.path(), &[]);
    let o = k
        .cmd()
        .args(["build", "-q", "--build-arg", "SOURCE_DATE_EPOCH=1700000000"])
        .arg(ctx.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), ids[0]);
}

#[test]
fn five_hundred_layers_build_and_run() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let mut dockerfile = String::from("FROM busybox\n");
    let mut files = Vec::new();
    for i in 0..500 {
        dockerfile.push_str(&format!("COPY f{i} /layers/\n"));
        files.push((format!("f{i}"), format!("{i}")));
    }
    dockerfile
        .push_str("RUN ls /layers | wc -l > /count && cat /layers/f0 /layers/f499 >> /count\n");
    let mut entries: Vec<(&str, &str)> = vec![("Dockerfile", dockerfile.as_str())];
    entries.extend(files.iter().map(|(a, b)| (a.as_str(), b.as_str())));
    let ctx = context(&entries);
    k.build(ctx.path(), &["-t", "deep:1"]);
    assert_eq!(k.ok(&["run", "deep:1", "cat", "/count"]), "500\n0499");
    let layers = k.inspect("deep:1")["RootFS"]["Layers"]
        .as_array()
        .map(Vec::len);
    assert_eq!(layers, Some(502), "base + 500 COPY + RUN");
}

/// Metadata on `scratch` makes no layer and so has no time of its own:
/// the image is dated the Unix epoch, and a rebuild a second later gives
/// the same image ID (it used to carry the build's clock).
#[test]
fn metadata_only_scratch_image_has_a_stable_id() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::new();
    let ctx = context(&[("Dockerfile", "FROM scratch\nLABEL a=b\nENV X=1\n")]);
    let first = k.build(ctx.path(), &["-t", "meta:1"]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = k.build(ctx.path(), &["-t", "meta:1"]);
    assert_eq!(first, again);
    assert_eq!(k.inspect("meta:1")["Created"], "1970-01-01T00:00:00Z");
}

/// A chain deep enough to be mounted through merged blocks of both
/// levels (see solver/src/flatten.rs): what a layer deletes or replaces
/// stays deleted or replaced in the steps above, whichever blocks the
/// layers involved end up in.
#[test]
fn deep_chain_keeps_deletions_and_replaced_directories() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let mut df = String::from("FROM busybox\n");
    df.push_str(
        "RUN mkdir -p /d /m && echo a > /d/a && echo g > /gone && echo f > /x && echo 1 > /m/a\n",
    );
    for i in 1..300 {
        // RUN i is layer i + 1 of the chain (the base is layer 0): blocks
        // of 32 layers at [0, 32), [32, 64), ...; 256 layers at [0, 256).
        match i {
            35 => df.push_str("RUN mkdir /w3 && echo a > /w3/a && echo b > /w3/b\n"),
            40 => df.push_str(
                "RUN rm /gone && rm -rf /d && mkdir /d && echo b > /d/b && rm /x && mkdir /x && echo in > /x/in\n",
            ),
            45 => df.push_str("RUN rm /w3/a\n"),
            100 => df.push_str("RUN echo 2 > /m/b && rm /m/a\n"),
            // Mounted over the block [32, 64): /w3 exists in that block
            // only, and its deleted file must not be listed.
            120 => df.push_str("RUN ls /w3 > /w3list\n"),
            260 => df.push_str("RUN mkdir /w2 && echo a > /w2/a && echo b > /w2/b\n"),
            265 => df.push_str("RUN rm /w2/a\n"),
            270 => df.push_str("RUN echo back > /gone\n"),
            _ => df.push_str(&format!("RUN echo {i} > /l{i}\n")),
        }
    }
    df.push_str(
        "RUN (test ! -e /d/a && test ! -e /m/a && cat /gone /d/b /x/in /m/b /w3list && ls /w2 && ls / | grep -c '^l') > /result\n",
    );
    let ctx = context(&[("Dockerfile", df.as_str())]);
    k.build(ctx.path(), &["-t", "deepwh:1"]);
    assert_eq!(
        k.ok(&["run", "deepwh:1", "cat", "/result"]),
        "back\nb\nin\n2\nb\nb\n291\n"
    );
}

#[test]
fn dockerfile_from_stdin_or_outside_the_context_with_its_own_ignore_file() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[("a", "A"), ("b", "B"), (".dockerignore", "a\n")]);
    let elsewhere = context(&[
        ("app.Dockerfile", "FROM busybox\nCOPY . /ctx\n"),
        ("app.Dockerfile.dockerignore", "b\n"),
    ]);
    // -f outside the context: its own <name>.dockerignore wins.
    let df = elsewhere.path().join("app.Dockerfile");
    k.ok(&[
        "build",
        "-q",
        "-t",
        "f:1",
        "-f",
        df.to_str().unwrap(),
        ctx.path().to_str().unwrap(),
    ]);
    assert_eq!(
        k.ok(&["run", "f:1", "ls", "-A", "/ctx"]),
        ".dockerignore\na\n"
    );
    // -f - reads stdin; the context's .dockerignore applies.
    let mut child = k
        .cmd()
        .args(["build", "-q", "-t", "f:2", "-f", "-"])
        .arg(ctx.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"FROM busybox\nCOPY . /ctx\n")
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    assert_eq!(
        k.ok(&["run", "f:2", "ls", "-A", "/ctx"]),
        ".dockerignore\nb\n"
    );
}

#[test]
fn iidfile_labels_network_and_resource_limits() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN cat /sys/class/net/*/operstate | wc -l > /ifaces\n",
    )]);
    let iid = ctx.path().join("iid");
    k.ok(&[
        "build",
        "-q",
        "--network",
        "none",
        "--label",
        "team=kiln",
        "--iidfile",
        iid.to_str().unwrap(),
        "-t",
        "l:1",
        ctx.path().to_str().unwrap(),
    ]);
    let cfg = k.inspect("l:1");
    assert_eq!(
        std::fs::read_to_string(&iid).unwrap(),
        cfg["Id"].as_str().unwrap()
    );
    assert_eq!(cfg["Config"]["Labels"]["team"], "kiln");
    // An --iidfile that cannot be written: the error names it.
    let o = k.run(&[
        "build",
        "-q",
        "--iidfile",
        ctx.path().to_str().unwrap(),
        ctx.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("--iidfile {}: ", ctx.path().display())),
        "{err}"
    );
    assert_eq!(
        k.ok(&["run", "l:1", "cat", "/ifaces"]),
        "1\n",
        "only lo with --network none"
    );

    let forky = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN for i in 1 2 3 4 5 6 7 8 9 10; do sleep 2 & done; wait\n",
    )]);
    let o = k.run(&["build", "--pids-limit", "5", forky.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "fork beyond --pids-limit fails");
    let mem = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN head -c 64m /dev/zero | tr '\\0' 'x' | sort > /dev/null\n",
    )]);
    let o = k.run(&["build", "--memory", "16m", mem.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "--memory is enforced");
}

#[test]
fn changed_file_costs_that_file_unchanged_ones_are_hard_linked() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let mut files: Vec<(String, String)> = (0..50)
        .map(|i| (format!("src/f{i}"), format!("content {i}")))
        .collect();
    files.push((
        "Dockerfile".into(),
        "FROM busybox\nCOPY src/ /app/\n".into(),
    ));
    let entries: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let ctx = context(&entries);
    k.build(ctx.path(), &["-t", "reuse:1"]);
    std::fs::write(ctx.path().join("src/f7"), "changed").unwrap();
    k.build(ctx.path(), &["-t", "reuse:1"]);
    assert_eq!(
        k.ok(&["run", "reuse:1", "cat", "/app/f7", "/app/f8"]),
        "changedcontent 8"
    );
    // The second COPY layer shares the 49 unchanged files' inodes with the
    // first one instead of copying their bytes.
    use std::os::unix::fs::MetadataExt;
    let mut linked = 0;
    for snap in std::fs::read_dir(k.root.path().join("snapshots"))
        .unwrap()
        .flatten()
    {
        let app = snap.path().join("fs/app");
        for f in std::fs::read_dir(&app).into_iter().flatten().flatten() {
            if f.metadata().is_ok_and(|m| m.nlink() == 2) {
                linked += 1;
            }
        }
    }
    assert_eq!(linked, 2 * 49, "49 files linked in each of the two layers");
    // And again from that layer: its files linked from the first run are
    // still in its index (a third run linked nothing and copied all).
    std::fs::write(ctx.path().join("src/f9"), "changed too").unwrap();
    k.build(ctx.path(), &["-t", "reuse:1"]);
    let mut most = 0;
    for snap in std::fs::read_dir(k.root.path().join("snapshots"))
        .unwrap()
        .flatten()
    {
        let app = snap.path().join("fs/app");
        for f in std::fs::read_dir(&app).into_iter().flatten().flatten() {
            if let Ok(m) = f.metadata() {
                most = most.max(m.nlink());
            }
        }
    }
    assert_eq!(most, 3, "the third run linked nothing from the second");
}

/// `kiln save` of `image` into `dir`: each layer file's sha256 must be the
/// diffID its config names (docker-archive layers are uncompressed), as
/// `sha256sum` computes it. Returns the diffIDs.
fn saved_layers_are_true(k: &Kiln, image: &str, dir: &Path) -> Vec<String> {
    let tar = dir.join("saved.tar");
    let out = dir.join("saved");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    k.ok(&["save", "-o", tar.to_str().unwrap(), image]);
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(&out)
        .arg("-xf")
        .arg(&tar)
        .status()
        .unwrap();
    assert!(st.success());
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let config: Value = serde_json::from_slice(
        &std::fs::read(out.join(manifest[0]["Config"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    let layers = manifest[0]["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len());
    for (l, d) in layers.iter().zip(&diff_ids) {
        let o = std::process::Command::new("sha256sum")
            .arg(out.join(l.as_str().unwrap()))
            .output()
            .unwrap();
        let sum = String::from_utf8_lossy(&o.stdout);
        let sum = format!("sha256:{}", sum.split_whitespace().next().unwrap());
        assert_eq!(&sum, d, "layer {l} of {image}");
    }
    diff_ids
}

/// A COPY into its fresh snapshot digests its layer while writing it
/// (no diff at commit): the diffIDs it records are those of the tars
/// `kiln save` writes again from the snapshots, after a first build and
/// after a rebuild with one file changed (the unchanged ones hard-linked
/// from the first layer), and the store checks clean.
#[test]
fn a_copy_layer_digested_while_copying_exports_with_true_digests() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let big = "b".repeat(300_000);
    let first_big = "0".repeat(3 << 20);
    let long = format!("src/{}/f", "d".repeat(120));
    let ctx = context(&[
        ("src/0big", first_big.as_str()),
        ("src/a/one", "1"),
        ("src/a/empty", ""),
        ("src/a-b/two", "2"),
        ("src/big", big.as_str()),
        (long.as_str(), "long"),
        (
            "Dockerfile",
            "FROM busybox\nCOPY src/ /app/\nCOPY src/a /usr/local/a\n",
        ),
    ]);
    std::os::unix::fs::symlink("a/one", ctx.path().join("src/link")).unwrap();
    std::fs::hard_link(
        ctx.path().join("src/a/one"),
        ctx.path().join("src/one-again"),
    )
    .unwrap();
    // Both COPY steps take the streamed layer (the debug log says so);
    // the rerun of the first resumes its hash after `0big`, which sorts
    // before the changed file and is not read again.
    let streamed = |k: &Kiln| {
        let o = k.run(&[
            "--debug",
            "build",
            "-q",
            "-t",
            "streamed:1",
            ctx.path().to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let resumed = err
            .lines()
            .any(|l| l.contains("streamed=true") && !l.contains("resumed_from=0"));
        (err.matches("streamed=true").count(), resumed)
    };
    assert_eq!(streamed(&k), (2, false));
    let first = saved_layers_are_true(&k, "streamed:1", k.root.path());
    std::fs::write(ctx.path().join("src/a-b/two"), "changed").unwrap();
    assert_eq!(
        streamed(&k),
        (2, true),
        "the second COPY sits on the changed first; the first resumes"
    );
    let second = saved_layers_are_true(&k, "streamed:1", k.root.path());
    assert_ne!(first[1], second[1], "the COPY layer changed");
    assert_eq!(
        k.ok(&[
            "run",
            "streamed:1",
            "cat",
            "/app/a-b/two",
            "/app/link",
            "/usr/local/a/one"
        ]),
        "changed11"
    );
    let check = k.ok(&["system", "check"]);
    assert!(check.starts_with("ok"), "{check}");
}

#[test]
fn run_heredoc_with_a_shebang_runs_as_a_script() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN <<EOF\n#!/bin/sh -e\necho \"run as $0\" > /out\nEOF\nRUN <<-EOT\n\t#!/bin/sh\n\techo chomped >> /out\n\tEOT\n",
    )]);
    k.build(ctx.path(), &["-t", "sb:1"]);
    assert_eq!(
        k.ok(&["run", "sb:1", "cat", "/out"]),
        "run as /dev/pipes/EOF\nchomped\n"
    );
    assert_eq!(
        k.ok(&[
            "run",
            "sb:1",
            "sh",
            "-c",
            "test -e /dev/pipes || echo clean"
        ]),
        "clean\n",
        "the script is not left in the image"
    );
}

#[test]
fn cached_rebuild_marks_its_steps_used_for_prune() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx_a = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN head -c 8000000 /dev/urandom > /a\n",
    )]);
    let ctx_b = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN head -c 8000000 /dev/urandom > /b\n",
    )]);
    // Untagged: only the cache records keep the steps' snapshots. B's step
    // is made a second after A's ...
    k.build(ctx_a.path(), &[]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    k.build(ctx_b.path(), &[]);
    // ... and A's cached rebuild, a second later, makes A's the most
    // recently used: each cache lookup marks the record it hits.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let cached = |ctx: &Path| {
        let o = k.run(&["build", "--progress", "json", ctx.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        events(&o.stderr)
            .iter()
            .filter(|e| e["event"] == "cached")
            .count()
    };
    assert_eq!(cached(ctx_a.path()), 1);
    // Room for one 8 MB step over busybox, not two: B's goes.
    k.ok(&["prune", "--keep-storage", "12MB"]);
    assert_eq!(cached(ctx_a.path()), 1, "the step used last is kept");
    assert_eq!(cached(ctx_b.path()), 0, "the older one is pruned");
}

#[test]
fn seccomp_profile_in_run_steps_and_kiln_run_lifted_by_insecure_and_unconfined() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\n\
         RUN grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status > /status; \
             (unshare -U true || unshare -n true) 2>/dev/null && echo escaped > /escaped; true\n\
         RUN --security=insecure grep '^Seccomp:' /proc/self/status > /insecure\n",
    )]);
    k.build(ctx.path(), &["-t", "sc:1", "--allow", "security.insecure"]);
    assert_eq!(
        k.ok(&["run", "--rm", "sc:1", "cat", "/status"]),
        "NoNewPrivs:\t0\nSeccomp:\t2\n"
    );
    assert_eq!(
        k.ok(&[
            "run",
            "--rm",
            "sc:1",
            "sh",
            "-c",
            "ls /escaped 2>&1 >/dev/null | wc -l"
        ]),
        "1\n",
        "a RUN step created a user or network namespace"
    );
    assert_eq!(
        k.ok(&["run", "--rm", "sc:1", "cat", "/insecure"]),
        "Seccomp:\t0\n"
    );
    // kiln run: the profile by default, lifted by --security-opt.
    assert_eq!(
        k.ok(&[
            "run",
            "--rm",
            "sc:1",
            "grep",
            "^Seccomp:",
            "/proc/self/status"
        ]),
        "Seccomp:\t2\n"
    );
    assert_eq!(
        k.ok(&[
            "run",
            "--rm",
            "--security-opt",
            "seccomp=unconfined",
            "sc:1",
            "grep",
            "^Seccomp:",
            "/proc/self/status"
        ]),
        "Seccomp:\t0\n"
    );
    for bad in ["apparmor=unconfined", "seccomp=/tmp/profile.json"] {
        let o = k.run(&["run", "--rm", "--security-opt", bad, "sc:1", "true"]);
        assert_eq!(o.status.code(), Some(2), "--security-opt {bad}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--security-opt"), "{err}");
    }
}

/// `--no-cache-filter=b` runs stage `b`'s RUN again and takes stage `a`'s
/// from the cache (docker buildx's per-stage semantics, not --no-cache);
/// an unknown stage name is warned about, not refused (BuildKit ignores it).
#[test]
fn no_cache_filter_runs_only_the_named_stages_again() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox AS a\nRUN cat /proc/sys/kernel/random/uuid > /a\n\
         FROM busybox AS b\nRUN cat /proc/sys/kernel/random/uuid > /b\n\
         FROM busybox\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n",
    )]);
    let dir = ctx.path().to_str().unwrap();
    k.build(ctx.path(), &["-t", "f:1"]);
    let stamp = |f: &str| sh(&k, "f:1", &format!("cat {f}"));
    let (a1, b1) = (stamp("/a"), stamp("/b"));
    let o = k.run(&[
        "build",
        "--progress=json",
        "--no-cache-filter=b,nosuch",
        "-t",
        "f:1",
        dir,
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    let ev = events(&o.stderr);
    let name_of = |id: &Value| {
        ev.iter()
            .find(|e| e["event"] == "started" && e["id"] == *id)
            .and_then(|e| e["name"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let cached: Vec<String> = ev
        .iter()
        .filter(|e| e["event"] == "cached")
        .map(|e| name_of(&e["id"]))
        .collect();
    assert!(
        cached.iter().any(|n| n.starts_with("[a 2/2] RUN")),
        "{cached:?}"
    );
    assert!(!cached.iter().any(|n| n.starts_with("[b ")), "{cached:?}");
    assert!(
        err.contains("--no-cache-filter: no build stage is named") && err.contains("nosuch"),
        "{err}"
    );
    assert_eq!(stamp("/a"), a1);
    assert_ne!(stamp("/b"), b1);
}

/// A build step's flushes are answered without running (`fdatasync` of
/// `/dev/null`, EINVAL from the kernel, succeeds); `kiln run`'s reach the
/// kernel (its `-v` mounts are the user's files).
#[test]
fn build_steps_skip_flushes_and_kiln_run_keeps_them() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN sync -d /dev/null && sync && echo skipped > /flushed\n",
    )]);
    k.build(ctx.path(), &["-t", "flush:1"]);
    assert_eq!(
        k.ok(&["run", "--rm", "flush:1", "cat", "/flushed"]),
        "skipped\n"
    );
    let o = k.run(&["run", "--rm", "flush:1", "sync", "-d", "/dev/null"]);
    assert!(!o.status.success(), "kiln run's fdatasync did not run");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Invalid argument"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A `.dockerignore` exclusion re-included in part (`src/skipped`,
/// `!src/skipped/keep`) copies the kept file inside its directory, as
/// docker does (the directory was never made: "No such file or
/// directory").
#[test]
fn a_reincluded_file_in_an_excluded_directory_is_copied() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context(&[
        ("Dockerfile", "FROM busybox\nCOPY src /app/\n"),
        (".dockerignore", "src/skipped\n!src/skipped/keep\n"),
        ("src/skipped/keep", "k\n"),
        ("src/skipped/drop", "d\n"),
        ("src/other/o", "o\n"),
    ]);
    k.build(ctx.path(), &["-t", "reinc:1"]);
    assert_eq!(
        k.ok(&["run", "--rm", "reinc:1", "sh", "-c", "find /app | sort"]),
        "/app\n/app/other\n/app/other/o\n/app/skipped\n/app/skipped/keep\n"
    );
}
