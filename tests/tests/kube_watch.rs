//! The Kubernetes watchers (`passthrough_kube::cluster`) against the local API server, reached
//! through a kubeconfig (HTTPS, CA file, bearer token) exactly as a real cluster:
//!
//! - one list and one watch per kind at start, the node's pods only (field selector), only
//!   EndpointSlices tied to a Service (label selector), nothing per pod;
//! - of an EndpointSlice only its Service and the UIDs it names are kept: an edit of anything
//!   else (an endpoint's readiness) is no new snapshot; ReplicaSets and Jobs are watched
//!   metadata-only and only their owners kept (a status edit is no new snapshot either);
//! - adds, label changes and deletes arrive through the watch;
//! - a dropped connection resumes the watch from the last resourceVersion (no re-list);
//! - `410 Gone` after compaction re-lists, and no snapshot during the re-list misses an object
//!   that exists throughout (no window of wrong enforcement);
//! - slow responses still converge; an API server that goes away leaves the last state and
//!   reports the failure; after a restart the changes made meanwhile arrive.
//!
//! No root needed.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    batch::v1::Job,
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use passthrough_kube::cluster::{self, Snapshot, WatchOptions};
use passthrough_tests::apiserver::{ApiServer, Kind};
use serde_json::json;
use tokio::sync::watch;

fn pod(ns: &str, name: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
        "status": {"qosClass": "BestEffort", "phase": "Running"}
    }))
    .unwrap()
}

/// An EndpointSlice of `service` (no label: `None`) naming `uids`, each endpoint `ready`.
fn slice(name: &str, service: Option<&str>, uids: &[&str], ready: bool) -> EndpointSlice {
    let labels = match service {
        Some(svc) => json!({"kubernetes.io/service-name": svc}),
        None => json!({}),
    };
    let endpoints: Vec<serde_json::Value> = uids
        .iter()
        .enumerate()
        .map(|(i, u)| {
            json!({"addresses": [format!("10.1.0.{i}")], "conditions": {"ready": ready},
            "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("p{i}"), "uid": u}})
        })
        .collect();
    serde_json::from_value(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [{"port": 5432}]}),
    )
    .unwrap()
}

/// ReplicaSet `name` of shop owned by Deployment `deployment`, `ready` replicas in its status.
fn replica_set(name: &str, deployment: &str, ready: i32) -> ReplicaSet {
    serde_json::from_value(json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": "shop",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment, "uid": "d1", "controller": true}]},
        "spec": {"selector": {"matchLabels": {"app": "web"}}},
        "status": {"replicas": 3, "readyReplicas": ready}}))
    .unwrap()
}

fn objects(s: &ApiServer) {
    let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}}}))
    .unwrap();
    let other: Node = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}}),
    )
    .unwrap();
    s.apply(&node);
    s.apply(&other);
    for ns in ["shop", "kuma-system"] {
        let n: Namespace = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"kuma.io/sidecar-injection": "enabled"}}}))
        .unwrap();
        s.apply(&n);
    }
    let svc: Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}))
    .unwrap();
    s.apply(&svc);
    s.apply(&slice("legacy-1", Some("legacy"), &["u-a"], true));
    s.apply(&replica_set("web-5d4f8", "storefront", 1));
    let job: Job = serde_json::from_value(json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "report-29123456", "namespace": "shop",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "nightly", "uid": "c1"}]},
        "spec": {"template": {"spec": {"containers": [{"name": "r", "image": "r"}], "restartPolicy": "Never"}}}}))
    .unwrap();
    s.apply(&job);
    // No Service label: never reaches the agent.
    s.apply(&slice("unowned", None, &["u-a"], true));
    s.apply(&pod("shop", "keep", "n1", &[("app", "web")]));
    s.apply(&pod("shop", "elsewhere", "n2", &[("app", "web")]));
    s.apply(&json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
        "metadata": {"name": "egress", "namespace": "kuma-system", "labels": {"kuma.io/mesh": "default"}},
        "spec": {"default": {"passthroughMode": "Matched"}}}));
}

fn names(s: &Snapshot) -> Vec<String> {
    let mut v: Vec<String> = s
        .pods
        .values()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    v.sort();
    v
}

async fn until(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    what: &str,
    f: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let r = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| f(s)))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|s| s.clone());
    r.unwrap_or_else(|| {
        panic!(
            "timed out waiting for {what}; last: pods {:?}",
            names(&rx.borrow())
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_follow_the_api_server_through_faults() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let mut server = ApiServer::start().await.unwrap();
    server.set_bookmark_every(Duration::from_millis(100));
    objects(&server);
    let config = cluster::config(Some(server.kubeconfig())).await.unwrap();
    let c = cluster::start(
        config,
        &WatchOptions {
            node_name: "n1".into(),
            watch_timeout: 60,
        },
    )
    .unwrap();
    let mut rx = c.snapshots.clone();
    let first = cluster::wait_complete(&mut rx, Duration::from_secs(30))
        .await
        .expect("initial sync");
    assert_eq!(names(&first), ["keep"], "only this node's pods");
    assert_eq!(
        first.node.as_ref().unwrap().metadata.name.as_deref(),
        Some("n1")
    );
    assert_eq!(first.namespaces.len(), 2);
    assert_eq!(first.services.len(), 1);
    assert!(first.policies.contains_key("kuma-system/egress"));
    assert_eq!(
        first.endpoint_slices.len(),
        1,
        "only the slice of a Service"
    );
    assert!(first.endpoint_slices.names("shop", "legacy", "u-a"));
    assert_eq!(
        *first.controllers.replica_sets["shop/web-5d4f8"],
        [("Deployment".to_string(), "storefront".to_string())]
    );
    assert_eq!(
        *first.controllers.jobs["shop/report-29123456"],
        [("CronJob".to_string(), "nightly".to_string())]
    );

    // One list + one watch per kind; the pod and node ones filtered by field selector.
    for _ in 0..200 {
        if Kind::ALL.iter().all(|k| server.count(*k).1 >= 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for k in Kind::ALL {
        assert_eq!(server.count(k), (1, 1), "{k:?}: (lists, watches)");
    }
    let reqs = server.requests();
    let pod_q: Vec<&str> = reqs
        .iter()
        .filter(|r| r.kind == Some(Kind::Pod))
        .map(|r| r.query.as_str())
        .collect();
    assert!(
        pod_q
            .iter()
            .all(|q| q.contains("fieldSelector=spec.nodeName%3Dn1")
                || q.contains("fieldSelector=spec.nodeName=n1")),
        "{pod_q:?}"
    );
    let slice_q: Vec<&str> = reqs
        .iter()
        .filter(|r| r.kind == Some(Kind::EndpointSlice))
        .map(|r| r.query.as_str())
        .collect();
    assert!(
        slice_q
            .iter()
            .all(|q| q.contains("labelSelector=kubernetes.io%2Fservice-name")
                || q.contains("labelSelector=kubernetes.io/service-name")),
        "{slice_q:?}"
    );
    assert!(
        reqs.iter()
            .filter(|r| matches!(r.kind, Some(Kind::ReplicaSet | Kind::Job)))
            .all(|r| r.metadata_only),
        "ReplicaSets and Jobs are read metadata-only: {reqs:?}"
    );
    assert!(
        reqs.iter()
            .filter(|r| r.watch)
            .all(|r| r.query.contains("allowWatchBookmarks=true"))
    );
    assert!(
        reqs.iter().all(|r| r.kind.is_some() && !r.get),
        "no other request (per-pod or discovery): {reqs:?}"
    );

    // Watch events: add, label change, delete; a pod of another node never shows up.
    server.apply(&pod("shop", "new", "n1", &[("app", "web")]));
    server.apply(&pod("shop", "far", "n2", &[]));
    until(&mut rx, "new pod", |s| names(s) == ["keep", "new"]).await;
    server.apply(&pod("shop", "new", "n1", &[("app", "api")]));
    until(&mut rx, "label change", |s| {
        s.pods.values().any(|p| {
            p.metadata.name.as_deref() == Some("new")
                && p.metadata.labels.as_ref().unwrap()["app"] == "api"
        })
    })
    .await;
    server.delete(Kind::Pod, "shop", "new");
    until(&mut rx, "delete", |s| names(s) == ["keep"]).await;

    // EndpointSlices: an edit of what the rule reads arrives; one of anything else (readiness)
    // is no new snapshot; losing the Service label is a delete on the filtered watch.
    server.apply(&slice("legacy-1", Some("legacy"), &["u-a", "u-b"], true));
    until(&mut rx, "slice names u-b", |s| {
        s.endpoint_slices.names("shop", "legacy", "u-b")
    })
    .await;
    let v = rx.borrow().version;
    server.apply(&slice("legacy-1", Some("legacy"), &["u-a", "u-b"], false));
    // The next event of the same watch (read in order): the readiness edit before it was read
    // and made no new version.
    server.apply(&slice("legacy-2", Some("legacy"), &["u-c"], true));
    let after = until(&mut rx, "slice legacy-2", |s| {
        s.endpoint_slices.names("shop", "legacy", "u-c")
    })
    .await;
    assert_eq!(
        after.version,
        v + 1,
        "a readiness-only slice edit is no change; a new slice is one"
    );
    server.delete(Kind::EndpointSlice, "shop", "legacy-2");
    until(&mut rx, "slice legacy-2 deleted", |s| {
        !s.endpoint_slices.names("shop", "legacy", "u-c")
    })
    .await;
    // A ReplicaSet's status changes all the time; its owners rarely.
    let v = rx.borrow().version;
    server.apply(&replica_set("web-5d4f8", "storefront", 3));
    server.apply(&replica_set("web-77c9d", "storefront", 0));
    let after = until(&mut rx, "second ReplicaSet", |s| {
        s.controllers.replica_sets.contains_key("shop/web-77c9d")
    })
    .await;
    assert_eq!(
        after.version,
        v + 1,
        "a status-only ReplicaSet edit is no change; a new ReplicaSet is one"
    );
    server.delete(Kind::ReplicaSet, "shop", "web-77c9d");
    until(&mut rx, "ReplicaSet deleted", |s| {
        !s.controllers.replica_sets.contains_key("shop/web-77c9d")
    })
    .await;
    server.apply(&slice("legacy-1", None, &["u-a", "u-b"], true));
    until(&mut rx, "slice without its label dropped", |s| {
        s.endpoint_slices.is_empty()
    })
    .await;
    server.apply(&slice("legacy-1", Some("legacy"), &["u-a"], true));
    until(&mut rx, "slice back", |s| {
        s.endpoint_slices.names("shop", "legacy", "u-a")
    })
    .await;
    server.delete(Kind::EndpointSlice, "shop", "legacy-1");
    until(&mut rx, "slice deleted", |s| s.endpoint_slices.is_empty()).await;

    // A checker: after the first complete snapshot, "keep" and the policy never vanish.
    let mut check = c.snapshots.clone();
    let window = tokio::spawn(async move {
        let mut bad = Vec::new();
        while check.changed().await.is_ok() {
            let s = check.borrow_and_update().clone();
            if !s
                .pods
                .values()
                .any(|p| p.metadata.name.as_deref() == Some("keep"))
                || !s.policies.contains_key("kuma-system/egress")
            {
                bad.push(s.version);
            }
        }
        bad
    });

    // Dropped connections: the watch resumes from its resourceVersion, no new list.
    server.clear_requests();
    server.drop_connections();
    server.apply(&pod("shop", "during-drop", "n1", &[]));
    until(&mut rx, "event across a dropped watch", |s| {
        names(s).contains(&"during-drop".to_string())
    })
    .await;
    assert_eq!(
        server.count(Kind::Pod).0,
        0,
        "a dropped watch resumes without a re-list"
    );

    // 410 Gone: compacted history forces a re-list; "gone-while-compacted" disappears through it.
    server.clear_requests();
    server.delete(Kind::Pod, "shop", "during-drop");
    server.compact();
    server.drop_connections();
    until(&mut rx, "re-list after 410", |s| names(s) == ["keep"]).await;
    // The delete may have arrived on the live watch before the drop; the re-list follows the
    // reconnect, after the watcher's back-off (longer than any fixed pause on a loaded machine).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while server.count(Kind::Pod).0 == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        server.count(Kind::Pod).0 >= 1,
        "410 made the pod watcher re-list"
    );

    // Slow responses.
    server.set_delay(Duration::from_millis(400));
    server.drop_connections();
    server.apply(&pod("shop", "slow", "n1", &[]));
    until(&mut rx, "event through slow responses", |s| {
        names(s).contains(&"slow".to_string())
    })
    .await;
    server.set_delay(Duration::ZERO);

    // The API server goes away: the state stays, health reports it; changes made while it is
    // down (its store survives) arrive after the restart.
    let mut health = c.health.clone();
    server.stop();
    server.apply(&pod("shop", "while-down", "n1", &[]));
    tokio::time::timeout(
        Duration::from_secs(30),
        health.wait_for(|h| h.worst().is_some()),
    )
    .await
    .expect("health reports the failure")
    .unwrap();
    assert!(
        names(&rx.borrow()).contains(&"keep".to_string()),
        "last state kept"
    );
    server.restart().await.unwrap();
    until(&mut rx, "change made while down", |s| {
        names(s).contains(&"while-down".to_string())
    })
    .await;
    tokio::time::timeout(
        Duration::from_secs(30),
        health.wait_for(|h| h.worst().is_none()),
    )
    .await
    .expect("health recovers")
    .unwrap();

    drop(c);
    let bad = window.await.unwrap();
    assert!(
        bad.is_empty(),
        "snapshots without an object that existed throughout: {bad:?}"
    );
}
