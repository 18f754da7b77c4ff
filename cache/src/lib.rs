//! # kiln-cache — everything kiln keeps on disk
//!
//! **What this room is for.** One store root (`--root`, `$KILN_ROOT`,
//! `/var/lib/kiln`) shared safely by several kiln processes: the content
//! store (blobs by digest, written temp + fsync + verify + rename), the
//! snapshotters (overlay by default, a copying native fallback) in
//! containerd's lifecycle terms, the SQLite metadata database (images,
//! manifests, snapshots, the cache index, leases, the stat-keyed file-hash
//! cache) and garbage collection; also the layer digests of snapshots:
//! diffed at commit ([`DiffSource::digest`]), or hashed while a COPY
//! writes its fresh snapshot ([`LayerStream`], checked against the
//! snapshot before it is trusted).
//!
//! **What it owns.** The directory layout under the root and every write to
//! it; crash safety (a `kill -9` at any instant leaves a store that opens and
//! verifies).
//!
//! **What it must not do.** It hands out mounts as data and never runs
//! processes (that is `kiln-executor`); it stores OCI blobs but leaves their
//! formats to `kiln-image`; it never talks to a registry.
//!
//! ## Example
//!
//! ```no_run
//! use kiln_cache::{Store, PruneOptions};
//!
//! # fn main() -> Result<(), kiln_cache::Error> {
//! let store = Store::open("/tmp/kiln-example")?;
//! // What this build writes through `store` is kept from GC while the
//! // handle lives (its lease is explicit: other handles don't join it).
//! let store = store.leased(None)?;
//!
//! // A blob, verified and durable before its row is written.
//! let config = store.put_bytes(br#"{"architecture":"amd64"}"#, None)?;
//! assert!(store.content().has(&config));
//!
//! // A snapshot: prepare -> (run / apply into it) -> commit.
//! let sn = store.snapshotter();
//! let mounts = sn.prepare("build-1", None)?; // mounts as data for the executor
//! std::fs::write(sn.writable_dir("build-1")?.join("hello"), "hi").unwrap();
//! sn.commit("layer-1", "build-1")?;
//! store.meta().cache_put("cachekey-1", Some("layer-1"), None, &[])?;
//! # let _ = mounts;
//!
//! // Later: what is on disk, is it sound, reclaim the rest.
//! let report = store.check()?;
//! assert!(report.ok(), "{:?}", report.problems);
//! store.prune(&PruneOptions::default())?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod cachemount;
mod chunkpipe;
mod content;
mod digest;
mod error;
mod gc;
mod layerstream;
mod meta;
mod reference;
pub mod snapshot;
mod store;
mod unpack;
mod util;

pub use cachemount::{CacheMountDir, CacheMountRecord, CacheSharing};
pub use content::{BlobListing, BlobWriter, ContentStore};
pub use digest::{Digest, Hasher};
pub use error::{Error, Result};
pub use gc::{CheckReport, DfEntry, DiskUsage, PruneOptions, PruneReport};
pub use layerstream::{LayerStream, Marks, StreamedDiff, MARKS_FILE};
pub use meta::{
    CacheRecord, FileStat, ImageRecord, Kind, LazyLayer, Lease, LeaseRecord, Meta, SnapshotRow,
    SCHEMA_VERSION,
};
pub use reference::normalize_reference;
pub use snapshot::{apply_into, ApplyMode, DiffSource, Info, Mount, Snapshotter, Usage};
pub use store::{
    default_root, is_untagged_name, retired_over_budget, untagged_name, BlobFetcher, GcGuard,
    NoHome, RemoteBlob, SnapshotterKind, Store, StoreOptions,
};
pub use unpack::{LayerBlob, MAX_CHAIN};
pub use util::ProcessId;
