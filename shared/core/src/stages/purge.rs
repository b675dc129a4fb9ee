//! `purge-keys`: archives, then deletes, the F&O `DualWriteProjectConfigurations` rows through
//! OData, and the two tables without a public entity through the customer's purge service when
//! one is configured (else the Reset clears them, and that is recorded).

use serde_json::{Value, json};

use super::engine::{PageGuard, Purgeable, Tally, purge_pages, string_key};
use super::guards::guard_target;
use super::{FNO_COLUMNS, FNO_TABLE, StageCtx, StageReport, Then};
use crate::error::Result;
use crate::model::StageStatus;
use crate::ports::{BatchOutcome, FnoApi, Page, ServiceTable};

struct ProjectConfigs<'a> {
    fno: &'a dyn FnoApi,
    page_size: usize,
    /// The entity's key properties (from `$metadata`).
    key: Vec<String>,
}

/// The OData key predicate of `row` for the key properties `key`, without parentheses:
/// `dataAreaId='usmf',ProjectName='O''Brien'`. Strings are quoted (`'` doubled), numbers and
/// booleans written as they are; a row missing a key property, or with another kind of value,
/// is a protocol error (relink never deletes by a partial key).
pub fn key_predicate(key: &[String], row: &Value) -> Result<String> {
    let mut parts = Vec::with_capacity(key.len());
    for k in key {
        let literal = match row.get(k) {
            Some(Value::String(s)) => format!("'{}'", s.replace('\'', "''")),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            _ => {
                return Err(crate::Error::Protocol {
                    service: "F&O",
                    detail: format!(
                        "a {FNO_TABLE} row without a usable key property `{k}` (its key is {})",
                        key.join(", ")
                    ),
                });
            }
        };
        parts.push(format!("{k}={literal}"));
    }
    Ok(parts.join(","))
}

#[async_trait::async_trait]
impl Purgeable for ProjectConfigs<'_> {
    fn table(&self) -> &'static str {
        FNO_TABLE
    }
    fn key_of(&self, row: &Value) -> Result<String> {
        key_predicate(&self.key, row)
    }
    fn columns(&self) -> Option<Vec<&str>> {
        let mut cols = FNO_COLUMNS.to_vec();
        cols.extend(self.key.iter().map(String::as_str));
        Some(cols)
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
    fn key_of(&self, row: &Value) -> Result<String> {
        string_key(self.table(), "key", row)
    }
    fn columns(&self) -> Option<Vec<&str>> {
        None
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

/// The report of a purge whose time ran out in `table`: recorded, and continued in a new
/// invocation (the tables before it are empty by then, so it picks up where it stopped).
fn again(outcome: serde_json::Map<String, Value>, table: &str) -> StageReport {
    StageReport {
        status: StageStatus::Running,
        outcome: Value::Object(outcome),
        then: Then::Again,
        summary: format!("{table}: time ran out; the purge continues in a new invocation"),
        error: None,
    }
}

/// Stage `purge-keys`: F&O key tables (OData, then the optional purge service). Archives first.
pub async fn purge_keys(ctx: &StageCtx<'_>) -> Result<StageReport> {
    let (_, guards) = guard_target(ctx.env, ctx.dataverse).await?;
    let dry = ctx.run.options.dry_run;
    let limits = ctx.env.limits;
    let mut outcome = serde_json::Map::new();
    outcome.insert("guards".into(), json!(guards));
    let configs = if dry {
        let mut page = ctx.fno.project_configs(None, limits.fno_page_size).await?;
        let mut found = page.rows.len();
        let mut pages = PageGuard::new(FNO_TABLE);
        while let Some(link) = page.next_link.take() {
            pages.follow(&link)?;
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
                key: ctx.fno.project_config_key().await?,
            },
            limits.fno_batch_size,
            1,
        )
        .await?
    };
    outcome.insert(FNO_TABLE.into(), configs.outcome(dry));
    if configs.interrupted {
        return Ok(again(outcome, FNO_TABLE));
    }
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
        outcome.insert(name.into(), t.outcome(dry));
        if t.interrupted {
            return Ok(again(outcome, name));
        }
        summary.push_str(&format!(", {name}: {}", t.found));
    }
    Ok(StageReport {
        status: StageStatus::Succeeded,
        outcome: Value::Object(outcome),
        then: Then::Continue,
        summary,
        error: None,
    })
}
