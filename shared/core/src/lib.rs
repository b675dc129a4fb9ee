//! relink's core: the v1 queue event, the registry, the run and stage model, the ports the
//! domain depends on, the stages, the pipeline engine, pacing decisions, redaction, notification
//! parsing and run starting. It does no I/O of its own: adapters (the `relink-dynamics`,
//! `relink-aws` and `relink-embedded` crates) implement [`ports`], binaries wire them to
//! [`pipeline::Engine`]. docs/architecture.md has the crate map.

pub mod error;
pub mod event;
pub mod failpoint;
#[cfg(any(test, feature = "test-support"))]
pub mod fakes;
pub mod model;
pub mod notice;
pub mod notify;
pub mod pacing;
pub mod pipeline;
pub mod ports;
pub mod probe;
pub mod progress;
pub mod redact;
pub mod registry;
pub mod stages;
pub mod trigger;

pub use error::{Error, Result};
