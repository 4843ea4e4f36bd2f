use super::*;
use rstest::rstest;
use std::os::unix::fs::FileExt;

fn facts(removable: bool, transport: &str) -> DiskFacts {
    DiskFacts {
        name: "sdb".into(),
        path: "/dev/sdb".into(),
        model: Some("Stick".into()),
        size_bytes: 16 << 30,
        removable,
        transport: Some(transport.into()),
        ..Default::default()
    }
}

#[rstest]
#[case::usb_stick(facts(false, "usb"), false, None)]
#[case::sd_card(facts(false, "mmc"), false, None)]
#[case::removable_flag(facts(true, "scsi"), false, None)]
#[case::internal_disk(facts(false, "ata"), false, Some("is not a removable disk"))]
#[case::internal_disk_forced(facts(false, "ata"), true, None)]
#[case::mounted(DiskFacts { mounts: vec!["/media/stick".into()], ..facts(false, "usb") }, false, Some("mounted at /media/stick"))]
#[case::mounted_forced(DiskFacts { mounts: vec!["/media/stick".into()], ..facts(false, "usb") }, true, None)]
#[case::held(DiskFacts { holders: vec!["dm-0".into()], ..facts(false, "usb") }, false, Some("held by dm-0"))]
#[case::read_only(DiskFacts { read_only: true, ..facts(false, "usb") }, true, Some("read-only"))]
#[case::too_small(DiskFacts { size_bytes: 1 << 30, ..facts(false, "usb") }, true, Some("use a larger stick"))]
#[case::host_system_disk(DiskFacts { boot: vec!["holds /".into()], ..facts(false, "ata") }, true, Some("this host's system disk"))]
fn refuses_what_would_surprise(#[case] d: DiskFacts, #[case] force: bool, #[case] want: Option<&str>) {
    let got = refusal(&d, 2 << 30, force);
    match (want, &got) {
        (None, None) => {}
        (Some(w), Some(g)) => assert!(g.contains(w) && g.contains("/dev/sdb"), "{g}"),
        _ => panic!("want {want:?}, got {got:?}"),
    }
}

/// An 8 MiB sparse image with data at 0 and 6 MiB, its block map, and its `.zst`.
struct Fixture {
    dir: tempfile::TempDir,
    img: PathBuf,
    data: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("t.img");
        let mut data = vec![0u8; 8 << 20];
        for (i, b) in data[..300_000].iter_mut().enumerate() {
            *b = (i * 7 % 253) as u8;
        }
        data[6 << 20..(6 << 20) + 8192].fill(0x5A);
        let f = File::create(&img).unwrap();
        f.set_len(data.len() as u64).unwrap();
        f.write_all_at(&data[..300_000], 0).unwrap();
        f.write_all_at(&data[6 << 20..(6 << 20) + 8192], 6 << 20).unwrap();
        drop(f);
        fs::write(dir.path().join("t.img.bmap"), crate::bmap::create(&img).unwrap()).unwrap();
        crate::build::outputs::zstd(&img, &dir.path().join("t.img.zst")).unwrap();
        Fixture { dir, img, data }
    }
    fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }
    /// A file standing in for a stick that held other data.
    fn stick(&self, len: usize) -> PathBuf {
        let p = self.path("stick");
        fs::write(&p, vec![0xEEu8; len]).unwrap();
        p
    }
    fn opts(&self, image: &str, target: &Path) -> FlashOptions {
        FlashOptions { image: self.path(image), target: target.to_path_buf(), bmap: None, no_bmap: false, force: false }
    }
}

fn roots() -> probe::Roots {
    probe::Roots::default()
}

#[rstest]
#[case::raw("t.img")]
#[case::zstd("t.img.zst")]
fn writes_the_mapped_blocks_and_verifies(#[case] image: &str) {
    let fx = Fixture::new();
    let stick = fx.stick(12 << 20);
    let done = flash(&fx.opts(image, &stick), &roots()).unwrap();
    assert_eq!(done.bmap.as_deref(), Some(fx.path("t.img.bmap").as_path()));
    assert_eq!(done.image_bytes, 8 << 20);
    // Two 4 KiB-rounded runs: 300000 bytes → 74 blocks, and 2 blocks at 6 MiB.
    assert_eq!(done.written_bytes, 74 * 4096 + 8192);
    assert!(done.verified);
    let out = fs::read(&stick).unwrap();
    assert_eq!(&out[..74 * 4096], &fx.data[..74 * 4096]);
    assert_eq!(&out[6 << 20..(6 << 20) + 8192], &fx.data[6 << 20..(6 << 20) + 8192]);
    // Blocks the map leaves out keep what the stick held.
    assert!(out[(1 << 20)..(2 << 20)].iter().all(|b| *b == 0xEE));
    assert_eq!(out.len(), 12 << 20);
}

#[test]
fn without_a_block_map_writes_what_the_file_holds() {
    let fx = Fixture::new();
    fs::remove_file(fx.path("t.img.bmap")).unwrap();
    let stick = fx.stick(8 << 20);
    let done = flash(&fx.opts("t.img.zst", &stick), &roots()).unwrap();
    assert_eq!(done.bmap, None);
    assert_eq!(done.written_bytes, 8 << 20, "a compressed image without a map is written whole");
    assert_eq!(fs::read(&stick).unwrap(), fx.data);
}

#[test]
fn a_smaller_file_target_grows_to_the_image() {
    let fx = Fixture::new();
    let stick = fx.stick(4096);
    flash(&fx.opts("t.img", &stick), &roots()).unwrap();
    assert_eq!(fs::metadata(&stick).unwrap().len(), 8 << 20);
}

#[test]
fn a_block_map_from_another_build_is_refused_before_writing() {
    let fx = Fixture::new();
    let other = fx.path("other.img");
    let f = File::create(&other).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(&[1], 0).unwrap();
    fs::write(fx.path("other.bmap"), crate::bmap::create(&other).unwrap()).unwrap();
    let stick = fx.stick(12 << 20);
    let mut o = fx.opts("t.img", &stick);
    o.bmap = Some(fx.path("other.bmap"));
    let e = format!("{:#}", flash(&o, &roots()).unwrap_err());
    assert!(e.contains("different builds") && e.contains("--bmap"), "{e}");
    assert!(fs::read(&stick).unwrap().iter().all(|b| *b == 0xEE), "nothing written");
}

#[test]
fn an_edited_block_map_is_refused_before_writing() {
    let fx = Fixture::new();
    let map = fx.path("t.img.bmap");
    let text = fs::read_to_string(&map).unwrap().replacen("> 0-", "> 1-", 1);
    fs::write(&map, text).unwrap();
    let stick = fx.stick(12 << 20);
    let e = format!("{:#}", flash(&fx.opts("t.img", &stick), &roots()).unwrap_err());
    assert!(e.contains("checksum does not match"), "{e}");
    assert!(fs::read(&stick).unwrap().iter().all(|b| *b == 0xEE), "nothing written");
}

#[test]
fn a_damaged_image_fails_naming_the_range() {
    let fx = Fixture::new();
    File::options().write(true).open(&fx.img).unwrap().write_all_at(&[1], (6 << 20) + 100).unwrap();
    let stick = fx.stick(12 << 20);
    let e = format!("{:#}", flash(&fx.opts("t.img", &stick), &roots()).unwrap_err());
    assert!(e.contains("damaged") && e.contains(&format!("{}..", 6 << 20)), "{e}");
}

#[test]
fn a_missing_device_is_not_created() {
    let fx = Fixture::new();
    let stick = fx.path("sdz");
    let e = format!("{:#}", flash(&fx.opts("t.img", &stick), &roots()).unwrap_err());
    assert!(e.contains("does not exist") && e.contains("lsblk"), "{e}");
    assert!(!stick.exists());
}

#[test]
fn finds_the_block_map_beside_either_image() {
    let fx = Fixture::new();
    assert_eq!(default_bmap(&fx.path("t.img")), Some(fx.path("t.img.bmap")));
    assert_eq!(default_bmap(&fx.path("t.img.zst")), Some(fx.path("t.img.bmap")));
    assert_eq!(default_bmap(&fx.path("none.img")), None);
}
