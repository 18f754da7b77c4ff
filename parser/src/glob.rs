//! Go's `path/filepath.Match` (unix flavour): the one wildcard matcher of
//! kiln, for `COPY`/`ADD` sources and the syntax check of `.dockerignore`
//! patterns.
//!
//! `*` matches any run of characters but `/`, `?` one character but `/`,
//! `[…]` a class (`^` negates, `a-z` ranges, `\` escapes), `\x` the
//! character `x`. Matching is `O(pattern × name)`: like Go, a star's chunk
//! is matched at the leftmost place it fits and never revisited (sound
//! because chunks between stars have a fixed length), so a pattern built
//! to be slow (`*a*a*a…*b`) costs no more than any other.
//!
//! Errors are Go's `ErrBadPattern`: a malformed class or a trailing `\`.
//! As in Go, a bad pattern may still report a match when the name decides
//! the answer before the bad part is reached; a failed match checks the
//! rest of the pattern.
//!
//! ```
//! use kiln_parser::glob::{match_pattern, BadPattern};
//!
//! assert_eq!(match_pattern("*.txt", "a.txt"), Ok(true));
//! assert_eq!(match_pattern("*", "dir/a"), Ok(false));
//! assert_eq!(match_pattern("[^a]?", "bc"), Ok(true));
//! assert_eq!(match_pattern("x[", "y"), Err(BadPattern));
//! ```

/// Go's `filepath.ErrBadPattern`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("syntax error in pattern")]
pub struct BadPattern;

/// Does the text hold a wildcard (`*`, `?` or `[`)?
pub fn has_meta(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Go's `filepath.Match(pattern, name)`.
pub fn match_pattern(pattern: &str, name: &str) -> Result<bool, BadPattern> {
    let pat: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let mut p: &[char] = &pat;
    let mut n: &[char] = &name;
    'chunks: while !p.is_empty() {
        let (star, chunk, rest) = scan_chunk(p);
        p = rest;
        if star && chunk.is_empty() {
            // A trailing star takes the rest of the name unless it has a `/`.
            return Ok(!n.contains(&'/'));
        }
        // Here first; a last chunk must use up the name.
        if let Some(t) = match_chunk(chunk, n)? {
            if t.is_empty() || !p.is_empty() {
                n = t;
                continue;
            }
        }
        if star {
            // Then after skipping 1, 2, … characters, never a `/`.
            let mut i = 0;
            while i < n.len() && n[i] != '/' {
                if let Some(t) = match_chunk(chunk, &n[i + 1..])? {
                    // A last chunk must use up the name.
                    if !p.is_empty() || t.is_empty() {
                        n = t;
                        continue 'chunks;
                    }
                }
                i += 1;
            }
        }
        // No match: the rest of the pattern must still be well formed.
        while !p.is_empty() {
            let (_, chunk, rest) = scan_chunk(p);
            p = rest;
            match_chunk(chunk, &[])?;
        }
        return Ok(false);
    }
    Ok(n.is_empty())
}

/// Is `pattern` well formed (what `filepath.Match(pattern, ".")` checks
/// before it can fail)? Every chunk between unbracketed stars must be.
pub fn is_valid(pattern: &str) -> bool {
    let pat: Vec<char> = pattern.chars().collect();
    let mut p: &[char] = &pat;
    while !p.is_empty() {
        let (_, chunk, rest) = scan_chunk(p);
        if match_chunk(chunk, &[]).is_err() {
            return false;
        }
        p = rest;
    }
    true
}

/// Go's `scanChunk`: whether leading stars were skipped, the chunk up to
/// the next star outside a class, and the rest (starting at that star).
fn scan_chunk(pattern: &[char]) -> (bool, &[char], &[char]) {
    let stars = pattern.iter().take_while(|&&c| c == '*').count();
    let pattern = &pattern[stars..];
    let mut in_range = false;
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            '\\' if i + 1 < pattern.len() => i += 1,
            '[' => in_range = true,
            ']' => in_range = false,
            '*' if !in_range => break,
            _ => {}
        }
        i += 1;
    }
    let (chunk, rest) = pattern.split_at(i);
    (stars > 0, chunk, rest)
}

/// Go's `matchChunk`: the rest of `s` after `chunk` matched its start
/// (`None`: no match). The whole chunk is always read, so a malformed one
/// is an error whatever `s` is.
fn match_chunk<'s>(chunk: &[char], s: &'s [char]) -> Result<Option<&'s [char]>, BadPattern> {
    let mut c = chunk;
    let mut s = s;
    let mut failed = false;
    while let Some(&head) = c.first() {
        if !failed && s.is_empty() {
            failed = true;
        }
        match head {
            '[' => {
                let mut r = '\0';
                if !failed {
                    r = s[0];
                    s = &s[1..];
                }
                c = &c[1..];
                let negated = c.first() == Some(&'^');
                if negated {
                    c = &c[1..];
                }
                let mut matched = false;
                let mut ranges = 0;
                loop {
                    if ranges > 0 && c.first() == Some(&']') {
                        c = &c[1..];
                        break;
                    }
                    let (lo, rest) = class_char(c)?;
                    c = rest;
                    let mut hi = lo;
                    if c.first() == Some(&'-') {
                        let (h, rest) = class_char(&c[1..])?;
                        hi = h;
                        c = rest;
                    }
                    if lo <= r && r <= hi {
                        matched = true;
                    }
                    ranges += 1;
                }
                if matched == negated {
                    failed = true;
                }
            }
            '?' => {
                if !failed {
                    if s[0] == '/' {
                        failed = true;
                    }
                    s = &s[1..];
                }
                c = &c[1..];
            }
            _ => {
                if head == '\\' {
                    c = &c[1..];
                    if c.is_empty() {
                        return Err(BadPattern);
                    }
                }
                if !failed {
                    if c[0] != s[0] {
                        failed = true;
                    }
                    s = &s[1..];
                }
                c = &c[1..];
            }
        }
    }
    Ok((!failed).then_some(s))
}

/// Go's `getEsc`: one possibly escaped class character, and the rest of
/// the chunk (which must not be empty: a class needs its `]`).
fn class_char(c: &[char]) -> Result<(char, &[char]), BadPattern> {
    let c = match c.first() {
        None | Some('-' | ']') => return Err(BadPattern),
        Some('\\') => &c[1..],
        Some(_) => c,
    };
    let (&r, rest) = c.split_first().ok_or(BadPattern)?;
    if rest.is_empty() {
        return Err(BadPattern);
    }
    Ok((r, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Go's own `filepath.Match` table (match_test.go), unix cases.
    #[test]
    fn agrees_with_go_match_table() {
        let bad = Err(BadPattern);
        let cases: &[(&str, &str, Result<bool, BadPattern>)] = &[
            ("abc", "abc", Ok(true)),
            ("*", "abc", Ok(true)),
            ("*c", "abc", Ok(true)),
            ("a*", "a", Ok(true)),
            ("a*", "abc", Ok(true)),
            ("a*", "ab/c", Ok(false)),
            ("a*/b", "abc/b", Ok(true)),
            ("a*/b", "a/c/b", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Ok(false)),
            ("a*b?c*x", "abxbbxdbxebxczzx", Ok(true)),
            ("a*b?c*x", "abxbbxdbxebxczzy", Ok(false)),
            ("ab[c]", "abc", Ok(true)),
            ("ab[b-d]", "abc", Ok(true)),
            ("ab[e-g]", "abc", Ok(false)),
            ("ab[^c]", "abc", Ok(false)),
            ("ab[^b-d]", "abc", Ok(false)),
            ("ab[^e-g]", "abc", Ok(true)),
            ("a\\*b", "a*b", Ok(true)),
            ("a\\*b", "ab", Ok(false)),
            ("a?b", "a☺b", Ok(true)),
            ("a[^a]b", "a☺b", Ok(true)),
            ("a???b", "a☺b", Ok(false)),
            ("a[^a][^a][^a]b", "a☺b", Ok(false)),
            ("[a-ζ]*", "α", Ok(true)),
            ("*[a-ζ]", "A", Ok(false)),
            ("a?b", "a/b", Ok(false)),
            ("a*b", "a/b", Ok(false)),
            ("[\\]a]", "]", Ok(true)),
            ("[\\-]", "-", Ok(true)),
            ("[x\\-]", "x", Ok(true)),
            ("[x\\-]", "-", Ok(true)),
            ("[x\\-]", "z", Ok(false)),
            ("[\\-x]", "x", Ok(true)),
            ("[\\-x]", "-", Ok(true)),
            ("[\\-x]", "a", Ok(false)),
            ("[]a]", "]", bad),
            ("[-]", "-", bad),
            ("[x-]", "x", bad),
            ("[x-]", "-", bad),
            ("[x-]", "z", bad),
            ("[-x]", "x", bad),
            ("[-x]", "-", bad),
            ("[-x]", "a", bad),
            ("\\", "a", bad),
            ("[a-b-c]", "a", bad),
            ("[", "a", bad),
            ("[^", "a", bad),
            ("[^bc", "a", bad),
            ("a[", "a", bad),
            ("a[", "ab", bad),
            ("a[", "x", bad),
            ("a/b[", "x", bad),
            ("*x", "xxx", Ok(true)),
        ];
        for (p, n, want) in cases {
            assert_eq!(match_pattern(p, n), *want, "Match({p:?}, {n:?})");
        }
    }

    #[test]
    fn bang_is_not_negation_in_go_classes() {
        // `[!a]` is the class of `!` and `a` in Go, not "not a".
        assert_eq!(match_pattern("[!a]", "b"), Ok(false));
        assert_eq!(match_pattern("[!a]", "!"), Ok(true));
    }

    #[test]
    fn validity_is_go_syntax_checking() {
        for p in ["", "*", "a*b?[c-d]\\*", "[\\]]", "**"] {
            assert!(is_valid(p), "{p:?}");
        }
        for p in ["[", "x*[", "\\", "[a-]", "[]]", "a*[^"] {
            assert!(!is_valid(p), "{p:?}");
        }
    }

    /// The old COPY matcher backtracked over every star: this pattern
    /// against 2,000 `a`s took longer than the universe has existed.
    #[test]
    fn hostile_star_runs_match_in_linear_time() {
        let pattern = format!("{}b", "*a".repeat(20));
        let name = "a".repeat(2000);
        let start = Instant::now();
        assert_eq!(match_pattern(&pattern, &name), Ok(false));
        let long = "a".repeat(100_000);
        assert_eq!(match_pattern(&"*a".repeat(1000), &long), Ok(true));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "took {:?}",
            start.elapsed()
        );
    }
}
