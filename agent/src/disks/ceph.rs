//! The master's register of the disks every node offers to Ceph: node name → `/dev/disk/by-id`
//! paths, which the `rook-ceph` stack component's `CephCluster` lists (`cluster.ceph_devices`)
//! — never `useAllDevices`, so Rook can only ever touch a disk an agent classified and prepared.
//!
//! The register only grows. A node that falls silent keeps its entry, and so does a disk a node
//! no longer mentions (right after a power cut every agent offers nothing until its disk scan
//! is done): a `CephCluster` that lost a node or a disk would drop that host's OSDs from Rook's
//! care and the pools' replica count with them. It is kept on the state partition, so a master
//! that reboots starts from what it knew.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cluster::{ClusterView, Member};
use crate::config::NodeConfig;
use crate::report::Report;
use crate::status::CephView;
use crate::sys::fs::write_durable;

/// Where the master keeps the register, under the state directory.
pub const REGISTER: &str = "ceph-devices.json";

/// Node name → devices, each list sorted and without repeats.
pub type Register = BTreeMap<String, Vec<String>>;

/// Adds this node's and every member's offered devices to `nodes`; nothing is ever removed.
/// Returns whether anything was added.
pub fn merge(nodes: &mut Register, own: (&str, &[String]), members: &[Member]) -> bool {
    let mut added = false;
    let offers = std::iter::once((own.0, own.1)).chain(members.iter().map(|m| (m.hostname.as_str(), &m.ceph[..])));
    for (host, devices) in offers {
        if !nodes.contains_key(host) {
            nodes.insert(host.to_string(), Vec::new());
            added = true;
        }
        let known = nodes.get_mut(host).expect("just inserted");
        for d in devices {
            if !known.contains(d) {
                known.push(d.clone());
                added = true;
            }
        }
        known.sort();
    }
    added
}

/// The register saved on the state partition (empty when there is none, or it is unreadable:
/// beacons fill it again).
pub fn load(path: &Path) -> Register {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            warn!("{} is unreadable ({e}); the nodes' offers fill it again", path.display());
            Register::new()
        }),
        Err(_) => Register::new(),
    }
}

/// The master's Ceph task: while this node leads, keeps the register equal to everything the
/// nodes ever offered, saved whenever it grows, and reports it (the stack task reads it there).
pub async fn run(
    report: Report,
    cfg: NodeConfig,
    hostname: String,
    mut view: watch::Receiver<ClusterView>,
    offer: watch::Receiver<Vec<String>>,
) -> Result<()> {
    let path = Path::new(&cfg.state_dir).join(REGISTER);
    let mut nodes = load(&path);
    let mut reported = false;
    let mut tick = tokio::time::interval(crate::cluster::TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = view.changed() => if changed.is_err() { return Ok(()) },
        }
        let members = {
            let v = view.borrow();
            if !v.leading {
                continue;
            }
            v.members.clone()
        };
        let own = offer.borrow().clone();
        let added = merge(&mut nodes, (&hostname, &own), &members);
        if added {
            let bytes = serde_json::to_vec_pretty(&nodes)?;
            write_durable(&path, &bytes)?;
            info!(
                path = %path.display(),
                nodes = nodes.values().filter(|d| !d.is_empty()).count(),
                "the disks offered to Ceph grew"
            );
        }
        if added || !reported {
            let register = path.to_string_lossy().into_owned();
            report.update(|s| s.ceph = Some(CephView { register, nodes: nodes.clone() }));
            reported = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> Vec<String> {
        vec![s.to_string()]
    }

    fn member(h: &str, d: &[&str]) -> Member {
        Member { hostname: h.into(), ceph: d.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn the_register_only_grows_sorted_and_without_repeats() {
        let mut nodes = Register::new();
        assert!(merge(
            &mut nodes,
            ("m", &dev("/dev/disk/by-id/m1")),
            &[member("w1", &["/dev/disk/by-id/wwn-2", "/dev/disk/by-id/wwn-1"])]
        ));
        assert_eq!(nodes["w1"], ["/dev/disk/by-id/wwn-1", "/dev/disk/by-id/wwn-2"]);
        // The same offers again: nothing to save.
        assert!(!merge(&mut nodes, ("m", &dev("/dev/disk/by-id/m1")), &[member("w1", &["/dev/disk/by-id/wwn-1"])]));
        // w1 falls silent, and the master's own scan has not finished after a reboot: nothing
        // is lost (a CephCluster that forgot them would shrink the pools).
        assert!(!merge(&mut nodes, ("m", &[]), &[]));
        assert_eq!(nodes["m"], dev("/dev/disk/by-id/m1"));
        assert_eq!(nodes["w1"].len(), 2);
        // A node with nothing to offer is known, with no devices; a new disk is added.
        assert!(merge(&mut nodes, ("m", &dev("/dev/disk/by-id/m0")), &[member("w2", &[])]));
        assert_eq!(nodes["m"], ["/dev/disk/by-id/m0", "/dev/disk/by-id/m1"]);
        assert_eq!(nodes["w2"], Vec::<String>::new());
    }

    #[test]
    fn the_register_survives_a_reboot_and_an_unreadable_one_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REGISTER);
        assert!(load(&path).is_empty());
        let mut nodes = Register::new();
        merge(&mut nodes, ("m", &dev("/dev/disk/by-id/m1")), &[]);
        write_durable(&path, &serde_json::to_vec(&nodes).unwrap()).unwrap();
        assert_eq!(load(&path), nodes);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load(&path).is_empty());
    }
}
