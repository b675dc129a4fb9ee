//! `relink-bench reliability`: turns the reports the reliability suite wrote (one JSON file per
//! scenario, from tests/common/scenario.rs) into docs/RELIABILITY.md, or with `--check` fails
//! if the page differs from what the suite just produced.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

const COMMAND: &str = "bash infra/scripts/reliability.sh";

/// Writes (or checks) the page from the reports in `dir`.
pub fn run(dir: &Path, out: &Path, check: bool) -> Result<()> {
    let reports = read(dir)?;
    let page = render(&reports);
    if check {
        let current = std::fs::read_to_string(out).unwrap_or_default();
        if current != page {
            let theirs: Vec<&str> = current.lines().collect();
            let diff: Vec<String> = page
                .lines()
                .filter(|l| !theirs.contains(l))
                .map(|l| format!("  + {l}"))
                .chain(
                    theirs
                        .iter()
                        .filter(|l| !page.lines().any(|p| p == **l))
                        .map(|l| format!("  - {l}")),
                )
                .collect();
            bail!(
                "{} does not match what the reliability suite just ran; regenerate it with `{COMMAND}` and commit it:\n{}",
                out.display(),
                diff.join("\n")
            );
        }
        println!(
            "{} matches the suite's {} scenarios",
            out.display(),
            reports.len()
        );
        return Ok(());
    }
    std::fs::write(out, page).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {} ({} scenarios)", out.display(), reports.len());
    Ok(())
}

fn read(dir: &Path) -> Result<Vec<Value>> {
    let mut reports = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!(
            "no scenario reports in {}: run the reliability suite first ({COMMAND})",
            dir.display()
        )
    })?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)?;
            reports.push(
                serde_json::from_str::<Value>(&text)
                    .with_context(|| format!("{} is not a scenario report", path.display()))?,
            );
        }
    }
    if reports.is_empty() {
        bail!(
            "no scenario reports in {}: run the reliability suite first ({COMMAND})",
            dir.display()
        );
    }
    reports.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(reports)
}

const COLUMNS: [(&str, &str); 11] = [
    ("runs_expected", "Runs started"),
    ("runs_finished", "Runs ended as expected"),
    ("rows_expected", "Rows expected"),
    ("rows_deleted", "Rows deleted"),
    ("rows_archived", "Rows archived"),
    ("deleted_twice", "Deleted twice"),
    ("wrong_org_deleted", "Deleted in wrong org"),
    ("lost_runs", "Lost runs"),
    ("secrets_in_logs", "Secrets in logs"),
    ("messages_left", "Left in queues / DLQs"),
    ("result", "Result"),
];

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render(reports: &[Value]) -> String {
    let mut page = format!(
        "# Reliability\n\n\
         Generated from the reliability suite's own output ([tests/reliability.rs](../tests/reliability.rs)). \
         Every scenario drives the whole pipeline: real SQS queues and a DynamoDB table on a local moto server, \
         `relink worker` processes (the Lambda handler code), the Dataverse / F&O / Entra simulators over HTTP. \
         Afterwards it reads every side: the simulator's rows and per-row delete counts, each run's archive and record, \
         every stage queue and dead-letter queue, and everything the processes printed (searched for the client secret, \
         every access token issued, row secrets and anything the scenario smuggled in). It writes its row below, \
         then asserts the guarantees, so a row says `pass` only if they held.\n\n\
         Regenerate: `{COMMAND}` (starts the local stack, runs the suite, rewrites this page). \
         CI runs the same suite through `bash infra/scripts/test.sh` and fails if this page differs from what it just ran.\n\n\
         Guarantees: zero lost runs, zero rows deleted twice, zero rows deleted in a wrong organisation, every deleted row \
         archived, zero secrets in logs, nothing left in a queue or dead-letter queue.\n\n"
    );
    page.push_str("| # | Scenario | Injected |");
    for (_, title) in COLUMNS {
        page.push_str(&format!(" {title} |"));
    }
    page.push_str("\n|---|---|---|");
    for _ in COLUMNS {
        page.push_str("---|");
    }
    page.push('\n');
    for r in reports {
        let id = cell(&r["id"]);
        let number = id.split('-').next().unwrap_or_default().to_string();
        page.push_str(&format!(
            "| {number} | {} | {} |",
            cell(&r["title"]),
            cell(&r["injected"]).replace('|', "\\|")
        ));
        for (key, _) in COLUMNS {
            page.push_str(&format!(" {} |", cell(&r[key])));
        }
        page.push('\n');
    }
    let total = |key: &str| reports.iter().filter_map(|r| r[key].as_u64()).sum::<u64>();
    page.push_str(&format!("| | **Total** | {} scenarios |", reports.len()));
    for (key, _) in COLUMNS {
        if key == "result" {
            let passed = reports.iter().filter(|r| r["result"] == "pass").count();
            page.push_str(&format!(" {passed} of {} pass |", reports.len()));
        } else {
            page.push_str(&format!(" {} |", total(key)));
        }
    }
    page.push_str("\n\n## What each scenario showed\n\n");
    for r in reports {
        page.push_str(&format!(
            "- **{}**: {}.\n",
            cell(&r["title"]),
            cell(&r["evidence"])
        ));
    }
    page
}
