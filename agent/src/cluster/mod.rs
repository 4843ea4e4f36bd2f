//! The cluster task: finds the peers (`discovery`), takes part in the election (`election`),
//! decides what to do about it (`plan`) and does it: the master runs kubeadm and serves join
//! info (`kube`, `join`), a worker fetches it and joins. What this node committed to is saved
//! in `state` before anyone is told. The task publishes a [`ClusterView`] for the tasks that
//! depend on the node's place in the cluster (netboot, Ceph, later the stack and healing).

pub mod api;
pub mod discovery;
pub mod election;
pub mod hosts;
pub mod join;
pub mod kube;
pub mod kubeadm;
pub mod kubeconfig;
pub mod lan;
mod own_lan;
pub mod plan;
pub mod podnet;
pub mod resolv;
pub mod state;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{NodeConfig, BEACON_PORT};
use crate::inventory::Inventory;
use crate::report::Report;
use crate::secret::Secret;
use crate::status::{PeerStatus, Phase, Role};
use discovery::beacon::{Beacon, DiskSummary};
use discovery::net::{self, Peers};
use election::{Allegiance, NodeView, Params};
pub use join::JoinInfo;
use lan::Lan;
use plan::{Follow, Step};
use state::{State, Store};

/// How often beacons go out and the election is re-evaluated.
pub const TICK: Duration = Duration::from_secs(1);
/// Peers not heard for this long drop out of the view.
const PEER_TIMEOUT: Duration = Duration::from_secs(6);
/// How long an authentic beacon from a skewed clock keeps this node from claiming mastership.
pub const SKEW_MEMORY: Duration = Duration::from_secs(300);

/// This node's place in the cluster, as the other tasks see it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub role: Role,
    pub uid: Option<String>,
    /// The cluster LAN, once this node has an address on it.
    pub lan: Option<Lan>,
    /// The committed master, ready and serving join info.
    pub leading: bool,
    /// Nodes heard recently that follow this node's cluster.
    pub members: Vec<Member>,
    /// The pod CIDRs this cluster's other nodes announce, with their LAN addresses.
    pub pod_routes: Vec<podnet::PodRoute>,
    /// This node's kubeadm init or join finished (its success marker is saved).
    pub kubeadm_done: bool,
    /// The LAN this master serves (a room with no DHCP server), once its address is up.
    pub served: Option<crate::network::serve::ServedLan>,
}

/// A node following the cluster, as its beacons describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub hostname: String,
    /// The disks it offers to Ceph (by-id paths).
    pub ceph: Vec<String>,
}

/// The side an allegiance puts a node on.
pub fn role(a: &Allegiance) -> Role {
    match a {
        Allegiance::None => Role::Undecided,
        Allegiance::Master { .. } => Role::Master,
        Allegiance::Follower { .. } => Role::Worker,
        Allegiance::Refused { .. } => Role::Refused,
    }
}

/// The channels the cluster task talks through.
pub struct Links {
    pub report: Report,
    /// The disks this node offers to Ceph, from the disks task (for the beacons).
    pub ceph_offer: watch::Receiver<Vec<String>>,
    pub view: watch::Sender<ClusterView>,
    /// Join info to serve (master) on `/join-info`.
    pub join_info: watch::Sender<Option<JoinInfo>>,
    /// This node's pod CIDR once the API server gave it one (for the beacons).
    pub pod_cidr: watch::Receiver<Option<String>>,
}

pub struct Cluster {
    cfg: NodeConfig,
    secret: Secret,
    inventory: Inventory,
    store: Store,
    state: State,
    links: Links,
    lan: Option<Lan>,
    /// When the LAN came up: the settle window counts from here.
    started: Instant,
    peers: Peers,
    /// What our beacons say about us; changed only after the state holding it is saved.
    announced: watch::Sender<Allegiance>,
    /// The last phase reported, so a conflict is logged once.
    phase: Phase,
    /// Failed kubeadm steps in a row, and when the next may run.
    backoff: plan::Backoff,
    /// The admins' kubeconfigs were written since the agent started.
    kubeconfigs: bool,
    /// This node's addresses on the LAN, best first, for the beacons.
    addresses: watch::Sender<Vec<String>>,
    /// Taking the served LAN's first address: since when, and whether a probe found another
    /// DHCP server. See `own_lan`.
    own_lan: own_lan::Progress,
}

impl Cluster {
    pub fn new(
        cfg: NodeConfig,
        secret: Secret,
        inventory: Inventory,
        store: Store,
        state: State,
        links: Links,
    ) -> Self {
        let announced = watch::Sender::new(state.allegiance.clone());
        Cluster {
            cfg,
            secret,
            inventory,
            store,
            state,
            links,
            lan: None,
            started: Instant::now(),
            peers: Default::default(),
            announced,
            backoff: Default::default(),
            kubeconfigs: false,
            phase: Phase::Starting,
            addresses: watch::Sender::new(Vec::new()),
            own_lan: Default::default(),
        }
    }

    /// Runs until the agent stops: one round a second.
    pub async fn run(mut self) -> Result<()> {
        self.set_phase(Phase::Discovering, "waiting for the LAN");
        // A master serving its LAN takes its address again at once, not after waiting out
        // DHCP and link-local addressing.
        if let Err(e) = self.retake_served_lan() {
            error!("{e:#}");
        }
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            if let Err(e) = self.round().await {
                error!("{e:#}");
                self.set_phase(Phase::Error, &format!("{e:#}"));
            }
        }
    }

    /// One round: make sure discovery runs, then decide and act.
    async fn round(&mut self) -> Result<()> {
        if !self.refresh_lan()? {
            return Ok(()); // no address yet (DHCP, then link-local, still running)
        }
        let peers = net::fresh(&self.peers, PEER_TIMEOUT);
        self.publish(&peers);
        let views: Vec<NodeView> = peers.iter().map(|p| p.beacon.node.clone()).collect();
        let params = Params {
            minimum_nodes: self.cfg.cluster.minimum_nodes,
            settle: Duration::from_secs(self.cfg.cluster.settle_seconds),
        };
        let elapsed = self.started.elapsed();
        let decision = election::decide(&self.view(), &views, elapsed, &params);
        // The master's signed address (validated to be where its beacons come from).
        let master_address = |id: &str| {
            let p = peers.iter().find(|p| p.beacon.node.id == id)?;
            p.beacon.addresses.first().map(|a| format!("{a}:{}", p.beacon.port))
        };
        let master = match &decision {
            election::Decision::Follow { master, .. } => master_address(master),
            _ => None,
        };
        // A skewed peer while others agree with our clock is their problem, not ours.
        let skew = self.recent_skew().filter(|_| peers.is_empty());
        let step = plan::step(decision, &self.state, elapsed < params.settle, master);
        match plan::hold_claims(step, skew.as_ref().map(|s| (s.peer.as_str(), s.offset_ms))) {
            Step::Report { phase, message } => self.set_phase(phase, &message),
            Step::Claim => {
                let uid = random_uid();
                info!(%uid, "claiming mastership");
                self.persist(Allegiance::Master { uid, committed: false })?;
                self.set_phase(Phase::Electing, "claimed mastership; waiting for followers");
            }
            Step::Commit { uid } => {
                info!(%uid, "committing: this node is the master");
                self.persist(Allegiance::Master { uid, committed: true })?;
                self.lead().await?;
            }
            Step::Lead => self.lead().await?,
            Step::Yield { allegiance } => {
                warn!(?allegiance, "giving up our uncommitted claim for a better one");
                self.persist(allegiance)?;
            }
            Step::Follow { allegiance, then } => {
                if self.state.allegiance != allegiance {
                    info!(?allegiance, "following");
                    self.persist(allegiance.clone())?;
                }
                let uid = allegiance.uid().unwrap_or_default().to_string();
                match then {
                    Follow::Join { address } => self.follow(&uid, &address).await?,
                    Follow::StayJoined if self.lan.as_ref().is_some_and(Lan::link_local) => self.set_phase(
                        Phase::WaitingForMaster,
                        "joined; waiting for the master to lease this node its address again (link-local only)",
                    ),
                    Follow::StayJoined => self.set_phase(Phase::Ready, "joined; master not in sight"),
                    Follow::Wait { message } => self.set_phase(Phase::WaitingForMaster, &message),
                }
            }
            Step::Conflict { allegiance, reason } => {
                if self.phase != Phase::Conflict {
                    error!("{reason}");
                }
                self.persist(allegiance)?;
                self.set_phase(Phase::Conflict, &reason);
            }
        }
        self.publish(&peers);
        Ok(())
    }

    /// An authentic peer heard with its clock outside the freshness window in the last
    /// [`SKEW_MEMORY`], as reported in the status.
    fn recent_skew(&self) -> Option<net::Skew> {
        let tally = self.links.report.tally();
        let skew = tally.beacons.skew.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let skew = skew.filter(|s| s.heard.elapsed() < SKEW_MEMORY);
        let shown = skew
            .as_ref()
            .map(|s| crate::status::ClockSkew { peer: s.peer.clone(), offset_seconds: s.offset_ms / 1000 });
        self.links.report.update(|st| st.clock_skew = shown);
        skew
    }

    fn start_discovery(&self, lan: &Lan) -> Result<()> {
        let sock = Arc::new(net::bind(SocketAddr::from(([0, 0, 0, 0], BEACON_PORT)), Some(&lan.interface))?);
        let verifier = discovery::Verifier::new(self.secret.clone(), &self.inventory.machine_id);
        let counters = self.links.report.tally().beacons.clone();
        tokio::spawn(net::receive(sock.clone(), verifier, self.peers.clone(), counters.clone()));
        // The limited broadcast reaches every node on the segment whatever its address: a
        // node on link-local hears the master on the LAN it serves, and the other way round.
        let dest = SocketAddr::from((std::net::Ipv4Addr::BROADCAST, BEACON_PORT));
        let addresses = self.addresses.subscribe();
        let announced = self.announced.subscribe();
        let ceph_offer = self.links.ceph_offer.clone();
        let pod_cidr = self.links.pod_cidr.clone();
        let base = Beacon {
            node: self.view(),
            hostname: self.inventory.hostname.clone(),
            addresses: vec![lan.address.to_string()],
            term: self.state.boots,
            disks: DiskSummary {
                count: self.inventory.disks.len(),
                total_bytes: self.inventory.disks.iter().map(|d| d.size_bytes).sum(),
                ceph: Vec::new(),
            },
            port: self.cfg.status_port,
            pod_cidr: None,
            ts_ms: 0,
            nonce: String::new(),
        };
        tokio::spawn(net::send(sock, dest, self.secret.clone(), TICK, counters, move || {
            let mut b = base.clone();
            b.node.allegiance = announced.borrow().clone();
            let now = addresses.borrow().clone();
            if !now.is_empty() {
                b.addresses = now;
            }
            b.disks.ceph = ceph_offer.borrow().clone();
            b.pod_cidr = pod_cidr.borrow().clone();
            b.ts_ms = crate::sys::clock::now_ms();
            b.nonce = random_uid();
            b
        }));
        Ok(())
    }

    fn view(&self) -> NodeView {
        NodeView {
            id: self.inventory.machine_id.clone(),
            priority: priority(&self.cfg.cluster.master_priority, &self.inventory),
            policy: self.cfg.cluster.role,
            allegiance: self.state.allegiance.clone(),
        }
    }

    /// Saves the new allegiance, then lets the beacons announce it (never the other way
    /// round: a power cut must not lose what peers were told).
    fn persist(&mut self, allegiance: Allegiance) -> Result<()> {
        if self.state.allegiance == allegiance {
            return Ok(());
        }
        self.state.allegiance = allegiance.clone();
        self.store.save(&self.state)?;
        self.announced.send_replace(allegiance);
        Ok(())
    }

    /// Publishes what this round saw: the status's cluster fields and the [`ClusterView`].
    fn publish(&self, peers: &[net::Peer]) {
        let role = role(&self.state.allegiance);
        let uid = self.state.allegiance.uid().map(str::to_string);
        let committed = matches!(self.state.allegiance, Allegiance::Master { committed: true, .. });
        let lan = self.lan.clone();
        self.links.report.update(|s| {
            for nic in &mut s.node.nics {
                nic.addresses = lan::kernel_addresses(&nic.name);
            }
            s.lan_address = lan.as_ref().map(|l| l.address.to_string());
            s.role = role;
            s.cluster_uid = uid.clone();
            s.peers = peers
                .iter()
                .map(|p| PeerStatus {
                    id: p.beacon.node.id.clone(),
                    hostname: p.beacon.hostname.clone(),
                    address: p.from.to_string(),
                    role: self::role(&p.beacon.node.allegiance),
                })
                .collect();
            if let (Some(lan), true) = (&lan, committed) {
                s.master_address = Some(lan.address.to_string());
            }
        });
        self.publish_network();
        let members = peers
            .iter()
            .filter(
                |p| matches!(&p.beacon.node.allegiance, Allegiance::Follower { uid: u, .. } if Some(u) == uid.as_ref()),
            )
            .map(|p| Member { hostname: p.beacon.hostname.clone(), ceph: p.beacon.disks.ceph.clone() })
            .collect();
        let mut pod_routes: Vec<podnet::PodRoute> = peers
            .iter()
            .filter(|p| p.beacon.node.allegiance.uid().is_some() && p.beacon.node.allegiance.uid() == uid.as_deref())
            .filter(|p| !matches!(p.beacon.node.allegiance, Allegiance::Refused { .. }))
            .filter_map(|p| {
                let cidr = p.beacon.pod_cidr.clone()?;
                Some(podnet::PodRoute { cidr, via: p.beacon.addresses.first()?.clone() })
            })
            .collect();
        pod_routes.sort();
        let leading = committed && self.phase == Phase::Ready;
        let kubeadm_done = self.state.initialised || self.state.joined;
        let served = self.served();
        let view = ClusterView { role, uid, lan, leading, members, pod_routes, kubeadm_done, served };
        self.links.view.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }

    /// Records the phase and its message, with the role and cluster this node has now, so no
    /// console line ever pairs a new phase with an old role.
    fn set_phase(&mut self, phase: Phase, message: &str) {
        self.phase = phase;
        let (role, uid) = (role(&self.state.allegiance), self.state.allegiance.uid().map(str::to_string));
        self.links.report.update(|s| {
            s.phase = phase;
            s.message = message.to_string();
            s.role = role;
            s.cluster_uid = uid;
        });
    }

    fn set_join_info(&self, info: &JoinInfo) {
        use sha2::{Digest, Sha256};
        let digest = hex::encode(Sha256::digest(serde_json::to_vec(info).expect("json")));
        self.links.report.update(|s| {
            s.join_info_sha256 = Some(digest);
            s.master_address = Some(info.master_address.clone());
        });
    }

    fn hosts_entry(&self, address: &str) -> Result<()> {
        hosts::set_hosts_entry(Path::new("/etc/hosts"), &kubeadm::endpoint_host(&self.cfg.cluster), address)
            .context("mapping the API endpoint in /etc/hosts")
    }
}

/// Index in `master-priority` of this node's MAC or by-id path (lower is preferred).
pub fn priority(list: &[String], inv: &Inventory) -> u32 {
    list.iter()
        .position(|entry| {
            let e = entry.to_ascii_lowercase();
            inv.nics.iter().any(|n| n.mac.to_ascii_lowercase() == e)
                || inv.disks.iter().any(|d| d.by_id.as_deref() == Some(entry.as_str()))
        })
        .map(|i| i as u32)
        .unwrap_or(u32::MAX)
}

fn random_uid() -> String {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).expect("random bytes");
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Disk, Nic};

    #[test]
    fn priority_is_the_position_of_a_mac_or_disk() {
        let inv = Inventory {
            machine_id: "m".into(),
            hostname: "h".into(),
            nics: vec![Nic { name: "eth0".into(), mac: "52:54:00:AA:BB:CC".into(), addresses: vec![], up: true }],
            disks: vec![Disk {
                name: "vda".into(),
                size_bytes: 1,
                by_id: Some("/dev/disk/by-id/virtio-os".into()),
                removable: false,
                rotational: false,
                model: None,
            }],
        };
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(priority(&list(&["52:54:00:aa:bb:cc"]), &inv), 0);
        assert_eq!(priority(&list(&["x", "/dev/disk/by-id/virtio-os"]), &inv), 1);
        assert_eq!(priority(&list(&["x"]), &inv), u32::MAX);
    }

    #[test]
    fn roles_follow_allegiance() {
        assert_eq!(role(&Allegiance::None), Role::Undecided);
        assert_eq!(role(&Allegiance::Master { uid: "u".into(), committed: false }), Role::Master);
        assert_eq!(role(&Allegiance::Follower { uid: "u".into(), master: "m".into() }), Role::Worker);
        assert_eq!(role(&Allegiance::Refused { uid: "u".into(), master: "m".into() }), Role::Refused);
    }
}
