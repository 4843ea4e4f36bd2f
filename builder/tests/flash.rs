//! `labforge flash` through the binary onto a real block device: a loop device is a
//! non-removable disk to the kernel, so it must be refused without `--force` (and left
//! untouched), and written and verified with it.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A loop device over a file, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn attach(file: &Path) -> Self {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(file).output().expect("losetup (util-linux)");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Loop { dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()) }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn flash(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_labforge")).arg("flash").args(args).env("RUST_LOG", "info").output().unwrap()
}

#[test]
fn a_non_removable_block_device_needs_force() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("t.img");
    let f = File::create(&img).unwrap();
    f.set_len(8 << 20).unwrap();
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
    f.write_all_at(&payload, 1 << 20).unwrap();
    drop(f);
    fs::write(d.path().join("t.img.bmap"), labforge::bmap::create(&img).unwrap()).unwrap();

    let backing = d.path().join("disk");
    fs::write(&backing, vec![0xC3u8; 16 << 20]).unwrap();
    let lo = Loop::attach(&backing);

    let out = flash(&[img.as_os_str(), lo.dev.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a removable disk") && err.contains("--force"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "one message: {err}");
    assert!(fs::read(&backing).unwrap().iter().all(|b| *b == 0xC3), "refused device untouched");

    let out = flash(&[img.as_os_str(), lo.dev.as_os_str(), "--force".as_ref(), "--json".as_ref()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true);
    assert_eq!(report["image_bytes"], 8 << 20);
    assert_eq!(report["written_bytes"], 1_003_520, "245 blocks of 4 KiB hold the payload");
    let disk = fs::read(&backing).unwrap();
    assert_eq!(&disk[1 << 20..(1 << 20) + payload.len()], &payload[..]);
    assert!(disk[..1 << 20].iter().all(|b| *b == 0xC3), "unmapped blocks not written");
}
