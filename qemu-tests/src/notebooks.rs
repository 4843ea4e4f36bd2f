//! The notebooks' upstream programs for the tests, from their package registries: JupyterHub
//! with KubeSpawner (PyPI) and configurable-http-proxy (npm), at the versions the `notebooks`
//! component's images carry. Installed once per machine into the labforge cache, keyed by these
//! pins (test fixtures: never committed, never product code).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// PyPI packages of the hub.
pub const HUB_PACKAGES: [&str; 2] = ["jupyterhub==5.3.0", "jupyterhub-kubespawner==7.0.0"];
/// npm package of the proxy.
pub const PROXY_PACKAGE: &str = "configurable-http-proxy@4.6.3";

/// Where the installed programs are.
pub struct HubPrograms {
    pub python: PathBuf,
    pub jupyterhub: PathBuf,
    pub proxy: PathBuf,
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Installs (or reuses) the hub's programs. Concurrent callers serialise on a lock file; a
/// venv cannot be moved (its scripts name its path), so it is made in place and counts only
/// once `.complete` is written: an interrupted install is removed and done again.
pub fn hub_programs() -> Result<HubPrograms> {
    let key = hex::encode(Sha256::digest(format!("{HUB_PACKAGES:?}\0{PROXY_PACKAGE}").as_bytes()));
    let root = std::env::var_os("LABFORGE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(labforge::build::default_cache_dir)
        .join("fixtures");
    fs::create_dir_all(&root)?;
    let dir = root.join(format!("notebooks-{}", &key[..16]));
    let lock = fs::File::create(root.join(format!("notebooks-{}.lock", &key[..16])))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking the notebooks fixture: {e}"))?;
    let programs = |d: &Path| HubPrograms {
        python: d.join("venv/bin/python"),
        jupyterhub: d.join("venv/bin/jupyterhub"),
        proxy: d.join("proxy/node_modules/.bin/configurable-http-proxy"),
    };
    if dir.join(".complete").is_file() {
        return Ok(programs(&dir));
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let started = std::time::Instant::now();
    run(Command::new("python3").args(["-m", "venv"]).arg(dir.join("venv")))
        .context("making a Python venv (python3 with its venv module is needed)")?;
    run(Command::new(dir.join("venv/bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(HUB_PACKAGES))?;
    fs::create_dir_all(dir.join("proxy"))?;
    run(Command::new("npm")
        .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
        .arg(dir.join("proxy"))
        .arg(PROXY_PACKAGE))
    .context("installing configurable-http-proxy (npm is needed)")?;
    fs::write(dir.join(".complete"), format!("{HUB_PACKAGES:?} {PROXY_PACKAGE}\n"))?;
    eprintln!("notebooks fixture installed in {:.0?}", started.elapsed());
    Ok(programs(&dir))
}
