//! `labforge-bench-notebooks` (part of `make bench`): the notebooks component on one PC of
//! `qemu-tests/images/notebooks.toml` (real Kubernetes, 2 vCPUs, 6 GiB, TCG), the student's
//! side timed against the same pods started by hand in the same run, as JSON on stdout:
//!
//! - `nb_stack_ready_s`: power-on to the stack (`storage`, `projects`, `notebooks`) ready;
//! - `nb_first_server_s`: alice's first server on the node (login included);
//! - `nb_login_to_server_s`: on the now warm node, her login (a token from her password) to
//!   the hub reporting her server ready, through the hub's NodePort, as her browser sees it;
//! - `nb_server_by_hand_s`: the floor under it, her server's own pod (same image, namespace,
//!   uid, limits and home) running plain `jupyter-server`, created with kubectl, to its first
//!   HTTP answer; `nb_server_overhead`: the ratio of the two (what the hub, KubeSpawner and the
//!   proxy add);
//! - `nb_kernel_first_result_s`: a kernel started through her server (jupyter-server, the
//!   gateway's front, Enterprise Gateway, a kernel pod in `lab-p1`) to the first result of a
//!   cell over the kernel protocol;
//! - `nb_kernel_by_hand_s`: the floor under it, that kernel pod's own spec running
//!   `python3 -c` (ipykernel imported, the same cell) with kubectl, to the pod's success;
//!   `nb_kernel_overhead`: their ratio;
//! - `nb_cell_s`: one cell on the running kernel, round trip through the hub's proxy.
//!
//! Every figure is wall-clock from the test's side of the LAN (the hub is polled every
//! second; the by-hand pods every second over SSH).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use qemu_tests::notebooks_room::{self, stack_ready, Room, SETTLE};
use qemu_tests::poll;
use serde_json::{json, Value};

/// What a student's first cell does, in the kernel and by hand.
const CELL: &str = "print(6 * 7)";

fn main() {
    if let Err(e) = run() {
        eprintln!("labforge-bench-notebooks: error: {e:#}");
        std::process::exit(1);
    }
}

/// `pod` (as the API server returned it) made into a new pod: `name`, no status, nothing the
/// API server or a controller filled in, the first container running `command`.
fn by_hand(pod: &Value, name: &str, command: &[&str]) -> Value {
    let mut p = pod.clone();
    let ns = p["metadata"]["namespace"].clone();
    p["metadata"] = json!({ "name": name, "namespace": ns, "labels": { "app": "labforge-bench" } });
    if let Some(o) = p.as_object_mut() {
        o.remove("status");
    }
    if let Some(spec) = p["spec"].as_object_mut() {
        spec.remove("nodeName");
        spec.insert("restartPolicy".into(), json!("Never"));
    }
    let c = &mut p["spec"]["containers"][0];
    c["command"] = json!(command);
    if let Some(c) = c.as_object_mut() {
        c.remove("args");
        // A probe of the hub's server path would never pass on a plain server.
        c.remove("readinessProbe");
        c.remove("livenessProbe");
    }
    p
}

fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

fn run() -> Result<()> {
    let figures = notebooks_room::in_room(bench)?;
    println!("{}", serde_json::to_string_pretty(&figures)?);
    Ok(())
}

fn bench(room: &mut Room) -> Result<Value> {
    let on = Instant::now();
    room.power_on()?;
    room.wait_ready("the PC Ready")?;
    room.remote.wait_api("the stack ready", SETTLE, stack_ready)?;
    let stack_s = seconds(on.elapsed());
    eprintln!("bench: notebooks: power-on to the stack ready in {stack_s} s");
    let pw = room.password("alice")?;

    // Her first server: the node's first pod of the single-user image.
    let t = Instant::now();
    let token = room.token("alice", &pw)?;
    room.server_up("alice", &token, "p1")?;
    let first_s = seconds(t.elapsed());
    let pod: Value = serde_json::from_str(&room.kubectl("-n lab-p1 get pod notebook-alice -o json", "")?)?;
    stop_server(room, &token)?;

    // Login to her server ready, on a warm node.
    let t = Instant::now();
    let token = room.token("alice", &pw)?;
    room.server_up("alice", &token, "p1")?;
    let login_s = seconds(t.elapsed());
    eprintln!("bench: notebooks: login to alice's server ready in {login_s} s (first: {first_s} s)");

    // A kernel through her server, to the first result; then one more cell.
    let t = Instant::now();
    let k = room.server_api("alice", &token, "POST", "/api/kernels", Some(&json!({"name": "python3"})))?;
    if k["status"] != 201 {
        bail!("her kernel did not start: {k}\n{}", room.pods_of("p1"));
    }
    let id = k["body"]["id"].as_str().context("a kernel id")?.to_string();
    let base = format!("{}/user/alice", room.hub());
    let ran = room.client("gateway_client.py", &["run", &base, &token, &id, CELL])?;
    let kernel_s = seconds(t.elapsed());
    if ran["stdout"] != "42\n" {
        bail!("her first cell: {ran}");
    }
    let again = room.client("gateway_client.py", &["run", &base, &token, &id, CELL])?;
    if again["stdout"] != "42\n" {
        bail!("her second cell: {again}");
    }
    let cell_s = again["seconds"].as_f64().context("the client times the cell")?;
    eprintln!("bench: notebooks: kernel start to first result in {kernel_s} s; a cell in {cell_s:.2} s");
    let kpod: Value = serde_json::from_str(&room.kubectl(&format!("-n lab-p1 get pod kernel-{id} -o json"), "")?)?;
    let stop = room.server_api("alice", &token, "DELETE", &format!("/api/kernels/{id}"), None)?;
    if stop["status"] != 204 {
        bail!("stopping her kernel: {stop}");
    }
    stop_server(room, &token)?;
    gone(room, "-l component=kernel")?;

    // The floors: the same pods by hand.
    let server = by_hand(
        &pod,
        "bench-server",
        &["jupyter-server", "--ip=0.0.0.0", "--port=8888", "--ServerApp.token=", "--ServerApp.password="],
    );
    let t = Instant::now();
    room.kubectl("create -f -", &server.to_string())?;
    poll("the server by hand answering", SETTLE, Duration::from_secs(1), || {
        let ip = pod_field(room, "bench-server", "{.status.podIP}")?;
        if ip.is_empty() {
            return Err("no address yet".into());
        }
        let code = room
            .remote
            .run(&format!("curl -s -o /dev/null -w '%{{http_code}}' http://{ip}:8888/api"), "")
            .unwrap_or_default();
        if code.trim() == "200" {
            Ok(())
        } else {
            Err(format!("HTTP {code:?}"))
        }
    })?;
    let server_s = seconds(t.elapsed());
    room.kubectl("-n lab-p1 delete pod bench-server --wait=true", "")?;
    let cell = format!("import ipykernel; {CELL}");
    let kernel = by_hand(&kpod, "bench-kernel", &["python3", "-c", &cell]);
    let t = Instant::now();
    room.kubectl("create -f -", &kernel.to_string())?;
    poll("the kernel pod by hand done", SETTLE, Duration::from_secs(1), || {
        match pod_field(room, "bench-kernel", "{.status.phase}")?.as_str() {
            // A failed pod is done too: its output below says why.
            "Succeeded" | "Failed" => Ok(()),
            p => Err(p.to_string()),
        }
    })?;
    let kernel_hand_s = seconds(t.elapsed());
    let out = room.kubectl("-n lab-p1 logs bench-kernel", "")?;
    if out.trim() != "42" {
        bail!("the kernel pod by hand printed {out:?}");
    }
    room.kubectl("-n lab-p1 delete pod bench-kernel --wait=true", "")?;
    eprintln!(
        "bench: notebooks: by hand, the server pod answers in {server_s} s, the kernel pod's cell in {kernel_hand_s} s"
    );

    let ratio = |a: f64, b: f64| (a / b * 100.0).round() / 100.0;
    Ok(json!({
        "nb_stack_ready_s": stack_s,
        "nb_first_server_s": first_s,
        "nb_login_to_server_s": login_s,
        "nb_server_by_hand_s": server_s,
        "nb_server_overhead": ratio(login_s, server_s),
        "nb_kernel_first_result_s": kernel_s,
        "nb_kernel_by_hand_s": kernel_hand_s,
        "nb_kernel_overhead": ratio(kernel_s, kernel_hand_s),
        "nb_cell_s": (cell_s * 100.0).round() / 100.0,
    }))
}

/// Stops alice's server through the hub and waits until its pod is gone.
fn stop_server(room: &Room, token: &str) -> Result<()> {
    let r = room.hub_api(token, "DELETE", "/hub/api/users/alice/server", None)?;
    if r["status"] != 204 && r["status"] != 202 {
        bail!("stopping her server: {r}");
    }
    gone(room, "notebook-alice")
}

/// One field (a kubectl jsonpath) of `pod` in `lab-p1`, trimmed; an error as a poll's "not yet".
fn pod_field(room: &Room, pod: &str, path: &str) -> Result<String, String> {
    let got =
        room.kubectl(&format!("-n lab-p1 get pod {pod} -o jsonpath='{path}'"), "").map_err(|e| format!("{e:#}"))?;
    Ok(got.trim().to_string())
}

/// Waits until `lab-p1` has no pod matching `what` (kubectl's words: a name or `-l SELECTOR`).
fn gone(room: &Room, what: &str) -> Result<()> {
    poll(&format!("{what} gone"), SETTLE, Duration::from_secs(2), || {
        match room.kubectl(&format!("-n lab-p1 get pods {what} -o name --ignore-not-found"), "") {
            Ok(o) if o.trim().is_empty() => Ok(()),
            Ok(o) => Err(o),
            Err(e) => Err(format!("{e:#}")),
        }
    })?;
    Ok(())
}
