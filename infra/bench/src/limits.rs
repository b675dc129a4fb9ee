//! Clearing 10k, 50k and 100k Dataverse rows under the service protection limits, enforced by
//! the simulator as Dataverse does (sliding window; a `$batch` is one request but each
//! operation's execution time counts; 52 concurrent), scaled in time by [`SCALE`] so the largest
//! run takes about a minute, with a fixed execution cost per delete. The client paces itself from
//! the headers the simulator sends (`x-ms-dop-hint`, `x-ms-ratelimit-*`). Each run is a child
//! process against a fresh simulator (a fresh window), so its peak RSS is its own.

use anyhow::{Result, bail};
use relink_sim::{Faults, Protection, Sim};

use crate::{Measured, measure};

/// The limits' window and budgets are divided by this (300 s -> 30 s, 1,200 s -> 120 s).
pub const SCALE: u64 = 10;
/// Server execution time of one delete.
pub const PER_DELETE_MS: u64 = 2;
/// Rows cleared by relink.
pub const SIZES: [usize; 3] = [10_000, 50_000, 100_000];
/// Rows the naive loop deletes (its rate is set by the request limit, so a sample suffices).
pub const NAIVE_ROWS: usize = 1_200;

/// Rows per second the limits allow: the execution budget per second of window divided by the
/// cost of one delete (the request budget, 1,000 deletes per request, is far above it).
pub fn max_rate(p: &Protection) -> f64 {
    let exec_per_sec = p.execution_ms as f64 / p.window_ms as f64;
    let by_execution = exec_per_sec * 1000.0 / PER_DELETE_MS as f64;
    let by_requests = p.requests as f64 / (p.window_ms as f64 / 1000.0) * 1000.0;
    by_execution.min(by_requests)
}

/// The fewest requests that can clear `rows`: full batches of 1,000, pages of 5,000, and the
/// read that finds the table empty.
pub fn min_requests(rows: usize) -> usize {
    rows.div_ceil(1000) + rows.div_ceil(5000) + 1
}

async fn fresh_sim() -> Result<Sim> {
    let sim = Sim::start(([127, 0, 0, 1], 0).into()).await?;
    sim.set_faults(Faults {
        per_op_latency_ms: PER_DELETE_MS,
        protection: Some(Protection::scaled(SCALE)),
        ..Faults::default()
    });
    Ok(sim)
}

/// Runs the measurements and returns the report section.
pub async fn run() -> Result<String> {
    let p = Protection::scaled(SCALE);
    let rate = max_rate(&p);
    let dir = std::env::temp_dir().join(format!("relink-bench-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir)?;
    let mut rows_md = String::new();
    let mut largest: Option<(usize, Measured)> = None;
    for rows in SIZES {
        eprintln!("limits: relink clears {rows} rows...");
        let sim = fresh_sim().await?;
        let m = measure(&sim, "relink", rows, &dir).await?;
        if m.figures.rows_deleted != rows {
            bail!("relink deleted {} of {rows}", m.figures.rows_deleted);
        }
        let achieved = rows as f64 / m.figures.seconds;
        let work = m.batches + m.page_reads;
        rows_md.push_str(&format!(
            "| {rows} | {t:.1} s | {achieved:.0} rows/s | **{frac:.0}%** | {work} of min {min} (**{wfrac:.0}%**) | {b} / {r} | {req} | {th} (**{thf:.2}%**) | {rss:.1} MB |\n",
            t = m.figures.seconds,
            frac = achieved / rate * 100.0,
            min = min_requests(rows),
            wfrac = work as f64 / min_requests(rows) as f64 * 100.0,
            b = m.batches,
            r = m.page_reads,
            req = m.requests,
            th = m.throttled,
            thf = m.throttled as f64 / m.requests.max(1) as f64 * 100.0,
            rss = m.figures.peak_rss_kb as f64 / 1024.0,
        ));
        largest = Some((rows, m));
    }
    eprintln!("limits: the naive loop deletes {NAIVE_ROWS} rows one request each...");
    let sim = fresh_sim().await?;
    let naive = measure(&sim, "naive", NAIVE_ROWS, &dir).await?;
    std::fs::remove_dir_all(&dir).ok();
    let (rows, relink) = largest.expect("sizes");
    let naive_rate = NAIVE_ROWS as f64 / naive.figures.seconds;
    let naive_full = rows as f64 / naive_rate;
    Ok(format!(
        "## Clearing rows under Dataverse's service protection limits\n\n\
         Command: part of `bash infra/scripts/bench.sh`; alone: `cargo run --profile measure -p relink-bench -- limits`.\n\n\
         The simulator enforces the limits as Dataverse does, scaled in time by {SCALE}: {req} requests and {exec} s of execution \
         time per sliding {win} s window, {conc} concurrent (Dataverse: 6,000 / 1,200 s / 300 s / 52); a `$batch` is one request, \
         each delete in it costs {PER_DELETE_MS} ms of execution. It sends `x-ms-dop-hint: 4` and the remaining budgets on every \
         answer. The registry allows 16 concurrent requests; relink uses the hint. \
         Limit-bound maximum: {exec} s / {win} s = {eps:.0} s of execution per second, / {PER_DELETE_MS} ms = **{rate:.0} rows/s**. \
         Minimum requests: ceil(N/1,000) `$batch` + ceil(N/5,000) page reads + 1 read that finds the table empty.\n\n\
         | rows | wall time | throughput | of the maximum | `$batch` + page reads | batches / reads | all requests | 429s | peak RSS |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n\
         {rows_md}\n\
         \"All requests\" adds the identity check (`RetrieveCurrentOrganization`) and the entity-set lookup. \
         Targets: at least 90% of the maximum, at most 110% of the minimum requests, under 1% throttled, at most 64 MB at 100k rows.\n\n\
         Naive loop (one `DELETE` per row, sequential, waiting out each 429's `Retry-After`), same limits: {NAIVE_ROWS} rows in \
         {nt:.1} s ({nr:.1} rows/s, {n429} throttled; the request budget of {req} per {win} s binds it). At that rate {rows} rows \
         take {nfull:.0} s: relink is **{ratio:.0}x** faster ({rt:.1} s). The sample starts with a full window, so it flatters the naive loop.\n",
        req = p.requests,
        exec = p.execution_ms / 1000,
        win = p.window_ms / 1000,
        conc = p.concurrent,
        eps = p.execution_ms as f64 / p.window_ms as f64,
        nt = naive.figures.seconds,
        nr = naive_rate,
        n429 = naive.throttled,
        nfull = naive_full,
        ratio = naive_full / relink.figures.seconds,
        rt = relink.figures.seconds,
    ))
}
