//! F&O OData (`/fno/{env}/data/`): `DualWriteProjectConfigurations` (cross-company, paged) and
//! deletes by key.

use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::multipart::Operation;
use crate::odata::{
    batch_target, error_body, json_ok, max_page, odata_error, percent_decode, prefers, query_param,
    record_delete, run_batch, url_with_query,
};
use crate::purge_service::purge_service;
use crate::state::SimState;

pub(crate) const FNO_SET: &str = "DualWriteProjectConfigurations";
pub(crate) const FNO_COLUMNS: [&str; 9] = [
    "ProjectName",
    "ExternalEnvironmentUrl",
    "InternalEntityName",
    "ExternalEntityName",
    "Status",
    "IsDelete",
    "dataAreaId",
    "ServiceBusConnectionString",
    "StorageAccountSASConnectionString",
];
pub(crate) const FNO_MAX_PAGE: usize = 10_000;
#[allow(clippy::too_many_arguments)]
pub(crate) fn fno(
    st: &mut SimState,
    base: &str,
    env: &str,
    rest: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &str,
    batch: Option<Result<Vec<Operation>, String>>,
) -> Response {
    let Some(e) = st.fno.get(env) else {
        return odata_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("No F&O environment '{env}'."),
        );
    };
    let query = uri.query().unwrap_or("");
    let rest_dec = percent_decode(rest);
    if let Some(svc) = &e.purge_service_path
        && method == Method::POST
        && rest_dec == svc.trim_start_matches('/')
    {
        return purge_service(st, env, body);
    }
    let root = format!("{base}/fno/{env}/data/");
    match (method.as_str(), rest_dec.as_str()) {
        ("GET", r) if r == format!("data/{FNO_SET}") => {
            let cross =
                query_param(query, "cross-company").is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let select = query_param(query, "$select");
            let cols: Vec<String> = match &select {
                Some(s) => s.split(',').map(str::to_string).collect(),
                None => FNO_COLUMNS.iter().map(|s| s.to_string()).collect(),
            };
            if let Some(bad) = cols.iter().find(|c| !FNO_COLUMNS.contains(&c.as_str())) {
                return odata_error(
                    StatusCode::BAD_REQUEST,
                    "",
                    &format!(
                        "Could not find a property named '{bad}' on type 'Microsoft.Dynamics.DataEntities.DualWriteProjectConfiguration'."
                    ),
                );
            }
            let after = query_param(query, "$skiptoken");
            let size = max_page(headers, FNO_MAX_PAGE);
            let range: Box<dyn Iterator<Item = (&String, &Value)>> = match &after {
                Some(a) => Box::new(e.project_configs.range::<String, _>((
                    std::ops::Bound::Excluded(a.clone()),
                    std::ops::Bound::Unbounded,
                ))),
                None => Box::new(e.project_configs.iter()),
            };
            let mut rows = Vec::new();
            let mut last = None;
            let mut more = false;
            // Without cross-company=true, F&O answers for the user's default company only.
            for (k, row) in range.filter(|(_, r)| cross || r["dataAreaId"] == "usmf") {
                if rows.len() == size {
                    more = true;
                    break;
                }
                let mut out = serde_json::Map::new();
                out.insert("@odata.etag".into(), row["@odata.etag"].clone());
                for c in &cols {
                    out.insert(c.clone(), row[c.as_str()].clone());
                }
                rows.push(Value::Object(out));
                last = Some(k.clone());
            }
            let mut v =
                json!({"@odata.context": format!("{root}$metadata#{FNO_SET}"), "value": rows});
            if more && let Some(last) = last {
                let mut pairs = vec![("cross-company", if cross { "true" } else { "false" })];
                let sel = cols.join(",");
                if select.is_some() {
                    pairs.push(("$select", &sel));
                }
                pairs.push(("$skiptoken", &last));
                v["@odata.nextLink"] = json!(url_with_query(&format!("{root}{FNO_SET}"), &pairs));
            }
            *st.snapshot.page_reads.entry("fno".into()).or_default() += 1;
            json_ok(v)
        }
        ("DELETE", r) if r.starts_with(&format!("data/{FNO_SET}(")) => {
            st.snapshot.single_deletes += 1;
            let (status, body) = fno_delete(st, env, &r["data/".len()..]);
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
        ("POST", "data/$batch") => {
            *st.snapshot.batch_requests.entry("fno".into()).or_default() += 1;
            let ops = match batch.expect("parsed for $batch") {
                Ok(ops) => ops,
                Err(e) => {
                    return odata_error(
                        StatusCode::BAD_REQUEST,
                        "",
                        &format!("The batch request is malformed: {e}"),
                    );
                }
            };
            let root_path = format!("/fno/{env}/data/");
            run_batch(
                ops,
                prefers(headers, "odata.continue-on-error"),
                |op, check_only| {
                    let Some(path) = batch_target(base, &root_path, &op.target) else {
                        return (
                            400,
                            error_body("", "The batch operation targets another service root."),
                        );
                    };
                    let path = percent_decode(&path);
                    if op.method != "DELETE" || !path.starts_with(FNO_SET) {
                        return (
                            405,
                            error_body(
                                "",
                                "The simulator accepts only DELETE of DualWriteProjectConfigurations in a batch.",
                            ),
                        );
                    }
                    if check_only {
                        let exists = fno_key(&path)
                            .is_some_and(|k| st.fno[env].project_configs.contains_key(&k));
                        return if exists {
                            (204, None)
                        } else {
                            (404, error_body("", "Not found"))
                        };
                    }
                    fno_delete(st, env, &path)
                },
            )
        }
        _ => odata_error(
            StatusCode::NOT_FOUND,
            "",
            &format!(
                "No HTTP resource was found that matches the request URI '{}'.",
                uri.path()
            ),
        ),
    }
}

/// `DualWriteProjectConfigurations(ProjectName='x')` -> `x` (with `''` unescaped).
pub(crate) fn fno_key(path: &str) -> Option<String> {
    let inner = path
        .strip_prefix(FNO_SET)?
        .strip_prefix('(')?
        .strip_suffix(')')?;
    let v = inner
        .strip_prefix("ProjectName=")?
        .strip_prefix('\'')?
        .strip_suffix('\'')?;
    Some(v.replace("''", "'"))
}

pub(crate) fn fno_delete(st: &mut SimState, env: &str, path: &str) -> (u16, Option<String>) {
    let Some(key) = fno_key(path) else {
        return (
            400,
            error_body(
                "",
                "The key in the request URI is not valid for resource 'DualWriteProjectConfiguration'.",
            ),
        );
    };
    let existed = st
        .fno
        .get_mut(env)
        .and_then(|e| e.project_configs.remove(&key))
        .is_some();
    record_delete(st, "fno", env, &key, existed);
    if existed {
        (204, None)
    } else {
        (
            404,
            error_body(
                "",
                "Resource not found for the segment 'DualWriteProjectConfigurations'.",
            ),
        )
    }
}
