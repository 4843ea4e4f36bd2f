//! `labforge-bench-kubernetes` (part of `make bench`): one PC of `qemu-tests/images/kube.toml`
//! (real Kubernetes v1.36.5 built from source, 2 vCPUs, 3 GiB, TCG) timed two ways on the same
//! image in the same run, as JSON on stdout:
//!
//! - `k8s_agent_ready_s`: power-on to node Ready with the agent doing everything;
//! - `k8s_manual_ready_s`: power-on to node Ready by hand — the agent held back from forming a
//!   cluster (`minimum-nodes = 2` on a config partition), then what an administrator would
//!   type over SSH once the preloaded images are in containerd: `kubeadm init` with the same
//!   configuration, the same CNI configuration for the node's pod CIDR, wait for Ready;
//! - `k8s_agent_overhead`: the ratio of the two (the target: under 1.10 plus the settle window);
//! - `k8s_power_cut_recovery_s`: after cutting the agent PC's power, power-on to Ready again;
//! - `k8s_fixture_s`: how long getting the fixture took in this run (0 when cached);
//! - `stack_agent_ready_s`: node Ready to the image's stack (`storage`, `monitoring`) ready,
//!   applied by the agent; `stack_manual_ready_s`: the same objects (the image's own
//!   `stack.json`, rendered for that node) applied by hand on the other PC once it is Ready —
//!   `kubectl apply --server-side` per component in the same order, `kubectl rollout status`
//!   for each workload before the next component; `stack_agent_overhead`: their ratio;
//! - `stack_ready_after_power_cut_s`: node Ready again after the power cut to the stack ready
//!   (pods restarting included); `stack_noop_round_s`: the agent's round over the components
//!   once nothing changed (no component applied: digests unchanged, gates checked), against
//!   `stack_kubectl_reapply_s`, `kubectl apply --server-side` of every object again;
//! - `stack_agent_power_on_s` / `stack_manual_power_on_s`: power-on to the stack ready, the
//!   like-for-like figure now that the agent starts `kubeadm init` once kubeadm's own images are
//!   in (its node is Ready while the rest still import, where the administrator waits for every
//!   image first), and `stack_power_on_overhead`, their ratio.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use labforge_agent::cluster::{kubeadm, podnet};
use labforge_agent::config::ClusterConfig;
use labforge_agent::preload::PreloadState;
use labforge_agent::stack::plan::State;
use labforge_agent::status::Phase;
use labforge_core::stack::{render, ClusterFacts, StackPlan, STACK_PLAN};
use qemu_tests::kubernetes::{self, Remote};
use qemu_tests::lan::{self, Lan};
use qemu_tests::vm::{self, Net, Vm, VmConfig};

const UP: Duration = Duration::from_secs(60 * 60);

/// The image's built-in components (its site components fail on purpose, for the tests).
const BUILT_IN: [&str; 2] = ["storage", "monitoring"];

fn stack_ready(s: &labforge_agent::status::Status) -> bool {
    s.stack.as_ref().is_some_and(|st| {
        BUILT_IN.iter().all(|n| st.components.iter().any(|c| &c.name == n && c.state == State::Ready))
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("labforge-bench-kubernetes: error: {e:#}");
        std::process::exit(1);
    }
}

fn pc(name: &str, image: &std::path::Path, lan: &mut Lan, mac: &str) -> Result<VmConfig> {
    let mut cfg = VmConfig::new(name, image);
    (cfg.memory_mib, cfg.cpus) = (3072, 2);
    cfg.net = Net::Tap { ns: lan.ns.clone(), tap: lan.tap()?, mac: mac.into() };
    Ok(cfg)
}

fn run() -> Result<()> {
    let _one_at_a_time = qemu_tests::exclusive()?;
    let t = Instant::now();
    let built = kubernetes::test_image()?;
    let fixture_s = t.elapsed().as_secs_f64();

    // The agent does it all.
    let dir = vm::scenario_dir("bench-kubernetes-agent")?;
    let mut lan = Lan::new("bench-agent", &dir)?;
    let cfg = pc("agent", &built.image.image, &mut lan, "52:54:00:79:00:01")?;
    let t0 = Instant::now();
    let agent_on = t0;
    let mut node = Vm::start(&cfg, &dir)?;
    let ready = node.wait_status("phase ready", UP, |s| s.phase == Phase::Ready)?;
    let agent_s = t0.elapsed().as_secs_f64();
    eprintln!("bench: agent: power-on to node Ready in {agent_s:.0} s");
    let mut agent = Remote::new(lan, &built.ssh_key);
    agent.addr = ready.lan_address.clone().context("a master has a LAN address")?;
    let t0 = Instant::now();
    agent.wait_api("the stack ready", UP, stack_ready)?;
    let stack_agent_s = t0.elapsed().as_secs_f64();
    let stack_agent_on_s = agent_on.elapsed().as_secs_f64();
    eprintln!(
        "bench: agent: node Ready to stack ready in {stack_agent_s:.0} s ({stack_agent_on_s:.0} s after power-on)"
    );
    node.power_cut()?;
    let t0 = Instant::now();
    let mut node = Vm::restart(&cfg, &dir)?;
    node.wait_status("phase ready after a power cut", UP, |s| s.phase == Phase::Ready)?;
    let recovery_s = t0.elapsed().as_secs_f64();
    eprintln!("bench: agent: power cut to node Ready in {recovery_s:.0} s");
    let t0 = Instant::now();
    agent.wait_api("the stack ready again", UP, stack_ready)?;
    let stack_after_cut_s = t0.elapsed().as_secs_f64();
    let s = agent.wait_api("a round that applied nothing", UP, |s| {
        stack_ready(s) && s.stack.as_ref().and_then(|st| st.last_round).is_some_and(|r| r.applied == 0)
    })?;
    let noop_s = s.stack.and_then(|st| st.last_round).map_or(0.0, |r| r.took_ms as f64 / 1000.0);
    eprintln!(
        "bench: agent: stack ready {stack_after_cut_s:.0} s after Ready again; a no-op round takes {noop_s:.2} s"
    );
    drop(node);
    drop(agent);

    // By hand, on the same image.
    let dir = vm::scenario_dir("bench-kubernetes-manual")?;
    let mut lan = Lan::new("bench-manual", &dir)?;
    let mut cfg = pc("manual", &built.image.image, &mut lan, "52:54:00:79:00:02")?;
    let disk = dir.join("manual-boot.raw");
    cfg.disks[0] = lan::boot_disk_with_config(&built.image.image, &disk, Some("[cluster]\nminimum-nodes = 2\n"), None)?;
    let t0 = Instant::now();
    let manual_on = t0;
    let mut vm = Vm::start(&cfg, &dir)?;
    let booted = vm.wait_status("the LAN address", UP, |s| s.lan_address.is_some())?;
    let mut node = Remote::new(lan, &built.ssh_key);
    node.addr = booted.lan_address.clone().expect("checked");
    let hostname = booted.node.hostname.clone();
    node.wait_api("preloaded images in containerd", UP, |s| s.preload.state == PreloadState::Done)?;
    let cluster = ClusterConfig { name: "lab".into(), ..Default::default() };
    let init = kubeadm::init_config(&kubeadm::InitParams {
        cluster: &cluster,
        kubernetes_version: kubernetes::VERSION,
        image_repository: kubernetes::IMAGE_REPOSITORY,
        node_name: &hostname,
        node_ip: &node.addr,
        token: &kubeadm::new_token(),
        schedule_on_master: true,
        // What an administrator types: kubeadm's own probes and resolv.conf.
        patches_dir: None,
        resolv_conf: None,
    });
    node.run(
        &format!("echo '{} {}' | sudo tee -a /etc/hosts >/dev/null", node.addr, kubeadm::endpoint_host(&cluster)),
        "",
    )?;
    node.run("sudo install -m 0600 /dev/stdin /root/init.yaml", &init)?;
    node.run("sudo kubeadm init --config /root/init.yaml", "")?;
    let kubectl = "sudo kubectl --kubeconfig /etc/kubernetes/admin.conf";
    let deadline = Instant::now() + UP;
    let cidr = loop {
        let c = node.run(&format!("{kubectl} get node {hostname} -o jsonpath='{{.spec.podCIDR}}'"), "")?;
        if !c.trim().is_empty() {
            break c.trim().to_string();
        }
        if Instant::now() > deadline {
            bail!("the node got no pod CIDR");
        }
        std::thread::sleep(Duration::from_secs(5));
    };
    node.run(
        &format!("sudo install -D -m 0644 /dev/stdin {}/{}", podnet::CONF_DIR, podnet::CONF_FILE),
        &podnet::conflist(&cidr),
    )?;
    node.run(&format!("{kubectl} wait --for=condition=Ready node/{hostname} --timeout=60m"), "")?;
    let manual_s = t0.elapsed().as_secs_f64();
    eprintln!("bench: by hand: power-on to node Ready in {manual_s:.0} s");
    // The stack by hand: the image's own stack.json, rendered for this node.
    let plan: StackPlan = serde_json::from_str(&node.run(&format!("cat {STACK_PLAN}"), "")?).context("stack.json")?;
    let facts = ClusterFacts {
        nodes: 1,
        node_names: vec![hostname.clone()],
        master_address: node.addr.clone(),
        ..ClusterFacts::at_build(&cluster.pod_cidr, &cluster.service_cidr, kubernetes::VERSION)
    };
    let mut lists = Vec::new();
    for c in plan.components.iter().filter(|c| BUILT_IN.contains(&c.name.as_str())) {
        let mut objects = render(c, &facts)?.objects;
        let rank = |o: &serde_json::Value| match o["kind"].as_str() {
            Some("Namespace") => 0,
            Some("CustomResourceDefinition") => 1,
            _ => 2,
        };
        objects.sort_by_key(rank);
        let workloads: Vec<String> = objects
            .iter()
            .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "DaemonSet" | "StatefulSet")))
            .map(|o| {
                let ns = o["metadata"]["namespace"].as_str().unwrap_or(&c.namespace);
                format!(
                    "-n {ns} {}/{}",
                    o["kind"].as_str().unwrap_or_default().to_lowercase(),
                    o["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
            .collect();
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects}).to_string();
        lists.push((c.namespace.clone(), list, workloads));
    }
    let apply = format!("{kubectl} apply --server-side --field-manager=bench -f -");
    let t0 = Instant::now();
    for (_, list, workloads) in &lists {
        node.run(&apply, list)?;
        for w in workloads {
            node.run(&format!("{kubectl} rollout status {w} --timeout=60m"), "")?;
        }
    }
    let stack_manual_s = t0.elapsed().as_secs_f64();
    let stack_manual_on_s = manual_on.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for (_, list, _) in &lists {
        node.run(&apply, list)?;
    }
    let reapply_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "bench: by hand: the stack ready in {stack_manual_s:.0} s ({stack_manual_on_s:.0} s after power-on); applying it again takes {reapply_s:.1} s"
    );
    drop(vm);

    let json = serde_json::json!({
        "k8s_agent_ready_s": round(agent_s),
        "k8s_manual_ready_s": round(manual_s),
        "k8s_agent_overhead": (agent_s / manual_s * 100.0).round() / 100.0,
        "k8s_power_cut_recovery_s": round(recovery_s),
        "k8s_fixture_s": round(fixture_s),
        "stack_agent_ready_s": round(stack_agent_s),
        "stack_manual_ready_s": round(stack_manual_s),
        "stack_agent_overhead": (stack_agent_s / stack_manual_s * 100.0).round() / 100.0,
        "stack_ready_after_power_cut_s": round(stack_after_cut_s),
        "stack_noop_round_s": (noop_s * 100.0).round() / 100.0,
        "stack_kubectl_reapply_s": round(reapply_s),
        "stack_agent_power_on_s": round(stack_agent_on_s),
        "stack_manual_power_on_s": round(stack_manual_on_s),
        "stack_power_on_overhead": (stack_agent_on_s / stack_manual_on_s * 100.0).round() / 100.0,
    });
    println!("{}", serde_json::to_string_pretty(&json).context("json")?);
    Ok(())
}

fn round(s: f64) -> f64 {
    (s * 10.0).round() / 10.0
}
