//! `COPY --parents`: each selected source keeps its parent directories
//! under the destination (`COPY --parents a/b/c.txt /d/` writes
//! `/d/a/b/c.txt`). A `/./` in a source is the pivot: only the path after
//! it is kept (`COPY --parents x/./y/f /d/` writes `/d/y/f`). Wildcards
//! may match nothing; a plain path must exist (BuildKit's include
//! patterns and required paths).
//!
//! The result is one directory-shaped [`Selection`] rooted at the
//! destination, whose entries are the kept parent directories (each once,
//! with its source mode and owner) followed by every selected entry.

use std::collections::HashSet;

use crate::copy::{CopyError, Entry, Selection, Selector};
use crate::fsview::{clean_abs, components, show};
use kiln_parser::glob::has_meta as has_glob;

/// Selects `sources` (context- or stage-relative, as written) for
/// `COPY --parents`.
pub fn select_parents(sel: &Selector<'_>, sources: &[String]) -> Result<Selection, CopyError> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    for src in sources {
        let (pivot, pattern) = match src.split_once("/./") {
            Some((p, rest)) => (clean_abs(p), rest.to_string()),
            None => ("/".to_string(), src.clone()),
        };
        let full = clean_abs(&format!("{pivot}/{pattern}"));
        let matched = match sel.select(&full) {
            Ok(m) => m,
            Err(CopyError::NotFound(_)) if has_glob(&pivot) || has_glob(&pattern) => continue,
            Err(e) => return Err(e),
        };
        let pivot_resolved = sel.view.resolve(&pivot, true)?;
        let mut prefix = pivot_resolved.clone();
        if prefix != b"/" {
            prefix.push(b'/');
        }
        for m in matched {
            // `x/./` selects the pivot itself: its contents, no parents.
            let rel = if m.path == pivot_resolved {
                Some(Vec::new())
            } else {
                m.path.strip_prefix(prefix.as_slice()).map(<[u8]>::to_vec)
            };
            let Some(rel) = rel else {
                return Err(CopyError::Io(
                    src.clone(),
                    std::io::Error::other(format!(
                        "COPY --parents: {} resolves outside {pivot} through a symlink; not supported yet",
                        show(&m.path)
                    )),
                ));
            };
            // The kept parents, outermost first.
            let comps: Vec<&[u8]> = components(&rel).collect();
            for i in 1..comps.len() {
                let prel = comps[..i].join(&b'/');
                if !seen.insert(prel.clone()) {
                    continue;
                }
                let mut logical = prefix.clone();
                logical.extend_from_slice(&prel);
                let found = sel
                    .view
                    .lookup(&logical)
                    .ok_or_else(|| CopyError::NotFound(show(&logical)))?;
                entries.push(Entry {
                    rel: prel,
                    host: found.host,
                    meta: found.meta,
                    link: None,
                });
            }
            for e in m.entries {
                let r = if e.rel.is_empty() {
                    rel.clone()
                } else if rel.is_empty() {
                    e.rel.clone()
                } else {
                    let mut r = rel.clone();
                    r.push(b'/');
                    r.extend_from_slice(&e.rel);
                    r
                };
                if r.is_empty() || !seen.insert(r.clone()) {
                    continue;
                }
                entries.push(Entry { rel: r, ..e });
            }
        }
    }
    Ok(Selection {
        path: b"/".to_vec(),
        name: Vec::new(),
        is_dir: true,
        entries,
    })
}
