//! The main build context when it is not a local directory (`kiln build
//! -`, a git URL, an http(s) URL), made into a temporary directory that
//! the build then reads like any other context:
//!
//! * **stdin** (`-`): a tar archive, plain or gzip/bzip2/xz/zstd (sniffed
//!   by content), unpacked with hostile names confined; anything else is
//!   taken as a Dockerfile with an empty context (as Docker does).
//! * **git** (`https://…git#ref:subdir`, `git@…`, `git://…`): cloned with
//!   the git CLI as ADD does, checked out at `ref`; `subdir` is the context.
//! * **http(s)**: downloaded as ADD does; an archive is unpacked, any other
//!   file is the Dockerfile of an empty context.
//!
//! The directory disappears when the [`Prepared`] value is dropped.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use kiln_image::apply::{apply_layer, WhiteoutMode};

crate::error::module_error! {
    /// Why the main build context could not be prepared.
    pub enum MainContextError {}
}

/// What the context argument of `kiln build` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextSpec {
    /// A local directory.
    Dir(PathBuf),
    /// A tar archive (or a Dockerfile) on stdin.
    Stdin,
    /// A git repository (`REMOTE[#REF[:SUBDIR]]`).
    Git(String),
    /// An http(s) URL of a tar archive (or a Dockerfile).
    Http(String),
}

/// Classifies the context argument (Docker's rules).
pub fn classify(s: &str) -> ContextSpec {
    if s == "-" {
        ContextSpec::Stdin
    } else if crate::remote::is_git_url(s) {
        ContextSpec::Git(s.to_string())
    } else if crate::remote::is_http_url(s) {
        ContextSpec::Http(s.to_string())
    } else {
        ContextSpec::Dir(PathBuf::from(s))
    }
}

/// A context made into a temporary directory.
#[derive(Debug)]
pub struct Prepared {
    /// Removed on drop.
    _guard: tempfile::TempDir,
    /// The context directory (inside the guard's directory).
    pub dir: PathBuf,
    /// The Dockerfile itself when the source was one rather than an
    /// archive (the context is then empty).
    pub dockerfile: Option<Vec<u8>>,
}

fn scratch_dir(scratch: &Path, prefix: &str) -> Result<tempfile::TempDir, MainContextError> {
    std::fs::create_dir_all(scratch)
        .map_err(MainContextError::ctx(format!("{}", scratch.display())))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch)
        .map_err(MainContextError::ctx(format!(
            "temporary directory in {}",
            scratch.display()
        )))
}

/// The file at `path` as a context: unpacked if it is an archive, else the
/// Dockerfile of an empty context. `guard` holds `path` and gets `ctx`.
fn from_file(
    guard: tempfile::TempDir,
    path: &Path,
    what: &str,
) -> Result<Prepared, MainContextError> {
    let dir = guard.path().join("ctx");
    std::fs::create_dir(&dir).map_err(MainContextError::ctx(format!("{}", dir.display())))?;
    let archive = crate::archive::open_archive(|| std::fs::File::open(path)).map_err(
        MainContextError::ctx(format!("reading the build context from {what}")),
    )?;
    let dockerfile = match archive {
        Some(reader) => {
            apply_layer(reader, &dir, WhiteoutMode::Delete).map_err(MainContextError::ctx(
                format!("unpacking the build context from {what}"),
            ))?;
            None
        }
        // Not an archive: the context is a Dockerfile, read as any other
        // (at most MAX_DOCKERFILE bytes).
        None => {
            let limit = crate::context::MAX_DOCKERFILE;
            let mut b = Vec::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(limit + 1).read_to_end(&mut b))
                .map_err(MainContextError::ctx(format!(
                    "reading the build context from {what}"
                )))?;
            if b.len() as u64 > limit {
                return Err(MainContextError::Invalid(format!(
                    "the build context from {what} is neither an archive nor a Dockerfile of at most {} MiB",
                    limit >> 20
                )));
            }
            Some(b)
        }
    };
    std::fs::remove_file(path).map_err(MainContextError::ctx(format!("{}", path.display())))?;
    Ok(Prepared {
        _guard: guard,
        dir,
        dockerfile,
    })
}

/// A context from a reader (stdin): spooled to `scratch`, then unpacked.
pub fn from_reader(mut r: impl Read, scratch: &Path) -> Result<Prepared, MainContextError> {
    let guard = scratch_dir(scratch, "context-stdin-")?;
    let spool = guard.path().join("input");
    let mut f = std::fs::File::create(&spool)
        .map_err(MainContextError::ctx(format!("{}", spool.display())))?;
    io::copy(&mut r, &mut f).map_err(MainContextError::ctx(
        "reading the build context from stdin",
    ))?;
    drop(f);
    from_file(guard, &spool, "stdin")
}

/// A context downloaded from an http(s) URL.
pub fn from_http(url: &str, scratch: &Path) -> Result<Prepared, MainContextError> {
    std::fs::create_dir_all(scratch)
        .map_err(MainContextError::ctx(format!("{}", scratch.display())))?;
    let fetched = crate::remote::fetch_http(url, scratch, None)
        .map_err(MainContextError::ctx("unable to prepare context"))?;
    let path = fetched
        .dir
        .path()
        .join(fetched.select.trim_start_matches('/'));
    from_file(fetched.dir, &path, url)
}

/// A context cloned from a git repository, at its ref and subdirectory
/// (with `auth`'s credentials only: see [`crate::remote::fetch_git`]).
pub fn from_git(
    url: &str,
    scratch: &Path,
    auth: &crate::remote::GitAuth,
) -> Result<Prepared, MainContextError> {
    std::fs::create_dir_all(scratch)
        .map_err(MainContextError::ctx(format!("{}", scratch.display())))?;
    let fetched = crate::remote::fetch_git(url, scratch, false, None, auth)
        .map_err(MainContextError::ctx("unable to prepare context"))?;
    let dir = fetched
        .dir
        .path()
        .join(fetched.select.trim_start_matches('/'));
    // The subdirectory must be a directory of the checkout, not a link
    // leading out of it.
    let meta = std::fs::symlink_metadata(&dir);
    if !meta.as_ref().is_ok_and(|m| m.is_dir()) {
        return Err(MainContextError::Invalid(format!(
            "unable to prepare context: {url}: subdirectory {} not found in the repository",
            fetched
                .select
                .trim_start_matches("/repo")
                .trim_start_matches('/')
        )));
    }
    let real = dir
        .canonicalize()
        .map_err(MainContextError::ctx(format!("{}", dir.display())))?;
    let top = fetched
        .dir
        .path()
        .join("repo")
        .canonicalize()
        .map_err(MainContextError::ctx(format!("{}", dir.display())))?;
    if !real.starts_with(&top) {
        return Err(MainContextError::Invalid(format!(
            "unable to prepare context: {url}: the subdirectory leaves the repository"
        )));
    }
    Ok(Prepared {
        _guard: fetched.dir,
        dir,
        dockerfile: None,
    })
}

/// Prepares a non-directory context (`None` for a directory).
pub fn prepare(
    spec: &ContextSpec,
    stdin: impl Read,
    scratch: &Path,
    git: &crate::remote::GitAuth,
) -> Result<Option<Prepared>, MainContextError> {
    Ok(Some(match spec {
        ContextSpec::Dir(_) => return Ok(None),
        ContextSpec::Stdin => from_reader(stdin, scratch)?,
        ContextSpec::Git(u) => from_git(u, scratch, git)?,
        ContextSpec::Http(u) => from_http(u, scratch)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_like_docker() {
        assert_eq!(classify("-"), ContextSpec::Stdin);
        assert_eq!(classify("."), ContextSpec::Dir(".".into()));
        for g in [
            "https://h/r.git#main:sub",
            "git@github.com:a/b.git",
            "git://h/r",
        ] {
            assert_eq!(classify(g), ContextSpec::Git(g.into()), "{g}");
        }
        assert_eq!(
            classify("http://h/ctx.tar.gz"),
            ContextSpec::Http("http://h/ctx.tar.gz".into())
        );
    }

    #[test]
    fn stdin_archive_is_unpacked_and_confined_and_text_is_a_dockerfile() {
        let scratch = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in [("Dockerfile", &b"FROM scratch\n"[..]), ("a/b", b"x")] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        let p = from_reader(&gz[..], scratch.path()).unwrap();
        assert!(p.dockerfile.is_none());
        assert_eq!(std::fs::read(p.dir.join("a/b")).unwrap(), b"x");
        let guard_dir = p.dir.parent().unwrap().to_path_buf();
        drop(p);
        assert!(!guard_dir.exists(), "removed on drop");
        let p = from_reader(&b"FROM busybox\n"[..], scratch.path()).unwrap();
        assert_eq!(p.dockerfile.as_deref(), Some(&b"FROM busybox\n"[..]));
        assert_eq!(std::fs::read_dir(&p.dir).unwrap().count(), 0);
    }
}
