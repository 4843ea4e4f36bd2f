//! labforge: builds bootable lab-cluster disk images from a TOML image spec.

pub mod bmap;
pub mod build;
pub mod cli;
pub mod cmd;
pub mod flash;
pub mod hostcheck;
pub mod inspect;
pub mod interrupt;
pub mod registry;
pub mod spec;
