//! Takes the disk inventory: `/sys/block` for the devices, udev's database for serial, model
//! and bus, `/dev/disk/by-id` for stable names, `/proc` for mounts and swap, the EFI variable
//! systemd-stub sets for the boot partition, `wipefs` (libblkid) for signatures, and our own
//! reads for BlueStore labels and stray data. Everything is read under [`Roots`], so tests run
//! it on a fixture tree whose "devices" are plain files.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{regions, DiskFacts, Signature, BLUESTORE, DATA, LABEL_OFFSETS};

/// systemd-stub's `LoaderDevicePartUUID` variable: the partition the firmware loaded us from.
const LOADER_PARTUUID_VAR: &str = "firmware/efi/efivars/LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// Mount points that make a disk the OS disk.
const OS_MOUNTS: &[&str] = &["/", "/usr", "/boot", "/boot/efi", "/efi", "/var/lib/labforge"];
/// The label of the optional config partition (see `config::partition`).
pub const CONFIG_LABEL: &str = "LABFORGE";

pub use crate::roots::Roots;

/// Every whole physical disk (not loop, ram, zram, device-mapper or md), sorted by name.
pub fn scan(roots: &Roots) -> Result<Vec<DiskFacts>> {
    let mut names: Vec<String> = fs::read_dir(roots.sys.join("block"))
        .with_context(|| format!("listing {}", roots.sys.join("block").display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("device").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mounts = Mounts::read(roots);
    let boot_partuuid = loader_partuuid(&roots.sys);
    Ok(names.iter().map(|n| disk(roots, n, &mounts, boot_partuuid.as_deref())).collect())
}

/// One disk by kernel name (fresh facts right before a zap).
pub fn one(roots: &Roots, name: &str) -> Result<DiskFacts> {
    if !roots.sys.join("block").join(name).join("device").exists() {
        bail!("disk {name} is gone");
    }
    Ok(disk(roots, name, &Mounts::read(roots), loader_partuuid(&roots.sys).as_deref()))
}

/// Any block device by kernel name, virtual ones (loop) included: what `labforge flash` checks
/// before writing to it.
pub fn block_device(roots: &Roots, name: &str) -> Result<DiskFacts> {
    if !roots.sys.join("block").join(name).exists() {
        bail!("{name} is not a whole disk (no /sys/block/{name})");
    }
    Ok(disk(roots, name, &Mounts::read(roots), loader_partuuid(&roots.sys).as_deref()))
}

fn disk(roots: &Roots, name: &str, mounts: &Mounts, boot_partuuid: Option<&str>) -> DiskFacts {
    let sys = roots.sys.join("block").join(name);
    let read = |p: &str| fs::read_to_string(sys.join(p)).map(|s| s.trim().to_string()).unwrap_or_default();
    let flag = |p: &str| read(p) == "1";
    let udev = udev_props(&roots.run, &read("dev"));
    let partitions = partitions(&sys);
    let mut holders = list(&sys.join("holders"));
    let mut devnums = vec![(read("dev"), name.to_string())];
    for p in &partitions {
        holders.extend(list(&sys.join(p).join("holders")));
        let dev = fs::read_to_string(sys.join(p).join("dev")).unwrap_or_default().trim().to_string();
        devnums.push((dev, p.clone()));
    }
    let mut mount_points: Vec<String> = Vec::new();
    for (dev, kname) in &devnums {
        mount_points.extend(mounts.by_dev.get(dev).into_iter().flatten().cloned());
        if mounts.swaps.contains(kname) {
            mount_points.push("[swap]".into());
        }
    }
    mount_points.sort();
    mount_points.dedup();

    let mut boot: Vec<String> =
        mount_points.iter().filter(|m| OS_MOUNTS.contains(&m.as_str())).map(|m| format!("holds {m}")).collect();
    for (dev, kname) in devnums.iter().skip(1) {
        let p = udev_props(&roots.run, dev);
        if let (Some(want), Some(uuid)) = (boot_partuuid, p.get("ID_PART_ENTRY_UUID")) {
            if uuid.eq_ignore_ascii_case(want) {
                boot.push(format!("holds {kname}, the partition the firmware booted from"));
            }
        }
        if p.get("ID_FS_LABEL").map(String::as_str) == Some(CONFIG_LABEL) {
            boot.push(format!("holds {kname}, the {CONFIG_LABEL} config partition"));
        }
    }
    if udev.get("ID_FS_LABEL").map(String::as_str) == Some(CONFIG_LABEL) {
        boot.push(format!("is the {CONFIG_LABEL} config medium"));
    }

    let size_bytes = read("size").parse::<u64>().unwrap_or(0) * 512;
    let path = roots.dev.join(name);
    let (signatures, probe_error) = match signatures(&path, size_bytes) {
        Ok(s) => (s, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let model = udev.get("ID_MODEL").cloned().or_else(|| Some(read("device/model")).filter(|m| !m.is_empty()));
    DiskFacts {
        name: name.to_string(),
        path: path.to_string_lossy().into_owned(),
        devnum: read("dev"),
        by_id: by_id_links(&roots.dev.join("disk/by-id"), name),
        serial: udev
            .get("ID_SERIAL_SHORT")
            .or_else(|| udev.get("ID_SERIAL"))
            .cloned()
            .or_else(|| Some(read("serial")).filter(|s| !s.is_empty())),
        model,
        size_bytes,
        rotational: flag("queue/rotational"),
        removable: flag("removable"),
        transport: transport(&sys, name, &udev),
        read_only: flag("ro"),
        discard: read("queue/discard_max_bytes").parse::<u64>().unwrap_or(0) > 0,
        partitions,
        signatures,
        holders,
        mounts: mount_points,
        boot,
        probe_error,
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn partitions(sys: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(sys)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .filter(|e| e.path().join("partition").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// udev's properties (`E:KEY=value` lines) for a block device `major:minor`.
fn udev_props(run: &Path, devnum: &str) -> BTreeMap<String, String> {
    let text = fs::read_to_string(run.join("udev/data").join(format!("b{devnum}"))).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("E:"))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The bus a disk hangs off: udev's `ID_BUS`, refined by the sysfs path (USB bridges often
/// present themselves as SCSI or ATA).
fn transport(sys: &Path, name: &str, udev: &BTreeMap<String, String>) -> Option<String> {
    let real = fs::canonicalize(sys).unwrap_or_default().to_string_lossy().into_owned();
    if real.contains("/usb") || udev.get("ID_PATH").is_some_and(|p| p.contains("-usb-")) {
        return Some("usb".into());
    }
    if let Some(bus) = udev.get("ID_BUS") {
        return Some(bus.clone());
    }
    [("nvme", "nvme"), ("vd", "virtio"), ("mmcblk", "mmc"), ("sd", "scsi")]
        .iter()
        .find(|(p, _)| name.starts_with(p))
        .map(|(_, t)| t.to_string())
}

/// The by-id links that point at `kname`, wwn first, then shortest.
pub fn by_id_links(dir: &Path, kname: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| fs::read_link(e.path()).ok().and_then(|t| t.file_name().map(|f| f == kname)).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort_by_key(|l| (!l.starts_with("wwn-"), l.len(), l.clone()));
    v.into_iter().map(|l| format!("/dev/disk/by-id/{l}")).collect()
}

/// Mount points by `major:minor`, and the kernel names of active swap devices.
#[derive(Default)]
struct Mounts {
    by_dev: BTreeMap<String, Vec<String>>,
    swaps: BTreeSet<String>,
}

impl Mounts {
    fn read(roots: &Roots) -> Self {
        let mut m = Mounts::default();
        for line in fs::read_to_string(roots.proc.join("self/mountinfo")).unwrap_or_default().lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 4 {
                m.by_dev.entry(f[2].to_string()).or_default().push(unescape(f[4]));
            }
        }
        for line in fs::read_to_string(roots.proc.join("swaps")).unwrap_or_default().lines().skip(1) {
            if let Some(dev) = line.split_whitespace().next() {
                let name = fs::canonicalize(dev).unwrap_or_else(|_| PathBuf::from(dev));
                if let Some(n) = name.file_name() {
                    m.swaps.insert(n.to_string_lossy().into_owned());
                }
            }
        }
        m
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The PARTUUID systemd-stub recorded for the partition the firmware booted from.
/// A partition (or a whole disk) labelled [`CONFIG_LABEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigCandidate {
    /// Its device node, e.g. `/dev/vda4`.
    pub device: PathBuf,
    /// The whole disk it is on, e.g. `vda`.
    pub disk: String,
    /// That disk holds the running root filesystem: the medium this PC booted from.
    pub on_boot_medium: bool,
}

/// Every device labelled [`CONFIG_LABEL`], whole disks in name order, and whether each is on
/// the medium this PC booted from: the disk whose partition is mounted at `/` (found by device
/// number, which no disk's content can fake, unlike a partition UUID copied with the image). A
/// netbooted PC, whose root is in memory, has none.
pub fn config_candidates(roots: &Roots) -> Vec<ConfigCandidate> {
    let mounts = Mounts::read(roots);
    let root_devs: BTreeSet<&String> =
        mounts.by_dev.iter().filter(|(_, points)| points.iter().any(|p| p == "/")).map(|(dev, _)| dev).collect();
    let mut names: Vec<String> = fs::read_dir(roots.sys.join("block"))
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let sys = roots.sys.join("block").join(&name);
        let devnum = |p: &Path| fs::read_to_string(p.join("dev")).map(|s| s.trim().to_string()).unwrap_or_default();
        let mut members = vec![(name.clone(), devnum(&sys))];
        for p in partitions(&sys) {
            let dev = devnum(&sys.join(&p));
            members.push((p, dev));
        }
        let on_boot_medium = members.iter().any(|(_, dev)| root_devs.contains(dev));
        for (kname, dev) in &members {
            let props = udev_props(&roots.run, dev);
            if props.get("ID_FS_LABEL").map(String::as_str) == Some(CONFIG_LABEL) {
                out.push(ConfigCandidate { device: roots.dev.join(kname), disk: name.clone(), on_boot_medium });
            }
        }
    }
    out
}

fn loader_partuuid(sys: &Path) -> Option<String> {
    let raw = fs::read(sys.join(LOADER_PARTUUID_VAR)).ok()?;
    // 4 bytes of attributes, then UTF-16LE text (NUL-terminated).
    let units: Vec<u16> =
        raw.get(4..)?.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|u| *u != 0).collect();
    Some(String::from_utf16_lossy(&units).trim().to_ascii_lowercase())
}

/// Every signature on the device: what libblkid knows (through `wipefs`, which lists all of
/// them, not just the first), BlueStore labels at each label offset, and, when neither found
/// anything, any non-zero byte in the regions a zap clears.
pub fn signatures(dev: &Path, size: u64) -> Result<Vec<Signature>> {
    let mut out = blkid_signatures(dev)?;
    let mut f = fs::File::open(dev).with_context(|| format!("opening {}", dev.display()))?;
    for off in LABEL_OFFSETS.iter().copied().filter(|o| o + 4096 <= size) {
        if let Some(fsid) = bluestore_label(&mut f, off)? {
            out.retain(|s| !(s.kind == "ceph_bluestore" && s.offset == off));
            out.push(Signature { kind: BLUESTORE.into(), offset: off, detail: Some(fsid) });
        }
    }
    if out.is_empty() {
        if let Some(off) = first_nonzero(&mut f, &regions(size))? {
            out.push(Signature {
                kind: DATA.into(),
                offset: off,
                detail: Some("non-zero bytes no known signature explains".into()),
            });
        }
    }
    out.sort_by_key(|s| (s.offset, s.kind.clone()));
    Ok(out)
}

/// The signatures libblkid finds on `dev` itself (`wipefs --json`, which only lists).
pub fn blkid_signatures(dev: &Path) -> Result<Vec<Signature>> {
    let out =
        crate::cmd::Cmd::new("wipefs").arg("--json").arg(dev).timeout(std::time::Duration::from_secs(120)).run()?;
    parse_wipefs(&out)
}

/// Parses `wipefs --json` (which prints nothing at all for a device without signatures on
/// some versions).
pub fn parse_wipefs(text: &str) -> Result<Vec<Signature>> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    #[derive(serde::Deserialize)]
    struct Out {
        signatures: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        offset: String,
        #[serde(rename = "type")]
        kind: String,
        uuid: Option<String>,
        label: Option<String>,
    }
    let o: Out = serde_json::from_str(text).context("reading wipefs --json")?;
    o.signatures
        .into_iter()
        .map(|e| {
            let offset = u64::from_str_radix(e.offset.trim_start_matches("0x"), 16)
                .with_context(|| format!("wipefs offset {:?}", e.offset))?;
            Ok(Signature { kind: e.kind, offset, detail: e.label.or(e.uuid) })
        })
        .collect()
}

/// BlueStore writes `"bluestore block device\n<osd uuid>\n"` at the start of its label.
const BLUESTORE_MAGIC: &[u8] = b"bluestore block device\n";

fn bluestore_label(f: &mut fs::File, off: u64) -> Result<Option<String>> {
    let mut buf = [0u8; 60];
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(&mut buf).with_context(|| format!("reading at offset {off}"))?;
    if !buf.starts_with(BLUESTORE_MAGIC) {
        return Ok(None);
    }
    let fsid = String::from_utf8_lossy(&buf[BLUESTORE_MAGIC.len()..BLUESTORE_MAGIC.len() + 36]).into_owned();
    Ok(Some(fsid))
}

/// The offset of the first non-zero byte in `regions`, if any.
fn first_nonzero(f: &mut fs::File, regions: &[(u64, u64)]) -> Result<Option<u64>> {
    let mut buf = vec![0u8; 1 << 20];
    for &(start, len) in regions {
        let mut done = 0;
        f.seek(SeekFrom::Start(start))?;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n]).with_context(|| format!("reading at offset {}", start + done))?;
            if let Some(i) = buf[..n].iter().position(|b| *b != 0) {
                return Ok(Some(start + done + i as u64));
            }
            done += n as u64;
        }
    }
    Ok(None)
}

/// Fake machines for tests (here, and in the agent with the `fixtures` feature): a `/sys`,
/// `/dev`, udev database and `/proc` under a temporary directory.
#[cfg(any(test, feature = "fixtures"))]
pub mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::process::Command;

    /// Writes a BlueStore-style label at `off`.
    pub fn write_label(path: &Path, off: u64, fsid: &str) {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(format!("bluestore block device\n{fsid}\n").as_bytes()).unwrap();
    }

    pub struct Fixture {
        _dir: tempfile::TempDir,
        pub roots: Roots,
    }

    impl Default for Fixture {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Fixture {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let r = |p: &str| dir.path().join(p);
            let roots = Roots { sys: r("sys"), dev: r("dev"), run: r("run"), proc: r("proc"), etc: r("etc") };
            for d in ["sys/block", "dev/disk/by-id", "run/udev/data", "proc/self", "sys/firmware/efi/efivars"] {
                fs::create_dir_all(r(d)).unwrap();
            }
            fs::write(r("proc/swaps"), "Filename Type Size Used Priority\n").unwrap();
            fs::write(r("proc/self/mountinfo"), "").unwrap();
            Fixture { _dir: dir, roots }
        }

        /// A disk whose device node is a sparse file of `size` bytes.
        pub fn disk(&self, name: &str, devnum: &str, size: u64, udev: &[&str]) -> PathBuf {
            let sys = self.roots.sys.join("block").join(name);
            fs::create_dir_all(sys.join("device")).unwrap();
            fs::create_dir_all(sys.join("queue")).unwrap();
            fs::create_dir_all(sys.join("holders")).unwrap();
            fs::write(sys.join("dev"), format!("{devnum}\n")).unwrap();
            fs::write(sys.join("size"), format!("{}\n", size / 512)).unwrap();
            fs::write(sys.join("removable"), "0\n").unwrap();
            fs::write(sys.join("ro"), "0\n").unwrap();
            fs::write(sys.join("queue/rotational"), "0\n").unwrap();
            fs::write(sys.join("queue/discard_max_bytes"), "0\n").unwrap();
            let mut props: String = udev.iter().map(|l| format!("E:{l}\n")).collect();
            props.push_str("G:systemd\n");
            fs::write(self.roots.run.join("udev/data").join(format!("b{devnum}")), props).unwrap();
            let dev = self.roots.dev.join(name);
            fs::File::create(&dev).unwrap().set_len(size).unwrap();
            dev
        }

        pub fn partition(&self, disk: &str, part: &str, devnum: &str, udev: &[&str]) {
            let sys = self.roots.sys.join("block").join(disk).join(part);
            fs::create_dir_all(sys.join("holders")).unwrap();
            fs::write(sys.join("partition"), "1\n").unwrap();
            fs::write(sys.join("dev"), format!("{devnum}\n")).unwrap();
            let props: String = udev.iter().map(|l| format!("E:{l}\n")).collect();
            fs::write(self.roots.run.join("udev/data").join(format!("b{devnum}")), props).unwrap();
        }

        pub fn by_id(&self, link: &str, target: &str) {
            symlink(format!("../../{target}"), self.roots.dev.join("disk/by-id").join(link)).unwrap();
        }

        pub fn set(&self, disk: &str, file: &str, value: &str) {
            fs::write(self.roots.sys.join("block").join(disk).join(file), value).unwrap();
        }
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A machine with six disks: the OS disk (root on its second partition, the ESP the
    /// firmware booted from), a blank data disk, ext4 straight on a disk, an OSD with a label
    /// copy at 1 GiB, a disk with only a stale copy there, and a USB stick with bytes at its end.
    pub fn six_disks() -> Fixture {
        let fx = Fixture::new();
        // OS disk: root mounted from its second partition, ESP the firmware booted from.
        fx.disk("vda", "254:0", 4 * GIB, &[]);
        fx.partition("vda", "vda1", "254:1", &["ID_PART_ENTRY_UUID=36a9bb5a-3861-4351-8a75-ead40190f4dd"]);
        fx.partition("vda", "vda2", "254:2", &[]);
        fs::write(
            fx.roots.proc.join("self/mountinfo"),
            "26 1 254:2 / / rw,relatime shared:1 - ext4 /dev/vda2 rw\n27 26 0:5 / /my\\040mnt rw - tmpfs tmpfs rw\n",
        )
        .unwrap();
        let mut var = vec![7, 0, 0, 0];
        var.extend("36A9BB5A-3861-4351-8A75-EAD40190F4DD\0".encode_utf16().flat_map(|u| u.to_le_bytes()));
        fs::write(fx.roots.sys.join(LOADER_PARTUUID_VAR), var).unwrap();
        // Blank data disk with a serial and two by-id names.
        fx.disk("sdb", "8:16", 20 * GIB, &["ID_SERIAL_SHORT=WD-123", "ID_MODEL=WDC_WD40", "ID_BUS=ata"]);
        fx.by_id("ata-WDC_WD40_WD-123", "sdb");
        fx.by_id("wwn-0x50014ee2", "sdb");
        fx.set("sdb", "queue/rotational", "1\n");
        // ext4 straight on the disk.
        let ext4 = fx.disk("sdc", "8:32", 64 * MIB, &["ID_BUS=ata"]);
        let ok = Command::new("mkfs.ext4").args(["-q", "-F", "-L", "photos"]).arg(&ext4).status().unwrap();
        assert!(ok.success());
        // An OSD with a label copy at 1 GiB, and a disk with only a stale copy there.
        let osd = fx.disk("sdd", "8:48", 2 * GIB, &[]);
        write_label(&osd, 0, "6f1c4b6e-0d4e-4a0e-9d55-2f0b3c6f8a11");
        write_label(&osd, GIB, "6f1c4b6e-0d4e-4a0e-9d55-2f0b3c6f8a11");
        let stale = fx.disk("sde", "8:64", 2 * GIB, &[]);
        write_label(&stale, GIB, "0a0a0a0a-0d4e-4a0e-9d55-2f0b3c6f8a11");
        // A USB stick (not flagged removable, as QEMU's usb-storage is not) and bytes at the end.
        let usb = fx.disk("sdf", "8:80", 8 * GIB, &["ID_PATH=pci-0000:00:14.0-usb-0:1:1.0-scsi-0:0:0:0", "ID_BUS=usb"]);
        {
            use std::io::Write;
            let mut f = fs::OpenOptions::new().write(true).open(&usb).unwrap();
            f.seek(SeekFrom::Start(8 * GIB - 10)).unwrap();
            f.write_all(b"x").unwrap();
        }

        fx
    }

    #[test]
    fn inventory_from_sys_udev_and_content() {
        let fx = six_disks();
        let disks = scan(&fx.roots).unwrap();
        let by = |n: &str| disks.iter().find(|d| d.name == n).unwrap().clone();
        let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["sdb", "sdc", "sdd", "sde", "sdf", "vda"]);

        let vda = by("vda");
        assert_eq!(vda.partitions, ["vda1", "vda2"]);
        assert_eq!(vda.mounts, ["/"]);
        assert_eq!(vda.boot, ["holds /", "holds vda1, the partition the firmware booted from"]);

        let sdb = by("sdb");
        assert_eq!(sdb.by_id, ["/dev/disk/by-id/wwn-0x50014ee2", "/dev/disk/by-id/ata-WDC_WD40_WD-123"]);
        assert_eq!(
            (sdb.serial.as_deref(), sdb.model.as_deref(), sdb.transport.as_deref()),
            (Some("WD-123"), Some("WDC_WD40"), Some("ata"))
        );
        assert!(sdb.rotational && !sdb.removable && sdb.signatures.is_empty() && sdb.probe_error.is_none());
        assert_eq!(sdb.size_bytes, 20 * GIB);

        let sdc = by("sdc");
        assert_eq!(sdc.signatures.len(), 1, "{:?}", sdc.signatures);
        assert_eq!(
            (sdc.signatures[0].kind.as_str(), sdc.signatures[0].offset, sdc.signatures[0].detail.as_deref()),
            ("ext4", 0x438, Some("photos"))
        );

        let sdd = by("sdd");
        let labels: Vec<(&str, u64)> = sdd.signatures.iter().map(|s| (s.kind.as_str(), s.offset)).collect();
        assert!(labels.contains(&(BLUESTORE, 0)) && labels.contains(&(BLUESTORE, GIB)), "{labels:?}");
        assert_eq!(
            sdd.signatures.iter().find(|s| s.offset == 0 && s.kind == BLUESTORE).unwrap().detail.as_deref(),
            Some("6f1c4b6e-0d4e-4a0e-9d55-2f0b3c6f8a11")
        );

        let sde = by("sde");
        assert_eq!(sde.signatures.iter().map(|s| (s.kind.as_str(), s.offset)).collect::<Vec<_>>(), [(BLUESTORE, GIB)]);

        let sdf = by("sdf");
        assert_eq!(sdf.transport.as_deref(), Some("usb"));
        assert_eq!(
            sdf.signatures,
            [Signature {
                kind: DATA.into(),
                offset: 8 * GIB - 10,
                detail: Some("non-zero bytes no known signature explains".into())
            }]
        );
    }

    #[test]
    fn an_unreadable_disk_is_reported_not_fatal() {
        let fx = Fixture::new();
        fx.disk("sdb", "8:16", 64 * MIB, &[]);
        fs::remove_file(fx.roots.dev.join("sdb")).unwrap();
        let d = &scan(&fx.roots).unwrap()[0];
        assert!(d.probe_error.as_deref().unwrap().contains("sdb"), "{d:?}");
    }

    #[test]
    fn config_medium_and_swap_count() {
        let fx = Fixture::new();
        fx.disk("sdb", "8:16", 64 * MIB, &[]);
        fx.partition("sdb", "sdb1", "8:17", &["ID_FS_LABEL=LABFORGE"]);
        fx.disk("sdc", "8:32", 64 * MIB, &[]);
        fx.partition("sdc", "sdc1", "8:33", &[]);
        let dev = fx.roots.dev.join("sdc1");
        fs::write(&dev, "").unwrap();
        fs::write(
            fx.roots.proc.join("swaps"),
            format!("Filename Type Size Used Priority\n{} partition 1 0 -2\n", dev.display()),
        )
        .unwrap();
        let disks = scan(&fx.roots).unwrap();
        assert_eq!(disks[0].boot, ["holds sdb1, the LABFORGE config partition"]);
        assert_eq!(disks[1].mounts, ["[swap]"]);
        // No boot medium is known (a netboot): the partition is found, and not on it.
        let c = config_candidates(&fx.roots);
        assert_eq!(c.len(), 1);
        assert!(!c[0].on_boot_medium && c[0].disk == "sdb" && c[0].device.ends_with("dev/sdb1"), "{c:?}");
    }

    #[test]
    fn a_config_partition_counts_only_on_the_boot_medium() {
        let fx = six_disks();
        // A LABFORGE partition on the OS disk (which holds the booted ESP), and a student's stick.
        fx.partition("vda", "vda4", "254:4", &["ID_FS_LABEL=LABFORGE"]);
        fx.disk("sdz", "8:240", 64 * MIB, &["ID_BUS=usb"]);
        fx.partition("sdz", "sdz1", "8:241", &["ID_FS_LABEL=LABFORGE"]);
        // The stick copies the boot ESP's partition UUID (any user can read it): still not the
        // boot medium, which is the disk holding `/`.
        fx.partition("sdz", "sdz2", "8:242", &["ID_PART_ENTRY_UUID=36a9bb5a-3861-4351-8a75-ead40190f4dd"]);
        let c = config_candidates(&fx.roots);
        let on: Vec<(&str, bool)> = c.iter().map(|c| (c.disk.as_str(), c.on_boot_medium)).collect();
        assert_eq!(on, [("sdz", false), ("vda", true)], "{c:?}");
    }

    #[test]
    fn wipefs_output_parses() {
        assert!(parse_wipefs("").unwrap().is_empty());
        let s = parse_wipefs(
            r#"{"signatures":[{"device":"x","offset":"0x218","type":"LVM2_member","uuid":"abc","label":null}]}"#,
        )
        .unwrap();
        assert_eq!(s, [Signature { kind: "LVM2_member".into(), offset: 0x218, detail: Some("abc".into()) }]);
        assert!(parse_wipefs("{").is_err());
    }
}
