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

/// Compresses `src` to `dst` with zstd on every core.
pub fn zstd(src: &Path, dst: &Path) -> Result<()> {
    let threads = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let mut input = BufReader::with_capacity(1 << 20, File::open(src)?);
    let out = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut enc = zstd::stream::write::Encoder::new(BufWriter::with_capacity(1 << 20, out), 3)?;
    enc.multithread(threads).context("enabling multithreaded zstd")?;
    enc.include_checksum(true)?;
    enc.set_pledged_src_size(Some(std::fs::metadata(src)?.len()))?;
    let mut buf = vec![0u8; 4 << 20];
    loop {
        interrupt::check()?;
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        enc.write_all(&buf[..n])?;
    }
    enc.finish()?.flush()?;
    Ok(())
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

/// Hashes the files in parallel.
pub fn describe(files: &[PathBuf]) -> Result<Vec<Artifact>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|p| {
                s.spawn(move || -> Result<Artifact> {
                    Ok(Artifact {
                        file: p.file_name().expect("file").to_string_lossy().into_owned(),
                        size_bytes: std::fs::metadata(p)?.len(),
                        sha256: sha256_file(p)?,
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("hash thread")).collect()
    })
}
