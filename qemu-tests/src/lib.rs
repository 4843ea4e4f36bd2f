//! Harness for booting labforge images in QEMU and checking what a user would see.

pub mod apiserver;
pub mod disks;
pub mod images;
pub mod kubernetes;
pub mod lan;
pub mod notebook_images;
pub mod notebooks;
pub mod notebooks_room;
pub mod registry;
pub mod rogue;
pub mod vm;

use std::path::PathBuf;

/// The workspace root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// Serialises VM-heavy scenarios: several multi-VM scenarios at once would overload a 2-core
/// machine. Held for the scenario's lifetime; works across test processes too.
pub fn exclusive() -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = workspace_root().join("target/qemu-tests");
    std::fs::create_dir_all(&dir)?;
    let f = std::fs::File::create(dir.join(".scenario.lock"))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", dir.display()))
}

/// Asks `check` every `every` until it answers `Ok`, for at most `within`. An `Err` means "not
/// yet" and says what was seen; the last one is in the error when time runs out. For a state
/// that can only be asked for (an API, a file on a VM); console lines have `Vm::wait_for_match`.
pub fn poll<T>(
    what: &str,
    within: std::time::Duration,
    every: std::time::Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(last) if std::time::Instant::now() > deadline => {
                anyhow::bail!("{what}: not within {within:?}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}
