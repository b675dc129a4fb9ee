//! Drift probes: environments whose registry entry asks for it (`probe = { every_hours,
//! on_drift }`) have their link inspected on a schedule, read-only, whether or not a restore was
//! announced. The restore watcher starts each probe as a run of trigger source `probe`: its
//! detection stage reads both sides and deletes nothing; a clean link ends the run `skipped`
//! (the record that it was probed), a stale one goes on as any run (`on_drift = "run"`) or ends
//! there with a drift notice (`on_drift = "notify"`).
//!
//! Spreading: each environment probes at its own offset in the interval (a stable hash of its
//! id), one probe per interval (a claim per slot, so two watchers never probe twice), at most
//! one probe per Dataverse (organisation URL) and [`MAX_PER_POLL`] in all per watcher poll. 200 environments
//! probed every 6 hours start about one probe a minute, and a first poll after deployment
//! starts them over the following polls, never at once.

use std::time::Duration;

use jiff::Timestamp;

use crate::error::Result;
use crate::model::Run;
use crate::ports::{ProgressStore, StageQueue};
use crate::registry::EnvConfig;
use crate::trigger::Started;

/// The trigger source of a probe run.
pub const SOURCE: &str = "probe";

/// Most probes one watcher poll starts.
pub const MAX_PER_POLL: usize = 20;

/// FNV-1a: a hash that stays the same across builds and platforms.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The probe slot `environment_id` is in at `now`: slots are `every` long and start at the
/// environment's own offset. One probe per slot.
pub fn slot(environment_id: &str, every: Duration, now: Timestamp) -> u64 {
    let every = every.as_secs().max(1);
    let offset = stable_hash(environment_id) % every;
    (u64::try_from(now.as_second()).unwrap_or(0) + every - offset) / every
}

/// Whether `env` is due a probe now: it asks for probes and no run of it is under way (a probe
/// would find the link that run is repairing). `latest`: its latest run. Its slot, if due.
pub fn due(env: &EnvConfig, latest: Option<&Run>, now: Timestamp) -> Option<u64> {
    let probe = env.probe?;
    latest
        .is_none_or(|r| r.status.is_terminal())
        .then(|| slot(&env.id, probe.every(), now))
}

/// Starts the probes of `due` (environment, slot) as runs of source [`SOURCE`]: one per
/// environment and slot (a claim per slot: a slot already probed is passed over), at most one
/// per Dataverse and [`MAX_PER_POLL`] in all; the others stay due for the next poll. What was
/// started (environment, run id) or failed.
pub async fn start_due(
    store: &dyn ProgressStore,
    queue: &dyn StageQueue,
    due: Vec<(&EnvConfig, u64)>,
    now: Timestamp,
) -> Vec<(String, Result<String>)> {
    let mut out = Vec::new();
    let mut dataverses = std::collections::HashSet::new();
    let mut started = 0;
    for (env, slot) in due {
        if started >= MAX_PER_POLL {
            break;
        }
        // One Dataverse is one organisation URL (its own host in the cloud).
        let dataverse = env
            .dataverse_url
            .as_str()
            .trim_end_matches('/')
            .to_ascii_lowercase();
        if dataverses.contains(&dataverse) {
            continue;
        }
        let signal = crate::notify::Notice {
            source: SOURCE,
            environment: crate::notify::EnvRef::Registry(env.id.clone()),
            operation: "drift probe".into(),
            operation_id: format!("slot-{slot}"),
        };
        match crate::trigger::start_run(store, queue, &env.id, &signal, now).await {
            Ok(Started::New(run_id)) => {
                dataverses.insert(dataverse);
                started += 1;
                tracing::info!(environment_id = %env.id, run_id = %run_id, slot, "drift probe queued");
                out.push((env.id.clone(), Ok(run_id)));
            }
            Ok(Started::Seen(_)) => {}
            Err(e) => out.push((env.id.clone(), Err(e))),
        }
    }
    out
}

/// Whether a run was started by a probe.
pub fn is_probe(run: &crate::model::Run) -> bool {
    run.trigger.source == SOURCE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_one_interval_long_and_spread_over_it() {
        let every = Duration::from_secs(6 * 3600);
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        // One slot change per interval for each environment...
        let changes = |id: &str| {
            (0..=every.as_secs() / 60)
                .map(|m| slot(id, every, t0 + Duration::from_secs(m * 60)))
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        };
        assert!((1..=2).contains(&changes("contoso-uat")));
        // ...and 200 environments change slots at different minutes of it.
        let mut minutes = std::collections::BTreeMap::<u64, usize>::new();
        for i in 0..200 {
            let id = format!("env-{i:03}");
            let first = slot(&id, every, t0);
            let m = (1..=every.as_secs() / 60)
                .find(|m| slot(&id, every, t0 + Duration::from_secs(m * 60)) != first)
                .unwrap();
            *minutes.entry(m).or_default() += 1;
        }
        assert!(
            minutes.values().all(|&n| n <= 4),
            "at most a handful per minute: {minutes:?}"
        );
        assert!(
            minutes.len() > 150,
            "spread: {} distinct minutes",
            minutes.len()
        );
    }
}
