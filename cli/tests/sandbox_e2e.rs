//! The sandbox holds against a hostile Dockerfile, end to end through the
//! `kiln` binary (issue 13): descriptors kiln's caller left open, host
//! block devices (on the host's cgroup layout and with the cgroup
//! hierarchies hidden), and build secrets that must never touch a file the
//! host can see.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{context, prerequisites, Kiln};

/// `sh -c 'PRELUDE; exec kiln --root ROOT ARGS…'`, optionally inside
/// `unshare -m` (a private mount namespace for the prelude's mounts).
fn kiln_after(k: &Kiln, unshare: bool, prelude: &str, args: &[&str]) -> Command {
    let script = format!("{prelude}\nk=$1; shift; exec \"$k\" \"$@\"");
    let mut c = if unshare {
        let mut c = Command::new("unshare");
        c.args(["-m", "--propagation", "private", "sh", "-c"]);
        c
    } else {
        let mut c = Command::new("sh");
        c.arg("-c");
        c
    };
    c.arg(script)
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(k.root.path())
        .args(args)
        .env_remove("KILN_ROOT")
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(Stdio::null());
    c
}

fn ok(o: Output, what: &str) -> String {
    common::succeeded(&o, format_args!("{what}"))
}

// ------------------------------------------------------------ descriptors

/// `kiln run -i IMAGE < FILE`: the application reads FILE's bytes through
/// a pipe, as with docker, never FILE's own descriptor — through which it
/// could open `/proc/self/fd/0` again for writing (as root) and change a
/// host file, or learn its name.
#[test]
fn run_i_gives_the_application_a_pipe_not_kilns_stdin() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let host = tempfile::tempdir().expect("tempdir");
    let victim = host.path().join("victim");
    fs::write(&victim, "HOST-ORIGINAL\n").expect("victim");
    let mut perms = fs::metadata(&victim).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    fs::set_permissions(&victim, perms).expect("chmod");
    let out = k
        .cmd()
        .args([
            "run",
            "--rm",
            "-i",
            "busybox",
            "sh",
            "-c",
            "cat; readlink /proc/self/fd/0; echo pwned > /proc/self/fd/0 2>/dev/null; true",
        ])
        .stdin(fs::File::open(&victim).expect("open"))
        .output()
        .expect("kiln run");
    let out = ok(out, "kiln run -i");
    assert!(out.starts_with("HOST-ORIGINAL\n"), "{out}");
    assert!(out.contains("pipe:"), "stdin is not a pipe: {out}");
    assert!(!out.contains(&victim.display().to_string()), "{out}");
    assert_eq!(
        fs::read_to_string(&victim).expect("read"),
        "HOST-ORIGINAL\n",
        "the application wrote the host file behind kiln's stdin"
    );
}

/// `(exec 7</; exec 9>lock; flock 9; kiln …)`: neither a RUN step nor a
/// `kiln run` process gets fd 7 (the host's root directory) or fd 9.
#[test]
fn descriptors_of_the_caller_reach_no_step() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let host = tempfile::tempdir().expect("tempdir");
    fs::write(host.path().join("marker"), "HOST-FD-MARKER\n").expect("marker");
    let rel = host
        .path()
        .strip_prefix("/")
        .expect("absolute")
        .display()
        .to_string();
    let lock = host.path().join("lock");
    let prelude = format!("exec 7</; exec 9>{}; flock 9", lock.display());
    let probe = format!(
        "ls /proc/self/fd | tr '\\n' ' '; echo; \
         cat /proc/self/fd/7/{rel}/marker 2>&1; \
         echo pwned > /proc/self/fd/7/{rel}/written 2>/dev/null; \
         ls /proc/self/fd/9 2>&1; true"
    );
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM busybox\nRUN ({probe}) > /probe 2>&1\n"),
    )]);
    let ctx_path = ctx.path().to_str().expect("utf-8");
    ok(
        kiln_after(
            &k,
            false,
            &prelude,
            &["build", "-q", "-t", "fds:1", ctx_path],
        )
        .output()
        .expect("kiln build"),
        "kiln build",
    );
    let built = k.ok(&["run", "--rm", "fds:1", "cat", "/probe"]);
    let ran = ok(
        kiln_after(
            &k,
            false,
            &prelude,
            &["run", "--rm", "busybox", "sh", "-c", &probe],
        )
        .output()
        .expect("kiln run"),
        "kiln run",
    );
    for (what, out) in [("RUN", &built), ("kiln run", &ran)] {
        assert!(
            !out.contains("HOST-FD-MARKER"),
            "{what} read the host: {out}"
        );
        assert_eq!(
            out.lines().next().map(str::trim),
            Some("0 1 2 3"),
            "{what}: fds {out}"
        );
    }
    assert!(
        !host.path().join("written").exists(),
        "a step wrote to the host through fd 7"
    );
}

// ------------------------------------------------------------ devices

/// A small file behind a loop device, standing in for a host disk.
struct LoopDisk {
    dev: String,
    minor: u64,
    file: PathBuf,
    content: Vec<u8>,
    _dir: tempfile::TempDir,
}

const DISK_MARKER: &str = "KILN-HOST-DISK-CONTENT";

impl LoopDisk {
    fn new() -> LoopDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("disk.img");
        let content = DISK_MARKER.as_bytes().repeat(65536 / DISK_MARKER.len() + 1);
        fs::write(&file, &content).expect("disk image");
        let mut last = String::new();
        for _ in 0..10 {
            let o = Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&file)
                .output()
                .expect("losetup");
            if o.status.success() {
                let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
                let st = nix::sys::stat::stat(dev.as_str()).expect("stat loop device");
                assert_eq!(libc::major(st.st_rdev), 7, "{dev} is not a loop device");
                return LoopDisk {
                    minor: libc::minor(st.st_rdev) as u64,
                    dev,
                    file,
                    content,
                    _dir: dir,
                };
            }
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("losetup failed: {last}");
    }

    fn detach(&mut self) {
        if !self.dev.is_empty() {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
            self.dev.clear();
        }
    }

    /// Detach and check that nothing was written.
    fn detach_and_check(mut self) {
        self.detach();
        let now = fs::read(&self.file).expect("disk image");
        assert!(now == self.content, "the host disk was written to");
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        self.detach();
    }
}

/// mknod + read + dd write of the disk in each of `dirs`, then the allowed
/// nodes. One line, for a Dockerfile RUN.
fn probe_script(minor: u64, dirs: &[&str]) -> String {
    let mut s = String::new();
    for d in dirs {
        s.push_str(&format!(
            "mknod {d}/kdisk b 7 {minor} && echo 'mknod {d} ok'; \
             head -c 64 {d}/kdisk 2>&1; echo \"read {d} rc=$?\"; \
             dd if=/dev/zero of={d}/kdisk bs=512 count=1 conv=notrunc 2>&1; echo \"write {d} rc=$?\"; \
             rm -f {d}/kdisk; "
        ));
    }
    s.push_str(
        "echo x > /dev/null && head -c 3 /dev/zero | wc -c && exec 3<>/dev/ptmx && echo allowed-ok",
    );
    s
}

fn check_probe(out: &str, dirs: &[&str], what: &str) {
    assert!(!out.contains(DISK_MARKER), "{what}: host disk read: {out}");
    for d in dirs {
        assert!(
            out.contains(&format!("mknod {d} ok")),
            "{what}: mknod in {d} failed: {out}"
        );
        for op in ["read", "write"] {
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("{op} {d} rc=")))
                .unwrap_or_else(|| panic!("{what}: no {op} {d} line: {out}"));
            assert!(!line.ends_with("rc=0"), "{what}: {op} in {d} worked: {out}");
        }
    }
    assert!(out.contains("Permission denied"), "{what}: {out}");
    assert!(
        out.contains("3\nallowed-ok"),
        "{what}: allowed nodes: {out}"
    );
}

/// What hides the cgroup hierarchies, run in a private mount namespace
/// before kiln starts: v1 unmounted (a cgroup-v2-only host), everything
/// hidden (no cgroups at all), nothing (the host as it is; there the v1
/// devices cgroup would refuse the open with EPERM, the nodev mounts refuse
/// it first with EACCES, "Permission denied").
const LAYOUTS: &[(&str, bool, &str)] = &[
    (
        "v2only",
        true,
        "grep ' - cgroup ' /proc/self/mountinfo | cut -d' ' -f5 | while read m; do umount -l \"$m\" || exit 1; done",
    ),
    (
        "nocgroup",
        true,
        "mount -t tmpfs -o ro tmpfs /sys/fs/cgroup",
    ),
    ("host", false, "true"),
];

/// `RUN mknod` + read/write of a host disk in /dev, the rootfs, a cache
/// mount and a tmpfs mount, and the same through `kiln run` with a
/// volume: nothing opens, on every cgroup layout.
#[test]
fn host_block_device_unreachable_on_every_cgroup_layout() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let disk = LoopDisk::new();
    let build_dirs = ["/dev", "/tmp", "/cache", "/scratch"];
    let run_dirs = ["/dev", "/tmp", "/vol"];
    let vol = tempfile::tempdir().expect("tempdir");
    for (layout, unshare, prelude) in LAYOUTS {
        let ctx = context(&[(
            "Dockerfile",
            &format!(
                "FROM busybox\nENV LAYOUT={layout}\n\
                 RUN --mount=type=cache,target=/cache --mount=type=tmpfs,target=/scratch \
                 ({}) > /probe 2>&1; true\n",
                probe_script(disk.minor, &build_dirs)
            ),
        )]);
        let tag = format!("probe:{layout}");
        ok(
            kiln_after(
                &k,
                *unshare,
                prelude,
                &[
                    "build",
                    "-q",
                    "-t",
                    &tag,
                    ctx.path().to_str().expect("utf-8"),
                ],
            )
            .output()
            .expect("kiln build"),
            &format!("{layout}: kiln build"),
        );
        let out = k.ok(&["run", "--rm", &tag, "cat", "/probe"]);
        check_probe(&out, &build_dirs, &format!("{layout}: RUN"));
        let volume = format!("{}:/vol", vol.path().display());
        let out = ok(
            kiln_after(
                &k,
                *unshare,
                prelude,
                &[
                    "run",
                    "--rm",
                    "-v",
                    &volume,
                    "busybox",
                    "sh",
                    "-c",
                    &probe_script(disk.minor, &run_dirs),
                ],
            )
            .output()
            .expect("kiln run"),
            &format!("{layout}: kiln run"),
        );
        check_probe(&out, &run_dirs, &format!("{layout}: kiln run"));
    }
    disk.detach_and_check();
}

// ------------------------------------------------------------ secrets

/// Host processes whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).contains(needle) {
                v.push(pid);
            }
        }
    }
    v
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Regular files under `dir` (not following links) whose bytes contain
/// `needle`.
fn files_containing(dir: &Path, needle: &[u8], out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(t) = e.file_type() else { continue };
        let p = e.path();
        if t.is_dir() {
            files_containing(&p, needle, out);
        } else if t.is_file() {
            let small = e.metadata().map(|m| m.len() < 64 << 20).unwrap_or(false);
            if small {
                if let Ok(b) = fs::read(&p) {
                    if b.windows(needle.len()).any(|w| w == needle) {
                        out.push(p);
                    }
                }
            }
        }
    }
}

/// Where a secret could have been written on the host: /dev/shm, kiln's
/// TMPDIR (the test's own) and the store.
fn secret_copies(value: &str, tmp: &Path, k: &Kiln) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in [Path::new("/dev/shm"), tmp, k.root.path()] {
        files_containing(d, value.as_bytes(), &mut v);
    }
    v
}

struct Secret {
    value: String,
    _dir: tempfile::TempDir,
    file: PathBuf,
}

fn secret() -> Secret {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let value = format!("KILN-SECRET-{}-{nanos}", std::process::id());
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("secret");
    fs::write(&file, &value).expect("secret");
    Secret {
        value,
        _dir: dir,
        file,
    }
}

/// While the step runs, the value is in no host file and another user
/// cannot read it; the step reads it with the mode and owner it asked
/// for; nothing is left afterwards.
#[test]
fn secret_is_in_no_host_file_while_the_step_runs() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let s = secret();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mark = format!("secret-step-{}", std::process::id());
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM busybox\n\
             RUN --mount=type=secret,id=tok,mode=0444,uid=1000,gid=50 \
             stat -c '%a %u %g' /run/secrets/tok > /st && \
             sha256sum /run/secrets/tok | cut -c1-64 > /sum && sleep 3; true {mark}\n"
        ),
    )]);
    let child = k
        .cmd()
        .args(["build", "-q", "-t", "sec:1", "--secret"])
        .arg(format!("id=tok,src={}", s.file.display()))
        .arg(ctx.path())
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln");
    wait_for("the step", Duration::from_secs(60), || {
        !pids_with(&mark).is_empty()
    });
    let copies = secret_copies(&s.value, tmp.path(), &k);
    // Another user, on the host, through the step's root or /dev/shm.
    let pid = pids_with(&mark).first().copied().unwrap_or(0);
    let nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "sh",
            "-c",
        ])
        .arg(format!(
            "cat /proc/{pid}/root/run/secrets/tok; cat /dev/shm/kiln-secret-*/* ; true"
        ))
        .output()
        .expect("setpriv");
    let o = child.wait_with_output().expect("kiln build");
    ok(o, "kiln build");
    assert!(
        copies.is_empty(),
        "secret on the host while the step ran: {copies:?}"
    );
    assert!(
        !String::from_utf8_lossy(&nobody.stdout).contains(&s.value),
        "another user read the secret"
    );
    assert_eq!(
        k.ok(&["run", "--rm", "sec:1", "cat", "/st"]),
        "444 1000 50\n"
    );
    let sum = Command::new("sha256sum")
        .arg(&s.file)
        .output()
        .expect("sha256sum");
    let want = String::from_utf8_lossy(&sum.stdout)[..64].to_string();
    assert_eq!(
        k.ok(&["run", "--rm", "sec:1", "cat", "/sum"]).trim(),
        want,
        "the step read another value"
    );
    let after = secret_copies(&s.value, tmp.path(), &k);
    assert!(after.is_empty(), "secret left on the host: {after:?}");
}

/// SIGTERM and SIGKILL of kiln while a step holds a secret leave no copy.
#[test]
fn secret_leaves_nothing_after_sigterm_or_sigkill() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let s = secret();
    let tmp = tempfile::tempdir().expect("tempdir");
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let mark = format!("secret-kill-{sig}-{}", std::process::id());
        let ctx = context(&[(
            "Dockerfile",
            &format!(
                "FROM busybox\n\
                 RUN --mount=type=secret,id=tok cat /run/secrets/tok > /dev/null && sleep 60; true {mark}\n"
            ),
        )]);
        let mut child = k
            .cmd()
            .args(["build", "-q", "--secret"])
            .arg(format!("id=tok,src={}", s.file.display()))
            .arg(ctx.path())
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kiln");
        wait_for("the step", Duration::from_secs(60), || {
            !pids_with(&mark).is_empty()
        });
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let _ = child.wait();
        wait_for("the sandbox to go", Duration::from_secs(15), || {
            pids_with(&mark).is_empty()
        });
        let left = secret_copies(&s.value, tmp.path(), &k);
        assert!(
            left.is_empty(),
            "after signal {sig}: secret left in {left:?}"
        );
    }
}
