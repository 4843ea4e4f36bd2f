//! Filesystem helpers shared by the stages.

use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

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

/// Writes a file into the image tree at `rel` (resolved inside `root`), replacing whatever was
/// there, created with `mode` from the start so a secret is never readable by others.
pub fn write_in_root(root: &Path, rel: &str, contents: &[u8], mode: u32) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dest = resolve_in_root(root, Path::new(rel.trim_start_matches('/')))?;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    if dest.symlink_metadata().is_ok() {
        fs::remove_file(&dest).with_context(|| format!("replacing {}", dest.display()))?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&dest)
        .with_context(|| format!("writing {}", dest.display()))?;
    f.write_all(contents).with_context(|| format!("writing {}", dest.display()))?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
    Ok(())
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
/// It holds a lock on itself while in use, so [`WorkDir::sweep_stale`] can tell the leftovers
/// of a killed build (no lock holder) from the directory of a build still running.
pub struct WorkDir {
    dir: Option<tempfile::TempDir>,
    _lock: Option<nix::fcntl::Flock<fs::File>>,
}

impl WorkDir {
    pub fn new_in(parent: &Path, prefix: &str) -> Result<Self> {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        Self::sweep_stale(parent, prefix);
        let t = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)
            .with_context(|| format!("creating a work directory in {}", parent.display()))?;
        let lock = fs::File::open(t.path())
            .ok()
            .and_then(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok());
        Ok(WorkDir { dir: Some(t), _lock: lock })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    /// Removes directories named `prefix*` in `parent` that no running build holds: what a
    /// build killed with SIGKILL (or a power cut) left behind.
    pub fn sweep_stale(parent: &Path, prefix: &str) {
        let Ok(entries) = fs::read_dir(parent) else { return };
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with(prefix) || !e.path().is_dir() {
                continue;
            }
            let Ok(f) = fs::File::open(e.path()) else { continue };
            if let Ok(_held) = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                tracing::info!(dir = %e.path().display(), "removing what an interrupted build left behind");
                if unmount_below(&e.path()).is_ok() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Some(t) = self.dir.take() {
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

/// A tmpfs with room for `bytes` more (and memory to back it), for trees that are written
/// and read once per build: unpacking and mkfs run several times faster there than on disk.
/// `LABFORGE_NO_TMPFS=1` turns this off.
pub fn fast_scratch(bytes: u64) -> Option<PathBuf> {
    if std::env::var_os("LABFORGE_NO_TMPFS").is_some() {
        return None;
    }
    let shm = Path::new("/dev/shm");
    let st = nix::sys::statvfs::statvfs(shm).ok()?;
    let free = st.blocks_available() * st.fragment_size();
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let available_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let margin = 2 << 30;
    (free > bytes + margin && available_kib * 1024 > bytes + 2 * margin).then(|| shm.to_path_buf())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn stale_work_dirs_are_swept_but_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let live = WorkDir::new_in(d.path(), "build-").unwrap();
        // What a SIGKILLed build leaves: a directory nobody holds.
        let stale = d.path().join("build-stale");
        fs::create_dir_all(stale.join("root/etc")).unwrap();
        fs::write(stale.join("root/etc/x"), "x").unwrap();
        WorkDir::sweep_stale(d.path(), "build-");
        assert!(!stale.exists(), "stale dir removed");
        assert!(live.path().exists(), "a running build's dir is kept");
        let p = live.path().to_path_buf();
        drop(live);
        assert!(!p.exists(), "removed on drop");
    }

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
}
