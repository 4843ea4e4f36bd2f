//! `labforge inspect`: what a built image holds, from its manifest, checked against the files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::build::manifest::Manifest;

/// The manifest beside an artifact (`out/demo.img` → `out/demo.manifest.json`).
pub fn find_manifest(image: &Path) -> Result<PathBuf> {
    let name = image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.ends_with(".manifest.json") {
        return Ok(image.to_path_buf());
    }
    let stem = [".img.zst", ".img.bmap", ".img", ".qcow2"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
    let m = image.with_file_name(format!("{stem}.manifest.json"));
    if !m.is_file() {
        bail!("no manifest {} beside {}; was the image built by labforge?", m.display(), image.display());
    }
    Ok(m)
}

pub fn print(m: &Manifest, path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    println!("image     {} (labforge {})", m.name, m.labforge_version);
    println!("base      {} {} from {}", m.distro, m.suite, m.mirror);
    println!("kernel    {}", m.kernel);
    println!("cmdline   {}", m.kernel_cmdline);
    println!("packages  {}", m.packages.len());
    println!("input     {}", m.input_hash);
    for a in &m.artifacts {
        let state = match std::fs::metadata(dir.join(&a.file)) {
            Ok(md) if md.len() == a.size_bytes => "present",
            Ok(_) => "SIZE DIFFERS",
            Err(_) => "missing",
        };
        println!("artifact  {:<24} {:>8} MiB  {}  {state}", a.file, a.size_bytes >> 20, a.sha256);
    }
    if let Some(parts) = m.disk.get("partitions").and_then(|p| p.as_array()) {
        for p in parts {
            println!(
                "partition {:<15} {:>6} MiB  {}",
                p["label"].as_str().unwrap_or("?"),
                p["size_bytes"].as_u64().unwrap_or(0) >> 20,
                p["uuid"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

/// A preloaded image as listed by `labforge images ls`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageEntry {
    pub name: String,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    pub digest: String,
    /// Manifest, config and layers.
    pub size_bytes: u64,
    /// Marked for the cluster (containerd's sandbox image or one kubeadm listed): the agent
    /// imports these first and starts kubeadm once they are in.
    pub cluster: bool,
}

/// Reads the preload layout out of a raw image's root filesystem (debugfs at the partition's
/// offset: no mount, no loop device).
pub fn preloaded_images(image: &Path) -> Result<Vec<ImageEntry>> {
    use anyhow::Context;
    let name = image.to_string_lossy();
    if name.ends_with(".zst") || name.ends_with(".qcow2") || name.ends_with(".bmap") || name.ends_with(".json") {
        bail!("{} is not a raw image; give the `.img` file", image.display());
    }
    let out = crate::cmd::Cmd::new("sfdisk")
        .arg("--json")
        .arg(image)
        .run()
        .with_context(|| format!("{} has no readable partition table; is it a labforge image?", image.display()))?;
    let table: serde_json::Value = serde_json::from_str(&out)?;
    let parts = table["partitiontable"]["partitions"].as_array().cloned().unwrap_or_default();
    let sector = table["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    let root =
        parts.iter().find(|p| p["name"].as_str() == Some(crate::build::disk::ROOT_LABEL)).with_context(|| {
            format!("{} has no {} partition; is it a labforge image?", image.display(), crate::build::disk::ROOT_LABEL)
        })?;
    let offset = root["start"].as_u64().unwrap_or(0) * sector;
    let dev = format!("{}?offset={offset}", image.display());
    let cat = |path: &str| -> Result<Vec<u8>> {
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("cat {path}"), &dev])
            .output()
            .context("running debugfs (apt-get install e2fsprogs)")?;
        Ok(out.stdout)
    };
    let dir = crate::build::preload::LAYOUT_DIR;
    let index = cat(&format!("{dir}/index.json"))?;
    if index.is_empty() {
        return Ok(Vec::new());
    }
    let index: serde_json::Value =
        serde_json::from_slice(&index).context("the image's preload index.json is not JSON")?;
    let mut list = Vec::new();
    for m in index["manifests"].as_array().cloned().unwrap_or_default() {
        let digest = m["digest"].as_str().unwrap_or_default().to_string();
        let hex = crate::registry::cache::hex_of(&digest)?;
        let body: serde_json::Value = serde_json::from_slice(&cat(&format!("{dir}/blobs/sha256/{hex}"))?)
            .with_context(|| format!("manifest {digest} in the image is not JSON"))?;
        let size = m["size"].as_u64().unwrap_or(0)
            + body["config"]["size"].as_u64().unwrap_or(0)
            + body["layers"].as_array().map(|l| l.iter().filter_map(|x| x["size"].as_u64()).sum()).unwrap_or(0);
        let ann = &m["annotations"];
        list.push(ImageEntry {
            name: ann["io.containerd.image.name"].as_str().unwrap_or("?").to_string(),
            reference: ann["dev.labforge.preload.ref"].as_str().map(str::to_string),
            digest,
            size_bytes: size,
            cluster: ann[labforge_core::layout::PRELOAD_CLUSTER_ANNOTATION].as_str() == Some("true"),
        });
    }
    Ok(list)
}
