//! Harness for booting labforge images in QEMU and checking what a user would see.

pub mod images;
pub mod lan;
pub mod vm;

use std::path::PathBuf;

/// The workspace root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}
