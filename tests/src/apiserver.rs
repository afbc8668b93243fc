//! A local Kubernetes API server for the watchers: the real list/watch protocol over HTTPS
//! (kube-apiserver's paths, `resourceVersion`, chunked watch streams of `ADDED` / `MODIFIED` /
//! `DELETED` / `BOOKMARK` events, `410 Gone` for a compacted resourceVersion, bearer-token
//! auth), reached through a kubeconfig exactly as a real cluster is.
//!
//! Objects are whatever the test serialises — the real k8s-openapi types for core kinds,
//! `EndpointSlice` (`discovery.k8s.io/v1`), `ReplicaSet` (`apps/v1`) and `Job` (`batch/v1`), JSON
//! for `MeshPassthrough` — kept in one store with one resourceVersion counter, as etcd does. A
//! request that asks for metadata only (`Accept: application/json;as=PartialObjectMetadata…`)
//! gets `meta.k8s.io/v1` `PartialObjectMetadata(List)` objects, as kube-apiserver answers it. Lists and watches honour `fieldSelector` (the
//! equality forms the agent sends) and `labelSelector` (equality and existence terms); on a
//! filtered watch an object that starts or stops matching arrives as `ADDED` / `DELETED`, as
//! kube-apiserver sends it.
//! Faults for the tests: [`ApiServer::drop_connections`] (abort every open connection, as a
//! network failure does), [`ApiServer::compact`] (older resourceVersions answer 410),
//! [`ApiServer::set_delay`] (slow responses), [`ApiServer::set_unavailable`] (503s),
//! [`ApiServer::stop`] / [`ApiServer::restart`] (the process goes away and comes back on the
//! same address with its store intact). [`ApiServer::requests`] records every request so a
//! test can count lists and watches per kind.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

/// The resource kinds served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Node,
    Namespace,
    Service,
    MeshPassthrough,
    EndpointSlice,
    ReplicaSet,
    Job,
}

impl Kind {
    /// Every kind served (the kinds the agent watches).
    pub const ALL: [Kind; 8] = [
        Kind::Pod,
        Kind::Node,
        Kind::Namespace,
        Kind::Service,
        Kind::MeshPassthrough,
        Kind::EndpointSlice,
        Kind::ReplicaSet,
        Kind::Job,
    ];
    fn api_version(self) -> &'static str {
        match self {
            Kind::MeshPassthrough => "kuma.io/v1alpha1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::ReplicaSet => "apps/v1",
            Kind::Job => "batch/v1",
            _ => "v1",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            Kind::MeshPassthrough => "/apis/kuma.io/v1alpha1",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1",
            Kind::ReplicaSet => "/apis/apps/v1",
            Kind::Job => "/apis/batch/v1",
            _ => "/api/v1",
        }
    }
    fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Node => "nodes",
            Kind::Namespace => "namespaces",
            Kind::Service => "services",
            Kind::MeshPassthrough => "meshpassthroughs",
            Kind::EndpointSlice => "endpointslices",
            Kind::ReplicaSet => "replicasets",
            Kind::Job => "jobs",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::MeshPassthrough => "MeshPassthrough",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ReplicaSet => "ReplicaSet",
            Kind::Job => "Job",
        }
    }
    fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::Namespace)
    }
    fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }
}

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// The kind, if the path named one.
    pub kind: Option<Kind>,
    /// `watch=true`.
    pub watch: bool,
    /// A GET of one object (not a list or watch).
    pub get: bool,
    /// The query string.
    pub query: String,
    /// Asked for metadata only (`PartialObjectMetadata`).
    pub metadata_only: bool,
}

type Key = (Kind, String, String);

struct Event {
    rv: u64,
    kind: Kind,
    ty: &'static str,
    object: Value,
    /// The object before a MODIFIED (for filtered watches: did it match before?).
    prev: Option<Value>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Event>,
    /// Watches from a resourceVersion below this answer 410 Gone.
    compacted: u64,
}

struct Faults {
    delay: Duration,
    unavailable: bool,
    bookmark_every: Duration,
}

struct Inner {
    store: Mutex<Store>,
    changed: Notify,
    faults: Mutex<Faults>,
    log: Mutex<Vec<Logged>>,
    token: String,
    tls: TlsAcceptor,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

/// The running server.
pub struct ApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

type Body = BoxBody<Bytes, Infallible>;

impl ApiServer {
    /// Starts a server on `127.0.0.1:<free port>` and writes its kubeconfig (CA file, bearer
    /// token). Must be called inside a tokio runtime.
    pub async fn start() -> Result<ApiServer> {
        let pki = crate::l7::Pki::new(&["127.0.0.1", "localhost"])?;
        let mut cfg = (*pki.server).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let dir = tempfile::tempdir()?;
        let ca = pki.write_ca(dir.path())?;
        let token = format!("pt-test-{}", crate::unique_suffix());
        let inner = Arc::new(Inner {
            store: Mutex::new(Store::default()),
            changed: Notify::new(),
            faults: Mutex::new(Faults {
                delay: Duration::ZERO,
                unavailable: false,
                bookmark_every: Duration::from_millis(500),
            }),
            log: Mutex::new(Vec::new()),
            token: token.clone(),
            tls: TlsAcceptor::from(Arc::new(cfg)),
            connections: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://{addr}\n    certificate-authority: {}\nusers:\n- name: agent\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context: {{cluster: local, user: agent}}\ncurrent-context: local\n",
                ca.display()
            ),
        )?;
        let accept = Some(tokio::spawn(accept_loop(listener, inner.clone())));
        Ok(ApiServer {
            inner,
            addr,
            accept,
            dir,
            kubeconfig,
        })
    }

    /// The kubeconfig file that reaches this server.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A scratch directory that lives as long as the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Creates or replaces an object (by apiVersion/kind/namespace/name); returns its new
    /// resourceVersion. Watchers get ADDED or MODIFIED.
    pub fn apply<T: Serialize>(&self, obj: &T) -> u64 {
        let mut v = serde_json::to_value(obj).expect("serialisable object");
        let api = v["apiVersion"].as_str().unwrap_or("").to_string();
        let k = v["kind"].as_str().unwrap_or("").to_string();
        let kind = Kind::of(&api, &k).unwrap_or_else(|| panic!("kind {api}/{k} is not served"));
        let ns = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = v["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        assert_eq!(kind.namespaced(), !ns.is_empty(), "{k} {name}: namespace");
        let mut s = self.inner.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let key = (kind, ns, name);
        let existing = s.objects.get(&key);
        let prev = existing.cloned();
        let ty = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let meta = v["metadata"].as_object_mut().expect("metadata");
        if meta.get("uid").is_none_or(Value::is_null) {
            let uid = existing
                .and_then(|e| e["metadata"]["uid"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("00000000-0000-4000-8000-{rv:012x}"));
            meta.insert("uid".into(), json!(uid));
        }
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.entry("creationTimestamp")
            .or_insert(json!("2026-01-01T00:00:00Z"));
        s.objects.insert(key, v.clone());
        s.history.push(Event {
            rv,
            kind,
            ty,
            object: v,
            prev,
        });
        drop(s);
        self.inner.changed.notify_waiters();
        rv
    }

    /// Deletes an object; watchers get DELETED. Returns whether it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut s = self.inner.store.lock().unwrap();
        let Some(mut v) = s
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))
        else {
            return false;
        };
        s.rv += 1;
        let rv = s.rv;
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.history.push(Event {
            rv,
            kind,
            ty: "DELETED",
            object: v,
            prev: None,
        });
        drop(s);
        self.inner.changed.notify_waiters();
        true
    }

    /// The current object, as stored.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let s = self.inner.store.lock().unwrap();
        s.objects
            .get(&(kind, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Forgets the event history: a watch resuming from any earlier resourceVersion gets
    /// `410 Gone` (what etcd compaction does), so the client must re-list.
    pub fn compact(&self) {
        let mut s = self.inner.store.lock().unwrap();
        s.compacted = s.rv + 1;
        s.history.clear();
    }

    /// Aborts every open connection (watches included) without a clean end of stream.
    pub fn drop_connections(&self) {
        for c in self.inner.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Delays every response by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.inner.faults.lock().unwrap().delay = d;
    }

    /// Answers every request with `503 Service Unavailable` while `on`.
    pub fn set_unavailable(&self, on: bool) {
        self.inner.faults.lock().unwrap().unavailable = on;
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK (default 500 ms).
    pub fn set_bookmark_every(&self, d: Duration) {
        self.inner.faults.lock().unwrap().bookmark_every = d;
    }

    /// Stops listening and drops every connection (the store is kept).
    pub fn stop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        self.drop_connections();
    }

    /// Listens again on the same address (after [`stop`](Self::stop)): an API server restart.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("rebinding the API server address"),
            }
        };
        self.accept = Some(tokio::spawn(accept_loop(listener, self.inner.clone())));
        Ok(())
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.inner.log.lock().unwrap().clone()
    }

    /// `(lists, watches)` of `kind` so far.
    pub fn count(&self, kind: Kind) -> (usize, usize) {
        let log = self.inner.log.lock().unwrap();
        let of = log.iter().filter(|l| l.kind == Some(kind));
        let (w, l): (Vec<_>, Vec<_>) = of.filter(|l| !l.get).partition(|l| l.watch);
        (l.len(), w.len())
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.inner.log.lock().unwrap().clear();
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let inner2 = inner.clone();
        let conn = tokio::spawn(async move {
            let Ok(tls) = inner2.tls.accept(tcp).await else {
                return;
            };
            let svc = service_fn(move |req| {
                let inner = inner2.clone();
                async move { Ok::<_, Infallible>(handle(inner, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
        let mut conns = inner.connections.lock().unwrap();
        conns.retain(|c| !c.is_finished());
        conns.push(conn);
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn query_map(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `(kind, namespace, name)` of a collection path (`name` = `None`) or an object path.
fn route(path: &str) -> Option<(Kind, Option<String>, Option<String>)> {
    for k in Kind::ALL {
        let Some(rest) = path.strip_prefix(k.prefix()) else {
            continue;
        };
        let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            [p] if *p == k.plural() => return Some((k, None, None)),
            [p, name] if *p == k.plural() && !k.namespaced() => {
                return Some((k, None, Some(name.to_string())));
            }
            ["namespaces", ns, p] if *p == k.plural() && k.namespaced() => {
                return Some((k, Some(ns.to_string()), None));
            }
            ["namespaces", ns, p, name] if *p == k.plural() && k.namespaced() => {
                return Some((k, Some(ns.to_string()), Some(name.to_string())));
            }
            _ => {}
        }
    }
    None
}

/// The field selectors the agent uses: `spec.nodeName=`, `metadata.name=`,
/// `metadata.namespace=` (comma-joined, all must hold).
fn field_match(sel: &str, obj: &Value) -> bool {
    sel.split(',').filter(|p| !p.is_empty()).all(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        let v = v.trim_start_matches('=');
        let ptr = format!("/{}", k.replace('.', "/"));
        obj.pointer(&ptr).and_then(Value::as_str).unwrap_or("") == v
    })
}

/// A label selector's terms: `key`, `!key`, `key=value`, `key==value`, `key!=value`
/// (comma-joined, all must hold). `Err` for a form this server does not implement (set-based
/// `in`/`notin`), so a test never silently gets unfiltered results.
fn label_terms(sel: &str) -> Result<Vec<(String, Option<String>, bool)>, String> {
    let mut out = Vec::new();
    for t in sel.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if t.contains(" in ") || t.contains(" notin ") || t.contains('(') {
            return Err(format!(
                "set-based label selector term {t:?} not implemented"
            ));
        }
        if let Some((k, v)) = t.split_once("!=") {
            out.push((k.trim().to_string(), Some(v.trim().to_string()), false));
        } else if let Some((k, v)) = t.split_once('=') {
            let v = v.trim_start_matches('=');
            out.push((k.trim().to_string(), Some(v.trim().to_string()), true));
        } else if let Some(k) = t.strip_prefix('!') {
            out.push((k.trim().to_string(), None, false));
        } else {
            out.push((t.to_string(), None, true));
        }
    }
    Ok(out)
}

fn label_match(terms: &[(String, Option<String>, bool)], obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    terms.iter().all(|(k, v, want)| {
        let have = labels.get(k).and_then(Value::as_str);
        match v {
            None => have.is_some() == *want,
            Some(v) => (have == Some(v.as_str())) == *want,
        }
    })
}

async fn handle(inner: Arc<Inner>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let q = req.uri().query().unwrap_or("").to_string();
    let params = query_map(&q);
    let routed = route(&path);
    let watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    let metadata_only = req
        .headers()
        .get("accept")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    // What a metadata-only request gets instead of the object.
    let shape = move |o: &Value| -> Value {
        if metadata_only {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": o["metadata"]})
        } else {
            o.clone()
        }
    };
    inner.log.lock().unwrap().push(Logged {
        kind: routed.as_ref().map(|r| r.0),
        get: routed.as_ref().is_some_and(|r| r.2.is_some()),
        watch,
        query: q.clone(),
        metadata_only,
    });
    let (delay, unavailable) = {
        let f = inner.faults.lock().unwrap();
        (f.delay, f.unavailable)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if unavailable {
        return full(
            StatusCode::SERVICE_UNAVAILABLE,
            status(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
        );
    }
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {}", inner.token) {
        return full(
            StatusCode::UNAUTHORIZED,
            status(401, "Unauthorized", "Unauthorized"),
        );
    }
    if req.method() != hyper::Method::GET {
        return full(
            StatusCode::METHOD_NOT_ALLOWED,
            status(405, "MethodNotAllowed", "this test server serves GET only"),
        );
    }
    let Some((kind, ns, object)) = routed else {
        return full(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            ),
        );
    };
    if let Some(name) = object {
        let s = inner.store.lock().unwrap();
        return match s.objects.get(&(kind, ns.unwrap_or_default(), name.clone())) {
            Some(o) => full(StatusCode::OK, shape(o)),
            None => full(
                StatusCode::NOT_FOUND,
                status(
                    404,
                    "NotFound",
                    &format!("{} {name:?} not found", kind.plural()),
                ),
            ),
        };
    }
    let fields = params.get("fieldSelector").cloned().unwrap_or_default();
    let labels = match label_terms(params.get("labelSelector").map_or("", String::as_str)) {
        Ok(t) => t,
        Err(e) => return full(StatusCode::BAD_REQUEST, status(400, "BadRequest", &e)),
    };
    let selects = move |o: &Value| {
        field_match(&fields, o)
            && label_match(&labels, o)
            && ns
                .as_deref()
                .is_none_or(|n| o["metadata"]["namespace"].as_str() == Some(n))
    };
    if !watch {
        let s = inner.store.lock().unwrap();
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((k, _, _), v)| *k == kind && selects(v))
            .map(|(_, v)| shape(v))
            .collect();
        let (api_version, list_kind) = if metadata_only {
            ("meta.k8s.io/v1", "PartialObjectMetadataList".to_string())
        } else {
            (kind.api_version(), format!("{}List", kind.name()))
        };
        return full(
            StatusCode::OK,
            json!({"apiVersion": api_version, "kind": list_kind,
                   "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        );
    }
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    tokio::spawn(async move {
        let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut sent_rv = from;
        {
            let s = inner.store.lock().unwrap();
            if from < s.compacted && from != 0 {
                let msg = format!("too old resource version: {from} ({})", s.compacted);
                let _ = tx.try_send(line(
                    json!({"type": "ERROR", "object": status(410, "Expired", &msg)}),
                ));
                return;
            }
            if from == 0 {
                // A watch without a resourceVersion starts with the current objects.
                for ((k, _, _), v) in &s.objects {
                    if *k == kind && selects(v) {
                        let _ = tx.try_send(line(json!({"type": "ADDED", "object": shape(v)})));
                    }
                }
                sent_rv = s.rv;
            }
        }
        let bookmark_every = inner.faults.lock().unwrap().bookmark_every;
        let mut next_bookmark = tokio::time::Instant::now() + bookmark_every;
        loop {
            let notified = inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pending: Vec<Value> = {
                let s = inner.store.lock().unwrap();
                // A filtered watch sees an object that starts matching as ADDED and one that
                // stops matching as DELETED (the last state it matched, at the new version).
                let evs: Vec<Value> = s
                    .history
                    .iter()
                    .filter(|e| e.rv > sent_rv && e.kind == kind)
                    .filter_map(|e| {
                        let now = selects(&e.object);
                        let before = e.prev.as_ref().is_some_and(&selects);
                        match (e.ty, before, now) {
                            ("MODIFIED", false, true) => {
                                Some(json!({"type": "ADDED", "object": shape(&e.object)}))
                            }
                            ("MODIFIED", true, false) => {
                                let mut old = e.prev.clone().unwrap_or_default();
                                old["metadata"]["resourceVersion"] = json!(e.rv.to_string());
                                Some(json!({"type": "DELETED", "object": shape(&old)}))
                            }
                            (_, _, true) => Some(json!({"type": e.ty, "object": shape(&e.object)})),
                            _ => None,
                        }
                    })
                    .collect();
                sent_rv = s.rv.max(sent_rv);
                evs
            };
            for e in pending {
                if tx.send(line(e)).await.is_err() {
                    return;
                }
            }
            let wake = match deadline {
                Some(d) => d.min(next_bookmark),
                None => next_bookmark,
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
                _ = tx.closed() => return,
            }
            let now = tokio::time::Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return;
            }
            if now >= next_bookmark {
                next_bookmark = now + bookmark_every;
                if bookmarks {
                    let (api_version, kind_name) = if metadata_only {
                        ("meta.k8s.io/v1", "PartialObjectMetadata")
                    } else {
                        (kind.api_version(), kind.name())
                    };
                    let b = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind_name,
                        "metadata": {"resourceVersion": sent_rv.to_string(), "annotations": {"k8s.io/initial-events-end": "false"}}}});
                    if tx.send(line(b)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}
