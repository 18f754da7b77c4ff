//! `kiln build --cache-from` / `--cache-to` (BuildKit's CSV syntax):
//! `type=registry,ref=REF[,mode=min|max]`, `type=local,dest=DIR` /
//! `type=local,src=DIR` (an OCI layout; `tag=` names the entry),
//! `type=inline`; a bare `REF` in `--cache-from` is `type=registry`.
//! Imports that fail are warnings (a first build has no cache yet);
//! exports that fail are errors unless `ignore-error=true`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_registry::RegistryConfig;
use kiln_solver::remote_cache::{CacheImport, CacheMode, RemoteCacheBackend};
use kiln_solver::store::StoreBackend;

use crate::output::OutputSpec;
use crate::UsageError;

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// Where one `--cache-to` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheExport {
    /// A cache manifest pushed to a registry reference.
    Registry {
        /// The reference.
        reference: String,
        /// min or max.
        mode: CacheMode,
        /// Warn instead of failing.
        ignore_error: bool,
    },
    /// An OCI layout directory.
    Local {
        /// The directory.
        dir: PathBuf,
        /// Its `index.json` name.
        tag: String,
        /// min or max.
        mode: CacheMode,
        /// Warn instead of failing.
        ignore_error: bool,
    },
    /// Records in the pushed image's manifest.
    Inline,
}

/// The parsed cache flags of one build.
#[derive(Debug, Clone, Default)]
pub struct CacheFlags {
    /// `--cache-from`.
    pub imports: Vec<CacheImport>,
    /// `--cache-to`.
    pub exports: Vec<CacheExport>,
}

fn attrs(flag: &str, s: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| usage(format!("{flag} {s:?}: {part:?} is not key=value")))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

fn mode(flag: &str, a: &BTreeMap<String, String>) -> anyhow::Result<CacheMode> {
    match a.get("mode").map(String::as_str) {
        None | Some("min") => Ok(CacheMode::Min),
        Some("max") => Ok(CacheMode::Max),
        Some(m) => Err(usage(format!("{flag} mode={m:?}: min or max"))),
    }
}

impl CacheFlags {
    /// Parses the raw flag values.
    pub fn parse(from: &[String], to: &[String]) -> anyhow::Result<CacheFlags> {
        let mut flags = CacheFlags::default();
        for f in from {
            if !f.contains('=') {
                flags.imports.push(CacheImport::Registry(f.clone()));
                continue;
            }
            let a = attrs("--cache-from", f)?;
            match a.get("type").map(String::as_str).unwrap_or("registry") {
                "registry" => {
                    let r = a
                        .get("ref")
                        .ok_or_else(|| usage("--cache-from type=registry needs ref="))?;
                    flags.imports.push(CacheImport::Registry(r.clone()));
                }
                "local" => {
                    let dir = a
                        .get("src")
                        .ok_or_else(|| usage("--cache-from type=local needs src="))?;
                    flags.imports.push(CacheImport::Local {
                        dir: PathBuf::from(dir),
                        tag: a.get("tag").cloned().unwrap_or_else(|| "latest".into()),
                    });
                }
                other => {
                    return Err(usage(format!(
                        "--cache-from: unknown type {other:?} (registry, local)"
                    )))
                }
            }
        }
        for t in to {
            let a = attrs("--cache-to", t)?;
            let ignore_error = a.get("ignore-error").is_some_and(|v| v == "true");
            match a.get("type").map(String::as_str).unwrap_or("registry") {
                "registry" => flags.exports.push(CacheExport::Registry {
                    reference: a
                        .get("ref")
                        .cloned()
                        .ok_or_else(|| usage("--cache-to type=registry needs ref="))?,
                    mode: mode("--cache-to", &a)?,
                    ignore_error,
                }),
                "local" => flags.exports.push(CacheExport::Local {
                    dir: a
                        .get("dest")
                        .map(PathBuf::from)
                        .ok_or_else(|| usage("--cache-to type=local needs dest="))?,
                    tag: a.get("tag").cloned().unwrap_or_else(|| "latest".into()),
                    mode: mode("--cache-to", &a)?,
                    ignore_error,
                }),
                "inline" => flags.exports.push(CacheExport::Inline),
                other => {
                    return Err(usage(format!(
                        "--cache-to: unknown type {other:?} (registry, local, inline)"
                    )))
                }
            }
        }
        Ok(flags)
    }

    /// Whether any cache flag was given.
    pub fn any(&self) -> bool {
        !self.imports.is_empty() || !self.exports.is_empty()
    }
}

/// The build's backend with the `--cache-from` records loaded.
pub fn backend(
    inner: StoreBackend,
    registry: RegistryConfig,
    flags: &CacheFlags,
    quiet: bool,
) -> Arc<RemoteCacheBackend> {
    let mut b = RemoteCacheBackend::new(inner, registry);
    for src in &flags.imports {
        let what = match src {
            CacheImport::Registry(r) => r.clone(),
            CacheImport::Local { dir, .. } => dir.display().to_string(),
        };
        match b.import(src) {
            Ok(n) if !quiet => eprintln!("importing cache manifest from {what}: {n} records"),
            Ok(_) => {}
            Err(e) => eprintln!("WARNING: failed to import cache from {what}: {e}"),
        }
    }
    Arc::new(b)
}

/// Runs the `--cache-to` exports after a successful build (and its
/// outputs: `type=inline` re-tags the pushed images).
pub fn export(
    b: &RemoteCacheBackend,
    flags: &CacheFlags,
    outputs: &[OutputSpec],
    manifest_digest: &str,
    quiet: bool,
) -> anyhow::Result<()> {
    let say = |m: &str| {
        if !quiet {
            eprintln!("{m}")
        }
    };
    for e in &flags.exports {
        match e {
            CacheExport::Registry {
                reference,
                mode,
                ignore_error,
            } => {
                say(&format!("exporting cache to {reference}"));
                match b.export_registry(reference, *mode, 4, &say) {
                    Ok(s) => say(&format!(
                        "exported cache manifest {} ({} records, {} layers, {} uploaded)",
                        s.manifest.map(|d| d.to_string()).unwrap_or_default(),
                        s.records,
                        s.layers,
                        s.written
                    )),
                    Err(err) if *ignore_error => {
                        eprintln!("WARNING: exporting cache to {reference}: {err}")
                    }
                    Err(err) => anyhow::bail!("exporting cache to {reference}: {err}"),
                }
            }
            CacheExport::Local {
                dir,
                tag,
                mode,
                ignore_error,
            } => {
                let d = dir.display();
                say(&format!("exporting cache to {d}"));
                match b.export_local(dir, tag, *mode, &say) {
                    Ok(s) => say(&format!(
                        "exported cache manifest {} ({} records, {} layers, {} written)",
                        s.manifest.map(|d| d.to_string()).unwrap_or_default(),
                        s.records,
                        s.layers,
                        s.written
                    )),
                    Err(err) if *ignore_error => {
                        eprintln!("WARNING: exporting cache to {d}: {err}")
                    }
                    Err(err) => anyhow::bail!("exporting cache to {d}: {err}"),
                }
            }
            CacheExport::Inline => {
                let mut pushed = false;
                for o in outputs.iter().filter(|o| o.pushes()) {
                    let enc = o.encoding(true)?;
                    for n in o.names()? {
                        let s = b
                            .push_inline(manifest_digest, &n, enc)
                            .map_err(|e| anyhow::anyhow!("inline cache for {n}: {e}"))?;
                        say(&format!(
                            "inline cache: {} records in {n}@{}",
                            s.records,
                            s.manifest.map(|d| d.to_string()).unwrap_or_default()
                        ));
                        pushed = true;
                    }
                }
                if !pushed {
                    eprintln!("WARNING: --cache-to type=inline needs an output that pushes (--output type=registry,name=...)");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_buildkit_syntax() {
        let f = CacheFlags::parse(
            &[
                "type=registry,ref=r/a:c".into(),
                "r/b:c".into(),
                "type=local,src=/tmp/c".into(),
            ],
            &[
                "type=registry,ref=r/a:c,mode=max".into(),
                "type=local,dest=/tmp/d,tag=x".into(),
                "type=inline".into(),
            ],
        )
        .expect("parse");
        assert_eq!(f.imports.len(), 3);
        assert_eq!(f.imports[1], CacheImport::Registry("r/b:c".into()));
        assert_eq!(
            f.exports[0],
            CacheExport::Registry {
                reference: "r/a:c".into(),
                mode: CacheMode::Max,
                ignore_error: false
            }
        );
        assert!(
            matches!(&f.exports[1], CacheExport::Local { tag, mode: CacheMode::Min, .. } if tag == "x")
        );
        assert!(CacheFlags::parse(&[], &["type=registry".into()]).is_err());
        assert!(CacheFlags::parse(&[], &["type=s3,ref=x".into()]).is_err());
        assert!(CacheFlags::parse(&[], &["type=local,dest=d,mode=all".into()]).is_err());
    }
}
