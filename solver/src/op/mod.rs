//! The op graph: what the frontend lowers a Dockerfile to and the solver
//! runs. A build is one [`StageOps`] per needed stage; each stage starts
//! from a [`Source`] and applies its [`LayerOp`]s in order, each producing
//! one layer. Config-only instructions (ENV, LABEL, CMD, …) have no op:
//! the frontend has already applied them to the stage's image config and
//! history. Every state an op starts from or reads is one [`Source`]
//! (`FROM`, `COPY --from`, `RUN --mount=from=`); edges between stages are
//! [`Source::Stage`] values. Every stage, RUN and image source carries
//! its platform: a multi-platform build is one graph per platform, solved
//! together, and what differs per platform differs in its key.
//!
//! An op is pure data: everything the Dockerfile decides is expanded and
//! resolved here; what only the solve can know (the snapshot the op runs
//! on, the content of the files it reads, the user names of the image it
//! runs in) is left to the solver. The cache key of an op is computed by
//! one function, [`key::cache_key`], from the op's definition, the key of
//! its input state, the keys of the other states it reads and the digests
//! of the content it selects.

use std::path::PathBuf;

use kiln_executor::NetworkMode;
use kiln_image::config::ImageConfig;
use kiln_image::manifest::Platform;
use kiln_parser::instructions::Mount;

use crate::chmod::Chmod;

pub mod key;

/// A state a stage starts from or an op reads: `FROM`, `COPY --from`,
/// `RUN --mount=from=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The empty filesystem (`FROM scratch`).
    Scratch,
    /// The result of a stage (its Dockerfile index).
    Stage(usize),
    /// An image, by the reference the Dockerfile names (resolved by the
    /// solver, through `--build-context` names first), for `platform`.
    Image {
        /// The reference as written (expanded).
        reference: String,
        /// The platform whose image is taken from an index.
        platform: Platform,
    },
    /// A `--build-context NAME=DIR` directory (`COPY --from`, mounts).
    ContextDir(PathBuf),
}

/// One stage of the graph.
#[derive(Debug, Clone)]
pub struct StageOps {
    /// Index of the stage in the Dockerfile.
    pub index: usize,
    /// Its name, or `stage-N`.
    pub label: String,
    /// Where its `FROM` is in the Dockerfile.
    pub location: kiln_parser::Location,
    /// Number of progress steps (`[label n/total]`).
    pub total: usize,
    /// What it starts from.
    pub base: Source,
    /// The platform it builds for (`FROM --platform`, else its base
    /// stage's, else the build's target).
    pub platform: Platform,
    /// The layer-producing ops, in order.
    pub ops: Vec<LayerOp>,
    /// The image config after the stage (history included; the solver
    /// fills in the layers' diffIDs and the creation times).
    pub config: ImageConfig,
    /// How many history entries came from a base image (their times are
    /// kept).
    pub base_history: usize,
    /// `--no-cache-filter` names this stage: its RUN, COPY and ADD steps
    /// run again (BuildKit's `llb.IgnoreCache` on those ops); its base and
    /// its WORKDIRs are taken as usual.
    pub ignore_cache: bool,
}

/// The lowered build.
#[derive(Debug, Clone)]
pub struct Graph {
    /// Needed stages, dependencies first.
    pub stages: Vec<StageOps>,
    /// Dockerfile index of the stage whose result is the image.
    pub target: usize,
    /// `--build-arg` names no ARG of the build declares.
    pub unused_build_args: Vec<String>,
    /// The target platform the graph was lowered for.
    pub platform: Platform,
}

impl Graph {
    /// The stage with Dockerfile index `index`.
    pub fn stage(&self, index: usize) -> Option<&StageOps> {
        self.stages.iter().find(|s| s.index == index)
    }
}

/// An op in a stage's chain, with what the user sees of it.
#[derive(Debug, Clone)]
pub struct LayerOp {
    /// Progress name, `[label n/total] INSTRUCTION`.
    pub name: String,
    /// Where the instruction is in the Dockerfile (for errors).
    pub location: kiln_parser::Location,
    /// The op.
    pub op: Op,
}

/// A typed op.
#[derive(Debug, Clone)]
pub enum Op {
    /// Run a process (`RUN`).
    Exec(ExecOp),
    /// Copy files into the state (`COPY`, `ADD`).
    Copy(CopyOp),
    /// Make a directory (`WORKDIR`).
    Mkdir(MkdirOp),
    /// A `--build-context NAME=DIR` used as a base: its files as one
    /// layer.
    ContextDir(ContextDirOp),
}

impl Op {
    /// The digest of the op's definition alone (its key with no inputs):
    /// equal for ops that do the same thing to the same input.
    pub fn definition_digest(&self) -> String {
        key::cache_key(self, &key::KeyInputs::default()).finish()
    }
}

/// `RUN`.
#[derive(Debug, Clone)]
pub struct ExecOp {
    /// argv.
    pub args: Vec<String>,
    /// Environment (key order as the step sees it); part of the key.
    pub env: Vec<(String, String)>,
    /// Proxy variables given as build args: reach the step, not the key.
    pub proxy_env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: String,
    /// `USER`, resolved inside the rootfs when the step runs.
    pub user: Option<String>,
    /// Network mode.
    pub network: NetworkMode,
    /// `--mount` specs, expanded, with their `from` resolved.
    pub mounts: Vec<MountSpec>,
    /// A `#!` heredoc script: (file name, content), mounted at
    /// `/dev/pipes/NAME`.
    pub script: Option<(String, String)>,
    /// `--security=insecure` (allowed by the build).
    pub insecure: bool,
    /// The instruction as written (the executor's step name).
    pub step_name: String,
    /// The platform the process runs as (its stage's; a foreign one runs
    /// under emulation). Part of the key.
    pub platform: Platform,
}

/// One `RUN --mount`, expanded.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// The parsed spec (variables expanded).
    pub mount: Mount,
    /// Its `from=`, resolved.
    pub from: Option<Source>,
    /// Where it is mounted, absolute (`None`: an `env=` secret only).
    pub target: Option<String>,
    /// The cache, secret or SSH id (empty for bind and tmpfs mounts).
    pub id: String,
}

/// `COPY` / `ADD`.
#[derive(Debug, Clone)]
pub struct CopyOp {
    /// `ADD` semantics (local archives unpacked).
    pub add: bool,
    /// `--from`, resolved (`None`: the build context).
    pub from: Option<Source>,
    /// Sources, expanded (local paths, URLs, git repositories).
    pub sources: Vec<String>,
    /// Absolute destination.
    pub dest: String,
    /// The destination names a directory.
    pub dest_is_dir: bool,
    /// `--chown`, expanded; names are looked up in the state's
    /// /etc/passwd and /etc/group when the op runs.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<Chmod>,
    /// `--exclude` patterns, expanded.
    pub excludes: Vec<String>,
    /// Heredoc sources: as written (keyed) and the data to write.
    pub heredocs: Vec<Heredoc>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `ADD --checksum`, expanded.
    pub checksum: Option<String>,
    /// `ADD --keep-git-dir`.
    pub keep_git_dir: bool,
    /// `ADD --unpack=true`: remote archives unpacked too.
    pub unpack_remote: bool,
}

/// A `COPY <<EOF` source.
#[derive(Debug, Clone)]
pub struct Heredoc {
    /// File name.
    pub path: String,
    /// Content as written (what the key covers).
    pub raw: String,
    /// Whether variables are expanded in it.
    pub expand: bool,
    /// Content to write.
    pub data: String,
}

/// `WORKDIR` (not `/`): the directory, owned by the state's `USER`.
#[derive(Debug, Clone)]
pub struct MkdirOp {
    /// Absolute path.
    pub path: String,
    /// `USER` at that point, resolved when the op runs.
    pub user: Option<String>,
}

/// `FROM NAME` where `--build-context NAME=DIR`.
#[derive(Debug, Clone)]
pub struct ContextDirOp {
    /// The directory.
    pub dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkdir(path: &str) -> Op {
        Op::Mkdir(MkdirOp {
            path: path.into(),
            user: None,
        })
    }

    #[test]
    fn definition_digests_tell_ops_apart_and_not_their_inputs() {
        assert_eq!(
            mkdir("/a").definition_digest(),
            mkdir("/a").definition_digest()
        );
        assert_ne!(
            mkdir("/a").definition_digest(),
            mkdir("/b").definition_digest()
        );
        let with_input = key::cache_key(
            &mkdir("/a"),
            &key::KeyInputs {
                parent: "sha256:parent",
                ..Default::default()
            },
        )
        .finish();
        assert_ne!(with_input, mkdir("/a").definition_digest());
    }
}
