//! Test images, built once per input hash: a second scenario (or a second `make test`) with the
//! same spec, overlays and agent reuses the image already in `target/qemu-tests/images/`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use labforge::build::{self, BuildOptions};

/// The agent binary baked into test images: `LABFORGE_AGENT`, else the release build.
fn agent_binary() -> Result<PathBuf> {
    let p = std::env::var_os("LABFORGE_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/release/labforge-agent"));
    if !p.is_file() {
        anyhow::bail!(
            "agent binary {} is missing; build it with `cargo build --release -p labforge-agent` (make test does)",
            p.display()
        );
    }
    Ok(p)
}

/// Builds (or reuses) the image of `spec` (path relative to the workspace root) and returns
/// the raw image path. Concurrent test processes serialise on a lock file.
pub fn image(spec: &str) -> Result<PathBuf> {
    let root = crate::workspace_root();
    let spec_path = root.join(spec);
    let stem = Path::new(spec).file_stem().expect("spec file").to_string_lossy().into_owned();
    let out = root.join("target/qemu-tests/images").join(&stem);
    fs::create_dir_all(&out)?;
    let lock = fs::File::create(out.join(".lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("locking the test image directory")?;
    let opts = BuildOptions {
        spec: spec_path,
        out: out.clone(),
        cache_dir: std::env::var_os("LABFORGE_CACHE_DIR").map(PathBuf::from).unwrap_or_else(build::default_cache_dir),
        mirror: std::env::var("LABFORGE_MIRROR").ok(),
        agent: Some(agent_binary()?),
        force: false,
    };
    let outcome = build::build(&opts).with_context(|| format!("building test image {spec}"))?;
    Ok(out.join(format!("{}.img", outcome.manifest.name)))
}
