//! The embedded progress store: one SQLite file holding the same model as the DynamoDB table
//! (runs, environment locks, archive). Writes that move a state are conditional on the version
//! read; the lock is taken inside an immediate transaction, so two relink processes sharing the
//! file cannot both hold an environment.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use relink_core::error::{Error, Result};
use relink_core::model::Run;
use relink_core::ports::{ArchivedRow, Claimed, LeaseOwner, Lock, ProgressStore, Rejected};

/// SQLite's errors as the store's, with SQLite's error as the source.
trait Db<T> {
    fn db(self) -> Result<T>;
}

impl<T> Db<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T> {
        self.map_err(|e| Error::store_source("SQLite", e))
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    environment_id TEXT NOT NULL,
    status TEXT NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_env ON runs (environment_id, run_id);
CREATE TABLE IF NOT EXISTS locks (
    environment_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    lease_until_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS archive (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    environment_id TEXT NOT NULL,
    table_name TEXT NOT NULL,
    row_key TEXT NOT NULL,
    row_json TEXT NOT NULL,
    archived_at TEXT NOT NULL,
    UNIQUE (run_id, table_name, row_key)
);
CREATE TABLE IF NOT EXISTS triggers (
    source TEXT NOT NULL,
    operation_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, operation_id)
);
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL
);
";

/// SQLite-backed [`ProgressStore`].
pub struct SqliteStore {
    // SQLite calls here are short local-file operations, so they run inline on the async
    // task rather than on a blocking pool.
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store file. It holds archived rows of business systems, so
    /// it is created readable and writable by its owner only (0600), and an existing file is
    /// narrowed to that; SQLite gives its `-wal` and `-shm` files the database file's mode.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        owner_only(path)?;
        let conn = Connection::open(path)
            .map_err(|e| Error::store(format!("cannot open {}: {e}", path.display())))?;
        Self::init(conn)
    }

    /// An in-memory store, for unit tests.
    pub fn in_memory() -> Result<SqliteStore> {
        Self::init(Connection::open_in_memory().db()?)
    }

    fn init(conn: Connection) -> Result<SqliteStore> {
        conn.busy_timeout(Duration::from_secs(10)).db()?;
        conn.pragma_update(None, "journal_mode", "WAL").db()?;
        conn.pragma_update(None, "synchronous", "NORMAL").db()?;
        conn.execute_batch(SCHEMA).db()?;
        // Stores made before claims recorded their send: add the column (fails if present).
        conn.execute(
            "ALTER TABLE triggers ADD COLUMN sent INTEGER NOT NULL DEFAULT 0",
            [],
        )
        .ok();
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Creates `path` with mode 0600 if it is missing, or narrows an existing file to 0600.
fn owner_only(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let cannot = |e: std::io::Error| {
            Error::store(format!(
                "cannot create {} readable by its owner only: {e}",
                path.display()
            ))
        };
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(cannot)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(cannot)?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn decode(body: String) -> Result<Run> {
    serde_json::from_str(&body).map_err(|e| Error::Corrupt(format!("run record: {e}")))
}

fn encode(run: &Run) -> String {
    serde_json::to_string(run).expect("a run always serialises")
}

fn lock_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Lock> {
    let ms: i64 = row.get(3)?;
    Ok(Lock {
        environment_id: row.get(0)?,
        run_id: row.get(1)?,
        owner: Some(row.get::<_, String>(2)?)
            .filter(|o| !o.is_empty())
            .map(LeaseOwner),
        lease_until: Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH),
    })
}

#[async_trait]
impl ProgressStore for SqliteStore {
    async fn create_run(&self, run: &Run) -> Result<()> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO runs (run_id, environment_id, status, version, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![run.run_id, run.environment_id, run.status.as_str(), run.version as i64, encode(run)],
        ).db()?;
        if n == 0 {
            return Err(Error::Conflict(format!(
                "run {} already exists",
                run.run_id
            )));
        }
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Option<Run>> {
        let body: Option<String> = self
            .conn()
            .query_row("SELECT body FROM runs WHERE run_id = ?1", [run_id], |r| {
                r.get(0)
            })
            .optional()
            .db()?;
        body.map(decode).transpose()
    }

    async fn update_run(&self, run: &Run) -> Result<Run> {
        let mut next = run.clone();
        next.version += 1;
        let n = self.conn().execute(
            "UPDATE runs SET status = ?1, version = ?2, body = ?3 WHERE run_id = ?4 AND version = ?5",
            params![next.status.as_str(), next.version as i64, encode(&next), run.run_id, run.version as i64],
        ).db()?;
        if n == 0 {
            return Err(Error::Conflict(format!(
                "run {} changed since it was read (expected version {})",
                run.run_id, run.version
            )));
        }
        Ok(next)
    }

    async fn latest_run(&self, environment_id: &str) -> Result<Option<Run>> {
        let body: Option<String> = self
            .conn()
            .query_row(
                "SELECT body FROM runs WHERE environment_id = ?1 ORDER BY run_id DESC LIMIT 1",
                [environment_id],
                |r| r.get(0),
            )
            .optional()
            .db()?;
        body.map(decode).transpose()
    }

    async fn recent_runs(&self, limit: usize) -> Result<Vec<Run>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT body FROM runs ORDER BY run_id DESC LIMIT ?1")
            .db()?;
        let bodies = stmt
            .query_map([limit as i64], |r| r.get::<_, String>(0))
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()?;
        bodies.into_iter().map(decode).collect()
    }

    async fn acquire_lock(
        &self,
        environment_id: &str,
        run_id: &str,
        owner: &LeaseOwner,
        lease: Duration,
    ) -> Result<Result<Lock, Lock>> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .db()?;
        let now = Timestamp::now();
        let current = tx
            .query_row(
                "SELECT environment_id, run_id, owner, lease_until_ms FROM locks WHERE environment_id = ?1",
                [environment_id],
                lock_from_row,
            )
            .optional().db()?;
        if let Some(held) = current
            && held.lease_until > now
            && !(held.run_id == run_id && held.owner.as_ref().is_none_or(|o| o == owner))
        {
            return Ok(Err(held));
        }
        let until = now + lease;
        tx.execute(
            "INSERT INTO locks (environment_id, run_id, owner, lease_until_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (environment_id) DO UPDATE SET run_id = ?2, owner = ?3, lease_until_ms = ?4",
            params![environment_id, run_id, owner.0, until.as_millisecond()],
        ).db()?;
        tx.commit().db()?;
        Ok(Ok(Lock {
            environment_id: environment_id.into(),
            run_id: run_id.into(),
            owner: Some(owner.clone()),
            lease_until: until,
        }))
    }

    async fn handover_lock(
        &self,
        environment_id: &str,
        run_id: &str,
        owner: &LeaseOwner,
        grace: Duration,
    ) -> Result<()> {
        let until = Timestamp::now() + grace;
        self.conn().execute(
            "UPDATE locks SET owner = '', lease_until_ms = ?1 WHERE environment_id = ?2 AND run_id = ?3 AND owner = ?4",
            params![until.as_millisecond(), environment_id, run_id, owner.0],
        ).db()?;
        Ok(())
    }

    async fn get_lock(&self, environment_id: &str) -> Result<Option<Lock>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT environment_id, run_id, owner, lease_until_ms FROM locks WHERE environment_id = ?1",
                [environment_id],
                lock_from_row,
            )
            .optional().db()?)
    }

    async fn release_lock(&self, environment_id: &str, run_id: &str) -> Result<()> {
        self.conn()
            .execute(
                "DELETE FROM locks WHERE environment_id = ?1 AND run_id = ?2",
                params![environment_id, run_id],
            )
            .db()?;
        Ok(())
    }

    async fn archive(
        &self,
        run_id: &str,
        environment_id: &str,
        rows: &[ArchivedRow],
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().db()?;
        {
            let mut stmt = tx.prepare(
                "INSERT OR IGNORE INTO archive (run_id, environment_id, table_name, row_key, row_json, archived_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            ).db()?;
            let now = Timestamp::now().to_string();
            for r in rows {
                stmt.execute(params![
                    run_id,
                    environment_id,
                    r.table,
                    r.key,
                    r.row.to_string(),
                    now
                ])
                .db()?;
            }
        }
        tx.commit().db()?;
        Ok(())
    }

    async fn note_waiting(&self, _environment_id: &str, run_id: &str, note: &str) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE runs SET body = json_set(body, '$.waiting', ?2) WHERE run_id = ?1",
                [run_id, note],
            )
            .db()?;
        Ok(())
    }

    async fn archived_count(&self, run_id: &str, table: &str) -> Result<usize> {
        let n: i64 = self
            .conn()
            .query_row(
                "SELECT COUNT(*) FROM archive WHERE run_id = ?1 AND table_name = ?2",
                [run_id, table],
                |r| r.get(0),
            )
            .db()?;
        Ok(n as usize)
    }

    async fn archived(&self, run_id: &str) -> Result<Vec<ArchivedRow>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT table_name, row_key, row_json FROM archive WHERE run_id = ?1 ORDER BY seq",
            )
            .db()?;
        let rows = stmt
            .query_map([run_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()?;
        rows.into_iter()
            .map(|(table, key, json)| {
                Ok(ArchivedRow {
                    table,
                    key,
                    row: serde_json::from_str(&json).map_err(|e| Error::store(e.to_string()))?,
                })
            })
            .collect()
    }

    async fn claim_trigger(
        &self,
        source: &str,
        operation_id: &str,
        run_id: &str,
    ) -> Result<Result<(), Claimed>> {
        let conn = self.conn();
        let n = conn.execute(
            "INSERT OR IGNORE INTO triggers (source, operation_id, run_id, seen_at) VALUES (?1, ?2, ?3, ?4)",
            params![source, operation_id, run_id, Timestamp::now().to_string()],
        ).db()?;
        if n == 1 {
            return Ok(Ok(()));
        }
        let (run_id, sent): (String, i64) = conn
            .query_row(
                "SELECT run_id, sent FROM triggers WHERE source = ?1 AND operation_id = ?2",
                params![source, operation_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .db()?;
        Ok(Err(Claimed {
            run_id,
            sent: sent != 0,
        }))
    }

    async fn mark_trigger_sent(
        &self,
        source: &str,
        operation_id: &str,
        run_id: &str,
    ) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE triggers SET sent = 1 WHERE source = ?1 AND operation_id = ?2 AND run_id = ?3",
                params![source, operation_id, run_id],
            )
            .db()?;
        Ok(())
    }

    async fn release_trigger(&self, source: &str, operation_id: &str, run_id: &str) -> Result<()> {
        self.conn()
            .execute(
                "DELETE FROM triggers WHERE source = ?1 AND operation_id = ?2 AND run_id = ?3",
                params![source, operation_id, run_id],
            )
            .db()?;
        Ok(())
    }

    async fn get_cursor(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM cursors WHERE name = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .db()?)
    }

    async fn put_cursor(&self, key: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO cursors (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = ?2",
            params![key, value],
        ).db()?;
        Ok(())
    }

    async fn record_rejected(&self, rejected: &Rejected) -> Result<()> {
        let body = serde_json::to_string(rejected).expect("serialises");
        self.conn()
            .execute("INSERT INTO rejected (body) VALUES (?1)", [body])
            .db()?;
        Ok(())
    }

    async fn rejected(&self, limit: usize) -> Result<Vec<Rejected>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT body FROM rejected ORDER BY seq DESC LIMIT ?1")
            .db()?;
        let bodies = stmt
            .query_map([limit as i64], |r| r.get::<_, String>(0))
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()?;
        bodies
            .into_iter()
            .map(|b| serde_json::from_str(&b).map_err(|e| Error::store(e.to_string())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relink_core::model::{RunOptions, RunStatus, Trigger};
    use serde_json::json;

    #[cfg(unix)]
    #[test]
    fn the_store_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!(
            "relink-perm-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relink.db");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        drop(SqliteStore::open(&path).unwrap());
        assert_eq!(mode(&path), 0o600);
        // A file left readable by others is narrowed when relink opens it.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        drop(store);
        std::fs::remove_dir_all(&dir).ok();
    }

    fn run(id: &str) -> Run {
        Run::new(
            id.into(),
            "env-a".into(),
            RunOptions::default(),
            Trigger::default(),
        )
    }

    #[tokio::test]
    async fn updates_are_conditional_on_the_version_read() {
        let store = SqliteStore::in_memory().unwrap();
        let r = run("01JDQ4N9Z3W8B7C6X5V4T3S2R1");
        store.create_run(&r).await.unwrap();
        assert!(matches!(
            store.create_run(&r).await,
            Err(Error::Conflict(_))
        ));
        let mut a = r.clone();
        a.set_status(RunStatus::Running).unwrap();
        let a = store.update_run(&a).await.unwrap();
        assert_eq!(a.version, 1);
        let mut stale = r.clone();
        stale.set_status(RunStatus::Refused).unwrap();
        assert!(matches!(
            store.update_run(&stale).await,
            Err(Error::Conflict(_))
        ));
        assert_eq!(
            store.get_run(&r.run_id).await.unwrap().unwrap().status,
            RunStatus::Running
        );
    }

    #[tokio::test]
    async fn one_run_holds_an_environment_until_its_lease_lapses() {
        let store = SqliteStore::in_memory().unwrap();
        let (a, b) = (LeaseOwner("a".into()), LeaseOwner("b".into()));
        store
            .acquire_lock("env-a", "r1", &a, Duration::from_millis(200))
            .await
            .unwrap()
            .unwrap();
        let held = store
            .acquire_lock("env-a", "r2", &b, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(held.run_id, "r1");
        // The same run on another worker waits for the owner too...
        assert!(
            store
                .acquire_lock("env-a", "r1", &b, Duration::from_secs(5))
                .await
                .unwrap()
                .is_err()
        );
        // ...until the owner hands over between stages; other runs still wait.
        store
            .handover_lock("env-a", "r1", &a, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            store
                .acquire_lock("env-a", "r2", &b, Duration::from_secs(5))
                .await
                .unwrap()
                .is_err()
        );
        store
            .acquire_lock("env-a", "r1", &b, Duration::from_millis(200))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        store
            .acquire_lock("env-a", "r2", &a, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        store.release_lock("env-a", "r1").await.unwrap();
        assert_eq!(store.get_lock("env-a").await.unwrap().unwrap().run_id, "r2");
        store.release_lock("env-a", "r2").await.unwrap();
        assert!(store.get_lock("env-a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn archiving_a_row_twice_keeps_one_copy() {
        let store = SqliteStore::in_memory().unwrap();
        let row = |k: &str| ArchivedRow {
            table: "t".into(),
            key: k.into(),
            row: json!({"k": k}),
        };
        store
            .archive("r1", "env-a", &[row("1"), row("2")])
            .await
            .unwrap();
        store
            .archive("r1", "env-a", &[row("2"), row("3")])
            .await
            .unwrap();
        let keys: Vec<_> = store
            .archived("r1")
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(keys, ["1", "2", "3"]);
    }
}
