//! Cache importers and exporters: `--cache-from` / `--cache-to`
//! (BuildKit's CSV syntax):
//! `type=registry,ref=REF[,mode=min|max]`, `type=local,dest=DIR` /
//! `type=local,src=DIR` (an OCI layout; `tag=` names the entry),
//! `type=inline`; a bare `REF` in `--cache-from` is `type=registry`.
//! Imports that fail are warnings (a first build has no cache yet);
//! exports that fail are errors unless `ignore-error=true`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_registry::RegistryConfig;

use super::{ExportError, ExportInput, Exported, Exporter, OutputSpec, Reporter};
use crate::remote_cache::{CacheImport, CacheMode, RemoteCacheBackend};
use crate::store::StoreBackend;
use crate::transfer::LayerEncoding;

fn usage(msg: impl Into<String>) -> ExportError {
    ExportError::Usage(msg.into())
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

fn attrs(flag: &str, s: &str) -> Result<BTreeMap<String, String>, ExportError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| usage(format!("{flag} {s:?}: {part:?} is not key=value")))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

fn mode(flag: &str, a: &BTreeMap<String, String>) -> Result<CacheMode, ExportError> {
    match a.get("mode").map(String::as_str) {
        None | Some("min") => Ok(CacheMode::Min),
        Some("max") => Ok(CacheMode::Max),
        Some(m) => Err(usage(format!("{flag} mode={m:?}: min or max"))),
    }
}

impl CacheFlags {
    /// Parses the raw flag values.
    pub fn parse(from: &[String], to: &[String]) -> Result<CacheFlags, ExportError> {
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

/// The build's backend with the `--cache-from` records loaded. An
/// import that fails is a warning (a first build has no cache yet).
pub fn import(
    inner: StoreBackend,
    registry: RegistryConfig,
    imports: &[CacheImport],
    report: &dyn Reporter,
) -> Arc<RemoteCacheBackend> {
    let mut b = RemoteCacheBackend::new(inner, registry);
    for src in imports {
        let what = match src {
            CacheImport::Registry(r) => r.clone(),
            CacheImport::Local { dir, .. } => dir.display().to_string(),
        };
        let _span = tracing::info_span!("cache_import", from = %what).entered();
        match b.import(src) {
            Ok(n) => report.note(&format!(
                "importing cache manifest from {what}: {n} records"
            )),
            Err(e) => report.warn(&format!("WARNING: failed to import cache from {what}: {e}")),
        }
    }
    Arc::new(b)
}

impl CacheExport {
    /// The exporter of this `--cache-to`; `outputs` are the build's
    /// outputs (`type=inline` adds the records to the images they push).
    pub fn exporter(&self, outputs: &[OutputSpec]) -> Result<CacheExporter, ExportError> {
        let mut inline = Vec::new();
        if *self == CacheExport::Inline {
            for o in outputs.iter().filter(|o| o.pushes()) {
                let enc = o.encoding(true)?;
                for n in o.names()? {
                    inline.push((n, enc));
                }
            }
        }
        Ok(CacheExporter {
            to: self.clone(),
            inline,
        })
    }
}

/// Writes the build cache (after a successful build and its outputs:
/// `type=inline` re-tags the pushed images). Needs
/// [`ExportInput::cache`].
#[derive(Debug, Clone)]
pub struct CacheExporter {
    /// Where.
    pub to: CacheExport,
    /// For `type=inline`: the pushed names and their encodings.
    pub inline: Vec<(String, LayerEncoding)>,
}

impl Exporter for CacheExporter {
    fn title(&self) -> String {
        match &self.to {
            CacheExport::Registry { .. } => "exporting cache to registry",
            CacheExport::Local { .. } => "exporting cache to client directory",
            CacheExport::Inline => "exporting inline cache",
        }
        .to_string()
    }
    fn export(
        &self,
        input: &ExportInput<'_>,
        report: &dyn Reporter,
    ) -> Result<Exported, ExportError> {
        let b = input
            .cache
            .ok_or_else(|| ExportError::Nothing("no build cache to export"))?;
        let say = |m: &str| report.note(m);
        let failed =
            |context: String, e: crate::remote_cache::RemoteCacheError| ExportError::Context {
                context,
                cause: crate::error::Cause::new(e),
            };
        match &self.to {
            CacheExport::Registry {
                reference,
                mode,
                ignore_error,
            } => {
                let _span = tracing::info_span!("cache_export", to = %reference).entered();
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
                        report.warn(&format!("WARNING: exporting cache to {reference}: {err}"))
                    }
                    Err(err) => return Err(failed(format!("exporting cache to {reference}"), err)),
                }
            }
            CacheExport::Local {
                dir,
                tag,
                mode,
                ignore_error,
            } => {
                let d = dir.display();
                let _span = tracing::info_span!("cache_export", to = %d).entered();
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
                        report.warn(&format!("WARNING: exporting cache to {d}: {err}"))
                    }
                    Err(err) => return Err(failed(format!("exporting cache to {d}"), err)),
                }
            }
            CacheExport::Inline => {
                let manifest_digest = input.image()?.manifest.digest.to_string();
                let mut done = Exported::default();
                for (n, enc) in &self.inline {
                    let s = b
                        .push_inline(&manifest_digest, n, *enc)
                        .map_err(|e| failed(format!("inline cache for {n}"), e))?;
                    say(&format!(
                        "inline cache: {} records in {n}@{}",
                        s.records,
                        s.manifest
                            .as_ref()
                            .map(|d| d.to_string())
                            .unwrap_or_default()
                    ));
                    // The name now points at the annotated manifest: what
                    // `--metadata-file` and RepoDigests must name.
                    if let Some(d) = s.manifest {
                        done.pushed.push((n.clone(), d));
                    }
                }
                if self.inline.is_empty() {
                    report.warn("WARNING: --cache-to type=inline needs an output that pushes (--output type=registry,name=...)");
                }
                return Ok(done);
            }
        }
        Ok(Exported::default())
    }
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
