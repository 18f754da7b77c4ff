//! The native snapshotter: every active snapshot is a full copy of its
//! parent's tree (`snapshots/<id>/fs`), reflinked file by file where the
//! filesystem supports `FICLONE` (btrfs, xfs), else copied. Mounts are
//! binds. Slower than overlay but needs nothing from the kernel.

use std::path::PathBuf;
use std::sync::Arc;

use super::copy::copy_tree;
use super::{ApplyMode, Core, DiffSource, Info, Mount, Paths, Snapshotter, Usage};
use crate::error::{Error, IoContext, Result};
use crate::meta::{Kind, Meta};

/// The copying snapshotter (see the module doc).
#[derive(Debug)]
pub struct NativeSnapshotter {
    core: Core,
}

impl NativeSnapshotter {
    pub(crate) fn new(meta: Arc<Meta>, paths: Paths) -> Self {
        NativeSnapshotter {
            core: Core { meta, paths },
        }
    }

    fn create(&self, key: &str, parent: Option<&str>, kind: Kind) -> Result<Info> {
        let parent_fs = self.core.parent(parent)?.map(|p| self.core.fs(&p.id));
        self.core.create(key, parent, kind, |dir| {
            let fs = dir.join("fs");
            match (&parent_fs, kind) {
                // An active snapshot owns a full copy.
                (Some(src), Kind::Active) => copy_tree(src, &fs)?,
                // A view of a parent binds the (immutable) parent read-only.
                _ => std::fs::create_dir(&fs).ctx("mkdir", &fs)?,
            }
            Ok(None)
        })
    }

    fn mounts_for(&self, row: &Info) -> Result<Vec<Mount>> {
        let (dir, ro) = match (row.kind, &row.parent) {
            (Kind::Active, _) => (self.core.fs(&row.id), false),
            (_, Some(parent)) if row.kind == Kind::View => {
                (self.core.fs(&self.core.get(parent)?.id), true)
            }
            _ => (self.core.fs(&row.id), true),
        };
        Ok(vec![Mount {
            kind: "bind".into(),
            source: dir.to_string_lossy().into_owned(),
            options: vec!["rbind".into(), if ro { "ro" } else { "rw" }.into()],
        }])
    }
}

impl Snapshotter for NativeSnapshotter {
    fn name(&self) -> &'static str {
        "native"
    }

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
        self.core.commit(name, key, &self.core.fs(&row.id))
    }

    fn remove(&self, key: &str) -> Result<()> {
        self.core.remove(key)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let row = self.core.get(key)?;
        self.mounts_for(&row)
    }

    fn stat(&self, key: &str) -> Result<Info> {
        self.core.get(key)
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

    fn apply_mode(&self) -> ApplyMode {
        ApplyMode::Delete
    }

    fn diff_source(&self, key: &str) -> Result<DiffSource> {
        let row = self.core.get(key)?;
        let lower = match &row.parent {
            Some(p) => Some(self.core.fs(&self.core.get(p)?.id)),
            None => None,
        };
        Ok(DiffSource::Tree {
            lower,
            upper: self.core.fs(&row.id),
        })
    }

    fn meta(&self) -> &Meta {
        &self.core.meta
    }
}
