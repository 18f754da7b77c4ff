//! The build cache shared through a registry (`--cache-to` /
//! `--cache-from`), end to end: Debian's `docker-registry` on 127.0.0.1
//! with its access log on, so the tests count which blobs a runner with an
//! empty store downloads. Also the OCI-layout (`type=local`) and
//! `type=inline` variants.
//!
//! Needs root, busybox-static, docker-registry and skopeo: under CI=true a
//! missing tool fails the test, elsewhere the test prints "not run".

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::context;
use common::registry::{Client, Reg, RegOpts};
use serde_json::Value;

fn ready() -> bool {
    common::registry::ready(&["docker-registry", "skopeo"])
}

/// `kiln build --progress json` with `extra`: (image ID, events).
fn build_json(c: &Client, ctx: &Path, extra: &[&str]) -> (String, Vec<Value>) {
    let iid = c.conf.path().join("iid");
    let mut a = vec![
        "build",
        "--progress",
        "json",
        "--iidfile",
        iid.to_str().expect("utf8"),
    ];
    a.extend_from_slice(extra);
    a.push(ctx.to_str().expect("utf8"));
    let o = c.run(&a);
    assert!(
        o.status.success(),
        "kiln {a:?} failed\nstderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let events = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (std::fs::read_to_string(iid).expect("iidfile"), events)
}

fn count(ev: &[Value], kind: &str) -> usize {
    ev.iter().filter(|e| e["event"] == kind).count()
}

fn logged(ev: &[Value], needle: &str) -> bool {
    ev.iter()
        .any(|e| e["event"] == "log" && e["line"].as_str().is_some_and(|l| l.contains(needle)))
}

/// The steps that ran (`done` events of vertices named like a step).
fn ran(ev: &[Value]) -> Vec<String> {
    let names: BTreeMap<u64, String> = ev
        .iter()
        .filter(|e| e["event"] == "started")
        .filter_map(|e| Some((e["id"].as_u64()?, e["name"].as_str()?.to_string())))
        .collect();
    ev.iter()
        .filter(|e| e["event"] == "done")
        .filter_map(|e| names.get(&e["id"].as_u64()?).cloned())
        .filter(|n| n.contains("RUN") || n.contains("COPY"))
        .collect()
}

/// How many snapshot directories `c`'s store holds.
fn snapshots(c: &Client) -> usize {
    std::fs::read_dir(c.kiln.root.path().join("snapshots"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Pushes the busybox base to the registry; returns its name.
fn push_base(reg: &Reg) -> String {
    let seed = Client::new(true);
    let base = format!("{}/base/busybox:1", reg.host());
    seed.ok(&["push", "-q", "busybox:latest", &base]);
    base
}

fn app(base: &str) -> tempfile::TempDir {
    context(&[
        (
            "Dockerfile",
            &format!(
                "FROM {base}\nRUN echo MARKER-FIRST && echo first > /first.txt\nCOPY a.txt /a.txt\nRUN echo MARKER-SECOND && cat /a.txt /first.txt > /b.txt\n"
            ),
        ),
        ("a.txt", "one\n"),
    ])
}

/// Runner A: `app` built with its cache exported to an OCI layout. Gives
/// the registry (holding the base), the context, the layout's directory
/// and path, and the image ID.
fn app_cached_in_a_layout() -> (
    Reg,
    tempfile::TempDir,
    tempfile::TempDir,
    std::path::PathBuf,
    String,
) {
    let reg = Reg::start(RegOpts::default());
    let base = push_base(&reg);
    let ctx = app(&base);
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("cache");
    let a = Client::new(false);
    let to = format!("type=local,dest={}", dest.display());
    let (id, _) = build_json(&a, ctx.path(), &["-t", "app:1", "--cache-to", &to]);
    (reg, ctx, dir, dest, id)
}

fn raw_manifest(reference: &str) -> Value {
    let o = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("manifest json")
}

#[test]
fn registry_cache_makes_an_empty_runner_run_nothing_and_download_only_the_result() {
    if !ready() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = push_base(&reg);
    let ctx = app(&base);
    let cache = format!("{}/cache:1", reg.host());

    let a = Client::new(false);
    let to = format!("type=registry,ref={cache},mode=max");
    let (id_a, ev) = build_json(&a, ctx.path(), &["-t", "app:1", "--cache-to", &to]);
    assert!(logged(&ev, "MARKER-FIRST") && logged(&ev, "MARKER-SECOND"));

    // The cache manifest: OCI, kiln's config type, one layer per step.
    let m = raw_manifest(&cache);
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.kiln.cache.config.v1+json"
    );
    assert_eq!(m["artifactType"], m["config"]["mediaType"]);
    let layers: Vec<String> = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect();
    assert_eq!(layers.len(), 3, "{m}");

    // An empty store: every step cached, no RUN, the same image.
    let before = reg.log().len();
    let b = Client::new(false);
    let from = format!("type=registry,ref={cache}");
    let (id_b, ev) = build_json(&b, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    assert_eq!(count(&ev, "cached"), 3, "{ev:?}");
    assert!(ran(&ev).is_empty(), "{:?}", ran(&ev));
    assert!(!logged(&ev, "MARKER"), "{ev:?}");
    assert_eq!(id_a, id_b);
    // Downloads: the cache config only. The image's layers stay in the
    // registry (BuildKit's lazy blobs) until something reads them.
    let log = reg.log();
    let gets = Reg::blob_gets(&log[before..], "cache");
    let config = m["config"]["digest"].as_str().expect("config").to_string();
    assert_eq!(
        gets.keys().cloned().collect::<Vec<_>>(),
        vec![config],
        "{gets:?}"
    );
    let stored = |c: &Client, d: &str| {
        c.kiln
            .root
            .path()
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
            .exists()
    };
    assert!(
        layers.iter().all(|l| !stored(&b, l)),
        "a cache layer was stored"
    );
    // Nor were they unpacked: they become snapshots when first needed
    // (here by `kiln run`), as a pulled image's do. The steps are local
    // cache hits from then on.
    let made = snapshots(&b);
    // Nor was the base image's layer: FROM verified it and left it lazy.
    assert_eq!(made, 0, "runner B unpacked a layer no step needed");
    let o = b.run(&["system", "check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, ev) = build_json(&b, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    assert_eq!(count(&ev, "cached"), 3, "lazy layers are hits: {ev:?}");
    assert_eq!(snapshots(&b), made, "a cached rebuild unpacks nothing");
    let before = reg.log().len();
    assert_eq!(
        b.stdout(&["run", "--rm", "app:1", "cat", "/b.txt"]),
        "one\nfirst"
    );
    assert!(
        snapshots(&b) >= made + 3,
        "run unpacked the three layers: {made} -> {}",
        snapshots(&b)
    );
    // `kiln run` downloaded each layer once (verified), and kept it.
    let log = reg.log();
    let gets = Reg::blob_gets(&log[before..], "cache");
    let mut want = layers.clone();
    want.sort();
    assert_eq!(gets.keys().cloned().collect::<Vec<_>>(), want, "{gets:?}");
    assert!(gets.values().all(|n| *n == 1), "{gets:?}");
    assert!(layers.iter().all(|l| stored(&b, l)));
    let (_, ev) = build_json(&b, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    assert_eq!(count(&ev, "cached"), 3);
    let o = b.run(&["system", "check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // What the import brought is the import's word: a build of the same
    // steps without `--cache-from` (another job on a shared store) takes
    // none of it, and runs the steps.
    let (_, ev) = build_json(&b, ctx.path(), &["-t", "app:own"]);
    assert_eq!(
        count(&ev, "cached"),
        0,
        "an import's record served a build without it: {ev:?}"
    );
    assert!(logged(&ev, "MARKER-FIRST") && logged(&ev, "MARKER-SECOND"));

    // One changed file: a fresh runner takes the first RUN from the cache
    // and runs the COPY and the RUN after it.
    std::fs::write(ctx.path().join("a.txt"), "two\n").expect("write");
    let before = reg.log().len();
    let c = Client::new(false);
    let (_, ev) = build_json(&c, ctx.path(), &["-t", "app:2", "--cache-from", &from]);
    assert_eq!(count(&ev, "cached"), 1, "{ev:?}");
    assert!(!logged(&ev, "MARKER-FIRST") && logged(&ev, "MARKER-SECOND"));
    assert_eq!(ran(&ev).len(), 2, "{:?}", ran(&ev));
    let log = reg.log();
    let gets = Reg::blob_gets(&log[before..], "cache");
    assert_eq!(gets.len(), 2, "config and the first RUN's layer: {gets:?}");
    assert_eq!(
        c.stdout(&["run", "--rm", "app:2", "cat", "/b.txt"]),
        "two\nfirst"
    );
}

/// Where the test registry keeps the bytes of blob `d`.
fn registry_blob_file(reg: &Reg, d: &str) -> std::path::PathBuf {
    let hex = d.trim_start_matches("sha256:");
    reg.dir
        .path()
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// A layer an import left in the registry is verified when it is fetched:
/// a registry that serves other bytes under its digest (same size) gets a
/// clear error naming the blob and the registry, nothing is stored, the
/// image and the store stay as they were; the true bytes fetched later
/// serve. A registry that is gone is the same error, not a panic.
#[test]
fn a_cache_layer_left_in_the_registry_is_verified_when_it_is_fetched() {
    if !ready() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = push_base(&reg);
    let ctx = app(&base);
    let cache = format!("{}/cache:1", reg.host());
    let a = Client::new(false);
    let to = format!("type=registry,ref={cache},mode=max");
    build_json(&a, ctx.path(), &["-t", "app:1", "--cache-to", &to]);
    let m = raw_manifest(&cache);
    let top = m["layers"][2]["digest"]
        .as_str()
        .expect("digest")
        .to_string();

    let b = Client::new(false);
    let from = format!("type=registry,ref={cache}");
    let (id_b, ev) = build_json(&b, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    assert_eq!(count(&ev, "cached"), 3, "{ev:?}");

    // Other bytes under the top layer's digest, of the same size.
    let file = registry_blob_file(&reg, &top);
    let good = std::fs::read(&file).expect("registry blob");
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&file, &bad).expect("tamper");
    let o = b.run(&["run", "--rm", "app:1", "cat", "/b.txt"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "ran on a tampered layer: {err}");
    assert!(
        err.contains(top.trim_start_matches("sha256:").get(..12).expect("hex"))
            && err.contains(&reg.host()),
        "the error names the blob and the registry: {err}"
    );
    let stored = b
        .kiln
        .root
        .path()
        .join("blobs/sha256")
        .join(top.trim_start_matches("sha256:"));
    assert!(!stored.exists(), "a tampered blob entered the store");
    assert_eq!(
        b.stdout(&["images", "-q", "--no-trunc", "app:1"]).trim(),
        id_b.trim()
    );
    let o = b.run(&["system", "check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The true bytes back: the same command works.
    std::fs::write(&file, &good).expect("restore");
    assert_eq!(
        b.stdout(&["run", "--rm", "app:1", "cat", "/b.txt"]),
        "one\nfirst"
    );
    assert!(stored.exists());

    // A second runner whose registry is gone by the time it needs the
    // layers: a clear error, the image still there.
    let c = Client::new(false);
    build_json(&c, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    drop(reg);
    let o = c.run(&[
        "save",
        "-o",
        c.conf.path().join("app.tar").to_str().expect("utf8"),
        "app:1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "saved without its layers: {err}");
    assert!(err.contains("kept in the registry"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        c.stdout(&["images", "-q", "--no-trunc", "app:1"]).trim(),
        id_b.trim()
    );
}

/// The CI pattern on a runner that keeps its store: `--cache-from` and
/// `--cache-to` the same ref, run again after an earlier import. The
/// steps are hits whose layers are still the import's compressed blobs
/// (never unpacked); the export makes their tars from those blobs, proved
/// against the diffIDs, instead of failing with "blob not found".
#[test]
fn a_runner_that_imported_before_exports_the_cache_again() {
    if !ready() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = push_base(&reg);
    let ctx = app(&base);
    let cache = format!("{}/cache:1", reg.host());
    let a = Client::new(false);
    let to = format!("type=registry,ref={cache},mode=max");
    let (id_a, _) = build_json(&a, ctx.path(), &["-t", "app:1", "--cache-to", &to]);
    let layers = |m: &Value| -> Vec<String> {
        let mut l: Vec<String> = m["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["digest"].as_str().expect("digest").to_string())
            .collect();
        l.sort();
        l
    };
    let first = layers(&raw_manifest(&cache));

    let b = Client::new(false);
    let from = format!("type=registry,ref={cache}");
    build_json(&b, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    let (id_b, ev) = build_json(
        &b,
        ctx.path(),
        &["-t", "app:1", "--cache-from", &from, "--cache-to", &to],
    );
    assert!(!logged(&ev, "MARKER"), "{ev:?}");
    assert_eq!(id_a, id_b);
    assert_eq!(layers(&raw_manifest(&cache)), first);
    // The export unpacked the imported layers; the steps keep the
    // exporter's times (not the unpacking's), so the image is the same
    // on this runner a second later — and on every runner importing the
    // cache it exported.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (id_again, _) = build_json(&b, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    assert_eq!(id_a, id_again, "the import's times were replaced");
    let fresh = Client::new(false);
    let (id_fresh, _) = build_json(&fresh, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    assert_eq!(id_a, id_fresh);
    let o = b.run(&["system", "check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The same with a cache directory.
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("cache");
    let local_to = format!("type=local,dest={}", dest.display());
    build_json(&a, ctx.path(), &["-t", "app:1", "--cache-to", &local_to]);
    let c = Client::new(false);
    let local_from = format!("type=local,src={}", dest.display());
    build_json(
        &c,
        ctx.path(),
        &["-t", "app:1", "--cache-from", &local_from],
    );
    let (id_c, ev) = build_json(
        &c,
        ctx.path(),
        &[
            "-t",
            "app:1",
            "--cache-from",
            &local_from,
            "--cache-to",
            &local_to,
        ],
    );
    assert!(!logged(&ev, "MARKER"), "{ev:?}");
    assert_eq!(id_a, id_c);
}

/// Mounts `digest` from `from` into `repo` on `reg` (a cross-repository
/// mount, as a job with push rights to `repo` can do for any blob it can
/// read).
fn mount_blob(reg: &Reg, repo: &str, from: &str, digest: &str) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", reg.port)).expect("connect");
    let head = format!(
        "POST /v2/{repo}/blobs/uploads/?mount={digest}&from={from} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        reg.host()
    );
    s.write_all(head.as_bytes()).expect("write");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 201"), "mount {digest}: {resp}");
}

/// A cache that names an honest cache's blobs with a wrong size (one byte
/// more for a layer: digests and records untouched) breaks no other
/// build's image on a shared store, whichever job imports first. Before,
/// the later import's size replaced the blob's (the victim's image then
/// failed to download its layer), or the honest image's digest-verified
/// blob was moved aside as "corrupt" for not being the claimed size,
/// leaving the store inconsistent.
#[test]
fn a_cache_lying_about_a_layer_size_breaks_no_other_image() {
    if !ready() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = push_base(&reg);
    let ctx = context(&[("Dockerfile", &format!("FROM {base}\nRUN echo hi > /f\n"))]);
    let honest = format!("{}/cache/s1:main", reg.host());
    let a = Client::new(false);
    build_json(
        &a,
        ctx.path(),
        &[
            "-t",
            "app",
            "--cache-to",
            &format!("type=registry,ref={honest}"),
        ],
    );
    let mut m = raw_manifest(&honest);
    let mut digests = vec![m["config"]["digest"].as_str().expect("config").to_string()];
    for l in m["layers"].as_array().expect("layers") {
        digests.push(l["digest"].as_str().expect("digest").to_string());
    }
    for d in &digests {
        mount_blob(&reg, "evil/s1", "cache/s1", d);
    }
    let size = m["layers"][0]["size"].as_u64().expect("size");
    m["layers"][0]["size"] = (size + 1).into();
    common::registry::put_manifest(
        &reg,
        "evil/s1",
        "x",
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&m).expect("json"),
    );
    let evil = format!("{}/evil/s1:x", reg.host());
    for evil_first in [false, true] {
        let c = Client::new(false);
        let import = |tag: &str, r: &str| {
            build_json(
                &c,
                ctx.path(),
                &["-t", tag, "--cache-from", &format!("type=registry,ref={r}")],
            )
        };
        if evil_first {
            import("evil", &evil);
            import("app", &honest);
        } else {
            import("app", &honest);
            import("evil", &evil);
        }
        assert_eq!(
            c.stdout(&["run", "--rm", "app", "cat", "/f"]),
            "hi",
            "evil first: {evil_first}"
        );
        let o = c.run(&["save", "-o", "/dev/null", "app"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = c.run(&["system", "check"]);
        assert!(
            o.status.success(),
            "evil first: {evil_first}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// `COPY --link` under `mode=max`: a fully cached build (the stacked
/// layer a hit) still exports the copy's own record, so a runner whose
/// chain below differs takes the copy from the cache. Before, the second
/// export of the CI pattern dropped it and every later change above the
/// step ran the copy again.
#[test]
fn a_cached_link_copy_stays_in_a_max_cache() {
    if !ready() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = push_base(&reg);
    let ctx = context(&[
        (
            "Dockerfile",
            &format!("FROM {base}\nARG V=1\nRUN echo $V > /v\nCOPY --link big /big\n"),
        ),
        ("big", "payload\n"),
    ]);
    let cache = format!("{}/cache/link:1", reg.host());
    let to = format!("type=registry,ref={cache},mode=max");
    let a = Client::new(false);
    build_json(&a, ctx.path(), &["-t", "l", "--cache-to", &to]);
    let (_, ev) = build_json(&a, ctx.path(), &["-t", "l", "--cache-to", &to]);
    assert!(ran(&ev).is_empty(), "{ev:?}");
    let b = Client::new(false);
    let (_, ev) = build_json(
        &b,
        ctx.path(),
        &[
            "--build-arg",
            "V=2",
            "--cache-from",
            &format!("type=registry,ref={cache}"),
        ],
    );
    let ran = ran(&ev);
    assert!(ran.iter().any(|n| n.contains("RUN")), "{ran:?}");
    assert!(
        !ran.iter().any(|n| n.contains("COPY")),
        "the copy ran: {ran:?}"
    );
}

/// A cache record that keeps a step's honest diffID but names another
/// blob for it (a gzip of other files): the build takes the step from the
/// cache (the claim is lazy, as BuildKit's), but a push of the image
/// proves the blob against the diffID before sending it, and fails —
/// before, the hostile bytes went out under the honest diffID, exit 0.
#[test]
fn a_push_never_ships_a_claimed_blob_it_did_not_prove() {
    if !ready() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = push_base(&reg);
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN echo hello > /hello\n"),
    )]);
    let cache = format!("{}/cache:1", reg.host());
    let a = Client::new(false);
    build_json(
        &a,
        ctx.path(),
        &["--cache-to", &format!("type=registry,ref={cache},mode=max")],
    );
    // The hostile blob: a gzip of a tar holding other bytes.
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(tmp.path().join("hello"), "EVIL\n").expect("write");
    let o = Command::new("sh")
        .arg("-c")
        .arg("tar -C \"$1\" -cf - hello | gzip -n > \"$1/layer.tgz\"")
        .arg("sh")
        .arg(tmp.path())
        .output()
        .expect("tar");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let evil = std::fs::read(tmp.path().join("layer.tgz")).expect("layer");
    let digest = common::registry::push_blob(&reg, "cache", &evil);
    let mut m = raw_manifest(&cache);
    let last = m["layers"].as_array().expect("layers").len() - 1;
    m["layers"][last] = serde_json::json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": digest,
        "size": evil.len(),
    });
    common::registry::put_manifest(
        &reg,
        "cache",
        "evil",
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&m).expect("json"),
    );
    let b = Client::new(false);
    let target = format!("{}/victim:1", reg.host());
    build_json(
        &b,
        ctx.path(),
        &[
            "-t",
            &target,
            "--cache-from",
            &format!("type=registry,ref={}/cache:evil", reg.host()),
        ],
    );
    let o = b.run(&["push", &target]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the claimed blob was pushed: {err}");
    assert!(err.contains(&digest), "{err}");
    let o = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{target}"))
        .output()
        .expect("skopeo");
    assert!(!o.status.success(), "a manifest was pushed");
}

#[test]
fn local_oci_layout_cache_round_trips() {
    if !ready() {
        return;
    }
    let (_reg, ctx, _dir, dest, id_a) = app_cached_in_a_layout();
    let index: Value =
        serde_json::from_slice(&std::fs::read(dest.join("index.json")).expect("index"))
            .expect("index json");
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    assert!(dest.join("oci-layout").exists());

    let b = Client::new(false);
    let from = format!("type=local,src={}", dest.display());
    let (id_b, ev) = build_json(&b, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    assert_eq!(count(&ev, "cached"), 3, "{ev:?}");
    assert!(!logged(&ev, "MARKER"));
    assert_eq!(id_a, id_b);
    assert_eq!(
        b.stdout(&["run", "--rm", "app:1", "cat", "/b.txt"]),
        "one\nfirst"
    );

    // A blob of the layout corrupted in place (same size) is written
    // again by the next export to it, not kept by its name and size. The
    // export is the CI pattern (`--cache-from` and `--cache-to` the same
    // place): a build without the import would run the steps again (an
    // imported record answers only for its import) and export other
    // layers whenever the clock moved to the next second, leaving the
    // corrupt blob unreferenced rather than rewritten.
    let (_, layer) = top_record(&dest);
    let hex = layer["digest"]
        .as_str()
        .expect("digest")
        .trim_start_matches("sha256:")
        .to_string();
    let blob = dest.join("blobs/sha256").join(&hex);
    let mut bytes = std::fs::read(&blob).expect("blob");
    for b in bytes.iter_mut().take(64) {
        *b ^= 0xff;
    }
    std::fs::write(&blob, &bytes).expect("corrupt");
    let to = format!("type=local,dest={}", dest.display());
    let (_, ev) = build_json(
        &b,
        ctx.path(),
        &["-t", "app:1", "--cache-from", &from, "--cache-to", &to],
    );
    assert!(!logged(&ev, "MARKER"), "{ev:?}");
    let (_, still) = top_record(&dest);
    assert_eq!(
        still["digest"], layer["digest"],
        "the export names the blob"
    );
    let again = std::fs::read(&blob).expect("blob");
    assert_eq!(
        kiln_image::Digest::sha256_of(&again).hex(),
        hex,
        "the corrupt blob was kept"
    );
}

#[test]
fn inline_cache_in_the_pushed_image() {
    if !ready() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = push_base(&reg);
    let ctx = app(&base);
    let image = format!("{}/app/inline:1", reg.host());

    let a = Client::new(false);
    let out = format!("type=registry,name={image}");
    let meta = a.conf.path().join("metadata.json");
    let (id_a, _) = build_json(
        &a,
        ctx.path(),
        &[
            "--output",
            &out,
            "--cache-to",
            "type=inline",
            "--metadata-file",
            meta.to_str().expect("utf8"),
        ],
    );
    let m = raw_manifest(&image);
    // The metadata names the manifest the tag now points at (the
    // annotated one the inline cache put), not the one pushed before it.
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{image}"))
        .output()
        .expect("skopeo");
    let tagged = kiln_image::Digest::sha256_of(&raw.stdout).to_string();
    let meta: Value =
        serde_json::from_slice(&std::fs::read(&meta).expect("metadata")).expect("json");
    assert_eq!(meta["containerimage.digest"], tagged.as_str(), "{meta}");
    let records: Value = serde_json::from_str(
        m["annotations"]["dev.kiln.cache.v1"]
            .as_str()
            .expect("inline annotation"),
    )
    .expect("records");
    assert_eq!(records["records"].as_array().map(Vec::len), Some(3), "{m}");
    // skopeo still reads it as an ordinary image.
    let o = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{image}"))
        .output()
        .expect("skopeo");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let b = Client::new(false);
    let from = format!("type=registry,ref={image}");
    let (id_b, ev) = build_json(&b, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    assert_eq!(count(&ev, "cached"), 3, "{ev:?}");
    assert!(!logged(&ev, "MARKER"));
    assert_eq!(id_a, id_b);
}

#[test]
fn a_missing_cache_is_a_warning_and_the_build_runs() {
    if !ready() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = push_base(&reg);
    let ctx = app(&base);
    let b = Client::new(false);
    let from = format!("type=registry,ref={}/cache:none", reg.host());
    let o = b.run(&[
        "build",
        "-t",
        "app:1",
        "--cache-from",
        &from,
        ctx.path().to_str().expect("utf8"),
    ]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("failed to import cache"), "{err}");
}

/// Rewrites the cache in the layout `dest`: its top record (no other
/// names it as its parent) claims the diffID `lie`, with the chain ID that
/// diffID gives, so the record is consistent and used; its blob stays the
/// real one. Returns that blob's digest.
fn claim_in_layout(dest: &Path, lie: &str) -> String {
    edit_top_record(dest, |top| {
        let parent = top["parentChainID"].as_str().expect("parent").to_string();
        top["diffID"] = Value::String(lie.to_string());
        top["chainID"] = Value::String(
            kiln_image::Digest::sha256_of(format!("{parent} {lie}").as_bytes()).to_string(),
        );
    })
}

/// Rewrites the top record (no other names it as its parent) of the cache
/// in the layout at `dest` with `edit`, and the config, manifest and index
/// above it. Gives the record's layer digest.
fn edit_top_record(dest: &Path, edit: impl FnOnce(&mut Value)) -> String {
    edit_top_record_and_layer(dest, |top, _| edit(top))
}

/// [`edit_top_record`] whose `edit` also gets the record's layer
/// descriptor in the manifest (to name another blob).
fn edit_top_record_and_layer(dest: &Path, edit: impl FnOnce(&mut Value, &mut Value)) -> String {
    let mut digest = String::new();
    edit_cache(dest, |cfg, m| {
        let records = cfg["records"].as_array_mut().expect("records");
        let parents: Vec<String> = records
            .iter()
            .filter_map(|r| r["parentChainID"].as_str().map(str::to_string))
            .collect();
        let top = records
            .iter_mut()
            .find(|r| {
                !parents
                    .iter()
                    .any(|p| Some(p.as_str()) == r["chainID"].as_str())
            })
            .expect("a top record");
        let layer = top["layer"].as_u64().expect("layer") as usize;
        edit(top, &mut m["layers"][layer]);
        digest = m["layers"][layer]["digest"]
            .as_str()
            .expect("layer digest")
            .to_string();
    });
    digest
}

/// A cache record naming a layer on another parent than the step's (here
/// on top of another build's image in the same store, to read its files):
/// the record is consistent in itself (its chain ID is that parent's and
/// its diffID's), but the step's parent is not that one, so the record is
/// not used and the step runs. Used, the image would have had the other
/// build's `/secret`.
#[test]
fn a_cache_record_on_another_parent_is_not_used() {
    if !ready() {
        return;
    }
    let (reg, ctx, _dir, dest, _) = app_cached_in_a_layout();
    let base = format!("{}/base/busybox:1", reg.host());
    let c = Client::new(false);
    // Another build's image in the same store.
    let other = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN echo TOPSECRET > /secret\n"),
    )]);
    build_json(&c, other.path(), &["-t", "other:1"]);
    let diff_ids: Vec<String> = serde_json::from_str(&c.stdout(&[
        "inspect",
        "--format",
        "{{json .RootFS.Layers}}",
        "other:1",
    ]))
    .expect("diff ids");
    let mut chain = diff_ids[0].clone();
    for d in &diff_ids[1..] {
        chain = kiln_image::Digest::sha256_of(format!("{chain} {d}").as_bytes()).to_string();
    }
    // The cache's top record re-parented onto it.
    edit_top_record(&dest, |top| {
        let diff = top["diffID"].as_str().expect("diff").to_string();
        top["parentChainID"] = Value::String(chain.clone());
        top["chainID"] = Value::String(
            kiln_image::Digest::sha256_of(format!("{chain} {diff}").as_bytes()).to_string(),
        );
    });

    let from = format!("type=local,src={}", dest.display());
    let (_, ev) = build_json(&c, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    assert!(
        logged(&ev, "MARKER-SECOND"),
        "the re-parented record was used: {ev:?}"
    );
    let o = c.run(&[
        "run",
        "--rm",
        "app:1",
        "sh",
        "-c",
        "cat /secret 2>/dev/null; cat /b.txt",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("TOPSECRET"), "another build's files: {out}");
    assert_eq!(out, "one\nfirst\n");
}

/// A cache whose top record lies about its layer's diffID (the blob is
/// the real one, so its digest checks out; the chain ID fits the lie): the
/// layer is kept as its blob, and unpacking it — here for `kiln run` —
/// finds the lie and refuses it; nothing of it becomes a snapshot, and the
/// store stays sound.
#[test]
fn a_cache_record_lying_about_a_diff_id_is_refused_when_the_layer_is_unpacked() {
    if !ready() {
        return;
    }
    let (_reg, ctx, _dir, dest, _) = app_cached_in_a_layout();

    let lie = kiln_image::Digest::sha256_of(b"not this layer").to_string();
    claim_in_layout(&dest, &lie);

    let b = Client::new(false);
    let from = format!("type=local,src={}", dest.display());
    let o = b.run(&[
        "build",
        "-q",
        "-t",
        "lie:1",
        "--cache-from",
        &from,
        ctx.path().to_str().expect("utf8"),
    ]);
    let made = snapshots(&b);
    if o.status.success() {
        // Kept lazily: the lie is found when the layer is unpacked.
        let r = b.run(&["run", "--rm", "lie:1", "cat", "/b.txt"]);
        assert!(!r.status.success(), "a lying layer ran");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            err.contains(&lie) || err.to_lowercase().contains("diffid"),
            "{err}"
        );
    } else {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&lie) || err.to_lowercase().contains("diffid"),
            "{err}"
        );
    }
    // The build unpacked nothing (the base too is kept lazy until a step
    // needs it): `run` makes the base and the two true layers at most,
    // never the lying one.
    assert!(
        snapshots(&b) <= made + 3,
        "at most the base and the two true layers were unpacked: {made} -> {}",
        snapshots(&b)
    );
    let o = b.run(&["system", "check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A cache record that claims the diffID of another layer the runner has
/// (its own image's, built here) with a blob that is not that layer: the
/// claim must not become the runner's memo of how that layer compresses,
/// or every later push of its own image would send the cache's blob for
/// its layer. The push sends the true layer, which a pull verifies.
#[test]
fn a_cache_record_claiming_a_local_layer_never_ships_its_blob_for_that_layer() {
    if !ready() {
        return;
    }
    let (reg, ctx, _dir, dest, _) = app_cached_in_a_layout();
    let base = push_base(&reg);
    let b = Client::new(false);
    let own = context(&[
        ("Dockerfile", &format!("FROM {base}\nCOPY v.txt /v.txt\n")),
        ("v.txt", "the runner's own layer\n"),
    ]);
    build_json(&b, own.path(), &["-t", "own:1"]);
    let v: Value = serde_json::from_str(&b.stdout(&["inspect", "own:1"])).expect("inspect");
    let own_diff = v[0]["RootFS"]["Layers"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(Value::as_str)
        .expect("a layer")
        .to_string();

    let claimed = claim_in_layout(&dest, &own_diff);
    let from = format!("type=local,src={}", dest.display());
    let o = b.run(&[
        "build",
        "-q",
        "-t",
        "app:1",
        "--cache-from",
        &from,
        ctx.path().to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let target = format!("{}/own:1", reg.host());
    b.ok(&["tag", "own:1", &target]);
    b.ok(&["push", &target]);
    let m = raw_manifest(&target);
    let pushed = m["layers"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(|l| l["digest"].as_str())
        .expect("pushed layer")
        .to_string();
    assert_ne!(
        pushed, claimed,
        "the cache's blob went out as the runner's layer"
    );
    // A pull (which checks every layer against its diffID) gets the file.
    let c = Client::new(false);
    c.ok(&["pull", &target]);
    assert_eq!(
        c.stdout(&["run", "--rm", &target, "cat", "/v.txt"]),
        "the runner's own layer"
    );
    let o = b.run(&["system", "check"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The blobs (hex digests) an OCI layout's `index.json` reaches: the
/// first manifest's layers, then its config and the manifest itself.
fn layout_blobs(dir: &Path) -> Vec<String> {
    let read = |p: std::path::PathBuf| -> Value {
        serde_json::from_slice(&std::fs::read(p).expect("read")).expect("json")
    };
    let hex = |d: &Value| {
        d.as_str()
            .and_then(|s| s.strip_prefix("sha256:"))
            .expect("digest")
            .to_string()
    };
    let index = read(dir.join("index.json"));
    let m = hex(&index["manifests"][0]["digest"]);
    let manifest = read(dir.join("blobs/sha256").join(&m));
    let mut out: Vec<String> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| hex(&l["digest"]))
        .collect();
    out.push(hex(&manifest["config"]["digest"]));
    out.push(m);
    out
}

/// A cache layout directory is not trusted (a CI cache restored from
/// another branch may have been written by anyone): symlinks planted at
/// every name the export writes — `oci-layout`, `index.json.tmp`, each
/// blob's temp name, a blob's own name pointing at a host file of the
/// same size, a symlinked `index.json` — are replaced or refused, never
/// written through; what the export leaves is a layout another runner
/// builds from.
#[test]
fn a_planted_cache_layout_is_written_inside_never_through_its_symlinks() {
    use std::os::unix::fs::symlink;
    if !ready() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = push_base(&reg);
    let ctx = app(&base);
    let dir = tempfile::tempdir().expect("tmp");
    let first = dir.path().join("first");
    let a = Client::new(false);
    let to = format!("type=local,dest={}", first.display());
    let (id_a, _) = build_json(&a, ctx.path(), &["-t", "app:1", "--cache-to", &to]);
    let mut names: Vec<String> = std::fs::read_dir(first.join("blobs/sha256"))
        .expect("blobs")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");

    let host = tempfile::tempdir().expect("tmp");
    let victim = |n: &str, body: &[u8]| {
        let p = host.path().join(n);
        std::fs::write(&p, body).expect("victim");
        p
    };
    let dest = dir.path().join("planted");
    let blobs = dest.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let mut victims = vec![
        victim("layout", b"host file\n"),
        victim("index-tmp", b"host file\n"),
    ];
    symlink(&victims[0], dest.join("oci-layout")).expect("symlink");
    symlink(&victims[1], dest.join("index.json.tmp")).expect("symlink");
    for n in &names {
        let v = victim(&format!("{n}.tmp"), b"host file\n");
        symlink(&v, blobs.join(format!("{n}.tmp"))).expect("symlink");
        victims.push(v);
    }
    // A layer blob's own name: a host file of the blob's size (the
    // export used to take a file of the right size for the blob).
    let layer = layout_blobs(&first)[0].clone();
    let size = std::fs::metadata(first.join("blobs/sha256").join(&layer))
        .expect("blob")
        .len();
    let same = victim("same-size", &vec![b'x'; size as usize]);
    symlink(&same, blobs.join(&layer)).expect("symlink");

    let to = format!("type=local,dest={}", dest.display());
    build_json(&a, ctx.path(), &["-t", "app:1", "--cache-to", &to]);
    for v in &victims {
        assert_eq!(
            std::fs::read(v).expect("victim"),
            b"host file\n",
            "{} was written through a symlink",
            v.display()
        );
    }
    assert_eq!(
        std::fs::read(&same).expect("victim"),
        vec![b'x'; size as usize]
    );
    let written = layout_blobs(&dest);
    assert!(written.contains(&layer), "{written:?}");
    for n in &written {
        let p = blobs.join(n);
        let st = std::fs::symlink_metadata(&p).expect("blob");
        assert!(st.file_type().is_file(), "{} is not a file", p.display());
        let got = kiln_image::Digest::sha256_of(&std::fs::read(&p).expect("blob"));
        assert_eq!(got.hex(), n.as_str());
    }
    assert!(std::fs::symlink_metadata(dest.join("oci-layout"))
        .expect("layout")
        .file_type()
        .is_file());

    // Another runner builds from what was left.
    let b = Client::new(false);
    let from = format!("type=local,src={}", dest.display());
    let (id_b, ev) = build_json(&b, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    assert_eq!(count(&ev, "cached"), 3, "{ev:?}");
    assert_eq!(id_a, id_b);

    // A symlinked index.json is refused, and its target left alone.
    let idx = victim("index", b"{\"schemaVersion\":2,\"manifests\":[]}\n");
    std::fs::remove_file(dest.join("index.json")).expect("rm");
    symlink(&idx, dest.join("index.json")).expect("symlink");
    let o = a.run(&[
        "build",
        "-q",
        "-t",
        "app:1",
        "--cache-to",
        &to,
        ctx.path().to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() || err.contains("index.json"), "{err}");
    assert_eq!(
        std::fs::read(&idx).expect("victim"),
        b"{\"schemaVersion\":2,\"manifests\":[]}\n"
    );

    // Read back, the layout's names are not followed either: an
    // index.json that is a symlink to an endless device is refused at
    // once (it used to be read to the end of memory).
    std::fs::remove_file(dest.join("index.json")).expect("rm");
    symlink("/dev/zero", dest.join("index.json")).expect("symlink");
    let c = Client::new(false);
    let started = std::time::Instant::now();
    let o = c.run(&[
        "build",
        "-q",
        "-t",
        "app:1",
        "--cache-from",
        &from,
        ctx.path().to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("index.json"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

/// The top record of the cache in the layout `dest` and its layer's
/// descriptor.
fn top_record(dest: &Path) -> (Value, Value) {
    let mut got = None;
    let copy = tempfile::tempdir().expect("tmp");
    // Read through an edit of a copy that changes nothing.
    copy_dir(dest, copy.path());
    edit_top_record_and_layer(copy.path(), |top, layer| {
        got = Some((top.clone(), layer.clone()));
    });
    got.expect("a top record")
}

fn copy_dir(from: &Path, to: &Path) {
    let o = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .output()
        .expect("cp");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A cache imported from one place never answers later for another cache
/// at the same place (the same `src=` path, as the same registry
/// repository under another tag) that names other bytes for a step:
///
/// 1. A cache whose record for the last step names another layer (a
///    consistent one: its own diffID and chain ID on the same parent) —
///    before, the step was remembered under "this source, this key" and
///    that memory answered for the honest cache imported later.
/// 2. A cache whose record keeps the honest diffID and chain ID but names
///    another blob — before, the lazy layer's first recorded blob
///    described the step for every later build, so the image's manifest
///    (and a push) named the other blob for the honest diffID.
#[test]
fn a_cache_imported_earlier_from_the_same_place_never_answers_for_another() {
    if !ready() {
        return;
    }
    let (reg, ctx, dir, honest, _) = app_cached_in_a_layout();
    let base = format!("{}/base/busybox:1", reg.host());
    // Another layer on the same parent: the same first steps, another last.
    let other_ctx = context(&[
        (
            "Dockerfile",
            &format!(
                "FROM {base}\nRUN echo MARKER-FIRST && echo first > /first.txt\nCOPY a.txt /a.txt\nRUN echo EVIL > /b.txt\n"
            ),
        ),
        ("a.txt", "one\n"),
    ]);
    // The same parent under both: the other build takes its first steps
    // from the honest cache, and a.txt's mtime (in the COPY layer's tar)
    // is the honest one's. (Built on its own, the other's first RUN layer
    // held its own /first.txt mtime: a second later, under load, its top
    // record sat on another parent, the import dropped it as
    // inconsistent, and the victim ran the step itself — the flaky miss
    // of session 14.)
    let honest_mtime = std::fs::metadata(ctx.path().join("a.txt"))
        .and_then(|m| m.modified())
        .expect("mtime");
    std::fs::File::options()
        .write(true)
        .open(other_ctx.path().join("a.txt"))
        .and_then(|f| f.set_modified(honest_mtime))
        .expect("set mtime");
    let other = dir.path().join("other");
    let o = Client::new(false);
    build_json(
        &o,
        other_ctx.path(),
        &[
            "-t",
            "o:1",
            "--cache-from",
            &format!("type=local,src={}", honest.display()),
            "--cache-to",
            &format!("type=local,dest={}", other.display()),
        ],
    );
    let (evil_rec, evil_layer) = top_record(&other);
    let (honest_rec, honest_layer) = top_record(&honest);
    let evil_blob = evil_layer["digest"].as_str().expect("digest").to_string();
    let blob_file = |d: &Path, digest: &str| {
        d.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    // 1: the other layer under the honest step's key.
    let graft = dir.path().join("graft");
    std::fs::create_dir_all(&graft).expect("mkdir");
    copy_dir(&honest, &graft);
    std::fs::copy(blob_file(&other, &evil_blob), blob_file(&graft, &evil_blob)).expect("copy");
    edit_top_record_and_layer(&graft, |top, layer| {
        top["diffID"] = evil_rec["diffID"].clone();
        top["chainID"] = evil_rec["chainID"].clone();
        *layer = evil_layer.clone();
    });
    // 2: the honest record naming the other blob.
    let swap = dir.path().join("swap");
    std::fs::create_dir_all(&swap).expect("mkdir");
    copy_dir(&honest, &swap);
    std::fs::copy(blob_file(&other, &evil_blob), blob_file(&swap, &evil_blob)).expect("copy");
    edit_top_record_and_layer(&swap, |_, layer| {
        *layer = evil_layer.clone();
    });

    // The victim's store imports each from one place first…
    let v = Client::new(false);
    let place = dir.path().join("place");
    let from = format!("type=local,src={}", place.display());
    for (i, hostile) in [&graft, &swap].into_iter().enumerate() {
        let _ = std::fs::remove_dir_all(&place);
        std::fs::create_dir_all(&place).expect("mkdir");
        copy_dir(hostile, &place);
        let o = v.run(&[
            "build",
            "--progress",
            "json",
            "-t",
            &format!("hostile:{i}"),
            "--cache-from",
            &from,
            ctx.path().to_str().expect("utf8"),
        ]);
        if i == 0 {
            // The premise: the graft is a consistent cache, every step
            // taken from it (had the victim run the last step itself, its
            // own record would answer every later build).
            let err = String::from_utf8_lossy(&o.stderr);
            let ev: Vec<Value> = err
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            assert_eq!(count(&ev, "cached"), 3, "{err}");
        }
    }
    // …then the honest cache there, twice.
    std::fs::remove_dir_all(&place).expect("rm");
    std::fs::create_dir_all(&place).expect("mkdir");
    copy_dir(&honest, &place);
    build_json(&v, ctx.path(), &["-t", "app:1", "--cache-from", &from]);
    assert_eq!(
        v.stdout(&["run", "--rm", "app:1", "cat", "/b.txt"]),
        "one\nfirst"
    );
    build_json(&v, ctx.path(), &["-t", "app:2", "--cache-from", &from]);
    let target = format!("{}/victim/app:2", reg.host());
    v.ok(&["tag", "app:2", &target]);
    v.ok(&["push", &target]);
    let m = raw_manifest(&target);
    let top = m["layers"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(|l| l["digest"].as_str())
        .expect("pushed layer")
        .to_string();
    assert_ne!(
        top, evil_blob,
        "the other blob went out for the honest layer"
    );
    if top != honest_layer["digest"].as_str().expect("digest") {
        // Another compression of the honest layer is as good (a pull
        // below checks what it holds); say so for the log.
        eprintln!(
            "pushed {top}, the honest cache's blob is {}",
            honest_layer["digest"]
        );
    }
    let fresh = Client::new(false);
    fresh.ok(&["pull", &target]);
    assert_eq!(
        fresh.stdout(&["run", "--rm", &target, "cat", "/b.txt"]),
        "one\nfirst"
    );
    // The step is the honest cache's layer.
    let last: Value = {
        let cfg: Value = serde_json::from_str(&v.stdout(&[
            "inspect",
            "--format",
            "{{json .RootFS.Layers}}",
            "app:2",
        ]))
        .expect("json");
        cfg.as_array()
            .and_then(|l| l.last())
            .cloned()
            .expect("layer")
    };
    assert_ne!(last, evil_rec["diffID"], "the other layer's diffID");
    assert_eq!(last, honest_rec["diffID"]);
    let c = v.run(&["system", "check"]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
}

/// Rewrites the cache config and manifest of the layout at `dest` with
/// `edit`, and the index above them.
fn edit_cache(dest: &Path, edit: impl FnOnce(&mut Value, &mut Value)) {
    let blob = |d: &str| {
        dest.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let put = |bytes: &[u8]| -> (String, usize) {
        let d = kiln_image::Digest::sha256_of(bytes).to_string();
        std::fs::write(blob(&d), bytes).expect("write blob");
        (d, bytes.len())
    };
    let mut index: Value =
        serde_json::from_slice(&std::fs::read(dest.join("index.json")).expect("index"))
            .expect("index json");
    let md = index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let mut m: Value = serde_json::from_slice(&std::fs::read(blob(&md)).expect("manifest"))
        .expect("manifest json");
    let cd = m["config"]["digest"].as_str().expect("config").to_string();
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(blob(&cd)).expect("config")).expect("config json");
    edit(&mut cfg, &mut m);
    let (cd, cn) = put(&serde_json::to_vec(&cfg).expect("json"));
    m["config"]["digest"] = Value::String(cd);
    m["config"]["size"] = cn.into();
    let (md, mn) = put(&serde_json::to_vec(&m).expect("json"));
    index["manifests"][0]["digest"] = Value::String(md);
    index["manifests"][0]["size"] = mn.into();
    std::fs::write(
        dest.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("index");
}

/// A `COPY --link` layer taken from an import is stacked on the chain
/// under a key of the import's, never under the stacking key a build
/// without the import looks up (that key leaves the layer's content
/// out). Here a cache names the victim's `--link` step with another
/// layer: the build importing it gets it (the import's word), and the
/// next build without `--cache-from` copies the context's own file.
/// (Before: the stacked layer was remembered under the stacking key, and
/// every later build on the store got the cache's file.)
#[test]
fn a_link_layer_taken_from_an_import_is_not_remembered_for_other_builds() {
    if !ready() {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let base = push_base(&reg);
    let df = format!("FROM {base}\nCOPY --link a.txt /a.txt\n");
    let honest = context(&[("Dockerfile", &df), ("a.txt", "one\n")]);
    let other = context(&[("Dockerfile", &df), ("a.txt", "EVIL\n")]);
    let dir = tempfile::tempdir().expect("tmp");
    let layout = |name: &str| dir.path().join(name);
    for (ctx, name) in [(&honest, "honest"), (&other, "other")] {
        let c = Client::new(false);
        let to = format!("type=local,dest={},mode=max", layout(name).display());
        build_json(&c, ctx.path(), &["-t", "x:1", "--cache-to", &to]);
    }
    // The honest inner (chain-free) key of the --link step.
    let inner_key = |dest: &Path| {
        let mut key = None;
        let copy = tempfile::tempdir().expect("tmp");
        copy_dir(dest, copy.path());
        edit_cache(copy.path(), |cfg, _| {
            key = cfg["records"]
                .as_array()
                .expect("records")
                .iter()
                .find(|r| r["parentChainID"].is_null())
                .map(|r| r["key"].clone());
        });
        key.expect("a --link record")
    };
    let honest_key = inner_key(&layout("honest"));
    // The other cache's --link layer under the honest key; its stacking
    // record dropped.
    edit_cache(&layout("other"), |cfg, _| {
        let recs = cfg["records"].as_array_mut().expect("records");
        recs.retain(|r| r["parentChainID"].is_null());
        recs[0]["key"] = honest_key.clone();
    });
    let v = Client::new(false);
    let from = format!("type=local,src={}", layout("other").display());
    build_json(
        &v,
        honest.path(),
        &["-t", "imported:1", "--cache-from", &from],
    );
    build_json(&v, honest.path(), &["-t", "own:1"]);
    assert_eq!(v.stdout(&["run", "--rm", "own:1", "cat", "/a.txt"]), "one");
}
