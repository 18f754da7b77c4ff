//! # kiln-solver — from a parsed Dockerfile to a built image
//!
//! **What this room is for.** The solver lowers the typed instructions of
//! `kiln-parser` into a DAG of ops (`Source`, `Exec`, `File` and image-config
//! edits), gives every vertex a content-addressed cache key
//! (`sha256(op definition || input keys || selected input content)`), and
//! schedules the graph on tokio so that independent vertices run
//! concurrently and identical keys run once.
//!
//! **What it owns.** Lowering rules (stages, `--target` pruning, `COPY
//! --from` edges, ONBUILD splicing), cache-key derivation, the scheduler and
//! the progress event stream.
//!
//! **What it must not do.** It does not parse Dockerfile text (that is
//! `kiln-parser`), does not touch namespaces or mounts itself (that is
//! `kiln-executor`), and does not know on-disk layouts (that is
//! `kiln-cache` / `kiln-image`). It talks to each through their public APIs.
#![deny(missing_docs)]
