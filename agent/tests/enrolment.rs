//! Enrolment over the agent's real HTTP endpoints on loopback: the master's desk with each
//! policy, the node's own enrolment client, a stranger's requests, and an admin's signed
//! approval. The VM scenario `worker_netboots_from_master` does the same across a real LAN.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use labforge_agent::pxe::enrol::{self, AdminAction, AdminRequest, Answer, Desk, EnrolState, Request};
use labforge_agent::pxe::Serving;
use labforge_agent::pxe::{EnrolPolicy, PxeConfig};
use labforge_agent::report::Report;
use labforge_agent::secret::Secret;
use labforge_agent::server::{serve_on, Endpoints, Limits};
use labforge_agent::status::{Phase, Status};
use labforge_agent::sys::http::Client;
use tokio::sync::watch;

struct Master {
    addr: SocketAddr,
    report: Report,
    secret: Secret,
    _dir: tempfile::TempDir,
}

async fn master(pxe: PxeConfig) -> Master {
    let dir = tempfile::tempdir().unwrap();
    let secret = Secret::from_bytes([0x5a; 32]);
    let report = Report::new(Status::minimal("demo", "master"));
    let desk = Desk::new(pxe, report.clone(), dir.path());
    desk.leading("test-cluster", labforge_agent::sys::clock::now_secs());
    let (_join_tx, join_rx) = watch::channel(None);
    let serving = Serving {
        dir: dir.path().to_path_buf(),
        image: "demo".into(),
        network: Ipv4Addr::new(127, 0, 0, 0),
        netmask: Ipv4Addr::new(255, 0, 0, 0),
    };
    let (pxe_tx, pxe_rx) = watch::channel(Some(serving));
    std::mem::forget(pxe_tx);
    std::mem::forget(_join_tx);
    let s = std::sync::OnceLock::new();
    s.set(secret.clone()).unwrap();
    let endpoints = Arc::new(Endpoints {
        report: report.clone(),
        secret: s,
        join_info: join_rx,
        join_server: Default::default(),
        pxe: pxe_rx,
        rejections: Default::default(),
        enrol: Some(desk),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_on(listener, endpoints, Limits::default()));
    Master { addr, report, secret, _dir: dir }
}

fn who(mac: &str, host: &str) -> Request {
    Request {
        mac: mac.into(),
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        hostname: host.into(),
        key: String::new(),
    }
}

/// A stranger's request with a key of its own, straight to the endpoint.
async fn stranger(addr: SocketAddr, mac: &str) -> (Answer, String) {
    let url = format!("http://{addr}/pxe/enrol");
    let req = Request { key: hex::encode([0x11u8; 32]), ..who(mac, "laptop") };
    tokio::task::spawn_blocking(move || {
        let raw: serde_json::Value = Client::default().post_json(&url, &req).unwrap();
        (serde_json::from_value(raw.clone()).unwrap(), raw.to_string())
    })
    .await
    .unwrap()
}

/// The node's own client, with its key and secret files in `dir`.
fn node(m: &Master, mac: &str, dir: &std::path::Path) -> tokio::task::JoinHandle<Secret> {
    let cmdline = format!("boot=live labforge.enrol={}", enrol::master_public_hex(&m.secret));
    let report = Report::new(Status::minimal("demo", "node"));
    tokio::spawn(enrol::obtain(
        report,
        format!("http://{}/pxe", m.addr),
        cmdline,
        who(mac, "lab-02"),
        dir.join(format!("{mac}.secret")),
        dir.join(format!("{mac}.key")),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_mac_never_gets_the_secret() {
    let cfg = PxeConfig {
        serve: true,
        enrol: EnrolPolicy::Allowlist,
        enrol_allow: vec!["52:54:00:4c:00:02".into()],
        ..Default::default()
    };
    let m = master(cfg).await;
    let (answer, raw) = stranger(m.addr, "52:54:00:66:66:66").await;
    assert!(matches!(&answer, Answer::Denied { message } if message.contains("allowlist")), "{answer:?}");
    assert!(!raw.contains(&m.secret.to_hex()));
    // The listed node gets it, through its own client, and keeps it 0600.
    let dir = tempfile::tempdir().unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), node(&m, "52:54:00:4c:00:02", dir.path()))
        .await
        .expect("admitted within 20 s")
        .unwrap();
    assert_eq!(got.bytes(), m.secret.bytes());
    let file: PathBuf = dir.path().join("52:54:00:4c:00:02.secret");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    // Approving is not how an allowlist grows.
    let url = format!("http://{}/pxe/enrol/admin", m.addr);
    let req = AdminRequest::new(&m.secret, AdminAction::Approve { id: "52:54:00:66:66:66".into() }, now_ms());
    let e = tokio::task::spawn_blocking(move || Client::default().post_for_text(&url, &req)).await.unwrap();
    assert!(format!("{:#}", e.unwrap_err()).contains("enrol-allow"));
    let (answer, _) = stranger(m.addr, "52:54:00:66:66:66").await;
    assert!(matches!(answer, Answer::Denied { .. }));
    let s = m.report.snapshot().enrol.unwrap();
    assert_eq!((s.admitted, s.refused), (1, 2), "{s:?}");
    let states: Vec<(String, EnrolState)> = s.nodes.iter().map(|n| (n.mac.clone(), n.state)).collect();
    assert!(states.contains(&("52:54:00:66:66:66".into(), EnrolState::Denied)), "{states:?}");
}

fn now_ms() -> u64 {
    labforge_agent::sys::clock::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waits_until_an_admin_approves_it() {
    // A window of zero: closed from the start, as after its end.
    let cfg = PxeConfig { serve: true, enrol_window: "0s".into(), ..Default::default() };
    let m = master(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let waiting = node(&m, "52:54:00:4c:00:03", dir.path());
    let listed = async {
        loop {
            let e = m.report.snapshot().enrol.unwrap();
            if let Some(n) = e.nodes.iter().find(|n| n.mac == "52:54:00:4c:00:03") {
                break n.clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let pending = tokio::time::timeout(Duration::from_secs(20), listed).await.expect("the node asked within 20 s");
    assert_eq!(pending.state, EnrolState::Pending);
    let (answer, _) = stranger(m.addr, "52:54:00:66:66:66").await;
    assert!(matches!(answer, Answer::Pending { .. }), "{answer:?}");
    // An approval signed with another secret is refused; one signed with the cluster's works.
    let url = format!("http://{}/pxe/enrol/admin", m.addr);
    let forged = AdminRequest::new(
        &Secret::from_bytes([1; 32]),
        AdminAction::Approve { id: pending.fingerprint.clone() },
        now_ms(),
    );
    let u = url.clone();
    let e = tokio::task::spawn_blocking(move || Client::default().post_for_text(&u, &forged)).await.unwrap();
    assert!(format!("{:#}", e.unwrap_err()).contains("403"));
    let ok = AdminRequest::new(&m.secret, AdminAction::Approve { id: pending.fingerprint.clone() }, now_ms());
    let said = tokio::task::spawn_blocking(move || Client::default().post_for_text(&url, &ok)).await.unwrap().unwrap();
    assert_eq!(said, format!("approved key {}", pending.fingerprint));
    let got = tokio::time::timeout(Duration::from_secs(20), waiting).await.expect("admitted after approval").unwrap();
    assert_eq!(got.bytes(), m.secret.bytes());
    // The stranger is still waiting, even claiming the approved node's MAC: a key was approved.
    let (answer, _) = stranger(m.addr, "52:54:00:66:66:66").await;
    assert!(matches!(answer, Answer::Pending { .. }), "{answer:?}");
    let (answer, _) = stranger(m.addr, "52:54:00:4c:00:03").await;
    assert!(matches!(answer, Answer::Pending { .. }), "{answer:?}");
    // The boot script names the master's enrolment key and carries no secret.
    let url = format!("http://{}/pxe/boot.ipxe", m.addr);
    let script = tokio::task::spawn_blocking(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut Client::default().get(&url).unwrap().reader, &mut s).unwrap();
        s
    })
    .await
    .unwrap();
    assert!(script.contains(&format!("set labforge-enrol {}", enrol::master_public_hex(&m.secret))), "{script}");
    assert!(!script.contains(&m.secret.to_hex()));
    assert_ne!(m.report.snapshot().phase, Phase::Enrolling, "the master's own phase is untouched");
}
