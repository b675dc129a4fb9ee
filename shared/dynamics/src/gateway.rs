//! The dual-write management gateway client (`reset = { mode = "gateway" }`): an unsupported
//! interface, read from Microsoft's own sample `microsoft/Dual-write-automations` (community
//! knowledge, docs/dynamics.md). Every answer is read bounded and checked; anything relink does
//! not recognise is an error, never taken for success.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};
use url::Url;

use super::{Http, Service};
use relink_core::error::{Error, Result};
use relink_core::ports::{DualWriteGateway, GatewayLink, GatewayMap, RequestState, TokenSource};
use relink_core::registry::GATEWAY_SCOPE;

const GATEWAY: Service = Service {
    name: "dual-write gateway",
    auth_hint: "the gateway takes a signed-in user's token (relink auth login ENV --for gateway); the user must be allowed to manage dual-write on this environment",
};

const API: &str = "api/DualWriteManagement/1.0";
/// Most maps or legal entities read from one answer.
const MAX_ITEMS: usize = 10_000;
/// Longest id relink accepts from the gateway.
const MAX_ID: usize = 200;

/// The gateway client of one environment.
pub struct GatewayClient {
    http: Arc<Http>,
    tokens: Arc<dyn TokenSource>,
    base: Url,
    fno_url: Url,
}

impl GatewayClient {
    /// A client for the F&O at `fno_url` through the gateway at `base`.
    pub fn new(http: Arc<Http>, tokens: Arc<dyn TokenSource>, base: Url, fno_url: Url) -> Self {
        GatewayClient {
            http,
            tokens,
            base,
            fno_url,
        }
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Url {
        let mut u = relink_core::registry::join(&self.base, path);
        if !query.is_empty() {
            u.query_pairs_mut().extend_pairs(query);
        }
        u
    }

    async fn call(
        &self,
        method: reqwest::Method,
        url: Url,
        body: Option<&Value>,
        what: &str,
    ) -> Result<Value> {
        let build = |token: Option<&str>| {
            let mut r = self
                .http
                .client()
                .request(method.clone(), url.clone())
                .header(reqwest::header::ACCEPT, "application/json")
                .bearer_auth(token.unwrap_or_default());
            if let Some(b) = body {
                r = r.json(b);
            }
            r
        };
        let resp = self
            .http
            .send(GATEWAY, Some((self.tokens.as_ref(), GATEWAY_SCOPE)), &build)
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(Error::Http {
                service: GATEWAY.name,
                status: 404,
                detail: format!("{what}: not found"),
            });
        }
        if resp.content_length() == Some(0) {
            return Ok(Value::Null);
        }
        let bytes = super::read_body(GATEWAY, resp, what).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
            service: GATEWAY.name,
            detail: format!("{what}: {e}"),
        })
    }

    /// The F&O identifier the gateway knows environments by: the URL without its scheme.
    fn identifier(&self) -> String {
        let u = self.fno_url.as_str();
        u.split_once("://")
            .map_or(u, |(_, rest)| rest)
            .trim_end_matches('/')
            .to_string()
    }
}

fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// An id from the gateway: non-empty, short, printable.
fn id(v: Option<&str>, what: &str) -> Result<String> {
    match v {
        Some(s) if !s.is_empty() && s.len() <= MAX_ID && !s.chars().any(char::is_control) => {
            Ok(s.to_string())
        }
        _ => Err(Error::Protocol {
            service: GATEWAY.name,
            detail: format!("{what}: missing or unusable id"),
        }),
    }
}

/// The array at `pointer` of `v`, at most [`MAX_ITEMS`] of it (none if absent).
fn items<'a>(v: &'a Value, pointer: &str) -> impl Iterator<Item = &'a Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .take(MAX_ITEMS)
}

fn protocol(detail: String) -> Error {
    Error::Protocol {
        service: GATEWAY.name,
        detail,
    }
}

#[async_trait]
impl DualWriteGateway for GatewayClient {
    async fn link(&self) -> Result<GatewayLink> {
        let ident = self.identifier();
        let list = self
            .call(
                reqwest::Method::GET,
                self.url(
                    &format!("{API}/Environments"),
                    &[("targetType", "AX"), ("identifier", &ident)],
                ),
                None,
                "Environments",
            )
            .await?;
        let found: Vec<&Value> = list
            .as_array()
            .ok_or_else(|| protocol("Environments: not a list".into()))?
            .iter()
            .take(MAX_ITEMS)
            .filter(|e| text(e, "cid").is_some_and(|c| !c.is_empty()))
            .collect();
        let env = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(Error::Config(format!(
                    "the gateway knows no dual-write link for the F&O {ident}: the environment is not linked (reset it by hand)"
                )));
            }
            _ => {
                return Err(protocol(format!(
                    "Environments: {} links for the F&O {ident}; relink resets only an unambiguous one",
                    found.len()
                )));
            }
        };
        let cid = id(text(env, "cid"), "Environments cid")?;
        let cname = id(text(env, "cname"), "Environments cname")?;
        let set = self
            .call(
                reqwest::Method::GET,
                self.url(&format!("api/ConnectionSet/{}", urlencode(&cname)), &[]),
                None,
                "ConnectionSet",
            )
            .await?;
        let envs = set
            .get("environments")
            .and_then(Value::as_object)
            .ok_or_else(|| protocol("ConnectionSet: no environments".into()))?;
        let pick = |dataverse: bool| {
            envs.values().find(|e| {
                let t = text(e, "targetType").unwrap_or_default();
                if dataverse {
                    t == "CRM" || t.contains("CDS")
                } else {
                    t == "AX"
                }
            })
        };
        let (Some(ce), Some(ax)) = (pick(true), pick(false)) else {
            return Err(protocol(
                "ConnectionSet: it does not have a Dataverse and an F&O environment".into(),
            ));
        };
        let reset_env = |e: &Value| {
            json!({
                "targetType": text(e, "targetType"),
                "name": text(e, "name"),
                "displayName": text(e, "environmentDisplayName"),
                "id": text(e, "powerAppsEnvironment"),
                "isDevInstance": e.get("isDevInstance").and_then(Value::as_bool).unwrap_or(false),
                "directUrl": text(e, "directUrl"),
            })
        };
        let mut legal_entities: Vec<String> = Vec::new();
        for m in items(&set, "/dualWriteDetail/legalEntityMappings/mappings") {
            if let Some(name) = m.pointer("/left/name").and_then(Value::as_str)
                && !legal_entities.iter().any(|l| l == name)
            {
                legal_entities.push(name.to_string());
            }
        }
        let power_apps = text(ce, "powerAppsEnvironment").ok_or_else(|| {
            protocol("ConnectionSet: the Dataverse environment has no powerAppsEnvironment".into())
        })?;
        Ok(GatewayLink {
            cid: cid.clone(),
            cname,
            fno_url: text(ax, "directUrl").unwrap_or_default().to_string(),
            dataverse_url: text(ce, "directUrl").unwrap_or_default().to_string(),
            reset_payload: json!({
                "powerAppsEnvironmentName": power_apps,
                "environments": [reset_env(ce), reset_env(ax)],
                "legalEntities": legal_entities,
            }),
        })
    }

    async fn maps(&self, link: &GatewayLink) -> Result<Vec<GatewayMap>> {
        let list = self
            .call(
                reqwest::Method::GET,
                self.url(
                    &format!("{API}/Entities"),
                    &[("targetType", "AX"), ("cid", &link.cid)],
                ),
                None,
                "Entities",
            )
            .await?;
        let list = list
            .as_array()
            .ok_or_else(|| protocol("Entities: not a list".into()))?;
        if list.len() > MAX_ITEMS {
            return Err(protocol(format!("Entities: more than {MAX_ITEMS} maps")));
        }
        list.iter()
            .map(|m| {
                let d = m.get("detail").unwrap_or(&Value::Null);
                let state = match d.get("state") {
                    Some(Value::String(s)) => s.parse::<u8>().ok(),
                    Some(Value::Number(n)) => n.as_u64().and_then(|n| u8::try_from(n).ok()),
                    _ => None,
                }
                .ok_or_else(|| protocol("Entities: a map without a readable state".into()))?;
                Ok(GatewayMap {
                    tid: id(text(d, "tid"), "Entities tid")?,
                    pid: text(d, "pid").filter(|p| !p.is_empty()).map(str::to_string),
                    name: relink_core::redact::printable(
                        &text(d, "tName")
                            .unwrap_or("(unnamed map)")
                            .chars()
                            .take(200)
                            .collect::<String>(),
                    ),
                    state,
                })
            })
            .collect()
    }

    async fn stop(&self, link: &GatewayLink, maps: &[GatewayMap]) -> Result<String> {
        let details: Vec<Value> = maps
            .iter()
            .map(|m| json!({"tid": m.tid, "pid": m.pid, "cid": link.cid}))
            .collect();
        let answer = self
            .call(
                reqwest::Method::POST,
                self.url(&format!("{API}/Start"), &[]),
                Some(&json!({"action": "4", "details": details})),
                "Start (stop)",
            )
            .await?;
        id(text(&answer, "requestId"), "Start (stop) requestId")
    }

    async fn request(&self, request_id: &str) -> Result<RequestState> {
        let list = self
            .call(
                reqwest::Method::GET,
                self.url(&format!("{API}/Status/{}", urlencode(request_id)), &[]),
                None,
                "Status",
            )
            .await?;
        let mut states = Vec::new();
        for m in items(&list, "") {
            for r in items(m, "/detail/lastRequests")
                .filter(|r| text(r, "requestId") == Some(request_id))
            {
                states.push((
                    text(r, "state").unwrap_or_default().to_string(),
                    text(r, "errorMessage").unwrap_or_default().to_string(),
                ));
            }
        }
        // Failed if any map failed, completed only if every map completed.
        if let Some((_, e)) = states.iter().find(|(s, _)| s == "3") {
            return Ok(RequestState::Failed(if e.is_empty() {
                "the gateway reported an error without a message".into()
            } else {
                e.chars().take(500).collect()
            }));
        }
        Ok(
            if !states.is_empty() && states.iter().all(|(s, _)| s == "2") {
                RequestState::Completed
            } else {
                RequestState::Waiting
            },
        )
    }

    async fn reset(&self, link: &GatewayLink, force: bool) -> Result<Option<String>> {
        let answer = self
            .call(
                reqwest::Method::POST,
                self.url(
                    &format!("api/ConnectionSet/{}/Reset", urlencode(&link.cid)),
                    &[
                        ("targetType", "AX"),
                        ("forceReset", if force { "true" } else { "false" }),
                    ],
                ),
                Some(&link.reset_payload),
                "Reset",
            )
            .await?;
        match text(&answer, "requestId") {
            Some(r) => id(Some(r), "Reset requestId").map(Some),
            None => Ok(None),
        }
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
