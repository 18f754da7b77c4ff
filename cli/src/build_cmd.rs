//! `kiln build`: raw flags -> a [`BuildRequest`] -> the library's
//! [`Session`], with progress rendering and Docker-like exit codes and
//! error output.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use kiln_solver::export::cache::CacheFlags;
use kiln_solver::session::NetworkMode;
use kiln_solver::session::{BuildRequest, Session};
use kiln_solver::{BuildError, ResourceLimits};

use crate::progress::{self, Mode};

/// Flags of `kiln build`, as clap parses them.
#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Name and optionally a tag (`name:tag`); repeatable.
    #[arg(short = 't', long = "tag", value_name = "NAME[:TAG]")]
    tags: Vec<String>,
    /// The Dockerfile (default: CONTEXT/Dockerfile; `-` reads stdin).
    #[arg(short = 'f', long = "file", value_name = "DOCKERFILE")]
    file: Option<String>,
    /// Build-time variable; `K` alone takes the value from the environment.
    #[arg(long = "build-arg", value_name = "K[=V]")]
    build_args: Vec<String>,
    /// The stage to build (default: the last one).
    #[arg(long)]
    target: Option<String>,
    /// Run every step, ignoring the cache.
    #[arg(long)]
    no_cache: bool,
    /// Always ask the registry for base images (`--pull=false`: only when
    /// missing, the default).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pull: Option<bool>,
    /// Allow plain HTTP for this registry (HOST:PORT); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registry: Vec<String>,
    /// Import build cache: `type=registry,ref=REF` (or a bare REF) or
    /// `type=local,src=DIR`; repeatable.
    #[arg(long = "cache-from", value_name = "type=TYPE,...")]
    cache_from: Vec<String>,
    /// Export build cache: `type=registry,ref=REF[,mode=min|max]`,
    /// `type=local,dest=DIR[,mode=…]` or `type=inline`; repeatable.
    #[arg(long = "cache-to", value_name = "type=TYPE,...")]
    cache_to: Vec<String>,
    /// Where the result goes, BuildKit syntax (`type=image|registry|docker|
    /// oci|local|tar,...`); repeatable.
    #[arg(short = 'o', long = "output", value_name = "type=TYPE,...")]
    outputs: Vec<String>,
    /// Progress output: auto, tty, plain, json.
    #[arg(long, value_enum, default_value = "auto")]
    progress: Mode,
    /// Print only the image ID.
    #[arg(short, long)]
    quiet: bool,
    /// Set a label on the image; repeatable.
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    /// Network of RUN steps: host (default) or none.
    #[arg(long, default_value = "host", value_parser = ["host", "none", "default"])]
    network: String,
    /// Write the image ID to this file.
    #[arg(long, value_name = "FILE")]
    iidfile: Option<PathBuf>,
    /// Memory limit of each RUN step (e.g. 512m, 2g).
    #[arg(short = 'm', long, value_name = "SIZE")]
    memory: Option<String>,
    /// CPUs each RUN step may use (e.g. 1.5).
    #[arg(long, value_name = "N")]
    cpus: Option<f64>,
    /// Maximum number of processes in each RUN step.
    #[arg(long = "pids-limit", value_name = "N")]
    pids_limit: Option<i64>,
    /// A secret for `RUN --mount=type=secret`: `id=ID,src=FILE` or
    /// `id=ID,env=VAR`; repeatable.
    #[arg(long = "secret", value_name = "id=ID,src=FILE|env=VAR")]
    secrets: Vec<String>,
    /// An SSH agent socket for `RUN --mount=type=ssh`: `default` (this
    /// process's $SSH_AUTH_SOCK) or `ID=SOCKET`; repeatable.
    #[arg(long = "ssh", value_name = "default|ID[=SOCKET]")]
    ssh: Vec<String>,
    /// Extra privileges: `security.insecure` lets `RUN --security=insecure`
    /// run with every capability; repeatable.
    #[arg(long = "allow", value_name = "ENTITLEMENT")]
    allow: Vec<String>,
    /// A named context for `FROM NAME` and `COPY --from=NAME`:
    /// `NAME=DIR`, `NAME=docker-image://REF` or
    /// `NAME=oci-layout://PATH[:TAG]`; repeatable.
    #[arg(long = "build-context", value_name = "NAME=VALUE")]
    build_contexts: Vec<String>,
    /// Target platforms (`linux/amd64,linux/arm64`; comma-separated and
    /// repeatable). Several give one image index; a foreign RUN runs under
    /// QEMU emulation (`kiln system binfmt`).
    #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]")]
    platforms: Vec<String>,
    /// Run the Dockerfile lint rules (BuildKit's checks) and report them
    /// with their lines, without building.
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    compat: crate::build_flags::CompatFlags,
    /// The build context: a directory, `-` (a tar archive on stdin, plain
    /// or gzip/bzip2/xz/zstd), a git repository (`https://…git#REF:DIR`,
    /// `git@…`, `git://…`) or an http(s) URL of a tar archive.
    context: PathBuf,
}

/// `--memory`: docker's `RAMInBytes` (`512m`, `2g`, `1024`; binary units).
pub fn parse_size(s: &str) -> Result<i64, String> {
    let n = kiln_solver::units::ram_in_bytes(s).map_err(|e| e.to_string())?;
    i64::try_from(n).map_err(|_| format!("invalid size {s:?}: too large"))
}

/// A usage error (exit status 2).
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(crate::UsageError(msg.into()))
}

/// A facade error as the CLI reports it: usage errors exit 2.
pub fn facade_error(e: kiln_solver::session::Error) -> anyhow::Error {
    if let kiln_solver::session::Error::Export(x) = &e {
        if x.is_broken_pipe() {
            // The reader of stdout went away: quietly, as docker.
            std::process::exit(crate::EXIT_STDOUT_CLOSED.into())
        }
    }
    if e.is_usage() {
        usage(e.to_string())
    } else {
        anyhow::Error::msg(e.to_string())
    }
}

/// Turns raw flags into a build request (values checked; the context and
/// Dockerfile are resolved by the session).
fn request(a: &BuildArgs) -> anyhow::Result<BuildRequest> {
    let mut req = BuildRequest::new(a.context.clone());
    req.dockerfile = a.file.clone();
    for a in &a.build_args {
        let key = a.split_once('=').map_or(a.as_str(), |(k, _)| k);
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            return Err(usage(format!(
                "--build-arg {a:?}: the name {} (want NAME=VALUE or NAME)",
                if key.is_empty() {
                    "is empty"
                } else {
                    "contains whitespace"
                }
            )));
        }
        match a.split_once('=') {
            Some((k, v)) => {
                req.build_args.insert(k.to_string(), v.to_string());
            }
            None => {
                if let Ok(v) = std::env::var(a) {
                    req.build_args.insert(a.clone(), v);
                }
            }
        }
    }
    for l in &a.labels {
        let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
        req.labels.insert(k.to_string(), v.to_string());
    }
    req.tags = a.tags.clone();
    req.source_date_epoch = std::env::var("SOURCE_DATE_EPOCH").ok();
    req.limits = ResourceLimits {
        memory: a
            .memory
            .as_deref()
            .map(parse_size)
            .transpose()
            .map_err(usage)?,
        cpus: a.cpus.filter(|c| *c > 0.0),
        pids: a.pids_limit.filter(|p| *p > 0),
    };
    for s in &a.secrets {
        let (id, src) =
            kiln_solver::build::parse_secret_flag(s).map_err(|e| usage(e.to_string()))?;
        req.secrets.insert(id, src);
    }
    for s in &a.ssh {
        let (id, sock) = kiln_solver::build::parse_ssh_flag(s).map_err(|e| usage(e.to_string()))?;
        req.ssh.insert(id, sock);
    }
    for e in &a.allow {
        match e.as_str() {
            "security.insecure" => req.allow_insecure = true,
            "network.host" => req.allow_network_host = true,
            other => {
                return Err(usage(format!(
                    "--allow {other:?}: unknown entitlement (security.insecure, network.host)"
                )))
            }
        }
    }
    for c in &a.build_contexts {
        let (n, v) =
            kiln_solver::context::parse_build_context(c).map_err(|e| usage(e.to_string()))?;
        req.named_contexts.insert(n, v);
    }
    for p in &a.platforms {
        req.platforms
            .extend(kiln_solver::session::parse_platforms(p).map_err(facade_error)?);
    }
    req.target = a.target.clone();
    req.no_cache = a.no_cache;
    req.pull = a.pull.unwrap_or(false);
    req.network = if a.network == "none" {
        NetworkMode::None
    } else {
        NetworkMode::Host
    };
    req.step_log_limit = kiln_solver::progress::StepLogLimit::from_env();
    req.insecure_registries = a.insecure_registry.clone();
    Ok(req)
}

/// Renders a build error BuildKit-style: the cause, the Dockerfile lines
/// around the failing instruction, and the step's last output.
fn render_error(e: &BuildError, name: &str, text: &str) -> String {
    if let BuildError::Dockerfile(pe) = e {
        return pe.render(name, text);
    }
    // One style for every error kiln prints: `error: ` (clap's own usage
    // errors are worded so, and they cannot be reworded).
    let mut out = format!("error: {e}\n");
    if let BuildError::Run { tail, .. } = e {
        if !tail.is_empty() {
            out.push_str("------\n");
            for l in tail {
                out.push_str(&format!(" > {l}\n"));
            }
            out.push_str("------\n");
        }
    }
    if let Some(loc) = e.location() {
        let line = loc.line;
        let lines: Vec<&str> = text.lines().collect();
        let at = lines.get(line - 1).copied().unwrap_or_default();
        // A caret under the column (the instruction's first character
        // when the error names none); the header stays docker's
        // `file:line`, which scripts match.
        let col = if loc.column > 0 {
            loc.column
        } else {
            at.chars().take_while(|c| c.is_whitespace()).count() + 1
        };
        out.push_str(&format!("{name}:{line}\n--------------------\n"));
        let lo = line.saturating_sub(2).max(1);
        let hi = (line + 2).min(lines.len());
        for n in lo..=hi {
            let marker = if n == line { ">>>" } else { "   " };
            out.push_str(&format!(
                "{marker}{n:>3} | {}\n",
                lines.get(n - 1).copied().unwrap_or_default()
            ));
            if n == line {
                let pad: String = at
                    .chars()
                    .take(col - 1)
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                out.push_str(&format!("       | {pad}^\n"));
            }
        }
        out.push_str("--------------------\n");
    }
    out
}

/// Refuses directory outputs inside a `type=local` destination: the
/// image's tree is written there first and could hold, where the next
/// output goes, a symlink (`cache -> /etc`). (Files there are replaced,
/// never written through: see `outfile`.)
fn outputs_apart(req: &BuildRequest) -> anyhow::Result<()> {
    let abs = |p: &Path| -> PathBuf {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        // Lexically (`a/./b`, `a/../b`): nothing is looked up.
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                std::path::Component::ParentDir => {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                c => out.push(c),
            }
        }
        out
    };
    // (what, where, whether a local export's tree, whether a directory
    // of its own). A single file written into a local dest is fine: it
    // replaces whatever the image put at its name, never writes through
    // it (`-o . --iidfile iid`); a directory there would be opened
    // through the image's symlinks.
    let mut outs: Vec<(String, PathBuf, bool, bool)> = Vec::new();
    for o in &req.outputs {
        if let Some(dest) = o.attrs.get("dest").filter(|d| d.as_str() != "-") {
            let what = format!("--output type={}", o.kind);
            let dir = o.kind == "local" || o.attrs.get("tar").is_some_and(|t| t == "false");
            outs.push((what, abs(Path::new(dest)), o.kind == "local", dir));
        }
    }
    for c in &req.cache_to {
        if let kiln_solver::export::cache::CacheExport::Local { dir, .. } = c {
            outs.push(("--cache-to type=local".into(), abs(dir), false, true));
        }
    }
    for (i, (_, tree, local, _)) in outs.iter().enumerate() {
        if !local {
            continue;
        }
        for (j, (what, p, _, dir)) in outs.iter().enumerate() {
            if i != j && *dir && p.starts_with(tree) {
                return Err(usage(format!(
                    "{what} {} is inside the type=local destination {}: the image's files are written there first (pick a path outside it)",
                    p.display(),
                    tree.display()
                )));
            }
        }
    }
    Ok(())
}

/// Runs `kiln build`: flags -> [`BuildRequest`] -> the session's three
/// phases, with progress rendered while it solves.
pub fn run(root: &Path, a: BuildArgs) -> anyhow::Result<ExitCode> {
    let mut req = request(&a)?;
    if a.check || a.compat.check() {
        return check(root, &req);
    }
    for o in &a.outputs {
        req.outputs.push(crate::build_flags::output(o, &a.tags)?);
    }
    a.compat.apply(&mut req)?;
    let caches = CacheFlags::parse(&a.cache_from, &a.cache_to).map_err(|e| usage(e.to_string()))?;
    req.cache_from = caches.imports;
    req.cache_to = caches.exports;
    outputs_apart(&req)?;
    // A failed build leaves no ID or metadata of an earlier one where a
    // script would read them (as docker and buildx, which remove them
    // first); only a regular file is removed (`--iidfile /dev/stdout`).
    for f in a.iidfile.iter().chain(a.compat.metadata_file.iter()) {
        if std::fs::symlink_metadata(f).is_ok_and(|m| m.is_file()) {
            std::fs::remove_file(f)
                .map_err(|e| anyhow::anyhow!("removing the old {}: {e}", f.display()))?;
        }
    }
    let session = Session::open(root)
        .map_err(facade_error)?
        .with_reporter(Arc::new(crate::registry_cmds::CliReporter::new(a.quiet)));
    // Kept until the build is over: the temporary directory of a context
    // from stdin, git or a URL.
    let prepared = session.prepare(req).map_err(facade_error)?;
    let mode = if a.quiet { Mode::Quiet } else { a.progress };
    let rt = tokio::runtime::Builder::new_multi_thread()
        // A layer's tree is walked recursively, per level (see
        // `kiln_image::diff::MAX_TREE_DEPTH`).
        .thread_stack_size(kiln_solver::copy::DEEP_STACK)
        .enable_all()
        .build()?;
    // Cancelled by SIGINT/SIGTERM only (the build cancels its own child
    // token when a step fails).
    let interrupted = kiln_solver::session::CancellationToken::new();
    let signalled = interrupted.clone();
    // The tty and plain views show the exporters as steps (BuildKit's
    // `=> exporting to oci image format`, `=> => …`); quiet and json
    // runs export after the view, their notes and warnings as lines.
    let live_export = matches!(mode.resolve(), Mode::Tty | Mode::Plain);
    let result = rt.block_on(async move {
        let (progress_tx, rx) = kiln_solver::progress::channel();
        let render = tokio::spawn(progress::render(mode, rx));
        crate::signals::cancel_on_interrupt(&signalled);
        let r = prepared
            .solve(progress_tx.clone(), signalled.child_token())
            .await;
        if r.is_ok() {
            // A signal from here on ends kiln (the solve is over; the
            // exporters do not watch the token), one that came just
            // before as well.
            crate::signals::exporting();
            if signalled.is_cancelled() {
                eprintln!("\ninterrupted: nothing was exported");
                std::process::exit(i32::from(crate::signals::EXIT_CANCELLED));
            }
        }
        let r = match r {
            Ok(solved) if live_export => {
                let tx = progress_tx.clone();
                match tokio::task::spawn_blocking(move || {
                    let e = solved.export_to(&tx);
                    (solved, Some(e))
                })
                .await
                {
                    Ok(done) => Ok(done),
                    // The export panicked: so does kiln, as it would have
                    // on this thread.
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                }
            }
            Ok(solved) => Ok((solved, None)),
            Err(e) => Err(e),
        };
        drop(progress_tx);
        let _ = render.await;
        r
    });
    match result {
        Ok((solved, exported)) => {
            let exported = match exported {
                Some(e) => e,
                None => solved.export(),
            }
            .map_err(facade_error)?;
            let r = &solved.result;
            if let Some(f) = &a.iidfile {
                // As `save -o` writes: a symlink is replaced, not followed
                // to the file it names; a device or FIFO is written in place.
                kiln_solver::export::outfile::write_atomically(f, |w| {
                    w.write_all(r.image_id.as_bytes())
                })
                .map_err(|e: std::io::Error| {
                    anyhow::anyhow!("writing the image ID to --iidfile {}: {e}", f.display())
                })?;
            }
            if let Some(f) = &a.compat.metadata_file {
                let desc = crate::session(root, true)?
                    .manifest_descriptor(&r.manifest_digest)
                    .ok();
                let mut names: Vec<String> = Vec::new();
                for t in &a.tags {
                    if let Ok(n) = kiln_solver::cache::normalize_reference(t) {
                        names.push(n);
                    }
                }
                let pushed = exported.pushed.first().map(|(_, d)| d.to_string());
                // (RepoDigests of pushes are recorded below.)
                let v = crate::build_flags::metadata(
                    &r.image_id,
                    &r.manifest_digest,
                    desc,
                    &names,
                    pushed.as_deref(),
                );
                let text = serde_json::to_string_pretty(&v)? + "\n";
                kiln_solver::export::outfile::write_atomically(f, |w| w.write_all(text.as_bytes()))
                    .map_err(|e: std::io::Error| {
                        anyhow::anyhow!("writing --metadata-file {}: {e}", f.display())
                    })?;
            }
            // docker's RepoDigests for what the build pushed.
            if !exported.pushed.is_empty() {
                let s = crate::session(root, true)?;
                for (dest, d) in &exported.pushed {
                    // Bookkeeping only: a multi-platform build's ID is its
                    // index, which has no single image to note it on.
                    let _ = s.record_push(&r.image_id, dest, d.as_str());
                }
            }
            if a.quiet {
                outln!("{}", r.image_id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(kiln_solver::session::Error::Build(failed)) => {
            // The Dockerfile's own text is quoted: shown escaped on a
            // terminal (a line of it could carry escape sequences).
            let text = render_error(&failed.error, &failed.dockerfile_name, &failed.dockerfile);
            eprint!("{}", crate::term::shown(&text, crate::term::stderr_tty()));
            // Stopped by Ctrl-C/SIGTERM: 130, as a pull or push.
            Ok(if interrupted.is_cancelled() {
                ExitCode::from(crate::signals::EXIT_CANCELLED)
            } else {
                ExitCode::from(1)
            })
        }
        Err(e) => Err(facade_error(e)),
    }
}

/// `kiln build --check`: lint the Dockerfile, print the findings with
/// their lines, build nothing. Fails only under `# check=error=true`.
fn check(root: &Path, req: &BuildRequest) -> anyhow::Result<ExitCode> {
    let checked = Session::check(root, req).map_err(facade_error)?;
    let report = &checked.report;
    let name = &checked.dockerfile_name;
    let lines: Vec<&str> = checked.dockerfile.lines().collect();
    if report.warnings.is_empty() {
        outln!("Check complete, no warnings found.");
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "Check complete, {} warning{} found!",
        report.warnings.len(),
        if report.warnings.len() == 1 {
            " has been"
        } else {
            "s have been"
        }
    );
    for w in &report.warnings {
        outln!();
        outln!("WARNING: {} - {}", w.rule, w.url());
        outln!("{}", w.message);
        outln!("{name}:{}", w.line);
        outln!("--------------------");
        let from = w.line.saturating_sub(2).max(1);
        for n in from..=w.line.min(lines.len()) {
            let text = lines.get(n - 1).copied().unwrap_or_default();
            let mark = if n == w.line { ">>>" } else { "   " };
            outln!("{mark} {n:>3} | {text}");
        }
        outln!("--------------------");
    }
    Ok(if report.error {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("lots").is_err());
    }

    /// `1k` used to be 1000 bytes in `prune --keep-storage` and 1024 in
    /// `build --memory`; docker and buildx read both with `RAMInBytes`.
    #[test]
    fn keep_storage_and_memory_read_1k_as_1024_bytes_like_docker() {
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert_eq!(crate::store_cmds::parse_size("1k").unwrap(), 1024);
        assert_eq!(crate::store_cmds::parse_size("10GB").unwrap(), 10 << 30);
        assert_eq!(crate::store_cmds::parse_size("1.5 MiB").unwrap(), 3 << 19);
        assert!(crate::store_cmds::parse_size("1kk").is_err());
    }
}
