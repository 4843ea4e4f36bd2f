//! Stage `agent`: the labforge-agent binary, its systemd unit (enabled) and the baked node
//! config at /etc/labforge/cluster.toml.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use labforge_core::config::NodeConfig;
use labforge_core::secret::Secret;

use super::fsutil::write_in_root;
use crate::cmd::Cmd;
use crate::spec::Spec;

/// Finds the agent binary to install: `--agent`, else `labforge-agent` beside this executable
/// (both are built by the same `cargo build`).
pub fn locate_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("agent binary {} does not exist", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating the labforge executable")?;
    let mut dirs = vec![exe.parent().map(Path::to_path_buf).unwrap_or_default()];
    // Test binaries live one level down, in target/<profile>/deps.
    if let Some(p) = exe.parent().and_then(Path::parent) {
        dirs.push(p.to_path_buf());
    }
    dirs.into_iter().map(|d| d.join("labforge-agent")).find(|p| p.is_file()).context(
        "labforge-agent was not found beside labforge; build both with `cargo build --release` or pass --agent PATH",
    )
}

pub fn install(spec: &Spec, root: &Path, binary: &Path, secret: &Secret) -> Result<()> {
    let put = |rel: &str, contents: &[u8], mode: u32| write_in_root(root, rel, contents, mode);
    let bin = fs::read(binary).with_context(|| format!("reading agent binary {}", binary.display()))?;
    put("usr/bin/labforge-agent", &bin, 0o755)?;
    put("etc/systemd/system/labforge-agent.service", labforge_core::layout::AGENT_UNIT.as_bytes(), 0o644)?;
    // Decides, before any unit starts, whether this boot is a live session from a stick (see
    // the agent's install::live).
    put(
        "usr/lib/systemd/system-generators/labforge-live",
        b"#!/bin/sh\n# labforge: keeps a stick booted with install mode on read-only (labforge-agent live-generator).\nexec /usr/bin/labforge-agent live-generator \"$@\"\n",
        0o755,
    )?;
    let mut cfg = NodeConfig::new(&spec.name, &spec.hostname);
    cfg.cluster = spec.cluster.clone();
    cfg.kubernetes = spec.kubernetes.node();
    cfg.disks = spec.disks.clone();
    cfg.install = spec.install.clone();
    cfg.pxe = spec.pxe.clone();
    cfg.network = spec.network.clone();
    put("etc/labforge/cluster.toml", cfg.to_toml().as_bytes(), 0o644)?;
    put(labforge_core::config::SECRET_PATH, format!("{}\n", secret.to_hex()).as_bytes(), 0o600)?;
    Cmd::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .args(["enable", "labforge-agent.service", "systemd-networkd.service"])
        .run()
        .context("enabling the agent unit in the image")?;
    Ok(())
}
