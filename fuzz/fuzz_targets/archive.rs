//! Fuzz target: the docker-archive / OCI-layout reader
//! (`kiln_image::archive::read_archive`, plain, gzip or zstd wrapped) never
//! panics, every blob it hands out hashes to its digest, and its spill
//! directory is gone afterwards (loaded or rejected).
#![no_main]

use std::fs;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use kiln_image::archive::{digest_reader, read_archive, BlobSource};
use kiln_image::config::ImageConfig;
use libfuzzer_sys::fuzz_target;

fn tmp_base() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_FUZZ_TMP") {
        return p.into();
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fuzz_target!(|data: &[u8]| {
    let spill = tempfile::Builder::new()
        .prefix("kiln-fuzz-archive-")
        .tempdir_in(tmp_base())
        .expect("temp dir");
    if let Ok(a) = read_archive(Cursor::new(data.to_vec()), spill.path()) {
        for d in a.blob_digests() {
            let r = a.open_blob(&d).expect("listed blob opens");
            let (got, len) = digest_reader(r).expect("read blob");
            assert_eq!(got, d, "blob content does not match its digest");
            assert_eq!(len, a.blob_size(&d).expect("size"));
        }
        for img in &a.images {
            let _ = ImageConfig::from_bytes(&img.config);
            let _ = img.manifest.manifest();
            let _ = img.manifest.descriptor();
            for l in &img.layers {
                if let Ok(mut r) = a.open_blob(&l.digest) {
                    let mut head = [0u8; 16];
                    let _ = r.read(&mut head);
                }
            }
        }
        drop(a);
    }
    let left: Vec<_> = fs::read_dir(spill.path())
        .expect("readdir spill")
        .map(|e| e.expect("dirent").file_name())
        .collect();
    assert!(left.is_empty(), "left behind in the spill dir: {left:?}");
});
