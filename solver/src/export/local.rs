//! `-o type=local`: the image's final tree merged into a directory of the
//! host.
//!
//! The layers are applied first into a private directory of the store
//! (whiteouts and opaque directories resolved there), and only that final
//! tree is merged into `dest`, every write through descriptors of the
//! destination opened once:
//!
//! * nothing of what `dest` held is deleted but what a final entry of
//!   the image replaces (a file over a file or symlink, a directory over a
//!   file or symlink); a final file where `dest` has a directory is an
//!   error, not a deletion — an entry an earlier layer made and a later
//!   one removed never reaches `dest` at all;
//! * a symlink in `dest` is never followed: a file over it replaces the
//!   link (written under a temporary name, renamed over it);
//! * what the export writes belongs to the user running kiln (BuildKit's
//!   local exporter gives files the client's owner), without set-id bits
//!   on files and with only `user.` extended attributes; device nodes are
//!   left out (see [`super::unpack_rootfs`]); a directory `dest` already
//!   had keeps its owner, mode and times.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};

use kiln_fs::{Create, Dir, Follow, Root, Stat};

use super::ExportError;

/// Opens `dest` (created if missing) as the root of an export: the path
/// is resolved once, here; everything after goes through the descriptor
/// (a `dest` swapped for a symlink meanwhile changes nothing). The host's
/// `/` is refused.
pub(crate) fn open_dest(dest: &Path) -> Result<Root, ExportError> {
    // A dest that is a symlink another user made (`/tmp/out -> /etc`
    // planted where protected_symlinks is off) is never followed: root
    // merged the image into its target.
    if let Ok(m) = std::fs::symlink_metadata(dest) {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: no arguments, cannot fail.
        let me = unsafe { libc::geteuid() };
        if m.file_type().is_symlink() && m.uid() != me && m.uid() != 0 {
            return Err(ExportError::Usage(format!(
                "{} is a symlink of uid {}: not followed (pass the directory it names)",
                dest.display(),
                m.uid()
            )));
        }
    }
    std::fs::create_dir_all(dest)?;
    let root = Root::open(dest).map_err(io::Error::from)?;
    let st = root.dir().stat_self().map_err(io::Error::from)?;
    let top = std::fs::metadata("/")?;
    use std::os::unix::fs::MetadataExt;
    if (st.dev(), st.ino()) == (top.dev(), top.ino()) {
        return Err(ExportError::Usage(format!(
            "refusing to export the image's filesystem over / (dest={})",
            dest.display()
        )));
    }
    Ok(root)
}

/// Merges the tree at `src` (the image's final filesystem, made by kiln)
/// into `dst` (see the module doc).
pub(crate) fn merge_tree(src: &Root, dst: &Root) -> Result<(), ExportError> {
    // SAFETY: no arguments, cannot fail.
    let owner = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut m = Merger {
        src,
        dst,
        owner,
        links: HashMap::new(),
        made_dirs: Vec::new(),
        seq: 0,
    };
    let mut failed = None;
    let walked = src.walk(&mut |rel, st| {
        if rel.as_os_str().is_empty() {
            return Ok(kiln_fs::Walk::Into);
        }
        match m.entry(rel, st) {
            Ok(()) => Ok(kiln_fs::Walk::Into),
            Err(e) => {
                failed = Some(e);
                Err(kiln_fs::Error::new(
                    "export",
                    rel,
                    io::Error::other("stopped"),
                ))
            }
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    walked.map_err(io::Error::from)?;
    // The directories this export made: their metadata last, deepest
    // first, so that filling them changes neither their times nor needs
    // them writable.
    for (rel, st) in m.made_dirs.iter().rev() {
        let (dir, name) = dst.parent(rel, Follow::Never).map_err(io::Error::from)?;
        m.finish(&dir, &name, rel, st)?;
    }
    Ok(())
}

struct Merger<'a> {
    src: &'a Root,
    dst: &'a Root,
    owner: (u32, u32),
    /// Hard-linked files already written: (dev, ino) in `src` -> path.
    links: HashMap<(u64, u64), PathBuf>,
    /// Directories this export created, with the image's metadata.
    made_dirs: Vec<(PathBuf, Stat)>,
    seq: u64,
}

impl Merger<'_> {
    fn entry(&mut self, rel: &Path, st: &Stat) -> Result<(), ExportError> {
        let (dir, name) = self
            .dst
            .parent(rel, Follow::Never)
            .map_err(io::Error::from)?;
        let there = dir.stat(&name).map_err(io::Error::from)?;
        if st.is_dir() {
            match there {
                // The user's own directory: kept as it is.
                Some(t) if t.is_dir() => return Ok(()),
                Some(_) => dir.remove(&name).map_err(io::Error::from)?,
                None => {}
            }
            dir.mkdir(&name, 0o700).map_err(io::Error::from)?;
            self.made_dirs.push((rel.to_path_buf(), *st));
            return Ok(());
        }
        if there.is_some_and(|t| t.is_dir()) {
            return Err(ExportError::Usage(format!(
                "{} is a directory and the image has a file there: not replaced (remove it or pick another dest)",
                self.dst.path().join(rel).display()
            )));
        }
        let kind = st.kind();
        if kind != libc::S_IFREG && kind != libc::S_IFLNK && kind != libc::S_IFIFO {
            // Sockets (and device nodes, which the unpack left out).
            return Ok(());
        }
        // Written under a temporary name, then renamed over whatever is
        // there (never written through it).
        let tmp = self.temp_name(&dir)?;
        let made = self.make(&dir, &tmp, rel, st);
        let made = made.and_then(|()| self.finish(&dir, &tmp, rel, st));
        if let Err(e) = made {
            let _ = dir.remove(&tmp);
            return Err(e);
        }
        dir.rename(&tmp, &dir, &name).map_err(io::Error::from)?;
        Ok(())
    }

    /// A name free in `dir` for the entry being written.
    fn temp_name(&mut self, dir: &Dir) -> Result<OsString, ExportError> {
        loop {
            self.seq += 1;
            let n = OsString::from(format!(".kiln-export-{}-{}", std::process::id(), self.seq));
            if dir.stat(&n).map_err(io::Error::from)?.is_none() {
                return Ok(n);
            }
        }
    }

    fn make(&mut self, dir: &Dir, tmp: &OsStr, rel: &Path, st: &Stat) -> Result<(), ExportError> {
        let (sdir, sname) = self
            .src
            .parent(rel, Follow::Never)
            .map_err(io::Error::from)?;
        if st.nlink() > 1 && !st.is_symlink() {
            if let Some(first) = self.links.get(&(st.dev(), st.ino())) {
                let (fdir, fname) = self
                    .dst
                    .parent(first, Follow::Never)
                    .map_err(io::Error::from)?;
                dir.hard_link(tmp, &fdir, &fname).map_err(io::Error::from)?;
                return Ok(());
            }
            self.links.insert((st.dev(), st.ino()), rel.to_path_buf());
        }
        match st.kind() {
            libc::S_IFLNK => {
                let target = sdir.read_link(&sname).map_err(io::Error::from)?;
                dir.symlink(tmp, &target).map_err(io::Error::from)?;
            }
            libc::S_IFIFO => {
                dir.mknod(tmp, libc::S_IFIFO | 0o600, 0)
                    .map_err(io::Error::from)?;
            }
            _ => {
                let from = sdir.open_file(&sname).map_err(io::Error::from)?;
                let to = dir
                    .create_file_unset(tmp, Create::Exclusive)
                    .map_err(io::Error::from)?;
                crate::copy::copy_content(&from, &to).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("writing {}: {e}", self.dst.path().join(rel).display()),
                    )
                })?;
            }
        }
        Ok(())
    }

    /// The user's ownership, the image's mode (no set-id bit on a
    /// non-directory) and times, and its `user.` extended attributes, on
    /// `name` in `dir` (the entry `rel` of the image).
    fn finish(&self, dir: &Dir, name: &OsStr, rel: &Path, st: &Stat) -> Result<(), ExportError> {
        let (uid, gid) = self.owner;
        dir.chown(name, uid, gid).map_err(io::Error::from)?;
        copy_user_xattrs(&self.src.path().join(rel), dir, name)?;
        if !st.is_symlink() {
            let mode = if st.is_dir() {
                st.mode() & 0o7777
            } else {
                st.mode() & 0o1777
            };
            dir.chmod(name, mode).map_err(io::Error::from)?;
        }
        dir.set_times(name, st.mtime()).map_err(io::Error::from)?;
        Ok(())
    }
}

/// The `user.` extended attributes of `src` (a path in kiln's own tree,
/// read without following it) onto `name` in `dir`. Others
/// (`security.*`, `trusted.*`, ACLs in `system.*`) stay in the image: on
/// the host they would label files, grant access or steer an overlay
/// mount.
fn copy_user_xattrs(src: &Path, dir: &Dir, name: &OsStr) -> Result<(), ExportError> {
    for (key, value) in kiln_fs::xattrs_of(src)? {
        if !key.as_bytes().starts_with(b"user.") {
            continue;
        }
        match dir.set_xattr(name, key.as_bytes(), &value) {
            Ok(()) => {}
            // A file system without user xattrs (tmpfs of old kernels), or
            // none on a symlink: the data is what was asked for.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::EPERM)) => {}
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
    Ok(())
}
