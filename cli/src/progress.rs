//! Renderers of the solver's progress events: `plain` (BuildKit-style
//! numbered lines for CI logs), `tty` (a live view: one line per running
//! step with its timer and the tail of its output), `json` (one event
//! object per line) and `quiet`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_solver::progress::{Event, Receiver};

/// `--progress` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `tty` on a terminal, else `plain`.
    Auto,
    /// Live view.
    Tty,
    /// Numbered lines.
    Plain,
    /// One JSON object per event.
    Json,
    /// Nothing (`-q`).
    Quiet,
}

impl Mode {
    /// Resolves `auto` against stderr.
    pub fn resolve(self) -> Mode {
        match self {
            Mode::Auto if std::io::stderr().is_terminal() => Mode::Tty,
            Mode::Auto => Mode::Plain,
            m => m,
        }
    }
}

/// Consumes events until the channel closes.
pub async fn render(mode: Mode, mut rx: Receiver) {
    match mode.resolve() {
        Mode::Quiet => while rx.recv().await.is_some() {},
        Mode::Json => {
            while let Some(e) = rx.recv().await {
                if let Ok(s) = serde_json::to_string(&e) {
                    let mut out = std::io::stderr().lock();
                    let _ = writeln!(out, "{s}");
                }
            }
        }
        Mode::Plain | Mode::Auto => plain(rx).await,
        Mode::Tty => tty(rx).await,
    }
}

async fn plain(mut rx: Receiver) {
    let mut names = BTreeMap::new();
    let transfers = crate::registry_cmds::TransferLog::new();
    while let Some(e) = rx.recv().await {
        let mut err = std::io::stderr().lock();
        let _ = match e {
            Event::Started { id, name } => {
                let r = writeln!(err, "\n#{id} {name}");
                names.insert(id, name);
                r
            }
            Event::Cached { id } => writeln!(err, "#{id} CACHED"),
            Event::Log {
                id, line, elapsed, ..
            } => writeln!(err, "#{id} {elapsed:.3} {line}"),
            Event::Done { id, seconds } => writeln!(err, "#{id} DONE {seconds:.1}s"),
            Event::Failed { id, error } => writeln!(err, "#{id} ERROR: {error}"),
            Event::Info { message } | Event::Note { message } | Event::Warning { message } => {
                writeln!(err, "{message}")
            }
            Event::Transfer {
                verb,
                digest,
                state,
                bytes,
            } => match transfers.line(verb, &digest, state, bytes) {
                Some(l) => writeln!(err, "{l}"),
                None => Ok(()),
            },
        };
    }
}

struct Running {
    bar: ProgressBar,
    name: String,
    started: Instant,
    tail: Vec<String>,
}

const TAIL: usize = 6;

async fn tty(mut rx: Receiver) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
    let style = ProgressStyle::with_template("{spinner} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut running: BTreeMap<usize, Running> = BTreeMap::new();
    let transfers = crate::registry_cmds::TransferLog::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            e = rx.recv() => {
                let Some(e) = e else { break };
                match e {
                    Event::Started { id, name } => {
                        let bar = multi.add(ProgressBar::new_spinner());
                        bar.set_style(style.clone());
                        bar.set_message(name.clone());
                        running.insert(id, Running { bar, name, started: Instant::now(), tail: Vec::new() });
                    }
                    Event::Cached { id } => {
                        if let Some(r) = running.remove(&id) {
                            r.bar.finish_and_clear();
                            let _ = multi.println(format!(" => CACHED {}", r.name));
                        }
                    }
                    Event::Log { id, line, .. } => {
                        if let Some(r) = running.get_mut(&id) {
                            r.tail.push(line);
                            if r.tail.len() > TAIL {
                                r.tail.remove(0);
                            }
                        }
                    }
                    Event::Done { id, seconds } => {
                        if let Some(r) = running.remove(&id) {
                            r.bar.finish_and_clear();
                            let _ = multi.println(format!(" => {} {seconds:.1}s", r.name));
                        }
                    }
                    Event::Failed { id, error } => {
                        if let Some(r) = running.remove(&id) {
                            r.bar.finish_and_clear();
                            let _ = multi.println(format!(" => ERROR {}: {error}", r.name));
                            for l in &r.tail {
                                let _ = multi.println(format!("    {l}"));
                            }
                        }
                    }
                    Event::Info { message } | Event::Note { message } | Event::Warning { message } => {
                        let _ = multi.println(message);
                    }
                    Event::Transfer { verb, digest, state, bytes } => {
                        if let Some(l) = transfers.line(verb, &digest, state, bytes) {
                            let _ = multi.println(l);
                        }
                    }
                }
            }
            _ = tick.tick() => {}
        }
        for r in running.values() {
            let mut msg = format!("{} {:.1}s", r.name, r.started.elapsed().as_secs_f64());
            for l in &r.tail {
                msg.push_str("\n    ");
                msg.push_str(l);
            }
            r.bar.set_message(msg);
            r.bar.tick();
        }
    }
    let _ = multi.println(format!(
        "[+] Building {:.1}s FINISHED",
        started.elapsed().as_secs_f64()
    ));
    let _ = multi.clear();
}
