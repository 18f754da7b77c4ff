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
const PAGE: usize = 4096;

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

    /// Rewrite an overlay whose lowerdirs share a parent directory so the
    /// lowerdirs are relative to it. Always safe to call; non-overlay
    /// mounts and short option strings are returned unchanged.
    pub fn compact(&self) -> CompactMount {
        let unchanged = CompactMount {
            chdir: None,
            mount: self.clone(),
        };
        if self.kind != "overlay" || self.data().len() < PAGE {
            return unchanged;
        }
        let Some(lower) = self
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
        else {
            return unchanged;
        };
        let dirs: Vec<&Path> = lower.split(':').map(Path::new).collect();
        let Some(common) = dirs.first().and_then(|d| d.parent()) else {
            return unchanged;
        };
        if !dirs.iter().all(|d| d.parent() == Some(common)) {
            return unchanged;
        }
        let rel: Vec<String> = dirs
            .iter()
            .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let options = self
            .options
            .iter()
            .map(|o| {
                if o.starts_with("lowerdir=") {
                    format!("lowerdir={}", rel.join(":"))
                } else {
                    o.clone()
                }
            })
            .collect();
        CompactMount {
            chdir: Some(common.to_path_buf()),
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
