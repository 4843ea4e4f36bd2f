//! The cluster task's kubeadm executor: the master runs `kubeadm init` once, mints and renews
//! the join info and serves it; a worker fetches it and runs `kubeadm join` once. What to do is
//! decided in `plan`; the argv and config files are built in `kubeadm`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use tracing::info;

use super::plan::{self, Lead};
use super::{join, kubeadm, Cluster, JoinInfo};
use crate::status::Phase;
use crate::sys::blocking;
use crate::sys::clock::now_secs;

impl Cluster {
    /// Master: run kubeadm init once, mint join info, keep the token fresh, serve it.
    pub(super) async fn lead(&mut self) -> Result<()> {
        // kubeadm pins the master's address: on a bare switch it first takes its own.
        if !self.own_lan().await? {
            return Ok(());
        }
        let lan = self.lan.clone().context("discovery runs before anyone leads")?;
        let uid = self.state.allegiance.uid().context("a committed master has a cluster uid")?.to_string();
        self.hosts_entry(&lan.address.to_string())?;
        let kubernetes = self.cfg.kubernetes.enabled;
        if kubernetes {
            self.refresh_resolv(&lan.address.to_string())?;
        }
        match plan::lead(&self.state, kubernetes, now_secs()) {
            Lead::Init { token } => {
                if self.kubeadm_waits() || (kubernetes && self.images_pending(Phase::Initialising)) {
                    return Ok(());
                }
                self.set_phase(Phase::Initialising, "this node is the master");
                let mut info = JoinInfo {
                    cluster_uid: uid,
                    endpoint: kubeadm::endpoint(&self.cfg.cluster),
                    master_address: lan.address.to_string(),
                    token: String::new(),
                    ca_cert_hash: String::new(),
                    token_expires: 0,
                };
                if kubernetes {
                    info.token = token.unwrap_or_else(kubeadm::new_token);
                    info.token_expires = now_secs() + kubeadm::TOKEN_TTL_SECS;
                    // Remember the token before kubeadm sees it, so a power cut mid-init resumes
                    // with the same one.
                    self.state.join_info = Some(info.clone());
                    self.store.save(&self.state)?;
                    info.ca_cert_hash = self.kubeadm_init(&info.token, &lan.address.to_string()).await?;
                    self.backoff.succeeded();
                    kubeadm_work_to_disk()?;
                }
                self.state.join_info = Some(info);
                self.state.initialised = true;
                self.store.save(&self.state)?;
            }
            // Renewal waits out a failure's pause too; the current token is served meanwhile.
            Lead::RenewToken if self.backoff.wait(Instant::now()).is_some() => {}
            Lead::RenewToken => self.renew_token().await?,
            Lead::Serve => {}
        }
        if kubernetes && !self.kubeconfigs {
            // The lab's administrators get the cluster's admin kubeconfig (on every start, so a
            // user added to the image later gets one too).
            let names = super::kubeconfig::admins(Path::new(super::kubeconfig::SUDOERS_D));
            match super::kubeconfig::install(Path::new(super::kubeconfig::ADMIN_CONF), &names) {
                Ok(files) if !files.is_empty() => info!(?files, "wrote the admins' kubeconfigs"),
                Ok(_) => {}
                Err(e) => tracing::warn!("admin kubeconfigs: {e:#}"),
            }
            // Once per start either way: a failure is logged, not repeated every round.
            self.kubeconfigs = true;
        }
        let info = self.state.join_info.clone().context("join info is minted before it is served")?;
        self.links.join_info.send_replace(Some(info.clone()));
        self.set_join_info(&info);
        self.settle(true);
        Ok(())
    }

    /// True (and reported in `phase`) while the preloaded images are still being imported.
    fn images_pending(&mut self, phase: Phase) -> bool {
        match plan::awaiting_images(&self.links.report.snapshot().preload, phase == Phase::Initialising) {
            Some(message) => {
                self.set_phase(phase, &message);
                true
            }
            None => false,
        }
    }

    /// After this node's kubeadm step: `ready` once the API server reports the node Ready.
    fn settle(&mut self, leading: bool) {
        let kubernetes = self.cfg.kubernetes.enabled;
        let api = self.links.report.snapshot().kube_api;
        let health = match api.and_then(|a| a.node_ready) {
            _ if !super::api::kubectl_present() => plan::NodeHealth::Unobservable,
            Some(true) => plan::NodeHealth::Ready,
            Some(false) => plan::NodeHealth::NotReady,
            None => plan::NodeHealth::Unlisted,
        };
        let (phase, message) = plan::settled(leading, kubernetes, health);
        self.set_phase(phase, message);
    }

    /// Writes `name` under the state directory's `kubeadm/`, 0600: these files carry the
    /// bootstrap token.
    fn kubeadm_file(&self, name: &str, text: &str) -> Result<PathBuf> {
        let dir = PathBuf::from(&self.cfg.state_dir).join("kubeadm");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(name);
        crate::sys::fs::write_durable_mode(&path, text.as_bytes(), 0o600)?;
        Ok(path)
    }

    /// Writes the kubeadm config and runs `kubeadm init` (after `kubeadm reset` when an earlier
    /// attempt was interrupted: only the saved `initialised` marker says an init finished), and
    /// returns the CA's public-key hash.
    async fn kubeadm_init(&mut self, token: &str, node_ip: &str) -> Result<String> {
        let patches = PathBuf::from(&self.cfg.state_dir).join("kubeadm/patches");
        std::fs::create_dir_all(&patches).with_context(|| format!("creating {}", patches.display()))?;
        for (name, text) in kubeadm::probe_patches() {
            crate::sys::fs::write_durable(&patches.join(name), text.as_bytes())?;
        }
        let patches_dir = patches.display().to_string();
        let resolv = self.kubelet_resolv();
        let text = kubeadm::init_config(&kubeadm::InitParams {
            cluster: &self.cfg.cluster,
            kubernetes_version: &self.cfg.kubernetes.version,
            image_repository: &self.cfg.kubernetes.image_repository,
            node_name: &self.inventory.hostname,
            node_ip,
            token,
            schedule_on_master: self.cfg.kubernetes.schedule_on_master,
            patches_dir: Some(&patches_dir),
            resolv_conf: Some(&resolv),
        });
        self.reset_if_interrupted("init").await?;
        let config = self.kubeadm_file("init.yaml", &text)?;
        let ran = self.run_kubeadm(kubeadm::init_argv(&config), token).await;
        forget(&config);
        ran?;
        let pem = std::fs::read(kubeadm::CA_CERT).with_context(|| format!("reading {}", kubeadm::CA_CERT))?;
        kubeadm::ca_cert_hash(&pem)
    }

    /// `kubeadm reset` when an init or join that never finished left files behind (a power
    /// cut or a failure mid-way), so the next attempt starts clean.
    async fn reset_if_interrupted(&mut self, what: &str) -> Result<()> {
        let left = kubeadm::leftovers(Path::new("/"));
        if !left.is_empty() {
            tracing::warn!(?left, "an earlier kubeadm {what} did not finish; resetting before trying again");
            self.run_kubeadm(kubeadm::reset_argv(), "").await?;
        }
        Ok(())
    }

    /// Runs kubeadm with `argv` (`secret`, the bootstrap token, redacted from logs and errors).
    /// A failure puts the next kubeadm step off by a pause that grows with each failure in a
    /// row ([`plan::retry_pause`]); rounds before then only report it ([`Cluster::kubeadm_waits`]).
    async fn run_kubeadm(&mut self, argv: Vec<String>, secret: &str) -> Result<()> {
        let secret = secret.to_string();
        let report = self.links.report.clone();
        let step = format!("kubeadm {}", argv.first().map(String::as_str).unwrap_or_default());
        let ran = blocking(move || {
            let secrets: Vec<&str> = [secret.as_str()].into_iter().filter(|s| !s.is_empty()).collect();
            // The phase kubeadm is in goes into the status message as it runs.
            kubeadm::run(&argv, &secrets, &mut |phase| report.update(|s| s.message = format!("{step}: {phase}")))
        })
        .await;
        match ran {
            Ok(_) => Ok(()),
            Err(e) => Err(anyhow::anyhow!(self.backoff.failed(Instant::now(), &format!("{e:#}")))),
        }
    }

    /// Where this node keeps the kubelet's resolv.conf (the same path on every node).
    fn kubelet_resolv(&self) -> String {
        PathBuf::from(&self.cfg.state_dir).join(super::resolv::FILE).display().to_string()
    }

    /// Brings the kubelet's resolv.conf up to date with the node's resolvers (every round: a
    /// LAN's DHCP may name a DNS server later); `own` is this node's LAN address. An error
    /// stops the round before kubeadm runs: a kubelet told to use a file it cannot open
    /// starts no pod at all.
    fn refresh_resolv(&self, own: &str) -> Result<()> {
        anyhow::ensure!(!own.is_empty(), "no LAN address yet for the kubelet's resolv.conf");
        let path = PathBuf::from(self.kubelet_resolv());
        let upstream = Path::new(crate::network::uplink::UPSTREAM_RESOLV);
        if super::resolv::refresh(&path, upstream, own)? {
            info!(file = %path.display(), "the kubelet's resolv.conf follows the node's DNS servers (pods started before keep the servers they had)");
        }
        Ok(())
    }

    /// True (and the wait reported) while a failed kubeadm step's pause runs.
    pub(super) fn kubeadm_waits(&mut self) -> bool {
        match self.backoff.wait(Instant::now()).map(|(_, m)| m.to_string()) {
            Some(message) => {
                self.set_phase(Phase::Error, &message);
                true
            }
            None => false,
        }
    }

    /// Mints a new bootstrap token (the current one has less than two hours left).
    async fn renew_token(&mut self) -> Result<()> {
        let Some(mut info) = self.state.join_info.clone() else { return Ok(()) };
        let token = kubeadm::new_token();
        let node_ip = self.lan.as_ref().map(|l| l.address.to_string()).unwrap_or_default();
        // The new token goes to kubeadm in a 0600 config file, not on its command line.
        let config = self.kubeadm_file(
            "token.yaml",
            &kubeadm::init_config(&kubeadm::InitParams {
                cluster: &self.cfg.cluster,
                kubernetes_version: &self.cfg.kubernetes.version,
                image_repository: &self.cfg.kubernetes.image_repository,
                node_name: &self.inventory.hostname,
                node_ip: &node_ip,
                token: &token,
                schedule_on_master: self.cfg.kubernetes.schedule_on_master,
                patches_dir: None,
                resolv_conf: None,
            }),
        )?;
        let ran = self.run_kubeadm(kubeadm::token_create_argv(&config), &token).await;
        forget(&config);
        ran?;
        self.backoff.succeeded();
        info.token = token;
        info.token_expires = now_secs() + kubeadm::TOKEN_TTL_SECS;
        info!("minted a fresh bootstrap token");
        self.state.join_info = Some(info);
        self.store.save(&self.state)
    }

    /// Worker: fetch join info from the master and run kubeadm join once.
    pub(super) async fn follow(&mut self, uid: &str, master_addr: &str) -> Result<()> {
        let kubernetes = self.cfg.kubernetes.enabled;
        if self.state.joined {
            // Joined on the address the master pinned: not ready again until it holds it.
            if !self.await_lease(master_addr) {
                return Ok(());
            }
            if let Some(info) = self.state.join_info.clone() {
                self.hosts_entry(&info.master_address)?;
                self.set_join_info(&info);
            }
            if kubernetes {
                let own = self.lan.as_ref().map(|l| l.address.to_string()).unwrap_or_default();
                self.refresh_resolv(&own)?;
            }
            self.settle(false);
            return Ok(());
        }
        if self.kubeadm_waits() || (kubernetes && self.images_pending(Phase::Joining)) {
            return Ok(());
        }
        // kubeadm pins the worker's address too: a lease, never a link-local one.
        if !self.await_lease(master_addr) {
            return Ok(());
        }
        self.set_phase(Phase::Joining, &format!("fetching join info from {master_addr}"));
        let (addr, id, secret) = (master_addr.to_string(), self.inventory.machine_id.clone(), self.secret.clone());
        let info = match blocking(move || join::fetch(&addr, &secret, &id, crate::sys::clock::now_ms())).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("{e:#}; will retry");
                return Ok(());
            }
        };
        plan::check_join_info(&info, uid).map_err(anyhow::Error::msg)?;
        self.hosts_entry(&info.master_address)?;
        self.state.join_info = Some(info.clone());
        self.store.save(&self.state)?;
        // `joined` is saved only once kubeadm join finished: files of an earlier attempt mean
        // it was interrupted, and are reset first.
        if kubernetes {
            self.reset_if_interrupted("join").await?;
            let node_ip = self.lan.as_ref().map(|l| l.address.to_string()).unwrap_or_default();
            // The cluster's kubelet configuration names this file: it exists before the kubelet.
            self.refresh_resolv(&node_ip)?;
            let config = self.kubeadm_file(
                "join.yaml",
                &kubeadm::join_config(&kubeadm::JoinParams {
                    endpoint: &info.endpoint,
                    token: &info.token,
                    ca_cert_hash: &info.ca_cert_hash,
                    node_name: &self.inventory.hostname,
                    node_ip: &node_ip,
                }),
            )?;
            let ran = self.run_kubeadm(kubeadm::join_argv(&config), &info.token).await;
            forget(&config);
            ran?;
            self.backoff.succeeded();
            kubeadm_work_to_disk()?;
        }
        self.state.joined = true;
        self.store.save(&self.state)?;
        self.set_join_info(&info);
        self.settle(false);
        Ok(())
    }
}

/// Flushes what kubeadm wrote (certificates, kubeconfigs, manifests, the kubelet's config,
/// etcd's data) to the disk before the agent records that init or join finished: kubeadm does
/// not fsync, and a marker that reaches the disk before those files would make a power cut
/// leave a node that believes it is set up with empty files.
fn kubeadm_work_to_disk() -> Result<()> {
    for dir in ["/etc/kubernetes", "/var/lib/kubelet", "/var/lib/etcd"] {
        let dir = Path::new(dir);
        if dir.exists() {
            crate::sys::fs::sync_filesystem(dir)?;
        }
    }
    Ok(())
}

/// Removes a kubeadm config file once kubeadm is done with it: the token it carries is kept
/// only in the state file (0600), where the agent needs it.
fn forget(file: &Path) {
    if let Err(e) = std::fs::remove_file(file) {
        tracing::warn!("removing {}: {e}", file.display());
    }
}
