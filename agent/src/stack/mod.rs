//! The stack: on the master, once this node is Ready, applies the data stack's components (the
//! image's `stack.json`, see `labforge_core::stack`) in dependency order with server-side apply
//! through the Kubernetes API, waits for each readiness gate before a dependent starts, records
//! the applied digest per component, re-applies only what changed, and prunes what a new version
//! of a component no longer has.
//!
//! `plan` decides (pure: components + what was applied + what was seen → what to do next);
//! `apply` talks to the API server; `task` runs the rounds and reports a `stack` section.

pub mod apply;
pub mod plan;
pub mod task;

use serde::{Deserialize, Serialize};

/// Where the applied digests are kept (on the state volume, so a power cut forgets nothing).
pub const STATE_FILE: &str = "stack.json";

/// `/status` → `stack`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackStatus {
    /// `waiting` (for this node to be a Ready master), `applying`, `ready`, `degraded` (a
    /// component failed), `error` (the stack itself could not be read).
    pub state: String,
    pub message: String,
    pub components: Vec<ComponentStatus>,
    /// The last round over the components: how long it took and how many it applied with every
    /// object accepted (a round after a reboot with nothing changed applies none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_round: Option<RoundStats>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundStats {
    pub took_ms: u64,
    pub applied: u32,
}

/// One component as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentStatus {
    pub name: String,
    pub namespace: String,
    pub state: plan::State,
    /// Why it is in that state (a gate it waits for, an error, the dependency it waits on).
    pub message: String,
    /// The digest of the objects last applied (and when).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_digest: Option<String>,
    /// Failed attempts in a row.
    pub failures: u32,
    /// Its images' tags (`prometheus 2.42.0, node_exporter 1.5.0`).
    #[serde(default)]
    pub version: String,
    /// Its web UIs, at every node's address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub web: Vec<labforge_core::stack::Web>,
}
