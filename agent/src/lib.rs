//! labforge-agent: runs on every node at boot.

pub mod blockcopy;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod disks;
pub mod election;
pub mod install;
pub mod inventory;
pub mod join;
pub mod kubeadm;
pub mod node;
pub mod preload;
pub mod pxe;
pub mod secret;
pub mod state;
pub mod status;
pub mod system;
#[cfg(test)]
pub(crate) mod testhttp;

/// The systemd unit the builder installs for the agent.
pub const SYSTEMD_UNIT: &str = include_str!("../labforge-agent.service");
