//! The admin's re-apply checklist. A Reset removes the dual-write maps and their legal-entity
//! mappings; the F&O project configurations that detection read (and purge archived) are the
//! maps that ran before. After the Reset, verification reads them again and lists, per map,
//! whether it runs towards the registered Dataverse, so the outcome can say "of 120 maps that
//! ran before, 37 run now; missing: ...".
//!
//! A map is named by its `ProjectName` (the key of `DualWriteProjectConfigurations`; one name
//! per map, repeated per legal entity), or by its entity pair when a row has no name. A map
//! runs when a row of it points at this Dataverse with `Status` "Running" (community
//! knowledge, docs/dynamics.md: any other value counts as not running, so the checklist never
//! drops a map it cannot see running).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Most map names kept while reading (bounded memory whatever F&O answers).
const MAX_TRACKED: usize = 10_000;
/// Most map names recorded on a run (the run item and the events that carry it stay small).
pub const MAX_LISTED: usize = 200;
/// Longest map name recorded.
const MAX_NAME: usize = 120;

/// A set of maps: how many, and their names (the first [`MAX_LISTED`] in order).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Maps {
    pub count: usize,
    pub names: Vec<String>,
    /// More maps than names listed (or than could be tracked).
    #[serde(default)]
    pub more: bool,
    #[serde(skip)]
    all: BTreeSet<String>,
}

impl Maps {
    /// Adds the map of one project-configuration row.
    pub fn add(&mut self, row: &Value) {
        let text = |k: &str| {
            row.get(k)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
        };
        let name = match (
            text("ProjectName"),
            text("InternalEntityName"),
            text("ExternalEntityName"),
        ) {
            (Some(p), _, _) => p.to_string(),
            (None, Some(i), Some(e)) => format!("{i} -> {e}"),
            _ => return,
        };
        let mut name = crate::redact::printable(&name);
        if name.len() > MAX_NAME {
            let mut end = MAX_NAME;
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            name.truncate(end);
        }
        if self.all.contains(&name) {
            return;
        }
        if self.all.len() >= MAX_TRACKED {
            self.more = true;
            return;
        }
        // The listed names are the first MAX_LISTED in order: only a name that sorts among them
        // changes the list (rows come in key order, so past the first MAX_LISTED almost none do).
        let listed = self.names.len() < MAX_LISTED || self.names.last().is_some_and(|l| name < *l);
        self.all.insert(name);
        self.count = self.all.len();
        if listed {
            self.names = self.all.iter().take(MAX_LISTED).cloned().collect();
        }
        self.more |= self.all.len() > MAX_LISTED;
    }

    /// Whether the map `name` is in the set (all tracked names, not only those listed).
    pub fn contains(&self, name: &str) -> bool {
        self.all.contains(name) || self.names.iter().any(|n| n == name)
    }
}

/// Whether a project-configuration row says its map runs.
pub fn running(row: &Value) -> bool {
    row.get("Status")
        .and_then(Value::as_str)
        .is_some_and(|s| s.trim().eq_ignore_ascii_case("running"))
}

/// The re-apply checklist: the maps that ran before (`before`, from detection) against those
/// running towards this Dataverse now.
pub fn reapply(before: &Maps, now: &Maps) -> Value {
    let missing: Vec<&String> = before.names.iter().filter(|n| !now.contains(n)).collect();
    let running_again = before.names.len() - missing.len();
    json!({
        "before": before.count,
        "before_listed": before.names.len(),
        "running_now": now.count,
        "running_again": running_again,
        "missing": missing,
        "missing_count": missing.len(),
    })
}

/// One line for the run's outcome and notices.
pub fn summary(reapply: &Value) -> Option<String> {
    let before = reapply.get("before")?.as_u64()?;
    if before == 0 {
        return None;
    }
    let again = reapply.get("running_again")?.as_u64()?;
    let missing: Vec<&str> = reapply
        .get("missing")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let listed = reapply.get("before_listed")?.as_u64()?;
    let scope = if listed < before {
        format!(" (the first {listed} checked)")
    } else {
        String::new()
    };
    Some(if missing.is_empty() {
        format!("of {before} maps that ran before, {again} run again{scope}; none missing")
    } else {
        const SHOWN: usize = 10;
        let more = if missing.len() > SHOWN {
            format!(" and {} more (relink report)", missing.len() - SHOWN)
        } else {
            String::new()
        };
        format!(
            "of {before} maps that ran before, {again} run again{scope}; missing: {}{more}",
            missing
                .iter()
                .take(SHOWN)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, status: &str) -> Value {
        json!({"ProjectName": name, "Status": status, "InternalEntityName": "A", "ExternalEntityName": "b"})
    }

    #[test]
    fn the_checklist_names_what_does_not_run_again() {
        let mut before = Maps::default();
        for n in ["Customers", "Vendors", "Customers", "Products"] {
            before.add(&row(n, "Running"));
        }
        assert_eq!(before.count, 3, "a map in two legal entities is one map");
        let mut now = Maps::default();
        now.add(&row("Customers", "Running"));
        let r = reapply(&before, &now);
        assert_eq!(r["missing"], json!(["Products", "Vendors"]));
        assert_eq!(
            summary(&r).unwrap(),
            "of 3 maps that ran before, 1 run again; missing: Products, Vendors"
        );
        assert!(running(&row("x", "running")) && !running(&row("x", "NotRunning")));
        assert!(!running(&json!({"Status": 1})));
    }

    #[test]
    fn names_are_bounded_and_printable() {
        let mut maps = Maps::default();
        for i in 0..(MAX_TRACKED + 5) {
            maps.add(&row(&format!("map {i:06}"), "Running"));
        }
        assert_eq!(maps.count, MAX_TRACKED);
        assert_eq!(maps.names.len(), MAX_LISTED);
        assert!(maps.more);
        let mut odd = Maps::default();
        odd.add(&row(
            &format!("evil\u{1b}[2J{}", "x".repeat(500)),
            "Running",
        ));
        assert!(odd.names[0].len() <= MAX_NAME && !odd.names[0].contains('\u{1b}'));
        odd.add(&json!({"Status": "Running"}));
        assert_eq!(odd.count, 1, "a row without a name is not a map");
    }
}
