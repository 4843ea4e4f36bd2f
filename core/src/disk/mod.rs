//! Whole disks as the kernel, udev and libblkid describe them: the facts (`DiskFacts`), how
//! they are read (`probe`), and the regions a zap clears. Shared by `labforge flash` (which
//! refuses unsafe targets) and the agent (which classifies, zaps and installs).

pub mod probe;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Signature kind of a BlueStore label (ours; libblkid calls it `ceph_bluestore`).
pub const BLUESTORE: &str = "bluestore-label";
/// Signature kind for non-zero bytes no known signature explains.
pub const DATA: &str = "data";

/// Where Ceph (Squid and later) keeps BlueStore label copies, besides offset 0; a partial wipe
/// that misses them leaves a disk Ceph still recognises (rook#15545).
pub const LABEL_OFFSETS: [u64; 5] = [0, 1 << 30, 10 << 30, 100 << 30, 1000 << 30];

/// Everything the agent knows about one whole disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFacts {
    /// Kernel name, e.g. `sdb`.
    pub name: String,
    /// Device node, e.g. `/dev/sdb`.
    pub path: String,
    /// `/dev/disk/by-id/…` paths, the most specific (wwn) first.
    pub by_id: Vec<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub size_bytes: u64,
    pub rotational: bool,
    /// The kernel's removable flag.
    pub removable: bool,
    /// `usb`, `ata`, `scsi`, `nvme`, `virtio`, `mmc`…
    pub transport: Option<String>,
    pub read_only: bool,
    /// The device accepts discard (TRIM/UNMAP).
    pub discard: bool,
    pub partitions: Vec<String>,
    pub signatures: Vec<Signature>,
    /// Devices stacked on it (device mapper, md, …), of the disk or its partitions.
    pub holders: Vec<String>,
    /// Mount points (and `[swap]`) of the disk or its partitions.
    pub mounts: Vec<String>,
    /// Why this is the OS disk (holds `/`, the state partition, the booted ESP, the config
    /// partition); empty for other disks.
    pub boot: Vec<String>,
    /// The content could not be read.
    pub probe_error: Option<String>,
}

/// One on-disk signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// libblkid's type (`ext4`, `gpt`, `PMBR`, `LVM2_member`, …), [`BLUESTORE`] or [`DATA`].
    pub kind: String,
    pub offset: u64,
    /// OSD fsid for BlueStore labels, filesystem label or UUID for others.
    pub detail: Option<String>,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.kind, human_offset(self.offset))
    }
}

fn human_offset(o: u64) -> String {
    if o >= 1 << 30 && o.is_multiple_of(1 << 30) {
        format!("{} GiB", o >> 30)
    } else {
        format!("{o:#x}")
    }
}

impl DiskFacts {
    /// The id the journal knows this disk by across boots (kernel names move): its most
    /// specific by-id path, else its serial. `None` for a disk with neither.
    pub fn stable_id(&self) -> Option<String> {
        self.by_id.first().cloned().or_else(|| self.serial.as_ref().map(|s| format!("serial:{s}")))
    }

    /// The by-id path the `CephCluster` names it by (Rook accepts full udev paths), else the
    /// kernel path.
    pub fn ceph_name(&self) -> String {
        self.by_id.first().cloned().unwrap_or_else(|| self.path.clone())
    }
}

/// Zeroed at each label offset.
pub const LABEL_REGION: u64 = 200 << 10;
/// Zeroed at the end of the disk.
pub const TAIL_REGION: u64 = 1 << 20;

/// The `(offset, length)` regions a zap zeroes (and verification reads) on a disk of `size`
/// bytes: sorted, merged, inside the disk.
pub fn regions(size: u64) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> =
        LABEL_OFFSETS.iter().filter(|o| **o < size).map(|o| (*o, LABEL_REGION.min(size - o))).collect();
    if size > 0 {
        let start = size.saturating_sub(TAIL_REGION);
        r.push((start, size - start));
    }
    r.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, len) in r {
        match merged.last_mut() {
            Some((s, l)) if start <= *s + *l => *l = (*l).max(start + len - *s),
            _ => merged.push((start, len)),
        }
    }
    merged
}
