//! The CNI result cache after a power cut.
//!
//! libcni records each pod sandbox's network result in `/var/lib/cni/results/<network>-<id>-<if>`
//! without syncing it. A power cut shortly after a pod started leaves that file empty or cut
//! short, and from then on every attempt to stop the sandbox fails (`failed to get network
//! "labforge" cached result: decoding version from network config: unexpected end of JSON
//! input`): the pod stays `Terminating` for ever, and a Deployment that replaces its pods with
//! `Recreate` (Prometheus, on its claim) never starts the new one. The real room found this.
//!
//! Without its cache file libcni tears the sandbox down from the current network configuration,
//! which is all the bridge and host-local plugins need. So at every boot, before the node takes
//! part in a cluster, the agent removes the cache files that are not a JSON object — never a
//! valid one.

use std::path::{Path, PathBuf};

use tracing::warn;

/// libcni's cache of results, under the root.
pub const RESULTS_DIR: &str = "var/lib/cni/results";
/// A cache file is a few KiB: anything larger is not read whole, and is left alone.
const MAX_CACHE_FILE: u64 = 1 << 20;

/// Removes every unreadable cache file under `root`'s [`RESULTS_DIR`] and returns their paths.
pub fn repair(root: &Path) -> Vec<PathBuf> {
    let dir = root.join(RESULTS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if !meta.is_file() || meta.len() > MAX_CACHE_FILE {
            continue;
        }
        let valid = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v.is_object());
        if valid {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                warn!(
                    path = %path.display(),
                    "removed a CNI result cache file a power cut left unreadable (its pod's sandbox could not be stopped)"
                );
                removed.push(path);
            }
            Err(err) => warn!(path = %path.display(), "cannot remove an unreadable CNI result cache file: {err}"),
        }
    }
    removed.sort();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unreadable_cache_files_are_removed() {
        let root = tempfile::tempdir().unwrap();
        assert!(repair(root.path()).is_empty(), "no cache directory: nothing to do");
        let dir = root.path().join(RESULTS_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let good = r#"{"kind":"cniCacheV1","containerId":"c1","config":"e30=","ifName":"eth0","networkName":"labforge","result":{"cniVersion":"1.0.0"}}"#;
        std::fs::write(dir.join("labforge-c1-eth0"), good).unwrap();
        std::fs::write(dir.join("labforge-c2-eth0"), b"").unwrap();
        std::fs::write(dir.join("labforge-c3-eth0"), &good[..40]).unwrap();
        std::fs::write(dir.join("labforge-c4-eth0"), b"\0\0\0\0").unwrap();
        std::fs::create_dir(dir.join("a-directory")).unwrap();
        let removed = repair(root.path());
        let names: Vec<String> =
            removed.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["labforge-c2-eth0", "labforge-c3-eth0", "labforge-c4-eth0"]);
        assert_eq!(std::fs::read_to_string(dir.join("labforge-c1-eth0")).unwrap(), good, "a valid one is kept");
        assert!(dir.join("a-directory").is_dir());
        assert!(repair(root.path()).is_empty(), "a second boot finds nothing to repair");
    }
}
