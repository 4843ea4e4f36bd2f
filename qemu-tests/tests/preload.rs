//! `preloaded_images_run_offline`: an image built with two preloaded images (one a multi-arch
//! index) from a real registry boots with no network device at all; the agent imports both
//! into containerd, a unit runs one with `ctr run`, and after a power cut nothing is imported
//! twice.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use labforge::registry::RegistryOptions;
use qemu_tests::registry::{static_hello, Pusher, Registry};
use qemu_tests::vm::{self, Net, Vm, VmConfig};
use qemu_tests::{images, workspace_root};

const BOOT: Duration = Duration::from_secs(600);
/// The test spec names this registry address.
const REGISTRY_PORT: u16 = 35123;

#[test]
fn preloaded_images_run_offline() -> Result<()> {
    let _one_vm_scenario_at_a_time = qemu_tests::exclusive()?;
    let work = tempfile::tempdir()?;
    let built = {
        let reg = Registry::start_on(REGISTRY_PORT)
            .with_context(|| format!("qemu-tests/images/preload.toml expects a test registry on 127.0.0.1:{REGISTRY_PORT}"))?;
        let p = Pusher::new(&format!("http://{}", reg.addr));
        let hello = static_hello(work.path(), "labforge-preload-ok")?;
        p.image("labforge-test/hello", "1", "amd64", &[("hello", &hello, 0o755)], &["/hello"])?;
        let other = static_hello(work.path(), "labforge-preload-multi")?;
        let (a, asz, _) = p.image("labforge-test/multi", "amd64", "amd64", &[("hello", &other, 0o755)], &["/hello"])?;
        let (b, bsz, _) = p.image("labforge-test/multi", "arm64", "arm64", &[("hello", b"not an amd64 program", 0o755)], &["/hello"])?;
        p.index("labforge-test/multi", "1", &[(a, asz, "amd64"), (b, bsz, "arm64")])?;
        let opts = RegistryOptions { plain_http: vec![reg.addr.clone()], ca_files: vec![], parallel: 8 };
        images::image_with("qemu-tests/images/preload.toml", opts)?
        // The registry stops here: everything after is offline.
    };

    // `labforge images ls` reads the layout out of the image file itself.
    let img = built.out.join(format!("{}.img", built.name));
    let out = Command::new(workspace_root().join("target/release/labforge")).args(["images", "ls", "--json"]).arg(&img).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let lock = std::fs::read_to_string(built.out.join("preload.lock.toml"))?;
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["127.0.0.1:35123/labforge-test/hello:1", "127.0.0.1:35123/labforge-test/multi:1"]);
    for i in listed.as_array().unwrap() {
        assert!(lock.contains(i["digest"].as_str().unwrap()), "{i} pinned in the lock file:\n{lock}");
        assert!(i["size_bytes"].as_u64().unwrap() > 100_000, "{i}: a static binary inside");
    }

    let dir = vm::scenario_dir("preload_offline")?;
    let mut cfg = VmConfig::new("node", &built.image);
    cfg.net = Net::None;
    let mut node = Vm::start(&cfg, &dir)?;
    let s = node.wait_status("preloaded images imported", BOOT, |s| s.preload.state == "done")?;
    assert!(s.node.nics.is_empty(), "no network device: {:?}", s.node.nics);
    assert_eq!((s.preload.total, s.preload.imported, s.preload.present), (2, 2, 0), "{:?}", s.preload);
    let line = node.wait_for("preload-check:", BOOT)?;
    assert!(line.contains("labforge-preload-ok from-the-vm"), "the preloaded program ran: {line}");
    node.wait_booted(BOOT)?;
    node.check_console_health()?;

    // Power cut, power back: containerd kept the images, nothing is imported again.
    node.power_cut()?;
    let mut node = Vm::restart(&cfg, &dir)?;
    let s = node.wait_status("preload checked after the power cut", BOOT, |s| s.preload.state == "done")?;
    assert_eq!((s.preload.imported, s.preload.present), (0, 2), "{:?}", s.preload);
    node.wait_booted(BOOT)?;
    node.check_console_health()
}
