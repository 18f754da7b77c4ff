//! The build entry point: a Dockerfile and its options in, an image in
//! the store out. Parsing is [`kiln_parser`], lowering to an op graph is
//! [`crate::frontend`], running the graph is [`crate::solve`]; this module
//! holds the options and the result, and joins them up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_executor::{CancellationToken, Executor, NetworkMode};

use crate::backend::Backend;
use crate::error::BuildError;
use crate::progress::Progress;
use crate::solve::runner::Runner;

pub use crate::solve::mounts::{parse_secret_flag, parse_ssh_flag, SecretSource};
// Instruction rules other rooms of the crate share with the frontend
// (`kiln import -c` applies Dockerfile instructions to a config).
#[allow(unused_imports)]
pub(crate) use crate::frontend::history::shell_wrap;
#[allow(unused_imports)]
pub(crate) use crate::frontend::instr::{healthcheck_config, parse_ports, validate_signal};

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
    /// `--no-cache-filter`: the names of the stages whose RUN, COPY and
    /// ADD steps run again (matched without regard to case, as BuildKit
    /// does; unnamed stages cannot be named).
    pub no_cache_filter: Vec<String>,
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
    /// `--allow network.host`: `RUN --network=host` may run in the host's
    /// network namespace (a build given `--network none` is not left by a
    /// Dockerfile without it).
    pub allow_network_host: bool,
    /// `--build-context`: names `FROM` and `--from` resolve to first.
    pub named_contexts: BTreeMap<String, crate::contexts::NamedContext>,
    /// `--platform`: the target platforms, normalised and without
    /// duplicates (empty: the host's). One gives an image for it; several
    /// give an image index of one image per platform, in this order.
    pub platforms: Vec<kiln_image::manifest::Platform>,
    /// The RUN steps' sandbox: `--add-host`, `--shm-size`, `--ulimit`,
    /// `--cgroup-parent`.
    pub sandbox: SandboxOptions,
}

/// How RUN steps' sandboxes are set up besides their limits: docker
/// build's `--add-host`, `--shm-size`, `--ulimit` and `--cgroup-parent`.
/// None of them is part of a step's cache key (as `--memory`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxOptions {
    /// Extra `/etc/hosts` entries: (host name, IP address).
    pub extra_hosts: Vec<(String, String)>,
    /// Size of /dev/shm in bytes (default 64 MiB).
    pub shm_size: Option<u64>,
    /// Resource limits set with setrlimit in the sandbox.
    pub ulimits: Vec<Ulimit>,
    /// The cgroup (below kiln's own) that holds the steps' cgroups
    /// (default `kiln`).
    pub cgroup_parent: Option<String>,
}

/// One `--ulimit`: docker's `NAME=SOFT[:HARD]` (`-1`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ulimit {
    /// The resource.
    pub resource: kiln_executor::oci::PosixRlimitType,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// A `--ulimit` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --ulimit {value:?}: {why}")]
pub struct UlimitError {
    /// As given.
    pub value: String,
    /// What is wrong.
    pub why: String,
}

impl std::str::FromStr for Ulimit {
    type Err = UlimitError;

    /// Parses docker's `nofile=1024:2048`, `nproc=512`, `core=-1`.
    fn from_str(s: &str) -> Result<Ulimit, UlimitError> {
        use kiln_executor::oci::PosixRlimitType as T;
        let err = |why: &str| UlimitError {
            value: s.to_string(),
            why: why.to_string(),
        };
        let (name, limits) = s
            .split_once('=')
            .ok_or_else(|| err("want NAME=SOFT[:HARD]"))?;
        let resource = match name {
            "core" => T::RlimitCore,
            "cpu" => T::RlimitCpu,
            "data" => T::RlimitData,
            "fsize" => T::RlimitFsize,
            "locks" => T::RlimitLocks,
            "memlock" => T::RlimitMemlock,
            "msgqueue" => T::RlimitMsgqueue,
            "nice" => T::RlimitNice,
            "nofile" => T::RlimitNofile,
            "nproc" => T::RlimitNproc,
            "rss" => T::RlimitRss,
            "rtprio" => T::RlimitRtprio,
            "rttime" => T::RlimitRttime,
            "sigpending" => T::RlimitSigpending,
            "stack" => T::RlimitStack,
            _ => return Err(err("unknown resource (core, cpu, data, fsize, locks, memlock, msgqueue, nice, nofile, nproc, rss, rtprio, rttime, sigpending, stack)")),
        };
        let num = |v: &str| -> Result<u64, UlimitError> {
            if v == "-1" {
                return Ok(u64::MAX);
            }
            v.parse::<u64>()
                .map_err(|_| err("limits are numbers or -1"))
        };
        let (soft, hard) = match limits.split_once(':') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(limits)?, num(limits)?),
        };
        if soft > hard {
            return Err(err("the soft limit is above the hard limit"));
        }
        Ok(Ulimit {
            resource,
            soft,
            hard,
        })
    }
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
    /// A multi-platform build: each platform's image, in `--platform`
    /// order (`image_id` and `manifest_digest` are then the index's
    /// digest). Empty for a build of one platform.
    pub platforms: Vec<PlatformImage>,
}

/// One platform's image of a multi-platform build.
#[derive(Debug, Clone)]
pub struct PlatformImage {
    /// The platform (normalised).
    pub platform: kiln_image::manifest::Platform,
    /// Its image ID (config digest).
    pub image_id: String,
    /// Its manifest digest.
    pub manifest_digest: String,
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
/// tests, see [`crate::testing`]).
pub async fn build_with_runner(
    backend: Arc<dyn Backend>,
    runner: Arc<dyn Runner>,
    progress: Progress,
    cancel: CancellationToken,
    opts: BuildOptions,
) -> Result<BuildResult, BuildError> {
    crate::solve::solve(backend, runner, progress, cancel, opts).await
}
