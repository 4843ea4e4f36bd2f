//! `labforge-agent run`: the boot-time daemon. Reads its config layers, takes the inventory,
//! then discovers peers, takes part in the election and brings the node into the cluster,
//! printing a `labforge-status` console line at every phase change.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tokio::sync::RwLock;
use tracing::{error, info, warn};

use crate::config::{render_hostname, NodeConfig, BEACON_PORT, SECRET_PATH};
use crate::discovery::beacon::{Beacon, DiskSummary};
use crate::discovery::net::{self, Counters, Peers};
use crate::election::{self, Allegiance, Decision, NodeView, Params};
use crate::inventory::{Inventory, Roots};
use crate::join::{self, JoinInfo};
use crate::kubeadm;
use crate::node;
use crate::secret::Secret;
use crate::state::{State, Store};
use crate::status::{self, PeerStatus, Shared, StateVolume, Status};
use crate::system::SystemHealth;

/// How often beacons go out and the election is re-evaluated.
const TICK: Duration = Duration::from_secs(1);
/// Peers not heard for this long drop out of the view.
const PEER_TIMEOUT: Duration = Duration::from_secs(6);
/// How often systemd's system state is asked for while the node boots, and afterwards.
const SYSTEM_EVERY_BOOTING: Duration = Duration::from_secs(2);
const SYSTEM_EVERY_BOOTED: Duration = Duration::from_secs(15);

pub fn run(config_path: &Path) -> Result<()> {
    let mut cfg = NodeConfig::load(config_path)?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for w in cfg.apply_cmdline(&cmdline) {
        warn!("{w}");
    }
    let mut partition_secret = None;
    match node::read_config_partition() {
        Ok(Some(p)) => {
            info!(device = %p.device, "found config partition");
            if let Some(t) = &p.labforge_toml {
                if let Err(e) = cfg.apply_partition_toml(t) {
                    error!("ignoring labforge.toml on {}: {e:#}", p.device);
                }
            }
            partition_secret = p.cluster_secret;
        }
        Ok(None) => {}
        Err(e) => warn!("reading the config partition: {e:#}"),
    }
    // The config partition's secret wins (a stick can carry a site-wide secret); the baked
    // one is the default. Without either, the node will not form a cluster.
    let secret = match partition_secret {
        Some(text) => Secret::parse(&text).context("cluster.secret on the config partition"),
        None => Secret::load(Path::new(SECRET_PATH)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting async runtime")?;
    runtime.block_on(Agent::start(cfg, secret)?.run())
}

struct Agent {
    cfg: NodeConfig,
    secret: Option<Secret>,
    store: Store,
    state: State,
    shared: Arc<Shared>,
    /// What our beacons say about us; updated only after the state holding it is saved.
    announced: Arc<Mutex<Allegiance>>,
    peers: Peers,
    counters: Arc<Counters>,
    inventory: Inventory,
    started: Instant,
    lan: Option<node::Lan>,
    phase: String,
    /// When systemd's state was last asked for.
    system_checked: Option<Instant>,
    /// The disks this node offers to Ceph, for the beacons (empty until they are prepared).
    ceph_offer: Arc<Mutex<Vec<String>>>,
    /// Master: every cluster node's Ceph devices heard so far (a node falling silent keeps its
    /// entry: the `CephCluster` must not shrink because a beacon was missed).
    ceph_nodes: std::collections::BTreeMap<String, Vec<String>>,
    ceph_written: Option<String>,
    /// Master with `[pxe] serve`: the dnsmasq answering PXE clients, and when to try again
    /// after it stopped.
    pxe_dnsmasq: Option<std::process::Child>,
    pxe_retry: Option<Instant>,
}

impl Agent {
    fn start(cfg: NodeConfig, secret: Result<Secret>) -> Result<Self> {
        let store = Store::new(Path::new(&cfg.state_dir));
        let mut state = store.load()?;
        state.boots += 1;
        store.save(&state)?;
        let roots = Roots::default();
        let inventory = Inventory::take(&roots, &kernel_addresses)?;
        apply_hostname(&cfg, &inventory);
        let inventory = Inventory::take(&roots, &kernel_addresses)?;
        info!(nics = inventory.nics.len(), disks = inventory.disks.len(), boots = state.boots, "took inventory");
        let (secret, message) = match secret {
            Ok(s) => (Some(s), String::new()),
            Err(e) => (
                None,
                format!(
                    "{e:#}. This node will not form or join a cluster: put a secret made with `labforge secret new` in {SECRET_PATH} (mode 0600) or as cluster.secret on a FAT partition labelled LABFORGE"
                ),
            ),
        };
        let status = Status {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            image: cfg.image.clone(),
            node_id: inventory.machine_id.clone(),
            phase: "starting".into(),
            role: "undecided".into(),
            cluster_uid: None,
            lan_address: None,
            master_address: None,
            kubernetes: if cfg.kubernetes.enabled { "enabled" } else { "disabled" }.into(),
            join_info_sha256: None,
            message,
            peers: Vec::new(),
            node: inventory.clone(),
            system: SystemHealth::default(),
            preload: Default::default(),
            disks: crate::disks::DisksStatus::new(cfg.disks.wipe),
            ceph: None,
            install: crate::install::write::installed_status(Path::new(&cfg.state_dir)),
            pxe: None,
            state: state_volume(&cfg.state_dir),
            counters: Default::default(),
        };
        let shared = Arc::new(Shared {
            status: RwLock::new(status),
            join_info: RwLock::new(None),
            join_server: join::Server::default(),
            secret: secret.clone(),
            join_served: Default::default(),
            join_rejected: Default::default(),
            beacons: Default::default(),
            pxe: Default::default(),
            pxe_served: Default::default(),
            preload_served: Default::default(),
        });
        let counters = shared.beacons.clone();
        Ok(Agent {
            announced: Arc::new(Mutex::new(state.allegiance.clone())),
            cfg,
            secret,
            store,
            state,
            shared,
            peers: Default::default(),
            counters,
            inventory,
            started: Instant::now(),
            lan: None,
            phase: String::new(),
            system_checked: None,
            ceph_offer: Default::default(),
            ceph_nodes: Default::default(),
            ceph_written: None,
            pxe_dnsmasq: None,
            pxe_retry: None,
        })
    }

    async fn run(mut self) -> Result<()> {
        let addr = SocketAddr::from(([0, 0, 0, 0], self.cfg.status_port));
        let server = tokio::spawn(status::serve(addr, self.shared.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing SIGTERM handler")?;
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            warn!("telling systemd we are ready: {e}");
        }
        // Booted from a stick with install mode on: install, and be nothing else this boot.
        let live = crate::install::live::Live::current()
            .filter(|_| self.cfg.install.mode == crate::install::InstallMode::Auto);
        if let Some(live) = live {
            self.install_session(live).await;
            let mut tick = tokio::time::interval(TICK);
            loop {
                tokio::select! {
                    _ = tick.tick() => self.refresh_system().await,
                    _ = term.recv() => { info!("stopping on SIGTERM"); return Ok(()); }
                }
            }
        }
        // Netbooted with [install] netboot: install onto the PC's disk first (before the disks
        // are looked at for Ceph), and reboot into it.
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if crate::pxe::netbooted(&cmdline)
            && self.cfg.install.netboot
            && self.cfg.install.mode != crate::install::InstallMode::Off
            && self.netboot_install(cmdline).await
        {
            let mut tick = tokio::time::interval(TICK);
            loop {
                tokio::select! {
                    _ = tick.tick() => self.refresh_system().await,
                    _ = term.recv() => { info!("stopping on SIGTERM"); return Ok(()); }
                }
            }
        }
        if self.secret.is_none() {
            let msg = self.shared.status.read().await.message.clone();
            error!("{msg}");
            self.set_phase("needs-secret", &msg).await;
        } else {
            self.set_phase("discovering", "waiting for the LAN").await;
        }
        tokio::spawn(preload_images(self.shared.clone(), PathBuf::from(&self.cfg.state_dir)));
        tokio::spawn(prepare_disks(self.shared.clone(), self.cfg.clone(), self.state.boots, self.ceph_offer.clone()));
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = term.recv() => { info!("stopping on SIGTERM"); break; }
            }
            if server.is_finished() {
                return server.await.context("status server task")?;
            }
            self.refresh_system().await;
            if self.secret.is_none() {
                continue;
            }
            if let Err(e) = self.step().await {
                error!("{e:#}");
                self.set_phase("error", &format!("{e:#}")).await;
            }
        }
        Ok(())
    }

    /// A live session from removable media: install onto an internal disk (see `install`),
    /// publishing every step, then reboot into it. Refusals and failures stay on the console
    /// and in `/status`; nothing else runs this boot (no discovery, disk preparation or import).
    async fn install_session(&mut self, live: crate::install::live::Live) {
        let intro = format!("booted from {} ({}): installing onto an internal disk", live.disk, live.reason);
        let cfg = self.cfg.install.clone();
        self.run_install(intro, "remove the stick", move |publish| {
            crate::install::write::run(&cfg, &live, &crate::disks::probe::Roots::default(), publish)
        })
        .await;
    }

    /// A netbooted node with `[install] netboot`: install onto its disk from the image it runs
    /// (see `install::net`) and reboot into it. Returns whether it is rebooting; if not (no
    /// safe disk, a disk installed already, a failure), the node runs on netbooted.
    async fn netboot_install(&mut self, cmdline: String) -> bool {
        let cfg = self.cfg.install.clone();
        self.run_install(
            "netbooted: installing onto this PC's disk".into(),
            "it boots from its disk if the disk comes before the network in the boot order",
            move |publish| {
                let manifest = std::path::Path::new(crate::install::net::NET_MANIFEST);
                crate::install::net::run(&cfg, manifest, &cmdline, &crate::disks::probe::Roots::default(), publish)
            },
        )
        .await
    }

    /// Runs an installer job, publishing its steps, and reboots if it wrote a disk. Returns
    /// whether it is rebooting.
    async fn run_install(
        &mut self,
        intro: String,
        after: &str,
        job: impl FnOnce(&mut dyn FnMut(&crate::install::write::InstallStatus)) -> crate::install::write::InstallStatus
            + Send
            + 'static,
    ) -> bool {
        use crate::install::write::InstallStatus;
        self.refresh_system().await;
        self.set_phase("installing", &intro).await;
        let shared = self.shared.clone();
        let result = blocking(move || {
            let mut last = String::new();
            let mut publish = |st: &InstallStatus| {
                shared.status.blocking_write().install = Some(st.clone());
                if st.state != last {
                    last = st.state.clone();
                    shared.status.blocking_read().announce();
                }
            };
            Ok(job(&mut publish))
        })
        .await;
        let result = result.unwrap_or_else(|e| InstallStatus {
            state: "failed".into(),
            message: format!("{e:#}"),
            ..Default::default()
        });
        self.shared.status.write().await.install = Some(result.clone());
        let phase = match result.state.as_str() {
            "installed" => "installed",
            "refused" => "install-refused",
            _ => "install-failed",
        };
        if phase == "installed" {
            info!("{}", result.message);
        } else {
            error!("{}", result.message);
        }
        // Rebooting makes sense only after this boot wrote a disk; a disk found installed
        // already would boot the stick (or the network) again.
        let reboot = phase == "installed" && result.record.is_some() && self.cfg.install.reboot;
        let message = if reboot { format!("{}; rebooting into it ({after})", result.message) } else { result.message };
        self.set_phase(phase, &message).await;
        if !reboot {
            return false;
        }
        match blocking(|| {
            let st =
                std::process::Command::new("systemctl").arg("reboot").status().context("running systemctl reboot")?;
            anyhow::ensure!(st.success(), "systemctl reboot failed");
            Ok(())
        })
        .await
        {
            Ok(()) => true,
            Err(e) => {
                error!("{e:#}");
                false
            }
        }
    }

    /// One round: make sure discovery runs, then decide and act.
    async fn step(&mut self) -> Result<()> {
        if self.lan.is_none() {
            let Some(lan) = node::lan(&self.cfg.cluster.lan_interface, &self.inventory) else {
                return Ok(()); // no address yet (DHCP still running)
            };
            self.start_discovery(&lan)?;
            info!(interface = %lan.interface, address = %lan.address, "cluster LAN is up");
            self.started = Instant::now();
            self.lan = Some(lan);
        }
        self.refresh_status().await;
        let peers = net::fresh(&self.peers, PEER_TIMEOUT);
        let me = self.view();
        let views: Vec<NodeView> = peers.iter().map(|p| p.beacon.node.clone()).collect();
        let params = Params {
            minimum_nodes: self.cfg.cluster.minimum_nodes,
            settle: Duration::from_secs(self.cfg.cluster.settle_seconds),
        };
        let decision = election::decide(&me, &views, self.started.elapsed(), &params);
        let address_of =
            |id: &str| peers.iter().find(|p| p.beacon.node.id == id).map(|p| format!("{}:{}", p.from, p.beacon.port));
        match decision {
            Decision::Wait { reason } => {
                let phase = if self.started.elapsed() < params.settle { "discovering" } else { "electing" };
                self.set_phase(phase, &reason).await;
            }
            Decision::Claim => {
                let uid = random_uid();
                info!(%uid, "claiming mastership");
                self.persist(Allegiance::Master { uid, committed: false })?;
                self.set_phase("electing", "claimed mastership; waiting for followers").await;
            }
            Decision::Commit => {
                let uid = self.state.allegiance.uid().expect("a claim").to_string();
                info!(%uid, "committing: this node is the master");
                self.persist(Allegiance::Master { uid, committed: true })?;
                self.lead().await?;
            }
            Decision::Lead => self.lead().await?,
            Decision::Yield { uid, master } => {
                warn!(%uid, %master, "giving up our uncommitted claim for a better one");
                self.persist(Allegiance::Follower { uid, master })?;
            }
            Decision::Follow { uid, master, ready } => {
                let want = Allegiance::Follower { uid: uid.clone(), master: master.clone() };
                if self.state.allegiance != want {
                    info!(%uid, %master, "following");
                    self.persist(want)?;
                }
                match (ready, address_of(&master)) {
                    (true, Some(addr)) => self.follow(&uid, &addr).await?,
                    _ if self.state.joined => self.set_phase("ready", "joined; master not in sight").await,
                    _ => {
                        self.set_phase("waiting-for-master", &format!("waiting for {master} to lead cluster {uid}"))
                            .await
                    }
                }
            }
            Decision::Conflict { uid, master, reason } => {
                if self.phase != "conflict" {
                    error!("{reason}");
                }
                self.persist(Allegiance::Refused { uid, master })?;
                self.set_phase("conflict", &reason).await;
            }
        }
        Ok(())
    }

    fn start_discovery(&self, lan: &node::Lan) -> Result<()> {
        let secret = self.secret.clone().expect("checked");
        let sock = Arc::new(net::bind(SocketAddr::from(([0, 0, 0, 0], BEACON_PORT)), Some(&lan.interface))?);
        let verifier = crate::discovery::Verifier::new(secret.clone(), &self.inventory.machine_id);
        tokio::spawn(net::receive(sock.clone(), verifier, self.peers.clone(), self.counters.clone()));
        let dest = SocketAddr::from((lan.broadcast, BEACON_PORT));
        let announced = self.announced.clone();
        let ceph_offer = self.ceph_offer.clone();
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
            ts_ms: 0,
            nonce: String::new(),
        };
        tokio::spawn(net::send(sock, dest, secret, TICK, self.counters.clone(), move || {
            let mut b = base.clone();
            b.node.allegiance = announced.lock().expect("announced lock").clone();
            b.disks.ceph = ceph_offer.lock().expect("ceph lock").clone();
            b.ts_ms = net::now_ms();
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
        *self.announced.lock().expect("announced lock") = allegiance;
        Ok(())
    }

    /// Master: run kubeadm init once, mint join info, keep the token fresh, serve it.
    async fn lead(&mut self) -> Result<()> {
        let lan = self.lan.clone().expect("discovery runs");
        let uid = self.state.allegiance.uid().expect("committed").to_string();
        let endpoint_host = kubeadm::endpoint_host(&self.cfg.cluster);
        node::set_hosts_entry(Path::new("/etc/hosts"), &endpoint_host, &lan.address.to_string())?;
        if self.state.join_info.is_none() || !self.state.initialised {
            self.set_phase("initialising", "this node is the master").await;
            let mut info = JoinInfo {
                cluster_uid: uid.clone(),
                endpoint: kubeadm::endpoint(&self.cfg.cluster),
                master_address: lan.address.to_string(),
                token: String::new(),
                ca_cert_hash: String::new(),
                token_expires: 0,
            };
            if self.cfg.kubernetes.enabled {
                let token = self
                    .state
                    .join_info
                    .as_ref()
                    .map(|j| j.token.clone())
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(kubeadm::new_token);
                info.token = token.clone();
                info.token_expires = now_secs() + kubeadm::TOKEN_TTL_SECS;
                // Remember the token before kubeadm sees it, so a power cut mid-init resumes
                // with the same one.
                self.state.join_info = Some(info.clone());
                self.store.save(&self.state)?;
                let dir = PathBuf::from(&self.cfg.state_dir).join("kubeadm");
                std::fs::create_dir_all(&dir)?;
                let config = dir.join("init.yaml");
                std::fs::write(
                    &config,
                    kubeadm::init_config(&kubeadm::InitParams {
                        cluster: &self.cfg.cluster,
                        kubernetes_version: &self.cfg.kubernetes.version,
                        node_name: &self.inventory.hostname,
                        node_ip: &lan.address.to_string(),
                        token: &token,
                    }),
                )?;
                if Path::new(kubeadm::KUBELET_CONF).exists() && Path::new(kubeadm::CA_CERT).exists() {
                    info!("kubeadm init already ran on this node (power cut after it finished); not running it again");
                } else {
                    blocking(move || kubeadm::run(&kubeadm::init_argv(&config))).await?;
                }
                let pem = std::fs::read(kubeadm::CA_CERT).with_context(|| format!("reading {}", kubeadm::CA_CERT))?;
                info.ca_cert_hash = kubeadm::ca_cert_hash(&pem)?;
            }
            self.state.join_info = Some(info);
            self.state.initialised = true;
            self.store.save(&self.state)?;
        }
        self.refresh_token().await?;
        let info = self.state.join_info.clone().expect("minted");
        *self.shared.join_info.write().await = Some(info.clone());
        let msg = if self.cfg.kubernetes.enabled {
            "leading the cluster".to_string()
        } else {
            "leading the cluster (kubernetes disabled in this image: no kubeadm was run)".to_string()
        };
        self.set_join_info(&info).await;
        self.set_phase("ready", &msg).await;
        self.serve_pxe(&lan).await;
        self.render_ceph(&uid).await
    }

    /// Master with `[pxe] serve`: keeps dnsmasq answering PXE clients on the LAN and the
    /// artifacts served under `/pxe/`; a dnsmasq that stops is reported and started again.
    async fn serve_pxe(&mut self, lan: &node::Lan) {
        use crate::pxe::{self, PxeStatus};
        if !self.cfg.pxe.serve {
            return;
        }
        let served = self.shared.pxe_served.load(std::sync::atomic::Ordering::Relaxed);
        let preload_served = self.shared.preload_served.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(child) = &mut self.pxe_dnsmasq {
            match child.try_wait() {
                Ok(None) => {
                    if let Some(p) = self.shared.status.write().await.pxe.as_mut() {
                        p.served = served;
                        p.preload_served = preload_served;
                    }
                    return;
                }
                Ok(Some(exit)) => {
                    self.pxe_dnsmasq = None;
                    self.pxe_retry = Some(Instant::now() + Duration::from_secs(10));
                    let msg =
                        format!("dnsmasq stopped ({exit}); starting it again in 10 s (its log is in the journal)");
                    error!("{msg}");
                    self.publish_pxe(PxeStatus {
                        state: "failed".into(),
                        message: msg,
                        served,
                        preload_served,
                        ..Default::default()
                    })
                    .await;
                    return;
                }
                Err(e) => warn!("checking dnsmasq: {e}"),
            }
        }
        if self.pxe_retry.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let dir = Path::new(pxe::ARTIFACT_DIR);
        let url = format!("http://{}:{}/pxe/boot.ipxe", lan.address, self.cfg.status_port);
        let mode = if self.cfg.pxe.dhcp_range.is_some() { "dhcp" } else { "proxy-dhcp" };
        let unavailable = if pxe::image_script(dir, &self.cfg.image).is_none() {
            Some(format!(
                "this image carries no netboot files in {}: build it with \"pxe\" in outputs",
                pxe::ARTIFACT_DIR
            ))
        } else if !Path::new(pxe::IPXE_DIR).join("ipxe.efi").is_file() {
            Some(format!("{}/ipxe.efi is missing (Debian package ipxe)", pxe::IPXE_DIR))
        } else {
            None
        };
        if let Some(msg) = unavailable {
            self.pxe_retry = Some(Instant::now() + Duration::from_secs(3600));
            error!("not serving netboot: {msg}");
            self.publish_pxe(PxeStatus {
                state: "unavailable".into(),
                mode: mode.into(),
                url,
                message: msg,
                served,
                preload_served,
            })
            .await;
            return;
        }
        let leases = Path::new(&self.cfg.state_dir).join("pxe.leases");
        let started = pxe::dnsmasq_args(
            &lan.interface,
            lan.address,
            lan.netmask,
            &url,
            Path::new(pxe::IPXE_DIR),
            self.cfg.pxe.dhcp_range.as_deref(),
            &leases,
        )
        .and_then(|args| {
            std::process::Command::new("dnsmasq")
                .args(args)
                .stdin(std::process::Stdio::null())
                .spawn()
                .context("starting dnsmasq")
        });
        match started {
            Ok(child) => {
                self.pxe_dnsmasq = Some(child);
                let network = Ipv4Addr::from(u32::from(lan.address) & u32::from(lan.netmask));
                *self.shared.pxe.write().unwrap_or_else(|e| e.into_inner()) = Some(pxe::Serving {
                    dir: dir.to_path_buf(),
                    image: self.cfg.image.clone(),
                    network,
                    netmask: lan.netmask,
                });
                info!(%url, mode, "serving netboot");
                let msg = format!("answering PXE clients on {} ({mode}); iPXE boots {url}", lan.interface);
                self.publish_pxe(PxeStatus {
                    state: "serving".into(),
                    mode: mode.into(),
                    url,
                    message: msg,
                    served,
                    preload_served,
                })
                .await;
            }
            Err(e) => {
                self.pxe_retry = Some(Instant::now() + Duration::from_secs(10));
                error!("{e:#}");
                self.publish_pxe(PxeStatus {
                    state: "failed".into(),
                    mode: mode.into(),
                    url,
                    message: format!("{e:#}"),
                    served,
                    preload_served,
                })
                .await;
            }
        }
    }

    async fn publish_pxe(&self, p: crate::pxe::PxeStatus) {
        let changed = {
            let mut s = self.shared.status.write().await;
            let changed = s.pxe.as_ref().map(|x| &x.state) != Some(&p.state);
            s.pxe = Some(p);
            changed
        };
        if changed {
            self.shared.snapshot().await.announce();
        }
    }

    /// Master: renders the `CephCluster` from this node's and its followers' Ceph devices and
    /// writes it when it changed.
    async fn render_ceph(&mut self, uid: &str) -> Result<()> {
        let own = self.ceph_offer.lock().expect("ceph lock").clone();
        self.ceph_nodes.insert(self.inventory.hostname.clone(), own);
        for p in net::fresh(&self.peers, PEER_TIMEOUT) {
            if matches!(&p.beacon.node.allegiance, Allegiance::Follower { uid: u, .. } if u == uid) {
                self.ceph_nodes.insert(p.beacon.hostname.clone(), p.beacon.disks.ceph.clone());
            }
        }
        let state_dir = Path::new(&self.cfg.state_dir);
        let text = crate::disks::ceph::render(
            &self.ceph_nodes,
            &self.cfg.disks.ceph_image,
            &state_dir.join("rook").to_string_lossy(),
        );
        if self.ceph_written.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        let path = state_dir.join(crate::disks::ceph::MANIFEST);
        std::fs::create_dir_all(path.parent().expect("a directory"))?;
        crate::state::write_atomic(&path, text.as_bytes())?;
        info!(path = %path.display(), nodes = self.ceph_nodes.values().filter(|d| !d.is_empty()).count(), "wrote the CephCluster");
        self.ceph_written = Some(text);
        self.shared.status.write().await.ceph =
            Some(status::CephView { manifest: path.to_string_lossy().into_owned(), nodes: self.ceph_nodes.clone() });
        self.shared.snapshot().await.announce();
        Ok(())
    }

    /// Mints a new bootstrap token when the current one has less than two hours left.
    async fn refresh_token(&mut self) -> Result<()> {
        let Some(info) = self.state.join_info.clone() else { return Ok(()) };
        if !self.cfg.kubernetes.enabled || info.token_expires > now_secs() + 2 * 3600 {
            return Ok(());
        }
        let token = kubeadm::new_token();
        let argv = kubeadm::token_create_argv(&token);
        blocking(move || kubeadm::run(&argv)).await?;
        let mut info = info;
        info.token = token;
        info.token_expires = now_secs() + kubeadm::TOKEN_TTL_SECS;
        info!("minted a fresh bootstrap token");
        self.state.join_info = Some(info);
        self.store.save(&self.state)
    }

    /// Worker: fetch join info from the master and run kubeadm join once.
    async fn follow(&mut self, uid: &str, master_addr: &str) -> Result<()> {
        if self.state.joined {
            if let Some(info) = self.state.join_info.clone() {
                node::set_hosts_entry(
                    Path::new("/etc/hosts"),
                    &kubeadm::endpoint_host(&self.cfg.cluster),
                    &info.master_address,
                )?;
                self.set_join_info(&info).await;
            }
            self.set_phase("ready", "joined").await;
            return Ok(());
        }
        self.set_phase("joining", &format!("fetching join info from {master_addr}")).await;
        let secret = self.secret.clone().expect("checked");
        let (addr, id) = (master_addr.to_string(), self.inventory.machine_id.clone());
        let info = match blocking(move || join::fetch(&addr, &secret, &id, net::now_ms())).await {
            Ok(i) => i,
            Err(e) => {
                warn!("{e:#}; will retry");
                return Ok(());
            }
        };
        anyhow::ensure!(
            info.cluster_uid == uid,
            "the master answered for cluster {}, expected {uid}",
            info.cluster_uid
        );
        node::set_hosts_entry(
            Path::new("/etc/hosts"),
            &kubeadm::endpoint_host(&self.cfg.cluster),
            &info.master_address,
        )?;
        self.state.join_info = Some(info.clone());
        self.store.save(&self.state)?;
        if self.cfg.kubernetes.enabled {
            if Path::new(kubeadm::KUBELET_CONF).exists() {
                info!("kubelet is already configured on this node; not running kubeadm join again");
            } else {
                let argv =
                    kubeadm::join_argv(&info.endpoint, &info.token, &info.ca_cert_hash, &self.inventory.hostname);
                blocking(move || kubeadm::run(&argv)).await?;
            }
        }
        self.state.joined = true;
        self.store.save(&self.state)?;
        self.set_join_info(&info).await;
        let msg = if self.cfg.kubernetes.enabled {
            "joined"
        } else {
            "joined (kubernetes disabled in this image: no kubeadm was run)"
        };
        self.set_phase("ready", msg).await;
        Ok(())
    }

    async fn set_join_info(&self, info: &JoinInfo) {
        let digest = hex::encode(Sha256::digest(serde_json::to_vec(info).expect("json")));
        let mut s = self.shared.status.write().await;
        s.join_info_sha256 = Some(digest);
        s.master_address = Some(info.master_address.clone());
    }

    /// Brings the shared status up to date with state, peers and counters.
    async fn refresh_status(&self) {
        let peers = net::fresh(&self.peers, PEER_TIMEOUT);
        let mut s = self.shared.status.write().await;
        for nic in &mut s.node.nics {
            nic.addresses = kernel_addresses(&nic.name);
        }
        s.lan_address = self.lan.as_ref().map(|l| l.address.to_string());
        s.role = role_name(&self.state.allegiance).into();
        s.cluster_uid = self.state.allegiance.uid().map(str::to_string);
        s.peers = peers
            .iter()
            .map(|p| PeerStatus {
                id: p.beacon.node.id.clone(),
                hostname: p.beacon.hostname.clone(),
                address: p.from.to_string(),
                role: role_name(&p.beacon.node.allegiance).into(),
            })
            .collect();
        if let (Some(lan), None) = (&self.lan, &s.master_address) {
            if matches!(self.state.allegiance, Allegiance::Master { committed: true, .. }) {
                s.master_address = Some(lan.address.to_string());
            }
        }
    }

    /// Asks systemd how the boot went (often while it runs, rarely after), and prints the
    /// console line when the answer changes.
    async fn refresh_system(&mut self) {
        let booted = self.shared.status.read().await.system.booted();
        let every = if booted { SYSTEM_EVERY_BOOTED } else { SYSTEM_EVERY_BOOTING };
        if self.system_checked.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.system_checked = Some(Instant::now());
        let health = blocking(|| Ok(SystemHealth::query())).await.unwrap_or_default();
        let changed = {
            let mut s = self.shared.status.write().await;
            let changed = s.system != health;
            if changed && !health.failed_units.is_empty() {
                warn!(failed = ?health.failed_units, "systemd reports failed units");
            }
            s.system = health;
            changed
        };
        if changed && !self.phase.is_empty() {
            self.shared.snapshot().await.announce();
        }
    }

    /// Records the phase; prints the console line when the phase, the role or the number of
    /// peers in sight changes (a node joining or leaving is worth a line).
    async fn set_phase(&mut self, phase: &str, message: &str) {
        self.refresh_status().await;
        let key = {
            let mut s = self.shared.status.write().await;
            s.message = message.to_string();
            let key = format!("{phase}/{}/{}", s.role, s.peers.len());
            s.phase = phase.to_string();
            key
        };
        if self.phase != key {
            self.phase = key;
            self.shared.snapshot().await.announce();
        }
    }
}

/// Imports the preloaded images into containerd, retrying failures with a growing pause until
/// every image is in; announces each change of the import state on the console.
async fn preload_images(shared: Arc<Shared>, state_dir: PathBuf) {
    use crate::preload::{self, Containerd, PreloadStatus};
    let layout = Path::new(preload::LAYOUT_DIR);
    let entries = match preload::read_layout(layout) {
        Ok(e) if e.is_empty() => return,
        Ok(e) => e,
        Err(e) => {
            error!("preloaded images: {e:#}");
            let failed = vec![preload::ImportFailure { name: "*".into(), error: format!("{e:#}") }];
            publish_preload(&shared, PreloadStatus { state: "failed".into(), failed, ..Default::default() }).await;
            return;
        }
    };
    preload::link_layout(&state_dir);
    let mut status = PreloadStatus { state: "waiting".into(), total: entries.len(), ..Default::default() };
    publish_preload(&shared, status.clone()).await;
    let mut pause = Duration::from_secs(2);
    loop {
        if !blocking(|| Ok(Containerd::default().ready())).await.unwrap_or(false) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let (entries2, shared2, before) = (entries.clone(), shared.clone(), status.clone());
        status = blocking(move || {
            let mut progress = |s: &PreloadStatus| shared2.status.blocking_write().preload = s.clone();
            let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
            let source = preload::Source::for_boot(Path::new(preload::LAYOUT_DIR), &cmdline);
            Ok(preload::round(&Containerd::default(), &source, &entries2, before, &mut progress))
        })
        .await
        .expect("round never fails");
        if let Err(e) = preload::save_result(&state_dir, &status) {
            warn!("saving the preload result: {e:#}");
        }
        publish_preload(&shared, status.clone()).await;
        if status.state == "done" {
            info!(imported = status.imported, present = status.present, "preloaded images are in containerd");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(60));
    }
}

/// Prepares the data disks once at boot (see `disks::prepare`), publishing every change and,
/// when done, offering the eligible disks to Ceph in the beacons.
async fn prepare_disks(shared: Arc<Shared>, cfg: NodeConfig, boot: u64, offer: Arc<Mutex<Vec<String>>>) {
    let shared2 = shared.clone();
    let result = blocking(move || {
        let mut last_state = String::new();
        let mut publish = |d: &crate::disks::DisksStatus| {
            let mut s = shared2.status.blocking_write();
            s.disks = d.clone();
            let changed = last_state != d.state;
            last_state = d.state.clone();
            drop(s);
            if changed {
                // Counters are left as they were; the next phase line has fresh ones.
                shared2.status.blocking_read().announce();
            }
        };
        let roots = crate::disks::probe::Roots::default();
        Ok(crate::disks::prepare(&roots, &cfg.disks, Path::new(&cfg.state_dir), boot, &mut publish))
    })
    .await;
    match result {
        Ok(status) => *offer.lock().expect("ceph lock") = status.ceph_devices,
        Err(e) => error!("preparing disks: {e:#}"),
    }
}

async fn publish_preload(shared: &Shared, p: crate::preload::PreloadStatus) {
    let changed = {
        let mut s = shared.status.write().await;
        let changed = s.preload.state != p.state || s.preload.failed != p.failed;
        s.preload = p;
        changed
    };
    if changed {
        shared.snapshot().await.announce();
    }
}

fn role_name(a: &Allegiance) -> &'static str {
    match a {
        Allegiance::None => "undecided",
        Allegiance::Master { .. } => "master",
        Allegiance::Follower { .. } => "worker",
        Allegiance::Refused { .. } => "refused",
    }
}

/// Index in `master-priority` of this node's MAC or by-id path (lower is preferred).
fn priority(list: &[String], inv: &Inventory) -> u32 {
    list.iter()
        .position(|entry| {
            let e = entry.to_ascii_lowercase();
            inv.nics.iter().any(|n| n.mac.to_ascii_lowercase() == e)
                || inv.disks.iter().any(|d| d.by_id.as_deref() == Some(entry.as_str()))
        })
        .map(|i| i as u32)
        .unwrap_or(u32::MAX)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.context("worker thread")?
}

fn random_uid() -> String {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).expect("random bytes");
    hex::encode(b)
}

fn now_secs() -> u64 {
    net::now_ms() / 1000
}

fn apply_hostname(cfg: &NodeConfig, inv: &Inventory) {
    let mac = inv.primary_mac_hex().unwrap_or_else(|| inv.machine_id.clone());
    match render_hostname(&cfg.hostname, &mac, &inv.machine_id) {
        Ok(name) if name != inv.hostname => match nix::unistd::sethostname(&name) {
            Ok(()) => info!(hostname = %name, "set hostname"),
            Err(e) => warn!(hostname = %name, "setting hostname: {e}"),
        },
        Ok(_) => {}
        Err(e) => warn!("rendering hostname: {e:#}"),
    }
}

fn state_volume(dir: &str) -> StateVolume {
    let size_bytes = nix::sys::statvfs::statvfs(dir).map(|s| s.blocks() * s.fragment_size()).unwrap_or_else(|e| {
        warn!("reading size of state dir {dir}: {e}");
        0
    });
    StateVolume { dir: dir.into(), size_bytes }
}

/// Addresses of one interface as the kernel reports them, in CIDR notation.
fn kernel_addresses(name: &str) -> Vec<String> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    addrs
        .filter(|a| a.interface_name == name)
        .filter_map(|a| {
            let ip: IpAddr = match a.address.as_ref()? {
                s if s.as_sockaddr_in().is_some() => s.as_sockaddr_in()?.ip().into(),
                s if s.as_sockaddr_in6().is_some() => s.as_sockaddr_in6()?.ip().into(),
                _ => return None,
            };
            let prefix = a
                .netmask
                .as_ref()
                .and_then(|m| {
                    m.as_sockaddr_in()
                        .map(|m| u32::from(m.ip()).count_ones())
                        .or_else(|| m.as_sockaddr_in6().map(|m| u128::from(m.ip()).count_ones()))
                })
                .unwrap_or(0);
            Some(format!("{ip}/{prefix}"))
        })
        .collect()
}
