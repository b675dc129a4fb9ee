//! The narrow interfaces the domain logic depends on. Each has real adapters in another crate
//! (`relink-dynamics`: the HTTP clients; `relink-aws`: DynamoDB, SQS, the table registry;
//! `relink-embedded`: SQLite, the in-process queue, process liveness) and can be replaced by an
//! in-memory one in unit tests.

use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Result;
use crate::event::StageEvent;
use crate::model::Run;

/// Who holds (or asks for) an environment's lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseOwner(pub String);

/// The lock row of an environment: which run holds it, and which worker is executing a stage
/// of that run (none between stages, while the next stage's event is in flight).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub environment_id: String,
    pub run_id: String,
    pub owner: Option<LeaseOwner>,
    pub lease_until: Timestamp,
}

/// One archived row: what a stage deleted, redacted of secrets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchivedRow {
    /// The table, e.g. `msdyn_dualwriteruntimeconfig` or `DualWriteProjectConfiguration`.
    pub table: String,
    /// The row's key (Dataverse id, F&O ProjectName).
    pub key: String,
    /// The row as read, with secret-bearing fields redacted.
    pub row: Value,
}

/// A queue message that could not be turned into work, kept so it is not lost silently.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    pub message_id: String,
    pub received_at: Timestamp,
    /// Why it was rejected (values from the body are elided).
    pub error: String,
    pub body_bytes: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

/// Durable run progress, locks and the archive. Every state-moving write is conditional.
#[async_trait]
pub trait ProgressStore: Send + Sync {
    /// Inserts a new run; [`crate::Error::Conflict`] if the run id exists.
    async fn create_run(&self, run: &Run) -> Result<()>;
    /// Reads a run by id.
    async fn get_run(&self, run_id: &str) -> Result<Option<Run>>;
    /// Reads a run by id, looking first where a run of `environment_id` would be (one read in
    /// the table when it is there). The run is returned whatever environment it belongs to, so
    /// the caller can refuse an event whose environment does not match its run.
    async fn find_run(&self, environment_id: &str, run_id: &str) -> Result<Option<Run>> {
        let _ = environment_id;
        self.get_run(run_id).await
    }
    /// Writes `run` if the stored version is still `run.version`; returns it with the new version.
    async fn update_run(&self, run: &Run) -> Result<Run>;
    /// The environment's newest run.
    async fn latest_run(&self, environment_id: &str) -> Result<Option<Run>>;
    /// Recent runs of every environment, newest first.
    async fn recent_runs(&self, limit: usize) -> Result<Vec<Run>>;
    /// Takes or renews the environment's lock for `owner` working on `run_id`. It is granted when
    /// the lock is free or lapsed, or held by the same run with the same owner or with no owner.
    /// Otherwise returns the current holder.
    async fn acquire_lock(
        &self,
        environment_id: &str,
        run_id: &str,
        owner: &LeaseOwner,
        lease: Duration,
    ) -> Result<Result<Lock, Lock>>;
    /// Keeps the environment for `run_id` but drops `owner`, for `grace` (between stages, or on
    /// behalf of a dead owner). Does nothing unless `owner` holds it for `run_id`.
    async fn handover_lock(
        &self,
        environment_id: &str,
        run_id: &str,
        owner: &LeaseOwner,
        grace: Duration,
    ) -> Result<()>;
    /// Reads the environment's lock, lapsed or not.
    async fn get_lock(&self, environment_id: &str) -> Result<Option<Lock>>;
    /// Frees the environment if `run_id` holds it (the run is finished or waits for an operator).
    async fn release_lock(&self, environment_id: &str, run_id: &str) -> Result<()>;
    /// Archives rows before they are deleted; archiving a row twice keeps one copy.
    async fn archive(&self, run_id: &str, environment_id: &str, rows: &[ArchivedRow])
    -> Result<()>;
    /// Every row archived by a run, one copy per row.
    async fn archived(&self, run_id: &str) -> Result<Vec<ArchivedRow>>;
    /// Notes on the run why a delivery was refused and what it waits for (`Run::waiting`),
    /// without changing its version: a worker that holds the run is never made to conflict.
    async fn note_waiting(&self, environment_id: &str, run_id: &str, note: &str) -> Result<()>;
    /// How many distinct rows of `table` a run has archived, across all its attempts.
    async fn archived_count(&self, run_id: &str, table: &str) -> Result<usize> {
        Ok(self
            .archived(run_id)
            .await?
            .iter()
            .filter(|r| r.table == table)
            .count())
    }
    /// Writes `run` (its stage just marked running) and takes the environment's lease for
    /// `owner`, in one step where the store can: the first thing a stage does. `expect` says what
    /// the write is conditioned on. The default takes the lease, then writes the run.
    async fn start_stage(
        &self,
        run: &Run,
        expect: &Expect,
        owner: &LeaseOwner,
        lease: Duration,
    ) -> Result<Started> {
        if let Err(held) = self
            .acquire_lock(&run.environment_id, &run.run_id, owner, lease)
            .await?
        {
            return Ok(Started::Held(held));
        }
        let written = match expect {
            Expect::New => self.create_run(run).await.map(|()| run.clone()),
            Expect::Stored { .. } => self.update_run(run).await,
        };
        match written {
            Ok(run) => Ok(Started::Ok(run)),
            Err(crate::Error::Conflict(_)) => {
                // Not started after all: free the worker slot, keep the environment for the run.
                self.handover_lock(&run.environment_id, &run.run_id, owner, lease)
                    .await?;
                Ok(Started::Stale)
            }
            Err(e) => Err(e),
        }
    }
    /// Records what a stage did (`run`, whose `version` is the stored one) and moves the
    /// environment's lock as `lock` says, in one step where the store can. The lock move is
    /// skipped when the lock is no longer the run's (it lapsed and another run took it).
    async fn finish_stage(&self, run: &Run, lock: &LockAfter) -> Result<Run> {
        let written = self.update_run(run).await?;
        match lock {
            LockAfter::Handover { owner, grace } => {
                self.handover_lock(&run.environment_id, &run.run_id, owner, *grace)
                    .await?
            }
            LockAfter::Release => self.release_lock(&run.environment_id, &run.run_id).await?,
        }
        Ok(written)
    }
    /// Whether [`Expect::Stored`]'s digests are checked by the store in the same write, so an
    /// event may carry the run and the registry entry in its `carried` field (DynamoDB: yes).
    fn checks_carried(&self) -> bool {
        false
    }
    /// Records that a restore signal (`source`, `operation_id`) starts `run_id`, once: returns
    /// the earlier claim when the signal was seen before.
    async fn claim_trigger(
        &self,
        source: &str,
        operation_id: &str,
        run_id: &str,
    ) -> Result<Result<(), Claimed>>;
    /// Marks a claim's first event as sent; a claim left unmarked (its claimant died before
    /// sending) is sent again by the next claimant of the signal.
    async fn mark_trigger_sent(&self, source: &str, operation_id: &str, run_id: &str)
    -> Result<()>;
    /// Undoes a claim of `run_id` whose event could not be sent, so the sender's retry can work.
    async fn release_trigger(&self, source: &str, operation_id: &str, run_id: &str) -> Result<()>;
    /// A named position (the restore watcher's "last seen" per environment and source).
    async fn get_cursor(&self, key: &str) -> Result<Option<String>>;
    /// Moves a named position.
    async fn put_cursor(&self, key: &str, value: &str) -> Result<()>;
    /// Records a rejected message (poison) so operators can see it.
    async fn record_rejected(&self, rejected: &Rejected) -> Result<()>;
    /// Recently rejected messages, newest first.
    async fn rejected(&self, limit: usize) -> Result<Vec<Rejected>>;
}

/// What [`ProgressStore::start_stage`] conditions its write on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The run does not exist yet.
    New,
    /// The stored run has the version the written one carries; when given, the stored body has
    /// SHA-256 `run_digest` (hex) and the environment's registry entry `entry_digest`, so state
    /// an event carried is used only when it is byte for byte what the store holds.
    Stored {
        run_digest: Option<String>,
        entry_digest: Option<String>,
    },
}

/// What [`ProgressStore::start_stage`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum Started {
    /// The run is written (with its new version) and the lease is `owner`'s.
    Ok(Run),
    /// Another holder has the environment; nothing was written.
    Held(Lock),
    /// The run (or the entry) is not what the caller expected; nothing was written: read again.
    Stale,
}

/// What [`ProgressStore::finish_stage`] does with the lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockAfter {
    /// Keeps the environment for the run but frees the worker slot, for `grace`.
    Handover { owner: LeaseOwner, grace: Duration },
    /// Frees the environment (the run is over or waits for a person).
    Release,
}

/// Where stage events go next (SQS in AWS, an in-process queue embedded).
#[async_trait]
pub trait StageQueue: Send + Sync {
    /// Enqueues the event for its stage.
    async fn send(&self, event: &StageEvent) -> Result<()>;
    /// Enqueues the event as a new message delivered after `delay` (at most 15 minutes): a wait
    /// that must not count against the receives of the message it replaces.
    async fn send_later(&self, event: &StageEvent, delay: std::time::Duration) -> Result<()> {
        let _ = delay;
        self.send(event).await
    }
    /// Lets a received message of `stage`'s queue come back after `delay` instead of after the
    /// queue's whole visibility timeout (a backoff between retries). Best effort.
    async fn retry_later(
        &self,
        stage: crate::model::Stage,
        receipt_handle: &str,
        delay: std::time::Duration,
    ) -> Result<()> {
        let _ = (stage, receipt_handle, delay);
        Ok(())
    }
}

/// An earlier claim of a restore signal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    /// The run the claim started.
    pub run_id: String,
    /// Whether the run's first event was sent (as far as the claimant could record).
    pub sent: bool,
}

/// A Dataverse organisation's identity (`RetrieveCurrentOrganization`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Organization {
    pub organization_id: String,
    pub unique_name: String,
    pub friendly_name: String,
    pub url_name: String,
    /// The Power Platform environment hosting this organisation (`Detail.EnvironmentId`), empty
    /// when the answer did not carry one.
    #[serde(default)]
    pub environment_id: String,
}

/// What the Power Platform API says about the environment hosting a Dataverse organisation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformEnvironment {
    /// The environment type (`Production`, `Sandbox`, `Developer`, `Trial`, ...), when given.
    pub environment_type: Option<String>,
    /// The F&O environment linked to it, when the answer names one.
    pub linked_fno_url: Option<String>,
}

/// Dataverse's record of its F&O link (`RetrieveFinanceAndOperationsIntegrationDetails`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FnoIntegration {
    pub url: String,
    pub tenant_id: Option<String>,
}

/// A table's entity set and key, resolved at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntitySet {
    pub name: String,
    pub primary_id: String,
}

/// One page of rows and the link to the next.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub rows: Vec<Value>,
    pub next_link: Option<String>,
}

/// What happened to each delete of a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows deleted by this batch.
    pub deleted: usize,
    /// Rows already gone (404): the goal is met.
    pub already_gone: usize,
    /// Keys that could not be deleted, with the reason.
    pub failed: Vec<(String, String)>,
}

/// The Dataverse Web API operations relink needs.
#[async_trait]
pub trait DataverseApi: Send + Sync {
    /// The organisation behind the URL.
    async fn current_organization(&self) -> Result<Organization>;
    /// The F&O environment this Dataverse is integrated with; `None` when the organisation does
    /// not expose the function or names no environment (400/404/empty `Url`).
    async fn fno_integration(&self) -> Result<Option<FnoIntegration>>;
    /// The Power Platform API's record of the environment `environment_id` (the organisation's
    /// `EnvironmentId`), read with the same app registration. `None` when no Power Platform API
    /// is configured for the entry or the app may not read it (401/403/404); transient failures
    /// are errors, so a guard never proceeds on a throttled answer.
    async fn platform_environment(
        &self,
        environment_id: &str,
    ) -> Result<Option<PlatformEnvironment>> {
        let _ = environment_id;
        Ok(None)
    }
    /// Resolves the runtime-config table's entity set; `None` when the table does not exist.
    async fn runtime_config_set(&self) -> Result<Option<EntitySet>>;
    /// The first page of runtime-config rows (`$select` of the archived columns).
    async fn first_page(&self, set: &EntitySet, page_size: usize) -> Result<Page>;
    /// Follows an `@odata.nextLink`.
    async fn next_page(&self, next_link: &str, page_size: usize) -> Result<Page>;
    /// How many runtime-config rows there are, without reading them: `(count, more)`, where
    /// `more` says the service stopped counting at `count` (Dataverse counts up to 5,000).
    async fn count_rows(&self, set: &EntitySet) -> Result<(usize, bool)> {
        let page = self.first_page(set, 5000).await?;
        Ok((page.rows.len(), page.next_link.is_some()))
    }
    /// Deletes rows by id in one `$batch`.
    async fn delete_batch(&self, set: &EntitySet, ids: &[String]) -> Result<BatchOutcome>;
    /// The client's pacing to the service protection limits, if it paces.
    fn pacer(&self) -> Option<&crate::pacing::Pacer> {
        None
    }
}

/// A table that only a customer-deployed F&O service can purge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceTable {
    DualWriteProjectFieldConfiguration,
    BusinessEventsDefinition,
}

impl ServiceTable {
    /// Both tables, in purge order.
    pub const ALL: [ServiceTable; 2] = [
        ServiceTable::DualWriteProjectFieldConfiguration,
        ServiceTable::BusinessEventsDefinition,
    ];
    /// The F&O table name.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceTable::DualWriteProjectFieldConfiguration => {
                "DualWriteProjectFieldConfiguration"
            }
            ServiceTable::BusinessEventsDefinition => "BusinessEventsDefinition",
        }
    }
}

/// The F&O OData operations relink needs.
#[async_trait]
pub trait FnoApi: Send + Sync {
    /// A page of `DualWriteProjectConfigurations` (cross-company), first or by next link; the
    /// rows carry every key property.
    async fn project_configs(&self, next_link: Option<&str>, page_size: usize) -> Result<Page>;
    /// The key properties of `DualWriteProjectConfiguration`, as the environment's `$metadata`
    /// declares them (e.g. `["dataAreaId", "ProjectName"]` where the entity is per company).
    async fn project_config_key(&self) -> Result<Vec<String>>;
    /// Deletes project configurations in one `$batch`, each addressed by its whole key: the
    /// OData key predicate without parentheses (`dataAreaId='usmf',ProjectName='Customers'`),
    /// as [`crate::stages::key_predicate`] writes it.
    async fn delete_project_configs(&self, keys: &[String]) -> Result<BatchOutcome>;
    /// Whether a custom purge service is configured for the other key tables.
    fn has_purge_service(&self) -> bool;
    /// Lists a table's rows through the purge service (each row has a `key`).
    async fn service_rows(&self, table: ServiceTable) -> Result<Vec<Value>>;
    /// Deletes a table's rows by key through the purge service.
    async fn service_delete(&self, table: ServiceTable, keys: &[String]) -> Result<BatchOutcome>;
}

/// An OAuth access token for a scope.
#[async_trait]
pub trait TokenSource: Send + Sync {
    /// A valid token for `scope`, from cache when it has time left.
    async fn token(&self, scope: &str) -> Result<String>;
    /// Forgets the cached token for `scope` (after a 401).
    async fn invalidate(&self, scope: &str);
}

/// What resetting the link produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetOutcome {
    /// The operator must reset by hand and confirm; the text says exactly how.
    AwaitConfirmation { instructions: String },
    /// The link was reset automatically.
    Done,
}

/// Builds the Dynamics clients of an environment (clients are cached by the implementation).
pub trait Connector: Send + Sync {
    /// The Dataverse client of `env`.
    fn dataverse(
        &self,
        env: &crate::registry::EnvConfig,
    ) -> Result<std::sync::Arc<dyn DataverseApi>>;
    /// The F&O client of `env`.
    fn fno(&self, env: &crate::registry::EnvConfig) -> Result<std::sync::Arc<dyn FnoApi>>;
    /// Where notices go (the same HTTP client and secrets); by default nowhere.
    fn notifier(&self) -> std::sync::Arc<dyn Notifier> {
        std::sync::Arc::new(NoNotifier)
    }
    /// The dual-write gateway client of `env` (`reset = { mode = "gateway" }`).
    fn gateway(
        &self,
        env: &crate::registry::EnvConfig,
    ) -> Result<std::sync::Arc<dyn DualWriteGateway>> {
        Err(crate::Error::Config(format!(
            "environment {}: this relink has no dual-write gateway client",
            env.id
        )))
    }
}

/// The link as the dual-write gateway describes it (its "connection set").
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayLink {
    /// The connection set's id (Reset, the map list) and name (its own URL).
    pub cid: String,
    pub cname: String,
    /// The URL of the F&O environment the link has (must be the registered one).
    pub fno_url: String,
    /// The Dataverse URL the link pointed at when read.
    pub dataverse_url: String,
    /// The body of a Reset: the link's Power Apps environment, its two environments and legal
    /// entities, as the F&O Dual-write page sends them.
    pub reset_payload: Value,
}

/// One table map as the gateway lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayMap {
    pub tid: String,
    pub pid: Option<String>,
    pub name: String,
    /// 1 stopped, 2 initial sync, 4 running, 5 paused, 6 not running (community knowledge).
    pub state: u8,
}

impl GatewayMap {
    /// Whether the map moves data (running, or in its initial sync): a Reset needs it stopped.
    pub fn runs(&self) -> bool {
        matches!(self.state, 2 | 4)
    }
}

/// Where a gateway request (a stop, a Reset) stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestState {
    Waiting,
    Completed,
    Failed(String),
}

/// The dual-write management gateway (unsupported; docs/dynamics.md): what a Reset without a
/// person needs. Every call authenticates as the signed-in user.
#[async_trait]
pub trait DualWriteGateway: Send + Sync {
    /// The link of the environment's F&O.
    async fn link(&self) -> Result<GatewayLink>;
    /// The table maps of the link.
    async fn maps(&self, link: &GatewayLink) -> Result<Vec<GatewayMap>>;
    /// Asks for `maps` to stop; the request id.
    async fn stop(&self, link: &GatewayLink, maps: &[GatewayMap]) -> Result<String>;
    /// Where a request stands.
    async fn request(&self, request_id: &str) -> Result<RequestState>;
    /// Asks for the Reset; the request id to poll, or `None` when the answer means it is done.
    async fn reset(&self, link: &GatewayLink, force: bool) -> Result<Option<String>>;
}

/// Resets the dual-write link (manual gate by default).
#[async_trait]
pub trait ResetDriver: Send + Sync {
    /// Starts (or describes) the reset.
    async fn reset(&self, env: &crate::registry::EnvConfig, run: &Run) -> Result<ResetOutcome>;
}

/// Where a handler reads the registry from (a file, the DynamoDB table).
#[async_trait]
pub trait RegistrySource: Send + Sync {
    /// Every entry (the watcher and notification ingest look entries up by other ids).
    async fn registry(&self) -> Result<std::sync::Arc<crate::registry::Registry>>;
    /// One environment's entry, as current as the source is at the time of the call; a stage
    /// handler reads only this. [`crate::Error::UnknownEnvironment`] when there is none.
    async fn entry(&self, environment_id: &str) -> Result<crate::registry::EnvConfig> {
        Ok(self.registry().await?.get(environment_id)?.clone())
    }
    /// The entry and its stored text, when the source keeps one (the table): a stage passes the
    /// text on to the next with its event, and the store checks it instead of it being read again.
    async fn entry_with_text(
        &self,
        environment_id: &str,
    ) -> Result<(crate::registry::EnvConfig, Option<String>)> {
        Ok((self.entry(environment_id).await?, None))
    }
}

/// A fixed registry (tests, workers with a file).
pub struct StaticRegistry(pub std::sync::Arc<crate::registry::Registry>);

#[async_trait]
impl RegistrySource for StaticRegistry {
    async fn registry(&self) -> Result<std::sync::Arc<crate::registry::Registry>> {
        Ok(self.0.clone())
    }
}

/// A registry file read once (embedded mode).
#[async_trait]
impl RegistrySource for crate::registry::Registry {
    async fn registry(&self) -> Result<std::sync::Arc<crate::registry::Registry>> {
        Ok(std::sync::Arc::new(self.clone()))
    }
    async fn entry(&self, environment_id: &str) -> Result<crate::registry::EnvConfig> {
        Ok(self.get(environment_id)?.clone())
    }
}

/// Reads the secrets a registry entry names (Secrets Manager in AWS, the process environment
/// embedded), when a client is about to use one: never before a stage calls Dynamics.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The current value of the secret `source` names.
    async fn secret(
        &self,
        source: &crate::registry::SecretSource,
    ) -> Result<crate::registry::Secret>;
    /// Replaces the value of the secret `source` names (a rotated refresh token); by default
    /// the store cannot be written.
    async fn put_secret(
        &self,
        source: &crate::registry::SecretSource,
        _value: &crate::registry::Secret,
    ) -> Result<()> {
        Err(crate::Error::Config(format!(
            "{source:?} cannot be written by relink"
        )))
    }
}

/// Posts notices to an environment's channels (`crate::notice`).
#[async_trait]
pub trait Notifier: Send + Sync {
    /// Sends `notice` to every channel `env` configures, retrying each a few times; what each
    /// answered. Never fails: a channel that does not take it is reported, not raised.
    async fn send(
        &self,
        env: &crate::registry::EnvConfig,
        notice: &crate::notice::Notice,
    ) -> Vec<crate::notice::Delivery>;
}

/// Sends nothing (no channel can be reached: tests, tools).
pub struct NoNotifier;

#[async_trait]
impl Notifier for NoNotifier {
    async fn send(
        &self,
        _: &crate::registry::EnvConfig,
        _: &crate::notice::Notice,
    ) -> Vec<crate::notice::Delivery> {
        Vec::new()
    }
}

/// Whether the holder of a lease is known to be dead, so its lease can be taken over at once
/// instead of waiting for it to lapse.
pub trait Liveness: Send + Sync {
    /// `Some(true)`: gone; `Some(false)`: alive; `None`: cannot tell (e.g. another host).
    fn is_gone(&self, owner: &LeaseOwner) -> Option<bool>;
}

/// Knows nothing about any owner: leases only end by lapsing (Lambda invocations).
pub struct LeasesOnly;

impl Liveness for LeasesOnly {
    fn is_gone(&self, _: &LeaseOwner) -> Option<bool> {
        None
    }
}
