//! # kiln-solver — from a parsed Dockerfile to a built image
//!
//! **What this room is for.** The solver lowers the typed instructions of
//! `kiln-parser` into the steps of a build, gives every layer-producing step
//! a content-addressed cache key
//! (`sha256(op definition || parent key || selected input content)`), and
//! schedules the stages on tokio so that independent stages run
//! concurrently and identical keys run once.
//!
//! **The library facade.** [`session`] is the entry point for the CLI and
//! for embedders: [`session::Session`] + [`session::BuildRequest`] ->
//! [`BuildResult`], doing what `kiln build` does (context and Dockerfile
//! resolution in [`context`], named contexts, cache import, the solve,
//! then the [`export`]ers behind one trait, cache exporters included).
//! The crates it builds on are re-exported ([`cache`], [`image`],
//! [`registry`], [`parser`], [`executor`]) so that a program depending
//! on this crate alone reaches their types.
//!
//! **What it owns.** Lowering rules (stages, `--target` pruning, `COPY
//! --from` edges, ARG/ENV scoping and expansion), cache-key derivation, the
//! scheduler, COPY/ADD file operations on snapshot layers, and the progress
//! event stream.
//!
//! **What it must not do.** It does not parse Dockerfile text (that is
//! `kiln-parser`), does not touch namespaces or mounts itself (that is
//! `kiln-executor`), and does not know on-disk layouts (that is
//! `kiln-cache` / `kiln-image`). It talks to each through their public APIs.
#![deny(missing_docs)]

pub mod archive;
pub mod backend;
pub mod build;
pub mod chmod;
pub mod context;
pub mod contexts;
pub mod copy;
pub mod error;
pub mod export;
pub mod flatten;
pub mod fsview;
pub mod key;
pub mod link;
pub mod lint;
pub mod main_context;
pub mod parents;
pub mod plan;
pub mod progress;
pub mod remote;
pub mod remote_cache;
pub mod session;
pub mod store;
pub mod transfer;

pub use build::{build, BuildOptions, BuildResult, ResourceLimits};
pub use error::BuildError;

/// The store ([`kiln_cache`]), re-exported so that a program depending on
/// the facade alone (the CLI) reaches its types: image records, prune,
/// df, check.
pub use kiln_cache as cache;
/// The sandbox ([`kiln_executor`]), re-exported for `kiln run`.
pub use kiln_executor as executor;
/// OCI formats ([`kiln_image`]), re-exported.
pub use kiln_image as image;
/// The Dockerfile parser ([`kiln_parser`]), re-exported.
pub use kiln_parser as parser;
/// The registry client ([`kiln_registry`]), re-exported.
pub use kiln_registry as registry;
