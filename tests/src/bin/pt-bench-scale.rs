//! `pt-bench-scale` (issue 7 point 5; `cargo xtask bench --compare scale`): how the kernel
//! path's cost grows with the number of rules, of workloads and of concurrent connections.
//!
//! Method. A private network namespace with 198.51.100.0/24 and 203.0.113.0/24 routed to `lo`
//! (AnyIP). A server child process (CPU0) listens on two ports: one accepts and closes (the
//! timed connects), one accepts and holds (the concurrent connections). This process (CPU1)
//! runs inside a test cgroup where the real loader (`Kernel`) attaches the programs, and times
//! blocking `connect()`s to the 512 destinations in shuffled order, closing each with RST.
//! Per measurement: p50/p99 of the syscall and the time inside `connect4` per connect
//! (`BPF_ENABLE_STATS`, run time / run count over the same batch). Every round starts with the
//! `none` baseline (no program attached), then:
//!
//! - `rules`: one workload in `Matched` mode with N CIDR matches, N = 1 … 1,000,000 (random
//!   /8–/32 prefixes, a third of them near the destinations, plus the /25s that cover the
//!   destinations); the load time of each plan (compile + map writes + flip) too;
//! - `workloads`: W = 1 … 1,000 workload cgroups under the one attachment, each with its own
//!   rule set (100 CIDRs, one of them its own), this process in the last one;
//! - `connections`: N = 1 … 10,000 connections held open through the filter (1,000 rules) while
//!   the timed connects run.
//!
//! Output: JSON lines (`--out`, default `target/bench/compare-scale.jsonl`). `--quick`: fewer
//! sizes and connects, one round. `--rounds N`.

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use passthrough_policy::{
    MergedConf,
    plan::{self, PlanOptions},
};
use passthrough_tests::{
    TestCgroup,
    bench::{
        BenchNs, JsonOut, MoveBack, Rng, cidr_conf, percentile, pin_to_cpu, raise_nofile,
        timed_connect,
    },
    require_kernel,
};
use passthrough_user::kernel::{Kernel, LoadOptions};

/// Accept-and-close port (timed connects) and accept-and-hold port (held connections).
const PORT: u16 = 9000;
const HOLD_PORT: u16 = 9001;

struct Plan {
    rounds: usize,
    count: usize,
    rules: &'static [u64],
    workloads: &'static [u64],
    connections: &'static [u64],
}

const FULL: Plan = Plan {
    rounds: 3,
    count: 20_000,
    rules: &[1, 10, 100, 1_000, 10_000, 100_000, 1_000_000],
    workloads: &[1, 10, 100, 1_000],
    connections: &[1, 10, 100, 1_000, 10_000],
};

const QUICK: Plan = Plan {
    rounds: 1,
    count: 2_000,
    rules: &[1, 1_000, 100_000],
    workloads: &[1, 100],
    connections: &[1, 1_000],
};

/// The 512 destinations, shuffled so neighbours in time are apart in the trie.
fn destinations() -> Vec<SocketAddr> {
    let mut v = Vec::new();
    for base in [[198, 51, 100], [203, 0, 113]] {
        for last in 0..=255u8 {
            v.push(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(base[0], base[1], base[2], last)),
                PORT,
            ));
        }
    }
    Rng(7).shuffle(&mut v);
    v
}

/// `n` CIDR matches (at least the four /25s covering the destinations, both ports allowed).
fn conf(n: usize, seed: u64) -> MergedConf {
    cidr_conf(nets(n, seed))
}

/// The networks of [`conf`].
fn nets(n: usize, seed: u64) -> Vec<(ipnet::Ipv4Net, Option<u16>)> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
    let mut nets: Vec<(ipnet::Ipv4Net, Option<u16>)> = Vec::with_capacity(n.max(4));
    for base in [[198u8, 51, 100], [203, 0, 113]] {
        for k in 0..2u8 {
            let net = ipnet::Ipv4Net::new(Ipv4Addr::new(base[0], base[1], base[2], k * 128), 25)
                .expect("valid");
            nets.push((net, None));
        }
    }
    while nets.len() < n {
        nets.push((rng.rule_net().0, None));
    }
    nets
}

/// One timed batch: sorted connect() nanoseconds and connect4's ns per run over the batch.
fn batch(
    kernel: Option<&Kernel>,
    dsts: &[SocketAddr],
    count: usize,
) -> anyhow::Result<(Vec<u64>, Option<f64>)> {
    let before = kernel.and_then(|k| k.program_stats("passthrough_connect4"));
    let mut ns = Vec::with_capacity(count);
    for i in 0..count {
        ns.push(timed_connect(dsts[i % dsts.len()])?);
    }
    ns.sort_unstable();
    let per_run = match (kernel, before) {
        (Some(k), Some((t0, n0))) => k
            .program_stats("passthrough_connect4")
            .filter(|(_, n1)| *n1 > n0)
            .map(|(t1, n1)| (t1 - t0).as_nanos() as f64 / (n1 - n0) as f64),
        _ => None,
    };
    Ok((ns, per_run))
}

fn record(
    out: &mut JsonOut,
    table: &str,
    row: &str,
    size: Option<u64>,
    round: usize,
    b: &(Vec<u64>, Option<f64>),
) -> anyhow::Result<()> {
    out.record(
        table,
        row,
        size,
        round,
        "p50_ns",
        percentile(&b.0, 0.5) as f64,
    )?;
    out.record(
        table,
        row,
        size,
        round,
        "p99_ns",
        percentile(&b.0, 0.99) as f64,
    )?;
    if let Some(ns) = b.1 {
        out.record(table, row, size, round, "bpf_ns_per_connect", ns)?;
    }
    eprintln!(
        "round {round}: {table:<12} {row:<5} {:>8} p50 {:>6} ns p99 {:>7} ns bpf {:>6.0} ns",
        size.map(|s| s.to_string()).unwrap_or("-".into()),
        percentile(&b.0, 0.5),
        percentile(&b.0, 0.99),
        b.1.unwrap_or(f64::NAN)
    );
    Ok(())
}

/// The server child: accept-and-close on PORT, accept-and-hold on HOLD_PORT, until stdin closes.
fn serve() -> anyhow::Result<()> {
    pin_to_cpu(0)?;
    raise_nofile()?;
    let listen = |port: u16| -> anyhow::Result<std::net::TcpListener> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        s.listen(4096)?;
        Ok(s.into())
    };
    let close_l = listen(PORT)?;
    let hold_l = listen(HOLD_PORT)?;
    std::thread::spawn(move || {
        for s in close_l.incoming() {
            drop(s);
        }
    });
    std::thread::spawn(move || {
        let mut held: Vec<std::net::TcpStream> = Vec::new();
        for s in hold_l.incoming().flatten() {
            held.push(s);
            // Let go of connections the client has closed (rounds reopen them), so descriptors
            // do not pile up across rounds.
            if held.len().is_multiple_of(1024) {
                held.retain(|c| {
                    c.set_nonblocking(true).is_ok() && matches!(c.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
            }
        }
    });
    println!("ready");
    // The parent closes our stdin (or dies): then exit.
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    Ok(())
}

/// The server child process, killed on drop.
struct Server(Child);

impl Server {
    fn start() -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the server process")?;
        let mut ready = [0u8; 6];
        child
            .stdout
            .as_mut()
            .context("server stdout")?
            .read_exact(&mut ready)
            .context("server did not start")?;
        Ok(Server(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--serve") {
        return serve();
    }
    if !require_kernel() {
        bail!("pt-bench-scale needs root, BPF and cgroup v2");
    }
    let mut plan = if args.iter().any(|a| a == "--quick") {
        QUICK
    } else {
        FULL
    };
    if let Some(r) = arg_value(&args, "--rounds") {
        plan.rounds = r.parse().context("--rounds")?;
    }
    let out_path = arg_value(&args, "--out")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench/compare-scale.jsonl"));
    let mut out = JsonOut::create("scale", &out_path)?;
    let nofile = raise_nofile()?;

    let ns = BenchNs::new(&["198.51.100.0/24", "203.0.113.0/24"])?;
    ns.enter_current_thread()?;
    // Started from this thread: the child is in the namespace, not in the test cgroup.
    let _server = Server::start()?;
    pin_to_cpu(1)?;
    let cg = TestCgroup::new()?;
    let _back = MoveBack::into(&cg)?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let dsts = destinations();
    batch(None, &dsts, plan.count / 10)?; // warm up
    let confs: Vec<(u64, MergedConf)> = plan
        .rules
        .iter()
        .map(|&n| (n, conf(n as usize, n)))
        .collect();
    let conn_conf = conf(1_000, 1_000);

    for round in 0..plan.rounds {
        for table in ["rules", "workloads", "connections"] {
            let b = batch(None, &dsts, plan.count)?;
            record(&mut out, table, "none", None, round, &b)?;
        }

        // Rules: one kernel, each plan replacing the previous one.
        let mut k = Kernel::load(LoadOptions::default())?;
        k.attach(cg.path())?;
        for (n, c) in &confs {
            let t = Instant::now();
            let p = plan::compile(
                k.next_generation(),
                &[(cg.id(), c)],
                &PlanOptions::default(),
            );
            k.apply(p)?;
            out.record(
                "rules",
                "ours",
                Some(*n),
                round,
                "load_ms",
                t.elapsed().as_secs_f64() * 1e3,
            )?;
            let b = batch(Some(&k), &dsts, plan.count)?;
            record(&mut out, "rules", "ours", Some(*n), round, &b)?;
        }

        // Workloads: W child cgroups, each its own rule set; this process in the last one.
        for &w in plan.workloads {
            let children: Vec<TestCgroup> = (0..w)
                .map(|i| cg.child(&format!("w{i}")))
                .collect::<Result<_, _>>()?;
            let per: Vec<MergedConf> = (0..w)
                .map(|i| {
                    let mut v = nets(100, 7);
                    // One CIDR of its own, so no two workloads share a rule set.
                    v.push((
                        ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i as u32 * 256), 24)
                            .expect("/24"),
                        None,
                    ));
                    cidr_conf(v)
                })
                .collect();
            let ws: Vec<(u64, &MergedConf)> = children
                .iter()
                .zip(&per)
                .map(|(c, m)| (c.id(), m))
                .collect();
            let p = plan::compile(k.next_generation(), &ws, &PlanOptions::default());
            k.apply(p)?;
            let inner = MoveBack::into_path(children.last().context("w >= 1")?.path())?;
            let b = batch(Some(&k), &dsts, plan.count)?;
            drop(inner);
            // Back in the parent test cgroup before the children are removed.
            std::fs::write(
                cg.path().join("cgroup.procs"),
                std::process::id().to_string(),
            )?;
            record(&mut out, "workloads", "ours", Some(w), round, &b)?;
            drop(children);
        }

        // Connections held open through the filter while the timed connects run.
        let p = plan::compile(
            k.next_generation(),
            &[(cg.id(), &conn_conf)],
            &PlanOptions::default(),
        );
        k.apply(p)?;
        let mut held: Vec<TcpStream> = Vec::new();
        for &n in plan.connections {
            if n + 64 > nofile {
                eprintln!(
                    "connections: {n} needs more descriptors than RLIMIT_NOFILE {nofile}; skipped"
                );
                continue;
            }
            while (held.len() as u64) < n {
                let dst = SocketAddr::new(dsts[held.len() % dsts.len()].ip(), HOLD_PORT);
                held.push(
                    TcpStream::connect_timeout(&dst, Duration::from_secs(2))
                        .with_context(|| format!("holding {dst}"))?,
                );
            }
            let b = batch(Some(&k), &dsts, plan.count)?;
            record(&mut out, "connections", "ours", Some(n), round, &b)?;
        }
        drop(held);
        k.shutdown(false)?;
    }
    drop(_back);
    drop(cg);
    drop(ns);
    eprintln!("wrote {}", out_path.display());
    Ok(())
}
