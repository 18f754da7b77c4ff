//! Our own negative cases: every `testdata/parser/bad/X.Dockerfile` must
//! fail with exactly the diagnostic in `X.err` (file:line:col, the line, a
//! caret, the cause and any suggestion).

use std::fs;
use std::path::PathBuf;

#[test]
fn bad_dockerfiles_render_expected_diagnostics() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/parser/bad");
    let mut cases: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("testdata/parser/bad")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "Dockerfile"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "too few cases in {}", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        let text = fs::read_to_string(case).expect("read case");
        let want = fs::read_to_string(case.with_extension("err")).expect("read .err");
        match kiln_parser::parse(&text) {
            Ok(_) => failures.push(format!("{}: parsed without error", case.display())),
            Err(e) => {
                let got = e.render("Dockerfile", &text);
                if got != want {
                    failures.push(format!(
                        "{}:\n--- want\n{want}--- got\n{got}",
                        case.display()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn example_dockerfile_parses_into_two_stages() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/example/Dockerfile");
    let text = fs::read_to_string(path).expect("example Dockerfile");
    let df = kiln_parser::parse(&text).expect("example parses");
    assert_eq!(df.meta_args.len(), 1);
    assert_eq!(df.stages.len(), 2);
    assert_eq!(df.stages[0].name.as_deref(), Some("build"));
    assert_eq!(df.stages[0].base, "${BASE}");
    assert_eq!(
        df.directives,
        vec![("syntax".to_string(), "docker/dockerfile:1".to_string())]
    );
    let run = &df.stages[0].instructions[2];
    match &run.kind {
        kiln_parser::instructions::Kind::Run(r) => {
            assert_eq!(r.command.files.len(), 1);
            assert!(r.command.files[0].content.contains("tr 'a-z' 'A-Z'"));
        }
        other => panic!("expected RUN, got {other:?}"),
    }
}
