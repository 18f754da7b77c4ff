//! Dockerfile lint rules (BuildKit's `--check` and `# check=` directive):
//! a subset of BuildKit's rules, reported with their Dockerfile lines,
//! without building. `# check=skip=Rule1,Rule2` (or `skip=all`) turns
//! rules off; `error=true` makes any warning fail the check.

use std::collections::BTreeSet;

use kiln_parser::instructions::Dockerfile;
use kiln_parser::shell::Lex;

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LintWarning {
    /// BuildKit's rule name (e.g. `FromAsCasing`).
    pub rule: &'static str,
    /// What is wrong.
    pub message: String,
    /// The Dockerfile line (1-based).
    pub line: usize,
}

impl LintWarning {
    /// The rule's documentation page.
    pub fn url(&self) -> String {
        // `JSONArgsRecommended` -> `json-args-recommended`: a word starts
        // at an upper-case letter after a lower-case one, or at the last
        // capital of an acronym.
        let chars: Vec<char> = self.rule.chars().collect();
        let mut slug = String::new();
        for (i, c) in chars.iter().enumerate() {
            let prev_lower = i > 0 && chars[i - 1].is_ascii_lowercase();
            let acronym_end = i > 0
                && chars[i - 1].is_ascii_uppercase()
                && chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if c.is_ascii_uppercase() && (prev_lower || acronym_end) {
                slug.push('-');
            }
            slug.push(c.to_ascii_lowercase());
        }
        format!("https://docs.docker.com/go/dockerfile/rule/{slug}/")
    }
}

/// The result of linting a Dockerfile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LintReport {
    /// Findings, in line order.
    pub warnings: Vec<LintWarning>,
    /// `# check=error=true`: warnings fail the build/check.
    pub error: bool,
}

/// Every rule kiln checks.
pub const RULES: &[&str] = &[
    "StageNameCasing",
    "FromAsCasing",
    "ConsistentInstructionCasing",
    "JSONArgsRecommended",
    "FromPlatformFlagConstDisallowed",
    "MaintainerDeprecated",
    "DuplicateStageName",
    "ReservedStageName",
    "LegacyKeyValueFormat",
    "UndefinedArgInFrom",
    "UndefinedVar",
];

/// The environment variables of a base image, when known (`None`: the
/// image is not at hand, so its variables cannot be judged).
pub type BaseEnv<'a> = &'a dyn Fn(&str) -> Option<Vec<String>>;

/// Variables `word` uses that `known` lacks (as BuildKit's shell lexer
/// sees them).
fn undefined_in(lex: &Lex, word: &str, known: &BTreeSet<String>) -> Vec<String> {
    let env: Vec<(String, String)> = known.iter().map(|k| (k.clone(), "x".into())).collect();
    match lex.process_word_with_matches(word, &env) {
        Ok(p) => p.unmatched.into_iter().collect(),
        Err(_) => Vec::new(),
    }
}

/// `UndefinedArgInFrom` and `UndefinedVar`: variables used by what the
/// frontend expands (not RUN/CMD/ENTRYPOINT, which the shell expands) that
/// no ARG, ENV, predefined arg or base image defines.
fn undefined_vars(
    df: &Dockerfile,
    base_env: BaseEnv<'_>,
    push: &mut dyn FnMut(&'static str, usize, String),
) {
    use kiln_parser::instructions::Kind;
    let lex = Lex::new(df.escape);
    let predefined: BTreeSet<String> = crate::plan::platform_args()
        .into_iter()
        .map(|(k, _)| k)
        .chain(crate::plan::PROXY_ARGS.iter().map(|s| s.to_string()))
        .collect();
    let mut global = predefined.clone();
    for instr in &df.meta_args {
        if let Kind::Arg { args } = &instr.kind {
            global.extend(args.iter().map(|a| a.key.clone()));
        }
    }
    let host = crate::plan::host_platform();
    let genv = crate::plan::global_env(
        &crate::plan::global_args(df, &std::collections::BTreeMap::new(), &host)
            .unwrap_or_default(),
        &host,
    );
    // Stage names to indexes, first wins: one lookup per FROM, not a scan
    // of every earlier stage (50,000 stages took 15 s).
    let mut by_name: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, s) in df.stages.iter().enumerate() {
        if let Some(n) = s.name.as_deref() {
            by_name.entry(n).or_insert(i);
        }
    }
    let mut stage_env: Vec<Option<BTreeSet<String>>> = Vec::new();
    for stage in &df.stages {
        for v in undefined_in(&lex, &stage.base, &global) {
            push(
                "UndefinedArgInFrom",
                stage.line,
                format!("FROM argument '{v}' is not declared"),
            );
        }
        // What the base brings: scratch nothing, a stage its variables,
        // an image its config's (when known).
        let Ok(base_name) = lex.process_word(&stage.base, &genv) else {
            stage_env.push(None);
            continue;
        };
        let base = base_name.to_ascii_lowercase();
        let known_base: Option<BTreeSet<String>> = if base == "scratch" {
            Some(BTreeSet::new())
        } else if let Some(&i) = by_name.get(base.as_str()).filter(|&&i| i < stage_env.len()) {
            stage_env.get(i).cloned().flatten()
        } else {
            base_env(&base_name).map(|vars| {
                vars.iter()
                    .map(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k).to_string())
                    .collect()
            })
        };
        let Some(mut known) = known_base else {
            stage_env.push(None);
            continue;
        };
        known.insert("PATH".into());
        known.extend(predefined.iter().cloned());
        for instr in &stage.instructions {
            let mut words: Vec<&str> = Vec::new();
            let mut define: Vec<String> = Vec::new();
            match &instr.kind {
                Kind::Env { vars } => {
                    for kv in vars {
                        words.push(&kv.value);
                        define.push(kv.key.clone());
                    }
                }
                Kind::Arg { args } => {
                    for a in args {
                        if let Some(d) = &a.default {
                            words.push(d);
                        }
                        define.push(a.key.clone());
                    }
                }
                Kind::Label { labels } => {
                    for kv in labels {
                        words.push(&kv.key);
                        words.push(&kv.value);
                    }
                }
                Kind::Copy(c) => {
                    words.extend(c.paths.sources.iter().map(String::as_str));
                    words.push(&c.paths.dest);
                    words.extend(c.chown.as_deref());
                    words.extend(c.chmod.as_deref());
                }
                Kind::Add(a) => {
                    words.extend(a.paths.sources.iter().map(String::as_str));
                    words.push(&a.paths.dest);
                    words.extend(a.chown.as_deref());
                    words.extend(a.chmod.as_deref());
                }
                Kind::Workdir { path } => words.push(path),
                Kind::User { user } => words.push(user),
                Kind::Stopsignal { signal } => words.push(signal),
                Kind::Expose { ports } => words.extend(ports.iter().map(String::as_str)),
                Kind::Volume { volumes } => words.extend(volumes.iter().map(String::as_str)),
                _ => {}
            }
            for word in words {
                for v in undefined_in(&lex, word, &known) {
                    push(
                        "UndefinedVar",
                        instr.line,
                        format!("Usage of undefined variable '${v}'"),
                    );
                }
            }
            known.extend(define);
        }
        stage_env.push(Some(known));
    }
}

fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

fn is_upper(s: &str) -> bool {
    s.chars().all(|c| !c.is_ascii_lowercase())
}

fn is_lower(s: &str) -> bool {
    s.chars().all(|c| !c.is_ascii_uppercase())
}

/// The text after the keyword and its `--flags`.
fn args_after_flags(original: &str) -> &str {
    let mut rest = original.trim_start();
    // keyword
    rest = rest
        .split_once(char::is_whitespace)
        .map_or("", |(_, r)| r)
        .trim_start();
    while rest.starts_with("--") {
        rest = rest
            .split_once(char::is_whitespace)
            .map_or("", |(_, r)| r)
            .trim_start();
    }
    rest
}

/// Lints `df` (honouring its `# check=` directive). Base images' variables
/// are unknown here; see [`lint_with`].
pub fn lint(df: &Dockerfile) -> LintReport {
    lint_with(df, &|_| None)
}

/// Lints `df`, asking `base_env` for the variables of base images.
pub fn lint_with(df: &Dockerfile, base_env: BaseEnv<'_>) -> LintReport {
    let mut skip: Vec<String> = Vec::new();
    let mut error = false;
    for (k, v) in &df.directives {
        if !k.eq_ignore_ascii_case("check") {
            continue;
        }
        for part in v.split(';') {
            match part.trim().split_once('=') {
                Some((k, v)) if k.trim() == "skip" => {
                    skip.extend(v.split(',').map(|s| s.trim().to_string()))
                }
                Some((k, v)) if k.trim() == "error" => error = v.trim() == "true",
                _ => {}
            }
        }
    }
    let mut w: Vec<LintWarning> = Vec::new();
    let mut push = |rule: &'static str, line: usize, message: String| {
        w.push(LintWarning {
            rule,
            message,
            line,
        })
    };
    // Keywords in order, for the casing majority.
    let mut keywords: Vec<(String, usize)> = Vec::new();
    let mut names: std::collections::HashSet<String> = std::collections::HashSet::new();
    for stage in &df.stages {
        let toks = words(&stage.source);
        if let Some(kw) = toks.first() {
            keywords.push((kw.to_string(), stage.line));
        }
        let as_pos = toks.iter().position(|t| t.eq_ignore_ascii_case("as"));
        if let (Some(i), Some(from)) = (as_pos, toks.first()) {
            let as_kw = toks[i];
            if (is_upper(from) && !is_upper(as_kw)) || (is_lower(from) && !is_lower(as_kw)) {
                push(
                    "FromAsCasing",
                    stage.line,
                    format!("'{as_kw}' and '{from}' keywords' casing do not match"),
                );
            }
            if let Some(name) = toks.get(i + 1) {
                if !is_lower(name) {
                    push(
                        "StageNameCasing",
                        stage.line,
                        format!("Stage name '{name}' should be lowercase"),
                    );
                }
                let lname = name.to_ascii_lowercase();
                if lname == "scratch" || lname == "context" {
                    push(
                        "ReservedStageName",
                        stage.line,
                        format!(
                            "Stage name should not use the same name as reserved stage {lname:?}"
                        ),
                    );
                }
                if names.contains(&lname) {
                    push(
                        "DuplicateStageName",
                        stage.line,
                        format!("Duplicate stage name {lname:?}, stage names should be unique"),
                    );
                }
                names.insert(lname);
            }
        }
        if let Some(p) = &stage.platform {
            if !p.contains('$') {
                push(
                    "FromPlatformFlagConstDisallowed",
                    stage.line,
                    format!("FROM --platform flag should not use constant value {p:?}"),
                );
            }
        }
        for instr in &stage.instructions {
            let Some(kw) = words(&instr.original).first().map(|s| s.to_string()) else {
                continue;
            };
            keywords.push((kw.clone(), instr.line));
            let upper = kw.to_ascii_uppercase();
            let args = args_after_flags(&instr.original);
            match upper.as_str() {
                "CMD" | "ENTRYPOINT" if !args.starts_with('[') && !args.is_empty() => push(
                    "JSONArgsRecommended",
                    instr.line,
                    format!(
                        "JSON arguments recommended for {upper} to prevent unintended behavior related to OS signals"
                    ),
                ),
                "MAINTAINER" => push(
                    "MaintainerDeprecated",
                    instr.line,
                    "Maintainer instruction is deprecated in favor of using label".into(),
                ),
                "ENV" | "LABEL" => {
                    let first = args.split_whitespace().next().unwrap_or("");
                    if !first.is_empty() && !first.contains('=') {
                        push(
                            "LegacyKeyValueFormat",
                            instr.line,
                            format!("\"{upper} key=value\" should be used instead of legacy \"{upper} key value\" format"),
                        );
                    }
                }
                _ => {}
            }
        }
    }
    undefined_vars(df, base_env, &mut push);
    let uppers = keywords.iter().filter(|(k, _)| is_upper(k)).count();
    let lowers = keywords.iter().filter(|(k, _)| is_lower(k)).count();
    let majority_upper = uppers >= lowers;
    for (k, line) in &keywords {
        let ok = if majority_upper {
            is_upper(k)
        } else {
            is_lower(k)
        };
        if !ok {
            push(
                "ConsistentInstructionCasing",
                *line,
                format!(
                    "Command '{k}' should match the case of the command majority ({})",
                    if majority_upper {
                        "uppercase"
                    } else {
                        "lowercase"
                    }
                ),
            );
        }
    }
    let all = skip.iter().any(|s| s == "all");
    w.retain(|x| !all && !skip.iter().any(|s| s == x.rule));
    w.sort_by_key(|x| x.line);
    LintReport { warnings: w, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_urls() {
        let w = |rule| LintWarning {
            rule,
            message: String::new(),
            line: 1,
        };
        assert!(w("JSONArgsRecommended")
            .url()
            .ends_with("/json-args-recommended/"));
        assert!(w("FromAsCasing").url().ends_with("/from-as-casing/"));
        assert!(w("UndefinedVar").url().ends_with("/undefined-var/"));
    }

    #[test]
    fn undefined_variables() {
        let df = kiln_parser::parse(
            "ARG BASE=alpine\nFROM $BASE AS a\nARG V=1\nENV E=$V\nCOPY $V $E $NOPE /x/\nRUN echo $SHELL_ONLY\nFROM ${MISSING:-scratch}\nWORKDIR /$HOME\n",
        )
        .expect("parse");
        let env = |name: &str| (name == "alpine").then(|| vec!["HOME=/root".to_string()]);
        let r: Vec<(&str, usize, String)> = lint_with(&df, &env)
            .warnings
            .into_iter()
            .map(|w| (w.rule, w.line, w.message))
            .collect();
        assert!(
            r.contains(&(
                "UndefinedVar",
                5,
                "Usage of undefined variable '$NOPE'".into()
            )),
            "{r:?}"
        );
        assert!(
            r.contains(&(
                "UndefinedArgInFrom",
                7,
                "FROM argument 'MISSING' is not declared".into()
            )),
            "{r:?}"
        );
        assert!(
            r.contains(&(
                "UndefinedVar",
                8,
                "Usage of undefined variable '$HOME'".into()
            )),
            "{r:?}"
        );
        assert_eq!(
            r.iter().filter(|x| x.0 == "UndefinedVar").count(),
            2,
            "{r:?}"
        );
    }

    fn rules(text: &str) -> Vec<(&'static str, usize)> {
        let df = kiln_parser::parse(text).expect("parse");
        lint(&df)
            .warnings
            .iter()
            .map(|w| (w.rule, w.line))
            .collect()
    }

    #[test]
    fn finds_buildkit_rules_with_lines() {
        let r = rules(
            "FROM --platform=linux/amd64 busybox as Build\nrun true\nCMD echo hi\nENV A b\nMAINTAINER me\nFROM busybox AS other\nENTRYPOINT [\"sh\"]\n",
        );
        assert!(r.contains(&("FromAsCasing", 1)), "{r:?}");
        assert!(r.contains(&("StageNameCasing", 1)), "{r:?}");
        assert!(r.contains(&("FromPlatformFlagConstDisallowed", 1)), "{r:?}");
        assert!(r.contains(&("ConsistentInstructionCasing", 2)), "{r:?}");
        assert!(r.contains(&("JSONArgsRecommended", 3)), "{r:?}");
        assert!(r.contains(&("LegacyKeyValueFormat", 4)), "{r:?}");
        assert!(r.contains(&("MaintainerDeprecated", 5)), "{r:?}");
        assert!(!r.iter().any(|(_, l)| *l == 7), "{r:?}");
    }

    #[test]
    fn clean_file_and_check_directive() {
        assert!(
            rules("FROM busybox AS a\nARG P\nFROM --platform=$P busybox\nCMD [\"sh\"]\n")
                .is_empty()
        );
        let df = kiln_parser::parse(
            "# check=skip=JSONArgsRecommended;error=true\nFROM busybox\nCMD sh\nENV a b\n",
        )
        .expect("parse");
        let r = lint(&df);
        assert!(r.error);
        assert_eq!(
            r.warnings.iter().map(|w| w.rule).collect::<Vec<_>>(),
            vec!["LegacyKeyValueFormat"]
        );
        let df = kiln_parser::parse("# check=skip=all\nFROM busybox\nCMD sh\n").expect("parse");
        assert!(lint(&df).warnings.is_empty());
    }
}
