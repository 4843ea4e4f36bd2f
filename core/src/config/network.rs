//! The spec's `[network]` table: how a room on a bare switch gets its addresses. Nodes that
//! get no DHCP lease fall back to IPv4 link-local addressing (RFC 3927) and find each other
//! there; the elected master then takes the first address of `lan-cidr` and serves the LAN:
//! DHCP with an address pinned per MAC, DNS and time. A LAN whose own DHCP server answers is
//! left alone.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Whether the master serves addresses on a LAN with no DHCP server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ServePolicy {
    /// When the master found no DHCP server (it has only a link-local address and no offer
    /// answers its probe).
    #[default]
    Auto,
    /// Never: a site whose LAN is managed by someone else.
    Never,
}

/// The spec's `[network]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NetworkConfig {
    /// The LAN the master serves on a bare switch: a private IPv4 network, /16 to /28. The
    /// master takes its first address; the others are leased, one pinned per MAC.
    #[serde(default = "default_lan_cidr")]
    pub lan_cidr: String,
    /// `auto` (serve when no DHCP server answers) or `never`.
    #[serde(default)]
    pub serve: ServePolicy,
    /// The master's NIC to the outside, masqueraded for the LAN: `auto` (the NIC other than
    /// the LAN's that holds the default route), a name, or `none`.
    #[serde(default = "default_auto")]
    pub uplink: String,
    /// TCP ports the uplink admits from the outside. Unset: SSH (22), the portal (80) and
    /// every web UI of the image's stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_admit: Option<Vec<u16>>,
}

fn default_auto() -> String {
    "auto".into()
}

/// 10.83.0.0/24: private, and outside the ranges home routers, Docker (172.17/16) and
/// Kubernetes' defaults (10.96/12 services, 10.244/16 pods) use.
fn default_lan_cidr() -> String {
    "10.83.0.0/24".into()
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            lan_cidr: default_lan_cidr(),
            serve: ServePolicy::Auto,
            uplink: default_auto(),
            uplink_admit: None,
        }
    }
}

/// An IPv4 network: its address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn parse(s: &str) -> Result<Ipv4Net> {
        let (ip, len) = s.split_once('/').with_context(|| format!("{s:?} is not an IPv4 CIDR such as 10.83.0.0/24"))?;
        let ip: Ipv4Addr = ip.parse().with_context(|| format!("{s:?} is not an IPv4 CIDR such as 10.83.0.0/24"))?;
        let prefix: u8 = len.parse().ok().filter(|l| *l <= 32).with_context(|| format!("{s:?}: bad prefix length"))?;
        let net = Ipv4Net { network: ip, prefix };
        if u32::from(ip) & !net.mask_bits() != 0 {
            bail!(
                "{s:?} has host bits set; the network is {}/{prefix}",
                Ipv4Addr::from(u32::from(ip) & net.mask_bits())
            );
        }
        Ok(net)
    }

    fn mask_bits(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask_bits())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.network)
    }

    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl NetworkConfig {
    /// The LAN network, checked: private (RFC 1918), /16 to /28, clear of link-local and of
    /// the pod and service networks.
    pub fn lan(&self) -> Result<Ipv4Net> {
        let net = Ipv4Net::parse(&self.lan_cidr).context("[network] lan-cidr")?;
        if !net.network.is_private() {
            bail!("[network] lan-cidr {net} is not a private network (10/8, 172.16/12 or 192.168/16): a room's LAN must never take public addresses");
        }
        if !(16..=28).contains(&net.prefix) {
            bail!("[network] lan-cidr {net}: the prefix must be /16 to /28 (a /28 has room for 13 nodes)");
        }
        Ok(net)
    }

    /// Checks the table, and that the LAN stays clear of the cluster's pod and service
    /// networks (a node could not tell its neighbours from its pods).
    pub fn validate(&self, pod_cidr: &str, service_cidr: &str) -> Result<()> {
        let lan = self.lan()?;
        if self.uplink.is_empty()
            || self.uplink.len() > 15
            || !self.uplink.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            bail!("[network] uplink {:?} must be auto, none or an interface name", self.uplink);
        }
        if self.uplink_admit.as_ref().is_some_and(|p| p.contains(&0)) {
            bail!("[network] uplink-admit: port 0 is not a port");
        }
        for (what, cidr) in [("pod-cidr", pod_cidr), ("service-cidr", service_cidr)] {
            if let Ok(other) = Ipv4Net::parse(cidr) {
                if lan.overlaps(&other) {
                    bail!("[network] lan-cidr {lan} overlaps [cluster] {what} {other}: choose a LAN outside it");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_refuse() {
        let n = Ipv4Net::parse("10.83.0.0/24").unwrap();
        assert_eq!((n.netmask(), n.broadcast()), ("255.255.255.0".parse().unwrap(), "10.83.0.255".parse().unwrap()));
        assert!(n.contains("10.83.0.7".parse().unwrap()) && !n.contains("10.83.1.7".parse().unwrap()));
        assert!(n.overlaps(&Ipv4Net::parse("10.0.0.0/8").unwrap()));
        assert!(!n.overlaps(&Ipv4Net::parse("10.84.0.0/16").unwrap()));
        for bad in ["10.83.0.1/24", "10.83.0.0", "10.83.0.0/33", "x/24"] {
            assert!(Ipv4Net::parse(bad).is_err(), "{bad}");
        }
        let cfg = |c: &str| NetworkConfig { lan_cidr: c.into(), ..Default::default() };
        assert!(cfg("10.83.0.0/24").validate("10.244.0.0/16", "10.96.0.0/12").is_ok());
        let e = format!("{:#}", cfg("8.8.8.0/24").lan().unwrap_err());
        assert!(e.contains("not a private network"), "{e}");
        let e = format!("{:#}", cfg("10.83.0.0/30").lan().unwrap_err());
        assert!(e.contains("/16 to /28"), "{e}");
        let e = format!("{:#}", cfg("10.244.3.0/24").validate("10.244.0.0/16", "10.96.0.0/12").unwrap_err());
        assert!(e.contains("overlaps [cluster] pod-cidr"), "{e}");
    }
}
