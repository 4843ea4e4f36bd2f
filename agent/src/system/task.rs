//! The system task: asks systemd how the boot goes and reports it in the `system` section.

use super::SystemHealth;

/// How often systemd is asked while the node boots, and afterwards.
const EVERY_BOOTING: std::time::Duration = std::time::Duration::from_secs(2);
const EVERY_BOOTED: std::time::Duration = std::time::Duration::from_secs(15);

/// The system task: asks systemd how the boot goes (often while it runs, rarely after) and
/// reports it in the `system` section.
pub async fn watch(report: crate::report::Report) -> anyhow::Result<()> {
    loop {
        let health = crate::sys::blocking(|| Ok(SystemHealth::query())).await.unwrap_or_default();
        let every = if health.booted() { EVERY_BOOTED } else { EVERY_BOOTING };
        report.update(|s| {
            if s.system != health && !health.failed_units.is_empty() {
                tracing::warn!(failed = ?health.failed_units, "systemd reports failed units");
            }
            s.system = health;
        });
        tokio::time::sleep(every).await;
    }
}
