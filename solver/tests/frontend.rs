//! Lowering without a store or an executor: a Dockerfile and the configs
//! of its base images (a fake [`ImageConfigs`]) become the op graph the
//! solver runs.

use std::collections::{BTreeMap, HashMap};

use kiln_image::config::ImageConfig;
use kiln_image::manifest::Platform;
use kiln_solver::frontend::{self, plan};
use kiln_solver::op::{Graph, Op, Source};
use kiln_solver::{BuildError, BuildOptions};

fn lower_with(
    df: &str,
    images: &HashMap<String, ImageConfig>,
    tweak: impl FnOnce(&mut BuildOptions),
) -> Result<Graph, BuildError> {
    let mut opts = BuildOptions {
        dockerfile: df.to_string(),
        ..Default::default()
    };
    tweak(&mut opts);
    let parsed = kiln_parser::parse(df)?;
    let p = plan::plan(&parsed, &opts.build_args, opts.target.as_deref())?;
    frontend::lower(&parsed, &p, &opts, "2024-01-01T00:00:00Z", images)
}

fn lower(df: &str) -> Graph {
    lower_with(df, &HashMap::new(), |_| {}).expect("lower")
}

fn node() -> HashMap<String, ImageConfig> {
    let mut cfg = ImageConfig::new(&Platform::host());
    let c = cfg.config_mut();
    c.env = Some(vec![
        "PATH=/usr/local/bin:/usr/bin".into(),
        "NODE=20".into(),
    ]);
    c.working_dir = Some("/home/node".into());
    c.user = Some("node".into());
    c.on_build = Some(vec!["COPY package.json ./".into(), "RUN npm ci".into()]);
    HashMap::from([("node".to_string(), cfg)])
}

#[test]
fn config_instructions_lower_to_no_ops_but_to_config_and_history() {
    // `ENV A=1 B=$A` expands `$A` as it was before the line (unset), as
    // docker and BuildKit do; the next line sees A.
    let g = lower(
        "FROM scratch\nENV A=0\nENV A=1 B=$A\nENV C=$A\nLABEL x=$B\nUSER 7\nCMD run\nEXPOSE 80 81/udp\n",
    );
    let s = &g.stages[0];
    assert!(s.ops.is_empty());
    let c = s.config.config.as_ref().expect("config");
    let env = c.env.as_ref().expect("env");
    for want in ["A=1", "B=0", "C=1"] {
        assert!(env.contains(&want.to_string()), "{want} not in {env:?}");
    }
    assert_eq!(
        c.labels
            .as_ref()
            .and_then(|l| l.get("x"))
            .map(String::as_str),
        Some("0")
    );
    assert_eq!(c.user.as_deref(), Some("7"));
    assert_eq!(
        c.cmd,
        Some(vec!["/bin/sh".into(), "-c".into(), "run".into()])
    );
    let hist: Vec<&str> = s
        .config
        .history
        .iter()
        .filter_map(|h| h.created_by.as_deref())
        .collect();
    assert_eq!(
        hist,
        [
            "ENV A=0",
            "ENV A=1 B=0",
            "ENV C=1",
            "LABEL x=0",
            "USER 7",
            "CMD [\"/bin/sh\" \"-c\" \"run\"]",
            "EXPOSE [80/tcp 81/udp]"
        ]
    );
    assert!(s.config.history.iter().all(|h| h.empty_layer));
}

#[test]
fn run_lowers_to_an_exec_with_the_stage_env_cwd_user_and_history() {
    let g = lower(
        "FROM scratch\nARG V=1\nENV P=/x\nWORKDIR /app\nUSER 10:20\nRUN --network=none echo $V $P\n",
    );
    let s = &g.stages[0];
    assert_eq!(s.ops.len(), 2);
    assert!(matches!(&s.ops[0].op, Op::Mkdir(m) if m.path == "/app" && m.user.is_none()));
    let Op::Exec(e) = &s.ops[1].op else {
        panic!("{:?}", s.ops[1].op)
    };
    assert_eq!(e.args, ["/bin/sh", "-c", "echo $V $P"]);
    assert!(e.env.contains(&("V".into(), "1".into())));
    assert_eq!(e.cwd, "/app");
    assert_eq!(e.user.as_deref(), Some("10:20"));
    assert_eq!(e.network, kiln_executor::NetworkMode::None);
    assert_eq!(s.ops[1].name, "[stage-0 6/6] RUN --network=none echo $V $P");
    assert_eq!(s.ops[1].location.line, 6);
    let last = s.config.history.last().expect("history");
    assert_eq!(
        last.created_by.as_deref(),
        Some("RUN |1 V=1 /bin/sh -c echo $V $P # buildkit")
    );
    assert!(!last.empty_layer);
}

#[test]
fn proxy_build_args_reach_the_step_but_not_its_key_inputs() {
    let g = lower_with("FROM scratch\nRUN env\n", &HashMap::new(), |o| {
        o.build_args = BTreeMap::from([("HTTP_PROXY".into(), "http://p".into())]);
    })
    .expect("lower");
    let Op::Exec(e) = &g.stages[0].ops[0].op else {
        panic!()
    };
    assert!(!e.env.iter().any(|(k, _)| k == "HTTP_PROXY"));
    assert_eq!(
        e.proxy_env,
        [("HTTP_PROXY".to_string(), "http://p".to_string())]
    );
    assert!(g.unused_build_args.is_empty());
}

#[test]
fn a_base_image_config_decides_env_workdir_user_and_its_onbuild_is_spliced() {
    let g = lower_with("FROM node\nRUN echo $NODE\n", &node(), |_| {}).expect("lower");
    let s = &g.stages[0];
    assert_eq!(
        s.base,
        Source::Image {
            reference: "node".into(),
            platform: plan::host_platform()
        }
    );
    let names: Vec<&str> = s.ops.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "[stage-0 ONBUILD] COPY package.json ./",
            "[stage-0 ONBUILD] RUN npm ci",
            "[stage-0 2/2] RUN echo $NODE"
        ]
    );
    let Op::Copy(c) = &s.ops[0].op else { panic!() };
    assert_eq!(c.dest, "/home/node");
    assert!(c.dest_is_dir);
    let Op::Exec(e) = &s.ops[2].op else { panic!() };
    assert_eq!(e.user.as_deref(), Some("node"));
    assert_eq!(e.cwd, "/home/node");
    assert!(e.env.contains(&("NODE".into(), "20".into())));
    // Triggers run once: the stage's own config no longer carries them.
    assert!(s
        .config
        .config
        .as_ref()
        .and_then(|c| c.on_build.clone())
        .is_none());
}

#[test]
fn an_unresolved_base_image_is_an_error_at_its_from_line() {
    let e = lower_with("FROM scratch\nFROM ghost\n", &HashMap::new(), |_| {}).expect_err("fails");
    assert!(
        matches!(e, BuildError::Step { location, .. } if location.line == 2),
        "{e:?}"
    );
}

#[test]
fn stages_are_edges_and_the_target_prunes_the_rest() {
    let g = lower_with(
        "FROM scratch AS a\nCOPY x /x\n\
         FROM scratch AS unused\nRUN false\n\
         FROM a AS b\nCOPY --from=a /x /y\nRUN --mount=type=bind,from=a,target=/m true\n\
         FROM scratch AS c\n",
        &HashMap::new(),
        |o| o.target = Some("b".into()),
    )
    .expect("lower");
    let idx: Vec<usize> = g.stages.iter().map(|s| s.index).collect();
    assert_eq!(idx, [0, 2]);
    assert_eq!(g.target, 2);
    let b = &g.stages[1];
    assert_eq!(b.base, Source::Stage(0));
    let Op::Copy(c) = &b.ops[0].op else { panic!() };
    assert_eq!(c.from, Some(Source::Stage(0)));
    let Op::Exec(e) = &b.ops[1].op else { panic!() };
    assert_eq!(e.mounts[0].from, Some(Source::Stage(0)));
    // A stage built on another inherits its history (and its layers'
    // entries).
    assert_eq!(b.config.history.len(), 3);
}

#[test]
fn copy_lowering_expands_its_flags_and_keeps_heredoc_text_for_the_key() {
    let g = lower("FROM scratch\nARG U=5 M=644 D=dst\nCOPY --chown=$U --chmod=$M --exclude=*.tmp src/ $D/\nCOPY <<EOF /f\n$U\nEOF\n");
    let s = &g.stages[0];
    let Op::Copy(c) = &s.ops[0].op else { panic!() };
    assert_eq!(c.chown.as_deref(), Some("5"));
    assert_eq!(
        c.chmod.as_ref().map(|m| m.to_string()).as_deref(),
        Some("644")
    );
    assert_eq!(c.excludes, ["*.tmp"]);
    assert_eq!(c.dest, "/dst");
    assert!(c.dest_is_dir);
    assert!(c.from.is_none());
    let Op::Copy(h) = &s.ops[1].op else { panic!() };
    assert_eq!(h.heredocs[0].raw, "$U\n");
    assert_eq!(h.heredocs[0].data, "5\n");
    let hist: Vec<&str> = s
        .config
        .history
        .iter()
        .filter_map(|h| h.created_by.as_deref())
        .collect();
    assert_eq!(hist[1], "COPY --chown=5 --chmod=$M src/ dst/ # buildkit");
}

#[test]
fn hostile_input_fails_at_lowering_with_its_line() {
    // An empty VOLUME, an insecure RUN not allowed, an invalid signal, a
    // huge expansion: all refused before anything runs.
    for (df, line) in [
        ("FROM scratch\nARG E\nVOLUME $E\n", 3),
        ("FROM scratch\n\nRUN --security=insecure true\n", 3),
        ("FROM scratch\nSTOPSIGNAL SIGNOPE\n", 2),
    ] {
        match lower_with(df, &HashMap::new(), |_| {}) {
            Err(BuildError::Step { location, .. }) => assert_eq!(location.line, line, "{df}"),
            other => panic!("{df}: {other:?}"),
        }
    }
    let big = format!(
        "FROM scratch\nARG A={}\nENV B=$A$A$A$A$A$A$A$A$A$A$A$A$A$A$A$A$A$A$A$A\n",
        "x".repeat(1 << 20)
    );
    assert!(matches!(
        lower_with(&big, &HashMap::new(), |_| {}),
        Err(BuildError::Dockerfile(_))
    ));
}

#[test]
fn mounts_are_planned_at_lowering_targets_ids_and_checks() {
    let g = lower_with(
        "FROM scratch\nWORKDIR /w\nARG C=apk\n\
         RUN --mount=type=cache,target=c/$C --mount=type=ssh --mount=type=ssh,id=b,required=false --mount=type=secret,id=s,env=TOKEN,required=false true\n",
        &HashMap::new(),
        |o| {
            o.ssh = BTreeMap::from([("default".to_string(), "/tmp/agent".into())]);
        },
    )
    .expect("lower");
    let Op::Exec(e) = &g.stages[0].ops[1].op else {
        panic!()
    };
    let planned: Vec<(Option<&str>, &str)> = e
        .mounts
        .iter()
        .map(|m| (m.target.as_deref(), m.id.as_str()))
        .collect();
    assert_eq!(
        planned,
        [
            (Some("/w/c/apk"), "/w/c/apk"),
            (Some("/run/buildkit/ssh_agent.0"), "default"),
            (Some("/run/buildkit/ssh_agent.1"), "b"),
            (None, "s"),
        ]
    );
}

#[test]
fn hostile_mount_plans_are_refused_before_anything_runs() {
    for (df, why) in [
        (
            "FROM scratch\nRUN --mount=type=tmpfs,target=/a --mount=type=cache,target=/a true\n",
            "is the target of two mounts",
        ),
        (
            "FROM scratch\nRUN --mount=type=bind,target=/ true\n",
            "cannot mount over /",
        ),
        (
            "FROM scratch\nRUN --mount=type=tmpfs true\n",
            "mount target required",
        ),
        (
            "FROM scratch\nRUN --mount=type=secret,id=k,required=true true\n",
            "secret k not found",
        ),
        (
            "FROM scratch\nRUN --mount=type=ssh,required=true true\n",
            "no SSH agent socket",
        ),
    ] {
        match lower_with(df, &HashMap::new(), |_| {}) {
            Err(BuildError::Step {
                location, message, ..
            }) if location.line == 2 => {
                assert!(message.contains(why), "{df}: {message}")
            }
            other => panic!("{df}: {other:?}"),
        }
    }
}

// ---- platforms (issue 17) ----

fn arm64() -> Platform {
    kiln_image::platform::parse("linux/arm64").expect("platform")
}

fn lower_for(df: &str, target: &Platform) -> Result<Graph, BuildError> {
    let opts = BuildOptions {
        dockerfile: df.to_string(),
        ..Default::default()
    };
    let parsed = kiln_parser::parse(df)?;
    let p = plan::plan_for(&parsed, &opts.build_args, None, target)?;
    frontend::lower(
        &parsed,
        &p,
        &opts,
        "2024-01-01T00:00:00Z",
        &HashMap::<String, ImageConfig>::new(),
    )
}

fn exec_env(g: &Graph, stage: usize, op: usize) -> Vec<(String, String)> {
    match &g.stages[stage].ops[op].op {
        Op::Exec(e) => e.env.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn automatic_platform_args_are_global_in_from_and_scoped_in_stages() {
    let host = plan::host_platform();
    // In FROM lines they are defined without a declaration.
    let d = kiln_parser::parse("FROM busybox:$TARGETARCH-$BUILDARCH\n").expect("parse");
    let p = plan::plan_for(&d, &BTreeMap::new(), None, &arm64()).expect("plan");
    assert_eq!(
        p.stages[0].base,
        plan::Base::Image(format!("busybox:arm64-{}", host.architecture))
    );
    // Inside a stage only after `ARG NAME`; values for the target.
    let g = lower_for(
        "FROM scratch\nRUN echo\nARG TARGETARCH TARGETPLATFORM TARGETVARIANT BUILDARCH BUILDOS\nRUN echo\n",
        &arm64(),
    )
    .expect("lower");
    let before = exec_env(&g, 0, 0);
    assert!(
        !before
            .iter()
            .any(|(k, _)| k.starts_with("TARGET") || k.starts_with("BUILD")),
        "{before:?}"
    );
    let after = exec_env(&g, 0, 1);
    for (k, v) in [
        ("TARGETARCH", "arm64"),
        ("TARGETPLATFORM", "linux/arm64"),
        ("TARGETVARIANT", ""),
        ("BUILDARCH", host.architecture.as_str()),
        ("BUILDOS", "linux"),
    ] {
        assert!(
            after.contains(&(k.to_string(), v.to_string())),
            "{k}: {after:?}"
        );
    }
    // The stage's image config and RUN are for the target.
    let s = &g.stages[0];
    assert_eq!(s.config.architecture, "arm64");
    assert_eq!(s.platform, arm64());
    assert!(matches!(&s.ops[0].op, Op::Exec(e) if e.platform == arm64()));
}

#[test]
fn from_platform_buildplatform_runs_natively_and_stages_inherit_their_base_platform() {
    let g = lower_for(
        "FROM --platform=$BUILDPLATFORM scratch AS build\nARG TARGETARCH\nRUN echo $TARGETARCH\n\
         FROM build AS more\nRUN true\n\
         FROM scratch\nCOPY --from=more / /\n",
        &arm64(),
    )
    .expect("lower");
    let host = plan::host_platform();
    assert_eq!(g.stages[0].platform, host);
    assert!(matches!(&g.stages[0].ops[0].op, Op::Exec(e) if e.platform == host));
    assert!(exec_env(&g, 0, 0).contains(&("TARGETARCH".into(), "arm64".into())));
    // FROM <stage> keeps the stage's platform (BuildKit's rule).
    assert_eq!(g.stages[1].platform, host);
    assert_eq!(g.stages[2].platform, arm64());
    assert_eq!(g.stages[2].config.architecture, "arm64");
    assert_eq!(g.platform, arm64());
}

#[test]
fn the_platform_is_part_of_a_run_key() {
    let df = "FROM scratch\nRUN true\n";
    let digest = |p: &Platform| match &lower_for(df, p).expect("lower").stages[0].ops[0].op {
        op @ Op::Exec(_) => op.definition_digest(),
        other => panic!("{other:?}"),
    };
    assert_ne!(digest(&plan::host_platform()), digest(&arm64()));
    assert_eq!(digest(&arm64()), digest(&arm64()));
}

/// Hostile: garbage in `FROM --platform=` (as written or expanded) is an
/// error at the FROM line naming the value, before any image is asked for.
#[test]
fn from_platform_garbage_is_a_located_error() {
    for (df, why) in [
        (
            "FROM scratch\nFROM --platform=linux/../../etc busybox\n",
            "invalid platform",
        ),
        (
            "FROM scratch\nFROM --platform=$NOPE busybox\n",
            "invalid platform",
        ),
        (
            "FROM scratch\nFROM --platform=a/b/c/d busybox\n",
            "more than three",
        ),
        (
            "FROM scratch\nFROM --platform=${X:?unset} busybox\n",
            "unset",
        ),
    ] {
        match lower_for(df, &plan::host_platform()) {
            Err(BuildError::Step {
                location, message, ..
            }) if location.line == 2 => {
                assert!(message.contains(why), "{df}: {message}")
            }
            other => panic!("{df}: {other:?}"),
        }
    }
}

/// The ARG prelude of the amplification attacks below: `a16` is 1 MiB.
fn doubled_args() -> String {
    let mut s = String::from("ARG a0=xxxxxxxxxxxxxxxx\n");
    for i in 1..=16 {
        s.push_str(&format!("ARG a{i}=$a{}$a{}\n", i - 1, i - 1));
    }
    s
}

/// A Dockerfile that multiplies one 1 MiB ARG into memory — as global
/// ARGs, into every RUN's environment, into ever-longer WORKDIRs, into
/// stage after stage — fails at a line, quickly, instead of taking the
/// machine's memory.
#[test]
fn amplified_args_fail_at_a_line_instead_of_taking_the_memory() {
    let started = std::time::Instant::now();
    let p = doubled_args();
    // Global ARGs: 100 copies of 1 MiB.
    let global = format!("{p}{}FROM scratch\n", "ARG c=$a16\n".repeat(100));
    let e = lower_with(&global, &HashMap::new(), |_| {}).expect_err("refused");
    assert!(e.to_string().contains("MiB"), "{e}");
    // Every RUN copies the environment.
    let runs = format!("FROM scratch\n{p}ENV big=$a16\n{}", "RUN x\n".repeat(2000));
    let e = lower_with(&runs, &HashMap::new(), |_| {}).expect_err("refused");
    assert!(e.to_string().contains("MiB"), "{e}");
    // WORKDIR grows by 1 MiB a line.
    let wd = format!("FROM scratch\n{p}{}", "WORKDIR $a16\n".repeat(50));
    let e = lower_with(&wd, &HashMap::new(), |_| {}).expect_err("refused");
    assert!(e.to_string().contains("4096"), "{e}");
    // Stage after stage copies its base's state.
    let mut stages = format!("FROM scratch AS s0\n{p}ENV e=$a16\n");
    for i in 1..1000 {
        stages.push_str(&format!("FROM s{} AS s{i}\n", i - 1));
    }
    let e = lower_with(&stages, &HashMap::new(), |_| {}).expect_err("refused");
    assert!(e.to_string().contains("MiB"), "{e}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

/// `${V//pattern/x}` costs pattern length × value length: 512 KiB of `?`
/// against 512 KiB of `x`, over and over, stops at the budget with an
/// error instead of running for hours.
#[test]
fn costly_pattern_substitutions_stop_at_the_budget() {
    let started = std::time::Instant::now();
    let mut df = String::from("FROM scratch\nARG p0=????????????????\nARG b0=xxxxxxxxxxxxxxxx\n");
    for i in 1..=15 {
        df.push_str(&format!(
            "ARG p{i}=$p{}$p{}\nARG b{i}=$b{}$b{}\n",
            i - 1,
            i - 1,
            i - 1,
            i - 1
        ));
    }
    df.push_str(&"ENV r=${b15//$p15/y}\n".repeat(40));
    let e = lower_with(&df, &HashMap::new(), |_| {}).expect_err("refused");
    assert!(e.to_string().contains("too costly"), "{e}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
}

/// A base image's ONBUILD trigger is one instruction, as BuildKit
/// requires: a trigger carrying several lines (another FROM, a chained
/// ONBUILD) is refused at the FROM that would run it.
#[test]
fn an_onbuild_trigger_is_one_instruction() {
    for trigger in [
        "RUN a\nRUN b",
        "RUN a\nFROM x\nRUN b",
        "ONBUILD RUN x",
        "MAINTAINER me",
    ] {
        let mut cfg = ImageConfig::new(&Platform::host());
        cfg.config_mut().on_build = Some(vec![trigger.to_string()]);
        let images = HashMap::from([("base".to_string(), cfg)]);
        let e = lower_with("FROM base\nRUN ok\n", &images, |_| {})
            .err()
            .unwrap_or_else(|| panic!("trigger {trigger:?} ran"));
        assert!(e.to_string().contains("ONBUILD"), "{trigger:?}: {e}");
    }
    // A base with more triggers than kiln runs is refused at its FROM,
    // before any is parsed; one at the cap runs.
    for (n, ok) in [(1024, true), (1025, false)] {
        let mut cfg = ImageConfig::new(&Platform::host());
        cfg.config_mut().on_build = Some(vec!["RUN true".to_string(); n]);
        let images = HashMap::from([("base".to_string(), cfg)]);
        let r = lower_with("FROM base\nRUN ok\n", &images, |_| {});
        match r {
            Ok(_) => assert!(ok, "{n} triggers ran"),
            Err(e) => {
                assert!(!ok, "{n} triggers: {e}");
                assert!(e.to_string().contains("at most 1024"), "{e}");
            }
        }
    }
}

/// Hostile Dockerfiles are lowered in linear time and bounded memory, or
/// refused at their line: 100,000 `ENV` lines (each cloned the whole
/// environment and summed the whole config before), 5,000 chained
/// `ONBUILD`s (one stack frame per word: a crash), 5,000 stages, an
/// `EXPOSE` of every port a thousand times (4.4 GB), a duration past
/// Go's int64 of nanoseconds.
#[test]
fn hostile_dockerfiles_are_bounded() {
    let t = std::time::Instant::now();
    let mut df = String::from("FROM scratch\n");
    for i in 0..100_000 {
        df.push_str(&format!("ENV K{}=v\n", i % 1000));
    }
    let e = lower_with(&df, &HashMap::new(), |_| {}).expect_err("config too big");
    assert!(e.to_string().contains("limit"), "{e}");
    let mut df = String::from("FROM scratch\n");
    for i in 0..20_000 {
        df.push_str(&format!("ENV K{i}=$K{}\n", i / 2));
    }
    lower(&df);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        t.elapsed()
    );

    let onbuild = format!("FROM scratch\n{}RUN true\n", "ONBUILD ".repeat(5000));
    let e = lower_with(&onbuild, &HashMap::new(), |_| {}).expect_err("chained");
    assert!(e.to_string().contains("Chaining ONBUILD"), "{e}");

    let mut stages = String::from("FROM scratch AS s0\n");
    for i in 0..5000 {
        stages.push_str(&format!("FROM s{i} AS s{}\n", i + 1));
    }
    let e = lower_with(&stages, &HashMap::new(), |_| {}).expect_err("stages");
    assert!(e.to_string().contains("at most 4096 stages"), "{e}");

    let expose = format!("FROM scratch\nEXPOSE{}\n", " 1-65535".repeat(1000));
    let e = lower_with(&expose, &HashMap::new(), |_| {}).expect_err("ports");
    assert!(e.to_string().contains("more than"), "{e}");

    let e = lower_with(
        "FROM scratch\nHEALTHCHECK --interval=9999999999h CMD x\n",
        &HashMap::new(),
        |_| {},
    )
    .expect_err("duration");
    assert!(e.to_string().contains("invalid duration"), "{e}");
}

/// `EXPOSE` and `STOPSIGNAL` read as BuildKit reads them: a published
/// form counts its container port, an empty protocol is tcp, the
/// protocol any case; the history keeps the order written. A signal name
/// in any case, with or without `SIG`, or any nonzero number.
#[test]
fn expose_and_stopsignal_read_as_buildkit() {
    let g =
        lower("FROM scratch\nEXPOSE 8080:80 80/ 90/UDP 127.0.0.1:1:2/sctp\nSTOPSIGNAL sigterm\n");
    let s = &g.stages[0];
    let c = s.config.config.as_ref().expect("config");
    let ports: Vec<&String> = c.exposed_ports.as_ref().expect("ports").keys().collect();
    assert_eq!(ports, ["2/sctp", "80/tcp", "90/udp"]);
    assert_eq!(c.stop_signal.as_deref(), Some("sigterm"));
    let hist: Vec<&str> = s
        .config
        .history
        .iter()
        .filter_map(|h| h.created_by.as_deref())
        .collect();
    // The words sorted as written (BuildKit's parser sorts them), then
    // expanded in that order, repeats kept.
    assert_eq!(hist[0], "EXPOSE [2/sctp 80/tcp 80/tcp 90/udp]");
    for ok in ["100", "SIGRTMIN+3", "rtmax-1", "SIGIOT"] {
        lower(&format!("FROM scratch\nSTOPSIGNAL {ok}\n"));
    }
    for bad in ["0", "SIGSIGTERM", "RTMIN+16", "NOPE"] {
        let e = lower_with(
            &format!("FROM scratch\nSTOPSIGNAL {bad}\n"),
            &HashMap::new(),
            |_| {},
        )
        .expect_err(bad);
        assert!(e.to_string().contains("Invalid signal"), "{bad}: {e}");
    }
}

/// An ONBUILD trigger of a base stage that copies from another stage
/// makes that stage part of the build (it was pruned: "stage 0 is not
/// part of the build"), as BuildKit's initOnBuildTriggers.
#[test]
fn an_onbuild_copy_from_a_stage_keeps_that_stage() {
    let g = lower(
        "FROM scratch AS src\nCOPY a /a\nFROM scratch AS base\nONBUILD COPY --from=src /a /a\nFROM base\n",
    );
    assert!(g.stages.iter().any(|s| s.index == 0), "src was pruned");
}

/// A `--mount` value whose variable expands to commas stays one field's
/// value (BuildKit splits the fields first, then expands each): a build
/// argument `foo,target=/etc` is the cache's id, never a new target.
#[test]
fn a_mount_value_expanding_to_commas_adds_no_field() {
    let g = lower_with(
        "FROM scratch\nARG ID\nRUN --mount=type=cache,target=/c,id=$ID true\n",
        &HashMap::new(),
        |o| {
            o.build_args.insert("ID".into(), "foo,target=/etc".into());
        },
    )
    .expect("lower");
    let ops = &g.stages[0].ops;
    let Some(Op::Exec(e)) = ops.iter().map(|o| &o.op).find(|o| matches!(o, Op::Exec(_))) else {
        panic!("no exec op");
    };
    let m = &e.mounts[0];
    assert_eq!(m.target.as_deref(), Some("/c"), "{m:?}");
    assert_eq!(m.id, "foo,target=/etc", "{m:?}");
}

/// `ENV` on a base whose Env repeats a key replaces the first entry
/// (BuildKit's addEnv); `EXPOSE +80` and `STOPSIGNAL RTMIN++1` are
/// refused as Go's parsers refuse them.
#[test]
fn env_replaces_the_first_repeat_and_signs_are_refused() {
    let mut cfg = ImageConfig::new(&Platform::host());
    cfg.config_mut().env = Some(vec!["PATH=/bin".into(), "A=1".into(), "A=2".into()]);
    let images = HashMap::from([("base".to_string(), cfg)]);
    let g = lower_with("FROM base\nENV A=3\n", &images, |_| {}).expect("lower");
    let env = g.stages[0]
        .config
        .config
        .as_ref()
        .and_then(|c| c.env.clone());
    assert_eq!(
        env,
        Some(vec!["PATH=/bin".into(), "A=3".into(), "A=2".into()])
    );
    for bad in ["EXPOSE +80", "STOPSIGNAL RTMIN++1"] {
        lower_with(&format!("FROM scratch\n{bad}\n"), &HashMap::new(), |_| {}).expect_err(bad);
    }
}
