//! Who becomes the master: a pure function of what this node knows (its persisted allegiance,
//! its policy) and what its peers announce in their beacons.
//!
//! The protocol, and why it never makes two clusters:
//! - A node that wins the election *claims* mastership under a fresh cluster uid, persisting the
//!   claim before announcing it. Peers that see a claim *follow* it, also persisting before
//!   announcing. A follower never changes side unless its master itself gave up an uncommitted
//!   claim.
//! - A claim is *committed* (kubeadm init may run) only when it is the best claim the master
//!   can see, at least `minimum-nodes - 1` peers follow it, and the master has listened for a
//!   whole settle window since it started. Committed claims never yield.
//! - Without any claim in sight, an `auto` node waits for the settle window and for
//!   `minimum-nodes`, then the lowest (priority, node id) among the nodes that may be master
//!   claims. With the settle window at least twice the beacon delay, two nodes that both decide
//!   to claim must have seen each other first, and they agree on the lowest.
//! - Across reboots the persisted allegiance speaks for the node; the settle window restarts,
//!   so a rebooted master with an uncommitted claim hears any newer claim before committing.
//!
//! `proptest` below checks: for any arrival order, beacon delays within half the window,
//! reboots and policies, at most one cluster uid is ever committed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub type NodeId = String;

pub use labforge_core::config::RolePolicy;

/// Where a node stands, as persisted in its state and announced in its beacons.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Allegiance {
    #[default]
    None,
    Master {
        uid: String,
        committed: bool,
    },
    Follower {
        uid: String,
        master: NodeId,
    },
    /// Forced to `role=master` while another master leads `uid`: refuses to join, and never
    /// claims either (that would make a second cluster the moment the other master is away).
    Refused {
        uid: String,
        master: NodeId,
    },
}

impl Allegiance {
    pub fn uid(&self) -> Option<&str> {
        match self {
            Allegiance::None => None,
            Allegiance::Master { uid, .. } | Allegiance::Follower { uid, .. } | Allegiance::Refused { uid, .. } => {
                Some(uid)
            }
        }
    }
}

/// One node as seen in the election (this node, or a peer from its latest beacon).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    /// Lower wins; nodes named in `master-priority` get their index, others `u32::MAX`.
    pub priority: u32,
    pub policy: RolePolicy,
    pub allegiance: Allegiance,
}

impl NodeView {
    fn rank(&self) -> (u32, &str) {
        (self.priority, &self.id)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub minimum_nodes: usize,
    pub settle: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep listening.
    Wait { reason: String },
    /// Claim mastership under a fresh uid: persist, then announce.
    Claim,
    /// Our claim is good: commit it (persist `committed`, then run kubeadm init).
    Commit,
    /// Lead the committed cluster.
    Lead,
    /// Follow `master`'s cluster `uid` (persist before announcing). `ready` once it is committed
    /// and its master is in sight, i.e. join info can be fetched.
    Follow { uid: String, master: NodeId, ready: bool },
    /// Give up our uncommitted claim and follow a better one.
    Yield { uid: String, master: NodeId },
    /// This node is forced to `role=master` but `master` leads `uid`: refuse (persist
    /// `Refused`), loudly.
    Conflict { uid: String, master: NodeId, reason: String },
}

/// A cluster as evidenced by the visible nodes.
#[derive(Debug)]
struct Claim<'a> {
    uid: &'a str,
    master: &'a str,
    master_view: Option<&'a NodeView>,
    committed: bool,
    followers: usize,
}

impl Claim<'_> {
    /// Better claims sort first: committed, then more followers, then the master's rank.
    fn key(&self) -> (bool, std::cmp::Reverse<usize>, u32, &str) {
        let prio = self.master_view.map(|v| v.priority).unwrap_or(u32::MAX);
        (!self.committed, std::cmp::Reverse(self.followers), prio, self.master)
    }
}

fn claims<'a>(all: &[&'a NodeView]) -> Vec<Claim<'a>> {
    let mut out: Vec<Claim<'a>> = Vec::new();
    for v in all {
        let (uid, master, committed) = match &v.allegiance {
            Allegiance::Master { uid, committed } => (uid.as_str(), v.id.as_str(), *committed),
            Allegiance::Follower { uid, master } | Allegiance::Refused { uid, master } => {
                (uid.as_str(), master.as_str(), false)
            }
            Allegiance::None => continue,
        };
        match out.iter_mut().find(|c| c.uid == uid) {
            Some(c) => c.committed |= committed,
            None => out.push(Claim { uid, master, master_view: None, committed, followers: 0 }),
        }
    }
    for c in &mut out {
        c.master_view = all.iter().copied().find(|v| v.id == c.master);
        c.followers =
            all.iter().filter(|v| matches!(&v.allegiance, Allegiance::Follower { uid, .. } if uid == c.uid)).count();
        // A master that claims the uid is the authority on whether it is committed.
        if let Some(Allegiance::Master { uid, committed }) = c.master_view.map(|v| &v.allegiance) {
            if uid == c.uid {
                c.committed = *committed;
            }
        }
    }
    out.sort_by(|a, b| a.key().cmp(&b.key()));
    out
}

fn conflict(best: &Claim) -> Decision {
    Decision::Conflict {
        uid: best.uid.to_string(),
        master: best.master.to_string(),
        reason: format!(
            "this node is forced to role=master, but {} already leads cluster {}; refusing to join or to lead a second cluster",
            best.master, best.uid
        ),
    }
}

/// Decides what `me` does next, given the peers it currently hears and how long it has been
/// listening since it (re)started.
pub fn decide(me: &NodeView, peers: &[NodeView], listening: Duration, p: &Params) -> Decision {
    let mut all: Vec<&NodeView> = vec![me];
    all.extend(peers.iter().filter(|v| v.id != me.id));
    let claims = claims(&all);
    let settled = listening >= p.settle;

    match &me.allegiance {
        Allegiance::Master { committed: true, .. } => Decision::Lead,
        Allegiance::Master { uid, committed: false } => {
            let best = &claims[0];
            if best.uid != uid {
                return if me.policy == RolePolicy::Master {
                    conflict(best)
                } else {
                    Decision::Yield { uid: best.uid.to_string(), master: best.master.to_string() }
                };
            }
            if !settled {
                return Decision::Wait { reason: "listening for other claims before committing".into() };
            }
            if best.followers + 1 < p.minimum_nodes {
                return Decision::Wait {
                    reason: format!("{} of {} nodes follow this claim", best.followers + 1, p.minimum_nodes),
                };
            }
            Decision::Commit
        }
        Allegiance::Refused { uid, master } => Decision::Conflict {
            uid: uid.clone(),
            master: master.clone(),
            reason: format!("this node is forced to role=master, but {master} leads cluster {uid}; refusing to join or to lead a second cluster"),
        },
        Allegiance::Follower { uid, master } => {
            // Our master gave its (uncommitted) claim up for another: go where it went.
            let visible_master = all.iter().find(|v| &v.id == master);
            if let Some(Allegiance::Follower { uid: u2, master: m2 }) = visible_master.map(|v| &v.allegiance) {
                return Decision::Follow { uid: u2.clone(), master: m2.clone(), ready: false };
            }
            let ready = matches!(
                visible_master.map(|v| &v.allegiance),
                Some(Allegiance::Master { uid: u, committed: true }) if u == uid
            );
            Decision::Follow { uid: uid.clone(), master: master.clone(), ready }
        }
        Allegiance::None => {
            if let Some(best) = claims.first() {
                if me.policy == RolePolicy::Master {
                    return conflict(best);
                }
                let ready = best.committed && best.master_view.is_some();
                return Decision::Follow { uid: best.uid.to_string(), master: best.master.to_string(), ready };
            }
            match me.policy {
                RolePolicy::Master => Decision::Claim,
                RolePolicy::Worker => Decision::Wait { reason: "role=worker: waiting for a master".into() },
                RolePolicy::Auto => {
                    if let Some(forced) = all.iter().find(|v| v.policy == RolePolicy::Master) {
                        return Decision::Wait { reason: format!("{} is forced to role=master", forced.id) };
                    }
                    if !settled {
                        return Decision::Wait { reason: "settling: listening for peers".into() };
                    }
                    if all.len() < p.minimum_nodes {
                        return Decision::Wait {
                            reason: format!("{} of {} nodes seen", all.len(), p.minimum_nodes),
                        };
                    }
                    let best = all
                        .iter()
                        .filter(|v| v.policy != RolePolicy::Worker)
                        .min_by(|a, b| a.rank().cmp(&b.rank()))
                        .expect("this node is a candidate");
                    if best.id == me.id {
                        Decision::Claim
                    } else {
                        Decision::Wait { reason: format!("expecting {} to claim mastership", best.id) }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
