//! Scenarios about a single node booting (the cheap group: one VM).

use std::time::Duration;

use anyhow::Result;
use labforge_agent::status::Kubernetes;
use labforge_agent::status::Phase;
use labforge_agent::status::Role;
use qemu_tests::{images, vm};

/// Under TCG on a 2-core machine the firmware + kernel + systemd take a few minutes.
const BOOT: Duration = Duration::from_secs(600);

#[test]
fn demo_image_boots() -> Result<()> {
    let _one_vm_scenario_at_a_time = qemu_tests::exclusive()?;
    let image = images::image("images/demo.toml")?.image;
    let dir = vm::scenario_dir("demo_image_boots")?;
    let mut lan = qemu_tests::lan::Lan::new("demo_boot", &dir)?;
    let mut cfg = vm::VmConfig::new("node", &image);
    cfg.net = vm::Net::Tap { ns: lan.ns.clone(), tap: lan.tap()?, mac: "52:54:00:12:34:56".into() };
    // The disk is 1 GiB larger than the image: the state partition must grow into it.
    cfg.grow_first_disk = Some(1 << 30);
    let mut node = vm::Vm::start(&cfg, &dir)?;

    let status = node.wait_status("agent status", BOOT, |_| true)?;

    assert_eq!(status.image, "demo");
    assert_eq!(status.node.machine_id.len(), 32, "a machine id was generated on first boot");
    assert!(status.node.machine_id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(status.node.nics.len(), 1, "{:?}", status.node.nics);
    let mac = status.node.nics[0].mac.replace(':', "");
    assert_eq!(status.node.hostname, format!("labforge-{}", &mac[6..]), "hostname follows the spec's pattern");
    let disk = status.node.disks.iter().find(|d| d.name == "vda").expect("the boot disk is in the inventory");
    assert!(disk.size_bytes > std::fs::metadata(&image)?.len());
    assert!(!disk.removable);
    assert!(
        status.state.size_bytes > 512 << 20,
        "state filesystem grew from 64 MiB to fill the disk: {} bytes",
        status.state.size_bytes
    );

    // Alone on its LAN with minimum-nodes = 1, the node elects itself after the settle window;
    // the demo image has no kubeadm and says so rather than pretending.
    let ready = node.wait_status("phase ready", BOOT, |s| s.phase == Phase::Ready)?;
    assert_eq!(ready.role, Role::Master);
    assert_eq!(ready.kubernetes, Kubernetes::Disabled);
    assert!(ready.message.contains("kubernetes disabled"), "{}", ready.message);
    assert!(ready.cluster_uid.is_some() && ready.join_info_sha256.is_some());

    // Every unit started (containerd included): systemd reports `running`, nothing failed.
    node.wait_booted(BOOT)?;
    node.check_console_health()?;
    Ok(())
}

/// A boot disk whose config partition carries a broken secret: the node must not form or join
/// a cluster, and must say how to fix it; a stick with a valid secret beside it changes nothing.
#[test]
fn node_without_a_valid_secret_refuses_to_form_a_cluster() -> Result<()> {
    let _one_vm_scenario_at_a_time = qemu_tests::exclusive()?;
    let image = images::image("images/demo.toml")?.image;
    let dir = vm::scenario_dir("no_valid_secret")?;
    let mut lan = qemu_tests::lan::Lan::new("no_secret", &dir)?;
    // The broken secret is on a config partition of the disk the node boots from (where the
    // agent reads one); a stick that is not the boot medium carries a valid secret, which the
    // agent must ignore.
    let disk = qemu_tests::lan::boot_disk_with_config(&image, &dir.join("boot.raw"), None, Some("0123456789abcdef\n"))?;
    let stick = dir.join("stick.img");
    let valid = labforge_agent::secret::Secret::generate()?.to_hex();
    qemu_tests::lan::config_partition(&stick, Some("[cluster]\nminimum-nodes = 1\n"), Some(&valid))?;
    let mut cfg = vm::VmConfig::new("node", &disk);
    cfg.net = vm::Net::Tap { ns: lan.ns.clone(), tap: lan.tap()?, mac: "52:54:00:12:34:57".into() };
    cfg.disks.push(stick);
    let mut node = vm::Vm::start(&cfg, &dir)?;
    let status = node.wait_status("phase needs-secret", BOOT, |s| s.phase == Phase::NeedsSecret)?;
    assert_eq!(status.role, Role::Undecided);
    assert!(status.cluster_uid.is_none());
    assert!(
        status.message.contains("64 hex digits") && status.message.contains("labforge secret new"),
        "{}",
        status.message
    );
    // The stick was looked at and ignored, by name.
    assert!(
        status.notices.iter().any(|n| n.contains("ignoring the LABFORGE config partition /dev/vdb")),
        "{:?}",
        status.notices
    );
    // The rest of the node still boots cleanly.
    node.wait_booted(BOOT)?;
    node.check_console_health()?;
    Ok(())
}
