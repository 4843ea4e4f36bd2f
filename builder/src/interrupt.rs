//! ^C and SIGTERM handling: stop child tools, unwind, remove temporary files.
//!
//! The handler only sets a flag and forwards SIGTERM to the process groups of running tools;
//! the build notices at its next check (or when the tool it waits on exits) and returns
//! [`Interrupted`], so every temporary directory is dropped on the way out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static CHILDREN: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// A command was stopped by a signal; `aftermath` says what that left behind.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by a signal; {aftermath}")]
pub struct Interrupted {
    pub aftermath: &'static str,
}

const BUILD_AFTERMATH: &str = "nothing was written to the output directory and temporary files were removed";

/// Installs the handler for SIGINT, SIGTERM and SIGHUP. Call once, from `main`.
pub fn install() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handler")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                tracing::warn!("received signal {sig}, stopping");
                INTERRUPTED.store(true, Ordering::SeqCst);
                for pgid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    let _ = killpg(Pid::from_raw(*pgid), Signal::SIGTERM);
                }
            }
        })
        .context("starting signal thread")?;
    Ok(())
}

/// Returns `Err(Interrupted)` once a stop signal has arrived (during a build).
pub fn check() -> Result<()> {
    check_with(BUILD_AFTERMATH)
}

/// Like [`check`], for commands other than a build, saying what the interruption left.
pub fn check_with(aftermath: &'static str) -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(Interrupted { aftermath }.into())
    } else {
        Ok(())
    }
}

/// Registers a child's process group so a stop signal reaches it; unregisters on drop.
pub(crate) struct ChildGuard(i32);

impl ChildGuard {
    pub(crate) fn new(pgid: i32) -> Self {
        CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(pgid);
        // A signal that arrived just before registration would otherwise be missed.
        if INTERRUPTED.load(Ordering::SeqCst) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
        }
        ChildGuard(pgid)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| *p != self.0);
    }
}

/// True if the error (or its chain) is an interruption.
pub fn is_interrupted(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<Interrupted>())
}
