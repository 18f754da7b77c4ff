//! # kiln-executor — one process in fresh Linux namespaces
//!
//! **What this room is for.** Running a single build step: it takes an OCI
//! runtime `Spec` plus the rootfs mounts handed out by the snapshotter,
//! re-executes a single-threaded init, creates mount/pid/uts/ipc/cgroup (and
//! optionally network) namespaces, mounts the rootfs inside the child's
//! private mount namespace, pivot_roots, sets identity, capabilities,
//! rlimits and cgroup limits, a fresh session keyring and Docker's default
//! seccomp profile (when the spec has a `linux.seccomp` section, as
//! [`default_spec`] gives it), and streams the process's output back.
//!
//! **What it owns.** Namespaces, mounts inside the sandbox, the init
//! protocol, cgroups of a step, and process lifecycle (timeouts,
//! cancellation, PDEATHSIG, signals forwarded to the step). Also the
//! rootless entry ([`userns::enter`]): run by an ordinary user (or as root
//! without `CAP_SYS_ADMIN`, in an unprivileged container), kiln enters a
//! user and mount namespace once at start, before any thread; every step
//! then runs inside it (overlay with `userxattr`, the host's `/sys` bound
//! where a new sysfs is refused, cgroups only where delegated).
//!
//! **What it must not do.** It does not know about Dockerfiles, cache keys or
//! layers, and depends on no other kiln crate.
//!
//! # Example
//!
//! ```no_run
//! use kiln_executor::{default_spec, ExecRequest, Executor, RootfsMount};
//! use tokio_util::sync::CancellationToken;
//!
//! fn main() {
//!     // Must come first: this binary doubles as the sandbox init.
//!     kiln_executor::maybe_run_init();
//!     let rt = tokio::runtime::Runtime::new().unwrap();
//!     rt.block_on(async {
//!         let spec = default_spec(vec!["/bin/sh".into(), "-c".into(), "echo hi > /out".into()]);
//!         let rootfs = RootfsMount::overlay(
//!             &["/var/lib/kiln/layers/busybox".into()],
//!             "/tmp/step/upper".into(),
//!             "/tmp/step/work".into(),
//!         );
//!         let req = ExecRequest::new("RUN echo hi > /out", spec, vec![rootfs]);
//!         let (tx, mut rx) = tokio::sync::mpsc::channel(64);
//!         let printer = tokio::spawn(async move {
//!             while let Some(line) = rx.recv().await {
//!                 println!("{line}");
//!             }
//!         });
//!         let outcome = Executor::default()
//!             .run(req, Some(tx), CancellationToken::new())
//!             .await
//!             .unwrap();
//!         printer.await.unwrap();
//!         assert!(outcome.status.success());
//!     });
//! }
//! ```
#![deny(missing_docs)]
#![allow(clippy::needless_doctest_main)] // the example *is* about main()

pub mod caps;
pub mod cgroup;
pub mod emulation;
mod error;
mod exe;
mod init;
mod net;
mod protocol;
mod request;
pub mod rootfs;
mod run;
mod seccomp;
mod spec;
pub mod user;
pub mod userns;

pub use caps::DEFAULT_CAPS;
pub use cgroup::{CgroupError, Limits};
pub use error::Error;
pub use init::{maybe_run_init, DEFAULT_PATH, FORWARDED_SIGNALS, INIT_ARG};
/// The OCI runtime spec types the executor takes.
pub use oci_spec::runtime as oci;
pub use protocol::ProtocolError;
pub use request::{
    ExecOutcome, ExecRequest, ExitStatus, InlineFile, OutputLine, RequestError, RootfsKind,
    RootfsMount, Stream, MAX_INLINE_FILE, MAX_LINE,
};
pub use run::{check_extra_host, Executor, ExecutorConfig, ExtraHostError};
pub use seccomp::{default_seccomp, ANSWERED_WITHOUT_SYNC};
pub use spec::{default_spec, set_network, NetworkMode};
/// The cancellation token type [`Executor::run`] takes.
pub use tokio_util::sync::CancellationToken;
pub use user::{resolve_user, ResolvedUser, UserError};
