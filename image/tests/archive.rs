//! docker-archive / OCI layout writers and reader; interop with skopeo and
//! umoci when installed (required under CI=true).

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::process::Command;

use kiln_image::archive::{
    read_archive, write_docker_archive, write_oci_archive, write_oci_dir, ArchiveFormat,
    ArchiveImage, BlobSource, MemoryBlobs,
};
use kiln_image::compression::{Compression, CompressionOpts};
use kiln_image::diff::{write_tree_diff, DiffOptions};
use kiln_image::rootfs_tar::{import_rootfs, ImportOptions};
use kiln_image::Digest;

/// A tiny one-layer image in memory.
fn tiny_image(kind: Compression, oci: bool) -> (MemoryBlobs, ArchiveImage, Digest) {
    let t = tempfile::tempdir().expect("tmp");
    let root = t.path().join("root");
    fs::create_dir_all(root.join("etc")).expect("mkdir");
    fs::write(root.join("etc/os-release"), b"NAME=kiln-test\n").expect("w");
    fs::write(root.join("hello"), b"#!/bin/sh\necho hello\n").expect("w");
    common::chmod(&root.join("hello"), 0o755);
    let mut rootfs = Vec::new();
    write_tree_diff(
        None,
        &root,
        &mut rootfs,
        &DiffOptions {
            clamp_mtime: Some(0),
            exclude: vec![],
            cancel: None,
        },
    )
    .expect("diff");
    let mut layer = Vec::new();
    let imp = import_rootfs(
        std::io::Cursor::new(rootfs),
        &mut layer,
        &ImportOptions {
            compression: CompressionOpts::new(kind),
            oci_media_types: oci,
            created: Some("1970-01-01T00:00:00Z".into()),
            ..Default::default()
        },
    )
    .expect("import");
    let mut blobs = MemoryBlobs::default();
    assert_eq!(blobs.put(layer), imp.layer.digest);
    assert_eq!(blobs.put(imp.config.clone()), imp.config_digest);
    let img = ArchiveImage {
        names: vec!["docker.io/library/kiln-test:1.0".into()],
        manifest: imp.manifest,
    };
    (blobs, img, imp.layer.diff_id)
}

fn tar_files(bytes: &[u8]) -> HashMap<String, Vec<u8>> {
    let mut ar = tar::Archive::new(bytes);
    let mut out = HashMap::new();
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let p = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let mut v = Vec::new();
        e.read_to_end(&mut v).expect("read");
        out.insert(p, v);
    }
    out
}

/// The docker-archive has manifest.json, repositories, the config and an
/// uncompressed layer.tar whose sha256 is the diffID.
#[test]
fn docker_archive_structure_and_round_trip() {
    let (blobs, img, diff_id) = tiny_image(Compression::Gzip, false);
    let mut out = Vec::new();
    write_docker_archive(&mut out, std::slice::from_ref(&img), &blobs).expect("write");
    let files = tar_files(&out);
    let m: serde_json::Value =
        serde_json::from_slice(&files["manifest.json"]).expect("manifest.json");
    assert_eq!(m[0]["RepoTags"][0], "kiln-test:1.0");
    let layer_path = m[0]["Layers"][0].as_str().expect("layer path").to_string();
    assert_eq!(layer_path, format!("{}/layer.tar", diff_id.hex()));
    assert_eq!(Digest::sha256_of(&files[&layer_path]), diff_id);
    let cfg_path = m[0]["Config"].as_str().expect("config").to_string();
    assert_eq!(
        Digest::sha256_of(&files[&cfg_path]).hex(),
        cfg_path.trim_end_matches(".json")
    );
    let repos: serde_json::Value =
        serde_json::from_slice(&files["repositories"]).expect("repositories");
    assert_eq!(repos["kiln-test"]["1.0"], diff_id.hex());
    // deterministic
    let mut again = Vec::new();
    write_docker_archive(&mut again, std::slice::from_ref(&img), &blobs).expect("write");
    assert_eq!(out, again);

    // read back, plain and gzip-wrapped
    let spill = tempfile::tempdir().expect("tmp");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &out).expect("gz");
    let gz = gz.finish().expect("gz");
    for input in [out.clone(), gz] {
        let loaded = read_archive(std::io::Cursor::new(input), spill.path()).expect("read");
        assert_eq!(loaded.format, ArchiveFormat::Docker);
        assert_eq!(loaded.images.len(), 1);
        let li = &loaded.images[0];
        assert_eq!(li.names, vec!["kiln-test:1.0".to_string()]);
        assert_eq!(li.config, files[&cfg_path]);
        assert_eq!(li.layers.len(), 1);
        assert_eq!(
            li.layers[0].digest, diff_id,
            "uncompressed layer: digest == diffID"
        );
        let m = li.manifest.manifest().expect("synthesized manifest");
        assert_eq!(m.config.digest.hex(), cfg_path.trim_end_matches(".json"));
        let mut v = Vec::new();
        loaded
            .open_blob(&diff_id)
            .expect("blob")
            .read_to_end(&mut v)
            .expect("read");
        assert_eq!(Digest::sha256_of(&v), diff_id);
    }
    assert_eq!(
        fs::read_dir(spill.path()).expect("ls").count(),
        0,
        "spill dirs cleaned up"
    );
}

/// The OCI archive has oci-layout, index.json with ref-name annotations and
/// every blob under blobs/sha256; reading it back gives the raw manifest
/// bytes unchanged.
#[test]
fn oci_archive_structure_and_round_trip() {
    let (blobs, img, diff_id) = tiny_image(Compression::Zstd, true);
    let mut out = Vec::new();
    write_oci_archive(&mut out, std::slice::from_ref(&img), &blobs).expect("write");
    let files = tar_files(&out);
    assert_eq!(files["oci-layout"], br#"{"imageLayoutVersion":"1.0.0"}"#);
    let idx: serde_json::Value = serde_json::from_slice(&files["index.json"]).expect("index");
    assert_eq!(
        idx["manifests"][0]["digest"],
        img.manifest.digest.to_string()
    );
    assert_eq!(
        idx["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "1.0"
    );
    assert_eq!(
        idx["manifests"][0]["annotations"]["io.containerd.image.name"],
        "docker.io/library/kiln-test:1.0"
    );
    for (p, b) in &files {
        if let Some(hex) = p.strip_prefix("blobs/sha256/") {
            if !hex.is_empty() {
                assert_eq!(Digest::sha256_of(b).hex(), hex);
            }
        }
    }
    let spill = tempfile::tempdir().expect("tmp");
    let loaded = read_archive(std::io::Cursor::new(out), spill.path()).expect("read");
    assert_eq!(loaded.format, ArchiveFormat::Oci);
    let li = &loaded.images[0];
    assert_eq!(li.manifest.bytes, img.manifest.bytes);
    assert_eq!(
        li.names,
        vec!["docker.io/library/kiln-test:1.0".to_string()]
    );
    assert_eq!(
        li.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let mut tarbytes = Vec::new();
    kiln_image::compression::decompress_auto(
        loaded
            .open_blob(&li.layers[0].digest)
            .map(|mut r| {
                let mut v = Vec::new();
                r.read_to_end(&mut v).expect("read");
                std::io::Cursor::new(v)
            })
            .expect("blob"),
    )
    .expect("dec")
    .read_to_end(&mut tarbytes)
    .expect("read");
    assert_eq!(Digest::sha256_of(&tarbytes), diff_id);

    // directory form has the same files
    let d = tempfile::tempdir().expect("tmp");
    write_oci_dir(d.path(), std::slice::from_ref(&img), &blobs).expect("dir");
    for p in files.keys().filter(|p| !p.ends_with('/')) {
        assert_eq!(&fs::read(d.path().join(p)).expect("file"), &files[p], "{p}");
    }
}

fn have_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if common::in_ci() {
            panic!("{name} is required under CI=true (apt-get install -y {name})");
        }
        eprintln!("SKIP: {name} not installed");
    }
    found
}

/// skopeo accepts the OCI archive and the docker-archive we write.
#[test]
fn skopeo_inspects_our_archives() {
    if !have_tool("skopeo") {
        return;
    }
    let t = tempfile::tempdir().expect("tmp");
    for (oci, file) in [(true, "img.oci.tar"), (false, "img.docker.tar")] {
        let (blobs, img, diff_id) = tiny_image(Compression::Gzip, oci);
        let path = t.path().join(file);
        let f = fs::File::create(&path).expect("create");
        if oci {
            write_oci_archive(f, std::slice::from_ref(&img), &blobs).expect("write");
        } else {
            write_docker_archive(f, std::slice::from_ref(&img), &blobs).expect("write");
        }
        let transport = if oci { "oci-archive" } else { "docker-archive" };
        let out = Command::new("skopeo")
            .args([
                "inspect",
                "--config",
                &format!("{transport}:{}", path.display()),
            ])
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo {transport}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cfg: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(cfg["rootfs"]["diff_ids"][0], diff_id.to_string());
        let out = Command::new("skopeo")
            .args(["inspect", &format!("{transport}:{}", path.display())])
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo inspect {transport}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// umoci unpacks the OCI layout directory into a runtime bundle with our files.
#[test]
fn umoci_unpacks_our_layout() {
    if !have_tool("umoci") {
        return;
    }
    let t = tempfile::tempdir().expect("tmp");
    let (blobs, img, _) = tiny_image(Compression::Gzip, true);
    let layout = t.path().join("layout");
    write_oci_dir(&layout, std::slice::from_ref(&img), &blobs).expect("dir");
    let bundle = t.path().join("bundle");
    let out = Command::new("umoci")
        .args([
            "unpack",
            "--image",
            &format!("{}:1.0", layout.display()),
            &bundle.display().to_string(),
        ])
        .output()
        .expect("run umoci");
    assert!(
        out.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read(bundle.join("rootfs/etc/os-release")).expect("file"),
        b"NAME=kiln-test\n"
    );
    assert!(bundle.join("config.json").exists());
}
