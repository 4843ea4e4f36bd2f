//! `<name>.manifest.json`: what a build produced and from what.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::disk::Layout;
use super::outputs::Artifact;
use super::Plan;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: f64,
    pub cached: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    pub labforge_version: String,
    pub name: String,
    /// sha256 over every input: spec, overlays, agent binary, rootfs inputs, labforge version.
    pub input_hash: String,
    pub rootfs_cache_key: String,
    pub distro: String,
    pub suite: String,
    pub mirror: String,
    pub kernel: String,
    pub kernel_cmdline: String,
    pub disk: serde_json::Value,
    pub artifacts: Vec<ArtifactEntry>,
    /// Installed packages and versions in the root filesystem.
    pub packages: BTreeMap<String, String>,
    pub stages: Vec<StageTiming>,
    pub build_seconds: f64,
    /// Where the cluster secret baked into the image came from (never its value).
    pub cluster_secret: String,
    /// Preloaded container images, in import order.
    #[serde(default)]
    pub preload: Vec<super::preload::PreloadRecord>,
    /// The stack's components in the order the master applies them, with the digest of the
    /// objects rendered at build time.
    #[serde(default)]
    pub stack: Vec<StackRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StackRecord {
    pub name: String,
    pub namespace: String,
    pub origin: String,
    pub depends_on: Vec<String>,
    pub images: BTreeMap<String, String>,
    /// sha256 of the objects rendered at build time.
    pub digest: String,
    /// Its upstream files: name → the URL fetched and the sha256 verified.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upstream: BTreeMap<String, crate::registry::lock::LockedFile>,
}

impl From<&labforge_core::stack::ResolvedComponent> for StackRecord {
    fn from(c: &labforge_core::stack::ResolvedComponent) -> Self {
        StackRecord {
            name: c.name.clone(),
            namespace: c.namespace.clone(),
            origin: c.origin.clone(),
            depends_on: c.depends_on.clone(),
            images: c.images.clone(),
            digest: c.build_digest.clone(),
            upstream: c
                .upstream
                .iter()
                .map(|u| {
                    (u.name.clone(), crate::registry::lock::LockedFile { url: u.url.clone(), sha256: u.sha256.clone() })
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ArtifactEntry {
    pub file: String,
    pub size_bytes: u64,
    pub sha256: String,
}

impl Manifest {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        plan: &Plan,
        layout: &Layout,
        kernel: &str,
        packages: BTreeMap<String, String>,
        artifacts: Vec<Artifact>,
        stages: Vec<StageTiming>,
        build_seconds: f64,
    ) -> Self {
        let spec = &plan.spec;
        Manifest {
            labforge_version: env!("CARGO_PKG_VERSION").into(),
            name: spec.name.clone(),
            input_hash: plan.input_hash.clone(),
            rootfs_cache_key: plan.rootfs_key.clone(),
            distro: format!("{:?}", spec.base.distro).to_lowercase(),
            suite: spec.base.suite.clone(),
            mirror: spec.base.mirror().into(),
            kernel: kernel.into(),
            kernel_cmdline: super::disk::cmdline(layout, spec),
            disk: serde_json::to_value(layout).expect("layout serialises"),
            artifacts: artifacts
                .into_iter()
                .map(|a| ArtifactEntry { file: a.file, size_bytes: a.size_bytes, sha256: a.sha256 })
                .collect(),
            packages,
            stages,
            build_seconds,
            cluster_secret: match &plan.secret_source {
                super::SecretSource::Spec(p) => format!("spec: {}", p.display()),
                super::SecretSource::Previous(p) => format!("kept from an earlier build: {}", p.display()),
                super::SecretSource::Generated => format!("generated: {}", super::secret_file_name(&spec.name)),
            },
            preload: Vec::new(),
            stack: Vec::new(),
        }
    }
}

/// The manifest in `out` if it records `input_hash` and every artifact it lists is present with
/// its recorded size.
pub fn existing(path: &Path, input_hash: &str, out: &Path) -> Option<Manifest> {
    let m: Manifest = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let complete = m.input_hash == input_hash
        && m.artifacts.iter().all(|a| std::fs::metadata(out.join(&a.file)).is_ok_and(|md| md.len() == a.size_bytes));
    complete.then_some(m)
}
