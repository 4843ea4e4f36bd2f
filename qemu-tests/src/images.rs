//! Test images, built once per input hash: a second scenario (or a second `make test`) with the
//! same spec, overlays and agent reuses the image already in `target/qemu-tests/images/`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use labforge::build::{self, BuildOptions};

/// The agent binary baked into test images: `LABFORGE_AGENT`, else the release build, which
/// must be newer than the agent's and core's sources (`cargo test -p qemu-tests` does not
/// rebuild it: an image would silently carry the old agent).
fn agent_binary() -> Result<PathBuf> {
    let given = std::env::var_os("LABFORGE_AGENT").map(PathBuf::from);
    let p = given.clone().unwrap_or_else(|| crate::workspace_root().join("target/release/labforge-agent"));
    if !p.is_file() {
        anyhow::bail!(
            "agent binary {} is missing; build it with `cargo build --release -p labforge-agent` (make test does)",
            p.display()
        );
    }
    if given.is_none() {
        let built = fs::metadata(&p)?.modified()?;
        let root = crate::workspace_root();
        if let Some(newer) = [root.join("agent/src"), root.join("core/src")].iter().find_map(|d| newer_than(d, built)) {
            anyhow::bail!(
                "agent binary {} is older than {}; build it with `cargo build --release -p labforge-agent` (make test does)",
                p.display(),
                newer.display()
            );
        }
    }
    Ok(p)
}

/// A file under `dir` modified after `t`, if any.
fn newer_than(dir: &Path, t: std::time::SystemTime) -> Option<PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let path = e.path();
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            if let Some(p) = newer_than(&path, t) {
                return Some(p);
            }
        } else if meta.modified().is_ok_and(|m| m > t) {
            return Some(path);
        }
    }
    None
}

/// A built test image.
pub struct TestImage {
    /// The raw image under a name that is unique to its build (`by-hash/<input-hash>.img`), so
    /// a later rebuild never changes what a VM's disk overlay is backed by.
    pub image: PathBuf,
    /// The cluster secret baked into it.
    pub secret: PathBuf,
    /// Where the build wrote its outputs (`<name>.img`, `.zst`, `.bmap`, manifest).
    pub out: PathBuf,
    pub name: String,
}

/// Builds (or reuses) the image of `spec` (path relative to the workspace root). Concurrent
/// test processes serialise on a lock file.
pub fn image(spec: &str) -> Result<TestImage> {
    image_with(spec, labforge::registry::RegistryOptions::default())
}

/// Like `image`, reaching preloaded images' registries as `registry` says. The preload lock
/// file goes beside the outputs, never into the source tree.
pub fn image_with(spec: &str, registry: labforge::registry::RegistryOptions) -> Result<TestImage> {
    build_image(spec, registry, false)
}

/// Like `image_with`, resolving every preload reference afresh (the lock file rewritten): for
/// specs whose preloaded images the test itself builds and pushes, so a changed test image
/// is never replaced by the digest an earlier run locked.
pub fn image_relocked(spec: &str, registry: labforge::registry::RegistryOptions) -> Result<TestImage> {
    build_image(spec, registry, true)
}

fn build_image(spec: &str, registry: labforge::registry::RegistryOptions, update_lock: bool) -> Result<TestImage> {
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
        lock_file: Some(out.join(format!("{stem}.lock.toml"))),
        registry,
        update_lock,
        offline: false,
    };
    let started = std::time::Instant::now();
    let outcome = build::build(&opts).with_context(|| format!("building test image {spec}"))?;
    eprintln!("qemu-tests: image {spec} ready in {} s", started.elapsed().as_secs());
    let name = outcome.manifest.name.clone();
    let by_hash = out.join("by-hash");
    fs::create_dir_all(&by_hash)?;
    let pinned = by_hash.join(format!("{}.img", &outcome.manifest.input_hash[..16]));
    if !pinned.exists() {
        fs::hard_link(out.join(format!("{name}.img")), &pinned).context("pinning the test image")?;
    }
    // Older builds' pins would keep their data alive; scenarios run one image at a time.
    for e in fs::read_dir(&by_hash)?.flatten() {
        if e.path() != pinned {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(TestImage { image: pinned, secret: out.join(build::secret_file_name(&name)), out, name })
}

/// The registry address `qemu-tests/images/preload.toml` (and the specs extending it) name.
pub const PRELOAD_REGISTRY_PORT: u16 = 35123;

/// Builds `spec`, which preloads the two test images of `preload.toml`: a real registry on
/// 127.0.0.1:35123 for the time of the build, holding `labforge-test/hello:1` (a static program
/// printing "labforge-preload-ok") and `labforge-test/multi:1` (a multi-arch index). The
/// registry stops before this returns: everything after is offline.
pub fn image_with_test_preloads(spec: &str) -> Result<TestImage> {
    use crate::registry::{static_hello, Pusher, Registry};
    let work = tempfile::tempdir()?;
    let reg = Registry::start_on(PRELOAD_REGISTRY_PORT)
        .with_context(|| format!("{spec} expects a test registry on 127.0.0.1:{PRELOAD_REGISTRY_PORT}"))?;
    let p = Pusher::new(&format!("http://{}", reg.addr));
    let hello = static_hello(work.path(), "labforge-preload-ok")?;
    p.image("labforge-test/hello", "1", "amd64", &[("hello", &hello, 0o755)], &["/hello"])?;
    let other = static_hello(work.path(), "labforge-preload-multi")?;
    let (a, asz, _) = p.image("labforge-test/multi", "amd64", "amd64", &[("hello", &other, 0o755)], &["/hello"])?;
    let (b, bsz, _) =
        p.image("labforge-test/multi", "arm64", "arm64", &[("hello", b"not an amd64 program", 0o755)], &["/hello"])?;
    p.index("labforge-test/multi", "1", &[(a, asz, "amd64"), (b, bsz, "arm64")])?;
    let opts =
        labforge::registry::RegistryOptions { plain_http: vec![reg.addr.clone()], ca_files: vec![], parallel: 8 };
    image_with(spec, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_changed_after_the_build_is_found() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        let before = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        fs::write(d.path().join("a/b/lib.rs"), "").unwrap();
        assert_eq!(newer_than(d.path(), before), Some(d.path().join("a/b/lib.rs")));
        let after = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        assert_eq!(newer_than(d.path(), after), None);
    }
}
