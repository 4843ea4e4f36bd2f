//! The spec's `[pxe]` table: netboot served by the master, and where an image carries the
//! netboot files.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where images with the `pxe` output carry the netboot artifacts.
pub const ARTIFACT_DIR: &str = "/usr/lib/labforge/pxe";
/// iPXE's binaries (Debian package `ipxe`), served over TFTP to firmware PXE ROMs.
pub const IPXE_DIR: &str = "/usr/lib/ipxe";

/// The spec's `[pxe]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PxeConfig {
    /// The master serves netboot on the cluster LAN (needs the `pxe` output). What it serves
    /// carries no secret: a netbooted node gets the cluster secret by enrolment (`enrol`).
    #[serde(default)]
    pub serve: bool,
    /// `"FIRST,LAST"` addresses to hand out, for a LAN with no DHCP server of its own. Without
    /// it the master answers only PXE clients (proxy-DHCP) and hands out no address.
    #[serde(default)]
    pub dhcp_range: Option<String>,
    /// How the master admits a netbooted node (which then receives the cluster secret):
    /// `"window"` (any, while the enrolment window is open), `"allowlist"` (only MACs or
    /// machine ids in `enrol-allow`), `"approve"` (each one when an admin approves it).
    #[serde(default)]
    pub enrol: EnrolPolicy,
    /// How long the window stays open after this node becomes master (`"30m"`, `"2h"`);
    /// `labforge-agent enrol --for 15m` opens it again.
    #[serde(default = "default_window")]
    pub enrol_window: String,
    /// Under `enrol = "allowlist"`: MAC addresses (`52:54:00:12:34:56`) or machine ids (32 hex
    /// digits) admitted.
    #[serde(default)]
    pub enrol_allow: Vec<String>,
}

fn default_window() -> String {
    "30m".into()
}

impl Default for PxeConfig {
    fn default() -> Self {
        PxeConfig {
            serve: false,
            dhcp_range: None,
            enrol: EnrolPolicy::default(),
            enrol_window: default_window(),
            enrol_allow: Vec::new(),
        }
    }
}

/// How a master admits netbooted nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EnrolPolicy {
    #[default]
    Window,
    Allowlist,
    Approve,
}

impl EnrolPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            EnrolPolicy::Window => "window",
            EnrolPolicy::Allowlist => "allowlist",
            EnrolPolicy::Approve => "approve",
        }
    }
}

/// The longest enrolment window (a day): an open window admits anyone on the LAN.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// A duration like `"30m"`, `"15m"`, `"2h"`, `"0s"`, at most [`MAX_WINDOW`].
pub fn parse_window(text: &str) -> Result<Duration> {
    let d = humantime::parse_duration(text.trim())
        .with_context(|| format!("{text:?} is not a duration (write e.g. \"30m\" or \"2h\")"))?;
    if d > MAX_WINDOW {
        bail!("{text:?} is longer than the longest enrolment window, 24h");
    }
    Ok(d)
}

/// A MAC address written `aa:bb:cc:dd:ee:ff` (any case), as lowercase.
pub fn normalise_mac(text: &str) -> Option<String> {
    let t = text.trim().to_ascii_lowercase();
    let parts: Vec<&str> = t.split(':').collect();
    (parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))).then_some(t)
}

/// A machine id: 32 lowercase hex digits.
pub fn is_machine_id(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl PxeConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(r) = &self.dhcp_range {
            parse_range(r)?;
        }
        parse_window(&self.enrol_window).context("enrol-window")?;
        for a in &self.enrol_allow {
            if normalise_mac(a).is_none() && !is_machine_id(a) {
                bail!(
                    "enrol-allow: {a:?} is neither a MAC address (52:54:00:12:34:56) nor a machine id (32 hex digits)"
                );
            }
        }
        if self.enrol == EnrolPolicy::Allowlist && self.enrol_allow.is_empty() {
            bail!("enrol = \"allowlist\" with an empty enrol-allow admits no netbooted node: list their MACs or machine ids");
        }
        Ok(())
    }

    /// Whether `mac` or `machine_id` is on the allowlist.
    pub fn allows(&self, mac: &str, machine_id: &str) -> bool {
        self.enrol_allow.iter().any(|a| normalise_mac(a).is_some_and(|m| m == mac) || a == machine_id)
    }
}

pub fn parse_range(r: &str) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let (a, b) = r
        .split_once(',')
        .with_context(|| format!("dhcp-range {r:?} must be \"FIRST,LAST\", e.g. \"10.0.0.100,10.0.0.199\""))?;
    let a: Ipv4Addr = a.trim().parse().with_context(|| format!("dhcp-range {r:?}: {a:?} is not an IPv4 address"))?;
    let b: Ipv4Addr = b.trim().parse().with_context(|| format!("dhcp-range {r:?}: {b:?} is not an IPv4 address"))?;
    if u32::from(a) > u32::from(b) {
        bail!("dhcp-range {r:?} ends before it starts");
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolment_settings_are_checked() {
        let ok = PxeConfig { serve: true, ..Default::default() };
        assert!(ok.validate().is_ok());
        assert_eq!(parse_window("30m").unwrap(), Duration::from_secs(1800));
        assert!(parse_window("25h").is_err() && parse_window("soon").is_err());
        let allow = |list: &[&str]| PxeConfig {
            enrol: EnrolPolicy::Allowlist,
            enrol_allow: list.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(allow(&[]).validate().is_err(), "an empty allowlist admits nobody");
        assert!(allow(&["52:54:00:12:34:zz"]).validate().is_err());
        let a = allow(&["52:54:00:AB:34:56", "0123456789abcdef0123456789abcdef"]);
        assert!(a.validate().is_ok());
        assert!(a.allows("52:54:00:ab:34:56", "x"));
        assert!(a.allows("52:54:00:00:00:00", "0123456789abcdef0123456789abcdef"));
        assert!(!a.allows("52:54:00:00:00:00", "ffffffffffffffffffffffffffffffff"));
    }
}
