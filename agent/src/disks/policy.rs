//! What to do with each disk: the classification of what a disk holds, and the decision the
//! spec's `[disks]` policy makes from it. Pure functions over [`DiskFacts`], table-tested; the
//! probing that fills the facts and the zap that acts on a decision live elsewhere.

use serde::{Deserialize, Serialize};

use super::DiskFacts;

pub use labforge_core::config::disks::{Bytes, DiskMatch, DisksConfig, SizeRange, Wipe};

/// What a disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Holds the running root, the state partition, the ESP or the boot media: never touched.
    Os,
    /// Removable or USB-attached: never touched unless the spec opts in.
    Removable,
    /// Carries a BlueStore label at offset 0: belongs to a Ceph cluster, never wiped.
    CephOsd,
    /// Any other signature, partition, holder, mount or non-zero data.
    HasData,
    /// Nothing on it: eligible.
    Blank,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Os => "os",
            Class::Removable => "removable",
            Class::CephOsd => "ceph-osd",
            Class::HasData => "has-data",
            Class::Blank => "blank",
        }
    }
}

/// A class and the facts that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub class: Class,
    pub reason: String,
    /// The OSD's fsid, for `ceph-osd` disks.
    pub osd_fsid: Option<String>,
}

/// Classifies a disk. Order matters: the OS disk is `os` whatever else it holds, a USB disk is
/// `removable` whatever it holds, and so on.
pub fn classify(d: &DiskFacts) -> Classified {
    if !d.boot.is_empty() {
        return Classified { class: Class::Os, reason: d.boot.join("; "), osd_fsid: None };
    }
    if d.removable || d.transport.as_deref() == Some("usb") {
        let why = if d.removable { "removable medium" } else { "attached over USB" };
        return Classified { class: Class::Removable, reason: why.into(), osd_fsid: None };
    }
    classify_content(d)
}

/// The class from the disk's content alone (what a removable disk counts as when the spec
/// opts in to removable disks).
pub fn classify_content(d: &DiskFacts) -> Classified {
    if let Some(l) = d.signatures.iter().find(|s| s.kind == super::BLUESTORE && s.offset == 0) {
        let fsid = l.detail.clone();
        let reason = format!("BlueStore label at offset 0 (osd fsid {})", fsid.as_deref().unwrap_or("unknown"));
        return Classified { class: Class::CephOsd, reason, osd_fsid: fsid };
    }
    let mut why = Vec::new();
    if let Some(e) = &d.probe_error {
        why.push(format!("could not be read ({e})"));
    }
    if !d.mounts.is_empty() {
        why.push(format!("mounted at {}", d.mounts.join(", ")));
    }
    if !d.holders.is_empty() {
        why.push(format!("in use by {}", d.holders.join(", ")));
    }
    if !d.partitions.is_empty() {
        why.push(format!("partitions {}", d.partitions.join(", ")));
    }
    if !d.signatures.is_empty() {
        let sigs: Vec<String> = d.signatures.iter().map(|s| s.to_string()).collect();
        why.push(format!("signatures: {}", sigs.join(", ")));
    }
    if why.is_empty() {
        Classified { class: Class::Blank, reason: "no partition, signature or data".into(), osd_fsid: None }
    } else {
        Classified { class: Class::HasData, reason: why.join("; "), osd_fsid: None }
    }
}

/// What the agent does with a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Left exactly as it is.
    Keep,
    /// Zapped now, then offered to Ceph.
    Zap,
    /// Offered to Ceph as it is (blank already, or an OSD this node prepared).
    Use,
}

/// The decision for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub class: Classified,
    pub action: Action,
    /// Listed in the `CephCluster`'s devices.
    pub ceph: bool,
    pub reason: String,
}

/// What the zap journal knows about a disk (see `journal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum History {
    /// Never zapped by this node.
    #[default]
    None,
    /// A zap was started and not finished (power cut, crash): resume it.
    Interrupted,
    /// Zapped and verified on an earlier boot.
    Zapped,
}

/// Decides what to do with one disk under the policy.
pub fn decide(d: &DiskFacts, cfg: &DisksConfig, history: History) -> Decision {
    let class = classify(d);
    let selected = cfg.select.as_ref().is_some_and(|m| m.matches(d));
    let keep = |class: Classified, reason: String| Decision { class, action: Action::Keep, ceph: false, reason };
    let content = match class.class {
        Class::Os => {
            let reason = if selected && cfg.wipe == Wipe::Force {
                "[disks.match] selects it, but it is the OS disk: never touched".to_string()
            } else {
                "the OS disk: never touched".to_string()
            };
            return keep(class, reason);
        }
        Class::Removable if !cfg.removable => {
            return keep(class, "removable: never touched (set [disks] removable = true to use removable disks)".into())
        }
        Class::Removable => classify_content(d),
        _ => class.clone(),
    };
    match content.class {
        Class::CephOsd => {
            // An OSD this node prepared stays listed (the CephCluster must not change across
            // reboots); one from elsewhere is reported, never touched, never offered.
            if history == History::Zapped {
                Decision {
                    class: content,
                    action: Action::Use,
                    ceph: true,
                    reason: "a Ceph OSD on a disk this node prepared: never wiped".into(),
                }
            } else {
                keep(content, "belongs to a Ceph cluster this node did not prepare: never wiped; add it to Ceph by hand if it is this cluster's".into())
            }
        }
        Class::Blank | Class::HasData => {
            if d.read_only {
                return keep(content, "read-only device".into());
            }
            if d.size_bytes < cfg.min_size.0 {
                return keep(content, format!("smaller than min-size {}", cfg.min_size));
            }
            if cfg.select.is_some() && !selected {
                return keep(content, "not selected by [disks.match]".into());
            }
            if history == History::Interrupted && cfg.wipe != Wipe::Never {
                return Decision {
                    class: content,
                    action: Action::Zap,
                    ceph: true,
                    reason: "resuming a zap interrupted on an earlier boot".into(),
                };
            }
            match (content.class, cfg.wipe) {
                (Class::Blank, _) if history == History::Zapped => {
                    Decision { class: content, action: Action::Use, ceph: true, reason: "zapped on an earlier boot and still blank".into() }
                }
                (Class::Blank, Wipe::Never) => {
                    Decision { class: content, action: Action::Use, ceph: true, reason: "blank; wipe = \"never\", so offered as it is".into() }
                }
                (Class::Blank, _) => Decision { class: content, action: Action::Zap, ceph: true, reason: "blank: zapped and offered to Ceph".into() },
                (Class::HasData, Wipe::Force) => Decision {
                    class: content,
                    action: Action::Zap,
                    ceph: true,
                    reason: "holds data, and wipe = \"force\" with [disks.match] selecting it: zapped and offered to Ceph".into(),
                },
                (_, w) => keep(
                    content,
                    format!(
                        "holds data; wipe = {:?} leaves it alone (to reuse it, set wipe = \"force\" with a [disks.match] that selects it)",
                        w.as_str()
                    ),
                ),
            }
        }
        Class::Os | Class::Removable => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disks::{Signature, BLUESTORE};
    use rstest::rstest;

    const GIB: u64 = 1 << 30;

    fn disk(name: &str) -> DiskFacts {
        DiskFacts {
            name: name.into(),
            path: format!("/dev/{name}"),
            devnum: "8:0".into(),
            by_id: vec![format!("/dev/disk/by-id/ata-DISK_{name}")],
            serial: Some(format!("SER{name}")),
            model: Some("DISK".into()),
            size_bytes: 100 * GIB,
            rotational: true,
            removable: false,
            transport: Some("ata".into()),
            read_only: false,
            discard: false,
            partitions: vec![],
            signatures: vec![],
            holders: vec![],
            mounts: vec![],
            boot: vec![],
            probe_error: None,
        }
    }

    fn sig(kind: &str, offset: u64) -> Signature {
        Signature { kind: kind.into(), offset, detail: (kind == BLUESTORE).then(|| "6f1c…".into()) }
    }

    fn with(mut d: DiskFacts, f: impl FnOnce(&mut DiskFacts)) -> DiskFacts {
        f(&mut d);
        d
    }

    #[rstest]
    #[case::blank(disk("sdb"), Class::Blank)]
    #[case::root(with(disk("sda"), |d| d.boot = vec!["holds /".into()]), Class::Os)]
    #[case::os_even_if_usb(with(disk("sda"), |d| { d.boot = vec!["boot media".into()]; d.transport = Some("usb".into()) }), Class::Os)]
    #[case::removable(with(disk("sdc"), |d| d.removable = true), Class::Removable)]
    #[case::usb(with(disk("sdc"), |d| d.transport = Some("usb".into())), Class::Removable)]
    #[case::usb_with_osd(with(disk("sdc"), |d| { d.transport = Some("usb".into()); d.signatures = vec![sig(BLUESTORE, 0)] }), Class::Removable)]
    #[case::osd(with(disk("sdb"), |d| d.signatures = vec![sig(BLUESTORE, 0), sig(BLUESTORE, GIB)]), Class::CephOsd)]
    #[case::stale_label_copy(with(disk("sdb"), |d| d.signatures = vec![sig(BLUESTORE, GIB)]), Class::HasData)]
    #[case::ext4(with(disk("sdb"), |d| d.signatures = vec![sig("ext4", 0x438)]), Class::HasData)]
    #[case::lvm(with(disk("sdb"), |d| d.signatures = vec![sig("LVM2_member", 0x218)]), Class::HasData)]
    #[case::gpt(with(disk("sdb"), |d| d.signatures = vec![sig("gpt", 0x200), sig("PMBR", 0x1fe)]), Class::HasData)]
    #[case::partitions_only(with(disk("sdb"), |d| d.partitions = vec!["sdb1".into()]), Class::HasData)]
    #[case::held(with(disk("sdb"), |d| d.holders = vec!["dm-0".into()]), Class::HasData)]
    #[case::mounted(with(disk("sdb"), |d| d.mounts = vec!["/mnt".into()]), Class::HasData)]
    #[case::unknown_bytes(with(disk("sdb"), |d| d.signatures = vec![sig(crate::disks::DATA, 4096)]), Class::HasData)]
    #[case::unreadable(with(disk("sdb"), |d| d.probe_error = Some("I/O error".into())), Class::HasData)]
    fn classifies(#[case] d: DiskFacts, #[case] want: Class) {
        assert_eq!(classify(&d).class, want, "{:?}", classify(&d));
    }

    #[test]
    fn osd_fsid_is_reported() {
        let d = with(disk("sdb"), |d| d.signatures = vec![sig(BLUESTORE, 0)]);
        assert_eq!(classify(&d).osd_fsid.as_deref(), Some("6f1c…"));
        assert!(classify(&d).reason.contains("6f1c…"));
    }

    fn cfg(text: &str) -> DisksConfig {
        let c: DisksConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        c
    }

    const FORCE: &str = "wipe = \"force\"\n[match]\nby-id = [\"/dev/disk/by-id/ata-DISK_*\"]\n";

    #[rstest]
    #[case::blank_default(disk("sdb"), "", History::None, Action::Zap, true)]
    #[case::blank_never(disk("sdb"), "wipe = \"never\"", History::None, Action::Use, true)]
    #[case::blank_again(disk("sdb"), "", History::Zapped, Action::Use, true)]
    #[case::small(with(disk("sdb"), |d| d.size_bytes = GIB), "", History::None, Action::Keep, false)]
    #[case::read_only(with(disk("sdb"), |d| d.read_only = true), FORCE, History::None, Action::Keep, false)]
    #[case::data_default(with(disk("sdb"), |d| d.signatures = vec![sig("ext4", 0x438)]), "", History::None, Action::Keep, false)]
    #[case::data_force(with(disk("sdb"), |d| d.signatures = vec![sig("ext4", 0x438)]), FORCE, History::None, Action::Zap, true)]
    #[case::data_force_unselected(with(disk("sdb"), |d| { d.signatures = vec![sig("ext4", 0x438)]; d.by_id = vec!["/dev/disk/by-id/nvme-X".into()] }), FORCE, History::None, Action::Keep, false)]
    #[case::os_force_selected(with(disk("sda"), |d| d.boot = vec!["holds /".into()]), FORCE, History::None, Action::Keep, false)]
    #[case::osd_force_selected(with(disk("sdb"), |d| d.signatures = vec![sig(BLUESTORE, 0)]), FORCE, History::None, Action::Keep, false)]
    #[case::osd_interrupted(with(disk("sdb"), |d| d.signatures = vec![sig(BLUESTORE, 0)]), FORCE, History::Interrupted, Action::Keep, false)]
    #[case::own_osd(with(disk("sdb"), |d| d.signatures = vec![sig(BLUESTORE, 0)]), "", History::Zapped, Action::Use, true)]
    #[case::usb_force_selected(with(disk("sdc"), |d| d.transport = Some("usb".into())), FORCE, History::None, Action::Keep, false)]
    #[case::usb_opted_in(with(disk("sdc"), |d| d.transport = Some("usb".into())), "removable = true", History::None, Action::Zap, true)]
    #[case::resume_partial(with(disk("sdb"), |d| d.signatures = vec![sig(crate::disks::DATA, GIB)]), "", History::Interrupted, Action::Zap, true)]
    #[case::no_resume_under_never(with(disk("sdb"), |d| d.signatures = vec![sig(crate::disks::DATA, GIB)]), "wipe = \"never\"", History::Interrupted, Action::Keep, false)]
    #[case::blank_unselected(with(disk("sdb"), |d| d.by_id = vec![]), "[match]\nsize = \"50GiB..\"\nby-id = [\"/dev/disk/by-id/ata-*\"]", History::None, Action::Keep, false)]
    #[case::size_match(
        disk("sdb"),
        "wipe = \"force\"\n[match]\nsize = \"90GiB..110GiB\"",
        History::None,
        Action::Zap,
        true
    )]
    fn decides(
        #[case] d: DiskFacts,
        #[case] policy: &str,
        #[case] history: History,
        #[case] action: Action,
        #[case] ceph: bool,
    ) {
        let got = decide(&d, &cfg(policy), history);
        assert_eq!((got.action, got.ceph), (action, ceph), "{got:?}");
        assert!(!got.reason.is_empty());
    }

    #[test]
    fn the_os_disk_is_named_when_a_match_selects_it() {
        let d = with(disk("sda"), |d| d.boot = vec!["holds /".into()]);
        let got = decide(&d, &cfg(FORCE), History::None);
        assert!(got.reason.contains("selects it, but it is the OS disk"), "{}", got.reason);
    }

    #[rstest]
    #[case("wipe = \"force\"", "needs a [disks.match]")]
    #[case("wipe = \"force\"\n[match]\nby-id = [\"/dev/disk/by-id/*\"]", "selects every disk")]
    #[case("wipe = \"force\"\n[match]\nby-id = [\"/dev/disk/by-id/*-*\"]", "selects every disk")]
    #[case("[match]\nby-id = [\"ata-*\"]", "must start with /dev/disk/by-id/")]
    #[case("[match]\nby-id = [\"/dev/disk/by-id/[\"]", "not a valid glob")]
    #[case("[match]\nsize = \"..\"", "selects every disk")]
    #[case("[match]\n", "is empty")]
    fn rejects_policies_that_could_hurt(#[case] text: &str, #[case] why: &str) {
        let c: DisksConfig = toml::from_str(text).unwrap();
        let err = format!("{:#}", c.validate().unwrap_err());
        assert!(err.contains(why), "{err}");
    }

    #[rstest]
    #[case("wipe = \"sometimes\"", "unknown variant")]
    #[case("min-size = \"10\"", "unit")]
    #[case("[match]\nsize = \"2TiB..1TiB\"", "minimum is above")]
    #[case("[match]\nsize = \"1TiB\"", "MIN..MAX")]
    fn rejects_bad_values(#[case] text: &str, #[case] why: &str) {
        let err = toml::from_str::<DisksConfig>(text).unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
    }

    #[test]
    fn sizes_round_trip() {
        let c = cfg("min-size = \"512MiB\"\n[match]\nsize = \"900GB..2TiB\"");
        assert_eq!(c.min_size, Bytes(512 << 20));
        let r = c.select.as_ref().unwrap().size.unwrap();
        assert!(r.contains(900_000_000_000) && r.contains(2 << 40) && !r.contains((2 << 40) + 1));
        let back: DisksConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    /// The probe's six-disk machine, as the probe reads it, gets one class per disk.
    #[test]
    fn scanned_disks_are_classified() {
        let fx = crate::disks::probe::tests::six_disks();
        let disks = crate::disks::probe::scan(&fx.roots).unwrap();
        let classes: Vec<Class> = disks.iter().map(|d| classify(d).class).collect();
        assert_eq!(
            classes,
            [Class::Blank, Class::HasData, Class::CephOsd, Class::HasData, Class::Removable, Class::Os]
        );
    }

    #[test]
    fn an_unreadable_disk_has_data() {
        let fx = crate::disks::probe::tests::Fixture::new();
        fx.disk("sdb", "8:16", 64 << 20, &[]);
        std::fs::remove_file(fx.roots.dev.join("sdb")).unwrap();
        let d = &crate::disks::probe::scan(&fx.roots).unwrap()[0];
        assert!(d.probe_error.is_some());
        assert_eq!(classify(d).class, Class::HasData);
    }
}
