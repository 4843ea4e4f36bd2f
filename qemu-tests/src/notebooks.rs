//! The notebooks' upstream programs for the tests, from their package registries: JupyterHub
//! with KubeSpawner (PyPI) and configurable-http-proxy (npm), and Enterprise Gateway (PyPI, a
//! venv of its own: it needs jupyter-server 1.x), each package pinned with its hash.
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

/// Enterprise Gateway 3.3.0, installed: its venv's `bin` (its `jupyter`, and the Python the
/// front and the kernel launcher run with), and the kernel side as a kernel image holds it:
/// a Python with ipykernel, and the gateway's kernel launcher.
pub struct GatewayPrograms {
    pub bin: PathBuf,
    pub kernel_python: PathBuf,
    pub kernel_launcher: PathBuf,
}

const LAUNCHER_IN_SDIST: &str =
    "jupyter_enterprise_gateway-3.3.0/etc/kernel-launchers/python/scripts/launch_ipykernel.py";

/// Installs (or reuses) Enterprise Gateway from `gateway-requirements.txt` (every package with
/// its sha256), like [`hub_programs`].
pub fn gateway_programs() -> Result<GatewayPrograms> {
    let src = crate::workspace_root().join("qemu-tests/notebooks");
    let mut inputs = Vec::new();
    for f in ["gateway-requirements.txt", "kernel-requirements.txt", "gateway-sdist.txt"] {
        inputs
            .push((f.to_string(), fs::read(src.join(f)).with_context(|| format!("reading qemu-tests/notebooks/{f}"))?));
    }
    let out = Command::new("python3").arg("--version").output().context("python3 is needed")?;
    inputs.push(("python3".into(), out.stdout));
    let programs = |dir: &Path| GatewayPrograms {
        bin: dir.join("venv/bin"),
        kernel_python: dir.join("kernel/venv/bin/python"),
        kernel_launcher: dir.join("launch_ipykernel.py"),
    };
    let works = |dir: &Path| {
        let p = programs(dir);
        let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
        ok(Command::new(p.bin.join("jupyter")).args(["enterprisegateway", "--version"]))
            && ok(Command::new(&p.kernel_python).args(["-c", "import ipykernel, Cryptodome"]))
            && p.kernel_launcher.is_file()
    };
    let dir = installed("gateway", &inputs, works, |dir| {
        fs::create_dir_all(dir.join("kernel"))?;
        venv_with(dir, &src.join("gateway-requirements.txt"))?;
        venv_with(&dir.join("kernel"), &src.join("kernel-requirements.txt"))?;
        // The sdist, its bytes checked against the pin; only the launcher is taken from it.
        run(Command::new(programs(dir).bin.join("pip"))
            .args(["download", "--quiet", "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:"])
            .args(["--require-hashes", "-d"])
            .arg(dir.join("sdist"))
            .arg("-r")
            .arg(src.join("gateway-sdist.txt")))?;
        let launcher = Command::new("tar")
            .arg("-xzOf")
            .arg(dir.join("sdist/jupyter_enterprise_gateway-3.3.0.tar.gz"))
            .arg(LAUNCHER_IN_SDIST)
            .output()
            .context("running tar")?;
        if !launcher.status.success() || launcher.stdout.is_empty() {
            bail!("{LAUNCHER_IN_SDIST} is not in the gateway's sdist: {}", String::from_utf8_lossy(&launcher.stderr));
        }
        Ok(fs::write(programs(dir).kernel_launcher, launcher.stdout)?)
    })?;
    Ok(programs(&dir))
}

/// The fixture `name` for `inputs`, installed into its directory by `install` unless a
/// finished install that `works` is there. Concurrent callers serialise on a lock file; a venv
/// cannot be moved (its scripts name its path), so it is made in place and counts only once
/// `.complete` is written: an interrupted install is removed and done again, and one that
/// stopped working (a Python upgraded under it) is done again too.
fn installed(
    name: &str,
    inputs: &[(String, Vec<u8>)],
    works: impl Fn(&Path) -> bool,
    install: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let (dir, _held) = fixture_dir(name, inputs)?;
    if dir.join(".complete").is_file() && works(&dir) {
        return Ok(dir);
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let started = std::time::Instant::now();
    install(&dir)?;
    if !works(&dir) {
        bail!("the {name} fixture in {} was installed but does not run", dir.display());
    }
    fs::write(dir.join(".complete"), "")?;
    eprintln!("{name} fixture installed in {:.0?}", started.elapsed());
    Ok(dir)
}

/// The fixture's directory for `inputs` (keyed by their hash), held under a lock file: a venv
/// cannot be moved (its scripts name its path), so it is made in place and counts only once
/// `.complete` is written.
fn fixture_dir(name: &str, inputs: &[(String, Vec<u8>)]) -> Result<(PathBuf, nix::fcntl::Flock<fs::File>)> {
    let mut h = Sha256::new();
    for (name, bytes) in inputs {
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
    let lock = fs::File::create(root.join(format!("{name}-{}.lock", &key[..16])))?;
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking the {name} fixture: {e}"))?;
    Ok((root.join(format!("{name}-{}", &key[..16])), held))
}

/// A venv in `dir/venv` with exactly the pinned, hashed packages of `requirements`.
fn venv_with(dir: &Path, requirements: &Path) -> Result<()> {
    run(Command::new("python3").args(["-m", "venv"]).arg(dir.join("venv")))
        .context("making a Python venv (python3 with its venv module is needed)")?;
    run(Command::new(dir.join("venv/bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "--require-hashes", "--no-deps", "-r"])
        .arg(requirements))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Installs (or reuses) the users' notebook server from `singleuser-requirements.txt`
/// (JupyterHub's `jupyterhub-singleuser` with jupyter-server 2, every package with its sha256),
/// like [`hub_programs`]; the venv's directory.
pub fn singleuser_venv() -> Result<PathBuf> {
    let src = crate::workspace_root().join("qemu-tests/notebooks/singleuser-requirements.txt");
    let mut inputs = vec![("singleuser-requirements.txt".to_string(), fs::read(&src).context("reading the pins")?)];
    let out = Command::new("python3").arg("--version").output().context("python3 is needed")?;
    inputs.push(("python3".into(), out.stdout));
    let works = |dir: &Path| {
        Command::new(dir.join("venv/bin/jupyterhub-singleuser"))
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    Ok(installed("singleuser", &inputs, works, |dir| venv_with(dir, &src))?.join("venv"))
}

/// Installs (or reuses) the hub's programs (see [`installed`]).
pub fn hub_programs() -> Result<HubPrograms> {
    let programs = |d: &Path| HubPrograms {
        python: d.join("venv/bin/python"),
        jupyterhub: d.join("venv/bin/jupyterhub"),
        proxy: d.join("proxy/node_modules/.bin/configurable-http-proxy"),
    };
    let works =
        |d: &Path| Command::new(programs(d).jupyterhub).arg("--version").output().is_ok_and(|o| o.status.success());
    let dir = installed("notebooks", &inputs()?, works, |dir| {
        let src = crate::workspace_root().join("qemu-tests/notebooks");
        venv_with(dir, &src.join("requirements.txt"))?;
        fs::create_dir_all(dir.join("proxy"))?;
        for f in ["package.json", "package-lock.json"] {
            fs::copy(src.join("proxy").join(f), dir.join("proxy").join(f))?;
        }
        run(Command::new("npm").args(["ci", "--silent", "--no-audit", "--no-fund", "--prefix"]).arg(dir.join("proxy")))
            .context("installing configurable-http-proxy (npm is needed)")
    })?;
    Ok(programs(&dir))
}
