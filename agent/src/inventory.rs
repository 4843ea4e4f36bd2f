//! What this node is made of: identity, NICs, block devices. Read from `/sys`, `/dev` and `/etc`
//! under a configurable root so tests can point it at a fixture tree.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub machine_id: String,
    pub hostname: String,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub mac: String,
    /// Addresses in CIDR notation.
    pub addresses: Vec<String>,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    /// Kernel name, e.g. `vda`.
    pub name: String,
    pub size_bytes: u64,
    /// Stable `/dev/disk/by-id/...` path, if udev made one.
    pub by_id: Option<String>,
    pub removable: bool,
    pub rotational: bool,
    pub model: Option<String>,
}

pub use crate::sys::Roots;

impl Inventory {
    /// Takes the inventory. `addresses` supplies each NIC's addresses (from the kernel on a real
    /// node) so the pure parts can be tested without one.
    pub fn take(roots: &Roots, addresses: &dyn Fn(&str) -> Vec<String>) -> Result<Self> {
        let machine_id = read_trim(&roots.etc.join("machine-id")).context("reading machine-id")?;
        let hostname = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
        Ok(Inventory {
            machine_id,
            hostname,
            nics: nics(&roots.sys, addresses)?,
            disks: disks(&roots.sys, &roots.dev)?,
        })
    }

    /// The first physical (non-virtual) NIC's MAC without separators, for hostname patterns.
    pub fn primary_mac_hex(&self) -> Option<String> {
        self.nics.first().map(|n| n.mac.replace(':', ""))
    }
}

fn read_trim(p: &Path) -> Result<String> {
    Ok(fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
}

fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    out.sort();
    Ok(out)
}

/// Physical NICs: those backed by a device (`/sys/class/net/X/device`), so lo, bridges, veths
/// and CNI interfaces are left out.
fn nics(sys: &Path, addresses: &dyn Fn(&str) -> Vec<String>) -> Result<Vec<Nic>> {
    let mut out = Vec::new();
    for (name, path) in sorted_entries(&sys.join("class/net"))? {
        if !path.join("device").exists() {
            continue;
        }
        let mac = read_trim(&path.join("address")).unwrap_or_default();
        let up = read_trim(&path.join("operstate")).map(|s| s == "up").unwrap_or(false);
        out.push(Nic { addresses: addresses(&name), name, mac, up });
    }
    Ok(out)
}

/// Whole disks: entries of /sys/block that are not virtual (loop, ram, zram, dm-…).
fn disks(sys: &Path, dev: &Path) -> Result<Vec<Disk>> {
    let mut out = Vec::new();
    for (name, path) in sorted_entries(&sys.join("block"))? {
        if !path.join("device").exists() {
            continue;
        }
        let sectors: u64 = read_trim(&path.join("size"))?.parse().unwrap_or(0);
        let flag = |f: &str| read_trim(&path.join(f)).map(|s| s == "1").unwrap_or(false);
        let model = read_trim(&path.join("device/model")).ok().filter(|m| !m.is_empty());
        out.push(Disk {
            by_id: crate::disks::probe::by_id_links(&dev.join("disk/by-id"), &name).into_iter().next(),
            size_bytes: sectors * 512,
            removable: flag("removable"),
            rotational: flag("queue/rotational"),
            model,
            name,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fixture() -> (tempfile::TempDir, Roots) {
        let d = tempfile::tempdir().unwrap();
        let r = Roots {
            sys: d.path().join("sys"),
            dev: d.path().join("dev"),
            etc: d.path().join("etc"),
            ..Roots::default()
        };
        let w = |p: PathBuf, s: &str| {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, s).unwrap();
        };
        w(r.etc.join("machine-id"), "0123456789abcdef0123456789abcdef\n");
        for (nic, mac, dev) in [("enp0s2", "52:54:00:12:34:56", true), ("lo", "00:00:00:00:00:00", false)] {
            let p = r.sys.join("class/net").join(nic);
            w(p.join("address"), mac);
            w(p.join("operstate"), "up\n");
            if dev {
                fs::create_dir_all(p.join("device")).unwrap();
            }
        }
        for (disk, sectors, removable, dev) in
            [("vda", "4194304", "0", true), ("sda", "2048", "1", true), ("loop0", "8", "0", false)]
        {
            let p = r.sys.join("block").join(disk);
            w(p.join("size"), sectors);
            w(p.join("removable"), removable);
            w(p.join("queue/rotational"), "0");
            if dev {
                w(p.join("device/model"), "QEMU HARDDISK   \n");
            }
        }
        fs::create_dir_all(r.dev.join("disk/by-id")).unwrap();
        symlink("../../sda", r.dev.join("disk/by-id/usb-QEMU_STICK-0:0")).unwrap();
        symlink("../../vda", r.dev.join("disk/by-id/virtio-os")).unwrap();
        symlink("../../vda1", r.dev.join("disk/by-id/virtio-os-part1")).unwrap();
        (d, r)
    }

    #[test]
    fn inventory_lists_physical_nics_and_disks() {
        let (_d, roots) = fixture();
        let inv = Inventory::take(&roots, &|n| vec![format!("10.0.0.2/24 on {n}")]).unwrap();
        assert_eq!(inv.machine_id, "0123456789abcdef0123456789abcdef");
        assert_eq!(inv.nics.len(), 1);
        assert_eq!(inv.nics[0].mac, "52:54:00:12:34:56");
        assert_eq!(inv.nics[0].addresses, vec!["10.0.0.2/24 on enp0s2"]);
        assert_eq!(inv.primary_mac_hex().as_deref(), Some("525400123456"));
        let names: Vec<_> = inv.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["sda", "vda"]);
        let sda = &inv.disks[0];
        assert!(sda.removable);
        assert_eq!(sda.size_bytes, 2048 * 512);
        assert_eq!(sda.by_id.as_deref(), Some("/dev/disk/by-id/usb-QEMU_STICK-0:0"));
        assert_eq!(inv.disks[1].by_id.as_deref(), Some("/dev/disk/by-id/virtio-os"));
        assert_eq!(inv.disks[1].model.as_deref(), Some("QEMU HARDDISK"));
    }
}
