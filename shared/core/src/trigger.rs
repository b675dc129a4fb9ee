//! Starting a run from a restore signal (a signed notification, the restore watcher): at most
//! one run per signal, and no claim left behind when the run's first event could not be sent.

use jiff::Timestamp;

use crate::error::Result;
use crate::event::{SCHEMA_VERSION, StageEvent};
use crate::model::{RunOptions, Stage, Trigger};
use crate::notify;
use crate::ports::{ProgressStore, StageQueue};

/// What [`start_run`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    /// A new run was queued.
    New(String),
    /// The operation was seen before: its run.
    Seen(String),
}

/// Queues a run for a restore signal, at most once per (source, operation id): the claim is
/// written first and undone if the event cannot be sent, so a retry is not taken for a duplicate.
pub async fn start_run(
    store: &dyn ProgressStore,
    queue: &dyn StageQueue,
    environment_id: &str,
    notice: &notify::Notice,
    now: Timestamp,
) -> Result<Started> {
    let run_id = ulid::Ulid::new().to_string();
    let event = StageEvent {
        version: SCHEMA_VERSION,
        run_id: Some(run_id.clone()),
        environment_id: environment_id.to_string(),
        stage: Stage::DetectMismatch,
        trigger: Trigger {
            source: notice.source.to_string(),
            operation_id: Some(notice.operation_id.clone()),
            observed_at: Some(now),
        },
        options: RunOptions::default(),
    };
    event.validate()?;
    if let Err(existing) = store
        .claim_trigger(notice.source, &notice.operation_id, &run_id)
        .await?
    {
        return Ok(Started::Seen(existing));
    }
    if let Err(e) = queue.send(&event).await {
        store
            .release_trigger(notice.source, &notice.operation_id, &run_id)
            .await
            .ok();
        return Err(e);
    }
    Ok(Started::New(run_id))
}
