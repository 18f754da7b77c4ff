//! Helpers shared by the conformance test targets.
#![allow(dead_code)]

use std::path::PathBuf;

/// Locates `../shared/conformance` (or `$KILN_CONFORMANCE`).
///
/// Returns `None` when the corpora are absent and we are not in CI, after
/// printing "not run"; under `CI=true` a missing corpus is a test failure.
pub fn conformance_dir(corpus: &str) -> Option<PathBuf> {
    let base = match std::env::var_os("KILN_CONFORMANCE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance"),
    };
    let dir = base.join(corpus);
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "conformance corpus {} not found (set KILN_CONFORMANCE); CI requires it",
            dir.display()
        );
    }
    eprintln!("conformance corpus {} missing: not run", dir.display());
    None
}

/// Reads a JSON file into a `serde_json::Value`, panicking with the path on error.
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}
