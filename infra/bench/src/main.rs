//! `relink-bench`: measures relink against the simulators and writes docs/BENCHMARKS.md.
//!
//! `cargo run --release -p relink-bench -- clear` clears N Dataverse runtime-config rows twice,
//! in child processes so each has its own peak RSS: once through relink's clear stage (paged
//! reads, archive, `$batch` deletes of 1,000 with bounded concurrency), once with a naive loop
//! of one `DELETE` per row. The simulator adds a fixed latency to every request.
//!
//! `cargo run -p relink-bench -- reliability [--check]` writes (or checks) docs/RELIABILITY.md
//! from the reliability suite's reports.

mod reliability;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use relink_shared::http::token::EntraTokens;
use relink_shared::http::{Http, HttpConnector, RetryPolicy};
use relink_shared::model::{Run, RunOptions, Trigger};
use relink_shared::ports::{Connector, TokenSource};
use relink_shared::progress::{Progress, ProgressSink};
use relink_shared::registry::{EnvConfig, Registry, Secret};
use relink_shared::stages::{self, ManualReset, StageCtx};
use relink_shared::store_sqlite::SqliteStore;
use relink_sim::{AppSeed, Faults, OrgSeed, Seed, Sim};
use serde::{Deserialize, Serialize};

const CLIENT: &str = "33333333-3333-3333-3333-333333333333";
const SECRET: &str = "bench-secret";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Clear N rows with relink and with a naive loop; write docs/BENCHMARKS.md.
    Clear {
        #[arg(long, default_value_t = 50_000)]
        rows: usize,
        /// Latency the simulator adds to every request.
        #[arg(long, default_value_t = 10)]
        latency_ms: u64,
        /// Rows the naive loop deletes (its time is per row, so a sample can be extrapolated).
        #[arg(long)]
        naive_rows: Option<usize>,
        /// Where to write the report.
        #[arg(long, default_value = "docs/BENCHMARKS.md")]
        out: PathBuf,
    },
    /// Write docs/RELIABILITY.md from the reliability suite's reports (or check it matches them).
    Reliability {
        /// Where the suite wrote its reports.
        #[arg(long, default_value = "target/reliability")]
        reports: PathBuf,
        #[arg(long, default_value = "docs/RELIABILITY.md")]
        out: PathBuf,
        /// Fail if the page differs from the reports instead of writing it.
        #[arg(long)]
        check: bool,
    },
    /// (internal) One measured client run, in its own process.
    Child {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        base: String,
        #[arg(long)]
        rows: usize,
        #[arg(long)]
        dir: PathBuf,
    },
}

/// What one child measured.
#[derive(Debug, Serialize, Deserialize)]
struct Figures {
    mode: String,
    rows_deleted: usize,
    seconds: f64,
    peak_rss_kb: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Cmd::Reliability {
        reports,
        out,
        check,
    } = &cli.command
    {
        return reliability::run(reports, out, *check);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Clear {
            rows,
            latency_ms,
            naive_rows,
            out,
        } => rt.block_on(clear(rows, latency_ms, naive_rows.unwrap_or(rows), &out)),
        Cmd::Child {
            mode,
            base,
            rows,
            dir,
        } => {
            let f = rt.block_on(child(&mode, &base, rows, &dir))?;
            println!("{}", serde_json::to_string(&f)?);
            Ok(())
        }
        Cmd::Reliability { .. } => unreachable!("handled above"),
    }
}

fn registry(base: &str) -> Result<Registry> {
    let text = format!(
        "[environments.bench]\nkind = \"sandbox\"\nfno_url = \"{base}/fno/bench\"\ndataverse_url = \"{base}/dataverse/bench\"\n\
         dataverse_unique_name = \"orgbench\"\ntenant_id = \"bench\"\nclient_id = \"{CLIENT}\"\nclient_secret = {{ env = \"BENCH\" }}\n\
         authority = \"{base}\"\nallow_insecure_http = true\n"
    );
    Ok(Registry::parse(&text, |_| Some(SECRET.to_string()))?)
}

struct Quiet;
impl ProgressSink for Quiet {
    fn emit(&self, _: Progress) {}
}

async fn child(mode: &str, base: &str, rows: usize, dir: &Path) -> Result<Figures> {
    let registry = registry(base)?;
    let env = registry.get("bench")?.clone();
    let http = Arc::new(Http::new(RetryPolicy::default(), Arc::new(Quiet))?);
    let started = Instant::now();
    let deleted = match mode {
        "relink" => relink_clear(&env, http, dir).await?,
        "naive" => naive_clear(&env, http, rows).await?,
        other => bail!("unknown mode {other}"),
    };
    Ok(Figures {
        mode: mode.into(),
        rows_deleted: deleted,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_kb: peak_rss_kb(),
    })
}

/// relink's own path: the clear stage with archive-before-delete into a SQLite store.
async fn relink_clear(env: &EnvConfig, http: Arc<Http>, dir: &Path) -> Result<usize> {
    let connector = HttpConnector::new(http);
    let dataverse = connector.dataverse(env)?;
    let fno = connector.fno(env)?;
    let store = SqliteStore::open(&dir.join("bench.db"))?;
    let run = Run::new(
        ulid::Ulid::new().to_string(),
        env.id.clone(),
        RunOptions::default(),
        Trigger::default(),
    );
    let ctx = StageCtx {
        env,
        run: &run,
        store: &store,
        dataverse: dataverse.as_ref(),
        fno: fno.as_ref(),
        reset: &ManualReset,
        sink: &Quiet,
    };
    let report = stages::clear_configs(&ctx).await?;
    Ok(report.outcome["deleted"].as_u64().unwrap_or(0) as usize)
}

/// The naive loop: read ids, then one DELETE request per row, one after another.
async fn naive_clear(env: &EnvConfig, http: Arc<Http>, rows: usize) -> Result<usize> {
    let tokens = EntraTokens::new(
        http.clone(),
        &env.authority,
        &env.tenant_id,
        &env.client_id,
        Secret::new(SECRET),
    );
    let scope = EnvConfig::scope_for(&env.dataverse_url);
    let token = tokens.token(&scope).await?;
    let api = env.dataverse_api();
    let client = reqwest::Client::new();
    let mut deleted = 0;
    while deleted < rows {
        let page: serde_json::Value = client
            .get(api.join("msdyn_dualwriteruntimeconfigs?$select=msdyn_dualwriteruntimeconfigid")?)
            .bearer_auth(&token)
            .header("Prefer", "odata.maxpagesize=5000")
            .send()
            .await?
            .json()
            .await?;
        let ids: Vec<String> = page["value"]
            .as_array()
            .context("value")?
            .iter()
            .filter_map(|r| {
                r["msdyn_dualwriteruntimeconfigid"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        if ids.is_empty() {
            break;
        }
        for id in ids.into_iter().take(rows - deleted) {
            let resp = client
                .delete(api.join(&format!("msdyn_dualwriteruntimeconfigs({id})"))?)
                .bearer_auth(&token)
                .send()
                .await?;
            if resp.status().as_u16() != 204 {
                bail!("naive delete answered {}", resp.status());
            }
            deleted += 1;
        }
    }
    Ok(deleted)
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Measured {
    figures: Figures,
    requests: usize,
    batches: usize,
    page_reads: usize,
    single_deletes: usize,
}

async fn measure(sim: &Sim, mode: &str, rows: usize, dir: &Path) -> Result<Measured> {
    sim.seed(&Seed {
        apps: vec![AppSeed {
            client_id: CLIENT.into(),
            client_secret: SECRET.into(),
        }],
        organizations: vec![OrgSeed {
            name: "bench".into(),
            unique_name: "orgbench".into(),
            organization_id: None,
            friendly_name: None,
            integrated_fno: None,
            runtime_configs: rows,
        }],
        ..Seed::default()
    })
    .map_err(anyhow::Error::msg)?;
    let before = sim.snapshot();
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(exe)
        .args([
            "child",
            "--mode",
            mode,
            "--base",
            sim.base_url(),
            "--rows",
            &rows.to_string(),
            "--dir",
        ])
        .arg(dir)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "{mode} child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let figures: Figures = serde_json::from_slice(&out.stdout)?;
    let after = sim.snapshot();
    let delta = |f: fn(&relink_sim::Snapshot) -> usize| f(&after) - f(&before);
    Ok(Measured {
        figures,
        requests: delta(|s| s.requests),
        batches: delta(|s| s.batch_requests.get("dataverse").copied().unwrap_or(0)),
        page_reads: delta(|s| s.page_reads.get("dataverse").copied().unwrap_or(0)),
        single_deletes: delta(|s| s.single_deletes),
    })
}

async fn clear(rows: usize, latency_ms: u64, naive_rows: usize, out: &Path) -> Result<()> {
    let sim = Sim::start(([127, 0, 0, 1], 0).into()).await?;
    sim.set_faults(Faults {
        latency_ms,
        ..Faults::default()
    });
    let dir = std::env::temp_dir().join(format!("relink-bench-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir)?;
    eprintln!("relink: clearing {rows} rows with {latency_ms} ms per request...");
    let relink = measure(&sim, "relink", rows, &dir).await?;
    eprintln!("naive: deleting {naive_rows} rows one request each...");
    let naive = measure(&sim, "naive", naive_rows, &dir).await?;
    std::fs::remove_dir_all(&dir).ok();
    if relink.figures.rows_deleted != rows || naive.figures.rows_deleted != naive_rows {
        bail!(
            "incomplete: relink deleted {}, naive {}",
            relink.figures.rows_deleted,
            naive.figures.rows_deleted
        );
    }
    let naive_per_row = naive.figures.seconds / naive_rows as f64;
    let naive_full = naive_per_row * rows as f64;
    let ratio = naive_full / relink.figures.seconds;
    let min_batches = rows.div_ceil(1000);
    let extrapolated = if naive_rows == rows {
        String::new()
    } else {
        format!(
            " (measured on {naive_rows} rows, {:.2} ms per row, extrapolated)",
            naive_per_row * 1000.0
        )
    };
    let report = format!(
        "## Clearing {rows} Dataverse rows: relink vs a naive loop\n\n\
         Command: `cargo run --release -p relink-bench -- clear --rows {rows} --latency-ms {latency_ms}{naive_arg}`\n\n\
         Simulator latency: {latency_ms} ms per request. Machine: {machine}. Run: {when}.\n\n\
         | path | rows | wall time | requests | `$batch` requests | page reads | single DELETEs | peak RSS |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n\
         | relink (archive, then `$batch` of 1,000, 4 in flight) | {rows} | {rt:.2} s | {rr} | {rb} (minimum {min_batches}) | {rp} | {rs} | {rm:.1} MB |\n\
         | naive (one DELETE per row, sequential) | {naive_rows} | {nt:.2} s{extrapolated} | {nr} | {nb} | {np} | {ns} | {nm:.1} MB |\n\n\
         Wall-time ratio, naive / relink, for {rows} rows: **{ratio:.0}x**. relink also archives every row to SQLite before deleting it; the naive loop archives nothing.\n",
        naive_arg = if naive_rows == rows {
            String::new()
        } else {
            format!(" --naive-rows {naive_rows}")
        },
        machine = machine(),
        when = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC"),
        rt = relink.figures.seconds,
        rr = relink.requests,
        rb = relink.batches,
        rp = relink.page_reads,
        rs = relink.single_deletes,
        rm = relink.figures.peak_rss_kb as f64 / 1024.0,
        nt = naive.figures.seconds,
        nr = naive.requests,
        nb = naive.batches,
        np = naive.page_reads,
        ns = naive.single_deletes,
        nm = naive.figures.peak_rss_kb as f64 / 1024.0,
    );
    write_section(out, "clear", &report)?;
    println!("{report}");
    Ok(())
}

/// Replaces (or appends) one generated section of the report, keeping the others.
fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let begin = format!("<!-- bench:{name}:begin -->");
    let end = format!("<!-- bench:{name}:end -->");
    let current = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# Benchmarks\n\nGenerated by `relink-bench` (infra/bench); every figure comes from one run of the command shown with it. \
         Benchmarks are not tests: they measure, they do not assert.\n"
            .into()
    });
    let block = format!("{begin}\n{body}{end}\n");
    let next = match (current.find(&begin), current.find(&end)) {
        (Some(b), Some(e)) => format!(
            "{}{block}{}",
            &current[..b],
            current[e + end.len()..].trim_start_matches('\n')
        ),
        _ => format!("{}\n{block}", current.trim_end()),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, next)?;
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cores} cores, {cpu}")
}
