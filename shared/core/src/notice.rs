//! What relink tells people (outbound notifications, the opposite direction of [`crate::notify`]):
//! a run waits for the operator's Reset, a Reset is still due (reminders), a run succeeded,
//! failed or was refused. This module builds the messages, pure: one [`Notice`] per event, and
//! its shape for each channel (a Teams Workflows webhook's Adaptive Card, a Slack incoming
//! webhook's Block Kit, relink's own signed JSON). `relink-dynamics` posts them
//! ([`crate::ports::Notifier`]); the engine decides when, and records on the run what each
//! channel answered.
//!
//! A notice carries the run id, the environment, its F&O and Dataverse URLs, the summary, the
//! operator's instructions and the guard evidence: nothing from a secret (webhook URLs, which
//! are secrets, are where it goes, never what it says).

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::model::{Run, RunStatus};
use crate::registry::EnvConfig;

/// Why a notice is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoticeKind {
    /// The run waits for the operator's Reset (the manual gate).
    AwaitingReset,
    /// The Reset is still due.
    Reminder,
    /// The link is verified: the run is over.
    Succeeded,
    /// The run failed (and says why).
    Failed,
    /// A guard refused the run.
    Refused,
    /// A drift probe found the link stale and, as its entry says, only tells.
    Drift,
}

impl NoticeKind {
    /// The kind as written in payloads and message attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::AwaitingReset => "awaiting-reset",
            NoticeKind::Reminder => "reminder",
            NoticeKind::Succeeded => "succeeded",
            NoticeKind::Failed => "failed",
            NoticeKind::Refused => "refused",
            NoticeKind::Drift => "drift-found",
        }
    }

    /// The notice a run calls for, if any (a skipped run, the link already clean, needs
    /// nobody; a probe that found drift and only tells does).
    pub fn for_run(run: &Run) -> Option<NoticeKind> {
        match run.status {
            RunStatus::Skipped
                if crate::probe::is_probe(run)
                    && run
                        .stage(crate::model::Stage::DetectMismatch)
                        .outcome
                        .as_ref()
                        .and_then(|o| o.get("stale")?.as_bool())
                        == Some(true) =>
            {
                Some(NoticeKind::Drift)
            }
            status => NoticeKind::for_status(status),
        }
    }

    /// The notice a run's status calls for, if any.
    fn for_status(status: RunStatus) -> Option<NoticeKind> {
        match status {
            RunStatus::AwaitingConfirmation => Some(NoticeKind::AwaitingReset),
            RunStatus::Succeeded => Some(NoticeKind::Succeeded),
            RunStatus::Failed => Some(NoticeKind::Failed),
            RunStatus::Refused => Some(NoticeKind::Refused),
            _ => None,
        }
    }
}

/// One event to tell the environment's channels about.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Notice {
    pub kind: NoticeKind,
    /// Unique per run: `awaiting-reset`, `reminder-2`, `succeeded`, ... Each is sent once.
    pub key: String,
    pub environment_id: String,
    pub run_id: String,
    pub status: String,
    /// One line on what happened.
    pub summary: String,
    /// What the operator does next, when there is something to do.
    pub instructions: Option<String>,
    pub fno_url: String,
    pub dataverse_url: String,
    /// The command that shows the run.
    pub status_command: String,
    /// The command that prints the run's evidence.
    pub report_command: String,
    /// The guards' evidence (identity, production, pairing) as the run recorded it last.
    pub guards: Value,
    pub at: Timestamp,
}

/// Longest text put in one message block (Slack sections take at most 3,000 characters).
const MAX_TEXT: usize = 2_900;

impl Notice {
    /// The notice of `kind` for `run` (`reminder`: its number, counted from 1).
    pub fn new(env: &EnvConfig, run: &Run, kind: NoticeKind, reminder: u64) -> Notice {
        let key = match kind {
            NoticeKind::Reminder => format!("reminder-{reminder}"),
            k => k.as_str().to_string(),
        };
        let last_error = run.stages.iter().rev().find_map(|s| s.error.clone());
        let summary = match kind {
            NoticeKind::AwaitingReset => format!(
                "relink has cleared the dual-write keys of {}; the link now needs a Reset in F&O",
                env.id
            ),
            NoticeKind::Reminder => format!(
                "The Reset of {} is still due (run {} has waited since {})",
                env.id,
                run.run_id,
                run.stage(crate::model::Stage::ResetLink)
                    .started_at
                    .unwrap_or(run.updated_at)
            ),
            NoticeKind::Succeeded => {
                let done = format!(
                    "The dual-write link of {} is verified towards {}; the run is over",
                    env.id, env.dataverse_url
                );
                let maps = run
                    .stage(crate::model::Stage::ResetLink)
                    .outcome
                    .as_ref()
                    .and_then(|o| o.get("maps"))
                    .and_then(crate::stages::maps::summary);
                match maps {
                    Some(m) => format!("{done}. To re-apply: {m}"),
                    None => done,
                }
            }
            NoticeKind::Failed => format!(
                "The run of {} failed: {}",
                env.id,
                last_error.as_deref().unwrap_or("see relink status")
            ),
            NoticeKind::Drift => format!(
                "A drift probe found the dual-write link of {} stale: {}. Nothing was deleted (on_drift = \"notify\"); to repair it, run relink run {}",
                env.id,
                run.stage(crate::model::Stage::DetectMismatch)
                    .outcome
                    .as_ref()
                    .and_then(|o| o.get("reason")?.as_str())
                    .unwrap_or("see relink report"),
                env.id
            ),
            NoticeKind::Refused => format!(
                "The run of {} was refused before anything was deleted: {}",
                env.id,
                last_error.as_deref().unwrap_or("see relink status")
            ),
        };
        let guards = run
            .stages
            .iter()
            .rev()
            .find_map(|s| s.outcome.as_ref()?.get("guards").cloned())
            .unwrap_or(Value::Null);
        let instructions = match kind {
            NoticeKind::AwaitingReset | NoticeKind::Reminder => run.instructions.clone(),
            _ => None,
        };
        Notice {
            kind,
            key,
            environment_id: env.id.clone(),
            run_id: run.run_id.clone(),
            status: run.status.as_str().to_string(),
            summary: clip(&summary),
            instructions: instructions.map(|i| clip(&i)),
            fno_url: env.fno_url.to_string(),
            dataverse_url: env.dataverse_url.to_string(),
            status_command: format!("relink status --run {}", run.run_id),
            report_command: format!("relink report {}", run.run_id),
            guards,
            at: Timestamp::now(),
        }
    }

    /// A readable subject line.
    pub fn subject(&self) -> String {
        let what = match self.kind {
            NoticeKind::AwaitingReset => "Reset link needed",
            NoticeKind::Reminder => "Reset link still needed",
            NoticeKind::Succeeded => "link verified",
            NoticeKind::Failed => "run failed",
            NoticeKind::Refused => "run refused",
            NoticeKind::Drift => "stale link found by a probe",
        };
        format!("relink: {what} for {}", self.environment_id)
    }

    /// relink's own JSON body (the generic webhook).
    pub fn json(&self) -> Value {
        json!({
            "source": "relink",
            "event": self.kind.as_str(),
            "key": self.key,
            "subject": self.subject(),
            "environment_id": self.environment_id,
            "run_id": self.run_id,
            "status": self.status,
            "summary": self.summary,
            "instructions": self.instructions,
            "fno_url": self.fno_url,
            "dataverse_url": self.dataverse_url,
            "status_command": self.status_command,
            "report_command": self.report_command,
            "guards": self.guards,
            "at": self.at.to_string(),
        })
    }

    /// The body for a Teams Workflows "When a Teams webhook request is received" trigger: a
    /// message with one Adaptive Card (schema 1.4).
    pub fn teams(&self) -> Value {
        let mut body = vec![
            json!({"type": "TextBlock", "size": "Medium", "weight": "Bolder", "wrap": true, "text": self.subject()}),
            json!({"type": "TextBlock", "wrap": true, "text": self.summary}),
            json!({"type": "FactSet", "facts": [
                {"title": "Environment", "value": self.environment_id},
                {"title": "Run", "value": self.run_id},
                {"title": "Status", "value": self.status},
                {"title": "F&O", "value": self.fno_url},
                {"title": "Dataverse", "value": self.dataverse_url},
                {"title": "Details", "value": self.status_command},
                {"title": "Evidence", "value": self.report_command},
            ]}),
        ];
        if let Some(i) = &self.instructions {
            body.push(
                json!({"type": "TextBlock", "wrap": true, "fontType": "Monospace", "text": i}),
            );
        }
        json!({
            "type": "message",
            "attachments": [{
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": null,
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": body,
                }
            }]
        })
    }

    /// The body for a Slack incoming webhook: Block Kit, with `text` as the fallback.
    pub fn slack(&self) -> Value {
        let subject: String = self.subject().chars().take(150).collect();
        let mut blocks = vec![
            json!({"type": "header", "text": {"type": "plain_text", "text": subject}}),
            json!({"type": "section", "text": {"type": "mrkdwn", "text": self.summary}}),
            json!({"type": "section", "fields": [
                {"type": "mrkdwn", "text": format!("*Environment*\n{}", self.environment_id)},
                {"type": "mrkdwn", "text": format!("*Run*\n{}", self.run_id)},
                {"type": "mrkdwn", "text": format!("*F&O*\n{}", self.fno_url)},
                {"type": "mrkdwn", "text": format!("*Dataverse*\n{}", self.dataverse_url)},
            ]}),
        ];
        if let Some(i) = &self.instructions {
            blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("```{i}```")}}));
        }
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!("`{}` · `{}`", self.status_command, self.report_command)}]}));
        json!({"text": self.subject(), "blocks": blocks})
    }
}

/// `text`, cut to fit one message block.
fn clip(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_string();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// What one channel answered for one notice, as recorded on the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// `teams`, `slack` or `webhook`.
    pub channel: String,
    /// `sent`, or why it failed after its retries (never the URL).
    pub result: String,
}

/// A notice as recorded on the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoticeRecord {
    pub key: String,
    pub at: Timestamp,
    pub deliveries: Vec<Delivery>,
}
