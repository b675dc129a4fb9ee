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
use crate::state::{FnoEnv, SimState, config_key};

pub(crate) const FNO_SET: &str = "DualWriteProjectConfigurations";
const FNO_ENTITY: &str = "DualWriteProjectConfiguration";
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
            let size = max_page(headers, FNO_MAX_PAGE);
            let mut pairs = vec![("cross-company", if cross { "true" } else { "false" })];
            let sel = cols.join(",");
            if select.is_some() {
                pairs.push(("$select", &sel));
            }
            if query_param(query, "simempty").is_some() {
                // The empty page before the real one: its next link is the real continuation.
                let after = query_param(query, "$skiptoken").unwrap_or_default();
                let skip = query_param(query, "$skip").unwrap_or_default();
                if e.skip_paging {
                    pairs.push(("$skip", &skip));
                } else {
                    pairs.push(("$skiptoken", &after));
                }
                *st.snapshot.page_reads.entry("fno".into()).or_default() += 1;
                return json_ok(json!({
                    "@odata.context": format!("{root}$metadata#{FNO_SET}"), "value": [],
                    "@odata.nextLink": url_with_query(&format!("{root}{FNO_SET}"), &pairs),
                }));
            }
            let after = query_param(query, "$skiptoken");
            let skip: usize = match query_param(query, "$skip").map(|s| s.parse()) {
                None => 0,
                Some(Ok(n)) => n,
                Some(Err(_)) => {
                    return odata_error(StatusCode::BAD_REQUEST, "", "Invalid $skip value.");
                }
            };
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
            for (k, row) in range
                .filter(|(_, r)| cross || r["dataAreaId"] == "usmf")
                .skip(skip)
            {
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
            let next_skip = (skip + size).to_string();
            if more && let Some(last) = last {
                if e.skip_paging {
                    pairs.push(("$skip", &next_skip));
                } else {
                    pairs.push(("$skiptoken", &last));
                }
                if e.empty_pages {
                    pairs.push(("simempty", "1"));
                }
                v["@odata.nextLink"] = json!(url_with_query(&format!("{root}{FNO_SET}"), &pairs));
            }
            *st.snapshot.page_reads.entry("fno".into()).or_default() += 1;
            json_ok(v)
        }
        ("GET", "data/$metadata") => {
            *st.snapshot
                .page_reads
                .entry("fno-metadata".into())
                .or_default() += 1;
            (
                StatusCode::OK,
                [("content-type", "application/xml")],
                metadata(e.per_company_key),
            )
                .into_response()
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
                        let exists = fno_key(&st.fno[env], &path)
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

/// `$metadata` as F&O serves it: thousands of entity types (here 3,000 short ones) before the
/// one relink needs, whose key is `ProjectName`, or (`dataAreaId`, `ProjectName`) per company.
fn metadata(per_company: bool) -> String {
    let mut out = String::from(
        r#"<?xml version="1.0" encoding="utf-8"?><edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices><Schema Namespace="Microsoft.Dynamics.DataEntities" xmlns="http://docs.oasis-open.org/odata/ns/edm">"#,
    );
    for i in 0..3000 {
        out.push_str(&format!(
            r#"<EntityType Name="SimFiller{i:04}"><Key><PropertyRef Name="dataAreaId" /><PropertyRef Name="Id{i}" /></Key><Property Name="Id{i}" Type="Edm.String" Nullable="false" /></EntityType>"#
        ));
    }
    out.push_str(&format!(
        r#"<EntityType Name="{FNO_ENTITY}Staging"><Key><PropertyRef Name="ExecutionId" /></Key></EntityType><EntityType Name="{FNO_ENTITY}"><Key>{}<PropertyRef Name="ProjectName" /></Key>"#,
        if per_company { r#"<PropertyRef Name="dataAreaId" />"# } else { "" }
    ));
    for c in FNO_COLUMNS {
        out.push_str(&format!(r#"<Property Name="{c}" Type="Edm.String" />"#));
    }
    out.push_str(&format!(
        r#"</EntityType><EntityContainer Name="Resources"><EntitySet Name="{FNO_SET}" EntityType="Microsoft.Dynamics.DataEntities.{FNO_ENTITY}" /></EntityContainer></Schema></edmx:DataServices></edmx:Edmx>"#
    ));
    out
}

/// The key predicate's `name=value` pairs (values unquoted, `''` unescaped); a lone literal
/// is the single key's value, under the name `""`.
fn predicate_pairs(inner: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut rest = inner;
    while !rest.is_empty() {
        let (name, after) = match rest.find('=') {
            Some(eq) if !rest[..eq].contains('\'') => (&rest[..eq], &rest[eq + 1..]),
            _ => ("", rest),
        };
        let (value, after) = if let Some(quoted) = after.strip_prefix('\'') {
            let mut end = None;
            let b = quoted.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    end = Some(i);
                    break;
                }
                i += 1;
            }
            let end = end?;
            (quoted[..end].replace("''", "'"), &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        pairs.push((name.to_string(), value));
        rest = match after.strip_prefix(',') {
            Some(r) => r,
            None if after.is_empty() => after,
            None => return None,
        };
    }
    Some(pairs)
}

/// `DualWriteProjectConfigurations(ProjectName='x')` (or `('x')`, or with `dataAreaId` for a
/// per-company entity) -> the row's map key. Per company, a key without `dataAreaId` means
/// the default company (`usmf`), as F&O reads a partial key for the user's company.
pub(crate) fn fno_key(env: &FnoEnv, path: &str) -> Option<String> {
    let inner = path
        .strip_prefix(FNO_SET)?
        .strip_prefix('(')?
        .strip_suffix(')')?;
    let pairs = predicate_pairs(inner)?;
    let mut name = None;
    let mut company = None;
    for (k, v) in pairs {
        match k.as_str() {
            "ProjectName" | "" if name.is_none() => name = Some(v),
            "dataAreaId" if env.per_company_key && company.is_none() => company = Some(v),
            _ => return None,
        }
    }
    Some(config_key(
        env,
        company.as_deref().unwrap_or("usmf"),
        &name?,
    ))
}

pub(crate) fn fno_delete(st: &mut SimState, env: &str, path: &str) -> (u16, Option<String>) {
    let Some(key) = st.fno.get(env).and_then(|e| fno_key(e, path)) else {
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
