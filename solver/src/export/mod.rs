//! Exporters: where a built image goes, behind one [`Exporter`] trait that
//! `kiln build --output`, `kiln save`, `kiln export`, `kiln push` and
//! embedders all use, through one path ([`run`]: one lease, one
//! [`Reporter`]).
//!
//! * the local store under more names (`type=image`: the build records
//!   them, nothing to write),
//! * a registry ([`RegistryExporter`]: `type=registry`,
//!   `type=image,push=true`, `kiln push`),
//! * a docker-archive or OCI layout ([`ArchiveExporter`]: `type=docker`,
//!   `type=oci`, `tar=false` for a directory, `kiln save`),
//! * the final filesystem in a directory ([`LocalExporter`]: `type=local`)
//!   or one tar ([`TarExporter`]: `type=tar`, `kiln export`),
//! * the build cache ([`cache::CacheExporter`]: `--cache-to`).
//!
//! [`OutputSpec`] parses BuildKit's `--output` syntax into exporters;
//! `dest=-` writes to stdout.

pub mod cache;
mod local;
pub mod outfile;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_cache::Store;
use kiln_image::archive::ArchiveImage;
use kiln_image::compression::{Compression, CompressionOpts};
use kiln_image::manifest::RawManifest;
use kiln_registry::{RegistryConfig, Transfer};

use crate::progress::{Event, Progress};
use crate::remote_cache::RemoteCacheBackend;
use crate::transfer::{self, LayerEncoding};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A bad `--output` / `--cache-to` value or destination (a usage
    /// error: the CLI exits 2).
    #[error("{0}")]
    Usage(String),
    /// Stdout is a terminal: no archive is written there (a usage
    /// error).
    #[error("refusing to write an archive to a terminal; use dest=FILE")]
    Terminal,
    /// The reader of stdout went away while an archive was written there.
    #[error("writing to stdout: {0}")]
    BrokenPipe(#[source] std::io::Error),
    /// Reading or writing a file.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The store.
    #[error(transparent)]
    Store(#[from] kiln_cache::Error),
    /// An image format (manifest, archive, layer).
    #[error(transparent)]
    Image(#[from] kiln_image::ImageError),
    /// Pulling, pushing or encoding an image.
    #[error("{0}")]
    Transfer(#[from] crate::transfer::TransferError),
    /// Importing or exporting the build cache.
    #[error("{0}")]
    RemoteCache(#[from] crate::remote_cache::RemoteCacheError),
    /// There is nothing of that kind to export (no image, no build cache).
    #[error("{0}")]
    Nothing(&'static str),
    /// What was being done, and the typed cause.
    #[error("{context}: {cause}")]
    Context {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        cause: crate::error::Cause,
    },
    /// A lower error, shown as it is.
    #[error("{0}")]
    Source(#[source] crate::error::Cause),
}

impl ExportError {
    /// Whether this comes from writing to a pipe whose reader is gone.
    pub fn is_broken_pipe(&self) -> bool {
        match self {
            ExportError::BrokenPipe(_) => true,
            ExportError::Io(e) => e.kind() == std::io::ErrorKind::BrokenPipe,
            ExportError::Image(kiln_image::ImageError::Io(e)) => {
                e.kind() == std::io::ErrorKind::BrokenPipe
            }
            _ => false,
        }
    }
}

fn usage(msg: impl Into<String>) -> ExportError {
    ExportError::Usage(msg.into())
}

/// Where exporters, pulls, pushes and the build's cache import report
/// what they do: [`Event::Note`], [`Event::Warning`] and
/// [`Event::Transfer`] events of the one progress event type. A
/// [`Progress`] sender is a reporter (an embedder subscribes once, to its
/// receiver); the CLI renders the events as lines (notes unless `-q`,
/// warnings always); the default, [`TracingReporter`], logs them.
pub trait Reporter: Send + Sync {
    /// One event.
    fn event(&self, e: Event);
    /// A progress line ("exporting cache to …").
    fn note(&self, line: &str) {
        self.event(Event::Note {
            message: line.to_string(),
        })
    }
    /// A warning line, shown even when quiet.
    fn warn(&self, line: &str) {
        self.event(Event::Warning {
            message: line.to_string(),
        })
    }
    /// A blob transfer of a pull (`verb` "pull") or push ("push").
    fn transfer(&self, verb: &'static str, t: Transfer) {
        self.event(Event::transfer(verb, t))
    }
    /// Opens a step of the build's view for one exporter (`exporting to
    /// oci image format`, as BuildKit names them); [`run`] makes its notes
    /// the step's lines until [`Reporter::step_done`]. `None` (the
    /// default): no view, the notes stay lines of their own.
    fn step(&self, _name: &str) -> Option<usize> {
        None
    }
    /// Closes step `id` (from [`Reporter::step`]): done after `elapsed`,
    /// or failed with `error`.
    fn step_done(&self, _id: usize, _elapsed: std::time::Duration, _error: Option<String>) {}
}

/// A reporter whose notes are the lines of one step (its exporter's):
/// `=> => writing layer …` under `=> exporting cache to registry`.
struct StepReporter<'a> {
    inner: &'a dyn Reporter,
    id: usize,
    started: std::time::Instant,
}

impl Reporter for StepReporter<'_> {
    fn event(&self, e: Event) {
        match e {
            Event::Note { message } => self.inner.event(Event::Log {
                id: self.id,
                stream: "stdout",
                line: message,
                elapsed: self.started.elapsed().as_secs_f64(),
            }),
            e => self.inner.event(e),
        }
    }
}

/// A [`Reporter`] that logs with `tracing` (info for notes, warn for
/// warnings, debug for transfers).
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingReporter;

impl Reporter for TracingReporter {
    fn event(&self, e: Event) {
        match e {
            Event::Note { message } | Event::Info { message } => tracing::info!("{message}"),
            Event::Warning { message } => tracing::warn!("{message}"),
            e => tracing::debug!(event = ?e, "progress"),
        }
    }
}

/// The build's progress sender as a reporter: every event goes on the
/// one (bounded) stream, and each exporter is a step of the view.
impl Reporter for Progress {
    fn event(&self, e: Event) {
        self.send(e)
    }
    fn step(&self, name: &str) -> Option<usize> {
        Some(self.start(name.to_string()))
    }
    fn step_done(&self, id: usize, elapsed: std::time::Duration, error: Option<String>) {
        match error {
            None => self.done(id, elapsed),
            Some(error) => self.send(Event::Failed { id, error }),
        }
    }
}

/// What an exporter is given: images of the store (a build exports one;
/// `kiln save` several), and what the build knew.
pub struct ExportInput<'a> {
    /// The store the images are in.
    pub store: &'a Store,
    /// The images, each with the names it goes under (may be empty).
    pub images: Vec<ArchiveImage>,
    /// SOURCE_DATE_EPOCH of the build (`rewrite-timestamp=true`).
    pub source_date_epoch: Option<i64>,
    /// The build's cache records, for cache exporters.
    pub cache: Option<&'a RemoteCacheBackend>,
}

impl ExportInput<'_> {
    /// The (first) image.
    pub fn image(&self) -> Result<&ArchiveImage, ExportError> {
        self.images
            .first()
            .ok_or_else(|| ExportError::Nothing("nothing to export"))
    }
}

/// What an export did that a caller may want to print.
#[derive(Debug, Clone, Default)]
pub struct Exported {
    /// Images pushed: (destination, manifest digest).
    pub pushed: Vec<(String, kiln_image::Digest)>,
}

/// One destination of a built image.
pub trait Exporter: Send + Sync {
    /// Its step's name in the build's view (BuildKit's: `exporting to oci
    /// image format`).
    fn title(&self) -> String {
        "exporting".to_string()
    }
    /// Writes `input` out.
    fn export(
        &self,
        input: &ExportInput<'_>,
        report: &dyn Reporter,
    ) -> Result<Exported, ExportError>;
}

/// The one export path: runs `exporters` in order over `input` under one
/// lease (what they write is kept from a concurrent prune until done) and
/// gathers what they did.
pub fn run(
    input: &ExportInput<'_>,
    exporters: &[Box<dyn Exporter>],
    report: &dyn Reporter,
) -> Result<Exported, ExportError> {
    // The exporters write through a handle holding the export's own lease.
    let store = input.store.leased(None)?;
    let input = &ExportInput {
        store: &store,
        images: input.images.clone(),
        source_date_epoch: input.source_date_epoch,
        cache: input.cache,
    };
    let mut all = Exported::default();
    tracing::info!(exporters = exporters.len(), "export started");
    for e in exporters {
        let started = std::time::Instant::now();
        let done = match report.step(&e.title()) {
            Some(id) => {
                let r = e.export(
                    input,
                    &StepReporter {
                        inner: report,
                        id,
                        started,
                    },
                );
                report.step_done(
                    id,
                    started.elapsed(),
                    r.as_ref().err().map(|e| e.to_string()),
                );
                r?
            }
            None => e.export(input, report)?,
        };
        // A later exporter re-putting a name (inline cache) replaces the
        // digest an earlier one reported for it.
        for (n, d) in done.pushed {
            match all.pushed.iter_mut().find(|(m, _)| *m == n) {
                Some(e) => e.1 = d,
                None => all.pushed.push((n, d)),
            }
        }
    }
    tracing::info!("export done");
    Ok(all)
}

/// The image named `manifest_digest` in `store`, with no names.
pub fn stored_image(store: &Store, manifest_digest: &str) -> Result<ArchiveImage, ExportError> {
    let md: kiln_cache::Digest = manifest_digest
        .parse()
        .map_err(|e| ExportError::Source(crate::error::Cause::new(e)))?;
    Ok(ArchiveImage {
        names: Vec::new(),
        manifest: RawManifest::new(store.content().read(&md)?, None)?,
    })
}

/// The store's content as a [`kiln_image::archive::BlobSource`].
pub struct StoreBlobs<'a>(pub &'a Store);

impl kiln_image::archive::BlobSource for StoreBlobs<'_> {
    fn open_blob(&self, d: &kiln_image::Digest) -> std::io::Result<Box<dyn std::io::Read + '_>> {
        let cd: kiln_cache::Digest = d
            .as_str()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
        self.0
            .open_blob(&cd)
            .map(|r| -> Box<dyn std::io::Read + '_> { r })
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{e}")))
    }
    fn blob_size(&self, d: &kiln_image::Digest) -> std::io::Result<u64> {
        let cd: kiln_cache::Digest = d
            .as_str()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e}")))?;
        self.0
            .blob_size(&cd)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{e}")))
    }
    fn tar_size(&self, diff_id: &kiln_image::Digest) -> Option<u64> {
        let cd: kiln_cache::Digest = diff_id.as_str().parse().ok()?;
        // Recorded when the layer was unpacked or built: checked then.
        self.0.meta().diff_size(&cd).ok().flatten()
    }
}

/// One `--output` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    /// `image`, `registry`, `docker`, `oci`, `local`, `tar`.
    pub kind: String,
    /// The other `key=value` attributes.
    pub attrs: BTreeMap<String, String>,
}

impl OutputSpec {
    /// Parses `type=docker,dest=out.tar`; a bare `DIR` is `type=local,dest=DIR`
    /// and a bare `-` is `type=tar,dest=-`, as in BuildKit.
    pub fn parse(s: &str) -> Result<OutputSpec, ExportError> {
        if !s.contains('=') {
            let kind = if s == "-" { "tar" } else { "local" };
            return Ok(OutputSpec {
                kind: kind.into(),
                attrs: [("dest".to_string(), s.to_string())].into(),
            });
        }
        let mut attrs = BTreeMap::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| usage(format!("--output {s:?}: {part:?} is not key=value")))?;
            attrs.insert(k.trim().to_string(), v.trim().to_string());
        }
        let kind = attrs.remove("type").unwrap_or_else(|| "local".into());
        match kind.as_str() {
            "image" | "registry" => {}
            "docker" | "oci" | "local" | "tar" => {
                if !attrs.contains_key("dest") {
                    return Err(usage(format!("--output type={kind} needs dest=")));
                }
            }
            other => {
                return Err(usage(format!(
                    "--output: unknown type {other:?} (image, registry, docker, oci, local, tar)"
                )))
            }
        }
        if kind == "registry" && !attrs.contains_key("name") {
            return Err(usage("--output type=registry needs name="));
        }
        Ok(OutputSpec { kind, attrs })
    }

    fn flag(&self, k: &str) -> bool {
        self.attrs.get(k).is_some_and(|v| v == "true" || v == "1")
    }

    /// The names (normalised) this output gives the image in the store.
    pub fn names(&self) -> Result<Vec<String>, ExportError> {
        let Some(n) = self.attrs.get("name") else {
            return Ok(Vec::new());
        };
        n.split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                kiln_cache::normalize_reference(s)
                    .map_err(|e| usage(format!("--output name={s:?}: {e}")))
            })
            .collect()
    }

    /// Whether this output pushes to a registry.
    pub fn pushes(&self) -> bool {
        self.kind == "registry" || (self.kind == "image" && self.flag("push"))
    }

    /// Layer encoding from `compression=`, `compression-level=`,
    /// `force-compression=`, `oci-mediatypes=`.
    pub fn encoding(&self, default_oci: bool) -> Result<LayerEncoding, ExportError> {
        let kind: Compression = match self.attrs.get("compression") {
            Some(c) => c.parse().map_err(|_| {
                usage(format!(
                    "--output compression={c:?}: gzip, zstd or uncompressed"
                ))
            })?,
            None => Compression::Gzip,
        };
        let level = self
            .attrs
            .get("compression-level")
            .map(|l| {
                l.parse::<i32>()
                    .map_err(|_| usage(format!("--output compression-level={l:?}")))
            })
            .transpose()?;
        let oci = match self.attrs.get("oci-mediatypes").map(String::as_str) {
            Some("true") => true,
            Some("false") => false,
            Some(o) => {
                return Err(usage(format!(
                    "--output oci-mediatypes={o:?}: true or false"
                )))
            }
            None => default_oci,
        };
        Ok(LayerEncoding {
            compression: CompressionOpts { kind, level },
            force: self.flag("force-compression"),
            oci_media_types: oci,
        })
    }

    /// The exporter of this output; `None` for `type=image` without push
    /// (its names are recorded by the build). `registry` is used by
    /// outputs that push.
    pub fn exporter(
        &self,
        registry: &RegistryConfig,
    ) -> Result<Option<Box<dyn Exporter>>, ExportError> {
        let rewrite = self.flag("rewrite-timestamp");
        Ok(Some(match self.kind.as_str() {
            "image" | "registry" if self.pushes() => {
                let names = self.names()?;
                if names.is_empty() {
                    return Err(usage("--output push=true needs name="));
                }
                Box::new(RegistryExporter {
                    registry: registry.clone(),
                    names,
                    encoding: self.encoding(true)?,
                    jobs: 4,
                })
            }
            "docker" | "oci" => {
                let oci = self.kind == "oci";
                let dest = self.attrs.get("dest").map(String::as_str).unwrap_or("-");
                let names = self
                    .names()?
                    .iter()
                    .map(|n| if oci { n.clone() } else { familiar(n) })
                    .collect();
                Box::new(ArchiveExporter {
                    format: if oci {
                        ArchiveFormat::Oci
                    } else {
                        ArchiveFormat::Docker
                    },
                    dest: if oci && self.attrs.get("tar").is_some_and(|t| t == "false") {
                        Dest::Dir(PathBuf::from(dest))
                    } else {
                        Dest::parse(dest)
                    },
                    names: Some(names),
                    encoding: if oci || self.attrs.contains_key("compression") {
                        Some(self.encoding(oci)?)
                    } else {
                        None
                    },
                })
            }
            "local" => {
                let dest = self.attrs.get("dest").map(String::as_str).unwrap_or(".");
                if dest == "-" {
                    Box::new(TarExporter {
                        dest: Dest::Stdout,
                        rewrite_timestamp: rewrite,
                    })
                } else {
                    Box::new(LocalExporter {
                        dir: PathBuf::from(dest),
                    })
                }
            }
            "tar" => Box::new(TarExporter {
                dest: Dest::parse(self.attrs.get("dest").map(String::as_str).unwrap_or("-")),
                rewrite_timestamp: rewrite,
            }),
            _ => return Ok(None),
        }))
    }
}

/// Where an archive goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// Standard output (refused when it is a terminal).
    Stdout,
    /// A file, written atomically ([`outfile::write_atomically`]).
    File(PathBuf),
    /// A directory (an OCI layout with `tar=false`).
    Dir(PathBuf),
}

impl Dest {
    /// `-` is stdout, anything else a file.
    pub fn parse(s: &str) -> Dest {
        if s == "-" {
            Dest::Stdout
        } else {
            Dest::File(PathBuf::from(s))
        }
    }

    /// Opens the destination for writing, runs `f`, and (for a file)
    /// renames a temp file into place so a failure leaves no half-written
    /// file. Stdout on a terminal is refused ([`ExportError::Terminal`]).
    pub fn write(
        &self,
        f: impl FnOnce(&mut dyn Write) -> Result<(), ExportError>,
    ) -> Result<(), ExportError> {
        use std::io::IsTerminal;
        match self {
            Dest::Stdout => {
                let out = std::io::stdout();
                if out.is_terminal() {
                    return Err(ExportError::Terminal);
                }
                let mut lock = std::io::BufWriter::new(out.lock());
                match f(&mut lock).and_then(|()| Ok(lock.flush()?)) {
                    Err(e) if e.is_broken_pipe() => Err(ExportError::BrokenPipe(
                        std::io::ErrorKind::BrokenPipe.into(),
                    )),
                    r => r,
                }
            }
            Dest::File(p) | Dest::Dir(p) => outfile::write_atomically(p, f),
        }
    }
}

/// The final filesystem of `manifest` unpacked into `dir`, a new
/// directory of the store's (layers applied in order, whiteouts deleting
/// what earlier layers wrote). Every write is resolved inside `dir` with
/// file descriptors (the applier's `RESOLVE_IN_ROOT`); device nodes are
/// left out (a tar or local export never makes one), and named in a
/// warning. Set-id bits and file capabilities are kept: a tar export
/// keeps them, a local export leaves them out as it copies (see
/// `local`).
pub fn unpack_rootfs(
    store: &Store,
    manifest: &RawManifest,
    dir: &Path,
    report: &dyn Reporter,
) -> Result<(), ExportError> {
    std::fs::create_dir_all(dir)?;
    let m = manifest.manifest()?;
    let opts = kiln_image::apply::ApplyOptions {
        skip_devices: true,
        ..Default::default()
    };
    let mut skipped = Vec::new();
    let mut merge = kiln_image::apply::Merge::default();
    // Each layer is proved to be the diffID its config names as it is
    // applied (a pulled image's blobs are not trusted for their names).
    let src = |e: kiln_cache::Error| ExportError::Source(crate::error::Cause::new(e));
    let cd: kiln_cache::Digest = m
        .config
        .digest
        .as_str()
        .parse()
        .map_err(|e| ExportError::Source(crate::error::Cause::new(e)))?;
    let config =
        kiln_image::config::ImageConfig::from_bytes(&store.content().read(&cd).map_err(src)?)
            .map_err(|e| ExportError::Source(crate::error::Cause::new(e)))?;
    if config.rootfs.diff_ids.len() != m.layers.len() {
        return Err(ExportError::Source(crate::error::Cause::new(
            std::io::Error::other(format!(
                "the image has {} layers but its config names {} diffIDs",
                m.layers.len(),
                config.rootfs.diff_ids.len()
            )),
        )));
    }
    for (l, diff_id) in m.layers.iter().zip(&config.rootfs.diff_ids) {
        let d: kiln_cache::Digest = l
            .digest
            .as_str()
            .parse()
            .map_err(|e| ExportError::Source(crate::error::Cause::new(e)))?;
        let diff: kiln_cache::Digest = diff_id
            .as_str()
            .parse()
            .map_err(|e| ExportError::Source(crate::error::Cause::new(e)))?;
        let layer = kiln_cache::LayerBlob {
            digest: &d,
            size: Some(l.size),
            diff_id: &diff,
        };
        let st = store
            .apply_blob_merging(layer, dir, &opts, &mut merge)
            .map_err(|e| ExportError::Context {
                context: format!("layer {}", l.digest),
                cause: crate::error::Cause::new(e),
            })?;
        skipped.extend(st.skipped_devices);
    }
    if !skipped.is_empty() {
        let names: Vec<String> = skipped
            .iter()
            .map(|p| format!("/{}", p.display()))
            .collect();
        report.warn(&format!(
            "warning: {} device node(s) not exported (kiln never creates device nodes on the host): {}",
            names.len(),
            names.join(", ")
        ));
    }
    Ok(())
}

/// The final filesystem of `manifest` as one tar on `out`; `clamp`
/// pins later mtimes (SOURCE_DATE_EPOCH / rewrite-timestamp).
pub fn rootfs_tar(
    store: &Store,
    manifest: &RawManifest,
    out: &mut dyn Write,
    clamp: Option<i64>,
    report: &dyn Reporter,
) -> Result<(), ExportError> {
    let tmp = tempfile::tempdir_in(store.tmp_dir())?;
    let root = tmp.path().join("rootfs");
    unpack_rootfs(store, manifest, &root, report)?;
    let opts = kiln_image::diff::DiffOptions {
        clamp_mtime: clamp,
        exclude: Vec::new(),
        cancel: None,
    };
    kiln_image::diff::write_tree_diff(None, &root, out, &opts)?;
    Ok(())
}

/// The filesystems a local or tar export writes: one image's at the top
/// (an empty subdirectory), or, for an index (a multi-platform build),
/// each stored child's under `os_arch[_variant]` (`linux_arm64`), as
/// BuildKit's local exporter writes them.
pub fn platform_roots(
    store: &Store,
    manifest: &RawManifest,
) -> Result<Vec<(PathBuf, RawManifest)>, ExportError> {
    if !manifest.is_index() {
        return Ok(vec![(PathBuf::new(), manifest.clone())]);
    }
    let children = crate::platforms::stored_children(store, manifest)
        .map_err(|e| ExportError::Source(crate::error::Cause::new(e)))?;
    let mut out = Vec::with_capacity(children.len());
    for d in children {
        let Some(p) = d.platform.as_ref() else {
            continue;
        };
        // Checked as a platform string (no `/`, only [A-Za-z0-9_.-] in a
        // component): the name is one path component of `os_arch`.
        let p = kiln_image::platform::parse(&p.to_string())
            .map_err(|e| ExportError::Source(crate::error::Cause::new(e)))?;
        let dir = match &p.variant {
            Some(v) => format!("{}_{}_{v}", p.os, p.architecture),
            None => format!("{}_{}", p.os, p.architecture),
        };
        let md: kiln_cache::Digest = d
            .digest
            .as_str()
            .parse()
            .map_err(|e| ExportError::Source(crate::error::Cause::new(e)))?;
        let raw = RawManifest::new(store.content().read(&md)?, Some(&d.media_type))?;
        out.push((PathBuf::from(dir), raw));
    }
    Ok(out)
}

/// `docker.io/library/busybox:1` -> `busybox:1` (docker's familiar name).
pub fn familiar(name: &str) -> String {
    kiln_image::reference::familiar(name).to_string()
}

/// Pushes the image to a registry under each name.
#[derive(Debug, Clone)]
pub struct RegistryExporter {
    /// Registry settings (insecure hosts, credentials).
    pub registry: RegistryConfig,
    /// Normalised destinations.
    pub names: Vec<String>,
    /// Layer encoding.
    pub encoding: LayerEncoding,
    /// Blobs uploaded at once.
    pub jobs: usize,
}

impl Exporter for RegistryExporter {
    fn title(&self) -> String {
        format!("pushing {}", self.names.join(", "))
    }
    fn export(
        &self,
        input: &ExportInput<'_>,
        report: &dyn Reporter,
    ) -> Result<Exported, ExportError> {
        let img = input.image()?;
        let mut done = Exported::default();
        for n in &self.names {
            let _span = tracing::info_span!("push", dest = %n).entered();
            // A multi-platform build's index goes whole: its images, then it.
            let d = transfer::push(
                input.store,
                &self.registry,
                &img.manifest,
                n,
                self.encoding,
                self.jobs,
                &|m: &str| report.note(m),
                &|t| report.transfer("push", t),
            )?;
            tracing::info!(digest = %d, "pushed");
            done.pushed.push((n.clone(), d));
        }
        Ok(done)
    }
}

/// The two archive formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// docker-archive (`docker save` / `docker load`).
    Docker,
    /// An OCI image layout (in a tar, or a directory).
    Oci,
}

/// Writes the images as a docker-archive or OCI layout.
#[derive(Debug, Clone)]
pub struct ArchiveExporter {
    /// Which format.
    pub format: ArchiveFormat,
    /// Where (a directory only for an OCI layout).
    pub dest: Dest,
    /// The names for the (one) image, replacing the input's names.
    pub names: Option<Vec<String>>,
    /// Layers re-encoded first (the OCI output's media types, or an
    /// explicit `compression=`); `None` writes the stored blobs.
    pub encoding: Option<LayerEncoding>,
}

impl Exporter for ArchiveExporter {
    fn title(&self) -> String {
        match self.format {
            ArchiveFormat::Oci => "exporting to oci image format",
            ArchiveFormat::Docker => "exporting to docker image format",
        }
        .to_string()
    }
    fn export(
        &self,
        input: &ExportInput<'_>,
        report: &dyn Reporter,
    ) -> Result<Exported, ExportError> {
        let _span =
            tracing::info_span!("export", format = ?self.format, dest = ?self.dest).entered();
        let mut images = input.images.clone();
        if let Some(names) = &self.names {
            let first = images
                .first_mut()
                .ok_or_else(|| ExportError::Nothing("nothing to export"))?;
            first.names = names.clone();
        }
        if let Some(enc) = self.encoding {
            for img in &mut images {
                let note = |m: &str| report.note(m);
                img.manifest = if img.manifest.is_index() {
                    transfer::encode_index(input.store, &img.manifest, enc, 4, &note)?
                } else {
                    transfer::encode_image(input.store, &img.manifest, enc, 4, &note)?
                };
            }
        }
        let blobs = StoreBlobs(input.store);
        let oci = self.format == ArchiveFormat::Oci;
        if let Dest::Dir(d) = &self.dest {
            kiln_image::archive::write_oci_dir(d, &images, &blobs)?;
            return Ok(Exported::default());
        }
        self.dest.write(|w| {
            if oci {
                kiln_image::archive::write_oci_archive(w, &images, &blobs)?;
            } else {
                kiln_image::archive::write_docker_archive(w, &images, &blobs)?;
            }
            Ok(())
        })?;
        Ok(Exported::default())
    }
}

/// Unpacks the image's final filesystem into a directory.
#[derive(Debug, Clone)]
pub struct LocalExporter {
    /// The directory.
    pub dir: PathBuf,
}

impl Exporter for LocalExporter {
    fn title(&self) -> String {
        "exporting to client directory".to_string()
    }
    fn export(
        &self,
        input: &ExportInput<'_>,
        report: &dyn Reporter,
    ) -> Result<Exported, ExportError> {
        let _span =
            tracing::info_span!("export", kind = "local", dir = %self.dir.display()).entered();
        // The image's final tree merged into dest (see `local`): the
        // layers applied in a directory of the store first.
        let dest = local::open_dest(&self.dir)?;
        for (sub, manifest) in platform_roots(input.store, &input.image()?.manifest)? {
            let target = if sub.as_os_str().is_empty() {
                kiln_fs::Root::from_dir(dest.dir().try_clone().map_err(std::io::Error::from)?)
            } else {
                platform_subdir(&dest, &sub)?
            };
            let tmp = tempfile::tempdir_in(input.store.tmp_dir())?;
            let tree = tmp.path().join("rootfs");
            unpack_rootfs(input.store, &manifest, &tree, report)?;
            let src = kiln_fs::Root::open(&tree).map_err(std::io::Error::from)?;
            local::merge_tree(&src, &target)?;
        }
        Ok(Exported::default())
    }
}

/// `dest/linux_arm64`, made a real directory of `dest` (created if
/// missing). What is already there came perhaps from an earlier export of
/// an untrusted image: a symlink (or anything not a directory) by that
/// name is refused, never followed out of `dest`.
fn platform_subdir(dest: &kiln_fs::Root, sub: &Path) -> Result<kiln_fs::Root, ExportError> {
    match dest.dir().stat(sub.as_os_str()) {
        Ok(Some(st)) if !st.is_dir() => {
            return Err(ExportError::Usage(format!(
                "{} exists and is not a directory (a symlink is never followed out of dest): remove it or pick another dest",
                dest.path().join(sub).display()
            )))
        }
        Ok(_) => {}
        Err(e) => return Err(ExportError::Source(crate::error::Cause::new(e))),
    }
    let d = dest
        .mkdir_all(sub, kiln_fs::Follow::Never, &kiln_fs::DirSpec::default())
        .map_err(|e| ExportError::Source(crate::error::Cause::new(e)))?;
    Ok(kiln_fs::Root::from_dir(d))
}

/// Writes the image's final filesystem as one tar.
#[derive(Debug, Clone)]
pub struct TarExporter {
    /// Where.
    pub dest: Dest,
    /// Clamp mtimes to the build's SOURCE_DATE_EPOCH.
    pub rewrite_timestamp: bool,
}

impl Exporter for TarExporter {
    fn title(&self) -> String {
        "exporting to client tarball".to_string()
    }
    fn export(
        &self,
        input: &ExportInput<'_>,
        report: &dyn Reporter,
    ) -> Result<Exported, ExportError> {
        let _span = tracing::info_span!("export", kind = "tar", dest = ?self.dest).entered();
        let clamp = if self.rewrite_timestamp {
            input.source_date_epoch
        } else {
            None
        };
        let roots = platform_roots(input.store, &input.image()?.manifest)?;
        self.dest.write(|w| match &roots[..] {
            [(sub, manifest)] if sub.as_os_str().is_empty() => {
                rootfs_tar(input.store, manifest, w, clamp, report)
            }
            _ => {
                // Several platforms: one tar with a directory each.
                let tmp = tempfile::tempdir_in(input.store.tmp_dir())?;
                let root = tmp.path().join("rootfs");
                for (sub, manifest) in &roots {
                    unpack_rootfs(input.store, manifest, &root.join(sub), report)?;
                }
                let opts = kiln_image::diff::DiffOptions {
                    clamp_mtime: clamp,
                    exclude: Vec::new(),
                    cancel: None,
                };
                kiln_image::diff::write_tree_diff(None, &root, w, &opts)?;
                Ok(())
            }
        })?;
        Ok(Exported::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_buildkit_syntax() {
        let o = OutputSpec::parse("type=registry,name=127.0.0.1:5000/a:1,compression=zstd")
            .expect("ok");
        assert!(o.pushes());
        assert_eq!(
            o.encoding(true).expect("enc").compression.kind,
            Compression::Zstd
        );
        let o = OutputSpec::parse("out").expect("ok");
        assert_eq!(o.kind, "local");
        let o = OutputSpec::parse("-").expect("ok");
        assert_eq!(o.kind, "tar");
        assert!(OutputSpec::parse("type=docker").is_err());
        assert!(OutputSpec::parse("type=nope,dest=x").is_err());
        assert!(OutputSpec::parse("type=image,name=a,push=true")
            .expect("ok")
            .pushes());
    }
}
