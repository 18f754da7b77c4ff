//! Micro-benchmarks of the build's hot paths: context hashing (cold, and
//! warm through a stat-keyed cache), and cache-index / file-hash lookups in
//! the SQLite store.

use std::collections::HashMap;
use std::sync::Mutex;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kiln_solver::copy::{hash_selection, HashCache, NoHashCache, Selector, StatKey};
use kiln_solver::fsview::LayerView;
use kiln_solver::key::KeyHasher;

/// An in-memory stand-in for the store's stat-keyed hash cache.
#[derive(Default)]
struct MemCache(Mutex<HashMap<StatKey, [u8; 32]>>);

impl HashCache for MemCache {
    fn lookup(&self, keys: &[StatKey]) -> Vec<Option<[u8; 32]>> {
        let m = self.0.lock().expect("lock");
        keys.iter().map(|k| m.get(k).copied()).collect()
    }
    fn store(&self, entries: &[(StatKey, [u8; 32])]) {
        let mut m = self.0.lock().expect("lock");
        for (k, h) in entries {
            m.insert(k.clone(), *h);
        }
    }
}

fn context(files: usize, size: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..files {
        let sub = dir.path().join(format!("d{:02}", i % 50));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let body: Vec<u8> = (0..size).map(|j| ((i * 31 + j) % 251) as u8).collect();
        std::fs::write(sub.join(format!("f{i:05}")), body).expect("write");
    }
    dir
}

fn hash_ctx(dir: &std::path::Path, cache: &dyn HashCache) -> String {
    let view = LayerView::new(vec![dir.to_path_buf()], true);
    let sel = Selector {
        view: &view,
        ignore: None,
        exclude: None,
    }
    .select("/")
    .expect("select");
    let mut k = KeyHasher::new("copy");
    hash_selection(&mut k, &sel, cache, false, None).expect("hash");
    k.finish()
}

fn context_hashing(c: &mut Criterion) {
    let ctx = context(2000, 4096);
    let mut g = c.benchmark_group("context hashing (2000 files x 4 KiB)");
    g.throughput(Throughput::Bytes(2000 * 4096));
    g.bench_function("cold (read and sha256 every file)", |b| {
        b.iter(|| hash_ctx(ctx.path(), &NoHashCache))
    });
    let warm = MemCache::default();
    hash_ctx(ctx.path(), &warm);
    g.bench_function("warm (stat only, hashes cached)", |b| {
        b.iter(|| hash_ctx(ctx.path(), &warm))
    });
    g.finish();
}

fn store_lookups(c: &mut Criterion) {
    let root = tempfile::tempdir().expect("tempdir");
    let store = kiln_cache::Store::open(root.path()).expect("store");
    let meta = store.meta();
    let keys: Vec<String> = (0..10_000)
        .map(|i| {
            let mut k = KeyHasher::new("bench");
            k.field(i.to_string());
            k.finish()
        })
        .collect();
    for k in &keys {
        meta.cache_put(k, None, None, &[]).expect("put");
    }
    let stats: Vec<(String, kiln_cache::FileStat)> = (0..2000)
        .map(|i| {
            (
                format!("/ctx/f{i}"),
                kiln_cache::FileStat {
                    dev: 1,
                    ino: i,
                    size: 4096,
                    mtime_ns: 1,
                    ctime_ns: 1,
                    mode: 0o100644,
                },
            )
        })
        .collect();
    let rows: Vec<(&str, kiln_cache::FileStat, &str)> =
        stats.iter().map(|(p, s)| (p.as_str(), *s, "00")).collect();
    meta.file_hashes_put(&rows).expect("put hashes");
    let mut g = c.benchmark_group("store lookups");
    let mut i = 0;
    g.bench_function("cache index: one step key (of 10,000)", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            meta.cache_get(&keys[i]).expect("get")
        })
    });
    let query: Vec<(&str, kiln_cache::FileStat)> =
        stats.iter().map(|(p, s)| (p.as_str(), *s)).collect();
    g.bench_function("file-hash cache: 2000 files in one batch", |b| {
        b.iter_batched(
            || query.clone(),
            |q| meta.file_hashes_get(&q).expect("get"),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, context_hashing, store_lookups);
criterion_main!(benches);
