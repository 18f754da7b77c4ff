//! `Exec` ops: a RUN becomes an OCI runtime spec plus mounts, handed to
//! the [`Runner`](super::runner::Runner); its output is streamed to the
//! progress events, clipped per stream.
//!
//! [`spec`] is the one OCI runtime spec builder: RUN steps and `kiln run`
//! both describe their process as a [`ProcessSpec`] and get their spec
//! from it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kiln_executor::{ExecRequest, OutputLine};

use crate::progress::Event;

use super::{at_line, blocking, mounts, Solved, Solver};
use crate::backend::LayerRecord;
use crate::build::ResourceLimits;
use crate::error::BuildError;
use crate::frontend::instr::PIPES;
use crate::fsview::LayerView;
use crate::op::key::{cache_key, KeyInputs};
use crate::op::{ExecOp, LayerOp, Op};

/// A process to run in the sandbox, as data; [`spec`] makes its OCI
/// runtime spec.
#[derive(Debug, Clone, Default)]
pub struct ProcessSpec {
    /// The argv.
    pub args: Vec<String>,
    /// The environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// The working directory inside the root.
    pub cwd: PathBuf,
    /// Mounts added after the sandbox's own (`/proc`, `/dev`, …): RUN
    /// mounts, heredoc scripts, `kiln run -v` volumes.
    pub mounts: Vec<kiln_executor::oci::Mount>,
    /// The network namespace.
    pub network: kiln_executor::NetworkMode,
    /// `RUN --security=insecure`: every capability kiln has, no masked
    /// paths, no seccomp filter.
    pub insecure: bool,
    /// `kiln run --security-opt seccomp=unconfined`: no seccomp filter.
    pub seccomp_unconfined: bool,
    /// Memory, CPU and pids limits.
    pub limits: ResourceLimits,
    /// setrlimit limits (`--ulimit`).
    pub ulimits: Vec<crate::build::Ulimit>,
}

/// The OCI runtime spec of `p`: kiln's sandbox defaults
/// ([`kiln_executor::default_spec`]: Docker's capabilities, the seccomp
/// profile, masked paths, …) with the process, mounts, network and limits
/// of `p`.
pub fn spec(p: &ProcessSpec) -> kiln_executor::oci::Spec {
    let mut spec = kiln_executor::default_spec(p.args.clone());
    if let Some(proc_) = spec.process_mut() {
        proc_.set_env(Some(p.env.clone()));
        proc_.set_cwd(p.cwd.clone());
    }
    if !p.mounts.is_empty() {
        let mut ms = spec.mounts().clone().unwrap_or_default();
        ms.extend(p.mounts.iter().cloned());
        spec.set_mounts(Some(ms));
    }
    if p.insecure {
        mounts::make_insecure(&mut spec);
    }
    if p.seccomp_unconfined {
        if let Some(l) = spec.linux_mut() {
            l.set_seccomp(None);
        }
    }
    kiln_executor::set_network(&mut spec, p.network);
    apply_limits(&mut spec, &p.limits);
    if !p.ulimits.is_empty() {
        let rl: Vec<_> = p
            .ulimits
            .iter()
            .filter_map(|u| {
                kiln_executor::oci::PosixRlimitBuilder::default()
                    .typ(u.resource)
                    .soft(u.soft)
                    .hard(u.hard)
                    .build()
                    .ok()
            })
            .collect();
        if let Some(proc_) = spec.process_mut() {
            proc_.set_rlimits(Some(rl));
        }
    }
    spec
}

/// Before a RUN for `platform` runs (not when it is cached): a foreign
/// platform needs a binfmt_misc handler with the `F` flag (the QEMU
/// interpreter opened when registered, so it is reachable inside the
/// sandbox). When there is none, the step fails before it starts, naming
/// the platform, the interpreter and `kiln system binfmt`.
async fn check_emulation(
    platform: &kiln_image::manifest::Platform,
    line: crate::error::Location,
) -> Result<(), BuildError> {
    if platform.matches(&crate::frontend::plan::host_platform()) {
        return Ok(());
    }
    let p = kiln_image::platform::normalize(platform);
    blocking(move || {
        kiln_executor::emulation::check(&p.os, &p.architecture, p.variant.as_deref())
            .map(|_| ())
            .map_err(|e| BuildError::at_cause(line, e))
    })
    .await
}

impl Solver {
    pub(super) async fn run_exec(
        self: Arc<Self>,
        state: &Solved,
        lop: &LayerOp,
        op: &ExecOp,
        ignore_cache: bool,
    ) -> Result<LayerRecord, BuildError> {
        let line = lop.location;
        let name = lop.name.as_str();
        let run_mounts = self.plan_mounts(&op.mounts, line).await?;
        let key = cache_key(
            &Op::Exec(op.clone()),
            &KeyInputs {
                parent: &state.key,
                mounts: &run_mounts.key,
                remote: &[],
                clamp: self.opts.source_date_epoch,
            },
        )
        .finish();
        let mut env = op.env.clone();
        env.extend(op.proxy_env.iter().cloned());
        let args = op.args.clone();
        let script = op.script.clone();
        let insecure = op.insecure;
        let network = op.network;
        let platform = op.platform.clone();
        let id = self.progress.start(name.to_string());
        let t = Instant::now();
        tracing::debug!(step = id, %name, key = %key, "step cache key");
        let me = self.clone();
        let parent = state.top().map(str::to_string);
        let workdir = op.cwd.clone();
        let user = op.user.clone();
        let step_name = op.step_name.clone();
        let k = key.clone();
        let r = self
            .single_flight(&key, async move {
                if let Some(hit) = me.cache_lookup(&k, ignore_cache, parent.as_deref()).await? {
                    return Ok((hit, true));
                }
                check_emulation(&platform, line).await?;
                let backend = me.backend.clone();
                let prepared = if run_mounts.is_empty() {
                    mounts::Prepared::default()
                } else {
                    let backend = me.backend.clone();
                    let rm = run_mounts.clone();
                    let cancel = me.cancel.clone();
                    blocking(move || rm.prepare(backend.as_ref(), &|| cancel.is_cancelled()))
                        .await
                        .map_err(at_line(line))?
                };
                let active = blocking(move || backend.prepare(parent.as_deref())).await?;
                let run_mount_list = {
                    let layers = active.layers.clone();
                    let ms = prepared.mounts.clone();
                    blocking(move || resolve_mount_targets(&layers, ms))
                        .await
                        .map_err(at_line(line))?
                };
                let mut all = env.clone();
                for (k, v) in &prepared.env {
                    all.retain(|(ek, _)| ek != k);
                    all.push((k.clone(), v.clone()));
                }
                let mut extra = run_mount_list;
                // Kept alive until the step is over.
                let _script_dir = match &script {
                    Some((name, data)) => {
                        let (dir, m) = script_mount(name, data)
                            .map_err(|msg| BuildError::at_cause(line, msg))?;
                        extra.push(m);
                        Some(dir)
                    }
                    None => None,
                };
                let spec = spec(&ProcessSpec {
                    args: args.clone(),
                    env: all.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                    cwd: PathBuf::from(&workdir),
                    mounts: extra,
                    network,
                    insecure,
                    seccomp_unconfined: false,
                    limits: me.opts.limits,
                    ulimits: me.opts.sandbox.ulimits.clone(),
                });
                let mut req = ExecRequest::new(step_name.clone(), spec, active.mounts.clone());
                // A build step's writes land in trees kiln owns and never
                // syncs itself: its flushes buy nothing (see
                // `kiln_executor::ANSWERED_WITHOUT_SYNC`).
                req.skip_flushes = true;
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
                let outcome = me.runner.run(req, Some(tx), me.cancel.child_token()).await;
                let _ = forward.await;
                drop(prepared);
                let failure = match &outcome {
                    Ok(o) if o.status.success() => None,
                    Ok(o) => Some(BuildError::Run {
                        location: line,
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
                        Ok::<_, BuildError>(())
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
                let cancel = me.cancel.clone();
                let layer =
                    blocking(move || super::committed(backend.commit(active, &k, &opts), &cancel))
                        .await?;
                Ok((layer, false))
            })
            .await;
        self.finish(id, t, r)
    }
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

/// `RUN --mount` targets resolved inside the step's root (its layers, top
/// first), as runc resolves a mount destination: a target below a symlink
/// in the image mounts at the link's target inside the image, the link
/// stays, and the mount point the executor makes for it is made there
/// (not as a directory shadowing the link).
fn resolve_mount_targets(
    layers: &[PathBuf],
    mut mounts: Vec<kiln_executor::oci::Mount>,
) -> Result<Vec<kiln_executor::oci::Mount>, super::StepError> {
    let view = LayerView::new(layers.to_vec(), false);
    for m in &mut mounts {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let dest = m.destination().as_os_str().as_bytes().to_vec();
        let resolved = view
            .resolve(crate::fsview::clean_bytes(&dest), true)
            .map_err(super::StepError::ctx(format!(
                "mount target {}",
                crate::fsview::show(&dest)
            )))?;
        // Checked where it leads (the Dockerfile's text was): `/x -> /`
        // made a read-only bind of a layer over the root, where its
        // read-only remount then missed it.
        let shown = String::from_utf8_lossy(&resolved).into_owned();
        if shown == "/" || ["/proc", "/sys", "/dev", "/dev/pts"].contains(&shown.as_str()) {
            return Err(super::StepError::ctx(format!(
                "mount target {}",
                crate::fsview::show(&dest)
            ))(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("it leads to {shown}, where nothing may be mounted"),
            )));
        }
        m.set_destination(PathBuf::from(std::ffi::OsString::from_vec(resolved)));
    }
    Ok(mounts)
}

/// Writes a `#!` heredoc script to a private directory outside the store
/// and returns it with the read-only bind mount that shows it at
/// `/dev/pipes/NAME`.
fn script_mount(
    name: &str,
    data: &str,
) -> Result<(tempfile::TempDir, kiln_executor::oci::Mount), super::StepError> {
    let dir = tempfile::Builder::new()
        .prefix("kiln-heredoc-")
        .tempdir()
        .map_err(super::StepError::ctx("heredoc script"))?;
    let file = dir.path().join("script");
    kiln_fs::Root::open(dir.path())
        .and_then(|r| r.dir().write_file("script", data.as_bytes(), 0o755, None))
        .map_err(super::StepError::ctx("heredoc script"))?;
    let m = kiln_executor::oci::MountBuilder::default()
        .destination(PathBuf::from(format!("{PIPES}/{name}")))
        .typ("bind")
        .source(file)
        .options(vec!["rbind".to_string(), "ro".to_string()])
        .build()
        .map_err(super::StepError::ctx("heredoc script mount"))?;
    Ok((dir, m))
}
