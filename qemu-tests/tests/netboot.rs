//! Netboot on a real LAN of VMs (a network namespace with a bridge, and the LAN's own DHCP
//! server from the test): a master booted from its disk serves netboot with proxy-DHCP, TFTP
//! and HTTP; a PC with no disk at all boots from its NIC (the iPXE ROM of Debian's ipxe-qemu),
//! fetches the kernel, initrd and squashfs from the master, runs the same agent from memory
//! and joins the master's cluster as a worker. The squashfs carries the preloaded images'
//! index but not their blobs: the worker streams those from the master into containerd, and
//! runs one of the images.

use std::time::Duration;

use anyhow::Result;
use sha2::{Digest, Sha256};
use qemu_tests::images;
use qemu_tests::lan::Lan;
use qemu_tests::vm::{self, Net, Vm, VmConfig};

const BOOT: Duration = Duration::from_secs(600);

#[test]
fn worker_netboots_from_master() -> Result<()> {
    let _one_vm_scenario_at_a_time = qemu_tests::exclusive()?;
    let built = images::image_with_test_preloads("qemu-tests/images/pxe.toml")?;
    // The build lists every netboot file in its manifest, with the sha256 of what it wrote.
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(built.out.join("pxe-test.manifest.json"))?)?;
    for ext in ["vmlinuz", "initrd", "squashfs", "ipxe"] {
        let file = format!("pxe-test.{ext}");
        let entry = manifest["artifacts"].as_array().and_then(|a| a.iter().find(|x| x["file"] == file.as_str())).unwrap_or_else(|| panic!("{file} in the manifest"));
        let bytes = std::fs::read(built.out.join(&file))?;
        assert_eq!(entry["sha256"].as_str(), Some(hex::encode(Sha256::digest(&bytes)).as_str()), "{file}");
    }
    // The squashfs holds the layout's index and no blob.
    let listing = std::process::Command::new("unsquashfs").args(["-lc", "-d", ""]).arg(built.out.join("pxe-test.squashfs")).output()?;
    assert!(listing.status.success(), "unsquashfs: {}", String::from_utf8_lossy(&listing.stderr));
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.lines().any(|l| l.trim_end() == "/usr/lib/labforge/preload/index.json"), "the index is in the squashfs");
    assert!(!listing.contains("/usr/lib/labforge/preload/blobs/"), "no blob in the squashfs");

    let dir = vm::scenario_dir("worker_netboots_from_master")?;
    let mut lan = Lan::new("netboot", &dir)?;

    let mut m = VmConfig::new("master", &built.image);
    m.net = Net::Tap { ns: lan.ns.clone(), tap: lan.tap()?, mac: "52:54:00:4c:00:01".into() };
    let mut master = Vm::start(&m, &dir)?;
    let ready = master.wait_status("master ready", BOOT, |s| s.phase == "ready" && s.role == "master")?;
    let serving = master.wait_status("serving netboot", BOOT, |s| s.pxe.as_ref().is_some_and(|p| p.state != ""))?;
    let pxe = serving.pxe.clone().expect("pxe status");
    assert_eq!((pxe.state.as_str(), pxe.mode.as_str()), ("serving", "proxy-dhcp"), "{pxe:?}");
    let master_ip = ready.lan_address.clone().expect("the master's LAN address");
    assert_eq!(pxe.url, format!("http://{master_ip}:9743/pxe/boot.ipxe"));

    // A PC without any disk, booting from its NIC.
    let mut w = VmConfig::new("worker", &built.image);
    w.disks.clear();
    w.net_boot = true;
    // The root filesystem lives in memory: the squashfs and what the node writes.
    w.memory_mib = 3072;
    w.net = Net::Tap { ns: lan.ns.clone(), tap: lan.tap()?, mac: "52:54:00:4c:00:02".into() };
    let mut worker = Vm::start(&w, &dir)?;
    worker.wait_for("labforge: booting pxe-test from", BOOT)?;
    let joined = worker.wait_status("worker ready", BOOT, |s| s.phase == "ready")?;
    assert_eq!(joined.role, "worker", "{}", joined.message);
    assert_eq!(joined.master_address.as_deref(), Some(master_ip.as_str()));
    assert_eq!(joined.cluster_uid, ready.cluster_uid, "the worker joined the master's cluster");
    assert!(joined.node.disks.is_empty(), "the worker has no disk: {:?}", joined.node.disks);
    // The preloaded images came from the master, and one of them runs on the worker.
    let s = worker.wait_status("preloaded images imported", BOOT, |s| s.preload.state == "done")?;
    assert_eq!((s.preload.total, s.preload.imported), (2, 2), "{:?}", s.preload);
    let line = worker.wait_for("preload-check:", BOOT)?;
    assert!(line.contains("labforge-preload-ok from-the-vm"), "the image fetched from the master ran: {line}");
    worker.wait_booted(BOOT)?;
    worker.check_console_health()?;

    // The master reports the new peer (a change of the peers in sight prints a line).
    let hostname = joined.node.hostname.clone();
    let after = master.wait_status("the worker seen", Duration::from_secs(120), |s| s.peers.iter().any(|p| p.hostname == hostname))?;
    let served = after.pxe.as_ref().map(|p| p.served).unwrap_or(0);
    assert!(served >= 5, "boot.ipxe, the image's script, kernel, initrd and squashfs were served: {served}");
    let blobs = after.pxe.as_ref().map(|p| p.preload_served).unwrap_or(0);
    // Two images, each a manifest, a config and a layer.
    assert!(blobs >= 6, "the worker fetched the preloaded blobs from the master: {blobs}");
    master.check_console_health()?;
    Ok(())
}
