//! History strings, as BuildKit's Dockerfile frontend writes them
//! (`created_by` of each image history entry).

use kiln_image::config::History;
use kiln_parser::instructions::CommandLine;

/// A history entry made by this build.
pub fn history(created: &str, created_by: String) -> History {
    History {
        created: Some(created.to_string()),
        created_by: Some(created_by),
        comment: Some("buildkit.dockerfile.v0".into()),
        ..Default::default()
    }
}

/// BuildKit's `runCommandString`: `|N K=V … cmd` when build args are set.
pub fn run_command_string(
    args: &[String],
    build_args: &[(String, Option<String>)],
    env: &[(String, String)],
) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (k, v) in build_args {
        let value = env
            .iter()
            .rev()
            .find(|(ek, _)| ek == k)
            .map(|(_, ev)| ev.clone())
            .or_else(|| v.clone())
            .unwrap_or_default();
        parts.push(format!("{k}={value}"));
    }
    if !parts.is_empty() {
        parts.insert(0, format!("|{}", parts.len()));
    }
    parts.extend(args.iter().cloned());
    parts.join(" ")
}

/// What a COPY/ADD's history says.
pub struct CopyHistory<'a> {
    /// `ADD` (else `COPY`).
    pub add: bool,
    /// `--chown`, expanded.
    pub chown: Option<&'a str>,
    /// `--chmod`, as written.
    pub chmod: Option<&'a str>,
    /// `--from`, expanded.
    pub from: Option<&'a str>,
    /// `--parents`.
    pub parents: bool,
    /// Sources, expanded.
    pub sources: &'a [String],
    /// Heredoc file names.
    pub heredocs: &'a [String],
    /// Destination as written (expanded).
    pub dest: &'a str,
}

/// `COPY --chown=… src dest # buildkit`.
pub fn copy_created_by(c: &CopyHistory<'_>) -> String {
    let mut m = String::from(if c.add { "ADD" } else { "COPY" });
    if let Some(o) = c.chown {
        m.push_str(&format!(" --chown={o}"));
    }
    if let Some(o) = c.chmod {
        m.push_str(&format!(" --chmod={o}"));
    }
    if let Some(f) = c.from {
        m.push_str(&format!(" --from={f}"));
    }
    if c.parents {
        m.push_str(" --parents");
    }
    for s in c.sources {
        m.push(' ');
        m.push_str(s);
    }
    for p in c.heredocs {
        m.push_str(&format!(" <<{p}"));
    }
    m.push(' ');
    m.push_str(c.dest);
    m.push_str(" # buildkit");
    m
}

/// CMD/ENTRYPOINT: the shell form is wrapped in the current SHELL.
pub fn shell_wrap(cl: &CommandLine, shell: &[String]) -> Vec<String> {
    if cl.prepend_shell {
        let mut v = shell.to_vec();
        v.push(cl.args.join(" "));
        v
    } else {
        cl.args.clone()
    }
}

/// Go's `%q` of a string slice.
pub fn go_quote_list(v: &[String]) -> String {
    kiln_parser::ast::go_quote_list(v)
}

/// Go's `time.Duration.String()`, `0s` when unset: `1h2m3.5s`, `1.5ms`,
/// `2µs`, `3ns`.
pub fn go_duration(d: Option<std::time::Duration>) -> String {
    let n = d.map_or(0, |d| d.as_nanos());
    // `n / unit` with up to `digits` decimals, trailing zeros dropped.
    let frac = |n: u128, unit: u128, digits: usize| -> String {
        let (whole, rest) = (n / unit, n % unit);
        if rest == 0 {
            return whole.to_string();
        }
        let f = format!("{rest:0digits$}");
        format!("{whole}.{}", f.trim_end_matches('0'))
    };
    match n {
        0 => "0s".into(),
        n if n < 1_000 => format!("{n}ns"),
        n if n < 1_000_000 => format!("{}µs", frac(n, 1_000, 3)),
        n if n < 1_000_000_000 => format!("{}ms", frac(n, 1_000_000, 6)),
        n => {
            let secs = n / 1_000_000_000;
            let (h, m) = (secs / 3600, secs % 3600 / 60);
            let mut out = String::new();
            if h > 0 {
                out.push_str(&format!("{h}h"));
            }
            if h > 0 || m > 0 {
                out.push_str(&format!("{m}m"));
            }
            let s = n - (h * 3600 + m * 60) * 1_000_000_000;
            out.push_str(&format!("{}s", frac(s, 1_000_000_000, 9)));
            out
        }
    }
}

/// Go's `%q` of an integer: the character literal of that code point
/// (`'\x03'`, `'A'`; not a code point: `'�'`), as `fmt` prints it.
pub fn go_quote_rune(n: i64) -> String {
    let c = u32::try_from(n)
        .ok()
        .and_then(char::from_u32)
        .unwrap_or('\u{FFFD}');
    let body = match c {
        '\'' => "\\'".to_string(),
        '\\' => "\\\\".to_string(),
        '\u{7}' => "\\a".to_string(),
        '\u{8}' => "\\b".to_string(),
        '\u{c}' => "\\f".to_string(),
        '\n' => "\\n".to_string(),
        '\r' => "\\r".to_string(),
        '\t' => "\\t".to_string(),
        '\u{b}' => "\\v".to_string(),
        c if (c as u32) < 0x20 || c as u32 == 0x7f => format!("\\x{:02x}", c as u32),
        c if c.is_control() || c.is_whitespace() && c != ' ' => {
            if (c as u32) < 0x10000 {
                format!("\\u{:04x}", c as u32)
            } else {
                format!("\\U{:08x}", c as u32)
            }
        }
        c => c.to_string(),
    };
    format!("'{body}'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_go_does() {
        use std::time::Duration;
        assert_eq!(go_duration(None), "0s");
        assert_eq!(go_duration(Some(Duration::from_secs(30))), "30s");
        assert_eq!(go_duration(Some(Duration::from_secs(90))), "1m30s");
        assert_eq!(go_duration(Some(Duration::from_secs(3600))), "1h0m0s");
        assert_eq!(go_duration(Some(Duration::from_millis(1500))), "1.5s");
        assert_eq!(go_duration(Some(Duration::from_millis(500))), "500ms");
        assert_eq!(go_duration(Some(Duration::from_micros(1500))), "1.5ms");
        assert_eq!(go_duration(Some(Duration::from_nanos(2500))), "2.5µs");
        assert_eq!(go_duration(Some(Duration::from_nanos(3))), "3ns");
        assert_eq!(go_quote_rune(3), "'\\x03'");
        assert_eq!(go_quote_rune(65), "'A'");
        assert_eq!(go_quote_rune(-1), "'\u{FFFD}'");
    }

    #[test]
    fn run_history_lists_build_args_first() {
        let s = run_command_string(
            &["/bin/sh".into(), "-c".into(), "make".into()],
            &[("V".into(), Some("1".into())), ("W".into(), None)],
            &[("V".into(), "2".into())],
        );
        assert_eq!(s, "|2 V=2 W= /bin/sh -c make");
    }
}
