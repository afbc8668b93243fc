//! `passthrough monitor` and `passthrough suggest` through the real kernel and proxy: a real
//! agent enforces (or audits) a policy on a test cgroup; a workload process there dials test
//! hosts behind a veth (host network namespace: the proxy is on loopback) with real TLS and
//! HTTP clients; `passthrough monitor` clients watch; the decision log records; `suggest`
//! writes a policy that `check` accepts and `explain` and a real agent enforce.
//!
//! Named hosts (`passthrough_tests::domains`, slot `OPS_SLOT`): host 1 serves api/web/the
//! wildcard names, host 2 is "another host", host 3 is reached by address only. Tests share
//! host routes, so they run one at a time ([`SERIAL`]).

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use passthrough_policy::decision_log::{self, DecisionRecord};
use passthrough_tests::{
    Agent, AgentBuilder, Probe, TestCgroup,
    agent::agent_binary,
    cli,
    domains::{DomainHosts, OPS_SLOT},
    l7::Service,
    require_kernel, wait_for, write_policy,
};
use serde_json::{Value, json};
use tempfile::TempDir;

static SERIAL: Mutex<()> = Mutex::new(());

const NAMES: &[(&str, &[u8])] = &[
    ("api.ops.test", &[1]),
    ("web.ops.test", &[1]),
    ("a.wild.ops.test", &[1]),
    ("b.wild.ops.test", &[1]),
    ("c.wild.ops.test", &[1]),
    ("other.ops.test", &[2]),
];

const SERVICES: &[(u16, Service)] = &[
    (443, Service::TlsEcho),
    (80, Service::Http),
    (5432, Service::Echo),
];

/// Mode Matched: host 3's port 5432 by address (kernel), api over TLS and web over HTTP by
/// name (proxy).
fn policy(h: &DomainHosts) -> String {
    format!(
        "apiVersion: kuma.io/v1alpha1
kind: MeshPassthrough
metadata: {{name: ops, labels: {{kuma.io/mesh: default}}}}
spec:
  targetRef: {{kind: Mesh}}
  default:
    passthroughMode: Matched
    appendMatch:
      - {{type: IP, value: \"{}\", port: 5432}}
      - {{type: Domain, value: api.ops.test, port: 443, protocol: tls}}
      - {{type: Domain, value: web.ops.test, port: 80, protocol: http}}
",
        h.host4(3, 0).ip()
    )
}

/// Field order = drop order: the workload, the agent, the hosts, the cgroup, the files, the
/// serialization guard.
struct World {
    probe: Probe,
    agent: Agent,
    hosts: DomainHosts,
    cg: TestCgroup,
    /// The policy file the agent was started with.
    policy: PathBuf,
    _dir: TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl World {
    /// The agent on [`policy`] (or `yaml`) with the flags `f` adds.
    fn new(yaml: Option<&str>, f: impl FnOnce(AgentBuilder) -> AgentBuilder) -> World {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = passthrough_tests::test_dir();
        let cg = TestCgroup::new().unwrap();
        let hosts = DomainHosts::start(OPS_SLOT, NAMES, SERVICES).unwrap();
        let file = write_policy(
            dir.path(),
            &yaml.map_or_else(|| policy(&hosts), str::to_string),
        );
        let agent = f(Agent::builder()
            .policy(&file)
            .cgroup(cg.path())
            .arg("--resolver")
            .arg(&hosts.resolver()))
        .start()
        .unwrap();
        let probe = Probe::spawn_in(cg.path(), None).unwrap();
        World {
            probe,
            agent,
            hosts,
            cg,
            policy: file,
            _dir: dir,
            _serial: serial,
        }
    }

    fn workload(&self) -> String {
        self.cg.name()
    }

    fn tls(&mut self, host: u8, sni: &str) -> Value {
        let addr = self.hosts.host4(host, 443);
        let ca = self.hosts.ca.display().to_string();
        self.probe
            .json(&json!({"op": "tls", "addr": addr.to_string(), "sni": sni, "ca": ca}))
    }

    fn http(&mut self, host: u8, name: &str) -> Value {
        let addr = self.hosts.host4(host, 80);
        self.probe
            .json(&json!({"op": "http1", "addr": addr.to_string(), "requests": [{"host": name}]}))
    }

    fn metric(&self, name: &str, label: &str) -> f64 {
        self.agent.metric(name, label)
    }
}

/// A `passthrough monitor` process; its output lines are collected by a thread.
struct Watcher {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Watcher {
    fn start(agent: &Agent, args: &[&str]) -> Watcher {
        let mut child = Command::new(agent_binary().unwrap())
            .arg("monitor")
            .args(["--admin-addr", &agent.admin_addr().to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap().push(line);
            }
        });
        Watcher { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn records(&self) -> Vec<DecisionRecord> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `CONFIG` value the programs read, from the pinned map.
fn kernel_config(agent: &Agent) -> passthrough_common::GlobalConfig {
    use aya::maps::{Array, Map, MapData};
    let pin = passthrough_user::pins::map_pin(agent.state_dir(), "CONFIG");
    let map = MapData::from_pin(&pin).unwrap();
    let arr: Array<MapData, passthrough_common::GlobalConfig> =
        Array::try_from(Map::Array(map)).unwrap();
    arr.get(&0, 0).unwrap()
}

/// The `CONFIG` flags the programs read, from the pinned map.
fn kernel_flags(agent: &Agent) -> u32 {
    kernel_config(agent).flags
}

/// `CLOCK_MONOTONIC` in nanoseconds: the programs' `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The id of the `MONITOR_EVENTS` ring the programs attached at `cg` write (not pinned: found
/// through the programs' map ids).
fn monitor_ring_id(cg: &Path) -> u32 {
    let bpftool = |args: &[&str]| -> Value {
        let out = Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "bpftool {args:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let progs = passthrough_tests::cgroup::attached_programs(cg).expect("bpftool");
    let mut rings = std::collections::BTreeSet::new();
    for p in &progs {
        let id = p.split_whitespace().next().unwrap();
        let info = bpftool(&["prog", "show", "id", id]);
        for m in info["map_ids"].as_array().into_iter().flatten() {
            let m = m.as_u64().unwrap().to_string();
            if bpftool(&["map", "show", "id", &m])["name"] == "MONITOR_EVENTS" {
                rings.insert(m.parse::<u32>().unwrap());
            }
        }
    }
    assert_eq!(rings.len(), 1, "one monitor ring for {progs:?}: {rings:?}");
    rings.into_iter().next().unwrap()
}

fn find<'a>(
    records: &'a [DecisionRecord],
    dst: SocketAddr,
    verdict: &str,
) -> Option<&'a DecisionRecord> {
    records
        .iter()
        .find(|r| r.dst == dst && r.verdict == verdict)
}

#[test]
fn monitor_streams_kernel_and_proxy_decisions_to_several_filtered_watchers() {
    if !require_kernel() {
        return;
    }
    // The proxy's TLS decision: with the fast path (on by default) the pre-warmed name would go
    // direct and be judged in the kernel (path kernel-sni, the next test).
    let mut w = World::new(None, |b| b.arg("--tls-fast-path=off"));
    let wl = w.workload();
    use passthrough_common::flags::MONITOR;
    // Nobody watches: the programs report no allowed decision.
    assert_eq!(kernel_flags(&w.agent) & MONITOR, 0);

    let all = Watcher::start(&w.agent, &["--json"]);
    let denied_kernel = Watcher::start(
        &w.agent,
        &["--json", "--verdict", "deny", "--path", "kernel"],
    );
    let other_dst = Watcher::start(&w.agent, &["--json", "--dst", "192.0.2.0/24"]);
    let text = Watcher::start(&w.agent, &["--workload", &wl]);
    wait_for(Duration::from_secs(10), "four watchers", || {
        (w.metric("passthrough_monitor_watchers", "") == 4.0).then_some(())
    });
    assert_ne!(
        kernel_flags(&w.agent) & MONITOR,
        0,
        "watchers switch the kernel's reporting on"
    );

    let kernel_ok = w.hosts.host4(3, 5432);
    let kernel_no = w.hosts.host4(3, 22);
    let c = w.probe.connect(kernel_ok).expect("allowed by the IP match");
    w.probe.close(c);
    assert_eq!(w.probe.connect(kernel_no).unwrap_err(), libc::EPERM);
    let r = w.tls(1, "api.ops.test");
    assert_eq!(r["ok"], true, "{r}");
    let r = w.http(1, "other.ops.test");
    assert_eq!(r["responses"][0]["status"], 503, "{r}");

    let tls_dst = w.hosts.host4(1, 443);
    let http_dst = w.hosts.host4(1, 80);
    let records = wait_for(Duration::from_secs(10), "the four decisions", || {
        let r = all.records();
        (find(&r, kernel_ok, "allow").is_some()
            && find(&r, kernel_no, "deny").is_some()
            && find(&r, tls_dst, "allow").is_some()
            && find(&r, http_dst, "deny").is_some())
        .then_some(r)
    });
    let k = find(&records, kernel_ok, "allow").unwrap();
    assert_eq!(
        (
            k.workload.as_str(),
            k.path.as_str(),
            k.reason.as_str(),
            k.protocol.as_str(),
            k.comm.as_str()
        ),
        (wl.as_str(), "kernel", "address_match", "tcp", "pt-probe"),
        "{k:?}"
    );
    assert_eq!(k.pid, w.probe.pid());
    let d = find(&records, kernel_no, "deny").unwrap();
    assert_eq!(
        (d.path.as_str(), d.reason.as_str()),
        ("kernel", "no_match"),
        "{d:?}"
    );
    let t = find(&records, tls_dst, "allow").unwrap();
    assert_eq!(
        (
            t.path.as_str(),
            t.reason.as_str(),
            t.protocol.as_str(),
            t.sni.as_deref()
        ),
        ("proxy", "domain_match", "tls", Some("api.ops.test")),
        "{t:?}"
    );
    assert!(
        t.matched
            .as_deref()
            .is_some_and(|m| m.contains("api.ops.test")),
        "{t:?}"
    );
    let h = find(&records, http_dst, "deny").unwrap();
    assert_eq!(
        (h.path.as_str(), h.reason.as_str(), h.host.as_deref()),
        ("proxy", "no_domain_match", Some("other.ops.test")),
        "{h:?}"
    );
    // Filters: only kernel denials; no decision of another network.
    let kd = wait_for(
        Duration::from_secs(5),
        "the kernel denial in the filtered stream",
        || {
            let r = denied_kernel.records();
            (!r.is_empty()).then_some(r)
        },
    );
    assert!(
        kd.iter().all(|r| r.verdict == "deny" && r.path == "kernel"),
        "{kd:?}"
    );
    assert!(find(&kd, kernel_no, "deny").is_some());
    assert!(other_dst.records().is_empty(), "{:?}", other_dst.lines());
    // Text: a header, then a line per decision with its fields.
    let lines = wait_for(Duration::from_secs(5), "four text lines", || {
        let l = text.lines();
        (l.len() >= 5).then_some(l)
    });
    assert!(lines[0].starts_with("time"), "{lines:?}");
    let tls_line = lines
        .iter()
        .find(|l| l.contains(&tls_dst.to_string()))
        .expect("the TLS decision as text");
    for field in [&wl, "tls", "api.ops.test", "allow", "proxy", "domain_match"] {
        assert!(tls_line.contains(field), "{field} missing: {tls_line}");
    }

    // Watchers leave: the programs stop reporting allowed decisions.
    drop((all, denied_kernel, other_dst, text));
    wait_for(Duration::from_secs(15), "the watchers to be gone", || {
        (w.metric("passthrough_monitor_watchers", "") == 0.0).then_some(())
    });
    wait_for(Duration::from_secs(5), "the kernel flag off", || {
        (kernel_flags(&w.agent) & MONITOR == 0).then_some(())
    });
    assert_eq!(w.metric("passthrough_monitor_lost_total", ""), 0.0);
}

/// The kernel's counter of ClientHellos the TLS fast path's judge allowed by a Domain match.
fn kernel_sni_allowed(w: &World) -> f64 {
    w.metric(
        "passthrough_kernel_decisions_total",
        "path=\"kernel-sni\",verdict=\"allow\",reason=\"domain_match\"",
    )
}

/// TLS to host `host` with `sni` until its hello is judged in the kernel (the pre-warmed
/// destination is verified within seconds of the start); each attempt must complete.
fn wait_kernel_sni(w: &mut World, host: u8, sni: &str) {
    wait_for(
        Duration::from_secs(10),
        "a hello judged in the kernel",
        || {
            let before = kernel_sni_allowed(w);
            let r = w.tls(host, sni);
            assert_eq!(r["ok"], true, "{sni}: {r}\n{}", w.agent.describe());
            (kernel_sni_allowed(w) - before == 1.0).then_some(())
        },
    );
}

/// The TLS fast path's allowed hellos reach watchers: with the fast path on (the default) and
/// a warm verified destination, a connection goes direct and its ClientHello is allowed in the
/// kernel; a `monitor --json --path kernel-sni --verdict allow` watcher sees it (path
/// `kernel-sni`, protocol `tls`, the SNI, the match, the workload and process), not the hello
/// refused at the same destination; the decision log records both; `suggest` on the watcher's
/// lines allows the name by a `Domain` match (not the address it was dialled at), which
/// `explain` confirms.
#[test]
fn watchers_and_the_decision_log_see_the_hellos_the_kernel_allows() {
    if !require_kernel() {
        return;
    }
    let logs = passthrough_tests::test_dir();
    let log = logs.path().join("decisions");
    let log_s = log.display().to_string();
    let mut w = World::new(None, |b| b.arg("--decision-log").arg(&log_s));
    let wl = w.workload();
    let watcher = Watcher::start(
        &w.agent,
        &["--json", "--path", "kernel-sni", "--verdict", "allow"],
    );
    wait_for(Duration::from_secs(10), "the watcher and the log", || {
        (w.metric("passthrough_monitor_watchers", "") == 2.0).then_some(())
    });
    wait_kernel_sni(&mut w, 1, "api.ops.test");
    // Refused in the kernel at the same verified destination (web.ops.test: HTTP on 80 only).
    let refused_before = w.metric(
        "passthrough_kernel_decisions_total",
        "path=\"kernel-sni\",verdict=\"deny\",reason=\"no_domain_match\"",
    );
    let r = w.tls(1, "web.ops.test");
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(
        w.metric(
            "passthrough_kernel_decisions_total",
            "path=\"kernel-sni\",verdict=\"deny\",reason=\"no_domain_match\"",
        ) - refused_before,
        1.0,
        "{}",
        w.agent.describe()
    );

    let tls_dst = w.hosts.host4(1, 443);
    let seen = wait_for(
        Duration::from_secs(10),
        "the allowed hello, watched",
        || {
            let r = watcher.records();
            find(&r, tls_dst, "allow").cloned()
        },
    );
    assert_eq!(
        (
            seen.workload.as_str(),
            seen.path.as_str(),
            seen.reason.as_str(),
            seen.protocol.as_str(),
            seen.sni.as_deref(),
            seen.comm.as_str(),
        ),
        (
            wl.as_str(),
            "kernel-sni",
            "domain_match",
            "tls",
            Some("api.ops.test"),
            "pt-probe"
        ),
        "{seen:?}"
    );
    assert_eq!(seen.pid, w.probe.pid());
    assert_eq!(seen.sampled, None, "{seen:?}");
    // The match that allows the name, as the proxy would report it.
    assert_eq!(
        seen.matched.as_deref(),
        Some("Domain api.ops.test port 443 Tls"),
        "{seen:?}"
    );

    // The decision log has the allowed hello and the refused one, both on path kernel-sni.
    let recorded = wait_for(Duration::from_secs(10), "both hellos in the log", || {
        let c = decision_log::read(std::slice::from_ref(&log)).ok()?;
        let ours: Vec<DecisionRecord> = c
            .records
            .into_iter()
            .filter(|r| r.workload == wl && r.path == "kernel-sni")
            .collect();
        (ours.iter().any(|r| r.verdict == "allow") && ours.iter().any(|r| r.verdict == "deny"))
            .then_some(ours)
    });
    let allowed = recorded.iter().find(|r| r.verdict == "allow").unwrap();
    assert_eq!(
        (allowed.dst, allowed.reason.as_str(), allowed.sni.as_deref()),
        (tls_dst, "domain_match", Some("api.ops.test")),
        "{allowed:?}"
    );
    let denied = recorded.iter().find(|r| r.verdict == "deny").unwrap();
    assert_eq!(
        (denied.reason.as_str(), denied.sni.as_deref()),
        ("no_domain_match", Some("web.ops.test")),
        "{denied:?}"
    );
    // The filtered watcher saw allowed kernel-sni decisions only.
    let lines = watcher.lines();
    let records = watcher.records();
    assert!(
        records
            .iter()
            .all(|r| r.path == "kernel-sni" && r.verdict == "allow"),
        "{lines:?}"
    );

    // suggest on the watcher's lines: a Domain match for the name, at its port, over TLS.
    let json = logs.path().join("kernel-sni.jsonl");
    std::fs::write(&json, lines.join("\n") + "\n").unwrap();
    let out_dir = logs.path().join("suggested");
    let (ok, out) = cli([
        "suggest",
        "--log",
        &json.display().to_string(),
        "--out",
        &out_dir.display().to_string(),
    ]);
    assert!(ok, "{out}");
    let yaml = std::fs::read_to_string(out_dir.join(format!(
        "{}.yaml",
        passthrough_policy::suggest::policy_name(&wl)
    )))
    .unwrap();
    assert!(
        yaml.contains("type: Domain")
            && yaml.contains("value: \"api.ops.test\"")
            && yaml.contains("port: 443")
            && yaml.contains("protocol: tls")
            && !yaml.contains("type: IP"),
        "{yaml}"
    );
    let e = explain(&out_dir, &seen);
    assert_eq!(e["verdict"], "allow", "{seen:?} under\n{yaml}\n{e:#}");
}

#[test]
fn an_agent_leaving_its_programs_attached_switches_their_report_off() {
    if !require_kernel() {
        return;
    }
    use passthrough_common::flags::MONITOR;
    let mut w = World::new(None, |b| b.arg("--keep-on-exit"));
    let watcher = Watcher::start(&w.agent, &["--json"]);
    wait_for(Duration::from_secs(10), "the watcher", || {
        (w.metric("passthrough_monitor_watchers", "") == 1.0).then_some(())
    });
    assert_ne!(kernel_flags(&w.agent) & MONITOR, 0);
    // The agent exits while watched; its programs stay attached, enforcing from the pins.
    w.agent.stop().unwrap();
    assert_eq!(
        kernel_flags(&w.agent) & MONITOR,
        0,
        "programs left attached still report allowed decisions to a reader that is gone"
    );
    let kernel_no = w.hosts.host4(3, 22);
    assert_eq!(w.probe.connect(kernel_no).unwrap_err(), libc::EPERM);
    drop(watcher);
    let (ok, out) = cli([
        "uninstall",
        "--state-dir",
        &w.agent.state_dir().display().to_string(),
    ]);
    assert!(ok, "{out}");
}

/// An agent killed while watched (SIGKILL: it cannot switch the report off) leaves
/// `flags::MONITOR` set in the pinned `CONFIG`, and its programs stay attached. Its lease runs
/// out within seconds, and from then on those programs report nothing into the ring nobody
/// reads (before the lease, each allowed connect cost a failed or useless ring reserve until the
/// next agent started).
#[test]
fn a_killed_agents_report_stops_when_its_lease_runs_out() {
    if !require_kernel() {
        return;
    }
    use aya::maps::{Map, MapData, RingBuf};
    use passthrough_common::flags::{MONITOR, monitor_live};
    let mut w = World::new(None, |b| b);
    let watcher = Watcher::start(&w.agent, &["--json"]);
    wait_for(Duration::from_secs(10), "the watcher", || {
        (w.metric("passthrough_monitor_watchers", "") == 1.0).then_some(())
    });
    let live = kernel_config(&w.agent);
    assert_ne!(live.flags & MONITOR, 0);
    assert!(
        monitor_live(live.monitor_lease, monotonic_ns()),
        "the watched agent holds a live lease: {} at {}",
        live.monitor_lease,
        monotonic_ns()
    );
    // Watched: an allowed connect and a hello allowed in the kernel (the TLS fast path, on by
    // default) are reported (what the end of this test must not see).
    let kernel_ok = w.hosts.host4(3, 5432);
    let c = w.probe.connect(kernel_ok).expect("allowed by the IP match");
    w.probe.close(c);
    wait_for(
        Duration::from_secs(10),
        "the allowed connect, watched",
        || find(&watcher.records(), kernel_ok, "allow").map(|_| ()),
    );
    wait_kernel_sni(&mut w, 1, "api.ops.test");
    let tls_dst = w.hosts.host4(1, 443);
    wait_for(
        Duration::from_secs(10),
        "the allowed hello, watched",
        || {
            watcher
                .records()
                .iter()
                .find(|r| r.dst == tls_dst && r.path == "kernel-sni" && r.verdict == "allow")
                .map(|_| ())
        },
    );
    let ring_id = monitor_ring_id(w.cg.path());

    w.agent.kill9();
    drop(watcher);
    let left = kernel_config(&w.agent);
    assert_ne!(
        left.flags & MONITOR,
        0,
        "a killed agent could not clear the flag (else this test proves nothing)"
    );
    // Standing in for an agent on the pinned CONFIG, with a lease of its own: the flag off
    // (nobody watches) reports nothing of the judge's allowed hellos, nor of allowed
    // connects; the flag on with a live lease reports each hello, a record with its name.
    {
        use aya::maps::Array;
        let pin = passthrough_user::pins::map_pin(w.agent.state_dir(), "CONFIG");
        let mut config: Array<MapData, passthrough_common::GlobalConfig> =
            Array::try_from(Map::Array(MapData::from_pin(&pin).unwrap())).unwrap();
        let mut ring = RingBuf::try_from(Map::RingBuf(MapData::from_id(ring_id).unwrap())).unwrap();
        let reported = |ring: &mut RingBuf<MapData>| {
            let mut sizes = Vec::new();
            while let Some(item) = ring.next() {
                sizes.push(item.len());
            }
            sizes
        };
        reported(&mut ring);
        let fresh = passthrough_common::flags::monitor_lease(monotonic_ns());
        let mut cfg = left;
        cfg.flags = passthrough_common::flags::with_monitor(cfg.flags, false, 0);
        cfg.monitor_lease = fresh;
        config.set(0, cfg, 0).unwrap();
        for _ in 0..3 {
            let c = w
                .probe
                .connect(kernel_ok)
                .expect("still enforced from the pins");
            w.probe.close(c);
            let r = w.tls(1, "api.ops.test");
            assert_eq!(r["ok"], true, "direct, judged in the kernel: {r}");
        }
        assert_eq!(reported(&mut ring), [0usize; 0], "nobody watches");
        // Every decision (no sampling).
        cfg.flags = passthrough_common::flags::with_monitor(cfg.flags, true, 0);
        config.set(0, cfg, 0).unwrap();
        let r = w.tls(1, "api.ops.test");
        assert_eq!(r["ok"], true, "direct, judged in the kernel: {r}");
        assert_eq!(
            reported(&mut ring),
            [std::mem::size_of::<passthrough_common::SniDenyEvent>()],
            "watched: the allowed hello, with its name"
        );
        config.set(0, left, 0).unwrap();
    }
    // A wait, not a speed claim: the lease is about 11 s from the agent's last renewal.
    wait_for(Duration::from_secs(60), "the lease to run out", || {
        (!monitor_live(left.monitor_lease, monotonic_ns())).then_some(())
    });
    let mut ring = RingBuf::try_from(Map::RingBuf(MapData::from_id(ring_id).unwrap())).unwrap();
    while ring.next().is_some() {}
    for _ in 0..20 {
        let c = w
            .probe
            .connect(kernel_ok)
            .expect("still enforced from the pins");
        w.probe.close(c);
    }
    // The verified destination outlives the agent (its DNS answer's TTL), and the judge
    // allows the hello from the pins: the connection completes directly (the killed agent's
    // proxy could not have carried it).
    for _ in 0..5 {
        let r = w.tls(1, "api.ops.test");
        assert_eq!(r["ok"], true, "direct, judged in the kernel: {r}");
    }
    let mut reported = 0;
    while ring.next().is_some() {
        reported += 1;
    }
    assert_eq!(
        reported, 0,
        "allowed connects or hellos reported after the killed agent's lease ran out"
    );
}

/// What the suggest test sends, and how to send it again.
#[derive(Clone, Copy, Debug)]
enum Send {
    /// TCP connect to host:port.
    Tcp(u8, u16),
    /// Connected UDP to host:port.
    Udp(u8, u16),
    /// TLS with this SNI to host:443.
    Tls(u8, &'static str),
    /// HTTP/1.1 with this Host to host:80.
    Http(u8, &'static str),
}

const TRAFFIC: &[Send] = &[
    Send::Tcp(3, 5432),
    Send::Tcp(3, 22),
    Send::Udp(3, 5353),
    Send::Tls(1, "api.ops.test"),
    Send::Tls(1, "a.wild.ops.test"),
    Send::Tls(1, "b.wild.ops.test"),
    Send::Tls(1, "c.wild.ops.test"),
    // Spoofed: an allowed name at another host's address.
    Send::Tls(2, "api.ops.test"),
    Send::Http(1, "web.ops.test"),
    Send::Http(1, "a.wild.ops.test"),
];

/// Sends `s`; true when the workload got through (a refused TCP port counts: the connect was
/// allowed, nobody listens there).
fn send(w: &mut World, s: Send) -> bool {
    match s {
        Send::Tcp(h, p) => match w.probe.connect(w.hosts.host4(h, p)) {
            Ok(c) => {
                w.probe.close(c);
                true
            }
            Err(e) => e != libc::EPERM,
        },
        Send::Udp(h, p) => w.probe.connect_udp(w.hosts.host4(h, p)).is_ok(),
        Send::Tls(h, sni) => w.tls(h, sni)["ok"] == true,
        Send::Http(h, name) => w.http(h, name)["responses"][0]["status"] == 200,
    }
}

/// `passthrough explain --json` for a recorded decision under the policies in `dir`, for a
/// workload no other policy selects (`--unselected-mode None`: a suggestion that did not
/// select it allows nothing).
fn explain(dir: &Path, r: &DecisionRecord) -> Value {
    let mut c = Command::new(agent_binary().unwrap());
    c.args(["explain", "--json", "--unselected-mode", "None", "--policy"])
        .arg(dir)
        .args(["--workload", &r.workload, "--dst", &r.dst.to_string()]);
    match r.protocol.as_str() {
        "udp" => {
            c.arg("--udp");
        }
        "tls" => {
            c.args(["--sni", r.sni.as_deref().unwrap_or("")]);
        }
        "http1" => {
            c.args(["--host", r.host.as_deref().unwrap_or("")]);
        }
        "h2c" | "grpc" => {
            c.args(["--host", r.host.as_deref().unwrap_or(""), "--h2c"]);
        }
        _ => {}
    }
    let out = c.output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "explain {r:?}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn suggest_from_an_audit_log_allows_what_was_seen_and_the_kernel_enforces_it() {
    if !require_kernel() {
        return;
    }
    let logs = passthrough_tests::test_dir();
    let log = logs.path().join("decisions");
    let log_s = log.display().to_string();
    // The audit policy README's adoption path starts from: names on 443/80 through the proxy.
    let audit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/audit-policy.yaml"),
    )
    .unwrap();
    let mut w = World::new(Some(&audit), |b| {
        b.arg("--audit").arg("--decision-log").arg(&log_s)
    });
    let wl = w.workload();
    for s in TRAFFIC {
        assert!(send(&mut w, *s), "{s:?} under --audit");
    }
    // Every decision is in the log, one record each (all distinct), the spoofed name refused
    // by the destination check (a would-be denial under --audit).
    let recorded = |min: usize| {
        wait_for(Duration::from_secs(10), "the decisions in the log", || {
            let c = decision_log::read(std::slice::from_ref(&log)).ok()?;
            let ours: Vec<DecisionRecord> =
                c.records.into_iter().filter(|r| r.workload == wl).collect();
            (ours.len() >= min).then_some(ours)
        })
    };
    let before = recorded(TRAFFIC.len());
    assert_eq!(before.len(), TRAFFIC.len(), "{before:#?}");
    let spoof = before
        .iter()
        .find(|r| r.reason == "destination_check")
        .expect("the spoofed name");
    assert_eq!(spoof.dst, w.hosts.host4(2, 443));
    assert_eq!(spoof.verdict, "would_deny");

    // The log survives a restart: a new agent writes a new segment beside the old one.
    w.agent.stop().unwrap();
    w.agent = Agent::builder()
        .policy(&w.policy)
        .cgroup(w.cg.path())
        .arg("--resolver")
        .arg(&w.hosts.resolver())
        .arg("--audit")
        .arg("--decision-log")
        .arg(&log_s)
        .start()
        .unwrap();
    assert!(send(&mut w, Send::Tcp(3, 8080)));
    let all = recorded(TRAFFIC.len() + 1);
    assert!(all.iter().any(|r| r.dst == w.hosts.host4(3, 8080)));
    assert!(decision_log::segments(&log).unwrap().len() >= 2);
    w.agent.stop().unwrap();

    // suggest → check → explain allows every recorded decision.
    for (name, extra) in [
        ("exact", &[][..]),
        (
            "wild",
            &["--wildcard", "wild.ops.test", "--wildcard-threshold", "3"][..],
        ),
    ] {
        let out_dir = logs.path().join(name);
        let mut args = vec!["suggest", "--log", &log_s, "--out"];
        let out_s = out_dir.display().to_string();
        args.push(&out_s);
        args.extend_from_slice(extra);
        let (ok, out) = cli(&args);
        assert!(ok, "{out}");
        let (ok, out) = cli(["check", &out_s]);
        assert!(ok, "check refused the suggestion: {out}");
        let yaml = std::fs::read_to_string(out_dir.join(format!(
            "{}.yaml",
            passthrough_policy::suggest::policy_name(&wl)
        )))
        .unwrap();
        assert_eq!(
            yaml.contains("\"*.wild.ops.test\""),
            name == "wild",
            "{yaml}"
        );
        for r in &all {
            let e = explain(&out_dir, r);
            assert_eq!(e["verdict"], "allow", "{r:?} under\n{yaml}\n{e:#}");
        }
    }

    // Enforce the exact suggestion: everything recorded gets through, nothing else does.
    let exact = logs.path().join("exact");
    w.agent = Agent::builder()
        .policy(&exact)
        .cgroup(w.cg.path())
        .arg("--resolver")
        .arg(&w.hosts.resolver())
        .start()
        .unwrap();
    for s in TRAFFIC.iter().chain(&[Send::Tcp(3, 8080)]) {
        assert!(
            send(&mut w, *s),
            "{s:?} under the suggested policy\n{}",
            w.agent.describe()
        );
    }
    assert!(
        !send(&mut w, Send::Tcp(3, 8443)),
        "a destination never seen"
    );
    assert!(
        !send(&mut w, Send::Tls(1, "d.wild.ops.test")),
        "a name never seen"
    );
}
