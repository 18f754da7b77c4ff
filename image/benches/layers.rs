//! Layer tar writing, compression and applying on generated trees.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kiln_image::apply::{apply_layer, WhiteoutMode};
use kiln_image::blob::encode_layer;
use kiln_image::compression::{Compression, CompressionOpts};
use kiln_image::diff::{write_overlay_diff, write_tree_diff, DiffOptions};

struct Sink;
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// 2,000 files in 40 directories, 32 MiB of half-random content.
fn generate(root: &Path) -> u64 {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut total = 0;
    for d in 0..40 {
        let dir = root.join(format!("dir{d:02}"));
        fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..50 {
            let size = 4096 + ((d * 50 + f) % 17) * 1900;
            let mut buf = vec![0u8; size];
            for c in buf.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = (state & 0x1f1f_1f1f_1f1f_1f1f).to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
            total += size as u64;
            fs::write(dir.join(format!("f{f:03}")), &buf).expect("write");
        }
    }
    total
}

/// A layer like a package-manager install: 20,000 small files (and a few
/// symlinks) in 400 directories, two levels deep, in tar order.
fn many_small_files() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: String, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        if let Some(l) = link {
            h.set_link_name(l).expect("link");
        }
        h.set_cksum();
        b.append_data(&mut h, name, data).expect("append");
    };
    let data = [b'x'; 300];
    for top in 0..20 {
        add(
            format!("usr/lib{top}/"),
            tar::EntryType::Directory,
            &[],
            None,
        );
        for sub in 0..20 {
            let d = format!("usr/lib{top}/pkg{sub}");
            add(format!("{d}/"), tar::EntryType::Directory, &[], None);
            for f in 0..50 {
                add(format!("{d}/f{f}"), tar::EntryType::Regular, &data, None);
            }
            add(
                format!("{d}/link"),
                tar::EntryType::Symlink,
                &[],
                Some("f0"),
            );
        }
    }
    b.into_inner().expect("tar")
}

fn apply_benches(c: &mut Criterion) {
    let layer = many_small_files();
    let mut g = c.benchmark_group("apply");
    g.sample_size(10);
    g.throughput(Throughput::Elements(20_000));
    g.bench_function("small_files_20k", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("tmp"),
            |t| {
                apply_layer(&layer[..], t.path(), WhiteoutMode::Overlay).expect("apply");
                t
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let t = tempfile::tempdir().expect("tmp");
    let bytes = generate(t.path());
    let mut tar = Vec::new();
    write_tree_diff(None, t.path(), &mut tar, &DiffOptions::default()).expect("diff");

    let mut g = c.benchmark_group("layer");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("tar_write_tree", |b| {
        b.iter(|| write_tree_diff(None, t.path(), Sink, &DiffOptions::default()).expect("diff"))
    });
    // What a commit runs on an overlay upperdir (entries reached from
    // their open parent directory, read through one descriptor each).
    g.bench_function("tar_write_overlay_upper", |b| {
        b.iter(|| write_overlay_diff(t.path(), Sink, &DiffOptions::default()).expect("diff"))
    });
    g.throughput(Throughput::Bytes(tar.len() as u64));
    for (name, kind) in [
        ("encode_uncompressed", Compression::Uncompressed),
        ("encode_gzip", Compression::Gzip),
        ("encode_zstd", Compression::Zstd),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                encode_layer(&tar[..], Sink, CompressionOpts::new(kind), true).expect("encode")
            })
        });
    }
    // Already-compressed or random content: gzip stores such 64 KiB
    // pieces instead of deflating them (see kiln_image::pargz).
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: Vec<u8> = (0..32usize << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect();
    g.throughput(Throughput::Bytes(random.len() as u64));
    g.bench_function("encode_gzip_incompressible", |b| {
        b.iter(|| {
            encode_layer(
                &random[..],
                Sink,
                CompressionOpts::new(Compression::Gzip),
                true,
            )
            .expect("encode")
        })
    });
    g.finish();
}

criterion_group!(layer_benches, benches, apply_benches);
criterion_main!(layer_benches);
