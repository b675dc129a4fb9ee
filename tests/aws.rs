//! End-to-end in AWS mode: real SQS queues and a real DynamoDB table on the local stack (moto),
//! `relink worker` running the stage handlers, the simulators for Dynamics.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::aws::AwsWorld;
use common::{ENV, Spec, stage};
use relink_core::model::Stage;
use relink_sim::Faults;

fn stage_names(run: &serde_json::Value) -> Vec<String> {
    run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_minimal_injected_event_runs_through_the_queues_and_confirm_finishes_it() {
    let a = AwsWorld::new(Spec {
        uat_rows: 2500,
        project_configs: 30,
        ..Spec::default()
    })
    .await;
    // What `aws sqs send-message --message-body '{"environment_id":"contoso-uat"}'` sends.
    a.send_raw(
        Stage::DetectMismatch,
        &format!(r#"{{"environment_id":"{ENV}"}}"#),
    )
    .await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");

    let run = a.status_json(&[ENV]).await;
    assert_eq!(run["status"], "awaiting-confirmation", "{run}");
    assert_eq!(
        stage_names(&run),
        [
            "detect-mismatch",
            "purge-keys",
            "clear-dataverse-configs",
            "reset-link"
        ]
    );
    assert_eq!(
        stage(&run, "clear-dataverse-configs")["outcome"]["deleted"],
        2500
    );
    assert_eq!(run["trigger"]["source"], "manual");
    let snap = a.w.sim.snapshot();
    assert_eq!(
        (
            snap.runtime_configs["uat"],
            snap.project_configs[ENV],
            snap.runtime_configs["prod"]
        ),
        (0, 0, 25)
    );
    a.assert_queues_empty().await;

    a.w.sim.reset_link(ENV).unwrap();
    let run_id = run["run_id"].as_str().unwrap();
    let out = a.relink(&["confirm", run_id, "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let run = a.status_json(&["--run", run_id]).await;
    assert_eq!(run["status"], "succeeded");
    for s in run["stages"].as_array().unwrap() {
        assert_eq!(s["status"], "succeeded", "{s}");
    }
    let recent = a.status_json(&[]).await;
    assert_eq!(recent.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn two_runs_for_one_environment_never_overlap_and_neither_is_lost() {
    let a = AwsWorld::new(Spec {
        uat_rows: 2000,
        ..Spec::default()
    })
    .await;
    let (x, y) = tokio::join!(
        a.relink(&["inject", ENV, "--json"]),
        a.relink(&["inject", ENV, "--json"])
    );
    let ids = [
        x.json()["run_id"].as_str().unwrap().to_string(),
        y.json()["run_id"].as_str().unwrap().to_string(),
    ];
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");

    let runs: Vec<serde_json::Value> = runs_by_id(&a, &ids).await;
    let statuses: HashSet<&str> = runs.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        HashSet::from(["awaiting-confirmation", "skipped"]),
        "{runs:#?}"
    );
    let first = runs
        .iter()
        .find(|r| r["status"] == "awaiting-confirmation")
        .unwrap();
    let second = runs.iter().find(|r| r["status"] == "skipped").unwrap();
    // The second run's detection started only after the first had cleared everything.
    let cleared = stage(first, "clear-dataverse-configs")["finished_at"]
        .as_str()
        .unwrap()
        .to_string();
    let detected = stage(second, "detect-mismatch")["started_at"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        detected.parse::<jiff::Timestamp>().unwrap() > cleared.parse::<jiff::Timestamp>().unwrap(),
        "{detected} <= {cleared}"
    );
    assert!(a.w.sim.snapshot().deleted_twice.is_empty());
    a.assert_queues_empty().await;
}

async fn runs_by_id(a: &AwsWorld, ids: &[String; 2]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for id in ids {
        out.push(a.status_json(&["--run", id]).await);
    }
    out
}

#[tokio::test]
async fn the_watcher_queues_one_run_per_new_refresh_and_loses_none_to_outages_or_429s() {
    use relink_sim::{LcsHistorySeed, Seed};

    const TOKEN: &str = "lcs-delegated-token";
    // In AWS the LCS token, like every secret, is read from Secrets Manager.
    let lcs_token = common::aws::local_secret("relink-test/lcs", TOKEN).await;
    let a = AwsWorld::new(Spec {
        registry_extra: format!(
            "lcs_environment_id = \"lcs-env-9\"\nwatch = {{ lcs_project_id = \"1234567\", lcs_token = {{ secret_arn = \"{}\" }}, lcs_api = \"{{sim}}/lcs\" }}",
            lcs_token
        ),
        ..Spec::default()
    })
    .await;
    let entry = |kind: &str, id: &str, minutes_ago: i64| {
        let end = jiff::Timestamp::now() - jiff::SignedDuration::from_mins(minutes_ago);
        serde_json::json!({
            "Name": kind, "Type": kind, "TypeDisplay": kind, "Status": "Completed", "ActivityId": id,
            "EnvironmentId": "lcs-env-9", "ProjectId": "1234567",
            "StartDateTimeUtc": (end - jiff::SignedDuration::from_mins(20)).to_string(),
            // LCS writes UTC times without an offset.
            "EndDateTimeUtc": end.strftime("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
        })
    };
    a.w.sim
        .seed(&Seed {
            lcs_tokens: vec![TOKEN.into()],
            lcs_history: vec![LcsHistorySeed {
                project_id: "1234567".into(),
                environment_id: "lcs-env-9".into(),
                entries: vec![
                    entry("ApplyPackage", "act-pkg", 10),
                    entry("SFSourceDbToSandbox", "act-old", 180),
                ],
            }],
            ..Seed::default()
        })
        .unwrap();
    let watch = async || {
        let out = a.command(&["watch", "--json"]).output().await.unwrap();
        let out = a.w.finish(out);
        assert!(
            !out.stdout.contains(TOKEN) && !out.stderr.contains(TOKEN),
            "the LCS token leaked"
        );
        (
            out.code,
            serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap_or_default(),
            out,
        )
    };
    let started =
        |report: &serde_json::Value| report["started"].as_array().map(|a| a.len()).unwrap_or(0);

    let (code, report, out) = watch().await;
    assert_eq!(
        (code, started(&report)),
        (0, 0),
        "old refreshes and other operations start nothing: {out:?}"
    );

    a.w.sim.add_lcs_entry(
        "1234567",
        "lcs-env-9",
        entry("SFSourceDbToSandbox", "act-new", 1),
    );
    let (code, report, out) = watch().await;
    assert_eq!((code, started(&report)), (0, 1), "{out:?}");
    assert_eq!(report["started"][0][2], "act-new");
    let (_, report, _) = watch().await;
    assert_eq!(started(&report), 0, "the next poll starts nothing new");

    // LCS is down: the poll fails, keeps its place, and the next one finds the refresh.
    a.w.sim.set_faults(Faults {
        lcs_failing: true,
        ..Faults::default()
    });
    a.w.sim.add_lcs_entry(
        "1234567",
        "lcs-env-9",
        entry("SFSourceDbToSandbox", "act-during-outage", 0),
    );
    let (code, report, out) = watch().await;
    assert_eq!((code, started(&report)), (1, 0), "{out:?}");
    a.w.sim.set_faults(Faults::default());
    let (_, report, out) = watch().await;
    assert_eq!(started(&report), 1, "{out:?}");

    // 429 + Retry-After from LCS delays the poll; the refresh is still found.
    a.w.sim.set_faults(Faults {
        lcs_throttle_next: 2,
        ..Faults::default()
    });
    a.w.sim.add_lcs_entry(
        "1234567",
        "lcs-env-9",
        entry("PointInTimeRestore", "act-pitr", 0),
    );
    let throttled_before = a.w.sim.snapshot().throttled;
    let (code, report, out) = watch().await;
    assert_eq!((code, started(&report)), (0, 1), "{out:?}");
    assert!(a.w.sim.snapshot().throttled >= throttled_before + 2);

    assert_eq!(
        a.depth(&format!("{}detect-mismatch", a.prefix)).await,
        3,
        "one event per new restore"
    );
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let runs = a.status_json(&[]).await;
    let statuses: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses.len(),
        3,
        "{runs} {worker:?} {}",
        a.status_json(&[ENV]).await
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == "awaiting-confirmation")
            .count(),
        1,
        "{statuses:?}"
    );
    assert!(
        runs.as_array()
            .unwrap()
            .iter()
            .all(|r| r["trigger"]["source"] == "lcs")
    );
}

#[tokio::test]
async fn the_watcher_reads_power_platform_operations_with_the_apps_token() {
    use relink_sim::{PowerPlatformSeed, Seed};

    let a = AwsWorld::new(Spec {
        registry_extra: "power_platform_environment_id = \"pp-env-1\"\nwatch = { power_platform = true, power_platform_api = \"{sim}/powerplatform\" }".into(),
        ..Spec::default()
    })
    .await;
    // The documented shape, two to a page: the copy is on the third page.
    let op = |id: &str, name: &str, status: &str| serde_json::json!({"operationId": id, "name": name, "status": status, "startTime": jiff::Timestamp::now().to_string(), "endTime": jiff::Timestamp::now().to_string()});
    a.w.sim
        .seed(&Seed {
            power_platform: vec![PowerPlatformSeed {
                environment_id: "pp-env-1".into(),
                operations: vec![
                    op("op-backup", "Backup", "Succeeded"),
                    serde_json::json!({"operationId": "op-running", "name": "Restore", "status": "Running", "startTime": jiff::Timestamp::now().to_string()}),
                    serde_json::json!({"operationId": "op-no-end", "name": "Copy", "status": "Succeeded"}),
                    op("op-failed", "Restore", "Failed"),
                    op("op-copy", "Copy", "Succeeded"),
                ],
            }],
            ..Seed::default()
        })
        .unwrap();
    // Throttling and 5xx from the API only delay the poll.
    a.w.sim.set_faults(Faults {
        rate_429: 0.5,
        rate_5xx: 0.5,
        retry_after_secs: 1,
        rng_seed: Some(11),
        ..Faults::default()
    });
    let out = a.relink(&["watch", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let snap = a.w.sim.snapshot();
    assert!(
        snap.throttled + snap.server_errors > 0,
        "the faults were injected"
    );
    a.w.sim.set_faults(Faults::default());
    let report = out.json();
    let started: Vec<&str> = report["started"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[2].as_str().unwrap())
        .collect();
    assert_eq!(
        started,
        ["op-copy"],
        "only the completed copy starts a run: {report}"
    );
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{report}");
    assert!(
        skipped[0][2].as_str().unwrap().contains("op-no-end"),
        "the unusable operation is recorded, not a stall: {report}"
    );
    let again = a.relink(&["watch", "--json"]).await.json();
    assert!(again["started"].as_array().unwrap().is_empty(), "{again}");
}

#[tokio::test]
async fn a_registry_change_takes_effect_on_the_next_event_of_a_warm_function() {
    use relink_aws::lambda::handle_batch;
    use relink_core::model::{RunStatus, StageStatus};
    use relink_core::ports::ProgressStore;
    use relink_core::registry::Registry;

    let a = AwsWorld::new(Spec::default()).await;
    let store = a.store().await;
    let text = std::fs::read_to_string(&a.w.config).unwrap();
    let good = Registry::entry_json(&text, ENV).unwrap();
    // The entry first points at the wrong organisation (production's Dataverse).
    let mut wrong = good.clone();
    wrong["dataverse_url"] = a.w.sim.dataverse_url("prod").into();
    store.put_entry(ENV, &wrong).await.unwrap();

    // One warm detect-mismatch function, as Lambda keeps it between invocations.
    let deps = a
        .function_deps(Stage::DetectMismatch, std::time::Duration::from_secs(60))
        .await;
    let event = AwsWorld::detect_delivery;

    let first = ulid::Ulid::new().to_string();
    let out = handle_batch(&deps, event(&first)).await.unwrap();
    assert!(out.batch_item_failures.is_empty());
    let run = store.get_run(&first).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Refused, "{run:?}");

    // The operator corrects the entry; the same warm function uses it on its next event.
    store.put_entry(ENV, &good).await.unwrap();
    let second = ulid::Ulid::new().to_string();
    let out = handle_batch(&deps, event(&second)).await.unwrap();
    assert!(out.batch_item_failures.is_empty());
    let run = store.get_run(&second).await.unwrap().unwrap();
    assert_eq!(
        run.stage(Stage::DetectMismatch).status,
        StageStatus::Succeeded,
        "{run:?}"
    );
    assert_eq!(run.status, RunStatus::Running, "{run:?}");
    assert_eq!(a.w.sim.snapshot().deleted.values().sum::<usize>(), 0);
}

/// In AWS nobody runs `relink confirm`: the watcher's poll sends a `reset-link` event for each
/// run awaiting the Reset whose check is due, the stage verifies the link, and once the
/// operator has reset it the run ends `succeeded`; with no Reset it ends `failed` at the
/// give-up time.
#[tokio::test]
async fn the_watcher_has_an_awaited_reset_checked_until_it_succeeds_or_gives_up() {
    let a = AwsWorld::new(Spec {
        uat_rows: 40,
        project_configs: 5,
        extra_envs: 1,
        extra_rows: 10,
        registry_extra:
            "verify = { every_seconds = 1, give_up_after_seconds = 10, remind_every_seconds = 5 }"
                .into(),
        ..Spec::default()
    })
    .await;
    let envs = a.w.envs.clone();
    // The second environment checks on the same schedule; both publish to the notices topic,
    // the second through the registry's default channels (it has no `notify` of its own).
    let text = std::fs::read_to_string(&a.w.config).unwrap();
    let header = format!("[environments.{}]\n", envs[1]);
    let text = text.replace(
        &header,
        &format!("{header}verify = {{ every_seconds = 1, give_up_after_seconds = 10, remind_every_seconds = 5 }}\n"),
    );
    let header = format!("[environments.{}]\n", envs[0]);
    let text = text.replace(&header, &format!("{header}notify = {{ sns = true }}\n"));
    let text = format!("notify = {{ sns = true }}\n{text}");
    std::fs::write(&a.w.config, text).unwrap();
    let pushed = a.relink(&["env", "push", &envs[0], &envs[1]]).await;
    assert_eq!(pushed.code, 0, "{pushed:?}");
    let subscribed = a.subscribe_notices().await;
    let runs: Vec<String> = {
        let mut ids = Vec::new();
        for env in &envs {
            ids.push(a.inject(env).await);
        }
        ids
    };
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    for id in &runs {
        assert_eq!(
            a.status_json(&["--run", id]).await["status"],
            "awaiting-confirmation"
        );
    }
    // The operator resets the first environment's link only.
    a.w.sim.reset_link(&envs[0]).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let report = a.relink(&["watch", "--json"]).await;
    assert_eq!(report.code, 0, "{report:?}");
    let rechecks = report.json()["rechecks"].clone();
    assert_eq!(rechecks.as_array().unwrap().len(), 2, "{rechecks}");
    assert_eq!(a.drain(&[]).await.code, 0);
    let first = a.status_json(&["--run", &runs[0]]).await;
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(
        stage(&first, "reset-link")["outcome"]["checked_by"],
        "relink (scheduled check)"
    );
    let report = a.relink(&["report", &runs[0], "--format", "json"]).await;
    assert_eq!(report.code, 0, "{report:?}");
    let report = report.json();
    assert_eq!(report["reset"]["checked_by"], "relink (scheduled check)");
    assert!(
        report["archive"]
            .as_str()
            .unwrap()
            .contains(&format!("DynamoDB table {}", a.table)),
        "{report}"
    );
    let second = a.status_json(&["--run", &runs[1]]).await;
    assert_eq!(second["status"], "awaiting-confirmation", "{second}");
    assert_eq!(
        stage(&second, "reset-link")["outcome"]["checks"],
        1,
        "{second}"
    );
    // Past the give-up time (10 s after the gate), the next check ends the run.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let late = a.relink(&["watch", "--json"]).await.json();
    assert_eq!(late["rechecks"].as_array().unwrap().len(), 1, "{late}");
    assert_eq!(a.drain(&[]).await.code, 0);
    let second = a.status_json(&["--run", &runs[1]]).await;
    assert_eq!(second["status"], "failed", "{second}");
    assert!(
        stage(&second, "reset-link")["error"]
            .as_str()
            .unwrap()
            .contains("still not reset"),
        "{second}"
    );
    a.assert_queues_empty().await;
    // The topic got one message per event and run, readable and filterable, with no secret.
    let notices = a.take_notices(&subscribed).await;
    let events = |run: &str| -> Vec<String> {
        let mut keys: Vec<(String, String)> = notices
            .iter()
            .filter(|n| n["MessageAttributes"]["run_id"]["Value"] == run)
            .map(|n| {
                let body: serde_json::Value =
                    serde_json::from_str(n["Message"].as_str().unwrap()).unwrap();
                (
                    body["at"].as_str().unwrap().to_string(),
                    body["key"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        keys.sort();
        keys.into_iter().map(|(_, k)| k).collect()
    };
    assert_eq!(
        events(&runs[0]),
        ["awaiting-reset", "succeeded"],
        "{notices:?}"
    );
    assert_eq!(
        events(&runs[1]),
        ["awaiting-reset", "reminder-1", "failed"],
        "{notices:?}"
    );
    for n in &notices {
        let text = n.to_string();
        assert!(!text.contains(&a.w.secret), "a secret in a notice: {text}");
        let event = n["MessageAttributes"]["event"]["Value"].as_str().unwrap();
        let env = n["MessageAttributes"]["environment_id"]["Value"]
            .as_str()
            .unwrap();
        assert!(envs.iter().any(|e| e == env), "{n}");
        assert!(
            n["Subject"].as_str().unwrap().starts_with("relink: ")
                && n["Subject"].as_str().unwrap().ends_with(env),
            "{n}"
        );
        let body: serde_json::Value = serde_json::from_str(n["Message"].as_str().unwrap()).unwrap();
        assert_eq!(body["event"], event, "{n}");
    }
    let status = a.status_json(&["--run", &runs[0]]).await;
    assert_eq!(
        status["notices"][0]["deliveries"][0]["channel"], "sns",
        "{status}"
    );
    assert_eq!(
        status["notices"][0]["deliveries"][0]["result"], "sent",
        "{status}"
    );
}

/// The next stage starts from the run and the registry entry its event carries only when the
/// table holds exactly those texts: an entry edited to point elsewhere, or an edited run, makes
/// the stage read the table, and nothing reaches the edited URL.
#[tokio::test]
async fn carried_state_is_used_only_when_the_table_holds_exactly_it() {
    use relink_aws::lambda::handle_batch;
    use relink_core::event::Carried;
    use relink_core::model::{Run, StageStatus};
    use relink_core::ports::ProgressStore;

    let a = AwsWorld::new(Spec::default()).await;
    let store = a.store().await;
    let lease = std::time::Duration::from_secs(60);
    let run_id = ulid::Ulid::new().to_string();
    let deps = a.function_deps(Stage::DetectMismatch, lease).await;
    let out = handle_batch(&deps, AwsWorld::detect_delivery(&run_id))
        .await
        .unwrap();
    assert!(out.batch_item_failures.is_empty());
    let sent = a.take_event(Stage::PurgeKeys).await;
    let carried = sent
        .carried
        .clone()
        .expect("detect's event carries its state");
    let stored = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(serde_json::from_str::<Run>(&carried.run).unwrap(), stored);

    // The entry edited to send Dataverse and F&O calls to a listener that must hear nothing
    // (it counts connections and answers 400, so a stage that used the edit fails at once).
    let hostile = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let elsewhere = format!("http://{}", hostile.local_addr().unwrap());
    let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = heard.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut socket, _)) = hostile.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = socket
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let mut entry: serde_json::Value = serde_json::from_str(&carried.entry).unwrap();
    entry["dataverse_url"] = format!("{elsewhere}/dataverse/uat").into();
    entry["fno_url"] = format!("{elsewhere}/fno/{ENV}").into();
    let mut forged = sent.clone();
    forged.carried = Some(Carried {
        run: carried.run.clone(),
        entry: entry.to_string(),
    });
    let deps = a.function_deps(Stage::PurgeKeys, lease).await;
    let out = handle_batch(&deps, AwsWorld::delivery_of(forged.to_body()))
        .await
        .unwrap();
    assert!(out.batch_item_failures.is_empty());
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.stage(Stage::PurgeKeys).status, StageStatus::Succeeded);
    assert_eq!(run.stage(Stage::PurgeKeys).attempts, 1);

    // The run edited (forced) on its way to the next stage: the table's run is what counts.
    let sent = a.take_event(Stage::ClearDataverseConfigs).await;
    let carried = sent
        .carried
        .clone()
        .expect("purge's event carries its state");
    let mut run: Run = serde_json::from_str(&carried.run).unwrap();
    run.options.force = true;
    let mut forged = sent.clone();
    forged.carried = Some(Carried {
        run: serde_json::to_string(&run).unwrap(),
        entry: carried.entry.clone(),
    });
    let deps = a.function_deps(Stage::ClearDataverseConfigs, lease).await;
    let out = handle_batch(&deps, AwsWorld::delivery_of(forged.to_body()))
        .await
        .unwrap();
    assert!(out.batch_item_failures.is_empty());
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(
        run.stage(Stage::ClearDataverseConfigs).status,
        StageStatus::Succeeded
    );
    assert!(
        !run.options.force,
        "the edited run was not written: {run:?}"
    );
    assert_eq!(
        heard.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing connected to the edited URL"
    );

    // Unedited, the carried state is used as it is: reset-link starts from it.
    let sent = a.take_event(Stage::ResetLink).await;
    assert!(sent.carried.is_some());
    let deps = a.function_deps(Stage::ResetLink, lease).await;
    let out = handle_batch(&deps, AwsWorld::delivery_of(sent.to_body()))
        .await
        .unwrap();
    assert!(out.batch_item_failures.is_empty());
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(
        run.status,
        relink_core::model::RunStatus::AwaitingConfirmation,
        "{run:?}"
    );
}

#[tokio::test]
async fn status_all_lists_every_registered_environment_what_needs_a_person_first() {
    let a = AwsWorld::new(Spec {
        extra_envs: 199,
        extra_rows: 4,
        ..Spec::default()
    })
    .await;
    // ENV ends awaiting its Reset; fan-007 is dry-run (succeeded); the others never ran.
    a.inject(ENV).await;
    let dry = a
        .relink(&["inject", "fan-007", "--dry-run", "--json"])
        .await;
    assert_eq!(dry.code, 0, "{dry:?}");
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");

    let out = a.relink(&["status", "--all", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let rows = out.json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 200, "one line per registered environment");
    assert_eq!(
        rows[0]["environment_id"], ENV,
        "the run awaiting its Reset comes first"
    );
    assert_eq!(rows[0]["status"], "awaiting-confirmation");
    assert_eq!(rows[0]["needs_attention"], true);
    assert!(rows[0]["awaiting_since"].is_string());
    let last = &rows[199];
    assert_eq!(
        (last["environment_id"].as_str(), last["status"].as_str()),
        (Some("fan-007"), Some("succeeded")),
        "done comes last"
    );
    assert_eq!(
        rows.iter().filter(|r| r["run_id"].is_null()).count(),
        198,
        "the others never ran"
    );
    for key in [
        "environment_id",
        "run_id",
        "status",
        "needs_attention",
        "updated_at",
        "age_secs",
        "awaiting_since",
        "waiting",
        "last_probe",
    ] {
        assert!(rows[1].get(key).is_some(), "documented field {key}");
    }
    let text = a.relink(&["status", "--all"]).await;
    assert!(
        text.stdout.lines().nth(1).unwrap().starts_with(ENV)
            && text
                .stdout
                .contains("200 environment(s), 1 need(s) a person"),
        "{text:?}"
    );
}

/// The EMF lines the stage functions print for one run, read back and checked against what the
/// run did.
#[tokio::test]
async fn the_functions_emit_metrics_that_match_the_run() {
    use relink_aws::metrics::{self, Memory};

    let a = AwsWorld::new(Spec {
        uat_rows: 120,
        project_configs: 9,
        ..Spec::default()
    })
    .await;
    let emitted = Arc::new(Memory::default());
    let run_id = ulid::Ulid::new().to_string();
    for stage in Stage::ALL {
        let mut deps = a
            .function_deps(stage, std::time::Duration::from_secs(60))
            .await;
        deps.metrics = emitted.clone();
        let out = relink_aws::lambda::handle_batch(&deps, AwsWorld::delivery(stage, &run_id))
            .await
            .unwrap();
        assert!(out.batch_item_failures.is_empty(), "{stage}");
    }
    let lines = emitted.0.lock().unwrap().clone();
    let value = |stage: Option<&str>, name: &str| -> Option<f64> {
        lines
            .iter()
            .filter(|l| l.get("stage").and_then(|s| s.as_str()) == stage)
            .find_map(|l| l.get(name).and_then(|v| v.as_f64()))
    };
    assert_eq!(
        value(Some("clear-dataverse-configs"), metrics::ROWS_DELETED),
        Some(120.0)
    );
    assert_eq!(value(Some("purge-keys"), metrics::ROWS_DELETED), Some(9.0));
    assert_eq!(value(Some("purge-keys"), metrics::ROWS_ARCHIVED), Some(9.0));
    assert_eq!(value(None, metrics::RUNS_STARTED), Some(1.0));
    assert_eq!(value(None, metrics::RUNS_AWAITING_RESET), Some(1.0));
    for line in &lines {
        let declared = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(declared["Namespace"], metrics::NAMESPACE);
        for m in declared["Metrics"].as_array().unwrap() {
            let name = m["Name"].as_str().unwrap();
            assert!(
                metrics::ALL.contains(&name),
                "{name} is not a listed metric"
            );
            assert!(line[name].is_number(), "{name} has its value on the line");
            let unit = m["Unit"].as_str().unwrap();
            let want = if name == metrics::STAGE_DURATION {
                "Milliseconds"
            } else {
                "Count"
            };
            assert_eq!(unit, want, "{name}");
        }
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.get(metrics::STAGE_DURATION).is_some())
            .count(),
        4,
        "one duration per stage invocation"
    );
}

/// Drift probes: the watcher has each environment that asks for it probed once per slot,
/// whether or not a restore was announced. A stale link with `on_drift = "run"` becomes exactly
/// one run; with `on_drift = "notify"` it is only told (nothing deleted); a clean link's probe
/// only leaves its record. No probe starts while a run is under way.
#[tokio::test]
async fn probes_find_drift_no_event_mentioned_and_start_exactly_one_run() {
    let a = AwsWorld::new(Spec {
        uat_rows: 30,
        project_configs: 4,
        extra_envs: 2,
        extra_rows: 8,
        ..Spec::default()
    })
    .await;
    let envs = a.w.envs.clone();
    let mut text = std::fs::read_to_string(&a.w.config).unwrap();
    for (env, probe) in [
        (
            &envs[0],
            "probe = { every_hours = 720, on_drift = \"run\" }",
        ),
        (
            &envs[1],
            "probe = { every_hours = 720, on_drift = \"run\" }",
        ),
        (
            &envs[2],
            "probe = { every_hours = 720, on_drift = \"notify\" }\nnotify = { sns = true }",
        ),
    ] {
        let header = format!("[environments.{env}]\n");
        text = text.replace(&header, &format!("{header}{probe}\n"));
    }
    std::fs::write(&a.w.config, text).unwrap();
    let mut push = vec!["env", "push"];
    push.extend(envs.iter().map(String::as_str));
    assert_eq!(a.relink(&push).await.code, 0);
    let subscribed = a.subscribe_notices().await;
    // The second environment's link is clean; nobody announced anything for any of them.
    a.w.sim.reset_link(&envs[1]).unwrap();
    let before = a.w.sim.snapshot();

    let first = a.relink(&["watch", "--json"]).await;
    assert_eq!(first.code, 0, "{first:?}");
    let probes = first.json()["probes"].clone();
    assert_eq!(probes.as_array().unwrap().len(), 3, "{probes}");
    let run_of = |env: &str| {
        probes
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p[0] == env)
            .unwrap()[1]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(a.drain(&[]).await.code, 0);

    let stale = a.status_json(&["--run", &run_of(&envs[0])]).await;
    assert_eq!(stale["status"], "awaiting-confirmation", "{stale}");
    assert_eq!(stale["trigger"]["source"], "probe", "{stale}");
    let clean = a.status_json(&["--run", &run_of(&envs[1])]).await;
    assert_eq!(clean["status"], "skipped", "{clean}");
    let told = a.status_json(&["--run", &run_of(&envs[2])]).await;
    assert_eq!(told["status"], "skipped", "{told}");
    assert_eq!(
        stage(&told, "detect-mismatch")["outcome"]["stale"],
        true,
        "{told}"
    );
    assert_eq!(told["notices"][0]["key"], "drift-found", "{told}");
    // Only the `run` environment lost rows; the clean one and the told one kept theirs.
    let after = a.w.sim.snapshot();
    assert_eq!(after.runtime_configs["uat"], 0);
    for env in &envs[1..] {
        let org = env.replace('-', "");
        assert_eq!(
            after.runtime_configs[&org], before.runtime_configs[&org],
            "{env}"
        );
    }
    let notices = a.take_notices(&subscribed).await;
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(
        notices[0]["MessageAttributes"]["event"]["Value"],
        "drift-found"
    );
    assert_eq!(
        notices[0]["MessageAttributes"]["environment_id"]["Value"],
        envs[2].as_str()
    );

    // The same slot is not probed twice, and the environment with a run under way not at all.
    let second = a.relink(&["watch", "--json"]).await.json();
    assert_eq!(second["probes"], serde_json::json!([]), "{second}");
    assert_eq!(a.drain(&[]).await.code, 0);
    assert_eq!(
        a.status_json(&["--run", &run_of(&envs[0])]).await["status"],
        "awaiting-confirmation"
    );
    a.assert_queues_empty().await;
}

/// Gateway mode in AWS: the sign-in kept in a Secrets Manager secret (relink auth login writes
/// it, the function redeems it and writes the rotated one back), and the queues carry the run
/// from the restore event to a verified link with no person involved.
#[tokio::test]
async fn gateway_mode_in_aws_resets_and_keeps_the_rotated_sign_in() {
    let a = AwsWorld::new(Spec {
        uat_rows: 25,
        project_configs: 5,
        ..Spec::default()
    })
    .await;
    let arn = a.sign_in_for_gateway().await;
    let kept = a.secret_value(&arn).await;
    assert!(kept.starts_with("simrt-"), "the sign-in is in the secret");

    let run_id = a.inject(ENV).await;
    assert_eq!(a.drain(&[]).await.code, 0);
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(a.w.sim.snapshot().gateway_resets, 1);
    let r = a
        .relink(&["report", &run_id, "--format", "json"])
        .await
        .json();
    let ids: Vec<&str> = r["reset"]["gateway_requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|q| q["request_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 2, "{r}");
    assert_ne!(
        a.secret_value(&arn).await,
        kept,
        "the rotated sign-in was stored back"
    );
    assert!(
        !a.logs().contains(&kept),
        "the refresh token never reaches a log"
    );
    a.assert_queues_empty().await;
}

/// The watcher's LCS token from a user's sign-in kept by relink (`watch.lcs_sign_in`, `relink
/// auth login ENV --for lcs`): no outside automation keeps a token fresh; the watcher redeems
/// the refresh token and stores the rotated one back.
#[tokio::test]
async fn the_watcher_reads_lcs_with_a_sign_in_relink_keeps() {
    use relink_sim::{LcsHistorySeed, Seed};
    let arn = common::aws::local_secret("relink-test/lcs-signin", "not signed in yet").await;
    let a = AwsWorld::new(Spec {
        registry_extra: format!(
            "lcs_environment_id = \"lcs-env-7\"\nwatch = {{ lcs_project_id = \"7654321\", lcs_sign_in = {{ client_id = \"{}\", secret_arn = \"{arn}\" }}, lcs_api = \"{{sim}}/lcs\" }}",
            common::PUBLIC_CLIENT
        ),
        ..Spec::default()
    })
    .await;
    let login = a.relink(&["auth", "login", ENV, "--for", "lcs"]).await;
    assert_eq!(login.code, 0, "{login:?}");
    let kept = a.secret_value(&arn).await;
    let end = jiff::Timestamp::now() - jiff::SignedDuration::from_mins(5);
    a.w.sim
        .seed(&Seed {
            lcs_history: vec![LcsHistorySeed {
                project_id: "7654321".into(),
                environment_id: "lcs-env-7".into(),
                entries: vec![serde_json::json!({
                    "Name": "SFSourceDbToSandbox", "Type": "SFSourceDbToSandbox", "Status": "Completed",
                    "ActivityId": "act-7", "EnvironmentId": "lcs-env-7", "ProjectId": "7654321",
                    "EndDateTimeUtc": end.strftime("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
                })],
            }],
            ..Seed::default()
        })
        .unwrap();
    let report = a.relink(&["watch", "--json"]).await;
    assert_eq!(report.code, 0, "{report:?}");
    assert_eq!(
        report.json()["started"].as_array().unwrap().len(),
        1,
        "{report:?}"
    );
    assert_ne!(
        a.secret_value(&arn).await,
        kept,
        "the rotated sign-in was stored back"
    );
    assert!(!report.stdout.contains(&kept) && !report.stderr.contains(&kept));
}
