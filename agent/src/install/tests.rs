use super::*;
use crate::disks::{Signature, BLUESTORE};
use rstest::rstest;

const GIB: u64 = 1 << 30;

fn disk(name: &str, size_gib: u64) -> DiskFacts {
    DiskFacts {
        name: name.into(),
        path: format!("/dev/{name}"),
        by_id: vec![format!("/dev/disk/by-id/virtio-{name}")],
        serial: Some(format!("SN-{name}")),
        size_bytes: size_gib * GIB,
        transport: Some("virtio".into()),
        ..Default::default()
    }
}

fn stick() -> DiskFacts {
    DiskFacts {
        transport: Some("usb".into()),
        partitions: vec!["sda1".into(), "sda2".into(), "sda3".into()],
        boot: vec!["holds /".into()],
        by_id: vec!["/dev/disk/by-id/usb-QEMU_STICK-0:0".into()],
        ..disk("sda", 16)
    }
}

fn with_data(d: DiskFacts) -> DiskFacts {
    DiskFacts { signatures: vec![Signature { kind: "ext4".into(), offset: 0x438, detail: None }], ..d }
}

fn osd(d: DiskFacts) -> DiskFacts {
    DiskFacts { signatures: vec![Signature { kind: BLUESTORE.into(), offset: 0, detail: Some("f00".into()) }], ..d }
}

fn none(_: &DiskFacts) -> Existing {
    Existing::default()
}

fn choose_with(disks: &[DiskFacts], target: Option<&str>) -> Choice {
    let cfg = InstallConfig { target: target.map(str::to_string), ..Default::default() };
    choose(disks, &cfg, 3 * GIB, &none)
}

fn installs(c: &Choice) -> &str {
    match c {
        Choice::Install { disk, .. } => disk,
        other => panic!("expected an install, got {other:?}"),
    }
}

fn refusal(c: &Choice) -> &str {
    match c {
        Choice::Refuse { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn picks_the_smallest_blank_internal_disk() {
    let disks = [stick(), disk("vda", 500), disk("vdb", 64), disk("vdc", 120)];
    assert_eq!(installs(&choose_with(&disks, None)), "vdb");
}

#[rstest]
#[case::only_the_stick(vec![stick()], "no disks is safe")]
#[case::data_disk(vec![stick(), with_data(disk("vda", 64))], "it holds data")]
#[case::ceph_osd(vec![stick(), osd(disk("vda", 64))], "it is a Ceph OSD")]
#[case::too_small_for_min_size(vec![stick(), disk("vda", 4)], "smaller than install min-size 8GiB")]
#[case::another_usb_disk(vec![stick(), DiskFacts { transport: Some("usb".into()), ..disk("sdb", 64) }], "it is removable")]
#[case::read_only(vec![stick(), DiskFacts { read_only: true, ..disk("vda", 64) }], "it is read-only")]
fn refuses_without_a_safe_target(#[case] disks: Vec<DiskFacts>, #[case] why: &str) {
    let r = choose_with(&disks, None).clone();
    let text = refusal(&r);
    if why == "no disks is safe" {
        assert!(text.contains("no disk is safe") && text.contains("it is the boot medium"), "{text}");
    } else {
        assert!(text.contains(why), "{text}");
    }
    assert!(text.contains("labforge.install-target=/dev/disk/by-id/"), "says what to pass: {text}");
    assert!(text.contains("nothing was written"), "{text}");
}

#[test]
fn a_named_target_may_hold_data_but_never_be_the_stick_or_an_osd() {
    let disks = [stick(), with_data(disk("vda", 64)), osd(disk("vdb", 64)), disk("vdc", 2)];
    assert_eq!(installs(&choose_with(&disks, Some("/dev/disk/by-id/virtio-vda"))), "vda");
    assert_eq!(installs(&choose_with(&disks, Some("serial:SN-vda"))), "vda");
    assert!(refusal(&choose_with(&disks, Some("/dev/disk/by-id/usb-QEMU_STICK-0:0"))).contains("boot medium"));
    assert!(refusal(&choose_with(&disks, Some("serial:SN-vdb"))).contains("Ceph OSD"));
    assert!(refusal(&choose_with(&disks, Some("serial:SN-vdc"))).contains("smaller (2GiB) than the image (3GiB)"));
    let gone = choose_with(&disks, Some("/dev/disk/by-id/virtio-nope"));
    assert!(refusal(&gone).contains("is not attached") && refusal(&gone).contains("virtio-vda"), "{gone:?}");
}

#[test]
fn a_complete_install_is_never_written_again_and_an_unfinished_one_is_redone() {
    let ours = with_data(disk("vda", 64));
    let disks = [stick(), ours, disk("vdb", 32)];
    let cfg = InstallConfig::default();
    let complete = |d: &DiskFacts| Existing { this_image: d.name == "vda", complete: d.name == "vda" };
    assert_eq!(
        choose(&disks, &cfg, 3 * GIB, &complete),
        Choice::Installed { disk: "/dev/disk/by-id/virtio-vda".into() }
    );
    let unfinished = |d: &DiskFacts| Existing { this_image: d.name == "vda", complete: false };
    // The unfinished copy is a candidate like a blank disk; the smaller blank one still wins.
    assert_eq!(installs(&choose(&disks, &cfg, 3 * GIB, &unfinished)), "vdb");
    assert_eq!(installs(&choose(&disks[..2], &cfg, 3 * GIB, &unfinished)), "vda");
}

#[rstest]
#[case("/dev/disk/by-id/ata-WDC_1234", true)]
#[case("serial:WD-1234", true)]
#[case("/dev/sda", false)]
#[case("/dev/disk/by-id/", false)]
#[case("serial:", false)]
fn targets_are_named_by_stable_names(#[case] t: &str, #[case] ok: bool) {
    assert_eq!(check_target_name(t).is_ok(), ok, "{t}");
}

#[test]
fn config_defaults_and_mode_words() {
    let c = InstallConfig::default();
    assert_eq!((c.mode, c.min_size, c.reboot, c.target), (InstallMode::Auto, Bytes(8 * GIB), true, None));
    assert_eq!("off".parse::<InstallMode>().unwrap(), InstallMode::Off);
    assert!("yes".parse::<InstallMode>().is_err());
    let c: InstallConfig = toml::from_str("mode = \"off\"\nmin-size = \"20GiB\"\n").unwrap();
    assert_eq!((c.mode, c.min_size), (InstallMode::Off, Bytes(20 * GIB)));
}
