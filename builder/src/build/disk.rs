//! Stage `disk`: a GPT disk image with ESP, root and state partitions, made without mounts or
//! loop devices: filesystems are built as plain files (`mkfs.ext4 -d`, `mkfs.vfat -C` + mtools),
//! the table is written by sfdisk on the image file, and the partitions are copied in sparsely.

use std::fs::{self, OpenOptions};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::fsutil::{copy_sparse_into, tree_usage};
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

    fn sfdisk_script(&self) -> String {
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
    let mut c = format!("root=PARTUUID={} rw rootwait", layout.part(ROOT_LABEL).uuid);
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

/// Builds the filesystems in `work` and assembles the disk image at `image`.
pub fn assemble(layout: &Layout, root: &Path, uki: &Path, work: &Path, image: &Path) -> Result<()> {
    let esp = layout.part(ESP_LABEL);
    let esp_img = work.join("esp.img");
    Cmd::new("mkfs.vfat")
        .args(["-F", "32", "-n", ESP_FS_LABEL, "-i"])
        .arg(esp.fs_uuid.replace('-', "")[..8].to_string())
        .arg("-C")
        .arg(&esp_img)
        .arg((esp.size_bytes / 1024).to_string())
        .run()
        .context("making the EFI system partition")?;
    Cmd::new("mmd").arg("-i").arg(&esp_img).args(["::/EFI", "::/EFI/BOOT"]).run()?;
    Cmd::new("mcopy")
        .arg("-i")
        .arg(&esp_img)
        .arg(uki)
        .arg("::/EFI/BOOT/BOOTX64.EFI")
        .run()
        .map_err(|e| {
            if format!("{e:#}").contains("Disk full") {
                e.context(format!("the kernel image does not fit the {} MiB ESP; raise disk.esp-size", esp.size_bytes / MIB))
            } else {
                e.context("copying the UKI into the ESP")
            }
        })?;

    let root_img = work.join("root.img");
    mkfs_ext4(&root_img, layout.part(ROOT_LABEL), Some(root)).map_err(|e| {
        if format!("{e:#}").contains("Could not allocate") || format!("{e:#}").contains("No space") {
            e.context("disk.root-size is too small for the root filesystem; raise it in the spec")
        } else {
            e
        }
    })?;
    let state_img = work.join("state.img");
    mkfs_ext4(&state_img, layout.part(STATE_LABEL), None)?;

    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(image)
        .with_context(|| format!("creating {}", image.display()))?;
    file.set_len(layout.size_bytes)?;
    let script = work.join("gpt.sfdisk");
    fs::write(&script, layout.sfdisk_script())?;
    Cmd::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(image)
        .stdin_file(&script)
        .run()
        .context("writing the GPT")?;
    for (img, label) in [(&esp_img, ESP_LABEL), (&root_img, ROOT_LABEL), (&state_img, STATE_LABEL)] {
        copy_sparse_into(img, &file, layout.part(label).start_bytes)
            .with_context(|| format!("copying partition {label} into the image"))?;
    }
    file.sync_all()?;
    Ok(())
}

fn mkfs_ext4(path: &Path, part: &Partition, contents: Option<&Path>) -> Result<()> {
    let mut cmd = Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-L", part.label, "-U", &part.fs_uuid, "-E"])
        .arg(format!("root_owner=0:0,hash_seed={}", part.fs_uuid));
    if let Some(dir) = contents {
        cmd = cmd.arg("-d").arg(dir);
    }
    cmd.arg(path)
        .arg(format!("{}k", part.size_bytes / 1024))
        .run()
        .with_context(|| format!("making the {} filesystem", part.label))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
