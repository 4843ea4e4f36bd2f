//! Files that must survive a power cut at any instant: written to a temporary file beside the
//! target, fsynced, renamed over it, and the directory fsynced, so the file is either the old
//! one or the new one.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Replaces `path` with `bytes` durably (mode 0644).
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    write_durable_mode(path, bytes, 0o644)
}

/// Creates directory `dir` (and its parents) if needed, and gives it exactly `mode`: under the
/// unit's UMask=0077 it would be 0700, and a program that reads it as another user
/// (systemd-networkd, dnsmasq after it dropped to `nobody`) could not.
pub fn dir_with_mode(dir: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// Replaces `path` with `bytes` durably, the new file created with `mode`.
pub fn write_durable_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().context("a file path has a directory")?;
    let name = path.file_name().context("a file path has a name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    // Under the unit's UMask=0077 `mode` would lose its group and other bits: set it exactly.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    fs::File::open(dir)?.sync_all().with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

/// Flushes everything written to the filesystem holding `path` to the disk (`syncfs`), so what
/// other programs wrote there (containerd's unpacked layers, kubeadm's certificates and
/// manifests) survives a power cut from now on. The agent calls it before it records that
/// such a step finished: its own marker must never be on disk before the files it vouches for.
pub fn sync_filesystem(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::unistd::syncfs(f.as_raw_fd()).with_context(|| format!("syncing the filesystem of {}", path.display()))?;
    Ok(())
}

/// The hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Whether the files at `a` and `b` hold the same bytes, read side by side: a copy checked
/// against its original without hashing either (on a slow CPU, hashing both costs more than
/// the reading).
pub fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let open = |p: &Path| fs::File::open(p).with_context(|| format!("opening {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fill(&mut fa, &mut ba).with_context(|| format!("reading {}", a.display()))?;
        let nb = fill(&mut fb, &mut bb).with_context(|| format!("reading {}", b.display()))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the file ends; the bytes read.
fn fill(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The kernel command line this boot was started with (empty if it cannot be read).
pub fn kernel_cmdline() -> String {
    fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_durable(&p, b"one").unwrap();
        write_durable(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1, "no temporary file left");
        write_durable_mode(&d.path().join("secret"), b"s", 0o600).unwrap();
        assert_eq!(fs::metadata(d.path().join("secret")).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn hashes_a_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn compares_files_byte_for_byte() {
        let d = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
        let w = |name: &str, bytes: &[u8]| {
            let p = d.path().join(name);
            fs::write(&p, bytes).unwrap();
            p
        };
        let a = w("a", &big);
        assert!(same_content(&a, &w("b", &big)).unwrap());
        let mut flipped = big.clone();
        flipped[(2 << 20) + 5] ^= 1;
        assert!(!same_content(&a, &w("c", &flipped)).unwrap(), "one bit differs past the first chunk");
        assert!(!same_content(&a, &w("d", &big[..big.len() - 1])).unwrap(), "one byte shorter");
        assert!(same_content(&w("e", b""), &w("f", b"")).unwrap());
        assert!(same_content(&a, &d.path().join("missing")).is_err());
    }
}
