//! The cluster LAN as this node sees it: which interface, its IPv4 address, netmask and
//! broadcast address, as the kernel reports them.

use std::net::{IpAddr, Ipv4Addr};

use crate::inventory::Inventory;

/// The cluster LAN as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lan {
    pub interface: String,
    pub address: Ipv4Addr,
    pub broadcast: Ipv4Addr,
    pub netmask: Ipv4Addr,
}

/// Finds the LAN interface (`auto`: the first physical NIC with an IPv4 address) and its
/// address and broadcast address, if it has one yet. A leased or static address is preferred
/// to a link-local one (a node that just got its lease may hold both for a moment).
///
/// `auto` never picks an uplink: the NIC `uplink` names, or — when more than one NIC has a
/// carrier — one holding the default route (a master cabled to the building network gets its
/// lease there long before its LAN NIC falls back to link-local).
pub fn lan(selector: &str, uplink: &str, inventory: &Inventory) -> Option<Lan> {
    if selector != "auto" {
        return lan_on(selector);
    }
    let names: Vec<&str> = inventory.nics.iter().map(|n| n.name.as_str()).filter(|n| *n != uplink).collect();
    let carrier = names
        .iter()
        .filter(|n| std::fs::read_to_string(format!("/sys/class/net/{n}/carrier")).is_ok_and(|c| c.trim() == "1"))
        .count();
    let avoid = if uplink == "auto" && carrier > 1 { crate::network::uplink::default_routes() } else { Vec::new() };
    names.into_iter().filter(|n| !avoid.iter().any(|a| a == n)).find_map(lan_on)
}

/// The LAN address of interface `name`, if it has one.
pub fn lan_on(name: &str) -> Option<Lan> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    let found: Vec<Lan> = addrs
        .filter(|a| a.interface_name == name)
        .filter_map(|a| {
            let ip = a.address.as_ref()?.as_sockaddr_in()?.ip();
            let broadcast =
                a.broadcast.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()).unwrap_or(Ipv4Addr::BROADCAST);
            let netmask = a
                .netmask
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .map(|s| s.ip())
                .unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
            Some(Lan { interface: name.to_string(), address: ip, broadcast, netmask })
        })
        .collect();
    preferred(found)
}

/// The first address that is not link-local, else the first.
fn preferred(mut found: Vec<Lan>) -> Option<Lan> {
    let i = found.iter().position(|l| !l.address.is_link_local()).unwrap_or(0);
    (!found.is_empty()).then(|| found.swap_remove(i))
}

impl Lan {
    pub fn link_local(&self) -> bool {
        self.address.is_link_local()
    }

    /// The network this address is on.
    pub fn net(&self) -> labforge_core::config::network::Ipv4Net {
        let mask = u32::from(self.netmask);
        labforge_core::config::network::Ipv4Net {
            network: Ipv4Addr::from(u32::from(self.address) & mask),
            prefix: mask.count_ones() as u8,
        }
    }
}

/// The IPv4 networks of every interface but `except` (for clashes with the LAN to serve).
pub fn other_networks(except: &str) -> Vec<labforge_core::config::network::Ipv4Net> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    addrs
        .filter(|a| a.interface_name != except && a.interface_name != "lo")
        .filter_map(|a| {
            let ip = a.address.as_ref()?.as_sockaddr_in()?.ip();
            let mask = a.netmask.as_ref()?.as_sockaddr_in()?.ip();
            Some(Lan { interface: a.interface_name.clone(), address: ip, broadcast: ip, netmask: mask }.net())
        })
        .collect()
}

/// Addresses of one interface as the kernel reports them, in CIDR notation.
pub fn kernel_addresses(name: &str) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_preferred_to_a_link_local_address() {
        let l = |ip: &str| Lan {
            interface: "eth0".into(),
            address: ip.parse().unwrap(),
            broadcast: Ipv4Addr::BROADCAST,
            netmask: "255.255.0.0".parse().unwrap(),
        };
        assert_eq!(preferred(vec![l("169.254.3.4"), l("10.83.0.7")]).unwrap().address.to_string(), "10.83.0.7");
        assert_eq!(preferred(vec![l("169.254.3.4")]).unwrap().address.to_string(), "169.254.3.4");
        assert!(preferred(vec![]).is_none());
        assert!(l("169.254.3.4").link_local() && !l("10.83.0.7").link_local());
        assert_eq!(l("10.83.0.7").net().to_string(), "10.83.0.0/16");
    }
}
