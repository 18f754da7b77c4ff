//! The solver: runs the op graph the frontend produced.
//!
//! Every stage is a tokio task that waits only for the states it reads
//! (`FROM <stage>`, `COPY --from`, `RUN --mount=from=`), so independent
//! stages run concurrently. Every op goes the same way: its key is
//! computed ([`crate::op::key::cache_key`] plus the digests of what it
//! selects), looked up in the cache index, and only on a miss prepared
//! (a writable snapshot on the state's top layer), run, and committed
//! under the key. Identical keys in flight run once (single-flight). A
//! failure cancels the rest of the build; cancellation reaches running
//! steps through the [`runner::Runner`]'s token.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_executor::CancellationToken;
use kiln_image::config::ImageConfig;
use kiln_image::diff::DiffOptions;
use kiln_parser::dockerignore::PatternMatcher;
use tokio::sync::{watch, OnceCell};

use crate::backend::{Backend, LayerRecord};
use crate::build::{BuildOptions, BuildResult};
use crate::contexts::NamedContext;
use crate::error::BuildError;
use crate::fsview::LayerView;
use crate::op::key::{chain_key, image_key, scratch_key};
use crate::op::{Base, Graph, LayerOp, Op, SourceRef};
use crate::progress::{Event, Progress};

pub mod exec;
mod file;
mod link;
pub(crate) mod mounts;
mod remote_src;
pub mod runner;

use runner::Runner;

crate::error::module_error! {
    /// Why the work of a step (outside the store and the executor) failed.
    pub enum StepError {}
}

/// A solved state: what a stage (or an image) is after its ops.
#[derive(Debug, Clone)]
pub(crate) struct Solved {
    /// The chain key (of the base, then after each layer).
    key: String,
    /// Its layers, bottom first.
    layers: Vec<LayerRecord>,
    /// Newest creation time of a layer this build made (cache hits keep
    /// their original time, so a fully cached rebuild is identical).
    newest: Option<i64>,
}

impl Solved {
    fn scratch() -> Self {
        Solved {
            key: scratch_key(),
            layers: Vec::new(),
            newest: None,
        }
    }
    fn top(&self) -> Option<&str> {
        self.layers.last().map(|l| l.snapshot.as_str())
    }
    fn push(&mut self, layer: LayerRecord) {
        self.newest = self.newest.max(Some(layer.created));
        self.key = chain_key(&self.key, layer.diff_id.as_str());
        self.layers.push(layer);
    }
}

type StageResult = Result<Arc<Solved>, Arc<BuildError>>;

/// A resolved base image.
#[derive(Debug)]
struct ResolvedImage {
    config: ImageConfig,
    solved: Arc<Solved>,
}

/// Base images resolved once per build, by normalised-or-not reference
/// after `--build-context` names.
struct Images {
    backend: Arc<dyn Backend>,
    named: BTreeMap<String, NamedContext>,
    cells: Mutex<HashMap<String, Arc<OnceCell<Arc<ResolvedImage>>>>>,
}

impl Images {
    /// The image reference `reference` stands for (itself when it names
    /// no context).
    fn named_image(
        &self,
        reference: &str,
        line: crate::error::Location,
    ) -> Result<String, BuildError> {
        match self.named.get(reference) {
            None => Ok(reference.to_string()),
            Some(NamedContext::Image(r)) => Ok(r.clone()),
            Some(NamedContext::Dir(d)) => Err(BuildError::at(
                line,
                format!(
                    "FROM {reference}: a local directory context ({}) as a base is not supported yet; use it with COPY --from={reference}",
                    d.display()
                ),
            )),
            Some(NamedContext::OciLayout(p, _)) => Err(BuildError::at(
                line,
                format!(
                    "{reference}: the oci-layout:// build context ({}) was not imported into the store",
                    p.display()
                ),
            )),
        }
    }

    /// Resolves an image reference (once per build).
    async fn get(
        &self,
        reference: &str,
        line: crate::error::Location,
    ) -> Result<Arc<ResolvedImage>, BuildError> {
        let reference = self.named_image(reference, line)?;
        let cell = {
            let mut m = self
                .cells
                .lock()
                .map_err(|_| BuildError::internal_msg("lock: poisoned"))?;
            m.entry(reference.clone()).or_default().clone()
        };
        let backend = self.backend.clone();
        cell.get_or_try_init(|| async move {
            let r = reference.clone();
            let img = blocking(move || backend.resolve_image(&r))
                .await
                .map_err(|e| match e {
                    BuildError::Cancelled | BuildError::Step { .. } => e,
                    e => BuildError::Step {
                        location: line,
                        message: format!("{reference}: failed to resolve source metadata: {e}"),
                        cause: Some(crate::error::Cause::new(e)),
                    },
                })?;
            let Some(img) = img else {
                return Err(BuildError::at(
                    line,
                    format!(
                        "{reference}: image not found in the local store (import or load it first, e.g. `kiln import rootfs.tar {reference}`)"
                    ),
                ));
            };
            Ok(Arc::new(ResolvedImage {
                solved: Arc::new(Solved {
                    key: image_key(&img.manifest_digest),
                    layers: img.layers,
                    newest: None,
                }),
                config: img.config,
            }))
        })
        .await
        .cloned()
    }
}

/// Shared state of one solve.
pub(crate) struct Solver {
    backend: Arc<dyn Backend>,
    runner: Arc<dyn Runner>,
    progress: Progress,
    cancel: CancellationToken,
    opts: BuildOptions,
    graph: Graph,
    ignore: Option<PatternMatcher>,
    images: Arc<Images>,
    stages: HashMap<usize, watch::Receiver<Option<StageResult>>>,
    inflight: Mutex<HashMap<String, Arc<OnceCell<LayerRecord>>>>,
    executed: std::sync::atomic::AtomicUsize,
    cached: std::sync::atomic::AtomicUsize,
}

/// Runs blocking store work off the async threads.
pub(crate) async fn blocking<T, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, BuildError>
where
    T: Send + 'static,
    E: Into<BuildError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BuildError::internal("worker", e))?
        .map_err(Into::into)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Parses, lowers and solves `opts.dockerfile`, and writes the image
/// through the backend (see [`crate::build::build`]).
pub async fn solve(
    backend: Arc<dyn Backend>,
    runner: Arc<dyn Runner>,
    progress: Progress,
    cancel: CancellationToken,
    opts: BuildOptions,
) -> Result<BuildResult, BuildError> {
    let df = kiln_parser::parse(&opts.dockerfile)?;
    let plan = crate::frontend::plan::plan(&df, &opts.build_args, opts.target.as_deref())?;
    let ignore = if opts.ignore.is_empty() {
        None
    } else {
        Some(
            PatternMatcher::new(&opts.ignore)
                .map_err(|e| BuildError::Usage(format!(".dockerignore: {e}")))?,
        )
    };
    let created = kiln_image::config::rfc3339(opts.source_date_epoch.unwrap_or_else(now_secs));
    let images = Arc::new(Images {
        backend: backend.clone(),
        named: opts.named_contexts.clone(),
        cells: Mutex::new(HashMap::new()),
    });
    // The frontend needs the base images' configs: resolve them first,
    // concurrently (this is where they are pulled).
    crate::frontend::check_platforms(&df, &plan, &opts)?;
    let configs = resolve_bases(&images, &progress, &df, &plan, &opts).await?;
    if cancel.is_cancelled() {
        return Err(BuildError::Cancelled);
    }
    let graph = crate::frontend::lower(&df, &plan, &opts, &created, &configs)?;
    solve_graph(
        backend, runner, progress, cancel, opts, graph, ignore, images,
    )
    .await
}

/// " (did you mean stage "builder"?)" when `reference` is close to a
/// stage name (a typo of one), else nothing.
fn stage_hint(reference: &str, names: &[String]) -> String {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    kiln_parser::suggest(reference, &names)
        .map(|s| format!(" (did you mean stage {s:?}?)"))
        .unwrap_or_default()
}

/// Resolves the base images of the planned stages (one progress vertex
/// per stage, as `[stage 1/N] FROM ref`); the first failure in stage
/// order is the error.
async fn resolve_bases(
    images: &Arc<Images>,
    progress: &Progress,
    df: &kiln_parser::instructions::Dockerfile,
    plan: &crate::frontend::plan::Plan,
    opts: &BuildOptions,
) -> Result<HashMap<String, ImageConfig>, BuildError> {
    let mut tasks = tokio::task::JoinSet::new();
    let bases = crate::frontend::base_images(plan, opts);
    for (n, (index, reference)) in bases.iter().cloned().enumerate() {
        let stage = &df.stages[index];
        let label = stage
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{index}"));
        let total = stage.instructions.len() + 1;
        let line = crate::error::IntoLocation::into_location(stage.line);
        let images = images.clone();
        let progress = progress.clone();
        tasks.spawn(async move {
            let id = progress.start(format!("[{label} 1/{total}] FROM {reference}"));
            let t = Instant::now();
            let r = images.get(&reference, line).await;
            match &r {
                Ok(_) => progress.done(id, t.elapsed()),
                Err(e) => progress.send(Event::Failed {
                    id,
                    error: e.to_string(),
                }),
            }
            (n, reference, r)
        });
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.map_err(|e| BuildError::internal("worker", e))?);
    }
    results.sort_by_key(|(n, _, _)| *n);
    let mut configs = HashMap::new();
    let names: Vec<String> = df.stages.iter().filter_map(|s| s.name.clone()).collect();
    for (_, reference, r) in results {
        let r = r.map_err(|e| match e {
            BuildError::Step {
                location,
                message,
                cause,
            } => BuildError::Step {
                location,
                message: format!("{message}{}", stage_hint(&reference, &names)),
                cause,
            },
            e => e,
        })?;
        configs.insert(reference, r.config.clone());
    }
    Ok(configs)
}

#[allow(clippy::too_many_arguments)]
async fn solve_graph(
    backend: Arc<dyn Backend>,
    runner: Arc<dyn Runner>,
    progress: Progress,
    cancel: CancellationToken,
    opts: BuildOptions,
    graph: Graph,
    ignore: Option<PatternMatcher>,
    images: Arc<Images>,
) -> Result<BuildResult, BuildError> {
    let mut senders = HashMap::new();
    let mut receivers = HashMap::new();
    for s in &graph.stages {
        let (tx, rx) = watch::channel(None);
        senders.insert(s.index, tx);
        receivers.insert(s.index, rx);
    }
    let order: Vec<usize> = graph.stages.iter().map(|s| s.index).collect();
    let sv = Arc::new(Solver {
        backend,
        runner,
        progress,
        cancel: cancel.clone(),
        opts,
        graph,
        ignore,
        images,
        stages: receivers,
        inflight: Mutex::new(HashMap::new()),
        executed: Default::default(),
        cached: Default::default(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for index in order.iter().copied() {
        let sv = sv.clone();
        let Some(tx) = senders.remove(&index) else {
            continue;
        };
        tasks.spawn(async move {
            let r = sv.clone().run_stage(index).await;
            let failed = r.is_err();
            let _ = tx.send(Some(r.map_err(Arc::new)));
            if failed {
                sv.cancel.cancel();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let target = sv.graph.target;
    let state = match sv.stage_result(target).await {
        Ok(s) => s,
        Err(e) => {
            // Report the first real failure, not a cancellation it caused.
            for index in &order {
                if let Some(Err(e)) = sv.stages.get(index).and_then(|r| r.borrow().clone()) {
                    if !matches!(*e, BuildError::Cancelled) {
                        return Err(unwrap_arc(e));
                    }
                }
            }
            return Err(unwrap_arc(e));
        }
    };
    sv.export(&state).await
}

/// The error a stage failed with (its typed causes are shared, not lost).
fn unwrap_arc(e: Arc<BuildError>) -> BuildError {
    Arc::try_unwrap(e).unwrap_or_else(|e| (*e).clone())
}

/// An `Internal` error of a step becomes an error at its location (its
/// cause kept).
fn at_line(at: crate::error::Location) -> impl Fn(BuildError) -> BuildError {
    move |e| e.located(at)
}

impl Solver {
    async fn stage_result(&self, index: usize) -> StageResult {
        let Some(mut rx) = self.stages.get(&index).cloned() else {
            return Err(Arc::new(BuildError::internal_msg(format!(
                "plan: stage {index} is not part of the build"
            ))));
        };
        loop {
            if let Some(r) = rx.borrow().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return Err(Arc::new(BuildError::Cancelled));
            }
        }
    }

    async fn run_stage(self: Arc<Self>, index: usize) -> Result<Arc<Solved>, BuildError> {
        let stage = self
            .graph
            .stage(index)
            .ok_or_else(|| BuildError::internal_msg("plan: stage missing"))?;
        let mut state: Solved = match &stage.base {
            Base::Scratch => Solved::scratch(),
            Base::Stage(j) => (*self.stage_result(*j).await.map_err(unwrap_arc)?).clone(),
            Base::Image(r) => (*self.images.get(r, stage.location).await?.solved).clone(),
        };
        for op in &stage.ops {
            if self.cancel.is_cancelled() {
                return Err(BuildError::Cancelled);
            }
            let layer = self.clone().run_op(&state, op).await?;
            state.push(layer);
        }
        Ok(Arc::new(state))
    }

    /// Looks up, or prepares, runs and commits, one op on `state`.
    async fn run_op(
        self: Arc<Self>,
        state: &Solved,
        lop: &LayerOp,
    ) -> Result<LayerRecord, BuildError> {
        match &lop.op {
            Op::Exec(e) => self.run_exec(state, lop, e).await,
            Op::Copy(c) => self.run_copy(state, lop, c).await,
            Op::Mkdir(m) => self.run_mkdir(state, lop, m).await,
            Op::ContextDir(d) => self.run_context_dir(state, lop, d).await,
        }
    }

    /// The error of a `--from` value that names no stage and that does
    /// not resolve as an image either: says both, with the closest stage
    /// name when there is one.
    fn not_a_stage(&self, r: &str, e: BuildError, line: crate::error::Location) -> BuildError {
        if matches!(e, BuildError::Cancelled) {
            return e;
        }
        let names: Vec<String> = kiln_parser::parse(&self.opts.dockerfile)
            .map(|df| df.stages.into_iter().filter_map(|s| s.name).collect())
            .unwrap_or_default();
        BuildError::Step {
            location: e.location().unwrap_or(line),
            message: format!(
                "--from={r}: no build stage is named {r:?}{}, and as an image: {e}",
                stage_hint(r, &names)
            ),
            cause: Some(crate::error::Cause::new(e)),
        }
    }

    /// The state `src` names, with the layer view of its files.
    async fn source_state(
        &self,
        src: &SourceRef,
        line: crate::error::Location,
    ) -> Result<(Option<Arc<Solved>>, LayerView), BuildError> {
        let state = match src {
            SourceRef::ContextDir(d) => return Ok((None, LayerView::new(vec![d.clone()], true))),
            SourceRef::Stage(j) => self.stage_result(*j).await.map_err(unwrap_arc)?,
            SourceRef::Image(r) => self
                .images
                .get(r, line)
                .await
                .map_err(|e| self.not_a_stage(r, e, line))?
                .solved
                .clone(),
        };
        let Some(top) = state.top().map(str::to_string) else {
            return Ok((Some(state), LayerView::new(Vec::new(), false)));
        };
        let backend = self.backend.clone();
        let dirs = blocking(move || backend.layer_dirs(&top)).await?;
        Ok((Some(state), LayerView::new(dirs, false)))
    }

    /// Runs (or takes from the cache) one layer-producing step whose work
    /// is `work` on the writable view of a fresh snapshot on `state`.
    async fn layer_step<F>(
        self: Arc<Self>,
        name: &str,
        state: &Solved,
        key: String,
        work: F,
    ) -> Result<LayerRecord, BuildError>
    where
        F: FnOnce(&LayerView) -> Result<(), BuildError> + Send + 'static,
    {
        let id = self.progress.start(name.to_string());
        let t = Instant::now();
        tracing::debug!(step = id, %name, key = %key, "step cache key");
        let parent = state.top().map(str::to_string);
        let r = self.clone().build_once(key, parent, work).await;
        self.finish(id, t, r)
    }

    /// The one way a layer is made: once per key among concurrent callers,
    /// the cached layer if there is one, else `work` on a fresh snapshot
    /// on `parent`, committed under `key` (aborted if it failed or the
    /// build was cancelled). Returns whether it came from the cache.
    async fn build_once<F>(
        self: Arc<Self>,
        key: String,
        parent: Option<String>,
        work: F,
    ) -> Result<(LayerRecord, bool), BuildError>
    where
        F: FnOnce(&LayerView) -> Result<(), BuildError> + Send + 'static,
    {
        let me = self.clone();
        let k = key.clone();
        self.single_flight(&key, async move {
            if let Some(hit) = me.cache_lookup(&k).await? {
                return Ok((hit, true));
            }
            let backend = me.backend.clone();
            let opts = me.diff_options();
            let cancel = me.cancel.clone();
            let layer = blocking(move || -> Result<LayerRecord, BuildError> {
                let active = backend.prepare(parent.as_deref())?;
                let view = LayerView::new(active.layers.clone(), false);
                let worked = work(&view);
                // A cancelled build commits nothing (the work stopped
                // part way, or would be thrown away).
                if cancel.is_cancelled() {
                    backend.abort(active);
                    return Err(BuildError::Cancelled);
                }
                if let Err(e) = worked {
                    backend.abort(active);
                    return Err(e);
                }
                Ok(backend.commit(active, &k, &opts)?)
            })
            .await?;
            Ok((layer, false))
        })
        .await
    }

    fn finish(
        &self,
        id: usize,
        t: Instant,
        r: Result<(LayerRecord, bool), BuildError>,
    ) -> Result<LayerRecord, BuildError> {
        match r {
            Ok((layer, true)) => {
                self.cached
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.progress.send(Event::Cached { id });
                Ok(layer)
            }
            Ok((layer, false)) => {
                self.executed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.progress.done(id, t.elapsed());
                Ok(layer)
            }
            Err(e) => {
                self.progress.send(Event::Failed {
                    id,
                    error: e.to_string(),
                });
                Err(e)
            }
        }
    }

    fn diff_options(&self) -> DiffOptions {
        DiffOptions {
            clamp_mtime: self.opts.source_date_epoch,
            exclude: Vec::new(),
        }
    }

    async fn cache_lookup(&self, key: &str) -> Result<Option<LayerRecord>, BuildError> {
        if self.opts.no_cache {
            return Ok(None);
        }
        let backend = self.backend.clone();
        let k = key.to_string();
        blocking(move || backend.cache_get(&k)).await
    }

    /// Runs `fut` once per key among concurrent callers; returns whether
    /// the result came from the cache.
    async fn single_flight<Fut>(
        &self,
        key: &str,
        fut: Fut,
    ) -> Result<(LayerRecord, bool), BuildError>
    where
        Fut: std::future::Future<Output = Result<(LayerRecord, bool), BuildError>>,
    {
        let cell = {
            let mut m = self
                .inflight
                .lock()
                .map_err(|_| BuildError::internal_msg("lock: poisoned"))?;
            m.entry(key.to_string()).or_default().clone()
        };
        let mut was_cached = true;
        let layer = cell
            .get_or_try_init(|| async {
                let (l, c) = fut.await?;
                was_cached = c;
                Ok::<_, BuildError>(l)
            })
            .await?
            .clone();
        Ok((layer, was_cached))
    }

    /// Writes the target stage's image: its config from the frontend, its
    /// layers from the solve, creation times made deterministic.
    async fn export(&self, state: &Solved) -> Result<BuildResult, BuildError> {
        let stage = self
            .graph
            .stage(self.graph.target)
            .ok_or_else(|| BuildError::internal_msg("plan: target stage missing"))?;
        let mut config = stage.config.clone();
        config.rootfs.diff_ids = state.layers.iter().map(|l| l.diff_id.clone()).collect();
        if !self.opts.labels.is_empty() {
            let labels = config.config_mut().labels.get_or_insert_with(BTreeMap::new);
            for (k, v) in &self.opts.labels {
                labels.insert(k.clone(), v.clone());
            }
        }
        // A deterministic creation time: SOURCE_DATE_EPOCH, else when the
        // newest layer of this build was made, else the base image's time,
        // else (metadata on `scratch`: nothing was made) the Unix epoch, as
        // reproducible-image tools write, so that a rebuild gives the same
        // ID rather than one that depends on the second it ran in.
        let created = match (self.opts.source_date_epoch, state.newest) {
            (Some(t), _) | (None, Some(t)) => kiln_image::config::rfc3339(t),
            (None, None) => config
                .created
                .clone()
                .unwrap_or_else(|| kiln_image::config::rfc3339(0)),
        };
        for h in config.history.iter_mut().skip(stage.base_history) {
            h.created = Some(created.clone());
        }
        config.created = Some(created);
        let id = self.progress.start("exporting to image".into());
        let t = Instant::now();
        let backend = self.backend.clone();
        let layers = state.layers.clone();
        let tags = self.opts.tags.clone();
        let exported = blocking(move || backend.export(&config, &layers, &tags)).await?;
        self.progress.send(Event::Log {
            id,
            stream: "stdout",
            line: format!("writing image {} done", exported.image_id),
            elapsed: t.elapsed().as_secs_f64(),
        });
        for tag in &self.opts.tags {
            self.progress.send(Event::Log {
                id,
                stream: "stdout",
                line: format!("naming to {tag} done"),
                elapsed: t.elapsed().as_secs_f64(),
            });
        }
        self.progress.done(id, t.elapsed());
        if !self.graph.unused_build_args.is_empty() {
            self.progress.send(Event::Info {
                message: format!(
                    "[Warning] One or more build-args [{}] were not consumed",
                    self.graph.unused_build_args.join(" ")
                ),
            });
        }
        Ok(BuildResult {
            image_id: exported.image_id,
            manifest_digest: exported.manifest_digest,
            executed: self.executed.load(std::sync::atomic::Ordering::Relaxed),
            cached: self.cached.load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}
