//! The optional config partition: a FAT partition labelled `LABFORGE` carrying `labforge.toml`
//! and/or `cluster.secret`, mounted read-only for the moment it takes to read them.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

pub use crate::disks::probe::CONFIG_LABEL;

/// Files found on the config partition (FAT, label `LABFORGE`), if one is attached.
#[derive(Debug, Default)]
pub struct ConfigPartition {
    pub device: String,
    pub labforge_toml: Option<String>,
    pub cluster_secret: Option<String>,
}

/// Reads `labforge.toml` and `cluster.secret` from the partition labelled `LABFORGE`,
/// mounted read-only for the moment it takes.
pub fn read() -> Result<Option<ConfigPartition>> {
    let dev = Path::new("/dev/disk/by-label").join(CONFIG_LABEL);
    if !dev.exists() {
        return Ok(None);
    }
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
