//! BuildKit parser conformance: golden dumps, negative cases, heredocs,
//! line numbers, warnings, directives and the real-world corpus.

mod common;

use std::fs;
use std::path::Path;

use kiln_parser::{directives, parse_ast};
use serde_json::Value;

fn dump_file(path: &Path) -> Result<String, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_ast(&text)
        .map(|ast| ast.dump() + "\n")
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn check_golden(dockerfile: &Path, result: &Path, failures: &mut Vec<String>) {
    let expected = match fs::read_to_string(result) {
        Ok(t) => t,
        Err(e) => return failures.push(format!("{}: {e}", result.display())),
    };
    match dump_file(dockerfile) {
        Ok(got) if got == expected => {}
        Ok(got) => failures.push(format!(
            "{}: dump differs\n--- expected\n{expected}--- got\n{got}",
            dockerfile.display()
        )),
        Err(e) => failures.push(e),
    }
}

fn report(what: &str, total: usize, failures: &[String]) {
    eprintln!("{what}: {}/{total} pass", total - failures.len());
    assert!(
        failures.is_empty(),
        "{what}: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn testfiles_dump_equal_to_result() {
    let Some(dir) = common::conformance_dir("buildkit-parser") else {
        return;
    };
    let mut failures = Vec::new();
    let mut total = 0;
    let mut cases: Vec<_> = fs::read_dir(dir.join("testfiles"))
        .unwrap()
        .flatten()
        .collect();
    cases.sort_by_key(|e| e.path());
    for case in cases {
        total += 1;
        let p = case.path();
        check_golden(&p.join("Dockerfile"), &p.join("result"), &mut failures);
    }
    assert!(total >= 33, "expected at least 33 cases, found {total}");
    report("testfiles", total, &failures);
}

#[test]
fn negative_testfiles_fail() {
    let Some(dir) = common::conformance_dir("buildkit-parser") else {
        return;
    };
    let mut failures = Vec::new();
    let mut total = 0;
    for case in fs::read_dir(dir.join("testfiles-negative"))
        .unwrap()
        .flatten()
    {
        total += 1;
        let p = case.path().join("Dockerfile");
        let text = fs::read_to_string(&p).unwrap();
        if let Ok(ast) = parse_ast(&text) {
            failures.push(format!("{} parsed: {}", p.display(), ast.dump()));
        }
    }
    assert!(total >= 4);
    report("testfiles-negative", total, &failures);
}

fn check_heredocs(
    ast: &kiln_parser::Ast,
    expected: &[Value],
    ctx: &str,
    failures: &mut Vec<String>,
) {
    for entry in expected {
        let child = entry["child"].as_u64().unwrap() as usize;
        let Some(node) = ast.children.get(child) else {
            failures.push(format!("{ctx}: no child {child}"));
            continue;
        };
        let want: Vec<Value> = entry["heredocs"].as_array().cloned().unwrap_or_default();
        let got: Vec<Value> = node
            .heredocs
            .iter()
            .map(|h| {
                serde_json::json!({"name": h.name, "content": h.content, "expand": h.expand,
                    "chomp": h.chomp, "fd": h.fd})
            })
            .collect();
        if got != want {
            failures.push(format!(
                "{ctx} child {child} ({}): heredocs\n want {want:?}\n  got {got:?}",
                node.original
            ));
        }
    }
}

#[test]
fn heredoc_cases() {
    let Some(dir) = common::conformance_dir("buildkit-parser") else {
        return;
    };
    let hd = dir.join("heredoc");
    let mut failures = Vec::new();
    check_golden(&hd.join("Dockerfile"), &hd.join("result"), &mut failures);
    check_golden(
        &hd.join("Dockerfile.json-form"),
        &hd.join("result.json-form"),
        &mut failures,
    );
    let expected = common::read_json(&hd.join("expected.json"));
    let text = fs::read_to_string(hd.join("Dockerfile")).unwrap();
    let ast = parse_ast(&text).unwrap();
    let entries = expected["expected"].as_array().unwrap();
    check_heredocs(&ast, entries, "heredoc/Dockerfile", &mut failures);
    report("heredoc", entries.len() + 2, &failures);
}

#[test]
fn line_numbers_and_warnings() {
    let Some(dir) = common::conformance_dir("buildkit-parser") else {
        return;
    };
    let extra = common::read_json(&dir.join("extra_cases.json"));
    let ln = &extra["line_numbers"];
    let text = fs::read_to_string(dir.join(ln["dockerfile"].as_str().unwrap())).unwrap();
    let ast = parse_ast(&text).unwrap();
    let root: Vec<u64> = ln["root"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let (start, end) = ast.line_range().unwrap();
    assert_eq!(vec![start as u64, end as u64], root, "root line range");
    let want: Vec<Vec<u64>> = serde_json::from_value(ln["children"].clone()).unwrap();
    let got: Vec<Vec<u64>> = ast
        .children
        .iter()
        .map(|c| vec![c.start_line as u64, c.end_line as u64])
        .collect();
    assert_eq!(got, want, "child line ranges");

    let w = &extra["warnings"];
    let text = fs::read_to_string(dir.join(w["dockerfile"].as_str().unwrap())).unwrap();
    let ast = parse_ast(&text).unwrap();
    let got: Vec<String> = ast.warnings.iter().map(|w| w.short.clone()).collect();
    let want: Vec<String> = serde_json::from_value(w["expected_warning_short"].clone()).unwrap();
    assert_eq!(got, want);
    let mut failures = Vec::new();
    check_golden(
        &dir.join("warnings/Dockerfile"),
        &dir.join("warnings/result"),
        &mut failures,
    );
    report("warnings", 1, &failures);
}

#[test]
fn extra_cases_unit_level() {
    let Some(dir) = common::conformance_dir("buildkit-parser") else {
        return;
    };
    let extra = common::read_json(&dir.join("extra_cases.json"));
    let mut failures = Vec::new();
    let mut total = 0;

    // JSON arrays through CMD (exec form) and the hard error for non-strings.
    for case in extra["json_arrays"]["valid"].as_array().unwrap() {
        total += 1;
        let text = format!("CMD {}\n", case["text"].as_str().unwrap());
        let want: Vec<String> = serde_json::from_value(case["expect"].clone()).unwrap();
        match parse_ast(&text) {
            Ok(ast) if ast.children[0].json && ast.children[0].arg_strings() == want => {}
            Ok(ast) => failures.push(format!("json {text:?}: got {:?}", ast.children[0])),
            Err(e) => failures.push(format!("json {text:?}: {e}")),
        }
    }
    for text in extra["json_arrays"]["invalid_not_string_array"]
        .as_array()
        .unwrap()
    {
        for instr in ["RUN", "CMD", "ENTRYPOINT", "SHELL", "ADD", "COPY", "VOLUME"] {
            total += 1;
            let src = format!("{instr} {}\n", text.as_str().unwrap());
            if parse_ast(&src).is_ok() {
                failures.push(format!("{src:?} should fail"));
            }
        }
    }
    // ENV/LABEL node lists.
    for case in extra["name_val"]["cases"].as_array().unwrap() {
        total += 1;
        let src = format!(
            "{} {}\n",
            case["instruction"].as_str().unwrap(),
            case["args"].as_str().unwrap()
        );
        match (parse_ast(&src), case.get("nodes"), case.get("error")) {
            (Ok(ast), Some(nodes), _) => {
                let want: Vec<String> = serde_json::from_value(nodes.clone()).unwrap();
                if ast.children[0].arg_strings() != want {
                    failures.push(format!("{src:?}: got {:?}", ast.children[0].arg_strings()));
                }
            }
            (Err(e), _, Some(msg)) if e.message.contains(msg.as_str().unwrap()) => {}
            (r, _, _) => failures.push(format!("{src:?}: unexpected {r:?}")),
        }
    }
    // parseWords through ARG.
    for case in extra["parse_words"]["cases"].as_array().unwrap() {
        total += 1;
        let src = format!("ARG {}\n", case["input"].as_str().unwrap());
        let want: Vec<String> = serde_json::from_value(case["expect"].clone()).unwrap();
        match parse_ast(&src) {
            Ok(ast) if ast.children[0].arg_strings() == want => {}
            r => failures.push(format!("words {src:?}: {r:?}")),
        }
    }
    // Directives.
    let d = &extra["directives"];
    for case in d["parse_all"].as_array().unwrap() {
        total += 1;
        let text = case["text"].as_str().unwrap();
        let got = directives::DirectiveParser::default()
            .parse_all(text)
            .unwrap();
        let got: Vec<Value> = got
            .iter()
            .map(|d| serde_json::json!({"name": d.name, "value": d.value}))
            .collect();
        if Value::Array(got.clone()) != case["expect"] {
            failures.push(format!("parse_all {text:?}: {got:?}"));
        }
    }
    for (key, cases) in [
        ("syntax", &d["detect_syntax"]["cases"]),
        ("check", &d["parse_directive_check"]["cases"]),
    ] {
        for case in cases.as_array().unwrap() {
            total += 1;
            let text = case["text"].as_str().unwrap();
            let got = if key == "syntax" {
                directives::detect_syntax(text)
            } else {
                directives::parse_directive(key, text)
            };
            let found = case["found"].as_bool().unwrap();
            let ok = match &got {
                None => !found,
                Some(g) => {
                    found
                        && case.get("ref").is_none_or(|r| r == g.reference.as_str())
                        && case.get("value").is_none_or(|r| r == g.reference.as_str())
                        && case.get("cmdline").is_none_or(|c| c == g.cmdline.as_str())
                        && case
                            .get("line")
                            .is_none_or(|l| l.as_u64() == Some(g.line as u64))
                }
            };
            if !ok {
                failures.push(format!("{key} {text:?}: got {got:?}, want {case}"));
            }
        }
    }
    // Duplicate directives are an error.
    total += 1;
    if parse_ast("# escape=`\n# escape=\\\nFROM x\n").is_ok() {
        failures.push("repeated escape directive accepted".into());
    }
    report("extra_cases", total, &failures);
}

fn collect(dir: &Path, ext: &str, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, ext, out);
        } else if p.to_string_lossy().ends_with(ext) {
            out.push(p);
        }
    }
}

#[test]
fn real_world_corpus_dumps_equal() {
    let Some(dir) = common::conformance_dir("real-world") else {
        return;
    };
    let mut files = Vec::new();
    collect(&dir, ".Dockerfile", &mut files);
    files.sort();
    assert_eq!(files.len(), 242, "expected 242 real-world Dockerfiles");
    let mut failures = Vec::new();
    let mut heredoc_files = 0;
    for f in &files {
        let stem = f
            .to_string_lossy()
            .trim_end_matches(".Dockerfile")
            .to_string();
        check_golden(f, Path::new(&format!("{stem}.ast")), &mut failures);
        let hd = format!("{stem}.heredocs.json");
        if Path::new(&hd).exists() {
            heredoc_files += 1;
            let text = fs::read_to_string(f).unwrap();
            if let Ok(ast) = parse_ast(&text) {
                let want = common::read_json(Path::new(&hd));
                check_heredocs(&ast, want.as_array().unwrap(), &hd, &mut failures);
            }
        }
    }
    assert_eq!(heredoc_files, 27);
    report("real-world", files.len(), &failures);
}

#[test]
fn real_world_corpus_lowers_to_typed_instructions() {
    let Some(dir) = common::conformance_dir("real-world") else {
        return;
    };
    let mut files = Vec::new();
    collect(&dir, ".Dockerfile", &mut files);
    let mut failures = Vec::new();
    for f in &files {
        let text = fs::read_to_string(f).unwrap();
        if let Err(e) = kiln_parser::parse(&text) {
            failures.push(e.render(&f.display().to_string(), &text));
        }
    }
    report("real-world typed", files.len(), &failures);
}
