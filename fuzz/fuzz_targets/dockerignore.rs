//! Fuzz target: the `.dockerignore` reader and matcher never panic (and do
//! not hang) on any pattern file, include list or path.
//!
//! The input is split at NUL bytes: the `.dockerignore` text, the include
//! patterns (one a line), then the paths to decide (one a line; a trailing
//! `/` marks a directory).
#![no_main]

use kiln_parser::dockerignore::{
    read_ignore_file, ContextFilter, DirState, MatchInfo, PatternMatcher,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let ignore = parts.next().unwrap_or("");
    let includes: Vec<&str> = parts.next().unwrap_or("").lines().collect();
    let paths: Vec<&str> = parts.next().unwrap_or("").lines().collect();
    let excludes = read_ignore_file(ignore);

    if let Ok(m) = PatternMatcher::new(&excludes) {
        let _ = m.exclusions();
        for p in &paths {
            let _ = m.matches_or_parent_matches(p);
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
            let _ = f.decide(p, is_dir);
            let _ = f.decide_in(p, is_dir, &DirState::default());
            let _ = f.open_allowed(p);
        }
    }
});
