//! Stage `pxe` (output `pxe`): what a PC needs to boot the image over the network, with no
//! disk of its own. The kernel, the image's initrd (which carries live-boot: with `boot=live
//! fetch=URL` it downloads the root filesystem into memory and boots it), the root filesystem
//! as a squashfs, an iPXE script, and the UKI (for a netbooted node that installs itself onto
//! its disk). They go to `--out` as `<name>.vmlinuz`, `.initrd`, `.squashfs`, `.ipxe`, `.efi`,
//! and into the image at `/usr/lib/labforge/pxe/` under the same names so
//! the master of a room can serve them (see the agent's `pxe` module).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use labforge_core::manifest::{Ext4Format, NetManifest, VfatFormat, NET_MANIFEST, NET_SCHEMA_VERSION};

use super::boot::Kernel;
use super::disk::{esp_volume_id, fat32_sectors_per_cluster, Layout, ESP_FS_LABEL, ESP_LABEL, ROOT_LABEL, STATE_LABEL};
use super::fsutil::write_in_root;
use super::outputs::sha256_file;
use crate::cmd::Cmd;
use crate::spec::Spec;

/// Where the image carries the artifacts (the agent serves this directory).
pub const DIR_IN_IMAGE: &str = labforge_core::config::pxe::ARTIFACT_DIR;

/// `/etc/fstab` of a netbooted node: live-boot appends its overlay root; the state directory is
/// a tmpfs from the live generator.
const NETBOOT_FSTAB: &str =
    "# Written by labforge: a netbooted node runs from memory (live-boot adds its root below).\n";

/// The artifact file names for image `name`: vmlinuz, initrd, squashfs, ipxe.
pub fn file_names(name: &str) -> [String; 4] {
    ["vmlinuz", "initrd", "squashfs", "ipxe"].map(|ext| format!("{name}.{ext}"))
}

/// The iPXE script. `labforge-base` is the URL the files are served under: a labforge master
/// sets it before chaining this script; anyone else serving the files sets it the same way.
pub fn ipxe_script(spec: &Spec, input_hash: &str) -> String {
    let n = &spec.name;
    let extra = spec.kernel.cmdline.trim();
    format!(
        "#!ipxe\n\
         # Netboot of labforge image {n} (input hash {hash}).\n\
         # Serve {n}.vmlinuz, {n}.initrd and {n}.squashfs over HTTP, then:\n\
         #   set labforge-base http://SERVER/PATH && chain ${{labforge-base}}/{n}.ipxe\n\
         # A labforge master with [pxe] serve = true does this for its room, and sets\n\
         # labforge-enrol to its enrolment key (the node takes the secret only from it).\n\
         isset ${{labforge-base}} || goto nobase\n\
         echo labforge: booting {n} from ${{labforge-base}}\n\
         kernel ${{labforge-base}}/{n}.vmlinuz initrd=initrd boot=live fetch=${{labforge-base}}/{n}.squashfs labforge.enrol=${{labforge-enrol}} {extra}\n\
         initrd --name initrd ${{labforge-base}}/{n}.initrd\n\
         boot\n\
         :nobase\n\
         echo labforge: set labforge-base to the URL that serves {n}.squashfs, then chain this script\n\
         shell\n",
        hash = &input_hash[..16.min(input_hash.len())],
    )
}

/// Writes the artifacts into `staging` and into the image tree; returns the staged files.
pub fn build(
    spec: &Spec,
    root: &Path,
    kernel: &Kernel,
    uki: &Path,
    layout: &Layout,
    input_hash: &str,
    staging: &Path,
) -> Result<Vec<PathBuf>> {
    if !root.join("usr/lib/live/boot").is_dir() && !root.join("lib/live/boot").is_dir() {
        bail!("the pxe output needs live-boot in the image (labforge adds it to the packages; is the rootfs cache stale? rebuild with --force)");
    }
    let [vmlinuz, initrd, squashfs, ipxe] = file_names(&spec.name).map(|f| staging.join(f));
    let efi = staging.join(format!("{}.efi", spec.name));
    fs::copy(&kernel.vmlinuz, &vmlinuz).with_context(|| format!("copying {}", kernel.vmlinuz.display()))?;
    fs::copy(&kernel.initrd, &initrd).with_context(|| format!("copying {}", kernel.initrd.display()))?;
    fs::copy(uki, &efi).with_context(|| format!("copying {}", uki.display()))?;
    fs::write(&ipxe, ipxe_script(spec, input_hash))?;
    // What a netbooted node needs to install itself onto its disk; in the tree, so the
    // squashfs (and the disk image) carry it.
    let fstab = root.join("etc/fstab");
    let disk_fstab = fs::read_to_string(&fstab).with_context(|| format!("reading {}", fstab.display()))?;
    let mut files = std::collections::BTreeMap::new();
    for f in [&vmlinuz, &initrd, &ipxe, &efi] {
        files.insert(f.file_name().expect("file").to_string_lossy().into_owned(), sha256_file(f)?);
    }
    let net = net_manifest(spec, layout, input_hash, &disk_fstab, sha256_file(uki)?, files);
    write_in_root(root, NET_MANIFEST.trim_start_matches('/'), &serde_json::to_vec_pretty(&net)?, 0o644)?;

    // The squashfs is the tree as it stands, before the artifacts are put into it, with an
    // fstab of its own: a netbooted node has no root or state partition, and live-boot adds
    // its overlay root (a second `/` entry would make systemd's fstab generator fail).
    fs::write(&fstab, NETBOOT_FSTAB)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut cmd = Cmd::new("mksquashfs")
        .arg(root)
        .arg(&squashfs)
        .args(["-noappend", "-quiet", "-no-progress", "-comp", "zstd", "-processors"])
        .arg(threads.to_string());
    // The preloaded images' blobs stay out: a netbooted node fetches them from its master as
    // it imports them (the index stays, so it knows what to fetch and each blob's digest),
    // instead of holding them in memory twice, in the squashfs and in containerd.
    let blobs = format!("{}/blobs", labforge_core::layout::PRELOAD_LAYOUT_DIR.trim_start_matches('/'));
    // The cluster secret stays out too: anyone on the LAN can fetch the squashfs. A netbooted
    // node gets the secret by enrolment (the agent's `pxe::enrol`).
    let secret = labforge_core::config::SECRET_PATH.trim_start_matches('/');
    let excluded: Vec<&str> = [blobs.as_str(), secret].into_iter().filter(|p| root.join(p).exists()).collect();
    if !excluded.is_empty() {
        // `-e` takes every argument after it.
        cmd = cmd.arg("-e").args(excluded);
    }
    let made = cmd.run().context("making the netboot root filesystem (mksquashfs)");
    fs::write(&fstab, disk_fstab)?;
    made?;
    let staged = vec![vmlinuz, initrd, squashfs, ipxe, efi];
    for f in &staged {
        let rel = format!("{DIR_IN_IMAGE}/{}", f.file_name().expect("file").to_string_lossy());
        let rel = rel.trim_start_matches('/');
        // The squashfs carries no secret, but it is the whole root filesystem: root only.
        let mode = if rel.ends_with(".squashfs") { 0o600 } else { 0o644 };
        write_in_root(root, rel, &fs::read(f)?, mode)?;
    }
    Ok(staged)
}

/// The netboot install manifest: the disk image's table and filesystems as the disk stage
/// makes them, its fstab, and the sha256 of the UKI and the netboot files.
fn net_manifest(
    spec: &Spec,
    layout: &Layout,
    input_hash: &str,
    fstab: &str,
    uki_sha256: String,
    files: std::collections::BTreeMap<String, String>,
) -> NetManifest {
    let ext4 = |label: &str| {
        let p = layout.part(label);
        Ext4Format { label: p.label.to_string(), uuid: p.fs_uuid.clone() }
    };
    let esp = layout.part(ESP_LABEL);
    NetManifest {
        schema_version: NET_SCHEMA_VERSION,
        image: spec.name.clone(),
        input_hash: input_hash.to_string(),
        disk_uuid: layout.disk_uuid.clone(),
        disk_size: layout.size_bytes,
        sfdisk: layout.sfdisk_script(),
        esp: VfatFormat {
            label: ESP_FS_LABEL.to_string(),
            volume_id: esp_volume_id(esp),
            sectors_per_cluster: fat32_sectors_per_cluster(esp.size_bytes),
        },
        root: ext4(ROOT_LABEL),
        state: ext4(STATE_LABEL),
        uki_sha256,
        fstab: fstab.to_string(),
        files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_netinstall_manifest_describes_the_disk_the_disk_stage_makes() {
        let spec: Spec = toml::from_str("name = \"lab\"\n[base]\nsuite = \"bookworm\"\n").unwrap();
        let layout = Layout::new(&spec, "0123abcd");
        let files = [("lab.vmlinuz".to_string(), "aa".to_string())].into_iter().collect();
        let m =
            net_manifest(&spec, &layout, "0123abcd", "LABEL=LABFORGE_ROOT / ext4 defaults 0 1\n", "bb".into(), files);
        assert_eq!((m.disk_uuid.as_str(), m.disk_size), (layout.disk_uuid.as_str(), layout.size_bytes));
        assert_eq!(m.sfdisk, layout.sfdisk_script());
        assert!(m.sfdisk.contains(&format!("label-id: {}", layout.disk_uuid)));
        let esp = layout.part(ESP_LABEL);
        assert_eq!(m.esp.volume_id, esp.fs_uuid.replace('-', "")[..8]);
        assert_eq!(m.esp.sectors_per_cluster, fat32_sectors_per_cluster(esp.size_bytes));
        assert_eq!(
            (m.root.label.as_str(), m.root.uuid.as_str()),
            (ROOT_LABEL, layout.part(ROOT_LABEL).fs_uuid.as_str())
        );
        assert_eq!(
            (m.state.label.as_str(), m.state.uuid.as_str()),
            (STATE_LABEL, layout.part(STATE_LABEL).fs_uuid.as_str())
        );
        // What the agent reads back.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("netinstall.json");
        fs::write(&p, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        assert_eq!(NetManifest::load(&p).unwrap(), m);
    }

    #[test]
    fn the_script_boots_the_squashfs_from_the_base_it_is_given() {
        let spec: Spec =
            toml::from_str("name = \"lab\"\n[base]\nsuite = \"bookworm\"\n[kernel]\ncmdline = \"console=ttyS0\"\n")
                .unwrap();
        let s = ipxe_script(&spec, "0123456789abcdef0123");
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("kernel ${labforge-base}/lab.vmlinuz initrd=initrd boot=live fetch=${labforge-base}/lab.squashfs labforge.enrol=${labforge-enrol} console=ttyS0\n"), "{s}");
        assert!(s.contains("initrd --name initrd ${labforge-base}/lab.initrd\n"));
        assert!(s.contains("isset ${labforge-base} || goto nobase"));
        assert!(s.contains("0123456789abcdef") && !s.contains("0123456789abcdef0123"));
        assert_eq!(file_names("lab"), ["lab.vmlinuz", "lab.initrd", "lab.squashfs", "lab.ipxe"].map(String::from));
    }
}
