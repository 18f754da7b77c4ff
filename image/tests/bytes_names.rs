//! File names are bytes: names and link targets that are not UTF-8, and
//! long enough to need PAX `path`/`linkpath` records, survive the tar
//! writer, the applier and the differ unchanged (run as root).

mod common;

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::snapshot;
use kiln_image::apply::{apply_layer, WhiteoutMode};
use kiln_image::diff::{write_tree_diff, DiffOptions};
use kiln_image::tarw::{Kind, Meta, TarWriter};

fn p(b: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(b))
}

fn meta(path: &[u8], kind: Kind, mode: u32) -> Meta {
    Meta {
        path: path.to_vec(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        xattrs: Vec::new(),
    }
}

/// (directory, file, symlink, its target, hard link).
type Names = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);

/// A directory in Latin-1, a file below it whose one name is longer than
/// a USTAR name field (so no prefix split: a PAX `path`), a symlink with a
/// long non-UTF-8 target (PAX `linkpath`), and a hard link to the file.
fn names() -> Names {
    let dir = b"r\xe9p".to_vec();
    let mut file = dir.clone();
    file.push(b'/');
    file.extend(std::iter::repeat_n(b'x', 120));
    file.extend_from_slice(b"\xff\xe9");
    let link = b"lien\xe9".to_vec();
    let mut target = b"/".to_vec();
    target.extend(std::iter::repeat_n(b'c', 130));
    target.extend_from_slice(b"caf\xe9");
    let hard = b"dur\xe9".to_vec();
    (dir, file, link, target, hard)
}

fn entries(tar: &[u8]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut ar = tar::Archive::new(tar);
    ar.entries()
        .expect("entries")
        .map(|e| {
            let e = e.expect("entry");
            let path = e.path_bytes().into_owned();
            let path = path.strip_suffix(b"/").map(<[u8]>::to_vec).unwrap_or(path);
            (path, e.link_name_bytes().map(|l| l.into_owned()))
        })
        .collect()
}

#[test]
fn long_non_utf8_names_round_trip_through_pax_apply_and_diff() {
    let (dir, file, link, target, hard) = names();
    let mut w = TarWriter::new(Vec::new());
    w.append(&meta(&dir, Kind::Dir, 0o755), None).unwrap();
    let mut data: &[u8] = b"long name";
    w.append(&meta(&file, Kind::Regular(9), 0o644), Some(&mut data))
        .unwrap();
    w.append(&meta(&link, Kind::Symlink(target.clone()), 0o777), None)
        .unwrap();
    w.append(&meta(&hard, Kind::Hardlink(file.clone()), 0o644), None)
        .unwrap();
    let tar = w.finish().unwrap();

    // The PAX records carry the raw bytes (as Go's archive/tar writes
    // them), and a tar reader gives them back.
    let record = |key: &[u8], v: &[u8]| {
        let mut r = key.to_vec();
        r.push(b'=');
        r.extend_from_slice(v);
        r.push(b'\n');
        r
    };
    for r in [record(b"path", &file), record(b"linkpath", &target)] {
        assert!(tar.windows(r.len()).any(|w| w == r), "raw PAX record");
    }
    let want = vec![
        (dir.clone(), None),
        (file.clone(), None),
        (link.clone(), Some(target.clone())),
        (hard.clone(), Some(file.clone())),
    ];
    assert_eq!(entries(&tar), want);

    // GNU tar reads the same names.
    let listed = std::process::Command::new("tar")
        .args(["--quoting-style=literal", "-tf", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(&tar)?;
            c.wait_with_output()
        })
        .expect("GNU tar");
    assert!(listed.status.success());
    let lines: Vec<&[u8]> = listed.stdout.split(|b| *b == b'\n').collect();
    assert!(
        lines.contains(&file.as_slice()),
        "GNU tar lists the PAX path"
    );

    // The applier writes the names' bytes.
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    std::fs::create_dir(&a).unwrap();
    apply_layer(&tar[..], &a, WhiteoutMode::Overlay).unwrap();
    let mut content = String::new();
    std::fs::File::open(a.join(p(&file)))
        .unwrap()
        .read_to_string(&mut content)
        .unwrap();
    assert_eq!(content, "long name");
    assert_eq!(
        std::fs::read_link(a.join(p(&link)))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        target
    );
    let h = std::fs::metadata(a.join(p(&hard))).unwrap();
    assert_eq!(h.nlink(), 2);
    assert_eq!(h.ino(), std::fs::metadata(a.join(p(&file))).unwrap().ino());

    // The differ gives the same names back, and they apply to the same tree.
    let mut again = Vec::new();
    write_tree_diff(None, &a, &mut again, &DiffOptions::default()).unwrap();
    let got = entries(&again);
    for (path, l) in &want {
        let hit = got.iter().find(|(p, _)| p == path);
        assert!(
            hit.is_some(),
            "{} missing from the diff",
            String::from_utf8_lossy(path)
        );
        if path == &link {
            assert_eq!(hit.and_then(|h| h.1.clone()), l.clone());
        }
    }
    let b = t.path().join("b");
    std::fs::create_dir(&b).unwrap();
    apply_layer(&again[..], &b, WhiteoutMode::Overlay).unwrap();
    assert_eq!(snapshot(&a, false), snapshot(&b, false));
}
