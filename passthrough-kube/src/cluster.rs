//! The agent's view of the cluster: one list + watch per resource kind, nothing per pod.
//!
//! | kind | scope |
//! |---|---|
//! | Pod | `fieldSelector=spec.nodeName=<node>` (this node's pods only) |
//! | Node | `fieldSelector=metadata.name=<node>` (labels copied onto inbound tags) |
//! | Namespace | all (injection label, mesh label) |
//! | Service | all (the Services selecting this node's pods) |
//! | MeshPassthrough (`kuma.io/v1alpha1`) | all |
//! | EndpointSlice (`discovery.k8s.io/v1`) | `labelSelector=kubernetes.io/service-name` (the slices Kuma's rule reads: selector-less Services match pods through them) |
//! | ReplicaSet (`apps/v1`), Job (`batch/v1`) | all, metadata only (their owners name a service-less pod, as in Kuma) |
//!
//! Each kind is followed by kube-rs's watcher: a list, then a watch from its resourceVersion,
//! resumed from the last one seen (bookmarks keep it fresh) when the connection drops, and
//! re-listed when the API server answers `410 Gone`. A re-list is collected aside and replaces
//! the kind's objects in one step when complete, so enforcement never sees a half-listed kind
//! (no window where a pod or policy is missing). When the API server is unreachable the last
//! complete state stays and [`Health`] says since when it has been failing.
//!
//! Of an EndpointSlice only what Kuma's rule reads is kept ([`SliceTargets`]: its Service and
//! the UIDs its endpoints name), of a ReplicaSet or Job only its owner references; an event that
//! changes none of it (an endpoint's readiness, a ReplicaSet's status) changes nothing and wakes
//! nobody.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    batch::v1::Job,
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, PartialObjectMeta},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::kuma::{Controllers, SLICE_SERVICE_LABEL, ServiceSlices, SliceTargets, owners_of};

/// The kinds watched, in [`Snapshot::synced`] order.
pub const KINDS: [&str; 8] = [
    "Pod",
    "Node",
    "Namespace",
    "Service",
    "MeshPassthrough",
    "EndpointSlice",
    "ReplicaSet",
    "Job",
];

/// The plural (path segment) of each kind, in [`KINDS`] order.
const PLURALS: [&str; 8] = [
    "pods",
    "nodes",
    "namespaces",
    "services",
    "meshpassthroughs",
    "endpointslices",
    "replicasets",
    "jobs",
];

/// Everything the agent knows about the cluster at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// This node's pods by `metadata.uid`.
    pub pods: BTreeMap<String, Arc<Pod>>,
    /// This node (a list of at most one).
    pub node: Option<Arc<Node>>,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    /// Services by `namespace/name`.
    pub services: BTreeMap<String, Arc<Service>>,
    /// MeshPassthrough objects by `namespace/name`.
    pub policies: BTreeMap<String, Arc<DynamicObject>>,
    /// EndpointSlices (what Kuma's selector-less Service rule reads of them).
    pub endpoint_slices: ServiceSlices,
    /// The owners of every ReplicaSet and Job (the service-less name of their pods).
    pub controllers: Controllers,
    /// Whether each kind ([`KINDS`] order) has completed its first list.
    pub synced: [bool; KINDS.len()],
    /// Bumped on every change.
    pub version: u64,
}

impl Snapshot {
    /// Every kind has been listed once.
    pub fn complete(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }
}

/// Connection health of the watchers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Per kind ([`KINDS`] order): the last error and when it happened, cleared by the next
    /// event received.
    pub failing: [Option<(SystemTime, String)>; KINDS.len()],
}

impl Health {
    /// The oldest failure still unresolved, if any (kind, since, message).
    pub fn worst(&self) -> Option<(&'static str, SystemTime, &str)> {
        self.failing
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|(t, m)| (KINDS[i], *t, m.as_str())))
            .min_by_key(|(_, t, _)| *t)
    }
}

/// The MeshPassthrough resource (`kuma.io/v1alpha1`, plural `meshpassthroughs`).
pub fn meshpassthrough_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kuma.io", "v1alpha1", "MeshPassthrough"),
        "meshpassthroughs",
    )
}

/// The client configuration from `kubeconfig` if given, else the in-cluster configuration
/// (service account token and CA), else `$KUBECONFIG` / `~/.kube/config`.
pub async fn config(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Config> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("--kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| anyhow::anyhow!("--kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| anyhow::anyhow!("no in-cluster configuration and no kubeconfig: {e}"))?,
    };
    Ok(config)
}

/// Which kind ([`KINDS`] index) a request path is for.
fn kind_of_path(path: &str) -> Option<usize> {
    let plural = path.rsplit('/').next()?;
    PLURALS.iter().position(|p| *p == plural)
}

/// A tower layer that clears a kind's failure as soon as a request for it succeeds again (a
/// re-opened watch sends no event until something changes, so the watcher alone cannot tell).
#[derive(Clone)]
struct Observe<S> {
    inner: S,
    health: Arc<watch::Sender<Health>>,
}

impl<S, B> tower::Service<http::Request<kube::client::Body>> for Observe<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    B: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let kind = kind_of_path(req.uri().path());
        let fut = self.inner.call(req);
        let health = self.health.clone();
        Box::pin(async move {
            let r = fut.await;
            if let (Some(k), Ok(resp)) = (kind, &r)
                && resp.status().is_success()
            {
                health.send_if_modified(|h| h.failing[k].take().is_some());
            }
            r
        })
    }
}

/// The running watchers: the latest snapshot and health, each on a `watch` channel.
pub struct Cluster {
    /// Latest snapshot (changes are coalesced: a slow reader sees the newest).
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Latest health.
    pub health: watch::Receiver<Health>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What [`start`] needs.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// This node's name (`spec.nodeName` of its pods; the downward API's `spec.nodeName`).
    pub node_name: String,
    /// Server-side watch timeout in seconds (the watch is re-opened after it).
    pub watch_timeout: u32,
}

/// Starts one watcher per kind.
pub fn start(config: kube::Config, opts: &WatchOptions) -> anyhow::Result<Cluster> {
    let (snap_tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
    let (health_tx, health) = watch::channel(Health::default());
    let snap_tx = Arc::new(snap_tx);
    let health_tx = Arc::new(health_tx);
    let observed = health_tx.clone();
    let client: Client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::layer::layer_fn(move |inner| Observe {
            inner,
            health: observed.clone(),
        }))
        .build();
    let base = watcher::Config::default().timeout(opts.watch_timeout);
    let node_sel = format!("spec.nodeName={}", opts.node_name);
    let name_sel = format!("metadata.name={}", opts.node_name);
    let mut tasks = Vec::new();

    let ctx = |i: usize| Ctx {
        kind: i,
        snap: snap_tx.clone(),
        health: health_tx.clone(),
    };
    tasks.push(tokio::spawn(follow(
        Api::<Pod>::all(client.clone()),
        base.clone().fields(&node_sel),
        ctx(0),
        |s: &mut Snapshot, objs: Vec<Pod>, reset| {
            let m = &mut s.pods;
            apply_many(m, objs, reset, |p| {
                p.metadata.uid.clone().unwrap_or_default()
            })
        },
        |s: &mut Snapshot, p: Pod| {
            s.pods.remove(p.metadata.uid.as_deref().unwrap_or(""));
            true
        },
    )));
    tasks.push(tokio::spawn(follow(
        Api::<Node>::all(client.clone()),
        base.clone().fields(&name_sel),
        ctx(1),
        |s: &mut Snapshot, objs: Vec<Node>, reset| {
            if reset {
                s.node = None;
            }
            if let Some(n) = objs.into_iter().last() {
                s.node = Some(Arc::new(n));
            }
            true
        },
        |s: &mut Snapshot, _n: Node| {
            s.node = None;
            true
        },
    )));
    tasks.push(tokio::spawn(follow(
        Api::<Namespace>::all(client.clone()),
        base.clone(),
        ctx(2),
        |s: &mut Snapshot, objs: Vec<Namespace>, reset| {
            apply_many(&mut s.namespaces, objs, reset, |n| n.name_any())
        },
        |s: &mut Snapshot, n: Namespace| {
            s.namespaces.remove(&n.name_any());
            true
        },
    )));
    tasks.push(tokio::spawn(follow(
        Api::<Service>::all(client.clone()),
        base.clone(),
        ctx(3),
        |s: &mut Snapshot, objs: Vec<Service>, reset| apply_many(&mut s.services, objs, reset, key),
        |s: &mut Snapshot, o: Service| {
            s.services.remove(&key(&o));
            true
        },
    )));
    let ar = meshpassthrough_resource();
    tasks.push(tokio::spawn(follow(
        Api::<DynamicObject>::all_with(client.clone(), &ar),
        base.clone(),
        ctx(4),
        |s: &mut Snapshot, objs: Vec<DynamicObject>, reset| {
            apply_many(&mut s.policies, objs, reset, key)
        },
        |s: &mut Snapshot, o: DynamicObject| {
            s.policies.remove(&key(&o));
            true
        },
    )));
    // Only slices tied to a Service: Kuma's rule reads no other.
    tasks.push(tokio::spawn(follow(
        Api::<EndpointSlice>::all(client.clone()),
        base.clone().labels(SLICE_SERVICE_LABEL),
        ctx(5),
        |s: &mut Snapshot, objs: Vec<EndpointSlice>, reset| {
            let mut changed = reset && !s.endpoint_slices.is_empty();
            if reset {
                s.endpoint_slices.clear();
            }
            for o in &objs {
                changed |= apply_slice(&mut s.endpoint_slices, o);
            }
            changed
        },
        |s: &mut Snapshot, o: EndpointSlice| {
            s.endpoint_slices.remove(
                o.metadata.namespace.as_deref().unwrap_or(""),
                o.metadata.name.as_deref().unwrap_or(""),
            )
        },
    )));
    // Metadata only (`PartialObjectMeta`): the owner references are all that is read.
    tasks.push(tokio::spawn(follow(
        Api::<PartialObjectMeta<ReplicaSet>>::all(client.clone()),
        base.clone(),
        ctx(6),
        |s: &mut Snapshot, objs: Vec<PartialObjectMeta<ReplicaSet>>, reset| {
            apply_owners(&mut s.controllers.replica_sets, objs, reset)
        },
        |s: &mut Snapshot, o: PartialObjectMeta<ReplicaSet>| {
            s.controllers.replica_sets.remove(&key(&o)).is_some()
        },
    )));
    tasks.push(tokio::spawn(follow(
        Api::<PartialObjectMeta<Job>>::all(client),
        base,
        ctx(7),
        |s: &mut Snapshot, objs: Vec<PartialObjectMeta<Job>>, reset| {
            apply_owners(&mut s.controllers.jobs, objs, reset)
        },
        |s: &mut Snapshot, o: PartialObjectMeta<Job>| s.controllers.jobs.remove(&key(&o)).is_some(),
    )));
    Ok(Cluster {
        snapshots,
        health,
        tasks,
    })
}

fn key<K: Resource>(o: &K) -> String {
    format!(
        "{}/{}",
        o.meta().namespace.as_deref().unwrap_or(""),
        o.meta().name.as_deref().unwrap_or("")
    )
}

fn apply_many<K>(
    m: &mut BTreeMap<String, Arc<K>>,
    objs: Vec<K>,
    reset: bool,
    key: impl Fn(&K) -> String,
) -> bool {
    if reset {
        m.clear();
    }
    for o in objs {
        m.insert(key(&o), Arc::new(o));
    }
    true
}

/// Records the owners of ReplicaSets or Jobs; returns whether any changed.
fn apply_owners<K: Resource>(
    m: &mut BTreeMap<String, Arc<Vec<(String, String)>>>,
    objs: Vec<K>,
    reset: bool,
) -> bool {
    let mut changed = reset && !m.is_empty();
    if reset {
        m.clear();
    }
    for o in objs {
        let owners = owners_of(&o.meta().owner_references);
        let k = key(&o);
        if m.get(&k).is_none_or(|old| **old != owners) {
            m.insert(k, Arc::new(owners));
            changed = true;
        }
    }
    changed
}

/// Records one slice; a slice Kuma would not read (no Service label: the label selector keeps
/// those away, but a server may not honour it) is forgotten. Returns whether anything changed.
fn apply_slice(slices: &mut ServiceSlices, o: &EndpointSlice) -> bool {
    match SliceTargets::of(o) {
        Some(t) => slices.insert(t),
        None => slices.remove(
            o.metadata.namespace.as_deref().unwrap_or(""),
            o.metadata.name.as_deref().unwrap_or(""),
        ),
    }
}

struct Ctx {
    kind: usize,
    snap: Arc<watch::Sender<Arc<Snapshot>>>,
    health: Arc<watch::Sender<Health>>,
}

/// Follows one kind until the task is aborted: applies events to the shared snapshot,
/// buffering a (re-)list until it is complete. `apply` and `delete` say whether the snapshot
/// changed; an event that changed nothing neither bumps the version nor wakes the readers.
async fn follow<K, A, D>(api: Api<K>, config: watcher::Config, ctx: Ctx, apply: A, delete: D)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    A: Fn(&mut Snapshot, Vec<K>, bool) -> bool,
    D: Fn(&mut Snapshot, K) -> bool,
{
    let kind = KINDS[ctx.kind];
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut buffer: Option<Vec<K>> = None;
    let mut failing = false;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                warn!(kind, error = %e, "API watch failed; the last complete state stays in force");
                if !failing {
                    failing = true;
                    ctx.health.send_modify(|h| {
                        h.failing[ctx.kind] = Some((SystemTime::now(), e.to_string()))
                    });
                }
                continue;
            }
        };
        if failing {
            failing = false;
            info!(kind, "API watch recovered");
            ctx.health.send_modify(|h| h.failing[ctx.kind] = None);
        }
        let strip = |mut o: K| {
            o.meta_mut().managed_fields = None;
            o
        };
        match ev {
            watcher::Event::Init => buffer = Some(Vec::new()),
            watcher::Event::InitApply(o) => buffer.get_or_insert_with(Vec::new).push(strip(o)),
            watcher::Event::InitDone => {
                let objs = buffer.take().unwrap_or_default();
                ctx.snap.send_modify(|s| {
                    let s = Arc::make_mut(s);
                    apply(s, objs, true);
                    s.synced[ctx.kind] = true;
                    s.version += 1;
                });
            }
            watcher::Event::Apply(o) => {
                let o = strip(o);
                ctx.snap.send_if_modified(|s| {
                    let s = Arc::make_mut(s);
                    let changed = apply(s, vec![o], false);
                    if changed {
                        s.version += 1;
                    }
                    changed
                });
            }
            watcher::Event::Delete(o) => {
                ctx.snap.send_if_modified(|s| {
                    let s = Arc::make_mut(s);
                    let changed = delete(s, o);
                    if changed {
                        s.version += 1;
                    }
                    changed
                });
            }
        }
    }
}

/// Waits until every kind has been listed once, or `timeout`.
pub async fn wait_complete(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    timeout: Duration,
) -> Option<Arc<Snapshot>> {
    tokio::time::timeout(timeout, rx.wait_for(|s| s.complete()))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|s| s.clone())
}

/// What `passthrough explain --kubernetes --pod NS/NAME` needs, read once (a command-line tool,
/// not the agent: a few GETs and LISTs): the pod, its namespace, its namespace's Services and
/// EndpointSlices, the metadata of the ReplicaSets and Jobs that own it (if readable), its Node
/// (if readable) and every MeshPassthrough.
pub async fn fetch_for_pod(
    config: kube::Config,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Snapshot> {
    let client = Client::try_from(config)?;
    let pod: Pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| anyhow::anyhow!("pod {namespace}/{name}: {e}"))?;
    let ns: Namespace = Api::<Namespace>::all(client.clone())
        .get(namespace)
        .await
        .map_err(|e| anyhow::anyhow!("namespace {namespace}: {e}"))?;
    let services = Api::<Service>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await
        .map_err(|e| anyhow::anyhow!("services of {namespace}: {e}"))?;
    let mut controllers = Controllers::default();
    for o in pod.metadata.owner_references.iter().flatten() {
        let meta = match o.kind.as_str() {
            "ReplicaSet" => Api::<ReplicaSet>::namespaced(client.clone(), namespace)
                .get_metadata(&o.name)
                .await
                .ok()
                .map(|m| (&mut controllers.replica_sets, m.metadata)),
            "Job" => Api::<Job>::namespaced(client.clone(), namespace)
                .get_metadata(&o.name)
                .await
                .ok()
                .map(|m| (&mut controllers.jobs, m.metadata)),
            _ => None,
        };
        if let Some((m, meta)) = meta {
            m.insert(
                format!("{namespace}/{}", o.name),
                Arc::new(owners_of(&meta.owner_references)),
            );
        }
    }
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .list(&kube::api::ListParams::default().labels(SLICE_SERVICE_LABEL))
        .await
        .map_err(|e| anyhow::anyhow!("EndpointSlices of {namespace}: {e}"))?;
    let node = match pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
        Some(n) => Api::<Node>::all(client.clone()).get(&n).await.ok(),
        None => None,
    };
    let policies = Api::<DynamicObject>::all_with(client, &meshpassthrough_resource())
        .list(&Default::default())
        .await
        .map_err(|e| anyhow::anyhow!("MeshPassthrough resources: {e}"))?;
    let mut s = Snapshot::default();
    s.pods
        .insert(pod.metadata.uid.clone().unwrap_or_default(), Arc::new(pod));
    s.namespaces.insert(namespace.to_string(), Arc::new(ns));
    for svc in services.items {
        s.services.insert(key(&svc), Arc::new(svc));
    }
    for o in &slices.items {
        apply_slice(&mut s.endpoint_slices, o);
    }
    s.controllers = controllers;
    s.node = node.map(Arc::new);
    for p in policies.items {
        s.policies.insert(key(&p), Arc::new(p));
    }
    s.synced = [true; KINDS.len()];
    Ok(s)
}
