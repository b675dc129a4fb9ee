//! `relink report RUN_ID [--format md|json]`: the evidence of one run, for a change record or an
//! audit. It covers:
//!
//! - the stages, with their attempts, times and errors;
//! - the guards, with what each saw;
//! - rows found, archived and deleted per table;
//! - the throttling (429s waited out) each stage met;
//! - the Reset (who or what verified it, and when);
//! - the maps to re-apply (those that ran before and do not run again);
//! - the notices sent;
//! - where the archive is.
//!
//! It reads the run and the archive's counts, nothing else, so it works the same on the SQLite
//! store and on the table.

use serde_json::{Value, json};

use relink_core::error::{Error, Result};
use relink_core::model::{Run, Stage};
use relink_core::ports::{ProgressStore, ServiceTable};
use relink_core::stages::{DATAVERSE_TABLE, FNO_TABLE};

use crate::display::printable;

/// The report of `run_id` as JSON (the documented shape); `archive_at` says where the archive is.
pub async fn build(store: &dyn ProgressStore, run_id: &str, archive_at: &str) -> Result<Value> {
    let run = store
        .get_run(run_id)
        .await?
        .ok_or_else(|| Error::RunNotFound(run_id.into()))?;
    let outcome = |s: Stage| run.stage(s).outcome.clone().unwrap_or(Value::Null);
    let detect = outcome(Stage::DetectMismatch);
    let purge = outcome(Stage::PurgeKeys);
    let clear = outcome(Stage::ClearDataverseConfigs);
    let reset = outcome(Stage::ResetLink);
    let mut tables = Vec::new();
    for table in [
        FNO_TABLE,
        ServiceTable::DualWriteProjectFieldConfiguration.as_str(),
        ServiceTable::BusinessEventsDefinition.as_str(),
        DATAVERSE_TABLE,
    ] {
        let done = if table == DATAVERSE_TABLE {
            &clear
        } else {
            &purge[table]
        };
        tables.push(json!({
            "table": table,
            "archived": store.archived_count(run_id, table).await?,
            "deleted": done.get("deleted"),
            "already_gone": done.get("already_gone"),
            "cleared_by": done.get("cleared_by"),
        }));
    }
    Ok(json!({
        "run_id": run.run_id,
        "environment_id": run.environment_id,
        "status": run.status,
        "trigger": run.trigger,
        "options": run.options,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "timeline": run.stages.iter().map(|s| json!({
            "stage": s.stage,
            "status": s.status,
            "attempts": s.attempts,
            "started_at": s.started_at,
            "finished_at": s.finished_at,
            "error": s.error,
        })).collect::<Vec<_>>(),
        "guards": guards(&run),
        "found": {
            FNO_TABLE: detect.get("fno_project_configs"),
            "pointing_elsewhere": detect.get("fno_pointing_elsewhere"),
            DATAVERSE_TABLE: detect.get("dataverse_runtime_configs"),
            "reason": detect.get("reason"),
        },
        "tables": tables,
        "reset": {
            "mode": reset.get("mode").cloned().unwrap_or_else(|| json!("manual")),
            "verified": reset.get("verified"),
            "checks": reset.get("checks"),
            "checked_at": reset.get("checked_at"),
            "checked_by": reset.get("checked_by"),
            "gateway_requests": reset.get("gateway_requests"),
            "fell_back": reset.get("fell_back"),
        },
        "throttling": run.stages.iter().filter_map(|s| {
            let t = s.outcome.as_ref()?.get("throttled")?;
            Some(json!({"stage": s.stage, "count": t.get("count"), "waited_ms": t.get("waited_ms")}))
        }).collect::<Vec<_>>(),
        "maps": reset.get("maps"),
        "notices": run.notices,
        "archive": archive_at,
    }))
}

/// The guards' evidence as the latest stage that ran them recorded it.
fn guards(run: &Run) -> Value {
    run.stages
        .iter()
        .rev()
        .find_map(|s| {
            let o = s.outcome.as_ref()?;
            o.get("guards")
                .or_else(|| o.get("findings")?.get("guards"))
                .cloned()
        })
        .unwrap_or(Value::Null)
}

/// The report as Markdown.
pub fn markdown(r: &Value) -> String {
    let text = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => printable(s),
        other => printable(&other.to_string()),
    };
    let mut out = format!(
        "# relink run {} of {}: {}\n\nStarted {} ({}), last change {}.\n\n## Timeline\n\n| stage | status | attempts | started | finished | error |\n| --- | --- | ---: | --- | --- | --- |\n",
        text(&r["run_id"]),
        text(&r["environment_id"]),
        text(&r["status"]),
        text(&r["created_at"]),
        text(&r["trigger"]["source"]),
        text(&r["updated_at"]),
    );
    for s in r["timeline"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            text(&s["stage"]),
            text(&s["status"]),
            text(&s["attempts"]),
            text(&s["started_at"]),
            text(&s["finished_at"]),
            text(&s["error"]).replace('|', "/"),
        ));
    }
    out.push_str("\n## Guards\n\n");
    for key in ["identity", "production", "pairing"] {
        out.push_str(&format!("- **{key}**: {}\n", text(&r["guards"][key])));
    }
    out.push_str(&format!(
        "\n## Rows\n\nFound: {}\n\n| table | archived | deleted | already gone | cleared by |\n| --- | ---: | ---: | ---: | --- |\n",
        text(&r["found"]["reason"])
    ));
    for t in r["tables"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            text(&t["table"]),
            text(&t["archived"]),
            text(&t["deleted"]),
            text(&t["already_gone"]),
            text(&t["cleared_by"]),
        ));
    }
    out.push_str("\n## Throttling\n\n");
    let throttling = r["throttling"].as_array().cloned().unwrap_or_default();
    if throttling.is_empty() {
        out.push_str("None met: no request was answered 429.\n");
    }
    for t in throttling {
        out.push_str(&format!(
            "- {}: {} answer(s) 429, {} ms waited\n",
            text(&t["stage"]),
            text(&t["count"]),
            text(&t["waited_ms"]),
        ));
    }
    let reset = &r["reset"];
    out.push_str(&format!(
        "\n## Reset\n\nMode {}; verified: {}; {} check(s), the last at {} by {}.\n",
        text(&reset["mode"]),
        text(&reset["verified"]),
        text(&reset["checks"]),
        text(&reset["checked_at"]),
        text(&reset["checked_by"]),
    ));
    for g in r["reset"]["gateway_requests"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "- gateway {}: request {} ({})\n",
            text(&g["action"]),
            text(&g["request_id"]),
            text(&g["state"]),
        ));
    }
    out.push_str("\n## Maps to re-apply\n\n");
    let maps = &r["maps"];
    if maps.is_null() {
        out.push_str("Not known until the link is verified.\n");
    } else if maps["before"].as_u64() == Some(0) {
        out.push_str("No map ran before the restore.\n");
    } else {
        out.push_str(&format!(
            "Of {} maps that ran before, {} run again towards this Dataverse; {} to re-apply{}\n",
            text(&maps["before"]),
            text(&maps["running_again"]),
            text(&maps["missing_count"]),
            if maps["missing_count"].as_u64() == Some(0) {
                "."
            } else {
                ":"
            },
        ));
        for m in maps["missing"].as_array().into_iter().flatten() {
            out.push_str(&format!("- [ ] {}\n", text(m)));
        }
    }
    out.push_str("\n## Notices\n\n");
    let notices = r["notices"].as_array().cloned().unwrap_or_default();
    if notices.is_empty() {
        out.push_str("None sent (no channel configured, or nothing to tell yet).\n");
    }
    for n in notices {
        let said: Vec<String> = n["deliveries"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| format!("{} {}", text(&d["channel"]), text(&d["result"])))
            .collect();
        out.push_str(&format!(
            "- {} at {}: {}\n",
            text(&n["key"]),
            text(&n["at"]),
            said.join(", ")
        ));
    }
    out.push_str(&format!(
        "\n## Archive\n\nEvery deleted row was archived first, redacted of secrets: {}.\n",
        text(&r["archive"])
    ));
    out
}
