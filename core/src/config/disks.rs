//! The spec's `[disks]` table: which data disks a node may prepare for Rook-Ceph, with the sizes
//! and size ranges it is written in.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::disk::DiskFacts;

/// The spec's `[disks]` table: which data disks the agent may prepare for Rook-Ceph.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DisksConfig {
    /// `never` (report only; blank disks are still offered to Ceph), `blank-only` (zap and offer
    /// disks with no signature, partition or data at all) or `force` (also zap disks holding data
    /// that `match` selects). The OS disk, removable disks and Ceph OSDs are never zapped.
    #[serde(default)]
    pub wipe: Wipe,
    /// Disks to consider. Required with `wipe = "force"`; with the other policies it narrows
    /// which blank disks are offered to Ceph.
    #[serde(default, rename = "match")]
    pub select: Option<DiskMatch>,
    /// Disks smaller than this are left alone.
    #[serde(default = "default_min_size")]
    pub min_size: Bytes,
    /// Treat removable and USB disks like internal ones (they are never touched otherwise).
    #[serde(default)]
    pub removable: bool,
}

/// Selects disks by `/dev/disk/by-id` glob and/or size; a disk must satisfy every part given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskMatch {
    /// Globs over a disk's `/dev/disk/by-id/…` paths, e.g. `"/dev/disk/by-id/ata-WDC_WD40*"`;
    /// a disk matches if any of its by-id paths matches any glob.
    #[serde(default)]
    pub by_id: Vec<String>,
    /// Size range `"MIN..MAX"`, either end optional, e.g. `"900GB..1100GB"` or `"2TiB.."`.
    #[serde(default)]
    pub size: Option<SizeRange>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Wipe {
    Never,
    #[default]
    BlankOnly,
    Force,
}

fn default_min_size() -> Bytes {
    Bytes(10 << 30)
}

impl Default for DisksConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl Wipe {
    pub fn as_str(self) -> &'static str {
        match self {
            Wipe::Never => "never",
            Wipe::BlankOnly => "blank-only",
            Wipe::Force => "force",
        }
    }
}

/// by-id paths a glob that selects "every disk" would match: if a glob matches all of these,
/// it would match the OS disk of any machine too.
const EVERY_KIND_OF_DISK: &[&str] = &[
    "/dev/disk/by-id/ata-Samsung_SSD_870_EVO_1TB_S6PTNX0T123456A",
    "/dev/disk/by-id/nvme-Samsung_SSD_980_1TB_S64ANS0T123456B",
    "/dev/disk/by-id/nvme-eui.002538b111111111",
    "/dev/disk/by-id/scsi-SATA_ST4000DM004-2CV1_ZFN0ABCD",
    "/dev/disk/by-id/usb-SanDisk_Ultra_4C530001234567890123-0:0",
    "/dev/disk/by-id/virtio-os",
    "/dev/disk/by-id/wwn-0x5002538e12345678",
    "/dev/disk/by-id/mmc-SD32G_0x12345678",
];

impl DisksConfig {
    /// Checks what can be checked without the node: used by the builder on the spec and by the
    /// agent on every layer.
    pub fn validate(&self) -> Result<()> {
        if let Some(m) = &self.select {
            if m.by_id.is_empty() && m.size.is_none() {
                bail!("[disks.match] is empty: give by-id globs, a size range, or both");
            }
            for g in &m.by_id {
                let p =
                    glob::Pattern::new(g).with_context(|| format!("[disks.match] by-id {g:?} is not a valid glob"))?;
                if !g.starts_with("/dev/disk/by-id/") {
                    bail!("[disks.match] by-id {g:?} must start with /dev/disk/by-id/ (it is matched against those paths)");
                }
                if EVERY_KIND_OF_DISK.iter().all(|id| p.matches(id)) {
                    bail!(
                        "[disks.match] by-id {g:?} selects every disk, which includes the OS disk; name the data disks (model, serial or wwn), e.g. \"/dev/disk/by-id/ata-ST4000DM004*\""
                    );
                }
            }
            if let Some(r) = &m.size {
                if r.min.is_none() && r.max.is_none() {
                    bail!("[disks.match] size \"..\" selects every disk; give at least one end");
                }
            }
        }
        if self.wipe == Wipe::Force && self.select.is_none() {
            bail!(
                "wipe = \"force\" needs a [disks.match] naming the disks it may wipe (by-id globs and/or a size range); without one it would wipe every disk holding data"
            );
        }
        Ok(())
    }
}

impl DiskMatch {
    /// Whether the disk satisfies every part of the match.
    pub fn matches(&self, d: &DiskFacts) -> bool {
        let by_id = self.by_id.is_empty()
            || self
                .by_id
                .iter()
                .filter_map(|g| glob::Pattern::new(g).ok())
                .any(|p| d.by_id.iter().any(|id| p.matches(id)));
        let size = self.size.as_ref().is_none_or(|r| r.contains(d.size_bytes));
        by_id && size
    }
}

/// A byte count written with a unit: `"10GiB"`, `"500GB"`, `"256MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl FromStr for Bytes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.is_empty() || t.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("invalid size {s:?}: write a number with a unit, such as \"10GiB\" or \"500GB\""));
        }
        let b: bytesize::ByteSize = t
            .parse()
            .map_err(|_| format!("invalid size {s:?}: write a number with a unit, such as \"10GiB\" or \"500GB\""))?;
        Ok(Bytes(b.as_u64()))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        const UNITS: &[(u64, &str)] = &[(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (n, u) in UNITS {
            if b >= *n && b.is_multiple_of(*n) {
                return write!(f, "{}{u}", b / n);
            }
        }
        write!(f, "{b}B")
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}
impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl JsonSchema for Bytes {
    fn schema_name() -> String {
        "Bytes".into()
    }
    fn json_schema(g: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        String::json_schema(g)
    }
}

/// `"MIN..MAX"`, both ends inclusive, either optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRange {
    pub min: Option<Bytes>,
    pub max: Option<Bytes>,
}

impl SizeRange {
    pub fn contains(&self, n: u64) -> bool {
        self.min.is_none_or(|m| n >= m.0) && self.max.is_none_or(|m| n <= m.0)
    }
}

impl FromStr for SizeRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once("..").ok_or_else(|| {
            format!("invalid size range {s:?}: write \"MIN..MAX\", e.g. \"900GB..1100GB\" or \"2TiB..\"")
        })?;
        let end = |x: &str| if x.trim().is_empty() { Ok(None) } else { x.parse().map(Some) };
        let r = SizeRange { min: end(a)?, max: end(b)? };
        if let (Some(lo), Some(hi)) = (r.min, r.max) {
            if lo > hi {
                return Err(format!("invalid size range {s:?}: the minimum is above the maximum"));
            }
        }
        Ok(r)
    }
}

impl fmt::Display for SizeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(m) = self.min {
            write!(f, "{m}")?;
        }
        f.write_str("..")?;
        if let Some(m) = self.max {
            write!(f, "{m}")?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for SizeRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}
impl Serialize for SizeRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl JsonSchema for SizeRange {
    fn schema_name() -> String {
        "SizeRange".into()
    }
    fn json_schema(g: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        String::json_schema(g)
    }
}
