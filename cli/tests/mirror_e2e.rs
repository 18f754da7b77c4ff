//! Pull mirrors from kiln's config file (`mirrors`), end to end with real
//! registries (Debian's `docker-registry` on 127.0.0.1): a pull through
//! an origin name is served by its mirror, falls back to the origin when
//! a mirror is down, lacks the image or serves bytes that do not match
//! their digests, and pushes never go to a mirror.
//!
//! Needs root, busybox-static, docker-registry and skopeo: under CI=true
//! a missing tool fails the test, elsewhere the test prints "not run".

mod common;

use std::process::Command;

use common::context;
use common::registry::{free_port, ready, sh, Client, Reg, RegOpts};

/// Writes kiln's config file of `c` with `mirrors` for `origin`.
fn configure(c: &Client, origin: &str, mirrors: &[String]) {
    let dir = c.conf.path().join("kiln");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let v = serde_json::json!({ "mirrors": { origin: mirrors } });
    std::fs::write(dir.join("config.json"), v.to_string()).expect("config");
}

/// An image pushed by a fresh client to `name`.
fn publish(name: &str) {
    let a = Client::new(true);
    let ctx = context(&[
        ("Dockerfile", "FROM busybox\nCOPY hello.txt /hello.txt\n"),
        ("hello.txt", "hello mirror\n"),
    ]);
    a.build(ctx.path(), &["-t", name]);
    a.ok(&["push", name]);
}

/// Overwrites every layer blob of `repo:tag` in `reg`'s storage with
/// bytes of the same length that do not match the digest.
fn corrupt_layers(reg: &Reg, repo_tag: &str) {
    let raw = sh(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}/{repo_tag}", reg.host()),
    ]));
    let m: serde_json::Value = serde_json::from_slice(&raw.stdout).expect("manifest");
    for l in m["layers"].as_array().expect("layers") {
        let hex = l["digest"]
            .as_str()
            .and_then(|d| d.strip_prefix("sha256:"))
            .expect("digest");
        let p = reg
            .dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let mut b = std::fs::read(&p).expect("blob");
        for x in b.iter_mut() {
            *x = !*x;
        }
        std::fs::write(&p, b).expect("write blob");
    }
}

fn image_names(c: &Client) -> String {
    c.stdout(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
}

#[test]
fn pull_comes_from_the_mirror_when_the_origin_is_unreachable_and_push_never_uses_it() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let mirror = Reg::start(RegOpts::default());
    // nothing listens on the origin's port
    let origin = format!("127.0.0.1:{}", free_port());
    publish(&format!("{}/team/app:1", mirror.host()));

    let b = Client::new(false);
    configure(&b, &origin, &[mirror.host()]);
    let name = format!("{origin}/team/app:1");
    let out = b.ok(&["--debug", "pull", &name]);
    assert!(out.contains("pulled through mirror"), "{out}");
    // the store names the origin's image
    let names = image_names(&b);
    assert!(names.contains(&name), "{names}");
    assert!(!names.contains(&mirror.host()), "{names}");

    // a build's base image resolves through the mirror too
    let c = Client::new(false);
    configure(&c, &origin, &[mirror.host()]);
    let ctx = context(&[("Dockerfile", &format!("FROM {name}\nRUN cat /hello.txt\n"))]);
    c.build(ctx.path(), &["-t", "from-mirror:1"]);

    // pushes go to the origin only: it is down, so the push fails and the
    // mirror gets nothing new
    let o = b.run(&["push", &name, &format!("{origin}/team/other:1")]);
    assert!(!o.status.success());
    assert!(
        !mirror.log().contains("team/other"),
        "the mirror saw a push: {}",
        mirror.log()
    );
}

#[test]
fn a_down_or_empty_mirror_falls_back_to_the_origin() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let origin = Reg::start(RegOpts::default());
    let empty = Reg::start(RegOpts::default());
    let down = format!("127.0.0.1:{}", free_port());
    let name = format!("{}/team/app:1", origin.host());
    publish(&name);

    let b = Client::new(false);
    configure(&b, &origin.host(), &[down.clone(), empty.host()]);
    let out = b.ok(&["--debug", "pull", &name]);
    // each failed mirror is named in the debug log, in order
    let d = out.find(&down).expect("down mirror logged");
    let e = out.find(&empty.host()).expect("empty mirror logged");
    assert!(d < e, "{out}");
    assert!(out.contains("mirror failed"), "{out}");
    assert!(!out.contains("pulled through mirror"), "{out}");
    assert!(image_names(&b).contains(&name));
}

#[test]
fn a_mirror_serving_bytes_that_do_not_match_their_digests_is_refused() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let origin = Reg::start(RegOpts::default());
    let hostile = Reg::start(RegOpts::default());
    let name = format!("{}/team/app:1", origin.host());
    publish(&name);
    publish(&format!("{}/team/app:1", hostile.host()));
    corrupt_layers(&hostile, "team/app:1");

    // the origin serves the true bytes after the mirror's are refused
    let b = Client::new(false);
    configure(&b, &origin.host(), &[hostile.host()]);
    let out = b.ok(&["--debug", "pull", &name]);
    assert!(out.contains("mirror failed"), "{out}");
    assert!(out.contains("mismatch"), "{out}");
    assert!(image_names(&b).contains(&name));
    let ctx = context(&[("Dockerfile", &format!("FROM {name}\nRUN cat /hello.txt\n"))]);
    b.build(ctx.path(), &["-t", "checked:1"]);

    // with the origin gone, the pull fails and nothing is named
    let gone = format!("127.0.0.1:{}", free_port());
    let c = Client::new(false);
    configure(&c, &gone, &[hostile.host()]);
    let o = c.run(&["--debug", "pull", &format!("{gone}/team/app:1")]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("mismatch"), "{err}");
    assert!(!image_names(&c).contains("team/app"));
}

#[test]
fn invalid_mirror_entries_are_refused_with_the_config_file_named() {
    let b = Client::new(false);
    for bad in [
        serde_json::json!({ "mirrors": { "docker.io": ["https://m.example/some/path"] } }),
        serde_json::json!({ "mirrors": { "docker.io": ["ftp://m.example"] } }),
        serde_json::json!({ "mirrors": { "docker.io": ["bad host"] } }),
        serde_json::json!({ "mirrors": { "not a host": ["m.example"] } }),
        serde_json::json!({ "registry-mirrors": (0..9).map(|i| format!("m{i}.example")).collect::<Vec<_>>() }),
    ] {
        let dir = b.conf.path().join("kiln");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("config.json"), bad.to_string()).expect("config");
        let o = b.run(&["pull", "127.0.0.1:1/x:1"]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("config.json"), "{bad}: {err}");
        assert!(err.contains("mirror"), "{bad}: {err}");
    }
}

#[test]
fn registry_cache_import_resolves_through_the_mirror() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let mirror = Reg::start(RegOpts::default());
    let origin = format!("127.0.0.1:{}", free_port());
    publish(&format!("{}/team/base:1", mirror.host()));
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {origin}/team/base:1\nRUN echo MARK$((1+1))ER > /m; echo MARK$((1+1))ER\n"),
    )]);

    // the cache is exported to the mirror's repository path
    let a = Client::new(false);
    configure(&a, &origin, &[mirror.host()]);
    let to = format!("type=registry,ref={}/team/cache:1,mode=max", mirror.host());
    let out = a.ok(&[
        "build",
        "--progress",
        "plain",
        "--cache-to",
        &to,
        ctx.path().to_str().expect("utf8"),
    ]);
    assert!(out.contains("MARK2ER"), "{out}");

    // imported under the origin's name, whose registry is down
    let b = Client::new(false);
    configure(&b, &origin, &[mirror.host()]);
    let from = format!("type=registry,ref={origin}/team/cache:1");
    let out = b.ok(&[
        "build",
        "--progress",
        "plain",
        "--cache-from",
        &from,
        ctx.path().to_str().expect("utf8"),
    ]);
    assert!(!out.contains("MARK2ER"), "the RUN ran again: {out}");
}

/// `pull --all-platforms`: the index and then every platform's image go
/// through the mirror first; a mirror that answers the index but serves
/// a child's layers with bytes that do not match their digests is left
/// for the origin, for that child too.
#[test]
fn all_platforms_pull_falls_back_to_the_origin_for_a_mirror_s_bad_blobs() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let origin = Reg::start(RegOpts::default());
    let hostile = Reg::start(RegOpts::default());
    let tar = common::busybox_rootfs_tar();
    let images = [
        ("amd64", tar.clone(), "linux/amd64"),
        ("arm64", tar.clone(), "linux/arm64"),
    ];
    let name = common::registry::push_busybox_index(&origin, "multi", &images);
    // The mirror holds the same index, byte for byte (the same children),
    // with the amd64 image's layers corrupted.
    let copy = format!("{}/kiln/busybox:multi", hostile.host());
    sh(Command::new("skopeo").args([
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{name}"),
        &format!("docker://{copy}"),
    ]));
    let index: serde_json::Value =
        serde_json::from_slice(&common::registry::raw(&name)).expect("index");
    let amd64 = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|d| d["platform"]["architecture"] == "amd64")
        .and_then(|d| d["digest"].as_str())
        .expect("amd64 entry")
        .to_string();
    corrupt_layers(&hostile, &format!("kiln/busybox@{amd64}"));

    let b = Client::new(false);
    configure(&b, &origin.host(), &[hostile.host()]);
    let out = b.ok(&["--debug", "pull", "--all-platforms", &name]);
    assert!(out.contains("mismatch"), "{out}");
    assert!(image_names(&b).contains(&name), "{}", image_names(&b));
}

/// `--cache-from type=registry`: the cache manifest, its config and the
/// cached layers go through the mirror first, then the origin; a mirror
/// serving bad layer bytes costs nothing but the retry.
#[test]
fn registry_cache_import_falls_back_to_the_origin_for_a_mirror_s_bad_blobs() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let origin = Reg::start(RegOpts::default());
    let hostile = Reg::start(RegOpts::default());
    publish(&format!("{}/team/base:1", origin.host()));
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM {}/team/base:1\nRUN echo MARK$((1+1))ER > /m; echo MARK$((1+1))ER\n",
            origin.host()
        ),
    )]);
    let dir = ctx.path().to_str().expect("utf8");
    // the same cache in both registries, the mirror's layers corrupted
    let a = Client::new(false);
    for reg in [&origin, &hostile] {
        let to = format!("type=registry,ref={}/team/cache:1,mode=max", reg.host());
        a.ok(&["build", "--progress", "plain", "--cache-to", &to, dir]);
    }
    corrupt_layers(&hostile, "team/cache:1");

    let b = Client::new(false);
    configure(&b, &origin.host(), &[hostile.host()]);
    let from = format!("type=registry,ref={}/team/cache:1", origin.host());
    let out = b.ok(&[
        "--debug",
        "build",
        "--progress",
        "plain",
        "--cache-from",
        &from,
        "-t",
        "cached:1",
        dir,
    ]);
    assert!(!out.contains("MARK2ER"), "the RUN ran again: {out}");
    // The image's layers stay in the registry until read: `kiln run`
    // fetches them, through the mirror first, whose bad bytes are refused.
    let o = b.run(&["--debug", "run", "--rm", "cached:1", "cat", "/m"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("mismatch"), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "MARK2ER\n");
}
