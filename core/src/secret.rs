//! The cluster secret: 32 random bytes shared by every node of one cluster, stored as 64 hex
//! digits in a file of mode 0600. It authenticates discovery beacons and the join-info
//! exchange.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

pub const LEN: usize = 32;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; LEN]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn generate() -> Result<Self> {
        let mut b = [0u8; LEN];
        getrandom::getrandom(&mut b)
            .map_err(|e| anyhow::anyhow!("reading random bytes for the cluster secret: {e}"))?;
        Ok(Secret(b))
    }

    pub fn from_bytes(b: [u8; LEN]) -> Self {
        Secret(b)
    }

    pub fn bytes(&self) -> &[u8; LEN] {
        &self.0
    }

    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        if t.len() != LEN * 2 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "a cluster secret is {} hex digits (32 random bytes); this one has {} characters. Make one with `labforge secret new FILE`",
                LEN * 2,
                t.len()
            );
        }
        let mut b = [0u8; LEN];
        for (i, chunk) in t.as_bytes().chunks(2).enumerate() {
            b[i] = u8::from_str_radix(std::str::from_utf8(chunk).expect("hex"), 16).expect("hex");
        }
        Ok(Secret(b))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads a secret file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = fs::metadata(path).with_context(|| format!("reading cluster secret {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "cluster secret {} is readable by others (mode {:o}); run `chmod 600 {}`",
                path.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            );
        }
        let text = fs::read_to_string(path).with_context(|| format!("reading cluster secret {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("reading cluster secret {}", path.display()))
    }

    /// Writes the secret to a new file with mode 0600 (never overwrites).
    pub fn write_new(&self, path: &Path) -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating cluster secret {}", path.display()))?;
        writeln!(f, "{}", self.to_hex())?;
        f.sync_all()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_mode_0600() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let s = Secret::generate().unwrap();
        s.write_new(&p).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Secret::load(&p).unwrap(), s);
        assert!(s.write_new(&p).is_err(), "never overwrites");
        assert_ne!(Secret::generate().unwrap(), s);
    }

    #[test]
    fn short_or_readable_secrets_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        fs::write(&p, "abcd\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(format!("{:#}", Secret::load(&p).unwrap_err()).contains("64 hex digits"));
        fs::write(&p, "ab".repeat(32)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(format!("{:#}", Secret::load(&p).unwrap_err()).contains("readable by others"));
    }
}
