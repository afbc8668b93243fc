//! `pt-demo` (`cargo xtask demo`): passthrough end to end on test hosts it creates itself.
//!
//! Creates a workload cgroup and two sets of test hosts, starts the real agent with
//! `examples/demo-policy.yaml`, then has workload processes connect:
//!
//! 1. **Kernel (IP/CIDR matches)**: from a workload in its own network namespace to hosts
//!    behind a veth (documentation ranges). For each destination: what the kernel did (the real
//!    `connect()`) and why (`passthrough explain`, the same decision core the agent compiles its
//!    maps from).
//! 2. **Proxy (Domain matches)**: from a workload in the host network namespace (its
//!    connections to a Domain match's port are redirected to the agent's proxy on loopback) to
//!    named hosts with real TLS and HTTP servers and a DNS server of their own. For each
//!    request: what the client got and the reason the agent gave (its own log: the deny event,
//!    or the proxy's access-log line for an allowed one).
//!
//! Everything is removed at the end, also on error.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use passthrough_tests::{
    Agent, Probe, TestCgroup, TestNet,
    agent::agent_binary,
    check::errno_name,
    domains::{DEMO_SLOT, DomainHosts},
    l7::Service,
    require_kernel,
};
use serde_json::{Value, json};

/// Kernel rows: (destination, what it shows).
const DESTINATIONS: &[&str] = &[
    "198.51.100.20:8080",
    "198.51.100.20:5432",
    "203.0.113.7:5432",
    "203.0.113.8:5432",
    "[2001:db8:100::5]:443",
    "[2001:db8:200::5]:8080",
    "[::ffff:198.51.100.20]:8080",
    "[::ffff:198.51.100.20]:5432",
    "127.0.0.1:7777",
];

/// Named hosts: name → host numbers of the demo's slot. `api` and `web` are host 1; host 2 is
/// "another host" (`other.demo.test`).
const NAMES: &[(&str, &[u8])] = &[
    ("api.demo.test", &[1]),
    ("web.demo.test", &[1]),
    ("evil.demo.test", &[1]),
    ("other.demo.test", &[2]),
];

/// What a Domain row sends.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Tls,
    Http,
}

/// Proxy rows: (label, kind, name, host, port, allowed?).
const REQUESTS: &[(&str, Kind, &str, u8, u16, bool)] = &[
    (
        "TLS  api.demo.test",
        Kind::Tls,
        "api.demo.test",
        1,
        443,
        true,
    ),
    (
        "TLS  evil.demo.test",
        Kind::Tls,
        "evil.demo.test",
        1,
        443,
        false,
    ),
    (
        "TLS  api.demo.test, spoofed",
        Kind::Tls,
        "api.demo.test",
        2,
        443,
        false,
    ),
    (
        "HTTP web.demo.test",
        Kind::Http,
        "web.demo.test",
        1,
        80,
        true,
    ),
    (
        "HTTP other.demo.test",
        Kind::Http,
        "other.demo.test",
        1,
        80,
        false,
    ),
];

fn main() -> anyhow::Result<()> {
    if !require_kernel() {
        bail!("the demo needs root, BPF, cgroup v2 and iproute2");
    }
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-policy.yaml");
    let policy = policy
        .canonicalize()
        .with_context(|| format!("{}", policy.display()))?;
    println!(
        "policy: {}\n{}",
        policy.display(),
        std::fs::read_to_string(&policy)?
    );

    let cg = TestCgroup::new()?;
    let net = TestNet::with_ports(&[443, 5432, 8080])?;
    let named = DomainHosts::start(
        DEMO_SLOT,
        NAMES,
        &[(443, Service::TlsEcho), (80, Service::Http)],
    )?;
    println!("workload cgroup: {}", cg.path().display());
    println!(
        "test hosts: client netns {}, server netns {}; named hosts {} (api, web), {} (other), DNS {}\n",
        net.client_ns(),
        net.server_ns(),
        named.host4(1, 0).ip(),
        named.host4(2, 0).ip(),
        named.resolver(),
    );
    let mut agent = Agent::builder()
        .policy(&policy)
        .cgroup(cg.path())
        .arg("--resolver")
        .arg(&named.resolver())
        .arg("--log-format")
        .arg("json")
        // Part 2 shows the proxy's decisions: without this, the TLS fast path (on by default)
        // would take the pre-warmed TLS name direct, judged in the kernel, which logs denials
        // only (tests/tests/tls_fast_path.rs drives that path).
        .arg("--tls-fast-path")
        .arg("off")
        // The proxy's access log (allowed decisions, with the match) is at debug.
        .log_filter("info,passthrough::proxy=debug")
        .start()?;
    let mut mismatches = 0;

    println!("Kernel: IP/CIDR matches, decided at connect() (workload in its own netns)\n");
    let mut probe = Probe::spawn(&cg, &net)?;
    println!(
        "{:<30} {:<15} {:<8} reason",
        "destination", "kernel", "explain"
    );
    for dst in DESTINATIONS {
        let outcome = match probe.connect(dst) {
            Ok(conn) => {
                probe.close(conn);
                "allowed".to_string()
            }
            Err(errno) => format!("denied ({})", errno_name(errno)),
        };
        let out = Command::new(agent_binary()?)
            .args(["explain", "--json", "--policy"])
            .arg(&policy)
            .args(["--dst", dst])
            .output()?;
        let json: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("explain output: {}", String::from_utf8_lossy(&out.stderr)))?;
        let verdict = json["verdict"].as_str().unwrap_or("?");
        let reason = json["reason"].as_str().unwrap_or("?");
        let matched = json["match"]["value"]
            .as_str()
            .map(|v| format!(" [{v}]"))
            .unwrap_or_default();
        if (verdict == "allow") != outcome.starts_with("allowed") {
            mismatches += 1;
        }
        println!("{dst:<30} {outcome:<15} {verdict:<8} {reason}{matched}");
    }
    drop(probe);

    println!(
        "\nProxy: Domain matches, decided on the TLS SNI / HTTP Host (workload in the host netns;\n\
         the kernel redirects its connections to the agent's proxy, which checks the name and\n\
         that the dialled address is one of the name's)\n"
    );
    let mut probe = Probe::spawn_in(cg.path(), None)?;
    println!(
        "{:<30} {:<22} {:<24} reason (from the agent)",
        "request", "dialled", "client got"
    );
    for (label, kind, name, host, port, allowed) in REQUESTS {
        let addr = named.host4(*host, *port);
        let answer = match kind {
            Kind::Tls => probe.json(&json!({
                "op": "tls", "addr": addr.to_string(), "sni": name,
                "ca": named.ca.display().to_string(),
            })),
            Kind::Http => probe.json(&json!({
                "op": "http1", "addr": addr.to_string(), "requests": [{"host": name}],
            })),
        };
        let (got, ok) = client_result(*kind, &answer);
        let reason = agent_reason(&agent, addr, *kind, name);
        if ok != *allowed || reason.is_none() {
            mismatches += 1;
        }
        let reason = reason.unwrap_or_else(|| "(no decision in the agent's log)".into());
        println!("{label:<30} {addr:<22} {got:<24} {reason}");
    }
    drop(probe);

    agent.stop()?;
    println!("\nagent stopped; programs detached. Cleaning up test hosts and cgroup.");
    drop(named);
    drop(net);
    drop(cg);
    if mismatches > 0 {
        bail!(
            "{mismatches} row(s) where the outcome is not what the policy says, or has no reason"
        );
    }
    Ok(())
}

/// What the client saw, and whether it got through.
fn client_result(kind: Kind, answer: &Value) -> (String, bool) {
    match kind {
        Kind::Tls if answer["ok"] == true => ("allowed (handshake ok)".into(), true),
        Kind::Tls => {
            let err = answer["error"].as_str().unwrap_or("");
            if err.contains("AccessDenied") {
                ("refused (access_denied)".into(), false)
            } else {
                (format!("failed ({})", answer["stage"]), false)
            }
        }
        Kind::Http => match answer["responses"][0]["status"].as_u64() {
            Some(200) => ("allowed (200)".into(), true),
            Some(s) => (format!("refused ({s})"), false),
            None => (format!("failed ({})", answer["stage"]), false),
        },
    }
}

/// The reason the agent logged for the request to `addr` with `name`: its deny event, or the
/// proxy's access-log line (`decision`) for an allowed one, as `reason: detail [match]`.
fn agent_reason(agent: &Agent, addr: SocketAddr, kind: Kind, name: &str) -> Option<String> {
    let field = if kind == Kind::Tls { "sni" } else { "host" };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = agent
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["fields"].clone())
            .find(|f| {
                f["dst"] == addr.to_string()
                    && f[field] == name
                    && f["reason"].is_string()
                    && (f["message"] == "decision" || f["message"] == "denied")
            });
        if let Some(f) = found {
            let mut s = f["reason"].as_str().unwrap_or("?").to_string();
            if let Some(d) = f["detail"].as_str().filter(|d| !d.is_empty()) {
                s += ": ";
                s += d;
            }
            if let Some(m) = f["matched"].as_str().filter(|m| !m.is_empty()) {
                s += &format!(" [{m}]");
            }
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
