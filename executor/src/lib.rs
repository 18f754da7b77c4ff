//! # kiln-executor — one process in fresh Linux namespaces
//!
//! **What this room is for.** Running a single build step: it takes an OCI
//! runtime `Spec` plus the rootfs mounts handed out by the snapshotter,
//! re-executes a single-threaded init, creates mount/pid/uts/ipc/cgroup (and
//! optionally network) namespaces, mounts the rootfs inside the child's
//! private mount namespace, pivot_roots, sets identity, capabilities,
//! rlimits and cgroup limits, and streams the process's output back.
//!
//! **What it owns.** Namespaces, mounts inside the sandbox, the init
//! protocol, cgroups of a step, and process lifecycle (timeouts,
//! cancellation, PDEATHSIG).
//!
//! **What it must not do.** It does not know about Dockerfiles, cache keys or
//! layers, and depends on no other kiln crate.
#![deny(missing_docs)]
