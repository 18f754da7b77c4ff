//! # kiln-parser — Dockerfile text to a typed build description
//!
//! **What this room is for.** Turning the text of a Dockerfile into data the
//! solver can lower, with BuildKit's exact semantics:
//!
//! * [`shell`] — the shell-word expander (`$V`, `${V:-x}`, `${V#p}`, quotes,
//!   escapes, word splitting) that BuildKit's `shell.Lex` defines;
//! * [`dockerignore`] — `.dockerignore` reading and Docker's patternmatcher
//!   rules.
//!
//! **What it owns.** Syntax: directives, line continuations, heredocs, flags,
//! the AST and its source spans, the typed instructions and their
//! validation, and error messages that point at `file:line:column`.
//!
//! **What it must not do.** No I/O of any kind: callers hand it strings and
//! environment lookups. It knows nothing of images, caches or namespaces.
#![deny(missing_docs)]

pub mod dockerignore;
pub mod shell;
