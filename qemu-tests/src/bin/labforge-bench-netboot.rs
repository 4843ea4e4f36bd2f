//! For `make bench`: netboot times. Boots a master of `qemu-tests/images/pxe.toml` from its disk
//! on a namespaced LAN, then diskless PCs from their NICs — one alone, then three at once — and
//! prints as JSON the seconds from power-on to each worker's agent reporting `ready` (joined).
//! Then one PC with a blank disk installs itself over the network (`[install] netboot`): the
//! seconds from power-on to `installed`, and to `ready` again after booting its disk.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use labforge_agent::pxe::PxeState;
use labforge_agent::status::Phase;
use labforge_agent::status::Role;
use qemu_tests::{images, lan::Lan, vm};

const BOOT: Duration = Duration::from_secs(900);

fn main() -> Result<()> {
    let built = images::image_with_test_preloads("qemu-tests/images/pxe.toml")?;
    let dir = vm::scenario_dir("bench-netboot")?;
    let mut lan = Lan::new("bnetboot", &dir)?;
    let mut m = vm::VmConfig::new("master", &built.image);
    m.net = vm::Net::Tap { ns: lan.ns.clone(), tap: lan.tap()?, mac: "52:54:00:4d:00:01".into() };
    let mut master = vm::Vm::start(&m, &dir)?;
    master.wait_status("serving netboot", BOOT, |s| s.pxe.as_ref().is_some_and(|p| p.state == PxeState::Serving))?;
    let mut rounds = Vec::new();
    let mut next_mac = 2;
    for n in [1usize, 3] {
        let mut workers = Vec::new();
        let started = Instant::now();
        for _ in 0..n {
            let mut w = vm::VmConfig::new(&format!("worker{next_mac}"), &built.image);
            w.disks.clear();
            w.net_boot = Some(0);
            w.memory_mib = 3072;
            w.net = vm::Net::Tap { ns: lan.ns.clone(), tap: lan.tap()?, mac: format!("52:54:00:4d:00:{next_mac:02x}") };
            next_mac += 1;
            workers.push(vm::Vm::start(&w, &dir)?);
        }
        let times = std::thread::scope(|s| -> Result<Vec<f64>> {
            let handles: Vec<_> = workers
                .iter_mut()
                .map(|w| {
                    s.spawn(move || -> Result<f64> {
                        let st = w.wait_status("worker ready", BOOT, |s| s.phase == Phase::Ready)?;
                        if st.role != Role::Worker {
                            bail!("a netbooted node became {} instead of a worker", st.role);
                        }
                        Ok(started.elapsed().as_secs_f64())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("waiting thread")).collect()
        })?;
        eprintln!("netboot: {n} at once: {times:?} s");
        rounds.push((n, times));
        drop(workers);
    }
    // A PC with a blank disk, disk first in its boot order and the network second.
    let blank = qemu_tests::disks::blank(&dir.join("pc-disk.raw"), 8 * qemu_tests::disks::GIB)?;
    let mut p = vm::VmConfig::new("pc", &built.image);
    p.disks.clear();
    p.extra_disks = vec![vm::ExtraDisk {
        path: blank,
        serial: "lf-pc".into(),
        usb: false,
        read_only: false,
        discard: true,
        bootindex: Some(0),
    }];
    p.net_boot = Some(1);
    p.memory_mib = 3072;
    p.net = vm::Net::Tap { ns: lan.ns.clone(), tap: lan.tap()?, mac: "52:54:00:4d:00:20".into() };
    let started = Instant::now();
    let mut pc = vm::Vm::start(&p, &dir)?;
    let done = pc.wait_status("installed over the network", BOOT, |s| s.phase.install_finished())?;
    if done.phase != Phase::Installed {
        bail!("the netboot install ended {}: {}", done.phase, done.message);
    }
    let installed = started.elapsed().as_secs_f64();
    let mib = done.install.and_then(|i| i.record).map(|r| r.bytes >> 20).unwrap_or(0);
    pc.wait_stopped(BOOT)?;
    let mut pc = vm::Vm::restart(&p, &dir)?;
    pc.wait_status("installed pc ready", BOOT, |s| s.phase == Phase::Ready)?;
    let ready = started.elapsed().as_secs_f64();
    eprintln!("netboot install: installed after {installed:.0} s ({mib} MiB), ready from its disk after {ready:.0} s");
    drop(pc);

    let one = rounds[0].1[0];
    let three = &rounds[1].1;
    let max = three.iter().cloned().fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({
            "netboot_one_node_s": (one * 10.0).round() / 10.0,
            "netboot_three_nodes_s": three.iter().map(|t| (t * 10.0).round() / 10.0).collect::<Vec<_>>(),
            "netboot_three_nodes_max_s": (max * 10.0).round() / 10.0,
            "netboot_install_s": (installed * 10.0).round() / 10.0,
            "netboot_install_mib": mib,
            "netboot_install_then_ready_s": (ready * 10.0).round() / 10.0,
            "netboot_note": "power-on to the agent reporting ready as a worker (or installed, then ready after booting the disk), under the accelerator the harness chose (TCG on CI machines)",
        })
    );
    Ok(())
}
