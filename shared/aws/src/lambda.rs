//! The SQS batch handler every stage function runs (and `relink worker` runs the same way):
//! each record is parsed on its own, in its own span; a retryable error becomes a batch item
//! failure, a permanent one is recorded and the message acknowledged, so a poison message
//! never blocks its batch or loops until the dead-letter queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use futures::future::BoxFuture;
use jiff::Timestamp;
use lambda_runtime::{Context, LambdaEvent};
use tracing::Instrument;

use crate::metrics::{MetricsSink, ThrottleCounter};
use crate::registry::TableRegistry;
use crate::secrets::SecretResolver;
use crate::sqs::SqsQueue;
use relink_core::error::{Error, Result};
use relink_core::event::StageEvent;
use relink_core::model::Stage;
use relink_core::pipeline::Engine;
use relink_core::ports::{
    Connector, LeaseOwner, LeasesOnly, Liveness, ProgressStore, RegistrySource, Rejected,
    ResetDriver, StageQueue,
};
use relink_core::progress::ProgressSink;
use relink_core::stages::ManualReset;
use relink_dynamics::{Http, HttpConnector, RetryPolicy};

/// What a stage function is built from, once, at init.
pub struct FunctionDeps {
    /// The stage this function (or worker poller) runs.
    pub stage: Stage,
    pub store: Arc<dyn ProgressStore>,
    pub queue: Arc<dyn StageQueue>,
    pub connector: Arc<dyn Connector>,
    pub registry: Arc<dyn RegistrySource>,
    pub reset: Arc<dyn ResetDriver>,
    pub sink: Arc<dyn ProgressSink>,
    /// Whether a lease holder is known dead: nothing in Lambda, the process table in a worker.
    pub liveness: Arc<dyn Liveness>,
    /// Prefix of lease owners: `lambda` in Lambda, this process (`pid:..`) in a worker, so a
    /// restarted worker can tell that a dead one's lease is void.
    pub owner_prefix: String,
    /// Longest lease (cut at the invocation's deadline).
    pub lease: Duration,
    /// How long a run keeps its environment between two stages.
    pub handover_grace: Duration,
    /// The longest a failed or waiting message is held back ([`MAX_BACKOFF`] in Lambda; a local
    /// worker uses its short visibility timeout).
    pub max_wait: Duration,
    /// Whether long stages hand over to a new invocation before the deadline (Lambda: yes; a
    /// local worker only with `--time-box`).
    pub time_boxed: bool,
    /// Where EMF metrics go (stdout in Lambda).
    pub metrics: Arc<dyn MetricsSink>,
    /// 429s met by the HTTP client since the last record (it is the client's progress sink).
    pub throttles: Arc<ThrottleCounter>,
}

/// What became of one record.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Done (or a duplicate): delete the message.
    Done,
    /// Permanent failure, recorded: delete the message.
    Rejected,
    /// Retryable: report as a batch item failure.
    Retry,
}

/// True until the first invocation of this process (a cold start) has begun.
static COLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Handles an SQS batch: the Lambda handler of every stage function.
pub async fn handle_batch(
    deps: &FunctionDeps,
    event: LambdaEvent<SqsEvent>,
) -> Result<SqsBatchResponse, lambda_runtime::Error> {
    let (event, ctx) = event.into_parts();
    let mut response = SqsBatchResponse::default();
    // Powertools' field names: every line of the invocation carries them.
    let invocation = tracing::info_span!(
        "invocation",
        function_request_id = %ctx.request_id,
        function_name = %std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_default(),
        function_version = %std::env::var("AWS_LAMBDA_FUNCTION_VERSION").unwrap_or_default(),
        cold_start = COLD.swap(false, std::sync::atomic::Ordering::Relaxed),
    );
    // Instrumented, not entered: a guard held across an await would leave the span on the stack
    // of whichever thread the task last ran on, and tracing's registry then mixes up (and can
    // panic over) the parents of later spans.
    async {
        for record in &event.records {
            let message_id = record.message_id.clone().unwrap_or_default();
            let span = tracing::info_span!("record", message_id = %message_id, stage = %deps.stage, run_id = tracing::field::Empty, environment_id = tracing::field::Empty);
            if handle_record(deps, &ctx, record).instrument(span).await == Disposition::Retry {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = message_id;
                response.batch_item_failures.push(failure);
            }
        }
        Ok(response)
    }
    .instrument(invocation)
    .await
}

/// Handles one record; never fails the batch.
pub async fn handle_record(deps: &FunctionDeps, ctx: &Context, record: &SqsMessage) -> Disposition {
    let message_id = record.message_id.clone().unwrap_or_default();
    let body = record.body.as_deref().unwrap_or_default();
    let mut event = match StageEvent::parse(body) {
        Ok(ev) => ev,
        Err(e) => return reject(deps, &message_id, body.len(), &e, None).await,
    };
    if event.run_id.is_none() {
        // Every delivery of one message must be the same run, not a new one each time.
        event.run_id = run_id_for_message(record);
    }
    let span = tracing::Span::current();
    span.record("environment_id", event.environment_id.as_str());
    if let Some(r) = &event.run_id {
        span.record("run_id", r.as_str());
    }
    if event.stage != deps.stage {
        let e = Error::BadEvent(format!(
            "field `stage` is {}, but this is the {} queue",
            event.stage, deps.stage
        ));
        return reject(deps, &message_id, body.len(), &e, Some(&event)).await;
    }
    let deadline = (ctx.deadline > 0)
        .then(|| Timestamp::from_millisecond(ctx.deadline as i64).ok())
        .flatten();
    let engine = Engine {
        registry: deps.registry.as_ref(),
        store: deps.store.as_ref(),
        queue: deps.queue.as_ref(),
        connector: deps.connector.as_ref(),
        reset: deps.reset.as_ref(),
        sink: deps.sink.as_ref(),
        liveness: deps.liveness.as_ref(),
        owner: LeaseOwner(format!("{}#{}", deps.owner_prefix, ulid::Ulid::new())),
        lease: deps.lease,
        handover_grace: deps.handover_grace,
        deadline,
        stage_deadline: deadline.filter(|_| deps.time_boxed),
    };
    let started = std::time::Instant::now();
    let result = engine.handle(&event).await;
    let throttled = deps.throttles.take();
    match result {
        Ok(h) => {
            tracing::info!(run_id = %h.run.run_id, status = %h.run.status, duplicate = h.duplicate, next = ?h.next.as_ref().map(|e| e.stage), "record handled");
            if !h.duplicate {
                crate::metrics::emit_stage(
                    deps.metrics.as_ref(),
                    deps.stage,
                    &h.run,
                    started.elapsed(),
                    throttled,
                );
            }
            Disposition::Done
        }
        Err(Error::LockHeld { holder, until, .. })
            if event
                .run_id
                .as_deref()
                .is_some_and(|r| !holder.starts_with(r)) =>
        {
            // Another run holds the environment: wait for it with a delayed copy of the event
            // and acknowledge this one, so waiting uses up none of the receives that lead to the
            // dead-letter queue.
            let max = deps.max_wait.min(MAX_BACKOFF);
            let delay = until
                .parse::<Timestamp>()
                .ok()
                .and_then(|t| Duration::try_from(t - Timestamp::now()).ok())
                .unwrap_or(LOCK_WAIT_MIN)
                .clamp(LOCK_WAIT_MIN.min(max), max);
            match deps.queue.send_later(&event, delay).await {
                Ok(()) => {
                    tracing::info!(holder = %holder, delay_s = delay.as_secs(), "environment held by another run; the event comes back later");
                    Disposition::Done
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not queue the wait; the message will be delivered again");
                    back_off(deps, record, None).await;
                    Disposition::Retry
                }
            }
        }
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, "retryable failure; the message will be delivered again");
            let hint = match &e {
                Error::Unavailable { retry_after, .. } => *retry_after,
                _ => None,
            };
            back_off(deps, record, hint).await;
            Disposition::Retry
        }
        Err(e) => reject(deps, &message_id, body.len(), &e, Some(&event)).await,
    }
}

/// The shortest wait for an environment another run holds.
const LOCK_WAIT_MIN: Duration = Duration::from_secs(30);
/// The longest backoff (SQS's longest delay).
pub const MAX_BACKOFF: Duration = Duration::from_secs(900);

/// The wait before the `receives`-th delivery of a message that failed: 15 s, doubling with each
/// receive, capped at 15 minutes, and never shorter than a service's `Retry-After`.
pub fn backoff(receives: u32, hint: Option<Duration>) -> Duration {
    let exp = Duration::from_secs(15).saturating_mul(1 << receives.saturating_sub(1).min(10));
    exp.max(hint.unwrap_or_default()).min(MAX_BACKOFF)
}

/// Makes a failed message come back after [`backoff`] for its receive count, instead of after
/// the queue's whole visibility timeout (6x the function's timeout). Best effort: if it fails,
/// the visibility timeout applies.
async fn back_off(deps: &FunctionDeps, record: &SqsMessage, hint: Option<Duration>) {
    let Some(receipt) = record.receipt_handle.as_deref() else {
        return;
    };
    let receives = record
        .attributes
        .get("ApproximateReceiveCount")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let delay = backoff(receives, hint).min(deps.max_wait);
    if let Err(e) = deps.queue.retry_later(deps.stage, receipt, delay).await {
        tracing::warn!(error = %e, "could not shorten the visibility timeout");
    }
}

/// The run a message without `run_id` starts: a ULID from the message's `SentTimestamp` and a
/// hash of its message id, so a redelivered message (at-least-once, or a visibility timeout
/// that lapsed mid-batch) finds the run its first delivery created instead of minting another.
/// `None` (a fresh id) if SQS did not say when the message was sent.
fn run_id_for_message(record: &SqsMessage) -> Option<String> {
    use sha2::Digest;
    let sent: u64 = record.attributes.get("SentTimestamp")?.parse().ok()?;
    let digest = sha2::Sha256::digest(record.message_id.as_deref()?.as_bytes());
    let random = digest[..10]
        .iter()
        .fold(0u128, |acc, b| (acc << 8) | u128::from(*b));
    Some(ulid::Ulid::from_parts(sent, random).to_string())
}

/// Records a permanent failure so the message can be acknowledged without being lost.
async fn reject(
    deps: &FunctionDeps,
    message_id: &str,
    body_bytes: usize,
    error: &Error,
    event: Option<&StageEvent>,
) -> Disposition {
    tracing::error!(error = %error, "message rejected");
    crate::metrics::emit_count(deps.metrics.as_ref(), crate::metrics::REJECTED_MESSAGES, 1);
    let rejected = Rejected {
        message_id: message_id.to_string(),
        received_at: Timestamp::now(),
        error: error.to_string(),
        body_bytes,
        environment_id: event.map(|e| e.environment_id.clone()),
        run_id: event.and_then(|e| e.run_id.clone()),
    };
    match deps.store.record_rejected(&rejected).await {
        Ok(()) => Disposition::Rejected,
        // Losing the record would lose the message: let SQS deliver it again.
        Err(e) => {
            tracing::error!(error = %e, "could not record the rejected message; it will be retried");
            Disposition::Retry
        }
    }
}

/// JSON log lines (Lambda's JSON log format) carrying the record span's `run_id`,
/// `environment_id`, `stage` and `message_id`. One level for everything, from `RUST_LOG` or
/// `AWS_LAMBDA_LOG_LEVEL` (`trace`..`error`, default `info`): per-module filters would bring
/// regex engines into every function binary (docs/BENCHMARKS.md, binary size).
pub fn init_tracing() {
    let level = std::env::var("RUST_LOG")
        .or_else(|_| std::env::var("AWS_LAMBDA_LOG_LEVEL"))
        .ok()
        .and_then(|l| l.trim().to_lowercase().parse().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::fmt()
        .json()
        .with_max_level(level)
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .without_time()
        .init();
}

impl FunctionDeps {
    /// Builds a stage function's clients once, from its environment: `RELINK_TABLE` and, for every
    /// stage but the last, `NEXT_QUEUE_URL` (the only queue the function may send to).
    pub async fn from_env(stage: Stage) -> Result<FunctionDeps> {
        let (config, store) = crate::function_base().await?;
        let mut urls = HashMap::new();
        if let Some(next) = stage.next() {
            urls.insert(next, crate::env_var("NEXT_QUEUE_URL")?);
        }
        // The function's own queue: for backing off a failed message and for re-queuing an
        // event that waits for another run (optional: without it the visibility timeout rules).
        if let Ok(own) = std::env::var("QUEUE_URL")
            && !own.is_empty()
        {
            urls.insert(stage, own);
        }
        let throttles = Arc::new(ThrottleCounter::default());
        let sink: Arc<dyn ProgressSink> = throttles.clone();
        let http = Arc::new(Http::new(RetryPolicy::default(), sink.clone())?);
        Ok(FunctionDeps {
            stage,
            registry: Arc::new(TableRegistry::new(store.clone())),
            store: Arc::new(store),
            queue: Arc::new(SqsQueue::new(aws_sdk_sqs::Client::new(&config), urls)),
            connector: Arc::new(crate::sns::WithTopic::from_env(
                HttpConnector::new(http, Arc::new(SecretResolver::new(&config))),
                &config,
            )),
            reset: Arc::new(ManualReset),
            sink,
            liveness: Arc::new(LeasesOnly),
            owner_prefix: "lambda".into(),
            lease: crate::function_timeout(stage),
            handover_grace: HANDOVER_GRACE,
            max_wait: MAX_BACKOFF,
            time_boxed: true,
            metrics: Arc::new(crate::metrics::Stdout),
            throttles,
        })
    }
}

/// How long a run keeps its environment while the next stage's event is in flight.
pub const HANDOVER_GRACE: Duration = Duration::from_secs(900);

/// The whole `main` of every function: JSON logs, then the function's clients built once (SDK
/// configuration, DynamoDB, SQS, Secrets Manager, the HTTP client), then the Lambda runtime loop,
/// each invocation handled by `handler` with them. A set-up that fails ends the init with the
/// error, as Lambda expects (it reports an init error and starts another environment).
///
/// Building in `main` was measured against building on a background task while the runtime
/// polls, and against building on the first invocation (docs/BENCHMARKS.md, "Cold first
/// event"): on an on-demand cold start the event is already waiting, so the background task
/// bought nothing on the first event, and the plain shape is the one kept.
pub async fn serve<D, E, R>(
    build: impl Future<Output = Result<D>>,
    handler: impl for<'a> Fn(&'a D, LambdaEvent<E>) -> BoxFuture<'a, Result<R, lambda_runtime::Error>>,
) -> Result<(), lambda_runtime::Error>
where
    E: serde::de::DeserializeOwned + Send + 'static,
    R: serde::Serialize + Send + 'static,
{
    init_tracing();
    let deps = build.await?;
    let (deps, handler) = (&deps, &handler);
    lambda_runtime::run(lambda_runtime::service_fn(
        move |event: LambdaEvent<E>| async move { handler(deps, event).await },
    ))
    .await
}

/// The `main` of a stage function.
pub async fn run_function(stage: Stage) -> Result<(), lambda_runtime::Error> {
    serve(FunctionDeps::from_env(stage), |deps, event| {
        Box::pin(handle_batch(deps, event))
    })
    .await
}

#[cfg(test)]
mod tests {
    //! The handler on JSON fixtures shaped like Lambda's SQS events, with `Context::default()`,
    //! the SQLite store in memory and in-memory Dynamics fakes.

    use std::sync::Arc;

    use super::*;
    use relink_core::fakes::{self, FakeConnector};
    use relink_core::model::RunStatus;
    use relink_core::ports::StaticRegistry;
    use relink_embedded::queue::MemQueue;
    use relink_embedded::sqlite::SqliteStore;

    struct Harness {
        deps: FunctionDeps,
        store: Arc<SqliteStore>,
        queue: Arc<MemQueue>,
    }

    fn harness(stage: Stage, stale: bool) -> Harness {
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let queue = Arc::new(MemQueue::default());
        let fno_urls: &[&str] = if stale {
            &["https://prod.crm.dynamics.com"]
        } else {
            &[fakes::DV]
        };
        let connector = FakeConnector {
            dataverse: Arc::new(fakes::dataverse(7)),
            fno: Arc::new(fakes::fno(fno_urls)),
        };
        let deps = FunctionDeps {
            stage,
            store: store.clone(),
            queue: queue.clone(),
            connector: Arc::new(connector),
            registry: Arc::new(StaticRegistry(Arc::new(fakes::registry()))),
            reset: Arc::new(ManualReset),
            sink: Arc::new(relink_core::progress::TracingSink),
            liveness: Arc::new(LeasesOnly),
            owner_prefix: "test".into(),
            lease: Duration::from_secs(30),
            handover_grace: Duration::from_secs(30),
            max_wait: MAX_BACKOFF,
            time_boxed: false,
            metrics: Arc::new(crate::metrics::Off),
            throttles: Arc::default(),
        };
        Harness { deps, store, queue }
    }

    fn fixture(name: &str) -> LambdaEvent<SqsEvent> {
        let text = match name {
            "mixed" => include_str!("../fixtures/sqs-mixed-batch.json"),
            "stale" => include_str!("../fixtures/sqs-single-stale.json"),
            _ => unreachable!(),
        };
        LambdaEvent::new(
            serde_json::from_str(text).expect("fixture parses as SqsEvent"),
            Context::default(),
        )
    }

    #[tokio::test]
    async fn poison_records_are_recorded_and_acknowledged_while_good_ones_run() {
        let h = harness(Stage::DetectMismatch, false);
        let resp = handle_batch(&h.deps, fixture("mixed")).await.unwrap();
        assert!(
            resp.batch_item_failures.is_empty(),
            "nothing is retried: {:?}",
            resp.batch_item_failures
        );
        let rejected = h.store.rejected(10).await.unwrap();
        let mut ids: Vec<_> = rejected.iter().map(|r| r.message_id.as_str()).collect();
        ids.sort();
        assert_eq!(
            ids,
            [
                "11111111-aaaa-4000-8000-000000000002",
                "11111111-aaaa-4000-8000-000000000003",
                "11111111-aaaa-4000-8000-000000000004"
            ]
        );
        assert!(rejected.iter().all(|r| !r.error.is_empty()));
        // The good record found a clean link and skipped its run.
        let run = h.store.latest_run("uat").await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Skipped);
    }

    #[tokio::test]
    async fn a_stale_link_moves_on_to_the_next_queue() {
        let h = harness(Stage::DetectMismatch, true);
        let resp = handle_batch(&h.deps, fixture("stale")).await.unwrap();
        assert!(resp.batch_item_failures.is_empty());
        let next = h.queue.pop().expect("the purge-keys event was sent");
        assert_eq!(next.stage, Stage::PurgeKeys);
        assert_eq!(next.run_id.as_deref(), Some("01JDQ4N9Z3W8B7C6X5V4T3S2R1"));
        // The same delivery again does nothing twice.
        let resp = handle_batch(&h.deps, fixture("stale")).await.unwrap();
        assert!(resp.batch_item_failures.is_empty());
        let run = h
            .store
            .get_run("01JDQ4N9Z3W8B7C6X5V4T3S2R1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(run.stage(Stage::DetectMismatch).attempts, 1);
    }

    #[tokio::test]
    async fn a_redelivered_message_without_run_id_is_the_same_run() {
        let h = harness(Stage::DetectMismatch, false);
        let mut event = fixture("stale");
        event.payload.records[0].body = Some(r#"{"environment_id":"uat"}"#.into());
        handle_batch(&h.deps, event.clone()).await.unwrap();
        handle_batch(&h.deps, event).await.unwrap();
        let runs = h.store.recent_runs(10).await.unwrap();
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!(runs[0].stage(Stage::DetectMismatch).attempts, 1);
        // The id sorts by the message's SentTimestamp.
        let id = ulid::Ulid::from_string(&runs[0].run_id).unwrap();
        assert_eq!(id.timestamp_ms(), 1_764_133_200_000);
    }

    #[tokio::test]
    async fn a_lock_held_by_another_run_requeues_the_event_without_using_a_receive() {
        let h = harness(Stage::DetectMismatch, true);
        h.store
            .acquire_lock(
                "uat",
                "01JDQ4N9Z3W8B7C6X5V4T3S2R0",
                &LeaseOwner("other".into()),
                Duration::from_secs(60),
            )
            .await
            .unwrap()
            .unwrap();
        let resp = handle_batch(&h.deps, fixture("stale")).await.unwrap();
        assert!(
            resp.batch_item_failures.is_empty(),
            "the message is acknowledged: waiting must not count towards the dead-letter queue"
        );
        let again = h.queue.pop().expect("a delayed copy of the event");
        assert_eq!(
            (again.stage, again.run_id.as_deref()),
            (Stage::DetectMismatch, Some("01JDQ4N9Z3W8B7C6X5V4T3S2R1"))
        );
        let run = h
            .store
            .get_run("01JDQ4N9Z3W8B7C6X5V4T3S2R1")
            .await
            .unwrap()
            .unwrap();
        let waiting = run.waiting.as_deref().unwrap_or_default();
        assert!(
            waiting.contains("held by run 01JDQ4N9Z3W8B7C6X5V4T3S2R0"),
            "{waiting}"
        );
    }

    #[test]
    fn the_backoff_grows_with_the_receive_count_and_respects_retry_after() {
        assert_eq!(backoff(1, None), Duration::from_secs(15));
        assert_eq!(backoff(3, None), Duration::from_secs(60));
        assert_eq!(backoff(99, None), MAX_BACKOFF);
        assert_eq!(backoff(0, None), Duration::from_secs(15));
        assert_eq!(
            backoff(1, Some(Duration::from_secs(120))),
            Duration::from_secs(120)
        );
        assert_eq!(backoff(1, Some(Duration::from_secs(1 << 40))), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn an_event_on_the_wrong_queue_is_rejected() {
        let h = harness(Stage::PurgeKeys, true);
        let resp = handle_batch(&h.deps, fixture("stale")).await.unwrap();
        assert!(resp.batch_item_failures.is_empty());
        let rejected = h.store.rejected(10).await.unwrap();
        assert!(
            rejected[0].error.contains("purge-keys queue"),
            "{rejected:?}"
        );
        assert!(h.queue.pop().is_none());
    }
}
