//! Mounts inside the sandbox's private mount namespace (run by the init's
//! PID 1): the rootfs, /proc, /dev, /sys, extra mounts, pivot_root, masked
//! and read-only paths.
//!
//! Targets inside the rootfs are opened with `openat2(RESOLVE_IN_ROOT)` and
//! mounted on through `/proc/self/fd/N`, so a symlink in an image can never
//! send a mount outside the rootfs.
//!
//! **Devices, whatever the cgroup layout.** Once every mount of the
//! sandbox is in place, the whole tree is made `nodev` (recursively: the
//! rootfs, the /dev tmpfs, cache/bind/tmpfs mounts, spec mounts and their
//! submounts). Only then are Docker's default nodes (null, zero, full,
//! random, urandom, tty) bind-mounted from the host into /dev and devpts
//! mounted, so they are the only device nodes that open. A node made with
//! `mknod` anywhere else (CAP_MKNOD is in Docker's set, packages create
//! nodes in images) exists but fails to open with EACCES, on a cgroup v1,
//! v2, hybrid or cgroup-less host alike.
//!
//! **Inline files** (build secrets) never touch a host-visible file: the
//! init writes them on a small tmpfs mounted inside the sandbox's own mount
//! namespace, binds each read-only onto its target and detaches the
//! staging mount.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use kiln_fs::{Create, Dir, Follow, Root};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;

use crate::protocol::{InitConfig, MountEntry};
use crate::request::{InlineFile, RootfsKind, RootfsMount};

/// A failed mount step, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct MountError {
    /// What was being done.
    pub what: String,
    /// The errno.
    #[source]
    pub source: nix::Error,
}

type Result<T> = std::result::Result<T, MountError>;

fn ctx<T>(r: nix::Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|source| MountError {
        what: what(),
        source,
    })
}

/// Destinations the executor provides itself.
pub const SYSTEM_DESTINATIONS: &[&str] = &[
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/sys",
    "/sys/fs/cgroup",
];

/// runc's (and Docker's) default masked paths.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// runc's (and Docker's) default read-only paths.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Parse runc-style mount options into flags, propagation flags and data.
pub(crate) fn parse_options(options: &[String]) -> (MsFlags, MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut prop = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, false),
            "rw" => (MsFlags::MS_RDONLY, true),
            "nosuid" => (MsFlags::MS_NOSUID, false),
            "suid" => (MsFlags::MS_NOSUID, true),
            "nodev" => (MsFlags::MS_NODEV, false),
            "dev" => (MsFlags::MS_NODEV, true),
            "noexec" => (MsFlags::MS_NOEXEC, false),
            "exec" => (MsFlags::MS_NOEXEC, true),
            "noatime" => (MsFlags::MS_NOATIME, false),
            "relatime" => (MsFlags::MS_RELATIME, false),
            "strictatime" => (MsFlags::MS_STRICTATIME, false),
            "nodiratime" => (MsFlags::MS_NODIRATIME, false),
            "sync" => (MsFlags::MS_SYNCHRONOUS, false),
            "bind" => (MsFlags::MS_BIND, false),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, false),
            "private" => {
                prop |= MsFlags::MS_PRIVATE;
                continue;
            }
            "rprivate" => {
                prop |= MsFlags::MS_PRIVATE | MsFlags::MS_REC;
                continue;
            }
            "slave" => {
                prop |= MsFlags::MS_SLAVE;
                continue;
            }
            "rslave" => {
                prop |= MsFlags::MS_SLAVE | MsFlags::MS_REC;
                continue;
            }
            "shared" | "rshared" | "unbindable" | "runbindable" => continue,
            "defaults" => continue,
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        if clear {
            flags.remove(set);
        } else {
            flags.insert(set);
        }
    }
    (flags, prop, data.join(","))
}

/// Open `dest` inside `root` (O_PATH, any type, the last component
/// followed too), never leaving it: kiln-fs's `RESOLVE_IN_ROOT`.
pub(crate) fn open_in_root(root: &Root, dest: &Path) -> nix::Result<OwnedFd> {
    root.open_path(dest, Follow::InRoot).map_err(fs_to_nix)
}

/// The errno of a kiln-fs error (the step's context is added by [`ctx`]).
fn fs_to_nix(e: kiln_fs::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Linux hands mount(2) at most one page of option data.
const PAGE: usize = kiln_fs::overlay::MOUNT_DATA_MAX;

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|c| c.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// When overlay option data would exceed a page, rewrites its `lowerdir=`
/// with [`kiln_fs::overlay::compact_lowerdir`] and returns the directory
/// the caller chdirs to for the mount; short data is returned unchanged.
pub(crate) fn compact_overlay_data(data: &str) -> (Option<PathBuf>, String) {
    if data.len() < PAGE {
        return (None, data.to_string());
    }
    let opts: Vec<&str> = data.split(',').collect();
    let Some((dir, lower)) = opts
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .and_then(kiln_fs::overlay::compact_lowerdir)
    else {
        return (None, data.to_string());
    };
    let new: Vec<String> = opts
        .iter()
        .map(|o| {
            if o.starts_with("lowerdir=") {
                format!("lowerdir={lower}")
            } else {
                o.to_string()
            }
        })
        .collect();
    (Some(dir), new.join(","))
}

/// Mount the rootfs mounts, in order, on `dir`.
pub(crate) fn mount_rootfs(dir: &Path, mounts: &[RootfsMount]) -> Result<()> {
    for m in mounts {
        match m.kind {
            RootfsKind::Overlay => {
                let (flags, _, data) = parse_options(&m.options);
                // mount(2) copies its data as one page: a deep stack's
                // lowerdirs are made relative to their most common parent,
                // which becomes the working directory for the call.
                let (chdir, data) = compact_overlay_data(&data);
                let dir = match &chdir {
                    Some(_) => absolute(dir),
                    None => dir.to_path_buf(),
                };
                if let Some(c) = &chdir {
                    ctx(nix::unistd::chdir(c.as_path()), || {
                        format!("chdir {} for the overlay mount", c.display())
                    })?;
                }
                let r = ctx(
                    mount(
                        Some("overlay"),
                        dir.as_path(),
                        Some("overlay"),
                        (flags & !(MsFlags::MS_BIND | MsFlags::MS_REC)) | MsFlags::MS_NODEV,
                        Some(data.as_str()),
                    ),
                    || format!("mounting overlay rootfs ({})", m.options.join(",")),
                );
                if chdir.is_some() {
                    let _ = nix::unistd::chdir("/");
                }
                r?;
            }
            RootfsKind::Bind => {
                let (flags, _, _) = parse_options(&m.options);
                ctx(
                    mount(
                        Some(&m.source),
                        dir,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REC,
                        None::<&str>,
                    ),
                    || format!("bind-mounting rootfs {}", m.source.display()),
                )?;
                if flags.contains(MsFlags::MS_RDONLY) {
                    ctx(
                        mount(
                            None::<&str>,
                            dir,
                            None::<&str>,
                            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                            None::<&str>,
                        ),
                        || "remounting rootfs read-only".into(),
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// A system mount point (`/proc`, `/sys`, `/dev` and those in the fresh
/// /dev): no symlink on the way (runc refuses them too). Followed inside
/// the root, an image's `/proc -> /somewhere` would put procfs where the
/// masked and read-only paths, applied to `/proc/...` after pivot_root,
/// never reach it.
fn open_system_dir(root: &Root, dest: &str) -> Result<OwnedFd> {
    root.open_path(Path::new(dest), Follow::Never)
        .map_err(|e| {
            let source = fs_to_nix(e);
            MountError {
                what: if source == nix::Error::ELOOP {
                    format!(
                        "opening mount point {dest}: the image has a symlink on the way, where the sandbox mounts its own file system"
                    )
                } else {
                    format!("opening mount point {dest}")
                },
                source,
            }
        })
}

/// Mount `typ` on the system mount point `dest` inside the root (see
/// [`open_system_dir`]).
fn mount_at(
    root: &Root,
    dest: &str,
    source: &str,
    typ: &str,
    flags: MsFlags,
    data: &str,
) -> Result<()> {
    let target = open_system_dir(root, dest)?;
    let data = (!data.is_empty()).then_some(data);
    ctx(
        mount(Some(source), &fd_path(&target), Some(typ), flags, data),
        || format!("mounting {typ} on {dest}"),
    )
}

/// Everything between "rootfs mounted" and pivot_root.
pub(crate) fn setup_mounts(cfg: &InitConfig) -> Result<()> {
    let root = ctx(Root::open(&cfg.rootfs_dir).map_err(fs_to_nix), || {
        "opening rootfs".into()
    })?;
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_at(&root, "/proc", "proc", "proc", common, "")?;
    sysfs(&root, common)?;
    let dev_fd = setup_dev(&root, cfg.shm_size)?;
    for m in &cfg.mounts {
        extra_mount(&root, m)?;
    }
    inline_files(&root, &dev_fd, &cfg.inline_files)?;
    nodev_everywhere(root.dir(), &cfg.rootfs_dir)?;
    allowed_devices(&dev_fd)
}

/// A read-only sysfs on /sys. The kernel refuses a new sysfs to a user
/// namespace that does not own the network namespace (a rootless step on
/// the user's network): then the host's /sys is bound (recursively: its
/// submounts are locked to it) and made read-only, nosuid, nodev and
/// noexec all the way down; the masked paths hide the same parts.
fn sysfs(root: &Root, common: MsFlags) -> Result<()> {
    let flags = common | MsFlags::MS_RDONLY;
    match mount_at(root, "/sys", "sysfs", "sysfs", flags, "") {
        Err(e) if e.source == nix::Error::EPERM && kiln_fs::idmap::IdMaps::current().in_userns => {}
        other => return other,
    }
    let target = open_system_dir(root, "/sys")?;
    ctx(
        mount(
            Some("/sys"),
            &fd_path(&target),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
        || "binding the host's /sys (a new sysfs was refused)".into(),
    )?;
    // The descriptor of the mount point is under the new mount: open the
    // mount itself.
    let bound = ctx(open_in_root(root, Path::new("/sys")), || {
        "opening /sys".into()
    })?;
    ctx(
        setattr_recursive(
            &bound,
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        ),
        || "making the bound /sys read-only".into(),
    )
}

/// Docker's default device nodes, bind-mounted from the host.
pub const DEFAULT_DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// The path of the sandbox's /dev tmpfs through its descriptor. The tmpfs
/// is ours and holds only what we put there: plain paths below it are safe.
/// Paths under a magic link are resolved through it: keep the fd open.
fn dev_path(dev_fd: &Dir) -> PathBuf {
    fd_path(dev_fd)
}

/// /dev, first part: a `nodev` tmpfs with empty mount points for the
/// allowed nodes, shm, mqueue, the pts directory and the standard links.
/// Returns a descriptor of the tmpfs.
fn setup_dev(root: &Root, shm_size: Option<u64>) -> Result<Dir> {
    mount_at(
        root,
        "/dev",
        "tmpfs",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_STRICTATIME,
        "mode=755,size=65536k",
    )?;
    let dev_fd = ctx(
        root.open_dir("/dev", Follow::InRoot).map_err(fs_to_nix),
        || "opening /dev".into(),
    )?;
    let dev = dev_path(&dev_fd);
    for name in DEFAULT_DEVICES {
        ctx(
            dev_fd
                .create_file(name, 0o666, Create::Exclusive)
                .map(drop)
                .map_err(fs_to_nix),
            || format!("creating /dev/{name}"),
        )?;
    }
    for (d, mode) in [("pts", 0o755), ("shm", 0o1777), ("mqueue", 0o755)] {
        ctx(
            match dev_fd.mkdir(d, mode) {
                Ok(true) => Ok(()),
                Ok(false) => Err(nix::Error::EEXIST),
                Err(e) => Err(fs_to_nix(e)),
            },
            || format!("creating /dev/{d}"),
        )?;
    }
    let nsx = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    ctx(
        mount(
            Some("shm"),
            &dev.join("shm"),
            Some("tmpfs"),
            nsx | MsFlags::MS_NODEV,
            Some(
                match shm_size {
                    Some(n) => format!("mode=1777,size={n}"),
                    None => "mode=1777,size=65536k".to_string(),
                }
                .as_str(),
            ),
        ),
        || "mounting tmpfs on /dev/shm".into(),
    )?;
    ctx(
        mount(
            Some("mqueue"),
            &dev.join("mqueue"),
            Some("mqueue"),
            nsx | MsFlags::MS_NODEV,
            None::<&str>,
        ),
        || "mounting mqueue on /dev/mqueue".into(),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        ctx(dev_fd.symlink(link, target).map_err(fs_to_nix), || {
            format!("creating /dev/{link}")
        })?;
    }
    Ok(dev_fd)
}

/// /dev, last part (after [`nodev_everywhere`]): the allowed host nodes
/// bound onto their mount points (a bind keeps the host /dev mount's
/// `dev` flag) and a fresh devpts (ptmx and the pty slaves).
fn allowed_devices(dev_fd: &Dir) -> Result<()> {
    let dev = dev_path(dev_fd);
    for name in DEFAULT_DEVICES {
        let host = Path::new("/dev").join(name);
        ctx(
            mount(
                Some(&host),
                &dev.join(name),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
            || format!("binding /dev/{name}"),
        )?;
    }
    ctx(
        mount(
            Some("devpts"),
            &dev.join("pts"),
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            // gid 5 (tty) owns the slaves, where it exists (a one-id
            // rootless map has only 0).
            Some(if kiln_fs::idmap::IdMaps::current().maps_gid(5) {
                "newinstance,ptmxmode=0666,mode=0620,gid=5"
            } else {
                "newinstance,ptmxmode=0666,mode=0620"
            }),
        ),
        || "mounting devpts on /dev/pts".into(),
    )
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
pub(crate) struct MountAttr {
    pub(crate) attr_set: u64,
    pub(crate) attr_clr: u64,
    pub(crate) propagation: u64,
    pub(crate) userns_fd: u64,
}

pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const AT_RECURSIVE: libc::c_int = 0x8000;

/// `mount_setattr(fd, "", AT_EMPTY_PATH | flags, attr)` (Linux 5.12).
pub(crate) fn mount_setattr(
    fd: &impl AsRawFd,
    flags: libc::c_uint,
    attr: &MountAttr,
) -> nix::Result<()> {
    // SAFETY: a valid descriptor, an empty NUL-terminated path and an
    // attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | flags,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::Error::last())
    }
}

/// `open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | O_CLOEXEC | flags)`: a
/// detached copy of the mount at `path`.
pub(crate) fn open_tree_clone(path: &Path, flags: libc::c_uint) -> nix::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| nix::Error::EINVAL)?;
    // SAFETY: a NUL-terminated path and open_tree(2)'s flags.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | flags,
        )
    };
    if fd < 0 {
        return Err(nix::Error::last());
    }
    // SAFETY: a new descriptor open_tree returned, owned from here.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as libc::c_int) })
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE)` setting `set`
/// on the mount `fd` is on and every mount below it (Linux 5.12).
fn setattr_recursive(fd: &impl AsRawFd, set: u64) -> nix::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    mount_setattr(fd, AT_RECURSIVE as libc::c_uint, &attr)
}

/// Make every mount at and below the root `nodev`, keeping their other
/// flags: `mount_setattr(AT_RECURSIVE)` (Linux 5.12), else a remount of
/// each mount listed under `dir` in /proc/self/mountinfo.
pub(crate) fn nodev_everywhere(root: &impl AsRawFd, dir: &Path) -> Result<()> {
    let Err(e) = setattr_recursive(root, MOUNT_ATTR_NODEV) else {
        return Ok(());
    };
    if e != nix::Error::ENOSYS {
        return Err(MountError {
            what: "making the sandbox's mounts nodev".into(),
            source: e,
        });
    }
    let dir = absolute(dir);
    let info = ctx(
        std::fs::read_to_string("/proc/self/mountinfo").map_err(io_to_nix),
        || "reading mountinfo".into(),
    )?;
    for line in info.lines() {
        let Some(mp) = line.split(' ').nth(4).map(unescape_mountinfo) else {
            continue;
        };
        let mp = PathBuf::from(mp);
        if !mp.starts_with(&dir) {
            continue;
        }
        let keep = statvfs_flags_of(&mp, true);
        ctx(
            mount(
                None::<&str>,
                &mp,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NODEV | keep,
                None::<&str>,
            ),
            || format!("remounting {} nodev", mp.display()),
        )?;
    }
    Ok(())
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// Name of the staging directory for inline files inside the /dev tmpfs.
const INLINE_STAGE: &str = ".kiln-inline";

/// Place inline files (build secrets): a tmpfs mounted in the sandbox's
/// own mount namespace only (under its /dev tmpfs) holds them; each is
/// bound read-only, nosuid, nodev, noexec onto its target, then the staging
/// mount is detached and its directory removed. The host never sees a
/// file, so nothing is left to clean whatever happens to kiln.
fn inline_files(root: &Root, dev_fd: &Dir, files: &[InlineFile]) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let stage = dev_path(dev_fd).join(INLINE_STAGE);
    ctx(
        match dev_fd.mkdir(INLINE_STAGE, 0o700) {
            Ok(true) => Ok(()),
            Ok(false) => Err(nix::Error::EEXIST),
            Err(e) => Err(fs_to_nix(e)),
        },
        || "creating the inline-file staging directory".into(),
    )?;
    let bytes: usize = files.iter().map(|f| f.contents.len() + 4096).sum();
    let size = format!(
        "mode=0700,size={},nr_inodes={}",
        bytes + 4096,
        files.len() + 8
    );
    ctx(
        mount(
            Some("tmpfs"),
            &stage,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(size.as_str()),
        ),
        || "mounting the inline-file staging tmpfs".into(),
    )?;
    let placed = place_inline_files(root, &stage, files);
    let detached = ctx(umount2(&stage, MntFlags::MNT_DETACH), || {
        "detaching the inline-file staging tmpfs".into()
    });
    let removed = ctx(dev_fd.remove(INLINE_STAGE).map_err(fs_to_nix), || {
        "removing the inline-file staging directory".into()
    });
    placed.and(detached).and(removed)
}

fn place_inline_files(root: &Root, stage: &Path, files: &[InlineFile]) -> Result<()> {
    use std::io::Write;
    // The staging tmpfs was just mounted and holds only what is made here.
    let stage_dir = ctx(Root::open(stage).map_err(fs_to_nix), || {
        "opening the inline-file staging directory".into()
    })?;
    for (i, f) in files.iter().enumerate() {
        let dest = f.destination.display().to_string();
        let p = stage.join(i.to_string());
        let mut file = ctx(
            stage_dir
                .dir()
                .create_file(i.to_string(), 0o600, Create::Exclusive)
                .map_err(fs_to_nix),
            || format!("creating the file for {dest}"),
        )?;
        ctx(file.write_all(&f.contents).map_err(io_to_nix), || {
            format!("writing the file for {dest}")
        })?;
        // Owner first: chown clears set-id bits that fchmod then sets.
        ctx(
            nix::unistd::fchown(
                &file,
                Some(nix::unistd::Uid::from_raw(f.uid)),
                Some(nix::unistd::Gid::from_raw(f.gid)),
            ),
            || format!("chown of {dest}"),
        )?;
        ctx(
            nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(f.mode & 0o7777)),
            || format!("chmod of {dest}"),
        )?;
        drop(file);
        let target = ctx(open_in_root(root, &f.destination), || {
            format!("opening mount point {dest}")
        })?;
        check_mount_point(root, &target, &dest)?;
        ctx(
            bind_onto(
                root,
                &f.destination,
                &p,
                &target,
                false,
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                MsFlags::empty(),
            ),
            || format!("binding the file read-only onto {dest}"),
        )?;
    }
    Ok(())
}

pub(crate) const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
const MOUNT_ATTR_ATIME_MASK: u64 = 0x70;
const MOUNT_ATTR_NODIRATIME: u64 = 0x80;

/// `extra` mount flags as mount_setattr(2)'s (set, clear); `None` for a
/// flag it has no attribute for.
fn mount_attrs(extra: MsFlags) -> Option<(u64, u64)> {
    let mut set = 0;
    let mut clr = 0;
    for (f, a) in [
        (MsFlags::MS_RDONLY, MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, MOUNT_ATTR_NOEXEC),
        (MsFlags::MS_NODIRATIME, MOUNT_ATTR_NODIRATIME),
    ] {
        if extra.contains(f) {
            set |= a;
        }
    }
    for (f, a) in [
        (MsFlags::MS_NOATIME, MOUNT_ATTR_NOATIME),
        (MsFlags::MS_STRICTATIME, MOUNT_ATTR_STRICTATIME),
        (MsFlags::MS_RELATIME, 0),
    ] {
        if extra.contains(f) {
            set |= a;
            clr |= MOUNT_ATTR_ATIME_MASK;
        }
    }
    let known = MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC
        | MsFlags::MS_NODIRATIME
        | MsFlags::MS_NOATIME
        | MsFlags::MS_STRICTATIME
        | MsFlags::MS_RELATIME;
    (extra & !known).is_empty().then_some((set, clr))
}

/// Binds `source` onto the mount point `target` (a descriptor opened in
/// the rootfs) with the `extra` flags and `prop` propagation set on the
/// new mount before it is attached (`open_tree`, `mount_setattr`,
/// `move_mount`; Linux 5.12): nothing is looked up again once it is
/// there. A remount by path after a plain bind re-resolved the
/// destination: through a symlink to `/` it named the rootfs below the
/// bind (which stayed writable: a layer of the store, written by the
/// step), or it walked through the new mount's own symlinks to another
/// one. Where the calls are missing, the bind and remount of old, with
/// the remounted path checked to be the bound source.
fn bind_onto(
    root: &Root,
    destination: &Path,
    source: &Path,
    target: &OwnedFd,
    rec: bool,
    extra: MsFlags,
    prop: MsFlags,
) -> nix::Result<()> {
    let recursive = if rec { AT_RECURSIVE as libc::c_uint } else { 0 };
    let tree = match open_tree_clone(source, recursive) {
        Ok(t) => t,
        Err(nix::Error::ENOSYS) => {
            return bind_then_remount(root, destination, source, target, rec, extra, prop)
        }
        Err(e) => return Err(e),
    };
    let (set, clr) = mount_attrs(extra).ok_or(nix::Error::EINVAL)?;
    let propagation = (prop & (MsFlags::MS_PRIVATE | MsFlags::MS_SLAVE)).bits();
    if set != 0 || clr != 0 || propagation != 0 {
        let all = if rec || prop.contains(MsFlags::MS_REC) {
            AT_RECURSIVE as libc::c_uint
        } else {
            0
        };
        mount_setattr(
            &tree,
            all,
            &MountAttr {
                attr_set: set,
                attr_clr: clr,
                propagation,
                userns_fd: 0,
            },
        )?;
    }
    // SAFETY: two valid descriptors and empty NUL-terminated paths.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(nix::Error::last());
    }
    Ok(())
}

/// [`bind_onto`] on a kernel without the new mount calls: bind, then
/// remount the destination by path — once it is checked to be the source
/// just bound (same device and inode), never another mount.
fn bind_then_remount(
    root: &Root,
    destination: &Path,
    source: &Path,
    target: &OwnedFd,
    rec: bool,
    extra: MsFlags,
    prop: MsFlags,
) -> nix::Result<()> {
    let bind = if rec {
        MsFlags::MS_BIND | MsFlags::MS_REC
    } else {
        MsFlags::MS_BIND
    };
    mount(
        Some(source),
        &fd_path(target),
        None::<&str>,
        bind,
        None::<&str>,
    )?;
    if extra.is_empty() && prop.is_empty() {
        return Ok(());
    }
    let want = nix::sys::stat::stat(source)?;
    let now = open_in_root(root, destination)?;
    let got = nix::sys::stat::fstat(&now)?;
    if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino) {
        return Err(nix::Error::EXDEV);
    }
    if !extra.is_empty() {
        mount(
            None::<&str>,
            &fd_path(&now),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
            None::<&str>,
        )?;
    }
    if !prop.is_empty() {
        mount(
            None::<&str>,
            &fd_path(&now),
            None::<&str>,
            prop,
            None::<&str>,
        )?;
    }
    Ok(())
}

/// Refuses a mount point that is the rootfs itself or inside the
/// sandbox's sysfs (a destination that reached them through a symlink:
/// the step would replace its whole filesystem, or what the kernel's
/// files say).
fn check_mount_point(root: &Root, target: &OwnedFd, dest: &str) -> Result<()> {
    let top = ctx(root.dir().stat_self().map_err(fs_to_nix), || {
        "stat of the rootfs".into()
    })?;
    let t = ctx(nix::sys::stat::fstat(target), || format!("stat of {dest}"))?;
    if (t.st_dev as u64, t.st_ino as u64) == (top.dev(), top.ino()) {
        return Err(MountError {
            what: format!("mounting on {dest}: the destination is the root of the filesystem"),
            source: nix::Error::EPERM,
        });
    }
    // Nothing is mounted inside the sandbox's procfs or sysfs, whichever
    // path led there (`/proc/sys/kernel`, a symlink to it): the step would
    // choose what the kernel files it and its init read say (runc refuses
    // these too, but for a short list of lxcfs-style files).
    let fs = nix::sys::statfs::fstatfs(target).map(|f| f.filesystem_type());
    for (magic, name) in [
        (nix::sys::statfs::PROC_SUPER_MAGIC, "/proc"),
        (nix::sys::statfs::SYSFS_MAGIC, "/sys"),
    ] {
        if fs.is_ok_and(|t| t == magic) {
            return Err(MountError {
                what: format!("mounting on {dest}: the destination is inside {name}"),
                source: nix::Error::EPERM,
            });
        }
    }
    Ok(())
}

fn io_to_nix(e: std::io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// One mount from the spec (or a provided file such as /etc/resolv.conf).
fn extra_mount(root: &Root, m: &MountEntry) -> Result<()> {
    let dest = m.destination.to_string_lossy().into_owned();
    let (flags, prop, data) = parse_options(&m.options);
    // Under /dev (the sandbox's own fresh tmpfs, which never reaches a
    // layer) a missing mount point is created, e.g. /dev/pipes/NAME for a
    // RUN heredoc script: by descriptor, inside the tmpfs.
    let comps = kiln_fs::clean_components(&m.destination);
    if comps.len() > 1 && comps[0] == "dev" {
        let dev = ctx(
            root.open_dir("/dev", Follow::InRoot).map_err(fs_to_nix),
            || "opening /dev".into(),
        )?;
        let rest: PathBuf = comps[1..].iter().collect();
        ctx(
            crate::run::make_mount_point(
                &Root::from_dir(dev),
                &rest,
                m.source.is_dir(),
                &mut |_| Ok(()),
            )
            .map(drop)
            .map_err(fs_to_nix),
            || format!("creating the mount point {dest}"),
        )?;
    }
    let target = ctx(open_in_root(root, &m.destination), || {
        format!("opening mount point {dest}")
    })?;
    check_mount_point(root, &target, &dest)?;
    let tp = fd_path(&target);
    if flags.contains(MsFlags::MS_BIND) {
        // Its options (`ro` above all) set before it is attached.
        let extra = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        return ctx(
            bind_onto(
                root,
                &m.destination,
                &m.source,
                &target,
                flags.contains(MsFlags::MS_REC),
                extra,
                prop,
            ),
            || {
                format!(
                    "bind-mounting {} on {dest} ({})",
                    m.source.display(),
                    m.options.join(",")
                )
            },
        );
    } else {
        let data = (!data.is_empty()).then_some(data.as_str());
        ctx(
            mount(Some(&m.source), &tp, Some(m.typ.as_str()), flags, data),
            || format!("mounting {} on {dest}", m.typ),
        )?;
    }
    if !prop.is_empty() {
        let target = ctx(open_in_root(root, &m.destination), || {
            format!("opening mount point {dest}")
        })?;
        ctx(
            mount(
                None::<&str>,
                &fd_path(&target),
                None::<&str>,
                prop,
                None::<&str>,
            ),
            || format!("setting propagation of {dest}"),
        )?;
    }
    Ok(())
}

/// Make `dir` the root: pivot_root and detach the old root.
pub(crate) fn pivot(dir: &Path) -> Result<()> {
    ctx(nix::unistd::chdir(dir), || "chdir to rootfs".into())?;
    ctx(nix::unistd::pivot_root(".", "."), || "pivot_root".into())?;
    // The old root is now stacked under the new one: make sure nothing
    // propagates back to the host, then detach it.
    ctx(
        mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        ),
        || "making old root rslave".into(),
    )?;
    ctx(umount2(".", MntFlags::MNT_DETACH), || {
        "detaching old root".into()
    })?;
    ctx(nix::unistd::chdir("/"), || "chdir /".into())
}

/// Mask paths (after pivot_root): /dev/null over files, read-only tmpfs over
/// directories. Missing paths are skipped.
pub(crate) fn mask_paths(paths: &[String]) -> Result<()> {
    for p in paths {
        let meta = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(_) => continue,
        };
        let r = if meta.is_dir() {
            mount(
                Some("tmpfs"),
                p.as_str(),
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            )
        } else {
            mount(
                Some("/dev/null"),
                p.as_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        };
        ctx(r, || format!("masking {p}"))?;
    }
    Ok(())
}

/// Make paths read-only (bind onto themselves, remount ro). Missing paths
/// are skipped.
pub(crate) fn readonly_paths(paths: &[String]) -> Result<()> {
    for p in paths {
        if std::fs::symlink_metadata(p).is_err() {
            continue;
        }
        ctx(
            mount(
                Some(p.as_str()),
                p.as_str(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            ),
            || format!("binding {p} read-only"),
        )?;
        let keep = statvfs_flags(p);
        ctx(
            mount(
                None::<&str>,
                p.as_str(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep,
                None::<&str>,
            ),
            || format!("remounting {p} read-only"),
        )?;
    }
    Ok(())
}

/// Remount / read-only (spec.root.readonly).
pub(crate) fn readonly_root() -> Result<()> {
    let keep = statvfs_flags("/");
    ctx(
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep,
            None::<&str>,
        ),
        || "remounting / read-only".into(),
    )
}

/// The nosuid/nodev/noexec flags a mount already has (they are locked on
/// remount).
fn statvfs_flags(p: &str) -> MsFlags {
    statvfs_flags_of(Path::new(p), false)
}

/// As [`statvfs_flags`], with `ro` too when `rdonly`.
fn statvfs_flags_of(p: &Path, rdonly: bool) -> MsFlags {
    let Ok(c) = CString::new(p.as_os_str().as_encoded_bytes()) else {
        return MsFlags::empty();
    };
    // SAFETY: valid C string, zeroed out-struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return MsFlags::empty();
    }
    let mut f = MsFlags::empty();
    if st.f_flag & libc::ST_NOSUID != 0 {
        f |= MsFlags::MS_NOSUID;
    }
    if st.f_flag & libc::ST_NODEV != 0 {
        f |= MsFlags::MS_NODEV;
    }
    if st.f_flag & libc::ST_NOEXEC != 0 {
        f |= MsFlags::MS_NOEXEC;
    }
    if rdonly && st.f_flag & libc::ST_RDONLY != 0 {
        f |= MsFlags::MS_RDONLY;
    }
    f
}

#[cfg(test)]
mod compact_tests {
    use super::*;

    #[test]
    fn deep_stacks_fit_in_a_page() {
        let lowers: Vec<String> = (0..500)
            .map(|i| format!("/var/lib/kiln/l/L{i:05}"))
            .collect();
        let data = format!(
            "lowerdir=/tmp/stub:{},upperdir=/u,workdir=/w",
            lowers.join(":")
        );
        assert!(data.len() > PAGE);
        let (dir, short) = compact_overlay_data(&data);
        assert_eq!(dir.as_deref(), Some(Path::new("/var/lib/kiln/l")));
        assert!(short.len() < PAGE, "{}", short.len());
        assert!(short.starts_with("lowerdir=/tmp/stub:L00000:L00001"));
        assert!(short.ends_with(",upperdir=/u,workdir=/w"));
        let small = "lowerdir=/a:/b,upperdir=/u,workdir=/w";
        assert_eq!(compact_overlay_data(small), (None, small.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_like_runc() {
        let o: Vec<String> = ["rbind", "ro", "nosuid", "rprivate", "size=1m"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (f, p, d) = parse_options(&o);
        assert!(f.contains(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY));
        assert!(f.contains(MsFlags::MS_NOSUID));
        assert_eq!(p, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(d, "size=1m");
    }
}
