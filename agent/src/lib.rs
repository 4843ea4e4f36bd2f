//! labforge-agent: runs on every node at boot. See `daemon` for the tasks it runs and the README's
//! module map for where each concern lives.

pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod disks;
pub mod heal;
pub mod install;
pub mod inventory;
pub mod network;
pub mod portal;
pub mod preload;
pub mod pxe;
pub mod report;
pub mod server;
pub mod stack;
pub mod status;
pub mod sys;
pub mod system;
#[cfg(test)]
pub(crate) mod testhttp;

pub use labforge_core::{blockcopy, secret, wire, wire_enum};

/// The systemd unit the builder installs for the agent.
pub const SYSTEMD_UNIT: &str = labforge_core::layout::AGENT_UNIT;
