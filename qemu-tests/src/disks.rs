//! Data disk files for the disk scenarios: made on the host as sparse raw files (blank, with a
//! filesystem, with BlueStore-style labels), attached to VMs as they are, and read back after
//! the VM is gone.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nix::unistd::{lseek, Whence};
use sha2::{Digest, Sha256};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// A sparse file of `size` bytes.
pub fn blank(path: &Path, size: u64) -> Result<PathBuf> {
    fs::File::create(path)?.set_len(size)?;
    Ok(path.to_path_buf())
}

/// An ext4 filesystem over the whole disk holding `files` (made with `mkfs.ext4 -d`, no mount).
pub fn ext4(path: &Path, size: u64, files: &[(&str, &str)]) -> Result<PathBuf> {
    blank(path, size)?;
    let content = tempfile::tempdir()?;
    for (name, text) in files {
        let p = content.path().join(name);
        fs::create_dir_all(p.parent().expect("a directory"))?;
        fs::write(p, text)?;
    }
    let out = Command::new("mkfs.ext4").args(["-q", "-F", "-L", "photos", "-d"]).arg(content.path()).arg(path).output()?;
    if !out.status.success() {
        bail!("mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(path.to_path_buf())
}

/// Writes `bytes` at `offset`.
pub fn write_at(path: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Writes a BlueStore-style label (what BlueStore puts first in its label) at `offset`.
pub fn bluestore_label(path: &Path, offset: u64, osd_fsid: &str) -> Result<()> {
    write_at(path, offset, format!("bluestore block device\n{osd_fsid}\n").as_bytes())
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut f = fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut b = vec![0; len];
    f.read_exact(&mut b)?;
    Ok(b)
}

/// Whether `len` bytes at `offset` are all zero.
pub fn zero_at(path: &Path, offset: u64, len: usize) -> Result<bool> {
    Ok(read_at(path, offset, len)?.iter().all(|b| *b == 0))
}

/// Signatures `wipefs` (libblkid) finds in the file, as `type@offset`.
pub fn signatures(path: &Path) -> Result<Vec<String>> {
    let out = Command::new("wipefs").arg("--json").arg(path).output().context("running wipefs")?;
    if !out.status.success() {
        bail!("wipefs: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v["signatures"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| format!("{}@{}", s["type"].as_str().unwrap_or("?"), s["offset"].as_str().unwrap_or("?")))
        .collect())
}

/// sha256 over the file's data extents and where they are (holes skipped, so a 12 GiB sparse
/// disk hashes in no time). Any write — even of zeroes into a hole — changes it.
pub fn digest(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len() as i64;
    let fd = f.as_raw_fd();
    let mut h = Sha256::new();
    let mut pos = 0i64;
    let mut buf = vec![0u8; MIB as usize];
    while pos < len {
        let data = match lseek(fd, pos, Whence::SeekData) {
            Ok(o) => o,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e).context("SEEK_DATA"),
        };
        let hole = lseek(fd, data, Whence::SeekHole).context("SEEK_HOLE")?;
        h.update(data.to_le_bytes());
        h.update(hole.to_le_bytes());
        f.seek(SeekFrom::Start(data as u64))?;
        let mut left = (hole - data) as usize;
        while left > 0 {
            let n = left.min(buf.len());
            f.read_exact(&mut buf[..n])?;
            h.update(&buf[..n]);
            left -= n;
        }
        pos = hole;
    }
    h.update(len.to_le_bytes());
    Ok(hex::encode(h.finalize()))
}
