//! The notebooks component's images for the VM tests, made from the same pinned packages the
//! loopback tests run (PyPI and npm, see [`crate::notebooks`]) on the build host's Debian
//! Python 3.11 and Node.js: no upstream image can be had here. Five images share one base layer:
//!
//! - base: Debian's `python3.11` with its standard library (and `venv` with the pip wheel
//!   Debian's `ensurepip` installs from, for `lab-env`), the shared objects they load, and the
//!   host's static busybox as `sh` and the few tools the component's scripts use (and `ip`,
//!   which jupyter-client runs to find the pod's address);
//! - `jupyterhub`: JupyterHub with KubeSpawner and its pages (`share/jupyterhub`); `configurable-http-proxy`: Node.js and the proxy;
//! - `singleuser`: `jupyterhub-singleuser` with jupyter-server 2 (`HOME` is the mounted home;
//!   the hub's is its database volume, the others' `/tmp`: the roster's uids have no name);
//! - `enterprise-gateway`: Enterprise Gateway 3.3.0 (jupyter-server 1), which also runs the
//!   component's front; `kernel-py`: ipykernel and the gateway's kernel launcher, where the
//!   component's `kernel_launcher` setting names it.
//!
//! A venv's packages go to `/usr/local/lib/python3.11/dist-packages` (on Debian Python's path)
//! and its commands to `/usr/local/bin`, their `#!` line pointing at `/usr/bin/python3`. Files
//! keep their modification times, so the compiled `.pyc` files stay valid: Python never
//! recompiles a module at start (it could not write them as a user, and an emulated CPU would
//! pay for it at every start).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::kubernetes::{append, Entry, HostFiles, OciImage, LAYER_MTIME};

/// The images' tag, and the repository below the registry they are pushed to.
pub const TAG: &str = "1";
pub const PREFIX: &str = "labforge-test";

const PYTHON: &str = "/usr/bin/python3.11";
const STDLIB: &str = "/usr/lib/python3.11";
const DIST_PACKAGES: &str = "usr/local/lib/python3.11/dist-packages";
/// Debian's `ensurepip` takes pip from here (package python3-pip-whl).
const WHEELS: &str = "/usr/share/python-wheels";
const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "env", "id", "ls", "cat", "echo", "test", "[", "mkdir", "rmdir", "mv", "rm", "chown", "chmod", "sleep",
    "head", "grep", "true", "false", "ip", "hostname",
];
/// Where the component's `kernel_launcher` setting looks for the launcher.
const KERNEL_LAUNCHER: &str = "usr/local/bin/kernel-launchers/python/scripts/launch_ipykernel.py";

/// One image layer being written: a tar with root-owned entries and each directory once.
struct Tree {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
    /// Host shared objects found in the copied trees (their libraries are added at the end).
    objects: Vec<PathBuf>,
    /// Host paths of the copied trees: libraries inside them come with them.
    roots: Vec<PathBuf>,
}

impl Tree {
    fn new() -> Tree {
        Tree { tar: tar::Builder::new(Vec::new()), dirs: BTreeSet::new(), objects: Vec::new(), roots: Vec::new() }
    }

    /// `at`'s parent directories, 0755, each once.
    fn parents(&mut self, at: &str) -> Result<()> {
        let mut path = String::new();
        let parts: Vec<&str> = at.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            path = if path.is_empty() { part.to_string() } else { format!("{path}/{part}") };
            self.dir(&path, 0o755, LAYER_MTIME)?;
        }
        Ok(())
    }

    fn dir(&mut self, at: &str, mode: u32, mtime: u64) -> Result<()> {
        if self.dirs.insert(at.to_string()) {
            self.parents(at)?;
            append(&mut self.tar, &Entry::Dir { path: format!("{at}/"), mode }, mtime)?;
        }
        Ok(())
    }

    fn data(&mut self, at: &str, data: Vec<u8>, mode: u32, mtime: u64) -> Result<()> {
        self.parents(at)?;
        append(&mut self.tar, &Entry::File { path: at.into(), data, mode }, mtime)
    }

    fn link(&mut self, at: &str, target: &str) -> Result<()> {
        self.parents(at)?;
        append(&mut self.tar, &Entry::Link { path: at.into(), target: target.into() }, LAYER_MTIME)
    }

    /// One host file (not following a link) at `at`, with its mode and modification time.
    fn host_file(&mut self, host: &Path, at: &str) -> Result<()> {
        let meta = fs::symlink_metadata(host).with_context(|| format!("reading {}", host.display()))?;
        let mtime = meta.mtime().max(0) as u64;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(host)?;
            return self.link(at, &target.to_string_lossy());
        }
        if meta.is_dir() {
            return self.dir(at, meta.permissions().mode() & 0o7777 | 0o755, mtime);
        }
        let name = host.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.ends_with(".so") || name.contains(".so.") {
            self.objects.push(host.to_path_buf());
        }
        // Readable by the unprivileged users the pods run as.
        let mode = meta.permissions().mode() & 0o7777 | 0o444;
        self.data(at, fs::read(host).with_context(|| format!("reading {}", host.display()))?, mode, mtime)
    }

    /// The host directory `src` as `at`, without the entries `skip` names (by path below `src`).
    fn host_tree(&mut self, src: &Path, at: &str, skip: &dyn Fn(&str) -> bool) -> Result<()> {
        self.roots.push(src.to_path_buf());
        for e in walkdir::WalkDir::new(src).sort_by_file_name().into_iter().filter_entry(|e| {
            let rel = e.path().strip_prefix(src).map(|r| r.to_string_lossy().into_owned()).unwrap_or_default();
            rel.is_empty() || !skip(&rel)
        }) {
            let e = e.with_context(|| format!("walking {}", src.display()))?;
            let rel = e.path().strip_prefix(src)?.to_string_lossy().into_owned();
            let to = if rel.is_empty() { at.to_string() } else { format!("{at}/{rel}") };
            self.host_file(e.path(), &to)?;
        }
        Ok(())
    }

    /// The venv's commands (`#!` line: its Python) as `/usr/local/bin` commands of the image's
    /// Python; its own `python`, `pip` and `activate` are left out.
    fn venv_commands(&mut self, venv: &Path) -> Result<()> {
        let own = format!("#!{}", venv.join("bin/").display());
        for e in fs::read_dir(venv.join("bin"))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("python") || name.starts_with("pip") || name.starts_with("activate") {
                continue;
            }
            let bytes = fs::read(e.path())?;
            let text = String::from_utf8_lossy(&bytes);
            let Some((first, rest)) = text.split_once('\n') else { continue };
            if !first.starts_with(&own) {
                continue;
            }
            let script = format!("#!/usr/bin/python3\n{rest}");
            self.data(&format!("usr/local/bin/{name}"), script.into_bytes(), 0o755, LAYER_MTIME)?;
        }
        Ok(())
    }

    /// The venv's installed packages, without pip and setuptools (nothing installs into an
    /// image at run time; `lab-env` has Debian's pip wheel), the packages' own test suites, and
    /// the Kubernetes client's asyncio copy (68 MB; Enterprise Gateway and the front use the
    /// synchronous one): every megabyte is imported on the PC's first boot.
    fn venv_packages(&mut self, venv: &Path) -> Result<()> {
        let site = venv.join("lib/python3.11/site-packages");
        let skip = |rel: &str| {
            let top = rel.split('/').next().unwrap_or(rel);
            let tooling = ["pip", "setuptools", "_distutils_hack", "distutils-precedence.pth"]
                .iter()
                .any(|p| top == *p || top.starts_with(&format!("{p}-")));
            let tests = rel.contains('/') && rel.rsplit('/').next().is_some_and(|n| n == "tests" || n == "test");
            tooling || tests || rel == "kubernetes/aio"
        };
        self.host_tree(&site, DIST_PACKAGES, &skip)?;
        self.venv_commands(venv)
    }

    /// Adds the host libraries the copied shared objects load (those not inside a copied tree),
    /// and returns the layer.
    fn finish(mut self) -> Result<Arc<Vec<u8>>> {
        let mut libs = HostFiles::default();
        for o in std::mem::take(&mut self.objects) {
            for lib in crate::kubernetes::ldd(&o)? {
                let system = ["/lib", "/lib64", "/usr/lib", "/usr/lib64"].iter().any(|p| lib.starts_with(p));
                if system && !self.roots.iter().any(|r| lib.starts_with(r)) {
                    libs.add(&lib)?;
                }
            }
        }
        for e in libs.into_entries() {
            let path = match &e {
                Entry::File { path, .. } | Entry::Link { path, .. } | Entry::Dir { path, .. } => path.clone(),
            };
            self.parents(&path)?;
            append(&mut self.tar, &e, LAYER_MTIME)?;
        }
        Ok(Arc::new(self.tar.into_inner()?))
    }
}

/// The base layer: Debian's Python, busybox, `/tmp`, the merged-/usr links.
fn base_layer() -> Result<Arc<Vec<u8>>> {
    for (path, package) in [(PYTHON, "python3"), (WHEELS, "python3-venv"), (BUSYBOX, "busybox-static")] {
        if !Path::new(path).exists() {
            bail!("{path} is missing: the notebook test images take the host's (apt-get install {package})");
        }
    }
    let mut t = Tree::new();
    for d in ["bin", "sbin", "lib", "lib64"] {
        t.link(d, &format!("usr/{d}"))?;
    }
    t.dir("tmp", 0o1777, LAYER_MTIME)?;
    t.host_file(Path::new(PYTHON), "usr/bin/python3.11")?;
    t.objects.push(PathBuf::from(PYTHON));
    t.link("usr/bin/python3", "python3.11")?;
    // Not the tests, the GUI modules or the static library for embedding.
    let skip = |rel: &str| {
        let top = rel.split('/').next().unwrap_or(rel);
        ["test", "idlelib", "tkinter", "turtledemo", "config-3.11-x86_64-linux-gnu"].contains(&top)
    };
    t.host_tree(Path::new(STDLIB), &STDLIB[1..], &skip)?;
    t.host_tree(Path::new(WHEELS), &WHEELS[1..], &|_| false)?;
    t.host_file(Path::new(BUSYBOX), "usr/bin/busybox")?;
    for applet in APPLETS {
        t.link(&format!("usr/bin/{applet}"), "busybox")?;
    }
    // Who the pods run as has no name here (the roster's uids): a passwd with root only.
    t.data("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n".to_vec(), 0o644, LAYER_MTIME)?;
    t.data("etc/group", b"root:x:0:\n".to_vec(), 0o644, LAYER_MTIME)?;
    t.finish()
}

/// The five images (see the module's documentation), from the installed fixtures.
pub fn notebook_images() -> Result<Vec<OciImage>> {
    let started = std::time::Instant::now();
    let hub = crate::notebooks::hub_programs()?;
    let gateway = crate::notebooks::gateway_programs()?;
    let singleuser = crate::notebooks::singleuser_venv()?;
    let base = base_layer()?;
    let venv_of = |python: &Path| python.parent().and_then(Path::parent).map(Path::to_path_buf).context("a venv");
    let image = |name: &str, layer: Arc<Vec<u8>>, entrypoint: &[&str], env: &[&str]| {
        OciImage::layered(&format!("{PREFIX}/{name}"), TAG, vec![base.clone(), layer], entrypoint, env)
    };
    let lang = "LANG=C.UTF-8";

    let mut t = Tree::new();
    let hub_venv = venv_of(&hub.python)?;
    t.venv_packages(&hub_venv)?;
    // The hub's pages and their static files: JupyterHub looks for `share/jupyterhub` above its
    // package, so `/usr/local/share/jupyterhub` (without them every page is a 500).
    let share = hub_venv.join("share/jupyterhub");
    if !share.join("templates/login.html").is_file() {
        bail!("{} has no templates/login.html: the hub fixture's venv is incomplete", share.display());
    }
    t.host_tree(&share, "usr/local/share/jupyterhub", &|_| false)?;
    let hub_image = image("jupyterhub", t.finish()?, &["jupyterhub"], &[lang, "HOME=/srv/jupyterhub"])?;

    let mut t = Tree::new();
    let node = Path::new("/usr/bin/node");
    t.host_file(node, "usr/bin/node")?;
    t.objects.push(node.to_path_buf());
    let modules = hub.proxy.parent().and_then(Path::parent).context("the proxy's node_modules")?;
    t.host_tree(modules, "usr/local/lib/configurable-http-proxy/node_modules", &|_| false)?;
    t.link(
        "usr/local/bin/configurable-http-proxy",
        "../lib/configurable-http-proxy/node_modules/configurable-http-proxy/bin/configurable-http-proxy",
    )?;
    let proxy_image = image("configurable-http-proxy", t.finish()?, &["configurable-http-proxy"], &["HOME=/tmp"])?;

    let mut t = Tree::new();
    t.venv_packages(&singleuser)?;
    let home = "HOME=/home/jovyan";
    let singleuser_image = image("singleuser", t.finish()?, &["jupyterhub-singleuser"], &[lang, home])?;

    let mut t = Tree::new();
    t.venv_packages(&venv_of(&gateway.bin.join("python"))?)?;
    let gateway_image =
        image("enterprise-gateway", t.finish()?, &["jupyter", "enterprisegateway"], &[lang, "HOME=/tmp"])?;

    let mut t = Tree::new();
    t.venv_packages(&venv_of(&gateway.kernel_python)?)?;
    t.host_file(&gateway.kernel_launcher, KERNEL_LAUNCHER)?;
    let kernel_image = image("kernel-py", t.finish()?, &["python3"], &[lang, home])?;

    let images = vec![hub_image, proxy_image, singleuser_image, gateway_image, kernel_image];
    let size: usize = images.iter().flat_map(|i| i.layers.iter().skip(1)).map(|l| l.len()).sum::<usize>() + base.len();
    eprintln!("notebook images made in {:.0?} ({} MiB of layers)", started.elapsed(), size >> 20);
    Ok(images)
}

/// Unpacks `image`'s layers into `dir` (no whiteouts: these images have none), as a runtime
/// would lay out its root file system.
pub fn unpack(image: &OciImage, dir: &Path) -> Result<()> {
    for l in &image.layers {
        let mut a = tar::Archive::new(l.as_slice());
        a.set_preserve_permissions(true);
        a.set_preserve_mtime(true);
        a.set_overwrite(true);
        a.unpack(dir).with_context(|| format!("unpacking {} into {}", image.name, dir.display()))?;
    }
    Ok(())
}

/// Runs `cmd` (`sh -c`) chrooted into `root` as `uid`:`gid` with no capabilities, with the
/// image's environment; its output, or the error with it.
pub fn run_in(root: &Path, image: &OciImage, uid: u32, cmd: &str) -> Result<String> {
    let config: serde_json::Value = serde_json::from_slice(&image.config)?;
    let env: Vec<String> = config["config"]["Env"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let out = Command::new("chroot")
        .arg(format!("--userspec={uid}:{uid}"))
        .arg(root)
        .args(["/usr/bin/env", "-i"])
        .args(&env)
        .args(["sh", "-c", cmd])
        .output()
        .context("running chroot")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{} as uid {uid}: `{cmd}` failed ({}):\n{text}", image.name, out.status);
    }
    Ok(text)
}
