//! A stranger's laptop on the test LAN: a process in the LAN's namespace that is not a labforge
//! node and holds no secret. It downloads everything a master serves without authentication
//! and looks for secrets in it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The laptop: it runs `curl` inside namespace `ns` and keeps what it gets in `dir`.
pub struct Laptop {
    pub ns: String,
    pub dir: PathBuf,
}

impl Laptop {
    pub fn new(ns: &str, dir: &Path) -> Result<Laptop> {
        std::fs::create_dir_all(dir)?;
        Ok(Laptop { ns: ns.into(), dir: dir.to_path_buf() })
    }

    fn curl(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, "curl", "-sS", "--max-time", "120"]);
        c
    }

    /// GETs `url` into a file named `name`; returns the file and the HTTP status.
    pub fn get(&self, url: &str, name: &str) -> Result<(PathBuf, u16)> {
        let to = self.dir.join(name);
        let out = self.curl().arg("-o").arg(&to).args(["-w", "%{http_code}", url]).output()?;
        if !out.status.success() {
            bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let code = String::from_utf8_lossy(&out.stdout).trim().parse().context("curl's status code")?;
        Ok((to, code))
    }

    /// POSTs a JSON body to `url`; returns the HTTP status and the answer.
    pub fn post(&self, url: &str, json: &serde_json::Value) -> Result<(u16, String)> {
        let out = self
            .curl()
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(json.to_string())
            .args(["-w", "\n%{http_code}", url])
            .output()?;
        if !out.status.success() {
            bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').context("curl's status code")?;
        Ok((code.trim().parse()?, body.to_string()))
    }

    /// Everything a master at `base` (`http://ADDR:9743`) serves for image `image` without
    /// authentication: the iPXE scripts, kernel, initrd, squashfs, `/status`, `/metrics`, and
    /// every preloaded blob its squashfs's index leads to. The squashfs is unpacked into
    /// `squashfs-root`. Returns every file and directory fetched or unpacked.
    pub fn take_everything(&self, base: &str, image: &str) -> Result<Vec<PathBuf>> {
        let mut got = Vec::new();
        let mut fetch = |url: String, name: &str| -> Result<PathBuf> {
            let (f, code) = self.get(&url, name)?;
            if code != 200 {
                bail!("{url} answered {code}");
            }
            got.push(f.clone());
            Ok(f)
        };
        fetch(format!("{base}/pxe/boot.ipxe"), "boot.ipxe")?;
        for ext in ["ipxe", "vmlinuz", "initrd", "squashfs", "efi"] {
            fetch(format!("{base}/pxe/{image}.{ext}"), &format!("{image}.{ext}"))?;
        }
        fetch(format!("{base}/status"), "status.json")?;
        fetch(format!("{base}/metrics"), "metrics.txt")?;
        let root = self.dir.join("squashfs-root");
        let _ = std::fs::remove_dir_all(&root);
        let out = Command::new("unsquashfs")
            .args(["-no-progress", "-quiet", "-d"])
            .arg(&root)
            .arg(self.dir.join(format!("{image}.squashfs")))
            .output()?;
        if !out.status.success() {
            bail!("unsquashfs: {}", String::from_utf8_lossy(&out.stderr));
        }
        // The preloaded images: the index in the squashfs, the rest from the master.
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("usr/lib/labforge/preload/index.json"))?)?;
        let digest = |v: &serde_json::Value| v["digest"].as_str().map(|d| d.trim_start_matches("sha256:").to_string());
        for m in index["manifests"].as_array().into_iter().flatten() {
            let Some(hex) = digest(m) else { continue };
            let f = fetch(format!("{base}/pxe/preload/blobs/sha256/{hex}"), &format!("blob-{hex}"))?;
            let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&f)?)?;
            let parts = std::iter::once(&manifest["config"]).chain(manifest["layers"].as_array().into_iter().flatten());
            for p in parts {
                if let Some(hex) = digest(p) {
                    fetch(format!("{base}/pxe/preload/blobs/sha256/{hex}"), &format!("blob-{hex}"))?;
                }
            }
        }
        got.push(root);
        Ok(got)
    }
}

/// Every file under `paths` (regular files, not followed links) that contains one of
/// `needles`, with the needle's index.
pub fn containing(paths: &[PathBuf], needles: &[Vec<u8>]) -> Result<Vec<(PathBuf, usize)>> {
    let finders: Vec<memchr::memmem::Finder> = needles.iter().map(memchr::memmem::Finder::new).collect();
    let mut hits = Vec::new();
    for p in paths {
        for e in walkdir::WalkDir::new(p) {
            let e = e?;
            if !e.file_type().is_file() {
                continue;
            }
            let bytes = std::fs::read(e.path()).with_context(|| format!("reading {}", e.path().display()))?;
            for (i, f) in finders.iter().enumerate() {
                if f.find(&bytes).is_some() {
                    hits.push((e.path().to_path_buf(), i));
                }
            }
        }
    }
    Ok(hits)
}
