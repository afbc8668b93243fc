//! Kubernetes mode end to end on the real kernel: the real `passthrough run --kubernetes` reads
//! pods, namespaces, Services, its Node and MeshPassthrough resources from the local API server
//! (`passthrough_tests::apiserver`, through a kubeconfig), and pods "start" by getting a cgroup
//! in a test kubepods tree under the real cgroup2 mount (systemd and cgroupfs layouts), with
//! pt-probe processes inside — in the host network namespace (hostNetwork pods) or in a pod
//! network namespace of their own (`PodNet`, proxy at `--proxy-addr`) — dialling test hosts.
//!
//! Covered: IP, CIDR, TLS SNI and HTTP Host decisions per pod; system-namespace vs
//! namespace-scoped policies; an invalid policy reported and ignored while the rest applies;
//! ungoverned pods; policy edits; label changes; new and deleted pods; a process connecting
//! the instant its pod cgroup appears (before and after the pod is known); an API server
//! restart (last state kept, `/readyz` says so, changes made meanwhile applied after); a
//! selector-less Service matched to pods through its EndpointSlices (Kuma's rule), re-tagging
//! pods as the slice changes.
//!
//! Topology: `passthrough_tests::hostnet` slot [`TEST_SLOT`] (shared host routes, so the tests
//! here run one at a time and take the slot lock).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    core::v1::{Namespace, Node, Pod, Service as KService},
    discovery::v1::EndpointSlice,
};
use passthrough_kube::cgroups::{KubepodsRoot, Qos};
use passthrough_tests::{
    Agent, EPERM, Probe, TestCgroup,
    apiserver::{ApiServer, Kind},
    hostnet::{HostNet, PodNet, TEST_SLOT},
    l7::{Dns, Pki, Servers, Service},
    require_kernel,
};
use serde_json::{Value, json};

static SERIAL: Mutex<()> = Mutex::new(());

/// The tests here share one host-netns slot (its routes and, for a [`PodNet`], the proxy's
/// address): each takes this first and holds it until everything it made is gone (a local
/// declared before the `PodNet` and the `World`, so dropped after them).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const SERVICES: &[(u16, Service)] = &[
    (443, Service::TlsEcho),
    (80, Service::Http),
    (5432, Service::Echo),
];

fn a(port: u16) -> SocketAddr {
    SocketAddr::new(TEST_SLOT.host4(1), port)
}
fn b(port: u16) -> SocketAddr {
    SocketAddr::new(TEST_SLOT.host4(2), port)
}
fn c(port: u16) -> SocketAddr {
    SocketAddr::new(TEST_SLOT.host4(3), port)
}
fn d(port: u16) -> SocketAddr {
    SocketAddr::new(TEST_SLOT.host4(4), port)
}
fn a6(port: u16) -> SocketAddr {
    SocketAddr::new(TEST_SLOT.host6(0xa), port)
}

fn uid(n: u32) -> String {
    format!("aaaaaaaa-0000-4000-8000-{n:012x}")
}

fn pod(ns: &str, name: &str, n: u32, labels: Value, host_network: bool) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid(n), "labels": labels},
        "spec": {"nodeName": "n1", "hostNetwork": host_network, "serviceAccountName": "default",
                 "containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080}]}]},
        "status": {"qosClass": "BestEffort", "phase": "Running"}
    }))
    .unwrap()
}

fn namespace(name: &str, inject: bool) -> Namespace {
    let labels = if inject {
        json!({"kuma.io/sidecar-injection": "enabled"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})).unwrap()
}

fn mesh_policy(extra: &[Value]) -> Value {
    let mut m = vec![
        json!({"type": "IP", "value": a(0).ip().to_string(), "port": 5432}),
        json!({"type": "CIDR", "value": format!("{}/128", a6(0).ip()), "port": 5432}),
        json!({"type": "Domain", "value": "api.test", "port": 443, "protocol": "tls"}),
        json!({"type": "Domain", "value": "web.test", "port": 80, "protocol": "http"}),
    ];
    m.extend(extra.iter().cloned());
    json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
           "metadata": {"name": "egress", "namespace": "kuma-system", "labels": {"kuma.io/mesh": "default"}},
           "spec": {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": "Matched", "appendMatch": m}}})
}

struct World {
    rt: tokio::runtime::Runtime,
    api: ApiServer,
    agent: Agent,
    root: KubepodsRoot,
    cg: TestCgroup,
    servers: Servers,
    _dns: Dns,
    _net: HostNet,
    ca: PathBuf,
    status: PathBuf,
    _dir: tempfile::TempDir,
}

impl World {
    /// The agent is given the kubepods root (`--kubepods-cgroup`) for a root name of one
    /// component; a deeper one (a kubelet `--cgroup-root`) it must find itself below
    /// `--cgroup-root`. The caller holds [`serial`].
    fn new(root_name: &str, pod_net: Option<&PodNet>, objects: impl FnOnce(&ApiServer)) -> World {
        passthrough_tests::sweep(false);
        let dir = passthrough_tests::test_dir();
        let cg = TestCgroup::new().unwrap();
        let root_dir = cg.path().join(root_name);
        std::fs::create_dir_all(&root_dir).unwrap();
        let root = KubepodsRoot::at(&root_dir);
        let net = HostNet::new(TEST_SLOT).unwrap();
        let pki = Pki::new(&["api.test", "other.test", "evil.test"]).unwrap();
        let ca = pki.write_ca(dir.path()).unwrap();
        let servers =
            Servers::start(Some(net.server_ns()), SERVICES, Some(pki.server.clone()), 2).unwrap();
        let mut names = HashMap::new();
        for n in ["api.test", "web.test", "evil.test"] {
            names.insert(n.to_string(), vec![a(0).ip(), a6(0).ip()]);
        }
        names.insert("other.test".to_string(), vec![b(0).ip()]);
        let dns = Dns::start(names, 300).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let api = rt.block_on(ApiServer::start()).unwrap();
        let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}}}))
        .unwrap();
        api.apply(&node);
        api.apply(&namespace("kuma-system", false));
        api.apply(&namespace("shop", true));
        api.apply(&namespace("plain", false));
        api.apply(&mesh_policy(&[]));
        objects(&api);
        let status = dir.path().join("kubernetes.json");
        let mut builder = Agent::builder()
            .arg("--kubernetes")
            .arg("--kubeconfig")
            .arg(&api.kubeconfig().display().to_string())
            .arg("--node-name")
            .arg("n1")
            .arg("--own-pod")
            .arg("passthrough-system/agent")
            .arg("--resolver")
            .arg(&dns.addr.to_string())
            .arg("--status-file")
            .arg(&status.display().to_string());
        builder = if root_name.contains('/') {
            builder
                .arg("--cgroup-root")
                .arg(&cg.path().display().to_string())
        } else {
            builder
                .arg("--kubepods-cgroup")
                .arg(&root_dir.display().to_string())
        };
        if let Some(p) = pod_net {
            let port = p.free_proxy_port().unwrap();
            for addr in p.proxy_addrs(port) {
                builder = builder.arg("--proxy-addr").arg(&addr.to_string());
            }
            // The test pod's netns reaches nothing but the proxy's addresses (PodNet), so a
            // connection the TLS fast path (on by default) sends direct could not leave it; a
            // real pod routes through the node. The fast path itself: tls_fast_path.rs.
            builder = builder.arg("--tls-fast-path=off");
        }
        let agent = builder.start().unwrap();
        World {
            rt,
            api,
            agent,
            root,
            cg,
            servers,
            _dns: dns,
            _net: net,
            ca,
            status,
            _dir: dir,
        }
    }

    /// Creates pod `n`'s cgroup (and its QoS parent) as the kubelet would; returns the
    /// container cgroup the probe runs in.
    fn start_pod_cgroup(&self, n: u32) -> PathBuf {
        let dir = self.root.pod_dir(&uid(n), Qos::BestEffort);
        std::fs::create_dir_all(&dir).unwrap();
        let ctr = dir.join(format!("cri-containerd-{n:04x}.scope"));
        std::fs::create_dir(&ctr).unwrap();
        ctr
    }

    /// Stops the pod's processes and removes its cgroup.
    fn stop_pod_cgroup(&self, n: u32) {
        let dir = self.root.pod_dir(&uid(n), Qos::BestEffort);
        passthrough_tests::cgroup::remove_cgroup_tree(&dir).unwrap();
    }

    fn probe(&self, ctr: &Path, netns: Option<&PodNet>) -> Probe {
        Probe::spawn_in(ctr, netns.map(|p| p.ns_path()).as_deref()).unwrap()
    }

    fn status(&self) -> Value {
        serde_json::from_slice(&std::fs::read(&self.status).unwrap()).unwrap()
    }

    /// Waits until the agent has mapped every pod of `names` (none `Pending` any more).
    fn await_mapped(&self, names: &[&str]) {
        eventually(&format!("pods mapped: {names:?}"), &self.agent, || {
            names
                .iter()
                .all(|n| self.pod_state(n).is_some_and(|p| p["state"] != "Pending"))
        });
    }

    fn pod_state(&self, name: &str) -> Option<Value> {
        self.status()["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
    }

    fn tls(&self, p: &mut Probe, addr: SocketAddr, sni: &str) -> Value {
        p.json(&json!({"op": "tls", "addr": addr.to_string(), "sni": sni, "ca": self.ca.display().to_string()}))
    }

    fn http1(&self, p: &mut Probe, addr: SocketAddr, host: &str) -> Value {
        let r =
            p.json(&json!({"op": "http1", "addr": addr.to_string(), "requests": [{"host": host}]}));
        assert_eq!(
            r["ok"],
            true,
            "HTTP to {addr} Host {host}: {r}\n{}",
            self.agent.describe()
        );
        r["responses"][0].clone()
    }
}

fn connects(p: &mut Probe, addr: SocketAddr) -> Result<(), i32> {
    p.connect(addr).map(|c| p.close(c))
}

/// Retries `f` until it holds (≤ 15 s): the agent applies API changes asynchronously.
fn eventually(what: &str, agent: &Agent, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("not within 15 s: {what}\n{}", agent.describe());
}

fn allowed(w: &World, p: &mut Probe, addr: SocketAddr) {
    assert_eq!(
        connects(p, addr),
        Ok(()),
        "{addr} should be allowed\n{}",
        w.agent.describe()
    );
}

fn denied(w: &World, p: &mut Probe, addr: SocketAddr) {
    assert_eq!(
        connects(p, addr),
        Err(EPERM),
        "{addr} should be denied (EPERM)\n{}",
        w.agent.describe()
    );
}

#[test]
fn kubernetes_mode_systemd_layout_end_to_end() {
    if !require_kernel() {
        return;
    }
    let _serial = serial();
    let podnet = PodNet::new(TEST_SLOT).unwrap();
    let mut w = World::new("kubepods.slice", Some(&podnet), |api| {
        let svc: KService = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}))
        .unwrap();
        api.apply(&svc);
        // Namespace-scoped: selects shop's pods whose inbound carries this Service's tag.
        api.apply(&json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
            "metadata": {"name": "web-extra", "namespace": "shop"},
            "spec": {"targetRef": {"kind": "MeshSubset", "tags": {"kuma.io/service": "web_shop_svc_80"}},
                     "default": {"appendMatch": [{"type": "IP", "value": c(0).ip().to_string(), "port": 5432}]}}}));
        // Another namespace's policy never reaches shop's pods.
        api.apply(
            &json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
            "metadata": {"name": "elsewhere", "namespace": "plain"},
            "spec": {"default": {"passthroughMode": "All"}}}),
        );
        // Invalid: reported, ignored, the rest applies.
        api.apply(&json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
            "metadata": {"name": "broken", "namespace": "kuma-system"},
            "spec": {"default": {"appendMatch": [{"type": "IP", "value": b(0).ip().to_string(), "port": 0}]}}}));
        api.apply(&pod("shop", "web-host", 1, json!({"app": "web"}), true));
        api.apply(&pod("shop", "web-pod", 2, json!({"app": "web"}), false));
        api.apply(&pod("plain", "free", 3, json!({"app": "free"}), true));
        api.apply(&pod("passthrough-system", "agent", 9, json!({}), true));
    });
    let log = w.agent.log();
    assert!(
        log.contains("MeshPassthrough kuma-system/broken: spec.default.appendMatch[0].port: port must be a valid (1-65535)"),
        "the invalid policy is reported by namespace/name, field and reason\n{}",
        w.agent.describe()
    );

    // Pods start: their cgroups appear after the agent is running.
    let mut host = w.probe(&w.start_pod_cgroup(1), None);
    let mut inpod = w.probe(&w.start_pod_cgroup(2), Some(&podnet));
    let mut free = w.probe(&w.start_pod_cgroup(3), None);
    w.await_mapped(&["shop/web-host", "shop/web-pod", "plain/free"]);
    let st = w.pod_state("shop/web-host").unwrap();
    assert_eq!(
        st["state"]["Governed"]["policies"],
        json!(["kuma-system/egress", "shop/web-extra"]),
        "{st}"
    );
    assert_eq!(w.pod_state("plain/free").unwrap()["mode"], "All");
    // `passthrough status` lists the pods, each checked against the kernel's workload map.
    let out = std::process::Command::new(passthrough_tests::agent::agent_binary().unwrap())
        .args(["status", "--json", "--state-dir"])
        .arg(w.agent.state_dir())
        .arg("--kubernetes-status")
        .arg(&w.status)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    let web = st["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "shop/web-host")
        .unwrap()
        .clone();
    assert_eq!(web["in_kernel"], true, "{web}");
    assert_eq!(st["node"], "n1");
    assert!(
        st["invalid_policies"][0]
            .as_str()
            .unwrap()
            .contains("kuma-system/broken"),
        "{st}"
    );

    // IP, CIDR (IPv6 /128) and the namespace-scoped MeshSubset match; B denied.
    allowed(&w, &mut host, a(5432));
    allowed(&w, &mut host, a6(5432));
    allowed(&w, &mut host, c(5432));
    denied(&w, &mut host, b(5432));
    // TLS SNI and HTTP Host, in the host netns (loopback proxy) and in the pod's (--proxy-addr).
    for (p, label) in [(&mut host, "host netns"), (&mut inpod, "pod netns")] {
        let r = w.tls(p, a(443), "api.test");
        assert_eq!(
            r["ok"],
            true,
            "{label}: TLS api.test: {r}\n{}",
            w.agent.describe()
        );
        let r = w.tls(p, a(443), "evil.test");
        assert_eq!(
            r["ok"], false,
            "{label}: TLS evil.test must be refused: {r}"
        );
        let r = w.http1(p, a(80), "web.test");
        assert_eq!(r["status"], 200, "{label}: {r}");
        let r = w.http1(p, a(80), "evil.test");
        assert_eq!(r["status"], 503, "{label}: {r}");
    }
    denied(&w, &mut inpod, b(5432));
    // An ungoverned pod: --unselected-mode All.
    allowed(&w, &mut free, b(5432));
    // Denials name the pod namespace/name.
    eventually("deny event names the pod", &w.agent, || {
        w.agent.log().contains("shop/web-host")
    });

    // Policy edit: B allowed for every governed pod.
    w.api.apply(&mesh_policy(&[
        json!({"type": "IP", "value": b(0).ip().to_string(), "port": 5432}),
    ]));
    eventually("policy edit applied", &w.agent, || {
        connects(&mut host, b(5432)).is_ok()
    });
    allowed(&w, &mut inpod, a(443)); // redirected to the proxy, which is reachable

    // Label change: web-host no longer selected by the web Service → loses the C match.
    w.api
        .apply(&pod("shop", "web-host", 1, json!({"app": "other"}), true));
    eventually("label change applied", &w.agent, || {
        connects(&mut host, c(5432)) == Err(EPERM)
    });
    allowed(&w, &mut host, a(5432));

    // A known pod: the instant its cgroup appears a process in it is enforced.
    w.api
        .apply(&pod("shop", "fresh", 4, json!({"app": "web"}), true));
    eventually("fresh pod known", &w.agent, || {
        w.agent.log().contains("policy applied") && w.status()["generation"].as_u64().is_some()
    });
    std::thread::sleep(Duration::from_millis(300));
    let ctr = w.start_pod_cgroup(4);
    let mut fresh = w.probe(&ctr, None);
    denied(&w, &mut fresh, d(5432));
    eventually("fresh pod allowed by its policy", &w.agent, || {
        connects(&mut fresh, a(5432)).is_ok()
    });
    denied(&w, &mut fresh, d(5432));

    // A cgroup whose pod is not known yet: the pending mode (None) until the pod arrives.
    let ctr = w.start_pod_cgroup(5);
    let mut early = w.probe(&ctr, None);
    denied(&w, &mut early, a(5432));
    denied(&w, &mut early, d(5432));
    w.api
        .apply(&pod("shop", "late", 5, json!({"app": "web"}), true));
    eventually("late pod gets its policy", &w.agent, || {
        connects(&mut early, a(5432)).is_ok()
    });
    denied(&w, &mut early, d(5432));

    // A deleted pod's entry goes.
    drop(fresh);
    w.api.delete(Kind::Pod, "shop", "fresh");
    w.stop_pod_cgroup(4);
    eventually("deleted pod removed", &w.agent, || {
        w.pod_state("shop/fresh").is_none()
    });

    // API server restart: the last state stays enforced, /readyz says so; a change made while
    // it was down arrives after the restart.
    w.api.stop();
    eventually("readyz reports the API server", &w.agent, || {
        w.agent
            .get("/readyz")
            .is_ok_and(|(code, body)| code == 503 && body.contains("API server unreachable"))
    });
    denied(&w, &mut host, d(5432));
    allowed(&w, &mut host, a(5432));
    w.api.apply(&mesh_policy(&[
        json!({"type": "IP", "value": b(0).ip().to_string(), "port": 5432}),
        json!({"type": "IP", "value": d(0).ip().to_string(), "port": 5432}),
    ]));
    w.rt.block_on(w.api.restart()).unwrap();
    eventually(
        "change made while the API server was down",
        &w.agent,
        || connects(&mut host, d(5432)).is_ok(),
    );
    eventually("ready again", &w.agent, || {
        w.agent.get("/readyz").is_ok_and(|(c, _)| c == 200)
    });
    let _ = (&w.servers, &w.cg);
}

#[test]
fn kubernetes_mode_cgroupfs_layout() {
    if !require_kernel() {
        return;
    }
    let _serial = serial();
    let w = World::new("kubepods", None, |api| {
        // A service-less pod of ReplicaSet `api-6b7c8d9f0`, whose Deployment is `payments` (not
        // what the ReplicaSet's name suggests): Kuma's tag, and the policy on it, say
        // `payments_shop_svc`, read from the ReplicaSet's owner.
        let mut p = pod(
            "shop",
            "svc-less",
            1,
            json!({"app": "x", "pod-template-hash": "6b7c8d9f0"}),
            true,
        );
        p.metadata.owner_references = Some(vec![
            serde_json::from_value(json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "api-6b7c8d9f0", "uid": "rs-1", "controller": true}))
            .unwrap(),
        ]);
        api.apply(&p);
        let rs: ReplicaSet = serde_json::from_value(json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "api-6b7c8d9f0", "namespace": "shop",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "payments", "uid": "d-1", "controller": true}]},
            "spec": {"selector": {"matchLabels": {"app": "x"}}}}))
        .unwrap();
        api.apply(&rs);
        api.apply(&json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
            "metadata": {"name": "payments", "namespace": "shop"},
            "spec": {"targetRef": {"kind": "MeshSubset", "tags": {"kuma.io/service": "payments_shop_svc"}},
                     "default": {"appendMatch": [{"type": "IP", "value": c(0).ip().to_string(), "port": 5432}]}}}));
        api.apply(&pod("plain", "free", 2, json!({}), true));
    });
    let mut gov = w.probe(&w.start_pod_cgroup(1), None);
    let mut free = w.probe(&w.start_pod_cgroup(2), None);
    w.await_mapped(&["shop/svc-less", "plain/free"]);
    allowed(&w, &mut gov, a(5432));
    denied(&w, &mut gov, b(5432));
    allowed(&w, &mut free, b(5432));
    let r = w.tls(&mut gov, a(443), "api.test");
    assert_eq!(r["ok"], true, "{r}\n{}", w.agent.describe());
    assert_eq!(
        w.pod_state("shop/svc-less").unwrap()["state"]["Governed"]["policies"],
        json!(["kuma-system/egress", "shop/payments"]),
        "{}",
        w.agent.describe()
    );
    allowed(&w, &mut gov, c(5432));
    let _ = &w.servers;
}

/// A kubelet started with `--cgroup-root=/kubelet` and the systemd driver (kind nodes): the
/// agent finds `kubelet.slice/kubelet-kubepods.slice` below `--cgroup-root` and reads the
/// prefixed unit names of the pods' cgroups; each pod gets its own policy, not the pending mode.
#[test]
fn kubernetes_mode_kubelet_cgroup_root() {
    if !require_kernel() {
        return;
    }
    let _serial = serial();
    let w = World::new("kubelet.slice/kubelet-kubepods.slice", None, |api| {
        api.apply(&pod("shop", "svc-less", 1, json!({"app": "x"}), true));
        api.apply(&pod("plain", "free", 2, json!({}), true));
    });
    let ctr = w.start_pod_cgroup(1);
    assert!(
        ctr.to_string_lossy().contains(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod"
        ),
        "{}",
        ctr.display()
    );
    let mut gov = w.probe(&ctr, None);
    let mut free = w.probe(&w.start_pod_cgroup(2), None);
    w.await_mapped(&["shop/svc-less", "plain/free"]);
    allowed(&w, &mut gov, a(5432));
    denied(&w, &mut gov, b(5432));
    allowed(&w, &mut free, b(5432));
    let _ = &w.servers;
}

/// An EndpointSlice of Service `service` in `shop` naming pods `(n, name)` (as the endpoints
/// controller or an operator managing a selector-less Service's endpoints writes one).
fn endpoint_slice(name: &str, service: &str, pods: &[(u32, &str)]) -> EndpointSlice {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(n, pod)| {
            json!({"addresses": [format!("10.244.0.{n}")], "conditions": {"ready": true},
                   "nodeName": "n1",
                   "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod, "uid": uid(*n)}})
        })
        .collect();
    serde_json::from_value(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "operator.example"}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "db", "port": 8080, "protocol": "TCP"}]}),
    )
    .unwrap()
}

/// Kuma matches a Service without a selector to the pods its EndpointSlices name (by UID) and
/// gives them that Service's inbound tags. A MeshSubset on the Service's `kuma.io/service` tag
/// allows C:5432 (IP) and `other.test` (TLS SNI): a pod in its own network namespace (through
/// `--proxy-addr`) and a host-network pod, each allowed exactly while the slice names it.
#[test]
fn kubernetes_mode_selectorless_service_through_endpointslices() {
    if !require_kernel() {
        return;
    }
    let _serial = serial();
    let podnet = PodNet::new(TEST_SLOT).unwrap();
    let w = World::new("kubepods.slice", Some(&podnet), |api| {
        let svc: KService = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "legacy", "namespace": "shop"},
            "spec": {"ports": [{"name": "db", "port": 5432, "targetPort": 8080}]}}))
        .unwrap();
        api.apply(&svc);
        api.apply(&json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
            "metadata": {"name": "legacy-db", "namespace": "shop"},
            "spec": {"targetRef": {"kind": "MeshSubset", "tags": {"kuma.io/service": "legacy_shop_svc_5432"}},
                     "default": {"appendMatch": [
                         {"type": "IP", "value": c(0).ip().to_string(), "port": 5432},
                         {"type": "Domain", "value": "other.test", "port": 443, "protocol": "tls"}]}}}));
        api.apply(&pod("shop", "client", 1, json!({"app": "client"}), false));
        api.apply(&pod("shop", "batch", 2, json!({"app": "client"}), true));
        api.apply(&endpoint_slice("legacy-8k2p1", "legacy", &[(1, "client")]));
        // A slice of a Service that does not exist, naming pod 2: nothing.
        api.apply(&endpoint_slice("ghost-1", "ghost", &[(2, "batch")]));
    });
    let mut client = w.probe(&w.start_pod_cgroup(1), Some(&podnet));
    let mut batch = w.probe(&w.start_pod_cgroup(2), None);
    let policies = |name: &str| {
        w.pod_state(name)
            .map(|p| p["state"]["Governed"]["policies"].clone())
    };
    let named = json!(["kuma-system/egress", "shop/legacy-db"]);
    let not_named = json!(["kuma-system/egress"]);
    eventually("pods mapped", &w.agent, || {
        policies("shop/client") == Some(named.clone())
            && policies("shop/batch") == Some(not_named.clone())
    });
    let sni_ok = |p: &mut Probe| w.tls(p, b(443), "other.test")["ok"] == true;
    // The slice names the client: the legacy Service's policy applies to it only.
    assert!(sni_ok(&mut client), "{}", w.agent.describe());
    assert!(!sni_ok(&mut batch), "{}", w.agent.describe());
    denied(&w, &mut batch, c(5432));
    allowed(&w, &mut batch, a(5432));
    denied(&w, &mut client, d(5432));

    // The slice now names batch instead: the tags move with it.
    w.api
        .apply(&endpoint_slice("legacy-8k2p1", "legacy", &[(2, "batch")]));
    eventually("slice edit re-tags both pods", &w.agent, || {
        policies("shop/client") == Some(not_named.clone())
            && policies("shop/batch") == Some(named.clone())
    });
    allowed(&w, &mut batch, c(5432));
    assert!(sni_ok(&mut batch), "{}", w.agent.describe());
    assert!(!sni_ok(&mut client), "{}", w.agent.describe());

    // A second slice of the Service names the client again: both pods.
    w.api
        .apply(&endpoint_slice("legacy-x9q4z", "legacy", &[(1, "client")]));
    eventually("second slice", &w.agent, || {
        policies("shop/client") == Some(named.clone())
    });
    assert!(sni_ok(&mut client), "{}", w.agent.describe());

    // Slices deleted: neither pod is behind the Service any more.
    w.api.delete(Kind::EndpointSlice, "shop", "legacy-8k2p1");
    w.api.delete(Kind::EndpointSlice, "shop", "legacy-x9q4z");
    eventually("slices deleted", &w.agent, || {
        policies("shop/client") == Some(not_named.clone())
            && policies("shop/batch") == Some(not_named.clone())
    });
    denied(&w, &mut batch, c(5432));
    assert!(!sni_ok(&mut client), "{}", w.agent.describe());
    allowed(&w, &mut batch, a(5432));
    let _ = (&w.servers, &w.cg);
}
