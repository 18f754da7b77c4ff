//! Store commands: `kiln load`, `kiln import`, `kiln prune`,
//! `kiln system df`, `kiln system check`. Glue only: the work is the
//! library's ([`kiln_solver::session::Session`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_solver::cache::PruneOptions;
use kiln_solver::images::Loaded;

use crate::{lib_error, session};

/// `kiln load` arguments.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// The archive: docker-archive (`docker save`) or OCI layout tar, plain,
    /// gzip or zstd compressed (default, or `-`: stdin, as `kiln load <
    /// image.tar`).
    #[arg(short = 'i', long = "input", value_name = "FILE")]
    pub input: Option<PathBuf>,
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
    /// The platform the image's config names (default: the host's), as
    /// `docker import --platform`.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,
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
    /// Do not prompt for confirmation (kiln never does; accepted for
    /// docker's scripts).
    #[arg(short, long)]
    pub force: bool,
    /// `until=DURATION` (`24h`, `90m`, `1h30m`): only untagged images made
    /// and (with `--all`) cache records last used before then.
    #[arg(long = "filter", value_name = "until=DURATION")]
    pub filter: Vec<String>,
}

/// docker's `until=` value as an age in seconds: a Go duration (`24h`,
/// `1h30m`, `90s`, `1.5h`; the parser's HEALTHCHECK reading) or a Unix
/// timestamp (seconds).
pub fn parse_go_duration(s: &str) -> Result<u64, String> {
    if let Ok(ts) = s.parse::<u64>() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        return Ok(now.saturating_sub(ts));
    }
    kiln_solver::parser::instructions::parse_go_duration(s)
        .map(|d| d.as_secs())
        .ok_or_else(|| {
            format!("invalid duration {s:?} (e.g. 24h, 90m, 1h30m, or a Unix timestamp)")
        })
}

/// The `until=` of `--filter` values (others are refused).
pub fn prune_until(filters: &[String]) -> anyhow::Result<Option<u64>> {
    let mut until = None;
    for f in filters {
        match f.split_once('=') {
            Some(("until", v)) => {
                until = Some(parse_go_duration(v).map_err(crate::build_cmd::usage)?)
            }
            _ => {
                return Err(crate::build_cmd::usage(format!(
                    "--filter {f:?}: kiln's prune takes until=DURATION"
                )))
            }
        }
    }
    Ok(until)
}

/// `kiln image prune` arguments.
#[derive(Args, Debug)]
pub struct ImagePruneArgs {
    /// Every image, not only untagged ones (kiln has no containers: no
    /// image is in use).
    #[arg(short, long)]
    pub all: bool,
    /// Do not prompt (kiln never does).
    #[arg(short, long)]
    pub force: bool,
    /// `until=DURATION`: only images made before then.
    #[arg(long = "filter", value_name = "until=DURATION")]
    pub filter: Vec<String>,
}

/// `kiln system prune` arguments.
#[derive(Args, Debug)]
pub struct SystemPruneArgs {
    /// Every image and all build cache, not only untagged images and
    /// unreferenced data.
    #[arg(short, long)]
    pub all: bool,
    /// Do not prompt (kiln never does).
    #[arg(short, long)]
    pub force: bool,
    /// Accepted (kiln has no volumes).
    #[arg(long)]
    pub volumes: bool,
    /// `until=DURATION`: only what is older.
    #[arg(long = "filter", value_name = "until=DURATION")]
    pub filter: Vec<String>,
}

/// `kiln system …`.
#[derive(Subcommand, Debug)]
pub enum SystemCommand {
    /// Remove untagged images, unreferenced data and (with `-a`) every
    /// image and all build cache, as `docker system prune`.
    Prune(SystemPruneArgs),
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
    /// Say how kiln runs here: the store, its snapshotter, whether kiln is
    /// rootless (in a user namespace) and with which id maps.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Register the installed QEMU user-mode interpreters (Debian's
    /// qemu-user-static) with binfmt_misc, for RUN steps of foreign
    /// platforms (as root).
    ///
    /// Each architecture the host does not run natively whose
    /// /usr/share/binfmts/qemu-<arch> file and interpreter are installed is
    /// registered as `qemu-<arch>` with the flags C and F (fix-binary: the
    /// kernel keeps the interpreter open, so it works inside the sandbox),
    /// magic and mask taken from that file; binfmt_misc is mounted first
    /// if it is not. An equal registration is left as it is; one without F
    /// is replaced. Prints what is registered.
    Binfmt {
        /// Remove kiln's (and Debian's) `qemu-<arch>` registrations instead.
        #[arg(long)]
        uninstall: bool,
    },
}

/// `kiln load [-i FILE]` (stdin without `-i` or with `-i -`).
pub fn load(root: &Path, args: LoadArgs) -> anyhow::Result<ExitCode> {
    let s = session(root, false)?;
    let mut report = |l: Loaded| match l {
        Loaded::Untagged(config) => outln!("Loaded image ID: {config}"),
        Loaded::Named(name) if args.quiet => outln!("{name}"),
        Loaded::Named(name) => {
            let (repo, tag) = kiln_solver::images::familiar(&name);
            outln!("Loaded image: {repo}:{tag}")
        }
    };
    match args.input.as_deref().filter(|p| p.as_os_str() != "-") {
        Some(path) => s.load(path, &mut report),
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                return Err(crate::build_cmd::usage(
                    "requested load from stdin, but stdin is a terminal: use -i FILE or redirect",
                ));
            }
            s.load_from(Box::new(std::io::stdin()), Path::new("stdin"), &mut report)
        }
    }
    .map_err(lib_error)?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln import ROOTFS.tar NAME[:TAG]`.
pub fn import(root: &Path, args: ImportArgs) -> anyhow::Result<ExitCode> {
    let s = session(root, false)?;
    let input: Box<dyn std::io::Read> = if args.file.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?,
        )
    };
    let platform = crate::image_cmds::platform_arg(args.platform.as_deref())?;
    let id = s
        .import_for(
            input,
            &args.file.display().to_string(),
            &args.name,
            args.message,
            &args.change,
            platform,
        )
        .map_err(lib_error)?;
    outln!("{id}");
    Ok(ExitCode::SUCCESS)
}

/// `kiln prune`.
pub fn prune(root: &Path, args: PruneArgs) -> anyhow::Result<ExitCode> {
    cache_prune(root, args, false)
}

/// `kiln builder prune`: build cache only, images stay.
pub fn builder_prune(root: &Path, args: PruneArgs) -> anyhow::Result<ExitCode> {
    cache_prune(root, args, true)
}

fn cache_prune(root: &Path, args: PruneArgs, keep_untagged: bool) -> anyhow::Result<ExitCode> {
    let _ = args.force;
    run_prune(
        root,
        &PruneOptions {
            all: args.all,
            keep_storage: args.keep_storage,
            until: prune_until(&args.filter)?,
            keep_untagged,
        },
        false,
    )
}

/// `kiln image prune`: untagged images (`-a`: every image), the cache
/// stays.
pub fn image_prune(root: &Path, args: ImagePruneArgs) -> anyhow::Result<ExitCode> {
    let _ = args.force;
    let until = prune_until(&args.filter)?;
    run_prune(
        root,
        &PruneOptions {
            until,
            ..Default::default()
        },
        args.all,
    )
}

/// Every name of every image made before `until` seconds ago (all with
/// `None`) removed, as docker's `prune -a` removes unused images; prints
/// them as docker does.
fn untag_all(root: &Path, until: Option<u64>) -> anyhow::Result<()> {
    let s = session(root, false)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    for l in s.images().map_err(lib_error)? {
        if until.is_some_and(|u| l.recorded > now - u as i64) || l.names.is_empty() {
            continue;
        }
        for n in &l.names {
            let removed = s.untag(n, true).map_err(lib_error)?;
            for u in removed.untagged {
                let (repo, tag) = kiln_solver::images::familiar(&u);
                println!("untagged: {repo}:{tag}");
            }
        }
    }
    Ok(())
}

fn run_prune(root: &Path, opts: &PruneOptions, all_images: bool) -> anyhow::Result<ExitCode> {
    if all_images {
        untag_all(root, opts.until)?;
    }
    let r = session(root, false)?.prune(opts).map_err(lib_error)?;
    if !r.untagged_removed.is_empty() {
        println!("Deleted Images:");
        for id in &r.untagged_removed {
            println!("deleted: {id}");
        }
        println!();
    }
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
    if let SystemCommand::Binfmt { uninstall } = cmd {
        // Not about the store: no store is opened (or created).
        return binfmt(uninstall);
    }
    let s = || session(root, false);
    match cmd {
        SystemCommand::Prune(a) => {
            let _ = (a.force, a.volumes);
            run_prune(
                root,
                &PruneOptions {
                    all: a.all,
                    until: prune_until(&a.filter)?,
                    ..Default::default()
                },
                a.all,
            )
        }
        SystemCommand::Info { json } => info(&s()?, json),
        SystemCommand::Df { json } => {
            let du = s()?.disk_usage().map_err(lib_error)?;
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
            let r = s()?.check_store(deep).map_err(lib_error)?;
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
        SystemCommand::Binfmt { uninstall } => binfmt(uninstall),
    }
}

/// `kiln system binfmt [--uninstall]`.
fn binfmt(uninstall: bool) -> anyhow::Result<ExitCode> {
    use kiln_solver::run::emulation;
    let mount = Path::new(emulation::BINFMT_MISC);
    if uninstall {
        for name in emulation::uninstall(mount)? {
            println!("removed {name}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let done = emulation::install(mount, Path::new(emulation::BINFMTS_DIR))?;
    if done.is_empty() {
        anyhow::bail!(
            "no QEMU user-mode interpreters found in {} (apt-get install qemu-user-static)",
            emulation::BINFMTS_DIR
        );
    }
    for r in &done {
        println!(
            "{:<14} {:<18} {} flags {}{}",
            format!("linux/{}", r.arch.oci),
            r.name,
            r.interpreter.display(),
            r.flags,
            if r.changed {
                ""
            } else {
                " (already registered)"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `1.5GB`-style sizes (decimal units, as Docker prints them).
fn human(n: u64) -> String {
    match kiln_solver::units::decimal_units(n) {
        (_, "B") => format!("{n}B"),
        (v, unit) => format!("{v:.3}{unit}"),
    }
}

/// `--keep-storage`: docker's and buildx's `opts.MemBytes`, i.e.
/// `RAMInBytes` (`10GB` = 10 GiB, `1k` = 1024 bytes), as `build --memory`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    kiln_solver::units::ram_in_bytes(s).map_err(|e| e.to_string())
}

/// `kiln system info`.
fn info(s: &kiln_solver::session::Session, json: bool) -> anyhow::Result<ExitCode> {
    let i = s.system_info().map_err(lib_error)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&i)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("Store:        {}", i.root.display());
    match &i.overlay_xattrs {
        Some(x) => outln!("Snapshotter:  {} ({x} xattrs)", i.snapshotter),
        None => outln!("Snapshotter:  {}", i.snapshotter),
    }
    outln!("Rootless:     {}", if i.rootless { "yes" } else { "no" });
    outln!("ID mapping:   {}", i.id_mapping);
    outln!("UID map:      {}", i.uid_map);
    outln!("GID map:      {}", i.gid_map);
    Ok(ExitCode::SUCCESS)
}
