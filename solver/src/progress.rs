//! The progress event stream: every state change of a build is one event on
//! one channel; the CLI renders it (tty, plain or JSON).

use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

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
}

/// Sends events; a disconnected receiver is ignored.
#[derive(Debug, Clone)]
pub struct Progress {
    tx: Option<UnboundedSender<Event>>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Progress {
    /// A sender to `tx`.
    pub fn new(tx: UnboundedSender<Event>) -> Self {
        Progress {
            tx: Some(tx),
            next: Default::default(),
        }
    }

    /// A sender that drops everything.
    pub fn discard() -> Self {
        Progress {
            tx: None,
            next: Default::default(),
        }
    }

    /// Sends one event.
    pub fn send(&self, e: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(e);
        }
    }

    /// Starts a new vertex and returns its number.
    pub fn start(&self, name: String) -> usize {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.send(Event::Started { id, name });
        id
    }

    /// Marks vertex `id` done after `d`.
    pub fn done(&self, id: usize, d: Duration) {
        self.send(Event::Done {
            id,
            seconds: d.as_secs_f64(),
        });
    }
}
