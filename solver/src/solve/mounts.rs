//! `RUN --mount`: cache, bind, tmpfs, secret and ssh mounts, BuildKit's
//! semantics.
//!
//! Planning (before the cache lookup) expands the spec, resolves `from`
//! stages and images and hashes what a bind mount reads from the context:
//! that, never the contents of a cache or the value of a secret, is what
//! enters the RUN's key. Preparing (only when the step runs) turns the
//! plan into OCI spec mounts: cache directories come from the store (held
//! under their lock for the step's life), stage/image sources are a
//! read-only overlay of their layer directories (a writable one gets a
//! throwaway upper directory). A secret's value never touches a file the
//! host can see: it goes to the executor by value (an
//! [`kiln_executor::InlineFile`]), and the sandbox's init places it on a
//! tmpfs that exists only in the step's mount namespace, so nothing is
//! left to clean even when kiln is SIGKILLed.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_cache::CacheSharing;
use kiln_executor::oci;
use kiln_parser::instructions::MountType;

use super::{blocking, Solved, Solver};
use crate::backend::{Backend, CacheMountHold};
use crate::copy::{copy_selections, hash_selection, CopyOptions, Selection, Selector};
use crate::error::BuildError;
use crate::fsview::LayerView;
use crate::op::key::bind_context_key;
use crate::op::{MountSpec, Source};

crate::error::module_error! {
    /// Why a RUN mount could not be set up.
    pub enum MountError {}
}

crate::error::wrap_from!(MountError: crate::backend::BackendError);

/// Where a build secret's value comes from (`kiln build --secret`). Only
/// the location is kept; the value is read when a step that mounts it
/// runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `src=FILE`.
    File(PathBuf),
    /// `env=VAR`: the variable of the kiln process.
    Env(String),
}

/// Overlay mount data stays under a page; past this a stage/image source
/// is copied instead.
const MAX_OVERLAY_DATA: usize = 3500;

/// What a mount reads from a bind source.
#[derive(Debug, Clone)]
enum BindSrc {
    /// A file of a stage/image layer (a kiln-owned snapshot) bound directly.
    Host(PathBuf),
    /// Selected entries copied into a throwaway directory.
    Copy(Vec<Selection>),
    /// Directories stacked as an overlay (top first).
    Layers(Vec<PathBuf>),
}

/// One resolved mount of a RUN.
#[derive(Debug, Clone)]
enum Planned {
    Cache {
        target: String,
        id: String,
        sharing: CacheSharing,
        readonly: bool,
        mode: u32,
        uid: u32,
        gid: u32,
        seed: Option<Vec<Selection>>,
    },
    Bind {
        target: String,
        readonly: bool,
        src: BindSrc,
    },
    Tmpfs {
        target: String,
        size: Option<u64>,
    },
    Secret {
        id: String,
        target: Option<String>,
        env: Option<String>,
        source: SecretSource,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Ssh {
        target: String,
        socket: PathBuf,
    },
}

/// The mounts of one RUN, resolved.
#[derive(Debug, Clone, Default)]
pub(super) struct RunMounts {
    planned: Vec<Planned>,
    /// What goes into the RUN's cache key.
    pub key: Vec<String>,
}

/// The mounts of one execution; everything temporary goes on drop.
#[derive(Default)]
pub(super) struct Prepared {
    /// Spec mounts to append.
    pub mounts: Vec<oci::Mount>,
    /// Environment to add (`env=` secrets, `SSH_AUTH_SOCK`).
    pub env: Vec<(String, String)>,
    /// Files handed to the step by value (`type=secret` with a target).
    pub files: Vec<kiln_executor::InlineFile>,
    _holds: Vec<CacheMountHold>,
    _temps: Vec<tempfile::TempDir>,
}

fn sharing_of(s: Option<&str>) -> CacheSharing {
    match s {
        Some("private") => CacheSharing::Private,
        Some("locked") => CacheSharing::Locked,
        _ => CacheSharing::Shared,
    }
}

fn sharing_name(s: CacheSharing) -> &'static str {
    match s {
        CacheSharing::Shared => "shared",
        CacheSharing::Private => "private",
        CacheSharing::Locked => "locked",
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(T::to_string).unwrap_or_default()
}

impl Solver {
    /// The state and layer view of a `from=` stage or image.
    async fn mount_from(
        &self,
        from: &Source,
        line: crate::error::Location,
    ) -> Result<(Arc<Solved>, LayerView), BuildError> {
        match self.source_state(from, line).await? {
            (Some(st), view) => Ok((st, view)),
            (None, _) => Err(BuildError::internal_msg(
                "mount: a directory context is no mount source",
            )),
        }
    }

    /// Resolves the `--mount` specs of a RUN, planned by the frontend
    /// ([`crate::frontend::mounts`]): reads the states and context content
    /// they name, and describes each for the RUN's key.
    pub(super) async fn plan_mounts(
        &self,
        mounts: &[MountSpec],
        line: crate::error::Location,
    ) -> Result<RunMounts, BuildError> {
        let mut out = RunMounts::default();
        for spec in mounts {
            let m = &spec.mount;
            let err = |e: BuildError| BuildError::Step {
                location: line,
                message: format!("--mount={}: {e}", m.raw),
                cause: Some(crate::error::Cause::new(e)),
            };
            let target = || {
                spec.target
                    .clone()
                    .ok_or_else(|| BuildError::internal_msg("mount: a mount without a target"))
            };
            let id = spec.id.clone();
            let planned = match m.kind {
                MountType::Cache => {
                    let target = target()?;
                    let sharing = sharing_of(m.sharing.as_deref());
                    let mut from_key = String::new();
                    let seed = match &spec.from {
                        Some(f) => {
                            let (st, view) = self.mount_from(f, line).await?;
                            from_key = st.key.clone();
                            let source = m.source.clone().unwrap_or_else(|| "/".into());
                            let sel = blocking(move || {
                                let selector = Selector {
                                    view: &view,
                                    ignore: None,
                                    exclude: None,
                                };
                                selector.select(&source).map_err(MountError::src)
                            })
                            .await
                            .map_err(err)?;
                            Some(sel)
                        }
                        None => None,
                    };
                    out.key.push(format!(
                        "cache target={target} id={id} sharing={} ro={} mode={} uid={} gid={} from={from_key} source={}",
                        sharing_name(sharing),
                        m.readonly,
                        opt(&m.mode),
                        opt(&m.uid),
                        opt(&m.gid),
                        opt(&m.source),
                    ));
                    // A cache seeded from a stage or image is its own:
                    // BuildKit keys it by the id and the source too (one
                    // keyed by the id alone was any build's, which could
                    // fill it first with what the seed never held).
                    let id = match &spec.from {
                        Some(_) => format!(
                            "{id} from={from_key} source={}",
                            m.source.as_deref().unwrap_or("/")
                        ),
                        None => id,
                    };
                    Planned::Cache {
                        target,
                        id,
                        sharing,
                        readonly: m.readonly,
                        mode: m.mode.unwrap_or(0o755),
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                        seed,
                    }
                }
                MountType::Bind => {
                    let target = target()?;
                    let source = m.source.clone().unwrap_or_else(|| "/".into());
                    let (src, key) = match (&spec.from, &m.from) {
                        (Some(f), Some(raw)) => {
                            let (st, view) = self.mount_from(f, line).await?;
                            let key = format!("from={} key={}", raw, st.key);
                            let src = blocking(move || bind_layers(&view, &source))
                                .await
                                .map_err(err)?;
                            (src, key)
                        }
                        _ => self.bind_context(&source).await.map_err(err)?,
                    };
                    out.key.push(format!(
                        "bind target={target} source={} ro={} {key}",
                        opt(&m.source),
                        m.readonly
                    ));
                    Planned::Bind {
                        target,
                        readonly: m.readonly,
                        src,
                    }
                }
                MountType::Tmpfs => {
                    let target = target()?;
                    out.key
                        .push(format!("tmpfs target={target} size={}", opt(&m.size)));
                    Planned::Tmpfs {
                        target,
                        size: m.size,
                    }
                }
                MountType::Secret => {
                    let target = spec.target.clone();
                    out.key.push(format!(
                        "secret id={id} target={} env={} required={} mode={} uid={} gid={}",
                        opt(&target),
                        opt(&m.env),
                        m.required,
                        opt(&m.mode),
                        opt(&m.uid),
                        opt(&m.gid)
                    ));
                    // Not given and not required (the frontend checked):
                    // not mounted.
                    let Some(source) = self.opts.secrets.get(&id).cloned() else {
                        continue;
                    };
                    Planned::Secret {
                        id,
                        target,
                        env: m.env.clone(),
                        source,
                        mode: m.mode.unwrap_or(0o400),
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                    }
                }
                MountType::Ssh => {
                    let target = target()?;
                    out.key.push(format!(
                        "ssh id={id} target={target} required={}",
                        m.required
                    ));
                    let Some(socket) = self.opts.ssh.get(&id).cloned() else {
                        continue;
                    };
                    Planned::Ssh { target, socket }
                }
            };
            out.planned.push(planned);
        }
        Ok(out)
    }

    /// A bind source in the build context: what to mount and the hash of
    /// exactly what was selected (with `.dockerignore` applied).
    async fn bind_context(&self, source: &str) -> Result<(BindSrc, String), BuildError> {
        let context = self.opts.context.clone();
        let ignore = self.ignore.clone();
        let backend = self.backend.clone();
        let source = source.to_string();
        let cancel = self.cancel.clone();
        let hashed = blocking(move || -> Result<_, MountError> {
            let view = LayerView::new(vec![context.clone()], true);
            let selector = Selector {
                view: &view,
                ignore: ignore.as_ref(),
                exclude: None,
            };
            let sel = selector.select(&source).map_err(MountError::src)?;
            let mut h = bind_context_key();
            hash_selection(&mut h, &sel, backend.hash_cache(), false, Some(&cancel))
                .map_err(MountError::src)?;
            let key = format!("context={}", h.finish());
            // Always a copy of what was selected, made through the walk's
            // own directory handles: a host path handed to mount(2) or to
            // overlay is resolved again when the sandbox mounts it, and a
            // user who can write in the context could swap a directory on
            // that path for a symlink out of it in between.
            Ok((BindSrc::Copy(sel), key))
        })
        .await;
        match hashed {
            Err(_) if self.cancel.is_cancelled() => Err(BuildError::Cancelled),
            r => r,
        }
    }
}

fn is_whiteout(m: &fs::Metadata) -> bool {
    kiln_fs::overlay::is_whiteout(m)
}

fn is_opaque(p: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let Ok(cp) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    [kiln_fs::overlay::XattrNs::current()].iter().any(|ns| {
        let Ok(cn) = CString::new(ns.opaque()) else {
            return false;
        };
        let mut buf = [0u8; 4];
        // SAFETY: valid NUL-terminated strings and a buffer of that size.
        let r = unsafe {
            libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        r == kiln_fs::overlay::OPAQUE_VALUE.len() as isize
            && &buf[..r as usize] == kiln_fs::overlay::OPAQUE_VALUE
    })
}

/// A directory or file of a stage/image as a bind source: the layer
/// directories that hold it (top first, stopping where a layer hides what
/// is below), or a copy when there are too many to stack.
fn bind_layers(view: &LayerView, source: &str) -> Result<BindSrc, MountError> {
    let resolved = view
        .resolve(source, true)
        .map_err(MountError::ctx(format!("mount source {source}")))?;
    let found = view
        .lookup(&resolved)
        .ok_or_else(|| MountError::Invalid(format!("mount source {source} not found")))?;
    if !found.meta.is_dir() {
        return Ok(BindSrc::Host(found.host));
    }
    let comps: Vec<&std::ffi::OsStr> = crate::fsview::components(&resolved)
        .map(std::os::unix::ffi::OsStrExt::from_bytes)
        .collect();
    let mut lowers = Vec::new();
    'layers: for layer in view.layers().iter().skip(found.layer) {
        // Something on the way down hides the rest?
        let mut cur = layer.clone();
        let mut stop = false;
        for c in &comps {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if is_whiteout(&m) || !m.is_dir() => break 'layers,
                Ok(_) => stop |= is_opaque(&cur),
                // Missing below a directory this layer made opaque: the
                // layers under it are hidden (their files were deleted).
                Err(_) if stop => break 'layers,
                Err(_) => continue 'layers,
            }
        }
        lowers.push(cur);
        if stop {
            break;
        }
    }
    let data: usize = lowers.iter().map(|l| l.as_os_str().len() + 1).sum();
    // A name from the image with `:`, `,` or `\` would be read by overlayfs
    // as a separator or an escape (`source=/s/x:etc` lowering a relative
    // `etc`: the host's, from the init's working directory): copied
    // instead, as an over-long option string is.
    let odd = lowers.iter().any(|l| {
        std::os::unix::ffi::OsStrExt::as_bytes(l.as_os_str())
            .iter()
            .any(|b| matches!(b, b':' | b',' | b'\\'))
    });
    if data > MAX_OVERLAY_DATA || odd {
        let selector = Selector {
            view,
            ignore: None,
            exclude: None,
        };
        return Ok(BindSrc::Copy(
            selector.select(source).map_err(MountError::src)?,
        ));
    }
    Ok(BindSrc::Layers(lowers))
}

fn bind_mount(target: &str, source: &Path, readonly: bool) -> Result<oci::Mount, MountError> {
    oci::MountBuilder::default()
        .destination(target)
        .typ("bind")
        .source(source)
        .options(vec![
            "rbind".to_string(),
            if readonly { "ro" } else { "rw" }.to_string(),
        ])
        .build()
        .map_err(MountError::src)
}

fn scratch(backend: &dyn Backend, prefix: &str) -> Result<tempfile::TempDir, MountError> {
    let base = backend.scratch_dir();
    fs::create_dir_all(&base).map_err(MountError::ctx(format!("creating {}", base.display())))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .map_err(MountError::ctx(format!("temp dir in {}", base.display())))
}

/// Copies `sel` into `dir` (ownership kept).
fn copy_into(dir: &Path, sel: &[Selection]) -> Result<(), MountError> {
    let view = LayerView::new(vec![dir.to_path_buf()], true);
    let opts = CopyOptions {
        keep_owner: true,
        ..CopyOptions::default()
    };
    copy_selections(&view, "/", true, sel, &opts).map_err(MountError::src)
}

fn read_secret(id: &str, source: &SecretSource) -> Result<Vec<u8>, MountError> {
    match source {
        SecretSource::File(p) => {
            // Bounded: a secret file that is `/dev/zero` or a pipe that
            // never ends is an error, not all of memory.
            use std::io::Read;
            let limit = crate::fsview::MAX_SMALL_FILE;
            let mut b = Vec::new();
            fs::File::open(p)
                .and_then(|f| f.take(limit + 1).read_to_end(&mut b))
                .map_err(MountError::ctx(format!(
                    "secret {id}: reading {}",
                    p.display()
                )))?;
            if b.len() as u64 > limit {
                return Err(MountError::Invalid(format!(
                    "secret {id}: {} is larger than {} MiB",
                    p.display(),
                    limit >> 20
                )));
            }
            Ok(b)
        }
        SecretSource::Env(v) => std::env::var_os(v)
            .map(std::os::unix::ffi::OsStringExt::into_vec)
            .ok_or_else(|| {
                MountError::Invalid(format!("secret {id}: environment variable {v} is not set"))
            }),
    }
}

impl RunMounts {
    /// True when there is nothing to mount.
    pub fn is_empty(&self) -> bool {
        self.planned.is_empty()
    }

    /// Sets the mounts up for one execution (blocking); waits for cache
    /// locks until `cancelled` says stop.
    pub fn prepare(
        &self,
        backend: &dyn Backend,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Prepared, MountError> {
        let mut p = Prepared::default();
        // The caches first, each id once (two mounts of one locked cache
        // in one RUN waited for each other for ever), in the order of
        // their ids (two steps locking two caches in opposite orders
        // waited for each other).
        let mut ids: Vec<(&str, CacheSharing)> = Vec::new();
        for m in &self.planned {
            if let Planned::Cache { id, sharing, .. } = m {
                if !ids.iter().any(|(i, _)| i == id) {
                    ids.push((id, *sharing));
                }
            }
        }
        ids.sort_by(|a, b| a.0.cmp(b.0));
        let mut holds = std::collections::HashMap::new();
        for (id, sharing) in ids {
            let hold = backend.cache_mount(id, sharing, cancelled)?;
            holds.insert(id.to_string(), (hold, false));
        }
        for m in &self.planned {
            match m {
                Planned::Cache {
                    target,
                    id,
                    sharing: _,
                    readonly,
                    mode,
                    uid,
                    gid,
                    seed,
                } => {
                    let Some((hold, seen)) = holds.get_mut(id.as_str()) else {
                        return Err(MountError::Invalid(format!("cache {id}: not prepared")));
                    };
                    // Made by this call, and not yet set up by another
                    // mount of the same id in this RUN.
                    if hold.created && !*seen {
                        let init = || -> Result<(), MountError> {
                            if let Some(sel) = seed {
                                copy_into(&hold.dir, sel)?;
                            }
                            std::os::unix::fs::chown(&hold.dir, Some(*uid), Some(*gid)).map_err(
                                MountError::ctx(format!("chown {}", hold.dir.display())),
                            )?;
                            fs::set_permissions(&hold.dir, fs::Permissions::from_mode(*mode))
                                .map_err(MountError::ctx(format!("chmod {}", hold.dir.display())))
                        };
                        if let Err(e) = init() {
                            // Leave no half-seeded cache behind.
                            let _ = fs::remove_dir_all(&hold.dir);
                            return Err(e);
                        }
                    }
                    *seen = true;
                    p.mounts.push(bind_mount(target, &hold.dir, *readonly)?);
                }
                Planned::Bind {
                    target,
                    readonly,
                    src,
                } => p
                    .mounts
                    .push(bind_src(backend, &mut p._temps, target, *readonly, src)?),
                Planned::Tmpfs { target, size } => {
                    let mut options = vec!["nosuid".to_string(), "nodev".to_string()];
                    if let Some(s) = size {
                        options.push(format!("size={s}"));
                    }
                    p.mounts.push(
                        oci::MountBuilder::default()
                            .destination(target)
                            .typ("tmpfs")
                            .source("tmpfs")
                            .options(options)
                            .build()
                            .map_err(MountError::src)?,
                    );
                }
                Planned::Secret {
                    id,
                    target,
                    env,
                    source,
                    mode,
                    uid,
                    gid,
                } => {
                    let value = read_secret(id, source)?;
                    if let Some(var) = env {
                        let s = String::from_utf8(value.clone()).map_err(|_| {
                            MountError::Invalid(format!(
                                "secret {id}: not UTF-8, cannot be an env var"
                            ))
                        })?;
                        p.env.push((var.clone(), s));
                    }
                    if let Some(target) = target {
                        if value.len() > kiln_executor::MAX_INLINE_FILE {
                            return Err(MountError::Invalid(format!(
                                "secret {id}: {} bytes is over the limit of {}",
                                value.len(),
                                kiln_executor::MAX_INLINE_FILE
                            )));
                        }
                        p.files.push(kiln_executor::InlineFile {
                            destination: PathBuf::from(target),
                            contents: value,
                            mode: *mode,
                            uid: *uid,
                            gid: *gid,
                        });
                    }
                }
                Planned::Ssh { target, socket } => {
                    use std::os::unix::fs::FileTypeExt;
                    match fs::metadata(socket) {
                        Ok(m) if m.file_type().is_socket() => {}
                        Ok(_) => {
                            return Err(MountError::Invalid(format!(
                                "SSH agent socket {} is not a socket",
                                socket.display()
                            )))
                        }
                        Err(_) => {
                            return Err(MountError::Invalid(format!(
                                "SSH agent socket {} not found",
                                socket.display()
                            )))
                        }
                    }
                    // Read-only (a socket still connects): the step may
                    // not chmod, chown or touch the host's socket.
                    p.mounts.push(bind_mount(target, socket, true)?);
                    p.env.push(("SSH_AUTH_SOCK".into(), target.clone()));
                }
            }
        }
        p._holds.extend(holds.into_values().map(|(h, _)| h));
        Ok(p)
    }
}

fn bind_src(
    backend: &dyn Backend,
    temps: &mut Vec<tempfile::TempDir>,
    target: &str,
    readonly: bool,
    src: &BindSrc,
) -> Result<oci::Mount, MountError> {
    match src {
        BindSrc::Host(h) => {
            if readonly {
                return bind_mount(target, h, true);
            }
            // A writable single file: a throwaway copy of a regular file,
            // read through a descriptor proved to be one. A special file
            // of the image (a device node, a fifo, a socket) is never
            // opened on the host — where nothing is nodev, a device node
            // there is the host's device, a fifo hangs — but bound as it
            // is, read-only (the step's mounts are nodev).
            let Some((mut from, mode)) =
                open_regular(h).map_err(MountError::ctx(format!("opening {}", h.display())))?
            else {
                return bind_mount(target, h, true);
            };
            let t = scratch(backend, "bind-")?;
            let copy = t.path().join("file");
            let mut to = fs::File::create(&copy)
                .map_err(MountError::ctx(format!("creating {}", copy.display())))?;
            std::io::copy(&mut from, &mut to)
                .map_err(MountError::ctx(format!("copying {}", h.display())))?;
            to.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777))
                .map_err(MountError::ctx(format!("chmod {}", copy.display())))?;
            let m = bind_mount(target, &copy, false)?;
            temps.push(t);
            Ok(m)
        }
        BindSrc::Copy(sel) => {
            let t = scratch(backend, "bind-")?;
            let root = t.path().join("root");
            fs::create_dir(&root)
                .map_err(MountError::ctx(format!("creating {}", root.display())))?;
            copy_into(&root, sel)?;
            // A single file selected: bind the file, not the directory.
            let path = match sel.as_slice() {
                [s] if !s.is_dir => root
                    .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&s.name)),
                _ => root,
            };
            let m = bind_mount(target, &path, readonly)?;
            temps.push(t);
            Ok(m)
        }
        BindSrc::Layers(lowers) => match lowers.as_slice() {
            [] => Err(MountError::invalid("mount source is empty")),
            [one] if readonly => bind_mount(target, one, true),
            many => overlay(backend, temps, target, many, readonly),
        },
    }
}

/// `path` opened for reading when it is a regular file (not following a
/// symlink; the descriptor's own file checked, then reopened through it),
/// with its mode; `None` for anything else, which is not opened.
fn open_regular(path: &Path) -> std::io::Result<Option<(fs::File, u32)>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let p = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    let st = p.metadata()?;
    if !st.file_type().is_file() {
        return Ok(None);
    }
    let f = fs::File::open(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&p)
    ))?;
    Ok(Some((f, st.mode())))
}

/// An overlay of `lowers` (top first); writable ones get a throwaway upper.
fn overlay(
    backend: &dyn Backend,
    temps: &mut Vec<tempfile::TempDir>,
    target: &str,
    lowers: &[PathBuf],
    readonly: bool,
) -> Result<oci::Mount, MountError> {
    let lower = lowers
        .iter()
        .map(|l| l.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mut options = vec![format!("lowerdir={lower}")];
    if readonly {
        options.push("ro".into());
    } else {
        let t = scratch(backend, "bind-")?;
        let upper = t.path().join("upper");
        let work = t.path().join("work");
        for d in [&upper, &work] {
            fs::create_dir(d).map_err(MountError::ctx(format!("creating {}", d.display())))?;
        }
        // The mount point shows the source's owner and mode.
        if let Some(m) = lowers.first().and_then(|l| fs::metadata(l).ok()) {
            let _ = std::os::unix::fs::chown(&upper, Some(m.uid()), Some(m.gid()));
            let _ = fs::set_permissions(&upper, fs::Permissions::from_mode(m.mode() & 0o7777));
        }
        options.push(format!("upperdir={}", upper.display()));
        options.push(format!("workdir={}", work.display()));
        temps.push(t);
    }
    oci::MountBuilder::default()
        .destination(target)
        .typ("overlay")
        .source("overlay")
        .options(options)
        .build()
        .map_err(MountError::src)
}

/// The bounding set of this process (what "every capability" can be).
fn own_bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX)
}

/// `RUN --security=insecure`: every capability kiln itself has, no masked
/// or read-only /proc paths, no seccomp filter (BuildKit's privileged mode,
/// without host devices).
pub(super) fn make_insecure(spec: &mut oci::Spec) {
    let all = kiln_executor::caps::capabilities_of(own_bounding_set());
    if let Some(p) = spec.process_mut() {
        let caps = oci::LinuxCapabilitiesBuilder::default()
            .bounding(all.clone())
            .effective(all.clone())
            .permitted(all.clone())
            .inheritable(kiln_executor::caps::capabilities_of(0))
            .ambient(kiln_executor::caps::capabilities_of(0))
            .build()
            .ok();
        p.set_capabilities(caps);
    }
    let mut linux = spec.linux().clone().unwrap_or_default();
    linux.set_masked_paths(Some(Vec::new()));
    linux.set_readonly_paths(Some(Vec::new()));
    linux.set_seccomp(None);
    spec.set_linux(Some(linux));
}

/// `--secret` values of `kiln build`, parsed: `id=ID[,src=FILE|,env=VAR]`
/// (BuildKit also takes `source=`, `type=file|env`; an id alone reads the
/// environment variable of that name).
pub fn parse_secret_flag(s: &str) -> Result<(String, SecretSource), MountError> {
    let mut fields: BTreeMap<String, String> = BTreeMap::new();
    for f in s.split(',') {
        let (k, v) = f.split_once('=').ok_or_else(|| {
            MountError::Invalid(format!("--secret {s:?}: {f:?} is not key=value"))
        })?;
        fields.insert(k.trim().to_ascii_lowercase(), v.to_string());
    }
    let id = fields
        .get("id")
        .cloned()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| MountError::Invalid(format!("--secret {s:?}: id= is required")))?;
    let src = fields.get("src").or_else(|| fields.get("source")).cloned();
    let env = fields.get("env").cloned();
    let typ = fields.get("type").map(String::as_str);
    let source = match (typ, src, env) {
        (Some("env"), Some(v), None) | (_, None, Some(v)) => SecretSource::Env(v),
        (Some("file") | None, Some(p), None) => SecretSource::File(PathBuf::from(p)),
        (None | Some("env"), None, None) => SecretSource::Env(id.clone()),
        (Some("file"), None, None) => SecretSource::File(PathBuf::from(&id)),
        (Some(t), _, _) if t != "file" && t != "env" => {
            return Err(MountError::Invalid(format!(
                "--secret {s:?}: unknown type {t:?} (file or env)"
            )))
        }
        _ => {
            return Err(MountError::Invalid(format!(
                "--secret {s:?}: give either src= or env="
            )))
        }
    };
    Ok((id, source))
}

/// `--ssh` values of `kiln build`: `default` (the `$SSH_AUTH_SOCK` of kiln)
/// or `ID=SOCKET`.
pub fn parse_ssh_flag(s: &str) -> Result<(String, PathBuf), MountError> {
    let (id, path) = match s.split_once('=') {
        Some((id, p)) => (id.to_string(), PathBuf::from(p)),
        None => {
            let sock = std::env::var_os("SSH_AUTH_SOCK")
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    MountError::Invalid(format!(
                        "--ssh {s}: SSH_AUTH_SOCK is not set; give ID=SOCKET"
                    ))
                })?;
            (s.to_string(), PathBuf::from(sock))
        }
    };
    if id.is_empty() {
        return Err(MountError::Invalid(format!("--ssh {s:?}: empty id")));
    }
    if path.to_string_lossy().contains(',') {
        return Err(MountError::Invalid(format!(
            "--ssh {s:?}: only one socket per id is supported (no key files)"
        )));
    }
    Ok((id, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_flags() {
        assert_eq!(
            parse_secret_flag("id=a,src=/x").unwrap(),
            ("a".into(), SecretSource::File("/x".into()))
        );
        assert_eq!(
            parse_secret_flag("id=a,env=TOK").unwrap(),
            ("a".into(), SecretSource::Env("TOK".into()))
        );
        assert_eq!(
            parse_secret_flag("id=TOK").unwrap(),
            ("TOK".into(), SecretSource::Env("TOK".into()))
        );
        assert_eq!(
            parse_secret_flag("type=file,id=a,source=/y").unwrap(),
            ("a".into(), SecretSource::File("/y".into()))
        );
        assert!(parse_secret_flag("src=/x").is_err());
        assert!(parse_secret_flag("id=a,src=/x,env=Y").is_err());
    }

    #[test]
    fn ssh_flags() {
        assert_eq!(
            parse_ssh_flag("default=/tmp/s").unwrap(),
            ("default".into(), PathBuf::from("/tmp/s"))
        );
        assert!(parse_ssh_flag("=/tmp/s").is_err());
    }
}
