//! Images leave kiln in standard formats that real clients accept:
//! `kiln save` output inspected by skopeo, unpacked by umoci, loaded and run
//! by podman, and loaded back into a fresh kiln store.

mod common;

use std::process::Command;

use common::{context, prerequisites, Kiln};

/// Whether `tool` is installed; under CI=true a missing tool fails.
fn tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        let msg = format!("{name} is not installed (apt-get install {name})");
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{msg}; CI requires it");
        }
        eprintln!("{msg}: not run");
    }
    found
}

fn run(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&common::registry::sh(cmd).stdout).into_owned()
}

fn built() -> (Kiln, tempfile::TempDir, String) {
    let k = Kiln::with_busybox();
    let ctx = context(&[
        (
            "Dockerfile",
            "FROM busybox\nCOPY hello /hello\nRUN echo built > /built\nENV K=V\nCMD [\"cat\", \"/hello\", \"/built\"]\n",
        ),
        ("hello", "hi\n"),
    ]);
    let id = k.build(ctx.path(), &["-t", "exp:1"]);
    let out = tempfile::tempdir().expect("tempdir");
    (k, out, id)
}

#[test]
fn docker_archive_is_read_by_skopeo_and_loads_back() {
    if !prerequisites() || !tool("skopeo") {
        return;
    }
    let (k, out, id) = built();
    let tar = out.path().join("exp.tar");
    k.ok(&["save", "-o", tar.to_str().unwrap(), "exp:1"]);
    let inspect = run(Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("docker-archive:{}", tar.display())));
    let cfg: serde_json::Value = serde_json::from_str(&inspect).expect("json");
    assert_eq!(
        cfg["config"]["Cmd"],
        serde_json::json!(["cat", "/hello", "/built"])
    );
    assert_eq!(cfg["rootfs"]["diff_ids"].as_array().map(Vec::len), Some(3));

    let fresh = Kiln::new();
    fresh.ok(&["load", "-i", tar.to_str().unwrap()]);
    assert_eq!(
        fresh.inspect("exp:1")["Id"],
        id,
        "same image ID after the round trip"
    );
    assert_eq!(fresh.ok(&["run", "exp:1"]), "hi\nbuilt\n");
}

#[test]
fn oci_archive_is_read_by_skopeo_and_unpacked_by_umoci() {
    if !prerequisites() || !tool("skopeo") || !tool("umoci") {
        return;
    }
    let (k, out, _) = built();
    let tar = out.path().join("exp-oci.tar");
    k.ok(&[
        "save",
        "--format",
        "oci",
        "-o",
        tar.to_str().unwrap(),
        "exp:1",
    ]);
    let inspect = run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", tar.display())));
    assert!(inspect.contains("\"Layers\""), "{inspect}");
    let layout = out.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-xf")
        .arg(&tar));
    let bundle = out.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:1", layout.display()))
        .arg(&bundle));
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/hello")).unwrap(),
        "hi\n"
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/built")).unwrap(),
        "built\n"
    );
}

#[test]
fn podman_loads_and_runs_the_docker_archive() {
    if !prerequisites() || !tool("podman") || !tool("runc") {
        return;
    }
    let (k, out, _) = built();
    let tar = out.path().join("exp.tar");
    k.ok(&["save", "-o", tar.to_str().unwrap(), "exp:1"]);
    let out_run = common::registry::podman_load_run(out.path(), &tar, &["localhost/exp:1"]);
    assert_eq!(out_run, "hi\nbuilt\n");
}
