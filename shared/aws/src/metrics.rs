//! Metrics in CloudWatch Embedded Metric Format: one JSON line on stdout per record handled,
//! which CloudWatch Logs turns into metrics of namespace `relink` without an API call. The
//! dimensions stay cheap: `stage` (stage metrics) or none (run and fleet metrics), never one
//! per environment. The template's dashboard and alarms name only metrics listed in [`ALL`]
//! (a test keeps them in step).
//!
//! No crate was used: the maintained EMF crates pull in a metrics facade and a registry for what
//! is one `serde_json` object per line here.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use relink_core::model::{Run, RunStatus, Stage, StageStatus};
use relink_core::progress::{Progress, ProgressSink, TracingSink};
use serde_json::{Map, Value, json};

/// The CloudWatch namespace.
pub const NAMESPACE: &str = "relink";

/// Runs started (a first `detect-mismatch` attempt).
pub const RUNS_STARTED: &str = "RunsStarted";
pub const RUNS_SUCCEEDED: &str = "RunsSucceeded";
pub const RUNS_FAILED: &str = "RunsFailed";
pub const RUNS_REFUSED: &str = "RunsRefused";
pub const RUNS_SKIPPED: &str = "RunsSkipped";
/// Runs that reached `awaiting-confirmation` (a Reset is due).
pub const RUNS_AWAITING_RESET: &str = "RunsAwaitingReset";
/// Rows found, archived and deleted by a stage (all its tables).
pub const ROWS_FOUND: &str = "RowsFound";
pub const ROWS_ARCHIVED: &str = "RowsArchived";
pub const ROWS_DELETED: &str = "RowsDeleted";
/// 429 answers met, and the time waited for them.
pub const THROTTLED: &str = "Throttled";
pub const THROTTLE_WAIT: &str = "ThrottleWait";
/// How long one stage invocation took.
pub const STAGE_DURATION: &str = "StageDuration";
/// A long stage handed over to a new invocation.
pub const CONTINUATIONS: &str = "Continuations";
/// Messages recorded as rejected (poison).
pub const REJECTED_MESSAGES: &str = "RejectedMessages";
/// Notifications answered with an error (bad signature, unknown environment, ...).
pub const NOTIFICATION_FAILURES: &str = "NotificationFailures";
/// The watcher's view of the fleet: the longest a Reset has been due.
pub const OLDEST_AWAITING_RESET: &str = "OldestAwaitingReset";

/// Every metric the code emits.
pub const ALL: [&str; 16] = [
    RUNS_STARTED,
    RUNS_SUCCEEDED,
    RUNS_FAILED,
    RUNS_REFUSED,
    RUNS_SKIPPED,
    RUNS_AWAITING_RESET,
    ROWS_FOUND,
    ROWS_ARCHIVED,
    ROWS_DELETED,
    THROTTLED,
    THROTTLE_WAIT,
    STAGE_DURATION,
    CONTINUATIONS,
    REJECTED_MESSAGES,
    NOTIFICATION_FAILURES,
    OLDEST_AWAITING_RESET,
];

/// A metric's unit, as CloudWatch spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
    Seconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
            Unit::Seconds => "Seconds",
        }
    }
}

/// One value to emit.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub name: &'static str,
    pub value: f64,
    pub unit: Unit,
}

fn count(name: &'static str, n: u64) -> Metric {
    Metric {
        name,
        value: n as f64,
        unit: Unit::Count,
    }
}

/// Where EMF lines go: stdout in Lambda, a buffer in tests, nowhere for a local worker.
pub trait MetricsSink: Send + Sync {
    fn emit(&self, dimensions: &[(&str, &str)], metrics: &[Metric]);
}

/// The EMF object of `metrics` with `dimensions` (one dimension set) at `timestamp_ms`.
pub fn emf(dimensions: &[(&str, &str)], metrics: &[Metric], timestamp_ms: i64) -> Value {
    let mut line = Map::new();
    line.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [dimensions.iter().map(|(k, _)| *k).collect::<Vec<_>>()],
                "Metrics": metrics.iter().map(|m| json!({"Name": m.name, "Unit": m.unit.as_str()})).collect::<Vec<_>>(),
            }],
        }),
    );
    for (k, v) in dimensions {
        line.insert((*k).into(), json!(v));
    }
    for m in metrics {
        line.insert(m.name.into(), json!(m.value));
    }
    Value::Object(line)
}

/// Prints each EMF object as one line on stdout (Lambda's log stream).
pub struct Stdout;

impl MetricsSink for Stdout {
    fn emit(&self, dimensions: &[(&str, &str)], metrics: &[Metric]) {
        if metrics.is_empty() {
            return;
        }
        let line = emf(dimensions, metrics, jiff::Timestamp::now().as_millisecond());
        println!("{line}");
    }
}

/// Keeps the EMF objects (tests).
#[derive(Default)]
pub struct Memory(pub Mutex<Vec<Value>>);

impl MetricsSink for Memory {
    fn emit(&self, dimensions: &[(&str, &str)], metrics: &[Metric]) {
        if !metrics.is_empty() {
            self.0
                .lock()
                .expect("metrics lock")
                .push(emf(dimensions, metrics, 0));
        }
    }
}

/// Emits nothing (a local worker, whose stdout is the operator's).
pub struct Off;

impl MetricsSink for Off {
    fn emit(&self, _: &[(&str, &str)], _: &[Metric]) {}
}

/// The progress sink of a function's HTTP client: logs like [`TracingSink`] and counts the 429s
/// met and the time waited, which [`stage_metrics`] reports per record.
#[derive(Default)]
pub struct ThrottleCounter {
    throttled: AtomicU64,
    waited_ms: AtomicU64,
}

impl ThrottleCounter {
    /// The 429s and milliseconds waited since the last call.
    pub fn take(&self) -> (u64, u64) {
        (
            self.throttled.swap(0, Ordering::Relaxed),
            self.waited_ms.swap(0, Ordering::Relaxed),
        )
    }
}

impl ProgressSink for ThrottleCounter {
    fn emit(&self, event: Progress) {
        if let Progress::Retry {
            status: Some(429),
            wait,
            ..
        } = &event
        {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            self.waited_ms.fetch_add(
                u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        }
        TracingSink.emit(event);
    }
}

/// Sums a count field over a stage outcome and the per-table objects inside it.
fn sum_field(outcome: &Value, key: &str) -> u64 {
    let own = outcome.get(key).and_then(Value::as_u64).unwrap_or(0);
    let nested: u64 = outcome
        .as_object()
        .map(|m| {
            m.values()
                .filter(|v| v.is_object())
                .filter_map(|v| v.get(key).and_then(Value::as_u64))
                .sum()
        })
        .unwrap_or(0);
    own + nested
}

/// What one handled record did, as metrics: `(stage metrics, run metrics)`, the first emitted
/// with the `stage` dimension, the second without dimensions.
pub fn stage_metrics(
    stage: Stage,
    run: &Run,
    elapsed: Duration,
    throttled: (u64, u64),
) -> (Vec<Metric>, Vec<Metric>) {
    let rec = run.stage(stage);
    let mut per_stage = vec![Metric {
        name: STAGE_DURATION,
        value: elapsed.as_secs_f64() * 1000.0,
        unit: Unit::Milliseconds,
    }];
    if let Some(o) = &rec.outcome {
        let found = if stage == Stage::DetectMismatch {
            sum_field(o, "fno_project_configs") + sum_field(o, "dataverse_runtime_configs")
        } else {
            sum_field(o, "archived") + sum_field(o, "would_delete")
        };
        per_stage.push(count(ROWS_FOUND, found));
        per_stage.push(count(ROWS_ARCHIVED, sum_field(o, "archived")));
        per_stage.push(count(ROWS_DELETED, sum_field(o, "deleted")));
    }
    if rec.status == StageStatus::Running {
        per_stage.push(count(CONTINUATIONS, 1));
    }
    if throttled.0 > 0 {
        per_stage.push(count(THROTTLED, throttled.0));
        per_stage.push(Metric {
            name: THROTTLE_WAIT,
            value: throttled.1 as f64,
            unit: Unit::Milliseconds,
        });
    }
    let mut per_run = Vec::new();
    if stage == Stage::DetectMismatch && rec.attempts == 1 {
        per_run.push(count(RUNS_STARTED, 1));
    }
    let ended = match run.status {
        RunStatus::Succeeded => Some(RUNS_SUCCEEDED),
        RunStatus::Failed => Some(RUNS_FAILED),
        RunStatus::Refused => Some(RUNS_REFUSED),
        RunStatus::Skipped => Some(RUNS_SKIPPED),
        RunStatus::AwaitingConfirmation => Some(RUNS_AWAITING_RESET),
        RunStatus::Pending | RunStatus::Running => None,
    };
    if let Some(name) = ended {
        per_run.push(count(name, 1));
    }
    (per_stage, per_run)
}

/// Emits a record's metrics.
pub fn emit_stage(
    sink: &dyn MetricsSink,
    stage: Stage,
    run: &Run,
    elapsed: Duration,
    throttled: (u64, u64),
) {
    let (per_stage, per_run) = stage_metrics(stage, run, elapsed, throttled);
    sink.emit(&[("stage", stage.as_str())], &per_stage);
    sink.emit(&[], &per_run);
}

/// Emits one count without dimensions.
pub fn emit_count(sink: &dyn MetricsSink, name: &'static str, n: u64) {
    sink.emit(&[], &[count(name, n)]);
}

/// Emits a gauge in seconds without dimensions.
pub fn emit_seconds(sink: &dyn MetricsSink, name: &'static str, secs: f64) {
    sink.emit(
        &[],
        &[Metric {
            name,
            value: secs,
            unit: Unit::Seconds,
        }],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emf_line_declares_what_it_carries() {
        let line = emf(
            &[("stage", "purge-keys")],
            &[count(ROWS_DELETED, 40)],
            1_764_133_200_000,
        );
        let cw = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(cw["Namespace"], "relink");
        assert_eq!(cw["Dimensions"], json!([["stage"]]));
        assert_eq!(
            cw["Metrics"],
            json!([{"Name": "RowsDeleted", "Unit": "Count"}])
        );
        assert_eq!(line["stage"], "purge-keys");
        assert_eq!(line["RowsDeleted"], 40.0);
        assert_eq!(line["_aws"]["Timestamp"], 1_764_133_200_000i64);
    }

    #[test]
    fn every_metric_the_dashboard_and_alarms_name_is_one_the_code_emits() {
        let template = include_str!("../../../template.yaml");
        let mut named = std::collections::BTreeSet::new();
        // Alarms: `Namespace: relink` followed by `MetricName: X`.
        let lines: Vec<&str> = template.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.trim() == "Namespace: relink"
                && let Some(m) = lines[i + 1].trim().strip_prefix("MetricName: ")
            {
                named.insert(m.to_string());
            }
        }
        // Dashboard: `["relink","X"` in its body.
        for piece in template.split("[\"relink\",\"").skip(1) {
            named.insert(piece.split('"').next().unwrap().to_string());
        }
        assert!(named.len() >= 10, "{named:?}");
        for name in &named {
            assert!(
                ALL.contains(&name.as_str()),
                "the template names {name}, which relink never emits"
            );
        }
    }
}
