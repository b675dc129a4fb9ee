//! relink's embedded adapters, for `relink run` on one machine: the SQLite progress store, the
//! in-process stage queue, secrets from the process environment, and same-host process liveness (a lease held by a dead process on
//! this host is void at once).

pub mod liveness;
pub mod queue;
pub mod secrets;
pub mod sqlite;

pub use liveness::{ProcessLiveness, local_owner};
pub use queue::MemQueue;
pub use secrets::EnvSecrets;
pub use sqlite::SqliteStore;
