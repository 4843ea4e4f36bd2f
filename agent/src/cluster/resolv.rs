//! The resolv.conf the kubelet gives pods that use the node's DNS (`dnsPolicy: Default`, CoreDNS
//! among them), kept by the agent in its state directory and named in the cluster's
//! `KubeletConfiguration` (`resolvConf`).
//!
//! It lists the resolvers systemd-resolved learnt for the node (a master serving a bare switch
//! names itself there, so CoreDNS forwards to its dnsmasq). A LAN whose DHCP server hands out
//! no DNS server leaves that list empty, and CoreDNS then refuses to start (`plugin/forward:
//! no nameservers found`): the cluster's own names would never resolve and kube-system never
//! gets Ready. The file then names the node's own LAN address instead. Nothing answers DNS
//! there on such a LAN, so names outside the cluster fail at once (which is all an offline
//! LAN can offer), while the cluster's names resolve. It is never a loopback address: inside
//! CoreDNS's pod that is CoreDNS itself, a loop its `loop` plugin stops it for.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};

/// The file's name in the state directory.
pub const FILE: &str = "kubelet-resolv.conf";
/// glibc reads at most this many `nameserver` lines; the kubelet warns about more.
const MAX_SERVERS: usize = 3;

/// The file's text for a node whose systemd-resolved file reads `upstream` and whose LAN
/// address is `own`.
pub fn render(upstream: &str, own: &str) -> String {
    let mut servers = Vec::new();
    let mut search = None;
    for line in upstream.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    if !ip.is_loopback() && !ip.is_unspecified() && !servers.contains(&ip) {
                        servers.push(ip);
                    }
                }
            }
            Some("search") => {
                let domains: Vec<&str> = words.take(6).collect();
                if !domains.is_empty() {
                    search = Some(domains.join(" "));
                }
            }
            _ => {}
        }
    }
    let mut text = String::from("# Written by labforge-agent: the DNS servers pods with dnsPolicy Default use.\n");
    if servers.is_empty() {
        text.push_str("# The LAN gives this node no DNS server: its own address, so CoreDNS starts.\n");
        text.push_str(&format!("nameserver {own}\n"));
    } else {
        for s in servers.iter().take(MAX_SERVERS) {
            text.push_str(&format!("nameserver {s}\n"));
        }
    }
    if let Some(s) = search {
        text.push_str(&format!("search {s}\n"));
    }
    text
}

/// Writes `path` from `upstream` (a missing file counts as empty) when its text changed;
/// whether it did. The kubelet reads it for every new pod.
pub fn refresh(path: &Path, upstream: &Path, own: &str) -> Result<bool> {
    use std::io::Read;
    // Bounded: a resolv.conf is a few lines; past 64 KiB is not read.
    let mut read = Vec::new();
    if let Ok(f) = std::fs::File::open(upstream) {
        let _ = f.take(64 * 1024).read_to_end(&mut read);
    }
    let text = render(&String::from_utf8_lossy(&read), own);
    if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
        return Ok(false);
    }
    crate::sys::fs::write_durable_mode(path, text.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_resolvers_are_kept() {
        let up = "# This is /run/systemd/resolve/resolv.conf managed by man:systemd-resolved(8).\n\
                  nameserver 10.77.0.1\nnameserver 192.168.1.53\nsearch lab.example\noptions edns0\n";
        let t = render(up, "10.77.0.20");
        assert!(t.contains("nameserver 10.77.0.1\nnameserver 192.168.1.53\n"), "{t}");
        assert!(t.contains("search lab.example\n"), "{t}");
        assert!(!t.contains("10.77.0.20"), "{t}");
        assert!(!t.contains("options"), "{t}");
    }

    #[test]
    fn a_lan_without_dns_gets_the_nodes_own_address_never_loopback() {
        let up = "# No DNS servers known.\nnameserver 127.0.0.53\nnameserver ::1\n";
        let t = render(up, "10.77.0.130");
        let servers: Vec<&str> = t.lines().filter(|l| l.starts_with("nameserver")).collect();
        assert_eq!(servers, ["nameserver 10.77.0.130"], "{t}");
        assert_eq!(render("", "10.0.0.5").lines().filter(|l| l.starts_with("nameserver")).count(), 1);
    }

    #[test]
    fn at_most_three_servers_and_garbage_ignored() {
        let up = "nameserver 10.0.0.1\nnameserver 10.0.0.1\nnameserver x\nnameserver 10.0.0.2\n\
                  nameserver 10.0.0.3\nnameserver 10.0.0.4\n";
        let t = render(up, "10.0.0.9");
        let servers: Vec<&str> = t.lines().filter(|l| l.starts_with("nameserver")).collect();
        assert_eq!(servers, ["nameserver 10.0.0.1", "nameserver 10.0.0.2", "nameserver 10.0.0.3"]);
    }

    #[test]
    fn refresh_writes_only_a_change() {
        let d = tempfile::tempdir().unwrap();
        let (path, up) = (d.path().join(FILE), d.path().join("resolv.conf"));
        assert!(refresh(&path, &up, "10.0.0.5").unwrap(), "a missing upstream still gives a file");
        assert!(std::fs::read_to_string(&path).unwrap().contains("nameserver 10.0.0.5"));
        assert!(!refresh(&path, &up, "10.0.0.5").unwrap(), "unchanged");
        std::fs::write(&up, "nameserver 10.0.0.1\n").unwrap();
        assert!(refresh(&path, &up, "10.0.0.5").unwrap(), "the LAN's DHCP now names a server");
        let t = std::fs::read_to_string(&path).unwrap();
        assert!(t.contains("nameserver 10.0.0.1") && !t.contains("10.0.0.5"), "{t}");
    }
}
