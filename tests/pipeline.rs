//! End-to-end: the `relink` binary against the simulators over real HTTP, with the embedded store.

mod common;

use std::collections::HashSet;

use common::{ENV, Spec, World, stage};
use relink_sim::Faults;

#[tokio::test]
async fn full_run_clears_both_sides_archives_then_confirm_verifies_and_rerun_skips() {
    let w = World::new(Spec {
        uat_rows: 1500,
        project_configs: 50,
        field_configs: 10,
        business_events: 4,
        purge_service: true,
        ..Spec::default()
    })
    .await;

    let out = w.relink(&["run", ENV]).await;
    assert_eq!(out.code, 3, "awaiting confirmation: {out:?}");
    assert!(
        out.stdout.contains("relink confirm"),
        "instructions name the next command: {out:?}"
    );
    let run = w.status().await;
    assert_eq!(run["status"], "awaiting-confirmation");
    let run_id = run["run_id"].as_str().unwrap().to_string();
    assert_eq!(
        stage(&run, "clear-dataverse-configs")["outcome"]["deleted"],
        1500
    );
    assert_eq!(
        stage(&run, "purge-keys")["outcome"]["DualWriteProjectConfiguration"]["deleted"],
        50
    );
    assert_eq!(stage(&run, "reset-link")["status"], "running");

    let snap = w.sim.snapshot();
    assert_eq!(snap.runtime_configs["uat"], 0);
    assert_eq!(
        snap.runtime_configs["prod"], 25,
        "production Dataverse is untouched"
    );
    assert_eq!(snap.project_configs[ENV], 0);
    assert_eq!(snap.field_configs[ENV], 0);
    assert_eq!(snap.business_events[ENV], 0);
    assert!(snap.deleted_twice.is_empty(), "{:?}", snap.deleted_twice);

    let archive = w.archived(&run_id).await;
    assert_eq!(archive.len(), 1500 + 50 + 10 + 4);
    let keys: HashSet<_> = archive
        .iter()
        .map(|r| (r.table.clone(), r.key.clone()))
        .collect();
    assert_eq!(keys.len(), archive.len());
    let text = serde_json::to_string(&archive.iter().map(|r| &r.row).collect::<Vec<_>>()).unwrap();
    assert!(
        !text.contains("SIMSECRET"),
        "archived rows carry no secrets"
    );
    assert!(
        text.contains("dualwrite-runtime-"),
        "archived rows keep their names"
    );

    // Confirming before the reset: verification fails and the run keeps waiting.
    let early = w.relink(&["confirm", &run_id]).await;
    assert_eq!(early.code, 3, "{early:?}");
    assert!(early.stdout.contains("verification failed"), "{early:?}");

    w.sim.reset_link(ENV).unwrap();
    let confirmed = w.relink(&["confirm", &run_id, "--json"]).await;
    assert_eq!(confirmed.code, 0, "{confirmed:?}");
    let run = confirmed.json();
    assert_eq!(run["status"], "succeeded");
    assert_eq!(stage(&run, "reset-link")["outcome"]["verified"], true);

    let again = w.relink(&["run", ENV, "--json"]).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.json()["status"], "skipped");
    assert_ne!(again.json()["run_id"], run_id);
}

#[tokio::test]
async fn wrong_dataverse_organisation_is_refused_and_nothing_is_deleted() {
    // dataverse_url points at production while the registry expects the UAT organisation.
    let w = World::new(Spec {
        dataverse_org: "prod",
        ..Spec::default()
    })
    .await;
    let out = w.relink(&["run", ENV]).await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stdout.contains("orgcontosoprod") && out.stdout.contains("nothing was deleted"),
        "{out:?}"
    );
    let run = w.status().await;
    assert_eq!(run["status"], "refused");
    let snap = w.sim.snapshot();
    assert!(snap.deleted.is_empty(), "{:?}", snap.deleted);
    assert!(snap.batch_requests.is_empty() && snap.single_deletes == 0);
    assert_eq!(
        (
            snap.runtime_configs["prod"],
            snap.runtime_configs["uat"],
            snap.project_configs[ENV]
        ),
        (25, 300, 40)
    );
}

#[tokio::test]
async fn production_is_refused_unless_the_registry_allows_it() {
    let w = World::new(Spec {
        kind: "production",
        ..Spec::default()
    })
    .await;
    let out = w.relink(&["run", ENV]).await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stdout.contains("allow_production = true"), "{out:?}");
    assert_eq!(
        w.sim.snapshot().requests,
        0,
        "the guard stops the run before any request"
    );

    let allowed = World::new(Spec {
        kind: "production",
        registry_extra: "allow_production = true".into(),
        ..Spec::default()
    })
    .await;
    let out = allowed.relink(&["run", ENV]).await;
    assert_eq!(out.code, 3, "{out:?}");
}

#[tokio::test]
async fn dry_run_reports_counts_and_deletes_nothing() {
    let w = World::new(Spec {
        uat_rows: 7000,
        project_configs: 12,
        ..Spec::default()
    })
    .await;
    let out = w.relink(&["run", ENV, "--dry-run", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let run = out.json();
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["options"]["dry_run"], true);
    assert_eq!(
        stage(&run, "clear-dataverse-configs")["outcome"]["would_delete"],
        7000
    );
    assert_eq!(
        stage(&run, "purge-keys")["outcome"]["DualWriteProjectConfiguration"]["would_delete"],
        12
    );
    let snap = w.sim.snapshot();
    assert!(
        snap.deleted.is_empty() && snap.batch_requests.is_empty() && snap.single_deletes == 0,
        "{snap:?}"
    );
    assert!(w.archived(run["run_id"].as_str().unwrap()).await.is_empty());
}

#[tokio::test]
async fn a_killed_run_resumes_without_deleting_any_row_twice() {
    let w = World::new(Spec {
        uat_rows: 4000,
        registry_extra: "limits = { dataverse_batch_size = 200, dataverse_concurrency = 1, dataverse_page_size = 1000 }".into(),
        ..Spec::default()
    })
    .await;
    // Each 200-row batch takes about 200 ms: the run is well into the stage after 1,000 rows.
    w.sim.set_faults(Faults {
        per_op_latency_ms: 1,
        ..Faults::default()
    });
    let mut child = w.command(&["run", ENV]).spawn().unwrap();
    let deleted = || {
        w.sim
            .snapshot()
            .deleted
            .get("dataverse/uat")
            .copied()
            .unwrap_or(0)
    };
    common::wait_for_deletes(&w.sim, "uat", 1000).await;
    // Hold the next batch, then kill: the kill lands mid-stage whatever the machine's speed.
    w.sim.set_faults(Faults {
        per_op_latency_ms: 1,
        hold_batches: true,
        ..Faults::default()
    });
    common::wait_until("a delete batch is held", || {
        w.sim.snapshot().held_batches > 0
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let partial = deleted();
    assert!(partial < 4000, "killed half-way ({partial} deleted)");
    let before = w.status().await;
    assert_eq!(before["status"], "running");

    w.sim.set_faults(Faults::default());
    let out = w.relink(&["run", ENV]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("resuming unfinished run"), "{out:?}");
    let after = w.status().await;
    assert_eq!(
        after["run_id"], before["run_id"],
        "the same run was resumed"
    );
    assert_eq!(stage(&after, "clear-dataverse-configs")["attempts"], 2);
    let snap = w.sim.snapshot();
    assert_eq!(snap.runtime_configs["uat"], 0);
    assert!(
        snap.deleted_twice.is_empty(),
        "rows deleted twice: {:?}",
        snap.deleted_twice
    );
    let archive = w.archived(after["run_id"].as_str().unwrap()).await;
    let dv_rows = archive
        .iter()
        .filter(|r| r.table == "msdyn_dualwriteruntimeconfig")
        .count();
    assert_eq!(dv_rows, 4000, "every deleted row is archived exactly once");
}

#[tokio::test]
async fn throttled_requests_wait_for_retry_after_and_the_run_completes() {
    let w = World::new(Spec {
        uat_rows: 3000,
        registry_extra: "limits = { dataverse_batch_size = 250, dataverse_page_size = 1000 }"
            .into(),
        ..Spec::default()
    })
    .await;
    w.sim.set_faults(Faults {
        rate_429: 0.2,
        retry_after_secs: 1,
        rng_seed: Some(7),
        ..Faults::default()
    });
    let out = w.relink(&["run", ENV]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(w.sim.snapshot().runtime_configs["uat"], 0);
    let log = w.sim.log();
    assert!(
        common::scenario::retries_waited(&log) > 0,
        "the fault injection throttled something"
    );
    assert!(w.sim.snapshot().deleted_twice.is_empty());
    // The run records every 429 it waited out, per stage, and its report shows them.
    let run_id = w.status().await["run_id"].as_str().unwrap().to_string();
    let report = w
        .relink(&["report", &run_id, "--format", "json"])
        .await
        .json();
    let met: u64 = report["throttling"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        met,
        log.iter().filter(|e| e.status == 429).count() as u64,
        "{report}"
    );
    let md = w.relink(&["report", &run_id]).await.stdout;
    assert!(md.contains("answer(s) 429"), "{md}");
}

#[tokio::test]
async fn clearing_twenty_thousand_rows_takes_at_most_twenty_batches() {
    let w = World::new(Spec {
        uat_rows: 20_000,
        ..Spec::default()
    })
    .await;
    let out = w.relink(&["run", ENV]).await;
    assert_eq!(out.code, 3, "{out:?}");
    let snap = w.sim.snapshot();
    assert_eq!(snap.runtime_configs["uat"], 0);
    assert!(
        snap.batch_requests["dataverse"] <= 20,
        "{} batches",
        snap.batch_requests["dataverse"]
    );
    assert_eq!(snap.single_deletes, 0);
}

#[tokio::test]
async fn clearing_under_the_service_protection_limits_paces_itself_instead_of_being_throttled() {
    let w = World::new(Spec {
        uat_rows: 12_000,
        registry_extra: "limits = { dataverse_concurrency = 2 }".into(),
        ..Spec::default()
    })
    .await;
    // Limits that bind within seconds: 4 s of execution per 2 s window, 1 ms per delete, so
    // 12,000 deletes need about 6 s at the limit.
    w.sim.set_faults(Faults {
        per_op_latency_ms: 1,
        protection: Some(relink_sim::Protection {
            requests: 6000,
            execution_ms: 4000,
            window_ms: 2000,
            concurrent: 52,
        }),
        ..Faults::default()
    });
    let out = w.relink(&["run", ENV]).await;
    assert_eq!(out.code, 3, "{out:?}");
    let snap = w.sim.snapshot();
    assert_eq!(snap.runtime_configs["uat"], 0);
    assert_eq!(
        snap.throttled, 0,
        "the client kept within the execution budget the headers announced"
    );
    assert!(snap.deleted_twice.is_empty());
}

#[tokio::test]
async fn bad_input_exits_2_and_names_the_problem() {
    let w = World::new(Spec::default()).await;

    let event = w.dir.join("event.json");
    std::fs::write(
        &event,
        format!(r#"{{"environment_id":"{ENV}","options":{{"dryrun":true}}}}"#),
    )
    .unwrap();
    let out = w.relink(&["run", "--event", event.to_str().unwrap()]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("unknown field `dryrun`"), "{out:?}");

    let out = w.relink(&["run", "contoso-typo"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("unknown environment `contoso-typo`"),
        "{out:?}"
    );

    let text = std::fs::read_to_string(&w.config)
        .unwrap()
        .replace("allow_insecure_http", "allow_insecure_htp");
    std::fs::write(&w.config, text).unwrap();
    let out = w.relink(&["run", ENV]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("allow_insecure_htp"), "{out:?}");
    assert_eq!(w.sim.snapshot().requests, 0);
}

#[tokio::test]
async fn an_event_file_starts_a_run_like_a_queue_message() {
    let w = World::new(Spec::default()).await;
    let event = w.dir.join("event.json");
    std::fs::write(
        &event,
        format!(r#"{{"environment_id":"{ENV}","options":{{"dry_run":true}}}}"#),
    )
    .unwrap();
    let out = w
        .relink(&["run", "--event", event.to_str().unwrap(), "--json"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["options"]["dry_run"], true);
    assert_eq!(out.json()["trigger"]["source"], "manual");
}

#[tokio::test]
async fn a_rejected_secret_is_explained_and_never_shown() {
    let w = World::new(Spec::default()).await;
    let mut cmd = w.command(&["run", ENV]);
    cmd.env(common::SECRET_VAR, "wrong-secret-value-123");
    let out = cmd.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("Entra ID rejected") && stdout.contains("client secret"),
        "{stdout}\n{stderr}"
    );
    assert!(
        !stdout.contains("wrong-secret-value-123") && !stderr.contains("wrong-secret-value-123")
    );
    assert!(w.sim.snapshot().deleted.is_empty());
}

#[tokio::test]
async fn from_stage_reruns_one_stage_with_its_guards() {
    let w = World::new(Spec {
        uat_rows: 50,
        ..Spec::default()
    })
    .await;
    let out = w
        .relink(&[
            "run",
            ENV,
            "--from-stage",
            "clear-dataverse-configs",
            "--json",
        ])
        .await;
    assert_eq!(out.code, 3, "{out:?}");
    let run = out.json();
    assert_eq!(stage(&run, "detect-mismatch")["status"], "skipped");
    assert_eq!(stage(&run, "purge-keys")["status"], "skipped");
    assert_eq!(
        stage(&run, "clear-dataverse-configs")["outcome"]["deleted"],
        50
    );
    assert_eq!(
        w.sim.snapshot().project_configs[ENV],
        40,
        "skipped stages touched nothing"
    );
}

/// F&O as it can really be: a per-company key (each project in two companies under one name),
/// `$skip` next links, empty pages that carry a next link. Every shape is purged completely,
/// each row archived once under its whole key, none deleted twice.
#[tokio::test]
async fn every_fno_shape_is_purged_by_its_whole_key() {
    for shape in [
        (false, false, false),
        (true, false, false),
        (false, true, true),
        (true, true, true),
    ] {
        let w = World::new(Spec {
            uat_rows: 20,
            project_configs: 23,
            fno_shape: shape,
            registry_extra: "limits = { fno_page_size = 5, fno_batch_size = 4 }\n".into(),
            ..Spec::default()
        })
        .await;
        let out = w.relink(&["run", ENV, "--json"]).await;
        assert_eq!(out.code, 3, "{shape:?}: {out:?}");
        let run = out.json();
        assert_eq!(
            stage(&run, "detect-mismatch")["outcome"]["fno_project_configs"],
            23,
            "{shape:?}: every page read"
        );
        assert_eq!(
            stage(&run, "purge-keys")["outcome"]["DualWriteProjectConfiguration"]["deleted"],
            23,
            "{shape:?}: {run}"
        );
        let snap = w.sim.snapshot();
        assert_eq!(snap.project_configs[ENV], 0, "{shape:?}");
        assert!(snap.deleted_twice.is_empty(), "{shape:?}");
        let archive = w.archived(run["run_id"].as_str().unwrap()).await;
        let fno: Vec<_> = archive
            .iter()
            .filter(|r| r.table == "DualWriteProjectConfiguration")
            .collect();
        assert_eq!(fno.len(), 23, "{shape:?}");
        if shape.0 {
            assert!(
                fno.iter().all(|r| r.key.starts_with("dataAreaId='")),
                "{shape:?}: archived under the whole key: {:?}",
                fno[0].key
            );
        }
        // Only the selected columns are archived, whatever else the entity has.
        assert!(
            fno.iter()
                .all(|r| r.row.get("ServiceBusConnectionString").is_none()),
            "{shape:?}"
        );
    }
}

#[tokio::test]
async fn status_all_lists_the_registry_file_with_or_without_a_store() {
    let w = World::new(Spec {
        extra_envs: 2,
        extra_rows: 4,
        ..Spec::default()
    })
    .await;
    let before = w.relink(&["status", "--all", "--json"]).await;
    assert_eq!(
        before.code, 0,
        "nothing has run yet: every environment, no run: {before:?}"
    );
    assert_eq!(before.json().as_array().unwrap().len(), 3);
    assert_eq!(w.relink(&["run", ENV]).await.code, 3);
    let rows = w.relink(&["status", "--all", "--json"]).await.json();
    let rows = rows.as_array().unwrap();
    assert_eq!(
        (
            rows[0]["environment_id"].as_str(),
            rows[0]["status"].as_str()
        ),
        (Some(ENV), Some("awaiting-confirmation"))
    );
    assert!(rows[1..].iter().all(|r| r["status"].is_null()));
}

/// At the manual gate, `relink run --wait` keeps checking the link by itself: once the operator
/// has reset it (the simulator plays that part), the run ends `succeeded` with no
/// `relink confirm`, the check recorded as relink's own.
#[tokio::test]
async fn run_wait_notices_the_reset_and_finishes_the_run_by_itself() {
    let w = World::new(Spec {
        uat_rows: 30,
        project_configs: 6,
        registry_extra: "verify = { every_seconds = 1, give_up_after_seconds = 600 }".into(),
        ..Spec::default()
    })
    .await;
    let child = w
        .command(&["run", ENV, "--wait", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Until relink has checked at least once and found the link not reset yet.
    let mut checked = false;
    for _ in 0..300 {
        let out = w.relink(&["status", ENV, "--json"]).await;
        if out.code == 0 {
            let run = out.json();
            checked = run["status"] == "awaiting-confirmation"
                && stage(&run, "reset-link")["outcome"]["checks"].as_u64() >= Some(1);
            if checked {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(checked, "relink checked the awaited Reset by itself");
    w.sim.reset_link(ENV).unwrap();
    let out = w.finish(
        tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("the wait ends once the Reset is seen")
            .unwrap(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let run = out.json();
    assert_eq!(run["status"], "succeeded", "{run}");
    let reset = stage(&run, "reset-link");
    assert_eq!(reset["outcome"]["verified"], true, "{run}");
    assert_eq!(reset["outcome"]["checked_by"], "relink (scheduled check)");
    assert!(reset["outcome"]["checks"].as_u64().unwrap() >= 2, "{run}");
    assert!(out.stderr.contains("checks the link again"), "{out:?}");
}

/// With no Reset, the checks go on until the give-up time, which ends the run `failed` with
/// what happened and what to do; reminders go out before.
#[tokio::test]
async fn without_a_reset_the_run_gives_up_at_the_configured_time() {
    let hook = common::Receiver::start(200).await;
    let w = World::new(Spec {
        uat_rows: 10,
        project_configs: 3,
        registry_extra: "verify = { every_seconds = 1, give_up_after_seconds = 4, remind_every_seconds = 2 }\nnotify = { webhook = { env = \"RELINK_W\" }, webhook_secret = { env = \"RELINK_WS\" } }".into(),
        ..Spec::default()
    })
    .await;
    let key = format!("notice-signing-key-{}", ulid::Ulid::new());
    let relink = |args: &[&str]| {
        let mut cmd = w.command(args);
        cmd.env("RELINK_W", &hook.url).env("RELINK_WS", &key);
        cmd
    };
    let out = w.finish(relink(&["run", ENV]).output().await.unwrap());
    assert_eq!(out.code, 3, "{out:?}");
    let run_id = w.status().await["run_id"].as_str().unwrap().to_string();
    let out = w.finish(
        relink(&["confirm", &run_id, "--wait", "--json"])
            .output()
            .await
            .unwrap(),
    );
    let told: Vec<String> = hook
        .bodies()
        .iter()
        .map(|b| b["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        told.first().map(String::as_str),
        Some("awaiting-reset"),
        "{told:?}"
    );
    assert_eq!(told.last().map(String::as_str), Some("failed"), "{told:?}");
    assert!(told.iter().any(|k| k.starts_with("reminder-")), "{told:?}");
    assert_eq!(out.code, 1, "{out:?}");
    let run = out.json();
    assert_eq!(run["status"], "failed", "{run}");
    let reset = stage(&run, "reset-link");
    let error = reset["error"].as_str().unwrap();
    assert!(
        error.contains("still not reset") && error.contains("relink run"),
        "{error}"
    );
    assert!(reset["outcome"]["checks"].as_u64().unwrap() >= 2, "{run}");
    assert_eq!(w.sim.snapshot().deleted_twice.len(), 0);
}

/// A registry entry whose checks make no sense is refused with the reason.
#[tokio::test]
async fn verify_settings_are_validated() {
    let w = World::new(Spec {
        registry_extra: "verify = { every_seconds = 0 }".into(),
        ..Spec::default()
    })
    .await;
    let out = w.relink(&["run", ENV]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("every_seconds"), "{out:?}");
}

/// A channel that takes the request and never answers (a hostile or hung receiver) is given up
/// within its bound and recorded, while the other channels are told at once: it cannot hold the
/// stage past a function's timeout.
#[tokio::test]
async fn a_channel_that_never_answers_is_given_up_and_recorded() {
    use common::Receiver;
    let teams = Receiver::silent().await;
    let slack = Receiver::start(200).await;
    let w = World::new(Spec {
        uat_rows: 5,
        project_configs: 2,
        registry_extra:
            "notify = { teams = { env = \"RELINK_T\" }, slack = { env = \"RELINK_S\" } }".into(),
        ..Spec::default()
    })
    .await;
    let mut cmd = w.command(&["run", ENV]);
    cmd.envs([("RELINK_T", &teams.url), ("RELINK_S", &slack.url)]);
    let out = tokio::time::timeout(std::time::Duration::from_secs(90), cmd.output())
        .await
        .expect("a silent channel does not hold the run")
        .unwrap();
    let out = w.finish(out);
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(slack.requests().len(), 1, "the other channel was told");
    assert_eq!(
        teams.requests().len(),
        2,
        "two attempts fit in the channel's 20 s"
    );
    let status = w.status().await;
    let deliveries = status["notices"][0]["deliveries"].to_string();
    assert!(
        deliveries.contains("no answer in time")
            && deliveries.contains("after 2 attempts")
            && deliveries.contains(r#""channel":"slack","result":"sent""#)
            && !deliveries.contains(&teams.url),
        "{deliveries}"
    );
}

/// The gate and the end of a run are told to every configured channel once each, in each
/// channel's shape, signed where it is a generic webhook, with no secret in any payload; a dead
/// channel is retried and recorded on the run, and the run ends as it would without it.
#[tokio::test]
async fn notices_reach_every_channel_once_and_a_dead_channel_changes_nothing() {
    use common::Receiver;
    let teams = Receiver::start(202).await;
    let slack = Receiver::start(500).await;
    let hook = Receiver::start(200).await;
    let w = World::new(Spec {
        uat_rows: 20,
        project_configs: 4,
        registry_extra: "notify = { teams = { env = \"RELINK_T\" }, slack = { env = \"RELINK_S\" }, webhook = { env = \"RELINK_W\" }, webhook_secret = { env = \"RELINK_WS\" } }".into(),
        ..Spec::default()
    })
    .await;
    let key = format!("notice-signing-key-{}", ulid::Ulid::new());
    let vars = [
        ("RELINK_T", teams.url.clone()),
        ("RELINK_S", slack.url.clone()),
        ("RELINK_W", hook.url.clone()),
        ("RELINK_WS", key.clone()),
    ];
    let run = |args: &[&str]| {
        let mut cmd = w.command(args);
        cmd.envs(vars.iter().map(|(k, v)| (*k, v.as_str())));
        cmd
    };
    let out = w.finish(run(&["run", ENV]).output().await.unwrap());
    assert_eq!(out.code, 3, "{out:?}");
    let run_id = w.status().await["run_id"].as_str().unwrap().to_string();
    assert_eq!(teams.requests().len(), 1);
    assert_eq!(hook.requests().len(), 1);
    assert_eq!(
        slack.requests().len(),
        3,
        "the dead channel was tried three times"
    );

    let card = &teams.bodies()[0];
    assert_eq!(
        card["attachments"][0]["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    let card_text = card.to_string();
    assert!(
        card_text.contains(&run_id) && card_text.contains("Reset link"),
        "{card}"
    );
    let blocks = &slack.bodies()[0];
    assert_eq!(blocks["blocks"][0]["type"], "header", "{blocks}");
    let (headers, body) = &hook.requests()[0];
    relink_core::notify::verify(
        key.as_bytes(),
        headers.get("x-relink-timestamp").map(String::as_str),
        headers.get("x-relink-signature").map(String::as_str),
        body,
        jiff::Timestamp::now(),
    )
    .expect("the webhook's notice is signed with its key");
    let notice: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(notice["event"], "awaiting-reset");
    assert_eq!(notice["run_id"], run_id.as_str());
    assert!(
        notice["instructions"]
            .as_str()
            .unwrap()
            .contains("Reset link")
    );
    for (_, b) in [&teams, &slack, &hook].iter().flat_map(|r| r.requests()) {
        let text = String::from_utf8_lossy(&b);
        for secret in [&w.secret, &key, &teams.url, &slack.url, &hook.url] {
            assert!(
                !text.contains(secret.as_str()),
                "a secret in a payload: {text}"
            );
        }
    }
    let status = w.status().await;
    assert_eq!(status["notices"][0]["key"], "awaiting-reset", "{status}");
    let deliveries = status["notices"][0]["deliveries"].to_string();
    assert!(
        deliveries.contains(r#""channel":"teams","result":"sent""#)
            && deliveries.contains("HTTP 500 after 3 attempts")
            && !deliveries.contains(&slack.url),
        "{deliveries}"
    );

    // The operator resets; confirm ends the run and says so, once, on each channel.
    w.sim.reset_link(ENV).unwrap();
    let out = w.finish(run(&["confirm", &run_id]).output().await.unwrap());
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(teams.requests().len(), 2);
    assert_eq!(hook.requests().len(), 2);
    assert_eq!(hook.bodies()[1]["event"], "succeeded");
    // A redelivered event of the finished run tells nobody again.
    let event = format!(r#"{{"environment_id":"{ENV}","run_id":"{run_id}","stage":"reset-link"}}"#);
    let mut cmd = run(&["run", "--event", "-"]);
    cmd.stdin(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use tokio::io::AsyncWriteExt;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(event.as_bytes())
        .await
        .unwrap();
    let out = w.finish(child.wait_with_output().await.unwrap());
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(teams.requests().len(), 2);
    assert_eq!(hook.requests().len(), 2);
}

/// `relink report` gives a run's evidence: timeline, guards, rows per table, the Reset and where
/// the archive is, as JSON and as Markdown.
#[tokio::test]
async fn report_shows_the_evidence_of_a_run() {
    let w = World::new(Spec {
        uat_rows: 35,
        project_configs: 7,
        ..Spec::default()
    })
    .await;
    assert_eq!(w.relink(&["run", ENV]).await.code, 3);
    let run_id = w.status().await["run_id"].as_str().unwrap().to_string();
    w.sim.reset_link(ENV).unwrap();
    assert_eq!(w.relink(&["confirm", &run_id]).await.code, 0);

    let out = w.relink(&["report", &run_id, "--format", "json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let r = out.json();
    assert_eq!(r["status"], "succeeded");
    assert_eq!(r["timeline"].as_array().unwrap().len(), 4);
    assert!(
        r["guards"]["identity"]
            .as_str()
            .unwrap()
            .contains("matches the registry"),
        "{r}"
    );
    let table = |name: &str| {
        r["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(table("msdyn_dualwriteruntimeconfig")["archived"], 35);
    assert_eq!(table("msdyn_dualwriteruntimeconfig")["deleted"], 35);
    assert_eq!(table("DualWriteProjectConfiguration")["archived"], 7);
    assert_eq!(r["reset"]["verified"], true);
    assert_eq!(r["reset"]["checked_by"], "relink confirm");
    // The simulated Reset rebuilds 3 of the 7 maps: the other 4 are the re-apply checklist.
    assert_eq!(r["maps"]["before"], 7, "{r}");
    assert_eq!(r["maps"]["running_again"], 3, "{r}");
    assert_eq!(r["maps"]["missing_count"], 4, "{r}");
    assert_eq!(r["throttling"], serde_json::json!([]), "{r}");
    assert!(r["archive"].as_str().unwrap().contains("relink.db"), "{r}");

    let md = w.relink(&["report", &run_id]).await;
    assert_eq!(md.code, 0, "{md:?}");
    for section in [
        "## Timeline",
        "## Guards",
        "## Rows",
        "## Reset",
        "## Throttling",
        "## Maps to re-apply",
        "Of 7 maps that ran before, 3 run again towards this Dataverse; 4 to re-apply:",
        "- [ ] Project 00006 Customers V3 O'Brien",
        "## Notices",
        "## Archive",
    ] {
        assert!(md.stdout.contains(section), "{section}: {}", md.stdout);
    }
    let missing = w.relink(&["report", "01JDQ4N9Z3W8B7C6X5V4T3S2R1"]).await;
    assert_ne!(missing.code, 0);
    assert!(missing.stderr.contains("not found"), "{missing:?}");
}

/// Embedded drift probes (`relink probe`, for a timer): a stale link no event mentioned becomes
/// one run, a clean one a skipped record, and neither is probed again in its slot.
#[tokio::test]
async fn relink_probe_finds_drift_by_itself_once_per_slot() {
    let w = World::new(Spec {
        uat_rows: 12,
        project_configs: 4,
        extra_envs: 1,
        extra_rows: 8,
        registry_extra: "probe = { every_hours = 720, on_drift = \"run\" }".into(),
        ..Spec::default()
    })
    .await;
    let clean = common::extra_env(1);
    let text = std::fs::read_to_string(&w.config).unwrap();
    let header = format!("[environments.{clean}]\n");
    let text = text.replace(
        &header,
        &format!("{header}probe = {{ every_hours = 720, on_drift = \"run\" }}\n"),
    );
    std::fs::write(&w.config, text).unwrap();
    w.sim.reset_link(&clean).unwrap();

    let out = w.relink(&["probe", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let runs = out.json();
    let status_of = |env: &str| {
        runs.as_array()
            .unwrap()
            .iter()
            .find(|r| r["environment_id"] == env)
            .unwrap_or_else(|| panic!("no probe of {env}: {runs}"))["status"]
            .clone()
    };
    assert_eq!(runs.as_array().unwrap().len(), 2, "{runs}");
    assert_eq!(status_of(ENV), "awaiting-confirmation");
    assert_eq!(status_of(&clean), "skipped");
    assert_eq!(w.sim.snapshot().runtime_configs["uat"], 0);
    assert_eq!(
        w.sim.snapshot().runtime_configs["fan001"],
        3,
        "the Reset's rows stay"
    );

    let again = w.relink(&["probe"]).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("no drift probe is due"), "{again:?}");
}

/// Signs the simulated user in for the gateway (`relink auth login ENV --for gateway`).
async fn sign_in(w: &World) -> common::Out {
    let out = w.relink(&["auth", "login", ENV, "--for", "gateway"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    out
}

/// A world of ENV resetting through the simulated gateway (`reset` keys in `extra`), the user
/// signed in, and `faults` set.
async fn gateway_world(extra: &str, faults: Faults) -> World {
    let w = World::new(Spec {
        uat_rows: 30,
        project_configs: 6,
        registry_extra: common::gateway_reset(extra),
        ..Spec::default()
    })
    .await;
    sign_in(&w).await;
    w.sim.set_faults(faults);
    w
}

/// Gateway mode, end to end in one process: sign in once (device code), then restore ->
/// detect -> purge -> clear -> stop the running maps -> Reset -> verification -> succeeded, no
/// person involved, every gateway request in the report.
#[tokio::test]
async fn gateway_mode_resets_the_link_without_a_person() {
    let w = World::new(Spec {
        uat_rows: 30,
        project_configs: 6,
        registry_extra: common::gateway_reset(""),
        ..Spec::default()
    })
    .await;
    let login = sign_in(&w).await;
    assert!(
        login.stderr.contains("/devicelogin") && login.stderr.contains("enter the code"),
        "{login:?}"
    );
    let token_file = w.dir.join("gateway.token");
    let kept = std::fs::read_to_string(&token_file).unwrap();
    assert!(kept.starts_with("simrt-"), "a refresh token is kept");
    assert!(!login.stdout.contains(&kept) && !login.stderr.contains(&kept));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let out = w.relink(&["run", ENV, "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["status"], "succeeded", "{out:?}");
    let snap = w.sim.snapshot();
    assert_eq!(
        snap.gateway_stops, 1,
        "the two running maps stopped in one request"
    );
    assert_eq!(snap.gateway_resets, 1);
    assert_eq!(
        snap.runtime_configs["uat"], 3,
        "the Reset rebuilt the link towards uat"
    );
    assert!(!out.stdout.contains(&kept) && !out.stderr.contains(&kept));

    let run_id = out.json()["run_id"].as_str().unwrap().to_string();
    let r = w
        .relink(&["report", &run_id, "--format", "json"])
        .await
        .json();
    let requests = r["reset"]["gateway_requests"].as_array().unwrap().clone();
    assert_eq!(requests.len(), 2, "{r}");
    assert_eq!(requests[0]["action"], "stop");
    assert_eq!(requests[1]["action"], "reset");
    for q in &requests {
        assert!(
            q["request_id"].as_str().is_some_and(|id| !id.is_empty()),
            "{r}"
        );
        assert_eq!(q["state"], "completed", "{r}");
    }
    assert_eq!(r["reset"]["verified"], true, "{r}");
    let md = w.relink(&["report", &run_id]).await.stdout;
    assert!(md.contains("- gateway reset: request "), "{md}");
    // The refresh token was rotated and the new one kept.
    assert_ne!(std::fs::read_to_string(&token_file).unwrap(), kept);
}

/// The device-code flow against the Entra simulator: pending and slow_down are waited out, an
/// expired code says to sign in again, and a rotated refresh token is kept so that the next
/// redemption works when the old one is spent.
#[tokio::test]
async fn the_device_code_sign_in_waits_slows_down_expires_and_rotates() {
    let w = World::new(Spec {
        uat_rows: 10,
        project_configs: 3,
        registry_extra: common::gateway_reset(""),
        ..Spec::default()
    })
    .await;
    w.sim.set_faults(Faults {
        device_slow_down: true,
        device_pending_polls: 2,
        ..Faults::default()
    });
    let started = std::time::Instant::now();
    sign_in(&w).await;
    assert_eq!(
        w.sim.snapshot().device_polls,
        4,
        "slow_down, two pending, then the tokens"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(6),
        "after slow_down relink waits five seconds more"
    );

    w.sim.set_faults(Faults {
        device_expired: true,
        ..Faults::default()
    });
    let expired = w.relink(&["auth", "login", ENV, "--for", "gateway"]).await;
    assert_eq!(expired.code, 2, "{expired:?}");
    assert!(
        expired.stderr.contains("expired") && expired.stderr.contains("relink auth login"),
        "{expired:?}"
    );

    // Strict rotation: each refresh token works once. Two runs redeem twice.
    w.sim.set_faults(Faults {
        refresh_single_use: true,
        ..Faults::default()
    });
    assert_eq!(w.relink(&["run", ENV]).await.code, 0);
    let again = w.relink(&["run", ENV, "--force", "--json"]).await;
    assert_eq!(again.code, 0, "the rotated sign-in was kept: {again:?}");
    assert_eq!(w.sim.snapshot().refresh_redeemed, 2);
}

/// A sign-in that was revoked or expired stops the gateway path with what to do, at the manual
/// gate by default, and nothing is reset.
#[tokio::test]
async fn a_revoked_sign_in_falls_back_to_the_manual_gate_with_what_to_do() {
    let w = gateway_world(
        "",
        Faults {
            refresh_revoked: true,
            ..Faults::default()
        },
    )
    .await;
    let out = w.relink(&["run", ENV, "--json"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    let run = out.json();
    assert_eq!(run["status"], "awaiting-confirmation", "{run}");
    let instructions = run["instructions"].as_str().unwrap();
    assert!(
        instructions.contains(&format!("relink auth login {ENV} --for gateway again"))
            && instructions.contains("Reset link"),
        "{instructions}"
    );
    assert_eq!(w.sim.snapshot().gateway_resets, 0);
}

/// Each gateway fault ends the run failed (on_failure = "fail") or at the manual gate, within
/// the configured bounds, saying what happened; never succeeded.
#[tokio::test]
async fn stopping_that_never_completes_ends_at_the_gate_within_the_bound() {
    let w = gateway_world(
        "",
        Faults {
            gateway_stop_never: true,
            ..Faults::default()
        },
    )
    .await;
    let started = std::time::Instant::now();
    let out = w.relink(&["run", ENV, "--json"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(40));
    let run = out.json();
    assert!(
        run["instructions"]
            .as_str()
            .unwrap()
            .contains("did not finish within"),
        "{run}"
    );
    assert_eq!(
        w.sim.snapshot().gateway_resets,
        0,
        "no Reset while maps run"
    );
}

#[tokio::test]
async fn a_failed_reset_fails_the_run_when_the_entry_says_so() {
    let w = gateway_world(
        ", on_failure = \"fail\"",
        Faults {
            gateway_reset_fails: true,
            ..Faults::default()
        },
    )
    .await;
    let out = w.relink(&["run", ENV, "--json"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    let run = out.json();
    assert_eq!(run["status"], "failed", "{run}");
    let error = stage(&run, "reset-link")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("Reset (request") && error.contains("failed"),
        "{error}"
    );
    assert_eq!(w.sim.snapshot().gateway_resets, 1);
}

#[tokio::test]
async fn gateway_throttling_and_a_synchronous_reset_still_verify() {
    let w = gateway_world(
        "",
        Faults {
            gateway_throttle_next: 3,
            gateway_reset_sync: true,
            ..Faults::default()
        },
    )
    .await;
    let out = w.relink(&["run", ENV, "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["status"], "succeeded");
    assert_eq!(w.sim.snapshot().gateway_resets, 1);
}
