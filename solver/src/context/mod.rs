//! Build contexts: the main context (a directory, a tar on stdin, git,
//! http — [`crate::main_context`]), named contexts (`--build-context`:
//! [`crate::contexts`], with OCI layouts imported by [`oci_layout`]) and
//! the Dockerfile and ignore file found for them ([`resolve`]).
//!
//! Everything here reads untrusted paths: the Dockerfile is looked up
//! with symlinks confined to the context, must be a regular file (never a
//! device or a FIFO) and is bounded by [`MAX_DOCKERFILE`].

pub mod oci_layout;

use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_parser::dockerignore::{ignore_file_candidates, read_ignore_file};

pub use crate::contexts::{parse_build_context, NamedContext};
pub use crate::main_context::{classify, prepare, ContextSpec, Prepared};

/// Why a context or its Dockerfile could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The request names no usable context or Dockerfile (a usage error:
    /// the CLI exits 2).
    #[error("{0}")]
    Usage(String),
    /// An `oci-layout://` named context could not be imported.
    #[error(transparent)]
    OciLayout(#[from] oci_layout::OciLayoutError),
    /// The context from stdin, a git repository or a URL could not be
    /// prepared (a usage error, as the context argument is at fault).
    #[error("{0}")]
    Prepare(#[from] crate::main_context::MainContextError),
    /// Reading the Dockerfile from stdin.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn usage(msg: impl Into<String>) -> ContextError {
    ContextError::Usage(msg.into())
}

/// A context ready to build from.
#[derive(Debug)]
pub struct Resolved {
    /// The context directory.
    pub dir: PathBuf,
    /// The Dockerfile's name as shown in errors (`-f` as given, else
    /// `Dockerfile`).
    pub dockerfile_name: String,
    /// The Dockerfile's text (invalid UTF-8 replaced).
    pub dockerfile: String,
    /// The `.dockerignore` patterns.
    pub ignore: Vec<String>,
    /// The temporary directory of a context from stdin, git or a URL;
    /// removed when dropped.
    pub prepared: Option<Prepared>,
}

/// Resolves the build context and its Dockerfile as `docker build` does:
/// `context` is a directory, `-` (a tar archive on stdin), a git or an
/// http(s) URL; `file` is `-f` (`-` reads stdin). A context that is not a
/// directory is made into a temporary one under `scratch`, kept alive by
/// [`Resolved::prepared`] until the build is over. The Dockerfile is a
/// regular file of at most [`MAX_DOCKERFILE`] bytes, found inside the
/// context unless `-f` names a file outside it.
pub fn resolve(
    context: &Path,
    file: Option<&str>,
    scratch: &Path,
    git: &crate::remote::GitAuth,
) -> Result<Resolved, ContextError> {
    let _span = tracing::debug_span!("context", context = %context.display()).entered();
    let spelled = context.to_string_lossy().into_owned();
    let spec = classify(&spelled);
    if spec == ContextSpec::Stdin && file == Some("-") {
        return Err(usage(
            "invalid argument: can't use stdin for both the build context and the Dockerfile",
        ));
    }
    let prepared = prepare(&spec, std::io::stdin().lock(), scratch, git)?;
    let context = match &prepared {
        Some(p) => p.dir.clone(),
        None => context.to_path_buf(),
    };
    if !context.is_dir() {
        return Err(usage(format!(
            "unable to prepare context: path {:?} not found or not a directory",
            context.display()
        )));
    }
    let (name, text, ignore_path) = match (file, &prepared) {
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
                let bytes = read_confined(&context, &path, &format!("Dockerfile {rel}"))
                    .map_err(usage)?
                    .ok_or_else(|| {
                        usage(format!(
                        "unable to prepare context: the Dockerfile {rel:?} was not found in {spelled:?}"
                    ))
                    })?;
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
            // Inside the context its path is the context's to change under
            // us: it is read through the context's descriptors.
            // Outside it, the name is resolved in its own directory (a
            // symlink `Dockerfile.ci -> /etc/shadow` in a checkout names
            // nothing there, as BuildKit reads it from a mount of that
            // directory): never followed to a host file whose lines a
            // parse error would print.
            // The path is made absolute without resolving anything (a
            // directory of the context swapped for a symlink is resolved
            // inside the context, by `read_confined`).
            let shown = p.display().to_string();
            let p = std::path::absolute(&p)
                .map_err(|e| usage(format!("reading Dockerfile {shown}: {e}")))?;
            let bytes = read_confined(&context, &p, &format!("Dockerfile {shown}"))
                .map_err(usage)?
                .ok_or_else(|| {
                    usage(format!(
                        "reading Dockerfile {shown}: not found (a symlink is followed only \
                         inside the Dockerfile's own directory)"
                    ))
                })?;
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
            let bytes = read_confined(&context, &p, "Dockerfile")
                .map_err(usage)?
                .ok_or_else(|| {
                    usage(format!(
                        "reading Dockerfile {}: not found inside the build context",
                        p.display()
                    ))
                })?;
            let ignore = find_ignore_file(&p, &context);
            (
                "Dockerfile".to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
                ignore,
            )
        }
    };
    // A missing ignore file is no rules; one that cannot be read (a FIFO,
    // too large, a directory) is an error, never silently no rules.
    let ignore = match read_confined(
        &context,
        &ignore_path,
        &format!("ignore file {}", ignore_path.display()),
    )
    .map_err(usage)?
    {
        Some(b) => read_ignore_file(&String::from_utf8_lossy(&b)),
        None => Vec::new(),
    };
    Ok(Resolved {
        dir: context,
        dockerfile_name: name,
        dockerfile: text,
        ignore,
        prepared,
    })
}
/// Reads `path` with symlinks resolved inside its own directory, as
/// BuildKit reads the Dockerfile and the ignore file from the context (or
/// Dockerfile) source: a link leading outside that directory is never
/// followed to the host. Through descriptors only: when `path` is inside
/// `context`, its directory is opened from the context's top with links
/// resolved inside the context, then the file inside that directory
/// (`RESOLVE_IN_ROOT`), so a directory swapped for a symlink to `/etc`
/// meanwhile leads nowhere outside. `Ok(None)` when there is no such file.
fn read_confined(context: &Path, path: &Path, shown: &str) -> Result<Option<Vec<u8>>, String> {
    use kiln_fs::{Follow, Root};
    let err = |e: kiln_fs::Error| format!("reading {shown}: {}", e.io());
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(None);
    };
    let dir = match parent.strip_prefix(context) {
        Ok(rel) if rel.as_os_str().is_empty() => Root::open(context),
        Ok(rel) => Root::open(context)
            .and_then(|r| r.open_dir(rel, Follow::InRoot))
            .map(Root::from_dir),
        // Beside a Dockerfile given with -f outside the context: a path
        // the user chose.
        Err(_) => Root::open(parent),
    };
    let found = dir.and_then(|d| d.open_path(name, Follow::InRoot));
    match found {
        Ok(fd) => read_opened(fd, shown).map(Some),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            Err(format!("reading {shown}: not a directory"))
        }
        Err(e) => Err(err(e)),
    }
}

/// The largest Dockerfile (or ignore file) kiln reads.
pub const MAX_DOCKERFILE: u64 = 16 << 20;

/// Reads the file `fd` (an `O_PATH` descriptor) names if it is a regular
/// file of at most [`MAX_DOCKERFILE`] bytes: devices (`/dev/zero`), FIFOs
/// and sockets are refused before anything is opened for reading, and the
/// open never blocks on a FIFO. The very inode `fd` names is read.
fn read_opened(fd: std::os::fd::OwnedFd, shown: &str) -> Result<Vec<u8>, String> {
    use std::os::fd::AsRawFd;
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
    let refuse = |t| format!("{shown} is {}, not a regular file", kind(t));
    let at = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let m = std::fs::metadata(&at).map_err(|e| format!("reading {shown}: {e}"))?;
    if !m.is_file() {
        return Err(refuse(m.file_type()));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&at)
        .map_err(|e| format!("reading {shown}: {e}"))?;
    let m = f.metadata().map_err(|e| format!("reading {shown}: {e}"))?;
    if !m.is_file() {
        return Err(refuse(m.file_type()));
    }
    let too_big = || format!("{shown} is larger than {} MiB", MAX_DOCKERFILE >> 20);
    if m.len() > MAX_DOCKERFILE {
        return Err(too_big());
    }
    let mut b = Vec::new();
    f.take(MAX_DOCKERFILE + 1)
        .read_to_end(&mut b)
        .map_err(|e| format!("reading {shown}: {e}"))?;
    if b.len() as u64 > MAX_DOCKERFILE {
        return Err(too_big());
    }
    Ok(b)
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
