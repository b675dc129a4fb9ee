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

/// Queues a run for a restore signal, at most once per (source, environment, operation id): one
/// pipeline build that refreshes two environments under one build id starts two runs. The claim
/// is written first and undone if the event cannot be sent, so a retry is not taken for a
/// duplicate; the claim is marked sent once the event is out. If the process died between the
/// claim and the mark (nothing could undo the claim), a retry that finds an unmarked claim whose
/// run does not exist sends that run's first event again: a duplicate delivery is answered from
/// the run record, so an event sent twice (a death between send and mark) is harmless.
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
        carried: None,
    };
    event.validate()?;
    let claim = format!("{environment_id}/{}", notice.operation_id);
    if let Err(earlier) = store.claim_trigger(notice.source, &claim, &run_id).await? {
        if earlier.sent
            || earlier.run_id.is_empty()
            || store
                .find_run(environment_id, &earlier.run_id)
                .await?
                .is_some()
        {
            return Ok(Started::Seen(earlier.run_id));
        }
        let mut event = event;
        event.run_id = Some(earlier.run_id.clone());
        event.validate()?;
        queue.send(&event).await?;
        store
            .mark_trigger_sent(notice.source, &claim, &earlier.run_id)
            .await?;
        tracing::warn!(run_id = %earlier.run_id, operation_id = %notice.operation_id, "a claimed signal's first event had not been sent: sent now");
        return Ok(Started::New(earlier.run_id));
    }
    if let Err(e) = queue.send(&event).await {
        store
            .release_trigger(notice.source, &claim, &run_id)
            .await
            .ok();
        return Err(e);
    }
    // If this fails the claim stays unmarked and a retry sends the event again: harmless.
    store
        .mark_trigger_sent(notice.source, &claim, &run_id)
        .await
        .ok();
    Ok(Started::New(run_id))
}
