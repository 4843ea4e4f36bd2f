//! The node's status: served on `GET /status` (JSON) and `GET /metrics` (Prometheus text), and
//! printed as one `labforge-status {json}` console line when it changes (see `report`).

use std::io::Write;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::disks::DisksStatus;
use crate::inventory::Inventory;
use crate::preload::PreloadStatus;
use crate::system::SystemHealth;

/// Prefix of the console line tests and operators look for.
pub const CONSOLE_PREFIX: &str = "labforge-status ";

crate::wire_enum! {
    /// Where the node is: `discovering` → `electing` → `initialising` | `joining` → `ready`;
    /// or waiting on something (`needs-secret`, `waiting-for-master`), refusing (`conflict`),
    /// failing (`error`), or, booted from a stick or netbooted to install, `installing` →
    /// `installed` | `install-refused` | `install-failed`.
    #[derive(Default)]
    pub enum Phase {
        /// Before the agent has decided anything (never printed).
        #[default]
        Starting = "starting",
        Discovering = "discovering",
        Electing = "electing",
        Initialising = "initialising",
        Joining = "joining",
        Ready = "ready",
        NeedsSecret = "needs-secret",
        /// Netbooted without a secret: waiting for the master to admit this node.
        Enrolling = "enrolling",
        /// An authentic peer's clock is far from ours: this node will not claim mastership.
        ClockSkew = "clock-skew",
        WaitingForMaster = "waiting-for-master",
        Conflict = "conflict",
        Error = "error",
        Installing = "installing",
        Installed = "installed",
        InstallRefused = "install-refused",
        InstallFailed = "install-failed",
    }
}

impl Phase {
    /// An install boot has ended: installed, refused or failed.
    pub fn install_finished(self) -> bool {
        matches!(self, Phase::Installed | Phase::InstallRefused | Phase::InstallFailed)
    }
}

crate::wire_enum! {
    /// This node's side in the cluster.
    #[derive(Default)]
    pub enum Role {
        #[default]
        Undecided = "undecided",
        Master = "master",
        Worker = "worker",
        /// A second forced master that refuses to make a second cluster.
        Refused = "refused",
    }
}

crate::wire_enum! {
    /// Whether the image runs kubeadm.
    pub enum Kubernetes {
        Enabled = "enabled",
        Disabled = "disabled",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub agent_version: String,
    pub image: String,
    /// This node's id (its machine id).
    pub node_id: String,
    pub phase: Phase,
    pub role: Role,
    pub cluster_uid: Option<String>,
    /// This node's address on the cluster LAN, once it has one.
    pub lan_address: Option<String>,
    pub master_address: Option<String>,
    /// Whether this image runs kubeadm (an image without it never pretends).
    pub kubernetes: Kubernetes,
    /// sha256 of the join info this node minted (master) or received (worker).
    pub join_info_sha256: Option<String>,
    /// Why the node is in this phase, in words.
    pub message: String,
    /// Peers heard recently (authenticated beacons only).
    pub peers: Vec<PeerStatus>,
    pub node: Inventory,
    /// systemd's view of the node's boot: `running` once every unit started.
    #[serde(default)]
    pub system: SystemHealth,
    /// Import of the container images the image carries.
    #[serde(default)]
    pub preload: PreloadStatus,
    /// Data disks: inventory, classification, decisions and zaps.
    #[serde(default)]
    pub disks: DisksStatus,
    /// On the master: the Ceph devices of every node, as written to the `CephCluster`.
    #[serde(default)]
    pub ceph: Option<CephView>,
    /// Installing from the stick (a live session), or how this node was installed.
    #[serde(default)]
    pub install: Option<crate::install::write::InstallStatus>,
    /// Netboot served by this node (master with `[pxe] serve`).
    #[serde(default)]
    pub pxe: Option<crate::pxe::PxeStatus>,
    /// What the operator should know about this boot's config: kernel command line options and
    /// config partitions that were ignored, and why.
    #[serde(default)]
    pub notices: Vec<String>,
    /// How this node got its LAN address, and on the master of a bare switch what it serves.
    #[serde(default)]
    pub network: crate::network::NetworkStatus,
    /// Where this node takes its time from (chrony).
    #[serde(default)]
    pub time: Option<crate::network::time::TimeStatus>,
    /// An authentic peer whose clock is outside the freshness window, recently.
    #[serde(default)]
    pub clock_skew: Option<ClockSkew>,
    /// Netbooted nodes asking for the cluster secret (master with `[pxe] serve`).
    #[serde(default)]
    pub enrol: Option<crate::pxe::enrol::EnrolStatus>,
    /// What the Kubernetes API server says (images that run Kubernetes): its version, this
    /// node's Ready condition, and on the master every node and the control-plane pods.
    #[serde(default)]
    pub kube_api: Option<crate::cluster::api::KubeApi>,
    /// The data stack (on the master of an image with one): each component's state.
    #[serde(default)]
    pub stack: Option<crate::stack::StackStatus>,
    pub state: StateVolume,
    #[serde(default)]
    pub counters: Counters,
}

impl Status {
    /// A status with nothing known yet (tests and tools start from it).
    pub fn minimal(image: &str, node_id: &str) -> Status {
        serde_json::from_value(serde_json::json!({
            "agent_version": env!("CARGO_PKG_VERSION"), "image": image, "node_id": node_id, "phase": "starting",
            "role": "undecided", "cluster_uid": null, "lan_address": null, "master_address": null,
            "kubernetes": "disabled", "join_info_sha256": null, "message": "", "peers": [],
            "node": {"machine_id": node_id, "hostname": "localhost", "nics": [], "disks": []},
            "state": {"dir": "/var/lib/labforge", "size_bytes": 0}
        }))
        .expect("a minimal status")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: String,
    pub hostname: String,
    pub address: String,
    pub role: Role,
}

/// The master's view of the cluster's Ceph devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CephView {
    /// Where the master keeps the register of offered disks (the `rook-ceph` component's
    /// `CephCluster` lists them).
    pub register: String,
    /// Kubernetes node name → by-id paths.
    pub nodes: std::collections::BTreeMap<String, Vec<String>>,
}

/// How far an authentic peer's clock is from this node's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockSkew {
    /// The peer's node id.
    pub peer: String,
    /// Its clock minus ours, in seconds.
    pub offset_seconds: i64,
}

/// Counters for /metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub beacons_sent: u64,
    pub beacons_received: u64,
    pub beacons_rejected_malformed: u64,
    pub beacons_rejected_bad_mac: u64,
    pub beacons_rejected_stale: u64,
    pub beacons_rejected_replay: u64,
    #[serde(default)]
    pub beacons_rejected_invalid: u64,
    pub join_served: u64,
    pub join_rejected: u64,
}

/// The state partition as mounted on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateVolume {
    pub dir: String,
    /// Filesystem size; grows to fill the disk on first boot.
    pub size_bytes: u64,
}

impl Status {
    pub fn console_line(&self) -> String {
        format!("{CONSOLE_PREFIX}{}", serde_json::to_string(self).expect("status serialises"))
    }

    /// Prints the console line on stdout, which the unit sends to the journal and the console.
    pub fn announce(&self) {
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop the agent; the journal still has the log lines.
        let _ = writeln!(out, "{}", self.console_line());
        let _ = out.flush();
    }

    pub fn metrics(&self) -> String {
        let up = self.node.nics.iter().filter(|n| n.up).count();
        let c = &self.counters;
        let mut m = format!(
            "# HELP labforge_up 1 while the agent is running.\n# TYPE labforge_up gauge\nlabforge_up 1\n\
             # HELP labforge_nics Physical network interfaces, by link state.\n# TYPE labforge_nics gauge\n\
             labforge_nics{{state=\"up\"}} {up}\nlabforge_nics{{state=\"down\"}} {}\n\
             # HELP labforge_disks Whole disks seen in the inventory.\n# TYPE labforge_disks gauge\nlabforge_disks {}\n\
             # HELP labforge_state_bytes Size of the state filesystem.\n# TYPE labforge_state_bytes gauge\nlabforge_state_bytes {}\n",
            self.node.nics.len() - up,
            self.node.disks.len(),
            self.state.size_bytes,
        );
        m.push_str(&format!(
            "# HELP labforge_peers Peers heard recently.\n# TYPE labforge_peers gauge\nlabforge_peers {}\n\
             # HELP labforge_beacons_sent_total Beacons sent.\n# TYPE labforge_beacons_sent_total counter\nlabforge_beacons_sent_total {}\n\
             # HELP labforge_beacons_received_total Authentic beacons received.\n# TYPE labforge_beacons_received_total counter\nlabforge_beacons_received_total {}\n\
             # HELP labforge_beacons_rejected_total Datagrams dropped, by reason.\n# TYPE labforge_beacons_rejected_total counter\n\
             labforge_beacons_rejected_total{{reason=\"malformed\"}} {}\nlabforge_beacons_rejected_total{{reason=\"bad_mac\"}} {}\n\
             labforge_beacons_rejected_total{{reason=\"stale\"}} {}\nlabforge_beacons_rejected_total{{reason=\"replay\"}} {}\n\
             labforge_beacons_rejected_total{{reason=\"invalid\"}} {}\n\
             # HELP labforge_join_requests_total Join-info requests, by result.\n# TYPE labforge_join_requests_total counter\n\
             labforge_join_requests_total{{result=\"served\"}} {}\nlabforge_join_requests_total{{result=\"rejected\"}} {}\n\
             # HELP labforge_phase Current phase (1 for the current one).\n# TYPE labforge_phase gauge\nlabforge_phase{{phase=\"{}\"}} 1\n\
             # HELP labforge_system_state systemd's system state (1 for the current one).\n# TYPE labforge_system_state gauge\nlabforge_system_state{{state=\"{}\"}} 1\n\
             # HELP labforge_system_failed_units Units in the failed state.\n# TYPE labforge_system_failed_units gauge\nlabforge_system_failed_units {}\n\
             # HELP labforge_preload_images Preloaded images, by import result.\n# TYPE labforge_preload_images gauge\n\
             labforge_preload_images{{result=\"imported\"}} {}\nlabforge_preload_images{{result=\"present\"}} {}\nlabforge_preload_images{{result=\"failed\"}} {}\n\
             # HELP labforge_ceph_devices Disks this node offers to Ceph.\n# TYPE labforge_ceph_devices gauge\nlabforge_ceph_devices {}\n",
            self.peers.len(),
            c.beacons_sent,
            c.beacons_received,
            c.beacons_rejected_malformed,
            c.beacons_rejected_bad_mac,
            c.beacons_rejected_stale,
            c.beacons_rejected_replay,
            c.beacons_rejected_invalid,
            c.join_served,
            c.join_rejected,
            self.phase,
            self.system.state,
            self.system.failed_units.len(),
            self.preload.imported,
            self.preload.present,
            self.preload.failed.len(),
            self.disks.ceph_devices.len(),
        ));
        m.push_str("# HELP labforge_disk_class Whole disks by class.\n# TYPE labforge_disk_class gauge\n");
        for class in ["os", "removable", "ceph-osd", "has-data", "blank"] {
            let n = self.disks.disks.iter().filter(|d| d.class.as_str() == class).count();
            m.push_str(&format!("labforge_disk_class{{class=\"{class}\"}} {n}\n"));
        }
        if let Some(st) = &self.stack {
            m.push_str(
                "# HELP labforge_stack_component_ready 1 when a stack component's readiness gates hold.\n# TYPE labforge_stack_component_ready gauge\n",
            );
            for c in &st.components {
                let ready = u8::from(c.state == crate::stack::plan::State::Ready);
                m.push_str(&format!("labforge_stack_component_ready{{component=\"{}\"}} {ready}\n", c.name));
            }
            m.push_str(
                "# HELP labforge_stack_component_failures Failed attempts in a row, by component.\n# TYPE labforge_stack_component_failures gauge\n",
            );
            for c in &st.components {
                m.push_str(&format!("labforge_stack_component_failures{{component=\"{}\"}} {}\n", c.name, c.failures));
            }
        }
        m
    }
}

/// Fetches a node's status from its endpoint (used by `labforge-agent status`).
pub fn fetch(addr: &str) -> Result<Status> {
    let url = format!("http://{addr}/status");
    crate::sys::http::Client::with_timeout(std::time::Duration::from_secs(5))
        .get_json(&url)
        .with_context(|| format!("asking the agent at {url}; is labforge-agent running?"))
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "node     {} ({})", self.node.hostname, self.node.machine_id)?;
        writeln!(f, "image    {} (agent {})", self.image, self.agent_version)?;
        writeln!(f, "phase    {} ({})", self.phase, self.message)?;
        writeln!(f, "role     {}", self.role)?;
        if let Some(i) = &self.install {
            writeln!(f, "install  {} ({})", i.state, i.message)?;
        }
        if let Some(p) = &self.pxe {
            writeln!(
                f,
                "pxe      {} {} {} ({} files and {} preload blobs served) {}",
                p.state, p.mode, p.url, p.served, p.preload_served, p.message
            )?;
        }
        if let Some(st) = &self.stack {
            writeln!(f, "stack    {} ({})", st.state, st.message)?;
            for c in &st.components {
                let state = serde_json::to_value(c.state).ok();
                let state = state.as_ref().and_then(|v| v.as_str()).unwrap_or_default();
                writeln!(f, "         {:<14} {state:<9} {}", c.name, c.message)?;
            }
        }
        if let Some(e) = &self.enrol {
            let pending = e.nodes.iter().filter(|n| n.state == crate::pxe::enrol::EnrolState::Pending).count();
            writeln!(
                f,
                "enrol    {} ({} admitted, {pending} pending, {} refused; labforge-agent enrol lists them)",
                e.policy, e.admitted, e.refused
            )?;
        }
        if let Some(t) = &self.time {
            writeln!(f, "time     {}", t.message)?;
        }
        if let Some(k) = &self.kube_api {
            use crate::cluster::api::ApiState;
            match k.state {
                ApiState::Answering => {
                    let ready = k.nodes.iter().filter(|n| n.ready).count();
                    let pods = k.control_plane.iter().filter(|p| p.ready).count();
                    let this = match k.node_ready {
                        Some(true) => "this node Ready",
                        Some(false) => "this node not Ready",
                        None => "this node not registered",
                    };
                    write!(f, "k8s      {} answering; {this}", k.version.as_deref().unwrap_or("API server"))?;
                    if !k.nodes.is_empty() {
                        write!(
                            f,
                            "; {ready}/{} nodes Ready; {pods}/{} control-plane pods Ready",
                            k.nodes.len(),
                            k.control_plane.len()
                        )?;
                    }
                    writeln!(f)?;
                }
                _ => writeln!(f, "k8s      {:?}: {}", k.state, k.message)?,
            }
        }
        if let Some(k) = &self.clock_skew {
            writeln!(f, "clock    node {}'s clock is {:+} s from ours", k.peer, k.offset_seconds)?;
        }
        for n in &self.notices {
            writeln!(f, "notice   {n}")?;
        }
        let failed = if self.system.failed_units.is_empty() {
            String::new()
        } else {
            format!(" (failed: {})", self.system.failed_units.join(" "))
        };
        writeln!(f, "system   {}{failed}", self.system.state)?;
        let p = &self.preload;
        writeln!(
            f,
            "preload  {} ({} of {} imported this boot, {} already present, {} failed; kubeadm's {}: {})",
            p.state,
            p.imported,
            p.total,
            p.present,
            p.failed.len(),
            p.kubeadm_images,
            if p.kubeadm_ready { "through" } else { "not yet" }
        )?;
        if let Some(src) = &p.source {
            writeln!(f, "         {} blobs fetched from {src}", p.fetched)?;
        }
        for x in &p.failed {
            writeln!(f, "         {}: {}", x.name, x.error)?;
        }
        writeln!(
            f,
            "cluster  {} (master {}, kubernetes {})",
            self.cluster_uid.as_deref().unwrap_or("-"),
            self.master_address.as_deref().unwrap_or("-"),
            self.kubernetes
        )?;
        for p in &self.peers {
            writeln!(f, "peer     {} {} {} {}", p.hostname, p.address, p.role, p.id)?;
        }
        writeln!(f, "state    {} ({} MiB)", self.state.dir, self.state.size_bytes >> 20)?;
        for n in &self.node.nics {
            let state = if n.up { "up" } else { "down" };
            writeln!(f, "nic      {} {} {} {}", n.name, n.mac, state, n.addresses.join(" "))?;
        }
        writeln!(
            f,
            "disks    {} (wipe = {}; lvm {}, rbd {}){}",
            self.disks.state,
            self.disks.wipe,
            yes(self.disks.lvm),
            yes(self.disks.rbd),
            if self.disks.message.is_empty() { String::new() } else { format!(": {}", self.disks.message) }
        )?;
        for d in &self.disks.disks {
            let id = d.facts.by_id.first().map(String::as_str).unwrap_or("-");
            let ceph = if d.ceph { " ceph" } else { "" };
            writeln!(
                f,
                "disk     {} {} {} {:?}{ceph} {id}: {} ({})",
                d.facts.name,
                bytesize::ByteSize(d.facts.size_bytes),
                d.class.as_str(),
                d.action,
                d.reason,
                d.class_reason
            )?;
        }
        if let Some(c) = &self.ceph {
            writeln!(
                f,
                "ceph     {} ({} nodes offer disks)",
                c.register,
                c.nodes.values().filter(|d| !d.is_empty()).count()
            )?;
        }
        Ok(())
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
