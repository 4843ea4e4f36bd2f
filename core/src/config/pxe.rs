//! The spec's `[pxe]` table: netboot served by the master, and where an image carries the
//! netboot files.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where images with the `pxe` output carry the netboot artifacts.
pub const ARTIFACT_DIR: &str = "/usr/lib/labforge/pxe";
/// iPXE's binaries (Debian package `ipxe`), served over TFTP to firmware PXE ROMs.
pub const IPXE_DIR: &str = "/usr/lib/ipxe";

/// The spec's `[pxe]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PxeConfig {
    /// The master serves netboot on the cluster LAN (needs the `pxe` output). Everything it
    /// serves, the cluster secret inside the squashfs included, can be fetched by any machine
    /// on that LAN: enable it only on the cluster's own LAN.
    #[serde(default)]
    pub serve: bool,
    /// `"FIRST,LAST"` addresses to hand out, for a LAN with no DHCP server of its own. Without
    /// it the master answers only PXE clients (proxy-DHCP) and hands out no address.
    #[serde(default)]
    pub dhcp_range: Option<String>,
}

impl PxeConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(r) = &self.dhcp_range {
            parse_range(r)?;
        }
        Ok(())
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
