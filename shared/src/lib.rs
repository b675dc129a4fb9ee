//! relink's library: the queue event, the registry, the run and stage model, the ports the
//! domain logic depends on, their adapters (SQLite store, in-process queue, Entra / Dataverse /
//! F&O HTTP clients) and the four stages. Binaries (the CLI, the Lambda functions) only wire
//! adapters to [`pipeline`].

pub mod aws;
pub mod error;
pub mod event;
pub mod failpoint;
#[cfg(test)]
mod fakes;
pub mod http;
pub mod ingest;
pub mod lambda;
pub mod model;
pub mod notify;
pub mod pacing;
pub mod pipeline;
pub mod ports;
pub mod progress;
pub mod queue_mem;
pub mod redact;
pub mod registry;
pub mod stages;
pub mod store_sqlite;
pub mod watch;

pub use error::{Error, Result};
