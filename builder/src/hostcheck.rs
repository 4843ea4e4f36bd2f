//! `labforge doctor`: which host tools a build needs, and the Debian package providing each.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// What the builder needs on the host.
#[derive(Debug, Clone, Copy)]
pub struct Requirement {
    /// Program name looked up on PATH, or an absolute file path.
    pub what: &'static str,
    /// Debian/Ubuntu package that provides it.
    pub package: &'static str,
    /// What it is used for.
    pub purpose: &'static str,
    /// Needed by every build (false: only by some outputs or by the test suite).
    pub always: bool,
}

/// systemd's EFI stub, the front of every UKI labforge builds.
pub const EFI_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

pub const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        what: "mmdebstrap",
        package: "mmdebstrap",
        purpose: "root filesystem from distribution packages",
        always: true,
    },
    Requirement {
        what: "/usr/share/keyrings/debian-archive-keyring.gpg",
        package: "debian-archive-keyring",
        purpose: "verifying Debian's archive",
        always: false,
    },
    Requirement {
        what: "mkfs.ext4",
        package: "e2fsprogs",
        purpose: "root and state filesystems without mounting",
        always: true,
    },
    Requirement { what: "mkfs.vfat", package: "dosfstools", purpose: "EFI system partition", always: true },
    Requirement {
        what: "mcopy",
        package: "mtools",
        purpose: "copying the UKI into the ESP without mounting",
        always: true,
    },
    Requirement { what: "sfdisk", package: "fdisk", purpose: "GPT partition table", always: true },
    Requirement { what: "objcopy", package: "binutils", purpose: "assembling the UKI", always: true },
    Requirement { what: EFI_STUB, package: "systemd-boot-efi", purpose: "UEFI stub of the UKI", always: true },
    Requirement { what: "systemctl", package: "systemd", purpose: "enabling units in the image", always: true },
    Requirement { what: "useradd", package: "passwd", purpose: "creating users in the image", always: true },
    Requirement { what: "tar", package: "tar", purpose: "unpacking the cached root filesystem", always: true },
    Requirement { what: "gpg", package: "gpg", purpose: "checking fingerprints of repository keys", always: false },
    Requirement { what: "curl", package: "curl", purpose: "fetching repository keys named by URL", always: false },
    Requirement { what: "qemu-img", package: "qemu-utils", purpose: "qcow2 output", always: false },
    Requirement {
        what: "mksquashfs",
        package: "squashfs-tools",
        purpose: "pxe output (the netboot root filesystem)",
        always: false,
    },
    Requirement {
        what: "qemu-system-x86_64",
        package: "qemu-system-x86",
        purpose: "booting images (make demo, tests)",
        always: false,
    },
    Requirement {
        what: "/usr/share/OVMF/OVMF_CODE_4M.fd",
        package: "ovmf",
        purpose: "UEFI firmware for QEMU",
        always: false,
    },
    Requirement { what: "bmaptool", package: "bmap-tools", purpose: "checking .bmap files (tests)", always: false },
    Requirement { what: "dnsmasq", package: "dnsmasq-base", purpose: "DHCP on the test LANs (tests)", always: false },
    Requirement {
        what: "ip",
        package: "iproute2",
        purpose: "network namespaces for the test LANs (tests)",
        always: false,
    },
];

/// Where `what` is found, if anywhere.
pub fn locate(what: &str) -> Option<PathBuf> {
    if what.starts_with('/') {
        return Path::new(what).exists().then(|| PathBuf::from(what));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(what))
        .find(|p| p.is_file())
}

/// "install Debian package X" for a known tool, or a generic hint.
pub fn install_hint(program: &str) -> String {
    match REQUIREMENTS.iter().find(|r| r.what == program) {
        Some(r) => format!(
            "install the Debian package `{}` (apt-get install {}), or run `labforge doctor`",
            r.package, r.package
        ),
        None => "install it, or run `labforge doctor` to list what labforge needs".into(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: &'static str,
    pub package: &'static str,
    pub purpose: &'static str,
    pub required: bool,
    pub found: Option<PathBuf>,
}

pub fn check_all() -> Vec<Check> {
    REQUIREMENTS
        .iter()
        .map(|r| Check {
            what: r.what,
            package: r.package,
            purpose: r.purpose,
            required: r.always,
            found: locate(r.what),
        })
        .collect()
}

/// Fails with one message listing every missing tool a build needs, and how to install them.
pub fn require_for_build(extra: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&Requirement> = REQUIREMENTS
        .iter()
        .filter(|r| r.always || extra.contains(&r.what))
        .filter(|r| locate(r.what).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing.iter().map(|r| format!("{} (package {})", r.what, r.package)).collect();
    let mut pkgs: Vec<&str> = missing.iter().map(|r| r.package).collect();
    pkgs.dedup();
    anyhow::bail!(
        "missing host tools: {}; install them with `apt-get install {}` (or run `make demo` as root, which does)",
        names.join(", "),
        pkgs.join(" ")
    )
}
