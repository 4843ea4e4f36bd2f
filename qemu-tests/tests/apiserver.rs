//! The stack against a real API server (upstream Kubernetes built from its Go modules) running on
//! loopback: no VMs, so it fits in `make test`. One control plane serves every check.
//!
//! - Every built-in component, rendered with a lab roster as a build renders it, is accepted by
//!   a strict server-side apply (CRDs and namespaces for real, everything else dry-run), with no
//!   warning.
//! - The `projects` component's limits hold against the API server's own admission: a kernel
//!   asking for more than its project allows is refused, one asking for nothing gets the
//!   project's limits, the project's total is enforced, and a privileged pod is refused.

use std::time::Duration;

use anyhow::Result;
use labforge_core::stack::{ClusterFacts, ResolvedComponent};
use qemu_tests::apiserver::ControlPlane;
use qemu_tests::kubernetes;
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

const BUILT_IN: [&str; 4] = ["storage", "monitoring", "rook-ceph", "projects"];

/// A List of `items` as kubectl reads it.
fn list(items: &[&Value]) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// `out`, unless the API server warned in it.
fn no_warnings(out: String) -> Result<String> {
    if let Some(w) = out.lines().find(|l| l.starts_with("Warning:")) {
        anyhow::bail!("the API server warned: {w}\n{out}");
    }
    Ok(out)
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
    let fixture = kubernetes::fixture("kubernetes-fixture")?;
    let cp = ControlPlane::start(&fixture)?;

    // Every component: namespaces and CRDs for real (what the rest needs to exist), then the
    // rest in a strict dry run; `projects` for real, as its limits are checked next.
    for c in &components {
        let rendered = labforge_core::stack::render(c, &facts)?;
        let real_kinds = |o: &&Value| o["kind"] == "Namespace" || o["kind"] == "CustomResourceDefinition";
        let (real, dry): (Vec<&Value>, Vec<&Value>) = if c.name == "projects" {
            (rendered.objects.iter().collect(), Vec::new())
        } else {
            rendered.objects.iter().partition(real_kinds)
        };
        if !real.is_empty() {
            no_warnings(cp.kubectl_ok(APPLY, &list(&real))?)?;
            cp.kubectl_ok("wait --for=condition=Established --timeout=120s crd --all", "")?;
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
    Ok(())
}
