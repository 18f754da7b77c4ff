//! The crate-level error: every module's error gathered in one enum.

use std::time::Duration;

use crate::cgroup::CgroupError;
use crate::protocol::ProtocolError;
use crate::request::{OutputLine, RequestError};
use crate::user::UserError;

/// Everything that can go wrong while running a step.
///
/// The variants that concern one step carry its name (`step`), so a message
/// can be shown to the user as is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is invalid (bad spec, rlimit over the host's hard
    /// limit, unsupported namespace, ...). Nothing was started.
    #[error("step {step:?}: {source}")]
    Request {
        /// Name of the step.
        step: String,
        /// What is wrong with the request.
        #[source]
        source: RequestError,
    },
    /// The sandbox init reported a failure while preparing the step (mounts,
    /// user, working directory, exec lookup, ...).
    #[error("step {step:?}: {message}")]
    Setup {
        /// Name of the step.
        step: String,
        /// Stage of the init that failed (`mount`, `user`, `cwd`, `exec`, ...).
        stage: String,
        /// The message, e.g. `exec: "nosuch": executable file not found in $PATH`.
        message: String,
    },
    /// The step ran longer than its timeout; its whole process tree was killed.
    #[error("step {step:?}: timed out after {after:?}")]
    TimedOut {
        /// Name of the step.
        step: String,
        /// The timeout that expired.
        after: Duration,
        /// Last lines of output before the kill.
        tail: Vec<OutputLine>,
    },
    /// The step was cancelled; its whole process tree was killed.
    #[error("step {step:?}: cancelled")]
    Cancelled {
        /// Name of the step.
        step: String,
    },
    /// The init process died without reporting the step's status.
    #[error("step {step:?}: sandbox init died unexpectedly ({status})")]
    InitDied {
        /// Name of the step.
        step: String,
        /// How the init ended.
        status: String,
    },
    /// Creating, limiting or removing the step's cgroup failed.
    #[error("step {step:?}: {source}")]
    Cgroup {
        /// Name of the step.
        step: String,
        /// The cgroup failure.
        #[source]
        source: CgroupError,
    },
    /// The parent/init message pipe failed.
    #[error("step {step:?}: {source}")]
    Protocol {
        /// Name of the step.
        step: String,
        /// The protocol failure.
        #[source]
        source: ProtocolError,
    },
    /// Preparing the step's state directory or starting the init failed.
    #[error("step {step:?}: {what}: {source}")]
    Io {
        /// Name of the step.
        step: String,
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Resolving a user against a rootfs failed ([`crate::resolve_user`]).
    #[error(transparent)]
    User(#[from] UserError),
}
