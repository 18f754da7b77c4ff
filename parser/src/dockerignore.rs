//! `.dockerignore` reading and matching with Docker's patternmatcher semantics.
//!
//! This is a port of the rules of [`moby/patternmatcher`] (and of its
//! `ignorefile` reader), plus the walk decisions of [`tonistiigi/fsutil`]'s
//! filtered walker, which BuildKit uses to send a build context. It does no
//! I/O: callers read the ignore file and walk the context themselves.
//!
//! * [`read_ignore_file`] turns the text of a `.dockerignore` into patterns;
//! * [`PatternMatcher`] answers "is this path excluded?" exactly as
//!   `patternmatcher.MatchesOrParentMatches` does;
//! * [`ContextFilter`] combines include patterns (BuildKit's
//!   `IncludePatterns`) and exclude patterns (the `.dockerignore`) into the
//!   per-entry [`Decision`] a context walker needs;
//! * [`ignore_file_candidates`] names the files to look for.
//!
//! The pattern language (not gitignore's): patterns are path-cleaned and
//! anchored at the context root; `*` and `?` do not cross `/`; `**` matches
//! any number of directories; `[...]` classes and `\` escapes are checked
//! with Go's `filepath.Match` rules; a pattern matches a path when it
//! matches the path or any of its ancestor directories; a leading `!` makes
//! an exception; the last matching pattern wins.
//!
//! Like upstream, a pattern with glob characters is matched through the Go
//! regular expression patternmatcher builds from it, quirks included: `|`,
//! `{` and `}` are not escaped (so `a*|b` is an alternation and `x{2}*` a
//! repetition), `\` escapes are regexp escapes (`\d`, `\x41`, `\Q`), and a
//! few patterns that pass the construction check fail only when first
//! evaluated (`[z-a]`, `\y`). Construction validates the whole pattern as
//! current Go does (Go 1.19 and older accepted e.g. `x*[`).
//!
//! For walking a context, [`ContextFilter::decide_in`] carries each
//! directory's match state to its children, as BuildKit does; the
//! stateless [`ContextFilter::decide`] recomputes it from the root.
//!
//! ```
//! use kiln_parser::dockerignore::{read_ignore_file, PatternMatcher};
//!
//! let patterns = read_ignore_file("# build output\ntarget/\n*.md\n!README.md\n");
//! assert_eq!(patterns, ["target", "*.md", "!README.md"]);
//! let pm = PatternMatcher::new(&patterns).unwrap();
//! assert!(pm.matches_or_parent_matches("target/debug/kiln").unwrap());
//! assert!(pm.matches_or_parent_matches("CHANGES.md").unwrap());
//! assert!(!pm.matches_or_parent_matches("README.md").unwrap());
//! assert!(!pm.matches_or_parent_matches("docs/guide.md").unwrap());
//! ```
//!
//! Known deviations from upstream (all in corners no real ignore file
//! reaches): Unicode class escapes (`\pL`, `\p{Greek}`) are reported as a
//! bad pattern instead of being matched, the reader has no 64 KiB
//! line-length limit, and deciding one path may cost at most
//! [`MATCH_BUDGET`] matcher steps: a pattern built to be slow (upstream's
//! unescaped `{n,m}` lets a 4 KiB line such as `?{0,1000}?{0,1000}…` take
//! tens of seconds per file name, and longer lines far more) fails with
//! [`IgnoreError::TooComplex`] instead of stalling the build. Real patterns
//! stay orders of magnitude below it.
//!
//! [`moby/patternmatcher`]: https://github.com/moby/patternmatcher
//! [`tonistiigi/fsutil`]: https://github.com/tonistiigi/fsutil

use std::borrow::Cow;

/// Why a pattern list was rejected or a match could not be decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IgnoreError {
    /// A pattern consisting of a lone `!`.
    #[error("illegal exclusion pattern: \"!\"")]
    IllegalExclusion,
    /// A malformed pattern (Go's `filepath.ErrBadPattern`). Most are found
    /// when the matcher is built; a few only when the pattern is first
    /// evaluated, and then every evaluation reports it again.
    #[error("syntax error in pattern `{pattern}`")]
    BadPattern {
        /// The cleaned pattern, without its `!`.
        pattern: String,
    },
    /// A [`MatchInfo`] from a different matcher was passed in.
    #[error("wrong number of values in parent match info")]
    MatchInfoMismatch,
    /// Matching one path took more than [`MATCH_BUDGET`] steps of the
    /// pattern matcher (a pattern built to be slow).
    #[error(
        "pattern `{pattern}` is too costly to match (more than {MATCH_BUDGET} steps for one path)"
    )]
    TooComplex {
        /// The pattern that ran out of budget (cut at 100 characters).
        pattern: String,
    },
}

/// The text a path whose names are bytes is matched as. Patterns are
/// text; Go's matchers, which BuildKit uses, read a string that is not
/// UTF-8 one invalid byte at a time, each as U+FFFD (`utf8.RuneError`), so
/// `?` and `*` match such a byte as one character. Borrowed when `path` is
/// UTF-8 already.
pub fn match_text(path: &[u8]) -> Cow<'_, str> {
    if let Ok(s) = std::str::from_utf8(path) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(path.len() + 8);
    for chunk in path.utf8_chunks() {
        out.push_str(chunk.valid());
        for _ in chunk.invalid() {
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
    Cow::Owned(out)
}

/// The most matcher steps (threads visited by the regular-expression
/// matcher) one decision about one path may take, over all patterns.
/// Measured: `**/*.log` against a 4000-byte path takes about 30 thousand,
/// a glob of a thousand `*a` against a 4000-byte name about 18 million
/// (about 0.1 s); the slow pattern this guards against wanted 300 million
/// for one 1000-byte name, and far more for longer ones.
pub const MATCH_BUDGET: u64 = 1 << 25;

/// Reads the text of a `.dockerignore` into its list of patterns, as
/// `patternmatcher/ignorefile.ReadAll` does.
///
/// A UTF-8 BOM on the first line is dropped; a line whose *first* character
/// is `#` is a comment (after leading blanks it is a pattern); lines are
/// trimmed and blank ones skipped; a leading `!` is split off and the rest
/// trimmed again; the pattern is path-cleaned and one leading `/` removed;
/// the `!` is put back. A lone `!` is kept (the matcher rejects it).
pub fn read_ignore_file(text: &str) -> Vec<String> {
    let mut patterns = Vec::new();
    for (index, raw) in text.split('\n').enumerate() {
        let mut line = raw.strip_suffix('\r').unwrap_or(raw);
        if index == 0 {
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = match pattern.strip_prefix('!') {
            Some(rest) => {
                pattern = rest.trim();
                true
            }
            None => false,
        };
        let mut out = String::new();
        if invert {
            out.push('!');
        }
        if !pattern.is_empty() {
            let cleaned = go_path::clean(pattern);
            let cleaned = match cleaned.strip_prefix('/') {
                Some(rest) if !rest.is_empty() => rest,
                _ => cleaned.as_str(),
            };
            out.push_str(cleaned);
        }
        patterns.push(out);
    }
    patterns
}

/// The ignore files to try, in order, for a Dockerfile at `dockerfile_path`.
///
/// Docker's rule: `<name>.dockerignore` beside the Dockerfile wins when it
/// exists, else `.dockerignore` at the root of the context. The first
/// candidate is `dockerfile_path` with `.dockerignore` appended (so it is
/// relative to whatever `dockerfile_path` is relative to); the last is
/// always `.dockerignore`, relative to the context root. Use the first one
/// that exists; none existing means no patterns. A path without a file name
/// (empty, or ending in `/`) yields only `.dockerignore`.
pub fn ignore_file_candidates(dockerfile_path: &str) -> Vec<String> {
    let mut candidates = Vec::with_capacity(2);
    if !dockerfile_path.is_empty() && !dockerfile_path.ends_with('/') {
        candidates.push(format!("{dockerfile_path}.dockerignore"));
    }
    candidates.push(".dockerignore".to_owned());
    candidates
}

/// An ordered list of `.dockerignore` patterns, compiled.
#[derive(Debug, Clone)]
pub struct PatternMatcher {
    patterns: Vec<Pattern>,
    exclusions: bool,
    literal_patterns: bool,
    literal_exceptions: bool,
}

/// Per-pattern results for a directory, handed to the matching of its
/// children by [`PatternMatcher::matches_using_parent_results`]. The default
/// value means "no information" (use it for entries at the context root).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MatchInfo {
    parent_matched: Vec<bool>,
}

impl PatternMatcher {
    /// Compiles `patterns` (as produced by [`read_ignore_file`]) like
    /// `patternmatcher.New`: each is trimmed (blank ones are dropped),
    /// path-cleaned, split from a leading `!`, and checked with Go's
    /// `filepath.Match` syntax rules.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, IgnoreError> {
        let mut compiled = Vec::with_capacity(patterns.len());
        let mut exclusions = false;
        for raw in patterns {
            let trimmed = raw.as_ref().trim();
            if trimmed.is_empty() {
                continue;
            }
            let cleaned = go_path::clean(trimmed);
            let (exclusion, body) = match cleaned.strip_prefix('!') {
                Some("") => return Err(IgnoreError::IllegalExclusion),
                Some(body) => (true, body.to_owned()),
                None => (false, cleaned),
            };
            exclusions |= exclusion;
            if !crate::glob::is_valid(&body) {
                return Err(IgnoreError::BadPattern { pattern: body });
            }
            compiled.push(Pattern::compile(body, exclusion));
        }
        let literal = |exclusion: bool| {
            compiled
                .iter()
                .filter(|p| p.exclusion == exclusion)
                .all(|p| !p.without_trailing_glob().contains(GLOB_CHARS))
        };
        let literal_patterns = literal(false);
        let literal_exceptions = literal(true);
        Ok(PatternMatcher {
            patterns: compiled,
            exclusions,
            literal_patterns,
            literal_exceptions,
        })
    }

    /// Whether `path` (slash-separated, relative to the context root) is
    /// excluded: `patternmatcher.MatchesOrParentMatches`. Patterns are
    /// walked in order; one matches when it matches `path` or any ancestor
    /// directory of it; a matching pattern sets "excluded", a matching `!`
    /// pattern clears it. The path is used as given (not cleaned).
    pub fn matches_or_parent_matches(&self, path: &str) -> Result<bool, IgnoreError> {
        let mut matched = false;
        let target = Target::new(path);
        let mut budget = MATCH_BUDGET;
        for pattern in &self.patterns {
            if pattern.exclusion != matched {
                continue;
            }
            let hit = pattern.matches_self_or_ancestor(&target, &mut budget)?;
            if hit {
                matched = !pattern.exclusion;
            }
        }
        Ok(matched)
    }

    /// [`matches_or_parent_matches`](Self::matches_or_parent_matches) for
    /// a path whose names are bytes (a file name need not be UTF-8): the
    /// path is matched as [`match_text`] spells it. Only the match sees that
    /// text; the caller keeps (and copies) the name's own bytes.
    pub fn matches_or_parent_matches_bytes(&self, path: &[u8]) -> Result<bool, IgnoreError> {
        self.matches_or_parent_matches(&match_text(path))
    }

    /// The incremental form used by BuildKit's context walker
    /// (`patternmatcher.MatchesUsingParentResults`): `parent` is the
    /// [`MatchInfo`] returned for the parent directory (default for entries
    /// at the root). Returns whether `path` is excluded and the info to hand
    /// to its children. A pattern that matched the parent counts as matching
    /// without being re-evaluated, which can differ from
    /// [`matches_or_parent_matches`](Self::matches_or_parent_matches) in
    /// corner cases exactly as upstream does.
    pub fn matches_using_parent_results(
        &self,
        path: &str,
        parent: &MatchInfo,
    ) -> Result<(bool, MatchInfo), IgnoreError> {
        let parent_matched = &parent.parent_matched;
        if !parent_matched.is_empty() && parent_matched.len() != self.patterns.len() {
            return Err(IgnoreError::MatchInfoMismatch);
        }
        let mut matched = false;
        let mut info = vec![false; self.patterns.len()];
        let target = Target::new(path);
        let mut budget = MATCH_BUDGET;
        for (i, pattern) in self.patterns.iter().enumerate() {
            let mut hit = parent_matched.get(i).copied().unwrap_or(false);
            if !hit {
                if pattern.exclusion != matched {
                    continue;
                }
                hit = if parent_matched.is_empty() {
                    pattern.matches_self_or_ancestor(&target, &mut budget)?
                } else {
                    pattern.matches(path, &mut budget)?
                };
            }
            if let Some(slot) = info.get_mut(i) {
                *slot = hit;
            }
            if hit {
                matched = !pattern.exclusion;
            }
        }
        Ok((
            matched,
            MatchInfo {
                parent_matched: info,
            },
        ))
    }

    /// Whether any `!` pattern is present.
    pub fn exclusions(&self) -> bool {
        self.exclusions
    }

    /// Fast path for walkers: given a directory `dir` that this matcher
    /// excludes, could a `!` pattern re-include something below it? `false`
    /// means the walker may skip the whole subtree.
    ///
    /// This is fsutil's conservative test: with no `!` patterns the answer
    /// is `false`; if any `!` pattern has glob characters (other than a
    /// trailing `/*` or `/**`) it is `true`; otherwise it is `true` only
    /// when some `!` pattern lies at or below `dir`.
    pub fn may_reinclude_below(&self, dir: &str) -> bool {
        if !self.exclusions {
            return false;
        }
        !self.literal_exceptions || self.any_literal_below(dir, true)
    }

    /// The same test for normal patterns, used on include patterns: given a
    /// directory that does not match, could a pattern match something below
    /// it? `true` when any normal pattern has glob characters (other than a
    /// trailing `/*` or `/**`), else when one lies at or below `dir`.
    pub fn may_match_below(&self, dir: &str) -> bool {
        !self.literal_patterns || self.any_literal_below(dir, false)
    }

    fn any_literal_below(&self, dir: &str, exclusion: bool) -> bool {
        self.patterns
            .iter()
            .filter(|p| p.exclusion == exclusion)
            .any(|p| {
                let stem = p.without_trailing_glob();
                // `stem + "/"` starts with `dir + "/"`.
                stem.strip_prefix(dir)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
    }
}

/// Characters that make fsutil treat a pattern as a glob rather than a
/// plain path prefix.
const GLOB_CHARS: &[char] = &['*', '[', ']', '?', '^', '\\'];

/// The decision for one entry of a build context walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send the entry (after any of its ancestor directories not sent yet);
    /// descend if it is a directory.
    Include,
    /// Do not send the entry; if it is a directory, still descend, since
    /// something below may be included (and would bring this directory
    /// along as a parent).
    Exclude,
    /// A directory that is not sent and below which nothing can be
    /// included: do not descend.
    ExcludeSkipDir,
}

/// Include and exclude patterns together: what fsutil's filtered walker
/// decides for each entry of a build context.
///
/// A walker that visits entries depth-first in lexical order, asks
/// [`decide`](Self::decide) (or [`decide_in`](Self::decide_in)) for each,
/// descends into directories unless told [`Decision::ExcludeSkipDir`], and
/// on [`Decision::Include`] first emits the ancestor directories it has not
/// emitted yet, reproduces BuildKit's context exactly.
#[derive(Debug, Clone)]
pub struct ContextFilter {
    include: Option<PatternMatcher>,
    exclude: Option<PatternMatcher>,
}

/// What [`ContextFilter::decide_in`] remembers about a directory for its
/// children. The default value is the state of the context root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirState {
    include: MatchInfo,
    exclude: MatchInfo,
}

impl ContextFilter {
    /// Builds a filter. `includes` are BuildKit's include patterns (an empty
    /// list means everything; a non-empty list whose patterns are all blank
    /// means nothing, as upstream); `excludes` are the `.dockerignore`
    /// patterns. Both use the same pattern language.
    pub fn new<I: AsRef<str>, E: AsRef<str>>(
        includes: &[I],
        excludes: &[E],
    ) -> Result<Self, IgnoreError> {
        let include = if includes.is_empty() {
            None
        } else {
            Some(PatternMatcher::new(includes)?)
        };
        let exclude = if excludes.is_empty() {
            None
        } else {
            Some(PatternMatcher::new(excludes)?)
        };
        Ok(ContextFilter { include, exclude })
    }

    /// The decision for `rel_path` (slash-separated, relative to the
    /// context root, as a walker produces it: no leading `/` or `./`, no
    /// trailing `/`). Stateless: the states of the ancestors are recomputed
    /// on each call; a walker can use [`decide_in`](Self::decide_in) to
    /// avoid that. A path below a directory that would be skipped is
    /// reported as [`Decision::Exclude`] (or [`Decision::ExcludeSkipDir`]
    /// for a directory).
    pub fn decide(&self, rel_path: &str, is_dir: bool) -> Result<Decision, IgnoreError> {
        let mut state = DirState::default();
        for (i, _) in rel_path.match_indices('/') {
            let ancestor = &rel_path[..i];
            if ancestor.is_empty() {
                continue;
            }
            let (decision, next) = self.decide_in(ancestor, true, &state)?;
            if decision == Decision::ExcludeSkipDir {
                return Ok(if is_dir {
                    Decision::ExcludeSkipDir
                } else {
                    Decision::Exclude
                });
            }
            state = next;
        }
        Ok(self.decide_in(rel_path, is_dir, &state)?.0)
    }

    /// The decision for `rel_path`, given the [`DirState`] returned for its
    /// parent directory (the default state for entries at the root).
    /// Returns the state to pass for the entry's children when it is a
    /// directory.
    pub fn decide_in(
        &self,
        rel_path: &str,
        is_dir: bool,
        parent: &DirState,
    ) -> Result<(Decision, DirState), IgnoreError> {
        let mut state = DirState::default();
        let mut skip = false;
        if let Some(include) = &self.include {
            let (matched, info) =
                include.matches_using_parent_results(rel_path, &parent.include)?;
            state.include = info;
            if !matched {
                if is_dir && !include.may_match_below(rel_path) {
                    return Ok((Decision::ExcludeSkipDir, DirState::default()));
                }
                skip = true;
            }
        }
        if let Some(exclude) = &self.exclude {
            let (matched, info) =
                exclude.matches_using_parent_results(rel_path, &parent.exclude)?;
            state.exclude = info;
            if matched {
                if is_dir && !exclude.may_reinclude_below(rel_path) {
                    return Ok((Decision::ExcludeSkipDir, DirState::default()));
                }
                skip = true;
            }
        }
        let decision = if skip {
            Decision::Exclude
        } else {
            Decision::Include
        };
        Ok((decision, state))
    }

    /// Whether a single file may be opened through the filtered context
    /// (fsutil's filtered `Open`): it must match the include patterns (if
    /// any) and not the exclude patterns, both by
    /// [`PatternMatcher::matches_or_parent_matches`].
    pub fn open_allowed(&self, rel_path: &str) -> Result<bool, IgnoreError> {
        if let Some(include) = &self.include {
            if !include.matches_or_parent_matches(rel_path)? {
                return Ok(false);
            }
        }
        if let Some(exclude) = &self.exclude {
            if exclude.matches_or_parent_matches(rel_path)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A path to match against a pattern and its ancestor directories.
struct Target<'a> {
    path: &'a str,
    /// Whether `path` is already clean and relative (no empty, `.` or `..`
    /// components): then the ancestors upstream derives from
    /// `filepath.Dir` are exactly the prefixes of `path` ending before a
    /// `/`, and a pattern can test them all in one pass.
    clean: bool,
}

impl<'a> Target<'a> {
    fn new(path: &'a str) -> Target<'a> {
        let clean = path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
        Target { path, clean }
    }

    /// The ancestor directories, as prefixes of the path.
    fn prefixes(&self) -> impl Iterator<Item = &'a str> {
        let path = self.path;
        path.match_indices('/').map(move |(i, _)| &path[..i])
    }
}

/// The ancestors Go builds from `filepath.Dir(file)` split at `/`: every
/// prefix of `parent` that ends before a `/`, then `parent` itself.
fn ancestors(parent: &str) -> impl Iterator<Item = &str> {
    parent
        .match_indices('/')
        .map(move |(i, _)| &parent[..i])
        .chain(std::iter::once(parent))
}

/// One compiled pattern.
#[derive(Debug, Clone)]
struct Pattern {
    /// Cleaned, without the `!`.
    cleaned: String,
    exclusion: bool,
    kind: MatchKind,
}

#[derive(Debug, Clone)]
enum MatchKind {
    /// No special characters: the path must equal the pattern.
    Exact,
    /// `literal**`: the path must start with these bytes.
    Prefix(Vec<u8>),
    /// `**literal`: the path must end with these bytes (or, when they start
    /// with `/`, equal the rest).
    Suffix(Vec<u8>),
    /// Anything else, through the regular expression upstream builds.
    /// `None` when that expression does not compile: the error is reported
    /// each time the pattern is evaluated.
    Regex(Option<regex::Program>),
}

impl Pattern {
    /// Mirrors `Pattern.compile`: classifies the pattern and builds the Go
    /// regular expression upstream would, then compiles that with Go's
    /// syntax.
    fn compile(cleaned: String, exclusion: bool) -> Pattern {
        #[derive(PartialEq)]
        enum Ty {
            Exact,
            Prefix,
            Suffix,
            Regex,
        }
        let mut re = String::from("^");
        let mut ty = Ty::Exact;
        let mut chars = cleaned.chars().peekable();
        // text/scanner drops a byte order mark at the very start.
        if chars.peek() == Some(&'\u{feff}') {
            chars.next();
        }
        let mut first = true;
        while let Some(ch) = chars.next() {
            match ch {
                '*' if chars.peek() == Some(&'*') => {
                    chars.next();
                    if chars.peek() == Some(&'/') {
                        chars.next();
                    }
                    if chars.peek().is_none() {
                        if ty == Ty::Exact {
                            ty = Ty::Prefix;
                        } else {
                            re.push_str(".*");
                            ty = Ty::Regex;
                        }
                    } else {
                        re.push_str("(.*/)?");
                        ty = Ty::Regex;
                    }
                    if first {
                        ty = Ty::Suffix;
                    }
                }
                '*' => {
                    re.push_str("[^/]*");
                    ty = Ty::Regex;
                }
                '?' => {
                    re.push_str("[^/]");
                    ty = Ty::Regex;
                }
                // Upstream's `shouldEscape` means to escape `.+()|{}$`,
                // but its bitmap only has room for bytes below 64, so `|`,
                // `{` and `}` reach the regexp unescaped (and act as
                // alternation and repetition there).
                '.' | '+' | '(' | ')' | '$' => {
                    re.push('\\');
                    re.push(ch);
                }
                '\\' => match chars.next() {
                    Some(next) => {
                        re.push('\\');
                        re.push(next);
                        ty = Ty::Regex;
                    }
                    None => re.push('\\'),
                },
                '[' | ']' => {
                    re.push(ch);
                    ty = Ty::Regex;
                }
                _ => re.push(ch),
            }
            first = false;
        }
        let kind = match ty {
            Ty::Exact => MatchKind::Exact,
            Ty::Prefix => {
                let bytes = cleaned.as_bytes();
                let stem = bytes.get(..bytes.len().saturating_sub(2)).unwrap_or(&[]);
                MatchKind::Prefix(stem.to_vec())
            }
            Ty::Suffix => MatchKind::Suffix(cleaned.as_bytes().get(2..).unwrap_or(&[]).to_vec()),
            Ty::Regex => {
                re.push('$');
                MatchKind::Regex(regex::Program::compile(&re).ok())
            }
        };
        Pattern {
            cleaned,
            exclusion,
            kind,
        }
    }

    /// Whether the pattern matches the path or one of its ancestor
    /// directories (the inner loop of `MatchesOrParentMatches`).
    fn matches_self_or_ancestor(
        &self,
        target: &Target<'_>,
        budget: &mut u64,
    ) -> Result<bool, IgnoreError> {
        let path = target.path;
        if !target.clean {
            if self.matches(path, budget)? {
                return Ok(true);
            }
            let parent = go_path::dir(path);
            if parent == "." {
                return Ok(false);
            }
            // `matches(path)` above already reported a pattern that fails
            // to compile, so the only error left is the budget
            for a in ancestors(&parent) {
                if self.matches(a, budget)? {
                    return Ok(true);
                }
            }
            return Ok(false);
        }
        Ok(match &self.kind {
            MatchKind::Exact => path
                .strip_prefix(self.cleaned.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            // An ancestor starting with the prefix means the path does too.
            MatchKind::Prefix(_) => self.matches(path, budget)?,
            MatchKind::Suffix(_) => {
                self.matches(path, budget)? || target.prefixes().any(|a| self.suffix_matches(a))
            }
            MatchKind::Regex(Some(program)) => program
                .is_match(path, true, budget)
                .map_err(|_| self.too_complex())?,
            MatchKind::Regex(None) => self.matches(path, budget)?,
        })
    }

    fn too_complex(&self) -> IgnoreError {
        IgnoreError::TooComplex {
            pattern: self.cleaned.chars().take(100).collect(),
        }
    }

    fn suffix_matches(&self, path: &str) -> bool {
        match &self.kind {
            MatchKind::Suffix(suffix) => {
                path.as_bytes().ends_with(suffix)
                    || (suffix.first() == Some(&b'/') && suffix.get(1..) == Some(path.as_bytes()))
            }
            _ => false,
        }
    }

    fn matches(&self, path: &str, budget: &mut u64) -> Result<bool, IgnoreError> {
        Ok(match &self.kind {
            MatchKind::Exact => path == self.cleaned,
            MatchKind::Prefix(prefix) => path.as_bytes().starts_with(prefix),
            MatchKind::Suffix(_) => self.suffix_matches(path),
            MatchKind::Regex(Some(program)) => program
                .is_match(path, false, budget)
                .map_err(|_| self.too_complex())?,
            MatchKind::Regex(None) => {
                return Err(IgnoreError::BadPattern {
                    pattern: self.cleaned.clone(),
                })
            }
        })
    }

    /// fsutil's `patternWithoutTrailingGlob`.
    fn without_trailing_glob(&self) -> &str {
        let p = self.cleaned.as_str();
        let p = p.strip_suffix("/**").unwrap_or(p);
        p.strip_suffix("/*").unwrap_or(p)
    }
}

/// Go's `path/filepath` helpers (unix flavour).
mod go_path {
    /// `filepath.Clean`: the shortest equivalent path, lexically.
    pub(super) fn clean(path: &str) -> String {
        if path.is_empty() {
            return ".".to_owned();
        }
        let rooted = path.starts_with('/');
        let mut parts: Vec<&str> = Vec::new();
        // Leading `..` elements of a relative path cannot be cancelled.
        let mut fixed = 0;
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if parts.len() > fixed {
                        parts.pop();
                    } else if !rooted {
                        parts.push("..");
                        fixed = parts.len();
                    }
                }
                _ => parts.push(part),
            }
        }
        let joined = parts.join("/");
        if rooted {
            format!("/{joined}")
        } else if joined.is_empty() {
            ".".to_owned()
        } else {
            joined
        }
    }

    /// `filepath.Dir`: everything up to the last `/`, cleaned.
    pub(super) fn dir(path: &str) -> String {
        let end = path.rfind('/').map_or(0, |i| i + 1);
        clean(path.get(..end).unwrap_or(""))
    }
}

/// The subset of Go's RE2 syntax (`regexp/syntax` with Perl flags) that the
/// expressions built by `Pattern::compile` can contain, compiled to a small
/// Pike VM (linear in the text). Only "does it match" is needed, so there
/// are no captures.
mod regex {
    /// Largest Unicode scalar value.
    const MAX_RUNE: u32 = 0x10_ffff;
    /// Deepest group nesting accepted (Go's parser limit is 1000).
    const MAX_DEPTH: usize = 1000;
    /// Largest count in `{n,m}` (Go's limit).
    const MAX_REPEAT: i64 = 1000;
    /// Largest compiled program (Go's `maxSize`: 128 MiB of 40-byte insts).
    const MAX_INSTS: usize = (128 << 20) / 40;

    /// Why an expression is rejected; the details are not surfaced.
    #[derive(Debug)]
    pub(super) struct Invalid;

    /// A match ran out of its step budget.
    #[derive(Debug)]
    pub(super) struct Exhausted;

    type Ranges = Vec<(u32, u32)>;

    #[derive(Debug, Clone, Copy)]
    enum Look {
        BeginText,
        EndText,
        WordBoundary,
        NotWordBoundary,
    }

    #[derive(Debug)]
    enum Node {
        /// Index into the class table.
        Class(usize),
        Look(Look),
        Concat(Vec<Node>),
        Alternate(Vec<Node>),
        /// `min` to `max` (unbounded when `None`) copies of `sub`; `counted`
        /// when written `{n,m}` (Go's `OpRepeat`).
        Repeat {
            sub: Box<Node>,
            min: u32,
            max: Option<u32>,
            counted: bool,
        },
    }

    #[derive(Debug, Clone, Copy)]
    enum Inst {
        /// Index into the class table.
        Class(usize),
        Look(Look),
        Split(usize, usize),
        Jmp(usize),
        Match,
    }

    /// A compiled expression.
    #[derive(Debug, Clone)]
    pub(super) struct Program {
        insts: Vec<Inst>,
        classes: Vec<Ranges>,
    }

    impl Program {
        pub(super) fn compile(expr: &str) -> Result<Program, Invalid> {
            let mut classes = Vec::new();
            let node = parse(expr, &mut classes)?;
            let mut compiler = Compiler { insts: Vec::new() };
            compiler.emit(&node)?;
            compiler.push(Inst::Match)?;
            Ok(Program {
                insts: compiler.insts,
                classes,
            })
        }

        /// Go's `Regexp.MatchString`: is there a match anywhere in `text`?
        /// With `ancestors`, also when there is one in a prefix of `text`
        /// that ends before a `/` (not at the start): the same answer as
        /// matching each such prefix on its own, in a single pass. Each
        /// thread visited costs one step of `budget`; [`Exhausted`] when
        /// it runs out.
        pub(super) fn is_match(
            &self,
            text: &str,
            ancestors: bool,
            budget: &mut u64,
        ) -> Result<bool, Exhausted> {
            let len = self.insts.len();
            // Threads only start at the beginning when the program does.
            let anchored = matches!(self.insts.first(), Some(Inst::Look(Look::BeginText)));
            let mut current = Threads::new(len);
            let mut next = Threads::new(len);
            let mut stack = Vec::new();
            // Threads stopped at `$` by the `/` that follows: at the end of
            // the prefix, they would go on.
            let mut blocked = Vec::new();
            let mut blocked_next = Vec::new();
            let mut chars = text.chars();
            let mut at = Position {
                start: true,
                before: None,
                after: chars.next(),
            };
            loop {
                if (at.start || !anchored)
                    && self.add(&mut current, 0, at, &mut stack, &mut blocked, budget)?
                {
                    return Ok(true);
                }
                if ancestors && !at.start && at.after == Some('/') && !blocked.is_empty() {
                    let end = Position { after: None, ..at };
                    let mut scratch = Threads::new(len);
                    let mut unused = Vec::new();
                    for &pc in &blocked {
                        if self.add(&mut scratch, pc + 1, end, &mut stack, &mut unused, budget)? {
                            return Ok(true);
                        }
                    }
                }
                let Some(c) = at.after else {
                    return Ok(false);
                };
                if anchored && current.dense.is_empty() {
                    return Ok(false);
                }
                let following = Position {
                    start: false,
                    before: Some(c),
                    after: chars.next(),
                };
                next.clear();
                blocked_next.clear();
                for &pc in &current.dense {
                    if let Some(Inst::Class(class)) = self.insts.get(pc) {
                        let hit = self
                            .classes
                            .get(*class)
                            .is_some_and(|ranges| class_contains(ranges, c as u32));
                        if hit
                            && self.add(
                                &mut next,
                                pc + 1,
                                following,
                                &mut stack,
                                &mut blocked_next,
                                budget,
                            )?
                        {
                            return Ok(true);
                        }
                    }
                }
                std::mem::swap(&mut current, &mut next);
                std::mem::swap(&mut blocked, &mut blocked_next);
                at = following;
            }
        }

        /// Adds the thread at `pc` and everything reachable from it without
        /// consuming input; `true` when that reaches the match state. Threads
        /// stopped at `$` because text follows are noted in `blocked`.
        fn add(
            &self,
            threads: &mut Threads,
            pc: usize,
            at: Position,
            stack: &mut Vec<usize>,
            blocked: &mut Vec<usize>,
            budget: &mut u64,
        ) -> Result<bool, Exhausted> {
            stack.clear();
            stack.push(pc);
            while let Some(pc) = stack.pop() {
                *budget = budget.checked_sub(1).ok_or(Exhausted)?;
                if !threads.insert(pc) {
                    continue;
                }
                match self.insts.get(pc) {
                    Some(Inst::Match) => return Ok(true),
                    Some(Inst::Jmp(to)) => stack.push(*to),
                    Some(Inst::Split(a, b)) => {
                        stack.push(*b);
                        stack.push(*a);
                    }
                    Some(Inst::Look(look)) => {
                        if at.holds(*look) {
                            stack.push(pc + 1);
                        } else if matches!(look, Look::EndText) {
                            blocked.push(pc);
                        }
                    }
                    Some(Inst::Class(_)) | None => {}
                }
            }
            Ok(false)
        }
    }

    /// Where the matcher stands: at the start or not, and the characters on
    /// either side.
    #[derive(Debug, Clone, Copy)]
    struct Position {
        start: bool,
        before: Option<char>,
        after: Option<char>,
    }

    impl Position {
        fn holds(self, look: Look) -> bool {
            match look {
                Look::BeginText => self.start,
                Look::EndText => self.after.is_none(),
                Look::WordBoundary => is_word(self.before) != is_word(self.after),
                Look::NotWordBoundary => is_word(self.before) == is_word(self.after),
            }
        }
    }

    /// A sparse set of program counters, in insertion order.
    struct Threads {
        dense: Vec<usize>,
        seen: Vec<bool>,
    }

    impl Threads {
        fn new(len: usize) -> Threads {
            Threads {
                dense: Vec::with_capacity(len),
                seen: vec![false; len],
            }
        }

        fn insert(&mut self, pc: usize) -> bool {
            match self.seen.get_mut(pc) {
                Some(seen) if !*seen => {
                    *seen = true;
                    self.dense.push(pc);
                    true
                }
                _ => false,
            }
        }

        fn clear(&mut self) {
            for &pc in &self.dense {
                if let Some(seen) = self.seen.get_mut(pc) {
                    *seen = false;
                }
            }
            self.dense.clear();
        }
    }

    fn is_word(c: Option<char>) -> bool {
        c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    fn class_contains(ranges: &Ranges, c: u32) -> bool {
        ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi)
    }

    /// Thompson construction, with counted repetitions expanded.
    struct Compiler {
        insts: Vec<Inst>,
    }

    impl Compiler {
        fn push(&mut self, inst: Inst) -> Result<usize, Invalid> {
            if self.insts.len() >= MAX_INSTS {
                return Err(Invalid);
            }
            self.insts.push(inst);
            Ok(self.insts.len() - 1)
        }

        fn patch(&mut self, at: usize, inst: Inst) {
            if let Some(slot) = self.insts.get_mut(at) {
                *slot = inst;
            }
        }

        fn emit(&mut self, node: &Node) -> Result<(), Invalid> {
            match node {
                Node::Class(class) => {
                    self.push(Inst::Class(*class))?;
                }
                Node::Look(look) => {
                    self.push(Inst::Look(*look))?;
                }
                Node::Concat(nodes) => {
                    for node in nodes {
                        self.emit(node)?;
                    }
                }
                Node::Alternate(alternatives) => {
                    let mut exits = Vec::new();
                    let last = alternatives.len().saturating_sub(1);
                    for (k, alternative) in alternatives.iter().enumerate() {
                        if k == last {
                            self.emit(alternative)?;
                            break;
                        }
                        let split = self.push(Inst::Match)?;
                        self.emit(alternative)?;
                        exits.push(self.push(Inst::Match)?);
                        let next = self.insts.len();
                        self.patch(split, Inst::Split(split + 1, next));
                    }
                    let end = self.insts.len();
                    for exit in exits {
                        self.patch(exit, Inst::Jmp(end));
                    }
                }
                Node::Repeat { sub, min, max, .. } => {
                    for _ in 0..*min {
                        self.emit(sub)?;
                    }
                    match max {
                        None => {
                            let split = self.push(Inst::Match)?;
                            self.emit(sub)?;
                            self.push(Inst::Jmp(split))?;
                            let end = self.insts.len();
                            self.patch(split, Inst::Split(split + 1, end));
                        }
                        Some(max) => {
                            for _ in *min..*max {
                                let split = self.push(Inst::Match)?;
                                self.emit(sub)?;
                                let end = self.insts.len();
                                self.patch(split, Inst::Split(split + 1, end));
                            }
                        }
                    }
                }
            }
            Ok(())
        }
    }

    /// One level of parentheses while parsing.
    #[derive(Default)]
    struct Frame {
        alternatives: Vec<Node>,
        current: Vec<Node>,
    }

    impl Frame {
        fn finish(mut self) -> Node {
            if self.alternatives.is_empty() {
                Node::Concat(self.current)
            } else {
                self.alternatives.push(Node::Concat(self.current));
                Node::Alternate(self.alternatives)
            }
        }

        /// Applies a repetition operator to the last atom (Go's
        /// `parser.repeat`).
        fn repeat(
            &mut self,
            min: u32,
            max: Option<u32>,
            counted: bool,
            after_repeat: bool,
        ) -> Result<(), Invalid> {
            if after_repeat {
                // `a**` is an error in Go's Perl mode, not a double star.
                return Err(Invalid);
            }
            let sub = self.current.pop().ok_or(Invalid)?;
            let node = Node::Repeat {
                sub: Box::new(sub),
                min,
                max,
                counted,
            };
            if counted && (min >= 2 || max.is_some_and(|m| m >= 2)) && !repeat_is_valid(&node, 1000)
            {
                return Err(Invalid);
            }
            self.current.push(node);
            Ok(())
        }
    }

    /// Go's `repeatIsValid`: nested counted repetitions may not multiply
    /// beyond `n` copies.
    fn repeat_is_valid(node: &Node, mut n: u32) -> bool {
        match node {
            Node::Repeat {
                sub,
                min,
                max,
                counted,
            } => {
                if *counted {
                    let m = max.unwrap_or(*min);
                    if m == 0 && max.is_some() {
                        return true;
                    }
                    if m > n {
                        return false;
                    }
                    if let Some(q) = n.checked_div(m) {
                        n = q;
                    }
                }
                repeat_is_valid(sub, n)
            }
            Node::Concat(nodes) | Node::Alternate(nodes) => {
                nodes.iter().all(|node| repeat_is_valid(node, n))
            }
            Node::Class(_) | Node::Look(_) => true,
        }
    }

    /// Go's `parseRepeat` at `s[i] == '{'`: `(min, max, index after)`, with
    /// `max == -1` for `{n,}` and a negative `min` for numbers too large;
    /// `None` when this is not a repetition (then `{` is a literal).
    fn parse_repeat(s: &[char], i: usize) -> Option<(i64, i64, usize)> {
        let (mut min, mut j) = parse_int(s, i + 1)?;
        let max;
        if *s.get(j)? != ',' {
            max = min;
        } else {
            j += 1;
            if *s.get(j)? == '}' {
                max = -1;
            } else {
                let (m, next) = parse_int(s, j)?;
                j = next;
                if m < 0 {
                    min = -1;
                }
                max = m;
            }
        }
        (*s.get(j)? == '}').then_some((min, max, j + 1))
    }

    /// Go's `parseInt`: decimal digits without a leading zero; `-1` when
    /// the value reaches 10^8.
    fn parse_int(s: &[char], mut j: usize) -> Option<(i64, usize)> {
        let first = *s.get(j)?;
        if !first.is_ascii_digit() {
            return None;
        }
        if first == '0' && s.get(j + 1).is_some_and(char::is_ascii_digit) {
            return None;
        }
        let mut n: i64 = 0;
        let mut overflow = false;
        while let Some(d) = s.get(j).and_then(|c| c.to_digit(10)) {
            if n >= 100_000_000 {
                overflow = true;
            }
            if !overflow {
                n = n * 10 + i64::from(d);
            }
            j += 1;
        }
        Some((if overflow { -1 } else { n }, j))
    }

    fn add_class(classes: &mut Vec<Ranges>, ranges: Ranges) -> Node {
        classes.push(ranges);
        Node::Class(classes.len() - 1)
    }

    fn literal(classes: &mut Vec<Ranges>, c: u32) -> Node {
        add_class(classes, vec![(c, c)])
    }

    /// Parses Go regular-expression syntax (Perl flags: `^`/`$` anchor the
    /// text, `.` excludes `\n`, negated classes include it).
    fn parse(expr: &str, classes: &mut Vec<Ranges>) -> Result<Node, Invalid> {
        let s: Vec<char> = expr.chars().collect();
        let mut frames: Vec<Frame> = vec![Frame::default()];
        let mut last_was_repeat = false;
        let mut i = 0;
        while let Some(&c) = s.get(i) {
            let mut repeat = false;
            let frame = frames.last_mut().ok_or(Invalid)?;
            match c {
                '(' => {
                    if s.get(i + 1) == Some(&'?') || frames.len() > MAX_DEPTH {
                        // Flag groups are never produced by `Pattern::compile`.
                        return Err(Invalid);
                    }
                    frames.push(Frame::default());
                    i += 1;
                }
                ')' => {
                    if frames.len() < 2 {
                        return Err(Invalid);
                    }
                    let group = frames.pop().ok_or(Invalid)?.finish();
                    frames.last_mut().ok_or(Invalid)?.current.push(group);
                    i += 1;
                }
                '|' => {
                    let done = std::mem::take(&mut frame.current);
                    frame.alternatives.push(Node::Concat(done));
                    i += 1;
                }
                '^' => {
                    frame.current.push(Node::Look(Look::BeginText));
                    i += 1;
                }
                '$' => {
                    frame.current.push(Node::Look(Look::EndText));
                    i += 1;
                }
                '.' => {
                    let any = add_class(classes, vec![(0, 9), (11, MAX_RUNE)]);
                    frame.current.push(any);
                    i += 1;
                }
                '[' => {
                    let (ranges, next) = parse_class(&s, i)?;
                    let class = add_class(classes, ranges);
                    frame.current.push(class);
                    i = next;
                }
                '*' | '+' | '?' => {
                    let (min, max) = match c {
                        '*' => (0, None),
                        '+' => (1, None),
                        _ => (0, Some(1)),
                    };
                    i += 1;
                    // A trailing `?` makes it non-greedy: same matches.
                    if s.get(i) == Some(&'?') {
                        i += 1;
                    }
                    frame.repeat(min, max, false, last_was_repeat)?;
                    repeat = true;
                }
                '{' => match parse_repeat(&s, i) {
                    None => {
                        let brace = literal(classes, '{' as u32);
                        frame.current.push(brace);
                        i += 1;
                    }
                    Some((min, max, next)) => {
                        if !(0..=MAX_REPEAT).contains(&min)
                            || max > MAX_REPEAT
                            || (max >= 0 && min > max)
                        {
                            return Err(Invalid);
                        }
                        i = next;
                        if s.get(i) == Some(&'?') {
                            i += 1;
                        }
                        let min = u32::try_from(min).map_err(|_| Invalid)?;
                        let max = u32::try_from(max).ok();
                        frame.repeat(min, max, true, last_was_repeat)?;
                        repeat = true;
                    }
                },
                '\\' => i = parse_top_escape(&s, i, &mut frame.current, classes)?,
                _ => {
                    let lit = literal(classes, c as u32);
                    frame.current.push(lit);
                    i += 1;
                }
            }
            last_was_repeat = repeat;
        }
        if frames.len() != 1 {
            return Err(Invalid);
        }
        Ok(frames.pop().ok_or(Invalid)?.finish())
    }

    /// An escape outside a class, at `s[i] == '\\'`; returns the index after
    /// it.
    fn parse_top_escape(
        s: &[char],
        i: usize,
        top: &mut Vec<Node>,
        classes: &mut Vec<Ranges>,
    ) -> Result<usize, Invalid> {
        let look = match s.get(i + 1) {
            Some('A') => Some(Look::BeginText),
            Some('z') => Some(Look::EndText),
            Some('b') => Some(Look::WordBoundary),
            Some('B') => Some(Look::NotWordBoundary),
            Some('C') | Some('p') | Some('P') => return Err(Invalid),
            Some('Q') => {
                // `\Q...\E`: everything up to `\E` (or the end) is literal.
                let mut j = i + 2;
                while let Some(&c) = s.get(j) {
                    if c == '\\' && s.get(j + 1) == Some(&'E') {
                        return Ok(j + 2);
                    }
                    top.push(literal(classes, c as u32));
                    j += 1;
                }
                return Ok(j);
            }
            _ => None,
        };
        if let Some(look) = look {
            top.push(Node::Look(look));
            return Ok(i + 2);
        }
        if let Some(ranges) = s.get(i + 1).and_then(|&c| perl_class(c)) {
            top.push(add_class(classes, ranges));
            return Ok(i + 2);
        }
        let (c, next) = parse_escape(s, i)?;
        top.push(literal(classes, c));
        Ok(next)
    }

    /// `parseEscape`: a single-character escape at `s[i] == '\\'`.
    fn parse_escape(s: &[char], i: usize) -> Result<(u32, usize), Invalid> {
        let c = *s.get(i + 1).ok_or(Invalid)?;
        let mut j = i + 2;
        let octal = |c: Option<&char>| c.is_some_and(|c| ('0'..='7').contains(c));
        match c {
            '1'..='7' | '0' => {
                if c != '0' && !octal(s.get(j)) {
                    // A backreference: not supported.
                    return Err(Invalid);
                }
                let mut r = c as u32 - '0' as u32;
                for _ in 1..3 {
                    match s.get(j) {
                        Some(&d) if octal(Some(&d)) => {
                            r = r * 8 + (d as u32 - '0' as u32);
                            j += 1;
                        }
                        _ => break,
                    }
                }
                Ok((r, j))
            }
            'x' => {
                let first = *s.get(j).ok_or(Invalid)?;
                j += 1;
                if first == '{' {
                    let mut r: u32 = 0;
                    let mut digits = 0;
                    loop {
                        let d = *s.get(j).ok_or(Invalid)?;
                        j += 1;
                        if d == '}' {
                            break;
                        }
                        r = r * 16 + d.to_digit(16).ok_or(Invalid)?;
                        if r > MAX_RUNE {
                            return Err(Invalid);
                        }
                        digits += 1;
                    }
                    if digits == 0 {
                        return Err(Invalid);
                    }
                    return Ok((r, j));
                }
                let second = *s.get(j).ok_or(Invalid)?;
                j += 1;
                let hi = first.to_digit(16).ok_or(Invalid)?;
                let lo = second.to_digit(16).ok_or(Invalid)?;
                Ok((hi * 16 + lo, j))
            }
            'a' => Ok((7, j)),
            'f' => Ok((12, j)),
            'n' => Ok((10, j)),
            'r' => Ok((13, j)),
            't' => Ok((9, j)),
            'v' => Ok((11, j)),
            c if c.is_ascii() && !c.is_ascii_alphanumeric() => Ok((c as u32, j)),
            _ => Err(Invalid),
        }
    }

    /// `\d \s \w` and their negations (ASCII, as in Go).
    fn perl_class(c: char) -> Option<Ranges> {
        let (ranges, negate): (&[(u32, u32)], bool) = match c {
            'd' => (&DIGIT, false),
            'D' => (&DIGIT, true),
            's' => (&PERL_SPACE, false),
            'S' => (&PERL_SPACE, true),
            'w' => (&WORD, false),
            'W' => (&WORD, true),
            _ => return None,
        };
        let ranges = ranges.to_vec();
        Some(if negate { negated(ranges) } else { ranges })
    }

    const DIGIT: [(u32, u32); 1] = [(0x30, 0x39)];
    const PERL_SPACE: [(u32, u32); 3] = [(0x09, 0x0a), (0x0c, 0x0d), (0x20, 0x20)];
    const WORD: [(u32, u32); 4] = [(0x30, 0x39), (0x41, 0x5a), (0x5f, 0x5f), (0x61, 0x7a)];

    /// Go's POSIX classes (`[:alpha:]` inside brackets).
    fn posix_class(name: &str) -> Option<Ranges> {
        let (name, negate) = match name.strip_prefix('^') {
            Some(name) => (name, true),
            None => (name, false),
        };
        let ranges: &[(u32, u32)] = match name {
            "alnum" => &[(0x30, 0x39), (0x41, 0x5a), (0x61, 0x7a)],
            "alpha" => &[(0x41, 0x5a), (0x61, 0x7a)],
            "ascii" => &[(0x00, 0x7f)],
            "blank" => &[(0x09, 0x09), (0x20, 0x20)],
            "cntrl" => &[(0x00, 0x1f), (0x7f, 0x7f)],
            "digit" => &DIGIT,
            "graph" => &[(0x21, 0x7e)],
            "lower" => &[(0x61, 0x7a)],
            "print" => &[(0x20, 0x7e)],
            "punct" => &[(0x21, 0x2f), (0x3a, 0x40), (0x5b, 0x60), (0x7b, 0x7e)],
            "space" => &[(0x09, 0x0d), (0x20, 0x20)],
            "upper" => &[(0x41, 0x5a)],
            "word" => &WORD,
            "xdigit" => &[(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)],
            _ => return None,
        };
        let ranges = ranges.to_vec();
        Some(if negate { negated(ranges) } else { ranges })
    }

    /// The complement of `ranges` within `0..=MAX_RUNE`.
    fn negated(mut ranges: Ranges) -> Ranges {
        ranges.sort_unstable();
        let mut out = Vec::new();
        let mut next: u32 = 0;
        for (lo, hi) in ranges {
            if lo > next {
                out.push((next, lo - 1));
            }
            next = next.max(hi.saturating_add(1));
        }
        if next <= MAX_RUNE {
            out.push((next, MAX_RUNE));
        }
        out
    }

    /// `parseClass` at `s[i] == '['`; returns the ranges and the index after
    /// the closing `]`.
    fn parse_class(s: &[char], i: usize) -> Result<(Ranges, usize), Invalid> {
        let mut j = i + 1;
        let negate = s.get(j) == Some(&'^');
        if negate {
            j += 1;
        }
        let mut ranges = Vec::new();
        let mut first = true;
        loop {
            match s.get(j) {
                None => return Err(Invalid),
                Some(']') if !first => {
                    j += 1;
                    break;
                }
                _ => {}
            }
            first = false;
            if s.get(j) == Some(&'[') && s.get(j + 1) == Some(&':') && s.len() - j > 2 {
                let close = (j + 2..s.len().saturating_sub(1))
                    .find(|&k| s.get(k) == Some(&':') && s.get(k + 1) == Some(&']'));
                if let Some(k) = close {
                    let name: String = s.get(j + 2..k).unwrap_or(&[]).iter().collect();
                    ranges.extend(posix_class(&name).ok_or(Invalid)?);
                    j = k + 2;
                    continue;
                }
            }
            if s.get(j) == Some(&'\\') {
                match s.get(j + 1) {
                    Some('p') | Some('P') => return Err(Invalid),
                    Some(&c) => {
                        if let Some(class) = perl_class(c) {
                            ranges.extend(class);
                            j += 2;
                            continue;
                        }
                    }
                    None => {}
                }
            }
            let (lo, next) = class_char(s, j)?;
            j = next;
            let mut hi = lo;
            if s.get(j) == Some(&'-') && s.get(j + 1).is_some_and(|&c| c != ']') {
                let (h, next) = class_char(s, j + 1)?;
                if h < lo {
                    return Err(Invalid);
                }
                hi = h;
                j = next;
            }
            ranges.push((lo, hi));
        }
        if negate {
            ranges = negated(ranges);
        }
        Ok((ranges, j))
    }

    /// `parseClassChar`.
    fn class_char(s: &[char], j: usize) -> Result<(u32, usize), Invalid> {
        match s.get(j) {
            None => Err(Invalid),
            Some('\\') => parse_escape(s, j),
            Some(&c) => Ok((c as u32, j + 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name that is not UTF-8 is matched as Go sees it: each invalid
    /// byte one U+FFFD, which `?`, `*` and `**` match; UTF-8 `é` is not
    /// Latin-1 `é`.
    #[test]
    fn names_that_are_not_utf8_match_one_rune_per_bad_byte() {
        assert_eq!(match_text(b"plain"), Cow::Borrowed("plain"));
        assert_eq!(match_text(b"caf\xe9"), "caf\u{fffd}");
        // A cut-short sequence is two bad bytes, two runes (Go's
        // DecodeRune), not one as `from_utf8_lossy` would give.
        assert_eq!(match_text(b"a\xe9\x80b"), "a\u{fffd}\u{fffd}b");
        let m = PatternMatcher::new(&["caf?", "dir*/x", "**/deep?"]).unwrap();
        assert!(m.matches_or_parent_matches_bytes(b"caf\xe9").unwrap());
        assert!(!m.matches_or_parent_matches_bytes(b"caf\xe9\x80").unwrap());
        assert!(m
            .matches_or_parent_matches_bytes(b"dir\xff/x/below")
            .unwrap());
        assert!(m
            .matches_or_parent_matches_bytes(b"a\xfe/b/deep\xfe")
            .unwrap());
        assert!(!m.matches_or_parent_matches_bytes(b"cafe\xe9").unwrap());
        let utf8 = PatternMatcher::new(&["caf\u{e9}"]).unwrap();
        assert!(utf8
            .matches_or_parent_matches_bytes("caf\u{e9}".as_bytes())
            .unwrap());
        assert!(!utf8.matches_or_parent_matches_bytes(b"caf\xe9").unwrap());
    }

    /// Found while fuzzing: upstream leaves `{n,m}` unescaped, so a 1 KiB
    /// line of `?{0,1000}` repetitions compiles to ~200k matcher states, all
    /// live at once; one 1000-byte file name cost 300 million steps (1.5 s
    /// optimised, a minute under the fuzzer's sanitizers; the cost grows
    /// with pattern length times name length). It now fails fast with a
    /// typed error.
    #[test]
    fn costly_counted_repetition_pattern_fails_fast_instead_of_hanging() {
        let pattern = format!("{}x", "?{0,1000}".repeat(100));
        let path = "a".repeat(1000);
        let pm = PatternMatcher::new(&[pattern.as_str()]).unwrap();
        let start = std::time::Instant::now();
        let err = pm.matches_or_parent_matches(&path).unwrap_err();
        assert!(matches!(err, IgnoreError::TooComplex { .. }), "{err:?}");
        assert!(err.to_string().contains("too costly"), "{err}");
        assert!(pm
            .matches_using_parent_results(&path, &MatchInfo::default())
            .is_err());
        let filter = ContextFilter::new::<&str, _>(&[], &[pattern.as_str()]).unwrap();
        assert!(filter.decide(&path, false).is_err());
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "took {:?}",
            start.elapsed()
        );
        // the same pattern on a short name is still decided
        assert!(!pm.matches_or_parent_matches("aaa").unwrap());
    }

    /// The budget is far above what real patterns need: many stars against
    /// a long path, and a deep path against a `**` pattern.
    #[test]
    fn budget_leaves_real_patterns_alone() {
        let stars = format!("{}b", "*a".repeat(1000));
        let long = format!("{}b", "a".repeat(4000));
        let pm = PatternMatcher::new(&[stars.as_str()]).unwrap();
        assert!(pm.matches_or_parent_matches(&long).unwrap());
        let deep = format!("{}x.log", "d/".repeat(2000));
        let pm = PatternMatcher::new(&["**/*.log", "!**/keep/**", "d/*/d"]).unwrap();
        assert!(pm.matches_or_parent_matches(&deep).unwrap());
    }
}
