//! Posts notices (`relink_core::notice`) to an environment's channels: a Teams Workflows
//! webhook (Adaptive Card), a Slack incoming webhook (Block Kit), and a generic webhook that
//! gets relink's JSON signed like the notifications relink takes in (`X-Relink-Timestamp`,
//! `X-Relink-Signature: sha256=HMAC(secret, "{timestamp}.{body}")`).
//!
//! A channel URL is a secret: it is read when a notice is sent, must be https (plain http only
//! on loopback with `allow_insecure_http`), and never appears in a log, an error or a record
//! (errors are reported without it). Each channel gets up to three attempts (429, 408 and 5xx
//! and network errors are retried, at most 10 s apart); a channel that still fails is reported
//! to the caller, which records it on the run. A receiver that holds the connection open without
//! answering must not hold the stage past its function's timeout: the channels are posted to
//! concurrently, an attempt waits at most 10 s for its answer, and a channel's attempts end
//! within 20 s together.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::CONTENT_TYPE;
use url::Url;

use relink_core::notice::{Delivery, Notice};
use relink_core::notify::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};
use relink_core::ports::{Notifier, SecretStore};
use relink_core::registry::{EnvConfig, SecretSource};

/// Attempts per channel and notice.
const ATTEMPTS: u32 = 3;
/// Longest wait between two attempts, whatever `Retry-After` says.
const MAX_WAIT: Duration = Duration::from_secs(10);
/// Longest one attempt waits for the channel's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest all the attempts at one channel take together.
const CHANNEL_BUDGET: Duration = Duration::from_secs(20);
/// A generic webhook's signing key is at least this long (as for notifications into relink).
const MIN_KEY_BYTES: usize = 32;

/// The webhook channels, over the shared HTTP client.
pub struct WebhookNotifier {
    client: reqwest::Client,
    secrets: Arc<dyn SecretStore>,
}

impl WebhookNotifier {
    /// Posts with `http`'s client (no redirects followed) and reads URLs from `secrets`.
    pub fn new(http: &crate::Http, secrets: Arc<dyn SecretStore>) -> WebhookNotifier {
        WebhookNotifier {
            client: http.client().clone(),
            secrets,
        }
    }

    async fn post(
        &self,
        env: &EnvConfig,
        channel: &str,
        source: &SecretSource,
        notice: &Notice,
    ) -> Result<(), String> {
        let url = self
            .secrets
            .secret(source)
            .await
            .map_err(|e| format!("its URL could not be read: {e}"))?;
        let url = Url::parse(url.expose().trim())
            .map_err(|_| "its URL is not a URL; check the secret".to_string())?;
        let loopback = url.host_str().is_some_and(|h| {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        let allowed = url.scheme() == "https"
            || (url.scheme() == "http" && loopback && env.allow_insecure_http);
        if !allowed {
            return Err("its URL must be https".into());
        }
        let body = match channel {
            "teams" => notice.teams(),
            "slack" => notice.slack(),
            _ => notice.json(),
        };
        let body = serde_json::to_vec(&body).expect("a notice serialises");
        let key = match (channel, &env.notify.webhook_secret) {
            ("webhook", Some(source)) => {
                let key = self
                    .secrets
                    .secret(source)
                    .await
                    .map_err(|e| format!("its signing key could not be read: {e}"))?;
                if key.expose().len() < MIN_KEY_BYTES {
                    return Err(format!(
                        "its signing key is shorter than {MIN_KEY_BYTES} bytes"
                    ));
                }
                Some(key)
            }
            _ => None,
        };
        let started = tokio::time::Instant::now();
        let mut last = String::new();
        let mut tried = 0;
        for attempt in 1..=ATTEMPTS {
            let left = CHANNEL_BUDGET.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            tried = attempt;
            let timeout = ATTEMPT_TIMEOUT.min(left);
            let mut request = self
                .client
                .post(url.clone())
                .timeout(timeout)
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(key) = &key {
                let ts = jiff::Timestamp::now().as_second();
                request = request
                    .header(TIMESTAMP_HEADER, ts.to_string())
                    .header(SIGNATURE_HEADER, sign(key.expose().as_bytes(), ts, &body));
            }
            let mut wait = Duration::from_millis(500) * 2u32.pow(attempt - 1);
            match request.send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => {
                    let status = r.status().as_u16();
                    last = format!("HTTP {status}");
                    if !(status == 408 || status == 429 || status >= 500) {
                        return Err(last);
                    }
                    if let Some(after) = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(crate::parse_retry_after)
                    {
                        wait = after;
                    }
                }
                Err(e) if e.is_timeout() => {
                    last = format!(
                        "no answer in time ({} s per attempt, {} s per channel)",
                        ATTEMPT_TIMEOUT.as_secs(),
                        CHANNEL_BUDGET.as_secs()
                    );
                }
                Err(e) => last = relink_core::error::chain(&e.without_url()),
            }
            let wait = wait.min(MAX_WAIT);
            if attempt < ATTEMPTS && started.elapsed() + wait < CHANNEL_BUDGET {
                tokio::time::sleep(wait).await;
            } else {
                break;
            }
        }
        let plural = if tried == 1 { "" } else { "s" };
        Err(format!("{last} after {tried} attempt{plural}"))
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn send(&self, env: &EnvConfig, notice: &Notice) -> Vec<Delivery> {
        let n = &env.notify;
        let posts = [
            ("teams", &n.teams),
            ("slack", &n.slack),
            ("webhook", &n.webhook),
        ]
        .into_iter()
        .filter_map(|(channel, source)| Some((channel, source.as_ref()?)))
        .map(|(channel, source)| async move {
            let result = match self.post(env, channel, source, notice).await {
                Ok(()) => "sent".to_string(),
                Err(why) => why,
            };
            Delivery {
                channel: channel.to_string(),
                result,
            }
        });
        let mut out = futures::future::join_all(posts).await;
        if n.sns {
            // Only AWS mode has a topic; its notifier publishes there and asks this one for the rest.
            out.push(Delivery {
                channel: "sns".into(),
                result:
                    "not sent: no SNS topic here (the topic is the AWS stack's, NOTICE_TOPIC_ARN)"
                        .into(),
            });
        }
        out
    }
}
