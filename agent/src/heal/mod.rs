//! Healing after power cuts. `cni` repairs what a power cut leaves of the pod network's state at
//! boot.
//!
//! The rest is a slot, empty for now: after a power cut or a failure, observe kubelet, the API
//! server, node readiness, etcd and the stack's components, diagnose what is wrong (a pure
//! function over what was observed) and act (restart, reset and rejoin) — a task like the others
//! that subscribes to `watch<ClusterView>`, keeps the diagnosis pure with a table of tests, runs
//! its actions through `sys::Cmd`, and reports a `heal` section through `report::Report`.

pub mod cni;
