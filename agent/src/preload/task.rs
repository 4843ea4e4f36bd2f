//! The preload task: imports the image's preloaded container images into containerd at boot,
//! retrying failed imports with a growing pause until every image is in, and reports each
//! round in the `preload` section.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use tracing::{error, info, warn};

use super::{Containerd, ImportFailure, PreloadState, PreloadStatus, Source, LAYOUT_DIR};
use crate::report::Report;
use crate::sys::blocking;

/// The pause after a failed round doubles up to this.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// The pause before round `n + 1` after `n` failed rounds: 2 s, doubling, at most a minute.
pub fn pause_after(failed_rounds: u32) -> Duration {
    Duration::from_secs(2).saturating_mul(1 << failed_rounds.min(6)).min(MAX_PAUSE)
}

pub async fn run(report: Report, state_dir: PathBuf, cmdline: String) -> Result<()> {
    let layout = Path::new(LAYOUT_DIR);
    let entries = match super::read_layout(layout) {
        Ok(e) if e.is_empty() => return Ok(()),
        Ok(e) => e,
        Err(e) => {
            error!("preloaded images: {e:#}");
            let failed = vec![ImportFailure { name: "*".into(), error: format!("{e:#}") }];
            report.update(|s| s.preload = PreloadStatus { state: PreloadState::Failed, failed, ..Default::default() });
            return Ok(());
        }
    };
    super::link_layout(&state_dir);
    let mut status = PreloadStatus {
        state: PreloadState::Waiting,
        total: entries.len(),
        kubeadm_images: super::kubeadm_needs(&entries),
        ..Default::default()
    };
    report.update(|s| s.preload = status.clone());
    let mut failed_rounds = 0;
    loop {
        if !blocking(|| Ok(Containerd::default().ready())).await.unwrap_or(false) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let (entries2, report2, before, cmdline2) = (entries.clone(), report.clone(), status.clone(), cmdline.clone());
        let pending = state_dir.join(super::PENDING_FILE);
        status = blocking(move || {
            let mut progress = |p: &PreloadStatus| report2.update(|s| s.preload = p.clone());
            let source = Source::for_boot(Path::new(LAYOUT_DIR), &cmdline2);
            let durable = super::Durability { pending: &pending, containerd_root: Path::new(super::CONTAINERD_ROOT) };
            Ok(super::round(&Containerd::default(), &source, &entries2, before, Some(&durable), &mut progress))
        })
        .await?;
        if let Err(e) = super::save_result(&state_dir, &status) {
            warn!("saving the preload result: {e:#}");
        }
        report.update(|s| s.preload = status.clone());
        if status.state == PreloadState::Done {
            info!(imported = status.imported, present = status.present, "preloaded images are in containerd");
            return Ok(());
        }
        tokio::time::sleep(pause_after(failed_rounds)).await;
        failed_rounds += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_grows_to_a_minute() {
        let secs: Vec<u64> = (0..8).map(|n| pause_after(n).as_secs()).collect();
        assert_eq!(secs, [2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
