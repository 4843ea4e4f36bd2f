//! The spec's `[install]` table: what a node booted from a stick (or netbooted) does.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::disks::Bytes;

/// The spec's `[install]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InstallConfig {
    /// `auto`: a node booted from removable media (USB stick, SD card) installs the image onto
    /// an internal disk and reboots into it; `off`: it runs from the stick like any disk.
    #[serde(default)]
    pub mode: InstallMode,
    /// A netbooted node installs the image onto a blank internal disk (chosen as for a stick)
    /// and reboots into it; without a safe disk it runs on netbooted. Off by default: blank
    /// disks of netbooted nodes are otherwise offered to Ceph. `mode = "off"` turns it off too.
    #[serde(default)]
    pub netboot: bool,
    /// The disk to install onto, by `/dev/disk/by-id/…` path or `serial:<serial>`; it may hold
    /// data (it is overwritten). Without it, only a blank internal disk is chosen.
    #[serde(default)]
    pub target: Option<String>,
    /// Smallest disk chosen when no target is named.
    #[serde(default = "default_min_size")]
    pub min_size: Bytes,
    /// Reboot into the installed system when done.
    #[serde(default = "yes")]
    pub reboot: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InstallMode {
    #[default]
    Auto,
    Off,
}

fn default_min_size() -> Bytes {
    Bytes(8 << 30)
}
fn yes() -> bool {
    true
}

impl Default for InstallConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl FromStr for InstallMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(InstallMode::Auto),
            "off" => Ok(InstallMode::Off),
            _ => bail!("install must be auto or off"),
        }
    }
}

impl fmt::Display for InstallMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstallMode::Auto => "auto",
            InstallMode::Off => "off",
        })
    }
}

impl InstallConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.target {
            check_target_name(t)?;
        }
        Ok(())
    }
}

/// A target is named by a stable name, never a kernel name (`/dev/sda` moves between boots).
pub fn check_target_name(t: &str) -> Result<()> {
    let ok = t.strip_prefix("/dev/disk/by-id/").is_some_and(|r| !r.is_empty() && !r.contains('/'))
        || t.strip_prefix("serial:").is_some_and(|s| !s.is_empty());
    if !ok {
        bail!("install target {t:?} must be a /dev/disk/by-id/… path or serial:<serial> (kernel names such as /dev/sda change between boots)");
    }
    Ok(())
}
