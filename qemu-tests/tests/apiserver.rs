//! The stack against a real API server (upstream Kubernetes built from its Go modules) running on
//! loopback: no VMs, so it fits in `make test`. One control plane serves every check.
//!
//! - Every built-in component, rendered with a lab roster as a build renders it, is accepted by
//!   a strict server-side apply (CRDs and namespaces for real, everything else dry-run), with no
//!   warning.
//! - The `projects` component's limits hold against the API server's own admission: a kernel
//!   asking for more than its project allows is refused, one asking for nothing gets the
//!   project's limits, the project's total is enforced, and a privileged pod is refused.
//! - The `notebooks` component's hub (JupyterHub and KubeSpawner from PyPI, the proxy from npm,
//!   run with the configuration the component renders) logs in roster users only, each with
//!   their own password, and starts a user's server in their project's namespace, as their uid,
//!   within its limits; a project the user is not a member of is refused.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::Result;
use labforge_core::stack::{ClusterFacts, ResolvedComponent};
use qemu_tests::apiserver::{free_port, ControlPlane};
use qemu_tests::kubernetes::{self, no_warnings};
use serde_json::{json, Value};

const ROSTER: &str = r#"
[[projects]]
name = "p1"
cpu-min = "0.5"
cpu-max = "1"
memory-min = "256Mi"
memory-max = "512Mi"
quota-cpu = "2"
quota-pods = 4

[[projects]]
name = "p2"
cpu-min = "1"
cpu-max = "2"
memory-min = "512Mi"
memory-max = "2Gi"

[[users]]
name = "alice"
uid = 2001
projects = ["p1"]

[[users]]
name = "bob"
uid = 2002
projects = ["p2"]
admin = true
"#;

const BUILT_IN: [&str; 5] = ["storage", "monitoring", "rook-ceph", "projects", "notebooks"];

/// A List of `items` as kubectl reads it.
fn list(items: &[&Value]) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

const APPLY: &str = "apply --server-side --validate=strict --field-manager=labforge-test -f -";
const DRY_RUN: &str = "apply --server-side --validate=strict --field-manager=labforge-test --dry-run=server -f -";

/// Every built-in component, resolved and fetched as a build does it (Rook's files from a
/// loopback mirror of its Go module's copy, each checked against its pin) and proven
/// air-gapped; rendered with the roster.
fn built_in_stack(lab: &labforge_core::lab::Lab) -> Result<(Vec<ResolvedComponent>, ClusterFacts)> {
    let examples = kubernetes::rook_examples()?;
    let mirror = kubernetes::FileServer::start(&examples, 0)?;
    let mut spec: labforge::spec::StackSpec = toml::from_str(&format!("components = {BUILT_IN:?}"))?;
    for f in ["crds", "common", "csi-operator"] {
        spec.upstream.insert(format!("rook-ceph.{f}"), format!("http://{}/{f}.yaml", mirror.addr));
    }
    let mut components = labforge::build::stack::resolve(&spec)?;
    let cache = tempfile::tempdir()?;
    labforge::build::stack::fetch_upstream(&mut components, cache.path(), false)?;
    let mut facts = ClusterFacts::at_build("10.244.0.0/16", "10.96.0.0/12", kubernetes::VERSION);
    facts.components = BUILT_IN.iter().map(|s| s.to_string()).collect();
    facts.lab = lab.view()?;
    facts.ceph_devices.insert("node".into(), vec!["/dev/disk/by-id/virtio-lab-data".into()]);
    let declared: Vec<(String, String)> =
        labforge::build::stack::declared_images(&components).into_iter().map(|r| (r, String::new())).collect();
    labforge::build::stack::check(&mut components, &facts, &declared)?;
    Ok((components, facts))
}

fn pod(name: &str, namespace: &str, resources: Value, privileged: bool) -> String {
    let mut container = json!({"name": "kernel", "image": "registry.lab/kernel:1", "resources": resources});
    if privileged {
        container["securityContext"] = json!({"privileged": true});
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": [container]},
    })
    .to_string()
}

#[test]
fn the_api_server_accepts_the_stack_and_enforces_each_projects_limits() -> Result<()> {
    let lab: labforge_core::lab::Lab = toml::from_str(ROSTER)?;
    let (components, facts) = built_in_stack(&lab)?;
    let fixture = kubernetes::control_plane_fixture("kubernetes-control-plane")?;
    let cp = ControlPlane::start(&fixture)?;

    // Every component: namespaces and CRDs for real (what the rest needs to exist), then the
    // rest in a strict dry run; `projects` for real, as its limits are checked next.
    for c in &components {
        let rendered = labforge_core::stack::render(c, &facts)?;
        // The hub's account and its Roles for real too: the hub below runs with that account's
        // token, so a verb its Roles lack fails the test.
        let hub_rbac = ["ServiceAccount", "Role", "RoleBinding"];
        let real_kinds = |o: &&Value| {
            o["kind"] == "Namespace"
                || o["kind"] == "CustomResourceDefinition"
                || (c.name == "notebooks" && hub_rbac.iter().any(|k| o["kind"] == *k))
        };
        let (real, dry): (Vec<&Value>, Vec<&Value>) = if c.name == "projects" {
            (rendered.objects.iter().collect(), Vec::new())
        } else {
            rendered.objects.iter().partition(real_kinds)
        };
        if !real.is_empty() {
            no_warnings(cp.kubectl_ok(APPLY, &list(&real))?)?;
            if real.iter().any(|o| o["kind"] == "CustomResourceDefinition") {
                cp.kubectl_ok("wait --for=condition=Established --timeout=120s crd --all", "")?;
            }
        }
        if !dry.is_empty() {
            let out = no_warnings(cp.kubectl_ok(DRY_RUN, &list(&dry))?)?;
            let accepted = out.lines().filter(|l| l.ends_with("serverside-applied (server dry run)")).count();
            assert_eq!(accepted, dry.len(), "component {}: every object accepted:\n{out}", c.name);
        }
        eprintln!("{}: {} objects applied, {} accepted in a dry run", c.name, real.len(), dry.len());
    }

    // The projects: a namespace each, labelled, with its limits.
    let ns = cp.kubectl_ok("get namespace -l labforge.io/project -o name", "")?;
    assert_eq!(ns.split_whitespace().collect::<Vec<_>>(), ["namespace/lab-p1", "namespace/lab-p2"]);
    cp.kubectl_ok("-n lab-p2 get limitrange project-limits", "")?;
    assert!(
        cp.kubectl_refused("-n lab-p2 get resourcequota project-total", "")?.contains("NotFound"),
        "p2 sets no total, so it has no quota"
    );

    // More than the project's maximum is refused by the API server, whatever the client asks.
    let e = cp.kubectl_refused("create -f -", &pod("greedy-cpu", "lab-p1", json!({"limits": {"cpu": "2"}}), false))?;
    assert!(e.contains("maximum cpu usage per Container is 1, but limit is 2"), "{e}");
    let e = cp
        .kubectl_refused("create -f -", &pod("greedy-memory", "lab-p1", json!({"limits": {"memory": "1Gi"}}), false))?;
    assert!(e.contains("maximum memory usage per Container"), "{e}");
    let e = cp.kubectl_refused(
        "create -f -",
        &pod("stingy", "lab-p1", json!({"requests": {"cpu": "100m"}, "limits": {"cpu": "1"}}), false),
    )?;
    assert!(e.contains("minimum cpu usage per Container is 500m, but request is 100m"), "{e}");
    let e = cp.kubectl_refused("create -f -", &pod("root-of-all", "lab-p1", json!({}), true))?;
    assert!(e.contains("violates PodSecurity \"baseline:latest\"") && e.contains("privileged"), "{e}");

    // A kernel that asks for nothing gets the project's maximum as its limit and its minimum as
    // its request.
    let quota_known = || {
        let o = cp.kubectl("-n lab-p1 get resourcequota project-total -o jsonpath={.status.hard.pods}", "");
        match o {
            Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "4" => Ok(()),
            Ok(o) => Err(format!("status.hard.pods = {:?}", String::from_utf8_lossy(&o.stdout))),
            Err(e) => Err(format!("{e:#}")),
        }
    };
    qemu_tests::poll(
        "the quota controller to count project p1",
        Duration::from_secs(120),
        Duration::from_secs(1),
        quota_known,
    )?;
    cp.kubectl_ok("create -f -", &pod("kernel-1", "lab-p1", json!({}), false))?;
    let got: Value = serde_json::from_str(&cp.kubectl_ok("-n lab-p1 get pod kernel-1 -o json", "")?)?;
    let r = &got["spec"]["containers"][0]["resources"];
    let cpu = |v: &Value| labforge_core::lab::cpu(v.as_str().unwrap_or("")).unwrap_or(0);
    let mem = |v: &Value| labforge_core::lab::memory(v.as_str().unwrap_or("")).unwrap_or(0);
    assert_eq!((cpu(&r["limits"]["cpu"]), mem(&r["limits"]["memory"])), (1000, 512 << 20), "{r}");
    assert_eq!((cpu(&r["requests"]["cpu"]), mem(&r["requests"]["memory"])), (500, 256 << 20), "{r}");

    // The project's total: two kernels at 1 CPU fill quota-cpu 2; a third is refused.
    cp.kubectl_ok("create -f -", &pod("kernel-2", "lab-p1", json!({}), false))?;
    let e = cp.kubectl_refused("create -f -", &pod("kernel-3", "lab-p1", json!({}), false))?;
    assert!(e.contains("exceeded quota: project-total") && e.contains("limits.cpu"), "{e}");
    // p2 has no total and larger limits: a 2-CPU kernel is fine there.
    cp.kubectl_ok(
        "create -f -",
        &pod("kernel-big", "lab-p2", json!({"limits": {"cpu": "2", "memory": "2Gi"}}), false),
    )?;
    // Unscheduled pods go at once: p1 is empty again for the hub.
    cp.kubectl_ok("-n lab-p1 delete pod --all", "")?;

    let notebooks = components.iter().find(|c| c.name == "notebooks").expect("in the stack");
    hub_serves_the_roster_in_its_projects(&cp, notebooks, &facts)
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The hub as the component configures it, on loopback: its configuration files from the
/// rendered ConfigMap, each user's password as the master's Secret holds it (a file per user),
/// the proxy in front, KubeSpawner talking to the loopback API server.
fn hub_serves_the_roster_in_its_projects(cp: &ControlPlane, c: &ResolvedComponent, facts: &ClusterFacts) -> Result<()> {
    let programs = qemu_tests::notebooks::hub_programs()?;
    let rendered = labforge_core::stack::render(c, facts)?;
    let config = rendered
        .objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "hub-config")
        .expect("the hub's ConfigMap");
    let work = tempfile::tempdir()?;
    let conf_dir = work.path().join("config");
    let pw_dir = work.path().join("passwords");
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::create_dir_all(&pw_dir)?;
    for (k, v) in config["data"].as_object().expect("data") {
        std::fs::write(conf_dir.join(k), v.as_str().expect("text"))?;
    }
    let alice_pw = "a-Passw0rd-for-alice-only";
    let bob_pw = "another-one-for-bob";
    std::fs::write(pw_dir.join("alice"), alice_pw)?;
    std::fs::write(pw_dir.join("bob"), bob_pw)?;
    // The hub's own service account, as in the cluster (its Roles in each project namespace),
    // not the test's admin.
    let hub_token = cp.kubectl_ok("-n labforge-notebooks create token hub --duration=1h", "")?;
    let hub_kubeconfig = work.path().join("hub.conf");
    cp.write_kubeconfig(&hub_kubeconfig, hub_token.trim())?;
    let (public, api, hub) = (free_port()?, free_port()?, free_port()?);
    let token = "proxy-token-for-this-test-only";
    let mut proxy_cmd = Command::new(&programs.proxy);
    qemu_tests::apiserver::logged(&mut proxy_cmd, &work.path().join("proxy.log"))?;
    let _proxy = Proc(
        proxy_cmd
            .args(["--ip", "127.0.0.1", "--port", &public.to_string(), "--api-ip", "127.0.0.1"])
            .args(["--api-port", &api.to_string()])
            .arg(format!("--default-target=http://127.0.0.1:{hub}"))
            .arg(format!("--error-target=http://127.0.0.1:{hub}/hub/error"))
            .env("CONFIGPROXY_AUTH_TOKEN", token)
            .spawn()?,
    );
    let hub_command = || -> Result<Command> {
        let mut c = Command::new(&programs.jupyterhub);
        qemu_tests::apiserver::logged(&mut c, &work.path().join("hub.log"))?;
        c.arg("--config")
            .arg(conf_dir.join("jupyterhub_config.py"))
            .current_dir(work.path())
            .env("LAB_CONFIG_DIR", &conf_dir)
            .env("LAB_PASSWORDS_DIR", &pw_dir)
            .env("LAB_HUB_BIND_URL", format!("http://127.0.0.1:{hub}"))
            .env("LAB_HUB_CONNECT_URL", format!("http://127.0.0.1:{hub}"))
            .env("LAB_PUBLIC_URL", format!("http://127.0.0.1:{public}"))
            .env("LAB_PROXY_API_URL", format!("http://127.0.0.1:{api}"))
            .env("LAB_DB_URL", format!("sqlite:///{}/hub.sqlite", work.path().display()))
            .env("LAB_COOKIE_SECRET_FILE", work.path().join("cookie_secret"))
            .env("LAB_START_TIMEOUT", "20")
            .env("CONFIGPROXY_AUTH_TOKEN", token)
            .env("KUBECONFIG", &hub_kubeconfig);
        Ok(c)
    };
    let hub_log = || std::fs::read_to_string(work.path().join("hub.log")).unwrap_or_default();
    let wait_hub = |hub_proc: &mut Proc| {
        qemu_tests::poll(
            "the hub to answer through the proxy",
            Duration::from_secs(120),
            Duration::from_secs(1),
            || {
                if let Ok(Some(s)) = hub_proc.0.try_wait() {
                    return Err(format!("the hub exited ({s}):\n{}", hub_log()));
                }
                match ureq::get(&format!("http://127.0.0.1:{public}/hub/health")).call() {
                    Ok(r) if r.status() == 200 => Ok(()),
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
    };
    let mut hub_proc = Proc(hub_command()?.spawn()?);
    wait_hub(&mut hub_proc)?;
    let client = |args: &[&str]| -> Result<Value> {
        let out = Command::new(&programs.python)
            .arg(qemu_tests::workspace_root().join("qemu-tests/notebooks/hub_client.py"))
            .arg(args[0])
            .arg(format!("http://127.0.0.1:{public}"))
            .args(&args[1..])
            .output()?;
        assert!(out.status.success(), "hub client: {}\nhub log:\n{}", String::from_utf8_lossy(&out.stderr), hub_log());
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let r = client(&["report", alice_pw, bob_pw])?;
    eprintln!("hub client: {r}");
    // Only roster users, with their own password.
    for case in ["wrong_password", "not_on_roster", "empty_password"] {
        assert_ne!(r[case]["status"], 302, "{case}: no login: {r}");
        assert_eq!(r[case]["whoami"], 403, "{case}: no session: {r}");
    }
    assert_eq!(r["alice_login"]["status"], 302, "{r}");
    assert_eq!((r["alice"]["name"].as_str(), r["alice"]["admin"].as_bool()), (Some("alice"), Some(false)), "{r}");
    assert_eq!(
        (r["bob"]["name"].as_str(), r["bob"]["admin"].as_bool()),
        (Some("bob"), Some(true)),
        "roster admins are hub admins: {r}"
    );
    assert_eq!(r["token"]["status"], 201, "{r}");
    // Not her project, not her server.
    assert_eq!(r["spawn_p2"]["status"], 403, "{r}\nhub log:\n{}", hub_log());
    let msg = r["spawn_p2"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("alice is not a member of project p2") && msg.contains("p1"), "{r}");
    // Refused, without even saying whether bob exists (the hub answers 404 to a user who may not
    // see him).
    assert!(
        r["spawn_for_bob"]["status"] == 403 || r["spawn_for_bob"]["status"] == 404,
        "alice's token cannot start bob's server: {r}"
    );

    // Her first server: the home gets its owner first, once. The test plays the kubelet for that
    // pod (there is none on loopback): it checks what the pod would do, then reports it done.
    let spawn = client(&["spawn", "alice", alice_pw, "p1"])?;
    assert!(spawn["status"] == 201 || spawn["status"] == 202, "{spawn}\nhub log:\n{}", hub_log());
    let get_json = |what: &str, args: &str| -> Result<Value> {
        qemu_tests::poll(what, Duration::from_secs(30), Duration::from_millis(500), || {
            let o = cp.kubectl(args, "").map_err(|e| format!("{e:#}"))?;
            if !o.status.success() {
                return Err(String::from_utf8_lossy(&o.stderr).into_owned());
            }
            serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
        })
    };
    let owner = get_json("the pod that sets alice's home's owner", "-n lab-p1 get pod home-owner-alice -o json")?;
    let octr = &owner["spec"]["containers"][0];
    assert_eq!(octr["securityContext"]["runAsUser"], 0, "{octr}");
    assert_eq!(octr["securityContext"]["capabilities"], json!({"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}), "{octr}");
    assert_eq!(octr["env"][0], json!({"name": "OWNER", "value": "2001:2001"}), "{octr}");
    assert!(octr["command"][2].as_str().unwrap_or("").contains("chmod 0700 /mnt/home"), "{octr}");
    assert_eq!(owner["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"], "home-alice", "{owner}");
    cp.kubectl_ok(
        "-n lab-p1 patch pod home-owner-alice --subresource=status --type=merge -p {\"status\":{\"phase\":\"Succeeded\"}}",
        "",
    )?;
    // Her server's pod: in p1's namespace, as her uid, within p1's limits, her home mounted.
    let pod = get_json("alice's server pod in lab-p1", "-n lab-p1 get pod notebook-alice -o json")?;
    let spec = &pod["spec"];
    let ctr = &spec["containers"][0];
    assert_eq!(ctr["securityContext"]["runAsUser"], 2001, "{ctr}");
    assert_eq!(ctr["securityContext"]["runAsGroup"], 2001, "{ctr}");
    // No fsGroup: the kubelet would change the home's group at every start.
    assert!(spec["securityContext"].get("fsGroup").is_none(), "{spec}");
    assert_eq!(ctr["securityContext"]["runAsNonRoot"], true, "{ctr}");
    assert_eq!(ctr["securityContext"]["allowPrivilegeEscalation"], false, "{ctr}");
    let cpu = |v: &Value| labforge_core::lab::cpu(v.as_str().unwrap_or("")).unwrap_or(0);
    let mem = |v: &Value| labforge_core::lab::memory(v.as_str().unwrap_or("")).unwrap_or(0);
    let res = &ctr["resources"];
    assert_eq!((cpu(&res["limits"]["cpu"]), mem(&res["limits"]["memory"])), (1000, 512 << 20), "{res}");
    assert_eq!((cpu(&res["requests"]["cpu"]), mem(&res["requests"]["memory"])), (500, 256 << 20), "{res}");
    assert_eq!(ctr["image"].as_str(), Some(c.images["singleuser"].as_str()), "{ctr}");
    let home = spec["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == "home").expect("a home volume");
    assert_eq!(home["persistentVolumeClaim"]["claimName"], "home-alice", "{spec}");
    let claim = cp.kubectl_ok("-n lab-p1 get persistentvolumeclaim home-alice -o json", "")?;
    let claim: Value = serde_json::from_str(&claim)?;
    assert_eq!(claim["metadata"]["annotations"]["labforge.io/home-owner"], "2001:2001", "{claim}");
    assert!(cp.kubectl_refused("-n lab-p1 get pod home-owner-alice", "")?.contains("NotFound"), "removed once done");

    // Her server never runs here (no kubelet): the hub gives up after its start timeout and
    // removes the pod. The next start finds the home's owner set and goes straight to the server.
    qemu_tests::poll("the hub to give up on the first start", Duration::from_secs(90), Duration::from_secs(1), || {
        match cp.kubectl("-n lab-p1 get pod notebook-alice -o name", "") {
            Ok(o) if !o.status.success() => Ok(()),
            _ => Err("notebook-alice still there".to_string()),
        }
    })?;
    let spawn = client(&["spawn", "alice", alice_pw, "p1"])?;
    assert!(spawn["status"] == 201 || spawn["status"] == 202, "{spawn}\nhub log:\n{}", hub_log());
    get_json("alice's second server pod", "-n lab-p1 get pod notebook-alice -o json")?;
    let log = hub_log();
    assert_eq!(log.matches("now belongs to alice").count(), 1, "the owner is set once:\n{log}");

    // A new image takes alice off the roster and bob off the admins: the hub, restarted with it
    // (same database, same cookie secret), refuses the token alice had and gives bob no admin.
    let alice_token = r["token"]["token"].as_str().expect("alice's token").to_string();
    assert_eq!(client(&["whoami", &alice_token])?["status"], 200, "her token works before");
    drop(hub_proc);
    let mut roster: Value = serde_json::from_str(&std::fs::read_to_string(conf_dir.join("roster.json"))?)?;
    roster["users"].as_array_mut().expect("users").retain(|u| u["name"] != "alice");
    roster["users"][0]["admin"] = json!(false);
    std::fs::write(conf_dir.join("roster.json"), roster.to_string())?;
    let mut hub_proc = Proc(hub_command()?.spawn()?);
    wait_hub(&mut hub_proc)?;
    assert_eq!(client(&["whoami", &alice_token])?["status"], 403, "off the roster, her token is refused");
    let bob = client(&["login", "bob", bob_pw])?;
    assert_eq!((bob["name"].as_str(), bob["admin"].as_bool()), (Some("bob"), Some(false)), "{bob}");
    Ok(())
}
