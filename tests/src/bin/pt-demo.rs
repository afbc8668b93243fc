//! `pt-demo` (`cargo xtask demo`): passthrough end to end on test hosts it creates itself.
//!
//! Creates a workload cgroup, a client and a server network namespace (documentation ranges),
//! starts the real agent with `examples/demo-policy.yaml`, then has a workload process connect
//! to a list of destinations. For each it prints what the kernel did (the real connect) and why
//! (`passthrough explain`, the same decision core the agent compiles its maps from). Everything
//! is removed at the end, also on error.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};
use passthrough_tests::{
    Agent, Probe, TestCgroup, TestNet, agent::agent_binary, check::errno_name, require_kernel,
};

const DESTINATIONS: &[&str] = &[
    "198.51.100.20:8080",
    "198.51.100.20:80",
    "203.0.113.7:443",
    "203.0.113.8:443",
    "[2001:db8:100::5]:443",
    "[2001:db8:200::5]:443",
    "[::ffff:198.51.100.20]:8080",
    "[::ffff:198.51.100.20]:5432",
    "127.0.0.1:7777",
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
    let net = TestNet::with_ports(&[80, 443, 5432, 8080])?;
    println!("workload cgroup: {}", cg.path().display());
    println!(
        "test hosts: client netns {}, server netns {}\n",
        net.client_ns(),
        net.server_ns()
    );
    let mut agent = Agent::builder().policy(&policy).cgroup(cg.path()).start()?;
    let mut probe = Probe::spawn(&cg, &net)?;

    println!(
        "{:<30} {:<15} {:<8} reason",
        "destination", "kernel", "explain"
    );
    let mut mismatches = 0;
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
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
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
    agent.stop()?;
    println!("\nagent stopped; programs detached. Cleaning up test hosts and cgroup.");
    drop(probe);
    drop(net);
    drop(cg);
    if mismatches > 0 {
        bail!("{mismatches} destination(s) where the kernel and explain disagree");
    }
    Ok(())
}
