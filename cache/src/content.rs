//! The content store: blobs by digest under `blobs/sha256/<hex>`.
//!
//! Every blob is written to a temp file under `tmp/`, fsynced, verified
//! against the expected digest and size, then renamed into place and the
//! directory fsynced. A reader therefore sees either no blob or the whole,
//! verified blob; a crash leaves at most a temp file, which `prune` reclaims.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::digest::{Digest, Hasher};
use crate::error::{io_err, Error, IoContext, Result};
use crate::util::{fsync_dir, random_hex, FileLock};

/// Blobs on disk, addressed by digest. Files only: which blobs are wanted is
/// the metadata database's business (see [`crate::Store`]).
#[derive(Debug, Clone)]
pub struct ContentStore {
    dir: PathBuf,
    tmp: PathBuf,
    gc_lock: Option<PathBuf>,
}

impl ContentStore {
    /// A content store over `blobs_dir` (`<root>/blobs/sha256`) writing its
    /// temp files in `tmp_dir` (same filesystem).
    pub fn new(blobs_dir: impl Into<PathBuf>, tmp_dir: impl Into<PathBuf>) -> Self {
        ContentStore {
            dir: blobs_dir.into(),
            tmp: tmp_dir.into(),
            gc_lock: None,
        }
    }

    /// Writers hold this lock file shared while they live, so that a
    /// concurrent prune (which takes it exclusively) never reclaims their
    /// temp files.
    pub(crate) fn with_gc_lock(mut self, path: PathBuf) -> Self {
        self.gc_lock = Some(path);
        self
    }

    /// Where the blob `digest` lives (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn has(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// The size of a present blob.
    pub fn size(&self, digest: &Digest) -> Result<u64> {
        let p = self.path(digest);
        match std::fs::metadata(&p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NotFound {
                kind: "blob",
                name: digest.to_string(),
            }),
            Err(e) => Err(io_err("stat", p, e)),
        }
    }

    /// Open a blob for reading.
    pub fn open(&self, digest: &Digest) -> Result<File> {
        let p = self.path(digest);
        match File::open(&p) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::NotFound {
                kind: "blob",
                name: digest.to_string(),
            }),
            Err(e) => Err(io_err("open", p, e)),
        }
    }

    /// Read a whole (small) blob, e.g. a manifest or config.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let p = self.path(digest);
        self.open(digest)?.read_to_end(&mut buf).ctx("read", p)?;
        Ok(buf)
    }

    /// Start writing a new blob. The writer holds the store's GC lock
    /// shared until it is dropped; record the blob with
    /// [`crate::Store::commit_blob`] so that no prune can fall between the
    /// rename and the row.
    pub fn writer(&self) -> Result<BlobWriter> {
        self.new_writer(true)
    }

    /// A writer for a caller that hashes the same bytes itself (one pass
    /// instead of two over a large compressed layer): it does not hash,
    /// and [`BlobWriter::commit`] must be given the digest and size, which
    /// it takes as they are.
    pub fn writer_prehashed(&self) -> Result<BlobWriter> {
        self.new_writer(false)
    }

    fn new_writer(&self, hashing: bool) -> Result<BlobWriter> {
        let gc = match &self.gc_lock {
            Some(p) => Some(FileLock::shared(p)?),
            None => None,
        };
        let path = self.tmp.join(format!("blob-{}", random_hex::<12>()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .ctx("create", &path)?;
        Ok(BlobWriter {
            _gc: gc,
            file: Some(file),
            tmp_path: path,
            dir: self.dir.clone(),
            hasher: hashing.then(Hasher::new),
            written: 0,
        })
    }

    /// Stream `reader` into a blob; if `expected` is given, the result must
    /// match that digest (and size, when given) or nothing is stored.
    pub fn ingest(
        &self,
        mut reader: impl Read,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<(Digest, u64)> {
        if let Some(d) = expected {
            if let Ok(size) = self.size(d) {
                if expected_size.is_none_or(|s| s == size) {
                    return Ok((d.clone(), size));
                }
            }
        }
        let mut w = self.writer()?;
        let tmp = w.tmp_path.clone();
        match expected_size {
            // One byte past the size is enough to know the stream is too
            // long (the commit refuses it): a source that does not end (a
            // device, an endless download) does not fill the disk.
            Some(s) => io::copy(&mut (&mut reader).take(s.saturating_add(1)), &mut w),
            None => io::copy(&mut reader, &mut w),
        }
        .map_err(|e| io_err("write", tmp, e))?;
        w.commit(expected, expected_size)
    }

    /// Store `bytes` (a manifest, a config).
    pub fn write_bytes(&self, bytes: &[u8], expected: Option<&Digest>) -> Result<Digest> {
        let (d, _) = self.ingest(bytes, expected, Some(bytes.len() as u64))?;
        Ok(d)
    }

    /// Moves the blob file aside (to `tmp_dir`, where prune reclaims it)
    /// if it is still the file `opened` — found not to match its digest —
    /// so that a later load or pull stores a good copy under the name.
    /// Returns whether it was moved.
    pub(crate) fn move_aside(&self, digest: &Digest, opened: &File, tmp_dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let p = self.path(digest);
        let same = match (opened.metadata(), std::fs::symlink_metadata(&p)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if !same {
            return false;
        }
        let to = tmp_dir.join(format!("corrupt-{}-{}", digest.hex(), random_hex::<4>()));
        std::fs::rename(&p, &to).is_ok() && fsync_dir(&self.dir).is_ok()
    }

    /// Puts the file `path` (on the store's filesystem, written and hashed
    /// by the caller: its content is `digest`, `size` bytes) in place as
    /// that blob without copying it: hard-linked under a temp name, made
    /// private, fsynced and renamed over whatever file had the name — so
    /// a blob that was corrupt in the store is replaced by this good one.
    pub fn adopt_file(&self, path: &Path, digest: &Digest, size: u64) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let _gc = match &self.gc_lock {
            Some(p) => Some(FileLock::shared(p)?),
            None => None,
        };
        let meta = std::fs::symlink_metadata(path).ctx("stat", path)?;
        if !meta.is_file() || meta.len() != size {
            return Err(Error::DigestMismatch {
                expected: format!("{digest} ({size} bytes)"),
                actual: format!("{} bytes at {}", meta.len(), path.display()),
            });
        }
        let tmp = self.tmp.join(format!("blob-{}", random_hex::<12>()));
        std::fs::hard_link(path, &tmp).ctx("link", &tmp)?;
        let done = (|| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .ctx("chmod", &tmp)?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .ctx("fsync", &tmp)?;
            let target = self.path(digest);
            std::fs::rename(&tmp, &target).ctx("rename", &target)?;
            fsync_dir(&self.dir)
        })();
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    }

    /// Remove a blob (GC only).
    pub(crate) fn delete(&self, digest: &Digest) -> Result<()> {
        let p = self.path(digest);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", p, e)),
        }
    }

    /// Every blob file present, with its size. Files whose names are not
    /// digests are reported in the second list.
    pub fn list(&self) -> Result<BlobListing> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for entry in std::fs::read_dir(&self.dir).ctx("read dir", &self.dir)? {
            let entry = entry.ctx("read dir", &self.dir)?;
            let name = entry.file_name();
            let parsed = name
                .to_str()
                .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok());
            match parsed {
                Some(d) => {
                    let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    good.push((d, len));
                }
                None => bad.push(entry.path()),
            }
        }
        good.sort();
        Ok((good, bad))
    }

    /// Re-hash a blob; returns its size if it matches its name.
    pub fn verify(&self, digest: &Digest) -> Result<u64> {
        let p = self.path(digest);
        let mut f = self.open(digest)?;
        let mut h = Hasher::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).ctx("read", &p)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let size = h.len();
        let actual = h.finish();
        if &actual != digest {
            return Err(Error::DigestMismatch {
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(size)
    }
}

/// Blob files present (digest, size), and paths in the blob directory
/// whose names are not digests.
pub type BlobListing = (Vec<(Digest, u64)>, Vec<PathBuf>);

/// A blob being written. Hashes as it goes; [`commit`](Self::commit) makes
/// it visible, dropping it without commit removes the temp file.
#[derive(Debug)]
pub struct BlobWriter {
    _gc: Option<FileLock>,
    file: Option<File>,
    tmp_path: PathBuf,
    dir: PathBuf,
    /// `None` for a [`ContentStore::writer_prehashed`] writer.
    hasher: Option<Hasher>,
    written: u64,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The temp file's path (for error messages).
    pub fn temp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// fsync, verify against `expected` (digest and size when given), rename
    /// into place and fsync the directory. On any mismatch or error the temp
    /// file is removed and nothing becomes visible.
    pub fn commit(
        mut self,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<(Digest, u64)> {
        let file = self
            .file
            .take()
            .ok_or_else(|| Error::InvalidState("blob writer already committed".to_string()))?;
        let size = self.written;
        let digest = match (self.hasher.take(), expected) {
            (Some(h), _) => h.finish(),
            (None, Some(d)) if expected_size.is_some() => d.clone(),
            (None, _) => {
                return Err(Error::InvalidState(
                    "a prehashed blob needs its digest and size to commit".to_string(),
                ))
            }
        };
        if expected.is_some_and(|e| e != &digest) || expected_size.is_some_and(|s| s != size) {
            return Err(Error::DigestMismatch {
                expected: format!(
                    "{} ({} bytes)",
                    expected
                        .map(|d| d.to_string())
                        .unwrap_or_else(|| "any".into()),
                    expected_size
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "any".into())
                ),
                actual: format!("{digest} ({size} bytes)"),
            });
        }
        file.sync_all().ctx("fsync", &self.tmp_path)?;
        drop(file);
        let target = self.dir.join(digest.hex());
        // Same content under the same name: a concurrent writer's rename of
        // an identical file is harmless, whichever wins.
        std::fs::rename(&self.tmp_path, &target).ctx("rename", &target)?;
        fsync_dir(&self.dir)?;
        Ok((digest, size))
    }
}

/// Commits several prehashed writers of one store together (each with
/// its digest and size): the files are synced at the same time (a
/// journaling file system commits them together), renamed into place,
/// and the blob directory is synced once — two waits for the disk instead
/// of two per blob. Nothing becomes visible for a writer whose size is
/// not what was given; on any error the temp files not yet renamed are
/// removed.
pub(crate) fn commit_all(writers: Vec<(BlobWriter, Digest, u64)>) -> Result<()> {
    let Some(dir) = writers.first().map(|(w, _, _)| w.dir.clone()) else {
        return Ok(());
    };
    let mut ready = Vec::with_capacity(writers.len());
    for (mut w, digest, size) in writers {
        let file = w
            .file
            .take()
            .ok_or_else(|| Error::InvalidState("blob writer already committed".to_string()))?;
        if w.written != size || w.dir != dir {
            return Err(Error::DigestMismatch {
                expected: format!("{digest} ({size} bytes)"),
                actual: format!("{} bytes", w.written),
            });
        }
        ready.push((w, file, digest));
    }
    let synced: Vec<std::io::Result<()>> = if ready.len() == 1 {
        ready.iter().map(|(_, f, _)| f.sync_all()).collect()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = ready
                .iter()
                .map(|(_, f, _)| s.spawn(move || f.sync_all()))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("fsync thread panicked")))
                })
                .collect()
        })
    };
    for ((w, _, _), r) in ready.iter().zip(synced) {
        r.ctx("fsync", &w.tmp_path)?;
    }
    for (w, file, digest) in ready {
        drop(file);
        let target = dir.join(digest.hex());
        std::fs::rename(&w.tmp_path, &target).ctx("rename", &target)?;
    }
    fsync_dir(&dir)
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob writer already committed"))?;
        let n = f.write(buf)?;
        let before = self.written;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&buf[..n]);
        }
        self.written += n as u64;
        // Start writeback of every finished 8 MiB window now, so the
        // fsync at commit waits for little and large layers stream to
        // disk while they are produced.
        const WINDOW: u64 = 8 << 20;
        let after = self.written;
        if after / WINDOW > before / WINDOW {
            use std::os::fd::AsRawFd;
            let end = (after / WINDOW) * WINDOW;
            // SAFETY: a plain syscall on our own open descriptor; failure
            // only means no early writeback.
            unsafe {
                libc::sync_file_range(
                    f.as_raw_fd(),
                    (end - WINDOW) as libc::off64_t,
                    WINDOW as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() || self.tmp_path.exists() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}
