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
    /// The progress store failed.
    #[error("progress store: {0}")]
    Store(String),
    /// A run id that the store does not know.
    #[error("run {0} not found in the progress store")]
    RunNotFound(String),
    /// The run is not in a state that allows the request.
    #[error("{0}")]
    InvalidState(String),
}

impl Error {
    /// Whether trying the same work again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. }
                | Error::LockHeld { .. }
                | Error::Conflict(_)
                | Error::Store(_)
        )
    }
}

/// An error with its chain of causes, `: `-separated (SDK and reqwest errors say little on
/// their own). Neither relink's URLs nor the SDKs' messages carry secrets.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.to_string())
    }
}
