//! Restore notifications from the customer's own pipelines: signature check (HMAC-SHA256 over
//! `{timestamp}.{raw body}`, timestamps older than five minutes refused, constant-time
//! comparison) and the bodies relink understands. Pure functions: the Lambda handler
//! (`ingest`) does the I/O.
//!
//! Headers: `X-Relink-Timestamp: <unix seconds>` and `X-Relink-Signature: sha256=<hex>`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use jiff::Timestamp;
use serde_json::{Map, Value};
use sha2::Sha256;

/// Header carrying the signing time (unix seconds).
pub const TIMESTAMP_HEADER: &str = "x-relink-timestamp";
/// Header carrying `sha256=<hex HMAC>`.
pub const SIGNATURE_HEADER: &str = "x-relink-signature";
/// Oldest (or furthest in the future) a signed timestamp may be.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// Largest body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why a notification is refused, with the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401: signature or timestamp.
    Unauthorized(String),
    /// 400: unreadable body.
    BadRequest(String),
}

impl Refusal {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Unauthorized(_) => 401,
            Refusal::BadRequest(_) => 400,
        }
    }
    /// The reason given to the caller.
    pub fn reason(&self) -> &str {
        match self {
            Refusal::Unauthorized(r) | Refusal::BadRequest(r) => r,
        }
    }
}

/// Computes the signature header value for a body (for senders and tests).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    format!(
        "sha256={}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks the timestamp and the signature of a notification.
pub fn verify(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: Timestamp,
) -> Result<(), Refusal> {
    let unauthorized = |m: &str| Err(Refusal::Unauthorized(m.to_string()));
    let Some(ts) = timestamp else {
        return unauthorized("missing X-Relink-Timestamp header (unix seconds of signing)");
    };
    let Ok(ts) = ts.trim().parse::<i64>() else {
        return unauthorized("X-Relink-Timestamp is not a number of unix seconds");
    };
    let skew = (now.as_second() - ts).unsigned_abs();
    if skew > MAX_SKEW.as_secs() {
        return unauthorized(&format!(
            "X-Relink-Timestamp is {skew} s away from now; notifications must be signed within 5 minutes of sending (replays are refused)"
        ));
    }
    let Some(sig) = signature else {
        return unauthorized(
            "missing X-Relink-Signature header (sha256=<hex HMAC-SHA256 of \"{timestamp}.{body}\">)",
        );
    };
    let Some(bytes) = sig.trim().strip_prefix("sha256=").and_then(unhex) else {
        return unauthorized("X-Relink-Signature must be sha256=<64 hex digits>");
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{ts}.").as_bytes());
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&bytes)
        .or_else(|_| unauthorized("signature does not match the body and timestamp"))
}

/// Which environment a notification names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvRef {
    /// A registry key.
    Registry(String),
    /// An LCS environment id (`lcs_environment_id` in the registry).
    Lcs(String),
    /// A Power Platform environment id (`power_platform_environment_id` in the registry).
    PowerPlatform(String),
}

/// A notification that asks for a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// `notification-generic`, `lcs-dbmovement`, `lcs-history`, `power-platform`.
    pub source: &'static str,
    pub environment: EnvRef,
    pub operation: String,
    pub operation_id: String,
}

/// What a readable notification means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A completed restore-type operation: start a run.
    Restore(Notice),
    /// Acknowledged and ignored (not completed, not a restore), with the reason.
    Ignored(String),
}

/// LCS environment history types that restore or copy a database [D/C; keep in step with LCS].
pub const LCS_RESTORE_TYPES: [&str; 6] = [
    "SFSourceDbToSandbox",
    "PointInTimeRestore",
    "PointInTimeRestoreProd",
    "PointInTimeRestoreSandbox",
    "ImportDatabase",
    "SandboxToSandbox",
];
/// Generic `operation` values that mean a restore.
pub const GENERIC_RESTORE_OPERATIONS: [&str; 6] = [
    "restore",
    "refresh",
    "copy",
    "point-in-time-restore",
    "database-refresh",
    "import",
];
/// Power Platform operation types that restore or copy an environment.
pub const POWER_PLATFORM_RESTORE_TYPES: [&str; 3] = ["Copy", "Restore", "NewCopy"];

fn string_field(obj: &Map<String, Value>, names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| match obj.get(*n) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        // Power Platform writes some enums as {"id": "..."}.
        Some(Value::Object(o)) => o.get("id").and_then(Value::as_str).map(str::to_string),
        _ => None,
    })
}

fn required(obj: &Map<String, Value>, names: &[&str], kind: &str) -> Result<String, Refusal> {
    string_field(obj, names).ok_or_else(|| {
        Refusal::BadRequest(format!(
            "{kind} notification without `{}` (a non-empty string)",
            names[0]
        ))
    })
}

fn check_id(value: String, field: &str) -> Result<String, Refusal> {
    if value.len() > 128 || value.chars().any(|c| c.is_control()) {
        return Err(Refusal::BadRequest(format!(
            "`{field}` must be at most 128 printable characters"
        )));
    }
    Ok(value)
}

/// Reads a notification body.
pub fn parse(body: &[u8]) -> Result<Parsed, Refusal> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Refusal::BadRequest(format!(
            "body is {} bytes; at most {MAX_BODY_BYTES}",
            body.len()
        )));
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| Refusal::BadRequest("body is not UTF-8 text".into()))?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Refusal::BadRequest(format!(
            "body is not JSON: {}",
            e.to_string().split(" at line").next().unwrap_or("invalid")
        ))
    })?;
    let Value::Object(obj) = value else {
        return Err(Refusal::BadRequest("body must be a JSON object".into()));
    };
    if obj.contains_key("environment_id") {
        generic(&obj)
    } else if obj.contains_key("OperationStatus") {
        lcs_dbmovement(&obj)
    } else if obj.contains_key("ActivityId") && obj.contains_key("Type") {
        lcs_history(&obj)
    } else if (obj.contains_key("operationType") || obj.contains_key("type"))
        && obj.contains_key("id")
        || obj.contains_key("operationId") && obj.contains_key("name")
    {
        power_platform(&obj)
    } else {
        Err(Refusal::BadRequest(
            "unrecognised notification: send {\"environment_id\",\"operation\",\"operation_id\",\"completed_at\"}, an LCS database movement status (OperationStatus), an LCS environment history entry (Type, Status, ActivityId, EnvironmentId) or a Power Platform operation (id, operationType, status, environmentId)".into(),
        ))
    }
}

fn generic(obj: &Map<String, Value>) -> Result<Parsed, Refusal> {
    const FIELDS: [&str; 5] = [
        "environment_id",
        "operation",
        "operation_id",
        "completed_at",
        "status",
    ];
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(Refusal::BadRequest(format!(
            "unknown field `{unknown}`; expected one of {}",
            FIELDS.join(", ")
        )));
    }
    let env = required(obj, &["environment_id"], "generic")?;
    if !crate::event::is_environment_id(&env) {
        return Err(Refusal::BadRequest(
            "`environment_id` is not a registry key".into(),
        ));
    }
    let operation = required(obj, &["operation"], "generic")?;
    let operation_id = check_id(required(obj, &["operation_id"], "generic")?, "operation_id")?;
    if let Some(c) = obj.get("completed_at") {
        c.as_str()
            .and_then(|s| s.parse::<Timestamp>().ok())
            .ok_or_else(|| Refusal::BadRequest("`completed_at` must be an RFC 3339 time".into()))?;
    }
    if let Some(status) = string_field(obj, &["status"])
        && !["completed", "succeeded"].contains(&status.to_ascii_lowercase().as_str())
    {
        return Ok(Parsed::Ignored(format!(
            "operation {operation_id} is {status}, not completed"
        )));
    }
    if !GENERIC_RESTORE_OPERATIONS.contains(&operation.to_ascii_lowercase().as_str()) {
        return Ok(Parsed::Ignored(format!(
            "operation `{operation}` is not a restore ({})",
            GENERIC_RESTORE_OPERATIONS.join(", ")
        )));
    }
    Ok(Parsed::Restore(Notice {
        source: "notification",
        environment: EnvRef::Registry(env),
        operation,
        operation_id,
    }))
}

fn lcs_dbmovement(obj: &Map<String, Value>) -> Result<Parsed, Refusal> {
    let status = required(obj, &["OperationStatus"], "LCS database movement")?;
    let operation_id = check_id(
        required(
            obj,
            &["OperationActivityId", "ActivityId"],
            "LCS database movement",
        )?,
        "OperationActivityId",
    )?;
    let env = check_id(
        required(obj, &["EnvironmentId"], "LCS database movement")?,
        "EnvironmentId",
    )?;
    if obj.get("IsSuccess") == Some(&Value::Bool(false)) {
        let why = obj
            .get("ErrorMessage")
            .and_then(Value::as_str)
            .unwrap_or("no message");
        return Ok(Parsed::Ignored(format!(
            "LCS reported IsSuccess = false for {operation_id}: {why}"
        )));
    }
    if status != "Completed" {
        return Ok(Parsed::Ignored(format!(
            "database movement {operation_id} is {status}, not Completed"
        )));
    }
    Ok(Parsed::Restore(Notice {
        source: "lcs",
        environment: EnvRef::Lcs(env),
        operation: "database movement".into(),
        operation_id,
    }))
}

fn lcs_history(obj: &Map<String, Value>) -> Result<Parsed, Refusal> {
    let kind = required(obj, &["Type"], "LCS environment history")?;
    let status = required(obj, &["Status"], "LCS environment history")?;
    let operation_id = check_id(
        required(obj, &["ActivityId"], "LCS environment history")?,
        "ActivityId",
    )?;
    let env = check_id(
        required(obj, &["EnvironmentId"], "LCS environment history")?,
        "EnvironmentId",
    )?;
    if !LCS_RESTORE_TYPES.contains(&kind.as_str()) {
        return Ok(Parsed::Ignored(format!(
            "LCS operation type {kind} is not a restore or copy"
        )));
    }
    if !["Completed", "Succeeded"].contains(&status.as_str()) {
        return Ok(Parsed::Ignored(format!(
            "LCS operation {operation_id} is {status}, not Completed"
        )));
    }
    Ok(Parsed::Restore(Notice {
        source: "lcs",
        environment: EnvRef::Lcs(env),
        operation: kind,
        operation_id,
    }))
}

fn power_platform(obj: &Map<String, Value>) -> Result<Parsed, Refusal> {
    // Both the documented operation (`operationId`, `name`) and the older notice shape (`id`,
    // `operationType`) are read.
    let kind = required(
        obj,
        &["operationType", "type", "name"],
        "Power Platform operation",
    )?;
    let status = required(obj, &["status", "state"], "Power Platform operation")?;
    let operation_id = check_id(
        required(obj, &["id", "operationId"], "Power Platform operation")?,
        "id",
    )?;
    let env = check_id(
        required(
            obj,
            &["environmentId", "environment"],
            "Power Platform operation",
        )?,
        "environmentId",
    )?;
    if !POWER_PLATFORM_RESTORE_TYPES.contains(&kind.as_str()) {
        return Ok(Parsed::Ignored(format!(
            "Power Platform operation type {kind} is not a copy or restore"
        )));
    }
    if status != "Succeeded" {
        return Ok(Parsed::Ignored(format!(
            "Power Platform operation {operation_id} is {status}, not Succeeded"
        )));
    }
    Ok(Parsed::Restore(Notice {
        source: "power-platform",
        environment: EnvRef::PowerPlatform(env),
        operation: kind,
        operation_id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"notify-secret";

    fn now() -> Timestamp {
        Timestamp::from_second(1_764_133_200).unwrap()
    }

    #[test]
    fn a_correct_signature_passes_and_every_tampering_fails() {
        let body =
            br#"{"environment_id":"contoso-uat","operation":"refresh","operation_id":"op-1"}"#;
        let ts = now().as_second();
        let sig = sign(SECRET, ts, body);
        assert_eq!(
            verify(SECRET, Some(&ts.to_string()), Some(&sig), body, now()),
            Ok(())
        );
        let fails = [
            verify(b"other", Some(&ts.to_string()), Some(&sig), body, now()),
            verify(SECRET, Some(&(ts + 1).to_string()), Some(&sig), body, now()),
            verify(SECRET, Some(&ts.to_string()), Some(&sig), b"{}", now()),
            verify(
                SECRET,
                Some(&ts.to_string()),
                Some("sha256=00"),
                body,
                now(),
            ),
            verify(SECRET, Some(&ts.to_string()), None, body, now()),
            verify(SECRET, None, Some(&sig), body, now()),
        ];
        for f in fails {
            assert_eq!(f.unwrap_err().status(), 401);
        }
    }

    #[test]
    fn stale_and_future_timestamps_are_refused() {
        let body = b"{}";
        for ts in [now().as_second() - 301, now().as_second() + 301] {
            let e = verify(
                SECRET,
                Some(&ts.to_string()),
                Some(&sign(SECRET, ts, body)),
                body,
                now(),
            )
            .unwrap_err();
            assert!(e.reason().contains("5 minutes"), "{e:?}");
        }
        let ts = now().as_second() - 299;
        assert!(
            verify(
                SECRET,
                Some(&ts.to_string()),
                Some(&sign(SECRET, ts, body)),
                body,
                now()
            )
            .is_ok()
        );
    }

    #[test]
    fn the_four_body_shapes_are_understood() {
        let restore = |b: &str| match parse(b.as_bytes()).unwrap() {
            Parsed::Restore(n) => n,
            other => panic!("{b}: {other:?}"),
        };
        let n = restore(
            r#"{"environment_id":"contoso-uat","operation":"refresh","operation_id":"op-1","completed_at":"2026-11-26T05:00:00Z"}"#,
        );
        assert_eq!(
            (n.environment, n.operation_id.as_str()),
            (EnvRef::Registry("contoso-uat".into()), "op-1")
        );
        let n = restore(
            r#"{"OperationStatus":"Completed","OperationActivityId":"a1","EnvironmentId":"e1","ProjectId":"1234","IsSuccess":true}"#,
        );
        assert_eq!(n.environment, EnvRef::Lcs("e1".into()));
        let n = restore(
            r#"{"Name":"Refresh","Type":"SFSourceDbToSandbox","TypeDisplay":"Refresh database","Status":"Completed","ActivityId":"a2","EnvironmentId":"e2","ProjectId":"1"}"#,
        );
        assert_eq!(
            (n.environment, n.operation.as_str()),
            (EnvRef::Lcs("e2".into()), "SFSourceDbToSandbox")
        );
        let n = restore(
            r#"{"id":"p1","operationType":"Restore","status":"Succeeded","environmentId":"pp-1"}"#,
        );
        assert_eq!(n.environment, EnvRef::PowerPlatform("pp-1".into()));
    }

    #[test]
    fn unfinished_and_other_operations_are_ignored_with_a_reason() {
        for b in [
            r#"{"environment_id":"a","operation":"deploy","operation_id":"x"}"#,
            r#"{"environment_id":"a","operation":"refresh","operation_id":"x","status":"Failed"}"#,
            r#"{"OperationStatus":"InProgress","OperationActivityId":"a1","EnvironmentId":"e1"}"#,
            r#"{"OperationStatus":"Completed","OperationActivityId":"a1","EnvironmentId":"e1","IsSuccess":false,"ErrorMessage":"boom"}"#,
            r#"{"Type":"ApplyPackage","Status":"Completed","ActivityId":"a","EnvironmentId":"e"}"#,
            r#"{"id":"p","operationType":"Backup","status":"Succeeded","environmentId":"pp"}"#,
            r#"{"operationId":"p2","name":"Backup","status":"Succeeded","environmentId":"pp"}"#,
        ] {
            match parse(b.as_bytes()).unwrap() {
                Parsed::Ignored(reason) => assert!(!reason.is_empty()),
                other => panic!("{b}: {other:?}"),
            }
        }
    }

    #[test]
    fn unreadable_bodies_say_what_is_wrong() {
        for (b, needle) in [
            ("", "not JSON"),
            ("[1]", "JSON object"),
            (r#"{"hello":1}"#, "unrecognised"),
            (
                r#"{"environment_id":"a","operation":"refresh"}"#,
                "operation_id",
            ),
            (
                r#"{"environment_id":"a","operation":"refresh","operation_id":"x","url":"https://evil"}"#,
                "unknown field `url`",
            ),
            (
                r#"{"environment_id":"a","operation":"refresh","operation_id":"x","completed_at":"yesterday"}"#,
                "RFC 3339",
            ),
        ] {
            let e = parse(b.as_bytes()).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.reason().contains(needle), "{b}: {e:?}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic_and_every_refusal_has_a_reason(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = parse(&body) {
                prop_assert!(!e.reason().is_empty());
            }
        }

        #[test]
        fn arbitrary_json_objects_never_panic(keys in proptest::collection::vec("[A-Za-z_]{1,16}", 0..6), vals in proptest::collection::vec(any::<String>(), 0..6)) {
            let obj: Map<String, Value> = keys.into_iter().zip(vals).map(|(k, v)| (k, Value::String(v))).collect();
            let body = Value::Object(obj).to_string();
            match parse(body.as_bytes()) {
                Err(e) => prop_assert!(!e.reason().is_empty()),
                Ok(Parsed::Ignored(r)) => prop_assert!(!r.is_empty()),
                Ok(Parsed::Restore(n)) => prop_assert!(!n.operation_id.is_empty()),
            }
        }

        #[test]
        fn arbitrary_headers_never_panic_and_are_refused(ts in any::<Option<String>>(), sig in any::<Option<String>>(), body in proptest::collection::vec(any::<u8>(), 0..128)) {
            let e = verify(SECRET, ts.as_deref(), sig.as_deref(), &body, now()).unwrap_err();
            prop_assert_eq!(e.status(), 401);
            prop_assert!(!e.reason().is_empty());
        }
    }
}
