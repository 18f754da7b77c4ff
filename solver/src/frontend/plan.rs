//! Which stages a build needs and in what order: global ARGs evaluated,
//! `FROM` bases expanded and resolved to stages, images or `scratch`,
//! stage-to-stage edges (`FROM <stage>`, `COPY --from`, `RUN --mount=from=`)
//! collected, and everything the target does not reach pruned away.

use std::collections::{BTreeMap, HashMap};

use kiln_image::manifest::Platform;
use kiln_parser::instructions::{Dockerfile, Kind, Stage};
use kiln_parser::shell::Lex;

use crate::error::BuildError;

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// The empty filesystem.
    Scratch,
    /// An earlier stage of the same Dockerfile.
    Stage(usize),
    /// An image reference (expanded, not yet normalised).
    Image(String),
}

/// Where a `COPY --from` / `--mount from=` reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A stage of this Dockerfile.
    Stage(usize),
    /// An image reference.
    Image(String),
}

/// One stage the build will run.
#[derive(Debug, Clone)]
pub struct PlannedStage {
    /// Index into [`Dockerfile::stages`].
    pub index: usize,
    /// The expanded base.
    pub base: Base,
    /// Stages this one waits for.
    pub deps: Vec<usize>,
    /// The platform it builds for: its `FROM --platform=` (expanded,
    /// normalised), else its base stage's, else the build's target.
    pub platform: Platform,
}

/// The pruned build plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Reachable stages in source order (dependencies always come first).
    pub stages: Vec<PlannedStage>,
    /// The stage whose result is the image.
    pub target: usize,
    /// Global ARG values after `--build-arg` overrides, in declaration order
    /// (`None`: declared without a value).
    pub global_args: Vec<(String, Option<String>)>,
    /// The target platform (`TARGETPLATFORM`), normalised.
    pub platform: Platform,
}

impl Plan {
    /// The planned stage with Dockerfile index `index`.
    pub fn stage(&self, index: usize) -> Option<&PlannedStage> {
        self.stages.iter().find(|s| s.index == index)
    }
}

/// The host platform, normalised as BuildKit's automatic args give it
/// (`linux/amd64`; arm64 has no variant).
pub fn host_platform() -> Platform {
    kiln_image::platform::normalize(&Platform::host())
}

/// BuildKit's automatic platform args for a build on this host for
/// `target`: `BUILDPLATFORM`, `BUILDOS`, `BUILDARCH`, `BUILDVARIANT`
/// (the host) and `TARGETPLATFORM`, `TARGETOS`, `TARGETARCH`,
/// `TARGETVARIANT`. They are defined in `FROM` lines; inside a stage only
/// after `ARG NAME` (BuildKit's scoping).
pub fn platform_args_for(target: &Platform) -> Vec<(String, String)> {
    let build = host_platform();
    let target = kiln_image::platform::normalize(target);
    let mut out = Vec::new();
    for (prefix, p) in [("BUILD", &build), ("TARGET", &target)] {
        out.push((format!("{prefix}PLATFORM"), p.to_string()));
        out.push((format!("{prefix}OS"), p.os.clone()));
        out.push((format!("{prefix}ARCH"), p.architecture.clone()));
        out.push((
            format!("{prefix}VARIANT"),
            p.variant.clone().unwrap_or_default(),
        ));
    }
    out
}

/// [`platform_args_for`] the host (a build for the host).
pub fn platform_args() -> Vec<(String, String)> {
    platform_args_for(&host_platform())
}

/// Build args that need no `ARG` declaration and stay out of history and
/// cache keys (Docker's proxy variables).
pub const PROXY_ARGS: [&str; 8] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// Evaluates the global ARGs (`ARG` before the first `FROM`) of a build
/// for `target`.
pub fn global_args(
    df: &Dockerfile,
    build_args: &BTreeMap<String, String>,
    target: &Platform,
) -> Result<Vec<(String, Option<String>)>, BuildError> {
    let lex = Lex::new(df.escape);
    let mut env: Vec<(String, String)> = platform_args_for(target);
    let mut out = Vec::new();
    let mut bytes = 0;
    for instr in &df.meta_args {
        let Kind::Arg { args } = &instr.kind else {
            continue;
        };
        for def in args {
            let value = match (build_args.get(&def.key), &def.default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(d)) => Some(
                    lex.process_word(d, &env)
                        .map_err(|e| BuildError::at(instr.line, format!("ARG {}: {e}", def.key)))?,
                ),
                (None, None) => None,
            };
            if let Some(v) = &value {
                bytes += 2 * (def.key.len() + v.len() + 4);
                check_env_bytes(bytes, instr.line)?;
                env.push((def.key.clone(), v.clone()));
            }
            out.push((def.key.clone(), value));
        }
    }
    Ok(out)
}

/// The bytes of ARG/ENV values in `env`.
fn env_bytes(env: &[(String, String)]) -> usize {
    env.iter().map(|(k, v)| k.len() + v.len() + 4).sum()
}

/// ARG and ENV values of a stage (or the global ARGs) are part of an image
/// config, which is at most [`kiln_image::config::MAX_CONFIG_SIZE`]: more
/// is an error at `line`, before an ARG doubled on every line takes the
/// machine's memory.
fn check_env_bytes(bytes: usize, line: usize) -> Result<(), BuildError> {
    let limit = kiln_image::config::MAX_CONFIG_SIZE;
    if bytes as u64 > limit {
        return Err(BuildError::at(
            line,
            format!(
                "ARG and ENV values would be more than {} MiB (the limit of an image config)",
                limit >> 20
            ),
        ));
    }
    Ok(())
}

/// The environment FROM lines and `--from` values expand in: predefined
/// platform args (for `target`), then the global args that have values.
pub fn global_env(global: &[(String, Option<String>)], target: &Platform) -> Vec<(String, String)> {
    let mut env = platform_args_for(target);
    for (k, v) in global {
        if let Some(v) = v {
            env.push((k.clone(), v.clone()));
        }
    }
    env
}

/// The most stages a Dockerfile may have: stages are looked up by name
/// from each other (a chain of 100,000 took minutes and a gigabyte).
pub const MAX_STAGES: usize = 4096;

fn find_stage(stages: &[Stage], name: &str, before: usize) -> Option<usize> {
    let lower = name.to_lowercase();
    if let Some(i) = stages[..before]
        .iter()
        .position(|s| s.name.as_deref() == Some(lower.as_str()))
    {
        return Some(i);
    }
    name.parse::<usize>().ok().filter(|i| *i < before)
}

/// The named context (its key) that replaces `stage`, if any: a
/// `--build-context NAME=…` whose NAME is the stage's `AS` name replaces
/// the whole stage, as BuildKit does (its instructions are not run; every
/// `FROM NAME` and `COPY --from=NAME` reads the context instead).
pub fn replacing_context<'a>(
    stage: &Stage,
    names: impl IntoIterator<Item = &'a String> + Clone,
) -> Option<&'a String> {
    let name = stage.name.as_deref()?;
    // BuildKit never takes `scratch` or `context` from a named context.
    if ["scratch", "context"].contains(&name) {
        return None;
    }
    // The name as written, else one differing only in case, else one
    // naming the same image (`docker.io/library/base:latest`).
    let key = crate::contexts::context_key(name);
    names
        .clone()
        .into_iter()
        .find(|k| k.as_str() == name)
        .or_else(|| {
            names
                .clone()
                .into_iter()
                .find(|k| k.eq_ignore_ascii_case(name))
        })
        .or_else(|| {
            names
                .into_iter()
                .find(|k| crate::contexts::context_key(k) == key)
        })
}

/// Replaces every stage a named context names (see
/// [`replacing_context`]) by `FROM NAME`, keeping its `--platform` and
/// of its instructions only the `ONBUILD`s (as BuildKit, whose child
/// stages still run a replaced stage's `ONBUILD` lines); `FROM NAME` then
/// resolves to the context (no stage before it has that name). Returns
/// the replaced stages' indexes.
pub fn replace_named_stages<'a>(
    df: &mut Dockerfile,
    names: impl IntoIterator<Item = &'a String> + Clone,
) -> Vec<usize> {
    let mut replaced = Vec::new();
    for st in &mut df.stages {
        if let Some(k) = replacing_context(st, names.clone()) {
            st.base = k.clone();
            st.instructions
                .retain(|i| matches!(i.kind, Kind::Onbuild { .. }));
            replaced.push(st.index);
        }
    }
    replaced
}

/// Whether `stage` is only `FROM X AS X` (ONBUILD lines aside): a stage a
/// named context replaced (see [`replace_named_stages`]), or one that is
/// the image of its name. Read before it is defined, it is that image or
/// context (BuildKit: a replaced stage may be read from anywhere).
fn is_bare_alias(stage: &Stage) -> bool {
    stage.name.as_deref().is_some_and(|n| {
        stage.base.eq_ignore_ascii_case(n)
            || crate::contexts::context_key(&stage.base) == crate::contexts::context_key(n)
    }) && stage
        .instructions
        .iter()
        .all(|i| matches!(i.kind, Kind::Onbuild { .. }))
}

/// Resolves a `--from` value seen in stage `stage`.
pub fn resolve_source(df: &Dockerfile, stage: usize, from: &str) -> Source {
    match find_stage(&df.stages, from, stage) {
        Some(i) => Source::Stage(i),
        None => Source::Image(from.to_string()),
    }
}

/// Plans the build of `target` (the last stage when `None`) for the host
/// platform.
pub fn plan(
    df: &Dockerfile,
    build_args: &BTreeMap<String, String>,
    target: Option<&str>,
) -> Result<Plan, BuildError> {
    plan_for(df, build_args, target, &host_platform())
}

/// [`plan`] for the target platform `platform`.
pub fn plan_for(
    df: &Dockerfile,
    build_args: &BTreeMap<String, String>,
    target: Option<&str>,
    platform: &Platform,
) -> Result<Plan, BuildError> {
    plan_with(df, build_args, target, platform, &HashMap::new())
}

/// [`plan_for`] with `extra` dependencies by stage index: the stages a
/// base image's ONBUILD triggers read (`COPY --from`, `RUN
/// --mount=from=`), known once its config is (see [`trigger_deps`]).
pub fn plan_with(
    df: &Dockerfile,
    build_args: &BTreeMap<String, String>,
    target: Option<&str>,
    platform: &Platform,
    extra: &HashMap<usize, Vec<usize>>,
) -> Result<Plan, BuildError> {
    let platform = kiln_image::platform::normalize(platform);
    if let Some(s) = df.stages.get(MAX_STAGES) {
        return Err(BuildError::at(
            s.line,
            format!("a Dockerfile may have at most {MAX_STAGES} stages"),
        ));
    }
    // This build's pattern substitutions get their own budget.
    kiln_parser::shell::reset_match_budget();
    let global = global_args(df, build_args, &platform)?;
    let env = global_env(&global, &platform);
    let lex = Lex::new(df.escape);
    let target = match target {
        None => df.stages.len() - 1,
        Some(t) => df
            .stages
            .iter()
            .position(|s| s.name.as_deref() == Some(t.to_lowercase().as_str()))
            .ok_or_else(|| {
                let names: Vec<&str> = df.stages.iter().filter_map(|s| s.name.as_deref()).collect();
                let hint = kiln_parser::suggest(t, &names)
                    .map(|s| format!("; did you mean {s:?}?"))
                    .unwrap_or_default();
                BuildError::Usage(format!(
                    "target stage {t:?} could not be found (stages: {}{hint})",
                    if names.is_empty() {
                        "none named".into()
                    } else {
                        names.join(", ")
                    }
                ))
            })?,
    };

    let mut all = Vec::with_capacity(df.stages.len());
    for (i, stage) in df.stages.iter().enumerate() {
        let base_name = lex
            .process_word(&stage.base, &env)
            .map_err(|e| BuildError::at(stage.line, format!("FROM {}: {e}", stage.base)))?;
        if base_name.is_empty() {
            return Err(BuildError::at(
                stage.line,
                format!("base name ({}) should not be blank", stage.base),
            ));
        }
        let base = if base_name.eq_ignore_ascii_case("scratch") {
            Base::Scratch
        } else if let Some(j) = find_stage(&df.stages, &base_name, i) {
            Base::Stage(j)
        } else {
            Base::Image(base_name)
        };
        let mut deps: Vec<usize> = extra.get(&i).cloned().unwrap_or_default();
        if let Base::Stage(j) = base {
            deps.push(j);
            // The base stage's ONBUILD triggers run first in this stage:
            // the stages they read (`COPY --from`, `RUN --mount=from=`)
            // are this stage's too (BuildKit's initOnBuildTriggers).
            for instr in &df.stages[j].instructions {
                let Kind::Onbuild { trigger, .. } = &instr.kind else {
                    continue;
                };
                for from in source_refs(trigger) {
                    let from = lex
                        .process_word(&from, &env)
                        .map_err(|e| BuildError::at(instr.line, format!("--from {from}: {e}")))?;
                    if let Source::Stage(k) = resolve_source(df, i, &from) {
                        if !deps.contains(&k) {
                            deps.push(k);
                        }
                    }
                }
            }
        }
        let stage_platform = match (&stage.platform, &base) {
            (Some(p), _) => {
                let expanded = lex
                    .process_word(p, &env)
                    .map_err(|e| BuildError::at(stage.line, format!("FROM --platform={p}: {e}")))?;
                kiln_image::platform::parse(&expanded)
                    .map_err(|e| BuildError::at(stage.line, format!("FROM --platform={p}: {e}")))?
            }
            (None, Base::Stage(j)) => all
                .iter()
                .find(|s: &&PlannedStage| s.index == *j)
                .map(|s| s.platform.clone())
                .unwrap_or_else(|| platform.clone()),
            (None, _) => platform.clone(),
        };
        // `--from` expands with the stage's ARG/ENV values seen so far
        // over the global ARGs (a stage `ARG SRC=b` wins over a global one).
        let mut stage_env = env.clone();
        let mut stage_bytes = env_bytes(&stage_env);
        for instr in &stage.instructions {
            let before = stage_env.len();
            track_stage_env(&lex, &global, build_args, &mut stage_env, &instr.kind);
            stage_bytes += env_bytes(&stage_env[before.min(stage_env.len())..]);
            check_env_bytes(stage_bytes, instr.line)?;
            for from in source_refs(&instr.kind) {
                let from = lex
                    .process_word(&from, &stage_env)
                    .map_err(|e| BuildError::at(instr.line, format!("--from {from}: {e}")))?;
                if let Source::Stage(j) = resolve_source(df, i, &from) {
                    if !deps.contains(&j) {
                        deps.push(j);
                    }
                } else if df.stages.iter().skip(i).any(|s| {
                    s.name.as_deref() == Some(from.to_lowercase().as_str()) && !is_bare_alias(s)
                }) {
                    return Err(BuildError::at(
                        instr.line,
                        format!("stage {from:?} is used before it is defined; stages can only refer to earlier stages"),
                    ));
                }
            }
        }
        all.push(PlannedStage {
            index: i,
            base,
            deps,
            platform: stage_platform,
        });
    }

    let mut needed = vec![false; all.len()];
    let mut stack = vec![target];
    while let Some(i) = stack.pop() {
        if std::mem::replace(&mut needed[i], true) {
            continue;
        }
        stack.extend(all[i].deps.iter().copied());
    }
    let stages = all.into_iter().filter(|s| needed[s.index]).collect();
    Ok(Plan {
        stages,
        target,
        global_args: global,
        platform,
    })
}

/// `--build-arg` names no ARG of the planned build declares (BuildKit
/// warns "One or more build-args [..] were not consumed"), sorted. Proxy
/// variables, the platform args, `BUILDKIT_*` and `SOURCE_DATE_EPOCH` are
/// predefined and never reported.
pub fn unused_build_args(
    df: &Dockerfile,
    plan: &Plan,
    build_args: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut declared: Vec<&str> = plan.global_args.iter().map(|(k, _)| k.as_str()).collect();
    for s in &plan.stages {
        for instr in df
            .stages
            .get(s.index)
            .map(|s| &s.instructions[..])
            .unwrap_or(&[])
        {
            if let Kind::Arg { args } = &instr.kind {
                declared.extend(args.iter().map(|d| d.key.as_str()));
            }
        }
    }
    let builtin = platform_args();
    build_args
        .keys()
        .filter(|k| !declared.contains(&k.as_str()))
        .filter(|k| !PROXY_ARGS.contains(&k.as_str()) && !builtin.iter().any(|(b, _)| b == *k))
        .filter(|k| !k.starts_with("BUILDKIT_") && k.as_str() != "SOURCE_DATE_EPOCH")
        .cloned()
        .collect()
}

/// Updates `env` (last entry wins) with what an `ARG` or `ENV` of a stage
/// defines, as the build will: `--build-arg`, else the default, else the
/// global ARG's value. Expansion errors are left to the build itself.
fn track_stage_env(
    lex: &Lex,
    global: &[(String, Option<String>)],
    build_args: &BTreeMap<String, String>,
    env: &mut Vec<(String, String)>,
    kind: &Kind,
) {
    match kind {
        Kind::Arg { args } => {
            for def in args {
                let value = match (build_args.get(&def.key), &def.default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(d)) => lex.process_word(d, env).ok(),
                    (None, None) => global
                        .iter()
                        .rev()
                        .find(|(k, _)| *k == def.key)
                        .and_then(|(_, v)| v.clone()),
                };
                if let Some(v) = value {
                    env.push((def.key.clone(), v));
                }
            }
        }
        Kind::Env { vars } => {
            for kv in vars {
                if let (Ok(k), Ok(v)) = (
                    lex.process_word(&kv.key, env),
                    lex.process_word(&kv.value, env),
                ) {
                    env.push((k, v));
                }
            }
        }
        _ => {}
    }
}

/// `--from` values an instruction reads from (COPY --from, RUN --mount from=).
/// The stages the ONBUILD `triggers` of stage `stage`'s base image read,
/// as stage indexes (names resolved as in that stage; a trigger that
/// does not parse is left for lowering to report).
pub fn trigger_deps(df: &Dockerfile, stage: usize, triggers: &[String]) -> Vec<usize> {
    let mut out = Vec::new();
    for t in triggers.iter().take(crate::frontend::MAX_ONBUILD_TRIGGERS) {
        let Ok(parsed) = kiln_parser::parse(&format!("FROM scratch\n{t}\n")) else {
            continue;
        };
        for instr in parsed.stages.iter().flat_map(|s| &s.instructions) {
            for from in source_refs(&instr.kind) {
                if let Source::Stage(j) = resolve_source(df, stage, &from) {
                    if !out.contains(&j) {
                        out.push(j);
                    }
                }
            }
        }
    }
    out
}

fn source_refs(kind: &Kind) -> Vec<String> {
    match kind {
        Kind::Copy(c) => c.from.iter().cloned().collect(),
        Kind::Run(r) => r.mounts.iter().filter_map(|m| m.from.clone()).collect(),
        Kind::Onbuild { .. } => Vec::new(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn df(text: &str) -> Dockerfile {
        kiln_parser::parse(text).expect("parse")
    }

    #[test]
    fn target_prunes_unreachable_stages() {
        let d = df("FROM scratch AS a\nFROM scratch AS broken\nRUN false\nFROM a AS b\nCOPY --from=0 / /\n");
        let p = plan(&d, &BTreeMap::new(), Some("b")).unwrap();
        let idx: Vec<usize> = p.stages.iter().map(|s| s.index).collect();
        assert_eq!(idx, vec![0, 2]);
        assert_eq!(p.stages[1].base, Base::Stage(0));
    }

    #[test]
    fn global_args_expand_in_from() {
        let d = df("ARG BASE=busy\nARG TAG\nFROM ${BASE}box:${TAG:-latest}\n");
        let p = plan(&d, &BTreeMap::new(), None).unwrap();
        assert_eq!(p.stages[0].base, Base::Image("busybox:latest".into()));
        let args = BTreeMap::from([("TAG".to_string(), "1.36".to_string())]);
        let p = plan(&d, &args, None).unwrap();
        assert_eq!(p.stages[0].base, Base::Image("busybox:1.36".into()));
    }

    #[test]
    fn unknown_target_is_a_usage_error() {
        let d = df("FROM scratch AS a\n");
        assert!(matches!(
            plan(&d, &BTreeMap::new(), Some("nope")),
            Err(BuildError::Usage(_))
        ));
    }
}
