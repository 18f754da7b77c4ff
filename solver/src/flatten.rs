//! Deep layer stacks: overlayfs accepts at most 500 lower directories,
//! and every lookup that misses walks all of them (each step's mount,
//! exec and path lookups cost O(depth)). A chain deeper than
//! [`MAX_LOWERS`] is mounted as its top layers (fewer than
//! [`FLAT_BLOCK`]) over a few merged directories, each standing in for a
//! fixed, aligned block of the layers below ([`plan`]): blocks of
//! [`FLAT_BLOCK`] layers, blocks of [`FLAT_FANOUT`] such blocks, and so
//! on. A block is merged once, when the chain first grows past it, and
//! never again, so a layer at the bottom with many files (a big base
//! image) is merged once per level, not every few steps; and a step
//! mounts about as many directories at layer 500 as at layer 50.
//!
//! A merged block is itself an overlay layer ([`squash`]): what its
//! layers delete from the layers below it stays a whiteout (a 0/0
//! character device), and a directory that hides what lies below it is
//! marked opaque. Regular files are hard-linked from their (immutable)
//! layers, not copied, so a merge costs O(entries), not O(bytes).

use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_fs::idmap::IdMaps;
use kiln_fs::overlay::{
    is_overlay_xattr as is_overlay_xattr_name, is_whiteout, XattrNs, OPAQUE_VALUE,
};
use kiln_fs::Dir;

/// Lower directories a step's mount uses at most before the chain is
/// mounted through merged blocks; the kernel's limit is 500 (the
/// executor adds its stub directory).
pub const MAX_LOWERS: usize = 64;

/// Layers in a first-level merged block.
pub const FLAT_BLOCK: usize = 32;

/// Blocks of one level in a block of the next.
pub const FLAT_FANOUT: usize = 8;

/// One merged block: `len` layers from `start` (counted from the bottom
/// of the chain, 0 being its first layer), at `level` (0: made of
/// layers, 1: of level-0 blocks, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// 0 for a block of layers, n + 1 for a block of level-n blocks.
    pub level: u32,
    /// Index of the block's bottom layer, counted from the chain's bottom.
    pub start: usize,
    /// Layers the block covers.
    pub len: usize,
}

impl Block {
    /// The blocks one level down that make up this one (bottom first);
    /// empty at level 0.
    pub fn parts(&self) -> Vec<Block> {
        if self.level == 0 {
            return Vec::new();
        }
        let len = self.len / FLAT_FANOUT;
        (0..FLAT_FANOUT)
            .map(|i| Block {
                level: self.level - 1,
                start: self.start + i * len,
                len,
            })
            .collect()
    }
}

/// How a chain of `depth` layers is mounted: the merged blocks, bottom
/// first, and how many top layers stay as they are. Chains of at most
/// [`MAX_LOWERS`] layers are mounted as they are. Deeper ones take the
/// biggest aligned blocks first, so the blocks a chain uses are the same
/// ones its children use, until a block of the next size fills up.
pub fn plan(depth: usize) -> (Vec<Block>, usize) {
    if depth <= MAX_LOWERS {
        return (Vec::new(), depth);
    }
    let mut sizes = vec![FLAT_BLOCK];
    while let Some(&top) = sizes.last() {
        let next = top.saturating_mul(FLAT_FANOUT);
        if next > depth || next == top {
            break;
        }
        sizes.push(next);
    }
    let mut blocks = Vec::new();
    let mut start = 0;
    for (level, &size) in sizes.iter().enumerate().rev() {
        while depth - start >= size {
            blocks.push(Block {
                level: level as u32,
                start,
                len: size,
            });
            start += size;
        }
    }
    (blocks, depth - start)
}

fn fs_err(e: kiln_fs::Error) -> io::Error {
    e.into()
}

/// Gives `name` in `dir` the owner, mode and times of `m`, never
/// following it.
fn meta_to(dir: &Dir, name: &OsStr, m: &fs::Metadata, symlink: bool) -> io::Result<()> {
    dir.chown(name, m.uid(), m.gid()).map_err(fs_err)?;
    if !symlink {
        dir.chmod(name, m.mode() & 0o7777).map_err(fs_err)?;
    }
    dir.set_times(name, (m.mtime(), m.mtime_nsec()))
        .map_err(fs_err)
}

/// The overlay xattr that marks `p` opaque, if it has one set to "y".
fn opaque_xattr(p: &Path) -> Option<&'static str> {
    let c = CString::new(p.as_os_str().as_bytes()).ok()?;
    [XattrNs::current().opaque()].into_iter().find(|name| {
        let Ok(n) = CString::new(*name) else {
            return false;
        };
        let mut buf = [0u8; 4];
        // SAFETY: valid C strings and a buffer of the given length.
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        r == 1 && buf[..1] == *OPAQUE_VALUE
    })
}

fn is_overlay_xattr(name: &std::ffi::OsStr) -> bool {
    is_overlay_xattr_name(name.as_bytes())
}

/// Gives the directory `dst` the extended attributes of `src` that belong
/// to its content (not overlayfs's own): the topmost directory's
/// attributes are the merged directory's, so those `dst` had from a lower
/// layer and `src` lacks go.
fn copy_dir_xattrs(src: &Path, dst: &Dir) -> io::Result<()> {
    use xattr::FileExt;
    let dst = dst.open_self().map_err(fs_err)?;
    let keep = |n: io::Result<xattr::XAttrs>| match n {
        Ok(n) => Ok(n.filter(|n| !is_overlay_xattr(n)).collect::<Vec<_>>()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Ok(Vec::new()),
        Err(e) => Err(e),
    };
    let wanted = keep(xattr::list(src))?;
    for name in keep(dst.list_xattr())? {
        if !wanted.contains(&name) {
            dst.remove_xattr(&name)?;
        }
    }
    for name in wanted {
        if let Some(v) = xattr::get(src, &name)? {
            dst.set_xattr(&name, &v)?;
        }
    }
    Ok(())
}

/// Marks the directory `dir` as one that may hold whiteouts. overlayfs
/// hides whiteouts from a directory listing only in directories it merges
/// from several layers or that carry an origin; in a directory that
/// exists in one lower layer only, a whiteout would be listed as a name
/// that cannot be opened. An empty origin means "copied up, origin
/// unknown" to the kernel and sets nothing else.
fn mark_may_hold_whiteouts(dir: &Dir) -> io::Result<()> {
    use xattr::FileExt;
    let d = dir.open_self().map_err(fs_err)?;
    let origin = IdMaps::current().overlay_xattrs().origin();
    if d.get_xattr(origin)?.is_none() {
        d.set_xattr(origin, b"")?;
    }
    Ok(())
}

/// Applies `layer` (an overlay layer directory) on top of `into`, itself
/// an overlay layer (open: every write is relative to it and follows no
/// symlink): the result, mounted over the layers below both, shows what
/// `layer` over `into` over those would. With nothing below (`bottom`),
/// deletions just delete.
fn apply_dir(layer: &Path, into: &Dir, bottom: bool) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(layer)?.collect::<Result<Vec<_>, _>>()?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let src = e.path();
        let name = e.file_name();
        let m = fs::symlink_metadata(&src)?;
        if is_whiteout(&m) {
            // Deleted here, and (a whiteout) in whatever lies below.
            into.remove_all(&name).map_err(fs_err)?;
            if !bottom {
                into.mknod(&name, libc::S_IFCHR | 0o600, 0)
                    .map_err(fs_err)?;
                meta_to(into, &name, &m, false)?;
                mark_may_hold_whiteouts(into)?;
            }
            continue;
        }
        let ft = m.file_type();
        if ft.is_dir() {
            let below = into.stat(&name).map_err(fs_err)?;
            let merge = below.is_some_and(|d| d.is_dir());
            match opaque_xattr(&src) {
                Some(x) => {
                    into.remove_all(&name).map_err(fs_err)?;
                    into.mkdir(&name, 0o700).map_err(fs_err)?;
                    into.set_xattr(&name, x.as_bytes(), OPAQUE_VALUE)
                        .map_err(fs_err)?;
                }
                None if merge => {}
                None => {
                    into.remove_all(&name).map_err(fs_err)?;
                    into.mkdir(&name, 0o700).map_err(fs_err)?;
                    if below.is_some() {
                        // A directory over a file or a whiteout hides
                        // whatever the layers below have at that path.
                        let opaque = IdMaps::current().overlay_xattrs().opaque().as_bytes();
                        into.set_xattr(&name, opaque, OPAQUE_VALUE)
                            .map_err(fs_err)?;
                    }
                }
            }
            let sub = into.open_dir(&name).map_err(fs_err)?;
            apply_dir(&src, &sub, bottom)?;
            copy_dir_xattrs(&src, &sub)?;
            meta_to(into, &name, &m, false)?;
            continue;
        }
        into.remove_all(&name).map_err(fs_err)?;
        if ft.is_symlink() {
            into.symlink(&name, fs::read_link(&src)?).map_err(fs_err)?;
            meta_to(into, &name, &m, true)?;
        } else if ft.is_file() {
            // Same inode, same owner, mode, mtime and xattrs; a copy only
            // where a link cannot be made.
            if link_from(&src, into, &name).is_err() {
                let mut to = into
                    .create_file(&name, 0o600, kiln_fs::Create::Exclusive)
                    .map_err(fs_err)?;
                io::copy(&mut fs::File::open(&src)?, &mut to)?;
                drop(to);
                meta_to(into, &name, &m, false)?;
            }
        } else {
            into.mknod(&name, m.mode(), m.rdev()).map_err(fs_err)?;
            meta_to(into, &name, &m, false)?;
        }
    }
    Ok(())
}

/// Hard-links the layer file `src` (kiln's own immutable snapshot) as
/// `name` in `into`.
fn link_from(src: &Path, into: &Dir, name: &OsStr) -> io::Result<()> {
    let s = CString::new(src.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let n = CString::new(name.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: NUL-terminated strings and an open directory descriptor;
    // flags 0 never follow a link.
    if unsafe { libc::linkat(libc::AT_FDCWD, s.as_ptr(), into.as_raw_fd(), n.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Merges `layers` (overlay layer directories, top first) into the empty
/// directory `into`, as one overlay layer that stands in for all of them
/// over whatever lies below; `bottom` when nothing does (then it holds no
/// whiteouts).
pub fn squash(layers: &[PathBuf], into: &Path, bottom: bool) -> io::Result<()> {
    let root = kiln_fs::Root::open(into).map_err(fs_err)?;
    for layer in layers.iter().rev() {
        apply_dir(layer, root.dir(), bottom)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whiteout(p: &Path) {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) },
            0
        );
    }

    fn is_whiteout_at(p: &Path) -> bool {
        fs::symlink_metadata(p).is_ok_and(|m| is_whiteout(&m))
    }

    #[test]
    fn plan_takes_aligned_blocks_biggest_first() {
        assert_eq!(plan(64), (Vec::new(), 64));
        let (b, keep) = plan(65);
        assert_eq!(keep, 1);
        assert_eq!(
            b,
            vec![
                Block {
                    level: 0,
                    start: 0,
                    len: 32
                },
                Block {
                    level: 0,
                    start: 32,
                    len: 32
                }
            ]
        );
        let (b, keep) = plan(500);
        // 256 + 7 x 32 + 20: eight lower directories and twenty layers.
        assert_eq!(keep, 20);
        assert_eq!(
            b[0],
            Block {
                level: 1,
                start: 0,
                len: 256
            }
        );
        assert_eq!(b.len(), 8);
        assert!(b[1..].iter().all(|x| x.level == 0 && x.len == 32));
        assert_eq!(b[0].parts().len(), FLAT_FANOUT);
        assert_eq!(
            b[0].parts()[7],
            Block {
                level: 0,
                start: 224,
                len: 32
            }
        );
        // The blocks of a chain are the blocks of its children, as long as
        // no bigger block fills up; and no depth mounts many directories.
        for d in 65..5000 {
            let (b, keep) = plan(d);
            let (b1, _) = plan(d + 1);
            if (d + 1) % FLAT_BLOCK != 0 {
                assert_eq!(b, b1, "depth {d}");
            }
            assert!(
                b.len() + keep <= 2 * FLAT_BLOCK,
                "depth {d}: {} + {keep}",
                b.len()
            );
            let covered: usize = b.iter().map(|x| x.len).sum();
            assert_eq!(covered + keep, d);
        }
    }

    #[test]
    fn upper_layers_win_and_whiteouts_stay_whiteouts() {
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
        whiteout(&up.join("gone"));
        whiteout(&up.join("below"));
        squash(&[up.clone(), low.clone()], &out, false).unwrap();
        assert_eq!(fs::read_to_string(out.join("f")).unwrap(), "new");
        assert_eq!(fs::read_to_string(out.join("d/keep")).unwrap(), "k");
        // Deleted from the block and from whatever lies below it.
        assert!(is_whiteout_at(&out.join("gone")));
        assert!(is_whiteout_at(&out.join("below")));
        // Files are the layers' own inodes, and replacing one in the merge
        // never touches the layer it came from.
        assert_eq!(
            fs::metadata(out.join("d/keep")).unwrap().ino(),
            fs::metadata(low.join("d/keep")).unwrap().ino()
        );
        assert_eq!(fs::read_to_string(low.join("f")).unwrap(), "old");
        assert!(low.join("gone").exists());
        // A directory holding a whiteout is marked so that overlayfs
        // filters it from listings even where nothing else merges it.
        assert_eq!(
            xattr::get(&out, "trusted.overlay.origin").unwrap(),
            Some(Vec::new())
        );
        // At the bottom of a chain, deleting is all there is to do.
        let bottom = t.path().join("bottom");
        fs::create_dir(&bottom).unwrap();
        squash(&[up, low], &bottom, true).unwrap();
        assert!(fs::symlink_metadata(bottom.join("gone")).is_err());
        assert!(fs::symlink_metadata(bottom.join("below")).is_err());
        assert_eq!(xattr::get(&bottom, "trusted.overlay.origin").unwrap(), None);
    }

    #[test]
    fn directories_that_hide_what_is_below_are_opaque() {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        for d in ["l1", "l2", "l3", "out"] {
            fs::create_dir_all(p(d)).unwrap();
        }
        // l1: a file `x` and a directory `m` with `a`.
        fs::write(p("l1/x"), "file").unwrap();
        fs::create_dir(p("l1/m")).unwrap();
        fs::write(p("l1/m/a"), "a").unwrap();
        // l2: `x` becomes a directory; `w` is deleted; `o` is made opaque.
        fs::create_dir(p("l2/x")).unwrap();
        fs::write(p("l2/x/in"), "in").unwrap();
        whiteout(&p("l2/w"));
        fs::create_dir(p("l2/o")).unwrap();
        xattr::set(p("l2/o"), "trusted.overlay.opaque", b"y").unwrap();
        xattr::set(p("l2/o"), "user.kept", b"v").unwrap();
        xattr::set(p("l1/m"), "user.old", b"o").unwrap();
        // l3: `w` comes back as a directory; `m` gains `b`.
        fs::create_dir(p("l3/w")).unwrap();
        fs::create_dir(p("l3/m")).unwrap();
        fs::write(p("l3/m/b"), "b").unwrap();
        squash(&[p("l3"), p("l2"), p("l1")], &p("out"), false).unwrap();
        let opaque = |n: &str| opaque_xattr(&p(n)).is_some();
        assert!(
            opaque("out/x"),
            "a directory over a file hides the layers below"
        );
        assert!(
            opaque("out/w"),
            "a directory over a whiteout hides the layers below"
        );
        assert!(opaque("out/o"), "an opaque directory stays opaque");
        assert_eq!(
            xattr::get(p("out/o"), "user.kept").unwrap(),
            Some(b"v".to_vec())
        );
        assert!(
            !opaque("out/m"),
            "a merged directory still shows the layers below"
        );
        assert_eq!(fs::read_to_string(p("out/m/a")).unwrap(), "a");
        assert_eq!(fs::read_to_string(p("out/m/b")).unwrap(), "b");
        assert_eq!(fs::read_to_string(p("out/x/in")).unwrap(), "in");
    }
}
