//! `labforge-kubernetes-release [OUT] [--image-repository REPO]` (`make kubernetes-release`):
//! builds upstream Kubernetes from its Go modules (or reuses the cached build) and writes
//!
//! - `OUT/release/`: kubeadm, kubelet, kubectl in upstream's download layout
//!   (`<version>/bin/linux/amd64/<name>` + `.sha256`), for `[kubernetes] binaries-url`;
//! - `OUT/cni/`: the CNI plugins tarball and its `.sha256`, for `cni-url`;
//! - `OUT/images/`: one OCI image layout with every control-plane image under the name kubeadm
//!   asks for with `[kubernetes] image-repository = REPO` (default `registry.k8s.io`).
//!
//! OUT defaults to `out/kubernetes-release`. Nothing is written unless everything was built.
//! `--fixture-only` builds (or reuses) the cached build and writes nothing else: `make test`
//! starts it in the background so the build overlaps the scenarios that do not need it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use qemu_tests::kubernetes;

fn main() {
    if let Err(e) = run() {
        eprintln!("labforge-kubernetes-release: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut out = PathBuf::from("out/kubernetes-release");
    let mut repository = "registry.k8s.io".to_string();
    let mut fixture_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--image-repository" => repository = args.next().context("--image-repository needs a value")?,
            "--fixture-only" => fixture_only = true,
            "-h" | "--help" => {
                println!("usage: labforge-kubernetes-release [OUT] [--image-repository REPO] [--fixture-only]");
                return Ok(());
            }
            s if s.starts_with('-') => bail!("unknown option {s} (see --help)"),
            s => out = PathBuf::from(s),
        }
    }
    if repository.is_empty() || repository.contains(char::is_whitespace) || repository.ends_with('/') {
        bail!("--image-repository {repository:?} is not a registry path like registry.lab:5000/k8s");
    }
    eprintln!(
        "building Kubernetes {} from its Go modules (cold: about half an hour on two cores)...",
        kubernetes::VERSION
    );
    if fixture_only {
        kubernetes::fixture("kubernetes-fixture-background")?;
        return Ok(());
    }
    let fixture = kubernetes::fixture("kubernetes-fixture-release")?;
    // Everything goes to a sibling directory first and replaces OUT at the end.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = tempfile::Builder::new().prefix(".kubernetes-release-").tempdir_in(parent)?;
    kubernetes::release_tree(&fixture, staging.path())?;
    let images = kubernetes::control_plane_images(&fixture)?;
    kubernetes::write_oci_layout(&images, &staging.path().join("images"), &repository)?;
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("replacing {}", out.display()))?;
    }
    std::fs::rename(staging.keep(), &out).with_context(|| format!("moving the release into {}", out.display()))?;
    println!("wrote {}:", out.display());
    println!("  release/{}/bin/linux/amd64/{{kubeadm,kubelet,kubectl}} (+ .sha256)", kubernetes::VERSION);
    println!("  cni/{0}/cni-plugins-linux-amd64-{0}.tgz (+ .sha256)", kubernetes::CNI_VERSION);
    for img in &images {
        println!("  images/: {repository}/{}:{}", img.name, img.tag);
    }
    Ok(())
}
