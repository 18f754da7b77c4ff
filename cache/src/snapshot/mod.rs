//! Snapshotters, in containerd's lifecycle terms.
//!
//! ```text
//!   prepare(key, parent) ──► active (writable) ──commit(name, key)──► committed
//!   view(key, parent)    ──► view (read-only)                          (may be a parent)
//!   remove(key)          ──► gone (a committed snapshot only once it has no children)
//! ```
//!
//! `prepare`/`view`/`mounts` return [`Mount`]s *as data*; whoever runs the
//! process performs them (the executor, inside the child's mount
//! namespace). Two implementations share one conformance suite
//! (`tests/snapshotter.rs`): [`OverlaySnapshotter`] (each layer a directory,
//! an active snapshot = parents as lowerdirs + a fresh upperdir, short link
//! names so 500 lowerdirs fit one page) and [`NativeSnapshotter`] (full
//! copies, reflinked where the filesystem can).

mod copy;
mod mount;
mod native;
mod overlay;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use mount::{CompactMount, Mount};
pub use native::NativeSnapshotter;
pub use overlay::OverlaySnapshotter;

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::meta::{Kind, Meta, SnapshotRow};
use crate::util::{disk_usage, now_unix, random_hex, remove_all, FileLock};

/// What [`Snapshotter::stat`] and [`Snapshotter::walk`] report.
pub type Info = SnapshotRow;

/// Disk space used by one snapshot's own directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Usage {
    /// Bytes allocated.
    pub size: u64,
    /// Inodes used.
    pub inodes: u64,
}

/// How to turn an active snapshot into a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffSource {
    /// Walk only the overlay upperdir (O(change)); 0/0 char devices are
    /// whiteouts and `trusted.overlay.opaque=y` marks opaque directories
    /// (`kiln_image::diff::write_overlay_diff`).
    Overlay {
        /// The upperdir.
        upper: PathBuf,
    },
    /// Compare two full trees (`kiln_image::diff::write_tree_diff`).
    Tree {
        /// The parent's full tree (None: the layer is the whole tree).
        lower: Option<PathBuf>,
        /// This snapshot's full tree.
        upper: PathBuf,
        /// When the copy of `lower` that `upper` began as was finished:
        /// what changed after it has its contents compared (see
        /// `kiln_image::diff::write_tree_diff_since`).
        since: Option<(i64, i64)>,
    },
}

impl DiffSource {
    /// Writes the layer tar (the one writer both differs share, so a
    /// layer hashed at commit and written again on export is the same
    /// bytes).
    pub fn write_tar(
        &self,
        out: impl std::io::Write,
        opts: &kiln_image::diff::DiffOptions,
    ) -> std::result::Result<kiln_image::diff::DiffStats, kiln_image::ImageError> {
        match self {
            DiffSource::Overlay { upper } => kiln_image::diff::write_overlay_diff(upper, out, opts),
            DiffSource::Tree {
                lower,
                upper,
                since,
            } => {
                kiln_image::diff::write_tree_diff_since(lower.as_deref(), upper, out, opts, *since)
            }
        }
    }

    /// The layer tar's digest (its diffID) and size, without writing it
    /// anywhere: the tar is written on a second thread and hashed on
    /// this one, so reading the files and hashing overlap. Also the disk
    /// usage of the snapshot's directory when the walk measured it
    /// (for [`Snapshotter::commit_measured`]).
    pub fn digest(
        &self,
        opts: &kiln_image::diff::DiffOptions,
    ) -> std::result::Result<(crate::Digest, u64, Option<Usage>), kiln_image::ImageError> {
        let (mut w, mut r) = crate::chunkpipe::chunk_pipe();
        std::thread::scope(|s| {
            let writer = s.spawn(move || {
                let res = self.write_tar(&mut w, opts);
                let flushed = std::io::Write::flush(&mut w);
                // The hasher sees the end of the stream once `w` is gone.
                drop(w);
                res.and_then(|stats| flushed.map(|_| stats).map_err(kiln_image::ImageError::from))
            });
            let mut h = crate::Hasher::new();
            r.for_each_chunk(|c| h.update(c));
            drop(r);
            let wrote = writer.join().map_err(|_| {
                kiln_image::ImageError::from(std::io::Error::other("diff writer panicked"))
            })?;
            let usage = wrote?.usage.map(|(size, inodes)| Usage { size, inodes });
            let len = h.len();
            Ok((h.finish(), len, usage))
        })
    }
}

/// How a layer must be applied into [`Snapshotter::writable_dir`]
/// (mirrors `kiln_image::apply::WhiteoutMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyMode {
    /// Write whiteouts as overlay 0/0 char devices and opaque xattrs (the
    /// directory is an upperdir over the parents).
    Overlay,
    /// Delete what whiteouts name (the directory is a full copy of the
    /// parent).
    Delete,
}

/// The lifecycle methods both snapshotters implement the same way: on
/// their shared `core` bookkeeping plus their own `create` and
/// `mounts_for`.
macro_rules! lifecycle_on_core {
    () => {
        fn prepare(&self, key: &str, parent: Option<&str>) -> Result<Vec<Mount>> {
            let row = self.create(key, parent, Kind::Active)?;
            self.mounts_for(&row)
        }

        fn view(&self, key: &str, parent: Option<&str>) -> Result<Vec<Mount>> {
            let row = self.create(key, parent, Kind::View)?;
            self.mounts_for(&row)
        }

        fn commit(&self, name: &str, key: &str) -> Result<()> {
            let row = self.core.get(key)?;
            self.core.commit(name, key, &self.core.fs(&row.id), None)
        }

        fn commit_measured(&self, name: &str, key: &str, usage: Usage) -> Result<()> {
            let row = self.core.get(key)?;
            self.core
                .commit(name, key, &self.core.fs(&row.id), Some(usage))
        }

        fn remove(&self, key: &str) -> Result<()> {
            self.core.remove(key)
        }

        fn retire(&self, key: &str) -> Result<()> {
            self.core.retire(key)
        }

        fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
            let row = self.core.get(key)?;
            self.mounts_for(&row)
        }

        fn stat(&self, key: &str) -> Result<Info> {
            self.core.get(key)
        }

        fn chain(&self, key: &str) -> Result<Vec<Arc<Info>>> {
            self.core.chain(key)
        }

        fn usage(&self, key: &str) -> Result<Usage> {
            let row = self.core.get(key)?;
            self.core.usage(key, &self.core.fs(&row.id))
        }

        fn walk(&self, f: &mut dyn FnMut(&Info) -> Result<()>) -> Result<()> {
            self.core.walk(f)
        }

        fn writable_dir(&self, key: &str) -> Result<PathBuf> {
            let row = self.core.get(key)?;
            if row.kind != Kind::Active {
                return Err(Error::InvalidState(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            Ok(self.core.fs(&row.id))
        }
    };
}
pub(crate) use lifecycle_on_core;

/// Name prefix of retired snapshot directories under `<root>/tmp`.
pub(crate) const RETIRED_PREFIX: &str = "retired-";

/// A snapshotter (see the module doc for the lifecycle).
pub trait Snapshotter: Send + Sync {
    /// "overlay" or "native".
    fn name(&self) -> &'static str;

    /// Create the active (writable) snapshot `key` on top of the committed
    /// snapshot `parent`, returning the mounts that show it.
    fn prepare(&self, key: &str, parent: Option<&str>) -> Result<Vec<Mount>>;

    /// Create the read-only snapshot `key` showing the committed `parent`.
    fn view(&self, key: &str, parent: Option<&str>) -> Result<Vec<Mount>>;

    /// Turn the active snapshot `key` into the committed snapshot `name`
    /// (its content is synced to disk first). `key` no longer exists after.
    fn commit(&self, name: &str, key: &str) -> Result<()>;

    /// [`Snapshotter::commit`] with the disk usage of the snapshot's own
    /// directory already measured (by the diff walk that read all of it),
    /// so it is not walked again.
    fn commit_measured(&self, name: &str, key: &str, usage: Usage) -> Result<()>;

    /// Remove a snapshot (a committed one only once it has no children).
    fn remove(&self, key: &str) -> Result<()>;

    /// Remove a snapshot's row now and leave its directory, moved under
    /// the store's tmp directory, for `prune` (or
    /// [`crate::Store::sweep_retired`]) to delete: for an active snapshot
    /// whose result turned out to exist already. Freeing tens of thousands
    /// of inodes costs time now, and on ext4 freshly freed inodes make the
    /// next build's file creation scan past them; BuildKit likewise leaves
    /// replaced results to its garbage collector.
    fn retire(&self, key: &str) -> Result<()>;

    /// The mounts of an active or view snapshot (again).
    fn mounts(&self, key: &str) -> Result<Vec<Mount>>;

    /// A snapshot's metadata.
    fn stat(&self, key: &str) -> Result<Info>;

    /// The snapshot `key` and its ancestors, nearest first (remembered
    /// for committed snapshots, whose chains never change).
    fn chain(&self, key: &str) -> Result<Vec<Arc<Info>>>;

    /// Disk space used by the snapshot's own directory.
    fn usage(&self, key: &str) -> Result<Usage>;

    /// Visit every snapshot.
    fn walk(&self, f: &mut dyn FnMut(&Info) -> Result<()>) -> Result<()>;

    /// The directory writes to the active snapshot `key` land in: the
    /// overlay upperdir, or the native snapshot's full tree. Apply a layer
    /// here (see [`Snapshotter::apply_mode`]) or let the executor mount it.
    fn writable_dir(&self, key: &str) -> Result<PathBuf>;

    /// How to apply a layer into [`Snapshotter::writable_dir`].
    fn apply_mode(&self) -> ApplyMode;

    /// What to diff to turn the snapshot `key` into a layer.
    fn diff_source(&self, key: &str) -> Result<DiffSource>;

    /// The metadata DB behind this snapshotter.
    fn meta(&self) -> &Meta;
}

/// Apply a layer as the new committed snapshot `name` over `parent`:
/// prepares a temporary active snapshot, runs `apply(dir, mode)` (typically
/// `kiln_image::apply::apply_layer`), which returns the layer's diffID,
/// commits and records the diffID. On error the temporary snapshot is
/// removed. If `name` already exists it is returned untouched.
pub fn apply_into(
    sn: &dyn Snapshotter,
    name: &str,
    parent: Option<&str>,
    apply: impl FnOnce(&Path, ApplyMode) -> Result<Digest>,
) -> Result<Info> {
    if let Ok(info) = sn.stat(name) {
        return Ok(info);
    }
    let key = format!("extract-{}-{name}", random_hex::<6>());
    sn.prepare(&key, parent)?;
    let result = (|| {
        let dir = sn.writable_dir(&key)?;
        let diff_id = apply(&dir, sn.apply_mode())?;
        sn.commit(name, &key)?;
        sn.meta().set_snapshot_diff_id(name, &diff_id)?;
        Ok(())
    })();
    match result {
        Ok(()) => sn.stat(name),
        Err(Error::AlreadyExists { .. }) => {
            // Another process applied the same layer first: use theirs.
            let _ = sn.remove(&key);
            sn.stat(name)
        }
        Err(e) => {
            let _ = sn.remove(&key);
            Err(e)
        }
    }
}

/// Store paths the snapshotters share with the rest of the store.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// `<root>/snapshots`: one directory per snapshot id.
    pub snapshots: PathBuf,
    /// `<root>/l`: overlay short links.
    pub links: PathBuf,
    /// `<root>/gc.lock`.
    pub gc_lock: PathBuf,
    /// `<root>/tmp`: where retired snapshot directories wait for prune.
    pub tmp: PathBuf,
}

/// The bookkeeping both snapshotters share: rows, ids, directories.
#[derive(Debug)]
pub(crate) struct Core {
    pub meta: Arc<Meta>,
    pub paths: Paths,
    /// Committed snapshots seen, by snapshot id (an id names one creation,
    /// and a committed snapshot's row never changes): the row and its
    /// parent's id — see [`Core::chain`].
    /// (Shared by every handle on one store.)
    pub chains: Chains,
}

/// The committed-chain memo of [`Core`], shared by a store's handles.
pub(crate) type Chains = Arc<std::sync::Mutex<std::collections::HashMap<String, ChainNode>>>;

/// A committed snapshot's row and its parent's snapshot id.
type ChainNode = (Arc<Info>, Option<String>);

impl Core {
    pub fn dir(&self, id: &str) -> PathBuf {
        self.paths.snapshots.join(id)
    }

    pub fn fs(&self, id: &str) -> PathBuf {
        self.dir(id).join("fs")
    }

    pub fn get(&self, key: &str) -> Result<Info> {
        self.meta.snapshot(key)?.ok_or_else(|| Error::NotFound {
            kind: "snapshot",
            name: key.to_string(),
        })
    }

    /// The snapshot `key` and its ancestors, nearest first. Committed
    /// rows are remembered with their parent's id, so a step on a deep
    /// chain costs one or two row lookups and a walk in memory, not a
    /// query over the whole chain.
    pub fn chain(&self, key: &str) -> Result<Vec<Arc<Info>>> {
        let row = self.get(key)?;
        if row.kind == Kind::Committed && !self.known(&row.id) {
            if let Some(p) = row.parent.as_deref() {
                let parent = self.get(p)?;
                if self.known(&parent.id) {
                    self.remember(Arc::new(row.clone()), Some(parent.id));
                }
            }
        }
        if let Some(c) = self.remembered_chain(&row.id) {
            return Ok(c);
        }
        let rows: Vec<Arc<Info>> = self
            .meta
            .snapshot_chain(key)?
            .into_iter()
            .map(Arc::new)
            .collect();
        if rows.iter().all(|r| r.kind == Kind::Committed) {
            for (i, r) in rows.iter().enumerate() {
                self.remember(r.clone(), rows.get(i + 1).map(|p| p.id.clone()));
            }
        }
        Ok(rows)
    }

    fn known(&self, id: &str) -> bool {
        self.chains.lock().is_ok_and(|m| m.contains_key(id))
    }

    fn remember(&self, row: Arc<Info>, parent: Option<String>) {
        if let Ok(mut m) = self.chains.lock() {
            m.insert(row.id.clone(), (row, parent));
        }
    }

    /// The rows from `id` down to the bottom, if the memo holds them all.
    fn remembered_chain(&self, id: &str) -> Option<Vec<Arc<Info>>> {
        let m = self.chains.lock().ok()?;
        let mut out = Vec::new();
        let mut cur = Some(id);
        while let Some(c) = cur {
            let (row, parent) = m.get(c)?;
            out.push(row.clone());
            cur = parent.as_deref();
        }
        Some(out)
    }

    /// The committed parent's row, checking it is committed.
    pub fn parent(&self, parent: Option<&str>) -> Result<Option<Info>> {
        let Some(p) = parent else { return Ok(None) };
        let row = self.get(p)?;
        if row.kind != Kind::Committed {
            return Err(Error::InvalidState(format!(
                "parent {p:?} is {:?}; only a committed snapshot can be a parent",
                row.kind
            )));
        }
        Ok(Some(row))
    }

    /// Create a snapshot: under the shared GC lock, make its directory with
    /// `populate`, then insert the row. A crash in between leaves only an
    /// orphan directory (no row), which check ignores and prune removes.
    pub fn create(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        populate: impl FnOnce(&Path) -> Result<Option<String>>,
    ) -> Result<Info> {
        let _gc = FileLock::shared(&self.paths.gc_lock)?;
        if self.meta.snapshot(key)?.is_some() {
            return Err(Error::AlreadyExists {
                kind: "snapshot",
                name: key.to_string(),
            });
        }
        self.parent(parent)?;
        let id = random_hex::<8>();
        let dir = self.dir(&id);
        // Owner only: the tree below may hold setuid files (the store
        // root is private too; this keeps a moved root closed).
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&dir)
            .ctx("mkdir", &dir)?;
        let mut row = SnapshotRow {
            key: key.to_string(),
            id: id.clone(),
            kind,
            parent: parent.map(str::to_string),
            diff_id: None,
            link: None,
            size: None,
            inodes: None,
            created: now_unix(),
        };
        let made = populate(&dir).and_then(|link| {
            row.link = link;
            self.meta.write(|tx| self.meta.snapshot_insert(tx, &row))
        });
        if let Err(e) = made {
            if let Some(link) = &row.link {
                let _ = std::fs::remove_file(self.paths.links.join(link));
            }
            let _ = remove_all(&dir);
            return Err(e);
        }
        Ok(row)
    }

    pub fn commit(
        &self,
        name: &str,
        key: &str,
        content: &Path,
        measured: Option<Usage>,
    ) -> Result<()> {
        let row = self.get(key)?;
        if row.kind != Kind::Active {
            return Err(Error::InvalidState(format!(
                "snapshot {key:?} is {:?}, only an active snapshot can be committed",
                row.kind
            )));
        }
        // No syncfs here: it would flush every dirty page of the whole
        // filesystem (other builds, other tools) and cost seconds. Like
        // containerd and BuildKit we rely on the page cache for snapshot
        // contents: a killed kiln loses nothing. A locally built layer's
        // only copy is its snapshot (its blob is written again from it on
        // export); after a power loss `system check` re-derives each such
        // layer and names any that no longer matches its diffID.
        let (size, inodes) = match measured {
            Some(u) => (u.size, u.inodes),
            None => disk_usage(content)?,
        };
        self.meta.snapshot_commit(key, name, size, inodes)
    }

    /// Delete the row, then the directory (and link). A crash in between
    /// leaves an orphan directory for prune. An active snapshot's contents
    /// are nobody's yet and go first: a layer that filled the disk while it
    /// was unpacked frees its space, so that the row's delete can then be
    /// written (SQLite needs room in its journal).
    pub fn remove(&self, key: &str) -> Result<()> {
        if let Ok(row) = self.get(key) {
            if row.kind == Kind::Active {
                let fs = self.fs(&row.id);
                if remove_all(&fs).is_ok() {
                    let _ = std::fs::create_dir(&fs);
                }
            }
        }
        let row = self.meta.snapshot_delete(key)?;
        if let Some(link) = &row.link {
            let _ = std::fs::remove_file(self.paths.links.join(link));
        }
        remove_all(&self.dir(&row.id))
    }

    /// Delete the row, then move the directory to
    /// `tmp/retired-<unix secs>-<bytes>-<id>` (deleted by prune or by the
    /// size-bounded sweep).
    pub fn retire(&self, key: &str) -> Result<()> {
        let (size, _) = disk_usage(&self.fs(&self.get(key)?.id)).unwrap_or((0, 0));
        let row = self.meta.snapshot_delete(key)?;
        if let Some(link) = &row.link {
            let _ = std::fs::remove_file(self.paths.links.join(link));
        }
        let to = self.paths.tmp.join(format!(
            "{RETIRED_PREFIX}{}-{size}-{}",
            crate::util::now_unix(),
            row.id
        ));
        match std::fs::rename(self.dir(&row.id), &to) {
            Ok(()) => Ok(()),
            Err(_) => remove_all(&self.dir(&row.id)),
        }
    }

    pub fn usage(&self, key: &str, own_dir: &Path) -> Result<Usage> {
        let row = self.get(key)?;
        if let (Kind::Committed, Some(size), Some(inodes)) = (row.kind, row.size, row.inodes) {
            return Ok(Usage { size, inodes });
        }
        let (size, inodes) = disk_usage(own_dir)?;
        Ok(Usage { size, inodes })
    }

    pub fn walk(&self, f: &mut dyn FnMut(&Info) -> Result<()>) -> Result<()> {
        for row in self.meta.snapshots()? {
            f(&row)?;
        }
        Ok(())
    }
}
