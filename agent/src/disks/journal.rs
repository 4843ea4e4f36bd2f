//! `/var/lib/labforge/disks.json`: what this node did to its disks. The intent to zap a disk is
//! saved before the first byte is written and the result after, so a power cut mid-zap resumes
//! that disk (and only it) on the next boot, and a disk zapped once is never zapped again.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::History;
use crate::sys::fs::write_durable;

pub const FILE: &str = "disks.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZapState {
    /// Started, not finished.
    Zapping,
    /// Finished and verified.
    Zapped,
    /// Failed; retried on the next boot if the policy still allows it.
    Failed,
}

/// One disk's zap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZapRecord {
    pub state: ZapState,
    /// Kernel name and size when the zap started (a different size means a different disk).
    pub name: String,
    pub size_bytes: u64,
    /// The agent's boot counter when the zap started and when it last changed.
    pub started_boot: u64,
    pub boot: u64,
    /// Steps done, in order (see `zap`).
    pub steps: Vec<String>,
    /// Times a zap of this disk was started.
    pub attempts: u32,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct File {
    version: u32,
    disks: BTreeMap<String, ZapRecord>,
}

pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// The journal in `state_dir`; an unreadable one is an error (forgetting an interrupted zap
    /// is safe, but forgetting which disks we prepared would stop listing their OSDs).
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(FILE);
        let file = match fs::read(&path) {
            Ok(b) => {
                let f: File = serde_json::from_slice(&b)
                    .with_context(|| format!("disk journal {} is unreadable", path.display()))?;
                if f.version != VERSION {
                    bail!("disk journal {} has version {}, this agent reads {VERSION}", path.display(), f.version);
                }
                f
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File { version: VERSION, disks: BTreeMap::new() },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Journal { path, file })
    }

    pub fn get(&self, id: &str) -> Option<&ZapRecord> {
        self.file.disks.get(id)
    }

    /// What the journal says about the disk with this id and size.
    pub fn history(&self, id: Option<&str>, size: u64) -> History {
        match id.and_then(|i| self.get(i)).filter(|r| r.size_bytes == size) {
            Some(r) if r.state == ZapState::Zapped => History::Zapped,
            Some(_) => History::Interrupted,
            None => History::None,
        }
    }

    /// Records the intent to zap, before anything is written.
    pub fn begin(&mut self, id: &str, name: &str, size: u64, boot: u64) -> Result<()> {
        let attempts = self.get(id).filter(|r| r.state != ZapState::Zapped).map_or(0, |r| r.attempts);
        let started_boot = self.get(id).filter(|r| r.state != ZapState::Zapped).map_or(boot, |r| r.started_boot);
        self.file.disks.insert(
            id.to_string(),
            ZapRecord {
                state: ZapState::Zapping,
                name: name.into(),
                size_bytes: size,
                started_boot,
                boot,
                steps: vec![],
                attempts: attempts + 1,
                error: None,
            },
        );
        self.save()
    }

    pub fn step(&mut self, id: &str, step: &str) -> Result<()> {
        let r = self.file.disks.get_mut(id).context("zap step without a record")?;
        r.steps.push(step.into());
        if step == "verified" {
            r.state = ZapState::Zapped;
        }
        self.save()
    }

    pub fn fail(&mut self, id: &str, error: &str) -> Result<()> {
        let r = self.file.disks.get_mut(id).context("zap failure without a record")?;
        r.state = ZapState::Failed;
        r.error = Some(error.into());
        self.save()
    }

    fn save(&self) -> Result<()> {
        write_durable(&self.path, &serde_json::to_vec_pretty(&self.file)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_survives_and_resumes() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::load(d.path()).unwrap();
        assert_eq!(j.history(Some("a"), 10), History::None);
        j.begin("a", "vdb", 10, 1).unwrap();
        j.step("a", "wipefs").unwrap();
        // Power cut: a new agent reads the file.
        let mut j = Journal::load(d.path()).unwrap();
        assert_eq!(j.history(Some("a"), 10), History::Interrupted);
        assert_eq!(j.history(Some("a"), 11), History::None, "another size is another disk");
        assert_eq!(j.history(None, 10), History::None);
        j.begin("a", "vdc", 10, 2).unwrap();
        j.step("a", "verified").unwrap();
        let j = Journal::load(d.path()).unwrap();
        let r = j.get("a").unwrap();
        assert_eq!((r.attempts, r.started_boot, r.boot, r.state.clone()), (2, 1, 2, ZapState::Zapped));
        assert_eq!(j.history(Some("a"), 10), History::Zapped);
    }

    #[test]
    fn a_corrupt_journal_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(FILE), "{").unwrap();
        assert!(format!("{:#}", Journal::load(d.path()).err().unwrap()).contains("unreadable"));
    }
}
