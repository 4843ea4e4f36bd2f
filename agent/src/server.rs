//! The agent's HTTP endpoints on the status port (9743): `GET /status` and `GET /metrics` for
//! anyone, `POST /join-info` for holders of the cluster secret, and `/pxe/…` to the cluster
//! LAN while this node serves netboot.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{ConnectInfo, State};
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
    pub secret: Option<Secret>,
    /// Join info to hand out (set on the master once minted).
    pub join_info: watch::Receiver<Option<JoinInfo>>,
    pub join_server: join::Server,
    /// Set while this node serves netboot.
    pub pxe: watch::Receiver<Option<Serving>>,
}

pub fn router(shared: Arc<Endpoints>) -> Router {
    Router::new()
        .route("/status", get(|State(s): State<Arc<Endpoints>>| async move { Json(s.report.snapshot()) }))
        .route("/metrics", get(|State(s): State<Arc<Endpoints>>| async move { s.report.snapshot().metrics() }))
        .route("/join-info", post(join_info))
        .route("/pxe/:file", get(pxe_file))
        .route("/pxe/preload/blobs/sha256/:hex", get(preload_blob))
        .with_state(shared)
}

async fn join_info(
    State(s): State<Arc<Endpoints>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(req): Json<join::Request>,
) -> Result<Json<join::Response>, (StatusCode, String)> {
    let Some(secret) = &s.secret else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "this node has no cluster secret".into()));
    };
    let Some(info) = s.join_info.borrow().clone() else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "this node has no join info (not a ready master)".into()));
    };
    match s.join_server.answer(secret, &req, &info, crate::sys::clock::now_ms()) {
        Ok(resp) => {
            s.report.tally().join_served.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, node = %req.node, "served join info");
            Ok(Json(resp))
        }
        Err(e) => {
            s.report.tally().join_rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, node = %req.node, "rejected join-info request: {e:#}");
            Err((StatusCode::FORBIDDEN, "rejected".into()))
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
        return crate::pxe::boot_script(&format!("http://{host}/pxe"), &serving.image).into_response();
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
        tracing::warn!(%peer, "refused a netboot request from outside the cluster LAN");
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

/// Serves the status and join endpoints until the future is dropped.
pub async fn serve(addr: SocketAddr, shared: Arc<Endpoints>) -> Result<()> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding status endpoint on {addr}"))?;
    axum::serve(listener, router(shared).into_make_service_with_connect_info::<SocketAddr>())
        .await
        .context("serving status endpoint")
}
