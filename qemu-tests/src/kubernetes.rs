//! Upstream Kubernetes for the VM scenarios, built from its own Go modules by
//! `qemu-tests/fixtures/kubernetes/build.sh` (once per machine: cached under the cache dir by
//! the hash of its inputs) and handed to the builder the way a site's own mirror would:
//!
//! - the release files in upstream's download layout (`release/<version>/bin/linux/amd64/…`
//!   with `.sha256` beside each, `cni/<version>/cni-plugins-linux-amd64-<version>.tgz`), served
//!   over HTTP on loopback for `[kubernetes] source = "binaries"`;
//! - the control-plane images (apiserver, controller-manager, scheduler, kube-proxy with the
//!   iptables tools it runs, etcd, CoreDNS, pause) as OCI images, pushed to a real registry on
//!   loopback under `[kubernetes] image-repository`, from which the builder preloads them.
//!
//! `labforge-kubernetes-release` (`make kubernetes-release`) writes the same files and an OCI
//! image layout to a directory instead.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::registry::{digest, Pusher, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST};

pub const VERSION: &str = "v1.36.5";
pub const CNI_VERSION: &str = "v1.10.0";
pub const ETCD_TAG: &str = "3.6.8-0";
pub const COREDNS_TAG: &str = "v1.14.2";
pub const PAUSE_TAG: &str = "3.10.2";
/// `local-path-provisioner:<tag>`: the fixture's Rancher local-path provisioner (its
/// `addons/local-path-provisioner/go.mod` pin; the binary's `--version` reports it).
pub const LOCAL_PATH_PROVISIONER_IMAGE: &str = "local-path-provisioner";
pub const LOCAL_PATH_PROVISIONER_TAG: &str = "v0.0.30";
/// `busybox:<tag>`: the provisioner's helper image, the build host's Debian `busybox-static`
/// (bookworm: 1.35.0). Name it in the provisioner ConfigMap's `helperPod.yaml` (`image:`):
/// v0.0.30 takes the helper pod's image from there and ignores `--helper-image`.
pub const BUSYBOX_IMAGE: &str = "busybox";
pub const BUSYBOX_TAG: &str = "1.35.0";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the fixture is built: `<cache>/fixtures/kubernetes-<version>` (`LABFORGE_CACHE_DIR`,
/// else labforge's default cache dir), shared by every checkout on the machine.
pub fn fixture_dir() -> PathBuf {
    // Set but empty counts as unset, as `scripts/fixture-early.sh` reads it.
    std::env::var_os("LABFORGE_CACHE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(labforge::build::default_cache_dir)
        .join("fixtures")
        .join(format!("kubernetes-{VERSION}"))
}

/// Builds the fixture, or reuses it when its inputs are unchanged (a build already running,
/// e.g. started in the background by `make test`, is waited for). Returns its directory:
/// `bin/` (kubeadm, kubelet, kubectl, the control plane, etcd, coredns, pause) and `cni/`.
/// The build's output goes to `target/qemu-tests/<log>.log`.
pub fn fixture(log: &str) -> Result<PathBuf> {
    build_fixture(log, &fixture_dir(), None)
}

/// Only what a control plane on loopback needs (etcd, kube-apiserver, kube-controller-manager,
/// kubectl), in a directory of its own beside the full fixture: less to compile on a cold
/// machine, and what it compiles a later full build takes from Go's build cache.
pub fn control_plane_fixture(log: &str) -> Result<PathBuf> {
    let mut dir = fixture_dir().into_os_string();
    dir.push("-control-plane");
    build_fixture(log, Path::new(&dir), Some("control-plane"))
}

fn build_fixture(log: &str, dir: &Path, parts: Option<&str>) -> Result<PathBuf> {
    let dir = dir.to_path_buf();
    let script = crate::workspace_root().join("qemu-tests/fixtures/kubernetes/build.sh");
    let log_path = crate::workspace_root().join(format!("target/qemu-tests/{log}.log"));
    fs::create_dir_all(log_path.parent().expect("parent"))?;
    let log = fs::File::create(&log_path)?;
    let started = std::time::Instant::now();
    let status = Command::new(&script)
        .arg(&dir)
        .args(parts)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        bail!(
            "building upstream Kubernetes from its Go modules failed ({status}); last lines:\n{}\n(full log: {})",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            log_path.display()
        );
    }
    eprintln!("kubernetes fixture ready in {:.0?}: {}", started.elapsed(), text.lines().last().unwrap_or(""));
    Ok(dir)
}

/// One entry of an image layer.
pub enum Entry {
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Link {
        path: String,
        target: String,
    },
    /// An empty directory (`mode`, owned by root): where a volume is mounted, say.
    Dir {
        path: String,
        mode: u32,
    },
}

/// The modification time of every entry [`layer`] writes.
pub const LAYER_MTIME: u64 = 1_700_000_000;

/// An uncompressed tar layer with fixed times and owners (the same entries, the same digest).
pub fn layer(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        append(&mut b, e, LAYER_MTIME)?;
    }
    Ok(b.into_inner()?)
}

/// Writes `e` into a layer: owned by root, modified at `mtime`.
pub(crate) fn append(b: &mut tar::Builder<Vec<u8>>, e: &Entry, mtime: u64) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    match e {
        Entry::File { path, data, mode } => {
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            b.append_data(&mut h, path, data.as_slice())?;
        }
        Entry::Link { path, target } => {
            h.set_size(0);
            h.set_mode(0o777);
            h.set_entry_type(tar::EntryType::Symlink);
            b.append_link(&mut h, path, target)?;
        }
        Entry::Dir { path, mode } => {
            h.set_size(0);
            h.set_mode(*mode);
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, path, std::io::empty())?;
        }
    }
    Ok(())
}

/// A linux/amd64 OCI image, in memory: its layers (uncompressed tars, shared between images
/// that have one in common) and its config.
pub struct OciImage {
    /// Name below the repository (`kube-apiserver`, `labforge-test/web`).
    pub name: String,
    pub tag: String,
    pub layers: Vec<std::sync::Arc<Vec<u8>>>,
    pub config: Vec<u8>,
}

impl OciImage {
    /// A single-layer image of `entries`.
    pub fn new(name: &str, tag: &str, entries: &[Entry], entrypoint: &[&str]) -> Result<OciImage> {
        OciImage::layered(name, tag, vec![std::sync::Arc::new(layer(entries)?)], entrypoint, &[])
    }

    /// An image of `layers` (bottom first); `env` comes after the standard `PATH`.
    pub fn layered(
        name: &str,
        tag: &str,
        layers: Vec<std::sync::Arc<Vec<u8>>>,
        entrypoint: &[&str],
        env: &[&str],
    ) -> Result<OciImage> {
        let diff_ids: Vec<String> = layers.iter().map(|l| digest(l)).collect();
        let env: Vec<&str> = [PATH_ENV].into_iter().chain(env.iter().copied()).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Entrypoint": entrypoint, "Env": env },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))?;
        Ok(OciImage { name: name.into(), tag: tag.into(), layers, config })
    }

    pub fn manifest(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": digest(&self.config), "size": self.config.len() },
            "layers": self.layers.iter()
                .map(|l| serde_json::json!({ "mediaType": OCI_LAYER, "digest": digest(l), "size": l.len() }))
                .collect::<Vec<_>>(),
        }))
        .expect("json")
    }

    /// Pushes to the registry at `base` (`http://host:port`) as `<prefix>/<name>:<tag>`.
    pub fn push(&self, base: &str, prefix: &str) -> Result<String> {
        let p = Pusher::new(base);
        let repo = if prefix.is_empty() { self.name.clone() } else { format!("{prefix}/{}", self.name) };
        for l in &self.layers {
            p.blob(&repo, l)?;
        }
        p.blob(&repo, &self.config)?;
        p.manifest(&repo, &self.tag, OCI_MANIFEST, &self.manifest())
    }
}

/// Writes `images` into one OCI image layout at `dir` (`oci-layout`, `index.json`,
/// `blobs/sha256/`), each named `<repository>/<name>:<tag>` in its
/// `org.opencontainers.image.ref.name` annotation (what `skopeo copy oci:DIR:NAME` reads).
pub fn write_oci_layout(images: &[OciImage], dir: &Path, repository: &str) -> Result<()> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut manifests = Vec::new();
    for img in images {
        let manifest = img.manifest();
        let blobs_of = img.layers.iter().map(|l| l.as_slice()).chain([img.config.as_slice(), manifest.as_slice()]);
        for blob in blobs_of {
            let path = blobs.join(&digest(blob)["sha256:".len()..]);
            if !path.exists() {
                fs::write(&path, blob)?;
            }
        }
        manifests.push(serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": digest(&manifest),
            "size": manifest.len(),
            "annotations": {
                "org.opencontainers.image.ref.name": format!("{}/{}:{}", repository.trim_end_matches('/'), img.name, img.tag),
            },
        }));
    }
    let index =
        serde_json::json!({ "schemaVersion": 2, "mediaType": crate::registry::OCI_INDEX, "manifests": manifests });
    fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

fn file(path: &str, from: &Path) -> Result<Entry> {
    let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    Ok(Entry::File { path: path.into(), data, mode: 0o755 })
}

/// The control-plane images kubeadm asks for, from the fixture's binaries.
pub fn control_plane_images(fixture: &Path) -> Result<Vec<OciImage>> {
    let bin = fixture.join("bin");
    let mut images = Vec::new();
    for name in ["kube-apiserver", "kube-controller-manager", "kube-scheduler"] {
        let entry = file(&format!("usr/local/bin/{name}"), &bin.join(name))?;
        images.push(OciImage::new(name, VERSION, &[entry], &[&format!("/usr/local/bin/{name}")])?);
    }
    let mut proxy = vec![file("usr/local/bin/kube-proxy", &bin.join("kube-proxy"))?];
    proxy.extend(iptables_entries()?);
    images.push(OciImage::new("kube-proxy", VERSION, &proxy, &["/usr/local/bin/kube-proxy"])?);
    images.push(OciImage::new(
        "etcd",
        ETCD_TAG,
        &[file("usr/local/bin/etcd", &bin.join("etcd"))?],
        &["/usr/local/bin/etcd"],
    )?);
    images.push(OciImage::new("coredns", COREDNS_TAG, &[file("coredns", &bin.join("coredns"))?], &["/coredns"])?);
    images.push(OciImage::new("pause", PAUSE_TAG, &[file("pause", &bin.join("pause"))?], &["/pause"])?);
    Ok(images)
}

/// The host's iptables (nft backend) with the libraries and extensions it loads, laid out as
/// a merged-/usr tree: what kube-proxy runs in its iptables mode. The build host is Debian, as
/// the README's host requirements say; its `iptables` package is one of the test packages.
fn iptables_entries() -> Result<Vec<Entry>> {
    let multi = Path::new("/usr/sbin/xtables-nft-multi");
    if !multi.exists() {
        bail!(
            "{} is missing: the kube-proxy test image takes the host's iptables (apt-get install iptables)",
            multi.display()
        );
    }
    let mut files = HostFiles::default();
    let mut links: Vec<Entry> = ["bin", "sbin", "lib", "lib64"]
        .iter()
        .map(|d| Entry::Link { path: d.to_string(), target: format!("usr/{d}") })
        .collect();
    let ext_dir = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    let mut objects = vec![multi.to_path_buf()];
    for e in fs::read_dir(ext_dir).with_context(|| format!("reading {}", ext_dir.display()))?.flatten() {
        objects.push(e.path());
    }
    for o in &objects {
        files.add(o)?;
        for lib in ldd(o)? {
            files.add(&lib)?;
        }
    }
    for tool in [
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ip6tables",
        "ip6tables-save",
        "ip6tables-restore",
        "iptables-nft",
        "iptables-nft-save",
        "iptables-nft-restore",
        "ip6tables-nft",
        "ip6tables-nft-save",
        "ip6tables-nft-restore",
    ] {
        links.push(Entry::Link { path: format!("usr/sbin/{tool}"), target: "xtables-nft-multi".into() });
    }
    links.extend(files.links);
    links.extend(files.files.into_values());
    Ok(links)
}

/// The shared objects `ldd` says `object` loads (absolute paths).
pub(crate) fn ldd(object: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(object).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let word = l.split("=>").nth(1).unwrap_or(l).split_whitespace().next()?;
            word.starts_with('/').then(|| PathBuf::from(word))
        })
        .collect())
}

/// Host files copied into an image under their merged-/usr names.
#[derive(Default)]
pub(crate) struct HostFiles {
    seen: std::collections::BTreeSet<String>,
    links: Vec<Entry>,
    files: BTreeMap<String, Entry>,
}

impl HostFiles {
    /// The links first (their targets' directories come with the files).
    pub(crate) fn into_entries(self) -> Vec<Entry> {
        self.links.into_iter().chain(self.files.into_values()).collect()
    }

    /// `path`, following symlinks (each kept as a link in the image).
    pub(crate) fn add(&mut self, path: &Path) -> Result<()> {
        let mut p = path.to_path_buf();
        for _ in 0..16 {
            let s = p.to_string_lossy().into_owned();
            let usr = ["/lib64/", "/lib/", "/sbin/", "/bin/"]
                .iter()
                .find_map(|pre| s.strip_prefix(pre).map(|rest| format!("usr/{}{rest}", &pre[1..])))
                .unwrap_or_else(|| s.trim_start_matches('/').to_string());
            if !self.seen.insert(usr.clone()) {
                return Ok(());
            }
            let meta = fs::symlink_metadata(&p).with_context(|| format!("reading {}", p.display()))?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&p)?;
                self.links.push(Entry::Link { path: usr, target: target.to_string_lossy().into_owned() });
                p = p.parent().expect("parent").join(target);
                continue;
            }
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            self.files.insert(usr.clone(), Entry::File { path: usr, data: fs::read(&p)?, mode });
            return Ok(());
        }
        bail!("{}: too many levels of symbolic links", path.display())
    }
}

/// The dynamic-storage images: the local-path provisioner from the fixture (entrypoint
/// `/local-path-provisioner`, also on PATH as `/usr/bin/local-path-provisioner`, where
/// upstream's image has it and its deploy YAML's `command` looks for it; it reaches the API
/// server in-cluster, so no CA bundle) and the helper its helper pods run: the host's static
/// busybox with the applets the default setup/teardown scripts use (`/bin/sh /script/setup`:
/// `mkdir -m 0777 -p "$VOL_DIR"`; teardown: `rm -rf "$VOL_DIR"`) and a few for test pods.
pub fn storage_images(fixture: &Path) -> Result<Vec<OciImage>> {
    let provisioner = OciImage::new(
        LOCAL_PATH_PROVISIONER_IMAGE,
        LOCAL_PATH_PROVISIONER_TAG,
        &[
            file("local-path-provisioner", &fixture.join("bin/local-path-provisioner"))?,
            Entry::Link { path: "usr/bin/local-path-provisioner".into(), target: "/local-path-provisioner".into() },
        ],
        &["/local-path-provisioner"],
    )?;
    Ok(vec![provisioner, busybox_image()?])
}

/// `kube-state-metrics:<tag>`: the fixture's kube-state-metrics (its
/// `addons/kube-state-metrics/go.mod` pin), a static binary run as nobody.
pub const KUBE_STATE_METRICS_IMAGE: &str = "kube-state-metrics";
pub const KUBE_STATE_METRICS_TAG: &str = "v2.16.0";

pub fn kube_state_metrics_image(fixture: &Path) -> Result<OciImage> {
    OciImage::new(
        KUBE_STATE_METRICS_IMAGE,
        KUBE_STATE_METRICS_TAG,
        &[file("kube-state-metrics", &fixture.join("bin/kube-state-metrics"))?],
        &["/kube-state-metrics"],
    )
}

/// Debian's `busybox-static` (one of the test packages) as `busybox:BUSYBOX_TAG`, entrypoint
/// `/bin/sh`. Refuses a host busybox of another version rather than mislabel it.
fn busybox_image() -> Result<OciImage> {
    let busybox = Path::new("/bin/busybox");
    let out = Command::new(busybox).output().with_context(|| {
        format!(
            "running {}: the helper test image takes the host's (apt-get install busybox-static)",
            busybox.display()
        )
    })?;
    let banner = String::from_utf8_lossy(&out.stdout);
    let banner = banner.lines().next().unwrap_or("");
    if !banner.starts_with(&format!("BusyBox v{BUSYBOX_TAG} ")) {
        bail!("{} is {banner:?}, not BusyBox v{BUSYBOX_TAG}: update BUSYBOX_TAG", busybox.display());
    }
    let mut entries = vec![file("bin/busybox", busybox)?];
    for applet in
        ["sh", "mkdir", "rm", "rmdir", "chmod", "ls", "cat", "echo", "test", "[", "touch", "sleep", "du", "df"]
    {
        entries.push(Entry::Link { path: format!("bin/{applet}"), target: "busybox".into() });
    }
    OciImage::new(BUSYBOX_IMAGE, BUSYBOX_TAG, &entries, &["/bin/sh"])
}

/// A static HTTP server (C, static glibc) answering every request on port 8080 with
/// `labforge-web-ok <hostname>`: the test workload. `/web get IP` is its client, for checks
/// from one pod to another.
pub fn web_image(work: &Path) -> Result<OciImage> {
    let src = work.join("web.c");
    fs::write(&src, WEB_C)?;
    let bin = work.join("web");
    let out =
        Command::new("gcc").args(["-static", "-Os", "-s", "-o"]).arg(&bin).arg(&src).output().context("running gcc")?;
    if !out.status.success() {
        bail!("gcc -static failed (apt-get install gcc libc6-dev): {}", String::from_utf8_lossy(&out.stderr));
    }
    OciImage::new("labforge-test/web", "1", &[file("web", &bin)?], &["/web"])
}

const WEB_C: &str = r#"#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
/* `web get IP`: fetch http://IP:8080/ and print the body (exit 0 on a 200), the client for
   pod-to-pod checks; otherwise serve `labforge-web-ok <hostname>` on 8080. */
static int get(const char *ip) {
  char buf[4096];
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons(8080);
  if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) { fprintf(stderr, "not an IPv4 address: %s\n", ip); return 2; }
  struct timeval tv = {20, 0};
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
  const char *req = "GET / HTTP/1.0\r\n\r\n";
  write(s, req, strlen(req));
  int n = 0, r;
  while (n < (int)sizeof buf - 1 && (r = read(s, buf + n, sizeof buf - 1 - n)) > 0) n += r;
  buf[n] = 0;
  char *body = strstr(buf, "\r\n\r\n");
  if (strncmp(buf, "HTTP/1.0 200", 12) || !body) { fprintf(stderr, "bad answer: %s\n", buf); return 1; }
  fputs(body + 4, stdout);
  return 0;
}
int main(int argc, char **argv) {
  if (argc == 3 && !strcmp(argv[1], "get")) return get(argv[2]);
  char host[256] = "", buf[4096], body[512], resp[1024];
  gethostname(host, sizeof host - 1);
  int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons(8080);
  if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) { perror("listen"); return 1; }
  printf("labforge-web listening on 8080 as %s\n", host);
  fflush(stdout);
  for (;;) {
    int c = accept(s, 0, 0);
    if (c < 0) continue;
    read(c, buf, sizeof buf);
    int n = snprintf(body, sizeof body, "labforge-web-ok %s\n", host);
    int m = snprintf(resp, sizeof resp, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", n, body);
    write(c, resp, m);
    close(c);
  }
}
"#;

/// Lays the fixture out as upstream's release download site under `dir`:
/// `release/<version>/bin/linux/amd64/{kubeadm,kubelet,kubectl}` each with a `.sha256` (the
/// bare digest, as dl.k8s.io serves it), and `cni/<cni-version>/cni-plugins-linux-amd64-
/// <cni-version>.tgz` with a `.sha256` (`<digest>  <file>`, as the plugins' release page does).
pub fn release_tree(fixture: &Path, dir: &Path) -> Result<()> {
    let bin_dir = dir.join(format!("release/{VERSION}/bin/linux/amd64"));
    fs::create_dir_all(&bin_dir)?;
    for name in ["kubeadm", "kubelet", "kubectl"] {
        let to = bin_dir.join(name);
        let _ = fs::remove_file(&to);
        fs::copy(fixture.join("bin").join(name), &to).with_context(|| format!("copying {name}"))?;
        fs::write(
            bin_dir.join(format!("{name}.sha256")),
            format!("{}\n", labforge::build::outputs::sha256_file(&to)?),
        )?;
    }
    let cni_dir = dir.join(format!("cni/{CNI_VERSION}"));
    fs::create_dir_all(&cni_dir)?;
    let tgz_name = format!("cni-plugins-linux-amd64-{CNI_VERSION}.tgz");
    let tgz = cni_dir.join(&tgz_name);
    let out = Command::new("tar")
        .args(["--sort=name", "--mtime=@1700000000", "--owner=0", "--group=0", "--numeric-owner"])
        .args(["--use-compress-program=gzip -n", "-cf"])
        .arg(&tgz)
        .arg("-C")
        .arg(fixture.join("cni"))
        .arg(".")
        .output()
        .context("running tar")?;
    if !out.status.success() {
        bail!("packing the CNI plugins: {}", String::from_utf8_lossy(&out.stderr));
    }
    fs::write(
        cni_dir.join(format!("{tgz_name}.sha256")),
        format!("{}  {tgz_name}\n", labforge::build::outputs::sha256_file(&tgz)?),
    )?;
    Ok(())
}

/// A static file server on 127.0.0.1 for a directory (GET and HEAD, no listings, no paths
/// outside it): the test's stand-in for a site's mirror of the release files.
pub struct FileServer {
    pub addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FileServer {
    pub fn start(dir: &Path, port: u16) -> Result<FileServer> {
        let listener = TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("binding 127.0.0.1:{port}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let (root, flag) = (dir.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let root = root.clone();
                        std::thread::spawn(move || {
                            let _ = serve_one(s, &root);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        Ok(FileServer { addr, stop, thread: Some(thread) })
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(s: TcpStream, root: &Path) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(s.try_clone()?.take(16 * 1024));
    let mut line = String::new();
    r.read_line(&mut line)?;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let mut w = s;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let rel = path.split('?').next().unwrap_or("").trim_start_matches('/');
    let safe = !rel.is_empty() && rel.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    let target = root.join(rel);
    if !(method == "GET" || method == "HEAD") || !safe || !target.is_file() {
        w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        return Ok(());
    }
    let mut f = fs::File::open(&target)?;
    let len = f.metadata()?.len();
    write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")?;
    if method == "GET" {
        std::io::copy(&mut f, &mut w)?;
    }
    Ok(())
}

/// The registry `qemu-tests/images/kube.toml` names as its `image-repository` host.
pub const REGISTRY_PORT: u16 = 35124;
/// The file server its `binaries-url` and `cni-url` name.
pub const RELEASE_PORT: u16 = 35125;
/// kubeadm's `imageRepository` in that spec.
pub const IMAGE_REPOSITORY: &str = "127.0.0.1:35124/k8s";
/// The preloaded test workload.
pub const WEB_IMAGE: &str = "127.0.0.1:35124/labforge-test/web:1";
/// The stack's storage images as kube.toml points `[stack.images]` at them.
pub const PROVISIONER_REF: &str = "127.0.0.1:35124/labforge-test/local-path-provisioner:v0.0.30";
pub const BUSYBOX_REF: &str = "127.0.0.1:35124/labforge-test/busybox:1.35.0";

/// The real-Kubernetes test image and how to log in to its nodes.
pub struct KubeImage {
    pub image: crate::images::TestImage,
    /// The private key of the image's `lab` user (a sudoer: the agent gives it the admin
    /// kubeconfig on the master).
    pub ssh_key: PathBuf,
}

/// A key pair made once per machine under `target/qemu-tests/keys/` (so the image that carries
/// its public half is built once too).
fn ssh_key() -> Result<PathBuf> {
    let dir = crate::workspace_root().join("target/qemu-tests/keys");
    fs::create_dir_all(&dir)?;
    let key = dir.join("lab_ed25519");
    if !key.exists() {
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "labforge-test", "-f"])
            .arg(&key)
            .output()
            .context("running ssh-keygen (apt-get install openssh-client)")?;
        if !out.status.success() {
            bail!("ssh-keygen failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(key)
}

/// Builds (or reuses) `qemu-tests/images/kube.toml` with the fixture: the release files served
/// on 127.0.0.1:35125 and the images in a registry on 127.0.0.1:35124 while the builder runs.
pub fn test_image() -> Result<KubeImage> {
    kube_test_image("kube", Vec::new())
}

/// Builds (or reuses) `qemu-tests/images/notebooks.toml` (kube.toml with the notebooks' stack),
/// with the notebook images (see [`crate::notebook_images`]) in the registry too.
pub fn notebooks_test_image() -> Result<KubeImage> {
    kube_test_image("notebooks", crate::notebook_images::notebook_images()?)
}

/// `qemu-tests/images/<stem>.toml` (kube.toml or one extending it) plus the test's login,
/// built with the fixture's files and images, and `extra` images pushed under `labforge-test/`.
fn kube_test_image(stem: &str, extra: Vec<OciImage>) -> Result<KubeImage> {
    let fixture = fixture("kubernetes-fixture")?;
    let key = ssh_key()?;
    let public = fs::read_to_string(key.with_extension("pub"))?;
    let root = crate::workspace_root();
    let spec_dir = root.join("target/qemu-tests/specs");
    fs::create_dir_all(&spec_dir)?;
    let spec = spec_dir.join(format!("{stem}.toml"));
    let text = format!(
        "# Generated by qemu-tests/src/kubernetes.rs: {stem}.toml plus the test's login.\nextends = {:?}\n\n[[users]]\nname = \"lab\"\nssh-authorized-keys = [{:?}]\nsudo = true\n",
        root.join(format!("qemu-tests/images/{stem}.toml")).display().to_string(),
        public.trim()
    );
    if fs::read_to_string(&spec).ok().as_deref() != Some(text.as_str()) {
        fs::write(&spec, &text)?;
    }
    let work = tempfile::tempdir()?;
    release_tree(&fixture, work.path())?;
    let _files = FileServer::start(work.path(), RELEASE_PORT)?;
    let reg = crate::registry::Registry::start_on(REGISTRY_PORT)
        .with_context(|| format!("kube.toml expects a test registry on 127.0.0.1:{REGISTRY_PORT}"))?;
    let base = format!("http://{}", reg.addr);
    for img in control_plane_images(&fixture)? {
        img.push(&base, "k8s")?;
    }
    web_image(work.path())?.push(&base, "")?;
    let monitoring = monitoring_images(work.path())?.into_iter().chain([kube_state_metrics_image(&fixture)?]);
    for img in storage_images(&fixture)?.into_iter().chain(monitoring) {
        img.push(&base, "labforge-test")?;
    }
    for img in extra {
        img.push(&base, "")?;
    }
    let image = crate::images::image_relocked(&spec.display().to_string(), Default::default())?;
    Ok(KubeImage { image, ssh_key: key })
}

/// A node on a test LAN, reached as a lab administrator would: SSH as the image's sudo user
/// `lab` (whose home holds the admin kubeconfig on the master), the agent's status over the
/// LAN, and plain HTTP.
pub struct Remote {
    pub lan: crate::lan::Lan,
    pub key: PathBuf,
    /// The node's LAN address (empty until known).
    pub addr: String,
}

impl Remote {
    pub fn new(lan: crate::lan::Lan, key: &Path) -> Remote {
        Remote { lan, key: key.to_path_buf(), addr: String::new() }
    }

    /// Runs `cmd` on the node over SSH from inside the LAN's namespace, with `stdin`.
    pub fn ssh(&self, cmd: &str, stdin: &str) -> Result<std::process::Output> {
        self.ssh_at(&self.addr, cmd, stdin)
    }

    /// [`Remote::ssh`] on the node at `addr`.
    pub fn ssh_at(&self, addr: &str, cmd: &str, stdin: &str) -> Result<std::process::Output> {
        use std::process::Stdio;
        let mut child = self
            .lan
            .command("ssh")
            .arg("-i")
            .arg(&self.key)
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
            .args(["-o", "ConnectTimeout=30", "-o", "LogLevel=ERROR"])
            .arg(format!("lab@{addr}"))
            .arg(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ssh (apt-get install openssh-client)")?;
        child.stdin.take().expect("piped").write_all(stdin.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    /// [`Remote::ssh`], failing with the command's stderr unless it succeeds; its stdout.
    pub fn run(&self, cmd: &str, stdin: &str) -> Result<String> {
        self.run_at(&self.addr, cmd, stdin)
    }

    /// [`Remote::run`] on the node at `addr`.
    pub fn run_at(&self, addr: &str, cmd: &str, stdin: &str) -> Result<String> {
        let out = self.ssh_at(addr, cmd, stdin)?;
        if !out.status.success() {
            bail!(
                "`{cmd}` on {addr} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The agent's status, asked over the LAN as any client would.
    pub fn status(&self) -> Result<labforge_agent::status::Status> {
        self.status_at(&self.addr)
    }

    /// [`Remote::status`] of the node at `addr`.
    pub fn status_at(&self, addr: &str) -> Result<labforge_agent::status::Status> {
        let bin = crate::workspace_root().join("target/release/labforge-agent");
        let out = self
            .lan
            .command(bin.to_str().context("utf-8 path")?)
            .args(["status", "--json", "--addr", &format!("{addr}:9743")])
            .output()?;
        if !out.status.success() {
            bail!("status query failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Polls the status over the LAN until `pred` holds.
    pub fn wait_api(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&labforge_agent::status::Status) -> bool,
    ) -> Result<labforge_agent::status::Status> {
        self.wait_api_at(&self.addr, what, within, pred)
    }

    /// [`Remote::wait_api`] on the node at `addr`.
    pub fn wait_api_at(
        &self,
        addr: &str,
        what: &str,
        within: Duration,
        pred: impl Fn(&labforge_agent::status::Status) -> bool,
    ) -> Result<labforge_agent::status::Status> {
        crate::poll(what, within, Duration::from_secs(10), || match self.status_at(addr) {
            Ok(s) if pred(&s) => Ok(s),
            Ok(s) => Err(format!(
                "kube_api {} stack {}",
                serde_json::to_string(&s.kube_api).unwrap_or_default(),
                serde_json::to_string(&s.stack).unwrap_or_default()
            )),
            Err(e) => Err(format!("{e:#}")),
        })
    }

    /// GETs `http://<node>:<port>/` from the LAN until it answers; the body.
    pub fn http_get(&self, port: u16, within: Duration) -> Result<String> {
        self.http_get_at(&self.addr, port, within)
    }

    /// [`Remote::http_get`] from the node at `addr`.
    pub fn http_get_at(&self, addr: &str, port: u16, within: Duration) -> Result<String> {
        self.http_get_path_at(addr, port, "/", within)
    }

    /// [`Remote::http_get_at`] of `path` (a 2xx answer with a body).
    pub fn http_get_path_at(&self, addr: &str, port: u16, path: &str, within: Duration) -> Result<String> {
        let url = format!("http://{addr}:{port}{path}");
        crate::poll(&format!("an answer from {url}"), within, Duration::from_secs(5), || {
            let out = self
                .lan
                .command("curl")
                .args(["-s", "-f", "--max-time", "10", &url])
                .output()
                .map_err(|e| format!("running curl: {e}"))?;
            let body = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && !body.is_empty() {
                Ok(body)
            } else {
                Err(format!("curl {}", out.status))
            }
        })
    }
}

/// The upstream version of Debian bookworm's `prometheus` package: the tag of the image
/// [`monitoring_images`] builds from it.
pub const PROMETHEUS_TAG: &str = "2.42.0";
/// The upstream version of Debian bookworm's `prometheus-node-exporter` package: the tag of
/// the image [`monitoring_images`] builds from it.
pub const NODE_EXPORTER_TAG: &str = "1.5.0";

/// The monitoring images, from Debian's own packages (fetched with `apt-get download` into
/// `work` and unpacked with `dpkg-deb -x`; nothing is installed on the host):
///
/// - `prometheus:PROMETHEUS_TAG`, entrypoint `/bin/prometheus`, with the shared objects it
///   loads (glibc), the host's CA bundle at `/etc/ssl/certs/ca-certificates.crt`, an empty
///   `/prometheus` (mode 0777) for `--storage.tsdb.path=/prometheus`, and an `/etc/passwd`
///   with `nobody`. No web UI assets: the HTTP API (`/api/v1/...`) and `/-/ready` work
///   without them (`/` redirects to `/classic/graph`, which answers 500). Debian builds it
///   without `kubernetes_sd_configs` (its NEWS.Debian: "Kubernetes support has been
///   completely removed"): discover targets with `dns_sd_configs` on a headless Service,
///   `static_configs` or `file_sd_configs`.
/// - `node-exporter:NODE_EXPORTER_TAG`, entrypoint `/bin/node_exporter`, with the shared
///   objects it loads. Debian's build enables the systemd collector and reads text files from
///   `/var/lib/prometheus/node-exporter`; in a pod, `--no-collector.systemd
///   --no-collector.textfile` keep its log quiet.
///
/// Refuses a package of another upstream version than the tag rather than mislabel it.
pub fn monitoring_images(work: &Path) -> Result<Vec<OciImage>> {
    let debs = work.join("monitoring-debs");
    fs::create_dir_all(&debs)?;
    apt_download(&debs, &["prometheus", "prometheus-node-exporter"])?;
    let prometheus = debian_package(&debs, "prometheus", PROMETHEUS_TAG, "PROMETHEUS_TAG")?;
    let node_exporter = debian_package(&debs, "prometheus-node-exporter", NODE_EXPORTER_TAG, "NODE_EXPORTER_TAG")?;

    let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
    let ca_data =
        fs::read(ca).with_context(|| format!("reading {} (apt-get install ca-certificates)", ca.display()))?;
    let mut entries = vec![Entry::Dir { path: "prometheus/".into(), mode: 0o777 }];
    entries.extend(binary_entries("bin/prometheus", &prometheus.join("usr/bin/prometheus"))?);
    entries.push(Entry::File { path: "etc/ssl/certs/ca-certificates.crt".into(), data: ca_data, mode: 0o644 });
    entries.push(Entry::File { path: "etc/passwd".into(), data: MONITORING_PASSWD.into(), mode: 0o644 });
    entries.push(Entry::File { path: "etc/group".into(), data: MONITORING_GROUP.into(), mode: 0o644 });
    let prometheus_image = OciImage::new("prometheus", PROMETHEUS_TAG, &entries, &["/bin/prometheus"])?;

    let entries = binary_entries("bin/node_exporter", &node_exporter.join("usr/bin/prometheus-node-exporter"))?;
    let node_exporter_image = OciImage::new("node-exporter", NODE_EXPORTER_TAG, &entries, &["/bin/node_exporter"])?;
    Ok(vec![prometheus_image, node_exporter_image])
}

const MONITORING_PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const MONITORING_GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// `apt-get download <packages>` in `dir`, after one `apt-get update` if the first try fails
/// (stale package lists name versions the mirror no longer has).
fn apt_download(dir: &Path, packages: &[&str]) -> Result<()> {
    let download = || Command::new("apt-get").arg("download").args(packages).current_dir(dir).output();
    let mut out = download().context("running apt-get download")?;
    if !out.status.success() {
        let update = Command::new("apt-get").args(["update", "-qq"]).output().context("running apt-get update")?;
        if !update.status.success() {
            bail!(
                "apt-get download {} failed ({}), and so did apt-get update: {}",
                packages.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&update.stderr).trim()
            );
        }
        out = download().context("running apt-get download")?;
    }
    if !out.status.success() {
        bail!("apt-get download {} failed: {}", packages.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Checks that the `<name>_*.deb` in `dir` has the upstream version `tag` (the Debian version
/// without epoch, revision and `+ds`-style suffix) and unpacks it to `dir/<name>`; that
/// directory. `constant` names the tag in errors.
fn debian_package(dir: &Path, name: &str, tag: &str, constant: &str) -> Result<PathBuf> {
    let prefix = format!("{name}_");
    let deb = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with(&prefix) && n.ends_with(".deb")
        })
        .with_context(|| format!("apt-get download left no {prefix}*.deb in {}", dir.display()))?;
    let out = Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version").output().context("running dpkg-deb")?;
    if !out.status.success() {
        bail!("dpkg-deb -f {}: {}", deb.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let upstream = version.split_once(':').map_or(version.as_str(), |(_, v)| v);
    let upstream = upstream.rsplit_once('-').map_or(upstream, |(u, _)| u);
    let upstream = upstream.split(['+', '~']).next().unwrap_or(upstream);
    if upstream != tag {
        bail!("Debian's {name} is version {version} (upstream {upstream}), not {tag}: update {constant}");
    }
    let root = dir.join(name);
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    let out = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root).output().context("running dpkg-deb")?;
    if !out.status.success() {
        bail!("dpkg-deb -x {}: {}", deb.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(root)
}

/// `binary` at `path` in an image, with the host's copies of the shared objects `ldd` says it
/// loads (none for a static one) under their merged-/usr names and the `/lib`, `/lib64` links.
fn binary_entries(path: &str, binary: &Path) -> Result<Vec<Entry>> {
    let mut entries = vec![file(path, binary)?];
    let libs = ldd(binary)?;
    if !libs.is_empty() {
        let mut files = HostFiles::default();
        for lib in &libs {
            files.add(lib)?;
        }
        for d in ["lib", "lib64"] {
            entries.push(Entry::Link { path: d.into(), target: format!("usr/{d}") });
        }
        entries.extend(files.links);
        entries.extend(files.files.into_values());
    }
    Ok(entries)
}

/// `out` (kubectl's output), unless the API server warned in it.
pub fn no_warnings(out: String) -> Result<String> {
    if let Some(w) = out.lines().find(|l| l.starts_with("Warning:")) {
        bail!("the API server warned: {w}\n{out}");
    }
    Ok(out)
}

/// Rook's version whose release files the `rook-ceph` component pins.
pub const ROOK_VERSION: &str = "v1.18.8";

/// Rook's `deploy/examples` folder as its Go module ships it (`go mod download`, verified by
/// the Go checksum database; the same bytes its release URLs serve): the test's mirror of the
/// `rook-ceph` component's upstream files.
pub fn rook_examples() -> Result<PathBuf> {
    let go = if Path::new("/usr/local/go/bin/go").is_file() { "/usr/local/go/bin/go" } else { "go" };
    let out = Command::new(go)
        .args(["mod", "download", "-json", &format!("github.com/rook/rook@{ROOK_VERSION}")])
        .env("GOFLAGS", "-mod=mod")
        .output()
        .context("running go mod download (is Go installed?)")?;
    if !out.status.success() {
        bail!(
            "go mod download github.com/rook/rook@{ROOK_VERSION} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).context("go mod download -json")?;
    let dir = info["Dir"].as_str().context("go mod download named no Dir")?;
    Ok(Path::new(dir).join("deploy/examples"))
}

#[cfg(test)]
mod tests {
    /// `build.sh` builds what these constants name (the fixture's directory, the images'
    /// tags): one changed without the other would build one version and look for another.
    #[test]
    fn build_sh_pins_the_versions_this_module_names() {
        let script = std::fs::read_to_string(crate::workspace_root().join("qemu-tests/fixtures/kubernetes/build.sh"))
            .expect("reading build.sh");
        let pin = |name: &str| {
            script
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("build.sh sets no {name}"))
                .trim()
                .to_string()
        };
        assert_eq!(pin("K8S_VERSION"), super::VERSION);
        assert_eq!(pin("CNI_PLUGINS_VERSION"), super::CNI_VERSION);
        assert_eq!(format!("{}-0", pin("ETCD_VERSION").trim_start_matches('v')), super::ETCD_TAG);
        assert_eq!(pin("COREDNS_VERSION"), super::COREDNS_TAG);
        assert_eq!(pin("LOCAL_PATH_PROVISIONER_VERSION"), super::LOCAL_PATH_PROVISIONER_TAG);
        assert_eq!(pin("KUBE_STATE_METRICS_VERSION"), super::KUBE_STATE_METRICS_TAG);
    }
}
