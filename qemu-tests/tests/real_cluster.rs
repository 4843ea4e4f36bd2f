//! Real Kubernetes in VMs: upstream v1.36.5 built from its Go modules by the test fixture
//! (`qemu-tests/fixtures/kubernetes`), put into the image by the builder from release files
//! and a registry on loopback (`[kubernetes] source = "binaries"`), and formed by the agent
//! with the real kubeadm, kubelet and containerd.
//!
//! One room, two PCs, every check in turn (a boot costs minutes under TCG):
//! 1. `interrupted_init`: the first PC's power is cut while its `kubeadm init` runs; on the
//!    next boot the agent resets what that init left and completes it. One cluster uid, ever.
//! 2. `single_node_appliance`: that PC alone is a working cluster: node Ready, control plane,
//!    kube-proxy and CoreDNS Ready, a preloaded workload behind a NodePort answering the LAN.
//! 3. `worker_joins_real_cluster`: a second PC powered on later joins with the token from the
//!    master's join info; both nodes Ready; a pod on the worker reaches a pod on the master
//!    over the pod network and back.
//! 4. `whole_room_power_cut`: both PCs lose power at once and come back by themselves: every
//!    node Ready, the workload serving, no kubeadm init or join run again.
//!
//! The stack (`stack_comes_up`, `stack_survives_power_cut`): once the single node is Ready its
//! agent applies the image's stack — `storage` (the local-path provisioner built from its Go
//! module, a default StorageClass), then `monitoring` (Prometheus and node-exporter from
//! Debian's packages, kube-state-metrics from its Go module; Grafana, which cannot be had
//! here, off). The power is cut while monitoring is being applied: the next boot finishes it
//! without applying storage again. A claim on the default class binds and a Job writes a file
//! into it; Prometheus, asked over the LAN, has every node's kubelet, cAdvisor, node-exporter
//! and agent and kube-state-metrics up, and raises NodeDown when node-exporter stops;
//! Grafana's objects pass a server-side dry run, and so do Rook-Ceph's once Rook's own CRDs
//! (fetched and checked as a build does) are applied. After the whole-room power cut the stack
//! is ready again without anything applied again, and the file is intact. A site component whose
//! Job fails on purpose is reported with its cause while the others come up, and the one that
//! depends on it waits.
//!
//! Throughout: containerd never pulls (every image came on the stick), and the bootstrap token
//! is in no log and no status. The test drives the cluster as a lab administrator would: over
//! SSH as the image's sudo user `lab`, with the admin kubeconfig the agent put in its home on
//! the master, and from the LAN with plain HTTP to a NodePort.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use labforge_agent::stack::plan::State;
use labforge_agent::status::{Phase, Role, Status};
use qemu_tests::kubernetes::{self, no_warnings, KubeImage, Remote, BUSYBOX_REF, WEB_IMAGE};
use qemu_tests::lan::{self, Lan};
use qemu_tests::poll;
use qemu_tests::vm::{Net, Vm, VmConfig};

/// Power-on to a Ready node under TCG: boot, importing ~450 MB of preloaded images,
/// `kubeadm init` with a control plane on emulated CPUs, the pod network.
const UP: Duration = Duration::from_secs(45 * 60);
/// A workload rolling out, a NodePort answering, CoreDNS turning Ready.
const SETTLE: Duration = Duration::from_secs(15 * 60);
const NODE_PORT: u16 = 30080;

const SYSTEM_PODS: &[&str] =
    &["etcd-", "kube-apiserver-", "kube-controller-manager-", "kube-scheduler-", "kube-proxy-", "coredns-"];

/// The workload: two replicas of the preloaded web image (never pulled: `imagePullPolicy:
/// Never`), at most one per node, and a NodePort Service in front of them. On one node the
/// second replica waits for a second node.
fn workload() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: default}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - labelSelector: {{matchLabels: {{app: web}}}}
            topologyKey: kubernetes.io/hostname
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

/// A claim on the default StorageClass (none named) and a Job that writes into it.
fn volume_job() -> String {
    format!(
        r#"apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: proof, namespace: default}}
spec:
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 16Mi}}}}
---
apiVersion: batch/v1
kind: Job
metadata: {{name: volume-writer, namespace: default}}
spec:
  backoffLimit: 3
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: writer
        image: {BUSYBOX_REF}
        imagePullPolicy: Never
        command: [sh, -c, "echo labforge-volume-ok > /data/proof"]
        volumeMounts: [{{name: data, mountPath: /data}}]
      volumes: [{{name: data, persistentVolumeClaim: {{claimName: proof}}}}]
"#
    )
}

/// Prometheus's answer to an instant query, from the LAN through its NodePort.
fn prometheus(room: &Room, path: &str) -> Result<serde_json::Value> {
    let body = room.remote.http_get_path_at(&room.pcs[0].addr, PROMETHEUS_PORT, path, SETTLE)?;
    serde_json::from_str(&body).with_context(|| format!("Prometheus {path}: {body}"))
}

const EVERY: Duration = Duration::from_secs(10);

const PROMETHEUS_PORT: u16 = 30090;

/// The monitoring component on the single-node cluster.
fn monitoring(room: &Room) -> Result<()> {
    // Every job's target is up: the node's kubelet and cAdvisor (HTTPS, the service account's
    // token), node-exporter and the agent, found through the master's /sd/nodes.
    let jobs = ["prometheus", "kubelet", "cadvisor", "node-exporter", "labforge-agent", "kube-state-metrics"];
    let up = poll("every Prometheus job up", SETTLE, EVERY, || {
        let v = prometheus(room, "/api/v1/query?query=up").map_err(|e| format!("{e:#}"))?;
        let up: Vec<(String, String)> = v["data"]["result"]
            .as_array()
            .ok_or_else(|| format!("not a vector: {v}"))?
            .iter()
            .map(|r| {
                (
                    r["metric"]["job"].as_str().unwrap_or("").to_string(),
                    r["value"][1].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        if jobs.iter().all(|j| up.iter().any(|(job, val)| job == j && val == "1")) {
            Ok(up)
        } else {
            Err(format!("{up:?}"))
        }
    })?;
    eprintln!("real room: Prometheus targets up: {up:?}");
    let node = prometheus(room, "/api/v1/query?query=up%7Bjob%3D%22node-exporter%22%7D")?;
    assert!(node["data"]["result"][0]["metric"]["node"].as_str().is_some_and(|n| !n.is_empty()), "{node}");
    // kube-state-metrics reports the API's objects: the provisioner's Deployment is available.
    let available = prometheus(
        room,
        "/api/v1/query?query=kube_deployment_status_replicas_available%7Bdeployment%3D%22local-path-provisioner%22%7D",
    )?;
    assert_eq!(available["data"]["result"][0]["value"][1], "1", "{available}");
    let rules = prometheus(room, "/api/v1/rules")?;
    let names = rules.to_string();
    for a in ["NodeDown", "DiskFilling", "StackComponentNotReady", "AgentStuck"] {
        assert!(names.contains(a), "alert rule {a} loaded: {names}");
    }
    // Stop node-exporter (no node matches its pods' selector any more): NodeDown fires.
    room.kubectl(
        0,
        r#"-n labforge-monitoring patch daemonset node-exporter -p '{"spec":{"template":{"spec":{"nodeSelector":{"labforge.test/none":"x"}}}}}'"#,
        "",
    )?;
    let stopped = Instant::now();
    poll("NodeDown firing once node-exporter stopped", SETTLE, EVERY, || {
        let v = prometheus(room, "/api/v1/alerts").map_err(|e| format!("{e:#}"))?;
        let alerts = v["data"]["alerts"].as_array().ok_or_else(|| format!("no alerts: {v}"))?;
        if alerts.iter().any(|a| a["labels"]["alertname"] == "NodeDown" && a["state"] == "firing") {
            Ok(())
        } else {
            Err(format!("{alerts:?}"))
        }
    })?;
    eprintln!("real room: NodeDown fired {:.0?} after node-exporter stopped", stopped.elapsed());
    room.kubectl(
        0,
        r#"-n labforge-monitoring patch daemonset node-exporter --type=json -p '[{"op":"remove","path":"/spec/template/spec/nodeSelector"}]'"#,
        "",
    )?;
    // Grafana (no image here) as the component renders it with grafana = true: the API server
    // accepts every object (server-side dry run).
    let spec: labforge::spec::StackSpec = toml::from_str("components = [\"storage\", \"monitoring\"]")?;
    let components = labforge::build::stack::resolve(&spec)?;
    let m = components.iter().find(|c| c.name == "monitoring").context("monitoring")?;
    let facts = labforge_core::stack::ClusterFacts {
        master_address: room.pcs[0].addr.clone(),
        ..labforge_core::stack::ClusterFacts::at_build("10.244.0.0/16", "10.96.0.0/12", kubernetes::VERSION)
    };
    let rendered = labforge_core::stack::render(m, &facts)?;
    let grafana: Vec<&serde_json::Value> = rendered
        .objects
        .iter()
        .filter(|o| o["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("grafana")))
        .collect();
    assert_eq!(grafana.len(), 5, "two ConfigMaps, a claim, a Deployment and a Service");
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": grafana});
    let out = no_warnings(kubectl_patient(room, DRY_RUN, &list.to_string())?)?;
    // One door for people: the master's port 80 lists the components, ready, with the link to
    // Prometheus at the address the browser used.
    let addr = room.pcs[0].addr.clone();
    // node-exporter was just put back: monitoring is ready again once its pods are.
    let needles =
        ["<td>storage</td><td class=\"ready\">ready</td>", "<td>monitoring</td><td class=\"ready\">ready</td>"];
    let portal = poll("the portal showing storage and monitoring ready", SETTLE, EVERY, || {
        let page = room.remote.http_get_at(&addr, 80, SETTLE).map_err(|e| format!("{e:#}"))?;
        if needles.iter().all(|n| page.contains(n)) {
            Ok(page)
        } else {
            Err(page)
        }
    })?;
    assert!(portal.contains(&format!("<a href=\"http://{addr}:{PROMETHEUS_PORT}/\">Prometheus</a>")), "{portal}");
    for o in [
        "configmap/grafana-provisioning",
        "configmap/grafana-dashboards",
        "persistentvolumeclaim/grafana-data",
        "deployment.apps/grafana",
        "service/grafana",
    ] {
        assert!(out.contains(&format!("{o} serverside-applied (server dry run)")), "{o} accepted: {out}");
    }
    Ok(())
}

/// A server-side dry run of server-side apply with strict field validation (an unknown or
/// duplicate field is an error), kubectl's warnings in its output.
const DRY_RUN: &str = "apply --server-side --validate=strict --field-manager=labforge-test --dry-run=server -f - 2>&1";

/// `kubectl args` on the master with `stdin`, tried again while kubectl times out fetching the
/// API server's OpenAPI document for validation: a TCG-emulated control plane, busy, took longer
/// than kubectl's fixed 32 s to build it the first time (the real room's run 4), and serves it
/// from its cache after that.
fn kubectl_patient(room: &Room, args: &str, stdin: &str) -> Result<String> {
    // Only kubectl's client timeout is waited out (`poll` tries again): "Client.Timeout
    // exceeded" while waiting for headers, "Client.Timeout or context cancellation while
    // reading body" mid-document (seen on a busy machine). Any other answer, success or
    // error, ends the wait at once.
    poll("kubectl getting the OpenAPI document in time", Duration::from_secs(180), Duration::from_secs(20), || {
        match room.kubectl(0, args, stdin) {
            Err(e) if format!("{e:#}").contains("Client.Timeout") => Err(format!("{e:#}")),
            r => Ok(r),
        }
    })?
}

/// The `rook-ceph` component against the real API server: its upstream files fetched the way a
/// build fetches them (from a mirror of Rook's release files, here its Go module's copy, each
/// checked against the component's sha256), the namespace and every CRD applied for real, and
/// every other object (RBAC, the Ceph-CSI operator, our operator, CephCluster, pools, classes)
/// accepted by a server-side dry run. Rook's images cannot be had here, so nothing runs.
fn rook_ceph_dry_run(room: &Room, node: &str) -> Result<()> {
    let examples = kubernetes::rook_examples()?;
    let mirror = kubernetes::FileServer::start(&examples, 0)?;
    let mut spec: labforge::spec::StackSpec = toml::from_str("components = [\"rook-ceph\"]")?;
    for f in ["crds", "common", "csi-operator"] {
        spec.upstream.insert(format!("rook-ceph.{f}"), format!("http://{}/{f}.yaml", mirror.addr));
    }
    let mut components = labforge::build::stack::resolve(&spec)?;
    let cache = tempfile::tempdir()?;
    labforge::build::stack::fetch_upstream(&mut components, cache.path(), false)?;
    // Air-gapped as a build proves it: every image the fetched files run is one the component
    // declares (and so preloads).
    let declared: Vec<(String, String)> =
        labforge::build::stack::declared_images(&components).into_iter().map(|r| (r, String::new())).collect();
    labforge::build::stack::check(
        &mut components,
        &labforge_core::stack::ClusterFacts::at_build("a", "b", "c"),
        &declared,
    )?;
    let mut facts = labforge_core::stack::ClusterFacts {
        master_address: room.pcs[0].addr.clone(),
        ..labforge_core::stack::ClusterFacts::at_build("10.244.0.0/16", "10.96.0.0/12", kubernetes::VERSION)
    };
    facts.ceph_devices.insert(node.to_string(), vec!["/dev/disk/by-id/virtio-lab-data".into()]);
    let rendered = labforge_core::stack::render(&components[0], &facts)?;
    let (real, dry): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) =
        rendered.objects.iter().partition(|o| o["kind"] == "Namespace" || o["kind"] == "CustomResourceDefinition");
    assert!(real.len() > 20, "Rook's and the Ceph-CSI operator's CRDs: {}", real.len());
    let list = |items: &[&serde_json::Value]| {
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
    };
    no_warnings(kubectl_patient(
        room,
        "apply --server-side --validate=strict --field-manager=labforge-test -f - 2>&1",
        &list(&real),
    )?)?;
    room.kubectl(0, "wait --for=condition=Established --timeout=120s crd -l labforge.io/component=rook-ceph", "")?;
    let out = no_warnings(kubectl_patient(room, DRY_RUN, &list(&dry))?)?;
    for o in [
        "clusterrole.rbac.authorization.k8s.io/rook-ceph-system",
        "deployment.apps/ceph-csi-controller-manager",
        "configmap/rook-ceph-operator-config",
        "deployment.apps/rook-ceph-operator",
        "cephcluster.ceph.rook.io/rook-ceph",
        "cephblockpool.ceph.rook.io/replicapool",
        "cephfilesystem.ceph.rook.io/labfs",
        "storageclass.storage.k8s.io/rook-ceph-block",
        "storageclass.storage.k8s.io/rook-cephfs",
    ] {
        assert!(out.contains(&format!("{o} serverside-applied (server dry run)")), "{o} accepted: {out}");
    }
    assert_eq!(out.lines().filter(|l| l.ends_with("(server dry run)")).count(), dry.len(), "{out}");
    // Leave the cluster as the stack made it.
    room.kubectl(0, "delete namespace rook-ceph --wait=false", "")?;
    room.kubectl(0, "delete crd -l labforge.io/component=rook-ceph", "")?;
    Ok(())
}

/// The master's stack: the built-in components ready (the test's `broken` never is).
fn stack_ready(s: &Status) -> bool {
    s.stack.as_ref().is_some_and(|st| {
        ["storage", "monitoring"].iter().all(|n| st.components.iter().any(|c| &c.name == n && c.state == State::Ready))
    })
}

/// The file the Job wrote, read on the node that holds the volume: the one its PersistentVolume
/// is bound to (the worker may have joined by the time the Job was scheduled).
fn proof(room: &Room) -> Result<String> {
    let pv = room.kubectl(0, "get pvc proof -o jsonpath='{.spec.volumeName}'", "")?;
    let node = room.kubectl(
        0,
        &format!("get pv {} -o jsonpath='{{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}}'", pv.trim()),
        "",
    )?;
    let addr = room.kubectl(
        0,
        &format!("get node {} -o jsonpath='{{.status.addresses[?(@.type==\"InternalIP\")].address}}'", node.trim()),
        "",
    )?;
    let cmd = format!("sudo cat /var/lib/labforge/volumes/{}_default_proof/proof", pv.trim());
    Ok(room.remote.run_at(addr.trim(), &cmd, "")?.trim().to_string())
}

fn pods_ready(s: &Status, prefixes: &[&str]) -> bool {
    let Some(api) = &s.kube_api else { return false };
    prefixes.iter().all(|p| {
        let pods: Vec<_> = api.control_plane.iter().filter(|x| x.name.starts_with(p)).collect();
        !pods.is_empty() && pods.iter().all(|x| x.ready)
    })
}

/// `n` nodes listed, every one Ready with a pod CIDR.
fn nodes_ready(s: &Status, n: usize) -> bool {
    s.kube_api
        .as_ref()
        .is_some_and(|api| api.nodes.len() == n && api.nodes.iter().all(|x| x.ready && x.pod_cidr.is_some()))
}

struct Pc {
    cfg: VmConfig,
    vm: Option<Vm>,
    /// Its LAN address, once it reported one.
    addr: String,
}

struct Room {
    // Field order is drop order: VMs first, then the LAN (in `remote`), then the lock.
    pcs: Vec<Pc>,
    remote: Remote,
    dir: PathBuf,
    _one_at_a_time: nix::fcntl::Flock<std::fs::File>,
}

impl Room {
    fn new(built: &KubeImage) -> Result<Room> {
        let lock = qemu_tests::exclusive()?;
        let dir = qemu_tests::vm::scenario_dir("real_room")?;
        // A bare switch: no DHCP server, no uplink. The master serves the LAN (DHCP, DNS,
        // time) and is CoreDNS's only resolver.
        let mut lan = Lan::bare("realroom", &dir)?;
        let mut pcs = Vec::new();
        // kubeadm's preflight wants 2 CPUs and 1.7 GB for a control plane: the first PC, alone
        // when it elects itself, is the master. The worker gets one vCPU: two cores cannot
        // emulate four, and a starved API server is killed by its own liveness probe.
        for i in 0..2 {
            let tap = lan.tap()?;
            let mut cfg = VmConfig::new(&format!("node{i}"), &built.image.image);
            (cfg.memory_mib, cfg.cpus) = if i == 0 { (3072, 2) } else { (2048, 1) };
            cfg.net = Net::Tap { ns: lan.ns.clone(), tap, mac: format!("52:54:00:79:00:{:02x}", i + 1) };
            pcs.push(Pc { cfg, vm: None, addr: String::new() });
        }
        let remote = Remote::new(lan, &built.ssh_key);
        Ok(Room { pcs, remote, dir, _one_at_a_time: lock })
    }

    fn vm(&mut self, i: usize) -> &mut Vm {
        self.pcs[i].vm.as_mut().expect("running")
    }

    /// Powers PC `i` on: a fresh VM the first time, the same disks after that.
    fn power_on(&mut self, i: usize) -> Result<()> {
        let fresh = !self.dir.join(format!("node{i}-console.log")).exists();
        let vm =
            if fresh { Vm::start(&self.pcs[i].cfg, &self.dir)? } else { Vm::restart(&self.pcs[i].cfg, &self.dir)? };
        self.pcs[i].vm = Some(vm);
        Ok(())
    }

    fn power_cut(&mut self, i: usize) -> Result<()> {
        self.pcs[i].vm.take().expect("running").power_cut()
    }

    /// Waits for PC `i` to print a status line with phase `ready`, and remembers its address.
    fn wait_ready(&mut self, i: usize, what: &str) -> Result<Status> {
        let s = self.vm(i).wait_status(what, UP, |s| s.phase == Phase::Ready)?;
        let addr = s.lan_address.clone().context("a ready node has a LAN address")?;
        assert!(addr.starts_with(lan::SUBNET), "{addr}");
        self.pcs[i].addr = addr;
        Ok(s)
    }

    /// A command on PC `i` over SSH; its stdout.
    fn run(&self, i: usize, cmd: &str, stdin: &str) -> Result<String> {
        self.remote.run_at(&self.pcs[i].addr, cmd, stdin)
    }

    /// kubectl on the master `m`, with the admin kubeconfig the agent gave the `lab` user.
    fn kubectl(&self, m: usize, args: &str, stdin: &str) -> Result<String> {
        self.run(m, &format!("kubectl {args}"), stdin)
    }

    /// How many lines of this boot's agent journal on PC `i` match `pattern` (grep -E).
    fn journal_count(&self, i: usize, pattern: &str) -> Result<usize> {
        let out = self.run(
            i,
            &format!("sudo journalctl -b -u labforge-agent --no-pager -o cat | grep -cE '{pattern}' || true"),
            "",
        )?;
        out.trim().parse().with_context(|| format!("counting {pattern:?}: {out:?}"))
    }

    /// Keeps this boot's journal of the agent, kubelet and containerd of every running PC in
    /// the scenario directory (monotonic timestamps: where the minutes went).
    fn keep_journals(&self, tag: &str) {
        for (i, pc) in self.pcs.iter().enumerate() {
            if pc.vm.is_none() || pc.addr.is_empty() {
                continue;
            }
            let cmd = "sudo journalctl -b -o short-monotonic --no-pager -u labforge-agent -u kubelet -u containerd";
            if let Ok(text) = self.run(i, cmd, "") {
                let _ = std::fs::write(self.dir.join(format!("node{i}-journal-{tag}.log")), text);
            }
        }
    }

    /// A guest kernel oops on the console of this boot of any PC, named for the failure's
    /// message: a task that oopses while holding a lock (a udev worker creating a `/dev`
    /// link, seen once under TCG) leaves everything that reads that directory hung without
    /// a panic, so the scenario only times out later, on something that looks unrelated.
    fn guest_oops(&self) -> Option<String> {
        self.pcs.iter().enumerate().find_map(|(i, pc)| {
            let vm = pc.vm.as_ref()?;
            // The log file: it has every line, drained by a wait or not.
            let text = std::fs::read_to_string(&vm.log).ok()?;
            let console: Vec<&str> = text.lines().collect();
            let at = console.iter().position(|l| l.contains("Oops:") || l.contains("BUG: kernel"))?;
            let lines = console[at.saturating_sub(1)..(at + 8).min(console.len())].join("\n");
            Some(format!(
                "node{i}'s guest kernel oopsed during this boot (an emulator or guest kernel fault, and the likely cause of what follows):\n{lines}\n(full log: {})",
                vm.log.display()
            ))
        })
    }

    /// Every console so far: no oops, no failed unit.
    fn check_health(&mut self) -> Result<()> {
        for pc in &mut self.pcs {
            if let Some(vm) = &mut pc.vm {
                vm.wait_booted(Duration::from_secs(300))?;
                vm.check_console_health()?;
            }
        }
        Ok(())
    }
}

/// Every status line any PC printed in any boot (the console logs in `dir`) names cluster
/// `uid` or none.
fn only_cluster(dir: &std::path::Path, uid: &str) -> Result<()> {
    let mut lines = 0;
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("-console")) {
            continue;
        }
        for line in String::from_utf8_lossy(&std::fs::read(&path)?).lines() {
            if let Some(st) = qemu_tests::vm::parse_status(line) {
                lines += 1;
                assert!(
                    st.cluster_uid.is_none() || st.cluster_uid.as_deref() == Some(uid),
                    "a second cluster in {}: {line}",
                    path.display()
                );
            }
        }
    }
    assert!(lines > 0, "no status lines in {}", dir.display());
    Ok(())
}

/// (name, node, pod IP) of every web pod.
fn web_pods(room: &Room, m: usize) -> Result<Vec<(String, String, String)>> {
    let out = room.kubectl(
        m,
        "get pods -l app=web -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP}{\"\\n\"}{end}'",
        "",
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
        })
        .collect())
}

/// `labforge images ls` of the built image: the sandbox image and every image kubeadm listed
/// come first, marked for the cluster; the stack's and the workload's follow, unmarked.
fn preload_order(img: &std::path::Path) -> Result<()> {
    let out = std::process::Command::new(qemu_tests::workspace_root().join("target/release/labforge"))
        .args(["images", "ls", "--json"])
        .arg(img)
        .output()?;
    anyhow::ensure!(out.status.success(), "labforge images ls: {}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let marked: Vec<&str> =
        listed.iter().take_while(|i| i["cluster"] == true).map(|i| i["name"].as_str().unwrap_or("?")).collect();
    assert!(listed[marked.len()..].iter().all(|i| i["cluster"] == false), "the marked images come first: {listed:?}");
    assert!(marked.len() < listed.len(), "the stack's images are not kubeadm's: {listed:?}");
    let repo = kubernetes::IMAGE_REPOSITORY;
    let pause = format!("{repo}/pause:{}", kubernetes::PAUSE_TAG);
    assert!(marked.contains(&pause.as_str()), "the sandbox image {pause} in {marked:?}");
    for name in ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "etcd", "coredns"] {
        assert!(marked.iter().any(|m| m.starts_with(&format!("{repo}/{name}:"))), "{name} in {marked:?}");
    }
    eprintln!("real room: {} of {} preloaded images marked for kubeadm, first", marked.len(), listed.len());
    Ok(())
}

#[test]
#[ignore = "about 25 minutes of TCG on two cores: `make test-kubernetes` runs it (see README, CI time)"]
fn real_room() -> Result<()> {
    let built = kubernetes::test_image()?;
    preload_order(&built.image.out.join(format!("{}.img", built.image.name)))?;
    let mut room = Room::new(&built)?;
    let result = scenario(&mut room);
    if result.is_err() {
        room.keep_journals("failed");
    }
    result.map_err(|e| match room.guest_oops() {
        Some(oops) => e.context(oops),
        None => e,
    })
}

fn scenario(room: &mut Room) -> Result<()> {
    // --- interrupted_init: the first PC, alone, loses power while kubeadm init runs.
    let started = Instant::now();
    room.power_on(0)?;
    let s = room
        .vm(0)
        // (A PC with no lease yet first reports its link-local address.)
        .wait_status("the master initialising on the LAN", UP, |s| {
            s.phase == Phase::Initialising && s.lan_address.as_deref().is_some_and(|a| a.starts_with(lan::SUBNET))
        })?;
    let uid = s.cluster_uid.clone().context("a master has a cluster uid")?;
    room.pcs[0].addr = s.lan_address.clone().context("a master has a LAN address")?;
    // The status says which phase kubeadm init is in while it runs.
    let s = room.remote.wait_api_at(&room.pcs[0].addr, "kubeadm init's phase in the status", UP, |s| {
        s.message.starts_with("kubeadm init: [")
    })?;
    eprintln!("real room: power-on to kubeadm init in {:.0?} ({})", started.elapsed(), s.message);
    // Cut once init has written the control plane's static pods: certificates, kubeconfigs
    // and manifests are on disk, the control plane is not up yet.
    poll("kubeadm init writing its manifests", UP, Duration::from_secs(5), || {
        let o = room
            .remote
            .ssh_at(&room.pcs[0].addr, "sudo test -s /etc/kubernetes/manifests/kube-apiserver.yaml && echo written", "")
            .map_err(|e| format!("{e:#}"))?;
        let said = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if said == "written" {
            Ok(())
        } else {
            Err(format!("not yet ({said:?})"))
        }
    })?;
    eprintln!(
        "real room: kubeadm init wrote the static pods {:.0?} after power-on; cutting the power",
        started.elapsed()
    );
    room.power_cut(0)?;
    let restarted = Instant::now();
    room.power_on(0)?;
    let ready = room.wait_ready(0, "phase ready after an interrupted init")?;
    let to_ready = restarted.elapsed();
    eprintln!("real room: power-on after an interrupted init to node Ready in {to_ready:.0?}");
    assert_eq!(ready.role, Role::Master);
    assert_eq!(ready.cluster_uid.as_deref(), Some(uid.as_str()), "one cluster uid, ever");
    assert!(room.journal_count(0, "did not finish; resetting")? >= 1, "the interrupted init was reset");
    assert_eq!(room.journal_count(0, "running kubeadm.* init --config")?, 1, "kubeadm init ran once on this boot");
    // The control plane's probes are the ones a slow PC passes (kubeadm patches).
    let manifest = room.run(0, "sudo cat /etc/kubernetes/manifests/kube-apiserver.yaml", "")?;
    let liveness = manifest.split("livenessProbe:").nth(1).context("the API server has a liveness probe")?;
    assert!(liveness.contains("failureThreshold: 24") && liveness.contains("timeoutSeconds: 30"), "{manifest}");

    // --- stack_survives_power_cut, part 1: the power goes while the stack is being applied
    // (storage ready and recorded, monitoring applied or being applied, not ready yet).
    let s = room.remote.wait_api_at(&room.pcs[0].addr, "the stack half applied", SETTLE, |s| {
        s.stack.as_ref().is_some_and(|st| {
            let state = |n: &str| st.components.iter().find(|c| c.name == n).map(|c| c.state);
            state("storage") == Some(State::Ready)
                && matches!(state("monitoring"), Some(State::Applying | State::Waiting))
        })
    })?;
    let half = s.stack.as_ref().and_then(|st| st.components.iter().find(|c| c.name == "monitoring").cloned());
    eprintln!("real room: cutting the power while the stack is applied ({half:?})");
    room.power_cut(0)?;
    room.power_on(0)?;
    room.wait_ready(0, "phase ready after a power cut mid-stack")?;
    let s = room.remote.wait_api_at(&room.pcs[0].addr, "the stack ready after the cut", SETTLE, stack_ready)?;
    assert_eq!(room.journal_count(0, "applying component=storage")?, 0, "storage was recorded: not applied again");
    assert!(
        room.journal_count(0, "applying component=monitoring")? <= 1,
        "monitoring applied again at most once (when the cut came before its digest was recorded)"
    );
    assert!(
        s.stack.as_ref().is_some_and(|st| st.components.iter().all(|c| c.failures == 0 || c.name == "broken")),
        "{s:?}"
    );

    // --- worker_joins_real_cluster, part 1: a second PC is powered on now, and boots while
    // the checks below run.
    let worker_on = Instant::now();
    room.power_on(1)?;

    // --- single_node_appliance: the API server, through the agent's status: the version built
    // from source, the node Ready with a pod CIDR, every system pod Ready (CoreDNS needs the
    // pod network).
    let s = room.remote.wait_api_at(&room.pcs[0].addr, "control plane, kube-proxy and CoreDNS Ready", SETTLE, |s| {
        pods_ready(s, SYSTEM_PODS)
    })?;
    let api = s.kube_api.as_ref().expect("kube_api");
    assert_eq!(api.version.as_deref(), Some(kubernetes::VERSION), "{api:?}");
    assert_eq!(api.node_ready, Some(true), "{api:?}");
    let me = api.nodes.iter().find(|n| n.name == ready.node.hostname).context("the master is listed")?;
    assert!(me.pod_cidr.as_deref().is_some_and(|c| c.starts_with("10.244.")), "{api:?}");
    // The admin kubeconfig is the sudo user's, and the master takes workloads (no taint).
    let taints = room.kubectl(0, &format!("get node {} -o jsonpath='{{.spec.taints}}'", ready.node.hostname), "")?;
    assert!(!taints.contains("NoSchedule"), "schedule-on-master leaves the master untainted: {taints}");
    let applied = room.kubectl(0, "apply -f -", &workload())?;
    assert!(applied.contains("deployment.apps/web"), "{applied}");
    let body = room.remote.http_get_at(&room.pcs[0].addr, NODE_PORT, SETTLE)?;
    assert!(body.starts_with("labforge-web-ok web-"), "the NodePort answers from a web pod: {body:?}");
    // Pod to Service by name: CoreDNS answers for the cluster domain.
    let dns = room.kubectl(0, "-n kube-system get endpointslices -l kubernetes.io/service-name=kube-dns -o jsonpath='{.items[*].endpoints[*].addresses[*]}'", "")?;
    assert!(
        dns.split_whitespace().any(|a| a.starts_with("10.244.")),
        "kube-dns has CoreDNS pods on the pod network behind it: {dns:?}"
    );

    // --- stack_comes_up: the master applied the image's stack once it was Ready.
    let s = room.remote.wait_api_at(&room.pcs[0].addr, "the stack ready", SETTLE, stack_ready)?;
    let st = s.stack.as_ref().expect("stack");
    let names: Vec<&str> = st.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["storage", "monitoring", "broken", "after-broken"], "{st:?}");
    assert!(st.components[0].applied_digest.as_deref().is_some_and(|d| d.len() == 64), "{st:?}");
    // A site component that fails is reported with its cause and retried with a pause; what
    // depends on it waits; the others came up regardless.
    let s = room.remote.wait_api_at(&room.pcs[0].addr, "the broken component reported", SETTLE, |s| {
        s.stack.as_ref().is_some_and(|st| st.components.iter().any(|c| c.name == "broken" && c.state == State::Failed))
    })?;
    let st = s.stack.as_ref().expect("stack");
    let broken = &st.components[2];
    assert!(broken.message.contains("Job labforge-broken/fails: job failed"), "{broken:?}");
    assert!(broken.message.contains("tried again in"), "{broken:?}");
    assert!(broken.failures >= 1, "{broken:?}");
    let after = &st.components[3];
    assert_eq!(after.state, State::Blocked, "{after:?}");
    assert_eq!(after.message, "waits for broken to be ready");
    assert_eq!(st.state, "degraded", "{st:?}");
    let never = room.kubectl(0, "-n labforge-broken get configmap never-applied --ignore-not-found -o name", "")?;
    assert!(never.trim().is_empty(), "a blocked component applies nothing: {never}");
    let classes = room.kubectl(
        0,
        r#"get storageclass -o jsonpath='{range .items[*]}{.metadata.name}={.metadata.annotations.storageclass\.kubernetes\.io/is-default-class} {end}'"#,
        "",
    )?;
    assert!(classes.split_whitespace().any(|c| c == "local-path=true"), "a default StorageClass: {classes:?}");
    let managed = room.kubectl(
        0,
        "-n labforge-storage get deployment local-path-provisioner -o jsonpath='{.metadata.labels}'",
        "",
    )?;
    assert!(managed.contains("\"labforge.io/component\":\"storage\""), "the stack's objects are labelled: {managed}");
    let applied = room.kubectl(0, "apply -f -", &volume_job())?;
    assert!(applied.contains("job.batch/volume-writer"), "{applied}");
    room.kubectl(0, "wait --for=condition=complete job/volume-writer --timeout=900s", "")?;
    let phase = room.kubectl(0, "get pvc proof -o jsonpath='{.status.phase}'", "")?;
    assert_eq!(phase.trim(), "Bound", "the claim on the default class is bound");
    assert_eq!(proof(room)?, "labforge-volume-ok", "the Job's file is on the master's state partition");
    assert_eq!(
        room.journal_count(0, "applying component=storage")?,
        0,
        "storage is not applied again while the worker joins and the claim is served (its objects do not change)"
    );
    monitoring(room)?;
    rook_ceph_dry_run(room, &ready.node.hostname)?;

    // --- worker_joins_real_cluster, part 2.
    let w = room.wait_ready(1, "the worker Ready")?;
    eprintln!("real room: worker power-on to node Ready in {:.0?}", worker_on.elapsed());
    assert_eq!(w.role, Role::Worker, "{}", w.message);
    assert_eq!(w.cluster_uid.as_deref(), Some(uid.as_str()));
    let m = room.remote.status_at(&room.pcs[0].addr)?;
    assert_eq!(w.join_info_sha256, m.join_info_sha256, "the worker got the join info the master minted");
    // The token kubeadm join used is the one the master minted (both kept in 0600 state).
    let state = |i: usize| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&room.run(i, "sudo cat /var/lib/labforge/state.json", "")?)?)
    };
    let token = state(0)?["join_info"]["token"].as_str().context("the master keeps its join token")?.to_string();
    assert_eq!(token.len(), 23, "a kubeadm token");
    assert_eq!(state(1)?["join_info"]["token"].as_str(), Some(token.as_str()), "joined with the master's token");
    assert_eq!(room.journal_count(1, "running kubeadm.* join --config")?, 1, "the worker ran kubeadm join once");
    let s = room.remote.wait_api_at(&room.pcs[0].addr, "both nodes Ready", SETTLE, |s| {
        nodes_ready(s, 2) && pods_ready(s, SYSTEM_PODS)
    })?;
    let cidrs: Vec<String> =
        s.kube_api.as_ref().expect("kube_api").nodes.iter().filter_map(|n| n.pod_cidr.clone()).collect();
    assert_ne!(cidrs[0], cidrs[1], "each node has its own pod CIDR");
    // The second replica found its node; one pod each.
    room.kubectl(0, "rollout status deployment/web --timeout=900s", "")?;
    let pods = web_pods(room, 0)?;
    assert_eq!(pods.len(), 2, "{pods:?}");
    let on = |host: &str| {
        pods.iter().find(|p| p.1 == host).cloned().with_context(|| format!("no web pod on {host}: {pods:?}"))
    };
    let (on_master, on_worker) = (on(&ready.node.hostname)?, on(&w.node.hostname)?);
    // Pod to pod across nodes, both ways, over the pod network (host-gw routes via the LAN).
    for (from, to) in [(&on_worker, &on_master), (&on_master, &on_worker)] {
        let got = room.kubectl(0, &format!("exec {} -- /web get {}", from.0, to.2), "")?;
        assert_eq!(got.trim(), format!("labforge-web-ok {}", to.0), "{} on {} to {} on {}", from.0, from.1, to.0, to.1);
    }
    // The NodePort answers on the worker's address too (its own kube-proxy).
    let body = room.remote.http_get_at(&room.pcs[1].addr, NODE_PORT, SETTLE)?;
    assert!(body.starts_with("labforge-web-ok web-"), "the worker's NodePort: {body:?}");
    room.keep_journals("formed");
    room.check_health()?;

    // --- whole_room_power_cut: every PC at once, then power back: every PC has the address it
    // had (the LAN's DHCP server remembers its lease), which kubeadm pinned.
    let before: Vec<String> = room.pcs.iter().map(|p| p.addr.clone()).collect();
    room.power_cut(0)?;
    room.power_cut(1)?;
    let back_on = Instant::now();
    room.power_on(0)?;
    room.power_on(1)?;
    for (i, had) in before.iter().enumerate() {
        let s = room.wait_ready(i, "phase ready after the whole-room power cut")?;
        assert_eq!(s.cluster_uid.as_deref(), Some(uid.as_str()), "same cluster after the power cut");
        assert_eq!(&room.pcs[i].addr, had, "node{i} has its address again");
    }
    room.remote
        .wait_api_at(&room.pcs[0].addr, "both nodes Ready after the power cut", SETTLE, |s| nodes_ready(s, 2))?;
    eprintln!("real room: whole-room power-on to every node Ready in {:.0?}", back_on.elapsed());
    for i in 0..2 {
        let body = room.remote.http_get_at(&room.pcs[i].addr, NODE_PORT, SETTLE)?;
        assert!(body.starts_with("labforge-web-ok web-"), "serving again after the power cut: {body:?}");
        assert_eq!(
            room.journal_count(i, "running kubeadm.* (init|join) --config")?,
            0,
            "no kubeadm init or join after the power cut"
        );
    }
    eprintln!("real room: whole-room power-on to the workload serving in {:.0?}", back_on.elapsed());
    // --- stack_survives_power_cut: ready again, nothing applied again, the volume intact.
    room.remote.wait_api_at(&room.pcs[0].addr, "the stack ready after the power cut", SETTLE, stack_ready)?;
    eprintln!("real room: whole-room power-on to the stack ready in {:.0?}", back_on.elapsed());
    assert_eq!(room.journal_count(0, "applying component=")?, 0, "an unchanged stack is not applied again");
    assert_eq!(proof(room)?, "labforge-volume-ok", "the volume's file survived the power cut");

    // Nothing was ever pulled: every image came from the USB stick. The bootstrap token (in
    // the agents' 0600 state) is in no log and not in the status anyone on the LAN may read.
    for i in 0..2 {
        let pulls = room.run(i, "sudo journalctl -u containerd --no-pager -o cat | grep -c 'PullImage' || true", "")?;
        assert_eq!(pulls.trim(), "0", "containerd pulled images on node{i}");
        let in_logs = room.run(i, &format!("sudo journalctl --no-pager -o cat | grep -cF '{token}' || true"), "")?;
        assert_eq!(in_logs.trim(), "0", "the bootstrap token is in node{i}'s journal");
        let st = room.remote.status_at(&room.pcs[i].addr)?;
        assert!(!serde_json::to_string(&st)?.contains(&token), "the bootstrap token is in node{i}'s /status");
    }
    only_cluster(&room.dir, &uid)?;
    room.keep_journals("after-power-cut");
    room.check_health()
}
