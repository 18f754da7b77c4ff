//! Conformance of `kiln_parser::dockerignore` against the corpus in
//! `../shared/conformance/dockerignore/cases.json` (cases transcribed from
//! moby/patternmatcher, tonistiigi/fsutil and moby/buildkit tests).
//!
//! Every case of every section is run; all mismatches are listed before the
//! test fails. Walk cases run a small walker over a real temporary tree.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_parser::dockerignore::{
    ignore_file_candidates, read_ignore_file, ContextFilter, Decision, DirState, IgnoreError,
    MatchInfo, PatternMatcher,
};
use proptest::prelude::*;
use serde_json::Value;

/// Pass/fail bookkeeping for one section.
struct Section {
    name: &'static str,
    total: usize,
    failures: Vec<String>,
}

impl Section {
    fn new(name: &'static str) -> Section {
        Section {
            name,
            total: 0,
            failures: Vec::new(),
        }
    }

    /// Records one case: `Ok(())` passes, `Err(why)` fails.
    fn record(&mut self, label: String, outcome: Result<(), String>) {
        self.total += 1;
        if let Err(why) = outcome {
            self.failures
                .push(format!("[{}] {label}: {why}", self.name));
        }
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn cases(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) => items,
        Value::Object(map) => map
            .get("cases")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice),
        _ => &[],
    }
}

/// One `{patterns, path, expected | expect_error}` case through
/// `PatternMatcher::matches_or_parent_matches`.
fn check_match_case(case: &Value) -> Result<(), String> {
    let patterns = strings(&case["patterns"]);
    let path = case["path"].as_str().ok_or("case without path")?;
    let expect_error = case["expect_error"].as_bool().unwrap_or(false);
    let got = PatternMatcher::new(&patterns).and_then(|pm| pm.matches_or_parent_matches(path));
    match (got, expect_error) {
        (Err(_), true) => Ok(()),
        (Ok(m), true) => Err(format!("expected an error, got {m}")),
        (Err(e), false) => Err(format!("unexpected error: {e}")),
        (Ok(m), false) => {
            let expected = case["expected"].as_bool().ok_or("case without expected")?;
            if m == expected {
                Ok(())
            } else {
                Err(format!("got {m}, expected {expected}"))
            }
        }
    }
}

fn run_match_section(name: &'static str, corpus: &Value) -> Section {
    let mut section = Section::new(name);
    for case in cases(&corpus[name]) {
        let label = format!("{} on {}", case["patterns"], case["path"]);
        section.record(label, check_match_case(case));
    }
    section
}

fn run_error_cases(corpus: &Value) -> Section {
    let mut section = Section::new("error_cases");
    for case in cases(&corpus["error_cases"]) {
        let patterns = strings(&case["patterns"]);
        let outcome = match PatternMatcher::new(&patterns) {
            Err(_) => Ok(()),
            Ok(_) => Err(format!("accepted ({})", case["why"])),
        };
        section.record(format!("{}", case["patterns"]), outcome);
    }
    section
}

fn run_lazy_error_case(corpus: &Value) -> Section {
    let mut section = Section::new("lazy_error_case");
    let case = &corpus["lazy_error_case"];
    let patterns = strings(&case["patterns"]);
    let path = case["path"].as_str().unwrap_or("x");
    let outcome = match PatternMatcher::new(&patterns) {
        Err(e) => Err(format!("rejected at construction: {e}")),
        Ok(pm) => {
            let first = pm.matches_or_parent_matches(path);
            let second = pm.matches_or_parent_matches(path);
            let walker = pm.matches_using_parent_results(path, &MatchInfo::default());
            match (first, second, walker) {
                (
                    Err(IgnoreError::BadPattern { .. }),
                    Err(IgnoreError::BadPattern { .. }),
                    Err(_),
                ) => Ok(()),
                (a, b, c) => Err(format!(
                    "expected bad-pattern errors, got {a:?}, {b:?}, {c:?}"
                )),
            }
        }
    };
    section.record(format!("{} on {path:?}", case["patterns"]), outcome);
    section
}

fn run_ignorefile(corpus: &Value) -> Section {
    let mut section = Section::new("ignorefile");
    let case = &corpus["ignorefile"];
    let input = case["input"].as_str().unwrap_or_default();
    let expected = strings(&case["expected"]);
    let got = read_ignore_file(input);
    let outcome = if got == expected {
        Ok(())
    } else {
        Err(format!("got {got:?}, expected {expected:?}"))
    };
    section.record("input".to_owned(), outcome);
    let empty_expected = strings(&case["empty_input_expected"]);
    let got = read_ignore_file("");
    let outcome = if got == empty_expected {
        Ok(())
    } else {
        Err(format!("got {got:?}, expected {empty_expected:?}"))
    };
    section.record("empty input".to_owned(), outcome);
    section
}

/// A temporary directory removed on drop.
struct TempTree {
    root: PathBuf,
}

impl TempTree {
    fn new() -> TempTree {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "kiln-dockerignore-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).expect("creating temporary tree");
        TempTree { root }
    }

    /// Creates the entries of a corpus `tree` list: `dir X`, `file X`,
    /// `symlink X -> T`.
    fn build(&self, tree: &[String]) -> Result<(), String> {
        for entry in tree {
            let (kind, rest) = entry
                .split_once(' ')
                .ok_or_else(|| format!("bad tree entry {entry:?}"))?;
            match kind {
                "dir" => fs::create_dir_all(self.root.join(rest)).map_err(|e| e.to_string())?,
                "file" => self.write(rest, "")?,
                "symlink" => {
                    let (link, target) = rest
                        .split_once(" -> ")
                        .ok_or_else(|| format!("bad symlink entry {entry:?}"))?;
                    let link = self.root.join(link);
                    if let Some(parent) = link.parent() {
                        fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                    }
                    std::os::unix::fs::symlink(target, link).map_err(|e| e.to_string())?;
                }
                _ => return Err(format!("bad tree entry {entry:?}")),
            }
        }
        Ok(())
    }

    fn write(&self, rel: &str, contents: &str) -> Result<(), String> {
        let path = self.root.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        fs::write(path, contents).map_err(|e| e.to_string())
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// How the walker asks the filter.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `ContextFilter::decide` on every entry.
    Stateless,
    /// `ContextFilter::decide_in` with the parent's state.
    Stateful,
}

/// A minimal context walker in the shape of fsutil's: depth-first, entries
/// in lexical order, parent directories emitted before the first included
/// entry below them. Output lines are `dir PATH`, `file PATH`,
/// `symlink PATH`.
fn walk(root: &Path, filter: &ContextFilter, mode: Mode) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut parents = Vec::new();
    visit(
        root,
        "",
        &DirState::default(),
        filter,
        mode,
        &mut parents,
        &mut out,
    )?;
    Ok(out)
}

fn visit(
    dir: &Path,
    rel: &str,
    state: &DirState,
    filter: &ContextFilter,
    mode: Mode,
    parents: &mut Vec<(String, bool)>,
    out: &mut Vec<String>,
) -> Result<(), String> {
    let mut entries = fs::read_dir(dir)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| format!("non-UTF-8 name {n:?}"))?;
        let rel_path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let file_type = entry.file_type().map_err(|e| e.to_string())?;
        let is_dir = file_type.is_dir();
        let (decision, child_state) = match mode {
            Mode::Stateless => (
                filter
                    .decide(&rel_path, is_dir)
                    .map_err(|e| e.to_string())?,
                DirState::default(),
            ),
            Mode::Stateful => filter
                .decide_in(&rel_path, is_dir, state)
                .map_err(|e| e.to_string())?,
        };
        let descend = match decision {
            Decision::Include => {
                for (parent, emitted) in parents.iter_mut() {
                    if !*emitted {
                        out.push(format!("dir {parent}"));
                        *emitted = true;
                    }
                }
                let kind = if is_dir {
                    "dir"
                } else if file_type.is_symlink() {
                    "symlink"
                } else {
                    "file"
                };
                out.push(format!("{kind} {rel_path}"));
                is_dir.then_some(true)
            }
            Decision::Exclude => is_dir.then_some(false),
            Decision::ExcludeSkipDir => None,
        };
        if let Some(emitted) = descend {
            parents.push((rel_path.clone(), emitted));
            visit(
                &entry.path(),
                &rel_path,
                &child_state,
                filter,
                mode,
                parents,
                out,
            )?;
            parents.pop();
        }
    }
    Ok(())
}

/// Walks `tree` with `filter` both ways; both must agree.
fn walk_tree(tree: &[String], filter: &ContextFilter) -> Result<Vec<String>, String> {
    let temp = TempTree::new();
    temp.build(tree)?;
    let stateless = walk(&temp.root, filter, Mode::Stateless)?;
    let stateful = walk(&temp.root, filter, Mode::Stateful)?;
    if stateless != stateful {
        return Err(format!(
            "decide and decide_in disagree: {stateless:?} vs {stateful:?}"
        ));
    }
    Ok(stateless)
}

fn check_walk_case(case: &Value) -> Result<(), String> {
    let tree = strings(&case["tree"]);
    let filter = ContextFilter::new(&strings(&case["include"]), &strings(&case["exclude"]))
        .map_err(|e| format!("filter rejected: {e}"))?;
    let got = walk_tree(&tree, &filter)?;
    let expected = strings(&case["expected"]);
    if got == expected {
        Ok(())
    } else {
        Err(format!("walked {got:?}, expected {expected:?}"))
    }
}

fn run_walk_cases(corpus: &Value) -> Section {
    let mut section = Section::new("walk_cases");
    for case in cases(&corpus["walk_cases"]) {
        let label = case["name"].as_str().unwrap_or("?").to_owned();
        section.record(label, check_walk_case(case));
    }
    section
}

fn check_open_case(case: &Value) -> Result<(), String> {
    let tree = strings(&case["tree"]);
    let filter = ContextFilter::new(&strings(&case["include"]), &strings(&case["exclude"]))
        .map_err(|e| format!("filter rejected: {e}"))?;
    let walked = walk_tree(&tree, &filter)?;
    let mut problems = Vec::new();
    if case.get("walk_expected").is_some() {
        let expected = strings(&case["walk_expected"]);
        if walked != expected {
            problems.push(format!("walked {walked:?}, expected {expected:?}"));
        }
    }
    for (key, want) in [("present", true), ("absent", false)] {
        for path in strings(&case[key]) {
            let in_walk = walked.contains(&format!("file {path}"));
            if in_walk != want {
                problems.push(format!("{path}: in walk = {in_walk}, expected {want}"));
            }
            match filter.open_allowed(&path) {
                Ok(open) if open == want => {}
                other => {
                    problems.push(format!("{path}: open_allowed = {other:?}, expected {want}"))
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn run_open_cases(corpus: &Value) -> Section {
    let mut section = Section::new("open_cases");
    for (i, case) in cases(&corpus["open_cases"]).iter().enumerate() {
        let label = format!(
            "#{i} include {} exclude {}",
            case["include"], case["exclude"]
        );
        section.record(label, check_open_case(case));
    }
    section
}

/// The context a build would send: `files` (plus `extra`) walked through
/// the given ignore patterns. Only regular files are returned.
fn context_files(
    files: &BTreeMap<String, String>,
    patterns: &[String],
) -> Result<Vec<String>, String> {
    let temp = TempTree::new();
    for (name, contents) in files {
        temp.write(name, contents)?;
    }
    let filter = ContextFilter::new(&[] as &[&str], patterns).map_err(|e| e.to_string())?;
    let walked = walk(&temp.root, &filter, Mode::Stateful)?;
    Ok(walked
        .iter()
        .filter_map(|line| line.strip_prefix("file ").map(str::to_owned))
        .collect())
}

/// `[ -f foo ] && [ ! -f bar ]` in the RUN line of `dockerfile` → the files
/// that must be present and absent.
fn run_file_tests(dockerfile: &str) -> (Vec<String>, Vec<String>) {
    let mut present = Vec::new();
    let mut absent = Vec::new();
    for line in dockerfile.lines() {
        let Some(command) = line.strip_prefix("RUN ") else {
            continue;
        };
        for test in command.split("&&") {
            let words: Vec<&str> = test
                .split_whitespace()
                .filter(|w| *w != "[" && *w != "]")
                .collect();
            match words.as_slice() {
                ["-f", file] => present.push((*file).to_owned()),
                ["!", "-f", file] => absent.push((*file).to_owned()),
                _ => {}
            }
        }
    }
    (present, absent)
}

fn check_context_case(case: &Value) -> Result<(), String> {
    let mut files: BTreeMap<String, String> = case["files"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let mut problems = Vec::new();
    if let Some(ignore_text) = case["dockerignore"].as_str() {
        let patterns = read_ignore_file(ignore_text);
        if case["expect_error"].as_bool().unwrap_or(false) {
            return match PatternMatcher::new(&patterns) {
                Err(_) => Ok(()),
                Ok(_) => Err(format!("{patterns:?} accepted")),
            };
        }
        if let Some(dockerfile) = case["dockerfile"].as_str() {
            files.insert("Dockerfile".to_owned(), dockerfile.to_owned());
        }
        files.insert(".dockerignore".to_owned(), ignore_text.to_owned());
        let pm = PatternMatcher::new(&patterns).map_err(|e| e.to_string())?;
        let sent = context_files(&files, &patterns)?;
        let present: Vec<String> = case["present"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for (list, want_excluded) in [(present, false), (strings(&case["absent"]), true)] {
            for path in list {
                match pm.matches_or_parent_matches(&path) {
                    Ok(excluded) if excluded == want_excluded => {}
                    other => problems.push(format!(
                        "{path}: excluded = {other:?}, expected {want_excluded}"
                    )),
                }
                if sent.contains(&path) == want_excluded {
                    problems.push(format!("{path}: sent = {}", !want_excluded));
                }
            }
        }
    }
    for build in cases(&case["builds"]) {
        let name = build["dockerfile_name"]
            .as_str()
            .ok_or("build without name")?;
        let candidates = ignore_file_candidates(name);
        let ignore_text = candidates
            .iter()
            .find_map(|c| files.get(c))
            .cloned()
            .unwrap_or_default();
        let patterns = read_ignore_file(&ignore_text);
        let sent = context_files(&files, &patterns)?;
        let (present, absent) = run_file_tests(files.get(name).map_or("", String::as_str));
        if present.is_empty() && absent.is_empty() {
            problems.push(format!("{name}: no file tests found"));
        }
        for path in present {
            if !sent.contains(&path) {
                problems.push(format!(
                    "{name}: {path} not sent (candidates {candidates:?})"
                ));
            }
        }
        for path in absent {
            if sent.contains(&path) {
                problems.push(format!("{name}: {path} sent (candidates {candidates:?})"));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn run_context_cases(corpus: &Value) -> Section {
    let mut section = Section::new("context_cases (ignore rules only)");
    for case in cases(&corpus["context_cases"]) {
        let label = case["name"].as_str().unwrap_or("?").to_owned();
        section.record(label, check_context_case(case));
    }
    section
}

/// Extra cases not in the corpus, each run through upstream patternmatcher
/// (the corpus commit, with current Go's whole-pattern `filepath.Match`
/// validation): `(patterns, path, Some(excluded))`, or `None` for an error
/// (at construction or when matching). They pin upstream quirks: `|`, `{`
/// and `}` reach Go's regexp unescaped; `\` escapes are regexp escapes;
/// `**x` is a plain suffix test; a regexp may lack its end anchor.
const EXTRA_CASES: &[(&[&str], &str, Option<bool>)] = &[
    (&["a*|b"], "xb", Some(true)),
    (&["a*|b"], "ab/c", Some(true)),
    (&["a*|b"], "c", Some(false)),
    (&["a|b"], "a|b", Some(true)),
    (&["a|b"], "b", Some(false)),
    (&["x{2}*"], "xx", Some(true)),
    (&["x{2}*"], "x", Some(false)),
    (&["x{2}"], "x{2}", Some(true)),
    (&["a*{2}"], "a", None),
    (&["ab{2,}c*"], "abbbc", Some(true)),
    (&["a{01}*"], "a{01}", Some(true)),
    (&["a{1001}*"], "a", None),
    (&["\\d*"], "7z", Some(true)),
    (&["\\d*"], "z", Some(false)),
    (&["[[:digit:]]*"], "5", Some(true)),
    (&["[[:bogus:]]"], "b", None),
    (&["\\Qa*"], "a[^/]*$", Some(true)),
    (&["\\Qa*"], "ab", Some(false)),
    (&["\\y*"], "y", None),
    (&["\\x41*"], "A", Some(true)),
    (&["\\n*"], "n", Some(false)),
    (&["**foo"], "barfoo", Some(true)),
    (&["**/foo"], "barfoo", Some(false)),
    (&["^a*"], "abc", Some(true)),
    (&["^a"], "a", Some(false)),
    (&["^a"], "^a", Some(true)),
    (&["[*]x"], "[]x", Some(true)),
    (&["[*]x"], "*x", Some(false)),
    (&["\u{feff}a*"], "ab", Some(true)),
    (&["\u{feff}a"], "a", Some(false)),
    (&["a/**"], "a", Some(false)),
    (&["a**"], "abc", Some(true)),
    (&["*", "!a", "a/b"], "a/b/c", Some(true)),
    (&["/a"], "a", Some(false)),
    (&["/a"], "/a", Some(true)),
    (&["./a"], "a", Some(true)),
    (&["a/../b"], "b", Some(true)),
    (&["! a"], "a", Some(false)),
    (&["!./a"], "a", Some(false)),
    (&["\\"], "x", None),
    (&["x*["], "x", None),
    (&["[a-"], "a", None),
    (&["[z-a]*"], "b", None),
    (&["[\\z]"], "z", None),
    (&["**/*.go"], "dir/x.go", Some(true)),
    (&["dir/*"], "dir/sub/x", Some(true)),
    (&["a*", "!ab*", "[z-a]"], "ab", None),
    (&["a*", "!ab*", "[z-a]"], "ac", Some(true)),
];

/// Extra walks not in the corpus, checked against a Go transliteration of
/// fsutil's `filterFS.Walk` over upstream patternmatcher:
/// `(tree, includes, excludes, expected)`.
const EXTRA_WALKS: &[ExtraWalk] = &[
    // The walker's incremental matching differs from MatchesOrParentMatches
    // (which would keep `a/b`): `!a` was skipped for `a`, so `a/b` only
    // sees it against itself.
    (&["dir a", "file a/b"], &[], &["a/b", "!a"], &["dir a"]),
    (
        &["dir a", "dir a/x", "file a/x/y", "file a/z"],
        &[],
        &["a", "!a/x/y"],
        &["dir a", "dir a/x", "file a/x/y"],
    ),
    (
        &["dir a", "dir a/x", "file a/x/y", "file a/z"],
        &[],
        &["a", "!a/*/y"],
        &["dir a", "dir a/x", "file a/x/y"],
    ),
    (
        &["dir a", "dir a/x", "file a/x/y", "file b"],
        &["a/x"],
        &["**/y"],
        &["dir a", "dir a/x"],
    ),
    // Include patterns that are all blank include nothing.
    (
        &["dir a", "dir a/x", "file a/x/y", "file b"],
        &["   "],
        &[],
        &[],
    ),
];

/// `(tree, includes, excludes, expected walk)`.
type ExtraWalk = (
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
);

fn run_extra_walks() -> Section {
    let mut section = Section::new("extra walks (kiln, upstream-verified)");
    for &(tree, includes, excludes, expected) in EXTRA_WALKS {
        let tree: Vec<String> = tree.iter().map(|e| (*e).to_owned()).collect();
        let outcome = ContextFilter::new(includes, excludes)
            .map_err(|e| format!("filter rejected: {e}"))
            .and_then(|filter| walk_tree(&tree, &filter))
            .and_then(|got| {
                if got == expected {
                    Ok(())
                } else {
                    Err(format!("walked {got:?}, expected {expected:?}"))
                }
            });
        section.record(
            format!("include {includes:?} exclude {excludes:?}"),
            outcome,
        );
    }
    section
}

fn run_extra_cases() -> Section {
    let mut section = Section::new("extra (kiln, upstream-verified)");
    for &(patterns, path, expected) in EXTRA_CASES {
        let got = PatternMatcher::new(patterns).and_then(|pm| pm.matches_or_parent_matches(path));
        let outcome = match (got, expected) {
            (Ok(m), Some(e)) if m == e => Ok(()),
            (Err(_), None) => Ok(()),
            (got, _) => Err(format!("got {got:?}, expected {expected:?}")),
        };
        section.record(format!("{patterns:?} on {path:?}"), outcome);
    }
    section
}

#[test]
fn conformance_dockerignore() {
    let Some(dir) = common::conformance_dir("dockerignore") else {
        return;
    };
    let corpus = common::read_json(&dir.join("cases.json"));
    let sections = [
        run_match_section("match_cases", &corpus),
        run_match_section("filepath_match_cases", &corpus),
        run_error_cases(&corpus),
        run_lazy_error_case(&corpus),
        run_ignorefile(&corpus),
        run_walk_cases(&corpus),
        run_open_cases(&corpus),
        run_context_cases(&corpus),
        run_extra_cases(),
        run_extra_walks(),
    ];
    let mut failures = Vec::new();
    for section in &sections {
        let passed = section.total - section.failures.len();
        eprintln!(
            "{:<40} {passed:>3}/{:<3} passed",
            section.name, section.total
        );
        failures.extend(section.failures.iter().cloned());
    }
    let required = ["match_cases", "filepath_match_cases", "walk_cases"];
    for name in required {
        let total: usize = sections
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.total)
            .sum();
        assert!(total > 0, "section {name} has no cases");
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn ignore_file_candidates_order() {
    assert_eq!(
        ignore_file_candidates("Dockerfile"),
        ["Dockerfile.dockerignore", ".dockerignore"]
    );
    assert_eq!(
        ignore_file_candidates("build/Dockerfile.dev"),
        ["build/Dockerfile.dev.dockerignore", ".dockerignore"]
    );
    assert_eq!(ignore_file_candidates(""), [".dockerignore"]);
}

fn pattern_text() -> impl Strategy<Value = String> {
    let alphabet = vec![
        'a', 'b', 'x', '/', '*', '?', '[', ']', '^', '-', '\\', '!', '.', ':', '(', ')', '|', '{',
        '}', '$', '+', 'Q', 'E', 'p', 'd', 'z', '0', '7', ' ', '#', '\u{feff}', '\u{e9}', '\n',
    ];
    prop_oneof![
        prop::collection::vec(prop::sample::select(alphabet), 0..14)
            .prop_map(|chars| chars.into_iter().collect()),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary pattern lists and paths never panic, whatever the API.
    #[test]
    fn arbitrary_input_never_panics(
        patterns in prop::collection::vec(pattern_text(), 0..4),
        includes in prop::collection::vec(pattern_text(), 0..2),
        path in pattern_text(),
    ) {
        let text = patterns.join("\n");
        let read = read_ignore_file(&text);
        let _ = ignore_file_candidates(&path);
        for list in [&patterns, &read] {
            if let Ok(pm) = PatternMatcher::new(list) {
                let _ = pm.matches_or_parent_matches(&path);
                let _ = pm.matches_or_parent_matches(&path);
                let _ = pm.may_reinclude_below(&path);
                let _ = pm.may_match_below(&path);
                let mut info = MatchInfo::default();
                let mut prefix = String::new();
                for part in path.split('/') {
                    if !prefix.is_empty() {
                        prefix.push('/');
                    }
                    prefix.push_str(part);
                    match pm.matches_using_parent_results(&prefix, &info) {
                        Ok((_, next)) => info = next,
                        Err(_) => break,
                    }
                }
            }
            if let Ok(filter) = ContextFilter::new(&includes, list) {
                let _ = filter.decide(&path, true);
                let _ = filter.decide(&path, false);
                let _ = filter.open_allowed(&path);
            }
        }
    }
}
