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

/// Go's `time.Duration.String()` for whole durations, `0s` when unset.
pub fn go_duration(d: Option<std::time::Duration>) -> String {
    let Some(d) = d else { return "0s".into() };
    let total = d.as_secs_f64();
    if total == 0.0 {
        return "0s".into();
    }
    let h = (total / 3600.0).floor();
    let m = ((total - h * 3600.0) / 60.0).floor();
    let s = total - h * 3600.0 - m * 60.0;
    let mut out = String::new();
    if h > 0.0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0.0 || m > 0.0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{}s", trim_float(s)));
    out
}

fn trim_float(f: f64) -> String {
    let s = format!("{f:.9}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
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
