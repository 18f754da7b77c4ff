//! `kiln build`: raw flags -> validated [`BuildOptions`] -> solver, with
//! progress rendering and Docker-like exit codes and error output.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use kiln_parser::dockerignore::{ignore_file_candidates, read_ignore_file};
use kiln_solver::main_context::{self, ContextSpec, Prepared};
use kiln_solver::{BuildError, BuildOptions, ResourceLimits};

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
    /// Always ask the registry for base images.
    #[arg(long)]
    pull: bool,
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
    #[arg(long, value_name = "SIZE")]
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
    /// Run the Dockerfile lint rules (BuildKit's checks) and report them
    /// with their lines, without building.
    #[arg(long)]
    check: bool,
    /// The build context: a directory, `-` (a tar archive on stdin, plain
    /// or gzip/bzip2/xz/zstd), a git repository (`https://…git#REF:DIR`,
    /// `git@…`, `git://…`) or an http(s) URL of a tar archive.
    context: PathBuf,
}

/// `--memory`: docker's `RAMInBytes` (`512m`, `2g`, `1024`; binary units).
pub fn parse_size(s: &str) -> Result<i64, String> {
    let n = kiln_parser::units::ram_in_bytes(s).map_err(|e| e.to_string())?;
    i64::try_from(n).map_err(|_| format!("invalid size {s:?}: too large"))
}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(crate::UsageError(msg.into()))
}

/// Turns raw flags into build options (the Dockerfile read, names
/// normalised, values checked). A context that is not a directory is
/// made into a temporary one under `scratch`, kept alive by the returned
/// guard until the build is over.
fn options(
    a: &BuildArgs,
    scratch: &Path,
) -> anyhow::Result<(BuildOptions, String, Option<Prepared>)> {
    let spelled = a.context.to_string_lossy().into_owned();
    let spec = main_context::classify(&spelled);
    if spec == ContextSpec::Stdin && a.file.as_deref() == Some("-") {
        return Err(usage(
            "invalid argument: can't use stdin for both the build context and the Dockerfile",
        ));
    }
    let prepared = main_context::prepare(&spec, std::io::stdin().lock(), scratch).map_err(usage)?;
    let context = match &prepared {
        Some(p) => p.dir.clone(),
        None => a.context.clone(),
    };
    if !context.is_dir() {
        return Err(usage(format!(
            "unable to prepare context: path {:?} not found or not a directory",
            context.display()
        )));
    }
    let (name, text, ignore_path) = match (a.file.as_deref(), &prepared) {
        (Some("-"), _) => {
            let mut b = Vec::new();
            std::io::stdin()
                .take(MAX_DOCKERFILE + 1)
                .read_to_end(&mut b)?;
            if b.len() as u64 > MAX_DOCKERFILE {
                return Err(usage(format!(
                    "the Dockerfile on stdin is larger than {} MiB",
                    MAX_DOCKERFILE >> 20
                )));
            }
            (
                "Dockerfile".to_string(),
                String::from_utf8_lossy(&b).into_owned(),
                context.join(".dockerignore"),
            )
        }
        (f, Some(p)) => {
            // The context itself was a Dockerfile, else -f (default
            // `Dockerfile`) names a file inside the context.
            if let Some(bytes) = &p.dockerfile {
                if let Some(f) = f {
                    return Err(usage(format!(
                        "-f {f}: the build context {spelled:?} is a Dockerfile, not an archive"
                    )));
                }
                (
                    "Dockerfile".to_string(),
                    String::from_utf8_lossy(bytes).into_owned(),
                    context.join(".dockerignore"),
                )
            } else {
                let f = f.unwrap_or("Dockerfile");
                let rel = f.trim_start_matches('/');
                if rel.is_empty() || rel.split('/').any(|c| c == "..") {
                    return Err(usage(format!(
                        "-f {f}: the Dockerfile must be a path inside the build context {spelled:?}"
                    )));
                }
                let path = context.join(rel);
                let found = confined_path(&path).ok_or_else(|| {
                    usage(format!(
                        "unable to prepare context: the Dockerfile {rel:?} was not found in {spelled:?}"
                    ))
                })?;
                let bytes = read_regular(&found, rel).map_err(usage)?;
                let ignore = ignore_file_candidates(rel)
                    .into_iter()
                    .map(|c| context.join(c))
                    .find(|c| c.exists())
                    .unwrap_or_else(|| context.join(".dockerignore"));
                (
                    f.to_string(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                    ignore,
                )
            }
        }
        (Some(f), None) => {
            let p = PathBuf::from(f);
            let p = if p.is_absolute() || p.exists() {
                p
            } else {
                context.join(f)
            };
            // Given with -f: it may live outside the context, but it must
            // be a regular file (not a device or a FIFO) of bounded size.
            let bytes = read_regular(&p, &p.display().to_string()).map_err(usage)?;
            let ignore = find_ignore_file(&p, &context);
            (
                f.to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
                ignore,
            )
        }
        (None, None) => {
            // The context's Dockerfile: resolved inside the context (a
            // symlink cannot name a host file), a regular file only.
            let p = context.join("Dockerfile");
            let found = confined_path(&p).ok_or_else(|| {
                usage(format!(
                    "reading Dockerfile {}: not found inside the build context",
                    p.display()
                ))
            })?;
            let bytes = read_regular(&found, "Dockerfile").map_err(usage)?;
            let ignore = find_ignore_file(&p, &context);
            (
                "Dockerfile".to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
                ignore,
            )
        }
    };
    let ignore = match read_confined(&ignore_path) {
        Some(b) => read_ignore_file(&String::from_utf8_lossy(&b)),
        None => Vec::new(),
    };
    let mut build_args = BTreeMap::new();
    for a in &a.build_args {
        match a.split_once('=') {
            Some((k, v)) => {
                build_args.insert(k.to_string(), v.to_string());
            }
            None => {
                if let Ok(v) = std::env::var(a) {
                    build_args.insert(a.clone(), v);
                }
            }
        }
    }
    let mut labels = BTreeMap::new();
    for l in &a.labels {
        let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
        labels.insert(k.to_string(), v.to_string());
    }
    let mut tags = Vec::new();
    for t in &a.tags {
        tags.push(
            kiln_cache::normalize_reference(t)
                .map_err(|e| usage(format!("invalid tag {t:?}: {e}")))?,
        );
    }
    let source_date_epoch = build_args
        .get("SOURCE_DATE_EPOCH")
        .cloned()
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| usage(format!("invalid SOURCE_DATE_EPOCH {s:?}")))
        })
        .transpose()?;
    let limits = ResourceLimits {
        memory: a
            .memory
            .as_deref()
            .map(parse_size)
            .transpose()
            .map_err(usage)?,
        cpus: a.cpus.filter(|c| *c > 0.0),
        pids: a.pids_limit.filter(|p| *p > 0),
    };
    let mut secrets = BTreeMap::new();
    for s in &a.secrets {
        let (id, src) = kiln_solver::build::parse_secret_flag(s).map_err(usage)?;
        secrets.insert(id, src);
    }
    let mut ssh = BTreeMap::new();
    for s in &a.ssh {
        let (id, sock) = kiln_solver::build::parse_ssh_flag(s).map_err(usage)?;
        ssh.insert(id, sock);
    }
    let mut allow_insecure = false;
    for e in &a.allow {
        match e.as_str() {
            "security.insecure" => allow_insecure = true,
            "network.host" => {}
            other => {
                return Err(usage(format!(
                    "--allow {other:?}: unknown entitlement (security.insecure, network.host)"
                )))
            }
        }
    }
    let mut named_contexts = BTreeMap::new();
    for c in &a.build_contexts {
        let (n, v) = kiln_solver::contexts::parse_build_context(c).map_err(usage)?;
        named_contexts.insert(n, v);
    }
    Ok((
        BuildOptions {
            dockerfile: text,
            context,
            ignore,
            build_args,
            target: a.target.clone(),
            no_cache: a.no_cache,
            labels,
            network: if a.network == "none" {
                kiln_executor::NetworkMode::None
            } else {
                kiln_executor::NetworkMode::Host
            },
            limits,
            step_log_limit: kiln_solver::progress::StepLogLimit::from_env(),
            tags,
            source_date_epoch,
            secrets,
            ssh,
            allow_insecure,
            named_contexts,
        },
        name,
        prepared,
    ))
}

/// Reads `path` with symlinks resolved inside its own directory, as
/// BuildKit reads the ignore file from the context (or Dockerfile) source:
/// a link leading outside that directory is never followed to the host.
fn read_confined(path: &Path) -> Option<Vec<u8>> {
    read_regular(&confined_path(path)?, &path.display().to_string()).ok()
}

/// The largest Dockerfile (or ignore file) kiln reads.
pub const MAX_DOCKERFILE: u64 = 16 << 20;

/// Reads `path` if it is a regular file of at most [`MAX_DOCKERFILE`]
/// bytes: devices (`/dev/zero`), FIFOs and sockets are refused before
/// anything is read, and the open never blocks on a FIFO.
fn read_regular(path: &Path, shown: &str) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let kind = |t: std::fs::FileType| {
        if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        }
    };
    let refuse = |t| format!("the Dockerfile {shown} is {}, not a regular file", kind(t));
    let m = std::fs::metadata(path).map_err(|e| format!("reading Dockerfile {shown}: {e}"))?;
    if !m.is_file() {
        return Err(refuse(m.file_type()));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("reading Dockerfile {shown}: {e}"))?;
    let m = f
        .metadata()
        .map_err(|e| format!("reading Dockerfile {shown}: {e}"))?;
    if !m.is_file() {
        return Err(refuse(m.file_type()));
    }
    let too_big = || {
        format!(
            "the Dockerfile {shown} is larger than {} MiB",
            MAX_DOCKERFILE >> 20
        )
    };
    if m.len() > MAX_DOCKERFILE {
        return Err(too_big());
    }
    let mut b = Vec::new();
    f.take(MAX_DOCKERFILE + 1)
        .read_to_end(&mut b)
        .map_err(|e| format!("reading Dockerfile {shown}: {e}"))?;
    if b.len() as u64 > MAX_DOCKERFILE {
        return Err(too_big());
    }
    Ok(b)
}

/// Where `path` leads when its symlinks are resolved inside its parent
/// directory (an absolute or `..` link cannot leave it); `None` when it
/// does not exist.
fn confined_path(path: &Path) -> Option<PathBuf> {
    let root = path.parent()?;
    let mut todo: std::collections::VecDeque<std::ffi::OsString> =
        [path.file_name()?.to_os_string()].into();
    let mut cur: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        if c.is_empty() || c == "." {
            continue;
        }
        if c == ".." {
            cur.pop();
            continue;
        }
        let mut p = root.to_path_buf();
        p.extend(&cur);
        p.push(&c);
        let m = std::fs::symlink_metadata(&p).ok()?;
        if !m.file_type().is_symlink() {
            cur.push(c);
            continue;
        }
        hops += 1;
        if hops > 40 {
            return None;
        }
        let target = std::fs::read_link(&p).ok()?;
        if target.is_absolute() {
            cur.clear();
        }
        for (i, t) in target.iter().filter(|t| *t != "/").enumerate() {
            todo.insert(i, t.to_os_string());
        }
    }
    let mut p = root.to_path_buf();
    p.extend(&cur);
    std::fs::symlink_metadata(&p).ok()?;
    Some(p)
}

/// `<name>.dockerignore` beside the Dockerfile wins over the context's
/// `.dockerignore`.
fn find_ignore_file(dockerfile: &Path, context: &Path) -> PathBuf {
    let s = dockerfile.to_string_lossy();
    for c in ignore_file_candidates(&s) {
        let p = if c == ".dockerignore" {
            context.join(c)
        } else {
            PathBuf::from(c)
        };
        if p.exists() {
            return p;
        }
    }
    context.join(".dockerignore")
}

/// The registry domain of the names `oci-layout://` contexts are imported
/// under (reserved: never pulled).
const OCI_LAYOUT_DOMAIN: &str = kiln_solver::store::OCI_LAYOUT_DOMAIN;

/// Imports the image of an OCI image layout directory (the manifest whose
/// `org.opencontainers.image.ref.name` is `tag`, default `latest`; the only
/// one when a layout holds a single unnamed image) into the store, and
/// returns the reference a `docker-image://` context would have.
fn import_oci_layout(
    store: &kiln_cache::Store,
    dir: &Path,
    tag: Option<&str>,
) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use kiln_image::manifest::{
        ImageIndex, Platform, RawManifest, ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME,
    };
    let what = || format!("oci-layout://{}", dir.display());
    let blob_path = |d: &kiln_image::Digest| -> anyhow::Result<PathBuf> {
        let s = d.to_string();
        let hex = s
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| anyhow::anyhow!("{}: unsupported digest {s}", what()))?;
        Ok(dir.join("blobs/sha256").join(hex))
    };
    let read_blob = |d: &kiln_image::Digest| -> anyhow::Result<Vec<u8>> {
        let p = blob_path(d)?;
        let bytes =
            std::fs::read(&p).with_context(|| format!("{}: reading {}", what(), p.display()))?;
        let (got, _) = kiln_image::archive::digest_reader(&bytes[..])?;
        if &got != d {
            anyhow::bail!("{}: blob {d} has digest {got}", what());
        }
        Ok(bytes)
    };
    let idx_path = dir.join("index.json");
    let idx_bytes = std::fs::read(&idx_path)
        .with_context(|| format!("{}: not an OCI image layout (reading index.json)", what()))?;
    let index: ImageIndex = serde_json::from_slice(&idx_bytes)
        .with_context(|| format!("{}: parsing index.json", what()))?;
    let want = tag.unwrap_or("latest");
    let named = |d: &kiln_image::manifest::Descriptor| -> Option<String> {
        let ann = d.annotations.as_ref()?;
        ann.get(ANNOTATION_REF_NAME)
            .or_else(|| ann.get(ANNOTATION_CONTAINERD_NAME))
            .cloned()
    };
    let pick = index
        .manifests
        .iter()
        .find(|d| {
            named(d)
                .is_some_and(|n| n == want || n.rsplit_once(':').is_some_and(|(_, t)| t == want))
        })
        .or_else(|| match (tag, index.manifests.as_slice()) {
            (None, [only]) if named(only).is_none() => Some(only),
            _ => None,
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no image tagged {want:?} in index.json (org.opencontainers.image.ref.name)",
                what()
            )
        })?
        .clone();
    let mut raw = RawManifest::new(read_blob(&pick.digest)?, Some(&pick.media_type))?;
    if raw.is_index() {
        let sub = raw.index()?;
        let d = sub
            .select(&Platform::host())
            .or(sub.manifests.first())
            .ok_or_else(|| anyhow::anyhow!("{}: empty nested index", what()))?
            .clone();
        raw = RawManifest::new(read_blob(&d.digest)?, Some(&d.media_type))?;
    }
    let man = raw.manifest()?;
    let _lease = store.lease(None)?;
    let mut stored = Vec::new();
    for desc in std::iter::once(&man.config).chain(&man.layers) {
        let p = blob_path(&desc.digest)?;
        let f = std::fs::File::open(&p)
            .with_context(|| format!("{}: blob {} missing", what(), desc.digest))?;
        let want: kiln_cache::Digest = desc
            .digest
            .to_string()
            .parse()
            .map_err(|e| anyhow::anyhow!("digest {}: {e}", desc.digest))?;
        store
            .put_blob(f, Some(&want), Some(desc.size), Some(&desc.media_type))
            .with_context(|| format!("{}: storing blob {}", what(), desc.digest))?;
        stored.push(want);
    }
    let config = stored.remove(0);
    let manifest = store
        .put_bytes(&raw.bytes, Some(&raw.media_type))
        .context("storing manifest")?;
    let name = format!(
        "{OCI_LAYOUT_DOMAIN}/layout@sha256:{}",
        raw.digest.to_string().trim_start_matches("sha256:")
    );
    let name = kiln_cache::normalize_reference(&name)?;
    store.record_image(&name, &manifest, &config, &stored)?;
    Ok(name)
}

/// Renders a build error BuildKit-style: the cause, the Dockerfile lines
/// around the failing instruction, and the step's last output.
fn render_error(e: &BuildError, name: &str, text: &str) -> String {
    if let BuildError::Dockerfile(pe) = e {
        return pe.render(name, text);
    }
    let mut out = format!("ERROR: {e}\n");
    if let BuildError::Run { tail, .. } = e {
        if !tail.is_empty() {
            out.push_str("------\n");
            for l in tail {
                out.push_str(&format!(" > {l}\n"));
            }
            out.push_str("------\n");
        }
    }
    if let Some(line) = e.line() {
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!("{name}:{line}\n--------------------\n"));
        let lo = line.saturating_sub(2).max(1);
        let hi = (line + 2).min(lines.len());
        for n in lo..=hi {
            let marker = if n == line { ">>>" } else { "   " };
            out.push_str(&format!(
                "{marker}{n:>3} | {}\n",
                lines.get(n - 1).copied().unwrap_or_default()
            ));
        }
        out.push_str("--------------------\n");
    }
    out
}

/// Deletes the oldest results that --no-cache rebuilds replaced once they
/// take more than a tenth of the store's filesystem (`kiln prune` deletes
/// them all). Best effort: a failure here does not fail the build.
fn sweep_retired(root: &Path) {
    if !kiln_cache::retired_over_budget(root) {
        return;
    }
    let Ok(store) = kiln_cache::Store::open(root) else {
        return;
    };
    let _ = store.sweep_retired(store.retired_budget());
}

/// Runs `kiln build`.
pub fn run(root: &Path, a: BuildArgs) -> anyhow::Result<ExitCode> {
    // Kept until the build is over: the temporary directory of a context
    // from stdin, git or a URL.
    let (mut opts, name, _context_dir) = options(&a, &root.join("tmp"))?;
    if a.check {
        return check(root, &opts.dockerfile, &name);
    }
    let outputs = a
        .outputs
        .iter()
        .map(|o| crate::output::OutputSpec::parse(o))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for o in &outputs {
        opts.tags.extend(o.names()?);
    }
    let epoch = opts.source_date_epoch;
    let text = opts.dockerfile.clone();
    let store = kiln_cache::Store::open(root)
        .map_err(|e| anyhow::anyhow!("opening the store at {}: {e}", root.display()))?;
    for ctx in opts.named_contexts.values_mut() {
        if let kiln_solver::contexts::NamedContext::OciLayout(dir, tag) = ctx {
            let name = import_oci_layout(&store, dir, tag.as_deref())
                .map_err(|e| usage(format!("{e:#}")))?;
            *ctx = kiln_solver::contexts::NamedContext::Image(name);
        }
    }
    let registry = crate::registry_cmds::registry_config(&a.insecure_registry)?;
    let caches = crate::build_cache::CacheFlags::parse(&a.cache_from, &a.cache_to)?;
    let store_backend =
        kiln_solver::store::StoreBackend::new(store).with_registry(registry.clone(), a.pull);
    let (backend, cache): (Arc<dyn kiln_solver::backend::Backend>, _) = if caches.any() {
        let c = crate::build_cache::backend(store_backend, registry, &caches, a.quiet);
        (c.clone(), Some(c))
    } else {
        (Arc::new(store_backend), None)
    };
    let executor = kiln_executor::Executor::new(kiln_executor::ExecutorConfig {
        state_dir: root.join("tmp").join("executor"),
        ..Default::default()
    });
    let mode = if a.quiet { Mode::Quiet } else { a.progress };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let (progress_tx, rx) = kiln_solver::progress::channel();
        let render = tokio::spawn(progress::render(mode, rx));
        let cancel = kiln_executor::CancellationToken::new();
        crate::signals::cancel_on_interrupt(&cancel);
        let r = kiln_solver::build(backend, executor, progress_tx, cancel, opts).await;
        let _ = render.await;
        r
    });
    match result {
        Ok(r) => {
            crate::output::run_outputs(
                root,
                &outputs,
                &r.manifest_digest,
                &a.insecure_registry,
                epoch,
                a.quiet,
            )?;
            if let Some(c) = &cache {
                crate::build_cache::export(c, &caches, &outputs, &r.manifest_digest, a.quiet)?;
            }
            if let Some(f) = &a.iidfile {
                std::fs::write(f, &r.image_id)?;
            }
            if a.quiet {
                outln!("{}", r.image_id);
            }
            sweep_retired(root);
            Ok(ExitCode::SUCCESS)
        }
        Err(BuildError::Usage(m)) => Err(usage(m)),
        Err(e) => {
            eprint!("{}", render_error(&e, &name, &text));
            Ok(ExitCode::from(1))
        }
    }
}

/// `kiln build --check`: lint the Dockerfile, print the findings with
/// their lines, build nothing. Fails only under `# check=error=true`.
fn check(root: &Path, text: &str, name: &str) -> anyhow::Result<ExitCode> {
    let df = kiln_parser::parse(text).map_err(|e| usage(format!("{name}: {e}")))?;
    // Base images' variables come from the local store when it has them
    // (nothing is pulled for a check).
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
    let report = kiln_solver::lint::lint_with(&df, &base_env);
    let lines: Vec<&str> = text.lines().collect();
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
