//! Netboot. The builder's `pxe` output puts the kernel, the initrd (with live-boot), the root
//! filesystem as a squashfs and an iPXE script into the image at [`ARTIFACT_DIR`] and into
//! `--out`. A PC that boots them runs the image from memory: the initrd fetches the squashfs
//! over HTTP and boots it with a tmpfs overlay (`boot=live fetch=URL` on the kernel command
//! line), and the live generator (`install::live`) keeps the state directory in memory too.
//!
//! With `[pxe] serve = true` the master serves its room: dnsmasq (proxy-DHCP beside the LAN's
//! own DHCP server, or full DHCP on `dhcp-range` for a LAN without one) answers PXE clients,
//! hands firmware PXE ROMs iPXE's EFI binary over TFTP, and points iPXE at
//! `http://<master>:9743/pxe/boot.ipxe`, which the agent serves with the artifacts.

pub mod task;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

pub use labforge_core::config::pxe::{parse_range, EnrolPolicy, PxeConfig, ARTIFACT_DIR, IPXE_DIR};

pub mod enrol;

/// Whether this boot came over the network: live-boot's `boot=live` with a `fetch=` URL.
pub fn netbooted(cmdline: &str) -> bool {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    words.contains(&"boot=live") && words.iter().any(|w| w.starts_with("fetch="))
}

/// Where a netbooted node's files are served (`http://master:9743/pxe`): the directory of the
/// `fetch=` URL its squashfs came from; `None` if this boot was not a netboot.
pub fn base_url(cmdline: &str) -> Option<String> {
    netbooted(cmdline)
        .then(|| cmdline.split_whitespace().find_map(|w| w.strip_prefix("fetch=")))
        .flatten()
        .and_then(|u| u.rsplit_once('/').map(|(d, _)| d.to_string()))
}

crate::wire_enum! {
    /// Whether the master serves netboot.
    #[derive(Default)]
    pub enum PxeState {
        #[default]
        Serving = "serving",
        /// dnsmasq stopped or could not start; started again.
        Failed = "failed",
        /// The image has no netboot files, or no iPXE.
        Unavailable = "unavailable",
    }
}

crate::wire_enum! {
    /// How dnsmasq answers PXE clients.
    #[derive(Default)]
    pub enum PxeMode {
        /// Beside the LAN's own DHCP server: boot information only.
        #[default]
        ProxyDhcp = "proxy-dhcp",
        /// Addresses from `[pxe] dhcp-range` too.
        Dhcp = "dhcp",
    }
}

/// The PXE part of `/status` (on a master with `[pxe] serve`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PxeStatus {
    pub state: PxeState,
    pub mode: PxeMode,
    /// What iPXE is pointed at.
    pub url: String,
    pub message: String,
    /// Artifact requests served over HTTP.
    pub served: u64,
    /// Blobs of the preloaded images served to netbooted nodes.
    #[serde(default)]
    pub preload_served: u64,
}

/// What the status server serves under `/pxe/` while the master serves netboot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    pub dir: PathBuf,
    pub image: String,
    /// Only clients on the cluster LAN are answered.
    pub network: Ipv4Addr,
    pub netmask: Ipv4Addr,
}

impl Serving {
    pub fn allows(&self, peer: std::net::IpAddr) -> bool {
        let mask = u32::from(self.netmask);
        match peer {
            std::net::IpAddr::V4(v4) => u32::from(v4) & mask == u32::from(self.network) & mask,
            std::net::IpAddr::V6(v6) => {
                v6.to_ipv4_mapped().is_some_and(|v4| u32::from(v4) & mask == u32::from(self.network) & mask)
            }
        }
    }
}

/// The image's netboot script name in [`ARTIFACT_DIR`], if the image carries the artifacts.
pub fn image_script(dir: &Path, image: &str) -> Option<PathBuf> {
    let p = dir.join(format!("{image}.ipxe"));
    p.is_file().then_some(p)
}

/// The script iPXE gets first: where the artifacts are and the master's enrolment key (which
/// the image's own script puts on the kernel command line), then the image's own script.
pub fn boot_script(base: &str, image: &str, enrol_key: Option<&str>) -> String {
    let key = enrol_key.map(|k| format!("set labforge-enrol {k}\n")).unwrap_or_default();
    format!("#!ipxe\nset labforge-base {base}\n{key}chain ${{labforge-base}}/{image}.ipxe\n")
}

/// A file name a client may ask for: a plain name, no path.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// dnsmasq's argv for serving netboot on `lan` (address `addr`, netmask `mask`), with the
/// HTTP script at `url`, TFTP from `tftp_root`, and full DHCP on `range` if given.
pub fn dnsmasq_args(
    interface: &str,
    addr: Ipv4Addr,
    mask: Ipv4Addr,
    url: &str,
    tftp_root: &Path,
    range: Option<&str>,
    leases: &Path,
) -> Result<Vec<String>> {
    let network = Ipv4Addr::from(u32::from(addr) & u32::from(mask));
    let mut a: Vec<String> = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        // No DNS: only DHCP/PXE and TFTP.
        "--port=0",
        "--bind-interfaces",
        "--log-dhcp",
        "--log-facility=-",
        "--pid-file",
        // It binds its sockets and opens the lease file as root, then runs as nobody: a flaw
        // in its DHCP or TFTP parsers does not give the LAN root on the master.
        "--user=nobody",
        "--group=nogroup",
    ]
    .map(String::from)
    .to_vec();
    a.push(format!("--interface={interface}"));
    a.push(format!("--dhcp-leasefile={}", leases.display()));
    match range {
        Some(r) => {
            let (first, last) = parse_range(r)?;
            a.push(format!("--dhcp-range={first},{last},{mask},1h"));
        }
        None => a.push(format!("--dhcp-range={network},proxy,{mask}")),
    }
    a.extend(boot_options(url, tftp_root));
    Ok(a)
}

/// dnsmasq's options that answer PXE clients: firmware ROMs get iPXE over TFTP, iPXE gets the
/// script at `url`. Also added to the dnsmasq of a master that serves a bare switch, which
/// then is the only DHCP server on the interface.
pub fn boot_options(url: &str, tftp_root: &Path) -> Vec<String> {
    let mut a = Vec::new();
    // iPXE says who it is in the user class: it gets the script; firmware ROMs get iPXE first.
    a.push("--dhcp-userclass=set:ipxe,iPXE".into());
    a.push(format!("--dhcp-boot=tag:ipxe,{url}"));
    a.push("--pxe-prompt=labforge,0".into());
    for csa in ["x86-64_EFI", "BC_EFI"] {
        a.push(format!("--pxe-service=tag:!ipxe,{csa},labforge netboot,ipxe.efi"));
        a.push(format!("--pxe-service=tag:ipxe,{csa},labforge netboot,{url}"));
    }
    a.push("--enable-tftp".into());
    a.push(format!("--tftp-root={}", tftp_root.display()));
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_netboot_is_live_boot_with_a_fetch_url() {
        assert!(netbooted("initrd=initrd boot=live fetch=http://10.0.0.1/x.squashfs console=ttyS0"));
        assert!(!netbooted("root=PARTUUID=abc ro rootwait"));
        assert!(!netbooted("boot=live"), "live-boot from a local medium is not a netboot");
    }

    #[test]
    fn proxy_dhcp_unless_a_range_is_given() {
        let (addr, mask) = (Ipv4Addr::new(10, 77, 0, 23), Ipv4Addr::new(255, 255, 255, 0));
        let url = "http://10.77.0.23:9743/pxe/boot.ipxe";
        let a = dnsmasq_args("enp0s1", addr, mask, url, Path::new("/usr/lib/ipxe"), None, Path::new("/run/l")).unwrap();
        assert!(a.contains(&"--dhcp-range=10.77.0.0,proxy,255.255.255.0".to_string()), "{a:?}");
        assert!(a.contains(&format!("--dhcp-boot=tag:ipxe,{url}")));
        assert!(a.contains(&"--pxe-service=tag:!ipxe,x86-64_EFI,labforge netboot,ipxe.efi".to_string()));
        assert!(a.contains(&"--port=0".to_string()) && a.contains(&"--interface=enp0s1".to_string()));
        assert!(a.contains(&"--user=nobody".to_string()) && !a.iter().any(|x| x == "--user=root"));
        let a = dnsmasq_args(
            "enp0s1",
            addr,
            mask,
            url,
            Path::new("/usr/lib/ipxe"),
            Some("10.77.0.100,10.77.0.150"),
            Path::new("/run/l"),
        )
        .unwrap();
        assert!(a.contains(&"--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,1h".to_string()), "{a:?}");
        assert!(dnsmasq_args("e", addr, mask, url, Path::new("/x"), Some("10.0.0.9,10.0.0.1"), Path::new("/run/l"))
            .is_err());
    }

    #[test]
    fn config_and_names() {
        assert!(PxeConfig { serve: true, dhcp_range: Some("10.0.0.1-10.0.0.9".into()), ..Default::default() }
            .validate()
            .is_err());
        assert!(PxeConfig { serve: true, dhcp_range: Some("10.0.0.1, 10.0.0.9".into()), ..Default::default() }
            .validate()
            .is_ok());
        for bad in ["", "..", "../etc/shadow", "a/b"] {
            assert!(!safe_name(bad), "{bad}");
        }
        assert!(safe_name("demo.squashfs"));
        assert_eq!(
            boot_script("http://10.0.0.1:9743/pxe", "demo", Some("ab12")),
            "#!ipxe\nset labforge-base http://10.0.0.1:9743/pxe\nset labforge-enrol ab12\nchain ${labforge-base}/demo.ipxe\n"
        );
    }
}
