//! Stage `disk`: a GPT disk image with ESP, root and state partitions, made without mounts or
//! loop devices: filesystems are built as plain files (`mkfs.ext4 -d`, `mkfs.vfat -C` + mtools),
//! the table is written by sfdisk on the image file, and the partitions are copied in sparsely.

use std::fs::{self, OpenOptions};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::fsutil::tree_usage;
use crate::cmd::Cmd;
use crate::spec::Spec;

pub const ESP_LABEL: &str = "LABFORGE_ESP";
/// FAT labels hold at most 11 characters.
pub const ESP_FS_LABEL: &str = "LABFORGEESP";
pub const ROOT_LABEL: &str = "LABFORGE_ROOT";
pub const STATE_LABEL: &str = "LABFORGE_STATE";

const MIB: u64 = 1 << 20;
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const ROOT_X86_64_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const LINUX_DATA_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    pub label: &'static str,
    pub type_guid: &'static str,
    pub uuid: String,
    /// Filesystem UUID.
    pub fs_uuid: String,
    pub start_bytes: u64,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    pub disk_uuid: String,
    pub size_bytes: u64,
    pub partitions: Vec<Partition>,
}

/// Deterministic UUIDs from the build's input hash, so the same inputs give the same image.
fn derived_uuid(input_hash: &str, what: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("{input_hash}/{what}"));
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid().to_string()
}

impl Layout {
    pub fn new(spec: &Spec, input_hash: &str) -> Self {
        let mut start = MIB;
        let mut partitions = Vec::new();
        for (label, type_guid, size) in [
            (ESP_LABEL, ESP_TYPE, spec.disk.esp_size),
            (ROOT_LABEL, ROOT_X86_64_TYPE, spec.disk.root_size),
            (STATE_LABEL, LINUX_DATA_TYPE, spec.disk.state_size),
        ] {
            partitions.push(Partition {
                label,
                type_guid,
                uuid: derived_uuid(input_hash, label),
                fs_uuid: derived_uuid(input_hash, &format!("{label}/fs")),
                start_bytes: start,
                size_bytes: size.bytes(),
            });
            start += size.bytes();
        }
        Layout {
            disk_uuid: derived_uuid(input_hash, "disk"),
            // 1 MiB at the end for the backup GPT.
            size_bytes: start + MIB,
            partitions,
        }
    }

    pub fn part(&self, label: &str) -> &Partition {
        self.partitions.iter().find(|p| p.label == label).expect("known label")
    }

    pub fn sfdisk_script(&self) -> String {
        let mut s = format!("label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\n", self.disk_uuid);
        for p in &self.partitions {
            s.push_str(&format!(
                "start={}, size={}, type={}, uuid={}, name=\"{}\"\n",
                p.start_bytes / 512,
                p.size_bytes / 512,
                p.type_guid,
                p.uuid,
                p.label
            ));
        }
        s
    }
}

/// Kernel command line: the root partition by its unique id, then the spec's own arguments.
pub fn cmdline(layout: &Layout, spec: &Spec) -> String {
    // `ro`: systemd remounts the root read-write from fstab, except in a live session from a
    // stick, which must stay as it was written (see the agent's install::live).
    let mut c = format!("root=PARTUUID={} ro rootwait", layout.part(ROOT_LABEL).uuid);
    if !spec.kernel.cmdline.trim().is_empty() {
        c.push(' ');
        c.push_str(spec.kernel.cmdline.trim());
    }
    c
}

/// Checks the root tree fits the root partition before spending time on mkfs.
pub fn check_root_fits(root: &Path, layout: &Layout) -> Result<u64> {
    let need = tree_usage(root)?;
    let have = layout.part(ROOT_LABEL).size_bytes;
    // ext4 metadata (journal, inode tables, reserved blocks) takes roughly 10%.
    if need + need / 10 + 64 * MIB > have {
        bail!(
            "disk.root-size ({} MiB) is too small for the root filesystem, which needs about {} MiB; raise disk.root-size in the spec",
            have / MIB,
            (need + need / 10 + 64 * MIB).div_ceil(MIB)
        );
    }
    Ok(need)
}

/// Writes the disk image at `image`: the GPT first, then each filesystem made directly inside
/// its partition (`mkfs.vfat --offset`, `mkfs.ext4 -E offset=`, mtools `image@@offset`), so no
/// partition is ever copied and the image stays sparse.
pub fn assemble(layout: &Layout, root: &Path, uki: &Path, work: &Path, image: &Path) -> Result<()> {
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(image)
        .with_context(|| format!("creating {}", image.display()))?;
    file.set_len(layout.size_bytes)?;
    drop(file);
    let script = work.join("gpt.sfdisk");
    fs::write(&script, layout.sfdisk_script())?;
    Cmd::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(image)
        .stdin_file(&script)
        .run()
        .context("writing the GPT")?;

    let esp = layout.part(ESP_LABEL);
    Cmd::new("mkfs.vfat")
        .args(["-F", "32", "-n", ESP_FS_LABEL, "-S", "512", "-s"])
        .arg(fat32_sectors_per_cluster(esp.size_bytes).to_string())
        .arg("-i")
        .arg(esp_volume_id(esp))
        .arg(format!("--offset={}", esp.start_bytes / 512))
        .arg(image)
        .arg((esp.size_bytes / 1024).to_string())
        .run()
        .context("making the EFI system partition")?;
    let esp_at = format!("{}@@{}", image.display(), esp.start_bytes);
    Cmd::new("mmd").arg("-i").arg(&esp_at).args(["::/EFI", "::/EFI/BOOT"]).run()?;
    Cmd::new("mcopy").arg("-i").arg(&esp_at).arg(uki).arg("::/EFI/BOOT/BOOTX64.EFI").run().map_err(|e| {
        if format!("{e:#}").contains("Disk full") {
            e.context(format!(
                "the kernel image does not fit the {} MiB ESP; raise disk.esp-size",
                esp.size_bytes / MIB
            ))
        } else {
            e.context("copying the UKI into the ESP")
        }
    })?;

    mkfs_ext4(image, layout.part(ROOT_LABEL), Some(root)).map_err(|e| {
        let text = format!("{e:#}");
        if text.contains("Could not allocate") || text.contains("No space") {
            e.context("disk.root-size is too small for the root filesystem; raise it in the spec")
        } else {
            e
        }
    })?;
    mkfs_ext4(image, layout.part(STATE_LABEL), None)?;
    fs::File::open(image)?.sync_all()?;
    Ok(())
}

/// Writes `labforge/install.json` into the image's ESP: the layout's GPT disk GUID and size,
/// the UKI's sha256, and the used ranges the installer copies from a stick onto a PC's disk —
/// the GPT area and the root and state filesystems' data blocks with their sha256, and the
/// ESP whole (it holds this file, so its hash can only be taken while copying).
pub fn write_install_manifest(
    layout: &Layout,
    image: &Path,
    uki: &Path,
    name: &str,
    input_hash: &str,
    work: &Path,
) -> Result<()> {
    use labforge_core::manifest::{InstallManifest, ManifestRange, MANIFEST_ON_ESP, SCHEMA_VERSION};
    let hashed = |from: u64, to: u64| -> Result<Vec<ManifestRange>> {
        Ok(crate::bmap::data_spans(image, from, to)?
            .into_iter()
            .map(|(start, end, sha)| ManifestRange { offset: start, len: end - start, sha256: Some(sha) })
            .collect())
    };
    let esp = layout.part(ESP_LABEL);
    let mut file = fs::File::open(image)?;
    let (_, _, gpt_sha) = crate::bmap::hash_spans(&mut file, &[(0, esp.start_bytes)])?.remove(0);
    let mut ranges = vec![
        ManifestRange { offset: 0, len: esp.start_bytes, sha256: Some(gpt_sha) },
        ManifestRange { offset: esp.start_bytes, len: esp.size_bytes, sha256: None },
    ];
    for label in [ROOT_LABEL, STATE_LABEL] {
        let p = layout.part(label);
        ranges.extend(hashed(p.start_bytes, p.start_bytes + p.size_bytes)?);
    }
    let manifest = InstallManifest {
        schema_version: SCHEMA_VERSION,
        image: name.to_string(),
        input_hash: input_hash.to_string(),
        disk_uuid: layout.disk_uuid.clone(),
        disk_size: layout.size_bytes,
        uki_sha256: super::outputs::sha256_file(uki)?,
        ranges,
    };
    let local = work.join("install.json");
    fs::write(&local, serde_json::to_vec(&manifest)?)?;
    let esp_at = format!("{}@@{}", image.display(), esp.start_bytes);
    let dir = MANIFEST_ON_ESP.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    Cmd::new("mmd").arg("-i").arg(&esp_at).arg(format!("::/{dir}")).run()?;
    Cmd::new("mcopy")
        .arg("-i")
        .arg(&esp_at)
        .arg(&local)
        .arg(format!("::/{MANIFEST_ON_ESP}"))
        .run()
        .context("copying the install manifest into the ESP")?;
    fs::File::open(image)?.sync_all()?;
    Ok(())
}

/// The ESP's FAT volume id (8 hex digits) from its filesystem UUID.
pub fn esp_volume_id(esp: &Partition) -> String {
    esp.fs_uuid.replace('-', "")[..8].to_string()
}

/// FAT32 needs at least 65525 clusters; firmware and mtools reject a volume with fewer. Pick
/// the largest cluster (up to 4 KiB) that keeps a safe margin above that.
pub fn fat32_sectors_per_cluster(size_bytes: u64) -> u64 {
    [8, 4, 2, 1].into_iter().find(|s| size_bytes / (s * 512) >= 70_000).unwrap_or(1)
}

/// Makes an ext4 filesystem inside `image` at the partition's offset.
fn mkfs_ext4(image: &Path, part: &Partition, contents: Option<&Path>) -> Result<()> {
    let mut cmd = Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-L", part.label, "-U", &part.fs_uuid, "-E"])
        .arg(format!("offset={},nodiscard,root_owner=0:0,hash_seed={}", part.start_bytes, part.fs_uuid));
    if let Some(dir) = contents {
        cmd = cmd.arg("-d").arg(dir);
    }
    cmd.arg(image)
        .arg(format!("{}k", part.size_bytes / 1024))
        .run()
        .with_context(|| format!("making the {} filesystem", part.label))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat32_always_has_enough_clusters() {
        for mib in [64u64, 128, 256, 512, 1024] {
            let s = fat32_sectors_per_cluster(mib * MIB);
            assert!(mib * MIB / (s * 512) >= 70_000, "{mib} MiB with {s} sectors per cluster");
        }
        assert_eq!(fat32_sectors_per_cluster(1024 * MIB), 8);
    }

    #[test]
    fn layout_is_aligned_and_deterministic() {
        let spec: Spec = toml::from_str("name = \"t\"\n[base]\nsuite = \"bookworm\"\n").unwrap();
        let a = Layout::new(&spec, "h1");
        assert_eq!(a.partitions.len(), 3);
        for p in &a.partitions {
            assert_eq!(p.start_bytes % MIB, 0);
        }
        assert_eq!(a.part(STATE_LABEL).start_bytes + a.part(STATE_LABEL).size_bytes + MIB, a.size_bytes);
        assert_eq!(Layout::new(&spec, "h1").disk_uuid, a.disk_uuid);
        assert_ne!(Layout::new(&spec, "h2").disk_uuid, a.disk_uuid);
        assert!(cmdline(&a, &spec).starts_with(&format!("root=PARTUUID={} ", a.part(ROOT_LABEL).uuid)));
    }
}
