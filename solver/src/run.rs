//! `kiln run` as a library call: a stored image's command (Docker's
//! entrypoint/cmd rules) in kiln's sandbox, on a throw-away writable layer
//! over the image's snapshots. [`Session::prepare_run`] finds the image,
//! checks emulation (warning through the session's reporter when the
//! platform was not asked for), unpacks it, prepares the layer and places
//! the volumes; [`PreparedRun::run`] runs it and drops the layer. The
//! process spec comes from the one OCI-spec builder RUN steps use
//! ([`crate::solve::exec::spec`]).

use std::path::PathBuf;
use std::sync::Arc;

use kiln_executor::emulation::{Emulation, EmulationError};
use kiln_image::manifest::Platform;

use crate::backend::{Active, Backend, BackendError};
use crate::images;
use crate::session::{self, Session};
use crate::store::StoreBackend;

/// Emulation of other platforms through binfmt_misc: what a run checks
/// first, and what `kiln system binfmt` registers.
pub use kiln_executor::emulation;
/// The executor's types a caller of [`PreparedRun::run`] handles: the
/// cancel token, the output lines and the outcome.
pub use kiln_executor::{
    CancellationToken, Error as ExecError, ExecOutcome, ExitStatus, NetworkMode, OutputLine,
    Stream, FORWARDED_SIGNALS,
};

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// The image (name or ID).
    pub image: String,
    /// Its platform's image of a stored index, asked for (`--platform`).
    pub platform: Option<Platform>,
    /// `--entrypoint` (`Some("")`: none).
    pub entrypoint: Option<String>,
    /// The command after the image (replaces the image's cmd).
    pub command: Vec<String>,
    /// Environment entries over the image's, `KEY=VALUE`.
    pub env: Vec<String>,
    /// The working directory (default: the image's, else `/`).
    pub workdir: Option<String>,
    /// The user (default: the image's).
    pub user: Option<String>,
    /// The network namespace.
    pub network: NetworkMode,
    /// No seccomp filter.
    pub seccomp_unconfined: bool,
    /// Host directories bound into the container.
    pub volumes: Vec<Volume>,
    /// The process's stdin (`kiln run -i`; default /dev/null).
    pub stdin: Option<Arc<std::os::fd::OwnedFd>>,
    /// `kiln run -t`: a pseudo-terminal's slave, the process's stdin,
    /// stdout, stderr and controlling terminal (see
    /// [`kiln_executor::ExecRequest::tty`]).
    pub tty: Option<Arc<std::os::fd::OwnedFd>>,
}

/// A host directory bound into the container (`-v HOST:CONTAINER[:ro]`).
#[derive(Debug, Clone)]
pub struct Volume {
    /// The host path (canonical).
    pub host: PathBuf,
    /// Where it goes; a symlink in the image is followed inside the
    /// image's root, as Docker does.
    pub container: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Finding the image.
    #[error(transparent)]
    Image(#[from] images::Error),
    /// Opening the store.
    #[error(transparent)]
    Session(#[from] session::Error),
    /// The image has no name to resolve it by.
    #[error("image has no name")]
    NoName,
    /// Its platform cannot run here.
    #[error(transparent)]
    Emulation(EmulationError),
    /// The image is gone.
    #[error("No such image: {0}")]
    NoSuchImage(String),
    /// Neither the image nor the request names a command.
    #[error("no command specified")]
    NoCommand,
    /// A volume's destination cannot be placed in the image's root.
    #[error("volume destination {container}: {source}")]
    VolumeDestination {
        /// The destination as given.
        container: String,
        /// Why.
        #[source]
        source: crate::fsview::ViewError,
    },
    /// A volume's mount could not be described.
    #[error("volume {container}: {message}")]
    VolumeMount {
        /// The destination as given.
        container: String,
        /// Why.
        message: String,
    },
    /// The store (unpacking the image, preparing the layer).
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A run ready to start: the writable layer exists (and goes when this
/// is dropped or has run).
pub struct PreparedRun {
    layer: Layer,
    request: kiln_executor::ExecRequest,
    state_dir: PathBuf,
}

impl std::fmt::Debug for PreparedRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedRun")
            .field("layer", &self.layer.active.as_ref().map(|a| &a.key))
            .finish()
    }
}

/// The throw-away writable layer, removed on drop.
struct Layer {
    backend: Arc<StoreBackend>,
    active: Option<Active>,
}

impl Drop for Layer {
    fn drop(&mut self) {
        if let Some(active) = self.active.take() {
            self.backend.abort(active);
        }
    }
}

impl Session {
    /// Prepares `req` (see the module doc).
    pub fn prepare_run(&self, req: &RunRequest) -> Result<PreparedRun, RunError> {
        let l = self.find_image_for(&req.image, req.platform.as_ref())?;
        let store = self.store()?;
        // Its name, or for an untagged image the ID it is kept under.
        let name = l.key.clone();
        // A foreign platform runs only under emulation: say so before
        // anything is unpacked or started (architectures kiln cannot name
        // are left to the kernel).
        let c = &l.config;
        match emulation::check(&c.os, &c.architecture, c.variant.as_deref()) {
            Ok(Emulation::Handler(h)) if req.platform.is_none() => {
                // docker's warning when the platform was not asked for.
                self.reporter().warn(&format!(
                    "WARNING: The requested image's platform ({}/{}) does not match the detected host platform; running under emulation ({})",
                    c.os,
                    c.architecture,
                    h.interpreter.display()
                ));
            }
            Ok(_)
            | Err(EmulationError::UnknownArchitecture { .. })
            | Err(EmulationError::NotLinux { .. }) => {}
            Err(e) => return Err(RunError::Emulation(e)),
        }
        // The platform's image of an index (or a platform asked for).
        let want = (req.platform.is_some() || !l.platforms.is_empty()).then(|| Platform {
            os: c.os.clone(),
            architecture: c.architecture.clone(),
            variant: c.variant.clone(),
            ..Default::default()
        });
        let backend = Arc::new(StoreBackend::new(store));
        let base = backend
            .resolve_image(&name, want.as_ref(), &|_| {})?
            .ok_or_else(|| RunError::NoSuchImage(req.image.clone()))?;
        let cfg = base.config.config.clone().unwrap_or_default();
        let mut args: Vec<String> = match &req.entrypoint {
            Some(ep) if ep.is_empty() => Vec::new(),
            Some(ep) => vec![ep.clone()],
            None => cfg.entrypoint.clone().unwrap_or_default(),
        };
        if !req.command.is_empty() {
            args.extend(req.command.iter().cloned());
        } else if req.entrypoint.is_none() {
            args.extend(cfg.cmd.clone().unwrap_or_default());
        }
        if args.is_empty() {
            return Err(RunError::NoCommand);
        }
        let mut env = cfg.env.clone().unwrap_or_default();
        for entry in &req.env {
            let key = entry.split('=').next().unwrap_or_default();
            env.retain(|x| x.split('=').next() != Some(key));
            env.push(entry.clone());
        }
        let wd = req
            .workdir
            .clone()
            .or(cfg.working_dir.clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into());
        let mut process = crate::solve::exec::ProcessSpec {
            args,
            env,
            cwd: PathBuf::from(wd),
            network: req.network,
            seccomp_unconfined: req.seccomp_unconfined,
            ..Default::default()
        };
        let user = req
            .user
            .clone()
            .or(cfg.user.clone())
            .filter(|u| !u.is_empty());
        let top = base.layers.last().map(|l| l.snapshot.clone());
        let active = backend.prepare(top.as_deref())?;
        let (layers, mounts) = (active.layers.clone(), active.mounts.clone());
        // (Dropping `layer` on an error below removes it.)
        let layer = Layer {
            backend,
            active: Some(active),
        };
        let view = crate::fsview::LayerView::new(layers, false);
        for v in &req.volumes {
            let dest = view
                .resolve(crate::fsview::clean_abs(&v.container), true)
                .map_err(|source| RunError::VolumeDestination {
                    container: v.container.clone(),
                    source,
                })?;
            // Where it leads, checked (a volume over `/` or `/proc` was
            // dropped, silently).
            let shown = String::from_utf8_lossy(&dest).into_owned();
            if shown == "/" || ["/proc", "/sys", "/dev", "/dev/pts"].contains(&shown.as_str()) {
                return Err(RunError::VolumeMount {
                    container: v.container.clone(),
                    message: format!("it leads to {shown}, which kiln provides itself"),
                });
            }
            let mut opts = vec!["rbind".to_string()];
            if v.read_only {
                opts.push("ro".into());
            }
            let mount = kiln_executor::oci::MountBuilder::default()
                .destination(PathBuf::from(
                    <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(dest),
                ))
                .typ("bind")
                .source(v.host.clone())
                .options(opts)
                .build()
                .map_err(|e| RunError::VolumeMount {
                    container: v.container.clone(),
                    message: e.to_string(),
                })?;
            process.mounts.push(mount);
        }
        let spec = crate::solve::exec::spec(&process);
        let mut request =
            kiln_executor::ExecRequest::new(format!("run {}", req.image), spec, mounts);
        request.user = user;
        request.stdin = req.stdin.clone();
        request.tty = req.tty.clone();
        Ok(PreparedRun {
            layer,
            request,
            state_dir: self.root().join("tmp").join("executor"),
        })
    }
}

impl PreparedRun {
    /// Runs the process: its output lines go to `output`, the signals
    /// received on `signals` are passed to it, `cancel` kills it. The
    /// writable layer is dropped afterwards.
    pub async fn run(
        self,
        output: Option<tokio::sync::mpsc::Sender<OutputLine>>,
        cancel: CancellationToken,
        signals: tokio::sync::mpsc::Receiver<i32>,
    ) -> Result<ExecOutcome, ExecError> {
        let executor = kiln_executor::Executor::new(kiln_executor::ExecutorConfig {
            state_dir: self.state_dir.clone(),
            ..Default::default()
        });
        let PreparedRun { layer, request, .. } = self;
        let outcome = executor
            .run_with_signals(request, output, cancel, signals)
            .await;
        drop(layer);
        outcome
    }
}
