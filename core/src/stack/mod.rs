//! The data stack's component model, shared by the builder (which renders every component at
//! build time and proves the image air-gapped) and the agent (which renders again with what only
//! the running cluster knows, and applies).
//!
//! A component is a folder: `component.toml` ([`ComponentFile`]) and its objects as minijinja
//! templates (`*.yaml`, several documents per file allowed). The builder resolves the spec's
//! `[stack]` against the folders into one [`StackPlan`] (`stack.json` in the image): the
//! components in dependency order, each with its settings, its image references as preloaded and
//! its templates inline, so a node needs nothing else to apply it.

pub mod images;
pub mod order;
pub mod prune;
pub mod ready;
pub mod render;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use order::dependency_order;
pub use ready::{readiness, Readiness};
pub use render::{render, render_with, upstream_objects, ClusterFacts, ObjectRef, Rendered};

/// Where the builder puts the resolved stack in an image.
pub const STACK_PLAN: &str = "/usr/lib/labforge/stack.json";

/// Labels the apply engine puts on every object it owns.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_COMPONENT: &str = "labforge.io/component";
/// The server-side apply field manager.
pub const FIELD_MANAGER: &str = "labforge";

/// `component.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ComponentFile {
    /// Lowercase letters, digits and `-`; the folder's name.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The namespace its namespaced objects go to when a template names none.
    pub namespace: String,
    /// Components that must be ready before this one is applied.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Images it runs, by key (templates use `{{ images.<key> }}`), with default references. A
    /// spec may point any of them elsewhere (`[stack.images]`); all of them are preloaded.
    #[serde(default)]
    pub images: BTreeMap<String, String>,
    /// Images needed only while a boolean setting is true (`grafana = "grafana"`: the image
    /// `grafana` is preloaded only when setting `grafana` is true).
    #[serde(default)]
    pub image_when: BTreeMap<String, String>,
    /// Where else than a container's `image` an image reference hides in its objects.
    #[serde(default)]
    pub image_carrying: ImageCarrying,
    /// Settings with their defaults (templates use `{{ settings.<key> }}`); a spec may set only
    /// keys declared here.
    #[serde(default)]
    pub settings: toml::Table,
    /// What must hold before the component counts as ready (and its dependents start).
    #[serde(default)]
    pub ready: Vec<Gate>,
    /// Web UIs reached through the master's address (shown on the portal).
    #[serde(default)]
    pub web: Vec<Web>,
    /// Secrets the master makes once, with random values, before the first apply (a web UI's
    /// admin password: never a default one). Kept as they are afterwards.
    #[serde(default)]
    pub secrets: Vec<GeneratedSecret>,
    /// Objects maintained upstream (CRDs, an operator's RBAC), fetched by the builder and pinned
    /// by sha256: upstream YAML is never copied into a component folder.
    #[serde(default)]
    pub upstream: Vec<Upstream>,
}

/// `[[upstream]]`: a release file of Kubernetes objects. Its objects are applied before the
/// component's templates, as they are (never rendered as templates), with the component's
/// labels; an image reference in them that equals a default in `[images]` is replaced by what
/// the spec points that image at.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Upstream {
    /// Letters, digits, `-` and `_`; a spec names it `"<component>.<name>"` to fetch it from a
    /// mirror (`[stack.upstream]`).
    pub name: String,
    pub url: String,
    /// 64 hex digits: the file is refused unless it hashes to this.
    pub sha256: String,
}

/// An upstream file as the builder fetched and verified it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FetchedUpstream {
    pub name: String,
    /// Where it was fetched from (the component's URL or the spec's mirror).
    pub url: String,
    pub sha256: String,
    pub text: String,
}

/// A Secret in the component's namespace whose keys get 32 random characters each.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GeneratedSecret {
    pub name: String,
    #[serde(default)]
    pub keys: Vec<String>,
    /// `"lab.users"`: one key more per user of the roster, named after them (each user's own
    /// password). A user added later gets theirs on the next apply; nobody's changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_from: Option<String>,
    /// Only while this boolean setting is true.
    #[serde(default)]
    pub when: Option<String>,
}

/// Container arguments (`--helper-image`, as `--flag=value` or `--flag value`) and environment
/// variables whose values are image references, and ConfigMap keys that hold a Pod template an
/// operator runs (its containers' images count).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ImageCarrying {
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub configmap_pods: Vec<String>,
    /// Fields of custom resources that name an image an operator runs, as `Kind:/json/pointer`
    /// (`CephCluster:/spec/cephVersion/image`).
    #[serde(default)]
    pub fields: Vec<String>,
}

/// A readiness gate: one object and the state it must reach. Workload kinds (Deployment,
/// StatefulSet, DaemonSet) must be available and rolled out, a Job complete, a
/// CustomResourceDefinition established; any other kind needs `condition` true.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Gate {
    pub kind: String,
    pub name: String,
    /// Default: the component's namespace (ignored for cluster-scoped kinds).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Default: taken from the rendered object of that kind and name.
    #[serde(default)]
    pub api_version: Option<String>,
    /// A status condition type that must be `True` (e.g. `Ready`).
    #[serde(default)]
    pub condition: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Web {
    /// What people call it (e.g. "Grafana").
    pub title: String,
    /// The port it answers on at every node's address (a NodePort; the fixed port map in the
    /// README).
    pub port: u16,
    #[serde(default = "default_path")]
    pub path: String,
    /// Only while this boolean setting is true.
    #[serde(default)]
    pub when: Option<String>,
}

fn default_path() -> String {
    "/".into()
}

/// A component folder as read: its file plus its templates by file name.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentSource {
    pub file: ComponentFile,
    pub templates: BTreeMap<String, String>,
    /// Where it was read from (for messages).
    pub origin: String,
}

impl ComponentSource {
    /// Reads `component.toml` and every `*.yaml` beside it from `files` (name → text).
    pub fn from_files(origin: &str, files: BTreeMap<String, String>) -> Result<ComponentSource> {
        let toml_text =
            files.get("component.toml").with_context(|| format!("{origin}: no component.toml in the folder"))?;
        let file: ComponentFile =
            toml::from_str(toml_text).map_err(|e| anyhow::anyhow!("{origin}/component.toml: {}", e.message()))?;
        check_name(&file.name).with_context(|| format!("{origin}/component.toml: name"))?;
        if !valid_dns_label(&file.namespace) {
            bail!("{origin}/component.toml: namespace {:?} is not a DNS label", file.namespace);
        }
        for d in &file.depends_on {
            check_name(d).with_context(|| format!("{origin}/component.toml: depends-on"))?;
        }
        for (k, v) in &file.images {
            if !valid_key(k) {
                bail!("{origin}/component.toml: image key {k:?}: use letters, digits and _");
            }
            if v.trim().is_empty() {
                bail!("{origin}/component.toml: image {k} has no reference");
            }
        }
        for k in file.settings.keys() {
            if !valid_key(k) {
                bail!(
                    "{origin}/component.toml: setting {k:?}: use letters, digits and _ (templates read settings.{k})"
                );
            }
        }
        let boolean = |s: &str| file.settings.get(s).is_some_and(|v| v.is_bool());
        for (img, setting) in &file.image_when {
            if !file.images.contains_key(img) {
                bail!("{origin}/component.toml: image-when names image {img:?}, which [images] does not declare");
            }
            if !boolean(setting) {
                bail!("{origin}/component.toml: image-when {img} = {setting:?}: no boolean setting of that name");
            }
        }
        let conditions = file.web.iter().filter_map(|w| w.when.as_ref());
        for w in conditions.chain(file.secrets.iter().filter_map(|s| s.when.as_ref())) {
            if !boolean(w) {
                bail!("{origin}/component.toml: when = {w:?}: no boolean setting of that name");
            }
        }
        for s in &file.secrets {
            let key_ok =
                |k: &String| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if let Some(from) = s.keys_from.as_deref().filter(|f| *f != "lab.users") {
                bail!("{origin}/component.toml: secret {:?}: keys-from {from:?}: only \"lab.users\" is known", s.name);
            }
            if !valid_dns_label(&s.name) || (s.keys.is_empty() && s.keys_from.is_none()) || !s.keys.iter().all(key_ok) {
                bail!(
                    "{origin}/component.toml: secret {:?}: a DNS-label name and keys of letters, digits, - and _",
                    s.name
                );
            }
        }
        for f in &file.image_carrying.fields {
            let ok = f.split_once(":/").is_some_and(|(kind, _)| {
                !kind.is_empty()
                    && kind.bytes().all(|b| b.is_ascii_alphanumeric())
                    && kind.as_bytes()[0].is_ascii_uppercase()
            });
            if !ok {
                bail!("{origin}/component.toml: image-carrying field {f:?}: write \"Kind:/json/pointer\" (CephCluster:/spec/cephVersion/image)");
            }
        }
        let mut names = Vec::new();
        for u in &file.upstream {
            let name_ok =
                !u.name.is_empty() && u.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok || names.contains(&&u.name) {
                bail!("{origin}/component.toml: upstream {:?}: a name of letters, digits, - and _, once", u.name);
            }
            names.push(&u.name);
            if !(u.url.starts_with("https://") || u.url.starts_with("http://")) {
                bail!("{origin}/component.toml: upstream {}: url {:?} is not an http(s) URL", u.name, u.url);
            }
            if u.sha256.len() != 64 || !u.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                bail!("{origin}/component.toml: upstream {}: sha256 must be 64 lowercase hex digits", u.name);
            }
        }
        let templates: BTreeMap<String, String> =
            files.into_iter().filter(|(n, _)| n.ends_with(".yaml") || n.ends_with(".yml")).collect();
        if templates.is_empty() && file.upstream.is_empty() {
            bail!("{origin}: no templates (*.yaml) beside component.toml");
        }
        Ok(ComponentSource { file, templates, origin: origin.to_string() })
    }

    /// Reads a component folder from disk.
    pub fn read_dir(dir: &std::path::Path) -> Result<ComponentSource> {
        let mut files = BTreeMap::new();
        let entries = std::fs::read_dir(dir).with_context(|| format!("reading component folder {}", dir.display()))?;
        for e in entries {
            let e = e?;
            if !e.file_type()?.is_file() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(e.path()).with_context(|| format!("reading {}", e.path().display()))?;
            files.insert(name, text);
        }
        ComponentSource::from_files(&dir.display().to_string(), files)
    }
}

/// One component as the builder resolved it for an image: everything a node needs to render and
/// apply it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ResolvedComponent {
    pub name: String,
    pub namespace: String,
    pub depends_on: Vec<String>,
    /// Key → reference, overrides applied; each one is in the image's preload set.
    pub images: BTreeMap<String, String>,
    pub image_carrying: ImageCarrying,
    /// Defaults merged with the spec's `[stack.<name>]`.
    pub settings: toml::Table,
    pub ready: Vec<Gate>,
    /// Its web UIs (those whose `when` setting is false are left out).
    pub web: Vec<Web>,
    /// Secrets made once on the cluster (those whose `when` setting is false are left out).
    #[serde(default)]
    pub secrets: Vec<GeneratedSecret>,
    pub templates: BTreeMap<String, String>,
    /// Its upstream files, fetched and verified (empty in an offline plan that found them in no
    /// cache); their objects come before the templates'.
    #[serde(default)]
    pub upstream: Vec<FetchedUpstream>,
    /// Image references as upstream files write them → the reference the spec put in their
    /// place (only images the spec overrides).
    #[serde(default)]
    pub upstream_images: BTreeMap<String, String>,
    /// Where it came from: `built-in` or the site folder.
    pub origin: String,
    /// sha256 of the objects rendered at build time (the manifest lists it).
    pub build_digest: String,
}

/// `stack.json`: the components in the order they are applied.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StackPlan {
    pub components: Vec<ResolvedComponent>,
    /// The spec's `[lab]` roster (checked), which templates see as `lab`.
    #[serde(default)]
    pub lab: crate::lab::Lab,
}

impl StackPlan {
    pub fn load(path: &std::path::Path) -> Result<Option<StackPlan>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
        }
    }
}

impl GeneratedSecret {
    /// Its keys: those it names, and with `keys-from = "lab.users"` one per user of `lab`.
    pub fn keys_for(&self, lab: &crate::lab::LabView) -> Vec<String> {
        let mut keys = self.keys.clone();
        if self.keys_from.as_deref() == Some("lab.users") {
            keys.extend(lab.users.iter().map(|u| u.name.clone()));
        }
        keys
    }
}

/// Whether a component's boolean setting `when` is true in `settings` (no condition: true).
pub fn enabled(settings: &toml::Table, when: Option<&str>) -> bool {
    match when {
        None => true,
        Some(w) => settings.get(w).and_then(toml::Value::as_bool).unwrap_or(false),
    }
}

/// Merges a spec's settings over a component's defaults. Only declared keys may be set, with a
/// value of the default's type.
pub fn merge_settings(component: &ComponentFile, given: &toml::Table) -> Result<toml::Table> {
    let mut out = component.settings.clone();
    for (k, v) in given {
        let Some(default) = component.settings.get(k) else {
            let known: Vec<&str> = component.settings.keys().map(String::as_str).collect();
            bail!(
                "component {} has no setting {k:?} (its settings: {})",
                component.name,
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            );
        };
        if std::mem::discriminant(default) != std::mem::discriminant(v) {
            bail!(
                "component {} setting {k}: expected a {}, got a {}",
                component.name,
                default.type_str(),
                v.type_str()
            );
        }
        out.insert(k.clone(), v.clone());
    }
    Ok(out)
}

fn check_name(name: &str) -> Result<()> {
    if !valid_dns_label(name) {
        bail!("{name:?} is not a component name: lowercase letters, digits and -, at most 40 characters");
    }
    if name.len() > 40 {
        bail!("{name:?} is longer than 40 characters");
    }
    Ok(())
}

pub(crate) fn valid_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn valid_key(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && !s.as_bytes()[0].is_ascii_digit()
}
