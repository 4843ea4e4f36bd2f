//! What the node does next, as data: the election's decision and what the node already did
//! become one [`Step`] for the executor (`cluster::Cluster`). Pure, so every case is a table
//! row in the tests below.

use std::time::{Duration, Instant};

use crate::cluster::election::{Allegiance, Decision};
use crate::cluster::join::JoinInfo;
use crate::cluster::state::State;
use crate::status::Phase;

/// A bootstrap token is renewed when it has less than this left.
pub const TOKEN_RENEW_BEFORE_SECS: u64 = 2 * 3600;

/// What the cluster task does this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to change; report where the node is.
    Report { phase: Phase, message: String },
    /// Claim mastership under a fresh uid (persist, then announce).
    Claim,
    /// Commit our claim `uid` (persist, then announce), then lead.
    Commit { uid: String },
    /// Lead the committed cluster (init once, serve join info).
    Lead,
    /// Give our claim up for a better one (persist; the next round follows it).
    Yield { allegiance: Allegiance },
    /// Follow `allegiance` (persisted first if it is new), then do `then`.
    Follow { allegiance: Allegiance, then: Follow },
    /// Refuse to be a second master (persist the refusal).
    Conflict { allegiance: Allegiance, reason: String },
}

/// What a follower does once its allegiance is saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Follow {
    /// Fetch join info from the master's status port at `address` (host:port) and join.
    Join { address: String },
    /// Joined on an earlier round or boot; the master is out of sight for now.
    StayJoined,
    /// The master has not committed, or is not in sight.
    Wait { message: String },
}

/// The step for `decision`, given what this node saved, whether it still listens in the settle
/// window, and where the master's status port is (when its beacons are heard).
pub fn step(decision: Decision, state: &State, settling: bool, master_address: Option<String>) -> Step {
    match decision {
        Decision::Wait { reason } => {
            Step::Report { phase: if settling { Phase::Discovering } else { Phase::Electing }, message: reason }
        }
        Decision::Claim => Step::Claim,
        Decision::Commit => match state.allegiance.uid() {
            Some(uid) => Step::Commit { uid: uid.to_string() },
            None => {
                Step::Report { phase: Phase::Error, message: "asked to commit a claim this node never made".into() }
            }
        },
        Decision::Lead => Step::Lead,
        Decision::Yield { uid, master } => Step::Yield { allegiance: Allegiance::Follower { uid, master } },
        Decision::Follow { uid, master, ready } => {
            let then = match (ready, master_address) {
                (true, Some(address)) => Follow::Join { address },
                _ if state.joined => Follow::StayJoined,
                _ => Follow::Wait { message: format!("waiting for {master} to lead cluster {uid}") },
            };
            Step::Follow { allegiance: Allegiance::Follower { uid, master }, then }
        }
        Decision::Conflict { uid, master, reason } => {
            Step::Conflict { allegiance: Allegiance::Refused { uid, master }, reason }
        }
    }
}

/// A node that recently heard an authentic beacon from a clock outside the freshness window,
/// and no peer whose clock agrees with its own, must not claim mastership: if its own clock is
/// the wrong one it hears no one and would form a second cluster. `skew` is that peer and its
/// clock minus ours (ms). Leading a cluster committed before goes on.
pub fn hold_claims(step: Step, skew: Option<(&str, i64)>) -> Step {
    match (step, skew) {
        (Step::Claim | Step::Commit { .. }, Some((peer, offset_ms))) => Step::Report {
            phase: Phase::ClockSkew,
            message: format!(
                "clock skew: node {peer}'s clock is {}{} s from ours, beyond the {} s beacons allow; this node will \
                 not claim mastership until its clock is set right (check the BIOS clock and time sync)",
                if offset_ms >= 0 { "+" } else { "-" },
                offset_ms.unsigned_abs() / 1000,
                crate::cluster::discovery::beacon::MAX_SKEW_MS / 1000
            ),
        },
        (step, _) => step,
    }
}

/// What leading needs from kubeadm this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lead {
    /// Mint the join info: run `kubeadm init` (unless it finished before a power cut) with
    /// `token`, a token saved before an interrupted init, or a fresh one when `None`.
    Init { token: Option<String> },
    /// Renew the bootstrap token, then serve.
    RenewToken,
    /// Serve the join info as it is.
    Serve,
}

/// The master's next kubeadm step.
pub fn lead(state: &State, kubernetes: bool, now_secs: u64) -> Lead {
    match &state.join_info {
        Some(info) if state.initialised => {
            if kubernetes && info.token_expires <= now_secs + TOKEN_RENEW_BEFORE_SECS {
                Lead::RenewToken
            } else {
                Lead::Serve
            }
        }
        info => Lead::Init { token: info.as_ref().map(|i| i.token.clone()).filter(|t| !t.is_empty()) },
    }
}

/// How long to wait before trying a failed kubeadm step again: 10 s, doubling with each
/// failure in a row, at most 10 minutes.
pub fn retry_pause(failures: u32) -> Duration {
    let secs = 10u64.saturating_mul(1u64 << failures.saturating_sub(1).min(16));
    Duration::from_secs(secs.min(600))
}

/// Failures of kubeadm steps in a row, and when the next attempt may run.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
    until: Option<Instant>,
    last: String,
}

impl Backoff {
    /// Time left before the next attempt, and why the last one failed; `None` when it may run.
    pub fn wait(&self, now: Instant) -> Option<(Duration, &str)> {
        let until = self.until?;
        (until > now).then(|| (until - now, self.last.as_str()))
    }

    /// Records a failure at `now`; returns the message to report until the next attempt
    /// (the error and when it is tried again).
    pub fn failed(&mut self, now: Instant, error: &str) -> String {
        self.failures += 1;
        let pause = retry_pause(self.failures);
        self.until = Some(now + pause);
        self.last = format!("{error}; trying again in {} s", pause.as_secs());
        self.last.clone()
    }

    pub fn succeeded(&mut self) {
        *self = Backoff::default();
    }
}

/// The message a node reports once it leads or joined.
pub fn ready_message(leading: bool, kubernetes: bool) -> &'static str {
    match (leading, kubernetes) {
        (true, true) => "leading the cluster",
        (true, false) => "leading the cluster (kubernetes disabled in this image: no kubeadm was run)",
        (false, true) => "joined",
        (false, false) => "joined (kubernetes disabled in this image: no kubeadm was run)",
    }
}

/// Why kubeadm must wait for the preloaded images, if it must: they are still going into
/// containerd (kubeadm would try to pull what is missing, and a lab node has no registry).
/// `kubeadm init` waits only for the ones it needs (the control plane's and the sandbox, first
/// in the layout): the stack's keep coming in while it runs, and the stack waits for them. A
/// join waits for every image: once its node is Ready, the scheduler sends it pods whose images
/// must be there. Failed imports do not hold kubeadm back (it then names the missing image
/// itself); a round that could not even ask containerd what it holds does.
pub fn awaiting_images(p: &crate::preload::PreloadStatus, init: bool) -> Option<String> {
    use crate::preload::PreloadState;
    let busy = match p.state {
        PreloadState::Waiting => true,
        PreloadState::Importing if !init => true,
        PreloadState::Importing | PreloadState::Retrying if init => !p.kubeadm_ready,
        _ => false,
    };
    busy.then(|| {
        let (which, done, of) = if init {
            ("the preloaded images kubeadm needs", (p.imported + p.present).min(p.kubeadm_images), p.kubeadm_images)
        } else {
            ("the preloaded images", p.imported + p.present, p.total)
        };
        format!("waiting for {which} to be in containerd ({done} of {of} in) before kubeadm runs")
    })
}

/// What the API server says of this node once its kubeadm step finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeHealth {
    /// The Node's Ready condition is True.
    Ready,
    /// Listed, not Ready (no pod network yet, kubelet still starting).
    NotReady,
    /// Not listed yet, or the API server did not answer.
    Unlisted,
    /// The image has no kubectl to ask with (a test image with the kubeadm double).
    Unobservable,
}

/// The phase of a node whose kubeadm step is done: `ready` once the API server reports the
/// node Ready (or Kubernetes is off, or nothing can tell), otherwise still initialising or
/// joining, saying what it waits for.
pub fn settled(leading: bool, kubernetes: bool, health: NodeHealth) -> (Phase, &'static str) {
    let waiting = if leading { Phase::Initialising } else { Phase::Joining };
    match (kubernetes, health) {
        (false, _) | (true, NodeHealth::Ready) => (Phase::Ready, ready_message(leading, kubernetes)),
        (true, NodeHealth::Unobservable) if leading => {
            (Phase::Ready, "leading the cluster (no kubectl in this image: kubeadm init's exit is all that is known)")
        }
        (true, NodeHealth::Unobservable) => {
            (Phase::Ready, "joined (no kubectl in this image: kubeadm join's exit is all that is known)")
        }
        (true, NodeHealth::NotReady) => {
            (waiting, "kubeadm finished; waiting for the kubelet to report this node Ready (pod network, system pods)")
        }
        (true, NodeHealth::Unlisted) => (waiting, "kubeadm finished; waiting for the API server to list this node"),
    }
}

/// Whether `info` answers for the cluster this node follows.
pub fn check_join_info(info: &JoinInfo, uid: &str) -> Result<(), String> {
    if info.cluster_uid == uid {
        Ok(())
    } else {
        Err(format!("the master answered for cluster {}, expected {uid}", info.cluster_uid))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kubeadm_waits_for_the_preloaded_images() {
        use crate::preload::{PreloadState, PreloadStatus};
        let p =
            |state| PreloadStatus { state, total: 8, imported: 3, present: 1, kubeadm_images: 5, ..Default::default() };
        assert!(awaiting_images(&p(PreloadState::Importing), true).is_some_and(|m| m.contains("(4 of 5 in)")));
        assert!(awaiting_images(&p(PreloadState::Importing), false).is_some_and(|m| m.contains("(4 of 8 in)")));
        for init in [true, false] {
            assert!(awaiting_images(&p(PreloadState::Waiting), init).is_some());
            for go in [PreloadState::None, PreloadState::Done, PreloadState::Failed] {
                assert_eq!(awaiting_images(&p(go), init), None, "{go:?}");
            }
        }
        // Once kubeadm's own images are through, init goes while the stack's keep coming in;
        // a join still waits for every image (its node would be sent pods at once).
        let through = |state| PreloadStatus { kubeadm_ready: true, ..p(state) };
        assert_eq!(awaiting_images(&through(PreloadState::Importing), true), None);
        assert!(awaiting_images(&through(PreloadState::Importing), false).is_some());
        assert!(awaiting_images(&through(PreloadState::Waiting), true).is_some(), "containerd is down");
        // A failed import does not hold kubeadm back; a round that never got to the images does.
        assert_eq!(awaiting_images(&through(PreloadState::Retrying), true), None);
        assert_eq!(awaiting_images(&through(PreloadState::Retrying), false), None);
        assert!(awaiting_images(&p(PreloadState::Retrying), true).is_some());
    }

    #[test]
    fn ready_means_the_api_server_says_so() {
        use NodeHealth::*;
        assert_eq!(settled(true, true, Ready).0, Phase::Ready);
        assert_eq!(settled(true, true, NotReady).0, Phase::Initialising);
        assert_eq!(settled(false, true, NotReady).0, Phase::Joining);
        assert!(settled(false, true, Unlisted).1.contains("list this node"));
        assert_eq!(settled(false, false, Unlisted).0, Phase::Ready, "kubernetes off: nothing to wait for");
        let (phase, message) = settled(true, true, Unobservable);
        assert_eq!(phase, Phase::Ready);
        assert!(message.contains("no kubectl"), "{message}");
    }

    #[test]
    fn failed_kubeadm_steps_wait_longer_each_time() {
        use super::*;
        let pauses: Vec<u64> = (1..=8).map(|n| retry_pause(n).as_secs()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 600, 600]);
        assert_eq!(retry_pause(u32::MAX).as_secs(), 600);
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(b.wait(t0).is_none(), "the first attempt runs at once");
        assert_eq!(b.failed(t0, "boom"), "boom; trying again in 10 s");
        assert_eq!(b.wait(t0 + Duration::from_secs(4)), Some((Duration::from_secs(6), "boom; trying again in 10 s")));
        assert!(b.wait(t0 + Duration::from_secs(10)).is_none(), "then it runs again");
        assert_eq!(b.failed(t0 + Duration::from_secs(10), "boom"), "boom; trying again in 20 s");
        b.succeeded();
        assert!(b.wait(t0 + Duration::from_secs(11)).is_none());
        assert_eq!(b.failed(t0, "again"), "again; trying again in 10 s", "a success resets the count");
    }

    use super::*;

    fn state(allegiance: Allegiance, joined: bool) -> State {
        State { allegiance, joined, ..State::default() }
    }

    fn follower() -> Allegiance {
        Allegiance::Follower { uid: "u1".into(), master: "m".into() }
    }

    #[test]
    fn every_decision_maps_to_one_step() {
        let none = state(Allegiance::None, false);
        let claimed = state(Allegiance::Master { uid: "u1".into(), committed: false }, false);
        let joined = state(follower(), true);
        let addr = || Some("10.0.0.2:9743".to_string());
        let follow = |ready| Decision::Follow { uid: "u1".into(), master: "m".into(), ready };
        let wait_msg = "waiting for m to lead cluster u1".to_string();
        let cases: Vec<(Decision, &State, bool, Option<String>, Step)> = vec![
            (
                Decision::Wait { reason: "r".into() },
                &none,
                true,
                None,
                Step::Report { phase: Phase::Discovering, message: "r".into() },
            ),
            (
                Decision::Wait { reason: "r".into() },
                &none,
                false,
                None,
                Step::Report { phase: Phase::Electing, message: "r".into() },
            ),
            (Decision::Claim, &none, false, None, Step::Claim),
            (Decision::Commit, &claimed, false, None, Step::Commit { uid: "u1".into() }),
            (Decision::Lead, &claimed, false, None, Step::Lead),
            (
                Decision::Yield { uid: "u2".into(), master: "m2".into() },
                &claimed,
                false,
                None,
                Step::Yield { allegiance: Allegiance::Follower { uid: "u2".into(), master: "m2".into() } },
            ),
            // Ready and in sight: join.
            (
                follow(true),
                &none,
                false,
                addr(),
                Step::Follow { allegiance: follower(), then: Follow::Join { address: addr().unwrap() } },
            ),
            // Ready but out of sight: a joined node stays joined, a new one waits.
            (follow(true), &joined, false, None, Step::Follow { allegiance: follower(), then: Follow::StayJoined }),
            (
                follow(true),
                &none,
                false,
                None,
                Step::Follow { allegiance: follower(), then: Follow::Wait { message: wait_msg.clone() } },
            ),
            // Not committed yet: wait, even when in sight.
            (
                follow(false),
                &none,
                false,
                addr(),
                Step::Follow { allegiance: follower(), then: Follow::Wait { message: wait_msg } },
            ),
            (
                Decision::Conflict { uid: "u1".into(), master: "m".into(), reason: "two".into() },
                &none,
                false,
                None,
                Step::Conflict {
                    allegiance: Allegiance::Refused { uid: "u1".into(), master: "m".into() },
                    reason: "two".into(),
                },
            ),
        ];
        for (decision, st, settling, address, want) in cases {
            let what = format!("{decision:?}");
            assert_eq!(step(decision, st, settling, address), want, "{what}");
        }
    }

    #[test]
    fn committing_a_claim_never_made_is_an_error() {
        let s = step(Decision::Commit, &state(Allegiance::None, false), false, None);
        assert!(matches!(s, Step::Report { phase: Phase::Error, .. }), "{s:?}");
    }

    fn info(token: &str, expires: u64) -> JoinInfo {
        JoinInfo {
            cluster_uid: "u1".into(),
            endpoint: "lab-api:6443".into(),
            master_address: "10.0.0.2".into(),
            token: token.into(),
            ca_cert_hash: "sha256:00".into(),
            token_expires: expires,
        }
    }

    #[test]
    fn the_master_inits_once_and_renews_tokens_before_they_expire() {
        let now = 1_000_000;
        let mut s = State::default();
        assert_eq!(lead(&s, true, now), Lead::Init { token: None });
        // A power cut mid-init: the saved token is used again.
        s.join_info = Some(info("abcdef.0123456789abcdef", now + 86400));
        assert_eq!(lead(&s, true, now), Lead::Init { token: Some("abcdef.0123456789abcdef".into()) });
        s.initialised = true;
        assert_eq!(lead(&s, true, now), Lead::Serve);
        s.join_info = Some(info("abcdef.0123456789abcdef", now + 3600));
        assert_eq!(lead(&s, true, now), Lead::RenewToken);
        // Without Kubernetes there is no token to renew.
        assert_eq!(lead(&s, false, now), Lead::Serve);
    }

    #[test]
    fn join_info_must_be_for_the_followed_cluster() {
        assert!(check_join_info(&info("", 0), "u1").is_ok());
        assert!(check_join_info(&info("", 0), "u2").unwrap_err().contains("expected u2"));
    }

    #[test]
    fn a_node_with_a_skewed_clock_claims_nothing_but_keeps_leading() {
        let skew = Some(("n2", 600_000));
        let held = hold_claims(Step::Claim, skew);
        assert!(
            matches!(&held, Step::Report { phase: Phase::ClockSkew, message } if message.contains("+600 s") && message.contains("n2")),
            "{held:?}"
        );
        assert!(
            matches!(hold_claims(Step::Commit { uid: "u".into() }, Some(("n2", -600_000))), Step::Report { phase: Phase::ClockSkew, message } if message.contains("-600 s"))
        );
        assert_eq!(hold_claims(Step::Lead, skew), Step::Lead);
        assert_eq!(hold_claims(Step::Claim, None), Step::Claim);
    }
}
