//! Image references in rendered objects, and whether a preload set covers them.

use serde_json::Value;

use super::{ImageCarrying, ObjectRef};

/// One image reference found in an object, with the field it was found in
/// (`spec.template.spec.containers[0].image`, `…args[2]`, `…env[HELPER_IMAGE]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundImage {
    pub object: ObjectRef,
    pub field: String,
    pub reference: String,
    /// The container's `imagePullPolicy`, for a container's own `image`.
    pub pull_policy: Option<String>,
}

/// Every image reference in `obj`: each container's, init container's and ephemeral container's
/// `image` in a Pod or a workload's pod template, and the arguments and environment variables
/// the component declares as image-carrying.
pub fn images_in(obj: &Value, carrying: &ImageCarrying) -> Vec<FoundImage> {
    let Ok(object) = ObjectRef::of(obj) else { return Vec::new() };
    if object.kind == "ConfigMap" {
        return configmap_pods(obj, &object, carrying);
    }
    let fields: Vec<FoundImage> = carrying
        .fields
        .iter()
        .filter_map(|f| f.split_once(':').filter(|(kind, _)| *kind == object.kind))
        .filter_map(|(_, pointer)| {
            Some(FoundImage {
                object: object.clone(),
                field: pointer.trim_start_matches('/').replace('/', "."),
                reference: obj.pointer(pointer)?.as_str()?.to_string(),
                pull_policy: None,
            })
        })
        .collect();
    let pod_spec = match object.kind.as_str() {
        "Pod" => "/spec",
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
            "/spec/template/spec"
        }
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        "PodTemplate" => "/template/spec",
        _ => return fields,
    };
    let Some(spec) = obj.pointer(pod_spec) else { return fields };
    let base = pod_spec.trim_start_matches('/').replace('/', ".");
    let mut found = fields;
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        let Some(cs) = spec.get(list).and_then(Value::as_array) else { continue };
        for (i, c) in cs.iter().enumerate() {
            let at = format!("{base}.{list}[{i}]");
            if let Some(img) = c.get("image").and_then(Value::as_str) {
                found.push(FoundImage {
                    object: object.clone(),
                    field: format!("{at}.image"),
                    reference: img.into(),
                    pull_policy: c.get("imagePullPolicy").and_then(Value::as_str).map(str::to_string),
                });
            }
            // `command` and `args` as the one argv they make: a flag at the end of `command`
            // may take its value from the start of `args`.
            let words = |key: &str| -> Vec<(String, usize, &str)> {
                c.get(key)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter().enumerate().filter_map(|(j, v)| Some((key.to_string(), j, v.as_str()?))).collect()
                    })
                    .unwrap_or_default()
            };
            let argv: Vec<(String, usize, &str)> = words("command").into_iter().chain(words("args")).collect();
            {
                let args: Vec<&str> = argv.iter().map(|(_, _, a)| *a).collect();
                for (n, a) in args.iter().enumerate() {
                    let (key, j) = (&argv[n].0, argv[n].1);
                    for flag in &carrying.args {
                        let value = if let Some(v) = a.strip_prefix(flag.as_str()).and_then(|r| r.strip_prefix('=')) {
                            Some(v)
                        } else if *a == flag.as_str() {
                            args.get(n + 1).copied()
                        } else {
                            None
                        };
                        if let Some(v) = value {
                            found.push(FoundImage {
                                object: object.clone(),
                                field: format!("{at}.{key}[{j}] ({flag})"),
                                reference: v.into(),
                                pull_policy: None,
                            });
                        }
                    }
                }
            }
            if let Some(env) = c.get("env").and_then(Value::as_array) {
                for e in env {
                    let (Some(n), Some(v)) =
                        (e.get("name").and_then(Value::as_str), e.get("value").and_then(Value::as_str))
                    else {
                        continue;
                    };
                    if carrying.env.iter().any(|x| x == n) {
                        found.push(FoundImage {
                            object: object.clone(),
                            field: format!("{at}.env[{n}]"),
                            reference: v.into(),
                            pull_policy: None,
                        });
                    }
                }
            }
        }
    }
    found
}

/// Images of the Pod templates a ConfigMap holds under the declared keys (a key whose text is not
/// a Pod is reported as such, so the check cannot be dodged by a typo).
fn configmap_pods(obj: &Value, object: &ObjectRef, carrying: &ImageCarrying) -> Vec<FoundImage> {
    let mut found = Vec::new();
    for key in &carrying.configmap_pods {
        let Some(text) = obj.pointer("/data").and_then(|d| d.get(key)).and_then(Value::as_str) else { continue };
        let pod: Value = serde_yaml_ng::from_str(text).unwrap_or(Value::Null);
        let mut pod = pod;
        if let Some(m) = pod.as_object_mut() {
            m.entry("metadata").or_insert_with(|| serde_json::json!({"name": "template"}));
        }
        let inner = images_in(&pod, &ImageCarrying { configmap_pods: vec![], ..carrying.clone() });
        if inner.is_empty() {
            found.push(FoundImage {
                object: object.clone(),
                field: format!("data[{key}]"),
                reference: "<not a Pod template with containers>".into(),
                pull_policy: None,
            });
        }
        for f in inner {
            found.push(FoundImage { object: object.clone(), field: format!("data[{key}].{}", f.field), ..f });
        }
    }
    found
}

/// A reference's repository, tag and digest: `registry:5000/a/b:1@sha256:…` →
/// (`registry:5000/a/b`, `1`, `sha256:…`). A tag is after the last `:` that follows the last `/`.
pub fn split(reference: &str) -> (&str, Option<&str>, Option<&str>) {
    let (named, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    let slash = named.rfind('/').map(|i| i + 1).unwrap_or(0);
    match named[slash..].rfind(':') {
        Some(i) => (&named[..slash + i], Some(&named[slash + i + 1..]), digest),
        None => (named, None, digest),
    }
}

/// A reference in the form containerd records it: registry host, repository path with Docker
/// Hub's `library/` for single names, and `:latest` when neither tag nor digest is given.
pub fn normalize(reference: &str) -> String {
    let (name, tag, digest) = split(reference);
    let suffix = match (digest, tag) {
        (Some(d), _) => format!("@{d}"),
        (None, Some(t)) => format!(":{t}"),
        (None, None) => ":latest".to_string(),
    };
    let first = name.split('/').next().unwrap_or("");
    let has_registry = name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_registry {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{full}{suffix}")
}

/// Whether `reference` is one of `preloaded` (each a reference as the spec wrote it, with the
/// digest it was pinned to): the same name and tag, or the same repository at the pinned digest.
pub fn covered(reference: &str, preloaded: &[(String, String)]) -> bool {
    let want = normalize(reference);
    preloaded.iter().any(|(r, digest)| {
        let have = normalize(r);
        if have == want {
            return true;
        }
        let (want_repo, _, want_digest) = split(&want);
        want_digest.is_some_and(|d| d == digest && want_repo == split(&have).0)
    })
}
