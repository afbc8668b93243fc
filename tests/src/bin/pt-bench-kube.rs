//! `pt-bench-kube`: Kubernetes mode with 1,000 pods on one node (run by `cargo xtask bench kube`).
//!
//! The real agent (`passthrough run --kubernetes`, release build) against the local API server
//! (`passthrough_tests::apiserver`) holding 1,000 pods of this node in 20 namespaces, a Service
//! per namespace, one mesh-wide MeshPassthrough (100 IP/CIDR matches, 5 domains) and one
//! namespace-scoped MeshPassthrough per namespace; every pod has its cgroup in a test kubepods
//! tree (systemd layout) under the real cgroup2 mount before the agent starts.
//!
//! Measured:
//! - **pod cgroup → enforced**: 200 more pods, known to the API server; for each, the time from
//!   `mkdir` of its cgroup to the moment the kernel's workload map (read from the pins) holds the
//!   cgroup with its own policy's mode (`Matched`), polled every 50 µs; then the cgroup is removed;
//! - **policy change → all pods**: the mesh-wide policy edited on the API server, time until the
//!   kernel's policy generation flips (one atomic flip covers every pod: docs/design.md), 10 times;
//! - **agent RSS** (`VmRSS`, `VmHWM` of the agent process) with 1,000 pods;
//! - **API requests**: lists and watches per kind seen by the API server over the whole run.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use passthrough_common::{GlobalConfig, WorkloadEntry, WorkloadKey, mode};
use passthrough_kube::cgroups::{KubepodsRoot, Qos};
use passthrough_tests::{
    Agent, TestCgroup,
    apiserver::{ApiServer, Kind},
};
use serde_json::json;

const PODS: u32 = 1_000;
const NEW_PODS: u32 = 200;
const NAMESPACES: u32 = 20;

fn uid(n: u32) -> String {
    format!("bbbbbbbb-0000-4000-8000-{n:012x}")
}

fn pod(n: u32) -> Pod {
    let ns = format!("ns-{:02}", n % NAMESPACES);
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{n}"), "namespace": ns, "uid": uid(n),
            "labels": {"app": format!("app-{}", n % 50), "tier": "web"}},
        "spec": {"nodeName": "n1", "serviceAccountName": "default",
            "containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080}]}]},
        "status": {"qosClass": "BestEffort", "phase": "Running"}
    }))
    .expect("pod")
}

fn mesh_policy(version: u32) -> serde_json::Value {
    let mut m = Vec::new();
    for i in 0..100u32 {
        m.push(json!({"type": "CIDR", "value": format!("10.{}.{}.0/24", i / 200, i % 200 + version % 50), "port": 443}));
    }
    for d in [
        "a.example.com",
        "*.b.example.com",
        "c.example.com",
        "d.example.com",
        "e.example.com",
    ] {
        m.push(json!({"type": "Domain", "value": d, "port": 443, "protocol": "tls"}));
    }
    json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
        "metadata": {"name": "mesh-wide", "namespace": "kuma-system"},
        "spec": {"targetRef": {"kind": "Mesh"}, "default": {"passthroughMode": "Matched", "appendMatch": m}}})
}

struct Maps {
    config: Array<MapData, GlobalConfig>,
    workloads: BpfHashMap<MapData, WorkloadKey, WorkloadEntry>,
}

impl Maps {
    fn open(state: &Path) -> anyhow::Result<Maps> {
        let open = |name: &str| {
            let pin = passthrough_user::pins::map_pin(state, name);
            MapData::from_pin(&pin).with_context(|| format!("{}", pin.display()))
        };
        Ok(Maps {
            config: Array::try_from(Map::Array(open("CONFIG")?))?,
            workloads: BpfHashMap::try_from(Map::HashMap(open("WORKLOADS")?))?,
        })
    }
    fn config(&self) -> GlobalConfig {
        self.config.get(&0, 0).expect("CONFIG[0]")
    }
    fn mode_of(&self, id: u64) -> Option<u32> {
        let g = self.config().active_generation & 1;
        self.workloads
            .get(
                &WorkloadKey {
                    generation: g,
                    _pad: 0,
                    cgroup_id: id,
                },
                0,
            )
            .ok()
            .map(|e| e.mode)
    }
}

/// The `q`th percentile of sorted samples (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("pt-bench-kube needs root (cgroups, BPF)");
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let new_pods = if quick { 20 } else { NEW_PODS };
    let rounds = if quick { 3 } else { 10 };
    passthrough_tests::sweep(false);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let api = rt.block_on(ApiServer::start())?;
    let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}}}))?;
    api.apply(&node);
    let sys: Namespace = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kuma-system"}}),
    )?;
    api.apply(&sys);
    for i in 0..NAMESPACES {
        let ns = format!("ns-{i:02}");
        let n: Namespace = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"kuma.io/sidecar-injection": "enabled"}}}))?;
        api.apply(&n);
        let s: Service = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"selector": {"tier": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}))?;
        api.apply(&s);
        api.apply(&json!({"apiVersion": "kuma.io/v1alpha1", "kind": "MeshPassthrough",
            "metadata": {"name": "team", "namespace": ns},
            "spec": {"targetRef": {"kind": "MeshSubset", "tags": {"kuma.io/service": format!("web_{ns}_svc_80")}},
                     "default": {"appendMatch": [{"type": "IP", "value": format!("192.0.2.{i}"), "port": 5432}]}}}));
    }
    api.apply(&mesh_policy(0));
    for n in 0..PODS + new_pods {
        api.apply(&pod(n));
    }
    let cg = TestCgroup::new()?;
    let root_dir = cg.path().join("kubepods.slice");
    std::fs::create_dir(&root_dir)?;
    let root = KubepodsRoot::at(&root_dir);
    for n in 0..PODS {
        std::fs::create_dir_all(root.pod_dir(&uid(n), Qos::BestEffort))?;
    }
    let bin =
        std::env::var("PASSTHROUGH_BIN").unwrap_or_else(|_| "target/release/passthrough".into());
    let t = Instant::now();
    let mut agent = Agent::builder()
        .binary(&bin)
        .arg("--kubernetes")
        .arg("--kubeconfig")
        .arg(&api.kubeconfig().display().to_string())
        .arg("--node-name")
        .arg("n1")
        .arg("--kubepods-cgroup")
        .arg(&root_dir.display().to_string())
        .arg("--status-file")
        .arg(&api.dir().join("status.json").display().to_string())
        .start()?;
    let startup = t.elapsed();
    let maps = Maps::open(agent.state_dir())?;
    let (rss, hwm) = rss_kib(agent.pid());

    // Pod cgroup → enforced by its own policy.
    let mut lat = Vec::new();
    for n in PODS..PODS + new_pods {
        let dir = root.pod_dir(&uid(n), Qos::BestEffort);
        let t0 = Instant::now();
        std::fs::create_dir(&dir)?;
        use std::os::unix::fs::MetadataExt as _;
        let id = std::fs::metadata(&dir)?.ino();
        loop {
            if maps.mode_of(id) == Some(mode::MATCHED) {
                lat.push(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("pod {n} not enforced within 10 s\n{}", agent.describe());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        std::fs::remove_dir(&dir)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    lat.sort_by(f64::total_cmp);

    // Policy change → every pod.
    let mut flips = Vec::new();
    for r in 1..=rounds {
        std::thread::sleep(Duration::from_millis(300));
        let before = maps.config().policy_generation;
        let t0 = Instant::now();
        api.apply(&mesh_policy(r));
        loop {
            if maps.config().policy_generation > before {
                flips.push(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!(
                    "policy change not applied within 10 s\n{}",
                    agent.describe()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    flips.sort_by(f64::total_cmp);
    let (rss_after, hwm_after) = rss_kib(agent.pid());
    let requests: Vec<(Kind, (usize, usize))> = [
        Kind::Pod,
        Kind::Node,
        Kind::Namespace,
        Kind::Service,
        Kind::MeshPassthrough,
    ]
    .into_iter()
    .map(|k| (k, api.count(k)))
    .collect();
    let other = api
        .requests()
        .iter()
        .filter(|r| r.kind.is_none() || r.get)
        .count();
    agent.stop()?;
    drop(cg);

    println!(
        "pods on the node: {PODS} (+{new_pods} started and stopped one at a time), namespaces: {NAMESPACES}, policies: {}",
        NAMESPACES + 1
    );
    println!(
        "agent start to ready (first list of every kind, plan for {PODS} pods, attach): {:.0} ms",
        startup.as_secs_f64() * 1e3
    );
    println!(
        "pod cgroup -> enforced by its policy (ms, n={}): p50 {:.2}  p99 {:.2}  max {:.2}",
        lat.len(),
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(0.0)
    );
    println!(
        "policy change -> all pods (ms, n={}): p50 {:.1}  max {:.1}",
        flips.len(),
        percentile(&flips, 50.0),
        flips.last().copied().unwrap_or(0.0)
    );
    println!(
        "agent RSS with {PODS} pods: {:.1} MiB (peak {:.1} MiB); after the run {:.1} MiB (peak {:.1} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        hwm_after as f64 / 1024.0
    );
    for (k, (l, w)) in &requests {
        println!("API requests {k:?}: {l} list, {w} watch");
    }
    println!("API requests for anything else (per-pod gets, discovery): {other}");
    Ok(())
}
