//! Same-host process liveness: a lease owner named `pid:{pid}:{start}@{host}` is known dead when
//! no process with that pid and start time runs on this host (read from `/proc`), so a
//! restarted `relink run` or `relink worker` takes over a dead process's run at once instead of
//! waiting for its lease to lapse.

use relink_core::ports::{LeaseOwner, Liveness};

/// [`Liveness`] from this host's process table.
pub struct ProcessLiveness;

impl Liveness for ProcessLiveness {
    fn is_gone(&self, owner: &LeaseOwner) -> Option<bool> {
        owner_is_gone(owner)
    }
}

/// This process as a lease owner: `pid:{pid}:{start}@{host}` so a later process on the same
/// host can tell whether it is still alive.
pub fn local_owner() -> LeaseOwner {
    let pid = std::process::id();
    LeaseOwner(format!(
        "pid:{pid}:{}@{}",
        process_start(pid).unwrap_or_default(),
        hostname()
    ))
}

/// Whether a local-process owner is known to be gone (`None`: cannot tell, e.g. another host).
pub fn owner_is_gone(owner: &LeaseOwner) -> Option<bool> {
    // Anything after '#' distinguishes deliveries handled by the same process.
    let id = owner.0.split('#').next().unwrap_or_default();
    let rest = id.strip_prefix("pid:")?;
    let (ids, host) = rest.split_once('@')?;
    if host != hostname() {
        return None;
    }
    let (pid, start) = ids.split_once(':')?;
    let pid: u32 = pid.parse().ok()?;
    if !std::path::Path::new("/proc/self/stat").exists() {
        return None;
    }
    Some(process_start(pid).as_deref() != Some(start).filter(|s| !s.is_empty()))
}

/// The start time (clock ticks since boot) of a live, non-zombie process, from /proc.
fn process_start(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is the 1st, starttime the 20th.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19).map(|s| s.to_string())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_bogus_one_is_gone() {
        let me = local_owner();
        assert_eq!(owner_is_gone(&me), Some(false));
        let host = me.0.split_once('@').unwrap().1;
        assert_eq!(
            owner_is_gone(&LeaseOwner(format!("pid:999999999:1@{host}"))),
            Some(true)
        );
        assert_eq!(owner_is_gone(&LeaseOwner("lambda:abc".into())), None);
    }
}
