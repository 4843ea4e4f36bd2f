//! Rendering a component's templates into Kubernetes objects.
//!
//! Templates are minijinja with strict undefined values: a misspelt setting fails the build
//! instead of rendering an empty string; filter `sha256` digests a text (a config's checksum
//! in a pod template's annotations), `tojson` writes a value as JSON. Context: `component` (`name`, `namespace`), `settings`,
//! `images`, `cluster` ([`ClusterFacts`]) and `lab` (the roster, [`crate::lab::LabView`]). Each file may hold several YAML documents; empty
//! documents are skipped. Every object gets the labels that mark it as the component's.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{ResolvedComponent, LABEL_COMPONENT, LABEL_MANAGED_BY};

/// What templates may know about the cluster. The builder renders with [`ClusterFacts::at_build`]
/// (one node, documentation addresses) to prove the objects well formed and air-gapped; the
/// master renders again with the real values.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ClusterFacts {
    /// Nodes in the cluster (Ready or not).
    pub nodes: u32,
    /// Their names.
    pub node_names: Vec<String>,
    /// The master's LAN address.
    pub master_address: String,
    pub pod_cidr: String,
    pub service_cidr: String,
    pub kubernetes_version: String,
    /// The disks each node offers to Ceph: node name → `/dev/disk/by-id` paths (empty at build
    /// time, and on a cluster whose nodes offer none).
    #[serde(default)]
    pub ceph_devices: BTreeMap<String, Vec<String>>,
    /// The components the stack runs (a template may use a class another one provides).
    #[serde(default)]
    pub components: Vec<String>,
    /// The lab roster, checked (templates see it as `lab`).
    #[serde(default)]
    pub lab: crate::lab::LabView,
}

impl ClusterFacts {
    pub fn at_build(pod_cidr: &str, service_cidr: &str, kubernetes_version: &str) -> ClusterFacts {
        ClusterFacts {
            nodes: 1,
            node_names: vec!["node".into()],
            master_address: "192.0.2.1".into(),
            pod_cidr: pod_cidr.into(),
            service_cidr: service_cidr.into(),
            kubernetes_version: kubernetes_version.into(),
            ceph_devices: BTreeMap::new(),
            components: Vec::new(),
            lab: crate::lab::LabView::default(),
        }
    }
}

/// An object's identity as the API server knows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ObjectRef {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

impl ObjectRef {
    pub fn of(obj: &Value) -> Result<ObjectRef> {
        let s = |p: &str| obj.pointer(p).and_then(Value::as_str).map(str::to_string);
        Ok(ObjectRef {
            api_version: s("/apiVersion").context("object has no apiVersion")?,
            kind: s("/kind").context("object has no kind")?,
            namespace: s("/metadata/namespace"),
            name: s("/metadata/name").context("object has no metadata.name")?,
        })
    }

    /// `group/version` split: ("", "v1") for the core group.
    pub fn group_version(&self) -> (&str, &str) {
        match self.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", self.api_version.as_str()),
        }
    }
}

/// A component's objects, in template order, and the sha256 over them.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub objects: Vec<Value>,
    pub digest: String,
}

impl Rendered {
    pub fn refs(&self) -> Vec<ObjectRef> {
        self.objects.iter().filter_map(|o| ObjectRef::of(o).ok()).collect()
    }
}

/// Renders every template of `c` with `cluster`, after the objects of its upstream files.
pub fn render(c: &ResolvedComponent, cluster: &ClusterFacts) -> Result<Rendered> {
    render_with(c, cluster, &upstream_objects(c)?)
}

/// The objects of `c`'s upstream files (CRDs, RBAC): as fetched, never rendered as templates
/// (their text may hold `{{` of its own), with the spec's image overrides put in and the
/// component's labels. They do not depend on the cluster: a caller that renders often (the
/// master, every round) parses them once. An upstream file an offline plan did not fetch has
/// no text, and no objects.
pub fn upstream_objects(c: &ResolvedComponent) -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    for u in &c.upstream {
        let where_ = format!("component {} upstream file {}", c.name, u.name);
        objects.extend(parse(c, &where_, &u.text, &c.upstream_images)?);
    }
    Ok(objects)
}

/// [`render`] with the upstream objects already parsed ([`upstream_objects`]).
pub fn render_with(c: &ResolvedComponent, cluster: &ClusterFacts, upstream: &[Value]) -> Result<Rendered> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    // `{{ text | sha256 }}`: a pod template annotation that changes with a config it mounts, so
    // a changed config rolls the pods.
    env.add_filter("sha256", |s: String| hex::encode(Sha256::digest(s.as_bytes())));
    // `{{ lab | tojson }}`: data a program in a container reads (a hub's roster), as JSON.
    env.add_filter("tojson", |v: minijinja::Value| {
        serde_json::to_string(&v)
            .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))
    });
    let ctx = minijinja::context! {
        component => minijinja::context! { name => &c.name, namespace => &c.namespace },
        settings => minijinja::Value::from_serialize(&c.settings),
        images => minijinja::Value::from_serialize(&c.images),
        cluster => minijinja::Value::from_serialize(cluster),
        lab => minijinja::Value::from_serialize(&cluster.lab),
    };
    let mut objects = upstream.to_vec();
    for (file, text) in &c.templates {
        let where_ = format!("component {} template {file}", c.name);
        let out = env.render_str(text, &ctx).map_err(|e| anyhow!("{where_}: {}", describe(&e)))?;
        objects.extend(parse(c, &where_, &out, &BTreeMap::new())?);
    }
    let mut seen = BTreeMap::new();
    for o in &objects {
        let r = ObjectRef::of(o)?;
        if seen.insert(r.clone(), ()).is_some() {
            bail!("component {}: {r} is defined twice", c.name);
        }
    }
    let digest = hex::encode(Sha256::digest(serde_json::to_vec(&objects)?));
    Ok(Rendered { objects, digest })
}

/// The objects of a YAML stream, each checked and labelled as `c`'s, with the strings in
/// `replace` replaced.
fn parse(c: &ResolvedComponent, where_: &str, text: &str, replace: &BTreeMap<String, String>) -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    for (i, doc) in split_documents(text).into_iter().enumerate() {
        let mut v: Value = serde_yaml_ng::from_str(doc)
            .map_err(|e| anyhow!("{where_}, document {}: not valid YAML after rendering: {e}", i + 1))?;
        if v.is_null() {
            continue;
        }
        let Value::Object(_) = v else {
            bail!("{where_}, document {}: a Kubernetes object must be a mapping", i + 1);
        };
        if !replace.is_empty() {
            replace_strings(&mut v, replace);
        }
        let r = ObjectRef::of(&v).with_context(|| format!("{where_}, document {}", i + 1))?;
        check_name(&r).with_context(|| format!("{where_}: {r}"))?;
        label(&mut v, &c.name);
        objects.push(v);
    }
    Ok(objects)
}

/// Replaces every string in `v` that equals a key of `with` by its value.
fn replace_strings(v: &mut Value, with: &BTreeMap<String, String>) {
    match v {
        Value::String(s) => {
            if let Some(r) = with.get(s.as_str()) {
                *s = r.clone();
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| replace_strings(x, with)),
        Value::Object(o) => o.values_mut().for_each(|x| replace_strings(x, with)),
        _ => {}
    }
}

/// Splits a YAML stream at its `---` document markers.
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs.into_iter().filter(|d| !d.trim().is_empty()).collect()
}

fn check_name(r: &ObjectRef) -> Result<()> {
    if r.name.is_empty() || r.name.len() > 253 {
        bail!("name must be 1 to 253 characters");
    }
    if let Some(ns) = &r.namespace {
        if !super::valid_dns_label(ns) {
            bail!("namespace {ns:?} is not a DNS label");
        }
    }
    Ok(())
}

fn label(obj: &mut Value, component: &str) {
    let meta = obj
        .as_object_mut()
        .expect("checked: a mapping")
        .entry("metadata")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Value::Object(meta) = meta {
        let labels = meta.entry("labels").or_insert_with(|| Value::Object(Default::default()));
        if !labels.is_object() {
            *labels = Value::Object(Default::default());
        }
        let labels = labels.as_object_mut().expect("just made an object");
        labels.insert(LABEL_MANAGED_BY.into(), Value::String("labforge".into()));
        labels.insert(LABEL_COMPONENT.into(), Value::String(component.into()));
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        s = format!("line {line}: {s}");
    }
    s
}
