//! Everything the agent asks of kubeadm: the config files it generates (kubeadm.k8s.io/v1beta4,
//! written as JSON, which YAML parsers read as YAML), the argv it runs, and what it reads back
//! (the CA public-key hash). The `kubeadm` program is found on PATH.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::ClusterConfig;
use crate::sys::Cmd;

pub const API_PORT: u16 = 6443;
pub const CRI_SOCKET: &str = "unix:///run/containerd/containerd.sock";
pub const CA_CERT: &str = "/etc/kubernetes/pki/ca.crt";
pub const TOKEN_TTL_SECS: u64 = 24 * 3600;
/// The longest a kubeadm call may take (init on a slow PC pulls nothing but waits for the
/// control plane).
const KUBEADM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The stable name of the API endpoint; every node maps it to the master in /etc/hosts.
pub fn endpoint_host(cluster: &ClusterConfig) -> String {
    format!("{}-api", cluster.name)
}

pub fn endpoint(cluster: &ClusterConfig) -> String {
    format!("{}:{API_PORT}", endpoint_host(cluster))
}

/// A fresh bootstrap token, `[a-z0-9]{6}.[a-z0-9]{16}`.
pub fn new_token() -> String {
    let s = crate::sys::random_text(b"abcdefghijklmnopqrstuvwxyz0123456789", 22).expect("random bytes");
    format!("{}.{}", &s[..6], &s[6..])
}

pub struct InitParams<'a> {
    pub cluster: &'a ClusterConfig,
    pub kubernetes_version: &'a str,
    /// kubeadm's `imageRepository`; empty: its default.
    pub image_repository: &'a str,
    pub node_name: &'a str,
    pub node_ip: &'a str,
    pub token: &'a str,
    /// Leave kubeadm's control-plane taint off, so workloads run on the master too.
    pub schedule_on_master: bool,
    /// kubeadm's `patches.directory`: where [`probe_patches`] were written.
    pub patches_dir: Option<&'a str>,
    /// The kubelet's `resolvConf` on every node (see [`super::resolv`]); kubeadm's choice
    /// (systemd-resolved's file) when `None`.
    pub resolv_conf: Option<&'a str>,
}

/// Patches (kubeadm's `<target>+strategic.json` files) that give the control plane's static
/// pods liveness and startup probes a slow PC passes: kubeadm's (a 15 s timeout, killed after
/// 80 s of failures) kill an API server that is merely starved — by a worker's image import
/// beside it in the tests, by a busy old CPU in a lab — and the restart starves it further.
/// Here a probe may take 30 s, and the component is restarted after 4 minutes of failures (10
/// minutes while it starts).
pub fn probe_patches() -> Vec<(String, String)> {
    ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"]
        .iter()
        .map(|name| {
            let patch = json!({"spec": {"containers": [{
                "name": name,
                "livenessProbe": {"timeoutSeconds": 30, "failureThreshold": 24},
                "startupProbe": {"timeoutSeconds": 30, "failureThreshold": 60},
            }]}});
            (format!("{name}+strategic.json"), serde_json::to_string_pretty(&patch).expect("json") + "\n")
        })
        .collect()
}

/// kubeadm's v1beta4 `timeouts`, stretched for slow PCs (and emulated CPUs in the tests): a
/// control plane that takes ten minutes to come up on an old lab PC is slow, not broken, and a
/// kubeadm that gives up after its default four minutes leaves a half-made node behind.
fn timeouts() -> Value {
    json!({
        "controlPlaneComponentHealthCheck": "30m0s",
        "kubeletHealthCheck": "15m0s",
        "kubernetesAPICall": "15m0s",
        "etcdAPICall": "5m0s",
        "tlsBootstrap": "15m0s",
        "discovery": "30m0s",
    })
}

/// Leader-election timings for the controller-manager and scheduler that a slow PC meets.
fn leader_election() -> Value {
    json!([
        {"name": "leader-elect-lease-duration", "value": "60s"},
        {"name": "leader-elect-renew-deadline", "value": "45s"},
        {"name": "leader-elect-retry-period", "value": "10s"},
    ])
}

/// `InitConfiguration` + `ClusterConfiguration` + `KubeletConfiguration`, as a multi-document
/// file.
pub fn init_config(p: &InitParams) -> String {
    let mut init = json!({
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "InitConfiguration",
        "bootstrapTokens": [{
            "token": p.token,
            "ttl": format!("{}h0m0s", TOKEN_TTL_SECS / 3600),
            "usages": ["signing", "authentication"],
            "groups": ["system:bootstrappers:kubeadm:default-node-token"],
        }],
        "nodeRegistration": node_registration(p.node_name, p.node_ip),
        "localAPIEndpoint": {"advertiseAddress": p.node_ip, "bindPort": API_PORT},
        "timeouts": timeouts(),
    });
    if let Some(dir) = p.patches_dir {
        init["patches"] = json!({"directory": dir});
    }
    if p.schedule_on_master {
        // An empty list (not an absent one) is kubeadm's way of saying "no taints".
        init["nodeRegistration"]["taints"] = json!([]);
    }
    let mut cluster = json!({
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "ClusterConfiguration",
        "clusterName": p.cluster.name,
        "controlPlaneEndpoint": endpoint(p.cluster),
        "networking": {"podSubnet": p.cluster.pod_cidr, "serviceSubnet": p.cluster.service_cidr},
        "apiServer": {"certSANs": [endpoint_host(p.cluster), p.node_ip]},
        // P-256 keys for the cluster's CAs and certificates: as strong as RSA-3072, and made in
        // milliseconds where RSA-2048 key generation takes seconds per key on a slow CPU.
        "encryptionAlgorithm": "ECDSA-P256",
        // etcd's defaults (100 ms heartbeats, 1 s elections) assume a quick disk and CPU; a
        // busy old PC misses them and the member thrashes.
        "etcd": {"local": {"extraArgs": [
            {"name": "heartbeat-interval", "value": "500"},
            {"name": "election-timeout", "value": "5000"},
        ]}},
        // The controller-manager and scheduler renew a leader lease every 2 s and stop when a
        // renewal takes over 10 s: on a busy old PC they lose it again and again, and the
        // controllers (node IPAM, so the pod network) never get to work.
        "controllerManager": {"extraArgs": leader_election()},
        "scheduler": {"extraArgs": leader_election()},
    });
    if !p.kubernetes_version.is_empty() {
        cluster["kubernetesVersion"] = Value::from(p.kubernetes_version);
    }
    if !p.image_repository.is_empty() {
        cluster["imageRepository"] = Value::from(p.image_repository);
    }
    let mut kubelet = json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "systemd",
    });
    if let Some(r) = p.resolv_conf {
        kubelet["resolvConf"] = Value::from(r);
    }
    [init, cluster, kubelet]
        .iter()
        .map(|d| serde_json::to_string_pretty(d).expect("json"))
        .collect::<Vec<_>>()
        .join("\n---\n")
        + "\n"
}

pub fn init_argv(config: &Path) -> Vec<String> {
    vec!["init".into(), "--config".into(), config.display().to_string()]
}

/// A node's registration, the same in init and join: its name, containerd, and its LAN
/// address pinned as kubelet's node IP.
fn node_registration(name: &str, ip: &str) -> Value {
    json!({"name": name, "criSocket": CRI_SOCKET, "kubeletExtraArgs": [{"name": "node-ip", "value": ip}]})
}

/// What a worker needs to join, for a `JoinConfiguration`.
pub struct JoinParams<'a> {
    pub endpoint: &'a str,
    pub token: &'a str,
    pub ca_cert_hash: &'a str,
    pub node_name: &'a str,
    pub node_ip: &'a str,
}

/// The worker's `JoinConfiguration`: the bootstrap token travels in this file (written 0600),
/// never on a command line any local user can read in `/proc`.
pub fn join_config(p: &JoinParams) -> String {
    let join = json!({
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "JoinConfiguration",
        "discovery": {
            "bootstrapToken": {
                "apiServerEndpoint": p.endpoint,
                "token": p.token,
                "caCertHashes": [p.ca_cert_hash],
            },
        },
        "nodeRegistration": node_registration(p.node_name, p.node_ip),
        "timeouts": timeouts(),
    });
    serde_json::to_string_pretty(&join).expect("json") + "\n"
}

pub fn join_argv(config: &Path) -> Vec<String> {
    vec!["join".into(), "--config".into(), config.display().to_string()]
}

/// `kubeadm reset`: undoes what an interrupted init or join left (static pods, kubelet's
/// config, certificates, etcd's data), so the next attempt starts clean.
pub fn reset_argv() -> Vec<String> {
    ["reset", "--force", "--cri-socket", CRI_SOCKET].map(String::from).to_vec()
}

/// What an init or join leaves on a node under `root` (`/` on a node), by path: any of it on
/// a node whose success marker is not set means an attempt was interrupted.
pub fn leftovers(root: &Path) -> Vec<PathBuf> {
    let non_empty = |p: &Path| std::fs::read_dir(p).map(|mut d| d.next().is_some()).unwrap_or(false);
    let files = ["etc/kubernetes/kubelet.conf", "etc/kubernetes/admin.conf", "etc/kubernetes/pki/ca.crt"];
    let dirs = ["etc/kubernetes/manifests", "var/lib/etcd"];
    files
        .iter()
        .map(|f| root.join(f))
        .filter(|p| p.exists())
        .chain(dirs.iter().map(|d| root.join(d)).filter(|p| non_empty(p)))
        .collect()
}

/// `kubeadm token create` with the token in `config` (an init config naming it, 0600).
pub fn token_create_argv(config: &Path) -> Vec<String> {
    vec!["token".into(), "create".into(), "--config".into(), config.display().to_string()]
}

/// `sha256:<hex>` of the CA certificate's SubjectPublicKeyInfo, the value kubeadm's
/// `--discovery-token-ca-cert-hash` pins.
pub fn ca_cert_hash(pem: &[u8]) -> Result<String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| anyhow::anyhow!("reading CA certificate PEM: {e}"))?;
    let cert = pem.parse_x509().map_err(|e| anyhow::anyhow!("parsing CA certificate: {e}"))?;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(cert.public_key().raw))))
}

/// Runs `kubeadm` with `argv`, returning stdout; the error carries the tail of stderr. Every
/// value in `secrets` (the bootstrap token) is redacted from the log lines and the error.
/// kubeadm's output goes to the journal line by line as it comes, and each phase it enters
/// (`[certs] …`, `[wait-control-plane] …`) to `progress`: an init takes minutes on a slow PC,
/// and the status should say where it is.
pub fn run(argv: &[String], secrets: &[&str], progress: &mut dyn FnMut(&str)) -> Result<String> {
    let cmd = secrets
        .iter()
        .fold(Cmd::new(kubeadm_path().to_string_lossy()).args(argv), |c, s| c.secret(*s))
        .timeout(KUBEADM_TIMEOUT);
    tracing::info!(cmd = %cmd.display(), "running kubeadm");
    cmd.run_lines(&mut |line| {
        if !line.trim().is_empty() {
            tracing::info!("kubeadm: {line}");
        }
        if let Some(phase) = phase_line(line) {
            progress(phase);
        }
    })
}

/// A line of kubeadm's output that names the phase it is in (`[api-check] Waiting for a
/// healthy API server…`), cut to a length a status line can carry.
pub fn phase_line(line: &str) -> Option<&str> {
    let line = line.trim();
    let tag = line.strip_prefix('[')?.split_once(']')?.0;
    if tag.is_empty() || !tag.chars().all(|c| c.is_ascii_lowercase() || c == '-' || c == '/') {
        return None;
    }
    Some(match line.char_indices().nth(160) {
        Some((i, _)) => &line[..i],
        None => line,
    })
}

fn kubeadm_path() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("kubeadm")).find(|p| p.is_file()))
        .unwrap_or_else(|| PathBuf::from("/usr/bin/kubeadm"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn docs(text: &str) -> Vec<Value> {
        text.split("\n---\n").map(|d| serde_json::from_str(d).unwrap()).collect()
    }

    #[test]
    fn an_interrupted_attempt_leaves_something_a_fresh_node_has_nothing() {
        let d = tempfile::tempdir().unwrap();
        assert!(leftovers(d.path()).is_empty(), "a fresh node");
        std::fs::create_dir_all(d.path().join("etc/kubernetes/manifests")).unwrap();
        std::fs::create_dir_all(d.path().join("var/lib/etcd")).unwrap();
        assert!(leftovers(d.path()).is_empty(), "empty directories (as packages ship them) are not leftovers");
        std::fs::write(d.path().join("etc/kubernetes/manifests/etcd.yaml"), "{}").unwrap();
        std::fs::create_dir_all(d.path().join("etc/kubernetes/pki")).unwrap();
        std::fs::write(d.path().join("etc/kubernetes/pki/ca.crt"), "pem").unwrap();
        let found = leftovers(d.path());
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(reset_argv(), ["reset", "--force", "--cri-socket", CRI_SOCKET]);
    }

    #[test]
    fn phases_are_told_from_other_output() {
        assert_eq!(
            phase_line("[certs] Generating \"ca\" certificate and key"),
            Some("[certs] Generating \"ca\" certificate and key")
        );
        assert_eq!(
            phase_line("  [wait-control-plane] Waiting for the kubelet"),
            Some("[wait-control-plane] Waiting for the kubelet")
        );
        assert_eq!(phase_line("[control-plane/etcd] x"), Some("[control-plane/etcd] x"));
        assert_eq!(phase_line("Your Kubernetes control-plane has initialized successfully!"), None);
        assert_eq!(phase_line("[WARNING SystemVerification]: missing"), None, "a preflight warning is not a phase");
        assert_eq!(phase_line("[] nothing"), None);
        assert_eq!(phase_line("[certs"), None);
        let long = format!("[certs] {}", "é".repeat(400));
        assert_eq!(phase_line(&long).map(|l| l.chars().count()), Some(160));
    }

    #[test]
    fn init_config_fields() {
        let cluster = ClusterConfig { name: "lab".into(), ..Default::default() };
        let text = init_config(&InitParams {
            cluster: &cluster,
            kubernetes_version: "v1.36.5",
            image_repository: "",
            node_name: "lab-123456",
            node_ip: "10.77.0.11",
            token: "abcdef.0123456789abcdef",
            schedule_on_master: true,
            patches_dir: Some("/var/lib/labforge/kubeadm/patches"),
            resolv_conf: Some("/var/lib/labforge/kubelet-resolv.conf"),
        });
        let d = docs(&text);
        assert_eq!(d.len(), 3);
        let init = &d[0];
        assert_eq!(init["apiVersion"], "kubeadm.k8s.io/v1beta4");
        assert_eq!(init["kind"], "InitConfiguration");
        assert_eq!(init["bootstrapTokens"][0]["token"], "abcdef.0123456789abcdef");
        assert_eq!(init["bootstrapTokens"][0]["ttl"], "24h0m0s");
        assert_eq!(init["nodeRegistration"]["name"], "lab-123456");
        assert_eq!(init["nodeRegistration"]["criSocket"], CRI_SOCKET);
        assert_eq!(init["nodeRegistration"]["kubeletExtraArgs"][0]["name"], "node-ip");
        assert_eq!(init["nodeRegistration"]["kubeletExtraArgs"][0]["value"], "10.77.0.11");
        assert_eq!(init["localAPIEndpoint"]["advertiseAddress"], "10.77.0.11");
        assert_eq!(init["localAPIEndpoint"]["bindPort"], 6443);
        assert_eq!(init["nodeRegistration"]["taints"], json!([]), "schedule-on-master: no taint");
        assert_eq!(init["timeouts"]["controlPlaneComponentHealthCheck"], "30m0s");
        assert_eq!(init["patches"]["directory"], "/var/lib/labforge/kubeadm/patches");
        let cc = &d[1];
        assert_eq!(cc["kind"], "ClusterConfiguration");
        assert_eq!(cc["clusterName"], "lab");
        assert_eq!(cc["controlPlaneEndpoint"], "lab-api:6443");
        assert_eq!(cc["encryptionAlgorithm"], "ECDSA-P256", "quick keys on slow CPUs");
        assert_eq!(cc["kubernetesVersion"], "v1.36.5");
        assert!(cc.get("imageRepository").is_none(), "kubeadm's default unless set");
        assert_eq!(cc["networking"]["podSubnet"], "10.244.0.0/16");
        assert_eq!(cc["networking"]["serviceSubnet"], "10.96.0.0/12");
        assert_eq!(cc["apiServer"]["certSANs"][0], "lab-api");
        assert_eq!(cc["etcd"]["local"]["extraArgs"][1]["name"], "election-timeout");
        assert_eq!(cc["controllerManager"]["extraArgs"][1]["value"], "45s");
        assert_eq!(cc["scheduler"]["extraArgs"][0]["name"], "leader-elect-lease-duration");
        assert_eq!(d[2]["kind"], "KubeletConfiguration");
        assert_eq!(d[2]["cgroupDriver"], "systemd");
        assert_eq!(d[2]["resolvConf"], "/var/lib/labforge/kubelet-resolv.conf");
        let mirrored = init_config(&InitParams {
            cluster: &cluster,
            kubernetes_version: "v1.36.5",
            image_repository: "registry.lab:5000/k8s",
            node_name: "lab-123456",
            node_ip: "10.77.0.11",
            token: "abcdef.0123456789abcdef",
            schedule_on_master: false,
            patches_dir: None,
            resolv_conf: None,
        });
        assert_eq!(docs(&mirrored)[1]["imageRepository"], "registry.lab:5000/k8s");
        assert!(docs(&mirrored)[0]["nodeRegistration"].get("taints").is_none(), "kubeadm's default taint");
        assert!(docs(&mirrored)[0].get("patches").is_none());
        assert!(docs(&mirrored)[2].get("resolvConf").is_none(), "kubeadm's choice");
    }

    #[test]
    fn probe_patches_name_their_target_and_its_container() {
        let patches = probe_patches();
        assert_eq!(patches.len(), 4);
        for (file, text) in patches {
            let (target, rest) = file.split_once('+').unwrap();
            assert_eq!(rest, "strategic.json", "kubeadm's target[suffix][+patchtype].extension");
            let v: Value = serde_json::from_str(&text).unwrap();
            let c = &v["spec"]["containers"][0];
            assert_eq!(c["name"], target, "a strategic merge patch finds the container by name");
            assert_eq!(c["livenessProbe"]["failureThreshold"], 24);
            assert_eq!(c["startupProbe"]["timeoutSeconds"], 30);
        }
    }

    #[test]
    fn tokens_have_kubeadms_shape() {
        let t = new_token();
        let (a, b) = t.split_once('.').unwrap();
        assert_eq!((a.len(), b.len()), (6, 16));
        assert!(t.chars().all(|c| c == '.' || c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(new_token(), t);
    }

    #[test]
    fn the_token_travels_in_a_file_and_the_join_pins_the_ca() {
        let text = join_config(&JoinParams {
            endpoint: "lab-api:6443",
            token: "abcdef.0123456789abcdef",
            ca_cert_hash: "sha256:00ff",
            node_name: "lab-02",
            node_ip: "10.0.0.12",
        });
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["kind"], "JoinConfiguration");
        assert_eq!(v["discovery"]["bootstrapToken"]["caCertHashes"][0], "sha256:00ff");
        assert_eq!(v["discovery"]["bootstrapToken"]["apiServerEndpoint"], "lab-api:6443");
        assert_eq!(v["nodeRegistration"]["kubeletExtraArgs"][0]["value"], "10.0.0.12");
        assert_eq!(v["timeouts"]["discovery"], "30m0s");
        let argv = join_argv(Path::new("/var/lib/labforge/kubeadm/join.yaml"));
        assert_eq!(argv, ["join", "--config", "/var/lib/labforge/kubeadm/join.yaml"]);
        let argv = token_create_argv(Path::new("/x/token.yaml"));
        assert!(!argv.iter().any(|a| a.contains("abcdef")), "{argv:?}");
    }

    #[test]
    fn ca_hash_matches_openssl() {
        // A CA made by openssl, hashed the way kubeadm's docs do it with openssl.
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("ca.key");
        let crt = d.path().join("ca.crt");
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kubernetes", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .output()
            .unwrap();
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
        let pipeline =
            format!("openssl x509 -pubkey -in {} | openssl pkey -pubin -outform der | sha256sum", crt.display());
        let out = Command::new("sh").arg("-c").arg(&pipeline).output().unwrap();
        let want = format!("sha256:{}", &String::from_utf8_lossy(&out.stdout)[..64]);
        assert_eq!(ca_cert_hash(&std::fs::read(&crt).unwrap()).unwrap(), want);
    }
}
