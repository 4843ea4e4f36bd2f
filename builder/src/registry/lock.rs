//! The preload lock file, `<name>.lock.toml` beside the spec: each preloaded reference pinned
//! to the digest of its linux/amd64 manifest, so a rebuild pulls exactly the same bytes.
//! `labforge build --update-lock` resolves the tags again.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LockFile {
    #[serde(default)]
    pub image: Vec<Locked>,
    /// Release files (`[kubernetes] source = "binaries"`) pinned to their sha256.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub file: Vec<LockedFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LockedFile {
    pub url: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Locked {
    /// The reference as the spec writes it.
    #[serde(rename = "ref")]
    pub reference: String,
    /// Digest of the linux/amd64 image manifest.
    pub digest: String,
}

/// Where the lock of `spec` lives: `<spec dir>/<image name>.lock.toml`.
pub fn path_for(spec: &Path, image_name: &str) -> PathBuf {
    spec.parent().unwrap_or(Path::new(".")).join(format!("{image_name}.lock.toml"))
}

impl LockFile {
    /// Reads a lock file; a missing one is empty.
    pub fn load(path: &Path) -> Result<LockFile> {
        match fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).with_context(|| {
                format!("{} is not a valid lock file; fix it or delete it and build with --update-lock", path.display())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LockFile::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The pinned sha256 of the release file at `url`.
    pub fn file(&self, url: &str) -> Option<&str> {
        self.file.iter().find(|f| f.url == url).map(|f| f.sha256.as_str())
    }

    pub fn get(&self, reference: &str) -> Option<&str> {
        self.image.iter().find(|l| l.reference == reference).map(|l| l.digest.as_str())
    }

    /// Writes the lock atomically (temp file + rename), only if it changed.
    pub fn save(&self, path: &Path) -> Result<bool> {
        if LockFile::load(path).ok().as_ref() == Some(self) && path.exists() {
            return Ok(false);
        }
        let body = format!(
            "# Written by labforge: preloaded images pinned to their linux/amd64 manifest digests,\n\
             # release files to their sha256. `labforge build --update-lock` resolves them again.\n\n{}",
            toml::to_string(self)?
        );
        // A unique temporary name: two builds of one spec may pin at the same time.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("writing a lock file in {}", dir.display()))?;
        std::io::Write::write_all(&mut tmp, body.as_bytes())?;
        tmp.persist(path).map_err(|e| e.error).with_context(|| format!("writing {}", path.display()))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock.toml");
        assert_eq!(LockFile::load(&p).unwrap(), LockFile::default());
        let pinned = Locked { reference: "r/a:1".into(), digest: format!("sha256:{}", "a".repeat(64)) };
        let lock = LockFile { image: vec![pinned.clone()], file: vec![] };
        assert!(lock.save(&p).unwrap());
        assert!(!lock.save(&p).unwrap(), "unchanged lock is not rewritten");
        assert_eq!(LockFile::load(&p).unwrap(), lock);
        assert_eq!(lock.get("r/a:1"), Some(pinned.digest.as_str()));
        fs::write(&p, "image = 3").unwrap();
        let e = LockFile::load(&p).unwrap_err();
        assert!(format!("{e:#}").contains("--update-lock"), "{e:#}");
    }
}
