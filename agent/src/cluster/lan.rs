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
/// address and broadcast address, if it has one yet.
pub fn lan(selector: &str, inventory: &Inventory) -> Option<Lan> {
    let names: Vec<&str> =
        if selector == "auto" { inventory.nics.iter().map(|n| n.name.as_str()).collect() } else { vec![selector] };
    let addrs = nix::ifaddrs::getifaddrs().ok()?.collect::<Vec<_>>();
    for name in names {
        for a in addrs.iter().filter(|a| a.interface_name == name) {
            let Some(ip) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) else { continue };
            let broadcast =
                a.broadcast.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()).unwrap_or(Ipv4Addr::BROADCAST);
            let netmask = a
                .netmask
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .map(|s| s.ip())
                .unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
            return Some(Lan { interface: name.to_string(), address: ip, broadcast, netmask });
        }
    }
    None
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
