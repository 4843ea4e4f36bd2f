//! Beacon wire format: `LFB1` + HMAC-SHA256(secret, json) + json. The JSON carries a
//! millisecond timestamp and a random nonce; stale, future and replayed beacons are dropped.

use std::collections::HashMap;
use std::net::IpAddr;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::cluster::election::NodeView;
use crate::secret::Secret;

const MAGIC: &[u8; 4] = b"LFB1";
const MAC_LEN: usize = 32;
/// Largest datagram accepted (beacons are well under 2 KiB).
pub const MAX_DATAGRAM: usize = 8192;
/// Clock difference tolerated between nodes (lab PCs keep time from their RTC).
pub const MAX_SKEW_MS: u64 = 120_000;
/// Remembered nonces, at most; only authenticated beacons are remembered.
const MAX_NONCES: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Beacon {
    pub node: NodeView,
    pub hostname: String,
    /// LAN addresses (IPv4 first); the first is where peers reach this node.
    pub addresses: Vec<String>,
    /// Boot counter of the sender, persisted in its state.
    pub term: u64,
    pub disks: DiskSummary,
    /// TCP port of the sender's status and join-info endpoint.
    pub port: u16,
    /// The pod CIDR the API server gave the sender's Node, once it has one: peers route it
    /// to the sender's first address (see `cluster::podnet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
    pub ts_ms: u64,
    pub nonce: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSummary {
    pub count: usize,
    pub total_bytes: u64,
    /// Disks the sender offers to Ceph (by-id paths), once its disks are prepared.
    #[serde(default)]
    pub ceph: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    Malformed,
    BadMac,
    Stale,
    Replay,
    Own,
    /// Authentic, but what it says does not hold (see [`validate`]).
    Invalid,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::BadMac => "bad_mac",
            Rejection::Stale => "stale",
            Rejection::Replay => "replay",
            Rejection::Own => "own",
            Rejection::Invalid => "invalid",
        }
    }
}

fn mac(secret: &Secret, payload: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.bytes()).expect("any key length");
    m.update(MAGIC);
    m.update(payload);
    m
}

pub fn encode(beacon: &Beacon, secret: &Secret) -> Vec<u8> {
    let payload = serde_json::to_vec(beacon).expect("beacon serialises");
    let tag = mac(secret, &payload).finalize().into_bytes();
    let mut out = Vec::with_capacity(4 + MAC_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&payload);
    out
}

/// Checks datagrams: MAC first (so forged traffic costs nothing to remember), then freshness
/// and replay.
pub struct Verifier {
    secret: Secret,
    own_id: String,
    seen: HashMap<String, u64>,
    /// The last authentic beacon dropped as stale, and how far its sender's clock is from
    /// ours (their time minus ours, ms).
    pub last_stale: Option<(Beacon, i64)>,
}

impl Verifier {
    pub fn new(secret: Secret, own_id: &str) -> Self {
        Verifier { secret, own_id: own_id.to_string(), seen: HashMap::new(), last_stale: None }
    }

    pub fn check(&mut self, datagram: &[u8], now_ms: u64) -> Result<Beacon, Rejection> {
        if datagram.len() < 4 + MAC_LEN || datagram.len() > MAX_DATAGRAM || &datagram[..4] != MAGIC {
            return Err(Rejection::Malformed);
        }
        let (tag, payload) = datagram[4..].split_at(MAC_LEN);
        mac(&self.secret, payload).verify_slice(tag).map_err(|_| Rejection::BadMac)?;
        let beacon: Beacon = serde_json::from_slice(payload).map_err(|_| Rejection::Malformed)?;
        if beacon.node.id == self.own_id {
            return Err(Rejection::Own);
        }
        if beacon.ts_ms.abs_diff(now_ms) > MAX_SKEW_MS {
            let offset = beacon.ts_ms as i64 - now_ms as i64;
            self.last_stale = Some((beacon, offset));
            return Err(Rejection::Stale);
        }
        self.seen.retain(|_, ts| ts.abs_diff(now_ms) <= MAX_SKEW_MS);
        if self.seen.len() >= MAX_NONCES {
            // Only authentic senders get here; still, never grow without bound.
            self.seen.clear();
        }
        let key = format!("{}/{}", beacon.node.id, beacon.nonce);
        if self.seen.insert(key, beacon.ts_ms).is_some() {
            return Err(Rejection::Replay);
        }
        Ok(beacon)
    }
}

/// Most addresses a beacon may list.
pub const MAX_ADDRESSES: usize = 8;
/// Most disks a beacon may offer to Ceph.
pub const MAX_CEPH_DEVICES: usize = 64;
/// Longest id, uid, nonce or device path accepted.
const MAX_FIELD: usize = 255;

/// Checks what an authentic beacon says before anything acts on it: a secret holder's broken
/// or hostile agent must not put a name into `/etc/hosts` or a device into the `CephCluster`
/// that is not one. The first address must be where the datagram came from (peers are reached
/// there; only a link-local source may be a later address the node lists, while it moves
/// from link-local to its lease), the hostname an RFC 1123 name, Ceph devices `/dev/disk/by-id/` paths, and every list
/// bounded. Returns what is wrong, in words.
pub fn validate(b: &Beacon, from: IpAddr) -> Result<(), String> {
    let short = |s: &str| s.chars().take(64).collect::<String>();
    if !is_hostname(&b.hostname) {
        return Err(format!("hostname {:?} is not an RFC 1123 name", short(&b.hostname)));
    }
    if !is_token(&b.node.id) {
        return Err(format!("node id {:?} is not a machine id", short(&b.node.id)));
    }
    if b.nonce.len() > MAX_FIELD {
        return Err("nonce too long".into());
    }
    if let Some(uid) = b.node.allegiance.uid() {
        if !is_token(uid) {
            return Err(format!("cluster uid {:?} is not one", short(uid)));
        }
    }
    if b.addresses.is_empty() || b.addresses.len() > MAX_ADDRESSES {
        return Err(format!("{} addresses (1 to {MAX_ADDRESSES} expected)", b.addresses.len()));
    }
    let mut parsed = Vec::with_capacity(b.addresses.len());
    for a in &b.addresses {
        parsed.push(a.parse::<IpAddr>().map_err(|_| format!("address {:?} is not an IP address", short(a)))?);
    }
    let from = match from {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    // A node lists its addresses on the LAN, the one to reach it at first, and sends from
    // it; only while it moves from link-local to its lease may it send from its link-local
    // address instead.
    let from_ll = matches!(from, IpAddr::V4(v4) if v4.is_link_local());
    if parsed[0] != from && !(from_ll && parsed.contains(&from)) {
        return Err(format!("claims address {} but was sent from {from}", parsed[0]));
    }
    if b.port == 0 {
        return Err("port 0".into());
    }
    if let Some(cidr) = &b.pod_cidr {
        if cidr.len() > MAX_FIELD || crate::cluster::podnet::parse_cidr(cidr).is_err() {
            return Err(format!("pod CIDR {:?} is not an IPv4 CIDR", short(cidr)));
        }
    }
    if b.disks.ceph.len() > MAX_CEPH_DEVICES {
        return Err(format!("offers {} disks to Ceph (at most {MAX_CEPH_DEVICES})", b.disks.ceph.len()));
    }
    for d in &b.disks.ceph {
        let ok = d.len() <= MAX_FIELD
            && d.strip_prefix("/dev/disk/by-id/").is_some_and(|rest| {
                !rest.is_empty()
                    && rest != "."
                    && rest != ".."
                    && rest.bytes().all(|c| c.is_ascii_graphic() && c != b'/' && c != b'\\')
            });
        if !ok {
            return Err(format!("Ceph device {:?} is not a /dev/disk/by-id/ path", short(d)));
        }
    }
    Ok(())
}

/// An RFC 1123 host name as Kubernetes takes node names: lowercase labels of letters, digits
/// and inner hyphens, dot-separated, at most 253 characters.
pub fn is_hostname(h: &str) -> bool {
    h.len() <= 253
        && !h.is_empty()
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        })
}

/// An id or uid: letters, digits, `-` and `_`, bounded.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::election::{Allegiance, RolePolicy};

    fn beacon(id: &str, ts: u64, nonce: &str) -> Beacon {
        Beacon {
            node: NodeView {
                id: id.into(),
                priority: u32::MAX,
                policy: RolePolicy::Auto,
                allegiance: Allegiance::None,
            },
            hostname: "h".into(),
            addresses: vec!["10.0.0.2".into()],
            term: 1,
            disks: DiskSummary { count: 2, total_bytes: 1 << 40, ceph: vec![] },
            port: 9743,
            pod_cidr: None,
            ts_ms: ts,
            nonce: nonce.into(),
        }
    }

    fn secret(b: u8) -> Secret {
        Secret::from_bytes([b; 32])
    }

    #[test]
    fn authentic_beacons_pass_once() {
        let mut v = Verifier::new(secret(1), "me");
        let wire = encode(&beacon("peer", 1_000_000, "n1"), &secret(1));
        assert_eq!(v.check(&wire, 1_000_500).unwrap().node.id, "peer");
        assert_eq!(v.check(&wire, 1_000_600), Err(Rejection::Replay));
    }

    #[test]
    fn forged_stale_own_and_garbage_are_dropped() {
        let mut v = Verifier::new(secret(1), "me");
        assert_eq!(v.check(&encode(&beacon("rogue", 1_000_000, "n"), &secret(2)), 1_000_000), Err(Rejection::BadMac));
        assert_eq!(
            v.check(&encode(&beacon("peer", 1_000_000, "n"), &secret(1)), 1_000_000 + MAX_SKEW_MS + 1),
            Err(Rejection::Stale)
        );
        // An authentic stale beacon tells how far the clocks are apart.
        let (b, offset) = v.last_stale.clone().expect("the stale beacon kept");
        assert_eq!((b.node.id.as_str(), offset), ("peer", -(MAX_SKEW_MS as i64) - 1));
        assert_eq!(v.check(&encode(&beacon("me", 1_000_000, "n"), &secret(1)), 1_000_000), Err(Rejection::Own));
        assert_eq!(v.check(b"hello", 0), Err(Rejection::Malformed));
        assert_eq!(v.check(&[0u8; 9000], 0), Err(Rejection::Malformed));
        let mut tampered = encode(&beacon("peer", 1_000_000, "n"), &secret(1));
        let last = tampered.len() - 2;
        tampered[last] ^= 1;
        assert_eq!(v.check(&tampered, 1_000_000), Err(Rejection::BadMac));
    }

    #[rstest::rstest]
    #[case::good(|_: &mut Beacon| {}, None)]
    #[case::hostname_with_newline(|b: &mut Beacon| b.hostname = "lab\n10.0.0.66 evil".into(), Some("RFC 1123"))]
    #[case::hostname_upper(|b: &mut Beacon| b.hostname = "Lab-1".into(), Some("RFC 1123"))]
    #[case::hostname_dash(|b: &mut Beacon| b.hostname = "-lab".into(), Some("RFC 1123"))]
    #[case::hostname_long(|b: &mut Beacon| b.hostname = "a".repeat(64), Some("RFC 1123"))]
    #[case::fqdn(|b: &mut Beacon| b.hostname = "pc-1.lab.example".into(), None)]
    #[case::id_path(|b: &mut Beacon| b.node.id = "../x".into(), Some("machine id"))]
    #[case::no_address(|b: &mut Beacon| b.addresses.clear(), Some("addresses"))]
    #[case::too_many_addresses(|b: &mut Beacon| b.addresses = vec!["10.0.0.2".into(); 9], Some("addresses"))]
    #[case::other_address(|b: &mut Beacon| b.addresses = vec!["10.0.0.66".into()], Some("sent from 10.0.0.2"))]
    #[case::not_an_address(|b: &mut Beacon| b.addresses = vec!["lab-api".into()], Some("not an IP"))]
    #[case::port_zero(|b: &mut Beacon| b.port = 0, Some("port 0"))]
    #[case::ceph_by_id(|b: &mut Beacon| b.disks.ceph = vec!["/dev/disk/by-id/wwn-0x5000".into()], None)]
    #[case::ceph_kernel_name(|b: &mut Beacon| b.disks.ceph = vec!["/dev/sda".into()], Some("by-id"))]
    #[case::ceph_traversal(|b: &mut Beacon| b.disks.ceph = vec!["/dev/disk/by-id/../../sda".into()], Some("by-id"))]
    #[case::ceph_space(|b: &mut Beacon| b.disks.ceph = vec!["/dev/disk/by-id/a b".into()], Some("by-id"))]
    #[case::ceph_many(|b: &mut Beacon| b.disks.ceph = vec!["/dev/disk/by-id/x".into(); 65], Some("at most"))]
    #[case::pod_cidr(|b: &mut Beacon| b.pod_cidr = Some("10.244.1.0/24".into()), None)]
    #[case::pod_cidr_host_bits(|b: &mut Beacon| b.pod_cidr = Some("10.244.1.7/24".into()), Some("pod CIDR"))]
    #[case::pod_cidr_injection(|b: &mut Beacon| b.pod_cidr = Some("10.0.0.0/8 dev lo".into()), Some("pod CIDR"))]
    #[case::uid_injection(
        |b: &mut Beacon| b.node.allegiance = Allegiance::Master { uid: "u\"}".into(), committed: true },
        Some("cluster uid")
    )]
    fn beacon_fields_are_validated(#[case] change: fn(&mut Beacon), #[case] error: Option<&str>) {
        let mut b = beacon("0123456789abcdef0123456789abcdef", 1, "n");
        b.hostname = "labforge-a1b2c3".into();
        change(&mut b);
        let got = validate(&b, "10.0.0.2".parse().unwrap());
        match error {
            None => assert_eq!(got, Ok(())),
            Some(words) => assert!(got.as_ref().is_err_and(|e| e.contains(words)), "{got:?} should say {words:?}"),
        }
    }

    #[test]
    fn only_a_link_local_source_may_be_a_later_address() {
        let mut b = beacon("peer", 1, "n");
        b.addresses = vec!["10.83.0.7".into(), "169.254.3.4".into()];
        assert_eq!(validate(&b, "169.254.3.4".parse().unwrap()), Ok(()), "moving from link-local to its lease");
        assert_eq!(validate(&b, "10.83.0.7".parse().unwrap()), Ok(()));
        b.addresses = vec!["10.83.0.7".into(), "10.0.0.2".into()];
        let got = validate(&b, "10.0.0.2".parse().unwrap());
        assert!(got.is_err_and(|e| e.contains("claims address 10.83.0.7")), "a listed address is not enough");
    }

    #[test]
    fn an_ipv4_mapped_source_is_the_ipv4_address() {
        let b = beacon("peer", 1, "n");
        assert_eq!(validate(&b, "::ffff:10.0.0.2".parse().unwrap()), Ok(()));
    }
}
