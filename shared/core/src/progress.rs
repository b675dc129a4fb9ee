//! Progress events from stages and clients, for a terminal display or the logs.

use std::time::Duration;

use crate::model::Stage;

tokio::task_local! {
    static THROTTLES: std::sync::Arc<Throttles>;
}

/// The throttling (429 answers waited out) one stage met, counted for its run's record.
#[derive(Debug, Default)]
pub struct Throttles {
    count: std::sync::atomic::AtomicU64,
    waited_ms: std::sync::atomic::AtomicU64,
}

/// Counts a 429 waited out for `wait`, towards the stage being run (if any: see [`tally`]).
pub fn note_throttle(wait: Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    let _ = THROTTLES.try_with(|t| {
        t.count.fetch_add(1, Relaxed);
        t.waited_ms
            .fetch_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), Relaxed);
    });
}

/// Runs `work`, counting the 429s its requests met (they run in the same task): what it gave,
/// and (429s, milliseconds waited).
pub async fn tally<F: std::future::Future>(work: F) -> (F::Output, (u64, u64)) {
    use std::sync::atomic::Ordering::Relaxed;
    let t = std::sync::Arc::new(Throttles::default());
    let out = THROTTLES.scope(t.clone(), work).await;
    (out, (t.count.load(Relaxed), t.waited_ms.load(Relaxed)))
}

/// Something a stage or a client wants an operator to see.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// A stage began.
    StageStarted { stage: Stage },
    /// Rows found in a table (so far).
    Found { table: &'static str, rows: usize },
    /// Rows archived before deletion.
    Archived { table: &'static str, rows: usize },
    /// Rows deleted (or, in a dry run, that would be).
    Deleted { table: &'static str, rows: usize },
    /// A request was retried after a throttle or transient failure.
    Retry {
        service: &'static str,
        status: Option<u16>,
        wait: Duration,
    },
    /// A stage ended; `summary` is one line for humans.
    StageFinished {
        stage: Stage,
        status: String,
        summary: String,
    },
}

/// Receives progress events; implementations must be cheap and never block.
pub trait ProgressSink: Send + Sync {
    /// Called for each event.
    fn emit(&self, event: Progress);
}

/// Sends progress to `tracing` (Lambda, workers, non-interactive runs).
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingSink;

impl ProgressSink for TracingSink {
    fn emit(&self, event: Progress) {
        match event {
            Progress::Retry {
                service,
                status,
                wait,
            } => {
                tracing::warn!(
                    service,
                    status,
                    wait_ms = wait.as_millis() as u64,
                    "retrying"
                )
            }
            other => tracing::info!(?other, "progress"),
        }
    }
}
