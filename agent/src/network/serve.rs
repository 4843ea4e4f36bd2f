//! The master serving a bare switch (see `addressing`): keeps dnsmasq running while this node
//! holds the LAN's first address, pins every new lease for good, and steps aside when another
//! DHCP server answers on the LAN (never two on one LAN).

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::addressing::{self, Files, Pins, Plan};
use super::{dhcp, uplink, ServeState, Serving, UplinkStatus};
use crate::cluster::ClusterView;
use crate::config::network::NetworkConfig;
use crate::report::Report;
use crate::sys::Cmd;

/// How often new leases are pinned.
const PIN_EVERY: Duration = Duration::from_secs(3);
/// How often the master listens for another DHCP server while it serves.
const PROBE_EVERY: Duration = Duration::from_secs(60);
/// How long a probe listens for offers.
pub const PROBE_WAIT: Duration = Duration::from_secs(3);
/// After dnsmasq stopped or another server was heard.
const RETRY: Duration = Duration::from_secs(10);
/// How often the uplink, its resolvers and the firewall are looked at again.
const UPLINK_EVERY: Duration = Duration::from_secs(5);

/// The LAN this node serves, as the cluster task publishes it once the address is on the
/// interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedLan {
    pub interface: String,
    pub mac: [u8; 6],
    pub plan: Plan,
    /// The API endpoint's name (`<cluster>-api`), answered by the LAN's DNS.
    pub api_name: String,
    /// Netboot's iPXE script URL when the master serves netboot (`[pxe] serve` and an image
    /// with the files): this dnsmasq answers PXE clients too.
    pub netboot: Option<String>,
    /// Where the room's nodes are: the sources of authentic beacons heard lately. Only their
    /// leases are pinned.
    pub members: Vec<std::net::Ipv4Addr>,
}

/// Why a new PC gets no address, when every address of the pool is pinned.
pub fn pool_full(plan: &Plan, pinned: usize) -> Option<String> {
    (pinned >= plan.capacity()).then(|| {
        format!(
            "the pool is full: all {} addresses are pinned, so a new PC gets none; choose a larger [network] lan-cidr",
            plan.capacity()
        )
    })
}

/// What a serving master says it serves, and why a new PC would get nothing, if so.
fn serving_message(lan: &ServedLan, full: Option<String>) -> String {
    let base =
        format!("DHCP ({}-{}, pinned per MAC), DNS and time on {}", lan.plan.first, lan.plan.last, lan.interface);
    match full {
        Some(why) => format!("{base}; {why}"),
        None => base,
    }
}

/// The servers among `offers` other than this node.
pub fn foreign(offers: &[dhcp::Offer], ours: std::net::Ipv4Addr) -> Vec<String> {
    let mut v: Vec<String> = offers.iter().filter(|o| o.server != ours).map(|o| o.server.to_string()).collect();
    v.sort();
    v.dedup();
    v
}

struct Task {
    report: Report,
    state_dir: PathBuf,
    network: NetworkConfig,
    /// The uplink and ports the firewall was last set up for.
    applied: Option<(Option<String>, Vec<u16>)>,
    uplink_at: Option<Instant>,
    child: Option<Child>,
    pins: Option<Pins>,
    retry_at: Option<Instant>,
    pinned_at: Instant,
    probed_at: Option<Instant>,
    status: Serving,
}

pub async fn run(
    report: Report,
    state_dir: String,
    network: NetworkConfig,
    mut view: watch::Receiver<ClusterView>,
) -> Result<()> {
    let mut task = Task {
        report,
        state_dir: PathBuf::from(state_dir),
        network,
        applied: None,
        uplink_at: None,
        child: None,
        pins: None,
        retry_at: None,
        pinned_at: Instant::now() - PIN_EVERY,
        probed_at: None,
        status: Serving::default(),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = view.changed() => if changed.is_err() { return Ok(()) },
        }
        let served = view.borrow().served.clone();
        match served {
            Some(lan) => task.round(&lan).await,
            None => task.stop(),
        }
    }
}

impl Task {
    async fn round(&mut self, lan: &ServedLan) {
        self.status.lan = lan.plan.net.to_string();
        self.status.gateway = lan.plan.gateway.to_string();
        self.status.capacity = lan.plan.capacity();
        if self.pins.is_none() {
            match Pins::load(&self.state_dir) {
                Ok(p) => self.pins = Some(p),
                Err(e) => {
                    // Never serve without the pins: nodes would get other addresses than the
                    // ones kubeadm pinned.
                    return self.fail(format!("{e:#}"), ServeState::Failed);
                }
            }
        }
        if let Some(Ok(Some(exit))) = self.child.as_mut().map(Child::try_wait) {
            self.child = None;
            self.retry_at = Some(Instant::now() + RETRY);
            return self.fail(
                format!("dnsmasq stopped ({exit}); starting it again in {} s", RETRY.as_secs()),
                ServeState::Failed,
            );
        }
        let requests = super::unpin::pending(&self.state_dir);
        if !requests.is_empty() {
            self.unpin(lan, &requests);
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let probe_due = self.probed_at.is_none_or(|t| t.elapsed() >= PROBE_EVERY);
        if self.child.is_none() || probe_due {
            self.probed_at = Some(Instant::now());
            let (iface, mac) = (lan.interface.clone(), lan.mac);
            match crate::sys::blocking(move || dhcp::probe(&iface, &mac, PROBE_WAIT)).await {
                Ok(offers) => {
                    let others = foreign(&offers, lan.plan.gateway);
                    if !others.is_empty() {
                        self.stop();
                        self.retry_at = Some(Instant::now() + RETRY);
                        self.status.other_dhcp_servers = others.clone();
                        return self.fail(
                            format!(
                                "another DHCP server answers on {} ({}): this master hands out no addresses while it does",
                                lan.interface,
                                others.join(", ")
                            ),
                            ServeState::Stopped,
                        );
                    }
                    self.status.other_dhcp_servers.clear();
                }
                // Never start serving a LAN that could not be checked for another server.
                Err(e) if self.child.is_none() => {
                    self.retry_at = Some(Instant::now() + RETRY);
                    return self.fail(
                        format!("could not check {} for another DHCP server ({e:#}); trying again", lan.interface),
                        ServeState::Failed,
                    );
                }
                Err(e) => warn!("probing for DHCP servers on {}: {e:#}", lan.interface),
            }
        }
        if self.child.is_none() {
            match self.start(lan) {
                Ok(child) => {
                    info!(lan = %lan.plan.net, gateway = %lan.plan.gateway, "serving the LAN: DHCP, DNS and time");
                    self.child = Some(child);
                    self.status.state = ServeState::Serving;
                    self.status.message = serving_message(lan, None);
                }
                Err(e) => {
                    self.retry_at = Some(Instant::now() + RETRY);
                    return self.fail(format!("{e:#}"), ServeState::Failed);
                }
            }
        }
        if self.uplink_at.is_none_or(|t| t.elapsed() >= UPLINK_EVERY) {
            self.uplink_at = Some(Instant::now());
            self.uplink(lan);
        }
        if self.pinned_at.elapsed() >= PIN_EVERY {
            self.pinned_at = Instant::now();
            if let Err(e) = self.pin(lan) {
                error!("pinning leases: {e:#}");
            }
            let pinned = self.pins.as_ref().map_or(0, |p| p.leases.len());
            self.status.message = serving_message(lan, pool_full(&lan.plan, pinned));
        }
        self.publish();
    }

    fn start(&mut self, lan: &ServedLan) -> Result<Child> {
        let files = Files::new(&self.state_dir);
        self.write_hosts(&lan.plan, &files.hosts)?;
        // The uplink's resolvers, when there is one; dnsmasq reads the file again whenever it
        // changes, and waits for it while it is missing.
        let upstream = Path::new(uplink::UPSTREAM_RESOLV);
        let mut args = addressing::dnsmasq_args(&lan.interface, &lan.plan, &lan.api_name, &files, upstream);
        if let Some(url) = &lan.netboot {
            args.extend(crate::pxe::boot_options(url, Path::new(crate::pxe::IPXE_DIR)));
        }
        Cmd::new("dnsmasq").args(args).spawn().context("starting dnsmasq to serve the LAN")
    }

    /// The ports the uplink admits: the spec's list, else SSH, the portal and the stack's
    /// web UIs.
    fn admitted(&self) -> Vec<u16> {
        if let Some(p) = &self.network.uplink_admit {
            return p.clone();
        }
        let mut ports = vec![22, crate::portal::PORT];
        if let Ok(Some(plan)) = labforge_core::stack::StackPlan::load(Path::new(labforge_core::stack::STACK_PLAN)) {
            ports.extend(plan.components.iter().flat_map(|c| c.web.iter().map(|w| w.port)));
        }
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Sets this master up as the LAN's gateway through its uplink, or takes that down when
    /// the uplink is gone.
    fn uplink(&mut self, lan: &ServedLan) {
        let chosen = uplink::choose(&self.network.uplink, &lan.interface, &uplink::default_routes());
        let admit = self.admitted();
        let address = chosen.as_ref().and_then(|i| crate::cluster::lan::lan_on(i)).map(|l| l.address.to_string());
        let key = (chosen.clone(), admit.clone());
        if self.applied.as_ref() == Some(&key) {
            if let Some(u) = &mut self.status.uplink {
                u.address = address;
            }
            return;
        }
        let Some(up) = chosen else {
            if self.applied.as_ref().is_some_and(|(u, _)| u.is_some()) {
                let _ = Cmd::new("nft").args(["delete", "table", "inet", uplink::TABLE]).run();
            }
            self.applied = Some(key);
            self.status.uplink = None;
            return;
        };
        let rules = uplink::ruleset(&lan.interface, &lan.plan.net, &up, &admit);
        let applied = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n")
            .context("enabling IPv4 forwarding")
            .and_then(|_| Cmd::new("nft").args(["-f", "-"]).stdin(rules.into_bytes()).run().context("nft -f"));
        let ports = admit.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        self.status.uplink = Some(match applied {
            Ok(_) => {
                info!(uplink = %up, admitted = %ports, "the LAN goes out through the uplink (NAT)");
                self.applied = Some(key);
                UplinkStatus {
                    interface: up.clone(),
                    address,
                    nat: true,
                    admitted: admit,
                    message: format!("NAT for {}; admits TCP {ports} from outside, drops the rest", lan.plan.net),
                }
            }
            Err(e) => {
                error!("setting up the uplink {up}: {e:#}");
                UplinkStatus {
                    interface: up.clone(),
                    address,
                    nat: false,
                    admitted: Vec::new(),
                    message: format!("{e:#}"),
                }
            }
        });
    }

    fn write_hosts(&self, plan: &Plan, path: &Path) -> Result<()> {
        let pins = self.pins.as_ref().context("pins loaded")?;
        if let Some(dir) = path.parent() {
            crate::sys::fs::dir_with_mode(dir, 0o755)?;
        }
        // dnsmasq reads it as nobody.
        crate::sys::fs::write_durable_mode(path, pins.hosts_file(plan).as_bytes(), 0o644)
    }

    /// Pins leases dnsmasq handed out since the last look, and has it read the pins again.
    fn pin(&mut self, lan: &ServedLan) -> Result<()> {
        let files = Files::new(&self.state_dir);
        let text = match std::fs::read(&files.leases) {
            Ok(b) => String::from_utf8_lossy(&b[..b.len().min(1 << 20)]).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", files.leases.display())),
        };
        let leases = addressing::parse_leases(&text);
        let pins = self.pins.as_mut().context("pins loaded")?;
        if pins.absorb(&lan.plan, &leases, &lan.members) {
            pins.save(&self.state_dir)?;
            self.write_hosts(&lan.plan, &files.hosts)?;
            if let Some(c) = &self.child {
                let pid = nix::unistd::Pid::from_raw(c.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP);
            }
            info!(pinned = self.pins.as_ref().map_or(0, |p| p.leases.len()), "pinned new leases");
        }
        Ok(())
    }

    /// Answers `labforge-agent network --unpin` requests: frees the pins of PCs that left the
    /// room (never a node of the cluster now), with dnsmasq stopped while its lease file is
    /// rewritten; it starts again in this round, with the new hosts file.
    fn unpin(&mut self, lan: &ServedLan, requests: &[String]) {
        let Some(pins) = self.pins.as_ref() else { return };
        let mut decisions: Vec<(String, Result<std::net::Ipv4Addr, String>)> =
            requests.iter().map(|m| (m.clone(), super::unpin::decide(pins, m, &lan.members))).collect();
        let freed: Vec<String> = decisions.iter().filter(|(_, d)| d.is_ok()).map(|(m, _)| m.clone()).collect();
        if !freed.is_empty() {
            self.kill_dnsmasq();
            let pins = self.pins.as_mut().expect("pins loaded above");
            match super::unpin::apply(&self.state_dir, pins, &freed) {
                Ok(()) => info!(macs = %freed.join(", "), "unpinned at an admin's request"),
                Err(e) => {
                    let why = format!("could not unpin: {e:#}");
                    error!("{why}");
                    for (m, d) in &mut decisions {
                        if freed.contains(m) {
                            *d = Err(why.clone());
                        }
                    }
                }
            }
        }
        for (m, d) in &decisions {
            if let Err(e) = super::unpin::answer(&self.state_dir, m, d) {
                error!("answering the unpin request for {m}: {e:#}");
            }
        }
    }

    fn publish(&mut self) {
        let pins = self.pins.as_ref();
        self.status.leases = pins
            .map(|p| {
                p.leases
                    .iter()
                    .map(|(mac, pin)| addressing::Lease {
                        mac: mac.clone(),
                        address: pin.address,
                        hostname: pin.hostname.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let s = self.status.clone();
        self.report.update(|st| st.network.serving = Some(s));
    }

    fn fail(&mut self, message: String, state: ServeState) {
        if self.status.message != message {
            error!("{message}");
        }
        self.status.state = state;
        self.status.message = message;
        self.publish();
    }

    /// Stops dnsmasq, if it runs; whether it did.
    fn kill_dnsmasq(&mut self) -> bool {
        let Some(mut c) = self.child.take() else { return false };
        let _ = c.kill();
        let _ = c.wait();
        true
    }

    fn stop(&mut self) {
        if self.kill_dnsmasq() {
            self.status.state = ServeState::Stopped;
            self.status.message = "not serving: this node no longer holds the LAN's first address as its master".into();
            self.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pool_says_so() {
        let plan = Plan::new(crate::config::network::Ipv4Net::parse("10.83.0.0/28").unwrap());
        assert!(pool_full(&plan, 12).is_none());
        assert!(pool_full(&plan, 13).unwrap().contains("all 13 addresses are pinned"));
    }

    #[test]
    fn our_own_offers_are_not_another_server() {
        let o = |s: &str| dhcp::Offer { server: s.parse().unwrap(), address: "10.83.0.9".parse().unwrap() };
        let ours = "10.83.0.1".parse().unwrap();
        assert!(foreign(&[o("10.83.0.1")], ours).is_empty());
        assert_eq!(foreign(&[o("10.83.0.1"), o("192.168.1.1"), o("192.168.1.1")], ours), vec!["192.168.1.1"]);
    }
}
