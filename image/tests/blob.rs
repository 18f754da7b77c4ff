//! encode_layer: round trips, digests against sha256sum, streaming.

use std::io::Read;
use std::process::Command;

use kiln_image::blob::encode_layer;
use kiln_image::compression::{decompress_auto, Compression, CompressionOpts};
use kiln_image::Digest;

fn sample_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..50 {
        let data = format!("file {i} ").repeat(1000 + i * 37);
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("f{i}"), data.as_bytes())
            .expect("append");
    }
    b.into_inner().expect("finish")
}

/// gzip, zstd and uncompressed: diffID is sha256 of the tar, digest is
/// sha256 of the blob (checked with sha256sum when present), the blob
/// decompresses back to the tar, media types follow the OCI/Docker choice.
#[test]
fn encode_round_trip_and_digests() {
    let tarb = sample_tar();
    let t = tempfile::tempdir().expect("tmp");
    for (kind, oci, mt) in [
        (
            Compression::Gzip,
            true,
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (
            Compression::Gzip,
            false,
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
        (
            Compression::Zstd,
            true,
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        (
            Compression::Uncompressed,
            true,
            "application/vnd.oci.image.layer.v1.tar",
        ),
        (
            Compression::Uncompressed,
            false,
            "application/vnd.docker.image.rootfs.diff.tar",
        ),
    ] {
        let mut blob = Vec::new();
        let d = encode_layer(
            &tarb[..],
            &mut blob,
            CompressionOpts { kind, level: None },
            oci,
        )
        .expect("encode");
        assert_eq!(d.media_type, mt);
        assert_eq!(d.diff_id, Digest::sha256_of(&tarb));
        assert_eq!(d.digest, Digest::sha256_of(&blob));
        assert_eq!(d.size, blob.len() as u64);
        assert_eq!(d.uncompressed_size, tarb.len() as u64);
        if kind != Compression::Uncompressed {
            assert!(blob.len() < tarb.len() / 5, "{kind} compresses");
        }
        let mut back = Vec::new();
        decompress_auto(std::io::Cursor::new(blob.clone()))
            .expect("dec")
            .read_to_end(&mut back)
            .expect("read");
        assert_eq!(back, tarb);
        let p = t.path().join(format!("blob-{kind}-{oci}"));
        std::fs::write(&p, &blob).expect("write");
        if let Ok(out) = Command::new("sha256sum").arg(&p).output() {
            let s = String::from_utf8_lossy(&out.stdout);
            assert_eq!(s.split_whitespace().next(), Some(d.digest.hex()));
        }
    }
    // levels change the output but not the diffID
    let mut a = Vec::new();
    let mut b = Vec::new();
    let da = encode_layer(
        &tarb[..],
        &mut a,
        CompressionOpts {
            kind: Compression::Zstd,
            level: Some(1),
        },
        true,
    )
    .expect("l1");
    let db = encode_layer(
        &tarb[..],
        &mut b,
        CompressionOpts {
            kind: Compression::Zstd,
            level: Some(19),
        },
        true,
    )
    .expect("l19");
    assert_eq!(da.diff_id, db.diff_id);
    assert_ne!(da.digest, db.digest);
}
