//! # kiln-registry — the OCI distribution API
//!
//! **What this room is for.** Resolving image references to digests,
//! pulling and pushing manifests and blobs (HEAD checks, cross-repository
//! mounts, chunked uploads, retries), and authentication (anonymous, basic,
//! bearer tokens, `~/.docker/config.json` auths and credential helpers).
//!
//! **What it owns.** Everything that crosses the network to a registry, and
//! the registry-backed build-cache format.
//!
//! **What it must not do.** It never writes the local store directly: blobs
//! flow through source/sink traits whose implementations live elsewhere.
#![deny(missing_docs)]
