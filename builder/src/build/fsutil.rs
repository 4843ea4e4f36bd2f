//! Filesystem helpers shared by the stages.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::interrupt;

/// Resolves `rel` inside the tree at `root` the way the booted system would: symlinks are
/// followed with `root` as `/`, so nothing an image contains can redirect a write to the build
/// host. The last component is not followed (callers replace it).
pub fn resolve_in_root(root: &Path, rel: &Path) -> Result<PathBuf> {
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            _ => None,
        })
        .rev()
        .collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            parts.pop();
            continue;
        }
        let candidate: PathBuf = root.join(parts.iter().collect::<PathBuf>()).join(&part);
        let is_last = pending.is_empty();
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() && !is_last => {
                hops += 1;
                if hops > 40 {
                    bail!("too many symlinks resolving {} in the image", rel.display());
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    parts.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(s) => pending.push(s.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => parts.push(part),
        }
    }
    Ok(root.join(parts.iter().collect::<PathBuf>()))
}

/// Detaches every mount at or below `dir` (deepest first). A tool killed mid-run can leave
/// /proc or /dev mounted inside its chroot; removing the directory then would reach into the
/// host, so this runs before any work directory is deleted.
pub fn unmount_below(dir: &Path) -> Result<()> {
    let Ok(dir) = dir.canonicalize() else { return Ok(()) };
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        tracing::warn!(mount = %p.display(), "detaching mount left behind by a build tool");
        nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting {}", p.display()))?;
    }
    Ok(())
}

/// A work directory that is unmounted-below and removed when dropped, whatever happened.
pub struct WorkDir(Option<tempfile::TempDir>);

impl WorkDir {
    pub fn new_in(parent: &Path, prefix: &str) -> Result<Self> {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let t = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)
            .with_context(|| format!("creating a work directory in {}", parent.display()))?;
        Ok(WorkDir(Some(t)))
    }
    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("present until drop").path()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            match unmount_below(t.path()) {
                Ok(()) => {
                    if let Err(e) = t.close() {
                        tracing::warn!("removing work directory: {e}");
                    }
                }
                Err(e) => {
                    // Never recurse into a live mount: keep the directory and say so.
                    let kept = t.keep();
                    tracing::error!("{e:#}; left {} in place", kept.display());
                }
            }
        }
    }
}

/// Copies `src` into `dst` at byte `offset`, skipping holes so the result stays sparse.
pub fn copy_sparse_into(src: &Path, dst: &File, offset: u64) -> Result<()> {
    let mut f = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos: u64 = 0;
    while pos < len {
        interrupt::check()?;
        let data = match lseek(&f, pos, nix::unistd::Whence::SeekData) {
            Some(d) => d,
            None => break, // only a hole remains
        };
        let hole = lseek(&f, data, nix::unistd::Whence::SeekHole).unwrap_or(len);
        f.seek(SeekFrom::Start(data))?;
        let mut at = data;
        while at < hole {
            let n = ((hole - at) as usize).min(buf.len());
            f.read_exact(&mut buf[..n])?;
            dst.write_all_at(&buf[..n], offset + at)?;
            at += n as u64;
        }
        pos = hole;
    }
    Ok(())
}

fn lseek(f: &File, pos: u64, whence: nix::unistd::Whence) -> Option<u64> {
    use std::os::fd::AsRawFd;
    nix::unistd::lseek(f.as_raw_fd(), pos as i64, whence).ok().map(|p| p as u64)
}

/// Bytes a tree needs on an ext4 filesystem, roughly: file data in 4 KiB blocks plus one inode
/// (256 bytes) and a directory entry per entry.
pub fn tree_usage(root: &Path) -> Result<u64> {
    let mut total = 0u64;
    for e in walkdir::WalkDir::new(root) {
        let e = e.with_context(|| format!("walking {}", root.display()))?;
        let m = e.metadata()?;
        total += 256 + 64;
        if m.is_file() {
            total += m.len().div_ceil(4096) * 4096;
        } else if m.is_dir() {
            total += 4096;
        }
    }
    Ok(total)
}

/// Writes `contents` to `path` via a temporary file and rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut t = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("writing {}", path.display()))?;
    t.write_all(contents)?;
    t.persist(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("/usr/lib", root.join("abs")).unwrap();
        symlink("../../../../../../etc", root.join("escape")).unwrap();
        assert_eq!(resolve_in_root(root, Path::new("lib/x")).unwrap(), root.join("usr/lib/x"));
        assert_eq!(resolve_in_root(root, Path::new("abs/x")).unwrap(), root.join("usr/lib/x"));
        // `..` cannot climb above the root, so the host's /etc is never reached.
        assert_eq!(resolve_in_root(root, Path::new("escape/passwd")).unwrap(), root.join("etc/passwd"));
        // The last component is not followed.
        assert_eq!(resolve_in_root(root, Path::new("lib")).unwrap(), root.join("lib"));
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        let dst_path = d.path().join("dst");
        let dst = File::create(&dst_path).unwrap();
        dst.set_len(80 << 20).unwrap();
        copy_sparse_into(&src, &dst, 1 << 20).unwrap();
        let data = fs::read(&dst_path).unwrap();
        assert_eq!(&data[1 << 20..(1 << 20) + 4], b"head");
        assert_eq!(&data[(65 << 20) - 4..65 << 20], b"tail");
        use std::os::unix::fs::MetadataExt;
        assert!(fs::metadata(&dst_path).unwrap().blocks() * 512 < 8 << 20, "destination stayed sparse");
    }
}
