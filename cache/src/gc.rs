//! Garbage collection (`prune`), verification (`check`) and disk usage
//! (`df`).
//!
//! Mark and sweep, containerd-style. First the rows of untagged images
//! (kept under their ID, docker's dangling images) go, unless
//! [`PruneOptions::keep_untagged`]. Roots: image tags, build cache records
//! (after the cache policy dropped what it drops), resources of live leases
//! (a lease dies with its process or its TTL), and active/view snapshots
//! whose owning process still runs. Blobs mark the blobs they reference and
//! the snapshots they were unpacked to; snapshots mark their parents. The
//! sweep deletes rows first, then files; prune holds the GC lock
//! exclusively, so every file without a row (temp files, half-made snapshot
//! directories, blobs whose row was never written) belongs to a dead writer
//! and is reclaimed.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use rusqlite::{OptionalExtension, Transaction};

use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::meta::Kind;
use crate::store::Store;
use crate::util::{disk_usage, remove_all, FileLock, ProcessId};

/// What `prune` keeps of the build cache.
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    /// Drop every build cache record (`--all`).
    pub all: bool,
    /// Keep the most recently used cache records up to this many bytes
    /// (`--keep-storage`), drop the rest.
    pub keep_storage: Option<u64>,
    /// Keep untagged images (those kept under their ID only, docker's
    /// "dangling" images, see [`crate::untagged_name`]); by default prune
    /// removes them, as `docker system prune` does.
    pub keep_untagged: bool,
    /// Only what is older than this many seconds (docker's
    /// `--filter until=`): untagged images made, and with `all` cache
    /// records last used, before then.
    pub until: Option<u64>,
}

/// What `prune` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    /// Leases expired (dead process or TTL).
    pub leases_expired: usize,
    /// Cache records dropped by the policy.
    pub cache_records_removed: usize,
    /// Untagged images removed (their IDs).
    pub untagged_removed: Vec<String>,
    /// Snapshots removed (rows, plus orphan directories).
    pub snapshots_removed: usize,
    /// Blobs removed (rows, plus orphan files).
    pub blobs_removed: usize,
    /// Temp files and directories removed.
    pub temp_removed: usize,
    /// Cache-mount directories removed (`--all` only).
    pub cache_mounts_removed: usize,
    /// Bytes freed (allocated blocks).
    pub bytes_freed: u64,
}

/// What `check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Everything wrong, one line each. Empty means the store is sound.
    pub problems: Vec<String>,
    /// Blobs whose digest was verified.
    pub blobs_verified: usize,
    /// Snapshots checked.
    pub snapshots_checked: usize,
    /// Image layers whose blobs were decompressed and hashed against the
    /// diffIDs their configs name (`check_with(true)` only).
    pub layers_rehashed: usize,
    /// Orphans (ignored, reclaimed by prune): temp files, snapshot
    /// directories and blob files without rows.
    pub orphans: usize,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One line of `system df`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DfEntry {
    /// How many (images, cache records, orphans).
    pub count: usize,
    /// Bytes used.
    pub size: u64,
    /// Bytes a `prune` (with `--all` for the cache) would free.
    pub reclaimable: u64,
}

/// What uses the space (`system df`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiskUsage {
    /// Tagged images: their blobs and unpacked snapshots.
    pub images: DfEntry,
    /// Build cache records: their snapshots and blobs not shared with
    /// images.
    pub build_cache: DfEntry,
    /// Everything else: unreferenced rows, orphan files, temp files.
    pub unreferenced: DfEntry,
}

struct Marks {
    blobs: HashSet<String>,
    snapshots: HashSet<String>,
}

/// Which blobs/snapshots the given roots reach.
fn mark(tx: &Transaction<'_>, blob_roots: Vec<String>, snap_roots: Vec<String>) -> Result<Marks> {
    let mut refs: HashMap<String, Vec<String>> = HashMap::new();
    {
        let mut st = tx.prepare("SELECT parent, child FROM blob_refs")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            refs.entry(r.get(0)?).or_default().push(r.get(1)?);
        }
    }
    let mut blob_snaps: HashMap<String, Vec<String>> = HashMap::new();
    {
        let mut st = tx.prepare("SELECT blob, snapshot FROM blob_snapshots")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            blob_snaps.entry(r.get(0)?).or_default().push(r.get(1)?);
        }
    }
    let mut parents: HashMap<String, Option<String>> = HashMap::new();
    {
        let mut st = tx.prepare("SELECT key, parent FROM snapshots")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            parents.insert(r.get(0)?, r.get(1)?);
        }
    }
    let mut blobs = HashSet::new();
    let mut stack = blob_roots;
    let mut snap_stack = snap_roots;
    while let Some(b) = stack.pop() {
        if blobs.insert(b.clone()) {
            stack.extend(refs.get(&b).into_iter().flatten().cloned());
            snap_stack.extend(blob_snaps.get(&b).into_iter().flatten().cloned());
        }
    }
    let mut snapshots = HashSet::new();
    while let Some(s) = snap_stack.pop() {
        if !parents.contains_key(&s) {
            continue;
        }
        if snapshots.insert(s.clone()) {
            if let Some(Some(p)) = parents.get(&s) {
                snap_stack.push(p.clone());
            }
        }
    }
    Ok(Marks { blobs, snapshots })
}

fn strings(tx: &Transaction<'_>, sql: &str) -> Result<Vec<String>> {
    let mut st = tx.prepare(sql)?;
    let v = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

fn image_roots(tx: &Transaction<'_>) -> Result<Vec<String>> {
    let mut v = strings(tx, "SELECT manifest FROM images")?;
    v.extend(strings(
        tx,
        "SELECT config FROM images WHERE config IS NOT NULL",
    )?);
    Ok(v)
}

/// Everything something still needs: tagged images, the build cache,
/// live leases and the active snapshots of running processes, with all
/// they reach.
fn live_marks(tx: &Transaction<'_>, owner_alive: OwnerAlive<'_>) -> Result<Marks> {
    let mut blob_roots = image_roots(tx)?;
    blob_roots.extend(strings(tx, "SELECT blob FROM cache_blobs")?);
    blob_roots.extend(strings(
        tx,
        "SELECT name FROM lease_resources WHERE kind = 'blob'",
    )?);
    let mut snap_roots = strings(tx, "SELECT snapshot FROM cache WHERE snapshot IS NOT NULL")?;
    snap_roots.extend(strings(
        tx,
        "SELECT name FROM lease_resources WHERE kind = 'snapshot'",
    )?);
    snap_roots.extend(live_active(tx, owner_alive)?);
    mark(tx, blob_roots, snap_roots)
}

/// Whether the process that recorded an owner (pid, start time as it saw
/// them) still runs.
pub(crate) type OwnerAlive<'a> = &'a dyn Fn(Option<i64>, Option<i64>) -> bool;

/// Active/view snapshots whose owner still runs.
fn live_active(tx: &Transaction<'_>, owner_alive: OwnerAlive<'_>) -> Result<Vec<String>> {
    let mut st =
        tx.prepare("SELECT key, owner_pid, owner_start FROM snapshots WHERE kind != 'committed'")?;
    let mut out = Vec::new();
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let key: String = r.get(0)?;
        let pid: Option<i64> = r.get(1)?;
        let start: Option<i64> = r.get(2)?;
        let alive = owner_alive(pid, start);
        if alive {
            out.push(key);
        }
    }
    Ok(out)
}

impl Store {
    /// Garbage-collect (see the module doc).
    pub fn prune(&self, opts: &PruneOptions) -> Result<PruneReport> {
        let _gc = FileLock::exclusive(&self.paths().gc_lock)?;
        let mut report = PruneReport::default();
        // A process id says whether a lease's owner runs only when no
        // other kiln uses the store: one in another pid namespace (a
        // build in a container, a prune on the host) has pids that mean
        // nothing here.
        let trust_pids = crate::store::tmp_users::alone(self.root()).is_some();
        let root = self.root().to_path_buf();
        // A process's `procs/` lock says whether it runs, across pid
        // namespaces; one that left none (a kiln of before) by its pid,
        // when that can be trusted.
        let owner_alive = move |pid: Option<i64>, start: Option<i64>| -> bool {
            let Some(pid) = pid else {
                return false;
            };
            let start = start.unwrap_or(0);
            match crate::store::tmp_users::lives(&root, pid, start) {
                Some(alive) => alive,
                None => !trust_pids || ProcessId { pid, start }.is_alive(),
            }
        };
        // Rows first (one transaction), files after.
        let (dead_snaps, dead_blobs) = self.meta().write(|tx| {
            report.leases_expired = self.meta().expire_leases(tx, &owner_alive)?;
            report.cache_records_removed = apply_cache_policy(tx, opts)?;
            if !opts.keep_untagged {
                report.untagged_removed = remove_untagged(tx, opts.until)?;
            }
            let marks = live_marks(tx, &owner_alive)?;
            // Snapshots: children before parents (unmarked snapshots only
            // have unmarked children).
            let mut dead: Vec<(String, String, Option<String>)> = Vec::new();
            loop {
                let leaves: Vec<(String, String, Option<String>)> = {
                    let mut st = tx.prepare(
                        "SELECT key, id, link FROM snapshots s WHERE NOT EXISTS
                           (SELECT 1 FROM snapshots c WHERE c.parent = s.key)",
                    )?;
                    let rows = st
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    rows.into_iter()
                        .filter(|(k, _, _)| !marks.snapshots.contains(k))
                        .collect()
                };
                if leaves.is_empty() {
                    break;
                }
                for (key, _, _) in &leaves {
                    tx.execute("DELETE FROM snapshots WHERE key = ?1", [key])?;
                }
                dead.extend(leaves);
            }
            let mut dead_blobs = Vec::new();
            for d in strings(tx, "SELECT digest FROM blobs")? {
                if !marks.blobs.contains(&d) {
                    dead_blobs.push(d);
                }
            }
            // Parents before children is fine: blob_refs cascade on parent;
            // a child is only unmarked if all its parents are.
            for d in &dead_blobs {
                tx.execute("DELETE FROM blob_refs WHERE child = ?1", [d])?;
                tx.execute("DELETE FROM cache_blobs WHERE blob = ?1", [d])?;
                tx.execute("DELETE FROM blobs WHERE digest = ?1", [d])?;
            }
            tx.execute(
                "DELETE FROM lease_resources WHERE lease NOT IN (SELECT id FROM leases)",
                [],
            )?;
            // Lazy layers live as long as their blobs (kept by the image
            // that names them); then neither they nor their steps are hits.
            tx.execute(
                "DELETE FROM lazy_layers WHERE blob NOT IN (SELECT digest FROM blobs)",
                [],
            )?;
            tx.execute(
                "DELETE FROM lazy_steps WHERE (snapshot, blob) NOT IN (SELECT snapshot, blob FROM lazy_layers)",
                [],
            )?;
            Ok((dead, dead_blobs))
        })?;
        report.snapshots_removed = dead_snaps.len();
        report.blobs_removed = dead_blobs.len();

        // Files: everything without a row goes.
        let (ids, links, digests) = self.meta().read(|tx| {
            let ids: HashSet<String> = strings(tx, "SELECT id FROM snapshots")?
                .into_iter()
                .collect();
            let links: HashSet<String> =
                strings(tx, "SELECT link FROM snapshots WHERE link IS NOT NULL")?
                    .into_iter()
                    .collect();
            let digests: HashSet<String> = strings(tx, "SELECT digest FROM blobs")?
                .into_iter()
                .collect();
            Ok((ids, links, digests))
        })?;
        let snap_dir = &self.paths().snapshots;
        for entry in std::fs::read_dir(snap_dir).ctx("read dir", snap_dir)? {
            let entry = entry.ctx("read dir", snap_dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !ids.contains(&name) {
                let p = entry.path();
                report.bytes_freed += disk_usage(&p).map(|(s, _)| s).unwrap_or(0);
                remove_all(&p)?;
                if !dead_snaps.iter().any(|(_, id, _)| *id == name) {
                    report.snapshots_removed += 1;
                }
            }
        }
        let link_dir = &self.paths().links;
        for entry in std::fs::read_dir(link_dir).ctx("read dir", link_dir)? {
            let entry = entry.ctx("read dir", link_dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !links.contains(&name) {
                remove_all(&entry.path())?;
            }
        }
        let (files, bad) = self.content().list()?;
        for (d, _) in files {
            if !digests.contains(&d.to_string()) {
                let p = self.content().path(&d);
                report.bytes_freed += std::fs::symlink_metadata(&p)
                    .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                    .unwrap_or(0);
                self.content().delete(&d)?;
                if !dead_blobs.contains(&d.to_string()) {
                    report.blobs_removed += 1;
                }
            }
        }
        for p in bad {
            remove_all(&p)?;
            report.temp_removed += 1;
        }
        if opts.all {
            let (n, bytes) = self.prune_cache_mounts()?;
            report.cache_mounts_removed = n;
            report.bytes_freed += bytes;
        }
        // Another kiln on the store may be using tmp (a stdin context,
        // an export's tree, a step's scratch, however old): then tmp is
        // left for a prune that runs alone (see `tmp_users`).
        let tmp = self.tmp_dir();
        let alone = crate::store::tmp_users::alone(self.root());
        for entry in std::fs::read_dir(tmp).ctx("read dir", tmp)? {
            let entry = entry.ctx("read dir", tmp)?;
            let p = entry.path();
            if alone.is_none() {
                break;
            }
            report.bytes_freed += disk_usage(&p).map(|(s, _)| s).unwrap_or(0);
            remove_all(&p)?;
            report.temp_removed += 1;
        }
        drop(alone);
        // The lock files of processes gone.
        crate::store::tmp_users::sweep(self.root());
        Ok(report)
    }

    /// Verify every blob's digest and size and every reference in the
    /// database. Orphans (files without rows) are counted, not faulted.
    pub fn check(&self) -> Result<CheckReport> {
        self.check_with(false)
    }

    /// [`Store::check`]; also, for every layer snapshot, that its name is
    /// the chain ID of its parent and its recorded diffID (snapshots are
    /// only committed once their content was verified against that
    /// diffID, see [`Store::unpack_layer`]). With `deep`, every stored
    /// image's layer blobs are decompressed and hashed against the
    /// diffIDs their configs name as well.
    pub fn check_with(&self, deep: bool) -> Result<CheckReport> {
        let mut rep = self.check_store()?;
        let mut problems = std::mem::take(&mut rep.problems);
        self.check_layer_names(&mut problems)?;
        if deep {
            rep.layers_rehashed = self.check_image_layers(&mut problems)?;
        }
        rep.problems = problems;
        Ok(rep)
    }

    fn check_store(&self) -> Result<CheckReport> {
        let _gc = FileLock::shared(&self.paths().gc_lock)?;
        let mut rep = CheckReport::default();
        let mut problems = Vec::new();
        self.meta().read(|tx| {
            let ic: String = tx.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
            if ic != "ok" {
                problems.push(format!("database integrity: {ic}"));
            }
            let mut st = tx.prepare("PRAGMA foreign_key_check")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let table: String = r.get(0)?;
                let parent: String = r.get(2)?;
                problems.push(format!(
                    "database: a row of {table} references a missing {parent} row"
                ));
            }
            Ok(())
        })?;

        // Blob rows against files.
        let rows: Vec<(String, i64)> = self.meta().read(|tx| {
            let mut st = tx.prepare("SELECT digest, size FROM blobs ORDER BY digest")?;
            let v = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(v)
        })?;
        let mut with_rows = HashSet::new();
        for (d, size) in rows {
            with_rows.insert(d.clone());
            let digest: Digest = match d.parse() {
                Ok(x) => x,
                Err(_) => {
                    problems.push(format!("blob row {d:?}: not a sha256 digest"));
                    continue;
                }
            };
            match self.content().verify(&digest) {
                Ok(actual) if actual as i64 == size => rep.blobs_verified += 1,
                Ok(actual) => {
                    problems.push(format!("blob {d}: size {actual}, database says {size}"))
                }
                Err(Error::NotFound { .. }) => match self.meta().blob_row(&digest)? {
                    // Kept in a registry (a cache import's layer): checked
                    // when it is downloaded.
                    Some((_, Some(_))) if self.remote_blob(&digest)?.is_some() => {}
                    // A layer kept as its snapshot's diff: write it again
                    // and compare (the reader checks digest and size).
                    Some((_, Some(_))) => match self.open_blob(&digest).and_then(|mut r| {
                        std::io::copy(&mut r, &mut std::io::sink()).ctx("read", &d)
                    }) {
                        Ok(_) => rep.blobs_verified += 1,
                        Err(e) => problems.push(format!("blob {d}: {e}")),
                    },
                    Some(_) => problems.push(format!("blob {d}: recorded but its file is missing")),
                    None => {}
                },
                Err(e) => problems.push(format!("blob {d}: {e}")),
            }
        }
        let (files, bad) = self.content().list()?;
        for (d, _) in files {
            if with_rows.contains(&d.to_string()) {
                continue;
            }
            rep.orphans += 1;
            match self.content().verify(&d) {
                Ok(_) => rep.blobs_verified += 1,
                Err(Error::NotFound { .. }) => {}
                Err(e) => problems.push(format!("blob file {d} (unrecorded): {e}")),
            }
        }
        for p in bad {
            problems.push(format!("{}: not a blob name", p.display()));
        }

        // Images, cache records, memo rows.
        self.meta().read(|tx| {
            let mut st = tx.prepare("SELECT name, manifest FROM images")?;
            let v = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for (name, m) in v {
                if !with_rows.contains(&m) {
                    problems.push(format!("image {name}: manifest {m} not recorded"));
                }
            }
            let mut st = tx.prepare(
                "SELECT c.key, c.snapshot, s.kind FROM cache c LEFT JOIN snapshots s ON s.key = c.snapshot
                 WHERE c.snapshot IS NOT NULL",
            )?;
            let v = st
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for (key, snap, kind) in v {
                match kind.as_deref() {
                    Some("committed") => {}
                    Some(k) => problems.push(format!("cache record {key}: snapshot {snap} is {k}, not committed")),
                    None => problems.push(format!("cache record {key}: snapshot {snap} missing")),
                }
            }
            for (what, sql) in [
                ("cache record", "SELECT key || ' -> ' || blob FROM cache_blobs WHERE blob NOT IN (SELECT digest FROM blobs)"),
                ("layer memo", "SELECT diff_id || ' -> ' || blob FROM layer_blobs WHERE blob NOT IN (SELECT digest FROM blobs)"),
                ("blob reference", "SELECT parent || ' -> ' || child FROM blob_refs WHERE child NOT IN (SELECT digest FROM blobs)"),
            ] {
                for s in strings(tx, sql)? {
                    problems.push(format!("{what} {s}: blob not recorded"));
                }
            }
            Ok(())
        })?;

        // Snapshots against directories.
        let snaps = self.meta().snapshots()?;
        let by_key: HashMap<&str, &crate::meta::SnapshotRow> =
            snaps.iter().map(|s| (s.key.as_str(), s)).collect();
        let overlay = self.snapshotter().name() == "overlay";
        for s in &snaps {
            rep.snapshots_checked += 1;
            let dir = self.paths().snapshots.join(&s.id);
            let mut missing = Vec::new();
            if !dir.join("fs").is_dir() {
                missing.push("fs");
            }
            if overlay && s.kind == Kind::Active && !dir.join("work").is_dir() {
                missing.push("work");
            }
            if !missing.is_empty() && self.meta().snapshot(&s.key)?.is_some() {
                problems.push(format!(
                    "snapshot {}: directory {} lacks {}",
                    s.key,
                    dir.display(),
                    missing.join(", ")
                ));
            }
            if let Some(link) = &s.link {
                let lp = self.paths().links.join(link);
                let ok = std::fs::canonicalize(&lp)
                    .ok()
                    .zip(std::fs::canonicalize(dir.join("fs")).ok())
                    .is_some_and(|(a, b)| a == b);
                if !ok && self.meta().snapshot(&s.key)?.is_some() {
                    problems.push(format!(
                        "snapshot {}: link {} does not lead to its fs",
                        s.key,
                        lp.display()
                    ));
                }
            }
            if let Some(p) = &s.parent {
                match by_key.get(p.as_str()) {
                    None => problems.push(format!("snapshot {}: parent {p} missing", s.key)),
                    Some(pr) if pr.kind != Kind::Committed => {
                        problems.push(format!("snapshot {}: parent {p} is not committed", s.key))
                    }
                    _ => {}
                }
            }
        }
        let ids: HashSet<&str> = snaps.iter().map(|s| s.id.as_str()).collect();
        let snap_dir = &self.paths().snapshots;
        for entry in std::fs::read_dir(snap_dir).ctx("read dir", snap_dir)? {
            let entry = entry.ctx("read dir", snap_dir)?;
            if !ids.contains(entry.file_name().to_string_lossy().as_ref()) {
                rep.orphans += 1;
            }
        }
        rep.orphans += std::fs::read_dir(self.tmp_dir())
            .map(|d| d.count())
            .unwrap_or(0);
        rep.problems = problems;
        Ok(rep)
    }

    /// What uses the space.
    pub fn df(&self) -> Result<DiskUsage> {
        let mut du = DiskUsage::default();
        let snaps = self.meta().snapshots()?;
        let snap_size: HashMap<String, u64> = snaps
            .iter()
            .map(|s| {
                let size = s.size.unwrap_or_else(|| {
                    disk_usage(&self.paths().snapshots.join(&s.id).join("fs"))
                        .map(|x| x.0)
                        .unwrap_or(0)
                });
                (s.key.clone(), size)
            })
            .collect();
        let (blob_size, images, cache, all) = self.meta().read(|tx| {
            // Layers kept as their snapshots' diffs take no space of their own.
            let mut st = tx.prepare("SELECT digest, size FROM blobs WHERE source IS NULL")?;
            let blob_size: HashMap<String, u64> = st
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })?
                .collect::<rusqlite::Result<HashMap<_, _>>>()?;
            let images = mark(tx, image_roots(tx)?, Vec::new())?;
            let cache = mark(
                tx,
                strings(tx, "SELECT blob FROM cache_blobs")?,
                strings(tx, "SELECT snapshot FROM cache WHERE snapshot IS NOT NULL")?,
            )?;
            let all = live_marks(tx, &|pid: Option<i64>, start: Option<i64>| {
                pid.is_some_and(|pid| {
                    ProcessId {
                        pid,
                        start: start.unwrap_or(0),
                    }
                    .is_alive()
                })
            })?;
            du.images.count =
                tx.query_row("SELECT COUNT(*) FROM images", [], |r| r.get::<_, i64>(0))? as usize;
            du.build_cache.count =
                tx.query_row("SELECT COUNT(*) FROM cache", [], |r| r.get::<_, i64>(0))? as usize;
            Ok((blob_size, images, cache, all))
        })?;
        let sum = |m: &Marks, skip: Option<&Marks>| -> u64 {
            let b: u64 = m
                .blobs
                .iter()
                .filter(|d| skip.is_none_or(|s| !s.blobs.contains(*d)))
                .filter_map(|d| blob_size.get(d))
                .sum();
            let s: u64 = m
                .snapshots
                .iter()
                .filter(|k| skip.is_none_or(|s| !s.snapshots.contains(*k)))
                .filter_map(|k| snap_size.get(k))
                .sum();
            b + s
        };
        du.images.size = sum(&images, None);
        du.build_cache.size = sum(&cache, Some(&images));
        du.build_cache.reclaimable = du.build_cache.size;
        // Unreferenced rows + orphan files + temp.
        let mut unref = 0u64;
        let mut count = 0usize;
        for (d, s) in &blob_size {
            if !all.blobs.contains(d) {
                unref += s;
                count += 1;
            }
        }
        for (k, s) in &snap_size {
            if !all.snapshots.contains(k) {
                unref += s;
                count += 1;
            }
        }
        let ids: HashSet<String> = snaps.iter().map(|s| s.id.clone()).collect();
        let mut extra: Vec<PathBuf> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.paths().snapshots) {
            extra.extend(
                rd.flatten()
                    .filter(|e| !ids.contains(e.file_name().to_string_lossy().as_ref()))
                    .map(|e| e.path()),
            );
        }
        if let Ok(rd) = std::fs::read_dir(self.tmp_dir()) {
            extra.extend(rd.flatten().map(|e| e.path()));
        }
        let (files, _) = self.content().list()?;
        for (d, len) in files {
            if !blob_size.contains_key(&d.to_string()) {
                unref += len;
                count += 1;
            }
        }
        for p in extra {
            unref += disk_usage(&p).map(|x| x.0).unwrap_or(0);
            count += 1;
        }
        du.unreferenced = DfEntry {
            count,
            size: unref,
            reclaimable: unref,
        };
        Ok(du)
    }
}

/// Drop cache records per the policy; returns how many. Records used
/// since the oldest live lease began (by a build still running: its
/// lookups mark them) are kept whatever the policy, so that the build
/// finds the snapshots and blobs it has been handed.
/// Drops the image rows of untagged images (made before `until` seconds
/// ago, if given); returns their IDs.
fn remove_untagged(tx: &Transaction<'_>, until: Option<u64>) -> Result<Vec<String>> {
    let before = until.map_or(i64::MAX, |u| crate::util::now_unix() - u as i64);
    let mut st = tx.prepare(
        "SELECT name FROM images WHERE name LIKE 'sha256:%' AND created < ?1 ORDER BY name",
    )?;
    let names = st
        .query_map([before], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    drop(st);
    for n in &names {
        tx.execute("DELETE FROM images WHERE name = ?1", [n])?;
    }
    Ok(names)
}

fn apply_cache_policy(tx: &Transaction<'_>, opts: &PruneOptions) -> Result<usize> {
    // After expire_leases: only live leases are left.
    let in_use_since: i64 = tx
        .query_row("SELECT MIN(created) FROM leases", [], |r| {
            r.get::<_, Option<i64>>(0)
        })?
        .unwrap_or(i64::MAX);
    if opts.all {
        let before = match opts.until {
            Some(u) => in_use_since.min(crate::util::now_unix() - u as i64),
            None => in_use_since,
        };
        return Ok(tx.execute("DELETE FROM cache WHERE last_used < ?1", [before])?);
    }
    let Some(keep) = opts.keep_storage else {
        return Ok(0);
    };
    let mut st = tx.prepare(
        "SELECT key, snapshot, last_used FROM cache ORDER BY last_used DESC, created DESC",
    )?;
    let recs = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    drop(st);
    let mut counted: HashSet<String> = HashSet::new();
    let mut total = 0u64;
    let mut dropped = 0;
    for (key, snap, last_used) in recs {
        // The record's cost: its snapshot chain and blob files not yet
        // counted.
        let mut cost = 0u64;
        let mut cur = snap;
        while let Some(s) = cur {
            if !counted.insert(s.clone()) {
                break;
            }
            let (size, parent): (Option<i64>, Option<String>) = tx
                .query_row(
                    "SELECT size, parent FROM snapshots WHERE key = ?1",
                    [&s],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?
                .unwrap_or((None, None));
            cost += size.unwrap_or(0) as u64;
            cur = parent;
        }
        let blobs = {
            let mut st = tx.prepare(
                // A lazy blob (a source, no file) costs no disk: its
                // snapshot is counted above.
                "SELECT b.digest, b.size FROM cache_blobs c JOIN blobs b ON b.digest = c.blob
                 WHERE c.key = ?1 AND b.source IS NULL",
            )?;
            let v = st
                .query_map([&key], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            v
        };
        for (d, s) in blobs {
            if counted.insert(d) {
                cost += s as u64;
            }
        }
        if total + cost <= keep || last_used >= in_use_since {
            total += cost;
        } else {
            tx.execute("DELETE FROM cache WHERE key = ?1", [&key])?;
            dropped += 1;
        }
    }
    Ok(dropped)
}
