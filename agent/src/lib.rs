//! labforge-agent: runs on every node at boot. See `daemon` for the tasks it runs and the README's
//! module map for where each concern lives.

pub mod blockcopy;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod disks;
pub mod heal;
pub mod install;
pub mod inventory;
pub mod preload;
pub mod pxe;
pub mod report;
pub mod secret;
pub mod server;
pub mod stack;
pub mod status;
pub mod sys;
pub mod system;
#[cfg(test)]
pub(crate) mod testhttp;
pub mod wire;

/// The systemd unit the builder installs for the agent.
pub const SYSTEMD_UNIT: &str = include_str!("../labforge-agent.service");
