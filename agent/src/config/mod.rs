//! The node config (its schema lives in `labforge_core::config`, shared with the builder) and the
//! config partition, one of its layers.

pub mod partition;

pub use labforge_core::config::*;
