//! Whole disks as the kernel, udev and libblkid describe them: the facts (`DiskFacts`), how
//! they are read (`probe`), and the regions a zap clears. Shared by `labforge flash` (which
//! refuses unsafe targets) and the agent (which classifies, zaps and installs).

pub mod probe;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

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
    /// The kernel's `major:minor` of the device when it was probed (a write checks the node it
    /// opens is still this device).
    #[serde(default)]
    pub devnum: String,
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

/// Opens a disk for writing, once, the way every destructive write does: exclusively
/// (`O_EXCL`: the kernel refuses while the disk or one of its partitions is mounted or held),
/// and only if the node is still the device probed as `devnum` (`major:minor`): a disk
/// swapped or renamed since the probe is never written. (A regular file, as in tests, has no
/// device number to check.)
pub fn open_exclusive(path: &Path, devnum: &str) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
        .with_context(|| format!("opening {} exclusively (is it mounted or in use?)", path.display()))?;
    let m = f.metadata().with_context(|| format!("reading {}", path.display()))?;
    if m.file_type().is_block_device() {
        let now = format!("{}:{}", nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev()));
        if now != devnum {
            bail!(
                "{} is now device {now}, not the {} that was looked at: the disks changed, nothing was written",
                path.display(),
                if devnum.is_empty() { "unknown device" } else { devnum }
            );
        }
    } else if !m.file_type().is_file() {
        bail!("{} is not a block device", path.display());
    }
    Ok(f)
}

/// How every destructive write starts: the signatures libblkid finds on `path` are listed
/// (first: `wipefs` opens the disk too), the disk is opened by [`open_exclusive`], and they are
/// zeroed through that descriptor, as `wipefs --all` would. Returns the descriptor to write
/// through.
pub fn open_wiped(path: &Path, devnum: &str, size: u64) -> Result<File> {
    let found = probe::blkid_signatures(path).context("listing signatures (wipefs --json)")?;
    let mut f = open_exclusive(path, devnum)?;
    erase_signatures(&mut f, &found, size).with_context(|| format!("erasing old signatures on {}", path.display()))?;
    Ok(f)
}

/// What [`erase_signatures`] zeroes around each signature: the aligned 4 KiB block holding it.
pub const SIGNATURE_BLOCK: u64 = 4096;

/// Zeroes the aligned block holding each signature's offset (as `wipefs --all` erases what
/// libblkid finds), through `f`, then flushes. Offsets past `size` are skipped.
pub fn erase_signatures(f: &mut File, signatures: &[Signature], size: u64) -> Result<()> {
    let zeros = [0u8; SIGNATURE_BLOCK as usize];
    for s in signatures {
        let start = s.offset / SIGNATURE_BLOCK * SIGNATURE_BLOCK;
        let len = SIGNATURE_BLOCK.min(size.saturating_sub(start));
        if len == 0 {
            continue;
        }
        f.seek(SeekFrom::Start(start))?;
        f.write_all(&zeros[..len as usize]).with_context(|| format!("erasing {s}"))?;
    }
    f.sync_data().context("flushing")?;
    Ok(())
}

#[cfg(test)]
mod write_tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn exclusive_open_refuses_what_is_not_a_disk_or_a_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("disk.img");
        std::fs::write(&f, vec![0u8; 8192]).unwrap();
        assert!(open_exclusive(&f, "8:16").is_ok(), "a regular file (tests) has no device number to check");
        let e = open_exclusive(Path::new("/dev/null"), "1:3").unwrap_err();
        assert!(format!("{e:#}").contains("not a block device"), "{e:#}");
        assert!(open_exclusive(&d.path().join("gone"), "8:16").is_err());
    }

    #[test]
    fn signatures_are_erased_block_by_block_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.img");
        std::fs::write(&p, vec![0xaau8; 5 * 4096 + 100]).unwrap();
        let size = std::fs::metadata(&p).unwrap().len();
        let sig = |offset| Signature { kind: "ext4".into(), offset, detail: None };
        let mut f = open_exclusive(&p, "").unwrap();
        // ext4's magic at 0x438, one in the third block, one in the short last block, one past the end.
        erase_signatures(&mut f, &[sig(0x438), sig(2 * 4096 + 7), sig(5 * 4096 + 10), sig(size + 4096)], size).unwrap();
        let mut bytes = Vec::new();
        std::fs::File::open(&p).unwrap().read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, size, "nothing written past the end");
        let zero = |r: std::ops::Range<usize>| bytes[r].iter().all(|&b| b == 0);
        let kept = |r: std::ops::Range<usize>| bytes[r].iter().all(|&b| b == 0xaa);
        assert!(
            zero(0..4096) && kept(4096..8192) && zero(8192..12288) && kept(12288..20480) && zero(20480..bytes.len())
        );
    }
}
