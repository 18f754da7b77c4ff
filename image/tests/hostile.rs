//! Hostile layer tars: nothing outside the root may be created, modified or
//! removed. Each case either fails with an error or is confined to the root.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kiln_image::apply::{apply_layer, WhiteoutMode};

enum E<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

/// Build a tar with raw headers (no path validation by the tar crate).
fn hostile_tar(entries: &[E<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_ustar();
        let (name, kind, link, data): (&str, tar::EntryType, &str, &[u8]) = match e {
            E::File(n, d) => (n, tar::EntryType::Regular, "", d),
            E::Dir(n) => (n, tar::EntryType::Directory, "", b""),
            E::Symlink(n, t) => (n, tar::EntryType::Symlink, t, b""),
            E::Hardlink(n, t) => (n, tar::EntryType::Link, t, b""),
        };
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

struct Arena {
    _t: tempfile::TempDir,
    base: std::path::PathBuf,
}

impl Arena {
    /// base/ holds: sentinel/keep, sentinel/sub/deep, and root dirs
    /// base/r/<case>/root, so `../../..` from a root lands in base/.
    fn new() -> Arena {
        let t = tempfile::tempdir().expect("tmp");
        let base = t.path().to_path_buf();
        fs::create_dir_all(base.join("sentinel/sub")).expect("mkdir");
        fs::write(base.join("sentinel/keep"), b"keep").expect("w");
        fs::write(base.join("sentinel/sub/deep"), b"deep").expect("w");
        Arena { _t: t, base }
    }
    fn outside_state(&self) -> Vec<(String, u64, u64, Vec<u8>)> {
        let mut v = Vec::new();
        collect(&self.base, &self.base, &mut v);
        v
    }
}

fn collect(base: &Path, dir: &Path, out: &mut Vec<(String, u64, u64, Vec<u8>)>) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("e").path())
        .collect();
    names.sort();
    for p in names {
        let rel = p.strip_prefix(base).expect("rel").display().to_string();
        if rel.starts_with("r/") && rel.matches('/').count() >= 2 {
            continue; // inside some root
        }
        let md = fs::symlink_metadata(&p).expect("lstat");
        let content = if md.is_file() {
            fs::read(&p).expect("read")
        } else {
            Vec::new()
        };
        out.push((rel, md.mode() as u64, md.nlink(), content));
        if md.is_dir() {
            collect(base, &p, out);
        }
    }
}

fn run_case(name: &str, entries: &[E<'_>], mode: WhiteoutMode) -> (Arena, Result<(), String>) {
    let a = Arena::new();
    let root = a.base.join("r").join(name).join("root");
    fs::create_dir_all(&root).expect("mkdir root");
    let before = a.outside_state();
    let passwd_before = fs::metadata("/etc/passwd")
        .map(|m| (m.nlink(), m.mtime()))
        .ok();
    let r = apply_layer(&hostile_tar(entries)[..], &root, mode)
        .map(|_| ())
        .map_err(|e| e.to_string());
    assert_eq!(
        a.outside_state(),
        before,
        "case {name}: something outside the root changed ({r:?})"
    );
    assert_eq!(
        fs::metadata("/etc/passwd")
            .map(|m| (m.nlink(), m.mtime()))
            .ok(),
        passwd_before,
        "case {name}: /etc/passwd touched"
    );
    (a, r)
}

fn root_of(a: &Arena, name: &str) -> std::path::PathBuf {
    a.base.join("r").join(name).join("root")
}

#[test]
fn dotdot_names_are_rejected() {
    for mode in [WhiteoutMode::Delete, WhiteoutMode::Overlay] {
        let (_, r) = run_case("dotdot", &[E::File("../../../sentinel/evil", b"x")], mode);
        assert!(r.is_err_and(|e| e.contains("unsafe path")));
        let (_, r) = run_case("dotdot2", &[E::Dir("a"), E::File("a/../../x", b"x")], mode);
        assert!(r.is_err());
    }
}

#[test]
fn absolute_names_are_confined() {
    let (a, r) = run_case("abs", &[E::File("/abs/x", b"x")], WhiteoutMode::Delete);
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(
        fs::read(root_of(&a, "abs").join("abs/x")).expect("confined"),
        b"x"
    );
}

#[test]
fn symlink_to_root_then_write_through_it_is_confined() {
    let (a, r) = run_case(
        "sym-root",
        &[E::Symlink("a", "/"), E::File("a/escape", b"x")],
        WhiteoutMode::Delete,
    );
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(
        fs::read(root_of(&a, "sym-root").join("escape")).expect("confined"),
        b"x"
    );
    let (a, r) = run_case(
        "sym-up",
        &[
            E::Symlink("a", "../../../.."),
            E::Dir("a/sentinel"),
            E::File("a/sentinel/evil", b"x"),
        ],
        WhiteoutMode::Delete,
    );
    assert!(r.is_ok(), "{r:?}");
    assert!(root_of(&a, "sym-up").join("sentinel/evil").exists());
}

#[test]
fn symlink_to_host_dir_then_file_through_it() {
    let a = Arena::new();
    let host = a.base.join("sentinel");
    let host = host.to_str().expect("utf8").to_string();
    drop(a);
    for mode in [WhiteoutMode::Delete, WhiteoutMode::Overlay] {
        // absolute host path as the link target: resolves inside the root
        // (where it does not exist) -> error or confined, never the host dir
        let (_, _r) = run_case(
            "sym-host",
            &[E::Symlink("d", &host), E::File("d/newfile", b"x")],
            mode,
        );
        let (_, _r) = run_case(
            "sym-rel",
            &[
                E::Symlink("d", "../../../sentinel"),
                E::File("d/keep", b"pwned"),
            ],
            mode,
        );
    }
}

#[test]
fn whiteouts_through_symlinks_do_not_delete_outside() {
    for mode in [WhiteoutMode::Delete, WhiteoutMode::Overlay] {
        let (_, _r) = run_case(
            "wh-sym",
            &[
                E::Symlink("s", "../../../sentinel"),
                E::File("s/.wh.keep", b""),
                E::File("s/.wh.sub", b""),
            ],
            mode,
        );
        let (_, _r) = run_case(
            "opq-sym",
            &[
                E::Symlink("s", "../../../sentinel"),
                E::File("s/.wh..wh..opq", b""),
            ],
            mode,
        );
        let (_, r) = run_case("wh-dotdot", &[E::File(".wh..", b"")], mode);
        assert!(r.is_err());
        let (_, r) = run_case("wh-up", &[E::File("../.wh.sentinel", b"")], mode);
        assert!(r.is_err());
    }
}

#[test]
fn hardlinks_out_of_the_root_fail() {
    let (_, r) = run_case(
        "hl-abs",
        &[E::Hardlink("pw", "/etc/passwd")],
        WhiteoutMode::Delete,
    );
    assert!(r.is_err(), "no etc/passwd inside the root: {r:?}");
    let (_, r) = run_case(
        "hl-up",
        &[E::Hardlink("o", "../outside")],
        WhiteoutMode::Delete,
    );
    assert!(r.is_err_and(|e| e.contains("unsafe path")));
    let (_, r) = run_case(
        "hl-deep",
        &[E::Hardlink("o", "../../../sentinel/keep")],
        WhiteoutMode::Delete,
    );
    assert!(r.is_err());
    // a hardlink through a symlinked dir resolves inside the root
    let (_, r) = run_case(
        "hl-sym",
        &[E::Symlink("s", "/"), E::Hardlink("o", "s/etc/passwd")],
        WhiteoutMode::Delete,
    );
    assert!(r.is_err());
}

#[test]
fn symlink_then_overwrite_replaces_the_link_not_its_target() {
    let a = Arena::new();
    let keep = a.base.join("sentinel/keep");
    let keep = keep.to_str().expect("utf8").to_string();
    drop(a);
    let (a, r) = run_case(
        "sym-over",
        &[
            E::Symlink("f", &keep),
            E::Symlink("g", "../../../sentinel/keep"),
            E::File("f", b"new"),
            E::File("g", b"new"),
        ],
        WhiteoutMode::Delete,
    );
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(
        fs::read(root_of(&a, "sym-over").join("f")).expect("f"),
        b"new"
    );
    let (_, r) = run_case(
        "hl-to-sym",
        &[
            E::Symlink("g", "../../../sentinel/keep"),
            E::Hardlink("h", "g"),
            E::File("h", b"pwned"),
        ],
        WhiteoutMode::Delete,
    );
    assert!(r.is_ok(), "{r:?}");
}
