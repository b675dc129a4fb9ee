//! The queue message, schema version 1 (docs/architecture.md). Unknown fields are rejected: a typo
//! such as `dryrun` must never be silently ignored by a destructive pipeline.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{RunOptions, Stage, Trigger};

/// The only schema version this build understands.
pub const SCHEMA_VERSION: u32 = 1;
/// Largest event body accepted, in bytes: a v1 event is a few hundred bytes, plus what it
/// carries ([`MAX_CARRIED_BYTES`]).
pub const MAX_EVENT_BYTES: usize = 16 * 1024 + MAX_CARRIED_BYTES;
/// Largest `carried` state an event holds; a stage whose run record is longer sends none.
pub const MAX_CARRIED_BYTES: usize = 48 * 1024;

/// One stage's work order, as carried on every queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageEvent {
    /// Schema version; defaults to 1.
    #[serde(default = "default_version")]
    pub version: u32,
    /// The run; minted (ULID) when absent, which only a `detect-mismatch` event may do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The registry key of the environment. Required.
    pub environment_id: String,
    /// The stage to run; defaults to `detect-mismatch`.
    #[serde(default = "default_stage")]
    pub stage: Stage,
    /// What started the run; `source` defaults to `manual`.
    #[serde(default)]
    pub trigger: Trigger,
    /// `dry_run` and `force`, both default false.
    #[serde(default)]
    pub options: RunOptions,
    /// What the previous stage stored, passed on by relink itself so the next stage can start
    /// without reading it again. An operator never writes it. It is used only when the store
    /// confirms, in the same conditional write that starts the stage, that both texts are byte
    /// for byte what it holds; otherwise the stage reads the store as if it were absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried: Option<Carried>,
}

/// The state an event carries from one stage to the next ([`StageEvent::carried`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Carried {
    /// The run record as the previous stage stored it (its JSON text).
    pub run: String,
    /// The environment's registry entry as the run read it from the table (its JSON text).
    pub entry: String,
}

impl Carried {
    /// The state to pass on, or `None` when it would make the event too long.
    pub fn new(run: &crate::model::Run, entry: &str) -> Option<Carried> {
        let run = serde_json::to_string(run).ok()?;
        (run.len() + entry.len() <= MAX_CARRIED_BYTES).then(|| Carried {
            run,
            entry: entry.to_string(),
        })
    }
}

fn default_version() -> u32 {
    SCHEMA_VERSION
}

fn default_stage() -> Stage {
    Stage::DetectMismatch
}

impl StageEvent {
    /// A fresh manual event for the first stage of a new run.
    pub fn manual(environment_id: &str, options: RunOptions) -> StageEvent {
        StageEvent {
            version: SCHEMA_VERSION,
            run_id: None,
            environment_id: environment_id.to_string(),
            stage: Stage::DetectMismatch,
            trigger: Trigger::manual(),
            options,
            carried: None,
        }
    }

    /// Parses and validates a queue message body.
    pub fn parse(body: &str) -> Result<StageEvent> {
        if body.len() > MAX_EVENT_BYTES {
            return Err(Error::BadEvent(format!(
                "body is {} bytes; an event is at most {MAX_EVENT_BYTES}",
                body.len()
            )));
        }
        if body.trim_start().starts_with('[') {
            // serde would read an array positionally, field by field: refuse it outright.
            return Err(Error::BadEvent(
                "the body is a JSON array; an event is a JSON object".into(),
            ));
        }
        let de = &mut serde_json::Deserializer::from_str(body);
        let ev: StageEvent = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let msg = elide_values(&e.inner().to_string());
            Error::BadEvent(if path == "." {
                msg
            } else {
                format!("field `{path}`: {msg}")
            })
        })?;
        ev.validate()?;
        Ok(ev)
    }

    /// Checks the fields serde cannot: version, id shapes, run id rules.
    pub fn validate(&self) -> Result<()> {
        if self.version != SCHEMA_VERSION {
            return Err(Error::BadEvent(format!(
                "field `version` is {}; this relink understands only version {SCHEMA_VERSION}",
                self.version
            )));
        }
        if !is_environment_id(&self.environment_id) {
            return Err(Error::BadEvent(
                "field `environment_id` is not a registry key (1-64 of a-z, 0-9, '-', '_', starting with a letter or digit)".into(),
            ));
        }
        match &self.run_id {
            Some(id) if ulid::Ulid::from_string(id).is_err() => {
                return Err(Error::BadEvent(
                    "field `run_id` is not a ULID (26 characters of Crockford base32)".into(),
                ));
            }
            None if self.stage != Stage::DetectMismatch => {
                return Err(Error::BadEvent(format!(
                    "field `run_id` is required for stage `{}`: only detect-mismatch starts a new run",
                    self.stage
                )));
            }
            _ => {}
        }
        if let Some(c) = &self.carried
            && c.run.len() + c.entry.len() > MAX_CARRIED_BYTES
        {
            return Err(Error::BadEvent(format!(
                "field `carried` is longer than {MAX_CARRIED_BYTES} bytes"
            )));
        }
        if !is_token(&self.trigger.source, 32) {
            return Err(Error::BadEvent(
                "field `trigger.source` must be 1-32 of a-z, 0-9, '-', '_'".into(),
            ));
        }
        if let Some(op) = &self.trigger.operation_id
            && (op.is_empty()
                || op.len() > 128
                || op.chars().any(|c| c.is_control() || c == '/' || c == ':'))
        {
            return Err(Error::BadEvent(
                "field `trigger.operation_id` must be 1-128 characters without '/', ':' or control characters"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The event for the next stage of the same run (carrying nothing).
    pub fn for_stage(&self, run_id: &str, stage: Stage) -> StageEvent {
        StageEvent {
            run_id: Some(run_id.to_string()),
            stage,
            carried: None,
            ..self.clone()
        }
    }

    /// The JSON body to put on a queue.
    pub fn to_body(&self) -> String {
        serde_json::to_string(self).expect("an event always serialises")
    }
}

/// The SHA-256 of a stored text, in hex: how a store and an event agree that carried state is
/// what the store holds.
pub fn digest(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Replaces quoted values in a parser message with `"…"`: a poison message may carry a
/// credential, and error messages end up in logs and records. Field names (in backticks) stay.
fn elide_values(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut in_quote = false;
    for c in msg.chars() {
        match (c, in_quote) {
            ('"', false) => {
                in_quote = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                in_quote = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

/// Whether `s` is a valid registry key.
pub fn is_environment_id(s: &str) -> bool {
    is_token(s, 64)
}

fn is_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_event_gets_documented_defaults() {
        let ev = StageEvent::parse(r#"{"environment_id":"contoso-uat"}"#).unwrap();
        assert_eq!(ev.version, 1);
        assert_eq!(ev.stage, Stage::DetectMismatch);
        assert_eq!(ev.run_id, None);
        assert_eq!(ev.trigger.source, "manual");
        assert_eq!(
            ev.options,
            RunOptions {
                dry_run: false,
                force: false
            }
        );
    }

    #[test]
    fn full_documented_event_parses() {
        let body = r#"{"version":1,"run_id":"01JDQ4N9Z3W8B7C6X5V4T3S2R1","environment_id":"contoso-uat",
            "stage":"purge-keys","trigger":{"source":"manual","operation_id":"55eb","observed_at":"2026-11-26T05:00:00Z"},
            "options":{"dry_run":false,"force":true}}"#;
        let ev = StageEvent::parse(body).unwrap();
        assert_eq!(ev.stage, Stage::PurgeKeys);
        assert!(ev.options.force);
        let again = StageEvent::parse(&ev.to_body()).unwrap();
        assert_eq!(again, ev);
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let e =
            StageEvent::parse(r#"{"environment_id":"a","options":{"dryrun":true}}"#).unwrap_err();
        assert!(e.to_string().contains("dryrun"), "{e}");
        let e = StageEvent::parse(r#"{"environment_id":"a","dataverse_url":"https://evil"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("dataverse_url"), "{e}");
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            (r#"{"environment_id":"a","version":2}"#, "version"),
            (
                r#"{"environment_id":"https://x.crm.dynamics.com"}"#,
                "environment_id",
            ),
            (r#"{"environment_id":"a","run_id":"nope"}"#, "run_id"),
            (r#"{"environment_id":"a","stage":"purge-keys"}"#, "run_id"),
            (r#"{"environment_id":"a","stage":"explode"}"#, "explode"),
            (r#"{"environment_id":7}"#, "invalid type"),
            (r#"{}"#, "environment_id"),
            ("not json", "expected"),
        ];
        for (body, needle) in cases {
            let e = StageEvent::parse(body).unwrap_err().to_string();
            assert!(e.contains(needle), "{body}: {e}");
        }
        let e = StageEvent::parse(r#"{"environment_id":"a","version":"Bearer eyJhbGciOi"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("version") && !e.contains("eyJ"),
            "values are elided: {e}"
        );
        let big = format!(
            r#"{{"environment_id":"a","trigger":{{"operation_id":"{}"}}}}"#,
            "x".repeat(MAX_EVENT_BYTES)
        );
        assert!(
            StageEvent::parse(&big)
                .unwrap_err()
                .to_string()
                .contains("at most")
        );
    }
}
