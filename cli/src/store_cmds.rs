//! Store commands: `kiln load`, `kiln import`, `kiln prune`,
//! `kiln system df`, `kiln system check`. Glue only: formats come from
//! kiln-image, everything on disk from kiln-cache.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use kiln_solver::cache::{normalize_reference, PruneOptions, Store};

/// `kiln load` arguments.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// The archive: docker-archive (`docker save`) or OCI layout tar, plain,
    /// gzip or zstd compressed.
    #[arg(short = 'i', long = "input", value_name = "FILE")]
    pub input: PathBuf,
    /// Print only the loaded names.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `kiln import` arguments.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A root filesystem tar (plain, gzip or zstd); `-` for stdin.
    #[arg(value_name = "ROOTFS.tar")]
    pub file: PathBuf,
    /// The name to tag, `NAME[:TAG]`.
    #[arg(value_name = "NAME[:TAG]")]
    pub name: String,
    /// Commit message recorded in the image history.
    #[arg(short, long)]
    pub message: Option<String>,
    /// Apply a Dockerfile instruction to the image config, e.g.
    /// `-c 'CMD ["bash"]'` (repeatable, in order): CMD, ENTRYPOINT, ENV,
    /// EXPOSE, HEALTHCHECK, LABEL, ONBUILD, STOPSIGNAL, USER, VOLUME, WORKDIR.
    #[arg(short, long = "change", value_name = "INSTRUCTION")]
    pub change: Vec<String>,
}

/// `kiln prune` arguments.
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Remove all build cache (and `RUN --mount=type=cache` directories),
    /// not only what is unreferenced.
    #[arg(short, long)]
    pub all: bool,
    /// Keep this much build cache (most recently used first), e.g. `10GB`.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub keep_storage: Option<u64>,
}

/// `kiln system …`.
#[derive(Subcommand, Debug)]
pub enum SystemCommand {
    /// Show what uses the store's space.
    Df {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify the store; exits 1 naming what is wrong.
    ///
    /// By default: every blob file is re-hashed against its digest and
    /// size (a layer kept as its snapshot's diff is written again from the
    /// snapshot and hashed), every reference of the metadata database is
    /// followed, every snapshot's directory is present, and every layer
    /// snapshot's name is the chain ID of its parent and the diffID it was
    /// verified against when it was made (kiln commits a snapshot only
    /// after hashing the layer's bytes against that diffID). The files
    /// inside an unpacked snapshot are not compared with the layer again.
    Check {
        /// Also decompress every stored image's layer blobs and hash them
        /// against the diffIDs the image configs name.
        #[arg(long)]
        deep: bool,
    },
}

fn open(root: &Path) -> anyhow::Result<Store> {
    Store::open(root).with_context(|| format!("opening store {}", root.display()))
}

fn cache_digest(d: &kiln_solver::image::Digest) -> anyhow::Result<kiln_solver::cache::Digest> {
    d.as_str().parse().map_err(|e| anyhow!("{e}"))
}

/// Say plainly when the store's filesystem is full, whichever layer
/// noticed (kiln-image's spill, the content store, SQLite).
fn explain_enospc(root: &Path, e: anyhow::Error) -> anyhow::Error {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc_enospc()))
            || matches!(
                c.downcast_ref::<kiln_solver::cache::Error>(),
                Some(kiln_solver::cache::Error::NoSpace { .. })
            )
            || c.to_string().contains("No space left on device")
            || c.to_string().contains("database or disk is full")
    });
    if full {
        e.context(format!(
            "no space left on the store's filesystem ({}); free space or run `kiln prune`",
            root.display()
        ))
    } else {
        e
    }
}

const fn libc_enospc() -> i32 {
    28 // ENOSPC on Linux
}

/// `kiln load -i FILE`.
pub fn load(root: &Path, args: LoadArgs) -> anyhow::Result<ExitCode> {
    load_inner(root, args).map_err(|e| explain_enospc(root, e))
}

fn load_inner(root: &Path, args: LoadArgs) -> anyhow::Result<ExitCode> {
    let store = open(root)?;
    // The lease keeps what we write from a concurrent prune until tagged;
    // the GC guard keeps prune from reclaiming our spill directory.
    let _lease = store.lease(None)?;
    let _gc = store.gc_guard()?;
    let file =
        File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
    let archive = kiln_solver::image::archive::read_archive(file, store.tmp_dir())
        .with_context(|| format!("reading archive {}", args.input.display()))?;
    if archive.images.is_empty() {
        anyhow::bail!("{}: the archive holds no image", args.input.display());
    }
    let mut out = std::io::stdout().lock();
    for img in &archive.images {
        use kiln_solver::image::archive::BlobSource;
        let man = img.manifest.manifest().context("parsing manifest")?;
        let what = img
            .names
            .first()
            .cloned()
            .unwrap_or_else(|| man.config.digest.to_string());
        check_uncompressed_diff_ids(&what, &man, &img.config)?;
        let mut layers = Vec::new();
        for desc in std::iter::once(&man.config).chain(&man.layers) {
            let want = cache_digest(&desc.digest)?;
            let size = archive
                .blob_size(&desc.digest)
                .with_context(|| format!("blob {} missing from the archive", desc.digest))?;
            if size != desc.size {
                anyhow::bail!(
                    "{what}: blob {} is {size} bytes in the archive, its manifest says {}",
                    desc.digest,
                    desc.size
                );
            }
            // The archive's files were hashed as they were read: each is
            // taken into the store as it is (no copy), replacing a stored
            // copy that may have gone bad.
            let file = archive
                .blob_file(&desc.digest)
                .with_context(|| format!("blob {} missing from the archive", desc.digest))?;
            store
                .put_blob_file(file, &want, desc.size, Some(&desc.media_type))
                .with_context(|| format!("storing blob {}", desc.digest))?;
            layers.push(want);
        }
        let config = layers.remove(0);
        let manifest = store
            .put_bytes(&img.manifest.bytes, Some(&img.manifest.media_type))
            .context("storing manifest")?;
        if img.names.is_empty() {
            // Keep it reachable: an untagged load would be pruned at once.
            let name = format!("sha256:{}", config.hex());
            store.record_image(&name, &manifest, &config, &layers)?;
            writeln!(out, "Loaded image ID: {config}")?;
        }
        for n in &img.names {
            let name = normalize_reference(n).with_context(|| format!("image name {n:?}"))?;
            store.record_image(&name, &manifest, &config, &layers)?;
            if args.quiet {
                writeln!(out, "{name}")?;
            } else {
                writeln!(out, "Loaded image: {name}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A layer stored uncompressed is its own tar: its digest must be the
/// diffID the config names for it. Checked at load (free: the archive's
/// files were hashed as they were read), so that an image whose config
/// claims another layer's diffID is turned away at once; every layer,
/// compressed or not, is verified again when it is unpacked.
fn check_uncompressed_diff_ids(
    what: &str,
    man: &kiln_solver::image::manifest::ImageManifest,
    config: &[u8],
) -> anyhow::Result<()> {
    use kiln_solver::image::manifest::media_types;
    let cfg = kiln_solver::image::config::ImageConfig::from_bytes(config)
        .with_context(|| format!("{what}: parsing config"))?;
    if cfg.rootfs.diff_ids.len() != man.layers.len() {
        anyhow::bail!(
            "{what}: manifest has {} layers, config {} diffIDs",
            man.layers.len(),
            cfg.rootfs.diff_ids.len()
        );
    }
    for (i, (l, d)) in man.layers.iter().zip(&cfg.rootfs.diff_ids).enumerate() {
        let plain = matches!(
            l.media_type.as_str(),
            media_types::DOCKER_LAYER | media_types::OCI_LAYER
        );
        if plain && &l.digest != d {
            anyhow::bail!(
                "{what}: layer {} ({}): its content has diffID {}, but the image config says {d}; \
                 nothing was loaded",
                i + 1,
                l.digest,
                l.digest
            );
        }
    }
    Ok(())
}

/// `kiln import ROOTFS.tar NAME[:TAG]`.
pub fn import(root: &Path, args: ImportArgs) -> anyhow::Result<ExitCode> {
    import_inner(root, args).map_err(|e| explain_enospc(root, e))
}

fn import_inner(root: &Path, args: ImportArgs) -> anyhow::Result<ExitCode> {
    let name =
        normalize_reference(&args.name).with_context(|| format!("image name {:?}", args.name))?;
    // The changes first: a bad one fails before the tar is read.
    let mut config = kiln_solver::image::config::ContainerConfig::default();
    kiln_solver::change::apply_changes(&mut config, &args.change)?;
    let store = open(root)?;
    let _lease = store.lease(None)?;
    let _gc = store.gc_guard()?;
    let input: Box<dyn std::io::Read> = if args.file.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?,
        )
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let opts = kiln_solver::image::rootfs_tar::ImportOptions {
        created: Some(kiln_solver::image::config::rfc3339(now)),
        comment: args.message.clone(),
        config: Some(config),
        ..Default::default()
    };
    let mut writer = store.content().writer()?;
    let imported = kiln_solver::image::rootfs_tar::import_rootfs(input, &mut writer, &opts)
        .with_context(|| format!("importing {}", args.file.display()))?;
    let layer = cache_digest(&imported.layer.digest)?;
    let (layer, _) = store.commit_blob(
        writer,
        Some(&layer),
        Some(imported.layer.size),
        Some(&imported.layer.media_type),
    )?;
    let config = store.put_bytes(&imported.config, None)?;
    let manifest = store.put_bytes(
        &imported.manifest.bytes,
        Some(&imported.manifest.media_type),
    )?;
    store.record_image(&name, &manifest, &config, &[layer])?;
    println!("{config}");
    Ok(ExitCode::SUCCESS)
}

/// `kiln prune`.
pub fn prune(root: &Path, args: PruneArgs) -> anyhow::Result<ExitCode> {
    let store = open(root)?;
    let r = store.prune(&PruneOptions {
        all: args.all,
        keep_storage: args.keep_storage,
    })?;
    println!(
        "Deleted: {} blobs, {} snapshots, {} cache records, {} temp files; expired {} leases",
        r.blobs_removed,
        r.snapshots_removed,
        r.cache_records_removed,
        r.temp_removed,
        r.leases_expired
    );
    if r.cache_mounts_removed > 0 {
        println!("Deleted: {} cache mounts", r.cache_mounts_removed);
    }
    println!("Total reclaimed space: {}", human(r.bytes_freed));
    Ok(ExitCode::SUCCESS)
}

/// `kiln system df|check`.
pub fn system(root: &Path, cmd: SystemCommand) -> anyhow::Result<ExitCode> {
    let store = open(root)?;
    match cmd {
        SystemCommand::Df { json } => {
            let du = store.df()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&du)?);
            } else {
                println!(
                    "{:<14} {:>8} {:>12} {:>12}",
                    "TYPE", "TOTAL", "SIZE", "RECLAIMABLE"
                );
                for (t, e) in [
                    ("Images", &du.images),
                    ("Build Cache", &du.build_cache),
                    ("Unreferenced", &du.unreferenced),
                ] {
                    println!(
                        "{:<14} {:>8} {:>12} {:>12}",
                        t,
                        e.count,
                        human(e.size),
                        human(e.reclaimable)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SystemCommand::Check { deep } => {
            let r = store.check_with(deep)?;
            if r.ok() {
                let layers = if deep {
                    format!(
                        ", {} layers re-hashed against their diffIDs",
                        r.layers_rehashed
                    )
                } else {
                    String::new()
                };
                println!(
                    "ok: {} blobs verified, {} snapshots checked{layers}, {} orphans (reclaimed by `kiln prune`)",
                    r.blobs_verified, r.snapshots_checked, r.orphans
                );
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &r.problems {
                    eprintln!("problem: {p}");
                }
                eprintln!(
                    "store {} has {} problem(s)",
                    root.display(),
                    r.problems.len()
                );
                Ok(ExitCode::from(1))
            }
        }
    }
}

/// `1.5GB`-style sizes (decimal units, as Docker prints them).
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.3}{}", UNITS[u])
    }
}

/// `--keep-storage`: docker's and buildx's `opts.MemBytes`, i.e.
/// `RAMInBytes` (`10GB` = 10 GiB, `1k` = 1024 bytes), as `build --memory`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    kiln_solver::parser::units::ram_in_bytes(s).map_err(|e| e.to_string())
}
