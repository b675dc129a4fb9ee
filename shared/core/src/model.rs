//! The run and stage state machine. Every transition is checked here; stores make each write
//! conditional on the version read, so two concurrent deliveries cannot both win.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// The four stages, in pipeline order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    DetectMismatch,
    PurgeKeys,
    ClearDataverseConfigs,
    ResetLink,
}

impl Stage {
    /// Every stage in pipeline order.
    pub const ALL: [Stage; 4] = [
        Stage::DetectMismatch,
        Stage::PurgeKeys,
        Stage::ClearDataverseConfigs,
        Stage::ResetLink,
    ];

    /// The stage id used in events, status output and queue names.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::DetectMismatch => "detect-mismatch",
            Stage::PurgeKeys => "purge-keys",
            Stage::ClearDataverseConfigs => "clear-dataverse-configs",
            Stage::ResetLink => "reset-link",
        }
    }

    /// The stage after this one, if any.
    pub fn next(self) -> Option<Stage> {
        let i = Stage::ALL.iter().position(|s| *s == self).expect("listed");
        Stage::ALL.get(i + 1).copied()
    }

    /// Parses a stage id, with an error listing the valid ones.
    pub fn parse(s: &str) -> Result<Stage> {
        Stage::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown stage `{s}`; expected one of: {}",
                    Stage::ALL.map(|s| s.as_str()).join(", ")
                ))
            })
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    Pending,
    Running,
    Skipped,
    AwaitingConfirmation,
    Succeeded,
    Failed,
    Refused,
}

impl RunStatus {
    /// The status string used in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Skipped => "skipped",
            RunStatus::AwaitingConfirmation => "awaiting-confirmation",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Refused => "refused",
        }
    }

    /// Whether no stage will run again for this run without an explicit rerun.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Skipped | RunStatus::Succeeded | RunStatus::Failed | RunStatus::Refused
        )
    }

    fn may_become(self, to: RunStatus) -> bool {
        use RunStatus::*;
        match (self, to) {
            (a, b) if a == b => true,
            (Pending, _) => true,
            (Running, Pending) => false,
            (Running, _) => true,
            (AwaitingConfirmation, Running | Succeeded | Failed) => true,
            // An explicit rerun of a stage of a failed run.
            (Failed, Running) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one stage of a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageStatus {
    Pending,
    Running,
    Succeeded,
    Skipped,
    Failed,
}

impl StageStatus {
    /// The status as the event, the store and the logs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Pending => "pending",
            StageStatus::Running => "running",
            StageStatus::Succeeded => "succeeded",
            StageStatus::Skipped => "skipped",
            StageStatus::Failed => "failed",
        }
    }

    /// Whether the stage's work is done (successfully or by decision).
    pub fn is_done(self) -> bool {
        matches!(self, StageStatus::Succeeded | StageStatus::Skipped)
    }

    fn may_become(self, to: StageStatus) -> bool {
        use StageStatus::*;
        matches!(
            (self, to),
            (Pending, Running | Skipped)
                | (Running, Running | Succeeded | Skipped | Failed)
                | (Failed, Running)
        )
    }
}

/// Options carried by an event and recorded on the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOptions {
    /// Walk every stage, record what would be deleted, delete nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Go on even when detection finds the link already clean.
    #[serde(default)]
    pub force: bool,
}

/// What started a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// `manual`, `notification`, `watch`, ... (default `manual`).
    #[serde(default = "Trigger::default_source")]
    pub source: String,
    /// The restore operation's id, when the source knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    /// When the signal was observed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Timestamp>,
}

impl Trigger {
    fn default_source() -> String {
        "manual".to_string()
    }

    /// A manual trigger observed now.
    pub fn manual() -> Self {
        Trigger {
            source: Self::default_source(),
            operation_id: None,
            observed_at: Some(Timestamp::now()),
        }
    }
}

impl Default for Trigger {
    fn default() -> Self {
        Trigger {
            source: Self::default_source(),
            operation_id: None,
            observed_at: None,
        }
    }
}

/// One stage's record on a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: Stage,
    pub status: StageStatus,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// What the stage found or did (counts, decisions, instructions).
    pub outcome: Option<Value>,
    /// The last error, if the stage failed or is being retried.
    pub error: Option<String>,
}

/// A run: one relink of one environment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub run_id: String,
    pub environment_id: String,
    pub status: RunStatus,
    pub options: RunOptions,
    pub trigger: Trigger,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub stages: Vec<StageRecord>,
    /// Operator instructions while the run awaits confirmation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    /// Why a delivery for this run was refused and will come back, and until when it waits
    /// (written beside the record, without a version change, so it never conflicts with the
    /// worker that holds the run; cleared by the run's next recorded change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Whether the environment had notification channels when the run was last recorded: a
    /// redelivery then checks that the notice of the run's status went out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub notifies: bool,
    /// The notices sent about this run, with what each channel answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<crate::notice::NoticeRecord>,
    /// Optimistic-concurrency version: each successful write increments it.
    pub version: u64,
}

impl Run {
    /// A new pending run with every stage pending.
    pub fn new(
        run_id: String,
        environment_id: String,
        options: RunOptions,
        trigger: Trigger,
    ) -> Run {
        let now = Timestamp::now();
        Run {
            run_id,
            environment_id,
            status: RunStatus::Pending,
            options,
            trigger,
            created_at: now,
            updated_at: now,
            stages: Stage::ALL
                .into_iter()
                .map(|stage| StageRecord {
                    stage,
                    status: StageStatus::Pending,
                    attempts: 0,
                    started_at: None,
                    finished_at: None,
                    outcome: None,
                    error: None,
                })
                .collect(),
            instructions: None,
            waiting: None,
            notifies: false,
            notices: Vec::new(),
            version: 0,
        }
    }

    /// The record of one stage.
    pub fn stage(&self, stage: Stage) -> &StageRecord {
        self.stages
            .iter()
            .find(|s| s.stage == stage)
            .expect("every run records every stage")
    }

    fn stage_mut(&mut self, stage: Stage) -> &mut StageRecord {
        self.stages
            .iter_mut()
            .find(|s| s.stage == stage)
            .expect("every run records every stage")
    }

    /// The first stage that is not done, if any.
    pub fn next_stage(&self) -> Option<Stage> {
        self.stages
            .iter()
            .find(|s| !s.status.is_done())
            .map(|s| s.stage)
    }

    /// Moves the run to `to`, or says why it cannot.
    pub fn set_status(&mut self, to: RunStatus) -> Result<()> {
        if !self.status.may_become(to) {
            return Err(Error::InvalidState(format!(
                "run {} is {} and cannot become {}",
                self.run_id, self.status, to
            )));
        }
        self.status = to;
        self.updated_at = Timestamp::now();
        Ok(())
    }

    /// Moves one stage to `to`, stamping times and attempts, or says why it cannot.
    pub fn set_stage(&mut self, stage: Stage, to: StageStatus) -> Result<()> {
        let run_id = self.run_id.clone();
        let rec = self.stage_mut(stage);
        if !rec.status.may_become(to) {
            return Err(Error::InvalidState(format!(
                "stage {stage} of run {run_id} is {:?} and cannot become {to:?}",
                rec.status
            )));
        }
        let now = Timestamp::now();
        if to == StageStatus::Running {
            rec.attempts += 1;
            rec.started_at = Some(now);
            rec.finished_at = None;
        } else if to != StageStatus::Pending {
            rec.finished_at = Some(now);
        }
        rec.status = to;
        self.updated_at = now;
        self.waiting = None;
        Ok(())
    }

    /// Records a stage's outcome and clears its error.
    pub fn set_outcome(&mut self, stage: Stage, outcome: Value) {
        let rec = self.stage_mut(stage);
        rec.outcome = Some(outcome);
        rec.error = None;
    }

    /// Records a stage's last error.
    pub fn set_error(&mut self, stage: Stage, error: String) {
        self.stage_mut(stage).error = Some(error);
        self.updated_at = Timestamp::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> Run {
        Run::new(
            "r".into(),
            "e".into(),
            RunOptions::default(),
            Trigger::default(),
        )
    }

    #[test]
    fn stages_follow_pipeline_order() {
        assert_eq!(Stage::DetectMismatch.next(), Some(Stage::PurgeKeys));
        assert_eq!(Stage::ResetLink.next(), None);
        assert_eq!(Stage::parse("purge-keys").unwrap(), Stage::PurgeKeys);
        assert!(
            Stage::parse("purge")
                .unwrap_err()
                .to_string()
                .contains("clear-dataverse-configs")
        );
    }

    #[test]
    fn terminal_runs_cannot_restart_except_failed_reruns() {
        let mut r = run();
        r.set_status(RunStatus::Running).unwrap();
        r.set_status(RunStatus::Succeeded).unwrap();
        assert!(r.set_status(RunStatus::Running).is_err());
        let mut r = run();
        r.set_status(RunStatus::Refused).unwrap();
        assert!(r.set_status(RunStatus::Running).is_err());
        let mut r = run();
        r.set_status(RunStatus::Failed).unwrap();
        r.set_status(RunStatus::Running).unwrap();
    }

    #[test]
    fn stage_attempts_count_each_start() {
        let mut r = run();
        r.set_stage(Stage::PurgeKeys, StageStatus::Running).unwrap();
        r.set_stage(Stage::PurgeKeys, StageStatus::Running).unwrap();
        assert_eq!(r.stage(Stage::PurgeKeys).attempts, 2);
        r.set_stage(Stage::PurgeKeys, StageStatus::Succeeded)
            .unwrap();
        assert!(r.set_stage(Stage::PurgeKeys, StageStatus::Running).is_err());
        assert_eq!(r.next_stage(), Some(Stage::DetectMismatch));
    }
}
