//! Build errors. Every error that comes from a Dockerfile instruction keeps
//! the instruction's line so the CLI can point at it.

use kiln_parser::ParseError;

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Bad command-line input (unknown target, bad option value).
    #[error("{0}")]
    Usage(String),
    /// The Dockerfile does not parse or validate.
    #[error("{0}")]
    Dockerfile(#[from] ParseError),
    /// An instruction failed; `line` is its first Dockerfile line.
    #[error("{message}")]
    Step {
        /// 1-based Dockerfile line of the instruction.
        line: usize,
        /// What went wrong.
        message: String,
    },
    /// A RUN step exited unsuccessfully.
    #[error("process \"{command}\" did not complete successfully: {status}")]
    Run {
        /// 1-based Dockerfile line of the RUN.
        line: usize,
        /// The command as run (shell form joined).
        command: String,
        /// `exit code: N` or `killed by signal S`.
        status: String,
        /// The last lines of output.
        tail: Vec<String>,
    },
    /// The build was interrupted.
    #[error("build cancelled")]
    Cancelled,
    /// The store, the executor or the file system failed.
    #[error("{0}")]
    Internal(String),
}

impl BuildError {
    /// An instruction-level error at `line`.
    pub fn at(line: usize, message: impl Into<String>) -> Self {
        BuildError::Step {
            line,
            message: message.into(),
        }
    }

    /// An internal error with context.
    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        BuildError::Internal(format!("{context}: {e}"))
    }

    /// The Dockerfile line the error points at, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            BuildError::Step { line, .. } | BuildError::Run { line, .. } => Some(*line),
            BuildError::Dockerfile(e) => Some(e.location.line).filter(|l| *l > 0),
            _ => None,
        }
    }
}
