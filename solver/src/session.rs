//! The library entry point: a [`Session`] on a store builds a
//! [`BuildRequest`] into a [`BuildResult`] — context and Dockerfile
//! resolution, named contexts, cache import, the solve, the exporters and
//! cache exporters — the whole of `kiln build`, for the CLI and for any
//! Rust program that embeds kiln.
//!
//! ```no_run
//! // Building needs root (namespaces, overlay mounts): `no_run` here.
//! use kiln_solver::session::{BuildRequest, Session};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let session = Session::open("/var/lib/kiln")?;
//! let request = BuildRequest::new("./app")
//!     .tag("app:1.0")
//!     .build_arg("VERSION", "1.0")
//!     .output("type=docker,dest=app.tar")?;
//! let runtime = tokio::runtime::Runtime::new()?;
//! let result = runtime.block_on(session.build(request))?;
//! println!("built {} ({} steps run)", result.image_id, result.executed);
//! # Ok(())
//! # }
//! ```
//!
//! [`Session::build`] discards progress; a caller that renders it (the
//! CLI) goes through the three phases itself: [`Session::prepare`]
//! (synchronous: context, store, cache import), [`Prepared::solve`]
//! (async, with a [`Progress`] sender and a [`CancellationToken`]) and
//! [`Solved::export`] (synchronous: outputs, then cache exports).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use kiln_executor::{CancellationToken, NetworkMode};
use kiln_registry::RegistryConfig;

use crate::backend::Backend;
use crate::build::{BuildOptions, ResourceLimits, SecretSource};
use crate::context::{self, ContextError, NamedContext};
use crate::error::BuildError;
use crate::export::cache::{self, CacheExport};
use crate::export::{self, ExportError, ExportInput, Exported, Exporter, OutputSpec, Reporter};
use crate::lint::LintReport;
use crate::progress::{Progress, StepLogLimit};
use crate::remote_cache::{CacheImport, RemoteCacheBackend};
use crate::store::StoreBackend;

pub use crate::build::BuildResult;

/// Why a session call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid (a usage error: the CLI exits 2).
    #[error("{0}")]
    Usage(String),
    /// The store could not be opened.
    #[error("opening the store at {}: {source}", path.display())]
    OpenStore {
        /// The store root.
        path: PathBuf,
        /// Why.
        #[source]
        source: kiln_cache::Error,
    },
    /// The context or its Dockerfile.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// Registry settings (`~/.docker/config.json`, certificates).
    #[error(transparent)]
    Registry(#[from] kiln_registry::RegistryError),
    /// The build failed; the Dockerfile is kept to render the error
    /// around its line.
    #[error("{}", .0.error)]
    Build(Box<FailedBuild>),
    /// An output or cache export failed.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// The store, outside a build.
    #[error(transparent)]
    Store(#[from] kiln_cache::Error),
}

impl Error {
    /// Whether the caller asked for something invalid (exit status 2 in
    /// the CLI) rather than the work failing.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::Usage(_)
                | Error::Context(ContextError::Usage(_))
                | Error::Context(ContextError::OciLayout(_))
                | Error::Context(ContextError::Prepare(_))
                | Error::Export(ExportError::Usage(_))
                | Error::Export(ExportError::Terminal)
        )
    }
}

/// A failed build and the Dockerfile it ran.
#[derive(Debug)]
pub struct FailedBuild {
    /// What failed (with its Dockerfile line where it has one).
    pub error: BuildError,
    /// The Dockerfile's name as given.
    pub dockerfile_name: String,
    /// The Dockerfile's text.
    pub dockerfile: String,
}

/// What to build and where the result goes. Every field has the
/// `kiln build` flag's default; the builder methods cover the usual ones.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The context: a directory, `-` (a tar on stdin), a git URL or an
    /// http(s) URL of an archive.
    pub context: PathBuf,
    /// The Dockerfile (`-f`; default `Dockerfile` in the context; `-`
    /// reads stdin).
    pub dockerfile: Option<String>,
    /// Names for the image in the store (normalised by the build).
    pub tags: Vec<String>,
    /// `--build-arg`s.
    pub build_args: BTreeMap<String, String>,
    /// The stage to build (default: the last).
    pub target: Option<String>,
    /// Run every step.
    pub no_cache: bool,
    /// `--no-cache-filter`: run these stages' RUN, COPY and ADD steps
    /// again (see [`crate::build::BuildOptions::no_cache_filter`]).
    pub no_cache_filter: Vec<String>,
    /// Always ask the registry for base images.
    pub pull: bool,
    /// Registries reachable over plain HTTP (`HOST:PORT`).
    pub insecure_registries: Vec<String>,
    /// Build cache imports.
    pub cache_from: Vec<CacheImport>,
    /// Build cache exports.
    pub cache_to: Vec<CacheExport>,
    /// Outputs besides the store.
    pub outputs: Vec<OutputSpec>,
    /// Image labels.
    pub labels: BTreeMap<String, String>,
    /// Network of RUN steps.
    pub network: NetworkMode,
    /// Limits of each RUN step.
    pub limits: ResourceLimits,
    /// How much output of a step is shown.
    pub step_log_limit: StepLogLimit,
    /// Secrets for `RUN --mount=type=secret`.
    pub secrets: BTreeMap<String, SecretSource>,
    /// SSH agent sockets for `RUN --mount=type=ssh`.
    pub ssh: BTreeMap<String, PathBuf>,
    /// `security.insecure` granted.
    pub allow_insecure: bool,
    /// `network.host` granted.
    pub allow_network_host: bool,
    /// `--build-context`s.
    pub named_contexts: BTreeMap<String, NamedContext>,
    /// SOURCE_DATE_EPOCH when no build arg sets it (the CLI passes the
    /// environment's).
    pub source_date_epoch: Option<String>,
    /// `--platform`: target platforms (empty: the host's). Normalised and
    /// deduplicated by [`Session::prepare`]; several give an image index.
    pub platforms: Vec<kiln_image::manifest::Platform>,
    /// The RUN steps' sandbox (`--add-host`, `--shm-size`, `--ulimit`,
    /// `--cgroup-parent`).
    pub sandbox: crate::build::SandboxOptions,
    /// Annotations of the image's manifest (`--annotation`).
    pub annotations: BTreeMap<String, String>,
}

impl BuildRequest {
    /// A request to build `context` with the defaults of `kiln build`.
    pub fn new(context: impl Into<PathBuf>) -> Self {
        BuildRequest {
            context: context.into(),
            dockerfile: None,
            tags: Vec::new(),
            build_args: BTreeMap::new(),
            target: None,
            no_cache: false,
            no_cache_filter: Vec::new(),
            pull: false,
            insecure_registries: Vec::new(),
            cache_from: Vec::new(),
            cache_to: Vec::new(),
            outputs: Vec::new(),
            labels: BTreeMap::new(),
            network: NetworkMode::Host,
            limits: ResourceLimits::default(),
            step_log_limit: StepLogLimit::default(),
            secrets: BTreeMap::new(),
            ssh: BTreeMap::new(),
            allow_insecure: false,
            allow_network_host: false,
            named_contexts: BTreeMap::new(),
            source_date_epoch: None,
            platforms: Vec::new(),
            sandbox: Default::default(),
            annotations: BTreeMap::new(),
        }
    }

    /// Adds target platforms (`linux/arm64`, or several comma-separated,
    /// as `--platform` takes them).
    pub fn platform(mut self, platforms: &str) -> Result<Self, Error> {
        self.platforms.extend(parse_platforms(platforms)?);
        Ok(self)
    }

    /// Adds a name for the image.
    pub fn tag(mut self, name: impl Into<String>) -> Self {
        self.tags.push(name.into());
        self
    }

    /// Sets a build argument.
    pub fn build_arg(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.build_args.insert(key.into(), value.into());
        self
    }

    /// Names the Dockerfile (relative to the context unless absolute).
    pub fn dockerfile(mut self, path: impl Into<String>) -> Self {
        self.dockerfile = Some(path.into());
        self
    }

    /// Builds this stage.
    pub fn target(mut self, stage: impl Into<String>) -> Self {
        self.target = Some(stage.into());
        self
    }

    /// Adds an output in BuildKit's `--output` syntax.
    pub fn output(mut self, spec: &str) -> Result<Self, Error> {
        self.outputs.push(OutputSpec::parse(spec)?);
        Ok(self)
    }
}

/// Parses a `--platform` value: one or more comma-separated platforms
/// (`linux/amd64,linux/arm64`), each normalised (containerd's rules).
pub fn parse_platforms(value: &str) -> Result<Vec<kiln_image::manifest::Platform>, Error> {
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            kiln_image::platform::parse(p).map_err(|e| Error::Usage(format!("--platform: {e}")))
        })
        .collect()
}

/// The most platforms one build makes (an index of more is refused).
pub const MAX_PLATFORMS: usize = 32;

/// `platforms` normalised, without duplicates, in the order given; an
/// empty list or the host's platform alone is a build for the host.
fn target_platforms(
    platforms: &[kiln_image::manifest::Platform],
) -> Result<Vec<kiln_image::manifest::Platform>, Error> {
    let mut out: Vec<kiln_image::manifest::Platform> = Vec::new();
    for p in platforms {
        let p = kiln_image::platform::normalize(p);
        if !out.iter().any(|o| o.matches(&p)) {
            out.push(p);
        }
    }
    if out.len() > MAX_PLATFORMS {
        return Err(Error::Usage(format!(
            "--platform: {} platforms given; kiln builds at most {MAX_PLATFORMS} at once",
            out.len()
        )));
    }
    Ok(out)
}

/// A store to build in.
#[derive(Clone)]
pub struct Session {
    root: PathBuf,
    reporter: Arc<dyn Reporter>,
    /// The store [`Session::open`] opened, handed to the first caller of
    /// [`Session::store`] (a build): a second open of the database per
    /// command costs its own WAL and checkpoint.
    opened: Arc<std::sync::Mutex<Option<kiln_cache::Store>>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("root", &self.root).finish()
    }
}

fn open_store(root: &Path) -> Result<kiln_cache::Store, Error> {
    kiln_cache::Store::open(root)
        .map(|s| s.with_fetcher(Arc::new(crate::transfer::RegistryFetcher::default())))
        .map_err(|source| Error::OpenStore {
            path: root.to_path_buf(),
            source,
        })
}

impl Session {
    /// Opens (creating it if needed) the store at `root`. Notes and
    /// warnings go to `tracing` until [`Session::with_reporter`].
    pub fn open(root: impl Into<PathBuf>) -> Result<Session, Error> {
        let root = root.into();
        let store = open_store(&root)?;
        Ok(Session {
            root,
            reporter: Arc::new(export::TracingReporter),
            opened: Arc::new(std::sync::Mutex::new(Some(store))),
        })
    }

    /// Where exporters and cache imports report.
    pub fn with_reporter(mut self, reporter: Arc<dyn Reporter>) -> Self {
        self.reporter = reporter;
        self
    }

    /// Where notes, warnings and transfers are reported.
    pub fn reporter(&self) -> Arc<dyn Reporter> {
        self.reporter.clone()
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A handle on the store.
    pub fn store(&self) -> Result<kiln_cache::Store, Error> {
        let first = self.opened.lock().unwrap_or_else(|p| p.into_inner()).take();
        match first {
            Some(store) => Ok(store),
            None => open_store(&self.root),
        }
    }

    /// Builds `req` and runs its exports; progress is discarded.
    pub async fn build(&self, req: BuildRequest) -> Result<BuildResult, Error> {
        let solved = self
            .prepare(req)?
            .solve(Progress::discard(), CancellationToken::new())
            .await?;
        solved.export()?;
        Ok(solved.result)
    }

    /// The first phase of a build: resolves the context and Dockerfile,
    /// checks the request, opens the store, imports `oci-layout://`
    /// contexts and the `--cache-from` records. A context that is not a
    /// directory lives in a temporary directory until the returned value
    /// is dropped.
    pub fn prepare(&self, req: BuildRequest) -> Result<Prepared, Error> {
        let usage = |m: String| Error::Usage(m);
        let resolved = context::resolve(
            &req.context,
            req.dockerfile.as_deref(),
            &self.root.join("tmp"),
            &main_context_git_auth(&req),
        )?;
        let mut tags = Vec::new();
        for t in &req.tags {
            tags.push(
                kiln_cache::normalize_reference(t)
                    .map_err(|e| usage(format!("invalid tag {t:?}: {e}")))?,
            );
        }
        for o in &req.outputs {
            tags.extend(o.names()?);
        }
        // `-t X --push` names X twice (the tag and the push's name): once
        // is enough.
        let mut seen = std::collections::HashSet::new();
        tags.retain(|t| seen.insert(t.clone()));
        let platforms = target_platforms(&req.platforms)?;
        if platforms.len() > 1
            && req
                .cache_to
                .iter()
                .any(|c| matches!(c, CacheExport::Inline))
        {
            return Err(Error::Usage(
                "--cache-to type=inline: inline cache of a multi-platform image is not supported; use type=registry,ref=… (it holds every platform's steps)".into(),
            ));
        }
        if platforms.len() > 1 {
            if let Some(o) = req.outputs.iter().find(|o| o.kind == "docker") {
                return Err(Error::Usage(format!(
                    "--output type={}: docker exporter does not currently support exporting manifest lists (build one --platform, or use type=oci or type=registry)",
                    o.kind
                )));
            }
        }
        let source_date_epoch = req
            .build_args
            .get("SOURCE_DATE_EPOCH")
            .cloned()
            .or_else(|| req.source_date_epoch.clone())
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<i64>()
                    .map_err(|_| usage(format!("invalid SOURCE_DATE_EPOCH {s:?}")))
            })
            .transpose()?;
        let store = self.store()?;
        let mut named_contexts = req.named_contexts.clone();
        for ctx in named_contexts.values_mut() {
            if let NamedContext::OciLayout(dir, tag) = ctx {
                let name = context::oci_layout::import(&store, dir, tag.as_deref())
                    .map_err(ContextError::from)?;
                *ctx = NamedContext::Image(name);
            }
        }
        // Pulls of base images and cache imports stop when the build is
        // cancelled (linked in `solve`).
        let registry_cancel = CancellationToken::new();
        crate::transfer::fetch_insecure_registries(&req.insecure_registries);
        let registry =
            RegistryConfig::load(&req.insecure_registries)?.with_cancel(registry_cancel.clone());
        let mut exporters: Vec<Box<dyn Exporter>> = Vec::new();
        for o in &req.outputs {
            exporters.extend(o.exporter(&registry)?);
        }
        for c in &req.cache_to {
            exporters.push(Box::new(c.exporter(&req.outputs)?));
        }
        for (name, addr) in &req.sandbox.extra_hosts {
            kiln_executor::check_extra_host(name, addr)
                .map_err(|e| usage(format!("--add-host {:?}: {e}", format!("{name}:{addr}"))))?;
        }
        if let Some(p) = &req.sandbox.cgroup_parent {
            let ok = !p.is_empty()
                && p.len() <= 255
                && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
            if !ok {
                return Err(usage(format!(
                    "--cgroup-parent {p:?}: want a relative cgroup path (letters, digits, ., _, -, /; no ..)"
                )));
            }
        }
        let store_backend = StoreBackend::new(store)
            .with_registry(registry.clone(), req.pull)
            .with_annotations(req.annotations.clone());
        let backend = if req.cache_from.is_empty() && req.cache_to.is_empty() {
            Stores::Plain(Arc::new(store_backend))
        } else {
            Stores::Cached(cache::import(
                store_backend,
                registry,
                &req.cache_from,
                &*self.reporter,
            ))
        };
        let opts = BuildOptions {
            dockerfile: resolved.dockerfile.clone(),
            context: resolved.dir.clone(),
            ignore: resolved.ignore.clone(),
            build_args: req.build_args,
            target: req.target,
            no_cache: req.no_cache,
            no_cache_filter: req.no_cache_filter,
            labels: req.labels,
            network: req.network,
            limits: req.limits,
            step_log_limit: req.step_log_limit,
            tags,
            source_date_epoch,
            secrets: req.secrets,
            ssh: req.ssh,
            allow_insecure: req.allow_insecure,
            allow_network_host: req.allow_network_host,
            named_contexts,
            platforms,
            sandbox: req.sandbox,
        };
        Ok(Prepared {
            registry_cancel,
            source_date_epoch,
            root: self.root.clone(),
            reporter: self.reporter.clone(),
            context: resolved,
            opts,
            backend,
            exporters,
        })
    }

    /// `kiln build --check`: lints the request's Dockerfile (BuildKit's
    /// rules) and builds nothing. Base images' variables come from the
    /// store at `root` when it exists and has them; nothing is pulled and
    /// no store is created.
    pub fn check(root: &Path, req: &BuildRequest) -> Result<Checked, Error> {
        let resolved = context::resolve(
            &req.context,
            req.dockerfile.as_deref(),
            &root.join("tmp"),
            &main_context_git_auth(req),
        )?;
        let name = resolved.dockerfile_name.clone();
        let df = kiln_parser::parse(&resolved.dockerfile)
            .map_err(|e| Error::Usage(format!("{name}: {e}")))?;
        let store = if root.join("meta.db").exists() {
            kiln_cache::Store::open(root).ok()
        } else {
            None
        };
        let base_env = |reference: &str| -> Option<Vec<String>> {
            let store = store.as_ref()?;
            let name = kiln_cache::normalize_reference(reference).ok()?;
            let rec = store.meta().image(&name).ok()??;
            let md: kiln_cache::Digest = rec.manifest.parse().ok()?;
            let manifest: kiln_image::manifest::ImageManifest =
                serde_json::from_slice(&store.content().read(&md).ok()?).ok()?;
            let config = kiln_image::config::ImageConfig::from_bytes(
                &store.content().read(&manifest.config.digest).ok()?,
            )
            .ok()?;
            Some(config.config.and_then(|c| c.env).unwrap_or_default())
        };
        let report = crate::lint::lint_with(&df, &base_env);
        Ok(Checked {
            report,
            dockerfile_name: name,
            dockerfile: resolved.dockerfile,
        })
    }
}

/// The findings of [`Session::check`].
#[derive(Debug)]
pub struct Checked {
    /// The lint findings.
    pub report: LintReport,
    /// The Dockerfile's name as given.
    pub dockerfile_name: String,
    /// The Dockerfile's text.
    pub dockerfile: String,
}

/// The build's backend, kept typed for the exports.
enum Stores {
    Plain(Arc<StoreBackend>),
    Cached(Arc<RemoteCacheBackend>),
}

impl Stores {
    fn backend(&self) -> Arc<dyn Backend> {
        match self {
            Stores::Plain(b) => b.clone(),
            Stores::Cached(b) => b.clone(),
        }
    }
    fn store(&self) -> &kiln_cache::Store {
        match self {
            Stores::Plain(b) => b.store(),
            Stores::Cached(b) => b.store(),
        }
    }
}

/// The credentials git gets for a main context from a repository: the
/// user named it on the command line, so, as buildx forwards the SSH
/// agent for a git context, the agent given with `--ssh default`, else
/// kiln's own `SSH_AUTH_SOCK`. (A repository a Dockerfile names gets only
/// `--ssh default`.)
fn main_context_git_auth(req: &BuildRequest) -> crate::remote::GitAuth {
    crate::remote::GitAuth {
        ssh_agent: req
            .ssh
            .get("default")
            .cloned()
            .or_else(|| std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from))
            .map(|p| std::path::absolute(&p).unwrap_or(p)),
    }
}

/// A build ready to run ([`Session::prepare`]).
pub struct Prepared {
    registry_cancel: CancellationToken,
    source_date_epoch: Option<i64>,
    root: PathBuf,
    reporter: Arc<dyn Reporter>,
    context: context::Resolved,
    opts: BuildOptions,
    backend: Stores,
    exporters: Vec<Box<dyn Exporter>>,
}

impl Prepared {
    /// The Dockerfile's name as given.
    pub fn dockerfile_name(&self) -> &str {
        &self.context.dockerfile_name
    }

    /// Runs the build: RUN steps in the sandbox (as
    /// `kiln_executor::Executor` with its state under the store's `tmp`),
    /// progress to `progress`, stopped by `cancel`.
    pub async fn solve(
        self,
        progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Solved, Error> {
        let sandbox = &self.opts.sandbox;
        let mut exec_config = kiln_executor::ExecutorConfig {
            state_dir: self.root.join("tmp").join("executor"),
            extra_hosts: sandbox.extra_hosts.clone(),
            shm_size: sandbox.shm_size,
            ..Default::default()
        };
        if let Some(p) = &sandbox.cgroup_parent {
            exec_config.cgroup_parent = p.clone();
        }
        let executor = kiln_executor::Executor::new(exec_config);
        let link = {
            let (c, r) = (cancel.clone(), self.registry_cancel.clone());
            tokio::spawn(async move {
                c.cancelled().await;
                r.cancel();
            })
        };
        let span = tracing::info_span!("build", context = %self.context.dir.display());
        let started = std::time::Instant::now();
        tracing::info!(parent: &span, dockerfile = %self.context.dockerfile_name, "build started");
        let r = tracing::Instrument::instrument(
            crate::build(
                self.backend.backend(),
                executor,
                progress,
                cancel,
                self.opts,
            ),
            span.clone(),
        )
        .await;
        link.abort();
        match r {
            Ok(result) => {
                tracing::info!(
                    parent: &span,
                    image_id = %result.image_id,
                    executed = result.executed,
                    cached = result.cached,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "build done"
                );
                Ok(Solved {
                    source_date_epoch: self.source_date_epoch,
                    root: self.root,
                    reporter: self.reporter,
                    _context: self.context,
                    backend: self.backend,
                    exporters: self.exporters,
                    result,
                })
            }
            Err(BuildError::Usage(m)) => Err(Error::Usage(m)),
            Err(error) => {
                tracing::info!(parent: &span, error = %error, "build failed");
                Err(Error::Build(Box::new(FailedBuild {
                    error,
                    dockerfile_name: self.context.dockerfile_name,
                    dockerfile: self.context.dockerfile,
                })))
            }
        }
    }
}

/// A finished build whose exports have not run yet.
pub struct Solved {
    source_date_epoch: Option<i64>,
    root: PathBuf,
    reporter: Arc<dyn Reporter>,
    _context: context::Resolved,
    backend: Stores,
    exporters: Vec<Box<dyn Exporter>>,
    /// What the build made.
    pub result: BuildResult,
}

impl Solved {
    /// Runs the outputs, then the cache exports (one lease, through
    /// [`export::run`]), then lets go of the oldest results `--no-cache`
    /// rebuilds replaced once they take more than a tenth of the store's
    /// filesystem (best effort).
    pub fn export(&self) -> Result<Exported, Error> {
        self.export_to(&*self.reporter)
    }

    /// [`Solved::export`] reporting to `report`: with the build's
    /// [`crate::progress::Progress`], each exporter is a step of the
    /// build's view (its notes the step's lines), as BuildKit shows them.
    pub fn export_to(&self, report: &dyn Reporter) -> Result<Exported, Error> {
        let mut done = Exported::default();
        if !self.exporters.is_empty() {
            let store = self.backend.store();
            let input = ExportInput {
                store,
                images: vec![export::stored_image(store, &self.result.manifest_digest)?],
                source_date_epoch: self.source_date_epoch,
                cache: match &self.backend {
                    Stores::Cached(c) => Some(c),
                    Stores::Plain(_) => None,
                },
            };
            done = export::run(&input, &self.exporters, report)?;
        }
        if kiln_cache::retired_over_budget(&self.root) {
            let store = self.backend.store();
            let _ = store.sweep_retired(store.retired_budget());
        }
        Ok(done)
    }
}
