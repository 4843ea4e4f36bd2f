//! `labforge flash IMAGE DEVICE`: writes a built image (`.img` or `.img.zst`, decompressed as
//! it streams) to a USB stick, only the blocks its block map lists, each checked against the
//! map's sha256 on the way, then reads everything back from the stick and checks it again.
//!
//! Before a byte is written it refuses what would surprise a user: a device that is not
//! removable (an internal disk), one that is mounted or in use, the disk holding this host's
//! root, a read-only or too small device, a partition instead of a whole disk, a path that
//! does not exist, and a block map that belongs to another image. `--force` lifts only the
//! first two.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use labforge_core::blockcopy::{self, Phase, Range};
use labforge_core::disk::{probe, DiskFacts};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cmd::Cmd;
use crate::interrupt;

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
const PARTLY_WRITTEN: &str = "the device is only partly written: flash it again before booting from it";

#[derive(Debug, Clone)]
pub struct FlashOptions {
    pub image: PathBuf,
    pub target: PathBuf,
    /// Block map; default: `<name>.img.bmap` beside the image.
    pub bmap: Option<PathBuf>,
    /// Write without a block map even if one lies beside the image.
    pub no_bmap: bool,
    /// Write to a device that is not removable, or is in use.
    pub force: bool,
}

/// What `flash` did.
#[derive(Debug, Clone, Serialize)]
pub struct Flashed {
    pub image: PathBuf,
    pub target: PathBuf,
    pub bmap: Option<PathBuf>,
    pub image_bytes: u64,
    /// Bytes written (the mapped blocks).
    pub written_bytes: u64,
    pub write_seconds: f64,
    pub verify_seconds: f64,
    pub verified: bool,
}

/// The image as read: raw or zstd-compressed, and its (decompressed) size.
struct Image {
    file: File,
    zstd: bool,
    size: Option<u64>,
}

impl Image {
    fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).with_context(|| format!("opening image {}", path.display()))?;
        let md = file.metadata()?;
        if !md.is_file() {
            bail!("{} is not an image file", path.display());
        }
        let mut head = [0u8; 18];
        let n = file.read(&mut head)?;
        file.rewind()?;
        if n >= 4 && head[..4] == ZSTD_MAGIC {
            let size = zstd::zstd_safe::get_frame_content_size(&head[..n]).ok().flatten();
            Ok(Image { file, zstd: true, size })
        } else {
            Ok(Image { file, zstd: false, size: Some(md.len()) })
        }
    }
}

/// The block map beside `image`: `x.img.bmap` for `x.img` and `x.img.zst`.
pub fn default_bmap(image: &Path) -> Option<PathBuf> {
    let name = image.file_name()?.to_string_lossy().into_owned();
    let base = name.strip_suffix(".zst").unwrap_or(&name);
    let mut candidates = vec![image.with_file_name(format!("{base}.bmap"))];
    if let Some(stem) = base.strip_suffix(".img") {
        candidates.push(image.with_file_name(format!("{stem}.bmap")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Parses a block map (bmaptool format), checks its own checksum, and turns it into ranges.
pub fn read_bmap(path: &Path) -> Result<(u64, Vec<Range>)> {
    let xml = fs::read_to_string(path).with_context(|| format!("reading block map {}", path.display()))?;
    check_bmap_checksum(&xml).with_context(|| format!("block map {}", path.display()))?;
    let map =
        bmap_parser::Bmap::from_xml(&xml).map_err(|e| anyhow::anyhow!("parsing block map {}: {e}", path.display()))?;
    let size = map.image_size();
    let ranges = map
        .block_map()
        .map(|r| {
            let mut sum = [0u8; 32];
            sum.copy_from_slice(r.checksum().as_slice());
            // The last block of an image whose size is not a multiple of the block size is
            // hashed only up to the end of the image.
            let len = r.length().min(size.saturating_sub(r.offset()));
            Range { offset: r.offset(), len, sha256: Some(sum) }
        })
        .filter(|r| r.len > 0)
        .collect();
    Ok((size, ranges))
}

/// bmaptool's file checksum: the sha256 of the file with the checksum itself replaced by zeros.
fn check_bmap_checksum(xml: &str) -> Result<()> {
    let Some(sum) = xml.split("<BmapFileChecksum>").nth(1).and_then(|s| s.split("</BmapFileChecksum>").next()) else {
        return Ok(()); // format 1.x has none
    };
    let sum = sum.trim();
    let zeroed = xml.replacen(sum, &"0".repeat(sum.len()), 1);
    if hex::encode(Sha256::digest(zeroed.as_bytes())) != sum {
        bail!("its checksum does not match its contents: the file is damaged or was edited; build the image again");
    }
    Ok(())
}

/// Why a block device must not be written, or `None`. `force` lifts "not removable" and "in use".
pub fn refusal(d: &DiskFacts, image_size: u64, force: bool) -> Option<String> {
    let what = describe(d);
    if !d.boot.is_empty() {
        return Some(format!(
            "{} {what} {}: it is this host's system disk; labforge flash never writes it",
            d.path,
            d.boot.join(", ")
        ));
    }
    if d.read_only {
        return Some(format!("{} {what} is read-only (a write-protect switch on the stick?)", d.path));
    }
    if d.size_bytes < image_size {
        return Some(format!(
            "{} {what} holds {} but the image needs {}; use a larger stick",
            d.path,
            bytesize::ByteSize(d.size_bytes),
            bytesize::ByteSize(image_size)
        ));
    }
    if force {
        return None;
    }
    if !d.mounts.is_empty() || !d.holders.is_empty() {
        let using: Vec<String> = d
            .mounts
            .iter()
            .map(|m| format!("mounted at {m}"))
            .chain(d.holders.iter().map(|h| format!("held by {h}")))
            .collect();
        return Some(format!("{} {what} is in use ({}); unmount it first (or pass --force)", d.path, using.join(", ")));
    }
    let removable = d.removable || matches!(d.transport.as_deref(), Some("usb" | "mmc"));
    if !removable {
        return Some(format!(
            "{} {what} is not a removable disk; labforge flash writes USB sticks and SD cards. Check the device with lsblk, and pass --force if you really mean to overwrite it",
            d.path
        ));
    }
    None
}

fn describe(d: &DiskFacts) -> String {
    let mut parts = vec![bytesize::ByteSize(d.size_bytes).to_string()];
    parts.extend(d.transport.clone());
    parts.extend(d.model.clone());
    format!("({})", parts.join(", "))
}

/// The target, checked and opened for writing.
struct Target {
    file: File,
    block: bool,
}

fn open_target(path: &Path, image_size: u64, force: bool, roots: &probe::Roots) -> Result<Target> {
    let md = match fs::metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} does not exist; plug the stick in and find its name with lsblk", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    };
    if md.file_type().is_block_device() {
        let (major, minor) = (nix::sys::stat::major(md.rdev()), nix::sys::stat::minor(md.rdev()));
        let sys = roots.sys.join(format!("dev/block/{major}:{minor}"));
        let name = fs::canonicalize(&sys)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .with_context(|| format!("{} has no entry in {}", path.display(), sys.display()))?;
        if sys.join("partition").exists() {
            let disk = fs::canonicalize(&sys)
                .ok()
                .and_then(|p| p.parent()?.file_name().map(|n| n.to_string_lossy().into_owned()));
            bail!(
                "{} is a partition; give the whole disk (/dev/{})",
                path.display(),
                disk.unwrap_or_else(|| "…".into())
            );
        }
        let facts = probe::block_device(roots, &name)?;
        if let Some(why) = refusal(&facts, image_size, force) {
            bail!("refusing to write: {why}");
        }
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if !force {
            // The kernel refuses an exclusive open of a device that is mounted or held.
            o.custom_flags(libc::O_EXCL);
        }
        let file = o.open(path).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                ": it is in use (mounted, or held by another program)"
            } else {
                ""
            };
            anyhow::anyhow!("opening {} for writing: {e}{hint}", path.display())
        })?;
        Ok(Target { file, block: true })
    } else if md.is_file() {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {} for writing", path.display()))?;
        if md.len() < image_size {
            file.set_len(image_size).with_context(|| format!("extending {}", path.display()))?;
        }
        Ok(Target { file, block: false })
    } else {
        bail!("{} is neither a block device nor a file", path.display())
    }
}

/// Writes the image to the target and verifies it; see the module docs.
pub fn flash(opts: &FlashOptions, roots: &probe::Roots) -> Result<Flashed> {
    let image = Image::open(&opts.image)?;
    let bmap = match (&opts.bmap, opts.no_bmap) {
        (Some(b), _) => Some(b.clone()),
        (None, false) => default_bmap(&opts.image),
        (None, true) => None,
    };
    let (size, ranges) = match &bmap {
        Some(b) => {
            let (size, ranges) = read_bmap(b)?;
            if let Some(real) = image.size.filter(|s| *s != size) {
                bail!(
                    "block map {} describes a {size}-byte image but {} is {real} bytes: they come from different builds; pass the right --bmap (or --no-bmap)",
                    b.display(),
                    opts.image.display()
                );
            }
            (size, ranges)
        }
        None => {
            let Some(size) = image.size else {
                bail!("{} does not record its size and has no block map beside it; pass --bmap", opts.image.display());
            };
            let ranges = if image.zstd {
                vec![Range { offset: 0, len: size, sha256: None }]
            } else {
                blockcopy::data_ranges(&image.file, size)
            };
            (size, ranges)
        }
    };
    let target = open_target(&opts.target, size, opts.force, roots)?;
    if bmap.is_none() {
        tracing::warn!(
            "no block map for {}: writing every block it holds, checked only by reading it back",
            opts.image.display()
        );
    }
    let mapped: u64 = ranges.iter().map(|r| r.len).sum();
    tracing::info!(
        "writing {} ({} of {} mapped) to {}",
        opts.image.display(),
        bytesize::ByteSize(mapped),
        bytesize::ByteSize(size),
        opts.target.display()
    );
    let bar = progress_bar(mapped);
    // Without a terminal: one line per tenth done.
    let mut last = (Phase::Write, 0u64);
    let mut progress = |phase: Phase, done: u64, total: u64| -> Result<()> {
        interrupt::check_with(PARTLY_WRITTEN)?;
        let step = done * 10 / total.max(1);
        if (phase, step) != last {
            let verb = if phase == Phase::Write { "writing" } else { "verifying" };
            match &bar {
                Some(b) => b.set_message(verb),
                None => tracing::info!("{verb}: {}%", step * 10),
            }
            last = (phase, step);
        }
        if let Some(b) = &bar {
            b.set_position(done);
        }
        Ok(())
    };
    let copied = if image.zstd {
        let decoder = zstd::stream::read::Decoder::new(image.file).context("reading the zstd image")?;
        blockcopy::copy(&mut blockcopy::Stream::new(decoder), &ranges, &target.file, 0, &mut progress)
    } else {
        blockcopy::copy(&mut blockcopy::Positional(image.file), &ranges, &target.file, 0, &mut progress)
    }
    .with_context(|| format!("flashing {}", opts.target.display()))?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if target.block {
        // Let the kernel see the new partition table; harmless if it cannot yet.
        let _ = Cmd::new("blockdev").arg("--rereadpt").arg(&opts.target).run();
    }
    tracing::info!(
        "wrote {} in {:.1}s ({:.0} MiB/s), verified in {:.1}s",
        bytesize::ByteSize(copied.bytes),
        copied.write_seconds,
        copied.bytes as f64 / 1048576.0 / copied.write_seconds.max(1e-6),
        copied.verify_seconds
    );
    Ok(Flashed {
        image: opts.image.clone(),
        target: opts.target.clone(),
        bmap,
        image_bytes: size,
        written_bytes: copied.bytes,
        write_seconds: copied.write_seconds,
        verify_seconds: copied.verify_seconds,
        verified: true,
    })
}

fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>9} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        b.set_message("writing");
        b
    })
}

#[cfg(test)]
mod tests;
