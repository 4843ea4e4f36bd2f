//! The master of a bare switch as the room's gateway: its uplink (the NIC with a route to the
//! outside, or the one `[network] uplink` names) masquerades the LAN's traffic, so workers
//! reach package mirrors for `pip` and friends, and admits from the outside only SSH and the
//! web ports (the portal and the stack's web UIs, or `[network] uplink-admit`). One nftables
//! table of our own (`inet labforge`), replaced whole on every change. Names outside the LAN
//! are forwarded to the resolvers systemd-resolved has from the uplink's DHCP lease.

use labforge_core::config::network::Ipv4Net;

/// The nftables table this module owns.
pub const TABLE: &str = "labforge";
/// The resolvers systemd-resolved learnt from the links' DHCP leases (on a master serving its
/// LAN: the uplink's), for dnsmasq's `--resolv-file` (re-read whenever it changes).
pub const UPSTREAM_RESOLV: &str = "/run/systemd/resolve/resolv.conf";

/// Interfaces holding an IPv4 default route now.
pub fn default_routes() -> Vec<String> {
    default_route_interfaces(&std::fs::read_to_string("/proc/net/route").unwrap_or_default())
}

/// Interfaces holding an IPv4 default route, from `/proc/net/route`.
pub fn default_route_interfaces(proc_net_route: &str) -> Vec<String> {
    let mut out: Vec<String> = proc_net_route
        .lines()
        .skip(1)
        .take(4096)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
        })
        .collect();
    out.dedup();
    out
}

/// The uplink: `selector` names it (`none`: no uplink), or `auto`: the first interface
/// other than the LAN's that holds a default route. Never the LAN interface.
pub fn choose(selector: &str, lan: &str, default_routes: &[String]) -> Option<String> {
    match selector {
        "none" => None,
        "auto" => default_routes.iter().find(|i| *i != lan && i.as_str() != "lo").cloned(),
        named if named != lan => Some(named.to_string()),
        _ => None,
    }
}

/// The ruleset for `nft -f`: replaces our table whole (creating it first so the delete never
/// fails). Protocols by number (ICMP 1, ICMPv6 58, TCP 6): names would need `/etc/protocols`,
/// which a minimal image lacks. Input from the uplink: replies, ICMP, the DHCP clients, and
/// the admitted TCP ports; nothing else. Forwarding: the LAN out through the uplink,
/// masqueraded, and only replies back in (to the LAN and to the master's own pods), besides
/// the admitted ports kube-proxy DNATed to a pod (a web UI's NodePort).
pub fn ruleset(lan_interface: &str, lan: &Ipv4Net, uplink: &str, admit: &[u16]) -> String {
    let mut ports: Vec<u16> = admit.to_vec();
    ports.sort_unstable();
    ports.dedup();
    let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    let admitted = if ports.is_empty() {
        String::new()
    } else {
        format!("\t\tiifname \"{uplink}\" tcp dport {{ {list} }} accept\n")
    };
    // A web UI on a NodePort is DNATed to its pod before filtering: forwarded, not input, and
    // known by the port it was asked on.
    let forwarded = if ports.is_empty() {
        String::new()
    } else {
        format!("\t\tiifname \"{uplink}\" meta l4proto 6 ct status dnat ct original proto-dst {{ {list} }} accept\n")
    };
    format!(
        "table inet {TABLE} {{}}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{uplink}\" ct state established,related accept\n\
         \t\tiifname \"{uplink}\" meta l4proto {{ 1, 58 }} accept\n\
         \t\tiifname \"{uplink}\" udp sport 67 udp dport 68 accept\n\
         \t\tiifname \"{uplink}\" udp sport 547 udp dport 546 accept\n\
         {admitted}\
         \t\tiifname \"{uplink}\" drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{lan_interface}\" oifname \"{uplink}\" ip saddr {lan} accept\n\
         \t\tiifname \"{uplink}\" ct state established,related accept\n\
         {forwarded}\
         \t\tiifname \"{uplink}\" drop\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{uplink}\" ip saddr {lan} masquerade\n\
         \t}}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uplink_is_the_default_route_never_the_lan() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     enp0s3\t00000000\t01C8A8C0\t0003\t0\t0\t1024\t00000000\t0\t0\t0\n\
                     enp0s3\t00C8A8C0\t00000000\t0001\t0\t0\t1024\t00FFFFFF\t0\t0\t0\n\
                     enp0s2\t00004D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let routes = default_route_interfaces(route);
        assert_eq!(routes, vec!["enp0s3"]);
        assert_eq!(choose("auto", "enp0s2", &routes).as_deref(), Some("enp0s3"));
        assert_eq!(choose("auto", "enp0s3", &routes), None, "the LAN is never the uplink");
        assert_eq!(choose("none", "enp0s2", &routes), None);
        assert_eq!(choose("enp9s0", "enp0s2", &routes).as_deref(), Some("enp9s0"));
        assert_eq!(choose("enp0s2", "enp0s2", &routes), None);
    }

    #[test]
    fn the_uplink_admits_only_what_it_is_told() {
        let lan = Ipv4Net::parse("10.83.0.0/24").unwrap();
        let r = ruleset("enp0s2", &lan, "enp0s3", &[443, 22, 80, 22]);
        assert!(r.starts_with("table inet labforge {}\ndelete table inet labforge\n"), "{r}");
        assert!(r.contains("iifname \"enp0s3\" tcp dport { 22, 80, 443 } accept\n"), "{r}");
        assert!(r.contains("iifname \"enp0s3\" drop\n\t}"), "everything else from the uplink is dropped: {r}");
        assert!(r.contains("oifname \"enp0s3\" ip saddr 10.83.0.0/24 masquerade"), "{r}");
        assert!(r.contains("chain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tiifname \"enp0s2\" oifname \"enp0s3\" ip saddr 10.83.0.0/24 accept\n\t\tiifname \"enp0s3\" ct state established,related accept\n"), "replies to the master's own pods too: {r}");
        assert!(r.contains("udp sport 547 udp dport 546 accept"), "DHCPv6 on the uplink: {r}");
        assert!(
            r.contains("meta l4proto 6 ct status dnat ct original proto-dst { 22, 80, 443 } accept"),
            "NodePorts: {r}"
        );
        let none = ruleset("enp0s2", &lan, "enp0s3", &[]);
        assert!(!none.contains("tcp dport") && !none.contains("proto-dst"), "{none}");
    }
}
