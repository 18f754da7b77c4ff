//! Unprivileged users for the rootless end-to-end tests.
//!
//! [`TestUser::create`] makes a fresh user `kiln-rl-<pid>-<n>` (with a
//! subordinate id range from `useradd`, or with none for the one-id
//! fallback) and removes it with its home and its `/etc/subuid` and
//! `/etc/subgid` lines on drop. Users left by a test process that was
//! killed (its pid is gone) are removed by the next one. `useradd` and
//! `userdel` fail at once when another holds the passwd lock, so every
//! change is serialized on a lock file.
//!
//! [`TestUser::kiln`] runs the `kiln` binary as that user: uid, gid, no
//! supplementary groups, a clean environment with the user's `HOME`, and
//! a store in a temporary directory the user owns.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Name prefix of the users these tests make.
const PREFIX: &str = "kiln-rl-";

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Fails (under CI=true) or returns false (elsewhere, printing "not run")
/// when the machine cannot run rootless kiln: the end-to-end
/// prerequisites, `useradd`/`userdel`, `newuidmap`/`newgidmap` (package
/// uidmap), unprivileged user namespaces, and overlay's `userxattr`
/// (Linux 5.11).
pub fn prerequisites() -> bool {
    if !super::prerequisites() {
        return false;
    }
    let mut missing = Vec::new();
    for tool in ["useradd", "userdel", "newuidmap", "newgidmap"] {
        if !super::registry::have(tool) {
            missing.push(format!("{tool} (apt-get install passwd uidmap)"));
        }
    }
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1);
    let clone = std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone")
        .map(|s| s.trim() != "0")
        .unwrap_or(true);
    if max == 0 || !clone {
        missing.push("unprivileged user namespaces (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone)".into());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse::<u32>().ok());
    let (maj, min) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if (maj, min) < (5, 11) {
        missing.push(format!(
            "Linux >= 5.11 for overlay's userxattr (running {})",
            release.trim()
        ));
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("rootless prerequisites missing: {}", missing.join(", "));
    if under_ci() {
        panic!("{msg}");
    }
    eprintln!("{msg}: not run");
    false
}

/// Holds the lock on user database changes while alive.
struct UserDbLock(std::fs::File);

impl UserDbLock {
    fn take() -> UserDbLock {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("kiln-rootless-users.lock"))
            .expect("lock file");
        // SAFETY: a valid descriptor.
        let r = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
        assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
        UserDbLock(f)
    }
}

impl Drop for UserDbLock {
    fn drop(&mut self) {
        // SAFETY: a valid descriptor.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&self.0), libc::LOCK_UN) };
    }
}

fn userdel(name: &str) {
    let _ = Command::new("userdel")
        .args(["-r", "-f", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    // userdel removes the subordinate ranges too; older shadow did not.
    for f in ["/etc/subuid", "/etc/subgid"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            let kept: String = text
                .lines()
                .filter(|l| l.split(':').next() != Some(name))
                .map(|l| format!("{l}\n"))
                .collect();
            if kept != text {
                let _ = std::fs::write(f, kept);
            }
        }
    }
}

/// Removes users of test processes that are gone.
fn sweep_stale() {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for name in passwd.lines().filter_map(|l| l.split(':').next()) {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            userdel(name);
        }
    }
}

/// An unprivileged user made for one test (removed on drop).
pub struct TestUser {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Its home directory.
    pub home: PathBuf,
}

impl TestUser {
    /// A new user; with `subids` it has a subordinate uid and gid range
    /// (from useradd), without none at all.
    pub fn create(subids: bool) -> TestUser {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let _lock = UserDbLock::take();
        sweep_stale();
        userdel(&name);
        let mut c = Command::new("useradd");
        c.args(["-m", "-s", "/bin/sh", "-U"]);
        if subids {
            // Ranges even where login.defs allocates none by default, and
            // more than 65536 ids (images use ids above 65535).
            c.args(["-K", "SUB_UID_COUNT=131072", "-K", "SUB_GID_COUNT=131072"]);
        } else {
            c.args(["-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0"]);
        }
        super::registry::sh(c.arg(&name));
        let id = |flag: &str| -> u32 {
            let o = super::registry::sh(Command::new("id").arg(flag).arg(&name));
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .expect("id")
        };
        let user = TestUser {
            uid: id("-u"),
            gid: id("-g"),
            home: PathBuf::from("/home").join(&name),
            name,
        };
        let has = |f: &str| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .any(|l| l.split(':').next() == Some(user.name.as_str()))
        };
        for f in ["/etc/subuid", "/etc/subgid"] {
            assert_eq!(
                has(f),
                subids,
                "{f} for {} after useradd (subids: {subids})",
                user.name
            );
        }
        user
    }

    /// A temporary directory owned by the user (removed on drop by root).
    pub fn tempdir(&self) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        self.chown(d.path());
        d
    }

    /// Gives `path` (recursively) to the user.
    pub fn chown(&self, path: &Path) {
        super::registry::sh(
            Command::new("chown")
                .arg("-R")
                .arg(format!("{}:{}", self.uid, self.gid))
                .arg(path),
        );
    }

    /// A kiln runner as this user, with a fresh store it owns.
    pub fn kiln(&self) -> UserKiln<'_> {
        let dir = self.tempdir();
        UserKiln { user: self, dir }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _lock = UserDbLock::take();
        userdel(&self.name);
    }
}

/// The kiln binary where any user may run it (a copy, once per process,
/// in a directory everyone can enter).
pub fn kiln_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = std::env::var_os("KILN_E2E_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kiln")));
        let dir = super::process_tempdir();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let bin = dir.join("kiln");
        std::fs::copy(&src, &bin).expect("copy kiln");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        bin
    })
    .clone()
}

/// Runs kiln as a [`TestUser`] on a store in a directory the user owns.
pub struct UserKiln<'a> {
    /// The user.
    pub user: &'a TestUser,
    /// The user's directory: the store is `store/` in it; tests put
    /// contexts and outputs here too.
    pub dir: tempfile::TempDir,
}

impl UserKiln<'_> {
    /// The store root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A command run as the user in a clean environment (`HOME`, `USER`,
    /// `PATH`), with no supplementary groups.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("HOME", &self.user.home)
            .env("USER", &self.user.name)
            .env("LOGNAME", &self.user.name)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .current_dir(self.dir.path())
            .uid(self.user.uid)
            .gid(self.user.gid)
            .stdin(Stdio::null());
        // std drops the supplementary groups (setgroups(0)) when it
        // changes the uid.
        c
    }

    /// `kiln --root STORE` as the user.
    pub fn cmd(&self) -> Command {
        let mut c = self.command(kiln_bin());
        c.arg("--root").arg(self.root());
        c
    }

    /// Runs kiln with `args`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run kiln")
    }

    /// Runs kiln, asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        super::succeeded(
            &self.run(args),
            format_args!("kiln {args:?} as {}", self.user.name),
        )
    }

    /// A build context in the user's directory with files `(path, text)`.
    pub fn context(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.dir.path().join(name);
        for (p, c) in files {
            let path = dir.join(p);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, c).expect("write");
        }
        self.user.chown(&dir);
        dir
    }

    /// Loads the docker-archive `tar` (readable by the user) into the store.
    pub fn load(&self, tar: &Path) {
        self.ok(&["load", "-q", "-i", tar.to_str().expect("utf-8")]);
    }
}
