//! What the builder writes for the installers to read: the install manifest on the ESP (a
//! stick copying itself onto a disk) and the netinstall manifest in the image (a netbooted node
//! making its disk from the tree it runs).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Where the builder puts the install manifest on the ESP (and the installer reads it).
pub const MANIFEST_ON_ESP: &str = "labforge/install.json";
/// The install manifest's schema version.
pub const SCHEMA_VERSION: u32 = 1;

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

/// Where the builder leaves what a netbooted node needs to install itself (in the squashfs and
/// on the disk image alike).
pub const NET_MANIFEST: &str = "/usr/lib/labforge/netinstall.json";
pub const NET_SCHEMA_VERSION: u32 = 1;

/// The netboot install manifest (written by the builder's `pxe` stage).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NetManifest {
    pub schema_version: u32,
    pub image: String,
    pub input_hash: String,
    /// The GPT disk GUID (as in the disk image).
    pub disk_uuid: String,
    /// Bytes of the disk image: the smallest disk it fits.
    pub disk_size: u64,
    /// The disk image's partition table as an sfdisk script.
    pub sfdisk: String,
    pub esp: VfatFormat,
    pub root: Ext4Format,
    pub state: Ext4Format,
    /// sha256 of the UKI (`<image>.efi` in the netboot files, `EFI/BOOT/BOOTX64.EFI` on the ESP).
    pub uki_sha256: String,
    /// The disk image's `/etc/fstab` (the squashfs has a netboot one).
    pub fstab: String,
    /// Netboot files (in `pxe::ARTIFACT_DIR`) by name, with their sha256; the squashfs is not
    /// among them (it cannot hold its own hash) and is copied from the node's own boot.
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VfatFormat {
    pub label: String,
    pub volume_id: String,
    pub sectors_per_cluster: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Ext4Format {
    pub label: String,
    pub uuid: String,
}

impl NetManifest {
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).with_context(|| {
            format!("reading {} (was the image built with the pxe output by this labforge?)", path.display())
        })?;
        let m: NetManifest = serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
        if m.schema_version != NET_SCHEMA_VERSION {
            bail!("{}: schema {} (this agent reads {NET_SCHEMA_VERSION})", path.display(), m.schema_version);
        }
        Ok(m)
    }
}
