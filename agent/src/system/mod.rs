//! The node's boot health as systemd sees it: the overall system state and the units that
//! failed. Reported in `/status`, `/metrics` and the console line, so an operator (or a test)
//! knows the node finished booting without reading systemd's console output, which systemd stops
//! printing once a getty holds the console.

pub mod task;

use crate::sys::Cmd;

use serde::{Deserialize, Serialize};

crate::wire_enum! {
    /// systemd's system state, as `systemctl is-system-running` prints it.
    pub enum SystemState {
        Initializing = "initializing",
        Starting = "starting",
        Running = "running",
        Degraded = "degraded",
        Maintenance = "maintenance",
        Stopping = "stopping",
        Offline = "offline",
        Unknown = "unknown",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemHealth {
    /// systemd's state (`unknown` when systemd could not be asked).
    pub state: SystemState,
    /// Units in the `failed` state (empty unless `state` is `degraded`).
    pub failed_units: Vec<String>,
}

impl Default for SystemHealth {
    fn default() -> Self {
        SystemHealth { state: SystemState::Unknown, failed_units: Vec::new() }
    }
}

impl SystemHealth {
    /// Asks systemd. Never fails: an unanswerable question is reported as `unknown`.
    pub fn query() -> SystemHealth {
        // `is-system-running` exits non-zero for every state but `running`; its stdout is the
        // answer either way.
        let limit = std::time::Duration::from_secs(30);
        let state = match Cmd::new("systemctl").arg("is-system-running").timeout(limit).finish() {
            Ok(out) => parse_state(&out.stdout),
            Err(_) => SystemState::Unknown,
        };
        let failed_units = if state == SystemState::Degraded {
            Cmd::new("systemctl")
                .args(["list-units", "--state=failed", "--plain", "--no-legend", "--no-pager", "--full"])
                .timeout(limit)
                .run()
                .map(|o| parse_failed(&o))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        SystemHealth { state, failed_units }
    }

    /// True once boot has finished, whether or not every unit succeeded.
    pub fn booted(&self) -> bool {
        matches!(self.state, SystemState::Running | SystemState::Degraded)
    }
}

fn parse_state(stdout: &str) -> SystemState {
    serde_json::from_value(serde_json::Value::String(stdout.trim().to_string())).unwrap_or(SystemState::Unknown)
}

/// The unit names of `systemctl list-units --state=failed --plain --no-legend` output.
fn parse_failed(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        // Some systemctl versions mark failed units with a bullet even with --plain.
        .filter_map(|l| l.trim_start().trim_start_matches('●').split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_read_from_stdout() {
        assert_eq!(parse_state("running\n"), SystemState::Running);
        assert_eq!(parse_state("degraded\n"), SystemState::Degraded);
        assert_eq!(parse_state("starting\n"), SystemState::Starting);
        assert_eq!(parse_state(""), SystemState::Unknown);
        assert_eq!(parse_state("Failed to connect to bus: No such file or directory\n"), SystemState::Unknown);
    }

    #[test]
    fn failed_units_are_the_first_column() {
        let out = "containerd.service loaded failed failed containerd container runtime\n\
                   systemd-networkd-wait-online.service loaded failed failed Wait for Network\n";
        assert_eq!(parse_failed(out), vec!["containerd.service", "systemd-networkd-wait-online.service"]);
        assert_eq!(parse_failed("● x.mount loaded failed failed X\n"), vec!["x.mount"]);
        assert!(parse_failed("").is_empty());
    }

    #[test]
    fn booted_means_running_or_degraded() {
        let h = |s: &str| SystemHealth { state: parse_state(s), failed_units: vec![] };
        assert!(h("running").booted() && h("degraded").booted());
        assert!(!h("starting").booted() && !h("unknown").booted());
    }
}
