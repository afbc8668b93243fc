//! A policy's metadata (name, namespace, labels) and the two things Kuma decides with it: which
//! of the policies that select a Dataplane wins over which ([`order`], Kuma's
//! `SortByTargetRef`), and whether a policy may select a Dataplane at all given its zone and
//! namespace ([`PolicyMeta::admits`]). Both policy files and Kubernetes (policies read from the
//! API server, labelled as Kuma's admission webhook labels them) use this type.
//!
//! Read from kumahq/kuma v2.14.3 (restated, not copied):
//! - `pkg/plugins/policies/core/matchers/dataplane.go`: `SortByTargetRef`, `dppSelectedByZone`,
//!   `dppSelectedByNamespace`, and `MatchedPolicies` (which skips `kuma.io/effect: shadow`);
//! - `api/common/v1alpha1/targetref.go`: the kind order and `CompareDataplaneKind`;
//! - `api/mesh/v1alpha1/dataplane_helpers.go`: the origin order (global < unknown < zone) and
//!   the policy-role order (system < producer < consumer < workload-owner);
//! - `pkg/core/resources/model/resource.go`: `GetDisplayName`, `ResourceOrigin`, `PolicyRole`,
//!   `IsShadowedResource`, `IsLocalZoneResource`;
//! - `pkg/plugins/resources/k8s/store.go`: on Kubernetes the display name is the
//!   `kuma.io/display-name` *annotation*, else `metadata.name`, and the name Kuma compares
//!   otherwise is `name.namespace`.

use std::{borrow::Cow, cmp::Ordering, collections::BTreeMap};

use super::validate::Target;

/// `kuma.io/mesh`.
pub const MESH_LABEL: &str = "kuma.io/mesh";
/// `kuma.io/origin`: `global` (synced from the global control plane) or `zone`.
pub const ORIGIN_LABEL: &str = "kuma.io/origin";
/// `kuma.io/zone`: the zone a resource was created in.
pub const ZONE_LABEL: &str = "kuma.io/zone";
/// `kuma.io/policy-role`: `system`, `producer`, `consumer` or `workload-owner`.
pub const ROLE_LABEL: &str = "kuma.io/policy-role";
/// `kuma.io/display-name`: the name a policy was given where it was created.
pub const DISPLAY_NAME_LABEL: &str = "kuma.io/display-name";
/// `kuma.io/effect`: `shadow` policies are not enforced.
pub const EFFECT_LABEL: &str = "kuma.io/effect";
/// `k8s.kuma.io/namespace`: the Kubernetes namespace of a policy or Dataplane.
pub const NAMESPACE_LABEL: &str = "k8s.kuma.io/namespace";

/// `kuma.io/origin`, in Kuma's order: a policy of the zone beats one without the label, which
/// beats one synced from global.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `global`.
    Global,
    /// No label (or an empty one).
    Unknown,
    /// `zone`.
    Zone,
}

/// `kuma.io/policy-role`, in Kuma's order (later wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Any other value: Kuma's order table has no entry for it, so it ranks below `system`.
    Other,
    /// `system`, and no label.
    System,
    /// `producer`.
    Producer,
    /// `consumer`.
    Consumer,
    /// `workload-owner`.
    WorkloadOwner,
}

/// A policy's identity and labels, as Kuma sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct PolicyMeta {
    /// `metadata.name` (Kubernetes) or `name` (Universal).
    pub name: String,
    /// `metadata.namespace`; empty for Universal policies.
    pub namespace: String,
    /// The labels. For Kubernetes, `kuma.io/display-name` holds the display name Kuma derives
    /// (the annotation of that name, else `metadata.name`).
    pub labels: BTreeMap<String, String>,
}

impl PolicyMeta {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    /// `kuma.io/origin`. Values other than `global` and `zone` are refused by validation
    /// ([`PolicyMeta::origin_problem`]); here they count as unknown.
    pub fn origin(&self) -> Origin {
        match self.label(ORIGIN_LABEL) {
            Some("global") => Origin::Global,
            Some("zone") => Origin::Zone,
            _ => Origin::Unknown,
        }
    }

    /// Kuma refuses a resource whose `kuma.io/origin` is set to anything but `global` or
    /// `zone` (its API server and admission webhook, `ResourceOrigin.IsValid`): the message.
    pub fn origin_problem(&self) -> Option<String> {
        match self.label(ORIGIN_LABEL) {
            None | Some("") | Some("global") | Some("zone") => None,
            Some(o) => Some(format!("unknown resource origin {o:?}")),
        }
    }

    /// `kuma.io/policy-role`; absent or empty = `system`.
    pub fn role(&self) -> Role {
        match self.label(ROLE_LABEL) {
            None | Some("") | Some("system") => Role::System,
            Some("producer") => Role::Producer,
            Some("consumer") => Role::Consumer,
            Some("workload-owner") => Role::WorkloadOwner,
            Some(_) => Role::Other,
        }
    }

    /// The name Kuma orders by: `kuma.io/display-name` when set and not empty, else the name
    /// Kuma stores (`name.namespace` for a namespaced Kubernetes resource, `name` otherwise).
    pub fn display_name(&self) -> Cow<'_, str> {
        match self.label(DISPLAY_NAME_LABEL) {
            Some(d) if !d.is_empty() => Cow::Borrowed(d),
            _ if self.namespace.is_empty() => Cow::Borrowed(&self.name),
            _ => Cow::Owned(format!("{}.{}", self.name, self.namespace)),
        }
    }

    /// `kuma.io/effect: shadow`: Kuma computes such a policy for inspection but leaves it out
    /// of the proxies' configuration.
    pub fn is_shadow(&self) -> bool {
        self.label(EFFECT_LABEL) == Some("shadow")
    }

    /// Whether this policy may select a Dataplane (a workload) with labels `dp`, before its
    /// targetRef is looked at: Kuma's zone rule (a policy created in one zone does not select
    /// the Dataplanes another zone created; `producer` policies are exempt) and namespace rule
    /// (a `consumer` or `workload-owner` policy selects only Dataplanes of its own
    /// `k8s.kuma.io/namespace`).
    pub fn admits(&self, dp: &BTreeMap<String, String>) -> bool {
        let dp_label = |k: &str| dp.get(k).map(String::as_str);
        let role = self.role();
        if role != Role::Producer {
            // A Dataplane with no origin, or synced from global, is selectable by every policy.
            let dp_origin = dp_label(ORIGIN_LABEL).filter(|o| !o.is_empty());
            if let Some(o) = dp_origin
                && o != "global"
                && self.label(ORIGIN_LABEL) == Some("zone")
                && let Some(zone) = self.label(ZONE_LABEL)
            {
                // IsLocalZoneResource(dp, zone)
                let local = o == "zone" && dp_label(ZONE_LABEL).is_none_or(|z| z == zone);
                if !local {
                    return false;
                }
            }
        }
        if matches!(role, Role::Consumer | Role::WorkloadOwner) {
            match self.label(NAMESPACE_LABEL) {
                Some(ns) if dp_label(NAMESPACE_LABEL).unwrap_or("") == ns => {}
                _ => return false,
            }
        }
        true
    }
}

fn kind_rank(t: &Target) -> u8 {
    match t {
        Target::Mesh { .. } => 1,
        Target::Dataplane { .. } => 2,
        Target::MeshSubset { .. } => 3,
    }
}

/// Kuma's `CompareDataplaneKind` for two `Dataplane` refs, as a rank: a ref by name beats one
/// by labels. Kuma's comparison is not an order once a ref with neither name nor labels ("every
/// Dataplane") meets both kinds (it ties with each, while they differ), and a ref by name with
/// an empty `labels: {}` is "greater" than another such ref both ways; a sort needs an order, so
/// the "every Dataplane" ref ranks with the refs by labels (an empty selector), and a ref by
/// name with a `labels` map between those and a plain ref by name (Kuma: name-only beats it,
/// it beats labels-only).
fn dataplane_rank(t: &Target) -> u8 {
    match t {
        Target::Dataplane {
            name: Some(_),
            labels: None,
            ..
        } => 2,
        Target::Dataplane {
            name: Some(_),
            labels: Some(_),
            ..
        } => 1,
        _ => 0,
    }
}

/// Kuma's order between two policies that select the same Dataplane (`Less` = less specific:
/// applied first, overridden by later ones): targetRef kind (`Mesh` < `Dataplane` <
/// `MeshSubset`), between `Dataplane` refs by labels < by name, origin (global < unknown <
/// zone), policy role (system < producer < consumer < workload-owner), then the display name
/// *reversed* (the lexicographically smaller name wins). Kuma's sort is not stable; ties left
/// after all that are broken the same reversed way by namespace, then name, so the order never
/// depends on the order policies were read in.
pub fn order(a: (&PolicyMeta, &Target), b: (&PolicyMeta, &Target)) -> Ordering {
    let ((ma, ta), (mb, tb)) = (a, b);
    kind_rank(ta)
        .cmp(&kind_rank(tb))
        .then_with(|| dataplane_rank(ta).cmp(&dataplane_rank(tb)))
        .then_with(|| ma.origin().cmp(&mb.origin()))
        .then_with(|| ma.role().cmp(&mb.role()))
        .then_with(|| mb.display_name().cmp(&ma.display_name()))
        .then_with(|| (&mb.namespace, &mb.name).cmp(&(&ma.namespace, &ma.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, labels: &[(&str, &str)]) -> PolicyMeta {
        PolicyMeta {
            name: name.into(),
            namespace: String::new(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    const MESH: Target = Target::Mesh { proxy_types: None };

    fn dp(name: Option<&str>, labels: Option<&[(&str, &str)]>) -> Target {
        Target::Dataplane {
            name: name.map(str::to_string),
            namespace: None,
            labels: labels.map(|l| {
                l.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
        }
    }

    fn subset() -> Target {
        Target::MeshSubset {
            tags: BTreeMap::new(),
            proxy_types: None,
        }
    }

    /// Sorts `(meta, target)` pairs least → most specific and returns their names.
    fn sorted(mut v: Vec<(PolicyMeta, Target)>) -> Vec<String> {
        v.sort_by(|a, b| order((&a.0, &a.1), (&b.0, &b.1)));
        v.into_iter().map(|(m, _)| m.name).collect()
    }

    #[test]
    fn kind_then_origin_then_role_then_reversed_display_name() {
        let got = sorted(vec![
            (meta("a-zone", &[(ORIGIN_LABEL, "zone")]), MESH),
            (
                meta("b-subset-global", &[(ORIGIN_LABEL, "global")]),
                subset(),
            ),
            (meta("c-unknown", &[]), MESH),
            (meta("d-global", &[(ORIGIN_LABEL, "global")]), MESH),
            (meta("e-dp", &[(ORIGIN_LABEL, "zone")]), dp(None, None)),
            (meta("a-empty-origin", &[(ORIGIN_LABEL, "")]), MESH),
        ]);
        assert_eq!(
            got,
            [
                // Mesh: global < unknown (no label, or empty) < zone; within unknown the smaller
                // name wins (sorts later).
                "d-global",
                "c-unknown",
                "a-empty-origin",
                "a-zone",
                "e-dp",
                // MeshSubset beats everything, even from global.
                "b-subset-global",
            ]
        );
    }

    #[test]
    fn origin_before_name_and_role_before_name() {
        // Without origins `a` would win over `b`; the zone origin makes `b` more specific.
        let got = sorted(vec![
            (meta("b", &[(ORIGIN_LABEL, "zone")]), MESH),
            (meta("a", &[]), MESH),
        ]);
        assert_eq!(got, ["a", "b"]);
        let got = sorted(vec![
            (meta("z-owner", &[(ROLE_LABEL, "workload-owner")]), MESH),
            (meta("y-consumer", &[(ROLE_LABEL, "consumer")]), MESH),
            (meta("x-producer", &[(ROLE_LABEL, "producer")]), MESH),
            (meta("w-system", &[(ROLE_LABEL, "system")]), MESH),
            (meta("v-none", &[]), MESH),
            (meta("u-other", &[(ROLE_LABEL, "bogus")]), MESH),
        ]);
        // No label = system; `v-none` and `w-system` tie on role, the smaller name wins.
        assert_eq!(
            got,
            [
                "u-other",
                "w-system",
                "v-none",
                "x-producer",
                "y-consumer",
                "z-owner"
            ]
        );
        // Origin is compared before role.
        let got = sorted(vec![
            (
                meta(
                    "owner-global",
                    &[(ORIGIN_LABEL, "global"), (ROLE_LABEL, "workload-owner")],
                ),
                MESH,
            ),
            (meta("system-zone", &[(ORIGIN_LABEL, "zone")]), MESH),
        ]);
        assert_eq!(got, ["owner-global", "system-zone"]);
    }

    #[test]
    fn display_name_is_compared_where_set() {
        // Synced from global, names carry a hash; the display names decide: "allow" < "deny",
        // so "allow" wins although its stored name sorts after.
        let got = sorted(vec![
            (
                meta("allow-x7f9.kuma-system", &[(DISPLAY_NAME_LABEL, "allow")]),
                MESH,
            ),
            (
                meta("deny-2b4c.kuma-system", &[(DISPLAY_NAME_LABEL, "deny")]),
                MESH,
            ),
        ]);
        assert_eq!(got, ["deny-2b4c.kuma-system", "allow-x7f9.kuma-system"]);
        // An empty label falls back to the name (Kubernetes: name.namespace).
        let m = PolicyMeta {
            name: "p".into(),
            namespace: "ns".into(),
            labels: [(DISPLAY_NAME_LABEL.to_string(), String::new())].into(),
        };
        assert_eq!(m.display_name(), "p.ns");
        assert_eq!(meta("p", &[]).display_name(), "p");
    }

    #[test]
    fn dataplane_by_name_beats_by_labels_and_the_order_is_total() {
        let by_name = || dp(Some("web"), None);
        let by_labels = || dp(None, Some(&[("app", "web")]));
        let named_with_empty_labels = || dp(Some("web"), Some(&[]));
        let every = || dp(None, None);
        let got = sorted(vec![
            (meta("a-name", &[]), by_name()),
            (meta("b-labels", &[(ORIGIN_LABEL, "zone")]), by_labels()),
            (meta("c-name-labels", &[]), named_with_empty_labels()),
        ]);
        // By name beats by labels before origins and names are looked at.
        assert_eq!(got, ["b-labels", "c-name-labels", "a-name"]);
        // "Every Dataplane" ranks with the refs by labels: origin and name decide between them.
        let got = sorted(vec![
            (meta("b", &[]), by_labels()),
            (meta("a", &[]), every()),
            (meta("c", &[]), by_name()),
        ]);
        assert_eq!(got, ["b", "a", "c"]);
        // Every permutation sorts the same (a total order; Kuma's comparison would cycle on
        // these three).
        let three = || {
            vec![
                (meta("b", &[]), every()),
                (meta("c", &[]), by_name()),
                (meta("a", &[]), by_labels()),
            ]
        };
        let want = sorted(three());
        for p in [[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
            let v = three();
            let perm: Vec<_> = p.iter().map(|&i| v[i].clone()).collect();
            assert_eq!(sorted(perm), want);
        }
    }

    #[test]
    fn origins_and_shadow() {
        assert_eq!(meta("p", &[(ORIGIN_LABEL, "zone")]).origin_problem(), None);
        assert_eq!(meta("p", &[(ORIGIN_LABEL, "")]).origin_problem(), None);
        assert_eq!(
            meta("p", &[(ORIGIN_LABEL, "Zone")])
                .origin_problem()
                .as_deref(),
            Some("unknown resource origin \"Zone\"")
        );
        assert!(meta("p", &[(EFFECT_LABEL, "shadow")]).is_shadow());
        assert!(!meta("p", &[(EFFECT_LABEL, "Shadow")]).is_shadow());
        assert!(!meta("p", &[]).is_shadow());
    }

    #[test]
    fn zone_and_namespace_rules() {
        let labels = |l: &[(&str, &str)]| -> BTreeMap<String, String> {
            l.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let zone_a = meta("p", &[(ORIGIN_LABEL, "zone"), (ZONE_LABEL, "a")]);
        // Dataplanes without an origin, or from global: every policy.
        assert!(zone_a.admits(&labels(&[])));
        assert!(zone_a.admits(&labels(&[(ORIGIN_LABEL, "global"), (ZONE_LABEL, "b")])));
        // A Dataplane of zone b is not selected by a policy of zone a; of zone a (or of no
        // zone label) it is.
        assert!(!zone_a.admits(&labels(&[(ORIGIN_LABEL, "zone"), (ZONE_LABEL, "b")])));
        assert!(zone_a.admits(&labels(&[(ORIGIN_LABEL, "zone"), (ZONE_LABEL, "a")])));
        assert!(zone_a.admits(&labels(&[(ORIGIN_LABEL, "zone")])));
        // Producer policies are exempt from the zone rule; global/unlabelled policies too.
        let producer = meta(
            "p",
            &[
                (ORIGIN_LABEL, "zone"),
                (ZONE_LABEL, "a"),
                (ROLE_LABEL, "producer"),
            ],
        );
        assert!(producer.admits(&labels(&[(ORIGIN_LABEL, "zone"), (ZONE_LABEL, "b")])));
        assert!(meta("p", &[]).admits(&labels(&[(ORIGIN_LABEL, "zone"), (ZONE_LABEL, "b")])));
        // Namespace rule: consumer / workload-owner only in their own namespace.
        for role in ["consumer", "workload-owner"] {
            let p = meta("p", &[(ROLE_LABEL, role), (NAMESPACE_LABEL, "shop")]);
            assert!(p.admits(&labels(&[(NAMESPACE_LABEL, "shop")])), "{role}");
            assert!(!p.admits(&labels(&[(NAMESPACE_LABEL, "bank")])), "{role}");
            assert!(!p.admits(&labels(&[])), "{role}");
            // Without its own namespace label it selects nothing.
            let p = meta("p", &[(ROLE_LABEL, role)]);
            assert!(!p.admits(&labels(&[(NAMESPACE_LABEL, "shop")])), "{role}");
        }
        let system = meta("p", &[(NAMESPACE_LABEL, "kuma-system")]);
        assert!(system.admits(&labels(&[(NAMESPACE_LABEL, "shop")])));
    }
}
