//! Untrusted text on the user's terminal.
//!
//! Image names, labels, history, step names, RUN output and error texts
//! come from images, Dockerfiles and registries. Written raw to a terminal,
//! their control sequences would be the terminal's commands: OSC 52 writes
//! the clipboard, others set the title, move the cursor, rewrite what was
//! printed. On a terminal every control character but newline and tab is
//! shown escaped (`\u{1b}`), as `ls` shows odd names; into a pipe or a
//! file the text goes as it is (scripts and CI logs keep their bytes and
//! colours).

use std::borrow::Cow;
use std::io::IsTerminal;
use std::sync::OnceLock;

/// Whether stdout is a terminal (asked once).
pub fn stdout_tty() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::io::stdout().is_terminal())
}

/// Whether stderr is a terminal (asked once).
pub fn stderr_tty() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::io::stderr().is_terminal())
}

/// `s` as it may be written to a terminal (`tty`), else as it is.
pub fn shown(s: &str, tty: bool) -> Cow<'_, str> {
    if !tty || !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn unsafe_char(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn control_sequences_are_shown_escaped_on_a_terminal_only() {
        let osc52 = "a\u{1b}]52;c;cHduZWQ=\u{7}b\r\nc\td";
        assert_eq!(shown(osc52, true), "a\\u{1b}]52;c;cHduZWQ=\\u{7}b\\r\nc\td");
        assert_eq!(shown(osc52, false), osc52);
        assert!(matches!(
            shown("plain\n", true),
            std::borrow::Cow::Borrowed(_)
        ));
        // C1 controls (a CSI in one code point) too.
        assert_eq!(shown("x\u{9b}2J", true), "x\\u{9b}2J");
    }
}
