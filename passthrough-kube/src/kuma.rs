//! Kuma 2.14's Kubernetes rules, re-stated (read from kumahq/kuma v2.14.3, never copied):
//!
//! - which pods are in the mesh and in which mesh ([`governed`], [`mesh_of`]):
//!   `pkg/plugins/runtime/k8s/webhooks/injector/precheck.go` (`needToInject`,
//!   `isInjectionException`), `pkg/plugins/runtime/k8s/controllers/pod_controller.go`
//!   (`kuma.io/sidecar-injected`, gateway/ingress/egress annotations) and
//!   `pkg/plugins/runtime/k8s/util/util.go` (`MeshOfByLabelOrAnnotation`);
//! - the Dataplane a pod becomes ([`dataplane_for`]): `controllers/pod_converter.go`
//!   (`PodToDataplane`: resource labels), `controllers/inbound_converter.go` (inbound tags per
//!   Service port, the service-less inbound), `controllers/serviceless_name_extractor.go`
//!   (`NameExtractor.Name`),
//!   `pod_controller.go` (`findMatchingServices`, `findByEndpointSlices`: selector-less Services
//!   through their EndpointSlices) and `pkg/core/resources/labels/compute.go`;
//! - the labels Kuma's admission webhook gives a policy ([`policy_meta`]):
//!   `webhooks/defaulter.go` + `labels/compute.go` (`ComputePolicyRole`), and the display name
//!   of `pkg/plugins/resources/k8s/store.go` (`KubernetesMetaAdapter.GetLabels`);
//! - which Dataplanes a policy selects and in which order the selecting policies merge
//!   ([`selects`], [`order`]): `pkg/plugins/policies/core/matchers/dataplane.go`
//!   (`DppSelectedByPolicy`, `dppSelectedByNamespace`, `dppSelectedByZone`, `SortByTargetRef`),
//!   `pkg/core/kri/kri.go` and `rules/resolve/backendref.go` (`TargetRefToKRI`).
//!
//! docs/kubernetes.md states the same rules for operators.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

pub const MESH_LABEL: &str = "kuma.io/mesh";
pub const SIDECAR_INJECTION: &str = "kuma.io/sidecar-injection";
pub const SIDECAR_INJECTED: &str = "kuma.io/sidecar-injected";
pub const SERVICE_TAG: &str = "kuma.io/service";
pub const ZONE_TAG: &str = "kuma.io/zone";
pub const ENV_TAG: &str = "kuma.io/env";
pub const ORIGIN_LABEL: &str = "kuma.io/origin";
pub const ROLE_LABEL: &str = "kuma.io/policy-role";
pub const DISPLAY_NAME: &str = "kuma.io/display-name";
pub const EFFECT_LABEL: &str = "kuma.io/effect";
pub const PROXY_TYPE_LABEL: &str = "kuma.io/proxy-type";
pub const NAMESPACE_TAG: &str = "k8s.kuma.io/namespace";
pub const SERVICE_NAME_TAG: &str = "k8s.kuma.io/service-name";
pub const SERVICE_PORT_TAG: &str = "k8s.kuma.io/service-port";
pub const SERVICE_ACCOUNT_LABEL: &str = "k8s.kuma.io/service-account";
pub const WORKLOAD_LABEL: &str = "kuma.io/workload";
pub const PROTOCOL_TAG: &str = "kuma.io/protocol";
pub const INSTANCE_TAG: &str = "kuma.io/instance";
pub const IGNORE_ANNOTATION: &str = "kuma.io/ignore";
pub const ZONE_PROXY_TYPE_LABEL: &str = "k8s.kuma.io/zone-proxy-type";
/// The label tying an EndpointSlice to its Service (`discovery.k8s.io/v1`).
pub const SLICE_SERVICE_LABEL: &str = "kubernetes.io/service-name";
pub const SIDECAR_CONTAINER: &str = "kuma-sidecar";
/// The service-less inbound's port (IANA reserved), as Kuma uses it.
pub const SERVICELESS_PORT: u32 = 49151;

/// Settings that mirror the Kuma control plane's configuration.
#[derive(Debug, Clone)]
pub struct KumaConfig {
    /// `--system-namespace` (Kuma: `store.kubernetes.systemNamespace`).
    pub system_namespace: String,
    /// `--zone` (Kuma: `multizone.zone.name`, default `default`); empty = no zone labels.
    pub zone: String,
    /// Node labels copied onto inbound tags (Kuma's `nodeLabelsToCopy` default).
    pub node_labels_to_copy: Vec<String>,
    /// Pods with one of these labels (value `*` = any) are never injected (Kuma's injector
    /// `exceptions.labels` default).
    pub injection_exceptions: Vec<(String, String)>,
    /// Selector keys ignored when matching Services to pods (`ignoredServiceSelectorLabels`).
    pub ignored_service_selector_labels: Vec<String>,
}

impl Default for KumaConfig {
    fn default() -> Self {
        KumaConfig {
            system_namespace: "kuma-system".into(),
            zone: "default".into(),
            node_labels_to_copy: vec![
                "topology.kubernetes.io/zone".into(),
                "topology.kubernetes.io/region".into(),
                "kubernetes.io/hostname".into(),
            ],
            injection_exceptions: vec![
                ("openshift.io/build.name".into(), "*".into()),
                ("openshift.io/deployer-pod-for.name".into(), "*".into()),
            ],
            ignored_service_selector_labels: Vec::new(),
        }
    }
}

/// Kuma's boolean annotation/label values: `true`/`yes`/`enabled` and `false`/`no`/`disabled`;
/// anything else is an error naming the key and value.
pub fn parse_enabled(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" | "yes" | "enabled" => Ok(true),
        "false" | "no" | "disabled" => Ok(false),
        _ => Err(format!(
            "{key}: wrong value {value:?} (enabled/disabled, true/false, yes/no)"
        )),
    }
}

fn labels_of(m: &Option<BTreeMap<String, String>>) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    m.as_ref().unwrap_or(&EMPTY)
}

/// `namespace/name` of an object, as logs, metrics and events name it.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The mesh a pod belongs to: its `kuma.io/mesh` label, its (deprecated) `kuma.io/mesh`
/// annotation, its namespace's label, the namespace's annotation, else `default`.
pub fn mesh_of(pod: &Pod, ns: Option<&Namespace>) -> String {
    let candidates = [
        labels_of(&pod.metadata.labels).get(MESH_LABEL),
        labels_of(&pod.metadata.annotations).get(MESH_LABEL),
        ns.and_then(|n| labels_of(&n.metadata.labels).get(MESH_LABEL)),
        ns.and_then(|n| labels_of(&n.metadata.annotations).get(MESH_LABEL)),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|m| !m.is_empty())
        .cloned()
        .unwrap_or_else(|| "default".into())
}

/// Why a pod is (not) governed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Governance {
    /// Enforced with the policies of this mesh.
    Governed { mesh: String, why: &'static str },
    /// Not enforced (judged by `--unselected-mode`).
    NotGoverned(&'static str),
    /// A label/annotation Kuma would refuse; the pod is not governed and the problem is
    /// reported (`field: reason`).
    Invalid(String),
}

/// Which pods the agent governs, by Kuma's rules or by selectors given on the command line.
#[derive(Debug, Clone, Default)]
pub struct GovernRules {
    /// Follow Kuma's injection rules (default on).
    pub kuma_rules: bool,
    /// Pods matching any of these are governed too.
    pub pod_selectors: Vec<crate::labelsel::Selector>,
    /// Pods whose namespace matches any of these are governed too.
    pub namespace_selectors: Vec<crate::labelsel::Selector>,
    /// The agent's own pod (`namespace/name`, from the downward API): never governed.
    pub own_pod: Option<String>,
}

/// Decides whether `pod` is governed.
///
/// Kuma's rules (kuma 2.14 injector + pod controller): a pod is in the mesh when it was
/// injected (`kuma.io/sidecar-injected: true`, or a `kuma-sidecar` container), or would be:
/// not excepted by an injector exception label, and `kuma.io/sidecar-injection` enabled on the
/// pod's *labels*, or — when the pod has no such label — on its namespace's labels. Zone
/// ingress/egress pods and builtin gateways are not sidecars and are not governed. Pods that
/// finished (`Succeeded`/`Failed`) have no cgroup left and are not governed.
pub fn governed(
    pod: &Pod,
    ns: Option<&Namespace>,
    rules: &GovernRules,
    cfg: &KumaConfig,
) -> Governance {
    if rules.own_pod.as_deref() == Some(pod_key(pod).as_str()) {
        return Governance::NotGoverned("the agent's own pod");
    }
    if let Some(phase) = pod.status.as_ref().and_then(|s| s.phase.as_deref())
        && matches!(phase, "Succeeded" | "Failed")
    {
        return Governance::NotGoverned("pod has finished");
    }
    let labels = labels_of(&pod.metadata.labels);
    let annotations = labels_of(&pod.metadata.annotations);
    let ns_labels = ns.map(|n| labels_of(&n.metadata.labels));
    let mesh = || mesh_of(pod, ns);
    for key in ["kuma.io/ingress", "kuma.io/egress"] {
        if let Some(v) = annotations.get(key) {
            match parse_enabled(key, v) {
                Ok(true) => return Governance::NotGoverned("zone ingress/egress pod"),
                Ok(false) => {}
                Err(e) => return Governance::Invalid(format!("metadata.annotations.{e}")),
            }
        }
    }
    if annotations.get("kuma.io/gateway").map(String::as_str) == Some("builtin") {
        return Governance::NotGoverned("builtin gateway pod");
    }
    if rules.pod_selectors.iter().any(|s| s.matches(labels)) {
        return Governance::Governed {
            mesh: mesh(),
            why: "--pod-selector",
        };
    }
    if let Some(nl) = ns_labels
        && rules.namespace_selectors.iter().any(|s| s.matches(nl))
    {
        return Governance::Governed {
            mesh: mesh(),
            why: "--namespace-selector",
        };
    }
    if !rules.kuma_rules {
        return Governance::NotGoverned("selected by no selector");
    }
    if let Some(v) = annotations.get(SIDECAR_INJECTED) {
        match parse_enabled(SIDECAR_INJECTED, v) {
            Ok(true) => {
                return Governance::Governed {
                    mesh: mesh(),
                    why: "kuma.io/sidecar-injected",
                };
            }
            Ok(false) => {}
            Err(e) => return Governance::Invalid(format!("metadata.annotations.{e}")),
        }
    }
    let spec = pod.spec.as_ref();
    let has_sidecar = spec.is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_CONTAINER)
    });
    if has_sidecar {
        return Governance::Governed {
            mesh: mesh(),
            why: "kuma-sidecar container",
        };
    }
    if cfg
        .injection_exceptions
        .iter()
        .any(|(k, v)| labels.get(k).is_some_and(|pv| v == "*" || v == pv))
    {
        return Governance::NotGoverned("injector exception label");
    }
    if let Some(v) = labels.get(SIDECAR_INJECTION) {
        return match parse_enabled(SIDECAR_INJECTION, v) {
            Ok(true) => Governance::Governed {
                mesh: mesh(),
                why: "pod label kuma.io/sidecar-injection",
            },
            Ok(false) => Governance::NotGoverned("pod label kuma.io/sidecar-injection disabled"),
            Err(e) => Governance::Invalid(format!("metadata.labels.{e}")),
        };
    }
    if let Some(v) = ns_labels.and_then(|l| l.get(SIDECAR_INJECTION)) {
        return match parse_enabled(SIDECAR_INJECTION, v) {
            Ok(true) => Governance::Governed {
                mesh: mesh(),
                why: "namespace label kuma.io/sidecar-injection",
            },
            Ok(false) => {
                Governance::NotGoverned("namespace label kuma.io/sidecar-injection disabled")
            }
            Err(e) => Governance::Invalid(format!("namespace metadata.labels.{e}")),
        };
    }
    Governance::NotGoverned("no kuma.io/sidecar-injection label on the pod or its namespace")
}

/// Proxy type of a Dataplane, for `targetRef.proxyTypes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ProxyType {
    Sidecar,
    Gateway,
}

/// The Dataplane Kuma makes of a pod: what policies select by.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Dataplane {
    /// The mesh.
    pub mesh: String,
    /// The Dataplane's name (= the pod's name; its display name).
    pub name: String,
    /// Its namespace (= the pod's).
    pub namespace: String,
    /// The Dataplane resource's labels (`Dataplane` targetRef `labels`).
    pub labels: BTreeMap<String, String>,
    /// One tag set per inbound (`MeshSubset` targetRef `tags`).
    pub inbounds: Vec<BTreeMap<String, String>>,
    /// Sidecar, or Gateway for delegated gateway pods (`kuma.io/gateway: enabled|provided`).
    pub proxy_type: ProxyType,
}

impl Dataplane {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the agent keeps of one EndpointSlice: the Service it belongs to (its
/// `kubernetes.io/service-name` label) and the UIDs its endpoints' `targetRef`s name. Kuma's
/// rule reads nothing else of a slice (not the addresses, ports, conditions or node names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceTargets {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub uids: BTreeSet<String>,
}

impl SliceTargets {
    /// `None` for a slice without the `kubernetes.io/service-name` label (Kuma never reads
    /// one) or without a name.
    pub fn of(slice: &EndpointSlice) -> Option<SliceTargets> {
        let service = labels_of(&slice.metadata.labels).get(SLICE_SERVICE_LABEL)?;
        let uids = slice
            .endpoints
            .iter()
            .flatten()
            .filter_map(|e| e.target_ref.as_ref()?.uid.clone())
            .filter(|u| !u.is_empty())
            .collect();
        Some(SliceTargets {
            namespace: slice.metadata.namespace.clone().unwrap_or_default(),
            name: slice.metadata.name.clone()?,
            service: service.clone(),
            uids,
        })
    }
}

/// The EndpointSlices of the cluster, by slice and by Service.
#[derive(Debug, Clone, Default)]
pub struct ServiceSlices {
    /// `namespace/name` of the slice → what it names.
    slices: BTreeMap<String, Arc<SliceTargets>>,
    /// `(namespace, service)` → the slices of that Service.
    by_service: BTreeMap<(String, String), BTreeSet<String>>,
}

impl ServiceSlices {
    /// Adds or replaces a slice (a slice whose Service label changed moves); returns whether
    /// anything the rule reads changed.
    pub fn insert(&mut self, t: SliceTargets) -> bool {
        let key = format!("{}/{}", t.namespace, t.name);
        if self.slices.get(&key).is_some_and(|old| **old == t) {
            return false;
        }
        self.remove(&t.namespace, &t.name);
        self.by_service
            .entry((t.namespace.clone(), t.service.clone()))
            .or_default()
            .insert(t.name.clone());
        self.slices.insert(key, Arc::new(t));
        true
    }

    /// Removes slice `namespace/name`; returns whether it was known.
    pub fn remove(&mut self, namespace: &str, name: &str) -> bool {
        let Some(old) = self.slices.remove(&format!("{namespace}/{name}")) else {
            return false;
        };
        let svc = (old.namespace.clone(), old.service.clone());
        if let Some(set) = self.by_service.get_mut(&svc) {
            set.remove(&old.name);
            if set.is_empty() {
                self.by_service.remove(&svc);
            }
        }
        true
    }

    /// Forgets every slice.
    pub fn clear(&mut self) {
        self.slices.clear();
        self.by_service.clear();
    }

    /// Number of slices known.
    pub fn len(&self) -> usize {
        self.slices.len()
    }

    /// No slice known.
    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }

    /// Slice `namespace/name`, if known.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&SliceTargets> {
        self.slices
            .get(&format!("{namespace}/{name}"))
            .map(|t| &**t)
    }

    /// Whether some slice of Service `namespace/service` has an endpoint whose `targetRef` is
    /// the object with UID `uid` (Kuma's `findByEndpointSlices`).
    pub fn names(&self, namespace: &str, service: &str, uid: &str) -> bool {
        if uid.is_empty() {
            return false;
        }
        let Some(set) = self
            .by_service
            .get(&(namespace.to_string(), service.to_string()))
        else {
            return false;
        };
        set.iter().any(|name| {
            self.slices
                .get(&format!("{namespace}/{name}"))
                .is_some_and(|t| t.uids.contains(uid))
        })
    }
}

/// Whether Kuma matches a Service to a pod (`findMatchingServices`): never when the Service is
/// `kuma.io/ignore`d or `ExternalName` (Kuma matches those but makes no inbound of them); a
/// Service **without a selector** (none, or empty) when one of its EndpointSlices (same
/// namespace, `kubernetes.io/service-name: <service>`) has an endpoint whose `targetRef.uid` is
/// the pod's; a Service with a selector when the selector, minus the ignored keys, matches the
/// pod's labels (a selector of ignored keys only matches every pod, as in Kuma). The Service
/// must be in the pod's namespace (the caller's job).
pub fn service_matches(svc: &Service, pod: &Pod, slices: &ServiceSlices, cfg: &KumaConfig) -> bool {
    if let Some(v) = labels_of(&svc.metadata.annotations).get(IGNORE_ANNOTATION)
        && parse_enabled(IGNORE_ANNOTATION, v) == Ok(true)
    {
        return false;
    }
    let Some(spec) = &svc.spec else { return false };
    if spec.type_.as_deref() == Some("ExternalName") {
        return false;
    }
    let mut sel = spec.selector.clone().unwrap_or_default();
    if sel.is_empty() {
        return slices.names(
            svc.metadata.namespace.as_deref().unwrap_or(""),
            svc.metadata.name.as_deref().unwrap_or(""),
            pod.metadata.uid.as_deref().unwrap_or(""),
        );
    }
    for k in &cfg.ignored_service_selector_labels {
        sel.remove(k);
    }
    let pod_labels = labels_of(&pod.metadata.labels);
    sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
}

/// Kuma's `ProtocolTagFor`: `appProtocol` if Kuma knows it, else the
/// `<port>.service.kuma.io/protocol` annotation, else `tcp`; lower-cased.
fn protocol_tag(svc: &Service, port: &ServicePort) -> String {
    const KNOWN: [&str; 6] = ["http", "http2", "grpc", "kafka", "tcp", "tls"];
    let mut value = port
        .app_protocol
        .clone()
        .filter(|p| KNOWN.contains(&p.to_ascii_lowercase().as_str()))
        .unwrap_or_default();
    if value.is_empty()
        && let Some(a) = labels_of(&svc.metadata.annotations)
            .get(&format!("{}.service.kuma.io/protocol", port.port))
    {
        value = a.clone();
    }
    if value.is_empty() {
        value = "tcp".into();
    }
    value.to_ascii_lowercase()
}

/// Kuma's `FindPort`: the container port a Service port reaches, `None` when a named target
/// port exists in no container (Kuma skips that Service port).
fn find_port(pod: &Pod, port: &ServicePort) -> Option<i32> {
    let proto = |p: Option<&str>| p.unwrap_or("TCP").to_string();
    let containers = pod.spec.as_ref().map(|s| &s.containers[..]).unwrap_or(&[]);
    match &port.target_port {
        Some(IntOrString::String(name)) => containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name.as_str())
                    && proto(p.protocol.as_deref()) == proto(port.protocol.as_deref())
            })
            .map(|p| p.container_port),
        Some(IntOrString::Int(n)) => Some(*n),
        // The API server defaults targetPort to port.
        None => Some(port.port),
    }
}

/// What Kuma's service-less name reads of the cluster's ReplicaSets and Jobs: each one's owner
/// references (kind, name), by `namespace/name` (metadata watches; nothing per pod).
#[derive(Debug, Clone, Default)]
pub struct Controllers {
    pub replica_sets: BTreeMap<String, Arc<Vec<(String, String)>>>,
    pub jobs: BTreeMap<String, Arc<Vec<(String, String)>>>,
}

/// The owner references of an object, as (kind, name).
pub fn owners_of(
    refs: &Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>,
) -> Vec<(String, String)> {
    refs.iter()
        .flatten()
        .map(|o| (o.kind.clone(), o.name.clone()))
        .collect()
}

/// The name of a pod's service-less `kuma.io/service` tag (Kuma's `NameExtractor`), from the
/// pod's owners in order: a ReplicaSet gives its Deployment (or its own name if it has no owner;
/// owned by something else, e.g. an Argo Rollout, Kuma moves on to the pod's next owner), a Job
/// gives its CronJob (likewise), any other owner its own name; no owner decides: the pod's name.
///
/// Kuma reads the ReplicaSet / Job from its cache of the API server; so does this agent
/// ([`Controllers`], from its watches). A ReplicaSet or Job not (yet) in it — its event can
/// arrive after the pod's — is read from the controllers' naming rules until it arrives: a
/// Deployment names its ReplicaSets `<deployment>-<pod-template-hash>` (the pod's
/// `pod-template-hash` label), a CronJob its Jobs `<cronjob>-<scheduled minute>` (a numeric
/// suffix of at least 8 digits).
pub fn serviceless_name(pod: &Pod, controllers: &Controllers) -> String {
    let labels = labels_of(&pod.metadata.labels);
    let ns = pod.metadata.namespace.as_deref().unwrap_or("");
    for owner in pod.metadata.owner_references.iter().flatten() {
        let (known, parent) = match owner.kind.as_str() {
            "ReplicaSet" => (&controllers.replica_sets, "Deployment"),
            "Job" => (&controllers.jobs, "CronJob"),
            _ => return owner.name.clone(),
        };
        match known.get(&format!("{ns}/{}", owner.name)) {
            Some(owners) if owners.is_empty() => return owner.name.clone(),
            Some(owners) => {
                if let Some((_, name)) = owners.iter().find(|(k, _)| k == parent) {
                    return name.clone();
                }
            }
            None => return inferred_owner(&owner.kind, &owner.name, labels),
        }
    }
    pod.metadata.name.clone().unwrap_or_default()
}

/// The Deployment / CronJob name a ReplicaSet / Job name implies by the controllers' naming.
fn inferred_owner(kind: &str, name: &str, pod_labels: &BTreeMap<String, String>) -> String {
    match kind {
        "ReplicaSet" => {
            if let Some(hash) = pod_labels.get("pod-template-hash")
                && let Some(d) = name.strip_suffix(&format!("-{hash}"))
                && !d.is_empty()
            {
                return d.to_string();
            }
        }
        _ => {
            if let Some((cj, n)) = name.rsplit_once('-')
                && n.len() >= 8
                && n.bytes().all(|b| b.is_ascii_digit())
                && !cj.is_empty()
            {
                return cj.to_string();
            }
        }
    }
    name.to_string()
}

/// The Dataplane Kuma 2.14 (zone mode, inbound tags enabled) makes of `pod`, from its
/// namespace's mesh, the Services of its namespace (any order; those [`service_matches`] says
/// match it are used, sorted by name), the cluster's EndpointSlices (for selector-less
/// Services), ReplicaSets and Jobs (the service-less name) and its node's labels.
pub fn dataplane_for(
    pod: &Pod,
    mesh: &str,
    services: &[&Service],
    slices: &ServiceSlices,
    controllers: &Controllers,
    node_labels: &BTreeMap<String, String>,
    cfg: &KumaConfig,
) -> Dataplane {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let pod_labels = labels_of(&pod.metadata.labels);
    let annotations = labels_of(&pod.metadata.annotations);
    let copied: BTreeMap<String, String> = cfg
        .node_labels_to_copy
        .iter()
        .filter_map(|k| node_labels.get(k).map(|v| (k.clone(), v.clone())))
        .collect();

    let mut selecting: Vec<&Service> = services
        .iter()
        .copied()
        .filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .filter(|s| service_matches(s, pod, slices, cfg))
        .filter(|s| !labels_of(&s.metadata.labels).contains_key(ZONE_PROXY_TYPE_LABEL))
        .collect();
    selecting.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    selecting.dedup_by(|a, b| a.metadata.name == b.metadata.name);

    let mut inbounds = Vec::new();
    for svc in &selecting {
        let spec = svc.spec.as_ref().expect("selecting services have a spec");
        let svc_name = svc.metadata.name.clone().unwrap_or_default();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            if find_port(pod, port).is_none() {
                continue;
            }
            let mut tags: BTreeMap<String, String> = pod_labels
                .iter()
                .filter(|(k, v)| !v.is_empty() && !k.contains("kuma.io/"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            tags.insert(NAMESPACE_TAG.into(), namespace.clone());
            tags.insert(SERVICE_NAME_TAG.into(), svc_name.clone());
            tags.insert(SERVICE_PORT_TAG.into(), port.port.to_string());
            tags.insert(
                SERVICE_TAG.into(),
                format!("{svc_name}_{namespace}_svc_{}", port.port),
            );
            if !cfg.zone.is_empty() {
                tags.insert(ZONE_TAG.into(), cfg.zone.clone());
            }
            tags.extend(copied.clone());
            let protocol = protocol_tag(svc, port);
            let provided_gateway = annotations
                .get("kuma.io/gateway")
                .is_some_and(|v| parse_enabled("kuma.io/gateway", v) == Ok(true));
            if !(provided_gateway && protocol != "tcp") {
                tags.insert(PROTOCOL_TAG.into(), protocol);
            }
            if spec.cluster_ip.as_deref() == Some("None") {
                tags.insert(INSTANCE_TAG.into(), name.clone());
            }
            inbounds.push(tags);
        }
    }
    if inbounds.is_empty() {
        let mut tags: BTreeMap<String, String> = pod_labels
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tags.insert(NAMESPACE_TAG.into(), namespace.clone());
        tags.insert(
            SERVICE_TAG.into(),
            format!("{}_{namespace}_svc", serviceless_name(pod, controllers)),
        );
        if !cfg.zone.is_empty() {
            tags.insert(ZONE_TAG.into(), cfg.zone.clone());
        }
        tags.insert(PROTOCOL_TAG.into(), "tcp".into());
        tags.insert(INSTANCE_TAG.into(), name.clone());
        tags.extend(copied);
        inbounds.push(tags);
    }

    // Resource labels: the pod's labels, then what labels.Compute adds on a zone CP
    // (set-if-absent for mesh/origin/zone/env/namespace, always for the rest), then the
    // display name the Kubernetes store adapter adds.
    let mut labels = pod_labels.clone();
    let mut set_if_absent = |k: &str, v: &str| {
        labels.entry(k.to_string()).or_insert_with(|| v.to_string());
    };
    set_if_absent(MESH_LABEL, mesh);
    if !cfg.zone.is_empty() {
        set_if_absent(ORIGIN_LABEL, "zone");
    }
    let origin = labels.get(ORIGIN_LABEL).cloned();
    if !cfg.zone.is_empty() && origin.as_deref() != Some("global") {
        labels
            .entry(ZONE_TAG.into())
            .or_insert_with(|| cfg.zone.clone());
        labels
            .entry(ENV_TAG.into())
            .or_insert_with(|| "kubernetes".into());
    }
    if origin.as_deref().is_none_or(|o| o == "zone") {
        labels
            .entry(NAMESPACE_TAG.into())
            .or_insert_with(|| namespace.clone());
    }
    let gateway = annotations
        .get("kuma.io/gateway")
        .is_some_and(|v| v == "enabled" || v == "provided");
    let proxy_type = if gateway {
        ProxyType::Gateway
    } else {
        ProxyType::Sidecar
    };
    labels.insert(
        PROXY_TYPE_LABEL.into(),
        if gateway { "gateway" } else { "sidecar" }.into(),
    );
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_default();
    if !sa.is_empty() {
        labels.insert(SERVICE_ACCOUNT_LABEL.into(), sa.clone());
        labels.insert(WORKLOAD_LABEL.into(), sa);
    }
    labels.insert(DISPLAY_NAME.into(), name.clone());

    Dataplane {
        mesh: mesh.to_string(),
        name,
        namespace,
        labels,
        inbounds,
        proxy_type,
    }
}

/// The metadata of a policy, with its labels (issue 18's type in passthrough-policy: origin,
/// role, display name, shadow, the zone and namespace rules, Kuma's merge order).
pub use passthrough_policy::meta::{Origin, PolicyMeta, Role, order};

/// The mesh of a policy (`kuma.io/mesh`, default `default`).
pub fn policy_mesh(meta: &PolicyMeta) -> &str {
    meta.labels
        .get(MESH_LABEL)
        .map_or("default", String::as_str)
}

/// The metadata of a MeshPassthrough read from the API server, with the labels Kuma's
/// admission webhook computes (as they would be on a cluster where Kuma runs).
/// Kuma's webhook labels: computed as Kuma's webhook does on a zone control plane: mesh (default
/// `default`), origin `zone`, zone and env when not synced from global, and for locally
/// originated policies `k8s.kuma.io/namespace` and the policy role — `system` in the system
/// namespace, `workload-owner` elsewhere (a MeshPassthrough has neither `to` nor `from`).
/// The display name is the `kuma.io/display-name` annotation, else the name.
///
/// Errors: an invalid `kuma.io/origin` (`metadata.labels[kuma.io/origin]: reason`).
pub fn policy_meta(
    name: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    cfg: &KumaConfig,
) -> Result<PolicyMeta, String> {
    let mut l = labels.clone();
    if let Some(o) = l.get(ORIGIN_LABEL)
        && !o.is_empty()
        && o != "global"
        && o != "zone"
    {
        return Err(format!(
            "metadata.labels[{ORIGIN_LABEL}]: unknown resource origin {o:?}"
        ));
    }
    l.entry(MESH_LABEL.into())
        .or_insert_with(|| "default".into());
    if !cfg.zone.is_empty() {
        l.entry(ORIGIN_LABEL.into())
            .or_insert_with(|| "zone".into());
        if l.get(ORIGIN_LABEL).map(String::as_str) != Some("global") {
            l.entry(ZONE_TAG.into()).or_insert_with(|| cfg.zone.clone());
            l.entry(ENV_TAG.into())
                .or_insert_with(|| "kubernetes".into());
        }
    }
    let local = l
        .get(ORIGIN_LABEL)
        .is_none_or(|o| o.is_empty() || o == "zone");
    if local && !namespace.is_empty() {
        l.entry(NAMESPACE_TAG.into())
            .or_insert_with(|| namespace.to_string());
        let role = if namespace == cfg.system_namespace {
            "system"
        } else {
            "workload-owner"
        };
        l.insert(ROLE_LABEL.into(), role.into());
    }
    l.insert(
        DISPLAY_NAME.into(),
        annotations
            .get(DISPLAY_NAME)
            .cloned()
            .unwrap_or_else(|| name.to_string()),
    );
    Ok(PolicyMeta {
        name: name.to_string(),
        namespace: namespace.to_string(),
        labels: l,
    })
}

/// A policy's validated `spec.targetRef` (kinds Mesh, MeshSubset, Dataplane).
pub use passthrough_policy::Target as TargetRef;

fn proxy_type_ok(types: &Option<Vec<String>>, dp: &Dataplane) -> bool {
    let want = match dp.proxy_type {
        ProxyType::Sidecar => "Sidecar",
        ProxyType::Gateway => "Gateway",
    };
    types
        .as_ref()
        .is_none_or(|t| t.is_empty() || t.iter().any(|x| x == want))
}

/// `TagSelector.Matches`: every tag present with an equal value, or `*`.
fn tags_match(sel: &BTreeMap<String, String>, tags: &BTreeMap<String, String>) -> bool {
    sel.iter()
        .all(|(k, v)| tags.get(k).is_some_and(|t| v == "*" || t == v))
}

/// Whether the policy (`meta`, `target`) selects `dp`, as Kuma's `DppSelectedByPolicy`:
/// the zone rule, then the namespace rule (a `workload-owner` or `consumer` policy only
/// selects Dataplanes of its own `k8s.kuma.io/namespace`), then the targetRef.
pub fn selects(meta: &PolicyMeta, target: &TargetRef, dp: &Dataplane) -> bool {
    if policy_mesh(meta) != dp.mesh {
        return false;
    }
    // dppSelectedByZone and dppSelectedByNamespace.
    if !meta.admits(&dp.labels) {
        return false;
    }
    match target {
        // A nil tag selector matches every inbound; every Dataplane has one.
        TargetRef::Mesh { proxy_types } => {
            proxy_type_ok(proxy_types, dp) && !dp.inbounds.is_empty()
        }
        TargetRef::MeshSubset { tags, proxy_types } => {
            proxy_type_ok(proxy_types, dp) && dp.inbounds.iter().any(|i| tags_match(tags, i))
        }
        TargetRef::Dataplane {
            name,
            namespace,
            labels,
        } => {
            let name = name.as_deref().unwrap_or("");
            let all = name.is_empty()
                && namespace.as_deref().unwrap_or("").is_empty()
                && labels.is_none();
            let by_name = !name.is_empty() && {
                // kri.From(dp) == TargetRefToKRI(kri.FromResourceMeta(policy), ref)
                let want_ns = namespace
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .or_else(|| meta.labels.get(NAMESPACE_TAG).map(String::as_str))
                    .unwrap_or("");
                let dp_ns = dp.labels.get(NAMESPACE_TAG).map_or("", String::as_str);
                let dp_zone = dp.labels.get(ZONE_TAG).map_or("", String::as_str);
                let policy_zone = meta.labels.get(ZONE_TAG).map_or("", String::as_str);
                let dp_name = dp
                    .labels
                    .get(DISPLAY_NAME)
                    .map_or(dp.name.as_str(), String::as_str);
                dp_name == name && dp_ns == want_ns && dp_zone == policy_zone
            };
            let by_labels = labels
                .as_ref()
                .is_some_and(|l| l.iter().all(|(k, v)| dp.labels.get(k) == Some(v)));
            // (`sectionName` is refused by the MeshPassthrough validator, so every inbound is
            // selected.)
            all || by_name || by_labels
        }
    }
}

/// Groups Services by namespace, for [`dataplane_for`].
pub fn services_by_namespace<'a>(
    services: impl IntoIterator<Item = &'a Service>,
) -> HashMap<String, Vec<&'a Service>> {
    let mut m: HashMap<String, Vec<&Service>> = HashMap::new();
    for s in services {
        m.entry(s.metadata.namespace.clone().unwrap_or_default())
            .or_default()
            .push(s);
    }
    m
}

#[cfg(test)]
mod tests;
