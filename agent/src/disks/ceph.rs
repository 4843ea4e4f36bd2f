//! The Rook `CephCluster` the master writes for the stack to apply: every node's eligible disks
//! by their `/dev/disk/by-id` paths in `storage.nodes[].devices` — never `useAllDevices`, so
//! Rook can only ever touch a disk an agent classified and prepared.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde_json::json;
use tokio::sync::watch;
use tracing::info;

use crate::cluster::{ClusterView, Member};
use crate::config::NodeConfig;
use crate::report::Report;
use crate::status::CephView;
use crate::sys::fs::write_durable;

/// Where the master writes it, under the state directory.
pub const MANIFEST: &str = "manifests/ceph-cluster.yaml";

/// Renders the `CephCluster` (JSON, which is YAML) for `nodes`: Kubernetes node name → devices.
/// Nodes without devices are left out; names and devices are sorted, so the same cluster view
/// always renders the same bytes.
pub fn render(nodes: &BTreeMap<String, Vec<String>>, ceph_image: &str, data_dir: &str) -> String {
    let listed: Vec<serde_json::Value> = nodes
        .iter()
        .filter(|(_, d)| !d.is_empty())
        .map(|(name, devices)| {
            let mut devices = devices.clone();
            devices.sort();
            devices.dedup();
            json!({ "name": name, "devices": devices.iter().map(|d| json!({ "name": d })).collect::<Vec<_>>() })
        })
        .collect();
    // Monitors want an odd count, one per node: three once there are three nodes.
    let mons = if nodes.len() >= 3 { 3 } else { 1 };
    let doc = json!({
        "apiVersion": "ceph.rook.io/v1",
        "kind": "CephCluster",
        "metadata": { "name": "rook-ceph", "namespace": "rook-ceph" },
        "spec": {
            "cephVersion": { "image": ceph_image },
            "dataDirHostPath": data_dir,
            "mon": { "count": mons, "allowMultiplePerNode": false },
            "mgr": { "count": 1 },
            "dashboard": { "enabled": true },
            "storage": {
                "useAllNodes": false,
                "useAllDevices": false,
                "nodes": listed,
            },
        },
    });
    let mut s = serde_json::to_string_pretty(&doc).expect("json");
    s.push('\n');
    s
}

/// Adds this node's and every member's devices to `nodes`. A node falling silent keeps its
/// entry: the `CephCluster` must not shrink because a beacon was missed.
pub fn merge(nodes: &mut BTreeMap<String, Vec<String>>, own: (&str, &[String]), members: &[Member]) {
    nodes.insert(own.0.to_string(), own.1.to_vec());
    for m in members {
        nodes.insert(m.hostname.clone(), m.ceph.clone());
    }
}

/// The master's Ceph task: while this node leads, keeps the `CephCluster` in the state
/// directory equal to what the cluster offers, rewriting it only when it would change.
pub async fn run(
    report: Report,
    cfg: NodeConfig,
    hostname: String,
    mut view: watch::Receiver<ClusterView>,
    offer: watch::Receiver<Vec<String>>,
) -> Result<()> {
    let state_dir = Path::new(&cfg.state_dir).to_path_buf();
    let path = state_dir.join(MANIFEST);
    let data_dir = state_dir.join("rook").to_string_lossy().into_owned();
    let mut nodes = BTreeMap::new();
    let mut written: Option<String> = None;
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
        merge(&mut nodes, (&hostname, &own), &members);
        let text = render(&nodes, &cfg.disks.ceph_image, &data_dir);
        if written.as_deref() == Some(text.as_str()) {
            continue;
        }
        std::fs::create_dir_all(path.parent().expect("a directory"))?;
        write_durable(&path, text.as_bytes())?;
        info!(path = %path.display(), nodes = nodes.values().filter(|d| !d.is_empty()).count(), "wrote the CephCluster");
        written = Some(text);
        let manifest = path.to_string_lossy().into_owned();
        report.update(|s| s.ceph = Some(CephView { manifest, nodes: nodes.clone() }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_only_named_devices_on_named_nodes() {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "lab-b".to_string(),
            vec!["/dev/disk/by-id/wwn-2".to_string(), "/dev/disk/by-id/wwn-1".to_string()],
        );
        nodes.insert("lab-a".to_string(), vec!["/dev/disk/by-id/ata-X".to_string()]);
        nodes.insert("lab-c".to_string(), vec![]);
        let text = render(&nodes, "quay.io/ceph/ceph:v18.2.4", "/var/lib/labforge/rook");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let s = &v["spec"]["storage"];
        assert_eq!(s["useAllDevices"], false);
        assert_eq!(s["useAllNodes"], false);
        assert_eq!(v["spec"]["mon"]["count"], 3);
        assert_eq!(v["spec"]["dataDirHostPath"], "/var/lib/labforge/rook");
        let got: Vec<(String, Vec<String>)> = s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap().into(),
                    n["devices"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().into()).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("lab-a".to_string(), vec!["/dev/disk/by-id/ata-X".to_string()]),
                ("lab-b".to_string(), vec!["/dev/disk/by-id/wwn-1".to_string(), "/dev/disk/by-id/wwn-2".to_string()])
            ]
        );
        assert_eq!(text, render(&nodes, "quay.io/ceph/ceph:v18.2.4", "/var/lib/labforge/rook"), "stable bytes");
        assert!(!text.contains("useAllDevices\": true"));
    }

    #[test]
    fn silent_nodes_keep_their_devices_and_an_unchanged_view_renders_the_same_bytes() {
        let dev = |s: &str| vec![s.to_string()];
        let member = |h: &str, d: &str| Member { hostname: h.into(), ceph: dev(d) };
        let mut nodes = BTreeMap::new();
        merge(&mut nodes, ("m", &dev("/dev/disk/by-id/m1")), &[member("w1", "/dev/disk/by-id/w1")]);
        let first = render(&nodes, "ceph", "/r");
        // w1 falls silent: its entry stays, and nothing needs rewriting.
        merge(&mut nodes, ("m", &dev("/dev/disk/by-id/m1")), &[]);
        assert_eq!(nodes.get("w1"), Some(&dev("/dev/disk/by-id/w1")));
        assert_eq!(render(&nodes, "ceph", "/r"), first);
        // A new member changes the manifest.
        merge(&mut nodes, ("m", &dev("/dev/disk/by-id/m1")), &[member("w2", "/dev/disk/by-id/w2")]);
        assert_ne!(render(&nodes, "ceph", "/r"), first);
    }
}
