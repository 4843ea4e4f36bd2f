//! `preloaded_images_run_offline`: an image built with two preloaded images (one a multi-arch
//! index) from a real registry boots with no network device at all; the agent imports both
//! into containerd, a unit runs one with `ctr run`, and after a power cut nothing is imported
//! twice.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use labforge_agent::preload::PreloadState;
use qemu_tests::vm::{self, Net, Vm, VmConfig};
use qemu_tests::{images, workspace_root};

const BOOT: Duration = Duration::from_secs(600);

#[test]
fn preloaded_images_run_offline() -> Result<()> {
    let _one_vm_scenario_at_a_time = qemu_tests::exclusive()?;
    // The registry lives only for the build: everything after is offline.
    let built = images::image_with_test_preloads("qemu-tests/images/preload.toml")?;

    // `labforge images ls` reads the layout out of the image file itself.
    let img = built.out.join(format!("{}.img", built.name));
    let out = Command::new(workspace_root().join("target/release/labforge"))
        .args(["images", "ls", "--json"])
        .arg(&img)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let lock = std::fs::read_to_string(built.out.join("preload.lock.toml"))?;
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["127.0.0.1:35123/labforge-test/hello:1", "127.0.0.1:35123/labforge-test/multi:1"]);
    for i in listed.as_array().unwrap() {
        assert!(lock.contains(i["digest"].as_str().unwrap()), "{i} pinned in the lock file:\n{lock}");
        assert!(i["size_bytes"].as_u64().unwrap() > 100_000, "{i}: a static binary inside");
        assert_eq!(i["cluster"], false, "{i}: an image without Kubernetes marks nothing for kubeadm");
    }

    let dir = vm::scenario_dir("preload_offline")?;
    let mut cfg = VmConfig::new("node", &built.image);
    cfg.net = Net::None;
    let mut node = Vm::start(&cfg, &dir)?;
    let s = node.wait_status("preloaded images imported", BOOT, |s| s.preload.state == PreloadState::Done)?;
    assert!(s.node.nics.is_empty(), "no network device: {:?}", s.node.nics);
    assert_eq!((s.preload.total, s.preload.imported, s.preload.present), (2, 2, 0), "{:?}", s.preload);
    let line = node.wait_for("preload-check:", BOOT)?;
    assert!(line.contains("labforge-preload-ok from-the-vm"), "the preloaded program ran: {line}");
    node.wait_booted(BOOT)?;
    node.check_console_health()?;

    // Power cut, power back: containerd kept the images, nothing is imported again.
    node.power_cut()?;
    let mut node = Vm::restart(&cfg, &dir)?;
    let s = node.wait_status("preload checked after the power cut", BOOT, |s| s.preload.state == PreloadState::Done)?;
    assert_eq!((s.preload.imported, s.preload.present), (0, 2), "{:?}", s.preload);
    node.wait_booted(BOOT)?;
    node.check_console_health()
}
