//! Bookkeeping of the reliability suite (tests/reliability.rs): after a scenario, look at every
//! side (simulator rows, archive, run records, queues and dead-letter queues, everything the
//! processes printed), write one report per scenario for docs/RELIABILITY.md, then assert the
//! guarantees. Reports go to `target/reliability/` (or `RELINK_RELIABILITY_DIR`);
//! `cargo run -p relink-bench -- reliability` turns them into the page.

use std::collections::HashSet;
use std::path::PathBuf;

use relink_core::model::RunStatus;
use relink_core::ports::ProgressStore;
use serde::Serialize;

use super::aws::AwsWorld;

/// What a scenario did, as one row of docs/RELIABILITY.md. Only figures the scenario makes
/// deterministic go here, so the page is the same on every green run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// File name and sort key, e.g. `03-killed-after-recording`.
    pub id: &'static str,
    pub title: &'static str,
    /// What was injected.
    pub injected: &'static str,
    pub runs_expected: usize,
    /// Runs that reached their expected status.
    pub runs_finished: usize,
    pub rows_expected: usize,
    pub rows_deleted: usize,
    /// Distinct rows in the runs' archives.
    pub rows_archived: usize,
    pub deleted_twice: usize,
    /// Rows deleted from the production organisation, which no scenario targets.
    pub wrong_org_deleted: usize,
    pub lost_runs: usize,
    /// Secrets, tokens or smuggled credentials found in any log line or command output.
    pub secrets_in_logs: usize,
    /// Messages left in stage queues and dead-letter queues.
    pub messages_left: usize,
    /// What the scenario proved beyond the common checks (asserted before it is written).
    pub evidence: String,
    pub result: &'static str,
}

/// A scenario's expectations.
pub struct Scenario {
    pub id: &'static str,
    pub title: &'static str,
    pub injected: &'static str,
    /// Every run started, with the status it must end in.
    pub runs: Vec<(String, RunStatus)>,
    pub rows_expected: usize,
    /// Rows archived whose deletes the service answered as done but kept (a lying server): they
    /// are in the archive and not among the rows deleted.
    pub kept_rows: usize,
    /// Strings besides the world's secrets that must never be printed.
    pub also_secret: Vec<String>,
}

impl AwsWorld {
    /// Checks every side after a scenario, writes its report, then asserts the guarantees.
    pub async fn conclude(&self, s: Scenario, evidence: &str) -> Report {
        let store = self.store().await;
        let mut runs_finished = 0;
        let mut lost_runs = 0;
        let mut rows_archived = 0;
        for (run_id, expected) in &s.runs {
            match store.get_run(run_id).await.expect("read run") {
                Some(run) if run.status == *expected => runs_finished += 1,
                Some(run) => panic!(
                    "run {run_id} ended {:?}, expected {expected:?}: {run:#?}",
                    run.status
                ),
                None => lost_runs += 1,
            }
            let archive = store.archived(run_id).await.expect("read archive");
            let keys: HashSet<(String, String)> = archive
                .iter()
                .map(|r| (r.table.clone(), r.key.clone()))
                .collect();
            rows_archived += keys.len();
        }
        let recorded = store.recent_runs(10_000).await.expect("list runs");
        let known: HashSet<&str> = s.runs.iter().map(|(id, _)| id.as_str()).collect();
        let unexpected: Vec<&str> = recorded
            .iter()
            .map(|r| r.run_id.as_str())
            .filter(|id| !known.contains(id))
            .collect();
        assert!(unexpected.is_empty(), "runs nobody started: {unexpected:?}");

        assert!(
            !self.logs().contains('\u{1b}'),
            "a log written to a file or a pipe carries terminal colour codes"
        );
        let snap = self.w.sim.snapshot();
        let wrong_org_deleted = snap.deleted.get("dataverse/prod").copied().unwrap_or(0);
        let rows_deleted = snap.deleted.values().sum::<usize>() - wrong_org_deleted;
        let s_kept = s.kept_rows;
        let report = Report {
            id: s.id,
            title: s.title,
            injected: s.injected,
            runs_expected: s.runs.len(),
            runs_finished,
            rows_expected: s.rows_expected,
            rows_deleted,
            rows_archived,
            deleted_twice: snap.deleted_twice.len(),
            wrong_org_deleted,
            lost_runs,
            secrets_in_logs: self.secrets_in_logs(&s.also_secret),
            messages_left: self.queued().await,
            evidence: evidence.to_string(),
            result: "pass",
        };
        let ok = report.runs_finished == report.runs_expected
            && report.lost_runs == 0
            && report.rows_deleted == report.rows_expected
            && report.rows_archived == report.rows_deleted + s_kept
            && report.deleted_twice == 0
            && report.wrong_org_deleted == 0
            && report.secrets_in_logs == 0
            && report.messages_left == 0;
        let report = Report {
            result: if ok { "pass" } else { "FAIL" },
            ..report
        };
        write(&report);
        assert!(
            ok,
            "scenario {} broke a guarantee: {report:#?}\nrows deleted twice: {:?}",
            s.id, snap.deleted_twice
        );
        report
    }

    /// Occurrences of the client secret, any access token the simulator issued, row secrets and
    /// `extra` in everything the world's processes printed (command output and worker logs).
    pub fn secrets_in_logs(&self, extra: &[String]) -> usize {
        let text = self.logs();
        let mut needles = vec![
            self.w.secret.clone(),
            "SIMSECRET".to_string(),
            // Every token the simulator issues starts so; none may be printed.
            "simtok-".to_string(),
        ];
        needles.extend(extra.iter().cloned());
        needles
            .iter()
            .map(|n| text.matches(n.as_str()).count())
            .sum()
    }
}

impl AwsWorld {
    /// Everything the world's processes printed: command output and background workers' logs.
    pub fn logs(&self) -> String {
        let mut text = self.w.captured.lock().unwrap().clone();
        for entry in std::fs::read_dir(&self.w.dir).expect("world dir").flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        text
    }
}

fn dir() -> PathBuf {
    std::env::var_os("RELINK_RELIABILITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/reliability")
        })
}

fn write(report: &Report) {
    let dir = dir();
    std::fs::create_dir_all(&dir).expect("report dir");
    std::fs::write(
        dir.join(format!("{}.json", report.id)),
        serde_json::to_string_pretty(report).expect("json"),
    )
    .expect("report written");
}

/// Checks, from the simulator's log, that every request answered 429 was retried, and no
/// earlier than its `Retry-After`; returns how many 429s were answered.
pub fn retries_waited(log: &[relink_sim::LogEntry]) -> usize {
    let throttled: Vec<_> = log.iter().filter(|e| e.status == 429).collect();
    for t in &throttled {
        let retry = log
            .iter()
            .find(|e| e.fingerprint == t.fingerprint && e.at_ms > t.at_ms)
            .unwrap_or_else(|| panic!("a throttled request was never retried: {}", t.fingerprint));
        let waited = retry.at_ms - t.at_ms;
        let asked = t.retry_after_secs.unwrap_or(0) as f64 * 1000.0;
        assert!(
            waited >= asked,
            "retried after {waited:.0} ms, before Retry-After ({asked} ms): {}",
            t.fingerprint
        );
    }
    throttled.len()
}
