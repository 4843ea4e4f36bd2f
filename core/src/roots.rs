//! Where the agent looks at the machine: `/sys`, `/dev`, `/run`, `/proc`, `/etc`. Tests point
//! these at directories they made.

use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Roots {
    pub sys: PathBuf,
    pub dev: PathBuf,
    /// udev's database lives under `<run>/udev/data`.
    pub run: PathBuf,
    pub proc: PathBuf,
    pub etc: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots { sys: "/sys".into(), dev: "/dev".into(), run: "/run".into(), proc: "/proc".into(), etc: "/etc".into() }
    }
}
