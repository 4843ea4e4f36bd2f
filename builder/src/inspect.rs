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
    let stem = [".img.zst", ".img.bmap", ".img", ".qcow2"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(&name);
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
