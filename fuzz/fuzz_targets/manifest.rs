//! Fuzz target: manifest, index and image-config JSON parsing never panics,
//! and whatever parses re-serialises to bytes that parse back to the same
//! value (and serialise identically again).
//!
//! The first byte picks the media type the transport would have given
//! (none, OCI/Docker manifest, OCI index/Docker list); the rest is the JSON.
#![no_main]

use kiln_image::config::ImageConfig;
use kiln_image::manifest::{media_types, ImageIndex, ImageManifest, Platform, RawManifest};
use kiln_image::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, json)) = data.split_first() else {
        return;
    };
    let mt = match sel % 5 {
        0 => None,
        1 => Some(media_types::OCI_MANIFEST),
        2 => Some(media_types::DOCKER_MANIFEST),
        3 => Some(media_types::OCI_INDEX),
        _ => Some(media_types::DOCKER_MANIFEST_LIST),
    };
    if let Ok(s) = std::str::from_utf8(json) {
        if let Ok(d) = s.parse::<Digest>() {
            assert_eq!(d.as_str(), s);
            let _ = (d.hex(), d.algorithm());
        }
    }
    if let Ok(raw) = RawManifest::new(json.to_vec(), mt) {
        assert_eq!(raw.digest, Digest::sha256_of(json));
        let _ = raw.descriptor();
        if let Ok(m) = raw.manifest() {
            let _ = m.media_type();
            let b = m.to_bytes().expect("serialise manifest");
            let back: ImageManifest = serde_json::from_slice(&b).expect("manifest reparses");
            assert_eq!(back, m);
            if let Ok(r) = m.to_raw() {
                assert!(r.manifest().is_ok());
            }
        }
        if let Ok(i) = raw.index() {
            let _ = i.select(&Platform::host());
            let b = i.to_bytes().expect("serialise index");
            let back: ImageIndex = serde_json::from_slice(&b).expect("index reparses");
            assert_eq!(back, i);
        }
    }
    if let Ok(c) = ImageConfig::from_bytes(json) {
        let b = c.to_bytes().expect("serialise config");
        let back = ImageConfig::from_bytes(&b).expect("config reparses");
        assert_eq!(back, c);
        assert_eq!(back.to_bytes().expect("serialise again"), b);
        let _ = c.digest();
    }
});
