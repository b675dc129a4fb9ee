//! Rendering: progress on stderr (a live view on a terminal, plain lines otherwise) and runs
//! on stdout (text or the documented JSON object).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use relink_core::model::{Run, RunStatus, Stage};
use relink_core::progress::{Progress, ProgressSink};
pub use relink_core::redact::printable;
use serde_json::{Value, json};

/// Progress for operators: indicatif spinners on a terminal, plain lines when piped.
pub struct Display {
    live: Option<MultiProgress>,
    state: Mutex<LiveState>,
}

#[derive(Default)]
struct LiveState {
    bars: HashMap<Stage, ProgressBar>,
    current: Option<Stage>,
    counts: Vec<(&'static str, &'static str, usize)>,
    retries: usize,
}

impl Display {
    /// A live display when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Display {
        Display {
            live: std::io::stderr().is_terminal().then(MultiProgress::new),
            state: Mutex::new(LiveState::default()),
        }
    }

    /// Plain lines always (the demo narrates between stages).
    pub fn plain() -> Display {
        Display {
            live: None,
            state: Mutex::new(LiveState::default()),
        }
    }

    fn line(&self, text: String) {
        match &self.live {
            Some(m) => {
                m.println(text).ok();
            }
            None => eprintln!("{text}"),
        }
    }
}

fn set_count(
    counts: &mut Vec<(&'static str, &'static str, usize)>,
    what: &'static str,
    table: &'static str,
    n: usize,
) {
    match counts
        .iter_mut()
        .find(|(w, t, _)| *w == what && *t == table)
    {
        Some(c) => c.2 = n,
        None => counts.push((what, table, n)),
    }
}

impl ProgressSink for Display {
    fn emit(&self, event: Progress) {
        let mut st = self.state.lock().expect("display lock");
        match event {
            Progress::StageStarted { stage } => {
                st.current = Some(stage);
                st.counts.clear();
                st.retries = 0;
                match &self.live {
                    Some(m) => {
                        let bar = m.add(ProgressBar::new_spinner());
                        bar.set_style(
                            ProgressStyle::with_template(
                                "{spinner} {prefix:<24} {wide_msg} {elapsed}",
                            )
                            .expect("template"),
                        );
                        bar.set_prefix(stage.as_str());
                        bar.enable_steady_tick(Duration::from_millis(120));
                        st.bars.insert(stage, bar);
                    }
                    None => {
                        drop(st);
                        self.line(format!("[{stage}] started"));
                        return;
                    }
                }
            }
            Progress::Found { table, rows } => set_count(&mut st.counts, "found", table, rows),
            Progress::Archived { table, rows } => {
                set_count(&mut st.counts, "archived", table, rows)
            }
            Progress::Deleted { table, rows } => set_count(&mut st.counts, "deleted", table, rows),
            Progress::Retry {
                service,
                status,
                wait,
            } => {
                st.retries += 1;
                if self.live.is_none() {
                    let stage = st.current.map(|s| s.as_str()).unwrap_or("-");
                    drop(st);
                    let why = status
                        .map(|s| format!("HTTP {s}"))
                        .unwrap_or_else(|| "network error".into());
                    self.line(format!(
                        "[{stage}] {service} answered {why}; retrying in {:.1}s",
                        wait.as_secs_f64()
                    ));
                    return;
                }
            }
            Progress::StageFinished {
                stage,
                status,
                summary,
            } => {
                let counts = st
                    .counts
                    .iter()
                    .map(|(w, t, n)| format!("{t} {w} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let retries = if st.retries > 0 {
                    format!(" ({} retries)", st.retries)
                } else {
                    String::new()
                };
                let text = format!("[{stage}] {status}: {}{retries}", printable(&summary));
                if let Some(bar) = st.bars.remove(&stage) {
                    bar.finish_and_clear();
                }
                drop(st);
                if !counts.is_empty() && self.live.is_none() {
                    self.line(format!("[{stage}] {counts}"));
                }
                self.line(text);
                return;
            }
        }
        // Live view: refresh the current stage's line.
        if let (Some(stage), true) = (st.current, self.live.is_some()) {
            let msg = st
                .counts
                .iter()
                .map(|(w, t, n)| format!("{t}: {w} {n}"))
                .collect::<Vec<_>>()
                .join("  ");
            let retries = if st.retries > 0 {
                format!("  retries {}", st.retries)
            } else {
                String::new()
            };
            if let Some(bar) = st.bars.get(&stage) {
                bar.set_message(format!("{msg}{retries}"));
            }
        }
    }
}

/// The documented status object of a run.
pub fn run_json(run: &Run) -> Value {
    json!({
        "run_id": run.run_id,
        "environment_id": run.environment_id,
        "status": run.status,
        "options": run.options,
        "trigger": run.trigger,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "instructions": run.instructions,
        "waiting": run.waiting,
        "notices": run.notices,
        "stages": run.stages.iter().map(|s| json!({
            "stage": s.stage,
            "status": s.status,
            "attempts": s.attempts,
            "started_at": s.started_at,
            "finished_at": s.finished_at,
            "outcome": s.outcome,
            "error": s.error,
        })).collect::<Vec<_>>(),
    })
}

/// A run for humans.
pub fn run_text(run: &Run) -> String {
    let mut out = format!(
        "run {} of {}: {}{}\n",
        run.run_id,
        run.environment_id,
        run.status,
        if run.options.dry_run {
            " (dry run)"
        } else {
            ""
        }
    );
    if let Some(w) = &run.waiting {
        out.push_str(&format!("  waiting: {}\n", printable(w)));
    }
    for s in &run.stages {
        let status = format!("{:?}", s.status).to_lowercase();
        out.push_str(&format!("  {:<24} {:<10}", s.stage.as_str(), status));
        if s.attempts > 1 {
            out.push_str(&format!(" attempts {}", s.attempts));
        }
        if let Some(o) = &s.outcome {
            out.push_str(&format!(" {}", printable(&summarize(o))));
        }
        out.push('\n');
        if let Some(e) = &s.error {
            out.push_str(&format!("  {:<24} error: {}\n", "", printable(e)));
        }
    }
    // The guards every stage re-ran, as the latest stage that ran them recorded their evidence.
    let guarded = run.stages.iter().rev().find_map(|s| {
        let o = s.outcome.as_ref()?;
        Some((
            s.stage,
            o.get("guards")
                .or_else(|| o.get("findings")?.get("guards"))?,
        ))
    });
    if let Some((stage, g)) = guarded {
        out.push_str(&format!("  guards (as of {}):\n", stage.as_str()));
        for key in ["identity", "production", "pairing"] {
            if let Some(v) = g.get(key).and_then(Value::as_str) {
                out.push_str(&format!("    {key:<11} {}\n", printable(v)));
            }
        }
    }
    for n in &run.notices {
        let said: Vec<String> = n
            .deliveries
            .iter()
            .map(|d| format!("{} {}", d.channel, printable(&d.result)))
            .collect();
        out.push_str(&format!(
            "  notified {} at {}: {}\n",
            n.key,
            n.at,
            said.join(", ")
        ));
    }
    if let Some(i) = &run.instructions {
        out.push_str(&format!("\n{i}\n"));
    }
    out
}

/// A one-line digest of a stage outcome.
fn summarize(o: &Value) -> String {
    if let Some(reason) = o.get("reason").and_then(Value::as_str) {
        return reason.to_string();
    }
    if let Some(f) = o
        .get("findings")
        .and_then(|f| f.get("reason"))
        .and_then(Value::as_str)
    {
        return format!(
            "verified={} ({f})",
            o.get("verified").and_then(Value::as_bool).unwrap_or(false)
        );
    }
    if o.get("instructions").is_some() {
        return "awaiting the operator's reset".into();
    }
    let mut parts = Vec::new();
    let mut digest = |label: &str, v: &Value| {
        for key in ["deleted", "would_delete"] {
            if let Some(n) = v.get(key).and_then(Value::as_u64) {
                parts.push(format!("{label} {} {n}", key.replace('_', " ")));
            }
        }
    };
    digest("", o);
    if let Value::Object(map) = o {
        for (k, v) in map {
            digest(k, v);
        }
    }
    parts.join(", ").trim().to_string()
}

/// One environment of `relink status --all`.
pub struct FleetRow {
    pub environment_id: String,
    pub run: Option<Run>,
    /// Seconds since the latest run last changed.
    pub age_secs: Option<i64>,
    /// When the run began waiting for the operator's Reset, if it waits.
    pub awaiting_since: Option<jiff::Timestamp>,
}

impl FleetRow {
    pub fn new(environment_id: &str, run: Option<Run>, now: jiff::Timestamp) -> FleetRow {
        let age_secs = run
            .as_ref()
            .map(|r| (now - r.updated_at).get_seconds().max(0));
        let awaiting_since = run
            .as_ref()
            .filter(|r| r.status == RunStatus::AwaitingConfirmation)
            .map(|r| r.stage(Stage::ResetLink).started_at.unwrap_or(r.updated_at));
        FleetRow {
            environment_id: environment_id.to_string(),
            run,
            age_secs,
            awaiting_since,
        }
    }

    /// 0 needs a person now (awaiting the Reset, failed, refused), 1 is in progress, 2 has no
    /// run, 3 is done (succeeded, skipped).
    fn rank(&self) -> u8 {
        match self.run.as_ref().map(|r| r.status) {
            Some(RunStatus::AwaitingConfirmation | RunStatus::Failed | RunStatus::Refused) => 0,
            Some(RunStatus::Running | RunStatus::Pending) => 1,
            None => 2,
            Some(RunStatus::Succeeded | RunStatus::Skipped) => 3,
        }
    }

    /// What needs a person first; within a group the longest waiting first, then by id.
    pub fn order(a: &FleetRow, b: &FleetRow) -> std::cmp::Ordering {
        a.rank()
            .cmp(&b.rank())
            .then(b.age_secs.cmp(&a.age_secs))
            .then(a.environment_id.cmp(&b.environment_id))
    }

    /// The documented JSON line (README, "Fleet view").
    pub fn json(&self) -> Value {
        json!({
            "environment_id": self.environment_id,
            "run_id": self.run.as_ref().map(|r| &r.run_id),
            "status": self.run.as_ref().map(|r| r.status.as_str()),
            "needs_attention": self.rank() == 0,
            "updated_at": self.run.as_ref().map(|r| r.updated_at),
            "age_secs": self.age_secs,
            "awaiting_since": self.awaiting_since,
            "waiting": self.run.as_ref().and_then(|r| r.waiting.as_deref()),
            "last_probe": Value::Null,
        })
    }
}

/// A duration for a table cell: `45s`, `12m`, `5h`, `3d`.
fn short_age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `relink status --all` for a terminal: one aligned line per environment.
pub fn fleet_text(rows: &[FleetRow]) -> String {
    let width = rows
        .iter()
        .map(|r| r.environment_id.len())
        .max()
        .unwrap_or(0)
        .max("ENVIRONMENT".len());
    let mut out = format!(
        "{:<width$}  {:<22}  {:<26}  {:>5}  {:<20}  {}\n",
        "ENVIRONMENT", "STATUS", "LATEST RUN", "AGE", "AWAITING SINCE", "LAST PROBE"
    );
    for r in rows {
        let flag = if r.rank() == 0 { "!" } else { " " };
        out.push_str(&format!(
            "{:<width$}  {flag}{:<21}  {:<26}  {:>5}  {:<20}  -\n",
            printable(&r.environment_id),
            r.run.as_ref().map_or("no run", |x| x.status.as_str()),
            r.run.as_ref().map_or("-", |x| x.run_id.as_str()),
            r.age_secs.map_or("-".into(), short_age),
            r.awaiting_since
                .map_or("-".into(), |t| t.strftime("%Y-%m-%d %H:%M UTC").to_string()),
        ));
    }
    let attention = rows.iter().filter(|r| r.rank() == 0).count();
    out.push_str(&format!(
        "{} environment(s), {attention} need(s) a person\n",
        rows.len()
    ));
    out
}
