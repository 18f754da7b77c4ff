//! Stored images for several platforms: a name may point at an index (an
//! OCI image index or Docker manifest list) whose children are the
//! per-platform image manifests. This module picks one child for a
//! platform (containerd's matching rules, [`kiln_image::platform`]) and
//! lists what an index holds; commands that show, run, save or export one
//! image go through [`select`].
//!
//! A stored index may name children the store does not hold (a pull of
//! one platform keeps only that platform's manifest under the name;
//! `pull --all-platforms` keeps them all); only children present count.

use kiln_cache::Store;
use kiln_image::config::ImageConfig;
use kiln_image::manifest::{media_types, Descriptor, Platform, RawManifest};

pub use kiln_image::platform::MAX_INDEX_ENTRIES;

/// Why no image could be picked.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The store could not read a blob.
    #[error("{what} {digest}: {source}")]
    Store {
        /// What was read.
        what: &'static str,
        /// Its digest.
        digest: String,
        /// Why.
        #[source]
        source: kiln_cache::Error,
    },
    /// A stored manifest, index or config that does not parse.
    #[error("{what} {digest}: {detail}")]
    Corrupt {
        /// What was read.
        what: &'static str,
        /// Its digest.
        digest: String,
        /// Why.
        detail: String,
    },
    /// An index longer than [`MAX_INDEX_ENTRIES`].
    #[error("index {digest} has {count} entries; kiln reads at most {MAX_INDEX_ENTRIES}")]
    TooManyEntries {
        /// The index.
        digest: String,
        /// Its entries.
        count: usize,
    },
    /// The index has no (stored) image for the platform.
    #[error("no image for platform {wanted} in index {digest} (it has: {have}; name one with --platform)")]
    NoMatch {
        /// The index.
        digest: String,
        /// The platform asked for.
        wanted: String,
        /// The platforms it has, comma-separated (or "none").
        have: String,
    },
    /// A single-platform image for another platform than the one asked for.
    #[error("image {digest} was found but does not match the specified platform: wanted {wanted}, actual: {actual}")]
    Mismatch {
        /// The manifest.
        digest: String,
        /// The platform asked for.
        wanted: String,
        /// The image's.
        actual: String,
    },
}

/// One image picked from a stored name.
#[derive(Debug, Clone)]
pub struct Selected {
    /// The image manifest (the index's child, or the stored manifest).
    pub manifest: RawManifest,
    /// The index it came from, if the name points at one.
    pub index: Option<RawManifest>,
    /// The platforms of the index's stored children (empty for a single
    /// image).
    pub platforms: Vec<Platform>,
}

fn read(store: &Store, what: &'static str, digest: &str) -> Result<Vec<u8>, PlatformError> {
    let corrupt = |detail: String| PlatformError::Corrupt {
        what,
        digest: digest.to_string(),
        detail,
    };
    let d: kiln_cache::Digest = digest.parse().map_err(|e| corrupt(format!("{e}")))?;
    store
        .content()
        .read(&d)
        .map_err(|source| PlatformError::Store {
            what,
            digest: digest.to_string(),
            source,
        })
}

fn has(store: &Store, d: &Descriptor) -> bool {
    d.digest
        .as_str()
        .parse::<kiln_cache::Digest>()
        .is_ok_and(|c| store.meta().has_blob(&c).unwrap_or(false))
}

/// The children of stored index `raw` that are image manifests with a
/// platform and are in the store, in index order.
pub fn stored_children(store: &Store, raw: &RawManifest) -> Result<Vec<Descriptor>, PlatformError> {
    let idx = raw.index().map_err(|e| PlatformError::Corrupt {
        what: "index",
        digest: raw.digest.to_string(),
        detail: e.to_string(),
    })?;
    if idx.manifests.len() > MAX_INDEX_ENTRIES {
        return Err(PlatformError::TooManyEntries {
            digest: raw.digest.to_string(),
            count: idx.manifests.len(),
        });
    }
    Ok(idx
        .manifests
        .into_iter()
        .filter(|d| media_types::is_manifest(&d.media_type) && d.platform.is_some())
        .filter(|d| has(store, d))
        .collect())
}

fn config_platform(store: &Store, m: &RawManifest) -> Result<Platform, PlatformError> {
    let manifest = m.manifest().map_err(|e| PlatformError::Corrupt {
        what: "manifest",
        digest: m.digest.to_string(),
        detail: e.to_string(),
    })?;
    let bytes = read(store, "config", manifest.config.digest.as_str())?;
    let c = ImageConfig::from_bytes(&bytes).map_err(|e| PlatformError::Corrupt {
        what: "config",
        digest: manifest.config.digest.to_string(),
        detail: e.to_string(),
    })?;
    Ok(Platform {
        os: c.os.clone(),
        architecture: c.architecture.clone(),
        variant: c.variant.clone(),
        ..Default::default()
    })
}

/// The image stored as manifest or index `digest`, for `want` (default:
/// the host's platform). With `any` and no `want`, an index without the
/// host's platform gives its first stored child instead of an error (for
/// listings). A single image is checked against an explicit `want`.
pub fn select(
    store: &Store,
    digest: &str,
    want: Option<&Platform>,
    any: bool,
) -> Result<Selected, PlatformError> {
    let bytes = read(store, "manifest", digest)?;
    let raw = RawManifest::new(bytes, None).map_err(|e| PlatformError::Corrupt {
        what: "manifest",
        digest: digest.to_string(),
        detail: e.to_string(),
    })?;
    if !raw.is_index() {
        if let Some(w) = want {
            let actual = config_platform(store, &raw)?;
            if !w.matches(&actual) {
                return Err(PlatformError::Mismatch {
                    digest: digest.to_string(),
                    wanted: w.to_string(),
                    actual: kiln_image::platform::normalize(&actual).to_string(),
                });
            }
        }
        return Ok(Selected {
            manifest: raw,
            index: None,
            platforms: Vec::new(),
        });
    }
    let children = stored_children(store, &raw)?;
    let platforms: Vec<Platform> = children.iter().filter_map(|d| d.platform.clone()).collect();
    let host = Platform::host();
    let wanted = want.unwrap_or(&host);
    let sub = kiln_image::manifest::ImageIndex::new(children.clone());
    let pick = sub
        .select(wanted)
        .or_else(|| {
            if want.is_none() && any {
                children.first()
            } else {
                None
            }
        })
        .cloned();
    let Some(d) = pick else {
        let have: Vec<String> = platforms.iter().map(|p| p.to_string()).collect();
        return Err(PlatformError::NoMatch {
            digest: digest.to_string(),
            wanted: kiln_image::platform::normalize(wanted).to_string(),
            have: if have.is_empty() {
                "none".into()
            } else {
                have.join(", ")
            },
        });
    };
    let bytes = read(store, "manifest", d.digest.as_str())?;
    let manifest =
        RawManifest::new(bytes, Some(&d.media_type)).map_err(|e| PlatformError::Corrupt {
            what: "manifest",
            digest: d.digest.to_string(),
            detail: e.to_string(),
        })?;
    Ok(Selected {
        manifest,
        index: Some(raw),
        platforms,
    })
}
