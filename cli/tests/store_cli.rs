//! CLI tests for the store commands: `kiln load`, `kiln import`,
//! `kiln prune`, `kiln system df|check`, including crash (SIGKILL) and
//! full-disk reliability. Each test uses its own temp root.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn kiln(root: &Path, args: &[&str]) -> Output {
    Command::new(KILN)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("run kiln")
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = kiln(root, args);
    assert!(
        out.status.success(),
        "kiln {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check_clean(root: &Path) {
    let out = ok(root, &["system", "check"]);
    assert!(out.starts_with("ok:"), "{out}");
}

/// A prerequisite is missing: fail under CI=true, else say "not run".
fn missing(what: &str) -> bool {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("prerequisite missing under CI=true: {what}");
    }
    eprintln!("not run: {what}");
    true
}

fn is_root() -> bool {
    // SAFETY: no failure mode.
    unsafe { libc::geteuid() == 0 }
}

/// A busybox rootfs (as peer-env.sh's make_rootfs) tarred up; `extra`
/// bytes of incompressible data in /data/blob make it as large as needed.
fn make_rootfs_tar(dir: &Path, extra: usize) -> Option<PathBuf> {
    let bb = Path::new("/bin/busybox");
    if !bb.exists() {
        missing("/bin/busybox (apt-get install busybox-static)");
        return None;
    }
    let r = dir.join("rootfs");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "root", "proc", "sys", "dev", "var",
        "data",
    ] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy(bb, r.join("bin/busybox")).unwrap();
    let list = Command::new(bb).arg("--list-full").output().unwrap();
    for p in String::from_utf8_lossy(&list.stdout).lines() {
        if p.is_empty() || p == "bin/busybox" || p == "linuxrc" {
            continue;
        }
        let link = r.join(p);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let _ = std::os::unix::fs::symlink("/bin/busybox", link);
    }
    std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\n").unwrap();
    if extra > 0 {
        let mut f = File::create(r.join("data/blob")).unwrap();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut buf = vec![0u8; 1 << 16];
        let mut left = extra;
        while left > 0 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let n = left.min(buf.len());
            f.write_all(&buf[..n]).unwrap();
            left -= n;
        }
    }
    let tar = dir.join("rootfs.tar");
    let st = Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(&r)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    Some(tar)
}

#[derive(Clone, Copy)]
enum Format {
    Docker,
    Oci,
}

/// A one-image archive of `rootfs_tar` named `name`, built with kiln-image.
fn make_archive(rootfs_tar: &Path, name: &str, format: Format, out: &Path) {
    use kiln_image::archive::{write_docker_archive, write_oci_archive, ArchiveImage, MemoryBlobs};
    let mut layer = Vec::new();
    let opts = kiln_image::rootfs_tar::ImportOptions {
        oci_media_types: matches!(format, Format::Oci),
        created: Some("2024-01-01T00:00:00Z".into()),
        ..Default::default()
    };
    let imported =
        kiln_image::rootfs_tar::import_rootfs(File::open(rootfs_tar).unwrap(), &mut layer, &opts)
            .unwrap();
    let mut blobs = MemoryBlobs::default();
    blobs.put(layer);
    blobs.put(imported.config.clone());
    blobs.put(imported.manifest.bytes.clone());
    let img = ArchiveImage {
        names: vec![name.to_string()],
        manifest: imported.manifest,
    };
    let f = File::create(out).unwrap();
    match format {
        Format::Docker => write_docker_archive(f, &[img], &blobs).unwrap(),
        Format::Oci => write_oci_archive(f, &[img], &blobs).unwrap(),
    }
}

fn tmp_count(root: &Path) -> usize {
    std::fs::read_dir(root.join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn df_json(root: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(root, &["system", "df", "--json"])).unwrap()
}

#[test]
fn import_then_check_df_prune() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tar) = make_rootfs_tar(dir.path(), 0) else {
        return;
    };
    let root = dir.path().join("root");
    let id = ok(&root, &["import", tar.to_str().unwrap(), "busybox"]);
    assert!(id.trim().starts_with("sha256:"), "{id}");
    check_clean(&root);
    let v = df_json(&root);
    assert_eq!(v["images"]["count"], 1, "{v}");
    assert!(
        v["images"]["size"].as_u64().unwrap() > 500_000,
        "busybox is in there: {v}"
    );
    // Tagged content survives prune, even --all.
    ok(&root, &["prune", "--all", "--keep-storage", "1GB"]);
    assert_eq!(df_json(&root)["images"]["count"], 1);
    check_clean(&root);
    // Table form.
    let table = ok(&root, &["system", "df"]);
    assert!(
        table.contains("Images") && table.contains("Build Cache"),
        "{table}"
    );
    // Bad names and sizes are refused.
    assert!(
        !kiln(&root, &["import", tar.to_str().unwrap(), "Bad:Name:x"])
            .status
            .success()
    );
    assert!(!kiln(&root, &["prune", "--keep-storage", "lots"])
        .status
        .success());
}

#[test]
fn import_change_sets_the_config_as_docker_import_does() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tar) = make_rootfs_tar(dir.path(), 0) else {
        return;
    };
    let root = dir.path().join("root");
    let t = tar.to_str().unwrap();
    ok(
        &root,
        &[
            "import",
            "-c",
            r#"CMD ["sh", "-c", "echo $GREETING from $PWD"]"#,
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "-c",
            "ENV GREETING=hello HOME=/root",
            "-c",
            "ENV APP=$HOME/app",
            "-c",
            "WORKDIR /srv",
            "-c",
            "EXPOSE 8080 53/udp",
            "-c",
            "LABEL org.opencontainers.image.title=base",
            "-c",
            "USER root",
            "-c",
            "VOLUME /data",
            "-c",
            "STOPSIGNAL SIGINT",
            "-c",
            "HEALTHCHECK --interval=30s CMD true",
            "-c",
            "ONBUILD RUN echo child",
            "-m",
            "a rootfs",
            t,
            "base:1",
        ],
    );
    let out = ok(&root, &["inspect", "base:1"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &v[0]["Config"];
    assert_eq!(
        c["Cmd"],
        serde_json::json!(["sh", "-c", "echo $GREETING from $PWD"]),
        "{out}"
    );
    assert_eq!(
        c["Env"],
        serde_json::json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "GREETING=hello",
            "HOME=/root",
            "APP=/root/app"
        ]),
        "{out}"
    );
    assert_eq!(c["WorkingDir"], "/srv", "{out}");
    assert_eq!(
        c["ExposedPorts"],
        serde_json::json!({"53/udp": {}, "8080/tcp": {}}),
        "{out}"
    );
    assert_eq!(c["Labels"]["org.opencontainers.image.title"], "base");
    assert_eq!(c["User"], "root");
    assert_eq!(c["Volumes"], serde_json::json!({"/data": {}}));
    assert_eq!(c["StopSignal"], "SIGINT");
    assert_eq!(
        c["Healthcheck"]["Test"],
        serde_json::json!(["CMD-SHELL", "true"])
    );
    assert_eq!(c["OnBuild"], serde_json::json!(["RUN echo child"]));
    let hist = ok(&root, &["history", "base:1"]);
    assert!(hist.contains("a rootfs"), "{hist}");
    check_clean(&root);

    // An instruction that needs a build is refused by name, before the
    // tar is read, and nothing is stored.
    for (change, name) in [
        ("RUN touch /x", "RUN"),
        ("COPY . /", "COPY"),
        ("FROM scratch", "FROM"),
    ] {
        let o = kiln(
            &root,
            &["import", "-c", "CMD [\"sh\"]", "-c", change, t, "bad:1"],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{change}: {err}");
        assert!(
            err.contains(&format!("{name} is not a valid change instruction")),
            "{change}: {err}"
        );
        assert!(!kiln(&root, &["inspect", "bad:1"]).status.success());
    }
    // A malformed change names itself.
    let o = kiln(&root, &["import", "-c", "EXPOSE 70000", t, "bad:1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("EXPOSE 70000"), "{err}");
}

#[test]
fn load_docker_oci_and_gzip_archives() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tar) = make_rootfs_tar(dir.path(), 0) else {
        return;
    };
    let root = dir.path().join("root");
    let docker = dir.path().join("docker.tar");
    make_archive(&tar, "busybox:latest", Format::Docker, &docker);
    let out = ok(&root, &["load", "-i", docker.to_str().unwrap()]);
    assert!(out.contains("Loaded image: busybox:latest"), "{out}");
    check_clean(&root);

    let oci = dir.path().join("oci.tar");
    make_archive(&tar, "localhost:5000/app:1.0", Format::Oci, &oci);
    let gz = dir.path().join("oci.tar.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -c {} > {}", oci.display(), gz.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let out = ok(&root, &["load", "-i", gz.to_str().unwrap()]);
    assert!(out.contains("localhost:5000/app:1.0"), "{out}");
    check_clean(&root);
    assert_eq!(df_json(&root)["images"]["count"], 2);
    // Loading again is idempotent.
    ok(&root, &["load", "-i", docker.to_str().unwrap()]);
    check_clean(&root);
    // Garbage in: a clear error, nothing broken.
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, b"this is not a tar").unwrap();
    assert!(!kiln(&root, &["load", "-i", junk.to_str().unwrap()])
        .status
        .success());
    check_clean(&root);
    assert_eq!(tmp_count(&root), 0, "failed load left no temp files");
}

#[test]
fn check_names_a_corrupt_blob() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tar) = make_rootfs_tar(dir.path(), 0) else {
        return;
    };
    let root = dir.path().join("root");
    ok(&root, &["import", tar.to_str().unwrap(), "x"]);
    check_clean(&root);
    // Corrupt the biggest blob (the layer).
    let blobs = root.join("blobs/sha256");
    let mut files: Vec<_> = std::fs::read_dir(&blobs).unwrap().flatten().collect();
    files.sort_by_key(|e| e.metadata().unwrap().len());
    let victim = files.last().unwrap().path();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    let out = kiln(&root, &["system", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&name), "names the blob: {err}");
    // A missing blob file is named too.
    std::fs::remove_file(&victim).unwrap();
    let out = kiln(&root, &["system", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&name) && err.contains("missing"), "{err}");
}

#[test]
fn prune_reclaims_orphans_of_a_killed_process() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    check_clean(&root); // creates the store
                        // What a kill -9 leaves: a temp blob, a half-made snapshot dir, a blob
                        // whose row was never written, a dangling link.
    std::fs::write(root.join("tmp/blob-0123"), vec![1u8; 10_000]).unwrap();
    std::fs::create_dir_all(root.join("snapshots/0011223344556677/fs/etc")).unwrap();
    let data = b"orphan blob";
    let hex = kiln_image::Digest::sha256_of(data).hex().to_string();
    std::fs::write(root.join("blobs/sha256").join(&hex), data).unwrap();
    std::os::unix::fs::symlink("../snapshots/nope/fs", root.join("l/abcde")).unwrap();
    let out = ok(&root, &["system", "check"]);
    assert!(out.contains("3 orphans"), "{out}");
    assert_eq!(df_json(&root)["unreferenced"]["count"], 3);
    let out = ok(&root, &["prune"]);
    assert!(out.contains("Total reclaimed space"), "{out}");
    assert_eq!(tmp_count(&root), 0);
    assert!(!root.join("snapshots/0011223344556677").exists());
    assert!(!root.join("blobs/sha256").join(&hex).exists());
    assert!(std::fs::symlink_metadata(root.join("l/abcde")).is_err());
    assert_eq!(df_json(&root)["unreferenced"]["count"], 0);
    check_clean(&root);
}

/// xorshift, seeded from the clock: "random moments".
struct Rng(u64);
impl Rng {
    fn new() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng(t | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Start kiln, SIGKILL it after `after`; true if it was still running.
fn kill_during(root: &Path, args: &[&str], after: Duration) -> bool {
    let mut child = Command::new(KILN)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let finished = child.try_wait().unwrap().is_some();
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    !finished
}

#[test]
fn sigkill_during_load_and_import_ten_times() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tar) = make_rootfs_tar(dir.path(), 24 << 20) else {
        return;
    };
    let archive = dir.path().join("big.tar");
    make_archive(&tar, "big:1", Format::Docker, &archive);
    let root = dir.path().join("root");
    // How long does a full load take here?
    let t = Instant::now();
    ok(&root, &["load", "-i", archive.to_str().unwrap()]);
    let full = t.elapsed();
    ok(&root, &["system", "check"]);
    // Start from an empty store so the kills hit real work.
    assert!(kiln(&root, &["prune"]).status.success());
    let mut rng = Rng::new();
    let mut killed_mid = 0;
    for i in 0..10 {
        let after = Duration::from_micros(rng.next() % (full.as_micros() as u64 + 1));
        let (what, args): (&str, Vec<&str>) = if i % 2 == 0 {
            ("load", vec!["load", "-i", archive.to_str().unwrap()])
        } else {
            (
                "import",
                vec!["import", tar.to_str().unwrap(), "imported:1"],
            )
        };
        if kill_during(&root, &args, after) {
            killed_mid += 1;
        }
        let out = kiln(&root, &["system", "check"]);
        assert!(
            out.status.success(),
            "round {i} ({what} killed after {after:?}): check failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The next run succeeds.
        ok(&root, &args);
        check_clean(&root);
    }
    eprintln!("{killed_mid}/10 kills landed mid-operation (full load {full:?})");
    // Orphans are reclaimed.
    ok(&root, &["prune"]);
    assert_eq!(tmp_count(&root), 0);
    let v = df_json(&root);
    assert_eq!(v["unreferenced"]["count"], 0, "{v}");
    assert_eq!(v["images"]["count"], 2);
    check_clean(&root);
}

/// Unmounts (lazily) on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A store root `dir/small` on a tmpfs of `size`, mounted in a private
/// mount namespace of this thread (children inherit it).
fn small_store(dir: &Path, size: &str) -> (PathBuf, Unmount) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
    let root = dir.join("small");
    std::fs::create_dir(&root).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(format!("size={size}").as_str()),
    )
    .unwrap();
    (root.clone(), Unmount(root))
}

#[test]
fn full_disk_gives_a_clear_error_and_a_clean_store() {
    if !is_root() && missing("root (to mount a tmpfs)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(tar) = make_rootfs_tar(dir.path(), 4 << 20) else {
        return;
    };
    let archive = dir.path().join("big.tar");
    make_archive(&tar, "big:1", Format::Docker, &archive);
    let (root, _guard) = small_store(dir.path(), "2m");
    let out = kiln(&root, &["load", "-i", archive.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no space left"), "a clear error: {err}");
    check_clean(&root);
    let out = kiln(&root, &["import", tar.to_str().unwrap(), "big:2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no space left"), "a clear error: {err}");
    check_clean(&root);
    ok(&root, &["prune"]);
    check_clean(&root);
}

/// Bytes used under `dir` (apparent sizes of regular files).
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

#[test]
fn enospc_while_unpacking_a_layer_leaves_no_partial_snapshot() {
    if !is_root() && missing("root (to mount a tmpfs)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(tar) = make_rootfs_tar(dir.path(), 8 << 20) else {
        return;
    };
    let archive = dir.path().join("big.tar");
    make_archive(&tar, "big:1", Format::Docker, &archive);
    // Room for the blob (about 10 MiB) but not for the blob and its snapshot.
    let (root, _guard) = small_store(dir.path(), "15m");
    ok(&root, &["load", "-i", archive.to_str().unwrap()]);
    let out = kiln(&root, &["run", "--rm", "big:1", "true"]);
    assert!(!out.status.success(), "the layer should not fit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase().contains("no space left"),
        "a clear error: {err}"
    );
    // The partial snapshot is gone: the space is free again.
    let left = bytes_under(&root.join("snapshots"));
    assert!(
        left < 1 << 20,
        "{left} bytes of a partial snapshot left in the store"
    );
    check_clean(&root);
    // The image is intact: with room, it runs.
    let big = dir.path().join("big");
    std::fs::create_dir(&big).unwrap();
    ok(&big, &["load", "-i", archive.to_str().unwrap()]);
    ok(&big, &["run", "--rm", "big:1", "true"]);
}

/// `KILN_ROOT=` (set but empty) is unset, as docker treats its empty
/// variables: no "a value is required for --root" (`version` reads no
/// store; `--root` still wins over it).
#[test]
fn an_empty_kiln_root_counts_as_unset() {
    let bin = env!("CARGO_BIN_EXE_kiln");
    let o = Command::new(bin)
        .arg("version")
        .env("KILN_ROOT", "")
        .output()
        .expect("run kiln");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let root = tempfile::tempdir().expect("tmp");
    let o = Command::new(bin)
        .arg("--root")
        .arg(root.path())
        .arg("images")
        .env("KILN_ROOT", "")
        .output()
        .expect("run kiln");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `kiln unshare CMD` exits as a shell would when CMD cannot run: 127
/// not found, 126 not executable (docker run's statuses too).
#[test]
fn unshare_of_a_missing_or_unexecutable_command_exits_127_or_126() {
    let bin = env!("CARGO_BIN_EXE_kiln");
    let root = tempfile::tempdir().expect("tmp");
    let run = |cmd: &Path| {
        Command::new(bin)
            .arg("--root")
            .arg(root.path())
            .arg("unshare")
            .arg(cmd)
            .output()
            .expect("run kiln")
    };
    let o = run(Path::new("/nonexistent/kiln-no-such-command"));
    assert_eq!(o.status.code(), Some(127), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("kiln-no-such-command"));
    let plain = root.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\n").expect("write");
    assert_eq!(run(&plain).status.code(), Some(126));
    assert_eq!(run(root.path()).status.code(), Some(126));
    assert_eq!(run(Path::new("/bin/true")).status.code(), Some(0));
}
