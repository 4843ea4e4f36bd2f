//! Stage `boot`: a Unified Kernel Image (systemd-stub + os-release + cmdline + initrd + kernel),
//! assembled with objcopy. It goes to `\EFI\BOOT\BOOTX64.EFI`, the removable-media path, so a PC
//! boots it from a stick without any NVRAM boot entry.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use object::{Object, ObjectSection};

use crate::cmd::Cmd;
use crate::hostcheck::EFI_STUB;

pub struct Kernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
}

/// The newest kernel in the tree's /boot, with its initrd.
pub fn find_kernel(root: &Path) -> Result<Kernel> {
    let boot = root.join("boot");
    let mut versions: Vec<String> = fs::read_dir(&boot)
        .with_context(|| format!("listing {}", boot.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_string))
        .collect();
    versions.sort_by_key(|a| version_key(a));
    let Some(version) = versions.pop() else {
        bail!("no kernel in the image's /boot; the spec's packages must include a kernel (labforge adds linux-image-amd64 / linux-image-generic)");
    };
    let initrd = boot.join(format!("initrd.img-{version}"));
    if !initrd.is_file() {
        bail!("kernel {version} has no initrd at {}; is initramfs-tools installed?", initrd.display());
    }
    Ok(Kernel { vmlinuz: boot.join(format!("vmlinuz-{version}")), initrd, version })
}

fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok()).collect()
}

/// Writes the UKI to `out`.
pub fn build_uki(root: &Path, kernel: &Kernel, cmdline: &str, work: &Path, out: &Path) -> Result<()> {
    let osrel = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .context("the image has no os-release file")?;
    let osrel = fs::canonicalize(&osrel).unwrap_or(osrel);
    let cmdline_file = work.join("cmdline");
    fs::write(&cmdline_file, format!("{cmdline}\0"))?;

    let stub = fs::read(EFI_STUB).with_context(|| format!("reading EFI stub {EFI_STUB}"))?;
    let (mut next, align) = stub_layout(&stub)?;
    let mut cmd = Cmd::new("objcopy");
    for (name, file) in [
        (".osrel", osrel.as_path()),
        (".cmdline", cmdline_file.as_path()),
        (".initrd", kernel.initrd.as_path()),
        (".linux", kernel.vmlinuz.as_path()),
    ] {
        let len = fs::metadata(file).with_context(|| format!("reading {}", file.display()))?.len();
        cmd = cmd
            .arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={next:#x}"));
        next = align_up(next + len, align);
    }
    cmd.arg(EFI_STUB).arg(out).run().context("assembling the UKI")?;
    Ok(())
}

/// First free (aligned) virtual address after the stub's sections, and the section alignment.
fn stub_layout(stub: &[u8]) -> Result<(u64, u64)> {
    let pe = object::read::pe::PeFile64::parse(stub).context("parsing the EFI stub as a PE image")?;
    let align = u64::from(pe.nt_headers().optional_header.section_alignment.get(object::LittleEndian)).max(512);
    let end = pe
        .sections()
        .map(|s| {
            let raw = s.file_range().map(|(_, len)| len).unwrap_or(0);
            s.address() + s.size().max(raw)
        })
        .max()
        .context("EFI stub has no sections")?;
    Ok((align_up(end, align), align))
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = ["6.1.0-9-amd64".to_string(), "6.1.0-10-amd64".to_string()];
        v.sort_by_key(|a| version_key(a));
        assert_eq!(v.last().unwrap(), "6.1.0-10-amd64");
    }

    #[test]
    fn stub_layout_is_past_every_section() {
        let stub = fs::read(EFI_STUB).expect("systemd-boot-efi is installed (make host-deps)");
        let (start, align) = stub_layout(&stub).unwrap();
        assert_eq!(start % align, 0);
        let pe = object::read::pe::PeFile64::parse(&*stub).unwrap();
        for s in pe.sections() {
            assert!(s.address() + s.size() <= start);
        }
    }
}
