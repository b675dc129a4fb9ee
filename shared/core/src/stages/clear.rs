//! `clear-dataverse-configs`: archives, then deletes, every row of Dual Write Runtime
//! Configurations (`msdyn_dualwriteruntimeconfig`), paced to Dataverse's service protection
//! limits.

use serde_json::{Value, json};

use super::detect::count_dataverse;
use super::engine::{Purgeable, Tally, purge_pages, string_key};
use super::guards::guard_target;
use super::{DATAVERSE_COLUMNS, DATAVERSE_TABLE, StageCtx, StageReport, Then};
use crate::error::Result;
use crate::model::StageStatus;
use crate::ports::{BatchOutcome, DataverseApi, EntitySet, Page};

struct DataverseRows<'a> {
    dv: &'a dyn DataverseApi,
    set: EntitySet,
    page_size: usize,
}

#[async_trait::async_trait]
impl Purgeable for DataverseRows<'_> {
    fn table(&self) -> &'static str {
        DATAVERSE_TABLE
    }
    fn key_of(&self, row: &Value) -> Result<String> {
        string_key(DATAVERSE_TABLE, &self.set.primary_id, row)
    }
    fn columns(&self) -> Option<Vec<&str>> {
        let mut cols = DATAVERSE_COLUMNS.to_vec();
        cols.push(&self.set.primary_id);
        Some(cols)
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

/// Stage `clear-dataverse-configs`: every `msdyn_dualwriteruntimeconfig` row, archived first.
pub async fn clear_configs(ctx: &StageCtx<'_>) -> Result<StageReport> {
    let (_, guards) = guard_target(ctx.env, ctx.dataverse).await?;
    let dry = ctx.run.options.dry_run;
    let limits = ctx.env.limits;
    let Some(set) = ctx.dataverse.runtime_config_set().await? else {
        return Ok(StageReport {
            status: StageStatus::Succeeded,
            outcome: json!({"table_missing": true, "deleted": 0, "guards": guards}),
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
    let mut outcome = tally.outcome(dry);
    outcome["guards"] = json!(guards);
    if tally.interrupted {
        return Ok(StageReport {
            status: StageStatus::Running,
            outcome,
            then: Then::Again,
            summary: format!(
                "{DATAVERSE_TABLE}: {} deleted in this invocation; the rest continues in a new one",
                tally.deleted
            ),
            error: None,
        });
    }
    let summary = format!(
        "{DATAVERSE_TABLE}: {} {}",
        tally.found,
        if dry { "would be deleted" } else { "deleted" }
    );
    Ok(StageReport {
        status: StageStatus::Succeeded,
        outcome,
        then: Then::Continue,
        summary,
        error: None,
    })
}
