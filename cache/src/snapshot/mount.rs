//! Mounts as data, and a helper that performs one.

use std::path::{Path, PathBuf};

use crate::error::{io_err, Result};

/// One mount, as data (containerd's `mount.Mount`). The executor performs
/// it inside the child's mount namespace; see [`Mount::compact`] for
/// overlay stacks whose option string would exceed a page.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mount {
    /// Filesystem type: `"overlay"` or `"bind"`.
    pub kind: String,
    /// The source (`"overlay"`, or the directory to bind).
    pub source: String,
    /// Options: for overlay `lowerdir=…`, `upperdir=…`, `workdir=…`; for
    /// bind `rbind` plus `ro` or `rw`.
    pub options: Vec<String>,
}

/// A mount whose overlay `lowerdir` entries are relative to `chdir`, which
/// the mounter must make its working directory for the `mount(2)` call
/// (containerd's `compactLowerdirOption`, Docker's overlay2 `l/` links).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactMount {
    /// Directory to chdir into before mounting (None: no chdir needed).
    pub chdir: Option<PathBuf>,
    /// The mount with shortened options.
    pub mount: Mount,
}

/// Linux copies mount data as one page.
const PAGE: usize = kiln_fs::overlay::MOUNT_DATA_MAX;

impl Mount {
    /// Whether this is a read-only mount.
    pub fn is_readonly(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
            || (self.kind == "overlay" && !self.options.iter().any(|o| o.starts_with("upperdir=")))
    }

    /// The data string `mount(2)` gets for an overlay (options joined).
    pub fn data(&self) -> String {
        self.options
            .iter()
            .filter(|o| !matches!(o.as_str(), "rbind" | "bind" | "ro" | "rw"))
            .cloned()
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Rewrite an overlay whose option data would exceed a page with
    /// [`kiln_fs::overlay::compact_lowerdir`] (the executor's rule: the
    /// lowerdirs under their most common parent become relative to it).
    /// Always safe to call; non-overlay mounts and short option strings
    /// are returned unchanged.
    pub fn compact(&self) -> CompactMount {
        let unchanged = CompactMount {
            chdir: None,
            mount: self.clone(),
        };
        if self.kind != "overlay" || self.data().len() < PAGE {
            return unchanged;
        }
        let Some((dir, lower)) = self
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .and_then(kiln_fs::overlay::compact_lowerdir)
        else {
            return unchanged;
        };
        let options = self
            .options
            .iter()
            .map(|o| {
                if o.starts_with("lowerdir=") {
                    format!("lowerdir={lower}")
                } else {
                    o.clone()
                }
            })
            .collect();
        CompactMount {
            chdir: Some(dir),
            mount: Mount {
                kind: self.kind.clone(),
                source: self.source.clone(),
                options,
            },
        }
    }

    /// Perform the mount on `target` (tests and tools; the executor has its
    /// own mounter). For a compacted overlay this changes the working
    /// directory of the calling thread's fs context and restores it after;
    /// call it from a process or a thread that unshared `CLONE_FS` (e.g.
    /// after `unshare(CLONE_NEWNS)`, which implies it).
    pub fn mount(&self, target: &Path) -> Result<()> {
        use nix::mount::{mount, MsFlags};
        let ro = self.is_readonly();
        match self.kind.as_str() {
            "bind" => {
                let mut flags = MsFlags::MS_BIND;
                if self.options.iter().any(|o| o == "rbind") {
                    flags |= MsFlags::MS_REC;
                }
                mount(
                    Some(self.source.as_str()),
                    target,
                    None::<&str>,
                    flags,
                    None::<&str>,
                )
                .map_err(|e| io_err("bind mount", target, e.into()))?;
                if ro {
                    mount(
                        None::<&str>,
                        target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    )
                    .map_err(|e| io_err("remount ro", target, e.into()))?;
                }
                Ok(())
            }
            "overlay" => {
                let c = self.compact();
                let data = c.mount.data();
                let target_abs = if target.is_absolute() {
                    target.to_path_buf()
                } else {
                    std::env::current_dir()
                        .map_err(|e| io_err("getcwd", target, e))?
                        .join(target)
                };
                let old = match &c.chdir {
                    Some(dir) => {
                        let old = std::env::current_dir().map_err(|e| io_err("getcwd", dir, e))?;
                        std::env::set_current_dir(dir).map_err(|e| io_err("chdir", dir, e))?;
                        Some(old)
                    }
                    None => None,
                };
                let flags = if ro {
                    MsFlags::MS_RDONLY
                } else {
                    MsFlags::empty()
                };
                let r = mount(
                    Some("overlay"),
                    &target_abs,
                    Some("overlay"),
                    flags,
                    Some(data.as_str()),
                );
                if let Some(old) = old {
                    let _ = std::env::set_current_dir(old);
                }
                r.map_err(|e| io_err("overlay mount", target, e.into()))
            }
            other => Err(crate::error::Error::InvalidState(format!(
                "unknown mount type {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod compact_tests {
    use super::*;

    /// The store's compactor used to give up unless every lowerdir shared
    /// one parent, while the executor's compacted the most common one;
    /// both now use `kiln_fs::overlay::compact_lowerdir`.
    #[test]
    fn a_foreign_lowerdir_no_longer_stops_compaction() {
        let lowers: Vec<String> = (0..400).map(|i| format!("/s/l/L{i:05}")).collect();
        let m = Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("lowerdir=/elsewhere/stub:{}", lowers.join(":")),
                "upperdir=/u".into(),
                "workdir=/w".into(),
            ],
        };
        assert!(m.data().len() > PAGE);
        let c = m.compact();
        assert_eq!(c.chdir.as_deref(), Some(Path::new("/s/l")));
        assert!(c.mount.data().len() < PAGE);
        assert!(c.mount.options[0].starts_with("lowerdir=/elsewhere/stub:L00000:"));
        assert_eq!(c.mount.options[1..], m.options[1..]);
    }
}
