//! Scenarios about several nodes on one LAN (the costly group: 3-4 VMs each). Every VM boots the
//! same test image (the demo image plus the recording kubeadm double) on a LAN inside a network
//! namespace made by the test: a bare switch, with no DHCP server but the master's.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use labforge_agent::network::time::TimeSource;
use labforge_agent::network::{Addressing, ServeState};
use labforge_agent::status::Kubernetes;
use labforge_agent::status::Phase;
use labforge_agent::status::Role;
use labforge_agent::status::Status;
use qemu_tests::lan::{self, Lan};
use qemu_tests::vm::{ExtraDisk, Net, Vm, VmConfig};
use qemu_tests::{images, workspace_root};
use serde_json::Value;

/// `make e2e-kubernetes` runs these scenarios against `qemu-tests/images/cluster-kubeadm.toml`
/// (images/lab.toml: Ubuntu with the real kubeadm) on a machine with Internet access; the
/// checks of the double's recordings are then skipped and the real kubeadm has to succeed.
fn real_kubeadm() -> bool {
    std::env::var_os("LABFORGE_REAL_KUBEADM").is_some()
}

fn cluster_spec() -> &'static str {
    if real_kubeadm() {
        "qemu-tests/images/cluster-kubeadm.toml"
    } else {
        "qemu-tests/images/cluster.toml"
    }
}

/// Several TCG guests share two cores: boots are slow, and the settle window adds to it.
const FORM: Duration = Duration::from_secs(900);

struct Node {
    cfg: VmConfig,
    vm: Option<Vm>,
}

struct Room {
    // Field order is drop order: VMs first, then the LAN, then the lock.
    nodes: Vec<Node>,
    lan: Lan,
    dir: PathBuf,
    image: PathBuf,
    secret: PathBuf,
    _one_at_a_time: nix::fcntl::Flock<std::fs::File>,
}

impl Room {
    fn new(scenario: &str) -> Result<Room> {
        let lock = qemu_tests::exclusive()?;
        let built = images::image(cluster_spec())?;
        let dir = qemu_tests::vm::scenario_dir(scenario)?;
        let mut lan = Lan::bare(scenario, &dir)?;
        lan.outside()?;
        Ok(Room { nodes: Vec::new(), lan, dir, image: built.image, secret: built.secret, _one_at_a_time: lock })
    }

    /// Adds and boots a node; `config` goes on a LABFORGE config partition on its boot disk
    /// when given.
    fn boot(&mut self, labforge_toml: Option<&str>, secret: Option<&str>) -> Result<usize> {
        self.boot_with(labforge_toml, secret, 0)
    }

    /// [`Room::boot`], with the node's clock `clock_offset_secs` off.
    fn boot_with(
        &mut self,
        labforge_toml: Option<&str>,
        secret: Option<&str>,
        clock_offset_secs: i64,
    ) -> Result<usize> {
        self.boot_full(labforge_toml, secret, clock_offset_secs, false)
    }

    /// [`Room::boot_with`], and with `uplink` a second NIC on the outside (the building
    /// network, [`Lan::outside`]).
    fn boot_full(
        &mut self,
        labforge_toml: Option<&str>,
        secret: Option<&str>,
        clock_offset_secs: i64,
        uplink: bool,
    ) -> Result<usize> {
        let i = self.nodes.len();
        let tap = self.lan.tap()?;
        let mut cfg = VmConfig::new(&format!("node{i}"), &self.image);
        // kubeadm's preflight wants 2 CPUs and 1.7 GB on a real control plane.
        (cfg.memory_mib, cfg.cpus) = if real_kubeadm() { (2560, 2) } else { (1024, 1) };
        cfg.net = Net::Tap { ns: self.lan.ns.clone(), tap, mac: format!("52:54:00:77:00:{:02x}", i + 1) };
        // One blank data disk each: the agents zap it and offer it to Ceph; the master lists
        // every node's in its register (what the CephCluster lists).
        let data = qemu_tests::disks::blank(&self.dir.join(format!("node{i}-data.raw")), 12 * qemu_tests::disks::GIB)?;
        cfg.extra_disks.push(ExtraDisk {
            path: data,
            serial: format!("lf-data{i}"),
            usb: false,
            read_only: false,
            discard: true,
            bootindex: None,
        });
        if labforge_toml.is_some() || secret.is_some() {
            // On the boot disk: the agent ignores config partitions anywhere else.
            let disk = self.dir.join(format!("node{i}-boot.raw"));
            cfg.disks[0] = lan::boot_disk_with_config(&self.image, &disk, labforge_toml, secret)?;
        }
        cfg.clock_offset_secs = clock_offset_secs;
        if uplink {
            cfg.uplink = Some((self.lan.outside_tap()?, format!("52:54:00:88:00:{:02x}", i + 1)));
        }
        let vm = Vm::start(&cfg, &self.dir)?;
        self.nodes.push(Node { cfg, vm: Some(vm) });
        Ok(i)
    }

    fn vm(&mut self, i: usize) -> &mut Vm {
        self.nodes[i].vm.as_mut().expect("running")
    }

    /// Waits for node `i` to print a status line that satisfies `pred`.
    fn wait_status(&mut self, i: usize, what: &str, pred: impl Fn(&Status) -> bool) -> Result<Status> {
        self.vm(i).wait_status(what, FORM, pred)
    }

    fn wait_ready(&mut self, i: usize) -> Result<Status> {
        self.wait_status(i, "phase ready", |s| s.phase == Phase::Ready)
    }

    /// Asks node `i`'s agent for its status over the test LAN.
    fn query(&self, addr: &str) -> Result<Status> {
        let out = self.agent_cli(&["status", "--json", "--addr", &format!("{addr}:9743")])?;
        if !out.status.success() {
            bail!("status query failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Asks node `addr` until its status satisfies `pred` (the agent's view moves every few
    /// seconds); the last status in the error otherwise.
    fn query_until(&self, addr: &str, what: &str, pred: impl Fn(&Status) -> bool) -> Result<Status> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.query(addr)?;
            if pred(&s) {
                return Ok(s);
            }
            if std::time::Instant::now() > deadline {
                bail!("{addr}: {what} not seen within 60 s; last status: {}", serde_json::to_string(&s)?);
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Runs the agent's CLI on the host, inside the LAN's namespace.
    fn agent_cli(&self, args: &[&str]) -> Result<Output> {
        let bin = workspace_root().join("target/release/labforge-agent");
        Ok(self.lan.command(bin.to_str().unwrap()).args(args).output()?)
    }

    /// Every running node finished booting with no failed unit, and its console shows no
    /// kernel trouble.
    fn check_health(&mut self) -> Result<()> {
        for n in &mut self.nodes {
            if let Some(vm) = &mut n.vm {
                vm.wait_booted(FORM)?;
                vm.check_console_health()?;
            }
        }
        Ok(())
    }

    /// The cluster secret baked into the test image.
    fn secret_file(&self) -> PathBuf {
        self.secret.clone()
    }
}

/// A node's address on the test LAN, from its status.
fn lan_ip(s: &Status) -> String {
    let ip = s.lan_address.clone().expect("a ready node has its LAN address");
    assert!(ip.starts_with(lan::SUBNET), "{ip}");
    ip
}

/// What the kubeadm double printed on a node's console: (argv, config) per call, and the CA
/// hash of an init.
struct KubeadmCalls {
    argv: Vec<Vec<String>>,
    configs: Vec<String>,
    ca_hash: Option<String>,
}

fn kubeadm_calls(vm: &Vm) -> KubeadmCalls {
    let b64 = |s: &str| String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s.trim()).unwrap()).unwrap();
    let mut calls = KubeadmCalls { argv: Vec::new(), configs: Vec::new(), ca_hash: None };
    for l in vm.console() {
        if let Some(r) = l.split("kubeadm-double argv ").nth(1) {
            calls.argv.push(b64(r).lines().map(str::to_string).collect());
        } else if let Some(r) = l.split("kubeadm-double config ").nth(1) {
            calls.configs.push(b64(r));
        } else if let Some(r) = l.split("kubeadm-double ca-hash ").nth(1) {
            calls.ca_hash = Some(r.trim().to_string());
        }
    }
    calls
}

fn docs(config: &str) -> Vec<Value> {
    config.split("\n---\n").map(|d| serde_json::from_str(d).expect("JSON documents")).collect()
}

/// Boots `n` nodes and waits until all are ready; returns their ready statuses. The first is
/// the PC cabled to the building network too (an uplink), preferred as master by its LAN MAC
/// (`master-priority` on its stick), as a lab's admin sets up the one PC with the uplink.
fn form(room: &mut Room, n: usize) -> Result<Vec<Status>> {
    room.boot_full(Some("[cluster]\nmaster-priority = [\"52:54:00:77:00:01\"]\n"), None, 0, true)?;
    for _ in 1..n {
        room.boot(None, None)?;
    }
    (0..n).map(|i| room.wait_ready(i)).collect()
}

/// The master's init, as recorded by the double: (token, CA hash).
fn master_init(room: &Room, master: usize, master_ip: &str) -> Result<(String, String)> {
    if real_kubeadm() {
        return Ok((String::new(), String::new()));
    }
    let calls = kubeadm_calls(room.nodes[master].vm.as_ref().unwrap());
    assert_eq!(
        calls.argv,
        vec![vec!["init".to_string(), "--config".into(), "/var/lib/labforge/kubeadm/init.yaml".into()]]
    );
    let d = docs(calls.configs.first().context("init config recorded")?);
    assert_eq!(d[0]["kind"], "InitConfiguration");
    assert_eq!(d[0]["localAPIEndpoint"]["advertiseAddress"], master_ip, "node IP pinned");
    assert_eq!(d[0]["nodeRegistration"]["kubeletExtraArgs"][0]["value"], master_ip);
    assert_eq!(d[1]["controlPlaneEndpoint"], "lab-api:6443");
    assert_eq!(d[1]["clusterName"], "lab");
    let token = d[0]["bootstrapTokens"][0]["token"].as_str().unwrap().to_string();
    Ok((token, calls.ca_hash.context("CA hash recorded")?))
}

fn assert_joined_with(room: &Room, worker: usize, token: &str, ca_hash: &str, hostname: &str) {
    if real_kubeadm() {
        return;
    }
    let calls = kubeadm_calls(room.nodes[worker].vm.as_ref().unwrap());
    let want: Vec<String> =
        ["join", "--config", "/var/lib/labforge/kubeadm/join.yaml"].iter().map(|s| s.to_string()).collect();
    let config: Value = serde_json::from_str(calls.configs.first().expect("join config recorded")).unwrap();
    let discovery = &config["discovery"]["bootstrapToken"];
    assert_eq!(discovery["apiServerEndpoint"], "lab-api:6443");
    assert_eq!(discovery["token"], token, "the token is in the 0600 file, not on the command line");
    assert_eq!(discovery["caCertHashes"], serde_json::json!([ca_hash]), "pinned to the master's CA");
    assert_eq!(config["nodeRegistration"]["name"], hostname);
    assert_eq!(config["nodeRegistration"]["criSocket"], "unix:///run/containerd/containerd.sock");
    assert_eq!(calls.argv, vec![want], "worker {worker} ran exactly one kubeadm join, pinned to the master's CA");
}

fn roles(statuses: &[Status]) -> (usize, Vec<usize>) {
    let masters: Vec<usize> = (0..statuses.len()).filter(|&i| statuses[i].role == Role::Master).collect();
    assert_eq!(masters.len(), 1, "exactly one master: {:?}", statuses.iter().map(|s| &s.role).collect::<Vec<_>>());
    let workers = (0..statuses.len()).filter(|&i| statuses[i].role == Role::Worker).collect();
    (masters[0], workers)
}

/// One room, one cluster, every check in turn (each boot costs minutes under TCG, so one
/// cluster serves them all): three PCs powered on together on a bare switch (no DHCP server)
/// find each other link-local, elect one master, which takes the LAN's first address and
/// leases the others theirs, and form one cluster; the master is the room's gateway; a PC
/// powered on later joins it; a PC with another cluster's secret is ignored; a PC whose clock
/// is ten minutes ahead takes its time from the master and joins; the whole room's power is
/// cut and comes back, and the cluster and every address in it are the same.
#[test]
fn one_room_forms_and_keeps_one_cluster() -> Result<()> {
    let mut room = Room::new("one_room")?;

    // Three nodes powered on together elect exactly one master.
    let ready = form(&mut room, 3)?;
    let (master, workers) = roles(&ready);
    assert_eq!(workers.len(), 2);
    let uid = ready[master].cluster_uid.clone().unwrap();
    let join = ready[master].join_info_sha256.clone().unwrap();
    for s in &ready {
        assert_eq!(s.cluster_uid.as_deref(), Some(uid.as_str()), "one cluster");
        assert_eq!(s.join_info_sha256.as_deref(), Some(join.as_str()), "workers got the join info the master minted");
        assert_eq!(s.kubernetes, Kubernetes::Enabled);
    }
    let master_ip = ready[master].master_address.clone().unwrap();
    assert!(master_ip.starts_with(lan::SUBNET), "{master_ip}");
    let (token, ca_hash) = master_init(&room, master, &master_ip)?;
    for &w in &workers {
        assert_eq!(ready[w].master_address.as_deref(), Some(master_ip.as_str()));
        assert_joined_with(&room, w, &token, &ca_hash, &ready[w].node.hostname);
    }
    // The room had no DHCP server: the nodes found each other link-local, and the master took
    // the LAN's first address and serves the LAN; every other node has the address the master
    // pinned to its MAC, and kubeadm was given exactly that one.
    assert_eq!(master_ip, format!("{}.1", lan::SUBNET), "the master takes the first address of lan-cidr");
    let mac = |s: &Status| s.node.nics.first().expect("a NIC").mac.to_ascii_lowercase();
    let m = room.query_until(&master_ip, "every worker's lease pinned", |m| {
        let leases = m.network.serving.as_ref().map(|s| s.leases.clone()).unwrap_or_default();
        workers
            .iter()
            .all(|&w| leases.iter().any(|l| l.mac == mac(&ready[w]) && l.address.to_string() == lan_ip(&ready[w])))
    })?;
    assert_eq!(m.network.addressing, Addressing::Served, "{:?}", m.network);
    let serving = m.network.serving.clone().expect("the master serves the LAN");
    assert_eq!(serving.state, ServeState::Serving, "{serving:?}");
    assert_eq!((serving.lan.as_str(), serving.gateway.as_str()), ("10.77.0.0/24", master_ip.as_str()));
    for &w in &workers {
        assert_eq!(ready[w].network.addressing, Addressing::Leased, "{:?}", ready[w].network);
    }
    // One DHCP server on this LAN, the master; its DNS names every node and the API endpoint.
    assert_eq!(room.lan.dhcp_servers()?, vec![master_ip.clone()], "only the master answers DHCP");
    for &w in &workers {
        let name = &ready[w].node.hostname;
        assert_eq!(room.lan.resolve(&master_ip, name)?, Some(lan_ip(&ready[w])), "{name} through the master's DNS");
    }
    assert_eq!(room.lan.resolve(&master_ip, "lab-api")?, Some(master_ip.clone()), "lab-api through the master's DNS");
    let shown = room.agent_cli(&["network", "--addr", &format!("{master_ip}:9743")])?;
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("serving    10.77.0.0/24 as 10.77.0.1 (serving)"), "{shown}");
    assert!(shown.contains(&format!("leases     {} of 253", serving.leases.len())), "{shown}");

    // The master is the room's gateway: its uplink (the NIC with the default route, never the
    // LAN's) masquerades the LAN; a worker resolves www.outside.test through the master's DNS
    // (forwarded to the uplink's resolver) and fetches a file from it through the NAT. From
    // the outside only the admitted ports get an answer: SSH (admitted, nothing listens:
    // refused), the agent's port (not admitted: silence), though the LAN reaches it.
    assert_eq!(master, 0, "the PC preferred by master-priority leads");
    let up = serving.uplink.clone().expect("the master's uplink");
    assert!(up.nat, "{up:?}");
    assert_eq!(up.admitted, vec![22, 80], "SSH and the portal (the demo image has no stack)");
    assert_ne!(Some(up.interface.as_str()), m.network.interface.as_deref(), "the LAN is never the uplink");
    let up_ip = up.address.clone().expect("the uplink's leased address");
    assert!(up_ip.starts_with("192.168.200."), "{up_ip}");
    let fetched = room.vm(workers[0]).wait_for("uplink-check:", FORM)?;
    assert!(
        fetched.contains(&format!("fetched {} from {}", lan::OUTSIDE_HELLO, lan::OUTSIDE_HOST)),
        "a worker reached the outside through the master: {fetched}"
    );
    assert_eq!(room.lan.tcp(&up_ip, 22)?, lan::Tcp::Refused, "SSH is admitted on the uplink");
    assert_eq!(room.lan.tcp(&up_ip, 9743)?, lan::Tcp::Silent, "the agent's port is not, from the outside");
    assert_eq!(room.lan.tcp(&master_ip, 9743)?, lan::Tcp::Open, "the LAN reaches it");

    // Every node's data disk, by its by-id path, in the master's register (the CephCluster's list).
    let want: std::collections::BTreeMap<String, Vec<String>> =
        (0..3).map(|i| (ready[i].node.hostname.clone(), vec![format!("/dev/disk/by-id/virtio-lf-data{i}")])).collect();
    let s = room.wait_status(master, "the CephCluster lists every node's disk", |s| {
        s.ceph.as_ref().is_some_and(|c| c.nodes == want)
    })?;
    assert_eq!(s.ceph.unwrap().register, "/var/lib/labforge/ceph-devices.json");
    room.check_health()?;

    // A node powered on later joins the running cluster as a worker.
    let late = room.boot(None, None)?;
    let s = room.wait_ready(late)?;
    assert_eq!(s.role, Role::Worker);
    assert_eq!(s.cluster_uid.as_deref(), Some(uid.as_str()));
    assert_eq!(s.join_info_sha256, ready[master].join_info_sha256);
    assert_joined_with(&room, late, &token, &ca_hash, &s.node.hostname);
    // The image has no kubectl (the kubeadm double only): the API section says so, and
    // pretends nothing.
    if !real_kubeadm() {
        let m = room.query(&master_ip)?;
        let api = m.kube_api.expect("the kube_api section on a node with Kubernetes enabled");
        assert_eq!(api.state, labforge_agent::cluster::api::ApiState::Unavailable, "{api:?}");
        assert_eq!((api.message.as_str(), api.node_ready), ("kubectl is not in this image", None));
    }
    // (node, ready status) of every member so far.
    let mut members: Vec<(usize, Status)> = ready.iter().cloned().enumerate().collect();
    members.push((late, s));

    // Same image, but the stick carries another cluster's secret.
    let rogue_secret = labforge_agent::secret::Secret::generate()?.to_hex();
    let rogue = room.boot(None, Some(&rogue_secret))?;
    let r = room.wait_status(rogue, "rogue electing", |s| s.phase == Phase::Electing)?;
    assert!(r.peers.is_empty(), "the rogue hears nobody: {:?}", r.peers);
    let rogue_id = r.node_id.clone();

    // It never appears in any peer's view; its beacons are counted as forged.
    let m = room.query(&master_ip)?;
    assert!(m.counters.beacons_rejected_bad_mac > 0, "{:?}", m.counters);
    for (_, s) in &members {
        let now = room.query(&lan_ip(s))?;
        assert!(now.peers.iter().all(|p| p.id != rogue_id), "rogue in {}'s view", s.node.hostname);
        assert_eq!(now.peers.len(), members.len() - 1, "{}'s peers: {:?}", s.node.hostname, now.peers);
    }

    // Join info: refused with the rogue's secret, served with the cluster's.
    let dir = tempfile::tempdir()?;
    let rogue_file = dir.path().join("rogue.secret");
    labforge_agent::secret::Secret::parse(&rogue_secret)?.write_new(&rogue_file)?;
    let refused = room.agent_cli(&[
        "join-info",
        "--master",
        &format!("{master_ip}:9743"),
        "--secret-file",
        rogue_file.to_str().unwrap(),
    ])?;
    assert!(!refused.status.success(), "join info must not be served to the rogue");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("403"), "{}", String::from_utf8_lossy(&refused.stderr));
    let served = room.agent_cli(&[
        "join-info",
        "--master",
        &format!("{master_ip}:9743"),
        "--secret-file",
        room.secret_file().to_str().unwrap(),
    ])?;
    assert!(served.status.success(), "{}", String::from_utf8_lossy(&served.stderr));
    let after = room.query(&master_ip)?;
    assert!(after.counters.join_rejected >= 1 && after.counters.join_served >= 4, "{:?}", after.counters);
    // Done with the rogue: its CPU is worth more to the boots below.
    room.nodes[rogue].vm.take().unwrap().power_cut()?;

    // A PC whose clock is 10 minutes ahead, set to form a cluster on its own: every authentic
    // beacon it hears is stale to it. It says so, with the offset, and claims nothing; it takes
    // its time from the committed master it hears (chrony), and then joins as a worker.
    let skewed = room.boot_with(Some("[cluster]\nminimum-nodes = 1\nsettle-seconds = 15\n"), None, 600)?;
    let s = room.wait_status(skewed, "clock skew", |s| s.clock_skew.is_some())?;
    let skew = s.clock_skew.clone().expect("the skew in the status");
    assert!((-660..=-540).contains(&skew.offset_seconds), "{skew:?}");
    let joined = room.wait_status(skewed, "joined once its clock was set", |s| s.phase == Phase::Ready)?;
    assert_eq!(joined.role, Role::Worker, "{}", joined.message);
    assert_eq!(joined.cluster_uid.as_deref(), Some(uid.as_str()), "the master's cluster, not one of its own");
    let master_addr: std::net::Ipv4Addr = master_ip.parse()?;
    let time = room.query(&lan_ip(&joined))?.time.expect("the time section");
    assert_eq!(time.source, TimeSource::Follow { server: master_addr }, "{}", time.message);
    // It never claimed: no status line it printed says master, or a cluster of its own.
    for line in room.vm(skewed).console().to_vec() {
        if let Some(st) = qemu_tests::vm::parse_status(&line) {
            assert_ne!(st.role, Role::Master, "{line}");
            assert!(st.cluster_uid.is_none() || st.cluster_uid.as_deref() == Some(uid.as_str()), "{line}");
        }
    }
    // The master serves time to the LAN, saw the skewed beacons, and kept leading.
    let m = room.query(&master_ip)?;
    assert_eq!((m.phase, m.role), (Phase::Ready, Role::Master));
    assert!(matches!(m.time.map(|t| t.source), Some(TimeSource::Serve { .. })));
    assert!(m.counters.beacons_rejected_stale > 0, "{:?}", m.counters);
    room.check_health()?;
    // Done with it and with the late PC: they leave the room (the skewed clock would be ten
    // minutes off again on every boot), and the power cut below takes the three PCs that
    // formed the cluster, all of them at once (more booting together than that is more than
    // two emulated cores can boot in reasonable time).
    for i in [skewed, late] {
        room.nodes[i].vm.take().unwrap().power_cut()?;
    }
    members.retain(|(i, _)| *i != late);

    // The power goes out in the whole room, and comes back: the same cluster, no second
    // init, every worker stayed joined (each ran kubeadm join exactly once), and each node
    // has the address it had — the master takes its own again (it remembers the LAN it
    // served), and leases every other PC the one pinned to its MAC.
    let everyone: Vec<usize> = members.iter().map(|(i, _)| *i).collect();
    for &i in &everyone {
        room.nodes[i].vm.take().unwrap().power_cut()?;
    }
    for &i in &everyone {
        let cfg = room.nodes[i].cfg.clone();
        room.nodes[i].vm = Some(Vm::restart(&cfg, &room.dir)?);
    }
    let back = room.wait_ready(master)?;
    assert_eq!(back.role, Role::Master);
    assert_eq!(back.cluster_uid.as_deref(), Some(uid.as_str()), "same cluster after the power cut");
    assert_eq!(back.lan_address.as_deref(), Some(master_ip.as_str()), "the master took its address again");
    let calls = kubeadm_calls(room.nodes[master].vm.as_ref().unwrap());
    assert!(calls.argv.is_empty() || real_kubeadm(), "no second kubeadm init: {:?}", calls.argv);
    for (node, before) in members.iter().filter(|(i, _)| *i != master) {
        let back = room.wait_ready(*node)?;
        assert_eq!(back.lan_address, before.lan_address, "{} got its pinned address again", before.node.hostname);
    }
    for (node, s) in members.iter().filter(|(i, _)| *i != master) {
        let now = room.query(&lan_ip(s))?;
        assert_eq!(now.role, Role::Worker);
        assert_eq!(now.cluster_uid.as_deref(), Some(uid.as_str()));
        assert_eq!(now.phase, Phase::Ready, "{} stayed joined", s.node.hostname);
        if !real_kubeadm() {
            let argv = kubeadm_calls(room.nodes[*node].vm.as_ref().unwrap()).argv;
            // This boot's console: the join of the first boot is not done again.
            assert!(argv.is_empty(), "{} joined once, before the power cut: {argv:?}", s.node.hostname);
        }
    }
    assert_eq!(room.lan.dhcp_servers()?, vec![master_ip.clone()], "still one DHCP server after the power cut");
    // And it is the room's gateway again.
    let m = room.query_until(&master_ip, "the uplink's NAT back", |m| {
        m.network.serving.as_ref().and_then(|s| s.uplink.as_ref()).is_some_and(|u| u.nat)
    })?;
    assert_eq!(m.network.addressing, Addressing::Served, "{:?}", m.network);
    room.check_health()
}
