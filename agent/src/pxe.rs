//! Netboot. The builder's `pxe` output puts the kernel, the initrd (with live-boot), the root
//! filesystem as a squashfs and an iPXE script into the image at [`ARTIFACT_DIR`] and into
//! `--out`. A PC that boots them runs the image from memory: the initrd fetches the squashfs
//! over HTTP and boots it with a tmpfs overlay (`boot=live fetch=URL` on the kernel command
//! line), and the live generator (`install::live`) keeps the state directory in memory too.

/// Where images with the `pxe` output carry the netboot artifacts.
pub const ARTIFACT_DIR: &str = "/usr/lib/labforge/pxe";

/// Whether this boot came over the network: live-boot's `boot=live` with a `fetch=` URL.
pub fn netbooted(cmdline: &str) -> bool {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    words.contains(&"boot=live") && words.iter().any(|w| w.starts_with("fetch="))
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
}
