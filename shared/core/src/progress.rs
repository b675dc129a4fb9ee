//! Progress events from stages and clients, for a terminal display or the logs.

use std::time::Duration;

use crate::model::Stage;

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
