//! Long-running work reports progress through a [`JobCtx`] and stops at safe points when cancelled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Map, Value};

/// An event streamed to the caller (serialised to JSON for the CLI).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Event {
    /// A phase begins (`total` units of work when known): the CLI opens a progress bar.
    Start { phase: String, total: Option<u64> },
    /// `done` of `total` units finished in the current phase; `metrics` are shown next to the bar
    /// (loss, bpd, lr, ...). `rate` is units per second since the phase started.
    Progress { phase: String, done: u64, total: Option<u64>, rate: f64, metrics: Map<String, Value> },
    /// The phase is finished: the CLI closes its bar.
    End { phase: String },
    /// A line of information for the user.
    Message { text: String },
}

/// The error a job returns when it stopped because it was cancelled (Ctrl-C).
#[derive(Debug)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cancelled")
    }
}
impl std::error::Error for Cancelled {}

type Sink = dyn Fn(Event) + Send + Sync;

/// What a job gets from its caller: a place to send events and a cancellation flag.
#[derive(Clone)]
pub struct JobCtx {
    sink: Arc<Sink>,
    cancel: Arc<AtomicBool>,
    phase: Arc<std::sync::Mutex<(String, Instant)>>,
}

impl JobCtx {
    pub fn new(sink: impl Fn(Event) + Send + Sync + 'static, cancel: Arc<AtomicBool>) -> Self {
        JobCtx { sink: Arc::new(sink), cancel, phase: Arc::new(std::sync::Mutex::new((String::new(), Instant::now()))) }
    }

    /// A context that drops every event and is never cancelled (tests, benchmarks).
    pub fn silent() -> Self {
        Self::new(|_| {}, Arc::new(AtomicBool::new(false)))
    }

    pub fn emit(&self, event: Event) {
        (self.sink)(event)
    }

    pub fn start(&self, phase: &str, total: Option<u64>) {
        *self.phase.lock().unwrap() = (phase.to_string(), Instant::now());
        self.emit(Event::Start { phase: phase.to_string(), total });
    }

    /// Report `done` units of the current phase, with optional metrics.
    pub fn progress(&self, done: u64, total: Option<u64>, metrics: Map<String, Value>) {
        let (phase, started) = self.phase.lock().unwrap().clone();
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        self.emit(Event::Progress { phase, done, total, rate: done as f64 / secs, metrics });
    }

    pub fn end(&self) {
        let phase = self.phase.lock().unwrap().0.clone();
        self.emit(Event::End { phase });
    }

    pub fn message(&self, text: impl Into<String>) {
        self.emit(Event::Message { text: text.into() });
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Call at safe points: returns `Err(Cancelled)` once the user asked to stop.
    pub fn check_cancelled(&self) -> anyhow::Result<()> {
        if self.is_cancelled() {
            Err(Cancelled.into())
        } else {
            Ok(())
        }
    }
}

/// Build a metrics map: `metrics!["loss" => 0.5, "lr" => 1e-4]`.
#[macro_export]
macro_rules! metrics {
    ($($k:expr => $v:expr),* $(,)?) => {{
        let mut m = serde_json::Map::new();
        $( m.insert($k.to_string(), serde_json::json!($v)); )*
        m
    }};
}
