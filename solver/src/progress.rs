//! The progress event stream: every state change of a build, and every
//! note, warning and blob transfer of a pull, push, export or cache
//! import, is one [`Event`] on one channel; the CLI renders it (tty, plain
//! or JSON). A [`Progress`] sender is also an
//! [`export::Reporter`](crate::export::Reporter), so an embedder that
//! gives the same sender to [`crate::session::Session::with_reporter`] and
//! to the solve subscribes once to everything.
//!
//! Memory stays flat however much the steps print: a step's log lines go
//! through [`Progress::log`], which waits while [`LOG_QUEUE`] lines are
//! queued and not yet rendered (the step is slowed down, as by a full
//! pipe), and each step's output is clipped at [`StepLogLimit`] bytes per
//! stream with BuildKit's note (see [`LogClip`]).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::Semaphore;

/// The most log lines queued for the renderer at once.
pub const LOG_QUEUE: usize = 1024;

/// BuildKit's default for `BUILDKIT_STEP_LOG_MAX_SIZE` in Docker (2 MiB).
pub const DEFAULT_STEP_LOG_MAX: u64 = 2 << 20;

/// One progress event. Serialised as one JSON object per line by
/// `--progress=json` (`{"event": "...", ...}`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A vertex (step) started: `[stage 2/5] RUN make`.
    Started {
        /// Vertex number, unique within the build.
        id: usize,
        /// Display name, BuildKit style.
        name: String,
    },
    /// The step's result came from the cache; nothing ran.
    Cached {
        /// Vertex number.
        id: usize,
    },
    /// One line of a running step's output.
    Log {
        /// Vertex number.
        id: usize,
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The line, without its newline (lossy UTF-8).
        line: String,
        /// Seconds since the step started.
        elapsed: f64,
    },
    /// The step finished successfully.
    Done {
        /// Vertex number.
        id: usize,
        /// Seconds it took.
        seconds: f64,
    },
    /// The step failed.
    Failed {
        /// Vertex number.
        id: usize,
        /// The error.
        error: String,
    },
    /// A note that belongs to no step (e.g. "naming to ...").
    Info {
        /// The message.
        message: String,
    },
    /// A progress line of a pull, push, export or cache import
    /// ("exporting cache to …"), not shown with `-q`.
    Note {
        /// The message.
        message: String,
    },
    /// A warning, shown even with `-q`.
    Warning {
        /// The message.
        message: String,
    },
    /// One blob of a pull or push.
    Transfer {
        /// `pull` or `push`.
        verb: &'static str,
        /// The blob's digest (`sha256:…`).
        digest: String,
        /// What happened.
        state: TransferState,
        /// Its size (started, done), bytes moved so far (progress), else 0.
        bytes: u64,
    },
    /// How many steps the build has in all, once it knows (after the
    /// base images are resolved): the tty view's `(done/total)`. Steps
    /// that start beyond it raise the total.
    Planned {
        /// Steps started so far plus those still to come.
        steps: usize,
    },
    /// The build's outcome, its last event: the image (or index) it made.
    Result {
        /// The image ID (`sha256:…` of the config; an index's digest for
        /// a multi-platform build), as `--iidfile` writes it.
        image_id: String,
        /// The digest of its manifest (or index).
        digest: String,
    },
}

/// What happened to one blob of a pull or push ([`Event::Transfer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    /// Starting.
    Started,
    /// Bytes moved so far (these events are dropped, not queued, while
    /// the renderer lags: the next one says more).
    Progress,
    /// Already at the destination.
    Skipped,
    /// Mounted from another repository.
    Mounted,
    /// Done.
    Done,
}

impl Event {
    /// The event for a registry transfer of `verb` (`pull`, `push`).
    pub fn transfer(verb: &'static str, t: kiln_registry::Transfer) -> Event {
        use kiln_registry::Transfer as T;
        let (d, state, bytes) = match t {
            T::Started(d, n) => (d, TransferState::Started, n),
            T::Bytes(d, n) => (d, TransferState::Progress, n),
            T::Skipped(d) => (d, TransferState::Skipped, 0),
            T::Mounted(d) => (d, TransferState::Mounted, 0),
            T::Done(d, n) => (d, TransferState::Done, n),
        };
        Event::Transfer {
            verb,
            digest: d.to_string(),
            state,
            bytes,
        }
    }
}

/// Sends events; a disconnected receiver is ignored.
#[derive(Debug, Clone)]
pub struct Progress {
    tx: Option<UnboundedSender<(Event, bool)>>,
    /// Room for log lines in the queue (one permit a line).
    room: Option<Arc<Semaphore>>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// The renderer's end of a [`channel`].
#[derive(Debug)]
pub struct Receiver {
    rx: UnboundedReceiver<(Event, bool)>,
    room: Arc<Semaphore>,
}

impl Receiver {
    /// The next event; `None` once every [`Progress`] is gone.
    pub async fn recv(&mut self) -> Option<Event> {
        let (e, counted) = self.rx.recv().await?;
        if counted {
            self.room.add_permits(1);
        }
        Some(e)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Nobody renders any more: senders must not wait for room.
        self.room.close();
    }
}

/// A progress sender and the receiver a renderer reads.
pub fn channel() -> (Progress, Receiver) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(LOG_QUEUE));
    (
        Progress {
            tx: Some(tx),
            room: Some(room.clone()),
            next: Default::default(),
        },
        Receiver { rx, room },
    )
}

impl Progress {
    /// A sender that drops everything.
    pub fn discard() -> Self {
        Progress {
            tx: None,
            room: None,
            next: Default::default(),
        }
    }

    /// Sends one event (and logs it with `tracing`: `--debug`). A
    /// transfer's byte count is dropped instead when [`LOG_QUEUE`] events
    /// wait for the renderer (the next count supersedes it), so a sender
    /// that cannot wait (a download thread) never grows the queue.
    pub fn send(&self, e: Event) {
        trace_event(&e);
        let Some(tx) = &self.tx else { return };
        if matches!(
            e,
            Event::Transfer {
                state: TransferState::Progress,
                ..
            }
        ) {
            let Some(room) = &self.room else { return };
            if let Ok(p) = room.try_acquire() {
                p.forget();
                if tx.send((e, true)).is_err() {
                    room.add_permits(1);
                }
            }
            return;
        }
        let _ = tx.send((e, false));
    }

    /// Sends one line of a step's output, first waiting while
    /// [`LOG_QUEUE`] lines wait for the renderer.
    pub async fn log(&self, e: Event) {
        let (Some(tx), Some(room)) = (&self.tx, &self.room) else {
            return;
        };
        // An error: the receiver is gone, nothing to send to.
        if let Ok(p) = room.acquire().await {
            p.forget();
            if tx.send((e, true)).is_err() {
                room.add_permits(1);
            }
        }
    }

    /// Starts a new vertex and returns its number.
    pub fn start(&self, name: String) -> usize {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.send(Event::Started { id, name });
        id
    }

    /// The number of vertices started so far.
    pub fn started(&self) -> usize {
        self.next.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Marks vertex `id` done after `d`.
    pub fn done(&self, id: usize, d: Duration) {
        self.send(Event::Done {
            id,
            seconds: d.as_secs_f64(),
        });
    }
}

/// Logs a progress event (not a step's output lines) with `tracing`.
fn trace_event(e: &Event) {
    match e {
        Event::Started { id, name } => tracing::debug!(step = id, %name, "step started"),
        Event::Cached { id } => tracing::debug!(step = id, "cache hit"),
        Event::Done { id, seconds } => tracing::debug!(step = id, seconds, "step done"),
        Event::Failed { id, error } => tracing::debug!(step = id, %error, "step failed"),
        Event::Info { message } => tracing::debug!(%message, "build note"),
        Event::Note { message } => tracing::info!("{message}"),
        Event::Warning { message } => tracing::warn!("{message}"),
        Event::Transfer {
            verb,
            digest,
            state,
            bytes,
        } => tracing::debug!(verb, %digest, ?state, bytes, "transfer"),
        Event::Planned { steps } => tracing::debug!(steps, "steps planned"),
        Event::Result { image_id, digest } => {
            tracing::debug!(%image_id, %digest, "build result")
        }
        Event::Log { .. } => {}
    }
}

/// The per-stream limit on a step's log: `KILN_STEP_LOG_MAX_SIZE` (bytes;
/// `-1` for no limit; BuildKit's `BUILDKIT_STEP_LOG_MAX_SIZE` is read too),
/// default [`DEFAULT_STEP_LOG_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLogLimit(pub Option<u64>);

impl Default for StepLogLimit {
    fn default() -> Self {
        StepLogLimit(Some(DEFAULT_STEP_LOG_MAX))
    }
}

impl StepLogLimit {
    /// The limit from the environment (a value that does not parse keeps
    /// the default).
    pub fn from_env() -> StepLogLimit {
        for name in ["KILN_STEP_LOG_MAX_SIZE", "BUILDKIT_STEP_LOG_MAX_SIZE"] {
            if let Ok(v) = std::env::var(name) {
                match v.trim().parse::<i64>() {
                    Ok(n) if n < 0 => return StepLogLimit(None),
                    Ok(n) => return StepLogLimit(Some(n as u64)),
                    Err(_) => {}
                }
            }
        }
        StepLogLimit::default()
    }

    /// The limit as BuildKit words it (`2MiB`).
    pub fn human(&self) -> String {
        match self.0 {
            None => "unlimited".into(),
            Some(n) if n > 0 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
            Some(n) if n > 0 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
            Some(n) => format!("{n}B"),
        }
    }
}

/// Clips one stream of a step's log as BuildKit does: once the bytes seen
/// (lines and their newlines) pass the limit, the rest of the line is cut,
/// one note `[output clipped, log limit 2MiB reached]` follows, and later
/// lines are dropped (the step keeps running).
#[derive(Debug)]
pub struct LogClip {
    limit: StepLogLimit,
    seen: u64,
    clipped: bool,
}

impl LogClip {
    /// A clip with `limit`.
    pub fn new(limit: StepLogLimit) -> Self {
        LogClip {
            limit,
            seen: 0,
            clipped: false,
        }
    }

    /// What to show of a line of `len` bytes (plus a newline when
    /// `newline`): `(bytes of the line to keep, note to add)`; `None` once
    /// clipped.
    pub fn admit(&mut self, len: usize, newline: bool) -> Option<(usize, Option<String>)> {
        if self.clipped {
            return None;
        }
        let Some(max) = self.limit.0 else {
            return Some((len, None));
        };
        let cost = len as u64 + u64::from(newline);
        if self.seen + cost <= max {
            self.seen += cost;
            return Some((len, None));
        }
        let keep = max.saturating_sub(self.seen).min(len as u64) as usize;
        self.seen = max;
        self.clipped = true;
        Some((
            keep,
            Some(format!(
                "[output clipped, log limit {} reached]",
                self.limit.human()
            )),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> kiln_image::Digest {
        kiln_image::Digest::sha256_of(b"blob")
    }

    #[tokio::test]
    async fn one_subscription_gets_build_notes_and_transfers() {
        use crate::export::Reporter;
        let (tx, mut rx) = channel();
        let id = tx.start("[1/1] FROM scratch".into());
        tx.note("exporting to oci");
        tx.transfer("push", kiln_registry::Transfer::Started(digest(), 4));
        tx.transfer("push", kiln_registry::Transfer::Done(digest(), 4));
        tx.done(id, Duration::from_millis(1));
        drop(tx);
        let mut got = Vec::new();
        while let Some(e) = rx.recv().await {
            got.push(
                serde_json::to_value(&e).unwrap()["event"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(got, ["started", "note", "transfer", "transfer", "done"]);
    }

    /// A download reports every read: a renderer that does not keep up
    /// must not make the queue grow without bound.
    #[tokio::test]
    async fn byte_counts_are_dropped_while_the_renderer_lags() {
        use crate::export::Reporter;
        let (tx, mut rx) = channel();
        for n in 0..(LOG_QUEUE as u64 * 4) {
            tx.transfer("pull", kiln_registry::Transfer::Bytes(digest(), n));
        }
        tx.transfer("pull", kiln_registry::Transfer::Done(digest(), 9));
        drop(tx);
        let mut counts = 0;
        let mut last = None;
        while let Some(e) = rx.recv().await {
            if let Event::Transfer { state, .. } = e {
                counts += usize::from(state == TransferState::Progress);
                last = Some(state);
            }
        }
        assert_eq!(counts, LOG_QUEUE, "queued byte counts are bounded");
        assert_eq!(last, Some(TransferState::Done), "the end is never dropped");
    }

    #[test]
    fn clips_like_buildkit() {
        let mut c = LogClip::new(StepLogLimit(Some(10)));
        assert_eq!(c.admit(4, true), Some((4, None)));
        assert_eq!(c.admit(4, true), Some((4, None)));
        let (keep, note) = c.admit(4, true).unwrap();
        assert_eq!(keep, 0);
        assert_eq!(note.unwrap(), "[output clipped, log limit 10B reached]");
        assert_eq!(c.admit(1, true), None);
        assert_eq!(StepLogLimit::default().human(), "2MiB");
        let mut u = LogClip::new(StepLogLimit(None));
        assert_eq!(u.admit(1 << 30, true), Some((1 << 30, None)));
    }

    #[tokio::test]
    async fn log_waits_for_the_renderer_and_not_for_a_dropped_one() {
        let (p, mut rx) = channel();
        let line = |n: usize| Event::Log {
            id: 1,
            stream: "stdout",
            line: n.to_string(),
            elapsed: 0.0,
        };
        for n in 0..LOG_QUEUE {
            p.log(line(n)).await;
        }
        // The queue is full: the next line waits until one is read.
        let more = tokio::time::timeout(Duration::from_millis(50), p.log(line(0))).await;
        assert!(more.is_err(), "a full queue must make the sender wait");
        assert!(rx.recv().await.is_some());
        tokio::time::timeout(Duration::from_secs(5), p.log(line(1)))
            .await
            .unwrap();
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), p.log(line(2)))
            .await
            .unwrap();
    }
}
