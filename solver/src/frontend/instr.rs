//! Instruction-level rules of the frontend: RUN argv and heredoc
//! scripts, EXPOSE ports, STOPSIGNAL names, HEALTHCHECK configs.

use kiln_parser::instructions::CommandLine;

crate::error::module_error! {
    /// An instruction argument that breaks a rule.
    pub enum InstrError {}
}

/// Where a `RUN <<EOF` script with a `#!` line is mounted.
pub const PIPES: &str = "/dev/pipes";

/// The `#!` script of a single-heredoc RUN: (file name, content).
pub fn shebang_script(cl: &CommandLine) -> Option<(String, String)> {
    let arg = cl.args.first()?;
    if cl.files.len() != 1 || cl.args.len() != 1 || !cl.prepend_shell {
        return None;
    }
    kiln_parser::parse_heredoc(arg).ok().flatten()?;
    let f = &cl.files[0];
    let data = f.chomped_content();
    data.starts_with("#!").then(|| (f.name.clone(), data))
}

/// RUN's argv: heredocs become the script, the shell form is wrapped.
pub fn run_args(cl: &CommandLine, shell: &[String]) -> Result<Vec<String>, InstrError> {
    let mut args = cl.args.clone();
    if !cl.files.is_empty() {
        if args.len() != 1 || !cl.prepend_shell {
            return Err(InstrError::Invalid(format!(
                "parsing produced an invalid run command: {args:?}"
            )));
        }
        if let Ok(Some(_)) = kiln_parser::parse_heredoc(&args[0]) {
            let f = &cl.files[0];
            let data = f.chomped_content();
            if data.starts_with("#!") {
                // BuildKit runs such a script as a file at /dev/pipes/NAME
                // (mounted read-only by run_step).
                args = vec![format!("{PIPES}/{}", f.name)];
            } else {
                args = vec![data];
            }
        } else {
            let mut s = args[0].clone();
            for f in &cl.files {
                s.push('\n');
                s.push_str(&f.content);
                s.push_str(&f.name);
            }
            args = vec![s];
        }
    }
    if cl.prepend_shell {
        let mut v = shell.to_vec();
        v.push(args.join(" "));
        return Ok(v);
    }
    Ok(args)
}

/// `EXPOSE` port specs: `80`, `80/tcp`, `8000-8002/udp`.
pub fn parse_ports(w: &str) -> Result<Vec<String>, InstrError> {
    let (ports, proto) = match w.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (w, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(InstrError::Invalid(format!("invalid proto: {proto}")));
    }
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (a, b),
        None => (ports, ports),
    };
    let lo: u16 = lo
        .parse()
        .map_err(|_| InstrError::Invalid(format!("invalid containerPort: {ports}")))?;
    let hi: u16 = hi
        .parse()
        .map_err(|_| InstrError::Invalid(format!("invalid containerPort: {ports}")))?;
    if hi < lo {
        return Err(InstrError::Invalid(format!("invalid port range: {ports}")));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

/// `STOPSIGNAL`: a signal name or number.
pub fn validate_signal(s: &str) -> Result<(), InstrError> {
    let name = s.trim_start_matches("SIG");
    const NAMES: [&str; 31] = [
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
        "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
        "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
    ];
    if s.parse::<u32>().is_ok_and(|n| (1..=64).contains(&n))
        || NAMES.contains(&name)
        || name.starts_with("RTMIN")
        || name.starts_with("RTMAX")
    {
        Ok(())
    } else {
        Err(InstrError::Invalid(format!("Invalid signal: {s}")))
    }
}

/// A `HEALTHCHECK` as the image config stores it (durations in ns).
pub fn healthcheck_config(
    h: &kiln_parser::instructions::Healthcheck,
) -> kiln_image::config::Healthcheck {
    kiln_image::config::Healthcheck {
        test: Some(h.test.clone()),
        interval: h.interval.map(|d| d.as_nanos() as i64),
        timeout: h.timeout.map(|d| d.as_nanos() as i64),
        start_period: h.start_period.map(|d| d.as_nanos() as i64),
        start_interval: h.start_interval.map(|d| d.as_nanos() as i64),
        retries: h.retries.map(i64::from),
    }
}
