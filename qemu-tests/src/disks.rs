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
    let out =
        Command::new("mkfs.ext4").args(["-q", "-F", "-L", "photos", "-d"]).arg(content.path()).arg(path).output()?;
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

/// sha256 of the file's bytes: equal for equal contents, whatever the allocation. Only data
/// extents are read (holes are zeroes), so a 12 GiB sparse disk hashes in no time; every
/// non-zero 64 KiB block is hashed with its offset. (Extent boundaries are not hashed: the
/// host filesystem reports unwritten extents as data once their pages are cached, so merely
/// reading a disk could change them.)
pub fn digest(path: &Path) -> Result<String> {
    const BLOCK: usize = 64 << 10;
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len() as i64;
    let fd = f.as_raw_fd();
    let mut h = Sha256::new();
    let mut pos = 0i64;
    let mut buf = vec![0u8; BLOCK];
    while pos < len {
        let data = match lseek(fd, pos, Whence::SeekData) {
            Ok(o) => o,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e).context("SEEK_DATA"),
        };
        let hole = lseek(fd, data, Whence::SeekHole).context("SEEK_HOLE")?;
        // Whole blocks, so the same bytes hash the same however the extents are cut.
        let mut block = data - data % BLOCK as i64;
        while block < hole {
            let n = (len - block).min(BLOCK as i64) as usize;
            f.seek(SeekFrom::Start(block as u64))?;
            f.read_exact(&mut buf[..n])?;
            if buf[..n].iter().any(|b| *b != 0) {
                h.update(block.to_le_bytes());
                h.update(&buf[..n]);
            }
            block += BLOCK as i64;
        }
        pos = block.max(hole);
    }
    h.update(len.to_le_bytes());
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_follows_bytes_not_allocation() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        blank(&a, 64 * MIB).unwrap();
        blank(&b, 64 * MIB).unwrap();
        write_at(&a, 3 * MIB + 5, b"data").unwrap();
        write_at(&b, 3 * MIB + 5, b"data").unwrap();
        // Zeroes written into a hole allocate blocks but change no byte.
        write_at(&b, 40 * MIB, &vec![0u8; 256 << 10]).unwrap();
        assert_eq!(digest(&a).unwrap(), digest(&b).unwrap());
        write_at(&b, 63 * MIB, b"x").unwrap();
        assert_ne!(digest(&a).unwrap(), digest(&b).unwrap());
        write_at(&a, 63 * MIB, b"y").unwrap();
        assert_ne!(digest(&a).unwrap(), digest(&b).unwrap());
    }
}
