//! Dependency order: a component comes after everything it depends on; among components free to
//! go, the one named first in the input goes first, so the order is stable.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};

/// Orders `(name, depends-on)` pairs. A dependency on a component not in the set, and a cycle
/// (named in full), are errors.
pub fn dependency_order(items: &[(String, Vec<String>)]) -> Result<Vec<String>> {
    let index: BTreeMap<&str, usize> = items.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
    if index.len() != items.len() {
        let mut seen = BTreeSet::new();
        for (n, _) in items {
            if !seen.insert(n.as_str()) {
                bail!("component {n} is named twice");
            }
        }
    }
    for (n, deps) in items {
        for d in deps {
            if !index.contains_key(d.as_str()) {
                bail!("component {n} depends on {d}, which this stack does not run (add it to [stack] components)");
            }
            if d == n {
                bail!("component {n} depends on itself");
            }
        }
    }
    let mut done: BTreeSet<usize> = BTreeSet::new();
    let mut out = Vec::with_capacity(items.len());
    while out.len() < items.len() {
        let next = items
            .iter()
            .enumerate()
            .find(|(i, (_, deps))| !done.contains(i) && deps.iter().all(|d| done.contains(&index[d.as_str()])));
        match next {
            Some((i, (n, _))) => {
                done.insert(i);
                out.push(n.clone());
            }
            None => {
                let cycle = find_cycle(items, &index, &done);
                bail!("components depend on each other in a circle: {}", cycle.join(" → "));
            }
        }
    }
    Ok(out)
}

/// Follows unmet dependencies from the first blocked component until a name repeats.
fn find_cycle(items: &[(String, Vec<String>)], index: &BTreeMap<&str, usize>, done: &BTreeSet<usize>) -> Vec<String> {
    let start = (0..items.len()).find(|i| !done.contains(i)).expect("a blocked component");
    let mut path: Vec<usize> = vec![start];
    loop {
        let cur = *path.last().expect("non-empty");
        let next = items[cur].1.iter().map(|d| index[d.as_str()]).find(|j| !done.contains(j)).expect("blocked");
        if let Some(pos) = path.iter().position(|&p| p == next) {
            let mut names: Vec<String> = path[pos..].iter().map(|&i| items[i].0.clone()).collect();
            names.push(items[next].0.clone());
            return names;
        }
        path.push(next);
    }
}
