//! Scenarios about a single node booting (the cheap group: one VM).

use std::time::Duration;

use anyhow::Result;
use labforge_agent::status::{Status, CONSOLE_PREFIX};
use qemu_tests::{images, vm};

/// Under TCG on a 2-core machine the firmware + kernel + systemd take a few minutes.
const BOOT: Duration = Duration::from_secs(600);

#[test]
fn demo_image_boots() -> Result<()> {
    let image = images::image("images/demo.toml")?;
    let dir = vm::scenario_dir("demo_image_boots")?;
    let mut cfg = vm::VmConfig::new("node", &image);
    // The disk is 1 GiB larger than the image: the state partition must grow into it.
    cfg.grow_first_disk = Some(1 << 30);
    let mut node = vm::Vm::start(&cfg, &dir)?;

    let line = node.wait_for(CONSOLE_PREFIX, BOOT)?;
    let json = &line[line.find(CONSOLE_PREFIX).expect("prefix") + CONSOLE_PREFIX.len()..];
    let status: Status = serde_json::from_str(json)?;

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

    node.wait_for("Multi-User System", BOOT)?;
    node.check_console_health()?;
    Ok(())
}
