//! The seam in front of the executor: the solver hands a [`Runner`] an
//! [`ExecRequest`] (an OCI runtime spec plus rootfs mounts, as data) and
//! gets the step's exit status back. [`kiln_executor::Executor`] is the
//! real one; tests give the solver a fake that never needs root.

use std::future::Future;
use std::pin::Pin;

use kiln_executor::{CancellationToken, ExecOutcome, ExecRequest, Executor, OutputLine};
use tokio::sync::mpsc;

/// Why a [`Runner`] could not run a step (a step that ran and failed is an
/// `Ok` outcome with a non-zero status).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The executor's own error (setup, timeout, cancellation).
    #[error(transparent)]
    Executor(#[from] kiln_executor::Error),
    /// The step was cancelled before it finished.
    #[error("cancelled")]
    Cancelled,
    /// Any other runner's error.
    #[error("{0}")]
    Other(String),
}

/// A boxed future of a step's outcome.
pub type RunFuture<'a> = Pin<Box<dyn Future<Output = Result<ExecOutcome, RunError>> + Send + 'a>>;

/// Runs one build step. Implementations may run steps concurrently.
pub trait Runner: Send + Sync + 'static {
    /// Runs `req`, streaming its output lines to `output`, until it exits
    /// or `cancel` fires (see [`Executor::run`] for the contract).
    fn run(
        &self,
        req: ExecRequest,
        output: Option<mpsc::Sender<OutputLine>>,
        cancel: CancellationToken,
    ) -> RunFuture<'_>;
}

impl Runner for Executor {
    fn run(
        &self,
        req: ExecRequest,
        output: Option<mpsc::Sender<OutputLine>>,
        cancel: CancellationToken,
    ) -> RunFuture<'_> {
        Box::pin(async move { Ok(Executor::run(self, req, output, cancel).await?) })
    }
}
