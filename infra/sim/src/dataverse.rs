//! The Dataverse Web API (`/dataverse/{org}/api/data/v9.2/`): organisation identity, the F&O
//! integration details, entity metadata, paged runtime configurations, deletes, and the service
//! protection limits with their pacing headers.

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use crate::multipart::Operation;
use crate::odata::{
    batch_target, cookie_last, error_body, json_ok, max_page, odata_error, percent_decode, prefers,
    query_param, record_delete, run_batch, url_with_query,
};
use crate::seed::Protection;
use crate::state::{Shared, SimState};

pub(crate) const API: &str = "api/data/v9.2/";
pub(crate) const RUNTIME_SET: &str = "msdyn_dualwriteruntimeconfigs";
pub(crate) const RUNTIME_KEY: &str = "msdyn_dualwriteruntimeconfigid";
pub(crate) const RUNTIME_COLUMNS: [&str; 6] = [
    RUNTIME_KEY,
    "msdyn_name",
    "msdyn_status",
    "msdyn_configuration",
    "createdon",
    "modifiedon",
];
pub(crate) const DATAVERSE_MAX_PAGE: usize = 5_000;
pub(crate) const DATAVERSE_MAX_BATCH: usize = 1_000;

/// Decides whether a request breaks the service protection limits; returns (429, Retry-After).
pub(crate) fn protection_verdict(
    st: &mut SimState,
    key: &str,
    p: &Protection,
    now: Instant,
) -> Option<(u16, u64)> {
    let w = st.windows.entry(key.to_string()).or_default();
    let window = Duration::from_millis(p.window_ms);
    while w
        .done
        .front()
        .is_some_and(|(t, _)| now.duration_since(*t) > window)
    {
        w.done.pop_front();
    }
    let wait_for = |idx: usize| {
        let (t, _) = w.done[idx];
        let left = window.saturating_sub(now.duration_since(t));
        left.as_secs_f64().ceil().max(1.0) as u64
    };
    if w.in_flight >= p.concurrent {
        return Some((429, 1));
    }
    if w.done.len() >= p.requests {
        return Some((429, wait_for(w.done.len() - p.requests)));
    }
    let total: u64 = w.done.iter().map(|(_, ms)| ms).sum();
    if total >= p.execution_ms {
        // Wait until enough execution time leaves the window.
        let mut excess = total - p.execution_ms;
        for (i, (_, ms)) in w.done.iter().enumerate() {
            if *ms > excess {
                return Some((429, wait_for(i)));
            }
            excess -= ms;
        }
        return Some((429, 1));
    }
    None
}

pub(crate) fn pacing_headers(shared: &Shared, key: &str, p: &Protection, resp: &mut Response) {
    let st = shared.lock();
    let (count, exec) = st
        .windows
        .get(key)
        .map(|w| (w.done.len(), w.done.iter().map(|(_, ms)| ms).sum::<u64>()))
        .unwrap_or((0, 0));
    let h = resp.headers_mut();
    h.insert(
        "x-ms-ratelimit-burst-remaining-xrm-requests",
        HeaderValue::from(p.requests.saturating_sub(count) as u64),
    );
    h.insert(
        "x-ms-ratelimit-time-remaining-xrm-requests",
        HeaderValue::from_str(&seconds_with_separators(
            p.execution_ms.saturating_sub(exec),
        ))
        .expect("ascii"),
    );
    h.insert("x-ms-dop-hint", HeaderValue::from(4u64));
}

/// Milliseconds as Dataverse writes execution time in its headers: seconds with two decimals
/// and thousands separators (`1,199.53`).
pub(crate) fn seconds_with_separators(ms: u64) -> String {
    let whole = (ms / 1000).to_string();
    let mut grouped = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{grouped}.{:02}", (ms % 1000) / 10)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn dataverse(
    st: &mut SimState,
    base: &str,
    org: &str,
    rest: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    batch: Option<Result<Vec<Operation>, String>>,
) -> Response {
    let Some(o) = st.orgs.get(org) else {
        return odata_error(
            StatusCode::NOT_FOUND,
            "0x80072326",
            &format!("Organization '{org}' does not exist."),
        );
    };
    let root = format!("{base}/dataverse/{org}/{API}");
    let rest = percent_decode(rest);
    let query = uri.query().unwrap_or("");
    match (method.as_str(), rest.as_str()) {
        ("GET", "WhoAmI") => json_ok(json!({
            "@odata.context": format!("{root}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse"),
            "BusinessUnitId": uuid::Uuid::nil(), "UserId": uuid::Uuid::nil(), "OrganizationId": o.organization_id,
        })),
        ("GET", r) if r.starts_with("RetrieveCurrentOrganization(") => {
            if r != "RetrieveCurrentOrganization(AccessType=Microsoft.Dynamics.CRM.EndpointAccessType'Default')"
            {
                return odata_error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    "Invalid AccessType parameter.",
                );
            }
            json_ok(json!({
                "@odata.context": format!("{root}$metadata#Microsoft.Dynamics.CRM.RetrieveCurrentOrganizationResponse"),
                "Detail": {
                    "OrganizationId": o.organization_id, "FriendlyName": o.friendly_name, "OrganizationVersion": "9.2.26101.00000",
                    "EnvironmentId": o.environment_id, "DatacenterId": uuid::Uuid::nil(), "Geo": "NA", "TenantId": uuid::Uuid::nil(),
                    "UrlName": org, "UniqueName": o.unique_name, "State": "Enabled", "OrganizationType": "Customer",
                    "Endpoints": {"Count": 1, "IsReadOnly": false, "Keys": ["WebApplication"], "Values": [format!("{base}/dataverse/{org}/")]}
                }
            }))
        }
        ("GET", "RetrieveFinanceAndOperationsIntegrationDetails") => match &o.integrated_fno {
            Some(f) => json_ok(json!({
                "@odata.context": format!("{root}$metadata#Microsoft.Dynamics.CRM.RetrieveFinanceAndOperationsIntegrationDetailsResponse"),
                "Id": uuid::Uuid::nil(), "Url": format!("{base}/fno/{f}"), "IsUnifiedDatabase": false, "TenantId": uuid::Uuid::nil(),
            })),
            None => odata_error(
                StatusCode::NOT_FOUND,
                "0x80040217",
                "This environment is not linked to a Finance and Operations environment.",
            ),
        },
        ("GET", r) if r.starts_with("EntityDefinitions(") => {
            if r != "EntityDefinitions(LogicalName='msdyn_dualwriteruntimeconfig')" {
                return odata_error(
                    StatusCode::NOT_FOUND,
                    "0x80040217",
                    "Could not find an entity with specified key.",
                );
            }
            let select = query_param(query, "$select").unwrap_or_default();
            let mut v = json!({"@odata.context": format!("{root}$metadata#EntityDefinitions(EntitySetName,PrimaryIdAttribute)/$entity"), "MetadataId": uuid::Uuid::nil()});
            for f in select.split(',').filter(|s| !s.is_empty()) {
                match f {
                    "EntitySetName" => v["EntitySetName"] = json!(RUNTIME_SET),
                    "PrimaryIdAttribute" => v["PrimaryIdAttribute"] = json!(RUNTIME_KEY),
                    "LogicalName" => v["LogicalName"] = json!("msdyn_dualwriteruntimeconfig"),
                    other => {
                        return odata_error(
                            StatusCode::BAD_REQUEST,
                            "0x0",
                            &format!(
                                "Could not find a property named '{other}' on type 'Microsoft.Dynamics.CRM.EntityMetadata'."
                            ),
                        );
                    }
                }
            }
            json_ok(v)
        }
        ("GET", RUNTIME_SET) => {
            let select = query_param(query, "$select");
            let cols: Vec<String> = match &select {
                Some(s) => s.split(',').map(str::to_string).collect(),
                None => RUNTIME_COLUMNS.iter().map(|s| s.to_string()).collect(),
            };
            if let Some(bad) = cols.iter().find(|c| !RUNTIME_COLUMNS.contains(&c.as_str())) {
                return odata_error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    &format!(
                        "Could not find a property named '{bad}' on type 'Microsoft.Dynamics.CRM.msdyn_dualwriteruntimeconfig'."
                    ),
                );
            }
            let after = query_param(query, "$skiptoken")
                .and_then(|t| cookie_last(&t))
                .and_then(|s| uuid::Uuid::parse_str(&s).ok());
            let size = max_page(headers, DATAVERSE_MAX_PAGE);
            let o = &st.orgs[org];
            let range = match after {
                Some(a) => o
                    .rows
                    .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
                None => o.rows.range(..),
            };
            let mut rows = Vec::with_capacity(size);
            let mut last = None;
            let mut more = false;
            for (id, row) in range {
                if rows.len() == size {
                    more = true;
                    break;
                }
                let mut out = serde_json::Map::new();
                out.insert("@odata.etag".into(), row["@odata.etag"].clone());
                for c in &cols {
                    out.insert(c.clone(), row[c.as_str()].clone());
                }
                out.insert(RUNTIME_KEY.into(), json!(id.to_string()));
                rows.push(Value::Object(out));
                last = Some(*id);
            }
            let mut v = json!({"@odata.context": format!("{root}$metadata#{RUNTIME_SET}({})", cols.join(",")), "value": rows});
            if query_param(query, "$count").as_deref() == Some("true") {
                // Dataverse counts at most 5,000 rows and says when there are more.
                v["@odata.count"] = json!(o.rows.len().min(5000));
                if o.rows.len() > 5000 {
                    v["@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded"] = json!(true);
                }
            }
            if more && let Some(last) = last {
                let cookie = format!(
                    "<cookie pagenumber=\"2\" pagingcookie=\"%3ccookie%20page%3d%221%22%3e%3cmsdyn_dualwriteruntimeconfigid%20last%3d%22%7b{last}%7d%22%20first%3d%22%7b0%7d%22%20%2f%3e%3c%2fcookie%3e\" istracking=\"False\" />"
                );
                let mut next = url_with_query(
                    &format!("{root}{RUNTIME_SET}"),
                    &[("$select", &cols.join(",")), ("$skiptoken", &cookie)],
                );
                if select.is_none() {
                    next =
                        url_with_query(&format!("{root}{RUNTIME_SET}"), &[("$skiptoken", &cookie)]);
                }
                v["@odata.nextLink"] = json!(next);
            }
            *st.snapshot
                .page_reads
                .entry("dataverse".into())
                .or_default() += 1;
            let mut r = json_ok(v);
            r.headers_mut().insert(
                "Preference-Applied",
                HeaderValue::from_str(&format!("odata.maxpagesize={size}")).expect("ascii"),
            );
            r
        }
        ("DELETE", r) if r.starts_with(RUNTIME_SET) => {
            st.snapshot.single_deletes += 1;
            let (status, body) = dataverse_delete(st, org, r);
            match body {
                Some(b) => (
                    StatusCode::from_u16(status).expect("valid"),
                    [("content-type", "application/json")],
                    b,
                )
                    .into_response(),
                None => StatusCode::from_u16(status).expect("valid").into_response(),
            }
        }
        ("POST", "$batch") => {
            *st.snapshot
                .batch_requests
                .entry("dataverse".into())
                .or_default() += 1;
            let ops = match batch.expect("parsed for $batch") {
                Ok(ops) => ops,
                Err(e) => {
                    return odata_error(
                        StatusCode::BAD_REQUEST,
                        "0x80048d19",
                        &format!(
                            "Error identified in Payload provided by the user for Entity :'', For more information on this error please follow this help link https://go.microsoft.com/fwlink/?linkid=2195293  ----> InnerException : {e}"
                        ),
                    );
                }
            };
            if ops.len() > DATAVERSE_MAX_BATCH {
                return odata_error(
                    StatusCode::BAD_REQUEST,
                    "0x8004801a",
                    "The number of requests in batch exceeds the limit of 1000.",
                );
            }
            let root_path = format!("/dataverse/{org}/{API}");
            run_batch(
                ops,
                prefers(headers, "odata.continue-on-error"),
                |op, check_only| {
                    let Some(path) = batch_target(base, &root_path, &op.target) else {
                        return (
                            400,
                            error_body("0x0", "The batch operation targets another service root."),
                        );
                    };
                    let path = percent_decode(&path);
                    if op.method != "DELETE" || !path.starts_with(RUNTIME_SET) {
                        return (
                            405,
                            error_body(
                                "0x0",
                                "The simulator accepts only DELETE of msdyn_dualwriteruntimeconfigs in a batch.",
                            ),
                        );
                    }
                    if check_only {
                        let exists = parse_guid_key(&path)
                            .is_some_and(|id| st.orgs[org].rows.contains_key(&id));
                        return if exists {
                            (204, None)
                        } else {
                            (404, error_body("0x80040217", "Entity does not exist"))
                        };
                    }
                    dataverse_delete(st, org, &path)
                },
            )
        }
        _ => odata_error(
            StatusCode::NOT_FOUND,
            "0x8006088a",
            &format!(
                "Resource not found for the segment '{}'.",
                rest.split(['(', '?']).next().unwrap_or("")
            ),
        ),
    }
}

pub(crate) fn parse_guid_key(path: &str) -> Option<uuid::Uuid> {
    let inner = path
        .strip_prefix(RUNTIME_SET)?
        .strip_prefix('(')?
        .strip_suffix(')')?;
    uuid::Uuid::parse_str(inner).ok()
}

pub(crate) fn dataverse_delete(st: &mut SimState, org: &str, path: &str) -> (u16, Option<String>) {
    let Some(id) = parse_guid_key(path) else {
        return (
            400,
            error_body("0x80060888", "Bad Request - Error in query syntax."),
        );
    };
    if st.faults.ghost_rows > 0 && st.orgs.get(org).is_some_and(|o| o.rows.contains_key(&id)) {
        // A server that lies: the delete answers 204, the row stays.
        if st.ghosted.insert(id) && st.ghosted.len() > st.faults.ghost_rows {
            st.ghosted.remove(&id);
        } else {
            return (204, None);
        }
    }
    let existed = st
        .orgs
        .get_mut(org)
        .and_then(|o| o.rows.remove(&id))
        .is_some();
    record_delete(st, "dataverse", org, &id.to_string(), existed);
    if existed {
        (204, None)
    } else {
        (
            404,
            error_body(
                "0x80040217",
                &format!("msdyn_dualwriteruntimeconfig With Id = {id} Does Not Exist"),
            ),
        )
    }
}
