//! The disks task: prepares the data disks once at boot (see `disks::prepare`), reporting every
//! change in the `disks` section, then offers the eligible ones to Ceph through the beacons.

use std::path::PathBuf;

use anyhow::Result;
use tokio::sync::watch;

use super::{probe, DisksConfig, DisksStatus};
use crate::report::Report;
use crate::sys::blocking;

pub async fn run(
    report: Report,
    cfg: DisksConfig,
    state_dir: PathBuf,
    boot: u64,
    offer: watch::Sender<Vec<String>>,
) -> Result<()> {
    let report2 = report.clone();
    let status = blocking(move || {
        let mut publish = |d: &DisksStatus| report2.update(|s| s.disks = d.clone());
        Ok(super::prepare(&probe::Roots::default(), &cfg, &state_dir, boot, &mut publish))
    })
    .await?;
    offer.send_replace(status.ceph_devices);
    Ok(())
}
