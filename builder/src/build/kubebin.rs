//! Kubernetes from release binaries (`[kubernetes] source = "binaries"`): kubeadm, kubelet,
//! kubectl and the CNI plugins downloaded from a base URL laid out like upstream's release
//! download site, pinned by sha256 in the lock file beside the spec, verified while they
//! stream, and installed with a kubelet unit and kubeadm drop-in of the shape upstream
//! documents for installs without a package manager. This is how a Debian image, or a site
//! with a local mirror of the release files and no Internet, gets Kubernetes.
//!
//! Layout read (`binaries-url` = `<base>`, `cni-url` = `<cni>`):
//! - `<base>/<version>/bin/linux/amd64/{kubeadm,kubelet,kubectl}`, each with a `.sha256`
//!   beside it holding its hex digest (as `https://dl.k8s.io/release` serves them);
//! - `<cni>/<cni-version>/cni-plugins-linux-amd64-<cni-version>.tgz` and its `.sha256`
//!   (`<hex>  <file>`, as the CNI plugins' release page serves them).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::fsutil::write_in_root;
use super::outputs::sha256_file;
use crate::cmd::Cmd;
use crate::registry::lock::{LockFile, LockedFile};
use crate::spec::{KubernetesSource, KubernetesSpec};

/// The programs installed into `/usr/bin`.
pub const PROGRAMS: [&str; 3] = ["kubeadm", "kubelet", "kubectl"];
/// A `.sha256` file is a digest and maybe a file name: anything longer is not one.
const MAX_SUM_FILE: u64 = 4096;
/// Release binaries are tens of MiB; a body past this is refused.
const MAX_BINARY: u64 = 1 << 30;

/// One release file: its name in the image, where it comes from, and its pinned sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub name: String,
    pub url: String,
    pub sha256: String,
}

/// The files `k` asks for, as (name, url); none unless `source = "binaries"`.
pub fn wanted(k: &KubernetesSpec) -> Vec<(String, String)> {
    if k.source != KubernetesSource::Binaries {
        return Vec::new();
    }
    let base = k.binaries_url.trim_end_matches('/');
    let mut files: Vec<(String, String)> =
        PROGRAMS.iter().map(|p| (p.to_string(), format!("{base}/{}/bin/linux/amd64/{p}", k.version))).collect();
    let cni = k.cni_url.trim_end_matches('/');
    let tgz = format!("cni-plugins-linux-amd64-{}.tgz", k.cni_version);
    files.push((tgz.clone(), format!("{cni}/{}/{tgz}", k.cni_version)));
    files
}

fn client() -> Result<reqwest::blocking::Client> {
    // reqwest's rustls needs a process-wide crypto provider; a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(1800))
        .build()
        .context("making the HTTP client for the Kubernetes release files")
}

/// Pins every wanted file: from `lock` when it has the URL, else from the `.sha256` published
/// beside it. A file that is not there (a version with no release, a wrong URL) fails here,
/// before anything is built.
pub fn resolve(k: &KubernetesSpec, lock: &LockFile) -> Result<Vec<Pinned>> {
    let wanted = wanted(k);
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let http = client()?;
    wanted
        .into_iter()
        .map(|(name, url)| {
            let sha256 = match lock.file(&url) {
                Some(s) => s.to_string(),
                None => published_sum(&http, &url).with_context(|| {
                    format!(
                        "Kubernetes {} has no {name} at {url}: check [kubernetes] version, binaries-url, cni-version and cni-url",
                        k.version
                    )
                })?,
            };
            Ok(Pinned { name, url, sha256 })
        })
        .collect()
}

/// [`resolve`] without the network (`labforge plan`): a file the lock does not pin gets the
/// digest `unresolved`.
pub fn resolve_offline(k: &KubernetesSpec, lock: &LockFile) -> Vec<Pinned> {
    wanted(k)
        .into_iter()
        .map(|(name, url)| {
            let sha256 = lock.file(&url).map(str::to_string).unwrap_or_else(|| super::UNRESOLVED.to_string());
            Pinned { name, url, sha256 }
        })
        .collect()
}

/// Whether kubeadm is pinned and already in the cache (so it can be asked without the network).
pub fn kubeadm_cached(pins: &[Pinned], cache: &Path) -> bool {
    pins.iter().find(|p| p.name == "kubeadm").is_some_and(|p| cached(p, cache).is_some())
}

/// How a stack component's upstream file is named among the pinned downloads (its pin lives in
/// the component, not in the lock file).
pub const UPSTREAM_FILE: &str = "upstream file ";

/// Where the cache holds the file `p` pins, if it does.
pub fn cached(p: &Pinned, cache: &Path) -> Option<PathBuf> {
    let path = cache.join("binaries/sha256").join(&p.sha256);
    (p.sha256 != super::UNRESOLVED && path.is_file()).then_some(path)
}

/// The digest in `<url>.sha256`: its first word, 64 hex digits.
fn published_sum(http: &reqwest::blocking::Client, url: &str) -> Result<String> {
    let sum_url = format!("{url}.sha256");
    let resp = http.get(&sum_url).send().with_context(|| format!("fetching {sum_url}"))?;
    if !resp.status().is_success() {
        bail!("{sum_url}: HTTP {}", resp.status());
    }
    let mut text = String::new();
    resp.take(MAX_SUM_FILE + 1).read_to_string(&mut text).with_context(|| format!("reading {sum_url}"))?;
    parse_sum(&text).with_context(|| format!("{sum_url} holds no sha256"))
}

/// The first word of a `.sha256` file, if it is 64 hex digits.
pub fn parse_sum(text: &str) -> Result<String> {
    if text.len() as u64 > MAX_SUM_FILE {
        bail!("longer than {MAX_SUM_FILE} bytes");
    }
    let word = text.split_whitespace().next().unwrap_or("");
    if word.len() != 64 || !word.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("expected 64 hex digits, found {:?}", word.chars().take(80).collect::<String>());
    }
    Ok(word.to_ascii_lowercase())
}

/// Downloads every pinned file into `<cache>/binaries/sha256/<hex>` (kept between builds),
/// hashing while it streams; a file whose digest differs is deleted and fails the build,
/// naming it. Returns the cached paths, in `pins` order.
pub fn fetch_all(pins: &[Pinned], cache: &Path) -> Result<Vec<PathBuf>> {
    if pins.is_empty() {
        return Ok(Vec::new());
    }
    let dir = cache.join("binaries/sha256");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let http = client()?;
    pins.iter()
        .map(|p| {
            let to = dir.join(&p.sha256);
            if to.is_file() && sha256_file(&to)? == p.sha256 {
                return Ok(to);
            }
            fetch(&http, p, &to)?;
            Ok(to)
        })
        .collect()
}

fn fetch(http: &reqwest::blocking::Client, p: &Pinned, to: &Path) -> Result<()> {
    let dir = to.parent().expect("cache dir");
    let mut resp = http.get(&p.url).send().with_context(|| format!("downloading {} from {}", p.name, p.url))?;
    if !resp.status().is_success() {
        bail!("downloading {} from {}: HTTP {}", p.name, p.url, resp.status());
    }
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("writing in {}", dir.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = resp.read(&mut buf).with_context(|| format!("downloading {} from {}", p.name, p.url))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_BINARY {
            bail!("{} from {} is larger than {} MiB: not a release file", p.name, p.url, MAX_BINARY >> 20);
        }
        h.update(&buf[..n]);
        tmp.write_all(&buf[..n]).with_context(|| format!("writing {}", tmp.path().display()))?;
    }
    let got = hex::encode(h.finalize());
    if got != p.sha256 {
        let fix = if p.name.starts_with(UPSTREAM_FILE) {
            "if the new file is trusted, put its sha256 in the component's [[upstream]] entry"
        } else {
            "if the new file is trusted, build with --update-lock"
        };
        bail!(
            "{} from {} has sha256 {got}, but {} is pinned: the file changed or the mirror serves another one; {fix}",
            p.name,
            p.url,
            p.sha256
        );
    }
    tmp.as_file().sync_all()?;
    tmp.persist(to).map_err(|e| e.error).with_context(|| format!("writing {}", to.display()))?;
    Ok(())
}

/// The images kubeadm itself says the control plane needs (`kubeadm config images list` for
/// the spec's version and image repository), run from the pinned kubeadm (fetched into the
/// cache if it is not there yet): the preload list can never drift from the kubeadm in the image.
pub fn control_plane_images(k: &KubernetesSpec, pins: &[Pinned], cache: &Path) -> Result<Vec<String>> {
    let Some(kubeadm) = pins.iter().find(|p| p.name == "kubeadm") else { return Ok(Vec::new()) };
    let cached = fetch_all(std::slice::from_ref(kubeadm), cache)?.remove(0);
    list_images(&cached, k)
}

/// The same list from the kubeadm a root filesystem carries (`[kubernetes] source =
/// "packages"`: the distribution's or the apt repository's kubeadm), or none when it has no
/// kubeadm. The build uses it to mark the control plane's images in the layout.
pub fn images_of_root(root: &Path, k: &KubernetesSpec) -> Result<Vec<String>> {
    let kubeadm = root.join("usr/bin/kubeadm");
    if !kubeadm.is_file() {
        return Ok(Vec::new());
    }
    list_images(&kubeadm, k)
}

/// Runs a private executable copy of `kubeadm` (the cache keeps files 0600; a root
/// filesystem's is not ours to run in place) as `config images list`.
fn list_images(kubeadm: &Path, k: &KubernetesSpec) -> Result<Vec<String>> {
    let dir = tempfile::tempdir().context("making a directory to run kubeadm from")?;
    let exe = dir.path().join("kubeadm");
    fs::copy(kubeadm, &exe).with_context(|| format!("copying {}", kubeadm.display()))?;
    fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let exe_path = exe.to_str().context("a temporary path that is not UTF-8")?;
    let mut cmd = Cmd::new(exe_path).args(["config", "images", "list", "--kubernetes-version", &k.version]);
    if !k.image_repository.is_empty() {
        cmd = cmd.args(["--image-repository", &k.image_repository]);
    }
    let out =
        cmd.run().with_context(|| format!("asking kubeadm {} which images its control plane needs", k.version))?;
    parse_image_list(&out).with_context(|| format!("reading what kubeadm {} listed", k.version))
}

/// One image reference per line; anything else is an error.
pub fn parse_image_list(text: &str) -> Result<Vec<String>> {
    let refs: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    if refs.is_empty() {
        bail!("it listed no image");
    }
    for r in &refs {
        crate::registry::parse_reference(r)?;
    }
    Ok(refs)
}

/// kubelet's unit: kubeadm supplies its flags and config through the drop-in below.
const KUBELET_UNIT: &str = "\
# Written by labforge ([kubernetes] source = \"binaries\"): kubelet as installed without a package manager.
[Unit]
Description=kubelet: the Kubernetes node agent
Documentation=https://kubernetes.io/docs/
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/bin/kubelet
Restart=always
StartLimitInterval=0
RestartSec=10

[Install]
WantedBy=multi-user.target
";

/// The kubeadm drop-in: the kubeconfigs and config kubeadm writes, and the flags file it
/// generates at init/join (`/var/lib/kubelet/kubeadm-flags.env`).
const KUBEADM_DROPIN: &str = "\
# Written by labforge ([kubernetes] source = \"binaries\"): how kubeadm configures kubelet.
[Service]
Environment=\"KUBELET_KUBECONFIG_ARGS=--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf\"
Environment=\"KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml\"
EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
EnvironmentFile=-/etc/default/kubelet
ExecStart=
ExecStart=/usr/bin/kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
";

/// Installs the fetched files into `root`: the programs in `/usr/bin`, the CNI plugins in
/// `/opt/cni/bin`, kubelet's unit and kubeadm drop-in, kubelet enabled.
pub fn install(root: &Path, pins: &[Pinned], files: &[PathBuf]) -> Result<()> {
    for (p, file) in pins.iter().zip(files) {
        if PROGRAMS.contains(&p.name.as_str()) {
            let bytes = fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            write_in_root(root, &format!("usr/bin/{}", p.name), &bytes, 0o755)?;
        } else {
            let to = root.join("opt/cni/bin");
            fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
            Cmd::new("tar")
                .args(["-xzf"])
                .arg(file)
                .arg("-C")
                .arg(&to)
                .args(["--no-same-owner", "--no-same-permissions"])
                .run()
                .with_context(|| format!("unpacking {} into /opt/cni/bin", p.name))?;
        }
    }
    write_in_root(root, "usr/lib/systemd/system/kubelet.service", KUBELET_UNIT.as_bytes(), 0o644)?;
    write_in_root(root, "usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf", KUBEADM_DROPIN.as_bytes(), 0o644)?;
    Cmd::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .args(["enable", "kubelet.service"])
        .run()
        .context("enabling kubelet in the image")?;
    Ok(())
}

/// The lock entries for `pins`.
pub fn locked(pins: &[Pinned]) -> Vec<LockedFile> {
    pins.iter().map(|p| LockedFile { url: p.url.clone(), sha256: p.sha256.clone() }).collect()
}

#[cfg(test)]
pub(crate) mod tests;
