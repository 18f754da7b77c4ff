//! Registry end to end: Debian's `docker-registry` (distribution 2.8) on
//! 127.0.0.1 — plain, with htpasswd basic auth, with TLS from a test CA —
//! and real clients (skopeo) on both sides of kiln's push and pull.
//!
//! Needs root, busybox-static, docker-registry, skopeo, htpasswd
//! (apache2-utils) and openssl: under CI=true a missing tool fails the
//! test, elsewhere the test prints "not run".

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::context;
use common::registry::{ready, sh, Client, NoStreamProxy, Reg, RegOpts, SlowProxy};

fn skopeo_inspect(args: &[&str]) -> serde_json::Value {
    let o = sh(Command::new("skopeo").arg("inspect").args(args));
    serde_json::from_slice(&o.stdout).expect("skopeo json")
}

fn app_context() -> tempfile::TempDir {
    context(&[
        (
            "Dockerfile",
            "FROM busybox\nRUN echo built-by-run > /run.txt\nCOPY hello.txt /hello.txt\nCMD [\"cat\", \"/hello.txt\"]\n",
        ),
        ("hello.txt", "hello registry\n"),
    ])
}

#[test]
fn push_to_plain_registry_then_skopeo_inspects_and_fresh_store_builds_from_it() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let a = Client::new(true);
    let ctx = app_context();
    let name = format!("{}/kiln/app:1", reg.host());
    a.build(ctx.path(), &["-t", &name]);
    let out = a.ok(&["push", &name]);
    assert!(out.contains("push complete"), "{out}");
    let digest = a.stdout(&["push", "-q", &name]);
    assert!(digest.starts_with("sha256:"), "{digest}");

    // a real client reads what kiln pushed
    let docker_ref = format!("docker://{name}");
    let v = skopeo_inspect(&["--tls-verify=false", &docker_ref]);
    assert_eq!(v["Digest"], digest.as_str());
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(3), "{v}");
    let raw =
        sh(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", &docker_ref]));
    let m: serde_json::Value = serde_json::from_slice(&raw.stdout).expect("manifest");
    for l in m["layers"].as_array().expect("layers") {
        assert_eq!(
            l["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
            "{m}"
        );
    }

    // second push: every blob exists, compressed blobs come from the memo
    let again = a.ok(&["push", &name]);
    assert!(again.contains("already exists"), "{again}");
    assert!(again.contains("blob found"), "{again}");
    assert!(!again.contains("compressing"), "{again}");

    // an image named only locally, pushed to two repositories of the
    // registry: the store remembers where it pushed each blob, so the
    // second push mounts every blob instead of uploading it
    let c = Client::new(true);
    c.build(ctx.path(), &["-t", "plain:1"]);
    let one = format!("{}/kiln/one:1", reg.host());
    let two = format!("{}/kiln/two:1", reg.host());
    let out = c.ok(&["push", "plain:1", &one]);
    assert!(!out.contains("mounted"), "{out}");
    let out = c.ok(&["push", "plain:1", &two]);
    assert_eq!(
        out.matches("mounted from another repository").count(),
        4,
        "{out}"
    );
    assert!(!out.contains("push complete"), "{out}");
    let v = skopeo_inspect(&["--tls-verify=false", &format!("docker://{two}")]);
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(3), "{v}");

    // a fresh store builds FROM the pushed image: pulled implicitly
    let b = Client::new(false);
    let ctx2 = context(&[(
        "Dockerfile",
        &format!("FROM {name}\nRUN cat /run.txt /hello.txt > /both.txt && grep -q built-by-run /both.txt\n"),
    )]);
    b.build(ctx2.path(), &["-t", "derived:1"]);
    let images = b.stdout(&["images"]);
    assert!(images.contains("kiln/app"), "{images}");

    // push to another repository of the same registry: base layers mount
    let derived = format!("{}/kiln/derived:1", reg.host());
    b.ok(&["tag", "derived:1", &derived]);
    let out = b.ok(&["push", &derived]);
    assert!(out.contains("mounted from another repository"), "{out}");
    let v = skopeo_inspect(&["--tls-verify=false", &format!("docker://{derived}")]);
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(4), "{v}");

    // pull of an unknown tag says 404 and which registry
    let o = b.run(&["pull", &format!("{}/kiln/app:nope", reg.host())]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&reg.host()) && err.contains("404"), "{err}");
}

#[test]
fn kiln_pulls_what_skopeo_pushed_and_zstd_round_trips() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let a = Client::new(true);
    let ctx = app_context();
    a.build(ctx.path(), &["-t", "app:1"]);
    let tar = a.conf.path().join("app.tar");
    a.ok(&["save", "-o", tar.to_str().expect("utf8"), "app:1"]);
    let target = format!("{}/skopeo/app:1", reg.host());
    sh(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("docker-archive:{}", tar.display()),
        &format!("docker://{target}"),
    ]));
    let b = Client::new(false);
    let out = b.ok(&["pull", &target]);
    assert!(out.contains("pull complete"), "{out}");
    let ctx2 = context(&[(
        "Dockerfile",
        &format!("FROM {target}\nRUN grep -q hello /hello.txt\n"),
    )]);
    b.build(ctx2.path(), &[]);
    // pulling again downloads nothing
    let out = b.ok(&["pull", &target]);
    assert!(!out.contains("pull complete"), "{out}");

    // zstd: kiln pushes zstd layers, skopeo sees them, kiln pulls them back
    let z = format!("{}/kiln/zstd:1", reg.host());
    a.ok(&["tag", "app:1", &z]);
    a.ok(&["push", "--compression", "zstd", "--force-compression", &z]);
    let raw = sh(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{z}"),
    ]));
    let m: serde_json::Value = serde_json::from_slice(&raw.stdout).expect("manifest");
    for l in m["layers"].as_array().expect("layers") {
        assert_eq!(
            l["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd",
            "{m}"
        );
    }
    let c = Client::new(false);
    let ctx3 = context(&[(
        "Dockerfile",
        &format!("FROM {z}\nRUN grep -q built-by-run /run.txt\n"),
    )]);
    c.build(ctx3.path(), &["--pull"]);
}

#[test]
fn basic_auth_login_push_logout() {
    if !ready(&["docker-registry", "skopeo", "htpasswd"]) {
        return;
    }
    let reg = Reg::start(RegOpts {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        tls: false,
    });
    let a = Client::new(true);
    let name = format!("{}/private/app:1", reg.host());
    a.ok(&["tag", "busybox:latest", &name]);
    let o = a.run(&["push", &name]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&reg.host()) && err.contains("401"), "{err}");

    let o = a.run(&["login", "-u", "alice", "-p", "wrong", &reg.host()]);
    assert!(!o.status.success(), "wrong password accepted");
    let out = a.ok(&["login", "-u", "alice", "-p", "s3cret", &reg.host()]);
    assert!(out.contains("Login Succeeded"), "{out}");
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(a.conf.path().join("docker/config.json")).expect("config.json"),
    )
    .expect("json");
    assert_eq!(
        cfg["auths"][reg.host()]["auth"],
        "YWxpY2U6czNjcmV0",
        "{cfg}"
    );
    a.ok(&["push", &name]);
    // skopeo reads the same credentials file (docker's format)
    let v = skopeo_inspect(&[
        "--tls-verify=false",
        "--authfile",
        a.conf
            .path()
            .join("docker/config.json")
            .to_str()
            .expect("utf8"),
        &format!("docker://{name}"),
    ]);
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(1));
    let out = a.ok(&["logout", &reg.host()]);
    assert!(out.contains("Removing login credentials"), "{out}");
    let o = a.run(&["pull", &name]);
    assert!(!o.status.success());
}

#[test]
fn tls_registry_with_test_ca_from_certs_d() {
    if !ready(&["docker-registry", "openssl"]) {
        return;
    }
    let reg = Reg::start(RegOpts {
        htpasswd: None,
        tls: true,
    });
    let a = Client::new(true);
    let name = format!("{}/tls/app:1", reg.host());
    a.ok(&["tag", "busybox:latest", &name]);
    let o = a.run(&["push", &name]);
    assert!(!o.status.success(), "push without the CA must fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&reg.host()) && err.contains("network error"),
        "{err}"
    );
    let certs: PathBuf = a.conf.path().join("kiln/certs.d").join(reg.host());
    std::fs::create_dir_all(&certs).expect("mkdir");
    std::fs::copy(reg.dir.path().join("ca.crt"), certs.join("ca.crt")).expect("ca");
    a.ok(&["push", &name]);
    let b = Client::new(false);
    std::fs::create_dir_all(b.conf.path().join("kiln/certs.d").join(reg.host())).expect("mkdir");
    std::fs::copy(
        reg.dir.path().join("ca.crt"),
        b.conf
            .path()
            .join("kiln/certs.d")
            .join(reg.host())
            .join("ca.crt"),
    )
    .expect("ca");
    b.ok(&["pull", &name]);
}

#[test]
fn source_date_epoch_pushes_byte_identical_manifests_from_two_stores() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let ctx = app_context();
    // Both stores start from the same base image, pulled from the
    // registry (as two CI machines would): a base imported separately
    // into each carries its own import time in its history.
    let base = format!("{}/repro/busybox:1", reg.host());
    Client::new(true).ok(&["push", "busybox:latest", &base]);
    let mut digests = Vec::new();
    for i in 0..2 {
        let c = Client::new(false);
        c.ok(&["pull", &base]);
        c.ok(&["tag", &base, "busybox:latest"]);
        c.build(
            ctx.path(),
            &["-t", "app:1", "--build-arg", "SOURCE_DATE_EPOCH=1700000000"],
        );
        let dest = format!("{}/repro/app:{i}", reg.host());
        digests.push(c.stdout(&["push", "-q", "app:1", &dest]));
    }
    assert_eq!(digests[0], digests[1]);
    let raw = |t: &str| {
        sh(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{}/repro/app:{t}", reg.host()),
        ]))
        .stdout
    };
    assert_eq!(raw("0"), raw("1"));
}

#[test]
fn build_outputs_registry_archives_local_and_tar() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let a = Client::new(true);
    let ctx = app_context();
    let out = tempfile::tempdir().expect("tmp");
    let p = |n: &str| out.path().join(n).display().to_string();
    let name = format!("{}/outputs/app:1", reg.host());
    let outputs = [
        format!("type=registry,name={name},compression=zstd,force-compression=true"),
        format!("type=oci,dest={}", p("oci.tar")),
        format!(
            "type=oci,dest={},tar=false,oci-mediatypes=true",
            p("ocidir")
        ),
        format!("type=docker,dest={}", p("docker.tar")),
        format!("type=local,dest={}", p("rootfs")),
        format!("type=tar,dest={}", p("rootfs.tar")),
    ];
    let mut args: Vec<&str> = Vec::new();
    for o in &outputs {
        args.push("--output");
        args.push(o);
    }
    a.build(ctx.path(), &args);
    let v = skopeo_inspect(&["--tls-verify=false", &format!("docker://{name}")]);
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(3), "{v}");
    let v = skopeo_inspect(&[&format!("oci-archive:{}", p("oci.tar"))]);
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(3), "{v}");
    let v = skopeo_inspect(&[&format!("oci:{}", p("ocidir"))]);
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(3), "{v}");
    let v = skopeo_inspect(&[&format!("docker-archive:{}", p("docker.tar"))]);
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(
        std::fs::read_to_string(out.path().join("rootfs/hello.txt")).expect("local"),
        "hello registry\n"
    );
    assert!(out.path().join("rootfs/bin/busybox").exists());
    let list = sh(Command::new("tar").arg("-tf").arg(p("rootfs.tar")));
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.lines()
            .any(|l| l.trim_start_matches("./") == "run.txt"),
        "{list}"
    );
    // kiln export: the same filesystem from an image in the store
    let ex = p("export.tar");
    a.ok(&["export", "-o", &ex, &name]);
    let list = sh(Command::new("tar").arg("-tf").arg(&ex));
    assert!(String::from_utf8_lossy(&list.stdout).contains("hello.txt"));
}

/// The file `name` in one of the store's snapshots.
fn find_in_snapshots(root: &std::path::Path, name: &str) -> Option<PathBuf> {
    let snaps = std::fs::read_dir(root.join("snapshots")).ok()?;
    snaps
        .flatten()
        .map(|e| e.path().join("fs").join(name))
        .find(|p| p.is_file())
}

#[test]
fn streamed_push_of_a_changed_snapshot_fails_and_tags_nothing() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let a = Client::new(true);
    let ctx = app_context();
    let name = format!("{}/kiln/changed:1", reg.host());
    a.build(ctx.path(), &["-t", &name]);
    // The COPY layer is kept as its snapshot; change it behind kiln's back
    // (same length, other bytes).
    let f = find_in_snapshots(a.kiln.root.path(), "hello.txt").expect("snapshot of the COPY");
    let mtime = std::fs::metadata(&f)
        .and_then(|m| m.modified())
        .expect("mtime");
    std::fs::write(&f, "HELLO REGISTRY\n").expect("change");
    let o = a.run(&["push", &name]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("snapshot changed"), "{err}");
    // The layer was streamed but never completed, and no manifest went up.
    let o = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", &format!("docker://{name}")])
        .output()
        .expect("skopeo");
    assert!(!o.status.success(), "the tag exists after a failed push");
    // Put it back: the same push now succeeds, and skopeo reads it.
    std::fs::write(&f, "hello registry\n").expect("restore");
    std::fs::File::options()
        .write(true)
        .open(&f)
        .and_then(|h| h.set_modified(mtime))
        .expect("restore mtime");
    let digest = a.stdout(&["push", "-q", &name]);
    let v = skopeo_inspect(&["--tls-verify=false", &format!("docker://{name}")]);
    assert_eq!(v["Digest"], digest.as_str());
}

#[test]
fn a_registry_refusing_streamed_uploads_gets_the_layer_with_its_length() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let proxy = NoStreamProxy::start(reg.port);
    let a = Client::new(true);
    // Small layers are whole (compressed) by the time their upload
    // session is open: each goes up in one PUT with its length, and the
    // proxy refuses nothing.
    let ctx = app_context();
    let small = format!("{}/kiln/nostream:small", proxy.host());
    a.build(ctx.path(), &["-t", &small]);
    let out = a.ok(&["push", &small]);
    assert!(!out.contains("streamed upload failed"), "{out}");
    assert_eq!(proxy.refused(), 0, "{out}");
    let v = skopeo_inspect(&[
        "--tls-verify=false",
        &format!("docker://{}/kiln/nostream:small", reg.host()),
    ]);
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(3), "{v}");
    // A layer larger than that is streamed while it is compressed; the
    // proxy refuses the body of unknown length and the layer goes up
    // again with its length.
    let ctx = context(&[(
        "Dockerfile",
        "FROM busybox\nRUN head -c 10485760 /dev/urandom > /big\n",
    )]);
    let name = format!("{}/kiln/nostream:1", proxy.host());
    a.build(ctx.path(), &["-t", &name]);
    let out = a.ok(&["push", &name]);
    assert!(out.contains("streamed upload failed"), "{out}");
    assert!(proxy.refused() >= 1);
    // What arrived is whole: skopeo reads it from the registry itself.
    let v = skopeo_inspect(&[
        "--tls-verify=false",
        &format!("docker://{}/kiln/nostream:1", reg.host()),
    ]);
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(2), "{v}");
    // The compressed layer was kept: a second push finds it.
    let again = a.ok(&["push", &name]);
    assert!(again.contains("blob found"), "{again}");
}

#[test]
fn a_blob_corrupted_in_the_registry_fails_the_pull_and_stores_nothing() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let a = Client::new(true);
    let ctx = app_context();
    let name = format!("{}/kiln/corrupt:1", reg.host());
    a.build(ctx.path(), &["-t", &name]);
    a.ok(&["push", &name]);
    // Flip bytes of the largest layer blob in the registry's storage
    // (same size, other content).
    let raw = sh(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{name}"),
    ]));
    let m: serde_json::Value = serde_json::from_slice(&raw.stdout).expect("manifest");
    let layer = m["layers"]
        .as_array()
        .and_then(|l| l.iter().max_by_key(|d| d["size"].as_u64()))
        .and_then(|d| d["digest"].as_str())
        .expect("a layer")
        .trim_start_matches("sha256:")
        .to_string();
    let data = reg
        .dir
        .path()
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&layer[..2])
        .join(&layer)
        .join("data");
    let mut bytes = std::fs::read(&data).expect("registry blob");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).expect("corrupt");

    let b = Client::new(false);
    let o = b.run(&["pull", &name]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("digest mismatch"), "{err}");
    // Nothing half-stored: no image, no blob with that digest, and the
    // store checks clean.
    assert!(!b.stdout(&["images"]).contains("kiln/corrupt"));
    let blobs = b.kiln.root.path().join("blobs/sha256");
    assert!(!blobs.join(&layer).exists(), "corrupt blob kept");
    let check = b.ok(&["system", "check"]);
    assert!(check.contains("ok"), "{check}");
}

/// Docker's human size (`4.26MB`: decimal units, three significant
/// digits), to compare with what kiln prints.
fn docker_human(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        return format!("{n}B");
    }
    let s: String = format!("{v:.3}").chars().take(4).collect();
    format!("{}{}", s.trim_end_matches('.'), units[i])
}

/// `kiln images`, `inspect` and `history` report what docker does: each
/// layer's uncompressed tar size, summed for the image — the same numbers
/// for an image pulled with gzip layers as for the image it was pushed
/// from (issue 15 item 5: they added up compressed sizes for pulled layers
/// and uncompressed ones for local ones).
#[test]
fn image_sizes_are_uncompressed_and_agree_across_images_inspect_history() {
    if !ready(&["docker-registry", "skopeo", "gzip"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let a = Client::new(true);
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\nRUN head -c 300000 /dev/zero > /zeros\nENV X=1\nCOPY a.txt /a.txt\n",
        ),
        ("a.txt", "a\n"),
    ]);
    a.build(ctx.path(), &["-t", "sizes:1"]);
    let name = format!("{}/sizes/app:1", reg.host());
    a.ok(&["push", "sizes:1", &name]);

    // The uncompressed tar of each pushed (gzip) layer, by an outside tool.
    let out = tempfile::tempdir().expect("tmp");
    let dest = out.path().join("img");
    sh(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{name}"),
        &format!("dir:{}", dest.display()),
    ]));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join("manifest.json")).expect("manifest"))
            .expect("json");
    let mut want = Vec::new();
    for l in manifest["layers"].as_array().expect("layers") {
        assert!(
            l["mediaType"].as_str().unwrap_or_default().contains("gzip"),
            "{l}"
        );
        let digest = l["digest"].as_str().expect("digest");
        let blob = dest.join(digest.trim_start_matches("sha256:"));
        let o = sh(Command::new("sh")
            .arg("-c")
            .arg("gzip -dc \"$1\" | wc -c")
            .arg("sh")
            .arg(&blob));
        let n: u64 = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .expect("wc");
        let compressed = l["size"].as_u64().expect("size");
        assert!(compressed < n, "a gzip layer is smaller than its tar");
        want.push(n);
    }
    let total: u64 = want.iter().sum();

    let b = Client::new(false);
    b.ok(&["pull", &name]);
    // Loaded from an OCI archive with the same gzip layers.
    let archive = out.path().join("oci.tar");
    sh(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{name}"),
        &format!("oci-archive:{}:sizes:loaded", archive.display()),
    ]));
    let l = Client::new(false);
    let loaded = l.stdout(&["load", "-q", "-i", archive.to_str().expect("utf8")]);
    let loaded = loaded.lines().next().expect("a loaded name").to_string();
    for (c, image) in [(&a, "sizes:1"), (&b, name.as_str()), (&l, loaded.as_str())] {
        let v: serde_json::Value =
            serde_json::from_str(&c.stdout(&["inspect", image])).expect("inspect");
        assert_eq!(v[0]["Size"].as_u64(), Some(total), "inspect {image}");
        let images = c.stdout(&["images", "--format", "json"]);
        let row: serde_json::Value = images
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
            .find(|r| image.contains(r["Repository"].as_str().unwrap_or("?")))
            .expect("image row");
        assert_eq!(
            row["Size"].as_str(),
            Some(docker_human(total).as_str()),
            "images {image}"
        );
        // history: newest first, each layer's size, 0B for the ENV step.
        let hist = c.stdout(&["history", image]);
        let col = hist.find("SIZE").expect("SIZE column");
        let sizes: Vec<String> = hist
            .lines()
            .skip(1)
            .map(|l| {
                l.get(col..)
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        let mut layers: Vec<String> = want.iter().rev().map(|n| docker_human(*n)).collect();
        layers.insert(1, "0B".to_string());
        assert_eq!(sizes, layers, "history {image}:\n{hist}");
    }
}

/// A root filesystem tar holding one file of `size` incompressible bytes.
fn random_rootfs_tar(dir: &std::path::Path, size: usize) -> PathBuf {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        data.extend_from_slice(&seed.to_le_bytes());
    }
    let path = dir.join("big.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&path).expect("tar"));
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "big.bin", &data[..]).expect("append");
    b.finish().expect("finish");
    path
}

#[test]
fn ctrl_c_stops_a_pull_in_the_middle_of_a_blob_and_leaves_the_store_intact() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    if !ready(&["docker-registry"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let a = Client::new(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let tar = random_rootfs_tar(tmp.path(), 24 << 20);
    let name = format!("{}/kiln/big:1", reg.host());
    a.ok(&["import", tar.to_str().expect("utf8"), &name]);
    a.ok(&["push", &name]);
    // 24 MiB at 2 MiB/s: about 12 s if nothing stops it.
    let proxy = SlowProxy::start(reg.port, 2 << 20);
    let slow = format!("{}/kiln/big:1", proxy.host());
    let b = Client::new(false);
    let mut child = b
        .cmd()
        .args(["pull", &slow])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
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
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("the layer never started:\n{}", seen.join("\n")));
        let layer = line.contains("pulling") && line.contains("bytes");
        seen.push(line);
        if layer {
            break;
        }
    }
    // Well inside the blob.
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "kiln did not exit within 5 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(
        status.code(),
        Some(130),
        "kiln should stop with status 130 (not die of the signal): {status:?}\n{}\n{}",
        seen.join("\n"),
        rest.join("\n")
    );
    assert!(
        rest.iter().any(|l| l.contains("pull cancelled")),
        "says it was cancelled: {rest:?}"
    );
    assert!(
        !rest.iter().any(|l| l.contains("complete")),
        "the layer did not finish: {rest:?}"
    );
    // Nothing named, the store checks clean, and the pull works after.
    assert_eq!(b.stdout(&["images", "-q"]), "");
    assert!(b.ok(&["system", "check"]).starts_with("ok:"));
    b.ok(&["pull", &name]);
    assert!(b.ok(&["system", "check"]).starts_with("ok:"));
}

#[test]
fn ctrl_c_during_a_builds_base_image_pull_stops_the_pull() {
    use std::time::{Duration, Instant};
    if !ready(&["docker-registry"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let a = Client::new(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let tar = random_rootfs_tar(tmp.path(), 24 << 20);
    let name = format!("{}/kiln/big:1", reg.host());
    a.ok(&["import", tar.to_str().expect("utf8"), &name]);
    a.ok(&["push", &name]);
    // 24 MiB at 2 MiB/s: about 12 s if nothing stops it.
    let proxy = SlowProxy::start(reg.port, 2 << 20);
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {}/kiln/big:1\nLABEL x=y\n", proxy.host()),
    )]);
    let b = Client::new(false);
    let mut child = b
        .cmd()
        .args(["build", "--progress", "plain", "-t", "slow:1"])
        .arg(ctx.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Well inside the layer's download.
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "kiln build did not exit within 5 s of SIGINT during its pull"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !status.success() && status.code().is_some(),
        "kiln should fail with an exit code: {status:?}"
    );
    assert_eq!(b.stdout(&["images", "-q"]), "");
    assert!(b.ok(&["system", "check"]).starts_with("ok:"));
}

/// A registry slower than the compressor: the layer is compressed into
/// the store ahead of the upload, which reads it behind; what arrives is
/// whole, and the compressed copy is kept (a second push finds it).
#[test]
fn a_slow_registry_gets_a_layer_compressed_ahead_of_the_upload() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let a = Client::new(false);
    let tmp = tempfile::tempdir().expect("tmp");
    let tar = random_rootfs_tar(tmp.path(), 6 << 20);
    let proxy = SlowProxy::start(reg.port, 4 << 20);
    let name = format!("{}/kiln/slow-push:1", proxy.host());
    a.ok(&["import", tar.to_str().expect("utf8"), &name]);
    a.ok(&["push", &name]);
    let v = skopeo_inspect(&[
        "--tls-verify=false",
        &format!("docker://{}/kiln/slow-push:1", reg.host()),
    ]);
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(1), "{v}");
    let o = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{}/kiln/slow-push:1", reg.host()))
        .arg(format!("oci:{}:x", tmp.path().join("oci").display()))
        .output()
        .expect("skopeo");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = a.ok(&["push", &name]);
    assert!(
        again.contains("blob found") || again.contains("exists"),
        "{again}"
    );
    let o = a.run(&["system", "check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
