//! The notebooks' upstream programs for the tests, from their package registries: JupyterHub
//! with KubeSpawner (PyPI) and configurable-http-proxy (npm), each package pinned with its hash.
//! Installed once per machine into the labforge cache, keyed by the pin files and the Python and
//! Node versions (test fixtures: never committed, never product code).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// What the fixture installs: `requirements.txt` (JupyterHub 5.3.0, KubeSpawner 7.0.0 and every
/// package they pull in, each with its sha256: pip refuses other bytes) and `proxy/` (a
/// package.json for configurable-http-proxy 4.6.3 and its package-lock.json with every
/// package's integrity hash, installed with `npm ci`).
fn inputs() -> Result<Vec<(String, Vec<u8>)>> {
    let dir = crate::workspace_root().join("qemu-tests/notebooks");
    let mut v = Vec::new();
    for f in ["requirements.txt", "proxy/package.json", "proxy/package-lock.json"] {
        v.push((f.to_string(), fs::read(dir.join(f)).with_context(|| format!("reading qemu-tests/notebooks/{f}"))?));
    }
    for (what, cmd) in [("python3", ["python3", "--version"]), ("node", ["node", "--version"])] {
        let out = Command::new(cmd[0]).arg(cmd[1]).output().with_context(|| format!("{what} is needed"))?;
        v.push((what.to_string(), out.stdout));
    }
    Ok(v)
}

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
    let inputs = inputs()?;
    let mut h = Sha256::new();
    for (name, bytes) in &inputs {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(bytes);
        h.update([0]);
    }
    let key = hex::encode(h.finalize());
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
    // Trusted only if it was finished and still runs (a Python upgraded under it would not).
    let works =
        |p: &HubPrograms| Command::new(&p.jupyterhub).arg("--version").output().is_ok_and(|o| o.status.success());
    if dir.join(".complete").is_file() && works(&programs(&dir)) {
        return Ok(programs(&dir));
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let started = std::time::Instant::now();
    run(Command::new("python3").args(["-m", "venv"]).arg(dir.join("venv")))
        .context("making a Python venv (python3 with its venv module is needed)")?;
    let src = crate::workspace_root().join("qemu-tests/notebooks");
    run(Command::new(dir.join("venv/bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "--require-hashes", "--no-deps", "-r"])
        .arg(src.join("requirements.txt")))?;
    fs::create_dir_all(dir.join("proxy"))?;
    for f in ["package.json", "package-lock.json"] {
        fs::copy(src.join("proxy").join(f), dir.join("proxy").join(f))?;
    }
    run(Command::new("npm").args(["ci", "--silent", "--no-audit", "--no-fund", "--prefix"]).arg(dir.join("proxy")))
        .context("installing configurable-http-proxy (npm is needed)")?;
    if !works(&programs(&dir)) {
        bail!("the notebooks fixture in {} was installed but jupyterhub does not run", dir.display());
    }
    fs::write(dir.join(".complete"), &key)?;
    eprintln!("notebooks fixture installed in {:.0?}", started.elapsed());
    Ok(programs(&dir))
}
