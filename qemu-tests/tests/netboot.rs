//! Netboot on a real LAN of VMs (a network namespace with a bridge, and the LAN's own DHCP
//! server from the test): a master booted from its disk serves netboot with proxy-DHCP, TFTP
//! and HTTP. A PC whose only disk holds data boots from its NIC with the firmware's own PXE
//! client (TFTP hands it iPXE), fetches the kernel, initrd and squashfs from the master, runs
//! the same agent from memory and joins the master's cluster as a worker. The squashfs carries
//! the preloaded images' index but not their blobs: the worker streams those from the master
//! into containerd, and runs one of the images. The image has `[install] netboot = true`: the
//! worker's disk holds data, so it does not install, says why, and leaves the disk as it was.
//! Then a PC with a blank disk (disk first in its boot order, then the network, as lab PCs are
//! set up for PXE installs) netboots through its NIC's iPXE ROM, installs itself onto that disk
//! from the image it runs, reboots into the installed system and joins again.

use std::time::Duration;

use anyhow::Result;
use labforge_agent::install::write::InstallState;
use labforge_agent::network::Addressing;
use labforge_agent::preload::PreloadState;
use labforge_agent::pxe::enrol::EnrolState;
use labforge_agent::pxe::PxeMode;
use labforge_agent::pxe::PxeState;
use labforge_agent::status::Phase;
use labforge_agent::status::Role;
use qemu_tests::disks::{self, GIB};
use qemu_tests::images;
use qemu_tests::lan::Lan;
use qemu_tests::vm::{self, ExtraDisk, Net, Vm, VmConfig};
use sha2::{Digest, Sha256};

const BOOT: Duration = Duration::from_secs(600);
/// The network install writes and reads back about 1.1 GiB through a TCG guest: 450-600 s here,
/// most of it in the read-back, which prints nothing.
const NET_INSTALL: Duration = Duration::from_secs(1500);

#[test]
fn worker_netboots_from_master() -> Result<()> {
    let _one_vm_scenario_at_a_time = qemu_tests::exclusive()?;
    let built = images::image_with_test_preloads("qemu-tests/images/pxe.toml")?;
    // The build lists every netboot file in its manifest, with the sha256 of what it wrote.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(built.out.join("pxe-test.manifest.json"))?)?;
    for ext in ["vmlinuz", "initrd", "squashfs", "ipxe"] {
        let file = format!("pxe-test.{ext}");
        let entry = manifest["artifacts"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["file"] == file.as_str()))
            .unwrap_or_else(|| panic!("{file} in the manifest"));
        let bytes = std::fs::read(built.out.join(&file))?;
        assert_eq!(entry["sha256"].as_str(), Some(hex::encode(Sha256::digest(&bytes)).as_str()), "{file}");
    }
    // The squashfs holds the layout's index and no blob.
    let listing = std::process::Command::new("unsquashfs")
        .args(["-lc", "-d", ""])
        .arg(built.out.join("pxe-test.squashfs"))
        .output()?;
    assert!(listing.status.success(), "unsquashfs: {}", String::from_utf8_lossy(&listing.stderr));
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.lines().any(|l| l.trim_end() == "/usr/lib/labforge/preload/index.json"),
        "the index is in the squashfs"
    );
    assert!(!listing.contains("/usr/lib/labforge/preload/blobs/"), "no blob in the squashfs");
    assert!(!listing.contains("/etc/labforge/cluster.secret"), "no cluster secret in the squashfs");
    let secret = std::fs::read_to_string(&built.secret)?.trim().to_string();

    let dir = vm::scenario_dir("worker_netboots_from_master")?;
    let mut lan = Lan::new("netboot", &dir)?;

    let mut m = VmConfig::new("master", &built.image);
    m.net = Net::Tap { ns: lan.ns.clone(), tap: lan.tap()?, mac: "52:54:00:4c:00:01".into() };
    let mut master = Vm::start(&m, &dir)?;
    let ready = master.wait_status("master ready", BOOT, |s| s.phase == Phase::Ready && s.role == Role::Master)?;
    let serving = master.wait_status("serving netboot", BOOT, |s| s.pxe.is_some())?;
    let pxe = serving.pxe.clone().expect("pxe status");
    assert_eq!((pxe.state, pxe.mode), (PxeState::Serving, PxeMode::ProxyDhcp), "{pxe:?}");
    let master_ip = ready.lan_address.clone().expect("the master's LAN address");
    // The LAN has its own DHCP server (the test's dnsmasq on 10.77.0.1): the master took a
    // lease, serves no addresses, and a DHCP client hears one server only — the proxy-DHCP
    // for PXE answers PXE clients, never a plain DISCOVER.
    assert_eq!(ready.network.addressing, Addressing::Leased, "{:?}", ready.network);
    assert!(ready.network.serving.is_none(), "{:?}", ready.network);
    assert_eq!(lan.dhcp_servers()?, vec![format!("{}.1", qemu_tests::lan::SUBNET)], "never a second DHCP server");
    assert_eq!(pxe.url, format!("http://{master_ip}:9743/pxe/boot.ipxe"));

    // A PC whose only disk holds data (a lab PC's own files), booting from its NIC with the
    // firmware's own PXE client: the master's TFTP hands it iPXE, which then boots over HTTP.
    let data = disks::ext4(&dir.join("worker-data.raw"), 10 * GIB, &[("thesis.tex", "\\chapter{Results}\n")])?;
    let data_before = disks::digest(&data)?;
    let mut w = VmConfig::new("worker", &built.image);
    w.disks.clear();
    w.extra_disks = vec![ExtraDisk {
        path: data.clone(),
        serial: "lf-data".into(),
        usb: false,
        read_only: false,
        discard: true,
        bootindex: None,
    }];
    w.net_boot = Some(0);
    w.firmware_pxe = true;
    // The root filesystem lives in memory: the squashfs and what the node writes.
    w.memory_mib = 3072;
    w.net = Net::Tap { ns: lan.ns.clone(), tap: lan.tap()?, mac: "52:54:00:4c:00:02".into() };
    let mut worker = Vm::start(&w, &dir)?;
    worker.wait_for("labforge: booting pxe-test from", BOOT)?;
    assert!(
        worker.console().iter().any(|l| l.contains("Start PXE over IPv4")),
        "the firmware's PXE client started the netboot"
    );
    let joined = worker.wait_status("worker ready", BOOT, |s| s.phase == Phase::Ready)?;
    assert_eq!(joined.role, Role::Worker, "{}", joined.message);
    assert_eq!(joined.master_address.as_deref(), Some(master_ip.as_str()));
    assert_eq!(joined.cluster_uid, ready.cluster_uid, "the worker joined the master's cluster");
    // Its only disk holds data: the install refuses it and the node runs netbooted.
    let install = joined.install.clone().expect("the netboot install's status");
    assert_eq!(install.state, InstallState::Refused, "{install:?}");
    for says in ["no disk is safe", "virtio-lf-data: it holds data", "running netbooted"] {
        assert!(install.message.contains(says), "{says:?} not in: {}", install.message);
    }
    // The preloaded images came from the master, and one of them runs on the worker.
    let s = worker.wait_status("preloaded images imported", BOOT, |s| s.preload.state == PreloadState::Done)?;
    assert_eq!((s.preload.total, s.preload.imported), (2, 2), "{:?}", s.preload);
    assert_eq!(s.preload.source, Some(format!("http://{master_ip}:9743/pxe/preload")), "{:?}", s.preload);
    // Two images, each a manifest, a config and a layer.
    assert_eq!(s.preload.fetched, 6, "{:?}", s.preload);
    let line = worker.wait_for("preload-check:", BOOT)?;
    assert!(line.contains("labforge-preload-ok from-the-vm"), "the image fetched from the master ran: {line}");
    worker.wait_booted(BOOT)?;
    worker.check_console_health()?;

    // The worker was admitted inside the enrolment window (open for the first 30 minutes after
    // the master started serving). An admin closes it now, from the LAN, with the secret.
    let ns = lan.ns.clone();
    let admin = |args: &[&str]| -> Result<String> {
        let bin = qemu_tests::workspace_root().join("target/release/labforge-agent");
        let master = format!("{master_ip}:9743");
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &ns]).arg(&bin);
        c.args(["enrol", "--addr", &master, "--secret-file"]).arg(&built.secret).args(args);
        let out = c.output()?;
        anyhow::ensure!(
            out.status.success(),
            "labforge-agent enrol {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let list = admin(&["--for", "0s"])?;
    assert!(list.contains("policy: window, window closed; 1 admitted"), "{list}");
    assert!(list.lines().any(|l| l.starts_with("admitted") && l.contains("52:54:00:4c:00:02")), "{list}");

    // A stranger's laptop on the LAN takes everything the master serves without
    // authentication and finds no trace of the secret in it (raw or as hex). The pxe test image
    // runs no Kubernetes, so there is no bootstrap token to look for here.
    let laptop = qemu_tests::rogue::Laptop::new(&lan.ns, &dir.join("laptop"))?;
    let base = format!("http://{master_ip}:9743");
    let taken = laptop.take_everything(&base, "pxe-test")?;
    let raw = hex::decode(&secret)?;
    let hits =
        qemu_tests::rogue::containing(&taken, &[raw, secret.clone().into_bytes(), secret.to_uppercase().into_bytes()])?;
    assert!(hits.is_empty(), "the cluster secret is in what the master serves: {hits:?}");
    let mut unpacked = 0;
    for e in walkdir::WalkDir::new(dir.join("laptop/squashfs-root")) {
        unpacked += e?.file_type().is_file() as usize;
    }
    assert!(unpacked > 1000, "the squashfs was unpacked: {unpacked} files");
    std::fs::remove_dir_all(dir.join("laptop/squashfs-root"))?;
    // Its join request (no secret) and its enrolment (window closed) get nothing.
    let forged = serde_json::json!({"node": "laptop", "ts_ms": 0, "nonce": "00", "mac": "00"});
    let (code, body) = laptop.post(&format!("{base}/join-info"), &forged)?;
    assert_eq!(code, 403, "{body}");
    let enrol = serde_json::json!({
        "mac": "52:54:00:66:66:66", "machine_id": "0123456789abcdef0123456789abcdef",
        "hostname": "laptop", "key": hex::encode([0x42u8; 32]),
    });
    let (code, body) = laptop.post(&format!("{base}/pxe/enrol"), &enrol)?;
    assert_eq!(code, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(answer["state"], "pending", "{body}");
    let (f, _) = laptop.get(&format!("{base}/status"), "status-after.json")?;
    let s: labforge_agent::status::Status = serde_json::from_slice(&std::fs::read(f)?)?;
    assert!(s.counters.join_rejected >= 1, "the refused join is counted: {:?}", s.counters);
    let e = s.enrol.clone().expect("the master's enrolment status");
    assert!(
        e.nodes.iter().any(|n| n.mac == "52:54:00:66:66:66" && n.state == EnrolState::Pending),
        "the laptop waits and is listed: {e:?}"
    );

    // The master reports the new peer (a change of the peers in sight prints a line).
    let hostname = joined.node.hostname.clone();
    let after = master
        .wait_status("the worker seen", Duration::from_secs(120), |s| s.peers.iter().any(|p| p.hostname == hostname))?;
    let served = after.pxe.as_ref().map(|p| p.served).unwrap_or(0);
    assert!(served >= 5, "boot.ipxe, the image's script, kernel, initrd and squashfs were served: {served}");
    master.check_console_health()?;
    worker.power_cut()?;
    assert_eq!(disks::digest(&data)?, data_before, "the worker's data disk is untouched");

    // A PC with a blank disk, booting its disk first and the network second: the blank disk
    // does not boot, so it netboots, installs itself and reboots into the disk.
    let blank = disks::blank(&dir.join("pc-disk.raw"), 8 * GIB)?;
    let mut p = VmConfig::new("pc", &built.image);
    p.disks.clear();
    p.extra_disks = vec![ExtraDisk {
        path: blank.clone(),
        serial: "lf-pc".into(),
        usb: false,
        read_only: false,
        discard: true,
        bootindex: Some(0),
    }];
    p.net_boot = Some(1);
    p.memory_mib = 3072;
    p.net = Net::Tap { ns: lan.ns.clone(), tap: lan.tap()?, mac: "52:54:00:4c:00:03".into() };
    let mut pc = Vm::start(&p, &dir)?;
    pc.wait_for("labforge: booting pxe-test from", BOOT)?;
    // The window is closed: the pc waits to be admitted and says so; the admin finds it in the
    // master's list and approves its key. The laptop, claiming the pc's MAC with a key of its
    // own, stays out.
    let waiting = pc.wait_status("waiting to be admitted", BOOT, |s| s.phase == Phase::Enrolling)?;
    assert!(waiting.message.contains("52:54:00:4c:00:03"), "{}", waiting.message);
    let fingerprint = (0..120)
        .find_map(|_| {
            let list = admin(&[]).ok()?;
            let line = list.lines().find(|l| l.starts_with("pending") && l.contains("52:54:00:4c:00:03"));
            let found = line.and_then(|l| l.split_whitespace().nth(2)).map(str::to_string);
            if found.is_none() {
                std::thread::sleep(Duration::from_secs(2));
            }
            found
        })
        .expect("the pc is listed as pending on the master");
    let said = admin(&["--approve", &fingerprint])?;
    assert!(said.starts_with(&format!("approved key {fingerprint}")), "{said}");
    let spoof = serde_json::json!({
        "mac": "52:54:00:4c:00:03", "machine_id": "0123456789abcdef0123456789abcdef",
        "hostname": "laptop", "key": hex::encode([0x43u8; 32]),
    });
    let (code, body) = laptop.post(&format!("{base}/pxe/enrol"), &spoof)?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body)?["state"], "pending", "{body}");
    let done = pc.wait_status("installed over the network", NET_INSTALL, |s| s.phase.install_finished())?;
    assert_eq!(done.phase, Phase::Installed, "{}", done.message);
    let install = done.install.clone().expect("install status");
    assert_eq!(install.target.as_deref(), Some("/dev/disk/by-id/virtio-lf-pc"));
    assert_eq!(install.source.as_deref(), Some(format!("http://{master_ip}:9743/pxe").as_str()));
    let record = install.record.clone().expect("the install record");
    assert!(record.bytes > 500 << 20, "{record:?}");
    assert!(done.message.contains("rebooting"), "{}", done.message);
    pc.wait_stopped(BOOT)?;

    // Power back on: the disk comes first and boots the installed system.
    let mut pc = Vm::restart(&p, &dir)?;
    let booted = pc.wait_booted(BOOT)?;
    let installed = booted.install.clone().expect("the installed node reports how it was installed");
    assert_eq!(installed.state, InstallState::Installed);
    assert_eq!(
        installed.record.as_ref().map(|r| r.source.as_str()),
        Some(format!("http://{master_ip}:9743/pxe").as_str())
    );
    assert!(
        booted.state.size_bytes > 5 * GIB,
        "the state partition filled the 8 GiB disk: {} bytes",
        booted.state.size_bytes
    );
    let rejoined = pc.wait_status("installed pc ready", BOOT, |s| s.phase == Phase::Ready)?;
    assert_eq!(
        (rejoined.role, rejoined.cluster_uid.clone()),
        (Role::Worker, ready.cluster_uid.clone()),
        "{}",
        rejoined.message
    );
    // Its preloaded images came onto the disk during the install: imported from there.
    let s =
        pc.wait_status("preloaded images imported from the disk", BOOT, |s| s.preload.state == PreloadState::Done)?;
    assert_eq!((s.preload.total, s.preload.imported), (2, 2), "{:?}", s.preload);
    assert_eq!((s.preload.source.as_deref(), s.preload.fetched), (None, 0), "{:?}", s.preload);
    let line = pc.wait_for("preload-check:", BOOT)?;
    assert!(line.contains("labforge-preload-ok from-the-vm"), "{line}");
    pc.check_console_health()?;

    // The master served the blobs: six to the worker's import, six to the pc's install.
    let hostname = rejoined.node.hostname.clone();
    let seen = master.wait_status("the installed pc seen", Duration::from_secs(120), |s| {
        s.peers.iter().any(|p| p.hostname == hostname)
    })?;
    let blobs = seen.pxe.as_ref().map(|p| p.preload_served).unwrap_or(0);
    assert!(blobs >= 12, "preloaded blobs served by the master: {blobs}");
    // Two nodes were admitted; the laptop never was.
    let list = admin(&[])?;
    assert!(list.contains("; 2 admitted"), "{list}");
    assert!(list.lines().any(|l| l.starts_with("pending") && l.contains("52:54:00:66:66:66")), "{list}");
    master.check_console_health()?;
    Ok(())
}
