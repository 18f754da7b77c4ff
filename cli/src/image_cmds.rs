//! Image commands that mirror docker's: `images`, `inspect`, `history`,
//! `tag`, `rmi`, `save`, `export`, and `run` to try an image right after
//! building it. The data comes from the library ([`Session`]); this is
//! flags, tables and exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use kiln_solver::backend::Backend;
use kiln_solver::export::{ArchiveFormat, Dest};
use kiln_solver::image::manifest::Platform;
use kiln_solver::images::{familiar, Error as ImagesError, ImageInfo};
use kiln_solver::session::Session;
use kiln_solver::store::StoreBackend;

use crate::{lib_error, session, UsageError};

/// `kiln images` flags.
#[derive(clap::Args, Debug)]
pub struct ImagesArgs {
    /// Only show image IDs.
    #[arg(short, long)]
    quiet: bool,
    /// Show manifest digests.
    #[arg(long)]
    digests: bool,
    /// Output format: `table` or `json` (one object per line).
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
}

/// `kiln run` flags.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Remove the container when it exits (kiln never keeps containers).
    #[arg(long)]
    rm: bool,
    /// Run an init that forwards signals and reaps processes (kiln always
    /// does: the application is the child of kiln's PID 1, as under
    /// docker's `--init`).
    #[arg(long)]
    init: bool,
    /// Set an environment variable (`K=V`, or `K` from the environment).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User (`name`, `uid`, `uid:gid`, `name:group`).
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Bind mount `HOST:CONTAINER[:ro]`.
    #[arg(short = 'v', long = "volume", value_name = "HOST:CTR")]
    volumes: Vec<String>,
    /// Network: host (default) or none.
    #[arg(long, default_value = "host", value_parser = ["host", "none", "default"])]
    network: String,
    /// Override the image's ENTRYPOINT.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Security options: `seccomp=unconfined` runs without Docker's default
    /// seccomp profile (the only option kiln takes).
    #[arg(long = "security-opt", value_name = "OPT")]
    security_opt: Vec<String>,
    /// Run this platform's image of a multi-platform image (`linux/arm64`);
    /// a foreign platform runs under QEMU emulation (`kiln system binfmt`).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// The image.
    image: String,
    /// Command and arguments (replace the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn usage(m: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(m.into()))
}

/// A `--platform` value, parsed and normalised (a usage error if bad).
pub fn platform_arg(p: Option<&str>) -> anyhow::Result<Option<Platform>> {
    p.map(|p| kiln_solver::image::platform::parse(p).map_err(|e| usage(e.to_string())))
        .transpose()
}

/// Whether `--security-opt` values lift the seccomp profile; any other
/// option is refused (Docker also spells it `seccomp:unconfined`).
fn seccomp_unconfined(opts: &[String]) -> anyhow::Result<bool> {
    let mut unconfined = false;
    for o in opts {
        match o.as_str() {
            "seccomp=unconfined" | "seccomp:unconfined" => unconfined = true,
            s if s.starts_with("seccomp=") || s.starts_with("seccomp:") => {
                return Err(usage(format!(
                    "--security-opt {o:?}: kiln applies Docker's default seccomp profile or none; custom profiles are not supported (use seccomp=unconfined)"
                )))
            }
            _ => {
                return Err(usage(format!(
                    "--security-opt {o:?} is not supported (kiln run takes seccomp=unconfined)"
                )))
            }
        }
    }
    Ok(unconfined)
}

fn short_id(d: &str) -> String {
    d.trim_start_matches("sha256:").chars().take(12).collect()
}

/// "3 minutes ago" from an RFC 3339 time.
fn ago(created: Option<&str>) -> String {
    let Some(t) = created.and_then(parse_rfc3339) else {
        return "N/A".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let s = (now - t).max(0);
    let (n, unit) = match s {
        0..=59 => (s, "second"),
        60..=3599 => (s / 60, "minute"),
        3600..=86_399 => (s / 3600, "hour"),
        86_400..=2_591_999 => (s / 86_400, "day"),
        2_592_000..=31_535_999 => (s / 2_592_000, "month"),
        _ => (s / 31_536_000, "year"),
    };
    if n == 1 {
        format!("1 {unit} ago")
    } else {
        format!("{n} {unit}s ago")
    }
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS(.frac)?(Z|±HH:MM)`.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = days * 86_400 + h * 3600 + mi * 60 + se;
    let tz = &s[19..];
    let tz = tz.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if let Some(off) = tz.strip_prefix('+').or_else(|| tz.strip_prefix('-')) {
        let oh: i64 = off.get(0..2)?.parse().ok()?;
        let om: i64 = off.get(3..5)?.parse().ok()?;
        let sign = if tz.starts_with('+') { 1 } else { -1 };
        t -= sign * (oh * 3600 + om * 60);
    }
    Some(t)
}

/// Docker's human sizes (`4.26MB`, decimal units).
fn human(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!(
            "{}{}",
            format!("{v:.3}")
                .chars()
                .take(4)
                .collect::<String>()
                .trim_end_matches('.'),
            units[i]
        )
    }
}

/// `kiln images`.
pub fn images(root: &Path, a: ImagesArgs) -> anyhow::Result<ExitCode> {
    let s = session(root, false)?;
    let imgs = s.images().map_err(lib_error)?;
    if a.quiet {
        for l in &imgs {
            outln!("{}", short_id(&l.config_digest));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if a.format == "json" {
        for l in &imgs {
            for (repo, tag) in repo_tags(l) {
                let mut v = serde_json::json!({
                    "Repository": repo, "Tag": tag, "ID": short_id(&l.config_digest),
                    "Digest": l.stored_digest, "CreatedAt": l.config.created,
                    "CreatedSince": ago(l.config.created.as_deref()),
                    "Size": human(s.image_size(l).map_err(lib_error)?),
                });
                if !l.platforms.is_empty() {
                    v["Platforms"] = serde_json::json!(l.platforms);
                }
                outln!("{v}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![vec![
        "REPOSITORY".to_string(),
        "TAG".into(),
        if a.digests {
            "DIGEST".into()
        } else {
            String::new()
        },
        "IMAGE ID".into(),
        "CREATED".into(),
        "SIZE".into(),
    ]];
    // An index is one image; its platforms get a column of their own.
    let multi = imgs.iter().any(|l| !l.platforms.is_empty());
    if multi {
        rows[0].push("PLATFORMS".into());
    }
    for l in &imgs {
        let size = human(s.image_size(l).map_err(lib_error)?);
        for (repo, tag) in repo_tags(l) {
            rows.push(vec![
                repo,
                tag,
                if a.digests {
                    l.stored_digest.clone()
                } else {
                    String::new()
                },
                short_id(&l.config_digest),
                ago(l.config.created.as_deref()),
                size.clone(),
            ]);
            if multi {
                if let Some(r) = rows.last_mut() {
                    r.push(l.platforms.join(","));
                }
            }
        }
    }
    print_table(&rows);
    Ok(ExitCode::SUCCESS)
}

/// (repository, tag) of each name, familiar; `<none>`, `<none>` for an
/// untagged image.
fn repo_tags(l: &ImageInfo) -> Vec<(String, String)> {
    if l.names.is_empty() {
        return vec![("<none>".into(), "<none>".into())];
    }
    l.names.iter().map(|n| familiar(n)).collect()
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.first().map(Vec::len).unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if widths[c] == 0 {
                continue;
            }
            if c + 1 == cols {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[c]));
            }
        }
        outln!("{}", line.trim_end());
    }
}

/// docker's `inspect` JSON for one image.
fn inspect_json(s: &Session, l: &ImageInfo) -> Result<serde_json::Value, ImagesError> {
    let c = &l.config;
    let mut v = serde_json::json!({
        "Id": l.config_digest,
        "RepoTags": l.names.iter().map(|n| {
            let (repo, tag) = familiar(n);
            format!("{repo}:{tag}")
        }).collect::<Vec<_>>(),
        "RepoDigests": [],
        "Created": c.created,
        "Author": c.author.clone().unwrap_or_default(),
        "Config": c.config,
        "Architecture": c.architecture,
        "Variant": c.variant,
        "Os": c.os,
        "Size": s.image_size(l)?,
        "RootFS": {"Type": c.rootfs.kind, "Layers": c.rootfs.diff_ids},
        "Metadata": {"ManifestDigest": l.manifest_digest},
    });
    if !l.platforms.is_empty() {
        v["Platforms"] = serde_json::json!(l.platforms);
        v["Metadata"]["IndexDigest"] = serde_json::json!(l.stored_digest);
    }
    Ok(v)
}

/// `kiln inspect IMAGE...`: docker-style JSON.
pub fn inspect(
    root: &Path,
    images: Vec<String>,
    platform: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let platform = platform_arg(platform)?;
    let s = session(root, false)?;
    let mut out = Vec::new();
    let mut failed = false;
    for r in &images {
        match s.find_image_for(r, platform.as_ref()) {
            Ok(l) => out.push(inspect_json(&s, &l).map_err(lib_error)?),
            Err(e) => {
                eprintln!("Error: {e}");
                failed = true;
            }
        }
    }
    outln!("{}", serde_json::to_string_pretty(&out)?);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `kiln history IMAGE`.
pub fn history(root: &Path, image: &str, platform: Option<&str>) -> anyhow::Result<ExitCode> {
    let platform = platform_arg(platform)?;
    let s = session(root, false)?;
    let (l, rows) = s.history_for(image, platform.as_ref()).map_err(lib_error)?;
    let mut table = vec![vec![
        "IMAGE".to_string(),
        "CREATED".into(),
        "CREATED BY".into(),
        "SIZE".into(),
        "COMMENT".into(),
    ]];
    let n = rows.len();
    for (i, row) in rows.into_iter().enumerate().rev() {
        let h = &row.entry;
        let mut by = h.created_by.clone().unwrap_or_default();
        if by.chars().count() > 60 {
            by = by.chars().take(57).collect::<String>() + "...";
        }
        table.push(vec![
            if i + 1 == n {
                short_id(&l.config_digest)
            } else {
                "<missing>".into()
            },
            ago(h.created.as_deref()),
            by,
            human(row.size),
            h.comment.clone().unwrap_or_default(),
        ]);
    }
    print_table(&table);
    Ok(ExitCode::SUCCESS)
}

/// `kiln tag SRC DST`.
pub fn tag(root: &Path, src: &str, dst: &str) -> anyhow::Result<ExitCode> {
    session(root, false)?.tag(src, dst).map_err(lib_error)?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln rmi [-f] IMAGE...`.
pub fn rmi(root: &Path, force: bool, images: Vec<String>) -> anyhow::Result<ExitCode> {
    let s = session(root, false)?;
    let mut failed = false;
    for r in &images {
        match s.untag(r, force) {
            Ok(removed) => {
                for n in removed.untagged {
                    let (repo, tag) = familiar(&n);
                    outln!("Untagged: {repo}:{tag}");
                }
                if let Some(id) = removed.deleted {
                    outln!("Deleted: {id}");
                }
            }
            Err(
                e @ (ImagesError::NoSuchImage(_)
                | ImagesError::AmbiguousId(..)
                | ImagesError::MustForce(_)
                | ImagesError::InvalidReference { .. }),
            ) => {
                eprintln!("Error: {e}");
                failed = true;
            }
            Err(e) => return Err(lib_error(e)),
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `kiln run`: the image's entrypoint/cmd (Docker's rules) in a sandbox
/// on a throw-away writable layer. The signals kiln receives go to the
/// application ([`crate::signals::forward_to_step`]); kiln exits with its
/// status.
pub fn run(root: &Path, a: RunArgs) -> anyhow::Result<ExitCode> {
    let unconfined = seccomp_unconfined(&a.security_opt)?;
    let platform = platform_arg(a.platform.as_deref())?;
    let session = session(root, false)?;
    let l = session
        .find_image_for(&a.image, platform.as_ref())
        .map_err(lib_error)?;
    let store = session.store().map_err(crate::build_cmd::facade_error)?;
    // Its name, or for an untagged image the ID it is kept under.
    let name = l.key.clone();
    // A foreign platform runs only under emulation: say so before anything
    // is unpacked or started (architectures kiln cannot name are left to
    // the kernel, as before).
    let c = &l.config;
    match kiln_solver::executor::emulation::check(&c.os, &c.architecture, c.variant.as_deref()) {
        Ok(kiln_solver::executor::emulation::Emulation::Handler(h)) if platform.is_none() => {
            // docker's warning when the platform was not asked for.
            eprintln!(
                "WARNING: The requested image's platform ({}/{}) does not match the detected host platform; running under emulation ({})",
                c.os,
                c.architecture,
                h.interpreter.display()
            );
        }
        Ok(_)
        | Err(kiln_solver::executor::emulation::EmulationError::UnknownArchitecture { .. })
        | Err(kiln_solver::executor::emulation::EmulationError::NotLinux { .. }) => {}
        Err(e) => return Err(anyhow::anyhow!(e)),
    }
    let mut backend = StoreBackend::new(store);
    if platform.is_some() || !l.platforms.is_empty() {
        backend = backend.with_platform(Platform {
            os: c.os.clone(),
            architecture: c.architecture.clone(),
            variant: c.variant.clone(),
            ..Default::default()
        });
    }
    let backend = Arc::new(backend);
    let base = backend
        .resolve_image(&name)
        .map_err(|e| anyhow::anyhow!(e))?
        .ok_or_else(|| anyhow::anyhow!("No such image: {}", a.image))?;
    let cfg = base.config.config.clone().unwrap_or_default();
    let mut args: Vec<String> = match &a.entrypoint {
        Some(ep) if ep.is_empty() => Vec::new(),
        Some(ep) => vec![ep.clone()],
        None => cfg.entrypoint.clone().unwrap_or_default(),
    };
    if !a.command.is_empty() {
        args.extend(a.command.iter().cloned());
    } else if a.entrypoint.is_none() {
        args.extend(cfg.cmd.clone().unwrap_or_default());
    }
    if args.is_empty() {
        return Err(usage("no command specified"));
    }
    let mut env = cfg.env.clone().unwrap_or_default();
    for e in &a.env {
        let entry = match e.split_once('=') {
            Some(_) => e.clone(),
            None => match std::env::var(e) {
                Ok(v) => format!("{e}={v}"),
                Err(_) => continue,
            },
        };
        let key = entry.split('=').next().unwrap_or_default().to_string();
        env.retain(|x| x.split('=').next() != Some(key.as_str()));
        env.push(entry);
    }
    let wd = a
        .workdir
        .clone()
        .or(cfg.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    // The process as data; the solver's one OCI-spec builder (the same as
    // RUN steps') makes its spec once the volumes are resolved.
    let mut process = kiln_solver::solve::exec::ProcessSpec {
        args: args.clone(),
        env,
        cwd: PathBuf::from(wd),
        network: if a.network == "none" {
            kiln_solver::executor::NetworkMode::None
        } else {
            kiln_solver::executor::NetworkMode::Host
        },
        seccomp_unconfined: unconfined,
        ..Default::default()
    };
    let mut volumes = Vec::new();
    for v in &a.volumes {
        let parts: Vec<&str> = v.split(':').collect();
        let (host, ctr, ro) = match parts.as_slice() {
            [h, c] => (*h, *c, false),
            [h, c, o] => (*h, *c, *o == "ro"),
            _ => {
                return Err(usage(format!(
                    "invalid volume {v:?}: want HOST:CONTAINER[:ro]"
                )))
            }
        };
        let host =
            std::fs::canonicalize(host).map_err(|e| usage(format!("volume source {host}: {e}")))?;
        let mut opts = vec!["rbind".to_string()];
        if ro {
            opts.push("ro".into());
        }
        volumes.push((host, ctr.to_string(), opts));
    }
    let user = a
        .user
        .clone()
        .or(cfg.user.clone())
        .filter(|u| !u.is_empty());
    let top = base.layers.last().map(|l| l.snapshot.clone());
    let active = backend
        .prepare(top.as_deref())
        .map_err(|e| anyhow::anyhow!(e))?;
    // A volume's destination that is a symlink in the image is followed
    // inside the image's root, as Docker does: the link stays, the mount
    // lands at its target (never a path on the host).
    let view = kiln_solver::fsview::LayerView::new(active.layers.clone(), false);
    for (host, ctr, opts) in volumes {
        let dest = match view.resolve(kiln_solver::fsview::clean_abs(&ctr), true) {
            Ok(d) => d,
            Err(e) => {
                backend.abort(active);
                return Err(usage(format!("volume destination {ctr}: {e}")));
            }
        };
        process.mounts.push(
            kiln_solver::executor::oci::MountBuilder::default()
                .destination(PathBuf::from(
                    <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(dest),
                ))
                .typ("bind")
                .source(host)
                .options(opts)
                .build()?,
        );
    }
    let spec = kiln_solver::solve::exec::spec(&process);
    let mut req = kiln_solver::executor::ExecRequest::new(
        format!("run {}", a.image),
        spec,
        active.mounts.clone(),
    );
    req.user = user;
    let executor = kiln_solver::executor::Executor::new(kiln_solver::executor::ExecutorConfig {
        state_dir: root.join("tmp").join("executor"),
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<kiln_solver::executor::OutputLine>(256);
        let printer = tokio::spawn(async move {
            use std::io::Write;
            while let Some(line) = rx.recv().await {
                match line.stream {
                    kiln_solver::executor::Stream::Stdout => {
                        let mut o = std::io::stdout().lock();
                        let _ = o.write_all(&line.bytes);
                        if line.newline {
                            let _ = o.write_all(b"\n");
                        }
                        let _ = o.flush();
                    }
                    kiln_solver::executor::Stream::Stderr => {
                        let mut e = std::io::stderr().lock();
                        let _ = e.write_all(&line.bytes);
                        if line.newline {
                            let _ = e.write_all(b"\n");
                        }
                    }
                }
            }
        });
        let cancel = kiln_solver::executor::CancellationToken::new();
        let signals = crate::signals::forward_to_step(&cancel);
        let r = executor
            .run_with_signals(req, Some(tx), cancel, signals)
            .await;
        let _ = printer.await;
        r
    });
    backend.abort(active);
    let _ = (a.rm, a.init);
    match outcome {
        Ok(o) => Ok(ExitCode::from(match o.status {
            kiln_solver::executor::ExitStatus::Code(c) => u8::try_from(c).unwrap_or(1),
            kiln_solver::executor::ExitStatus::Signal(s) => u8::try_from(128 + s).unwrap_or(1),
        })),
        // Killed after the last of the SIGINT/SIGTERMs it was sent: the
        // status of a SIGKILLed container (what `docker kill` gives).
        Err(kiln_solver::executor::Error::Cancelled { .. }) => Ok(ExitCode::from(128 + 9)),
        Err(e) => {
            eprintln!("Error: {e}");
            Ok(ExitCode::from(125))
        }
    }
}

/// `kiln save` flags.
#[derive(clap::Args, Debug)]
pub struct SaveArgs {
    /// Write to this file (default: stdout, which must not be a terminal).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Archive format: `docker` (docker save / docker load) or `oci`
    /// (an OCI image layout in a tar).
    #[arg(long, default_value = "docker", value_parser = ["docker", "oci"])]
    format: String,
    /// Save this platform's image of a multi-platform image (default: the
    /// host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// Images to save.
    #[arg(required = true)]
    images: Vec<String>,
}

/// `kiln save`: images from the store as a docker-archive or OCI tar.
pub fn save(root: &Path, a: SaveArgs) -> anyhow::Result<ExitCode> {
    let format = if a.format == "oci" {
        ArchiveFormat::Oci
    } else {
        ArchiveFormat::Docker
    };
    let dest = match &a.output {
        Some(path) => Dest::File(path.clone()),
        None => Dest::Stdout,
    };
    let platform = platform_arg(a.platform.as_deref())?;
    session(root, false)?
        .save_for(&a.images, format, dest, platform.as_ref())
        .map_err(|e| {
            export_error(
                e,
                "cowardly refusing to save to a terminal. Use the -o flag or redirect",
            )
        })?;
    Ok(ExitCode::SUCCESS)
}

/// An export's error: a broken pipe on stdout ends kiln quietly (status
/// 141, as docker), stdout on a terminal is refused with `refusal` (a
/// usage error).
fn export_error(e: ImagesError, refusal: &str) -> anyhow::Error {
    match e {
        ImagesError::Export(x) if x.is_broken_pipe() => {
            std::process::exit(crate::EXIT_STDOUT_CLOSED.into())
        }
        ImagesError::Export(kiln_solver::export::ExportError::Terminal) => usage(refusal),
        e => lib_error(e),
    }
}

/// `kiln export` flags.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Write the tar here (default: stdout, which must not be a terminal).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<String>,
    /// Export this platform's image of a multi-platform image (default:
    /// the host's).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// The image.
    image: String,
}

/// Runs `kiln export`: the image's final filesystem as one tar.
pub fn export(root: &Path, a: ExportArgs) -> anyhow::Result<ExitCode> {
    let platform = platform_arg(a.platform.as_deref())?;
    let dest = Dest::parse(a.output.as_deref().unwrap_or("-"));
    session(root, false)?
        .export_filesystem_for(&a.image, dest, platform.as_ref())
        .map_err(|e| {
            export_error(
                e,
                "refusing to write an archive to a terminal; use dest=FILE",
            )
        })?;
    Ok(ExitCode::SUCCESS)
}
