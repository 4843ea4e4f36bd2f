//! The agent's HTTP endpoints on the status port (9743): `GET /status` and `GET /metrics` for
//! anyone, `POST /join-info` for holders of the cluster secret, and `/pxe/…` to the cluster
//! LAN while this node serves netboot.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::watch;

use crate::cluster::join::{self, JoinInfo};
use crate::pxe::Serving;
use crate::report::Report;
use crate::secret::Secret;

/// What the endpoints read: the status, the secret, and what the cluster and netboot tasks
/// publish.
pub struct Endpoints {
    pub report: Report,
    /// The cluster secret: set at start, or once a netbooted node is enrolled.
    pub secret: std::sync::OnceLock<Secret>,
    /// Join info to hand out (set on the master once minted).
    pub join_info: watch::Receiver<Option<JoinInfo>>,
    pub join_server: join::Server,
    /// Set while this node serves netboot.
    pub pxe: watch::Receiver<Option<Serving>>,
    /// Rejected requests are logged at most this often.
    pub rejections: Throttle,
    /// The enrolment desk (a node with a secret and `[pxe] serve`).
    pub enrol: Option<crate::pxe::enrol::Desk>,
}

pub fn router(shared: Arc<Endpoints>) -> Router {
    Router::new()
        .route("/status", get(|State(s): State<Arc<Endpoints>>| async move { Json(s.report.snapshot()) }))
        .route("/metrics", get(|State(s): State<Arc<Endpoints>>| async move { s.report.snapshot().metrics() }))
        .route("/sd/nodes", get(sd_nodes_route))
        .route("/join-info", post(join_info))
        .route("/pxe/:file", get(pxe_file))
        .route("/pxe/enrol", post(enrol))
        .route("/pxe/enrol/admin", post(enrol_admin))
        .route("/pxe/preload/blobs/sha256/:hex", get(preload_blob))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

async fn join_info(
    State(s): State<Arc<Endpoints>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<join::Request>,
) -> Result<Json<join::Response>, (StatusCode, String)> {
    let Some(secret) = s.secret.get() else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "this node has no cluster secret".into()));
    };
    let Some(info) = s.join_info.borrow().clone() else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "this node has no join info (not a ready master)".into()));
    };
    match s.join_server.answer(secret, &req, &info, crate::sys::clock::now_ms()) {
        Ok(resp) => {
            s.report.tally().join_served.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, node = %loggable(&req.node), "served join info");
            Ok(Json(resp))
        }
        Err(e) => {
            s.report.tally().join_rejected.fetch_add(1, Ordering::Relaxed);
            if s.rejections.allow() {
                tracing::warn!(%peer, node = %loggable(&req.node), "rejected join-info request: {e:#}");
            }
            Err((StatusCode::FORBIDDEN, "rejected".into()))
        }
    }
}

/// A netbooted node asks for the cluster secret: answered by the enrolment policy, to
/// clients on the cluster LAN while this node serves netboot.
async fn enrol(
    State(s): State<Arc<Endpoints>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<crate::pxe::enrol::Request>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Err(refused) = netboot_client(&s, peer) {
        return *refused;
    }
    let (Some(secret), Some(desk)) = (s.secret.get(), &s.enrol) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "this node does not enrol netbooted nodes\n").into_response();
    };
    Json(desk.request(secret, &req, peer.ip(), crate::sys::clock::now_secs())).into_response()
}

/// An admin opens the enrolment window or approves a node (signed with the cluster secret).
async fn enrol_admin(
    State(s): State<Arc<Endpoints>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<crate::pxe::enrol::AdminRequest>,
) -> Result<String, (StatusCode, String)> {
    let (Some(secret), Some(desk)) = (s.secret.get(), &s.enrol) else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "this node does not enrol netbooted nodes".into()));
    };
    match desk.admin(secret, &req, crate::sys::clock::now_ms()) {
        Ok(said) => Ok(format!("{said}\n")),
        Err(e) => {
            if s.rejections.allow() {
                tracing::warn!(%peer, "rejected an enrolment admin request: {e:#}");
            }
            Err((StatusCode::FORBIDDEN, format!("{e:#}")))
        }
    }
}

/// Netboot artifacts, to clients on the cluster LAN while this node serves netboot;
/// `boot.ipxe` is made for the address the client reached us at.
async fn pxe_file(
    State(s): State<Arc<Endpoints>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    axum::extract::Path(file): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let serving = match netboot_client(&s, peer) {
        Ok(serving) => serving,
        Err(refused) => return *refused,
    };
    if !crate::pxe::safe_name(&file) {
        return (StatusCode::NOT_FOUND, "no such file\n").into_response();
    }
    s.report.tally().pxe_served.fetch_add(1, Ordering::Relaxed);
    if file == "boot.ipxe" {
        let host = headers.get(axum::http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default().to_string();
        tracing::info!(%peer, "serving the netboot script");
        let key = s.secret.get().map(crate::pxe::enrol::master_public_hex);
        return crate::pxe::boot_script(&format!("http://{host}/pxe"), &serving.image, key.as_deref()).into_response();
    }
    tracing::info!(%peer, file = %file, "serving a netboot file");
    serve_file(&serving.dir.join(&file)).await
}

/// The blobs of the preloaded images, to netbooted nodes on the cluster LAN: their squashfs
/// carries the layout's index, and they fetch the blobs it names (and check each digest).
async fn preload_blob(
    State(s): State<Arc<Endpoints>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    axum::extract::Path(hex): axum::extract::Path<String>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Err(refused) = netboot_client(&s, peer) {
        return *refused;
    }
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return (StatusCode::NOT_FOUND, "no such blob\n").into_response();
    }
    s.report.tally().preload_served.fetch_add(1, Ordering::Relaxed);
    serve_file(&std::path::Path::new(crate::preload::LAYOUT_DIR).join("blobs/sha256").join(&hex)).await
}

/// What this node serves to `peer` under `/pxe/`, or the refusal: nothing while it does not
/// serve netboot, and nothing to addresses outside the cluster LAN.
fn netboot_client(s: &Endpoints, peer: SocketAddr) -> Result<crate::pxe::Serving, Box<axum::response::Response>> {
    use axum::response::IntoResponse;
    let serving = s.pxe.borrow().clone();
    let Some(serving) = serving else {
        return Err(Box::new((StatusCode::NOT_FOUND, "this node does not serve netboot\n").into_response()));
    };
    if !serving.allows(peer.ip()) {
        if s.rejections.allow() {
            tracing::warn!(%peer, "refused a netboot request from outside the cluster LAN");
        }
        return Err(Box::new((StatusCode::FORBIDDEN, "netboot is served to the cluster LAN only\n").into_response()));
    }
    Ok(serving)
}

/// A file as the body, streamed, with its length.
async fn serve_file(path: &std::path::Path) -> axum::response::Response {
    use axum::response::IntoResponse;
    let f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(_) => return (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    };
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20));
    ([(axum::http::header::CONTENT_LENGTH, len.to_string())], body).into_response()
}

/// What one client, and all of them together, may hold of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub connections: usize,
    /// Connections open at once from one address.
    pub per_address: usize,
    /// A client has this long to send a request's headers; an idle keep-alive connection is
    /// closed after it too.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { connections: 512, per_address: 32, header_timeout: Duration::from_secs(10) }
    }
}

/// Largest request body any route reads (a join request is a few hundred bytes).
pub const MAX_BODY: usize = 4096;

/// Serves the endpoints on `addr` until the future is dropped.
pub async fn serve(addr: SocketAddr, shared: Arc<Endpoints>) -> Result<()> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding status endpoint on {addr}"))?;
    serve_on(listener, shared, Limits::default()).await
}

/// The portal on port 80 (`portal`): one page, under the same connection limits. A node where
/// port 80 is taken goes on without it (the status port still answers).
pub async fn serve_portal(addr: SocketAddr, shared: Arc<Endpoints>) -> Result<()> {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("the portal cannot listen on {addr}: {e}; it is not served");
            return Ok(());
        }
    };
    let app = Router::new()
        .route(
            "/",
            get(|State(s): State<Arc<Endpoints>>, headers: axum::http::HeaderMap| async move {
                let status = s.report.snapshot();
                let fallback = status.lan_address.clone().unwrap_or_default();
                let host = crate::portal::link_host(
                    headers.get(axum::http::header::HOST).and_then(|h| h.to_str().ok()),
                    &fallback,
                );
                axum::response::Html(crate::portal::page(&status, &host))
            }),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared);
    serve_app(listener, app, Limits::default()).await
}

/// Serves the endpoints on `listener` within `limits`: a client past its share is disconnected
/// at once, slow and idle clients are dropped after the header timeout, and a full file
/// descriptor table pauses accepting instead of spinning.
pub async fn serve_on(listener: tokio::net::TcpListener, shared: Arc<Endpoints>, limits: Limits) -> Result<()> {
    serve_app(listener, router(shared), limits).await
}

async fn serve_app(listener: tokio::net::TcpListener, app: Router, limits: Limits) -> Result<()> {
    let gate = Arc::new(Gate { limits, open: Mutex::new((0, HashMap::new())) });
    let refused = Throttle::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                if refused.allow() {
                    tracing::warn!("accepting a connection on the status port: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(ticket) = Gate::admit(&gate, peer.ip()) else {
            if refused.allow() {
                tracing::warn!(%peer, "refused a connection: too many open (from this address or in all)");
            }
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _ticket = ticket;
            let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                tower::ServiceExt::oneshot(app.clone(), req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

/// Counts open connections, in all and per address.
struct Gate {
    limits: Limits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it frees its place.
struct Ticket {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Gate {
    fn admit(gate: &Arc<Gate>, ip: IpAddr) -> Option<Ticket> {
        let mut open = gate.open.lock().unwrap_or_else(|e| e.into_inner());
        let from = open.1.get(&ip).copied().unwrap_or(0);
        if open.0 >= gate.limits.connections || from >= gate.limits.per_address {
            return None;
        }
        open.0 += 1;
        open.1.insert(ip, from + 1);
        Some(Ticket { gate: gate.clone(), ip })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// Lets a log line through at most once every ten seconds: what a flood makes the agent say
/// must not flood the journal.
#[derive(Default)]
pub struct Throttle {
    last: Mutex<Option<Instant>>,
}

impl Throttle {
    pub fn allow(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// A peer-supplied string fit for one log line: at most 64 characters, control characters
/// escaped.
fn loggable(s: &str) -> String {
    s.chars().take(64).collect::<String>().escape_debug().to_string()
}

/// While the API server does not answer, 503: Prometheus then keeps the targets it had (an
/// empty list would drop every node just when one may be down).
async fn sd_nodes_route(State(s): State<Arc<Endpoints>>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = s.report.snapshot();
    let answering = status.kube_api.as_ref().is_some_and(|k| k.state == crate::cluster::api::ApiState::Answering);
    if !answering {
        return (StatusCode::SERVICE_UNAVAILABLE, "the API server is not answering; no node list\n").into_response();
    }
    Json(sd_nodes(&status)).into_response()
}

/// `GET /sd/nodes`: the cluster's nodes as the master's API server lists them, in Prometheus's
/// HTTP service discovery format (`[{"targets": ["<address>"], "labels": {"node": "<name>"}}]`):
/// the monitoring component scrapes each node's kubelet, node-exporter and agent through it, so
/// a node that goes away stays a target and shows as down. Names and LAN addresses only, which
/// every beacon carries anyway; empty on a node that is not the master.
pub fn sd_nodes(s: &crate::status::Status) -> serde_json::Value {
    let nodes = s.kube_api.as_ref().map(|k| k.nodes.as_slice()).unwrap_or_default();
    serde_json::Value::Array(
        nodes
            .iter()
            .filter_map(|n| {
                let addr = n.address.as_deref()?;
                Some(serde_json::json!({"targets": [addr], "labels": {"node": n.name}}))
            })
            .collect(),
    )
}

#[cfg(test)]
mod sd_tests {
    use crate::cluster::api::{ApiState, KubeApi, NodeSeen};
    use crate::status::Status;

    #[test]
    fn service_discovery_lists_nodes_with_an_address() {
        let mut s = Status::minimal("img", "id");
        assert_eq!(super::sd_nodes(&s), serde_json::json!([]), "no API server view: no targets");
        let node = |name: &str, addr: Option<&str>| NodeSeen {
            name: name.into(),
            ready: false,
            pod_cidr: None,
            address: addr.map(str::to_string),
        };
        s.kube_api = Some(KubeApi {
            state: ApiState::Answering,
            version: None,
            node_ready: Some(true),
            pod_cidr: None,
            nodes: vec![node("lab-a", Some("10.0.0.2")), node("lab-b", None)],
            control_plane: vec![],
            message: String::new(),
        });
        assert_eq!(
            super::sd_nodes(&s),
            serde_json::json!([{"targets": ["10.0.0.2"], "labels": {"node": "lab-a"}}]),
            "a node down stays a target (Ready or not); one without an address cannot be one"
        );
    }
}
