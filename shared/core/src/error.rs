//! The library's error type, classified where errors arise as retryable or permanent.

use std::time::Duration;

/// Result with relink's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a stage, with a message that says what happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The queue event is malformed; the message names the field.
    #[error("invalid event: {0}")]
    BadEvent(String),
    /// The registry (relink.toml) or a command line is wrong.
    #[error("configuration error: {0}")]
    Config(String),
    /// The event names an environment the registry does not hold.
    #[error(
        "unknown environment `{0}`: it is not in the registry; check the spelling, or add an [environments.{0}] section to relink.toml (in AWS, then run relink env push {0})"
    )]
    UnknownEnvironment(String),
    /// A safety guard refused the run; nothing was deleted.
    #[error("refused: {0}")]
    Refused(String),
    /// A service rejected the credentials (401/403).
    #[error("{service} rejected relink's credentials (HTTP {status}{detail}): {hint}")]
    Auth {
        service: &'static str,
        status: u16,
        detail: String,
        hint: &'static str,
    },
    /// Throttling, 5xx or network trouble that outlasted every retry.
    #[error(
        "{service} is throttling or unavailable after {attempts} attempts: {detail}; run relink again later"
    )]
    Unavailable {
        service: &'static str,
        attempts: u32,
        detail: String,
        /// What the service last asked us to wait, if anything.
        retry_after: Option<Duration>,
    },
    /// A service answered with a client error that retrying will not fix.
    #[error("{service} answered HTTP {status}: {detail}")]
    Http {
        service: &'static str,
        status: u16,
        detail: String,
    },
    /// A service answered something relink cannot read.
    #[error("{service} sent an unreadable answer: {detail}")]
    Protocol {
        service: &'static str,
        detail: String,
    },
    /// Another run holds the environment's lock.
    #[error(
        "environment `{environment}` is locked by run {holder} (lease until {until}); it will be retried when the lease lapses"
    )]
    LockHeld {
        environment: String,
        holder: String,
        until: String,
    },
    /// A conditional write lost a race; re-read and retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The progress store (or queue, or secret store) failed; `source` is the adapter's error.
    #[error("progress store: {context}{}", suffix(source))]
    Store {
        context: String,
        #[source]
        source: Option<BoxError>,
    },
    /// A run id that the store does not know.
    /// A record in the progress store that cannot be decoded: retrying reads the same bytes, so
    /// it is permanent (recorded and acknowledged, not retried into the dead-letter queue).
    #[error("progress store: unreadable record: {0}")]
    Corrupt(String),

    #[error("run {0} not found in the progress store")]
    RunNotFound(String),
    /// The run is not in a state that allows the request.
    #[error("{0}")]
    InvalidState(String),
    /// A run waited for the operator's Reset past its give-up time.
    #[error("{0}")]
    GaveUp(String),
    /// The Reset through the dual-write gateway failed or timed out, and the entry says to fail.
    #[error("{0}")]
    Gateway(String),
}

impl Error {
    /// Whether trying the same work again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. }
                | Error::LockHeld { .. }
                | Error::Conflict(_)
                | Error::Store { .. }
        )
    }
}

/// An adapter's own error, carried as the source of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn suffix(source: &Option<BoxError>) -> String {
    source
        .as_ref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default()
}

impl Error {
    /// A store failure described by relink itself.
    pub fn store(context: impl Into<String>) -> Error {
        Error::Store {
            context: context.into(),
            source: None,
        }
    }

    /// A store failure caused by an adapter's error (SQLite, an AWS SDK).
    pub fn store_source(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::Store {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// An error with its chain of causes, `: `-separated (SDK and reqwest errors say little on
/// their own). A cause whose text the message already ends with is not repeated. Neither
/// relink's URLs nor the SDKs' messages carry secrets.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}
