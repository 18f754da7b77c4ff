//! Real distributions: realistic Dockerfiles on a Debian bookworm base made
//! with `mmdebstrap` (scripts/debian-base.sh: minbase, the official image's
//! apt/dpkg minimize configuration, the host's CA bundle), imported with
//! `kiln import -c 'CMD ["bash"]' -c 'ENV PATH=…'` into each test's store.
//!
//! Each result is saved (`kiln save`, docker-archive), its layers
//! flattened here (whiteouts applied) and checked — files, owners, modes,
//! `security.capability`, config — and, where it serves, run with `kiln
//! run` and with podman. Where buildah is installed, the network-free
//! Dockerfiles are built with it too and the two file trees compared
//! ([`compare_with_buildah`] lists what differs by design).
//!
//! The base tar is made once and cached in `$KILN_TEST_CACHE`, else
//! `<target>/tmp/kiln-test-cache` (keyed by the script and the CA bundle).
//! apt and pip downloads go through `RUN --mount=type=cache` where a test
//! builds twice or in two stages. Needs root, mmdebstrap and the network
//! (deb.debian.org, pypi.org): as root, or under CI=true, a missing one
//! fails the test; as another user the tests are not run.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{context, Kiln};

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The apt cache mounts of BuildKit's documented pattern.
const APT_CACHE: &str = "--mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt,sharing=locked";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The Debian base tar (made or found by scripts/debian-base.sh), or None
/// when the tests cannot run here (not root, outside CI).
fn base_tar() -> Option<PathBuf> {
    static TAR: OnceLock<Option<PathBuf>> = OnceLock::new();
    TAR.get_or_init(|| {
        if !is_root() {
            let msg = "distro tests need root (mmdebstrap, namespaces, mounts)";
            assert!(!in_ci(), "{msg}; CI requires them");
            eprintln!("{msg}: not run");
            return None;
        }
        let cache = std::env::var_os("KILN_TEST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-test-cache"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/debian-base.sh");
        let o = Command::new("bash")
            .arg(&script)
            .arg(&cache)
            .output()
            .expect("run scripts/debian-base.sh");
        assert!(
            o.status.success(),
            "scripts/debian-base.sh failed (mmdebstrap installed? deb.debian.org reachable?):\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        assert!(path.is_file(), "{} is not a file", path.display());
        Some(path)
    })
    .clone()
}

/// A fresh store with the Debian base as `debian:bookworm`.
fn debian() -> Option<Kiln> {
    let tar = base_tar()?;
    let k = Kiln::new();
    let cmd = r#"CMD ["bash"]"#;
    let env = format!("ENV {PATH_ENV}");
    let t = tar.to_str().expect("utf-8");
    k.ok(&["import", "-c", cmd, "-c", &env, t, "debian:bookworm"]);
    Some(k)
}

/// Whether `name` is on PATH; as root or in CI a missing one fails.
fn tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let msg = format!("{name} is not installed");
        assert!(!in_ci(), "{msg}; CI requires it");
        eprintln!("{msg}: that part not run");
    }
    found
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn checked(cmd: &mut Command) -> Output {
    let o = cmd.output().expect("spawn");
    assert!(
        o.status.success(),
        "{cmd:?} failed\nstdout:\n{}\nstderr:\n{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `kiln build --progress plain -t TAG CTX`, asserting success; returns
/// the progress output (the steps' output is in it).
fn build(k: &Kiln, ctx: &Path, tag: &str, extra: &[&str]) -> String {
    let mut c = k.cmd();
    c.args(["build", "--progress", "plain", "-t", tag]);
    c.args(extra);
    c.arg(ctx);
    let o = checked(&mut c);
    format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr))
}

// ------------------------------------------------------- the saved image

/// One path of a flattened image.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    /// `-` file, `d` dir, `l` symlink, `c`/`b` devices, `p` fifo.
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    link: Option<String>,
    /// `security.capability`, if set.
    caps: Option<Vec<u8>>,
}

/// A saved image: its config and its layers flattened.
struct Saved {
    config: serde_json::Value,
    files: BTreeMap<String, Node>,
    /// Whiteout entries seen in the layers (`usr/share/.wh.doc`, …).
    whiteouts: Vec<String>,
    _dir: tempfile::TempDir,
    archive: PathBuf,
}

impl Saved {
    fn get(&self, p: &str) -> &Node {
        self.files
            .get(p)
            .unwrap_or_else(|| panic!("{p} is not in the image"))
    }
    fn has(&self, p: &str) -> bool {
        self.files.contains_key(p)
    }
    fn under(&self, dir: &str) -> Vec<&String> {
        let prefix = format!("{dir}/");
        self.files
            .keys()
            .filter(|p| p.starts_with(&prefix))
            .collect()
    }
}

fn clean(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

/// `kiln save IMAGE` as a docker-archive, flattened.
fn save(k: &Kiln, image: &str) -> Saved {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("image.tar");
    k.ok(&["save", "-o", archive.to_str().expect("utf-8"), image]);
    read_archive(dir, archive)
}

/// Flattens the first image of a docker-archive.
fn read_archive(dir: tempfile::TempDir, archive: PathBuf) -> Saved {
    let x = dir.path().join("x");
    std::fs::create_dir(&x).expect("mkdir");
    checked(
        Command::new("tar")
            .arg("-C")
            .arg(&x)
            .arg("-xf")
            .arg(&archive),
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(x.join("manifest.json")).expect("manifest.json"))
            .expect("manifest json");
    let config_name = manifest[0]["Config"].as_str().expect("Config");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(x.join(config_name)).expect("config"))
            .expect("config json");
    let mut files: BTreeMap<String, Node> = BTreeMap::new();
    let mut whiteouts = Vec::new();
    for layer in manifest[0]["Layers"].as_array().expect("Layers") {
        let path = x.join(layer.as_str().expect("layer name"));
        let mut raw = Vec::new();
        std::fs::File::open(&path)
            .expect("layer")
            .read_to_end(&mut raw)
            .expect("read layer");
        let data = if raw.starts_with(&[0x1f, 0x8b]) {
            let o = checked(
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("gzip -dc < '{}'", path.display())),
            );
            o.stdout
        } else {
            raw
        };
        let mut added: Vec<(String, Node)> = Vec::new();
        let mut ar = tar::Archive::new(&data[..]);
        for e in ar.entries().expect("layer entries") {
            let mut e = e.expect("entry");
            let name = clean(&String::from_utf8_lossy(&e.path_bytes()));
            let base = name.rsplit('/').next().unwrap_or("");
            let parent = name.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
            if base == ".wh..wh..opq" {
                whiteouts.push(name.clone());
                let prefix = format!("{parent}/");
                files.retain(|p, _| !p.starts_with(&prefix));
                continue;
            }
            if let Some(gone) = base.strip_prefix(".wh.") {
                whiteouts.push(name.clone());
                let gone = if parent.is_empty() {
                    gone.to_string()
                } else {
                    format!("{parent}/{gone}")
                };
                let prefix = format!("{gone}/");
                files.retain(|p, _| *p != gone && !p.starts_with(&prefix));
                continue;
            }
            let h = e.header().clone();
            let mut caps = None;
            if let Ok(Some(exts)) = e.pax_extensions() {
                for ext in exts.flatten() {
                    if ext.key_bytes() == b"SCHILY.xattr.security.capability" {
                        caps = Some(ext.value_bytes().to_vec());
                    }
                }
            }
            let et = h.entry_type();
            let link = e
                .link_name_bytes()
                .map(|l| String::from_utf8_lossy(&l).into_owned());
            let mut node = Node {
                kind: match et {
                    tar::EntryType::Directory => 'd',
                    tar::EntryType::Symlink => 'l',
                    tar::EntryType::Char => 'c',
                    tar::EntryType::Block => 'b',
                    tar::EntryType::Fifo => 'p',
                    _ => '-',
                },
                mode: h.mode().expect("mode") & 0o7777,
                uid: h.uid().expect("uid"),
                gid: h.gid().expect("gid"),
                size: h.size().expect("size"),
                link: if et == tar::EntryType::Symlink {
                    link.clone()
                } else {
                    None
                },
                caps,
            };
            if et == tar::EntryType::Link {
                // A hard link: the file it names (this layer or below).
                let target = clean(link.as_deref().unwrap_or(""));
                let found = added
                    .iter()
                    .rev()
                    .find(|(p, _)| *p == target)
                    .map(|(_, n)| n.clone())
                    .or_else(|| files.get(&target).cloned());
                node = found.unwrap_or_else(|| panic!("hard link {name} -> {target} dangles"));
            }
            added.push((name, node));
        }
        for (p, n) in added {
            if !p.is_empty() {
                files.insert(p, n);
            }
        }
    }
    Saved {
        config,
        files,
        whiteouts,
        _dir: dir,
        archive,
    }
}

// ---------------------------------------------------------------- podman

/// A private podman store, runroot and tmpdir (vfs: plain directories,
/// removed with the temp dir; nothing of the host's is touched) that loads
/// kiln's docker-archives and runs them.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Option<Podman> {
        if !tool("podman") || !tool("runc") {
            return None;
        }
        Some(Podman {
            dir: tempfile::tempdir().expect("tempdir"),
        })
    }
    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root").arg(self.dir.path().join("root"));
        c.arg("--runroot").arg(self.dir.path().join("run"));
        c.arg("--tmpdir").arg(self.dir.path().join("tmp"));
        c.args(["--runtime", "runc", "--storage-driver", "vfs"]);
        c
    }
    fn load(&self, saved: &Saved) {
        checked(self.cmd().args(["load", "-q", "-i"]).arg(&saved.archive));
    }
    /// `podman run --rm` with the flags this host needs; stdout.
    fn run(&self, image: &str, args: &[&str]) -> String {
        let nofile = stdout(&checked(Command::new("sh").args(["-c", "ulimit -Hn"])));
        let nofile = nofile.trim();
        let mut c = self.cmd();
        c.args(["run", "--rm", "--network", "none"]);
        c.args(["--ulimit", &format!("nofile={nofile}:{nofile}")]);
        c.args(["--ulimit", "nproc=32768:32768"]);
        c.arg(image).args(args);
        stdout(&checked(&mut c))
    }
}

// ---------------------------------------------------------------- buildah

/// Builds `ctx` with buildah (base: the same Debian tar) and returns the
/// result flattened, or None when buildah is not installed (outside CI:
/// under `CI=true`, where scripts/test.sh installs it, that fails).
fn buildah_build(k: &Kiln, ctx: &Path) -> Option<Saved> {
    if !Command::new("sh")
        .args(["-c", "command -v buildah"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!(
                "buildah is not installed (apt-get install buildah): the comparison must run in CI"
            );
        }
        eprintln!("buildah is not installed: comparison not run");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let run = dir.path().join("run");
    let buildah = || {
        let mut c = Command::new("buildah");
        c.arg("--root").arg(&root).arg("--runroot").arg(&run);
        c.args(["--storage-driver", "vfs"]);
        c
    };
    let base = dir.path().join("base.tar");
    k.ok(&[
        "save",
        "-o",
        base.to_str().expect("utf-8"),
        "debian:bookworm",
    ]);
    checked(
        buildah()
            .args(["pull", "-q"])
            .arg(format!("docker-archive:{}", base.display())),
    );
    checked(
        buildah()
            .args(["build", "-q", "--runtime", "runc", "--network", "none"])
            .args(["--layers=false", "-t", "peer:1"])
            .arg(ctx),
    );
    let archive = dir.path().join("peer.tar");
    checked(
        buildah()
            .args(["push", "-q", "peer:1"])
            .arg(format!("docker-archive:{}:peer:1", archive.display())),
    );
    Some(read_archive(dir, archive))
}

/// Compares kiln's and buildah's file trees: every path, its type, mode,
/// owner, size, link target and capabilities. What differs by design:
/// * `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`: buildah leaves the
///   files (empty or its own) it bind-mounted over them in the image; kiln
///   (like BuildKit) leaves nothing behind;
/// * `/run`, `/tmp`, `/var/tmp` and `/proc`, `/sys`, `/dev` contents;
/// * directory sizes (0 in both tars, but kept out of the comparison);
/// * `var/cache/ldconfig/aux-cache` and `var/log/*`: rewritten by each
///   run of ldconfig/dpkg (contents and so sizes differ from run to run).
fn compare_with_buildah(kiln: &Saved, peer: &Saved) {
    let by_design = |p: &str| {
        matches!(p, "etc/hostname" | "etc/hosts" | "etc/resolv.conf")
            || ["run/", "tmp/", "var/tmp/", "proc/", "sys/", "dev/"]
                .iter()
                .any(|d| p.starts_with(d))
            || p == "var/cache/ldconfig/aux-cache"
            || p.starts_with("var/log/")
    };
    let mut diffs = Vec::new();
    for (p, a) in &kiln.files {
        if by_design(p) {
            continue;
        }
        match peer.files.get(p) {
            None => diffs.push(format!("only in kiln: {p} {a:?}")),
            Some(b) => {
                let mut a = a.clone();
                let mut b = b.clone();
                if a.kind == 'd' {
                    a.size = 0;
                    b.size = 0;
                }
                if a != b {
                    diffs.push(format!("{p}: kiln {a:?} buildah {b:?}"));
                }
            }
        }
    }
    for (p, b) in &peer.files {
        if !by_design(p) && !kiln.files.contains_key(p) {
            diffs.push(format!("only in buildah: {p} {b:?}"));
        }
    }
    eprintln!(
        "compared with buildah: {} paths in kiln's image, {} in buildah's, {} differences",
        kiln.files.len(),
        peer.files.len(),
        diffs.len()
    );
    assert!(
        diffs.is_empty(),
        "{} differences from buildah:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

// ------------------------------------------------------------------ tests

#[test]
fn apt_get_install_keeps_file_capabilities_and_setuid() {
    let Some(k) = debian() else { return };
    let ctx = context(&[(
        "Dockerfile",
        "FROM debian:bookworm\n\
         RUN apt-get update && apt-get install -y --no-install-recommends iputils-ping sudo \
             && rm -rf /var/lib/apt/lists/*\n",
    )]);
    build(&k, ctx.path(), "ping:1", &[]);
    let img = save(&k, "ping:1");
    let ping = img.get("usr/bin/ping");
    assert_eq!((ping.kind, ping.mode, ping.uid), ('-', 0o755, 0));
    // VFS_CAP_REVISION_2 | effective, cap_net_raw (13) permitted:
    // `setcap cap_net_raw+ep`, as the package's postinst sets it.
    let caps = ping
        .caps
        .as_deref()
        .expect("ping keeps security.capability");
    assert_eq!(&caps[..8], &[1, 0, 0, 2, 0, 0x20, 0, 0], "{caps:?}");
    let sudo = img.get("usr/bin/sudo");
    assert_eq!((sudo.mode, sudo.uid, sudo.gid), (0o4755, 0, 0));
    // The minimize config did its job: no .deb, no lists left behind.
    assert!(img
        .under("var/lib/apt/lists")
        .iter()
        .all(|p| p.ends_with("partial") || p.ends_with("lock") || p.ends_with("auxfiles")));
    assert!(
        !img.files.keys().any(|p| p.ends_with(".deb")),
        "a .deb stayed"
    );
    assert_eq!(img.config["config"]["Cmd"], serde_json::json!(["bash"]));
    assert_eq!(img.config["config"]["Env"], serde_json::json!([PATH_ENV]));
    let out = k.ok(&[
        "run",
        "--rm",
        "ping:1",
        "sh",
        "-c",
        "ping -V && getcap /usr/bin/ping && stat -c '%a %U' /usr/bin/sudo",
    ]);
    assert!(
        out.contains("ping from iputils")
            && out.ends_with("/usr/bin/ping cap_net_raw=ep\n4755 root\n"),
        "{out}"
    );
    // (podman's default capabilities lack NET_RAW, so ping itself may not
    // exec there: the file capability exceeds the bounding set.)
    if let Some(p) = Podman::new() {
        p.load(&img);
        let out = p.run(
            "localhost/ping:1",
            &[
                "sh",
                "-c",
                "getcap /usr/bin/ping && stat -c '%a %U' /usr/bin/sudo",
            ],
        );
        assert_eq!(out, "/usr/bin/ping cap_net_raw=ep\n4755 root\n");
    }
}

#[test]
fn apt_cache_mounts_keep_packages_between_builds_and_out_of_the_image() {
    let Some(k) = debian() else { return };
    let df = format!(
        "FROM debian:bookworm\n\
         RUN rm -f /etc/apt/apt.conf.d/docker-clean; \
             echo 'Binary::apt::APT::Keep-Downloaded-Packages \"true\";' > /etc/apt/apt.conf.d/keep-cache\n\
         RUN {APT_CACHE} apt-get update && apt-get install -y --no-install-recommends jq\n"
    );
    let ctx = context(&[("Dockerfile", &df)]);
    let first = build(&k, ctx.path(), "jq:1", &[]);
    assert!(first.contains("Get:"), "first build downloads:\n{first}");
    // Again without the layer cache: the packages come from the cache mount.
    let second = build(&k, ctx.path(), "jq:2", &["--no-cache"]);
    assert!(
        second.contains("Need to get 0 B/"),
        "second build downloads nothing:\n{second}"
    );
    let img = save(&k, "jq:2");
    assert!(img.has("usr/bin/jq"));
    assert!(
        img.under("var/cache/apt/archives").is_empty()
            || !img.files.keys().any(|p| p.ends_with(".deb"))
    );
    assert!(
        !img.files
            .keys()
            .any(|p| p.starts_with("var/lib/apt/lists/") && p.contains("Packages")),
        "the lists stay in the cache mount"
    );
    let out = k.ok(&[
        "run",
        "--rm",
        "jq:2",
        "sh",
        "-c",
        "echo '{\"a\":[1,2]}' | jq -c .a",
    ]);
    assert_eq!(out, "[1,2]\n");
}

/// Dockerfile of the useradd test (no network: also built by buildah).
const USERADD: &str = "FROM debian:bookworm\n\
RUN useradd -m -d /home/app -s /bin/bash -u 1000 app && chmod 700 /home/app\n\
COPY --chown=app:app src/ /home/app/\n\
USER app\n\
WORKDIR /home/app\n\
RUN echo written by $(id -un) > /home/app/note && mkdir -p /home/app/data\n\
CMD [\"sh\", \"-c\", \"id -un && cat /home/app/note && stat -c '%a %U' /home/app\"]\n";

#[test]
fn useradd_home_copy_chown_and_user() {
    let Some(k) = debian() else { return };
    let ctx = context(&[
        ("Dockerfile", USERADD),
        ("src/app.py", "print('hi')\n"),
        ("src/conf/settings.ini", "[app]\n"),
    ]);
    build(&k, ctx.path(), "user:1", &[]);
    let img = save(&k, "user:1");
    // The chmod 700 home stays 700 and app's after COPY (issue 15 item 1).
    let home = img.get("home/app");
    assert_eq!(
        (home.kind, home.mode, home.uid, home.gid),
        ('d', 0o700, 1000, 1000)
    );
    for p in [
        "home/app/app.py",
        "home/app/conf",
        "home/app/conf/settings.ini",
        "home/app/note",
        "home/app/data",
    ] {
        let n = img.get(p);
        assert_eq!((n.uid, n.gid), (1000, 1000), "{p}: {n:?}");
    }
    assert!(img.has("home/app/.bashrc"), "useradd -m copied /etc/skel");
    assert_eq!(img.config["config"]["User"], "app");
    assert_eq!(img.config["config"]["WorkingDir"], "/home/app");
    let expect = "app\nwritten by app\n700 app\n";
    assert_eq!(k.ok(&["run", "--rm", "user:1"]), expect);
    if let Some(p) = Podman::new() {
        p.load(&img);
        assert_eq!(p.run("localhost/user:1", &[]), expect);
    }
    if let Some(peer) = buildah_build(&k, ctx.path()) {
        compare_with_buildah(&img, &peer);
    }
}

/// Dockerfile of the purge test (no network: also built by buildah).
const PURGE: &str = "FROM debian:bookworm\n\
RUN apt-get purge -y tzdata && rm -rf /usr/share/doc /usr/share/man\n\
RUN test ! -e /usr/share/zoneinfo && test ! -e /etc/timezone\n";

#[test]
fn apt_get_purge_and_rm_rf_doc_are_whiteouts_over_the_base() {
    let Some(k) = debian() else { return };
    let base = save(&k, "debian:bookworm");
    assert!(base.has("usr/share/zoneinfo/Etc/UTC") && base.has("etc/timezone"));
    assert!(base.under("usr/share/doc").len() > 100);
    let ctx = context(&[("Dockerfile", PURGE)]);
    build(&k, ctx.path(), "purged:1", &[]);
    let img = save(&k, "purged:1");
    for gone in [
        "usr/share/zoneinfo",
        "etc/timezone",
        "etc/localtime",
        "usr/share/doc",
        "usr/share/man",
    ] {
        assert!(!img.has(gone), "{gone} is still in the image");
    }
    assert!(img.under("usr/share/doc").is_empty());
    for w in [
        "usr/share/.wh.doc",
        "usr/share/.wh.zoneinfo",
        "etc/.wh.timezone",
    ] {
        assert!(
            img.whiteouts.iter().any(|x| x == w),
            "{w} missing: a removed tree is one whiteout: {:?}",
            img.whiteouts
        );
    }
    let check = "test ! -e /usr/share/doc && test ! -e /usr/share/zoneinfo && \
                 dpkg-query -W -f='${db:Status-Abbrev}' tzdata 2>&1; echo";
    let purged = |o: &str| o.starts_with("un") || o.contains("no packages found");
    let out = k.ok(&["run", "--rm", "purged:1", "sh", "-c", check]);
    assert!(purged(&out), "dpkg: {out:?}");
    if let Some(p) = Podman::new() {
        p.load(&img);
        let out = p.run("localhost/purged:1", &["sh", "-c", check]);
        assert!(purged(&out), "podman: {out:?}");
    }
    if let Some(peer) = buildah_build(&k, ctx.path()) {
        compare_with_buildah(&img, &peer);
    }
}

#[test]
fn python_venv_from_pip_in_a_cache_mount_copied_into_a_slim_stage() {
    let Some(k) = debian() else { return };
    let df = format!(
        "FROM debian:bookworm AS build\n\
         RUN rm -f /etc/apt/apt.conf.d/docker-clean\n\
         RUN {APT_CACHE} apt-get update && apt-get install -y --no-install-recommends python3-venv\n\
         RUN python3 -m venv /opt/venv\n\
         RUN --mount=type=cache,target=/root/.cache/pip \
             /opt/venv/bin/pip install --disable-pip-version-check six==1.16.0\n\
         \n\
         FROM debian:bookworm\n\
         RUN rm -f /etc/apt/apt.conf.d/docker-clean\n\
         RUN {APT_CACHE} apt-get update && apt-get install -y --no-install-recommends python3-minimal\n\
         COPY --from=build /opt/venv /opt/venv\n\
         ENV PATH=/opt/venv/bin:$PATH\n\
         CMD [\"python\", \"-c\", \"import six, sys; print(six.__version__, sys.prefix)\"]\n"
    );
    let ctx = context(&[("Dockerfile", &df)]);
    build(&k, ctx.path(), "venv:1", &[]);
    let img = save(&k, "venv:1");
    assert!(img.has("opt/venv/lib/python3.11/site-packages/six.py"));
    assert_eq!(img.get("opt/venv/bin/python").kind, 'l');
    assert!(!img.has("opt/venv/bin/pip") || img.get("opt/venv/bin/pip").mode == 0o755);
    assert!(
        !img.has("usr/lib/python3/dist-packages/pip"),
        "the slim stage has no pip"
    );
    assert!(
        !img.has("root/.cache/pip"),
        "the pip cache stays in its mount"
    );
    let expect = "1.16.0 /opt/venv\n";
    assert_eq!(k.ok(&["run", "--rm", "venv:1"]), expect);
    if let Some(p) = Podman::new() {
        p.load(&img);
        assert_eq!(p.run("localhost/venv:1", &[]), expect);
    }
}

#[test]
fn go_static_binary_runs_from_scratch() {
    let Some(k) = debian() else { return };
    let df = format!(
        "FROM debian:bookworm AS build\n\
         RUN rm -f /etc/apt/apt.conf.d/docker-clean\n\
         RUN {APT_CACHE} apt-get update && apt-get install -y --no-install-recommends golang-go\n\
         WORKDIR /src\n\
         COPY go.mod main.go ./\n\
         RUN --mount=type=cache,target=/root/.cache/go-build \
             CGO_ENABLED=0 go build -trimpath -ldflags=-s -o /out/hello .\n\
         \n\
         FROM scratch\n\
         COPY --from=build /out/hello /hello\n\
         USER 65534:65534\n\
         ENTRYPOINT [\"/hello\"]\n"
    );
    let ctx = context(&[
        ("Dockerfile", &df),
        ("go.mod", "module example.com/hello\n\ngo 1.19\n"),
        (
            "main.go",
            "package main\n\nimport (\n\t\"fmt\"\n\t\"os\"\n)\n\nfunc main() {\n\tfmt.Printf(\"hello from go as %d, args %v\\n\", os.Getuid(), os.Args[1:])\n}\n",
        ),
    ]);
    build(&k, ctx.path(), "hello:1", &[]);
    let img = save(&k, "hello:1");
    let paths: Vec<&String> = img.files.keys().collect();
    assert_eq!(paths, vec!["hello"], "only the binary");
    let bin = img.get("hello");
    assert_eq!((bin.kind, bin.mode, bin.uid), ('-', 0o755, 0));
    assert_eq!(
        img.config["config"]["Entrypoint"],
        serde_json::json!(["/hello"])
    );
    let out = k.ok(&["run", "--rm", "hello:1", "a", "b"]);
    assert_eq!(out, "hello from go as 65534, args [a b]\n");
    if let Some(p) = Podman::new() {
        p.load(&img);
        assert_eq!(
            p.run("localhost/hello:1", &["x"]),
            "hello from go as 65534, args [x]\n"
        );
    }
}

#[test]
fn pipefail_shell_fails_the_build_on_a_failing_pipe() {
    let Some(k) = debian() else { return };
    // Without pipefail the pipe's status is the last command's: it builds.
    let ok = context(&[(
        "Dockerfile",
        "FROM debian:bookworm\nRUN echo before; false | cat\n",
    )]);
    build(&k, ok.path(), "nopf:1", &[]);
    let bad = context(&[(
        "Dockerfile",
        "FROM debian:bookworm\n\
         SHELL [\"/bin/bash\", \"-o\", \"pipefail\", \"-c\"]\n\
         RUN echo visible-output; grep nothing /etc/os-release | wc -l\n",
    )]);
    let err = common::build_fails(&k, bad.path(), &["--progress", "plain"]);
    assert!(
        err.contains(
            "/bin/bash -o pipefail -c echo visible-output; grep nothing /etc/os-release | wc -l"
        ),
        "the command is named:\n{err}"
    );
    assert!(err.contains("exit code: 1"), "{err}");
    assert!(
        err.contains("visible-output"),
        "the step's output is shown:\n{err}"
    );
}
