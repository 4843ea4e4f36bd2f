//! The netboot task (master with `[pxe] serve`): while this node leads, keeps dnsmasq
//! answering PXE clients on the LAN and tells the HTTP endpoints what to serve under `/pxe/`.
//! A dnsmasq that stops is reported and started again after a pause. When to start, wait or
//! give up is decided by [`plan`].

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{PxeMode, PxeState, PxeStatus, Serving, ARTIFACT_DIR, IPXE_DIR};
use crate::cluster::lan::Lan;
use crate::cluster::ClusterView;
use crate::config::NodeConfig;
use crate::report::Report;
use crate::sys::Cmd;

/// After dnsmasq stopped or failed to start.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);
/// After finding the image cannot serve netboot at all (looked at again rarely).
pub const RETRY_UNAVAILABLE: Duration = Duration::from_secs(3600);

/// dnsmasq as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dnsmasq {
    NotRunning,
    Running,
    /// It stopped, with this exit status.
    Exited(String),
}

/// What the task does this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// dnsmasq runs: nothing to do.
    Keep,
    /// dnsmasq stopped: report it, start again after [`RETRY_AFTER_FAILURE`].
    Stopped {
        message: String,
    },
    /// Waiting out a pause.
    Wait,
    /// The image cannot serve netboot: report why, look again after [`RETRY_UNAVAILABLE`].
    Unavailable {
        message: String,
    },
    Start,
}

/// The next step, given dnsmasq's state, when the pause ends, and what the image lacks for
/// netboot (if anything).
pub fn plan(dnsmasq: &Dnsmasq, retry_at: Option<Instant>, now: Instant, missing: Option<String>) -> Step {
    match dnsmasq {
        Dnsmasq::Running => Step::Keep,
        Dnsmasq::Exited(status) => Step::Stopped {
            message: format!(
                "dnsmasq stopped ({status}); starting it again in {} s (its log is in the journal)",
                RETRY_AFTER_FAILURE.as_secs()
            ),
        },
        Dnsmasq::NotRunning if retry_at.is_some_and(|t| now < t) => Step::Wait,
        Dnsmasq::NotRunning => match missing {
            Some(message) => Step::Unavailable { message },
            None => Step::Start,
        },
    }
}

/// What this image lacks to serve netboot, if anything.
pub fn missing(image: &str) -> Option<String> {
    if super::image_script(Path::new(ARTIFACT_DIR), image).is_none() {
        Some(format!("this image carries no netboot files in {ARTIFACT_DIR}: build it with \"pxe\" in outputs"))
    } else if !Path::new(IPXE_DIR).join("ipxe.efi").is_file() {
        Some(format!("{IPXE_DIR}/ipxe.efi is missing (Debian package ipxe)"))
    } else {
        None
    }
}

struct Task {
    report: Report,
    cfg: NodeConfig,
    serving: watch::Sender<Option<Serving>>,
    child: Option<Child>,
    retry_at: Option<Instant>,
    /// Its enrolment desk opens the window when this node starts serving.
    endpoints: std::sync::Arc<crate::server::Endpoints>,
    /// Netboot is answered by the dnsmasq serving the bare switch (announced once).
    through_lan: bool,
}

pub async fn run(
    report: Report,
    cfg: NodeConfig,
    mut view: watch::Receiver<ClusterView>,
    serving: watch::Sender<Option<Serving>>,
    endpoints: std::sync::Arc<crate::server::Endpoints>,
) -> Result<()> {
    if !cfg.pxe.serve {
        return Ok(());
    }
    let mut task = Task { report, cfg, serving, child: None, retry_at: None, endpoints, through_lan: false };
    let mut tick = tokio::time::interval(crate::cluster::TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = view.changed() => if changed.is_err() { return Ok(()) },
        }
        let (lan, uid, served) = {
            let v = view.borrow();
            match (&v.lan, v.leading) {
                (Some(lan), true) => (lan.clone(), v.uid.clone().unwrap_or_default(), v.served.is_some()),
                _ => continue,
            }
        };
        if served {
            task.through_lan(&lan, &uid);
        } else {
            task.through_lan = false;
            task.round(&lan, &uid);
        }
    }
}

impl Task {
    fn round(&mut self, lan: &Lan, uid: &str) {
        let state = match self.child.as_mut().map(Child::try_wait) {
            None => Dnsmasq::NotRunning,
            Some(Ok(None)) => Dnsmasq::Running,
            Some(Ok(Some(exit))) => Dnsmasq::Exited(exit.to_string()),
            Some(Err(e)) => {
                warn!("checking dnsmasq: {e}");
                Dnsmasq::Running
            }
        };
        let url = format!("http://{}:{}/pxe/boot.ipxe", lan.address, self.cfg.status_port);
        let mode = if self.cfg.pxe.dhcp_range.is_some() { PxeMode::Dhcp } else { PxeMode::ProxyDhcp };
        let missing = match state {
            Dnsmasq::NotRunning => missing(&self.cfg.image),
            _ => None,
        };
        match plan(&state, self.retry_at, Instant::now(), missing) {
            Step::Keep | Step::Wait => {}
            Step::Stopped { message } => {
                self.child = None;
                self.retry_at = Some(Instant::now() + RETRY_AFTER_FAILURE);
                error!("{message}");
                self.publish(PxeStatus { state: PxeState::Failed, mode, url, message, ..Default::default() });
            }
            Step::Unavailable { message } => {
                self.retry_at = Some(Instant::now() + RETRY_UNAVAILABLE);
                error!("not serving netboot: {message}");
                self.publish(PxeStatus { state: PxeState::Unavailable, mode, url, message, ..Default::default() });
            }
            Step::Start => match self.start(lan, &url) {
                Ok(child) => {
                    self.child = Some(child);
                    self.announce(lan, uid);
                    info!(%url, %mode, "serving netboot");
                    let message = format!("answering PXE clients on {} ({mode}); iPXE boots {url}", lan.interface);
                    self.publish(PxeStatus { state: PxeState::Serving, mode, url, message, ..Default::default() });
                }
                Err(e) => {
                    self.retry_at = Some(Instant::now() + RETRY_AFTER_FAILURE);
                    error!("{e:#}");
                    let message = format!("{e:#}");
                    self.publish(PxeStatus { state: PxeState::Failed, mode, url, message, ..Default::default() });
                }
            },
        }
    }

    /// The files under `/pxe/` are served, and the enrolment window opens.
    fn announce(&self, lan: &Lan, uid: &str) {
        let network = Ipv4Addr::from(u32::from(lan.address) & u32::from(lan.netmask));
        self.serving.send_replace(Some(Serving {
            dir: Path::new(ARTIFACT_DIR).to_path_buf(),
            image: self.cfg.image.clone(),
            network,
            netmask: lan.netmask,
        }));
        if let Some(desk) = &self.endpoints.enrol {
            desk.leading(uid, crate::sys::clock::now_secs());
        }
    }

    /// This master serves a bare switch: the dnsmasq that leases the LAN its addresses
    /// answers PXE clients too (`network::serve`), since a second DHCP server on the same
    /// interface would not do. This task only serves the files.
    fn through_lan(&mut self, lan: &Lan, uid: &str) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.through_lan {
            return;
        }
        self.through_lan = true;
        let url = format!("http://{}:{}/pxe/boot.ipxe", lan.address, self.cfg.status_port);
        let mode = PxeMode::Dhcp;
        match missing(&self.cfg.image) {
            Some(message) => {
                error!("not serving netboot: {message}");
                self.publish(PxeStatus { state: PxeState::Unavailable, mode, url, message, ..Default::default() });
            }
            None => {
                self.announce(lan, uid);
                info!(%url, "serving netboot through the LAN's DHCP");
                let message = format!(
                    "answering PXE clients on {} with the addresses this master serves; iPXE boots {url}",
                    lan.interface
                );
                self.publish(PxeStatus { state: PxeState::Serving, mode, url, message, ..Default::default() });
            }
        }
    }

    fn start(&self, lan: &Lan, url: &str) -> Result<Child> {
        let leases = Path::new(&self.cfg.state_dir).join("pxe.leases");
        let args = super::dnsmasq_args(
            &lan.interface,
            lan.address,
            lan.netmask,
            url,
            Path::new(IPXE_DIR),
            self.cfg.pxe.dhcp_range.as_deref(),
            &leases,
        )?;
        Cmd::new("dnsmasq").args(args).spawn().context("starting dnsmasq")
    }

    fn publish(&self, p: PxeStatus) {
        self.report.update(|s| s.pxe = Some(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnsmasq_is_restarted_after_a_pause_and_an_unusable_image_is_not_retried_in_a_loop() {
        let now = Instant::now();
        let later = Some(now + Duration::from_secs(5));
        let earlier = Some(now - Duration::from_secs(1));
        let gone = || Some("no netboot files".to_string());
        assert_eq!(plan(&Dnsmasq::Running, None, now, None), Step::Keep);
        assert!(matches!(
            plan(&Dnsmasq::Exited("exit status: 2".into()), None, now, None),
            Step::Stopped { message } if message.contains("exit status: 2") && message.contains("10 s")
        ));
        assert_eq!(plan(&Dnsmasq::NotRunning, later, now, None), Step::Wait);
        assert_eq!(plan(&Dnsmasq::NotRunning, later, now, gone()), Step::Wait);
        assert_eq!(plan(&Dnsmasq::NotRunning, earlier, now, None), Step::Start);
        assert_eq!(plan(&Dnsmasq::NotRunning, None, now, None), Step::Start);
        assert_eq!(
            plan(&Dnsmasq::NotRunning, None, now, gone()),
            Step::Unavailable { message: "no netboot files".into() }
        );
    }
}
