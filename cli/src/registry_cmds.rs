//! Registry commands: `kiln pull`, `kiln push`, `kiln login`,
//! `kiln logout`. The work is in `kiln_solver::transfer` (store <->
//! registry) and `kiln-registry` (the protocol); this is flags and
//! progress lines.

use std::io::{BufRead, IsTerminal};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;

use kiln_solver::export::Reporter;
use kiln_solver::image::compression::{Compression, CompressionOpts};
use kiln_solver::images::{self, server_name, Error as ImagesError, TransferOptions};
use kiln_solver::progress::{Event, TransferState};
use kiln_solver::registry::Credentials;
use kiln_solver::transfer::LayerEncoding;

use crate::{lib_error, session, UsageError};

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// `kiln pull` flags.
#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// Allow plain HTTP for this registry (HOST:PORT); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure: Vec<String>,
    /// Print only the image's name (as `docker pull -q`).
    #[arg(short, long)]
    quiet: bool,
    /// Layers downloaded at once.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// From a multi-platform image, this platform's (`linux/arm64`,
    /// `linux/arm/v7`; default: the host's).
    #[arg(
        long,
        value_name = "OS/ARCH[/VARIANT]",
        conflicts_with = "all_platforms"
    )]
    platform: Option<String>,
    /// Keep a multi-platform image whole: every platform's image and the
    /// index, the name pointing at the index.
    #[arg(short = 'a', long = "all-platforms")]
    all_platforms: bool,
    /// The image (`busybox`, `127.0.0.1:5000/app:1`, `name@sha256:…`).
    image: String,
}

/// `kiln push` flags.
#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// Allow plain HTTP for this registry (HOST:PORT); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure: Vec<String>,
    /// Layer compression: gzip (default), zstd or uncompressed.
    #[arg(long, default_value = "gzip")]
    compression: String,
    /// Compression level (gzip 0-9, zstd 1-22).
    #[arg(long = "compression-level", value_name = "N")]
    compression_level: Option<i32>,
    /// Recompress layers already compressed with another algorithm.
    #[arg(long = "force-compression")]
    force_compression: bool,
    /// OCI media types (true, default) or Docker schema2 (false).
    #[arg(long = "oci-mediatypes", default_value = "true", value_parser = ["true", "false"])]
    oci_mediatypes: String,
    /// Layers compressed and uploaded at once.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Print only the pushed manifest digest.
    #[arg(short, long)]
    quiet: bool,
    /// Write the pushed manifest digest to this file.
    #[arg(long = "digestfile", value_name = "FILE")]
    digestfile: Option<std::path::PathBuf>,
    /// Push every tag of the repository `IMAGE` names.
    #[arg(short = 'a', long = "all-tags", conflicts_with = "destination")]
    all_tags: bool,
    /// The local image.
    image: String,
    /// Where to push (default: the image's own name).
    destination: Option<String>,
}

/// `kiln login` flags.
#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    /// User name.
    #[arg(short, long)]
    username: Option<String>,
    /// Password (prefer --password-stdin).
    #[arg(short, long)]
    password: Option<String>,
    /// Read the password from stdin.
    #[arg(long = "password-stdin")]
    password_stdin: bool,
    /// Allow plain HTTP for this registry (HOST:PORT); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure: Vec<String>,
    /// The registry (default: Docker Hub).
    server: Option<String>,
}

/// `kiln logout` flags.
#[derive(clap::Args, Debug)]
pub struct LogoutArgs {
    /// The registry (default: Docker Hub).
    server: Option<String>,
}

/// Per-blob progress lines on stderr: one when a blob starts, one when
/// it ends, and (on a terminal) a running byte count.
pub struct TransferLog {
    tty: bool,
    last: Mutex<std::collections::HashMap<String, u64>>,
}

impl TransferLog {
    /// A logger that shows byte counts when stderr is a terminal.
    pub fn new() -> Self {
        TransferLog {
            tty: std::io::stderr().is_terminal(),
            last: Mutex::new(Default::default()),
        }
    }

    /// The line for one [`Event::Transfer`] of `verb` ("pull", "push"),
    /// if it gets one.
    pub fn line(&self, verb: &str, digest: &str, state: TransferState, n: u64) -> Option<String> {
        let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
        let short = hex.get(..12).unwrap_or_default();
        Some(match state {
            TransferState::Started => format!("{short}: {verb}ing {n} bytes"),
            TransferState::Progress => {
                if !self.tty {
                    return None;
                }
                // at most one line per 32 MiB per blob
                let mut last = self.last.lock().ok()?;
                let prev = last.entry(format!("{verb} {short}")).or_insert(0);
                if n < *prev + (32 << 20) {
                    return None;
                }
                *prev = n;
                format!("{short}: {} MiB", n >> 20)
            }
            TransferState::Skipped => format!("{short}: already exists"),
            TransferState::Mounted => format!("{short}: mounted from another repository"),
            TransferState::Done => format!("{short}: {verb} complete ({n} bytes)"),
        })
    }
}

impl Default for TransferLog {
    fn default() -> Self {
        Self::new()
    }
}

/// The CLI's [`Reporter`]: renders the library's notes, warnings and
/// transfers as lines on stderr — notes and transfers unless quiet,
/// warnings always.
pub struct CliReporter {
    quiet: bool,
    transfers: TransferLog,
}

impl CliReporter {
    /// A reporter for a command run with or without `-q`.
    pub fn new(quiet: bool) -> Self {
        CliReporter {
            quiet,
            transfers: TransferLog::new(),
        }
    }
}

impl Reporter for CliReporter {
    fn event(&self, e: Event) {
        match e {
            // (Image data — a layer's file names — can be in them.)
            Event::Warning { message } => {
                eprintln!(
                    "{}",
                    crate::term::shown(&message, crate::term::stderr_tty())
                )
            }
            _ if self.quiet => {}
            Event::Note { message } | Event::Info { message } => {
                eprintln!(
                    "{}",
                    crate::term::shown(&message, crate::term::stderr_tty())
                )
            }
            Event::Transfer {
                verb,
                digest,
                state,
                bytes,
            } => {
                if let Some(l) = self.transfers.line(verb, &digest, state, bytes) {
                    eprintln!("{l}")
                }
            }
            _ => {}
        }
    }
}

/// A pull or push stopped by SIGINT/SIGTERM: said on stderr, status 130.
fn cancelled(what: &str) -> ExitCode {
    eprintln!("error: {what} cancelled");
    ExitCode::from(crate::signals::EXIT_CANCELLED)
}

/// Runs `kiln pull`.
pub fn pull(root: &Path, a: PullArgs) -> anyhow::Result<ExitCode> {
    let (cancel, _signals) = crate::signals::cancel_on_interrupt_blocking()?;
    let opts = TransferOptions {
        insecure_registries: a.insecure.clone(),
        jobs: a.jobs,
        cancel,
        platform: crate::image_cmds::platform_arg(a.platform.as_deref())?,
        all_platforms: a.all_platforms,
    };
    let r = match session(root, a.quiet)?.pull(&a.image, &opts) {
        Ok(r) => r,
        Err(ImagesError::Cancelled) => return Ok(cancelled("pull")),
        Err(e) => return Err(lib_error(e)),
    };
    if a.quiet {
        outln!("{}", r.name);
    } else {
        if let Some(i) = &r.index_digest {
            eprintln!("index: {i}");
        }
        eprintln!("digest: {}", r.manifest_digest);
        outln!("{}", r.name);
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_compression(name: &str, level: Option<i32>) -> anyhow::Result<CompressionOpts> {
    let kind: Compression = name.parse().map_err(|_| {
        usage(format!(
            "unknown compression {name:?} (gzip, zstd, uncompressed)"
        ))
    })?;
    Ok(CompressionOpts { kind, level })
}

/// Runs `kiln push`.
pub fn push(root: &Path, a: PushArgs) -> anyhow::Result<ExitCode> {
    let enc = LayerEncoding {
        compression: parse_compression(&a.compression, a.compression_level)?,
        force: a.force_compression,
        oci_media_types: a.oci_mediatypes == "true",
    };
    let (cancel, _signals) = crate::signals::cancel_on_interrupt_blocking()?;
    let opts = TransferOptions {
        insecure_registries: a.insecure.clone(),
        jobs: a.jobs,
        cancel,
        ..Default::default()
    };
    let s = session(root, a.quiet)?;
    let images = if a.all_tags {
        all_tags(&s, &a.image)?
    } else {
        vec![a.image.clone()]
    };
    for image in &images {
        let (dest, d) = match s.push(image, a.destination.as_deref(), enc, &opts) {
            Ok(r) => r,
            Err(ImagesError::Cancelled) => return Ok(cancelled("push")),
            Err(e) => return Err(lib_error(e)),
        };
        if let Some(f) = &a.digestfile {
            // As --iidfile: a symlink is replaced, never followed.
            let text = d.to_string();
            kiln_solver::export::outfile::write_atomically(f, |w| {
                std::io::Write::write_all(w, text.as_bytes())
            })
            .map_err(|e: std::io::Error| {
                anyhow::anyhow!("writing --digestfile {}: {e}", f.display())
            })?;
        }
        if a.quiet {
            outln!("{d}");
        } else {
            eprintln!("{dest}: digest: {d}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The names of the stored images in `repository`'s repository (its tag,
/// if any, ignored), for `push --all-tags`.
fn all_tags(s: &kiln_solver::session::Session, repository: &str) -> anyhow::Result<Vec<String>> {
    let want = kiln_solver::cache::normalize_reference(repository)
        .map_err(|e| usage(format!("invalid reference {repository:?}: {e}")))?;
    let repo = images::repository(&want);
    let mut names: Vec<String> = s
        .images()
        .map_err(lib_error)?
        .into_iter()
        .flat_map(|l| l.names)
        .filter(|n| !n.contains('@') && images::repository(n) == repo)
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(anyhow::anyhow!(
            "An image does not exist locally with the tag: {}",
            images::familiar(&want).0
        ));
    }
    Ok(names)
}

/// Runs `kiln login`: checks the credentials against the registry, then
/// stores them as `docker login` does.
pub fn login(a: LoginArgs) -> anyhow::Result<ExitCode> {
    let server = server_name(a.server.as_deref());
    let username = match a.username {
        Some(u) => u,
        None => return Err(usage("kiln login needs --username")),
    };
    let password = match (a.password, a.password_stdin) {
        (Some(_), true) => {
            return Err(usage(
                "--password and --password-stdin are mutually exclusive",
            ))
        }
        (Some(p), false) => p,
        (None, true) => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, false) => return Err(usage("kiln login needs --password or --password-stdin")),
    };
    let creds = Credentials { username, password };
    let wrote = images::login(&server, &a.insecure, creds).map_err(lib_error)?;
    eprintln!("credentials saved to {wrote}");
    outln!("Login Succeeded");
    Ok(ExitCode::SUCCESS)
}

/// Runs `kiln logout`.
pub fn logout(a: LogoutArgs) -> anyhow::Result<ExitCode> {
    let server = server_name(a.server.as_deref());
    if images::logout(&server).map_err(lib_error)? {
        outln!("Removing login credentials for {server}");
    } else {
        outln!("Not logged in to {server}");
    }
    Ok(ExitCode::SUCCESS)
}
