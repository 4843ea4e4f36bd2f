//! The built image checked from the outside with independent tools (sfdisk, mtools, objdump,
//! debugfs, bmaptool, zstd), and the build cache seen from the user's side.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use labforge::build::manifest::Manifest;
use labforge::build::{self, BuildOptions};
use qemu_tests::images;
use serde_json::Value;

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn manifest_of(image: &Path) -> Result<Manifest> {
    let m = labforge::inspect::find_manifest(image)?;
    Ok(serde_json::from_slice(&fs::read(m)?)?)
}

/// Copies one partition out of the image into its own file.
fn extract_partition(image: &Path, start: u64, size: u64, dest: &Path) -> Result<()> {
    run(Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", dest.display()))
        .args(["bs=1M", "conv=sparse", "status=none", "iflag=skip_bytes,count_bytes"])
        .arg(format!("skip={start}"))
        .arg(format!("count={size}")))?;
    Ok(())
}

#[test]
fn demo_image_is_well_formed() -> Result<()> {
    let built = images::image("images/demo.toml")?;
    let image = built.out.join("demo.img");
    let manifest = manifest_of(&image)?;
    let scratch = tempfile::tempdir()?;

    // GPT as any partitioning tool sees it.
    let table: Value = serde_json::from_str(&run(Command::new("sfdisk").arg("--json").arg(&image))?)?;
    let parts = table["partitiontable"]["partitions"].as_array().context("partitions")?;
    let names: Vec<&str> = parts.iter().map(|p| p["name"].as_str().unwrap_or("")).collect();
    assert_eq!(names, ["LABFORGE_ESP", "LABFORGE_ROOT", "LABFORGE_STATE"]);
    assert_eq!(table["partitiontable"]["label"], "gpt");
    assert_eq!(parts[0]["type"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "first partition is an ESP");
    assert_eq!(parts[0]["start"], 2048, "1 MiB aligned");

    // The UKI sits at the removable-media path and carries the cmdline from the manifest.
    let esp_offset = parts[0]["start"].as_u64().unwrap() * 512;
    let uki = scratch.path().join("BOOTX64.EFI");
    run(Command::new("mcopy")
        .arg("-i")
        .arg(format!("{}@@{esp_offset}", image.display()))
        .arg("::/EFI/BOOT/BOOTX64.EFI")
        .arg(&uki))?;
    let sections = run(Command::new("objdump").arg("-h").arg(&uki))?;
    for s in [".osrel", ".cmdline", ".initrd", ".linux"] {
        assert!(sections.contains(s), "UKI has section {s}:\n{sections}");
    }
    let cmdline_file = scratch.path().join("cmdline");
    run(Command::new("objcopy").arg("-O").arg("binary").arg("--only-section=.cmdline").arg(&uki).arg(&cmdline_file))?;
    let cmdline = fs::read_to_string(&cmdline_file)?;
    assert_eq!(cmdline.trim_end_matches('\0'), manifest.kernel_cmdline);
    let root_uuid = parts[1]["uuid"].as_str().unwrap().to_lowercase();
    assert!(cmdline.starts_with(&format!("root=PARTUUID={root_uuid} ")), "{cmdline}");

    // The root filesystem, read without mounting.
    let root = scratch.path().join("root.img");
    extract_partition(
        &image,
        parts[1]["start"].as_u64().unwrap() * 512,
        parts[1]["size"].as_u64().unwrap() * 512,
        &root,
    )?;
    let debugfs = |req: &str| run(Command::new("debugfs").arg("-R").arg(req).arg(&root));
    let label = run(Command::new("e2label").arg(&root))?;
    assert_eq!(label.trim(), "LABFORGE_ROOT");
    let cfg_text = debugfs("cat /etc/labforge/cluster.toml")?;
    let cfg_file = scratch.path().join("cluster.toml");
    fs::write(&cfg_file, &cfg_text)?;
    let cfg = labforge_agent::config::NodeConfig::load(&cfg_file)?;
    assert_eq!(cfg.image, "demo");
    assert_eq!(debugfs("cat /etc/machine-id")?, "", "each node makes its own machine id");
    let shadow = debugfs("cat /etc/shadow")?;
    assert!(
        shadow.lines().all(|l| {
            let h = l.split(':').nth(1).unwrap_or("*");
            h.starts_with('*') || h.starts_with('!')
        }),
        "no passwords:\n{shadow}"
    );
    let agent = debugfs("stat /usr/bin/labforge-agent")?;
    assert!(agent.contains("Mode:  0755") && agent.contains("User:     0"), "{agent}");
    // The cluster secret: baked readable by root only, and the same one kept beside the outputs.
    let secret_stat = debugfs("stat /etc/labforge/cluster.secret")?;
    assert!(secret_stat.contains("Mode:  0600") && secret_stat.contains("User:     0"), "{secret_stat}");
    let beside = image.with_file_name("demo.cluster.secret");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&beside)?.permissions().mode() & 0o777, 0o600);
    assert_eq!(debugfs("cat /etc/labforge/cluster.secret")?, fs::read_to_string(&beside)?);
    let wants = debugfs("ls -l /etc/systemd/system/multi-user.target.wants")?;
    assert!(wants.contains("labforge-agent.service"), "agent unit enabled:\n{wants}");
    let issue = debugfs("cat /etc/issue.d/labforge.issue")?;
    assert!(issue.starts_with("labforge image demo (debian bookworm)"), "template rendered: {issue}");
    assert!(debugfs("cat /etc/repart.d/30-state.conf")?.contains("Label=LABFORGE_STATE"));

    // Every artifact matches its manifest hash.
    let dir = image.parent().unwrap();
    for a in &manifest.artifacts {
        let sum = run(Command::new("sha256sum").arg(dir.join(&a.file)))?;
        assert_eq!(&sum[..64], a.sha256, "{}", a.file);
    }
    assert!(manifest.packages.contains_key("containerd") && manifest.packages.contains_key("linux-image-amd64"));
    for stage in ["rootfs", "overlays", "agent", "system", "boot", "disk", "outputs"] {
        assert!(manifest.stages.iter().any(|s| s.stage == stage), "timing for {stage}");
    }

    // bmaptool (the reference implementation) accepts our block map and restores the image
    // from the .zst bit for bit.
    let restored = scratch.path().join("restored.img");
    run(Command::new("bmaptool")
        .arg("copy")
        .arg("--bmap")
        .arg(dir.join("demo.img.bmap"))
        .arg(dir.join("demo.img.zst"))
        .arg(&restored))?;
    let want = &manifest.artifacts.iter().find(|a| a.file == "demo.img").unwrap().sha256;
    assert_eq!(&run(Command::new("sha256sum").arg(&restored))?[..64], want);
    Ok(())
}

/// A user changes only an overlay: the rebuild reuses the cached rootfs (no mmdebstrap), and a
/// later failing build leaves the previous good artifacts untouched.
#[test]
fn overlay_change_rebuilds_from_cache_and_failures_keep_previous_outputs() -> Result<()> {
    let ws = qemu_tests::workspace_root();
    let dir = tempfile::tempdir_in(ws.join("target"))?;
    let overlay = dir.path().join("overlay");
    fs::create_dir_all(overlay.join("etc"))?;
    fs::write(overlay.join("etc/lab-note"), "first\n")?;
    let spec = dir.path().join("spec.toml");
    let write_spec = |extra: &str| {
        fs::write(
            &spec,
            format!(
                "extends = \"{}\"\nname = \"overlaytest\"\noverlays = [\"overlay\"]\noutputs = [\"raw\"]\n{extra}",
                ws.join("images/demo.toml").display()
            ),
        )
    };
    write_spec("")?;
    let out = dir.path().join("out");
    let opts = BuildOptions {
        spec: spec.clone(),
        out: out.clone(),
        cache_dir: std::env::var_os("LABFORGE_CACHE_DIR").map(PathBuf::from).unwrap_or_else(build::default_cache_dir),
        mirror: std::env::var("LABFORGE_MIRROR").ok(),
        agent: Some(ws.join("target/release/labforge-agent")),
        force: false,
        registry: Default::default(),
        update_lock: false,
        lock_file: None,
        offline: false,
    };
    let first = build::build(&opts)?;

    fs::write(overlay.join("etc/lab-note"), "second\n")?;
    let second = build::build(&opts)?;
    assert!(!second.up_to_date);
    assert_ne!(first.manifest.input_hash, second.manifest.input_hash, "the overlay is an input");
    assert_eq!(first.manifest.rootfs_cache_key, second.manifest.rootfs_cache_key);
    let rootfs = second.manifest.stages.iter().find(|s| s.stage == "rootfs").unwrap();
    assert!(rootfs.cached, "an overlay-only change does not re-run mmdebstrap");
    assert!(first.manifest.cluster_secret.starts_with("generated"), "{}", first.manifest.cluster_secret);
    assert!(
        second.manifest.cluster_secret.starts_with("kept"),
        "a rebuilt image stays in its cluster: {}",
        second.manifest.cluster_secret
    );

    // Same inputs again: nothing to do.
    assert!(build::build(&opts)?.up_to_date);

    // A build that fails after the rootfs stage leaves the previous outputs as they were.
    let before = fs::read_to_string(out.join("overlaytest.manifest.json"))?;
    write_spec("[disk]\nroot-size = \"512MiB\"\n")?;
    let err = build::build(&opts).unwrap_err();
    assert!(format!("{err:#}").contains("too small"), "{err:#}");
    assert_eq!(fs::read_to_string(out.join("overlaytest.manifest.json"))?, before);
    let img = out.join("overlaytest.img");
    assert_eq!(fs::metadata(&img)?.len(), second.manifest.artifacts[0].size_bytes);
    let leftovers: Vec<_> = fs::read_dir(&out)?.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 3, "only the image, its manifest and the cluster secret: {leftovers:?}");
    Ok(())
}
