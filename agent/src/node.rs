//! Node-level effects the agent needs: the LAN interface and its address, /etc/hosts entries
//! for the API endpoint, and the optional config partition.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};

use crate::inventory::Inventory;

/// The cluster LAN as this node sees it.
#[derive(Debug, Clone)]
pub struct Lan {
    pub interface: String,
    pub address: Ipv4Addr,
    pub broadcast: Ipv4Addr,
    pub netmask: Ipv4Addr,
}

/// Finds the LAN interface (`auto`: the first physical NIC with an IPv4 address) and its
/// address and broadcast address, if it has one yet.
pub fn lan(selector: &str, inventory: &Inventory) -> Option<Lan> {
    let names: Vec<&str> =
        if selector == "auto" { inventory.nics.iter().map(|n| n.name.as_str()).collect() } else { vec![selector] };
    let addrs = nix::ifaddrs::getifaddrs().ok()?.collect::<Vec<_>>();
    for name in names {
        for a in addrs.iter().filter(|a| a.interface_name == name) {
            let Some(ip) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) else { continue };
            let broadcast =
                a.broadcast.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()).unwrap_or(Ipv4Addr::BROADCAST);
            let netmask = a
                .netmask
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .map(|s| s.ip())
                .unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
            return Some(Lan { interface: name.to_string(), address: ip, broadcast, netmask });
        }
    }
    None
}

const HOSTS_MARK: &str = "# labforge";

/// Points `host` at `ip` in /etc/hosts (one line, marked as ours, replaced on change).
pub fn set_hosts_entry(hosts: &Path, host: &str, ip: &str) -> Result<()> {
    let text = fs::read_to_string(hosts).unwrap_or_default();
    let line = format!("{ip} {host} {HOSTS_MARK}");
    if text.lines().any(|l| l == line) {
        return Ok(());
    }
    let mut out: String = text
        .lines()
        .filter(|l| !(l.ends_with(HOSTS_MARK) && l.split_whitespace().nth(1) == Some(host)))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&line);
    out.push('\n');
    let tmp = hosts.with_extension("labforge-tmp");
    fs::write(&tmp, out).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, hosts).with_context(|| format!("updating {}", hosts.display()))?;
    Ok(())
}

/// Files found on the config partition (FAT, label `LABFORGE`), if one is attached.
#[derive(Debug, Default)]
pub struct ConfigPartition {
    pub device: String,
    pub labforge_toml: Option<String>,
    pub cluster_secret: Option<String>,
}

pub const CONFIG_LABEL: &str = "LABFORGE";

/// Reads `labforge.toml` and `cluster.secret` from the partition labelled `LABFORGE`,
/// mounted read-only for the moment it takes.
pub fn read_config_partition() -> Result<Option<ConfigPartition>> {
    let dev = Path::new("/dev/disk/by-label").join(CONFIG_LABEL);
    if !dev.exists() {
        return Ok(None);
    }
    let mnt = tempfile::Builder::new().prefix("labforge-config-").tempdir_in("/run").context("making a mount point")?;
    use nix::mount::{mount, umount, MsFlags};
    mount(
        Some(&dev),
        mnt.path(),
        Some("vfat"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| format!("mounting config partition {} read-only", dev.display()))?;
    let read = |name: &str| fs::read_to_string(mnt.path().join(name)).ok();
    let found = ConfigPartition {
        device: dev.display().to_string(),
        labforge_toml: read("labforge.toml"),
        cluster_secret: read("cluster.secret"),
    };
    umount(mnt.path()).context("unmounting config partition")?;
    Ok(Some(found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_entry_is_added_then_replaced() {
        let d = tempfile::tempdir().unwrap();
        let hosts = d.path().join("hosts");
        fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        set_hosts_entry(&hosts, "lab-api", "10.0.0.2").unwrap();
        set_hosts_entry(&hosts, "lab-api", "10.0.0.2").unwrap();
        assert_eq!(fs::read_to_string(&hosts).unwrap(), "127.0.0.1 localhost\n10.0.0.2 lab-api # labforge\n");
        set_hosts_entry(&hosts, "lab-api", "10.0.0.3").unwrap();
        assert_eq!(fs::read_to_string(&hosts).unwrap(), "127.0.0.1 localhost\n10.0.0.3 lab-api # labforge\n");
    }
}
