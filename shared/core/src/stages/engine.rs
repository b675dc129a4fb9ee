//! The purge engine shared by `purge-keys` and `clear-dataverse-configs`: pages of what is left,
//! archived before anything is deleted, batched deletes with bounded concurrency, passes until
//! the table is empty, and a stop instead of a spin when rows keep failing.

use std::collections::{HashMap, HashSet, VecDeque};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::{Value, json};

use super::{DATAVERSE_TABLE, StageCtx};
use crate::error::{Error, Result};
use crate::ports::{ArchivedRow, BatchOutcome, Page};
use crate::progress::Progress;

/// A row that keeps failing to delete ends the stage after this many passes.
const MAX_FAILURES_PER_ROW: u32 = 3;
/// Passes that delete nothing before the stage gives up rather than spin.
const MAX_IDLE_PASSES: u32 = 3;
/// A row whose delete was answered as done this many times, and that is still listed, ends the
/// stage: the service does not remove it.
const MAX_REPORTS_PER_ROW: u32 = 3;
/// Pages one walk through a table follows at most (5,000-row pages: 50 million rows).
const MAX_PAGES: usize = 10_000;
/// Rows named in an error at most.
const MAX_NAMED_ROWS: usize = 5;

/// Guards a walk through server-driven pages: a next link seen before in the same walk, or more
/// pages than any real table has, ends it with an error instead of a loop.
pub(super) struct PageGuard {
    table: &'static str,
    seen: HashSet<String>,
}

impl PageGuard {
    pub(super) fn new(table: &'static str) -> PageGuard {
        PageGuard {
            table,
            seen: HashSet::new(),
        }
    }

    /// Checks a next link before it is followed.
    pub(super) fn follow(&mut self, link: &str) -> Result<()> {
        let detail = if self.seen.len() >= MAX_PAGES {
            format!("{} has more than {MAX_PAGES} pages", self.table)
        } else if !self.seen.insert(link.to_string()) {
            format!(
                "{} paging came back to a next link it had already followed",
                self.table
            )
        } else {
            return Ok(());
        };
        Err(Error::Protocol {
            service: "OData",
            detail: format!("{detail}; relink stopped reading instead of looping"),
        })
    }
}

/// Running totals of one table's purge.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) found: usize,
    pub(super) deleted: usize,
    pub(super) already_gone: usize,
    pub(super) batches: usize,
    /// The stage's time ran out ([`StageCtx::stop_at`]) with rows left.
    pub(super) interrupted: bool,
}

impl Tally {
    pub(super) fn outcome(&self, dry_run: bool) -> Value {
        if dry_run {
            json!({"would_delete": self.found})
        } else if self.interrupted {
            json!({"deleted": self.deleted, "already_gone": self.already_gone, "archived": self.found, "batches": self.batches, "continues": true})
        } else {
            json!({"deleted": self.deleted, "already_gone": self.already_gone, "archived": self.found, "batches": self.batches})
        }
    }
}

/// A table whose rows a stage deletes: pages of what is left, and batched deletes.
#[async_trait::async_trait]
pub(super) trait Purgeable: Send + Sync {
    /// The table name for archives and progress.
    fn table(&self) -> &'static str;
    /// The row's key, as the delete takes it.
    fn key_of(&self, row: &Value) -> Result<String>;
    /// The columns the read asked for (`$select`, key included): only these and the etag are
    /// archived, whatever else a server sends. `None` archives the row as listed (the purge
    /// service's rows, which have no `$select`).
    fn columns(&self) -> Option<Vec<&str>>;
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

/// Deletes every row of a table. One pass follows the pages from the first: each page is
/// archived as it arrives, then its keys go out in batches, keeping up to `concurrency` batch
/// requests in flight across page boundaries; the next page is read and archived while
/// batches run (paging links are key-based, so deleting rows already read does not move
/// them). Batch size and concurrency come from the table's pacing (Dataverse: DOP hint, time per
/// delete). Passes repeat until the first page comes back empty; rows that keep failing stop
/// the stage.
pub(super) async fn purge_pages<'a>(
    ctx: &'a StageCtx<'a>,
    rows_of: &'a dyn Purgeable,
    batch_size: usize,
    concurrency: usize,
) -> Result<Tally> {
    enum Done {
        Batch(Vec<String>, Result<BatchOutcome>),
        Page(Result<(Vec<String>, Option<String>)>),
    }
    type Work<'w> = std::pin::Pin<Box<dyn Future<Output = Done> + Send + 'w>>;

    let table = rows_of.table();
    let mut tally = Tally::default();
    let mut failures: HashMap<String, u32> = HashMap::new();
    // Times each row's delete was answered as done (deleted, or 404).
    let mut reported: HashMap<String, u32> = HashMap::new();
    let mut idle = 0;
    loop {
        let first = rows_of.first_page().await?;
        if first.rows.is_empty() && first.next_link.is_none() {
            return resumed_totals(ctx, table, tally).await;
        }
        let mut pages = PageGuard::new(table);
        let mut next_link = first.next_link;
        let mut queue: VecDeque<String> = archive_page(ctx, rows_of, first.rows).await?.into();
        tally.archived(ctx, table, queue.len());
        let mut pass_rows = queue.len();
        let mut work: FuturesUnordered<Work<'a>> = FuturesUnordered::new();
        let (mut batches, mut reading) = (0, false);
        let mut pass_deleted = 0;
        let mut first_error = None;
        loop {
            if !tally.interrupted && ctx.stop_at.is_some_and(|t| jiff::Timestamp::now() >= t) {
                // Out of time: send nothing more, let what is in flight finish, hand over.
                tally.interrupted = true;
                tracing::info!(
                    table,
                    "the invocation's time is nearly up: draining, then continuing in a new one"
                );
            }
            if first_error.is_none() && !tally.interrupted {
                let batch = rows_of.batch_size(batch_size).max(1);
                let slots = rows_of.concurrency(concurrency);
                // Read ahead once what is queued no longer fills every slot.
                if !reading
                    && queue.len() < slots * batch
                    && let Some(link) = next_link.take()
                {
                    if let Err(e) = pages.follow(&link) {
                        first_error = Some(e);
                        continue;
                    }
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
                        let outcome = rows_of.delete(&chunk).await;
                        Done::Batch(chunk, outcome)
                    }));
                }
            }
            let Some(done) = work.next().await else {
                break;
            };
            match done {
                Done::Page(Ok((keys, link))) => {
                    reading = false;
                    pass_rows += keys.len();
                    tally.archived(ctx, table, keys.len());
                    queue.extend(keys);
                    next_link = link;
                }
                Done::Page(Err(e)) => {
                    reading = false;
                    first_error.get_or_insert(e);
                }
                Done::Batch(chunk, Ok(o)) => {
                    batches -= 1;
                    tally.batches += 1;
                    let failed: HashSet<&str> = o.failed.iter().map(|(k, _)| k.as_str()).collect();
                    // Only rows never reported done before count as progress (and in the
                    // totals): a row that stays listed after its delete was answered 204 or 404
                    // is not deleted, however often the service says so.
                    let mut fresh = 0;
                    let mut ghosts = Vec::new();
                    for key in chunk.iter().filter(|k| !failed.contains(k.as_str())) {
                        let n = reported.entry(key.clone()).or_default();
                        *n += 1;
                        if *n == 1 {
                            fresh += 1;
                        } else if *n >= MAX_REPORTS_PER_ROW {
                            ghosts.push(key.clone());
                        }
                    }
                    let deleted = o.deleted.min(fresh);
                    tally.deleted += deleted;
                    tally.already_gone += o.already_gone.min(fresh - deleted);
                    pass_deleted += fresh;
                    if !ghosts.is_empty() && first_error.is_none() {
                        let named: Vec<&str> = ghosts
                            .iter()
                            .take(MAX_NAMED_ROWS)
                            .map(String::as_str)
                            .collect();
                        first_error = Some(Error::Protocol {
                            service: service_of(table),
                            detail: format!(
                                "{table} still lists {} row(s) whose deletes were answered as done {MAX_REPORTS_PER_ROW} times ({}); the service does not remove them: find out why there (a plug-in, a sync that recreates them), then run relink again",
                                ghosts.len(),
                                named.join(", ")
                            ),
                        });
                    }
                    for (key, why) in o.failed {
                        let n = failures.entry(key.clone()).or_default();
                        *n += 1;
                        if *n >= MAX_FAILURES_PER_ROW && first_error.is_none() {
                            first_error = Some(Error::Unavailable {
                                service: service_of(table),
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
                Done::Batch(_, Err(e)) => {
                    batches -= 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if tally.interrupted {
            // This invocation's figures; the invocation that finishes counts the whole run's.
            return Ok(tally);
        }
        if pass_rows == 0 {
            // Every page of the pass was empty (links included): the table is empty.
            return Ok(tally);
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

/// The service a table lives in, for messages.
fn service_of(table: &str) -> &'static str {
    if table == DATAVERSE_TABLE {
        "Dataverse"
    } else {
        "F&O"
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

/// The stage's totals across attempts. A first attempt's tally is exact. A resumed one saw only
/// what the earlier attempts left (rows they deleted, some perhaps without hearing the answer,
/// are no longer listed), so the run's figures come from the archive, which holds every row any
/// attempt read before deleting it: all of them are gone now, and those that answered 404 in
/// this attempt were removed by someone else.
async fn resumed_totals(ctx: &StageCtx<'_>, table: &str, mut tally: Tally) -> Result<Tally> {
    let resumed = ctx
        .run
        .stages
        .iter()
        .any(|s| s.status == crate::model::StageStatus::Running && s.attempts > 1);
    if resumed {
        let archived = ctx.store.archived_count(&ctx.run.run_id, table).await?;
        tally.found = archived.max(tally.found);
        tally.deleted = tally.found.saturating_sub(tally.already_gone);
    }
    Ok(tally)
}

/// The string in `field` of a row: the key of tables keyed by one string column.
pub(super) fn string_key(table: &str, field: &str, row: &Value) -> Result<String> {
    row.get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| Error::Protocol {
            service: "OData",
            detail: format!("{table} row without a string `{field}`"),
        })
}

/// Archives a page (redacted) and returns its keys, in order.
pub(super) async fn archive_page(
    ctx: &StageCtx<'_>,
    rows_of: &dyn Purgeable,
    rows: Vec<Value>,
) -> Result<Vec<String>> {
    let table = rows_of.table();
    let columns = rows_of.columns();
    let mut keys = Vec::with_capacity(rows.len());
    let mut archived = Vec::with_capacity(rows.len());
    for row in &rows {
        let key = rows_of.key_of(row)?;
        let row = match (&columns, row) {
            (Some(cols), Value::Object(map)) => Value::Object(
                map.iter()
                    .filter(|(k, _)| k.as_str() == "@odata.etag" || cols.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            _ => row.clone(),
        };
        archived.push(ArchivedRow {
            table: table.to_string(),
            key: key.clone(),
            row: crate::redact::redact_row(&row),
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
