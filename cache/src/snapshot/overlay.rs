//! The overlay snapshotter: each snapshot is `snapshots/<id>/{fs,work}`,
//! reachable through a short link `l/<5 chars>` -> `../snapshots/<id>/fs`
//! so that a lowerdir list of 500 layers (`<root>/l/abcde:…`, compacted to
//! `abcde:…` relative to `<root>/l` by [`Mount::compact`]) stays under one
//! page. The kernel's own limit is 500 lowerdirs (`OVL_MAX_STACK`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{ApplyMode, Chains, Core, DiffSource, Info, Mount, Paths, Snapshotter, Usage};
use crate::error::{io_err, Error, IoContext, Result};
use crate::meta::{Kind, Meta};
use crate::util::random_short;
use kiln_fs::idmap::IdMaps;
use kiln_fs::overlay::XattrNs;

/// Length of the link names under `l/` (36^5 ≈ 60M names).
const LINK_LEN: usize = 5;

/// The overlay snapshotter (see the module doc).
#[derive(Debug)]
pub struct OverlaySnapshotter {
    core: Core,
    /// The xattr namespace of the mounts: `user.` (the `userxattr` option)
    /// in a user namespace (rootless), else `trusted.`.
    xattrs: XattrNs,
}

impl OverlaySnapshotter {
    pub(crate) fn new(meta: Arc<Meta>, paths: Paths, chains: Chains) -> Self {
        OverlaySnapshotter {
            core: Core {
                meta,
                paths,
                chains,
            },
            xattrs: IdMaps::current().overlay_xattrs(),
        }
    }

    /// The xattr namespace this snapshotter's overlays use (whiteouts and
    /// opaque markers written into its directories must be in it).
    pub fn xattrs(&self) -> XattrNs {
        self.xattrs
    }

    /// Whether the kernel can mount overlay with upper and work dirs in
    /// `dir` (probes with a real mount in a private scratch directory; needs
    /// CAP_SYS_ADMIN; in a user namespace with `userxattr`, Linux 5.11).
    /// Errors mean "no".
    pub fn supported(dir: &Path) -> bool {
        probe(dir, IdMaps::current().overlay_xattrs()).is_ok()
    }

    /// The options every overlay mount of this snapshotter carries.
    fn base_options(&self) -> Vec<String> {
        match self.xattrs {
            XattrNs::User => vec!["userxattr".into()],
            XattrNs::Trusted => Vec::new(),
        }
    }

    fn link_path(&self, row: &Info) -> Result<PathBuf> {
        let link = row.link.as_deref().ok_or_else(|| {
            Error::InvalidState(format!("overlay snapshot {:?} has no link", row.key))
        })?;
        Ok(self.core.paths.links.join(link))
    }

    /// lowerdir paths for the snapshot `key`'s parent chain, nearest first.
    fn lowers(&self, parent: Option<&str>) -> Result<Vec<String>> {
        let Some(parent) = parent else {
            return Ok(Vec::new());
        };
        self.core
            .chain(parent)?
            .iter()
            .map(|r| self.link_path(r).map(|p| p.to_string_lossy().into_owned()))
            .collect()
    }

    fn make_link(&self, dir: &Path) -> Result<String> {
        let target = Path::new("..")
            .join(
                dir.strip_prefix(self.core.paths.links.parent().unwrap_or(Path::new("/")))
                    .unwrap_or(dir),
            )
            .join("fs");
        for _ in 0..64 {
            let name = random_short(LINK_LEN);
            let link = self.core.paths.links.join(&name);
            match std::os::unix::fs::symlink(&target, &link) {
                Ok(()) => return Ok(name),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("symlink", link, e)),
            }
        }
        Err(Error::InvalidState(
            "could not find a free link name".into(),
        ))
    }

    fn create(&self, key: &str, parent: Option<&str>, kind: Kind) -> Result<Info> {
        self.core.create(key, parent, kind, |dir| {
            let fs = dir.join("fs");
            std::fs::create_dir(&fs).ctx("mkdir", &fs)?;
            if kind != Kind::Active {
                return Ok(None);
            }
            let work = dir.join("work");
            std::fs::create_dir(&work).ctx("mkdir", &work)?;
            // Active snapshots may become parents: their link exists before
            // the row that names it.
            let link = self.make_link(dir)?;
            Ok(Some(link))
        })
    }

    fn mounts_for(&self, row: &Info) -> Result<Vec<Mount>> {
        let lowers = self.lowers(row.parent.as_deref())?;
        let fs = self.core.fs(&row.id);
        match row.kind {
            Kind::Active if lowers.is_empty() => Ok(vec![bind(&fs, false)]),
            Kind::Active => {
                let work = self.core.dir(&row.id).join("work");
                let mut options = self.base_options();
                options.extend([
                    format!("lowerdir={}", lowers.join(":")),
                    format!("upperdir={}", fs.display()),
                    format!("workdir={}", work.display()),
                ]);
                Ok(vec![Mount {
                    kind: "overlay".into(),
                    source: "overlay".into(),
                    options,
                }])
            }
            Kind::View | Kind::Committed => match lowers.len() {
                0 => Ok(vec![bind(&fs, true)]),
                1 => {
                    let parent = self.core.get(row.parent.as_deref().unwrap_or_default())?;
                    Ok(vec![bind(&self.core.fs(&parent.id), true)])
                }
                _ => {
                    let mut options = self.base_options();
                    options.push(format!("lowerdir={}", lowers.join(":")));
                    Ok(vec![Mount {
                        kind: "overlay".into(),
                        source: "overlay".into(),
                        options,
                    }])
                }
            },
        }
    }
}

fn bind(dir: &Path, ro: bool) -> Mount {
    Mount {
        kind: "bind".into(),
        source: dir.to_string_lossy().into_owned(),
        options: vec!["rbind".into(), if ro { "ro" } else { "rw" }.into()],
    }
}

fn probe(dir: &Path, xattrs: XattrNs) -> Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let base = dir.join(format!("probe-{}", crate::util::random_hex::<4>()));
    let result = (|| {
        for d in ["lower", "upper", "work", "merged"] {
            std::fs::create_dir_all(base.join(d)).ctx("mkdir", base.join(d))?;
        }
        let data = format!(
            "{}lowerdir={},upperdir={},workdir={}",
            match xattrs {
                XattrNs::User => "userxattr,",
                XattrNs::Trusted => "",
            },
            base.join("lower").display(),
            base.join("upper").display(),
            base.join("work").display()
        );
        mount(
            Some("overlay"),
            &base.join("merged"),
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| io_err("overlay probe", &base, e.into()))?;
        let _ = umount2(&base.join("merged"), MntFlags::MNT_DETACH);
        Ok(())
    })();
    let _ = crate::util::remove_all(&base);
    result
}

impl Snapshotter for OverlaySnapshotter {
    fn name(&self) -> &'static str {
        "overlay"
    }

    crate::snapshot::lifecycle_on_core!();

    fn apply_mode(&self) -> ApplyMode {
        ApplyMode::Overlay
    }

    fn diff_source(&self, key: &str) -> Result<DiffSource> {
        let row = self.core.get(key)?;
        Ok(DiffSource::Overlay {
            upper: self.core.fs(&row.id),
        })
    }

    fn meta(&self) -> &Meta {
        &self.core.meta
    }
}
