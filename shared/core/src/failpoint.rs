//! Crash drills: named points where a process can be frozen, so a test (or an operator
//! rehearsing a failure) can SIGKILL it at an exact place, such as between recording a stage
//! and sending the next stage's event.
//!
//! Compiled in only with the `failpoints` feature (the CLI, which the tests and crash drills
//! run); without it, as in the release Lambda functions, [`point`] is an empty inline function
//! and the process environment is never read for it.
//!
//! Set `RELINK_FAILPOINT` to a point's name and the whole process stops itself with SIGSTOP
//! when it gets there (after a warning in the log): no thread runs on, so nothing else the
//! process was doing moves past that instant. `ps` shows it stopped (`T`); SIGKILL then
//! simulates a crash exactly there, SIGCONT lets it go on. Unset, a point costs one comparison.
//! Prefixed with `panic-once:` (`panic-once:stage-recorded:purge-keys`), the first task to get
//! there panics instead, and later ones pass: a handler's bug, for the host to survive.
//! Points:
//!
//! - `stage-recorded:STAGE`: the stage's outcome is stored; the next event is not yet sent.
//! - `next-sent:STAGE`: the next stage's event is sent; the message is not yet acknowledged.
//! - `notice-claimed:KIND`: a notice (`awaiting-reset`, `succeeded`, ...) is claimed; nothing is
//!   posted yet.
//! - `verifying:reset-link`: a check of an awaited Reset holds the run (marked running); the
//!   link is not read yet.
//! - `gateway-stop:requested`: the gateway took the request to stop the maps; not yet stopped.
//! - `gateway-reset:claimed` / `gateway-reset:requested`: the run's Reset claim is taken / the
//!   gateway accepted the Reset; it has not finished.

#[cfg(feature = "failpoints")]
static ARMED: std::sync::LazyLock<Option<String>> = std::sync::LazyLock::new(|| {
    std::env::var("RELINK_FAILPOINT")
        .ok()
        .filter(|s| !s.is_empty())
});

/// Stops the process if `point:detail` is the armed failpoint.
#[cfg(feature = "failpoints")]
pub fn point(point: &str, detail: impl std::fmt::Display) {
    static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(armed) = ARMED.as_deref() else {
        return;
    };
    let (panics, name) = match armed.strip_prefix("panic-once:") {
        Some(name) => (true, name),
        None => (false, armed),
    };
    if name.strip_prefix(point).and_then(|r| r.strip_prefix(':')) != Some(&detail.to_string()) {
        return;
    }
    if panics {
        if !PANICKED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            panic!("failpoint {name} reached: panicking once");
        }
        return;
    }
    tracing::warn!(
        failpoint = armed,
        "failpoint reached: stopping the process (SIGSTOP)"
    );
    // SAFETY: raise() only sends a signal to this process; SIGSTOP cannot be caught, so no
    // handler runs and no memory is touched.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
}

/// Without the `failpoints` feature, a point is nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn point(_point: &str, _detail: impl std::fmt::Display) {}
