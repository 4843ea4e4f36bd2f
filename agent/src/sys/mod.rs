//! The agent's only effects on the world outside its own memory, each in one place: running a
//! program ([`cmd`]), talking HTTP ([`http`]), writing files that must survive a power cut
//! ([`fs`]), the clock ([`clock`]) and the filesystem roots that tests replace ([`roots`]).
//!
//! Planners (election, disk policy, install target choice, the cluster and netboot plans) take
//! data and return data and never call into this module; executors do.

pub mod clock;
pub mod fs;
pub mod http;

/// The command runner and the filesystem roots are shared with the builder.
pub use labforge_core::{cmd, roots};

pub use cmd::Cmd;
pub use roots::Roots;

use anyhow::{Context, Result};

/// Runs blocking work (kubeadm, HTTP, disk I/O) off the async threads, so a slow call never
/// stalls another task or SIGTERM.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.context("worker thread")?
}
