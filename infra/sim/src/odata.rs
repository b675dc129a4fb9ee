//! What Dataverse and F&O have in common, written once: the front door (bearer token, injected
//! latency, 429s and 5xx), OData errors and paging helpers, and `$batch` dispatch. Written from
//! Microsoft's documented formats; shares no code with relink's clients.

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dataverse::{dataverse, pacing_headers, protection_verdict};
use crate::fno::fno;
use crate::multipart::{self, Answer, Operation};
use crate::seed::LogEntry;
use crate::state::{Shared, SimState};

pub(crate) fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == name).then(|| percent_decode(&v.replace('+', " ")))
    })
}

pub(crate) fn odata_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut r = (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response();
    r.headers_mut()
        .insert("OData-Version", HeaderValue::from_static("4.0"));
    r
}

pub(crate) fn json_ok(v: Value) -> Response {
    let mut r = axum::Json(v).into_response();
    r.headers_mut()
        .insert("OData-Version", HeaderValue::from_static("4.0"));
    r
}

pub(crate) fn max_page(headers: &HeaderMap, cap: usize) -> usize {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| {
            p.trim()
                .strip_prefix("odata.maxpagesize=")
                .and_then(|n| n.trim().parse().ok())
        })
        .map(|n: usize| n.clamp(1, cap))
        .unwrap_or(cap)
}

pub(crate) fn prefers(headers: &HeaderMap, what: &str) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim() == what))
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Svc {
    Dataverse,
    Fno,
}

impl Svc {
    fn name(self) -> &'static str {
        match self {
            Svc::Dataverse => "dataverse",
            Svc::Fno => "fno",
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn service(
    shared: &Arc<Shared>,
    svc: Svc,
    container: String,
    rest: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = Instant::now();
    let at_ms = arrived.duration_since(shared.started).as_secs_f64() * 1000.0;
    let path_q = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let ctype = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = String::from_utf8_lossy(&body).into_owned();
    let batch_ops = (rest.ends_with("$batch") && method == Method::POST)
        .then(|| multipart::parse_request(&ctype, &text));
    let ops = match &batch_ops {
        Some(Ok(ops)) => ops.len(),
        _ => 1,
    };
    let fingerprint = match &batch_ops {
        Some(Ok(ops)) => {
            let mut t: Vec<&str> = ops.iter().map(|o| o.target.as_str()).collect();
            t.sort_unstable();
            format!("{method} {} [{}]", uri.path(), t.join(","))
        }
        _ => format!("{method} {path_q}"),
    };
    let log = |shared: &Shared, status: u16, retry_after: Option<u64>| {
        let mut st = shared.lock();
        st.snapshot.requests += 1;
        st.log.push(LogEntry {
            at_ms,
            service: svc.name().into(),
            method: method.to_string(),
            path: path_q.clone(),
            fingerprint: fingerprint.clone(),
            status,
            retry_after_secs: retry_after,
            ops,
        });
    };

    // Authentication: a live token whose audience is this resource.
    let resource = format!(
        "{}/{}/{}",
        shared.base,
        if svc == Svc::Dataverse {
            "dataverse"
        } else {
            "fno"
        },
        container
    )
    .to_ascii_lowercase();
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let (auth_error, client_id) = {
        let st = shared.lock();
        match st.tokens.get(&bearer) {
            None => (
                Some("The access token is missing or invalid."),
                String::new(),
            ),
            Some(t) if t.expires <= Instant::now() => {
                (Some("The access token has expired."), t.client_id.clone())
            }
            Some(t) if t.audience != resource => (
                Some("The access token's audience is not this resource."),
                t.client_id.clone(),
            ),
            Some(t) => (None, t.client_id.clone()),
        }
    };
    if let Some(msg) = auth_error {
        shared.lock().snapshot.unauthorized += 1;
        log(shared, 401, None);
        let mut r = odata_error(StatusCode::UNAUTHORIZED, "0x80072182", msg);
        r.headers_mut().insert(
            "WWW-Authenticate",
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        return r;
    }

    // Faults and service protection, decided before any work is done.
    let window_key = format!("{}/{container}/{client_id}", svc.name());
    let (faults, verdict) = {
        let mut st = shared.lock();
        let faults = st.faults.clone();
        let verdict = if faults.rate_429 > 0.0 && st.roll() < faults.rate_429 {
            Some((429, faults.retry_after_secs))
        } else if (faults.rate_5xx > 0.0 && st.roll() < faults.rate_5xx) || st.in_burst() {
            Some((503, 0))
        } else if let (Svc::Dataverse, Some(p)) = (svc, faults.protection) {
            protection_verdict(&mut st, &window_key, &p, arrived)
        } else {
            None
        };
        if verdict.is_none() {
            st.in_flight += 1;
            st.snapshot.max_in_flight = st.snapshot.max_in_flight.max(st.in_flight);
            st.windows.entry(window_key.clone()).or_default().in_flight += 1;
        }
        (faults, verdict)
    };
    if let Some((status, retry_after)) = verdict {
        {
            let mut st = shared.lock();
            if status == 429 {
                st.snapshot.throttled += 1
            } else {
                st.snapshot.server_errors += 1
            }
        }
        log(shared, status, (status == 429).then_some(retry_after));
        return if status == 429 {
            let mut r = odata_error(
                StatusCode::TOO_MANY_REQUESTS,
                "0x80072322",
                "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
            );
            r.headers_mut()
                .insert("Retry-After", HeaderValue::from(retry_after));
            r
        } else {
            odata_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "0x80040216",
                "An unexpected error occurred. The service is temporarily unavailable.",
            )
        };
    }

    let work = Duration::from_millis(faults.latency_ms + faults.per_op_latency_ms * ops as u64);
    if !work.is_zero() {
        tokio::time::sleep(work).await;
    }
    if matches!((svc, &batch_ops), (Svc::Dataverse, Some(_))) && shared.lock().faults.hold_batches {
        shared.lock().snapshot.held_batches += 1;
        while shared.lock().faults.hold_batches {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut batch_ops = batch_ops;
    let stall = match (&mut batch_ops, svc) {
        (Some(Ok(list)), Svc::Dataverse) => {
            let mut st = shared.lock();
            match st.faults.stall_batch_after_ops {
                Some(k) if list.len() > k => {
                    st.faults.stall_batch_after_ops = None;
                    st.snapshot.stalled_batches += 1;
                    list.truncate(k);
                    true
                }
                _ => false,
            }
        }
        _ => false,
    };
    let resp = {
        let mut st = shared.lock();
        let resp = match svc {
            Svc::Dataverse => dataverse(
                &mut st,
                &shared.base,
                &container,
                &rest,
                &method,
                &uri,
                &headers,
                batch_ops,
            ),
            Svc::Fno => fno(
                &mut st,
                &shared.base,
                &container,
                &rest,
                &method,
                &uri,
                &headers,
                &text,
                batch_ops,
            ),
        };
        st.in_flight -= 1;
        let w = st.windows.entry(window_key).or_default();
        w.in_flight -= 1;
        w.done.push_back((Instant::now(), work.as_millis() as u64));
        resp
    };
    if stall {
        // The first operations are applied; the answer never comes (the caller is killed).
        std::future::pending::<()>().await;
    }
    let mut resp = resp;
    if let (Svc::Dataverse, Some(p)) = (svc, faults.protection) {
        pacing_headers(
            shared,
            &format!("dataverse/{container}/{client_id}"),
            &p,
            &mut resp,
        );
    }
    log(shared, resp.status().as_u16(), None);
    resp
}

/// The injected latency, 429 and 5xx rates, for the LCS and Power Platform simulators (the
/// Dynamics ones weave them into their service protection accounting instead).
pub(crate) async fn generic_faults(shared: &Shared) -> Option<Response> {
    let (latency, verdict) = {
        let mut st = shared.lock();
        let f = st.faults.clone();
        let verdict = if f.rate_429 > 0.0 && st.roll() < f.rate_429 {
            st.snapshot.throttled += 1;
            Some((StatusCode::TOO_MANY_REQUESTS, f.retry_after_secs))
        } else if f.rate_5xx > 0.0 && st.roll() < f.rate_5xx {
            st.snapshot.server_errors += 1;
            Some((StatusCode::SERVICE_UNAVAILABLE, 0))
        } else {
            None
        };
        (Duration::from_millis(f.latency_ms), verdict)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (status, retry_after) = verdict?;
    let mut r = (
        status,
        axum::Json(json!({"IsSuccess": false, "ErrorMessage": status.canonical_reason()})),
    )
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert("Retry-After", HeaderValue::from(retry_after));
    }
    Some(r)
}

pub(crate) fn bearer(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string()
}

/// Resolves a batch operation's target to a path under the service root.
pub(crate) fn batch_target(base: &str, root: &str, target: &str) -> Option<String> {
    let t = target.strip_prefix(base).unwrap_or(target);
    if let Some(abs) = t.strip_prefix('/') {
        return abs
            .strip_prefix(root.trim_start_matches('/'))
            .map(str::to_string);
    }
    if t.contains("://") {
        None
    } else {
        Some(t.to_string())
    }
}

/// Runs batch operations one by one through `op`, honouring change sets and continue-on-error.
pub(crate) fn run_batch(
    ops: Vec<Operation>,
    continue_on_error: bool,
    mut op: impl FnMut(&Operation, bool) -> (u16, Option<String>),
) -> Response {
    let mut answers = Vec::new();
    let mut i = 0;
    while i < ops.len() {
        if let Some(cs) = ops[i].changeset {
            // A change set is atomic: check every operation first, then apply all or none.
            let group: Vec<&Operation> = ops[i..]
                .iter()
                .take_while(|o| o.changeset == Some(cs))
                .collect();
            let failed = group
                .iter()
                .map(|o| (o, op(o, true)))
                .find(|(_, (s, _))| *s >= 400);
            match failed {
                Some((o, (status, body))) => answers.push(Answer {
                    status,
                    body,
                    content_id: o.content_id.clone(),
                    changeset: Some(cs),
                }),
                None => {
                    for o in &group {
                        let (status, body) = op(o, false);
                        answers.push(Answer {
                            status,
                            body,
                            content_id: o.content_id.clone(),
                            changeset: Some(cs),
                        });
                    }
                }
            }
            let failed_any = answers.last().is_some_and(|a| a.status >= 400);
            i += group.len();
            if failed_any && !continue_on_error {
                break;
            }
        } else {
            let (status, body) = op(&ops[i], false);
            answers.push(Answer {
                status,
                body,
                content_id: ops[i].content_id.clone(),
                changeset: None,
            });
            i += 1;
            if status >= 400 && !continue_on_error {
                break;
            }
        }
    }
    let (ctype, body) = multipart::encode_response(&answers);
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_str(&ctype).expect("ascii"),
    );
    r.headers_mut()
        .insert("OData-Version", HeaderValue::from_static("4.0"));
    r
}

pub(crate) fn error_body(code: &str, message: &str) -> Option<String> {
    Some(json!({"error": {"code": code, "message": message}}).to_string())
}

pub(crate) fn record_delete(
    st: &mut SimState,
    svc: &str,
    container: &str,
    key: &str,
    existed: bool,
) {
    *st.delete_ops
        .entry(format!("{svc}/{container}/{key}"))
        .or_default() += 1;
    if existed {
        *st.snapshot
            .deleted
            .entry(format!("{svc}/{container}"))
            .or_default() += 1;
    }
}

pub(crate) fn cookie_last(token: &str) -> Option<String> {
    let decoded = percent_decode(token);
    let start = decoded.find("last=\"{")? + "last=\"{".len();
    let end = decoded[start..].find('}')?;
    Some(decoded[start..start + end].to_string())
}

pub(crate) fn url_with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~$,".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    let q: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    format!("{base}?{}", q.join("&"))
}
