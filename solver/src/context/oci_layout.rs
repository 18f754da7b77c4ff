//! `--build-context NAME=oci-layout://PATH[:TAG]`: the image of an OCI
//! image layout directory imported into the store, so that the build
//! uses it like a `docker-image://` context. Every blob is verified
//! against its digest as it is stored.

use std::path::Path;

/// The most of a layout's `index.json` read.
const INDEX_LIMIT: u64 = 16 << 20;

/// The registry domain of the names `oci-layout://` contexts are imported
/// under (reserved: never pulled).
const OCI_LAYOUT_DOMAIN: &str = crate::store::OCI_LAYOUT_DOMAIN;

/// Why an OCI layout could not be imported: the message names the layout
/// and what was wrong (with the whole chain of causes, as lower errors
/// word only their own part); a lower error is kept as the source.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OciLayoutError {
    /// What went wrong, worded for the user.
    pub message: String,
    /// The lower error, if any.
    #[source]
    pub cause: Option<crate::error::Cause>,
}

fn err(message: String) -> OciLayoutError {
    OciLayoutError {
        message,
        cause: None,
    }
}

fn caused(message: String, e: impl std::error::Error + Send + Sync + 'static) -> OciLayoutError {
    OciLayoutError {
        message,
        cause: Some(crate::error::Cause::new(e)),
    }
}

/// An error and its sources, `: `-joined.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

impl From<kiln_image::ImageError> for OciLayoutError {
    fn from(e: kiln_image::ImageError) -> Self {
        caused(chain(&e), e)
    }
}

impl From<std::io::Error> for OciLayoutError {
    fn from(e: std::io::Error) -> Self {
        caused(chain(&e), e)
    }
}

impl From<kiln_cache::Error> for OciLayoutError {
    fn from(e: kiln_cache::Error) -> Self {
        caused(chain(&e), e)
    }
}

/// Imports the image of an OCI image layout directory (the manifest whose
/// `org.opencontainers.image.ref.name` is `tag`, default `latest`; the only
/// one when a layout holds a single unnamed image) into the store, and
/// returns the reference a `docker-image://` context would have.
pub fn import(
    store: &kiln_cache::Store,
    dir: &Path,
    tag: Option<&str>,
) -> Result<String, OciLayoutError> {
    let _span = tracing::info_span!("oci_layout", dir = %dir.display()).entered();
    use kiln_image::manifest::{
        ImageIndex, Platform, RawManifest, ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME,
    };
    let what = || format!("oci-layout://{}", dir.display());
    // The layout is the image's: its files are opened below `dir` with
    // descriptors, a symlink never followed, a fifo or device never
    // opened, and what is read into memory is bounded.
    let root = kiln_fs::Root::open(dir).map_err(|e| {
        caused(
            format!("{}: not an OCI image layout: {}", what(), chain(&e)),
            e,
        )
    })?;
    let open = |rel: &str| -> Result<std::fs::File, OciLayoutError> {
        open_layout_file(&root, rel).map_err(|e| caused(format!("{}: {e}", what()), e))
    };
    let read_bounded = |rel: &str, limit: u64| -> Result<Vec<u8>, OciLayoutError> {
        read_layout_file(&root, rel, limit).map_err(|e| caused(format!("{}: {e}", what()), e))
    };
    let blob_rel = |d: &kiln_image::Digest| -> Result<String, OciLayoutError> {
        let s = d.to_string();
        let hex = s
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| err(format!("{}: unsupported digest {s}", what())))?;
        Ok(format!("blobs/sha256/{hex}"))
    };
    let read_blob = |d: &kiln_image::Digest| -> Result<Vec<u8>, OciLayoutError> {
        let bytes = read_bounded(&blob_rel(d)?, kiln_image::manifest::MAX_MANIFEST_SIZE)?;
        let (got, _) = kiln_image::archive::digest_reader(&bytes[..])?;
        if &got != d {
            return Err(err(format!("{}: blob {d} has digest {got}", what())));
        }
        Ok(bytes)
    };
    let idx_bytes = read_bounded("index.json", INDEX_LIMIT).map_err(|e| OciLayoutError {
        message: format!("{} (not an OCI image layout?)", e.message),
        cause: e.cause,
    })?;
    let index: ImageIndex = serde_json::from_slice(&idx_bytes)
        .map_err(|e| caused(format!("{}: parsing index.json: {e}", what()), e))?;
    let want = tag.unwrap_or("latest");
    let named = |d: &kiln_image::manifest::Descriptor| -> Option<String> {
        let ann = d.annotations.as_ref()?;
        ann.get(ANNOTATION_REF_NAME)
            .or_else(|| ann.get(ANNOTATION_CONTAINERD_NAME))
            .cloned()
    };
    let pick = index
        .manifests
        .iter()
        .find(|d| {
            named(d)
                .is_some_and(|n| n == want || n.rsplit_once(':').is_some_and(|(_, t)| t == want))
        })
        .or_else(|| match (tag, index.manifests.as_slice()) {
            (None, [only]) if named(only).is_none() => Some(only),
            _ => None,
        })
        .ok_or_else(|| {
            err(format!(
                "{}: no image tagged {want:?} in index.json (org.opencontainers.image.ref.name)",
                what()
            ))
        })?
        .clone();
    let mut raw = RawManifest::new(read_blob(&pick.digest)?, Some(&pick.media_type))?;
    if raw.is_index() {
        let sub = raw.index()?;
        let d = sub
            .select(&Platform::host())
            .or(sub.manifests.first())
            .ok_or_else(|| err(format!("{}: empty nested index", what())))?
            .clone();
        raw = RawManifest::new(read_blob(&d.digest)?, Some(&d.media_type))?;
    }
    let man = raw.manifest()?;
    let store = store.leased(None)?;
    let mut stored = Vec::new();
    kiln_image::config::check_config_size(man.config.size)?;
    for desc in std::iter::once(&man.config).chain(&man.layers) {
        let f = open(&blob_rel(&desc.digest)?)?;
        let want: kiln_cache::Digest = desc
            .digest
            .to_string()
            .parse()
            .map_err(|e| caused(format!("digest {}: {e}", desc.digest), e))?;
        store
            .put_blob(f, Some(&want), Some(desc.size), Some(&desc.media_type))
            .map_err(|e| {
                caused(
                    format!("{}: storing blob {}: {}", what(), desc.digest, chain(&e)),
                    e,
                )
            })?;
        stored.push(want);
    }
    let config = stored.remove(0);
    // Each layer proved to be its config's before the layout's image is
    // named (and used as a stage's base).
    let cfg = store
        .content()
        .read(&config)
        .map_err(|e| caused(format!("{}: config: {}", what(), chain(&e)), e))?;
    let cfg = kiln_image::config::ImageConfig::from_bytes(&cfg)?;
    if cfg.rootfs.diff_ids.len() != man.layers.len() {
        return Err(err(format!(
            "{}: {} layers but {} diffIDs",
            what(),
            man.layers.len(),
            cfg.rootfs.diff_ids.len()
        )));
    }
    crate::store::prove_layers(&store, &man.layers, &cfg.rootfs.diff_ids)
        .map_err(|(i, e)| caused(format!("{}: layer {i}: {}", what(), chain(&e)), e))?;
    let manifest = store
        .put_bytes(&raw.bytes, Some(&raw.media_type))
        .map_err(|e| caused(format!("storing manifest: {}", chain(&e)), e))?;
    let name = format!(
        "{OCI_LAYOUT_DOMAIN}/layout@sha256:{}",
        raw.digest.to_string().trim_start_matches("sha256:")
    );
    let name = kiln_cache::normalize_reference(&name)?;
    store.record_image(&name, &manifest, &config, &stored)?;
    Ok(name)
}

/// A file-system error met in an OCI layout as an I/O error naming the
/// path; a symlink (the kernel's "too many levels of symbolic links") is
/// said as such.
pub(crate) fn layout_io_error(e: kiln_fs::Error) -> std::io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        return std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: a symlink, not followed: a layout holds only directories and regular files",
                e.path().display()
            ),
        );
    }
    std::io::Error::new(e.kind(), e.to_string())
}

/// Opens `rel` in the layout `root` for reading. A layout (an image's, a
/// cache's) may have been written by anyone: `rel` is resolved with file
/// descriptors below `root`, a symlink is never followed, and anything but
/// a regular file (a fifo, a device) is refused without being opened.
pub(crate) fn open_layout_file(root: &kiln_fs::Root, rel: &str) -> std::io::Result<std::fs::File> {
    root.open_file(rel, kiln_fs::Follow::Never)
        .map_err(layout_io_error)
}

/// [`open_layout_file`] read whole, at most `limit` bytes (more is an
/// `InvalidData` error naming the file).
pub(crate) fn read_layout_file(
    root: &kiln_fs::Root,
    rel: &str,
    limit: u64,
) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_layout_file(root, rel)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: larger than {limit} bytes",
                root.path().join(rel).display()
            ),
        ));
    }
    Ok(bytes)
}
