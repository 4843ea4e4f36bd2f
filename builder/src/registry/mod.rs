//! Pulling container images for preload: OCI distribution (Docker Registry v2) over HTTPS or
//! plain HTTP, anonymous or bearer-token auth (answered from `WWW-Authenticate`), basic
//! credentials from `~/.docker/config.json`. The protocol is `oci-client`'s; this module adds
//! platform resolution, the lock file, the content-addressed blob cache, bounded parallel
//! downloads with retries, and errors that name the image and the layer.

pub mod cache;
pub mod lock;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::manifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

pub use cache::{BlobCache, BlobError};

/// Default number of blobs downloaded at once.
pub const DEFAULT_PARALLEL: usize = 8;
/// Attempts per download (transient failures only: connection errors, 5xx, truncation).
const ATTEMPTS: u32 = 5;

const MANIFEST_TYPES: &[&str] = &[
    manifest::OCI_IMAGE_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_MEDIA_TYPE,
    manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Parses an image reference as the spec writes it.
pub fn parse_reference(s: &str) -> Result<Reference> {
    let r: Reference = s.parse().map_err(|e| {
        anyhow!("{s:?} is not an image reference ({e}); write registry/namespace/name:tag or name@sha256:<digest>")
    })?;
    if let Some(d) = r.digest() {
        cache::hex_of(d)?;
    }
    Ok(r)
}

/// Whether `registry` (`host[:port]`) is on this machine: `localhost`, `127.0.0.0/8` or `[::1]`.
/// Such registries are spoken to over plain HTTP without `--plain-http`, as docker and
/// go-containerregistry treat them (a local mirror rarely has a certificate).
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.rsplit_once(':').map(|(h, _)| h).unwrap_or(registry),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `opts` with every loopback registry among `refs` added to the plain-HTTP list.
pub fn with_loopback_plain<'a>(opts: &RegistryOptions, refs: impl IntoIterator<Item = &'a str>) -> RegistryOptions {
    let mut opts = opts.clone();
    for r in refs {
        if let Ok(r) = parse_reference(r) {
            let host = r.registry().to_string();
            if is_loopback(&host) && !opts.plain_http.contains(&host) {
                opts.plain_http.push(host);
            }
        }
    }
    opts
}

/// The name containerd gives an image: `registry/repository:tag`, or `…@digest` without a tag.
pub fn containerd_name(r: &Reference) -> String {
    match (r.tag(), r.digest()) {
        (Some(t), _) => format!("{}/{}:{t}", r.registry(), r.repository()),
        (None, Some(d)) => format!("{}/{}@{d}", r.registry(), r.repository()),
        (None, None) => format!("{}/{}:latest", r.registry(), r.repository()),
    }
}

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Registries (`host:port`) spoken to over plain HTTP.
    pub plain_http: Vec<String>,
    /// Extra CA certificates (PEM) to trust for HTTPS registries.
    pub ca_files: Vec<PathBuf>,
    /// Blobs downloaded at once.
    pub parallel: usize,
}

/// One preloaded image, fully in the blob cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledImage {
    /// The reference as the spec writes it.
    #[serde(rename = "ref")]
    pub reference: String,
    /// The name containerd will know it by.
    pub name: String,
    /// The linux/amd64 image manifest.
    pub digest: String,
    pub media_type: String,
    pub manifest_size: u64,
    /// Config and layers: (digest, size).
    pub blobs: Vec<(String, u64)>,
    /// Manifest, config and layers together.
    pub size_bytes: u64,
}

/// Bytes moved over the network by a pull (0 when everything came from the cache).
#[derive(Debug, Default)]
pub struct Transfer {
    pub bytes: std::sync::atomic::AtomicU64,
}

pub struct Registry {
    client: Client,
    cache: BlobCache,
    slots: Arc<Semaphore>,
    rt: tokio::runtime::Runtime,
    pub transfer: Arc<Transfer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(Deserialize, Clone)]
struct RawPlatform {
    architecture: String,
    os: String,
}

impl Registry {
    pub fn new(opts: &RegistryOptions, cache_dir: &std::path::Path) -> Result<Registry> {
        // reqwest's rustls needs a process-wide crypto provider; a second install is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut extra = Vec::new();
        for f in &opts.ca_files {
            let data = std::fs::read(f).with_context(|| format!("reading CA file {}", f.display()))?;
            if !String::from_utf8_lossy(&data).contains("-----BEGIN CERTIFICATE-----") {
                bail!("CA file {} holds no PEM certificate", f.display());
            }
            extra.push(Certificate { encoding: CertificateEncoding::Pem, data });
        }
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(opts.plain_http.clone()),
            extra_root_certificates: extra,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the download runtime")?;
        Ok(Registry {
            client: Client::new(config),
            cache: BlobCache::open(cache_dir)?,
            slots: Arc::new(Semaphore::new(opts.parallel.max(1))),
            rt,
            transfer: Default::default(),
        })
    }

    pub fn cache(&self) -> &BlobCache {
        &self.cache
    }

    /// Pins every reference to its linux/amd64 manifest digest: from `locked` when given (and
    /// then from the cache when the manifest is there: no network), else from the registry.
    pub fn resolve_all(&self, refs: &[(String, Option<String>)]) -> Result<Vec<String>> {
        self.rt.block_on(async {
            let jobs = refs.iter().map(|(r, locked)| self.resolve(r, locked.as_deref()));
            futures_util::future::join_all(jobs).await.into_iter().collect()
        })
    }

    /// Makes sure manifest, config and layers of every pinned image are in the cache.
    pub fn fetch_all(&self, pinned: &[(String, String)]) -> Result<Vec<PulledImage>> {
        self.rt.block_on(async {
            let jobs = pinned.iter().map(|(r, d)| self.fetch(r, d));
            futures_util::future::join_all(jobs).await.into_iter().collect()
        })
    }

    async fn auth_for(&self, r: &Reference) -> RegistryAuth {
        let server = r.resolve_registry().to_string();
        let cred = tokio::task::spawn_blocking(move || docker_credential::get_credential(&server)).await;
        match cred {
            Ok(Ok(docker_credential::DockerCredential::UsernamePassword(u, p))) => RegistryAuth::Basic(u, p),
            Ok(Ok(docker_credential::DockerCredential::IdentityToken(t))) => RegistryAuth::Bearer(t),
            _ => RegistryAuth::Anonymous,
        }
    }

    async fn resolve(&self, spec_ref: &str, locked: Option<&str>) -> Result<String> {
        let r = parse_reference(spec_ref)?;
        let pinned = locked.or(r.digest());
        if let Some(d) = pinned {
            if self.cache.contains(d) {
                let m: RawManifest = serde_json::from_slice(&self.cache.read(d)?)?;
                if m.manifests.is_none() {
                    return Ok(d.to_string());
                }
            }
        }
        let target = match pinned {
            Some(d) => Reference::with_digest(r.registry().into(), r.repository().into(), d.into()),
            None => r.clone(),
        };
        let (bytes, digest) = self.pull_manifest(spec_ref, &target, pinned).await?;
        let m: RawManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("preload {spec_ref}: the registry's manifest is not JSON"))?;
        let Some(list) = m.manifests else {
            self.cache.put(&digest, &bytes)?;
            return Ok(digest);
        };
        let offered: Vec<String> =
            list.iter().filter_map(|d| d.platform.as_ref()).map(|p| format!("{}/{}", p.os, p.architecture)).collect();
        let Some(amd64) =
            list.iter().find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
        else {
            bail!(
                "preload {spec_ref}: no linux/amd64 image in this multi-platform index (it offers {}); lab PCs need amd64",
                if offered.is_empty() { "no platforms".to_string() } else { offered.join(", ") }
            );
        };
        let target = Reference::with_digest(r.registry().into(), r.repository().into(), amd64.digest.clone());
        let (bytes, digest) = self.pull_manifest(spec_ref, &target, Some(&amd64.digest)).await?;
        let inner: RawManifest = serde_json::from_slice(&bytes)?;
        if inner.manifests.is_some() {
            bail!("preload {spec_ref}: the linux/amd64 entry of its index is another index; labforge expects an image manifest");
        }
        self.cache.put(&digest, &bytes)?;
        Ok(digest)
    }

    /// Fetches a manifest and checks it against its digest.
    async fn pull_manifest(&self, spec_ref: &str, target: &Reference, want: Option<&str>) -> Result<(Vec<u8>, String)> {
        let auth = self.auth_for(target).await;
        let mut attempt = 0;
        let (bytes, header_digest) = loop {
            attempt += 1;
            match self.client.pull_manifest_raw(target, &auth, MANIFEST_TYPES).await {
                Ok(v) => break v,
                Err(e) if attempt < ATTEMPTS && transient_oci(&e) => {
                    tracing::warn!("preload {spec_ref}: {e}; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(explain(spec_ref, target, "manifest", e)),
            }
        };
        self.transfer.bytes.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if let Some(w) = want {
            if actual != w {
                bail!("preload {spec_ref}: the registry sent a manifest with digest {actual} for {w}; refusing it (a registry serving altered content?)");
            }
        } else if !header_digest.is_empty() && header_digest != actual {
            bail!("preload {spec_ref}: the manifest's bytes hash to {actual}, but the registry says {header_digest}; refusing it");
        }
        Ok((bytes.to_vec(), actual))
    }

    async fn fetch(&self, spec_ref: &str, digest: &str) -> Result<PulledImage> {
        let r = parse_reference(spec_ref)?;
        let target = Reference::with_digest(r.registry().into(), r.repository().into(), digest.into());
        let bytes = if self.cache.contains(digest) {
            self.cache.read(digest)?
        } else {
            let (bytes, d) = self.pull_manifest(spec_ref, &target, Some(digest)).await?;
            self.cache.put(&d, &bytes)?;
            bytes
        };
        let m: RawManifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("preload {spec_ref}: manifest {digest} is not JSON"))?;
        let config =
            m.config.clone().with_context(|| format!("preload {spec_ref}: manifest {digest} has no config"))?;
        let mut blobs = vec![config];
        blobs.extend(m.layers.iter().cloned());
        if blobs.iter().any(|b| b.size < 0) {
            bail!("preload {spec_ref}: manifest {digest} lists a negative size");
        }
        // Blob requests authenticate on demand (a bearer registry's token included), also when
        // the manifest came from the cache and no request fetched a token yet.
        if blobs.iter().any(|b| !self.cache.contains(&b.digest)) {
            let auth = self.auth_for(&target).await;
            self.client.store_auth_if_needed(target.resolve_registry(), &auth).await;
        }
        let jobs = blobs.iter().enumerate().map(|(i, b)| {
            let what = if i == 0 { "config".to_string() } else { format!("layer {i}/{}", blobs.len() - 1) };
            let target = &target;
            async move { self.download(spec_ref, target, b, &what).await }
        });
        for res in futures_util::future::join_all(jobs).await {
            res?;
        }
        let media_type = m.media_type.clone().unwrap_or_else(|| manifest::OCI_IMAGE_MEDIA_TYPE.to_string());
        let list: Vec<(String, u64)> = blobs.iter().map(|b| (b.digest.clone(), b.size as u64)).collect();
        let size_bytes = bytes.len() as u64 + list.iter().map(|(_, s)| s).sum::<u64>();
        Ok(PulledImage {
            reference: spec_ref.to_string(),
            name: containerd_name(&r),
            digest: digest.to_string(),
            media_type,
            manifest_size: bytes.len() as u64,
            blobs: list,
            size_bytes,
        })
    }

    async fn download(&self, spec_ref: &str, target: &Reference, blob: &RawDescriptor, what: &str) -> Result<()> {
        if self.cache.contains(&blob.digest) {
            return Ok(());
        }
        let _slot = self.slots.acquire().await.expect("semaphore open");
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_download(target, blob).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < ATTEMPTS && transient(&e) => {
                    tracing::warn!("preload {spec_ref}: {what} {}: {e:#}; retrying", blob.digest);
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => {
                    let tries = if transient(&e) { format!(" (after {attempt} attempts)") } else { String::new() };
                    return Err(e.context(format!(
                        "preload {spec_ref}: {what} {}{tries}; nothing was cached for it",
                        blob.digest
                    )));
                }
            }
        }
    }

    async fn try_download(&self, target: &Reference, blob: &RawDescriptor) -> Result<()> {
        let desc = manifest::OciDescriptor {
            media_type: blob.media_type.clone(),
            digest: blob.digest.clone(),
            size: blob.size,
            ..Default::default()
        };
        let mut stream = self.client.pull_blob_stream(target, &desc).await.map_err(anyhow::Error::new)?;
        let mut w = self.cache.writer(&blob.digest, Some(blob.size as u64))?;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // The client checks the digest itself at the end of the stream; our own check
                // below says whether the bytes were short or different.
                Err(e) if e.get_ref().is_some_and(|i| i.downcast_ref::<DigestError>().is_some()) => break,
                Err(e) => return Err(anyhow::Error::new(e).context("the download broke off")),
            };
            self.transfer.bytes.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            w.write(&chunk)?;
        }
        w.finish()
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250 << attempt.min(5))
}

fn transient_oci(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(_) => true,
        OciDistributionError::ServerError { code, .. } => *code >= 500,
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

/// Worth another attempt: connection trouble, 5xx, a download that broke off.
fn transient(e: &anyhow::Error) -> bool {
    if let Some(b) = e.downcast_ref::<BlobError>() {
        return matches!(b, BlobError::Truncated { .. });
    }
    if let Some(o) = e.downcast_ref::<OciDistributionError>() {
        return transient_oci(o);
    }
    // io errors while streaming, and the timeouts behind them.
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() != std::io::ErrorKind::StorageFull))
        && !e.chain().any(|c| c.to_string().contains("writing the blob cache"))
}

/// One message naming the image, what was asked for, and what to do.
fn explain(spec_ref: &str, target: &Reference, what: &str, e: OciDistributionError) -> anyhow::Error {
    let registry = target.resolve_registry();
    let hint = match &e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            format!("the registry refused access (401); add credentials for {registry} to ~/.docker/config.json (e.g. `docker login {registry}`)")
        }
        OciDistributionError::ImageManifestNotFoundError(_) => format!("no such image on {registry} (404); check the name and tag"),
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                matches!(x.code, oci_client::errors::OciErrorCode::ManifestUnknown | oci_client::errors::OciErrorCode::NameUnknown | oci_client::errors::OciErrorCode::NotFound)
            }) =>
        {
            format!("no such image on {registry} (404); check the name and tag")
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| matches!(x.code, oci_client::errors::OciErrorCode::Unauthorized | oci_client::errors::OciErrorCode::Denied)) =>
        {
            format!("the registry refused access (401); add credentials for {registry} to ~/.docker/config.json (e.g. `docker login {registry}`)")
        }
        OciDistributionError::ServerError { code: 404, .. } => format!("no such image on {registry} (404); check the name and tag"),
        OciDistributionError::ServerError { code: 401 | 403, .. } => {
            format!("the registry refused access; add credentials for {registry} to ~/.docker/config.json (e.g. `docker login {registry}`)")
        }
        OciDistributionError::RequestError(_) => format!(
            "cannot reach {registry}; check the address, that the registry runs, and `--plain-http {registry}` for a registry without TLS or `--ca-file` for a private CA"
        ),
        _ => String::new(),
    };
    let e = anyhow::Error::new(e);
    if hint.is_empty() {
        e.context(format!("preload {spec_ref}: fetching the {what}"))
    } else {
        e.context(format!("preload {spec_ref}: {hint}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_on_this_machine_are_plain_http() {
        for r in ["localhost:5000", "127.0.0.1:5000", "127.9.9.9", "[::1]:5000", "LOCALHOST"] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["registry.k8s.io", "10.0.0.5:5000", "localhost.example.org:5000", "[2001:db8::1]:5000"] {
            assert!(!is_loopback(r), "{r}");
        }
        let opts = RegistryOptions { plain_http: vec!["mirror.lab:5000".into()], ca_files: vec![], parallel: 1 };
        let got = with_loopback_plain(
            &opts,
            ["127.0.0.1:5000/t/a:1", "registry.k8s.io/pause:3.10.2", "127.0.0.1:5000/t/b:1", "not a ref"],
        );
        assert_eq!(got.plain_http, ["mirror.lab:5000", "127.0.0.1:5000"]);
    }
}
