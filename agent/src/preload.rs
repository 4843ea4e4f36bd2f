//! First-boot import of the preloaded container images into containerd (namespace `k8s.io`,
//! where the kubelet looks). The builder leaves one OCI image layout in the image; each image
//! is streamed to `ctr images import` as its own small OCI archive, checked afterwards, and
//! skipped when containerd already holds that digest under that name (so a reboot imports
//! nothing). A failed import is retried with a growing pause and stays in the status until it
//! succeeds. The result of the last round is saved as `preload.json` in the state directory.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Where the builder puts the OCI image layout (root filesystem, read by every node).
pub const LAYOUT_DIR: &str = "/usr/lib/labforge/preload";
/// containerd namespace of the kubelet's images.
pub const NAMESPACE: &str = "k8s.io";
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// File in the state directory with the last round's result.
pub const RESULT_FILE: &str = "preload.json";

/// Import progress, reported in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreloadStatus {
    /// `none` (the image carries no images), `waiting` (for containerd), `importing`, `done`,
    /// or `retrying` (some imports failed; see `failed`).
    pub state: String,
    pub total: usize,
    /// Imported during this boot.
    pub imported: usize,
    /// Already in containerd with the same digest.
    pub present: usize,
    pub failed: Vec<ImportFailure>,
    /// Rounds run so far this boot.
    pub rounds: u32,
}

impl Default for PreloadStatus {
    fn default() -> Self {
        PreloadStatus { state: "none".into(), total: 0, imported: 0, present: 0, failed: Vec::new(), rounds: 0 }
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
}

/// The layout's images in import order (the builder puts the sandbox image first).
pub fn read_layout(dir: &Path) -> Result<Vec<Entry>> {
    let path = dir.join("index.json");
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let index: serde_json::Value = serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let mut out = Vec::new();
    for m in index["manifests"].as_array().cloned().unwrap_or_default() {
        let name = m["annotations"]["io.containerd.image.name"].as_str().context("a preloaded image without a name")?;
        out.push(Entry {
            name: name.to_string(),
            digest: m["digest"].as_str().context("a preloaded image without a digest")?.to_string(),
            media_type: m["mediaType"].as_str().unwrap_or("application/vnd.oci.image.manifest.v1+json").to_string(),
            size: m["size"].as_u64().unwrap_or(0),
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
            (digest.starts_with("sha256:") && *status == "complete" && *unpacked == "true").then(|| (name.to_string(), digest.to_string()))
        })
        .collect()
}

/// Talks to containerd through its `ctr` client.
pub struct Containerd {
    pub address: PathBuf,
    pub namespace: String,
}

impl Default for Containerd {
    fn default() -> Self {
        Containerd { address: PathBuf::from(CONTAINERD_SOCKET), namespace: NAMESPACE.to_string() }
    }
}

impl Containerd {
    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.address).arg("--namespace").arg(&self.namespace);
        c
    }

    pub fn ready(&self) -> bool {
        self.address.exists() && self.ctr().arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    }

    /// Images that are complete and unpacked, by name.
    pub fn images(&self) -> Result<HashMap<String, String>> {
        let out = self.ctr().args(["images", "check"]).output().context("running ctr (is containerd installed?)")?;
        if !out.status.success() {
            bail!("ctr images check: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(parse_image_check(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Streams `entry` (and only it) as an OCI archive into `ctr images import`.
    pub fn import(&self, layout: &Path, entry: &Entry) -> Result<()> {
        let mut child = self
            .ctr()
            .args(["images", "import", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ctr images import")?;
        let stdin = child.stdin.take().expect("piped");
        let written = write_archive(layout, entry, stdin);
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("ctr images import: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        written?;
        Ok(())
    }
}

/// One image of the layout as an OCI archive (tar): oci-layout, an index with just this image,
/// and the blobs its manifest names.
fn write_archive(layout: &Path, entry: &Entry, out: impl Write) -> Result<()> {
    let hex = |d: &str| d.strip_prefix("sha256:").map(str::to_string).with_context(|| format!("{d} is not a sha256 digest"));
    let manifest_path = layout.join("blobs/sha256").join(hex(&entry.digest)?);
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?)?;
    let mut blobs = vec![entry.digest.clone()];
    blobs.push(manifest["config"]["digest"].as_str().context("manifest without config")?.to_string());
    for l in manifest["layers"].as_array().cloned().unwrap_or_default() {
        blobs.push(l["digest"].as_str().context("layer without digest")?.to_string());
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
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &serde_json::to_vec(&index)?)?;
    for d in blobs {
        let h = hex(&d)?;
        let path = layout.join("blobs/sha256").join(&h);
        tar.append_path_with_name(&path, format!("blobs/sha256/{h}")).with_context(|| format!("adding {}", path.display()))?;
    }
    tar.finish()?;
    Ok(())
}

/// One round: imports what containerd lacks. Returns the status after the round.
pub fn round(containerd: &Containerd, layout: &Path, entries: &[Entry], mut status: PreloadStatus, progress: &mut dyn FnMut(&PreloadStatus)) -> PreloadStatus {
    status.rounds += 1;
    status.total = entries.len();
    status.failed.clear();
    status.present = 0;
    let have = match containerd.images() {
        Ok(h) => h,
        Err(e) => {
            status.state = "retrying".into();
            status.failed = vec![ImportFailure { name: "*".into(), error: format!("{e:#}") }];
            return status;
        }
    };
    status.state = "importing".into();
    for e in entries {
        if have.get(&e.name) == Some(&e.digest) {
            status.present += 1;
            continue;
        }
        progress(&status);
        let res = containerd.import(layout, e).and_then(|()| {
            let after = containerd.images()?;
            match after.get(&e.name) {
                Some(d) if *d == e.digest => Ok(()),
                Some(d) => bail!("containerd holds {} with digest {d} after the import, expected {}", e.name, e.digest),
                None => bail!("containerd does not hold {} complete and unpacked after the import", e.name),
            }
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
    status.state = if status.failed.is_empty() { "done" } else { "retrying" }.into();
    status
}

/// Saves the round's result in the state directory (atomically).
pub fn save_result(state_dir: &Path, status: &PreloadStatus) -> Result<()> {
    crate::state::write_atomic(&state_dir.join(RESULT_FILE), &serde_json::to_vec_pretty(status)?)
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

    #[test]
    fn an_unreachable_containerd_is_reported_and_retried_not_skipped() {
        let c = Containerd { address: PathBuf::from("/nonexistent/containerd.sock"), namespace: NAMESPACE.into() };
        assert!(!c.ready());
        let e = Entry { name: "r/app:1".into(), digest: "sha256:01".into(), media_type: "m".into(), size: 1 };
        let s = round(&c, Path::new("/nonexistent"), &[e], PreloadStatus::default(), &mut |_| {});
        assert_eq!(s.state, "retrying");
        assert_eq!((s.total, s.imported, s.present, s.rounds), (1, 0, 0, 1));
        assert_eq!(s.failed.len(), 1, "{s:?}");
        assert!(s.failed[0].error.contains("ctr"), "{s:?}");
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
    }

    #[test]
    fn archive_holds_one_image_and_its_blobs() {
        let d = tempfile::tempdir().unwrap();
        let blobs = d.path().join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        fs::write(blobs.join("c0"), "{}").unwrap();
        // A blob with a hole, as blobs in the image's ext4 are where they hold zero blocks.
        let sparse = fs::File::create(blobs.join("l1")).unwrap();
        sparse.set_len(1 << 20).unwrap();
        drop(sparse);
        let mut f = fs::OpenOptions::new().append(true).open(blobs.join("l1")).unwrap();
        f.write_all(b"layer").unwrap();
        fs::write(blobs.join("m1"), r#"{"config":{"digest":"sha256:c0"},"layers":[{"digest":"sha256:l1"}]}"#).unwrap();
        fs::write(blobs.join("other"), "not this").unwrap();
        let e = Entry { name: "r/app:1".into(), digest: "sha256:m1".into(), media_type: "m".into(), size: 10 };
        let mut buf = Vec::new();
        write_archive(d.path(), &e, &mut buf).unwrap();
        let mut names = Vec::new();
        for e in tar::Archive::new(&buf[..]).entries().unwrap() {
            let e = e.unwrap();
            assert_eq!(e.header().entry_type(), tar::EntryType::Regular, "plain files only: containerd skips sparse entries");
            names.push(e.path().unwrap().display().to_string());
        }
        names.sort();
        assert_eq!(names, ["blobs/sha256/c0", "blobs/sha256/l1", "blobs/sha256/m1", "index.json", "oci-layout"]);
    }
}
