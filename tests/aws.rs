//! End-to-end in AWS mode: real SQS queues and a real DynamoDB table on the local stack (moto),
//! `relink worker` running the stage handlers, the simulators for Dynamics.

mod common;

use std::collections::HashSet;

use common::aws::AwsWorld;
use common::{ENV, Spec, stage};
use relink_shared::model::Stage;
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
async fn every_message_delivered_twice_still_has_its_effects_once() {
    let a = AwsWorld::new(Spec {
        uat_rows: 3000,
        project_configs: 20,
        ..Spec::default()
    })
    .await;
    let out = a.relink(&["inject", ENV, "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let run_id = out.json()["run_id"].as_str().unwrap().to_string();
    let worker = a.drain(&["--deliver-twice"]).await;
    assert_eq!(worker.code, 0, "{worker:?}");

    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(run["status"], "awaiting-confirmation", "{run}");
    for s in run["stages"].as_array().unwrap() {
        assert_eq!(
            s["attempts"], 1,
            "each stage ran its side effects once: {s}"
        );
    }
    let snap = a.w.sim.snapshot();
    assert!(
        snap.deleted_twice.is_empty(),
        "rows deleted twice: {:?}",
        snap.deleted_twice
    );
    assert_eq!(snap.deleted["dataverse/uat"], 3000);
    assert_eq!(snap.deleted[&format!("fno/{ENV}")], 20);
    assert_eq!(
        a.status_json(&[]).await.as_array().unwrap().len(),
        1,
        "no second run"
    );
    a.assert_queues_empty().await;
}

#[tokio::test]
async fn poison_messages_are_recorded_and_never_hold_up_good_ones() {
    let a = AwsWorld::new(Spec::default()).await;
    let poison = [
        "this is not json".to_string(),
        format!(r#"{{"environment_id":"{ENV}","dryrun":true}}"#),
        r#"{"environment_id":"no-such-env"}"#.to_string(),
        format!(
            r#"{{"environment_id":"{ENV}","stage":"purge-keys","run_id":"01JDQ4N9Z3W8B7C6X5V4T3S2R1"}}"#
        ),
    ];
    for p in &poison[..3] {
        a.send_raw(Stage::DetectMismatch, p).await;
    }
    a.send_raw(
        Stage::DetectMismatch,
        &format!(r#"{{"environment_id":"{ENV}"}}"#),
    )
    .await;
    a.send_raw(Stage::PurgeKeys, &poison[3]).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");

    let run = a.status_json(&[ENV]).await;
    assert_eq!(
        run["status"], "awaiting-confirmation",
        "the good message went all the way: {run}"
    );
    let rejected = a.status_json(&["--rejected"]).await;
    let errors: Vec<String> = rejected
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["error"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    for needle in [
        "expected ident",
        "unknown field `dryrun`",
        "unknown environment `no-such-env`",
        "not found",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "no rejection mentions {needle:?}: {errors:?}"
        );
    }
    // Acknowledged, not retried until the dead-letter queue.
    a.assert_queues_empty().await;
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
async fn a_worker_killed_mid_stage_is_taken_over_and_nothing_is_deleted_twice() {
    let a = AwsWorld::new(Spec {
        uat_rows: 4000,
        registry_extra: "limits = { dataverse_batch_size = 200, dataverse_concurrency = 1, dataverse_page_size = 1000 }".into(),
        ..Spec::default()
    })
    .await;
    a.w.sim.set_faults(Faults {
        per_op_latency_ms: 1,
        ..Faults::default()
    });
    let out = a.relink(&["inject", ENV, "--json"]).await;
    let run_id = out.json()["run_id"].as_str().unwrap().to_string();
    let mut worker = a.worker(&[]);
    let deleted = || {
        a.w.sim
            .snapshot()
            .deleted
            .get("dataverse/uat")
            .copied()
            .unwrap_or(0)
    };
    common::wait_for_deletes(&a.w.sim, "uat", 1000).await;
    worker.start_kill().unwrap(); // SIGKILL
    worker.wait().await.unwrap();
    assert!(deleted() < 4000, "killed in the middle of the stage");

    a.w.sim.set_faults(Faults::default());
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(run["status"], "awaiting-confirmation", "{run}");
    assert_eq!(stage(&run, "clear-dataverse-configs")["attempts"], 2);
    let snap = a.w.sim.snapshot();
    assert_eq!(snap.runtime_configs["uat"], 0);
    assert!(
        snap.deleted_twice.is_empty(),
        "rows deleted twice: {:?}",
        snap.deleted_twice
    );
    a.assert_queues_empty().await;
}

#[tokio::test]
async fn a_signed_notification_starts_the_pipeline_once_and_bad_ones_enqueue_nothing() {
    use std::collections::HashMap;
    use std::sync::Arc;

    use relink_shared::aws::dynamo::DynamoStore;
    use relink_shared::aws::registry::TableRegistry;
    use relink_shared::aws::secrets::SecretResolver;
    use relink_shared::aws::sqs::SqsQueue;
    use relink_shared::ingest::{IngestDeps, ingest};
    use relink_shared::notify::sign;
    use relink_shared::registry::Secret;

    let a = AwsWorld::new(Spec {
        uat_rows: 500,
        registry_extra: "lcs_environment_id = \"8f1c-lcs-env\"".into(),
        ..Spec::default()
    })
    .await;
    // The function's own wiring, against the local stack.
    let config = relink_shared::aws::sdk_config().await;
    let store = DynamoStore::new(aws_sdk_dynamodb::Client::new(&config), &a.table);
    let detect = a.queue_url(&format!("{}detect-mismatch", a.prefix)).await;
    let deps = IngestDeps {
        registry: Arc::new(TableRegistry::new(
            store.clone(),
            SecretResolver::new(&config),
        )),
        store: Arc::new(store),
        queue: Arc::new(SqsQueue::new(
            a.sqs.clone(),
            HashMap::from([(Stage::DetectMismatch, detect)]),
        )),
        secret: Secret::new("hook-secret"),
    };
    let post = async |body: &str, key: &[u8], age: i64| {
        let now = jiff::Timestamp::now();
        let ts = now.as_second() - age;
        ingest(
            &deps,
            Some(&ts.to_string()),
            Some(&sign(key, ts, body.as_bytes())),
            body.as_bytes(),
            now,
        )
        .await
    };
    let refresh = r#"{"Name":"Refresh","Type":"SFSourceDbToSandbox","Status":"Completed","ActivityId":"act-77","EnvironmentId":"8F1C-LCS-ENV"}"#;
    let first = post(refresh, b"hook-secret", 0).await;
    assert_eq!(first.status, 202, "{first:?}");
    let again = post(refresh, b"hook-secret", 0).await;
    assert_eq!(
        (again.status, &again.body["run_id"]),
        (409, &first.body["run_id"])
    );
    assert_eq!(post(refresh, b"forged", 0).await.status, 401);
    assert_eq!(post(r#"{"OperationStatus":"Completed","OperationActivityId":"x","EnvironmentId":"8f1c-lcs-env"}"#, b"hook-secret", 400).await.status, 401);
    assert_eq!(
        post(
            r#"{"environment_id":"nowhere","operation":"copy","operation_id":"y"}"#,
            b"hook-secret",
            0
        )
        .await
        .status,
        404
    );
    assert_eq!(post("<xml/>", b"hook-secret", 0).await.status, 400);
    assert_eq!(
        a.depth(&format!("{}detect-mismatch", a.prefix)).await,
        1,
        "one event, however many notifications"
    );

    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a
        .status_json(&["--run", first.body["run_id"].as_str().unwrap()])
        .await;
    assert_eq!(run["status"], "awaiting-confirmation", "{run}");
    assert_eq!(
        (
            run["trigger"]["source"].as_str(),
            run["trigger"]["operation_id"].as_str()
        ),
        (Some("lcs"), Some("act-77"))
    );
    a.assert_queues_empty().await;
}

#[tokio::test]
async fn the_watcher_queues_one_run_per_new_refresh_and_loses_none_to_outages_or_429s() {
    use relink_sim::{LcsHistorySeed, Seed};

    const TOKEN: &str = "lcs-delegated-token";
    let a = AwsWorld::new(Spec {
        registry_extra: "lcs_environment_id = \"lcs-env-9\"\nwatch = { lcs_project_id = \"1234567\", lcs_token = { env = \"RELINK_TEST_LCS_TOKEN\" }, lcs_api = \"{sim}/lcs\" }".into(),
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
        let out = a
            .command(&["watch", "--json"])
            .env("RELINK_TEST_LCS_TOKEN", TOKEN)
            .output()
            .await
            .unwrap();
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
    let op = |id: &str, kind: &str, status: &str| serde_json::json!({"id": id, "operationType": kind, "status": status, "createdDateTime": jiff::Timestamp::now().to_string(), "lastActionDateTime": jiff::Timestamp::now().to_string()});
    a.w.sim
        .seed(&Seed {
            power_platform: vec![PowerPlatformSeed {
                environment_id: "pp-env-1".into(),
                operations: vec![
                    op("op-copy", "Copy", "Succeeded"),
                    op("op-backup", "Backup", "Succeeded"),
                    op("op-running", "Restore", "Running"),
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
    let again = a.relink(&["watch", "--json"]).await.json();
    assert!(again["started"].as_array().unwrap().is_empty(), "{again}");
}
