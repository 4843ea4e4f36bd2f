//! The optional config partition: a FAT partition labelled `LABFORGE` carrying `labforge.toml`
//! and/or `cluster.secret`, mounted read-only for the moment it takes to read them.

use std::fs;

use anyhow::{Context, Result};

pub use crate::disks::probe::CONFIG_LABEL;

/// Files found on the config partition (FAT, label `LABFORGE`), if one is attached.
#[derive(Debug, Default)]
pub struct ConfigPartition {
    pub device: String,
    pub labforge_toml: Option<String>,
    pub cluster_secret: Option<String>,
}

/// Reads `labforge.toml` and `cluster.secret` from the partition labelled `LABFORGE` on the
/// medium this PC booted from, mounted read-only for the moment it takes. One on any other
/// disk (a stick someone plugged in) is ignored, with a warning naming the disk: it could
/// otherwise hand the PC another cluster's secret. A netbooted PC has no boot medium and takes
/// none.
pub fn read(notices: &mut Vec<String>) -> Result<Option<ConfigPartition>> {
    let roots = crate::disks::probe::Roots::default();
    let mut chosen = None;
    for c in crate::disks::probe::config_candidates(&roots) {
        if !c.on_boot_medium {
            notices.push(format!(
                "ignoring the {CONFIG_LABEL} config partition {} on disk {}: it is not on the medium this PC booted \
                 from (config partitions count only there)",
                c.device.display(),
                c.disk
            ));
        } else if chosen.is_none() {
            chosen = Some(c.device);
        }
    }
    let Some(dev) = chosen else {
        return Ok(None);
    };
    let mnt = tempfile::Builder::new().prefix("labforge-config-").tempdir_in("/run").context("making a mount point")?;
    use nix::mount::{mount, umount, MsFlags};
    mount(
        Some(&dev),
        mnt.path(),
        Some("vfat"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| format!("mounting config partition {} read-only", dev.display()))?;
    let read = |name: &str| fs::read_to_string(mnt.path().join(name)).ok();
    let found = ConfigPartition {
        device: dev.display().to_string(),
        labforge_toml: read("labforge.toml"),
        cluster_secret: read("cluster.secret"),
    };
    umount(mnt.path()).context("unmounting config partition")?;
    Ok(Some(found))
}
