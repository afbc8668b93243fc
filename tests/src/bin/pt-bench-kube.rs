//! `pt-bench-kube`: Kubernetes mode with 1,000 pods on one node (run by `cargo xtask bench kube`).
//!
//! The real agent (`passthrough run --kubernetes`, release build) against the local API server
//! (`passthrough_tests::apiserver`) holding 1,000 pods of this node in 20 namespaces, a Service
//! per namespace with its EndpointSlice naming the namespace's pods, a selector-less Service per
//! namespace whose EndpointSlice names 5 of them (they get its inbound, as in Kuma), a
//! ReplicaSet and a Job per namespace (watched metadata-only), one
//! mesh-wide MeshPassthrough (100 IP/CIDR matches, 5 domains) and one namespace-scoped
//! MeshPassthrough per namespace; every pod has its cgroup in a test kubepods tree (systemd
//! layout) under the real cgroup2 mount before the agent starts.
//!
//! Measured:
//! - **pod cgroup → enforced**: 200 more pods, known to the API server; for each, the time from
//!   just before `mkdir` of its cgroup until the agent's update of the kernel's workload map
//!   returned (the agent's timing line), checked by polling the map (read from the pins) every
//!   50 µs until it holds the cgroup with its own policy's mode (`Matched`); the poll's own
//!   figure is printed too; then the cgroup is removed;
//! - **policy change → all pods**: the mesh-wide policy edited on the API server, time until the
//!   kernel's policy generation flips (one atomic flip covers every pod: docs/design.md), 10 times;
//! - **agent RSS** (`VmRSS`, `VmHWM` of the agent process) with 1,000 pods;
//! - **API requests**: lists and watches per kind seen by the API server over the whole run.
//!
//! Where a pod's time goes, per pod, all on `CLOCK_MONOTONIC` (one clock for every process):
//! the `mkdir` call; `mkdir` returned → the agent read the inotify event and → its map update
//! returned (the agent's `passthrough::pod_timing` debug lines); the map update → this bench's
//! poll saw it. Same run baseline: a minimal process blocked in `read` on an inotify watch of
//! the same QoS directory (`--inotify-floor`, a child of this bench) timestamps the same events,
//! which is the floor a loaded machine sets for any process woken by inotify. The kernel's
//! `schedstat` run delay (time runnable but waiting for a CPU) of the agent's and the floor's
//! threads over the pod phase is reported per pod.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use k8s_openapi::api::{
    apps::v1::ReplicaSet,
    batch::v1::Job,
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
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

/// An EndpointSlice of Service `svc` in namespace `i` naming pods `ns`.
fn slice(i: u32, svc: &str, managed_by: &str, pods: &[u32]) -> anyhow::Result<EndpointSlice> {
    let endpoints: Vec<serde_json::Value> = pods
        .iter()
        .map(|n| json!({"addresses": [format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255)],
            "conditions": {"ready": true}, "nodeName": "n1",
            "targetRef": {"kind": "Pod", "namespace": format!("ns-{i:02}"), "name": format!("pod-{n}"), "uid": uid(*n)}}))
        .collect();
    Ok(serde_json::from_value(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-x{i:02}"), "namespace": format!("ns-{i:02}"),
            "labels": {"kubernetes.io/service-name": svc, "endpointslice.kubernetes.io/managed-by": managed_by}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [{"port": 8080}]}),
    )?)
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

/// `CLOCK_MONOTONIC` in µs (the clock of the agent's timing lines).
fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// `--inotify-floor DIR`: prints `<name> <monotonic µs>` for every directory created in `DIR`,
/// read as soon as the kernel wakes this process. Runs until killed.
fn inotify_floor(dir: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let path = std::ffi::CString::new(dir)?;
    // SAFETY: plain syscalls on a descriptor this function owns.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        bail!("inotify_init1: {}", std::io::Error::last_os_error());
    }
    if unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_CREATE | libc::IN_ONLYDIR) } < 0
    {
        bail!(
            "inotify_add_watch {dir}: {}",
            std::io::Error::last_os_error()
        );
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let now = monotonic_us();
        if n <= 0 {
            bail!("read: {}", std::io::Error::last_os_error());
        }
        let mut off = 0usize;
        let head = std::mem::size_of::<libc::inotify_event>();
        let mut out = std::io::stdout().lock();
        while off + head <= n as usize {
            // SAFETY: the kernel wrote whole events; read_unaligned copes with the byte buffer.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
            let name = &buf[off + head..off + head + ev.len as usize];
            let name = String::from_utf8_lossy(name.split(|b| *b == 0).next().unwrap_or(&[]));
            writeln!(out, "{name} {now}")?;
            off += head + ev.len as usize;
        }
        out.flush()?;
    }
}

/// Total `schedstat` run delay (ns runnable but not running) of every thread of `pid`.
fn run_delay_ns(pid: u32) -> u64 {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// `key=value` of a tracing line (the agent's `passthrough::pod_timing` lines).
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    println!(
        "  {name:<46} p50 {:>7.2}  p90 {:>7.2}  p99 {:>7.2}  max {:>7.2}",
        percentile(&v, 50.0),
        percentile(&v, 90.0),
        percentile(&v, 99.0),
        v.last().copied().unwrap_or(0.0)
    );
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--inotify-floor") {
        return inotify_floor(argv.get(i + 1).context("--inotify-floor DIR")?);
    }
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
        let legacy: Service =
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "legacy", "namespace": ns},
            "spec": {"ports": [{"port": 5432, "targetPort": 8080}]}}))?;
        api.apply(&legacy);
        let in_ns: Vec<u32> = (0..PODS).filter(|n| n % NAMESPACES == i).collect();
        api.apply(&slice(i, "web", "endpointslice-controller.k8s.io", &in_ns)?);
        api.apply(&slice(i, "legacy", "operator.example", &in_ns[..5])?);
        let rs: ReplicaSet = serde_json::from_value(
            json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "web-6b7c8d9f0", "namespace": ns,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": format!("d-{i}")}]},
            "spec": {"selector": {"matchLabels": {"tier": "web"}}},
            "status": {"replicas": 50}}),
        )?;
        api.apply(&rs);
        let job: Job = serde_json::from_value(json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "report-29123456", "namespace": ns,
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "report", "uid": format!("c-{i}")}]},
            "spec": {"template": {"spec": {"containers": [{"name": "r", "image": "r"}], "restartPolicy": "Never"}}}}))?;
        api.apply(&job);
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
    // The agent's per-pod timing lines (debug, one target) on top of its usual info log.
    // SAFETY: single-threaded here; the runtime's worker does not read the environment.
    unsafe { std::env::set_var("PASSTHROUGH_TEST_LOG", "info,passthrough::pod_timing=debug") };
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
    let qos_dir = root.qos_dir(Qos::BestEffort);
    let mut floor = std::process::Command::new(std::env::current_exe()?)
        .arg("--inotify-floor")
        .arg(&qos_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let floor_out = floor.stdout.take().context("floor stdout")?;
    let floor_lines = std::thread::spawn(move || {
        use std::io::BufRead as _;
        std::io::BufReader::new(floor_out)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    // Its "ready" line is read with the rest; give it time to set the watch.
    std::thread::sleep(Duration::from_millis(200));
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (agent_delay0, floor_delay0) = (run_delay_ns(agent.pid()), run_delay_ns(floor.id()));
    let mut lat = Vec::new();
    // Per pod: (name, cgroup id, mkdir start, mkdir returned, seen by this bench), µs.
    let mut marks: Vec<(String, u64, u64, u64, u64)> = Vec::new();
    for n in PODS..PODS + new_pods {
        let dir = root.pod_dir(&uid(n), Qos::BestEffort);
        let t0 = Instant::now();
        let m0 = monotonic_us();
        std::fs::create_dir(&dir)?;
        let m1 = monotonic_us();
        use std::os::unix::fs::MetadataExt as _;
        let id = std::fs::metadata(&dir)?.ino();
        loop {
            if maps.mode_of(id) == Some(mode::MATCHED) {
                lat.push(t0.elapsed().as_secs_f64() * 1e3);
                let name = dir.file_name().unwrap().to_string_lossy().into_owned();
                marks.push((name, id, m0, m1, monotonic_us()));
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
    let (agent_delay, floor_delay) = (
        run_delay_ns(agent.pid()) - agent_delay0,
        run_delay_ns(floor.id()) - floor_delay0,
    );
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = floor.kill();
    let _ = floor.wait();
    let floor_seen: std::collections::HashMap<String, u64> = floor_lines
        .join()
        .unwrap_or_default()
        .iter()
        .filter_map(|l| {
            let (name, us) = l.rsplit_once(' ')?;
            Some((name.to_string(), us.parse().ok()?))
        })
        .collect();
    let agent_seen: std::collections::HashMap<u64, (u64, u64)> = agent
        .log()
        .lines()
        .filter(|l| l.contains("pod cgroup enforced from its inotify event"))
        .filter_map(|l| {
            Some((
                field(l, "cgroup_id")?,
                (field(l, "read_us")?, field(l, "written_us")?),
            ))
        })
        .collect();

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
    let requests: Vec<(Kind, (usize, usize))> =
        Kind::ALL.into_iter().map(|k| (k, api.count(k))).collect();
    let other = api
        .requests()
        .iter()
        .filter(|r| r.kind.is_none() || r.get)
        .count();
    agent.stop()?;
    drop(cg);

    println!(
        "pods on the node: {PODS} (+{new_pods} started and stopped one at a time), namespaces: {NAMESPACES}, policies: {}, Services: {} ({NAMESPACES} selector-less), EndpointSlices: {}, ReplicaSets: {NAMESPACES}, Jobs: {NAMESPACES}",
        NAMESPACES + 1,
        2 * NAMESPACES,
        2 * NAMESPACES
    );
    println!(
        "agent start to ready (first list of every kind, plan for {PODS} pods, attach): {:.0} ms",
        startup.as_secs_f64() * 1e3
    );
    let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
    let timed: Vec<_> = marks
        .iter()
        .filter_map(|(name, id, m0, m1, seen)| {
            let (read, written) = agent_seen.get(id)?;
            Some((
                *m0,
                *m1,
                *read,
                *written,
                *seen,
                floor_seen.get(name).copied(),
            ))
        })
        .collect();
    // The figure: from before `mkdir` (the cgroup cannot exist earlier) until the agent's map
    // update returned (the entry this bench then found by polling, with the pod's own mode).
    // The poll's own figure adds this process's wake-up delay on a loaded machine.
    let mut enforced: Vec<f64> = timed.iter().map(|t| ms(t.0, t.3)).collect();
    enforced.sort_by(f64::total_cmp);
    println!(
        "pod cgroup -> enforced by its policy (ms, mkdir call -> the agent's map update, n={}): p50 {:.2}  p99 {:.2}  max {:.2}",
        enforced.len(),
        percentile(&enforced, 50.0),
        percentile(&enforced, 99.0),
        enforced.last().copied().unwrap_or(0.0)
    );
    println!(
        "pod cgroup -> seen enforced by this bench's poll of the pinned map (ms, n={}): p50 {:.2}  p99 {:.2}  max {:.2}",
        lat.len(),
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(0.0)
    );
    println!(
        "where the time goes (ms, CLOCK_MONOTONIC, {} of {} pods enforced from the inotify event; load average before {} after {}):",
        timed.len(),
        marks.len(),
        load_before.split_whitespace().next().unwrap_or("?"),
        load_after.split_whitespace().next().unwrap_or("?"),
    );
    summary("mkdir call", timed.iter().map(|t| ms(t.0, t.1)).collect());
    summary(
        "mkdir returned -> agent read the event",
        timed.iter().map(|t| ms(t.1, t.2)).collect(),
    );
    summary(
        "agent read -> map update returned",
        timed.iter().map(|t| ms(t.2, t.3)).collect(),
    );
    summary(
        "map update -> this bench's poll saw it",
        timed.iter().map(|t| ms(t.3, t.4)).collect(),
    );
    summary(
        "mkdir call -> map updated (enforced)",
        timed.iter().map(|t| ms(t.0, t.3)).collect(),
    );
    summary(
        "baseline: mkdir returned -> minimal reader woke",
        timed.iter().filter_map(|t| Some(ms(t.1, t.5?))).collect(),
    );
    summary(
        "baseline: mkdir call -> minimal reader woke",
        timed.iter().filter_map(|t| Some(ms(t.0, t.5?))).collect(),
    );
    println!(
        "  run delay (kernel schedstat, waiting for a CPU) per pod: agent {:.2} ms, minimal reader {:.2} ms",
        agent_delay as f64 / 1e6 / marks.len().max(1) as f64,
        floor_delay as f64 / 1e6 / marks.len().max(1) as f64
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
