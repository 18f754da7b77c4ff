//! Renderers of the solver's progress events: `plain` (BuildKit-style
//! numbered lines for CI logs), `tty` (BuildKit's live view, see
//! [`View`]), `json` (one event object per line, the last one the build's
//! `result`) and `quiet`.
//!
//! The tty view writes its ANSI frames itself, so `--progress=tty` draws
//! into a pipe too. Each frame is a pure function of the view's state, the
//! time and the terminal's size ([`View::frame`]); the loop only moves the
//! cursor back over the previous frame and prints the next one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use kiln_solver::progress::{Event, Receiver, TransferState};
use unicode_width::UnicodeWidthChar;

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
    // Step names, RUN output and errors are untrusted: on a terminal
    // their control sequences are shown, not obeyed (see `crate::term`).
    let tty = crate::term::stderr_tty();
    let sh = |s: &str| crate::term::shown(s, tty).into_owned();
    while let Some(e) = rx.recv().await {
        let mut err = std::io::stderr().lock();
        let _ = match e {
            Event::Started { id, name } => {
                let r = writeln!(err, "\n#{id} {}", sh(&name));
                names.insert(id, name);
                r
            }
            Event::Cached { id } => writeln!(err, "#{id} CACHED"),
            Event::Log {
                id, line, elapsed, ..
            } => writeln!(err, "#{id} {elapsed:.3} {}", sh(&line)),
            Event::Done { id, seconds } => writeln!(err, "#{id} DONE {seconds:.1}s"),
            Event::Failed { id, error } => writeln!(err, "#{id} ERROR: {}", sh(&error)),
            Event::Info { message } | Event::Note { message } | Event::Warning { message } => {
                writeln!(err, "{}", sh(&message))
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
            Event::Planned { .. } | Event::Result { .. } => Ok(()),
        };
    }
}

/// Lines of a running step's output the tty view shows (BuildKit: 6).
const TAIL: usize = 6;

/// What became of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Done,
    Cached,
    Failed,
    Canceled,
}

/// One step of the tty view.
#[derive(Debug, Clone)]
struct Step {
    name: String,
    /// When it started and ended, since the build started.
    start: Duration,
    end: Option<Duration>,
    state: State,
    /// The last lines of its output (running steps show them).
    tail: VecDeque<String>,
    /// Sub-steps (an export's `writing image …`, `naming to …`) with their
    /// seconds.
    subs: Vec<(String, f64)>,
    /// The blobs pulled or pushed while it ran.
    transfers: Vec<Transfer>,
}

/// One blob of a pull or push, a sub-step of the step it happened in
/// (BuildKit's ` => => sha256:… 1.20MB / 3.40MB`).
#[derive(Debug, Clone)]
struct Transfer {
    /// `sha256:` and the first 12 hex digits.
    short: String,
    moved: u64,
    size: u64,
    start: Duration,
    end: Option<Duration>,
    /// "already exists", "mounted from another repository".
    note: Option<&'static str>,
}

/// A byte count as BuildKit's (go-units, decimal): `512B`, `3.15MB`.
fn bytes(n: u64) -> String {
    match kiln_solver::units::decimal_units(n) {
        (_, "B") => format!("{n}B"),
        (v, unit) => format!("{v:.2}{unit}"),
    }
}

/// The tty view's state: every step seen, in the order they started.
#[derive(Debug, Default)]
pub struct View {
    steps: Vec<Step>,
    by_id: HashMap<usize, usize>,
    /// The steps the build announced (0: unknown).
    planned: usize,
    /// Each blob in flight: its step and place among the step's transfers.
    transfers: HashMap<String, (usize, usize)>,
}

/// How a frame is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Look {
    /// Columns of the terminal.
    pub width: usize,
    /// Rows of the terminal (`None`: unbounded, a pipe).
    pub height: Option<usize>,
    /// ANSI colours (off under `NO_COLOR`).
    pub color: bool,
}

const BLUE: &str = "\x1b[34m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const FAINT: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// The text of untrusted output made safe to print on a terminal: what a
/// carriage return overwrote is dropped, tabs become spaces, other control
/// characters (escape sequences' introducers) are removed.
fn clean(s: &str) -> String {
    let s = s.rsplit('\r').find(|p| !p.is_empty()).unwrap_or("");
    s.chars()
        .filter_map(|c| match c {
            '\t' => Some(' '),
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect()
}

/// `s` cut to at most `cols` terminal columns.
fn cut(s: &str, cols: usize) -> (String, usize) {
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = c.width().unwrap_or(0);
        if used + w > cols {
            break;
        }
        used += w;
        out.push(c);
    }
    (out, used)
}

/// `left`, cut to leave room (a space at least before `timer`), padded,
/// and `timer` ending in column `width - 1` (the last column stays free:
/// no line ever wraps).
fn align(left: &str, timer: &str, width: usize) -> String {
    let room = width.saturating_sub(2 + timer.len());
    let (l, used) = cut(left, room);
    format!("{l}{} {timer}", " ".repeat(room - used))
}

fn paint(s: String, color: Option<&str>, look: Look) -> String {
    match color {
        Some(c) if look.color => format!("{c}{s}{RESET}"),
        _ => s,
    }
}

/// A line of the view and whether it belongs to a finished step.
struct Line {
    text: String,
    finished: bool,
    tail: bool,
}

impl View {
    /// Takes one event in; returns a line to print above the view (a
    /// note, a warning, a transfer), if any.
    pub fn apply(&mut self, e: Event, now: Duration) -> Option<String> {
        let step = |id: usize| self.by_id.get(&id).copied();
        match e {
            Event::Started { id, name } => {
                self.by_id.insert(id, self.steps.len());
                self.steps.push(Step {
                    name: clean(&name),
                    start: now,
                    end: None,
                    state: State::Running,
                    tail: VecDeque::new(),
                    subs: Vec::new(),
                    transfers: Vec::new(),
                });
            }
            Event::Cached { id } => {
                if let Some(i) = step(id) {
                    let s = &mut self.steps[i];
                    s.state = State::Cached;
                    s.end = Some(s.start);
                }
            }
            Event::Done { id, .. } => {
                if let Some(i) = step(id) {
                    self.steps[i].state = State::Done;
                    self.steps[i].end = Some(now);
                }
            }
            Event::Failed { id, error } => {
                if let Some(i) = step(id) {
                    let s = &mut self.steps[i];
                    s.state = if error.ends_with("cancelled") {
                        State::Canceled
                    } else {
                        State::Failed
                    };
                    s.end = Some(now);
                }
            }
            Event::Log {
                id, line, elapsed, ..
            } => {
                if let Some(i) = step(id) {
                    let s = &mut self.steps[i];
                    let line = clean(&line);
                    if s.name.starts_with("exporting") || s.name.starts_with("pushing ") {
                        // An exporter's lines are its sub-steps, as
                        // BuildKit's `=> => writing image sha256:…`.
                        let before: f64 = s.subs.iter().map(|(_, t)| t).sum();
                        let name = line.strip_suffix(" done").unwrap_or(&line).to_string();
                        s.subs.push((name, (elapsed - before).max(0.0)));
                    } else {
                        s.tail.push_back(line);
                        if s.tail.len() > TAIL {
                            s.tail.pop_front();
                        }
                    }
                }
            }
            Event::Planned { steps } => self.planned = self.planned.max(steps),
            Event::Info { message } | Event::Note { message } | Event::Warning { message } => {
                return Some(message.lines().map(clean).collect::<Vec<_>>().join("\n"))
            }
            Event::Transfer { .. } | Event::Result { .. } => {}
        }
        None
    }

    /// Takes one blob transfer in, as a sub-step of the last running
    /// step (a pull's `FROM`); false when no step runs (then it is a line
    /// above the view).
    pub fn transfer(
        &mut self,
        verb: &str,
        digest: &str,
        state: TransferState,
        n: u64,
        now: Duration,
    ) -> bool {
        let key = format!("{verb} {digest}");
        let at = match self.transfers.get(&key) {
            Some(&at) => at,
            None => {
                let Some(i) = self.steps.iter().rposition(|s| s.state == State::Running) else {
                    return false;
                };
                let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
                let short = clean(&format!("sha256:{}", hex.get(..12).unwrap_or(hex)));
                let list = &mut self.steps[i].transfers;
                list.push(Transfer {
                    short,
                    moved: 0,
                    size: 0,
                    start: now,
                    end: None,
                    note: None,
                });
                let at = (i, list.len() - 1);
                self.transfers.insert(key, at);
                at
            }
        };
        let t = &mut self.steps[at.0].transfers[at.1];
        match state {
            TransferState::Started => t.size = n,
            TransferState::Progress => t.moved = n.max(t.moved),
            TransferState::Done => {
                t.moved = n;
                t.size = n;
                t.end = Some(now);
            }
            TransferState::Skipped => {
                t.note = Some("already exists");
                t.end = Some(now);
            }
            TransferState::Mounted => {
                t.note = Some("mounted from another repository");
                t.end = Some(now);
            }
        }
        true
    }

    /// Steps finished (done, cached, failed or cancelled) and in all.
    fn counts(&self) -> (usize, usize) {
        let done = self
            .steps
            .iter()
            .filter(|s| s.state != State::Running)
            .count();
        (done, self.planned.max(self.steps.len()))
    }

    /// The frame at `now`: the header and a line per step, cut to the
    /// width; running steps show the tail of their output. While the build
    /// runs (`last` false) a frame fits the terminal's height (the first
    /// finished steps give way); the last frame shows every step, and
    /// steps still running then were cancelled.
    pub fn frame(&self, now: Duration, look: Look, last: bool) -> Vec<String> {
        let (done, mut total) = self.counts();
        let ok = self
            .steps
            .iter()
            .all(|s| matches!(s.state, State::Done | State::Cached));
        if last && ok {
            // Every step that had to run did: the plan's count was an
            // estimate.
            total = done;
        }
        let finished = if last && ok && total > 0 {
            " FINISHED"
        } else {
            ""
        };
        let header = format!(
            "[+] Building {:.1}s ({done}/{total}){finished}",
            now.as_secs_f64()
        );
        let mut lines = Vec::new();
        for s in &self.steps {
            let mut state = s.state;
            if last && state == State::Running {
                state = State::Canceled;
            }
            let end = s.end.unwrap_or(now);
            let mut secs = end.saturating_sub(s.start).as_secs_f64();
            if secs < 0.05 {
                secs = 0.0;
            }
            let label = match state {
                State::Cached => "CACHED ",
                State::Failed => "ERROR ",
                State::Canceled => "CANCELED ",
                State::Running | State::Done => "",
            };
            let color = match state {
                State::Running => None,
                State::Done | State::Cached => Some(BLUE),
                State::Failed => Some(RED),
                State::Canceled => Some(YELLOW),
            };
            let timer = format!(" {secs:.1}s");
            let finished = state != State::Running;
            lines.push(Line {
                text: paint(
                    align(&format!(" => {label}{}", s.name), &timer, look.width),
                    color,
                    look,
                ),
                finished,
                tail: false,
            });
            for (sub, t) in &s.subs {
                let t = if *t < 0.05 { 0.0 } else { *t };
                lines.push(Line {
                    text: paint(
                        align(&format!(" => => {sub}"), &format!(" {t:.1}s"), look.width),
                        color,
                        look,
                    ),
                    finished,
                    tail: false,
                });
            }
            for t in &s.transfers {
                let what = match t.note {
                    Some(n) => format!(" => => {} {n}", t.short),
                    None if t.size > 0 => {
                        format!(" => => {} {} / {}", t.short, bytes(t.moved), bytes(t.size))
                    }
                    None => format!(" => => {} {}", t.short, bytes(t.moved)),
                };
                let secs = t.end.unwrap_or(now).saturating_sub(t.start).as_secs_f64();
                let secs = if secs < 0.05 { 0.0 } else { secs };
                lines.push(Line {
                    text: paint(
                        align(&what, &format!(" {secs:.1}s"), look.width),
                        t.end.and(color),
                        look,
                    ),
                    finished: t.end.is_some() || finished,
                    tail: false,
                });
            }
            if state == State::Running {
                for l in &s.tail {
                    let (t, _) = cut(&format!(" => => # {l}"), look.width.saturating_sub(1));
                    lines.push(Line {
                        text: paint(t, Some(FAINT), look),
                        finished: false,
                        tail: true,
                    });
                }
            }
        }
        if !last {
            if let Some(h) = look.height {
                fit(&mut lines, h.saturating_sub(2));
            }
        }
        let (header, _) = cut(&header, look.width.saturating_sub(1));
        std::iter::once(header)
            .chain(lines.into_iter().map(|l| l.text))
            .collect()
    }
}

/// Cuts `lines` to `rows`: first the output tails go, then the first
/// finished steps, then (more running steps than rows) the first ones.
fn fit(lines: &mut Vec<Line>, rows: usize) {
    if lines.len() <= rows {
        return;
    }
    lines.retain(|l| !l.tail);
    let mut extra = lines.len().saturating_sub(rows);
    lines.retain(|l| {
        if extra > 0 && l.finished {
            extra -= 1;
            false
        } else {
            true
        }
    });
    if lines.len() > rows {
        let cut = lines.len() - rows;
        lines.drain(..cut);
    }
}

/// Whether colours are on: `NO_COLOR` set to anything but "" turns them
/// off (no-color.org, as BuildKit).
fn color_enabled(no_color: Option<std::ffi::OsString>) -> bool {
    no_color.is_none_or(|v| v.is_empty())
}

/// The size of the terminal on stderr; not a terminal: `COLUMNS` (else
/// 80) columns and no height limit.
fn term_size() -> (usize, Option<usize>) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ only writes a `winsize` into the pointer given,
    // which points at a live one.
    let r = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
        return (usize::from(ws.ws_col), Some(usize::from(ws.ws_row)));
    }
    let cols = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|c| *c > 0)
        .unwrap_or(80);
    (cols, None)
}

/// Draws frames on stderr over the previous one.
struct Screen {
    /// Lines of the frame on screen.
    drawn: usize,
}

impl Screen {
    /// Moves back over the frame on screen, to its first column.
    fn rewind(&self, out: &mut String) {
        if self.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", self.drawn));
        }
        out.push('\r');
    }

    fn draw(&mut self, frame: &[String]) {
        let mut out = String::from("\x1b[?25l");
        self.rewind(&mut out);
        for l in frame {
            out.push_str(l);
            out.push_str("\x1b[K\n");
        }
        // Whatever the last frame had below this one.
        out.push_str("\x1b[J\x1b[?25h");
        self.drawn = frame.len();
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(out.as_bytes());
        let _ = err.flush();
    }

    /// Prints `text` where the frame was; the next frame goes below it.
    fn above(&mut self, text: &str) {
        let mut out = String::new();
        self.rewind(&mut out);
        out.push_str("\x1b[J");
        out.push_str(text);
        out.push('\n');
        self.drawn = 0;
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(out.as_bytes());
        let _ = err.flush();
    }
}

async fn tty(mut rx: Receiver) {
    let color = color_enabled(std::env::var_os("NO_COLOR"));
    let started = Instant::now();
    let mut view = View::default();
    let mut screen = Screen { drawn: 0 };
    let transfers = crate::registry_cmds::TransferLog::new();
    let look = || {
        let (width, height) = term_size();
        Look {
            width,
            height,
            color,
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            e = rx.recv() => {
                let Some(e) = e else { break };
                let text = match e {
                    Event::Transfer { verb, digest, state, bytes } => {
                        if view.transfer(verb, &digest, state, bytes, started.elapsed()) {
                            None
                        } else {
                            transfers.line(verb, &digest, state, bytes)
                        }
                    }
                    e => view.apply(e, started.elapsed()),
                };
                if let Some(text) = text {
                    screen.above(&text);
                    screen.draw(&view.frame(started.elapsed(), look(), false));
                }
            }
            _ = tick.tick() => screen.draw(&view.frame(started.elapsed(), look(), false)),
        }
    }
    screen.draw(&view.frame(started.elapsed(), look(), true));
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_millis;

    fn look(width: usize) -> Look {
        Look {
            width,
            height: None,
            color: false,
        }
    }

    fn started(v: &mut View, id: usize, name: &str, at: u64) {
        v.apply(
            Event::Started {
                id,
                name: name.into(),
            },
            S(at),
        );
    }

    fn log(v: &mut View, id: usize, line: &str, at: u64) {
        v.apply(
            Event::Log {
                id,
                stream: "stdout",
                line: line.into(),
                elapsed: 0.0,
            },
            S(at),
        );
    }

    fn build() -> View {
        let mut v = View::default();
        v.apply(Event::Planned { steps: 5 }, S(0));
        started(&mut v, 1, "[1/3] FROM docker.io/library/busybox", 0);
        v.apply(
            Event::Done {
                id: 1,
                seconds: 0.3,
            },
            S(300),
        );
        started(&mut v, 2, "[2/3] COPY a /a", 300);
        v.apply(Event::Cached { id: 2 }, S(310));
        started(&mut v, 3, "[3/3] RUN make", 400);
        log(&mut v, 3, "compiling", 500);
        v
    }

    #[test]
    fn header_counts_and_right_aligned_timers() {
        let v = build();
        let f = v.frame(S(3600), look(60), false);
        assert_eq!(f[0], "[+] Building 3.6s (2/5)");
        assert_eq!(
            f[1],
            " => [1/3] FROM docker.io/library/busybox               0.3s"
        );
        assert_eq!(
            f[2],
            " => CACHED [2/3] COPY a /a                             0.0s"
        );
        assert_eq!(
            f[3],
            " => [3/3] RUN make                                     3.2s"
        );
        assert_eq!(f[4], " => => # compiling");
        for l in &f[1..4] {
            assert_eq!(l.chars().count(), 59, "ends in the last column but one");
        }
    }

    #[test]
    fn lines_are_cut_to_the_width_and_keep_the_timer() {
        let mut v = build();
        log(&mut v, 3, &"x".repeat(200), 600);
        let f = v.frame(S(3600), look(30), false);
        for l in &f {
            assert!(l.chars().count() < 30, "{l:?}");
        }
        assert_eq!(f[1], " => [1/3] FROM docker.i  0.3s");
        assert_eq!(f[5], format!(" => => # {}", "x".repeat(20)));
        // Wide characters count two columns.
        assert_eq!(cut("日本語", 5).0, "日本");
    }

    #[test]
    fn the_last_frame_is_finished_and_shows_the_export_and_no_output() {
        let mut v = build();
        v.apply(
            Event::Done {
                id: 3,
                seconds: 3.0,
            },
            S(3400),
        );
        started(&mut v, 4, "exporting to image", 3400);
        log(&mut v, 4, "writing image sha256:abc done", 3400);
        log(&mut v, 4, "naming to app:1.0 done", 3400);
        v.apply(
            Event::Done {
                id: 4,
                seconds: 0.0,
            },
            S(3410),
        );
        started(&mut v, 5, "other", 3410);
        v.apply(
            Event::Done {
                id: 5,
                seconds: 0.0,
            },
            S(3410),
        );
        let f = v.frame(S(3500), look(50), true);
        assert_eq!(f[0], "[+] Building 3.5s (5/5) FINISHED");
        assert!(f.iter().all(|l| !l.contains("compiling")), "{f:#?}");
        assert_eq!(f[5], " => => writing image sha256:abc              0.0s");
        assert_eq!(f[6], " => => naming to app:1.0                     0.0s");
    }

    #[test]
    fn a_push_step_s_lines_are_its_sub_steps() {
        let mut v = View::default();
        started(&mut v, 1, "pushing reg:5000/app:1", 0);
        log(&mut v, 1, "abc: compressing (gzip) while uploading", 100);
        let f = v.frame(S(200), look(60), false);
        assert_eq!(
            f[1],
            " => pushing reg:5000/app:1                             0.2s"
        );
        assert_eq!(
            f[2],
            " => => abc: compressing (gzip) while uploading         0.0s"
        );
    }

    #[test]
    fn colours_unless_no_color() {
        let v = build();
        let mut l = look(60);
        l.color = true;
        let f = v.frame(S(3600), l, false);
        assert!(
            f[1].starts_with(BLUE) && f[1].ends_with(RESET),
            "done: blue"
        );
        assert!(!f[3].contains('\x1b'), "running: plain");
        assert!(f[4].starts_with(FAINT), "output: faint");
        assert!(color_enabled(None));
        assert!(color_enabled(Some("".into())));
        assert!(!color_enabled(Some("1".into())));
        let plain = v.frame(S(3600), look(60), false);
        assert!(plain.iter().all(|l| !l.contains('\x1b')));
    }

    #[test]
    fn an_interrupted_build_ends_with_its_steps_cancelled_and_no_finished() {
        let mut v = build();
        v.apply(
            Event::Failed {
                id: 3,
                error: "build cancelled".into(),
            },
            S(1000),
        );
        started(&mut v, 4, "[stage-1 2/2] RUN sleep 9", 500);
        let mut l = look(60);
        l.color = true;
        let f = v.frame(S(1200), l, true);
        assert_eq!(f[0], "[+] Building 1.2s (3/5)");
        assert!(f[3].starts_with(YELLOW) && f[3].contains("CANCELED [3/3] RUN make"));
        assert!(f[4].contains("CANCELED [stage-1 2/2] RUN sleep 9"));
        assert_eq!(f.len(), 5, "no output tails left: {f:#?}");
        let mut v = build();
        v.apply(
            Event::Failed {
                id: 3,
                error: "exit 1".into(),
            },
            S(1000),
        );
        let f = v.frame(S(1200), l, true);
        assert!(f[3].starts_with(RED) && f[3].contains("ERROR [3/3] RUN make"));
    }

    #[test]
    fn output_cannot_drive_the_terminal() {
        let mut v = build();
        log(&mut v, 3, "\x1b[2J\x1b]0;pwned\x07evil\ttab", 600);
        log(&mut v, 3, "10%\r50%\r100%", 700);
        let f = v.frame(S(3600), look(60), false);
        assert!(f.iter().all(|l| !l.contains('\x1b')), "{f:#?}");
        assert!(
            f.contains(&" => => # [2J]0;pwnedevil tab".to_string()),
            "{f:#?}"
        );
        assert_eq!(f.last().unwrap(), " => => # 100%");
    }

    #[test]
    fn a_frame_fits_the_terminal_height_running_steps_first() {
        let mut v = View::default();
        for i in 1..=10 {
            started(&mut v, i, &format!("step {i}"), 0);
            if i < 9 {
                v.apply(
                    Event::Done {
                        id: i,
                        seconds: 0.0,
                    },
                    S(10),
                );
            }
        }
        log(&mut v, 9, "out", 20);
        let mut l = look(40);
        l.height = Some(6);
        let f = v.frame(S(100), l, false);
        assert_eq!(f.len(), 5, "{f:#?}");
        assert!(
            f[1].contains("step 7") && f[4].contains("step 10"),
            "{f:#?}"
        );
        // The last frame shows everything.
        assert_eq!(v.frame(S(100), l, true).len(), 11);
    }

    #[test]
    fn blobs_are_sub_steps_of_the_running_step() {
        let mut v = View::default();
        let d = format!("sha256:{}", "ab".repeat(32));
        let e = format!("sha256:{}", "cd".repeat(32));
        assert!(!v.transfer("pull", &d, TransferState::Started, 10, S(0)));
        started(&mut v, 1, "[1/2] FROM registry/app", 0);
        assert!(v.transfer("pull", &d, TransferState::Started, 3_400_000, S(0)));
        v.transfer("pull", &d, TransferState::Progress, 1_200_000, S(100));
        v.transfer("pull", &e, TransferState::Skipped, 0, S(100));
        let f = v.frame(S(500), look(60), false);
        assert_eq!(
            f[2],
            " => => sha256:abababababab 1.20MB / 3.40MB             0.5s"
        );
        assert_eq!(
            f[3],
            " => => sha256:cdcdcdcdcdcd already exists              0.0s"
        );
        v.transfer("pull", &d, TransferState::Done, 3_400_000, S(700));
        let f = v.frame(S(900), look(60), false);
        assert!(f[2].contains("3.40MB / 3.40MB") && f[2].ends_with(" 0.7s"));
        assert_eq!(bytes(999), "999B");
        assert_eq!(bytes(1_500), "1.50kB");
    }

    #[test]
    fn notes_print_above_the_view() {
        let mut v = View::default();
        let t = v.apply(
            Event::Warning {
                message: "[Warning] x\x1b[31m".into(),
            },
            S(0),
        );
        assert_eq!(t.as_deref(), Some("[Warning] x[31m"));
    }
}
