//! `/var/lib/labforge/state.json`: what this node has committed to, kept across power cuts.
//! Written tmp → fsync → rename → fsync dir, so after a cut at any instant the file is either
//! the old state or the new one.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cluster::election::Allegiance;
use crate::cluster::join::JoinInfo;

pub const FILE: &str = "state.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// Times the agent has started on this node.
    pub boots: u64,
    /// Master claim, followed cluster, or refusal (see `election`).
    pub allegiance: Allegiance,
    /// `kubeadm init` finished on this node (master).
    pub initialised: bool,
    /// `kubeadm join` finished on this node (worker).
    pub joined: bool,
    /// Join info: minted by the master, received by a worker.
    pub join_info: Option<JoinInfo>,
    /// The LAN this master serves (a room with no DHCP server): it takes the network's first
    /// address on this interface at every boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_lan: Option<ServedLanState>,
}

/// What a master serving its LAN remembers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedLanState {
    /// `lan-cidr` when it first served.
    pub cidr: String,
    pub interface: String,
}

pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Self {
        Store { path: dir.join(FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; a fresh one when there is none. A file that cannot be read is an
    /// error, never silently replaced: forgetting a cluster could make a second one.
    pub fn load(&self) -> Result<State> {
        match fs::read(&self.path) {
            Ok(bytes) => {
                let s: State = serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "state file {} is unreadable; move it aside only if this node should forget its cluster",
                        self.path.display()
                    )
                })?;
                if s.version != VERSION {
                    bail!("state file {} has version {}, this agent reads {VERSION}", self.path.display(), s.version);
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State { version: VERSION, ..State::default() }),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    pub fn save(&self, state: &State) -> Result<()> {
        // It holds the join info, bootstrap token included: readable by root only.
        crate::sys::fs::write_durable_mode(&self.path, &serde_json::to_vec_pretty(state)?, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_atomically() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        let mut s = store.load().unwrap();
        assert_eq!(s.boots, 0);
        s.boots = 3;
        s.allegiance = Allegiance::Master { uid: "u".into(), committed: true };
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        let names: Vec<_> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE)], "no temp file left");
    }

    #[test]
    fn a_corrupt_state_is_an_error_not_a_reset() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(FILE), "{\"version\":1,\"boo").unwrap();
        let err = format!("{:#}", Store::new(d.path()).load().unwrap_err());
        assert!(err.contains("unreadable"), "{err}");
    }
}
