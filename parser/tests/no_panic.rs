//! Property tests: no input makes the parser panic.

use proptest::prelude::*;

/// Fragments that steer random input into the parser's interesting states.
fn dockerfileish() -> impl Strategy<Value = String> {
    let atoms = prop::sample::select(vec![
        "FROM ",
        "RUN ",
        "COPY ",
        "ADD ",
        "ENV ",
        "ARG ",
        "LABEL ",
        "ONBUILD ",
        "HEALTHCHECK ",
        "CMD ",
        "SHELL ",
        "EXPOSE ",
        "USER ",
        "WORKDIR ",
        "VOLUME ",
        "STOPSIGNAL ",
        "MAINTAINER ",
        "ENTRYPOINT ",
        "\n",
        "\r\n",
        "\\\n",
        "`\n",
        "# escape=`\n",
        "# syntax=x\n",
        "# c\n",
        "<<EOF",
        "<<-EOF",
        "<<'EOF'",
        "EOF\n",
        "\tEOF\n",
        "[\"a\", \"b\"]",
        "[1]",
        "[",
        "\"",
        "'",
        "--mount=type=cache,target=/x",
        "--from=a",
        "--chmod=755",
        "--",
        "=",
        " ",
        "\t",
        "a=b ",
        "$X",
        "${X:-y}",
        "AS ",
        "x",
        "é",
        "\u{feff}",
        "NONE",
        "--interval=1s ",
    ]);
    prop::collection::vec(prop_oneof![atoms.prop_map(String::from), ".{0,4}"], 0..40)
        .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_text_never_panics(s in ".{0,200}") {
        let _ = kiln_parser::parse_ast(&s);
        let _ = kiln_parser::parse(&s);
    }

    #[test]
    fn dockerfile_like_text_never_panics(s in dockerfileish()) {
        if let Err(e) = kiln_parser::parse(&s) {
            let _ = e.render("Dockerfile", &s);
        }
        if let Ok(ast) = kiln_parser::parse_ast(&s) {
            let _ = ast.dump();
        }
    }
}
