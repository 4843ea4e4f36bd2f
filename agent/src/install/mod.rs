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

use serde::{Deserialize, Serialize};

use crate::disks::policy::{classify, Bytes, Class};
use crate::disks::DiskFacts;
pub use labforge_core::config::install::{check_target_name, InstallConfig, InstallMode};
pub use labforge_core::manifest::{InstallManifest, ManifestRange, MANIFEST_ON_ESP, SCHEMA_VERSION};

/// What the installer leaves on the installed disk's state partition (and its agent reads).
pub const RECORD_FILE: &str = "install.json";

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
