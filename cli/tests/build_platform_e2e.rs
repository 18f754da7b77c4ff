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

/// `-o type=local` of two platforms writes `dest/linux_amd64` and
/// `dest/linux_arm64`; a symlink by that name already in dest (left by an
/// earlier export of an untrusted image) is refused, never followed out.
#[test]
fn a_symlinked_platform_directory_in_a_local_dest_is_not_followed() {
    if !common::prerequisites() {
        return;
    }
    let k = common::Kiln::with_busybox();
    let tmp = tempfile::tempdir().expect("tmp");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    let out = tmp.path().join("out");
    let link = context(&[(
        "Dockerfile",
        &format!(
            "FROM busybox\nRUN ln -s {} /linux_arm64\n",
            outside.display()
        ),
    )]);
    let dest = format!("type=local,dest={}", out.display());
    k.build(link.path(), &["-o", &dest]);
    assert!(std::fs::symlink_metadata(out.join("linux_arm64"))
        .expect("the image's link")
        .file_type()
        .is_symlink());
    let two = context(&[("Dockerfile", "FROM scratch\nCOPY f /f\n"), ("f", "data\n")]);
    let o = k.run(&[
        "build",
        "-q",
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        &dest,
        two.path().to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("linux_arm64 exists and is not a directory"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&outside).expect("ls").count(),
        0,
        "written through the link"
    );
    // A fresh dest gets both directories.
    let fresh = tmp.path().join("fresh");
    let dest = format!("type=local,dest={}", fresh.display());
    k.build(
        two.path(),
        &["--platform", "linux/amd64,linux/arm64", "-o", &dest],
    );
    for p in ["linux_amd64", "linux_arm64"] {
        assert_eq!(read(&fresh.join(p).join("f")), "data", "{p}");
    }
}

/// `--platform linux/arm64` of a base that is one linux/amd64 manifest
/// (no index): the error says so (it used to call the manifest "for
/// platform linux/arm64" with a config that lies), for `pull` and `FROM`.
#[test]
fn a_single_platform_base_of_another_platform_is_named_as_such() {
    if !ready(&["docker-registry"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let c = Client::new(true);
    let name = format!("{}/kiln/amd64only:1", reg.host());
    c.ok(&["tag", "busybox:latest", &name]);
    c.ok(&["push", "-q", &name]);
    let fresh = Client::new(false);
    let o = fresh.run(&["pull", "--platform", "linux/arm64", &name]);
    assert!(!o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    let want = format!("no linux/arm64 image: {name} is a single-platform image for linux/amd64");
    assert!(err.contains(&want), "{err}");
    let ctx = context(&[("Dockerfile", &format!("FROM {name}\nRUN true\n"))]);
    let err = common::build_fails(&fresh.kiln, ctx.path(), &["--platform", "linux/arm64"]);
    assert!(err.contains(&want), "{err}");
}

/// `kiln save` of a built index without the host's platform, without
/// `--platform`: the error lists what it has and names the flag; with
/// one of them it saves.
#[test]
fn saving_an_index_without_the_hosts_platform_names_the_flag() {
    if !common::prerequisites() {
        return;
    }
    let k = common::Kiln::new();
    let ctx = context(&[("Dockerfile", "FROM scratch\nCOPY f /f\n"), ("f", "x\n")]);
    k.build(
        ctx.path(),
        &["--platform", "linux/s390x,linux/ppc64le", "-t", "foreign:1"],
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("f.tar");
    let o = k.run(&["save", "-o", out.to_str().expect("utf-8"), "foreign:1"]);
    assert!(!o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("it has: linux/s390x, linux/ppc64le; name one with --platform"),
        "{err}"
    );
    k.ok(&[
        "save",
        "--platform",
        "linux/s390x",
        "-o",
        out.to_str().expect("utf-8"),
        "foreign:1",
    ]);
    assert!(out.is_file());
}

/// A RUN for a platform this machine cannot run (no binfmt_misc handler,
/// or an architecture kiln has no ELF machine for) fails before the step
/// runs, at the RUN's line, naming the platform; a COPY-only build for
/// that platform needs no emulation and succeeds. (The machine's own
/// handlers are never touched: the unknown architecture takes the same
/// path through `emulation::check` as a missing handler.)
#[test]
fn a_run_for_a_platform_without_emulation_fails_before_the_step_at_its_line() {
    if !common::prerequisites() {
        return;
    }
    let c = Client::new(true);
    c.ok(&[
        "import",
        "--platform",
        "linux/sparc64",
        busybox_rootfs_tar().to_str().expect("utf-8"),
        "sparcbox:1",
    ]);
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM sparcbox:1\nCOPY f /f\nRUN echo MARK$((6*7))X\n",
        ),
        ("f", "data\n"),
    ]);
    let err = common::build_fails(&c.kiln, ctx.path(), &["--platform", "linux/sparc64"]);
    assert!(
        err.contains("RUN for linux/sparc64 needs emulation"),
        "{err}"
    );
    assert!(err.contains(":3"), "the error names line 3: {err}");
    assert!(
        !err.contains("MARK42X"),
        "the step must not have run: {err}"
    );
    let copy_only = context(&[("Dockerfile", "FROM sparcbox:1\nCOPY f /f\n"), ("f", "x\n")]);
    let o = c.run(&[
        "build",
        "-q",
        "--platform",
        "linux/sparc64",
        "-t",
        "sparc-copy:1",
        copy_only.path().to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{o:?}");
    let o = c.run(&["inspect", "sparc-copy:1"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect prints JSON");
    let arch = v
        .pointer("/0/Architecture")
        .or_else(|| v.pointer("/Architecture"));
    assert_eq!(arch.and_then(|a| a.as_str()), Some("sparc64"), "{v}");
}

/// An emulated step reaches QEMU's binary through `/proc/self/exe` (the
/// kernel runs the interpreter it pinned at registration): kiln's
/// registration pins a read-only copy, so a step running as root cannot
/// change the host's file (a `chmod 4755` made QEMU setuid root: local
/// root for any user).
#[test]
fn an_emulated_step_cannot_change_the_hosts_qemu() {
    if !ready(&["docker-registry", "skopeo"]) || !arm64_emulation() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = busybox_amd64_arm64(&reg);
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM --platform=linux/arm64 {base}\nRUN chmod 4755 /proc/self/exe 2>&1; chmod 4755 /proc/self/exe || echo REFUSED\n"
        ),
    )]);
    let qemu = std::path::Path::new("/usr/bin/qemu-aarch64-static");
    let before = std::fs::metadata(qemu).map(|m| m.permissions());
    let c = Client::new(false);
    let progress = build(&c, ctx.path(), &["--no-cache"]);
    assert!(progress.contains("REFUSED"), "{progress}");
    assert_eq!(
        std::fs::metadata(qemu).map(|m| m.permissions()).ok(),
        before.ok(),
        "the host's QEMU changed"
    );
}
