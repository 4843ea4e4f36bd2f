//! The image spec: what `labforge build` reads.
//!
//! A spec file is TOML with kebab-case keys; unknown keys are errors. Every key is optional in
//! a single file so that a spec can `extends` another and set only what differs; the merged
//! result is then checked for the keys an image needs (see [`load`]).

mod load;
pub mod size;

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use labforge_core::config::disks::DisksConfig;
pub use labforge_core::config::{ClusterConfig, KubernetesConfig};
pub use load::{load, SpecError};
pub use size::Size;

/// The only schema version this labforge understands.
pub const SCHEMA_VERSION: u32 = 1;

/// An image spec after `extends` has been resolved. Paths are absolute.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Spec {
    /// Spec format version; must be 1.
    #[serde(default = "default_schema_version")]
    pub schema_version: u32,
    /// Another spec (path relative to this file) whose settings this one starts from.
    /// Tables merge key by key; `packages`, `pins`, `overlays`, `users`, `preload` and the roster's
    /// `lab.projects` and `lab.users` are appended.
    #[serde(default, skip_serializing)]
    pub extends: Option<String>,
    /// Image name: lowercase letters, digits and `-`; names the output files.
    #[serde(default)]
    pub name: String,
    /// Hostname pattern each node renders at boot. Placeholders: `{mac}` (last 6 hex digits of
    /// the first wired NIC), `{machine-id}` (first 8 hex digits of /etc/machine-id).
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Distribution to install.
    #[serde(default)]
    pub base: Base,
    /// Packages to install on top of the distribution's required set.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Version pins for packages (e.g. kubeadm, kubelet, kubectl).
    #[serde(default)]
    pub pins: Vec<Pin>,
    /// File trees laid onto the root filesystem in order (paths relative to the spec that names
    /// them). `*.j2` files are rendered with the spec as context and lose the suffix.
    #[serde(default)]
    pub overlays: Vec<PathBuf>,
    /// Mode and owner of individual files after the overlays are applied, keyed by path in the
    /// image (e.g. `"/etc/ssh/sshd_config.d/lab.conf"`).
    #[serde(default)]
    pub files: BTreeMap<String, FileAttrs>,
    /// Login users. No passwords: SSH public keys only.
    #[serde(default)]
    pub users: Vec<User>,
    /// Kernel command line.
    #[serde(default)]
    pub kernel: Kernel,
    /// Partition sizes.
    #[serde(default)]
    pub disk: Disk,
    /// Which artifacts to write.
    #[serde(default = "default_outputs")]
    pub outputs: Vec<OutputFormat>,
    /// How nodes find each other and elect a master (baked into /etc/labforge/cluster.toml).
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Whether nodes run kubeadm, which version, and where Kubernetes comes from.
    #[serde(default)]
    pub kubernetes: KubernetesSpec,
    /// Which data disks nodes prepare for Rook-Ceph, and how (baked into the node config).
    #[serde(default)]
    pub disks: DisksConfig,
    /// Whether a node booted from a USB stick installs itself onto an internal disk (baked into
    /// the node config).
    #[serde(default)]
    pub install: labforge_core::config::install::InstallConfig,
    /// Whether the master serves netboot to its LAN (baked into the node config).
    #[serde(default)]
    pub pxe: labforge_core::config::pxe::PxeConfig,
    /// The LAN a master serves on a bare switch (no DHCP server): addresses, DNS and time
    /// (baked into the node config).
    #[serde(default)]
    pub network: labforge_core::config::network::NetworkConfig,
    /// Container images carried inside the image and imported into containerd (namespace
    /// `k8s.io`) on first boot. Tags are pinned to digests in `<name>.lock.toml` beside the spec.
    #[serde(default)]
    pub preload: Vec<Preload>,
    /// The data stack the master applies once the cluster is Ready: which components, their
    /// settings, image overrides and the site's own component folders.
    #[serde(default)]
    pub stack: StackSpec,
    /// The lab roster: notebook users with fixed uids, their projects, and each project's
    /// limits (see `labforge_core::lab`). Carried to the master in the stack; no passwords.
    #[serde(default)]
    pub lab: labforge_core::lab::Lab,
    /// Cluster secret file (64 hex digits, from `labforge secret new`). Without it, the build
    /// reuses `<out>/<name>.cluster.secret` or generates one there.
    #[serde(default)]
    pub cluster_secret_file: Option<PathBuf>,
}

/// `[kubernetes]`: what nodes run (baked into the node config) and, for the build, where
/// kubeadm, kubelet and kubectl come from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KubernetesSpec {
    /// Run kubeadm init/join. `false` for images without kubeadm: the node still discovers,
    /// elects and reports `kubernetes: disabled`.
    #[serde(default)]
    pub enabled: bool,
    /// `kubernetesVersion` for kubeadm (e.g. `v1.36.5`); empty: kubeadm's own version.
    /// Required with `source = "binaries"` (it names the release files).
    #[serde(default)]
    pub version: String,
    /// kubeadm's `imageRepository`, where the control-plane images are named from (e.g. a
    /// site's own registry); empty: `registry.k8s.io`.
    #[serde(default)]
    pub image_repository: String,
    /// Workloads may run on the master: kubeadm's control-plane taint is left off. Default
    /// true: in a lab every PC counts.
    #[serde(default = "default_true")]
    pub schedule_on_master: bool,
    /// `packages` (kubeadm, kubelet, kubectl from `packages` and an apt repository) or
    /// `binaries` (release files from `binaries-url`, pinned in the lock file).
    #[serde(default)]
    pub source: KubernetesSource,
    /// Base URL laid out as upstream's release site: `<base>/<version>/bin/linux/amd64/<name>`
    /// and `<name>.sha256`. A local mirror of those files works offline.
    #[serde(default = "default_binaries_url")]
    pub binaries_url: String,
    /// CNI plugins release (`/opt/cni/bin`), with `source = "binaries"`.
    #[serde(default = "default_cni_version")]
    pub cni_version: String,
    /// Base URL of the CNI plugins: `<cni-url>/<cni-version>/cni-plugins-linux-amd64-<cni-version>.tgz`
    /// and its `.sha256`, as the plugins' release page lays them out.
    #[serde(default = "default_cni_url")]
    pub cni_url: String,
}

impl Default for KubernetesSpec {
    fn default() -> Self {
        KubernetesSpec {
            enabled: false,
            version: String::new(),
            image_repository: String::new(),
            schedule_on_master: true,
            source: KubernetesSource::default(),
            binaries_url: default_binaries_url(),
            cni_version: default_cni_version(),
            cni_url: default_cni_url(),
        }
    }
}

impl KubernetesSpec {
    /// What the node's agent reads.
    pub fn node(&self) -> KubernetesConfig {
        KubernetesConfig {
            enabled: self.enabled,
            version: self.version.clone(),
            image_repository: self.image_repository.clone(),
            schedule_on_master: self.schedule_on_master,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum KubernetesSource {
    #[default]
    Packages,
    Binaries,
}

fn default_binaries_url() -> String {
    "https://dl.k8s.io/release".into()
}
fn default_cni_version() -> String {
    "v1.10.0".into()
}
fn default_cni_url() -> String {
    "https://github.com/containernetworking/plugins/releases/download".into()
}

/// `[stack]`. Component settings are tables named after the component:
/// `[stack.monitoring] retention = "15d"`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct StackSpec {
    /// Components the cluster runs (built-in or from `site`), in any order: they are applied in
    /// dependency order.
    #[serde(default)]
    pub components: Vec<String>,
    /// The site's own component folders (relative to the spec), same format as the built-in
    /// ones (`component.toml` + templates).
    #[serde(default)]
    pub site: Vec<PathBuf>,
    /// Image overrides: `"<component>.<image key>" = "<reference>"` (e.g. a site's registry).
    #[serde(default)]
    pub images: BTreeMap<String, String>,
    /// Mirrors for components' upstream files: `"<component>.<file>" = "<url>"` (an air-gapped
    /// site's copy). The file must still hash to the sha256 the component pins.
    #[serde(default)]
    pub upstream: BTreeMap<String, String>,
    /// Per-component settings, keyed by component name.
    #[serde(flatten)]
    #[schemars(with = "BTreeMap<String, BTreeMap<String, serde_json::Value>>")]
    pub settings: BTreeMap<String, toml::Table>,
}

/// One container image to preload.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Preload {
    /// Image reference: `registry/namespace/name:tag` or `…@sha256:<digest>`.
    #[serde(rename = "ref")]
    pub reference: String,
}

fn default_schema_version() -> u32 {
    SCHEMA_VERSION
}
fn default_hostname() -> String {
    "labforge-{mac}".into()
}
fn default_outputs() -> Vec<OutputFormat> {
    vec![OutputFormat::Raw, OutputFormat::Zst, OutputFormat::Bmap]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Distro {
    #[default]
    Debian,
    Ubuntu,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Base {
    /// `debian` or `ubuntu`.
    #[serde(default)]
    pub distro: Distro,
    /// Release codename, e.g. `bookworm` or `noble`. Required.
    #[serde(default)]
    pub suite: String,
    /// Archive URL. Default: the distribution's main archive. `labforge build --mirror` overrides.
    #[serde(default)]
    pub mirror: Option<String>,
    /// Archive components. Default `["main"]`.
    #[serde(default)]
    pub components: Vec<String>,
    /// OpenPGP keyring that signs the archive. Default: the distribution's keyring under
    /// /usr/share/keyrings.
    #[serde(default)]
    pub keyring: Option<PathBuf>,
    /// Extra apt repositories (e.g. the Kubernetes packages).
    #[serde(default)]
    pub repositories: Vec<Repository>,
}

impl Base {
    pub fn mirror(&self) -> &str {
        self.mirror.as_deref().unwrap_or(match self.distro {
            Distro::Debian => "http://deb.debian.org/debian",
            Distro::Ubuntu => "http://archive.ubuntu.com/ubuntu",
        })
    }
    pub fn components(&self) -> Vec<String> {
        if self.components.is_empty() {
            vec!["main".into()]
        } else {
            self.components.clone()
        }
    }
    pub fn keyring(&self) -> PathBuf {
        self.keyring.clone().unwrap_or_else(|| {
            PathBuf::from(match self.distro {
                Distro::Debian => "/usr/share/keyrings/debian-archive-keyring.gpg",
                Distro::Ubuntu => "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
            })
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Repository {
    /// Repository URL, e.g. `https://pkgs.k8s.io/core:/stable:/v1.31/deb/`.
    pub uri: String,
    /// Suite; `/` for flat repositories.
    pub suite: String,
    /// Components; empty for flat repositories.
    #[serde(default)]
    pub components: Vec<String>,
    /// Keyring file (binary or ASCII-armoured) that signs this repository, relative to the spec.
    /// Give either `key` or `key-url`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// URL of the signing key, fetched at build time; `key-fingerprint` is then required.
    #[serde(default)]
    pub key_url: Option<String>,
    /// OpenPGP fingerprint (40 hex digits) the key must have; checked before it is trusted.
    #[serde(default)]
    pub key_fingerprint: Option<String>,
}

/// Holds packages at a version: written as apt preferences before installation and marked
/// held in the image, so an upgrade never moves them.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Pin {
    /// Package names.
    pub packages: Vec<String>,
    /// Version pattern in apt's pin syntax, e.g. `1.31.*`.
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileAttrs {
    /// Octal mode as a string, e.g. `"0600"`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Owning user name (must exist in the image).
    #[serde(default)]
    pub owner: Option<String>,
    /// Owning group name (must exist in the image).
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct User {
    /// Login name.
    pub name: String,
    /// SSH public keys allowed to log in as this user. At least one.
    pub ssh_authorized_keys: Vec<String>,
    /// Supplementary groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Allow passwordless sudo (needs the `sudo` package).
    #[serde(default)]
    pub sudo: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Kernel {
    /// Extra kernel arguments, appended after labforge's own (`root=`, `rw`).
    #[serde(default)]
    pub cmdline: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Disk {
    /// EFI system partition size (holds the UKI). At least 64MiB.
    #[serde(default = "default_esp")]
    pub esp_size: Size,
    /// Root filesystem partition size. At least 512MiB and big enough for the packages.
    #[serde(default = "default_root")]
    pub root_size: Size,
    /// Initial size of the state partition, which the booted system grows to fill the disk.
    /// At least 32MiB.
    #[serde(default = "default_state")]
    pub state_size: Size,
}

fn default_esp() -> Size {
    Size::mib(256)
}
fn default_root() -> Size {
    Size::mib(2048)
}
fn default_state() -> Size {
    Size::mib(64)
}

impl Default for Disk {
    fn default() -> Self {
        Disk { esp_size: default_esp(), root_size: default_root(), state_size: default_state() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    /// `<name>.img`: the raw GPT disk image.
    Raw,
    /// `<name>.img.zst`: zstd-compressed raw image.
    Zst,
    /// `<name>.img.bmap`: bmaptool block map of the raw image.
    Bmap,
    /// `<name>.qcow2`: QEMU copy-on-write image.
    Qcow2,
    /// Netboot: `<name>.vmlinuz`, `<name>.initrd` (live-boot), `<name>.squashfs` (the root
    /// filesystem, fetched over HTTP by the initrd) and `<name>.ipxe`; the image also carries
    /// them so its master can serve them.
    Pxe,
}

impl Spec {
    /// The full package list handed to the distribution installer: what labforge needs in
    /// every image (kernel, systemd, udev, filesystems tools), what the users need (ssh, sudo)
    /// and the spec's own packages; sorted and deduplicated.
    pub fn install_packages(&self) -> Vec<String> {
        let kernel = match self.base.distro {
            Distro::Debian => "linux-image-amd64",
            Distro::Ubuntu => "linux-image-generic",
        };
        // lvm2: Rook-Ceph's OSDs need it on every node. chrony: the master is the LAN's time
        // source and every node keeps its clock from it (the agent's network::time).
        let mut all: Vec<String> = [kernel, "systemd-sysv", "udev", "kmod", "e2fsprogs", "dbus", "lvm2", "chrony"]
            .iter()
            .map(|p| p.to_string())
            .chain(self.packages.iter().cloned())
            .collect();
        if !self.users.is_empty() {
            all.push("openssh-server".into());
        }
        if self.users.iter().any(|u| u.sudo) {
            all.push("sudo".into());
        }
        // dnsmasq: on a bare switch the master serves the LAN its addresses and names;
        // nftables: and is its gateway (NAT and the uplink's firewall). systemd-resolved:
        // every node resolves with the DNS servers its DHCP lease names (the master's, on a
        // bare switch), and the master forwards the LAN's outside names to its uplink's.
        all.extend(["dnsmasq-base", "nftables", "systemd-resolved"].map(String::from));
        if self.outputs.contains(&OutputFormat::Pxe) {
            // live-boot: the initrd fetches the squashfs over HTTP and boots it; dnsmasq and
            // iPXE's EFI binary: a master serves netboot to the room.
            // fdisk (sfdisk) and dosfstools: a netbooted node installing itself onto its disk
            // writes the partition table and makes the ESP.
            all.extend(["live-boot", "dnsmasq-base", "ipxe", "fdisk", "dosfstools"].map(String::from));
        }
        all.sort();
        all.dedup();
        all
    }
}

fn default_true() -> bool {
    true
}
