//! Beacons on the wire: one UDP socket bound to the LAN interface, a sender that broadcasts
//! this node's beacon every interval, a receiver that verifies datagrams and keeps the peers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sys::clock::now_ms;

use anyhow::{Context, Result};
use tokio::net::UdpSocket;

use super::beacon::{encode, validate, Beacon, Rejection, Verifier, MAX_DATAGRAM};
use crate::cluster::election::Allegiance;
use crate::secret::Secret;

/// Counters exported on /metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub malformed: AtomicU64,
    pub bad_mac: AtomicU64,
    pub stale: AtomicU64,
    pub replay: AtomicU64,
    /// Authentic, but its content failed validation.
    pub invalid: AtomicU64,
    pub sent: AtomicU64,
    /// The last authentic beacon whose clock was outside the freshness window.
    pub skew: Mutex<Option<Skew>>,
}

/// An authentic peer whose clock differs from ours by more than the freshness window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skew {
    pub peer: String,
    /// Their clock minus ours, in ms.
    pub offset_ms: i64,
    pub heard: Instant,
    /// Where a committed master is (one that says where consistently), if one was heard
    /// among the stale beacons in the last [`Skew::MASTER_KEPT`]: a node that hears no one
    /// else takes its time from there.
    pub committed_master: Option<std::net::Ipv4Addr>,
    pub master_heard: Option<Instant>,
}

impl Skew {
    /// How long a committed master heard through a stale beacon is remembered while other
    /// peers' stale beacons arrive in between.
    pub const MASTER_KEPT: Duration = Duration::from_secs(60);

    /// The record after `next` was heard: the latest peer and offset, and the committed
    /// master from `next`, or else from `prev` if it was heard recently. (Followers' stale
    /// beacons outnumber the master's; forgetting the master at each of them made the time
    /// source flap between the master and nothing.)
    pub fn merge(prev: Option<&Skew>, mut next: Skew) -> Skew {
        if next.committed_master.is_none() {
            if let Some(p) =
                prev.filter(|p| p.master_heard.is_some_and(|t| next.heard.duration_since(t) < Self::MASTER_KEPT))
            {
                next.committed_master = p.committed_master;
                next.master_heard = p.master_heard;
            }
        }
        next
    }
}

impl Counters {
    fn reject(&self, r: Rejection) {
        let c = match r {
            Rejection::Malformed => &self.malformed,
            Rejection::BadMac => &self.bad_mac,
            Rejection::Stale => &self.stale,
            Rejection::Replay => &self.replay,
            Rejection::Invalid => &self.invalid,
            Rejection::Own => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A peer as last heard.
#[derive(Debug, Clone)]
pub struct Peer {
    pub beacon: Beacon,
    /// Where its beacon came from: the address to reach it at.
    pub from: IpAddr,
    pub heard: Instant,
}

pub type Peers = Arc<Mutex<HashMap<String, Peer>>>;

/// Binds the beacon socket: broadcast allowed, address shared (several agents in tests), and
/// tied to `interface` when given so beacons stay on the cluster LAN.
pub fn bind(addr: SocketAddr, interface: Option<&str>) -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).context("creating beacon socket")?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_broadcast(true)?;
    // Room for bursts: a flood of junk should not crowd out the beacons behind it.
    let _ = s.set_recv_buffer_size(1 << 20);
    if let Some(i) = interface {
        s.bind_device(Some(i.as_bytes())).with_context(|| format!("binding beacon socket to {i}"))?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into()).with_context(|| format!("binding beacon socket on {addr}"))?;
    UdpSocket::from_std(s.into()).context("registering beacon socket")
}

/// Receives beacons until the task is dropped.
pub async fn receive(sock: Arc<UdpSocket>, mut verifier: Verifier, peers: Peers, counters: Arc<Counters>) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut last_warn = Instant::now() - Duration::from_secs(60);
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else { continue };
        let checked = verifier.check(&buf[..n], now_ms()).and_then(|b| match validate(&b, from.ip()) {
            Ok(()) => Ok(b),
            Err(why) => {
                if last_warn.elapsed() >= Duration::from_secs(10) {
                    tracing::warn!(%from, "dropped an authentic beacon: {why}");
                    last_warn = Instant::now();
                }
                Err(Rejection::Invalid)
            }
        });
        match checked {
            Ok(b) => {
                counters.received.fetch_add(1, Ordering::Relaxed);
                let id = b.node.id.clone();
                peers
                    .lock()
                    .expect("peers lock")
                    .insert(id, Peer { beacon: b, from: from.ip(), heard: Instant::now() });
            }
            Err(r) => {
                counters.reject(r);
                if let (Rejection::Stale, Some((b, offset_ms))) = (r, verifier.last_stale.take()) {
                    let committed = matches!(b.node.allegiance, Allegiance::Master { committed: true, .. });
                    let committed_master = match from.ip() {
                        IpAddr::V4(ip) if committed && validate(&b, from.ip()).is_ok() => Some(ip),
                        _ => None,
                    };
                    let now = Instant::now();
                    let next = Skew {
                        peer: b.node.id.clone(),
                        offset_ms,
                        heard: now,
                        committed_master,
                        master_heard: committed_master.map(|_| now),
                    };
                    let mut skew = counters.skew.lock().unwrap_or_else(|e| e.into_inner());
                    *skew = Some(Skew::merge(skew.as_ref(), next));
                }
                // One line per 10 s at most: a flood must not flood the journal too.
                if r != Rejection::Own && last_warn.elapsed() >= Duration::from_secs(10) {
                    tracing::warn!(%from, reason = r.label(), "dropped a beacon");
                    last_warn = Instant::now();
                }
            }
        }
    }
}

/// Sends `beacon()` to `dest` every `interval` until the task is dropped.
pub async fn send(
    sock: Arc<UdpSocket>,
    dest: SocketAddr,
    secret: Secret,
    interval: Duration,
    counters: Arc<Counters>,
    beacon: impl Fn() -> Beacon,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let wire = encode(&beacon(), &secret);
        match sock.send_to(&wire, dest).await {
            Ok(_) => {
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(%dest, "sending beacon: {e}"),
        }
    }
}

/// Peers heard within `max_age`.
pub fn fresh(peers: &Peers, max_age: Duration) -> Vec<Peer> {
    let mut out: Vec<Peer> =
        peers.lock().expect("peers lock").values().filter(|p| p.heard.elapsed() <= max_age).cloned().collect();
    out.sort_by(|a, b| a.beacon.node.id.cmp(&b.beacon.node.id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_master_heard_stale_is_kept_across_followers_beacons() {
        let t0 = Instant::now();
        let m = std::net::Ipv4Addr::new(10, 77, 0, 5);
        let skew = |peer: &str, at: Duration, master: Option<std::net::Ipv4Addr>| Skew {
            peer: peer.into(),
            offset_ms: -600_000,
            heard: t0 + at,
            committed_master: master,
            master_heard: master.map(|_| t0 + at),
        };
        let first = Skew::merge(None, skew("master", Duration::ZERO, Some(m)));
        let then = Skew::merge(Some(&first), skew("follower", Duration::from_secs(2), None));
        assert_eq!((then.peer.as_str(), then.committed_master), ("follower", Some(m)));
        assert_eq!(then.master_heard, Some(t0), "the master's own hearing time is kept");
        let later = Skew::merge(Some(&then), skew("follower", Duration::from_secs(61), None));
        assert_eq!(later.committed_master, None, "a master not heard for a minute is forgotten");
        let other = std::net::Ipv4Addr::new(10, 77, 0, 6);
        let moved = Skew::merge(Some(&then), skew("master2", Duration::from_secs(3), Some(other)));
        assert_eq!(moved.committed_master, Some(other), "the latest committed master wins");
    }
}
