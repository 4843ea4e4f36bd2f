//! Is there a DHCP server on this LAN? One DHCPDISCOVER, broadcast on the LAN interface, and
//! the offers that answer it within a few seconds. The master asks before it serves addresses
//! (never two DHCP servers on one LAN) and again while it serves; the tests ask it too.
//!
//! Messages are encoded and decoded by `dhcproto`; a datagram larger than a DHCP message may
//! be is cut at the buffer and fails to decode, and one whose transaction id or type is not an
//! offer to our discover is ignored.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

/// DHCP messages are at most 576 bytes unless the client says otherwise; room for more.
const MAX_MESSAGE: usize = 1500;

/// One DHCPOFFER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The server identifier (option 54), or the datagram's source when it has none.
    pub server: Ipv4Addr,
    /// The address offered.
    pub address: Ipv4Addr,
}

/// The DISCOVER this node sends: from `mac`, asking for a broadcast answer.
pub fn discover(xid: u32, mac: &[u8; 6]) -> Vec<u8> {
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(xid, unspecified, unspecified, unspecified, unspecified, mac);
    msg.set_flags(Flags::default().set_broadcast());
    msg.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
    msg.opts_mut().insert(DhcpOption::ParameterRequestList(vec![OptionCode::SubnetMask, OptionCode::Router]));
    let mut buf = Vec::with_capacity(300);
    msg.encode(&mut Encoder::new(&mut buf)).expect("a DISCOVER encodes");
    buf
}

/// The offer in `datagram` if it answers our discover `xid`.
pub fn parse_offer(datagram: &[u8], xid: u32, from: Ipv4Addr) -> Option<Offer> {
    if datagram.len() > MAX_MESSAGE {
        return None;
    }
    let msg = Message::decode(&mut Decoder::new(datagram)).ok()?;
    if msg.xid() != xid || msg.opts().msg_type() != Some(MessageType::Offer) {
        return None;
    }
    let server = match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => *ip,
        _ => from,
    };
    Some(Offer { server, address: msg.yiaddr() })
}

/// `aa:bb:cc:dd:ee:ff`, lowercase: how pins, leases and requests name a MAC.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Broadcasts one DISCOVER from `mac` on `interface` and collects the offers that arrive
/// within `wait`. Blocking; needs root (port 68).
pub fn probe(interface: &str, mac: &[u8; 6], wait: Duration) -> Result<Vec<Offer>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("creating the DHCP probe socket")?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(interface.as_bytes())).with_context(|| format!("binding the DHCP probe to {interface}"))?;
    s.bind(&SocketAddr::from(([0, 0, 0, 0], 68)).into()).context("binding UDP port 68 for the DHCP probe")?;
    let sock: std::net::UdpSocket = s.into();
    let mut xid = [0u8; 4];
    getrandom::getrandom(&mut xid).map_err(|e| anyhow::anyhow!("random transaction id: {e}"))?;
    let xid = u32::from_be_bytes(xid);
    sock.send_to(&discover(xid, mac), SocketAddr::from((Ipv4Addr::BROADCAST, 67)))
        .with_context(|| format!("broadcasting a DHCPDISCOVER on {interface}"))?;
    let deadline = Instant::now() + wait;
    let mut offers: Vec<Offer> = Vec::new();
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let from = match from.ip() {
                    std::net::IpAddr::V4(v4) => v4,
                    std::net::IpAddr::V6(_) => continue,
                };
                if let Some(o) = parse_offer(&buf[..n], xid, from) {
                    if !offers.contains(&o) {
                        offers.push(o);
                    }
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(e) => return Err(e).context("receiving DHCP offers"),
        }
    }
    Ok(offers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(xid: u32, server: Option<Ipv4Addr>, kind: MessageType) -> Vec<u8> {
        let mut m = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            "10.83.0.7".parse().unwrap(),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &[2, 0, 0, 0, 0, 1],
        );
        m.set_opcode(dhcproto::v4::Opcode::BootReply);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        if let Some(s) = server {
            m.opts_mut().insert(DhcpOption::ServerIdentifier(s));
        }
        let mut buf = Vec::new();
        m.encode(&mut Encoder::new(&mut buf)).unwrap();
        buf
    }

    #[test]
    fn offers_to_our_discover_are_read_and_nothing_else() {
        let d = discover(7, &[2, 0, 0, 0, 0, 1]);
        let m = Message::decode(&mut Decoder::new(&d)).unwrap();
        assert_eq!((m.xid(), m.opts().msg_type()), (7, Some(MessageType::Discover)));
        assert_eq!(m.chaddr(), &[2, 0, 0, 0, 0, 1]);
        let from: Ipv4Addr = "10.83.0.1".parse().unwrap();
        let server: Ipv4Addr = "10.83.0.2".parse().unwrap();
        let addr: Ipv4Addr = "10.83.0.7".parse().unwrap();
        assert_eq!(
            parse_offer(&offer(7, Some(server), MessageType::Offer), 7, from),
            Some(Offer { server, address: addr })
        );
        assert_eq!(parse_offer(&offer(7, None, MessageType::Offer), 7, from).unwrap().server, from);
        assert_eq!(parse_offer(&offer(8, Some(server), MessageType::Offer), 7, from), None, "another xid");
        assert_eq!(parse_offer(&offer(7, Some(server), MessageType::Ack), 7, from), None, "not an offer");
        assert_eq!(parse_offer(&d[..100], 7, from), None, "truncated");
        assert_eq!(parse_offer(&vec![0u8; MAX_MESSAGE + 1], 7, from), None, "oversize");
        assert_eq!(parse_mac("52:54:00:AA:bb:0c"), Some([0x52, 0x54, 0, 0xaa, 0xbb, 0x0c]));
        assert_eq!(parse_mac("52:54:00:aa:bb"), None);
        assert_eq!(parse_mac("52:54:00:aa:bb:cc:dd"), None);
    }
}
