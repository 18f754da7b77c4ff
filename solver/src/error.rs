//! Build errors, and the pieces every module's error type is made of.
//!
//! Every error that comes from a Dockerfile instruction keeps the
//! instruction's [`Location`] (the parser's type, carried from lowering
//! through the op graph) so the CLI can point at it. Every error that
//! wraps another keeps it as its [`std::error::Error::source`], as a
//! [`Cause`], so a caller can find a typed cause (the store's
//! [`kiln_cache::Error::NoSpace`], an I/O error's kind) anywhere in the
//! chain with [`BuildError::find_cause`] or by walking `source()`.
//!
//! By the convention of the crates below (`kiln-cache`'s `"{op} {path}:
//! {source}"`), an error's message already includes its cause's message:
//! print the top error alone, or walk the chain for the types.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

pub use kiln_parser::Location;
use kiln_parser::ParseError;

/// A shared, typed cause of an error. Cloning is cheap (an [`Arc`]), so
/// an error that more than one waiter sees (a failed stage that several
/// stages depend on) keeps its cause for all of them.
///
/// `Cause` derefs to the error it holds, and is deliberately not itself an
/// [`std::error::Error`]: as a `#[source]` field, the chain then yields
/// the wrapped error itself, so `downcast_ref` finds its type.
#[derive(Clone)]
pub struct Cause(Arc<dyn StdError + Send + Sync + 'static>);

impl Cause {
    /// Wraps a typed error.
    pub fn new(e: impl StdError + Send + Sync + 'static) -> Self {
        Cause(Arc::new(e))
    }

    /// A cause that is only a message (for rules checked here, with no
    /// lower error to keep).
    pub fn msg(message: impl Into<String>) -> Self {
        Cause(Arc::new(Message(message.into())))
    }

    /// The first error of type `T` in this cause's chain (itself included).
    pub fn find<T: StdError + 'static>(&self) -> Option<&T> {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(&*self.0);
        while let Some(e) = cur {
            if let Some(t) = e.downcast_ref::<T>() {
                return Some(t);
            }
            cur = e.source();
        }
        None
    }
}

impl std::ops::Deref for Cause {
    type Target = dyn StdError + Send + Sync + 'static;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

/// An error that is only a message: a rule kiln checks itself, with no
/// lower error to keep.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Message(pub String);

/// Declares a module's error type: `Context` (what was being done, and
/// the typed cause), `Source` (a typed cause shown as it is) and
/// `Invalid` (a rule of this module, worded for the user). Modules add
/// their own variants where a caller needs to tell a case apart.
macro_rules! module_error {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident $body:tt ,)* }) => {
        $(#[$meta])*
        #[derive(Debug, thiserror::Error)]
        $vis enum $name {
            /// What was being done, and why it failed.
            #[error("{context}: {cause}")]
            Context {
                /// What was being done.
                context: String,
                /// Why it failed.
                #[source]
                cause: $crate::error::Cause,
            },
            /// A lower error, shown as it is.
            #[error("{0}")]
            Source(#[source] $crate::error::Cause),
            /// Input that breaks a rule of this module.
            #[error("{0}")]
            Invalid(String),
            $($(#[$vmeta])* $variant $body,)*
        }

        #[allow(dead_code)]
        impl $name {
            /// `context: cause`.
            pub(crate) fn ctx<E: std::error::Error + Send + Sync + 'static>(
                context: impl Into<String>,
            ) -> impl FnOnce(E) -> Self {
                let context = context.into();
                move |e| $name::Context {
                    context,
                    cause: $crate::error::Cause::new(e),
                }
            }

            /// A lower error, shown as it is.
            pub(crate) fn src<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
                $name::Source($crate::error::Cause::new(e))
            }

            /// A rule of this module.
            pub(crate) fn invalid(message: impl Into<String>) -> Self {
                $name::Invalid(message.into())
            }

            /// The first error of type `T` in the chain (this one included).
            pub fn find_cause<T: std::error::Error + 'static>(&self) -> Option<&T> {
                let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
                while let Some(e) = cur {
                    if let Some(t) = e.downcast_ref::<T>() {
                        return Some(t);
                    }
                    cur = e.source();
                }
                None
            }
        }

        impl From<$name> for $crate::error::BuildError {
            fn from(e: $name) -> Self {
                $crate::error::BuildError::from_cause(e)
            }
        }
    };
}
pub(crate) use module_error;

/// `From` conversions that keep a lower module's error as the cause
/// (shown as it is).
macro_rules! wrap_from {
    ($outer:ident: $($inner:ty),+) => {
        $(impl From<$inner> for $outer {
            fn from(e: $inner) -> Self {
                $outer::Source($crate::error::Cause::new(e))
            }
        })+
    };
}
pub(crate) use wrap_from;

/// Turns a Dockerfile line, or a location, into a [`Location`].
pub trait IntoLocation {
    /// The location.
    fn into_location(self) -> Location;
}

impl IntoLocation for Location {
    fn into_location(self) -> Location {
        self
    }
}

impl IntoLocation for usize {
    /// Line `self`, no column.
    fn into_location(self) -> Location {
        Location {
            line: self,
            column: 0,
            end_line: self,
        }
    }
}

/// Why a build failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    /// Bad command-line input (unknown target, bad option value).
    #[error("{0}")]
    Usage(String),
    /// The Dockerfile does not parse or validate.
    #[error("{0}")]
    Dockerfile(#[from] ParseError),
    /// An instruction failed at `location`.
    #[error("{message}")]
    Step {
        /// Where the instruction is in the Dockerfile.
        location: Location,
        /// What went wrong (the cause's message included).
        message: String,
        /// The typed cause, if a lower layer failed.
        #[source]
        cause: Option<Cause>,
    },
    /// A RUN step exited unsuccessfully.
    #[error("process \"{command}\" did not complete successfully: {status}")]
    Run {
        /// Where the RUN is in the Dockerfile.
        location: Location,
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
    /// The store, the executor or the file system failed outside any one
    /// instruction.
    #[error("{message}")]
    Internal {
        /// What went wrong (the cause's message included).
        message: String,
        /// The typed cause.
        #[source]
        cause: Option<Cause>,
    },
}

impl BuildError {
    /// An instruction-level error at `at` (a line or a [`Location`]).
    pub fn at(at: impl IntoLocation, message: impl Into<String>) -> Self {
        BuildError::Step {
            location: at.into_location(),
            message: message.into(),
            cause: None,
        }
    }

    /// An instruction-level error at `at` whose message is `e`'s, kept as
    /// the cause.
    pub fn at_cause(at: impl IntoLocation, e: impl StdError + Send + Sync + 'static) -> Self {
        BuildError::Step {
            location: at.into_location(),
            message: e.to_string(),
            cause: Some(Cause::new(e)),
        }
    }

    /// An internal error with context; `e` is kept as the cause.
    pub fn internal(context: &str, e: impl StdError + Send + Sync + 'static) -> Self {
        BuildError::Internal {
            message: format!("{context}: {e}"),
            cause: Some(Cause::new(e)),
        }
    }

    /// An internal error that is only a message.
    pub fn internal_msg(message: impl Into<String>) -> Self {
        BuildError::Internal {
            message: message.into(),
            cause: None,
        }
    }

    /// A lower error, shown as it is and kept as the cause.
    pub fn from_cause(e: impl StdError + Send + Sync + 'static) -> Self {
        BuildError::Internal {
            message: e.to_string(),
            cause: Some(Cause::new(e)),
        }
    }

    /// The error placed at `at`: an internal error becomes an error of the
    /// instruction there (its cause kept); others are returned as they are.
    pub fn located(self, at: impl IntoLocation) -> Self {
        match self {
            BuildError::Internal { message, cause } => BuildError::Step {
                location: at.into_location(),
                message,
                cause,
            },
            other => other,
        }
    }

    /// Where in the Dockerfile the error points, if anywhere.
    pub fn location(&self) -> Option<Location> {
        match self {
            BuildError::Step { location, .. } | BuildError::Run { location, .. } => {
                Some(*location).filter(|l| l.line > 0)
            }
            BuildError::Dockerfile(e) => Some(e.location).filter(|l| l.line > 0),
            _ => None,
        }
    }

    /// The Dockerfile line the error points at, if any.
    pub fn line(&self) -> Option<usize> {
        self.location().map(|l| l.line)
    }

    /// The first error of type `T` in the chain (e.g. the store's
    /// [`kiln_cache::Error::NoSpace`] under a failed step).
    pub fn find_cause<T: StdError + 'static>(&self) -> Option<&T> {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(t) = e.downcast_ref::<T>() {
                return Some(t);
            }
            cur = e.source();
        }
        None
    }
}
