//! Pacing bulk deletes to Dataverse's service protection limits instead of running into them.
//!
//! Dataverse allows, per user and web server in a sliding 300 s window, 6,000 requests, 1,200 s
//! of execution time and 52 concurrent requests; a `$batch` is one request but every operation in
//! it counts towards execution time, so for bulk deletes the execution budget (4 s of server time
//! per second on average) is the ceiling. Responses carry the signals a client paces itself by
//! (docs/dynamics.md): `x-ms-dop-hint` (the recommended degree of parallelism) and
//! `x-ms-ratelimit-time-remaining-xrm-requests` (execution time left in the window, seconds,
//! formatted like `1,199.53`). A [`Pacer`] keeps what was seen and decides:
//!
//! - **concurrency**: the DOP hint, capped by the configured `dataverse_concurrency`;
//! - **batch size**: the configured size until the first batch has answered, then sized from
//!   the measured time per delete so a batch takes at most [`TARGET_BATCH`], far from the
//!   ~2 minute request timeout. (A smaller first probe would cost one request more on every
//!   table; an organisation whose deletes are known to be slow, because of plug-ins on delete,
//!   sets a lower `dataverse_batch_size`.)
//! - **admission**: a batch waits while the remaining execution budget, less what the batches
//!   in flight will spend, cannot cover it (unless nothing is in flight: then the server decides).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one `$batch` should take at most (the service's request timeout is ~2 minutes).
pub const TARGET_BATCH: Duration = Duration::from_secs(30);
/// How often a held-back batch looks at the budget again.
const RECHECK: Duration = Duration::from_millis(25);

#[derive(Debug, Default)]
struct State {
    dop_hint: Option<usize>,
    /// Execution time left in the window at the last response, seconds.
    time_remaining: Option<f64>,
    /// Smoothed server time per delete.
    per_op: Option<Duration>,
    /// Batches admitted and not answered, with their estimated cost.
    in_flight: usize,
    in_flight_cost: Duration,
}

/// Pacing state of one Dataverse client (one organisation and application user).
#[derive(Debug, Default)]
pub struct Pacer {
    state: Mutex<State>,
}

/// A batch admitted by [`Pacer::admit`]; tell the pacer how it went with [`Pacer::finish`].
#[derive(Debug)]
pub struct Admitted {
    cost: Duration,
    started: Instant,
    ops: usize,
}

impl Pacer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Degree of parallelism to use: the server's hint, at most `configured`.
    pub fn concurrency(&self, configured: usize) -> usize {
        let hint = self.lock().dop_hint;
        hint.map_or(configured, |h| h.min(configured)).max(1)
    }

    /// Deletes to put in the next batch, at most `configured`.
    pub fn batch_size(&self, configured: usize) -> usize {
        match self.lock().per_op {
            None => configured,
            Some(per_op) => {
                let fit = TARGET_BATCH.as_secs_f64() / per_op.as_secs_f64().max(1e-6);
                (fit as usize).clamp(1, configured)
            }
        }
    }

    /// Waits until a batch of `ops` deletes fits the execution budget, then counts it in flight.
    pub async fn admit(&self, ops: usize) -> Admitted {
        loop {
            {
                let mut st = self.lock();
                let cost = st.per_op.unwrap_or_default() * ops as u32;
                let fits = match st.time_remaining {
                    None => true,
                    Some(left) => {
                        Duration::from_secs_f64(left.clamp(0.0, 1e9)) >= st.in_flight_cost + cost
                    }
                };
                if fits || st.in_flight == 0 {
                    st.in_flight += 1;
                    st.in_flight_cost += cost;
                    return Admitted {
                        cost,
                        started: Instant::now(),
                        ops,
                    };
                }
            }
            tokio::time::sleep(RECHECK).await;
        }
    }

    /// Records a batch's answer: its pacing signals (if it answered) and how long it took.
    pub fn finish(&self, batch: Admitted, signals: Option<Signals>) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        st.in_flight_cost = st.in_flight_cost.saturating_sub(batch.cost);
        if let Some(signals) = signals {
            observe(&mut st, signals);
            if batch.ops > 0 {
                let sample = batch.started.elapsed() / batch.ops as u32;
                st.per_op = Some(match st.per_op {
                    None => sample,
                    Some(old) => (old + sample) / 2,
                });
            }
        }
    }

    /// Records the pacing signals of any other response (page reads).
    pub fn observe(&self, signals: Signals) {
        observe(&mut self.lock(), signals);
    }
}

/// The pacing signals of one response, read from its headers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Signals {
    /// `x-ms-dop-hint`: the recommended degree of parallelism.
    pub dop_hint: Option<f64>,
    /// `x-ms-ratelimit-time-remaining-xrm-requests`: execution seconds left in the window.
    pub time_remaining: Option<f64>,
}

impl Signals {
    /// Reads the signals through `header`, which returns a header's value by (lower-case) name.
    /// Values may carry thousands separators (`1,199.53`).
    pub fn read<'h>(header: impl Fn(&str) -> Option<&'h str>) -> Signals {
        // Only finite, non-negative numbers count: `inf`, `NaN` or `-1` from a server say nothing.
        let number = |name: &str| {
            header(name)
                .and_then(|s| s.trim().replace(',', "").parse::<f64>().ok())
                .filter(|n| n.is_finite() && *n >= 0.0)
        };
        Signals {
            dop_hint: number("x-ms-dop-hint"),
            time_remaining: number("x-ms-ratelimit-time-remaining-xrm-requests"),
        }
    }
}

fn observe(st: &mut State, signals: Signals) {
    if let Some(d) = signals.dop_hint.filter(|d| *d >= 1.0) {
        st.dop_hint = Some(d.min(1e6) as usize);
    }
    if let Some(t) = signals.time_remaining {
        st.time_remaining = Some(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(dop: &str, remaining: &str) -> Signals {
        Signals::read(|name| match name {
            "x-ms-dop-hint" => Some(dop),
            "x-ms-ratelimit-time-remaining-xrm-requests" => Some(remaining),
            _ => None,
        })
    }

    #[tokio::test]
    async fn concurrency_follows_the_hint_and_batches_fit_the_target_time() {
        let p = Pacer::default();
        assert_eq!(p.concurrency(8), 8);
        assert_eq!(
            p.batch_size(1000),
            1000,
            "the configured size until measured"
        );
        let b = p.admit(100).await;
        std::thread::sleep(Duration::from_millis(20));
        p.finish(b, Some(headers("4", "1,199.50")));
        assert_eq!(p.concurrency(8), 4);
        assert_eq!(p.concurrency(2), 2);
        // ~0.2 ms per delete: a full batch of 1000 is far below the target time.
        assert_eq!(p.batch_size(1000), 1000);
        // Slow deletes (200 ms each) shrink the batch to what fits in TARGET_BATCH.
        p.lock().per_op = Some(Duration::from_millis(200));
        assert_eq!(p.batch_size(1000), 150);
    }

    #[tokio::test]
    async fn absurd_signals_are_ignored_without_panicking() {
        let p = Pacer::default();
        for (dop, left) in [
            ("inf", "inf"),
            ("NaN", "1e400"),
            ("-3", "-1"),
            ("1e300", "1e300"),
        ] {
            let b = p.admit(10).await;
            p.finish(b, Some(headers(dop, left)));
            assert!(p.concurrency(8) >= 1 && p.concurrency(8) <= 8);
            let b = p.admit(10).await;
            p.finish(b, None);
        }
    }

    #[tokio::test]
    async fn a_batch_waits_while_the_budget_cannot_cover_it() {
        let p = std::sync::Arc::new(Pacer::default());
        {
            let mut st = p.lock();
            st.per_op = Some(Duration::from_millis(2));
            st.time_remaining = Some(3.0);
        }
        // Nothing in flight: admitted whatever the budget (the server decides).
        let first = p.admit(1000).await;
        // 2 s in flight + 2 s more > 3 s left: held until an answer shows budget again.
        let p2 = p.clone();
        let waiting = tokio::spawn(async move { p2.admit(1000).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "held back");
        p.finish(first, Some(headers("4", "10")));
        let second = waiting.await.unwrap();
        p.finish(second, None);
    }
}
