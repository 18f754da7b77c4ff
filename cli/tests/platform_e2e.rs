//! Multi-platform images end to end (issue 17's groundwork): busybox
//! images for amd64, arm64 and armhf made from Debian's busybox-static
//! (scripts/foreign-busybox.sh), pushed to a test registry as one OCI
//! index; `kiln pull --platform` / `--all-platforms`, `images`,
//! `inspect`, `run --platform` under QEMU emulation, `push` of the index
//! read back with skopeo, and hostile indexes refused.
//!
//! Needs root, busybox-static, docker-registry, skopeo, apt access for the
//! foreign busybox (cached after the first run) and, for the runs,
//! qemu-user-static registered with binfmt_misc with the F flag
//! (`kiln system binfmt`): under CI=true a missing one fails the test,
//! elsewhere the test prints "not run".

mod common;

use std::process::Command;

use common::registry::{push_busybox_index, put_manifest, raw, ready, sh, Client, Reg, RegOpts};
use common::{busybox_rootfs_tar, foreign_rootfs_tar};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether RUN for `linux/<arch>` can run here (fails under CI when not).
fn emulation(arch: &str, variant: Option<&str>) -> bool {
    match kiln_executor::emulation::check("linux", arch, variant) {
        Ok(_) => true,
        Err(e) => {
            assert!(!in_ci(), "{e}");
            eprintln!("{e}: not run");
            false
        }
    }
}

/// Pushes busybox for linux/amd64, linux/arm64 and linux/arm/v7 to
/// `REG/kiln/busybox:{amd64,arm64,armv7}` and the index of the three to
/// `REG/kiln/busybox:multi`; returns the index's reference.
fn push_multi(reg: &Reg) -> String {
    push_busybox_index(
        reg,
        "multi",
        &[
            ("amd64", busybox_rootfs_tar(), "linux/amd64"),
            ("arm64", foreign_rootfs_tar("arm64"), "linux/arm64"),
            ("armv7", foreign_rootfs_tar("armhf"), "linux/arm/v7"),
        ],
    )
}

#[test]
fn pull_platform_arm64_then_run_prints_aarch64() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let multi = push_multi(&reg);
    let c = Client::new(false);
    let out = c.ok(&["pull", "--platform", "linux/arm64", &multi]);
    assert!(out.contains("index: sha256:"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&c.stdout(&["inspect", &multi])).expect("inspect");
    assert_eq!(v[0]["Architecture"], "arm64", "{v}");
    // The name points at the arm64 image only: no host image is stored.
    if emulation("arm64", None) {
        let out = c.stdout(&["run", "--rm", &multi, "uname", "-m"]);
        assert_eq!(out, "aarch64");
        let out = c.stdout(&[
            "run",
            "--rm",
            "--platform",
            "linux/arm64",
            &multi,
            "uname",
            "-m",
        ]);
        assert_eq!(out, "aarch64");
    }
    // Asking a single arm64 image for amd64 is refused, naming both.
    let o = c.run(&["run", "--rm", "--platform", "linux/amd64", &multi, "true"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("wanted linux/amd64") && err.contains("linux/arm64"),
        "{err}"
    );
}

#[test]
fn all_platforms_keeps_the_index_and_push_round_trips_it() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let multi = push_multi(&reg);
    let c = Client::new(false);
    // `pull -q` prints the name, as docker's.
    let out = c.stdout(&["pull", "-q", "--all-platforms", &multi]);
    assert_eq!(out, multi);
    let index_digest = kiln_image::Digest::sha256_of(&raw(&multi)).to_string();
    let stored = c.stdout(&["inspect", "-f", "{{.Metadata.IndexDigest}}", &multi]);
    assert_eq!(stored, index_digest);

    // One image, three platforms.
    let table = c.stdout(&["images"]);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].contains("PLATFORMS"), "{table}");
    assert!(
        rows[1].contains("linux/amd64,linux/arm64,linux/arm/v7"),
        "{table}"
    );
    let json = c.stdout(&["images", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    assert_eq!(v["Digest"], index_digest.as_str());

    // inspect and history pick a platform (the host's by default).
    let inspect = |p: Option<&str>| -> serde_json::Value {
        let mut a = vec!["inspect"];
        if let Some(p) = p {
            a.extend(["--platform", p]);
        }
        a.push(&multi);
        serde_json::from_str(&c.stdout(&a)).expect("inspect")
    };
    let host = inspect(None);
    assert_eq!(host[0]["Architecture"], "amd64", "{host}");
    assert_eq!(host[0]["Platforms"].as_array().map(Vec::len), Some(3));
    let arm = inspect(Some("linux/arm"));
    assert_eq!(arm[0]["Architecture"], "arm", "{arm}");
    assert_eq!(arm[0]["Variant"], "v7", "{arm}");
    let arm64 = inspect(Some("linux/arm64/v8"));
    assert_eq!(arm64[0]["Architecture"], "arm64", "{arm64}");
    assert_ne!(arm64[0]["Id"], host[0]["Id"]);
    let o = c.run(&["inspect", "--platform", "linux/s390x", &multi]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("linux/s390x") && err.contains("linux/arm64"),
        "{err}"
    );
    c.ok(&["history", "--platform", "linux/arm64", &multi]);

    assert_eq!(c.stdout(&["run", "--rm", &multi, "uname", "-m"]), "x86_64");
    if emulation("arm", Some("v7")) {
        let out = c.stdout(&[
            "run",
            "--rm",
            "--platform",
            "linux/arm/v7",
            &multi,
            "uname",
            "-m",
        ]);
        assert_eq!(out, "armv7l");
    }

    // save/export of one platform.
    let dir = tempfile::tempdir().expect("tmp");
    let tar = dir.path().join("arm64.tar");
    c.ok(&[
        "save",
        "--platform",
        "linux/arm64",
        "-o",
        tar.to_str().expect("utf-8"),
        &multi,
    ]);
    let fs = dir.path().join("fs.tar");
    c.ok(&[
        "export",
        "--platform",
        "linux/arm64",
        "-o",
        fs.to_str().expect("utf-8"),
        &multi,
    ]);
    assert!(std::fs::metadata(&fs).expect("fs.tar").len() > 1_000_000);

    // push: the index whole, under a new name.
    let copy = format!("{}/kiln/copy:1", reg.host());
    c.ok(&["push", &multi, &copy]);
    let pushed: serde_json::Value = serde_json::from_slice(&raw(&copy)).expect("index");
    let platforms: Vec<String> = pushed["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|d| {
            let p = &d["platform"];
            match p["variant"].as_str() {
                Some(v) => format!(
                    "{}/{}/{v}",
                    p["os"].as_str().unwrap_or(""),
                    p["architecture"].as_str().unwrap_or("")
                ),
                None => format!(
                    "{}/{}",
                    p["os"].as_str().unwrap_or(""),
                    p["architecture"].as_str().unwrap_or("")
                ),
            }
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);
    // Each child is there, for its platform.
    for d in pushed["manifests"].as_array().expect("manifests") {
        let child = format!(
            "{}/kiln/copy@{}",
            reg.host(),
            d["digest"].as_str().expect("digest")
        );
        let o = sh(Command::new("skopeo").args([
            "inspect",
            "--config",
            "--tls-verify=false",
            &format!("docker://{child}"),
        ]));
        let cfg: serde_json::Value = serde_json::from_slice(&o.stdout).expect("config");
        assert_eq!(cfg["architecture"], d["platform"]["architecture"], "{cfg}");
    }
    // prune keeps every platform's image of a tagged index; the store
    // verifies.
    c.ok(&["prune", "--all"]);
    c.ok(&["system", "check"]);
    // --deep re-hashes every platform's layer (one each).
    let out = c.stdout(&["system", "check", "--deep"]);
    assert!(out.contains("3 layers re-hashed"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&c.stdout(&["inspect", "--platform", "linux/arm64", &multi]))
            .expect("inspect");
    assert_eq!(v[0]["Architecture"], "arm64");
    c.ok(&["history", "--platform", "linux/arm/v7", &multi]);

    // And a fresh store pulls the pushed index back.
    let d = Client::new(false);
    d.ok(&["pull", "--all-platforms", &copy]);
    let v: serde_json::Value =
        serde_json::from_str(&d.stdout(&["inspect", "--platform", "linux/arm/v7", &copy]))
            .expect("inspect");
    assert_eq!(v[0]["Architecture"], "arm");
}

#[test]
fn hostile_indexes_are_refused() {
    if !ready(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let multi = push_multi(&reg);
    let index: serde_json::Value = serde_json::from_slice(&raw(&multi)).expect("index");
    let amd64 = index["manifests"][0].clone();
    let oci_index = "application/vnd.oci.image.index.v1+json";

    // An entry that says arm64 but is the amd64 image.
    let mut liar = amd64.clone();
    liar["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64"});
    let body = serde_json::json!({"schemaVersion": 2, "mediaType": oci_index, "manifests": [liar]});
    put_manifest(
        &reg,
        "kiln/busybox",
        "liar",
        oci_index,
        &serde_json::to_vec(&body).expect("json"),
    );
    let c = Client::new(false);
    let liar_ref = format!("{}/kiln/busybox:liar", reg.host());
    for extra in [&["--platform", "linux/arm64"][..], &["--all-platforms"][..]] {
        let mut a = vec!["pull"];
        a.extend_from_slice(extra);
        a.push(&liar_ref);
        let o = c.run(&a);
        assert!(!o.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("its config says linux/amd64"), "{err}");
    }
    assert!(c.stdout(&["images", "-q"]).is_empty());
    // The arm64 image named twice: truthfully (or with no platform) first,
    // then as amd64 — only the first entry of the digest was checked.
    let arm64 = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["platform"]["architecture"] == "arm64")
        .expect("an arm64 entry")
        .clone();
    let mut as_amd64 = arm64.clone();
    as_amd64["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let mut bare = arm64.clone();
    bare.as_object_mut().expect("object").remove("platform");
    for (tag, first) in [("twice", arm64.clone()), ("bare", bare)] {
        let body = serde_json::json!({"schemaVersion": 2, "mediaType": oci_index, "manifests": [first, as_amd64.clone()]});
        put_manifest(
            &reg,
            "kiln/busybox",
            tag,
            oci_index,
            &serde_json::to_vec(&body).expect("json"),
        );
        let o = c.run(&[
            "pull",
            "--platform",
            "linux/amd64",
            &format!("{}/kiln/busybox:{tag}", reg.host()),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{tag}: {err}");
        assert!(err.contains("its config says linux/arm64"), "{tag}: {err}");
    }
    assert!(c.stdout(&["images", "-q"]).is_empty());
    // A single image asked for as another platform (docker: "does not
    // match the specified platform").
    let o = c.run(&[
        "pull",
        "--platform",
        "linux/arm64",
        &format!("{}/kiln/busybox:amd64", reg.host()),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no linux/arm64 image")
            && err.contains("single-platform image for linux/amd64"),
        "{err}"
    );
    assert!(c.stdout(&["images", "-q"]).is_empty());

    // 10,000 entries: refused before any of them is fetched.
    let many: Vec<serde_json::Value> = (0..10_000).map(|_| amd64.clone()).collect();
    let body = serde_json::json!({"schemaVersion": 2, "mediaType": oci_index, "manifests": many});
    put_manifest(
        &reg,
        "kiln/busybox",
        "many",
        oci_index,
        &serde_json::to_vec(&body).expect("json"),
    );
    let many_ref = format!("{}/kiln/busybox:many", reg.host());
    for extra in [&[][..], &["--all-platforms"][..]] {
        let mut a = vec!["pull"];
        a.extend_from_slice(extra);
        a.push(&many_ref);
        let o = c.run(&a);
        assert!(!o.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("10000 entries"), "{err}");
    }

    // An entry whose size is not its manifest's (the registry refuses an
    // index naming a digest it lacks; the digest itself is verified on
    // every GET by digest).
    let mut wrong = amd64.clone();
    wrong["size"] = serde_json::json!(amd64["size"].as_u64().expect("size") + 1);
    let body =
        serde_json::json!({"schemaVersion": 2, "mediaType": oci_index, "manifests": [wrong]});
    put_manifest(
        &reg,
        "kiln/busybox",
        "wrong",
        oci_index,
        &serde_json::to_vec(&body).expect("json"),
    );
    let wrong_ref = format!("{}/kiln/busybox:wrong", reg.host());
    for extra in [&[][..], &["--all-platforms"][..]] {
        let mut a = vec!["pull"];
        a.extend_from_slice(extra);
        a.push(&wrong_ref);
        let o = c.run(&a);
        assert!(!o.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("bytes"), "{err}");
    }
    assert!(c.stdout(&["images", "-q"]).is_empty());

    // Platforms --platform would refuse: a variant that is a path, a
    // 100 KB os.version, 1,000 os.features. Refused, naming the entry;
    // nothing stored.
    let hostile = [
        serde_json::json!({"os": "linux", "architecture": "amd64", "variant": "../../../etc"}),
        serde_json::json!({"os": "linux", "architecture": "amd64", "os.version": "1".repeat(100_000)}),
        serde_json::json!({"os": "linux", "architecture": "amd64", "os.features": vec!["f"; 1000]}),
    ];
    for (i, platform) in hostile.into_iter().enumerate() {
        let mut e = amd64.clone();
        e["platform"] = platform;
        let body =
            serde_json::json!({"schemaVersion": 2, "mediaType": oci_index, "manifests": [e]});
        let tag = format!("hostile{i}");
        put_manifest(
            &reg,
            "kiln/busybox",
            &tag,
            oci_index,
            &serde_json::to_vec(&body).expect("json"),
        );
        let o = c.run(&[
            "pull",
            "--all-platforms",
            &format!("{}/kiln/busybox:{tag}", reg.host()),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{tag}: {err}");
        assert!(
            err.contains("index entry") && err.contains("invalid platform"),
            "{tag}: {err}"
        );
        assert!(
            err.len() < 4096,
            "{tag}: the error repeats the hostile string"
        );
        assert!(c.stdout(&["images", "-q"]).is_empty());
    }

    // Bad --platform values are usage errors.
    let o = c.run(&["pull", "--platform", "linux/arm64/v8/x", &multi]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn podman_runs_the_saved_arm64_image_of_an_index() {
    if !ready(&["docker-registry", "skopeo", "podman", "runc"]) || !emulation("arm64", None) {
        return;
    }
    let reg = Reg::start(RegOpts::default());
    let multi = push_multi(&reg);
    let c = Client::new(false);
    c.ok(&["pull", "--all-platforms", &multi]);
    let dir = tempfile::tempdir().expect("tmp");
    assert_eq!(
        common::registry::podman_uname_arm64(&c, dir.path(), &multi),
        "aarch64"
    );
}
