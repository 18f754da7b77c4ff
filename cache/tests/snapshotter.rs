//! The snapshotter conformance suite: one generic test body run against
//! every implementation (overlay and native), with real mounts in a
//! test-private mount namespace.

mod common;

use std::path::Path;

use common::{mount_all, private_mount_ns, require_root};
use kiln_cache::{Error, Kind, Snapshotter, SnapshotterKind, Store, StoreOptions};

fn store(dir: &Path, kind: SnapshotterKind) -> Store {
    Store::open_with(dir, StoreOptions { snapshotter: kind }).expect("open store")
}

/// The shared suite.
fn conformance(sn: &dyn Snapshotter, scratch: &Path) {
    // --- prepare / write / commit
    let m = sn.prepare("a", None).expect("prepare a");
    assert_eq!(sn.stat("a").unwrap().kind, Kind::Active);
    assert_eq!(
        sn.mounts("a").unwrap(),
        m,
        "mounts() repeats prepare's answer"
    );
    {
        let _mnt = mount_all(&m, &scratch.join("a"));
        std::fs::write(scratch.join("a/base.txt"), "base").unwrap();
        std::fs::create_dir(scratch.join("a/dir")).unwrap();
        std::fs::write(scratch.join("a/dir/gone.txt"), "to delete").unwrap();
    }
    sn.commit("A", "a").expect("commit");
    assert!(
        matches!(sn.stat("a"), Err(Error::NotFound { .. })),
        "active key gone after commit"
    );
    let a = sn.stat("A").unwrap();
    assert_eq!(a.kind, Kind::Committed);
    assert!(sn.usage("A").unwrap().size > 0);
    assert!(sn.usage("A").unwrap().inodes >= 3);

    // --- invalid transitions
    assert!(
        matches!(sn.commit("X", "A"), Err(Error::InvalidState(_))),
        "commit of a committed snapshot"
    );
    assert!(matches!(
        sn.prepare("A", None),
        Err(Error::AlreadyExists { .. })
    ));
    assert!(matches!(
        sn.prepare("n", Some("missing")),
        Err(Error::NotFound { .. })
    ));
    sn.prepare("act", None).unwrap();
    assert!(
        matches!(
            sn.prepare("child", Some("act")),
            Err(Error::InvalidState(_))
        ),
        "an active snapshot cannot be a parent"
    );
    assert!(sn.writable_dir("act").is_ok());
    sn.remove("act").unwrap();

    // --- a child sees its parent, changes it privately
    let m = sn.prepare("b", Some("A")).expect("prepare b");
    {
        let _mnt = mount_all(&m, &scratch.join("b"));
        assert_eq!(
            std::fs::read_to_string(scratch.join("b/base.txt")).unwrap(),
            "base"
        );
        std::fs::remove_file(scratch.join("b/dir/gone.txt")).unwrap();
        std::fs::write(scratch.join("b/new.txt"), "new").unwrap();
        std::fs::write(scratch.join("b/base.txt"), "changed").unwrap();
    }
    sn.commit("B", "b").unwrap();
    assert_eq!(sn.stat("B").unwrap().parent.as_deref(), Some("A"));

    // --- a view shows B read-only; A is unchanged
    let m = sn.view("v", Some("B")).expect("view");
    assert_eq!(sn.stat("v").unwrap().kind, Kind::View);
    {
        let _mnt = mount_all(&m, &scratch.join("v"));
        let v = scratch.join("v");
        assert_eq!(
            std::fs::read_to_string(v.join("base.txt")).unwrap(),
            "changed"
        );
        assert_eq!(std::fs::read_to_string(v.join("new.txt")).unwrap(), "new");
        assert!(
            !v.join("dir/gone.txt").exists(),
            "deletion in the child shows"
        );
        let err = std::fs::write(v.join("x"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "view is read-only");
    }
    let m = sn.view("va", Some("A")).unwrap();
    {
        let _mnt = mount_all(&m, &scratch.join("va"));
        assert_eq!(
            std::fs::read_to_string(scratch.join("va/base.txt")).unwrap(),
            "base"
        );
        assert!(scratch.join("va/dir/gone.txt").exists());
        assert!(!scratch.join("va/new.txt").exists());
    }
    // An empty view.
    let m = sn.view("empty", None).unwrap();
    {
        let _mnt = mount_all(&m, &scratch.join("empty"));
        assert_eq!(std::fs::read_dir(scratch.join("empty")).unwrap().count(), 0);
    }

    // --- walk
    let mut seen = Vec::new();
    sn.walk(&mut |i| {
        seen.push((i.key.clone(), i.kind));
        Ok(())
    })
    .unwrap();
    seen.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        seen,
        vec![
            ("A".into(), Kind::Committed),
            ("B".into(), Kind::Committed),
            ("empty".into(), Kind::View),
            ("v".into(), Kind::View),
            ("va".into(), Kind::View),
        ]
    );

    // --- remove: parents only once childless
    assert!(
        matches!(sn.remove("A"), Err(Error::InvalidState(_))),
        "A has children"
    );
    assert!(
        matches!(sn.remove("B"), Err(Error::InvalidState(_))),
        "B has a view"
    );
    sn.remove("v").unwrap();
    sn.remove("va").unwrap();
    sn.remove("empty").unwrap();
    sn.remove("B").unwrap();
    sn.remove("A").unwrap();
    assert!(matches!(sn.remove("A"), Err(Error::NotFound { .. })));
    let mut n = 0;
    sn.walk(&mut |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 0);
}

/// A chain of `depth` layers, each adding one file (and the next
/// overwriting the previous layer's `top`), then a view of the top that
/// must mount and show every layer.
fn chain(sn: &dyn Snapshotter, scratch: &Path, depth: usize) {
    let mut parent: Option<String> = None;
    for i in 0..depth {
        let key = format!("active-{i}");
        sn.prepare(&key, parent.as_deref())
            .unwrap_or_else(|e| panic!("prepare layer {i}: {e}"));
        let dir = sn.writable_dir(&key).unwrap();
        std::fs::write(dir.join(format!("f{i}")), i.to_string()).unwrap();
        std::fs::write(dir.join("top"), i.to_string()).unwrap();
        let name = format!("layer-{i}");
        sn.commit(&name, &key).unwrap();
        parent = Some(name);
    }
    let m = sn.view("top-view", parent.as_deref()).unwrap();
    let data_len: usize = m[0].data().len();
    let at = scratch.join("chain");
    let _mnt = mount_all(&m, &at);
    for i in [0, depth / 2, depth - 1] {
        assert_eq!(
            std::fs::read_to_string(at.join(format!("f{i}"))).unwrap(),
            i.to_string()
        );
    }
    assert_eq!(
        std::fs::read_to_string(at.join("top")).unwrap(),
        (depth - 1).to_string()
    );
    assert_eq!(std::fs::read_dir(&at).unwrap().count(), depth + 1);
    // Writable on top of the whole chain too.
    let m = sn.prepare("rw-top", parent.as_deref()).unwrap();
    let at2 = scratch.join("chain-rw");
    let _mnt2 = mount_all(&m, &at2);
    std::fs::write(at2.join("written"), "ok").unwrap();
    assert_eq!(std::fs::read_to_string(at2.join("f0")).unwrap(), "0");
    drop(_mnt2);
    sn.remove("rw-top").unwrap();
    // A top layer removed and made again under the same name (another
    // directory): a child of it mounts the new one, not a remembered chain.
    let top = parent.clone().unwrap_or_default();
    sn.remove("top-view").unwrap();
    drop(_mnt);
    sn.remove(&top).unwrap();
    let below = (depth >= 2).then(|| format!("layer-{}", depth - 2));
    sn.prepare("again", below.as_deref()).unwrap();
    std::fs::write(sn.writable_dir("again").unwrap().join("top"), "again").unwrap();
    sn.commit(&top, "again").unwrap();
    let m = sn.view("again-view", Some(&top)).unwrap();
    let at3 = scratch.join("chain-again");
    let _mnt3 = mount_all(&m, &at3);
    assert_eq!(std::fs::read_to_string(at3.join("top")).unwrap(), "again");
    assert!(!at3.join(format!("f{}", depth - 1)).exists());
    eprintln!(
        "{}: {depth}-layer chain mounts (option data {data_len} bytes)",
        sn.name()
    );
}

fn run_suite(kind: SnapshotterKind, depth: usize) {
    if !require_root("snapshotter conformance") {
        return;
    }
    private_mount_ns();
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir.path().join("root"), kind);
    let scratch = dir.path().join("mnt");
    conformance(s.snapshotter(), &scratch);
    chain(s.snapshotter(), &scratch, depth);
    let report = s.check().unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

#[test]
fn overlay_conformance_and_500_layer_chain() {
    run_suite(SnapshotterKind::Overlay, 500);
}

#[test]
fn native_conformance_and_chain() {
    run_suite(SnapshotterKind::Native, 40);
}

#[test]
fn overlay_500_lowerdirs_fit_one_page() {
    if !require_root("overlay page test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A long root path on purpose: absolute lowerdirs would be ~60 bytes each.
    let root = dir
        .path()
        .join("a-rather-long-store-root-directory-name-for-this-test");
    let s = store(&root, SnapshotterKind::Overlay);
    let sn = s.snapshotter();
    let mut parent: Option<String> = None;
    for i in 0..500 {
        sn.prepare(&format!("k{i}"), parent.as_deref()).unwrap();
        sn.commit(&format!("l{i}"), &format!("k{i}")).unwrap();
        parent = Some(format!("l{i}"));
    }
    let m = sn.prepare("top", parent.as_deref()).unwrap();
    assert!(m[0].data().len() > 4096, "absolute form is over a page");
    let c = m[0].compact();
    assert!(c.chdir.is_some());
    assert!(
        c.mount.data().len() < 4096,
        "compacted form fits: {}",
        c.mount.data().len()
    );
}

#[test]
fn native_copy_keeps_metadata() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !require_root("native metadata test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir.path().join("root"), SnapshotterKind::Native);
    let sn = s.snapshotter();
    sn.prepare("a", None).unwrap();
    let d = sn.writable_dir("a").unwrap();
    std::fs::write(d.join("f"), "data").unwrap();
    // chown clears setuid: chown first.
    std::os::unix::fs::chown(d.join("f"), Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(d.join("f"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::hard_link(d.join("f"), d.join("hard")).unwrap();
    std::os::unix::fs::symlink("f", d.join("sym")).unwrap();
    nix::unistd::mkfifo(
        &d.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    xattr_set(&d.join("f"), "user.kiln", b"v");
    sn.commit("A", "a").unwrap();
    sn.prepare("b", Some("A")).unwrap();
    let b = sn.writable_dir("b").unwrap();
    let m = std::fs::symlink_metadata(b.join("f")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o4755);
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert_eq!(m.nlink(), 2);
    assert_eq!(m.ino(), std::fs::metadata(b.join("hard")).unwrap().ino());
    assert_eq!(std::fs::read_link(b.join("sym")).unwrap(), Path::new("f"));
    assert!(std::fs::symlink_metadata(b.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo_like());
    assert_eq!(
        m.mtime(),
        std::fs::metadata(sn.diff_source_lower("b"))
            .unwrap()
            .mtime()
    );
    assert_eq!(
        xattr_get(&b.join("f"), "user.kiln").as_deref(),
        Some(&b"v"[..])
    );
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

trait LowerOf {
    fn diff_source_lower(&self, key: &str) -> std::path::PathBuf;
}
impl LowerOf for dyn Snapshotter + '_ {
    fn diff_source_lower(&self, key: &str) -> std::path::PathBuf {
        match self.diff_source(key).unwrap() {
            kiln_cache::DiffSource::Tree { lower: Some(l), .. } => l.join("f"),
            other => panic!("native diff source should be a tree pair: {other:?}"),
        }
    }
}

fn xattr_set(p: &Path, name: &str, v: &[u8]) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid strings and buffer.
    let rc = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn xattr_get(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid strings and buffer.
    let rc = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (rc >= 0).then(|| {
        buf.truncate(rc as usize);
        buf
    })
}
