//! Preload stage: the pulled images as one OCI image layout inside the image, which the agent
//! imports into containerd on first boot. It lives under `/usr/lib/labforge/preload`: content
//! of the image, shared by every node and servable over PXE; `/var/lib/labforge` is the
//! per-node state partition, mounted over whatever the image had there (the agent links
//! `/var/lib/labforge/preload` to it).

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::registry::{self, BlobCache, PulledImage};

pub use labforge_core::layout::PRELOAD_CLUSTER_ANNOTATION as CLUSTER_ANNOTATION;
pub use labforge_core::layout::PRELOAD_LAYOUT_DIR as LAYOUT_DIR;

/// containerd 1.6's default `sandbox_image`, when its config does not name one.
const CONTAINERD_DEFAULT_SANDBOX: &str = "registry.k8s.io/pause:3.6";

/// What the manifest records about each preloaded image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PreloadRecord {
    #[serde(rename = "ref")]
    pub reference: String,
    pub name: String,
    pub digest: String,
    pub size_bytes: u64,
}

impl From<&PulledImage> for PreloadRecord {
    fn from(p: &PulledImage) -> Self {
        PreloadRecord {
            reference: p.reference.clone(),
            name: p.name.clone(),
            digest: p.digest.clone(),
            size_bytes: p.size_bytes,
        }
    }
}

/// The sandbox (pause) image containerd in `root` will use.
pub fn sandbox_image(root: &Path) -> String {
    let path = root.join("etc/containerd/config.toml");
    let found = fs::read_to_string(path).ok().and_then(|t| t.parse::<toml::Table>().ok()).and_then(|t| {
        t.get("plugins")?.get("io.containerd.grpc.v1.cri")?.get("sandbox_image")?.as_str().map(str::to_string)
    });
    found.unwrap_or_else(|| CONTAINERD_DEFAULT_SANDBOX.to_string())
}

/// One image of the layout, in import order.
#[derive(Debug, Clone)]
pub struct LayoutImage {
    pub image: PulledImage,
    /// Needed before kubeadm runs (annotated [`CLUSTER_ANNOTATION`]).
    pub cluster: bool,
}

/// Orders images so the node's own needs come first: the sandbox image, then the images kubeadm
/// listed (`cluster`: references), then the rest in the spec's order. The first two are marked
/// for the agent, which starts kubeadm once they are in; without a kubeadm list nothing is
/// marked (kubeadm then waits for every image: it would pull whatever is missing, and a lab has
/// no registry).
pub fn import_order(images: &[PulledImage], sandbox: &str, cluster: &[String]) -> Vec<LayoutImage> {
    let name_of = |r: &str| registry::parse_reference(r).map(|r| registry::containerd_name(&r)).unwrap_or_default();
    let sandbox = name_of(sandbox);
    if !images.is_empty() && !images.iter().any(|p| p.name == sandbox) {
        tracing::info!("the sandbox image {sandbox} is not preloaded: nodes without registry access cannot start pods");
    }
    let kubeadm: Vec<String> = cluster.iter().map(|r| name_of(r)).collect();
    let rank = |p: &PulledImage| {
        if p.name == sandbox {
            0
        } else if kubeadm.contains(&p.name) {
            1
        } else {
            2
        }
    };
    let mut v: Vec<PulledImage> = images.to_vec();
    v.sort_by_key(rank);
    v.into_iter().map(|image| LayoutImage { cluster: !kubeadm.is_empty() && rank(&image) < 2, image }).collect()
}

/// Writes the OCI image layout into `root` from the blob cache, images in the given order
/// (see `import_order`).
pub fn write_layout(root: &Path, ordered: &[LayoutImage], cache: &BlobCache) -> Result<()> {
    let dir = root.join(LAYOUT_DIR.trim_start_matches('/'));
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("creating {}", dir.display()))?;
    let mut manifests = Vec::new();
    for LayoutImage { image: img, cluster } in ordered {
        for digest in std::iter::once(&img.digest).chain(img.blobs.iter().map(|(d, _)| d)) {
            let dest = blobs.join(registry::cache::hex_of(digest)?);
            if !dest.exists() {
                fs::copy(cache.path(digest)?, &dest)
                    .with_context(|| format!("copying blob {digest} of {} into the image", img.reference))?;
            }
        }
        let tag = registry::parse_reference(&img.reference)?.tag().map(str::to_string);
        let mut annotations = json!({ "io.containerd.image.name": img.name });
        annotations["org.opencontainers.image.ref.name"] = json!(tag.unwrap_or_else(|| img.name.clone()));
        annotations["dev.labforge.preload.ref"] = json!(img.reference);
        if *cluster {
            annotations[CLUSTER_ANNOTATION] = json!("true");
        }
        manifests.push(json!({
            "mediaType": img.media_type,
            "digest": img.digest,
            "size": img.manifest_size,
            "annotations": annotations,
        }));
    }
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index =
        json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests });
    fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(reference: &str) -> PulledImage {
        let r = registry::parse_reference(reference).unwrap();
        PulledImage {
            reference: reference.into(),
            name: registry::containerd_name(&r),
            digest: format!("sha256:{}", "a".repeat(64)),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            manifest_size: 1,
            blobs: vec![],
            size_bytes: 1,
        }
    }

    #[test]
    fn sandbox_image_goes_first() {
        let v = vec![img("docker.io/library/busybox:1"), img("registry.k8s.io/pause:3.9"), img("quay.io/x/y:2")];
        let o = import_order(&v, "registry.k8s.io/pause:3.9", &[]);
        assert_eq!(
            o.iter().map(|p| p.image.reference.as_str()).collect::<Vec<_>>(),
            ["registry.k8s.io/pause:3.9", "docker.io/library/busybox:1", "quay.io/x/y:2"]
        );
        // Without kubeadm's list nothing is marked: kubeadm waits for every image.
        assert!(o.iter().all(|p| !p.cluster));
    }

    #[test]
    fn kubeadms_images_come_next_and_are_marked() {
        let v = vec![
            img("quay.io/jupyterhub/k8s-hub:4.1.0"),
            img("registry.k8s.io/kube-apiserver:v1.36.5"),
            img("docker.io/library/busybox:1"),
            img("registry.k8s.io/pause:3.10"),
            img("registry.k8s.io/etcd:3.6.5-0"),
        ];
        let kubeadm = [
            "registry.k8s.io/kube-apiserver:v1.36.5".to_string(),
            "registry.k8s.io/etcd:3.6.5-0".to_string(),
            "registry.k8s.io/pause:3.10".to_string(),
        ];
        let o = import_order(&v, "registry.k8s.io/pause:3.10", &kubeadm);
        let got: Vec<(&str, bool)> = o.iter().map(|p| (p.image.reference.as_str(), p.cluster)).collect();
        assert_eq!(
            got,
            [
                ("registry.k8s.io/pause:3.10", true),
                ("registry.k8s.io/kube-apiserver:v1.36.5", true),
                ("registry.k8s.io/etcd:3.6.5-0", true),
                ("quay.io/jupyterhub/k8s-hub:4.1.0", false),
                ("docker.io/library/busybox:1", false),
            ]
        );
    }

    #[test]
    fn sandbox_image_is_read_from_containerd_config() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(sandbox_image(dir.path()), CONTAINERD_DEFAULT_SANDBOX);
        fs::create_dir_all(dir.path().join("etc/containerd")).unwrap();
        fs::write(
            dir.path().join("etc/containerd/config.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.10\"\n",
        )
        .unwrap();
        assert_eq!(sandbox_image(dir.path()), "registry.k8s.io/pause:3.10");
    }
}
