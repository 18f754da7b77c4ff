//! # kiln-solver — from a parsed Dockerfile to a built image
//!
//! **What this room is for.** A build goes through three rooms here:
//! [`frontend`] lowers the typed instructions of `kiln-parser` to an op
//! graph ([`op`]: typed `Exec`/`Copy`/`Mkdir` ops in per-stage chains,
//! with the stage's image config and history), [`op::key`] keys every op
//! with one function (`sha256(op definition || input keys || content
//! digests of selected inputs)`), and [`solve`] schedules the graph on
//! tokio so that independent stages run concurrently, identical keys run
//! once, and every op goes one way: look up, or prepare → run → commit.
//! [`build`] joins them behind the `build(...)` entry. A multi-platform
//! build (`BuildOptions::platforms`) lowers one graph per target platform
//! (every stage, RUN and image source carries its platform; BuildKit's
//! `TARGET*`/`BUILD*` args), merges them into one graph solved by one
//! scheduler (a `FROM --platform=$BUILDPLATFORM` stage that does not
//! depend on the target runs once), and writes one image per platform
//! and an index of them ([`backend::Backend::export_index`]); a foreign
//! RUN checks QEMU emulation (`kiln_executor::emulation`) before it runs.
//!
//! **The library facade.** [`session`] is the entry point for the CLI and
//! for embedders: [`session::Session`] + [`session::BuildRequest`] ->
//! [`BuildResult`], doing what `kiln build` does (context and Dockerfile
//! resolution in [`context`], named contexts, cache import, the solve,
//! then the [`export`]ers behind one trait, cache exporters included),
//! and, in [`images`], every other command's work as `Session` methods
//! with typed errors: list/find/inspect/history/tag/untag, load, import,
//! pull and push (cancellable), save, filesystem export, prune, disk
//! usage, check, login/logout; [`run`] is `kiln run`, and [`debug_ast`]
//! `kiln debug ast`, so the CLI names no store, executor or parser
//! type of its own. A stored name may point at an index
//! (`pull --all-platforms`); [`platforms`] picks one platform's image of
//! it for every command that shows, runs, saves or exports one. Progress of all of it — build steps,
//! notes, warnings, blob transfers — is one [`progress::Event`] type on
//! one bounded stream ([`export::Reporter`] is a thin adapter over it).
//! The crates it builds on are re-exported ([`cache`], [`image`],
//! [`registry`], [`parser`], [`executor`]) so that a program depending
//! on this crate alone reaches their types.
//!
//! **What it owns.** Lowering rules (stages, `--target` pruning, `COPY
//! --from` edges, ARG/ENV scoping and expansion, platforms, ONBUILD, history),
//! cache-key derivation, the scheduler, COPY/ADD file operations on
//! snapshot layers, and the progress event stream. Its two seams are
//! traits with in-memory fakes ([`testing`]): [`backend::Backend`] (the
//! store) and [`solve::runner::Runner`] (the executor), so lowering, keys
//! and scheduling are tested without root.
//!
//! **Two decisions, kept on purpose.** Config-only instructions (ENV,
//! LABEL, EXPOSE, USER, CMD, …) live in
//! [`op::StageOps::config`] rather than as ops: that is BuildKit's own shape —
//! `dockerfile2llb` keeps the image config out of LLB and hands it to the
//! exporter as metadata — so they make no vertex, no key and no layer.
//! And a step's key includes the diffID of the layer below (a chain key,
//! content-addressed): a rebuild that makes a byte-identical parent
//! layer hits the cache again, and a key made from the definitions alone
//! would change nothing for users but bump the key version (emptying
//! every cache) once.
//!
//! **Leases and cancellation.** A build, pull, load, import or export
//! writes through a store handle made with its own lease
//! (`kiln_cache::Store::leased`), so concurrent operations never join
//! each other's lease and what a running build holds is not collected.
//! The build's cancel token reaches every blocking part: running steps,
//! COPY (between entries and 32 MiB chunks), the hashing of COPY sources
//! before the cache lookup (between files and every 8 MiB), and the
//! differ of a layer's commit (`kiln_image::diff::Cancel`, between
//! entries and reads); a cancelled commit records nothing.
//!
//! **What it must not do.** It does not parse Dockerfile text (that is
//! `kiln-parser`), does not touch namespaces or mounts itself (that is
//! `kiln-executor`), and does not know on-disk layouts (that is
//! `kiln-cache` / `kiln-image`). It talks to each through their public
//! APIs. The frontend knows no store and no executor.
#![deny(missing_docs)]

pub mod archive;
pub mod backend;
pub mod build;
pub mod change;
pub mod chmod;
pub mod context;
pub mod contexts;
pub mod copy;
pub mod error;
pub mod export;
pub mod flatten;
pub mod frontend;
pub mod fsview;
pub mod images;
pub mod link;
pub mod main_context;
pub mod op;
pub mod parents;
pub mod platforms;
pub mod progress;
pub mod remote;
pub mod remote_cache;
pub mod run;
pub mod session;
pub mod solve;
pub mod store;
pub mod testing;
pub mod transfer;

pub use build::{
    build, build_with_runner, BuildOptions, BuildResult, ResourceLimits, SandboxOptions, Ulimit,
};
pub use error::BuildError;
pub use frontend::{lint, plan};
pub use op::key;

/// Sizes as docker parses them (`10GB` = 10 GiB, `1k` = 1024 bytes): the
/// one parser `build --memory` and `prune --keep-storage` share.
pub use kiln_parser::units;

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

/// Why [`debug_ast`] gave no text.
#[derive(Debug, thiserror::Error)]
pub enum DebugAstError {
    /// The Dockerfile does not parse (render it with
    /// [`kiln_parser::ParseError::render`]: `file:line:col`, the line, a
    /// caret).
    #[error(transparent)]
    Parse(#[from] kiln_parser::ParseError),
    /// The instructions could not be written as JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// `kiln debug ast`: the parser's view of a Dockerfile — the syntax tree
/// as BuildKit's `dockerfile-frontend` dumps it, or (`json`) the typed
/// instructions as pretty JSON.
pub fn debug_ast(dockerfile: &str, json: bool) -> Result<String, DebugAstError> {
    Ok(if json {
        serde_json::to_string_pretty(&kiln_parser::parse(dockerfile)?)?
    } else {
        kiln_parser::parse_ast(dockerfile)?.dump()
    })
}
