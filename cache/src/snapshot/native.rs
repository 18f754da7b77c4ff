//! The native snapshotter: every active snapshot is a full copy of its
//! parent's tree (`snapshots/<id>/fs`), reflinked file by file where the
//! filesystem supports `FICLONE` (btrfs, xfs), else copied. Mounts are
//! binds. Slower than overlay but needs nothing from the kernel.

use std::path::PathBuf;
use std::sync::Arc;

use super::copy::copy_tree;
use super::{ApplyMode, Chains, Core, DiffSource, Info, Mount, Paths, Snapshotter, Usage};
use crate::error::{Error, IoContext, Result};
use crate::meta::{Kind, Meta};

/// In an active snapshot's directory (beside `fs/`): made once the copy
/// of the parent is complete.
const COPIED: &str = "copied";

/// The copying snapshotter (see the module doc).
#[derive(Debug)]
pub struct NativeSnapshotter {
    core: Core,
}

impl NativeSnapshotter {
    pub(crate) fn new(meta: Arc<Meta>, paths: Paths, chains: Chains) -> Self {
        NativeSnapshotter {
            core: Core {
                meta,
                paths,
                chains,
            },
        }
    }

    fn create(&self, key: &str, parent: Option<&str>, kind: Kind) -> Result<Info> {
        let parent_fs = self.core.parent(parent)?.map(|p| self.core.fs(&p.id));
        self.core.create(key, parent, kind, |dir| {
            let fs = dir.join("fs");
            match (&parent_fs, kind) {
                // An active snapshot owns a full copy; the marker's
                // mtime says when the copy was done (see `diff_source`).
                (Some(src), Kind::Active) => {
                    copy_tree(src, &fs)?;
                    kiln_fs::Root::open(dir)
                        .and_then(|r| r.dir().write_file(COPIED, &[], 0o600, None))
                        .map_err(super::copy::fs_err)?;
                }
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

    crate::snapshot::lifecycle_on_core!();

    fn apply_mode(&self) -> ApplyMode {
        ApplyMode::Delete
    }

    fn diff_source(&self, key: &str) -> Result<DiffSource> {
        let row = self.core.get(key)?;
        let lower = match &row.parent {
            Some(p) => Some(self.core.fs(&self.core.get(p)?.id)),
            None => None,
        };
        // A step may change a file and set its mtime back: what changed
        // after the copy was made is compared by content (a snapshot is
        // named by the chain ID of its diff, and a later build's step
        // producing that diff on that parent takes the snapshot as it is).
        let since = std::fs::metadata(self.core.dir(&row.id).join(COPIED))
            .ok()
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.mtime(), m.mtime_nsec())
            });
        Ok(DiffSource::Tree {
            lower,
            upper: self.core.fs(&row.id),
            since,
        })
    }

    fn meta(&self) -> &Meta {
        &self.core.meta
    }
}
