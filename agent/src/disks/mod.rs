//! Data disks for Rook-Ceph: take the inventory (`probe`), classify each disk and decide under
//! the spec's `[disks]` policy (`policy`, pure), zap the eligible ones the way Rook's teardown
//! documentation does (`zap`), remembering intent and result across power cuts (`journal`), and
//! render the `CephCluster` device list on the master (`ceph`).

pub mod ceph;
pub mod journal;
pub mod policy;
pub mod task;
pub mod zap;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use labforge_core::disk::{probe, DiskFacts, Signature, BLUESTORE, DATA, LABEL_OFFSETS};
pub use policy::{Action, Class, DisksConfig, History, Wipe};

/// One disk as `/status`, beacons and `labforge-agent disks` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    #[serde(flatten)]
    pub facts: DiskFacts,
    pub class: Class,
    /// The facts that gave the class.
    pub class_reason: String,
    pub osd_fsid: Option<String>,
    pub action: Action,
    /// Offered to Ceph (listed in the `CephCluster`).
    pub ceph: bool,
    pub reason: String,
    /// The zap of this disk, this boot or an earlier one.
    pub zap: Option<journal::ZapRecord>,
}

crate::wire_enum! {
    /// Where the disk preparation stands.
    #[derive(Default)]
    pub enum DisksState {
        #[default]
        Scanning = "scanning",
        Zapping = "zapping",
        /// Every decision carried out.
        Done = "done",
        /// Some zap failed, or the inventory could not be taken.
        Failed = "failed",
    }
}

/// The disks part of `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisksStatus {
    pub state: DisksState,
    /// The `[disks]` policy in force.
    pub wipe: String,
    pub disks: Vec<DiskReport>,
    /// What this node offers to Ceph: by-id paths.
    pub ceph_devices: Vec<String>,
    /// What went wrong, when `state` is `failed`.
    #[serde(default)]
    pub message: String,
    /// Rook prerequisites on this node.
    pub lvm: bool,
    pub rbd: bool,
}

impl DisksStatus {
    pub fn new(wipe: Wipe) -> Self {
        DisksStatus { state: DisksState::Scanning, wipe: wipe.as_str().into(), ..Default::default() }
    }
}

/// Whether `lvm` is installed and the `rbd` module is loaded (Rook's prerequisites).
pub fn prerequisites(root: &Path) -> (bool, bool) {
    let lvm = ["usr/sbin/lvm", "sbin/lvm"].iter().any(|p| root.join(p).exists());
    let rbd = root.join("sys/module/rbd").exists();
    (lvm, rbd)
}

/// The decision for every disk now, without touching any.
pub fn assess(roots: &probe::Roots, cfg: &DisksConfig, journal: &journal::Journal) -> anyhow::Result<Vec<DiskReport>> {
    Ok(probe::scan(roots)?.into_iter().map(|f| report(f, cfg, journal)).collect())
}

fn report(facts: DiskFacts, cfg: &DisksConfig, journal: &journal::Journal) -> DiskReport {
    let id = facts.stable_id();
    let d = policy::decide(&facts, cfg, journal.history(id.as_deref(), facts.size_bytes));
    DiskReport {
        zap: id.as_deref().and_then(|i| journal.get(i)).cloned(),
        class: d.class.class,
        class_reason: d.class.reason,
        osd_fsid: d.class.osd_fsid,
        action: d.action,
        ceph: d.ceph,
        reason: d.reason,
        facts,
    }
}

/// Takes the inventory, decides, and zaps what the policy allows, journalling each zap;
/// `publish` sees every change. Never fails as a whole: a disk that cannot be probed or zapped
/// is reported with the reason and the others go on.
pub fn prepare(
    roots: &probe::Roots,
    cfg: &DisksConfig,
    state_dir: &Path,
    boot: u64,
    publish: &mut dyn FnMut(&DisksStatus),
) -> DisksStatus {
    use tracing::{error, info, warn};
    let mut status = DisksStatus::new(cfg.wipe);
    (status.lvm, status.rbd) = prerequisites(Path::new("/"));
    let fail = |mut status: DisksStatus, msg: String, publish: &mut dyn FnMut(&DisksStatus)| {
        error!("disks: {msg}");
        status.state = DisksState::Failed;
        status.message = msg;
        publish(&status);
        status
    };
    // udev may still be naming disks this early in the boot; their by-id names are what the
    // journal and the CephCluster know them by.
    crate::sys::cmd::udev_settle();
    let mut journal = match journal::Journal::load(state_dir) {
        Ok(j) => j,
        Err(e) => return fail(status, format!("{e:#}; no disk is touched until it is fixed or moved aside"), publish),
    };
    status.disks = match assess(roots, cfg, &journal) {
        Ok(d) => d,
        Err(e) => return fail(status, format!("taking the disk inventory: {e:#}"), publish),
    };
    for d in &status.disks {
        info!(disk = %d.facts.name, class = d.class.as_str(), action = ?d.action, "{}", d.reason);
    }
    publish(&status);
    let mut failures = 0;
    for i in 0..status.disks.len() {
        if status.disks[i].action != Action::Zap {
            continue;
        }
        status.state = DisksState::Zapping;
        publish(&status);
        let name = status.disks[i].facts.name.clone();
        // Facts may have changed since the scan (a disk pulled, a filesystem made): decide
        // again on fresh ones right before writing.
        let fresh = match probe::one(roots, &name) {
            Ok(f) => report(f, cfg, &journal),
            Err(e) => {
                warn!("disks: {name}: {e:#}; not zapped");
                let d = &mut status.disks[i];
                (d.action, d.ceph, d.reason) = (Action::Keep, false, format!("{e:#}; not zapped"));
                failures += 1;
                continue;
            }
        };
        status.disks[i] = fresh;
        if status.disks[i].action != Action::Zap {
            continue;
        }
        let d = status.disks[i].facts.clone();
        let id = d.stable_id().unwrap_or_else(|| format!("kernel:{}", d.name));
        info!(disk = %d.name, %id, "zapping: {}", status.disks[i].reason);
        let result = journal.begin(&id, &d.name, d.size_bytes, boot).and_then(|()| {
            let progress = &mut |step: &str| journal.step(&id, step);
            zap::zap(Path::new(&d.path), &d.devnum, &id, d.size_bytes, d.discard, progress)
        });
        if let Err(e) = result {
            let msg = format!("zap failed: {e:#}");
            error!(disk = %d.name, "{msg}");
            if let Err(e) = journal.fail(&id, &msg) {
                error!("disks: recording the failure: {e:#}");
            }
            let r = &mut status.disks[i];
            (r.action, r.ceph, r.reason) = (Action::Keep, false, msg);
            failures += 1;
        } else {
            info!(disk = %d.name, "zapped and verified");
        }
        status.disks[i].zap = journal.get(&id).cloned();
        publish(&status);
    }
    status.ceph_devices = status.disks.iter().filter(|d| d.ceph).map(|d| d.facts.ceph_name()).collect();
    status.state = if failures == 0 { DisksState::Done } else { DisksState::Failed };
    if failures > 0 {
        status.message = format!("{failures} disk(s) could not be prepared; see their reasons");
    }
    publish(&status);
    status
}

#[cfg(test)]
mod tests {
    use super::probe::tests::Fixture;
    use super::*;

    const MIB: u64 = 1 << 20;

    fn cfg(text: &str) -> DisksConfig {
        let c: DisksConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn a_disk_that_disappears_is_reported_and_the_others_go_on() {
        let fx = Fixture::new();
        let state = tempfile::tempdir().unwrap();
        fx.disk("sdb", "8:16", 64 * MIB, &[]);
        fx.by_id("ata-GONE", "sdb");
        let sdc = fx.disk("sdc", "8:32", 64 * MIB, &[]);
        fx.by_id("ata-STAYS", "sdc");
        super::probe::tests::write_label(&sdc, 4096, "not-at-a-label-offset-so-just-data-0000");
        let mut states = Vec::new();
        let sys = fx.roots.sys.clone();
        let status = prepare(
            &fx.roots,
            &cfg("min-size = \"1MiB\"\nwipe = \"force\"\n[match]\nsize = \"1MiB..\""),
            state.path(),
            1,
            &mut |s: &DisksStatus| {
                if s.state == DisksState::Zapping && !states.contains(&DisksState::Zapping) {
                    // sdb is pulled out right before its zap.
                    std::fs::remove_dir_all(sys.join("block/sdb")).unwrap();
                }
                states.push(s.state);
            },
        );
        assert_eq!(status.state, DisksState::Failed, "{status:#?}");
        assert!(status.message.contains("1 disk(s)"));
        let sdb = &status.disks[0];
        assert_eq!((sdb.action, sdb.ceph), (Action::Keep, false));
        assert!(sdb.reason.contains("disk sdb is gone"), "{}", sdb.reason);
        let sdc = &status.disks[1];
        assert_eq!(sdc.class, Class::HasData);
        assert_eq!(sdc.zap.as_ref().map(|z| z.state.clone()), Some(journal::ZapState::Zapped), "{sdc:#?}");
        assert_eq!(status.ceph_devices, ["/dev/disk/by-id/ata-STAYS"]);
        assert_eq!(states.first(), Some(&DisksState::Scanning));
        // The journal knows the zapped disk; the next boot leaves it alone.
        let j = journal::Journal::load(state.path()).unwrap();
        assert_eq!(j.history(Some("/dev/disk/by-id/ata-STAYS"), 64 * MIB), History::Zapped);
        assert_eq!(
            j.history(Some("/dev/disk/by-id/ata-GONE"), 64 * MIB),
            History::None,
            "nothing was begun on the pulled disk"
        );
    }

    #[test]
    fn an_unreadable_journal_touches_nothing() {
        let fx = Fixture::new();
        let state = tempfile::tempdir().unwrap();
        std::fs::write(state.path().join(journal::FILE), "{").unwrap();
        let dev = fx.disk("sdb", "8:16", 64 * MIB, &[]);
        super::probe::tests::write_label(&dev, 0, "6f1c4b6e-0d4e-4a0e-9d55-2f0b3c6f8a11");
        let status = prepare(&fx.roots, &cfg("min-size = \"1MiB\""), state.path(), 1, &mut |_: &DisksStatus| {});
        assert_eq!(status.state, DisksState::Failed);
        assert!(
            status.message.contains("unreadable") && status.message.contains("no disk is touched"),
            "{}",
            status.message
        );
        assert!(status.disks.is_empty());
    }
}
