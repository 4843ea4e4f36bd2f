//! The stack's effects on the cluster, through the Kubernetes API (kube-rs): server-side apply
//! as field manager `labforge`, readiness gates read back, and pruning by label.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, ApiCapabilities, ApiResource, Scope};
use labforge_core::stack::{
    prune, readiness, Gate, ObjectRef, Readiness, Rendered, ResolvedComponent, FIELD_MANAGER, LABEL_COMPONENT,
    LABEL_MANAGED_BY,
};
use serde_json::Value;

/// A connection to the API server.
#[derive(Clone)]
pub struct Kube {
    client: kube::Client,
    /// What discovery said of each `apiVersion/kind` (one API call per kind per connection,
    /// not per object: a slow PC's API server has little to spare).
    kinds: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (ApiResource, ApiCapabilities)>>>,
}

/// Every API call gives up after this long (a slow PC's API server answers within it); the
/// client's own read and write timeouts enforce it.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

impl Kube {
    /// Connects with a kubeconfig (the master's `admin.conf`).
    pub async fn connect(kubeconfig: &Path) -> Result<Kube> {
        // kube-rs speaks TLS through rustls; the agent uses ring as its crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let mut cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("using {}", kubeconfig.display()))?;
        cfg.connect_timeout = Some(Duration::from_secs(10));
        cfg.read_timeout = Some(CALL_TIMEOUT);
        cfg.write_timeout = Some(CALL_TIMEOUT);
        let client = kube::Client::try_from(cfg).context("making the Kubernetes API client")?;
        Ok(Kube { client, kinds: Default::default() })
    }

    async fn resource(&self, api_version: &str, kind: &str) -> Result<(ApiResource, ApiCapabilities)> {
        let key = format!("{api_version}/{kind}");
        if let Some(found) = self.kinds.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(found.clone());
        }
        let found = self.discover(api_version, kind).await?;
        self.kinds.lock().unwrap_or_else(|p| p.into_inner()).insert(key, found.clone());
        Ok(found)
    }

    async fn discover(&self, api_version: &str, kind: &str) -> Result<(ApiResource, ApiCapabilities)> {
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind);
        discovery::pinned_kind(&self.client, &gvk).await.with_context(|| format!("finding {kind} in {api_version}"))
    }

    fn api(&self, ar: &ApiResource, caps: &ApiCapabilities, namespace: Option<&str>) -> Api<DynamicObject> {
        match (&caps.scope, namespace) {
            (Scope::Namespaced, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, ar),
            _ => Api::all_with(self.client.clone(), ar),
        }
    }

    /// Server-side applies `obj` (forcing conflicts: the component owns its fields). A
    /// namespaced object without a namespace goes to `default_ns`. Returns the object's identity
    /// as the API server keeps it (namespace set or dropped by the kind's scope).
    pub async fn apply(&self, obj: &Value, default_ns: &str) -> Result<ObjectRef> {
        let r = ObjectRef::of(obj)?;
        let (ar, caps) = self.resource(&r.api_version, &r.kind).await?;
        let mut obj = obj.clone();
        let ns = match caps.scope {
            Scope::Namespaced => {
                let ns = r.namespace.clone().unwrap_or_else(|| default_ns.to_string());
                obj["metadata"]["namespace"] = Value::String(ns.clone());
                Some(ns)
            }
            Scope::Cluster => {
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove("namespace");
                }
                None
            }
        };
        let api = self.api(&ar, &caps, ns.as_deref());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(&r.name, &params, &Patch::Apply(&obj)).await?;
        Ok(ObjectRef { namespace: ns, ..r })
    }

    /// The object, or None when it does not exist.
    pub async fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>> {
        let (ar, caps) = self.resource(api_version, kind).await?;
        let api = self.api(&ar, &caps, namespace);
        let got = api.get_opt(name).await?;
        Ok(got.map(|o| serde_json::to_value(o).expect("an API object serializes")))
    }

    /// Whether `kind` is namespaced (None when the API server does not serve it).
    pub async fn namespaced(&self, api_version: &str, kind: &str) -> Option<bool> {
        self.resource(api_version, kind).await.ok().map(|(_, caps)| caps.scope == Scope::Namespaced)
    }

    /// Every object of a kind (all namespaces) labelled as `component`'s.
    pub async fn labelled(&self, api_version: &str, kind: &str, component: &str) -> Result<Vec<Value>> {
        let (ar, _) = self.resource(api_version, kind).await?;
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let lp = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}=labforge,{LABEL_COMPONENT}={component}"));
        let list = api.list(&lp).await?;
        Ok(list
            .items
            .into_iter()
            .map(|mut o| {
                // A list's items carry no apiVersion/kind of their own.
                o.types = Some(kube::core::TypeMeta { api_version: api_version.to_string(), kind: kind.to_string() });
                serde_json::to_value(o).expect("an API object serializes")
            })
            .collect())
    }

    /// Makes Secret `name` in `namespace` hold every key in `keys`, each missing one with 32
    /// random characters; keys it already has are kept as they are (a password someone uses).
    /// Labelled `labforge.io/generated-for`, not as the component's: prune never takes it.
    pub async fn ensure_secret(&self, namespace: &str, name: &str, keys: &[String], component: &str) -> Result<()> {
        use k8s_openapi::api::core::v1::Secret;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let existing = api.get_opt(name).await?;
        let have: Vec<String> =
            existing.as_ref().map(|s| s.data.iter().flat_map(|d| d.keys().cloned()).collect()).unwrap_or_default();
        let mut missing = serde_json::Map::new();
        for k in keys.iter().filter(|k| !have.contains(k)) {
            missing.insert(k.clone(), Value::String(crate::sys::random_text(crate::sys::ALPHANUMERIC, 32)?));
        }
        if missing.is_empty() {
            return Ok(());
        }
        let body = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace, "labels": {"labforge.io/generated-for": component}},
            "type": "Opaque",
            "stringData": missing,
        });
        if existing.is_some() {
            api.patch(name, &PatchParams::default(), &Patch::Merge(&body)).await?;
        } else {
            let s: Secret = serde_json::from_value(body.clone()).expect("a Secret");
            api.create(&kube::api::PostParams::default(), &s).await?;
        }
        tracing::info!(component, "made secret {namespace}/{name} ({} new keys)", missing.len());
        Ok(())
    }

    pub async fn delete(&self, r: &ObjectRef) -> Result<()> {
        let (ar, caps) = self.resource(&r.api_version, &r.kind).await?;
        let api = self.api(&ar, &caps, r.namespace.as_deref());
        let dp =
            DeleteParams { propagation_policy: Some(kube::api::PropagationPolicy::Background), ..Default::default() };
        match api.delete(&r.name, &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Whether `e` says the API server could not be reached or did not answer (as opposed to an
/// answer refusing something): a connection refused or reset, a TLS or HTTP failure, a timeout.
pub fn unreachable(e: &anyhow::Error) -> bool {
    let mut api_answered = false;
    let mut transport = false;
    for cause in e.chain() {
        if let Some(k) = cause.downcast_ref::<kube::Error>() {
            match k {
                // Too many requests, or an API server that cannot serve yet (etcd timeouts,
                // starting up): as good as no answer.
                kube::Error::Api(s) if s.code == 429 || s.code >= 500 => transport = true,
                kube::Error::Api(_) => api_answered = true,
                kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::HttpError(_) => transport = true,
                _ => {}
            }
        }
    }
    transport && !api_answered
}

/// Whether `e` is the API server saying "not found" (a kind it does not serve, an object gone).
fn not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if s.code == 404)
            || matches!(c.downcast_ref::<kube::Error>(), Some(kube::Error::Discovery(_)))
    })
}

/// How a gate whose object is gone ends its message.
pub const MISSING: &str = "does not exist";

/// `apiVersion/kind`, as the state file records kinds.
pub fn kind_key(r: &ObjectRef) -> String {
    format!("{}/{}", r.api_version, r.kind)
}

/// The order objects go in: namespaces, then CRDs (waited for until established, so the
/// component's own custom resources can follow), then the rest as the templates have them.
fn apply_order(objects: &[Value]) -> Vec<&Value> {
    let rank = |o: &&Value| match o.get("kind").and_then(Value::as_str) {
        Some("Namespace") => 0,
        Some("CustomResourceDefinition") => 1,
        _ => 2,
    };
    let mut v: Vec<&Value> = objects.iter().collect();
    v.sort_by_key(rank);
    v
}

/// Applies every object of `c`, then deletes the objects it had before and no longer has.
/// Returns the kinds to remember (those applied now and those applied before).
pub async fn apply_component(
    kube: &Kube,
    c: &ResolvedComponent,
    (rendered, lab): (&Rendered, &labforge_core::lab::LabView),
    previous_kinds: &[String],
) -> Result<Vec<String>> {
    let mut secrets_made = c.secrets.is_empty();
    let mut current = Vec::with_capacity(rendered.objects.len());
    for obj in apply_order(&rendered.objects) {
        let r = ObjectRef::of(obj)?;
        if !secrets_made && r.kind != "Namespace" {
            // Once the namespaces exist, before anything that mounts a generated secret.
            for s in &c.secrets {
                kube.ensure_secret(&c.namespace, &s.name, &s.keys_for(lab), &c.name)
                    .await
                    .with_context(|| format!("making secret {}/{}", c.namespace, s.name))?;
            }
            secrets_made = true;
        }
        current.push(kube.apply(obj, &c.namespace).await.with_context(|| format!("applying {r}"))?);
        if r.kind == "CustomResourceDefinition" {
            wait_established(kube, &r).await?;
        }
    }
    let mut kinds: Vec<String> = previous_kinds.to_vec();
    for r in &current {
        let k = kind_key(r);
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    for k in &kinds {
        let Some((api_version, kind)) = k.rsplit_once('/') else { continue };
        let listed = match kube.labelled(api_version, kind, &c.name).await {
            Ok(l) => l,
            // A kind no longer served (its CRD gone) has nothing left to prune; any other
            // error fails the apply, which is then done again (and prunes then).
            Err(e) if not_found(&e) => {
                tracing::debug!("not pruning {k}: {e:#}");
                continue;
            }
            Err(e) => return Err(e.context(format!("listing the component's {k} objects to prune"))),
        };
        for stale in prune::stale(&c.name, &listed, &current) {
            tracing::info!(component = %c.name, "pruning {stale}: the component no longer has it");
            kube.delete(&stale).await.with_context(|| format!("pruning {stale}"))?;
        }
    }
    Ok(kinds)
}

async fn wait_established(kube: &Kube, r: &ObjectRef) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(o) = kube.get(&r.api_version, &r.kind, None, &r.name).await? {
            if readiness(&r.kind, &o, None) == Readiness::Ready {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{r} was not established within 2 minutes");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The gates of `c`: its declared ones, or else every workload, Job and CRD it has.
pub fn gates(c: &ResolvedComponent, rendered: &Rendered) -> Vec<Gate> {
    if !c.ready.is_empty() {
        return c.ready.clone();
    }
    rendered
        .refs()
        .into_iter()
        .filter(|r| {
            matches!(r.kind.as_str(), "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "CustomResourceDefinition")
        })
        .map(|r| Gate {
            kind: r.kind,
            name: r.name,
            namespace: r.namespace,
            api_version: Some(r.api_version),
            condition: None,
        })
        .collect()
}

/// Checks the gates in order; the first that does not hold is the answer.
pub async fn check_gates(kube: &Kube, c: &ResolvedComponent, rendered: &Rendered) -> Result<Readiness> {
    for g in gates(c, rendered) {
        let api_version = match &g.api_version {
            Some(v) => v.clone(),
            None => rendered
                .refs()
                .into_iter()
                .find(|r| r.kind == g.kind && r.name == g.name)
                .map(|r| r.api_version)
                .with_context(|| {
                format!("gate {} {}: give its api-version (no such object in the component)", g.kind, g.name)
            })?,
        };
        let namespaced = kube.namespaced(&api_version, &g.kind).await.unwrap_or(true);
        let ns = namespaced.then(|| g.namespace.clone().unwrap_or_else(|| c.namespace.clone()));
        let what = match &ns {
            Some(ns) => format!("{} {ns}/{}", g.kind, g.name),
            None => format!("{} {}", g.kind, g.name),
        };
        let Some(obj) = kube.get(&api_version, &g.kind, ns.as_deref(), &g.name).await? else {
            return Ok(Readiness::Waiting(format!("{what} {MISSING}")));
        };
        match readiness(&g.kind, &obj, g.condition.as_deref()) {
            Readiness::Ready => {}
            Readiness::Waiting(m) => return Ok(Readiness::Waiting(format!("{what}: {m}"))),
            Readiness::Failed(m) => return Ok(Readiness::Failed(format!("{what}: {m}"))),
        }
    }
    Ok(Readiness::Ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_count_as_failures_and_silence_does_not() {
        let status: kube::core::Status =
            serde_json::from_value(serde_json::json!({"code": 422, "message": "spec.replicas: Invalid value"}))
                .unwrap();
        let refused = anyhow::Error::new(kube::Error::Api(Box::new(status))).context("applying Deployment x/y");
        assert!(!unreachable(&refused), "the API server answered: the component's fault");
        let silent =
            anyhow::Error::new(kube::Error::Service("connection refused".into())).context("applying Deployment x/y");
        assert!(unreachable(&silent));
        let timed_out = anyhow::Error::new(kube::Error::Service("request timed out".into()));
        assert!(unreachable(&timed_out), "no answer within the client's timeout");
        let busy: kube::core::Status =
            serde_json::from_value(serde_json::json!({"code": 503, "message": "etcd"})).unwrap();
        assert!(unreachable(&anyhow::Error::new(kube::Error::Api(Box::new(busy)))), "5xx: not the component's fault");
        assert!(!unreachable(&anyhow::anyhow!("component x template a.yaml: undefined value")));
    }

    #[test]
    fn namespaces_and_crds_go_first_and_default_gates_cover_workloads() {
        let objs: Vec<Value> = ["ConfigMap", "CustomResourceDefinition", "Deployment", "Namespace"]
            .iter()
            .map(|k| serde_json::json!({"apiVersion": "v1", "kind": k, "metadata": {"name": k.to_lowercase()}}))
            .collect();
        let order: Vec<&str> = apply_order(&objs).iter().map(|o| o["kind"].as_str().unwrap()).collect();
        assert_eq!(order, ["Namespace", "CustomResourceDefinition", "ConfigMap", "Deployment"]);
        let c: ResolvedComponent = serde_json::from_value(serde_json::json!({
            "name": "x", "namespace": "x", "depends-on": [], "images": {}, "image-carrying": {},
            "settings": {}, "ready": [], "web": [], "templates": {}, "origin": "built-in", "build-digest": ""
        }))
        .unwrap();
        let r = Rendered { objects: objs, digest: String::new() };
        let kinds: Vec<String> = gates(&c, &r).into_iter().map(|g| g.kind).collect();
        assert_eq!(kinds, ["CustomResourceDefinition", "Deployment"]);
    }
}
