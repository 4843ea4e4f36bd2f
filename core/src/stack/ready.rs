//! Readiness of one object as the API server returned it (a readiness gate's check).

use serde_json::Value;

/// What a gate's object says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Not yet: why, in words a person reads in `/status`.
    Waiting(String),
    /// Will not become ready by waiting (a Job that failed).
    Failed(String),
}

fn int(v: &Value, p: &str) -> Option<i64> {
    v.pointer(p).and_then(Value::as_i64)
}

/// The status condition `kind` of `obj`: Some(true/false) when present.
pub fn condition(obj: &Value, kind: &str) -> Option<(bool, String)> {
    obj.pointer("/status/conditions")?.as_array()?.iter().find_map(|c| {
        (c.get("type")?.as_str()? == kind).then(|| {
            let status = c.get("status").and_then(Value::as_str) == Some("True");
            let msg =
                c.get("message").or_else(|| c.get("reason")).and_then(Value::as_str).unwrap_or_default().to_string();
            (status, msg)
        })
    })
}

/// Evaluates `obj` (of `kind`) for a gate; `want` is the gate's condition, if it names one.
pub fn readiness(kind: &str, obj: &Value, want: Option<&str>) -> Readiness {
    if let Some(c) = want {
        return match condition(obj, c) {
            Some((true, _)) => Readiness::Ready,
            Some((false, m)) if m.is_empty() => Readiness::Waiting(format!("condition {c} is not True")),
            Some((false, m)) => Readiness::Waiting(format!("condition {c} is not True: {m}")),
            None => Readiness::Waiting(format!("no {c} condition yet")),
        };
    }
    let generation = int(obj, "/metadata/generation").unwrap_or(0);
    let observed = int(obj, "/status/observedGeneration").unwrap_or(0);
    let rolled = || {
        if observed < generation {
            Some(Readiness::Waiting(format!("generation {generation} not yet observed")))
        } else {
            None
        }
    };
    match kind {
        "Deployment" | "StatefulSet" | "ReplicaSet" => {
            if let Some(w) = rolled() {
                return w;
            }
            let want = int(obj, "/spec/replicas").unwrap_or(1);
            let updated = int(obj, "/status/updatedReplicas").unwrap_or(0);
            let ready = if kind == "StatefulSet" {
                int(obj, "/status/readyReplicas").unwrap_or(0)
            } else {
                int(obj, "/status/availableReplicas").unwrap_or(0)
            };
            let total = int(obj, "/status/replicas").unwrap_or(0);
            if updated >= want && ready >= want && total <= want {
                Readiness::Ready
            } else {
                Readiness::Waiting(format!("{ready} of {want} replicas available, {updated} updated"))
            }
        }
        "DaemonSet" => {
            if let Some(w) = rolled() {
                return w;
            }
            let desired = int(obj, "/status/desiredNumberScheduled").unwrap_or(0);
            let available = int(obj, "/status/numberAvailable").unwrap_or(0);
            let updated = int(obj, "/status/updatedNumberScheduled").unwrap_or(0);
            if available >= desired && updated >= desired {
                Readiness::Ready
            } else {
                Readiness::Waiting(format!("{available} of {desired} nodes available, {updated} updated"))
            }
        }
        "Job" => match (condition(obj, "Complete"), condition(obj, "Failed")) {
            (Some((true, _)), _) => Readiness::Ready,
            (_, Some((true, m))) => Readiness::Failed(format!("job failed: {m}")),
            _ => Readiness::Waiting("job not complete".into()),
        },
        "CustomResourceDefinition" => match condition(obj, "Established") {
            Some((true, _)) => Readiness::Ready,
            _ => Readiness::Waiting("not established yet".into()),
        },
        "PersistentVolumeClaim" => match obj.pointer("/status/phase").and_then(Value::as_str) {
            Some("Bound") => Readiness::Ready,
            p => Readiness::Waiting(format!("claim is {}", p.unwrap_or("new"))),
        },
        // Objects without a status (ConfigMaps, StorageClasses, RBAC) are ready once they exist.
        _ => Readiness::Ready,
    }
}
