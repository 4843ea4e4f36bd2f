use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

const W: u64 = 20; // settle window, in ticks (seconds)

fn params(min: usize) -> Params {
    Params { minimum_nodes: min, settle: Duration::from_secs(W) }
}

fn node(id: &str, policy: RolePolicy, allegiance: Allegiance) -> NodeView {
    NodeView { id: id.into(), priority: u32::MAX, policy, allegiance }
}

fn auto(id: &str) -> NodeView {
    node(id, RolePolicy::Auto, Allegiance::None)
}

fn settled() -> Duration {
    Duration::from_secs(W)
}

#[test]
fn lowest_id_claims_after_the_settle_window() {
    let (a, b) = (auto("a"), auto("b"));
    assert!(matches!(decide(&a, std::slice::from_ref(&b), Duration::from_secs(1), &params(1)), Decision::Wait { .. }));
    assert_eq!(decide(&a, std::slice::from_ref(&b), settled(), &params(1)), Decision::Claim);
    assert!(
        matches!(decide(&b, &[a], settled(), &params(1)), Decision::Wait { reason } if reason.contains("expecting a"))
    );
}

#[test]
fn priority_beats_node_id() {
    let a = auto("a");
    let mut z = auto("z");
    z.priority = 0;
    assert_eq!(decide(&z, std::slice::from_ref(&a), settled(), &params(1)), Decision::Claim);
    assert!(matches!(decide(&a, &[z], settled(), &params(1)), Decision::Wait { .. }));
}

#[test]
fn minimum_nodes_is_waited_for() {
    let d = decide(&auto("a"), &[auto("b")], settled(), &params(3));
    assert_eq!(d, Decision::Wait { reason: "2 of 3 nodes seen".into() });
}

#[test]
fn workers_never_claim() {
    let w = node("a", RolePolicy::Worker, Allegiance::None);
    assert!(matches!(decide(&w, &[auto("b")], settled(), &params(1)), Decision::Wait { .. }));
    assert_eq!(decide(&auto("b"), &[w], settled(), &params(1)), Decision::Claim);
}

#[test]
fn explicit_master_claims_at_once_and_auto_nodes_wait_for_it() {
    let m = node("z", RolePolicy::Master, Allegiance::None);
    assert_eq!(decide(&m, &[], Duration::ZERO, &params(1)), Decision::Claim);
    assert!(
        matches!(decide(&auto("a"), &[m], settled(), &params(1)), Decision::Wait { reason } if reason.contains("forced"))
    );
}

#[test]
fn an_existing_committed_master_always_wins() {
    let m = node("z", RolePolicy::Auto, Allegiance::Master { uid: "u1".into(), committed: true });
    // Even a node with better priority follows it.
    let mut a = auto("a");
    a.priority = 0;
    assert_eq!(
        decide(&a, std::slice::from_ref(&m), Duration::ZERO, &params(1)),
        Decision::Follow { uid: "u1".into(), master: "z".into(), ready: true }
    );
    assert_eq!(decide(&m, &[a], Duration::ZERO, &params(5)), Decision::Lead);
}

#[test]
fn a_second_forced_master_refuses_loudly() {
    let m1 = node("a", RolePolicy::Master, Allegiance::Master { uid: "u1".into(), committed: true });
    let m2 = node("b", RolePolicy::Master, Allegiance::None);
    assert!(
        matches!(decide(&m2, &[m1], Duration::ZERO, &params(1)), Decision::Conflict { reason, .. } if reason.contains("forced to role=master"))
    );
    // Once refused, it never claims, even when the other master is out of sight.
    let refused = node("b", RolePolicy::Master, Allegiance::Refused { uid: "u1".into(), master: "a".into() });
    assert!(matches!(decide(&refused, &[], settled(), &params(1)), Decision::Conflict { .. }));
}

#[test]
fn commit_waits_for_followers_and_the_window() {
    let me = node("a", RolePolicy::Auto, Allegiance::Master { uid: "u".into(), committed: false });
    let f = node("b", RolePolicy::Auto, Allegiance::Follower { uid: "u".into(), master: "a".into() });
    assert!(matches!(decide(&me, &[], settled(), &params(2)), Decision::Wait { .. }));
    assert!(matches!(decide(&me, std::slice::from_ref(&f), Duration::from_secs(1), &params(2)), Decision::Wait { .. }));
    assert_eq!(decide(&me, &[f], settled(), &params(2)), Decision::Commit);
}

#[test]
fn an_uncommitted_claim_yields_to_a_committed_one() {
    let me = node("a", RolePolicy::Auto, Allegiance::Master { uid: "mine".into(), committed: false });
    let other = node("b", RolePolicy::Auto, Allegiance::Master { uid: "theirs".into(), committed: true });
    assert_eq!(
        decide(&me, &[other], settled(), &params(1)),
        Decision::Yield { uid: "theirs".into(), master: "b".into() }
    );
}

#[test]
fn a_follower_stays_with_its_cluster_while_the_master_is_away() {
    let f = node("b", RolePolicy::Auto, Allegiance::Follower { uid: "u".into(), master: "a".into() });
    let rival = node("c", RolePolicy::Auto, Allegiance::Master { uid: "v".into(), committed: true });
    assert_eq!(
        decide(&f, &[rival], settled(), &params(1)),
        Decision::Follow { uid: "u".into(), master: "a".into(), ready: false }
    );
}

/// A simulated room of nodes: arrivals, per-pair beacon delays, power cuts.
#[derive(Debug, Clone)]
struct Scenario {
    minimum_nodes: usize,
    nodes: Vec<SimNode>,
    /// delay[i][j]: ticks before i hears j's beacon (1..=W/4).
    delay: Vec<Vec<u64>>,
}

#[derive(Debug, Clone)]
struct SimNode {
    arrival: u64,
    policy: RolePolicy,
    priority: u32,
    /// (power cut at, back after) — downtime at most half a window.
    reboot: Option<(u64, u64)>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..=5).prop_flat_map(|n| {
        let node = (
            0u64..60,
            prop_oneof![8 => Just(RolePolicy::Auto), 1 => Just(RolePolicy::Master), 1 => Just(RolePolicy::Worker)],
            prop_oneof![Just(u32::MAX), 0u32..3],
            proptest::option::of((0u64..120, 1u64..=W / 2)),
        )
            .prop_map(|(arrival, policy, priority, reboot)| SimNode {
                arrival,
                policy,
                priority,
                reboot: reboot.map(|(at, down)| (arrival + at, down)),
            });
        (
            1..=n,
            proptest::collection::vec(node, n),
            proptest::collection::vec(proptest::collection::vec(1u64..=W / 4, n), n),
        )
            .prop_map(|(minimum_nodes, nodes, delay)| Scenario { minimum_nodes, nodes, delay })
    })
}

struct Outcome {
    committed: BTreeSet<String>,
    final_state: Vec<Allegiance>,
    decisions: Vec<Decision>,
}

fn simulate(s: &Scenario, ticks: u64) -> Outcome {
    let n = s.nodes.len();
    let ids: Vec<String> = (0..n).map(|i| format!("node{i}")).collect();
    let mut allegiance = vec![Allegiance::None; n];
    let mut started = vec![0u64; n];
    let mut history: Vec<Vec<Option<Allegiance>>> = Vec::new();
    let mut committed = BTreeSet::new();
    let mut last = vec![Decision::Wait { reason: String::new() }; n];
    let up = |i: usize, t: u64| {
        let node = &s.nodes[i];
        t >= node.arrival && !node.reboot.is_some_and(|(at, down)| t >= at && t < at + down)
    };
    for t in 0..ticks {
        let mut now: Vec<Option<Allegiance>> = vec![None; n];
        for i in 0..n {
            if !up(i, t) {
                continue;
            }
            if t == s.nodes[i].arrival || s.nodes[i].reboot.is_some_and(|(at, down)| t == at + down) {
                started[i] = t; // the settle window restarts at every boot
            }
            let peers: Vec<NodeView> = (0..n)
                .filter(|&j| j != i)
                .filter_map(|j| {
                    let d = s.delay[i][j];
                    let seen = history.get(t.checked_sub(d)? as usize)?[j].clone()?;
                    Some(NodeView {
                        id: ids[j].clone(),
                        priority: s.nodes[j].priority,
                        policy: s.nodes[j].policy,
                        allegiance: seen,
                    })
                })
                .collect();
            let me = NodeView {
                id: ids[i].clone(),
                priority: s.nodes[i].priority,
                policy: s.nodes[i].policy,
                allegiance: allegiance[i].clone(),
            };
            let d = decide(&me, &peers, Duration::from_secs(t - started[i]), &params(s.minimum_nodes));
            match &d {
                Decision::Claim => allegiance[i] = Allegiance::Master { uid: format!("uid-{i}-{t}"), committed: false },
                Decision::Commit => {
                    let uid = allegiance[i].uid().expect("a claim").to_string();
                    committed.insert(uid.clone());
                    allegiance[i] = Allegiance::Master { uid, committed: true };
                }
                Decision::Yield { uid, master } | Decision::Follow { uid, master, .. } => {
                    allegiance[i] = Allegiance::Follower { uid: uid.clone(), master: master.clone() }
                }
                Decision::Conflict { uid, master, .. } => {
                    allegiance[i] = Allegiance::Refused { uid: uid.clone(), master: master.clone() }
                }
                Decision::Wait { .. } | Decision::Lead => {}
            }
            last[i] = d;
            now[i] = Some(allegiance[i].clone());
        }
        history.push(now);
    }
    Outcome { committed, final_state: allegiance, decisions: last }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The safety property: never two clusters.
    #[test]
    fn at_most_one_cluster_is_ever_committed(s in scenario()) {
        let out = simulate(&s, 300);
        prop_assert!(out.committed.len() <= 1, "committed {:?} in {:?}", out.committed, s);
    }

    /// Liveness when nothing goes wrong: auto nodes, no reboots, enough of them → exactly one
    /// master, everyone else follows it and is ready to join.
    #[test]
    fn calm_rooms_form_exactly_one_cluster(arrivals in proptest::collection::vec(0u64..60, 1..=5), min in 1usize..=5) {
        let n = arrivals.len();
        let min = min.min(n);
        let s = Scenario {
            minimum_nodes: min,
            nodes: arrivals.iter().map(|&a| SimNode { arrival: a, policy: RolePolicy::Auto, priority: u32::MAX, reboot: None }).collect(),
            delay: vec![vec![3; n]; n],
        };
        let out = simulate(&s, 300);
        prop_assert_eq!(out.committed.len(), 1);
        let uid = out.committed.iter().next().unwrap().clone();
        let masters = out.decisions.iter().filter(|d| **d == Decision::Lead).count();
        prop_assert_eq!(masters, 1);
        for (a, d) in out.final_state.iter().zip(&out.decisions) {
            prop_assert_eq!(a.uid(), Some(uid.as_str()));
            prop_assert!(matches!(d, Decision::Lead | Decision::Follow { ready: true, .. }), "{:?}", d);
        }
    }
}
