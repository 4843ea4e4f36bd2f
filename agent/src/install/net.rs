//! Installing a *netbooted* node onto its own disk (`[install] netboot = true`).
//!
//! A netbooted node has no disk image to copy: it runs from the squashfs its master served.
//! So it installs the way netboot installers of the big distributions do, from the running
//! image's own tree: it writes the image's GPT (the builder's table, same disk and partition
//! GUIDs), makes the ESP and puts the image's UKI on it, makes the root filesystem and copies
//! the squashfs's tree onto it (with the disk's fstab, the netboot files and the preloaded
//! images' blobs, which the squashfs leaves out), reads everything back and compares it, makes
//! the state filesystem and leaves the install record there. Everything fetched from the
//! master is checked against the sha256 the builder put into the squashfs
//! ([`NET_MANIFEST`]). The state partition grows to the end of the disk on first boot, as on
//! any disk.
//!
//! The target is chosen as for a stick (`super::choose`): a named disk, else the smallest
//! blank internal disk of at least `min-size`. With none, nothing is written and the node runs
//! on as a netbooted node. A PC that boots from its disk before the network (the usual
//! firmware order for PXE installs) then boots the installed system; one that netboots first
//! finds its disk installed and runs netbooted, saying so.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::sys::Cmd;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tracing::info;

use super::write::{existing, partition, with_mount, InstallState, InstallStatus};
use super::{choose, name, Choice, InstallConfig, InstallRecord, RECORD_FILE};
use crate::disks::probe;
use crate::preload;
use crate::sys::fs::{same_content, sha256_file};

pub use labforge_core::manifest::{Ext4Format, NetManifest, VfatFormat, NET_MANIFEST, NET_SCHEMA_VERSION};

/// What the node booted: the squashfs mounted by live-boot, and the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRoot {
    /// Where the squashfs is mounted (the image's tree, unchanged).
    pub tree: PathBuf,
    /// The squashfs file (downloaded by live-boot into memory).
    pub file: PathBuf,
}

/// Finds the squashfs live-boot mounted, in `mountinfo` (`/proc/self/mountinfo`), and its file
/// through the loop device's `backing_file` under `sys`.
pub fn live_root(mountinfo: &str, sys: &Path) -> Result<LiveRoot> {
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let f: Vec<&str> = left.split_whitespace().collect();
        let r: Vec<&str> = right.split_whitespace().collect();
        let (Some(point), Some(fstype), Some(source)) = (f.get(4), r.first(), r.get(1)) else { continue };
        if *fstype != "squashfs" || !point.starts_with("/run/live/") {
            continue;
        }
        let dev = source.rsplit('/').next().unwrap_or_default();
        let backing = sys.join("block").join(dev).join("loop/backing_file");
        let file = fs::read_to_string(&backing).with_context(|| {
            format!("reading {} (the squashfs at {point} is not on a loop device)", backing.display())
        })?;
        return Ok(LiveRoot {
            tree: PathBuf::from(crate::disks::probe::unescape(point)),
            file: PathBuf::from(file.trim()),
        });
    }
    bail!("no squashfs mounted under /run/live: this node was not netbooted by live-boot")
}

/// Runs the netboot install: choose, write, verify. Returns the final status (`installed`,
/// `refused` or `failed`); `record` is set only when this run wrote a disk.
pub fn run(
    cfg: &InstallConfig,
    manifest_path: &Path,
    cmdline: &str,
    roots: &probe::Roots,
    publish: &mut dyn FnMut(&InstallStatus),
) -> InstallStatus {
    let mut status = InstallStatus { state: InstallState::Choosing, ..Default::default() };
    publish(&status);
    if let Err(e) = run_inner(cfg, manifest_path, cmdline, roots, &mut status, publish) {
        status.state = InstallState::Failed;
        status.message = format!("{e:#}");
    }
    publish(&status);
    status
}

fn run_inner(
    cfg: &InstallConfig,
    manifest_path: &Path,
    cmdline: &str,
    roots: &probe::Roots,
    status: &mut InstallStatus,
    publish: &mut dyn FnMut(&InstallStatus),
) -> Result<()> {
    let manifest = NetManifest::load(manifest_path)?;
    let base = crate::pxe::base_url(cmdline)
        .context("the kernel command line has no fetch= URL: this node was not netbooted")?;
    status.source = Some(base.clone());
    let live = live_root(&fs::read_to_string(roots.proc.join("self/mountinfo"))?, &roots.sys)?;
    crate::sys::cmd::udev_settle();
    let disks = probe::scan(roots).context("taking the disk inventory")?;
    let existing = |d: &crate::disks::DiskFacts| existing(roots, d, &manifest.disk_uuid);
    let (target, reason) = match choose(&disks, cfg, manifest.disk_size, &existing) {
        Choice::Refuse { reason } => {
            status.state = InstallState::Refused;
            status.message = format!("{reason}; running netbooted");
            return Ok(());
        }
        Choice::Installed { disk } => {
            status.state = InstallState::Installed;
            status.target = Some(disk.clone());
            status.message = format!("{disk} already holds a complete install of this image; nothing was written. Running netbooted: put the disk before the network in this PC's boot order to boot it");
            return Ok(());
        }
        Choice::Install { disk, reason } => (disk, reason),
    };
    let fresh = probe::one(roots, &target)?;
    let again = choose(std::slice::from_ref(&fresh), cfg, manifest.disk_size, &existing);
    if !matches!(&again, Choice::Install { disk, .. } if *disk == target) {
        bail!("{} changed while the installer looked at it ({again:?}); nothing was written", name(&fresh));
    }
    let target_name = name(&fresh);
    status.target = Some(target_name.clone());
    status.state = InstallState::Writing;
    status.message = reason;
    publish(status);
    info!(source = %base, target = %target_name, "installing from the netboot image");
    let started = Instant::now();
    let fetcher = Fetcher::new(&base);
    let work = tempfile::Builder::new()
        .prefix("labforge-netinstall-")
        .tempdir_in("/run")
        .context("making a work directory in /run")?;

    // What comes from the master first, so a master that cannot serve it stops the install
    // before the disk is touched.
    let uki = work.path().join("uki.efi");
    fetcher.fetch_to(&format!("{}.efi", manifest.image), &manifest.uki_sha256, &uki)?;
    // What the copy adds to the image's tree and squashfs, for its progress.
    let mut added = fs::metadata(&uki)?.len();
    for file in manifest.files.keys().filter(|f| !f.ends_with(".efi")) {
        added += fetcher.check(file, None)?.unwrap_or(0);
    }
    let served_layout = preload::Source {
        layout: PathBuf::from(preload::LAYOUT_DIR),
        remote: Some(format!("{base}/{}", preload::REMOTE_DIR)),
    };
    let blobs = preload::blobs(&served_layout, &preload::read_layout(Path::new(preload::LAYOUT_DIR))?)?;
    for (hex, size) in &blobs {
        fetcher.check(&format!("{}/blobs/sha256/{hex}", preload::REMOTE_DIR), Some(*size))?;
        added += size;
    }

    let partly = |e: anyhow::Error| {
        e.context(format!("installing onto {target_name} (it is only partly written; the next netboot installs again)"))
    };
    // The downloads above took a while: the disk must still be the one probed, and unused.
    // Its old signatures are erased through one exclusive descriptor; sfdisk and mkfs then
    // write by name (they open the device themselves), right after.
    drop(labforge_core::disk::open_wiped(Path::new(&fresh.path), &fresh.devnum, fresh.size_bytes)?);
    sfdisk(&fresh.path, &manifest.sfdisk).map_err(partly)?;
    let _ = Cmd::new("blockdev").arg("--rereadpt").arg(&fresh.path).run();
    crate::sys::cmd::udev_settle();
    let part = |n| partition(roots, &fresh.name, n).map_err(partly);
    let (esp, root, state) = (part(1)?, part(2)?, part(3)?);

    let e = &manifest.esp;
    Cmd::new("mkfs.vfat")
        .args(["-F", "32", "-S", "512", "-n", &e.label, "-i", &e.volume_id, "-s", &e.sectors_per_cluster.to_string()])
        .arg(&esp)
        .run()
        .context("making the ESP")
        .map_err(partly)?;
    with_mount(&esp, "vfat", false, |dir| {
        fs::create_dir_all(dir.join("EFI/BOOT"))?;
        fs::copy(&uki, dir.join("EFI/BOOT/BOOTX64.EFI")).context("copying the UKI onto the ESP")?;
        File::open(dir.join("EFI/BOOT/BOOTX64.EFI"))?.sync_all()?;
        Ok(())
    })
    .map_err(partly)?;

    mkfs_ext4(&root, &manifest.root).map_err(partly)?;
    let copied = with_mount(&root, "ext4", false, |dir| {
        fill_root(&manifest, &live, &fetcher, &uki, &blobs, added, dir, status, publish)
    })
    .map_err(partly)?;

    status.state = InstallState::Verifying;
    publish(status);
    drop_caches();
    with_mount(&root, "ext4", true, |dir| verify_root(&manifest, &live, dir)).map_err(partly)?;
    let on_esp =
        with_mount(&esp, "vfat", true, |dir| sha256_file(&dir.join("EFI/BOOT/BOOTX64.EFI"))).map_err(partly)?;
    if on_esp != manifest.uki_sha256 {
        return Err(partly(anyhow::anyhow!(
            "the kernel image read back from the ESP does not match (sha256 {on_esp})"
        )));
    }

    mkfs_ext4(&state, &manifest.state).map_err(partly)?;
    let record = InstallRecord {
        image: manifest.image.clone(),
        input_hash: manifest.input_hash.clone(),
        source: base.clone(),
        target: target_name.clone(),
        bytes: copied,
        seconds: started.elapsed().as_secs_f64(),
        installed_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    with_mount(&state, "ext4", false, |dir| {
        crate::sys::fs::write_durable(&dir.join(RECORD_FILE), &serde_json::to_vec_pretty(&record)?)
    })?;
    info!(target = %record.target, seconds = record.seconds, "installed");
    status.state = InstallState::Installed;
    status.bytes_done = copied;
    status.bytes_total = copied;
    status.message = format!(
        "installed onto {target_name} from {base} ({} MiB written and read back in {:.0} s)",
        copied >> 20,
        record.seconds
    );
    status.record = Some(record);
    Ok(())
}

/// The root filesystem: the squashfs's tree, the disk's fstab, the netboot files and the
/// preloaded images' blobs. Returns the bytes written.
#[allow(clippy::too_many_arguments)]
fn fill_root(
    manifest: &NetManifest,
    live: &LiveRoot,
    fetcher: &Fetcher,
    uki: &Path,
    blobs: &[(String, u64)],
    added: u64,
    dir: &Path,
    status: &mut InstallStatus,
    publish: &mut dyn FnMut(&InstallStatus),
) -> Result<u64> {
    status.bytes_total = tree_bytes(&live.tree)? + fs::metadata(&live.file)?.len() + added;
    publish(status);
    // cp -a keeps owners, modes, times, hard links, special files and extended attributes
    // (file capabilities among them).
    Cmd::new("cp")
        .arg("-a")
        .arg("--sparse=always")
        .arg(live.tree.join("."))
        .arg(dir)
        .run()
        .context("copying the image's tree")?;
    let mut bytes = tree_bytes(dir)?;
    status.bytes_done = bytes;
    publish(status);
    crate::sys::fs::write_durable(&dir.join("etc/fstab"), manifest.fstab.as_bytes())?;
    // The squashfs carries no cluster secret; this node got one by enrolment: the installed
    // system keeps it (0600), or it could not join after its first boot from the disk.
    if let Ok(secret) = fs::read(crate::config::SECRET_PATH) {
        let to = dir.join(crate::config::SECRET_PATH.trim_start_matches('/'));
        crate::sys::fs::write_durable_mode(&to, &secret, 0o600).context("keeping the cluster secret")?;
    }

    let pxe_dir = dir.join(crate::pxe::ARTIFACT_DIR.trim_start_matches('/'));
    fs::create_dir_all(&pxe_dir)?;
    fs::set_permissions(&pxe_dir, fs::Permissions::from_mode(0o755))?;
    for (file, sha) in &manifest.files {
        let to = pxe_dir.join(file);
        if file.ends_with(".efi") {
            fs::copy(uki, &to)?;
        } else {
            fetcher.fetch_to(file, sha, &to)?;
        }
        bytes += fs::metadata(&to)?.len();
    }
    let squashfs = pxe_dir.join(format!("{}.squashfs", manifest.image));
    fs::copy(&live.file, &squashfs).with_context(|| format!("copying {}", live.file.display()))?;
    bytes += fs::metadata(&squashfs)?.len();
    status.bytes_done = bytes;
    publish(status);

    // The blobs the squashfs left out, from the master, each checked against its digest.
    let layout = dir.join(preload::LAYOUT_DIR.trim_start_matches('/'));
    for (hex, _) in blobs {
        let to = layout.join("blobs/sha256").join(hex);
        if !to.exists() {
            let blob_dir = to.parent().expect("blob dir");
            fs::create_dir_all(blob_dir)?;
            for d in [blob_dir, blob_dir.parent().expect("blobs")] {
                fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
            }
            fetcher.fetch_to(&format!("{}/blobs/sha256/{hex}", preload::REMOTE_DIR), hex, &to)?;
            bytes += fs::metadata(&to)?.len();
        }
    }
    status.bytes_done = bytes;
    publish(status);
    Cmd::new("sync").arg("--file-system").arg(dir).run().context("syncing the new root filesystem")?;
    Ok(bytes)
}

/// Reads the new root back (the page cache dropped before) and compares it with the image's
/// tree: every entry's type, owner, mode and link target, every regular file's content; then
/// the files added to it.
fn verify_root(manifest: &NetManifest, live: &LiveRoot, dir: &Path) -> Result<()> {
    let fstab = Path::new("etc/fstab");
    // Added to the tree (and checked below), or made by mkfs.
    let added = [
        crate::pxe::ARTIFACT_DIR,
        &format!("{}/blobs", preload::LAYOUT_DIR),
        "/lost+found",
        crate::config::SECRET_PATH,
    ]
    .map(|p| PathBuf::from(p.trim_start_matches('/')));
    compare_tree(&live.tree, dir, &|rel| rel == fstab || added.iter().any(|a| a == rel))?;
    if let Ok(secret) = fs::read(crate::config::SECRET_PATH) {
        if fs::read(dir.join(crate::config::SECRET_PATH.trim_start_matches('/'))).ok() != Some(secret) {
            bail!("the cluster secret read back from the new root is not this node's");
        }
    }
    if fs::read_to_string(dir.join(fstab))? != manifest.fstab {
        bail!("/etc/fstab read back from the new root is not the disk image's");
    }
    let pxe_dir = dir.join(crate::pxe::ARTIFACT_DIR.trim_start_matches('/'));
    for (file, sha) in &manifest.files {
        if sha256_file(&pxe_dir.join(file))? != *sha {
            bail!("{} read back from the new root does not match its sha256", file);
        }
    }
    if !same_content(&pxe_dir.join(format!("{}.squashfs", manifest.image)), &live.file)? {
        bail!("the squashfs read back from the new root is not the one this node booted");
    }
    let layout = dir.join(preload::LAYOUT_DIR.trim_start_matches('/'));
    for e in fs::read_dir(layout.join("blobs/sha256")).into_iter().flatten().flatten() {
        let hex = e.file_name().to_string_lossy().into_owned();
        if sha256_file(&e.path())? != hex {
            bail!("preloaded blob sha256:{hex} read back from the new root does not match its digest");
        }
    }
    Ok(())
}

/// Compares the tree at `b` with the one at `a`, skipping the relative paths `skip` names
/// (and what is below them).
pub fn compare_tree(a: &Path, b: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    let walk = |root: &Path| {
        let root = root.to_path_buf();
        walkdir::WalkDir::new(&root)
            .into_iter()
            .filter_entry(move |e| e.path().strip_prefix(&root).map_or(true, |r| r.as_os_str().is_empty() || !skip(r)))
    };
    for e in walk(a) {
        let e = e.with_context(|| format!("reading {}", a.display()))?;
        let rel = e.path().strip_prefix(a).expect("under a");
        let pb = b.join(rel);
        let ma = e.metadata()?;
        let mb = fs::symlink_metadata(&pb).with_context(|| format!("/{} is missing from the copy", rel.display()))?;
        let what = |m: &fs::Metadata| (m.mode(), m.uid(), m.gid());
        if what(&ma) != what(&mb) {
            bail!(
                "/{}: the copy has mode/owner {:o} {}:{}, the image {:o} {}:{}",
                rel.display(),
                mb.mode(),
                mb.uid(),
                mb.gid(),
                ma.mode(),
                ma.uid(),
                ma.gid()
            );
        }
        let ft = ma.file_type();
        // File capabilities (security.capability) and ACLs live here; cp does not say when it
        // could not keep them.
        if !ft.is_symlink() && xattrs(e.path())? != xattrs(&pb)? {
            bail!("/{}: the copy's extended attributes differ from the image's", rel.display());
        }
        if ft.is_symlink() {
            if fs::read_link(e.path())? != fs::read_link(&pb)? {
                bail!("/{}: the copy's link target differs", rel.display());
            }
        } else if ft.is_file() {
            if ma.len() != mb.len() || !same_content(e.path(), &pb)? {
                bail!("/{}: the copy's content differs from the image's", rel.display());
            }
        } else if !ft.is_dir() && ma.rdev() != mb.rdev() {
            bail!("/{}: the copy's device number differs", rel.display());
        }
    }
    // Nothing extra in the copy either.
    for e in walk(b) {
        let e = e.with_context(|| format!("reading {}", b.display()))?;
        let rel = e.path().strip_prefix(b).expect("under b");
        if fs::symlink_metadata(a.join(rel)).is_err() {
            bail!("/{} is in the copy but not in the image", rel.display());
        }
    }
    Ok(())
}

/// The extended attributes of `p` (not following a symlink), by name. A filesystem that holds
/// none (a squashfs made without an xattr table says "not supported") has none.
fn xattrs(p: &Path) -> Result<BTreeMap<std::ffi::OsString, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let names = match xattr::list(p) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing the extended attributes of {}", p.display())),
    };
    for name in names {
        let value = xattr::get(p, &name)?.unwrap_or_default();
        out.insert(name, value);
    }
    Ok(out)
}

/// Bytes of the regular files under `dir` (each hard-linked file once).
fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for e in walkdir::WalkDir::new(dir) {
        let m = e.with_context(|| format!("reading {}", dir.display()))?.metadata()?;
        if m.is_file() && seen.insert((m.dev(), m.ino())) {
            total += m.len();
        }
    }
    Ok(total)
}

/// Fetches netboot files from the master.
struct Fetcher {
    base: String,
    agent: crate::sys::http::Client,
}

impl Fetcher {
    fn new(base: &str) -> Self {
        let agent = crate::sys::http::Client::default();
        Fetcher { base: base.trim_end_matches('/').to_string(), agent }
    }

    /// Whether the master serves `<base>/<rel>` (of `size` bytes, if given), without fetching
    /// it; its length, if the master said.
    fn check(&self, rel: &str, size: Option<u64>) -> Result<Option<u64>> {
        let url = format!("{}/{rel}", self.base);
        let len = self
            .agent
            .get(&url)
            .context("the master does not serve it, which the install needs; nothing was written")?
            .len;
        if let (Some(want), Some(got)) = (size, len) {
            if want != got {
                bail!("{url} is {got} bytes, the image's index says {want}; is the master serving another build? Nothing was written");
            }
        }
        Ok(len)
    }

    /// `<base>/<rel>` into `to`, checked against `sha256`; nothing is left at `to` on failure.
    fn fetch_to(&self, rel: &str, sha256: &str, to: &Path) -> Result<()> {
        let url = format!("{}/{rel}", self.base);
        let mut body = self.agent.get(&url)?.reader;
        let tmp = to.with_extension("part");
        let mut out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = body.read(&mut buf).with_context(|| format!("reading {url}"))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        let got = hex::encode(h.finalize());
        if got != sha256 {
            drop(out);
            let _ = fs::remove_file(&tmp);
            bail!("{url} does not match the image's sha256 for it (got {got}, expected {sha256}); is the master serving another build?");
        }
        out.sync_all()?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
        fs::rename(&tmp, to)?;
        Ok(())
    }
}

fn sfdisk(dev: &str, script: &str) -> Result<()> {
    Cmd::new("sfdisk")
        .args(["--quiet", "--no-reread", "--wipe", "always"])
        .arg(dev)
        .stdin(script)
        .run()
        .context("writing the partition table")
        .map(drop)
}

fn mkfs_ext4(dev: &Path, f: &Ext4Format) -> Result<()> {
    Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-L", &f.label, "-U", &f.uuid, "-E"])
        .arg(format!("root_owner=0:0,hash_seed={}", f.uuid))
        .arg(dev)
        .run()
        .map(drop)
        .with_context(|| format!("making the {} filesystem", f.label))
}

/// Drops clean page cache, so what is read back comes from the disk.
fn drop_caches() {
    let _ = Cmd::new("sync").run();
    let _ = fs::write("/proc/sys/vm/drop_caches", "1\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_squashfs_live_boot_mounted_and_its_file() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("block/loop0/loop")).unwrap();
        fs::write(d.path().join("block/loop0/loop/backing_file"), "/run/live/medium/live/pxe-test.squashfs\n").unwrap();
        let mountinfo = "22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw,lowerdir=/run/live/rootfs/pxe-test.squashfs\n\
                         30 22 7:0 / /run/live/rootfs/pxe-test.squashfs ro,noatime shared:9 - squashfs /dev/loop0 ro,errors=continue\n";
        let r = live_root(mountinfo, d.path()).unwrap();
        assert_eq!(r.tree, Path::new("/run/live/rootfs/pxe-test.squashfs"));
        assert_eq!(r.file, Path::new("/run/live/medium/live/pxe-test.squashfs"));
        let err = live_root("22 1 0:21 / / rw - ext4 /dev/vda2 rw\n", d.path()).unwrap_err().to_string();
        assert!(err.contains("not netbooted"), "{err}");
    }

    #[test]
    fn the_base_url_is_where_the_squashfs_came_from() {
        assert_eq!(
            crate::pxe::base_url("boot=live fetch=http://10.0.0.1:9743/pxe/demo.squashfs ro").as_deref(),
            Some("http://10.0.0.1:9743/pxe")
        );
        assert_eq!(crate::pxe::base_url("root=PARTUUID=x ro"), None);
    }

    #[test]
    fn files_from_the_master_are_checked_and_nothing_is_left_of_a_bad_one() {
        let served = tempfile::tempdir().unwrap();
        fs::write(served.path().join("demo.efi"), b"a kernel image").unwrap();
        let base = format!("{}/pxe", crate::testhttp::serve(served.path().to_path_buf(), "/pxe"));
        let f = Fetcher::new(&base);
        let to = tempfile::tempdir().unwrap();
        let good = hex::encode(Sha256::digest(b"a kernel image"));
        f.fetch_to("demo.efi", &good, &to.path().join("uki.efi")).unwrap();
        assert_eq!(fs::read(to.path().join("uki.efi")).unwrap(), b"a kernel image");
        let err = f.fetch_to("demo.efi", &"0".repeat(64), &to.path().join("other.efi")).unwrap_err().to_string();
        assert!(err.contains("does not match") && err.contains("another build"), "{err}");
        let err = format!("{:#}", f.fetch_to("missing.efi", &good, &to.path().join("missing.efi")).unwrap_err());
        assert!(err.contains("missing.efi") && err.contains("404"), "{err}");
        assert_eq!(f.check("demo.efi", Some(14)).unwrap(), Some(14), "its length, as the master said");
        assert!(f.check("demo.efi", Some(15)).unwrap_err().to_string().contains("another build"));
        assert!(f.check("missing.efi", None).unwrap_err().to_string().contains("nothing was written"));
        let left: Vec<_> = fs::read_dir(to.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["uki.efi"], "no partial file is left behind");
    }

    #[test]
    fn the_manifest_must_be_there_and_of_this_schema() {
        let d = tempfile::tempdir().unwrap();
        let err = format!("{:#}", NetManifest::load(&d.path().join("netinstall.json")).unwrap_err());
        assert!(err.contains("pxe output"), "{err}");
        let m = NetManifest {
            schema_version: NET_SCHEMA_VERSION + 1,
            image: "demo".into(),
            input_hash: "ab".into(),
            disk_uuid: "u".into(),
            disk_size: 1,
            sfdisk: "label: gpt\n".into(),
            esp: VfatFormat { label: "LABFORGEESP".into(), volume_id: "0123abcd".into(), sectors_per_cluster: 1 },
            root: Ext4Format { label: "LABFORGE_ROOT".into(), uuid: "r".into() },
            state: Ext4Format { label: "LABFORGE_STATE".into(), uuid: "s".into() },
            uki_sha256: "00".into(),
            fstab: String::new(),
            files: BTreeMap::new(),
        };
        fs::write(d.path().join("netinstall.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        let err = NetManifest::load(&d.path().join("netinstall.json")).unwrap_err().to_string();
        assert!(err.contains("schema"), "{err}");
    }

    #[test]
    fn a_copy_is_compared_entry_by_entry() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            fs::create_dir_all(d.join("etc/x")).unwrap();
            fs::write(d.join("etc/x/f"), "same").unwrap();
            fs::write(d.join("etc/fstab"), if d == a.path() { "netboot" } else { "disk" }).unwrap();
            std::os::unix::fs::symlink("x/f", d.join("etc/l")).unwrap();
        }
        let skip_fstab = |r: &Path| r == Path::new("etc/fstab");
        compare_tree(a.path(), b.path(), &skip_fstab).unwrap();
        assert!(compare_tree(a.path(), b.path(), &|_| false).unwrap_err().to_string().contains("etc/fstab"));
        fs::write(b.path().join("etc/x/f"), "diff").unwrap();
        assert!(compare_tree(a.path(), b.path(), &skip_fstab).unwrap_err().to_string().contains("content differs"));
        fs::write(b.path().join("etc/x/f"), "same").unwrap();
        fs::set_permissions(b.path().join("etc/x/f"), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(compare_tree(a.path(), b.path(), &skip_fstab).unwrap_err().to_string().contains("mode/owner"));
        fs::set_permissions(
            b.path().join("etc/x/f"),
            fs::Permissions::from_mode(fs::metadata(a.path().join("etc/x/f")).unwrap().mode()),
        )
        .unwrap();
        fs::write(b.path().join("etc/extra"), "").unwrap();
        assert!(compare_tree(a.path(), b.path(), &skip_fstab).unwrap_err().to_string().contains("not in the image"));
        fs::remove_file(b.path().join("etc/extra")).unwrap();
        fs::remove_file(b.path().join("etc/l")).unwrap();
        assert!(compare_tree(a.path(), b.path(), &skip_fstab).unwrap_err().to_string().contains("missing"));
        std::os::unix::fs::symlink("elsewhere", b.path().join("etc/l")).unwrap();
        assert!(compare_tree(a.path(), b.path(), &skip_fstab).unwrap_err().to_string().contains("link target"));
        fs::remove_file(b.path().join("etc/l")).unwrap();
        std::os::unix::fs::symlink("x/f", b.path().join("etc/l")).unwrap();
        compare_tree(a.path(), b.path(), &skip_fstab).unwrap();
        // An extended attribute the copy lost (where this filesystem keeps user attributes).
        if xattr::set(a.path().join("etc/x/f"), "user.labforge", b"cap").is_ok() {
            assert!(compare_tree(a.path(), b.path(), &skip_fstab)
                .unwrap_err()
                .to_string()
                .contains("extended attributes"));
        }
    }
}
