//! Fuzz target: the layer applier (`kiln_image::apply::apply_layer`) on a
//! plain, gzip or zstd tar never panics and never touches anything outside
//! the directory it applies to.
//!
//! Each input gets a fresh temp dir holding `root/` (the target) and
//! `sentinel/` (a neighbour that must stay exactly as it was). `root/`
//! starts with symlinks an earlier layer could have planted, pointing at the
//! sentinel by a relative and by an absolute path. The layer is applied
//! twice: as an overlay upperdir, then again in delete mode over the result
//! (so every entry also meets an existing one).
#![no_main]

use std::fs;
use std::io::Cursor;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_image::apply::{apply_layer, WhiteoutMode};
use kiln_image::compression::decompress_auto;
use libfuzzer_sys::fuzz_target;

/// Where the per-input temp dirs go: `$KILN_FUZZ_TMP`, else `/dev/shm`
/// (tmpfs: fast, and it takes trusted.* xattrs), else the temp dir.
fn tmp_base() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_FUZZ_TMP") {
        return p.into();
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Everything observable about a tree, without following symlinks.
fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn walk(top: &Path, dir: &Path, out: &mut Vec<String>) {
    let md = fs::symlink_metadata(dir).expect("lstat");
    out.push(format!(
        "{} mode={:o} uid={} gid={} mtime={} nlink={}",
        dir.strip_prefix(top).expect("below top").display(),
        md.mode(),
        md.uid(),
        md.gid(),
        md.mtime(),
        if md.is_dir() { 0 } else { md.nlink() },
    ));
    if md.is_dir() {
        for e in fs::read_dir(dir).expect("readdir") {
            walk(top, &e.expect("dirent").path(), out);
        }
    } else if md.is_file() {
        out.push(format!("content={:?}", fs::read(dir).expect("read")));
    } else if md.file_type().is_symlink() {
        out.push(format!("link={:?}", fs::read_link(dir).expect("readlink")));
    }
}

fuzz_target!(|data: &[u8]| {
    let base = tempfile::Builder::new()
        .prefix("kiln-fuzz-apply-")
        .tempdir_in(tmp_base())
        .expect("temp dir");
    let root = base.path().join("root");
    let sentinel = base.path().join("sentinel");
    fs::create_dir(&root).expect("mkdir root");
    fs::create_dir_all(sentinel.join("dir")).expect("mkdir sentinel");
    fs::write(sentinel.join("file"), b"keep").expect("write sentinel");
    fs::set_permissions(sentinel.join("file"), fs::Permissions::from_mode(0o644))
        .expect("chmod sentinel");
    std::os::unix::fs::symlink("../sentinel", root.join("up")).expect("symlink");
    std::os::unix::fs::symlink(&sentinel, root.join("abs")).expect("symlink");
    std::os::unix::fs::symlink("../sentinel/file", root.join("upfile")).expect("symlink");
    let before = snapshot(&sentinel);

    for mode in [WhiteoutMode::Overlay, WhiteoutMode::Delete] {
        if let Ok(r) = decompress_auto(Cursor::new(data.to_vec())) {
            let _ = apply_layer(r, &root, mode);
        }
        assert_eq!(before, snapshot(&sentinel), "sentinel changed ({mode:?})");
        let mut names: Vec<_> = fs::read_dir(base.path())
            .expect("readdir base")
            .map(|e| e.expect("dirent").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["root", "sentinel"], "something created beside root");
    }
});
