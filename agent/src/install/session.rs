//! An install boot: a live session from a stick, or a netbooted node with `[install] netboot`,
//! runs one installer job (`write` or `net`), reports each of its steps, and reboots into the
//! installed disk when it wrote one. What the outcome means is decided by [`outcome`].

use anyhow::{Context, Result};
use tracing::{error, info};

use super::live::Live;
use super::write::{InstallState, InstallStatus};
use super::InstallConfig;
use crate::report::Report;
use crate::status::Phase;
use crate::sys::blocking;
use crate::sys::Cmd;

/// The phase an installer's result puts the node in, and whether to reboot into the disk.
pub fn outcome(result: &InstallStatus, reboot: bool) -> (Phase, bool) {
    let phase = match result.state {
        InstallState::Installed => Phase::Installed,
        InstallState::Refused => Phase::InstallRefused,
        _ => Phase::InstallFailed,
    };
    // Rebooting makes sense only after this boot wrote a disk; a disk found installed already
    // would boot the stick (or the network) again.
    (phase, phase == Phase::Installed && result.record.is_some() && reboot)
}

/// A live session from removable media: install onto an internal disk, then reboot into it.
/// Refusals and failures stay on the console and in `/status`; nothing else runs this boot.
pub async fn live(report: Report, cfg: InstallConfig, live: Live) -> Result<()> {
    let intro = format!("booted from {} ({}): installing onto an internal disk", live.disk, live.reason);
    let job_cfg = cfg.clone();
    run(report, &cfg, intro, "remove the stick", move |publish| {
        super::write::run(&job_cfg, &live, &crate::disks::probe::Roots::default(), publish)
    })
    .await;
    Ok(())
}

/// A netbooted node with `[install] netboot`: install onto its disk from the image it runs and
/// reboot into it. Returns whether it is rebooting; if not (no safe disk, a disk installed
/// already, a failure), the node runs on netbooted.
pub async fn netboot(report: Report, cfg: InstallConfig, cmdline: String) -> bool {
    let job_cfg = cfg.clone();
    run(
        report,
        &cfg,
        "netbooted: installing onto this PC's disk".into(),
        "it boots from its disk if the disk comes before the network in the boot order",
        move |publish| {
            let manifest = std::path::Path::new(super::net::NET_MANIFEST);
            super::net::run(&job_cfg, manifest, &cmdline, &crate::disks::probe::Roots::default(), publish)
        },
    )
    .await
}

/// Runs an installer job, reporting its steps, and reboots if it wrote a disk. Returns whether
/// it is rebooting.
async fn run(
    report: Report,
    cfg: &InstallConfig,
    intro: String,
    after: &str,
    job: impl FnOnce(&mut dyn FnMut(&InstallStatus)) -> InstallStatus + Send + 'static,
) -> bool {
    report.update(|s| {
        s.phase = Phase::Installing;
        s.message = intro;
    });
    let report2 = report.clone();
    let result = blocking(move || {
        let mut publish = |st: &InstallStatus| report2.update(|s| s.install = Some(st.clone()));
        Ok(job(&mut publish))
    })
    .await
    .unwrap_or_else(|e| InstallStatus {
        state: InstallState::Failed,
        message: format!("{e:#}"),
        ..Default::default()
    });
    let (phase, reboot) = outcome(&result, cfg.reboot);
    if phase == Phase::Installed {
        info!("{}", result.message);
    } else {
        error!("{}", result.message);
    }
    let message =
        if reboot { format!("{}; rebooting into it ({after})", result.message) } else { result.message.clone() };
    report.update(|s| {
        s.install = Some(result);
        s.phase = phase;
        s.message = message;
    });
    if !reboot {
        return false;
    }
    match blocking(|| Cmd::new("systemctl").arg("reboot").run().context("rebooting").map(drop)).await {
        Ok(()) => true,
        Err(e) => {
            error!("{e:#}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::install::InstallRecord;

    #[test]
    fn only_a_disk_written_this_boot_is_rebooted_into() {
        let st = |state, record: Option<InstallRecord>| InstallStatus { state, record, ..Default::default() };
        let record = || Some(serde_json::from_value::<InstallRecord>(record_json()).unwrap());
        assert_eq!(outcome(&st(InstallState::Installed, record()), true), (Phase::Installed, true));
        assert_eq!(outcome(&st(InstallState::Installed, record()), false), (Phase::Installed, false));
        // Found installed already: no record of this boot, no reboot loop.
        assert_eq!(outcome(&st(InstallState::Installed, None), true), (Phase::Installed, false));
        assert_eq!(outcome(&st(InstallState::Refused, None), true), (Phase::InstallRefused, false));
        assert_eq!(outcome(&st(InstallState::Failed, None), true), (Phase::InstallFailed, false));
        assert_eq!(outcome(&st(InstallState::Writing, None), true), (Phase::InstallFailed, false));
    }

    fn record_json() -> serde_json::Value {
        serde_json::json!({"image": "demo", "input_hash": "h", "source": "s", "target": "t", "bytes": 1,
            "seconds": 1.0, "installed_at": 1})
    }
}
