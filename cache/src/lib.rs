//! # kiln-cache — everything kiln keeps on disk
//!
//! **What this room is for.** One store root (`--root`, `$KILN_ROOT`,
//! `/var/lib/kiln`) shared safely by several kiln processes: the content
//! store (blobs by digest, written temp + fsync + verify + rename), the
//! snapshotters (overlay by default, a copying native fallback) in
//! containerd's lifecycle terms, the SQLite metadata database (images,
//! manifests, snapshots, the cache index, leases, the stat-keyed file-hash
//! cache) and garbage collection.
//!
//! **What it owns.** The directory layout under the root and every write to
//! it; crash safety (a `kill -9` at any instant leaves a store that opens and
//! verifies).
//!
//! **What it must not do.** It hands out mounts as data and never runs
//! processes (that is `kiln-executor`); it stores OCI blobs but leaves their
//! formats to `kiln-image`; it never talks to a registry.
#![deny(missing_docs)]
