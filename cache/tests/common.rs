//! Helpers shared by the cache crate's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Whether we are root (real mounts need CAP_SYS_ADMIN). Under CI=true a
/// missing prerequisite fails the test; otherwise it prints "not run".
pub fn require_root(what: &str) -> bool {
    // SAFETY: no failure mode.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what}: needs root (CAP_SYS_ADMIN for mounts), CI=true");
    }
    eprintln!("{what}: not run (needs root)");
    false
}

/// Give the calling test thread its own mount namespace (and fs context,
/// so chdir stays private too); mounts vanish when the thread ends.
pub fn private_mount_ns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make / rprivate");
}

/// Unmounts on drop.
pub struct Mounted(pub PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Perform `mounts` (one, as the snapshotters return) on a fresh dir.
pub fn mount_all(mounts: &[kiln_cache::Mount], at: &Path) -> Mounted {
    std::fs::create_dir_all(at).expect("mkdir target");
    assert_eq!(mounts.len(), 1, "one mount expected: {mounts:?}");
    mounts[0]
        .mount(at)
        .unwrap_or_else(|e| panic!("mount {:?}: {e}", mounts[0]));
    Mounted(at.to_path_buf())
}
