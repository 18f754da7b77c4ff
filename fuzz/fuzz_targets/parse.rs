//! Fuzz target: no byte sequence makes the parser, the typed lowering,
//! the dump or the diagnostic renderer panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(ast) = kiln_parser::parse_ast(&text) {
        let _ = ast.dump();
    }
    match kiln_parser::parse(&text) {
        Ok(df) => {
            let _ = format!("{df:?}");
        }
        Err(e) => {
            let _ = e.render("Dockerfile", &text);
        }
    }
});
