//! The metadata database (`<root>/meta.db`, SQLite in WAL mode).
//!
//! Several kiln processes share it: every connection sets a busy timeout,
//! every write transaction starts `IMMEDIATE` (so two writers queue instead
//! of deadlocking on a lock upgrade), and foreign keys are on. Rows are only
//! ever written after the files they name are durable, so a crash leaves at
//! worst files without rows (orphans that `prune` reclaims), never rows
//! without files.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::util::{now_unix, random_hex, ProcessId};

/// Schema versions, in order. Index `i` migrates version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the initial schema.
    r#"
    CREATE TABLE blobs(
        digest     TEXT PRIMARY KEY,
        size       INTEGER NOT NULL,
        media_type TEXT,
        created    INTEGER NOT NULL
    );
    CREATE TABLE blob_refs(
        parent TEXT NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE,
        child  TEXT NOT NULL REFERENCES blobs(digest),
        PRIMARY KEY(parent, child)
    ) WITHOUT ROWID;
    CREATE INDEX blob_refs_child ON blob_refs(child);
    CREATE TABLE snapshots(
        key         TEXT PRIMARY KEY,
        id          TEXT NOT NULL UNIQUE,
        kind        TEXT NOT NULL CHECK(kind IN ('active','view','committed')),
        parent      TEXT REFERENCES snapshots(key),
        diff_id     TEXT,
        link        TEXT,
        size        INTEGER,
        inodes      INTEGER,
        created     INTEGER NOT NULL,
        owner_pid   INTEGER,
        owner_start INTEGER
    );
    CREATE INDEX snapshots_parent ON snapshots(parent);
    CREATE TABLE blob_snapshots(
        blob     TEXT NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE,
        snapshot TEXT NOT NULL REFERENCES snapshots(key) ON DELETE CASCADE ON UPDATE CASCADE,
        PRIMARY KEY(blob, snapshot)
    ) WITHOUT ROWID;
    CREATE TABLE images(
        name     TEXT PRIMARY KEY,
        manifest TEXT NOT NULL REFERENCES blobs(digest),
        config   TEXT REFERENCES blobs(digest),
        created  INTEGER NOT NULL
    );
    CREATE TABLE cache(
        key       TEXT PRIMARY KEY,
        snapshot  TEXT REFERENCES snapshots(key) ON DELETE CASCADE ON UPDATE CASCADE,
        diff_id   TEXT,
        created   INTEGER NOT NULL,
        last_used INTEGER NOT NULL
    );
    CREATE TABLE cache_blobs(
        key  TEXT NOT NULL REFERENCES cache(key) ON DELETE CASCADE,
        pos  INTEGER NOT NULL,
        blob TEXT NOT NULL REFERENCES blobs(digest),
        PRIMARY KEY(key, pos)
    ) WITHOUT ROWID;
    CREATE TABLE layer_blobs(
        diff_id     TEXT NOT NULL,
        compression TEXT NOT NULL,
        level       INTEGER NOT NULL,
        blob        TEXT NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE,
        PRIMARY KEY(diff_id, compression, level)
    ) WITHOUT ROWID;
    CREATE TABLE leases(
        id        TEXT PRIMARY KEY,
        pid       INTEGER,
        pid_start INTEGER,
        created   INTEGER NOT NULL,
        expires   INTEGER
    );
    CREATE TABLE lease_resources(
        lease TEXT NOT NULL REFERENCES leases(id) ON DELETE CASCADE,
        kind  TEXT NOT NULL,
        name  TEXT NOT NULL,
        PRIMARY KEY(lease, kind, name)
    ) WITHOUT ROWID;
    CREATE TABLE settings(
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE file_hashes(
        path     TEXT PRIMARY KEY,
        dev      INTEGER NOT NULL,
        ino      INTEGER NOT NULL,
        size     INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        mode     INTEGER NOT NULL,
        hash     TEXT NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 1 -> 2: persistent cache mounts (RUN --mount=type=cache).
    r#"
    CREATE TABLE cache_mounts(
        dir       TEXT PRIMARY KEY,
        id        TEXT NOT NULL,
        created   INTEGER NOT NULL,
        last_used INTEGER NOT NULL
    );
    "#,
    // 2 -> 3: layer blobs kept as their source instead of a file. A row
    // with `source` set may have no file: its bytes are the diff of that
    // committed snapshot, written again (deterministically) when read.
    r#"
    ALTER TABLE blobs ADD COLUMN source TEXT;
    "#,
    // 3 -> 4: where blobs are known to be in registries (pushed there or
    // pulled from there), for cross-repository mounts on later pushes.
    r#"
    CREATE TABLE blob_locations(
        digest   TEXT NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE,
        registry TEXT NOT NULL,
        repo     TEXT NOT NULL,
        seen     INTEGER NOT NULL,
        PRIMARY KEY(digest, registry, repo)
    ) WITHOUT ROWID;
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The state of a snapshot, in containerd's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Writable, made by `prepare`.
    Active,
    /// Read-only, made by `view`.
    View,
    /// Immutable, made by `commit`; may be a parent.
    Committed,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }
    }
    fn parse(s: &str) -> Result<Self> {
        match s {
            "active" => Ok(Kind::Active),
            "view" => Ok(Kind::View),
            "committed" => Ok(Kind::Committed),
            other => Err(Error::InvalidState(format!(
                "unknown snapshot kind {other:?}"
            ))),
        }
    }
}

/// A snapshot's row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotRow {
    /// The key (active/view) or name (committed).
    pub key: String,
    /// The directory id under `snapshots/`.
    pub id: String,
    /// Its state.
    pub kind: Kind,
    /// The parent's name, if any.
    pub parent: Option<String>,
    /// The diffID of the layer this snapshot adds, when known.
    pub diff_id: Option<String>,
    /// The overlay short link name (`l/<link>`), overlay only.
    pub link: Option<String>,
    /// Bytes used by this snapshot's own directory, when computed (commit).
    pub size: Option<u64>,
    /// Inodes used, when computed.
    pub inodes: Option<u64>,
    /// Creation time, Unix seconds.
    pub created: i64,
}

const SNAP_COLS: &str = "key, id, kind, parent, diff_id, link, size, inodes, created";

fn snap_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(SnapshotRow, String)> {
    let kind: String = r.get(2)?;
    Ok((
        SnapshotRow {
            key: r.get(0)?,
            id: r.get(1)?,
            kind: Kind::Active,
            parent: r.get(3)?,
            diff_id: r.get(4)?,
            link: r.get(5)?,
            size: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
            inodes: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
            created: r.get(8)?,
        },
        kind,
    ))
}

fn finish_snap(pair: (SnapshotRow, String)) -> Result<SnapshotRow> {
    let (mut row, kind) = pair;
    row.kind = Kind::parse(&kind)?;
    Ok(row)
}

/// A tagged image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageRecord {
    /// Normalised name, e.g. `docker.io/library/busybox:latest`.
    pub name: String,
    /// Manifest digest.
    pub manifest: String,
    /// Config digest, when recorded.
    pub config: Option<String>,
    /// When tagged, Unix seconds.
    pub created: i64,
}

/// A layer whose snapshot is made from its stored (compressed) blob when
/// first needed: the blob was verified against its digest when it was
/// stored; its tar is verified against `diff_id` when it is unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyLayer {
    /// The snapshot (chain ID) it makes.
    pub snapshot: String,
    /// The snapshot it goes on (`None`: the bottom layer).
    pub parent: Option<String>,
    /// The stored layer blob.
    pub blob: Digest,
    /// The blob's media type.
    pub media_type: String,
    /// The blob's size.
    pub size: u64,
    /// The uncompressed tar's digest.
    pub diff_id: Digest,
}

/// A build cache record: a step's cache key and what it produced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CacheRecord {
    /// The step's cache key.
    pub key: String,
    /// The committed snapshot the step produced (None for steps without a
    /// filesystem result).
    pub snapshot: Option<String>,
    /// The diffID of the layer the step added, when computed.
    pub diff_id: Option<String>,
    /// Layer blob digests, when computed (e.g. for `--cache-to`).
    pub blobs: Vec<String>,
    /// Created, Unix seconds.
    pub created: i64,
    /// Last hit, Unix seconds.
    pub last_used: i64,
}

/// The stat fields that key the file-hash cache. A file whose stat still
/// matches is not re-read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns since the epoch.
    pub ctime_ns: i64,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
}

impl FileStat {
    /// From `std::fs::Metadata` (use `symlink_metadata` for links).
    pub fn from_metadata(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStat {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            mode: m.mode(),
        }
    }
}

/// Where a lease is in its life.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeaseRecord {
    /// Its id.
    pub id: String,
    /// The owning process, if bound to one.
    pub pid: Option<i64>,
    /// Expiry, Unix seconds, if any.
    pub expires: Option<i64>,
}

/// The SQLite metadata database, through one handle: a handle made
/// [`Meta::with_lease`] adds what it creates to that lease; others (the
/// one [`Meta::open`] returns) to none. Handles share the connection.
#[derive(Debug)]
pub struct Meta {
    conn: Arc<Mutex<Connection>>,
    lease: Option<Lease>,
}

/// A lease: while a value (or a clone, or a store handle made with it)
/// lives — and its process lives, and its TTL has not passed — what was
/// written through a handle holding it is kept by GC. Dropping the last
/// holder deletes the lease, releasing only what it protected. Made by
/// [`Meta::new_lease`] (or `Store::lease`); joined only explicitly, never
/// by an ambient setting, so two operations on one store handle each keep
/// their own.
#[derive(Debug, Clone)]
pub struct Lease(Arc<LeaseInner>);

#[derive(Debug)]
struct LeaseInner {
    id: String,
    conn: Arc<Mutex<Connection>>,
}

impl Lease {
    /// The lease id.
    pub fn id(&self) -> &str {
        &self.0.id
    }
}

impl Drop for LeaseInner {
    fn drop(&mut self) {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // On failure the lease still dies with this process (prune
        // expires it).
        let _ = c
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .and_then(|tx| {
                tx.execute("DELETE FROM leases WHERE id = ?1", [&self.id])?;
                tx.commit()
            });
    }
}

impl Meta {
    /// Open (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Meta> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(60))?;
        // journal_mode returns a row; query it rather than execute.
        let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        // The WAL stays when a connection closes, uncheckpointed: every
        // kiln command is a process of its own, and the checkpoint at
        // close (two fsyncs, and the WAL made again with two more by the
        // next writer) cost more than the command's own work in a cached
        // build. Checkpoints happen as the WAL grows (every
        // `wal_autocheckpoint` pages, 256: a process's first open reads
        // at most that much of it back into the index); a crash or power
        // loss keeps what `synchronous=NORMAL` keeps either way.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )?;
        conn.execute_batch(
            "PRAGMA wal_autocheckpoint=256; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; \
             CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL);",
        )?;
        let meta = Meta {
            conn: Arc::new(Mutex::new(conn)),
            lease: None,
        };
        meta.migrate()?;
        // Additive tables, created when missing (a read says whether they
        // are: opening a store costs no write when they exist). None needs
        // a schema version: a kiln without them opens this store as
        // before, and a store without them gets them here.
        //
        // - diff_sizes: uncompressed layer sizes by diffID (what `images`,
        //   `inspect` and `history` show); content-addressed, a stale row
        //   is harmless, sizes found lazily.
        // - repo_digests: where stored images are known to be in
        //   registries (docker's RepoDigests); a row whose manifest is
        //   gone is never shown.
        // - lazy_layers, lazy_steps: layers whose snapshots are made when
        //   first needed (a build that took its result from a registry
        //   cache keeps the compressed blobs, verified against their
        //   digests, and unpacks them on first use, as a pulled image's),
        //   and the step keys that made them, each bound to the one blob
        //   its import named (another build's blob claiming the same
        //   snapshot never describes it); checked before use (a row whose
        //   blob is gone is no hit). (`lazy_cache`, the steps' table of
        //   kilns that did not bind the blob, is dropped: its steps are
        //   taken from their imports again.)
        let have: i64 = meta.conn().query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'
               AND name IN ('diff_sizes', 'repo_digests', 'lazy_layers', 'lazy_steps')",
            [],
            |r| r.get(0),
        )?;
        if have < 4 {
            meta.conn().execute_batch(
                "BEGIN IMMEDIATE;
                 CREATE TABLE IF NOT EXISTS diff_sizes(
                     diff_id TEXT PRIMARY KEY,
                     size    INTEGER NOT NULL
                 ) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS repo_digests(
                     manifest TEXT NOT NULL,
                     repo     TEXT NOT NULL,
                     digest   TEXT NOT NULL,
                     PRIMARY KEY(manifest, repo)
                 ) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS lazy_layers(
                     snapshot   TEXT NOT NULL,
                     blob       TEXT NOT NULL,
                     parent     TEXT,
                     media_type TEXT NOT NULL,
                     size       INTEGER NOT NULL,
                     diff_id    TEXT NOT NULL,
                     added      INTEGER NOT NULL, -- insertion order
                     PRIMARY KEY(snapshot, blob)
                 ) WITHOUT ROWID;
                 DROP TABLE IF EXISTS lazy_cache;
                 CREATE TABLE IF NOT EXISTS lazy_steps(
                     key      TEXT PRIMARY KEY,
                     snapshot TEXT NOT NULL,
                     blob     TEXT NOT NULL,
                     created  INTEGER NOT NULL
                 ) WITHOUT ROWID;
                 COMMIT;",
            )?;
        }
        Ok(meta)
    }

    fn migrate(&self) -> Result<()> {
        // A store at this version is only read: opening it writes nothing
        // (no WAL to create, nothing to checkpoint when the process ends).
        let current: Option<i64> = self
            .conn()
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .optional()?;
        if current == Some(SCHEMA_VERSION) {
            return Ok(());
        }
        self.write(|tx| {
            let v: Option<i64> = tx
                .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
                .optional()?;
            let v = v.unwrap_or(0);
            if v > SCHEMA_VERSION {
                return Err(Error::SchemaTooNew {
                    found: v,
                    supported: SCHEMA_VERSION,
                });
            }
            for m in &MIGRATIONS[v as usize..] {
                tx.execute_batch(m)?;
            }
            tx.execute("DELETE FROM schema_version", [])?;
            tx.execute(
                "INSERT INTO schema_version(version) VALUES (?1)",
                [SCHEMA_VERSION],
            )?;
            Ok(())
        })
    }

    /// The schema version stored.
    pub fn schema_version(&self) -> Result<i64> {
        let c = self.conn();
        Ok(c.query_row("SELECT version FROM schema_version", [], |r| r.get(0))?)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` in one IMMEDIATE write transaction.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Run `f` in one read transaction (a consistent snapshot).
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// A store setting (e.g. the snapshotter the store was created with).
    pub fn setting(&self, name: &str) -> Result<Option<String>> {
        self.read(|tx| {
            Ok(tx
                .query_row("SELECT value FROM settings WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?)
        })
    }

    /// Set a store setting unless already set; returns the stored value.
    pub fn setting_init(&self, name: &str, value: &str) -> Result<String> {
        if let Some(v) = self.setting(name)? {
            return Ok(v);
        }
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO settings(name, value) VALUES (?1, ?2)",
                [name, value],
            )?;
            Ok(
                tx.query_row("SELECT value FROM settings WHERE name = ?1", [name], |r| {
                    r.get(0)
                })?,
            )
        })
    }

    // ------------------------------------------------------------ leases

    /// Create a lease bound to this process (it expires when the process is
    /// gone) and, if `ttl` is given, also after that long.
    pub fn create_lease(&self, ttl: Option<Duration>) -> Result<String> {
        let id = format!("lease-{}", random_hex::<8>());
        let me = ProcessId::current();
        let now = now_unix();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO leases(id, pid, pid_start, created, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, me.pid, me.start, now, ttl.map(|t| now + t.as_secs() as i64)],
            )?;
            Ok(())
        })?;
        Ok(id)
    }

    /// Delete a lease; what only it protected becomes collectable.
    pub fn delete_lease(&self, id: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM leases WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    /// Start a lease (see [`Lease`]; `ttl` as in [`Meta::create_lease`]).
    pub fn new_lease(&self, ttl: Option<Duration>) -> Result<Lease> {
        Ok(Lease(Arc::new(LeaseInner {
            id: self.create_lease(ttl)?,
            conn: self.conn.clone(),
        })))
    }

    /// A handle on the same database whose writes join `lease` (and keep
    /// it alive).
    pub fn with_lease(&self, lease: &Lease) -> Meta {
        Meta {
            conn: self.conn.clone(),
            lease: Some(lease.clone()),
        }
    }

    /// The lease this handle's writes join, if any.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// Add a resource to this handle's lease (inside `tx`).
    pub(crate) fn lease_add(&self, tx: &Transaction<'_>, kind: &str, name: &str) -> Result<()> {
        if let Some(lease) = &self.lease {
            tx.execute(
                "INSERT OR IGNORE INTO lease_resources(lease, kind, name) VALUES (?1, ?2, ?3)",
                params![lease.id(), kind, name],
            )?;
        }
        Ok(())
    }

    /// Adds an existing snapshot (one a build uses but did not create) to
    /// this handle's lease, so that prune leaves it while the build runs.
    pub fn lease_snapshot(&self, name: &str) -> Result<()> {
        self.write(|tx| self.lease_add(tx, "snapshot", name))
    }

    /// All leases.
    pub fn leases(&self) -> Result<Vec<LeaseRecord>> {
        self.read(|tx| {
            let mut st = tx.prepare("SELECT id, pid, expires FROM leases ORDER BY id")?;
            let rows = st
                .query_map([], |r| {
                    Ok(LeaseRecord {
                        id: r.get(0)?,
                        pid: r.get(1)?,
                        expires: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    /// Delete leases whose process is gone or whose TTL passed; returns how
    /// many.
    /// Removes leases past their time and those whose process is gone
    /// (as `owner_alive` tells).
    pub(crate) fn expire_leases(
        &self,
        tx: &Transaction<'_>,
        owner_alive: crate::gc::OwnerAlive<'_>,
    ) -> Result<usize> {
        let now = now_unix();
        let mut dead = Vec::new();
        {
            let mut st = tx.prepare("SELECT id, pid, pid_start, expires FROM leases")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let id: String = r.get(0)?;
                let pid: Option<i64> = r.get(1)?;
                let start: Option<i64> = r.get(2)?;
                let expires: Option<i64> = r.get(3)?;
                let proc_gone = pid.is_some() && !owner_alive(pid, start);
                if proc_gone || expires.is_some_and(|e| e <= now) {
                    dead.push(id);
                }
            }
        }
        for id in &dead {
            tx.execute("DELETE FROM leases WHERE id = ?1", [id])?;
        }
        Ok(dead.len())
    }

    // ------------------------------------------------------------- blobs

    /// Record a blob (its file must already be durable).
    pub fn add_blob(&self, digest: &Digest, size: u64, media_type: Option<&str>) -> Result<()> {
        self.write(|tx| self.add_blob_tx(tx, digest, size, media_type))
    }

    pub(crate) fn add_blob_tx(
        &self,
        tx: &Transaction<'_>,
        digest: &Digest,
        size: u64,
        media_type: Option<&str>,
    ) -> Result<()> {
        let d = digest.to_string();
        // A row of a blob kept in a registry (a cache import's claim of
        // its size and type) takes the stored file's size and type.
        tx.execute(
            "INSERT INTO blobs(digest, size, media_type, created) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(digest) DO UPDATE SET
               size = excluded.size,
               media_type = CASE WHEN blobs.source LIKE '{\"remote\":%'
                 THEN COALESCE(excluded.media_type, blobs.media_type)
                 ELSE COALESCE(blobs.media_type, excluded.media_type) END,
               source = NULL",
            params![d, size as i64, media_type, now_unix()],
        )?;
        self.lease_add(tx, "blob", &d)
    }

    /// Record a layer blob that has no file: `source` (JSON, see
    /// [`crate::Store::record_layer_source`]) says how to write it again.
    /// A row that exists already (a file, or another source) is kept.
    /// Also links the blob to `snapshot`, so GC keeps the snapshot while
    /// the blob is reachable.
    pub fn add_lazy_blob(
        &self,
        digest: &Digest,
        size: u64,
        media_type: &str,
        snapshot: &str,
        source: &str,
    ) -> Result<()> {
        let d = digest.to_string();
        self.write(|tx| {
            // A row of a blob kept in a registry (a cache import's claim)
            // gives way: the layer is here.
            tx.execute(
                "INSERT INTO blobs(digest, size, media_type, created, source)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(digest) DO UPDATE
                 SET size = excluded.size, media_type = excluded.media_type,
                     source = excluded.source
                 WHERE blobs.source LIKE '{\"remote\":%'",
                params![d, size as i64, media_type, now_unix(), source],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO blob_snapshots(blob, snapshot) VALUES (?1, ?2)",
                params![d, snapshot],
            )?;
            self.lease_add(tx, "blob", &d)
        })
    }

    /// Record a blob that has no file and no snapshot: `source` (JSON,
    /// see [`crate::RemoteBlob`]) says where it is. A stored blob's row
    /// (a file, a layer source) is kept; another registry's row for the
    /// same digest and size gives way to this one (the latest import
    /// names where its build reads the blob: an earlier, hostile import
    /// naming an unreachable place would otherwise fail every later
    /// build's first read). A row's size never changes: a claim of
    /// another size is a lie of one of the two. Returns whether the row
    /// was added or replaced.
    pub fn add_source_blob(
        &self,
        digest: &Digest,
        size: u64,
        media_type: &str,
        source: &str,
    ) -> Result<bool> {
        let d = digest.to_string();
        self.write(|tx| {
            let added = tx.execute(
                "INSERT INTO blobs(digest, size, media_type, created, source)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(digest) DO UPDATE
                 SET size = excluded.size, media_type = excluded.media_type,
                     source = excluded.source
                 WHERE blobs.source LIKE '{\"remote\":%' AND blobs.source != excluded.source
                   AND blobs.size = excluded.size",
                params![d, size as i64, media_type, now_unix(), source],
            )?;
            self.lease_add(tx, "blob", &d)?;
            Ok(added > 0)
        })
    }

    /// The media type recorded with a blob.
    pub fn blob_media_type(&self, digest: &Digest) -> Result<Option<String>> {
        self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT media_type FROM blobs WHERE digest = ?1",
                    [digest.to_string()],
                    |r| r.get::<_, Option<String>>(0),
                )
                .optional()?
                .flatten())
        })
    }

    /// A blob row: its size and, for a blob kept as its source, that
    /// source (JSON).
    pub fn blob_row(&self, digest: &Digest) -> Result<Option<(u64, Option<String>)>> {
        self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT size, source FROM blobs WHERE digest = ?1",
                    [digest.to_string()],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
                )
                .optional()?)
        })
    }

    /// Record that blob `parent` (a manifest or index) references `child`.
    pub fn add_blob_ref(&self, parent: &Digest, child: &Digest) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO blob_refs(parent, child) VALUES (?1, ?2)",
                params![parent.to_string(), child.to_string()],
            )?;
            Ok(())
        })
    }

    /// Whether a blob row exists.
    pub fn has_blob(&self, digest: &Digest) -> Result<bool> {
        self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT 1 FROM blobs WHERE digest = ?1",
                    [digest.to_string()],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
        })
    }

    /// Record that blob `blob` (a manifest) has its rootfs unpacked as the
    /// committed snapshot `snapshot` (keeps the snapshot while the image is
    /// tagged).
    pub fn add_blob_snapshot(&self, blob: &Digest, snapshot: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO blob_snapshots(blob, snapshot) VALUES (?1, ?2)",
                params![blob.to_string(), snapshot],
            )?;
            Ok(())
        })
    }

    // ------------------------------------------------------------ images

    /// Point `name` at a manifest (both blobs must be recorded).
    pub fn tag_image(&self, name: &str, manifest: &Digest, config: Option<&Digest>) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO images(name, manifest, config, created) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET manifest = excluded.manifest,
                   config = excluded.config, created = excluded.created",
                params![
                    name,
                    manifest.to_string(),
                    config.map(|c| c.to_string()),
                    now_unix()
                ],
            )?;
            Ok(())
        })
    }

    /// Remove a tag. Returns whether it existed.
    pub fn untag_image(&self, name: &str) -> Result<bool> {
        self.write(|tx| Ok(tx.execute("DELETE FROM images WHERE name = ?1", [name])? > 0))
    }

    /// Look an image up by normalised name.
    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>> {
        self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT name, manifest, config, created FROM images WHERE name = ?1",
                    [name],
                    |r| {
                        Ok(ImageRecord {
                            name: r.get(0)?,
                            manifest: r.get(1)?,
                            config: r.get(2)?,
                            created: r.get(3)?,
                        })
                    },
                )
                .optional()?)
        })
    }

    /// Every tagged image, by name.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        self.read(|tx| {
            let mut st =
                tx.prepare("SELECT name, manifest, config, created FROM images ORDER BY name")?;
            let rows = st
                .query_map([], |r| {
                    Ok(ImageRecord {
                        name: r.get(0)?,
                        manifest: r.get(1)?,
                        config: r.get(2)?,
                        created: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    // --------------------------------------------------------- snapshots

    pub(crate) fn snapshot_insert(&self, tx: &Transaction<'_>, row: &SnapshotRow) -> Result<()> {
        let me = ProcessId::current();
        let owner = (row.kind != Kind::Committed).then_some(me);
        let n = tx.execute(
            "INSERT OR IGNORE INTO snapshots(key, id, kind, parent, diff_id, link, size, inodes, created, owner_pid, owner_start)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                row.key,
                row.id,
                row.kind.as_str(),
                row.parent,
                row.diff_id,
                row.link,
                row.size.map(|s| s as i64),
                row.inodes.map(|s| s as i64),
                row.created,
                owner.map(|o| o.pid),
                owner.map(|o| o.start),
            ],
        )?;
        if n == 0 {
            return Err(Error::AlreadyExists {
                kind: "snapshot",
                name: row.key.clone(),
            });
        }
        self.lease_add(tx, "snapshot", &row.key)
    }

    pub(crate) fn snapshot_get_tx(
        &self,
        tx: &Transaction<'_>,
        key: &str,
    ) -> Result<Option<SnapshotRow>> {
        let sql = format!("SELECT {SNAP_COLS} FROM snapshots WHERE key = ?1");
        tx.query_row(&sql, [key], snap_from_row)
            .optional()?
            .map(finish_snap)
            .transpose()
    }

    /// A snapshot's row.
    pub fn snapshot(&self, key: &str) -> Result<Option<SnapshotRow>> {
        self.read(|tx| self.snapshot_get_tx(tx, key))
    }

    /// The snapshot and its ancestors, nearest first.
    pub fn snapshot_chain(&self, key: &str) -> Result<Vec<SnapshotRow>> {
        self.read(|tx| {
            let sql = format!(
                "WITH RECURSIVE chain(k, depth) AS (
                    SELECT ?1, 0
                    UNION ALL
                    SELECT s.parent, chain.depth + 1 FROM snapshots s JOIN chain ON s.key = chain.k
                    WHERE s.parent IS NOT NULL)
                 SELECT {SNAP_COLS} FROM snapshots JOIN chain ON snapshots.key = chain.k ORDER BY chain.depth"
            );
            let mut st = tx.prepare(&sql)?;
            let rows = st
                .query_map([key], snap_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(finish_snap).collect()
        })
    }

    /// Every snapshot row.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRow>> {
        self.read(|tx| {
            let sql = format!("SELECT {SNAP_COLS} FROM snapshots ORDER BY key");
            let mut st = tx.prepare(&sql)?;
            let rows = st
                .query_map([], snap_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(finish_snap).collect()
        })
    }

    /// Turn the active snapshot `key` into the committed snapshot `name`.
    pub(crate) fn snapshot_commit(
        &self,
        key: &str,
        name: &str,
        size: u64,
        inodes: u64,
    ) -> Result<()> {
        self.write(|tx| {
            let row = self
                .snapshot_get_tx(tx, key)?
                .ok_or_else(|| Error::NotFound {
                    kind: "snapshot",
                    name: key.to_string(),
                })?;
            if row.kind != Kind::Active {
                return Err(Error::InvalidState(format!(
                    "snapshot {key:?} is {:?}, only an active snapshot can be committed",
                    row.kind
                )));
            }
            if key != name && self.snapshot_get_tx(tx, name)?.is_some() {
                return Err(Error::AlreadyExists {
                    kind: "snapshot",
                    name: name.to_string(),
                });
            }
            tx.execute(
                "UPDATE snapshots SET key = ?2, kind = 'committed', size = ?3, inodes = ?4,
                   owner_pid = NULL, owner_start = NULL WHERE key = ?1",
                params![key, name, size as i64, inodes as i64],
            )?;
            tx.execute(
                "UPDATE lease_resources SET name = ?2 WHERE kind = 'snapshot' AND name = ?1",
                params![key, name],
            )?;
            self.lease_add(tx, "snapshot", name)
        })
    }

    /// Record the diffID of a committed snapshot's layer.
    pub fn set_snapshot_diff_id(&self, key: &str, diff_id: &Digest) -> Result<()> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE snapshots SET diff_id = ?2 WHERE key = ?1",
                params![key, diff_id.to_string()],
            )?;
            if n == 0 {
                return Err(Error::NotFound {
                    kind: "snapshot",
                    name: key.to_string(),
                });
            }
            Ok(())
        })
    }

    /// Delete a snapshot row; fails if it has children.
    pub(crate) fn snapshot_delete(&self, key: &str) -> Result<SnapshotRow> {
        self.write(|tx| {
            let row = self
                .snapshot_get_tx(tx, key)?
                .ok_or_else(|| Error::NotFound {
                    kind: "snapshot",
                    name: key.to_string(),
                })?;
            let children: i64 = tx.query_row(
                "SELECT COUNT(*) FROM snapshots WHERE parent = ?1",
                [key],
                |r| r.get(0),
            )?;
            if children > 0 {
                return Err(Error::InvalidState(format!(
                    "snapshot {key:?} has {children} children; remove them first"
                )));
            }
            tx.execute("DELETE FROM snapshots WHERE key = ?1", [key])?;
            tx.execute(
                "DELETE FROM lease_resources WHERE kind = 'snapshot' AND name = ?1",
                [key],
            )?;
            Ok(row)
        })
    }

    // -------------------------------------------------------- cache index

    /// Record (or replace) a build cache record. `snapshot` must be a
    /// committed snapshot; `blobs` must be recorded blobs.
    pub fn cache_put(
        &self,
        key: &str,
        snapshot: Option<&str>,
        diff_id: Option<&Digest>,
        blobs: &[Digest],
    ) -> Result<()> {
        self.cache_put_record(key, snapshot, diff_id, blobs, None)
    }

    /// [`Meta::cache_put`] of a record made elsewhere: `created` is its
    /// maker's time (a remote cache's record keeps the exporter's, so the
    /// image's history and ID are the same on every runner), and replaces
    /// the one a record of the key had.
    pub fn cache_put_created(
        &self,
        key: &str,
        snapshot: Option<&str>,
        diff_id: Option<&Digest>,
        blobs: &[Digest],
        created: i64,
    ) -> Result<()> {
        self.cache_put_record(key, snapshot, diff_id, blobs, Some(created))
    }

    fn cache_put_record(
        &self,
        key: &str,
        snapshot: Option<&str>,
        diff_id: Option<&Digest>,
        blobs: &[Digest],
        created: Option<i64>,
    ) -> Result<()> {
        let now = now_unix();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO cache(key, snapshot, diff_id, created, last_used)
                 VALUES (?1, ?2, ?3, COALESCE(?5, ?4), ?4)
                 ON CONFLICT(key) DO UPDATE SET snapshot = excluded.snapshot,
                   diff_id = excluded.diff_id, last_used = excluded.last_used,
                   created = COALESCE(?5, cache.created)",
                params![key, snapshot, diff_id.map(|d| d.to_string()), now, created],
            )?;
            tx.execute("DELETE FROM cache_blobs WHERE key = ?1", [key])?;
            for (i, b) in blobs.iter().enumerate() {
                tx.execute(
                    "INSERT INTO cache_blobs(key, pos, blob) VALUES (?1, ?2, ?3)",
                    params![key, i as i64, b.to_string()],
                )?;
            }
            Ok(())
        })
    }

    /// Look a cache key up. A hit is marked used now, in the same
    /// transaction: prune drops the least recently used records first, and
    /// never a record used since a live lease (a running build) began, so
    /// a prune beside the build cannot take what the build goes on to use.
    /// A record already marked this second is not written again.
    pub fn cache_get(&self, key: &str) -> Result<Option<CacheRecord>> {
        let now = now_unix();
        self.write(|tx| {
            let rec = tx
                .query_row(
                    "SELECT key, snapshot, diff_id, created, last_used FROM cache WHERE key = ?1",
                    [key],
                    |r| {
                        Ok(CacheRecord {
                            key: r.get(0)?,
                            snapshot: r.get(1)?,
                            diff_id: r.get(2)?,
                            blobs: Vec::new(),
                            created: r.get(3)?,
                            last_used: r.get(4)?,
                        })
                    },
                )
                .optional()?;
            let Some(mut rec) = rec else { return Ok(None) };
            if rec.last_used < now {
                tx.execute(
                    "UPDATE cache SET last_used = ?2 WHERE key = ?1",
                    params![key, now],
                )?;
                rec.last_used = now;
            }
            let mut st = tx.prepare("SELECT blob FROM cache_blobs WHERE key = ?1 ORDER BY pos")?;
            rec.blobs = st
                .query_map([key], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(Some(rec))
        })
    }

    /// Every cache record (without blobs), newest use first.
    pub fn cache_records(&self) -> Result<Vec<CacheRecord>> {
        self.read(|tx| {
            let mut st = tx.prepare(
                "SELECT key, snapshot, diff_id, created, last_used FROM cache ORDER BY last_used DESC, created DESC",
            )?;
            let rows = st
                .query_map([], |r| {
                    Ok(CacheRecord {
                        key: r.get(0)?,
                        snapshot: r.get(1)?,
                        diff_id: r.get(2)?,
                        blobs: Vec::new(),
                        created: r.get(3)?,
                        last_used: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    // ------------------------------------------------ compressed-blob memo

    /// The blob computed earlier for (diffID, compression, level), if its
    /// row is still there.
    pub fn layer_blob(
        &self,
        diff_id: &Digest,
        compression: &str,
        level: i32,
    ) -> Result<Option<Digest>> {
        self.read(|tx| {
            let s: Option<String> = tx
                .query_row(
                    "SELECT blob FROM layer_blobs WHERE diff_id = ?1 AND compression = ?2 AND level = ?3",
                    params![diff_id.to_string(), compression, level],
                    |r| r.get(0),
                )
                .optional()?;
            s.map(|s| s.parse().map_err(|_| Error::InvalidDigest(s.clone())))
                .transpose()
        })
    }

    /// Whether the memo names `blob` for `diff_id` at any compression and
    /// level (it was made, or proved, to be that layer).
    pub fn memo_has(&self, diff_id: &Digest, blob: &Digest) -> Result<bool> {
        self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT 1 FROM layer_blobs WHERE diff_id = ?1 AND blob = ?2 LIMIT 1",
                    params![diff_id.to_string(), blob.to_string()],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
        })
    }

    /// Remember the blob for (diffID, compression, level); the blob must be
    /// recorded.
    pub fn put_layer_blob(
        &self,
        diff_id: &Digest,
        compression: &str,
        level: i32,
        blob: &Digest,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO layer_blobs(diff_id, compression, level, blob) VALUES (?1, ?2, ?3, ?4)",
                params![diff_id.to_string(), compression, level, blob.to_string()],
            )?;
            Ok(())
        })
    }

    // ------------------------------------------------ uncompressed sizes

    /// The recorded size of the uncompressed layer tar `diff_id`.
    pub fn diff_size(&self, diff_id: &Digest) -> Result<Option<u64>> {
        self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT size FROM diff_sizes WHERE diff_id = ?1",
                    [diff_id.to_string()],
                    |r| r.get::<_, i64>(0),
                )
                .optional()?
                .map(|v| v.max(0) as u64))
        })
    }

    /// Records the size of the uncompressed layer tar `diff_id`.
    pub fn put_diff_size(&self, diff_id: &Digest, size: u64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO diff_sizes(diff_id, size) VALUES (?1, ?2)",
                params![diff_id.to_string(), size as i64],
            )?;
            Ok(())
        })
    }

    // ------------------------------------------------------- lazy layers

    /// Records `l`: its snapshot can be made from its stored blob. A
    /// snapshot may have several such blobs (a cache may offer another
    /// compression of the same layer — or claim a layer a blob is not:
    /// each is verified when it is unpacked, and one that fails is
    /// dropped, see [`crate::Store::unpack_lazy`]).
    pub fn put_lazy_layer(&self, l: &LazyLayer) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO lazy_layers(snapshot, blob, parent, media_type, size, diff_id, added)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6,
                         (SELECT COALESCE(MAX(added), 0) + 1 FROM lazy_layers))",
                params![
                    l.snapshot,
                    l.blob.to_string(),
                    l.parent,
                    l.media_type,
                    l.size as i64,
                    l.diff_id.to_string()
                ],
            )?;
            Ok(())
        })
    }

    /// The lazy layers that make the snapshot `snapshot`, first recorded
    /// first.
    pub fn lazy_layers(&self, snapshot: &str) -> Result<Vec<LazyLayer>> {
        self.lazy_rows("snapshot", snapshot)
    }

    /// The lazy layers that claim to be the layer `diff_id` in one of
    /// `media_types`, first recorded first (not verified: a claim).
    pub fn lazy_layers_of_diff(
        &self,
        diff_id: &Digest,
        media_types: &[&str],
    ) -> Result<Vec<LazyLayer>> {
        let mut rows = self.lazy_rows("diff_id", &diff_id.to_string())?;
        rows.retain(|l| media_types.contains(&l.media_type.as_str()));
        Ok(rows)
    }

    /// The rows of `lazy_layers` whose `column` (a fixed name, never
    /// input) is `value`, first recorded first.
    fn lazy_rows(&self, column: &'static str, value: &str) -> Result<Vec<LazyLayer>> {
        type Row = (String, String, Option<String>, String, i64, String);
        let rows: Vec<Row> = self.read(|tx| {
            let mut st = tx.prepare(&format!(
                "SELECT snapshot, blob, parent, media_type, size, diff_id FROM lazy_layers
                 WHERE {column} = ?1 ORDER BY added, blob"
            ))?;
            let rows = st
                .query_map([value], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<Row>>>()?;
            Ok(rows)
        })?;
        let digest = |s: String| s.parse().map_err(|_| Error::InvalidDigest(s.clone()));
        rows.into_iter()
            .map(|(snapshot, blob, parent, media_type, size, diff_id)| {
                Ok(LazyLayer {
                    snapshot,
                    parent,
                    blob: digest(blob)?,
                    media_type,
                    size: size.max(0) as u64,
                    diff_id: digest(diff_id)?,
                })
            })
            .collect()
    }

    /// Forgets the lazy layer (`snapshot`, `blob`): its blob is not the
    /// layer it claimed, or is gone.
    pub fn drop_lazy_layer(&self, snapshot: &str, blob: &Digest) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM lazy_layers WHERE snapshot = ?1 AND blob = ?2",
                params![snapshot, blob.to_string()],
            )?;
            Ok(())
        })
    }

    /// Records that the step `key` made the lazy layer (`snapshot`,
    /// `blob`): the step is described by that blob, whatever other blobs
    /// claim the snapshot.
    pub fn put_lazy_cache(
        &self,
        key: &str,
        snapshot: &str,
        blob: &Digest,
        created: i64,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO lazy_steps(key, snapshot, blob, created) VALUES (?1, ?2, ?3, ?4)",
                params![key, snapshot, blob.to_string(), created],
            )?;
            Ok(())
        })
    }

    /// The lazy layer the step `key` made and when: (snapshot, blob,
    /// created).
    pub fn lazy_cache(&self, key: &str) -> Result<Option<(String, Digest, i64)>> {
        let row: Option<(String, String, i64)> = self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT snapshot, blob, created FROM lazy_steps WHERE key = ?1",
                    [key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?)
        })?;
        row.map(|(snapshot, blob, created)| {
            let blob = blob
                .parse()
                .map_err(|_| Error::InvalidDigest(blob.clone()))?;
            Ok((snapshot, blob, created))
        })
        .transpose()
    }

    // ------------------------------------------------------ repo digests

    /// Records that the stored manifest `manifest` is `repo@digest` in a
    /// registry (pushed there or pulled from there).
    pub fn put_repo_digest(&self, manifest: &str, repo: &str, digest: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO repo_digests(manifest, repo, digest) VALUES (?1, ?2, ?3)",
                params![manifest, repo, digest],
            )?;
            Ok(())
        })
    }

    /// The `(repo, digest)` pairs recorded for the stored manifest
    /// `manifest`, by repo.
    pub fn repo_digests(&self, manifest: &str) -> Result<Vec<(String, String)>> {
        self.read(|tx| {
            let mut st = tx.prepare(
                "SELECT repo, digest FROM repo_digests WHERE manifest = ?1 ORDER BY repo",
            )?;
            let rows = st
                .query_map([manifest], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    // ----------------------------------------------------- blob locations

    /// Records that `registry`/`repo` holds each of `digests` (blobs the
    /// store does not have are skipped).
    pub fn add_blob_locations(&self, registry: &str, repo: &str, digests: &[Digest]) -> Result<()> {
        let now = now_unix();
        self.write(|tx| {
            let mut st = tx.prepare(
                "INSERT OR REPLACE INTO blob_locations(digest, registry, repo, seen)
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM blobs WHERE digest = ?1)",
            )?;
            for d in digests {
                st.execute(params![d.to_string(), registry, repo, now])?;
            }
            Ok(())
        })
    }

    /// A repository of `registry` other than `except` known to hold
    /// `digest` (the most recently seen), if any.
    pub fn blob_location(
        &self,
        digest: &Digest,
        registry: &str,
        except: &str,
    ) -> Result<Option<String>> {
        self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT repo FROM blob_locations WHERE digest = ?1 AND registry = ?2 AND repo != ?3
                     ORDER BY seen DESC, repo LIMIT 1",
                    params![digest.to_string(), registry, except],
                    |r| r.get(0),
                )
                .optional()?)
        })
    }

    // ----------------------------------------------------- file-hash cache

    /// Look up many files at once (one read transaction). Each result is
    /// the stored hash if the stored stat equals the given one.
    pub fn file_hashes_get(&self, entries: &[(&str, FileStat)]) -> Result<Vec<Option<String>>> {
        self.read(|tx| {
            let mut st = tx.prepare_cached(
                "SELECT dev, ino, size, mtime_ns, ctime_ns, mode, hash FROM file_hashes WHERE path = ?1",
            )?;
            let mut out = Vec::with_capacity(entries.len());
            for (path, stat) in entries {
                let hit = st
                    .query_row([path], |r| {
                        let stored = FileStat {
                            dev: r.get::<_, i64>(0)? as u64,
                            ino: r.get::<_, i64>(1)? as u64,
                            size: r.get::<_, i64>(2)? as u64,
                            mtime_ns: r.get(3)?,
                            ctime_ns: r.get(4)?,
                            mode: r.get::<_, i64>(5)? as u32,
                        };
                        Ok((stored, r.get::<_, String>(6)?))
                    })
                    .optional()?;
                out.push(hit.and_then(|(stored, hash)| (stored == *stat).then_some(hash)));
            }
            Ok(out)
        })
    }

    /// Store many file hashes at once (one write transaction). Entries
    /// whose ctime is within the last two seconds are skipped: a write in
    /// the same timestamp tick could change content without changing the
    /// stat ("racy clean"), so such files are hashed again next time.
    pub fn file_hashes_put(&self, entries: &[(&str, FileStat, &str)]) -> Result<usize> {
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(i64::MAX);
        self.write(|tx| {
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO file_hashes(path, dev, ino, size, mtime_ns, ctime_ns, mode, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            let mut n = 0;
            for (path, s, hash) in entries {
                if s.ctime_ns > now_ns - 2_000_000_000 || s.mtime_ns > now_ns - 2_000_000_000 {
                    continue;
                }
                st.execute(params![
                    path,
                    s.dev as i64,
                    s.ino as i64,
                    s.size as i64,
                    s.mtime_ns,
                    s.ctime_ns,
                    s.mode as i64,
                    hash
                ])?;
                n += 1;
            }
            Ok(n)
        })
    }
}
