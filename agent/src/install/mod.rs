//! Installing the image from the stick it booted from onto the PC's internal disk.
//!
//! A node that boots from removable media with install mode on (`[install] mode = "auto"`, the
//! default, or `labforge.install=auto`) runs a *live session*: the generator (`live`) keeps the
//! stick read-only and puts `/var` and the state directory in memory, so the stick comes out
//! byte for byte as it went in and the next PC gets the same stick. The agent then chooses the
//! target (`choose`, pure and table-tested): the disk named in the config, else the smallest
//! blank internal disk of at least `min-size` — never the boot medium, a removable disk, a Ceph
//! OSD or a disk holding data. It copies the used blocks of the boot medium's partitions (the
//! ranges and sha256 the builder recorded in the ESP's `labforge/install.json`), reads them
//! back, grows the state partition to the end of the disk, checks the UKI, marks the disk
//! installed and reboots into it (`write`).

pub mod live;
pub mod net;
pub mod session;
pub mod write;

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::disks::policy::{classify, Bytes, Class};
use crate::disks::DiskFacts;

/// Where the builder puts the install manifest on the ESP (and the installer reads it).
pub const MANIFEST_ON_ESP: &str = "labforge/install.json";
/// What the installer leaves on the installed disk's state partition (and its agent reads).
pub const RECORD_FILE: &str = "install.json";
pub const SCHEMA_VERSION: u32 = 1;

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

/// The install manifest the builder writes to the ESP: how the image's disk is laid out and
/// the sha256 of every used block range outside the ESP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InstallManifest {
    pub schema_version: u32,
    pub image: String,
    pub input_hash: String,
    /// The GPT disk GUID: a disk carrying it holds (a copy of) this image.
    pub disk_uuid: String,
    /// Bytes of the image (the last partition ends 1 MiB before).
    pub disk_size: u64,
    /// sha256 of the UKI at `EFI/BOOT/BOOTX64.EFI`.
    pub uki_sha256: String,
    /// Used ranges in the image, in offset order: the GPT area, the ESP (whole: it holds this
    /// file, so its hash is taken while copying), the root and state filesystems' blocks.
    pub ranges: Vec<ManifestRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ManifestRange {
    pub offset: u64,
    pub len: u64,
    /// Absent for the ESP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl InstallManifest {
    pub fn parse(text: &str) -> Result<Self> {
        let m: InstallManifest = serde_json::from_str(text)?;
        if m.schema_version != SCHEMA_VERSION {
            bail!("install manifest schema {} (this agent reads {SCHEMA_VERSION})", m.schema_version);
        }
        Ok(m)
    }

    /// The ranges to copy, with their hashes decoded.
    pub fn copy_ranges(&self) -> Result<Vec<crate::blockcopy::Range>> {
        self.ranges
            .iter()
            .map(|r| {
                let sha256 = match &r.sha256 {
                    Some(h) => {
                        let mut b = [0u8; 32];
                        hex::decode_to_slice(h, &mut b)
                            .map_err(|_| anyhow::anyhow!("bad sha256 {h:?} in the install manifest"))?;
                        Some(b)
                    }
                    None => None,
                };
                Ok(crate::blockcopy::Range { offset: r.offset, len: r.len, sha256 })
            })
            .collect()
    }
}

/// What the installer leaves on the installed disk, and the installed node reports.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct InstallRecord {
    pub image: String,
    pub input_hash: String,
    /// The stick it came from (by-id path, else kernel name at the time).
    pub source: String,
    /// The disk it went to.
    pub target: String,
    pub bytes: u64,
    pub seconds: f64,
    /// Seconds since the epoch.
    pub installed_at: u64,
}

/// What a disk already holds of labforge, as the installer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Existing {
    /// Its GPT disk GUID is this image's: it holds (part of) a copy of it.
    pub this_image: bool,
    /// The installer's record is on its state partition: the copy is complete.
    pub complete: bool,
}

/// The installer's choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Install onto this disk.
    Install { disk: String, reason: String },
    /// A disk already holds a complete install of this image: nothing to write.
    Installed { disk: String },
    /// No safe target: nothing is written.
    Refuse { reason: String },
}

/// Chooses the install target among `disks` (the boot medium among them) for an image of
/// `image_size` bytes. `existing(d)` says what a disk holds of labforge.
pub fn choose(
    disks: &[DiskFacts],
    cfg: &InstallConfig,
    image_size: u64,
    existing: &dyn Fn(&DiskFacts) -> Existing,
) -> Choice {
    let need = image_size.max(1);
    let unsafe_reason = |d: &DiskFacts| -> Option<String> {
        let c = classify(d);
        match c.class {
            Class::Os => Some(format!("it is the boot medium ({})", c.reason)),
            Class::Removable => Some(format!("it is removable ({})", c.reason)),
            Class::CephOsd => Some(format!("it is a Ceph OSD ({})", c.reason)),
            _ if d.read_only => Some("it is read-only".into()),
            _ if d.size_bytes < need => {
                Some(format!("it is smaller ({}) than the image ({})", Bytes(d.size_bytes), Bytes(need)))
            }
            _ => None,
        }
    };
    if let Some(done) = disks.iter().find(|d| unsafe_reason(d).is_none() && existing(d).complete) {
        return Choice::Installed { disk: name(done) };
    }
    if let Some(t) = &cfg.target {
        let Some(d) = disks.iter().find(|d| {
            d.by_id.iter().any(|b| b == t) || t.strip_prefix("serial:").is_some_and(|s| d.serial.as_deref() == Some(s))
        }) else {
            let seen: Vec<String> = disks.iter().map(name).collect();
            return Choice::Refuse { reason: format!("the install target {t} is not attached (disks here: {}); fix [install] target or labforge.install-target", seen.join(", ")) };
        };
        return match unsafe_reason(d) {
            Some(why) => Choice::Refuse { reason: format!("not installing onto the named target {}: {why}", name(d)) },
            None => {
                Choice::Install { disk: d.name.clone(), reason: format!("{} is the named install target", name(d)) }
            }
        };
    }
    let mut passed = Vec::new();
    let mut candidates: Vec<&DiskFacts> = Vec::new();
    for d in disks {
        let why = unsafe_reason(d).or_else(|| {
            let e = existing(d);
            let c = classify(d);
            if d.size_bytes < cfg.min_size.0 {
                Some(format!("it is smaller than install min-size {}", cfg.min_size))
            } else if c.class == Class::Blank || e.this_image {
                None
            } else {
                Some(format!("it holds data ({})", c.reason))
            }
        });
        match why {
            Some(w) => passed.push(format!("{}: {w}", name(d))),
            None => candidates.push(d),
        }
    }
    candidates.sort_by_key(|d| (d.size_bytes, d.name.clone()));
    match candidates.first() {
        Some(d) => {
            let what = if existing(d).this_image { "holds an unfinished install of this image" } else { "is blank" };
            Choice::Install { disk: d.name.clone(), reason: format!("{} {what}; the smallest such internal disk of at least {}", name(d), cfg.min_size) }
        }
        None => Choice::Refuse {
            reason: format!(
                "no disk is safe to install onto, so nothing was written ({}). To install onto a disk that holds data, name it: labforge.install-target=/dev/disk/by-id/… on the kernel command line, target in [install] of the config partition's labforge.toml, or [install] target in the image spec; labforge.install=off runs the stick as it is",
                if passed.is_empty() { "no disks".to_string() } else { passed.join("; ") }
            ),
        },
    }
}

/// How a disk is named to the user: its by-id path, else its kernel path.
pub fn name(d: &DiskFacts) -> String {
    d.by_id.first().cloned().unwrap_or_else(|| d.path.clone())
}

#[cfg(test)]
mod tests;
