//! Healing (a slot, empty for now): after a power cut or a failure, observes kubelet, the API
//! server, node readiness, etcd and the stack's components, diagnoses what is wrong (a pure
//! function over what was observed) and acts (restart, reset and rejoin).
//!
//! It will be a task like the others: it subscribes to `watch<ClusterView>`, keeps the diagnosis
//! pure with a table of tests, runs its actions through `sys::Cmd`, and reports a `heal` section
//! through `report::Report`.
