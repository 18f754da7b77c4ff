//! `docker import`: a plain root filesystem tar becomes a one-layer image.

use std::io::{Read, Write};

use crate::blob::{encode_layer, LayerDigests};
use crate::compression::{self, CompressionOpts};
use crate::config::{ContainerConfig, History, ImageConfig};
use crate::manifest::{Descriptor, ImageManifest, Platform, RawManifest};
use crate::{Digest, ImageError};

/// How to build the imported image.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Layer compression.
    pub compression: CompressionOpts,
    /// OCI media types (else Docker schema2).
    pub oci_media_types: bool,
    /// Platform recorded in the config (default: the host's).
    pub platform: Option<Platform>,
    /// `created` (RFC 3339) for the config and history; None leaves it out.
    pub created: Option<String>,
    /// History comment (`docker import -m`).
    pub comment: Option<String>,
    /// Runtime config (`docker import --change`).
    pub config: Option<ContainerConfig>,
}

/// What [`import_rootfs`] produced. The layer blob went to the writer; the
/// config and manifest are small and returned as bytes.
#[derive(Clone, Debug)]
pub struct ImportedImage {
    /// The layer's digests, size and media type.
    pub layer: LayerDigests,
    /// Config bytes.
    pub config: Vec<u8>,
    /// Config digest (the image ID).
    pub config_digest: Digest,
    /// The manifest.
    pub manifest: RawManifest,
}

/// Turn a rootfs tar (plain, gzip or zstd) into a one-layer image: the
/// layer blob is written to `layer_out` in one streaming pass.
pub fn import_rootfs(
    tar: impl Read + 'static,
    layer_out: impl Write,
    opts: &ImportOptions,
) -> Result<ImportedImage, ImageError> {
    let plain = compression::decompress_auto(tar)?;
    let layer = encode_layer(plain, layer_out, opts.compression, opts.oci_media_types)?;
    let platform = opts.platform.clone().unwrap_or_else(Platform::host);
    let mut cfg = ImageConfig::new(&platform);
    cfg.created = opts.created.clone();
    cfg.config = Some(opts.config.clone().unwrap_or_default());
    cfg.push_layer(
        layer.diff_id.clone(),
        History {
            created: opts.created.clone(),
            created_by: Some("kiln import".to_string()),
            comment: opts.comment.clone(),
            ..Default::default()
        },
    );
    let config = cfg.to_bytes()?;
    let config_desc = Descriptor::of_bytes("", &config);
    let man = ImageManifest::new(
        config_desc.clone(),
        vec![Descriptor::new(
            layer.media_type.clone(),
            layer.digest.clone(),
            layer.size,
        )],
        opts.oci_media_types,
    );
    Ok(ImportedImage {
        layer,
        config_digest: config_desc.digest,
        config,
        manifest: man.to_raw()?,
    })
}
