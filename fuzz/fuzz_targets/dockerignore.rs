//! Fuzz target: the `.dockerignore` reader and matcher never panic (and do
//! not hang) on any pattern file, include list or path.
//!
//! The input is split at NUL bytes: the `.dockerignore` text, the include
//! patterns (one a line), then the paths to decide (one a line; a trailing
//! `/` marks a directory).
//!
//! A decision that runs out of `MATCH_BUDGET` ends the input (kiln fails
//! the build there): each costs up to a few seconds under the sanitizers,
//! so run this target with `-timeout=30`.
#![no_main]

use kiln_parser::dockerignore::{
    read_ignore_file, ContextFilter, DirState, IgnoreError, MatchInfo, PatternMatcher,
};

/// Stops the input at the first over-budget decision.
fn go_on<T>(r: &Result<T, IgnoreError>) -> bool {
    !matches!(r, Err(IgnoreError::TooComplex { .. }))
}
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let ignore = parts.next().unwrap_or("");
    let includes: Vec<&str> = parts.next().unwrap_or("").lines().collect();
    let paths: Vec<&str> = parts.next().unwrap_or("").lines().take(16).collect();
    let excludes = read_ignore_file(ignore);

    if let Ok(m) = PatternMatcher::new(&excludes) {
        let _ = m.exclusions();
        for p in &paths {
            if !go_on(&m.matches_or_parent_matches(p)) {
                return;
            }
            let _ = m.may_reinclude_below(p);
            let _ = m.may_match_below(p);
            // incremental, as a walker does it
            let mut info = MatchInfo::default();
            let mut prefix = String::new();
            for comp in p.split('/') {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(comp);
                match m.matches_using_parent_results(&prefix, &info) {
                    Ok((_, next)) => info = next,
                    Err(IgnoreError::TooComplex { .. }) => return,
                    Err(_) => break,
                }
            }
        }
    }
    if let Ok(f) = ContextFilter::new(&includes, &excludes) {
        for p in &paths {
            let (p, is_dir) = match p.strip_suffix('/') {
                Some(d) => (d, true),
                None => (*p, false),
            };
            if !go_on(&f.decide(p, is_dir))
                || !go_on(&f.decide_in(p, is_dir, &DirState::default()))
                || !go_on(&f.open_allowed(p))
            {
                return;
            }
        }
    }
});
