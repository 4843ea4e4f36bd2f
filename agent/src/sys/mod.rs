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

/// Letters and digits, for [`random_text`].
pub const ALPHANUMERIC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// `n` characters drawn uniformly from `alphabet` (at most 256 symbols) with the kernel's
/// random source: bytes that would favour the first symbols are dropped.
pub fn random_text(alphabet: &[u8], n: usize) -> Result<String> {
    let len = alphabet.len();
    assert!((1..=256).contains(&len), "an alphabet of 1 to 256 symbols");
    let limit = 256 - 256 % len;
    let mut out = String::with_capacity(n);
    while out.len() < n {
        let mut b = [0u8; 64];
        getrandom::getrandom(&mut b).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
        let take = n - out.len();
        out.extend(
            b.iter().filter(|&&x| usize::from(x) < limit).map(|&x| alphabet[usize::from(x) % len] as char).take(take),
        );
    }
    Ok(out)
}
