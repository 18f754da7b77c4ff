//! The Dockerfile frontend: a parsed Dockerfile, the build's options and
//! the configs of its base images become an op graph ([`crate::op`]).
//!
//! It owns BuildKit's Dockerfile semantics: which stages a target needs
//! ([`plan`]), ARG/ENV scoping and expansion, ONBUILD triggers, image
//! config edits and their history strings, `--mount` expansion, and lint
//! ([`lint`]). It knows no store and no executor: the only facts it needs
//! from outside are the configs of the base images (their ENV, USER,
//! WORKDIR, SHELL and ONBUILD decide how later instructions lower), asked
//! of an [`ImageConfigs`] the solver fills by resolving the images first
//! (BuildKit resolves image configs while lowering too). Everything that
//! depends on content — file digests, `--chown` names looked up in the
//! image's /etc/passwd, the layers themselves — stays in the ops for the
//! solver, so lowering is pure and tested without root.

use std::collections::{BTreeMap, HashMap};

use kiln_image::config::ImageConfig;
use kiln_image::manifest::Platform;
use kiln_parser::instructions::{Dockerfile, Instruction, Kind};
use kiln_parser::shell::Lex;

use crate::build::BuildOptions;
use crate::contexts::NamedContext;
use crate::error::BuildError;
use crate::fsview::join_abs;
use crate::op::{
    ContextDirOp, CopyOp, ExecOp, Graph, Heredoc, LayerOp, MkdirOp, Op, Source, StageOps,
};

pub mod history;
pub mod instr;
pub mod lint;
pub mod mounts;
pub mod plan;

use history::{history, CopyHistory};
use plan::{Plan, PROXY_ARGS};

/// The configs of the build's base images, by the reference the
/// Dockerfile names (`FROM alpine` asks for `alpine`) and the platform
/// the stage builds for.
pub trait ImageConfigs {
    /// The image's config, `None` when it was not resolved.
    fn image_config(&self, reference: &str, platform: &Platform) -> Option<ImageConfig>;
}

/// By reference alone (one platform).
impl ImageConfigs for HashMap<String, ImageConfig> {
    fn image_config(&self, reference: &str, _: &Platform) -> Option<ImageConfig> {
        self.get(reference).cloned()
    }
}

/// By (reference, platform as `os/arch[/variant]`, normalised).
impl ImageConfigs for HashMap<(String, String), ImageConfig> {
    fn image_config(&self, reference: &str, platform: &Platform) -> Option<ImageConfig> {
        let p = kiln_image::platform::normalize(platform).to_string();
        self.get(&(reference.to_string(), p)).cloned()
    }
}

/// The images whose configs [`lower`] needs: the bases of the planned
/// stages that are images (not `--build-context` directories), with the
/// stage's index and platform.
pub fn base_images(plan: &Plan, opts: &BuildOptions) -> Vec<(usize, String, Platform)> {
    plan.stages
        .iter()
        .filter_map(|s| match &s.base {
            plan::Base::Image(r)
                if !matches!(
                    crate::contexts::lookup(&opts.named_contexts, r),
                    Some(NamedContext::Dir(_))
                ) =>
            {
                Some((s.index, r.clone(), s.platform.clone()))
            }
            _ => None,
        })
        .collect()
}

/// The most ONBUILD triggers a base image may bring (each is parsed and
/// run as an instruction; real images have a few).
pub const MAX_ONBUILD_TRIGGERS: usize = 1024;

/// The bytes `s` takes as a JSON string's content: a quote or backslash
/// is two, a control character six (`\u0001`).
fn json_len(s: &str) -> usize {
    s.len()
        + s.bytes()
            .map(|b| match b {
                b'"' | b'\\' => 1,
                0..=0x1f => 5,
                _ => 0,
            })
            .sum::<usize>()
}

/// The bytes a history entry takes in the config's JSON besides its
/// `created_by` (its time, comment and flags).
const HISTORY_ENTRY_JSON: usize = 128;

/// A stage's state while it is lowered.
#[derive(Debug, Clone)]
struct StageState {
    config: ImageConfig,
    /// Environment for expansion and RUN: config env plus ARGs, last wins.
    env: EnvVars,
    /// Where each key of the config's `Env` list is in it.
    config_env: HashMap<String, usize>,
    /// At least the config's size: its last sum plus what instructions
    /// added since (`None`: not summed yet; see
    /// [`Lowerer::check_config_growth`]).
    estimate: Option<usize>,
    /// Declared build args in scope, for RUN history and environment.
    args: Vec<(String, Option<String>)>,
    /// CMD set in this stage (ENTRYPOINT then keeps it).
    cmd_set: bool,
    /// History entries inherited from a base image.
    base_history: usize,
}

impl StageState {
    fn workdir(&self) -> String {
        self.config
            .config
            .as_ref()
            .and_then(|c| c.working_dir.clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    }
    fn user(&self) -> Option<String> {
        self.config
            .config
            .as_ref()
            .and_then(|c| c.user.clone())
            .filter(|u| !u.is_empty())
    }
    fn shell(&self) -> Vec<String> {
        self.config
            .config
            .as_ref()
            .and_then(|c| c.shell.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }
    fn set_env(&mut self, k: &str, v: &str) {
        let env = self.config.config_mut().env.get_or_insert_with(Vec::new);
        let entry = format!("{k}={v}");
        match self.config_env.get(k).and_then(|&i| env.get_mut(i)) {
            Some(e) => *e = entry,
            None => {
                self.config_env.insert(k.to_string(), env.len());
                env.push(entry);
            }
        }
        self.env.set(k, v);
    }
    /// The environment a RUN sees: the state env (last wins, first
    /// position kept).
    fn run_env(&self) -> Vec<(String, String)> {
        self.env.pairs().to_vec()
    }
    /// A layer op's history entry (the solver adds the diffID).
    fn push_layer_history(&mut self, created: &str, created_by: String) {
        self.grow(json_len(&created_by) + HISTORY_ENTRY_JSON);
        self.config.history.push(kiln_image::config::History {
            empty_layer: false,
            ..history(created, created_by)
        });
    }
    fn push_empty(&mut self, created: &str, created_by: String) {
        self.grow(json_len(&created_by) + HISTORY_ENTRY_JSON);
        self.config.push_empty(history(created, created_by));
    }
    /// Counts `n` more bytes in the config's size estimate.
    fn grow(&mut self, n: usize) {
        if let Some(e) = &mut self.estimate {
            *e = e.saturating_add(n);
        }
    }
}

/// A stage's environment: each key once, in the order it was first set
/// (a later value replaces the earlier one in place), looked up by key in
/// constant time — a Dockerfile of 100,000 `ENV` lines is lowered in
/// linear time.
#[derive(Debug, Clone, Default)]
struct EnvVars {
    pairs: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl EnvVars {
    fn from_pairs(pairs: Vec<(String, String)>) -> EnvVars {
        let mut env = EnvVars::default();
        for (k, v) in pairs {
            env.set(&k, &v);
        }
        env
    }
    fn set(&mut self, k: &str, v: &str) {
        match self.index.get(k) {
            Some(&i) => self.pairs[i].1 = v.to_string(),
            None => {
                self.index.insert(k.to_string(), self.pairs.len());
                self.pairs.push((k.to_string(), v.to_string()));
            }
        }
    }
    fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }
    fn iter(&self) -> std::slice::Iter<'_, (String, String)> {
        self.pairs.iter()
    }
}

impl kiln_parser::shell::Env for EnvVars {
    fn get(&self, key: &str) -> Option<String> {
        self.index.get(key).map(|&i| self.pairs[i].1.clone())
    }
}

/// Where each key of `config`'s `Env` list is (the first of a repeated
/// one).
fn config_env_index(config: &ImageConfig) -> HashMap<String, usize> {
    config
        .config
        .as_ref()
        .and_then(|c| c.env.as_ref())
        .map(|env| {
            // The first of a repeated key (BuildKit's addEnv replaces it).
            let mut index = HashMap::new();
            for (i, e) in env.iter().enumerate() {
                let k = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
                index.entry(k.to_string()).or_insert(i);
            }
            index
        })
        .unwrap_or_default()
}

fn env_pairs(config: &ImageConfig) -> Vec<(String, String)> {
    config
        .config
        .as_ref()
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (e, String::new()),
        })
        .collect()
}

/// The state of `FROM scratch` for `platform`.
fn scratch_state(platform: &Platform) -> StageState {
    let mut config = ImageConfig::new(platform);
    config.config_mut().env = Some(vec![format!("PATH={}", kiln_executor::DEFAULT_PATH)]);
    StageState {
        env: EnvVars::from_pairs(env_pairs(&config)),
        config_env: config_env_index(&config),
        estimate: None,
        config,
        args: Vec::new(),
        cmd_set: false,
        base_history: 0,
    }
}

/// The state of `FROM <image>` with config `config`.
fn image_state(mut config: ImageConfig) -> StageState {
    let base_history = config.history.len();
    if !env_pairs(&config).iter().any(|(k, _)| k == "PATH") {
        config
            .config_mut()
            .env
            .get_or_insert_with(Vec::new)
            .push(format!("PATH={}", kiln_executor::DEFAULT_PATH));
    }
    StageState {
        env: EnvVars::from_pairs(env_pairs(&config)),
        config_env: config_env_index(&config),
        estimate: None,
        config,
        args: Vec::new(),
        cmd_set: false,
        base_history,
    }
}

/// Lowers the stages of `plan` (see the module doc). `created` is the
/// time history entries are stamped with.
pub fn lower(
    df: &Dockerfile,
    plan: &Plan,
    opts: &BuildOptions,
    created: &str,
    images: &dyn ImageConfigs,
) -> Result<Graph, BuildError> {
    kiln_parser::shell::reset_match_budget();
    let mut l = Lowerer {
        df,
        plan,
        opts,
        created,
        lex: Lex::new(df.escape),
        states: HashMap::new(),
        held: std::cell::Cell::new(0),
        line_starts: std::iter::once(0)
            .chain(
                opts.dockerfile
                    .bytes()
                    .enumerate()
                    .filter(|(_, b)| *b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect(),
    };
    let mut stages = Vec::with_capacity(plan.stages.len());
    for p in &plan.stages {
        stages.push(l.stage(p, images)?);
    }
    Ok(Graph {
        stages,
        target: plan.target,
        unused_build_args: plan::unused_build_args(df, plan, &opts.build_args),
        platform: plan.platform.clone(),
    })
}

struct Lowerer<'a> {
    df: &'a Dockerfile,
    plan: &'a Plan,
    opts: &'a BuildOptions,
    created: &'a str,
    lex: Lex,
    /// Lowered stages by index (for `FROM <stage>`).
    states: HashMap<usize, StageState>,
    /// Bytes the plan holds so far (see [`Lowerer::hold`]).
    held: std::cell::Cell<u64>,
    /// Where each line of the Dockerfile starts (for locations).
    line_starts: Vec<usize>,
}

/// The most the lowered plan may hold (environments copied into every
/// RUN, stage states copied into the stages built on them, working
/// directories): a Dockerfile that doubles an ARG sixteen times and copies
/// it into every step fails with its line instead of taking the machine's
/// memory.
pub const PLAN_BUDGET: u64 = 512 << 20;

/// The longest working directory (Linux's `PATH_MAX`).
pub const MAX_WORKDIR: usize = 4096;

/// The rough size of a stage's state (its environment and config).
fn state_size(s: &StageState) -> usize {
    let env: usize = s.env.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    let args: usize = s
        .args
        .iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len) + 4)
        .sum();
    let history: usize = s
        .config
        .history
        .iter()
        .map(|h| h.created_by.as_deref().map_or(0, str::len) + 64)
        .sum();
    env + args + history
}

/// Where `dispatch` appends a stage's ops.
struct Out<'a> {
    label: &'a str,
    index: usize,
    total: usize,
    ops: Vec<LayerOp>,
    /// The stage's platform.
    platform: &'a Platform,
}

impl Lowerer<'_> {
    fn stage(
        &mut self,
        planned: &plan::PlannedStage,
        images: &dyn ImageConfigs,
    ) -> Result<StageOps, BuildError> {
        let index = planned.index;
        let stage = &self.df.stages[index];
        let label = match &stage.name {
            Some(n) => n.clone(),
            None => format!("stage-{index}"),
        };
        let total = stage.instructions.len() + 1;
        let platform = &planned.platform;
        let mut out = Out {
            label: &label,
            index,
            total,
            ops: Vec::new(),
            platform,
        };
        let (base, mut state) = match &planned.base {
            plan::Base::Scratch => (Source::Scratch, scratch_state(platform)),
            plan::Base::Stage(j) => {
                let mut s = self.states.get(j).cloned().ok_or_else(|| {
                    BuildError::internal_msg(format!("plan: stage {j} lowered after its user"))
                })?;
                self.hold(state_size(&s), stage.line)?;
                s.cmd_set = false;
                (Source::Stage(*j), s)
            }
            plan::Base::Image(reference) => {
                match crate::contexts::lookup(&self.opts.named_contexts, reference) {
                    Some(NamedContext::Dir(dir)) => {
                        // The directory's files (owned by root, as the build
                        // context's are) become the base's one layer.
                        let mut s = scratch_state(platform);
                        out.ops.push(LayerOp {
                            name: format!(
                                "[{label} 1/{total}] FROM {reference} ({})",
                                dir.display()
                            ),
                            location: self.location(stage.line, stage.line),
                            op: Op::ContextDir(ContextDirOp { dir: dir.clone() }),
                        });
                        s.push_layer_history(
                            self.created,
                            format!("FROM {reference} (directory {})", dir.display()),
                        );
                        (Source::Scratch, s)
                    }
                    _ => {
                        let config = images.image_config(reference, platform).ok_or_else(|| {
                            BuildError::at(
                                stage.line,
                                format!("{reference} ({platform}): image not resolved"),
                            )
                        })?;
                        (
                            Source::Image {
                                reference: reference.clone(),
                                platform: platform.clone(),
                            },
                            image_state(config),
                        )
                    }
                }
            }
        };
        // ONBUILD triggers of the base run first, then are dropped. A
        // stage replaced by a named context is that context as it is: no
        // trigger runs (BuildKit's replaced stage is not dispatched).
        let mut triggers = state
            .config
            .config
            .as_mut()
            .and_then(|c| c.on_build.take())
            .unwrap_or_default();
        if plan::replacing_context(stage, self.opts.named_contexts.keys()).is_some() {
            triggers.clear();
        }
        if triggers.len() > MAX_ONBUILD_TRIGGERS {
            return Err(BuildError::at(
                stage.line,
                format!(
                    "the base image has {} ONBUILD triggers; at most {MAX_ONBUILD_TRIGGERS} are run",
                    triggers.len()
                ),
            ));
        }
        for trigger in triggers {
            let parsed =
                kiln_parser::parse(&format!("FROM scratch\n{trigger}\n")).map_err(|e| {
                    BuildError::at(
                        stage.line,
                        format!("invalid ONBUILD trigger {trigger:?}: {e}"),
                    )
                })?;
            // One instruction, as BuildKit requires ("onbuild trigger
            // should be a single expression"), never FROM, ONBUILD or
            // MAINTAINER: a trigger is one line of the image's config, not
            // a Dockerfile of its own to inject.
            let bad = |why: &str| {
                BuildError::at(
                    stage.line,
                    format!("invalid ONBUILD trigger {trigger:?}: {why}"),
                )
            };
            if parsed.stages.len() != 1 || parsed.stages[0].instructions.len() != 1 {
                return Err(bad("an ONBUILD trigger should be a single expression"));
            }
            if let Some(i) = parsed.stages[0].instructions.first() {
                if matches!(
                    i.kind,
                    kiln_parser::instructions::Kind::Onbuild { .. }
                        | kiln_parser::instructions::Kind::Maintainer { .. }
                ) {
                    return Err(bad(
                        "ONBUILD and MAINTAINER are not allowed as ONBUILD triggers",
                    ));
                }
            }
            for instr in parsed.stages.into_iter().flat_map(|s| s.instructions) {
                let instr = Instruction {
                    line: stage.line,
                    end_line: stage.line,
                    ..instr
                };
                self.dispatch(&mut out, 0, &mut state, &instr)?;
            }
        }
        for (n, instr) in stage.instructions.iter().enumerate() {
            self.dispatch(&mut out, n + 2, &mut state, instr)?;
        }
        let ops = out.ops;
        let result = StageOps {
            index,
            label: label.clone(),
            location: self.location(stage.line, stage.line),
            total,
            base,
            platform: platform.clone(),
            ops,
            config: state.config.clone(),
            base_history: state.base_history,
            ignore_cache: stage.name.as_deref().is_some_and(|n| {
                self.opts
                    .no_cache_filter
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case(n))
            }),
        };
        self.states.insert(index, state);
        Ok(result)
    }

    /// Counts `bytes` more held by the plan; an error at `line` past
    /// [`PLAN_BUDGET`].
    fn hold(&self, bytes: usize, line: usize) -> Result<(), BuildError> {
        let n = self.held.get().saturating_add(bytes as u64);
        self.held.set(n);
        if n > PLAN_BUDGET {
            return Err(self.located(
                line,
                "",
                format!(
                    "the build's plan would hold more than {} MiB (ARG and ENV values copied into every step and stage)",
                    PLAN_BUDGET >> 20
                ),
            ));
        }
        Ok(())
    }

    fn expand(
        &self,
        word: &str,
        env: &dyn kiln_parser::shell::Env,
        line: usize,
    ) -> Result<String, BuildError> {
        self.lex.process_word(word, env).map_err(|e| {
            if *e.kind() == kiln_parser::shell::ShellErrorKind::TooLong {
                let shown: String = word.chars().take(40).collect();
                let more = if shown.len() < word.len() { "…" } else { "" };
                self.located(
                    line,
                    word,
                    format!(
                        "expanding {shown:?}{more} gives more than {} MiB (the limit of one ARG, ENV or LABEL value)",
                        kiln_parser::shell::MAX_EXPANSION >> 20
                    ),
                )
            } else {
                BuildError::at(line, e.to_string())
            }
        })
    }

    /// The location of the instruction on lines `line..=end_line`, its
    /// column at the first non-blank character.
    fn location(&self, line: usize, end_line: usize) -> kiln_parser::Location {
        let text = self
            .line_starts
            .get(line.saturating_sub(1))
            .and_then(|&start| self.opts.dockerfile.get(start..))
            .map(|rest| rest.split('\n').next().unwrap_or(""))
            .unwrap_or("");
        kiln_parser::Location {
            line,
            column: text.chars().take_while(|c| c.is_whitespace()).count() + 1,
            end_line: end_line.max(line),
        }
    }

    /// An error pointing at `needle` (or the instruction's first
    /// character) on `line` of the Dockerfile, rendered with a caret.
    fn located(&self, line: usize, needle: &str, message: String) -> BuildError {
        let lines: Vec<&str> = self.opts.dockerfile.lines().collect();
        let text = lines.get(line.saturating_sub(1)).copied().unwrap_or("");
        let column = match text.find(needle).filter(|_| !needle.is_empty()) {
            Some(b) => text[..b].chars().count() + 1,
            None => text.chars().take_while(|c| c.is_whitespace()).count() + 1,
        };
        BuildError::Dockerfile(kiln_parser::ParseError {
            message,
            location: kiln_parser::Location {
                line,
                column,
                end_line: line,
            },
            suggestion: None,
        })
    }

    /// After an instruction that grows the image config (ENV, LABEL, ARG):
    /// an error at `line` when the config would pass
    /// [`kiln_image::config::MAX_CONFIG_SIZE`] (an estimate from the sizes
    /// of its environment, labels and history; export checks the real one).
    ///
    /// `added` bounds the bytes the instruction added: the config is
    /// summed again only when what was added since the last sum could
    /// pass the limit, so a long Dockerfile is not summed once per line.
    fn check_config_growth(
        &self,
        state: &mut StageState,
        line: usize,
        added: usize,
    ) -> Result<(), BuildError> {
        let limit = kiln_image::config::MAX_CONFIG_SIZE;
        if let Some(e) = state.estimate {
            let e = e.saturating_add(added);
            state.estimate = Some(e);
            if e as u64 <= limit {
                return Ok(());
            }
        }
        let cfg = &state.config;
        let env: usize = state
            .env
            .iter()
            .map(|(k, v)| json_len(k) + json_len(v) + 4)
            .sum();
        let labels: usize = cfg
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .map(|l| l.iter().map(|(k, v)| json_len(k) + json_len(v) + 6).sum())
            .unwrap_or(0);
        let history: usize = cfg
            .history
            .iter()
            .map(|h| h.created_by.as_deref().map_or(0, json_len) + HISTORY_ENTRY_JSON)
            .sum();
        let size = (env + labels + history) as u64;
        state.estimate = Some(size as usize);
        if size > limit {
            return Err(self.located(
                line,
                "",
                format!(
                    "the image config would be about {} MiB, more than the limit of {} MiB (ENV, LABEL and ARG values, and the history that records them)",
                    size >> 20,
                    limit >> 20
                ),
            ));
        }
        Ok(())
    }

    /// Resolves a `--from` value seen in stage `stage`. An image is
    /// taken for the build's target platform (as BuildKit does).
    fn source_ref(&self, stage: usize, from: &str) -> Source {
        match plan::resolve_source(self.df, stage, from) {
            plan::Source::Stage(j) => Source::Stage(j),
            plan::Source::Image(reference) => {
                match crate::contexts::lookup(&self.opts.named_contexts, &reference) {
                    Some(NamedContext::Dir(d)) => Source::ContextDir(d.clone()),
                    _ => Source::Image {
                        reference,
                        platform: self.plan.platform.clone(),
                    },
                }
            }
        }
    }

    fn dispatch(
        &self,
        out: &mut Out<'_>,
        n: usize,
        state: &mut StageState,
        instr: &Instruction,
    ) -> Result<(), BuildError> {
        let line = instr.line;
        let created = self.created;
        let name = if n == 0 {
            format!("[{} ONBUILD] {}", out.label, instr.original.trim())
        } else {
            format!(
                "[{} {n}/{}] {}",
                out.label,
                out.total,
                instr.original.trim()
            )
        };
        match &instr.kind {
            Kind::Env { vars } => {
                // Every word expands with the environment from before the
                // instruction (`ENV abc=bye def=$abc` gives def the old
                // abc), as docker and BuildKit expand a whole instruction
                // before they apply it.
                let mut msg = String::from("ENV");
                let mut set = Vec::with_capacity(vars.len());
                for kv in vars {
                    let k = self.expand(&kv.key, &state.env, line)?;
                    let v = self.expand(&kv.value, &state.env, line)?;
                    msg.push_str(&format!(" {k}={v}"));
                    set.push((k, v));
                }
                let mut added = 0;
                for (k, v) in set {
                    added += 2 * (json_len(&k) + json_len(&v) + 4);
                    state.set_env(&k, &v);
                }
                state.push_empty(created, msg);
                self.check_config_growth(state, line, added)?;
            }
            Kind::Label { labels } => {
                let mut msg = String::from("LABEL");
                let mut added = 0;
                for kv in labels {
                    let k = self.expand(&kv.key, &state.env, line)?;
                    let v = self.expand(&kv.value, &state.env, line)?;
                    msg.push_str(&format!(" {k}={v}"));
                    added += json_len(&k) + json_len(&v) + 6;
                    state
                        .config
                        .config_mut()
                        .labels
                        .get_or_insert_with(BTreeMap::new)
                        .insert(k, v);
                }
                state.push_empty(created, msg);
                self.check_config_growth(state, line, added)?;
            }
            Kind::Arg { args } => {
                let mut parts = Vec::new();
                for def in args {
                    let key = self.expand(&def.key, &state.env, line)?;
                    let mut value = match (self.opts.build_args.get(&key), &def.default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(d)) => Some(self.expand(d, &state.env, line)?),
                        (None, None) => None,
                    };
                    if value.is_none() {
                        value = self
                            .plan
                            .global_args
                            .iter()
                            .rev()
                            .find(|(k, _)| *k == key)
                            .and_then(|(_, v)| v.clone())
                            .or_else(|| {
                                plan::platform_args_for(&self.plan.platform)
                                    .into_iter()
                                    .find(|(k, _)| *k == key)
                                    .map(|(_, v)| v)
                            });
                    }
                    if let Some(v) = &value {
                        state.env.set(&key, v);
                        parts.push(format!("{key}={v}"));
                    } else {
                        parts.push(key.clone());
                    }
                    // A re-declared ARG keeps its place (BuildKit's
                    // history lists build args in first-declared order).
                    match state.args.iter_mut().find(|(k, _)| *k == key) {
                        Some(a) => a.1 = value,
                        None => state.args.push((key, value)),
                    }
                }
                let msg = format!("ARG {}", parts.join(" "));
                let added = msg.len();
                state.push_empty(created, msg);
                self.check_config_growth(state, line, added)?;
            }
            Kind::Maintainer { name } => {
                state.config.author = Some(name.clone());
                state.push_empty(created, format!("MAINTAINER {name}"));
            }
            Kind::User { user } => {
                let u = self.expand(user, &state.env, line)?;
                state.config.config_mut().user = Some(u.clone());
                state.push_empty(created, format!("USER {u}"));
            }
            Kind::Stopsignal { signal } => {
                let s = self.expand(signal, &state.env, line)?;
                instr::validate_signal(&s).map_err(|m| BuildError::at_cause(line, m))?;
                state.config.config_mut().stop_signal = Some(s.clone());
                state.push_empty(created, format!("STOPSIGNAL {s}"));
            }
            Kind::Volume { volumes } => {
                let mut vs = Vec::new();
                for v in volumes {
                    let v = self.expand(v, &state.env, line)?;
                    if v.is_empty() {
                        return Err(BuildError::at(
                            line,
                            "VOLUME specified can not be an empty string",
                        ));
                    }
                    state
                        .config
                        .config_mut()
                        .volumes
                        .get_or_insert_with(BTreeMap::new)
                        .insert(v.clone(), Default::default());
                    vs.push(v);
                }
                state.push_empty(created, format!("VOLUME [{}]", vs.join(" ")));
            }
            Kind::Expose { ports } => {
                // In the order of the (sorted) words, repeats kept, as
                // BuildKit's history.
                let mut specs = Vec::new();
                let mut total = 0;
                for p in ports {
                    let words = self
                        .lex
                        .process_words(p, &state.env)
                        .map_err(|e| BuildError::at(line, e.to_string()))?;
                    for w in words {
                        specs.extend(
                            instr::parse_ports_counted(&w, &mut total)
                                .map_err(|m| BuildError::at_cause(line, m))?,
                        );
                    }
                }
                for s in &specs {
                    state
                        .config
                        .config_mut()
                        .exposed_ports
                        .get_or_insert_with(BTreeMap::new)
                        .insert(s.clone(), Default::default());
                }
                state.push_empty(created, format!("EXPOSE [{}]", specs.join(" ")));
            }
            Kind::Shell { shell } => {
                state.config.config_mut().shell = Some(shell.clone());
                state.push_empty(created, format!("SHELL [{}]", shell.join(" ")));
            }
            Kind::Onbuild { expression, .. } => {
                state
                    .config
                    .config_mut()
                    .on_build
                    .get_or_insert_with(Vec::new)
                    .push(expression.clone());
            }
            Kind::Cmd(cl) => {
                let args = history::shell_wrap(cl, &state.shell());
                state.config.config_mut().cmd = Some(args.clone());
                // As BuildKit sets it on every CMD (Docker's image spec).
                state.config.config_mut().args_escaped = Some(true);
                state.cmd_set = true;
                state.push_empty(created, format!("CMD {}", history::go_quote_list(&args)));
            }
            Kind::Entrypoint(cl) => {
                let args = history::shell_wrap(cl, &state.shell());
                let c = state.config.config_mut();
                c.entrypoint = if args.is_empty() {
                    None
                } else {
                    Some(args.clone())
                };
                if !state.cmd_set {
                    c.cmd = None;
                }
                state.push_empty(
                    created,
                    format!("ENTRYPOINT {}", history::go_quote_list(&args)),
                );
            }
            Kind::Healthcheck(h) => {
                let hc = instr::healthcheck_config(h);
                // BuildKit v0.29's `fmt.Sprintf("HEALTHCHECK %q", config)`:
                // each field of the struct quoted (durations as strings,
                // the retry count as a character literal).
                let msg = format!(
                    "HEALTHCHECK &{{{} {:?} {:?} {:?} {:?} {}}}",
                    history::go_quote_list(&h.test),
                    history::go_duration(h.interval),
                    history::go_duration(h.timeout),
                    history::go_duration(h.start_period),
                    history::go_duration(h.start_interval),
                    history::go_quote_rune(i64::from(h.retries.unwrap_or(0)))
                );
                state.config.config_mut().healthcheck = Some(hc);
                state.push_empty(created, msg);
            }
            Kind::Workdir { path } => {
                let p = self.expand(path, &state.env, line)?;
                let wd = join_abs(&state.workdir(), &p);
                if wd.len() > MAX_WORKDIR {
                    return Err(self.located(
                        line,
                        path,
                        format!(
                            "WORKDIR: the working directory would be {} bytes, more than {MAX_WORKDIR}",
                            wd.len()
                        ),
                    ));
                }
                self.hold(wd.len() * 2, line)?;
                state.config.config_mut().working_dir = Some(wd.clone());
                let msg = format!("WORKDIR {wd}");
                if wd == "/" {
                    state.push_empty(created, msg);
                } else {
                    out.ops.push(LayerOp {
                        name,
                        location: self.location(instr.line, instr.end_line),
                        op: Op::Mkdir(MkdirOp {
                            path: wd,
                            user: state.user(),
                        }),
                    });
                    state.push_layer_history(created, msg);
                }
            }
            Kind::Run(run) => {
                let (op, created_by) = self.run_op(out.index, out.platform, state, instr, run)?;
                out.ops.push(LayerOp {
                    name,
                    location: self.location(instr.line, instr.end_line),
                    op: Op::Exec(op),
                });
                state.push_layer_history(created, created_by);
            }
            Kind::Copy(c) => {
                // The stage's ARG/ENV values over the global ARGs, as the
                // plan expanded it (plan::track_stage_env).
                let from = match &c.from {
                    Some(f) => {
                        let mut env = plan::global_env(&self.plan.global_args, &self.plan.platform);
                        env.extend(state.env.iter().cloned());
                        Some(self.expand(f, &env, line)?)
                    }
                    None => None,
                };
                let (op, created_by) = self.copy_op(
                    out.index,
                    state,
                    line,
                    CopySpec {
                        add: false,
                        from,
                        paths: &c.paths,
                        chown: c.chown.as_deref(),
                        chmod: c.chmod.as_deref(),
                        excludes: &c.excludes,
                        link: c.link,
                        parents: c.parents,
                        checksum: None,
                        keep_git_dir: false,
                        unpack_remote: false,
                    },
                )?;
                out.ops.push(LayerOp {
                    name,
                    location: self.location(instr.line, instr.end_line),
                    op: Op::Copy(op),
                });
                state.push_layer_history(created, created_by);
            }
            Kind::Add(a) => {
                let (op, created_by) = self.copy_op(
                    out.index,
                    state,
                    line,
                    CopySpec {
                        add: a.unpack != Some(false),
                        from: None,
                        paths: &a.paths,
                        chown: a.chown.as_deref(),
                        chmod: a.chmod.as_deref(),
                        excludes: &a.excludes,
                        link: a.link,
                        parents: false,
                        checksum: a.checksum.as_deref(),
                        keep_git_dir: a.keep_git_dir == Some(true),
                        unpack_remote: a.unpack == Some(true),
                    },
                )?;
                out.ops.push(LayerOp {
                    name,
                    location: self.location(instr.line, instr.end_line),
                    op: Op::Copy(op),
                });
                state.push_layer_history(created, created_by);
            }
        }
        Ok(())
    }

    fn run_op(
        &self,
        stage: usize,
        platform: &Platform,
        state: &StageState,
        instr: &Instruction,
        run: &kiln_parser::instructions::Run,
    ) -> Result<(ExecOp, String), BuildError> {
        let line = instr.line;
        let insecure = match run.security.as_deref() {
            Some("insecure") if self.opts.allow_insecure => true,
            Some("insecure") => {
                return Err(BuildError::at(
                    line,
                    "RUN --security=insecure is not allowed: pass `--allow security.insecure` to kiln build",
                ))
            }
            _ => false,
        };
        let mut specs = Vec::with_capacity(run.mounts.len());
        for raw in &run.mounts {
            let expand = |w: &str| self.expand(w, &state.env, line);
            let mount = mounts::expand_mount(raw, line, &expand)?;
            let from =
                mount
                    .from
                    .as_deref()
                    .map(|f| match plan::resolve_source(self.df, stage, f) {
                        plan::Source::Stage(j) => Source::Stage(j),
                        plan::Source::Image(reference) => Source::Image {
                            reference,
                            platform: self.plan.platform.clone(),
                        },
                    });
            specs.push((mount, from));
        }
        let mounts = mounts::plan_mounts(specs, &state.workdir(), self.opts, line)?;
        let args = instr::run_args(&run.command, &state.shell())
            .map_err(|m| BuildError::at_cause(line, m))?;
        let network =
            match run.network.as_deref() {
                Some("none") => kiln_executor::NetworkMode::None,
                // As BuildKit: the host's network is an entitlement the one
                // who runs the build grants, not the Dockerfile.
                Some("host") if self.opts.allow_network_host => kiln_executor::NetworkMode::Host,
                Some("host") => return Err(BuildError::at(
                    line,
                    "RUN --network=host is not allowed: pass `--allow network.host` to kiln build",
                )),
                _ => self.opts.network,
            };
        let env = state.run_env();
        // Proxy args reach the step without being declared, outside the key.
        let proxy_env = PROXY_ARGS
            .iter()
            .filter_map(|p| {
                let v = self.opts.build_args.get(*p)?;
                (!env.iter().any(|(k, _)| k == p)).then(|| (p.to_string(), v.clone()))
            })
            .collect();
        // BuildKit marks the history of a step that made a layer.
        let created_by = format!(
            "RUN {} # buildkit",
            history::run_command_string(&args, &state.args, &env)
        );
        let env_bytes: usize = env.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        self.hold(env_bytes + created_by.len() * 2, line)?;
        Ok((
            ExecOp {
                script: instr::shebang_script(&run.command),
                args,
                env,
                proxy_env,
                cwd: state.workdir(),
                user: state.user(),
                network,
                mounts,
                insecure,
                step_name: instr.original.trim().to_string(),
                platform: platform.clone(),
            },
            created_by,
        ))
    }

    fn copy_op(
        &self,
        stage: usize,
        state: &StageState,
        line: usize,
        spec: CopySpec<'_>,
    ) -> Result<(CopyOp, String), BuildError> {
        let env = &state.env;
        let mut sources = Vec::new();
        for s in &spec.paths.sources {
            sources.push(self.expand(s, env, line)?);
        }
        let dest_raw = self.expand(&spec.paths.dest, env, line)?;
        let dest = join_abs(&state.workdir(), &dest_raw);
        let dest_is_dir =
            dest_raw.ends_with('/') || dest_raw.ends_with("/.") || dest_raw == "." || spec.parents;
        let chown = match spec.chown {
            Some(c) => Some(self.expand(c, env, line)?),
            None => None,
        };
        let chmod = match spec.chmod {
            Some(c) => Some(
                crate::chmod::Chmod::parse(&self.expand(c, env, line)?)
                    .map_err(|m| BuildError::at_cause(line, m))?,
            ),
            None => None,
        };
        let excludes = spec
            .excludes
            .iter()
            .map(|e| self.expand(e, env, line))
            .collect::<Result<Vec<_>, _>>()?;
        if !excludes.is_empty() {
            kiln_parser::dockerignore::PatternMatcher::new(&excludes)
                .map_err(|e| BuildError::at(line, format!("--exclude: {e}")))?;
        }
        let checksum = match spec.checksum {
            Some(c) => Some(self.expand(c, env, line)?),
            None => None,
        };
        let mut heredocs = Vec::new();
        for c in &spec.paths.contents {
            let data = if c.expand {
                self.lex
                    .skip_process_quotes(true)
                    .process_word(&c.data, env)
                    .map_err(|e| BuildError::at(line, e.to_string()))?
            } else {
                c.data.clone()
            };
            heredocs.push(Heredoc {
                path: c.path.clone(),
                raw: c.data.clone(),
                expand: c.expand,
                data,
            });
        }
        let names: Vec<String> = heredocs.iter().map(|h| h.path.clone()).collect();
        let created_by = history::copy_created_by(&CopyHistory {
            add: spec.add,
            chown: chown.as_deref(),
            chmod: spec.chmod,
            from: spec.from.as_deref(),
            parents: spec.parents,
            sources: &sources,
            heredocs: &names,
            dest: &dest_raw,
        });
        let from = spec.from.as_deref().map(|f| self.source_ref(stage, f));
        Ok((
            CopyOp {
                add: spec.add,
                from,
                sources,
                dest,
                dest_is_dir,
                chown,
                chmod,
                excludes,
                heredocs,
                link: spec.link,
                parents: spec.parents,
                checksum,
                keep_git_dir: spec.keep_git_dir,
                unpack_remote: spec.unpack_remote,
            },
            created_by,
        ))
    }
}

struct CopySpec<'a> {
    add: bool,
    from: Option<String>,
    paths: &'a kiln_parser::instructions::SourcesAndDest,
    chown: Option<&'a str>,
    chmod: Option<&'a str>,
    excludes: &'a [String],
    link: bool,
    parents: bool,
    /// ADD `--checksum` (remote sources only).
    checksum: Option<&'a str>,
    /// ADD `--keep-git-dir`.
    keep_git_dir: bool,
    /// ADD `--unpack=true`: remote archives are unpacked too.
    unpack_remote: bool,
}
