//! The installer's effects: read the install manifest off the boot medium's ESP, see what the
//! other disks hold of labforge, choose, and copy the image onto the chosen disk — the used
//! blocks only, sha256-checked on the way and read back — then check the UKI on the copy and
//! leave the install record on its state partition. The state partition grows to the end of
//! the disk on the installed system's first boot (systemd-repart and growfs, as on any disk
//! the image is written to).

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::sys::fs::sha256_file;
use crate::sys::Cmd;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::live::Live;
use super::{
    choose, name, Choice, Existing, InstallConfig, InstallManifest, InstallRecord, MANIFEST_ON_ESP, RECORD_FILE,
};
use crate::blockcopy::{self, Phase};
use crate::disks::{probe, DiskFacts};

crate::wire_enum! {
    /// Live session: `choosing` → `writing` → `verifying` → `installed`, or `refused` (no safe
    /// target; nothing written) or `failed`. On an installed node: `installed`.
    #[derive(Default)]
    pub enum InstallState {
        #[default]
        Choosing = "choosing",
        Writing = "writing",
        Verifying = "verifying",
        Installed = "installed",
        Refused = "refused",
        Failed = "failed",
    }
}

/// The install part of `/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstallStatus {
    pub state: InstallState,
    /// The boot medium (live session).
    pub source: Option<String>,
    pub target: Option<String>,
    pub message: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// What the installer recorded (this boot's install, or the one this node came from).
    pub record: Option<InstallRecord>,
}

/// The record an installed node keeps in its state directory, as its status shows it.
pub fn installed_status(state_dir: &Path) -> Option<InstallStatus> {
    let record: InstallRecord = serde_json::from_slice(&fs::read(state_dir.join(RECORD_FILE)).ok()?).ok()?;
    Some(InstallStatus {
        state: InstallState::Installed,
        source: Some(record.source.clone()),
        target: Some(record.target.clone()),
        message: format!("installed from {} on {}", record.source, record.target),
        bytes_done: record.bytes,
        bytes_total: record.bytes,
        record: Some(record),
    })
}

/// Runs the live session's install: choose, write, verify. `publish` sees every state change
/// and the progress. Returns the final status (`installed`, `refused` or `failed`).
pub fn run(
    cfg: &InstallConfig,
    live: &Live,
    roots: &probe::Roots,
    publish: &mut dyn FnMut(&InstallStatus),
) -> InstallStatus {
    let mut status = InstallStatus { state: InstallState::Choosing, ..Default::default() };
    publish(&status);
    match run_inner(cfg, live, roots, &mut status, publish) {
        Ok(()) => {}
        Err(e) => {
            status.state = InstallState::Failed;
            status.message = format!("{e:#}");
        }
    }
    publish(&status);
    status
}

fn run_inner(
    cfg: &InstallConfig,
    live: &Live,
    roots: &probe::Roots,
    status: &mut InstallStatus,
    publish: &mut dyn FnMut(&InstallStatus),
) -> Result<()> {
    crate::sys::cmd::udev_settle();
    let disks = probe::scan(roots).context("taking the disk inventory")?;
    let source = disks
        .iter()
        .find(|d| d.name == live.disk)
        .with_context(|| format!("the boot medium {} is not in the inventory", live.disk))?;
    status.source = Some(name(source));
    let manifest = read_manifest(roots, source)?;
    let existing = |d: &DiskFacts| {
        if d.name == source.name {
            Existing::default()
        } else {
            existing(roots, d, &manifest.disk_uuid)
        }
    };
    let chosen = choose(&disks, cfg, manifest.disk_size, &existing);
    let (target, reason) = match chosen {
        Choice::Refuse { reason } => {
            status.state = InstallState::Refused;
            status.message = reason;
            return Ok(());
        }
        Choice::Installed { disk } => {
            status.state = InstallState::Installed;
            status.target = Some(disk.clone());
            status.message = format!("{disk} already holds a complete install of this image; nothing was written. Remove the stick and restart this PC to boot it");
            return Ok(());
        }
        Choice::Install { disk, reason } => (disk, reason),
    };
    // Right before writing: look again, and decide again on what is there now.
    let fresh = probe::one(roots, &target)?;
    let again = choose(&[source.clone(), fresh.clone()], cfg, manifest.disk_size, &existing);
    if !matches!(&again, Choice::Install { disk, .. } if *disk == target) {
        bail!("{} changed while the installer looked at it ({again:?}); nothing was written", name(&fresh));
    }
    status.target = Some(name(&fresh));
    status.state = InstallState::Writing;
    status.message = reason;
    let ranges = manifest.copy_ranges()?;
    status.bytes_total = ranges.iter().map(|r| r.len).sum();
    publish(status);
    info!(source = %name(source), target = %name(&fresh), bytes = status.bytes_total, "installing");

    let started = Instant::now();
    // One exclusive descriptor on the device just probed: old signatures are erased and the
    // image written through it.
    let src = File::open(&source.path).with_context(|| format!("opening {}", source.path))?;
    let dst = labforge_core::disk::open_wiped(Path::new(&fresh.path), &fresh.devnum, fresh.size_bytes)?;
    let mut last = (Phase::Write, 0u64);
    let copied = blockcopy::copy(&mut blockcopy::Positional(&src), &ranges, &dst, 0, &mut |phase, done, total| {
        let step = done * 20 / total.max(1);
        if (phase, step) != last {
            last = (phase, step);
            status.state = if phase == Phase::Write { InstallState::Writing } else { InstallState::Verifying };
            status.bytes_done = done;
            publish(status);
        }
        Ok(())
    })
    .map_err(|e| {
        e.context(format!(
            "installing onto {} (it is only partly written; the next boot from the stick installs again)",
            name(&fresh)
        ))
    })?;
    drop(dst);
    let _ = Cmd::new("blockdev").arg("--rereadpt").arg(&fresh.path).run();
    crate::sys::cmd::udev_settle();

    let esp = partition(roots, &fresh.name, 1)?;
    let uki = with_mount(&esp, "vfat", true, |dir| sha256_file(&dir.join("EFI/BOOT/BOOTX64.EFI")))?;
    if uki != manifest.uki_sha256 {
        bail!(
            "the kernel image on {} does not match the install manifest (sha256 {uki}); the copy is damaged",
            name(&fresh)
        );
    }
    let record = InstallRecord {
        image: manifest.image.clone(),
        input_hash: manifest.input_hash.clone(),
        source: name(source),
        target: name(&fresh),
        bytes: copied.bytes,
        seconds: started.elapsed().as_secs_f64(),
        installed_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let state = partition(roots, &fresh.name, 3)?;
    with_mount(&state, "ext4", false, |dir| {
        crate::sys::fs::write_durable(&dir.join(RECORD_FILE), &serde_json::to_vec_pretty(&record)?)
    })?;
    info!(target = %record.target, seconds = record.seconds, "installed");
    status.state = InstallState::Installed;
    status.bytes_done = copied.bytes;
    status.message = format!(
        "installed onto {} ({} MiB written and read back in {:.0} s)",
        record.target,
        copied.bytes >> 20,
        record.seconds
    );
    status.record = Some(record);
    Ok(())
}

/// The install manifest from the boot medium's ESP (its first partition), mounted read-only.
fn read_manifest(roots: &probe::Roots, source: &DiskFacts) -> Result<InstallManifest> {
    let esp = partition(roots, &source.name, 1)?;
    let text = with_mount(&esp, "vfat", true, |dir| {
        let p = dir.join(MANIFEST_ON_ESP);
        fs::read_to_string(&p).with_context(|| format!("reading {MANIFEST_ON_ESP} on the boot medium's ESP (was the image built by a labforge without the installer?)"))
    })?;
    InstallManifest::parse(&text).context("reading the install manifest")
}

/// What `d` holds of labforge: this image's GPT disk GUID, and the installer's record on its
/// state partition (mounted read-only, journal not replayed, so nothing is written).
pub(super) fn existing(roots: &probe::Roots, d: &DiskFacts, disk_uuid: &str) -> Existing {
    let this_image = gpt_disk_guid(Path::new(&d.path)).is_some_and(|g| g.eq_ignore_ascii_case(disk_uuid));
    let complete = this_image
        && partition(roots, &d.name, 3)
            .and_then(|p| with_mount(&p, "ext4", true, |dir| Ok(dir.join(RECORD_FILE).is_file())))
            .unwrap_or(false);
    Existing { this_image, complete }
}

/// The disk GUID of a GPT disk (the primary header at LBA 1), as text.
pub fn gpt_disk_guid(dev: &Path) -> Option<String> {
    let f = File::open(dev).ok()?;
    let mut h = [0u8; 92];
    f.read_exact_at(&mut h, 512).ok()?;
    if &h[..8] != b"EFI PART" {
        return None;
    }
    let g = &h[56..72];
    // Mixed-endian: the first three fields are little-endian.
    Some(format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
        g[3],
        g[2],
        g[1],
        g[0],
        g[5],
        g[4],
        g[7],
        g[6],
        g[8],
        g[9],
        hex::encode(&g[10..16])
    ))
}

/// The device node of partition `number` of disk `disk`, from sysfs.
pub(super) fn partition(roots: &probe::Roots, disk: &str, number: u32) -> Result<PathBuf> {
    let dir = roots.sys.join("block").join(disk);
    for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?.flatten() {
        if fs::read_to_string(e.path().join("partition")).is_ok_and(|n| n.trim() == number.to_string()) {
            return Ok(roots.dev.join(e.file_name()));
        }
    }
    bail!("{disk} has no partition {number}")
}

/// Mounts `dev` for the time `f` takes (read-only: also without replaying a journal).
pub(super) fn with_mount<T>(
    dev: &Path,
    fstype: &str,
    read_only: bool,
    f: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    use nix::mount::{mount, umount, MsFlags};
    let dir =
        tempfile::Builder::new().prefix("labforge-install-").tempdir_in("/run").context("making a mount point")?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut data = None;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
        if fstype == "ext4" {
            data = Some("noload");
        }
    }
    mount(Some(dev), dir.path(), Some(fstype), flags, data)
        .with_context(|| format!("mounting {} ({fstype})", dev.display()))?;
    // From here the directory is a mount point: its cleanup must never recurse into it (a
    // panic in `f` unwinds past here), so it is removed by hand, and only once unmounted.
    let dir = dir.keep();
    let out = f(&dir);
    // Something that looked at a filesystem the moment it appeared can hold it for a moment
    // (seen once, on a state partition just made): try again for a while before failing.
    let mut tries = 0;
    loop {
        match umount(&dir) {
            Ok(()) => break,
            Err(nix::errno::Errno::EBUSY) if tries < 40 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            Err(e) => {
                let why = format!("unmounting {} ({})", dev.display(), holders(&dir));
                return Err(match out {
                    Ok(_) => anyhow::Error::new(e).context(why),
                    Err(first) => first.context(why),
                });
            }
        }
    }
    if tries > 0 {
        info!(device = %dev.display(), tries, "unmounted after it was busy for a moment");
    }
    let _ = fs::remove_dir(&dir);
    out
}

/// Which processes have an open file, a working directory or a root under `dir`, as
/// "held by PID (COMM), ..." (what it cannot see: memory maps, other mount namespaces).
fn holders(dir: &Path) -> String {
    let mut found = Vec::new();
    for proc in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = proc.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let p = proc.path();
        let links = ["cwd", "root"]
            .iter()
            .map(|l| p.join(l))
            .chain(fs::read_dir(p.join("fd")).into_iter().flatten().flatten().map(|e| e.path()));
        if links.filter_map(|l| fs::read_link(l).ok()).any(|t| t.starts_with(dir)) {
            let comm = fs::read_to_string(p.join("comm")).unwrap_or_default();
            found.push(format!("{pid} ({})", comm.trim()));
        }
    }
    if found.is_empty() {
        "no open file, working directory or root of a process found in it".into()
    } else {
        format!("held by {}", found.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Mount points of `with_mount` still mounted (a tmpfs stands in for a new filesystem:
    /// mounting needs root, as `make test` runs).
    fn still_mounted() -> Vec<String> {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with("/run/labforge-install-"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_mount_is_undone_after_a_busy_moment_and_never_emptied_by_cleanup() {
        assert!(nix::unistd::geteuid().is_root(), "this test mounts a tmpfs: run it as root (make test does)");
        let before = still_mounted();
        // Busy for a second when `f` returns (a file open in it): unmounted once it is closed,
        // and the mount point removed.
        let (tx, rx) = std::sync::mpsc::channel();
        let used = with_mount(Path::new("tmpfs"), "tmpfs", false, |dir| {
            let f = File::create(dir.join("held"))?;
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_secs(1));
                drop(f);
                tx.send(()).unwrap();
            });
            Ok(dir.to_path_buf())
        })
        .unwrap();
        rx.recv().unwrap();
        assert!(!used.exists(), "the mount point is removed");
        assert_eq!(still_mounted(), before);
        // A panic inside leaves the filesystem mounted with its files, never emptied.
        let mut inside = None;
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_mount(Path::new("tmpfs"), "tmpfs", false, |dir| {
                fs::write(dir.join("written"), b"kept")?;
                inside = Some(dir.to_path_buf());
                panic!("a bug while the filesystem is mounted");
                #[allow(unreachable_code)]
                Ok(())
            })
        }));
        assert!(caught.is_err());
        let dir = inside.expect("mounted");
        assert_eq!(fs::read(dir.join("written")).unwrap(), b"kept", "the cleanup did not reach into it");
        nix::mount::umount(&dir).unwrap();
        fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn reads_the_gpt_disk_guid_as_sfdisk_wrote_it() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk");
        File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let uuid = "3f8c6a55-2b1e-4d7a-9c0b-1a2b3c4d5e6f";
        let mut child = Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&img)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk (fdisk)");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(format!("label: gpt\nlabel-id: {uuid}\nsize=8MiB\n").as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(gpt_disk_guid(&img).as_deref(), Some(uuid));
        let blank = d.path().join("blank");
        File::create(&blank).unwrap().set_len(1 << 20).unwrap();
        assert_eq!(gpt_disk_guid(&blank), None);
    }

    #[test]
    fn an_installed_node_reports_its_record() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(installed_status(d.path()), None);
        let r = InstallRecord {
            image: "demo".into(),
            input_hash: "ab".into(),
            source: "/dev/disk/by-id/usb-stick".into(),
            target: "/dev/disk/by-id/virtio-lf-internal".into(),
            bytes: 42,
            seconds: 1.5,
            installed_at: 1,
        };
        fs::write(d.path().join(RECORD_FILE), serde_json::to_vec(&r).unwrap()).unwrap();
        let s = installed_status(d.path()).unwrap();
        assert_eq!(
            (s.state, s.target.as_deref()),
            (InstallState::Installed, Some("/dev/disk/by-id/virtio-lf-internal"))
        );
        assert_eq!(s.record, Some(r));
    }
}
