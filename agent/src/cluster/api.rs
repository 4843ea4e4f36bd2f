//! What the Kubernetes API server says about the cluster, for `/status` (`kube_api`): its
//! version, whether this node is Ready, and on the master every node with its Ready condition
//! and the kube-system pods (control plane, CoreDNS, kube-proxy). Read every 15 s with the
//! image's kubectl: the master with kubeadm's `admin.conf`, a worker with its kubelet's own
//! credentials (which may read its own Node only). The parsers are pure and read only the
//! fields they report. The same round keeps the pod network (`podnet`) in line with the pod
//! CIDR the API server gave this node.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::cluster::kubeconfig::ADMIN_CONF;
use crate::cluster::{podnet, ClusterView};
use crate::report::Report;
use crate::sys::Cmd;

pub const KUBELET_CONF: &str = "/etc/kubernetes/kubelet.conf";
const KUBECTL: &str = "/usr/bin/kubectl";
const EVERY: Duration = Duration::from_secs(15);
/// How often once this node is Ready and every pod it watches is too: each round costs a slow
/// PC's API server TLS handshakes and its CPU two kubectl processes.
const SETTLED_EVERY: Duration = Duration::from_secs(60);

/// The pause before the next round after `api`: short while anything is still coming up.
pub fn period(api: &KubeApi) -> Duration {
    let settled = api.state == ApiState::Answering
        && api.node_ready == Some(true)
        && api.nodes.iter().all(|n| n.ready)
        && api.control_plane.iter().all(|p| p.ready);
    if settled {
        SETTLED_EVERY
    } else {
        EVERY
    }
}
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApiState {
    /// Nothing to ask yet (no kubeconfig on this node), or no kubectl in the image.
    Unavailable,
    /// The API server answered.
    Answering,
    /// It did not answer, or answered an error (in `message`).
    Failing,
}

/// A node as the API server lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSeen {
    pub name: String,
    pub ready: bool,
    /// `spec.podCIDR`, once the controller-manager assigned one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
    /// Its `InternalIP` (the LAN address the kubelet registered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// A `kube-system` pod: the control plane, CoreDNS, kube-proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSeen {
    pub name: String,
    pub ready: bool,
}

/// The `kube_api` part of `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeApi {
    pub state: ApiState,
    /// The API server's version (`gitVersion`).
    pub version: Option<String>,
    /// This node's Ready condition.
    pub node_ready: Option<bool>,
    /// This node's pod CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
    /// On the master: every node.
    pub nodes: Vec<NodeSeen>,
    /// On the master: the `kube-system` pods.
    pub control_plane: Vec<PodSeen>,
    pub message: String,
}

impl KubeApi {
    fn unavailable(message: &str) -> KubeApi {
        KubeApi {
            state: ApiState::Unavailable,
            version: None,
            node_ready: None,
            pod_cidr: None,
            nodes: vec![],
            control_plane: vec![],
            message: message.into(),
        }
    }
}

/// Whether `conditions` (a Node's or Pod's `status.conditions`) say Ready=True.
fn ready(item: &Value) -> bool {
    item["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn name(item: &Value) -> String {
    item["metadata"]["name"].as_str().unwrap_or("").to_string()
}

/// `GET /api/v1/nodes` (a NodeList) or `/api/v1/nodes/X` (one Node).
pub fn parse_nodes(json: &str) -> Result<Vec<NodeSeen>> {
    let v: Value = serde_json::from_str(json).context("kubectl printed no JSON")?;
    let items = match v["kind"].as_str() {
        Some("Node") => vec![v],
        Some("List") | Some("NodeList") => v["items"].as_array().cloned().unwrap_or_default(),
        other => anyhow::bail!("expected nodes, got kind {other:?}"),
    };
    Ok(items
        .iter()
        .map(|n| NodeSeen {
            name: name(n),
            ready: ready(n),
            pod_cidr: n["spec"]["podCIDR"].as_str().map(str::to_string),
            address: n["status"]["addresses"].as_array().and_then(|a| {
                a.iter().find(|x| x["type"] == "InternalIP").and_then(|x| x["address"].as_str()).map(str::to_string)
            }),
        })
        .collect())
}

/// `GET /api/v1/namespaces/N/pods` (a PodList).
pub fn parse_pods(json: &str) -> Result<Vec<PodSeen>> {
    let v: Value = serde_json::from_str(json).context("kubectl printed no JSON")?;
    let items = v["items"].as_array().cloned().unwrap_or_default();
    Ok(items.iter().map(|p| PodSeen { name: name(p), ready: ready(p) }).collect())
}

/// The server's `gitVersion` from `GET /version`.
pub fn parse_version(json: &str) -> Option<String> {
    let v: Value = serde_json::from_str(json).ok()?;
    v["gitVersion"].as_str().map(str::to_string)
}

fn kubectl(conf: &str, args: &[&str]) -> Result<String> {
    Cmd::new(KUBECTL).arg(format!("--kubeconfig={conf}")).args(args).timeout(KUBECTL_TIMEOUT).run()
}

/// Whether the image has the kubectl these checks run.
pub fn kubectl_present() -> bool {
    Path::new(KUBECTL).exists()
}

/// Asks the API server about the node named `hostname`: as the master when kubeadm's
/// `admin.conf` is here, else with the kubelet's credentials. The server's version is asked
/// only while `version` is not known yet.
pub fn observe(hostname: &str, version: Option<String>) -> KubeApi {
    if !kubectl_present() {
        return KubeApi::unavailable("kubectl is not in this image");
    }
    let leading = Path::new(ADMIN_CONF).exists();
    let conf = if leading { ADMIN_CONF } else { KUBELET_CONF };
    if !Path::new(conf).exists() {
        return KubeApi::unavailable(&format!("no {conf} yet"));
    }
    // `get --raw` skips kubectl's API discovery: two plain GETs a round (three the first
    // time), cheap for a slow PC's API server.
    let mut api = KubeApi::unavailable("");
    api.version = version.or_else(|| kubectl(conf, &["get", "--raw", "/version"]).ok().and_then(|o| parse_version(&o)));
    let nodes = if leading {
        kubectl(conf, &["get", "--raw", "/api/v1/nodes"])
    } else {
        kubectl(conf, &["get", "--raw", &format!("/api/v1/nodes/{hostname}")])
    };
    match nodes.and_then(|o| parse_nodes(&o)) {
        Ok(nodes) => {
            api.state = ApiState::Answering;
            let own = nodes.iter().find(|n| n.name == hostname);
            api.node_ready = own.map(|n| n.ready);
            api.pod_cidr = own.and_then(|n| n.pod_cidr.clone());
            if leading {
                api.nodes = nodes;
            }
        }
        Err(e) => {
            api.state = ApiState::Failing;
            api.message = format!("{e:#}");
            return api;
        }
    }
    if leading {
        match kubectl(conf, &["get", "--raw", "/api/v1/namespaces/kube-system/pods"]).and_then(|o| parse_pods(&o)) {
            Ok(pods) => api.control_plane = pods,
            Err(e) => api.message = format!("kube-system pods: {e:#}"),
        }
    }
    api
}

/// Keeps `kube_api` in `/status` current while the node runs Kubernetes, and the pod network
/// in line with it: this node's pod CIDR goes to `pod_cidr` (the beacons announce it) and into
/// the CNI configuration, the peers' (from `view`) into routes.
pub async fn run(
    report: Report,
    hostname: String,
    enabled: bool,
    cluster_pod_cidr: String,
    view: watch::Receiver<ClusterView>,
    pod_cidr: watch::Sender<Option<String>>,
) -> Result<()> {
    if !enabled {
        return Ok(());
    }
    let mut view = view;
    let applied = std::sync::Arc::new(std::sync::Mutex::new(podnet::Applied::default()));
    let mut next = tokio::time::Instant::now();
    let mut last: Option<KubeApi> = None;
    loop {
        // A round when it is time to ask the API server again; in between, a change in the
        // cluster (a peer announcing its pod CIDR) only updates the routes.
        let asked = tokio::select! {
            _ = tokio::time::sleep_until(next) => true,
            changed = view.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                false
            }
        };
        // While kubeadm brings the node up, its API server is busy enough (a slow PC's TLS
        // handshakes alone take seconds): ask only once kubeadm is done.
        if !view.borrow().kubeadm_done {
            if asked {
                next = tokio::time::Instant::now() + EVERY;
            }
            continue;
        }
        if asked {
            let (name, version) = (hostname.clone(), last.as_ref().and_then(|a| a.version.clone()));
            let api = match crate::sys::blocking(move || Ok(observe(&name, version))).await {
                Ok(a) => a,
                Err(e) => KubeApi { state: ApiState::Failing, message: format!("{e:#}"), ..KubeApi::unavailable("") },
            };
            next = tokio::time::Instant::now() + period(&api);
            last = Some(api);
        }
        let Some(mut api) = last.clone() else { continue };
        if let Some(own) = api.pod_cidr.clone() {
            pod_cidr.send_if_modified(|c| {
                let changed = c.as_deref() != Some(own.as_str());
                *c = Some(own.clone());
                changed
            });
            let announced = view.borrow().pod_routes.clone();
            let (applied, cluster) = (applied.clone(), cluster_pod_cidr.clone());
            let done = crate::sys::blocking(move || {
                let mut a = applied.lock().unwrap_or_else(|e| e.into_inner());
                podnet::ensure(&mut a, &own, &cluster, &announced)
            })
            .await;
            if let Err(e) = done {
                tracing::warn!("pod network: {e:#}");
                api.message = format!("pod network: {e:#}");
            }
        }
        report.update(|s| s.kube_api = Some(api));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_less_often_once_everything_is_ready() {
        let mut api = KubeApi::unavailable("");
        assert_eq!(period(&api), EVERY, "nothing known yet");
        api.state = ApiState::Answering;
        api.node_ready = Some(true);
        api.nodes = vec![NodeSeen { name: "a".into(), ready: true, pod_cidr: None, address: None }];
        api.control_plane = vec![PodSeen { name: "etcd-a".into(), ready: true }];
        assert_eq!(period(&api), SETTLED_EVERY);
        api.nodes.push(NodeSeen { name: "b".into(), ready: false, pod_cidr: None, address: None });
        assert_eq!(period(&api), EVERY, "a node still joining");
        api.nodes.pop();
        api.control_plane.push(PodSeen { name: "coredns-x".into(), ready: false });
        assert_eq!(period(&api), EVERY, "a system pod still starting");
        api.control_plane.pop();
        api.state = ApiState::Failing;
        assert_eq!(period(&api), EVERY, "the API server stopped answering");
    }

    fn node(name: &str, ready: &str) -> Value {
        serde_json::json!({
            "kind": "Node", "apiVersion": "v1", "metadata": {"name": name},
            "spec": if name == "lab-a" { serde_json::json!({"podCIDR": "10.244.0.0/24"}) } else { serde_json::json!({}) },
            "status": {"conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": ready, "reason": "KubeletReady"},
            ], "addresses": if name == "lab-a" {
                serde_json::json!([{"type": "Hostname", "address": "lab-a"}, {"type": "InternalIP", "address": "10.0.0.2"}])
            } else { serde_json::json!([]) }},
        })
    }

    #[test]
    fn nodes_pods_and_version_as_the_api_server_prints_them() {
        let list = serde_json::json!({"kind": "NodeList", "apiVersion": "v1", "items": [node("lab-a", "True"), node("lab-b", "False")]});
        assert_eq!(
            parse_nodes(&list.to_string()).unwrap(),
            [
                NodeSeen {
                    name: "lab-a".into(),
                    ready: true,
                    pod_cidr: Some("10.244.0.0/24".into()),
                    address: Some("10.0.0.2".into())
                },
                NodeSeen { name: "lab-b".into(), ready: false, pod_cidr: None, address: None }
            ]
        );
        assert!(!parse_nodes(&node("lab-c", "Unknown").to_string()).unwrap()[0].ready, "Unknown is not Ready");
        assert!(parse_nodes("{\"kind\":\"Pod\"}").is_err());
        assert!(parse_nodes("error: the server doesn't have a resource type").is_err());

        let pods = serde_json::json!({"kind": "PodList", "items": [
            {"metadata": {"name": "etcd-lab-a"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "kube-apiserver-lab-a"}, "status": {"phase": "Pending"}},
        ]});
        assert_eq!(
            parse_pods(&pods.to_string()).unwrap(),
            [
                PodSeen { name: "etcd-lab-a".into(), ready: true },
                PodSeen { name: "kube-apiserver-lab-a".into(), ready: false }
            ]
        );
        let version = r#"{"major": "1", "minor": "36", "gitVersion": "v1.36.5", "platform": "linux/amd64"}"#;
        assert_eq!(parse_version(version).as_deref(), Some("v1.36.5"));
        assert_eq!(parse_version("error: the server could not find the requested resource"), None);
    }
}
