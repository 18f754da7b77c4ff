//! Deep layer stacks: overlayfs accepts at most 500 lower directories,
//! and every lookup that misses walks all of them (each step's mount,
//! exec and path lookups cost O(depth)). A chain deeper than
//! [`MAX_LOWERS`] keeps its top layers as they are and has its bottom
//! layers merged, once per block of layers, into one directory that
//! stands in for all of them: the layer directories are applied bottom
//! first, with overlay whiteouts (0/0 character devices) deleting and
//! opaque directories replacing what lies below. Regular files are
//! hard-linked from their (immutable) layers, not copied, so a merge
//! costs O(entries), not O(bytes).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::fsview::{lchown, set_mtime};

/// Lower directories a step's mount uses at most; the kernel's limit is
/// 500 (the executor adds its stub directory). Kept low so that a step
/// costs the same at layer 500 as at layer 50.
pub const MAX_LOWERS: usize = 64;

/// Layers merged at a time: the bottom of a deep chain is re-merged
/// every this many layers, and a step mounts between
/// `MAX_LOWERS - FLAT_BLOCK` and `MAX_LOWERS` lower directories.
pub const FLAT_BLOCK: usize = 32;

fn is_whiteout(m: &fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

fn is_opaque(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| {
            let Ok(n) = CString::new(*name) else {
                return false;
            };
            let mut buf = [0u8; 4];
            // SAFETY: valid C strings and a buffer of the given length.
            let r = unsafe {
                libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            r == 1 && buf[0] == b'y'
        })
}

fn remove(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn meta_to(dst: &Path, m: &fs::Metadata, symlink: bool) -> io::Result<()> {
    let err = |e: crate::fsview::ViewError| io::Error::other(e.to_string());
    lchown(dst, m.uid(), m.gid()).map_err(err)?;
    if !symlink {
        fs::set_permissions(dst, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    set_mtime(dst, m.mtime(), m.mtime_nsec(), symlink).map_err(err)
}

/// Applies `layer` (an overlay layer directory) on top of `into`.
fn apply_dir(layer: &Path, into: &Path) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(layer)?.collect::<Result<Vec<_>, _>>()?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let src = e.path();
        let dst = into.join(e.file_name());
        let m = fs::symlink_metadata(&src)?;
        if is_whiteout(&m) {
            remove(&dst)?;
            continue;
        }
        let ft = m.file_type();
        if ft.is_dir() {
            let existing_dir = fs::symlink_metadata(&dst).is_ok_and(|d| d.is_dir());
            if is_opaque(&src) || !existing_dir {
                remove(&dst)?;
                fs::create_dir(&dst)?;
            }
            apply_dir(&src, &dst)?;
            meta_to(&dst, &m, false)?;
            continue;
        }
        remove(&dst)?;
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
            meta_to(&dst, &m, true)?;
        } else if ft.is_file() {
            // Same inode, same owner, mode, mtime and xattrs; a copy only
            // where a link cannot be made.
            if fs::hard_link(&src, &dst).is_err() {
                fs::copy(&src, &dst)?;
                meta_to(&dst, &m, false)?;
            }
        } else {
            let c = CString::new(dst.as_os_str().as_bytes()).map_err(io::Error::other)?;
            // SAFETY: a valid path; mode and rdev come from an lstat.
            if unsafe {
                libc::mknod(
                    c.as_ptr(),
                    m.mode() as libc::mode_t,
                    m.rdev() as libc::dev_t,
                )
            } != 0
            {
                return Err(io::Error::last_os_error());
            }
            meta_to(&dst, &m, false)?;
        }
    }
    Ok(())
}

/// Merges `layers` (top first) into the empty directory `into`.
pub fn flatten(layers: &[std::path::PathBuf], into: &Path) -> io::Result<()> {
    for layer in layers.iter().rev() {
        apply_dir(layer, into)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_layers_win_and_whiteouts_delete() {
        let t = tempfile::tempdir().unwrap();
        let (low, up, out) = (
            t.path().join("low"),
            t.path().join("up"),
            t.path().join("out"),
        );
        for d in [&low, &up, &out] {
            fs::create_dir_all(d).unwrap();
        }
        fs::create_dir_all(low.join("d")).unwrap();
        fs::write(low.join("d/keep"), "k").unwrap();
        fs::write(low.join("gone"), "g").unwrap();
        fs::write(low.join("f"), "old").unwrap();
        fs::write(up.join("f"), "new").unwrap();
        let c = CString::new(up.join("gone").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path; a 0/0 character device is overlay's whiteout.
        assert_eq!(
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) },
            0
        );
        flatten(&[up, low.clone()], &out).unwrap();
        assert_eq!(fs::read_to_string(out.join("f")).unwrap(), "new");
        assert_eq!(fs::read_to_string(out.join("d/keep")).unwrap(), "k");
        assert!(!out.join("gone").exists());
        // Files are the layers' own inodes, and replacing one in the merge
        // never touches the layer it came from.
        assert_eq!(
            fs::metadata(out.join("d/keep")).unwrap().ino(),
            fs::metadata(low.join("d/keep")).unwrap().ino()
        );
        assert_eq!(fs::read_to_string(low.join("f")).unwrap(), "old");
        assert!(low.join("gone").exists());
    }
}
