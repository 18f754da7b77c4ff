//! Nothing unverified enters the store: hostile images whose config names
//! another layer's diffID (through an archive and through a registry), a
//! stored blob with one byte flipped, and another local user reaching into
//! the store.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::registry::{ready, Client, Reg, RegOpts};
use common::{prerequisites, Kiln};

/// The busybox image's only diffID, from `kiln inspect`.
fn diff_id_of(k: &Kiln, image: &str) -> String {
    let v = k.inspect(image);
    let layers = v["RootFS"]["Layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no RootFS.Layers in {v}"));
    layers
        .last()
        .and_then(|l| l.as_str())
        .expect("a diffID")
        .to_string()
}

fn sha256_file(p: &Path) -> String {
    let o = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    let s = String::from_utf8_lossy(&o.stdout);
    format!("sha256:{}", s.split_whitespace().next().expect("digest"))
}

/// A docker-archive `evil:latest` whose one layer holds `/pwned` while its
/// config says the layer is `claimed_diff_id`. `gzip`: the layer is
/// stored compressed (so its digest says nothing about its diffID).
/// Returns (archive, layer blob digest, the layer's real diffID).
fn evil_archive(dir: &Path, claimed_diff_id: &str, gzip: bool) -> (PathBuf, String, String) {
    let work = dir.join(if gzip { "evil-gz" } else { "evil" });
    let tree = work.join("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("pwned"), "planted by another image\n").expect("write");
    let arch = work.join("arch");
    std::fs::create_dir_all(arch.join("l")).expect("mkdir");
    let tar = arch.join("l/layer.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .args(["--numeric-owner", "-cf"])
        .arg(&tar)
        .arg("pwned")
        .status()
        .expect("tar");
    assert!(st.success());
    let real_diff = sha256_file(&tar);
    let layer_name = if gzip {
        let st = Command::new("gzip")
            .args(["-n", "-f"])
            .arg(&tar)
            .status()
            .expect("gzip");
        assert!(st.success());
        "l/layer.tar.gz"
    } else {
        "l/layer.tar"
    };
    let blob = sha256_file(&arch.join(layer_name));
    let cfg = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/pwned"]}},"rootfs":{{"type":"layers","diff_ids":["{claimed_diff_id}"]}}}}"#
    );
    std::fs::write(arch.join("cfg.json"), cfg).expect("config");
    std::fs::write(
        arch.join("manifest.json"),
        format!(
            r#"[{{"Config":"cfg.json","RepoTags":["evil:latest"],"Layers":["{layer_name}"]}}]"#
        ),
    )
    .expect("manifest.json");
    let out = work.join("evil.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&arch)
        .args(["-cf"])
        .arg(&out)
        .args(["manifest.json", "cfg.json", layer_name])
        .status()
        .expect("tar");
    assert!(st.success());
    (out, blob, real_diff)
}

/// The busybox image is what it was: no file of the hostile image in it.
fn busybox_is_intact(k: &Kiln) {
    let o = k.run(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "test ! -e /pwned && echo intact",
    ]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("intact"),
        "busybox was poisoned: {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_loaded_image_claiming_busyboxs_diff_id_never_becomes_busyboxs_snapshot() {
    if !prerequisites() {
        return;
    }
    for gzip in [false, true] {
        let k = Kiln::with_busybox();
        let bb_diff = diff_id_of(&k, "busybox");
        let tmp = tempfile::tempdir().expect("tmp");
        let (arch, blob, real) = evil_archive(tmp.path(), &bb_diff, gzip);
        let load = k.run(&["load", "-i", arch.to_str().expect("utf8")]);
        let err = if load.status.success() {
            // Taken in (a compressed layer's diffID is learnt only by
            // unpacking it): using the image must fail, keeping nothing.
            let o = k.run(&["run", "--rm", "evil", "/pwned"]);
            assert!(!o.status.success(), "the hostile image ran (gzip {gzip})");
            String::from_utf8_lossy(&o.stderr).into_owned()
        } else {
            String::from_utf8_lossy(&load.stderr).into_owned()
        };
        for needle in [&bb_diff, &real, &blob] {
            assert!(
                err.contains(needle.as_str()),
                "the error should name {needle} (gzip {gzip}):\n{err}"
            );
        }
        assert!(
            err.contains("evil"),
            "the error should name the image:\n{err}"
        );
        busybox_is_intact(&k);
        let check = k.ok(&["system", "check"]);
        assert!(check.starts_with("ok:"), "{check}");
        let deep = k.run(&["system", "check", "--deep"]);
        let report = String::from_utf8_lossy(&deep.stderr);
        if load.status.success() {
            // The lying image is still stored: the deep check names it.
            assert!(
                !deep.status.success() && report.contains("evil") && report.contains(&real),
                "{report}"
            );
        } else {
            assert!(deep.status.success(), "{report}");
        }
    }
}

#[test]
fn a_registry_image_claiming_busyboxs_diff_id_never_becomes_busyboxs_snapshot() {
    if !ready(&["docker-registry"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let name = format!("{}/evil:1", reg.host());
    // First the tag names an honest image, which a victim pulls.
    let seed = Client::new(true);
    seed.ok(&["push", "-q", "busybox:latest", &name]);
    let moved = Client::new(true);
    moved.ok(&["pull", &name]);
    let honest_id = moved.stdout(&["images", "-q", "--no-trunc", &name]);
    // The attacker: crafts the image and pushes its blobs as they are,
    // with its own client (kiln loads no such image), under that tag.
    let bb_diff = diff_id_of(&Client::new(true).kiln, "busybox");
    let tmp = tempfile::tempdir().expect("tmp");
    let (arch, blob, real) = evil_archive(tmp.path(), &bb_diff, true);
    let work = arch.parent().expect("dir").join("arch");
    let layer = std::fs::read(work.join("l/layer.tar.gz")).expect("layer");
    let cfg = std::fs::read(work.join("cfg.json")).expect("config");
    let layer_digest = common::registry::push_blob(&reg, "evil", &layer);
    assert_eq!(layer_digest, blob);
    let cfg_digest = common::registry::push_blob(&reg, "evil", &cfg);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer.len()}],
    });
    common::registry::put_manifest(
        &reg,
        "evil",
        "1",
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).expect("json"),
    );
    let needles = [&bb_diff, &real, &blob];

    // The victim holding the honest image pulls again: the tag would move,
    // so the layer is proved first, and the pull fails; the tag stays.
    let o = moved.run(&["pull", &name]);
    assert!(!o.status.success(), "the hostile image took the tag");
    let err = String::from_utf8_lossy(&o.stderr);
    for needle in needles {
        assert!(
            err.contains(needle.as_str()),
            "the pull's error should name {needle}:\n{err}"
        );
    }
    assert_eq!(
        moved.stdout(&["images", "-q", "--no-trunc", &name]),
        honest_id
    );
    let o = moved.run(&["run", "--rm", &name, "true"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // So does `build --pull`.
    let ctx = common::context(&[("Dockerfile", &format!("FROM {name}\nLABEL x=y\n"))]);
    common::build_fails(&moved.kiln, ctx.path(), &["--pull"]);
    assert_eq!(
        moved.stdout(&["images", "-q", "--no-trunc", &name]),
        honest_id
    );

    // A victim without the name (busybox, not yet unpacked) pulls it as
    // it is; nothing uses it: a build from it, a run and an export fail
    // naming the layer, and nothing of it becomes busybox's snapshot.
    let victim = Client::new(true);
    victim.ok(&["pull", &name]);
    let err = common::build_fails(&victim.kiln, ctx.path(), &[]);
    for needle in needles {
        assert!(
            err.contains(needle.as_str()),
            "the error should name {needle}:\n{err}"
        );
    }
    assert!(
        err.contains("evil"),
        "the error should name the image:\n{err}"
    );
    let o = victim.run(&["run", "--rm", &name, "/pwned"]);
    assert!(!o.status.success(), "the hostile image ran");
    let o = victim.run(&["export", &name]);
    assert!(!o.status.success(), "the hostile image was exported");
    assert!(
        !o.stdout.windows(7).any(|w| w == b"planted"),
        "the hostile layer's bytes were written out"
    );
    busybox_is_intact(&victim.kiln);
}

/// The stored file of the busybox image's layer blob.
fn busybox_layer_file(k: &Kiln) -> PathBuf {
    // The largest blob is the layer.
    let dir = k.root.path().join("blobs/sha256");
    std::fs::read_dir(&dir)
        .expect("blobs")
        .filter_map(|e| e.ok())
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("a blob")
        .path()
}

fn flip_a_byte(p: &Path) {
    let mut b = std::fs::read(p).expect("read blob");
    let i = b.len() / 2;
    b[i] ^= 0x55;
    std::fs::write(p, b).expect("write blob");
}

#[test]
fn a_flipped_byte_in_a_stored_layer_is_refused_and_loading_again_repairs_it() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let tmp = tempfile::tempdir().expect("tmp");
    let good = tmp.path().join("busybox-oci.tar");
    k.ok(&[
        "save",
        "--format",
        "oci",
        "-o",
        good.to_str().expect("utf8"),
        "busybox",
    ]);
    let blob = busybox_layer_file(&k);
    let digest = format!(
        "sha256:{}",
        blob.file_name().expect("name").to_string_lossy()
    );

    // Corrupt before first use: build and run refuse, naming the blob and
    // what to do.
    flip_a_byte(&blob);
    let ctx = common::context(&[("Dockerfile", "FROM busybox\nRUN echo built\n")]);
    let err = common::build_fails(&k, ctx.path(), &[]);
    assert!(
        err.contains(&digest) && err.contains("corrupt") && err.contains("load or pull"),
        "{err}"
    );
    let o = k.run(&["run", "--rm", "busybox", "true"]);
    assert!(!o.status.success(), "run used a corrupt layer");

    // Loading the good copy again repairs the store.
    k.ok(&["load", "-i", good.to_str().expect("utf8")]);
    assert_eq!(sha256_file(&blob), digest);
    assert_eq!(common::sh(&k, "busybox", "echo fine").trim(), "fine");
    let check = k.ok(&["system", "check"]);
    assert!(check.starts_with("ok:"), "{check}");

    // Corrupt a blob no one has noticed yet: loading again still repairs.
    let k2 = Kiln::with_busybox();
    let blob2 = busybox_layer_file(&k2);
    flip_a_byte(&blob2);
    k2.ok(&["load", "-i", good.to_str().expect("utf8")]);
    assert_eq!(sha256_file(&blob2), digest);
    assert_eq!(common::sh(&k2, "busybox", "echo fine").trim(), "fine");
}

#[test]
fn a_corrupt_pulled_layer_is_refused_and_pulling_again_repairs_it() {
    if !ready(&["docker-registry"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let a = Client::new(true);
    let name = format!("{}/bb:1", reg.host());
    a.ok(&["tag", "busybox", &name]);
    a.ok(&["push", &name]);
    let b = Client::new(false);
    b.ok(&["pull", &name]);
    let blob = busybox_layer_file(&b.kiln);
    let digest = format!(
        "sha256:{}",
        blob.file_name().expect("name").to_string_lossy()
    );
    flip_a_byte(&blob);
    let o = b.run(&["run", "--rm", &name, "true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "run used a corrupt layer");
    assert!(err.contains(&digest) && err.contains("corrupt"), "{err}");
    b.ok(&["pull", &name]);
    assert_eq!(sha256_file(&blob), digest);
    assert_eq!(
        b.stdout(&["run", "--rm", &name, "sh", "-c", "echo fine"]),
        "fine"
    );
    let check = b.ok(&["system", "check", "--deep"]);
    assert!(check.starts_with("ok:"), "{check}");
}

/// Runs `args` as nobody (uid/gid 65534, no groups), from a shell of
/// that user (setpriv itself may still resolve its program's path with
/// root's capabilities).
fn as_nobody(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "sh",
            "-c",
            "exec \"$@\"",
            "sh",
        ])
        .args(args)
        .output()
        .expect("setpriv")
}

#[test]
fn another_user_cannot_read_the_store_or_run_its_setuid_files() {
    if !prerequisites() {
        return;
    }
    if !common::registry::have("setpriv") {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("setpriv (util-linux) missing");
        }
        eprintln!("setpriv missing: not run");
        return;
    }
    // A store under a directory everyone may enter (as /var/lib is),
    // made 0755 the way an older kiln made it.
    let outer = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let root = outer.path().join("store");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // An image with a setuid-root program.
    let rootfs = outer.path().join("rootfs");
    common::make_rootfs(&rootfs);
    let id = rootfs.join("suid-id");
    std::fs::copy("/usr/bin/id", &id).expect("copy id");
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o4755)).expect("chmod");
    let tar = outer.path().join("rootfs.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["--numeric-owner", "-cf"])
        .arg(&tar)
        .arg(".")
        .status()
        .expect("tar");
    assert!(st.success());
    let kiln = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(&root)
            .args(args)
            .env_remove("KILN_ROOT")
            .output()
            .expect("kiln");
        assert!(
            o.status.success(),
            "kiln {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    kiln(&["import", tar.to_str().expect("utf8"), "suid:1"]);
    // Unpacked into a snapshot.
    kiln(&["run", "--rm", "suid:1", "true"]);

    let mode = std::fs::metadata(&root).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "store root mode {mode:o}");

    let snaps: Vec<PathBuf> = std::fs::read_dir(root.join("snapshots"))
        .expect("snapshots")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("fs/suid-id"))
        .filter(|p| p.exists())
        .collect();
    assert!(!snaps.is_empty(), "no snapshot holds the setuid file");
    let blob = std::fs::read_dir(root.join("blobs/sha256"))
        .expect("blobs")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .next()
        .expect("a blob");

    let o = as_nobody(&["ls".as_ref(), root.as_os_str()]);
    assert!(!o.status.success(), "nobody listed the store");
    for p in [&blob, &root.join("meta.db")] {
        let o = as_nobody(&["cat".as_ref(), p.as_os_str()]);
        assert!(
            !o.status.success(),
            "nobody read {}: {} bytes",
            p.display(),
            o.stdout.len()
        );
    }
    for p in &snaps {
        let o = as_nobody(&[p.as_os_str(), "-u".as_ref()]);
        assert!(
            !o.status.success(),
            "nobody ran the setuid {} and got uid {}",
            p.display(),
            String::from_utf8_lossy(&o.stdout).trim()
        );
    }
    // Files made from now on are the owner's alone too.
    for e in std::fs::read_dir(root.join("blobs/sha256")).expect("blobs") {
        let m = e.expect("entry").metadata().expect("stat");
        assert_eq!(
            m.permissions().mode() & 0o077,
            0,
            "blob mode {:o}",
            m.permissions().mode()
        );
    }
}

/// A name pinned to a digest names that digest's image only: an archive
/// whose RepoTags say `alpine@sha256:<alpine's digest>` for another image
/// (which every `FROM alpine@sha256:…` would then have used) is refused
/// whole — no name of it recorded, not even its plain ones — and so is
/// `kiln tag IMAGE NAME@DIGEST` (docker's "refusing to create a tag with a
/// digest reference").
#[test]
fn a_name_pinned_to_another_digest_is_never_recorded() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let dir = tempfile::tempdir().expect("tmp");
    let saved = dir.path().join("bb.tar");
    k.ok(&["save", "-o", saved.to_str().expect("utf8"), "busybox"]);
    let x = dir.path().join("x");
    std::fs::create_dir_all(&x).expect("mkdir");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&x)
        .arg("-xf")
        .arg(&saved)
        .status()
        .expect("tar");
    assert!(st.success());
    let pinned = format!("alpine@sha256:{}", "a".repeat(64));
    let mf = x.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&mf).expect("manifest.json")).expect("json");
    m[0]["RepoTags"] = serde_json::json!(["innocent:1", pinned]);
    std::fs::write(&mf, serde_json::to_vec(&m).expect("json")).expect("write");
    let forged = dir.path().join("forged.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&x)
        .arg("-cf")
        .arg(&forged)
        .arg(".")
        .status()
        .expect("tar");
    assert!(st.success());
    let o = k.run(&["load", "-i", forged.to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a digest-pinned name was loaded: {err}"
    );
    assert!(err.contains("digest reference"), "{err}");
    let names = k.ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(
        !names.contains("innocent"),
        "a name of a refused archive was recorded: {names}"
    );
    assert!(!names.contains("alpine"), "{names}");

    let o = k.run(&["tag", "busybox", &pinned]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "tagged with a digest: {err}");
    assert!(err.contains("digest reference"), "{err}");
    assert!(!k.ok(&["images"]).contains("alpine"));
}
