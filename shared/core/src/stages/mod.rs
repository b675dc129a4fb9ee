//! The four stages and verification, one module each, with the guards and the purge engine they
//! share. They depend only on the ports; every stage that reads or deletes re-runs all the
//! guards first (identity, production by registry and platform, F&O pairing), archives each page before deleting it, and accepts empty
//! tables. Deleting re-reads the first page after each pass, so a stage interrupted half-way
//! resumes with exactly the rows still present: nothing is deleted twice.
//!
//! - `guards`: production (registry and platform), organisation identity, F&O pairing;
//! - `detect`: `detect-mismatch` (read-only inventory and decision);
//! - `purge`: `purge-keys` (the F&O key tables);
//! - `clear`: `clear-dataverse-configs` (Dual Write Runtime Configurations);
//! - `reset`: `reset-link` (the manual gate) and verification after the Reset;
//! - `engine`: paging, archiving and batched deleting of one table, for purge and clear.

mod clear;
mod detect;
mod engine;
mod gateway;
mod guards;
pub mod maps;
mod purge;
mod reset;

pub use clear::clear_configs;
pub use detect::{detect, inspect};
pub use guards::{GuardEvidence, guard_identity, guard_production, guard_target};
pub use purge::{key_predicate, purge_keys};
pub use reset::{ManualReset, manual_instructions, reset_link, verify};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Run, RunStatus, StageStatus};
use crate::ports::{DataverseApi, FnoApi, Organization, ProgressStore, ResetDriver};
use crate::progress::ProgressSink;
use crate::registry::EnvConfig;

/// Table names used in archives and progress.
pub const DATAVERSE_TABLE: &str = "msdyn_dualwriteruntimeconfig";
/// F&O table behind `DualWriteProjectConfigurations`.
pub const FNO_TABLE: &str = "DualWriteProjectConfiguration";
/// The runtime-config columns read (`$select`, besides the primary id) and archived.
pub const DATAVERSE_COLUMNS: [&str; 3] = ["msdyn_name", "createdon", "modifiedon"];
/// The F&O project-configuration columns read (`$select`) and archived.
pub const FNO_COLUMNS: [&str; 6] = [
    "ProjectName",
    "ExternalEnvironmentUrl",
    "InternalEntityName",
    "ExternalEntityName",
    "Status",
    "IsDelete",
];

/// What a stage needs: the environment, the run and the ports.
pub struct StageCtx<'a> {
    pub env: &'a EnvConfig,
    pub run: &'a Run,
    pub store: &'a dyn ProgressStore,
    pub dataverse: &'a dyn DataverseApi,
    pub fno: &'a dyn FnoApi,
    pub reset: &'a dyn ResetDriver,
    /// The dual-write gateway, for `reset-link` in gateway mode.
    pub gateway: Option<&'a dyn crate::ports::DualWriteGateway>,
    pub sink: &'a dyn ProgressSink,
    /// When a stage that can run long stops sending work, drains what is in flight and hands
    /// over to a new invocation ([`Then::Again`]); `None` runs to the end (embedded mode).
    pub stop_at: Option<jiff::Timestamp>,
}

/// How the run goes on after a stage.
#[derive(Clone, Debug, PartialEq)]
pub enum Then {
    /// Send the next stage's event.
    Continue,
    /// The run ends with this status.
    Finish(RunStatus),
    /// The run waits for an operator; the text says what to do.
    Await(String),
    /// The stage stopped before the invocation's deadline with work left: its progress is
    /// recorded and its event sent again, so a new invocation (fresh time, fresh receive count)
    /// goes on from what is left.
    Again,
}

/// A stage's result.
#[derive(Clone, Debug, PartialEq)]
pub struct StageReport {
    pub status: StageStatus,
    pub outcome: Value,
    pub then: Then,
    /// One line for humans.
    pub summary: String,
    /// A problem to record on the stage although the run goes on (failed verification).
    pub error: Option<String>,
}

/// What detection found, read-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Findings {
    pub organization: Organization,
    /// The guards that ran and their evidence (identity, platform type, F&O pairing).
    pub guards: GuardEvidence,
    pub fno_project_configs: usize,
    pub fno_pointing_elsewhere: usize,
    pub fno_pointing_here: usize,
    pub other_dataverse_urls: Vec<String>,
    pub dataverse_runtime_configs: usize,
    /// The service stopped counting at `dataverse_runtime_configs` (there are more).
    #[serde(default)]
    pub dataverse_count_capped: bool,
    pub stale: bool,
    pub reason: String,
    /// Every map with a project configuration (before the purge: the maps that ran).
    #[serde(default)]
    pub maps: maps::Maps,
    /// The maps running towards this Dataverse.
    #[serde(default)]
    pub maps_running_here: maps::Maps,
}
