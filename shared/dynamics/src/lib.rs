//! HTTP adapters: one retry policy shared by every client (429 honouring `Retry-After`, 5xx and
//! network errors with capped exponential backoff and full jitter), Entra ID tokens, the
//! Dataverse Web API and F&O OData.

pub mod batch;
mod connector;
pub mod dataverse;
pub mod delegated;
pub mod fno;
pub mod gateway;
pub mod notifier;
pub mod token;

pub use connector::HttpConnector;
pub use dataverse::{POWER_PLATFORM, POWER_PLATFORM_API_VERSION};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use reqwest::{RequestBuilder, Response, StatusCode};
use tokio::time::Instant;

use relink_core::error::{Error, Result};
use relink_core::ports::TokenSource;
use relink_core::progress::{Progress, ProgressSink};

/// How requests are retried. One policy serves every client.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// First backoff step for 5xx and network errors.
    pub base: Duration,
    /// Largest backoff step.
    pub cap: Duration,
    /// Longest `Retry-After` relink agrees to wait before giving up on a request.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// Full-jitter exponential backoff for attempt `n` (1-based).
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << n.saturating_sub(1).min(16));
        let ceiling = exp.min(self.cap);
        let ms =
            rand::rng().random_range(ceiling.as_millis() as u64 / 2..=ceiling.as_millis() as u64);
        Duration::from_millis(ms)
    }
}

/// What a service is, for messages and credential hints.
#[derive(Clone, Copy, Debug)]
pub struct Service {
    pub name: &'static str,
    /// What to check when the service answers 401/403.
    pub auth_hint: &'static str,
}

/// The shared HTTP client with the retry policy and per-service throttle gates.
pub struct Http {
    client: reqwest::Client,
    policy: RetryPolicy,
    sink: Arc<dyn ProgressSink>,
    /// After a 429, no request to the same service and origin starts before this instant.
    gates: Mutex<HashMap<String, Instant>>,
}

impl Http {
    /// Builds the client (rustls, 120 s request timeout: Dataverse cuts requests at about 2 min).
    pub fn new(policy: RetryPolicy, sink: Arc<dyn ProgressSink>) -> Result<Http> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("relink/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Http {
            client,
            policy,
            sink,
            gates: Mutex::new(HashMap::new()),
        })
    }

    /// The underlying reqwest client, for building requests.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends a request built by `build` (called once per attempt with the bearer token, if
    /// `auth` is given), retrying throttling, 5xx and network errors. Returns the response for
    /// success and 404; turns 401/403 into [`Error::Auth`] (after one token refresh on 401) and
    /// other 4xx into [`Error::Http`].
    pub async fn send(
        &self,
        service: Service,
        auth: Option<(&dyn TokenSource, &str)>,
        build: &(dyn Fn(Option<&str>) -> RequestBuilder + Send + Sync),
    ) -> Result<Response> {
        let mut attempt = 0;
        let mut refreshed_token = false;
        let mut last_retry_after = None;
        loop {
            attempt += 1;
            let token = match auth {
                Some((tokens, scope)) => Some(tokens.token(scope).await?),
                None => None,
            };
            let request = build(token.as_deref())
                .build()
                .map_err(|e| Error::Protocol {
                    service: service.name,
                    detail: format!("cannot build request: {e}"),
                })?;
            let gate_key = format!(
                "{} {}",
                service.name,
                request.url().origin().ascii_serialization()
            );
            self.wait_gate(&gate_key).await;
            let (wait, status, detail) = match self.client.execute(request).await {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() || status == StatusCode::NOT_FOUND {
                        return Ok(resp);
                    }
                    if status.is_redirection() {
                        // relink follows no redirect: the registered URL must be the service's.
                        let to = resp
                            .headers()
                            .get(reqwest::header::LOCATION)
                            .and_then(|v| v.to_str().ok())
                            .map(|l| {
                                relink_core::redact::printable(
                                    &l.chars().take(200).collect::<String>(),
                                )
                            })
                            .unwrap_or_default();
                        return Err(Error::Protocol {
                            service: service.name,
                            detail: format!(
                                "answered HTTP {} (a redirect to {to:?}) instead of an answer; relink follows no redirects: check the URL in the registry",
                                status.as_u16()
                            ),
                        });
                    }
                    if status == StatusCode::UNAUTHORIZED && auth.is_some() && !refreshed_token {
                        // A token can expire or be revoked mid-run: fetch a fresh one once.
                        refreshed_token = true;
                        if let Some((tokens, scope)) = auth {
                            tokens.invalidate(scope).await;
                        }
                        attempt -= 1;
                        continue;
                    }
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let detail = error_detail(resp).await;
                    match status.as_u16() {
                        401 | 403 => {
                            return Err(Error::Auth {
                                service: service.name,
                                status: status.as_u16(),
                                detail: if detail.is_empty() {
                                    String::new()
                                } else {
                                    format!(": {detail}")
                                },
                                hint: service.auth_hint,
                            });
                        }
                        429 => {
                            let ra = retry_after.unwrap_or_else(|| self.policy.backoff(attempt));
                            if ra > self.policy.max_retry_after {
                                return Err(Error::Unavailable {
                                    service: service.name,
                                    attempts: attempt,
                                    detail: format!(
                                        "throttled with Retry-After {}s, longer than relink waits",
                                        ra.as_secs()
                                    ),
                                    retry_after: Some(ra),
                                });
                            }
                            last_retry_after = Some(ra);
                            self.close_gate(&gate_key, ra);
                            (ra, Some(429), detail)
                        }
                        // 408 Request Timeout and 425 Too Early say "try again" too.
                        408 | 425 | 500 | 502 | 503 | 504 => {
                            let wait = retry_after.unwrap_or_else(|| self.policy.backoff(attempt));
                            (
                                wait.min(self.policy.max_retry_after),
                                Some(status.as_u16()),
                                detail,
                            )
                        }
                        code => {
                            return Err(Error::Http {
                                service: service.name,
                                status: code,
                                detail,
                            });
                        }
                    }
                }
                Err(e) => (
                    self.policy.backoff(attempt),
                    None,
                    relink_core::error::chain(&e),
                ),
            };
            if attempt >= self.policy.max_attempts {
                return Err(Error::Unavailable {
                    service: service.name,
                    attempts: attempt,
                    detail: match status {
                        Some(s) => format!("HTTP {s} {detail}"),
                        None => detail,
                    },
                    retry_after: last_retry_after,
                });
            }
            if status == Some(429) {
                relink_core::progress::note_throttle(wait);
            }
            self.sink.emit(Progress::Retry {
                service: service.name,
                status,
                wait,
            });
            tracing::debug!(service = service.name, ?status, wait_ms = wait.as_millis() as u64, %detail, "retrying");
            tokio::time::sleep(wait).await;
        }
    }

    async fn wait_gate(&self, key: &str) {
        let until = self.gates.lock().expect("gate lock").get(key).copied();
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }

    fn close_gate(&self, key: &str, wait: Duration) {
        let until = Instant::now() + wait;
        let mut gates = self.gates.lock().expect("gate lock");
        let slot = gates.entry(key.to_string()).or_insert(until);
        if *slot < until {
            *slot = until;
        }
    }
}

/// Parses `Retry-After`: seconds (integer or decimal), a .NET `hh:mm:ss` span, or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    // A server's number is clamped before any arithmetic: `1e300` or `99999999999:0:0` must not
    // overflow (the caller then refuses waits longer than its policy allows).
    const MAX: f64 = 7.0 * 24.0 * 3600.0;
    let secs = |s: f64| (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(MAX)));
    let v = v.trim();
    if let Ok(n) = v.parse::<f64>() {
        return secs(n);
    }
    let parts: Vec<_> = v.split(':').collect();
    if parts.len() == 3 && !v.contains(char::is_whitespace) {
        let h: f64 = parts[0].parse::<u64>().ok()? as f64;
        let m: f64 = parts[1].parse::<u64>().ok()? as f64;
        let s: f64 = parts[2].parse().ok()?;
        return secs(h * 3600.0 + m * 60.0 + s);
    }
    let when = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(v)
        .ok()?;
    let now = jiff::Timestamp::now();
    if when <= now {
        return Some(Duration::ZERO);
    }
    secs(Duration::try_from(when - now).ok()?.as_secs_f64())
}

/// Most of a successful answer relink reads: a 5,000-row page is a few MB; more is a server
/// that lies, refused before it can take the process's memory.
pub const MAX_BODY: usize = 32 * 1024 * 1024;

/// Reads at most `limit` bytes of a body; `true` with them when that was the whole body.
async fn read_capped(mut resp: Response, limit: usize) -> reqwest::Result<(Vec<u8>, bool)> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > limit {
            body.extend_from_slice(&chunk[..limit - body.len()]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// Reads an answer's body, at most [`MAX_BODY`]; `what` names it in errors.
pub async fn read_body(service: Service, resp: Response, what: &str) -> Result<Vec<u8>> {
    let too_big = || Error::Protocol {
        service: service.name,
        detail: format!("{what}: the answer is larger than {} MB", MAX_BODY >> 20),
    };
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_big());
    }
    match read_capped(resp, MAX_BODY).await {
        Ok((body, true)) => Ok(body),
        Ok((_, false)) => Err(too_big()),
        // The headers came, the body broke off: as retryable as a dropped connection.
        Err(e) => Err(Error::Unavailable {
            service: service.name,
            attempts: 1,
            detail: format!("{what}: {}", relink_core::error::chain(&e)),
            retry_after: None,
        }),
    }
}

/// Reads an answer's JSON body, at most [`MAX_BODY`].
pub async fn read_json<T: serde::de::DeserializeOwned>(
    service: Service,
    resp: Response,
    what: &str,
) -> Result<T> {
    let body = read_body(service, resp, what).await?;
    serde_json::from_slice(&body).map_err(|e| Error::Protocol {
        service: service.name,
        detail: format!("{what}: {e}"),
    })
}

/// Most of an error body relink reads: enough for any OData or Entra error message, and a
/// bound on what a hostile server can make it hold.
const MAX_ERROR_BODY: usize = 64 * 1024;

async fn error_detail(resp: Response) -> String {
    let body = read_capped(resp, MAX_ERROR_BODY)
        .await
        .map(|(body, _)| body)
        .unwrap_or_default();
    odata_error_message(&String::from_utf8_lossy(&body))
}

/// Extracts `error.message` (OData) or `error_description` (Entra) from an error body.
pub fn odata_error_message(text: &str) -> String {
    let msg = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error_description"))
                .or_else(|| v.get("error"))
                .and_then(|m| m.as_str().map(str::to_string))
        })
        .unwrap_or_else(|| text.to_string());
    let line = msg.lines().next().unwrap_or_default();
    relink_core::redact::printable(&line.chars().take(300).collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_spans_and_dates() {
        assert_eq!(parse_retry_after("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_retry_after("00:01:02"), Some(Duration::from_secs(62)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
        // Absurd values are clamped, never an overflow or a panic.
        let week = Some(Duration::from_secs(7 * 24 * 3600));
        assert_eq!(parse_retry_after("1e300"), week);
        assert_eq!(parse_retry_after("inf"), None);
        assert_eq!(parse_retry_after("18446744073709551615:59:59"), week);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let p = RetryPolicy::default();
        for n in 1..40 {
            let d = p.backoff(n);
            assert!(d <= p.cap, "{d:?}");
        }
        assert!(p.backoff(1) <= Duration::from_millis(200));
    }

    #[test]
    fn odata_and_entra_errors_are_summarised() {
        assert_eq!(
            odata_error_message(r#"{"error":{"code":"0x1","message":"Bad thing\nstack"}}"#),
            "Bad thing"
        );
        assert_eq!(
            odata_error_message(
                r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret."}"#
            ),
            "AADSTS7000215: Invalid client secret."
        );
    }
}
