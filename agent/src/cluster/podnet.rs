//! The pod network. Each node runs the CNI reference plugins the image carries in
//! `/opt/cni/bin` (`bridge` with `host-local` addresses from the pod CIDR the controller-manager
//! gave its Node, `portmap`, `loopback`), and routes every other node's pod CIDR through that
//! node's LAN address: the "host gateway" layout of flannel's host-gw backend, which is all a
//! room of PCs on one switch needs. flannel itself cannot be built here (see the README); the
//! routes come from what peers announce in their signed beacons, so a stranger on the LAN
//! cannot add one, and a worker needs no right to list other Nodes.
//!
//! Pods reach each other by their own addresses; traffic from a pod to anywhere outside the
//! cluster's pod network leaves masqueraded behind the node's address.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::sys::Cmd;

pub const CONF_DIR: &str = "/etc/cni/net.d";
pub const CONF_FILE: &str = "10-labforge.conflist";
/// The Linux bridge the pods of a node hang off.
pub const BRIDGE: &str = "cni0";

/// A route to another node's pods.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRoute {
    /// The node's pod CIDR.
    pub cidr: String,
    /// The node's LAN address.
    pub via: String,
}

/// An IPv4 CIDR `a.b.c.d/n` (n in 8..=30), normalised. Anything else (what a beacon or the
/// API server says is checked before a route or a file is made of it) is refused.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (addr, len) = s.split_once('/').with_context(|| format!("{s:?} is not a CIDR"))?;
    let addr: Ipv4Addr = addr.parse().with_context(|| format!("{s:?} is not an IPv4 CIDR"))?;
    let len: u8 = len.parse().with_context(|| format!("{s:?} has no prefix length"))?;
    if !(8..=30).contains(&len) {
        bail!("{s:?}: prefix length {len} is outside 8..30");
    }
    let mask = u32::MAX << (32 - len);
    if u32::from(addr) & !mask != 0 {
        bail!("{s:?} has host bits set");
    }
    Ok((addr, len))
}

/// Whether `inner` lies within `outer` (both valid CIDRs).
pub fn within(inner: &str, outer: &str) -> bool {
    match (parse_cidr(inner), parse_cidr(outer)) {
        (Ok((a, al)), Ok((b, bl))) => al >= bl && (u32::from(a) >> (32 - bl)) == (u32::from(b) >> (32 - bl)),
        _ => false,
    }
}

/// The CNI configuration list for a node whose pods take addresses from `pod_cidr`.
pub fn conflist(pod_cidr: &str) -> String {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "labforge",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                // Masquerading is the node's rule (only traffic leaving the pod network), not
                // the plugin's (which would hide pod addresses from pods on other nodes).
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    });
    serde_json::to_string_pretty(&conf).expect("json") + "\n"
}

/// Writes the CNI configuration under `root` when it differs from what is there (kubelet marks
/// the node Ready once a configuration exists). Returns whether it changed.
pub fn write_conf(root: &Path, pod_cidr: &str) -> Result<bool> {
    parse_cidr(pod_cidr)?;
    let dir = root.join(CONF_DIR.trim_start_matches('/'));
    let path = dir.join(CONF_FILE);
    let text = conflist(pod_cidr);
    if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
        return Ok(false);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::sys::fs::write_durable_mode(&path, text.as_bytes(), 0o644)?;
    Ok(true)
}

/// The routes to install: every announced pod CIDR inside the cluster's pod network but this
/// node's own, through the announcing node. A CIDR announced twice (a node replaced without
/// its Node object being deleted) goes to the first announcer in sorted order, consistently.
pub fn routes(own: Option<&str>, cluster_cidr: &str, announced: &[PodRoute]) -> Vec<PodRoute> {
    let mut out: Vec<PodRoute> = announced
        .iter()
        .filter(|r| Some(r.cidr.as_str()) != own)
        .filter(|r| within(&r.cidr, cluster_cidr) && r.via.parse::<Ipv4Addr>().is_ok())
        .cloned()
        .collect();
    out.sort();
    out.dedup_by(|b, a| a.cidr == b.cidr);
    out
}

/// `ip route replace <cidr> via <via>`: idempotent, and moves a route whose node changed
/// address.
pub fn route_argv(r: &PodRoute) -> Vec<String> {
    ["route", "replace", &r.cidr, "via", &r.via, "proto", "static"].map(String::from).to_vec()
}

/// The masquerade rule for pod traffic leaving the pod network (iptables' `-C` form checks,
/// `-A` adds).
pub fn masquerade_argv(op: &str, cluster_cidr: &str) -> Vec<String> {
    [
        "-t",
        "nat",
        op,
        "POSTROUTING",
        "-s",
        cluster_cidr,
        "!",
        "-d",
        cluster_cidr,
        "-m",
        "comment",
        "--comment",
        "labforge: pods leaving the pod network",
        "-j",
        "MASQUERADE",
    ]
    .map(String::from)
    .to_vec()
}

/// What [`ensure`] last did, so unchanged rounds cost nothing.
#[derive(Debug, Default)]
pub struct Applied {
    conf: Option<String>,
    routes: Vec<PodRoute>,
    masquerade: bool,
}

/// Makes the node's pod network what the API server and the peers say: the CNI config for
/// `own` (this node's pod CIDR), the masquerade rule, a route per peer. Only what changed
/// since the last call is redone.
pub fn ensure(applied: &mut Applied, own: &str, cluster_cidr: &str, announced: &[PodRoute]) -> Result<()> {
    if applied.conf.as_deref() != Some(own) {
        if write_conf(Path::new("/"), own)? {
            tracing::info!(pod_cidr = own, "wrote the pod network's CNI configuration");
        }
        applied.conf = Some(own.to_string());
    }
    if !applied.masquerade {
        parse_cidr(cluster_cidr)?;
        if Cmd::new("iptables").args(masquerade_argv("-C", cluster_cidr)).run().is_err() {
            Cmd::new("iptables").args(masquerade_argv("-A", cluster_cidr)).run()?;
        }
        applied.masquerade = true;
    }
    let want = routes(Some(own), cluster_cidr, announced);
    let missing: Vec<PodRoute> = want.into_iter().filter(|r| !applied.routes.contains(r)).collect();
    for r in missing {
        Cmd::new("ip").args(route_argv(&r)).run().with_context(|| format!("routing {} via {}", r.cidr, r.via))?;
        tracing::info!(cidr = %r.cidr, via = %r.via, "routing a node's pods");
        applied.routes.retain(|old| old.cidr != r.cidr);
        applied.routes.push(r);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(cidr: &str, via: &str) -> PodRoute {
        PodRoute { cidr: cidr.into(), via: via.into() }
    }

    #[test]
    fn cidrs_are_checked_before_anything_is_made_of_them() {
        assert_eq!(parse_cidr("10.244.1.0/24").unwrap(), (Ipv4Addr::new(10, 244, 1, 0), 24));
        for bad in ["10.244.1.0", "10.244.1.1/24", "10.244.1.0/31", "10.244.1.0/4", "fd00::/64", "x/24", "; rm -rf /"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert!(within("10.244.3.0/24", "10.244.0.0/16"));
        assert!(!within("10.245.0.0/24", "10.244.0.0/16"));
        assert!(!within("10.0.0.0/8", "10.244.0.0/16"), "wider than the pod network");
    }

    #[test]
    fn routes_go_to_every_other_node_inside_the_pod_network() {
        let announced = [
            r("10.244.2.0/24", "10.77.0.13"),
            r("10.244.0.0/24", "10.77.0.11"),
            r("10.244.1.0/24", "10.77.0.12"),
            r("192.168.0.0/24", "10.77.0.66"), // outside the pod network: never routed
            r("10.244.9.0/24", "not-an-address"),
            r("10.244.2.0/24", "10.77.0.99"), // announced twice: one route, consistently
        ];
        let got = routes(Some("10.244.1.0/24"), "10.244.0.0/16", &announced);
        assert_eq!(got, [r("10.244.0.0/24", "10.77.0.11"), r("10.244.2.0/24", "10.77.0.13")]);
        assert_eq!(route_argv(&got[0]), ["route", "replace", "10.244.0.0/24", "via", "10.77.0.11", "proto", "static"]);
        let masq = masquerade_argv("-A", "10.244.0.0/16");
        assert_eq!(masq[..4], ["-t", "nat", "-A", "POSTROUTING"]);
        assert_eq!(masq.iter().filter(|a| *a == "10.244.0.0/16").count(), 2);
    }

    #[test]
    fn the_cni_configuration_names_the_nodes_range_and_is_written_once() {
        let d = tempfile::tempdir().unwrap();
        assert!(write_conf(d.path(), "10.244.1.0/24").unwrap());
        assert!(!write_conf(d.path(), "10.244.1.0/24").unwrap(), "unchanged: not rewritten");
        let text = std::fs::read_to_string(d.path().join("etc/cni/net.d/10-labforge.conflist")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert!(write_conf(d.path(), "10.244.1.5/24").is_err());
    }
}
