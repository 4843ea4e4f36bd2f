//! The stack's decisions, without effects: given the components in order, what was applied
//! (kept on the state volume) and what the last round saw, which component does what now.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the stack remembers across boots, per component.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The digest of the objects applied completely (every object accepted).
    pub digest: String,
    /// `apiVersion/kind` of every kind it ever applied (where prune looks).
    pub kinds: Vec<String>,
}

/// The state file: component name → what was applied.
pub type Memory = BTreeMap<String, Applied>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Waits for a component it depends on.
    Blocked,
    /// Its objects are being applied.
    Applying,
    /// Applied; waits for its readiness gates.
    Waiting,
    Ready,
    /// The last attempt failed; tried again after a pause.
    Failed,
}

/// What the round does with one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A dependency is not ready: nothing.
    Wait { on: String },
    /// Still in its pause after a failure.
    Pause { left: Duration },
    /// Apply its objects (a new or changed digest), prune, then check the gates.
    Apply,
    /// Already applied at this digest: check the gates only.
    Check,
}

/// The pause after `failures` failed attempts in a row: 10 s, doubling, at most 10 minutes.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(10u64.saturating_mul(1 << failures.saturating_sub(1).min(6))).min(Duration::from_secs(600))
}

/// One component's input to the planner.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub name: &'a str,
    pub depends_on: &'a [String],
    /// The digest of its objects as rendered now (None: rendering failed).
    pub digest: Option<&'a str>,
    /// Failed attempts in a row, and how long since the last one.
    pub failures: u32,
    pub since_failure: Duration,
}

/// One component's step. `ready` says which components are ready (as the last check found
/// them, or this round's earlier checks); `memory` what was applied.
pub fn step(c: &Input, memory: &Memory, ready: &BTreeMap<String, bool>) -> Step {
    if let Some(dep) = c.depends_on.iter().find(|d| !ready.get(d.as_str()).copied().unwrap_or(false)) {
        return Step::Wait { on: dep.clone() };
    }
    if c.failures > 0 {
        let pause = backoff(c.failures);
        if c.since_failure < pause {
            return Step::Pause { left: pause - c.since_failure };
        }
    }
    match (c.digest, memory.get(c.name)) {
        (Some(d), Some(a)) if a.digest == d => Step::Check,
        _ => Step::Apply,
    }
}

/// Why the stack waits for the preloaded images, if it does: this boot's first round is still
/// putting them into containerd (kubeadm starts once its own are in; the components' come
/// after, and a pod whose image is missing would go to a registry the lab does not have).
/// Failed imports do not hold it back, nor do the rounds that retry them: the component's
/// readiness then shows the pod that cannot start, and the preload section names the image.
pub fn images_pending(p: &crate::preload::PreloadStatus) -> Option<String> {
    use crate::preload::PreloadState;
    let first_round = match p.state {
        PreloadState::Waiting => true,
        PreloadState::Importing => p.rounds <= 1,
        _ => false,
    };
    first_round.then(|| {
        format!(
            "waiting for the preloaded images to be in containerd ({} of {} in) before applying the stack",
            p.imported + p.present,
            p.total
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(name: &'a str, deps: &'a [String], digest: &'a str) -> Input<'a> {
        Input { name, depends_on: deps, digest: Some(digest), failures: 0, since_failure: Duration::ZERO }
    }

    #[test]
    fn unchanged_components_are_only_checked_and_changed_ones_applied() {
        let mut memory = Memory::new();
        memory.insert("storage".into(), Applied { digest: "a".into(), kinds: vec![] });
        let none: Vec<String> = vec![];
        let ready = BTreeMap::new();
        assert_eq!(step(&input("storage", &none, "a"), &memory, &ready), Step::Check);
        assert_eq!(step(&input("storage", &none, "b"), &memory, &ready), Step::Apply, "a new version");
        assert_eq!(step(&input("other", &none, "a"), &memory, &ready), Step::Apply, "never applied");
    }

    #[test]
    fn dependents_wait_for_readiness_and_failures_pause_growing() {
        let deps = vec!["storage".to_string()];
        let memory = Memory::new();
        let mut ready = BTreeMap::from([("storage".to_string(), false)]);
        assert_eq!(step(&input("monitoring", &deps, "x"), &memory, &ready), Step::Wait { on: "storage".into() });
        ready.insert("storage".into(), true);
        assert_eq!(step(&input("monitoring", &deps, "x"), &memory, &ready), Step::Apply);
        let mut failed = input("monitoring", &deps, "x");
        failed.failures = 3;
        failed.since_failure = Duration::from_secs(15);
        assert_eq!(step(&failed, &memory, &ready), Step::Pause { left: Duration::from_secs(25) });
        failed.since_failure = Duration::from_secs(40);
        assert_eq!(step(&failed, &memory, &ready), Step::Apply);
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(30), Duration::from_secs(600), "never more than 10 minutes");
    }

    #[test]
    fn the_stack_waits_for_its_images_not_for_failed_ones() {
        use crate::preload::{PreloadState, PreloadStatus};
        let p =
            |state, rounds| PreloadStatus { state, rounds, total: 9, imported: 5, present: 1, ..Default::default() };
        assert!(images_pending(&p(PreloadState::Importing, 1)).is_some_and(|m| m.contains("6 of 9")));
        assert!(images_pending(&p(PreloadState::Waiting, 0)).is_some());
        for go in [PreloadState::None, PreloadState::Done, PreloadState::Retrying, PreloadState::Failed] {
            assert_eq!(images_pending(&p(go, 1)), None, "{go:?}");
        }
        // The rounds retrying a failed image do not take the stack down each time.
        assert_eq!(images_pending(&p(PreloadState::Importing, 2)), None);
    }
}
