//! Replays BuildKit's own shell-lexer test data (`frontend/dockerfile/shell`
//! at the commit named in the corpus's PROVENANCE.md) through
//! `kiln_parser::shell::Lex`: every line of `envVarTest`, every case of
//! `wordsTest` and every case of `lex_cases.json`. Each test reports how
//! many cases it ran and fails listing every mismatch.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use kiln_parser::shell::{Env, EnvList, Lex, ShellError};
use serde_json::Value;

fn corpus() -> Option<PathBuf> {
    common::conformance_dir("buildkit-shell")
}

fn read(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Fails with every mismatch, or prints the count.
fn report(corpus: &str, total: usize, failures: &[String]) {
    assert!(total > 0, "{corpus}: no cases found");
    if !failures.is_empty() {
        panic!(
            "{corpus}: {} of {total} cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    eprintln!("{corpus}: {total}/{total} cases passed");
}

fn show(result: &Result<String, ShellError>) -> String {
    match result {
        Ok(s) => format!("{s:?}"),
        Err(e) => format!("error ({e})"),
    }
}

/// `TestShellParser4EnvVars`: `PLATFORM|INPUT|EXPECTED`, one word each.
#[test]
fn env_var_test() {
    let Some(dir) = corpus() else { return };
    let text = read(&dir, "envVarTest");
    let env = EnvList::new(["PWD=/home", "SHELL=bash", "KOREAN=한국어", "NULL="]);
    let lex = Lex::new('\\');
    let (mut total, mut skipped) = (0, 0);
    let mut failures = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        if raw.starts_with('#') {
            continue;
        }
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        assert_eq!(
            fields.len(),
            3,
            "envVarTest:{line_no}: malformed line {raw:?}"
        );
        let (platform, input, expected) = (fields[0].trim(), fields[1].trim(), fields[2].trim());
        match platform {
            "A" | "U" => {}
            "W" => {
                skipped += 1;
                continue;
            }
            other => panic!("envVarTest:{line_no}: unknown platform {other:?}"),
        }
        total += 1;
        let got = lex.process_word(input, &env);
        let ok = match (&got, expected) {
            (Err(_), "error") => true,
            (Ok(s), e) => e != "error" && s == e,
            (Err(_), _) => false,
        };
        if !ok {
            failures.push(format!(
                "  envVarTest:{line_no}: {input:?} -> {}, expected {expected:?}",
                show(&got)
            ));
        }
    }
    eprintln!("envVarTest: {skipped} Windows-only lines not applicable on Linux");
    report("envVarTest", total, &failures);
}

/// `TestShellParser4Words`: `INPUT | w1,w2,…` with a growing environment.
#[test]
fn words_test() {
    let Some(dir) = corpus() else { return };
    let text = read(&dir, "wordsTest");
    let lex = Lex::new('\\');
    let mut envs: Vec<String> = Vec::new();
    let mut total = 0;
    let mut failures = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("ENV ") {
            // Trailing spaces are part of the value.
            envs.push(rest.trim_start_matches(' ').to_string());
            continue;
        }
        let parts: Vec<&str> = line.split('|').collect();
        assert_eq!(
            parts.len(),
            2,
            "wordsTest:{line_no}: malformed line {line:?}"
        );
        let input = parts[0].trim();
        let expected: Vec<&str> = parts[1].trim_start_matches(' ').split(',').collect();
        total += 1;
        let env = EnvList::new(&envs);
        let got = lex
            .process_words(input, &env)
            .unwrap_or_else(|_| vec!["error".to_string()]);
        if got != expected {
            failures.push(format!(
                "  wordsTest:{line_no}: {input:?} -> {got:?}, expected {expected:?}"
            ));
        }
    }
    report("wordsTest", total, &failures);
}

fn env_map(case: &Value) -> HashMap<String, String> {
    case["env"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn string_set(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn cases<'a>(doc: &'a Value, section: &str) -> &'a [Value] {
    doc[section]["cases"]
        .as_array()
        .unwrap_or_else(|| panic!("lex_cases.json: section {section} has no cases"))
}

/// `lex_cases.json`: every section.
#[test]
fn lex_cases() {
    let Some(dir) = corpus() else { return };
    let doc = common::read_json(&dir.join("lex_cases.json"));
    let lex = Lex::new('\\');
    let mut total = 0;
    let mut failures = Vec::new();

    // TestProcessWithMatches: result, matched and unmatched sets.
    for (i, case) in cases(&doc, "process_word_with_matches").iter().enumerate() {
        total += 1;
        let input = case["input"].as_str().unwrap_or_default();
        let env = env_map(case);
        let got = lex.process_word_with_matches(input, &env);
        let expect_error = case["expect_error"].as_bool().unwrap_or(false);
        let problem = match (&got, expect_error) {
            (Err(_), true) => None,
            (Ok(p), true) => Some(format!("-> {:?}, expected an error", p.result)),
            (Err(e), false) => Some(format!("-> error ({e})")),
            (Ok(p), false) => {
                let expected = case["expected"].as_str().unwrap_or_default();
                let matched = string_set(&case["matched"]);
                let unmatched = string_set(&case["unmatched"]);
                (p.result != expected || p.matched != matched || p.unmatched != unmatched).then(
                    || {
                        format!(
                            "-> {:?} matched {:?} unmatched {:?}, expected {expected:?} matched {matched:?} unmatched {unmatched:?}",
                            p.result, p.matched, p.unmatched
                        )
                    },
                )
            }
        };
        if let Some(problem) = problem {
            failures.push(format!(
                "  process_word_with_matches[{i}] {input:?} env {env:?} {problem}"
            ));
        }
    }

    // TestShellParserMandatoryEnvVars and TestProcessWithMatchesPlatform.
    for (i, case) in cases(&doc, "mandatory_and_platform").iter().enumerate() {
        total += 1;
        let input = case["input"].as_str().unwrap_or_default();
        let env = env_map(case);
        let got = lex.process_word(input, &env);
        let ok = match (&got, case["expect_error_contains"].as_str()) {
            (Err(e), Some(needle)) => e.to_string().contains(needle),
            (Ok(_), Some(_)) => false,
            (Ok(s), None) => Some(s.as_str()) == case["expected"].as_str(),
            (Err(_), None) => false,
        };
        if !ok {
            failures.push(format!(
                "  mandatory_and_platform[{i}] {input:?} env {env:?} -> {}, expected {}",
                show(&got),
                case.get("expect_error_contains")
                    .map(|n| format!("an error containing {n}"))
                    .unwrap_or_else(|| case["expected"].to_string())
            ));
        }
    }

    // TestGetEnv: an environment from KEY=VALUE strings.
    for (i, case) in cases(&doc, "get_env").iter().enumerate() {
        total += 1;
        let list: Vec<&str> = case["env_list"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let key = case["lookup"].as_str().unwrap_or_default();
        let expected = case["expected"].as_str().unwrap_or_default();
        let got = EnvList::new(&list).get(key).unwrap_or_default();
        if got != expected {
            failures.push(format!(
                "  get_env[{i}] {list:?} [{key:?}] -> {got:?}, expected {expected:?}"
            ));
        }
    }

    // TestConvertShellPatternToRegex: which patterns are valid. The pattern
    // reaches the matcher verbatim through a variable, `${V#$P}`.
    let patterns = &doc["shell_pattern_to_regex"];
    let ok_patterns = patterns["ok"]
        .as_object()
        .expect("lex_cases.json: shell_pattern_to_regex.ok");
    let invalid_patterns = patterns["invalid"]
        .as_array()
        .expect("lex_cases.json: shell_pattern_to_regex.invalid");
    let valid = ok_patterns.keys().map(|p| (p.as_str(), true));
    let invalid = invalid_patterns
        .iter()
        .filter_map(Value::as_str)
        .map(|p| (p, false));
    for (pattern, should_compile) in valid.chain(invalid) {
        for word in ["${V#$P}", "${V##$P}", "${V%$P}", "${V%%$P}", "${V/$P/r}"] {
            total += 1;
            let env = vec![
                ("V".to_string(), "value".to_string()),
                ("P".to_string(), pattern.to_string()),
            ];
            let got = lex.process_word(word, &env);
            if got.is_ok() != should_compile {
                failures.push(format!(
                    "  shell_pattern_to_regex {pattern:?} via {word} -> {}, expected {}",
                    show(&got),
                    if should_compile {
                        "success"
                    } else {
                        "an invalid-pattern error"
                    }
                ));
            }
        }
    }

    report("lex_cases.json", total, &failures);
}

/// The literal-heavy pattern from `TestConvertShellPatternToRegex` matches
/// exactly the text its regular expression does.
#[test]
fn regex_special_characters_are_literal() {
    let env = HashMap::from([
        ("P".to_string(), r"(()[]{\}^$.\*\?|\\".to_string()),
        ("V".to_string(), r"(()[]{}^$.*?|\tail".to_string()),
    ]);
    let lex = Lex::new('\\');
    assert_eq!(lex.process_word("${V#$P}", &env).unwrap(), "tail");
}

mod no_panic {
    use super::*;
    use proptest::prelude::*;

    /// Strings made mostly of the characters the expander treats specially.
    fn shellish() -> impl Strategy<Value = String> {
        let atom = prop_oneof![
            3 => prop::sample::select(vec![
                "$", "{", "}", ":", "-", "+", "?", "#", "%", "/", "*", "\\", "`", "'", "\"",
                "<", "<<", " ", "\t", "\n", "V", "E", "U", "0", "1", "@", "!", "_", "a", ".",
                "[", "]", "${", "${V", "${E", "${U", "\u{feff}", "é", "한",
            ])
            .prop_map(str::to_string),
            1 => any::<char>().prop_map(String::from),
        ];
        prop::collection::vec(atom, 0..40).prop_map(|parts| parts.concat())
    }

    fn env() -> HashMap<String, String> {
        HashMap::from([
            ("V".to_string(), "a*b?c/d}e\\ f\nx".to_string()),
            ("E".to_string(), String::new()),
        ])
    }

    proptest! {
        // No failure persistence: an integration test has no lib.rs beside
        // it to store regressions next to; a failure prints its input.
        #![proptest_config(ProptestConfig {
            cases: 2000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn expander_never_panics(word in shellish(), escape in prop::sample::select(vec!['\\', '`']),
                                 opts in any::<[bool; 4]>()) {
            let lex = Lex::new(escape)
                .raw_quotes(opts[0])
                .raw_escapes(opts[1])
                .skip_unset_env(opts[2])
                .skip_process_quotes(opts[3]);
            let env = env();
            let _ = lex.process_word(&word, &env);
            let _ = lex.process_words(&word, &env);
            let _ = lex.process_word_with_matches(&word, &env);
        }

        #[test]
        fn arbitrary_strings_never_panic(word in any::<String>()) {
            let lex = Lex::new('\\');
            let env = env();
            let _ = lex.process_word(&word, &env);
            let _ = lex.process_words(&word, &env);
        }
    }
}
