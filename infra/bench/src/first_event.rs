//! The cold *first event*: time from spawning a stage function's `bootstrap` to its response to
//! the first SQS event, which is already waiting (as on an on-demand cold start), against the
//! local stack and the simulators. Two events per stage function: a duplicate delivery (a run
//! that already ended: answered from the run record) and a real first delivery (the stage runs
//! against the simulators and sends the next event). Each start-up shape the functions support
//! is measured, interleaved, beside a minimal SDK Lambda (`bench-sdk`: client built in `main`,
//! one `GetItem`) built with the same profile. A counting proxy in front of the local stack
//! tells how many AWS calls a duplicate costs.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use relink_aws::dynamo::DynamoStore;
use relink_aws::stack;
use relink_core::model::{Run, RunOptions, RunStatus, Stage, StageStatus, Trigger};
use relink_core::ports::ProgressStore;
use relink_sim::Sim;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::coldstart::{percentile, spawn_bootstrap};
use crate::pipeline::{app_secret, registry_entry};

/// How the start-up shapes compared when the functions still had them (the measurement that
/// chose building in `main`), kept on the page with the figures of every later run.
const SHAPES_MEASURED: &str = "Start-up shape: on 2026-11-28, before the other two shapes were removed (20 runs per cell, same machine and \
    method) the functions could also build their clients on a background task while the runtime polls (then the \
    default) or on the first invocation. Duplicate medians, background / first invocation / in `main`: detect-mismatch \
    15.25 / 15.08 / 15.15 ms, purge-keys 15.13 / 14.91 / 15.15 ms, clear-dataverse-configs 16.12 / 15.05 / 15.47 ms, \
    reset-link 15.68 / 16.00 / 15.36 ms (baseline 14.20 ms); first deliveries of detect-mismatch 137.2 / 118.1 / 98.9 ms. \
    On an on-demand cold start the event is already waiting, so the background task bought nothing on the first event; \
    relink kept the plain shape (clients built in `main`, then the runtime) and removed the other two.";
/// The minimal SDK Lambda.
const BASELINE: &str = "bench-sdk";

/// What the benchmark set up in the local stack.
struct Bench {
    store: DynamoStore,
    sim: Sim,
    secret_arn: String,
    env: Vec<(String, String)>,
}

impl Bench {
    /// A registry entry (and its simulated Dataverse and F&O) for one measured environment.
    async fn environment(&self, id: &str) -> Result<()> {
        crate::pipeline::seed(&self.sim, &[id.to_string()])?;
        self.store
            .put_entry(id, &registry_entry(&self.sim, id, &self.secret_arn))
            .await?;
        Ok(())
    }

    /// The SQS event of one stage event for `env`; for any stage but the first, the run is
    /// stored first with the stages before it done (`ended`: the whole run is over).
    async fn event(&self, env: &str, stage: Stage, ended: bool) -> Result<String> {
        let run_id = ulid::Ulid::new().to_string();
        if ended || stage != Stage::DetectMismatch {
            let mut run = Run::new(
                run_id.clone(),
                env.into(),
                RunOptions::default(),
                Trigger::default(),
            );
            run.set_status(RunStatus::Running)?;
            for earlier in Stage::ALL.into_iter().take_while(|s| *s != stage) {
                run.set_stage(earlier, StageStatus::Running)?;
                run.set_stage(earlier, StageStatus::Succeeded)?;
            }
            if ended {
                run.set_status(RunStatus::Skipped)?;
            }
            self.store.create_run(&run).await?;
        }
        let body =
            serde_json::json!({"environment_id": env, "run_id": run_id, "stage": stage.as_str()});
        Ok(serde_json::json!({"Records": [{
            "messageId": ulid::Ulid::new().to_string(),
            "receiptHandle": "bench",
            "body": body.to_string(),
            "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": jiff::Timestamp::now().as_millisecond().to_string()},
            "messageAttributes": {},
            "md5OfBody": "",
            "eventSource": "aws:sqs",
            "eventSourceARN": format!("arn:aws:sqs:us-east-1:000000000000:{}", stage.as_str()),
            "awsRegion": "us-east-1",
        }]})
        .to_string())
    }
}

/// Measures every stage function `runs` times per shape and event; returns the report section.
pub async fn run(lambda_dir: &Path, runs: usize) -> Result<String> {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").context(
        "the first-event benchmark needs the local stack: run it through infra/scripts/bench.sh (it starts moto and sets AWS_ENDPOINT_URL)",
    )?;
    let config = relink_aws::sdk_config().await;
    let ddb = aws_sdk_dynamodb::Client::new(&config);
    let sqs = aws_sdk_sqs::Client::new(&config);
    let id = ulid::Ulid::new().to_string().to_lowercase();
    let table = format!("bench-first-{id}");
    stack::create_table(&ddb, &table).await?;
    let next_queue = sqs
        .create_queue()
        .queue_name(format!("bench-first-{id}-next"))
        .send()
        .await?
        .queue_url()
        .context("queue url")?
        .to_string();
    let secret_arn = app_secret(
        &aws_sdk_secretsmanager::Client::new(&config),
        &format!("relink-bench-first/{id}"),
    )
    .await?;
    let sim = Sim::start(([127, 0, 0, 1], 0).into()).await?;
    let env: Vec<(String, String)> = [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("RELINK_TABLE", table.as_str()),
        ("NEXT_QUEUE_URL", next_queue.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let bench = Bench {
        store: DynamoStore::new(ddb, &table),
        sim,
        secret_arn,
        env,
    };
    let arch = if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "x86_64"
    };
    let path = |name: &str| lambda_dir.join(arch).join(name).join("bootstrap");

    // The baseline reads one item that exists.
    let dup_env = "bench-dup";
    bench.environment(dup_env).await?;
    let probe = Run::new(
        ulid::Ulid::new().to_string(),
        dup_env.into(),
        RunOptions::default(),
        Trigger::default(),
    );
    bench.store.create_run(&probe).await?;
    let mut baseline_env = bench.env.clone();
    baseline_env.push(("BENCH_PK".into(), format!("ENV#{dup_env}")));
    baseline_env.push(("BENCH_SK".into(), format!("RUN#{}", probe.run_id)));

    let mut baseline = Vec::new();
    // Per stage: samples of duplicates and of first deliveries.
    let mut dup = vec![Vec::new(); Stage::ALL.len()];
    let mut first = vec![Vec::new(); Stage::ALL.len()];
    for round in 0..runs {
        let event = bench.event(dup_env, Stage::DetectMismatch, true).await?;
        baseline.push(first_event(&path(BASELINE), &baseline_env, &event).await?);
        for (i, stage) in Stage::ALL.into_iter().enumerate() {
            let bin = path(stage.as_str());
            let event = bench.event(dup_env, stage, true).await?;
            dup[i].push(
                first_event(&bin, &bench.env, &event)
                    .await
                    .with_context(|| format!("duplicate for {stage}"))?,
            );
            let fresh = format!("first-{i}-{round:03}");
            bench.environment(&fresh).await?;
            let event = bench.event(&fresh, stage, false).await?;
            first[i].push(
                first_event(&bin, &bench.env, &event)
                    .await
                    .with_context(|| format!("first delivery for {stage}"))?,
            );
        }
    }
    // The AWS calls of one duplicate delivery, through a counting proxy.
    let calls = {
        let proxy = CountingProxy::start(&endpoint).await?;
        let mut env = bench.env.clone();
        env.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
        env.push(("AWS_ENDPOINT_URL".into(), proxy.url.clone()));
        let event = bench.event(dup_env, Stage::DetectMismatch, true).await?;
        first_event(&path(Stage::DetectMismatch.as_str()), &env, &event).await?;
        proxy.calls()
    };

    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let base = percentile(&baseline, 0.5);
    let ratio = |d: Duration| d.as_secs_f64() / base.as_secs_f64();
    let mut rows = String::new();
    let mut worst: f64 = 0.0;
    for (i, stage) in Stage::ALL.into_iter().enumerate() {
        let (d, f) = (percentile(&dup[i], 0.5), percentile(&first[i], 0.5));
        worst = worst.max(ratio(d));
        rows.push_str(&format!(
            "| {stage} | {} | {} | **{:.2}x** | {} | {:.2}x |\n",
            ms(d),
            ms(percentile(&dup[i], 0.9)),
            ratio(d),
            ms(f),
            ratio(f)
        ));
    }
    Ok(format!(
        "## Cold first event\n\n\
         Command: part of `bash infra/scripts/bench.sh`; alone (after it built the functions and `bench-sdk`, with the local \
         stack): `cargo run --profile measure -p relink-bench -- first-event`.\n\n\
         Time from spawning the {arch} `bootstrap` to its response to the first SQS event, which the Runtime API served by \
         relink-bench hands out at the first poll (on an on-demand cold start the event is already waiting), against moto on \
         127.0.0.1 over plain HTTP and the simulators. **Duplicate**: a delivery for a run that already ended, answered from \
         the run record. **First delivery**: the stage really runs (registry entry, lock, secret, token, Dataverse / F&O \
         calls, archive, next event sent). Baseline: `bench-sdk`, a minimal SDK Lambda built with the same profile that \
         builds its DynamoDB client in `main` and does one `GetItem` per event: median **{}** (p90 {}). {runs} runs per \
         cell, interleaved.\n\n\
         A duplicate costs **{} AWS call(s)** ({}), counted by a proxy in front of the local stack. Worst duplicate: \
         **{worst:.2}x** the baseline (target: at most 1.5x).\n\n\
         | function | duplicate: median | p90 | / baseline | first delivery: median | / baseline |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n{rows}\n{SHAPES_MEASURED}\n\n",
        ms(base),
        ms(percentile(&baseline, 0.9)),
        calls.len(),
        if calls.is_empty() {
            "none".to_string()
        } else {
            calls.join(", ")
        },
    ))
}

/// A TCP proxy to the local stack that records each request's `x-amz-target` (the API call).
struct CountingProxy {
    url: String,
    calls: Arc<Mutex<Vec<String>>>,
}

impl CountingProxy {
    async fn start(upstream: &str) -> Result<CountingProxy> {
        let target = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let calls: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = calls.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (target, seen) = (target.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut carry = String::new();
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            carry.push_str(&String::from_utf8_lossy(&buf[..n]));
                            let mut lines: Vec<&str> = carry.split("\r\n").collect();
                            let rest = lines.pop().unwrap_or_default().to_string();
                            for line in lines {
                                if let Some((k, v)) = line.split_once(':')
                                    && k.eq_ignore_ascii_case("x-amz-target")
                                {
                                    seen.lock().unwrap().push(v.trim().to_string());
                                }
                            }
                            carry = rest;
                        }
                    };
                    let down = tokio::io::copy(&mut sr, &mut cw);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Ok(CountingProxy { url, calls })
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

/// Time from spawning `path` to its response to the first invocation: the Runtime API served
/// here hands out `event` on the first `GET .../invocation/next` and waits for
/// `POST .../invocation/{id}/response`. What a cold start costs when the event is already
/// waiting, as it is on an on-demand cold start.
pub async fn first_event(path: &Path, env: &[(String, String)], event: &str) -> Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let api = listener.local_addr()?.to_string();
    let (started, mut child) = spawn_bootstrap(path, &api, env)?;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Result<Duration, String>>(4);
    let served = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let event = std::sync::Arc::new(event.to_string());
    let accept = tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            let (done_tx, served, event) = (done_tx.clone(), served.clone(), event.clone());
            tokio::spawn(async move {
                serve_runtime(conn, started, &done_tx, &served, &event)
                    .await
                    .ok();
            });
        }
    });
    let outcome = tokio::time::timeout(Duration::from_secs(20), done_rx.recv()).await;
    accept.abort();
    child.start_kill().ok();
    let status = child.wait_with_output().await?;
    match outcome {
        Ok(Some(Ok(d))) => Ok(d),
        Ok(Some(Err(e))) => bail!("the function reported an error: {e}"),
        _ => bail!(
            "no response to the first event within 20 s; stderr: {}",
            String::from_utf8_lossy(&status.stderr)
        ),
    }
}

/// One Runtime API connection: requests one after another (keep-alive).
async fn serve_runtime(
    mut conn: tokio::net::TcpStream,
    started: Instant,
    done: &tokio::sync::mpsc::Sender<Result<Duration, String>>,
    served: &std::sync::atomic::AtomicBool,
    event: &str,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
        buf.drain(..head_end + length);
        if head.starts_with("GET /2018-06-01/runtime/invocation/next") {
            if served.swap(true, std::sync::atomic::Ordering::SeqCst) {
                // Only one event: the next poll waits until the process is killed.
                std::future::pending::<()>().await;
            }
            let deadline = jiff::Timestamp::now().as_millisecond() + 60_000;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 lambda-runtime-aws-request-id: bench-1\r\nlambda-runtime-deadline-ms: {deadline}\r\n\
                 lambda-runtime-invoked-function-arn: arn:aws:lambda:us-east-1:000000000000:function:bench\r\n\
                 lambda-runtime-trace-id: Root=1-00000000-000000000000000000000000\r\n\
                 content-length: {}\r\n\r\n{event}",
                event.len()
            );
            conn.write_all(response.as_bytes()).await?;
        } else if head.starts_with("POST /2018-06-01/runtime/invocation/bench-1/response") {
            let elapsed = started.elapsed();
            conn.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                .await?;
            // Only a handled event counts: an SQS batch answer with nothing to retry.
            let handled = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v.get("batchItemFailures")
                        .and_then(|f| f.as_array())
                        .map(Vec::len)
                })
                == Some(0);
            let outcome = if handled { Ok(elapsed) } else { Err(body) };
            done.send(outcome).await.ok();
        } else if head.starts_with("POST ") {
            conn.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                .await?;
            done.send(Err(format!("{} {body}", head.lines().next().unwrap_or(""))))
                .await
                .ok();
        } else {
            conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await?;
        }
    }
}
