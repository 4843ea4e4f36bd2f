//! Beacon wire format: `LFB1` + HMAC-SHA256(secret, json) + json. The JSON carries a
//! millisecond timestamp and a random nonce; stale, future and replayed beacons are dropped.

use std::collections::HashMap;

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
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::BadMac => "bad_mac",
            Rejection::Stale => "stale",
            Rejection::Replay => "replay",
            Rejection::Own => "own",
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
}

impl Verifier {
    pub fn new(secret: Secret, own_id: &str) -> Self {
        Verifier { secret, own_id: own_id.to_string(), seen: HashMap::new() }
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
        assert_eq!(v.check(&encode(&beacon("me", 1_000_000, "n"), &secret(1)), 1_000_000), Err(Rejection::Own));
        assert_eq!(v.check(b"hello", 0), Err(Rejection::Malformed));
        assert_eq!(v.check(&[0u8; 9000], 0), Err(Rejection::Malformed));
        let mut tampered = encode(&beacon("peer", 1_000_000, "n"), &secret(1));
        let last = tampered.len() - 2;
        tampered[last] ^= 1;
        assert_eq!(v.check(&tampered, 1_000_000), Err(Rejection::BadMac));
    }
}
