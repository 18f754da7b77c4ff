//! Manifests and indexes: OCI image-spec and Docker schema2 types, media
//! types, and raw-byte handling.
//!
//! Anything pulled or loaded is kept as [`RawManifest`]: its bytes are the
//! truth (the digest is over them) and are never re-serialised; the parsed
//! form is for reading only. Manifests kiln creates are serialised once by
//! [`ImageManifest::to_bytes`] and from then on also kept as bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Digest, ImageError};

/// Media type strings.
pub mod media_types {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI layer, uncompressed.
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    /// OCI layer, gzip.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// OCI layer, zstd.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// Docker schema2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker layer, gzip.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// Docker layer, uncompressed.
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    /// Docker foreign (non-distributable) layer.
    pub const DOCKER_FOREIGN_LAYER: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

    /// Whether `mt` names a layer of either family.
    pub fn is_layer(mt: &str) -> bool {
        mt.starts_with("application/vnd.oci.image.layer.")
            || mt.starts_with("application/vnd.docker.image.rootfs.")
    }
    /// Whether `mt` names a single-image manifest.
    pub fn is_manifest(mt: &str) -> bool {
        mt == OCI_MANIFEST || mt == DOCKER_MANIFEST
    }
    /// Whether `mt` names an index / manifest list.
    pub fn is_index(mt: &str) -> bool {
        mt == OCI_INDEX || mt == DOCKER_MANIFEST_LIST
    }
}

/// The annotation carrying a tag in an OCI layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd uses for the full image name.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// A platform (OCI `platform` object).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`, ...).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// OS version (Windows).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// OS features.
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
    /// CPU variant (`v8`, `v7`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this process runs on, in OCI/Go names.
    pub fn host() -> Platform {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Platform {
            architecture: arch.to_string(),
            os: "linux".to_string(),
            variant: variant.map(str::to_string),
            ..Default::default()
        }
    }
}

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Alternative download locations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Platform (in indexes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Artifact type.
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// A plain descriptor.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: None,
            annotations: None,
            platform: None,
            artifact_type: None,
        }
    }
    /// The descriptor of `bytes`.
    pub fn of_bytes(media_type: impl Into<String>, bytes: &[u8]) -> Self {
        Descriptor::new(media_type, Digest::sha256_of(bytes), bytes.len() as u64)
    }
}

/// An OCI image manifest or Docker schema2 manifest (same shape).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The manifest's own media type.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Artifact type (OCI 1.1).
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// Layer blobs, base first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Subject (OCI 1.1 referrers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl ImageManifest {
    /// A manifest for `config` and `layers`: OCI media types when
    /// `oci_media_types`, Docker schema2 otherwise. The config descriptor's
    /// media type is set to match.
    pub fn new(mut config: Descriptor, layers: Vec<Descriptor>, oci_media_types: bool) -> Self {
        let (mt, cmt) = if oci_media_types {
            (media_types::OCI_MANIFEST, media_types::OCI_CONFIG)
        } else {
            (media_types::DOCKER_MANIFEST, media_types::DOCKER_CONFIG)
        };
        config.media_type = cmt.to_string();
        ImageManifest {
            schema_version: 2,
            media_type: Some(mt.to_string()),
            artifact_type: None,
            config,
            layers,
            subject: None,
            annotations: None,
        }
    }

    /// The manifest's media type (from the field; OCI if absent).
    pub fn media_type(&self) -> &str {
        self.media_type
            .as_deref()
            .unwrap_or(media_types::OCI_MANIFEST)
    }

    /// Serialise (compact JSON, fixed field order) into the bytes to store.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ImageError> {
        Ok(serde_json::to_vec(self)?)
    }

    /// Serialise into a [`RawManifest`].
    pub fn to_raw(&self) -> Result<RawManifest, ImageError> {
        RawManifest::new(self.to_bytes()?, Some(self.media_type()))
    }
}

/// An OCI image index or Docker manifest list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIndex {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The index's media type.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests.
    pub manifests: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl ImageIndex {
    /// An OCI index of `manifests`.
    pub fn new(manifests: Vec<Descriptor>) -> Self {
        ImageIndex {
            schema_version: 2,
            media_type: Some(media_types::OCI_INDEX.to_string()),
            manifests,
            annotations: None,
        }
    }
    /// Serialise (compact JSON).
    pub fn to_bytes(&self) -> Result<Vec<u8>, ImageError> {
        Ok(serde_json::to_vec(self)?)
    }
}

/// Manifest bytes exactly as received or first written, with their digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawManifest {
    /// The bytes (the digest is over these).
    pub bytes: Vec<u8>,
    /// The media type (from the transport, else from the `mediaType` field).
    pub media_type: String,
    /// sha256 of `bytes`.
    pub digest: Digest,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<serde_json::Value>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<serde::de::IgnoredAny>,
    config: Option<serde::de::IgnoredAny>,
    layers: Option<serde::de::IgnoredAny>,
}

/// The largest manifest or index kiln fetches, loads or keeps
/// (distribution's own limit is 4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;

/// An error when a manifest or index of `size` bytes is over
/// [`MAX_MANIFEST_SIZE`].
pub fn check_manifest_size(size: u64) -> Result<(), ImageError> {
    if size > MAX_MANIFEST_SIZE {
        return Err(ImageError::TooLarge {
            what: "manifest".into(),
            size,
            limit: MAX_MANIFEST_SIZE,
        });
    }
    Ok(())
}

impl RawManifest {
    /// Wrap `bytes`; when `media_type` is None it is read from the JSON
    /// (`mediaType`, else by shape: `manifests` -> OCI index, else OCI
    /// manifest).
    ///
    /// A document that is both kinds is refused (containerd's check, after
    /// CVE-2021-41190): an index with `config` or `layers`, a manifest with
    /// `manifests`, or a JSON `mediaType` of the other kind than the one
    /// given. Pulled as a manifest and used as an index here (or the other
    /// way), one digest would name two images.
    pub fn new(bytes: Vec<u8>, media_type: Option<&str>) -> Result<Self, ImageError> {
        check_manifest_size(bytes.len() as u64)?;
        let p: Probe = serde_json::from_slice(&bytes)?;
        // Docker's schema 1 (signed, `application/vnd.docker.distribution
        // .manifest.v1+prettyjws`): gone from Docker, said so.
        let v1 = p.schema_version.as_ref().and_then(|v| v.as_u64()) == Some(1)
            || media_type
                .is_some_and(|m| m.starts_with("application/vnd.docker.distribution.manifest.v1"));
        if v1 {
            return Err(ImageError::Unsupported(
                "a Docker schema 1 manifest: support for it was removed from Docker; push the image again with a current client".into(),
            ));
        }
        let mt = match (media_type, &p.media_type, &p.manifests) {
            (Some(m), _, _) => m.to_string(),
            (None, Some(m), _) => m.clone(),
            (None, None, Some(_)) => media_types::OCI_INDEX.to_string(),
            (None, None, None) => media_types::OCI_MANIFEST.to_string(),
        };
        let json = p.media_type.as_deref().unwrap_or("");
        let ambiguous = if media_types::is_index(&mt) {
            (p.config.is_some() || p.layers.is_some() || media_types::is_manifest(json))
                .then_some("an index with config or layers, or a manifest's mediaType")
        } else if media_types::is_manifest(&mt) {
            (p.manifests.is_some() || media_types::is_index(json))
                .then_some("a manifest with manifests, or an index's mediaType")
        } else {
            None
        };
        if let Some(what) = ambiguous {
            return Err(ImageError::Ambiguous(format!("{mt} document is {what}")));
        }
        Ok(RawManifest {
            digest: Digest::sha256_of(&bytes),
            bytes,
            media_type: mt,
        })
    }
    /// Whether this is an index / manifest list.
    pub fn is_index(&self) -> bool {
        media_types::is_index(&self.media_type)
    }
    /// Parse as an image manifest.
    pub fn manifest(&self) -> Result<ImageManifest, ImageError> {
        Ok(serde_json::from_slice(&self.bytes)?)
    }
    /// Parse as an index.
    pub fn index(&self) -> Result<ImageIndex, ImageError> {
        Ok(serde_json::from_slice(&self.bytes)?)
    }
    /// A descriptor of these bytes.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.media_type.clone(),
            self.digest.clone(),
            self.bytes.len() as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A document that is both an index and a manifest is refused,
    /// whichever type it is declared as (CVE-2021-41190's class: one
    /// digest, two images); consistent ones are taken.
    #[test]
    fn a_document_of_both_kinds_is_refused() {
        let both = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[],"manifests":[]}"#.to_vec();
        for declared in [
            None,
            Some(media_types::OCI_MANIFEST),
            Some(media_types::OCI_INDEX),
            Some(media_types::DOCKER_MANIFEST_LIST),
        ] {
            assert!(
                matches!(
                    RawManifest::new(both.clone(), declared),
                    Err(ImageError::Ambiguous(_))
                ),
                "{declared:?}"
            );
        }
        let index_typed = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#.to_vec();
        assert!(RawManifest::new(index_typed.clone(), Some(media_types::OCI_MANIFEST)).is_err());
        assert!(RawManifest::new(index_typed.clone(), Some(media_types::OCI_INDEX)).is_ok());
        assert!(RawManifest::new(index_typed, None).is_ok_and(|r| r.is_index()));
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#.to_vec();
        assert!(RawManifest::new(manifest.clone(), Some(media_types::OCI_INDEX)).is_err());
        assert!(RawManifest::new(manifest, Some(media_types::OCI_MANIFEST)).is_ok());
    }

    #[test]
    fn docker_and_oci_manifests() {
        let cfg = Descriptor::of_bytes("x", b"{}");
        let l = Descriptor::new(media_types::OCI_LAYER_GZIP, Digest::sha256_of(b"l"), 1);
        let m = ImageManifest::new(cfg.clone(), vec![l.clone()], false);
        let raw = m.to_raw().expect("raw");
        assert_eq!(raw.media_type, media_types::DOCKER_MANIFEST);
        let s = String::from_utf8(raw.bytes.clone()).expect("utf8");
        assert!(s.starts_with("{\"schemaVersion\":2,\"mediaType\":\"application/vnd.docker.distribution.manifest.v2+json\",\"config\":{\"mediaType\":\"application/vnd.docker.container.image.v1+json\""));
        assert_eq!(raw.manifest().expect("parse"), m);
        let oci = ImageManifest::new(cfg, vec![l], true);
        assert_eq!(oci.config.media_type, media_types::OCI_CONFIG);
    }

    #[test]
    fn raw_bytes_are_kept() {
        // odd spacing and key order must survive: the digest is over the bytes
        let bytes = br#"{ "schemaVersion": 2, "manifests": [ ] , "x-extra": 1 }"#.to_vec();
        let raw = RawManifest::new(bytes.clone(), None).expect("raw");
        assert!(raw.is_index());
        assert_eq!(raw.bytes, bytes);
        assert_eq!(raw.digest, Digest::sha256_of(&bytes));
        assert!(raw.index().expect("index").manifests.is_empty());
    }

    #[test]
    fn select_platform() {
        let mut a = Descriptor::of_bytes(media_types::OCI_MANIFEST, b"a");
        a.platform = Some(Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: Some("v8".into()),
            ..Default::default()
        });
        let mut b = Descriptor::of_bytes(media_types::OCI_MANIFEST, b"b");
        b.platform = Some(Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..Default::default()
        });
        let idx = ImageIndex::new(vec![a.clone(), b.clone()]);
        let want = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..Default::default()
        };
        assert_eq!(idx.select(&want), Some(&b));
        let want = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            ..Default::default()
        };
        assert_eq!(idx.select(&want), Some(&a));
    }
}
