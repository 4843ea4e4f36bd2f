//! The cluster task's side of addressing (see `network::addressing`): following this node's
//! address as it moves from link-local to its lease, the master taking the first address of
//! the LAN it serves before kubeadm pins it, and a worker waiting for its lease before it
//! joins.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::state::ServedLanState;
use super::{lan, Cluster};
use crate::config::network::{Ipv4Net, ServePolicy};
use crate::network::addressing::{self, Plan};
use crate::network::serve::{self, ServedLan};
use crate::network::{dhcp, Addressing, NetworkStatus};
use crate::status::Phase;
use crate::sys::Cmd;

/// How long networkd's ARP probe (RFC 5227: about 7 s) may take before the address counts
/// as taken by another host.
const CONFLICT_AFTER: Duration = Duration::from_secs(25);
/// A worker on link-local asks its DHCP client to try again at most this often once the
/// master serves (its own retries back off to a minute).
const NUDGE_EVERY: Duration = Duration::from_secs(30);
/// How long a multi-NIC PC waits before it settles its LAN on a NIC holding the default route.
const UPLINK_SETTLE: Duration = Duration::from_secs(30);

/// Taking the served LAN's address.
#[derive(Debug, Default)]
pub struct Progress {
    /// When the networkd unit was written.
    since: Option<Instant>,
    /// When a worker last restarted its DHCP client.
    nudged: Option<Instant>,
    /// When the LAN was first looked for.
    first_look: Option<Instant>,
}

impl Cluster {
    /// Reads this node's LAN address again (it moves from link-local to a lease, or to the
    /// master's own); starts discovery the first time. Returns whether there is one.
    pub(super) fn refresh_lan(&mut self) -> Result<bool> {
        let selector = self.lan.as_ref().map(|l| l.interface.clone()).unwrap_or(self.cfg.cluster.lan_interface.clone());
        let Some(now) = lan::lan(&selector, &self.cfg.network.uplink, &self.inventory) else {
            // Between a link-local address and the served one, the interface has none for a
            // moment: keep what we had.
            return Ok(self.lan.is_some());
        };
        // A PC with several NICs whose first address came with a default route may be a
        // master's uplink that got its building lease before the LAN NIC had a carrier: give
        // the others a moment before the LAN is settled on it.
        if self.lan.is_none() && self.cfg.cluster.lan_interface == "auto" && self.inventory.nics.len() > 1 {
            let first = *self.own_lan.first_look.get_or_insert_with(Instant::now);
            if crate::network::uplink::default_routes().contains(&now.interface) && first.elapsed() < UPLINK_SETTLE {
                return Ok(false);
            }
        }
        let addresses: Vec<String> = all_ipv4(&now.interface, now.address).iter().map(Ipv4Addr::to_string).collect();
        self.addresses.send_if_modified(|a| {
            let changed = *a != addresses;
            *a = addresses;
            changed
        });
        match &self.lan {
            None => {
                self.start_discovery(&now)?;
                info!(interface = %now.interface, address = %now.address, "cluster LAN is up");
                self.started = Instant::now();
            }
            Some(old) if *old != now => {
                info!(interface = %now.interface, from = %old.address, to = %now.address, "LAN address changed");
            }
            Some(_) => {}
        }
        self.lan = Some(now);
        Ok(true)
    }

    /// At start: a master that served its LAN takes its address again right away.
    pub(super) fn retake_served_lan(&mut self) -> Result<()> {
        let Some(served) = self.state.served_lan.clone() else { return Ok(()) };
        if self.cfg.network.serve == ServePolicy::Never {
            return Ok(());
        }
        if !matches!(self.state.allegiance, super::election::Allegiance::Master { committed: true, .. }) {
            return Ok(());
        }
        let plan = Plan::new(Ipv4Net::parse(&served.cidr)?);
        self.write_unit(&served.interface, &plan)
    }

    /// The master's gate before kubeadm: on a LAN with DHCP (a leased address) there is
    /// nothing to do; on a bare switch this node takes the first address of `lan-cidr` and
    /// serves the rest. Returns whether the address is this node's, ready to be pinned.
    pub(super) async fn own_lan(&mut self) -> Result<bool> {
        let lan = self.lan.clone().context("discovery runs before anyone leads")?;
        // Until kubeadm pinned the address, a new lan-cidr (a conflict reported, the spec
        // changed) replaces the one remembered.
        let pinned = self.state.initialised || self.state.join_info.is_some();
        if let Some(s) = &self.state.served_lan {
            if !pinned && s.cidr != self.cfg.network.lan_cidr {
                info!(from = %s.cidr, to = %self.cfg.network.lan_cidr, "lan-cidr changed before the cluster formed");
                self.state.served_lan = None;
                self.store.save(&self.state)?;
                self.own_lan.since = None;
            }
        }
        let served = self.state.served_lan.clone();
        let plan = match &served {
            Some(s) => Plan::new(Ipv4Net::parse(&s.cidr)?),
            None => Plan::new(self.cfg.network.lan()?),
        };
        if served.is_some() && lan.address == plan.gateway {
            self.own_lan.since = None;
            return Ok(true);
        }
        if served.is_none() && !lan.link_local() {
            return Ok(true); // leased from the LAN's own DHCP server
        }
        if served.is_none() && pinned {
            // kubeadm pinned the address a DHCP server leased: serving another LAN now would
            // not bring it back.
            self.set_phase(
                Phase::Error,
                &format!(
                    "{} lost the address the cluster was formed on (it has link-local {} only): the LAN's DHCP server stopped answering; bring it back",
                    lan.interface, lan.address
                ),
            );
            return Ok(false);
        }
        if served.is_none() {
            if self.cfg.network.serve == ServePolicy::Never {
                self.set_phase(
                    Phase::Error,
                    &format!(
                        "no DHCP server gave {} an address (it has link-local {} only), and [network] serve = \"never\": start the LAN's DHCP server, or let the master serve it",
                        lan.interface, lan.address
                    ),
                );
                return Ok(false);
            }
            let nodes = super::net::fresh(&self.peers, super::PEER_TIMEOUT).len() + 1;
            if let Err(e) = addressing::check(&plan, &lan::other_networks(&lan.interface), nodes) {
                self.set_phase(Phase::Error, &format!("{e:#}; this node serves no addresses until then"));
                return Ok(false);
            }
            // Never a second DHCP server: one that answers now (a slow one, or one that came
            // back) is waited for.
            let mac = self.lan_mac(&lan.interface)?;
            let iface = lan.interface.clone();
            let offers = crate::sys::blocking(move || dhcp::probe(&iface, &mac, serve::PROBE_WAIT)).await?;
            let others = serve::foreign(&offers, plan.gateway);
            if !others.is_empty() {
                self.set_phase(
                    Phase::Electing,
                    &format!(
                        "a DHCP server answers on {} ({}) but this node has no lease yet: waiting for one (a master never serves a LAN that has a DHCP server)",
                        lan.interface,
                        others.join(", ")
                    ),
                );
                return Ok(false);
            }
            info!(lan = %plan.net, interface = %lan.interface, "no DHCP server on the LAN: this master serves it");
            self.state.served_lan =
                Some(ServedLanState { cidr: plan.net.to_string(), interface: lan.interface.clone() });
            self.store.save(&self.state)?;
        }
        let interface = served.map(|s| s.interface).unwrap_or(lan.interface.clone());
        if self.own_lan.since.is_none() {
            self.write_unit(&interface, &plan)?;
            self.own_lan.since = Some(Instant::now());
        }
        let waited = self.own_lan.since.map(|t| t.elapsed()).unwrap_or_default();
        if waited > CONFLICT_AFTER {
            self.set_phase(
                Phase::Error,
                &format!(
                    "{} (the first address of [network] lan-cidr {}) did not come up on {interface} within {} s: another host on the LAN answers ARP for it. Free it, or choose another lan-cidr",
                    plan.gateway,
                    plan.net,
                    CONFLICT_AFTER.as_secs()
                ),
            );
        } else {
            self.set_phase(
                Phase::Initialising,
                &format!("no DHCP server on the LAN: taking {} on {interface} to serve {}", plan.gateway, plan.net),
            );
        }
        Ok(false)
    }

    /// A worker's gate before it joins: kubeadm pins the node's address, so not a link-local
    /// one. Asks networkd for a lease again once the master serves, instead of waiting out
    /// its back-off.
    pub(super) fn await_lease(&mut self, master: &str) -> bool {
        let Some(lan) = self.lan.clone() else { return false };
        if !lan.link_local() {
            return true;
        }
        let master_serves =
            master.split(':').next().and_then(|h| h.parse::<Ipv4Addr>().ok()).is_some_and(|ip| !ip.is_link_local());
        if master_serves && self.own_lan.nudged.is_none_or(|t| t.elapsed() >= NUDGE_EVERY) {
            self.own_lan.nudged = Some(Instant::now());
            if let Err(e) = Cmd::new("networkctl").args(["reconfigure", &lan.interface]).run() {
                warn!("asking networkd for a lease on {}: {e:#}", lan.interface);
            }
        }
        self.set_phase(
            Phase::WaitingForMaster,
            &format!(
                "waiting for an address from the master's DHCP ({} has link-local {} only)",
                lan.interface, lan.address
            ),
        );
        false
    }

    /// The LAN this node serves, once its address is up.
    pub(super) fn served(&self) -> Option<ServedLan> {
        let served = self.state.served_lan.as_ref()?;
        let lan = self.lan.as_ref()?;
        let plan = Plan::new(Ipv4Net::parse(&served.cidr).ok()?);
        if lan.address != plan.gateway || !matches!(self.state.allegiance, super::election::Allegiance::Master { .. }) {
            return None;
        }
        Some(ServedLan {
            interface: served.interface.clone(),
            mac: self.lan_mac(&served.interface).ok()?,
            plan,
            api_name: super::kubeadm::endpoint_host(&self.cfg.cluster),
            members: super::net::fresh(&self.peers, super::PEER_TIMEOUT)
                .iter()
                .filter_map(|p| match p.from {
                    std::net::IpAddr::V4(v4) => Some(v4),
                    std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped(),
                })
                .collect(),
            netboot: (self.cfg.pxe.serve && crate::pxe::task::missing(&self.cfg.image).is_none())
                .then(|| format!("http://{}:{}/pxe/boot.ipxe", plan.gateway, self.cfg.status_port)),
        })
    }

    /// The `network` part of the status (the serving part is the serve task's).
    pub(super) fn publish_network(&self) {
        let lan = self.lan.clone();
        let served = self.served();
        let serving_configured = self.state.served_lan.is_some();
        self.links.report.update(|s| {
            let serving = s.network.serving.take();
            let mut n = NetworkStatus {
                interface: lan.as_ref().map(|l| l.interface.clone()),
                address: lan.as_ref().map(|l| l.address.to_string()),
                ..Default::default()
            };
            (n.addressing, n.message) = match &lan {
                None => (Addressing::None, "waiting for an address (DHCP, then link-local)".into()),
                Some(_) if served.is_some() => (Addressing::Served, "this master serves the LAN".into()),
                Some(l) if l.link_local() => {
                    (Addressing::LinkLocal, "no DHCP lease: link-local addressing (RFC 3927)".into())
                }
                Some(_) => (Addressing::Leased, "leased by DHCP".into()),
            };
            n.serving = if serving_configured { serving } else { None };
            s.network = n;
        });
    }

    fn write_unit(&self, interface: &str, plan: &Plan) -> Result<()> {
        let path = std::path::Path::new(addressing::NETWORKD_FILE);
        let unit = addressing::networkd_unit(interface, plan);
        if std::fs::read_to_string(path).ok().as_deref() == Some(unit.as_str()) {
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            // systemd-networkd reads it as its own user.
            crate::sys::fs::dir_with_mode(dir, 0o755)?;
        }
        crate::sys::fs::write_durable_mode(path, unit.as_bytes(), 0o644)?;
        info!(address = %plan.gateway, %interface, "taking the LAN's first address");
        Cmd::new("networkctl").arg("reload").run().context("networkctl reload")?;
        Ok(())
    }

    fn lan_mac(&self, interface: &str) -> Result<[u8; 6]> {
        let nic = self
            .inventory
            .nics
            .iter()
            .find(|n| n.name == interface)
            .with_context(|| format!("{interface} is not in this node's inventory"))?;
        dhcp::parse_mac(&nic.mac).with_context(|| format!("{interface}'s MAC {:?} is not an Ethernet address", nic.mac))
    }
}

/// Every IPv4 address of `interface`, `best` first.
fn all_ipv4(interface: &str, best: Ipv4Addr) -> Vec<Ipv4Addr> {
    let mut v = vec![best];
    for a in lan::kernel_addresses(interface) {
        if let Some(ip) = a.split('/').next().and_then(|ip| ip.parse::<Ipv4Addr>().ok()) {
            if !v.contains(&ip) && v.len() < super::discovery::beacon::MAX_ADDRESSES {
                v.push(ip);
            }
        }
    }
    v
}
