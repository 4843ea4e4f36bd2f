//! Data disks for Rook-Ceph, on real block devices of real VMs: virtio disks (blank, ext4 with
//! a file, a BlueStore-labelled OSD, read-only, one smaller than the zap offsets) and a USB
//! stick, all raw files the test reads back after the VM is gone.
//!
//! `disks_are_classified_and_zapped`: under the default policy only blank disks are zapped and
//! offered to Ceph; every other disk's bytes are unchanged; the master registers the offered disks.
//! `power_cut_during_zap`: under `force`, the power is cut while the ext4 disk's zap is held
//! at the test hook; the next boot finishes that zap and touches nothing else; an OSD label
//! that appears later is never wiped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use labforge_agent::disks::DisksState;
use labforge_agent::disks::{Action, Class, DiskReport};
use labforge_agent::status::Status;
use qemu_tests::disks::{self, GIB, MIB};
use qemu_tests::images;
use qemu_tests::vm::{self, ExtraDisk, Vm, VmConfig};

const BOOT: Duration = Duration::from_secs(600);
const OSD_FSID: &str = "6f1c4b6e-0d4e-4a0e-9d55-2f0b3c6f8a11";
const NEW_OSD_FSID: &str = "0b9e2a71-5c3d-4f6e-8a1b-2c3d4e5f6a7b";

/// The test disks, in the order they are attached (so the guest names them vdb… in this order).
struct DiskSet {
    files: BTreeMap<&'static str, PathBuf>,
}

impl DiskSet {
    fn make(dir: &Path) -> Result<Self> {
        let f = |n: &str| dir.join(format!("{n}.raw"));
        let mut files = BTreeMap::new();
        files.insert("lf-blank", disks::blank(&f("blank"), 12 * GIB)?);
        files.insert("lf-small", disks::blank(&f("small"), 512 * MIB)?);
        files.insert("lf-ext4", disks::ext4(&f("ext4"), 3 * GIB, &[("cat.txt", "a photo of a cat\n")])?);
        let osd = disks::blank(&f("osd"), 2 * GIB)?;
        disks::bluestore_label(&osd, 0, OSD_FSID)?;
        disks::bluestore_label(&osd, GIB, OSD_FSID)?;
        files.insert("lf-osd", osd);
        files.insert("lf-ro", disks::blank(&f("ro"), GIB)?);
        files.insert("lf-usb", disks::blank(&f("usb"), GIB)?);
        Ok(DiskSet { files })
    }

    fn attach(&self) -> Vec<ExtraDisk> {
        ["lf-blank", "lf-small", "lf-ext4", "lf-osd", "lf-ro", "lf-usb"]
            .iter()
            .map(|s| ExtraDisk {
                path: self.files[s].clone(),
                serial: s.to_string(),
                usb: *s == "lf-usb",
                read_only: *s == "lf-ro",
                // The ext4 disk is a disk without discard (an HDD): its zap only zeroes.
                discard: *s != "lf-ext4",
                bootindex: None,
            })
            .collect()
    }

    fn path(&self, serial: &str) -> &Path {
        &self.files[serial]
    }

    fn digests(&self) -> Result<BTreeMap<&'static str, String>> {
        self.files.iter().map(|(k, p)| Ok((*k, disks::digest(p)?))).collect()
    }
}

fn vm_config(image: &Path, set: &DiskSet) -> VmConfig {
    let mut cfg = VmConfig::new("node", image);
    // A serial gives the OS disk a by-id name, so the force scenario's match selects it too.
    cfg.os_serial = Some("lf-os".into());
    cfg.extra_disks = set.attach();
    cfg
}

fn disk<'a>(s: &'a Status, serial: &str) -> &'a DiskReport {
    s.disks
        .disks
        .iter()
        .find(|d| d.facts.serial.as_deref().is_some_and(|x| x.contains(serial)))
        .unwrap_or_else(|| panic!("no disk with serial {serial} in {:#?}", s.disks.disks))
}

fn check(s: &Status, serial: &str, class: Class, action: Action, ceph: bool) -> DiskReport {
    let d = disk(s, serial);
    assert_eq!((d.class, d.action, d.ceph), (class, action, ceph), "{serial}: {d:#?}");
    d.clone()
}

fn by_id(serial: &str) -> String {
    format!("/dev/disk/by-id/virtio-{serial}")
}

fn assert_zeroed(path: &Path) -> Result<()> {
    let size = std::fs::metadata(path)?.len();
    for off in [0, GIB, 10 * GIB].into_iter().filter(|o| o + (200 << 10) <= size) {
        assert!(disks::zero_at(path, off, 200 << 10)?, "{}: zeroes at {off}", path.display());
    }
    assert!(disks::zero_at(path, size - MIB, MIB as usize)?, "{}: zeroes in the last MiB", path.display());
    assert_eq!(disks::signatures(path)?, Vec::<String>::new(), "{}: no signature left", path.display());
    Ok(())
}

#[test]
fn disks_are_classified_and_zapped() -> Result<()> {
    let _one_vm_scenario_at_a_time = qemu_tests::exclusive()?;
    let built = images::image("qemu-tests/images/disks.toml")?;
    let dir = vm::scenario_dir("disks_classified")?;
    let set = DiskSet::make(&dir)?;
    let before = set.digests()?;
    let cfg = vm_config(&built.image, &set);
    let mut node = Vm::start(&cfg, &dir)?;
    let s = node.wait_status("disks prepared", BOOT, |s| s.disks.state == DisksState::Done)?;

    assert_eq!(s.disks.wipe, "blank-only");
    assert!(s.disks.lvm && s.disks.rbd, "Rook prerequisites: lvm {} rbd {}", s.disks.lvm, s.disks.rbd);
    let os = check(&s, "lf-os", Class::Os, Action::Keep, false);
    assert!(os.class_reason.contains("holds /"), "{}", os.class_reason);
    for serial in ["lf-blank", "lf-small"] {
        let d = check(&s, serial, Class::Blank, Action::Zap, true);
        let zap = d.zap.expect("zap record");
        assert_eq!(zap.steps.last().map(String::as_str), Some("verified"), "{serial}: {zap:?}");
        assert_eq!(d.facts.by_id.first(), Some(&by_id(serial)));
    }
    let ext4 = check(&s, "lf-ext4", Class::HasData, Action::Keep, false);
    assert!(ext4.class_reason.contains("ext4 at 0x438"), "{}", ext4.class_reason);
    assert!(ext4.reason.contains("wipe = \"blank-only\" leaves it alone"), "{}", ext4.reason);
    assert!(ext4.zap.is_none());
    let osd = check(&s, "lf-osd", Class::CephOsd, Action::Keep, false);
    assert_eq!(osd.osd_fsid.as_deref(), Some(OSD_FSID));
    let usb = check(&s, "lf-usb", Class::Removable, Action::Keep, false);
    assert_eq!(usb.facts.transport.as_deref(), Some("usb"));
    let ro = check(&s, "lf-ro", Class::Blank, Action::Keep, false);
    assert!(ro.facts.read_only && ro.reason.contains("read-only"), "{ro:?}");
    assert_eq!(s.disks.ceph_devices, [by_id("lf-blank"), by_id("lf-small")]);

    // The node is its own master here: its register of offered disks (which the rook-ceph
    // component's CephCluster lists) has its devices.
    let s = node.wait_status("the master registered the offered disks", BOOT, |s| {
        s.ceph.as_ref().is_some_and(|c| c.nodes.values().any(|d| !d.is_empty()))
    })?;
    let view = s.ceph.unwrap();
    assert_eq!(view.register, "/var/lib/labforge/ceph-devices.json");
    assert_eq!(view.nodes.get(&s.node.hostname), Some(&vec![by_id("lf-blank"), by_id("lf-small")]), "{view:?}");
    node.wait_booted(BOOT)?;
    node.check_console_health()?;
    node.power_cut()?;

    let after = set.digests()?;
    for serial in ["lf-ext4", "lf-osd", "lf-ro", "lf-usb"] {
        assert_eq!(before[serial], after[serial], "{serial} must be byte for byte unchanged");
    }
    for serial in ["lf-blank", "lf-small"] {
        assert_zeroed(set.path(serial))?;
    }
    assert_eq!(disks::signatures(set.path("lf-ext4"))?, ["ext4@0x438"]);
    Ok(())
}

#[test]
fn power_cut_during_zap() -> Result<()> {
    let _one_vm_scenario_at_a_time = qemu_tests::exclusive()?;
    let built = images::image("qemu-tests/images/disks-force.toml")?;
    let dir = vm::scenario_dir("disks_power_cut")?;
    let set = DiskSet::make(&dir)?;
    let ext4 = set.path("lf-ext4").to_path_buf();
    let size = std::fs::metadata(&ext4)?.len();
    // Markers where the held zap has not reached yet.
    disks::write_at(&ext4, GIB, b"labforge-marker")?;
    disks::write_at(&ext4, size - 4096, b"labforge-marker")?;
    let before = set.digests()?;
    let cfg = vm_config(&built.image, &set);

    // Boot 1: blank disks zapped, then the ext4 disk's zap holds after its first steps.
    let mut node = Vm::start(&cfg, &dir)?;
    node.wait_for(&format!("labforge-disks holding zap of {}", by_id("lf-ext4")), BOOT)?;
    node.power_cut()?;
    assert!(!disks::signatures(&ext4)?.iter().any(|s| s.starts_with("ext4")), "the zap had begun: no ext4 signature");
    assert_eq!(disks::read_at(&ext4, GIB, 15)?, b"labforge-marker", "the zap had not reached 1 GiB");

    // Boot 2: that zap is resumed and finished; nothing else is zapped.
    let mut node = Vm::restart(&cfg, &dir)?;
    let s = node.wait_status("disks prepared after the power cut", BOOT, |s| s.disks.state == DisksState::Done)?;
    let e = check(&s, "lf-ext4", Class::HasData, Action::Zap, true);
    assert!(e.reason.contains("resuming"), "{}", e.reason);
    let zap = e.zap.clone().expect("zap record");
    assert_eq!((zap.attempts, zap.started_boot, zap.boot), (2, 1, 2), "{zap:?}");
    assert!(
        !e.facts.discard && !zap.steps.contains(&"discard".to_string()),
        "no discard on a disk without it: {zap:?}"
    );
    assert_eq!(zap.steps.last().map(String::as_str), Some("verified"));
    for serial in ["lf-blank", "lf-small"] {
        let d = check(&s, serial, Class::Blank, Action::Use, true);
        let z = d.zap.expect("zapped on boot 1");
        assert_eq!((z.attempts, z.boot), (1, 1), "{serial} is not zapped again: {z:?}");
    }
    // Selected by the match, and still never touched:
    let os = check(&s, "lf-os", Class::Os, Action::Keep, false);
    assert!(os.reason.contains("selects it, but it is the OS disk"), "{}", os.reason);
    let osd = check(&s, "lf-osd", Class::CephOsd, Action::Keep, false);
    assert_eq!(osd.osd_fsid.as_deref(), Some(OSD_FSID));
    check(&s, "lf-usb", Class::Removable, Action::Keep, false);
    check(&s, "lf-ro", Class::Blank, Action::Keep, false);
    assert_eq!(s.disks.ceph_devices, [by_id("lf-blank"), by_id("lf-small"), by_id("lf-ext4")]);
    node.wait_booted(BOOT)?;
    node.check_console_health()?;
    node.power_cut()?;
    assert_zeroed(&ext4)?;
    let after = set.digests()?;
    for serial in ["lf-osd", "lf-ro", "lf-usb"] {
        assert_eq!(before[serial], after[serial], "{serial} must be byte for byte unchanged");
    }

    // An OSD appears on the blank disk (as Rook would make one); the next boot never wipes it.
    disks::bluestore_label(set.path("lf-blank"), 0, NEW_OSD_FSID)?;
    let with_osd = disks::digest(set.path("lf-blank"))?;
    let mut node = Vm::restart(&cfg, &dir)?;
    let s = node.wait_status("disks prepared with a new OSD", BOOT, |s| s.disks.state == DisksState::Done)?;
    let d = check(&s, "lf-blank", Class::CephOsd, Action::Use, true);
    assert_eq!(d.osd_fsid.as_deref(), Some(NEW_OSD_FSID));
    check(&s, "lf-ext4", Class::Blank, Action::Use, true);
    node.wait_booted(BOOT)?;
    node.check_console_health()?;
    node.power_cut()?;
    assert_eq!(disks::digest(set.path("lf-blank"))?, with_osd, "the OSD disk is untouched");
    Ok(())
}
