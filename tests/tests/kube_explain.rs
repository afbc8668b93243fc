//! `passthrough explain --kubernetes --pod NS/NAME` against the local API server (through a
//! kubeconfig): the real binary decides with the live objects — the pod's Dataplane identity,
//! the namespace-scoped and system policies in Kuma's merge order, invalid policies reported —
//! and prints the policies that selected the pod; a pod behind a selector-less Service gets
//! that Service's tags through its EndpointSlice; a service-less pod is named by its Job's
//! CronJob, read from the Job's metadata. No root needed.

use k8s_openapi::api::{
    batch::v1::Job,
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use passthrough_tests::apiserver::ApiServer;
use serde_json::{Value, json};

fn explain(api: &ApiServer, pod: &str, extra: &[&str]) -> (bool, String) {
    let kubeconfig = api.kubeconfig().display().to_string();
    let mut args = vec![
        "explain",
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--pod",
        pod,
    ];
    args.extend_from_slice(extra);
    passthrough_tests::cli(args)
}

#[test]
fn explain_decides_with_the_live_cluster_objects() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let api = rt.block_on(ApiServer::start()).unwrap();
    for (ns, inject) in [("kuma-system", false), ("shop", true), ("plain", false)] {
        let labels = if inject {
            json!({"kuma.io/sidecar-injection": "enabled"})
        } else {
            json!({})
        };
        let n: Namespace = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}})).unwrap();
        api.apply(&n);
    }
    let svc: Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}))
    .unwrap();
    api.apply(&svc);
    for (ns, name) in [("shop", "web-1"), ("plain", "other")] {
        let p: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "app"}]}}))
        .unwrap();
        api.apply(&p);
    }
    // System: None for everyone; shop's own policy (workload-owner, applied after it) allows
    // 203.0.113.5:443 in Matched mode; a policy of "plain" never reaches shop's pods.
    api.apply(
        &json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
        "metadata": {"name": "deny-all", "namespace": "kuma-system"},
        "spec": {"default": {"passthroughMode": "None"}}}),
    );
    api.apply(&json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
        "metadata": {"name": "web-egress", "namespace": "shop"},
        "spec": {"targetRef": {"kind": "MeshSubset", "tags": {"kuma.io/service": "web_shop_svc_80"}},
                 "default": {"passthroughMode": "Matched", "appendMatch": [{"type": "IP", "value": "203.0.113.5", "port": 443}]}}}));
    api.apply(
        &json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
        "metadata": {"name": "open", "namespace": "plain"},
        "spec": {"default": {"passthroughMode": "All"}}}),
    );
    api.apply(&json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
        "metadata": {"name": "broken", "namespace": "kuma-system"},
        "spec": {"default": {"appendMatch": [{"type": "Domain", "value": "x.test", "port": 443}]}}}));

    let (ok, out) = explain(&api, "shop/web-1", &["--dst", "203.0.113.5:443", "--json"]);
    assert!(ok, "{out}");
    let j: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(j["verdict"], "allow", "{j}");
    assert_eq!(
        j["policies"],
        json!(["kuma-system/deny-all", "shop/web-egress"]),
        "merge order: {j}"
    );
    assert_eq!(j["governance"]["governed"], true);
    assert_eq!(j["inbounds"][0]["kuma.io/service"], "web_shop_svc_80");
    assert!(
        j["invalid_policies"][0]
            .as_str()
            .unwrap()
            .starts_with("MeshPassthrough kuma-system/broken: spec.default.appendMatch[0]"),
        "{j}"
    );

    let (ok, out) = explain(&api, "shop/web-1", &["--dst", "198.51.100.9:443"]);
    assert!(ok, "{out}");
    assert!(out.starts_with("verdict: deny"), "{out}");
    assert!(
        out.contains("from kuma-system/deny-all, shop/web-egress (least → most specific)"),
        "{out}"
    );
    assert!(out.contains("pod:      shop/web-1: governed (mesh default; namespace label kuma.io/sidecar-injection)"), "{out}");
    assert!(
        out.contains("ignored:  MeshPassthrough kuma-system/broken"),
        "{out}"
    );

    // Not governed: --unselected-mode.
    let (ok, out) = explain(
        &api,
        "plain/other",
        &["--dst", "198.51.100.9:443", "--json"],
    );
    assert!(ok, "{out}");
    let j: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(j["governance"]["governed"], false, "{j}");
    assert_eq!(j["verdict"], "allow");
    assert_eq!(j["mode"], "All");

    // A selector-less Service: the pod its EndpointSlice names gets its inbound and the
    // MeshSubset policy on its tag; without the slice, the service-less inbound.
    let legacy: Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "legacy", "namespace": "shop"},
        "spec": {"ports": [{"port": 5432, "targetPort": 5432}]}}))
    .unwrap();
    api.apply(&legacy);
    let p: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "db-client", "namespace": "shop", "uid": "c0ffee00-0000-4000-8000-000000000001",
                     "labels": {"app": "client"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "app"}]}}))
    .unwrap();
    api.apply(&p);
    api.apply(&json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
        "metadata": {"name": "legacy-egress", "namespace": "shop"},
        "spec": {"targetRef": {"kind": "MeshSubset", "tags": {"kuma.io/service": "legacy_shop_svc_5432"}},
                 "default": {"passthroughMode": "Matched", "appendMatch": [{"type": "IP", "value": "203.0.113.7", "port": 5432}]}}}));
    let (ok, out) = explain(
        &api,
        "shop/db-client",
        &["--dst", "203.0.113.7:5432", "--json"],
    );
    assert!(ok, "{out}");
    let j: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(j["verdict"], "deny", "no slice yet: {j}");
    assert_eq!(
        j["inbounds"][0]["kuma.io/service"], "db-client_shop_svc",
        "{j}"
    );
    let slice: EndpointSlice = serde_json::from_value(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "legacy-abc12", "namespace": "shop", "labels": {"kubernetes.io/service-name": "legacy"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.9"], "targetRef": {"kind": "Pod", "namespace": "shop", "name": "db-client",
                                                                "uid": "c0ffee00-0000-4000-8000-000000000001"}}]}))
    .unwrap();
    api.apply(&slice);
    let (ok, out) = explain(
        &api,
        "shop/db-client",
        &["--dst", "203.0.113.7:5432", "--json"],
    );
    assert!(ok, "{out}");
    let j: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(j["verdict"], "allow", "{j}");
    assert_eq!(
        j["inbounds"][0]["kuma.io/service"], "legacy_shop_svc_5432",
        "{j}"
    );
    assert_eq!(
        j["policies"],
        json!(["kuma-system/deny-all", "shop/legacy-egress"]),
        "{j}"
    );

    // A pod of Job `export-7`, which CronJob `billing` owns: `billing_shop_svc`, which the Job's
    // name does not tell (no 8-digit minute suffix).
    let job: Job = serde_json::from_value(json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "export-7", "namespace": "shop",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "billing", "uid": "cj"}]},
        "spec": {"template": {"spec": {"containers": [{"name": "e", "image": "e"}], "restartPolicy": "Never"}}}}))
    .unwrap();
    api.apply(&job);
    let p: Pod = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "export-7-x5k2p", "namespace": "shop", "labels": {"job-name": "export-7"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "export-7", "uid": "j"}]},
        "spec": {"nodeName": "n1", "containers": [{"name": "e", "image": "e"}]}}))
    .unwrap();
    api.apply(&p);
    let (ok, out) = explain(
        &api,
        "shop/export-7-x5k2p",
        &["--dst", "203.0.113.7:5432", "--json"],
    );
    assert!(ok, "{out}");
    let j: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        j["inbounds"][0]["kuma.io/service"], "billing_shop_svc",
        "{j}"
    );

    let (ok, out) = explain(&api, "shop/nope", &["--dst", "198.51.100.9:443"]);
    assert!(!ok);
    assert!(out.contains("pod shop/nope"), "{out}");
}
