//! `student_runs_code_within_project_limits`: the notebooks component in a real cluster. One
//! PC boots `qemu-tests/images/notebooks.toml` (real Kubernetes from the fixture, the stack
//! storage + projects + notebooks, the roster alice in p1 and bob in p2) on a bare switch, and
//! the test is a student's browser on the LAN:
//!
//! - alice logs in to the hub on its NodePort with the password the master made for her, and
//!   starts her server: it runs in lab-p1, as uid 2001, within p1's limits; p2 is refused;
//! - in her server she makes an environment with `lab-env`; through her server (jupyter-server
//!   to the gateway, as a browser's notebook does) her kernel list is the shared kernel and her
//!   environment, never bob's;
//! - she starts a kernel in her environment and runs code over the kernel protocol: it prints
//!   its uid and its cgroup's `cpu.max` and `memory.max`, which are her roster uid and p1's
//!   maximum, and writes a file into her home;
//! - from her server, her own code asks the gateway for a kernel in p2 (refused, with the
//!   reason) and for one with 8 CPUs and 64 GiB as bob (the pod gets p1's limits, her uid);
//! - her file is there after her server restarts, and after the PC loses power and comes back;
//! - bob's server runs in lab-p2 as uid 2002 with his own home: alice's file is not in it, and
//!   uid 2002 cannot read her home's directory on the master.
//!
//! Login to server ready and kernel start to first result are printed (`notebooks room:`).
//! Not part of `make test` (a real cluster under TCG; see the README's "CI time").

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use qemu_tests::notebooks_room::{spec_names, stack_ready, Room, CODE, HOMES, SETTLE};
use qemu_tests::poll;
use serde_json::{json, Value};

#[test]
#[ignore = "a real cluster under TCG (about 40 minutes): cargo test -p qemu-tests --test notebooks_room -- --ignored"]
fn student_runs_code_within_project_limits() -> Result<()> {
    qemu_tests::notebooks_room::in_room(scenario)
}

fn scenario(room: &mut Room) -> Result<()> {
    let on = Instant::now();
    room.power_on()?;
    room.wait_ready("the PC Ready")?;
    eprintln!("notebooks room: power-on to node Ready in {:.0?}", on.elapsed());
    let s = room.remote.wait_api("the stack ready", SETTLE, stack_ready)?;
    eprintln!("notebooks room: power-on to the stack ready in {:.0?}", on.elapsed());
    let names: Vec<&str> = s.stack.as_ref().expect("stack").components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["storage", "projects", "notebooks"]);
    // The homes Job made each home once, the user's, 0700.
    for (user, uid) in [("alice", 2001), ("bob", 2002)] {
        let st = room.remote.run(&format!("sudo stat -c '%a %u %g' {HOMES}/{user}"), "")?;
        assert_eq!(st.trim(), format!("700 {uid} {uid}"), "{user}'s home");
    }

    // --- The hub's refusals (wrong, unknown and empty passwords; p2; bob's server): the same
    // report as the loopback test's, now through the proxy of a real cluster, asked before
    // alice has a server (with one running, the hub answers "already running" to any start).
    let alice_pw = room.password("alice")?;
    let bob_pw = room.password("bob")?;
    let r = room.client("hub_client.py", &["report", &room.hub(), &alice_pw, &bob_pw])?;
    for case in ["wrong_password", "not_on_roster", "empty_password"] {
        assert_eq!(r[case]["whoami"], 403, "{case}: {r}");
    }
    assert_eq!(r["spawn_p2"]["status"], 403, "{r}");
    assert!(r["spawn_p2"]["message"].as_str().unwrap_or("").contains("not a member of project p2"), "{r}");
    // Refused without saying whether bob exists (404 to a user who may not see him).
    assert!(r["spawn_for_bob"]["status"] == 403 || r["spawn_for_bob"]["status"] == 404, "{r}");
    assert_eq!((r["bob"]["name"].as_str(), r["bob"]["admin"].as_bool()), (Some("bob"), Some(true)), "{r}");

    // --- alice logs in and starts her server in p1.
    let login = Instant::now();
    let alice = room.token("alice", &alice_pw)?;
    let to_ready = room.server_up("alice", &alice, "p1")?;
    eprintln!("notebooks room: login to alice's server ready in {:.0?} (first start)", login.elapsed());
    eprintln!("notebooks room: (the server's start alone: {to_ready:.0?})");
    let pod: Value = serde_json::from_str(&room.kubectl("-n lab-p1 get pod notebook-alice -o json", "")?)?;
    // KubeSpawner sets the user on the container (as the loopback test checks).
    let sc = &pod["spec"]["containers"][0]["securityContext"];
    assert_eq!((sc["runAsUser"].as_u64(), sc["runAsGroup"].as_u64()), (Some(2001), Some(2001)), "{sc}");
    assert_eq!(sc["runAsNonRoot"], true, "{sc}");
    let res = &pod["spec"]["containers"][0]["resources"];
    let cpu = |v: &Value| labforge_core::lab::cpu(v.as_str().unwrap_or("")).unwrap_or(0);
    let mem = |v: &Value| labforge_core::lab::memory(v.as_str().unwrap_or("")).unwrap_or(0);
    assert_eq!((cpu(&res["limits"]["cpu"]), mem(&res["limits"]["memory"])), (1000, 512 << 20), "{res}");

    // --- her environment, made in her server; her kernel list through her server.
    let made = room.in_server("p1", "alice", "lab-env create stats", "")?;
    assert!(made.contains("stats is ready"), "{made}");
    let specs = room.server_api("alice", &alice, "GET", "/api/kernelspecs", None)?;
    assert_eq!(spec_names(&specs), ["env-stats", "python3"], "{specs}");

    // --- a kernel in her environment, started through her server; her code over the kernel
    // protocol.
    let asked = Instant::now();
    let k = room.server_api("alice", &alice, "POST", "/api/kernels", Some(&json!({"name": "env-stats"})))?;
    assert_eq!(k["status"], 201, "her kernel started: {k}\n{}", room.pods_of("p1"));
    let kernel_id = k["body"]["id"].as_str().context("a kernel id")?.to_string();
    let base = format!("{}/user/alice", room.hub());
    let ran = room.client("gateway_client.py", &["run", &base, &alice, &kernel_id, CODE])?;
    eprintln!("notebooks room: kernel start to first result in {:.0?}", asked.elapsed());
    assert_eq!(ran["reply"], "ok", "{ran}");
    let out: Vec<String> = ran["stdout"].as_str().unwrap_or("").split_whitespace().map(str::to_string).collect();
    // uid gid, cpu.max (quota period: 1 CPU), memory.max (512 MiB), her environment's Python.
    assert_eq!(
        out,
        ["2001", "2001", "100000", "100000", "536870912", "/home/jovyan/.lab-envs/stats"],
        "her kernel: {ran}"
    );
    let kpods: Value = serde_json::from_str(&room.kubectl("-n lab-p1 get pods -l component=kernel -o json", "")?)?;
    let kp = &kpods["items"][0];
    assert_eq!(kp["metadata"]["labels"]["labforge.io/user"], "alice", "{kp}");
    let warm = Instant::now();
    let again = room.client("gateway_client.py", &["run", &base, &alice, &kernel_id, "print(6 * 7)"])?;
    assert_eq!(again["stdout"], "42\n", "{again}");
    eprintln!("notebooks room: a cell on the running kernel in {:.1?}", warm.elapsed());
    let stop = room.server_api("alice", &alice, "DELETE", &format!("/api/kernels/{kernel_id}"), None)?;
    assert_eq!(stop["status"], 204, "{stop}");
    // Its pod goes (and frees the node's CPU for the next one).
    poll("her kernel's pod removed", SETTLE, Duration::from_secs(5), || {
        match room.kubectl("-n lab-p1 get pods -l component=kernel -o name", "") {
            Ok(o) if o.trim().is_empty() => Ok(()),
            Ok(o) => Err(o),
            Err(e) => Err(format!("{e:#}")),
        }
    })?;

    // --- her own code, in her server, asks the gateway directly for more than p1 allows.
    let script = std::fs::read_to_string(qemu_tests::workspace_root().join("qemu-tests/notebooks/gateway_client.py"))?;
    let p2 = room.in_server(
        "p1",
        "alice",
        "python3 - start \"$JUPYTER_GATEWAY_URL\" \"$JUPYTERHUB_API_TOKEN\" python3 p2",
        &script,
    )?;
    let p2: Value = serde_json::from_str(p2.trim())?;
    assert_eq!(p2["status"], 403, "{p2}");
    assert!(p2["body"]["message"].as_str().unwrap_or("").contains("alice is not a member of project p2"), "{p2}");
    // As bob, uid 0, 8 CPUs, 64 GiB, another image: the kernel is hers, within p1.
    let greedy = room.in_server(
        "p1",
        "alice",
        "python3 - start \"$JUPYTER_GATEWAY_URL\" \"$JUPYTERHUB_API_TOKEN\" python3 p1",
        &script,
    )?;
    let greedy: Value = serde_json::from_str(greedy.trim())?;
    assert_eq!(greedy["status"], 201, "{greedy}\n{}", room.pods_of("p1"));
    let gid = greedy["body"]["id"].as_str().context("a kernel id")?;
    let gpods: Value = serde_json::from_str(
        &room.kubectl(&format!("-n lab-p1 get pods -l component=kernel,kernel_id={gid} -o json"), "")?,
    )?;
    assert_eq!(gpods["items"].as_array().map(Vec::len), Some(1), "{gpods}");
    let gpod = &gpods["items"][0];
    let gsc = &gpod["spec"]["securityContext"];
    assert_eq!((gsc["runAsUser"].as_u64(), gsc["runAsGroup"].as_u64()), (Some(2001), Some(2001)), "{gsc}");
    let gres = &gpod["spec"]["containers"][0]["resources"];
    assert_eq!((cpu(&gres["limits"]["cpu"]), mem(&gres["limits"]["memory"])), (1000, 512 << 20), "{gres}");
    assert_eq!(gpod["metadata"]["labels"]["labforge.io/user"], "alice", "{gpod}");
    // Started past her server, so stopped the same way (her server never knew it).
    let stop = room.in_server(
        "p1",
        "alice",
        &format!("python3 - call \"$JUPYTER_GATEWAY_URL\" \"$JUPYTERHUB_API_TOKEN\" DELETE /api/kernels/{gid}"),
        &script,
    )?;
    let stop: Value = serde_json::from_str(stop.trim())?;
    assert_eq!(stop["status"], 204, "{stop}");

    // --- her server restarts: her file is in her home.
    let r = room.hub_api(&alice, "DELETE", "/hub/api/users/alice/server", None)?;
    assert!(r["status"] == 204 || r["status"] == 202, "{r}");
    poll("alice's server stopped", SETTLE, Duration::from_secs(5), || {
        let m = room.hub_api(&alice, "GET", "/hub/api/users/alice", None).map_err(|e| format!("{e:#}"))?;
        if m["body"]["servers"].get("").is_none() {
            Ok(())
        } else {
            Err(format!("{m}"))
        }
    })?;
    let restarted = Instant::now();
    room.server_up("alice", &alice, "p1")?;
    eprintln!("notebooks room: alice's server started again in {:.0?} (warm node)", restarted.elapsed());
    let file = room.server_api("alice", &alice, "GET", "/api/contents/proof.txt", None)?;
    assert_eq!(file["body"]["content"], "alice-was-here", "{file}");

    // --- bob: his own server in p2, his own home, his own environments.
    let bob = room.token("bob", &bob_pw)?;
    room.server_up("bob", &bob, "p2")?;
    let pod: Value = serde_json::from_str(&room.kubectl("-n lab-p2 get pod notebook-bob -o json", "")?)?;
    assert_eq!(pod["spec"]["containers"][0]["securityContext"]["runAsUser"], 2002, "{pod}");
    let made = room.in_server("p2", "bob", "lab-env create bobs", "")?;
    assert!(made.contains("bobs is ready"), "{made}");
    let listed = room.in_server("p2", "bob", "ls -A /home/jovyan; id -u", "")?;
    assert!(!listed.contains("proof.txt") && listed.contains("2002"), "bob's home: {listed}");
    assert_eq!(spec_names(&room.server_api("bob", &bob, "GET", "/api/kernelspecs", None)?), ["env-bobs", "python3"]);
    assert_eq!(
        spec_names(&room.server_api("alice", &alice, "GET", "/api/kernelspecs", None)?),
        ["env-stats", "python3"],
        "alice never sees bob's environment"
    );
    // His uid cannot read her home on the master; her project's namespace is the only one with
    // a claim on it.
    let peek = room
        .remote
        .ssh(&format!("sudo setpriv --reuid=2002 --regid=2002 --clear-groups cat {HOMES}/alice/proof.txt"), "")?;
    assert!(!peek.status.success(), "uid 2002 read alice's file");
    assert!(String::from_utf8_lossy(&peek.stderr).contains("Permission denied"), "{peek:?}");
    let claims = room.kubectl("-n lab-p2 get pvc -o name", "")?;
    assert_eq!(claims.trim(), "persistentvolumeclaim/home-bob", "{claims}");

    // --- the power goes; the cluster, the hub and her file come back by themselves.
    room.journal();
    room.power_cut()?;
    let back = Instant::now();
    room.power_on()?;
    room.wait_ready("the PC Ready after the power cut")?;
    room.remote.wait_api("the stack ready after the power cut", SETTLE, stack_ready)?;
    eprintln!("notebooks room: power-on after the cut to the stack ready in {:.0?}", back.elapsed());
    let alice = room.token("alice", &alice_pw)?;
    room.server_up("alice", &alice, "p1")?;
    let file = room.server_api("alice", &alice, "GET", "/api/contents/proof.txt", None)?;
    assert_eq!(file["body"]["content"], "alice-was-here", "after the power cut: {file}");
    eprintln!("notebooks room: power-on after the cut to alice's file in {:.0?}", back.elapsed());
    // Nothing was pulled: every image came on the stick.
    let pulls = room.remote.run("sudo journalctl -u containerd --no-pager -o cat | grep -c 'PullImage' || true", "")?;
    assert_eq!(pulls.trim(), "0", "containerd pulled images");
    room.journal();
    room.vm.as_mut().expect("running").check_console_health()
}
