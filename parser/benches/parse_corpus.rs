//! Parse time of the whole real-world Dockerfile corpus
//! (`../shared/conformance/real-world`, or `$KILN_CONFORMANCE/real-world`).

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn corpus_dir() -> PathBuf {
    match std::env::var_os("KILN_CONFORMANCE") {
        Some(dir) => PathBuf::from(dir).join("real-world"),
        None => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/real-world")
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.to_string_lossy().ends_with(".Dockerfile") {
            if let Ok(text) = std::fs::read_to_string(&p) {
                out.push(text);
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut files = Vec::new();
    collect(&corpus_dir(), &mut files);
    assert!(!files.is_empty(), "no corpus at {}", corpus_dir().display());
    let bytes: usize = files.iter().map(String::len).sum();
    let mut g = c.benchmark_group("real-world corpus");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function(format!("parse_ast x{}", files.len()), |b| {
        b.iter(|| {
            for f in &files {
                std::hint::black_box(kiln_parser::parse_ast(f).ok());
            }
        })
    });
    g.bench_function(format!("parse typed x{}", files.len()), |b| {
        b.iter(|| {
            for f in &files {
                std::hint::black_box(kiln_parser::parse(f).ok());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
