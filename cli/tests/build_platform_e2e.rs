//! `kiln build --platform` end to end (issue 17): busybox bases for amd64
//! and arm64 made from Debian's busybox-static, pushed as one index to a
//! test registry; a cross-compile Dockerfile built for both platforms in
//! one command (the `FROM --platform=$BUILDPLATFORM` stage runs natively
//! per target, the final stage's RUN for arm64 under QEMU), the index
//! pushed and read back with skopeo, the arm64 image run by podman, a
//! cached rebuild that runs nothing, SOURCE_DATE_EPOCH giving the same
//! index digest from two stores, `-o type=oci`, the docker exporter's
//! refusal, and hostile `--platform` values.
//!
//! Needs root, busybox-static, docker-registry, skopeo, podman, runc,
//! apt access for the foreign busybox (cached after the first run) and
//! qemu-user-static registered with the F flag (`kiln system binfmt`):
//! under CI=true a missing one fails the test, elsewhere it prints "not
//! run".

mod common;

use std::path::Path;
use std::process::Command;

use common::registry::{push_busybox_index, raw, ready, sh, Client, Reg, RegOpts};
use common::{busybox_rootfs_tar, context, foreign_rootfs_tar};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether RUN for linux/arm64 can run here, on an x86_64 host (fails
/// under CI when not).
fn arm64_emulation() -> bool {
    if !cfg!(target_arch = "x86_64") {
        assert!(!in_ci(), "these tests build arm64 on an x86_64 host");
        eprintln!("not an x86_64 host: not run");
        return false;
    }
    match kiln_executor::emulation::check("linux", "arm64", None) {
        Ok(_) => true,
        Err(e) => {
            assert!(!in_ci(), "{e}");
            eprintln!("{e}: not run");
            false
        }
    }
}

const SDE: &str = "1700000000";

/// Busybox for linux/amd64 and linux/arm64 pushed to `reg` as one index;
/// its reference.
fn busybox_amd64_arm64(reg: &Reg) -> String {
    push_busybox_index(
        reg,
        "multi",
        &[
            ("amd64", busybox_rootfs_tar(), "linux/amd64"),
            ("arm64", foreign_rootfs_tar("arm64"), "linux/arm64"),
        ],
    )
}

/// The cross-compile pattern: the build stage runs on the build platform
/// and writes per-`$TARGETARCH` output; the final stage is per platform.
fn dockerfile(base: &str) -> String {
    format!(
        "FROM --platform=$BUILDPLATFORM {base} AS build\n\
         ARG TARGETARCH BUILDARCH\n\
         RUN mkdir /out && echo \"built on $(uname -m) for $TARGETARCH ($BUILDARCH)\" > /out/info\n\
         FROM {base}\n\
         ARG TARGETARCH TARGETPLATFORM\n\
         COPY --from=build /out/info /info\n\
         RUN uname -m > /uname && echo \"$TARGETARCH $TARGETPLATFORM\" > /target\n"
    )
}

/// `kiln build --progress=plain EXTRA… CTX` with SOURCE_DATE_EPOCH set;
/// asserts success; returns the progress output.
fn build(c: &Client, ctx: &Path, extra: &[&str]) -> String {
    let mut args = vec!["build", "--progress=plain"];
    args.extend_from_slice(extra);
    args.push(ctx.to_str().expect("utf-8"));
    let o = c
        .cmd()
        .env("SOURCE_DATE_EPOCH", SDE)
        .args(&args)
        .output()
        .expect("kiln");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "kiln {args:?} failed:\n{err}");
    err
}

/// The progress ids of the RUN steps, each with whether it was CACHED.
fn runs(progress: &str) -> Vec<(String, bool)> {
    progress
        .lines()
        .filter(|l| l.starts_with('#') && l.contains("] RUN "))
        .map(|l| {
            let id = l.split_whitespace().next().unwrap_or_default().to_string();
            let cached = progress.lines().any(|x| x.trim() == format!("{id} CACHED"));
            (l.to_string(), cached)
        })
        .collect()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

#[test]
fn two_platforms_one_index_pushed_run_cached_and_reproducible() {
    if !ready(&["docker-registry", "skopeo", "podman", "runc"]) || !arm64_emulation() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = busybox_amd64_arm64(&reg);
    let app = format!("{}/kiln/app:1", reg.host());
    let ctx = context(&[("Dockerfile", &dockerfile(&base))]);
    let out = tempfile::tempdir().expect("tmp");
    let local = out.path().join("local");
    let c = Client::new(false);
    let progress = build(
        &c,
        ctx.path(),
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-t",
            &app,
            "-o",
            &format!("type=registry,name={app}"),
            "-o",
            &format!("type=local,dest={}", local.display()),
        ],
    );
    // Progress names carry the platform, as BuildKit's do.
    assert!(progress.contains("[linux/arm64 build"), "{progress}");
    // The build stage ran natively, once per target (its RUN reads
    // $TARGETARCH); the final stage's RUN ran as aarch64 under QEMU.
    let d = |p: &str, f: &str| read(&local.join(p).join(f));
    assert_eq!(
        d("linux_amd64", "info"),
        "built on x86_64 for amd64 (amd64)"
    );
    assert_eq!(
        d("linux_arm64", "info"),
        "built on x86_64 for arm64 (amd64)"
    );
    assert_eq!(d("linux_amd64", "uname"), "x86_64");
    assert_eq!(d("linux_arm64", "uname"), "aarch64");
    assert_eq!(d("linux_arm64", "target"), "arm64 linux/arm64");
    let ran = runs(&progress);
    assert_eq!(ran.len(), 4, "{ran:?}");
    assert!(ran.iter().all(|(_, cached)| !cached), "{ran:?}");

    // The pushed index, read back with skopeo: both manifests, right
    // platforms, OCI media types.
    let index: serde_json::Value = serde_json::from_slice(&raw(&app)).expect("index");
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    let plats: Vec<String> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap_or_default(),
                m["platform"]["architecture"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(plats, ["linux/amd64", "linux/arm64"], "{index}");
    let arm = sh(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--override-arch",
        "arm64",
        &format!("docker://{app}"),
    ]))
    .stdout;
    let arm: serde_json::Value = serde_json::from_slice(&arm).expect("inspect");
    assert_eq!(arm["Architecture"], "arm64", "{arm}");

    // The store keeps the index under the tag.
    let v: serde_json::Value =
        serde_json::from_str(&c.stdout(&["inspect", "--platform", "linux/arm64", &app]))
            .expect("inspect");
    assert_eq!(v[0]["Architecture"], "arm64", "{v}");

    // A cached rebuild of both platforms runs nothing.
    let again = build(
        &c,
        ctx.path(),
        &["--platform", "linux/amd64,linux/arm64", "-t", &app],
    );
    let ran = runs(&again);
    assert_eq!(ran.len(), 4, "{again}");
    assert!(ran.iter().all(|(_, cached)| *cached), "{again}");

    // SOURCE_DATE_EPOCH: another store gives the same index digest.
    let id = |c: &Client| {
        let o = c
            .cmd()
            .env("SOURCE_DATE_EPOCH", SDE)
            .args([
                "build",
                "-q",
                "--platform",
                "linux/arm64,linux/amd64,linux/arm64",
                ctx.path().to_str().expect("utf-8"),
            ])
            .output()
            .expect("kiln");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let other = Client::new(false);
    let first = id(&c);
    assert!(first.starts_with("sha256:"), "{first}");
    assert_eq!(first, id(&other));

    // -o type=oci: index.json names the image index, which lists both.
    let oci = out.path().join("oci.tar");
    build(
        &c,
        ctx.path(),
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            &format!("type=oci,dest={},name=app:1", oci.display()),
        ],
    );
    let layout = out.path().join("layout");
    std::fs::create_dir(&layout).expect("mkdir");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-xf")
        .arg(&oci));
    let top: serde_json::Value =
        serde_json::from_str(&read(&layout.join("index.json"))).expect("index.json");
    let entry = &top["manifests"][0];
    assert_eq!(
        entry["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{top}"
    );
    let digest = entry["digest"].as_str().expect("digest");
    let inner: serde_json::Value = serde_json::from_str(&read(
        &layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    ))
    .expect("index");
    assert_eq!(
        inner["manifests"].as_array().map(Vec::len),
        Some(2),
        "{inner}"
    );
    for m in inner["manifests"].as_array().expect("manifests") {
        let d = m["digest"].as_str().expect("digest");
        assert!(
            layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:"))
                .exists(),
            "{d} missing from the layout"
        );
    }

    // podman runs the arm64 image (saved for that platform) under QEMU.
    assert_eq!(
        common::registry::podman_uname_arm64(&c, out.path(), &app),
        "aarch64"
    );
}

/// `--platform` of the host alone is a plain build: the same image as no
/// `--platform` (a cache hit), no index; and a Docker manifest list with
/// `oci-mediatypes=false`.
#[test]
fn the_hosts_platform_alone_is_a_plain_image_and_docker_media_types_give_a_manifest_list() {
    if !ready(&["docker-registry", "skopeo"]) || !arm64_emulation() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = busybox_amd64_arm64(&reg);
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nARG TARGETARCH\nRUN echo $TARGETARCH > /t\n"),
    )]);
    let c = Client::new(false);
    let plain = c.build(ctx.path(), &["-t", "plain:1"]);
    let host = c.build(ctx.path(), &["--platform", "linux/amd64", "-t", "host:1"]);
    assert_eq!(plain, host);
    let v: serde_json::Value =
        serde_json::from_str(&c.stdout(&["inspect", "host:1"])).expect("inspect");
    assert_eq!(v[0]["Architecture"], "amd64", "{v}");
    assert_eq!(v[0]["Id"], host.as_str(), "{v}");

    let list = format!("{}/kiln/list:1", reg.host());
    build(
        &c,
        ctx.path(),
        &[
            "--platform",
            "linux/amd64",
            "--platform",
            "linux/arm64",
            "-o",
            &format!("type=registry,name={list},oci-mediatypes=false"),
        ],
    );
    let index: serde_json::Value = serde_json::from_slice(&raw(&list)).expect("index");
    assert_eq!(
        index["mediaType"], "application/vnd.docker.distribution.manifest.list.v2+json",
        "{index}"
    );
    for m in index["manifests"].as_array().expect("manifests") {
        assert_eq!(
            m["mediaType"], "application/vnd.docker.distribution.manifest.v2+json",
            "{index}"
        );
    }

    // `kiln push` of a built index pushes it whole.
    let pushed = format!("{}/kiln/pushed:1", reg.host());
    build(
        &c,
        ctx.path(),
        &["--platform", "linux/amd64,linux/arm64", "-t", &pushed],
    );
    c.ok(&["push", "-q", &pushed]);
    let index: serde_json::Value = serde_json::from_slice(&raw(&pushed)).expect("index");
    assert_eq!(
        index["manifests"].as_array().map(Vec::len),
        Some(2),
        "{index}"
    );

    // The registry cache holds every platform's steps: a fresh store
    // importing it runs nothing for either platform.
    let cache = format!("{}/kiln/cache:1", reg.host());
    build(
        &c,
        ctx.path(),
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--cache-to",
            &format!("type=registry,ref={cache},mode=max"),
        ],
    );
    let fresh = Client::new(false);
    let progress = build(
        &fresh,
        ctx.path(),
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--cache-from",
            &format!("type=registry,ref={cache}"),
        ],
    );
    let ran = runs(&progress);
    assert_eq!(ran.len(), 2, "{progress}");
    assert!(ran.iter().all(|(_, cached)| *cached), "{progress}");
}

/// Hostile and refused: a bogus `--platform`, garbage in `FROM
/// --platform=`, and the docker exporter with two platforms.
#[test]
fn bogus_platforms_and_the_docker_exporter_with_two_are_refused() {
    if !common::prerequisites() {
        return;
    }
    let c = Client::new(true);
    let ctx = context(&[("Dockerfile", "FROM busybox\nRUN true\n")]);
    let p = ctx.path().to_str().expect("utf-8");
    for bad in [
        "linux/../../etc",
        "linux/amd64,,linux/a?b",
        "a/b/c/d",
        &"x".repeat(300),
    ] {
        let o = c.run(&["build", "-q", "--platform", bad, p]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("invalid platform"), "{bad}: {err}");
    }
    let o = c.run(&[
        "build",
        "-q",
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        "type=docker,dest=/dev/null",
        p,
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("docker exporter does not currently support exporting manifest lists"),
        "{err}"
    );
    let bad = context(&[(
        "Dockerfile",
        "FROM busybox\nFROM --platform=linux/$(id) busybox\nRUN true\n",
    )]);
    let err = common::build_fails(&c.kiln, bad.path(), &[]);
    assert!(err.contains("invalid platform"), "{err}");
    assert!(err.contains(":2"), "the error names line 2: {err}");
}
