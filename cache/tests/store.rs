//! Content store, metadata and multi-process tests.

mod common;

use std::io::Write;
use std::sync::Arc;

use kiln_cache::{Digest, Error, FileStat, PruneOptions, SnapshotterKind, Store, StoreOptions};

fn open(dir: &std::path::Path) -> Store {
    Store::open_with(
        dir,
        StoreOptions {
            snapshotter: SnapshotterKind::Native,
        },
    )
    .expect("open")
}

fn tmp_entries(s: &Store) -> usize {
    std::fs::read_dir(s.tmp_dir()).unwrap().count()
}

/// The tar of the tree `src` (the tree differ's), its diffID, and the tar
/// gzip-compressed.
fn gzip_layer(src: &std::path::Path) -> (Vec<u8>, Digest, Vec<u8>) {
    use kiln_image::compression::{Compression, CompressionOpts, Encoder};
    use kiln_image::diff::{write_tree_diff, DiffOptions};
    let mut tar = Vec::new();
    write_tree_diff(None, src, &mut tar, &DiffOptions::default()).unwrap();
    let diff_id = Digest::sha256_of(&tar);
    let mut enc = Encoder::new(Vec::new(), CompressionOpts::new(Compression::Gzip)).unwrap();
    enc.write_all(&tar).unwrap();
    let gz = enc.finish().unwrap();
    (tar, diff_id, gz)
}

/// Opening a store that is up to date writes nothing (no WAL frame, no
/// checkpoint), and what a process wrote is there for the next one
/// although no checkpoint ran when it closed.
#[test]
fn reopening_writes_nothing_and_keeps_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.meta().setting_init("probe", "one").unwrap();
    drop(s);
    let files = |d: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        ["meta.db", "meta.db-wal"]
            .iter()
            .map(|n| (n.to_string(), std::fs::read(d.join(n)).unwrap_or_default()))
            .collect()
    };
    let before = files(dir.path());
    assert!(
        !before[1].1.is_empty(),
        "the WAL was checkpointed and removed at close"
    );
    for _ in 0..3 {
        let s = open(dir.path());
        assert_eq!(s.meta().setting("probe").unwrap().as_deref(), Some("one"));
        assert_eq!(s.meta().setting_init("probe", "two").unwrap(), "one");
        drop(s);
    }
    assert!(before == files(dir.path()), "opening the store wrote to it");
}

#[test]
fn layout_and_schema() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    for d in ["blobs/sha256", "snapshots", "tmp", "l", "meta.db"] {
        assert!(dir.path().join(d).exists(), "{d}");
    }
    assert_eq!(
        s.meta().schema_version().unwrap(),
        kiln_cache::SCHEMA_VERSION
    );
    drop(s);
    // Re-open is idempotent, and keeps the snapshotter it was created with.
    let s = open(dir.path());
    assert_eq!(s.snapshotter().name(), "native");
    let e = Store::open_with(
        dir.path(),
        StoreOptions {
            snapshotter: SnapshotterKind::Overlay,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("native"), "{e}");
}

#[test]
fn concurrent_writers_of_the_same_blob() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(open(dir.path()));
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let want = Digest::sha256_of(&data);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            let data = data.clone();
            let want = want.clone();
            std::thread::spawn(move || {
                // Write in small pieces so writers interleave.
                let mut w = s.content().writer().unwrap();
                for chunk in data.chunks(4096) {
                    w.write_all(chunk).unwrap();
                }
                let (d, n) = w.commit(Some(&want), Some(data.len() as u64)).unwrap();
                s.meta().add_blob(&d, n, None).unwrap();
                d
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), want);
    }
    assert_eq!(s.content().verify(&want).unwrap(), data.len() as u64);
    assert_eq!(s.content().list().unwrap().0.len(), 1);
    assert_eq!(tmp_entries(&s), 0, "no temp files left");
    assert!(s.check().unwrap().ok());
}

#[test]
fn wrong_digest_is_rejected_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let wrong = Digest::sha256_of(b"something else");
    let e = s
        .put_blob(&b"hello"[..], Some(&wrong), None, None)
        .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    let right = Digest::sha256_of(b"hello");
    let e = s
        .put_blob(&b"hello"[..], Some(&right), Some(4), None)
        .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "wrong size: {e}");
    assert!(!s.content().has(&wrong) && !s.content().has(&right));
    assert_eq!(s.content().list().unwrap().0.len(), 0);
    assert_eq!(tmp_entries(&s), 0);
    assert!(!s.meta().has_blob(&right).unwrap());
    // And the right one goes in.
    let (d, n) = s
        .put_blob(&b"hello"[..], Some(&right), Some(5), Some("text/plain"))
        .unwrap();
    assert_eq!((d, n), (right.clone(), 5));
    assert_eq!(s.content().read(&right).unwrap(), b"hello");
}

#[test]
fn partial_write_is_invisible() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let d = Digest::sha256_of(b"0123456789");
    let mut w = s.content().writer().unwrap();
    w.write_all(b"01234").unwrap();
    assert!(!s.content().has(&d));
    assert!(matches!(s.content().open(&d), Err(Error::NotFound { .. })));
    assert_eq!(s.content().list().unwrap().0.len(), 0);
    assert!(s.check().unwrap().ok(), "a blob in flight is no problem");
    drop(w); // abandoned writer removes its temp file
    assert_eq!(tmp_entries(&s), 0);
}

#[test]
fn blobs_stored_together_read_back_and_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let kept = s.put_bytes(b"kept already", None).unwrap();
    let items: [(&[u8], Option<&str>); 4] = [
        (
            b"{\"config\":1}",
            Some("application/vnd.oci.image.config.v1+json"),
        ),
        (b"kept already", None),
        (
            b"{\"manifest\":1}",
            Some("application/vnd.oci.image.manifest.v1+json"),
        ),
        (b"{\"config\":1}", None),
    ];
    let ds = s.put_bytes_all(&items).unwrap();
    assert_eq!(ds.len(), 4);
    assert_eq!(ds[1], kept);
    assert_eq!(ds[0], ds[3]);
    for ((bytes, _), d) in items.iter().zip(&ds) {
        assert_eq!(*d, Digest::sha256_of(bytes));
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut s.open_blob(d).unwrap(), &mut got).unwrap();
        assert_eq!(&got, bytes);
        assert!(s.has_local_blob(d));
    }
    assert_eq!(tmp_entries(&s), 0, "no temp file left");
    // Again: nothing is written, the same digests come back.
    assert_eq!(s.put_bytes_all(&items).unwrap(), ds);
    assert!(s.put_bytes_all(&[]).unwrap().is_empty());
}

#[test]
fn a_cache_hit_is_marked_used_and_kept_while_its_build_runs() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let sn = s.snapshotter();
    for k in ["old", "used"] {
        sn.prepare(&format!("a-{k}"), None).unwrap();
        sn.commit(&format!("snap-{k}"), &format!("a-{k}")).unwrap();
        let blob = s
            .put_bytes(k.as_bytes(), Some("application/octet-stream"))
            .unwrap();
        s.meta()
            .cache_put(
                k,
                Some(&format!("snap-{k}")),
                None,
                std::slice::from_ref(&blob),
            )
            .unwrap();
    }
    let last_used = |k: &str| {
        s.meta()
            .cache_records()
            .unwrap()
            .into_iter()
            .find(|r| r.key == k)
            .map(|r| r.last_used)
    };
    let put_at = last_used("used").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // A build's lookup, under the build's lease.
    let lease = s.lease(None).unwrap();
    let build = s.with_lease(&lease);
    let hit = build.meta().cache_get("used").unwrap().expect("hit");
    assert!(build.meta().cache_get("nothing").unwrap().is_none());
    assert!(hit.last_used > put_at, "a hit marks the record used now");
    assert_eq!(last_used("used"), Some(hit.last_used));
    assert_eq!(last_used("old"), Some(put_at), "other records stay");
    assert_eq!(s.meta().cache_records().unwrap()[0].key, "used");
    // A prune beside the build drops every record but the one the build
    // used, and what that one holds.
    let all = PruneOptions {
        all: true,
        ..Default::default()
    };
    s.prune(&all).unwrap();
    let left: Vec<String> = s
        .meta()
        .cache_records()
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(left, vec!["used".to_string()]);
    assert!(s.meta().snapshot("snap-used").unwrap().is_some());
    assert!(s.meta().snapshot("snap-old").unwrap().is_none());
    let used_blob = Digest::sha256_of(b"used");
    assert!(s.content().has(&used_blob));
    assert!(!s.content().has(&Digest::sha256_of(b"old")));
    // So does a size budget too small for it.
    s.prune(&PruneOptions {
        keep_storage: Some(0),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.meta().cache_records().unwrap().len(), 1);
    // Once the build is over, it goes too.
    drop((build, lease));
    s.prune(&all).unwrap();
    assert!(s.meta().cache_records().unwrap().is_empty());
    assert!(s.meta().snapshot("snap-used").unwrap().is_none());
    assert!(!s.content().has(&used_blob));
}

#[test]
fn cache_index_memo_and_file_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let sn = s.snapshotter();
    sn.prepare("a", None).unwrap();
    sn.commit("snap-1", "a").unwrap();
    let blob = s
        .put_bytes(b"layer", Some("application/vnd.oci.image.layer.v1.tar"))
        .unwrap();
    let diff = Digest::sha256_of(b"diff");
    s.meta()
        .cache_put(
            "key-1",
            Some("snap-1"),
            Some(&diff),
            std::slice::from_ref(&blob),
        )
        .unwrap();
    let rec = s.meta().cache_get("key-1").unwrap().expect("hit");
    assert_eq!(rec.snapshot.as_deref(), Some("snap-1"));
    assert_eq!(rec.diff_id, Some(diff.to_string()));
    assert_eq!(rec.blobs, vec![blob.to_string()]);
    assert!(s.meta().cache_get("key-2").unwrap().is_none());

    s.meta().put_layer_blob(&diff, "gzip", 6, &blob).unwrap();
    assert_eq!(
        s.meta().layer_blob(&diff, "gzip", 6).unwrap(),
        Some(blob.clone())
    );
    assert_eq!(s.meta().layer_blob(&diff, "zstd", 3).unwrap(), None);

    // File hashes: a batch of 5000 in one transaction each way.
    let ctx = dir.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("f"), "x").unwrap();
    let mut st = FileStat::from_metadata(&std::fs::symlink_metadata(ctx.join("f")).unwrap());
    // Pretend the file is old enough not to be "racy".
    st.mtime_ns -= 10_000_000_000;
    st.ctime_ns -= 10_000_000_000;
    let paths: Vec<String> = (0..5000).map(|i| format!("/ctx/file-{i}")).collect();
    let puts: Vec<(&str, FileStat, &str)> = paths
        .iter()
        .map(|p| (p.as_str(), st, "sha256:abc"))
        .collect();
    assert_eq!(s.meta().file_hashes_put(&puts).unwrap(), 5000);
    let mut changed = st;
    changed.size += 1;
    let gets: Vec<(&str, FileStat)> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), if i == 7 { changed } else { st }))
        .collect();
    let t = std::time::Instant::now();
    let got = s.meta().file_hashes_get(&gets).unwrap();
    eprintln!("5000 file-hash lookups: {:?}", t.elapsed());
    assert_eq!(got.iter().filter(|g| g.is_some()).count(), 4999);
    assert!(got[7].is_none(), "a changed stat misses");
    // A file changed just now is not stored (racy clean).
    let fresh = FileStat::from_metadata(&std::fs::symlink_metadata(ctx.join("f")).unwrap());
    assert_eq!(
        s.meta()
            .file_hashes_put(&[("/ctx/fresh", fresh, "sha256:x")])
            .unwrap(),
        0
    );
    assert!(s.check().unwrap().ok());
}

#[test]
fn prune_keeps_tags_cache_and_leases_and_reclaims_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let sn = s.snapshotter();
    // Unreferenced: a blob and a committed snapshot.
    let junk = s.put_bytes(b"junk", None).unwrap();
    sn.prepare("j", None).unwrap();
    sn.commit("junk-snap", "j").unwrap();
    // Referenced by an image.
    let layer = s.put_bytes(b"layer-bytes", None).unwrap();
    let config = s.put_bytes(b"{}", None).unwrap();
    let manifest = s.put_bytes(b"{\"manifest\":1}", None).unwrap();
    s.record_image(
        "docker.io/library/x:latest",
        &manifest,
        &config,
        std::slice::from_ref(&layer),
    )
    .unwrap();
    // Referenced by the cache, two records of different age.
    for k in ["old", "new"] {
        sn.prepare(k, None).unwrap();
        std::fs::write(sn.writable_dir(k).unwrap().join("data"), vec![7u8; 100_000]).unwrap();
        sn.commit(&format!("{k}-snap"), k).unwrap();
        s.meta()
            .cache_put(k, Some(&format!("{k}-snap")), None, &[])
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    // Under a lease.
    let leased = {
        let l = s.leased(None).unwrap();
        let d = l.put_bytes(b"leased", None).unwrap();
        // Prune from another handle while the lease is live keeps it.
        let other = open(dir.path());
        other.prune(&PruneOptions::default()).unwrap();
        assert!(s.content().has(&d), "leased blob survives");
        d
    };
    // An orphan temp file and an orphan snapshot directory.
    std::fs::write(s.tmp_dir().join("blob-orphan"), "x").unwrap();
    std::fs::create_dir_all(dir.path().join("snapshots/deadbeef/fs")).unwrap();

    let r = s.prune(&PruneOptions::default()).unwrap();
    assert!(
        !s.content().has(&junk) && !s.content().has(&leased),
        "{r:?}"
    );
    assert!(s.content().has(&layer) && s.content().has(&manifest) && s.content().has(&config));
    assert!(sn.stat("junk-snap").is_err());
    assert!(sn.stat("old-snap").is_ok() && sn.stat("new-snap").is_ok());
    assert!(!dir.path().join("snapshots/deadbeef").exists());
    assert_eq!(tmp_entries(&s), 0);

    // keep-storage: room for one record only -> the older goes.
    let r = s
        .prune(&PruneOptions {
            all: false,
            keep_storage: Some(150_000),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.cache_records_removed, 1, "{r:?}");
    assert!(sn.stat("old-snap").is_err() && sn.stat("new-snap").is_ok());
    // --all drops the rest of the cache, images stay.
    s.prune(&PruneOptions {
        all: true,
        keep_storage: None,
        ..Default::default()
    })
    .unwrap();
    assert!(sn.stat("new-snap").is_err());
    assert!(s.content().has(&manifest));
    let df = s.df().unwrap();
    assert_eq!(df.images.count, 1);
    assert_eq!(df.build_cache.count, 0);
    assert!(s.check().unwrap().ok());
    // Untag: everything goes.
    s.meta().untag_image("docker.io/library/x:latest").unwrap();
    s.prune(&PruneOptions::default()).unwrap();
    assert!(s.content().list().unwrap().0.is_empty());
}

#[test]
fn two_leases_on_one_store_keep_apart_and_dropping_one_releases_only_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    // Two operations at once on one handle, each under its own lease.
    let a = s.leased(None).unwrap();
    let b = s.leased(None).unwrap();
    assert_ne!(
        a.current_lease().unwrap().id(),
        b.current_lease().unwrap().id()
    );
    assert!(
        s.current_lease().is_none(),
        "no ambient lease on the handle"
    );
    let da = a.put_bytes(b"written by a", None).unwrap();
    let db = b.put_bytes(b"written by b", None).unwrap();
    a.snapshotter().prepare("a-active", None).unwrap();
    a.snapshotter().commit("a-snap", "a-active").unwrap();
    b.snapshotter().prepare("b-active", None).unwrap();
    b.snapshotter().commit("b-snap", "b-active").unwrap();
    // Written outside both: joins neither.
    let loose = s.put_bytes(b"written by nobody", None).unwrap();
    let other = open(dir.path());
    other.prune(&PruneOptions::default()).unwrap();
    assert!(s.content().has(&da) && s.content().has(&db));
    assert!(s.meta().snapshot("a-snap").unwrap().is_some());
    assert!(s.meta().snapshot("b-snap").unwrap().is_some());
    assert!(
        !s.content().has(&loose),
        "a write outside a lease is not kept"
    );
    // The first operation ends: only its content becomes collectable.
    drop(a);
    other.prune(&PruneOptions::default()).unwrap();
    assert!(!s.content().has(&da), "a's blob released");
    assert!(
        s.meta().snapshot("a-snap").unwrap().is_none(),
        "a's snapshot released"
    );
    assert!(s.content().has(&db), "b's blob still leased");
    assert!(s.meta().snapshot("b-snap").unwrap().is_some());
    // A lease outlives its value while a handle holds it.
    let lease = s.lease(None).unwrap();
    let c = s.with_lease(&lease);
    drop(lease);
    let dc = c.put_bytes(b"written by c", None).unwrap();
    other.prune(&PruneOptions::default()).unwrap();
    assert!(s.content().has(&dc));
    drop((b, c));
    other.prune(&PruneOptions::default()).unwrap();
    assert!(!s.content().has(&db) && !s.content().has(&dc));
    assert!(s.meta().leases().unwrap().is_empty());
    assert!(s.check().unwrap().ok());
}

#[test]
fn crashed_process_lease_and_active_snapshot_are_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    // Ours (this process lives): kept.
    s.snapshotter().prepare("live-active", None).unwrap();
    // A child makes a lease, a leased blob and an active snapshot, then
    // exits without cleaning up (like a crash).
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_make_lease",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KILN_TEST_HELPER_ROOT", dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(s.snapshotter().stat("helper-active").is_ok());
    let helper_blob = Digest::sha256_of(b"helper blob");
    assert!(s.content().has(&helper_blob));
    let r = s.prune(&PruneOptions::default()).unwrap();
    assert!(r.leases_expired >= 1, "{r:?}");
    assert!(s.snapshotter().stat("helper-active").is_err(), "{r:?}");
    assert!(!s.content().has(&helper_blob));
    assert!(
        s.snapshotter().stat("live-active").is_ok(),
        "a live process's active snapshot stays"
    );
    assert!(s.check().unwrap().ok());
}

#[test]
fn helper_make_lease() {
    let Some(root) = std::env::var_os("KILN_TEST_HELPER_ROOT") else {
        return;
    };
    let s = open(std::path::Path::new(&root));
    let s = s.leased(None).unwrap();
    s.put_bytes(b"helper blob", None).unwrap();
    s.snapshotter().prepare("helper-active", None).unwrap();
    // exit without deleting the lease: like a crash
    std::process::exit(0);
}

#[test]
fn helper_worker() {
    let Some(root) = std::env::var_os("KILN_TEST_HELPER_ROOT") else {
        return;
    };
    let id: usize = std::env::var("KILN_TEST_WORKER").unwrap().parse().unwrap();
    let s = open(std::path::Path::new(&root)).leased(None).unwrap();
    let sn = s.snapshotter();
    let mut parent: Option<String> = None;
    for i in 0..20 {
        // Shared blobs (every worker writes the same ones) and own ones.
        let shared = s.put_bytes(format!("shared-{i}").as_bytes(), None).unwrap();
        let own = s
            .put_bytes(format!("own-{id}-{i}").as_bytes(), None)
            .unwrap();
        let key = format!("w{id}-active-{i}");
        sn.prepare(&key, parent.as_deref()).unwrap();
        std::fs::write(sn.writable_dir(&key).unwrap().join(format!("f{i}")), "x").unwrap();
        let name = format!("w{id}-layer-{i}");
        sn.commit(&name, &key).unwrap();
        s.meta()
            .cache_put(&format!("w{id}-key-{i}"), Some(&name), None, &[shared, own])
            .unwrap();
        // A cache record every worker races on.
        s.meta()
            .cache_put(&format!("common-{i}"), Some(&name), None, &[])
            .unwrap();
        parent = Some(name);
        let p = format!("/ctx/{id}/{i}");
        let st = FileStat {
            dev: 1,
            ino: i,
            size: 1,
            mtime_ns: 1,
            ctime_ns: 1,
            mode: 0o100644,
        };
        s.meta()
            .file_hashes_put(&[(p.as_str(), st, "sha256:1")])
            .unwrap();
        assert!(s
            .meta()
            .cache_get(&format!("common-{i}"))
            .unwrap()
            .is_some());
    }
}

#[test]
fn four_processes_share_one_store() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let children: Vec<_> = (0..4)
        .map(|i| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "helper_worker",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("KILN_TEST_HELPER_ROOT", dir.path())
                .env("KILN_TEST_WORKER", i.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "worker failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = open(dir.path());
    assert_eq!(s.meta().cache_records().unwrap().len(), 4 * 20 + 20);
    let report = s.check().unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    // Leases ended with the workers; cache records keep everything.
    let r = s.prune(&PruneOptions::default()).unwrap();
    assert_eq!(r.snapshots_removed, 0, "{r:?}");
    assert!(s.check().unwrap().ok());
}

/// A locally built layer is kept as its snapshot's diff (no file): it
/// reads back as the same bytes, its size is known, `check` verifies it by
/// writing it again, a changed snapshot is caught, and GC keeps the
/// snapshot while the blob is reachable and drops both after.
#[test]
fn layer_kept_as_its_snapshot_reads_back_and_is_verified() {
    use kiln_image::diff::{write_tree_diff, DiffOptions};
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let sn = s.snapshotter();
    sn.prepare("b", None).unwrap();
    let w = sn.writable_dir("b").unwrap();
    std::fs::create_dir(w.join("etc")).unwrap();
    std::fs::write(w.join("etc/motd"), "hello\n").unwrap();
    std::fs::write(w.join("big"), vec![3u8; 300_000]).unwrap();
    let opts = DiffOptions {
        clamp_mtime: Some(0),
        exclude: vec!["etc/skip".into()],
        cancel: None,
    };
    // What the builder does: hash the diff, commit, record the source.
    let mut tar = Vec::new();
    write_tree_diff(None, &w, &mut tar, &opts).unwrap();
    let digest = Digest::sha256_of(&tar);
    sn.commit("layer-snap", "b").unwrap();
    s.record_layer_source(&digest, tar.len() as u64, "layer-snap", &opts)
        .unwrap();
    assert!(!s.content().has(&digest), "no file is written");
    assert!(s.has_blob(&digest));
    assert_eq!(s.blob_size(&digest).unwrap(), tar.len() as u64);
    let mut back = Vec::new();
    s.open_blob(&digest)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == tar, "the same bytes come back");

    // Referenced by an image: prune keeps blob and snapshot.
    let config = s.put_bytes(b"{}", None).unwrap();
    let manifest = s.put_bytes(b"{\"m\":2}", None).unwrap();
    s.record_image(
        "docker.io/library/lazy:latest",
        &manifest,
        &config,
        std::slice::from_ref(&digest),
    )
    .unwrap();
    s.prune(&PruneOptions::default()).unwrap();
    assert!(s.has_blob(&digest) && sn.stat("layer-snap").is_ok());
    let rep = s.check().unwrap();
    assert!(rep.ok(), "{rep:?}");

    // A snapshot changed behind the store's back is a read error and a
    // check problem, never silently different bytes.
    let fs = dir
        .path()
        .join("snapshots")
        .join(sn.stat("layer-snap").unwrap().id)
        .join("fs");
    std::fs::write(fs.join("etc/motd"), "HELLO\n").unwrap();
    let mut sink = Vec::new();
    let err = s
        .open_blob(&digest)
        .unwrap()
        .read_to_end(&mut sink)
        .unwrap_err();
    assert!(err.to_string().contains("snapshot changed"), "{err}");
    let rep = s.check().unwrap();
    assert!(!rep.ok(), "{rep:?}");

    // Untagged: prune drops the blob row and the snapshot.
    s.meta()
        .untag_image("docker.io/library/lazy:latest")
        .unwrap();
    s.prune(&PruneOptions::default()).unwrap();
    assert!(!s.has_blob(&digest));
    assert!(sn.stat("layer-snap").is_err());
}

/// A retired snapshot loses its row at once and waits under tmp/ for the
/// size-bounded sweep or prune; the sweep deletes oldest first.
#[test]
fn retired_snapshots_wait_for_the_sweep_or_prune() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let sn = s.snapshotter();
    for k in ["r1", "r2", "r3"] {
        sn.prepare(k, None).unwrap();
        std::fs::write(sn.writable_dir(k).unwrap().join("data"), vec![1u8; 50_000]).unwrap();
        sn.retire(k).unwrap();
        assert!(sn.stat(k).is_err(), "row gone at once");
    }
    let retired = || {
        std::fs::read_dir(s.tmp_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("retired-"))
            .count()
    };
    assert_eq!(retired(), 3);
    assert!(
        s.check().unwrap().ok(),
        "retired directories are not faults"
    );
    assert_eq!(s.sweep_retired(u64::MAX).unwrap(), 0, "within budget");
    assert_eq!(retired(), 3);
    // Room for about two: the oldest goes.
    assert_eq!(s.sweep_retired(120_000).unwrap(), 1);
    assert_eq!(retired(), 2);
    s.prune(&PruneOptions::default()).unwrap();
    assert_eq!(retired(), 0);
}

/// Issue 15 item 5: a layer's size is its uncompressed tar's, as docker
/// reports it — recorded when the layer is unpacked, found once by
/// decompressing the stored blob in a store from before sizes were
/// recorded (no `diff_sizes` table), the blob's size when the blob is the
/// tar.
#[test]
fn layer_size_is_the_uncompressed_tar_recorded_at_unpack_or_found_once() {
    use kiln_cache::LayerBlob;
    let dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("zeros"), vec![0u8; 200_000]).unwrap();
    let (tar, diff_id, gz) = gzip_layer(src.path());
    assert!(gz.len() * 10 < tar.len(), "the test layer compresses well");

    // Unpacked: recorded.
    let s = open(dir.path());
    let bd = s.put_bytes(&gz, None).unwrap();
    let bn = Some(gz.len() as u64);
    let lb = LayerBlob {
        digest: &bd,
        size: bn,
        diff_id: &diff_id,
    };
    s.unpack_layer(diff_id.as_str(), None, lb).unwrap();
    assert_eq!(
        s.meta().diff_size(&diff_id).unwrap(),
        Some(tar.len() as u64)
    );
    assert_eq!(s.layer_size(lb).unwrap(), tar.len() as u64);
    drop(s);

    // A store from before: no table. Reopened, the size is found by
    // decompressing the blob once, and recorded.
    let db = rusqlite::Connection::open(dir.path().join("meta.db")).unwrap();
    db.execute_batch("DROP TABLE diff_sizes").unwrap();
    drop(db);
    let s = open(dir.path());
    assert_eq!(s.meta().diff_size(&diff_id).unwrap(), None);
    assert_eq!(s.layer_size(lb).unwrap(), tar.len() as u64);
    assert_eq!(
        s.meta().diff_size(&diff_id).unwrap(),
        Some(tar.len() as u64)
    );

    // The blob is the tar: its size.
    let other = Digest::sha256_of(b"not stored");
    let plain = LayerBlob {
        digest: &other,
        size: Some(1234),
        diff_id: &other,
    };
    assert_eq!(s.layer_size(plain).unwrap(), 1234);
    // A blob that is not here, or not the layer its config names: the
    // manifest's size, the best there is (never a wrong recorded one).
    let wrong = Digest::sha256_of(b"another diff");
    let lying = LayerBlob {
        digest: &bd,
        size: bn,
        diff_id: &wrong,
    };
    assert_eq!(s.layer_size(lying).unwrap(), gz.len() as u64);
    assert_eq!(s.meta().diff_size(&wrong).unwrap(), None);
}

/// A cache import unpacks a compressed layer once and keeps its tar on
/// the way (`unpack_layer_keeping_tar`): the tar is stored under the
/// diffID, byte for byte, and the files are applied; a blob whose tar is
/// not the diffID leaves neither a snapshot nor a tar; an existing
/// snapshot is not unpacked again (nothing kept, the caller falls back).
#[test]
fn unpack_keeping_tar_stores_the_verified_tar_once() {
    use kiln_cache::LayerBlob;
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(src.path().join("zeros"), vec![0u8; 300_000]).unwrap();
    let (tar, diff_id, gz) = gzip_layer(src.path());
    let s = open(dir.path());
    let bd = s.put_bytes(&gz, None).unwrap();
    let blob = |diff_id| LayerBlob {
        digest: &bd,
        size: Some(gz.len() as u64),
        diff_id,
    };

    // Not the layer its config names: nothing kept.
    let wrong = Digest::sha256_of(b"another layer");
    assert!(s
        .unpack_layer_keeping_tar(wrong.as_str(), None, blob(&wrong))
        .is_err());
    assert!(!s.has_blob(&wrong));
    assert!(s.snapshotter().stat(wrong.as_str()).is_err());
    assert_eq!(tmp_entries(&s), 0, "no temp file left behind");

    let lb = blob(&diff_id);
    assert!(s
        .unpack_layer_keeping_tar(diff_id.as_str(), None, lb)
        .unwrap());
    let mut kept = Vec::new();
    s.open_blob(&diff_id)
        .unwrap()
        .read_to_end(&mut kept)
        .unwrap();
    assert!(kept == tar, "the kept tar is the layer's tar");
    assert_eq!(s.blob_size(&diff_id).unwrap(), tar.len() as u64);
    let applied: Vec<_> = std::fs::read_dir(dir.path().join("snapshots"))
        .unwrap()
        .filter_map(|e| std::fs::read(e.unwrap().path().join("fs/a.txt")).ok())
        .collect();
    assert_eq!(applied, vec![b"alpha\n".to_vec()], "the files are applied");
    // Already there: nothing unpacked, nothing kept.
    assert!(!s
        .unpack_layer_keeping_tar(diff_id.as_str(), None, lb)
        .unwrap());
}

/// A base image's layer kept lazy: verified when it is kept (a blob that
/// is not the diffID's tar is refused and nothing is recorded), no
/// snapshot until first use, then unpacked with its files; keeping it again
/// hashes nothing new.
#[test]
fn base_layers_kept_lazy_are_verified_first_and_unpacked_on_use() {
    use kiln_cache::LayerBlob;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("base.txt"), b"base\n").unwrap();
    let (_, diff_id, gz) = gzip_layer(src.path());
    let blob = s.put_bytes(&gz, None).unwrap();
    let gzip = "application/vnd.oci.image.layer.v1.tar+gzip";
    let lb = LayerBlob {
        digest: &blob,
        size: Some(gz.len() as u64),
        diff_id: &diff_id,
    };

    // A config lying about the diffID: refused, nothing kept.
    let liar = Digest::sha256_of(b"another layer");
    let lying = LayerBlob {
        diff_id: &liar,
        ..lb
    };
    let e = s
        .keep_layer_lazy(liar.as_str(), None, lying, gzip)
        .unwrap_err();
    assert!(matches!(e, Error::DiffIdMismatch { .. }), "{e}");
    assert!(s.meta().lazy_layers(liar.as_str()).unwrap().is_empty());
    s.keep_layer_lazy(diff_id.as_str(), None, lb, gzip).unwrap();
    assert!(s.snapshotter().stat(diff_id.as_str()).is_err(), "unpacked");
    assert_eq!(s.meta().lazy_layers(diff_id.as_str()).unwrap().len(), 1);
    assert_eq!(
        s.meta().diff_size(&diff_id).unwrap(),
        Some(gzip_layer(src.path()).0.len() as u64)
    );
    s.keep_layer_lazy(diff_id.as_str(), None, lb, gzip).unwrap();
    assert_eq!(s.meta().lazy_layers(diff_id.as_str()).unwrap().len(), 1);

    assert!(s.unpack_lazy(diff_id.as_str()).unwrap());
    let info = s.snapshotter().stat(diff_id.as_str()).unwrap();
    let made = dir
        .path()
        .join("snapshots")
        .join(&info.id)
        .join("fs/base.txt");
    assert_eq!(std::fs::read(made).unwrap(), b"base\n");
    // Unpacked: keeping it again is nothing.
    s.keep_layer_lazy(diff_id.as_str(), None, lb, gzip).unwrap();

    // A manifest size that is not the blob's: refused (and, as for an
    // unpack, the stored blob is moved aside: pulling again repairs it).
    let other = Digest::sha256_of(b"no such chain").to_string();
    let wrong_size = LayerBlob {
        size: Some(1),
        ..lb
    };
    assert!(s.keep_layer_lazy(&other, None, wrong_size, gzip).is_err());
    assert!(s.meta().lazy_layers(&other).unwrap().is_empty());
}

/// A lazy layer (a cached result kept as its compressed blob) is a hit
/// while its blob is stored, becomes its snapshot on first use — verified
/// like any unpack, its parent first — and is forgotten by prune once its
/// blob is gone; a lazy layer whose tar is not its diffID is refused and
/// leaves no snapshot, and a truer candidate for the same snapshot wins.
#[test]
fn lazy_layers_unpack_on_first_use_verified_and_go_with_their_blobs() {
    use kiln_cache::LazyLayer;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let layer = |name: &str, body: &[u8]| {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join(name), body).unwrap();
        let (_, diff_id, gz) = gzip_layer(src.path());
        let blob = s.put_bytes(&gz, None).unwrap();
        (diff_id, blob, gz.len() as u64)
    };
    let (d1, b1, n1) = layer("one.txt", b"one\n");
    let (d2, b2, n2) = layer("two.txt", b"two\n");
    let c1 = d1.to_string();
    let c2 = Digest::sha256_of(format!("{c1} {d2}").as_bytes()).to_string();
    let lazy = |snapshot: &str, parent: Option<&str>, blob: &Digest, size, diff_id: &Digest| {
        s.meta()
            .put_lazy_layer(&LazyLayer {
                snapshot: snapshot.to_string(),
                parent: parent.map(str::to_string),
                blob: blob.clone(),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                size,
                diff_id: diff_id.clone(),
            })
            .unwrap()
    };
    lazy(&c1, None, &b1, n1, &d1);
    lazy(&c2, Some(&c1), &b2, n2, &d2);
    s.meta().put_lazy_cache("step-2", &c2, &b2, 7).unwrap();
    assert_eq!(
        s.meta().lazy_cache("step-2").unwrap(),
        Some((c2.clone(), b2.clone(), 7))
    );
    assert_eq!(s.lazy_ready(&c2).unwrap().map(|l| l.blob), Some(b2.clone()));
    assert_eq!(
        s.lazy_ready_with(&c2, &b2).unwrap().map(|l| l.blob),
        Some(b2.clone())
    );
    // Another build's blob claiming the same snapshot, recorded first or
    // later, never describes the step bound to b2.
    let (_, other, other_n) = layer("other.txt", b"other\n");
    lazy(&c2, Some(&c1), &other, other_n, &d2);
    assert_eq!(
        s.lazy_ready_with(&c2, &b2).unwrap().map(|l| l.blob),
        Some(b2.clone())
    );
    assert_eq!(
        s.lazy_ready_with(&c2, &other).unwrap().map(|l| l.blob),
        Some(other.clone())
    );
    assert!(s.lazy_ready_with(&c2, &b1).unwrap().is_none());
    s.meta().drop_lazy_layer(&c2, &other).unwrap();
    assert!(s.snapshotter().stat(&c1).is_err(), "nothing unpacked yet");

    // First use: the parent, then the layer.
    assert!(s.unpack_lazy(&c2).unwrap());
    assert!(s.snapshotter().stat(&c1).is_ok() && s.snapshotter().stat(&c2).is_ok());
    assert!(!s.unpack_lazy(&c2).unwrap(), "made once");
    assert!(
        s.lazy_ready(&c2).unwrap().is_some(),
        "still a hit once unpacked"
    );
    let files: Vec<String> = std::fs::read_dir(dir.path().join("snapshots"))
        .unwrap()
        .flat_map(|e| std::fs::read_dir(e.unwrap().path().join("fs")).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.contains(&"one.txt".into()) && files.contains(&"two.txt".into()),
        "{files:?}"
    );

    // A lazy layer claiming another diffID: refused, no snapshot.
    let liar = Digest::sha256_of(b"not the layer");
    let (_, b3, n3) = layer("three.txt", b"three\n");
    lazy(liar.as_str(), None, &b3, n3, &liar);
    assert!(s.unpack_lazy(liar.as_str()).is_err());
    assert!(s.snapshotter().stat(liar.as_str()).is_err());

    // Without its blob a lazy layer is no hit; prune forgets it.
    let (d4, b4, n4) = layer("four.txt", b"four\n");
    lazy(d4.as_str(), None, &b4, n4, &d4);
    s.meta()
        .put_lazy_cache("step-4", d4.as_str(), &b4, 1)
        .unwrap();
    s.prune(&PruneOptions::default()).unwrap();
    assert!(
        s.lazy_ready(d4.as_str()).unwrap().is_none(),
        "blob collected"
    );
    assert_eq!(s.meta().lazy_cache("step-4").unwrap(), None);
    assert!(s.meta().lazy_layers(d4.as_str()).unwrap().is_empty());

    // Two candidates for one snapshot, the first lying: it is dropped and
    // the true one unpacked. A row whose name is not its chain ID is
    // never used.
    let (d5, b5, n5) = layer("five.txt", b"five\n");
    let (_, evil, evil_n) = layer("evil.txt", b"evil\n");
    lazy(d5.as_str(), None, &evil, evil_n, &d5);
    lazy(d5.as_str(), None, &b5, n5, &d5);
    assert!(s.unpack_lazy(d5.as_str()).unwrap());
    let left: Vec<Digest> = s
        .meta()
        .lazy_layers(d5.as_str())
        .unwrap()
        .into_iter()
        .map(|l| l.blob)
        .collect();
    assert_eq!(left, vec![b5.clone()], "the lying candidate is forgotten");
    let (d6, b6, n6) = layer("six.txt", b"six\n");
    lazy("not-its-chain-id", None, &b6, n6, &d6);
    assert!(s.lazy_ready("not-its-chain-id").unwrap().is_none());
    assert!(!s.unpack_lazy("not-its-chain-id").unwrap());
}

/// A fetcher over an in-memory "registry" (a unit test of the store's
/// logic; the registry path is `registry_cache_e2e`'s): serves `bytes` for
/// every digest, through the store's verified ingest.
struct MemFetcher {
    bytes: Vec<u8>,
    calls: std::sync::atomic::AtomicUsize,
}

impl kiln_cache::BlobFetcher for MemFetcher {
    fn fetch(
        &self,
        store: &Store,
        _from: &kiln_cache::RemoteBlob,
        digest: &Digest,
        size: u64,
        media_type: Option<&str>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        store.put_blob(&self.bytes[..], Some(digest), Some(size), media_type)?;
        Ok(())
    }
}

/// A blob kept in a registry is readable, downloaded (verified) on first
/// read and once; a registry serving other bytes under its digest stores
/// nothing; without a fetcher the read is a clear error; and the record
/// never stands in for the blob where a local copy is at stake (a pull
/// must download it; a local layer of that digest replaces the record).
#[test]
fn a_blob_kept_in_a_registry_is_fetched_verified_on_first_read() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let from = kiln_cache::RemoteBlob {
        registry: "registry.example".into(),
        repo: "cache".into(),
        insecure: false,
    };
    let bytes = b"a layer kept in a registry".to_vec();
    let d = Digest::sha256_of(&bytes);
    let gz = "application/vnd.oci.image.layer.v1.tar+gzip";

    // No fetcher: readable on paper, a clear error on read.
    let bare = open(dir.path());
    bare.record_remote_blob(&d, bytes.len() as u64, gz, &from)
        .unwrap();
    assert!(bare.has_blob(&d) && !bare.has_local_blob(&d));
    assert_eq!(bare.remote_blob(&d).unwrap(), Some(from.clone()));
    let err = bare.open_blob(&d).err().expect("no fetcher");
    assert!(matches!(err, Error::Fetch { .. }), "{err}");
    assert!(err.to_string().contains("registry.example"), "{err}");
    drop(bare);

    // A lying registry: nothing stored, the record kept.
    let liar = Arc::new(MemFetcher {
        bytes: b"other bytes of the same size!!".to_vec()[..bytes.len()].to_vec(),
        calls: Default::default(),
    });
    let s = open(dir.path()).with_fetcher(liar.clone());
    let err = s.open_blob(&d).err().expect("lying registry");
    assert!(matches!(err, Error::Fetch { .. }), "{err}");
    assert!(
        s.content().size(&d).is_err(),
        "unverified bytes were stored"
    );
    assert!(s.remote_blob(&d).unwrap().is_some());

    // An honest one: fetched once, then an ordinary blob.
    let honest = Arc::new(MemFetcher {
        bytes: bytes.clone(),
        calls: Default::default(),
    });
    let s = open(dir.path()).with_fetcher(honest.clone());
    let mut got = Vec::new();
    s.open_blob(&d).unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got, bytes);
    s.open_blob(&d)
        .unwrap()
        .read_to_end(&mut Vec::new())
        .unwrap();
    assert_eq!(honest.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(s.has_local_blob(&d) && s.remote_blob(&d).unwrap().is_none());
    assert!(s.check().unwrap().problems.is_empty());

    // A record claiming a digest a local layer has: the layer wins.
    let sn = s.snapshotter();
    sn.prepare("b", None).unwrap();
    let w = sn.writable_dir("b").unwrap();
    std::fs::write(w.join("f"), "local").unwrap();
    let opts = kiln_image::diff::DiffOptions::default();
    let mut tar = Vec::new();
    kiln_image::diff::write_tree_diff(None, &w, &mut tar, &opts).unwrap();
    let digest = Digest::sha256_of(&tar);
    s.record_remote_blob(&digest, tar.len() as u64, gz, &from)
        .unwrap();
    sn.commit("layer-a", "b").unwrap();
    s.record_layer_source(&digest, tar.len() as u64, "layer-a", &opts)
        .unwrap();
    assert!(
        s.has_local_blob(&digest),
        "the cache's record shadowed a local layer"
    );
    let mut back = Vec::new();
    s.open_blob(&digest)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, tar);

    // A record claiming another size for a blob later stored: the stored
    // file's size is recorded (the claim does not outlive the bytes), and
    // a blob already stored gets no location from a record.
    let real = b"the real bytes".to_vec();
    let rd = Digest::sha256_of(&real);
    s.record_remote_blob(&rd, 999_999, gz, &from).unwrap();
    assert_eq!(s.put_bytes(&real, None).unwrap(), rd);
    assert_eq!(
        s.meta().blob_row(&rd).unwrap().map(|r| r.0),
        Some(real.len() as u64)
    );
    assert!(s.check().unwrap().problems.is_empty());
    // A later record of a blob not downloaded yet replaces an earlier
    // one (a hostile import naming an unreachable place): the later
    // build reads it where its own import said.
    let pending = Digest::sha256_of(b"not downloaded");
    s.record_remote_blob(&pending, 14, gz, &from).unwrap();
    let later = kiln_cache::RemoteBlob {
        registry: "later.example".into(),
        repo: "r".into(),
        insecure: false,
    };
    s.record_remote_blob(&pending, 14, gz, &later).unwrap();
    assert_eq!(s.remote_blob(&pending).unwrap(), Some(later.clone()));
    let stored = s.put_bytes(b"stored first", None).unwrap();
    let elsewhere = kiln_cache::RemoteBlob {
        registry: "elsewhere.example".into(),
        repo: "r".into(),
        insecure: false,
    };
    s.record_remote_blob(&stored, 12, gz, &elsewhere).unwrap();
    assert_eq!(
        s.meta()
            .blob_location(&stored, "elsewhere.example", "")
            .unwrap(),
        None
    );
}
