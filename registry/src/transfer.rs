//! Whole-image transfers on top of [`Registry`]: pull (resolve, pick the
//! platform, config, layers concurrently into a [`BlobSink`]) and push
//! (blobs concurrently from a [`PushSource`], then the manifest).

use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use kiln_image::manifest::{Descriptor, ImageManifest, Platform, RawManifest};
use kiln_image::Digest;

use crate::client::{PushOutcome, Registry};
use crate::error::{RegistryError, Result};
use crate::reference::Reference;

/// Why a [`BlobSink`] could not store a blob: the sink's own error,
/// kept as the source.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct SinkError(Box<dyn std::error::Error + Send + Sync>);

impl SinkError {
    /// Wraps the sink's error.
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> SinkError {
        SinkError(e.into())
    }
}

impl From<String> for SinkError {
    fn from(s: String) -> SinkError {
        SinkError(s.into())
    }
}

/// Where pulled blobs go (the local store, in kiln). The sink must verify
/// what it stores against `desc` (size and digest); the reader it gets
/// also fails at EOF on a mismatch.
pub trait BlobSink: Sync {
    /// Whether the blob is already there (then it is not downloaded).
    fn has_blob(&self, desc: &Descriptor) -> bool;
    /// Store the blob read from `r`.
    fn put_blob(&self, desc: &Descriptor, r: &mut dyn Read) -> std::result::Result<(), SinkError>;
    /// Store the blob read from `r`, a reader that itself fails at EOF
    /// unless what it gave has `desc`'s digest and size (a download from a
    /// registry is such a reader), so the sink need not hash the bytes a
    /// second time. By default the same as [`BlobSink::put_blob`].
    fn put_verified_blob(
        &self,
        desc: &Descriptor,
        r: &mut dyn Read,
    ) -> std::result::Result<(), SinkError> {
        self.put_blob(desc, r)
    }
}

/// Where pushed blobs come from.
pub trait PushSource: Sync {
    /// A reader over the blob's bytes (called again on retries).
    fn open(&self, desc: &Descriptor) -> io::Result<Box<dyn Read + '_>>;
    /// A repository of the same registry known to hold the blob (for a
    /// cross-repository mount), if any.
    fn mount_from(&self, _desc: &Descriptor) -> Option<String> {
        None
    }
}

/// What one blob transfer did, for progress lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// Starting (digest, size).
    Started(Digest, u64),
    /// Bytes moved so far for a digest.
    Bytes(Digest, u64),
    /// Already present at the destination.
    Skipped(Digest),
    /// Mounted from another repository.
    Mounted(Digest),
    /// Done (digest, size).
    Done(Digest, u64),
}

/// A resolved image: the platform's manifest (and the index it came from).
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The index or manifest list the tag pointed at, if any.
    pub index: Option<RawManifest>,
    /// The image manifest for the platform.
    pub manifest: RawManifest,
}

/// A pulled image.
#[derive(Clone, Debug)]
pub struct Pulled {
    /// The resolution.
    pub resolved: Resolved,
    /// The parsed manifest.
    pub manifest: ImageManifest,
    /// The config bytes (verified).
    pub config: Vec<u8>,
}

fn platform_str(p: &Platform) -> String {
    match &p.variant {
        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
        None => format!("{}/{}", p.os, p.architecture),
    }
}

impl Registry {
    /// Resolve `r` to an image manifest for `platform` (through an index
    /// or manifest list when the tag points at one).
    pub fn resolve(&self, r: &Reference, platform: &Platform) -> Result<Resolved> {
        let first = self.get_manifest(&r.repository, &r.manifest_ref())?;
        if !first.is_index() {
            return Ok(Resolved {
                index: None,
                manifest: first,
            });
        }
        let idx = first.index()?;
        if idx.manifests.len() > kiln_image::platform::MAX_INDEX_ENTRIES {
            return Err(RegistryError::Protocol {
                registry: self.name().to_string(),
                detail: format!(
                    "{r}: index {} has {} entries; kiln reads at most {}",
                    first.digest,
                    idx.manifests.len(),
                    kiln_image::platform::MAX_INDEX_ENTRIES
                ),
            });
        }
        let d = idx
            .select(platform)
            .ok_or_else(|| RegistryError::NoPlatform {
                registry: self.name().to_string(),
                reference: r.to_string(),
                platform: platform_str(platform),
            })?;
        let m = self.get_manifest(&r.repository, d.digest.as_str())?;
        if m.bytes.len() as u64 != d.size {
            return Err(RegistryError::Protocol {
                registry: self.name().to_string(),
                detail: format!(
                    "{r}: index entry {} says {} bytes, the manifest has {}",
                    d.digest,
                    d.size,
                    m.bytes.len()
                ),
            });
        }
        if m.is_index() {
            return Err(RegistryError::Protocol {
                registry: self.name().to_string(),
                detail: format!("{r}: index entry {} is itself an index", d.digest),
            });
        }
        Ok(Resolved {
            index: Some(first),
            manifest: m,
        })
    }

    /// Pull one blob into `sink` (skipped if the sink has it), retrying.
    pub fn pull_blob(
        &self,
        repo: &str,
        desc: &Descriptor,
        sink: &dyn BlobSink,
        progress: &(dyn Fn(Transfer) + Sync),
    ) -> Result<()> {
        if sink.has_blob(desc) {
            progress(Transfer::Skipped(desc.digest.clone()));
            return Ok(());
        }
        progress(Transfer::Started(desc.digest.clone(), desc.size));
        self.retry(|| {
            let r = self.cancellable(Box::new(self.open_blob(repo, desc)?));
            let mut counting = Progressing {
                inner: r,
                n: 0,
                digest: &desc.digest,
                progress,
            };
            sink.put_verified_blob(desc, &mut counting).map_err(|e| {
                // A broken stream is worth a retry; a digest mismatch or
                // a local failure is not.
                let e = e.to_string();
                if e.contains("digest mismatch")
                    || e.contains("size mismatch")
                    || counting.n == 0 && !e.contains("network")
                {
                    RegistryError::Local(format!("{}: {e}", desc.digest))
                } else {
                    RegistryError::Network {
                        registry: self.name().to_string(),
                        detail: format!("downloading {}: {e}", desc.digest),
                    }
                }
            })
        })?;
        progress(Transfer::Done(desc.digest.clone(), desc.size));
        Ok(())
    }

    /// Pull `r` for `platform`: manifest (through an index), config, then
    /// every layer into `sink`, up to `jobs` at once. Blobs the sink has
    /// are skipped. The config is returned, not given to the sink.
    pub fn pull_image(
        &self,
        r: &Reference,
        platform: &Platform,
        sink: &dyn BlobSink,
        jobs: usize,
        progress: &(dyn Fn(Transfer) + Sync),
    ) -> Result<Pulled> {
        let resolved = self.resolve(r, platform)?;
        let manifest = resolved.manifest.manifest()?;
        // One config limit for pull, load and build.
        kiln_image::config::check_config_size(manifest.config.size)?;
        let config = self.get_blob_bytes(&r.repository, &manifest.config)?;
        self.for_each_parallel(&manifest.layers, jobs, |d| {
            self.pull_blob(&r.repository, d, sink, progress)
        })?;
        Ok(Pulled {
            resolved,
            manifest,
            config,
        })
    }

    /// Push `manifest` (an image manifest) and every blob it names to
    /// `target` (tagged `target.tag`, else by digest), blobs up to `jobs`
    /// at once. The config and layers come from `source`.
    pub fn push_image(
        &self,
        target: &Reference,
        manifest: &RawManifest,
        source: &dyn PushSource,
        jobs: usize,
        progress: &(dyn Fn(Transfer) + Sync),
    ) -> Result<Digest> {
        let m = manifest.manifest()?;
        let mut blobs = m.layers.clone();
        blobs.push(m.config.clone());
        self.push_blobs(&target.repository, &blobs, source, jobs, progress)?;
        let reference = target
            .tag
            .clone()
            .unwrap_or_else(|| manifest.digest.to_string());
        self.put_manifest(&target.repository, &reference, manifest)
    }

    /// Push blobs concurrently (HEAD check, mount, upload each).
    pub fn push_blobs(
        &self,
        repo: &str,
        blobs: &[Descriptor],
        source: &dyn PushSource,
        jobs: usize,
        progress: &(dyn Fn(Transfer) + Sync),
    ) -> Result<()> {
        self.for_each_parallel(blobs, jobs, |d| {
            let moved = AtomicUsize::new(0);
            let digest = d.digest.clone();
            let count = |n: u64| {
                let total = moved.fetch_add(n as usize, Ordering::Relaxed) as u64 + n;
                progress(Transfer::Bytes(digest.clone(), total));
            };
            let from = source.mount_from(d);
            let open = || source.open(d);
            progress(Transfer::Started(d.digest.clone(), d.size));
            match self.push_blob(repo, d, from.as_deref(), &open, &count)? {
                PushOutcome::Exists => progress(Transfer::Skipped(d.digest.clone())),
                PushOutcome::Mounted => progress(Transfer::Mounted(d.digest.clone())),
                PushOutcome::Uploaded => progress(Transfer::Done(d.digest.clone(), d.size)),
            }
            Ok(())
        })
    }

    /// Run `f` on each item with up to `jobs` threads; first error wins.
    fn for_each_parallel<T: Sync>(
        &self,
        items: &[T],
        jobs: usize,
        f: impl Fn(&T) -> Result<()> + Sync,
    ) -> Result<()> {
        let next = AtomicUsize::new(0);
        let first_err: Mutex<Option<RegistryError>> = Mutex::new(None);
        let failed = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..jobs.clamp(1, items.len().max(1)) {
                s.spawn(|| loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { return };
                    if let Err(e) = self.check_cancel().and_then(|()| f(item)) {
                        failed.store(true, Ordering::Relaxed);
                        if let Ok(mut g) = first_err.lock() {
                            g.get_or_insert(e);
                        }
                        return;
                    }
                });
            }
        });
        match first_err.into_inner() {
            Ok(Some(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

struct Progressing<'a, R> {
    inner: R,
    n: u64,
    digest: &'a Digest,
    progress: &'a (dyn Fn(Transfer) + Sync),
}

impl<R: Read> Read for Progressing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        if n > 0 {
            (self.progress)(Transfer::Bytes(self.digest.clone(), self.n));
        }
        Ok(n)
    }
}
