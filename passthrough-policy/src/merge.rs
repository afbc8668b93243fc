//! Selecting and merging policies per workload, as Kuma 2.14 does (docs/kuma.md):
//!
//! - shadow policies (`kuma.io/effect: shadow`) are not enforced: they are never selected here
//!   (the loader leaves them out; [`selects`] refuses them too);
//! - selection: the policy's zone and namespace labels must admit the workload
//!   ([`PolicyMeta::admits`](super::meta::PolicyMeta::admits)); then `Mesh` selects everything;
//!   `MeshSubset` when every tag equals the workload's label; `Dataplane` by name, or by labels
//!   (all equal), or everything when it has neither; a `proxyTypes` list without `Sidecar`
//!   selects nothing (workloads are sidecar-like);
//! - order, least → most specific: Kuma's `SortByTargetRef`, [`super::meta::order`] (kind,
//!   Dataplane by name over by labels, origin, policy role, display name reversed);
//! - `passthroughMode`: the last policy that sets it; none sets it → `Matched`;
//! - `appendMatch`: concatenated in that order;
//! - no selecting policy → the `--unselected-mode`.

use std::cmp::Ordering;

use super::{
    model::{MergedConf, Mode, Workload},
    validate::{Policy, Target},
};

fn proxy_types_ok(pt: &Option<Vec<String>>) -> bool {
    pt.as_ref()
        .is_none_or(|l| l.is_empty() || l.iter().any(|t| t == "Sidecar"))
}

/// Whether `p` selects workload `w`.
pub fn selects(p: &Policy, w: &Workload) -> bool {
    if p.meta.is_shadow() || !p.meta.admits(&w.labels) {
        return false;
    }
    match &p.target {
        Target::Mesh { proxy_types } => proxy_types_ok(proxy_types),
        Target::MeshSubset { tags, proxy_types } => {
            proxy_types_ok(proxy_types) && tags.iter().all(|(k, v)| w.labels.get(k) == Some(v))
        }
        Target::Dataplane {
            name,
            labels,
            namespace,
        } => match (name, labels) {
            (Some(n), _) => *n == w.name,
            (None, Some(l)) => l.iter().all(|(k, v)| w.labels.get(k) == Some(v)),
            // A namespace alone: workloads carry no namespace, so only a `k8s.kuma.io/namespace`
            // label can tell; without one, nothing is selected.
            (None, None) => namespace
                .as_ref()
                .is_none_or(|ns| w.labels.get("k8s.kuma.io/namespace") == Some(ns)),
        },
    }
}

/// Kuma's `SortByTargetRef` comparison: `Less` = less specific (applied first).
pub fn specificity(a: &Policy, b: &Policy) -> Ordering {
    super::meta::order((&a.meta, &a.target), (&b.meta, &b.target))
}

/// The policies selecting `w`, least → most specific.
pub fn ordered_for<'a>(policies: &'a [Policy], w: &Workload) -> Vec<&'a Policy> {
    ordered_indices(policies, w)
        .into_iter()
        .map(|i| &policies[i])
        .collect()
}

/// Indices into `policies` of the policies selecting `w`, least → most specific.
pub fn ordered_indices(policies: &[Policy], w: &Workload) -> Vec<usize> {
    let mut sel: Vec<usize> = (0..policies.len())
        .filter(|&i| selects(&policies[i], w))
        .collect();
    // A total order (ties broken by namespace and name), so input order never matters.
    sel.sort_by(|&a, &b| specificity(&policies[a], &policies[b]));
    sel
}

/// The merged configuration for `w`.
pub fn merge(policies: &[Policy], w: &Workload, unselected: Mode) -> MergedConf {
    merge_indices(policies, &ordered_indices(policies, w), unselected)
}

/// The merged configuration of the policies `sel` (indices, least → most specific).
pub fn merge_indices(policies: &[Policy], sel: &[usize], unselected: Mode) -> MergedConf {
    if sel.is_empty() {
        return MergedConf {
            mode: unselected,
            matches: Vec::new(),
            policies: Vec::new(),
        };
    }
    let mut mode = None;
    let mut matches = Vec::with_capacity(sel.iter().map(|&i| policies[i].matches.len()).sum());
    let mut names = Vec::with_capacity(sel.len());
    for &i in sel {
        let p = &policies[i];
        if p.mode.is_some() {
            mode = p.mode;
        }
        matches.extend(p.matches.iter().cloned());
        names.push(p.name.clone());
    }
    MergedConf {
        mode: mode.unwrap_or(Mode::Matched),
        matches,
        policies: names,
    }
}
