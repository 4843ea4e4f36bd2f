//! A real OCI registry for tests (Debian's `docker-registry`, on 127.0.0.1 with its own storage),
//! test images pushed to it over the plain distribution API, and a fault-injecting front (a
//! small HTTP proxy on 127.0.0.1) that can alter, truncate or refuse what the registry serves,
//! or demand a bearer token from its own token endpoint.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `docker-registry` serving plain HTTP on 127.0.0.1.
pub struct Registry {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Result<Registry> {
        Self::start_on(free_port()?)
    }

    pub fn start_on(port: u16) -> Result<Registry> {
        Self::start_with(port, None)
    }

    /// With `tls = Some((cert, key))` the registry speaks HTTPS only.
    pub fn start_with(port: u16, tls: Option<(&Path, &Path)>) -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let addr = format!("127.0.0.1:{port}");
        let tls_conf = tls
            .map(|(c, k)| format!("  tls:\n    certificate: {}\n    key: {}\n", c.display(), k.display()))
            .unwrap_or_default();
        let conf = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{tls_conf}",
            dir.path().join("data").display()
        );
        let conf_path = dir.path().join("config.yml");
        fs::write(&conf_path, conf)?;
        let log = fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&conf_path)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("starting docker-registry (apt-get install docker-registry)")?;
        let reg = Registry { child, addr, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&reg.addr).is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry did not listen on {} within 20 s", reg.addr);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(reg)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pushes blobs and manifests with the distribution API (monolithic uploads).
pub struct Pusher {
    base: String,
}

impl Pusher {
    /// `base` is `http://host:port` or `https://…`; an agent with a private CA may be given.
    pub fn new(base: &str) -> Pusher {
        Pusher { base: base.trim_end_matches('/').to_string() }
    }

    pub fn blob(&self, repo: &str, data: &[u8]) -> Result<String> {
        let d = digest(data);
        let resp =
            ureq::post(&format!("{}/v2/{repo}/blobs/uploads/", self.base)).call().context("starting a blob upload")?;
        let loc = resp.header("Location").context("upload without Location")?.to_string();
        let loc = if loc.starts_with("http") { loc } else { format!("{}{loc}", self.base) };
        let sep = if loc.contains('?') { '&' } else { '?' };
        ureq::put(&format!("{loc}{sep}digest={d}"))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(data)
            .context("uploading a blob")?;
        Ok(d)
    }

    pub fn manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> Result<String> {
        ureq::put(&format!("{}/v2/{repo}/manifests/{reference}", self.base))
            .set("Content-Type", media_type)
            .send_bytes(body)
            .with_context(|| format!("pushing manifest {repo}:{reference}"))?;
        Ok(digest(body))
    }

    /// A single-layer linux image whose layer holds `files` (path, bytes, mode) and whose
    /// entrypoint is `entrypoint`. Deterministic: the same files give the same digests.
    /// Returns (manifest digest, manifest size, layer digest).
    pub fn image(
        &self,
        repo: &str,
        tag: &str,
        arch: &str,
        files: &[(&str, &[u8], u32)],
        entrypoint: &[&str],
    ) -> Result<(String, usize, String)> {
        let layer = tar_layer(files)?;
        let layer_digest = self.blob(repo, &layer)?;
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": { "Entrypoint": entrypoint },
            "rootfs": { "type": "layers", "diff_ids": [digest(&layer)] },
        }))?;
        let config_digest = self.blob(repo, &config)?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len() },
            "layers": [{ "mediaType": OCI_LAYER, "digest": layer_digest, "size": layer.len() }],
        }))?;
        let d = self.manifest(repo, tag, OCI_MANIFEST, &manifest)?;
        Ok((d, manifest.len(), layer_digest))
    }

    /// An amd64 image with one layer per file (for sizeable, many-layer test images).
    pub fn image_layers(
        &self,
        repo: &str,
        tag: &str,
        files: &[(&str, &[u8], u32)],
        entrypoint: &[&str],
    ) -> Result<String> {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for f in files {
            let layer = tar_layer(std::slice::from_ref(f))?;
            diff_ids.push(digest(&layer));
            let d = self.blob(repo, &layer)?;
            layers.push(serde_json::json!({ "mediaType": OCI_LAYER, "digest": d, "size": layer.len() }));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": { "Entrypoint": entrypoint },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))?;
        let config_digest = self.blob(repo, &config)?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len() },
            "layers": layers,
        }))?;
        self.manifest(repo, tag, OCI_MANIFEST, &manifest)
    }

    /// An index over `entries` (digest, size, arch).
    pub fn index(&self, repo: &str, tag: &str, entries: &[(String, usize, &str)]) -> Result<String> {
        let manifests: Vec<_> = entries
            .iter()
            .map(|(d, s, arch)| serde_json::json!({ "mediaType": OCI_MANIFEST, "digest": d, "size": s, "platform": { "os": "linux", "architecture": arch } }))
            .collect();
        let body = serde_json::to_vec(
            &serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests }),
        )?;
        self.manifest(repo, tag, OCI_INDEX, &body)
    }
}

/// An uncompressed tar layer with fixed times and owners.
pub fn tar_layer(files: &[(&str, &[u8], u32)]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        b.append_data(&mut h, path, *data)?;
    }
    Ok(b.into_inner()?)
}

/// A static x86_64 program that prints `message` and its arguments: compiled here with gcc
/// (static glibc), so the image needs nothing else.
pub fn static_hello(dir: &Path, message: &str) -> Result<Vec<u8>> {
    let src = dir.join("hello.c");
    fs::write(
        &src,
        format!("#include <stdio.h>\nint main(int c, char **v) {{ printf(\"{message}\"); for (int i = 1; i < c; i++) printf(\" %s\", v[i]); printf(\"\\n\"); return 0; }}\n"),
    )?;
    let bin = dir.join("hello");
    let out =
        Command::new("gcc").args(["-static", "-Os", "-s", "-o"]).arg(&bin).arg(&src).output().context("running gcc")?;
    if !out.status.success() {
        bail!("gcc -static failed (apt-get install gcc libc6-dev): {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(fs::read(bin)?)
}

/// What the fault proxy does to requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Flip a byte in every blob it serves.
    AlterBlobs,
    /// Serve only the first half of every blob (with a matching Content-Length).
    TruncateBlobs,
    /// Answer this many blob requests with 500, then pass.
    FailBlobs(u32),
    /// Demand `Authorization: Bearer` tokens, handed out by `/token` to `user:password` only.
    RequireToken { user: String, password: String },
}

/// A fault-injecting HTTP proxy in front of a registry, on 127.0.0.1.
pub struct FaultProxy {
    pub addr: String,
    pub fault: Arc<Mutex<Fault>>,
    /// Blob requests seen.
    pub blob_requests: Arc<AtomicU32>,
}

const TOKEN: &str = "labforge-test-token";

impl FaultProxy {
    pub fn start(upstream: &str, fault: Fault) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let fault = Arc::new(Mutex::new(fault));
        let blob_requests = Arc::new(AtomicU32::new(0));
        let (f, n, up, me) = (fault.clone(), blob_requests.clone(), upstream.to_string(), addr.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (f, n, up, me) = (f.clone(), n.clone(), up.clone(), me.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &up, &me, &f, &n);
                });
            }
        });
        Ok(FaultProxy { addr, fault, blob_requests })
    }

    pub fn set(&self, f: Fault) {
        *self.fault.lock().unwrap() = f;
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

fn read_request(r: &mut impl std::io::BufRead) -> Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok(Some(Request { method, path, headers }))
}

fn respond(w: &mut impl Write, status: u16, headers: &[(String, String)], body: &[u8]) -> Result<()> {
    write!(w, "HTTP/1.1 {status} X\r\n")?;
    for (k, v) in headers {
        write!(w, "{k}: {v}\r\n")?;
    }
    write!(w, "Content-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
    w.write_all(body)?;
    w.flush()?;
    Ok(())
}

/// One request per connection (`Connection: close`); GET and HEAD only (pushes go straight to
/// the registry).
fn serve(conn: TcpStream, upstream: &str, me: &str, fault: &Mutex<Fault>, blobs: &AtomicU32) -> Result<()> {
    let mut reader = std::io::BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let Some(req) = read_request(&mut reader)? else { return Ok(()) };
    let f = fault.lock().unwrap().clone();
    let header = |k: &str| req.headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if let Fault::RequireToken { user, password } = &f {
        if req.path.starts_with("/token") {
            let want = format!("Basic {}", base64_encode(format!("{user}:{password}").as_bytes()));
            if header("authorization").as_deref() != Some(want.as_str()) {
                return respond(
                    &mut w,
                    401,
                    &[],
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
                );
            }
            let body =
                serde_json::to_vec(&serde_json::json!({ "token": TOKEN, "access_token": TOKEN, "expires_in": 300 }))?;
            return respond(&mut w, 200, &[("Content-Type".into(), "application/json".into())], &body);
        }
        if header("authorization").as_deref() != Some(&format!("Bearer {TOKEN}")) {
            let challenge =
                format!("Bearer realm=\"http://{me}/token\",service=\"labforge-test\",scope=\"repository:x:pull\"");
            return respond(
                &mut w,
                401,
                &[("WWW-Authenticate".into(), challenge), ("Content-Type".into(), "application/json".into())],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            );
        }
    }
    let is_blob = req.path.contains("/blobs/sha256:");
    if is_blob {
        let seen = blobs.fetch_add(1, Ordering::SeqCst);
        if let Fault::FailBlobs(k) = f {
            if seen < k {
                return respond(&mut w, 500, &[], b"internal error (injected)");
            }
        }
    }
    let mut up = ureq::request(&req.method, &format!("http://{upstream}{}", req.path));
    for (k, v) in &req.headers {
        if k == "accept" {
            up = up.set(k, v);
        }
    }
    let resp = match up.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return respond(&mut w, 502, &[], e.to_string().as_bytes()),
    };
    let status = resp.status();
    let mut headers = Vec::new();
    for k in ["content-type", "docker-content-digest", "www-authenticate"] {
        if let Some(v) = resp.header(k) {
            headers.push((k.to_string(), v.to_string()));
        }
    }
    let mut body = Vec::new();
    resp.into_reader().read_to_end(&mut body)?;
    if is_blob && status == 200 && req.method == "GET" {
        match f {
            Fault::AlterBlobs if !body.is_empty() => {
                let i = body.len() / 2;
                body[i] ^= 0xff;
            }
            Fault::TruncateBlobs => body.truncate(body.len() / 2),
            _ => {}
        }
    }
    if req.method == "HEAD" {
        write!(w, "HTTP/1.1 {status} X\r\n")?;
        for (k, v) in &headers {
            write!(w, "{k}: {v}\r\n")?;
        }
        write!(w, "Content-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
        return Ok(w.flush()?);
    }
    respond(&mut w, status, &headers, &body)
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Every file under `<cache>/blobs/sha256` holds exactly the bytes its name says.
pub fn assert_cache_sound(cache_dir: &Path) -> Result<usize> {
    let dir = cache_dir.join("blobs/sha256");
    let mut n = 0;
    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let actual = hex::encode(Sha256::digest(fs::read(e.path())?));
        if actual != name {
            bail!("corrupt cache entry {}: holds sha256 {actual}", e.path().display());
        }
        n += 1;
    }
    let tmp: Vec<PathBuf> =
        fs::read_dir(cache_dir.join("blobs/tmp")).into_iter().flatten().flatten().map(|e| e.path()).collect();
    if !tmp.is_empty() {
        bail!("partial downloads left behind: {tmp:?}");
    }
    Ok(n)
}
