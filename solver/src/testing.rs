//! In-memory fakes of the solver's two seams, so a build can be solved
//! without root, namespaces or a store: [`MemBackend`] (the store:
//! snapshots are plain directories under one temporary root, the cache
//! index and images are maps) and [`FakeRunner`] (the executor: it records
//! each step and lets a closure play the step's effect on the writable
//! layer).
//!
//! A committed layer's diffID is computed by the same overlay differ the
//! store uses ([`kiln_image::diff::write_overlay_diff`]), so with
//! `SOURCE_DATE_EPOCH` pinned the keys a build records here are the keys
//! it records in a real store.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kiln_executor::{
    CancellationToken, ExecOutcome, ExecRequest, ExitStatus, OutputLine, RootfsKind, RootfsMount,
};
use kiln_image::config::ImageConfig;
use kiln_image::diff::DiffOptions;
use kiln_image::manifest::Platform;
use kiln_image::Digest;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::backend::{
    Active, Backend, BackendError, BackendResult, BaseImage, Exported, LayerRecord,
};
use crate::copy::{HashCache, NoHashCache};
use crate::solve::runner::{RunError, RunFuture, Runner};

#[derive(Debug, Clone)]
struct Snap {
    dir: PathBuf,
    parent: Option<String>,
}

#[derive(Default)]
struct MemState {
    snaps: HashMap<String, Snap>,
    cache: HashMap<String, LayerRecord>,
    /// By reference: one image per platform (the config's).
    images: HashMap<String, Vec<BaseImage>>,
    exported: Vec<(ImageConfig, Vec<LayerRecord>, Vec<String>)>,
    /// Indexes exported: (platform, manifest digest) children, tags.
    indexes: Vec<IndexRecord>,
    /// Every key committed or aliased, in order.
    committed: Vec<String>,
    /// Every key looked up, in order.
    lookups: Vec<String>,
    /// When set, every commit fails with the error it makes.
    fail_commit: Option<CommitFault>,
    /// When set, called as every commit starts (before the diff).
    on_commit: Option<Arc<dyn Fn() + Send + Sync>>,
}

type CommitFault = Arc<dyn Fn() -> BackendError + Send + Sync>;

/// An index a multi-platform build exported: its children (platform,
/// manifest digest) in order, and its tags.
pub type IndexRecord = (Vec<(String, String)>, Vec<String>);

/// An in-memory store: see the module doc.
pub struct MemBackend {
    root: tempfile::TempDir,
    next: AtomicUsize,
    state: Mutex<MemState>,
}

struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl MemBackend {
    /// An empty store under a new temporary directory.
    pub fn new() -> std::io::Result<Self> {
        Ok(MemBackend {
            root: tempfile::Builder::new()
                .prefix("kiln-memstore-")
                .tempdir()?,
            next: AtomicUsize::new(0),
            state: Mutex::new(MemState::default()),
        })
    }

    /// Makes every later commit fail with the error `fault` returns (as
    /// a store that ran out of space would), after dropping the snapshot.
    pub fn fail_commits_with(&self, fault: impl Fn() -> BackendError + Send + Sync + 'static) {
        self.lock().fail_commit = Some(Arc::new(fault));
    }

    /// Calls `hook` as every later commit starts, before its diff (e.g.
    /// to cancel the build while a layer is being committed).
    pub fn on_commit(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.lock().on_commit = Some(Arc::new(hook));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_dir(&self) -> BackendResult<(String, PathBuf)> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("snap-{n}");
        let dir = self.root.path().join(&name);
        std::fs::create_dir(&dir).map_err(BackendError::ctx("snapshot dir"))?;
        Ok((name, dir))
    }

    /// Adds an image whose one layer holds `files` (path, content), under
    /// `reference` (as the solver will ask for it, e.g.
    /// `docker.io/library/alpine:latest`). Images under one reference
    /// whose configs name different platforms are kept side by side, as
    /// an index's children are.
    pub fn add_image(
        &self,
        reference: &str,
        manifest_digest: &str,
        config: ImageConfig,
        files: &[(&str, &[u8])],
    ) -> BackendResult<()> {
        let (snap, dir) = self.new_dir()?;
        let root = kiln_fs::Root::open(&dir).map_err(BackendError::ctx("layer"))?;
        for (path, data) in files {
            root.write_file(
                path.trim_start_matches('/'),
                kiln_fs::Follow::InRoot,
                data,
                0o644,
                Some((0, 0)),
            )
            .map_err(BackendError::ctx("layer file"))?;
        }
        // Pinned mtimes: the base layer is the same whenever it is made.
        let opts = DiffOptions {
            clamp_mtime: Some(0),
            ..DiffOptions::default()
        };
        let diff_id = diff_of(&dir, &opts)?;
        let layer = LayerRecord {
            diff_id: diff_id.clone(),
            digest: diff_id,
            size: 0,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            snapshot: snap.clone(),
            created: 0,
        };
        let mut st = self.lock();
        st.snaps.insert(snap, Snap { dir, parent: None });
        let list = st.images.entry(reference.to_string()).or_default();
        let platform = config_platform(&config);
        list.retain(|i| !config_platform(&i.config).matches(&platform));
        list.push(BaseImage {
            reference: reference.to_string(),
            manifest_digest: manifest_digest.to_string(),
            config,
            layers: vec![layer],
        });
        Ok(())
    }

    /// Keys committed (or aliased) so far, in order.
    pub fn committed_keys(&self) -> Vec<String> {
        self.lock().committed.clone()
    }

    /// Keys looked up so far, in order.
    pub fn looked_up_keys(&self) -> Vec<String> {
        self.lock().lookups.clone()
    }

    /// The indexes exported so far (multi-platform builds).
    pub fn exported_indexes(&self) -> Vec<IndexRecord> {
        self.lock().indexes.clone()
    }

    /// The images exported so far: config, layers, tags.
    pub fn exported(&self) -> Vec<(ImageConfig, Vec<LayerRecord>, Vec<String>)> {
        self.lock().exported.clone()
    }

    /// How many writable snapshots are still open (prepared, not yet
    /// committed or aborted).
    pub fn active_snapshots(&self) -> usize {
        self.lock()
            .snaps
            .keys()
            .filter(|k| k.starts_with("active-"))
            .count()
    }

    /// The directory of a committed snapshot (its own files only).
    pub fn snapshot_dir(&self, snapshot: &str) -> Option<PathBuf> {
        self.lock().snaps.get(snapshot).map(|s| s.dir.clone())
    }
}

fn config_platform(c: &ImageConfig) -> Platform {
    Platform {
        os: c.os.clone(),
        architecture: c.architecture.clone(),
        variant: c.variant.clone(),
        ..Default::default()
    }
}

fn diff_of(dir: &Path, opts: &DiffOptions) -> BackendResult<Digest> {
    let mut w = HashWriter(Sha256::new());
    kiln_image::diff::write_overlay_diff(dir, &mut w, opts).map_err(BackendError::ctx("diff"))?;
    format!("sha256:{}", hex::encode(w.0.finalize()))
        .parse()
        .map_err(BackendError::ctx("digest"))
}

impl Backend for MemBackend {
    fn resolve_image(
        &self,
        reference: &str,
        platform: Option<&Platform>,
        _progress: &(dyn Fn(kiln_registry::Transfer) + Sync),
    ) -> BackendResult<Option<BaseImage>> {
        let name = kiln_cache::normalize_reference(reference)
            .map_err(BackendError::ctx("invalid reference format"))?;
        let st = self.lock();
        let Some(list) = st.images.get(&name) else {
            return Ok(None);
        };
        let pick = match platform {
            Some(p) => list.iter().find(|i| p.matches(&config_platform(&i.config))),
            None => list
                .iter()
                .find(|i| Platform::host().matches(&config_platform(&i.config)))
                .or(list.last()),
        };
        Ok(pick.cloned())
    }

    fn cache_get(&self, key: &str) -> BackendResult<Option<LayerRecord>> {
        let mut st = self.lock();
        st.lookups.push(key.to_string());
        Ok(st.cache.get(key).cloned())
    }

    fn cache_alias(&self, key: &str, layer: &LayerRecord) -> BackendResult<()> {
        let mut st = self.lock();
        st.committed.push(key.to_string());
        st.cache.insert(key.to_string(), layer.clone());
        Ok(())
    }

    fn prepare(&self, parent: Option<&str>) -> BackendResult<Active> {
        let (name, dir) = self.new_dir()?;
        let key = format!("active-{name}");
        let mut layers = vec![dir.clone()];
        if let Some(p) = parent {
            layers.extend(self.layer_dirs(p)?);
        }
        self.lock().snaps.insert(
            key.clone(),
            Snap {
                dir: dir.clone(),
                parent: parent.map(str::to_string),
            },
        );
        Ok(Active {
            key,
            mounts: vec![RootfsMount {
                kind: RootfsKind::Bind,
                source: dir,
                options: Vec::new(),
            }],
            layers,
        })
    }

    fn commit(&self, active: Active, key: &str, opts: &DiffOptions) -> BackendResult<LayerRecord> {
        let fault = self.lock().fail_commit.clone();
        if let Some(fault) = fault {
            self.abort(active);
            return Err(fault());
        }
        let snap =
            self.lock().snaps.remove(&active.key).ok_or_else(|| {
                BackendError::Invalid(format!("no active snapshot {}", active.key))
            })?;
        let hook = self.lock().on_commit.clone();
        if let Some(hook) = hook {
            hook();
        }
        let diff_id = match diff_of(&snap.dir, opts) {
            Ok(d) => d,
            Err(e) => {
                // Nothing recorded: the snapshot goes as an abort's would.
                let _ = std::fs::remove_dir_all(&snap.dir);
                return Err(e);
            }
        };
        let name = active.key.trim_start_matches("active-").to_string();
        let layer = LayerRecord {
            diff_id: diff_id.clone(),
            digest: diff_id,
            size: 0,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            snapshot: name.clone(),
            created: opts.clamp_mtime.unwrap_or(1),
        };
        let mut st = self.lock();
        st.snaps.insert(name, snap);
        st.committed.push(key.to_string());
        st.cache.insert(key.to_string(), layer.clone());
        Ok(layer)
    }

    fn abort(&self, active: Active) {
        if let Some(s) = self.lock().snaps.remove(&active.key) {
            let _ = std::fs::remove_dir_all(s.dir);
        }
    }

    fn layer_dirs(&self, snapshot: &str) -> BackendResult<Vec<PathBuf>> {
        let st = self.lock();
        let mut out = Vec::new();
        let mut cur = Some(snapshot.to_string());
        while let Some(c) = cur {
            let s = st
                .snaps
                .get(&c)
                .ok_or_else(|| BackendError::Invalid(format!("no snapshot {c}")))?;
            out.push(s.dir.clone());
            cur = s.parent.clone();
        }
        Ok(out)
    }

    fn hash_cache(&self) -> &dyn HashCache {
        &NoHashCache
    }

    fn export(
        &self,
        config: &ImageConfig,
        layers: &[LayerRecord],
        tags: &[String],
    ) -> BackendResult<Exported> {
        let mut config = config.clone();
        config.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.clone()).collect();
        let bytes = config.to_bytes().map_err(BackendError::ctx("config"))?;
        let image_id = Digest::sha256_of(&bytes).to_string();
        let manifest_digest = Digest::sha256_of(image_id.as_bytes()).to_string();
        self.lock()
            .exported
            .push((config, layers.to_vec(), tags.to_vec()));
        Ok(Exported {
            image_id,
            manifest_digest,
        })
    }

    fn export_index(
        &self,
        children: &[(Platform, Exported)],
        tags: &[String],
    ) -> BackendResult<Exported> {
        let list: Vec<(String, String)> = children
            .iter()
            .map(|(p, e)| (p.to_string(), e.manifest_digest.clone()))
            .collect();
        let digest = Digest::sha256_of(format!("{list:?}").as_bytes()).to_string();
        self.lock().indexes.push((list, tags.to_vec()));
        Ok(Exported {
            image_id: digest.clone(),
            manifest_digest: digest,
        })
    }

    fn cache_mount(
        &self,
        id: &str,
        _sharing: kiln_cache::CacheSharing,
        _cancelled: &dyn Fn() -> bool,
    ) -> BackendResult<crate::backend::CacheMountHold> {
        let name = format!("cache-{}", hex::encode(Sha256::digest(id.as_bytes())));
        let dir = self.root.path().join(name);
        let created = match std::fs::create_dir(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(BackendError::ctx("cache mount")(e)),
        };
        Ok(crate::backend::CacheMountHold {
            dir,
            created,
            guard: Box::new(()),
        })
    }

    fn scratch_dir(&self) -> PathBuf {
        self.root.path().to_path_buf()
    }

    fn stack_layer(
        &self,
        parent: Option<&str>,
        layer: &LayerRecord,
        key: &str,
    ) -> BackendResult<LayerRecord> {
        let src = self
            .snapshot_dir(&layer.snapshot)
            .ok_or_else(|| BackendError::Invalid(format!("no snapshot {}", layer.snapshot)))?;
        let (name, dir) = self.new_dir()?;
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(&dir)
            .status()
            .map_err(BackendError::ctx("stack"))?;
        if !status.success() {
            return Err(BackendError::Invalid(format!("stack: cp exited {status}")));
        }
        let stacked = LayerRecord {
            snapshot: name.clone(),
            ..layer.clone()
        };
        let mut st = self.lock();
        st.snaps.insert(
            name,
            Snap {
                dir,
                parent: parent.map(str::to_string),
            },
        );
        st.committed.push(key.to_string());
        st.cache.insert(key.to_string(), stacked.clone());
        Ok(stacked)
    }
}

/// What a [`FakeRunner`] saw of one step.
#[derive(Debug, Clone)]
pub struct RanStep {
    /// The step's name (its instruction).
    pub name: String,
    /// argv.
    pub args: Vec<String>,
    /// `K=V` environment.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// `USER`, if any.
    pub user: Option<String>,
}

/// What a [`FakeRunner`] does for a step: given the step and the writable
/// layer directory, returns the exit code.
pub type StepFn = dyn Fn(&RanStep, &Path) -> i32 + Send + Sync;

/// A runner that runs nothing: see the module doc. A step whose argv
/// contains `sleep-until-cancelled` waits for cancellation; every step
/// first waits `delay`.
pub struct FakeRunner {
    step: Box<StepFn>,
    delay: std::time::Duration,
    ran: Mutex<Vec<RanStep>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
}

impl FakeRunner {
    /// A runner that plays `step` for every RUN.
    pub fn new(step: impl Fn(&RanStep, &Path) -> i32 + Send + Sync + 'static) -> Self {
        FakeRunner {
            step: Box::new(step),
            delay: std::time::Duration::ZERO,
            ran: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
        }
    }

    /// Every step takes at least `d` (to observe concurrency).
    pub fn with_delay(mut self, d: std::time::Duration) -> Self {
        self.delay = d;
        self
    }

    /// The steps run so far, in the order they started.
    pub fn ran(&self) -> Vec<RanStep> {
        self.ran.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The most steps that ran at the same time.
    pub fn max_concurrent(&self) -> usize {
        self.max_running.load(Ordering::SeqCst)
    }
}

impl Runner for FakeRunner {
    fn run(
        &self,
        req: ExecRequest,
        _output: Option<mpsc::Sender<OutputLine>>,
        cancel: CancellationToken,
    ) -> RunFuture<'_> {
        Box::pin(async move {
            let process = req.spec.process().clone().unwrap_or_default();
            let step = RanStep {
                name: req.name.clone(),
                args: process.args().clone().unwrap_or_default(),
                env: process.env().clone().unwrap_or_default(),
                cwd: process.cwd().clone(),
                user: req.user.clone(),
            };
            self.ran
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(step.clone());
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            let wait = async {
                tokio::time::sleep(self.delay).await;
                if step
                    .args
                    .iter()
                    .any(|a| a.contains("sleep-until-cancelled"))
                {
                    std::future::pending::<()>().await;
                }
            };
            let r = tokio::select! {
                _ = wait => Ok(()),
                _ = cancel.cancelled() => Err(RunError::Cancelled),
            };
            let r = r.map(|()| {
                let upper = req
                    .rootfs
                    .first()
                    .map(|m| m.source.clone())
                    .unwrap_or_default();
                ExecOutcome {
                    status: ExitStatus::Code((self.step)(&step, &upper)),
                    tail: Vec::new(),
                    duration: self.delay,
                }
            });
            self.running.fetch_sub(1, Ordering::SeqCst);
            r
        })
    }
}
