//! Hostile tests: links to `/`, to `..`, absolute and relative, at every
//! position of a path, and links swapped in while operations run. The
//! "outside" directory stands for the host: nothing may ever appear or
//! change there.

use super::*;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

struct T {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

fn setup() -> T {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("victim"), "host").unwrap();
    fs::set_permissions(outside.join("victim"), fs::Permissions::from_mode(0o600)).unwrap();
    T {
        _tmp: tmp,
        root,
        outside,
    }
}

/// The outside directory holds exactly its victim, unchanged.
fn outside_untouched(t: &T) {
    let names: Vec<_> = fs::read_dir(&t.outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![OsString::from("victim")],
        "outside gained entries"
    );
    let m = fs::symlink_metadata(t.outside.join("victim")).unwrap();
    assert_eq!(
        fs::read_to_string(t.outside.join("victim")).unwrap(),
        "host"
    );
    assert_eq!(m.mode() & 0o7777, 0o600);
}

/// Every hostile link target an image can plant.
fn hostile_targets(t: &T) -> Vec<String> {
    vec![
        "/".into(),
        "../../..".into(),
        "../../../../../../..".into(),
        t.outside.display().to_string(),
        format!("../../../../../../..{}", t.outside.display()),
        "/proc/self/root".into(),
    ]
}

#[test]
fn mkdir_all_through_a_hostile_link_at_every_position_stays_inside() {
    for target in hostile_targets(&setup()) {
        for pos in 0..3 {
            let t = setup();
            // Replace the component at `pos` of a/b/c with the link.
            let comps = ["a", "b", "c"];
            let mut p = t.root.clone();
            for c in &comps[..=pos] {
                p.push(c);
            }
            fs::remove_dir_all(&p).unwrap();
            symlink(&target, &p).unwrap();
            let root = Root::open(&t.root).unwrap();
            let r = root.mkdir_all("a/b/c/new/deeper", Follow::InRoot, &DirSpec::default());
            // /proc/self/root is a magic link only on the host; inside the
            // root it is a path like any other.
            assert!(r.is_ok(), "{target} at {pos}: {r:?}");
            let d = r.unwrap();
            d.write_file("f", b"in", 0o644, None).unwrap();
            outside_untouched(&t);
            // Under Never the same walk refuses the link.
            let never = root.mkdir_all("a/b/c/x", Follow::Never, &DirSpec::default());
            assert_eq!(never.unwrap_err().raw_os_error(), Some(libc::ELOOP));
            let never = root.open_dir("a/b/c", Follow::Never);
            assert_eq!(never.unwrap_err().raw_os_error(), Some(libc::ELOOP));
            outside_untouched(&t);
        }
    }
}

#[test]
fn in_root_resolution_lands_where_the_image_would_see_it() {
    let t = setup();
    // /w -> /tmp/outside (dangling inside the image): created inside.
    symlink("/tmp/outside", t.root.join("w")).unwrap();
    let root = Root::open(&t.root).unwrap();
    root.mkdir_all("w/sub", Follow::InRoot, &DirSpec::default())
        .unwrap();
    assert!(t.root.join("tmp/outside/sub").is_dir());
    assert!(fs::symlink_metadata(t.root.join("w"))
        .unwrap()
        .file_type()
        .is_symlink());
    // A relative link climbing above the root clamps at the root.
    symlink("../../../a/b", t.root.join("up")).unwrap();
    assert_eq!(root.resolve("up/c").unwrap(), Path::new("/a/b/c"));
    assert_eq!(
        root.resolve("w/sub/zz").unwrap(),
        Path::new("/tmp/outside/sub/zz")
    );
    assert_eq!(root.resolve("/").unwrap(), Path::new("/"));
    // The last component is followed by resolve.
    symlink("/a/b/c/file", t.root.join("last")).unwrap();
    assert_eq!(root.resolve("last").unwrap(), Path::new("/a/b/c/file"));
    let d = root.open_dir("up", Follow::InRoot).unwrap();
    d.write_file("x", b"x", 0o600, None).unwrap();
    assert!(t.root.join("a/b/x").is_file());
}

#[test]
fn a_link_loop_is_an_error_not_a_hang() {
    let t = setup();
    symlink("l2", t.root.join("l1")).unwrap();
    symlink("l1", t.root.join("l2")).unwrap();
    let root = Root::open(&t.root).unwrap();
    let e = root
        .mkdir_all("l1/x", Follow::InRoot, &DirSpec::default())
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
}

#[test]
fn the_final_name_is_never_followed() {
    let t = setup();
    let victim = t.outside.join("victim");
    let root = Root::open(&t.root).unwrap();
    let d = root.open_dir("a", Follow::Never).unwrap();
    for how in [Create::Exclusive, Create::Truncate] {
        symlink(&victim, t.root.join("a/s")).unwrap();
        let e = d.create_file("s", 0o777, how).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::EEXIST)),
            "{how:?}: {e}"
        );
        d.chmod("s", 0o777).unwrap();
        d.chown("s", 1234, 1234).unwrap();
        d.set_times("s", (1, 0)).unwrap();
        assert!(d.open_file("s").is_err());
        fs::remove_file(t.root.join("a/s")).unwrap();
        outside_untouched(&t);
    }
    // Replace removes the link itself and writes a file in its place.
    symlink(&victim, t.root.join("a/s")).unwrap();
    d.write_file("s", b"new", 0o755, Some((1, 2))).unwrap();
    let m = fs::symlink_metadata(t.root.join("a/s")).unwrap();
    assert!(m.is_file());
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o755, 1, 2));
    outside_untouched(&t);
    // Root::write_file through a parent link to the host stays inside.
    symlink(&t.outside, t.root.join("hostdir")).unwrap();
    root.write_file("hostdir/victim", Follow::InRoot, b"x", 0o777, None)
        .unwrap();
    assert!(t
        .root
        .join(t.outside.strip_prefix("/").unwrap())
        .join("victim")
        .is_file());
    outside_untouched(&t);
    let e = root
        .write_file("hostdir/victim", Follow::Never, b"x", 0o777, None)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
    outside_untouched(&t);
}

#[test]
fn remove_all_removes_links_not_what_they_name() {
    let t = setup();
    symlink(&t.outside, t.root.join("a/b/c/out")).unwrap();
    symlink(t.outside.join("victim"), t.root.join("a/v")).unwrap();
    let root = Root::open(&t.root).unwrap();
    root.dir().remove_all("a").unwrap();
    assert!(!t.root.join("a").exists());
    outside_untouched(&t);
    root.dir().remove_all("a").unwrap();
}

#[test]
fn links_swapped_in_mid_operation_do_not_redirect_writes() {
    let t = setup();
    let root = Root::open(&t.root).unwrap();
    // A held directory keeps naming the directory it opened even when its
    // path turns into a link to the host.
    let held = root.open_dir("a/b", Follow::Never).unwrap();
    fs::rename(t.root.join("a/b"), t.root.join("a/moved")).unwrap();
    symlink(&t.outside, t.root.join("a/b")).unwrap();
    held.write_file("late", b"x", 0o644, None).unwrap();
    assert!(t.root.join("a/moved/late").is_file());
    outside_untouched(&t);

    // A thread flips a/flip between a directory and a link to the host
    // while the walker creates below it.
    let flip = t.root.join("a/flip");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let (f2, out2) = (flip.clone(), t.outside.clone());
    let h = std::thread::spawn(move || {
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = fs::create_dir(&f2);
            let _ = fs::remove_dir_all(&f2);
            let _ = symlink(&out2, &f2);
            let _ = fs::remove_file(&f2);
        }
    });
    for i in 0..2000 {
        let name = format!("a/flip/n{i}");
        for follow in [Follow::InRoot, Follow::Never] {
            let _ = root.mkdir_all(&name, follow, &DirSpec::default());
            let _ = root.write_file(format!("{name}-f"), follow, b"x", 0o644, None);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    h.join().unwrap();
    outside_untouched(&t);
}

#[test]
fn created_directories_get_their_spec_and_existing_ones_are_kept() {
    let t = setup();
    fs::set_permissions(t.root.join("a"), fs::Permissions::from_mode(0o700)).unwrap();
    let root = Root::open(&t.root).unwrap();
    let mut seen = Vec::new();
    root.mkdir_all_with("a/n1/n2", Follow::Never, &mut |p| {
        seen.push(p.to_path_buf());
        DirSpec {
            mode: 0o751,
            owner: Some((7, 8)),
            mtime: Some((1000, 5)),
        }
    })
    .unwrap();
    assert_eq!(
        seen,
        vec![PathBuf::from("/a/n1"), PathBuf::from("/a/n1/n2")]
    );
    let m = fs::metadata(t.root.join("a/n1/n2")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o751, 7, 8));
    // (a/n1's own time moved when n2 was made in it.)
    assert_eq!((m.mtime(), m.mtime_nsec()), (1000, 5));
    assert_eq!(
        fs::metadata(t.root.join("a")).unwrap().mode() & 0o7777,
        0o700
    );
    // A file in the way is ENOTDIR.
    fs::write(t.root.join("a/file"), "f").unwrap();
    let e = root
        .mkdir_all("a/file/x", Follow::InRoot, &DirSpec::default())
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
}

#[test]
fn nodes_links_renames_and_reads() {
    let t = setup();
    let root = Root::open(&t.root).unwrap();
    let a = root.open_dir("a", Follow::Never).unwrap();
    let c = root.open_dir("a/b/c", Follow::Never).unwrap();
    a.write_file("f", b"data", 0o640, None).unwrap();
    c.hard_link("g", &a, "f").unwrap();
    assert_eq!(fs::metadata(t.root.join("a/f")).unwrap().nlink(), 2);
    a.mknod("fifo", libc::S_IFIFO | 0o600, 0).unwrap();
    assert!(a.stat("fifo").unwrap().unwrap().kind() == libc::S_IFIFO);
    // Reading never opens a fifo or device (it would block or touch the
    // device).
    assert!(a.open_file("fifo").is_err());
    let mut s = String::new();
    io::Read::read_to_string(&mut c.open_file("g").unwrap(), &mut s).unwrap();
    assert_eq!(s, "data");
    c.rename("g", &a, "h").unwrap();
    assert!(t.root.join("a/h").is_file());
    a.symlink("l", "/etc/passwd").unwrap();
    assert_eq!(a.read_link("l").unwrap(), OsString::from("/etc/passwd"));
    let mut names = a.read_dir().unwrap();
    names.sort();
    assert_eq!(names, ["b", "f", "fifo", "h", "l"].map(OsString::from));
    assert!(a.mkdir("b", 0o700).is_ok_and(|made| !made));
    assert!(a.mkdir("new", 0o711).unwrap());
    assert_eq!(
        fs::metadata(t.root.join("a/new")).unwrap().mode() & 0o7777,
        0o711
    );
    a.remove("new").unwrap();
    a.remove("h").unwrap();
    a.remove("gone").unwrap();
    // Names must be single components.
    for bad in ["", ".", "..", "x/y"] {
        assert!(a.stat(bad).is_err(), "{bad:?}");
        assert!(a.write_file(bad, b"", 0o600, None).is_err(), "{bad:?}");
    }
    // Errors carry the path.
    let e = a.open_dir("missing").unwrap_err();
    assert!(e.to_string().contains("a/missing"), "{e}");
    assert!(e.is_not_found());
    // The parent of the root is an error; the root's own path opens.
    assert!(root.parent("/", Follow::InRoot).is_err());
    assert!(root.open_dir("/", Follow::Never).is_ok());
    a.set_xattr("f", b"user.kiln", b"1").unwrap();
    let b = a.open_dir("b").unwrap();
    b.chown_self(5, 6).unwrap();
    b.chmod_self(0o701).unwrap();
    b.set_times_self((77, 0)).unwrap();
    let m = fs::metadata(t.root.join("a/b")).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777, m.mtime()),
        (5, 6, 0o701, 77)
    );
}

#[test]
fn dangling_fail_creates_nothing_below_a_dangling_link_and_create_makes_it_inside() {
    for target in hostile_targets(&setup()) {
        let t = setup();
        // A link whose target does not exist inside the root.
        symlink(format!("{target}/nowhere"), t.root.join("dl")).unwrap();
        let root = Root::open(&t.root).unwrap();
        let mut made = Vec::new();
        let r = root.mkdir_all_ext(
            "dl/x/y",
            Follow::InRoot,
            Dangling::Fail,
            &mut |_| DirSpec::default(),
            &mut |d, n| {
                made.push(d.path().join(n));
                Ok(())
            },
        );
        assert!(
            r.as_ref().is_err_and(|e| e.is_not_found()),
            "{target}: {r:?}"
        );
        assert!(made.is_empty(), "{target}: {made:?}");
        outside_untouched(&t);
        // Under Create the target is made, inside the root; `made` sees
        // each directory with its parent.
        let d = root
            .mkdir_all_ext(
                "dl/x",
                Follow::InRoot,
                Dangling::Create,
                &mut |_| DirSpec::default(),
                &mut |d, n| {
                    assert!(d.stat(n).unwrap().unwrap().is_dir());
                    made.push(d.path().join(n));
                    Ok(())
                },
            )
            .unwrap();
        assert!(d.path().starts_with(&t.root), "{target}: {:?}", d.path());
        assert!(!made.is_empty() && made.iter().all(|p| p.starts_with(&t.root)));
        assert!(
            made.last().unwrap().ends_with("nowhere/x"),
            "{target}: {made:?}"
        );
        outside_untouched(&t);
    }
}

#[test]
fn dangling_fail_still_creates_below_a_link_to_an_existing_directory() {
    let t = setup();
    symlink("/a/b", t.root.join("lnk")).unwrap();
    let root = Root::open(&t.root).unwrap();
    root.mkdir_all_ext(
        "lnk/new",
        Follow::InRoot,
        Dangling::Fail,
        &mut |_| DirSpec::default(),
        &mut |_, _| Ok(()),
    )
    .unwrap();
    assert!(t.root.join("a/b/new").is_dir());
}

#[test]
fn open_path_and_lstat_stay_inside() {
    for target in hostile_targets(&setup()) {
        let t = setup();
        symlink(&target, t.root.join("a/b/esc")).unwrap();
        fs::write(t.root.join("victim"), "inside").unwrap();
        let root = Root::open(&t.root).unwrap();
        // Through the link, `victim` is the root's own (or missing).
        if let Ok(fd) = root.open_path("a/b/esc/victim", Follow::InRoot) {
            let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
            assert!(link.starts_with(&t.root), "{target}: {link:?}");
        }
        // `..` never climbs above the root.
        let fd = root.open_path("../../../victim", Follow::InRoot).unwrap();
        let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert_eq!(link, t.root.join("victim"));
        assert!(root.open_path("a/b/esc/victim", Follow::Never).is_err());
        // lstat does not follow the last component.
        let st = root.lstat("a/b/esc", Follow::InRoot).unwrap().unwrap();
        assert!(st.is_symlink());
        assert!(root.lstat("", Follow::InRoot).unwrap().unwrap().is_dir());
        assert!(root.lstat("a/nothing", Follow::InRoot).unwrap().is_none());
        outside_untouched(&t);
    }
}

#[test]
fn copy_meta_and_xattr_self_never_reach_a_link_target() {
    let t = setup();
    let root = Root::open(&t.root).unwrap();
    let a = root.open_dir("a", Follow::Never).unwrap();
    symlink(t.outside.join("victim"), t.root.join("a/l")).unwrap();
    fs::write(t.root.join("a/f"), "f").unwrap();
    fs::set_permissions(t.root.join("a/f"), fs::Permissions::from_mode(0o4751)).unwrap();
    let model = a.stat("f").unwrap().unwrap();
    // On a link: the link itself gets owner and times, never the target.
    a.copy_meta("l", &model).unwrap();
    outside_untouched(&t);
    a.copy_meta("b", &model).unwrap();
    let m = fs::symlink_metadata(t.root.join("a/b")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o4751);
    assert_eq!(m.mtime(), model.mtime().0);
    assert_eq!(m.atime(), model.atime().0);
    let b = a.open_dir("b").unwrap();
    b.copy_meta_self(&model).unwrap();
    b.set_xattr_self(b"user.kiln", b"1").unwrap_or(());
    let f = a.create_file("new", 0o600, Create::Exclusive).unwrap();
    set_owner_mode(&f, Some((0, 0)), 0o2755).unwrap();
    assert_eq!(
        fs::symlink_metadata(t.root.join("a/new")).unwrap().mode() & 0o7777,
        0o2755
    );
    assert_eq!(
        clean_components("/../a/./b/../c"),
        vec![OsString::from("a"), OsString::from("c")]
    );
}

#[test]
fn walk_visits_parents_first_in_name_order_and_never_follows_links() {
    let t = setup();
    fs::write(t.root.join("a/z"), "z").unwrap();
    fs::write(t.root.join("a/b/f"), "f").unwrap();
    fs::create_dir(t.root.join("skip")).unwrap();
    fs::write(t.root.join("skip/hidden"), "h").unwrap();
    symlink(&t.outside, t.root.join("a/to-host")).unwrap();
    symlink("/", t.root.join("slash")).unwrap();
    let r = Root::open(&t.root).unwrap();
    let mut seen = Vec::new();
    r.walk(&mut |rel, st| {
        seen.push((rel.to_string_lossy().into_owned(), st.is_symlink()));
        Ok(if rel == Path::new("skip") {
            Walk::Skip
        } else {
            Walk::Into
        })
    })
    .unwrap();
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "",
            "a",
            "skip",
            "slash",
            "a/b",
            "a/to-host",
            "a/z",
            "a/b/c",
            "a/b/f"
        ]
    );
    assert!(seen.iter().any(|(n, l)| n == "a/to-host" && *l));
    assert!(!names
        .iter()
        .any(|n| n.contains("victim") || n.contains("hidden")));
}

/// A tree deeper than any path (made level by level through descriptors)
/// is removed whole: no recursion, one directory open at a time.
#[test]
fn remove_tree_takes_a_tree_of_any_depth() {
    let t = tempfile::tempdir().unwrap();
    let top = t.path().join("deep");
    std::fs::create_dir(&top).unwrap();
    let mut cur = std::fs::File::open(&top).unwrap();
    for i in 0..3000 {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        assert_eq!(
            unsafe { libc::mkdirat(cur.as_raw_fd(), c"a".as_ptr(), 0o755) },
            0
        );
        if i % 100 == 0 {
            // SAFETY: as above.
            let fd = unsafe {
                libc::openat(
                    cur.as_raw_fd(),
                    c"f".as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY,
                    0o600,
                )
            };
            assert!(fd >= 0);
            // SAFETY: a descriptor just opened.
            unsafe { libc::close(fd) };
        }
        // SAFETY: as above.
        let fd = unsafe {
            libc::openat(
                cur.as_raw_fd(),
                c"a".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY,
            )
        };
        assert!(fd >= 0);
        // SAFETY: a descriptor just opened, owned from here.
        cur = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    }
    drop(cur);
    crate::remove_tree(&top).unwrap();
    assert!(!top.exists());
}
