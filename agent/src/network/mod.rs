//! The node on its LAN beyond discovery: how it got its address (`addressing`), the master
//! serving a bare switch its addresses, names and time (`serve`, `dhcp`, `time`), and giving
//! a departed PC's pinned address back (`unpin`).

pub mod addressing;
pub mod dhcp;
pub mod serve;
pub mod time;
pub mod unpin;
pub mod uplink;

use serde::{Deserialize, Serialize};

crate::wire_enum! {
    /// How this node got its LAN address.
    #[derive(Default)]
    pub enum Addressing {
        /// No IPv4 address yet.
        #[default]
        None = "none",
        /// From a DHCP server (the LAN's own, or the master's).
        Leased = "leased",
        /// IPv4 link-local (RFC 3927): no DHCP server answered.
        LinkLocal = "link-local",
        /// The master's own address on the LAN it serves.
        Served = "served",
    }
}

crate::wire_enum! {
    /// The master's DHCP and DNS service on a bare switch.
    #[derive(Default)]
    pub enum ServeState {
        #[default]
        Starting = "starting",
        Serving = "serving",
        /// dnsmasq stopped or could not start; started again after a pause.
        Failed = "failed",
        /// Another DHCP server answers on the LAN: this master hands out nothing.
        Stopped = "stopped",
    }
}

/// The `network` part of `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub interface: Option<String>,
    pub address: Option<String>,
    pub addressing: Addressing,
    pub message: String,
    /// On the master of a bare switch: what it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<Serving>,
}

/// What a master serves its bare switch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    /// The network, e.g. `10.83.0.0/24`.
    pub lan: String,
    pub gateway: String,
    pub state: ServeState,
    pub message: String,
    /// Every pinned address, by MAC.
    pub leases: Vec<addressing::Lease>,
    /// Addresses the pool can lease.
    pub capacity: usize,
    /// Other DHCP servers heard answering on the LAN (server identifiers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_dhcp_servers: Vec<String>,
    /// The way out: the uplink, NAT and what it admits.
    #[serde(default)]
    pub uplink: Option<UplinkStatus>,
}

/// The master's uplink as the room's gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkStatus {
    pub interface: String,
    pub address: Option<String>,
    /// The LAN's traffic is masqueraded out through it.
    pub nat: bool,
    /// TCP ports admitted from the outside; everything else from there is dropped.
    pub admitted: Vec<u16>,
    pub message: String,
}

impl NetworkStatus {
    /// What `labforge-agent network` prints.
    pub fn render(&self) -> String {
        let mut out = format!(
            "interface  {}\naddress    {} ({})\n",
            self.interface.as_deref().unwrap_or("-"),
            self.address.as_deref().unwrap_or("-"),
            self.addressing
        );
        if !self.message.is_empty() {
            out.push_str(&format!("           {}\n", self.message));
        }
        if let Some(s) = &self.serving {
            out.push_str(&format!(
                "serving    {} as {} ({}): {}\nleases     {} of {}\n",
                s.lan,
                s.gateway,
                s.state,
                s.message,
                s.leases.len(),
                s.capacity
            ));
            for l in &s.leases {
                let host = if l.hostname.is_empty() { "-" } else { &l.hostname };
                out.push_str(&format!("  {}  {:<15}  {host}\n", l.mac, l.address));
            }
            match &s.uplink {
                Some(u) => out.push_str(&format!(
                    "uplink     {} ({}): {}\n",
                    u.interface,
                    u.address.as_deref().unwrap_or("no address"),
                    u.message
                )),
                None => out.push_str("uplink     none: the LAN has no way out\n"),
            }
            if !s.other_dhcp_servers.is_empty() {
                out.push_str(&format!("other DHCP servers: {}\n", s.other_dhcp_servers.join(", ")));
            }
        }
        out
    }
}
