//! Shared helpers: build trees with every kind of entry, snapshot trees for
//! comparison, mount overlays.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A v2 `security.capability` value granting CAP_NET_BIND_SERVICE.
pub const CAP_NET_BIND: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Node {
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Option<i64>,
    pub content: Option<Vec<u8>>,
    pub rdev: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub nlink_group: Option<u64>,
}

/// Everything comparable about a tree below `root` (root itself excluded).
/// Directory mtimes are compared too unless `dir_mtimes` is false; all
/// mtimes at second precision (tar's).
pub fn snapshot(root: &Path, dir_mtimes: bool) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, dir_mtimes, &mut out);
    // hardlink groups: replace inode numbers by the first path's index
    out
}

fn walk(root: &Path, dir: &Path, dir_mtimes: bool, out: &mut BTreeMap<PathBuf, Node>) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    for n in names {
        let p = dir.join(&n);
        let md = fs::symlink_metadata(&p).expect("lstat");
        let ft = md.file_type();
        let (kind, content) = if ft.is_dir() {
            ("dir", None)
        } else if ft.is_symlink() {
            (
                "symlink",
                Some(
                    fs::read_link(&p)
                        .expect("readlink")
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                ),
            )
        } else if ft.is_file() {
            ("file", Some(fs::read(&p).expect("read")))
        } else if ft.is_char_device() {
            ("char", None)
        } else if ft.is_block_device() {
            ("block", None)
        } else if ft.is_fifo() {
            ("fifo", None)
        } else {
            ("other", None)
        };
        let mut xattrs = Vec::new();
        if !ft.is_symlink() {
            for k in xattr::list(&p).expect("listxattr") {
                let ks = k.to_string_lossy().into_owned();
                if ks.starts_with("trusted.overlay.")
                    || ks.starts_with("user.overlay.")
                    || ks == "security.selinux"
                {
                    continue;
                }
                let v = xattr::get(&p, &k).expect("getxattr").unwrap_or_default();
                xattrs.push((ks, v));
            }
        }
        xattrs.sort();
        let rel = p.strip_prefix(root).expect("prefix").to_path_buf();
        let mtime = if ft.is_dir() && !dir_mtimes {
            None
        } else {
            Some(md.mtime())
        };
        out.insert(
            rel,
            Node {
                kind: kind.to_string(),
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime,
                content,
                rdev: if ft.is_char_device() || ft.is_block_device() {
                    md.rdev()
                } else {
                    0
                },
                xattrs,
                nlink_group: if ft.is_file() && md.nlink() > 1 {
                    Some(md.nlink())
                } else {
                    None
                },
            },
        );
        if ft.is_dir() {
            walk(root, &p, dir_mtimes, out);
        }
    }
}

pub fn assert_same_tree(a: &Path, b: &Path, dir_mtimes: bool) {
    let sa = snapshot(a, dir_mtimes);
    let sb = snapshot(b, dir_mtimes);
    let ka: Vec<_> = sa.keys().collect();
    let kb: Vec<_> = sb.keys().collect();
    assert_eq!(ka, kb, "same names in {} and {}", a.display(), b.display());
    for (k, va) in &sa {
        assert_eq!(Some(va), sb.get(k), "entry {}", k.display());
    }
}

pub fn mknod(p: &Path, kind: libc::mode_t, mode: libc::mode_t, dev: libc::dev_t) {
    let c = CString::new(p.as_os_str().as_bytes()).expect("cstring");
    // SAFETY: valid C string.
    let r = unsafe { libc::mknod(c.as_ptr(), kind | mode, dev) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).expect("lchown");
}

pub fn set_mtime(p: &Path, secs: i64) {
    let c = CString::new(p.as_os_str().as_bytes()).expect("cstring");
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: valid C string and array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

pub fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A tree with one of everything.
pub fn build_rich_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/sub")).expect("mkdir");
    fs::write(root.join("etc/hosts"), b"127.0.0.1 localhost\n").expect("write");
    fs::write(root.join("etc/empty"), b"").expect("write");
    fs::write(root.join("bin-suid"), b"#!/bin/sh\n").expect("write");
    chmod(&root.join("bin-suid"), 0o4755);
    fs::write(root.join("sgid"), b"g").expect("write");
    chmod(&root.join("sgid"), 0o2711);
    fs::create_dir(root.join("tmp")).expect("mkdir");
    chmod(&root.join("tmp"), 0o1777);
    fs::write(root.join("owned"), b"owned by 1000:2000").expect("write");
    lchown(&root.join("owned"), 1000, 2000);
    fs::write(root.join("big"), vec![7u8; 300_000]).expect("write");
    fs::write(root.join("cap"), b"ping").expect("write");
    xattr::set(root.join("cap"), "security.capability", &CAP_NET_BIND).expect("setcap");
    fs::write(root.join("ux"), b"user xattr").expect("write");
    xattr::set(root.join("ux"), "user.comment", b"hello\0bin").expect("user xattr");
    xattr::set(root.join("etc/sub"), "user.dirattr", b"d").expect("dir xattr");
    fs::write(root.join("hl1"), b"linked").expect("write");
    fs::hard_link(root.join("hl1"), root.join("etc/hl2")).expect("link");
    symlink("etc/hosts", root.join("sym")).expect("symlink");
    symlink("/nonexistent/dangling", root.join("dangling")).expect("symlink");
    lchown(&root.join("dangling"), 5, 6);
    mknod(
        &root.join("null"),
        libc::S_IFCHR,
        0o666,
        libc::makedev(1, 3),
    );
    mknod(
        &root.join("loop9"),
        libc::S_IFBLK,
        0o660,
        libc::makedev(7, 9),
    );
    mknod(&root.join("fifo"), libc::S_IFIFO, 0o640, 0);
    let long_dir = root.join("l".repeat(90)).join("m".repeat(90));
    fs::create_dir_all(&long_dir).expect("mkdir long");
    fs::write(long_dir.join("n".repeat(200)), b"long").expect("write long");
    symlink("t".repeat(180), root.join("longlink")).expect("symlink");
    // fixed mtimes everywhere, directories last
    let mut all: Vec<PathBuf> = snapshot(root, true).keys().cloned().collect();
    all.reverse();
    for (i, p) in all.iter().enumerate() {
        set_mtime(&root.join(p), 1_600_000_000 + i as i64);
    }
}

/// An overlay mount that is unmounted when dropped.
pub struct Overlay {
    pub merged: PathBuf,
}

impl Overlay {
    pub fn mount(
        lower: &Path,
        upper: &Path,
        work: &Path,
        merged: &Path,
    ) -> std::io::Result<Overlay> {
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            merged,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(std::io::Error::from)?;
        Ok(Overlay {
            merged: merged.to_path_buf(),
        })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.merged, nix::mount::MntFlags::MNT_DETACH);
    }
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
