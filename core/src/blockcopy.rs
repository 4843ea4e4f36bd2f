//! Writes the mapped ranges of a disk image onto a block device (or a file standing in for
//! one), checking each range's sha256 as it is read, then reading everything back past the page
//! cache and checking it again. `labforge flash` (image file → USB stick) and the installer
//! (boot medium → internal disk) both write through here.
//!
//! Reading and writing overlap: one thread reads (and decompresses, for a `.zst` source) and
//! hashes while the caller's thread writes, with a few 4 MiB buffers in flight.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Bytes moved per write.
const CHUNK: usize = 4 << 20;
/// Buffers in flight between the reading and the writing thread.
const IN_FLIGHT: usize = 4;

/// One run of bytes to copy, with the sha256 it must have (when known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// Byte offset in the source.
    pub offset: u64,
    pub len: u64,
    pub sha256: Option<[u8; 32]>,
}

/// Where the bytes come from: read forward only (offsets never go back), so a stream being
/// decompressed serves as well as a file.
pub trait Source: Send {
    fn read_forward(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A file or device read at any offset.
pub struct Positional<F>(pub F);

impl<F: std::borrow::Borrow<File> + Send> Source for Positional<F> {
    fn read_forward(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.borrow().read_exact_at(buf, offset)
    }
}

/// A stream (a zstd decoder): skipped ranges are read and dropped.
pub struct Stream<R> {
    inner: R,
    pos: u64,
}

impl<R: Read + Send> Stream<R> {
    pub fn new(inner: R) -> Self {
        Stream { inner, pos: 0 }
    }
}

impl<R: Read + Send> Source for Stream<R> {
    fn read_forward(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset < self.pos {
            return Err(io::Error::other(format!("stream asked to go back from {} to {offset}", self.pos)));
        }
        let gap = offset - self.pos;
        let skipped = io::copy(&mut (&mut self.inner).take(gap), &mut io::sink())?;
        if skipped != gap {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "image ends early"));
        }
        self.inner.read_exact(buf)?;
        self.pos = offset + buf.len() as u64;
        Ok(())
    }
}

/// What is being done, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Write,
    Verify,
}

/// Called with (phase, bytes done, bytes in all); returning an error stops the copy (^C).
pub type Progress<'a> = dyn FnMut(Phase, u64, u64) -> Result<()> + 'a;

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Copied {
    pub bytes: u64,
    pub write_seconds: f64,
    pub verify_seconds: f64,
}

/// Takes one chunk read: (range index, offset, bytes).
type Consume<'a> = dyn FnMut(usize, u64, &[u8]) -> Result<()> + 'a;
/// Judges a range's finished hash: (range, sha256, range index).
type Check<'a> = dyn FnMut(&Range, [u8; 32], usize) -> Result<()> + 'a;

/// Reads `ranges` from `src` on a second thread, a few buffers ahead, and hands each chunk to
/// `consume` (range index, offset, bytes) on this one, in order. `consume` failing stops both.
fn pipeline(src: &mut dyn Source, ranges: &[Range], shift: u64, consume: &mut Consume<'_>) -> Result<()> {
    let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<(usize, u64, Vec<u8>, usize)>>(IN_FLIGHT);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..IN_FLIGHT + 1 {
        empty_tx.send(vec![0u8; CHUNK]).expect("receiver alive");
    }
    std::thread::scope(|s| -> Result<()> {
        s.spawn(move || {
            for (i, r) in ranges.iter().enumerate() {
                let mut at = r.offset;
                while at < r.offset + r.len {
                    let Ok(mut buf) = empty_rx.recv() else { return };
                    let n = (r.offset + r.len - at).min(CHUNK as u64) as usize;
                    let chunk = src.read_forward(shift + at, &mut buf[..n]).map(|()| (i, at, buf, n));
                    let failed = chunk.is_err();
                    if full_tx.send(chunk).is_err() || failed {
                        return;
                    }
                    at += n as u64;
                }
            }
        });
        // Returning drops the receiver, which stops the reader.
        let mut done = 0u64;
        for chunk in full_rx.iter() {
            let (i, at, buf, n) = chunk.map_err(|e| {
                let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::new(e.kind(), "the image ends early")
                } else {
                    e
                };
                anyhow::Error::new(e).context(format!("reading at byte {}", shift + done))
            })?;
            consume(i, at, &buf[..n])?;
            done += n as u64;
            let _ = empty_tx.send(buf);
        }
        if done != ranges.iter().map(|r| r.len).sum::<u64>() {
            bail!("the image ended before its last mapped range");
        }
        Ok(())
    })
}

/// Per-range sha256 over chunks that arrive in range order.
struct RangeHashes<'a> {
    ranges: &'a [Range],
    current: Sha256,
    done: Vec<[u8; 32]>,
}

impl<'a> RangeHashes<'a> {
    fn new(ranges: &'a [Range]) -> Self {
        RangeHashes { ranges, current: Sha256::new(), done: Vec::with_capacity(ranges.len()) }
    }

    /// Adds bytes of range `i`, closing the ranges before it.
    fn update(&mut self, i: usize, bytes: &[u8], check: &mut Check<'_>) -> Result<()> {
        while self.done.len() < i {
            self.close(check)?;
        }
        self.current.update(bytes);
        Ok(())
    }

    fn close(&mut self, check: &mut Check<'_>) -> Result<()> {
        let i = self.done.len();
        let sum: [u8; 32] = std::mem::take(&mut self.current).finalize().into();
        check(&self.ranges[i], sum, i)?;
        self.done.push(sum);
        Ok(())
    }

    fn finish(mut self, check: &mut Check<'_>) -> Result<Vec<[u8; 32]>> {
        while self.done.len() < self.ranges.len() {
            self.close(check)?;
        }
        Ok(self.done)
    }
}

/// Copies `ranges` from `src` to `dst` at `dst_offset + range.offset`, checking each range
/// against its sha256 on the way, then syncs `dst`, drops it from the page cache and reads every
/// range back to check it again. Ranges without a sha256 are checked on read-back against the
/// hash taken while reading them. One thread reads (decompresses); this one writes and hashes.
pub fn copy(
    src: &mut dyn Source,
    ranges: &[Range],
    dst: &File,
    dst_offset: u64,
    progress: &mut Progress<'_>,
) -> Result<Copied> {
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let started = std::time::Instant::now();
    let mut hashes = RangeHashes::new(ranges);
    let mut check = |r: &Range, sum: [u8; 32], _: usize| -> Result<()> {
        if let Some(want) = r.sha256.filter(|w| *w != sum) {
            bail!(
                "the image's bytes {}..{} do not match their sha256 (want {}, read {}): the image file is damaged or the block map belongs to another image",
                r.offset,
                r.offset + r.len,
                hex::encode(want),
                hex::encode(sum)
            );
        }
        Ok(())
    };
    let mut done = 0u64;
    pipeline(src, ranges, 0, &mut |i, at, bytes| {
        let at = dst_offset + at;
        dst.write_all_at(bytes, at).with_context(|| format!("writing at byte {at}"))?;
        // Start writing these pages back now rather than all at the final sync, so a slow
        // stick's progress is real and the page cache does not fill with the whole image.
        advise_dontneed(dst, at, bytes.len() as u64);
        hashes.update(i, bytes, &mut check)?;
        done += bytes.len() as u64;
        progress(Phase::Write, done, total)
    })?;
    let hashes = hashes.finish(&mut check)?;
    dst.sync_all().context("flushing the written data to the device")?;
    let write_seconds = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    verify(dst, dst_offset, ranges, &hashes, progress)?;
    Ok(Copied { bytes: total, write_seconds, verify_seconds: started.elapsed().as_secs_f64() })
}

/// Reads the ranges back from `dst` (after dropping them from the page cache, so the device
/// answers, not memory) and compares each with its hash.
pub fn verify(
    dst: &File,
    dst_offset: u64,
    ranges: &[Range],
    hashes: &[[u8; 32]],
    progress: &mut Progress<'_>,
) -> Result<()> {
    drop_cache(dst);
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let mut done = 0u64;
    let mut sums = RangeHashes::new(ranges);
    let mut check = |r: &Range, got: [u8; 32], i: usize| -> Result<()> {
        if got != hashes[i] {
            bail!(
                "verification failed: bytes {}..{} read back differ from what was written (the device lost or changed data; try another stick or port)",
                dst_offset + r.offset,
                dst_offset + r.offset + r.len
            );
        }
        Ok(())
    };
    let mut reader = Positional(dst);
    pipeline(&mut reader, ranges, dst_offset, &mut |i, _, bytes| {
        sums.update(i, bytes, &mut check)?;
        done += bytes.len() as u64;
        progress(Phase::Verify, done, total)
    })?;
    sums.finish(&mut check)?;
    Ok(())
}

fn advise_dontneed(f: &File, offset: u64, len: u64) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    let _ = posix_fadvise(f.as_raw_fd(), offset as i64, len as i64, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

/// Asks the kernel to forget its cached pages of `f` (written back already by `sync_all`).
pub fn drop_cache(f: &File) {
    advise_dontneed(f, 0, 0);
}

/// The data ranges of a sparse file (from `SEEK_DATA`/`SEEK_HOLE`), in 4 KiB blocks, with no
/// hashes: for an image that comes without a block map.
pub fn data_ranges(f: &File, len: u64) -> Vec<Range> {
    use nix::unistd::{lseek, Whence};
    const BLOCK: u64 = 4096;
    let mut out: Vec<Range> = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Ok(data) = lseek(f.as_raw_fd(), pos as i64, Whence::SeekData) else { break };
        let data = (data as u64) / BLOCK * BLOCK;
        let hole = lseek(f.as_raw_fd(), data as i64, Whence::SeekHole).map(|h| h as u64).unwrap_or(len);
        let end = hole.div_ceil(BLOCK).saturating_mul(BLOCK).min(len);
        match out.last_mut() {
            Some(prev) if prev.offset + prev.len >= data => prev.len = end.max(prev.offset + prev.len) - prev.offset,
            _ => out.push(Range { offset: data, len: end - data, sha256: None }),
        }
        pos = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    fn image() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let mut data = vec![0u8; 24 << 20];
        for (i, b) in data[..5 << 20].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        data[20 << 20..(20 << 20) + 4096].fill(7);
        let f = File::create(&p).unwrap();
        f.set_len(data.len() as u64).unwrap();
        f.write_all_at(&data[..5 << 20], 0).unwrap();
        f.write_all_at(&data[20 << 20..(20 << 20) + 4096], 20 << 20).unwrap();
        (d, p, data)
    }

    fn ranges(data: &[u8]) -> Vec<Range> {
        [(0u64, 5u64 << 20), (20 << 20, 4096)]
            .iter()
            .map(|&(o, l)| Range { offset: o, len: l, sha256: Some(sha(&data[o as usize..(o + l) as usize])) })
            .collect()
    }

    fn garbage_target(dir: &std::path::Path, len: usize) -> (std::path::PathBuf, File) {
        let t = dir.join("target");
        std::fs::write(&t, vec![0xAAu8; len]).unwrap();
        (t.clone(), std::fs::OpenOptions::new().read(true).write(true).open(&t).unwrap())
    }

    #[test]
    fn copies_mapped_ranges_only_and_verifies_them() {
        let (d, p, data) = image();
        let (t, dst) = garbage_target(d.path(), 24 << 20);
        let mut seen = Vec::new();
        let copied = copy(&mut Positional(File::open(&p).unwrap()), &ranges(&data), &dst, 0, &mut |ph, done, total| {
            seen.push((ph, done, total));
            Ok(())
        })
        .unwrap();
        assert_eq!(copied.bytes, (5 << 20) + 4096);
        let out = std::fs::read(&t).unwrap();
        assert_eq!(&out[..5 << 20], &data[..5 << 20]);
        assert_eq!(&out[20 << 20..(20 << 20) + 4096], &data[20 << 20..(20 << 20) + 4096]);
        // Unmapped blocks are not written.
        assert!(out[6 << 20..7 << 20].iter().all(|b| *b == 0xAA));
        assert_eq!(seen.last(), Some(&(Phase::Verify, copied.bytes, copied.bytes)));
        assert!(seen.iter().any(|s| s.0 == Phase::Write && s.1 == copied.bytes));
    }

    #[test]
    fn a_stream_source_skips_forward_and_an_offset_moves_the_target() {
        let (d, _p, data) = image();
        let (t, dst) = garbage_target(d.path(), 30 << 20);
        let stream = Stream::new(io::Cursor::new(data.clone()));
        copy(&mut { stream }, &ranges(&data), &dst, 1 << 20, &mut |_, _, _| Ok(())).unwrap();
        let out = std::fs::read(&t).unwrap();
        assert_eq!(&out[1 << 20..6 << 20], &data[..5 << 20]);
        assert!(out[..1 << 20].iter().all(|b| *b == 0xAA));
    }

    #[test]
    fn a_damaged_image_is_reported_with_its_range() {
        let (d, p, data) = image();
        let mut bad = ranges(&data);
        bad[1].sha256 = Some([0u8; 32]);
        let (_t, dst) = garbage_target(d.path(), 24 << 20);
        let e = copy(&mut Positional(File::open(&p).unwrap()), &bad, &dst, 0, &mut |_, _, _| Ok(())).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("20971520..20975616") && msg.contains("damaged"), "{msg}");
    }

    #[test]
    fn a_truncated_stream_and_a_cancel_stop_the_copy() {
        let (d, _p, data) = image();
        let (_t, dst) = garbage_target(d.path(), 24 << 20);
        let short = Stream::new(io::Cursor::new(data[..10 << 20].to_vec()));
        let e = copy(&mut { short }, &ranges(&data), &dst, 0, &mut |_, _, _| Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("ends early"), "{e:#}");
        let full = Stream::new(io::Cursor::new(data.clone()));
        let e = copy(&mut { full }, &ranges(&data), &dst, 0, &mut |_, done, _| {
            if done > 4 << 20 {
                bail!("interrupted")
            }
            Ok(())
        })
        .unwrap_err();
        assert_eq!(format!("{e}"), "interrupted");
    }

    #[test]
    fn read_back_catches_a_device_that_changed_the_data() {
        let (d, _p, data) = image();
        let (t, dst) = garbage_target(d.path(), 24 << 20);
        let r = ranges(&data);
        let hashes: Vec<[u8; 32]> = r.iter().map(|r| r.sha256.unwrap()).collect();
        // Nothing was written: the garbage does not verify.
        let e = verify(&dst, 0, &r, &hashes, &mut |_, _, _| Ok(())).unwrap_err();
        assert!(format!("{e}").contains("verification failed: bytes 0..5242880"), "{e}");
        drop(t);
    }

    #[test]
    fn data_ranges_follow_the_holes() {
        let (_d, p, _data) = image();
        let f = File::open(&p).unwrap();
        let r = data_ranges(&f, f.metadata().unwrap().len());
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!((r[0].offset, r[0].len), (0, 5 << 20));
        assert_eq!((r[1].offset, r[1].len), (20 << 20, 4096));
    }
}
