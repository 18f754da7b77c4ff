//! Persistent cache-mount directories (`RUN --mount=type=cache`).
//!
//! Layout: `<root>/cachemounts/<sha256(id)>-<n>/` is one instance of the
//! cache `id` (instance 0 is the one shared/locked users get; `private`
//! users that find it busy get instance 1, 2, …), and `…-<n>.lock` next to
//! it is the `flock` that users hold for as long as the directory is
//! mounted: shared for `sharing=shared`, exclusive for `locked` and
//! `private`. Every instance has a row in `cache_mounts` (written before
//! the directory is made) so `prune --all` can find and remove them; prune
//! removes only instances whose lock it can take exclusively without
//! waiting, so a running build never loses its cache under its feet.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::error::{io_err, IoContext, Result};
use crate::store::Store;
use crate::util::{disk_usage, now_unix, remove_all};

/// How concurrent users of one cache id share it (BuildKit's `sharing=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheSharing {
    /// Everyone uses the same directory at once.
    #[default]
    Shared,
    /// A user that finds the directory busy gets another one.
    Private,
    /// Users take turns (the second waits for the first).
    Locked,
}

/// A cache-mount directory in use; the lock is held until this is dropped.
#[derive(Debug)]
pub struct CacheMountDir {
    /// The directory to bind-mount.
    pub dir: PathBuf,
    /// True when the directory was made by this call (empty: the caller
    /// may seed it and set its owner and mode).
    pub created: bool,
    _lock: File,
}

/// A row of the `cache_mounts` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheMountRecord {
    /// Directory name under `<root>/cachemounts`.
    pub dir: String,
    /// The cache id as written in the Dockerfile.
    pub id: String,
    /// When it was made (Unix seconds).
    pub created: i64,
    /// When it was last mounted (Unix seconds).
    pub last_used: i64,
}

/// What `flock` gave.
enum Locked {
    Yes(File),
    Busy,
}

/// Takes the lock at `path`; with `wait`, retries until it is free,
/// asking `cancelled` between tries (a blocking `flock` could be ended by
/// nothing: a RUN holding a locked cache and asking for it again, or a
/// build whose lock another never releases, hung kiln past Ctrl-C).
fn flock(path: &Path, exclusive: bool, wait: bool, cancelled: &dyn Fn() -> bool) -> Result<Locked> {
    loop {
        match flock_once(path, exclusive)? {
            Locked::Busy if wait => {
                if cancelled() {
                    return Err(io_err(
                        "flock",
                        path,
                        std::io::Error::new(
                            std::io::ErrorKind::Interrupted,
                            "cancelled while waiting for the cache mount's lock",
                        ),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            got => return Ok(got),
        }
    }
}

fn flock_once(path: &Path, exclusive: bool) -> Result<Locked> {
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .ctx("open lock", path)?;
        let op = libc::LOCK_NB
            | if exclusive {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            };
        // SAFETY: flock on a valid fd we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Ok(Locked::Busy),
                _ => return Err(io_err("flock", path, e)),
            }
        }
        // The lock file may have been replaced between open and flock:
        // only a lock on the file the path names now counts.
        let ours = file.metadata().ctx("stat", path)?;
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
                return Ok(Locked::Yes(file))
            }
            _ => continue,
        }
    }
}

/// The directory-name stem of a cache id.
fn stem(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

impl Store {
    fn cachemounts_dir(&self) -> Result<PathBuf> {
        let d = self.root().join("cachemounts");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .ctx("create", &d)?;
        Ok(d)
    }

    /// The cache-mount directory for `id` under `sharing`, created (empty,
    /// mode 0755, owned by root) on first use. `Locked` waits for other
    /// users (and `Shared` for a `Locked` one) until `cancelled` says
    /// stop; `Private` picks an instance nobody else holds.
    pub fn cache_mount(
        &self,
        id: &str,
        sharing: CacheSharing,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<CacheMountDir> {
        let base = self.cachemounts_dir()?;
        let stem = stem(id);
        let mut n = 0usize;
        let (name, lock) = loop {
            let name = format!("{stem}-{n}");
            let lock_path = base.join(format!("{name}.lock"));
            let got = match sharing {
                CacheSharing::Shared => flock(&lock_path, false, true, cancelled)?,
                CacheSharing::Locked => flock(&lock_path, true, true, cancelled)?,
                CacheSharing::Private => flock(&lock_path, true, false, cancelled)?,
            };
            match got {
                Locked::Yes(f) => break (name, f),
                Locked::Busy => n += 1,
            }
        };
        let now = now_unix();
        self.meta().write(|tx| {
            tx.execute(
                "INSERT INTO cache_mounts(dir, id, created, last_used) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT(dir) DO UPDATE SET last_used = excluded.last_used",
                rusqlite::params![name, id, now],
            )?;
            Ok(())
        })?;
        let dir = base.join(&name);
        let created = match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io_err("create", &dir, e)),
        };
        if created {
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .ctx("chmod", &dir)?;
        }
        Ok(CacheMountDir {
            dir,
            created,
            _lock: lock,
        })
    }

    /// Every cache-mount instance recorded.
    pub fn cache_mounts(&self) -> Result<Vec<CacheMountRecord>> {
        self.meta().read(|tx| {
            let mut st =
                tx.prepare("SELECT dir, id, created, last_used FROM cache_mounts ORDER BY dir")?;
            let rows = st
                .query_map([], |r| {
                    Ok(CacheMountRecord {
                        dir: r.get(0)?,
                        id: r.get(1)?,
                        created: r.get(2)?,
                        last_used: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    /// Removes every cache-mount instance nobody holds (and directories
    /// without a row). Returns how many went and the bytes freed.
    pub fn prune_cache_mounts(&self) -> Result<(usize, u64)> {
        let base = self.root().join("cachemounts");
        if !base.exists() {
            return Ok((0, 0));
        }
        let mut removed = 0usize;
        let mut freed = 0u64;
        let rows = self.cache_mounts()?;
        let mut names: Vec<String> = rows.iter().map(|r| r.dir.clone()).collect();
        for e in std::fs::read_dir(&base).ctx("read dir", &base)? {
            let e = e.ctx("read dir", &base)?;
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.ends_with(".lock") && !names.contains(&n) {
                names.push(n);
            }
        }
        for name in names {
            let lock_path = base.join(format!("{name}.lock"));
            let Locked::Yes(_held) = flock(&lock_path, true, false, &|| false)? else {
                continue;
            };
            let dir = base.join(&name);
            freed += disk_usage(&dir).map(|(s, _)| s).unwrap_or(0);
            remove_all(&dir)?;
            self.meta().write(|tx| {
                tx.execute("DELETE FROM cache_mounts WHERE dir = ?1", [&name])?;
                Ok(())
            })?;
            removed += 1;
        }
        Ok((removed, freed))
    }
}
