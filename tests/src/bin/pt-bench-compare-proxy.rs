//! `pt-bench-compare-proxy` (issue 7 point 3): the proxy path side by side with nginx stream
//! `ssl_preread`, HAProxy `mode tcp` (copy and forced splice) and Envoy `tls_inspector`, all
//! against a direct connection, in the same run.
//!
//! # Method
//!
//! **Origin.** One nginx (`worker_processes 1`, sendfile, access log off) in a server network
//! namespace behind a veth (`passthrough_tests::hostnet`, slot `BENCH_SLOT`), listening on
//! `0.0.0.0` so it answers on every AnyIP test host of the slot: `:443` TLS (an rcgen CA and a
//! certificate for `bench.test`), `:80` plain HTTP/1.1, `:8080` h2c (prior knowledge). It serves
//! `1k.bin` (1 KiB) and `16m.bin` (16 MiB). Every path reaches this same origin.
//!
//! **Paths (rows).** `direct`: the origin's test host C, allowed in the kernel by an `IP` match.
//! `ours`: the real agent (`passthrough run --tls-fast-path off`, the binary beside this one) with `Domain` matches
//! for `bench.test` (tls :443, http :80, http2 :8080); the client dials test host A, the kernel
//! redirects to the proxy, which peeks SNI / Host / `:authority`, verifies the destination against
//! a loopback DNS server (`bench.test` → A, answers cached) and splices (TLS) or proxies per request
//! (HTTP). The agent runs with `TOKIO_WORKER_THREADS=1` (one tokio worker; its default is one per
//! CPU). `ours-fast` (TLS tables): the same agent restarted with `--tls-fast-path on`; the agent
//! is swapped, from outside the workload cgroup, whenever the next row needs another one.
//! `ours-candidate` (only with `--candidate-bin PATH` and/or `--candidate-arg ARG`): another
//! build of the agent, or other flags (`--tls-fast-path off` as `ours` unless they set it), on
//! every table `ours` runs, swapped in the same way: the same-run before/after of a change (compare it with `ours`
//! round by round; this machine is too noisy for two separate runs). `nginx`, `haproxy`, `haproxy-splice`, `envoy`: peers on fixed `127.0.0.1` ports
//! (loopback is never redirected, docs/decisions.md rule 1) routing `bench.test` to C and refusing every
//! other name: nginx stream `ssl_preread` + `map` (others → a closed port, the client sees a
//! reset); HAProxy `nbthread 1`, `mode tcp`, `req.ssl_sni` / `req.hdr(host)` with
//! `tcp-request inspect-delay`, others → a backend that rejects; `haproxy-splice` the same with
//! `option splice-request` + `option splice-response` forced on both backends; Envoy
//! `--concurrency 1`, `tls_inspector` + a filter chain matching `server_names: [bench.test]` into
//! `tcp_proxy` (no chain for other names: closed). nginx stream cannot route on Host (its plain
//! port is L4 only) and Envoy has no Host-peeking L4 mode, so they take part in the TLS tables
//! only; no peer peeks h2c in `mode tcp` (HAProxy's `req.hdr` parses HTTP/1 only; HAProxy
//! `mode http` with `proto h2` would terminate HTTP/2, a full L7 proxy), so `h2c` has `direct` and
//! `ours` only.
//!
//! **Same names on every path.** Every load generator is started in a private mount namespace in
//! which a per-path hosts file is bind-mounted on `/etc/hosts` (`bench.test` → C for direct, A for
//! ours, 127.0.0.1 for the peers), so SNI, Host and `:authority` are `bench.test` everywhere (with
//! the path's port in Host). The in-process latency client and the deny checks dial the address
//! and set SNI / Host themselves.
//!
//! **Pinning.** Origin, agent (all threads), nginx, HAProxy and Envoy on CPU0; this process (and
//! so every load generator it starts) on CPU1, inside the workload cgroup (for the peers and
//! direct that changes nothing: loopback is exempt and C is IP-allowed).
//!
//! **Tools and scenarios (tables).** `wrk -t1` (requests/s and MB/s from a `done()` script: exact
//! counts): `tls-keepalive` (c16, 1 KiB), `tls-newconn` (c16, `Connection: close`: a new TCP + TLS
//! handshake per request), `tls-bulk` (one connection, 16 MiB bodies, MB/s), `http-keepalive`
//! (c16), `http-close` (c16, `Connection: close`); `h2load` for `h2c` (c16, m10, prior knowledge).
//! `latency-tls` / `latency-http`: an open-loop client in this process sends `GET /1k.bin` at a
//! fixed rate over keep-alive connections; each request's latency counts from its scheduled send
//! time (no coordinated omission), p50/p99 over the run.
//!
//! **CPU.** utime+stime of the proxy's processes (the process and its children: nginx master and
//! worker) from `/proc/PID/stat` before and after each measurement, ÷ requests and ÷ MB (10^6
//! bytes). `direct` has no proxy and gets no CPU metrics. For `ours` this is the whole agent.
//! **Node CPU**: the busy time of all CPUs (`/proc/stat`, all but idle and iowait) over the same
//! interval, ÷ requests and ÷ MB, for every row including `direct`: it also counts work no
//! process is charged for (kernel workers, softirqs), which is where the fast path's programs run.
//!
//! **Rounds.** `--rounds N` (default 3) interleaved rounds; in every round every table runs every
//! path back to back, the order rotating by round, `direct` included every time. Before each
//! measurement the run waits for an idle node (≤ 10 s) and runs the same table on the same path
//! untimed for 2 s, so no row inherits the previous row's deferred work or starts cold. Deny checks run
//! in the same run before the rounds (a denied SNI and a denied Host must fail on every path that
//! routes on them) and the run fails if one passes.
//!
//! **Output.** JSON lines in `--out` (default `target/bench/compare-proxy.jsonl`, truncated at
//! start): `{"part":"proxy","table":…,"row":…,"size":null,"round":…,"metric":…,"value":…}` with
//! metrics `req_per_s`, `mb_per_s`, `p50_us`, `p99_us`, `cpu_us_per_req`, `cpu_us_per_mb`,
//! `node_cpu_us_per_req`, `node_cpu_us_per_mb`; a
//! summary (medians, median of per-round ratios to direct) on stderr. `--tables a,b`: only those
//! tables (e.g. to profile one scenario); `--rows a,b`: only those paths (row ids as in the
//! output, e.g. `direct,ours-fast,ours-candidate`); `--perf DIR`: a system-wide `perf record`
//! (`cpu-clock`, call graphs) of each measurement into `DIR/<table>-<row>-r<round>.data`, to
//! see where a path's node CPU goes (perf's own CPU counts in that run's node CPU). `--agent-arg ARG` (repeatable): one more argument for
//! every agent started. `--quick`: a smoke run
//! (one round, 1 s measurements, no settling or warm-up, < 90 s). Needs root, BPF, cgroup v2, iproute2 and the peers of
//! `scripts/setup-peers.sh`; every peer runs from a config in a temp dir and is killed on exit.

use std::{
    collections::HashMap,
    ffi::CString,
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use passthrough_tests::{
    Agent, TestCgroup,
    bench::{MoveBack, median, open_loop_slot, raise_nofile},
    hostnet::{BENCH_SLOT, HostNet},
    l7::{Dns, Pki, provider},
    require_kernel, test_dir, write_policy,
};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

/// The allowed name on every path.
const NAME: &str = "bench.test";
/// A name no path may let through.
const DENIED: &str = "evil.test";
/// Origin ports in the server netns.
const ORIGIN_TLS: u16 = 443;
const ORIGIN_HTTP: u16 = 80;
const ORIGIN_H2C: u16 = 8080;
/// Body size of the bulk scenario's file (`16m.bin`).
const BULK_BYTES: usize = 16 << 20;

/// Durations and rates of one run.
#[derive(Clone)]
struct Plan {
    rounds: usize,
    /// One wrk / h2load measurement.
    dur_s: u32,
    /// The untimed run of the same table and path right before each measurement (0: none).
    warm_s: u32,
    /// One fixed-rate latency measurement.
    lat_dur: Duration,
    /// Fixed request rate of the latency tables (requests/s, all connections together).
    lat_rate: u32,
    /// Keep-alive connections of the latency client.
    lat_conns: usize,
}

/// The paths (rows), in the order of round 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    Direct,
    Ours,
    /// Only with `--candidate-bin` / `--candidate-arg`: another agent build or flags on every
    /// table `ours` runs, for a same-run before/after of a change.
    OursCandidate,
    /// The agent with `--tls-fast-path on` (TLS tables): a warm destination goes directly, its
    /// ClientHello judged in the kernel.
    OursFast,
    Nginx,
    Haproxy,
    HaproxySplice,
    Envoy,
}

const ROWS: [Row; 8] = [
    Row::Direct,
    Row::Ours,
    Row::OursCandidate,
    Row::OursFast,
    Row::Nginx,
    Row::Haproxy,
    Row::HaproxySplice,
    Row::Envoy,
];

impl Row {
    /// Whether the row is served by an agent of ours (swapped in per row).
    fn is_agent(self) -> bool {
        matches!(self, Row::Ours | Row::OursCandidate | Row::OursFast)
    }

    fn id(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::Ours => "ours",
            Row::OursCandidate => "ours-candidate",
            Row::OursFast => "ours-fast",
            Row::Nginx => "nginx",
            Row::Haproxy => "haproxy",
            Row::HaproxySplice => "haproxy-splice",
            Row::Envoy => "envoy",
        }
    }
}

/// The scenarios (tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    TlsKeepalive,
    TlsNewconn,
    TlsBulk,
    HttpKeepalive,
    HttpClose,
    H2c,
    LatencyTls,
    LatencyHttp,
}

const TABLES: [Table; 8] = [
    Table::TlsKeepalive,
    Table::TlsNewconn,
    Table::TlsBulk,
    Table::HttpKeepalive,
    Table::HttpClose,
    Table::H2c,
    Table::LatencyTls,
    Table::LatencyHttp,
];

/// Which listener of a path a table uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tls,
    Http,
    H2c,
}

impl Table {
    fn id(self) -> &'static str {
        match self {
            Table::TlsKeepalive => "tls-keepalive",
            Table::TlsNewconn => "tls-newconn",
            Table::TlsBulk => "tls-bulk",
            Table::HttpKeepalive => "http-keepalive",
            Table::HttpClose => "http-close",
            Table::H2c => "h2c",
            Table::LatencyTls => "latency-tls",
            Table::LatencyHttp => "latency-http",
        }
    }

    fn proto(self) -> Proto {
        match self {
            Table::TlsKeepalive | Table::TlsNewconn | Table::TlsBulk | Table::LatencyTls => {
                Proto::Tls
            }
            Table::HttpKeepalive | Table::HttpClose | Table::LatencyHttp => Proto::Http,
            Table::H2c => Proto::H2c,
        }
    }
}

/// Where a path listens, per protocol, and whose CPU it costs.
struct Endpoints {
    tls: SocketAddr,
    http: Option<SocketAddr>,
    h2c: Option<SocketAddr>,
    /// The proxy process (`None` for direct).
    cpu_pid: Option<u32>,
    /// The hosts file that makes `bench.test` this path's address.
    hosts: PathBuf,
}

impl Endpoints {
    fn addr(&self, p: Proto) -> Option<SocketAddr> {
        match p {
            Proto::Tls => Some(self.tls),
            Proto::Http => self.http,
            Proto::H2c => self.h2c,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut quick = false;
    let mut rounds = None;
    let mut out = PathBuf::from("target/bench/compare-proxy.jsonl");
    let mut only: Option<Vec<String>> = None;
    let mut agent_args: Vec<String> = Vec::new();
    let mut candidate_args: Vec<String> = Vec::new();
    let mut candidate_bin: Option<PathBuf> = None;
    let mut only_rows: Option<Vec<String>> = None;
    let mut perf_dir: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--rounds" => {
                rounds = Some(
                    it.next()
                        .context("--rounds needs a number")?
                        .parse::<usize>()
                        .context("--rounds")?,
                )
            }
            "--out" => out = PathBuf::from(it.next().context("--out needs a path")?),
            "--agent-arg" => {
                agent_args.push(it.next().context("--agent-arg needs a value")?.clone())
            }
            "--candidate-arg" => {
                candidate_args.push(it.next().context("--candidate-arg needs a value")?.clone())
            }
            "--candidate-bin" => {
                candidate_bin = Some(PathBuf::from(
                    it.next().context("--candidate-bin needs a path")?,
                ))
            }
            "--rows" => {
                let list = it.next().context("--rows needs a list")?;
                let wanted: Vec<String> = list.split(',').map(str::to_string).collect();
                if let Some(bad) = wanted
                    .iter()
                    .find(|w| !ROWS.iter().any(|r| r.id() == w.as_str()))
                {
                    bail!("unknown row {bad:?}");
                }
                only_rows = Some(wanted);
            }
            "--perf" => perf_dir = Some(PathBuf::from(it.next().context("--perf needs a dir")?)),
            "--tables" => {
                let list = it.next().context("--tables needs a list")?;
                let wanted: Vec<String> = list.split(',').map(str::to_string).collect();
                if let Some(bad) = wanted
                    .iter()
                    .find(|w| !TABLES.iter().any(|t| t.id() == w.as_str()))
                {
                    bail!("unknown table {bad:?}");
                }
                only = Some(wanted);
            }
            other => {
                bail!(
                    "unknown argument {other:?} (--quick, --rounds N, --out PATH, --tables a,b, --rows a,b, --perf DIR, --agent-arg ARG, --candidate-arg ARG, --candidate-bin PATH)"
                )
            }
        }
    }
    let plan = if quick {
        Plan {
            rounds: rounds.unwrap_or(1),
            dur_s: 1,
            warm_s: 0,
            lat_dur: Duration::from_millis(800),
            lat_rate: 500,
            lat_conns: 4,
        }
    } else {
        Plan {
            rounds: rounds.unwrap_or(3),
            dur_s: 5,
            warm_s: 2,
            lat_dur: Duration::from_secs(4),
            lat_rate: 1000,
            lat_conns: 8,
        }
    };
    if plan.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if !require_kernel() {
        bail!("pt-bench-compare-proxy needs root, BPF, cgroup v2 and iproute2");
    }
    for tool in ["wrk", "h2load", "nginx", "haproxy"] {
        which(tool)?;
    }
    let envoy = envoy_binary()?;
    raise_nofile()?;
    let t_start = Instant::now();

    let slot = BENCH_SLOT;
    let (host_a, host_c) = (slot.host4(1), slot.host4(3));
    let dir = test_dir();
    // The origin's certificate covers the denied name too, so a refused name is refused by the
    // path, not by certificate checks.
    let pki = Pki::new(&[NAME, DENIED])?;
    let net = HostNet::new(slot)?;
    let origin = start_origin(dir.path(), net.server_ns(), &pki)?;
    wait_listening(&origin, SocketAddr::new(host_c, ORIGIN_HTTP))?;

    // The agent: host A through Domain matches, host C allowed by IP (direct).
    let dns = Dns::start(HashMap::from([(NAME.to_string(), vec![host_a])]), 3600)?;
    let yaml = format!(
        "type: MeshPassthrough\nname: bench\nmesh: default\nspec:\n  default:\n    passthroughMode: Matched\n    appendMatch:\n      - {{type: Domain, value: {NAME}, port: {ORIGIN_TLS}, protocol: tls}}\n      - {{type: Domain, value: {NAME}, port: {ORIGIN_HTTP}, protocol: http}}\n      - {{type: Domain, value: {NAME}, port: {ORIGIN_H2C}, protocol: http2}}\n      - {{type: IP, value: {host_c}}}\n"
    );
    let policy = write_policy(dir.path(), &yaml);
    let cg = TestCgroup::new()?;
    // SAFETY: no other thread of this process reads the environment while this runs (the DNS
    // server's runtime only answers queries); the agent inherits the variable.
    unsafe { std::env::set_var("TOKIO_WORKER_THREADS", "1") };
    let dns_addr = dns.addr.to_string();
    let with_candidate = candidate_bin.is_some() || !candidate_args.is_empty();
    // A candidate with the fast path on is readied (pre-warmed, checked) like `ours-fast`.
    let candidate_fast = candidate_args
        .windows(2)
        .any(|w| w[0] == "--tls-fast-path" && w[1] == "on")
        || candidate_args.iter().any(|a| a == "--tls-fast-path=on");
    let fast_row = |r: Row| r == Row::OursFast || (r == Row::OursCandidate && candidate_fast);
    let start_agent = |variant: Row| -> anyhow::Result<Agent> {
        let mut builder = Agent::builder()
            .policy(&policy)
            .cgroup(cg.path())
            .arg("--resolver")
            .arg(&dns_addr);
        for a in &agent_args {
            builder = builder.arg(a);
        }
        // Every agent row says which path it measures, whatever the agent's default: `ours`
        // the proxy path, `ours-fast` the fast path, `ours-candidate` what its flags say, else
        // the proxy path as `ours`.
        match variant {
            Row::Ours => builder = builder.arg("--tls-fast-path").arg("off"),
            Row::OursFast => builder = builder.arg("--tls-fast-path").arg("on"),
            Row::OursCandidate => {
                for a in &candidate_args {
                    builder = builder.arg(a);
                }
                if !candidate_args
                    .iter()
                    .any(|a| a == "--tls-fast-path" || a.starts_with("--tls-fast-path="))
                {
                    builder = builder.arg("--tls-fast-path").arg("off");
                }
                if let Some(b) = &candidate_bin {
                    builder = builder.binary(b);
                }
            }
            _ => {}
        }
        let agent = builder.start()?;
        pin_process(agent.pid(), 0)?;
        Ok(agent)
    };
    // The running agent and the row it serves; swapped (outside the workload cgroup) when a row
    // needs another one.
    let first_agent = if only_rows
        .as_ref()
        .is_none_or(|o| o.iter().any(|w| w == Row::Ours.id()))
    {
        Row::Ours
    } else {
        ROWS.into_iter()
            .find(|r| {
                r.is_agent()
                    && (*r != Row::OursCandidate || with_candidate)
                    && only_rows
                        .as_ref()
                        .is_some_and(|o| o.iter().any(|w| w == r.id()))
            })
            .unwrap_or(Row::Ours)
    };
    let mut agent = Some((start_agent(first_agent)?, first_agent));

    let peers = Peers::start(dir.path(), &envoy, host_c)?;
    let hosts = |name: &str, ip: IpAddr| -> anyhow::Result<PathBuf> {
        let p = dir.path().join(format!("hosts-{name}"));
        std::fs::write(
            &p,
            format!("127.0.0.1 localhost\n{ip} {NAME}\n{ip} {DENIED}\n"),
        )?;
        Ok(p)
    };
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let at = |ip: IpAddr, p: u16| SocketAddr::new(ip, p);
    let mut paths: Vec<(Row, Endpoints)> = Vec::new();
    for row in ROWS {
        if row == Row::OursCandidate && !with_candidate {
            continue;
        }
        if only_rows
            .as_ref()
            .is_some_and(|o| !o.iter().any(|w| w == row.id()))
        {
            continue;
        }
        let e = match row {
            Row::Direct => Endpoints {
                tls: at(host_c, ORIGIN_TLS),
                http: Some(at(host_c, ORIGIN_HTTP)),
                h2c: Some(at(host_c, ORIGIN_H2C)),
                cpu_pid: None,
                hosts: hosts("direct", host_c)?,
            },
            // The agent's pid is looked up per measurement (it changes when swapped).
            Row::Ours | Row::OursCandidate => Endpoints {
                tls: at(host_a, ORIGIN_TLS),
                http: Some(at(host_a, ORIGIN_HTTP)),
                h2c: Some(at(host_a, ORIGIN_H2C)),
                cpu_pid: None,
                hosts: hosts("ours", host_a)?,
            },
            Row::OursFast => Endpoints {
                tls: at(host_a, ORIGIN_TLS),
                http: None,
                h2c: None,
                cpu_pid: None,
                hosts: hosts("ours", host_a)?,
            },
            Row::Nginx => Endpoints {
                tls: at(lo, NGINX_TLS),
                http: None,
                h2c: None,
                cpu_pid: Some(peers.nginx.pid()),
                hosts: hosts("peer", lo)?,
            },
            Row::Haproxy | Row::HaproxySplice => {
                let (p, tls, http) = if row == Row::Haproxy {
                    (&peers.haproxy, HAPROXY_TLS, HAPROXY_HTTP)
                } else {
                    (
                        &peers.haproxy_splice,
                        HAPROXY_SPLICE_TLS,
                        HAPROXY_SPLICE_HTTP,
                    )
                };
                Endpoints {
                    tls: at(lo, tls),
                    http: Some(at(lo, http)),
                    h2c: None,
                    cpu_pid: Some(p.pid()),
                    hosts: hosts("peer", lo)?,
                }
            }
            Row::Envoy => Endpoints {
                tls: at(lo, ENVOY_TLS),
                http: None,
                h2c: None,
                cpu_pid: Some(peers.envoy.pid()),
                hosts: hosts("peer", lo)?,
            },
        };
        paths.push((row, e));
    }
    // From here on this process and everything it starts is a pinned client in the workload.
    pin_process(std::process::id(), 1)?;
    let mut inside = Some(MoveBack::into(&cg)?);
    let wrk_script = dir.path().join("report.lua");
    std::fs::write(&wrk_script, WRK_SCRIPT)?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut sink = Sink::create(&out)?;
    let tls_cfg = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(pki.roots())
            .with_no_client_auth(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    rt.block_on(checks(&tls_cfg, &paths))?;
    eprintln!(
        "[compare-proxy] checks passed after {:.0} s; {} round(s) of {} s measurements",
        t_start.elapsed().as_secs_f64(),
        plan.rounds,
        plan.dur_s
    );

    let bench = Bench {
        plan: &plan,
        wrk_script: &wrk_script,
        tls_cfg: &tls_cfg,
    };
    let wanted = |t: &Table| only.as_ref().is_none_or(|o| o.iter().any(|w| w == t.id()));
    for round in 0..plan.rounds {
        for table in TABLES.into_iter().filter(wanted) {
            let n = paths.len();
            for k in 0..n {
                let (row, e) = &paths[(k + round) % n];
                let Some(addr) = e.addr(table.proto()) else {
                    continue;
                };
                let mut cpu_pid = e.cpu_pid;
                if row.is_agent() {
                    if agent.as_ref().is_none_or(|a| a.1 != *row) {
                        // Stop the old agent first (one agent per cgroup), and start the new
                        // one from outside the workload cgroup, as at first.
                        drop(agent.take());
                        drop(inside.take());
                        agent = Some((start_agent(*row)?, *row));
                        inside = Some(MoveBack::into(&cg)?);
                        if fast_row(*row) {
                            let a = &agent.as_ref().expect("just started").0;
                            rt.block_on(fast_path_ready(&tls_cfg, e.tls, a))?;
                        }
                    }
                    cpu_pid = agent.as_ref().map(|a| a.0.pid());
                }
                // `--perf DIR`: a system-wide profile of this measurement alone.
                let perf = perf_dir
                    .as_ref()
                    .map(|d| perf_start(d, &format!("{}-{}-r{round}", table.id(), row.id())))
                    .transpose()?;
                bench
                    .prepare(&rt, table, addr, &e.hosts)
                    .with_context(|| format!("warm-up: {} via {}", table.id(), row.id()))?;
                let paths0 = fast_path_counts(agent.as_ref().filter(|a| a.1 == *row));
                let cpu0 = cpu_pid.map(cpu_ticks).transpose()?;
                let node0 = node_busy_ticks()?;
                let m = bench
                    .measure(&rt, table, addr, &e.hosts)
                    .with_context(|| format!("{} via {} (round {round})", table.id(), row.id()))?;
                let node_us = (node_busy_ticks()? - node0) as f64 * 1e6 / clock_ticks();
                if let Some(p) = perf {
                    perf_stop(p);
                }
                let paths1 = fast_path_counts(agent.as_ref().filter(|a| a.1 == *row));
                let cpu = match (cpu_pid, cpu0) {
                    (Some(pid), Some(c0)) => {
                        Some((cpu_ticks(pid)? - c0) as f64 * 1e6 / clock_ticks())
                    }
                    _ => None,
                };
                let emit = |s: &mut Sink, metric: &str, v: f64| {
                    s.emit(table.id(), row.id(), round, metric, v)
                };
                match table {
                    Table::TlsBulk => emit(&mut sink, "mb_per_s", m.mb_per_s)?,
                    Table::LatencyTls | Table::LatencyHttp => {
                        emit(&mut sink, "req_per_s", m.req_per_s)?;
                        emit(&mut sink, "p50_us", m.p50_us)?;
                        emit(&mut sink, "p99_us", m.p99_us)?;
                    }
                    _ => {
                        emit(&mut sink, "req_per_s", m.req_per_s)?;
                        emit(&mut sink, "mb_per_s", m.mb_per_s)?;
                    }
                }
                // Every CPU's busy time (client, origin, proxy and kernel work such as the
                // fast path's programs, which no process is charged for); the proxy's share is the
                // difference to the direct path's.
                if m.requests > 0 && table != Table::TlsBulk {
                    emit(
                        &mut sink,
                        "node_cpu_us_per_req",
                        node_us / m.requests as f64,
                    )?;
                }
                if m.bytes > 0 {
                    emit(
                        &mut sink,
                        "node_cpu_us_per_mb",
                        node_us / (m.bytes as f64 / 1e6),
                    )?;
                }
                if let Some(cpu_us) = cpu {
                    // A bulk "request" is a 16 MiB body: per MB is its figure.
                    if m.requests > 0 && table != Table::TlsBulk {
                        emit(&mut sink, "cpu_us_per_req", cpu_us / m.requests as f64)?;
                    }
                    if m.bytes > 0 {
                        emit(&mut sink, "cpu_us_per_mb", cpu_us / (m.bytes as f64 / 1e6))?;
                    }
                }
                // The TLS fast path: the share of this measurement's connections that went
                // directly (the rest took the proxy).
                if fast_row(*row)
                    && let (Some((d0, p0)), Some((d1, p1))) = (paths0, paths1)
                    && d1 + p1 > d0 + p0
                {
                    emit(
                        &mut sink,
                        "direct_share",
                        (d1 - d0) / ((d1 - d0) + (p1 - p0)),
                    )?;
                }
                if m.errors > 0 {
                    eprintln!(
                        "[compare-proxy] warning: {} via {}: {} errors",
                        table.id(),
                        row.id(),
                        m.errors
                    );
                }
            }
        }
        eprintln!(
            "[compare-proxy] round {}/{} done at {:.0} s",
            round + 1,
            plan.rounds,
            t_start.elapsed().as_secs_f64()
        );
    }
    // In-kernel program cost per connection (BPF_ENABLE_STATS), in a pass of its own: the
    // statistics add a little to every program run, so they stay off during the rounds.
    if wanted(&Table::TlsNewconn) || wanted(&Table::TlsKeepalive) {
        let _stats =
            aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
        for table in [Table::TlsNewconn, Table::TlsKeepalive] {
            for row in [Row::Direct, Row::Ours, Row::OursCandidate, Row::OursFast] {
                let Some((_, e)) = paths.iter().find(|(r, _)| *r == row) else {
                    continue;
                };
                // Direct is measured under the plain agent (its programs allow by IP).
                let serving = if row == Row::Direct { Row::Ours } else { row };
                if agent.as_ref().is_none_or(|a| a.1 != serving) {
                    drop(agent.take());
                    drop(inside.take());
                    agent = Some((start_agent(serving)?, serving));
                    inside = Some(MoveBack::into(&cg)?);
                    if fast_row(serving) {
                        let a = &agent.as_ref().expect("just started").0;
                        rt.block_on(fast_path_ready(&tls_cfg, e.tls, a))?;
                    }
                }
                let a = &agent.as_ref().expect("an agent runs").0;
                let progs = BpfProgs::of(cg.path(), a.state_dir())?;
                bench
                    .prepare(&rt, table, e.tls, &e.hosts)
                    .with_context(|| {
                        format!("bpf pass warm-up: {} via {}", table.id(), row.id())
                    })?;
                let s0 = progs.stats()?;
                let m = bench
                    .measure(&rt, table, e.tls, &e.hosts)
                    .with_context(|| format!("bpf pass: {} via {}", table.id(), row.id()))?;
                let s1 = progs.stats()?;
                let id = format!("bpf-{}", table.id());
                let conns = (s1.connect4.1 - s0.connect4.1).max(1) as f64;
                let per_conn = |a: (u64, u64), b: (u64, u64)| (b.0 - a.0) as f64 / conns;
                let mut out = vec![
                    ("connections", conns),
                    ("req_per_conn", m.requests as f64 / conns),
                    ("connect4_ns_per_conn", per_conn(s0.connect4, s1.connect4)),
                    ("sock_ops_ns_per_conn", per_conn(s0.sock_ops, s1.sock_ops)),
                    (
                        "sock_ops_runs_per_conn",
                        (s1.sock_ops.1 - s0.sock_ops.1) as f64 / conns,
                    ),
                ];
                if let (Some(a), Some(b)) = (s0.egress, s1.egress) {
                    out.push(("egress_ns_per_conn", per_conn(a, b)));
                    out.push(("egress_runs_per_conn", (b.1 - a.1) as f64 / conns));
                }
                if let (Some(a), Some(b)) = (s0.sk_msg, s1.sk_msg) {
                    out.push(("sk_msg_ns_per_conn", per_conn(a, b)));
                    out.push(("sk_msg_runs_per_conn", (b.1 - a.1) as f64 / conns));
                }
                let mut line = format!("[compare-proxy] {id} {}:", row.id());
                for (metric, v) in out {
                    sink.emit(&id, row.id(), 0, metric, v)?;
                    line += &format!(" {metric} {v:.1}");
                }
                eprintln!("{line}");
            }
        }
    }
    sink.summary(plan.rounds);
    eprintln!(
        "[compare-proxy] {} measurements in {} ({:.0} s)",
        sink.lines,
        out.display(),
        t_start.elapsed().as_secs_f64()
    );
    drop(inside);
    drop(peers);
    drop(agent);
    drop(origin);
    drop(dns);
    drop(net);
    drop(cg);
    Ok(())
}

/// One measurement's result; fields a tool does not give stay 0 / NaN.
#[derive(Default)]
struct Measured {
    req_per_s: f64,
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    bytes: u64,
    errors: u64,
}

struct Bench<'a> {
    plan: &'a Plan,
    wrk_script: &'a Path,
    tls_cfg: &'a Arc<ClientConfig>,
}

impl Bench<'_> {
    /// Brings the node to the same state before every measurement, whatever ran before it:
    /// first wait (at most [`SETTLE_MAX`]) until the node is idle, so deferred work of the
    /// previous measurement (socket teardown in kworkers, RCU callbacks, TIME_WAIT timers, a
    /// stopped agent's exit) is not charged to this one; then an untimed run of the same table
    /// on the same path, so connection pools, caches and CPU frequency start warm for every row.
    /// Without it the first row of a table read up to 15% slower than the same row later in
    /// the table (TLS keep-alive, `direct`: 66-70k req/s first, 73-79k last).
    fn prepare(
        &self,
        rt: &tokio::runtime::Runtime,
        table: Table,
        addr: SocketAddr,
        hosts: &Path,
    ) -> anyhow::Result<()> {
        if self.plan.warm_s == 0 {
            return Ok(());
        }
        settle()?;
        let warm = Plan {
            dur_s: self.plan.warm_s,
            lat_dur: Duration::from_secs(self.plan.warm_s.into()),
            ..self.plan.clone()
        };
        Bench {
            plan: &warm,
            ..*self
        }
        .measure(rt, table, addr, hosts)?;
        Ok(())
    }

    fn measure(
        &self,
        rt: &tokio::runtime::Runtime,
        table: Table,
        addr: SocketAddr,
        hosts: &Path,
    ) -> anyhow::Result<Measured> {
        let port = addr.port();
        let (c, close, file, scheme) = match table {
            Table::TlsKeepalive => (16, false, "1k.bin", "https"),
            Table::TlsNewconn => (16, true, "1k.bin", "https"),
            Table::TlsBulk => (1, false, "16m.bin", "https"),
            Table::HttpKeepalive => (16, false, "1k.bin", "http"),
            Table::HttpClose => (16, true, "1k.bin", "http"),
            Table::H2c => return self.h2load(&format!("http://{NAME}:{port}/1k.bin"), hosts),
            Table::LatencyTls | Table::LatencyHttp => {
                let tls = (table == Table::LatencyTls).then_some(self.tls_cfg);
                return rt.block_on(open_loop(
                    tls,
                    addr,
                    self.plan.lat_rate,
                    self.plan.lat_conns,
                    self.plan.lat_dur,
                ));
            }
        };
        let url = format!("{scheme}://{NAME}:{port}/{file}");
        let c = c.to_string();
        let d = format!("{}s", self.plan.dur_s);
        let mut args = vec!["-t1", "-c", &c, "-d", &d, "--timeout", "5s", "-s"];
        let script = self.wrk_script.to_string_lossy().into_owned();
        args.push(&script);
        if close {
            args.extend(["-H", "Connection: close"]);
        }
        args.push(&url);
        let out = run_client("wrk", &args, hosts)?;
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("PTBENCH "))
            .with_context(|| format!("no result from wrk: {out}"))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("wrk result {line:?}"))?;
        let [requests, bytes, dur_us, errors] = v[..] else {
            bail!("wrk result {line:?}");
        };
        if requests == 0 {
            bail!("wrk made no request: {out}");
        }
        let secs = dur_us as f64 / 1e6;
        Ok(Measured {
            req_per_s: requests as f64 / secs,
            mb_per_s: bytes as f64 / 1e6 / secs,
            requests,
            bytes,
            errors,
            ..Measured::default()
        })
    }

    fn h2load(&self, url: &str, hosts: &Path) -> anyhow::Result<Measured> {
        let d = self.plan.dur_s.to_string();
        let out = run_client("h2load", &["-c", "16", "-m", "10", "-D", &d, url], hosts)?;
        // "finished in 5.00s, 12345.67 req/s, 14.2MB/s"
        let (secs, _) = out
            .lines()
            .find_map(|l| l.strip_prefix("finished in "))
            .and_then(|l| l.split_once("s,"))
            .with_context(|| format!("h2load output: {out}"))?;
        let secs: f64 = secs.trim().parse()?;
        // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, …"
        let req_line = out
            .lines()
            .find(|l| l.starts_with("requests:"))
            .context("h2load: no requests line")?;
        let count = |what: &str| -> u64 {
            req_line
                .split(',')
                .find_map(|f| f.trim().strip_suffix(what))
                .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                .unwrap_or(0)
        };
        let (ok, failed) = (count(" succeeded"), count(" failed") + count(" errored"));
        // "traffic: 14.30MB (14994880) total, …"
        let bytes: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("traffic:"))
            .and_then(|l| {
                l.split_once('(')?
                    .1
                    .split_once(')')
                    .map(|(n, _)| n.parse().ok())
            })
            .flatten()
            .context("h2load: no traffic line")?;
        if ok == 0 {
            bail!("h2load: no request succeeded: {out}");
        }
        Ok(Measured {
            req_per_s: ok as f64 / secs,
            mb_per_s: bytes as f64 / 1e6 / secs,
            requests: ok,
            bytes,
            errors: failed,
            ..Measured::default()
        })
    }
}

/// wrk's `done()` hook: exact counts instead of its rounded summary.
const WRK_SCRIPT: &str = r#"done = function(s, latency, requests)
  local e = s.errors
  io.write(string.format("PTBENCH %d %d %d %d\n", s.requests, s.bytes, s.duration,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"#;

/// Runs a load generator (inherits this process's cgroup and CPU) in a private mount namespace
/// whose `/etc/hosts` is `hosts`; returns its stdout. Fails on a non-zero exit.
fn run_client(tool: &str, args: &[&str], hosts: &Path) -> anyhow::Result<String> {
    let src = CString::new(hosts.as_os_str().as_encoded_bytes())?;
    let mut cmd = Command::new(tool);
    cmd.args(args).stdin(Stdio::null());
    // SAFETY: only async-signal-safe syscalls (unshare, mount) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    src.as_ptr(),
                    c"/etc/hosts".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().with_context(|| format!("running {tool}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{tool} {}: {}\n{stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Open loop: `rate` GETs of `/1k.bin` per second spread over `conns` keep-alive connections for
/// `dur`. A request's latency runs from its scheduled time, or from when the timer actually woke
/// us if that was later and the connection was idle (timer slack is not the system's latency).
async fn open_loop(
    tls: Option<&Arc<ClientConfig>>,
    addr: SocketAddr,
    rate: u32,
    conns: usize,
    dur: Duration,
) -> anyhow::Result<Measured> {
    let mut tasks = Vec::new();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let total = (dur.as_secs_f64() * f64::from(rate)) as usize;
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    for k in 0..conns {
        let mut s = dial(tls, addr, NAME).await?;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total / conns + 1);
            let mut buf = Vec::with_capacity(4096);
            let mut bytes = 0u64;
            let mut i = k;
            while i < total {
                let from = open_loop_slot(start, interval, i).await;
                let (status, n) = s.get(NAME, &mut buf).await?;
                if status != 200 {
                    bail!("status {status}");
                }
                bytes += n as u64;
                lat.push(from.elapsed().as_secs_f64() * 1e6);
                i += conns;
            }
            anyhow::Ok((lat, bytes))
        }));
    }
    let t0 = Instant::now();
    let mut all = Vec::with_capacity(total);
    let mut bytes = 0;
    for t in tasks {
        let (lat, b) = t.await??;
        all.extend(lat);
        bytes += b;
    }
    let secs = t0.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let p = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    if all.is_empty() {
        bail!("no request completed");
    }
    Ok(Measured {
        req_per_s: all.len() as f64 / secs,
        mb_per_s: bytes as f64 / 1e6 / secs,
        p50_us: p(0.50),
        p99_us: p(0.99),
        requests: all.len() as u64,
        bytes,
        errors: 0,
    })
}

/// A client connection, TLS or plain.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn dial(
    tls: Option<&Arc<ClientConfig>>,
    addr: SocketAddr,
    sni: &str,
) -> anyhow::Result<Conn> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect {addr}: timeout"))?
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    match tls {
        None => Ok(Conn::Plain(s)),
        Some(cfg) => {
            let name = ServerName::try_from(sni.to_string())?;
            let t = tokio::time::timeout(
                Duration::from_secs(5),
                TlsConnector::from(cfg.clone()).connect(name, s),
            )
            .await
            .context("TLS handshake: timeout")??;
            Ok(Conn::Tls(Box::new(t)))
        }
    }
}

impl Conn {
    /// `GET /1k.bin` with `Host: host` on this keep-alive connection; returns the status and the
    /// bytes read (head and body).
    async fn get(&mut self, host: &str, buf: &mut Vec<u8>) -> anyhow::Result<(u16, usize)> {
        let req = format!("GET /1k.bin HTTP/1.1\r\nHost: {host}\r\n\r\n");
        match self {
            Conn::Plain(s) => http_get(s, req.as_bytes(), buf).await,
            Conn::Tls(s) => http_get(s.as_mut(), req.as_bytes(), buf).await,
        }
    }
}

/// Writes `req`, reads one response with a `Content-Length` body.
async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<(u16, usize)> {
    s.write_all(req).await?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            bail!("response head over 64 KiB");
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before a response");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut have = buf.len() - head_end;
    while have < len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed in the body");
        }
        have += n;
    }
    Ok((status, head_end + len))
}

/// Before any measurement: every path answers `bench.test`, and refuses `evil.test` in SNI and
/// in Host where it routes on them. Also reports (without failing) whether a second request
/// with another Host on an allowed keep-alive connection gets through.
async fn checks(tls: &Arc<ClientConfig>, paths: &[(Row, Endpoints)]) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    for (row, e) in paths {
        let r = row.id();
        let (st, _) = dial(Some(tls), e.tls, NAME)
            .await
            .with_context(|| format!("{r}: TLS {NAME}"))?
            .get(NAME, &mut buf)
            .await
            .with_context(|| format!("{r}: TLS GET"))?;
        if st != 200 {
            bail!("{r}: TLS GET {NAME}: status {st}");
        }
        if let Some(a) = e.http {
            let mut c = dial(None, a, NAME).await?;
            let (st, _) = c
                .get(NAME, &mut buf)
                .await
                .with_context(|| format!("{r}: HTTP GET"))?;
            if st != 200 {
                bail!("{r}: HTTP GET {NAME}: status {st}");
            }
            if *row != Row::Direct {
                let second = match c.get(DENIED, &mut buf).await {
                    Ok((200, _)) => "answered 200 (only the first request's Host is checked)",
                    Ok(_) | Err(_) => "refused",
                };
                eprintln!(
                    "[compare-proxy] {r}: 2nd request with Host {DENIED} on an allowed keep-alive connection: {second}"
                );
            }
        }
        if *row == Row::Direct {
            continue;
        }
        let denied_sni = match dial(Some(tls), e.tls, DENIED).await {
            Err(_) => true,
            Ok(mut c) => c.get(DENIED, &mut buf).await.is_err(),
        };
        if !denied_sni {
            bail!("{r}: SNI {DENIED} was let through");
        }
        if let Some(a) = e.http {
            let denied_host = match dial(None, a, NAME).await {
                Err(_) => true,
                Ok(mut c) => !matches!(c.get(DENIED, &mut buf).await, Ok((200, _))),
            };
            if !denied_host {
                bail!("{r}: Host {DENIED} was let through");
            }
        }
        eprintln!(
            "[compare-proxy] {r}: SNI {DENIED} refused{}",
            if e.http.is_some() {
                format!(", Host {DENIED} refused")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// `--perf DIR`: starts `perf record` (system-wide, call graphs, the `cpu-clock` software event:
/// no hardware counters needed) into `DIR/<name>.data`.
fn perf_start(dir: &Path, name: &str) -> anyhow::Result<Child> {
    std::fs::create_dir_all(dir)?;
    let child = Command::new("perf")
        .args([
            "record",
            "-a",
            "-g",
            "-e",
            "cpu-clock",
            "-F",
            "1999",
            "-q",
            "-o",
        ])
        .arg(dir.join(format!("{name}.data")))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf record (is perf installed?)")?;
    // perf needs a moment to open its events on every CPU.
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

/// Stops a `perf record` started by [`perf_start`] (SIGINT: it writes its file and exits).
fn perf_stop(mut p: Child) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
    let _ = p.wait();
}

/// The agent's counts of Domain-candidate connections that went directly (the TLS fast path,
/// `path="kernel-sni"`) and through the proxy; `None` without an agent for the row, or when its
/// metrics cannot be read (a loaded machine can time the scrape out: the share is then left
/// out of that measurement, the run goes on).
fn fast_path_counts(agent: Option<&(Agent, Row)>) -> Option<(f64, f64)> {
    let (a, _) = agent?;
    let body = (0..3).find_map(|_| match a.get("/metrics") {
        Ok((200, body)) => Some(body),
        _ => None,
    })?;
    let sum = |label: &str| -> f64 {
        body.lines()
            .filter(|l| {
                l.split(['{', ' ']).next() == Some("passthrough_kernel_decisions_total")
                    && l.contains(label)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Some((
        sum("path=\"kernel-sni\",verdict=\"direct\""),
        sum("path=\"kernel\",verdict=\"redirect\",reason=\"domain_candidates\""),
    ))
}

/// After the fast-path agent starts: waits (≤ 10 s) until a TLS connection to `addr` goes
/// directly (the agent pre-warms `bench.test` from its policy), then checks that the kernel's
/// judge refuses the denied SNI on the same direct path (the run fails otherwise).
async fn fast_path_ready(
    tls: &Arc<ClientConfig>,
    addr: SocketAddr,
    agent: &Agent,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let direct = || {
        agent.metric(
            "passthrough_kernel_decisions_total",
            "path=\"kernel-sni\",verdict=\"direct\"",
        )
    };
    let mut buf = Vec::new();
    loop {
        let before = direct();
        let (st, _) = dial(Some(tls), addr, NAME)
            .await?
            .get(NAME, &mut buf)
            .await?;
        if st != 200 {
            bail!("ours-fast: TLS GET {NAME}: status {st}");
        }
        if direct() > before {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "ours-fast: no connection went directly within 10 s (destination never verified)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = direct();
    let refused = match dial(Some(tls), addr, DENIED).await {
        Err(_) => true,
        Ok(mut c) => c.get(DENIED, &mut buf).await.is_err(),
    };
    if !refused {
        bail!("ours-fast: SNI {DENIED} was let through");
    }
    eprintln!(
        "[compare-proxy] ours-fast: {NAME} goes directly; SNI {DENIED} refused ({})",
        if direct() > before {
            "in the kernel"
        } else {
            "by the proxy"
        }
    );
    Ok(())
}

/// The programs of the running agent whose cost per connection the BPF pass reports: connect4
/// and sock_ops attached to the workload cgroup, and the TLS fast path's `sk_msg` judge attached
/// to its `SNI_SOCKS` map (absent when the fast path is off). Tail-called phases count under
/// the judge's entry program (the kernel times the whole run).
struct BpfProgs {
    connect4: u32,
    sock_ops: u32,
    sk_msg: Option<u32>,
    /// The egress backstop (`cgroup_skb/egress`; absent under `--no-raw-socket-backstop`
    /// without the fast path): its cost is per packet, reported per connection.
    egress: Option<u32>,
}

/// Cumulative (run time ns, run count) of each program.
struct BpfStats {
    connect4: (u64, u64),
    sock_ops: (u64, u64),
    sk_msg: Option<(u64, u64)>,
    egress: Option<(u64, u64)>,
}

impl BpfProgs {
    fn of(cgroup: &Path, state_dir: &Path) -> anyhow::Result<BpfProgs> {
        use passthrough_user::pins::{attached_prog_ids, attached_prog_ids_at, map_pin};
        use std::os::fd::AsFd as _;
        const CONNECT4: u32 = 10; // BPF_CGROUP_INET4_CONNECT
        const SOCK_OPS: u32 = 3; // BPF_CGROUP_SOCK_OPS
        const SK_MSG: u32 = 7; // BPF_SK_MSG_VERDICT
        const EGRESS: u32 = 1; // BPF_CGROUP_INET_EGRESS
        let one = |ids: Vec<u32>, what: &str| -> anyhow::Result<u32> {
            match ids[..] {
                [id] => Ok(id),
                _ => bail!("{what}: expected one attached program, found {ids:?}"),
            }
        };
        let connect4 = one(attached_prog_ids(cgroup, CONNECT4)?, "connect4")?;
        let sock_ops = one(attached_prog_ids(cgroup, SOCK_OPS)?, "sock_ops")?;
        let pin = map_pin(state_dir, "SNI_SOCKS");
        let sk_msg = if pin.exists() {
            let map = aya::maps::MapData::from_pin(&pin).context("SNI_SOCKS pin")?;
            attached_prog_ids_at(map.fd().as_fd(), SK_MSG)?
                .first()
                .copied()
        } else {
            None
        };
        let egress = attached_prog_ids(cgroup, EGRESS)?.first().copied();
        Ok(BpfProgs {
            connect4,
            sock_ops,
            sk_msg,
            egress,
        })
    }

    fn stats(&self) -> anyhow::Result<BpfStats> {
        let mut found: HashMap<u32, (u64, u64)> = HashMap::new();
        for info in aya::programs::loaded_programs().flatten() {
            found.insert(
                info.id(),
                (info.run_time().as_nanos() as u64, info.run_count()),
            );
        }
        let get = |id: u32| {
            found
                .get(&id)
                .copied()
                .with_context(|| format!("program {id} is gone"))
        };
        Ok(BpfStats {
            connect4: get(self.connect4)?,
            sock_ops: get(self.sock_ops)?,
            sk_msg: self.sk_msg.map(get).transpose()?,
            egress: self.egress.map(get).transpose()?,
        })
    }
}

/// Collects the JSON lines and the figures for the summary.
struct Sink {
    file: File,
    lines: usize,
    rows: Vec<(String, String, usize, String, f64)>,
}

impl Sink {
    fn create(path: &Path) -> anyhow::Result<Sink> {
        Ok(Sink {
            file: File::create(path).with_context(|| format!("creating {}", path.display()))?,
            lines: 0,
            rows: Vec::new(),
        })
    }

    fn emit(
        &mut self,
        table: &str,
        row: &str,
        round: usize,
        metric: &str,
        value: f64,
    ) -> anyhow::Result<()> {
        let line = serde_json::json!({
            "part": "proxy", "table": table, "row": row, "size": null,
            "round": round, "metric": metric, "value": value,
        });
        writeln!(self.file, "{line}")?;
        self.lines += 1;
        self.rows.push((
            table.to_string(),
            row.to_string(),
            round,
            metric.to_string(),
            value,
        ));
        Ok(())
    }

    fn values(&self, table: &str, row: &str, metric: &str) -> Vec<(usize, f64)> {
        self.rows
            .iter()
            .filter(|r| r.0 == table && r.1 == row && r.3 == metric)
            .map(|r| (r.2, r.4))
            .collect()
    }

    /// Per table and path: median of the rounds and median of the per-round ratios to direct
    /// (latency: added µs over direct).
    fn summary(&self, rounds: usize) {
        eprintln!(
            "\n[compare-proxy] medians of {rounds} round(s); (×) = median of per-round ratios to direct"
        );
        for table in TABLES {
            let main = match table {
                Table::TlsBulk => "mb_per_s",
                _ => "req_per_s",
            };
            eprintln!("  {}", table.id());
            for row in ROWS {
                let v = self.values(table.id(), row.id(), main);
                if v.is_empty() {
                    continue;
                }
                let base = self.values(table.id(), "direct", main);
                let ratio = median(
                    v.iter()
                        .filter_map(|(r, x)| base.iter().find(|(b, _)| b == r).map(|(_, d)| x / d))
                        .collect(),
                );
                let med = |m: &str| {
                    median(
                        self.values(table.id(), row.id(), m)
                            .into_iter()
                            .map(|x| x.1)
                            .collect(),
                    )
                };
                let mut line = format!(
                    "    {:<15} {main} {:>10.1} (×{ratio:.2})",
                    row.id(),
                    med(main)
                );
                if matches!(table, Table::LatencyTls | Table::LatencyHttp) {
                    let d = |m: &str| {
                        median(
                            self.values(table.id(), "direct", m)
                                .into_iter()
                                .map(|x| x.1)
                                .collect(),
                        )
                    };
                    line += &format!(
                        "  p50 {:.0} µs ({:+.0})  p99 {:.0} µs ({:+.0})",
                        med("p50_us"),
                        med("p50_us") - d("p50_us"),
                        med("p99_us"),
                        med("p99_us") - d("p99_us")
                    );
                }
                let (cpu_req, cpu_mb) = (med("cpu_us_per_req"), med("cpu_us_per_mb"));
                if !cpu_req.is_nan() {
                    line += &format!("  cpu {cpu_req:.1} µs/req");
                }
                if !cpu_mb.is_nan() {
                    line += &format!("  cpu {cpu_mb:.0} µs/MB");
                }
                // Node CPU per request (every CPU's busy time), as a per-round ratio to direct.
                let node = self.values(table.id(), row.id(), "node_cpu_us_per_req");
                if !node.is_empty() {
                    let base = self.values(table.id(), "direct", "node_cpu_us_per_req");
                    let r = median(
                        node.iter()
                            .filter_map(|(r, x)| {
                                base.iter().find(|(b, _)| b == r).map(|(_, d)| x / d)
                            })
                            .collect(),
                    );
                    line += &format!("  node {:.1} µs/req (×{r:.2})", med("node_cpu_us_per_req"));
                }
                // Against the best peer of the table (the highest median), TLS tables.
                if table.proto() == Proto::Tls && row.is_agent() {
                    let best = [Row::Nginx, Row::Haproxy, Row::HaproxySplice, Row::Envoy]
                        .into_iter()
                        .map(|p| {
                            median(
                                self.values(table.id(), p.id(), main)
                                    .into_iter()
                                    .map(|x| x.1)
                                    .collect(),
                            )
                        })
                        .filter(|x| !x.is_nan())
                        .fold(f64::NAN, f64::max);
                    if !best.is_nan() {
                        line += &format!("  vs best peer ×{:.2}", med(main) / best);
                    }
                }
                let share = med("direct_share");
                if !share.is_nan() {
                    line += &format!("  direct {:.0}%", share * 100.0);
                }
                eprintln!("{line}");
            }
        }
    }
}

/// A process started for the run (origin or peer), in its own process group, pinned to CPU0.
/// Dropping it terminates the group (SIGTERM, then SIGKILL after 2 s).
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, dir: &Path) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let f = File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .process_group(0);
        // SAFETY: sched_setaffinity on the child itself, with a set built on its own stack.
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut set);
                if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc { name, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pg = -(self.child.id() as i32);
        // SAFETY: signals to the process group this struct created.
        unsafe { libc::kill(pg, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; also reaps stragglers (nginx workers) of the group.
        unsafe { libc::kill(pg, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Waits until `addr` accepts a connection (from this process's netns), up to 10 s.
fn wait_listening(p: &Proc, addr: SocketAddr) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!(
                "{} not listening on {addr} after 10 s: {}",
                p.name,
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
        }
        if !Path::new(&format!("/proc/{}", p.pid())).exists() {
            bail!(
                "{} exited: {}",
                p.name,
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const NGINX_TLS: u16 = 18443;
const HAPROXY_TLS: u16 = 28443;
const HAPROXY_HTTP: u16 = 28080;
const HAPROXY_SPLICE_TLS: u16 = 38443;
const HAPROXY_SPLICE_HTTP: u16 = 38080;
const ENVOY_TLS: u16 = 48443;

/// The origin nginx in the server netns.
fn start_origin(dir: &Path, ns: &str, pki: &Pki) -> anyhow::Result<Proc> {
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("1k.bin"), vec![b'x'; 1024])?;
    std::fs::write(www.join("16m.bin"), vec![b'x'; BULK_BYTES])?;
    let (crt, key) = pki.write_server(dir)?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/origin.pid;\nerror_log {d}/origin-error.log;\nworker_rlimit_nofile 16384;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  default_type application/octet-stream;\n  sendfile on; tcp_nopush on; tcp_nodelay on;\n\
           keepalive_requests 10000000; keepalive_timeout 60s;\n\
           client_body_temp_path {d}/tmp-body; proxy_temp_path {d}/tmp-proxy; fastcgi_temp_path {d}/tmp-fcgi;\n\
           uwsgi_temp_path {d}/tmp-uwsgi; scgi_temp_path {d}/tmp-scgi;\n\
           ssl_certificate {}; ssl_certificate_key {};\n\
           server {{ listen {ORIGIN_TLS} ssl; listen {ORIGIN_HTTP}; root {d}/www; }}\n\
           server {{ listen {ORIGIN_H2C} http2; root {d}/www; }}\n}}\n",
        crt.display(),
        key.display()
    );
    let path = dir.join("origin.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "nginx", "-e"])
        .arg(dir.join("origin-error.log"))
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path);
    Proc::spawn("origin-nginx", cmd, dir)
}

/// The peers, each with one worker, routing `bench.test` to `origin` (test host C).
struct Peers {
    nginx: Proc,
    haproxy: Proc,
    haproxy_splice: Proc,
    envoy: Proc,
}

impl Peers {
    fn start(dir: &Path, envoy: &Path, origin: IpAddr) -> anyhow::Result<Peers> {
        let d = dir.display();
        let nginx_conf = dir.join("nginx-stream.conf");
        std::fs::write(
            &nginx_conf,
            format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nworker_processes 1;\ndaemon off;\n\
                 pid {d}/nginx-stream.pid;\nerror_log {d}/nginx-stream-error.log;\nworker_rlimit_nofile 16384;\n\
                 events {{ worker_connections 8192; }}\n\
                 stream {{\n  map $ssl_preread_server_name $up {{ {NAME} {origin}:{ORIGIN_TLS}; default 127.0.0.1:1; }}\n\
                   server {{ listen 127.0.0.1:{NGINX_TLS}; ssl_preread on; proxy_pass $up; }}\n}}\n"
            ),
        )?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-e")
            .arg(dir.join("nginx-stream-error.log"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&nginx_conf);
        let nginx = Proc::spawn("nginx-stream", cmd, dir)?;

        let haproxy_conf = |splice: bool, tls: u16, http: u16| {
            let sp = if splice {
                "    option splice-request\n    option splice-response\n"
            } else {
                ""
            };
            format!(
                "global\n    nbthread 1\n    maxconn 4000\n\
                 defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
                 frontend fe_tls\n    bind 127.0.0.1:{tls}\n    tcp-request inspect-delay 5s\n\
                 \x20   tcp-request content accept if {{ req.ssl_hello_type 1 }}\n\
                 \x20   use_backend be_tls if {{ req.ssl_sni -i {NAME} }}\n    default_backend be_deny\n\
                 frontend fe_http\n    bind 127.0.0.1:{http}\n    tcp-request inspect-delay 5s\n\
                 \x20   tcp-request content accept if HTTP\n\
                 \x20   use_backend be_http if {{ req.hdr(host),field(1,:) -i {NAME} }}\n    default_backend be_deny\n\
                 backend be_tls\n{sp}    server origin {origin}:{ORIGIN_TLS}\n\
                 backend be_http\n{sp}    server origin {origin}:{ORIGIN_HTTP}\n\
                 backend be_deny\n    tcp-request content reject\n"
            )
        };
        let haproxy = |name: &'static str, splice: bool, tls: u16, http: u16| {
            let conf = dir.join(format!("{name}.cfg"));
            std::fs::write(&conf, haproxy_conf(splice, tls, http))?;
            let mut cmd = Command::new("haproxy");
            cmd.arg("-db").arg("-f").arg(&conf);
            Proc::spawn(name, cmd, dir)
        };
        let haproxy_copy = haproxy("haproxy", false, HAPROXY_TLS, HAPROXY_HTTP)?;
        let haproxy_splice = haproxy(
            "haproxy-splice",
            true,
            HAPROXY_SPLICE_TLS,
            HAPROXY_SPLICE_HTTP,
        )?;

        let envoy_conf = dir.join("envoy.yaml");
        std::fs::write(
            &envoy_conf,
            format!(
                "static_resources:\n  listeners:\n  - name: sni_tls\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {ENVOY_TLS}}}}}\n\
                 \x20   listener_filters:\n    - name: envoy.filters.listener.tls_inspector\n\
                 \x20     typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}\n\
                 \x20   filter_chains:\n    - filter_chain_match: {{server_names: [{NAME}]}}\n      filters:\n\
                 \x20     - name: envoy.filters.network.tcp_proxy\n        typed_config:\n\
                 \x20         \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n\
                 \x20         stat_prefix: sni_tls\n          cluster: origin_tls\n\
                 \x20 clusters:\n  - name: origin_tls\n    type: STATIC\n    connect_timeout: 5s\n\
                 \x20   load_assignment:\n      cluster_name: origin_tls\n      endpoints:\n      - lb_endpoints:\n\
                 \x20       - endpoint: {{address: {{socket_address: {{address: {origin}, port_value: {ORIGIN_TLS}}}}}}}\n"
            ),
        )?;
        let mut cmd = Command::new(envoy);
        cmd.arg("-c").arg(&envoy_conf).args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "-l",
            "warning",
        ]);
        let envoy = Proc::spawn("envoy", cmd, dir)?;
        let peers = Peers {
            nginx,
            haproxy: haproxy_copy,
            haproxy_splice,
            envoy,
        };
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for (p, port) in [
            (&peers.nginx, NGINX_TLS),
            (&peers.haproxy, HAPROXY_TLS),
            (&peers.haproxy_splice, HAPROXY_SPLICE_TLS),
            (&peers.envoy, ENVOY_TLS),
        ] {
            wait_listening(p, SocketAddr::new(lo, port))?;
        }
        Ok(peers)
    }
}

/// Envoy from `scripts/setup-peers.sh` (`target/peers-venv/bin/envoy`), or `$ENVOY`.
fn envoy_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("ENVOY") {
        return Ok(PathBuf::from(p));
    }
    let mut dir = std::env::current_exe()?;
    while dir.pop() {
        let p = dir.join("peers-venv/bin/envoy");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("no envoy: run scripts/setup-peers.sh or set ENVOY")
}

fn which(tool: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()));
    if !found {
        bail!("{tool} not found: run scripts/setup-peers.sh");
    }
    Ok(())
}

/// Pins every thread of `pid` to `cpu` (threads created later inherit it).
fn pin_process(pid: u32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; `cpu` is below CPU_SETSIZE.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    };
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = t?.file_name().to_string_lossy().parse()?;
        // SAFETY: plain syscall with a valid set.
        if unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) } != 0 {
            bail!(
                "sched_setaffinity({tid}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// utime + stime (clock ticks) of `pid` and its children.
/// Busy clock ticks of all CPUs together (`/proc/stat`: all but idle and iowait).
/// The longest [`Bench::prepare`] waits for an idle node; a busy neighbour on a shared
/// machine must not stall the run.
const SETTLE_MAX: Duration = Duration::from_secs(10);

/// Waits until one 500 ms window of the node's CPUs is under 5% busy (or [`SETTLE_MAX`]).
fn settle() -> anyhow::Result<()> {
    let window = Duration::from_millis(500);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let t0 = Instant::now();
    loop {
        let b0 = node_busy_ticks()?;
        std::thread::sleep(window);
        let busy = (node_busy_ticks()? - b0) as f64 / clock_ticks() / (window.as_secs_f64() * cpus);
        if busy < 0.05 {
            return Ok(());
        }
        if t0.elapsed() >= SETTLE_MAX {
            eprintln!(
                "[compare-proxy] note: node still {:.0}% busy after {} s; measuring anyway",
                busy * 100.0,
                SETTLE_MAX.as_secs()
            );
            return Ok(());
        }
    }
}

fn node_busy_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat: no cpu line")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<u64>())
        .collect::<Result<_, _>>()
        .context("/proc/stat: cpu line")?;
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let busy: u64 = f.iter().take(8).sum::<u64>()
        - f.get(3).copied().unwrap_or(0)
        - f.get(4).copied().unwrap_or(0);
    Ok(busy)
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    // Fields after the comm's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let mut ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
    {
        ticks += cpu_ticks(c).unwrap_or(0);
    }
    Ok(ticks)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}
