//! The status server under a flood, on loopback: one address holding 2,000 idle connections,
//! oversize and malformed bodies on every route, and a client that never sends a request. The
//! agent keeps answering `/status` for everyone else within a second.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use labforge_agent::report::Report;
use labforge_agent::server::{serve_on, Endpoints, Limits};
use labforge_agent::status::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

fn status() -> Status {
    serde_json::from_value(serde_json::json!({
        "agent_version": "0", "image": "demo", "node_id": "flood-test-node", "phase": "ready", "role": "master",
        "cluster_uid": null, "lan_address": null, "master_address": null, "kubernetes": "disabled",
        "join_info_sha256": null, "message": "", "peers": [],
        "node": {"machine_id": "flood-test-node", "hostname": "h", "nics": [], "disks": []},
        "state": {"dir": "/var/lib/labforge", "size_bytes": 1}
    }))
    .expect("a minimal status")
}

async fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{source}:0").parse().unwrap())?;
    s.connect(to).await
}

/// Sends `request` from `source` and returns the whole answer (the server closes after it).
async fn ask(source: &str, to: SocketAddr, request: &[u8]) -> String {
    let mut s = connect_from(source, to).await.expect("connecting");
    // The server may answer and close before an oversize body is all sent: what it said counts.
    let _ = s.write_all(request).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

async fn status_within_a_second(to: SocketAddr) {
    let t = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(1),
        ask("127.0.0.1", to, b"GET /status HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"),
    )
    .await
    .expect("/status answered within a second");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("flood-test-node"), "{answer}");
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_keeps_answering_through_a_flood() {
    // The test itself holds 2,000 sockets.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard.min(8192), hard).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_join_tx, join_rx) = watch::channel(None);
    let (_pxe_tx, pxe_rx) = watch::channel(None);
    let endpoints = Arc::new(Endpoints {
        report: Report::new(status()),
        secret: Default::default(),
        join_info: join_rx,
        join_server: Default::default(),
        pxe: pxe_rx,
        rejections: Default::default(),
        enrol: None,
    });
    let limits = Limits { header_timeout: Duration::from_secs(2), ..Limits::default() };
    tokio::spawn(serve_on(listener, endpoints, limits));
    status_within_a_second(addr).await;

    // One address opens 2,000 connections and sends nothing on them.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        if let Ok(s) = connect_from("127.0.0.2", addr).await {
            idle.push(s);
        }
    }
    assert!(idle.len() > 1000, "the flood got its connections in: {}", idle.len());
    status_within_a_second(addr).await;

    // Oversize and malformed bodies, on every route.
    let big = vec![b'x'; 1 << 20];
    for route in [
        "/join-info",
        "/status",
        "/metrics",
        "/pxe/boot.ipxe",
        "/pxe/enrol",
        "/pxe/enrol/admin",
        "/pxe/preload/blobs/sha256/00",
    ] {
        let mut req = format!(
            "POST {route} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            big.len()
        )
        .into_bytes();
        req.extend_from_slice(&big);
        let answer = ask("127.0.0.3", addr, &req).await;
        assert!(answer.starts_with("HTTP/1.1 4"), "{route}: {}", answer.lines().next().unwrap_or(""));
    }
    let answer = ask(
        "127.0.0.3",
        addr,
        b"POST /join-info HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{\"node\":\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{}", answer.lines().next().unwrap_or(""));
    let garbage = ask("127.0.0.3", addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n").await;
    assert!(!garbage.starts_with("HTTP/1.1 2"), "{garbage}");
    status_within_a_second(addr).await;

    // A client that connects and never sends a request is dropped after the header timeout.
    let mut silent = connect_from("127.0.0.4", addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the server closed the silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    drop(idle);
    status_within_a_second(addr).await;
}
