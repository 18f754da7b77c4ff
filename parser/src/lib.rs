//! # kiln-parser — Dockerfile text to a typed build description
//!
//! **What this room is for.** Turning the text of a Dockerfile into data the
//! solver can lower, with BuildKit's exact semantics, in two layers as
//! BuildKit has them:
//!
//! * [`ast`] — the lossless syntax tree ([`parse_ast`]): directives,
//!   continuations, comments, heredocs, flags, every node with its source
//!   lines, and BuildKit's debug dump format ([`ast::Ast::dump`]);
//! * [`instructions`] — typed instructions grouped into stages
//!   ([`parse`]): one Rust type per instruction, flags validated;
//! * [`shell`] — the shell-word expander (`$V`, `${V:-x}`, `${V#p}`, quotes,
//!   escapes, word splitting) that BuildKit's `shell.Lex` defines;
//! * [`dockerignore`] — `.dockerignore` reading and Docker's patternmatcher
//!   rules;
//! * [`glob`] — Go's `filepath.Match`, kiln's one wildcard matcher (COPY
//!   sources, pattern syntax checks), linear in pattern × name;
//! * [`units`] — human sizes as docker/go-units reads them (`RAMInBytes`).
//!
//! **What it owns.** Syntax: directives, line continuations, heredocs, flags,
//! the AST and its source spans, the typed instructions and their
//! validation, and error messages that point at `file:line:column`.
//!
//! **What it must not do.** No I/O of any kind: callers hand it strings and
//! environment lookups. It knows nothing of images, caches or namespaces.
//!
//! ```
//! let df = kiln_parser::parse("FROM busybox AS base\nRUN echo hi\n").unwrap();
//! assert_eq!(df.stages[0].name.as_deref(), Some("base"));
//! assert_eq!(df.stages[0].instructions.len(), 1);
//!
//! let err = kiln_parser::parse("FROM busybox\nCOPPY . /app\n").unwrap_err();
//! assert_eq!(err.location.line, 2);
//! assert_eq!(err.suggestion.as_deref(), Some("did you mean COPY?"));
//! ```
#![deny(missing_docs)]

pub mod ast;
pub mod directives;
pub mod dockerignore;
mod error;
pub mod glob;
pub mod instructions;
mod reader;
pub mod shell;
pub mod units;

pub use ast::Ast;
pub use error::{suggest, Location, ParseError};
pub use instructions::Dockerfile;
pub use reader::{parse_heredoc, HeredocError};

/// Parses Dockerfile text into its lossless syntax tree (BuildKit's
/// `parser.Parse`). Unknown instructions are kept; [`parse`] rejects them.
pub fn parse_ast(source: &str) -> Result<Ast, ParseError> {
    reader::parse(source)
}

/// Parses and validates a Dockerfile into typed stages.
pub fn parse(source: &str) -> Result<Dockerfile, ParseError> {
    let ast = reader::parse(source)?;
    instructions::lower(&ast, source)
}
