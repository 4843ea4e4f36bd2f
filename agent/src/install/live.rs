//! The live session: when the root filesystem is on removable media and install mode is on,
//! nothing may be written to the stick — the next PC boots the same stick and must not inherit
//! this one's machine id, cluster state or a grown partition table. A systemd generator
//! (`/usr/lib/systemd/system-generators/labforge-live`, which runs `labforge-agent
//! live-generator`) decides this before any unit starts and, for a live session, writes into
//! the generator's early directory (which overrides `/etc/fstab` and every unit file):
//!
//! - masks `systemd-remount-fs` (the root stays read-only, as the kernel mounted it with `ro`),
//!   `systemd-fsck-root`, `systemd-repart` (it would grow the stick's state partition), the
//!   state partition's growfs, and the ESP automounts;
//! - mounts `/var` as an overlay whose upper layer lives in `/run` (memory), `/tmp` and the
//!   state directory `/var/lib/labforge` as tmpfs;
//! - leaves `/run/labforge/live.json` saying which disk the session runs from, for the agent.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::InstallMode;
use crate::config::NodeConfig;

/// Written by the generator; its presence makes the agent run the installer.
pub const MARKER: &str = "/run/labforge/live.json";
/// Upper layers of the in-memory overlays.
const UPPER: &str = "/run/labforge/live";

/// What the generator found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    /// Kernel name of the disk the root filesystem is on.
    pub disk: String,
    /// Why that disk counts as removable.
    pub reason: String,
}

impl Live {
    /// The live session the generator recorded, if this boot is one.
    pub fn current() -> Option<Live> {
        serde_json::from_slice(&fs::read(MARKER).ok()?).ok()
    }
}

/// Install mode after the kernel command line (`labforge.install=auto|off`) has had its say.
pub fn mode(baked: InstallMode, cmdline: &str) -> InstallMode {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("labforge.install="))
        .filter_map(|v| v.parse().ok())
        .next_back()
        .unwrap_or(baked)
}

/// The disk holding the block device `major:minor` (a partition's parent), and why it counts
/// as removable media, or `None` for a fixed disk. Read from sysfs only: udev has not run yet.
pub fn removable_disk(sys: &Path, major: u64, minor: u64) -> Option<(String, String)> {
    let dev = fs::canonicalize(sys.join(format!("dev/block/{major}:{minor}"))).ok()?;
    let disk = if dev.join("partition").exists() { dev.parent()?.to_path_buf() } else { dev };
    let name = disk.file_name()?.to_string_lossy().into_owned();
    let read = |p: &str| fs::read_to_string(disk.join(p)).map(|s| s.trim().to_string()).unwrap_or_default();
    let reason = if read("removable") == "1" {
        "the kernel marks it removable"
    } else if disk.to_string_lossy().contains("/usb") {
        "it is attached over USB"
    } else if read("device/type") == "SD" {
        "it is an SD card"
    } else {
        return None;
    };
    Some((name, reason.to_string()))
}

/// The generator proper: decides, and for a live session writes the units into `early`. A
/// netbooted node (its root is live-boot's overlay in memory) gets its state directory in
/// memory too, since there is no state partition to mount.
pub fn generate(early: &Path, config: &Path, cmdline: &str, sys: &Path) -> Result<Option<Live>> {
    if crate::pxe::netbooted(cmdline) {
        write_netboot_units(early)?;
        return Ok(None);
    }
    let baked = NodeConfig::load(config).map(|c| c.install.mode).unwrap_or_default();
    if mode(baked, cmdline) == InstallMode::Off {
        return Ok(None);
    }
    let root = fs::metadata("/").context("looking at /")?;
    let (major, minor) = (nix::sys::stat::major(root.dev()), nix::sys::stat::minor(root.dev()));
    let Some((disk, reason)) = removable_disk(sys, major, minor) else { return Ok(None) };
    write_units(early, Path::new(UPPER))?;
    let live = Live { disk, reason };
    fs::create_dir_all(Path::new(MARKER).parent().expect("a directory"))?;
    fs::write(MARKER, serde_json::to_vec(&live)?)?;
    Ok(Some(live))
}

/// What must not run when the root is not this node's own disk: remounting and checking the
/// root, growing the partitions and the state filesystem, the ESP automounts.
const MASKED: &[&str] = &[
    "systemd-remount-fs.service",
    "systemd-fsck-root.service",
    "systemd-repart.service",
    "systemd-growfs@var-lib-labforge.service",
    "efi.automount",
    "boot.automount",
    "efi.mount",
    "boot.mount",
];

fn mask(early: &Path) -> Result<()> {
    fs::create_dir_all(early)?;
    for unit in MASKED {
        let link = early.join(unit);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link).with_context(|| format!("masking {unit}"))?;
    }
    Ok(())
}

/// A netboot: the root (live-boot's overlay) is in memory already; the state directory is
/// too, instead of the state partition the node does not have.
pub fn write_netboot_units(early: &Path) -> Result<()> {
    mask(early)?;
    let header = "# Written by labforge-agent live-generator: this node booted over the network.\n";
    write_mounts(
        early,
        &[
            (
                "var-lib-labforge.mount",
                tmpfs(header, "/var/lib/labforge", "the state directory in memory (netboot)", "mode=0755"),
            ),
            // containerd's overlayfs snapshotter cannot stack its layers on live-boot's overlay
            // root ("failed to mount: invalid argument"); on a tmpfs of their own they run.
            (
                "var-lib-containerd.mount",
                tmpfs(
                    header,
                    "/var/lib/containerd",
                    "containerd's images and snapshots in memory (netboot)",
                    "mode=0711",
                ),
            ),
        ],
    )
}

fn write_mounts(early: &Path, mounts: &[(&str, String)]) -> Result<()> {
    let requires = early.join("local-fs.target.requires");
    fs::create_dir_all(&requires)?;
    for (unit, text) in mounts {
        fs::write(early.join(unit), text)?;
        let link = requires.join(unit);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(PathBuf::from("..").join(unit), &link)?;
    }
    Ok(())
}

/// Units (and masks) of a live session; `upper` holds the overlays' upper layers.
pub fn write_units(early: &Path, upper: &Path) -> Result<()> {
    mask(early)?;
    let var_upper = upper.join("var/upper");
    let var_work = upper.join("var/work");
    fs::create_dir_all(&var_upper)?;
    fs::create_dir_all(&var_work)?;
    let header = "# Written by labforge-agent live-generator: this boot runs from removable media\n# with install mode on, and nothing is written to it.\n";
    let mounts: [(&str, String); 3] = [
        (
            "var.mount",
            format!(
                "{header}[Unit]\nDescription=/var in memory (live session)\nDefaultDependencies=no\nConflicts=umount.target\nBefore=local-fs.target umount.target\n\n[Mount]\nWhat=overlay\nWhere=/var\nType=overlay\nOptions=lowerdir=/var,upperdir={},workdir={}\n",
                var_upper.display(),
                var_work.display()
            ),
        ),
        ("var-lib-labforge.mount", tmpfs(header, "/var/lib/labforge", "the state directory in memory (live session)", "mode=0755")),
        ("tmp.mount", tmpfs(header, "/tmp", "/tmp in memory (live session)", "mode=1777,nosuid,nodev")),
    ];
    write_mounts(early, &mounts)
}

fn tmpfs(header: &str, at: &str, what: &str, options: &str) -> String {
    format!(
        "{header}[Unit]\nDescription={what}\nDefaultDependencies=no\nConflicts=umount.target\nBefore=local-fs.target umount.target\n\n[Mount]\nWhat=tmpfs\nWhere={at}\nType=tmpfs\nOptions={options}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_has_the_last_word_on_the_mode() {
        assert_eq!(mode(InstallMode::Auto, "quiet"), InstallMode::Auto);
        assert_eq!(mode(InstallMode::Auto, "labforge.install=off"), InstallMode::Off);
        assert_eq!(mode(InstallMode::Off, "labforge.install=auto ro"), InstallMode::Auto);
        assert_eq!(mode(InstallMode::Off, "labforge.install=maybe"), InstallMode::Off, "a bad value changes nothing");
    }

    /// A sysfs tree: /sys/dev/block/M:m → ../../devices/…/block/<disk>/<part>.
    fn sysfs(dir: &Path, disk_path: &str, disk: &str, flags: &[(&str, &str)]) -> PathBuf {
        let sys = dir.join("sys");
        let d = sys.join(disk_path).join("block").join(disk);
        let p = d.join(format!("{disk}2"));
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("partition"), "2\n").unwrap();
        for (k, v) in flags {
            let f = d.join(k);
            fs::create_dir_all(f.parent().unwrap()).unwrap();
            fs::write(f, v).unwrap();
        }
        fs::create_dir_all(sys.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(&p, sys.join("dev/block/8:2")).unwrap();
        sys
    }

    #[test]
    fn finds_the_removable_disk_under_a_root_partition() {
        let d = tempfile::tempdir().unwrap();
        let usb = sysfs(
            &d.path().join("a"),
            "devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0",
            "sda",
            &[("removable", "0")],
        );
        assert_eq!(removable_disk(&usb, 8, 2), Some(("sda".into(), "it is attached over USB".into())));
        let flagged =
            sysfs(&d.path().join("b"), "devices/pci0000:00/0000:00:1f.2/ata1/host0", "sdb", &[("removable", "1")]);
        assert_eq!(removable_disk(&flagged, 8, 2).unwrap().1, "the kernel marks it removable");
        let sd = sysfs(
            &d.path().join("c"),
            "devices/platform/mmc0/mmc_host/mmc0/mmc0:0001",
            "mmcblk0",
            &[("removable", "0"), ("device/type", "SD")],
        );
        assert_eq!(removable_disk(&sd, 8, 2).unwrap().1, "it is an SD card");
        let emmc = sysfs(
            &d.path().join("e"),
            "devices/platform/mmc1/mmc_host/mmc1/mmc1:0001",
            "mmcblk1",
            &[("removable", "0"), ("device/type", "MMC")],
        );
        assert_eq!(removable_disk(&emmc, 8, 2), None, "soldered eMMC is an internal disk");
        let virtio =
            sysfs(&d.path().join("v"), "devices/pci0000:00/0000:00:04.0/virtio1", "vda", &[("removable", "0")]);
        assert_eq!(removable_disk(&virtio, 8, 2), None);
    }

    #[test]
    fn a_live_session_masks_what_writes_the_stick_and_mounts_memory() {
        let d = tempfile::tempdir().unwrap();
        let early = d.path().join("early");
        write_units(&early, &d.path().join("upper")).unwrap();
        for masked in [
            "systemd-remount-fs.service",
            "systemd-repart.service",
            "systemd-growfs@var-lib-labforge.service",
            "efi.automount",
        ] {
            assert_eq!(fs::read_link(early.join(masked)).unwrap(), Path::new("/dev/null"), "{masked}");
        }
        let var = fs::read_to_string(early.join("var.mount")).unwrap();
        assert!(
            var.contains("Type=overlay")
                && var.contains(&format!("upperdir={}", d.path().join("upper/var/upper").display())),
            "{var}"
        );
        assert!(d.path().join("upper/var/work").is_dir());
        let state = fs::read_to_string(early.join("var-lib-labforge.mount")).unwrap();
        assert!(state.contains("What=tmpfs") && state.contains("Where=/var/lib/labforge"), "{state}");
        assert_eq!(fs::read_link(early.join("local-fs.target.requires/tmp.mount")).unwrap(), Path::new("../tmp.mount"));
        // Running again (a daemon-reload) is harmless.
        write_units(&early, &d.path().join("upper")).unwrap();
    }

    #[test]
    fn a_netboot_keeps_the_state_directory_and_containerd_on_tmpfs() {
        let d = tempfile::tempdir().unwrap();
        let early = d.path().join("early");
        write_netboot_units(&early).unwrap();
        assert_eq!(fs::read_link(early.join("systemd-remount-fs.service")).unwrap(), Path::new("/dev/null"));
        assert!(fs::read_to_string(early.join("var-lib-labforge.mount")).unwrap().contains("What=tmpfs"));
        let c = fs::read_to_string(early.join("var-lib-containerd.mount")).unwrap();
        assert!(c.contains("What=tmpfs") && c.contains("Where=/var/lib/containerd"), "{c}");
        assert!(early.join("local-fs.target.requires/var-lib-containerd.mount").exists());
        assert!(!early.join("var.mount").exists(), "live-boot's root overlay is writable already");
    }
}
