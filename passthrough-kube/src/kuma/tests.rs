use super::*;
use serde_json::json;
use std::cmp::Ordering;

fn pod(v: serde_json::Value) -> Pod {
    serde_json::from_value(v).expect("pod")
}
fn ns(v: serde_json::Value) -> Namespace {
    serde_json::from_value(v).expect("namespace")
}
fn svc(v: serde_json::Value) -> Service {
    serde_json::from_value(v).expect("service")
}
fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// [`dataplane_for`] in mesh `default`, with no ReplicaSet/Job controllers and no node labels.
fn plain_dataplane(
    p: &Pod,
    services: &[&Service],
    slices: &ServiceSlices,
    cfg: &KumaConfig,
) -> Dataplane {
    dataplane_for(
        p,
        "default",
        services,
        slices,
        &Controllers::default(),
        &BTreeMap::new(),
        cfg,
    )
}

fn web_pod() -> Pod {
    pod(json!({
        "metadata": {"name": "web-7d9c5b7f8-x2x9q", "namespace": "shop", "uid": "u1",
            "labels": {"app": "web", "pod-template-hash": "7d9c5b7f8", "kuma.io/sidecar-injection": "enabled", "empty": ""},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9c5b7f8", "uid": "r1"}]},
        "spec": {"nodeName": "n1", "serviceAccountName": "web-sa",
            "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]}
    }))
}

#[test]
fn governed_follows_the_injector_rules() {
    let cfg = KumaConfig::default();
    let rules = GovernRules {
        kuma_rules: true,
        own_pod: Some("passthrough-system/agent-x".into()),
        ..Default::default()
    };
    let plain_ns = ns(json!({"metadata": {"name": "shop"}}));
    let on_ns = ns(
        json!({"metadata": {"name": "shop", "labels": {"kuma.io/sidecar-injection": "true", "kuma.io/mesh": "m2"}}}),
    );
    let p = web_pod();
    assert!(
        matches!(governed(&p, Some(&plain_ns), &rules, &cfg), Governance::Governed { ref mesh, .. } if mesh == "default")
    );
    // The pod label wins over the namespace's, in both directions.
    let mut off = p.clone();
    off.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(SIDECAR_INJECTION.into(), "disabled".into());
    assert!(matches!(
        governed(&off, Some(&on_ns), &rules, &cfg),
        Governance::NotGoverned(_)
    ));
    let mut none = p.clone();
    none.metadata
        .labels
        .as_mut()
        .unwrap()
        .remove(SIDECAR_INJECTION);
    assert!(matches!(
        governed(&none, Some(&plain_ns), &rules, &cfg),
        Governance::NotGoverned(_)
    ));
    assert!(
        matches!(governed(&none, Some(&on_ns), &rules, &cfg), Governance::Governed { ref mesh, .. } if mesh == "m2")
    );
    // Already injected by Kuma.
    let mut inj = none.clone();
    inj.metadata.annotations = Some(m(&[(SIDECAR_INJECTED, "true")]));
    assert!(matches!(
        governed(&inj, Some(&plain_ns), &rules, &cfg),
        Governance::Governed { .. }
    ));
    // A wrong value is reported with its field, and not governed.
    let mut bad = p.clone();
    bad.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(SIDECAR_INJECTION.into(), "on".into());
    match governed(&bad, Some(&plain_ns), &rules, &cfg) {
        Governance::Invalid(e) => assert!(
            e.starts_with("metadata.labels.kuma.io/sidecar-injection: wrong value \"on\""),
            "{e}"
        ),
        g => panic!("{g:?}"),
    }
    // Exceptions, ingress, own pod, finished pods.
    let mut exc = p.clone();
    exc.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("openshift.io/build.name".into(), "b".into());
    assert!(matches!(
        governed(&exc, None, &rules, &cfg),
        Governance::NotGoverned(_)
    ));
    let mut ing = p.clone();
    ing.metadata.annotations = Some(m(&[("kuma.io/ingress", "enabled")]));
    assert!(matches!(
        governed(&ing, None, &rules, &cfg),
        Governance::NotGoverned(_)
    ));
    let mut own = p.clone();
    own.metadata.namespace = Some("passthrough-system".into());
    own.metadata.name = Some("agent-x".into());
    assert_eq!(
        governed(&own, None, &rules, &cfg),
        Governance::NotGoverned("the agent's own pod")
    );
    let mut done = p.clone();
    done.status = Some(serde_json::from_value(json!({"phase": "Succeeded"})).unwrap());
    assert!(matches!(
        governed(&done, None, &rules, &cfg),
        Governance::NotGoverned(_)
    ));
    // Selectors from flags, with the Kuma rules off.
    let sel = GovernRules {
        kuma_rules: false,
        pod_selectors: vec!["app=web".parse().unwrap()],
        ..Default::default()
    };
    assert!(matches!(
        governed(&none, None, &sel, &cfg),
        Governance::Governed {
            why: "--pod-selector",
            ..
        }
    ));
    let nsel = GovernRules {
        kuma_rules: false,
        namespace_selectors: vec!["team".parse().unwrap()],
        ..Default::default()
    };
    assert!(matches!(
        governed(&p, Some(&plain_ns), &nsel, &cfg),
        Governance::NotGoverned(_)
    ));
}

#[test]
fn mesh_precedence() {
    let mut p = web_pod();
    let n = ns(
        json!({"metadata": {"name": "shop", "labels": {"kuma.io/mesh": "nsl"}, "annotations": {"kuma.io/mesh": "nsa"}}}),
    );
    assert_eq!(mesh_of(&p, Some(&n)), "nsl");
    p.metadata.annotations = Some(m(&[(MESH_LABEL, "pa")]));
    assert_eq!(mesh_of(&p, Some(&n)), "pa");
    p.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(MESH_LABEL.into(), "pl".into());
    assert_eq!(mesh_of(&p, Some(&n)), "pl");
    assert_eq!(mesh_of(&web_pod(), None), "default");
}

#[test]
fn dataplane_from_services_and_node() {
    let cfg = KumaConfig::default();
    let p = web_pod();
    let s1 = svc(
        json!({"metadata": {"name": "web", "namespace": "shop", "annotations": {"80.service.kuma.io/protocol": "HTTP"}},
        "spec": {"selector": {"app": "web"}, "ports": [
            {"port": 80, "targetPort": "http"},
            {"port": 81, "targetPort": "nope"},
            {"port": 53, "protocol": "UDP", "targetPort": 53},
            {"port": 9000, "targetPort": 9000, "appProtocol": "grpc"}]}}),
    );
    let headless = svc(
        json!({"metadata": {"name": "a-headless", "namespace": "shop"},
        "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 8080}]}}),
    );
    let other_ns = svc(
        json!({"metadata": {"name": "web", "namespace": "other"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 1}]}}),
    );
    let ignored = svc(
        json!({"metadata": {"name": "ign", "namespace": "shop", "annotations": {"kuma.io/ignore": "true"}}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 2}]}}),
    );
    let no_sel = svc(
        json!({"metadata": {"name": "nosel", "namespace": "shop"}, "spec": {"ports": [{"port": 3}]}}),
    );
    let node = m(&[
        ("kubernetes.io/hostname", "n1"),
        ("topology.kubernetes.io/zone", "z-a"),
        ("other", "x"),
    ]);
    let dp = dataplane_for(
        &p,
        "default",
        &[&s1, &headless, &other_ns, &ignored, &no_sel],
        &ServiceSlices::default(),
        &Controllers::default(),
        &node,
        &cfg,
    );
    assert_eq!(dp.key(), "shop/web-7d9c5b7f8-x2x9q");
    let services: Vec<&str> = dp
        .inbounds
        .iter()
        .map(|t| t[SERVICE_TAG].as_str())
        .collect();
    // Sorted by Service name; port 81 (named port missing) and the UDP port skipped.
    assert_eq!(
        services,
        [
            "a-headless_shop_svc_8080",
            "web_shop_svc_80",
            "web_shop_svc_9000"
        ]
    );
    let i = &dp.inbounds[1];
    assert_eq!(i[PROTOCOL_TAG], "http");
    assert_eq!(i[SERVICE_NAME_TAG], "web");
    assert_eq!(i[SERVICE_PORT_TAG], "80");
    assert_eq!(i[NAMESPACE_TAG], "shop");
    assert_eq!(i[ZONE_TAG], "default");
    assert_eq!(i["kubernetes.io/hostname"], "n1");
    assert_eq!(i["topology.kubernetes.io/zone"], "z-a");
    assert_eq!(i["app"], "web");
    assert!(
        !i.contains_key("other") && !i.contains_key("empty") && !i.contains_key(SIDECAR_INJECTION)
    );
    assert!(!i.contains_key(INSTANCE_TAG));
    assert_eq!(dp.inbounds[0][INSTANCE_TAG], "web-7d9c5b7f8-x2x9q");
    assert_eq!(dp.inbounds[2][PROTOCOL_TAG], "grpc");
    // Resource labels.
    let l = &dp.labels;
    for (k, v) in [
        ("app", "web"),
        (MESH_LABEL, "default"),
        (ORIGIN_LABEL, "zone"),
        (ZONE_TAG, "default"),
        (ENV_TAG, "kubernetes"),
        (NAMESPACE_TAG, "shop"),
        (PROXY_TYPE_LABEL, "sidecar"),
        (SERVICE_ACCOUNT_LABEL, "web-sa"),
        (WORKLOAD_LABEL, "web-sa"),
        (DISPLAY_NAME, "web-7d9c5b7f8-x2x9q"),
    ] {
        assert_eq!(l.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(!l.contains_key(SERVICE_TAG));
}

#[test]
fn serviceless_inbound_names_the_owner() {
    let cfg = KumaConfig::default();
    let p = web_pod();
    let dp = plain_dataplane(&p, &[], &ServiceSlices::default(), &cfg);
    assert_eq!(dp.inbounds.len(), 1);
    let i = &dp.inbounds[0];
    assert_eq!(i[SERVICE_TAG], "web_shop_svc");
    assert_eq!(i[PROTOCOL_TAG], "tcp");
    assert_eq!(i[INSTANCE_TAG], "web-7d9c5b7f8-x2x9q");
    // Service-less tags keep kuma.io/ labels (Kuma's InboundTagsForPod does not drop them).
    assert_eq!(i[SIDECAR_INJECTION], "enabled");
    let mut job = p.clone();
    job.metadata.owner_references = Some(vec![serde_json::from_value(json!({"apiVersion": "batch/v1", "kind": "Job", "name": "nightly-report-29123456", "uid": "j"})).unwrap()]);
    assert_eq!(
        serviceless_name(&job, &Controllers::default()),
        "nightly-report"
    );
    job.metadata.owner_references.as_mut().unwrap()[0].name = "migrate-7".into();
    assert_eq!(serviceless_name(&job, &Controllers::default()), "migrate-7");
    let mut bare = p.clone();
    bare.metadata.owner_references = None;
    assert_eq!(
        serviceless_name(&bare, &Controllers::default()),
        "web-7d9c5b7f8-x2x9q"
    );
    let mut sts = p.clone();
    sts.metadata.owner_references = Some(vec![
        serde_json::from_value(
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "s"}),
        )
        .unwrap(),
    ]);
    assert_eq!(serviceless_name(&sts, &Controllers::default()), "db");
    let z = KumaConfig {
        zone: String::new(),
        ..KumaConfig::default()
    };
    let dp = plain_dataplane(&p, &[], &ServiceSlices::default(), &z);
    assert!(!dp.inbounds[0].contains_key(ZONE_TAG) && !dp.labels.contains_key(ORIGIN_LABEL));
}

fn meta(name: &str, ns: &str, labels: &[(&str, &str)]) -> PolicyMeta {
    policy_meta(
        name,
        ns,
        &m(labels),
        &BTreeMap::new(),
        &KumaConfig::default(),
    )
    .unwrap()
}

#[test]
fn policy_labels_as_the_webhook_computes_them() {
    let sys = meta("p", "kuma-system", &[]);
    assert_eq!(sys.role(), Role::System);
    assert_eq!(sys.origin(), Origin::Zone);
    assert_eq!(sys.labels[NAMESPACE_TAG], "kuma-system");
    assert_eq!(sys.labels[ZONE_TAG], "default");
    assert_eq!(policy_mesh(&sys), "default");
    let app = meta("p", "shop", &[(ROLE_LABEL, "system"), (MESH_LABEL, "m")]);
    assert_eq!(
        app.role(),
        Role::WorkloadOwner,
        "the webhook always recomputes the role"
    );
    assert_eq!(policy_mesh(&app), "m");
    let global = meta(
        "p-x7b",
        "kuma-system",
        &[(ORIGIN_LABEL, "global"), (DISPLAY_NAME, "p")],
    );
    assert_eq!(
        (global.origin(), global.role()),
        (Origin::Global, Role::System)
    );
    assert!(!global.labels.contains_key(ZONE_TAG));
    let dn = policy_meta(
        "x",
        "shop",
        &BTreeMap::new(),
        &m(&[(DISPLAY_NAME, "pretty")]),
        &KumaConfig::default(),
    )
    .unwrap();
    assert_eq!(dn.display_name(), "pretty");
    let e = policy_meta(
        "x",
        "shop",
        &m(&[(ORIGIN_LABEL, "mars")]),
        &BTreeMap::new(),
        &KumaConfig::default(),
    )
    .unwrap_err();
    assert_eq!(
        e,
        "metadata.labels[kuma.io/origin]: unknown resource origin \"mars\""
    );
    assert!(meta("x", "shop", &[(EFFECT_LABEL, "shadow")]).is_shadow());
}

#[test]
fn selection_by_namespace_zone_name_labels_tags() {
    let cfg = KumaConfig::default();
    let p = web_pod();
    let s = svc(
        json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}),
    );
    let dp = plain_dataplane(&p, &[&s], &ServiceSlices::default(), &cfg);
    let mesh = TargetRef::Mesh { proxy_types: None };
    // System namespace: every namespace; another namespace: only its own.
    assert!(selects(&meta("a", "kuma-system", &[]), &mesh, &dp));
    assert!(selects(&meta("a", "shop", &[]), &mesh, &dp));
    assert!(!selects(&meta("a", "other", &[]), &mesh, &dp));
    // Other mesh.
    assert!(!selects(
        &meta("a", "kuma-system", &[(MESH_LABEL, "m2")]),
        &mesh,
        &dp
    ));
    // Zone: a zone-origin policy of another zone does not select.
    assert!(!selects(
        &meta("a", "kuma-system", &[(ZONE_TAG, "east")]),
        &mesh,
        &dp
    ));
    assert!(selects(
        &meta("a", "kuma-system", &[(ORIGIN_LABEL, "global")]),
        &mesh,
        &dp
    ));
    // proxyTypes.
    assert!(!selects(
        &meta("a", "kuma-system", &[]),
        &TargetRef::Mesh {
            proxy_types: Some(vec!["Gateway".into()])
        },
        &dp
    ));
    // Dataplane by name: namespace defaults to the policy's.
    let by_name = |n: Option<&str>| TargetRef::Dataplane {
        name: Some("web-7d9c5b7f8-x2x9q".into()),
        namespace: n.map(Into::into),
        labels: None,
    };
    assert!(selects(&meta("a", "shop", &[]), &by_name(None), &dp));
    assert!(!selects(
        &meta("a", "kuma-system", &[]),
        &by_name(None),
        &dp
    ));
    assert!(selects(
        &meta("a", "kuma-system", &[]),
        &by_name(Some("shop")),
        &dp
    ));
    // Dataplane by labels: resource labels, including computed ones.
    let by_labels = |l: &[(&str, &str)]| TargetRef::Dataplane {
        name: None,
        namespace: None,
        labels: Some(m(l)),
    };
    assert!(selects(
        &meta("a", "kuma-system", &[]),
        &by_labels(&[("app", "web"), (WORKLOAD_LABEL, "web-sa")]),
        &dp
    ));
    assert!(!selects(
        &meta("a", "kuma-system", &[]),
        &by_labels(&[(SERVICE_TAG, "web_shop_svc_80")]),
        &dp
    ));
    // A namespace alone selects nothing (not "all", no name to resolve).
    assert!(!selects(
        &meta("a", "kuma-system", &[]),
        &TargetRef::Dataplane {
            name: None,
            namespace: Some("shop".into()),
            labels: None
        },
        &dp
    ));
    assert!(selects(
        &meta("a", "kuma-system", &[]),
        &TargetRef::Dataplane {
            name: None,
            namespace: None,
            labels: None
        },
        &dp
    ));
    // MeshSubset: inbound tags, `*` matches any value.
    let subset = |t: &[(&str, &str)]| TargetRef::MeshSubset {
        tags: m(t),
        proxy_types: None,
    };
    assert!(selects(
        &meta("a", "kuma-system", &[]),
        &subset(&[(SERVICE_TAG, "web_shop_svc_80")]),
        &dp
    ));
    assert!(!selects(
        &meta("a", "kuma-system", &[]),
        &subset(&[("kubernetes.io/hostname", "*")]),
        &dp
    ));
    assert!(selects(
        &meta("a", "kuma-system", &[]),
        &subset(&[(SERVICE_TAG, "*"), ("app", "web")]),
        &dp
    ));
    assert!(!selects(
        &meta("a", "kuma-system", &[]),
        &subset(&[(WORKLOAD_LABEL, "web-sa")]),
        &dp
    ));
}

#[test]
fn merge_order_is_kumas() {
    let mesh = TargetRef::Mesh { proxy_types: None };
    let sub = TargetRef::MeshSubset {
        tags: BTreeMap::new(),
        proxy_types: None,
    };
    let dp_name = TargetRef::Dataplane {
        name: Some("x".into()),
        namespace: None,
        labels: None,
    };
    let dp_labels = TargetRef::Dataplane {
        name: None,
        namespace: None,
        labels: Some(BTreeMap::new()),
    };
    let sys = meta("b", "kuma-system", &[]);
    let own = meta("z", "shop", &[]);
    let glob = meta("a", "kuma-system", &[(ORIGIN_LABEL, "global")]);
    let mut v = [
        (&sys, &sub, "sys-subset"),
        (&own, &mesh, "own-mesh"),
        (&sys, &mesh, "sys-mesh"),
        (&glob, &mesh, "global-mesh"),
        (&sys, &dp_name, "sys-dp-name"),
        (&sys, &dp_labels, "sys-dp-labels"),
    ];
    v.sort_by(|a, b| order((a.0, a.1), (b.0, b.1)));
    let names: Vec<&str> = v.iter().map(|x| x.2).collect();
    assert_eq!(
        names,
        [
            "global-mesh",
            "sys-mesh",
            "own-mesh",
            "sys-dp-labels",
            "sys-dp-name",
            "sys-subset"
        ]
    );
    // Same rank: the smaller display name sorts last (wins).
    let a = meta("allow", "kuma-system", &[]);
    let d = meta("deny", "kuma-system", &[]);
    assert_eq!(order((&a, &mesh), (&d, &mesh)), Ordering::Greater);
}

fn slice(ns: &str, name: &str, service: Option<&str>, uids: &[&str]) -> EndpointSlice {
    let labels = match service {
        Some(s) => json!({SLICE_SERVICE_LABEL: s}),
        None => json!({}),
    };
    let endpoints: Vec<serde_json::Value> = uids
        .iter()
        .enumerate()
        .map(|(i, u)| {
            json!({"addresses": [format!("10.0.0.{i}")],
                   "targetRef": {"kind": "Pod", "namespace": ns, "name": format!("p{i}"), "uid": u}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"port": 5432}]
    }))
    .expect("endpoint slice")
}

fn slices(list: &[EndpointSlice]) -> ServiceSlices {
    let mut s = ServiceSlices::default();
    for o in list {
        s.insert(SliceTargets::of(o).expect("a Service's slice"));
    }
    s
}

fn service_tags(dp: &Dataplane) -> Vec<&str> {
    dp.inbounds
        .iter()
        .map(|t| t[SERVICE_TAG].as_str())
        .collect()
}

/// Kuma's `findByEndpointSlices`: a Service without a selector matches the pods its
/// EndpointSlices name by UID, and gives them the same inbound tags a selector Service would.
#[test]
fn selectorless_service_matches_the_pods_its_endpointslices_name() {
    let cfg = KumaConfig::default();
    let p = web_pod();
    let legacy = svc(json!({"metadata": {"name": "legacy", "namespace": "shop"},
        "spec": {"ports": [{"port": 5432, "targetPort": 8080}, {"port": 81, "targetPort": "nope"}]}}));
    // Not named: the service-less inbound, as before.
    let none = ServiceSlices::default();
    let dp = plain_dataplane(&p, &[&legacy], &none, &cfg);
    assert_eq!(service_tags(&dp), ["web_shop_svc"]);

    // Named by one of its slices (another endpoint and another slice beside it).
    let named = slices(&[
        slice("shop", "legacy-abcde", Some("legacy"), &["u0", "u1"]),
        slice("shop", "legacy-fghij", Some("legacy"), &["u9"]),
    ]);
    let dp = plain_dataplane(&p, &[&legacy], &named, &cfg);
    assert_eq!(
        service_tags(&dp),
        ["legacy_shop_svc_5432"],
        "port 81's named targetPort is in no container: skipped, as for any Service"
    );
    let i = &dp.inbounds[0];
    assert_eq!(i[SERVICE_NAME_TAG], "legacy");
    assert_eq!(i[SERVICE_PORT_TAG], "5432");
    assert_eq!(i[NAMESPACE_TAG], "shop");
    assert_eq!(i[PROTOCOL_TAG], "tcp");
    assert_eq!(i["app"], "web");
    assert!(!i.contains_key(INSTANCE_TAG));

    // The same slice name in another namespace, a slice of another Service, a slice of a
    // Service that has a selector: none of them makes a Service match.
    let elsewhere = slices(&[
        slice("other", "legacy-abcde", Some("legacy"), &["u1"]),
        slice("shop", "db-x", Some("db"), &["u1"]),
    ]);
    let dp = plain_dataplane(&p, &[&legacy], &elsewhere, &cfg);
    assert_eq!(service_tags(&dp), ["web_shop_svc"]);
    let api = svc(json!({"metadata": {"name": "api", "namespace": "shop"},
        "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": 8080}]}}));
    let api_slice = slices(&[slice("shop", "api-x", Some("api"), &["u1"])]);
    let dp = plain_dataplane(&p, &[&api], &api_slice, &cfg);
    assert_eq!(
        service_tags(&dp),
        ["web_shop_svc"],
        "a Service with a selector is matched by its selector only, never its slices"
    );
    // An empty selector is no selector; kuma.io/ignore and ExternalName still exclude.
    let empty_sel = svc(json!({"metadata": {"name": "legacy", "namespace": "shop"},
        "spec": {"selector": {}, "ports": [{"port": 5432, "targetPort": 8080}]}}));
    let dp = plain_dataplane(&p, &[&empty_sel], &named, &cfg);
    assert_eq!(service_tags(&dp), ["legacy_shop_svc_5432"]);
    for excluded in [
        json!({"metadata": {"name": "legacy", "namespace": "shop", "annotations": {"kuma.io/ignore": "true"}},
               "spec": {"ports": [{"port": 5432}]}}),
        json!({"metadata": {"name": "legacy", "namespace": "shop"},
               "spec": {"type": "ExternalName", "externalName": "db.example", "ports": [{"port": 5432}]}}),
    ] {
        let s = svc(excluded);
        let dp = plain_dataplane(&p, &[&s], &named, &cfg);
        assert_eq!(service_tags(&dp), ["web_shop_svc"], "{:?}", s.metadata);
    }
}

/// A pod behind a selector Service and a selector-less one gets both inbounds, sorted by
/// Service name; a slice edit adds and removes the selector-less one.
#[test]
fn endpointslice_edits_add_and_remove_the_selectorless_inbound() {
    let cfg = KumaConfig::default();
    let p = web_pod();
    let web = svc(json!({"metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}));
    let legacy = svc(json!({"metadata": {"name": "legacy", "namespace": "shop"},
        "spec": {"clusterIP": "None", "ports": [{"port": 5432, "targetPort": 8080}]}}));
    let services = [&web, &legacy];
    let mut s = ServiceSlices::default();
    let dp = |s: &ServiceSlices| plain_dataplane(&p, &services, s, &cfg);
    assert_eq!(service_tags(&dp(&s)), ["web_shop_svc_80"]);

    // The slice is created naming another pod: nothing for this one.
    assert!(
        s.insert(SliceTargets::of(&slice("shop", "legacy-1", Some("legacy"), &["u7"])).unwrap())
    );
    assert_eq!(service_tags(&dp(&s)), ["web_shop_svc_80"]);
    // Edited to name this pod too: the inbound appears (headless: kuma.io/instance).
    assert!(s.insert(
        SliceTargets::of(&slice("shop", "legacy-1", Some("legacy"), &["u7", "u1"])).unwrap()
    ));
    let d = dp(&s);
    assert_eq!(
        service_tags(&d),
        ["legacy_shop_svc_5432", "web_shop_svc_80"]
    );
    assert_eq!(d.inbounds[0][INSTANCE_TAG], "web-7d9c5b7f8-x2x9q");
    // The same content again is no change.
    assert!(!s.insert(
        SliceTargets::of(&slice("shop", "legacy-1", Some("legacy"), &["u7", "u1"])).unwrap()
    ));
    // The slice's Service label changes: it belongs to another Service now.
    assert!(s.insert(
        SliceTargets::of(&slice("shop", "legacy-1", Some("moved"), &["u7", "u1"])).unwrap()
    ));
    assert_eq!(service_tags(&dp(&s)), ["web_shop_svc_80"]);
    assert!(s.names("shop", "moved", "u1") && !s.names("shop", "legacy", "u1"));
    assert!(
        s.insert(SliceTargets::of(&slice("shop", "legacy-1", Some("legacy"), &["u1"])).unwrap())
    );
    assert_eq!(
        service_tags(&dp(&s)),
        ["legacy_shop_svc_5432", "web_shop_svc_80"]
    );
    // Edited to drop this pod, then deleted.
    assert!(
        s.insert(SliceTargets::of(&slice("shop", "legacy-1", Some("legacy"), &["u7"])).unwrap())
    );
    assert_eq!(service_tags(&dp(&s)), ["web_shop_svc_80"]);
    assert!(s.remove("shop", "legacy-1"));
    assert!(
        !s.remove("shop", "legacy-1"),
        "an unknown slice is no change"
    );
    assert!(s.is_empty());
    assert_eq!(service_tags(&dp(&s)), ["web_shop_svc_80"]);
}

/// What is kept of a slice: only endpoints with a targetRef UID count; a slice without the
/// Service label is not one Kuma reads.
#[test]
fn slice_targets_keep_what_the_rule_reads() {
    assert_eq!(SliceTargets::of(&slice("shop", "x", None, &["u1"])), None);
    let raw: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "legacy-1", "namespace": "shop", "labels": {SLICE_SERVICE_LABEL: "legacy"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.0.0.1"]},
            {"addresses": ["10.0.0.2"], "targetRef": {"kind": "Pod", "name": "p"}},
            {"addresses": ["10.0.0.3"], "targetRef": {"kind": "Pod", "name": "q", "uid": ""}},
            {"addresses": ["10.0.0.4"], "targetRef": {"kind": "Pod", "name": "r", "uid": "u4"}}
        ]
    }))
    .unwrap();
    let t = SliceTargets::of(&raw).unwrap();
    assert_eq!(t.service, "legacy");
    assert_eq!(t.uids.iter().collect::<Vec<_>>(), ["u4"]);
    // No endpoints at all (the API server sends `null` for an empty list).
    let empty: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "legacy-2", "namespace": "shop", "labels": {SLICE_SERVICE_LABEL: "legacy"}},
        "addressType": "IPv4", "endpoints": null
    }))
    .unwrap();
    let mut s = ServiceSlices::default();
    assert!(s.insert(SliceTargets::of(&empty).unwrap()));
    assert!(!s.names("shop", "legacy", "u4"));
    assert!(!s.names("shop", "legacy", ""), "an empty UID names nothing");
    assert_eq!(s.len(), 1);
    assert_eq!(s.get("shop", "legacy-2").unwrap().service, "legacy");
}

/// Kuma's `NameExtractor` with the ReplicaSets and Jobs known: the owner chain decides, not the
/// names; an unknown one is read from the controllers' naming until it is known.
#[test]
fn serviceless_name_follows_the_owner_chain() {
    let owned = |refs: &[(&str, &str)]| {
        let mut p = web_pod();
        p.metadata.owner_references = Some(
            refs.iter()
                .map(|(k, n)| {
                    serde_json::from_value(
                        json!({"apiVersion": "v1", "kind": k, "name": n, "uid": format!("uid-{n}")}),
                    )
                    .unwrap()
                })
                .collect(),
        );
        p
    };
    let chain = |refs: &[(&str, &str)]| {
        Arc::new(
            refs.iter()
                .map(|(k, n)| (k.to_string(), n.to_string()))
                .collect::<Vec<_>>(),
        )
    };
    let mut c = Controllers::default();
    c.replica_sets.insert(
        "shop/web-7d9c5b7f8".into(),
        chain(&[("Deployment", "storefront")]),
    );
    c.replica_sets.insert(
        "shop/canary-5f6d7c8b9".into(),
        chain(&[("Rollout", "canary")]),
    );
    c.replica_sets.insert("shop/bare-rs".into(), chain(&[]));
    c.jobs.insert(
        "shop/report-29123456".into(),
        chain(&[("CronJob", "nightly")]),
    );
    c.jobs.insert("shop/migrate-29123457".into(), chain(&[]));
    let rs = owned(&[("ReplicaSet", "web-7d9c5b7f8")]);
    // The Deployment's real name, which the ReplicaSet's name does not tell.
    assert_eq!(serviceless_name(&rs, &c), "storefront");
    assert_eq!(serviceless_name(&rs, &Controllers::default()), "web");
    // Owned by something other than a Deployment: Kuma moves on; with no other owner, the pod.
    let rollout = owned(&[("ReplicaSet", "canary-5f6d7c8b9")]);
    assert_eq!(serviceless_name(&rollout, &c), "web-7d9c5b7f8-x2x9q");
    let rollout_then_sts = owned(&[("ReplicaSet", "canary-5f6d7c8b9"), ("StatefulSet", "db")]);
    assert_eq!(serviceless_name(&rollout_then_sts, &c), "db");
    assert_eq!(
        serviceless_name(&owned(&[("ReplicaSet", "bare-rs")]), &c),
        "bare-rs"
    );
    assert_eq!(
        serviceless_name(&owned(&[("Job", "report-29123456")]), &c),
        "nightly"
    );
    // A Job without owner keeps its name even when it looks like a CronJob's.
    let job = owned(&[("Job", "migrate-29123457")]);
    assert_eq!(serviceless_name(&job, &c), "migrate-29123457");
    assert_eq!(serviceless_name(&job, &Controllers::default()), "migrate");
    // The first owner that decides wins.
    assert_eq!(
        serviceless_name(
            &owned(&[("StatefulSet", "db"), ("ReplicaSet", "web-7d9c5b7f8")]),
            &c
        ),
        "db"
    );
    // Through the Dataplane.
    let dp = dataplane_for(
        &rs,
        "default",
        &[],
        &ServiceSlices::default(),
        &c,
        &BTreeMap::new(),
        &KumaConfig::default(),
    );
    assert_eq!(dp.inbounds[0][SERVICE_TAG], "storefront_shop_svc");
}
