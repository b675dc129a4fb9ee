//! The customer-deployed F&O purge service for `DualWriteProjectFieldConfiguration` and
//! `BusinessEventsDefinition`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::odata::{odata_error, record_delete};
use crate::state::SimState;

/// The customer purge service relink's README specifies: `{"action":"list","table":T}` ->
/// `{"rows":[{"key":..}]}`; `{"action":"delete","table":T,"keys":[..]}` -> `{"deleted":n,"missing":m}`.
pub(crate) fn purge_service(st: &mut SimState, env: &str, body: &str) -> Response {
    let Ok(req) = serde_json::from_str::<Value>(body) else {
        return odata_error(StatusCode::BAD_REQUEST, "", "The request body is not JSON.");
    };
    let table = req["table"].as_str().unwrap_or("").to_string();
    let e = st.fno.get_mut(env).expect("checked by caller");
    let rows = match table.as_str() {
        "DualWriteProjectFieldConfiguration" => &mut e.field_configs,
        "BusinessEventsDefinition" => &mut e.business_events,
        _ => {
            return odata_error(
                StatusCode::BAD_REQUEST,
                "",
                &format!("Unknown table '{table}'."),
            );
        }
    };
    match req["action"].as_str() {
        Some("list") => {
            axum::Json(json!({"rows": rows.values().cloned().collect::<Vec<_>>()})).into_response()
        }
        Some("delete") => {
            let keys: Vec<String> = req["keys"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let mut deleted = 0;
            let mut missing = 0;
            let mut log = Vec::new();
            for k in keys {
                let existed = rows.remove(&k).is_some();
                if existed {
                    deleted += 1
                } else {
                    missing += 1
                }
                log.push((k, existed));
            }
            for (k, existed) in log {
                record_delete(st, "fno", &format!("{env}/{table}"), &k, existed);
            }
            axum::Json(json!({"deleted": deleted, "missing": missing})).into_response()
        }
        _ => odata_error(
            StatusCode::BAD_REQUEST,
            "",
            "`action` must be list or delete.",
        ),
    }
}
