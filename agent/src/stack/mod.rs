//! The stack (a slot, empty for now): on the master, once the node is Ready, applies the data
//! stack's components in dependency order with server-side apply, waits for each readiness gate,
//! records the applied digests and prunes what a new version removed.
//!
//! It will be a task like the others: it subscribes to the cluster task's
//! `watch<ClusterView>` (to start when this node leads a Ready cluster), keeps its decisions in a
//! pure planner (`plan`: cluster view + components + applied digests → steps) with an executor
//! beside it (`apply`), talks to Kubernetes through its API, and reports a `stack` section
//! through `report::Report`.
