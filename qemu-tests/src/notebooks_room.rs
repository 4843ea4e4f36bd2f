//! One PC of `qemu-tests/images/notebooks.toml` on a bare switch, and the student's browser on
//! its LAN: the room `tests/notebooks_room.rs` checks and `labforge-bench-notebooks` times.
//! Everything a student does goes through the hub's NodePort with `hub_client.py` and
//! `gateway_client.py` (`qemu-tests/notebooks/`), run with the hub's pinned Python inside the
//! LAN's namespace; what an administrator does goes through SSH and kubectl on the master.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use labforge_agent::stack::plan::State;
use labforge_agent::status::{Phase, Status};
use serde_json::{json, Value};

use crate::kubernetes::{KubeImage, Remote};
use crate::lan::{self, Lan};
use crate::poll;
use crate::vm::{Net, Vm, VmConfig};

/// Power-on to a Ready node under TCG (see real_cluster.rs), with ~1 GB more images to import
/// (13 minutes of the first boot here).
pub const UP: Duration = Duration::from_secs(60 * 60);
/// The stack applied and its Deployments ready; a server or a kernel starting.
pub const SETTLE: Duration = Duration::from_secs(40 * 60);
pub const HUB_PORT: u16 = 30800;
pub const HOMES: &str = "/var/lib/labforge/homes";

/// The code alice runs: who it runs as, its cgroup's limits, its Python; then a file in her
/// home.
pub const CODE: &str = "import os, sys\n\
cg = lambda f: open('/sys/fs/cgroup/' + f).read().strip()\n\
print(os.getuid(), os.getgid(), cg('cpu.max'), cg('memory.max'), sys.prefix)\n\
open(os.path.expanduser('~/proof.txt'), 'w').write('alice-was-here')\n";

pub struct Room {
    // Drop order: the VM first, then the LAN (in `remote`), then the lock.
    pub vm: Option<Vm>,
    cfg: VmConfig,
    pub remote: Remote,
    pub dir: PathBuf,
    python: PathBuf,
    _one_at_a_time: nix::fcntl::Flock<std::fs::File>,
}

impl Room {
    pub fn new(built: &KubeImage) -> Result<Room> {
        let lock = crate::exclusive()?;
        let dir = crate::vm::scenario_dir("notebooks_room")?;
        let mut lan = Lan::bare("nbroom", &dir)?;
        let tap = lan.tap()?;
        let mut cfg = VmConfig::new("node0", &built.image.image);
        // Two vCPUs, one per host core (a third vCPU thread on two cores left the guest
        // spinning on locks held by a descheduled vCPU: half its time in the kernel, the stack
        // not ready in 20 minutes). The scheduler then has 2 CPUs for the control plane
        // (0.86 requested) and at most one server and one kernel at a time (0.5 each, their
        // project's minimum): the scenario stops each kernel before the next.
        (cfg.memory_mib, cfg.cpus) = (6144, 2);
        cfg.net = Net::Tap { ns: lan.ns.clone(), tap, mac: "52:54:00:7a:00:01".into() };
        let mut remote = Remote::new(lan, &built.ssh_key);
        // The master of a bare switch takes the first address of the spec's `lan-cidr`: known
        // before it reports Ready, so a failed wait still gets its journal.
        remote.addr = "10.77.0.1".into();
        let python = crate::notebooks::hub_programs()?.python;
        Ok(Room { vm: None, cfg, remote, dir, python, _one_at_a_time: lock })
    }

    pub fn power_on(&mut self) -> Result<()> {
        let fresh = !self.dir.join("node0-console.log").exists();
        self.vm = Some(if fresh { Vm::start(&self.cfg, &self.dir)? } else { Vm::restart(&self.cfg, &self.dir)? });
        Ok(())
    }

    pub fn power_cut(&mut self) -> Result<()> {
        self.vm.take().expect("running").power_cut()
    }

    pub fn wait_ready(&mut self, what: &str) -> Result<Status> {
        let s = self.vm.as_mut().expect("running").wait_status(what, UP, |s| s.phase == Phase::Ready)?;
        self.remote.addr = s.lan_address.clone().context("a ready node has a LAN address")?;
        assert!(self.remote.addr.starts_with(lan::SUBNET), "{}", self.remote.addr);
        Ok(s)
    }

    pub fn kubectl(&self, args: &str, stdin: &str) -> Result<String> {
        self.remote.run(&format!("kubectl {args}"), stdin)
    }

    pub fn hub(&self) -> String {
        format!("http://{}:{HUB_PORT}", self.remote.addr)
    }

    /// One of the test's clients (`qemu-tests/notebooks/<script>`), run on the LAN; its JSON.
    pub fn client(&self, script: &str, args: &[&str]) -> Result<Value> {
        let path = crate::workspace_root().join("qemu-tests/notebooks").join(script);
        let out = self
            .remote
            .lan
            .command(self.python.to_str().context("utf-8 path")?)
            .arg(path)
            .args(args)
            .output()
            .with_context(|| format!("running {script}"))?;
        if !out.status.success() {
            bail!("{script} {:?} failed: {}", &args[..1], String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{script} said {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// The hub's API as `token`.
    pub fn hub_api(&self, token: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let (hub, body) = (self.hub(), body.map(|b| b.to_string()));
        let mut args = vec!["api", hub.as_str(), token, method, path];
        args.extend(body.as_deref());
        self.client("hub_client.py", &args)
    }

    /// `user`'s server's API (jupyter-server behind the hub's proxy), as a browser's notebook
    /// calls it.
    pub fn server_api(&self, user: &str, token: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let base = format!("{}/user/{user}", self.hub());
        let body = body.map(|b| b.to_string());
        let mut args = vec!["call", base.as_str(), token, method, path];
        args.extend(body.as_deref());
        self.client("gateway_client.py", &args)
    }

    /// The password the master made for `user` (an admin reads it with kubectl).
    pub fn password(&self, user: &str) -> Result<String> {
        let pw = self.kubectl(
            &format!("-n labforge-notebooks get secret hub-passwords -o jsonpath='{{.data.{user}}}' | base64 -d"),
            "",
        )?;
        assert!(pw.len() >= 16, "{user}'s password is a real one");
        Ok(pw)
    }

    /// Logs `user` in and gets an API token, as the hub's token page does.
    pub fn token(&self, user: &str, password: &str) -> Result<String> {
        let t = self.client("hub_client.py", &["token", &self.hub(), user, password])?;
        assert_eq!(t["status"], 201, "{user}'s token: {t}");
        Ok(t["token"].as_str().context("a token")?.to_string())
    }

    /// Starts `user`'s server in `project` (unless it runs) and waits until the hub says it is
    /// ready; how long that took.
    pub fn server_up(&self, user: &str, token: &str, project: &str) -> Result<Duration> {
        let started = Instant::now();
        let path = format!("/hub/api/users/{user}");
        let model = self.hub_api(token, "GET", &path, None)?;
        if model["body"]["servers"].get("").is_none() {
            let r = self.hub_api(token, "POST", &format!("{path}/server"), Some(&json!({"profile": project})))?;
            assert!(r["status"] == 201 || r["status"] == 202, "{user}'s server in {project}: {r}");
        }
        // Every second: the benchmark's login figure is taken here. A server that was pending
        // and is gone failed to start (the hub gave up and deleted its pod): said at once.
        let mut seen = false;
        let gone = poll(&format!("{user}'s server ready"), SETTLE, Duration::from_secs(1), || {
            let m = self.hub_api(token, "GET", &path, None).map_err(|e| format!("{e:#}"))?;
            match &m["body"]["servers"][""] {
                s if s["ready"] == true => Ok(None),
                Value::Null if seen => Ok(Some(format!("{user}'s server stopped before it was ready: {m}"))),
                Value::Null => Err(format!("no server yet: {m}")),
                s => {
                    seen = true;
                    Err(format!("pending: {s}"))
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.pods_of(project)))?;
        if let Some(why) = gone {
            bail!("{why}\n{}", self.pods_of(project));
        }
        Ok(started.elapsed())
    }

    /// A project's pods and events, for failure messages.
    pub fn pods_of(&self, project: &str) -> String {
        let cmd = format!("-n lab-{project} get pods -o wide; kubectl -n lab-{project} get events --sort-by=.lastTimestamp | tail -20; kubectl -n labforge-notebooks logs deploy/hub --tail=40");
        self.kubectl(&cmd, "").unwrap_or_else(|e| format!("{e:#}"))
    }

    /// `cmd` (`sh -c`) in `user`'s server pod, as the pod's user; its output.
    pub fn in_server(&self, project: &str, user: &str, cmd: &str, stdin: &str) -> Result<String> {
        let quoted = cmd.replace('\'', r"'\''");
        self.kubectl(&format!("-n lab-{project} exec -i notebook-{user} -- sh -c '{quoted}'"), stdin)
    }

    /// Keeps the node's journal (agent, kubelet, containerd) and the notebooks pods' logs
    /// beside the console log.
    pub fn journal(&self) {
        let cmd = "sudo journalctl -b -o short-monotonic --no-pager -u labforge-agent -u kubelet -u containerd";
        if let Ok(text) = self.remote.run(cmd, "") {
            let _ = std::fs::write(self.dir.join("node0-journal.log"), text);
        }
        let pods = "-n labforge-notebooks logs --all-containers --prefix --tail=400 -l 'app.kubernetes.io/name in (hub,proxy,gateway)'";
        if let Ok(text) = self.kubectl(pods, "") {
            let _ = std::fs::write(self.dir.join("node0-notebooks.log"), text);
        }
    }
}

/// Builds the notebooks image, brings up its room and runs `f` in it; on failure the node's
/// journal and the notebooks pods' logs are kept (see [`Room::journal`]). With
/// `LABFORGE_KEEP_ROOM` set, a failed room stays up (its VM and LAN) until the file `release`
/// appears in its directory, so the rest of a 40-minute boot can be looked at by hand.
pub fn in_room<T>(f: impl FnOnce(&mut Room) -> Result<T>) -> Result<T> {
    let built = crate::kubernetes::notebooks_test_image()?;
    let mut room = Room::new(&built)?;
    // A failed assertion counts as a failure too (the room's logs kept, the room kept up).
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut room))).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        Err(anyhow::anyhow!("{what}"))
    });
    if let Err(e) = &result {
        room.journal();
        if std::env::var_os("LABFORGE_KEEP_ROOM").is_some() && room.vm.is_some() {
            let release = room.dir.join("release");
            eprintln!(
                "notebooks room: failed ({e:#}); kept up at {} in netns {} until {} exists",
                room.remote.addr,
                room.remote.lan.ns,
                release.display()
            );
            while !release.exists() {
                std::thread::sleep(Duration::from_secs(5));
            }
            let _ = std::fs::remove_file(release);
        }
    }
    result
}

/// The master's stack: every component ready.
pub fn stack_ready(s: &Status) -> bool {
    s.stack.as_ref().is_some_and(|st| {
        st.components.len() == 3 && st.components.iter().all(|c| c.state == State::Ready && c.failures == 0)
    })
}

/// The kernel names of a kernelspecs answer, sorted.
pub fn spec_names(v: &Value) -> Vec<String> {
    let mut names: Vec<String> =
        v["body"]["kernelspecs"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    names.sort();
    names
}
