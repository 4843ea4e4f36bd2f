//! The one status handle every task reports through. A task changes its own section with
//! [`Report::update`]; one rule ([`ConsoleKey`]) decides whether the change is worth a
//! `labforge-status {json}` console line; `/status` and `/metrics` read [`Report::snapshot`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::cluster::discovery::net::Counters as BeaconCounters;
use crate::disks::DisksState;
use crate::install::write::InstallState;
use crate::preload::{ImportFailure, PreloadState};
use crate::pxe::PxeState;
use crate::status::{Counters, Phase, Role, Status};
use crate::system::SystemHealth;

/// Counters bumped where things happen (beacon sockets, HTTP handlers), read when the status
/// is.
#[derive(Debug, Default)]
pub struct Tally {
    pub beacons: Arc<BeaconCounters>,
    pub join_served: AtomicU64,
    pub join_rejected: AtomicU64,
    /// Netboot files served over HTTP.
    pub pxe_served: AtomicU64,
    /// Preloaded-image blobs served to netbooted nodes.
    pub preload_served: AtomicU64,
}

/// What a console line is printed for: a change in any of these.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleKey {
    phase: Phase,
    role: Role,
    peers: usize,
    system: SystemHealth,
    preload: (PreloadState, Vec<ImportFailure>),
    disks: DisksState,
    install: Option<InstallState>,
    pxe: Option<PxeState>,
    ceph: Option<BTreeMap<String, Vec<String>>>,
    /// A skewed clock is worth a line when it appears and when it is gone.
    clock_skew: bool,
    /// The API server starting or stopping to answer, and this node's readiness.
    kube_api: Option<(crate::cluster::api::ApiState, Option<bool>)>,
    /// The stack's state and each component's.
    stack: Option<(String, Vec<crate::stack::plan::State>)>,
}

impl ConsoleKey {
    /// The key of a status, or `None` while the agent has not decided anything yet (a line
    /// then would say nothing).
    pub fn of(s: &Status) -> Option<ConsoleKey> {
        (s.phase != Phase::Starting).then(|| ConsoleKey {
            phase: s.phase,
            role: s.role,
            peers: s.peers.len(),
            system: s.system.clone(),
            preload: (s.preload.state, s.preload.failed.clone()),
            disks: s.disks.state,
            install: s.install.as_ref().map(|i| i.state),
            pxe: s.pxe.as_ref().map(|p| p.state),
            ceph: s.ceph.as_ref().map(|c| c.nodes.clone()),
            clock_skew: s.clock_skew.is_some(),
            kube_api: s.kube_api.as_ref().map(|k| (k.state, k.node_ready)),
            stack: s.stack.as_ref().map(|st| (st.state.clone(), st.components.iter().map(|c| c.state).collect())),
        })
    }
}

#[derive(Clone)]
pub struct Report {
    inner: Arc<Inner>,
}

struct Inner {
    status: Mutex<Status>,
    /// The key of the last line printed; held while printing, so lines come out in the order
    /// the changes were made.
    printed: Mutex<Option<ConsoleKey>>,
    tally: Tally,
}

impl Report {
    pub fn new(status: Status) -> Self {
        Report {
            inner: Arc::new(Inner { status: Mutex::new(status), printed: Mutex::new(None), tally: Tally::default() }),
        }
    }

    /// Changes the status and prints the console line if the change is worth one.
    pub fn update<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        let mut printed = lock(&self.inner.printed);
        let r = f(&mut lock(&self.inner.status));
        let snap = self.snapshot();
        let key = ConsoleKey::of(&snap);
        if key.is_some() && key != *printed {
            snap.announce();
            *printed = key;
        }
        r
    }

    /// The status with its counters as they are at this instant.
    pub fn snapshot(&self) -> Status {
        let mut s = lock(&self.inner.status).clone();
        let t = &self.inner.tally;
        let b = &t.beacons;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        s.counters = Counters {
            beacons_sent: n(&b.sent),
            beacons_received: n(&b.received),
            beacons_rejected_malformed: n(&b.malformed),
            beacons_rejected_bad_mac: n(&b.bad_mac),
            beacons_rejected_stale: n(&b.stale),
            beacons_rejected_replay: n(&b.replay),
            beacons_rejected_invalid: n(&b.invalid),
            join_served: n(&t.join_served),
            join_rejected: n(&t.join_rejected),
        };
        if let Some(p) = s.pxe.as_mut() {
            p.served = n(&t.pxe_served);
            p.preload_served = n(&t.preload_served);
        }
        s
    }

    pub fn tally(&self) -> &Tally {
        &self.inner.tally
    }
}

/// A poisoned lock only means a task panicked while holding it; the status is still the best
/// there is (and the panic itself stops the agent, see `daemon`).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preload::PreloadStatus;
    use crate::pxe::PxeStatus;
    use crate::system::SystemState;

    fn status() -> Status {
        serde_json::from_value(serde_json::json!({
            "agent_version": "0", "image": "demo", "node_id": "n1", "phase": "starting", "role": "undecided",
            "cluster_uid": null, "lan_address": null, "master_address": null, "kubernetes": "disabled",
            "join_info_sha256": null, "message": "", "peers": [],
            "node": {"machine_id": "n1", "hostname": "h", "nics": [], "disks": []},
            "state": {"dir": "/var/lib/labforge", "size_bytes": 1}
        }))
        .expect("a minimal status")
    }

    #[test]
    fn nothing_is_printed_before_a_phase_is_set() {
        let mut s = status();
        assert_eq!(ConsoleKey::of(&s), None);
        s.phase = Phase::Discovering;
        assert!(ConsoleKey::of(&s).is_some());
    }

    #[test]
    fn section_states_change_the_key_and_progress_does_not() {
        let mut s = status();
        s.phase = Phase::Ready;
        let key = |s: &Status| ConsoleKey::of(s).unwrap();
        let k0 = key(&s);
        // Words and progress are not worth a line.
        s.message = "something else".into();
        s.preload = PreloadStatus { imported: 3, ..s.preload.clone() };
        s.counters.beacons_sent = 99;
        assert_eq!(key(&s), k0);
        // States are.
        for change in [
            |s: &mut Status| s.role = Role::Master,
            |s: &mut Status| s.system.state = SystemState::Running,
            |s: &mut Status| s.preload.state = PreloadState::Done,
            |s: &mut Status| s.disks.state = DisksState::Done,
            |s: &mut Status| s.pxe = Some(PxeStatus::default()),
            |s: &mut Status| s.phase = Phase::Error,
        ] {
            let mut t = s.clone();
            change(&mut t);
            assert_ne!(key(&t), k0);
        }
    }

    #[test]
    fn counters_are_read_at_snapshot_time() {
        let r = Report::new(status());
        r.tally().join_served.fetch_add(2, Ordering::Relaxed);
        r.tally().beacons.sent.fetch_add(5, Ordering::Relaxed);
        r.update(|s| s.pxe = Some(PxeStatus::default()));
        r.tally().pxe_served.fetch_add(7, Ordering::Relaxed);
        let s = r.snapshot();
        assert_eq!((s.counters.join_served, s.counters.beacons_sent), (2, 5));
        assert_eq!(s.pxe.unwrap().served, 7);
    }
}
