//! `File` ops: COPY/ADD (selected sources, hashed through the
//! stat-keyed hash cache, copied in parallel onto a fresh snapshot),
//! WORKDIR's directory, and a `--build-context` directory as a base.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_parser::dockerignore::PatternMatcher;

use super::{at_line, blocking, Solved, Solver};
use crate::backend::LayerRecord;
use crate::copy::{copy_selections, hash_selection, CopyOptions, Selection, Selector};
use crate::error::BuildError;
use crate::fsview::LayerView;
use crate::op::key::{cache_key, copy_shape_key, KeyInputs};
use crate::op::{ContextDirOp, CopyOp, LayerOp, MkdirOp, Op, Source};

impl Solver {
    pub(super) async fn run_mkdir(
        self: Arc<Self>,
        state: &Solved,
        lop: &LayerOp,
        op: &MkdirOp,
    ) -> Result<LayerRecord, BuildError> {
        let key = cache_key(
            &Op::Mkdir(op.clone()),
            &KeyInputs {
                parent: &state.key,
                clamp: self.opts.source_date_epoch,
                ..KeyInputs::default()
            },
        )
        .finish();
        let user = op.user.clone();
        let dir = op.path.clone();
        self.layer_step(&lop.name, state, key, false, move |view| {
            let owner = match &user {
                Some(u) => resolve_owner(view, u)?,
                None => (0, 0),
            };
            let resolved = view.resolve(&dir, true).map_err(BuildError::from_cause)?;
            view.ensure_dir(&resolved, owner)
                .map_err(BuildError::from_cause)?;
            Ok(None)
        })
        .await
    }

    /// `FROM NAME` where `--build-context NAME=DIR`: the directory's files
    /// (owned by root, as the build context's are) become the base's one
    /// layer, keyed by their content.
    pub(super) async fn run_context_dir(
        self: Arc<Self>,
        state: &Solved,
        lop: &LayerOp,
        op: &ContextDirOp,
    ) -> Result<LayerRecord, BuildError> {
        let backend = self.backend.clone();
        let d = op.dir.clone();
        let mut key = cache_key(&Op::ContextDir(op.clone()), &KeyInputs::default());
        let cancel = self.cancel.clone();
        let (selections, key) = blocking(move || -> Result<_, BuildError> {
            let view = LayerView::new(vec![d], true);
            let sel = Selector {
                view: &view,
                ignore: None,
                exclude: None,
            }
            .select("/")
            .map_err(BuildError::from_cause)?;
            hash_selection(&mut key, &sel, backend.hash_cache(), false, Some(&cancel))
                .map_err(hash_error)?;
            Ok((sel, key.finish()))
        })
        .await?;
        let opts = CopyOptions {
            clamp_mtime: self.opts.source_date_epoch,
            cancel: Some(self.cancel.clone()),
            ..CopyOptions::default()
        };
        self.layer_step(&lop.name, state, key, false, move |dst| {
            copy_selections(dst, "/", true, &selections, &opts)
                .map(|()| None)
                .map_err(BuildError::from_cause)
        })
        .await
    }

    pub(super) async fn run_copy(
        self: Arc<Self>,
        state: &Solved,
        lop: &LayerOp,
        op: &CopyOp,
        ignore_cache: bool,
    ) -> Result<LayerRecord, BuildError> {
        let line = lop.location;
        let name = lop.name.as_str();
        let excludes = &op.excludes;
        let exclude = if excludes.is_empty() {
            None
        } else {
            Some(
                PatternMatcher::new(excludes)
                    .map_err(|e| BuildError::at(line, format!("--exclude: {e}")))?,
            )
        };
        // A named directory context is read like the build context (files
        // owned by root), without the context's .dockerignore.
        let named_dir = matches!(op.from, Some(Source::ContextDir(_)));
        let (view, from_context) = match &op.from {
            Some(f) => (self.source_state(f, line).await?.1, false),
            None => (LayerView::new(vec![self.opts.context.clone()], true), true),
        };
        // Select and hash off the async threads.
        let backend = self.backend.clone();
        let ignore = if from_context {
            self.ignore.clone()
        } else {
            None
        };
        let (src, fetched) = if op.add || op.checksum.is_some() {
            self.fetch_remote_sources(&op.sources, op.checksum.as_deref(), op.keep_git_dir, line)
                .await?
        } else {
            (op.sources.clone(), Vec::new())
        };
        let picks: Vec<(PathBuf, String, bool)> = fetched
            .iter()
            .map(|f| (f.dir.path().to_path_buf(), f.select.clone(), f.hash_content))
            .collect();
        let remote: Vec<String> = fetched.iter().map(|f| f.identity.clone()).collect();
        let mut key = cache_key(
            &Op::Copy(op.clone()),
            &KeyInputs {
                parent: &state.key,
                mounts: &[],
                remote: &remote,
                clamp: self.opts.source_date_epoch,
            },
        );
        let view2 = view.clone();
        let parents = op.parents;
        // A plain COPY from the context may hard-link the files it shares
        // with its previous run: find that run by the step's shape (the key
        // without the content).
        let reusable = from_context
            && !op.add
            && !op.link
            && fetched.is_empty()
            // Heredocs are written after the copy, over its files, and are
            // not in the shape: such a layer's index would name a file a
            // heredoc replaced.
            && op.heredocs.is_empty();
        let shape = copy_shape_key(op, &state.key);
        // Only the previous run's record is looked up here; its index is
        // read by the copy itself, which a cache hit never runs.
        let prev_layer = if reusable && !self.opts.no_cache && !ignore_cache {
            let backend = self.backend.clone();
            let sk = shape.clone();
            blocking(move || backend.cache_get(&sk))
                .await
                .unwrap_or(None)
        } else {
            None
        };
        let prev_snapshot = prev_layer.as_ref().map(|l| l.snapshot.clone());
        let cancel = self.cancel.clone();
        let t = std::time::Instant::now();
        let ((selections, fetched_sel, src_hashes), key) =
            blocking(move || -> Result<_, BuildError> {
                let selector = Selector {
                    view: &view2,
                    ignore: ignore.as_ref(),
                    exclude: exclude.as_ref(),
                };
                let mut all: Vec<Selection> = Vec::new();
                if parents {
                    all.push(
                        crate::parents::select_parents(&selector, &src)
                            .map_err(BuildError::from_cause)?,
                    );
                } else {
                    for s in &src {
                        all.extend(selector.select(s).map_err(BuildError::from_cause)?);
                    }
                }
                let src_hashes = crate::copy::hash_selection_map(
                    &mut key,
                    &all,
                    backend.hash_cache(),
                    !from_context && !named_dir,
                    Some(&cancel),
                )
                .map_err(hash_error)?;
                let mut fetched_sel: Vec<Selection> = Vec::new();
                for (dir, pick, hash_content) in &picks {
                    let v = LayerView::new(vec![dir.clone()], true);
                    let sel = Selector {
                        view: &v,
                        ignore: None,
                        exclude: exclude.as_ref(),
                    };
                    let picked = sel.select(pick).map_err(BuildError::from_cause)?;
                    if *hash_content {
                        hash_selection(
                            &mut key,
                            &picked,
                            &crate::copy::NoHashCache,
                            false,
                            Some(&cancel),
                        )
                        .map_err(hash_error)?;
                    }
                    fetched_sel.extend(picked);
                }
                Ok(((all, fetched_sel, src_hashes), key.finish()))
            })
            .await
            .map_err(at_line(line))?;
        tracing::debug!(
            seconds = t.elapsed().as_secs_f64(),
            "COPY sources selected and hashed"
        );
        let contents: Vec<(String, String)> = op
            .heredocs
            .iter()
            .map(|h| (h.path.clone(), h.data.clone()))
            .collect();
        let opts = CopyOptions {
            owner: None,
            keep_owner: !from_context && !named_dir,
            chmod: op.chmod.clone(),
            clamp_mtime: self.opts.source_date_epoch,
            reuse: None,
            cancel: Some(self.cancel.clone()),
        };
        let reuse_backend = self.backend.clone();
        let add = op.add;
        let link = op.link;
        let unpack_remote = op.unpack_remote;
        let chown = op.chown.clone();
        let dest = op.dest.clone();
        let dest_is_dir = op.dest_is_dir;
        // A plain COPY into its fresh snapshot digests the layer as it
        // writes it (a second thread reads the written files back and
        // hashes the tar; a rerun resumes that hash past the entries it
        // shares with its previous run); the commit then diffs nothing.
        // Everything else is diffed at the commit as before.
        let streamable = !add && fetched.is_empty() && contents.is_empty();
        let clamp = self.opts.source_date_epoch;
        let diff_opts = self.diff_options();
        let work = move |dst: &LayerView| {
            let mut opts = opts;
            if reusable {
                let prev = prev_layer.and_then(|layer| {
                    let dir = reuse_backend
                        .layer_dirs(&layer.snapshot)
                        .ok()?
                        .into_iter()
                        .next()?;
                    let index = crate::copy::Reuse::load_index(&dir)?;
                    Some((dir, index))
                });
                opts.reuse = Some(std::sync::Arc::new(crate::copy::Reuse {
                    src_hashes,
                    prev,
                    written: Default::default(),
                    shared: Default::default(),
                }));
            }
            if let Some(c) = &chown {
                opts.owner = Some(resolve_owner(dst, c)?);
            }
            // Downloads are not unpacked unless --unpack=true.
            if unpack_remote {
                crate::archive::add_selections(dst, &dest, dest_is_dir, &fetched_sel, &opts)
                    .map_err(BuildError::from_cause)?;
            } else if !fetched_sel.is_empty() {
                copy_selections(dst, &dest, dest_is_dir, &fetched_sel, &opts)
                    .map_err(BuildError::from_cause)?;
            }
            drop(fetched);
            if selections.is_empty() {
                // Only remote sources (or heredocs).
            } else if add {
                crate::archive::add_selections(dst, &dest, dest_is_dir, &selections, &opts)
                    .map_err(BuildError::from_cause)?;
            } else {
                // A rerun of this COPY resumes the layer's hash where its
                // first entries stop being the previous run's.
                let prev_marks = opts
                    .reuse
                    .as_ref()
                    .and_then(|r| r.prev.as_ref())
                    .map(|(dir, _)| kiln_cache::Marks::load(dir))
                    .unwrap_or_default();
                let mut stream = match dst.top() {
                    Some(top) if streamable && upper_is_empty(top) => {
                        Some(kiln_cache::LayerStream::resuming(clamp, prev_marks))
                    }
                    _ => None,
                };
                match stream.as_mut() {
                    Some(st) => crate::copy::copy_selections_streamed(
                        dst,
                        &dest,
                        dest_is_dir,
                        &selections,
                        &opts,
                        st,
                    ),
                    None => copy_selections(dst, &dest, dest_is_dir, &selections, &opts),
                }
                .map_err(BuildError::from_cause)?;
                if let (Some(r), Some(top)) = (&opts.reuse, dst.top()) {
                    r.store_index(top).map_err(BuildError::from_cause)?;
                }
                if let (Some(st), Some(top)) = (stream, dst.top()) {
                    let t = std::time::Instant::now();
                    let resumed_from = st.resumed_from();
                    // A stream that does not match the upperdir, or fails
                    // its check, is dropped: the commit diffs instead.
                    let streamed = st.finish(top, &diff_opts).ok().flatten();
                    tracing::debug!(
                        seconds = t.elapsed().as_secs_f64(),
                        streamed = streamed.is_some(),
                        resumed_from,
                        "COPY layer stream checked"
                    );
                    return Ok(streamed.map(|(s, marks)| {
                        // Best effort: without marks a rerun hashes it all.
                        let _ = marks.store(top);
                        s
                    }));
                }
            }
            for (name, data) in &contents {
                crate::archive::write_inline(
                    dst,
                    &dest,
                    dest_is_dir || contents.len() > 1,
                    name,
                    data,
                    &opts,
                )
                .map_err(BuildError::from_cause)?;
            }
            Ok(None)
        };
        let layer = if link {
            self.clone()
                .link_step(name, state, key, ignore_cache, work)
                .await
        } else {
            self.clone()
                .layer_step(name, state, key, ignore_cache, work)
                .await
        }
        .map_err(at_line(line))?;
        // A fully cached COPY whose shape already names this layer writes
        // nothing.
        if reusable && prev_snapshot.as_deref() != Some(layer.snapshot.as_str()) {
            let backend = self.backend.clone();
            let l = layer.clone();
            // Best effort: without the alias the next run copies everything.
            let _ = blocking(move || backend.cache_alias(&shape, &l)).await;
        }
        Ok(layer)
    }
}

/// Whether a snapshot's top layer directory holds nothing yet (a COPY
/// into it may stream its layer, see [`kiln_cache::LayerStream`]).
fn upper_is_empty(top: &std::path::Path) -> bool {
    std::fs::read_dir(top).is_ok_and(|mut d| d.next().is_none())
}

/// Resolves `user[:group]` through the view's /etc/passwd and /etc/group
/// (BuildKit's rule, [`kiln_fs::userdb::resolve_chown`]).
fn resolve_owner(view: &LayerView, spec: &str) -> Result<(u32, u32), super::StepError> {
    // A missing file is empty (numeric ids still work); a device, fifo or
    // oversized file in the image is an error, never opened or read whole.
    let read = |p: &str| match view.read(p) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(crate::fsview::ViewError::NotFound(_)) => Ok(String::new()),
        Err(e) => Err(super::StepError::ctx(format!(
            "reading {p} to resolve --chown={spec}"
        ))(e)),
    };
    let passwd = read("/etc/passwd")?;
    let groups = read("/etc/group")?;
    kiln_fs::userdb::resolve_chown(spec, &passwd, &groups).map_err(super::StepError::src)
}

/// An error hashing COPY sources for the cache key: a cancellation is the
/// build's (not a failure of the step), anything else keeps its cause.
fn hash_error(e: crate::copy::CopyError) -> BuildError {
    match e {
        crate::copy::CopyError::Cancelled => BuildError::Cancelled,
        e => BuildError::from_cause(e),
    }
}
