//! The reliability suite: faults and hostile input driven through the whole pipeline (real SQS and
//! DynamoDB on the local stack, `relink worker` processes, the simulators over HTTP). Every
//! scenario checks every side through `AwsWorld::conclude` (rows, archives, run records, queues
//! and dead-letter queues, secrets in any output) and writes the row of docs/RELIABILITY.md it
//! stands for; `cargo run -p relink-bench -- reliability` turns the rows into the page.
//!
//! One file of scenarios, longer than the others on purpose: each scenario is one test, read on
//! its own from top to bottom, and the page they generate lists them in this order; the
//! machinery they share lives in `tests/common/`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::aws::AwsWorld;
use common::scenario::{Scenario, retries_waited};
use common::{ENV, Spec, stage};
use relink_core::model::{RunStatus, Stage};
use relink_core::ports::ProgressStore;
use relink_sim::Faults;

/// Rows of the stale environments of a spec: Dataverse runtime configurations and F&O keys.
fn stale_rows(spec: &Spec) -> usize {
    spec.uat_rows
        + spec.project_configs
        + spec.field_configs
        + spec.business_events
        + spec.extra_envs * (spec.extra_rows + spec.extra_rows / 4)
}

/// Each stage's `attempts`, in stage order.
fn attempts(run: &serde_json::Value) -> Vec<u64> {
    run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["attempts"].as_u64().unwrap())
        .collect()
}

/// A world whose environments are stale, with the spec's expected row count.
async fn world(spec: Spec) -> (AwsWorld, usize) {
    let rows = stale_rows(&spec);
    (AwsWorld::new(spec).await, rows)
}

fn awaiting(run_id: &str) -> Vec<(String, RunStatus)> {
    vec![(run_id.to_string(), RunStatus::AwaitingConfirmation)]
}

/// Waits for a background worker to reach its idle exit.
async fn wait_exit(mut worker: tokio::process::Child) {
    let status = tokio::time::timeout(Duration::from_secs(300), worker.wait())
        .await
        .expect("the worker goes idle within 5 minutes")
        .unwrap();
    assert!(status.success(), "worker exited with {status}");
}

/// The run of each environment, from the table.
async fn runs_by_env(a: &AwsWorld) -> HashMap<String, String> {
    let runs = a.store().await.recent_runs(10_000).await.unwrap();
    let mut by_env = HashMap::new();
    for r in runs {
        assert!(
            by_env
                .insert(r.environment_id.clone(), r.run_id.clone())
                .is_none(),
            "two runs for {}",
            r.environment_id
        );
    }
    by_env
}

#[tokio::test]
async fn s01_every_message_delivered_twice() {
    let (a, rows) = world(Spec {
        uat_rows: 3000,
        project_configs: 20,
        ..Spec::default()
    })
    .await;
    let run_id = a.inject(ENV).await;
    let worker = a.drain(&["--deliver-twice"]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(attempts(&run), [1, 1, 1, 1], "{run}");
    a.conclude(
        Scenario {
            id: "01-delivered-twice",
            title: "Every message delivered twice",
            injected: "every SQS batch handed to the handler twice, concurrently (`relink worker --deliver-twice`)",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "each stage's side effects ran once (attempts 1, 1, 1, 1)",
    )
    .await;
}

#[tokio::test]
async fn s02_messages_out_of_order() {
    let (a, rows) = world(Spec {
        uat_rows: 3000,
        registry_extra: "limits = { dataverse_batch_size = 250, dataverse_concurrency = 1 }".into(),
        ..Spec::default()
    })
    .await;
    // clear-dataverse-configs is held at its first delete batch until the early event has been
    // seen and refused: the order is driven, not raced.
    a.w.sim.set_faults(Faults {
        per_op_latency_ms: 2,
        hold_batches: true,
        ..Faults::default()
    });
    let run_id = a.inject(ENV).await;
    let worker = a.worker(&[]);
    common::wait_until("a delete batch is held", || {
        a.w.sim.snapshot().held_batches > 0
    })
    .await;
    // While clear-dataverse-configs runs: the last stage's event (early) and purge-keys' (late).
    for s in [Stage::ResetLink, Stage::PurgeKeys] {
        a.send_raw(
            s,
            &format!(
                r#"{{"environment_id":"{ENV}","run_id":"{run_id}","stage":"{}"}}"#,
                s.as_str()
            ),
        )
        .await;
    }
    common::wait_until("the early event was seen and held back", || {
        a.logs()
            .contains("arrived before clear-dataverse-configs finished")
    })
    .await;
    a.w.sim.set_faults(Faults {
        per_op_latency_ms: 2,
        ..Faults::default()
    });
    wait_exit(worker).await;
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(attempts(&run), [1, 1, 1, 1], "{run}");
    let ts = |s: &str, field: &str| {
        stage(&run, s)[field]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .unwrap()
    };
    assert!(
        ts("reset-link", "started_at") >= ts("clear-dataverse-configs", "finished_at"),
        "reset-link started before clear-dataverse-configs finished: {run}"
    );
    a.conclude(
        Scenario {
            id: "02-out-of-order",
            title: "Messages out of order",
            injected: "reset-link's event sent while clear-dataverse-configs was still deleting; purge-keys' event sent again after it finished",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "the early event was held back until the stage before it finished; the late one was a no-op",
    )
    .await;
}

/// Runs one event through the pipeline, killing a worker at `point` after each of the first
/// three stages, then lets a last worker finish.
async fn killed_at_each_boundary(point: &str) -> (AwsWorld, String, usize) {
    let (a, rows) = world(Spec {
        uat_rows: 1200,
        ..Spec::default()
    })
    .await;
    let run_id = a.inject(ENV).await;
    for s in [
        Stage::DetectMismatch,
        Stage::PurgeKeys,
        Stage::ClearDataverseConfigs,
    ] {
        a.kill_worker_at(&format!("{point}:{}", s.as_str())).await;
    }
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    // Each stage was recorded once. (A worker stopped right after sending the next event may
    // already have started that stage, which then counts a second attempt: that attempt died
    // unrecorded, which is no stage running again.)
    let logs = a.logs();
    let recorded = Stage::ALL.map(|s| {
        logs.lines()
            .filter(|l| l.contains("stage finished") && l.contains(&format!("stage={s} ")))
            .count()
    });
    assert_eq!(
        recorded,
        [1, 1, 1, 1],
        "no recorded stage ran again: {run}\n{}",
        logs.lines()
            .filter(|l| !l.contains("DEBUG"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    (a, run_id, rows)
}

#[tokio::test]
async fn s03_killed_after_recording_each_stage() {
    let (a, run_id, rows) = killed_at_each_boundary("stage-recorded").await;
    a.conclude(
        Scenario {
            id: "03-killed-after-recording",
            title: "SIGKILL at each stage boundary, before the next event is sent",
            injected: "worker SIGKILLed after detect-mismatch, purge-keys and clear-dataverse-configs each stored their outcome, before the next stage's event was sent; restarted each time",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "3 kills; the redelivered event sent the missing next event; no stage ran twice",
    )
    .await;
}

#[tokio::test]
async fn s04_killed_after_sending_each_next_event() {
    let (a, run_id, rows) = killed_at_each_boundary("next-sent").await;
    a.conclude(
        Scenario {
            id: "04-killed-after-sending",
            title: "SIGKILL at each stage boundary, before the message is acknowledged",
            injected: "worker SIGKILLed after each of the first three stages sent the next event, before its own message was deleted; restarted each time",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "3 kills; each redelivery was recognised as done; no stage ran twice",
    )
    .await;
}

#[tokio::test]
async fn s05_killed_in_the_middle_of_a_delete_batch() {
    let (a, rows) = world(Spec {
        uat_rows: 3000,
        registry_extra: "limits = { dataverse_batch_size = 500, dataverse_concurrency = 1, dataverse_page_size = 1000 }".into(),
        ..Spec::default()
    })
    .await;
    a.w.sim.set_faults(Faults {
        stall_batch_after_ops: Some(200),
        ..Faults::default()
    });
    let run_id = a.inject(ENV).await;
    let mut worker = a.worker(&[]);
    common::wait_until("a delete batch stalled", || {
        a.w.sim.snapshot().stalled_batches > 0
    })
    .await;
    worker.start_kill().unwrap(); // SIGKILL, 200 of the batch's 500 deletes applied
    worker.wait().await.unwrap();
    assert_eq!(a.w.sim.snapshot().deleted["dataverse/uat"], 200);
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(stage(&run, "clear-dataverse-configs")["attempts"], 2);
    let outcome = &stage(&run, "clear-dataverse-configs")["outcome"];
    assert_eq!(
        (outcome["deleted"].as_u64(), outcome["archived"].as_u64()),
        (Some(3000), Some(3000)),
        "the outcome is the run's, across both attempts: {outcome}"
    );
    a.conclude(
        Scenario {
            id: "05-killed-mid-batch",
            title: "SIGKILL in the middle of a delete batch",
            injected: "Dataverse applied 200 of a 500-delete `$batch`, then the worker was SIGKILLed before the answer; restarted",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "the stage resumed (attempt 2) from a fresh read; the 200 rows were archived before they went; the outcome counts both attempts (deleted 3000)",
    )
    .await;
}

#[tokio::test]
async fn s06_half_of_all_requests_throttled() {
    let (a, rows) = world(Spec {
        uat_rows: 2000,
        project_configs: 100,
        registry_extra: "limits = { dataverse_batch_size = 250 }".into(),
        ..Spec::default()
    })
    .await;
    a.w.sim.set_faults(Faults {
        rate_429: 0.5,
        retry_after_secs: 1,
        ..Faults::default()
    });
    let run_id = a.inject(ENV).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    assert!(retries_waited(&a.w.sim.log()) > 0, "nothing was throttled");
    a.conclude(
        Scenario {
            id: "06-throttled-half",
            title: "Half of all Dataverse and F&O requests throttled",
            injected: "50% of Dataverse and F&O requests answered 429 with `Retry-After: 1`",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "every throttled request was retried, none before its Retry-After (checked in the simulator's log)",
    )
    .await;
}

#[tokio::test]
async fn s07_bursts_of_server_errors() {
    let (a, rows) = world(Spec {
        uat_rows: 2000,
        project_configs: 100,
        registry_extra: "limits = { dataverse_batch_size = 250 }".into(),
        ..Spec::default()
    })
    .await;
    a.w.sim.set_faults(Faults {
        burst_5xx_every: 5,
        burst_5xx_len: 4,
        ..Faults::default()
    });
    let run_id = a.inject(ENV).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    assert!(a.w.sim.snapshot().server_errors >= 8);
    a.conclude(
        Scenario {
            id: "07-5xx-bursts",
            title: "Bursts of 5xx",
            injected: "after every 5 Dataverse / F&O requests, the next 4 answered 503",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "every burst was ridden out with backoff; no batch was applied twice",
    )
    .await;
}

#[tokio::test]
async fn s08_token_endpoint_down_for_a_while() {
    let (a, rows) = world(Spec::default()).await;
    a.w.sim.set_faults(Faults {
        token_outage_ms: 8000,
        ..Faults::default()
    });
    let run_id = a.inject(ENV).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    assert!(a.w.sim.snapshot().token_outage_answers > 0);
    a.conclude(
        Scenario {
            id: "08-token-outage",
            title: "Token endpoint down for a while",
            injected: "Entra's token endpoint answered 503 `temporarily_unavailable` for the first 8 s",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "token requests were retried until the endpoint came back; nothing ran without a token",
    )
    .await;
}

#[tokio::test]
async fn s09_token_expires_mid_run() {
    let (a, rows) = world(Spec {
        uat_rows: 3000,
        registry_extra: "limits = { dataverse_batch_size = 500, dataverse_concurrency = 1 }".into(),
        ..Spec::default()
    })
    .await;
    a.w.sim.set_faults(Faults {
        tokens_revoked_after_secs: Some(1),
        per_op_latency_ms: 1,
        ..Faults::default()
    });
    let run_id = a.inject(ENV).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let snap = a.w.sim.snapshot();
    assert!(snap.unauthorized > 0, "no token expired mid-run");
    a.conclude(
        Scenario {
            id: "09-token-expires-mid-run",
            title: "A token that expires mid-run",
            injected: "tokens refused 1 s after issue although `expires_in` said an hour",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "each 401 fetched a new token and retried the request once",
    )
    .await;
}

#[tokio::test]
async fn s10_concurrent_workers_conflict_on_the_table() {
    let (a, rows) = world(Spec {
        uat_rows: 500,
        extra_envs: 5,
        extra_rows: 200,
        ..Spec::default()
    })
    .await;
    let mut runs = Vec::new();
    for env in a.w.envs.clone() {
        runs.push(a.inject(&env).await);
    }
    let workers: Vec<_> = (0..3).map(|_| a.worker(&["--deliver-twice"])).collect();
    for w in workers {
        wait_exit(w).await;
    }
    for run_id in &runs {
        let run = a.status_json(&["--run", run_id]).await;
        assert_eq!(attempts(&run), [1, 1, 1, 1], "{run}");
    }
    let logs = a.logs();
    let conflicts = logs.matches("is locked by run").count()
        + logs.matches("changed concurrently").count()
        + logs.matches("arrived before").count();
    assert!(conflicts > 0, "the workers never collided");
    a.conclude(
        Scenario {
            id: "10-concurrent-workers",
            title: "Conditional-write conflicts from concurrent workers",
            injected: "3 workers, each handing every batch to the handler twice, on 6 environments at once",
            runs: runs
                .iter()
                .map(|r| (r.clone(), RunStatus::AwaitingConfirmation))
                .collect(),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "lock and version conflicts refused the losing writers; every stage of every run ran once",
    )
    .await;
}

#[tokio::test]
async fn s11_crashed_lock_holder_whose_lease_expires() {
    use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
    use lambda_runtime::{Context, LambdaEvent};
    use relink_aws::lambda::handle_batch;

    let (a, rows) = world(Spec {
        uat_rows: 4000,
        registry_extra: "limits = { dataverse_batch_size = 200, dataverse_concurrency = 1 }".into(),
        ..Spec::default()
    })
    .await;
    a.w.sim.set_faults(Faults {
        per_op_latency_ms: 1,
        ..Faults::default()
    });
    // This test process plays the Lambda functions, on another "host": their leases cannot be
    // checked for a dead process, only waited out.
    let store = a.store().await;
    let mut deps = HashMap::new();
    for s in Stage::ALL {
        deps.insert(s, a.function_deps(s, Duration::from_secs(60)).await);
    }
    let urls: HashMap<Stage, String> = {
        let mut u = HashMap::new();
        for s in Stage::ALL {
            u.insert(s, a.queue_url(&format!("{}{}", a.prefix, s.as_str())).await);
        }
        u
    };
    let receive = async |stage: Stage| {
        let out = a
            .sqs
            .receive_message()
            .queue_url(&urls[&stage])
            .wait_time_seconds(10)
            .visibility_timeout(common::aws::VISIBILITY_SECS as i32)
            .send()
            .await
            .unwrap();
        let m = out.messages().first().expect("a message").clone();
        let mut r = SqsMessage::default();
        r.message_id = m.message_id().map(str::to_string);
        r.receipt_handle = m.receipt_handle().map(str::to_string);
        r.body = m.body().map(str::to_string);
        let mut event = SqsEvent::default();
        event.records = vec![r];
        let mut ctx = Context::default();
        ctx.deadline = (jiff::Timestamp::now() + Duration::from_secs(60)).as_millisecond() as u64;
        (
            LambdaEvent::new(event, ctx),
            m.receipt_handle().unwrap().to_string(),
        )
    };
    let run_id = a.inject(ENV).await;
    for s in [Stage::DetectMismatch, Stage::PurgeKeys] {
        let (event, receipt) = receive(s).await;
        let out = handle_batch(&deps[&s], event).await.unwrap();
        assert!(out.batch_item_failures.is_empty());
        a.sqs
            .delete_message()
            .queue_url(&urls[&s])
            .receipt_handle(receipt)
            .send()
            .await
            .unwrap();
    }
    let (event, _) = receive(Stage::ClearDataverseConfigs).await;
    let clear = a
        .function_deps(Stage::ClearDataverseConfigs, Duration::from_secs(60))
        .await;
    let crashed = tokio::spawn(async move {
        handle_batch(&clear, event).await.ok();
    });
    common::wait_for_deletes(&a.w.sim, "uat", 600).await;
    crashed.abort(); // the invocation dies holding the lease
    let _ = crashed.await;
    let deleted_at_crash = a.w.sim.snapshot().deleted["dataverse/uat"];
    assert!(deleted_at_crash < 4000);

    // The order of events is driven, not raced: the redelivery comes while the dead holder's
    // lease is known to live (it is 60 s long and renewed every 20 s), then the test lets the
    // lease lapse, then a worker gets the message.
    let held = store
        .get_lock(ENV)
        .await
        .unwrap()
        .expect("the crashed invocation's lock");
    let dead = held.owner.clone().expect("held by the crashed invocation");
    let (event, receipt) = receive(Stage::ClearDataverseConfigs).await;
    let out = handle_batch(&deps[&Stage::ClearDataverseConfigs], event)
        .await
        .unwrap();
    let still = store.get_lock(ENV).await.unwrap().unwrap();
    assert!(
        still.owner.as_ref() == Some(&dead) && still.lease_until > jiff::Timestamp::now(),
        "the redelivery came while the crashed holder's lease lived: {still:?}"
    );
    assert_eq!(
        out.batch_item_failures.len(),
        1,
        "the redelivery was refused while the crashed holder's lease lived"
    );
    assert_eq!(
        a.w.sim.snapshot().deleted["dataverse/uat"],
        deleted_at_crash,
        "nothing was deleted by the refused redelivery"
    );
    // The refusal is on the run, with what it waits for and until when.
    let status = a.status_json(&["--run", &run_id]).await;
    let waiting = status["waiting"].as_str().unwrap_or_default().to_string();
    assert!(
        waiting.contains("an earlier attempt of this run")
            && waiting.contains(&format!("until {}", still.lease_until)),
        "{waiting}"
    );
    // The lease lapses (the test moves the clock of this one lock), and the message is
    // visible again at once.
    store
        .handover_lock(ENV, &run_id, &dead, Duration::ZERO)
        .await
        .unwrap();
    a.sqs
        .change_message_visibility()
        .queue_url(&urls[&Stage::ClearDataverseConfigs])
        .receipt_handle(receipt)
        .visibility_timeout(0)
        .send()
        .await
        .unwrap();

    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(stage(&run, "clear-dataverse-configs")["attempts"], 2);
    a.conclude(
        Scenario {
            id: "11-lease-expiry",
            title: "A crashed lock holder whose lease expires",
            injected: "a Lambda-style invocation (owner on another host) died mid-delete holding a 60 s lease; the redelivery came while it lived, then the lease lapsed and a worker got the event",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "the redelivery was refused while the lease lived (nothing deleted; the run said what it waited for and until when), then a worker took the environment over and finished",
    )
    .await;
}

#[tokio::test]
async fn s12_a_hundred_environments_restored_at_once() {
    let (a, rows) = world(Spec {
        extra_envs: 99,
        extra_rows: 40,
        ..Spec::default()
    })
    .await;
    assert_eq!(a.w.envs.len(), 100);
    for env in &a.w.envs {
        a.send_raw(
            Stage::DetectMismatch,
            &format!(r#"{{"environment_id":"{env}"}}"#),
        )
        .await;
    }
    let workers: Vec<_> = (0..4).map(|_| a.worker(&[])).collect();
    for w in workers {
        wait_exit(w).await;
    }
    let by_env = runs_by_env(&a).await;
    let runs: Vec<(String, RunStatus)> =
        a.w.envs
            .iter()
            .filter_map(|e| by_env.get(e))
            .map(|r| (r.clone(), RunStatus::AwaitingConfirmation))
            .collect();
    assert_eq!(runs.len(), 100, "every environment has its run");
    a.conclude(
        Scenario {
            id: "12-hundred-environments",
            title: "100 environments restored at once",
            injected: "100 restore events on the detect queue at once, 4 workers",
            runs,
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "100 runs, one per environment, all awaiting the manual reset",
    )
    .await;
}

#[tokio::test]
async fn s13_poison_messages() {
    let (a, _) = world(Spec::default()).await;
    let rows = stale_rows(&Spec::default());
    let ghost = "01JDQ4N9Z3W8B7C6X5V4T3S2R1";
    let smuggled = "SMUGGLED-CLIENT-SECRET-7f3a";
    let poison: Vec<(Stage, String, &str)> = vec![
        (
            Stage::DetectMismatch,
            "this is not json".into(),
            "expected ident",
        ),
        (
            Stage::DetectMismatch,
            "[1, 2, 3]".into(),
            "an event is a JSON object",
        ),
        (
            Stage::DetectMismatch,
            r#"{"environment_id": 42}"#.into(),
            "field `environment_id`: invalid type",
        ),
        (
            Stage::DetectMismatch,
            "{}".into(),
            "missing field `environment_id`",
        ),
        (
            Stage::DetectMismatch,
            format!(r#"{{"environment_id":"{ENV}","dryrun":true}}"#),
            "unknown field `dryrun`",
        ),
        (
            Stage::DetectMismatch,
            format!(r#"{{"environment_id":"{ENV}","stage":"drop-database"}}"#),
            "field `stage`",
        ),
        (
            Stage::DetectMismatch,
            r#"{"environment_id":"no-such-env"}"#.into(),
            "unknown environment `no-such-env`",
        ),
        (
            Stage::DetectMismatch,
            format!(r#"{{"version":2,"environment_id":"{ENV}"}}"#),
            "understands only version 1",
        ),
        (
            Stage::DetectMismatch,
            format!(
                r#"{{"environment_id":"{ENV}","trigger":{{"source":"manual","operation_id":"{}"}}}}"#,
                "x".repeat(80_000)
            ),
            "an event is at most",
        ),
        (
            Stage::PurgeKeys,
            format!(r#"{{"environment_id":"{ENV}","stage":"purge-keys","run_id":"{ghost}"}}"#),
            "not found",
        ),
        (
            Stage::DetectMismatch,
            format!(
                r#"{{"environment_id":"{ENV}","dataverse_url":"https://attacker.example.com"}}"#
            ),
            "unknown field `dataverse_url`",
        ),
        (
            Stage::DetectMismatch,
            format!(r#"{{"environment_id":"{ENV}","client_secret":"{smuggled}"}}"#),
            "unknown field `client_secret`",
        ),
        (
            Stage::DetectMismatch,
            r#"{"environment_id":"../contoso-prod"}"#.into(),
            "not a registry key",
        ),
        (
            Stage::DetectMismatch,
            format!(r#"{{"environment_id":"{ENV}","run_id":"../../etc/passwd"}}"#),
            "not a ULID",
        ),
        (
            Stage::DetectMismatch,
            format!(
                r#"{{"environment_id":"{ENV}","stage":"clear-dataverse-configs","run_id":"{ghost}"}}"#
            ),
            "this is the detect-mismatch queue",
        ),
    ];
    for (s, body, _) in &poison {
        a.send_raw(*s, body).await;
    }
    a.send_raw(
        Stage::DetectMismatch,
        &format!(r#"{{"environment_id":"{ENV}"}}"#),
    )
    .await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");

    let errors = a.rejected_errors().await;
    assert_eq!(errors.len(), poison.len(), "{errors:#?}");
    let unmatched: Vec<&str> = poison
        .iter()
        .map(|(_, _, needle)| *needle)
        .filter(|n| !errors.iter().any(|e| e.contains(n)))
        .collect();
    assert!(
        unmatched.is_empty(),
        "no rejection says {unmatched:?}: {errors:#?}"
    );
    assert!(
        !a.w.sim.log().iter().any(|e| e.path.contains("attacker")),
        "no request followed a smuggled URL"
    );
    let by_env = runs_by_env(&a).await;
    a.conclude(
        Scenario {
            id: "13-poison-messages",
            title: "Poison messages",
            injected: "15 kinds beside one good event: not JSON, an array, wrong type, missing field, unknown field, unknown stage, unknown environment, version 2, 36 KB body, run that does not exist, smuggled URL, smuggled credential, path in the environment id, path as run id, stage on the wrong queue",
            runs: awaiting(&by_env[ENV]),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![smuggled.into()],
        },
        "each recorded with its reason and acknowledged (none dead-lettered); the good event went through",
    )
    .await;
}

#[tokio::test]
async fn s14_wrong_dataverse_organisation() {
    let (a, _) = world(Spec {
        dataverse_org: "prod",
        ..Spec::default()
    })
    .await;
    let run_id = a.inject(ENV).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    let error = stage(&run, "detect-mismatch")["error"].as_str().unwrap();
    assert!(error.contains("orgcontosoprod"), "{error}");
    let snap = a.w.sim.snapshot();
    assert_eq!(
        (
            snap.runtime_configs["prod"],
            snap.runtime_configs["uat"],
            snap.project_configs[ENV]
        ),
        (25, 300, 40),
        "every row is still there"
    );
    a.conclude(
        Scenario {
            id: "14-wrong-organisation",
            title: "Registry points at the wrong Dataverse organisation",
            injected: "`dataverse_url` of a UAT entry aimed at the production organisation",
            runs: vec![(run_id, RunStatus::Refused)],
            rows_expected: 0,
            kept_rows: 0,
            also_secret: vec![],
        },
        "refused at detect-mismatch (unique name differs); no row touched on either side",
    )
    .await;
}

#[tokio::test]
async fn s15_production_is_refused() {
    let (a, _) = world(Spec {
        kind: "production",
        ..Spec::default()
    })
    .await;
    let run_id = a.inject(ENV).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    assert!(
        stage(&run, "detect-mismatch")["error"]
            .as_str()
            .unwrap()
            .contains("allow_production"),
        "{run}"
    );
    a.conclude(
        Scenario {
            id: "15-production-refused",
            title: "Production without an allowance",
            injected: "an event for an environment of kind `production` without `allow_production`",
            runs: vec![(run_id, RunStatus::Refused)],
            rows_expected: 0,
            kept_rows: 0,
            also_secret: vec![],
        },
        "refused before any request to Dynamics; nothing deleted",
    )
    .await;
}

/// The ingest function's own wiring against the local stack, with its signing key.
struct Notifier {
    deps: relink_aws::ingest::IngestDeps,
    key: String,
}

impl Notifier {
    async fn new(a: &AwsWorld, key: &str) -> Notifier {
        use relink_aws::ingest::{IngestDeps, NotifyKey};
        use relink_aws::registry::TableRegistry;
        use relink_aws::sqs::SqsQueue;

        let store = a.store().await;
        let detect = a.queue_url(&format!("{}detect-mismatch", a.prefix)).await;
        Notifier {
            deps: IngestDeps {
                registry: Arc::new(TableRegistry::new(store.clone())),
                store: Arc::new(store),
                queue: Arc::new(SqsQueue::new(
                    a.sqs.clone(),
                    HashMap::from([(Stage::DetectMismatch, detect)]),
                )),
                secret: NotifyKey::Value(relink_core::registry::Secret::new(key)),
                metrics: Arc::new(relink_aws::metrics::Off),
            },
            key: key.into(),
        }
    }

    /// Posts `body` signed with `key` at unix time `ts`.
    async fn post_as(&self, body: &str, key: &[u8], ts: i64) -> relink_aws::ingest::Answer {
        relink_aws::ingest::ingest(
            &self.deps,
            Some(&ts.to_string()),
            Some(&relink_core::notify::sign(key, ts, body.as_bytes())),
            body.as_bytes(),
            jiff::Timestamp::now(),
        )
        .await
    }

    /// Posts `body` signed with the right key, now.
    async fn post(&self, body: &str) -> relink_aws::ingest::Answer {
        self.post_as(
            body,
            self.key.as_bytes(),
            jiff::Timestamp::now().as_second(),
        )
        .await
    }
}

#[tokio::test]
async fn s16_forged_and_replayed_notifications() {
    let (a, rows) = world(Spec {
        uat_rows: 500,
        registry_extra: "lcs_environment_id = \"8f1c-lcs-env\"".into(),
        ..Spec::default()
    })
    .await;
    let hook = "hook-secret-5d1e-0123456789abcdef-0123";
    let n = Notifier::new(&a, hook).await;
    let post = async |body: &str, key: &[u8], ts: i64| n.post_as(body, key, ts).await;
    let now = jiff::Timestamp::now().as_second();
    let refresh = r#"{"Name":"Refresh","Type":"SFSourceDbToSandbox","Status":"Completed","ActivityId":"act-77","EnvironmentId":"8F1C-LCS-ENV"}"#;
    let first = post(refresh, hook.as_bytes(), now).await;
    assert_eq!(first.status, 202, "{first:?}");
    let replayed = post(refresh, hook.as_bytes(), now).await;
    assert_eq!(
        (replayed.status, &replayed.body["run_id"]),
        (409, &first.body["run_id"]),
        "a replay is a duplicate of the first"
    );
    let other = r#"{"OperationStatus":"Completed","OperationActivityId":"x","EnvironmentId":"8f1c-lcs-env"}"#;
    assert_eq!(post(other, b"forged", now).await.status, 401);
    assert_eq!(
        post(other, hook.as_bytes(), now - 400).await.status,
        401,
        "stale"
    );
    assert_eq!(
        post(
            r#"{"environment_id":"nowhere","operation":"copy","operation_id":"y"}"#,
            hook.as_bytes(),
            now
        )
        .await
        .status,
        404
    );
    assert_eq!(post("<xml/>", hook.as_bytes(), now).await.status, 400);
    assert_eq!(
        a.depth(&format!("{}detect-mismatch", a.prefix)).await,
        1,
        "one event, however many notifications"
    );
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run_id = first.body["run_id"].as_str().unwrap().to_string();
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(
        (
            run["trigger"]["source"].as_str(),
            run["trigger"]["operation_id"].as_str()
        ),
        (Some("lcs"), Some("act-77"))
    );
    a.conclude(
        Scenario {
            id: "16-forged-replayed-notifications",
            title: "Forged and replayed notifications",
            injected: "one signed LCS notification, then the same request replayed, a forged signature, a stale timestamp, an unknown environment, an unreadable body",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![hook.into()],
        },
        "replay 409 (same run), forged 401, stale 401, unknown 404, unreadable 400; one event queued",
    )
    .await;
}

#[tokio::test]
async fn s17_plain_http_to_a_remote_host_is_refused() {
    let (a, rows) = world(Spec::default()).await;
    let text = std::fs::read_to_string(&a.w.config).unwrap();
    let remote = "http://contoso-uat.crm.dynamics.com";
    // An operator's file with plain http to a real host: `env push` refuses it.
    let mut insecure = text.replace(&format!("[environments.{ENV}]"), "[environments.insecure]");
    let dv = a.w.sim.dataverse_url("uat");
    insecure = insecure.replace(&dv, remote);
    std::fs::write(&a.w.config, format!("{text}\n{insecure}")).unwrap();
    let out = a.relink(&["env", "push", "insecure"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("plain http"), "{out:?}");
    // A hand-written table entry that skipped the check: its events are refused, the others run.
    let mut entry = relink_core::registry::Registry::entry_json(&text, ENV).unwrap();
    entry["dataverse_url"] = remote.into();
    let run_id = a.event_for_table_entry("insecure", &entry).await;
    let errors = a.rejected_errors().await;
    assert!(
        errors.len() == 1 && errors[0].contains("plain http"),
        "{errors:?}"
    );
    a.conclude(
        Scenario {
            id: "17-plain-http-refused",
            title: "Plain http to a host that is not loopback",
            injected: "`dataverse_url = \"http://...dynamics.com\"` in the file (pushed) and written straight into the table (then an event for it)",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "`env push` exit 2; the hand-written entry's event rejected with the reason while the other environment ran",
    )
    .await;
}

#[tokio::test]
async fn s18_a_table_entry_cannot_send_the_functions_environment_anywhere() {
    let (a, rows) = world(Spec::default()).await;
    let text = std::fs::read_to_string(&a.w.config).unwrap();
    // Written straight into the table: the "secret" is the worker's own AWS secret key.
    let mut entry = relink_core::registry::Registry::entry_json(&text, ENV).unwrap();
    entry["client_secret"] = serde_json::json!({"env": "AWS_SECRET_ACCESS_KEY"});
    let run_id = a.event_for_table_entry("envsecret", &entry).await;
    let errors = a.rejected_errors().await;
    assert!(
        errors.len() == 1
            && errors[0].contains("AWS_SECRET_ACCESS_KEY")
            && errors[0].contains("secret_arn"),
        "{errors:?}"
    );
    assert_eq!(
        a.w.sim.snapshot().wrong_secrets,
        0,
        "no token request carried a secret that was not the app's"
    );
    a.conclude(
        Scenario {
            id: "18-env-secret-in-table",
            title: "A table entry naming the functions' own environment as its secret",
            injected: "`client_secret = { env = \"AWS_SECRET_ACCESS_KEY\" }` written straight into the table, then an event for it",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "the entry's event was rejected naming secret_arn; nothing read the variable, no token request was sent for it; the other environment ran",
    )
    .await;
}

#[tokio::test]
async fn s19_a_table_entry_cannot_send_the_secret_to_a_host_of_its_choosing() {
    let (a, rows) = world(Spec::default()).await;
    let text = std::fs::read_to_string(&a.w.config).unwrap();
    // Written straight into the table: a valid secret, sent to an authority the entry chose.
    let mut entry = relink_core::registry::Registry::entry_json(&text, ENV).unwrap();
    entry["authority"] = "https://login.microsoftonline.com.attacker.example".into();
    let run_id = a.event_for_table_entry("stealer", &entry).await;
    let errors = a.rejected_errors().await;
    assert!(
        errors.len() == 1 && errors[0].contains("not a host relink sends credentials to"),
        "{errors:?}"
    );
    a.conclude(
        Scenario {
            id: "19-credential-host-allow-list",
            title: "A table entry sending the client secret to a host of its choosing",
            injected: "`authority = \"https://login.microsoftonline.com.attacker.example\"` written straight into the table, then an event for it",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "the entry's event was rejected naming the allow-list; no token request left relink for it; the other environment ran",
    )
    .await;
}

#[tokio::test]
async fn s20_rows_that_never_go_away_end_the_stage_instead_of_looping() {
    let (a, rows) = world(Spec::default()).await;
    a.w.sim.set_faults(Faults {
        ghost_rows: 2,
        ..Faults::default()
    });
    let run_id = a.inject(ENV).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = stage(&run, "clear-dataverse-configs")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(error.contains("still lists 2 row(s)"), "{error}");
    let snap = a.w.sim.snapshot();
    assert_eq!(snap.runtime_configs["uat"], 2, "only the ghosts are left");
    let batches = snap.batch_requests.values().sum::<usize>();
    assert!(
        batches <= 10,
        "{batches} $batch requests for 300 rows and 2 ghosts"
    );
    a.conclude(
        Scenario {
            id: "20-rows-never-go-away",
            title: "Rows that never go away",
            injected: "Dataverse answers 204 to the deletes of 2 rows and keeps them",
            runs: vec![(run_id, RunStatus::Failed)],
            rows_expected: rows - 2,
            kept_rows: 2,
            also_secret: vec![],
        },
        "the stage failed after 3 passes naming the 2 rows, with the 298 others deleted once; no endless loop",
    )
    .await;
}

/// The F&O keys, the UAT and the production runtime configurations, in that order.
fn rows_left(a: &AwsWorld) -> (usize, usize, usize) {
    let snap = a.w.sim.snapshot();
    (
        snap.project_configs[ENV],
        snap.runtime_configs["uat"],
        snap.runtime_configs["prod"],
    )
}

/// The UAT organisation seeded again (new rows, same count) as `platform` and `paired_with` say.
fn reseed_uat(a: &AwsWorld, paired_with: Option<&str>, platform: Option<relink_sim::PlatformSeed>) {
    a.w.sim
        .seed(&relink_sim::Seed {
            organizations: vec![relink_sim::OrgSeed {
                name: "uat".into(),
                unique_name: "orgcontosouat".into(),
                organization_id: None,
                friendly_name: None,
                integrated_fno: paired_with.map(Into::into),
                runtime_configs: 300,
                platform,
            }],
            ..relink_sim::Seed::default()
        })
        .unwrap();
}

#[tokio::test]
async fn s21_the_pairing_changes_between_detect_and_purge() {
    let (a, _) = world(Spec::default()).await;
    // detect-mismatch runs in a warm function and queues purge-keys...
    let deps = a
        .function_deps(Stage::DetectMismatch, Duration::from_secs(60))
        .await;
    let run_id = ulid::Ulid::new().to_string();
    let out = relink_aws::lambda::handle_batch(&deps, AwsWorld::detect_delivery(&run_id))
        .await
        .unwrap();
    assert!(out.batch_item_failures.is_empty());
    // ...then the Dataverse is linked to another F&O before purge-keys runs.
    reseed_uat(&a, Some("contoso-other"), None);
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(
        stage(&run, "detect-mismatch")["status"],
        "succeeded",
        "{run}"
    );
    let error = stage(&run, "purge-keys")["error"].as_str().unwrap();
    assert!(
        error.contains("/fno/contoso-other") && error.contains("not to the registered"),
        "{error}"
    );
    assert_eq!(rows_left(&a), (40, 300, 25), "every row is still there");
    a.conclude(
        Scenario {
            id: "21-pairing-checked-by-each-stage",
            title: "Dataverse linked to another F&O between detect and purge",
            injected: "after `detect-mismatch` succeeded, Dataverse starts naming a different F&O environment",
            runs: vec![(run_id, RunStatus::Refused)],
            rows_expected: 0,
            kept_rows: 0,
            also_secret: vec![],
        },
        "purge-keys refused by its own pairing guard (RetrieveFinanceAndOperationsIntegrationDetails names another F&O); no row touched",
    )
    .await;
}

#[tokio::test]
async fn s22_the_platform_says_production_although_the_registry_says_uat() {
    let (a, _) = world(Spec {
        uat_platform: Some(relink_sim::PlatformSeed {
            environment_type: "Production".into(),
            linked_fno: Some(ENV.into()),
            admin_shape: false,
        }),
        registry_extra: "power_platform_api = \"{sim}/powerplatform\"\n".into(),
        ..Spec::default()
    })
    .await;
    let first = a.inject(ENV).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    // The admin API's shape (`properties.environmentSku`) says the same.
    reseed_uat(
        &a,
        Some(ENV),
        Some(relink_sim::PlatformSeed {
            environment_type: "Production".into(),
            linked_fno: None,
            admin_shape: true,
        }),
    );
    let second = a.inject(ENV).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    for run_id in [&first, &second] {
        let run = a.status_json(&["--run", run_id]).await;
        let error = stage(&run, "detect-mismatch")["error"].as_str().unwrap();
        assert!(error.contains("type Production"), "{error}");
    }
    assert_eq!(rows_left(&a), (40, 300, 25), "every row is still there");
    a.conclude(
        Scenario {
            id: "22-platform-says-production",
            title: "The Power Platform API says Production, the registry says uat",
            injected: "an environment of type Production (both record shapes) registered as kind `uat` without `allow_production`",
            runs: vec![(first, RunStatus::Refused), (second, RunStatus::Refused)],
            rows_expected: 0,
            kept_rows: 0,
            also_secret: vec![],
        },
        "both runs refused on the platform's word (top-level `type`, then `properties.environmentSku`); no row touched",
    )
    .await;
}

#[tokio::test]
async fn s23_nobody_can_say_which_fno_the_dataverse_is_linked_to() {
    let (a, _) = world(Spec {
        uat_paired_with: None,
        ..Spec::default()
    })
    .await;
    let run_id = a.inject(ENV).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    let error = stage(&run, "detect-mismatch")["error"].as_str().unwrap();
    assert!(error.contains("allow_unverified_pairing"), "{error}");
    assert_eq!(rows_left(&a), (40, 300, 25), "every row is still there");
    a.conclude(
        Scenario {
            id: "23-pairing-unverifiable",
            title: "Nobody can say which F&O the Dataverse is linked to",
            injected: "`RetrieveFinanceAndOperationsIntegrationDetails` answers 404 and no Power Platform record names a linked F&O",
            runs: vec![(run_id, RunStatus::Refused)],
            rows_expected: 0,
            kept_rows: 0,
            also_secret: vec![],
        },
        "refused (fail closed) with the entry setting that would allow it named; no row touched",
    )
    .await;
}

#[tokio::test]
async fn s24_one_build_id_for_two_environments_starts_two_runs() {
    let (a, rows) = world(Spec {
        extra_envs: 1,
        registry_extra: "lcs_environment_id = \"lcs-uat-1\"\n".into(),
        ..Spec::default()
    })
    .await;
    let n = Notifier::new(&a, "hook-secret-24-0123456789abcdef-01234").await;
    let body = |env: &str| {
        format!(r#"{{"environment_id":"{env}","operation":"refresh","operation_id":"build-4711"}}"#)
    };
    let first = n.post(&body(ENV)).await;
    let second = n.post(&body("fan-001")).await;
    assert_eq!(
        (first.status, second.status),
        (202, 202),
        "{first:?} {second:?}"
    );
    assert_ne!(first.body["run_id"], second.body["run_id"]);
    let replay = n.post(&body("fan-001")).await;
    assert_eq!(
        (replay.status, &replay.body["run_id"]),
        (409, &second.body["run_id"]),
        "a replay for the same environment is still a duplicate"
    );
    // A second entry claiming the same LCS environment is refused by `env push`.
    let text = std::fs::read_to_string(&a.w.config).unwrap();
    let twin = text
        .split("\n[environments.")
        .next()
        .unwrap()
        .replace(&format!("[environments.{ENV}]"), "[environments.twin]");
    std::fs::write(&a.w.config, format!("{text}\n{twin}")).unwrap();
    let out = a.relink(&["env", "push", "twin"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("lcs_environment_id"), "{out:?}");
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let runs: Vec<_> = [&first, &second]
        .iter()
        .map(|r| r.body["run_id"].as_str().unwrap().to_string())
        .collect();
    a.conclude(
        Scenario {
            id: "24-one-build-two-environments",
            title: "One build id refreshes two environments",
            injected: "two signed notifications with one `operation_id` for two environments, a replay, and an `env push` of a second entry with the same `lcs_environment_id`",
            runs: runs.into_iter().map(|r| (r, RunStatus::AwaitingConfirmation)).collect(),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![n.key.clone()],
        },
        "two runs (dedup is per source, environment and operation id), the replay 409, the duplicate LCS id refused at push",
    )
    .await;
}

#[tokio::test]
async fn s25_died_between_claiming_a_notification_and_sending_its_event() {
    let (a, rows) = world(Spec::default()).await;
    let n = Notifier::new(&a, "hook-secret-25-0123456789abcdef-01234").await;
    // The ingest invocation claimed the operation and died before sending the event.
    let orphan = ulid::Ulid::new().to_string();
    a.store()
        .await
        .claim_trigger("notification", &format!("{ENV}/build-99"), &orphan)
        .await
        .unwrap()
        .unwrap();
    let body =
        format!(r#"{{"environment_id":"{ENV}","operation":"refresh","operation_id":"build-99"}}"#);
    let retry = n.post(&body).await;
    assert_eq!(
        (retry.status, retry.body["run_id"].as_str()),
        (202, Some(orphan.as_str())),
        "the retry starts the claimed run: {retry:?}"
    );
    let again = n.post(&body).await;
    assert_eq!(
        again.status, 409,
        "once sent, a repeat is a duplicate: {again:?}"
    );
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    a.conclude(
        Scenario {
            id: "25-died-between-claim-and-send",
            title: "Died between claiming a notification and sending its event",
            injected: "a claim of the operation left by an invocation that died before sending; the sender retries",
            runs: awaiting(&orphan),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![n.key.clone()],
        },
        "the retry sent the claimed run's first event (202, same run id); the next repeat was 409; the run finished",
    )
    .await;
}

#[tokio::test]
async fn s26_a_clear_that_outlasts_its_invocation_continues_in_a_new_one() {
    let (a, rows) = world(Spec {
        uat_rows: 3000,
        registry_extra: "limits = { dataverse_batch_size = 250, dataverse_concurrency = 1 }".into(),
        ..Spec::default()
    })
    .await;
    // Each delete takes 2 ms: a 250-row batch half a second, the clear about six seconds, while
    // an invocation of the time-boxed worker lasts its 3 s visibility timeout.
    a.w.sim.set_faults(Faults {
        per_op_latency_ms: 2,
        ..Faults::default()
    });
    let run_id = a.inject(ENV).await;
    let worker = a.drain(&["--time-box"]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    let clear = stage(&run, "clear-dataverse-configs");
    let invocations = clear["attempts"].as_u64().unwrap();
    assert!(invocations >= 3, "the clear handed over: {run}");
    assert_eq!(
        clear["outcome"]["deleted"], 3000,
        "the outcome counts every invocation: {run}"
    );
    a.conclude(
        Scenario {
            id: "26-long-clear-continues",
            title: "A clear that outlasts its invocation",
            injected: "3,000 rows at 2 ms per delete against invocations of 3 s (the worker's time box, as Lambda's deadline)",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "each invocation stopped dispatching before its deadline, drained, recorded and sent its own event again (a fresh message); the run finished with deleted 3000 across the invocations",
    )
    .await;
}

#[tokio::test]
async fn s27_fno_keyed_per_company_paged_with_skip_and_empty_pages() {
    let (a, rows) = world(Spec {
        project_configs: 40,
        fno_shape: (true, true, true),
        registry_extra: "limits = { fno_page_size = 7, fno_batch_size = 5 }\n".into(),
        ..Spec::default()
    })
    .await;
    let run_id = a.inject(ENV).await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(
        stage(&run, "detect-mismatch")["outcome"]["fno_project_configs"],
        40,
        "every page was read, the empty ones' next links followed: {run}"
    );
    let archive = a.store().await.archived(&run_id).await.unwrap();
    let companies: std::collections::HashSet<&str> = archive
        .iter()
        .filter(|r| r.table == "DualWriteProjectConfiguration")
        .filter_map(|r| r.key.split(',').next())
        .collect();
    assert_eq!(
        companies,
        std::collections::HashSet::from(["dataAreaId='demf'", "dataAreaId='usmf'"]),
        "rows are addressed by their whole key"
    );
    assert_eq!(a.w.sim.snapshot().project_configs[ENV], 0);
    a.conclude(
        Scenario {
            id: "27-fno-per-company-key",
            title: "F&O keyed per company, paged with $skip and empty pages",
            injected: "`DualWriteProjectConfiguration` keyed by (dataAreaId, ProjectName) in `$metadata`, each project in two companies, `$skip` next links and an empty page with a next link before every page",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "the key was read from $metadata; all 40 rows (both companies of each project) deleted by their whole key; every page read",
    )
    .await;
}

#[tokio::test]
async fn s28_a_run_record_that_cannot_be_decoded_is_rejected_not_retried() {
    use aws_sdk_dynamodb::types::AttributeValue;

    let (a, _) = world(Spec::default()).await;
    let store = a.store().await;
    let run_id = ulid::Ulid::new().to_string();
    let client = aws_sdk_dynamodb::Client::new(&relink_aws::sdk_config().await);
    let s = |v: String| AttributeValue::S(v);
    for (pk, sk, extra) in [
        (
            format!("ENV#{ENV}"),
            format!("RUN#{run_id}"),
            ("body", "{\"run_id\": "),
        ),
        (
            format!("RUN#{run_id}"),
            "RUN".to_string(),
            ("environment_id", ENV),
        ),
    ] {
        client
            .put_item()
            .table_name(store.table())
            .item("PK", s(pk))
            .item("SK", s(sk))
            .item(extra.0, s(extra.1.to_string()))
            .send()
            .await
            .unwrap();
    }
    a.send_raw(
        Stage::PurgeKeys,
        &format!(r#"{{"environment_id":"{ENV}","run_id":"{run_id}","stage":"purge-keys"}}"#),
    )
    .await;
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    let errors = a.rejected_errors().await;
    assert!(
        errors.len() == 1 && errors[0].contains("unreadable record"),
        "{errors:?}"
    );
    assert_eq!(a.w.sim.snapshot().deleted.values().sum::<usize>(), 0);
    a.conclude(
        Scenario {
            id: "28-undecodable-run-record",
            title: "A run record that cannot be decoded",
            injected: "a purge-keys event for a run whose stored record is truncated JSON",
            runs: vec![],
            rows_expected: 0,
            kept_rows: 0,
            also_secret: vec![],
        },
        "recorded as rejected on its first delivery (a permanent error), nothing in the dead-letter queue, nothing deleted",
    )
    .await;
}

#[tokio::test]
async fn s29_waiting_for_another_runs_lock_uses_up_no_receives() {
    let (a, rows) = world(Spec {
        uat_rows: 4000,
        registry_extra: "limits = { dataverse_batch_size = 500, dataverse_concurrency = 1 }".into(),
        ..Spec::default()
    })
    .await;
    // The first run's clear takes about 20 s; the second run's event waits for it all that
    // time, longer than five receives at the worker's 3 s visibility timeout would last.
    a.w.sim.set_faults(Faults {
        per_op_latency_ms: 5,
        ..Faults::default()
    });
    let first = a.inject(ENV).await;
    let worker = a.worker(&[]);
    common::wait_until("the first run is clearing", || {
        a.w.sim
            .snapshot()
            .deleted
            .get("dataverse/uat")
            .copied()
            .unwrap_or(0)
            > 0
    })
    .await;
    let second = a.inject(ENV).await;
    wait_exit(worker).await;
    let runs = [&first, &second].map(|id| id.to_string());
    let status = a.status_json(&["--run", &second]).await;
    assert_eq!(
        status["status"],
        "skipped",
        "the second run found the link clean: {status}\n{}",
        a.logs()
    );
    a.conclude(
        Scenario {
            id: "29-lock-wait-keeps-receives",
            title: "Waiting for another run's lock",
            injected: "a second run of the same environment while the first run's clear takes about 20 s (over five 3 s visibility timeouts)",
            runs: vec![
                (runs[0].clone(), RunStatus::AwaitingConfirmation),
                (runs[1].clone(), RunStatus::Skipped),
            ],
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "the waiting event came back as delayed copies (none of its receives used), never reached the dead-letter queue, and ran once the first run was done",
    )
    .await;
}

#[tokio::test]
async fn s30_power_platform_paging_that_never_ends_and_unusable_operations() {
    use relink_sim::{PowerPlatformSeed, Seed};

    let (a, rows) = world(Spec {
        registry_extra: "power_platform_environment_id = \"pp-env-30\"\nwatch = { power_platform = true, power_platform_api = \"{sim}/powerplatform\" }\n".into(),
        ..Spec::default()
    })
    .await;
    let now = jiff::Timestamp::now().to_string();
    a.w.sim
        .seed(&Seed {
            power_platform: vec![PowerPlatformSeed {
                environment_id: "pp-env-30".into(),
                operations: vec![
                    serde_json::json!({"operationId": "op-broken", "name": "Restore", "status": "Succeeded", "endTime": "yesterday-ish"}),
                    serde_json::json!({"name": "Copy", "status": "Succeeded", "endTime": now}),
                    serde_json::json!({"operationId": "op-copy-30", "name": "Copy", "status": "Succeeded", "startTime": now, "endTime": now}),
                ],
            }],
            ..Seed::default()
        })
        .unwrap();
    a.w.sim.set_faults(Faults {
        pp_repeat_token: true,
        ..Faults::default()
    });
    let looping = a.relink(&["watch", "--json"]).await;
    assert_eq!(looping.code, 1, "{looping:?}");
    assert!(
        looping.stdout.contains("repeats a continuation token"),
        "{looping:?}"
    );
    assert!(
        a.w.sim.snapshot().page_reads["power-platform"] <= 2,
        "stopped at the first repeated token"
    );
    a.w.sim.set_faults(Faults::default());
    let report = a.relink(&["watch", "--json"]).await;
    assert_eq!(report.code, 0, "{report:?}");
    let report = report.json();
    let started = report["started"].as_array().unwrap();
    assert_eq!(started.len(), 1, "{report}");
    assert_eq!(started[0][2], "op-copy-30");
    assert_eq!(report["skipped"].as_array().unwrap().len(), 2, "{report}");
    let run_id = started[0][1].as_str().unwrap().to_string();
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    a.conclude(
        Scenario {
            id: "30-power-platform-operations",
            title: "Power Platform operations: endless paging, unusable entries",
            injected: "the documented operations list answering the same `continuationToken` forever, then an operation without an id and one with an unreadable `endTime` beside a completed copy",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "the looping list ended with an error after 2 pages (cursor kept); then the copy started one run and the two unusable operations were skipped and reported, not a stall",
    )
    .await;
}

#[tokio::test]
async fn s31_killed_while_telling_the_channels() {
    let (a, rows) = world(Spec::default()).await;
    let teams = with_teams(&a).await;

    let run_id = a.inject(ENV).await;
    // The worker stops once it has claimed the gate's notice, before posting it, and dies.
    a.kill_worker_at("notice-claimed:awaiting-reset").await;
    assert!(
        teams.requests().is_empty(),
        "nothing posted before the kill"
    );
    let worker = a.drain(&[]).await;
    assert_eq!(worker.code, 0, "{worker:?}");
    // A duplicate of the gate's event, delivered later, posts nothing more.
    a.send_raw(
        Stage::ResetLink,
        &format!(r#"{{"environment_id":"{ENV}","run_id":"{run_id}","stage":"reset-link"}}"#),
    )
    .await;
    assert_eq!(a.drain(&[]).await.code, 0);
    assert_eq!(
        teams.requests().len(),
        1,
        "one notice for the gate: {}\n{}",
        a.status_json(&["--run", &run_id]).await,
        a.logs()
            .lines()
            .filter(|l| !l.contains("DEBUG"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let card = teams.bodies()[0].to_string();
    assert!(
        card.contains(&run_id) && card.contains("Reset link"),
        "{card}"
    );
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(run["notices"][0]["key"], "awaiting-reset", "{run}");
    assert_eq!(run["notices"].as_array().unwrap().len(), 1, "{run}");
    a.conclude(
        Scenario {
            id: "31-killed-while-notifying",
            title: "SIGKILL while telling the channels about the gate",
            injected: "worker SIGKILLed after claiming the gate's Teams notice, before posting it; then a duplicate of the gate's event",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![teams.url.clone()],
        },
        "the redelivered event found the claimed notice unsent and posted it: one Teams message for the gate, recorded on the run; the duplicate posted nothing",
    )
    .await;
}

/// Gives ENV a Teams channel (a local receiver, its URL in a secret as in AWS) and pushes it.
async fn with_teams(a: &AwsWorld) -> common::Receiver {
    let teams = common::Receiver::start(202).await;
    let arn = common::aws::local_secret("relink-test/teams", &teams.url).await;
    let text = std::fs::read_to_string(&a.w.config).unwrap();
    let header = format!("[environments.{ENV}]\n");
    let text = text.replace(
        &header,
        &format!("{header}notify = {{ teams = {{ secret_arn = \"{arn}\" }} }}\n"),
    );
    std::fs::write(&a.w.config, text).unwrap();
    assert_eq!(a.relink(&["env", "push", ENV]).await.code, 0);
    teams
}

/// A world whose environment checks an awaited Reset every second and tells a Teams receiver:
/// the world, its row count and the receiver.
async fn checked_world() -> (AwsWorld, usize, common::Receiver) {
    let (a, rows) = world(Spec {
        registry_extra:
            "verify = { every_seconds = 1, give_up_after_seconds = 600, remind_every_seconds = 0 }"
                .into(),
        ..Spec::default()
    })
    .await;
    let teams = with_teams(&a).await;
    (a, rows, teams)
}

/// The Teams receiver was told about the gate, then the success, and nothing else.
fn assert_told_gate_and_success(teams: &common::Receiver, run: &serde_json::Value) {
    let told: Vec<String> = teams
        .bodies()
        .iter()
        .map(|card| {
            card["attachments"][0]["content"]["body"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        told,
        [
            format!("relink: Reset link needed for {ENV}"),
            format!("relink: link verified for {ENV}")
        ],
        "{run}"
    );
}

#[tokio::test]
async fn s32_the_check_of_an_awaited_reset_delivered_twice() {
    let (a, rows, teams) = checked_world().await;
    let run_id = a.inject(ENV).await;
    assert_eq!(a.drain(&[]).await.code, 0);
    a.w.sim.reset_link(ENV).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The watcher's check, a copy of it (an operator's rerun), and every batch handed over twice.
    let watch = a.relink(&["watch", "--json"]).await;
    assert_eq!(
        watch.json()["rechecks"].as_array().unwrap().len(),
        1,
        "{watch:?}"
    );
    a.send_raw(
        Stage::ResetLink,
        &format!(r#"{{"environment_id":"{ENV}","run_id":"{run_id}","stage":"reset-link"}}"#),
    )
    .await;
    assert_eq!(a.drain(&["--deliver-twice"]).await.code, 0);
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(stage(&run, "reset-link")["outcome"]["checks"], 1, "{run}");
    assert_told_gate_and_success(&teams, &run);
    assert_eq!(run["notices"].as_array().unwrap().len(), 2, "{run}");
    a.conclude(
        Scenario {
            id: "32-recheck-delivered-twice",
            title: "The check of an awaited Reset delivered four times at once",
            injected: "after the Reset, the watcher's check plus a hand-sent copy, each handed to two handlers concurrently",
            runs: vec![(run_id.clone(), RunStatus::Succeeded)],
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![teams.url.clone()],
        },
        "one delivery verified the link (checks = 1) and ended the run succeeded; the others found it checked or finished and did nothing: one Teams message for the gate and one for the success",
    )
    .await;
}

#[tokio::test]
async fn s33_the_reset_happens_while_a_check_is_in_flight() {
    let (a, rows, teams) = checked_world().await;
    let run_id = a.inject(ENV).await;
    assert_eq!(a.drain(&[]).await.code, 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let watch = a.relink(&["watch", "--json"]).await;
    assert_eq!(
        watch.json()["rechecks"].as_array().unwrap().len(),
        1,
        "{watch:?}"
    );
    // The check holds the run and is frozen before it reads the link; the operator presses
    // Reset now, and the watcher polls meanwhile.
    let frozen = a.stop_worker_at("verifying:reset-link").await;
    a.w.sim.reset_link(ENV).unwrap();
    let during = a.relink(&["watch", "--json"]).await.json();
    assert_eq!(
        during["rechecks"],
        serde_json::json!([]),
        "no second check of a run being checked: {during}"
    );
    let pid = frozen.id().unwrap().to_string();
    let cont = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert!(cont.success());
    wait_exit(frozen).await;
    assert_eq!(a.drain(&[]).await.code, 0);
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(stage(&run, "reset-link")["outcome"]["checks"], 1, "{run}");
    assert_told_gate_and_success(&teams, &run);
    a.conclude(
        Scenario {
            id: "33-reset-during-a-check",
            title: "The operator resets the link while a check is in flight",
            injected: "the scheduled check frozen (SIGSTOP) after taking the run, the simulated Reset and a watcher poll meanwhile, then SIGCONT",
            runs: vec![(run_id.clone(), RunStatus::Succeeded)],
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![teams.url.clone()],
        },
        "the watcher sent no second check while the run was held; the resumed check read the rebuilt link and ended the run succeeded: one message for the gate, one for the success, no run finished twice",
    )
    .await;
}

#[tokio::test]
async fn s34_killed_between_asking_the_maps_to_stop_and_their_stop() {
    let (a, rows) = world(Spec::default()).await;
    a.sign_in_for_gateway().await;
    let run_id = a.inject(ENV).await;
    a.kill_worker_at("gateway-stop:requested").await;
    assert_eq!(a.w.sim.snapshot().gateway_resets, 0);
    assert_eq!(a.drain(&[]).await.code, 0);
    let run = a.status_json(&["--run", &run_id]).await;
    let snap = a.w.sim.snapshot();
    assert_eq!(snap.gateway_resets, 1, "one Reset: {run}");
    a.conclude(
        Scenario {
            id: "34-killed-while-maps-stop",
            title: "SIGKILL between asking the gateway to stop the maps and their stop",
            injected: "worker SIGKILLed right after the gateway took the stop request (gateway reset mode)",
            runs: vec![(run_id.clone(), RunStatus::Succeeded)],
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        &format!(
            "the redelivered event found the maps stopped (or asked again for those still running: {} stop request(s) in all), then asked for one Reset, and the link verified: succeeded",
            snap.gateway_stops
        ),
    )
    .await;
}

#[tokio::test]
async fn s35_killed_between_asking_for_the_reset_and_its_end() {
    let (a, rows) = world(Spec::default()).await;
    a.sign_in_for_gateway().await;
    let run_id = a.inject(ENV).await;
    a.kill_worker_at("gateway-reset:requested").await;
    assert_eq!(a.w.sim.snapshot().gateway_resets, 1);
    assert_eq!(a.drain(&[]).await.code, 0);
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(
        a.w.sim.snapshot().gateway_resets,
        1,
        "no second Reset after the crash: {run}"
    );
    let requests = stage(&run, "reset-link")["outcome"]["gateway_requests"].to_string();
    assert!(requests.contains("asked_before"), "{requests}");
    a.conclude(
        Scenario {
            id: "35-killed-while-the-reset-runs",
            title: "SIGKILL between asking the gateway for the Reset and its end",
            injected: "worker SIGKILLed right after the gateway accepted the Reset (gateway reset mode)",
            runs: vec![(run_id.clone(), RunStatus::Succeeded)],
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "the claim taken before the Reset told the redelivered event it had been asked for: no second Reset was sent; it waited for the link, which verified: succeeded",
    )
    .await;
}

#[tokio::test]
async fn s36_a_handler_panics_and_the_worker_goes_on() {
    let (a, rows) = world(Spec::default()).await;
    let run_id = a.inject(ENV).await;
    // The purge-keys handler panics once, after recording its stage and before sending the next
    // event: as the Lambda runtime does, the worker fails that invocation, keeps polling, and
    // the message comes back after its visibility timeout.
    let worker = a.worker_with(
        &[],
        &[("RELINK_FAILPOINT", "panic-once:stage-recorded:purge-keys")],
    );
    wait_exit(worker).await;
    let logs = a.logs();
    assert_eq!(
        logs.matches("the handler panicked").count(),
        1,
        "the panic was caught and logged once"
    );
    let run = a.status_json(&["--run", &run_id]).await;
    assert_eq!(stage(&run, "purge-keys")["attempts"], 1, "{run}");
    a.conclude(
        Scenario {
            id: "36-a-handler-panics",
            title: "A stage handler panics",
            injected: "the purge-keys handler panics once, after recording its stage and before sending the next event (failpoint panic-once)",
            runs: awaiting(&run_id),
            rows_expected: rows,
            kept_rows: 0,
            also_secret: vec![],
        },
        "the worker caught the panic as the Lambda runtime does (one invocation failed, logged), kept polling every queue; the message came back and sent the missing next event: the run reached the gate with purge-keys run once",
    )
    .await;
}
