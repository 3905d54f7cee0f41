//! Checks of the module and event graph that need no build tooling.

use crate::registry;

/// Every rule the graph breaks, as sentences.
pub fn check(events: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    for name in events {
        let parts: Vec<&str> = name.split('.').collect();
        let well_formed = parts.len() == 3
            && parts[1].chars().all(|c| c.is_ascii_lowercase() || c == '_')
            && parts[2]
                .strip_prefix('v')
                .is_some_and(|v| v.parse::<u32>().is_ok_and(|n| n > 0));
        if !well_formed {
            problems.push(format!("event {name:?} is not <module>.<event>.v<N>"));
        }
        if !registry::is_module(parts[0]) {
            problems.push(format!("event {name:?} belongs to no module"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for name in events {
        if !seen.insert(name) {
            problems.push(format!("event {name:?} is declared twice"));
        }
    }
    for spec in &registry::ALL {
        for source in spec.consumes {
            if !registry::is_module(source) {
                problems.push(format!(
                    "{} consumes from unknown module {source:?}",
                    spec.name
                ));
            }
            if *source == spec.name {
                problems.push(format!("{} consumes its own events", spec.name));
            }
            if !events.iter().any(|e| e.split('.').next() == Some(source)) {
                problems.push(format!(
                    "{} consumes from {source}, which publishes nothing",
                    spec.name
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_graph_is_clean() {
        assert_eq!(check(&contracts::all_event_names()), Vec::<String>::new());
    }

    #[test]
    fn malformed_or_orphan_event_names_are_reported() {
        let mut events = contracts::all_event_names();
        events.extend([
            "catalog.ProductListed",
            "billing.invoice_sent.v1",
            "cart.item_added.v0",
        ]);
        let problems = check(&events);
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
