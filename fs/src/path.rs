//! Lexical path cleaning over byte paths: Go's `path.Clean`, and the
//! components of a path read inside a root.
//!
//! The one home of this for every crate that handles tree paths (image
//! layers, COPY sources and destinations, mount targets, [`crate::Root`]
//! itself). `kiln-parser`, which may depend on no kiln crate, keeps a
//! string `filepath.Clean` of its own for `.dockerignore` patterns.
//!
//! ```
//! use kiln_fs::path::{clean, clean_abs, components_in_root, components_strict};
//!
//! assert_eq!(clean(b"a/../../b/./c/"), b"../b/c");
//! assert_eq!(clean(b""), b".");
//! assert_eq!(clean_abs(b"../etc//passwd"), b"/etc/passwd");
//! assert_eq!(components_in_root(b"/../a/./b"), [&b"a"[..], b"b"]);
//! assert_eq!(components_strict(b"a/../../b"), None);
//! ```

/// Go's `path.Clean`: the shortest lexically equivalent path. A rooted
/// path stays rooted (`..` at the root is dropped); a relative one keeps
/// the leading `..`s it cannot cancel; nothing left is `.`.
pub fn clean(p: &[u8]) -> Vec<u8> {
    let rooted = p.first() == Some(&b'/');
    let mut parts: Vec<&[u8]> = Vec::new();
    // Leading `..` of a relative path cannot be cancelled.
    let mut fixed = 0;
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if parts.len() > fixed {
                    parts.pop();
                } else if !rooted {
                    parts.push(b"..");
                    fixed = parts.len();
                }
            }
            c => parts.push(c),
        }
    }
    let mut out = Vec::with_capacity(p.len() + 1);
    if rooted {
        out.push(b'/');
    }
    for (i, c) in parts.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(c);
    }
    if out.is_empty() {
        out.push(b'.');
    }
    out
}

/// `path.Clean("/" + p)`: `p` read from the root, always absolute.
pub fn clean_abs(p: &[u8]) -> Vec<u8> {
    let mut out = b"/".to_vec();
    for (i, c) in components_in_root(p).into_iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(c);
    }
    out
}

/// The components of `p` below a root, as Docker cleans a mount target
/// and Go's `path.Clean` an image path: empty and `.` components dropped,
/// a leading `/` ignored, `..` removes the previous component and never
/// climbs above the root.
pub fn components_in_root(p: &[u8]) -> Vec<&[u8]> {
    lexical(p).0
}

/// [`components_in_root`], but `None` when a `..` would climb above the
/// root (a tar entry such as `a/../../etc`).
pub fn components_strict(p: &[u8]) -> Option<Vec<&[u8]>> {
    let (comps, escaped) = lexical(p);
    (!escaped).then_some(comps)
}

fn lexical(p: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut out: Vec<&[u8]> = Vec::new();
    let mut escaped = false;
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => escaped |= out.pop().is_none(),
            c => out.push(c),
        }
    }
    (out, escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Go's `path.Clean` table (path_test.go).
    #[test]
    fn clean_agrees_with_go() {
        for (i, o) in [
            ("", "."),
            ("abc", "abc"),
            ("abc/def", "abc/def"),
            ("a/b/c", "a/b/c"),
            (".", "."),
            ("..", ".."),
            ("../..", "../.."),
            ("../../abc", "../../abc"),
            ("/abc", "/abc"),
            ("/", "/"),
            ("abc/", "abc"),
            ("abc/def/", "abc/def"),
            ("/abc/", "/abc"),
            ("//abc", "/abc"),
            ("///abc", "/abc"),
            ("//abc//", "/abc"),
            ("abc//def//ghi", "abc/def/ghi"),
            ("abc/./def", "abc/def"),
            ("/./abc/def", "/abc/def"),
            ("abc/.", "abc"),
            ("abc/def/ghi/../jkl", "abc/def/jkl"),
            ("abc/def/../ghi/../jkl", "abc/jkl"),
            ("abc/def/..", "abc"),
            ("abc/def/../..", "."),
            ("/abc/def/../..", "/"),
            ("abc/def/../../..", ".."),
            ("/abc/def/../../..", "/"),
            ("abc/def/../../../ghi/jkl/../../../mno", "../../mno"),
            ("abc/./../def", "def"),
            ("abc//./../def", "def"),
            ("abc/../../././../def", "../../def"),
        ] {
            assert_eq!(clean(i.as_bytes()), o.as_bytes(), "Clean({i:?})");
        }
    }

    #[test]
    fn rooted_forms_never_climb() {
        assert_eq!(clean_abs(b""), b"/");
        assert_eq!(clean_abs(b"a/../../b\xff"), b"/b\xff");
        assert_eq!(components_in_root(b"../../x"), [b"x"]);
        assert_eq!(components_strict(b"a/b/../c"), Some(vec![&b"a"[..], b"c"]));
        assert_eq!(components_strict(b"/.."), None);
    }
}
