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

use kiln_cache::StreamedDiff;

use kiln_executor::CancellationToken;
use kiln_image::config::ImageConfig;
use kiln_image::diff::DiffOptions;
use kiln_parser::dockerignore::PatternMatcher;
use tokio::sync::{watch, OnceCell};

use crate::backend::{Backend, LayerRecord};
use crate::build::{BuildOptions, BuildResult, PlatformImage};
use crate::contexts::NamedContext;
use crate::error::BuildError;
use crate::fsview::LayerView;
use crate::op::key::{chain_key, image_key, scratch_key};
use crate::op::{Graph, LayerOp, Op, Source};
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

/// Base images resolved once per build, by reference (after
/// `--build-context` names) and platform.
struct Images {
    backend: Arc<dyn Backend>,
    named: BTreeMap<String, NamedContext>,
    cells: Mutex<HashMap<ImageKey, Arc<OnceCell<Arc<ResolvedImage>>>>>,
    /// Where a pull's blob events go.
    progress: Progress,
}

/// An image of the build: (reference, normalised platform).
type ImageKey = (String, String);

impl Images {
    /// The image reference `reference` stands for (itself when it names
    /// no context).
    fn named_image(
        &self,
        reference: &str,
        line: crate::error::Location,
    ) -> Result<String, BuildError> {
        match crate::contexts::lookup(&self.named, reference) {
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

    /// Resolves an image reference for `platform` (once per build and
    /// platform). The host's platform asks the backend for its default
    /// (the host's image of an index, or the one image stored).
    async fn get(
        &self,
        reference: &str,
        platform: &kiln_image::manifest::Platform,
        line: crate::error::Location,
    ) -> Result<Arc<ResolvedImage>, BuildError> {
        let reference = self.named_image(reference, line)?;
        let platform = kiln_image::platform::normalize(platform);
        let cell = {
            let mut m = self
                .cells
                .lock()
                .map_err(|_| BuildError::internal_msg("lock: poisoned"))?;
            m.entry((reference.clone(), platform.to_string()))
                .or_default()
                .clone()
        };
        let backend = self.backend.clone();
        let progress = self.progress.clone();
        let foreign = !platform.matches(&crate::frontend::plan::host_platform());
        cell.get_or_try_init(|| async move {
            let r = reference.clone();
            let p = platform.clone();
            let img = blocking(move || {
                // A pull's blobs show under the FROM step that waits for it.
                let report = |t| progress.send(Event::transfer("pull", t));
                backend.resolve_image(&r, foreign.then_some(&p), &report)
            })
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
                let hint = if foreign {
                    format!("for {platform} (pull it with `kiln pull --platform {platform} {reference}`)")
                } else {
                    format!("(import or load it first, e.g. `kiln import rootfs.tar {reference}`)")
                };
                return Err(BuildError::at(
                    line,
                    format!("{reference}: image not found in the local store {hint}"),
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
    /// Each platform's target stage.
    targets: Vec<(kiln_image::manifest::Platform, usize)>,
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
    let mut df = kiln_parser::parse(&opts.dockerfile)?;
    // `# check=error=true`: a lint finding fails the build, as BuildKit
    // ("lint violation found for rules: …"). Base images' variables are
    // not known yet: a stage on an image is left out of UndefinedVar.
    let report = crate::lint::lint(&df);
    if report.error {
        if let Some(first) = report.warnings.first() {
            let mut rules: Vec<&str> = Vec::new();
            for w in &report.warnings {
                if !rules.contains(&w.rule) {
                    rules.push(w.rule);
                }
            }
            return Err(BuildError::at(
                first.line,
                format!(
                    "lint violation found for rules: {} ({})",
                    rules.join(", "),
                    first.message
                ),
            ));
        }
    }
    // BuildKit ignores a `--no-cache-filter` name no stage has; kiln
    // says so (a typo would otherwise go unnoticed).
    for f in &opts.no_cache_filter {
        if !df
            .stages
            .iter()
            .filter_map(|s| s.name.as_deref())
            .any(|n| n.eq_ignore_ascii_case(f))
        {
            progress.send(Event::Warning {
                message: format!("[Warning] --no-cache-filter: no build stage is named {f:?}"),
            });
        }
    }
    // A named context with a stage's name replaces that stage (BuildKit).
    let replaced = crate::frontend::plan::replace_named_stages(&mut df, opts.named_contexts.keys());
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
        progress: progress.clone(),
    });
    let platforms = if opts.platforms.is_empty() {
        vec![crate::frontend::plan::host_platform()]
    } else {
        opts.platforms.clone()
    };
    let multi = platforms.len() > 1;
    // One graph per platform, lowered alone, then merged into one graph
    // solved by one scheduler: identical keys (a `FROM
    // --platform=$BUILDPLATFORM` stage that does not depend on the
    // target) run once.
    let mut graphs = Vec::with_capacity(platforms.len());
    for p in &platforms {
        let plan = if multi || !opts.platforms.is_empty() {
            crate::frontend::plan::plan_for(&df, &opts.build_args, opts.target.as_deref(), p)?
        } else {
            plan.clone()
        };
        // The frontend needs the base images' configs: resolve them
        // first, concurrently (this is where they are pulled).
        let prefix = multi.then(|| p.to_string());
        let mut plan = plan;
        let mut configs =
            resolve_bases(&images, &progress, &df, &plan, &opts, prefix.clone()).await?;
        // A base image's ONBUILD triggers may read other stages (`COPY
        // --from=helper`): known only now, they join the plan (BuildKit's
        // initOnBuildTriggers), and their bases are resolved in turn.
        let mut extra: HashMap<usize, Vec<usize>> = HashMap::new();
        for _ in 0..8 {
            let mut grew = false;
            for st in &plan.stages {
                let crate::frontend::plan::Base::Image(r) = &st.base else {
                    continue;
                };
                // A replaced stage runs no ONBUILD trigger of its context.
                if replaced.contains(&st.index) {
                    continue;
                }
                let Some(triggers) = configs
                    .get(&(r.clone(), st.platform.to_string()))
                    .and_then(|c| c.config.as_ref())
                    .and_then(|c| c.on_build.as_ref())
                else {
                    continue;
                };
                for j in crate::frontend::plan::trigger_deps(&df, st.index, triggers) {
                    if plan.stages.iter().all(|s| s.index != j) {
                        let e = extra.entry(st.index).or_default();
                        if !e.contains(&j) {
                            e.push(j);
                            grew = true;
                        }
                    }
                }
            }
            if !grew {
                break;
            }
            let wider = crate::frontend::plan::plan_with(
                &df,
                &opts.build_args,
                opts.target.as_deref(),
                &plan.platform,
                &extra,
            )?;
            let added = crate::frontend::plan::Plan {
                stages: wider
                    .stages
                    .iter()
                    .filter(|s| plan.stages.iter().all(|o| o.index != s.index))
                    .cloned()
                    .collect(),
                ..wider.clone()
            };
            configs.extend(
                resolve_bases(&images, &progress, &df, &added, &opts, prefix.clone()).await?,
            );
            plan = wider;
        }
        if cancel.is_cancelled() {
            return Err(BuildError::Cancelled);
        }
        graphs.push(crate::frontend::lower(
            &df, &plan, &opts, &created, &configs,
        )?);
    }
    let (graph, targets) = merge_graphs(graphs, df.stages.len(), multi);
    solve_graph(
        backend, runner, progress, cancel, opts, graph, targets, ignore, images,
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

/// The graphs of several platforms as one: platform `k`'s stage `i`
/// becomes stage `k * stages + i` (its edges renumbered alike) and, with
/// several platforms, its progress names start with the platform
/// (`[linux/arm64 build 2/3]`, as BuildKit's). Returns the graph and each
/// platform's target stage.
fn merge_graphs(
    graphs: Vec<Graph>,
    stages: usize,
    multi: bool,
) -> (Graph, Vec<(kiln_image::manifest::Platform, usize)>) {
    let mut targets = Vec::with_capacity(graphs.len());
    let mut merged: Option<Graph> = None;
    for (k, mut g) in graphs.into_iter().enumerate() {
        let off = k * stages;
        let renumber = |s: &mut Source| {
            if let Source::Stage(j) = s {
                *j += off;
            }
        };
        for st in &mut g.stages {
            st.index += off;
            renumber(&mut st.base);
            if multi {
                st.label = format!("{} {}", g.platform, st.label);
            }
            for lop in &mut st.ops {
                if multi {
                    if let Some(rest) = lop.name.strip_prefix('[') {
                        lop.name = format!("[{} {rest}", g.platform);
                    }
                }
                match &mut lop.op {
                    Op::Copy(c) => c.from.iter_mut().for_each(renumber),
                    Op::Exec(e) => e
                        .mounts
                        .iter_mut()
                        .filter_map(|m| m.from.as_mut())
                        .for_each(renumber),
                    Op::Mkdir(_) | Op::ContextDir(_) => {}
                }
            }
        }
        g.target += off;
        targets.push((g.platform.clone(), g.target));
        match &mut merged {
            None => merged = Some(g),
            Some(m) => m.stages.extend(g.stages),
        }
    }
    (
        merged.unwrap_or_else(|| Graph {
            stages: Vec::new(),
            target: 0,
            unused_build_args: Vec::new(),
            platform: crate::frontend::plan::host_platform(),
        }),
        targets,
    )
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
    prefix: Option<String>,
) -> Result<HashMap<(String, String), ImageConfig>, BuildError> {
    let mut tasks = tokio::task::JoinSet::new();
    let bases = crate::frontend::base_images(plan, opts);
    for (n, (index, reference, platform)) in bases.iter().cloned().enumerate() {
        let stage = &df.stages[index];
        let mut label = stage
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{index}"));
        if let Some(p) = &prefix {
            label = format!("{p} {label}");
        }
        let total = stage.instructions.len() + 1;
        let line = crate::error::IntoLocation::into_location(stage.line);
        let images = images.clone();
        let progress = progress.clone();
        tasks.spawn(async move {
            let id = progress.start(format!("[{label} 1/{total}] FROM {reference}"));
            let t = Instant::now();
            let r = images.get(&reference, &platform, line).await;
            match &r {
                Ok(_) => progress.done(id, t.elapsed()),
                Err(e) => progress.send(Event::Failed {
                    id,
                    error: e.to_string(),
                }),
            }
            (n, (reference, platform.to_string()), r)
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
                message: format!("{message}{}", stage_hint(&reference.0, &names)),
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
    targets: Vec<(kiln_image::manifest::Platform, usize)>,
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
    // What is left: a step per op, an export per target, and the index of
    // a multi-platform build (the renderer's `(done/total)`).
    let ops: usize = graph.stages.iter().map(|s| s.ops.len()).sum();
    progress.send(Event::Planned {
        steps: progress.started() + ops + targets.len() + usize::from(targets.len() > 1),
    });
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
        targets: targets.clone(),
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
    let mut states = Vec::with_capacity(targets.len());
    for (platform, target) in &targets {
        match sv.stage_result(*target).await {
            Ok(s) => states.push((platform.clone(), *target, s)),
            Err(e) => {
                // Report the first real failure, not a cancellation it
                // caused.
                for index in &order {
                    if let Some(Err(e)) = sv.stages.get(index).and_then(|r| r.borrow().clone()) {
                        if !matches!(*e, BuildError::Cancelled) {
                            return Err(unwrap_arc(e));
                        }
                    }
                }
                return Err(unwrap_arc(e));
            }
        }
    }
    if let [(_, target, state)] = &states[..] {
        let exported = sv.export(*target, state, &sv.opts.tags, "").await?;
        return Ok(sv.result(exported, Vec::new()));
    }
    // Several platforms: each image untagged, then the index under the
    // tags.
    let mut children = Vec::with_capacity(states.len());
    for (platform, target, state) in &states {
        let e = sv
            .export(*target, state, &[], &format!(" {platform}"))
            .await?;
        children.push((platform.clone(), e));
    }
    let id = sv.progress.start("exporting manifest list".into());
    let t = Instant::now();
    let backend = sv.backend.clone();
    let tags = sv.opts.tags.clone();
    let list = children.clone();
    let index = blocking(move || backend.export_index(&list, &tags)).await?;
    sv.progress.send(Event::Log {
        id,
        stream: "stdout",
        line: format!("exporting manifest list {} done", index.manifest_digest),
        elapsed: t.elapsed().as_secs_f64(),
    });
    sv.progress.done(id, t.elapsed());
    let platforms = children
        .into_iter()
        .map(|(platform, e)| PlatformImage {
            platform,
            image_id: e.image_id,
            manifest_digest: e.manifest_digest,
        })
        .collect();
    Ok(sv.result(index, platforms))
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
            Source::Scratch => Solved::scratch(),
            Source::Stage(j) => (*self.stage_result(*j).await.map_err(unwrap_arc)?).clone(),
            Source::Image {
                reference,
                platform,
            } => (*self
                .images
                .get(reference, platform, stage.location)
                .await?
                .solved)
                .clone(),
            Source::ContextDir(_) => {
                return Err(BuildError::internal_msg(
                    "plan: a directory context as a stage base is lowered to an op",
                ))
            }
        };
        for op in &stage.ops {
            if self.cancel.is_cancelled() {
                return Err(BuildError::Cancelled);
            }
            let layer = self.clone().run_op(&state, op, stage.ignore_cache).await?;
            state.push(layer);
        }
        Ok(Arc::new(state))
    }

    /// Looks up, or prepares, runs and commits, one op on `state`. In a
    /// stage `--no-cache-filter` names (`ignore_cache`), RUN, COPY and ADD
    /// are not looked up (BuildKit marks only those ops).
    async fn run_op(
        self: Arc<Self>,
        state: &Solved,
        lop: &LayerOp,
        ignore_cache: bool,
    ) -> Result<LayerRecord, BuildError> {
        match &lop.op {
            Op::Exec(e) => self.run_exec(state, lop, e, ignore_cache).await,
            Op::Copy(c) => self.run_copy(state, lop, c, ignore_cache).await,
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
        src: &Source,
        line: crate::error::Location,
    ) -> Result<(Option<Arc<Solved>>, LayerView), BuildError> {
        let state = match src {
            Source::ContextDir(d) => return Ok((None, LayerView::new(vec![d.clone()], true))),
            Source::Scratch => Arc::new(Solved::scratch()),
            Source::Stage(j) => self.stage_result(*j).await.map_err(unwrap_arc)?,
            Source::Image {
                reference,
                platform,
            } => self
                .images
                .get(reference, platform, line)
                .await
                .map_err(|e| self.not_a_stage(reference, e, line))?
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

    /// Runs (or takes from the cache, unless `ignore_cache`) one
    /// layer-producing step whose work is `work` on the writable view of
    /// a fresh snapshot on `state`.
    async fn layer_step<F>(
        self: Arc<Self>,
        name: &str,
        state: &Solved,
        key: String,
        ignore_cache: bool,
        work: F,
    ) -> Result<LayerRecord, BuildError>
    where
        F: FnOnce(&LayerView) -> Result<Option<StreamedDiff>, BuildError> + Send + 'static,
    {
        let id = self.progress.start(name.to_string());
        let t = Instant::now();
        tracing::debug!(step = id, %name, key = %key, "step cache key");
        let parent = state.top().map(str::to_string);
        let r = self
            .clone()
            .build_once(key, parent, ignore_cache, work)
            .await;
        self.finish(id, t, r)
    }

    /// The one way a layer is made: once per key among concurrent callers,
    /// the cached layer if there is one (not looked up when
    /// `ignore_cache`), else `work` on a fresh snapshot on `parent`,
    /// committed under `key` (aborted if it failed or the build was
    /// cancelled). Returns whether it came from the cache.
    async fn build_once<F>(
        self: Arc<Self>,
        key: String,
        parent: Option<String>,
        ignore_cache: bool,
        work: F,
    ) -> Result<(LayerRecord, bool), BuildError>
    where
        F: FnOnce(&LayerView) -> Result<Option<StreamedDiff>, BuildError> + Send + 'static,
    {
        let me = self.clone();
        let k = key.clone();
        self.single_flight(&key, async move {
            if let Some(hit) = me.cache_lookup(&k, ignore_cache, parent.as_deref()).await? {
                return Ok((hit, true));
            }
            let backend = me.backend.clone();
            let opts = me.diff_options();
            let cancel = me.cancel.clone();
            let layer = blocking(move || -> Result<LayerRecord, BuildError> {
                let t = Instant::now();
                let active = backend.prepare(parent.as_deref())?;
                let view = LayerView::new(active.layers.clone(), false);
                let worked = work(&view);
                tracing::debug!(key = %k, seconds = t.elapsed().as_secs_f64(), "step work done");
                // A cancelled build commits nothing (the work stopped
                // part way, or would be thrown away).
                if cancel.is_cancelled() {
                    backend.abort(active);
                    return Err(BuildError::Cancelled);
                }
                let streamed = match worked {
                    Ok(s) => s,
                    Err(e) => {
                        backend.abort(active);
                        return Err(e);
                    }
                };
                let t = Instant::now();
                let r = match streamed {
                    // The layer was digested while the work wrote it.
                    Some(s) => committed(backend.commit_streamed(active, &k, &opts, s), &cancel),
                    None => committed(backend.commit(active, &k, &opts), &cancel),
                };
                tracing::debug!(key = %k, seconds = t.elapsed().as_secs_f64(), "step committed");
                r
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

    /// The diff options of a commit: the build's clamp, and its cancel
    /// token (a cancel stops the differ part way).
    fn diff_options(&self) -> DiffOptions {
        let cancel = self.cancel.clone();
        DiffOptions {
            clamp_mtime: self.opts.source_date_epoch,
            exclude: Vec::new(),
            cancel: Some(kiln_image::diff::Cancel::new(move || cancel.is_cancelled())),
        }
    }

    /// The cached layer of `key`; none with `--no-cache` or when the
    /// step's stage is named by `--no-cache-filter` (`ignore_cache`).
    ///
    /// A hit must be a layer on `parent` (the step's parent snapshot): its
    /// snapshot is the chain ID of `parent` and its diffID. A record naming
    /// a layer on another parent (an imported cache's claim) is not used:
    /// the step would go on another build's files.
    async fn cache_lookup(
        &self,
        key: &str,
        ignore_cache: bool,
        parent: Option<&str>,
    ) -> Result<Option<LayerRecord>, BuildError> {
        if self.opts.no_cache || ignore_cache {
            return Ok(None);
        }
        let backend = self.backend.clone();
        let k = key.to_string();
        let hit = blocking(move || backend.cache_get(&k)).await?;
        Ok(hit.filter(|h| {
            let on_parent = self.backend.hit_on(h, parent);
            if !on_parent {
                tracing::warn!(
                    key,
                    snapshot = %h.snapshot,
                    "a cache record for this step names a layer on another parent: not used"
                );
            }
            on_parent
        }))
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

    /// What the build made, from what it exported.
    fn result(
        &self,
        exported: crate::backend::Exported,
        platforms: Vec<PlatformImage>,
    ) -> BuildResult {
        if !self.graph.unused_build_args.is_empty() {
            self.progress.send(Event::Info {
                message: format!(
                    "[Warning] One or more build-args [{}] were not consumed",
                    self.graph.unused_build_args.join(" ")
                ),
            });
        }
        self.progress.send(Event::Result {
            image_id: exported.image_id.clone(),
            digest: exported.manifest_digest.clone(),
        });
        BuildResult {
            image_id: exported.image_id,
            manifest_digest: exported.manifest_digest,
            executed: self.executed.load(std::sync::atomic::Ordering::Relaxed),
            cached: self.cached.load(std::sync::atomic::Ordering::Relaxed),
            platforms,
        }
    }

    /// Writes the image of target stage `target` under `tags`: its config
    /// from the frontend, its layers from the solve, creation times made
    /// deterministic. `suffix` follows "exporting to image" in progress.
    async fn export(
        &self,
        target: usize,
        state: &Solved,
        tags: &[String],
        suffix: &str,
    ) -> Result<crate::backend::Exported, BuildError> {
        let stage = self
            .graph
            .stage(target)
            .ok_or_else(|| BuildError::internal_msg("plan: target stage missing"))?;
        let mut config = stage.config.clone();
        config.rootfs.diff_ids = state.layers.iter().map(|l| l.diff_id.clone()).collect();
        // An explicit --platform names the image's platform, whatever its
        // last stage started from (BuildKit: a `FROM
        // --platform=$BUILDPLATFORM` final stage still gives an image for
        // the target); the variant stays when os/arch already agree and
        // the target names none.
        if !self.opts.platforms.is_empty() {
            if let Some((p, _)) = self.targets.iter().find(|(_, t)| *t == target) {
                let same = config.os == p.os && config.architecture == p.architecture;
                config.os = p.os.clone();
                config.architecture = p.architecture.clone();
                if p.variant.is_some() || !same {
                    config.variant = p.variant.clone();
                }
            }
        }
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
        let id = self.progress.start(format!("exporting to image{suffix}"));
        let t = Instant::now();
        let backend = self.backend.clone();
        let layers = state.layers.clone();
        let names = tags.to_vec();
        let exported = blocking(move || backend.export(&config, &layers, &names)).await?;
        self.progress.send(Event::Log {
            id,
            stream: "stdout",
            line: format!("writing image {} done", exported.image_id),
            elapsed: t.elapsed().as_secs_f64(),
        });
        for tag in tags.iter() {
            self.progress.send(Event::Log {
                id,
                stream: "stdout",
                line: format!("naming to {tag} done"),
                elapsed: t.elapsed().as_secs_f64(),
            });
        }
        self.progress.done(id, t.elapsed());
        Ok(exported)
    }
}

/// A commit's outcome: one cut short by the build's cancellation (the
/// differ stops part way and the backend records nothing) is the
/// cancellation, not a failure of the step.
fn committed(
    r: crate::backend::BackendResult<LayerRecord>,
    cancel: &CancellationToken,
) -> Result<LayerRecord, BuildError> {
    match r {
        Err(_) if cancel.is_cancelled() => Err(BuildError::Cancelled),
        r => Ok(r?),
    }
}
