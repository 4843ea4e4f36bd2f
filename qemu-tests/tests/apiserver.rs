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
//! - Its kernels: Enterprise Gateway (from PyPI) behind the component's front, both run with
//!   the configuration it renders, take who asks from the user's hub token and everything else
//!   from the roster: a user sees the shared kernel and their own environments only, cannot
//!   start a kernel in another's project or environment, and the kernel pod the gateway makes
//!   is in their project, as their uid, within its limits, with their home, whatever the
//!   request said.

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
projects = ["p2", "p1"]
admin = true
"#;

const BUILT_IN: [&str; 5] = ["storage", "monitoring", "rook-ceph", "projects", "notebooks"];

/// The ConfigMap `namespace/name` among a component's rendered objects.
fn configmap<'a>(objects: &'a [Value], namespace: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["namespace"] == namespace && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("ConfigMap {namespace}/{name} in the rendered component"))
}

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
        // The homes' volumes and claims for real as well: the API server's volume controller
        // binds them, and the hub's pods mount them.
        let hub_rbac = ["ServiceAccount", "Role", "RoleBinding", "PersistentVolume", "PersistentVolumeClaim"];
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
    homes_are_the_rosters(&cp, notebooks, &facts)?;
    hub_serves_the_roster_in_its_projects(&cp, notebooks, &facts)
}

/// The PersistentVolumes among `objects` whose label `labforge.io/home-of` is `user`.
fn home_volumes<'a>(objects: &'a [Value], user: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == "PersistentVolume" && o["metadata"]["labels"]["labforge.io/home-of"] == user)
        .collect()
}

/// One home per user, whatever project they work in: the claims the stack made (applied for
/// real above) are bound by the API server's volume controller, each of bob's projects has
/// one, all onto the same directory; on the shared filesystem (this stack runs rook-ceph) and
/// on the master's disk (rendered without it, accepted by a dry run). The Job that makes the
/// homes runs its script as the kubelet would run it, with nothing but CHOWN: each home made
/// once, 0700, its user's, and never touched again.
fn homes_are_the_rosters(cp: &ControlPlane, c: &ResolvedComponent, facts: &ClusterFacts) -> Result<()> {
    let claims =
        [("lab-p1", "home-alice"), ("lab-p2", "home-bob"), ("lab-p1", "home-bob"), ("labforge-notebooks", "homes")];
    for (ns, claim) in claims {
        qemu_tests::poll(
            &format!("claim {ns}/{claim} bound"),
            Duration::from_secs(60),
            Duration::from_millis(500),
            || {
                let o = cp
                    .kubectl(&format!("-n {ns} get pvc {claim} -o jsonpath={{.status.phase}}"), "")
                    .map_err(|e| format!("{e:#}"))?;
                match String::from_utf8_lossy(&o.stdout).trim() {
                    "Bound" => Ok(()),
                    other => Err(format!("{other:?} {}", String::from_utf8_lossy(&o.stderr))),
                }
            },
        )?;
    }
    assert!(cp.kubectl_refused("-n lab-p2 get pvc home-alice", "")?.contains("NotFound"), "alice is not in p2");
    let bobs: Value = serde_json::from_str(&cp.kubectl_ok("get pv -l labforge.io/home-of=bob -o json", "")?)?;
    let bobs = bobs["items"].as_array().expect("items");
    assert_eq!(bobs.len(), 2, "one volume per project of his: {bobs:?}");
    let mut bound: Vec<String> =
        bobs.iter().map(|v| v["spec"]["claimRef"]["namespace"].as_str().unwrap_or("").to_string()).collect();
    bound.sort();
    assert_eq!(bound, ["lab-p1", "lab-p2"]);
    for v in bobs {
        let csi = &v["spec"]["csi"];
        assert_eq!(v["status"]["phase"], "Bound", "{v}");
        assert_eq!(v["spec"]["persistentVolumeReclaimPolicy"], "Retain", "a deleted claim never deletes a home: {v}");
        assert_eq!(csi["driver"], "rook-ceph.cephfs.csi.ceph.com", "{v}");
        assert_eq!(csi["volumeAttributes"]["rootPath"], "/labforge-homes/bob", "the same home: {v}");
        assert_eq!(csi["volumeAttributes"]["staticVolume"], "true", "{v}");
    }
    assert_ne!(
        bobs[0]["spec"]["csi"]["volumeHandle"], bobs[1]["spec"]["csi"]["volumeHandle"],
        "each volume its own handle"
    );

    // Without a shared filesystem: the master's disk, where the volumes' node affinity puts
    // every server and kernel.
    let mut local_facts = facts.clone();
    local_facts.components.retain(|n| n != "rook-ceph");
    let local = labforge_core::stack::render(c, &local_facts)?.objects;
    // Under other names: the shared form's objects hold these, and a claim's volume cannot
    // change.
    let storage: Vec<Value> = local
        .iter()
        .filter(|o| o["kind"] == "PersistentVolume" || o["kind"] == "PersistentVolumeClaim")
        .map(|o| {
            let mut o = o.clone();
            let renamed = |v: &Value| json!(format!("{}-local", v.as_str().unwrap_or("")));
            o["metadata"]["name"] = renamed(&o["metadata"]["name"]);
            if o["kind"] == "PersistentVolume" {
                o["spec"]["claimRef"]["name"] = renamed(&o["spec"]["claimRef"]["name"]);
            } else {
                o["spec"]["volumeName"] = renamed(&o["spec"]["volumeName"]);
            }
            o
        })
        .collect();
    let out = no_warnings(cp.kubectl_ok(DRY_RUN, &list(&storage.iter().collect::<Vec<_>>()))?)?;
    assert_eq!(out.lines().filter(|l| l.ends_with("(server dry run)")).count(), storage.len(), "{out}");
    let bobs = home_volumes(&local, "bob");
    assert_eq!(bobs.len(), 2);
    for v in &bobs {
        assert_eq!(v["spec"]["hostPath"], json!({"path": "/var/lib/labforge/homes/bob", "type": "Directory"}), "{v}");
        let term = &v["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0];
        assert_eq!(term, &json!({"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}), "{v}");
    }

    // The Job, as the kubelet would run it: root with CHOWN alone (setpriv's bounding set),
    // the homes' root mounted where it says.
    let job = local.iter().find(|o| o["kind"] == "Job").expect("the Job that makes the homes");
    assert!(job["metadata"]["name"].as_str().unwrap_or("").starts_with("make-homes-"), "{job}");
    let ctr = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(ctr["securityContext"]["capabilities"], json!({"drop": ["ALL"], "add": ["CHOWN"]}), "{ctr}");
    assert_eq!(ctr["securityContext"]["allowPrivilegeEscalation"], false, "{ctr}");
    assert_eq!(ctr["env"][0], json!({"name": "HOMES", "value": "/mnt/homes"}), "{ctr}");
    let shared = labforge_core::stack::render(c, facts)?.objects;
    let shared_job = shared.iter().find(|o| o["kind"] == "Job").expect("the Job");
    assert_eq!(
        shared_job["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"], "/mnt/homes/labforge-homes",
        "on CephFS, under /labforge-homes"
    );
    let script = ctr["command"][2].as_str().expect("script");
    let root = tempfile::tempdir()?;
    let homes = root.path().join("homes");
    let run = || -> Result<String> {
        let out = Command::new("setpriv")
            .args(["--bounding-set=-all,+chown", "--", "sh", "-c", script])
            .env("HOMES", &homes)
            .output()?;
        assert!(out.status.success(), "the Job's script: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let out = run()?;
    assert!(out.contains("2 new homes"), "{out}");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = |u: &str| std::fs::metadata(homes.join(u)).map(|m| (m.uid(), m.gid(), m.mode() & 0o7777));
    assert_eq!(meta("alice")?, (2001, 2001, 0o700));
    assert_eq!(meta("bob")?, (2002, 2002, 0o700));
    // Never touched again: alice's own choice of mode stays, and so do her files; a make cut
    // short (an empty `.new-bob`, no bob) is finished.
    std::fs::set_permissions(homes.join("alice"), std::fs::Permissions::from_mode(0o750))?;
    std::fs::write(homes.join("alice/notes.txt"), "mine")?;
    std::fs::remove_dir(homes.join("bob"))?;
    std::fs::create_dir(homes.join(".new-bob"))?;
    let out = run()?;
    assert!(out.contains("made the home of bob (2002:2002)") && out.contains("1 new homes"), "{out}");
    assert_eq!(meta("alice")?, (2001, 2001, 0o750));
    assert_eq!(std::fs::read_to_string(homes.join("alice/notes.txt"))?, "mine");
    assert_eq!(meta("bob")?, (2002, 2002, 0o700));
    assert!(!homes.join(".new-bob").exists());
    Ok(())
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
    let config = configmap(&rendered.objects, "labforge-notebooks", "hub-config");
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

    // Her server: straight to its pod (her home is made and hers before anyone starts: see
    // `homes_are_the_rosters`).
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
    let tools = ctr["volumeMounts"].as_array().into_iter().flatten().find(|m| m["name"] == "lab-tools");
    assert_eq!(
        tools.map(|m| m["mountPath"].clone()),
        Some(json!("/usr/local/bin/lab-env")),
        "lab-env in her server: {ctr}"
    );
    let cpu = |v: &Value| labforge_core::lab::cpu(v.as_str().unwrap_or("")).unwrap_or(0);
    let mem = |v: &Value| labforge_core::lab::memory(v.as_str().unwrap_or("")).unwrap_or(0);
    let res = &ctr["resources"];
    assert_eq!((cpu(&res["limits"]["cpu"]), mem(&res["limits"]["memory"])), (1000, 512 << 20), "{res}");
    assert_eq!((cpu(&res["requests"]["cpu"]), mem(&res["requests"]["memory"])), (500, 256 << 20), "{res}");
    assert_eq!(ctr["image"].as_str(), Some(c.images["singleuser"].as_str()), "{ctr}");
    let home = spec["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == "home").expect("a home volume");
    assert_eq!(home["persistentVolumeClaim"]["claimName"], "home-alice", "{spec}");
    // bob works in p2 and p1: his server in p1 mounts the claim the stack made him there, on
    // the same home as his claim in p2.
    let spawn = client(&["spawn", "bob", bob_pw, "p1"])?;
    assert!(spawn["status"] == 201 || spawn["status"] == 202, "{spawn}\nhub log:\n{}", hub_log());
    let bob_pod = get_json("bob's server pod in lab-p1", "-n lab-p1 get pod notebook-bob -o json")?;
    let home = bob_pod["spec"]["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == "home");
    assert_eq!(home.map(|h| h["persistentVolumeClaim"]["claimName"].clone()), Some(json!("home-bob")), "{bob_pod}");
    // Their servers never run here (no kubelet): the hub gives up after its start timeout and
    // removes the pods, which frees p1's quota for alice's kernel below. It never touched a
    // claim (it has no right to: a refusal would be in its log).
    qemu_tests::poll(
        "the hub to give up on both servers",
        Duration::from_secs(90),
        Duration::from_secs(1),
        || match cp.kubectl("-n lab-p1 get pod -o name", "") {
            Ok(o) if o.status.success() && o.stdout.is_empty() => Ok(()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stdout).into_owned()),
            Err(e) => Err(format!("{e:#}")),
        },
    )?;
    let log = hub_log();
    assert!(!log.contains("persistentvolumeclaims"), "the hub touches no claim:\n{log}");
    assert!(!log.contains("unhandled user_options"), "the hub knows the project choice was checked:\n{log}");
    // Her server talks to the gateway as her: its URL, her project, and her server's own hub
    // token (the kubelet expands $(JUPYTERHUB_API_TOKEN), which must come before it).
    let env: Vec<(String, String)> = pod["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str().unwrap_or("").to_string(), e["value"].as_str().unwrap_or("").to_string()))
        .collect();
    let at = |name: &str| env.iter().position(|(n, _)| n == name);
    let value = |name: &str| at(name).map(|i| env[i].1.clone());
    assert_eq!(value("KERNEL_PROJECT").as_deref(), Some("p1"), "{env:?}");
    assert_eq!(value("JUPYTER_GATEWAY_URL").as_deref(), Some("http://gateway.labforge-notebooks.svc:8888"));
    assert_eq!(value("JUPYTER_GATEWAY_AUTH_TOKEN").as_deref(), Some("$(JUPYTERHUB_API_TOKEN)"));
    assert!(at("JUPYTERHUB_API_TOKEN") < at("JUPYTER_GATEWAY_AUTH_TOKEN"), "{env:?}");

    let alice_token = r["token"]["token"].as_str().expect("alice's token").to_string();
    let bob_token = client(&["token", "bob", bob_pw])?["token"].as_str().expect("bob's token").to_string();
    // A token of alice's without the gateway's scope, as the hub's OAuth hands a server she
    // visits: the gateway's front must not take it.
    let visitor = client(&["token", "alice", alice_pw, "read:users:name!user,access:servers!user"])?;
    let visitor = visitor["token"].as_str().expect("a token with fewer scopes").to_string();
    gateway_serves_the_roster(cp, c, &rendered.objects, public, &alice_token, &bob_token, &visitor)?;

    // A new image takes alice off the roster and bob off the admins: the hub, restarted with it
    // (same database, same cookie secret), refuses the token alice had and gives bob no admin.
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

/// Enterprise Gateway and its front as the component configures them, on loopback: the
/// gateway's own service account (its Roles), the hub above for who a token belongs to.
fn gateway_serves_the_roster(
    cp: &ControlPlane,
    c: &ResolvedComponent,
    rendered: &[Value],
    hub_public: u16,
    alice: &str,
    bob: &str,
    visitor: &str,
) -> Result<()> {
    let programs = qemu_tests::notebooks::gateway_programs()?;
    let config = configmap(rendered, "labforge-notebooks", "gateway-config");
    let work = tempfile::tempdir()?;
    let dir = work.path().join("config");
    std::fs::create_dir_all(dir.join("jupyter/kernels/python3"))?;
    for (k, v) in config["data"].as_object().expect("data") {
        let to = if k == "kernel.json" { dir.join("jupyter/kernels/python3/kernel.json") } else { dir.join(k) };
        std::fs::write(to, v.as_str().expect("text"))?;
    }
    // A kernel never starts here (no kubelet): the gateway gives up on it after 20 s, not 300.
    let mut settings: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("settings.json"))?)?;
    settings["kernel_launch_timeout"] = json!(20);
    std::fs::write(dir.join("settings.json"), settings.to_string())?;
    let token_file = work.path().join("eg-token");
    std::fs::write(&token_file, "gateway-token-for-this-test-only")?;
    let sa = cp.kubectl_ok("-n labforge-notebooks create token gateway --duration=1h", "")?;
    let kubeconfig = work.path().join("gateway.conf");
    cp.write_kubeconfig(&kubeconfig, sa.trim())?;
    let (eg_port, front_port, response_port) = (free_port()?, free_port()?, free_port()?);
    let path = format!("{}:{}", programs.bin.display(), std::env::var("PATH").unwrap_or_default());
    let common = |cmd: &mut Command| {
        cmd.current_dir(work.path())
            .env("HOME", work.path())
            .env("PATH", &path)
            .env("LAB_CONFIG_DIR", &dir)
            .env("LAB_EG_TOKEN_FILE", &token_file)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST");
    };
    let mut eg = Command::new(programs.bin.join("jupyter"));
    qemu_tests::apiserver::logged(&mut eg, &work.path().join("eg.log"))?;
    common(&mut eg);
    eg.arg("enterprisegateway")
        .arg(format!("--config={}", dir.join("enterprise_gateway_config.py").display()))
        .env("JUPYTER_PATH", dir.join("jupyter"))
        .env("LAB_EG_PORT", eg_port.to_string())
        // Kernels call back on loopback (in a cluster: the gateway pod's address).
        .env("EG_RESPONSE_IP", "127.0.0.1")
        .env("EG_RESPONSE_PORT", response_port.to_string());
    let _eg = Proc(eg.spawn()?);
    let mut front = Command::new(programs.bin.join("python"));
    qemu_tests::apiserver::logged(&mut front, &work.path().join("front.log"))?;
    common(&mut front);
    front
        .arg(dir.join("lab_gateway.py"))
        .env("LAB_EG_URL", format!("http://127.0.0.1:{eg_port}"))
        .env("LAB_HUB_API_URL", format!("http://127.0.0.1:{hub_public}/hub/api"))
        .env("LAB_FRONT_IP", "127.0.0.1")
        .env("LAB_FRONT_PORT", front_port.to_string());
    let _front = Proc(front.spawn()?);
    let logs = || {
        let read = |f: &str| std::fs::read_to_string(work.path().join(f)).unwrap_or_default();
        format!("gateway log:\n{}\nfront log:\n{}", read("eg.log"), read("front.log"))
    };
    let url = format!("http://127.0.0.1:{front_port}");
    qemu_tests::poll("the gateway behind its front", Duration::from_secs(120), Duration::from_secs(1), || {
        match ureq::get(&format!("{url}/api")).set("Authorization", &format!("token {alice}")).call() {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(format!("status {}", r.status())),
            Err(e) => Err(e.to_string()),
        }
    })
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs()))?;
    let client = |args: &[&str]| -> Result<Command> {
        let mut cmd = Command::new(programs.bin.join("python"));
        cmd.arg(qemu_tests::workspace_root().join("qemu-tests/notebooks/gateway_client.py"))
            .arg(args[0])
            .arg(&url)
            .args(&args[1..]);
        Ok(cmd)
    };
    // alice makes an environment with lab-env, as in her server (its home, the gateway's URL
    // and her server's hub token in the environment), with the Python her image has.
    let alice_home = work.path().join("home-alice");
    std::fs::create_dir_all(&alice_home)?;
    let tools = configmap(rendered, "lab-p1", "lab-tools");
    let script = work.path().join("lab-env");
    std::fs::write(&script, tools["data"]["lab-env"].as_str().expect("lab-env"))?;
    // As the server mounts it (mode 0555), run as a command: its #! line must come first.
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o555))?;
    let lab_env = |args: &[&str], token: &str| -> Result<std::process::Output> {
        Ok(Command::new(&script)
            .args(args)
            .env("HOME", &alice_home)
            .env("JUPYTER_GATEWAY_URL", &url)
            .env("JUPYTERHUB_API_TOKEN", token)
            .output()?)
    };
    let made = lab_env(&["create", "stats"], alice)?;
    assert!(made.status.success(), "lab-env: {}\n{}", String::from_utf8_lossy(&made.stderr), logs());
    assert!(String::from_utf8_lossy(&made.stdout).contains("stats is ready"), "{made:?}");
    assert!(alice_home.join(".lab-envs/stats/bin/python").exists(), "the environment is in her home");
    let listed = lab_env(&["list"], alice)?;
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(listed.lines().any(|l| l.starts_with("stats") && l.ends_with("kernel")), "{listed}");
    let bad = lab_env(&["create", "Stats..1"], alice)?;
    assert!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("not an environment name"),
        "{bad:?}"
    );
    let stranger = lab_env(&["create", "mine"], "not-a-token")?;
    assert!(!stranger.status.success() && String::from_utf8_lossy(&stranger.stderr).contains("401"), "{stranger:?}");
    let out = client(&["report", alice, bob])?.output()?;
    assert!(out.status.success(), "gateway client: {}\n{}", String::from_utf8_lossy(&out.stderr), logs());
    let r: Value = serde_json::from_slice(&out.stdout)?;
    eprintln!("gateway client: {r}");
    // Nobody without a roster user's hub token.
    assert_eq!((r["no_token"]["status"].as_u64(), r["bad_token"]["status"].as_u64()), (Some(401), Some(401)), "{r}");
    // Environments: each user's own; a name that is not one is refused.
    assert_eq!(r["bad_env_name"]["status"], 400, "{r}");
    assert_eq!(r["bob_env"]["body"], json!(["bobs"]), "{r}");
    assert_eq!(r["alice_envs"]["body"], json!(["stats"]), "{r}");
    // The kernel list: the shared kernel and one's own environments, never another's.
    assert_eq!(r["alice_specs"]["names"], json!(["env-stats", "python3"]), "{r}");
    assert_eq!(r["bob_specs"]["names"], json!(["env-bobs", "python3"]), "{r}");
    assert_eq!(r["alice_bobs_spec"]["status"], 404, "{r}");
    // Not her project, not her environment: refused before the gateway sees anything.
    assert_eq!(r["alice_p2"]["status"], 403, "{r}");
    let msg = r["alice_p2"]["body"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("alice is not a member of project p2") && msg.contains("p1"), "{r}");
    assert_eq!(r["alice_bobs_env"]["status"], 404, "{r}");
    // A token in the URL (it would be in access logs) and a visitor's token do not count; a
    // body that is not an object is refused as such.
    assert_eq!(r["query_token"]["status"], 401, "{r}");
    assert_eq!(r["not_an_object"]["status"], 400, "{r}");
    let out = client(&["call", visitor, "GET", "/api/kernelspecs"])?.output()?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["status"], 401, "a token without the gateway's scope: {v}");
    let stored = cp.kubectl_ok("-n labforge-notebooks get configmap lab-environments -o json", "")?;
    let stored: Value = serde_json::from_str(&stored)?;
    assert_eq!(stored["data"], json!({"alice": "[\"stats\"]", "bob": "[\"bobs\"]"}), "{stored}");

    // Her kernel in her environment, with a request that asks for everything it may not have
    // (bob's name, uid 0, p2's namespace, 8 CPUs, 64 GiB, another image, an hour to start): the
    // pod the gateway makes has none of it.
    let start = client(&["start", alice, "env-stats", "p1"])?.stdout(std::process::Stdio::piped()).spawn()?;
    let pods =
        qemu_tests::poll("alice's kernel pod in lab-p1", Duration::from_secs(90), Duration::from_secs(1), || {
            let o = cp.kubectl("-n lab-p1 get pods -l component=kernel -o json", "").map_err(|e| format!("{e:#}"))?;
            let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
            match v["items"].as_array() {
                Some(items) if !items.is_empty() => Ok(v),
                _ => Err("no kernel pod yet".to_string()),
            }
        })
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs()))?;
    let pod = &pods["items"][0];
    assert_eq!(pods["items"].as_array().map(Vec::len), Some(1), "{pods}");
    assert_eq!(pod["metadata"]["labels"]["labforge.io/user"], "alice", "{pod}");
    let spec = &pod["spec"];
    assert_eq!(
        (spec["securityContext"]["runAsUser"].as_u64(), spec["securityContext"]["runAsGroup"].as_u64()),
        (Some(2001), Some(2001)),
        "{spec}"
    );
    assert!(spec["securityContext"].get("fsGroup").is_none(), "{spec}");
    assert_eq!(spec["automountServiceAccountToken"], false, "{spec}");
    let ctr = &spec["containers"][0];
    assert_eq!(ctr["image"].as_str(), Some(c.images["kernel"].as_str()), "{ctr}");
    assert_eq!(ctr["command"][0], "/home/jovyan/.lab-envs/stats/bin/python", "her environment's Python: {ctr}");
    assert_eq!(ctr["command"][1], "/usr/local/bin/kernel-launchers/python/scripts/launch_ipykernel.py", "{ctr}");
    let cpu = |v: &Value| labforge_core::lab::cpu(v.as_str().unwrap_or("")).unwrap_or(0);
    let mem = |v: &Value| labforge_core::lab::memory(v.as_str().unwrap_or("")).unwrap_or(0);
    let res = &ctr["resources"];
    assert_eq!((cpu(&res["limits"]["cpu"]), mem(&res["limits"]["memory"])), (1000, 512 << 20), "p1's maximum: {res}");
    assert_eq!(
        (cpu(&res["requests"]["cpu"]), mem(&res["requests"]["memory"])),
        (500, 256 << 20),
        "p1's minimum: {res}"
    );
    let home = spec["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == "home").expect("a home volume");
    assert_eq!(home["persistentVolumeClaim"]["claimName"], "home-alice", "{spec}");
    // The test plays the kubelet (there is none on loopback): the pod runs at 127.0.0.1, its
    // command as its security context says, uid and gid 2001 (a user namespace maps them to
    // the test's own user, which can read the fixture), the kernel image's Python standing in
    // for her environment's.
    let name = pod["metadata"]["name"].as_str().expect("pod name").to_string();
    cp.kubectl_ok(
        &format!("-n lab-p1 patch pod {name} --subresource=status --type=merge -p {{\"status\":{{\"phase\":\"Running\",\"podIP\":\"127.0.0.1\",\"hostIP\":\"127.0.0.1\"}}}}"),
        "",
    )?;
    let args: Vec<String> =
        ctr["command"].as_array().expect("command")[2..].iter().map(|a| a.as_str().unwrap_or("").to_string()).collect();
    let (run_uid, run_gid) = (&spec["securityContext"]["runAsUser"], &spec["securityContext"]["runAsGroup"]);
    let mut kernel = Command::new("unshare");
    qemu_tests::apiserver::logged(&mut kernel, &work.path().join("kernel.log"))?;
    kernel
        .args(["--user", &format!("--map-user={run_uid}"), &format!("--map-group={run_gid}"), "--"])
        .arg(&programs.kernel_python)
        .arg(&programs.kernel_launcher)
        .args(&args)
        .current_dir(&alice_home)
        .env("HOME", &alice_home);
    let _kernel = Proc(kernel.spawn()?);
    let out = start.wait_with_output()?;
    let started: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(started["status"], 201, "the kernel started: {started}\n{}", logs());
    let kernel_id = started["body"]["id"].as_str().expect("the kernel's id").to_string();
    assert_eq!(Some(kernel_id.as_str()), pod["metadata"]["labels"]["kernel_id"].as_str());
    let run = |token: &str, code: &str| -> Result<Value> {
        let out = client(&["run", token, &kernel_id, code])?.output()?;
        assert!(out.status.success(), "gateway client: {}\n{}", String::from_utf8_lossy(&out.stderr), logs());
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    // Her code runs, as her uid and gid, over the kernel protocol through the front.
    let ran = run(alice, "import os; print(os.getuid(), os.getgid())")?;
    assert_eq!((ran["reply"].as_str(), ran["stdout"].as_str()), (Some("ok"), Some("2001 2001\n")), "{ran}\n{}", logs());
    eprintln!("kernel start to first result on loopback: {:.1} s", ran["seconds"].as_f64().unwrap_or(0.0));
    // Bob, with his own token, neither sees it, nor talks to it, nor stops it.
    let call = |token: &str, method: &str, path: &str| -> Result<Value> {
        let out = client(&["call", token, method, path])?.output()?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let kernel_path = format!("/api/kernels/{kernel_id}");
    assert_eq!(call(alice, "GET", "/api/kernels")?["body"][0]["id"].as_str(), Some(kernel_id.as_str()));
    assert_eq!(call(bob, "GET", "/api/kernels")?["body"], json!([]));
    assert_eq!(call(bob, "GET", &kernel_path)?["status"], 404);
    assert_eq!(run(bob, "print('in')")?["status"], 404, "bob's websocket to her kernel");
    assert_eq!(call(bob, "DELETE", &kernel_path)?["status"], 404);
    for action in ["interrupt", "restart"] {
        assert_eq!(call(bob, "POST", &format!("{kernel_path}/{action}"))?["status"], 404, "bob's {action}");
    }
    assert_eq!(call(alice, "GET", &kernel_path)?["status"], 200, "still running");
    // She stops it: the gateway removes its pod.
    assert_eq!(call(alice, "DELETE", &kernel_path)?["status"], 204, "{}", logs());
    let gone = || {
        qemu_tests::poll("the kernel pod removed", Duration::from_secs(60), Duration::from_secs(1), || {
            let o = cp.kubectl("-n lab-p1 get pods -l component=kernel -o name", "").map_err(|e| format!("{e:#}"))?;
            if o.stdout.is_empty() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&o.stdout).into_owned())
            }
        })
    };
    gone()?;

    // A kernel whose pod never runs: the gateway gives up after the front's launch timeout
    // (20 s here), not the hour the request asked for, says so, and removes the pod.
    let began = std::time::Instant::now();
    let out = client(&["start", alice, "python3", "p1"])?.output()?;
    let answer: Value = serde_json::from_slice(&out.stdout)?;
    // (The front's own request to the gateway would give up after 80 s.)
    assert!(began.elapsed() < Duration::from_secs(50), "gave up after the front's 20 s: {answer}");
    assert_eq!(answer["status"].as_u64().map(|s| s >= 500), Some(true), "{answer}\n{}", logs());
    gone()?;
    Ok(())
}
