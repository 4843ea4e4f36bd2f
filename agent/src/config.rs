//! The node config baked into every image at `/etc/labforge/cluster.toml`.
//!
//! The builder writes it from the image spec; the agent reads it at boot. This module owns the
//! schema so both sides agree on it.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Where the builder bakes the node config and the agent reads it.
pub const DEFAULT_PATH: &str = "/etc/labforge/cluster.toml";
/// The only config schema version this agent reads.
pub const SCHEMA_VERSION: u32 = 1;
/// TCP port of `GET /status` and `GET /metrics`.
pub const STATUS_PORT: u16 = 9743;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    pub schema_version: u32,
    /// Name of the image this node booted (from the spec).
    pub image: String,
    /// Hostname pattern, see [`render_hostname`].
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// TCP port for the status endpoint.
    #[serde(default = "default_port")]
    pub status_port: u16,
    /// Directory holding the agent's state (the state partition is mounted here).
    #[serde(default = "default_state_dir")]
    pub state_dir: String,
}

fn default_hostname() -> String {
    "labforge-{mac}".into()
}
fn default_port() -> u16 {
    STATUS_PORT
}
fn default_state_dir() -> String {
    "/var/lib/labforge".into()
}

impl NodeConfig {
    pub fn new(image: &str, hostname: &str) -> Self {
        NodeConfig {
            schema_version: SCHEMA_VERSION,
            image: image.to_string(),
            hostname: hostname.to_string(),
            status_port: STATUS_PORT,
            state_dir: default_state_dir(),
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading node config {}", path.display()))?;
        let cfg: NodeConfig = toml::from_str(&text)
            .with_context(|| format!("parsing node config {}", path.display()))?;
        if cfg.schema_version != SCHEMA_VERSION {
            bail!(
                "node config {} has schema version {}, this agent reads {}; rebuild the image with a matching labforge",
                path.display(),
                cfg.schema_version,
                SCHEMA_VERSION
            );
        }
        render_hostname(&cfg.hostname, "000000000000", "00000000000000000000000000000000")
            .with_context(|| format!("checking hostname pattern in {}", path.display()))?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("node config serialises")
    }
}

/// Renders a hostname pattern. `{mac}` is the last 6 hex digits of `mac_hex` (12 hex digits, no
/// separators), `{machine-id}` the first 8 of the machine id.
pub fn render_hostname(pattern: &str, mac_hex: &str, machine_id: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            bail!("unclosed '{{' in hostname pattern {pattern:?}");
        };
        let name = &rest[start + 1..start + len];
        match name {
            "mac" => out.push_str(&mac_hex[mac_hex.len().saturating_sub(6)..]),
            "machine-id" => out.push_str(&machine_id[..machine_id.len().min(8)]),
            other => bail!(
                "unknown placeholder {{{other}}} in hostname pattern {pattern:?}; known: {{mac}}, {{machine-id}}"
            ),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("lab-{mac}", "lab-ddeeff")]
    #[case("node-{machine-id}", "node-01234567")]
    #[case("fixed", "fixed")]
    fn renders_patterns(#[case] pattern: &str, #[case] want: &str) {
        assert_eq!(render_hostname(pattern, "AABBCCDDEEFF", "0123456789abcdef").unwrap(), want);
    }

    #[rstest]
    #[case("lab-{serial}", "unknown placeholder")]
    #[case("lab-{mac", "unclosed")]
    fn rejects_bad_patterns(#[case] pattern: &str, #[case] why: &str) {
        let err = render_hostname(pattern, "aabbccddeeff", "0").unwrap_err();
        assert!(format!("{err:#}").contains(why), "{err:#}");
    }

    #[test]
    fn round_trips_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let cfg = NodeConfig::new("demo", "lab-{mac}");
        std::fs::write(&p, cfg.to_toml()).unwrap();
        assert_eq!(NodeConfig::load(&p).unwrap(), cfg);
        std::fs::write(&p, format!("{}colour = 1\n", cfg.to_toml())).unwrap();
        let err = format!("{:#}", NodeConfig::load(&p).unwrap_err());
        assert!(err.contains("unknown field `colour`"), "{err}");
    }
}
