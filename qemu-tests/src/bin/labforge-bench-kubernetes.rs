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
//! - `k8s_fixture_s`: how long getting the fixture took in this run (0 when cached).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use labforge_agent::cluster::{kubeadm, podnet};
use labforge_agent::config::ClusterConfig;
use labforge_agent::preload::PreloadState;
use labforge_agent::status::Phase;
use qemu_tests::kubernetes::{self, Remote};
use qemu_tests::lan::{self, Lan};
use qemu_tests::vm::{self, Net, Vm, VmConfig};

const UP: Duration = Duration::from_secs(60 * 60);

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
    let mut node = Vm::start(&cfg, &dir)?;
    node.wait_status("phase ready", UP, |s| s.phase == Phase::Ready)?;
    let agent_s = t0.elapsed().as_secs_f64();
    eprintln!("bench: agent: power-on to node Ready in {agent_s:.0} s");
    node.power_cut()?;
    let t0 = Instant::now();
    let mut node = Vm::restart(&cfg, &dir)?;
    node.wait_status("phase ready after a power cut", UP, |s| s.phase == Phase::Ready)?;
    let recovery_s = t0.elapsed().as_secs_f64();
    eprintln!("bench: agent: power cut to node Ready in {recovery_s:.0} s");
    drop(node);
    drop(lan);

    // By hand, on the same image.
    let dir = vm::scenario_dir("bench-kubernetes-manual")?;
    let mut lan = Lan::new("bench-manual", &dir)?;
    let mut cfg = pc("manual", &built.image.image, &mut lan, "52:54:00:79:00:02")?;
    let disk = dir.join("manual-boot.raw");
    cfg.disks[0] = lan::boot_disk_with_config(&built.image.image, &disk, Some("[cluster]\nminimum-nodes = 2\n"), None)?;
    let t0 = Instant::now();
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
        // What an administrator types: kubeadm's own probes.
        patches_dir: None,
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
    drop(vm);

    let json = serde_json::json!({
        "k8s_agent_ready_s": round(agent_s),
        "k8s_manual_ready_s": round(manual_s),
        "k8s_agent_overhead": (agent_s / manual_s * 100.0).round() / 100.0,
        "k8s_power_cut_recovery_s": round(recovery_s),
        "k8s_fixture_s": round(fixture_s),
    });
    println!("{}", serde_json::to_string_pretty(&json).context("json")?);
    Ok(())
}

fn round(s: f64) -> f64 {
    (s * 10.0).round() / 10.0
}
