//! Installing from a USB stick, on real VMs: the demo image flashed with `labforge flash` onto a
//! 16 GiB raw file attached as a `usb-storage` stick (first in the firmware's boot order), and
//! internal virtio disks the test makes and reads back afterwards.
//!
//! `usb_installs_to_internal_disk`: the stick boots a live session, installs onto the blank
//! 8 GiB disk and reboots; with the stick pulled out the PC boots the installed system, whose
//! agent reports `installed` and whose state partition filled the disk. The stick's bytes are
//! unchanged. `install_refuses_without_safe_target`: with only a disk holding data beside the
//! stick, the installer refuses, says what to pass, and writes nothing anywhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Result};
use labforge_agent::install::write::InstallState;
use labforge_agent::status::Phase;
use labforge_agent::status::Role;
use qemu_tests::disks::{self, GIB};
use qemu_tests::images;
use qemu_tests::vm::{self, ExtraDisk, Vm, VmConfig};

const BOOT: Duration = Duration::from_secs(600);

/// A stick made as a user makes one: `labforge flash` of the compressed image (with its block
/// map) onto a file standing in for the device.
fn stick(built: &images::TestImage, dir: &Path) -> Result<PathBuf> {
    let p = dir.join("stick.raw");
    std::fs::File::create(&p)?.set_len(16 * GIB)?;
    let opts = labforge::flash::FlashOptions {
        image: built.out.join(format!("{}.img.zst", built.name)),
        target: p.clone(),
        bmap: None,
        no_bmap: false,
        force: false,
    };
    let done = labforge::flash::flash(&opts, &Default::default())?;
    ensure!(done.verified && done.bmap.is_some(), "{done:?}");
    Ok(p)
}

fn attach(path: &Path, serial: &str, usb: bool, bootindex: u32) -> ExtraDisk {
    ExtraDisk {
        path: path.to_path_buf(),
        serial: serial.into(),
        usb,
        read_only: false,
        discard: true,
        bootindex: Some(bootindex),
    }
}

/// A PC with no disk of its own but the ones given (the stick first in the boot order).
fn pc(image: &Path, disks: Vec<ExtraDisk>) -> VmConfig {
    let mut cfg = VmConfig::new("pc", image);
    cfg.disks.clear();
    cfg.extra_disks = disks;
    cfg
}

#[test]
fn usb_installs_to_internal_disk() -> Result<()> {
    let _one_vm_scenario_at_a_time = qemu_tests::exclusive()?;
    let built = images::image("images/demo.toml")?;
    let image = built.image.clone();
    let dir = vm::scenario_dir("usb_installs_to_internal_disk")?;
    let stick = stick(&built, &dir)?;
    let internal = disks::blank(&dir.join("internal.raw"), 8 * GIB)?;
    let stick_before = disks::digest(&stick)?;

    let mut cfg = pc(&image, vec![attach(&stick, "lf-stick", true, 0), attach(&internal, "lf-internal", false, 1)]);
    let mut vm = Vm::start(&cfg, &dir)?;
    let live = vm.wait_status("installing", BOOT, |s| s.phase == Phase::Installing)?;
    assert!(live.message.contains("attached over USB"), "{}", live.message);
    let done = vm.wait_status("installed", BOOT, |s| s.phase.install_finished())?;
    assert_eq!(done.phase, Phase::Installed, "{}", done.message);
    let install = done.install.clone().expect("install status");
    assert_eq!(install.target.as_deref(), Some("/dev/disk/by-id/virtio-lf-internal"));
    assert!(install.source.as_deref().is_some_and(|s| s.contains("usb-") && s.contains("lf-stick")), "{install:?}");
    let record = install.record.expect("the install record");
    assert!(record.bytes > 500 << 20 && record.bytes == install.bytes_total, "{record:?}");
    assert!(done.message.contains("rebooting"), "{}", done.message);
    vm.wait_stopped(BOOT)?;
    assert_eq!(disks::digest(&stick)?, stick_before, "the live session wrote nothing to the stick");

    // The stick is pulled out; the PC boots its internal disk.
    cfg.extra_disks.remove(0);
    let mut vm = Vm::restart(&cfg, &dir)?;
    let booted = vm.wait_booted(BOOT)?;
    let installed = booted.install.clone().expect("the installed node reports how it was installed");
    assert_eq!(installed.state, InstallState::Installed);
    assert_eq!(installed.record.as_ref().map(|r| r.target.as_str()), Some("/dev/disk/by-id/virtio-lf-internal"));
    assert!(
        booted.state.size_bytes > 5 * GIB,
        "the state partition filled the 8 GiB disk: {} bytes",
        booted.state.size_bytes
    );
    let ready = vm.wait_status("phase ready", BOOT, |s| s.phase == Phase::Ready)?;
    assert_eq!(ready.role, Role::Master);
    vm.check_console_health()?;
    Ok(())
}

#[test]
fn install_refuses_without_safe_target() -> Result<()> {
    let _one_vm_scenario_at_a_time = qemu_tests::exclusive()?;
    let built = images::image("images/demo.toml")?;
    let image = built.image.clone();
    let dir = vm::scenario_dir("install_refuses_without_safe_target")?;
    let stick = stick(&built, &dir)?;
    let data = disks::ext4(&dir.join("data.raw"), 10 * GIB, &[("thesis.tex", "\\chapter{Results}\n")])?;
    let (stick_before, data_before) = (disks::digest(&stick)?, disks::digest(&data)?);

    let cfg = pc(&image, vec![attach(&stick, "lf-stick", true, 0), attach(&data, "lf-data", false, 1)]);
    let mut vm = Vm::start(&cfg, &dir)?;
    let refused = vm.wait_status("install refused", BOOT, |s| s.phase.install_finished())?;
    assert_eq!(refused.phase, Phase::InstallRefused, "{}", refused.message);
    assert_eq!(refused.install.as_ref().map(|i| i.state), Some(InstallState::Refused));
    for says in ["nothing was written", "virtio-lf-data: it holds data", "labforge.install-target=/dev/disk/by-id/"] {
        assert!(refused.message.contains(says), "{says:?} not in: {}", refused.message);
    }
    vm.check_console_health()?;
    vm.power_cut()?;
    assert_eq!(disks::digest(&data)?, data_before, "the data disk is untouched");
    assert_eq!(disks::digest(&stick)?, stick_before, "the stick is untouched");
    Ok(())
}
