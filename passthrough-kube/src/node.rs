//! This node's workloads, computed from the cluster [`Snapshot`] and the pod cgroups that exist:
//! one entry per cgroup the programs must know, each with the merged configuration it gets.
//!
//! | cgroup | configuration |
//! |---|---|
//! | a pod Kuma would put in the mesh (or a `--pod-selector`/`--namespace-selector` match) | the MeshPassthrough policies selecting its Dataplane, merged in Kuma's order |
//! | any other known pod | `--unselected-mode` |
//! | the agent's own pod | `All` (its proxy dials out for every workload) |
//! | a pod cgroup no pod of the snapshot names yet, and the QoS parents (`kubepods*`) | `--pending-mode` (default `None`) |
//!
//! The QoS parents carry the pending mode so that a pod cgroup is covered from the instant it
//! is created, before the agent has even seen the inotify event: the programs judge a task by
//! its deepest cgroup that has an entry.
//!
//! Invalid MeshPassthrough resources are reported (`namespace/name: field: reason`) and left
//! out; the rest applies.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use passthrough_policy::{MergedConf, Mode, Policy, merge, parse, validate};

use crate::{
    cgroups::{CgroupEvent, PodCgroup, Qos},
    cluster::Snapshot,
    kuma::{self, Dataplane, GovernRules, Governance, KumaConfig, PolicyMeta},
};

/// How the node's workloads are decided.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kuma: KumaConfig,
    pub govern: GovernRules,
    /// Mode of known pods that are not governed.
    pub unselected: Mode,
    /// Mode of pod cgroups the agent cannot name yet (and of the QoS parents).
    pub pending: Mode,
}

/// The pod cgroups that exist, kept up to date from [`CgroupEvent`]s.
#[derive(Debug, Clone, Default)]
pub struct Cgroups {
    /// QoS parents: path and id.
    pub qos: BTreeMap<PathBuf, u64>,
    /// Pod cgroups by path.
    pub pods: BTreeMap<PathBuf, PodCgroup>,
}

impl Cgroups {
    /// Applies watcher events; returns whether anything changed.
    pub fn apply(&mut self, events: &[CgroupEvent]) -> bool {
        let mut changed = false;
        for e in events {
            match e {
                CgroupEvent::Appeared(p) => {
                    changed |= self.pods.insert(p.path.clone(), p.clone()).as_ref() != Some(p)
                }
                CgroupEvent::Gone { path, .. } => changed |= self.pods.remove(path).is_some(),
                CgroupEvent::QosDir { path, id, .. } => {
                    changed |= self.qos.insert(path.clone(), *id) != Some(*id)
                }
                // Events were lost: the scan that follows in the same batch is the whole
                // truth, so forget what was known (a pod whose removal was lost goes).
                CgroupEvent::Overflow => {
                    changed |= !self.pods.is_empty() || !self.qos.is_empty();
                    self.pods.clear();
                    self.qos.clear();
                }
            }
        }
        changed
    }
}

/// A MeshPassthrough the agent could not use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicyProblem {
    /// `namespace/name`.
    pub policy: String,
    /// The field (`spec.default.appendMatch[0].port`, `metadata.labels[kuma.io/origin]`), if any.
    pub field: Option<String>,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(
                f,
                "MeshPassthrough {}: {field}: {}",
                self.policy, self.reason
            ),
            None => write!(f, "MeshPassthrough {}: {}", self.policy, self.reason),
        }
    }
}

/// The policies read from the API server.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    /// Valid, applied policies (shadow ones left out), with their metadata, in parallel.
    pub policies: Vec<Policy>,
    pub metas: Vec<PolicyMeta>,
    /// `kuma.io/effect: shadow` policies (valid, not applied).
    pub shadow: Vec<String>,
    /// Invalid ones, ignored.
    pub problems: Vec<PolicyProblem>,
}

/// Parses and validates every MeshPassthrough of the snapshot, each on its own.
pub fn policies(snap: &Snapshot, cfg: &KumaConfig) -> Policies {
    let mut out = Policies::default();
    for (key, obj) in &snap.policies {
        let bytes = match serde_json::to_vec(&**obj) {
            Ok(b) => b,
            Err(e) => {
                out.problems.push(PolicyProblem {
                    policy: key.clone(),
                    field: None,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let mut problems = Vec::new();
        // The "file" name is only used in the parser's messages, which are re-worded below.
        let parsed = parse::parse_bytes(Path::new("object.json"), &bytes, &mut problems);
        for p in problems {
            out.problems.push(PolicyProblem {
                policy: key.clone(),
                field: p.field,
                reason: p.message,
            });
        }
        let ns = obj.metadata.namespace.clone().unwrap_or_default();
        let name = obj.metadata.name.clone().unwrap_or_default();
        let meta = match kuma::policy_meta(
            &name,
            &ns,
            obj.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
            obj.metadata
                .annotations
                .as_ref()
                .unwrap_or(&BTreeMap::new()),
            cfg,
        ) {
            Ok(m) => m,
            Err(e) => {
                let (field, reason) = e.split_once(": ").unwrap_or(("", &e));
                out.problems.push(PolicyProblem {
                    policy: key.clone(),
                    field: Some(field.to_string()).filter(|f| !f.is_empty()),
                    reason: reason.to_string(),
                });
                continue;
            }
        };
        for p in parsed {
            match validate::validate(&p) {
                Ok(mut pol) => {
                    // Name policies `namespace/name` in explanations, events and metrics.
                    pol.name = key.clone();
                    pol.meta = meta.clone();
                    let file: std::sync::Arc<Path> = Path::new(&format!("kubernetes:{key}")).into();
                    let name: std::sync::Arc<str> = key.as_str().into();
                    pol.file = file.to_path_buf();
                    for m in &mut pol.matches {
                        m.origin.file = file.clone();
                        m.origin.policy = name.clone();
                    }
                    if meta.is_shadow() {
                        out.shadow.push(key.clone());
                    } else {
                        out.policies.push(pol);
                        out.metas.push(meta.clone());
                    }
                }
                Err(violations) => {
                    for (field, reason) in violations {
                        out.problems.push(PolicyProblem {
                            policy: key.clone(),
                            field: Some(field),
                            reason,
                        });
                    }
                }
            }
        }
    }
    out
}

/// What a pod cgroup is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum PodState {
    /// Governed: its Dataplane and the policies selecting it (`namespace/name`, merge order).
    Governed {
        mesh: String,
        why: &'static str,
        policies: Vec<String>,
    },
    /// A known pod that is not governed.
    NotGoverned(String),
    /// The agent's own pod.
    Own,
    /// No pod of the snapshot names this cgroup yet.
    Pending,
}

/// One cgroup with an entry in the maps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// Cgroup id.
    pub id: u64,
    /// Cgroup path.
    pub cgroup: PathBuf,
    /// `namespace/name` of the pod; `pending:<uid>` or the QoS parent's directory name.
    pub name: String,
    /// The pod's UID (empty for a QoS parent).
    pub uid: String,
    /// What it is.
    pub state: PodState,
    /// Index into [`Model::confs`].
    pub conf: usize,
    /// The Dataplane, for governed pods.
    #[serde(skip)]
    pub dataplane: Option<std::sync::Arc<Dataplane>>,
}

/// Everything one apply needs.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub policies: Policies,
    pub entries: Vec<Entry>,
    /// Distinct merged configurations.
    pub confs: Vec<MergedConf>,
    /// Pods of the snapshot that are `Invalid` by Kuma's rules (`namespace/name: reason`).
    pub pod_problems: Vec<String>,
    /// The snapshot version this was computed from.
    pub snapshot_version: Option<u64>,
    /// Per pod UID, what was computed (reused while the snapshot is the same).
    pub pods: HashMap<String, PodResult>,
    /// What each of `confs` was computed from.
    conf_keys: Vec<ConfKey>,
}

impl Model {
    /// `(cgroup id, conf index)` of every entry.
    pub fn of(&self) -> Vec<(u64, usize)> {
        self.entries.iter().map(|e| (e.id, e.conf)).collect()
    }

    /// `(cgroup id, name)` for metrics and events.
    pub fn names(&self) -> Vec<(u64, String)> {
        self.entries
            .iter()
            .map(|e| (e.id, e.name.clone()))
            .collect()
    }

    /// Whether `other` would write the same maps.
    pub fn same_plan(&self, other: &Model) -> bool {
        self.confs == other.confs && self.of() == other.of()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
enum ConfKey {
    Selected(Vec<usize>),
    Mode(Mode),
}

/// Computes the model.
pub fn build(snap: &Snapshot, cgroups: &Cgroups, s: &Settings) -> Model {
    build_from(snap, cgroups, s, None)
}

/// What one known pod is, before configurations are numbered.
#[derive(Debug, Clone)]
pub struct PodResult {
    name: String,
    state: PodState,
    key: ConfKey,
    dataplane: Option<std::sync::Arc<Dataplane>>,
    problem: Option<String>,
}

fn pod_result(
    pod: &k8s_openapi::api::core::v1::Pod,
    snap: &Snapshot,
    services: &HashMap<String, Vec<&k8s_openapi::api::core::v1::Service>>,
    node_labels: &BTreeMap<String, String>,
    policies: &Policies,
    s: &Settings,
) -> PodResult {
    let key = kuma::pod_key(pod);
    let ns_name = pod.metadata.namespace.clone().unwrap_or_default();
    let ns = snap.namespaces.get(&ns_name).map(|n| &**n);
    let mut problem = None;
    let (state, conf_key, dataplane) = match kuma::governed(pod, ns, &s.govern, &s.kuma) {
        Governance::NotGoverned(_) if s.govern.own_pod.as_deref() == Some(key.as_str()) => {
            (PodState::Own, ConfKey::Mode(Mode::All), None)
        }
        Governance::NotGoverned(why) => (
            PodState::NotGoverned(why.to_string()),
            ConfKey::Mode(s.unselected),
            None,
        ),
        Governance::Invalid(reason) => {
            problem = Some(format!("{key}: {reason}"));
            (
                PodState::NotGoverned(reason),
                ConfKey::Mode(s.unselected),
                None,
            )
        }
        Governance::Governed { mesh, why } => {
            let no_services = Vec::new();
            let svcs = services.get(&ns_name).unwrap_or(&no_services);
            let dp = kuma::dataplane_for(
                pod,
                &mesh,
                svcs,
                &snap.endpoint_slices,
                &snap.controllers,
                node_labels,
                &s.kuma,
            );
            let sel = selecting(policies, &dp);
            let names = sel
                .iter()
                .map(|i| policies.policies[*i].name.clone())
                .collect();
            (
                PodState::Governed {
                    mesh,
                    why,
                    policies: names,
                },
                ConfKey::Selected(sel),
                Some(std::sync::Arc::new(dp)),
            )
        }
    };
    PodResult {
        name: key,
        state,
        key: conf_key,
        dataplane,
        problem,
    }
}

/// Computes the model, reusing what `prev` computed per pod when the cluster snapshot is the
/// same one (only cgroups changed): a pod cgroup that appears costs one pod's computation,
/// not the node's.
pub fn build_from(snap: &Snapshot, cgroups: &Cgroups, s: &Settings, prev: Option<&Model>) -> Model {
    let reuse = prev.filter(|p| p.snapshot_version == Some(snap.version));
    let policies = match reuse {
        Some(p) => p.policies.clone(),
        None => policies(snap, &s.kuma),
    };
    let mut confs: Vec<MergedConf> = Vec::new();
    let mut conf_keys: Vec<ConfKey> = Vec::new();
    let mut index: HashMap<ConfKey, usize> = HashMap::new();
    let mut conf_of = |key: &ConfKey| -> usize {
        if let Some(i) = index.get(key) {
            return *i;
        }
        conf_keys.push(key.clone());
        confs.push(match key {
            ConfKey::Selected(sel) => merge::merge_indices(&policies.policies, sel, s.unselected),
            ConfKey::Mode(m) => MergedConf {
                mode: *m,
                matches: Vec::new(),
                policies: Vec::new(),
            },
        });
        index.insert(key.clone(), confs.len() - 1);
        confs.len() - 1
    };
    // Pods by UID, mirror pods also by the static pod's UID (the cgroup's).
    let mut by_uid: HashMap<&str, &k8s_openapi::api::core::v1::Pod> = HashMap::new();
    for p in snap.pods.values() {
        if let Some(uid) = p.metadata.uid.as_deref() {
            by_uid.insert(uid, p);
        }
        if let Some(m) = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("kubernetes.io/config.mirror"))
        {
            by_uid.insert(m.as_str(), p);
        }
    }
    let node_labels = snap
        .node
        .as_ref()
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    let mut services = None;

    let mut entries = Vec::new();
    let mut pod_problems = Vec::new();
    let mut results: HashMap<String, PodResult> = HashMap::new();
    let pending = ConfKey::Mode(s.pending);
    for (path, id) in &cgroups.qos {
        let conf = conf_of(&pending);
        entries.push(Entry {
            id: *id,
            cgroup: path.clone(),
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            uid: String::new(),
            state: PodState::Pending,
            conf,
            dataplane: None,
        });
    }
    for cg in cgroups.pods.values() {
        let Some(pod) = by_uid.get(cg.uid.as_str()) else {
            let conf = conf_of(&pending);
            entries.push(Entry {
                id: cg.id,
                cgroup: cg.path.clone(),
                name: format!("pending:{}", cg.uid),
                uid: cg.uid.clone(),
                state: PodState::Pending,
                conf,
                dataplane: None,
            });
            continue;
        };
        let r = match reuse.and_then(|p| p.pods.get(&cg.uid)) {
            Some(r) => r.clone(),
            None => {
                let services = services.get_or_insert_with(|| {
                    kuma::services_by_namespace(snap.services.values().map(|s| &**s))
                });
                pod_result(pod, snap, services, &node_labels, &policies, s)
            }
        };
        if let Some(p) = &r.problem {
            pod_problems.push(p.clone());
        }
        let conf = conf_of(&r.key);
        entries.push(Entry {
            id: cg.id,
            cgroup: cg.path.clone(),
            name: r.name.clone(),
            uid: cg.uid.clone(),
            state: r.state.clone(),
            conf,
            dataplane: r.dataplane.clone(),
        });
        results.insert(cg.uid.clone(), r);
    }
    Model {
        policies,
        entries,
        confs,
        pod_problems,
        snapshot_version: Some(snap.version),
        pods: results,
        conf_keys,
    }
}

/// For a pod cgroup that just appeared: the id of a cgroup of `model` that has exactly the
/// configuration this one gets, so the caller can enforce it at once (one map update) before
/// the whole model is recomputed. `None` when `model` was not computed from `snap`, or the
/// cgroup's configuration is one no workload has yet (the full recomputation handles it).
pub fn like_for(model: &Model, snap: &Snapshot, cg: &PodCgroup, s: &Settings) -> Option<u64> {
    if model.snapshot_version != Some(snap.version) {
        return None;
    }
    let pod = snap.pods.get(&cg.uid).or_else(|| {
        snap.pods.values().find(|p| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("kubernetes.io/config.mirror"))
                == Some(&cg.uid)
        })
    });
    let key = match pod {
        None => ConfKey::Mode(s.pending),
        Some(pod) => match model.pods.get(&cg.uid) {
            Some(r) => r.key.clone(),
            None => {
                let services = kuma::services_by_namespace(snap.services.values().map(|s| &**s));
                let node_labels = snap
                    .node
                    .as_ref()
                    .and_then(|n| n.metadata.labels.clone())
                    .unwrap_or_default();
                pod_result(pod, snap, &services, &node_labels, &model.policies, s).key
            }
        },
    };
    let conf = model.conf_keys.iter().position(|k| *k == key)?;
    model.entries.iter().find(|e| e.conf == conf).map(|e| e.id)
}

/// Indices of the policies selecting `dp`, in merge order (least → most specific).
pub fn selecting(p: &Policies, dp: &Dataplane) -> Vec<usize> {
    let mut sel: Vec<usize> = (0..p.policies.len())
        .filter(|&i| kuma::selects(&p.metas[i], &p.policies[i].target, dp))
        .collect();
    sel.sort_by(|&a, &b| {
        kuma::order(
            (&p.metas[a], &p.policies[a].target),
            (&p.metas[b], &p.policies[b].target),
        )
    });
    sel
}

/// The QoS class of a cgroup event, for logs.
pub fn qos_word(q: Qos) -> &'static str {
    match q {
        Qos::Guaranteed => "guaranteed",
        Qos::Burstable => "burstable",
        Qos::BestEffort => "besteffort",
    }
}

/// One pod's answer for `explain`: whether it is governed, its Dataplane, the policies that
/// select it in merge order and the merged configuration.
#[derive(Debug, Clone)]
pub struct PodExplain {
    pub pod: String,
    pub governance: Governance,
    pub dataplane: Option<Dataplane>,
    pub conf: MergedConf,
    pub problems: Vec<PolicyProblem>,
}

/// Explains pod `namespace/name` of the snapshot; `None` when the snapshot has no such pod.
pub fn explain_pod(snap: &Snapshot, key: &str, s: &Settings) -> Option<PodExplain> {
    let pod = snap.pods.values().find(|p| kuma::pod_key(p) == key)?;
    let policies = policies(snap, &s.kuma);
    let ns_name = pod.metadata.namespace.clone().unwrap_or_default();
    let ns = snap.namespaces.get(&ns_name).map(|n| &**n);
    let governance = kuma::governed(pod, ns, &s.govern, &s.kuma);
    let mode_conf = |m: Mode| MergedConf {
        mode: m,
        matches: Vec::new(),
        policies: Vec::new(),
    };
    let (dataplane, conf) = match &governance {
        Governance::Governed { mesh, .. } => {
            let services: Vec<&k8s_openapi::api::core::v1::Service> =
                snap.services.values().map(|s| &**s).collect();
            let node_labels = snap
                .node
                .as_ref()
                .and_then(|n| n.metadata.labels.clone())
                .unwrap_or_default();
            let dp = kuma::dataplane_for(
                pod,
                mesh,
                &services,
                &snap.endpoint_slices,
                &snap.controllers,
                &node_labels,
                &s.kuma,
            );
            let sel = selecting(&policies, &dp);
            let conf = merge::merge_indices(&policies.policies, &sel, s.unselected);
            (Some(dp), conf)
        }
        _ if s.govern.own_pod.as_deref() == Some(key) => (None, mode_conf(Mode::All)),
        _ => (None, mode_conf(s.unselected)),
    };
    Some(PodExplain {
        pod: key.to_string(),
        governance,
        dataplane,
        conf,
        problems: policies.problems,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cgroups::Qos;
    use serde_json::json;

    fn snapshot() -> Snapshot {
        let mut s = Snapshot::default();
        for (ns, inject) in [("kuma-system", false), ("shop", true)] {
            let n: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(json!({
                "metadata": {"name": ns, "labels": if inject { json!({"kuma.io/sidecar-injection": "true"}) } else { json!({}) }}
            }))
            .unwrap();
            s.namespaces.insert(ns.into(), Arc::new(n));
        }
        for i in 0..4 {
            let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("p{i}"), "namespace": "shop", "uid": format!("u{i}"), "labels": {"app": if i % 2 == 0 { "a" } else { "b" }}},
                "spec": {"containers": []}
            }))
            .unwrap();
            s.pods.insert(format!("u{i}"), Arc::new(p));
        }
        let pol =
            |name: &str, ns: &str, spec: serde_json::Value| -> Arc<kube::api::DynamicObject> {
                Arc::new(
                    serde_json::from_value(
                        json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
                    "metadata": {"name": name, "namespace": ns}, "spec": spec}),
                    )
                    .unwrap(),
                )
            };
        s.policies.insert(
            "kuma-system/base".into(),
            pol("base", "kuma-system", json!({"default": {"passthroughMode": "Matched", "appendMatch": [{"type": "IP", "value": "192.0.2.1"}]}})),
        );
        s.policies.insert(
            "shop/a".into(),
            pol("a", "shop", json!({"targetRef": {"kind": "Dataplane", "labels": {"app": "a"}}, "default": {"appendMatch": [{"type": "IP", "value": "192.0.2.2"}]}})),
        );
        s.policies.insert(
            "kuma-system/broken".into(),
            pol(
                "broken",
                "kuma-system",
                json!({"default": {"passthroughMode": "Sometimes"}}),
            ),
        );
        s.version = 7;
        s
    }

    fn settings() -> Settings {
        Settings {
            kuma: KumaConfig::default(),
            govern: GovernRules {
                kuma_rules: true,
                ..Default::default()
            },
            unselected: Mode::All,
            pending: Mode::None,
        }
    }

    fn cg(uid: &str, id: u64) -> PodCgroup {
        PodCgroup {
            uid: uid.into(),
            qos: Qos::BestEffort,
            path: PathBuf::from(format!("/kp/{uid}")),
            id,
        }
    }

    /// After an inotify overflow the rescan is the whole truth: a pod cgroup whose removal was
    /// among the lost events goes.
    #[test]
    fn overflow_forgets_what_the_rescan_did_not_find() {
        let mut cgroups = Cgroups::default();
        let qos = CgroupEvent::QosDir {
            qos: Qos::BestEffort,
            path: PathBuf::from("/kp"),
            id: 1,
        };
        assert!(cgroups.apply(&[
            qos.clone(),
            CgroupEvent::Appeared(cg("a", 10)),
            CgroupEvent::Appeared(cg("b", 11)),
        ]));
        assert!(cgroups.apply(&[
            CgroupEvent::Overflow,
            qos,
            CgroupEvent::Appeared(cg("b", 11)),
        ]));
        let ids: Vec<u64> = cgroups.pods.values().map(|p| p.id).collect();
        assert_eq!(ids, [11]);
        assert_eq!(cgroups.qos.len(), 1);
    }

    #[test]
    fn reuse_gives_the_same_model_and_pending_then_known() {
        let snap = snapshot();
        let s = settings();
        let mut cgroups = Cgroups::default();
        cgroups.qos.insert(PathBuf::from("/kp"), 1);
        for i in 0..3 {
            cgroups.pods.insert(
                PathBuf::from(format!("/kp/u{i}")),
                cg(&format!("u{i}"), 10 + i),
            );
        }
        let first = build(&snap, &cgroups, &s);
        assert_eq!(
            first.policies.problems.len(),
            1,
            "{:?}",
            first.policies.problems
        );
        assert_eq!(first.policies.problems[0].policy, "kuma-system/broken");
        // A pod cgroup appears: reusing the previous model gives what a full build gives.
        cgroups.pods.insert(PathBuf::from("/kp/u3"), cg("u3", 13));
        cgroups.pods.insert(PathBuf::from("/kp/zz"), cg("zz", 14));
        let reused = build_from(&snap, &cgroups, &s, Some(&first));
        let full = build(&snap, &cgroups, &s);
        assert_eq!(reused.of(), full.of());
        assert_eq!(reused.confs, full.confs);
        assert_eq!(reused.entries, full.entries);
        let by_name = |m: &Model, n: &str| m.entries.iter().find(|e| e.name == n).unwrap().clone();
        let a = by_name(&full, "shop/p0");
        let b = by_name(&full, "shop/p1");
        assert_eq!(full.confs[a.conf].policies, ["kuma-system/base", "shop/a"]);
        assert_eq!(full.confs[b.conf].policies, ["kuma-system/base"]);
        assert_eq!(
            full.confs[by_name(&full, "pending:zz").conf].mode,
            Mode::None
        );
        assert_eq!(full.confs[by_name(&full, "kp").conf].mode, Mode::None);
        // A changed snapshot is not reused.
        let mut snap2 = snap.clone();
        snap2.policies.remove("shop/a");
        snap2.version += 1;
        let after = build_from(&snap2, &cgroups, &s, Some(&reused));
        assert_eq!(
            after.confs[by_name(&after, "shop/p0").conf].policies,
            ["kuma-system/base"]
        );
    }

    /// A selector-less Service's EndpointSlice, through the snapshot: naming a pod re-tags it
    /// (a MeshSubset on the Service's tag selects it), dropping it un-tags it; both are snapshot
    /// changes, so nothing of the previous model is reused.
    #[test]
    fn endpointslice_changes_retag_pods() {
        let mut snap = snapshot();
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "legacy", "namespace": "shop"},
            "spec": {"ports": [{"port": 5432, "targetPort": 5432}]}
        }))
        .unwrap();
        snap.services.insert("shop/legacy".into(), Arc::new(svc));
        snap.policies.insert(
            "shop/legacy".into(),
            Arc::new(serde_json::from_value(json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
                "metadata": {"name": "legacy", "namespace": "shop"},
                "spec": {"targetRef": {"kind": "MeshSubset", "tags": {"kuma.io/service": "legacy_shop_svc_5432"}},
                         "default": {"appendMatch": [{"type": "IP", "value": "192.0.2.9"}]}}})).unwrap()),
        );
        let s = settings();
        let mut cgroups = Cgroups::default();
        for i in 0..2 {
            cgroups.pods.insert(
                PathBuf::from(format!("/kp/u{i}")),
                cg(&format!("u{i}"), 10 + i),
            );
        }
        let policies_of = |m: &Model, n: &str| {
            let e = m.entries.iter().find(|e| e.name == n).unwrap();
            m.confs[e.conf].policies.clone()
        };
        let before = build(&snap, &cgroups, &s);
        assert_eq!(policies_of(&before, "shop/p1"), ["kuma-system/base"]);
        let targets = |uids: &[&str]| kuma::SliceTargets {
            namespace: "shop".into(),
            name: "legacy-1".into(),
            service: "legacy".into(),
            uids: uids.iter().map(|u| u.to_string()).collect(),
        };
        assert!(snap.endpoint_slices.insert(targets(&["u1"])));
        snap.version += 1;
        let named = build_from(&snap, &cgroups, &s, Some(&before));
        assert_eq!(
            policies_of(&named, "shop/p1"),
            ["kuma-system/base", "shop/legacy"]
        );
        assert_eq!(
            policies_of(&named, "shop/p0"),
            ["kuma-system/base", "shop/a"]
        );
        assert!(snap.endpoint_slices.insert(targets(&["u0"])));
        snap.version += 1;
        let moved = build_from(&snap, &cgroups, &s, Some(&named));
        assert_eq!(policies_of(&moved, "shop/p1"), ["kuma-system/base"]);
        assert_eq!(
            policies_of(&moved, "shop/p0"),
            ["kuma-system/base", "shop/a", "shop/legacy"]
        );
        assert!(snap.endpoint_slices.remove("shop", "legacy-1"));
        snap.version += 1;
        let gone = build_from(&snap, &cgroups, &s, Some(&moved));
        assert_eq!(
            policies_of(&gone, "shop/p0"),
            ["kuma-system/base", "shop/a"]
        );
    }
}
