//! Dockerfile lint rules (BuildKit's `--check` and `# check=` directive):
//! a subset of BuildKit's rules, reported with their Dockerfile lines,
//! without building. `# check=skip=Rule1,Rule2` (or `skip=all`) turns
//! rules off; `error=true` makes any warning fail the check.

use kiln_parser::instructions::Dockerfile;

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
        let mut slug = String::new();
        for (i, c) in self.rule.chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
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
];

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

/// Lints `df` (honouring its `# check=` directive).
pub fn lint(df: &Dockerfile) -> LintReport {
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
    let mut names: Vec<String> = Vec::new();
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
                names.push(lname);
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
