//! The build: stages run as concurrent tasks that wait only for the stages
//! they read from; each instruction is dispatched with BuildKit's semantics
//! (ARG/ENV scoping, expansion, config edits, history), and each
//! layer-producing step is keyed, looked up in the cache index, and run
//! only on a miss. Identical keys in flight run once.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_executor::{CancellationToken, ExecRequest, Executor, NetworkMode, OutputLine};

use crate::solve::runner::Runner;
use kiln_image::config::{Healthcheck, History, ImageConfig};
use kiln_image::diff::DiffOptions;
use kiln_image::manifest::Platform;
use kiln_parser::dockerignore::PatternMatcher;
use kiln_parser::instructions::{CommandLine, Dockerfile, Instruction, Kind, Stage};
use kiln_parser::shell::Lex;
use tokio::sync::{watch, OnceCell};

use crate::backend::{Backend, LayerRecord};
use crate::copy::{copy_selections, hash_selection, CopyOptions, Selection, Selector};
use crate::error::BuildError;
use crate::fsview::{join_abs, LayerView};
use crate::key::KeyHasher;
use crate::plan::{self, Base, Plan, Source, PROXY_ARGS};
use crate::progress::{Event, Progress};

mod link;
mod mounts;
mod named;
mod remote_src;
pub use mounts::{parse_secret_flag, parse_ssh_flag, SecretSource};

/// Everything a build needs besides the store.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// The Dockerfile text.
    pub dockerfile: String,
    /// The build context directory.
    pub context: PathBuf,
    /// `.dockerignore` patterns (already read).
    pub ignore: Vec<String>,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--target`.
    pub target: Option<String>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--label` values added to the image.
    pub labels: BTreeMap<String, String>,
    /// Default network of RUN steps.
    pub network: NetworkMode,
    /// Resource limits of every RUN step.
    pub limits: ResourceLimits,
    /// How much of each RUN step's output (per stream) is shown before it
    /// is clipped (BuildKit: 2 MiB, then "output clipped").
    pub step_log_limit: crate::progress::StepLogLimit,
    /// Names to tag the result with (normalised).
    pub tags: Vec<String>,
    /// `SOURCE_DATE_EPOCH`: clamps created times and file mtimes.
    pub source_date_epoch: Option<i64>,
    /// `--secret`: build secrets by id (where to read them, never the
    /// values).
    pub secrets: BTreeMap<String, SecretSource>,
    /// `--ssh`: SSH agent sockets by id.
    pub ssh: BTreeMap<String, PathBuf>,
    /// `--allow security.insecure`: `RUN --security=insecure` may run with
    /// every capability.
    pub allow_insecure: bool,
    /// `--build-context`: names `FROM` and `--from` resolve to first.
    pub named_contexts: BTreeMap<String, crate::contexts::NamedContext>,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildResult {
    /// The image ID (config digest).
    pub image_id: String,
    /// The manifest digest.
    pub manifest_digest: String,
    /// How many steps ran (were not cached).
    pub executed: usize,
    /// How many steps came from the cache.
    pub cached: usize,
}

/// `--memory`, `--cpus`, `--pids-limit`: applied to every RUN step's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResourceLimits {
    /// Memory limit in bytes.
    pub memory: Option<i64>,
    /// CPUs (fractional), enforced as a CFS quota per 100ms period.
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    pub pids: Option<i64>,
}

fn apply_limits(spec: &mut kiln_executor::oci::Spec, l: &ResourceLimits) {
    use kiln_executor::oci::{
        LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder,
    };
    if l.memory.is_none() && l.cpus.is_none() && l.pids.is_none() {
        return;
    }
    let mut r = LinuxResourcesBuilder::default();
    if let Some(m) = l.memory {
        if let Ok(mem) = LinuxMemoryBuilder::default().limit(m).swap(m).build() {
            r = r.memory(mem);
        }
    }
    if let Some(c) = l.cpus {
        let period: u64 = 100_000;
        if let Ok(cpu) = LinuxCpuBuilder::default()
            .period(period)
            .quota((c * period as f64) as i64)
            .build()
        {
            r = r.cpu(cpu);
        }
    }
    if let Some(p) = l.pids {
        if let Ok(pids) = LinuxPidsBuilder::default().limit(p).build() {
            r = r.pids(pids);
        }
    }
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_resources(r.build().ok());
    spec.set_linux(Some(linux));
}

/// The state of a stage after some instructions.
#[derive(Debug, Clone)]
struct StageState {
    config: ImageConfig,
    layers: Vec<LayerRecord>,
    /// The chain key (cache key of the last layer step, or of the base).
    key: String,
    /// Environment for expansion and RUN: config env plus ARGs, last wins.
    env: Vec<(String, String)>,
    /// Declared build args in scope, for RUN history and environment.
    args: Vec<(String, Option<String>)>,
    /// CMD set in this stage (ENTRYPOINT then keeps it).
    cmd_set: bool,
    /// History entries inherited from a base image (their times are kept).
    base_history: usize,
    /// Newest creation time of a layer this Dockerfile built (cache hits
    /// keep their original time, so a fully cached rebuild is identical).
    newest: Option<i64>,
}

impl StageState {
    fn top(&self) -> Option<&str> {
        self.layers.last().map(|l| l.snapshot.as_str())
    }
    fn workdir(&self) -> String {
        self.config
            .config
            .as_ref()
            .and_then(|c| c.working_dir.clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    }
    fn user(&self) -> Option<String> {
        self.config
            .config
            .as_ref()
            .and_then(|c| c.user.clone())
            .filter(|u| !u.is_empty())
    }
    fn shell(&self) -> Vec<String> {
        self.config
            .config
            .as_ref()
            .and_then(|c| c.shell.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }
    fn set_env(&mut self, k: &str, v: &str) {
        let env = self.config.config_mut().env.get_or_insert_with(Vec::new);
        let entry = format!("{k}={v}");
        match env
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(a, _)| a) == k)
        {
            Some(e) => *e = entry,
            None => env.push(entry),
        }
        self.env.push((k.into(), v.into()));
    }
    /// The environment a RUN sees: the state env with duplicates resolved
    /// (last wins, first position kept).
    fn run_env(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in &self.env {
            match out.iter_mut().find(|(ok, _)| ok == k) {
                Some(e) => e.1 = v.clone(),
                None => out.push((k.clone(), v.clone())),
            }
        }
        out
    }
}

type StageResult = Result<Arc<StageState>, Arc<BuildError>>;

/// Shared state of one build.
struct Ctx {
    backend: Arc<dyn Backend>,
    executor: Arc<dyn Runner>,
    progress: Progress,
    cancel: CancellationToken,
    opts: BuildOptions,
    df: Dockerfile,
    plan: Plan,
    lex: Lex,
    ignore: Option<PatternMatcher>,
    stages: HashMap<usize, watch::Receiver<Option<StageResult>>>,
    inflight: Mutex<HashMap<String, Arc<OnceCell<LayerRecord>>>>,
    images: Mutex<HashMap<String, Arc<OnceCell<Arc<StageState>>>>>,
    executed: std::sync::atomic::AtomicUsize,
    cached: std::sync::atomic::AtomicUsize,
    created: String,
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, BuildError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BuildError::internal("worker", e))?
        .map_err(BuildError::Internal)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Builds `opts.dockerfile` and writes the image to the store.
pub async fn build(
    backend: Arc<dyn Backend>,
    executor: Executor,
    progress: Progress,
    cancel: CancellationToken,
    opts: BuildOptions,
) -> Result<BuildResult, BuildError> {
    build_with_runner(backend, Arc::new(executor), progress, cancel, opts).await
}

/// [`build`] with any [`Runner`] in front of the RUN steps (a fake one in
/// tests).
pub async fn build_with_runner(
    backend: Arc<dyn Backend>,
    executor: Arc<dyn Runner>,
    progress: Progress,
    cancel: CancellationToken,
    opts: BuildOptions,
) -> Result<BuildResult, BuildError> {
    let df = kiln_parser::parse(&opts.dockerfile)?;
    let plan = plan::plan(&df, &opts.build_args, opts.target.as_deref())?;
    let ignore = if opts.ignore.is_empty() {
        None
    } else {
        Some(
            PatternMatcher::new(&opts.ignore)
                .map_err(|e| BuildError::Usage(format!(".dockerignore: {e}")))?,
        )
    };
    let created = kiln_image::config::rfc3339(opts.source_date_epoch.unwrap_or_else(now_secs));
    let lex = Lex::new(df.escape);
    let mut senders = HashMap::new();
    let mut receivers = HashMap::new();
    for s in &plan.stages {
        let (tx, rx) = watch::channel(None);
        senders.insert(s.index, tx);
        receivers.insert(s.index, rx);
    }
    let ctx = Arc::new(Ctx {
        backend,
        executor,
        progress,
        cancel: cancel.clone(),
        opts,
        df,
        plan,
        lex,
        ignore,
        stages: receivers,
        inflight: Mutex::new(HashMap::new()),
        images: Mutex::new(HashMap::new()),
        executed: Default::default(),
        cached: Default::default(),
        created,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for s in ctx.plan.stages.clone() {
        let ctx = ctx.clone();
        let Some(tx) = senders.remove(&s.index) else {
            continue;
        };
        tasks.spawn(async move {
            let r = ctx.clone().run_stage(s.index).await;
            let failed = r.is_err();
            let _ = tx.send(Some(r.map_err(Arc::new)));
            if failed {
                ctx.cancel.cancel();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let target = ctx.plan.target;
    let result = ctx.stage_result(target).await;
    let state = match result {
        Ok(s) => s,
        Err(e) => {
            // Report the first real failure, not a cancellation it caused.
            for s in &ctx.plan.stages {
                if let Some(Err(e)) = ctx.stages.get(&s.index).and_then(|r| r.borrow().clone()) {
                    if !matches!(*e, BuildError::Cancelled) {
                        return Err(unwrap_arc(e));
                    }
                }
            }
            return Err(unwrap_arc(e));
        }
    };
    let mut config = state.config.clone();
    if !ctx.opts.labels.is_empty() {
        let labels = config.config_mut().labels.get_or_insert_with(BTreeMap::new);
        for (k, v) in &ctx.opts.labels {
            labels.insert(k.clone(), v.clone());
        }
    }
    // A deterministic creation time: SOURCE_DATE_EPOCH, else when the
    // newest layer of this build was made, else the base image's time,
    // else (metadata on `scratch`: nothing was made) the Unix epoch, as
    // reproducible-image tools write, so that a rebuild gives the same ID
    // rather than one that depends on the second it ran in.
    let created = match (ctx.opts.source_date_epoch, state.newest) {
        (Some(t), _) | (None, Some(t)) => kiln_image::config::rfc3339(t),
        (None, None) => config
            .created
            .clone()
            .unwrap_or_else(|| kiln_image::config::rfc3339(0)),
    };
    for h in config.history.iter_mut().skip(state.base_history) {
        h.created = Some(created.clone());
    }
    config.created = Some(created);
    let id = ctx.progress.start("exporting to image".into());
    let t = Instant::now();
    let backend = ctx.backend.clone();
    let layers = state.layers.clone();
    let tags = ctx.opts.tags.clone();
    let exported = blocking(move || backend.export(&config, &layers, &tags)).await?;
    ctx.progress.send(Event::Log {
        id,
        stream: "stdout",
        line: format!("writing image {} done", exported.image_id),
        elapsed: t.elapsed().as_secs_f64(),
    });
    for tag in &ctx.opts.tags {
        ctx.progress.send(Event::Log {
            id,
            stream: "stdout",
            line: format!("naming to {tag} done"),
            elapsed: t.elapsed().as_secs_f64(),
        });
    }
    ctx.progress.done(id, t.elapsed());
    let unused = plan::unused_build_args(&ctx.df, &ctx.plan, &ctx.opts.build_args);
    if !unused.is_empty() {
        ctx.progress.send(Event::Info {
            message: format!(
                "[Warning] One or more build-args [{}] were not consumed",
                unused.join(" ")
            ),
        });
    }
    Ok(BuildResult {
        image_id: exported.image_id,
        manifest_digest: exported.manifest_digest,
        executed: ctx.executed.load(std::sync::atomic::Ordering::Relaxed),
        cached: ctx.cached.load(std::sync::atomic::Ordering::Relaxed),
    })
}

fn unwrap_arc(e: Arc<BuildError>) -> BuildError {
    Arc::try_unwrap(e).unwrap_or_else(|e| match &*e {
        BuildError::Step { line, message } => BuildError::Step {
            line: *line,
            message: message.clone(),
        },
        BuildError::Run {
            line,
            command,
            status,
            tail,
        } => BuildError::Run {
            line: *line,
            command: command.clone(),
            status: status.clone(),
            tail: tail.clone(),
        },
        BuildError::Usage(m) => BuildError::Usage(m.clone()),
        BuildError::Dockerfile(pe) => BuildError::Dockerfile(pe.clone()),
        BuildError::Cancelled => BuildError::Cancelled,
        other => BuildError::Internal(other.to_string()),
    })
}

fn history(created: &str, created_by: String) -> History {
    History {
        created: Some(created.to_string()),
        created_by: Some(created_by),
        comment: Some("buildkit.dockerfile.v0".into()),
        ..Default::default()
    }
}

impl Ctx {
    async fn stage_result(&self, index: usize) -> StageResult {
        let Some(mut rx) = self.stages.get(&index).cloned() else {
            return Err(Arc::new(BuildError::internal(
                "plan",
                format!("stage {index} is not part of the build"),
            )));
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

    fn stage_label(&self, index: usize) -> String {
        let st = &self.df.stages[index];
        match &st.name {
            Some(n) => n.clone(),
            None => format!("stage-{index}"),
        }
    }

    fn expand(
        &self,
        word: &str,
        env: &[(String, String)],
        line: usize,
    ) -> Result<String, BuildError> {
        let env: Vec<(String, String)> = env.to_vec();
        self.lex.process_word(word, &env).map_err(|e| {
            if *e.kind() == kiln_parser::shell::ShellErrorKind::TooLong {
                let shown: String = word.chars().take(40).collect();
                let more = if shown.len() < word.len() { "…" } else { "" };
                self.located(
                    line,
                    word,
                    format!(
                        "expanding {shown:?}{more} gives more than {} MiB (the limit of one ARG, ENV or LABEL value)",
                        kiln_parser::shell::MAX_EXPANSION >> 20
                    ),
                )
            } else {
                BuildError::at(line, e.to_string())
            }
        })
    }

    /// An error pointing at `needle` (or the instruction's first
    /// character) on `line` of the Dockerfile, rendered with a caret.
    fn located(&self, line: usize, needle: &str, message: String) -> BuildError {
        let lines: Vec<&str> = self.opts.dockerfile.lines().collect();
        let text = lines.get(line.saturating_sub(1)).copied().unwrap_or("");
        let column = match text.find(needle).filter(|_| !needle.is_empty()) {
            Some(b) => text[..b].chars().count() + 1,
            None => text.chars().take_while(|c| c.is_whitespace()).count() + 1,
        };
        BuildError::Dockerfile(kiln_parser::ParseError {
            message,
            location: kiln_parser::Location {
                line,
                column,
                end_line: line,
            },
            suggestion: None,
        })
    }

    /// After an instruction that grows the image config (ENV, LABEL, ARG):
    /// an error at `line` when the config would pass
    /// [`kiln_image::config::MAX_CONFIG_SIZE`] (an estimate from the sizes
    /// of its environment, labels and history; export checks the real one).
    fn check_config_growth(&self, state: &StageState, line: usize) -> Result<(), BuildError> {
        let cfg = &state.config;
        let env: usize = state.env.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        let labels: usize = cfg
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .map(|l| l.iter().map(|(k, v)| k.len() + v.len() + 6).sum())
            .unwrap_or(0);
        let history: usize = cfg
            .history
            .iter()
            .map(|h| h.created_by.as_deref().map_or(0, str::len) + 64)
            .sum();
        let size = (env + labels + history) as u64;
        let limit = kiln_image::config::MAX_CONFIG_SIZE;
        if size > limit {
            return Err(self.located(
                line,
                "",
                format!(
                    "the image config would be about {} MiB, more than the limit of {} MiB (ENV, LABEL and ARG values, and the history that records them)",
                    size >> 20,
                    limit >> 20
                ),
            ));
        }
        Ok(())
    }

    async fn run_stage(self: Arc<Self>, index: usize) -> Result<Arc<StageState>, BuildError> {
        let stage: Stage = self.df.stages[index].clone();
        let planned = self
            .plan
            .stage(index)
            .cloned()
            .ok_or_else(|| BuildError::internal("plan", "stage missing"))?;
        let label = self.stage_label(index);
        let total = stage.instructions.len() + 1;
        if let Some(p) = &stage.platform {
            check_platform(&self.expand(
                p,
                &plan::global_env(&self.plan.global_args),
                stage.line,
            )?)
            .map_err(|m| BuildError::at(stage.line, m))?;
        }
        let mut state = match &planned.base {
            Base::Scratch => scratch_state(),
            Base::Stage(j) => {
                let base = self.stage_result(*j).await.map_err(unwrap_arc)?;
                let mut s = (*base).clone();
                s.cmd_set = false;
                s
            }
            Base::Image(reference)
                if matches!(
                    self.opts.named_contexts.get(reference),
                    Some(crate::contexts::NamedContext::Dir(_))
                ) =>
            {
                self.clone()
                    .dir_base_state(reference, &label, total, stage.line)
                    .await?
            }
            Base::Image(reference) => {
                let id = self
                    .progress
                    .start(format!("[{label} 1/{total}] FROM {reference}"));
                let t = Instant::now();
                let base = self
                    .image_state(reference, stage.line)
                    .await
                    .inspect_err(|e| {
                        self.progress.send(Event::Failed {
                            id,
                            error: e.to_string(),
                        })
                    })?;
                self.progress.done(id, t.elapsed());
                (*base).clone()
            }
        };
        // ONBUILD triggers of the base run first, then are dropped.
        let triggers = state
            .config
            .config
            .as_mut()
            .and_then(|c| c.on_build.take())
            .unwrap_or_default();
        for trigger in triggers {
            let parsed =
                kiln_parser::parse(&format!("FROM scratch\n{trigger}\n")).map_err(|e| {
                    BuildError::at(
                        stage.line,
                        format!("invalid ONBUILD trigger {trigger:?}: {e}"),
                    )
                })?;
            for instr in parsed.stages.into_iter().flat_map(|s| s.instructions) {
                let instr = Instruction {
                    line: stage.line,
                    end_line: stage.line,
                    ..instr
                };
                self.clone()
                    .dispatch(index, &label, 0, total, &mut state, &instr)
                    .await?;
            }
        }
        for (n, instr) in stage.instructions.iter().enumerate() {
            if self.cancel.is_cancelled() {
                return Err(BuildError::Cancelled);
            }
            self.clone()
                .dispatch(index, &label, n + 2, total, &mut state, instr)
                .await?;
        }
        Ok(Arc::new(state))
    }

    /// Resolves an image reference to a stage state (once per build).
    async fn image_state(
        &self,
        reference: &str,
        line: usize,
    ) -> Result<Arc<StageState>, BuildError> {
        let reference = &*self.named_image(reference, line)?;
        let cell = {
            let mut m = self
                .images
                .lock()
                .map_err(|_| BuildError::internal("lock", "poisoned"))?;
            m.entry(reference.to_string()).or_default().clone()
        };
        let reference = reference.to_string();
        let backend = self.backend.clone();
        cell.get_or_try_init(|| async move {
            let r = reference.clone();
            let img = blocking(move || backend.resolve_image(&r)).await?;
            let Some(img) = img else {
                return Err(BuildError::at(
                    line,
                    format!(
                        "{reference}: image not found in the local store (import or load it first, e.g. `kiln import rootfs.tar {reference}`)"
                    ),
                ));
            };
            let mut config = img.config.clone();
            let has_path = env_pairs(&config).iter().any(|(k, _)| k == "PATH");
            if !has_path {
                config
                    .config_mut()
                    .env
                    .get_or_insert_with(Vec::new)
                    .push(format!("PATH={}", kiln_executor::DEFAULT_PATH));
            }
            Ok(Arc::new(StageState {
                env: env_pairs(&config),
                config,
                layers: img.layers.clone(),
                key: {
                    let mut k = KeyHasher::new("image");
                    k.field(&img.manifest_digest);
                    k.finish()
                },
                args: Vec::new(),
                cmd_set: false,
                base_history: config_history_len(&img.config),
                newest: None,
            }))
        })
        .await
        .cloned()
    }

    #[allow(clippy::too_many_arguments)]
    async fn dispatch(
        self: Arc<Self>,
        stage: usize,
        label: &str,
        n: usize,
        total: usize,
        state: &mut StageState,
        instr: &Instruction,
    ) -> Result<(), BuildError> {
        let line = instr.line;
        let created = self.created.clone();
        let name = if n == 0 {
            format!("[{label} ONBUILD] {}", instr.original.trim())
        } else {
            format!("[{label} {n}/{total}] {}", instr.original.trim())
        };
        match &instr.kind {
            Kind::Env { vars } => {
                let mut msg = String::from("ENV");
                for kv in vars {
                    let k = self.expand(&kv.key, &state.env, line)?;
                    let v = self.expand(&kv.value, &state.env, line)?;
                    msg.push_str(&format!(" {k}={v}"));
                    state.set_env(&k, &v);
                }
                state.config.push_empty(history(&created, msg));
                self.check_config_growth(state, line)?;
            }
            Kind::Label { labels } => {
                let mut msg = String::from("LABEL");
                for kv in labels {
                    let k = self.expand(&kv.key, &state.env, line)?;
                    let v = self.expand(&kv.value, &state.env, line)?;
                    msg.push_str(&format!(" {k}={v}"));
                    state
                        .config
                        .config_mut()
                        .labels
                        .get_or_insert_with(BTreeMap::new)
                        .insert(k, v);
                }
                state.config.push_empty(history(&created, msg));
                self.check_config_growth(state, line)?;
            }
            Kind::Arg { args } => {
                let mut parts = Vec::new();
                for def in args {
                    let key = self.expand(&def.key, &state.env, line)?;
                    let mut value = match (self.opts.build_args.get(&key), &def.default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(d)) => Some(self.expand(d, &state.env, line)?),
                        (None, None) => None,
                    };
                    if value.is_none() {
                        value = self
                            .plan
                            .global_args
                            .iter()
                            .rev()
                            .find(|(k, _)| *k == key)
                            .and_then(|(_, v)| v.clone())
                            .or_else(|| {
                                plan::platform_args()
                                    .into_iter()
                                    .find(|(k, _)| *k == key)
                                    .map(|(_, v)| v)
                            });
                    }
                    if let Some(v) = &value {
                        state.env.push((key.clone(), v.clone()));
                        parts.push(format!("{key}={v}"));
                    } else {
                        parts.push(key.clone());
                    }
                    state.args.retain(|(k, _)| *k != key);
                    state.args.push((key, value));
                }
                state
                    .config
                    .push_empty(history(&created, format!("ARG {}", parts.join(" "))));
                self.check_config_growth(state, line)?;
            }
            Kind::Maintainer { name } => {
                state.config.author = Some(name.clone());
                state
                    .config
                    .push_empty(history(&created, format!("MAINTAINER {name}")));
            }
            Kind::User { user } => {
                let u = self.expand(user, &state.env, line)?;
                state.config.config_mut().user = Some(u.clone());
                state
                    .config
                    .push_empty(history(&created, format!("USER {u}")));
            }
            Kind::Stopsignal { signal } => {
                let s = self.expand(signal, &state.env, line)?;
                validate_signal(&s).map_err(|m| BuildError::at(line, m))?;
                state.config.config_mut().stop_signal = Some(s.clone());
                state
                    .config
                    .push_empty(history(&created, format!("STOPSIGNAL {s}")));
            }
            Kind::Volume { volumes } => {
                let mut vs = Vec::new();
                for v in volumes {
                    let v = self.expand(v, &state.env, line)?;
                    if v.is_empty() {
                        return Err(BuildError::at(
                            line,
                            "VOLUME specified can not be an empty string",
                        ));
                    }
                    state
                        .config
                        .config_mut()
                        .volumes
                        .get_or_insert_with(BTreeMap::new)
                        .insert(v.clone(), Default::default());
                    vs.push(v);
                }
                state
                    .config
                    .push_empty(history(&created, format!("VOLUME [{}]", vs.join(" "))));
            }
            Kind::Expose { ports } => {
                let env = state.env.clone();
                let mut specs = Vec::new();
                for p in ports {
                    let words = self
                        .lex
                        .process_words(p, &env)
                        .map_err(|e| BuildError::at(line, e.to_string()))?;
                    for w in words {
                        specs.extend(parse_ports(&w).map_err(|m| BuildError::at(line, m))?);
                    }
                }
                specs.sort();
                specs.dedup();
                for s in &specs {
                    state
                        .config
                        .config_mut()
                        .exposed_ports
                        .get_or_insert_with(BTreeMap::new)
                        .insert(s.clone(), Default::default());
                }
                state
                    .config
                    .push_empty(history(&created, format!("EXPOSE [{}]", specs.join(" "))));
            }
            Kind::Shell { shell } => {
                state.config.config_mut().shell = Some(shell.clone());
                state
                    .config
                    .push_empty(history(&created, format!("SHELL [{}]", shell.join(" "))));
            }
            Kind::Onbuild { expression, .. } => {
                state
                    .config
                    .config_mut()
                    .on_build
                    .get_or_insert_with(Vec::new)
                    .push(expression.clone());
            }
            Kind::Cmd(cl) => {
                let args = shell_wrap(cl, &state.shell());
                state.config.config_mut().cmd = Some(args.clone());
                state.cmd_set = true;
                state
                    .config
                    .push_empty(history(&created, format!("CMD {}", go_quote_list(&args))));
            }
            Kind::Entrypoint(cl) => {
                let args = shell_wrap(cl, &state.shell());
                let c = state.config.config_mut();
                c.entrypoint = if args.is_empty() {
                    None
                } else {
                    Some(args.clone())
                };
                if !state.cmd_set {
                    c.cmd = None;
                }
                state.config.push_empty(history(
                    &created,
                    format!("ENTRYPOINT {}", go_quote_list(&args)),
                ));
            }
            Kind::Healthcheck(h) => {
                let hc = Healthcheck {
                    test: Some(h.test.clone()),
                    interval: h.interval.map(|d| d.as_nanos() as i64),
                    timeout: h.timeout.map(|d| d.as_nanos() as i64),
                    start_period: h.start_period.map(|d| d.as_nanos() as i64),
                    start_interval: h.start_interval.map(|d| d.as_nanos() as i64),
                    retries: h.retries.map(i64::from),
                };
                let msg = format!(
                    "HEALTHCHECK &{{Test:[{}] Interval:{} Timeout:{} StartPeriod:{} StartInterval:{} Retries:{}}}",
                    h.test.join(" "),
                    go_duration(h.interval),
                    go_duration(h.timeout),
                    go_duration(h.start_period),
                    go_duration(h.start_interval),
                    h.retries.unwrap_or(0)
                );
                state.config.config_mut().healthcheck = Some(hc);
                state.config.push_empty(history(&created, msg));
            }
            Kind::Workdir { path } => {
                let p = self.expand(path, &state.env, line)?;
                let wd = join_abs(&state.workdir(), &p);
                state.config.config_mut().working_dir = Some(wd.clone());
                let msg = format!("WORKDIR {wd}");
                if wd == "/" {
                    state.config.push_empty(history(&created, msg));
                } else {
                    let mut k = KeyHasher::new("mkdir");
                    k.field(&state.key)
                        .field(&wd)
                        .field(state.user().unwrap_or_default());
                    let key = k.finish();
                    let user = state.user();
                    let dir = wd.clone();
                    let layer = self
                        .clone()
                        .layer_step(&name, state, key, move |view| {
                            let owner = match &user {
                                Some(u) => resolve_owner(view, u)?,
                                None => (0, 0),
                            };
                            let resolved = view.resolve(&dir, true).map_err(|e| e.to_string())?;
                            view.ensure_dir(&resolved, owner)
                                .map_err(|e| e.to_string())?;
                            Ok(())
                        })
                        .await?;
                    push_layer(state, layer, history(&created, msg));
                }
            }
            Kind::Run(run) => {
                self.clone()
                    .run_step(stage, &name, state, instr, run)
                    .await?;
            }
            Kind::Copy(c) => {
                // The stage's ARG/ENV values over the global ARGs, as the
                // plan expanded it (plan::track_stage_env).
                let from = match &c.from {
                    Some(f) => {
                        let mut env = plan::global_env(&self.plan.global_args);
                        env.extend(state.env.iter().cloned());
                        Some(self.expand(f, &env, line)?)
                    }
                    None => None,
                };
                self.clone()
                    .copy_step(
                        stage,
                        &name,
                        state,
                        instr,
                        CopySpec {
                            add: false,
                            from,
                            paths: &c.paths,
                            chown: c.chown.as_deref(),
                            chmod: c.chmod.as_deref(),
                            excludes: &c.excludes,
                            link: c.link,
                            parents: c.parents,
                            checksum: None,
                            keep_git_dir: false,
                            unpack_remote: false,
                        },
                    )
                    .await?;
            }
            Kind::Add(a) => {
                self.clone()
                    .copy_step(
                        stage,
                        &name,
                        state,
                        instr,
                        CopySpec {
                            add: a.unpack != Some(false),
                            from: None,
                            paths: &a.paths,
                            chown: a.chown.as_deref(),
                            chmod: a.chmod.as_deref(),
                            excludes: &a.excludes,
                            link: a.link,
                            parents: false,
                            checksum: a.checksum.as_deref(),
                            keep_git_dir: a.keep_git_dir == Some(true),
                            unpack_remote: a.unpack == Some(true),
                        },
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Runs (or takes from the cache) one layer-producing step whose work
    /// is `work` on the writable view of a fresh snapshot.
    async fn layer_step<F>(
        self: Arc<Self>,
        name: &str,
        state: &StageState,
        key: String,
        work: F,
    ) -> Result<LayerRecord, BuildError>
    where
        F: FnOnce(&LayerView) -> Result<(), String> + Send + 'static,
    {
        let id = self.progress.start(name.to_string());
        let t = Instant::now();
        let parent = state.top().map(str::to_string);
        let me = self.clone();
        let k = key.clone();
        let r = self
            .single_flight(&key, async move {
                if let Some(hit) = me.cache_lookup(&k).await? {
                    return Ok((hit, true));
                }
                let backend = me.backend.clone();
                let opts = me.diff_options();
                let layer = blocking(move || {
                    let active = backend.prepare(parent.as_deref())?;
                    let view = LayerView::new(active.layers.clone(), false);
                    if let Err(e) = work(&view) {
                        backend.abort(active);
                        return Err(e);
                    }
                    backend.commit(active, &k, &opts)
                })
                .await?;
                Ok((layer, false))
            })
            .await;
        self.finish(id, t, r)
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
                .map_err(|_| BuildError::internal("lock", "poisoned"))?;
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

    async fn run_step(
        self: Arc<Self>,
        _stage: usize,
        name: &str,
        state: &mut StageState,
        instr: &Instruction,
        run: &kiln_parser::instructions::Run,
    ) -> Result<(), BuildError> {
        let line = instr.line;
        let insecure = match run.security.as_deref() {
            Some("insecure") if self.opts.allow_insecure => true,
            Some("insecure") => {
                return Err(BuildError::at(
                    line,
                    "RUN --security=insecure is not allowed: pass `--allow security.insecure` to kiln build",
                ))
            }
            _ => false,
        };
        let run_mounts = self.plan_mounts(_stage, state, &run.mounts, line).await?;
        let args = run_args(&run.command, &state.shell()).map_err(|m| BuildError::at(line, m))?;
        let script = shebang_script(&run.command);
        let network = match run.network.as_deref() {
            Some("none") => NetworkMode::None,
            Some("host") => NetworkMode::Host,
            _ => self.opts.network,
        };
        // Proxy args reach the step without being declared, outside the key.
        let mut env = state.run_env();
        let mut key = KeyHasher::new("run");
        key.field(&state.key)
            .fields(&args)
            .fields(env.iter().map(|(k, v)| format!("{k}={v}")))
            .field(state.workdir())
            .field(state.user().unwrap_or_default())
            .field(if network == NetworkMode::None {
                "none"
            } else {
                "host"
            });
        if !run.mounts.is_empty() {
            key.field("mounts").fields(&run_mounts.key);
        }
        if let Some((name, data)) = &script {
            key.field("script").field(name).field(data);
        }
        if insecure {
            key.field("security=insecure");
        }
        let key = key.finish();
        for p in PROXY_ARGS {
            if let Some(v) = self.opts.build_args.get(p) {
                if !env.iter().any(|(k, _)| k == p) {
                    env.push((p.to_string(), v.clone()));
                }
            }
        }
        let history_args: Vec<(String, Option<String>)> = state.args.clone();
        let created_by = format!(
            "RUN {}",
            run_command_string(&args, &history_args, &state.run_env())
        );

        let id = self.progress.start(name.to_string());
        let t = Instant::now();
        let me = self.clone();
        let parent = state.top().map(str::to_string);
        let workdir = state.workdir();
        let user = state.user();
        let step_name = instr.original.trim().to_string();
        let k = key.clone();
        let r = self
            .single_flight(&key, async move {
                if let Some(hit) = me.cache_lookup(&k).await? {
                    return Ok((hit, true));
                }
                let backend = me.backend.clone();
                let prepared = if run_mounts.is_empty() {
                    mounts::Prepared::default()
                } else {
                    let backend = me.backend.clone();
                    let rm = run_mounts.clone();
                    blocking(move || rm.prepare(backend.as_ref()))
                        .await
                        .map_err(|e| match e {
                            BuildError::Internal(m) => BuildError::at(line, m),
                            other => other,
                        })?
                };
                let active = blocking(move || backend.prepare(parent.as_deref())).await?;
                let run_mount_list = {
                    let layers = active.layers.clone();
                    let ms = prepared.mounts.clone();
                    blocking(move || resolve_mount_targets(&layers, ms))
                        .await
                        .map_err(|e| match e {
                            BuildError::Internal(m) => BuildError::at(line, m),
                            other => other,
                        })?
                };
                let mut spec = kiln_executor::default_spec(args.clone());
                if let Some(p) = spec.process_mut() {
                    let mut all = env.clone();
                    for (k, v) in &prepared.env {
                        all.retain(|(ek, _)| ek != k);
                        all.push((k.clone(), v.clone()));
                    }
                    p.set_env(Some(all.iter().map(|(k, v)| format!("{k}={v}")).collect()));
                    p.set_cwd(PathBuf::from(&workdir));
                }
                if !run_mount_list.is_empty() {
                    let mut ms = spec.mounts().clone().unwrap_or_default();
                    ms.extend(run_mount_list);
                    spec.set_mounts(Some(ms));
                }
                // Kept alive until the step is over.
                let _script_dir = match &script {
                    Some((name, data)) => {
                        let (dir, m) =
                            script_mount(name, data).map_err(|msg| BuildError::at(line, msg))?;
                        let mut ms = spec.mounts().clone().unwrap_or_default();
                        ms.push(m);
                        spec.set_mounts(Some(ms));
                        Some(dir)
                    }
                    None => None,
                };
                if insecure {
                    mounts::make_insecure(&mut spec);
                }
                kiln_executor::set_network(&mut spec, network);
                apply_limits(&mut spec, &me.opts.limits);
                let mut req = ExecRequest::new(step_name.clone(), spec, active.mounts.clone());
                req.user = user.clone();
                req.files = prepared.files.clone();
                let (tx, mut rx) = tokio::sync::mpsc::channel::<OutputLine>(256);
                let progress = me.progress.clone();
                let started = Instant::now();
                let log_limit = me.opts.step_log_limit;
                let forward = tokio::spawn(async move {
                    // Each stream clipped on its own, as BuildKit does;
                    // past the clip lines are read (the step runs on) and
                    // dropped, and `log` waits for the renderer, so memory
                    // stays flat however much the step prints.
                    let mut clips = [
                        crate::progress::LogClip::new(log_limit),
                        crate::progress::LogClip::new(log_limit),
                    ];
                    while let Some(l) = rx.recv().await {
                        let (stream, clip) = match l.stream {
                            kiln_executor::Stream::Stdout => ("stdout", &mut clips[0]),
                            kiln_executor::Stream::Stderr => ("stderr", &mut clips[1]),
                        };
                        let Some((keep, note)) = clip.admit(l.bytes.len(), l.newline) else {
                            continue;
                        };
                        let elapsed = started.elapsed().as_secs_f64();
                        let kept = (keep > 0 || note.is_none()).then(|| {
                            let bytes = &l.bytes[..keep.min(l.bytes.len())];
                            String::from_utf8_lossy(bytes)
                                .trim_end_matches(['\n', '\r'])
                                .to_string()
                        });
                        for line in kept.into_iter().chain(note) {
                            progress
                                .log(Event::Log {
                                    id,
                                    stream,
                                    line,
                                    elapsed,
                                })
                                .await;
                        }
                    }
                });
                let outcome = me
                    .executor
                    .run(req, Some(tx), me.cancel.child_token())
                    .await;
                let _ = forward.await;
                drop(prepared);
                let failure = match &outcome {
                    Ok(o) if o.status.success() => None,
                    Ok(o) => Some(BuildError::Run {
                        line,
                        command: args.join(" "),
                        status: o.status.to_string(),
                        tail: o
                            .tail
                            .iter()
                            .map(|l| {
                                String::from_utf8_lossy(&l.bytes)
                                    .trim_end_matches(['\n', '\r'])
                                    .to_string()
                            })
                            .collect(),
                    }),
                    Err(e) => Some(BuildError::at(line, e.to_string())),
                };
                if let Some(err) = failure {
                    // The writable snapshot of a failed step is dropped.
                    let backend = me.backend.clone();
                    let _ = blocking(move || {
                        backend.abort(active);
                        Ok(())
                    })
                    .await;
                    return Err(if me.cancel.is_cancelled() {
                        BuildError::Cancelled
                    } else {
                        err
                    });
                }
                let backend = me.backend.clone();
                let opts = me.diff_options();
                let layer = blocking(move || backend.commit(active, &k, &opts)).await?;
                Ok((layer, false))
            })
            .await;
        let layer = self.finish(id, t, r)?;
        push_layer(state, layer, history(&self.created, created_by));
        Ok(())
    }

    /// The layer view of another stage or an image, for COPY --from.
    async fn source_view(
        &self,
        stage: usize,
        from: &str,
        line: usize,
    ) -> Result<LayerView, BuildError> {
        let state = match plan::resolve_source(&self.df, stage, from) {
            Source::Stage(j) => self.stage_result(j).await.map_err(unwrap_arc)?,
            Source::Image(r) => {
                if let Some(crate::contexts::NamedContext::Dir(d)) =
                    self.opts.named_contexts.get(&r)
                {
                    return Ok(LayerView::new(vec![d.clone()], true));
                }
                self.image_state(&r, line).await?
            }
        };
        let Some(top) = state.top().map(str::to_string) else {
            return Ok(LayerView::new(Vec::new(), false));
        };
        let backend = self.backend.clone();
        let dirs = blocking(move || backend.layer_dirs(&top)).await?;
        Ok(LayerView::new(dirs, false))
    }

    async fn copy_step(
        self: Arc<Self>,
        stage: usize,
        name: &str,
        state: &mut StageState,
        instr: &Instruction,
        spec: CopySpec<'_>,
    ) -> Result<(), BuildError> {
        let line = instr.line;
        let env = state.env.clone();
        let mut sources = Vec::new();
        for s in &spec.paths.sources {
            sources.push(self.expand(s, &env, line)?);
        }
        let dest_raw = self.expand(&spec.paths.dest, &env, line)?;
        let dest = join_abs(&state.workdir(), &dest_raw);
        let dest_is_dir =
            dest_raw.ends_with('/') || dest_raw.ends_with("/.") || dest_raw == "." || spec.parents;
        let chown = match spec.chown {
            Some(c) => Some(self.expand(c, &env, line)?),
            None => None,
        };
        let chmod = match spec.chmod {
            Some(c) => Some(
                crate::chmod::Chmod::parse(&self.expand(c, &env, line)?)
                    .map_err(|m| BuildError::at(line, m))?,
            ),
            None => None,
        };
        let excludes = spec
            .excludes
            .iter()
            .map(|e| self.expand(e, &env, line))
            .collect::<Result<Vec<_>, _>>()?;
        let exclude = if excludes.is_empty() {
            None
        } else {
            Some(
                PatternMatcher::new(&excludes)
                    .map_err(|e| BuildError::at(line, format!("--exclude: {e}")))?,
            )
        };
        // A named directory context is read like the build context (files
        // owned by root), without the context's .dockerignore.
        let named_dir = spec.from.as_ref().is_some_and(|f| {
            matches!(
                self.opts.named_contexts.get(f),
                Some(crate::contexts::NamedContext::Dir(_))
            )
        });
        let (view, from_context) = match &spec.from {
            Some(f) => (self.source_view(stage, f, line).await?, false),
            None => (LayerView::new(vec![self.opts.context.clone()], true), true),
        };
        // Select and hash off the async threads.
        let backend = self.backend.clone();
        let ignore = if from_context {
            self.ignore.clone()
        } else {
            None
        };
        let (src, fetched) = if spec.add || spec.checksum.is_some() {
            let checksum = match spec.checksum {
                Some(c) => Some(self.expand(c, &env, line)?),
                None => None,
            };
            self.fetch_remote_sources(&sources, checksum.as_deref(), spec.keep_git_dir, line)
                .await?
        } else {
            (sources.clone(), Vec::new())
        };
        let picks: Vec<(PathBuf, String, bool)> = fetched
            .iter()
            .map(|f| (f.dir.path().to_path_buf(), f.select.clone(), f.hash_content))
            .collect();
        let mut key = KeyHasher::new(if spec.add { "add" } else { "copy" });
        for f in &fetched {
            key.field("remote").field(&f.identity);
        }
        // A --link layer does not depend on the chain below it.
        key.field(if spec.link { "link" } else { &state.key })
            .field(&dest)
            .field(if dest_is_dir { "dir" } else { "path" })
            .field(chown.clone().unwrap_or_default())
            .field(chmod.as_ref().map(|m| m.to_string()).unwrap_or_default())
            .fields(&excludes);
        match &spec.from {
            Some(_) => {
                // The selected files' content and metadata are hashed below:
                // no local path may enter the key (it must match on
                // another machine sharing the cache).
                key.field("from");
            }
            None => {
                key.field("context");
            }
        }
        for c in &spec.paths.contents {
            key.field("heredoc")
                .field(&c.path)
                .field(&c.data)
                .field(if c.expand { "1" } else { "0" });
        }
        let view2 = view.clone();
        let parents = spec.parents;
        key.field(if parents { "parents" } else { "" });
        // A plain COPY from the context may hard-link the files it shares
        // with its previous run: find that run by the step's shape (the key
        // without the content).
        let reusable = from_context && !spec.add && !spec.link && fetched.is_empty();
        let shape = {
            let mut k = KeyHasher::new("copy-shape");
            k.field(&state.key)
                .field(&dest)
                .field(if dest_is_dir { "dir" } else { "path" })
                .field(chown.clone().unwrap_or_default())
                .field(chmod.as_ref().map(|m| m.to_string()).unwrap_or_default())
                .fields(&excludes)
                .fields(&sources)
                .field(if parents { "parents" } else { "" });
            k.finish()
        };
        // Only the previous run's record is looked up here; its index is
        // read by the copy itself, which a cache hit never runs.
        let prev_layer = if reusable && !self.opts.no_cache {
            let backend = self.backend.clone();
            let sk = shape.clone();
            blocking(move || backend.cache_get(&sk))
                .await
                .unwrap_or(None)
        } else {
            None
        };
        let prev_snapshot = prev_layer.as_ref().map(|l| l.snapshot.clone());
        let ((selections, fetched_sel, src_hashes), key) = blocking(move || {
            let selector = Selector {
                view: &view2,
                ignore: ignore.as_ref(),
                exclude: exclude.as_ref(),
            };
            let mut all: Vec<Selection> = Vec::new();
            if parents {
                all.push(
                    crate::parents::select_parents(&selector, &src).map_err(|e| e.to_string())?,
                );
            } else {
                for s in &src {
                    all.extend(selector.select(s).map_err(|e| e.to_string())?);
                }
            }
            let src_hashes = crate::copy::hash_selection_map(
                &mut key,
                &all,
                backend.hash_cache(),
                !from_context && !named_dir,
            )
            .map_err(|e| e.to_string())?;
            let mut fetched_sel: Vec<Selection> = Vec::new();
            for (dir, pick, hash_content) in &picks {
                let v = LayerView::new(vec![dir.clone()], true);
                let sel = Selector {
                    view: &v,
                    ignore: None,
                    exclude: exclude.as_ref(),
                };
                let picked = sel.select(pick).map_err(|e| e.to_string())?;
                if *hash_content {
                    hash_selection(&mut key, &picked, &crate::copy::NoHashCache, false)
                        .map_err(|e| e.to_string())?;
                }
                fetched_sel.extend(picked);
            }
            Ok(((all, fetched_sel, src_hashes), key.finish()))
        })
        .await
        .map_err(|e| match e {
            BuildError::Internal(m) => BuildError::at(line, m),
            other => other,
        })?;
        let mut contents = Vec::new();
        for c in &spec.paths.contents {
            let data = if c.expand {
                self.lex
                    .skip_process_quotes(true)
                    .process_word(&c.data, &env)
                    .map_err(|e| BuildError::at(line, e.to_string()))?
            } else {
                c.data.clone()
            };
            contents.push((c.path.clone(), data));
        }
        let created_by = copy_created_by(
            spec.add,
            &spec,
            &sources,
            &contents,
            &dest_raw,
            chown.as_deref(),
        );
        let opts = CopyOptions {
            owner: None,
            keep_owner: !from_context && !named_dir,
            chmod,
            clamp_mtime: self.opts.source_date_epoch,
            reuse: None,
        };
        let reuse_backend = self.backend.clone();
        let add = spec.add;
        let link = spec.link;
        let unpack_remote = spec.unpack_remote;
        let work = move |dst: &LayerView| {
            let mut opts = opts;
            if reusable {
                let prev = prev_layer.and_then(|layer| {
                    let dir = reuse_backend
                        .layer_dirs(&layer.snapshot)
                        .ok()?
                        .into_iter()
                        .next()?;
                    let index = crate::copy::Reuse::load_index(&dir)?;
                    Some((dir, index))
                });
                opts.reuse = Some(std::sync::Arc::new(crate::copy::Reuse {
                    src_hashes,
                    prev,
                    written: Default::default(),
                }));
            }
            if let Some(c) = &chown {
                opts.owner = Some(resolve_owner(dst, c)?);
            }
            // Downloads are not unpacked unless --unpack=true.
            if unpack_remote {
                crate::archive::add_selections(dst, &dest, dest_is_dir, &fetched_sel, &opts)
                    .map_err(|e| e.to_string())?;
            } else if !fetched_sel.is_empty() {
                copy_selections(dst, &dest, dest_is_dir, &fetched_sel, &opts)
                    .map_err(|e| e.to_string())?;
            }
            drop(fetched);
            if selections.is_empty() {
                // Only remote sources (or heredocs).
            } else if add {
                crate::archive::add_selections(dst, &dest, dest_is_dir, &selections, &opts)
                    .map_err(|e| e.to_string())?;
            } else {
                copy_selections(dst, &dest, dest_is_dir, &selections, &opts)
                    .map_err(|e| e.to_string())?;
                if let (Some(r), Some(top)) = (&opts.reuse, dst.top()) {
                    r.store_index(top).map_err(|e| e.to_string())?;
                }
            }
            for (name, data) in &contents {
                crate::archive::write_inline(
                    dst,
                    &dest,
                    dest_is_dir || contents.len() > 1,
                    name,
                    data,
                    &opts,
                )
                .map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        let layer = if link {
            self.clone().link_step(name, state, key, work).await
        } else {
            self.clone().layer_step(name, state, key, work).await
        }
        .map_err(|e| match e {
            BuildError::Internal(m) => BuildError::at(line, m),
            other => other,
        })?;
        // A fully cached COPY whose shape already names this layer writes
        // nothing.
        if reusable && prev_snapshot.as_deref() != Some(layer.snapshot.as_str()) {
            let backend = self.backend.clone();
            let l = layer.clone();
            // Best effort: without the alias the next run copies everything.
            let _ = blocking(move || backend.cache_alias(&shape, &l)).await;
        }
        push_layer(state, layer, history(&self.created, created_by));
        Ok(())
    }
}

struct CopySpec<'a> {
    add: bool,
    from: Option<String>,
    paths: &'a kiln_parser::instructions::SourcesAndDest,
    chown: Option<&'a str>,
    chmod: Option<&'a str>,
    excludes: &'a [String],
    link: bool,
    parents: bool,
    /// ADD `--checksum` (remote sources only).
    checksum: Option<&'a str>,
    /// ADD `--keep-git-dir`.
    keep_git_dir: bool,
    /// ADD `--unpack=true`: remote archives are unpacked too.
    unpack_remote: bool,
}

fn copy_created_by(
    add: bool,
    spec: &CopySpec<'_>,
    sources: &[String],
    contents: &[(String, String)],
    dest: &str,
    chown: Option<&str>,
) -> String {
    let mut m = String::from(if add { "ADD" } else { "COPY" });
    if let Some(c) = chown {
        m.push_str(&format!(" --chown={c}"));
    }
    if let Some(c) = spec.chmod {
        m.push_str(&format!(" --chmod={c}"));
    }
    if let Some(f) = &spec.from {
        m.push_str(&format!(" --from={f}"));
    }
    if spec.parents {
        m.push_str(" --parents");
    }
    for s in sources {
        m.push(' ');
        m.push_str(s);
    }
    for (p, _) in contents {
        m.push_str(&format!(" <<{p}"));
    }
    m.push(' ');
    m.push_str(dest);
    m.push_str(" # buildkit");
    m
}

/// The state of `FROM scratch`.
fn scratch_state() -> StageState {
    let mut config = ImageConfig::new(&Platform::host());
    config.config_mut().env = Some(vec![format!("PATH={}", kiln_executor::DEFAULT_PATH)]);
    StageState {
        env: env_pairs(&config),
        config,
        layers: Vec::new(),
        key: KeyHasher::new("scratch").finish(),
        args: Vec::new(),
        cmd_set: false,
        base_history: 0,
        newest: None,
    }
}

fn config_history_len(c: &ImageConfig) -> usize {
    c.history.len()
}

fn push_layer(state: &mut StageState, layer: LayerRecord, h: History) {
    state.newest = state.newest.max(Some(layer.created));
    state.key = {
        let mut k = KeyHasher::new("chain");
        k.field(&state.key).field(layer.diff_id.as_str());
        k.finish()
    };
    state.config.push_layer(layer.diff_id.clone(), h);
    state.layers.push(layer);
}

fn env_pairs(config: &ImageConfig) -> Vec<(String, String)> {
    config
        .config
        .as_ref()
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (e, String::new()),
        })
        .collect()
}

/// CMD/ENTRYPOINT: the shell form is wrapped in the current SHELL.
fn shell_wrap(cl: &CommandLine, shell: &[String]) -> Vec<String> {
    if cl.prepend_shell {
        let mut v = shell.to_vec();
        v.push(cl.args.join(" "));
        v
    } else {
        cl.args.clone()
    }
}

/// `RUN --mount` targets resolved inside the step's root (its layers, top
/// first), as runc resolves a mount destination: a target below a symlink
/// in the image mounts at the link's target inside the image, the link
/// stays, and the mount point the executor makes for it is made there
/// (not as a directory shadowing the link).
fn resolve_mount_targets(
    layers: &[PathBuf],
    mut mounts: Vec<kiln_executor::oci::Mount>,
) -> Result<Vec<kiln_executor::oci::Mount>, String> {
    let view = LayerView::new(layers.to_vec(), false);
    for m in &mut mounts {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let dest = m.destination().as_os_str().as_bytes().to_vec();
        let resolved = view
            .resolve(crate::fsview::clean_bytes(&dest), true)
            .map_err(|e| format!("mount target {}: {e}", crate::fsview::show(&dest)))?;
        m.set_destination(PathBuf::from(std::ffi::OsString::from_vec(resolved)));
    }
    Ok(mounts)
}

/// RUN's argv: heredocs become the script, the shell form is wrapped.
/// Where a `RUN <<EOF` script with a `#!` line is mounted.
const PIPES: &str = "/dev/pipes";

/// The `#!` script of a single-heredoc RUN: (file name, content).
fn shebang_script(cl: &CommandLine) -> Option<(String, String)> {
    let arg = cl.args.first()?;
    if cl.files.len() != 1 || cl.args.len() != 1 || !cl.prepend_shell {
        return None;
    }
    kiln_parser::parse_heredoc(arg).ok().flatten()?;
    let f = &cl.files[0];
    let data = f.chomped_content();
    data.starts_with("#!").then(|| (f.name.clone(), data))
}

/// Writes a `#!` heredoc script to a private directory outside the store
/// and returns it with the read-only bind mount that shows it at
/// `/dev/pipes/NAME`.
fn script_mount(
    name: &str,
    data: &str,
) -> Result<(tempfile::TempDir, kiln_executor::oci::Mount), String> {
    let dir = tempfile::Builder::new()
        .prefix("kiln-heredoc-")
        .tempdir()
        .map_err(|e| format!("heredoc script: {e}"))?;
    let file = dir.path().join("script");
    kiln_fs::Root::open(dir.path())
        .and_then(|r| r.dir().write_file("script", data.as_bytes(), 0o755, None))
        .map_err(|e| format!("heredoc script: {e}"))?;
    let m = kiln_executor::oci::MountBuilder::default()
        .destination(PathBuf::from(format!("{PIPES}/{name}")))
        .typ("bind")
        .source(file)
        .options(vec!["rbind".to_string(), "ro".to_string()])
        .build()
        .map_err(|e| format!("heredoc script mount: {e}"))?;
    Ok((dir, m))
}

fn run_args(cl: &CommandLine, shell: &[String]) -> Result<Vec<String>, String> {
    let mut args = cl.args.clone();
    if !cl.files.is_empty() {
        if args.len() != 1 || !cl.prepend_shell {
            return Err(format!("parsing produced an invalid run command: {args:?}"));
        }
        if let Ok(Some(_)) = kiln_parser::parse_heredoc(&args[0]) {
            let f = &cl.files[0];
            let data = f.chomped_content();
            if data.starts_with("#!") {
                // BuildKit runs such a script as a file at /dev/pipes/NAME
                // (mounted read-only by run_step).
                args = vec![format!("{PIPES}/{}", f.name)];
            } else {
                args = vec![data];
            }
        } else {
            let mut s = args[0].clone();
            for f in &cl.files {
                s.push('\n');
                s.push_str(&f.content);
                s.push_str(&f.name);
            }
            args = vec![s];
        }
    }
    if cl.prepend_shell {
        let mut v = shell.to_vec();
        v.push(args.join(" "));
        return Ok(v);
    }
    Ok(args)
}

/// BuildKit's `runCommandString`: `|N K=V … cmd` when build args are set.
fn run_command_string(
    args: &[String],
    build_args: &[(String, Option<String>)],
    env: &[(String, String)],
) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (k, v) in build_args {
        let value = env
            .iter()
            .rev()
            .find(|(ek, _)| ek == k)
            .map(|(_, ev)| ev.clone())
            .or_else(|| v.clone())
            .unwrap_or_default();
        parts.push(format!("{k}={value}"));
    }
    if !parts.is_empty() {
        parts.insert(0, format!("|{}", parts.len()));
    }
    parts.extend(args.iter().cloned());
    parts.join(" ")
}

/// Go's `%q` of a string slice.
fn go_quote_list(v: &[String]) -> String {
    kiln_parser::ast::go_quote_list(v)
}

/// Go's `time.Duration.String()` for whole durations, `0s` when unset.
fn go_duration(d: Option<std::time::Duration>) -> String {
    let Some(d) = d else { return "0s".into() };
    let total = d.as_secs_f64();
    if total == 0.0 {
        return "0s".into();
    }
    let h = (total / 3600.0).floor();
    let m = ((total - h * 3600.0) / 60.0).floor();
    let s = total - h * 3600.0 - m * 60.0;
    let mut out = String::new();
    if h > 0.0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0.0 || m > 0.0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{}s", trim_float(s)));
    out
}

fn trim_float(f: f64) -> String {
    let s = format!("{f:.9}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `EXPOSE` port specs: `80`, `80/tcp`, `8000-8002/udp`.
fn parse_ports(w: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match w.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (w, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("invalid proto: {proto}"));
    }
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (a, b),
        None => (ports, ports),
    };
    let lo: u16 = lo
        .parse()
        .map_err(|_| format!("invalid containerPort: {ports}"))?;
    let hi: u16 = hi
        .parse()
        .map_err(|_| format!("invalid containerPort: {ports}"))?;
    if hi < lo {
        return Err(format!("invalid port range: {ports}"));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

/// `FROM --platform=…`: kiln builds for the host platform only, so any
/// other platform is an error rather than a silently wrong image.
fn check_platform(p: &str) -> Result<(), String> {
    let (os, arch, variant) = plan::host_platform();
    let mut parts = p.split('/');
    let ok = parts.next() == Some(os)
        && parts.next().is_none_or(|a| a == arch)
        && parts.next().is_none_or(|v| v.is_empty() || v == variant);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "platform {p:?} is not supported: kiln builds for the host platform ({os}/{arch}) only"
        ))
    }
}

fn validate_signal(s: &str) -> Result<(), String> {
    let name = s.trim_start_matches("SIG");
    const NAMES: [&str; 31] = [
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
        "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
        "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
    ];
    if s.parse::<u32>().is_ok_and(|n| (1..=64).contains(&n))
        || NAMES.contains(&name)
        || name.starts_with("RTMIN")
        || name.starts_with("RTMAX")
    {
        Ok(())
    } else {
        Err(format!("Invalid signal: {s}"))
    }
}

/// Resolves `user[:group]` through the view's /etc/passwd and /etc/group.
fn resolve_owner(view: &LayerView, spec: &str) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // A missing file is empty (numeric ids still work); a device, fifo or
    // oversized file in the image is an error, never opened or read whole.
    let read = |p: &str| match view.read(p) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(crate::fsview::ViewError::NotFound(_)) => Ok(String::new()),
        Err(e) => Err(format!("reading {p} to resolve --chown={spec}: {e}")),
    };
    let passwd = read("/etc/passwd")?;
    let groups = read("/etc/group")?;
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (
            n,
            passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 3 && f[2] == user)
                .and_then(|f| f[3].parse().ok())
                .unwrap_or(n),
        ),
        Err(_) => passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == user)
            .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .ok_or_else(|| {
                format!("unable to find user {user}: no matching entries in passwd file")
            })?,
    };
    let gid = match group {
        None => {
            if user.parse::<u32>().is_ok() && group.is_none() {
                // `--chown=1000` means uid 1000 and gid 1000 in BuildKit.
                user.parse().unwrap_or(primary)
            } else {
                primary
            }
        }
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    format!("unable to find group {g}: no matching entries in group file")
                })?,
        },
    };
    Ok((uid, gid))
}
