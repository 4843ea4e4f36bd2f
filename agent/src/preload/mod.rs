//! First-boot import of the preloaded container images into containerd (namespace `k8s.io`,
//! where the kubelet looks). The builder leaves one OCI image layout in the image; each image
//! is streamed to `ctr images import` as its own small OCI archive, checked afterwards, and
//! skipped when containerd already holds that digest under that name (so a reboot imports
//! nothing). A failed import is retried with a growing pause and stays in the status until it
//! succeeds. The result of the last round is saved as `preload.json` in the state directory.
//!
//! A netbooted node runs from a squashfs in memory that carries the layout's index but not its
//! blobs (they would sit in memory twice: in the squashfs and in containerd). Its [`Source`]
//! fetches each blob from the master that served the squashfs, over HTTP, and checks every
//! byte against the blob's sha256 digest on the way into containerd.

pub mod task;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::sys::Cmd;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where the builder puts the OCI image layout (root filesystem, read by every node).
pub const LAYOUT_DIR: &str = labforge_core::layout::PRELOAD_LAYOUT_DIR;
/// containerd namespace of the kubelet's images.
pub const NAMESPACE: &str = "k8s.io";
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// File in the state directory with the last round's result.
pub const RESULT_FILE: &str = "preload.json";
/// File in the state directory naming the image being imported until its unpacked layers are
/// on disk: after a power cut, containerd may list an image as complete whose files were
/// still in the page cache (found empty on the next boot).
pub const PENDING_FILE: &str = "preload-pending.json";
/// containerd's root: its content store and unpacked snapshots.
pub const CONTAINERD_ROOT: &str = "/var/lib/containerd";
/// Under the netboot base URL: `<base>/preload/blobs/sha256/<hex>` (served by the master).
pub const REMOTE_DIR: &str = "preload";
/// Manifests and configs are read whole; anything larger than this is not one.
const SMALL_BLOB_MAX: u64 = 4 << 20;

/// Where an import reads the blobs: the layout in the image, and for a netbooted node the
/// layout served over HTTP next to the squashfs it booted (blobs missing locally come from
/// there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub layout: PathBuf,
    /// `http://host:port/path/preload`: the served layout.
    pub remote: Option<String>,
}

impl Source {
    pub fn local(layout: &Path) -> Self {
        Source { layout: layout.to_path_buf(), remote: None }
    }

    /// The source for a node booted with `cmdline`: a netboot (`boot=live fetch=URL`) reads
    /// the blobs from `preload/` beside the squashfs at URL.
    pub fn for_boot(layout: &Path, cmdline: &str) -> Self {
        let remote = crate::pxe::base_url(cmdline).map(|base| format!("{base}/{REMOTE_DIR}"));
        Source { layout: layout.to_path_buf(), remote }
    }

    fn local_blob(&self, hex: &str) -> PathBuf {
        self.layout.join("blobs/sha256").join(hex)
    }

    fn url(&self, hex: &str) -> Option<String> {
        self.remote.as_ref().map(|r| format!("{r}/blobs/sha256/{hex}"))
    }

    /// Opens blob `hex` over HTTP; returns the body and its length if the server sent one.
    fn fetch(&self, hex: &str) -> Result<Box<dyn Read + Send + Sync>> {
        let url = self.url(hex).with_context(|| {
            format!("blob sha256:{hex} is missing from {} and no netboot server is known", self.layout.display())
        })?;
        Ok(crate::sys::http::Client::default().get(&url)?.reader)
    }

    /// A small blob (manifest, config) whole, checked against its digest.
    fn read_small(&self, hex: &str) -> Result<Vec<u8>> {
        let local = self.local_blob(hex);
        let (data, from) = match fs::read(&local) {
            Ok(d) => (d, local.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.remote.is_some() => {
                let mut d = Vec::new();
                self.fetch(hex)?
                    .take(SMALL_BLOB_MAX + 1)
                    .read_to_end(&mut d)
                    .with_context(|| format!("reading sha256:{hex} from {}", self.remote.as_deref().unwrap_or("")))?;
                (d, self.url(hex).unwrap_or_default())
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", local.display())),
        };
        let got = hex::encode(Sha256::digest(&data));
        if got != hex {
            bail!(
                "{from} does not match its digest (sha256 {got}, expected {hex}); it is damaged or not what was built"
            );
        }
        Ok(data)
    }
}

/// Passes bytes through while hashing and counting them.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Import progress, reported in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreloadStatus {
    pub state: PreloadState,
    pub total: usize,
    /// Imported during this boot.
    pub imported: usize,
    /// Already in containerd with the same digest.
    pub present: usize,
    pub failed: Vec<ImportFailure>,
    /// Rounds run so far this boot.
    pub rounds: u32,
    /// Where blobs missing from the image's layout come from (a netbooted node's master).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Blobs fetched from `source` this boot (each checked against its digest).
    #[serde(default)]
    pub fetched: u64,
    /// How many of the layout's first images kubeadm needs (see [`kubeadm_needs`]).
    #[serde(default)]
    pub kubeadm_images: usize,
    /// This round went past them (each in, or failed: kubeadm then names it): `kubeadm init`
    /// may start while the rest are imported.
    #[serde(default)]
    pub kubeadm_ready: bool,
}

crate::wire_enum! {
    /// Where the import of the preloaded images stands.
    pub enum PreloadState {
        /// The image carries no images.
        None = "none",
        /// containerd is not up yet.
        Waiting = "waiting",
        Importing = "importing",
        Done = "done",
        /// Some imports failed (see `failed`); tried again with a growing pause.
        Retrying = "retrying",
        /// The layout itself cannot be read.
        Failed = "failed",
    }
}

impl Default for PreloadStatus {
    fn default() -> Self {
        PreloadStatus {
            state: PreloadState::None,
            total: 0,
            imported: 0,
            present: 0,
            failed: Vec::new(),
            rounds: 0,
            source: None,
            fetched: 0,
            kubeadm_images: 0,
            kubeadm_ready: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportFailure {
    pub name: String,
    pub error: String,
}

/// One image of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub digest: String,
    media_type: String,
    size: u64,
    /// Needed before kubeadm runs (the builder marks the sandbox image and kubeadm's list).
    pub cluster: bool,
}

/// How many of the layout's first entries kubeadm needs: up to the last one marked, or all of
/// them when none is (a layout from a builder that did not mark them, or without kubeadm's
/// list: kubeadm would pull whatever is missing, and a lab has no registry).
pub fn kubeadm_needs(entries: &[Entry]) -> usize {
    entries.iter().rposition(|e| e.cluster).map_or(entries.len(), |i| i + 1)
}

/// The layout's images in import order (the builder puts the sandbox image first).
pub fn read_layout(dir: &Path) -> Result<Vec<Entry>> {
    let path = dir.join("index.json");
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let index: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let mut out = Vec::new();
    for m in index["manifests"].as_array().cloned().unwrap_or_default() {
        let name = m["annotations"]["io.containerd.image.name"].as_str().context("a preloaded image without a name")?;
        out.push(Entry {
            name: name.to_string(),
            digest: m["digest"].as_str().context("a preloaded image without a digest")?.to_string(),
            media_type: m["mediaType"].as_str().unwrap_or("application/vnd.oci.image.manifest.v1+json").to_string(),
            size: m["size"].as_u64().unwrap_or(0),
            cluster: m["annotations"][labforge_core::layout::PRELOAD_CLUSTER_ANNOTATION].as_str() == Some("true"),
        });
    }
    Ok(out)
}

/// Name → digest of the images containerd holds complete (every blob present) and unpacked,
/// from `ctr images check` output. An image whose record exists but whose content or
/// snapshots are missing (an import cut short) does not count.
pub fn parse_image_check(out: &str) -> HashMap<String, String> {
    out.lines()
        .filter(|l| !l.starts_with("REF "))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (name, digest, status, unpacked) = (f.first()?, f.get(2)?, f.get(3)?, f.last()?);
            (digest.starts_with("sha256:") && *status == "complete" && *unpacked == "true")
                .then(|| (name.to_string(), digest.to_string()))
        })
        .collect()
}

/// How long `ctr images import` may go without taking a byte of the archive before it is
/// taken as hung (containerd stuck, a disk that stopped answering) and stopped: the image is
/// then a failure of this round, tried again in the next, and kubeadm and the stack are never
/// held back for good by one import. Under emulation a healthy import takes several MB/s.
pub const IMPORT_STALL: Duration = Duration::from_secs(10 * 60);
/// How long `ctr` may take after the whole archive is in (unpacking its layers) before it is
/// stopped the same way: a 700 MiB image unpacks in a few minutes on an emulated CPU.
pub const IMPORT_UNPACK: Duration = Duration::from_secs(30 * 60);

/// Talks to containerd through its `ctr` client.
pub struct Containerd {
    pub address: PathBuf,
    pub namespace: String,
    /// The client program (`ctr`, found on PATH).
    pub ctr: PathBuf,
    /// See [`IMPORT_STALL`] and [`IMPORT_UNPACK`].
    pub stall: Duration,
    pub unpack: Duration,
}

impl Default for Containerd {
    fn default() -> Self {
        Containerd::new(PathBuf::from(CONTAINERD_SOCKET), NAMESPACE.to_string())
    }
}

impl Containerd {
    pub fn new(address: PathBuf, namespace: String) -> Self {
        Containerd { address, namespace, ctr: PathBuf::from("ctr"), stall: IMPORT_STALL, unpack: IMPORT_UNPACK }
    }

    fn ctr(&self) -> Cmd {
        Cmd::new(self.ctr.to_string_lossy()).arg("--address").arg(&self.address).arg("--namespace").arg(&self.namespace)
    }

    pub fn ready(&self) -> bool {
        self.address.exists() && self.ctr().arg("version").timeout(Duration::from_secs(30)).run().is_ok()
    }

    /// Images that are complete and unpacked, by name.
    /// Removes image `name` and, once nothing else uses them, its blobs and unpacked layers.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.ctr().args(["images", "rm", "--sync", name]).timeout(Duration::from_secs(300)).run()?;
        Ok(())
    }

    pub fn images(&self) -> Result<HashMap<String, String>> {
        let out = self.ctr().args(["images", "check"]).timeout(Duration::from_secs(300)).run()?;
        Ok(parse_image_check(&out))
    }

    /// Streams `entry` (and only it) as an OCI archive into `ctr images import`; returns how
    /// many of its blobs came from the source's server.
    ///
    /// A watchdog stops `ctr` when it takes no byte for [`Containerd::stall`], or is still
    /// unpacking [`Containerd::unpack`] after the archive is in; the error says which.
    pub fn import(&self, source: &Source, entry: &Entry) -> Result<u64> {
        let mut child = self
            .ctr()
            .args(["images", "import", "-"])
            .streaming()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ctr images import")?;
        let stdin = child.stdin.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        // Its stderr is drained as it comes (a full pipe would stall ctr); the tail is kept.
        let errors = std::thread::spawn(move || {
            let mut tail = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 16 * 1024 {
                    tail.drain(..tail.len() - 16 * 1024);
                }
            }
            String::from_utf8_lossy(&tail).trim().to_string()
        });
        let watch = Watchdog::start(child, self.stall, self.unpack);
        let written = write_archive(source, entry, Counted { inner: stdin, watch: &watch });
        let (status, stopped) = watch.finish();
        let stderr = errors.join().unwrap_or_default();
        if let Some(why) = stopped {
            bail!("ctr images import {why}: stopped it (tried again in the next round)");
        }
        let failed = !status?.success();
        let fetched = match written {
            Ok(n) => n,
            // ctr gave up first (its stderr says why), and the archive's writer found the pipe
            // closed: ctr's words are the cause.
            Err(e) if failed && broken_pipe(&e) => bail!("ctr images import: {stderr}"),
            // A blob that failed its digest is the cause even when ctr saw the stream cut short.
            Err(e) => return Err(e),
        };
        if failed {
            bail!("ctr images import: {stderr}");
        }
        Ok(fetched)
    }
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// The import's `ctr`, watched from a thread of its own: progress is the bytes it took.
struct Watchdog {
    child: std::sync::Arc<std::sync::Mutex<std::process::Child>>,
    shared: std::sync::Arc<(std::sync::Mutex<Watch>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Watch {
    /// Bytes ctr took so far.
    taken: u64,
    /// When the whole archive was in.
    written: Option<std::time::Instant>,
    /// The import ended (or was stopped): the thread leaves.
    done: bool,
    /// Why the watchdog stopped ctr.
    stopped: Option<String>,
}

impl Watchdog {
    fn start(child: std::process::Child, stall: Duration, unpack: Duration) -> Self {
        use std::sync::{Arc, Condvar, Mutex};
        use std::time::Instant;
        let child = Arc::new(Mutex::new(child));
        let shared = Arc::new((Mutex::new(Watch::default()), Condvar::new()));
        let (c, sh) = (child.clone(), shared.clone());
        let thread = std::thread::spawn(move || {
            let (lock, cvar) = &*sh;
            let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (mut seen, mut since) = (w.taken, Instant::now());
            loop {
                if w.done {
                    return;
                }
                let why = match w.written {
                    Some(at) if at.elapsed() >= unpack => {
                        Some(format!("was still unpacking {} s after the whole image was in", unpack.as_secs()))
                    }
                    None if since.elapsed() >= stall => {
                        Some(format!("took no byte for {} s (after {} bytes)", stall.as_secs(), w.taken))
                    }
                    _ => None,
                };
                if let Some(why) = why {
                    // Only a ctr still running is stopped: one that finished just now (its
                    // exit not yet seen by `finish`) did its work. std never signals a child
                    // it has reaped, so this cannot reach a process with a recycled pid.
                    let mut child = c.lock().unwrap_or_else(|e| e.into_inner());
                    if matches!(child.try_wait(), Ok(None)) {
                        let _ = child.kill();
                        w.stopped = Some(why);
                    }
                    return;
                }
                let wait = (stall / 10).clamp(Duration::from_millis(50), Duration::from_secs(5));
                w = cvar.wait_timeout(w, wait).unwrap_or_else(|e| e.into_inner()).0;
                if w.taken != seen {
                    (seen, since) = (w.taken, Instant::now());
                }
            }
        });
        Watchdog { child, shared, thread: Some(thread) }
    }

    fn took(&self, n: usize) {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner()).taken += n as u64;
    }

    /// Waits for ctr to exit (the archive's writer is gone, so its stdin is closed); its exit
    /// status, and why the watchdog stopped it if it did.
    fn finish(mut self) -> (std::io::Result<std::process::ExitStatus>, Option<String>) {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner()).written = Some(std::time::Instant::now());
        self.shared.1.notify_all();
        let status = loop {
            // Polled, so the watchdog can take the child to stop it meanwhile.
            match self.child.lock().unwrap_or_else(|e| e.into_inner()).try_wait() {
                Ok(Some(s)) => break Ok(s),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let stopped = {
            let mut w = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
            w.done = true;
            w.stopped.take()
        };
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (status, stopped)
    }
}

/// The archive's way into ctr's stdin, counting what it takes for the watchdog.
struct Counted<'a, W: Write> {
    inner: W,
    watch: &'a Watchdog,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.watch.took(n);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// One image of the layout as an OCI archive (tar): oci-layout, an index with just this image,
/// and the blobs its manifest names. Blobs missing from the local layout are streamed from the
/// source's server; each is checked against its digest and size as it passes.
fn write_archive(source: &Source, entry: &Entry, out: impl Write) -> Result<u64> {
    let hex = |d: &str| {
        d.strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_string)
            .with_context(|| format!("{d} is not a sha256 digest"))
    };
    let mut fetched = 0;
    let mut counted = |h: &str| {
        if !source.local_blob(h).exists() {
            fetched += 1;
        }
    };
    counted(&hex(&entry.digest)?);
    let manifest_bytes = source.read_small(&hex(&entry.digest)?).context("reading the image manifest")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest_bytes).context("the image manifest is not JSON")?;
    let config = manifest["config"]["digest"].as_str().context("manifest without config")?.to_string();
    counted(&hex(&config)?);
    let config_bytes = source.read_small(&hex(&config)?).context("reading the image config")?;
    let mut layers = Vec::new();
    for l in manifest["layers"].as_array().cloned().unwrap_or_default() {
        let d = l["digest"].as_str().context("layer without digest")?;
        layers.push((hex(d)?, l["size"].as_u64().with_context(|| format!("layer {d} without size"))?));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": entry.media_type,
            "digest": entry.digest,
            "size": entry.size,
            "annotations": { "io.containerd.image.name": entry.name },
        }],
    });
    let mut tar = tar::Builder::new(out);
    // Blobs in the image are sparse where they hold zero blocks (mkfs.ext4 -d keeps holes);
    // containerd's importer skips GNU sparse entries, so every blob goes in as a plain file.
    tar.sparse(false);
    let header = |size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    };
    tar.append_data(&mut header(30), "oci-layout", &br#"{"imageLayoutVersion":"1.0.0"}"#[..])?;
    let index = serde_json::to_vec(&index)?;
    tar.append_data(&mut header(index.len() as u64), "index.json", &index[..])?;
    for (d, data) in [(&entry.digest, &manifest_bytes), (&config, &config_bytes)] {
        let h = hex(d)?;
        tar.append_data(&mut header(data.len() as u64), format!("blobs/sha256/{h}"), &data[..])?;
    }
    for (h, size) in layers {
        let name = format!("blobs/sha256/{h}");
        let path = source.local_blob(&h);
        if path.exists() {
            tar.append_path_with_name(&path, &name).with_context(|| format!("adding {}", path.display()))?;
            continue;
        }
        fetched += 1;
        let url = source.url(&h).unwrap_or_default();
        let mut body = Hashing { inner: source.fetch(&h)?.take(size), hash: Sha256::new(), bytes: 0 };
        tar.append_data(&mut header(size), &name, &mut body).with_context(|| format!("streaming {url}"))?;
        let got = hex::encode(body.hash.finalize());
        if body.bytes != size || got != h {
            bail!(
                "{url} does not match its digest ({} of {size} bytes, sha256 {got}); nothing of it is kept",
                body.bytes
            );
        }
    }
    tar.finish()?;
    Ok(fetched)
}

/// Every blob the `entries` need (manifest, config, layers), by hex digest with its size, each
/// once; manifests and configs are read (and checked) through `source`.
pub fn blobs(source: &Source, entries: &[Entry]) -> Result<Vec<(String, u64)>> {
    let mut out: Vec<(String, u64)> = Vec::new();
    let mut add = |d: &str, size: u64| -> Result<String> {
        let h = d
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64)
            .with_context(|| format!("{d} is not a sha256 digest"))?
            .to_string();
        if !out.iter().any(|(x, _)| *x == h) {
            out.push((h.clone(), size));
        }
        Ok(h)
    };
    for e in entries {
        let m = add(&e.digest, e.size)?;
        let manifest: serde_json::Value =
            serde_json::from_slice(&source.read_small(&m)?).context("the image manifest is not JSON")?;
        for d in std::iter::once(&manifest["config"]).chain(manifest["layers"].as_array().into_iter().flatten()) {
            add(d["digest"].as_str().context("a descriptor without digest")?, d["size"].as_u64().unwrap_or(0))?;
        }
    }
    Ok(out)
}

/// The image an import was started for, kept (durably) in the pending file until its layers
/// are on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub name: String,
    pub digest: String,
}

/// How a round makes its imports survive a power cut: the pending file (in the state
/// directory) and the filesystem to flush after each import (containerd's root). `None` for
/// a one-off import by hand.
pub struct Durability<'a> {
    pub pending: &'a Path,
    pub containerd_root: &'a Path,
}

impl Durability<'_> {
    fn start(&self, e: &Entry) -> Result<()> {
        let p = Pending { name: e.name.clone(), digest: e.digest.clone() };
        crate::sys::fs::write_durable(self.pending, &serde_json::to_vec(&p)?)
    }

    /// Flushes containerd's root (every filesystem when a site's containerd keeps its root
    /// elsewhere), then forgets the pending import.
    fn finish(&self) -> Result<()> {
        if self.containerd_root.exists() {
            crate::sys::fs::sync_filesystem(self.containerd_root)?;
        } else {
            nix::unistd::sync();
        }
        self.clear()
    }

    fn clear(&self) -> Result<()> {
        match fs::remove_file(self.pending) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("removing {}", self.pending.display())),
        }
        if let Some(dir) = self.pending.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The import a power cut interrupted, if any.
    fn interrupted(&self) -> Option<Pending> {
        serde_json::from_slice(&fs::read(self.pending).ok()?).ok()
    }
}

/// One round: imports what containerd lacks. Returns the status after the round.
///
/// With `durable`, an image counts as imported only once its unpacked layers are flushed to
/// disk, and an image whose import a power cut interrupted is removed and imported again even
/// if containerd lists it complete.
pub fn round(
    containerd: &Containerd,
    source: &Source,
    entries: &[Entry],
    mut status: PreloadStatus,
    durable: Option<&Durability>,
    progress: &mut dyn FnMut(&PreloadStatus),
) -> PreloadStatus {
    status.rounds += 1;
    status.total = entries.len();
    status.kubeadm_images = kubeadm_needs(entries);
    status.kubeadm_ready = status.kubeadm_images == 0;
    status.source = source.remote.clone();
    status.failed.clear();
    status.present = 0;
    let retry = |mut status: PreloadStatus, name: &str, e: anyhow::Error| {
        status.state = PreloadState::Retrying;
        status.failed = vec![ImportFailure { name: name.into(), error: format!("{e:#}") }];
        status
    };
    let mut have = match containerd.images() {
        Ok(h) => h,
        Err(e) => return retry(status, "*", e),
    };
    if let Some(cut) = durable.and_then(|d| d.interrupted()) {
        if have.get(&cut.name) == Some(&cut.digest) {
            tracing::warn!(image = %cut.name, "a power cut interrupted this image's import: containerd lists it, but its files may never have reached the disk; importing it again");
            if let Err(e) = containerd.remove(&cut.name) {
                return retry(status, &cut.name, e);
            }
            have.remove(&cut.name);
        }
        if let Err(e) = durable.expect("interrupted comes from durable").clear() {
            return retry(status, &cut.name, e);
        }
    }
    status.state = PreloadState::Importing;
    for (i, e) in entries.iter().enumerate() {
        // Every image kubeadm needs went through (in, or failed: kubeadm then names it).
        status.kubeadm_ready |= i >= status.kubeadm_images;
        if have.get(&e.name) == Some(&e.digest) {
            status.present += 1;
            continue;
        }
        progress(&status);
        let res =
            durable.map_or(Ok(()), |d| d.start(e)).and_then(|()| containerd.import(source, e)).and_then(|fetched| {
                status.fetched += fetched;
                let after = containerd.images()?;
                match after.get(&e.name) {
                    Some(d) if *d == e.digest => {}
                    Some(d) => {
                        bail!("containerd holds {} with digest {d} after the import, expected {}", e.name, e.digest)
                    }
                    None => bail!("containerd does not hold {} complete and unpacked after the import", e.name),
                }
                durable.map_or(Ok(()), |d| d.finish())
            });
        match res {
            Ok(()) => {
                tracing::info!(image = %e.name, digest = %e.digest, "imported");
                status.imported += 1;
            }
            Err(err) => {
                tracing::error!(image = %e.name, "import failed: {err:#}");
                status.failed.push(ImportFailure { name: e.name.clone(), error: format!("{err:#}") });
            }
        }
    }
    status.kubeadm_ready = true;
    status.state = if status.failed.is_empty() { PreloadState::Done } else { PreloadState::Retrying };
    status
}

/// Saves the round's result in the state directory (atomically).
pub fn save_result(state_dir: &Path, status: &PreloadStatus) -> Result<()> {
    crate::sys::fs::write_durable(&state_dir.join(RESULT_FILE), &serde_json::to_vec_pretty(status)?)
}

/// `/var/lib/labforge/preload` → the layout, for operators who look for it there.
pub fn link_layout(state_dir: &Path) {
    let link = state_dir.join("preload");
    if fs::symlink_metadata(&link).is_err() {
        let _ = std::os::unix::fs::symlink(LAYOUT_DIR, &link);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_unpacked_images_count() {
        let out = "REF                                   TYPE                                       DIGEST       STATUS         SIZE                UNPACKED\n\
                   127.0.0.1:5000/t/hello:1              application/vnd.oci.image.manifest.v1+json sha256:aaaa complete (2/2) 668.7 KiB/668.7 KiB true\n\
                   127.0.0.1:5000/t/cut:1                application/vnd.oci.image.manifest.v1+json sha256:cccc incomplete (1/2) 1.0 KiB/668.7 KiB false\n\
                   127.0.0.1:5000/t/packed:1             application/vnd.oci.image.manifest.v1+json sha256:dddd complete (2/2) 668.7 KiB/668.7 KiB false\n";
        let m = parse_image_check(out);
        assert_eq!(m.get("127.0.0.1:5000/t/hello:1").map(String::as_str), Some("sha256:aaaa"));
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(parse_image_check("REF TYPE DIGEST STATUS SIZE UNPACKED\n").is_empty());
    }

    /// An image of no layout in particular: `r/app:1`.
    fn app_entry() -> Entry {
        Entry { name: "r/app:1".into(), digest: "sha256:01".into(), media_type: "m".into(), size: 1, cluster: false }
    }

    #[test]
    fn an_import_stays_pending_until_flushed() {
        let d = tempfile::tempdir().unwrap();
        let pending = d.path().join(PENDING_FILE);
        let durable = Durability { pending: &pending, containerd_root: d.path() };
        assert_eq!(durable.interrupted(), None, "nothing pending on a fresh node");
        let e = app_entry();
        durable.start(&e).unwrap();
        // A power cut here: the next boot finds the import it must not trust.
        assert_eq!(durable.interrupted(), Some(Pending { name: "r/app:1".into(), digest: "sha256:01".into() }));
        durable.finish().unwrap();
        assert_eq!(durable.interrupted(), None, "flushed and forgotten");
        durable.clear().unwrap();
        std::fs::write(&pending, "not json").unwrap();
        assert_eq!(durable.interrupted(), None, "a torn marker names nothing");
    }

    #[test]
    fn an_unreachable_containerd_is_reported_and_retried_not_skipped() {
        let c = Containerd::new(PathBuf::from("/nonexistent/containerd.sock"), NAMESPACE.into());
        assert!(!c.ready());
        let e = app_entry();
        let s = round(&c, &Source::local(Path::new("/nonexistent")), &[e], PreloadStatus::default(), None, &mut |_| {});
        assert_eq!(s.state, PreloadState::Retrying);
        assert_eq!((s.total, s.imported, s.present, s.rounds), (1, 0, 0, 1));
        assert_eq!(s.failed.len(), 1, "{s:?}");
        assert!(s.failed[0].error.contains("ctr"), "{s:?}");
    }

    /// A `ctr` stand-in: a script that does `body` (with the image's archive on its stdin).
    fn fake_ctr(dir: &Path, body: &str) -> Containerd {
        use std::os::unix::fs::PermissionsExt;
        let ctr = dir.join("ctr");
        fs::write(&ctr, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&ctr, fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = Containerd::new(dir.join("containerd.sock"), NAMESPACE.into());
        c.ctr = ctr;
        // Generous: each test sets the limit it means to hit.
        (c.stall, c.unpack) = (Duration::from_secs(60), Duration::from_secs(60));
        c
    }

    /// `c.import`, tried again if the script just written was still open for writing in a
    /// process another test forked meanwhile ("Text file busy", rust-lang/rust#114554).
    fn import(c: &Containerd, source: &Source, e: &Entry) -> Result<u64> {
        for _ in 0..20 {
            match c.import(source, e) {
                Err(err) if format!("{err:#}").contains("Text file busy") => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                done => return done,
            }
        }
        c.import(source, e)
    }

    #[test]
    fn a_hung_import_is_stopped_not_waited_for() {
        let d = tempfile::tempdir().unwrap();
        let (e, _) = layout_with_one_image(d.path());
        let source = Source::local(d.path());
        // Takes nothing: the archive (over 1 MiB) fills the pipe and the writer waits.
        let mut c = fake_ctr(d.path(), "exec sleep 60");
        c.stall = Duration::from_millis(500);
        let t = std::time::Instant::now();
        let err = format!("{:#}", import(&c, &source, &e).unwrap_err());
        assert!(err.contains("took no byte for 0 s"), "{err}");
        assert!(err.contains("tried again in the next round"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(20), "stopped, not waited for: {:?}", t.elapsed());
        // Takes everything, then never finishes unpacking.
        let mut c = fake_ctr(d.path(), "cat >/dev/null; exec sleep 60");
        c.unpack = Duration::from_millis(500);
        let t = std::time::Instant::now();
        let err = format!("{:#}", import(&c, &source, &e).unwrap_err());
        assert!(err.contains("still unpacking"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    }

    #[test]
    fn an_import_that_keeps_going_is_not_stopped_and_its_failure_is_ctrs() {
        let d = tempfile::tempdir().unwrap();
        let (e, _) = layout_with_one_image(d.path());
        let source = Source::local(d.path());
        // Slow but moving: a chunk every 0.3 s for about 3 s, each pause under the stall limit,
        // all of them together well over it.
        let mut c = fake_ctr(
            d.path(),
            "i=0; while [ $i -lt 10 ]; do head -c 131072 >/dev/null; sleep 0.3; i=$((i+1)); done; cat >/dev/null",
        );
        c.stall = Duration::from_millis(1500);
        assert_eq!(import(&c, &source, &e).unwrap(), 0, "a slow import that moves finishes");
        // ctr's own failure is reported with its words.
        let c = fake_ctr(d.path(), "cat >/dev/null; echo 'ctr: content digest mismatch' >&2; exit 1");
        let err = format!("{:#}", import(&c, &source, &e).unwrap_err());
        assert!(err.contains("ctr images import: ctr: content digest mismatch"), "{err}");
        // ctr giving up before the archive is in: its words, not the writer's broken pipe.
        let c = fake_ctr(d.path(), "echo 'ctr: unexpected EOF reading the index' >&2; exit 1");
        let err = format!("{:#}", import(&c, &source, &e).unwrap_err());
        assert!(err.contains("ctr images import: ctr: unexpected EOF reading the index"), "{err}");
    }

    #[test]
    fn layout_is_read_in_order_and_missing_layout_is_empty() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_layout(d.path()).unwrap().is_empty());
        fs::write(
            d.path().join("index.json"),
            r#"{"schemaVersion":2,"manifests":[
                {"mediaType":"m","digest":"sha256:01","size":3,"annotations":{"io.containerd.image.name":"r/pause:3"}},
                {"mediaType":"m","digest":"sha256:02","size":4,"annotations":{"io.containerd.image.name":"r/app:1"}}]}"#,
        )
        .unwrap();
        let v = read_layout(d.path()).unwrap();
        assert_eq!(v.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["r/pause:3", "r/app:1"]);
        assert_eq!(kubeadm_needs(&v), 2, "nothing marked: kubeadm waits for every image");
    }

    #[test]
    fn kubeadm_needs_the_marked_images_at_the_front() {
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join("index.json"),
            r#"{"schemaVersion":2,"manifests":[
                {"mediaType":"m","digest":"sha256:01","size":3,"annotations":{"io.containerd.image.name":"r/pause:3","dev.labforge.preload.cluster":"true"}},
                {"mediaType":"m","digest":"sha256:02","size":3,"annotations":{"io.containerd.image.name":"r/etcd:3","dev.labforge.preload.cluster":"true"}},
                {"mediaType":"m","digest":"sha256:03","size":4,"annotations":{"io.containerd.image.name":"r/hub:1"}},
                {"mediaType":"m","digest":"sha256:04","size":4,"annotations":{"io.containerd.image.name":"r/lab:1","dev.labforge.preload.cluster":"false"}}]}"#,
        )
        .unwrap();
        let v = read_layout(d.path()).unwrap();
        assert_eq!(v.iter().map(|e| e.cluster).collect::<Vec<_>>(), [true, true, false, false]);
        assert_eq!(kubeadm_needs(&v), 2);
        // One marked late (a hand-made layout) holds kubeadm back until it is through.
        let mut late = v.clone();
        late[3].cluster = true;
        assert_eq!(kubeadm_needs(&late), 4);
        assert_eq!(kubeadm_needs(&[]), 0);
    }

    /// A layout with one image (config `{}`, one layer with a hole, as blobs in the image's
    /// ext4 are where they hold zero blocks) and a stray blob; returns its entry.
    fn layout_with_one_image(dir: &Path) -> (Entry, String) {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| {
            let h = hex::encode(Sha256::digest(data));
            fs::write(blobs.join(&h), data).unwrap();
            h
        };
        let mut layer = vec![0u8; 1 << 20];
        layer.extend_from_slice(b"layer");
        let l = put(&layer);
        // Punch the hole back in: the same bytes, stored sparse.
        let sparse = fs::File::create(blobs.join(&l)).unwrap();
        sparse.set_len(1 << 20).unwrap();
        drop(sparse);
        fs::OpenOptions::new().append(true).open(blobs.join(&l)).unwrap().write_all(b"layer").unwrap();
        let c = put(b"{}");
        let m = put(format!(
            r#"{{"config":{{"digest":"sha256:{c}","size":2}},"layers":[{{"digest":"sha256:{l}","size":{}}}]}}"#,
            layer.len()
        )
        .as_bytes());
        put(b"not this");
        (
            Entry {
                name: "r/app:1".into(),
                digest: format!("sha256:{m}"),
                media_type: "m".into(),
                size: 10,
                cluster: false,
            },
            l,
        )
    }

    fn archive_names(buf: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        for e in tar::Archive::new(buf).entries().unwrap() {
            let mut e = e.unwrap();
            assert_eq!(
                e.header().entry_type(),
                tar::EntryType::Regular,
                "plain files only: containerd skips sparse entries"
            );
            let name = e.path().unwrap().display().to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            if let Some(h) = name.strip_prefix("blobs/sha256/") {
                assert_eq!(hex::encode(Sha256::digest(&data)), h, "{name} holds what its name says");
            }
            names.push(name);
        }
        names.sort();
        names
    }

    #[test]
    fn archive_holds_one_image_and_its_blobs() {
        let d = tempfile::tempdir().unwrap();
        let (e, _) = layout_with_one_image(d.path());
        let mut buf = Vec::new();
        assert_eq!(write_archive(&Source::local(d.path()), &e, &mut buf).unwrap(), 0);
        let names = archive_names(&buf);
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(names.contains(&"oci-layout".to_string()) && names.contains(&"index.json".to_string()));
    }

    /// Serves `dir` (a layout) as the master does, under `/pxe/preload`; returns the squashfs
    /// URL a node netbooted from it has on its command line.
    fn serve_blobs(dir: PathBuf) -> String {
        format!("{}/pxe/x.squashfs", crate::testhttp::serve(dir, "/pxe/preload"))
    }

    #[test]
    fn a_netbooted_node_streams_missing_blobs_from_its_server_and_checks_them() {
        let served = tempfile::tempdir().unwrap();
        let (e, layer) = layout_with_one_image(served.path());
        let url = serve_blobs(served.path().to_path_buf());
        // The node's own layout: the index only, no blobs (as the squashfs carries it).
        let node = tempfile::tempdir().unwrap();
        let source = Source::for_boot(node.path(), &format!("initrd=initrd boot=live fetch={url} console=ttyS0"));
        assert_eq!(source.remote.as_deref(), Some(url.replace("/x.squashfs", "/preload").as_str()));
        let mut buf = Vec::new();
        assert_eq!(write_archive(&source, &e, &mut buf).unwrap(), 3, "manifest, config and layer came from the server");
        assert_eq!(archive_names(&buf).len(), 5);

        // A damaged layer on the server: the stream is refused, naming the blob.
        let p = served.path().join("blobs/sha256").join(&layer);
        let mut bytes = fs::read(&p).unwrap();
        bytes[7] ^= 1;
        fs::write(&p, &bytes).unwrap();
        let err = format!("{:#}", write_archive(&source, &e, &mut Vec::new()).unwrap_err());
        assert!(err.contains(&layer) && err.contains("does not match its digest"), "{err}");
        // A truncated one too.
        fs::write(&p, &bytes[..1000]).unwrap();
        let err = format!("{:#}", write_archive(&source, &e, &mut Vec::new()).unwrap_err());
        assert!(err.contains("1000 of"), "{err}");
        // A missing blob (and no server at all) is an error that says where it looked.
        let err = format!("{:#}", write_archive(&Source::local(node.path()), &e, &mut Vec::new()).unwrap_err());
        assert!(err.contains("reading") && err.contains(&node.path().display().to_string()), "{err}");
    }

    #[test]
    fn the_blobs_an_image_needs_are_listed_once_each() {
        let d = tempfile::tempdir().unwrap();
        let (e, layer) = layout_with_one_image(d.path());
        let twice = [e.clone(), Entry { name: "r/app:latest".into(), ..e.clone() }];
        let b = blobs(&Source::local(d.path()), &twice).unwrap();
        assert_eq!(b.len(), 3, "manifest, config, layer: {b:?}");
        assert_eq!(b[0].0, e.digest.trim_start_matches("sha256:"));
        assert!(b.contains(&(layer, (1 << 20) + 5)), "{b:?}");
    }

    #[test]
    fn only_a_netboot_has_a_remote_source() {
        assert_eq!(Source::for_boot(Path::new("/l"), "root=PARTUUID=x ro").remote, None);
        assert_eq!(
            Source::for_boot(Path::new("/l"), "boot=live fetch=http://10.0.0.1:9743/pxe/demo.squashfs")
                .remote
                .as_deref(),
            Some("http://10.0.0.1:9743/pxe/preload")
        );
    }
}
