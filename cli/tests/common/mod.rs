//! Fixtures shared by the CLI's end-to-end tests: a busybox root
//! filesystem made from Debian's busybox-static, a private store root per
//! test, and a runner for the `kiln` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub mod registry;
pub mod rootless;

/// Fails (under CI=true) or returns false (elsewhere, printing "not run")
/// when the machine cannot run these tests: root and busybox-static.
pub fn prerequisites() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (namespaces and mounts)");
    }
    if busybox().is_none() {
        missing.push("a static busybox (apt-get install busybox-static)");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("end-to-end prerequisites missing: {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg}");
    }
    eprintln!("{msg}: not run");
    false
}

/// The static busybox binary, if installed.
pub fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A temporary directory that lives until the test process exits, for
/// fixtures kept in a `static` (statics are never dropped, so a `TempDir`
/// held in one would be left behind by every test process — nextest runs
/// each test in its own).
pub fn process_tempdir() -> PathBuf {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    remove_at_exit(dir.clone());
    dir
}

/// Removes `dir` (recursively) when the test process exits normally.
pub fn remove_at_exit(dir: PathBuf) {
    static DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    extern "C" fn remove_all() {
        if let Ok(dirs) = DIRS.lock() {
            for d in dirs.iter() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
    static REGISTER: std::sync::Once = std::sync::Once::new();
    // SAFETY: `remove_all` is an `extern "C"` function without arguments,
    // as atexit requires; it runs once, at normal process exit.
    REGISTER.call_once(|| unsafe {
        libc::atexit(remove_all);
    });
    DIRS.lock().unwrap_or_else(|e| e.into_inner()).push(dir);
}

/// A tar of a busybox root filesystem (made once per test process, removed
/// when it exits).
pub fn busybox_rootfs_tar() -> PathBuf {
    static TAR: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TAR.get_or_init(|| {
        let dir = process_tempdir();
        let root = dir.join("rootfs");
        make_rootfs(&root);
        let tar = tar_of(&root, &dir);
        (dir, tar)
    })
    .1
    .clone()
}

/// A static busybox for Debian architecture `deb_arch` (`arm64`,
/// `armhf`), made by scripts/foreign-busybox.sh from Debian's
/// busybox-static and cached in `<target>/tmp/kiln-test-cache` (or
/// `$KILN_TEST_CACHE`). Needs root the first time (dpkg
/// --add-architecture, apt-get).
pub fn foreign_busybox(deb_arch: &str) -> PathBuf {
    let cache = std::env::var_os("KILN_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-test-cache"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/foreign-busybox.sh");
    let o = Command::new("bash")
        .arg(&script)
        .arg(&cache)
        .arg(deb_arch)
        .output()
        .expect("run scripts/foreign-busybox.sh");
    assert!(
        o.status.success(),
        "scripts/foreign-busybox.sh {deb_arch} failed (root? deb.debian.org reachable?):\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert!(path.is_file(), "{} is not a file", path.display());
    path
}

/// A tar of a busybox root filesystem for Debian architecture `deb_arch`
/// (the applet links are the host busybox's list: the same Debian
/// version). Made in the test process's temp dir, removed when it exits.
pub fn foreign_rootfs_tar(deb_arch: &str) -> PathBuf {
    let bb = foreign_busybox(deb_arch);
    let dir = process_tempdir();
    let root = dir.join("rootfs");
    make_rootfs_with(&root, &bb);
    tar_of(&root, &dir)
}

/// `dir/rootfs.tar`: the tree `root`, with numeric owners.
fn tar_of(root: &Path, dir: &Path) -> PathBuf {
    let tar = dir.join("rootfs.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["--numeric-owner", "-cf"])
        .arg(&tar)
        .arg(".")
        .status()
        .expect("tar");
    assert!(st.success(), "tar failed");
    tar
}

/// Fills `root` with busybox, its applet links, /etc/passwd and /etc/group.
pub fn make_rootfs(root: &Path) {
    let bb = busybox().expect("busybox");
    make_rootfs_with(root, &bb);
}

/// [`make_rootfs`] with the busybox binary `binary` (the applet list is
/// the host busybox's).
pub fn make_rootfs_with(root: &Path, binary: &Path) {
    let bb = busybox().expect("busybox");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "root", "proc", "sys", "dev", "var",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy(binary, root.join("bin/busybox")).expect("copy busybox");
    let list = Command::new(&bb)
        .arg("--list-full")
        .output()
        .expect("busybox --list-full");
    for p in String::from_utf8_lossy(&list.stdout).lines() {
        if p.is_empty() || p == "bin/busybox" || p == "linuxrc" {
            continue;
        }
        let link = root.join(p);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        let _ = std::os::unix::fs::symlink("/bin/busybox", &link);
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nnogroup:x:65534:\napp:x:1000:\nstaff:x:50:app\n",
    )
    .expect("group");
}

/// A private store root and a runner of the kiln binary against it.
pub struct Kiln {
    /// The store root (removed on drop).
    pub root: tempfile::TempDir,
}

impl Kiln {
    /// A fresh store.
    pub fn new() -> Kiln {
        Kiln {
            root: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A fresh store with `busybox:latest` imported.
    pub fn with_busybox() -> Kiln {
        let k = Kiln::new();
        let tar = busybox_rootfs_tar();
        k.ok(&["import", tar.to_str().expect("utf-8"), "busybox:latest"]);
        k
    }

    /// A `kiln` command with `--root` set.
    pub fn cmd(&self) -> Command {
        // KILN_E2E_BIN runs the tests against another build (e.g. the
        // code before a fix, to see a regression test fail there).
        let bin =
            std::env::var_os("KILN_E2E_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_kiln").into());
        let mut c = Command::new(bin);
        c.arg("--root").arg(self.root.path());
        c.env_remove("KILN_ROOT");
        c.env_remove("SOURCE_DATE_EPOCH");
        c.stdin(Stdio::null());
        c
    }

    /// Runs kiln with `args`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run kiln")
    }

    /// Runs kiln and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        succeeded(&self.run(args), format_args!("kiln {args:?}"))
    }

    /// Builds `ctx` with extra args, asserting success; returns the image ID.
    pub fn build(&self, ctx: &Path, extra: &[&str]) -> String {
        let mut args = vec!["build", "-q"];
        args.extend_from_slice(extra);
        let c = ctx.to_str().expect("utf-8");
        args.push(c);
        self.ok(&args).trim().to_string()
    }

    /// `kiln inspect IMAGE` parsed.
    pub fn inspect(&self, image: &str) -> serde_json::Value {
        let out = self.ok(&["inspect", image]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("inspect json");
        v[0].clone()
    }
}

/// Asserts that the command `what` succeeded (else fails with its status,
/// stdout and stderr); returns its stdout.
pub fn succeeded(o: &Output, what: std::fmt::Arguments<'_>) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A build context directory with files `(path, content)`.
pub fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (p, c) in files {
        let path = dir.path().join(p);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(path, c).expect("write");
    }
    dir
}

/// `/proc/self/mountinfo` lines that mention `needle`.
pub fn host_mounts_with(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// `kiln run --rm IMAGE sh -c SCRIPT`, stdout.
pub fn sh(k: &Kiln, image: &str, script: &str) -> String {
    k.ok(&["run", "--rm", image, "sh", "-c", script])
}

/// Runs `kiln build -q EXTRA… CTX`, asserts that it fails, returns stderr.
pub fn build_fails(k: &Kiln, ctx: &Path, extra: &[&str]) -> String {
    let mut args = vec!["build", "-q"];
    args.extend_from_slice(extra);
    args.push(ctx.to_str().expect("utf-8"));
    let o = k.run(&args);
    assert!(
        !o.status.success(),
        "build should fail\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}
