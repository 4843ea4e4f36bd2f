//! The stack task: waits until this node leads a cluster whose API server reports it Ready,
//! then applies the image's components round after round (see `plan` for what a round decides)
//! and reports each one in `/status` → `stack`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use labforge_core::stack::{render_with, upstream_objects, ClusterFacts, Readiness, StackPlan, STACK_PLAN};
use tokio::sync::watch;
use tracing::{info, warn};

use super::apply::{self, Kube};
use super::plan::{self, Applied, Memory, State, Step};
use super::{ComponentStatus, RoundStats, StackStatus, STATE_FILE};
use crate::cluster::kubeconfig::ADMIN_CONF;
use crate::cluster::ClusterView;
use crate::report::Report;

/// Between rounds while anything is on its way; once everything is ready, a round re-checks
/// the gates (and puts back what someone deleted) this often.
const BUSY: Duration = Duration::from_secs(10);
const SETTLED: Duration = Duration::from_secs(60);
/// How a failed component's message ends: ` (tried again in 20s)`.
const RETRY_NOTE: &str = " (tried again in ";

/// What the task needs from the node config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub pod_cidr: String,
    pub service_cidr: String,
    pub kubernetes_version: String,
}

pub async fn run(report: Report, settings: Settings, mut view: watch::Receiver<ClusterView>) -> Result<()> {
    let plan = match StackPlan::load(Path::new(STACK_PLAN)) {
        Ok(Some(p)) if !p.components.is_empty() => p,
        Ok(_) => return Ok(()),
        Err(e) => return stop(&report, &format!("the image's stack cannot be read: {e:#}")),
    };
    // Upstream files (Rook's CRDs are megabytes of YAML) do not depend on the cluster: parsed
    // once, not every round. One that does not parse fails its component every round.
    let upstream: Vec<Result<Vec<serde_json::Value>, String>> =
        plan.components.iter().map(|c| upstream_objects(c).map_err(|e| format!("{e:#}"))).collect();
    // The roster was checked at build time. One that fails here (an image built by another
    // labforge) stops the stack: rendering it as empty would prune every project's limits.
    let lab = match plan.lab.view() {
        Ok(l) => l,
        Err(e) => return stop(&report, &format!("the image's [lab] roster is not valid (nothing is applied): {e:#}")),
    };
    let stack_facts = StackFacts { components: plan.components.iter().map(|c| c.name.clone()).collect(), lab };
    let state_path = settings.state_dir.join(STATE_FILE);
    // Read once this node leads a cluster (the file is keyed by its uid).
    let mut memory = Memory::new();
    let mut uid = String::new();
    let mut statuses: Vec<ComponentStatus> = plan
        .components
        .iter()
        .map(|c| ComponentStatus {
            name: c.name.clone(),
            namespace: c.namespace.clone(),
            state: State::Blocked,
            message: "waiting for this node to lead a Ready cluster".into(),
            applied_digest: None,
            failures: 0,
            version: version(&c.images),
            web: c.web.clone(),
        })
        .collect();
    let mut failures: BTreeMap<String, (u32, Instant)> = BTreeMap::new();
    let mut kube: Option<Kube> = None;
    loop {
        // Only the leading master applies, and only once its API server says it is Ready and
        // every kube-system pod (control plane, kube-proxy, CoreDNS) is too: on a slow PC new
        // workloads would take the CPU a settling control plane needs.
        let leading = view.borrow().leading;
        let ready = report.snapshot().kube_api.is_some_and(|k| {
            k.node_ready == Some(true) && !k.control_plane.is_empty() && k.control_plane.iter().all(|p| p.ready)
        });
        // kubeadm starts once its own images are in; the components' keep coming in meanwhile,
        // and a pod whose image is not in yet would go to a registry the lab does not have.
        let images = plan::images_pending(&report.snapshot().preload);
        if !(leading && ready && images.is_none()) {
            kube = None;
            if leading {
                let why = images.filter(|_| ready).unwrap_or_else(|| {
                    "waiting for the API server to report this node and its kube-system pods Ready".into()
                });
                publish(&report, "waiting", &why, &statuses);
            } else {
                // Only the master applies a stack: on any other node there is none to report
                // (a worker's metrics would otherwise say every component is not ready).
                report.update(|s| s.stack = None);
            }
            tokio::select! {
                _ = view.changed() => {}
                _ = tokio::time::sleep(BUSY) => {}
            }
            continue;
        }
        let client = match &kube {
            Some(k) => k.clone(),
            None => match Kube::connect(Path::new(ADMIN_CONF)).await {
                Ok(k) => {
                    kube = Some(k.clone());
                    k
                }
                Err(e) => {
                    publish(&report, "waiting", &format!("cannot reach the API server: {e:#}"), &statuses);
                    tokio::time::sleep(BUSY).await;
                    continue;
                }
            },
        };
        let view_uid = view.borrow().uid.clone().unwrap_or_default();
        if view_uid != uid {
            uid = view_uid;
            memory = load_memory(&state_path, &uid);
            for st in statuses.iter_mut() {
                st.applied_digest = memory.get(&st.name).map(|a| a.digest.clone());
            }
        }
        let Some(facts) = facts(&report, &view.borrow(), &settings, &stack_facts) else {
            // Templates name the master's address: never render them without it.
            tokio::time::sleep(BUSY).await;
            continue;
        };
        let started = Instant::now();
        let (all_ready, applied) = round(
            &client,
            (&plan, &upstream),
            &facts,
            &mut memory,
            &mut failures,
            &mut statuses,
            &report,
            (&state_path, &uid),
        )
        .await;
        let stats = RoundStats { took_ms: started.elapsed().as_millis() as u64, applied };
        report.update(|s| {
            if let Some(st) = s.stack.as_mut() {
                st.last_round = Some(stats);
            }
        });
        tokio::time::sleep(if all_ready { SETTLED } else { BUSY }).await;
    }
}

/// One pass over the components in order. Returns whether every one is ready, and how many
/// were applied.
#[allow(clippy::too_many_arguments)]
async fn round(
    kube: &Kube,
    (plan, upstream): (&StackPlan, &[Result<Vec<serde_json::Value>, String>]),
    facts: &ClusterFacts,
    memory: &mut Memory,
    failures: &mut BTreeMap<String, (u32, Instant)>,
    statuses: &mut [ComponentStatus],
    report: &Report,
    (state_path, uid): (&Path, &str),
) -> (bool, u32) {
    let mut ready: BTreeMap<String, bool> = BTreeMap::new();
    let mut applied = 0;
    for (i, c) in plan.components.iter().enumerate() {
        let rendered = match &upstream[i] {
            Ok(objects) => render_with(c, facts, objects),
            Err(e) => Err(anyhow::anyhow!("{e}")),
        };
        let (count, since) = failures.get(&c.name).map(|(n, at)| (*n, at.elapsed())).unwrap_or((0, Duration::ZERO));
        let input = plan::Input {
            name: &c.name,
            depends_on: &c.depends_on,
            digest: rendered.as_ref().ok().map(|r| r.digest.as_str()),
            failures: count,
            since_failure: since,
        };
        let step = plan::step(&input, memory, &ready);
        let checked_only = step == Step::Check;
        statuses[i].failures = count;
        let outcome: Result<Readiness> = match step {
            Step::Wait { on } => {
                statuses[i].state = State::Blocked;
                statuses[i].message = format!("waits for {on} to be ready");
                ready.insert(c.name.clone(), false);
                publish_round(report, statuses);
                continue;
            }
            Step::Pause { left } => {
                statuses[i].state = State::Failed;
                let cause = statuses[i].message.split(RETRY_NOTE).next().unwrap_or_default().to_string();
                statuses[i].message = format!("{cause}{RETRY_NOTE}{}s)", left.as_secs());
                ready.insert(c.name.clone(), false);
                publish_round(report, statuses);
                continue;
            }
            Step::Apply => match rendered {
                Err(e) => Err(e),
                Ok(r) => {
                    statuses[i].state = State::Applying;
                    statuses[i].message = format!("applying {} objects", r.objects.len());
                    publish_round(report, statuses);
                    info!(component = %c.name, digest = %&r.digest[..12], "applying");
                    let previous = memory.get(&c.name).map(|a| a.kinds.clone()).unwrap_or_default();
                    match apply::apply_component(kube, c, (&r, &facts.lab), &previous).await {
                        Err(e) => Err(e),
                        Ok(kinds) => {
                            // Recorded once every object was accepted: a power cut before
                            // this applies again, which server-side apply makes harmless.
                            memory.insert(c.name.clone(), Applied { digest: r.digest.clone(), kinds });
                            applied += 1;
                            save_memory(state_path, uid, memory);
                            statuses[i].applied_digest = Some(r.digest.clone());
                            apply::check_gates(kube, c, &r).await
                        }
                    }
                }
            },
            Step::Check => match rendered {
                Err(e) => Err(e),
                Ok(r) => apply::check_gates(kube, c, &r).await,
            },
        };
        let is_ready = matches!(outcome, Ok(Readiness::Ready));
        match outcome {
            Ok(Readiness::Ready) => {
                if statuses[i].state != State::Ready {
                    info!(component = %c.name, "ready");
                }
                statuses[i].state = State::Ready;
                statuses[i].message = String::new();
                failures.remove(&c.name);
                statuses[i].failures = 0;
            }
            Ok(Readiness::Waiting(m)) if checked_only && m.ends_with(apply::MISSING) => {
                // Someone deleted what the component had: it is applied again next round.
                warn!(component = %c.name, "{m}: applying it again");
                memory.remove(&c.name);
                save_memory(state_path, uid, memory);
                statuses[i].state = State::Waiting;
                statuses[i].message = format!("{m}: applying it again");
            }
            Ok(Readiness::Waiting(m)) => {
                // Applied and on its way: earlier failures are over.
                failures.remove(&c.name);
                statuses[i].failures = 0;
                statuses[i].state = State::Waiting;
                statuses[i].message = m;
            }
            Ok(Readiness::Failed(m)) => fail(&mut statuses[i], failures, &c.name, m),
            // The API server not answering is not the component's fault (a slow PC's API
            // server restarts now and then): no failure counted, the round ends, the next one
            // comes after the usual short pause.
            Err(e) if apply::unreachable(&e) => {
                statuses[i].message = format!("the API server did not answer: {e:#}");
                ready.insert(c.name.clone(), false);
                publish_round(report, statuses);
                return (false, applied);
            }
            Err(e) => fail(&mut statuses[i], failures, &c.name, format!("{e:#}")),
        }
        ready.insert(c.name.clone(), is_ready);
        publish_round(report, statuses);
    }
    (statuses.iter().all(|s| s.state == State::Ready), applied)
}

/// `key tag` of each image, for people (the portal, `labforge-agent stack`).
fn version(images: &BTreeMap<String, String>) -> String {
    let tag = |r: &str| match labforge_core::stack::images::split(r) {
        (_, Some(t), _) => t.to_string(),
        (_, None, Some(d)) => d.chars().take(19).collect(),
        (_, None, None) => "latest".into(),
    };
    images.iter().map(|(k, r)| format!("{k} {}", tag(r))).collect::<Vec<_>>().join(", ")
}

fn fail(st: &mut ComponentStatus, failures: &mut BTreeMap<String, (u32, Instant)>, name: &str, message: String) {
    let n = failures.get(name).map_or(0, |(n, _)| *n) + 1;
    failures.insert(name.to_string(), (n, Instant::now()));
    warn!(component = %name, failures = n, "{message}");
    st.state = State::Failed;
    st.failures = n;
    st.message = format!("{message}{RETRY_NOTE}{}s)", plan::backoff(n).as_secs());
}

fn publish_round(report: &Report, statuses: &[ComponentStatus]) {
    let (state, message) = summary(statuses);
    publish(report, state, &message, statuses);
}

/// The stack's state in one word, and a line for the console.
pub fn summary(statuses: &[ComponentStatus]) -> (&'static str, String) {
    let ready = statuses.iter().filter(|s| s.state == State::Ready).count();
    let failed: Vec<&str> = statuses.iter().filter(|s| s.state == State::Failed).map(|s| s.name.as_str()).collect();
    if ready == statuses.len() {
        ("ready", format!("{ready} components ready"))
    } else if !failed.is_empty() {
        ("degraded", format!("{ready} of {} components ready; failing: {}", statuses.len(), failed.join(", ")))
    } else {
        ("applying", format!("{ready} of {} components ready", statuses.len()))
    }
}

fn publish(report: &Report, state: &str, message: &str, statuses: &[ComponentStatus]) {
    report.update(|s| {
        let last_round = s.stack.as_ref().and_then(|st| st.last_round);
        s.stack = Some(StackStatus {
            state: state.into(),
            message: message.into(),
            components: statuses.to_vec(),
            last_round,
        })
    });
}

/// The stack cannot run at all: said once, in the log and as the stack's `error` state; the
/// task then ends.
fn stop(report: &Report, message: &str) -> Result<()> {
    warn!("{message}");
    report.update(|s| {
        s.stack = Some(StackStatus {
            state: "error".into(),
            message: message.to_string(),
            components: Vec::new(),
            last_round: None,
        })
    });
    Ok(())
}

/// What templates know of the stack itself, the same every round.
struct StackFacts {
    components: Vec<String>,
    lab: labforge_core::lab::LabView,
}

/// What templates know at run time: the nodes the API server lists and the master's address.
fn facts(report: &Report, view: &ClusterView, settings: &Settings, stack: &StackFacts) -> Option<ClusterFacts> {
    let master_address = view.lan.as_ref()?.address.to_string();
    let snapshot = report.snapshot();
    let ceph_devices = snapshot
        .ceph
        .map(|c| {
            c.nodes
                .into_iter()
                .filter(|(_, d)| !d.is_empty())
                .map(|(n, mut d)| {
                    d.sort();
                    d.dedup();
                    (n, d)
                })
                .collect()
        })
        .unwrap_or_default();
    let api = snapshot.kube_api;
    let mut names: Vec<String> = api.map(|k| k.nodes.into_iter().map(|n| n.name).collect()).unwrap_or_default();
    names.sort();
    Some(ClusterFacts {
        nodes: names.len().max(1) as u32,
        node_names: names,
        master_address,
        pod_cidr: settings.pod_cidr.clone(),
        service_cidr: settings.service_cidr.clone(),
        kubernetes_version: settings.kubernetes_version.clone(),
        ceph_devices,
        components: stack.components.clone(),
        lab: stack.lab.clone(),
    })
}

/// The state file: what was applied, to which cluster.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Saved {
    cluster_uid: String,
    applied: Memory,
}

/// What was applied to cluster `uid` (nothing, if the file speaks of another cluster: one
/// formed anew keeps nothing of the old one's stack).
fn load_memory(path: &Path, uid: &str) -> Memory {
    match std::fs::read(path) {
        Ok(b) => match serde_json::from_slice::<Saved>(&b) {
            Ok(s) if s.cluster_uid == uid => s.applied,
            Ok(s) => {
                warn!(
                    "{} records cluster {}, not {uid}: every component is applied again",
                    path.display(),
                    s.cluster_uid
                );
                Memory::new()
            }
            Err(e) => {
                warn!("{} is unreadable ({e}); every component is applied again", path.display());
                Memory::new()
            }
        },
        Err(_) => Memory::new(),
    }
}

fn save_memory(path: &Path, uid: &str, memory: &Memory) {
    let saved = Saved { cluster_uid: uid.to_string(), applied: memory.clone() };
    let r = serde_json::to_vec_pretty(&saved)
        .context("encoding")
        .and_then(|b| crate::sys::fs::write_durable_mode(path, &b, 0o600));
    if let Err(e) = r {
        warn!("recording the applied stack in {}: {e:#}", path.display());
    }
}
