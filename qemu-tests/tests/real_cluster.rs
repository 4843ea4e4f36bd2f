//! Real Kubernetes in VMs: upstream v1.36.5 built from its Go modules by the test fixture
//! (`qemu-tests/fixtures/kubernetes`), put into the image by the builder from release files
//! and a registry on loopback (`[kubernetes] source = "binaries"`), and formed by the agent
//! with the real kubeadm, kubelet and containerd. One boot serves many checks: everything a
//! user of a one-PC appliance would look at, then a power cut.
//!
//! The test drives the cluster as a lab administrator would: over SSH as the image's sudo
//! user `lab`, with the admin kubeconfig the agent put in its home, and from the LAN with
//! plain HTTP to a NodePort.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use labforge_agent::status::{Phase, Status};
use qemu_tests::kubernetes::{self, Remote, WEB_IMAGE};
use qemu_tests::lan::{self, Lan};
use qemu_tests::vm::{Net, Vm, VmConfig};

/// Power-on to a Ready node under TCG: boot, importing ~450 MB of preloaded images,
/// `kubeadm init` with a control plane on emulated CPUs, the pod network.
const UP: Duration = Duration::from_secs(45 * 60);
/// A workload rolling out, a NodePort answering, CoreDNS turning Ready.
const SETTLE: Duration = Duration::from_secs(15 * 60);
const NODE_PORT: u16 = 30080;

struct Appliance {
    vm: Option<Vm>,
    cfg: VmConfig,
    // After the VM, so the LAN outlives it.
    node: Remote,
    dir: std::path::PathBuf,
}

impl Appliance {
    fn vm(&mut self) -> &mut Vm {
        self.vm.as_mut().expect("running")
    }
}

/// The workload: a Deployment of the preloaded web image (never pulled: `imagePullPolicy:
/// Never`) and a NodePort Service in front of it.
fn workload() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: default}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: web
        image: {WEB_IMAGE}
        imagePullPolicy: Never
        ports: [{{containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /, port: 8080}}, periodSeconds: 5}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}]
"#
    )
}

fn pods_ready(s: &Status, prefixes: &[&str]) -> bool {
    let Some(api) = &s.kube_api else { return false };
    prefixes.iter().all(|p| {
        let pods: Vec<_> = api.control_plane.iter().filter(|x| x.name.starts_with(p)).collect();
        !pods.is_empty() && pods.iter().all(|x| x.ready)
    })
}

const SYSTEM_PODS: &[&str] =
    &["etcd-", "kube-apiserver-", "kube-controller-manager-", "kube-scheduler-", "kube-proxy-", "coredns-"];

#[test]
#[ignore = "about half an hour of TCG on two cores: `make test-kubernetes` runs it (see README, Tests)"]
fn single_node_appliance() -> Result<()> {
    let _one_at_a_time = qemu_tests::exclusive()?;
    let built = kubernetes::test_image()?;
    let dir = qemu_tests::vm::scenario_dir("single_node_appliance")?;
    let mut lan = Lan::new("appliance", &dir)?;
    let tap = lan.tap()?;
    let mut cfg = VmConfig::new("node0", &built.image.image);
    // kubeadm's preflight wants 2 CPUs and 1.7 GB for a control plane.
    (cfg.memory_mib, cfg.cpus) = (3072, 2);
    cfg.net = Net::Tap { ns: lan.ns.clone(), tap, mac: "52:54:00:78:00:01".into() };
    let started = Instant::now();
    let vm = Vm::start(&cfg, &dir)?;
    let mut node = Remote::new(lan, &built.ssh_key);

    // Phase `ready` means the API server reports the node Ready: kubeadm init ran, the pod
    // network is up, the kubelet is happy.
    let mut vm = vm;
    vm.wait_booted(Duration::from_secs(900))?;
    let ready = vm.wait_status("phase ready", UP, |s| s.phase == Phase::Ready)?;
    let to_ready = started.elapsed();
    eprintln!("single node: power-on to node Ready in {to_ready:.0?}");
    node.addr = ready.lan_address.clone().context("a ready node has a LAN address")?;
    assert!(node.addr.starts_with(lan::SUBNET), "{}", node.addr);
    let mut a = Appliance { vm: Some(vm), cfg, node, dir };
    let uid = ready.cluster_uid.clone().context("a ready master has a cluster uid")?;

    // What the API server says, through the agent's status: the version built from source,
    // this node Ready with a pod CIDR, every system pod Ready (CoreDNS needs the pod network).
    let s = a.node.wait_api("control plane, kube-proxy and CoreDNS Ready", SETTLE, |s| pods_ready(s, SYSTEM_PODS))?;
    let api = s.kube_api.as_ref().expect("kube_api");
    assert_eq!(api.version.as_deref(), Some(kubernetes::VERSION), "{api:?}");
    assert_eq!(api.node_ready, Some(true), "{api:?}");
    assert_eq!(api.nodes.len(), 1, "{api:?}");
    assert!(api.pod_cidr.as_deref().is_some_and(|c| c.starts_with("10.244.")), "{api:?}");

    // The admin kubeconfig is the sudo user's, and the node takes workloads (no taint).
    let nodes = a.node.run("kubectl get nodes -o jsonpath='{.items[0].spec.taints}'", "")?;
    assert!(!nodes.contains("NoSchedule"), "schedule-on-master leaves the master untainted: {nodes}");
    let applied = a.node.run("kubectl apply -f -", &workload())?;
    assert!(applied.contains("deployment.apps/web"), "{applied}");
    a.node.run("kubectl rollout status deployment/web --timeout=900s", "")?;
    let body = a.node.http_get(NODE_PORT, SETTLE)?;
    assert!(body.starts_with("labforge-web-ok web-"), "the NodePort answers from the web pod: {body:?}");

    // Pod to Service by name: CoreDNS answers for the cluster domain.
    let dns = a.node.run("kubectl -n kube-system get endpointslices -l kubernetes.io/service-name=kube-dns -o jsonpath='{.items[*].endpoints[*].addresses[*]}'", "")?;
    assert!(
        dns.split_whitespace().any(|a| a.starts_with("10.244.")),
        "kube-dns has CoreDNS pods on the pod network behind it: {dns:?}"
    );

    // Nothing was ever pulled: every image came from the USB stick.
    let pulls = a.node.run("sudo journalctl -u containerd --no-pager -o cat | grep -c 'PullImage' || true", "")?;
    assert_eq!(pulls.trim(), "0", "containerd pulled images");
    // The bootstrap token (kept in the agent's 0600 state file) is in no log and not in the
    // status anyone on the LAN may read.
    let state: serde_json::Value = serde_json::from_str(&a.node.run("sudo cat /var/lib/labforge/state.json", "")?)?;
    let token = state["join_info"]["token"].as_str().context("the master keeps its join token")?.to_string();
    assert_eq!(token.len(), 23, "a kubeadm token");
    let in_logs = a.node.run(&format!("sudo journalctl --no-pager -o cat | grep -cF '{token}' || true"), "")?;
    assert_eq!(in_logs.trim(), "0", "the bootstrap token is in the journal");
    assert!(!serde_json::to_string(&a.node.status()?)?.contains(&token), "the bootstrap token is in /status");

    // Power cut: the node comes back Ready by itself, same cluster, workload serving again.
    a.vm.take().expect("running").power_cut()?;
    let restarted = Instant::now();
    a.vm = Some(Vm::restart(&a.cfg, &a.dir)?);
    let again = a.vm().wait_status("phase ready after the power cut", UP, |s| s.phase == Phase::Ready)?;
    eprintln!("single node: power-on after a power cut to node Ready in {:.0?}", restarted.elapsed());
    assert_eq!(again.cluster_uid.as_deref(), Some(uid.as_str()), "same cluster after the power cut");
    let body = a.node.http_get(NODE_PORT, SETTLE)?;
    assert!(body.starts_with("labforge-web-ok web-"), "serving again after the power cut: {body:?}");
    let inits = a
        .node
        .run("sudo journalctl -b -u labforge-agent --no-pager -o cat | grep -c 'running kubeadm.*init' || true", "")?;
    assert_eq!(inits.trim(), "0", "kubeadm init ran again after the power cut (journal of this boot)");

    a.vm().wait_booted(Duration::from_secs(60))?;
    a.vm().check_console_health()?;
    Ok(())
}
