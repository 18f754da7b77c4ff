//! File names are bytes: names that are not UTF-8 survive `COPY .`,
//! `COPY --from`, `.dockerignore`, the cache key, the layers, `kiln save`
//! / `kiln load` and the local and tar exporters.

mod common;

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use common::{prerequisites, Kiln};

/// Latin-1 "café": not UTF-8.
const CAFE: &[u8] = b"caf\xe9";
/// A directory named in Latin-1.
const DIR: &[u8] = b"r\xe9p";
/// Excluded by `.dockerignore`.
const SKIP: &[u8] = b"skip\xe9";

/// A name longer than a USTAR name field (a PAX path record), not UTF-8.
fn long_name() -> Vec<u8> {
    let mut n = vec![b'l'; 110];
    n.extend_from_slice(b"\xff\xfe");
    n
}

fn p(b: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(b))
}

fn context() -> tempfile::TempDir {
    let ctx = tempfile::tempdir().unwrap();
    let d = ctx.path();
    std::fs::write(
        d.join("Dockerfile"),
        "FROM busybox AS a\nCOPY . /ctx/\n\
         FROM busybox\nCOPY --from=a /ctx/ /from/\n",
    )
    .unwrap();
    std::fs::write(d.join(".dockerignore"), "skip*\nDockerfile\n").unwrap();
    std::fs::write(d.join("plain"), "ascii").unwrap();
    std::fs::write(d.join(p(CAFE)), "latin1 file").unwrap();
    std::fs::create_dir(d.join(p(DIR))).unwrap();
    std::fs::write(d.join(p(DIR)).join("inner"), "inside").unwrap();
    std::fs::write(d.join(p(DIR)).join(p(CAFE)), "nested").unwrap();
    std::fs::write(d.join(p(SKIP)), "ignored").unwrap();
    std::fs::write(d.join(p(&long_name())), "long").unwrap();
    ctx
}

fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut v = a.to_vec();
    v.push(b'/');
    v.extend_from_slice(b);
    v
}

/// The files every copy must hold, relative to its directory, with content.
fn expected() -> Vec<(Vec<u8>, &'static [u8])> {
    vec![
        (b"plain".to_vec(), b"ascii"),
        (CAFE.to_vec(), b"latin1 file"),
        (join(DIR, b"inner"), b"inside"),
        (join(DIR, CAFE), b"nested"),
        (long_name(), b"long"),
    ]
}

/// `kiln` with arguments that may not be UTF-8; asserts success, returns
/// stdout bytes.
fn kiln_ok(k: &Kiln, args: &[&OsStr]) -> Vec<u8> {
    let o = k.cmd().args(args).output().expect("run kiln");
    assert!(
        o.status.success(),
        "kiln {args:?} failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// `cat PATH` in `image`: the command line of `kiln run` is UTF-8, so the
/// name's bytes are spelled as `printf` octal escapes.
fn cat(k: &Kiln, image: &str, path: &[u8]) -> Vec<u8> {
    let mut fmt = String::new();
    for b in path {
        if b.is_ascii_alphanumeric() || b"/._-".contains(b) {
            fmt.push(*b as char);
        } else {
            fmt.push_str(&format!("\\{b:03o}"));
        }
    }
    let script = format!("cat \"$(printf '{fmt}')\"");
    kiln_ok(
        k,
        &[s("run"), s("--rm"), s(image), s("sh"), s("-c"), s(&script)],
    )
}

fn s(v: &str) -> &OsStr {
    OsStr::new(v)
}

/// Checks through `kiln run` that `dir` in `image` holds the expected
/// names and contents, and not the ignored one.
fn check_in_image(k: &Kiln, image: &str, dir: &str) {
    for (rel, content) in expected() {
        let path = join(dir.as_bytes(), &rel);
        assert_eq!(
            cat(k, image, &path),
            content,
            "{}",
            String::from_utf8_lossy(&path)
        );
    }
    // The shell lists the names' bytes as they are (`ls` would show `?`).
    let script = format!("for f in {dir}/* {dir}/.[!.]*; do echo \"${{f##*/}}\"; done");
    let ls = kiln_ok(
        k,
        &[s("run"), s("--rm"), s(image), s("sh"), s("-c"), s(&script)],
    );
    let names: Vec<&[u8]> = ls
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let mut want: Vec<Vec<u8>> = vec![
        b".dockerignore".to_vec(),
        b"plain".to_vec(),
        CAFE.to_vec(),
        DIR.to_vec(),
        long_name(),
    ];
    want.sort();
    let mut got: Vec<Vec<u8>> = names.iter().map(|n| n.to_vec()).collect();
    got.sort();
    assert_eq!(got, want, "the names in {dir} in {image}");
}

/// The (path, content) of every regular file in a tar (plain or gzip).
fn tar_files(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let plain = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut c = Command::new("gzip")
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("gzip");
        let mut stdin = c.stdin.take().unwrap();
        let data = bytes.to_vec();
        let t = std::thread::spawn(move || {
            use std::io::Write;
            stdin.write_all(&data).unwrap();
        });
        let o = c.wait_with_output().unwrap();
        t.join().unwrap();
        assert!(o.status.success());
        o.stdout
    } else {
        bytes.to_vec()
    };
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(&plain[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = e.path_bytes().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((path, data));
    }
    out
}

/// The files of every layer in a `kiln save` archive.
fn saved_layers(archive: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut layers = Vec::new();
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        if data.len() > 512 && !e.path_bytes().ends_with(b".json") {
            layers.extend(tar_files(&data));
        }
    }
    layers
}

fn check_tar(files: &[(Vec<u8>, Vec<u8>)], dir: &str, what: &str) {
    let trim = |p: &[u8]| -> Vec<u8> {
        let p = p.strip_prefix(b"./").unwrap_or(p);
        p.strip_prefix(b"/").unwrap_or(p).to_vec()
    };
    for (rel, content) in expected() {
        let want = join(dir.as_bytes(), &rel);
        let hit = files.iter().find(|(p, _)| trim(p) == want);
        assert!(
            hit.is_some_and(|(_, c)| c == content),
            "{what}: {} missing or wrong",
            String::from_utf8_lossy(&want)
        );
    }
    assert!(
        !files
            .iter()
            .any(|(p, _)| trim(p) == join(dir.as_bytes(), SKIP)),
        "{what}: the ignored name was copied"
    );
}

#[test]
fn names_that_are_not_utf8_survive_copy_layers_save_load_and_export() {
    if !prerequisites() {
        return;
    }
    let k = Kiln::with_busybox();
    let ctx = context();
    let id = k.build(ctx.path(), &["-t", "bytes:1"]);
    let stage = k.build(ctx.path(), &["-t", "bytes:a", "--target", "a"]);
    check_in_image(&k, "bytes:a", "/ctx");
    check_in_image(&k, "bytes:1", "/from");

    // The images' own layers hold the names' bytes.
    let out = tempfile::tempdir().unwrap();
    let saved = out.path().join("saved.tar");
    k.ok(&["save", "-o", saved.to_str().unwrap(), "bytes:1"]);
    check_tar(&saved_layers(&saved), "from", "COPY --from layer");
    let saved_a = out.path().join("saved-a.tar");
    k.ok(&["save", "-o", saved_a.to_str().unwrap(), "bytes:a"]);
    check_tar(&saved_layers(&saved_a), "ctx", "COPY . layer");

    // save, then load into a fresh store.
    let fresh = Kiln::new();
    fresh.ok(&["load", "-i", saved.to_str().unwrap()]);
    assert_eq!(fresh.inspect("bytes:1")["Id"], id);
    check_in_image(&fresh, "bytes:1", "/from");
    // The same through an OCI image layout.
    let oci = out.path().join("saved-oci.tar");
    k.ok(&[
        "save",
        "--format",
        "oci",
        "-o",
        oci.to_str().unwrap(),
        "bytes:1",
    ]);
    let fresh_oci = Kiln::new();
    fresh_oci.ok(&["load", "-i", oci.to_str().unwrap()]);
    check_in_image(&fresh_oci, "bytes:1", "/from");

    // -o type=tar and -o type=local.
    let tarf = out.path().join("root.tar");
    let local = out.path().join("local");
    k.ok(&[
        "build",
        "-q",
        "-o",
        &format!("type=tar,dest={}", tarf.display()),
        "-o",
        &format!("type=local,dest={}", local.display()),
        ctx.path().to_str().unwrap(),
    ]);
    let files = tar_files(&std::fs::read(&tarf).unwrap());
    check_tar(&files, "from", "type=tar");
    for (rel, content) in expected() {
        let path = local.join("from").join(p(&rel));
        assert_eq!(
            std::fs::read(&path).unwrap_or_default(),
            content,
            "type=local: {}",
            path.display()
        );
    }
    assert!(!local.join("from").join(p(SKIP)).exists());

    // The key covers such a file's content, and not an ignored one's.
    std::fs::write(ctx.path().join(p(SKIP)), "changed, but ignored").unwrap();
    assert_eq!(k.build(ctx.path(), &["--target", "a"]), stage);
    std::fs::write(ctx.path().join(p(DIR)).join(p(CAFE)), "changed").unwrap();
    let changed = k.build(ctx.path(), &["-t", "bytes:2", "--target", "a"]);
    assert_ne!(changed, stage, "a non-UTF-8 file's content is in the key");
    assert_eq!(
        cat(&k, "bytes:2", &join(b"/ctx", &join(DIR, CAFE))),
        b"changed"
    );
    // The rebuild costs the changed file only: the unchanged one with a
    // name that is not UTF-8 is hard-linked from the previous COPY layer.
    use std::os::unix::fs::MetadataExt;
    let linked = std::fs::read_dir(k.root.path().join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|s| {
            std::fs::symlink_metadata(s.path().join("fs/ctx").join(p(CAFE)))
                .is_ok_and(|m| m.nlink() == 2)
        })
        .count();
    assert_eq!(linked, 2, "caf\\xe9 shared by the two COPY . layers");
}
