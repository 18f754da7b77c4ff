//! [`Store`]: one root directory, its layout, and the operations that span
//! files and rows.

use rusqlite::OptionalExtension;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::content::ContentStore;
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::meta::{Lease, Meta};
use crate::snapshot::{NativeSnapshotter, OverlaySnapshotter, Paths, Snapshotter};
use crate::util::{fsync_dir, FileLock};

/// Which snapshotter a store uses. A store keeps the choice it was created
/// with (snapshot directories of one kind mean nothing to the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotterKind {
    /// Overlay if the kernel can mount it on the root's filesystem, else
    /// native; or whatever the store was created with.
    #[default]
    Auto,
    /// The overlay snapshotter.
    Overlay,
    /// The copying snapshotter.
    Native,
}

impl SnapshotterKind {
    fn as_str(self) -> &'static str {
        match self {
            SnapshotterKind::Auto => "auto",
            SnapshotterKind::Overlay => "overlay",
            SnapshotterKind::Native => "native",
        }
    }
}

/// How to open a store.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// The snapshotter.
    pub snapshotter: SnapshotterKind,
}

/// There is no default store root for an ordinary user without a home
/// directory.
#[derive(Debug, thiserror::Error)]
#[error(
    "no home directory for uid {uid} (HOME and XDG_DATA_HOME are unset or not absolute, and the user database has none): pass --root or set KILN_ROOT"
)]
pub struct NoHome {
    /// The effective uid.
    pub uid: u32,
}

/// The default store root: `$KILN_ROOT` is handled by the CLI; this is
/// `/var/lib/kiln` for root, else `$XDG_DATA_HOME/kiln` (or
/// `~/.local/share/kiln`, `~` being `$HOME`, else the user database's
/// home). Relative values are ignored, as the XDG base directory spec
/// says: never a store below the working directory, nor in a shared
/// directory such as `/tmp` where another user could have made it first.
pub fn default_root() -> Result<PathBuf, NoHome> {
    // SAFETY: geteuid has no failure mode.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return Ok(PathBuf::from("/var/lib/kiln"));
    }
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").and_then(absolute) {
        return Ok(x.join("kiln"));
    }
    let home = std::env::var_os("HOME")
        .and_then(absolute)
        .or_else(|| passwd_home(uid))
        .ok_or(NoHome { uid })?;
    Ok(home.join(".local/share/kiln"))
}

/// `uid`'s home directory from the user database, when absolute.
fn passwd_home(uid: u32) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: zeroed is a valid passwd (null pointers, zero ids).
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; on success `out`
    // points at `pw`, whose strings live in `buf`.
    let rc =
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || pw.pw_dir.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string inside `buf`, alive here.
    let dir = unsafe { std::ffi::CStr::from_ptr(pw.pw_dir) };
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()))).filter(|p| p.is_absolute())
}

/// Everything kiln keeps on disk under one root:
///
/// ```text
/// <root>/meta.db            SQLite (WAL): images, blobs, snapshots, cache, leases, file hashes
/// <root>/blobs/sha256/<hex> content store
/// <root>/snapshots/<id>/    one directory per snapshot (fs/, work/)
/// <root>/l/<short>          overlay short links -> ../snapshots/<id>/fs
/// <root>/tmp/               temp files (blobs being written, probes)
/// <root>/gc.lock            writers hold it shared, prune exclusive
/// ```
pub struct Store {
    root: PathBuf,
    content: ContentStore,
    meta: Arc<Meta>,
    paths: Paths,
    tmp: PathBuf,
    snapshotter: Box<dyn Snapshotter>,
    /// Whether `snapshotter` is the overlay one (to make handles).
    overlay: bool,
    /// The snapshotters' chain memo, shared by this store's handles.
    chains: crate::snapshot::Chains,
    /// What downloads a blob kept in a registry ([`RemoteBlob`]) when it
    /// is first read; none: such a read fails with [`Error::Fetch`].
    fetcher: Option<Arc<dyn BlobFetcher>>,
}

/// Where a blob with no file is kept: a registry's repository (a layer a
/// `--cache-from` import named, recorded by
/// [`Store::record_remote_blob`] instead of downloaded). The first read
/// downloads it through the store's [`BlobFetcher`], verified against its
/// digest and size as any blob entering the store is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteBlob {
    /// The registry (host\[:port\]).
    pub registry: String,
    /// The repository in it.
    pub repo: String,
    /// Whether the build that recorded it reached this registry over
    /// plain HTTP (it was an insecure registry then). For information
    /// only: a fetch reaches the registry as the fetching command's own
    /// settings say, never as a row of the shared store says.
    #[serde(default)]
    pub insecure: bool,
}

/// Downloads a blob kept in a registry into the store (see
/// [`RemoteBlob`]).
pub trait BlobFetcher: Send + Sync {
    /// Writes blob `digest` (`size` bytes, `media_type`) from `from` into
    /// `store`, verified against its digest and size (as
    /// [`Store::commit_blob`] with both expected does).
    fn fetch(
        &self,
        store: &Store,
        from: &RemoteBlob,
        digest: &Digest,
        size: u64,
        media_type: Option<&str>,
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// What the `source` column of a blob row says.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum BlobSource {
    /// Kept in a registry.
    Remote { remote: RemoteBlob },
    /// The diff of a committed snapshot.
    Layer(LayerSource),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .field("snapshotter", &self.snapshotter.name())
            .finish()
    }
}

impl Store {
    /// Open (creating if needed) the store at `root` with the default
    /// options.
    pub fn open(root: impl AsRef<Path>) -> Result<Store> {
        Self::open_with(root, StoreOptions::default())
    }

    /// Open (creating if needed) the store at `root`.
    pub fn open_with(root: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        let root = root.as_ref().to_path_buf();
        let blobs = root.join("blobs").join("sha256");
        let snapshots = root.join("snapshots");
        let links = root.join("l");
        let tmp = root.join("tmp");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .ctx("mkdir", &root)?;
        // The store holds every image's files (setuid binaries among
        // them) and the build cache: no other user may reach into it. A
        // store made by an older kiln (0755) is closed here; the root's
        // mode alone cuts every path below it. Checked before anything is
        // made in it.
        private_root(&root)?;
        for d in [&blobs, &snapshots, &links, &tmp] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .ctx("mkdir", d)?;
        }
        tmp_users::join(&root)?;
        tmp_users::alive_here(&root)?;
        let paths = Paths {
            snapshots,
            links,
            gc_lock: root.join("gc.lock"),
            tmp: tmp.clone(),
        };
        let db = root.join("meta.db");
        let fresh = !db.exists();
        let meta = Arc::new(Meta::open(&db)?);
        private_db(&db);
        if fresh {
            // The new database's directory entry (its contents are SQLite's).
            fsync_dir(&root)?;
        }
        let wanted = match opts.snapshotter {
            SnapshotterKind::Auto => match meta.setting("snapshotter")? {
                Some(s) => s,
                None => {
                    if OverlaySnapshotter::supported(&tmp) {
                        "overlay".to_string()
                    } else {
                        "native".to_string()
                    }
                }
            },
            k => k.as_str().to_string(),
        };
        let recorded = meta.setting_init("snapshotter", &wanted)?;
        if recorded != wanted {
            return Err(Error::InvalidState(format!(
                "store {} was created with the {recorded} snapshotter, not {wanted}",
                root.display()
            )));
        }
        let overlay = recorded == "overlay";
        let chains = crate::snapshot::Chains::default();
        Ok(Store {
            content: ContentStore::new(blobs, &tmp).with_gc_lock(paths.gc_lock.clone()),
            root,
            snapshotter: make_snapshotter(overlay, &meta, &paths, &chains),
            meta,
            paths,
            tmp,
            overlay,
            chains,
            fetcher: None,
        })
    }

    /// This store with `fetcher` downloading the blobs kept in registries
    /// (see [`RemoteBlob`]) when they are first read; handles made from it
    /// ([`Store::with_lease`]) share it.
    pub fn with_fetcher(mut self, fetcher: Arc<dyn BlobFetcher>) -> Store {
        self.fetcher = Some(fetcher);
        self
    }

    /// A handle on the same store whose writes (blobs, snapshots, their
    /// commits) join `lease` and keep it alive; writes through other
    /// handles, `self` included, don't.
    pub fn with_lease(&self, lease: &Lease) -> Store {
        let meta = Arc::new(self.meta.with_lease(lease));
        Store {
            root: self.root.clone(),
            content: self.content.clone(),
            snapshotter: make_snapshotter(self.overlay, &meta, &self.paths, &self.chains),
            meta,
            paths: self.paths.clone(),
            tmp: self.tmp.clone(),
            overlay: self.overlay,
            chains: self.chains.clone(),
            fetcher: self.fetcher.clone(),
        }
    }

    /// A new lease and a handle whose writes join it (see
    /// [`Store::lease`], [`Store::with_lease`]): what an operation
    /// writes through the handle is kept by GC until the handle drops.
    pub fn leased(&self, ttl: Option<Duration>) -> Result<Store> {
        Ok(self.with_lease(&self.lease(ttl)?))
    }

    /// The lease this handle's writes join, if any.
    pub fn current_lease(&self) -> Option<&Lease> {
        self.meta.lease()
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The temp directory (same filesystem as everything else; files here
    /// are reclaimed by prune once no writer holds the GC lock).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// The content store (files only; use [`Store::put_blob`] to also
    /// record the blob).
    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    /// The metadata database.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The snapshotter this store uses.
    pub fn snapshotter(&self) -> &dyn Snapshotter {
        self.snapshotter.as_ref()
    }

    pub(crate) fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Hold the GC lock shared: prune cannot run while the guard lives. Use
    /// around "write files, then record rows" sequences built from the
    /// lower-level pieces.
    pub fn gc_guard(&self) -> Result<GcGuard> {
        Ok(GcGuard(FileLock::shared(&self.paths.gc_lock)?))
    }

    /// Stream a blob into the content store and record it (and add it to
    /// the current lease). With `expected`, the content must match that
    /// digest (and `size`) or nothing is kept.
    pub fn put_blob(
        &self,
        reader: impl Read,
        expected: Option<&Digest>,
        size: Option<u64>,
        media_type: Option<&str>,
    ) -> Result<(Digest, u64)> {
        let _gc = self.gc_guard()?;
        let (d, n) = self.content.ingest(reader, expected, size)?;
        self.meta.add_blob(&d, n, media_type)?;
        Ok((d, n))
    }

    /// [`Store::put_blob`] for a reader that itself fails at EOF unless
    /// its bytes have `digest` and `size` (a verifying download): the
    /// bytes are written without being hashed again, and the stream must
    /// end cleanly with exactly `size` bytes for anything to be kept.
    pub fn put_verified_blob(
        &self,
        mut reader: impl Read,
        digest: &Digest,
        size: u64,
        media_type: Option<&str>,
    ) -> Result<(Digest, u64)> {
        let _gc = self.gc_guard()?;
        if self.content.size(digest).is_ok_and(|s| s == size) {
            self.meta.add_blob(digest, size, media_type)?;
            return Ok((digest.clone(), size));
        }
        let mut w = self.content.writer_prehashed()?;
        let tmp = w.temp_path().to_path_buf();
        std::io::copy(&mut reader, &mut w).ctx("write", &tmp)?;
        // commit checks the size written against `size`.
        let (d, n) = w.commit(Some(digest), Some(size))?;
        self.meta.add_blob(&d, n, media_type)?;
        Ok((d, n))
    }

    /// Store the file `path` (on the store's filesystem; its content was
    /// hashed by the caller as it was written: `digest`, `size` bytes) as
    /// that blob without copying it, and record it. Unlike
    /// [`Store::put_blob`] this replaces a stored file of that name, so
    /// loading an image again repairs a blob that was corrupt in the store.
    pub fn put_blob_file(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
        media_type: Option<&str>,
    ) -> Result<()> {
        let _gc = self.gc_guard()?;
        self.content.adopt_file(path, digest, size)?;
        self.meta.add_blob(digest, size, media_type)?;
        Ok(())
    }

    /// Commit a blob written through [`ContentStore::writer`] (verify,
    /// rename, fsync) and record it, with no window for a concurrent prune
    /// between the file and its row.
    pub fn commit_blob(
        &self,
        writer: crate::content::BlobWriter,
        expected: Option<&Digest>,
        size: Option<u64>,
        media_type: Option<&str>,
    ) -> Result<(Digest, u64)> {
        let _gc = self.gc_guard()?;
        let (d, n) = writer.commit(expected, size)?;
        self.meta.add_blob(&d, n, media_type)?;
        Ok((d, n))
    }

    /// Record a layer blob without storing its bytes: `digest`/`size`
    /// are those of the tar that `opts` diffing the committed `snapshot`
    /// writes (deterministically). [`Store::open_blob`] writes it again
    /// when it is read (export, push); GC keeps the snapshot while the
    /// blob is reachable. Locally built layers are kept this way: the
    /// snapshot already holds every byte, and a second copy as a tar
    /// (written and fsynced at build time) doubled the cost of big
    /// `COPY` steps.
    pub fn record_layer_source(
        &self,
        digest: &Digest,
        size: u64,
        snapshot: &str,
        opts: &kiln_image::diff::DiffOptions,
    ) -> Result<()> {
        let source = serde_json::to_string(&LayerSource {
            snapshot: snapshot.to_string(),
            opts: opts.clone(),
        })
        .map_err(|e| Error::InvalidState(format!("layer source: {e}")))?;
        let _gc = self.gc_guard()?;
        self.meta.add_lazy_blob(
            digest,
            size,
            kiln_image::manifest::media_types::OCI_LAYER,
            snapshot,
            &source,
        )?;
        // The blob is the uncompressed tar: its size is the layer's.
        self.meta.put_diff_size(digest, size)
    }

    /// Record a blob kept in a registry instead of downloading it (see
    /// [`RemoteBlob`]): readable from now on ([`Store::has_blob`]), it is
    /// downloaded and verified when first read. A stored blob's row (a
    /// file, a layer source) is kept; an earlier record of the blob in
    /// another registry gives way to this one. The registry is also
    /// recorded as a place holding the blob (a push there mounts it,
    /// downloading nothing).
    pub fn record_remote_blob(
        &self,
        digest: &Digest,
        size: u64,
        media_type: &str,
        from: &RemoteBlob,
    ) -> Result<()> {
        let source = serde_json::to_string(&BlobSource::Remote {
            remote: from.clone(),
        })
        .map_err(|e| Error::InvalidState(format!("blob source: {e}")))?;
        let _gc = self.gc_guard()?;
        // Where a blob already stored is, an import's word does not say.
        if self
            .meta
            .add_source_blob(digest, size, media_type, &source)?
        {
            self.meta.add_blob_locations(
                &from.registry,
                &from.repo,
                std::slice::from_ref(digest),
            )?;
        }
        Ok(())
    }

    /// The recorded size and place of the blob `digest` when it is a
    /// [`RemoteBlob`] not downloaded yet.
    fn remote_row(&self, digest: &Digest) -> Result<Option<(u64, RemoteBlob)>> {
        if self.content.size(digest).is_ok() {
            return Ok(None);
        }
        Ok(match self.meta.blob_row(digest)? {
            Some((size, Some(source))) => match serde_json::from_str(&source) {
                Ok(BlobSource::Remote { remote }) => Some((size, remote)),
                _ => None,
            },
            _ => None,
        })
    }

    /// Where the blob `digest` is kept when it is a [`RemoteBlob`] not
    /// downloaded yet.
    pub fn remote_blob(&self, digest: &Digest) -> Result<Option<RemoteBlob>> {
        Ok(self.remote_row(digest)?.map(|(_, r)| r))
    }

    /// Downloads the blob `digest` when it is a [`RemoteBlob`] (through
    /// this handle's [`BlobFetcher`], verified). Returns whether it did.
    pub fn fetch_remote(&self, digest: &Digest) -> Result<bool> {
        let Some((size, remote)) = self.remote_row(digest)? else {
            return Ok(false);
        };
        let media_type = self.meta.blob_media_type(digest)?;
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| Error::Fetch {
            digest: digest.to_string(),
            from: Box::new(remote.clone()),
            source,
        };
        let Some(fetcher) = &self.fetcher else {
            return Err(fail("this command does not reach registries".into()));
        };
        fetcher
            .fetch(self, &remote, digest, size, media_type.as_deref())
            .map_err(fail)?;
        match self.content.size(digest) {
            Ok(n) if n == size => Ok(true),
            Ok(n) => Err(fail(
                format!("the fetcher stored {n} bytes, {size} expected").into(),
            )),
            Err(_) => Err(fail("the fetcher stored nothing".into())),
        }
    }

    /// The stored file of blob `digest`, downloaded first when it is a
    /// [`RemoteBlob`].
    pub(crate) fn open_file_fetching(&self, digest: &Digest) -> Result<std::fs::File> {
        match self.content.open(digest) {
            Err(Error::NotFound { .. }) if self.fetch_remote(digest)? => self.content.open(digest),
            other => other,
        }
    }

    /// Whether the blob is here: its file is stored, or it is a layer kept
    /// as its snapshot's diff — not a [`RemoteBlob`] (a pull downloads
    /// one: a cache import's record of a digest must not stand in for the
    /// blob, nor make it depend on that registry).
    pub fn has_local_blob(&self, digest: &Digest) -> bool {
        self.has_blob(digest) && self.remote_blob(digest).is_ok_and(|r| r.is_none())
    }

    /// Whether the blob can be read: its file is stored, or it is a layer
    /// kept as its source (see [`Store::record_layer_source`]) or in a
    /// registry (see [`Store::record_remote_blob`]).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_size(digest).is_ok()
    }

    /// The size of a blob that can be read (see [`Store::has_blob`]).
    pub fn blob_size(&self, digest: &Digest) -> Result<u64> {
        match self.content.size(digest) {
            Err(Error::NotFound { .. }) => match self.meta.blob_row(digest)? {
                Some((size, Some(_))) => Ok(size),
                _ => Err(Error::NotFound {
                    kind: "blob",
                    name: digest.to_string(),
                }),
            },
            other => other,
        }
    }

    /// Open a blob for reading: its file, or for a layer kept as its
    /// source, the snapshot's diff written again on a thread (which also
    /// hashes it, off the reader's thread) and checked against `digest`
    /// and the recorded size at the end (a mismatch is a read error). The
    /// GC lock is held shared until the reader drops, so no prune removes
    /// the snapshot underneath.
    pub fn open_blob(&self, digest: &Digest) -> Result<Box<dyn Read + Send>> {
        self.open_blob_checked(digest).map(|(r, _)| r)
    }

    /// [`Store::open_blob`], also telling whether the reader itself checks
    /// the bytes against `digest` (a layer written again from its
    /// snapshot: yes; a stored file: no), so that a caller that needs the
    /// digest verified need not hash the bytes a second time.
    pub fn open_blob_checked(&self, digest: &Digest) -> Result<(Box<dyn Read + Send>, bool)> {
        match self.content.open(digest) {
            Ok(f) => return Ok((Box::new(f), false)),
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let gc = self.gc_guard()?;
        // The file may have appeared (and the source been cleared) since.
        if let Ok(f) = self.content.open(digest) {
            return Ok((Box::new(f), false));
        }
        let not_found = || Error::NotFound {
            kind: "blob",
            name: digest.to_string(),
        };
        let Some((size, Some(source))) = self.meta.blob_row(digest)? else {
            return Err(not_found());
        };
        let src = match serde_json::from_str(&source)
            .map_err(|e| Error::InvalidState(format!("blob {digest}: layer source: {e}")))?
        {
            BlobSource::Layer(src) => src,
            BlobSource::Remote { .. } => {
                drop(gc);
                let f = self.open_file_fetching(digest)?;
                return Ok((Box::new(f), false));
            }
        };
        let diff = self.snapshotter().diff_source(&src.snapshot).map_err(|e| {
            Error::InvalidState(format!(
                "blob {digest} is kept as the diff of snapshot {}, which cannot be read: {e}",
                src.snapshot
            ))
        })?;
        let (writer, reader) = crate::chunkpipe::chunk_pipe();
        let outcome: Arc<std::sync::Mutex<Option<WriteOutcome>>> = Default::default();
        let report = outcome.clone();
        std::thread::Builder::new()
            .name("kiln-layer-tar".into())
            .spawn(move || {
                // The chunk writer buffers (1 MiB), so the tar's small
                // writes need no BufWriter of their own.
                let mut hashed = kiln_image::HashingWriter::new(writer);
                let res = diff
                    .write_tar(&mut hashed, &src.opts)
                    .map_err(|e| e.to_string())
                    .and_then(|_| std::io::Write::flush(&mut hashed).map_err(|e| e.to_string()));
                let (writer, got, len) = hashed.finish();
                if let Ok(mut r) = report.lock() {
                    *r = Some(res.map(|()| (got, len)));
                }
                // The reader sees the end only now, with the outcome set.
                drop(writer);
            })
            .ctx("spawn", self.root())?;
        Ok((
            Box::new(SourceReader {
                inner: reader,
                want: digest.clone(),
                size,
                outcome,
                checked: false,
                failed: None,
                _gc: gc,
            }),
            true,
        ))
    }

    /// Delete retired snapshot directories (see
    /// [`Snapshotter::retire`]), oldest first, until those left take at
    /// most `budget` bytes. Returns how many were deleted. `kiln build`
    /// calls this at its end with a tenth of the filesystem's size, as
    /// BuildKit's default GC budget; `kiln prune` deletes them all.
    pub fn sweep_retired(&self, budget: u64) -> Result<usize> {
        let _gc = self.gc_guard()?;
        let retired = retired_dirs(&self.tmp)?;
        let mut total: u64 = retired.iter().map(|r| r.1).sum();
        let mut removed = 0;
        for (_, size, path) in retired {
            if total <= budget {
                break;
            }
            crate::util::remove_all(&path)?;
            total = total.saturating_sub(size);
            removed += 1;
        }
        Ok(removed)
    }

    /// A tenth of the size of the filesystem holding the store (0 if it
    /// cannot be read): the default budget for [`Store::sweep_retired`].
    pub fn retired_budget(&self) -> u64 {
        fs_tenth(self.root())
    }

    /// [`Store::put_blob`] for blobs in memory (an image's config and
    /// manifest), stored together: their digests are known before
    /// anything is written, so a blob already stored (a cached rebuild's
    /// config and manifest) is only recorded, not written and synced
    /// again; the others are synced at once, then their directory once
    /// (see `content::commit_all`), and all are recorded in one
    /// transaction. Returns their digests, in order.
    pub fn put_bytes_all(&self, items: &[(&[u8], Option<&str>)]) -> Result<Vec<Digest>> {
        let _gc = self.gc_guard()?;
        let digests: Vec<Digest> = items.iter().map(|(b, _)| Digest::sha256_of(b)).collect();
        let mut writers = Vec::new();
        for ((bytes, _), d) in items.iter().zip(&digests) {
            let n = bytes.len() as u64;
            if self.content.size(d).is_ok_and(|s| s == n) || writers.iter().any(|(_, w, _)| w == d)
            {
                continue;
            }
            let mut w = self.content.writer_prehashed()?;
            let tmp = w.temp_path().to_path_buf();
            std::io::Write::write_all(&mut w, bytes).ctx("write", &tmp)?;
            writers.push((w, d.clone(), n));
        }
        crate::content::commit_all(writers)?;
        self.meta.write(|tx| {
            for ((bytes, media_type), d) in items.iter().zip(&digests) {
                self.meta
                    .add_blob_tx(tx, d, bytes.len() as u64, *media_type)?;
            }
            Ok(())
        })?;
        Ok(digests)
    }

    /// One blob in memory (see [`Store::put_bytes_all`]): a blob already
    /// stored is only recorded.
    pub fn put_bytes(&self, bytes: &[u8], media_type: Option<&str>) -> Result<Digest> {
        self.put_bytes_all(&[(bytes, media_type)])?
            .pop()
            .ok_or_else(|| Error::InvalidState("no digest for a stored blob".to_string()))
    }

    /// Record an image without a name (a build without tags, an archive
    /// image without one): it is kept under [`untagged_name`] until it is
    /// named or pruned, as docker keeps a "dangling" image. A no-op when
    /// the image already has a name.
    pub fn record_untagged(
        &self,
        manifest: &Digest,
        config: &Digest,
        layers: &[Digest],
    ) -> Result<()> {
        let named: bool = self.meta.read(|tx| {
            Ok(tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM images WHERE manifest = ?1 AND name NOT LIKE 'sha256:%')",
                [manifest.to_string()],
                |r| r.get(0),
            )?)
        })?;
        if named {
            return Ok(());
        }
        self.record_image(&untagged_name(config), manifest, config, layers)
    }

    /// Whether `name` may point at the stored manifest or index `target`:
    /// a name without a digest may point anywhere; one pinned to a digest
    /// (`repo@sha256:…`) only at that digest's manifest or index, or at a
    /// manifest that index (stored) lists — a pull by an index's digest
    /// names the platform's manifest so. A loaded archive or a `kiln tag`
    /// naming another image `alpine@sha256:<alpine's digest>` would make
    /// every `FROM` pinned to that digest use it.
    pub fn pin_holds(&self, name: &str, target: &Digest) -> bool {
        let Some((_, pin)) = name.rsplit_once('@') else {
            return true;
        };
        if pin == target.as_str() {
            return true;
        }
        #[derive(serde::Deserialize)]
        struct Child {
            digest: String,
        }
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<Child>,
        }
        let Ok(pd) = pin.parse::<Digest>() else {
            return false;
        };
        self.content.read(&pd).is_ok_and(|bytes| {
            serde_json::from_slice::<Index>(&bytes)
                .is_ok_and(|i| i.manifests.iter().any(|c| c.digest == target.as_str()))
        })
    }

    fn check_pin(&self, name: &str, target: &Digest) -> Result<()> {
        if self.pin_holds(name, target) {
            return Ok(());
        }
        Err(Error::InvalidReference {
            reference: name.to_string(),
            reason: "a name pinned to a digest names that digest's image only",
        })
    }

    /// Record an image: the manifest references `config` and `layers` (all
    /// already stored with [`Store::put_blob`]) and `name` (normalised, see
    /// [`crate::normalize_reference`]) points at it. One transaction. A
    /// name pinned to a digest must be that image's (see
    /// [`Store::pin_holds`]).
    pub fn record_image(
        &self,
        name: &str,
        manifest: &Digest,
        config: &Digest,
        layers: &[Digest],
    ) -> Result<()> {
        self.check_pin(name, manifest)?;
        self.meta.write(|tx| {
            for child in std::iter::once(config).chain(layers) {
                tx.execute(
                    "INSERT OR IGNORE INTO blob_refs(parent, child) VALUES (?1, ?2)",
                    [manifest.to_string(), child.to_string()],
                )?;
            }
            // What the name pointed at before, if something else.
            let before: Option<(String, Option<String>)> = tx
                .query_row(
                    "SELECT manifest, config FROM images WHERE name = ?1 AND manifest != ?2",
                    [name, &manifest.to_string()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            tx.execute(
                "INSERT INTO images(name, manifest, config, created) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET manifest = excluded.manifest,
                   config = excluded.config, created = excluded.created",
                rusqlite::params![
                    name,
                    manifest.to_string(),
                    config.to_string(),
                    crate::util::now_unix()
                ],
            )?;
            // An image whose last name moved to another stays, untagged,
            // as docker's `<none>` images do (until pruned).
            if let (Some((old_manifest, Some(old_config))), false) =
                (before, is_untagged_name(name))
            {
                let named_still: bool = tx.query_row(
                    "SELECT EXISTS(SELECT 1 FROM images WHERE manifest = ?1)",
                    [&old_manifest],
                    |r| r.get(0),
                )?;
                if !named_still {
                    tx.execute(
                        "INSERT OR IGNORE INTO images(name, manifest, config, created)
                         VALUES (?1, ?2, ?3, ?4)",
                        rusqlite::params![
                            &old_config,
                            old_manifest,
                            old_config,
                            crate::util::now_unix()
                        ],
                    )?;
                }
            }
            // A named image is no longer untagged.
            if !is_untagged_name(name) {
                tx.execute(
                    "DELETE FROM images WHERE name = ?1 AND manifest = ?2",
                    [untagged_name(config), manifest.to_string()],
                )?;
            }
            Ok(())
        })
    }

    /// Record an index (an image for several platforms): each child
    /// manifest references its config and layers (all already stored),
    /// the index references the child manifests, and `name` points at
    /// the index (with no config of its own). One transaction.
    pub fn record_index(
        &self,
        name: &str,
        index: &Digest,
        children: &[(Digest, Digest, Vec<Digest>)],
    ) -> Result<()> {
        self.check_pin(name, index)?;
        self.meta.write(|tx| {
            for (manifest, config, layers) in children {
                tx.execute(
                    "INSERT OR IGNORE INTO blob_refs(parent, child) VALUES (?1, ?2)",
                    [index.to_string(), manifest.to_string()],
                )?;
                for child in std::iter::once(config).chain(layers) {
                    tx.execute(
                        "INSERT OR IGNORE INTO blob_refs(parent, child) VALUES (?1, ?2)",
                        [manifest.to_string(), child.to_string()],
                    )?;
                }
            }
            tx.execute(
                "INSERT INTO images(name, manifest, config, created) VALUES (?1, ?2, NULL, ?3)
                 ON CONFLICT(name) DO UPDATE SET manifest = excluded.manifest,
                   config = NULL, created = excluded.created",
                rusqlite::params![name, index.to_string(), crate::util::now_unix()],
            )?;
            Ok(())
        })
    }

    /// Start a lease: until it (and every handle made
    /// [`Store::with_lease`] it) drops, or this process dies, or `ttl`
    /// passes, what is written through such handles is kept by GC. Writes
    /// join a lease only through a handle holding it: there is no ambient
    /// "current lease", so concurrent operations on one store keep apart.
    pub fn lease(&self, ttl: Option<Duration>) -> Result<Lease> {
        self.meta.new_lease(ttl)
    }
}

/// Who uses the store's `tmp`: every process that opened the store holds
/// a shared lock on `tmp.lock` for as long as it lives (its contexts,
/// exports, mount scratch and executor state are there, in files of no
/// lease); prune empties `tmp` only when it can take that lock
/// exclusively — no other kiln is alive on the store — and else only of
/// entries a day old. (Prune deleted a running build's stdin context: the
/// build then copied nothing, tagged its image and exited 0.)
pub(crate) mod tmp_users {
    use std::collections::HashMap;
    use std::fs::File;
    use std::os::unix::io::AsRawFd;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use crate::error::{io_err, Result};

    static HELD: Mutex<Option<HashMap<PathBuf, File>>> = Mutex::new(None);

    fn lock_file(root: &Path) -> Result<File> {
        let p = root.join("tmp.lock");
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(|e| io_err("open", &p, e))
    }

    fn flock(f: &File, op: libc::c_int) -> bool {
        loop {
            // SAFETY: an open descriptor.
            if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
                return true;
            }
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return false;
            }
        }
    }

    /// This process uses `root`'s tmp (once per process and root).
    pub(crate) fn join(root: &Path) -> Result<()> {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        let map = held.get_or_insert_with(HashMap::new);
        if map.contains_key(root) {
            return Ok(());
        }
        let f = lock_file(root)?;
        // Waits only while a prune empties tmp.
        if !flock(&f, libc::LOCK_SH) {
            return Err(io_err(
                "flock",
                root.join("tmp.lock"),
                std::io::Error::last_os_error(),
            ));
        }
        map.insert(root.to_path_buf(), f);
        Ok(())
    }

    static MINE: Mutex<Option<HashMap<PathBuf, File>>> = Mutex::new(None);

    /// The lock file that says a process of the store lives:
    /// `procs/PID-START` as that process sees its own id (a pid means
    /// nothing in another pid namespace, a file lock does).
    fn proc_file(root: &Path, pid: i64, start: i64) -> PathBuf {
        root.join("procs").join(format!("{pid}-{start}"))
    }

    /// This process holds its `procs/` lock for its life (once per root).
    pub(crate) fn alive_here(root: &Path) -> Result<()> {
        let mut mine = MINE.lock().unwrap_or_else(|e| e.into_inner());
        let map = mine.get_or_insert_with(HashMap::new);
        if map.contains_key(root) {
            return Ok(());
        }
        let dir = root.join("procs");
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| io_err("mkdir", &dir, e))?;
        let me = crate::util::ProcessId::current();
        let p = proc_file(root, me.pid, me.start);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(|e| io_err("open", &p, e))?;
        if !flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            return Err(io_err("flock", &p, std::io::Error::last_os_error()));
        }
        map.insert(root.to_path_buf(), f);
        // Every run of kiln leaves its file; past a few, the dead go.
        if std::fs::read_dir(&dir).is_ok_and(|rd| rd.count() > 32) {
            sweep(root);
        }
        Ok(())
    }

    /// Removes the `procs/` files of processes gone.
    pub(crate) fn sweep(root: &Path) {
        let Ok(rd) = std::fs::read_dir(root.join("procs")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some((pid, start)) = name
                .to_str()
                .and_then(|n| n.split_once('-'))
                .and_then(|(p, s)| Some((p.parse().ok()?, s.parse().ok()?)))
            else {
                continue;
            };
            let _ = lives(root, pid, start);
        }
    }

    /// Whether the process `pid`/`start` (as it saw itself) still runs:
    /// its `procs/` lock is held. `None`: it left no lock file (a kiln of
    /// before, or long gone and swept).
    pub(crate) fn lives(root: &Path, pid: i64, start: i64) -> Option<bool> {
        let p = proc_file(root, pid, start);
        let f = std::fs::OpenOptions::new().read(true).open(&p).ok()?;
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            // Nobody holds it: gone; the file goes too.
            let _ = std::fs::remove_file(&p);
            return Some(false);
        }
        Some(true)
    }

    /// Whether this process is the only one using `root`'s tmp; while the
    /// returned guard lives, no other can start using it.
    pub(crate) fn alone(root: &Path) -> Option<Alone> {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        let mine = held.as_mut().and_then(|m| m.remove(root));
        let f = mine.or_else(|| lock_file(root).ok())?;
        if flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            return Some(Alone {
                root: root.to_path_buf(),
                file: Some(f),
            });
        }
        // Others are there: this process keeps its shared hold.
        let _ = flock(&f, libc::LOCK_SH);
        held.get_or_insert_with(HashMap::new)
            .insert(root.to_path_buf(), f);
        None
    }

    /// An exclusive hold of a store's tmp (see [`alone`]).
    pub(crate) struct Alone {
        root: PathBuf,
        file: Option<File>,
    }

    impl Drop for Alone {
        fn drop(&mut self) {
            if let Some(f) = self.file.take() {
                let _ = flock(&f, libc::LOCK_SH);
                let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
                held.get_or_insert_with(HashMap::new)
                    .insert(self.root.clone(), f);
            }
        }
    }
}

/// Refuses a store root another user owns (root opening a rootless
/// user's store: that user controls every file and record in it, and
/// root's files would be left in it), and makes this user's 0700 when it
/// lets others in.
fn private_root(root: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::metadata(root).ctx("stat", root)?;
    // SAFETY: geteuid has no failure mode.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(Error::ForeignStore {
            path: root.to_path_buf(),
            owner: m.uid(),
            me,
        });
    }
    // A store, or a directory with nothing else in it yet (a file
    // system's lost+found, what an interrupted first open made): never
    // another directory of this user's (root given `--root` through a
    // symlink a user planted to `/etc` made it 0700 and filled it).
    if !root.join("meta.db").exists() {
        const OURS: [&str; 10] = [
            "lost+found",
            "tmp.lock",
            "procs",
            "blobs",
            "snapshots",
            "l",
            "tmp",
            "gc.lock",
            "meta.db-wal",
            "meta.db-shm",
        ];
        let others = std::fs::read_dir(root)
            .ctx("read", root)?
            .filter_map(|e| e.ok())
            .any(|e| !OURS.iter().any(|o| e.file_name() == *o));
        if others {
            return Err(Error::NotAStore {
                path: root.to_path_buf(),
            });
        }
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .ctx("chmod", root)?;
    }
    Ok(())
}

/// The database and its WAL files readable by their owner only (SQLite
/// creates them 0644 under the usual umask). Best effort: the root's
/// mode already keeps others out.
fn private_db(db: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        if let Ok(m) = std::fs::metadata(&p) {
            if m.mode() & 0o077 != 0 {
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
            }
        }
    }
}

/// A tenth of the size of the filesystem holding `path` (0 if unknown).
#[allow(clippy::unnecessary_cast)] // the statvfs types differ by target
fn fs_tenth(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| (s.blocks() as u64).saturating_mul(s.fragment_size() as u64) / 10)
        .unwrap_or(0)
}

/// Retired snapshot directories under `tmp`: (unix time, bytes, path),
/// oldest first.
fn retired_dirs(tmp: &Path) -> Result<Vec<(u64, u64, PathBuf)>> {
    let mut retired = Vec::new();
    for entry in std::fs::read_dir(tmp).ctx("read dir", tmp)? {
        let entry = entry.ctx("read dir", tmp)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(crate::snapshot::RETIRED_PREFIX) else {
            continue;
        };
        let mut parts = rest.splitn(3, '-');
        let (Some(Ok(when)), Some(Ok(size))) = (
            parts.next().map(str::parse::<u64>),
            parts.next().map(str::parse::<u64>),
        ) else {
            continue;
        };
        retired.push((when, size, entry.path()));
    }
    retired.sort();
    Ok(retired)
}

/// Whether the retired snapshot directories of the store at `root` take
/// more than a tenth of its filesystem: a check that needs no open store
/// (a directory listing), so that a build only opens the store again to
/// sweep when there is something to sweep.
pub fn retired_over_budget(root: &Path) -> bool {
    let total: u64 = retired_dirs(&root.join("tmp"))
        .map(|v| v.iter().map(|r| r.1).sum())
        .unwrap_or(0);
    total > 0 && total > fs_tenth(root)
}

/// How a layer blob without a file is written again (the `source` column
/// of its row).
#[derive(serde::Serialize, serde::Deserialize)]
struct LayerSource {
    snapshot: String,
    opts: kiln_image::diff::DiffOptions,
}

/// What the writing thread reports: the digest and length of what it
/// wrote, or why it stopped.
type WriteOutcome = std::result::Result<(Digest, u64), String>;

/// A layer written again from its snapshot, verified at the end.
struct SourceReader {
    inner: crate::chunkpipe::ChunkReader,
    want: Digest,
    size: u64,
    outcome: Arc<std::sync::Mutex<Option<WriteOutcome>>>,
    checked: bool,
    failed: Option<std::io::Error>,
    _gc: GcGuard,
}

impl Read for SourceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(e) = &self.failed {
            // A failed check fails every later read too: a caller that
            // reads on never sees a clean end of an unverified stream.
            return Err(std::io::Error::new(e.kind(), e.to_string()));
        }
        let n = self.inner.read(buf)?;
        if n > 0 || buf.is_empty() || self.checked {
            return Ok(n);
        }
        self.checked = true;
        let verdict = self.verdict();
        if let Err(e) = &verdict {
            self.failed = Some(std::io::Error::new(e.kind(), e.to_string()));
        }
        verdict
    }
}

impl SourceReader {
    /// Ok(0) when the writer's digest and size match, else the error.
    fn verdict(&mut self) -> std::io::Result<usize> {
        let outcome = self.outcome.lock().ok().and_then(|mut o| o.take());
        match outcome {
            Some(Ok((got, len))) if got.as_str() == self.want.as_str() && len == self.size => Ok(0),
            Some(Ok((got, len))) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "layer {} written again from its snapshot has digest {got} and {len} bytes \
                     ({} expected): the snapshot changed",
                    self.want, self.size
                ),
            )),
            Some(Err(e)) => Err(std::io::Error::other(format!(
                "writing layer {} from its snapshot: {e}",
                self.want
            ))),
            None => Err(std::io::Error::other(format!(
                "writing layer {} from its snapshot stopped without a result",
                self.want
            ))),
        }
    }
}

/// The shared GC lock (see [`Store::gc_guard`]).
#[derive(Debug)]
pub struct GcGuard(#[allow(dead_code)] FileLock);

fn make_snapshotter(
    overlay: bool,
    meta: &Arc<Meta>,
    paths: &Paths,
    chains: &crate::snapshot::Chains,
) -> Box<dyn Snapshotter> {
    if overlay {
        Box::new(OverlaySnapshotter::new(
            meta.clone(),
            paths.clone(),
            chains.clone(),
        ))
    } else {
        Box::new(NativeSnapshotter::new(
            meta.clone(),
            paths.clone(),
            chains.clone(),
        ))
    }
}

/// The name of the image row that keeps an untagged image: its ID (the
/// config digest, `sha256:…`), which no normalised reference can be.
pub fn untagged_name(config: &Digest) -> String {
    config.to_string()
}

/// Whether an image row's name is an untagged image's ID (see
/// [`untagged_name`]) rather than a reference.
pub fn is_untagged_name(name: &str) -> bool {
    name.starts_with("sha256:")
}
