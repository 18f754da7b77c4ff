//! The applier: OCI layer tar -> directory, confined to the directory.
//!
//! Every write goes through `kiln-fs`. Every path is cleaned lexically
//! first (a `..` that would climb above the root is an error). Parent
//! directories are then opened inside a [`kiln_fs::Root`] with
//! [`Follow::InRoot`] (`openat2(RESOLVE_IN_ROOT)`), so symlinks met along
//! the way — absolute or relative, planted by this layer or an earlier one
//! — resolve as if the root were `/`; a missing parent is created
//! ([`Dangling::Fail`]: below a dangling link an entry fails, as it always
//! has here). The final component is always handled by [`kiln_fs::Dir`]'s
//! `*at` calls, which do not follow it. Nothing outside `root` is ever
//! created, written or removed.
//!
//! Speed: entries of one directory come together in a tar, so the last
//! parent opened is kept and reused while nothing is removed (a removal
//! is the only thing that can change what a path resolves to here; see
//! [`Applier::parent`]): one resolution per directory, not per file.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_fs::{Create, Dangling, Dir, DirSpec, Follow, Root};

use crate::ImageError;
use kiln_fs::overlay::{
    is_overlay_xattr, whiteout_target, XattrNs, OPAQUE_VALUE, WHITEOUT_OPAQUE, WHITEOUT_PREFIX,
};

/// What to do with whiteouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhiteoutMode {
    /// The target is an overlay upperdir: write whiteouts as 0/0 character
    /// devices and opaque markers as `<ns>.overlay.opaque=y`, in the
    /// namespace [`ApplyOptions::overlay_xattrs`] names.
    Overlay,
    /// The target is a full tree: delete what whiteouts name.
    Delete,
}

/// Counts from one apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries created (files, dirs, links, nodes).
    pub entries: u64,
    /// Whiteouts and opaque markers honoured.
    pub whiteouts: u64,
    /// Bytes of regular-file content written.
    pub content_bytes: u64,
    /// Entries skipped because their tar type has no meaning here
    /// (GNU sparse files, volume labels, ...).
    pub skipped: u64,
    /// Device nodes left out because [`ApplyOptions::skip_devices`] was
    /// set (and hard links to them), by path inside the root.
    pub skipped_devices: Vec<PathBuf>,
}

/// How [`apply_layer_with`] applies a layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Leave character and block device nodes out (listed in
    /// [`ApplyStats::skipped_devices`]): for trees on the host, such as a
    /// `type=local` export, where a node from an untrusted image would
    /// give whoever can open it the host's device.
    pub skip_devices: bool,
    /// Leave out what would make a file run with more privileges than its
    /// runner's: set-user-ID and set-group-ID bits of non-directories and
    /// `security.capability` xattrs. For trees on the host (a `type=local`
    /// export written as root): a setuid-root shell from an untrusted
    /// image in a directory other users reach would be theirs to run.
    pub strip_privileges: bool,
    /// The xattr namespace an overlay upperdir's opaque markers are
    /// written in ([`WhiteoutMode::Overlay`]): `trusted.` (the default,
    /// root) or `user.` (an overlay mounted with `userxattr`).
    pub overlay_xattrs: XattrNs,
}

fn cstr(b: &[u8]) -> Result<CString, ImageError> {
    CString::new(b).map_err(|_| ImageError::UnsafePath(String::from_utf8_lossy(b).into_owned()))
}

/// A kiln-fs error as the plain OS error it carries (the applier names
/// the path inside the layer itself).
fn io_of(e: kiln_fs::Error) -> io::Error {
    match e.raw_os_error() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

fn display(comps: &[Vec<u8>]) -> PathBuf {
    let mut p = PathBuf::new();
    for c in comps {
        p.push(OsStr::from_bytes(c));
    }
    p
}

/// Clean a tar path ([`kiln_fs::path::components_strict`]): drop leading
/// `/`, `.` and empty components; resolve `..` lexically; a `..` above the
/// root or a NUL byte is an error.
pub(crate) fn clean(raw: &[u8]) -> Result<Vec<Vec<u8>>, ImageError> {
    let unsafe_path = || ImageError::UnsafePath(String::from_utf8_lossy(raw).into_owned());
    if raw.contains(&0) {
        return Err(unsafe_path());
    }
    let comps = kiln_fs::path::components_strict(raw).ok_or_else(unsafe_path)?;
    Ok(comps.into_iter().map(<[u8]>::to_vec).collect())
}

struct Entry {
    comps: Vec<Vec<u8>>,
    kind: tar::EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    link: Option<Vec<u8>>,
    dev: (u32, u32),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Per-entry overrides gathered from PAX / GNU long-name headers.
#[derive(Default)]
struct Pending {
    pax: Vec<(Vec<u8>, Vec<u8>)>,
    global: Vec<(Vec<u8>, Vec<u8>)>,
    gnu_name: Option<Vec<u8>>,
    gnu_link: Option<Vec<u8>>,
}

fn read_meta_data<R: Read>(e: &mut tar::Entry<'_, R>) -> Result<Vec<u8>, ImageError> {
    let size = e.header().entry_size()?;
    if size > 16 * 1024 * 1024 {
        return Err(ImageError::Archive(format!(
            "metadata header of {size} bytes"
        )));
    }
    let mut d = Vec::with_capacity(size as usize);
    e.read_to_end(&mut d)?;
    Ok(d)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

fn read_entry<R: Read>(
    e: &mut tar::Entry<'_, R>,
    pending: &mut Pending,
) -> Result<Entry, ImageError> {
    let pax = std::mem::take(&mut pending.pax);
    let gnu_name = pending.gnu_name.take();
    let gnu_link = pending.gnu_link.take();
    let find = |key: &[u8]| -> Option<Vec<u8>> {
        pax.iter()
            .rev()
            .chain(pending.global.iter().rev())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let num = |key: &[u8]| -> Option<u64> {
        find(key).and_then(|v| {
            std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.split('.').next().and_then(|s| s.parse().ok()))
        })
    };
    let raw = find(b"path")
        .or(gnu_name)
        .unwrap_or_else(|| e.path_bytes().into_owned());
    let comps = clean(&raw)?;
    let h = e.header();
    let kind = h.entry_type();
    let mode = h.mode()?;
    let uid = num(b"uid").map_or_else(|| h.uid(), Ok)?;
    let gid = num(b"gid").map_or_else(|| h.gid(), Ok)?;
    let mtime = num(b"mtime").map_or_else(|| h.mtime(), Ok)? as i64;
    let dev = (
        h.device_major().ok().flatten().unwrap_or(0),
        h.device_minor().ok().flatten().unwrap_or(0),
    );
    let link = find(b"linkpath")
        .or(gnu_link)
        .or_else(|| e.link_name_bytes().map(|c| c.into_owned()));
    let mut xattrs = Vec::new();
    for (k, v) in &pax {
        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
            if !is_overlay_xattr(name) {
                xattrs.push((name.to_vec(), v.clone()));
            }
        }
    }
    let to_u32 =
        |v: u64| u32::try_from(v).map_err(|_| ImageError::Archive(format!("id {v} out of range")));
    Ok(Entry {
        comps,
        kind,
        mode,
        uid: to_u32(uid)?,
        gid: to_u32(gid)?,
        mtime,
        link,
        dev,
        xattrs,
    })
}

/// What a series of layers applied over a directory that holds files of
/// its own (a `type=local` export's `dest`) wrote there: whiteouts and
/// opaque directories remove only these, never what was there before the
/// first layer (BuildKit's local exporter merges the image's final tree
/// into `dest` and deletes nothing of its own either).
#[derive(Debug, Default)]
pub struct Merge {
    ours: Paths,
}

/// Paths in a layer, by component.
type Paths = std::collections::BTreeSet<Vec<Vec<u8>>>;

struct Applier {
    root: Root,
    mode: WhiteoutMode,
    opts: ApplyOptions,
    /// With [`apply_layer_merging`]: the paths the earlier layers and this
    /// one wrote.
    ours: Option<Paths>,
    created: HashSet<Vec<Vec<u8>>>,
    skipped_devices: HashSet<Vec<Vec<u8>>>,
    dir_times: Vec<(Vec<Vec<u8>>, i64)>,
    stats: ApplyStats,
    /// The last parent directory opened, by its path in the layer.
    last: Option<(Vec<Vec<u8>>, Dir)>,
}

/// Apply an uncompressed layer tar to `root`.
///
/// Keeps modes (setuid/setgid/sticky too), ownership, mtimes, xattrs
/// (including `security.capability`), hardlinks, symlinks, device nodes and
/// fifos. Whiteouts are handled according to `mode`. Entries whose names
/// climb out of the root with `..` fail the apply with
/// [`ImageError::UnsafePath`]; absolute names and symlinks are confined to
/// `root`. For compressed layers wrap the reader with
/// [`crate::compression::decompress_auto`].
pub fn apply_layer(
    tar: impl Read,
    root: &Path,
    mode: WhiteoutMode,
) -> Result<ApplyStats, ImageError> {
    apply_layer_with(tar, root, mode, &ApplyOptions::default())
}

/// [`apply_layer`] with options (e.g. leaving device nodes out).
pub fn apply_layer_with(
    tar: impl Read,
    root: &Path,
    mode: WhiteoutMode,
    opts: &ApplyOptions,
) -> Result<ApplyStats, ImageError> {
    apply_inner(tar, root, mode, opts, None).map(|(st, _)| st)
}

/// One layer of a series applied over a directory that has files of its
/// own ([`WhiteoutMode::Delete`]): whiteouts remove only what the series
/// wrote (see [`Merge`]; pass the same `merge` for every layer, in order).
pub fn apply_layer_merging(
    tar: impl Read,
    root: &Path,
    opts: &ApplyOptions,
    merge: &mut Merge,
) -> Result<ApplyStats, ImageError> {
    let ours = std::mem::take(&mut merge.ours);
    let (st, ours) = apply_inner(tar, root, WhiteoutMode::Delete, opts, Some(ours))?;
    merge.ours = ours.unwrap_or_default();
    Ok(st)
}

fn apply_inner(
    tar: impl Read,
    root: &Path,
    mode: WhiteoutMode,
    opts: &ApplyOptions,
    ours: Option<Paths>,
) -> Result<(ApplyStats, Option<Paths>), ImageError> {
    let mut ap = Applier {
        root: Root::open(root).map_err(|e| ImageError::path("open", root, io_of(e)))?,
        mode,
        opts: *opts,
        ours,
        created: HashSet::new(),
        skipped_devices: HashSet::new(),
        dir_times: Vec::new(),
        stats: ApplyStats::default(),
        last: None,
    };
    let mut ar = tar::Archive::new(tar);
    let mut pending = Pending::default();
    // raw mode: PAX and GNU long-name headers are parsed here, because the
    // tar crate's PAX parser splits on newlines and binary xattr values
    // (security.capability) may contain them
    for entry in ar.entries()?.raw(true) {
        let mut entry = entry?;
        match entry.header().entry_type() {
            tar::EntryType::XHeader => {
                pending.pax = crate::tarw::parse_pax(&read_meta_data(&mut entry)?)?;
                continue;
            }
            tar::EntryType::XGlobalHeader => {
                pending.global = crate::tarw::parse_pax(&read_meta_data(&mut entry)?)?;
                continue;
            }
            tar::EntryType::GNULongName => {
                pending.gnu_name = Some(trim_nul(read_meta_data(&mut entry)?));
                continue;
            }
            tar::EntryType::GNULongLink => {
                pending.gnu_link = Some(trim_nul(read_meta_data(&mut entry)?));
                continue;
            }
            _ => {}
        }
        let meta = read_entry(&mut entry, &mut pending)?;
        ap.apply(meta, &mut entry)?;
    }
    // directory mtimes last (children changed them), deepest first
    let times = std::mem::take(&mut ap.dir_times);
    for (comps, mtime) in times.into_iter().rev() {
        let (parent, name) = comps.split_at(comps.len() - 1);
        let pdir = ap
            .root
            .open_dir(display(parent), Follow::InRoot)
            .map_err(|e| ImageError::path("open", display(parent), io_of(e)))?;
        pdir.set_times(os(&name[0]), (mtime, 0))
            .map_err(|e| ImageError::path("utimensat", display(&comps), io_of(e)))?;
    }
    Ok((ap.stats, ap.ours))
}

impl Applier {
    /// The directory `comps` inside the root, symlinks on the way followed
    /// inside it; with `create`, missing directories are made (0755), but
    /// never below a dangling link ([`Dangling::Fail`]). The last one
    /// opened is reused for the next entries of the same directory: that
    /// is sound because a resolution that succeeded can only change when
    /// an entry on the way is removed or replaced, and every removal the
    /// applier makes goes through [`Applier::removed`], which forgets it.
    fn parent<'a>(
        root: &Root,
        last: &'a mut Option<(Vec<Vec<u8>>, Dir)>,
        comps: &[Vec<u8>],
        create: bool,
    ) -> io::Result<&'a Dir> {
        let hit = matches!(last, Some((c, _)) if c.as_slice() == comps);
        if !hit {
            let rel = display(comps);
            let dir = match root.open_dir(&rel, Follow::InRoot) {
                Ok(d) => d,
                Err(e) if create && e.is_not_found() => root
                    .mkdir_all_ext(
                        &rel,
                        Follow::InRoot,
                        Dangling::Fail,
                        &mut |_| DirSpec::default(),
                        &mut |_, _| Ok(()),
                    )
                    .map_err(io_of)?,
                Err(e) => return Err(io_of(e)),
            };
            *last = Some((comps.to_vec(), dir));
        }
        match last {
            Some((_, d)) => Ok(d),
            None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }

    /// Something was removed: a cached parent may no longer be what its
    /// path names.
    fn removed(&mut self) {
        self.last = None;
    }

    fn apply(&mut self, mut e: Entry, data: &mut dyn Read) -> Result<(), ImageError> {
        if self.opts.strip_privileges {
            if e.kind != tar::EntryType::Directory {
                e.mode &= !(libc::S_ISUID | libc::S_ISGID);
            }
            e.xattrs
                .retain(|(k, _)| k.as_slice() != b"security.capability");
        }
        let Some((name, parent)) = e.comps.split_last() else {
            // the root itself ("./"): leave the target root as it is
            return Ok(());
        };
        let path = display(&e.comps);
        let perr = |op: &'static str| {
            let path = path.clone();
            move |err: io::Error| ImageError::path(op, path, err)
        };
        let ferr = |op: &'static str| {
            let path = path.clone();
            move |err: kiln_fs::Error| ImageError::path(op, path, io_of(err))
        };
        if name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(parent, name, &path);
        }
        let oname = os(name);
        if self.opts.skip_devices {
            let device = matches!(e.kind, tar::EntryType::Char | tar::EntryType::Block);
            let link_to_device = e.kind == tar::EntryType::Link
                && e.link
                    .as_deref()
                    .is_some_and(|l| clean(l).is_ok_and(|c| self.skipped_devices.contains(&c)));
            if device || link_to_device {
                // The node would have replaced what an earlier layer had.
                if let Ok(pdir) = Self::parent(&self.root, &mut self.last, parent, false) {
                    pdir.remove_all(oname).map_err(ferr("remove"))?;
                }
                self.removed();
                self.skipped_devices.insert(e.comps.clone());
                self.stats.skipped_devices.push(path);
                return Ok(());
            }
        }
        let is_dir = e.kind == tar::EntryType::Directory;
        let existing = {
            let pdir = Self::parent(&self.root, &mut self.last, parent, true)
                .map_err(perr("mkdir parents of"))?;
            pdir.stat(oname).map_err(ferr("lstat"))?
        };
        if let Some(st) = existing {
            if !(is_dir && st.is_dir()) {
                let pdir = Self::parent(&self.root, &mut self.last, parent, true)
                    .map_err(perr("mkdir parents of"))?;
                pdir.remove_all(oname).map_err(ferr("remove"))?;
                self.removed();
            }
        }
        use tar::EntryType as T;
        // A hard link's target is resolved from the root (it may be
        // anywhere in the layer), before the parent is borrowed.
        let link_from = if e.kind == T::Link {
            let raw = e.link.as_deref().unwrap_or(b"");
            let tcomps = clean(raw)?;
            let Some((tname, tparent)) = tcomps.split_last() else {
                return Err(ImageError::UnsafePath(format!(
                    "{}: hardlink to the root",
                    path.display()
                )));
            };
            let tdir = self
                .root
                .open_dir(display(tparent), Follow::InRoot)
                .map_err(ferr("resolve hardlink target of"))?;
            Some((tdir, tname.clone()))
        } else {
            None
        };
        let pdir = Self::parent(&self.root, &mut self.last, parent, true)
            .map_err(perr("mkdir parents of"))?;
        let mut file: Option<File> = None;
        match e.kind {
            T::Regular | T::Continuous => {
                let mut f = pdir
                    .create_file_unset(oname, Create::Exclusive)
                    .map_err(ferr("create"))?;
                let n = io::copy(data, &mut f).map_err(perr("write"))?;
                self.stats.content_bytes += n;
                // Once written: owner first (chown clears set-id bits and
                // security.capability), then the mode, on the open file.
                kiln_fs::set_owner_mode(&f, Some((e.uid, e.gid)), e.mode).map_err(perr("chown"))?;
                file = Some(f);
            }
            T::Directory => {
                pdir.mkdir(oname, 0o700).map_err(ferr("mkdir"))?;
            }
            T::Symlink => {
                let target = e.link.as_deref().unwrap_or(b"");
                cstr(target)?;
                pdir.symlink(oname, os(target)).map_err(ferr("symlink"))?;
            }
            T::Link => {
                if let Some((tdir, tname)) = &link_from {
                    pdir.hard_link(oname, tdir, os(tname))
                        .map_err(ferr("link"))?;
                }
                self.created.insert(e.comps.clone());
                if let Some(o) = &mut self.ours {
                    o.insert(e.comps.clone());
                }
                self.stats.entries += 1;
                // a hardlink shares the target's metadata
                return Ok(());
            }
            T::Char | T::Block | T::Fifo => {
                let kind = match e.kind {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let dev = libc::makedev(e.dev.0, e.dev.1);
                pdir.mknod(oname, kind | 0o600, dev)
                    .map_err(ferr("mknod"))?;
            }
            _ => {
                self.stats.skipped += 1;
                return Ok(());
            }
        }
        self.created.insert(e.comps.clone());
        if let Some(o) = &mut self.ours {
            o.insert(e.comps.clone());
        }
        self.stats.entries += 1;
        if file.is_none() {
            // ownership first: chown clears setuid bits and security.capability
            pdir.chown(oname, e.uid, e.gid).map_err(ferr("chown"))?;
            if e.kind != T::Symlink {
                pdir.chmod(oname, e.mode).map_err(ferr("chmod"))?;
            }
        }
        for (k, v) in &e.xattrs {
            if let Err(err) = pdir.set_xattr(oname, k, v) {
                // user.* xattrs are not allowed on symlinks and device nodes;
                // a filesystem may lack a namespace. Those are not fatal.
                let benign = matches!(err.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOTSUP))
                    && (e.kind == T::Symlink || !k.starts_with(b"security.capability"));
                if !benign {
                    return Err(ImageError::path("setxattr", path, io_of(err)));
                }
            }
        }
        if e.kind == T::Directory {
            self.dir_times.push((e.comps.clone(), e.mtime));
        } else {
            drop(file);
            pdir.set_times(oname, (e.mtime, 0))
                .map_err(ferr("utimensat"))?;
        }
        Ok(())
    }

    /// Removes `prefix` and what is below it, as far as the layers of
    /// this merge wrote them (see [`Merge`]): deepest first, a directory
    /// only once empty (what was there before stays, and so do the
    /// directories holding it).
    fn remove_ours(&mut self, prefix: &[Vec<u8>]) -> Result<(), ImageError> {
        let Some(ours) = &mut self.ours else {
            return Ok(());
        };
        let mut victims: Vec<Vec<Vec<u8>>> = ours
            .range(prefix.to_vec()..)
            .take_while(|p| p.starts_with(prefix))
            .cloned()
            .collect();
        if victims.is_empty() {
            return Ok(());
        }
        for v in &victims {
            ours.remove(v);
        }
        self.removed();
        victims.sort_by_key(|v| std::cmp::Reverse(v.len()));
        for v in victims {
            let Some((name, parent)) = v.split_last() else {
                continue;
            };
            let pdir = match self.root.open_dir(display(parent), Follow::InRoot) {
                Ok(d) => d,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(ImageError::path("open", display(parent), io_of(e))),
            };
            match pdir.remove(os(name)) {
                Ok(()) => {}
                // A directory that holds what was there before.
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
                Err(e) => return Err(ImageError::path("remove", display(&v), io_of(e))),
            }
        }
        Ok(())
    }

    fn whiteout(&mut self, parent: &[Vec<u8>], name: &[u8], path: &Path) -> Result<(), ImageError> {
        let perr = |op: &'static str| {
            let path = path.to_path_buf();
            move |err: io::Error| ImageError::path(op, path, err)
        };
        let ferr = |op: &'static str| {
            let path = path.to_path_buf();
            move |err: kiln_fs::Error| ImageError::path(op, path, io_of(err))
        };
        self.stats.whiteouts += 1;
        if name == WHITEOUT_OPAQUE.as_bytes() {
            let mode = self.mode;
            let pdir = Self::parent(&self.root, &mut self.last, parent, true)
                .map_err(perr("mkdir opaque dir"))?;
            match mode {
                WhiteoutMode::Overlay => {
                    pdir.set_xattr_self(self.opts.overlay_xattrs.opaque().as_bytes(), OPAQUE_VALUE)
                        .map_err(ferr("setxattr overlay opaque"))?;
                }
                WhiteoutMode::Delete if self.ours.is_some() => {
                    let children = pdir.read_dir().map_err(ferr("readdir"))?;
                    for child in children {
                        let mut c = parent.to_vec();
                        c.push(child.as_bytes().to_vec());
                        if !self.created.contains(&c) {
                            self.remove_ours(&c)?;
                        }
                    }
                }
                WhiteoutMode::Delete => {
                    let mut gone = false;
                    for child in pdir.read_dir().map_err(ferr("readdir"))? {
                        let mut c = parent.to_vec();
                        c.push(child.as_bytes().to_vec());
                        if !self.created.contains(&c) {
                            pdir.remove_all(&child).map_err(ferr("remove"))?;
                            gone = true;
                        }
                    }
                    if gone {
                        self.removed();
                    }
                }
            }
            return Ok(());
        }
        let Some(target) = whiteout_target(name) else {
            // other AUFS bookkeeping names (`.wh..wh.*`): meaningless here
            self.stats.whiteouts -= 1;
            self.stats.skipped += 1;
            return Ok(());
        };
        if target.is_empty() || target == b"." || target == b".." {
            return Err(ImageError::UnsafePath(path.display().to_string()));
        }
        cstr(target)?;
        let otarget = os(target);
        match self.mode {
            WhiteoutMode::Delete if self.ours.is_some() => {
                let mut t = parent.to_vec();
                t.push(target.to_vec());
                self.remove_ours(&t)?;
            }
            WhiteoutMode::Delete => {
                let pdir = match Self::parent(&self.root, &mut self.last, parent, false) {
                    Ok(d) => d,
                    Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                    Err(err) => return Err(ImageError::path("open", path, err)),
                };
                pdir.remove_all(otarget).map_err(ferr("remove"))?;
                self.removed();
            }
            WhiteoutMode::Overlay => {
                let pdir = Self::parent(&self.root, &mut self.last, parent, true)
                    .map_err(perr("mkdir parents of"))?;
                pdir.remove_all(otarget).map_err(ferr("remove"))?;
                pdir.mknod(otarget, libc::S_IFCHR, 0)
                    .map_err(ferr("mknod whiteout"))?;
                self.removed();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_devices_leaves_nodes_and_links_to_them_out() {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, kind: tar::EntryType, link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(0o644);
            h.set_size(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            if kind == tar::EntryType::Block {
                h.set_device_major(7).unwrap();
                h.set_device_minor(0).unwrap();
            }
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            b.append_data(&mut h, name, &[][..]).unwrap();
        };
        add("dev/", tar::EntryType::Directory, None);
        add("dev/loop", tar::EntryType::Block, None);
        add("dev/again", tar::EntryType::Link, Some("dev/loop"));
        add("dev/fifo", tar::EntryType::Fifo, None);
        add("file", tar::EntryType::Regular, None);
        let bytes = b.into_inner().unwrap();
        let t = tempfile::tempdir().unwrap();
        let opts = ApplyOptions {
            skip_devices: true,
            ..ApplyOptions::default()
        };
        let st = apply_layer_with(&bytes[..], t.path(), WhiteoutMode::Delete, &opts).unwrap();
        assert_eq!(
            st.skipped_devices,
            vec![PathBuf::from("dev/loop"), PathBuf::from("dev/again")]
        );
        assert!(std::fs::symlink_metadata(t.path().join("dev/loop")).is_err());
        assert!(std::fs::symlink_metadata(t.path().join("dev/again")).is_err());
        assert!(t.path().join("dev/fifo").exists() && t.path().join("file").exists());
    }

    #[test]
    fn clean_paths() {
        let c = |s: &str| clean(s.as_bytes()).map(|v| v.join(&b'/'));
        assert_eq!(c("./a/b/").ok(), Some(b"a/b".to_vec()));
        assert_eq!(c("/abs/x").ok(), Some(b"abs/x".to_vec()));
        assert_eq!(c("a/../b").ok(), Some(b"b".to_vec()));
        assert!(c("../../etc/x").is_err());
        assert!(c("a/../../x").is_err());
        assert_eq!(c(".").ok(), Some(Vec::new()));
    }
}
