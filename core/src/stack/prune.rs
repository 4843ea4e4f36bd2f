//! Which objects a component no longer has: those the API server lists with the component's
//! labels (or that were applied last time) but that its current rendering lacks.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{ObjectRef, LABEL_COMPONENT, LABEL_MANAGED_BY};

/// From `listed` (objects as the API server returned them, of the kinds the component ever
/// applied), the ones labelled as this component's and managed by labforge that `current` does
/// not contain. Objects of other components, or not labforge's, are never selected.
pub fn stale(component: &str, listed: &[Value], current: &[ObjectRef]) -> Vec<ObjectRef> {
    let keep: BTreeSet<(String, String, Option<String>, String)> = current.iter().map(key).collect();
    let mut out: Vec<ObjectRef> = listed
        .iter()
        .filter(|o| {
            let l = |k: &str| o.pointer("/metadata/labels").and_then(|ls| ls.get(k)).and_then(Value::as_str);
            l(LABEL_MANAGED_BY) == Some("labforge") && l(LABEL_COMPONENT) == Some(component)
        })
        .filter_map(|o| ObjectRef::of(o).ok())
        // Never a namespace (it takes everything in it, other components' objects too) nor a
        // claim (its volume is deleted with it): those are left for an admin.
        .filter(|r| !matches!(r.kind.as_str(), "Namespace" | "PersistentVolumeClaim"))
        .filter(|r| !keep.contains(&key(r)))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Identity without the version: an object applied as `v1beta1` and listed as `v1` is the same.
fn key(r: &ObjectRef) -> (String, String, Option<String>, String) {
    (r.group_version().0.to_string(), r.kind.clone(), r.namespace.clone(), r.name.clone())
}
