//! Addressing on a bare switch. Every NIC asks for a DHCP lease and falls back to IPv4
//! link-local (RFC 3927, systemd-networkd's `LinkLocalAddressing=yes`), so nodes find each
//! other and elect with no server at all. The elected master then takes the first address of
//! `[network] lan-cidr` (networkd probes it by ARP first, RFC 5227) and serves the LAN with
//! dnsmasq: DHCP from the rest of the network, each MAC pinned to the first address it got,
//! DNS for the nodes' names and the API endpoint, and itself as router and NTP server.
//!
//! The pins live on the state partition (`lan-pins.json`), so a node keeps its address across
//! its own reboots and the master's power cuts: kubeadm pins every node's IP.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use labforge_core::config::network::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The pins on the state partition.
pub const PINS_FILE: &str = "lan-pins.json";
/// dnsmasq's lease database on the state partition.
pub const LEASES_FILE: &str = "lan.leases";
/// The pins as dnsmasq reads them (`--dhcp-hostsfile`, re-read on SIGHUP after it dropped
/// to `nobody`, so outside the root-only state directory, in a directory of its own with
/// mode 0755; written again from the pins).
pub const HOSTS_FILE: &str = "/run/labforge-lan/hosts";
/// The master's LAN address, for systemd-networkd (runtime only: the agent writes it again
/// at every boot from its state).
pub const NETWORKD_FILE: &str = "/run/systemd/network/10-labforge-lan.network";
/// Leases a room's switch can hold at most, read from dnsmasq's file (bounds the parser).
const MAX_LEASES: usize = 4096;

/// Whether `ip` is an IPv4 link-local address (169.254/16).
pub fn is_link_local(ip: Ipv4Addr) -> bool {
    ip.is_link_local()
}

/// The served LAN: the master's address and the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub net: Ipv4Net,
    /// The master's address: the network's first.
    pub gateway: Ipv4Addr,
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl Plan {
    pub fn new(net: Ipv4Net) -> Plan {
        let n = u32::from(net.network);
        let b = u32::from(net.broadcast());
        Plan { net, gateway: Ipv4Addr::from(n + 1), first: Ipv4Addr::from(n + 2), last: Ipv4Addr::from(b - 1) }
    }

    /// Addresses the pool can lease.
    pub fn capacity(&self) -> usize {
        (u32::from(self.last) - u32::from(self.first) + 1) as usize
    }

    /// Why this LAN cannot be served beside the networks this node already has (an uplink
    /// on the same network would route the room's addresses into the building's).
    pub fn clash(&self, others: &[Ipv4Net]) -> Option<String> {
        others.iter().find(|o| !is_link_local(o.network) && o.overlaps(&self.net)).map(|o| {
            format!(
                "[network] lan-cidr {} overlaps {o}, a network this node is already on: choose a lan-cidr outside it",
                self.net
            )
        })
    }

    /// Why the room does not fit, if it does not: `nodes` counts the master too.
    pub fn too_small(&self, nodes: usize) -> Option<String> {
        let room = nodes.saturating_sub(1);
        (room > self.capacity()).then(|| {
            format!(
                "[network] lan-cidr {} has addresses for {} nodes besides the master, and {room} are here: choose a larger network",
                self.net,
                self.capacity()
            )
        })
    }
}

/// One pinned address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub address: Ipv4Addr,
    /// The name its DHCP client sent, when it was a valid host name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
}

/// Every MAC's address, for good.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pins {
    /// By MAC, lowercase `aa:bb:cc:dd:ee:ff`.
    pub leases: BTreeMap<String, Pin>,
}

impl Pins {
    pub fn load(dir: &Path) -> Result<Pins> {
        let path = dir.join(PINS_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| {
                format!(
                    "{} is unreadable; move it aside only if the room's nodes may all change address",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pins::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("pins serialise");
        crate::sys::fs::write_durable_mode(&dir.join(PINS_FILE), &json, 0o644)
    }

    /// Pins what dnsmasq leased to the room's nodes — MACs whose leased address sends
    /// authentic beacons (`members`) — for MACs not pinned yet. Anyone else on the LAN (a
    /// visitor's laptop) keeps an ordinary lease that expires, and can never fill the pool
    /// for good. An address pinned to another MAC is never given twice: dnsmasq does not
    /// lease a `dhcp-host` address to anyone else. Returns whether anything changed.
    pub fn absorb(&mut self, plan: &Plan, leases: &[Lease], members: &[Ipv4Addr]) -> bool {
        let mut changed = false;
        for l in leases.iter().filter(|l| members.contains(&l.address)) {
            // Names go into dnsmasq's hosts file: only RFC 1123 names, nothing that could
            // add a field or a line.
            let name = if crate::cluster::discovery::beacon::is_hostname(&l.hostname) {
                l.hostname.clone()
            } else {
                String::new()
            };
            let l = &Lease { hostname: name, ..l.clone() };
            if !plan.net.contains(l.address) || l.address == plan.gateway {
                continue;
            }
            let taken = self.leases.iter().any(|(mac, p)| p.address == l.address && *mac != l.mac);
            if taken {
                continue;
            }
            match self.leases.get_mut(&l.mac) {
                None => {
                    self.leases.insert(l.mac.clone(), Pin { address: l.address, hostname: l.hostname.clone() });
                    changed = true;
                }
                Some(p) if p.hostname != l.hostname && !l.hostname.is_empty() => {
                    p.hostname = l.hostname.clone();
                    changed = true;
                }
                Some(_) => {}
            }
        }
        changed
    }

    /// dnsmasq's `--dhcp-hostsfile`: `mac,address[,hostname],infinite` per pin inside the
    /// plan.
    pub fn hosts_file(&self, plan: &Plan) -> String {
        let mut out = String::from("# labforge: addresses pinned per MAC (from lan-pins.json)\n");
        for (mac, p) in &self.leases {
            if !plan.net.contains(p.address) {
                continue;
            }
            if p.hostname.is_empty() {
                out.push_str(&format!("{mac},{},infinite\n", p.address));
            } else {
                out.push_str(&format!("{mac},{},{},infinite\n", p.address, p.hostname));
            }
        }
        out
    }
}

/// One line of dnsmasq's lease file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub mac: String,
    pub address: Ipv4Addr,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
}

/// dnsmasq's lease file: `expiry mac address hostname client-id` per line. Lines that are not
/// an Ethernet lease are skipped; at most [`MAX_LEASES`] are read.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 {
                return None;
            }
            let mac = crate::network::dhcp::parse_mac(f[1])?;
            let mac = crate::network::dhcp::format_mac(&mac);
            let address: Ipv4Addr = f[2].parse().ok()?;
            let hostname =
                if crate::cluster::discovery::beacon::is_hostname(f[3]) { f[3].to_string() } else { String::new() };
            Some(Lease { mac, address, hostname })
        })
        .take(MAX_LEASES)
        .collect()
}

/// Where dnsmasq keeps its files for the served LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub leases: PathBuf,
    pub hosts: PathBuf,
}

impl Files {
    pub fn new(state_dir: &Path) -> Files {
        Files { leases: state_dir.join(LEASES_FILE), hosts: PathBuf::from(HOSTS_FILE) }
    }
}

/// dnsmasq's argv for serving the LAN on `interface`: DHCP from the pool with the pins, DNS
/// for the leased names and `api_name`, the master as router, DNS and NTP server.
/// `upstream`: a resolv.conf naming the uplink's resolvers (dnsmasq waits for it while it is
/// missing, and reads it again whenever it changes).
pub fn dnsmasq_args(interface: &str, plan: &Plan, api_name: &str, files: &Files, upstream: &Path) -> Vec<String> {
    let gw = plan.gateway;
    let mut a: Vec<String> = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--bind-interfaces",
        "--except-interface=lo",
        "--log-facility=-",
        "--log-dhcp",
        "--pid-file",
        // Binds its sockets and opens its files as root, then runs as nobody: a flaw in its
        // DHCP or DNS parsers does not give the LAN root on the master.
        "--user=nobody",
        "--group=nogroup",
        // Names without a dot and private reverse lookups never leave the LAN.
        "--domain-needed",
        // Names come from the leases and the API endpoint, not from this node's /etc/hosts.
        "--no-hosts",
        "--bogus-priv",
        // The only DHCP server on this LAN (the master checked): answers at once after a
        // reboot instead of waiting out clients' old leases.
        "--dhcp-authoritative",
    ]
    .map(String::from)
    .to_vec();
    a.push(format!("--interface={interface}"));
    a.push(format!("--listen-address={gw}"));
    // An hour for whoever asks; the room's nodes are pinned, for good, in the hosts file.
    a.push(format!("--dhcp-range={},{},{},1h", plan.first, plan.last, plan.net.netmask()));
    a.push(format!("--dhcp-leasefile={}", files.leases.display()));
    a.push(format!("--dhcp-hostsfile={}", files.hosts.display()));
    a.push(format!("--dhcp-option=option:router,{gw}"));
    a.push(format!("--dhcp-option=option:dns-server,{gw}"));
    a.push(format!("--dhcp-option=option:ntp-server,{gw}"));
    a.push(format!("--host-record={api_name},{gw}"));
    a.push(format!("--resolv-file={}", upstream.display()));
    a
}

/// The systemd-networkd unit that gives the master its LAN address on `interface`, probed
/// by ARP first (`DuplicateAddressDetection=ipv4`): a host already using it keeps it, and
/// the master reports the conflict instead of taking it. The master names itself as the
/// link's DNS server: its own resolver (and the kubelet's resolv.conf, which CoreDNS forwards
/// to) then has the LAN's names and, through dnsmasq, the uplink's resolvers; with no uplink
/// it still names a server, so CoreDNS starts. dnsmasq follows resolved's file but ignores a
/// server that is one of its own addresses ("local interface"), so it never forwards to itself.
pub fn networkd_unit(interface: &str, plan: &Plan) -> String {
    format!(
        "# labforge: this node is the master of a room with no DHCP server; it serves {net}.\n\
         [Match]\nName={interface}\n\n\
         [Network]\nDHCP=no\nLinkLocalAddressing=ipv6\nConfigureWithoutCarrier=yes\nDNS={gw}\n\n\
         [Address]\nAddress={gw}/{prefix}\nDuplicateAddressDetection=ipv4\n",
        net = plan.net,
        gw = plan.gateway,
        prefix = plan.net.prefix,
    )
}

/// Checks the plan against what this node sees before it takes the LAN.
pub fn check(plan: &Plan, other_networks: &[Ipv4Net], nodes: usize) -> Result<()> {
    if let Some(why) = plan.clash(other_networks) {
        bail!(why);
    }
    if let Some(why) = plan.too_small(nodes) {
        bail!(why);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(cidr: &str) -> Plan {
        Plan::new(Ipv4Net::parse(cidr).unwrap())
    }

    fn lease(mac: &str, ip: &str, host: &str) -> Lease {
        Lease { mac: mac.into(), address: ip.parse().unwrap(), hostname: host.into() }
    }

    #[test]
    fn the_master_takes_the_first_address_and_leases_the_rest() {
        let p = plan("10.83.0.0/24");
        assert_eq!(
            (p.gateway.to_string(), p.first.to_string(), p.last.to_string()),
            ("10.83.0.1".into(), "10.83.0.2".into(), "10.83.0.254".into())
        );
        assert_eq!(p.capacity(), 253);
        let small = plan("10.83.0.0/28");
        assert_eq!(small.capacity(), 13);
        assert!(small.too_small(14).is_none(), "13 workers and the master fit a /28");
        let e = small.too_small(15).unwrap();
        assert!(e.contains("13 nodes besides the master, and 14 are here"), "{e}");
        let uplink = Ipv4Net::parse("10.83.0.0/16").unwrap();
        let e = check(&p, &[uplink], 3).unwrap_err().to_string();
        assert!(e.contains("overlaps 10.83.0.0/16"), "{e}");
        let ll = Ipv4Net::parse("169.254.0.0/16").unwrap();
        assert!(check(&p, &[ll, Ipv4Net::parse("192.168.1.0/24").unwrap()], 3).is_ok(), "link-local never clashes");
    }

    #[test]
    fn a_node_keeps_its_first_address_for_good_and_a_visitor_is_never_pinned() {
        let p = plan("10.83.0.0/24");
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let members = [ip("10.83.0.5"), ip("10.83.0.6"), ip("10.83.0.9"), ip("10.83.0.1")];
        let mut pins = Pins::default();
        assert!(pins.absorb(
            &p,
            &[
                lease("52:54:00:00:00:01", "10.83.0.5", "node-a"),
                lease("52:54:00:00:00:02", "10.83.0.6", "*"),
                // A laptop on the LAN: leased, sends no authentic beacon, never pinned.
                lease("52:54:00:00:00:07", "10.83.0.7", "laptop")
            ],
            &members
        ));
        assert!(!pins.leases.contains_key("52:54:00:00:00:07"), "a visitor is not pinned");
        assert!(!pins.absorb(&p, &[lease("52:54:00:00:00:01", "10.83.0.5", "node-a")], &members), "nothing new");
        // A later lease of another address to the same MAC (dnsmasq lost its file) changes
        // nothing: the pin wins, and dnsmasq hands out the pinned one from the hosts file.
        assert!(!pins.absorb(&p, &[lease("52:54:00:00:00:01", "10.83.0.9", "node-a")], &members));
        assert_eq!(pins.leases["52:54:00:00:00:01"].address.to_string(), "10.83.0.5");
        // Another MAC on a pinned address is not pinned; outside the LAN or the master's own
        // address neither.
        assert!(!pins.absorb(
            &p,
            &[
                lease("52:54:00:00:00:03", "10.83.0.5", "x"),
                lease("52:54:00:00:00:04", "10.9.0.5", "y"),
                lease("52:54:00:00:00:05", "10.83.0.1", "z")
            ],
            &[ip("10.83.0.5"), ip("10.9.0.5"), ip("10.83.0.1")]
        ));
        assert_eq!(
            pins.hosts_file(&p),
            "# labforge: addresses pinned per MAC (from lan-pins.json)\n52:54:00:00:00:01,10.83.0.5,node-a,infinite\n52:54:00:00:00:02,10.83.0.6,infinite\n"
        );
        let d = tempfile::tempdir().unwrap();
        pins.save(d.path()).unwrap();
        assert_eq!(Pins::load(d.path()).unwrap(), pins);
        std::fs::write(d.path().join(PINS_FILE), "{").unwrap();
        assert!(format!("{:#}", Pins::load(d.path()).unwrap_err()).contains("move it aside only if"));
    }

    #[test]
    fn dnsmasq_lease_files_are_read_within_bounds() {
        let text = "0 52:54:00:AA:BB:01 10.83.0.2 labforge-525400aabb01 01:52:54:00:aa:bb:01\n\
                    garbage\n\
                    0 52:54:00:aa:bb:02 10.83.0.3 * *\n\
                    0 52:54:00:aa:bb:03 not-an-ip x *\n\
                    0 52:54:00:aa:bb:04 10.83.0.4 bad_name! *\n";
        assert_eq!(
            parse_leases(text),
            vec![
                lease("52:54:00:aa:bb:01", "10.83.0.2", "labforge-525400aabb01"),
                lease("52:54:00:aa:bb:02", "10.83.0.3", ""),
                lease("52:54:00:aa:bb:04", "10.83.0.4", ""),
            ]
        );
        let many = "0 52:54:00:aa:bb:01 10.83.0.2 a *\n".repeat(MAX_LEASES + 10);
        assert_eq!(parse_leases(&many).len(), MAX_LEASES);
    }

    #[test]
    fn dnsmasq_serves_dhcp_dns_and_time_on_the_lan_only() {
        let p = plan("10.83.0.0/24");
        let files = Files::new(Path::new("/var/lib/labforge"));
        let a = dnsmasq_args("enp1s0", &p, "lab-api", &files, Path::new("/run/systemd/resolve/resolv.conf"));
        for want in [
            "--interface=enp1s0",
            "--listen-address=10.83.0.1",
            "--except-interface=lo",
            "--dhcp-range=10.83.0.2,10.83.0.254,255.255.255.0,1h",
            "--dhcp-hostsfile=/run/labforge-lan/hosts",
            "--dhcp-leasefile=/var/lib/labforge/lan.leases",
            "--dhcp-option=option:router,10.83.0.1",
            "--dhcp-option=option:ntp-server,10.83.0.1",
            "--host-record=lab-api,10.83.0.1",
            "--user=nobody",
            "--resolv-file=/run/systemd/resolve/resolv.conf",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        let unit = networkd_unit("enp1s0", &p);
        assert!(
            unit.contains("Name=enp1s0\n") && unit.contains("Address=10.83.0.1/24\nDuplicateAddressDetection=ipv4\n"),
            "{unit}"
        );
        assert!(unit.contains("DHCP=no\n"), "the master does not ask itself for a lease");
        assert!(unit.contains("\nDNS=10.83.0.1\n"), "the master resolves through its own dnsmasq: {unit}");
    }
}
