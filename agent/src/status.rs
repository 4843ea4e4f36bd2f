//! The node's status: served on `GET /status` (JSON) and `GET /metrics` (Prometheus text), and
//! printed as one `labforge-status {json}` console line whenever it changes phase.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::inventory::Inventory;

/// Prefix of the console line tests and operators look for.
pub const CONSOLE_PREFIX: &str = "labforge-status ";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub agent_version: String,
    pub image: String,
    /// What the agent is doing: `starting`, then `inventoried`.
    pub phase: String,
    pub node: Inventory,
    pub state: StateVolume,
}

/// The state partition as mounted on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateVolume {
    pub dir: String,
    /// Filesystem size; grows to fill the disk on first boot.
    pub size_bytes: u64,
}

impl Status {
    pub fn console_line(&self) -> String {
        format!("{CONSOLE_PREFIX}{}", serde_json::to_string(self).expect("status serialises"))
    }

    /// Prints the console line on stdout, which the unit sends to the journal and the console.
    pub fn announce(&self) {
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop the agent; the journal still has the log lines.
        let _ = writeln!(out, "{}", self.console_line());
        let _ = out.flush();
    }

    pub fn metrics(&self) -> String {
        let up = self.node.nics.iter().filter(|n| n.up).count();
        format!(
            "# HELP labforge_up 1 while the agent is running.\n# TYPE labforge_up gauge\nlabforge_up 1\n\
             # HELP labforge_nics Physical network interfaces, by link state.\n# TYPE labforge_nics gauge\n\
             labforge_nics{{state=\"up\"}} {up}\nlabforge_nics{{state=\"down\"}} {}\n\
             # HELP labforge_disks Whole disks seen in the inventory.\n# TYPE labforge_disks gauge\nlabforge_disks {}\n\
             # HELP labforge_state_bytes Size of the state filesystem.\n# TYPE labforge_state_bytes gauge\nlabforge_state_bytes {}\n",
            self.node.nics.len() - up,
            self.node.disks.len(),
            self.state.size_bytes,
        )
    }
}

pub type Shared = Arc<RwLock<Status>>;

pub fn router(status: Shared) -> Router {
    Router::new()
        .route("/status", get(|State(s): State<Shared>| async move { Json(s.read().await.clone()) }))
        .route("/metrics", get(|State(s): State<Shared>| async move { s.read().await.metrics() }))
        .with_state(status)
}

/// Serves the status endpoints until the future is dropped.
pub async fn serve(addr: SocketAddr, status: Shared) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding status endpoint on {addr}"))?;
    axum::serve(listener, router(status)).await.context("serving status endpoint")
}

/// Fetches a node's status from its endpoint (used by `labforge-agent status`).
pub fn fetch(addr: &str) -> Result<Status> {
    let url = format!("http://{addr}/status");
    ureq::get(&url)
        .timeout(std::time::Duration::from_secs(5))
        .call()
        .with_context(|| format!("asking the agent at {url}; is labforge-agent running?"))?
        .into_json()
        .with_context(|| format!("reading status from {url}"))
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "node     {} ({})", self.node.hostname, self.node.machine_id)?;
        writeln!(f, "image    {} (agent {})", self.image, self.agent_version)?;
        writeln!(f, "phase    {}", self.phase)?;
        writeln!(f, "state    {} ({} MiB)", self.state.dir, self.state.size_bytes >> 20)?;
        for n in &self.node.nics {
            let state = if n.up { "up" } else { "down" };
            writeln!(f, "nic      {} {} {} {}", n.name, n.mac, state, n.addresses.join(" "))?;
        }
        for d in &self.node.disks {
            let id = d.by_id.as_deref().unwrap_or("-");
            let removable = if d.removable { " removable" } else { "" };
            writeln!(f, "disk     {} {} MiB {id}{removable}", d.name, d.size_bytes >> 20)?;
        }
        Ok(())
    }
}
