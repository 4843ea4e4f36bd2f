//! `labforge-agent run`: the boot-time daemon.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::RwLock;
use tracing::{info, warn};

use crate::config::{render_hostname, NodeConfig};
use crate::inventory::{Inventory, Roots};
use crate::status::{self, Status, StateVolume};

pub fn run(config_path: &Path) -> Result<()> {
    let cfg = NodeConfig::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting async runtime")?;
    runtime.block_on(run_async(cfg))
}

async fn run_async(cfg: NodeConfig) -> Result<()> {
    let roots = Roots::default();
    let inventory = Inventory::take(&roots, &kernel_addresses)?;
    apply_hostname(&cfg, &inventory);
    // Take it again so the reported hostname is the one just set.
    let inventory = Inventory::take(&roots, &kernel_addresses)?;
    info!(nics = inventory.nics.len(), disks = inventory.disks.len(), "took inventory");

    let status = Status {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        image: cfg.image.clone(),
        phase: "inventoried".into(),
        node: inventory,
        state: state_volume(&cfg.state_dir),
    };
    let shared = Arc::new(RwLock::new(status.clone()));
    let addr = SocketAddr::from(([0, 0, 0, 0], cfg.status_port));
    let server = tokio::spawn(status::serve(addr, shared.clone()));
    status.announce();
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!("telling systemd we are ready: {e}");
    }
    info!(%addr, "serving status");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        r = server => r.context("status server task")??,
        _ = term.recv() => info!("stopping on SIGTERM"),
        _ = tokio::signal::ctrl_c() => info!("stopping on SIGINT"),
    }
    Ok(())
}

fn apply_hostname(cfg: &NodeConfig, inv: &Inventory) {
    let mac = inv.primary_mac_hex().unwrap_or_else(|| inv.machine_id.clone());
    match render_hostname(&cfg.hostname, &mac, &inv.machine_id) {
        Ok(name) if name != inv.hostname => match nix::unistd::sethostname(&name) {
            Ok(()) => info!(hostname = %name, "set hostname"),
            Err(e) => warn!(hostname = %name, "setting hostname: {e}"),
        },
        Ok(_) => {}
        Err(e) => warn!("rendering hostname: {e:#}"),
    }
}

fn state_volume(dir: &str) -> StateVolume {
    let size_bytes = nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks() * s.fragment_size())
        .unwrap_or_else(|e| {
            warn!("reading size of state dir {dir}: {e}");
            0
        });
    StateVolume { dir: dir.into(), size_bytes }
}

/// Addresses of one interface as the kernel reports them, in CIDR notation.
fn kernel_addresses(name: &str) -> Vec<String> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    addrs
        .filter(|a| a.interface_name == name)
        .filter_map(|a| {
            let ip: IpAddr = match a.address.as_ref()? {
                s if s.as_sockaddr_in().is_some() => s.as_sockaddr_in()?.ip().into(),
                s if s.as_sockaddr_in6().is_some() => s.as_sockaddr_in6()?.ip().into(),
                _ => return None,
            };
            let prefix = a
                .netmask
                .as_ref()
                .and_then(|m| {
                    m.as_sockaddr_in()
                        .map(|m| u32::from(m.ip()).count_ones())
                        .or_else(|| m.as_sockaddr_in6().map(|m| u128::from(m.ip()).count_ones()))
                })
                .unwrap_or(0);
            Some(format!("{ip}/{prefix}"))
        })
        .collect()
}
