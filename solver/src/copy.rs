//! COPY and ADD: selecting sources (wildcards, `.dockerignore`, directory
//! contents), hashing exactly what was selected for the cache key, and
//! writing it into a snapshot's top layer with Docker's destination rules.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kiln_parser::dockerignore::{match_text, PatternMatcher};
use kiln_parser::glob::{has_meta as has_glob, match_pattern};
use sha2::{Digest as _, Sha256};

use crate::fsview::{
    base_bytes, clean_bytes, components, join_bytes, parent_bytes, show, LayerView, ViewError,
};
use crate::key::KeyHasher;

/// The identity of a file's content as `stat` sees it: if all of these are
/// unchanged, the content is taken as unchanged (never the mtime alone).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StatKey {
    /// Host path.
    pub path: PathBuf,
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status-change time, nanoseconds since the epoch.
    pub ctime_ns: i64,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
}

impl StatKey {
    fn of(path: &Path, m: &fs::Metadata) -> Self {
        StatKey {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            mode: m.mode(),
        }
    }
}

/// A persistent map from [`StatKey`] to content sha256, so that unchanged
/// files are never read twice. Implemented by the store.
pub trait HashCache: Send + Sync {
    /// Looks up many keys at once.
    fn lookup(&self, keys: &[StatKey]) -> Vec<Option<[u8; 32]>>;
    /// Records many hashes at once.
    fn store(&self, entries: &[(StatKey, [u8; 32])]);
}

/// A `HashCache` that remembers nothing.
pub struct NoHashCache;

impl HashCache for NoHashCache {
    fn lookup(&self, keys: &[StatKey]) -> Vec<Option<[u8; 32]>> {
        vec![None; keys.len()]
    }
    fn store(&self, _: &[(StatKey, [u8; 32])]) {}
}

/// Errors of COPY/ADD.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A view error (not found, escape, …).
    #[error(transparent)]
    View(#[from] ViewError),
    /// A source pattern matched nothing.
    #[error("failed to compute cache key: \"{0}\" not found")]
    NotFound(String),
    /// Several sources into a destination without a trailing slash.
    #[error("When using COPY with more than one source file, the destination must be a directory and end with a /")]
    DestNotDir,
    /// A bad `.dockerignore` pattern.
    #[error(".dockerignore: {0}")]
    Ignore(String),
    /// I/O.
    #[error("{0}: {1}")]
    Io(String, io::Error),
    /// The build was cancelled while copying.
    #[error("cancelled")]
    Cancelled,
}

fn io_err(p: &Path, e: io::Error) -> CopyError {
    CopyError::Io(p.display().to_string(), e)
}

/// One entry to copy. Names are bytes (not necessarily UTF-8).
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path relative to the destination base ("" = the base itself).
    pub rel: Vec<u8>,
    /// Host path to read from.
    pub host: PathBuf,
    /// Its lstat.
    pub meta: fs::Metadata,
    /// Symlink target, for links.
    pub link: Option<Vec<u8>>,
}

/// One selected source and everything under it.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The resolved source path in its view.
    pub path: Vec<u8>,
    /// The base name the source was selected by, before its last symlink
    /// was followed: a file copied into a directory takes this name
    /// (BuildKit: `filepath.Base(src)`), not its link target's.
    pub name: Vec<u8>,
    /// True when the source is a directory (its contents are copied).
    pub is_dir: bool,
    /// The entries, sorted, the source itself first (rel "").
    pub entries: Vec<Entry>,
}

/// Source selection over a view, honouring `.dockerignore` for the context.
pub struct Selector<'a> {
    /// The view sources are read from.
    pub view: &'a LayerView,
    /// `.dockerignore` (context only).
    pub ignore: Option<&'a PatternMatcher>,
    /// `--exclude` patterns.
    pub exclude: Option<&'a PatternMatcher>,
}

impl Selector<'_> {
    fn excluded(&self, path: &[u8]) -> Result<bool, CopyError> {
        self.excluded_at(path, path)
    }

    /// `.dockerignore` matches `resolved`, where a path reached through
    /// symlinks of the context really is: what it leaves out is not in
    /// the context at all (BuildKit never sends it), so no link leads to
    /// it either (`cfg -> .env`, `gitdir -> .git` copied the secrets the
    /// file excluded).
    fn ignored_target(&self, logical: &[u8], resolved: &[u8]) -> Result<bool, CopyError> {
        let Some(m) = self.ignore else {
            return Ok(false);
        };
        if clean_bytes(logical) == clean_bytes(resolved) {
            return Ok(false);
        }
        let rel = crate::fsview::rel(resolved).as_bytes();
        if rel.is_empty() {
            return Ok(false);
        }
        m.matches_or_parent_matches_bytes(rel)
            .map_err(|e| CopyError::Ignore(e.to_string()))
    }

    /// `.dockerignore` matches `path` (relative to the context root);
    /// `--exclude` matches `in_source` (relative to the copied source, as
    /// BuildKit's copier does: `COPY --exclude=*.log src/ /app/` drops
    /// `src/b.log`).
    ///
    /// Patterns are text; a name that is not UTF-8 is matched as
    /// [`match_text`] spells it (each bad byte one U+FFFD, as Go reads
    /// it), for matching only: the entry keeps its bytes.
    fn excluded_at(&self, path: &[u8], in_source: &[u8]) -> Result<bool, CopyError> {
        for (m, p) in [(self.ignore, path), (self.exclude, in_source)] {
            let Some(m) = m else {
                continue;
            };
            let rel = crate::fsview::rel(p).as_bytes();
            if rel.is_empty() {
                continue;
            }
            if m.matches_or_parent_matches_bytes(rel)
                .map_err(|e| CopyError::Ignore(e.to_string()))?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Expands one source pattern (relative to the view's root).
    pub fn select(&self, pattern: &str) -> Result<Vec<Selection>, CopyError> {
        let clean = clean_bytes(pattern.as_bytes());
        if pattern.split('/').filter(|c| *c == "..").count() > 0
            && self.view.resolve(pattern, false).is_err()
        {
            return Err(ViewError::Escape(pattern.to_string()).into());
        }
        let paths = if has_glob(&show(&clean)) {
            self.glob(&clean)?
        } else {
            vec![clean.clone()]
        };
        let mut out = Vec::new();
        for p in paths {
            let resolved = self.view.resolve(&p, true)?;
            if self.excluded(&p)? || self.ignored_target(&p, &resolved)? {
                continue;
            }
            let Some(found) = self.view.lookup(&resolved) else {
                if components(&resolved).next().is_none() {
                    // The root of a stage with no layers (only `FROM
                    // scratch`): an empty directory, as BuildKit sees it,
                    // so copying it copies nothing.
                    out.push(Selection {
                        name: base_bytes(&p).to_vec(),
                        path: resolved,
                        is_dir: true,
                        entries: Vec::new(),
                    });
                }
                continue;
            };
            // `resolve` followed every symlink, so a symlink here is one
            // swapped in since: never copied as the source itself (a bind
            // mount of that copy would follow it on the host).
            if found.meta.file_type().is_symlink() {
                return Err(io_err(
                    &found.host,
                    io::Error::other(
                        "the file changed while it was read (a symlink is at its path now)",
                    ),
                ));
            }
            let is_dir = found.meta.is_dir();
            let mut entries = vec![Entry {
                rel: Vec::new(),
                link: None,
                host: found.host.clone(),
                meta: found.meta,
            }];
            if is_dir {
                self.walk_all(
                    Job {
                        dir: resolved.clone(),
                        host: found.host.clone(),
                        logical: p.clone(),
                        rel: Vec::new(),
                        hidden: None,
                    },
                    &mut entries,
                )?;
            }
            out.push(Selection {
                name: base_bytes(&p).to_vec(),
                path: resolved,
                is_dir,
                entries,
            });
        }
        if out.is_empty() {
            return Err(CopyError::NotFound(pattern.to_string()));
        }
        Ok(out)
    }

    /// The paths a wildcard pattern (clean, absolute) matches. Patterns
    /// are text; names that are not UTF-8 are matched as [`match_text`]
    /// spells them (as Go's `filepath.Match` reads them) and kept as their
    /// bytes.
    fn glob(&self, pattern: &[u8]) -> Result<Vec<Vec<u8>>, CopyError> {
        let mut current = vec![Vec::new()];
        for comp in components(pattern) {
            let mut next = Vec::new();
            let comp_s = match_text(comp);
            for base in &current {
                if !has_glob(&comp_s) {
                    next.push(join_child(base, comp));
                    continue;
                }
                let dir: &[u8] = if base.is_empty() { b"/" } else { base };
                let resolved = self.view.resolve(dir, true)?;
                let names = match self.view.read_dir(&resolved) {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                for n in names {
                    // A malformed pattern matches nothing, as BuildKit's
                    // copy ignores `filepath.Match`'s error.
                    if match_pattern(&comp_s, &match_text(&n)) == Ok(true) {
                        next.push(join_child(base, &n));
                    }
                }
            }
            current = next;
        }
        current.retain(|p| !p.is_empty());
        Ok(current)
    }

    /// Calls `f` for each entry of `job`'s directory, in name order: an
    /// [`Step::Entry`] for each selected one, and a [`Step::Descend`] for
    /// each directory to walk next (right after its own entry, or alone
    /// for an excluded directory that exclusions may reach into).
    fn visit(
        &self,
        job: &Job,
        f: &mut dyn FnMut(Step) -> Result<(), CopyError>,
    ) -> Result<(), CopyError> {
        for (name, found) in self.view.children(&job.dir, &job.host)? {
            let path = join_child(&job.dir, &name);
            let lpath = join_child(&job.logical, &name);
            let r = if job.rel.is_empty() {
                name
            } else {
                let mut r = job.rel.clone();
                r.push(b'/');
                r.extend_from_slice(&name);
                r
            };
            let is_dir = found.meta.is_dir();
            if self.excluded_at(&lpath, &r)? || self.ignored_target(&lpath, &path)? {
                let reinclude = [self.ignore, self.exclude]
                    .into_iter()
                    .flatten()
                    .any(|m| m.exclusions());
                if is_dir && reinclude {
                    // Its own entry goes in before its first re-included
                    // file, if one is (as the context then holds the
                    // directory: COPY failed making the file in it).
                    let own = Entry {
                        rel: r.clone(),
                        host: found.host.clone(),
                        meta: found.meta,
                        link: None,
                    };
                    f(Step::Descend(Job {
                        dir: path,
                        host: found.host,
                        logical: lpath,
                        rel: r,
                        hidden: Some(Box::new(own)),
                    }))?;
                }
                continue;
            }
            let link = if found.meta.file_type().is_symlink() {
                Some(
                    self.view
                        .read_link(&found.host)
                        .map_err(|e| io_err(&found.host, e))?
                        .into_os_string()
                        .into_vec(),
                )
            } else {
                None
            };
            let sub = is_dir.then(|| Job {
                dir: path,
                host: found.host.clone(),
                logical: lpath,
                rel: r.clone(),
                hidden: None,
            });
            f(Step::Entry(Entry {
                rel: r,
                host: found.host,
                meta: found.meta,
                link,
            }))?;
            if let Some(j) = sub {
                f(Step::Descend(j))?;
            }
        }
        Ok(())
    }

    /// Everything below `job`'s directory, depth first in name order.
    fn walk(&self, job: &Job, out: &mut Vec<Entry>) -> Result<(), CopyError> {
        // A tree deeper than a layer may be (a context of 2,000 nested
        // directories overflowed the stack): an error that says so.
        if job.rel.iter().filter(|b| **b == b'/').count() + 1 > kiln_image::diff::MAX_TREE_DEPTH {
            return Err(io_err(
                &job.host,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "a directory tree deeper than {} levels",
                        kiln_image::diff::MAX_TREE_DEPTH
                    ),
                ),
            ));
        }
        let before = out.len();
        self.visit(job, &mut |s| match s {
            Step::Entry(e) => {
                out.push(e);
                Ok(())
            }
            Step::Descend(j) => self.walk(&j, out),
        })?;
        if let Some(own) = &job.hidden {
            if out.len() > before {
                out.insert(before, (**own).clone());
            }
        }
        Ok(())
    }

    /// [`Selector::walk`] on every core: the top levels are listed here
    /// until there are enough directories left to walk, which threads then
    /// walk whole; the pieces are put back together in walk order, so the
    /// result is the same as one thread's.
    fn walk_all(&self, root: Job, out: &mut Vec<Entry>) -> Result<(), CopyError> {
        let threads = cores();
        if threads < 2 {
            return self.walk(&root, out);
        }
        let mut pieces = vec![Piece::Todo(root)];
        for _ in 0..WALK_SPLIT_LEVELS {
            let todo = pieces
                .iter()
                .filter(|p| matches!(p, Piece::Todo(_)))
                .count();
            if todo == 0 || todo >= threads * WALK_JOBS_PER_THREAD {
                break;
            }
            let mut next = Vec::with_capacity(pieces.len() + todo * 4);
            for p in pieces {
                let job = match p {
                    // An excluded directory is walked whole (its own entry
                    // depends on what is found below it).
                    Piece::Todo(j) if j.hidden.is_none() => j,
                    other => {
                        next.push(other);
                        continue;
                    }
                };
                let mut cur = Vec::new();
                self.visit(&job, &mut |s| {
                    match s {
                        Step::Entry(e) => cur.push(e),
                        Step::Descend(j) => {
                            next.push(Piece::Done(std::mem::take(&mut cur)));
                            next.push(Piece::Todo(j));
                        }
                    }
                    Ok(())
                })?;
                next.push(Piece::Done(cur));
            }
            pieces = next;
        }
        let jobs: Vec<&Job> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Todo(j) => Some(j),
                Piece::Done(_) => None,
            })
            .collect();
        let walked = map_on_cores(&jobs, |job| {
            let mut v = Vec::new();
            self.walk(job, &mut v).map(|()| v)
        })?;
        let mut walked = walked.into_iter();
        for p in pieces {
            match p {
                Piece::Done(v) => out.extend(v),
                // map_on_cores gives one result per job, in order.
                Piece::Todo(_) => out.extend(walked.next().into_iter().flatten()),
            }
        }
        Ok(())
    }
}

/// How many levels [`Selector::walk_all`] lists itself, at most, before it
/// hands the directories below to threads.
const WALK_SPLIT_LEVELS: usize = 4;
/// Directories per thread that [`Selector::walk_all`] aims for, so that a
/// big one does not leave the other threads idle for long.
const WALK_JOBS_PER_THREAD: usize = 8;

/// `dir/name` for an absolute slash path `dir` ("" or "/" = the root).
fn join_child(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let dir = dir.strip_suffix(b"/").unwrap_or(dir);
    let mut p = Vec::with_capacity(dir.len() + name.len() + 1);
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// A directory still to be walked. Paths are bytes.
struct Job {
    /// Its resolved path in the view.
    dir: Vec<u8>,
    /// Where it is on the host.
    host: PathBuf,
    /// Its path as the source pattern names it (for `.dockerignore`).
    logical: Vec<u8>,
    /// Its path relative to the selected source.
    rel: Vec<u8>,
    /// An excluded directory walked for what exclusions re-include: its
    /// own entry, which goes before the first of them (none: none is).
    hidden: Option<Box<Entry>>,
}

/// What [`Selector::visit`] found.
enum Step {
    Entry(Entry),
    Descend(Job),
}

/// A run of walked entries, or a directory still to walk in its place.
enum Piece {
    Done(Vec<Entry>),
    Todo(Job),
}

/// Hashes the selected files' content (through `cache`) and metadata into
/// `key`. Never the mtime. Stops with [`CopyError::Cancelled`] between
/// files and between reads of a file once `cancel` fires.
pub fn hash_selection(
    key: &mut KeyHasher,
    selections: &[Selection],
    cache: &dyn HashCache,
    keep_owner: bool,
    cancel: Option<&kiln_executor::CancellationToken>,
) -> Result<(), CopyError> {
    hash_selection_map(key, selections, cache, keep_owner, cancel).map(|_| ())
}

/// Hashes files not known to the cache, on every core.
fn hash_files(
    paths: &[&StatKey],
    cancel: Option<&kiln_executor::CancellationToken>,
) -> Result<Vec<[u8; 32]>, CopyError> {
    if paths.len() < 16 {
        return paths.iter().map(|p| sha256_file(p, cancel)).collect();
    }
    map_on_cores(paths, |p| sha256_file(p, cancel))
}

/// Threads the COPY walk and hasher use: one per core, at most 8.
fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

/// `f` of every item, on [`cores`] threads that take the next item as
/// they finish one; the results come in the items' order, or the first
/// error in that order (after an error no more items are started).
/// The stack of a thread that walks a tree (16 MiB: a tree of
/// [`kiln_image::diff::MAX_TREE_DEPTH`] levels, unoptimised builds too).
pub const DEEP_STACK: usize = 16 << 20;

fn map_on_cores<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R, CopyError> + Sync,
) -> Result<Vec<R>, CopyError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let threads = cores().min(items.len());
    if threads < 2 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut mine = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            let r = f(item);
            if r.is_err() {
                next.store(items.len(), Ordering::Relaxed);
            }
            mine.push((i, r));
        }
        mine
    };
    let parts = std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(threads);
        for _ in 0..threads {
            // Room for a tree of MAX_TREE_DEPTH levels (the walk recurses
            // per level).
            match std::thread::Builder::new()
                .stack_size(DEEP_STACK)
                .spawn_scoped(scope, work)
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    next.store(items.len(), Ordering::Relaxed);
                    return Err(CopyError::Io("COPY".into(), e));
                }
            }
        }
        handles
            .into_iter()
            .map(|h| h.join())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| CopyError::Io("COPY".into(), io::Error::other("a worker thread panicked")))
    })?;
    // Items are handed out in order, so those done are a prefix of them,
    // and one cut short ends in an error.
    let mut parts: Vec<_> = parts.into_iter().flatten().collect();
    parts.sort_unstable_by_key(|(i, _)| *i);
    let out = parts
        .into_iter()
        .map(|(_, r)| r)
        .collect::<Result<Vec<R>, _>>()?;
    if out.len() != items.len() {
        return Err(CopyError::Io(
            "COPY".into(),
            io::Error::other("an item was not done"),
        ));
    }
    Ok(out)
}

/// [`hash_selection`], also returning each selected file's content
/// sha256 by host path.
pub fn hash_selection_map(
    key: &mut KeyHasher,
    selections: &[Selection],
    cache: &dyn HashCache,
    keep_owner: bool,
    cancel: Option<&kiln_executor::CancellationToken>,
) -> Result<HashMap<PathBuf, [u8; 32]>, CopyError> {
    let mut files: Vec<StatKey> = Vec::new();
    for s in selections {
        for e in &s.entries {
            if e.meta.file_type().is_file() {
                files.push(StatKey::of(&e.host, &e.meta));
            }
        }
    }
    let known = cache.lookup(&files);
    let mut hashes: HashMap<PathBuf, [u8; 32]> = HashMap::with_capacity(files.len());
    let missing: Vec<&StatKey> = files
        .iter()
        .zip(&known)
        .filter(|(_, h)| h.is_none())
        .map(|(k, _)| k)
        .collect();
    let computed = hash_files(&missing, cancel)?;
    let fresh: Vec<(StatKey, [u8; 32])> = missing.into_iter().cloned().zip(computed).collect();
    for (k, h) in files.iter().zip(known) {
        if let Some(h) = h {
            hashes.insert(k.path.clone(), h);
        }
    }
    for (k, h) in &fresh {
        hashes.insert(k.path.clone(), *h);
    }
    if !fresh.is_empty() {
        cache.store(&fresh);
    }
    // A copy keeps hard links: which entries are one file is part of
    // what it makes (whichever build ran first decided it for both).
    let mut inodes: HashMap<(u64, u64), u64> = HashMap::new();
    let mut ordinal = 0u64;
    for s in selections {
        key.field(&s.path)
            .field(if s.is_dir { "dir" } else { "file" });
        // A file copied into a directory takes the name it was selected
        // by, which may be a link's, not its target's.
        let target_name = s.path.rsplit(|b| *b == b'/').next().unwrap_or(&[]);
        if !s.is_dir && s.name.as_slice() != target_name {
            key.field("name").field(&s.name);
        }
        key.field((s.entries.len() as u64).to_le_bytes());
        for e in &s.entries {
            let m = &e.meta;
            key.field(&e.rel).field(m.mode().to_le_bytes());
            if keep_owner {
                key.field(m.uid().to_le_bytes())
                    .field(m.gid().to_le_bytes());
            }
            if let Some(l) = &e.link {
                key.field(l);
            }
            {
                use std::os::unix::fs::FileTypeExt;
                let ft = m.file_type();
                if ft.is_block_device() || ft.is_char_device() {
                    key.field(m.rdev().to_le_bytes());
                }
            }
            if m.file_type().is_file() {
                key.field(m.size().to_le_bytes());
                if let Some(h) = hashes.get(&e.host) {
                    key.field(h);
                }
                if m.nlink() > 1 {
                    match inodes.entry((m.dev(), m.ino())) {
                        std::collections::hash_map::Entry::Occupied(o) => {
                            key.field("hardlink").field(o.get().to_le_bytes());
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(ordinal);
                        }
                    }
                }
            }
            ordinal += 1;
        }
    }
    Ok(hashes)
}

fn sha256_file(
    p: &StatKey,
    cancel: Option<&kiln_executor::CancellationToken>,
) -> Result<[u8; 32], CopyError> {
    let cancelled = || cancel.is_some_and(|c| c.is_cancelled());
    if cancelled() {
        return Err(CopyError::Cancelled);
    }
    let mut f =
        crate::fsview::open_found(&p.path, (p.dev, p.ino)).map_err(|e| io_err(&p.path, e))?;
    let p = &p.path;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 17];
    // Asked every HASH_CHECK bytes: a big file stops within one such run.
    let mut since_check = 0usize;
    loop {
        if since_check >= HASH_CHECK {
            if cancelled() {
                return Err(CopyError::Cancelled);
            }
            since_check = 0;
        }
        let n = f.read(&mut buf).map_err(|e| io_err(p, e))?;
        since_check += n;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// How copied entries are owned and moded.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// `--chown`, resolved. `None`: root for the context, kept for stages.
    pub owner: Option<(u32, u32)>,
    /// Keep source ownership when `owner` is `None` (COPY --from).
    pub keep_owner: bool,
    /// `--chmod`, resolved per entry against its source mode.
    pub chmod: Option<crate::chmod::Chmod>,
    /// Clamp mtimes to this (SOURCE_DATE_EPOCH).
    pub clamp_mtime: Option<i64>,
    /// Reuse unchanged files of the previous run of this COPY.
    pub reuse: Option<std::sync::Arc<Reuse>>,
    /// Stops the copy (with [`CopyError::Cancelled`]) between entries and
    /// between chunks of a large file once cancelled (Ctrl-C, or another
    /// step of the build failed).
    pub cancel: Option<kiln_executor::CancellationToken>,
}

impl CopyOptions {
    fn check_cancel(&self) -> Result<(), CopyError> {
        match &self.cancel {
            Some(c) if c.is_cancelled() => Err(CopyError::Cancelled),
            _ => Ok(()),
        }
    }
}

/// How much of a file is copied between two checks for cancellation.
const COPY_CHUNK: u64 = 32 << 20;

/// How much of a file is hashed between two checks for cancellation.
const HASH_CHECK: usize = 8 << 20;

/// What a COPY from the build context may take over from its previous run
/// (same destination and options, other content): files whose content hash
/// and metadata are unchanged are hard-linked from that immutable snapshot
/// instead of copied, so a rebuild after one changed file costs that file.
#[derive(Debug, Default)]
pub struct Reuse {
    /// Content hash of each selected source file, by host path.
    pub src_hashes: HashMap<PathBuf, [u8; 32]>,
    /// The previous run's layer directory and its index (destination path
    /// -> content hash).
    pub prev: Option<(PathBuf, HashMap<String, [u8; 32]>)>,
    /// This run's index, filled while copying.
    pub written: std::sync::Mutex<Vec<(String, [u8; 32])>>,
    /// Destinations that are one of several names of a file of this
    /// layer (never indexed).
    pub shared: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A destination path as a key of the copy index (JSON text): the path
/// when it is UTF-8, else `hex:` and its bytes in hex (never an absolute
/// path, so no two names share a key).
fn index_key(to: &[u8]) -> String {
    match std::str::from_utf8(to) {
        Ok(s) => s.to_string(),
        Err(_) => format!("hex:{}", hex::encode(to)),
    }
}

/// The file beside a COPY layer's directory that indexes its files.
pub const COPY_INDEX: &str = "kiln-copy-index.json";

impl Reuse {
    /// Reads the index written beside a previous layer directory `fs`.
    pub fn load_index(fs: &Path) -> Option<HashMap<String, [u8; 32]>> {
        let text = fs::read(fs.parent()?.join(COPY_INDEX)).ok()?;
        let rows: Vec<(String, String)> = serde_json::from_slice(&text).ok()?;
        let mut out = HashMap::with_capacity(rows.len());
        for (path, hex_hash) in rows {
            let mut h = [0u8; 32];
            hex::decode_to_slice(hex_hash, &mut h).ok()?;
            out.insert(path, h);
        }
        Some(out)
    }

    /// Writes this run's index beside the layer directory `fs`: only rows
    /// the final tree still holds as they were noted — a path written once
    /// in the run, not a name of a file with another name in this layer
    /// (a file linked from the previous run has one there; fine). (A later source of the same
    /// destination, or a hard link of another source's file over it, left
    /// a row naming the first source's content over another's bytes; a
    /// later build of the same shape then linked those bytes into its own
    /// layer under its own, honest key.)
    pub fn store_index(&self, fs: &Path) -> Result<(), CopyError> {
        let Some(dir) = fs.parent() else {
            return Ok(());
        };
        let written = self
            .written
            .lock()
            .map_err(|_| CopyError::Io("copy index".into(), io::Error::other("poisoned")))?;
        let mut times: HashMap<&str, usize> = HashMap::with_capacity(written.len());
        for (p, _) in written.iter() {
            *times.entry(p.as_str()).or_default() += 1;
        }
        let shared = self
            .shared
            .lock()
            .map_err(|_| CopyError::Io("copy index".into(), io::Error::other("poisoned")))?;
        let rows: Vec<(String, String)> = written
            .iter()
            .filter(|(p, _)| times.get(p.as_str()) == Some(&1) && !shared.contains(p))
            .map(|(p, h)| (p.clone(), hex::encode(h)))
            .collect();
        let bytes = serde_json::to_vec(&rows)
            .map_err(|e| CopyError::Io("copy index".into(), io::Error::other(e)))?;
        let path = dir.join(COPY_INDEX);
        fs::write(&path, bytes).map_err(|e| io_err(&path, e))
    }

    /// Notes that `to` is one of several names of a file of this layer.
    fn shared_name(&self, to: &[u8]) {
        if let Ok(mut s) = self.shared.lock() {
            s.insert(index_key(to));
        }
    }

    /// Notes `to` in this run's index (with its source's content hash).
    fn note(&self, to: &[u8], e: &Entry) {
        if let (Some(h), Ok(mut w)) = (self.src_hashes.get(&e.host), self.written.lock()) {
            w.push((index_key(to), *h));
        }
    }

    /// Hard-links `to` from the previous run when `e` is unchanged there,
    /// giving the linked file's `lstat`. `dirs` keeps the directories of
    /// both sides open, so the check and the link name the file relative
    /// to them. Fails (`None`) as well when `to` exists already.
    #[allow(clippy::too_many_arguments)]
    fn link_unchanged(
        &self,
        root: &kiln_fs::Root,
        to: &[u8],
        parent: &[u8],
        e: &Entry,
        want: (u32, u32, u32, i64, i64),
        name: &std::ffi::CStr,
        dirs: &mut DirFds,
    ) -> Option<libc::stat> {
        use std::os::fd::AsRawFd;
        let h = self.src_hashes.get(&e.host)?;
        let (prev_dir, index) = self.prev.as_ref()?;
        if index.get(&index_key(to)) != Some(h) {
            return None;
        }
        let pfd = dirs.prev_dir(prev_dir, parent)?;
        let pm = lstat_at(pfd, name).ok()?;
        let (uid, gid, mode, mtime, nsec) = want;
        let same = pm.st_mode & libc::S_IFMT == libc::S_IFREG
            && pm.st_size as u64 == e.meta.size()
            && pm.st_uid == uid
            && pm.st_gid == gid
            && pm.st_mode & 0o7777 == mode
            && pm.st_mtime == mtime
            && pm.st_mtime_nsec == nsec;
        if !same {
            return None;
        }
        let hdir = dirs.dir(root, parent).ok()?;
        // SAFETY: two open directory descriptors and NUL-terminated names;
        // flags 0 never follow a link.
        let linked =
            unsafe { libc::linkat(pfd, name.as_ptr(), hdir.as_raw_fd(), name.as_ptr(), 0) == 0 };
        linked.then_some(pm)
    }
}

/// The destination's and the previous layer's directories, one of each
/// open at a time: a COPY writes directory by directory, so per-file
/// calls name a file relative to its open directory instead of walking
/// its whole path each time.
#[derive(Default)]
pub(crate) struct DirFds {
    /// The top layer's directory (by its path in the view).
    host: Option<(Vec<u8>, kiln_fs::Dir)>,
    /// The previous run's layer, and a directory in it.
    prev_root: Option<kiln_fs::Root>,
    prev: Option<(Vec<u8>, kiln_fs::Dir)>,
    /// The top layer's directory again, as a descriptor a layer stream's
    /// hasher may keep (see [`DirFds::shared`]).
    shared: Option<(Vec<u8>, std::sync::Arc<fs::File>)>,
}

impl DirFds {
    /// The top layer's directory at the view path `dir` (resolved, with
    /// no symlink on the way: one is an error, never followed).
    fn dir(&mut self, root: &kiln_fs::Root, dir: &[u8]) -> Result<&kiln_fs::Dir, CopyError> {
        if self.host.as_ref().is_none_or(|(p, _)| p != dir) {
            let d = root
                .open_dir(crate::fsview::rel(dir), kiln_fs::Follow::Never)
                .map_err(|e| CopyError::View(e.into()))?;
            self.host = Some((dir.to_vec(), d));
        }
        match &self.host {
            Some((_, d)) => Ok(d),
            None => Err(CopyError::Io(show(dir), io::Error::other("no directory"))),
        }
    }

    /// The top layer's directory at `dir` as a shared descriptor of its
    /// own (one per directory, for a layer stream's hasher to open the
    /// files in it by name).
    fn shared(
        &mut self,
        root: &kiln_fs::Root,
        dir: &[u8],
    ) -> Result<std::sync::Arc<fs::File>, CopyError> {
        use std::os::fd::{AsRawFd, FromRawFd};
        if let Some((p, f)) = &self.shared {
            if p == dir {
                return Ok(f.clone());
            }
        }
        let fd = self.dir(root, dir)?.as_raw_fd();
        // SAFETY: an open descriptor; the duplicate is owned by the File.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(CopyError::Io(show(dir), io::Error::last_os_error()));
        }
        // SAFETY: a descriptor just made, owned by nothing else.
        let f = std::sync::Arc::new(unsafe { fs::File::from_raw_fd(dup) });
        self.shared = Some((dir.to_vec(), f.clone()));
        Ok(f)
    }

    /// Drops a held directory at or below `path`, which is about to go.
    fn forget_below(&mut self, path: &[u8]) {
        if self.host.as_ref().is_some_and(|(p, _)| {
            p == path || (p.starts_with(path) && p.get(path.len()) == Some(&b'/'))
        }) {
            self.host = None;
        }
        if self.shared.as_ref().is_some_and(|(p, _)| {
            p == path || (p.starts_with(path) && p.get(path.len()) == Some(&b'/'))
        }) {
            self.shared = None;
        }
    }

    /// The previous layer's directory at the view path `dir`, if there is
    /// one (symlinks on the way: none).
    fn prev_dir(&mut self, prev_layer: &Path, dir: &[u8]) -> Option<i32> {
        use std::os::fd::AsRawFd;
        if self.prev_root.is_none() {
            self.prev_root = kiln_fs::Root::open(prev_layer).ok();
        }
        let root = self.prev_root.as_ref()?;
        if self.prev.as_ref().is_none_or(|(p, _)| p != dir) {
            let d = root
                .open_dir(crate::fsview::rel(dir), kiln_fs::Follow::Never)
                .ok()?;
            self.prev = Some((dir.to_vec(), d));
        }
        self.prev.as_ref().map(|(_, d)| d.as_raw_fd())
    }
}

/// `lstat` of `name` in the open directory `dir`.
fn lstat_at(dir: i32, name: &std::ffi::CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a valid descriptor, a NUL-terminated name and room for the
    // result, which the call fills in full when it returns 0.
    if unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: filled by the successful call above.
    Ok(unsafe { st.assume_init() })
}

/// Works out where each selection goes (Docker's destination rules) and
/// copies it into the view's top layer. `dest` is absolute.
pub fn copy_selections(
    dst: &LayerView,
    dest: &str,
    dest_is_dir_hint: bool,
    selections: &[Selection],
    opts: &CopyOptions,
) -> Result<(), CopyError> {
    copy_inner(dst, dest, dest_is_dir_hint, selections, opts, None)
}

/// [`copy_selections`] into a fresh (empty) overlay upperdir, also
/// describing every entry it makes to `stream`, in the overlay differ's
/// order, with the bytes it writes (see [`kiln_cache::LayerStream`]).
/// What the stream cannot be given this way (several sources, a file
/// source, special files, a destination that exists in the top layer)
/// makes it give up; the copy is the same either way.
pub fn copy_selections_streamed(
    dst: &LayerView,
    dest: &str,
    dest_is_dir_hint: bool,
    selections: &[Selection],
    opts: &CopyOptions,
    stream: &mut kiln_cache::LayerStream,
) -> Result<(), CopyError> {
    copy_inner(dst, dest, dest_is_dir_hint, selections, opts, Some(stream))
}

fn copy_inner(
    dst: &LayerView,
    dest: &str,
    dest_is_dir_hint: bool,
    selections: &[Selection],
    opts: &CopyOptions,
    mut stream: Option<&mut kiln_cache::LayerStream>,
) -> Result<(), CopyError> {
    let one_dir = selections.len() == 1
        && selections
            .first()
            .is_some_and(|s| s.is_dir && s.entries.first().is_some_and(|e| e.rel.is_empty()));
    if !one_dir {
        if let Some(st) = stream.as_deref_mut() {
            st.give_up();
        }
    }
    let multiple = selections.len() > 1;
    let dest_clean = clean_bytes(dest.as_bytes());
    let dest_resolved = dst.resolve(&dest_clean, true)?;
    let existing_dir = dst.lookup(&dest_resolved).is_some_and(|f| f.meta.is_dir());
    let dest_is_dir = dest_is_dir_hint || existing_dir;
    if multiple && !dest_is_dir {
        return Err(CopyError::DestNotDir);
    }
    let new_owner = opts.owner.unwrap_or((0, 0));
    // Hard links among the copied files stay hard links (BuildKit's
    // copier tracks source inodes the same way).
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let root = dst.top_root()?;
    let mut dirs = DirFds::default();
    // Files are created here, in order, and filled by workers (content,
    // owner, mode, times: the other half of a small file's cost) when
    // there are many and no previous run to link from; each is streamed
    // once its worker is done, in order.
    let many = selections.iter().map(|s| s.entries.len()).sum::<usize>() >= 64;
    let no_links = opts.reuse.as_ref().is_none_or(|r| r.prev.is_none());
    let workers = if many && no_links {
        cores().saturating_sub(1).clamp(1, 3)
    } else {
        0
    };
    let (jobs, queue) =
        std::sync::mpsc::channel::<(FileJob<'_>, std::sync::mpsc::SyncSender<JobDone>)>();
    let queue = std::sync::Mutex::new(queue);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let queue = &queue;
            scope.spawn(move || loop {
                let next = match queue.lock() {
                    Ok(q) => q.recv(),
                    Err(_) => return,
                };
                let Ok((job, reply)) = next else { return };
                let _ = reply.send(job.run(opts));
            });
        }
        let mut pool = (workers > 0).then(|| Pool {
            jobs,
            pending: std::collections::VecDeque::new(),
        });
        let r = copy_selections_in(
            dst,
            selections,
            opts,
            stream,
            &root,
            &mut dirs,
            &mut links,
            (dest_is_dir, &dest_resolved, new_owner),
            &mut pool,
        );
        // The workers end once the queue is gone.
        drop(pool);
        r
    })
}

/// Workers filling created files (see [`copy_inner`]) and the files
/// handed to them, in order.
struct Pool<'e> {
    jobs: std::sync::mpsc::Sender<(FileJob<'e>, std::sync::mpsc::SyncSender<JobDone>)>,
    pending: std::collections::VecDeque<std::sync::mpsc::Receiver<JobDone>>,
}

impl<'e> Pool<'e> {
    /// Most files handed over and not yet streamed (each holds two
    /// descriptors).
    const MAX_PENDING: usize = 128;

    fn dispatch(
        &mut self,
        job: FileJob<'e>,
        stream: Option<&mut kiln_cache::LayerStream>,
    ) -> Result<(), CopyError> {
        if self.pending.len() >= Self::MAX_PENDING {
            self.drain_one(stream)?;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.jobs
            .send((job, tx))
            .map_err(|_| CopyError::Io("COPY".into(), io::Error::other("no worker thread")))?;
        self.pending.push_back(rx);
        Ok(())
    }

    /// Waits for the oldest file handed over and streams it.
    fn drain_one(&mut self, stream: Option<&mut kiln_cache::LayerStream>) -> Result<(), CopyError> {
        let Some(rx) = self.pending.pop_front() else {
            return Ok(());
        };
        let done = rx.recv().map_err(|_| {
            CopyError::Io("COPY".into(), io::Error::other("a worker thread stopped"))
        })?;
        stream_done(stream.filter(|st| st.is_live()), done)
    }

    /// Waits for every file handed over, streaming each in order.
    fn drain(&mut self, mut stream: Option<&mut kiln_cache::LayerStream>) -> Result<(), CopyError> {
        while !self.pending.is_empty() {
            self.drain_one(stream.as_deref_mut())?;
        }
        Ok(())
    }
}

/// The loop of [`copy_inner`]: each selection's entries written in order,
/// plain files handed to `pool` when there is one.
#[allow(clippy::too_many_arguments)]
fn copy_selections_in<'e>(
    dst: &LayerView,
    selections: &'e [Selection],
    opts: &CopyOptions,
    mut stream: Option<&mut kiln_cache::LayerStream>,
    root: &kiln_fs::Root,
    dirs: &mut DirFds,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
    (dest_is_dir, dest_resolved, new_owner): (bool, &[u8], (u32, u32)),
    pool: &mut Option<Pool<'e>>,
) -> Result<(), CopyError> {
    for s in selections {
        let target = if s.is_dir {
            dest_resolved.to_vec()
        } else if dest_is_dir {
            join_bytes(dest_resolved, &s.name)
        } else {
            dest_resolved.to_vec()
        };
        let parent = parent_bytes(&target);
        let parent = dst.resolve(&parent, true)?;
        dst.ensure_dir_in(root, &parent, new_owner)?;
        let target = join_bytes(&parent, base_bytes(&target));
        // The directory a directory's contents go into is never given the
        // source directory's owner or mode (BuildKit's copier, fsutil
        // `copy.Copy`: `prepareTargetDir` makes it with `MkdirAll`, and
        // the top-level copy leaves an existing one's metadata alone but
        // its mtime): one that exists keeps its owner and mode; a new one
        // is made like a missing parent, 0755 (an octal `--chmod`'s mode)
        // and owned by `--chown` or root. A non-directory in its way is
        // replaced below, as before. Nested directories that exist take
        // their source's metadata, as BuildKit's do.
        let mut skip_root = false;
        if s.is_dir {
            let here = dst.lookup(&target);
            let is_dir = here.as_ref().is_some_and(|f| f.meta.is_dir());
            let root_entry = s.entries.first().is_some_and(|e| e.rel.is_empty());
            if is_dir || here.is_none() || !root_entry {
                let d = dst.ensure_dir_in(root, &target, new_owner)?;
                if let (None, Some(crate::chmod::Chmod::Octal(m))) = (&here, &opts.chmod) {
                    d.chmod_self(*m).map_err(ViewError::from)?;
                }
                skip_root = root_entry;
            }
        }
        if let Some(st) = stream.as_deref_mut().filter(|st| st.is_live()) {
            let root_mtime = s.entries.first().map(|e| e.meta.mtime());
            match (skip_root, root_mtime) {
                (true, Some(t)) => stream_chain(st, root, &target, clamp(t, opts.clamp_mtime))?,
                _ => st.give_up(),
            }
        }
        for e in &s.entries[usize::from(skip_root)..] {
            let to = if e.rel.is_empty() {
                target.clone()
            } else {
                join_bytes(&target, &e.rel)
            };
            opts.check_cancel()?;
            if let Some(p) = pool.as_mut() {
                if to != b"/" && e.meta.file_type().is_file() && e.meta.nlink() == 1 {
                    let w = write_entry(
                        root,
                        &to,
                        e,
                        opts,
                        links,
                        dirs,
                        stream.as_deref_mut().filter(|st| st.is_live()),
                        true,
                    )?;
                    match w {
                        Written::Later(job) => {
                            p.dispatch(*job, stream.as_deref_mut())?;
                            continue;
                        }
                        Written::Done => continue,
                        Written::Taken => {}
                    }
                }
                // Anything else is written (and streamed) after the files
                // handed over before it.
                p.drain(stream.as_deref_mut())?;
            }
            write_entry(
                root,
                &to,
                e,
                opts,
                links,
                dirs,
                stream.as_deref_mut().filter(|st| st.is_live()),
                false,
            )?;
        }
        if let Some(p) = pool.as_mut() {
            p.drain(stream.as_deref_mut())?;
        }
        // Directory mtimes are set after their contents are written.
        if s.is_dir {
            for e in s.entries.iter().rev().filter(|e| e.meta.is_dir()) {
                let to = if e.rel.is_empty() {
                    target.clone()
                } else {
                    join_bytes(&target, &e.rel)
                };
                let t = (clamp(e.meta.mtime(), opts.clamp_mtime), 0);
                if to == b"/" {
                    root.dir().set_times_self(t).map_err(ViewError::from)?;
                } else {
                    let d = dirs.dir(root, &parent_bytes(&to))?;
                    d.set_times(OsStr::from_bytes(base_bytes(&to)), t)
                        .map_err(ViewError::from)?;
                }
            }
        }
    }
    Ok(())
}

/// Streams the directories from the layer root down to `target` (a
/// resolved view path whose directories all exist in the top layer): each
/// as it is now, but `target` with the mtime it gets once its contents
/// are written.
fn stream_chain(
    stream: &mut kiln_cache::LayerStream,
    root: &kiln_fs::Root,
    target: &[u8],
    target_mtime: i64,
) -> Result<(), CopyError> {
    let comps: Vec<&[u8]> = components(target).collect();
    let mut dir = root.dir().try_clone().map_err(ViewError::from)?;
    let mut rel: Vec<u8> = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(c);
        let name = OsStr::from_bytes(c);
        let Some(st) = dir
            .stat(name)
            .map_err(ViewError::from)?
            .filter(|st| st.is_dir())
        else {
            stream.give_up();
            return Ok(());
        };
        let mtime = if i + 1 == comps.len() {
            target_mtime
        } else {
            st.mtime().0
        };
        stream
            .dir(&rel, st.mode(), (st.uid(), st.gid()), mtime)
            .map_err(|e| CopyError::Io(show(&rel), e))?;
        dir = dir.open_dir(name).map_err(ViewError::from)?;
    }
    Ok(())
}

/// The path of a view path `to` in the layer (no leading `/`).
fn layer_path(to: &[u8]) -> &[u8] {
    to.strip_prefix(b"/").unwrap_or(to)
}

fn clamp(t: i64, c: Option<i64>) -> i64 {
    match c {
        Some(c) if t > c => c,
        _ => t,
    }
}

/// What [`write_entry`] did.
enum Written<'e> {
    /// The entry is written (and streamed).
    Done,
    /// A file was created; its content and metadata are left to a worker.
    Later(Box<FileJob<'e>>),
    /// Its name is taken: nothing was done (the caller writes it the
    /// general way).
    Taken,
}

/// A created file whose content, owner, mode and times a worker thread
/// gives it (see [`copy_inner`]), then streamed in order.
struct FileJob<'e> {
    e: &'e Entry,
    f: fs::File,
    to: Vec<u8>,
    ids: (u32, u32, u32),
    times: (i64, i64),
    made: fs::Metadata,
    /// Its directory and name, for the layer stream.
    shared: Option<(std::sync::Arc<fs::File>, std::ffi::CString)>,
}

/// What a worker reports of a [`FileJob`]: what stays for streaming it,
/// and the bytes written (`None`: cloned).
type JobDone = (JobMeta, Result<Option<u64>, CopyError>);

/// A [`FileJob`] without its file and source.
struct JobMeta {
    to: Vec<u8>,
    ids: (u32, u32, u32),
    t: i64,
    inode: (u64, u64),
    shared: Option<(std::sync::Arc<fs::File>, std::ffi::CString)>,
}

impl FileJob<'_> {
    /// Copies the content and sets the metadata.
    fn run(self, opts: &CopyOptions) -> JobDone {
        let meta = JobMeta {
            to: self.to,
            ids: self.ids,
            t: self.times.0,
            inode: (self.made.dev(), self.made.ino()),
            shared: self.shared,
        };
        let r = copy_file(
            self.e,
            self.f,
            &meta.to,
            self.ids,
            self.times,
            opts,
            Some(&self.made),
        );
        (meta, r)
    }
}

/// Streams a file a worker has written (in the entries' order).
fn stream_done(
    stream: Option<&mut kiln_cache::LayerStream>,
    (meta, r): JobDone,
) -> Result<(), CopyError> {
    use std::os::fd::AsRawFd;
    let written = r?;
    let (Some(st), Some((dir, name))) = (stream, &meta.shared) else {
        return Ok(());
    };
    let size = match written {
        Some(n) => n,
        None => match lstat_at(dir.as_raw_fd(), name) {
            Ok(l) if (l.st_dev, l.st_ino) == meta.inode => l.st_size.max(0) as u64,
            _ => {
                st.give_up();
                return Ok(());
            }
        },
    };
    let (uid, gid, mode) = meta.ids;
    st.file(
        layer_path(&meta.to),
        (dir, name),
        meta.inode,
        mode,
        (uid, gid),
        meta.t,
        size,
    )
    .map_err(|e| CopyError::Io(show(&meta.to), e))
}

/// Writes one entry at `to` (a path in the top layer whose parents were
/// resolved through the view and exist) through its open parent
/// directory: nothing here follows a symlink on the host.
#[allow(clippy::too_many_arguments)]
fn write_entry<'e>(
    root: &kiln_fs::Root,
    to: &[u8],
    e: &'e Entry,
    opts: &CopyOptions,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
    dirs: &mut DirFds,
    mut stream: Option<&mut kiln_cache::LayerStream>,
    later: bool,
) -> Result<Written<'e>, CopyError> {
    let m = &e.meta;
    let (uid, gid) = match opts.owner {
        Some(o) => o,
        None if opts.keep_owner => (m.uid(), m.gid()),
        None => (0, 0),
    };
    let ft = m.file_type();
    let mode = match &opts.chmod {
        Some(c) => c.apply(m.mode() & 0o7777, ft.is_dir()),
        None => m.mode() & 0o7777,
    };
    let fs_err = |err: kiln_fs::Error| CopyError::View(err.into());
    if to == b"/" {
        // The layer's root is never replaced, and keeps its owner and mode
        // (see `copy_selections`).
        return Ok(Written::Done);
    }
    let name_b = base_bytes(to);
    let name = OsStr::from_bytes(name_b);
    let Ok(cname) = std::ffi::CString::new(name_b) else {
        return Err(CopyError::Io(
            show(to),
            io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a name"),
        ));
    };
    // A regular file that is not another name of a file copied already.
    let first_name = ft.is_file() && !(m.nlink() > 1 && links.contains_key(&(m.dev(), m.ino())));
    let (t, ns) = (
        clamp(m.mtime(), opts.clamp_mtime),
        if opts.clamp_mtime.is_some_and(|c| m.mtime() >= c) {
            0
        } else {
            m.mtime_nsec()
        },
    );
    let parent = parent_bytes(to);
    if later {
        // The caller's promise: a regular file with one name and no
        // previous run to link it from. Created here, in order; its
        // content and metadata are for a worker (see `FileJob`).
        let dir = dirs.dir(root, &parent)?;
        return match dir.create_file_unset(name, kiln_fs::Create::Exclusive) {
            Ok(f) => {
                if let Some(r) = &opts.reuse {
                    r.note(to, e);
                }
                let made = f.metadata().map_err(|err| CopyError::Io(show(to), err))?;
                let shared = if stream.is_some() {
                    Some((dirs.shared(root, &parent)?, cname))
                } else {
                    None
                };
                Ok(Written::Later(Box::new(FileJob {
                    e,
                    f,
                    to: to.to_vec(),
                    ids: (uid, gid, mode),
                    times: (t, ns),
                    made,
                    shared,
                })))
            }
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => Ok(Written::Taken),
            Err(err) => Err(fs_err(err)),
        };
    }
    let mut link_tried = false;
    if let (true, Some(r)) = (first_name, &opts.reuse) {
        r.note(to, e);
        // The common case of a COPY run again after a small change: an
        // unchanged file, linked from the previous run into a destination
        // that does not exist yet (if it does, the link fails and the
        // general way below replaces it).
        if let Some(pm) =
            r.link_unchanged(root, to, &parent, e, (uid, gid, mode, t, ns), &cname, dirs)
        {
            if m.nlink() > 1 {
                links.insert((m.dev(), m.ino()), to.to_vec());
            }
            if let Some(st) = stream {
                stream_linked(
                    st,
                    to,
                    &pm,
                    (uid, gid, mode, t),
                    &cname,
                    root,
                    &parent,
                    dirs,
                )?;
            }
            return Ok(Written::Done);
        }
        // Only a previous run can have had the name linked (and taken).
        link_tried = r.prev.is_some();
    }
    // Most destinations do not exist yet: a regular file (not a second
    // name of one copied already) is created at once, exclusively, and
    // only a name that is taken is looked at below.
    if ft.is_file() && !link_tried && !(m.nlink() > 1 && links.contains_key(&(m.dev(), m.ino()))) {
        match dirs
            .dir(root, &parent)?
            .create_file_unset(name, kiln_fs::Create::Exclusive)
        {
            Ok(f) => {
                if m.nlink() > 1 {
                    links.insert((m.dev(), m.ino()), to.to_vec());
                }
                let at = (root, parent.as_slice(), cname.as_c_str());
                fill_new_file(e, f, to, (uid, gid, mode), (t, ns), opts, stream, at, dirs)?;
                return Ok(Written::Done);
            }
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
            Err(err) => return Err(fs_err(err)),
        }
    }
    // Otherwise one fstatat in the open parent says what is there.
    let old = dirs.dir(root, &parent)?.stat(name).map_err(fs_err)?;
    let absent = old.is_none();
    if let (Some(st), Some(_)) = (stream.as_deref_mut(), &old) {
        // The upperdir was empty: nothing there is replaced.
        st.give_up();
        stream = None;
    }
    let io = |err: io::Error| CopyError::Io(show(to), err);
    if let Some(old) = old {
        if old.is_dir() && ft.is_dir() {
            // merge into the existing directory
        } else {
            if old.is_dir() {
                // An open descriptor may name a directory about to go.
                dirs.forget_below(to);
            }
            dirs.dir(root, &parent)?.remove_all(name).map_err(fs_err)?;
        }
    }
    let dir = dirs.dir(root, &parent)?;
    if ft.is_dir() {
        dir.mkdir(name, 0o700).map_err(fs_err)?;
        dir.chown(name, uid, gid).map_err(fs_err)?;
        dir.chmod(name, mode).map_err(fs_err)?;
        if let Some(st) = stream {
            // Its mtime is set once its contents are written.
            st.dir(layer_path(to), mode, (uid, gid), t).map_err(io)?;
        }
    } else if ft.is_symlink() {
        let target = match &e.link {
            Some(l) => l.clone(),
            None => fs::read_link(&e.host)
                .map(|t| t.into_os_string().into_vec())
                .unwrap_or_default(),
        };
        dir.symlink(name, OsStr::from_bytes(&target))
            .map_err(fs_err)?;
        dir.chown(name, uid, gid).map_err(fs_err)?;
        dir.set_times(name, (clamp(m.mtime(), opts.clamp_mtime), 0))
            .map_err(fs_err)?;
        if let Some(st) = stream {
            st.symlink(
                layer_path(to),
                &target,
                (uid, gid),
                clamp(m.mtime(), opts.clamp_mtime),
            )
            .map_err(io)?;
        }
    } else if ft.is_file() && m.nlink() > 1 && links.contains_key(&(m.dev(), m.ino())) {
        if let Some(first) = links.get(&(m.dev(), m.ino())) {
            let from = root
                .open_dir(
                    crate::fsview::rel(&parent_bytes(first)),
                    kiln_fs::Follow::Never,
                )
                .map_err(fs_err)?;
            // Two names of one file in this layer: neither is indexed
            // (the first's row would name its source over the other's).
            if let Some(r) = &opts.reuse {
                r.shared_name(first);
                r.shared_name(to);
            }
            dir.hard_link(name, &from, OsStr::from_bytes(base_bytes(first)))
                .map_err(fs_err)?;
            if let Some(st) = stream {
                // A second name of an inode streamed already: a hard link
                // entry, the inode's own metadata (as the differ sees it).
                let here = dir.stat(name).map_err(fs_err)?;
                let shared = dirs.shared(root, &parent)?;
                match here {
                    Some(h) if h.is_file() => st
                        .file(
                            layer_path(to),
                            (&shared, &cname),
                            (h.dev(), h.ino()),
                            h.mode(),
                            (h.uid(), h.gid()),
                            h.mtime().0,
                            h.size(),
                        )
                        .map_err(io)?,
                    _ => st.give_up(),
                }
            }
        }
    } else if ft.is_file() {
        if m.nlink() > 1 {
            links.insert((m.dev(), m.ino()), to.to_vec());
        }
        // The link above found the destination taken; it is gone now.
        if let (true, false, Some(r)) = (link_tried, absent, &opts.reuse) {
            if r.link_unchanged(root, to, &parent, e, (uid, gid, mode, t, ns), &cname, dirs)
                .is_some()
            {
                // Not reached with a stream: the upperdir was empty.
                return Ok(Written::Done);
            }
        }
        let dir = dirs.dir(root, &parent)?;
        let f = dir
            .create_file_unset(name, kiln_fs::Create::Exclusive)
            .map_err(fs_err)?;
        let at = (root, parent.as_slice(), cname.as_c_str());
        fill_new_file(e, f, to, (uid, gid, mode), (t, ns), opts, stream, at, dirs)?;
    } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
        if let Some(st) = stream {
            st.give_up();
        }
        dir.mknod(name, m.mode(), m.rdev()).map_err(fs_err)?;
        dir.chown(name, uid, gid).map_err(fs_err)?;
    }
    Ok(Written::Done)
}

/// Fills the file `f` just created at `to` (named `name` in `parent`
/// under `root`) from `e` — and streams it, when there is a stream.
#[allow(clippy::too_many_arguments)]
fn fill_new_file(
    e: &Entry,
    f: fs::File,
    to: &[u8],
    ids: (u32, u32, u32),
    times: (i64, i64),
    opts: &CopyOptions,
    stream: Option<&mut kiln_cache::LayerStream>,
    (root, parent, name): (&kiln_fs::Root, &[u8], &std::ffi::CStr),
    dirs: &mut DirFds,
) -> Result<(), CopyError> {
    match stream {
        Some(st) => {
            let shared = dirs.shared(root, parent)?;
            copy_file_streamed(e, f, to, ids, times, opts, st, &shared, name)
        }
        None => copy_file(e, f, to, ids, times, opts, None).map(|_| ()),
    }
}

/// Streams a file hard-linked from the previous run (`pm`, its `lstat`
/// before the link: the same inode); the hasher reads it by its new name.
#[allow(clippy::too_many_arguments)]
fn stream_linked(
    stream: &mut kiln_cache::LayerStream,
    to: &[u8],
    pm: &libc::stat,
    (uid, gid, mode, t): (u32, u32, u32, i64),
    name: &std::ffi::CStr,
    root: &kiln_fs::Root,
    parent: &[u8],
    dirs: &mut DirFds,
) -> Result<(), CopyError> {
    let shared = dirs.shared(root, parent)?;
    stream
        .file(
            layer_path(to),
            (&shared, name),
            (pm.st_dev, pm.st_ino),
            mode,
            (uid, gid),
            t,
            pm.st_size.max(0) as u64,
        )
        .map_err(|e| CopyError::Io(show(to), e))
}

/// [`copy_file`] for a streamed layer: the file is copied as ever (in
/// the kernel, or cloned), then handed to `stream` by its name in the
/// shared directory descriptor `dir`: the hasher reads what the snapshot
/// holds (from the page cache, on its own thread).
#[allow(clippy::too_many_arguments)]
fn copy_file_streamed(
    from: &Entry,
    dst: fs::File,
    to: &[u8],
    (uid, gid, mode): (u32, u32, u32),
    (t, ns): (i64, i64),
    opts: &CopyOptions,
    stream: &mut kiln_cache::LayerStream,
    dir: &std::sync::Arc<fs::File>,
    name: &std::ffi::CStr,
) -> Result<(), CopyError> {
    use std::os::fd::AsRawFd;
    let err = |e: io::Error| CopyError::Io(show(to), e);
    let m = dst.metadata().map_err(err)?;
    let inode = (m.dev(), m.ino());
    // The size as written: the hasher reads that many bytes back, and
    // the final check finds the same size in the snapshot.
    let size = match copy_file(from, dst, to, (uid, gid, mode), (t, ns), opts, Some(&m))? {
        Some(n) => n,
        None => match lstat_at(dir.as_raw_fd(), name) {
            Ok(st) if (st.st_dev, st.st_ino) == inode => st.st_size.max(0) as u64,
            _ => {
                stream.give_up();
                return Ok(());
            }
        },
    };
    stream
        .file(
            layer_path(to),
            (dir, name),
            inode,
            mode,
            (uid, gid),
            t,
            size,
        )
        .map_err(err)
}

/// Copies file content into the new file `dst` (with a reflink when the
/// file system allows it), then gives it its owner, mode and times, all
/// through its descriptor. Returns the bytes written, or `None` when the
/// content was cloned.
fn copy_file(
    from: &Entry,
    mut dst: fs::File,
    to: &[u8],
    (uid, gid, mode): (u32, u32, u32),
    (t, ns): (i64, i64),
    opts: &CopyOptions,
    made: Option<&fs::Metadata>,
) -> Result<Option<u64>, CopyError> {
    let err = |e: io::Error| CopyError::Io(show(to), e);
    opts.check_cancel()?;
    let mut src = crate::fsview::open_found(&from.host, (from.meta.dev(), from.meta.ino()))
        .map_err(|e| io_err(&from.host, e))?;
    let mut written = None;
    let made = match made {
        Some(m) => m.clone(),
        None => dst.metadata().map_err(err)?,
    };
    if !reflink(&src, &dst, from.meta.dev(), made.dev()) {
        let mut n = 0;
        // In chunks (each copied in the kernel where it can be), so that
        // a cancelled build stops within one chunk of a large file; until
        // the source ends, whatever size it had when it was walked.
        loop {
            opts.check_cancel()?;
            let step = match kernel_copy(&src, &dst, COPY_CHUNK) {
                // Some file systems say "end" at once for files that have
                // content (procfs, sysfs, some FUSE): then read them.
                Some(Ok(0)) if n == 0 && from.meta.len() > 0 => {
                    io::copy(&mut (&mut src).take(COPY_CHUNK), &mut dst).map_err(err)?
                }
                Some(r) => r.map_err(err)?,
                // Not here (another file system, an old kernel): through
                // a buffer from where the kernel stopped.
                None => io::copy(&mut (&mut src).take(COPY_CHUNK), &mut dst).map_err(err)?,
            };
            if step == 0 {
                break;
            }
            n += step;
        }
        dst.flush().map_err(err)?;
        written = Some(n);
    }
    // The step's key holds the content hashed when the file was walked: a
    // file changed since (a context a hostile job rewrites in place after
    // the hash) would put other bytes in the layer under that key. Its
    // inode's change time moved then (fine-grained once it was stat'ed,
    // on kernels with multigrain timestamps).
    let now = src.metadata().map_err(|e| io_err(&from.host, e))?;
    let was = &from.meta;
    if (
        now.len(),
        now.mtime(),
        now.mtime_nsec(),
        now.ctime(),
        now.ctime_nsec(),
    ) != (
        was.len(),
        was.mtime(),
        was.mtime_nsec(),
        was.ctime(),
        was.ctime_nsec(),
    ) {
        return Err(io_err(
            &from.host,
            io::Error::other("the file changed while the build read it: not copied"),
        ));
    }
    // A new file is its creator's already (not in a set-group-ID
    // directory): no chown, which would only say so again.
    let owner = (made.uid() == uid && made.gid() == gid).then_some((uid, gid));
    set_file_meta(&dst, to, (uid, gid, mode), (t, ns), owner)?;
    Ok(written)
}

/// `src`'s content into the new, empty `dst`: cloned where the file
/// systems allow (tried once per pair of devices), else copied in the
/// kernel, else through a buffer from where the kernel stopped.
pub(crate) fn copy_content(src: &fs::File, dst: &fs::File) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if reflink(src, dst, src.metadata()?.dev(), dst.metadata()?.dev()) {
        return Ok(());
    }
    loop {
        match kernel_copy(src, dst, COPY_CHUNK) {
            Some(Ok(0)) => return Ok(()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => {
                io::copy(&mut &*src, &mut &*dst)?;
                return Ok(());
            }
        }
    }
}

/// Source devices whose files cannot be cloned into the destination's
/// file system (each pair is tried once per process, not once per file).
static NO_REFLINK: std::sync::Mutex<Vec<(u64, u64)>> = std::sync::Mutex::new(Vec::new());

/// Clones `src` (on device `src_dev`) into the empty `dst` (on
/// `dst_dev`): whether it was.
fn reflink(src: &fs::File, dst: &fs::File, src_dev: u64, dst_dev: u64) -> bool {
    use std::os::fd::AsRawFd;
    let pair = (src_dev, dst_dev);
    let known = |v: &Vec<(u64, u64)>| v.contains(&pair);
    if NO_REFLINK.lock().map(|v| known(&v)).unwrap_or(false) {
        return false;
    }
    // SAFETY: two open descriptors; FICLONE fails harmlessly when
    // unsupported.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return true;
    }
    let e = io::Error::last_os_error().raw_os_error();
    if matches!(
        e,
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    ) {
        if let Ok(mut v) = NO_REFLINK.lock() {
            if !known(&v) {
                v.push(pair);
            }
        }
    }
    false
}

/// One `copy_file_range(2)` of up to `max` bytes from `src`'s offset to
/// `dst`'s: the bytes copied (0 at the end of `src`), or `None` when the
/// kernel cannot copy between these two files (nothing was copied).
fn kernel_copy(src: &fs::File, dst: &fs::File, max: u64) -> Option<io::Result<u64>> {
    use std::os::fd::AsRawFd;
    let len = usize::try_from(max).unwrap_or(usize::MAX);
    loop {
        // SAFETY: two open descriptors; null offsets use and advance the
        // files' own.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                std::ptr::null_mut(),
                dst.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                0,
            )
        };
        if n >= 0 {
            return Some(Ok(n as u64));
        }
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM) => {
                None
            }
            _ => Some(Err(e)),
        };
    }
}

/// Gives a file written through `dst` its owner, mode and times (no
/// chown when it has the owner `owned` already).
fn set_file_meta(
    dst: &fs::File,
    to: &[u8],
    (uid, gid, mode): (u32, u32, u32),
    (t, ns): (i64, i64),
    owned: Option<(u32, u32)>,
) -> Result<(), CopyError> {
    use std::os::fd::AsRawFd;
    let err = |e: io::Error| CopyError::Io(show(to), e);
    // Owner first: chown clears set-id bits.
    // SAFETY: an open descriptor.
    if owned != Some((uid, gid)) && unsafe { libc::fchown(dst.as_raw_fd(), uid, gid) } != 0 {
        return Err(err(kiln_fs::chown_errno(uid, gid)));
    }
    // SAFETY: an open descriptor.
    if unsafe { libc::fchmod(dst.as_raw_fd(), mode) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    let ts = libc::timespec {
        tv_sec: t as _,
        tv_nsec: ns as libc::c_long,
    };
    let times = [ts, ts];
    // SAFETY: an open descriptor and two timespecs.
    if unsafe { libc::futimens(dst.as_raw_fd(), times.as_ptr()) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// COPY wildcards are Go's `filepath.Match` (kiln_parser::glob): a
    /// source pattern built to be slow selects in linear time (the old
    /// backtracking matcher never finished on it), and `[!…]` is a class
    /// holding `!`, not a negation.
    #[test]
    fn hostile_copy_wildcard_selects_fast_and_classes_are_go_s() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("a".repeat(200)), "x").unwrap();
        fs::write(t.path().join("ab"), "x").unwrap();
        fs::write(t.path().join("!x"), "x").unwrap();
        fs::write(t.path().join("bx"), "x").unwrap();
        let view = LayerView::new(vec![t.path().to_path_buf()], true);
        let sel = Selector {
            view: &view,
            ignore: None,
            exclude: None,
        };
        let start = std::time::Instant::now();
        let hostile = format!("/{}b", "*a".repeat(20));
        assert!(matches!(sel.select(&hostile), Err(CopyError::NotFound(_))));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        let names = |p: &str| -> Vec<Vec<u8>> {
            sel.select(p).unwrap().into_iter().map(|s| s.name).collect()
        };
        assert_eq!(names("/*b"), [b"ab".to_vec()]);
        assert_eq!(names("/[!a]x"), [b"!x".to_vec()]);
        assert_eq!(names("/[^a]x"), [b"!x".to_vec(), b"bx".to_vec()]);
    }

    /// The threaded walk gives exactly the one-thread walk's entries, in
    /// its order, for single- and multi-layer views, with excluded
    /// directories that an exception reaches into, symlinks and empty
    /// directories.
    #[test]
    fn threaded_walk_equals_the_sequential_one() {
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        for a in 0..6 {
            for b in 0..5 {
                let d = ctx.join(format!("src/d{a}/e{b}"));
                fs::create_dir_all(d.join("deep/er")).unwrap();
                fs::write(d.join("f.txt"), format!("{a}{b}")).unwrap();
                fs::write(d.join("x.log"), "log").unwrap();
                fs::write(d.join("deep/er/g"), "g").unwrap();
                std::os::unix::fs::symlink("f.txt", d.join("link")).unwrap();
            }
            fs::create_dir_all(ctx.join(format!("src/empty{a}"))).unwrap();
            fs::write(ctx.join(format!("src/top{a}")), "t").unwrap();
        }
        fs::create_dir_all(ctx.join("src/skipped/keep")).unwrap();
        fs::write(ctx.join("src/skipped/keep/k"), "k").unwrap();
        fs::write(ctx.join("src/skipped/gone"), "g").unwrap();
        let lower = t.path().join("lower");
        fs::create_dir_all(lower.join("src/d0/from-lower")).unwrap();
        fs::write(lower.join("src/d0/from-lower/l"), "l").unwrap();
        let ignore =
            PatternMatcher::new(&["**/*.log", "src/skipped", "!src/skipped/keep"]).unwrap();
        for layers in [vec![ctx.clone()], vec![ctx.clone(), lower.clone()]] {
            let view = LayerView::new(layers, false);
            let sel = Selector {
                view: &view,
                ignore: Some(&ignore),
                exclude: None,
            };
            let root = || Job {
                dir: b"/src".to_vec(),
                host: ctx.join("src"),
                logical: b"/src".to_vec(),
                rel: Vec::new(),
                hidden: None,
            };
            let mut one = Vec::new();
            sel.walk(&root(), &mut one).unwrap();
            let mut all = Vec::new();
            sel.walk_all(root(), &mut all).unwrap();
            let listed = |v: &[Entry]| -> Vec<(Vec<u8>, PathBuf, Option<Vec<u8>>)> {
                v.iter()
                    .map(|e| (e.rel.clone(), e.host.clone(), e.link.clone()))
                    .collect()
            };
            assert!(one.len() >= 200, "{}", one.len());
            assert_eq!(listed(&all), listed(&one));
            let rels: Vec<&str> = one
                .iter()
                .map(|e| std::str::from_utf8(&e.rel).unwrap())
                .collect();
            assert!(rels.contains(&"skipped/keep/k"), "{rels:?}");
            assert!(!rels.contains(&"skipped/gone"));
            assert!(!rels.iter().any(|r| r.ends_with(".log")));
            assert!(rels.windows(2).all(|w| w[0] != w[1]));
        }
    }

    #[test]
    fn select_copy_dir_contents_and_file_rules() {
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        fs::create_dir_all(ctx.join("src/sub")).unwrap();
        fs::write(ctx.join("src/a.txt"), "a").unwrap();
        fs::write(ctx.join("src/sub/b.txt"), "b").unwrap();
        fs::write(ctx.join("top.txt"), "t").unwrap();
        fs::write(ctx.join("skip.log"), "s").unwrap();
        let view = LayerView::new(vec![ctx.clone()], true);
        let ignore = PatternMatcher::new(&["*.log"]).unwrap();
        let sel = Selector {
            view: &view,
            ignore: Some(&ignore),
            exclude: None,
        };
        let src = sel.select("src").unwrap();
        assert_eq!(src.len(), 1);
        let rels: Vec<&str> = src[0]
            .entries
            .iter()
            .map(|e| std::str::from_utf8(&e.rel).unwrap())
            .collect();
        assert_eq!(rels, vec!["", "a.txt", "sub", "sub/b.txt"]);
        assert!(matches!(
            sel.select("skip.log"),
            Err(CopyError::NotFound(_))
        ));
        assert!(matches!(
            sel.select("../etc/passwd"),
            Err(CopyError::View(ViewError::Escape(_)))
        ));
        let globbed = sel.select("*.txt").unwrap();
        assert_eq!(globbed.len(), 1);

        let upper = t.path().join("upper");
        fs::create_dir_all(&upper).unwrap();
        let dst = LayerView::new(vec![upper.clone()], false);
        let opts = CopyOptions::default();
        copy_selections(&dst, "/app", false, &src, &opts).unwrap();
        copy_selections(&dst, "/app/renamed.txt", false, &globbed, &opts).unwrap();
        copy_selections(&dst, "/dir/", true, &globbed, &opts).unwrap();
        assert_eq!(
            fs::read_to_string(upper.join("app/sub/b.txt")).unwrap(),
            "b"
        );
        assert_eq!(
            fs::read_to_string(upper.join("app/renamed.txt")).unwrap(),
            "t"
        );
        assert_eq!(fs::read_to_string(upper.join("dir/top.txt")).unwrap(), "t");
        let two = [src[0].clone(), globbed[0].clone()];
        assert!(matches!(
            copy_selections(&dst, "/nodir", false, &two, &opts),
            Err(CopyError::DestNotDir)
        ));
    }

    /// A cancelled build stops a COPY between entries: nothing more is
    /// written once the token is cancelled.
    #[test]
    fn a_cancelled_copy_stops_between_entries() {
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        fs::create_dir_all(ctx.join("d")).unwrap();
        for i in 0..200 {
            fs::write(ctx.join(format!("d/f{i}")), "x").unwrap();
        }
        let view = LayerView::new(vec![ctx.clone()], true);
        let sel = Selector {
            view: &view,
            ignore: None,
            exclude: None,
        };
        let src = sel.select("d").unwrap();
        let upper = t.path().join("upper");
        fs::create_dir_all(&upper).unwrap();
        let dst = LayerView::new(vec![upper.clone()], false);
        let cancel = kiln_executor::CancellationToken::new();
        cancel.cancel();
        let opts = CopyOptions {
            cancel: Some(cancel),
            ..CopyOptions::default()
        };
        assert!(matches!(
            copy_selections(&dst, "/app", false, &src, &opts),
            Err(CopyError::Cancelled)
        ));
        let written = fs::read_dir(upper.join("app"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(written, 0);
        // Not cancelled: everything is copied.
        copy_selections(&dst, "/app", false, &src, &CopyOptions::default()).unwrap();
        assert_eq!(fs::read_dir(upper.join("app")).unwrap().count(), 200);
    }

    /// A file's copy checks for cancellation before it starts and before
    /// each chunk of its content.
    #[test]
    fn a_cancelled_copy_stops_inside_a_file() {
        let t = tempfile::tempdir().unwrap();
        let from = t.path().join("big");
        fs::write(&from, vec![7u8; 1 << 20]).unwrap();
        let to = t.path().join("copy");
        let f = fs::File::create(&to).unwrap();
        let cancel = kiln_executor::CancellationToken::new();
        cancel.cancel();
        let opts = CopyOptions {
            cancel: Some(cancel),
            ..CopyOptions::default()
        };
        let from = Entry {
            rel: Vec::new(),
            meta: fs::symlink_metadata(&from).unwrap(),
            host: from,
            link: None,
        };
        assert!(matches!(
            copy_file(&from, f, b"/copy", (0, 0, 0o644), (0, 0), &opts, None),
            Err(CopyError::Cancelled)
        ));
        assert_eq!(fs::metadata(&to).unwrap().len(), 0);
    }

    #[test]
    fn key_ignores_mtime_but_not_content() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("f"), "one").unwrap();
        let view = LayerView::new(vec![t.path().to_path_buf()], true);
        let sel = Selector {
            view: &view,
            ignore: None,
            exclude: None,
        };
        let key = || {
            let s = sel.select("f").unwrap();
            let mut k = KeyHasher::new("copy");
            hash_selection(&mut k, &s, &NoHashCache, false, None).unwrap();
            k.finish()
        };
        let k1 = key();
        crate::fsview::set_mtime(&t.path().join("f"), 12345, 0, false).unwrap();
        assert_eq!(key(), k1);
        fs::write(t.path().join("f"), "two").unwrap();
        assert_ne!(key(), k1);
    }

    /// Names that are not UTF-8 are listed, walked (one layer or several),
    /// matched by `.dockerignore` and wildcards through their lossy form
    /// yet kept as bytes, hashed into the key as bytes, and written under
    /// their own bytes.
    #[test]
    fn names_that_are_not_utf8_are_walked_matched_hashed_and_written() {
        let p = |b: &[u8]| PathBuf::from(OsStr::from_bytes(b));
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        fs::create_dir_all(ctx.join(p(b"r\xe9p"))).unwrap();
        fs::write(ctx.join(p(b"r\xe9p/caf\xe9")), "in").unwrap();
        fs::write(ctx.join(p(b"caf\xe9")), "top").unwrap();
        fs::write(ctx.join(p(b"caf\xe8")), "other").unwrap();
        fs::write(ctx.join(p(b"skip\xe9")), "ignored").unwrap();
        std::os::unix::fs::symlink(OsStr::from_bytes(b"caf\xe9"), ctx.join("link")).unwrap();
        let lower = t.path().join("lower");
        fs::create_dir_all(lower.join(p(b"r\xe9p"))).unwrap();
        fs::write(lower.join(p(b"r\xe9p/low\xff")), "low").unwrap();

        let ignore = PatternMatcher::new(&["skip*"]).unwrap();
        for layers in [vec![ctx.clone()], vec![ctx.clone(), lower.clone()]] {
            let view = LayerView::new(layers.clone(), layers.len() == 1);
            let names = view.read_dir("/").unwrap();
            assert!(names.contains(&b"caf\xe9".to_vec()), "{names:?}");
            let sel = Selector {
                view: &view,
                ignore: Some(&ignore),
                exclude: None,
            };
            let all = sel.select(".").unwrap();
            let rels: Vec<&[u8]> = all[0].entries.iter().map(|e| e.rel.as_slice()).collect();
            let mut want: Vec<&[u8]> = vec![
                b"",
                b"caf\xe8",
                b"caf\xe9",
                b"link",
                b"r\xe9p",
                b"r\xe9p/caf\xe9",
            ];
            if layers.len() > 1 {
                want.push(b"r\xe9p/low\xff");
            }
            assert_eq!(rels, want);
            let link = all[0].entries.iter().find(|e| e.rel == b"link").unwrap();
            assert_eq!(link.link.as_deref(), Some(&b"caf\xe9"[..]));
            // A wildcard matches the lossy form, the selection keeps bytes.
            let globbed = sel.select("caf?").unwrap();
            let got: Vec<&[u8]> = globbed.iter().map(|s| s.name.as_slice()).collect();
            assert_eq!(got, vec![&b"caf\xe8"[..], &b"caf\xe9"[..]]);
            assert!(matches!(sel.select("skip*"), Err(CopyError::NotFound(_))));
        }

        // Names are bytes in the key: two names that read the same lossily
        // give two keys, and so does one such file's content.
        let view = LayerView::new(vec![ctx.clone()], true);
        let sel = Selector {
            view: &view,
            ignore: Some(&ignore),
            exclude: None,
        };
        let key = |pat: &str| {
            let s = sel.select(pat).unwrap();
            let mut k = KeyHasher::new("copy");
            hash_selection(&mut k, &s, &NoHashCache, false, None).unwrap();
            k.finish()
        };
        let k1 = key(".");
        fs::rename(ctx.join(p(b"caf\xe8")), ctx.join(p(b"caf\xe7"))).unwrap();
        let k2 = key(".");
        assert_ne!(k2, k1, "a name's bytes are in the key");
        fs::write(ctx.join(p(b"r\xe9p/caf\xe9")), "changed").unwrap();
        assert_ne!(key("."), k2, "such a file's content is in the key");
        fs::write(ctx.join(p(b"skip\xe9")), "changed").unwrap();
        let k3 = key(".");
        fs::write(ctx.join(p(b"skip\xe9")), "changed again").unwrap();
        assert_eq!(key("."), k3, "an ignored file is not");

        // The copy writes the names' bytes.
        let upper = t.path().join("upper");
        fs::create_dir_all(&upper).unwrap();
        let dst = LayerView::new(vec![upper.clone()], false);
        let all = sel.select(".").unwrap();
        copy_selections(&dst, "/app/", true, &all, &CopyOptions::default()).unwrap();
        let one = sel.select("caf\u{e9}").err();
        assert!(one.is_some(), "UTF-8 é is another name than Latin-1 é");
        assert_eq!(
            fs::read_to_string(upper.join("app").join(p(b"r\xe9p/caf\xe9"))).unwrap(),
            "changed"
        );
        assert_eq!(
            fs::read_link(upper.join("app/link")).unwrap(),
            p(b"caf\xe9")
        );
        assert!(!upper.join("app").join(p(b"skip\xe9")).exists());
        let top = sel.select("caf?").unwrap();
        copy_selections(&dst, "/one/", true, &top, &CopyOptions::default()).unwrap();
        assert_eq!(
            fs::read_to_string(upper.join("one").join(p(b"caf\xe9"))).unwrap(),
            "top"
        );
    }

    /// Copies `src` (selected from `ctx`) to `dest` in a fresh upperdir on
    /// `lower` with a layer stream; `between` runs after the selection and
    /// before the copy, `after` after the copy and before the stream's
    /// check. Gives the streamed layer and the differ's digest and size of
    /// the same upperdir.
    fn stream_vs_differ(
        ctx: &Path,
        src: &str,
        lower: Option<&Path>,
        dest: &str,
        clamp: Option<i64>,
        between: impl FnOnce(&Path),
        after: impl FnOnce(&Path),
    ) -> (Option<kiln_cache::StreamedDiff>, (kiln_image::Digest, u64)) {
        let view = LayerView::new(vec![ctx.to_path_buf()], true);
        let sel = Selector {
            view: &view,
            ignore: None,
            exclude: None,
        };
        let picked = sel.select(src).unwrap();
        let t = tempfile::tempdir_in(ctx.parent().unwrap()).unwrap();
        let upper = t.path().join("upper");
        fs::create_dir_all(&upper).unwrap();
        between(&upper);
        let mut layers = vec![upper.clone()];
        layers.extend(lower.map(Path::to_path_buf));
        let dst = LayerView::new(layers, false);
        let opts = CopyOptions {
            clamp_mtime: clamp,
            ..CopyOptions::default()
        };
        let mut stream = kiln_cache::LayerStream::start(clamp);
        copy_selections_streamed(&dst, dest, true, &picked, &opts, &mut stream).unwrap();
        after(&upper);
        let dopts = kiln_image::diff::DiffOptions {
            clamp_mtime: clamp,
            ..Default::default()
        };
        let streamed = stream.finish(&upper, &dopts).unwrap().map(|(s, _)| s);
        let (d, n, _) = kiln_cache::DiffSource::Overlay {
            upper: upper.clone(),
        }
        .digest(&dopts)
        .unwrap();
        (streamed, (d, n))
    }

    /// Many files are filled by worker threads; names already taken in
    /// the destination (a file, a directory, a symlink) are replaced the
    /// general way, in order, and every file ends with its source's
    /// content, mode and mtime.
    #[test]
    fn files_filled_by_workers_replace_taken_names_and_keep_their_metadata() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        fs::create_dir_all(ctx.join("d")).unwrap();
        for i in 0..300 {
            let f = ctx.join(format!("d/f{i:03}"));
            fs::write(&f, format!("file {i}\n").repeat(i % 7 + 1)).unwrap();
            fs::set_permissions(
                &f,
                fs::Permissions::from_mode(0o600 + (i as u32 % 2) * 0o155),
            )
            .unwrap();
        }
        let upper = t.path().join("upper");
        fs::create_dir_all(upper.join("app/d/f010")).unwrap();
        fs::write(upper.join("app/d/f020"), "old").unwrap();
        symlink("/etc/passwd", upper.join("app/d/f030")).unwrap();
        let view = LayerView::new(vec![ctx.clone()], true);
        let sel = Selector {
            view: &view,
            ignore: None,
            exclude: None,
        };
        let picked = sel.select(".").unwrap();
        let dst = LayerView::new(vec![upper.clone()], false);
        let passwd = fs::read("/etc/passwd").unwrap();
        copy_selections(&dst, "/app", true, &picked, &CopyOptions::default()).unwrap();
        for i in 0..300 {
            let (a, b) = (
                ctx.join(format!("d/f{i:03}")),
                upper.join(format!("app/d/f{i:03}")),
            );
            let (ma, mb) = (
                fs::symlink_metadata(&a).unwrap(),
                fs::symlink_metadata(&b).unwrap(),
            );
            assert!(mb.is_file(), "{i}");
            assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap(), "{i}");
            assert_eq!(
                ma.permissions().mode() & 0o7777,
                mb.permissions().mode() & 0o7777,
                "{i}"
            );
            assert_eq!(ma.mtime(), mb.mtime(), "{i}");
        }
        assert_eq!(
            fs::read("/etc/passwd").unwrap(),
            passwd,
            "the symlink was not followed"
        );
    }

    /// More directories than the stream keeps in flight, behind a big
    /// file the hasher takes a while over (so the writer runs ahead and
    /// has to wait for the budget): still the differ's tar.
    #[test]
    fn a_streamed_layer_of_many_directories_is_the_differs_tar() {
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        fs::create_dir_all(&ctx).unwrap();
        fs::write(ctx.join("a-big"), vec![3u8; 64 << 20]).unwrap();
        for d in 0..700 {
            let dir = ctx.join(format!("d{d:03}"));
            fs::create_dir_all(&dir).unwrap();
            for f in 0..3 {
                fs::write(dir.join(format!("f{f}")), format!("{d} {f}")).unwrap();
            }
        }
        let (streamed, (d, n)) = stream_vs_differ(&ctx, ".", None, "/app", None, |_| {}, |_| {});
        let s = streamed.expect("streamed");
        assert_eq!((s.diff_id, s.size), (d, n));
    }

    /// A tree with what a layer tar has to get right: empty and large
    /// files, odd modes, symlinks, hard links, long and non-UTF-8 names.
    fn odd_tree(ctx: &Path) {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let long = "n".repeat(120);
        fs::create_dir_all(ctx.join("a/b/c")).unwrap();
        fs::create_dir_all(ctx.join(format!("a/{long}"))).unwrap();
        fs::create_dir_all(ctx.join("a-b")).unwrap();
        fs::write(ctx.join("a/empty"), "").unwrap();
        fs::write(ctx.join("a/b/c/big"), vec![7u8; 3 << 20]).unwrap();
        fs::write(ctx.join(format!("a/{long}/{long}")), "long").unwrap();
        fs::write(ctx.join("a-b/x"), "x").unwrap();
        fs::write(ctx.join("run"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(ctx.join("run"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::set_permissions(ctx.join("a/b"), fs::Permissions::from_mode(0o2750)).unwrap();
        symlink("b/c/big", ctx.join("a/to-big")).unwrap();
        symlink("/nowhere", ctx.join("dangling")).unwrap();
        fs::hard_link(ctx.join("a-b/x"), ctx.join("a/x-again")).unwrap();
        fs::write(ctx.join(OsStr::from_bytes(b"bad-\xff-name")), "?").unwrap();
    }

    /// The layer a COPY streams while writing is, byte for byte, the tar
    /// the overlay differ makes of the same upperdir: same diffID, same
    /// size — into a new directory, into one whose parents come from a
    /// lower layer, and with SOURCE_DATE_EPOCH clamping.
    #[test]
    fn a_streamed_copy_layer_is_the_differs_tar() {
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        fs::create_dir_all(&ctx).unwrap();
        odd_tree(&ctx);
        let lower = t.path().join("lower");
        fs::create_dir_all(lower.join("usr/local")).unwrap();
        for (lower, dest, clamp) in [
            (None, "/app", None),
            (Some(lower.as_path()), "/usr/local/app/", None),
            (None, "/app", Some(1_000_000)),
        ] {
            let (streamed, (d, n)) =
                stream_vs_differ(&ctx, ".", lower, dest, clamp, |_| {}, |_| {});
            let s = streamed.unwrap_or_else(|| panic!("{dest}: the stream gave up"));
            assert_eq!((s.diff_id, s.size), (d, n), "{dest}");
        }
    }

    /// Hostile: a context file grown or shrunk after it was selected (and
    /// hashed for the key) and before it is copied. The layer's digest is
    /// that of what the snapshot holds — streamed or, when the stream
    /// gives up, diffed — never of what the selection saw.
    #[test]
    fn a_file_changed_between_hash_and_copy_is_never_copied() {
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        fs::create_dir_all(ctx.join("d")).unwrap();
        fs::write(ctx.join("d/grows"), vec![1u8; 100_000]).unwrap();
        fs::write(ctx.join("d/same-size"), vec![2u8; 100_000]).unwrap();
        // (A file replaced by another at its path is refused by the copy
        // itself: `fsview::open_found` checks the walk's inode.) A file
        // rewritten in place after the walk — bigger, or the same size
        // with its mtime put back — is refused too: the step's key holds
        // what was hashed, not what would be copied.
        let view = LayerView::new(vec![ctx.clone()], true);
        let sel = Selector {
            view: &view,
            ignore: None,
            exclude: None,
        };
        for (name, bytes) in [
            ("grows", vec![1u8; 300_000]),
            ("same-size", vec![9u8; 100_000]),
        ] {
            let picked = sel.select(&format!("d/{name}")).unwrap();
            let before = fs::metadata(ctx.join("d").join(name)).unwrap();
            fs::write(ctx.join("d").join(name), &bytes).unwrap();
            let f = fs::File::options()
                .write(true)
                .open(ctx.join("d").join(name))
                .unwrap();
            f.set_times(fs::FileTimes::new().set_modified(before.modified().unwrap()))
                .unwrap();
            drop(f);
            let out = tempfile::tempdir_in(&t).unwrap();
            let dst = LayerView::new(vec![out.path().to_path_buf()], false);
            let r = copy_selections(&dst, "/app/", true, &picked, &CopyOptions::default());
            let e = r.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                e.contains("changed while the build read it"),
                "{name}: {e:?}"
            );
        }
    }

    /// Anything in the upperdir the stream did not describe — a mode
    /// changed, a file added — makes its check fail: the commit diffs.
    #[test]
    fn a_streamed_layer_that_does_not_match_its_upperdir_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        fs::create_dir_all(&ctx).unwrap();
        odd_tree(&ctx);
        let tampers: [&dyn Fn(&Path); 2] = [
            &|up| {
                fs::set_permissions(up.join("app/run"), fs::Permissions::from_mode(0o755)).unwrap()
            },
            &|up| fs::write(up.join("app/a/extra"), "").unwrap(),
        ];
        for tamper in tampers {
            let (s, _) = stream_vs_differ(&ctx, ".", None, "/app", None, |_| {}, tamper);
            assert!(s.is_none());
        }
    }

    /// Files that get extended attributes of their own where they are
    /// made (here a default ACL on the layer directory, which new files
    /// inherit as an access ACL) are not streamed: the layer is diffed,
    /// attributes and all.
    #[test]
    fn files_with_extended_attributes_are_not_streamed() {
        let t = tempfile::tempdir().unwrap();
        let ctx = t.path().join("ctx");
        fs::create_dir_all(ctx.join("d")).unwrap();
        fs::write(ctx.join("d/f"), "x").unwrap();
        // version 2; user::rwx, user:1000:r--, group::r-x, mask::r-x, other::r-x
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 7u16, u32::MAX),
            (2, 4, 1000),
            (4, 5, u32::MAX),
            (0x10, 5, u32::MAX),
            (0x20, 5, u32::MAX),
        ] {
            acl.extend(tag.to_le_bytes());
            acl.extend(perm.to_le_bytes());
            acl.extend(id.to_le_bytes());
        }
        let mut acl_set = false;
        let (s, _) = stream_vs_differ(
            &ctx,
            "d",
            None,
            "/app",
            None,
            |up| {
                let p = std::ffi::CString::new(up.as_os_str().as_bytes()).unwrap();
                // SAFETY: NUL-terminated path and name, a buffer of its length.
                acl_set = unsafe {
                    libc::setxattr(
                        p.as_ptr(),
                        c"system.posix_acl_default".as_ptr(),
                        acl.as_ptr().cast(),
                        acl.len(),
                        0,
                    )
                } == 0;
            },
            |_| {},
        );
        if acl_set {
            assert!(s.is_none());
        } else {
            assert!(std::env::var_os("CI").is_none(), "ACLs unsupported here");
        }
    }
}
