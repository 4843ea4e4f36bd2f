//! The node config baked into every image at `/etc/labforge/cluster.toml`, and the layers that
//! override it on a node: defaults ← baked file ← kernel command line (`labforge.*`) ← the
//! optional config partition labelled `LABFORGE` on the boot media.
//!
//! The builder writes the baked file from the image spec; the agent reads it at boot. This
//! module owns the schema so both sides agree on it; the spec's `[cluster]` and `[kubernetes]`
//! tables are these types.

use std::path::Path;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod disks;
pub mod install;
pub mod network;
pub mod pxe;

use disks::{DisksConfig, Wipe};
use install::InstallConfig;

/// Which side a node may take: elected (`auto`), or forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RolePolicy {
    #[default]
    Auto,
    Master,
    Worker,
}

/// Where the builder bakes the node config and the agent reads it.
pub const DEFAULT_PATH: &str = "/etc/labforge/cluster.toml";
/// Where the builder bakes the cluster secret (mode 0600).
pub const SECRET_PATH: &str = "/etc/labforge/cluster.secret";
/// The only config schema version this agent reads.
pub const SCHEMA_VERSION: u32 = 1;
/// TCP port of `GET /status`, `GET /metrics` and the join-info exchange.
pub const STATUS_PORT: u16 = 9743;
/// UDP port of discovery beacons.
pub const BEACON_PORT: u16 = 9744;

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
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    #[serde(default)]
    pub disks: DisksConfig,
    #[serde(default)]
    pub install: InstallConfig,
    #[serde(default)]
    pub pxe: pxe::PxeConfig,
    #[serde(default)]
    pub network: network::NetworkConfig,
}

/// How nodes find each other and choose a master. The spec's `[cluster]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterConfig {
    /// Cluster name (kubeadm `clusterName`, and the API endpoint's host name prefix).
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// NIC that carries the cluster LAN: `auto` (first wired NIC with an IPv4 address) or a name.
    #[serde(default = "default_auto")]
    pub lan_interface: String,
    /// `auto`, `master` or `worker`. Usually set per node on the kernel command line
    /// (`labforge.role=master`) or the config partition.
    #[serde(default)]
    pub role: RolePolicy,
    /// Nodes that must be seen before a master is elected.
    #[serde(default = "default_minimum_nodes")]
    pub minimum_nodes: usize,
    /// Seconds to listen for peers after boot before electing (at least twice the beacon
    /// interval plus network delay).
    #[serde(default = "default_settle")]
    pub settle_seconds: u64,
    /// Nodes preferred as master, best first, by MAC address or `/dev/disk/by-id/...` path.
    #[serde(default)]
    pub master_priority: Vec<String>,
    /// Pod network CIDR.
    #[serde(default = "default_pod_cidr")]
    pub pod_cidr: String,
    /// Service network CIDR.
    #[serde(default = "default_service_cidr")]
    pub service_cidr: String,
}

/// Whether this image runs kubeadm. The spec's `[kubernetes]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KubernetesConfig {
    /// Run kubeadm init/join. `false` for images without kubeadm: the node still discovers,
    /// elects and reports `kubernetes: disabled`.
    #[serde(default)]
    pub enabled: bool,
    /// `kubernetesVersion` for kubeadm (e.g. `v1.36.5`); empty: kubeadm's own version.
    #[serde(default)]
    pub version: String,
    /// kubeadm's `imageRepository`: where the control-plane images are named from (they are
    /// preloaded under those names); empty: kubeadm's default, `registry.k8s.io`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_repository: String,
    /// Workloads may run on the master (kubeadm's control-plane taint is not set). In a lab
    /// every PC counts, so this is the default.
    #[serde(default = "default_true")]
    pub schedule_on_master: bool,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: false,
            version: String::new(),
            image_repository: String::new(),
            schedule_on_master: true,
        }
    }
}

fn default_true() -> bool {
    true
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
fn default_cluster_name() -> String {
    "labforge".into()
}
fn default_auto() -> String {
    "auto".into()
}
fn default_minimum_nodes() -> usize {
    1
}
fn default_settle() -> u64 {
    20
}
fn default_pod_cidr() -> String {
    "10.244.0.0/16".into()
}
fn default_service_cidr() -> String {
    "10.96.0.0/12".into()
}

impl Default for ClusterConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl ClusterConfig {
    /// Checks values a typo could break; used by the builder on the spec and by the agent on
    /// every layer.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty()
            || self.name.len() > 40
            || !self.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            bail!("cluster name {:?} must be 1-40 lowercase letters, digits or '-'", self.name);
        }
        if self.minimum_nodes == 0 {
            bail!("minimum-nodes must be at least 1");
        }
        if self.settle_seconds < 3 {
            bail!("settle-seconds must be at least 3 (two beacon intervals and then some)");
        }
        for cidr in [&self.pod_cidr, &self.service_cidr] {
            parse_cidr(cidr)?;
        }
        Ok(())
    }
}

fn parse_cidr(s: &str) -> Result<(std::net::IpAddr, u8)> {
    let (ip, len) = s.split_once('/').with_context(|| format!("{s:?} is not a CIDR such as 10.244.0.0/16"))?;
    let ip: std::net::IpAddr = ip.parse().with_context(|| format!("{s:?} is not a CIDR"))?;
    let len: u8 = len.parse().with_context(|| format!("{s:?} is not a CIDR"))?;
    if len > if ip.is_ipv4() { 32 } else { 128 } {
        bail!("{s:?} has a prefix length out of range");
    }
    Ok((ip, len))
}

impl NodeConfig {
    pub fn new(image: &str, hostname: &str) -> Self {
        NodeConfig {
            schema_version: SCHEMA_VERSION,
            image: image.to_string(),
            hostname: hostname.to_string(),
            status_port: STATUS_PORT,
            state_dir: default_state_dir(),
            cluster: ClusterConfig::default(),
            kubernetes: KubernetesConfig::default(),
            disks: DisksConfig::default(),
            install: InstallConfig::default(),
            pxe: Default::default(),
            network: Default::default(),
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading node config {}", path.display()))?;
        let cfg: NodeConfig =
            toml::from_str(&text).with_context(|| format!("parsing node config {}", path.display()))?;
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
        cfg.cluster.validate().with_context(|| format!("checking [cluster] in {}", path.display()))?;
        cfg.disks.validate().with_context(|| format!("checking [disks] in {}", path.display()))?;
        cfg.install.validate().with_context(|| format!("checking [install] in {}", path.display()))?;
        cfg.pxe.validate().with_context(|| format!("checking [pxe] in {}", path.display()))?;
        cfg.network
            .validate(&cfg.cluster.pod_cidr, &cfg.cluster.service_cidr)
            .with_context(|| format!("checking [network] in {}", path.display()))?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("node config serialises")
    }

    /// Applies `labforge.*` keys from a kernel command line. Unknown keys and bad values are
    /// reported (one warning each) and ignored: a typo on one node's command line must not
    /// stop it from booting.
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Vec<String> {
        let mut warnings = Vec::new();
        for word in cmdline.split_whitespace() {
            let Some(kv) = word.strip_prefix("labforge.") else { continue };
            let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
            if let Err(e) = self.set(key, value) {
                warnings.push(format!("ignoring kernel command line option labforge.{kv}: {e:#}"));
            }
        }
        warnings
    }

    /// Applies a config-partition `labforge.toml`: the same keys as `[cluster]` and
    /// `[install]`, plus `hostname`. Errors name the problem; the caller ignores the whole file
    /// on error.
    pub fn apply_partition_toml(&mut self, text: &str) -> Result<()> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        struct Overlay {
            hostname: Option<String>,
            #[serde(default)]
            cluster: toml::Table,
            #[serde(default)]
            install: toml::Table,
        }
        let o: Overlay = toml::from_str(text).context("parsing labforge.toml")?;
        let mut merged = self.clone();
        if let Some(h) = o.hostname {
            render_hostname(&h, "000000000000", "0")?;
            merged.hostname = h;
        }
        let mut table = toml::Table::try_from(&merged.cluster).expect("serialises");
        table.extend(o.cluster);
        merged.cluster = table.try_into().context("reading [cluster] in labforge.toml")?;
        merged.cluster.validate()?;
        let mut table = toml::Table::try_from(&merged.install).expect("serialises");
        table.extend(o.install);
        merged.install = table.try_into().context("reading [install] in labforge.toml")?;
        merged.install.validate()?;
        *self = merged;
        Ok(())
    }

    /// Sets one `labforge.<key>` value.
    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let mut next = self.clone();
        match key {
            "role" => {
                next.cluster.role = match value {
                    "auto" => RolePolicy::Auto,
                    "master" => RolePolicy::Master,
                    "worker" => RolePolicy::Worker,
                    _ => bail!("role must be auto, master or worker"),
                }
            }
            "minimum-nodes" => next.cluster.minimum_nodes = value.parse().context("not a number")?,
            "settle-seconds" => next.cluster.settle_seconds = value.parse().context("not a number")?,
            "lan-interface" => next.cluster.lan_interface = value.to_string(),
            // The master's enrolment key, set by its iPXE script; read by `pxe::enrol`.
            "enrol" => {}
            "cluster-name" => next.cluster.name = value.to_string(),
            // Per node, the policy can only be made safer: `force` needs the spec's match.
            "wipe" => {
                next.disks.wipe = match value {
                    "never" => Wipe::Never,
                    "blank-only" if self.disks.wipe != Wipe::Never => Wipe::BlankOnly,
                    "blank-only" => bail!("the image says wipe = \"never\"; the command line can only make it safer"),
                    "force" => bail!("force can only be set in the image spec's [disks], with a match"),
                    _ => bail!("wipe must be never or blank-only"),
                }
            }
            "hostname" => {
                render_hostname(value, "000000000000", "0")?;
                next.hostname = value.to_string();
            }
            "install" => next.install.mode = value.parse()?,
            "install-netboot" => {
                next.install.netboot = match value {
                    "yes" | "true" | "1" => true,
                    "no" | "false" | "0" => false,
                    _ => bail!("install-netboot must be yes or no"),
                }
            }
            "install-target" => {
                install::check_target_name(value)?;
                next.install.target = Some(value.to_string());
            }
            _ => bail!("unknown option; known: role, minimum-nodes, settle-seconds, lan-interface, cluster-name, hostname, wipe, install, install-netboot, install-target"),
        }
        next.cluster.validate()?;
        *self = next;
        Ok(())
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
            other => {
                bail!("unknown placeholder {{{other}}} in hostname pattern {pattern:?}; known: {{mac}}, {{machine-id}}")
            }
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
        std::fs::write(&p, format!("colour = 1\n{}", cfg.to_toml())).unwrap();
        let err = format!("{:#}", NodeConfig::load(&p).unwrap_err());
        assert!(err.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn cmdline_overrides_and_bad_keys_are_reported_not_fatal() {
        let mut cfg = NodeConfig::new("demo", "lab-{mac}");
        let warnings = cfg.apply_cmdline(
            "root=PARTUUID=x quiet labforge.role=master labforge.minimum-nodes=3 labforge.colour=red labforge.role=boss labforge.settle-seconds=1",
        );
        assert_eq!(cfg.cluster.role, RolePolicy::Master);
        assert_eq!(cfg.cluster.minimum_nodes, 3);
        assert_eq!(cfg.cluster.settle_seconds, 20, "an invalid value leaves the old one");
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].contains("labforge.colour=red") && warnings[0].contains("unknown option"));
        assert!(warnings[1].contains("auto, master or worker"));
        assert!(warnings[2].contains("at least 3"));
    }

    #[test]
    fn cmdline_can_only_make_the_disk_policy_safer() {
        let mut cfg = NodeConfig::new("demo", "lab-{mac}");
        let w = cfg.apply_cmdline("labforge.wipe=force");
        assert!(w[0].contains("only be set in the image spec"), "{w:?}");
        assert_eq!(cfg.disks.wipe, Wipe::BlankOnly);
        assert!(cfg.apply_cmdline("labforge.wipe=never").is_empty());
        assert_eq!(cfg.disks.wipe, Wipe::Never);
        assert_eq!(cfg.apply_cmdline("labforge.wipe=blank-only").len(), 1);
        assert_eq!(cfg.disks.wipe, Wipe::Never);
    }

    #[test]
    fn install_mode_and_target_come_from_every_layer() {
        let mut cfg = NodeConfig::new("demo", "lab-{mac}");
        assert!(!cfg.install.netboot, "a netbooted node installs itself only when asked to");
        let w = cfg.apply_cmdline("labforge.install-netboot=yes labforge.install-netboot=maybe");
        assert!(cfg.install.netboot && w.len() == 1 && w[0].contains("yes or no"), "{w:?}");
        let w = cfg
            .apply_cmdline("labforge.install=off labforge.install-target=/dev/sda labforge.install-target=serial:WD-1");
        assert_eq!(cfg.install.mode, install::InstallMode::Off);
        assert_eq!(cfg.install.target.as_deref(), Some("serial:WD-1"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("kernel names such as /dev/sda change"), "{w:?}");
        cfg.apply_partition_toml("[install]\ntarget = \"/dev/disk/by-id/ata-X\"\nmode = \"auto\"\n").unwrap();
        assert_eq!(cfg.install.target.as_deref(), Some("/dev/disk/by-id/ata-X"));
        assert_eq!(cfg.install.mode, install::InstallMode::Auto);
        assert!(cfg.apply_partition_toml("[install]\ntarget = \"/dev/sdb\"\n").is_err());
    }

    #[test]
    fn config_partition_overrides_cluster_keys() {
        let mut cfg = NodeConfig::new("demo", "lab-{mac}");
        cfg.apply_partition_toml("hostname = \"room1-{mac}\"\n[cluster]\nrole = \"worker\"\nminimum-nodes = 4\n")
            .unwrap();
        assert_eq!(cfg.hostname, "room1-{mac}");
        assert_eq!(cfg.cluster.role, RolePolicy::Worker);
        assert_eq!(cfg.cluster.minimum_nodes, 4);
        let before = cfg.clone();
        assert!(cfg.apply_partition_toml("[cluster]\nminimum-nodes = 0\n").is_err());
        assert!(cfg.apply_partition_toml("[cluster]\nbogus = 1\n").is_err());
        assert_eq!(cfg, before, "a bad file changes nothing");
    }
}
