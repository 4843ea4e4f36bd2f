//! Stage `outputs`: compressed image, block map, qcow2, and the sha256 of every artifact.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cmd::Cmd;
use crate::interrupt;

#[derive(Debug, Clone, Serialize)]
pub struct Artifact {
    pub file: String,
    pub size_bytes: u64,
    pub sha256: String,
}

/// A writer that hashes what passes through it.
struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses `src` to `dst` with zstd on every core. Returns the sha256 of `src` and of
/// `dst`, computed on the way, so neither file is read twice.
pub fn zstd(src: &Path, dst: &Path) -> Result<(String, String)> {
    let threads = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let mut input = BufReader::with_capacity(1 << 20, File::open(src)?);
    let out = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let sink = HashingWriter { inner: BufWriter::with_capacity(1 << 20, out), hash: Sha256::new() };
    let mut enc = zstd::stream::write::Encoder::new(sink, 3)?;
    enc.multithread(threads).context("enabling multithreaded zstd")?;
    enc.include_checksum(true)?;
    enc.set_pledged_src_size(Some(std::fs::metadata(src)?.len()))?;
    let mut src_hash = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        interrupt::check()?;
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        src_hash.update(&buf[..n]);
        enc.write_all(&buf[..n])?;
    }
    let mut sink = enc.finish()?;
    sink.flush()?;
    sink.inner.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok((hex::encode(src_hash.finalize()), hex::encode(sink.hash.finalize())))
}

pub fn qcow2(src: &Path, dst: &Path) -> Result<()> {
    Cmd::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(src)
        .arg(dst)
        .run()
        .context("writing the qcow2 image")?;
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        interrupt::check()?;
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Describes the files, hashing those whose sha256 is not already known, in parallel.
pub fn describe(files: &[PathBuf], known: &[(PathBuf, String)]) -> Result<Vec<Artifact>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|p| {
                let known = known.iter().find(|(k, _)| k == p).map(|(_, h)| h.clone());
                s.spawn(move || -> Result<Artifact> {
                    Ok(Artifact {
                        file: p.file_name().expect("file").to_string_lossy().into_owned(),
                        size_bytes: std::fs::metadata(p)?.len(),
                        sha256: match known {
                            Some(h) => h,
                            None => sha256_file(p)?,
                        },
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("hash thread")).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_round_trips_and_reports_both_hashes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("img");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let dst = d.path().join("img.zst");
        let (src_sum, dst_sum) = zstd(&src, &dst).unwrap();
        assert_eq!(src_sum, sha256_file(&src).unwrap());
        assert_eq!(dst_sum, sha256_file(&dst).unwrap());
        let back = zstd::stream::decode_all(File::open(&dst).unwrap()).unwrap();
        assert_eq!(back, data);
    }
}
