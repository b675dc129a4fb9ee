//! The four stages and verification. They depend only on the ports; every destructive stage
//! re-confirms the Dataverse organisation's identity first, archives each page before deleting
//! it, and accepts empty tables. Deleting re-reads the first page after each pass, so a stage
//! interrupted half-way resumes with exactly the rows still present: nothing is deleted twice.

use std::collections::{HashMap, VecDeque};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::model::{Run, RunStatus, StageStatus};
use crate::ports::{
    ArchivedRow, BatchOutcome, DataverseApi, FnoApi, Organization, Page, ProgressStore,
    ResetDriver, ResetOutcome, ServiceTable,
};
use crate::progress::{Progress, ProgressSink};
use crate::registry::{EnvConfig, EnvKind};

/// Table names used in archives and progress.
pub const DATAVERSE_TABLE: &str = "msdyn_dualwriteruntimeconfig";
/// F&O table behind `DualWriteProjectConfigurations`.
pub const FNO_TABLE: &str = "DualWriteProjectConfiguration";

/// A row that keeps failing to delete ends the stage after this many passes.
const MAX_FAILURES_PER_ROW: u32 = 3;
/// Passes that delete nothing before the stage gives up rather than spin.
const MAX_IDLE_PASSES: u32 = 3;
/// Most distinct foreign Dataverse URLs listed in findings.
const MAX_LISTED_URLS: usize = 5;

/// What a stage needs: the environment, the run and the ports.
pub struct StageCtx<'a> {
    pub env: &'a EnvConfig,
    pub run: &'a Run,
    pub store: &'a dyn ProgressStore,
    pub dataverse: &'a dyn DataverseApi,
    pub fno: &'a dyn FnoApi,
    pub reset: &'a dyn ResetDriver,
    pub sink: &'a dyn ProgressSink,
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
    /// The F&O URL Dataverse says it is integrated with, when it says.
    pub fno_integration_url: Option<String>,
    pub fno_project_configs: usize,
    pub fno_pointing_elsewhere: usize,
    pub fno_pointing_here: usize,
    pub other_dataverse_urls: Vec<String>,
    pub dataverse_runtime_configs: usize,
    pub stale: bool,
    pub reason: String,
}

/// Refuses a production environment unless the registry allows it.
pub fn guard_production(env: &EnvConfig) -> Result<()> {
    if env.kind == EnvKind::Production && !env.allow_production {
        return Err(Error::Refused(format!(
            "environment `{}` is kind = \"production\"; relink deletes dual-write keys in production only when its registry entry sets allow_production = true",
            env.id
        )));
    }
    Ok(())
}

/// Confirms the Dataverse behind `dataverse_url` is the registered organisation.
pub async fn guard_identity(env: &EnvConfig, dv: &dyn DataverseApi) -> Result<Organization> {
    let org = dv.current_organization().await?;
    let name_ok = org
        .unique_name
        .eq_ignore_ascii_case(&env.dataverse_unique_name);
    let id_ok = env.dataverse_organization_id.is_none_or(|want| {
        uuid::Uuid::parse_str(&org.organization_id).is_ok_and(|got| got == want)
    });
    if !name_ok || !id_ok {
        return Err(Error::Refused(format!(
            "the Dataverse at {} is organisation {} ({}), but the registry expects {}{}; nothing was deleted. Check dataverse_url and dataverse_unique_name for `{}`",
            env.dataverse_url,
            org.unique_name,
            org.organization_id,
            env.dataverse_unique_name,
            env.dataverse_organization_id
                .map(|id| format!(" ({id})"))
                .unwrap_or_default(),
            env.id
        )));
    }
    Ok(org)
}

/// Normalises an environment URL for comparison: lower-case, no trailing slash.
fn norm_url(u: &str) -> String {
    u.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Reads both sides and decides whether the link is stale. Deletes nothing.
pub async fn inspect(
    env: &EnvConfig,
    dv: &dyn DataverseApi,
    fno: &dyn FnoApi,
    sink: &dyn ProgressSink,
) -> Result<Findings> {
    let organization = guard_identity(env, dv).await?;
    let integration = dv.fno_integration().await?;
    if let Some(i) = &integration {
        let integrated = url::Url::parse(&i.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        if integrated.as_deref()
            != env
                .fno_url
                .host_str()
                .map(str::to_ascii_lowercase)
                .as_deref()
        {
            return Err(Error::Refused(format!(
                "Dataverse {} reports it is integrated with F&O {}, not {}; fix the Power Platform integration in LCS before relinking",
                organization.unique_name, i.url, env.fno_url
            )));
        }
    }
    let here = norm_url(env.dataverse_url.as_str());
    let (mut total, mut elsewhere, mut pointing_here) = (0, 0, 0);
    let mut others: Vec<String> = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = fno
            .project_configs(next.as_deref(), env.limits.fno_page_size)
            .await?;
        for row in &page.rows {
            total += 1;
            let url = row
                .get("ExternalEnvironmentUrl")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if norm_url(url) == here {
                pointing_here += 1;
            } else {
                elsewhere += 1;
                let u = norm_url(url);
                if !u.is_empty() && others.len() < MAX_LISTED_URLS && !others.contains(&u) {
                    others.push(u);
                }
            }
        }
        sink.emit(Progress::Found {
            table: FNO_TABLE,
            rows: total,
        });
        match page.next_link {
            Some(n) => next = Some(n),
            None => break,
        }
    }
    let dv_rows = count_dataverse(env, dv, sink).await?;
    let (stale, reason) = if elsewhere > 0 {
        (
            true,
            format!(
                "{elsewhere} of {total} F&O dual-write project configurations point at another Dataverse ({})",
                others.join(", ")
            ),
        )
    } else if total == 0 && dv_rows > 0 {
        (
            true,
            format!(
                "F&O has no dual-write project configuration but Dataverse holds {dv_rows} runtime configurations from an earlier link"
            ),
        )
    } else {
        (
            false,
            format!(
                "{total} F&O project configurations all point at {here}; {dv_rows} Dataverse runtime configurations"
            ),
        )
    };
    Ok(Findings {
        organization,
        fno_integration_url: integration.map(|i| i.url),
        fno_project_configs: total,
        fno_pointing_elsewhere: elsewhere,
        fno_pointing_here: pointing_here,
        other_dataverse_urls: others,
        dataverse_runtime_configs: dv_rows,
        stale,
        reason,
    })
}

async fn count_dataverse(
    env: &EnvConfig,
    dv: &dyn DataverseApi,
    sink: &dyn ProgressSink,
) -> Result<usize> {
    let Some(set) = dv.runtime_config_set().await? else {
        return Ok(0);
    };
    let size = env.limits.dataverse_page_size;
    let mut page = dv.first_page(&set, size).await?;
    let mut n = page.rows.len();
    while let Some(link) = page.next_link.take() {
        sink.emit(Progress::Found {
            table: DATAVERSE_TABLE,
            rows: n,
        });
        page = dv.next_page(&link, size).await?;
        n += page.rows.len();
    }
    sink.emit(Progress::Found {
        table: DATAVERSE_TABLE,
        rows: n,
    });
    Ok(n)
}

/// Stage `detect-mismatch`: guards, inventory, decision. Deletes nothing.
pub async fn detect(ctx: &StageCtx<'_>) -> Result<StageReport> {
    let f = inspect(ctx.env, ctx.dataverse, ctx.fno, ctx.sink).await?;
    let outcome = serde_json::to_value(&f).expect("findings serialise");
    if !f.stale && !ctx.run.options.force {
        return Ok(StageReport {
            status: StageStatus::Skipped,
            outcome,
            then: Then::Finish(RunStatus::Skipped),
            summary: format!("link is clean: {}", f.reason),
            error: None,
        });
    }
    let summary = if f.stale {
        format!("stale link: {}", f.reason)
    } else {
        format!(
            "link looks clean, going on because of --force: {}",
            f.reason
        )
    };
    Ok(StageReport {
        status: StageStatus::Succeeded,
        outcome,
        then: Then::Continue,
        summary,
        error: None,
    })
}

/// Running totals of one table's purge.
#[derive(Default)]
struct Tally {
    found: usize,
    deleted: usize,
    already_gone: usize,
    batches: usize,
}

impl Tally {
    fn outcome(&self, dry_run: bool) -> Value {
        if dry_run {
            json!({"would_delete": self.found})
        } else {
            json!({"deleted": self.deleted, "already_gone": self.already_gone, "archived": self.found, "batches": self.batches})
        }
    }
}

/// A table whose rows a stage deletes: pages of what is left, and batched deletes.
#[async_trait::async_trait]
trait Purgeable: Send + Sync {
    /// The table name for archives and progress.
    fn table(&self) -> &'static str;
    /// The field of a row that holds its key.
    fn key_field(&self) -> &str;
    /// The first page of the rows still present.
    async fn first_page(&self) -> Result<Page>;
    /// The page after one whose `next_link` this is.
    async fn next_page(&self, link: &str) -> Result<Page>;
    /// Deletes rows by key in one request.
    async fn delete(&self, keys: &[String]) -> Result<BatchOutcome>;
    /// Deletes to send in the next request, at most `configured`.
    fn batch_size(&self, configured: usize) -> usize {
        configured
    }
    /// Requests to keep in flight, at most `configured`.
    fn concurrency(&self, configured: usize) -> usize {
        configured
    }
}

struct DataverseRows<'a> {
    dv: &'a dyn DataverseApi,
    set: crate::ports::EntitySet,
    page_size: usize,
}

#[async_trait::async_trait]
impl Purgeable for DataverseRows<'_> {
    fn table(&self) -> &'static str {
        DATAVERSE_TABLE
    }
    fn key_field(&self) -> &str {
        &self.set.primary_id
    }
    async fn first_page(&self) -> Result<Page> {
        self.dv.first_page(&self.set, self.page_size).await
    }
    async fn next_page(&self, link: &str) -> Result<Page> {
        self.dv.next_page(link, self.page_size).await
    }
    async fn delete(&self, keys: &[String]) -> Result<BatchOutcome> {
        self.dv.delete_batch(&self.set, keys).await
    }
    fn batch_size(&self, configured: usize) -> usize {
        self.dv
            .pacer()
            .map_or(configured, |p| p.batch_size(configured))
    }
    fn concurrency(&self, configured: usize) -> usize {
        self.dv
            .pacer()
            .map_or(configured, |p| p.concurrency(configured))
    }
}

struct ProjectConfigs<'a> {
    fno: &'a dyn FnoApi,
    page_size: usize,
}

#[async_trait::async_trait]
impl Purgeable for ProjectConfigs<'_> {
    fn table(&self) -> &'static str {
        FNO_TABLE
    }
    fn key_field(&self) -> &str {
        "ProjectName"
    }
    async fn first_page(&self) -> Result<Page> {
        self.fno.project_configs(None, self.page_size).await
    }
    async fn next_page(&self, link: &str) -> Result<Page> {
        self.fno.project_configs(Some(link), self.page_size).await
    }
    async fn delete(&self, keys: &[String]) -> Result<BatchOutcome> {
        self.fno.delete_project_configs(keys).await
    }
}

struct ServiceRows<'a> {
    fno: &'a dyn FnoApi,
    table: ServiceTable,
}

#[async_trait::async_trait]
impl Purgeable for ServiceRows<'_> {
    fn table(&self) -> &'static str {
        self.table.as_str()
    }
    fn key_field(&self) -> &str {
        "key"
    }
    async fn first_page(&self) -> Result<Page> {
        Ok(Page {
            rows: self.fno.service_rows(self.table).await?,
            next_link: None,
        })
    }
    async fn next_page(&self, _link: &str) -> Result<Page> {
        unreachable!("the purge service answers in one page")
    }
    async fn delete(&self, keys: &[String]) -> Result<BatchOutcome> {
        self.fno.service_delete(self.table, keys).await
    }
}

/// Deletes every row of a table. One pass follows the pages from the first: each page is
/// archived as it arrives, then its keys go out in batches, keeping up to `concurrency` batch
/// requests in flight across page boundaries; the next page is read and archived while
/// batches run (paging links are key-based, so deleting rows already read does not move
/// them). Batch size and concurrency come from the table's pacing (Dataverse: DOP hint, time per
/// delete). Passes repeat until the first page comes back empty; rows that keep failing stop
/// the stage.
async fn purge_pages<'a>(
    ctx: &'a StageCtx<'a>,
    rows_of: &'a dyn Purgeable,
    batch_size: usize,
    concurrency: usize,
) -> Result<Tally> {
    enum Done {
        Batch(Result<BatchOutcome>),
        Page(Result<(Vec<String>, Option<String>)>),
    }
    type Work<'w> = std::pin::Pin<Box<dyn Future<Output = Done> + Send + 'w>>;

    let table = rows_of.table();
    let mut tally = Tally::default();
    let mut failures: HashMap<String, u32> = HashMap::new();
    let mut idle = 0;
    loop {
        let first = rows_of.first_page().await?;
        if first.rows.is_empty() {
            return Ok(tally);
        }
        let mut next_link = first.next_link;
        let mut queue: VecDeque<String> = archive_page(ctx, rows_of, first.rows).await?.into();
        tally.archived(ctx, table, queue.len());
        let mut work: FuturesUnordered<Work<'a>> = FuturesUnordered::new();
        let (mut batches, mut reading) = (0, false);
        let mut pass_deleted = 0;
        let mut first_error = None;
        loop {
            if first_error.is_none() {
                let batch = rows_of.batch_size(batch_size).max(1);
                let slots = rows_of.concurrency(concurrency);
                // Read ahead once what is queued no longer fills every slot.
                if !reading
                    && queue.len() < slots * batch
                    && let Some(link) = next_link.take()
                {
                    reading = true;
                    work.push(Box::pin(async move {
                        Done::Page(
                            async {
                                let page = rows_of.next_page(&link).await?;
                                let keys = archive_page(ctx, rows_of, page.rows).await?;
                                Ok((keys, page.next_link))
                            }
                            .await,
                        )
                    }));
                }
                while batches < slots && !queue.is_empty() {
                    let n = batch.min(queue.len());
                    let chunk: Vec<String> = queue.drain(..n).collect();
                    batches += 1;
                    work.push(Box::pin(async move {
                        Done::Batch(rows_of.delete(&chunk).await)
                    }));
                }
            }
            let Some(done) = work.next().await else {
                break;
            };
            match done {
                Done::Page(Ok((keys, link))) => {
                    reading = false;
                    tally.archived(ctx, table, keys.len());
                    queue.extend(keys);
                    next_link = link;
                }
                Done::Page(Err(e)) => {
                    reading = false;
                    first_error.get_or_insert(e);
                }
                Done::Batch(Ok(o)) => {
                    batches -= 1;
                    tally.batches += 1;
                    tally.deleted += o.deleted;
                    tally.already_gone += o.already_gone;
                    pass_deleted += o.deleted + o.already_gone;
                    for (key, why) in o.failed {
                        let n = failures.entry(key.clone()).or_default();
                        *n += 1;
                        if *n >= MAX_FAILURES_PER_ROW && first_error.is_none() {
                            first_error = Some(Error::Unavailable {
                                service: if table == DATAVERSE_TABLE {
                                    "Dataverse"
                                } else {
                                    "F&O"
                                },
                                attempts: *n,
                                detail: format!("row {key} of {table} could not be deleted: {why}"),
                                retry_after: None,
                            });
                        }
                    }
                    ctx.sink.emit(Progress::Deleted {
                        table,
                        rows: tally.deleted + tally.already_gone,
                    });
                }
                Done::Batch(Err(e)) => {
                    batches -= 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        idle = if pass_deleted == 0 { idle + 1 } else { 0 };
        if idle >= MAX_IDLE_PASSES {
            return Err(Error::Protocol {
                service: "OData",
                detail: format!(
                    "{table} still lists rows that its deletes report as gone; try again later"
                ),
            });
        }
    }
}

impl Tally {
    /// Counts rows archived and says so.
    fn archived(&mut self, ctx: &StageCtx<'_>, table: &'static str, rows: usize) {
        self.found += rows;
        ctx.sink.emit(Progress::Archived {
            table,
            rows: self.found,
        });
    }
}

/// Archives a page (redacted) and returns its keys, in order.
async fn archive_page(
    ctx: &StageCtx<'_>,
    rows_of: &dyn Purgeable,
    rows: Vec<Value>,
) -> Result<Vec<String>> {
    let table = rows_of.table();
    let key_field = rows_of.key_field();
    let mut keys = Vec::with_capacity(rows.len());
    let mut archived = Vec::with_capacity(rows.len());
    for row in &rows {
        let key = row
            .get(key_field)
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Protocol {
                service: "OData",
                detail: format!("{table} row without a string `{key_field}`"),
            })?
            .to_string();
        archived.push(ArchivedRow {
            table: table.to_string(),
            key: key.clone(),
            row: crate::redact::redact_row(row),
        });
        keys.push(key);
    }
    drop(rows);
    if !archived.is_empty() {
        ctx.store
            .archive(&ctx.run.run_id, &ctx.env.id, &archived)
            .await?;
    }
    Ok(keys)
}

/// Stage `purge-keys`: F&O key tables (OData, then the optional purge service). Archives first.
pub async fn purge_keys(ctx: &StageCtx<'_>) -> Result<StageReport> {
    guard_identity(ctx.env, ctx.dataverse).await?;
    let dry = ctx.run.options.dry_run;
    let limits = ctx.env.limits;
    let mut outcome = serde_json::Map::new();
    let configs = if dry {
        let mut page = ctx.fno.project_configs(None, limits.fno_page_size).await?;
        let mut found = page.rows.len();
        while let Some(link) = page.next_link.take() {
            page = ctx
                .fno
                .project_configs(Some(&link), limits.fno_page_size)
                .await?;
            found += page.rows.len();
        }
        Tally {
            found,
            ..Tally::default()
        }
    } else {
        purge_pages(
            ctx,
            &ProjectConfigs {
                fno: ctx.fno,
                page_size: limits.fno_page_size,
            },
            limits.fno_batch_size,
            1,
        )
        .await?
    };
    outcome.insert(FNO_TABLE.into(), configs.outcome(dry));
    let mut summary = format!(
        "{FNO_TABLE}: {} {}",
        configs.found,
        if dry { "would be deleted" } else { "deleted" }
    );
    for table in ServiceTable::ALL {
        let name = table.as_str();
        if !ctx.fno.has_purge_service() {
            outcome.insert(name.into(), json!({"cleared_by": "reset", "note": "no fno_purge_service configured: Reset link clears this table"}));
            continue;
        }
        let t = if dry {
            Tally {
                found: ctx.fno.service_rows(table).await?.len(),
                ..Tally::default()
            }
        } else {
            purge_pages(
                ctx,
                &ServiceRows {
                    fno: ctx.fno,
                    table,
                },
                limits.fno_batch_size,
                1,
            )
            .await?
        };
        summary.push_str(&format!(", {name}: {}", t.found));
        outcome.insert(name.into(), t.outcome(dry));
    }
    Ok(StageReport {
        status: StageStatus::Succeeded,
        outcome: Value::Object(outcome),
        then: Then::Continue,
        summary,
        error: None,
    })
}

/// Stage `clear-dataverse-configs`: every `msdyn_dualwriteruntimeconfig` row, archived first.
pub async fn clear_configs(ctx: &StageCtx<'_>) -> Result<StageReport> {
    guard_identity(ctx.env, ctx.dataverse).await?;
    let dry = ctx.run.options.dry_run;
    let limits = ctx.env.limits;
    let Some(set) = ctx.dataverse.runtime_config_set().await? else {
        return Ok(StageReport {
            status: StageStatus::Succeeded,
            outcome: json!({"table_missing": true, "deleted": 0}),
            then: Then::Continue,
            summary: format!(
                "{DATAVERSE_TABLE} does not exist in this organisation: nothing to clear"
            ),
            error: None,
        });
    };
    let tally = if dry {
        Tally {
            found: count_dataverse(ctx.env, ctx.dataverse, ctx.sink).await?,
            ..Tally::default()
        }
    } else {
        let rows = DataverseRows {
            dv: ctx.dataverse,
            set: set.clone(),
            page_size: limits.dataverse_page_size,
        };
        purge_pages(
            ctx,
            &rows,
            limits.dataverse_batch_size,
            limits.dataverse_concurrency,
        )
        .await?
    };
    let summary = format!(
        "{DATAVERSE_TABLE}: {} {}",
        tally.found,
        if dry { "would be deleted" } else { "deleted" }
    );
    Ok(StageReport {
        status: StageStatus::Succeeded,
        outcome: tally.outcome(dry),
        then: Then::Continue,
        summary,
        error: None,
    })
}

/// Stage `reset-link`: the manual gate (or, in a dry run, what it would ask).
pub async fn reset_link(ctx: &StageCtx<'_>) -> Result<StageReport> {
    if ctx.run.options.dry_run {
        return Ok(StageReport {
            status: StageStatus::Skipped,
            outcome: json!({"would": "reset the link (manual: an operator resets it in F&O, then runs relink confirm)"}),
            then: Then::Finish(RunStatus::Succeeded),
            summary: "dry run: the link would now be reset".into(),
            error: None,
        });
    }
    match ctx.reset.reset(ctx.env, ctx.run).await? {
        ResetOutcome::AwaitConfirmation { instructions } => Ok(StageReport {
            status: StageStatus::Running,
            outcome: json!({"mode": "manual", "instructions": instructions}),
            then: Then::Await(instructions),
            summary: "waiting for an operator to reset the link".into(),
            error: None,
        }),
        ResetOutcome::Done => verify(ctx).await,
    }
}

/// Verification after the reset: detection again, read-only, which must come back clean, and
/// where the environment had a link before, the link must be rebuilt towards this Dataverse.
pub async fn verify(ctx: &StageCtx<'_>) -> Result<StageReport> {
    let f = inspect(ctx.env, ctx.dataverse, ctx.fno, ctx.sink).await?;
    let had_link = ctx
        .run
        .stage(crate::model::Stage::DetectMismatch)
        .outcome
        .as_ref()
        .and_then(|o| o.get("fno_project_configs"))
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 0);
    let problem = if f.stale {
        Some(f.reason.clone())
    } else if had_link && f.fno_pointing_here == 0 {
        Some("F&O has no dual-write project configuration pointing at this Dataverse yet: the link has not been reset".to_string())
    } else {
        None
    };
    let outcome = json!({"verified": problem.is_none(), "findings": f});
    Ok(match problem {
        None => StageReport {
            status: StageStatus::Succeeded,
            outcome,
            then: Then::Finish(RunStatus::Succeeded),
            summary: format!("verified: {}", f.reason),
            error: None,
        },
        Some(p) => StageReport {
            status: StageStatus::Running,
            outcome,
            then: Then::Await(format!(
                "verification failed: {p}. Reset the link as instructed, then run relink confirm {} again",
                ctx.run.run_id
            )),
            summary: format!("verification failed: {p}"),
            error: Some(format!("verification failed: {p}")),
        },
    })
}

/// The manual reset gate: records exact operator instructions.
#[derive(Clone, Copy, Debug, Default)]
pub struct ManualReset;

#[async_trait::async_trait]
impl ResetDriver for ManualReset {
    async fn reset(&self, env: &EnvConfig, run: &Run) -> Result<ResetOutcome> {
        Ok(ResetOutcome::AwaitConfirmation {
            instructions: manual_instructions(env, &run.run_id),
        })
    }
}

/// The operator's checklist for a manual reset.
pub fn manual_instructions(env: &EnvConfig, run_id: &str) -> String {
    format!(
        "relink has cleared the dual-write keys of `{id}`. Reset the link by hand, then confirm:\n\
         1. Sign in to F&O at {fno} as a System administrator.\n\
         2. Open the Data management workspace > Dual-write. Stop any table map that still runs.\n\
         3. Select Reset link and choose the Dataverse environment {dv} (organisation {org}). If relink cannot see the maps stopped, F&O offers Force reset.\n\
         4. Wait until the reset finishes, apply the dual-write solutions again and start the maps you need (Reset removes maps, integration keys and legal-entity mappings).\n\
         5. Run: relink confirm {run_id}   (relink then verifies the link and ends the run)",
        id = env.id,
        fno = env.fno_url,
        dv = env.dataverse_url,
        org = env.dataverse_unique_name,
    )
}

#[cfg(test)]
mod tests {
    //! Stage decisions against in-memory ports: no network.

    use super::*;
    use crate::model::{RunOptions, Trigger};
    use crate::progress::TracingSink;
    use crate::store_sqlite::SqliteStore;

    use crate::fakes::{DV, FakeDataverse, FakeFno, dataverse, env, fno};

    async fn with_ctx<T>(
        dv: &FakeDataverse,
        fno: &FakeFno,
        options: RunOptions,
        f: impl AsyncFnOnce(&StageCtx<'_>) -> T,
    ) -> T {
        let env = env();
        let store = SqliteStore::in_memory().unwrap();
        let run = Run::new(
            "01JDQ4N9Z3W8B7C6X5V4T3S2R1".into(),
            "uat".into(),
            options,
            Trigger::default(),
        );
        let ctx = StageCtx {
            env: &env,
            run: &run,
            store: &store,
            dataverse: dv,
            fno,
            reset: &ManualReset,
            sink: &TracingSink,
        };
        f(&ctx).await
    }

    #[tokio::test]
    async fn configs_pointing_at_another_dataverse_are_stale() {
        let (dv, fno) = (dataverse(5), fno(&["https://PROD.crm.dynamics.com/", DV]));
        let r = with_ctx(&dv, &fno, RunOptions::default(), async |c| {
            detect(c).await.unwrap()
        })
        .await;
        assert_eq!(r.then, Then::Continue);
        assert_eq!(r.outcome["fno_pointing_elsewhere"], 1);
        assert_eq!(
            r.outcome["other_dataverse_urls"][0],
            "https://prod.crm.dynamics.com"
        );
    }

    #[tokio::test]
    async fn a_clean_link_is_skipped_unless_forced() {
        let (dv, fno) = (dataverse(5), fno(&[&format!("{DV}/")]));
        let r = with_ctx(&dv, &fno, RunOptions::default(), async |c| {
            detect(c).await.unwrap()
        })
        .await;
        assert_eq!(
            (r.status, r.then),
            (StageStatus::Skipped, Then::Finish(RunStatus::Skipped))
        );
        let forced = with_ctx(
            &dv,
            &fno,
            RunOptions {
                force: true,
                dry_run: false,
            },
            async |c| detect(c).await.unwrap(),
        )
        .await;
        assert_eq!(forced.then, Then::Continue);
        // Leftover runtime configs with no F&O link at all are stale too.
        let r = with_ctx(&dv, &fno_rows_none(), RunOptions::default(), async |c| {
            detect(c).await.unwrap()
        })
        .await;
        assert_eq!(r.then, Then::Continue);
    }

    fn fno_rows_none() -> FakeFno {
        fno(&[])
    }

    #[tokio::test]
    async fn identity_and_integration_mismatches_are_refused() {
        let mut dv = dataverse(5);
        dv.unique_name = "orgprod";
        let f = fno(&["https://prod.crm.dynamics.com"]);
        let e = with_ctx(&dv, &f, RunOptions::default(), async |c| {
            clear_configs(c).await.unwrap_err()
        })
        .await;
        assert!(matches!(e, Error::Refused(_)), "{e}");
        assert_eq!(dv.rows.lock().unwrap().len(), 5, "nothing deleted");
        let mut dv = dataverse(5);
        dv.integrated = Some("https://other.operations.dynamics.com");
        let e = with_ctx(&dv, &f, RunOptions::default(), async |c| {
            detect(c).await.unwrap_err()
        })
        .await;
        assert!(e.to_string().contains("integrated with F&O"), "{e}");
    }

    #[tokio::test]
    async fn clearing_pages_archives_every_row_before_deleting_it() {
        let (dv, f) = (dataverse(25), fno(&[]));
        let (r, archived) = with_ctx(&dv, &f, RunOptions::default(), async |c| {
            let r = clear_configs(c).await.unwrap();
            (r, c.store.archived(&c.run.run_id).await.unwrap().len())
        })
        .await;
        assert_eq!(r.outcome["deleted"], 25);
        assert_eq!(
            r.outcome["batches"], 10,
            "pages of 10, 10, 5 in batches of 3"
        );
        assert_eq!(archived, 25);
        assert!(dv.rows.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn dry_run_counts_across_pages_and_deletes_nothing() {
        let (dv, f) = (dataverse(25), fno(&["https://prod.crm.dynamics.com"]));
        let r = with_ctx(
            &dv,
            &f,
            RunOptions {
                dry_run: true,
                force: false,
            },
            async |c| clear_configs(c).await.unwrap(),
        )
        .await;
        assert_eq!(r.outcome["would_delete"], 25);
        let p = with_ctx(
            &dv,
            &f,
            RunOptions {
                dry_run: true,
                force: false,
            },
            async |c| purge_keys(c).await.unwrap(),
        )
        .await;
        assert_eq!(p.outcome[FNO_TABLE]["would_delete"], 1);
        assert_eq!(dv.rows.lock().unwrap().len(), 25);
        assert_eq!(f.rows.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_row_that_keeps_failing_stops_the_stage_instead_of_looping() {
        let mut dv = dataverse(4);
        dv.stuck = vec!["0002".into()];
        let e = with_ctx(&dv, &fno(&[]), RunOptions::default(), async |c| {
            clear_configs(c).await.unwrap_err()
        })
        .await;
        assert!(e.is_retryable() && e.to_string().contains("0002"), "{e}");
        assert_eq!(dv.rows.lock().unwrap().len(), 1, "the other rows are gone");
    }
}
