//! Discovery on real sockets (loopback only): authentic beacons get through a flood of garbage
//! and forged datagrams, which are dropped and counted.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use labforge_agent::cluster::discovery::beacon::{encode, Beacon, DiskSummary};
use labforge_agent::cluster::discovery::net::{self, Counters, Peers};
use labforge_agent::cluster::discovery::Verifier;
use labforge_agent::cluster::election::{Allegiance, NodeView, RolePolicy};
use labforge_agent::secret::Secret;

fn beacon(id: &str, nonce: &str) -> Beacon {
    Beacon {
        node: NodeView { id: id.into(), priority: u32::MAX, policy: RolePolicy::Auto, allegiance: Allegiance::None },
        hostname: id.into(),
        addresses: vec!["127.0.0.1".into()],
        term: 1,
        disks: DiskSummary::default(),
        port: 9743,
        pod_cidr: None,
        ts_ms: labforge_agent::sys::clock::now_ms(),
        nonce: nonce.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentic_beacons_get_through_a_flood() {
    let secret = Secret::from_bytes([3; 32]);
    let sock = Arc::new(net::bind(SocketAddr::from(([127, 0, 0, 1], 0)), None).unwrap());
    let addr = sock.local_addr().unwrap();
    let peers: Peers = Default::default();
    let counters = Arc::new(Counters::default());
    tokio::spawn(net::receive(sock, Verifier::new(secret.clone(), "me"), peers.clone(), counters.clone()));

    let sender = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let rogue = Secret::from_bytes([4; 32]);
    // A bounded flood: garbage, forged beacons, one replay.
    for i in 0..3000u32 {
        sender.send_to(&i.to_le_bytes().repeat(50), addr).await.unwrap();
        sender.send_to(&encode(&beacon(&format!("rogue{i}"), &i.to_string()), &rogue), addr).await.unwrap();
    }
    // The agent sends a fresh beacon every second; here every 20 ms, until one is taken in.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut sent = 0;
    while !peers.lock().unwrap().contains_key("peer") {
        assert!(sent < 500, "no authentic beacon got through");
        tick.tick().await;
        sender.send_to(&encode(&beacon("peer", &format!("good{sent}")), &secret), addr).await.unwrap();
        sent += 1;
    }
    // A captured beacon sent again is a replay.
    let captured = encode(&beacon("peer", "captured"), &secret);
    sender.send_to(&captured, addr).await.unwrap();
    let mut tries = 0;
    while counters.replay.load(Ordering::Relaxed) == 0 {
        assert!(tries < 500, "replay not counted");
        tick.tick().await;
        sender.send_to(&captured, addr).await.unwrap();
        tries += 1;
    }
    let view: Vec<String> = peers.lock().unwrap().keys().cloned().collect();
    assert_eq!(view, vec!["peer".to_string()], "forged senders never enter the view");
    assert!(counters.received.load(Ordering::Relaxed) >= 1);
    assert!(counters.malformed.load(Ordering::Relaxed) > 0);
    assert!(counters.bad_mac.load(Ordering::Relaxed) > 0);
    // UDP may drop some of the flood under load; every datagram that arrived was counted.
    let counted = counters.malformed.load(Ordering::Relaxed) + counters.bad_mac.load(Ordering::Relaxed);
    assert!(counted <= 6000);
}
