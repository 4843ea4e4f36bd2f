//! Zapping a disk for Rook-Ceph, as Rook's teardown documentation does it, made safe to cut
//! the power in the middle of. The disk is opened once, exclusively (`O_EXCL`: refused while
//! anything mounts or holds it), and only if it is still the device that was probed; every
//! write goes through that descriptor:
//!
//! 1. every signature libblkid finds (listed by `wipefs --json`, which writes nothing) zeroed,
//!    as `wipefs --all` would (both GPT headers and the protective MBR among them);
//! 2. discard of the whole device when it supports it (`blkdiscard` on our descriptor);
//! 3. zeroes over 200 KiB at 0, 1, 10, 100 and 1000 GiB (where Ceph keeps BlueStore label
//!    copies; those past the end are skipped) and over the last MiB (backup GPT, md and other
//!    end-of-disk metadata), then fsync;
//! 4. re-read of the partition table and `udevadm settle`;
//! 5. verification: no signature, no label, no non-zero byte left in those regions.
//!
//! Every step is idempotent, so resuming an interrupted zap is running it again.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use crate::sys::Cmd;
use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use super::probe;
pub use labforge_core::disk::{regions, LABEL_REGION, TAIL_REGION};

/// Environment variable naming a file; while it exists, a zap of the disk whose by-id path the
/// file holds (any disk if it is empty) waits after its first steps. For power-cut tests only.
pub const HOLD_ENV: &str = "LABFORGE_TEST_HOLD_ZAP";

/// Progress a zap reports (journalled by the caller after each step).
pub trait Progress {
    fn step(&mut self, step: &str) -> Result<()>;
}

impl<F: FnMut(&str) -> Result<()>> Progress for F {
    fn step(&mut self, step: &str) -> Result<()> {
        self(step)
    }
}

/// How long one of the small disk tools may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// Zaps the device at `dev` (probed as `devnum`, `size` bytes; `discard` if it supports it),
/// then verifies. `id` names it in logs and for the test hold.
pub fn zap(dev: &Path, devnum: &str, id: &str, size: u64, discard: bool, progress: &mut dyn Progress) -> Result<()> {
    let block = fs::metadata(dev).with_context(|| format!("{} is gone", dev.display()))?.file_type().is_block_device();
    let mut f = labforge_core::disk::open_wiped(dev, devnum, size)?;
    progress.step("wipefs")?;
    if discard && block {
        // Not every device that claims discard honours it; the zeroes below do not depend on it.
        // blkdiscard opens our descriptor's device through /proc (the same open device, not a
        // name looked up again), without O_EXCL, which we hold.
        let ours = format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd());
        match Cmd::new("blkdiscard").arg("--force").arg(&ours).timeout(TOOL_TIMEOUT).run() {
            Ok(_) => progress.step("discard")?,
            Err(e) => warn!("{id}: blkdiscard failed, zeroing anyway: {e:#}"),
        }
    }
    let zeros = vec![0u8; TAIL_REGION as usize];
    for (i, (start, len)) in regions(size).into_iter().enumerate() {
        f.seek(SeekFrom::Start(start))?;
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])
                .with_context(|| format!("writing zeroes at offset {start} of {}", dev.display()))?;
            left -= n as u64;
        }
        f.sync_data().with_context(|| format!("flushing {}", dev.display()))?;
        progress.step(&format!("zero@{start}"))?;
        if i == 0 {
            hold(id);
        }
    }
    drop(f);
    if block {
        if let Err(e) = Cmd::new("blockdev").arg("--rereadpt").arg(dev).timeout(TOOL_TIMEOUT).run() {
            warn!("{id}: re-reading the partition table: {e:#}");
        }
        crate::sys::cmd::udev_settle();
    }
    verify(dev, size)?;
    progress.step("verified")?;
    Ok(())
}

/// Fails unless the device carries no signature, no label and no non-zero byte in the zap
/// regions.
pub fn verify(dev: &Path, size: u64) -> Result<()> {
    let left = probe::signatures(dev, size)?;
    if !left.is_empty() {
        let s: Vec<String> = left.iter().map(|s| s.to_string()).collect();
        bail!("after the zap {} still shows: {}", dev.display(), s.join(", "));
    }
    Ok(())
}

/// Waits while the test hold file exists and names this disk (or nothing).
fn hold(id: &str) {
    let Some(file) = std::env::var_os(HOLD_ENV) else { return };
    let holds = |f: &std::ffi::OsStr| fs::read_to_string(f).is_ok_and(|t| t.trim().is_empty() || t.trim() == id);
    if !holds(&file) {
        return;
    }
    info!("{id}: holding the zap at the test hook while {} exists", Path::new(&file).display());
    println!("labforge-disks holding zap of {id}");
    while holds(&file) {
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disks::probe::tests::write_label;
    use std::io::Read;
    use std::process::Command;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn regions_cover_label_offsets_and_the_end() {
        let k = LABEL_REGION;
        assert_eq!(
            regions(2000 * GIB),
            vec![(0, k), (GIB, k), (10 * GIB, k), (100 * GIB, k), (1000 * GIB, k), (2000 * GIB - MIB, MIB)]
        );
        assert_eq!(regions(20 * GIB), vec![(0, k), (GIB, k), (10 * GIB, k), (20 * GIB - MIB, MIB)]);
        // Smaller than the offsets: what is inside, merged where they overlap.
        assert_eq!(regions(512 * MIB), vec![(0, k), (511 * MIB, MIB)]);
        assert_eq!(regions(MIB), vec![(0, MIB)]);
        assert_eq!(regions(100 << 10), vec![(0, 100 << 10)]);
        // The tail overlapping a label region.
        assert_eq!(regions(GIB + (100 << 10)), vec![(0, k), (GIB + (100 << 10) - MIB, MIB)]);
        assert_eq!(regions(0), vec![]);
    }

    fn nonzero_at(path: &Path, off: u64, len: usize) -> bool {
        let mut f = fs::File::open(path).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        let mut b = vec![0; len];
        f.read_exact(&mut b).unwrap();
        b.iter().any(|x| *x != 0)
    }

    #[test]
    fn zap_clears_gpt_filesystems_and_label_copies() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("disk");
        let size = 12 * GIB;
        fs::File::create(&dev).unwrap().set_len(size).unwrap();
        let ok =
            Command::new("sfdisk").arg("-q").arg(&dev).stdin(std::process::Stdio::piped()).spawn().and_then(|mut c| {
                c.stdin.take().unwrap().write_all(b"label: gpt\n,100M\n")?;
                c.wait()
            });
        assert!(ok.unwrap().success());
        write_label(&dev, GIB, "6f1c4b6e-0d4e-4a0e-9d55-2f0b3c6f8a11");
        write_label(&dev, 10 * GIB, "6f1c4b6e-0d4e-4a0e-9d55-2f0b3c6f8a11");
        // Data outside every region survives (a zap is not a secure erase).
        {
            let mut f = fs::OpenOptions::new().write(true).open(&dev).unwrap();
            f.seek(SeekFrom::Start(5 * GIB)).unwrap();
            f.write_all(b"keep").unwrap();
        }
        assert!(!probe::signatures(&dev, size).unwrap().is_empty());
        let mut steps = Vec::new();
        zap(&dev, "", "test", size, false, &mut |s: &str| {
            steps.push(s.to_string());
            Ok(())
        })
        .unwrap();
        assert_eq!(
            steps,
            [
                "wipefs",
                "zero@0",
                &format!("zero@{GIB}"),
                &format!("zero@{}", 10 * GIB),
                &format!("zero@{}", size - MIB),
                "verified"
            ]
        );
        assert!(probe::signatures(&dev, size).unwrap().is_empty());
        for off in [0, GIB, 10 * GIB, size - MIB] {
            assert!(!nonzero_at(&dev, off, 4096), "zero at {off}");
        }
        assert!(nonzero_at(&dev, 5 * GIB, 4));
    }

    #[test]
    fn a_failing_step_stops_the_zap() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("disk");
        fs::File::create(&dev).unwrap().set_len(64 * MIB).unwrap();
        let err = zap(&dev, "", "test", 64 * MIB, false, &mut |s: &str| {
            if s.starts_with("zero") {
                bail!("journal full")
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("journal full"));
        let err = zap(&d.path().join("gone"), "", "test", 64 * MIB, false, &mut |_: &str| Ok(())).unwrap_err();
        assert!(format!("{err:#}").contains("is gone"), "{err:#}");
    }

    #[test]
    fn verify_names_what_is_left() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("disk");
        fs::File::create(&dev).unwrap().set_len(2 * GIB).unwrap();
        write_label(&dev, GIB, "6f1c4b6e-0d4e-4a0e-9d55-2f0b3c6f8a11");
        let err = format!("{:#}", verify(&dev, 2 * GIB).unwrap_err());
        assert!(err.contains("bluestore-label at 1 GiB"), "{err}");
    }
}
