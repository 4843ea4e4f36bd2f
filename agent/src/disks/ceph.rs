//! The Rook `CephCluster` the master writes for the stack to apply: every node's eligible disks
//! by their `/dev/disk/by-id` paths in `storage.nodes[].devices` — never `useAllDevices`, so
//! Rook can only ever touch a disk an agent classified and prepared.

use std::collections::BTreeMap;

use serde_json::json;

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
}
