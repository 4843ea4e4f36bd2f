//! Content-addressed blob cache: `<cache-dir>/blobs/sha256/<hex>`. A blob is written under a
//! temporary name, hashed while it streams in, and renamed into place only when its digest and
//! size match, so a file under its digest's name is always exactly those bytes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub struct BlobCache {
    root: PathBuf,
}

/// The hex part of a `sha256:<hex>` digest, checked.
pub fn hex_of(digest: &str) -> Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) => Ok(h),
        _ => bail!("{digest:?} is not a sha256 digest (sha256:<64 lowercase hex digits>)"),
    }
}

impl BlobCache {
    /// The cache under `<cache_dir>/blobs`. Partial downloads older than a day (left by a
    /// killed build; a running one is never that slow) are removed.
    pub fn open(cache_dir: &Path) -> Result<Self> {
        let root = cache_dir.join("blobs");
        fs::create_dir_all(root.join("sha256")).with_context(|| format!("creating blob cache {}", root.display()))?;
        fs::create_dir_all(root.join("tmp"))?;
        for e in fs::read_dir(root.join("tmp"))?.flatten() {
            let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if old.is_some_and(|age| age > std::time::Duration::from_secs(86_400)) {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(BlobCache { root })
    }

    pub fn path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("sha256").join(hex_of(digest)?))
    }

    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    pub fn read(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.path(digest)?;
        fs::read(&p).with_context(|| format!("reading cached blob {}", p.display()))
    }

    /// Starts writing `digest`; bytes go to a temporary file until `finish`.
    pub fn writer(&self, digest: &str, size: Option<u64>) -> Result<BlobWriter> {
        let dest = self.path(digest)?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}.", hex_of(digest)?))
            .suffix(".partial")
            .tempfile_in(self.root.join("tmp"))
            .context("creating a temporary file in the blob cache")?;
        Ok(BlobWriter { tmp, dest, digest: digest.to_string(), size, hasher: Sha256::new(), written: 0 })
    }

    /// Stores `bytes` (already in memory, e.g. a manifest) after checking their digest.
    pub fn put(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        let mut w = self.writer(digest, Some(bytes.len() as u64))?;
        w.write(bytes)?;
        w.finish()
    }
}

/// A blob being written. Dropped without `finish`, its temporary file is removed.
pub struct BlobWriter {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
    digest: String,
    size: Option<u64>,
    hasher: Sha256,
    written: u64,
}

impl BlobWriter {
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        if let Some(size) = self.size {
            if self.written > size {
                bail!(BlobError::TooLong { expected: size });
            }
        }
        self.tmp.write_all(bytes).map_err(|e| {
            let err = anyhow::Error::from(e);
            err.context(format!("writing the blob cache in {}", self.dest.parent().unwrap_or(Path::new(".")).display()))
        })
    }

    /// Checks size and digest, then renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        if let Some(size) = self.size {
            if self.written != size {
                bail!(BlobError::Truncated { expected: size, got: self.written });
            }
        }
        let actual = format!("sha256:{}", hex::encode(self.hasher.finalize_reset()));
        if actual != self.digest {
            bail!(BlobError::DigestMismatch { actual });
        }
        self.tmp.as_file().sync_all().context("syncing a cached blob")?;
        self.tmp
            .persist(&self.dest)
            .map_err(|e| e.error)
            .with_context(|| format!("moving blob into {}", self.dest.display()))?;
        Ok(())
    }
}

/// Why a blob was refused.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("the registry sent different bytes (digest {actual})")]
    DigestMismatch { actual: String },
    #[error("the download ended after {got} of {expected} bytes")]
    Truncated { expected: u64, got: u64 },
    #[error("the registry sent more than the {expected} bytes the manifest lists")]
    TooLong { expected: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    #[test]
    fn good_blob_lands_under_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path()).unwrap();
        let d = digest(b"hello");
        let mut w = c.writer(&d, Some(5)).unwrap();
        w.write(b"hel").unwrap();
        w.write(b"lo").unwrap();
        w.finish().unwrap();
        assert_eq!(c.read(&d).unwrap(), b"hello");
        assert_eq!(fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn bad_blobs_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlobCache::open(dir.path()).unwrap();
        let d = digest(b"hello");
        // altered bytes
        let mut w = c.writer(&d, Some(5)).unwrap();
        w.write(b"HELLO").unwrap();
        let e = w.finish().unwrap_err();
        assert!(matches!(e.downcast_ref::<BlobError>(), Some(BlobError::DigestMismatch { .. })), "{e:#}");
        // truncated
        let mut w = c.writer(&d, Some(5)).unwrap();
        w.write(b"hel").unwrap();
        let e = w.finish().unwrap_err();
        assert!(matches!(e.downcast_ref::<BlobError>(), Some(BlobError::Truncated { expected: 5, got: 3 })), "{e:#}");
        // too long
        let mut w = c.writer(&d, Some(5)).unwrap();
        assert!(w.write(b"hello!").is_err());
        drop(w);
        // abandoned
        let mut w = c.writer(&d, None).unwrap();
        w.write(b"he").unwrap();
        drop(w);
        assert!(!c.contains(&d));
        assert_eq!(fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn digests_are_checked() {
        assert!(hex_of("sha256:abc").is_err());
        assert!(hex_of(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(hex_of(&format!("sha512:{}", "a".repeat(64))).is_err());
        assert!(hex_of(&digest(b"")).is_ok());
    }
}
