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
) -> Result<Resolved, ContextError> {
    let _span = tracing::debug_span!("context", context = %context.display()).entered();
    let spelled = context.to_string_lossy().into_owned();
    let spec = classify(&spelled);
    if spec == ContextSpec::Stdin && file == Some("-") {
        return Err(usage(
            "invalid argument: can't use stdin for both the build context and the Dockerfile",
        ));
    }
    let prepared = prepare(&spec, std::io::stdin().lock(), scratch)?;
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
    Ok(Resolved {
        dir: context,
        dockerfile_name: name,
        dockerfile: text,
        ignore,
        prepared,
    })
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
