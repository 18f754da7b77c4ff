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

/// The most ports one `EXPOSE` may expand to (every port of the three
/// protocols is 196,608): `EXPOSE 1-65535 1-65535 …` must not take the
/// machine's memory.
pub const MAX_EXPOSED_PORTS: usize = 3 << 16;

/// `EXPOSE` port specs as BuildKit reads them: `80`, `80/tcp`,
/// `8000-8002/udp`, `80/` (tcp), and a published form
/// (`[IP:]HOST:CONTAINER`) of which only the container port counts; the
/// protocol is lower-cased. `total` counts the ports of the instruction
/// so far (bounded by [`MAX_EXPOSED_PORTS`]).
pub fn parse_ports(w: &str) -> Result<Vec<String>, InstrError> {
    let mut total = 0;
    parse_ports_counted(w, &mut total)
}

/// [`parse_ports`], adding to `total` the ports expanded.
pub fn parse_ports_counted(w: &str, total: &mut usize) -> Result<Vec<String>, InstrError> {
    let parts: Vec<&str> = w.split(':').collect();
    let (ip, host, container) = match parts.len() {
        1 => ("", "", parts[0]),
        2 => ("", parts[0], parts[1]),
        n => (
            w.rsplitn(3, ':').nth(2).unwrap_or(""),
            parts[n - 2],
            parts[n - 1],
        ),
    };
    let invalid = |m: String| InstrError::Invalid(format!("invalid port: {w:?}: {m}"));
    let (port, proto) = container.split_once('/').unwrap_or((container, ""));
    if port.is_empty() {
        return Err(invalid("no port specified".into()));
    }
    let proto = match proto.to_ascii_lowercase().as_str() {
        "" => "tcp".to_string(),
        p @ ("tcp" | "udp" | "sctp") => p.to_string(),
        _ => return Err(invalid(format!("invalid proto: {proto}"))),
    };
    if !ip.is_empty() {
        let bare = ip
            .strip_prefix('[')
            .and_then(|i| i.strip_suffix(']'))
            .unwrap_or(ip);
        if bare.parse::<std::net::IpAddr>().is_err() {
            return Err(InstrError::Invalid(format!("invalid IP address: {ip}")));
        }
    }
    let (lo, hi) = port_range(port)
        .ok_or_else(|| InstrError::Invalid(format!("invalid containerPort: {port}")))?;
    if !host.is_empty() {
        let (hlo, hhi) = port_range(host)
            .ok_or_else(|| InstrError::Invalid(format!("invalid hostPort: {host}")))?;
        if hi - lo != hhi - hlo && hi != lo {
            return Err(InstrError::Invalid(format!(
                "invalid ranges specified for container and host Ports: {port} and {host}"
            )));
        }
    }
    let n = usize::from(hi - lo) + 1;
    *total = total.saturating_add(n);
    if *total > MAX_EXPOSED_PORTS {
        return Err(InstrError::Invalid(format!(
            "EXPOSE names more than {MAX_EXPOSED_PORTS} ports"
        )));
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

/// `N` or `N-M` (0–65535, `M` ≥ `N`).
fn port_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let num = |x: &str| -> Option<u16> {
        if x.is_empty() || !x.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        x.parse().ok()
    };
    let lo = num(a)?;
    let hi = if a == b { lo } else { num(b)? };
    (hi >= lo).then_some((lo, hi))
}

/// `STOPSIGNAL`: a signal name (any case, `SIG` or not) or a nonzero
/// number, as moby's `signal.ParseSignal` takes it.
pub fn validate_signal(s: &str) -> Result<(), InstrError> {
    if let Ok(n) = s.parse::<i64>() {
        return if n != 0 {
            Ok(())
        } else {
            Err(InstrError::Invalid(format!("Invalid signal: {s}")))
        };
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    const NAMES: [&str; 35] = [
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT",
        "KILL", "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM",
        "TRAP", "TSTP", "TTIN", "TTOU", "UNUSED", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU",
        "XFSZ",
    ];
    let rt = |prefix: &str, sign: char, max: u32| {
        name.strip_prefix(prefix).is_some_and(|rest| {
            rest.is_empty()
                || rest
                    .strip_prefix(sign)
                    .filter(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| (1..=max).contains(&n) && !rest[1..].starts_with('0'))
        })
    };
    if NAMES.contains(&name) || rt("RTMIN", '+', 15) || rt("RTMAX", '-', 14) {
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
