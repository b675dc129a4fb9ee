//! The DynamoDB progress store, on the single-table model of docs/architecture.md:
//!
//! | item | PK | SK |
//! | --- | --- | --- |
//! | run | `ENV#{env}` | `RUN#{run_id}` |
//! | run pointer (run id -> environment, for `confirm`/`status --run`) | `RUN#{run_id}` | `RUN` |
//! | lock | `ENV#{env}` | `LOCK` |
//! | archive chunk | `ENV#{env}` | `ARCHIVE#{run_id}#{table}#{chunk ulid}` |
//! | registry entry | `CONFIG#{env}` | `CONFIG` |
//! | trigger seen (dedup of restore signals) | `TRIGGER#{source}#{operation_id}` | `TRIGGER` |
//! | watcher cursor | `CURSOR#{env}/{source}` | `CURSOR` |
//! | rejected message | `REJECTED` | `{received_at}#{message_id}` |
//!
//! Index `gsi1` (`gsi1pk`, `gsi1sk`) lists runs (`RUNS`, run id) and registry entries
//! (`CONFIG`, env). Registry entries have a partition of their own so that IAM can keep every
//! function from writing them (`dynamodb:LeadingKeys` not `CONFIG#*`, template.yaml): only
//! `relink env push` writes them. Every state move is a conditional write; `expires_at` (epoch seconds) is
//! the TTL attribute and is also checked on read, since TTL deletion is lazy.
//!
//! One file over the usual length on purpose: it is one adapter, the `ProgressStore` port over
//! one table, and its conditional expressions are easiest to check side by side.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, Put, PutRequest, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem, Update, WriteRequest,
};
use jiff::Timestamp;
use serde_json::Value;

use super::sdk_error;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use relink_core::error::{Error, Result};
use relink_core::event::digest;
use relink_core::model::Run;
use relink_core::ports::{
    ArchivedRow, Claimed, Expect, LeaseOwner, Lock, LockAfter, ProgressStore, Rejected, Started,
};

/// How long runs, archives and other items are kept (the `expires_at` TTL).
pub const RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);
/// Archive chunks stay well under DynamoDB's 400 KB item limit.
const CHUNK_BYTES: usize = 300 * 1024;
/// The secondary index listing runs and registry entries.
pub const GSI1: &str = "gsi1";

type Item = HashMap<String, AttributeValue>;

/// When the environment's lock may be taken for run `:run` by `:owner`: it is free or lapsed, or
/// the run holds it with the same owner or with none (between stages).
const LOCK_FREE: &str = "attribute_not_exists(PK) OR lease_until <= :now OR (run_id = :run AND (#o = :owner OR #o = :none))";

/// DynamoDB-backed [`ProgressStore`] and registry.
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn get_s<'a>(item: &'a Item, k: &str) -> Option<&'a str> {
    item.get(k).and_then(|v| v.as_s().ok()).map(String::as_str)
}

fn get_n(item: &Item, k: &str) -> Option<i64> {
    item.get(k)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

fn env_pk(env: &str) -> String {
    format!("ENV#{env}")
}

fn config_pk(env: &str) -> String {
    format!("CONFIG#{env}")
}

/// Whether an SDK error is a failed condition (a lost race, not a fault).
/// Whether a write failed on its condition, by the error's code (never by its text).
fn is_condition_failed<E: ProvideErrorMetadata>(e: &E) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}

/// The per-item reasons of a cancelled transaction (in the order of its items), or `None` when
/// it failed otherwise.
fn cancellation_reasons(
    e: &aws_sdk_dynamodb::error::SdkError<
        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError,
    >,
) -> Option<Vec<aws_sdk_dynamodb::types::CancellationReason>> {
    use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
    match e.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(t)) => {
            Some(t.cancellation_reasons().to_vec())
        }
        _ => None,
    }
}

/// Whether item `i` of a cancelled transaction failed its condition.
fn condition_failed(reasons: &[aws_sdk_dynamodb::types::CancellationReason], i: usize) -> bool {
    reasons
        .get(i)
        .is_some_and(|r| r.code() == Some("ConditionalCheckFailed"))
}

/// Whether a transaction was cancelled because one of its conditions failed.
fn is_transaction_condition_failed(
    e: &aws_sdk_dynamodb::error::SdkError<
        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError,
    >,
) -> bool {
    cancellation_reasons(e).is_some_and(|r| (0..r.len()).any(|i| condition_failed(&r, i)))
}

/// A conditional write whose failed condition means "nothing to do" (not ours, already gone).
fn unless_condition_failed<T, E: std::error::Error + ProvideErrorMetadata>(
    res: std::result::Result<T, E>,
    op: &str,
) -> Result<()> {
    match res {
        Ok(_) => Ok(()),
        Err(e) if is_condition_failed(&e) => Ok(()),
        Err(e) => Err(store_err(op, &e)),
    }
}

fn store_err<E: std::error::Error>(op: &str, e: &E) -> Error {
    Error::store(format!("DynamoDB {op}: {}", sdk_error(e)))
}

impl DynamoStore {
    /// A store on `table`.
    pub fn new(client: Client, table: impl Into<String>) -> DynamoStore {
        DynamoStore {
            client,
            table: table.into(),
        }
    }

    /// The SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn expires_at(&self) -> i64 {
        (Timestamp::now() + RETENTION).as_second()
    }

    fn run_item(&self, run: &Run) -> Item {
        let body = serde_json::to_string(run).expect("a run serialises");
        HashMap::from([
            ("digest".into(), s(digest(&body))),
            ("PK".into(), s(env_pk(&run.environment_id))),
            ("SK".into(), s(format!("RUN#{}", run.run_id))),
            ("gsi1pk".into(), s("RUNS")),
            ("gsi1sk".into(), s(&run.run_id)),
            ("run_id".into(), s(&run.run_id)),
            ("status".into(), s(run.status.as_str())),
            ("version".into(), n(run.version)),
            ("body".into(), s(body)),
            ("expires_at".into(), n(self.expires_at())),
        ])
    }

    fn decode_run(item: &Item) -> Result<Option<Run>> {
        if get_n(item, "expires_at").is_some_and(|t| t < Timestamp::now().as_second()) {
            return Ok(None);
        }
        let body = get_s(item, "body").ok_or_else(|| Error::store("run item without body"))?;
        let mut run: Run = serde_json::from_str(body).map_err(|e| {
            Error::Corrupt(format!(
                "run item {}: {e}",
                get_s(item, "SK").unwrap_or("?")
            ))
        })?;
        // Written beside the body by `note_waiting`; a put of the run drops it.
        if let Some(w) = get_s(item, "waiting") {
            run.waiting = Some(w.to_string());
        }
        Ok(Some(run))
    }

    async fn get_item(&self, pk: String, sk: &str) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(pk))
            .key("SK", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| store_err("GetItem", &e))?;
        Ok(out.item)
    }

    async fn environment_of(&self, run_id: &str) -> Result<Option<String>> {
        Ok(self
            .get_item(format!("RUN#{run_id}"), "RUN")
            .await?
            .and_then(|i| get_s(&i, "environment_id").map(str::to_string)))
    }

    async fn query_all(&self, pk: String, sk_prefix: &str) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("PK = :pk AND begins_with(SK, :sk)")
                .expression_attribute_values(":pk", s(pk.clone()))
                .expression_attribute_values(":sk", s(sk_prefix))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| store_err("Query", &e))?;
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(items),
            }
        }
    }

    async fn query_gsi(&self, pk: &str, limit: Option<usize>) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(GSI1)
                .key_condition_expression("gsi1pk = :pk")
                .expression_attribute_values(":pk", s(pk))
                .scan_index_forward(false)
                .set_exclusive_start_key(start.take());
            if let Some(l) = limit {
                q = q.limit((l - items.len().min(l)) as i32);
            }
            let out = q.send().await.map_err(|e| store_err("Query gsi1", &e))?;
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() && limit.is_none_or(|l| items.len() < l) => {
                    start = Some(k)
                }
                _ => return Ok(items),
            }
        }
    }

    /// Stores a registry entry (the JSON form of its TOML table).
    pub async fn put_entry(&self, environment_id: &str, entry: &Value) -> Result<()> {
        let text = entry.to_string();
        self.client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(config_pk(environment_id)))
            .item("SK", s("CONFIG"))
            .item("gsi1pk", s("CONFIG"))
            .item("gsi1sk", s(environment_id))
            .item("entry", s(&text))
            .item("digest", s(digest(&text)))
            .item("updated_at", s(Timestamp::now().to_string()))
            .send()
            .await
            .map_err(|e| store_err("PutItem CONFIG", &e))?;
        Ok(())
    }

    /// One environment's registry entry (one read); `None` when the table has none. An entry
    /// that is not JSON is a configuration error of that environment only.
    pub async fn entry(&self, environment_id: &str) -> Result<Option<Value>> {
        Ok(self
            .entry_text(environment_id)
            .await?
            .map(|(value, _)| value))
    }

    /// One environment's registry entry and its stored text (one read), when the text carries
    /// its digest (written by `put_entry`): only then can a stage pass it on for the next to check.
    pub async fn entry_text(
        &self,
        environment_id: &str,
    ) -> Result<Option<(Value, Option<String>)>> {
        let Some(item) = self.get_item(config_pk(environment_id), "CONFIG").await? else {
            return Ok(None);
        };
        let text = get_s(&item, "entry").unwrap_or_default();
        let checked = get_s(&item, "digest")
            .is_some_and(|d| d == digest(text))
            .then(|| text.to_string());
        serde_json::from_str(text).map(|v| Some((v, checked))).map_err(|e| {
            Error::Config(format!(
                "registry entry `{environment_id}` in the table is not readable ({e}); run relink env push {environment_id}"
            ))
        })
    }

    /// Every registry entry, by environment id.
    pub async fn entries(&self) -> Result<Vec<(String, Value)>> {
        let mut out = Vec::new();
        for item in self.query_gsi("CONFIG", None).await? {
            let (Some(id), Some(entry)) = (get_s(&item, "gsi1sk"), get_s(&item, "entry")) else {
                continue;
            };
            let v = serde_json::from_str(entry)
                .map_err(|e| Error::store(format!("registry entry {id}: {e}")))?;
            out.push((id.to_string(), v));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Sends a transaction: `None` when it was written, the per-item reasons (in the order of
    /// the items) when it was cancelled, an error when it failed otherwise.
    async fn transact(
        &self,
        items: Vec<TransactWriteItem>,
        what: &str,
    ) -> Result<Option<Vec<aws_sdk_dynamodb::types::CancellationReason>>> {
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(None),
            Err(e) => match cancellation_reasons(&e) {
                Some(reasons) => Ok(Some(reasons)),
                None => Err(store_err(&format!("TransactWriteItems {what}"), &e)),
            },
        }
    }

    /// A transaction's put of an item that must not exist yet.
    fn put_new(&self, item: Item) -> TransactWriteItem {
        TransactWriteItem::builder()
            .put(
                Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(item))
                    .condition_expression("attribute_not_exists(PK)")
                    .build()
                    .expect("table and item are set"),
            )
            .build()
    }

    /// The run id -> environment pointer of a run.
    fn pointer_item(&self, run: &Run) -> Item {
        HashMap::from([
            ("PK".to_string(), s(format!("RUN#{}", run.run_id))),
            ("SK".to_string(), s("RUN")),
            ("environment_id".to_string(), s(&run.environment_id)),
            ("expires_at".to_string(), n(self.expires_at())),
        ])
    }

    fn lock_from(item: &Item) -> Option<Lock> {
        Some(Lock {
            environment_id: get_s(item, "PK")?.strip_prefix("ENV#")?.to_string(),
            run_id: get_s(item, "run_id")?.to_string(),
            owner: get_s(item, "owner")
                .filter(|o| !o.is_empty())
                .map(|o| LeaseOwner(o.to_string())),
            lease_until: Timestamp::from_millisecond(get_n(item, "lease_until")?).ok()?,
        })
    }
}

#[async_trait]
impl ProgressStore for DynamoStore {
    async fn create_run(&self, run: &Run) -> Result<()> {
        match self
            .client
            .transact_write_items()
            .transact_items(self.put_new(self.run_item(run)))
            .transact_items(self.put_new(self.pointer_item(run)))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_transaction_condition_failed(&e) => Err(Error::Conflict(format!(
                "run {} already exists",
                run.run_id
            ))),
            Err(e) => Err(store_err("TransactWriteItems", &e)),
        }
    }

    async fn get_run(&self, run_id: &str) -> Result<Option<Run>> {
        let Some(env) = self.environment_of(run_id).await? else {
            return Ok(None);
        };
        match self
            .get_item(env_pk(&env), &format!("RUN#{run_id}"))
            .await?
        {
            Some(item) => Self::decode_run(&item),
            None => Ok(None),
        }
    }

    async fn find_run(&self, environment_id: &str, run_id: &str) -> Result<Option<Run>> {
        match self
            .get_item(env_pk(environment_id), &format!("RUN#{run_id}"))
            .await?
        {
            Some(item) => Self::decode_run(&item),
            // Not where the event says: maybe another environment's run (the caller refuses it).
            None => self.get_run(run_id).await,
        }
    }

    async fn note_waiting(&self, environment_id: &str, run_id: &str, note: &str) -> Result<()> {
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(env_pk(environment_id)))
            .key("SK", s(format!("RUN#{run_id}")))
            .update_expression("SET waiting = :w")
            .condition_expression("attribute_exists(PK)")
            .expression_attribute_values(":w", s(note.to_string()))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failed(&e) => Ok(()),
            Err(e) => Err(Error::store_source("note why a run waits", e)),
        }
    }

    async fn update_run(&self, run: &Run) -> Result<Run> {
        let mut next = run.clone();
        next.version += 1;
        let res = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(self.run_item(&next)))
            .condition_expression("version = :v")
            .expression_attribute_values(":v", n(run.version))
            .send()
            .await;
        match res {
            Ok(_) => Ok(next),
            Err(e) if is_condition_failed(&e) => Err(Error::Conflict(format!(
                "run {} changed since it was read (expected version {})",
                run.run_id, run.version
            ))),
            Err(e) => Err(store_err("PutItem run", &e)),
        }
    }

    /// One transaction: the run (created, or put over the version it had, and over the body and
    /// the registry entry an event carried when it carried them) and the lock.
    async fn start_stage(
        &self,
        run: &Run,
        expect: &Expect,
        owner: &LeaseOwner,
        lease: Duration,
    ) -> Result<Started> {
        let now = Timestamp::now();
        let until = now + lease;
        let mut items = Vec::with_capacity(4);
        let written = match expect {
            Expect::New => {
                items.push(self.put_new(self.run_item(run)));
                items.push(self.put_new(self.pointer_item(run)));
                run.clone()
            }
            Expect::Stored {
                run_digest,
                entry_digest,
            } => {
                let mut next = run.clone();
                next.version += 1;
                let mut put = Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(self.run_item(&next)))
                    .expression_attribute_values(":v", n(run.version));
                put = match run_digest {
                    Some(d) => put
                        .condition_expression("version = :v AND digest = :d")
                        .expression_attribute_values(":d", s(d)),
                    None => put.condition_expression("version = :v"),
                };
                items.push(
                    TransactWriteItem::builder()
                        .put(put.build().expect("table and item are set"))
                        .build(),
                );
                if let Some(d) = entry_digest {
                    let check = ConditionCheck::builder()
                        .table_name(&self.table)
                        .key("PK", s(config_pk(&run.environment_id)))
                        .key("SK", s("CONFIG"))
                        .condition_expression("digest = :d")
                        .expression_attribute_values(":d", s(d))
                        .build()
                        .expect("table, key and condition are set");
                    items.push(TransactWriteItem::builder().condition_check(check).build());
                }
                next
            }
        };
        let lock_at = items.len();
        let lock = Put::builder()
            .table_name(&self.table)
            .item("PK", s(env_pk(&run.environment_id)))
            .item("SK", s("LOCK"))
            .item("run_id", s(&run.run_id))
            .item("owner", s(&owner.0))
            .item("lease_until", n(until.as_millisecond()))
            .item("expires_at", n(self.expires_at()))
            .condition_expression(LOCK_FREE)
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":now", n(now.as_millisecond()))
            .expression_attribute_values(":run", s(&run.run_id))
            .expression_attribute_values(":owner", s(&owner.0))
            .expression_attribute_values(":none", s(""))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .expect("table and item are set");
        items.push(TransactWriteItem::builder().put(lock).build());
        let Some(reasons) = self.transact(items, "start stage").await? else {
            return Ok(Started::Ok(written));
        };
        let failed = |i: usize| condition_failed(&reasons, i);
        if (0..lock_at).any(failed) {
            return Ok(Started::Stale);
        }
        if failed(lock_at) {
            let held = reasons[lock_at].item().and_then(Self::lock_from);
            return match held {
                Some(l) => Ok(Started::Held(l)),
                // Some servers do not return the old item: read it.
                None => match self.get_lock(&run.environment_id).await? {
                    Some(l) => Ok(Started::Held(l)),
                    None => Ok(Started::Stale),
                },
            };
        }
        // Cancelled for another reason (a concurrent transaction on one of the items).
        Err(Error::Conflict(format!(
            "stage start of run {} collided with another write; it will be retried",
            run.run_id
        )))
    }

    /// One transaction: the run over the version it had, and the lock handed over or deleted.
    /// When only the lock's condition fails (it lapsed and another run holds it now), the run
    /// is written alone.
    async fn finish_stage(&self, run: &Run, lock: &LockAfter) -> Result<Run> {
        let mut next = run.clone();
        next.version += 1;
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(self.run_item(&next)))
            .condition_expression("version = :v")
            .expression_attribute_values(":v", n(run.version))
            .build()
            .expect("table and item are set");
        let key =
            |pk: String| HashMap::from([("PK".to_string(), s(pk)), ("SK".to_string(), s("LOCK"))]);
        let lock_item = match lock {
            LockAfter::Handover { owner, grace } => TransactWriteItem::builder()
                .update(
                    Update::builder()
                        .table_name(&self.table)
                        .set_key(Some(key(env_pk(&run.environment_id))))
                        .update_expression("SET #o = :none, lease_until = :until")
                        .condition_expression("run_id = :run AND #o = :owner")
                        .expression_attribute_names("#o", "owner")
                        .expression_attribute_values(":none", s(""))
                        .expression_attribute_values(
                            ":until",
                            n((Timestamp::now() + *grace).as_millisecond()),
                        )
                        .expression_attribute_values(":run", s(&run.run_id))
                        .expression_attribute_values(":owner", s(&owner.0))
                        .build()
                        .expect("table, key and expression are set"),
                )
                .build(),
            LockAfter::Release => TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.table)
                        .set_key(Some(key(env_pk(&run.environment_id))))
                        .condition_expression("run_id = :run")
                        .expression_attribute_values(":run", s(&run.run_id))
                        .build()
                        .expect("table, key and condition are set"),
                )
                .build(),
        };
        let items = vec![TransactWriteItem::builder().put(put).build(), lock_item];
        let Some(reasons) = self.transact(items, "finish stage").await? else {
            return Ok(next);
        };
        let failed = |i: usize| condition_failed(&reasons, i);
        if failed(0) {
            Err(Error::Conflict(format!(
                "run {} changed since it was read (expected version {})",
                run.run_id, run.version
            )))
        } else if failed(1) {
            self.update_run(run).await
        } else {
            Err(Error::Conflict(format!(
                "recording run {} collided with another write; it will be retried",
                run.run_id
            )))
        }
    }

    fn checks_carried(&self) -> bool {
        true
    }

    async fn latest_run(&self, environment_id: &str) -> Result<Option<Run>> {
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk AND begins_with(SK, :sk)")
            .expression_attribute_values(":pk", s(env_pk(environment_id)))
            .expression_attribute_values(":sk", s("RUN#"))
            .scan_index_forward(false)
            .limit(1)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| store_err("Query runs", &e))?;
        match out.items.unwrap_or_default().first() {
            Some(item) => Self::decode_run(item),
            None => Ok(None),
        }
    }

    async fn recent_runs(&self, limit: usize) -> Result<Vec<Run>> {
        let items = self.query_gsi("RUNS", Some(limit)).await?;
        Ok(items
            .iter()
            .filter_map(|i| Self::decode_run(i).ok().flatten())
            .collect())
    }

    async fn acquire_lock(
        &self,
        environment_id: &str,
        run_id: &str,
        owner: &LeaseOwner,
        lease: Duration,
    ) -> Result<Result<Lock, Lock>> {
        let now = Timestamp::now();
        let until = now + lease;
        let res = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(env_pk(environment_id)))
            .item("SK", s("LOCK"))
            .item("run_id", s(run_id))
            .item("owner", s(&owner.0))
            .item("lease_until", n(until.as_millisecond()))
            .item("expires_at", n(self.expires_at()))
            .condition_expression(LOCK_FREE)
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":now", n(now.as_millisecond()))
            .expression_attribute_values(":run", s(run_id))
            .expression_attribute_values(":owner", s(&owner.0))
            .expression_attribute_values(":none", s(""))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match res {
            Ok(_) => Ok(Ok(Lock {
                environment_id: environment_id.into(),
                run_id: run_id.into(),
                owner: Some(owner.clone()),
                lease_until: until,
            })),
            Err(e) if is_condition_failed(&e) => {
                let held = match e.into_service_error() {
                    aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c) => c.item.as_ref().and_then(Self::lock_from),
                    _ => None,
                };
                match held {
                    Some(l) => Ok(Err(l)),
                    // Some servers do not return the old item: read it.
                    None => Ok(Err(self.get_lock(environment_id).await?.ok_or_else(
                        || Error::Conflict("lock changed while it was taken".into()),
                    )?)),
                }
            }
            Err(e) => Err(store_err("PutItem lock", &e)),
        }
    }

    async fn handover_lock(
        &self,
        environment_id: &str,
        run_id: &str,
        owner: &LeaseOwner,
        grace: Duration,
    ) -> Result<()> {
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(env_pk(environment_id)))
            .key("SK", s("LOCK"))
            .update_expression("SET #o = :none, lease_until = :until")
            .condition_expression("run_id = :run AND #o = :owner")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":none", s(""))
            .expression_attribute_values(":until", n((Timestamp::now() + grace).as_millisecond()))
            .expression_attribute_values(":run", s(run_id))
            .expression_attribute_values(":owner", s(&owner.0))
            .send()
            .await;
        unless_condition_failed(res, "UpdateItem lock")
    }

    async fn get_lock(&self, environment_id: &str) -> Result<Option<Lock>> {
        Ok(self
            .get_item(env_pk(environment_id), "LOCK")
            .await?
            .as_ref()
            .and_then(Self::lock_from))
    }

    async fn release_lock(&self, environment_id: &str, run_id: &str) -> Result<()> {
        let res = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("PK", s(env_pk(environment_id)))
            .key("SK", s("LOCK"))
            .condition_expression("run_id = :run")
            .expression_attribute_values(":run", s(run_id))
            .send()
            .await;
        unless_condition_failed(res, "DeleteItem lock")
    }

    async fn archive(
        &self,
        run_id: &str,
        environment_id: &str,
        rows: &[ArchivedRow],
    ) -> Result<()> {
        // Chunks of one table each, under the item size limit; a resumed run may archive a row
        // again in a new chunk, and reads keep the first copy.
        let mut chunks: Vec<(String, Vec<Value>)> = Vec::new();
        let mut size = 0;
        for r in rows {
            let v = serde_json::json!({"key": r.key, "row": r.row});
            let len = v.to_string().len();
            match chunks.last_mut() {
                Some((t, c)) if *t == r.table && size + len < CHUNK_BYTES => {
                    c.push(v);
                    size += len;
                }
                _ => {
                    chunks.push((r.table.clone(), vec![v]));
                    size = len;
                }
            }
        }
        let expires = self.expires_at();
        let requests: Vec<WriteRequest> = chunks
            .into_iter()
            .map(|(table, rows)| {
                let item = HashMap::from([
                    ("PK".to_string(), s(env_pk(environment_id))),
                    (
                        "SK".to_string(),
                        s(format!("ARCHIVE#{run_id}#{table}#{}", ulid::Ulid::new())),
                    ),
                    ("table_name".to_string(), s(table)),
                    ("rows".to_string(), s(Value::Array(rows).to_string())),
                    ("archived_at".to_string(), s(Timestamp::now().to_string())),
                    ("expires_at".to_string(), n(expires)),
                ]);
                WriteRequest::builder()
                    .put_request(
                        PutRequest::builder()
                            .set_item(Some(item))
                            .build()
                            .expect("item set"),
                    )
                    .build()
            })
            .collect();
        // Each chunk is up to 300 KB: a few per request keeps under the 16 MB request limit.
        for batch in requests.chunks(25) {
            let mut pending = HashMap::from([(self.table.clone(), batch.to_vec())]);
            let mut attempt = 0u32;
            while !pending.is_empty() {
                attempt += 1;
                let out = self
                    .client
                    .batch_write_item()
                    .set_request_items(Some(pending))
                    .send()
                    .await
                    .map_err(|e| store_err("BatchWriteItem archive", &e))?;
                pending = out
                    .unprocessed_items
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(_, v)| !v.is_empty())
                    .collect();
                if !pending.is_empty() {
                    if attempt >= 8 {
                        return Err(Error::store(
                            "DynamoDB kept returning unprocessed archive items",
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
            }
        }
        Ok(())
    }

    async fn archived_count(&self, run_id: &str, table: &str) -> Result<usize> {
        let Some(env) = self.environment_of(run_id).await? else {
            return Ok(0);
        };
        // Only this table's chunks, and only their keys are kept: a resumed clear of 200,000
        // rows counts them without holding the rows.
        let now = Timestamp::now().as_second();
        let mut keys = HashSet::new();
        for item in self
            .query_all(env_pk(&env), &format!("ARCHIVE#{run_id}#{table}#"))
            .await?
        {
            if get_n(&item, "expires_at").is_some_and(|t| t < now) {
                continue;
            }
            let rows: Vec<Value> = serde_json::from_str(get_s(&item, "rows").unwrap_or("[]"))
                .map_err(|e| Error::store(format!("archive chunk: {e}")))?;
            keys.extend(
                rows.iter()
                    .filter_map(|r| r["key"].as_str().map(str::to_string)),
            );
        }
        Ok(keys.len())
    }

    async fn archived(&self, run_id: &str) -> Result<Vec<ArchivedRow>> {
        let Some(env) = self.environment_of(run_id).await? else {
            return Ok(Vec::new());
        };
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let now = Timestamp::now().as_second();
        for item in self
            .query_all(env_pk(&env), &format!("ARCHIVE#{run_id}#"))
            .await?
        {
            if get_n(&item, "expires_at").is_some_and(|t| t < now) {
                continue;
            }
            let table = get_s(&item, "table_name").unwrap_or_default().to_string();
            let rows: Vec<Value> = serde_json::from_str(get_s(&item, "rows").unwrap_or("[]"))
                .map_err(|e| Error::store(format!("archive chunk: {e}")))?;
            for r in rows {
                let key = r["key"].as_str().unwrap_or_default().to_string();
                if seen.insert((table.clone(), key.clone())) {
                    out.push(ArchivedRow {
                        table: table.clone(),
                        key,
                        row: r["row"].clone(),
                    });
                }
            }
        }
        Ok(out)
    }

    async fn claim_trigger(
        &self,
        source: &str,
        operation_id: &str,
        run_id: &str,
    ) -> Result<Result<(), Claimed>> {
        let pk = format!("TRIGGER#{source}#{operation_id}");
        let res = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(&pk))
            .item("SK", s("TRIGGER"))
            .item("run_id", s(run_id))
            .item("seen_at", s(Timestamp::now().to_string()))
            .item("expires_at", n(self.expires_at()))
            .condition_expression("attribute_not_exists(PK)")
            .send()
            .await;
        match res {
            Ok(_) => Ok(Ok(())),
            Err(e) if is_condition_failed(&e) => {
                let item = self.get_item(pk, "TRIGGER").await?.unwrap_or_default();
                Ok(Err(Claimed {
                    run_id: get_s(&item, "run_id").unwrap_or_default().to_string(),
                    sent: matches!(item.get("sent"), Some(AttributeValue::Bool(true))),
                }))
            }
            Err(e) => Err(store_err("PutItem TRIGGER", &e)),
        }
    }

    async fn mark_trigger_sent(
        &self,
        source: &str,
        operation_id: &str,
        run_id: &str,
    ) -> Result<()> {
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(format!("TRIGGER#{source}#{operation_id}")))
            .key("SK", s("TRIGGER"))
            .update_expression("SET sent = :t")
            .condition_expression("run_id = :run")
            .expression_attribute_values(":t", AttributeValue::Bool(true))
            .expression_attribute_values(":run", s(run_id))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failed(&e) => Ok(()),
            Err(e) => Err(store_err("UpdateItem TRIGGER", &e)),
        }
    }

    async fn release_trigger(&self, source: &str, operation_id: &str, run_id: &str) -> Result<()> {
        let res = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("PK", s(format!("TRIGGER#{source}#{operation_id}")))
            .key("SK", s("TRIGGER"))
            .condition_expression("run_id = :run")
            .expression_attribute_values(":run", s(run_id))
            .send()
            .await;
        unless_condition_failed(res, "DeleteItem TRIGGER")
    }

    async fn get_cursor(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .get_item(format!("CURSOR#{key}"), "CURSOR")
            .await?
            .and_then(|i| get_s(&i, "value").map(str::to_string)))
    }

    async fn put_cursor(&self, key: &str, value: &str) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(format!("CURSOR#{key}")))
            .item("SK", s("CURSOR"))
            .item("value", s(value))
            .item("updated_at", s(Timestamp::now().to_string()))
            .send()
            .await
            .map_err(|e| store_err("PutItem CURSOR", &e))?;
        Ok(())
    }

    async fn record_rejected(&self, rejected: &Rejected) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("PK", s("REJECTED"))
            .item(
                "SK",
                s(format!("{}#{}", rejected.received_at, rejected.message_id)),
            )
            .item(
                "body",
                s(serde_json::to_string(rejected).expect("serialises")),
            )
            .item("expires_at", n(self.expires_at()))
            .send()
            .await
            .map_err(|e| store_err("PutItem REJECTED", &e))?;
        Ok(())
    }

    async fn rejected(&self, limit: usize) -> Result<Vec<Rejected>> {
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk")
            .expression_attribute_values(":pk", s("REJECTED"))
            .scan_index_forward(false)
            .limit(limit as i32)
            .send()
            .await
            .map_err(|e| store_err("Query REJECTED", &e))?;
        out.items
            .unwrap_or_default()
            .iter()
            .filter_map(|i| get_s(i, "body"))
            .map(|b| serde_json::from_str(b).map_err(|e| Error::store(e.to_string())))
            .collect()
    }
}
