//! `labforge-agent run`: the boot-time daemon. It only boots: reads the config layers (the one
//! place that reads the kernel command line and the config partition), loads the secret and
//! the saved state, takes the inventory; then it spawns the long-running tasks and waits for
//! SIGTERM. The tasks, each owning one concern:
//!
//! | task | module | publishes |
//! |---|---|---|
//! | HTTP endpoints | `server` | — |
//! | systemd's boot state | `system::task` | `system` section |
//! | install from a stick or over the network | `install::session` | `install` section, phase |
//! | preloaded images into containerd | `preload::task` | `preload` section |
//! | data disks for Ceph | `disks::task` | `disks` section, `watch` of the offered disks |
//! | discovery, election, kubeadm | `cluster` | phase, role, peers, `watch<ClusterView>`, join info |
//! | netboot served by the master | `pxe::task` | `pxe` section, what `/pxe/` serves |
//! | the register of disks offered to Ceph (master) | `disks::ceph` | `ceph` section |
//! | the data stack (master) | `stack` | `stack` section, `/sd/nodes`, the portal |
//! | healing after power cuts: the CNI result cache (more is a slot) | `heal` | a notice |
//!
//! A task that fails or panics stops the agent with an error, and systemd starts it again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::cluster::{self, Cluster, ClusterView};
use crate::config::{partition, render_hostname, NodeConfig, SECRET_PATH};
use crate::install::{self, InstallConfig, InstallMode};
use crate::inventory::{Inventory, Roots};
use crate::report::Report;
use crate::secret::Secret;
use crate::server::{self, Endpoints};
use crate::status::{Kubernetes, Phase, StateVolume, Status};
use crate::system::SystemHealth;

/// What the node knows when it starts.
pub struct Boot {
    pub cfg: NodeConfig,
    /// The cluster secret, or why there is none (the node then forms no cluster).
    pub secret: Result<Secret, String>,
    /// The kernel command line of this boot.
    pub cmdline: String,
    pub store: cluster::state::Store,
    pub state: cluster::state::State,
    pub inventory: Inventory,
    /// What the operator should know about this boot's config (ignored options and partitions).
    pub notices: Vec<String>,
}

/// What this boot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Booted from a stick with install mode on: install, and be nothing else.
    LiveInstall,
    /// Netbooted with `[install] netboot`: install first; if nothing was installed, run as a
    /// node.
    NetbootInstall,
    /// An ordinary node.
    Node,
}

/// What this boot is for, from what the node booted from and its `[install]` config.
pub fn mode(live_session: bool, netbooted: bool, install: &InstallConfig) -> Mode {
    if live_session && install.mode == InstallMode::Auto {
        Mode::LiveInstall
    } else if netbooted && install.netboot && install.mode != InstallMode::Off {
        Mode::NetbootInstall
    } else {
        Mode::Node
    }
}

pub fn run(config_path: &Path) -> Result<()> {
    let boot = Boot::read(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting async runtime")?;
    runtime.block_on(supervise(boot))
}

impl Boot {
    /// Config layers: defaults ← baked file ← kernel command line ← config partition; then the
    /// secret, the saved state (one more boot) and the inventory, with the hostname set.
    fn read(config_path: &Path) -> Result<Boot> {
        let mut cfg = NodeConfig::load(config_path)?;
        let cmdline = crate::sys::fs::kernel_cmdline();
        let mut notices = cfg.apply_cmdline(&cmdline);
        let mut partition_secret = None;
        match partition::read(&mut notices) {
            Ok(Some(p)) => {
                info!(device = %p.device, "found config partition");
                if let Some(t) = &p.labforge_toml {
                    if let Err(e) = cfg.apply_partition_toml(t) {
                        error!("ignoring labforge.toml on {}: {e:#}", p.device);
                        notices.push(format!("ignoring labforge.toml on {}: {e:#}", p.device));
                    }
                }
                partition_secret = p.cluster_secret;
            }
            Ok(None) => {}
            Err(e) => notices.push(format!("reading the config partition: {e:#}")),
        }
        for n in &notices {
            warn!("{n}");
        }
        // The config partition's secret wins (a stick can carry a site-wide secret); the baked
        // one is the default. Without either, the node will not form a cluster.
        let secret = match partition_secret {
            Some(text) => Secret::parse(&text).context("cluster.secret on the config partition"),
            None => Secret::load(Path::new(SECRET_PATH)),
        }
        .map_err(|e| {
            format!(
                "{e:#}. This node will not form or join a cluster: put a secret made with `labforge secret new` in \
                 {SECRET_PATH} (mode 0600) or as cluster.secret on a FAT partition labelled LABFORGE on the boot medium"
            )
        });
        let store = cluster::state::Store::new(Path::new(&cfg.state_dir));
        let mut state = store.load()?;
        state.boots += 1;
        store.save(&state)?;
        let roots = Roots::default();
        let inventory = Inventory::take(&roots, &cluster::lan::kernel_addresses)?;
        apply_hostname(&cfg, &inventory);
        let inventory = Inventory::take(&roots, &cluster::lan::kernel_addresses)?;
        info!(nics = inventory.nics.len(), disks = inventory.disks.len(), boots = state.boots, "took inventory");
        Ok(Boot { cfg, secret, cmdline, store, state, inventory, notices })
    }

    fn status(&self) -> Status {
        Status {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            image: self.cfg.image.clone(),
            node_id: self.inventory.machine_id.clone(),
            phase: Phase::Starting,
            role: Default::default(),
            cluster_uid: None,
            lan_address: None,
            master_address: None,
            kubernetes: if self.cfg.kubernetes.enabled { Kubernetes::Enabled } else { Kubernetes::Disabled },
            join_info_sha256: None,
            message: self.secret.as_ref().err().cloned().unwrap_or_default(),
            peers: Vec::new(),
            node: self.inventory.clone(),
            system: SystemHealth::default(),
            preload: Default::default(),
            disks: crate::disks::DisksStatus::new(self.cfg.disks.wipe),
            ceph: None,
            install: install::write::installed_status(Path::new(&self.cfg.state_dir)),
            pxe: None,
            enrol: None,
            kube_api: None,
            stack: None,
            clock_skew: None,
            time: None,
            network: Default::default(),
            notices: self.notices.clone(),
            state: state_volume(&self.cfg.state_dir),
            counters: Default::default(),
        }
    }
}

/// Spawns the tasks and waits for SIGTERM, or for a task to fail.
async fn supervise(boot: Boot) -> Result<()> {
    let report = Report::new(boot.status());
    let (join_tx, join_rx) = watch::channel(None);
    let (pxe_tx, pxe_rx) = watch::channel(None);
    let secret = std::sync::OnceLock::new();
    if let Ok(s) = &boot.secret {
        let _ = secret.set(s.clone());
    }
    let enrol =
        boot.cfg.pxe.serve.then(|| {
            crate::pxe::enrol::Desk::new(boot.cfg.pxe.clone(), report.clone(), Path::new(&boot.cfg.state_dir))
        });
    let endpoints = Arc::new(Endpoints {
        report: report.clone(),
        secret,
        join_info: join_rx,
        join_server: Default::default(),
        pxe: pxe_rx,
        rejections: Default::default(),
        enrol,
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let mut tasks = JoinSet::new();
    tasks.spawn(server::serve(SocketAddr::from(([0, 0, 0, 0], boot.cfg.status_port)), endpoints.clone()));
    if boot.cfg.kubernetes.enabled {
        tasks.spawn(server::serve_portal(SocketAddr::from(([0, 0, 0, 0], crate::portal::PORT)), endpoints.clone()));
    }
    tasks.spawn(crate::system::task::watch(report.clone()));
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!("telling systemd we are ready: {e}");
    }
    let live = install::live::Live::current();
    match mode(live.is_some(), crate::pxe::netbooted(&boot.cmdline), &boot.cfg.install) {
        Mode::LiveInstall => {
            let live = live.expect("a live session");
            tasks.spawn(install::session::live(report.clone(), boot.cfg.install.clone(), live));
        }
        Mode::NetbootInstall => {
            let (report, cfg, cmdline) = (report.clone(), boot.cfg.install.clone(), boot.cmdline.clone());
            tasks.spawn(async move {
                // Enrolled first: the installed system keeps the secret this node is given.
                let boot = enrolled(boot, &report, &endpoints).await;
                // Before the disks are looked at for Ceph: the install may take the PC's disk.
                if install::session::netboot(report.clone(), cfg, cmdline).await {
                    return Ok(());
                }
                node(boot, report, join_tx, pxe_tx, endpoints).await
            });
        }
        Mode::Node => {
            tasks.spawn(node(boot, report.clone(), join_tx, pxe_tx, endpoints));
        }
    }
    // systemd's watchdog (WatchdogSec in the unit): pinged from this loop, at a third of the
    // interval, so a runtime that stops running tasks gets the agent restarted.
    let mut watchdog = tokio::time::interval(watchdog_interval().unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = watchdog.tick() => {
                if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]) {
                    warn!("pinging systemd's watchdog: {e}");
                }
            }
            _ = term.recv() => {
                info!("stopping on SIGTERM");
                return Ok(());
            }
            Some(done) = tasks.join_next() => match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) if e.is_panic() => return Err(anyhow!("a task panicked: {e}; stopping so systemd starts the agent again")),
                Err(e) => return Err(anyhow!("a task stopped: {e}")),
            },
        }
    }
}

/// How often to ping systemd's watchdog: a third of `WatchdogSec`, if the unit sets one.
fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 3).max(Duration::from_secs(1)))
}

/// A netbooted node without a secret asks its master for one (`pxe::enrol`) and waits until
/// it is admitted; any other boot is returned as it is.
async fn enrolled(mut boot: Boot, report: &Report, endpoints: &Endpoints) -> Boot {
    let Some(base) = boot.secret.is_err().then(|| crate::pxe::base_url(&boot.cmdline)).flatten() else {
        return boot;
    };
    let inv = &boot.inventory;
    let master_host = base.trim_start_matches("http://").split(['/', ':']).next().unwrap_or_default().to_string();
    let who = crate::pxe::enrol::Request {
        mac: enrolment_mac(inv, &master_host),
        machine_id: inv.machine_id.clone(),
        hostname: inv.hostname.clone(),
        key: String::new(),
    };
    let (secret_path, key_path) = (PathBuf::from(SECRET_PATH), PathBuf::from(crate::pxe::enrol::NODE_KEY));
    // The key's fingerprint is on the console from the first line, for an admin to approve.
    let path = key_path.clone();
    let fingerprint = crate::sys::blocking(move || crate::pxe::enrol::node_key(&path))
        .await
        .map(|k| crate::pxe::enrol::fingerprint(x25519_dalek::PublicKey::from(&k).as_bytes()))
        .unwrap_or_else(|e| format!("unknown: {e:#}"));
    report.update(|s| {
        s.phase = Phase::Enrolling;
        s.message = format!(
            "netbooted without a cluster secret: asking {base} to enrol this node (MAC {}, key fingerprint {fingerprint})",
            who.mac
        );
    });
    let secret =
        crate::pxe::enrol::obtain(report.clone(), base, boot.cmdline.clone(), who, secret_path, key_path).await;
    let _ = endpoints.secret.set(secret.clone());
    boot.secret = Ok(secret);
    boot
}

/// The MAC of the NIC on the master's subnet (the one this node netbooted through, as far as
/// can be told), else the first NIC's.
fn enrolment_mac(inv: &Inventory, master: &str) -> String {
    let master: Option<std::net::Ipv4Addr> = master.parse().ok();
    let on_subnet = |cidr: &str| -> bool {
        let (Some((a, len)), Some(m)) = (cidr.split_once('/'), master) else { return false };
        let (Ok(a), Ok(len)) = (a.parse::<std::net::Ipv4Addr>(), len.parse::<u32>()) else { return false };
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len.min(32)) };
        u32::from(a) & mask == u32::from(m) & mask
    };
    inv.nics
        .iter()
        .find(|n| n.addresses.iter().any(|c| on_subnet(c)))
        .or(inv.nics.first())
        .map(|n| n.mac.to_ascii_lowercase())
        .unwrap_or_default()
}

/// An ordinary node's tasks: preload and disks always; the cluster and what depends on it only
/// with a secret (a netbooted node gets one by enrolment first).
async fn node(
    boot: Boot,
    report: Report,
    join_info: watch::Sender<Option<cluster::JoinInfo>>,
    pxe: watch::Sender<Option<crate::pxe::Serving>>,
    endpoints: Arc<Endpoints>,
) -> Result<()> {
    let boot = enrolled(boot, &report, &endpoints).await;
    let Boot { cfg, secret, cmdline, store, state, inventory, .. } = boot;
    if cfg.kubernetes.enabled {
        // What a power cut left of the pod network's state, before this node's kubelet needs it.
        let removed = crate::heal::cni::repair(Path::new("/"));
        if !removed.is_empty() {
            report.update(|s| {
                s.notices.push(format!(
                    "removed {} CNI result cache file(s) a power cut left unreadable, so their pods' sandboxes can be stopped",
                    removed.len()
                ))
            });
        }
    }
    let state_dir = PathBuf::from(&cfg.state_dir);
    let mut tasks = JoinSet::new();
    tasks.spawn(crate::preload::task::run(report.clone(), state_dir.clone(), cmdline));
    let (offer_tx, offer_rx) = watch::channel(Vec::new());
    tasks.spawn(crate::disks::task::run(report.clone(), cfg.disks.clone(), state_dir, state.boots, offer_tx));
    match secret {
        Err(message) => {
            error!("{message}");
            report.update(|s| {
                s.phase = Phase::NeedsSecret;
                s.message = message;
            });
        }
        Ok(secret) => {
            let (view_tx, view_rx) = watch::channel(ClusterView::default());
            tasks.spawn(crate::pxe::task::run(report.clone(), cfg.clone(), view_rx.clone(), pxe, endpoints.clone()));
            tasks.spawn(crate::network::time::run(report.clone(), view_rx.clone()));
            tasks.spawn(crate::network::serve::run(
                report.clone(),
                cfg.state_dir.clone(),
                cfg.network.clone(),
                view_rx.clone(),
            ));
            let (pod_cidr_tx, pod_cidr_rx) = watch::channel(None);
            tasks.spawn(cluster::api::run(
                report.clone(),
                inventory.hostname.clone(),
                cfg.kubernetes.enabled,
                cfg.cluster.pod_cidr.clone(),
                view_rx.clone(),
                pod_cidr_tx,
            ));
            if cfg.kubernetes.enabled {
                let settings = crate::stack::task::Settings {
                    state_dir: PathBuf::from(&cfg.state_dir),
                    pod_cidr: cfg.cluster.pod_cidr.clone(),
                    service_cidr: cfg.cluster.service_cidr.clone(),
                    kubernetes_version: cfg.kubernetes.version.clone(),
                };
                tasks.spawn(crate::stack::task::run(report.clone(), settings, view_rx.clone()));
            }
            let hostname = inventory.hostname.clone();
            tasks.spawn(crate::disks::ceph::run(report.clone(), cfg.clone(), hostname, view_rx, offer_rx.clone()));
            let links =
                cluster::Links { report, ceph_offer: offer_rx, view: view_tx, join_info, pod_cidr: pod_cidr_rx };
            tasks.spawn(Cluster::new(cfg, secret, inventory, store, state, links).run());
        }
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) if e.is_panic() => {
                return Err(anyhow!("a task panicked: {e}; stopping so systemd starts the agent again"))
            }
            Err(e) => return Err(anyhow!("a task stopped: {e}")),
        }
    }
    // Every task finished (a node without a secret, once its disks and images are done): stay
    // up to answer `/status`.
    std::future::pending().await
}

fn apply_hostname(cfg: &NodeConfig, inv: &Inventory) {
    let mac = inv.primary_mac_hex().unwrap_or_else(|| inv.machine_id.clone());
    let name = match render_hostname(&cfg.hostname, &mac, &inv.machine_id) {
        Ok(name) => name,
        Err(e) => return warn!("rendering hostname: {e:#}"),
    };
    if name != inv.hostname {
        match nix::unistd::sethostname(&name) {
            Ok(()) => info!(hostname = %name, "set hostname"),
            Err(e) => warn!(hostname = %name, "setting hostname: {e}"),
        }
    }
    // The node's own name resolves without a DNS server (Debian's 127.0.1.1 convention):
    // sudo, kubeadm's preflight and the kubelet look it up, and a room may have no DNS at all.
    if let Err(e) = cluster::hosts::set_hosts_entry(std::path::Path::new("/etc/hosts"), &name, "127.0.1.1") {
        warn!("mapping the hostname in /etc/hosts: {e:#}");
    }
}

fn state_volume(dir: &str) -> StateVolume {
    let size_bytes = nix::sys::statvfs::statvfs(dir).map(|s| s.blocks() * s.fragment_size()).unwrap_or_else(|e| {
        warn!("reading size of state dir {dir}: {e}");
        0
    });
    StateVolume { dir: dir.into(), size_bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_boot_is_for() {
        let cfg = |mode: InstallMode, netboot: bool| InstallConfig { mode, netboot, ..Default::default() };
        let auto = cfg(InstallMode::Auto, false);
        assert_eq!(mode(true, false, &auto), Mode::LiveInstall);
        assert_eq!(mode(false, false, &auto), Mode::Node);
        // A netbooted node installs only when asked to.
        assert_eq!(mode(false, true, &auto), Mode::Node);
        assert_eq!(mode(false, true, &cfg(InstallMode::Auto, true)), Mode::NetbootInstall);
        assert_eq!(mode(false, true, &cfg(InstallMode::Off, true)), Mode::Node);
        // install=off on the kernel command line boots the stick as an ordinary node.
        assert_eq!(mode(true, false, &cfg(InstallMode::Off, false)), Mode::Node);
    }
}
