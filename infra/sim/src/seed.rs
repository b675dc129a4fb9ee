//! The simulators' public knobs: what can be seeded (apps, organisations, F&O environments,
//! LCS history, Power Platform operations), the injectable faults, Dataverse's protection limits,
//! and what tests can read back (request log, snapshot).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// An app registration the token endpoint accepts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSeed {
    pub client_id: String,
    pub client_secret: String,
}

/// A Dataverse organisation to create (replacing one of the same name).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgSeed {
    /// Path segment: the organisation is served at `{base}/dataverse/{name}`.
    pub name: String,
    pub unique_name: String,
    #[serde(default)]
    pub organization_id: Option<uuid::Uuid>,
    #[serde(default)]
    pub friendly_name: Option<String>,
    /// Name of the simulated F&O environment this organisation reports it is integrated with.
    #[serde(default)]
    pub integrated_fno: Option<String>,
    /// Rows of `msdyn_dualwriteruntimeconfig` to create.
    #[serde(default)]
    pub runtime_configs: usize,
    /// The Power Platform environment hosting the organisation, as the Power Platform API
    /// describes it; without one the API answers 404 for its `EnvironmentId`.
    #[serde(default)]
    pub platform: Option<PlatformSeed>,
}

/// A Power Platform environment record (served at
/// `{base}/powerplatform/environmentmanagement/environments/{EnvironmentId}`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformSeed {
    /// `Production`, `Sandbox`, `Developer`, `Trial`, ...
    pub environment_type: String,
    /// Name of the simulated F&O environment the record says is linked, if any.
    #[serde(default)]
    pub linked_fno: Option<String>,
    /// Serve the admin API's shape (`properties.environmentSku`, `properties.linkedAppMetadata`)
    /// instead of the top-level `type` / `linkedFinOpsMetadata`.
    #[serde(default)]
    pub admin_shape: bool,
}

/// An F&O environment to create (replacing one of the same name).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FnoSeed {
    /// Path segment: the environment is served at `{base}/fno/{name}`.
    pub name: String,
    /// The organisation a Reset links this environment to.
    pub linked_organization: String,
    /// The organisation the seeded project configurations point at (the stale link); default: linked.
    #[serde(default)]
    pub points_at: Option<String>,
    #[serde(default)]
    pub project_configs: usize,
    #[serde(default)]
    pub field_configs: usize,
    #[serde(default)]
    pub business_events: usize,
    /// Path of the customer purge service, e.g. `/api/services/RelinkServices/RelinkPurgeService/purge`.
    #[serde(default)]
    pub purge_service_path: Option<String>,
    /// Project configurations the simulated Reset recreates (default 3).
    #[serde(default)]
    pub reset_project_configs: Option<usize>,
    /// The entity is per company: its key is (`dataAreaId`, `ProjectName`), each project exists
    /// in two companies, and a delete by `ProjectName` alone reaches the default company's row
    /// only. Default: keyed by `ProjectName`.
    #[serde(default)]
    pub per_company_key: bool,
    /// Next links page with `$skip=N` instead of `$skiptoken`.
    #[serde(default)]
    pub skip_paging: bool,
    /// An empty page carrying a next link comes before every page after the first.
    #[serde(default)]
    pub empty_pages: bool,
}

/// LCS environment history entries of one project environment, newest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LcsHistorySeed {
    pub project_id: String,
    pub environment_id: String,
    /// Entries in LCS's shape (`Name`, `Type`, `Status`, `ActivityId`, `EndDateTimeUtc`, ...).
    pub entries: Vec<Value>,
}

/// Power Platform operations of one environment, in the documented shape (`operationId`, `name`,
/// `status`, `startTime`, `endTime`), served two to a page with a `continuationToken`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerPlatformSeed {
    pub environment_id: String,
    pub operations: Vec<Value>,
}

/// Seed data; each list replaces objects of the same name.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    #[serde(default)]
    pub apps: Vec<AppSeed>,
    #[serde(default)]
    pub organizations: Vec<OrgSeed>,
    #[serde(default)]
    pub fno_environments: Vec<FnoSeed>,
    /// Bearer tokens LCS accepts (LCS takes delegated user tokens, which the simulator does not mint).
    #[serde(default)]
    pub lcs_tokens: Vec<String>,
    #[serde(default)]
    pub lcs_history: Vec<LcsHistorySeed>,
    #[serde(default)]
    pub power_platform: Vec<PowerPlatformSeed>,
    /// Public client ids (no secret) that may sign a user in with the device-code flow; the
    /// simulated user approves each sign-in after `Faults::device_pending_polls` polls.
    #[serde(default)]
    pub public_clients: Vec<String>,
}

/// Dataverse's service protection limits (per client, per organisation, sliding window).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Protection {
    pub requests: usize,
    pub execution_ms: u64,
    pub window_ms: u64,
    pub concurrent: usize,
}

impl Default for Protection {
    /// Dataverse's documented limits: 6,000 requests and 1,200 s per 300 s, 52 concurrent.
    fn default() -> Self {
        Protection {
            requests: 6000,
            execution_ms: 1_200_000,
            window_ms: 300_000,
            concurrent: 52,
        }
    }
}

impl Protection {
    /// The documented limits with the window (and the budgets in it) shrunk by `factor`.
    pub fn scaled(factor: u64) -> Protection {
        let d = Protection::default();
        let f = factor.max(1);
        Protection {
            requests: (d.requests as u64 / f).max(1) as usize,
            execution_ms: d.execution_ms / f,
            window_ms: d.window_ms / f,
            concurrent: d.concurrent,
        }
    }
}

/// Injected faults. Latency, 429 and 5xx rates apply to Dataverse, F&O, LCS and Power Platform
/// requests (not the token endpoint); the `lcs_*` knobs to LCS only.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Added to every Dataverse / F&O request.
    pub latency_ms: u64,
    /// Added per operation inside a `$batch` (and per single delete); counts as execution time.
    pub per_op_latency_ms: u64,
    /// Fraction of requests answered 429 (every simulated service but the token endpoint).
    pub rate_429: f64,
    /// `Retry-After` seconds on injected 429s.
    pub retry_after_secs: u64,
    /// Fraction of requests answered 503.
    pub rate_5xx: f64,
    /// Service protection limits on Dataverse, if enforced.
    pub protection: Option<Protection>,
    /// Lifetime of issued tokens.
    pub token_lifetime_secs: u64,
    /// Seed for the fault dice, for reproducible runs (random when absent).
    pub rng_seed: Option<u64>,
    /// The next N LCS requests are answered 429 with `Retry-After: 1`.
    pub lcs_throttle_next: u32,
    /// LCS answers `IsSuccess: false` (an outage of the source).
    pub lcs_failing: bool,
    /// Bursts of 5xx: after every `burst_5xx_every` Dataverse / F&O requests answered, the next
    /// `burst_5xx_len` are answered 503 (0: no bursts).
    pub burst_5xx_every: u32,
    pub burst_5xx_len: u32,
    /// The token endpoint answers 503 `temporarily_unavailable` for this long after the faults are set.
    pub token_outage_ms: u64,
    /// Tokens stop being accepted this many seconds after issue, whatever `expires_in` said (a
    /// token that expires or is revoked mid-run).
    pub tokens_revoked_after_secs: Option<u64>,
    /// The next Dataverse `$batch` of more operations than this applies only its first this-many
    /// operations and then never answers (a crash in the middle of a delete batch). One-shot.
    pub stall_batch_after_ops: Option<usize>,
    /// While true, Dataverse `$batch` requests wait, unapplied and unanswered (a test holds a
    /// stage in the middle of its deletes to order other events around it, instead of racing).
    pub hold_batches: bool,
    /// Dataverse deletes of this many rows (the first ones asked for) answer 204, and the rows
    /// stay: rows that never go away.
    pub ghost_rows: usize,
    /// The Power Platform operations list answers every page with the same continuation token
    /// (paging that never ends).
    pub pp_repeat_token: bool,
    /// Device-code sign-in: polls answered `authorization_pending` before the user is done.
    pub device_pending_polls: u32,
    /// The first poll of each device code is answered `slow_down`.
    pub device_slow_down: bool,
    /// Device codes have expired: every poll is answered `expired_token`.
    pub device_expired: bool,
    /// The polling interval the device-code endpoint asks for, in seconds.
    pub device_interval_secs: u64,
    /// Refresh tokens are revoked: redeeming one is answered `invalid_grant` (AADSTS50173).
    pub refresh_revoked: bool,
    /// A refresh token can be redeemed once: a caller that does not keep the rotated one loses
    /// the sign-in (Entra keeps old ones valid a while; this is the strict reading).
    pub refresh_single_use: bool,
    /// Gateway: how long a stop request takes.
    pub gateway_stop_ms: u64,
    /// Gateway: stop requests never complete.
    pub gateway_stop_never: bool,
    /// Gateway: how long a Reset takes.
    pub gateway_reset_ms: u64,
    /// Gateway: a Reset ends in error and the link is not rebuilt.
    pub gateway_reset_fails: bool,
    /// Gateway: a Reset answers 200 once done instead of 202 with a request id to poll.
    pub gateway_reset_sync: bool,
    /// Gateway: the next N requests are answered 429 with `Retry-After: 1`.
    pub gateway_throttle_next: u32,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency_ms: 0,
            per_op_latency_ms: 0,
            rate_429: 0.0,
            retry_after_secs: 1,
            rate_5xx: 0.0,
            protection: None,
            token_lifetime_secs: 3599,
            rng_seed: None,
            lcs_throttle_next: 0,
            lcs_failing: false,
            burst_5xx_every: 0,
            burst_5xx_len: 0,
            token_outage_ms: 0,
            tokens_revoked_after_secs: None,
            stall_batch_after_ops: None,
            hold_batches: false,
            ghost_rows: 0,
            pp_repeat_token: false,
            device_pending_polls: 1,
            device_slow_down: false,
            device_expired: false,
            device_interval_secs: 1,
            refresh_revoked: false,
            refresh_single_use: false,
            gateway_stop_ms: 300,
            gateway_stop_never: false,
            gateway_reset_ms: 500,
            gateway_reset_fails: false,
            gateway_reset_sync: false,
            gateway_throttle_next: 0,
        }
    }
}

/// One request as the simulator saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogEntry {
    /// Milliseconds since the simulator started, at arrival.
    pub at_ms: f64,
    pub service: String,
    pub method: String,
    pub path: String,
    /// Identifies "the same request" across retries (method, path, batch targets).
    pub fingerprint: String,
    pub status: u16,
    pub retry_after_secs: Option<u64>,
    /// Operations in a `$batch` (1 otherwise).
    pub ops: usize,
}

/// Counters and table sizes, for tests and `GET /_sim/state`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub runtime_configs: BTreeMap<String, usize>,
    pub project_configs: BTreeMap<String, usize>,
    pub field_configs: BTreeMap<String, usize>,
    pub business_events: BTreeMap<String, usize>,
    pub requests: usize,
    pub token_requests: usize,
    pub batch_requests: BTreeMap<String, usize>,
    pub page_reads: BTreeMap<String, usize>,
    pub single_deletes: usize,
    pub throttled: usize,
    pub server_errors: usize,
    /// Rows deleted, by `{service}/{container}`.
    pub deleted: BTreeMap<String, usize>,
    /// Keys that received more than one delete operation.
    pub deleted_twice: Vec<String>,
    /// Largest number of requests in flight at once.
    pub max_in_flight: usize,
    /// Requests answered 401 (missing, expired, revoked or wrong-audience tokens).
    pub unauthorized: usize,
    /// Token requests answered 503 during an injected outage.
    pub token_outage_answers: usize,
    /// `$batch` requests stalled part-way by `stall_batch_after_ops`.
    pub stalled_batches: usize,
    /// `$batch` requests that waited while `hold_batches` was set.
    pub held_batches: usize,
    /// Token requests refused because the client secret was not the app's.
    pub wrong_secrets: usize,
    /// Device-code token polls answered.
    pub device_polls: usize,
    /// Refresh tokens redeemed.
    pub refresh_redeemed: usize,
    /// Gateway stop requests received.
    pub gateway_stops: usize,
    /// Gateway Reset requests received (a second one for a run is what relink must never send).
    pub gateway_resets: usize,
}
