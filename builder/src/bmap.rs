//! Block maps in bmaptool's format (version 2.0): which 4 KiB blocks of a sparse image hold
//! data, with a sha256 per range, so flashing writes only those and can verify them.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::interrupt;

pub const BLOCK_SIZE: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub first: u64,
    pub last: u64,
    pub sha256: String,
}

/// Mapped block ranges of a file, from the filesystem's own extent information.
fn mapped_ranges(file: &File, len: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Ok(data) = lseek(file.as_raw_fd(), pos as i64, Whence::SeekData) else { break };
        let data = data as u64;
        let hole = lseek(file.as_raw_fd(), data as i64, Whence::SeekHole).map(|h| h as u64).unwrap_or(len);
        let first = data / BLOCK_SIZE;
        let last = hole.div_ceil(BLOCK_SIZE) - 1;
        match out.last_mut() {
            Some(prev) if prev.1 + 1 >= first => prev.1 = prev.1.max(last),
            _ => out.push((first, last)),
        }
        pos = hole;
    }
    out
}

/// Creates the bmap XML for `image`.
pub fn create(image: &Path) -> Result<String> {
    let mut file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = file.metadata()?.len();
    let spans: Vec<(u64, u64)> = mapped_ranges(&file, size)
        .into_iter()
        .map(|(first, last)| (first * BLOCK_SIZE, ((last + 1) * BLOCK_SIZE).min(size)))
        .collect();
    let ranges = hash_spans(&mut file, &spans)
        .with_context(|| format!("reading {}", image.display()))?
        .into_iter()
        .map(|(start, end, sha256)| Range { first: start / BLOCK_SIZE, last: end.div_ceil(BLOCK_SIZE) - 1, sha256 })
        .collect::<Vec<_>>();
    Ok(render(size, &ranges))
}

/// The data-holding byte ranges of `image` between `from` and `to` (4 KiB aligned, clipped to
/// the span), each with its sha256: what an installer must copy of that span.
pub fn data_spans(image: &Path, from: u64, to: u64) -> Result<Vec<(u64, u64, String)>> {
    let mut file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = file.metadata()?.len();
    let spans: Vec<(u64, u64)> = mapped_ranges(&file, size)
        .into_iter()
        .map(|(first, last)| ((first * BLOCK_SIZE).max(from), ((last + 1) * BLOCK_SIZE).min(to).min(size)))
        .filter(|(s, e)| s < e)
        .collect();
    hash_spans(&mut file, &spans).with_context(|| format!("reading {}", image.display()))
}

/// sha256 of each byte span `(start, end)` of `file`.
pub fn hash_spans(file: &mut File, spans: &[(u64, u64)]) -> Result<Vec<(u64, u64, String)>> {
    let mut out = Vec::with_capacity(spans.len());
    let mut buf = vec![0u8; 1 << 20];
    for &(start, end) in spans {
        interrupt::check()?;
        file.seek(SeekFrom::Start(start))?;
        let mut h = Sha256::new();
        let mut left = end - start;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n])?;
            h.update(&buf[..n]);
            left -= n as u64;
        }
        out.push((start, end, hex::encode(h.finalize())));
    }
    Ok(out)
}

fn render(size: u64, ranges: &[Range]) -> String {
    let blocks = size.div_ceil(BLOCK_SIZE);
    let mapped: u64 = ranges.iter().map(|r| r.last - r.first + 1).sum();
    let mut x = String::new();
    let _ = writeln!(x, "<?xml version=\"1.0\" ?>");
    let _ = writeln!(x, "<!-- Block map of a labforge image; format of bmap-tools 2.0. -->");
    let _ = writeln!(x, "<bmap version=\"2.0\">");
    let _ = writeln!(x, "    <ImageSize> {size} </ImageSize>");
    let _ = writeln!(x, "    <BlockSize> {BLOCK_SIZE} </BlockSize>");
    let _ = writeln!(x, "    <BlocksCount> {blocks} </BlocksCount>");
    let _ = writeln!(x, "    <MappedBlocksCount> {mapped} </MappedBlocksCount>");
    let _ = writeln!(x, "    <ChecksumType> sha256 </ChecksumType>");
    let _ = writeln!(x, "    <BmapFileChecksum> {} </BmapFileChecksum>", "0".repeat(64));
    let _ = writeln!(x, "    <BlockMap>");
    for r in ranges {
        let span = if r.first == r.last { r.first.to_string() } else { format!("{}-{}", r.first, r.last) };
        let _ = writeln!(x, "        <Range chksum=\"{}\"> {span} </Range>", r.sha256);
    }
    let _ = writeln!(x, "    </BlockMap>");
    let _ = writeln!(x, "</bmap>");
    // The file checksum is taken over the file with the checksum field zeroed.
    let sum = hex::encode(Sha256::digest(x.as_bytes()));
    x.replacen(&"0".repeat(64), &sum, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn maps_only_written_blocks_and_checks_itself() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[1u8; 10], 0).unwrap();
        f.write_all_at(&[2u8; 5000], 8 << 20).unwrap();
        drop(f);
        let xml = create(&p).unwrap();
        assert!(xml.contains("<ImageSize> 16777216 </ImageSize>"), "{xml}");
        assert!(xml.contains("<BlocksCount> 4096 </BlocksCount>"));
        assert!(xml.contains("> 0 </Range>"), "{xml}");
        assert!(xml.contains("> 2048-2049 </Range>"), "{xml}");
        let sum = xml.split("<BmapFileChecksum> ").nth(1).unwrap()[..64].to_string();
        let zeroed = xml.replacen(&sum, &"0".repeat(64), 1);
        assert_eq!(hex::encode(Sha256::digest(zeroed.as_bytes())), sum);
    }
}
