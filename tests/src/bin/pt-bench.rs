//! `pt-bench`: benchmarks of the kernel path (run by `cargo xtask bench`).
//!
//! `connect`: connect() latency on the loopback device of a private network namespace, with no
//! program attached vs. with passthrough's programs holding 10 / 1,000 / 100,000 CIDR matches.
//! Destinations rotate over 512 documentation-range addresses routed to `lo` (AnyIP), so every
//! connect runs the full decision (loopback itself is exempt by rule 1 and would measure
//! nothing). Rounds are interleaved (none, 10, 1k, 100k, none, ...) and medians reported, with
//! ratios to the no-program baseline of the same run. Also reports compile and load time of the
//! 100,000-match plan.
//!
//! A whole connect() on loopback costs ~25–30 µs (TCP handshake), and on this shared 2-core
//! machine its p50 moves by more than the microsecond we want to see. So the bench also reads
//! the kernel's own BPF run-time statistics (`BPF_ENABLE_STATS`, enabled for the life of an fd,
//! no sysctl touched): the time spent inside connect4 and sock_ops per connect — the hook's
//! added cost, measured directly — and inside the egress backstop per packet (the handshake's
//! and teardown's TCP packets: the common packet), and, with 100,000 matches, inside the
//! setsockopt program per `setsockopt(TCP_NODELAY)` (an option it lets through).
//!
//! `bpf-log [--before-object PATH]`: what the programs' aya-log calls cost, off and on, against
//! an older build of the programs without them ([`bpf_log`]).

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    time::Instant,
};

use anyhow::Context as _;
use passthrough_policy::{
    Match, MatchKind, MatchOrigin, MergedConf, Protocol,
    plan::{self, PlanOptions},
};
use passthrough_tests::{
    TestCgroup,
    bench::{BenchNs, MoveBack, Rng, cidr_conf, median, percentile, timed_connect},
};
use passthrough_user::kernel::{Capacities, Kernel};

const PORT: u16 = 9000;
const SIZES: [usize; 3] = [10, 1_000, 100_000];

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
    // Interleave the two /24s and spread neighbours apart.
    Rng(7).shuffle(&mut v);
    v
}

/// `n` CIDR matches: the 512 destinations are covered by four /25s (two with the port, two
/// port-less); the rest are random prefixes (/8–/32) across the IPv4 space, a third of them
/// inside 198.0.0.0/8 and 203.0.0.0/8 so lookups walk deep paths next to the destinations.
fn conf(n: usize) -> MergedConf {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
    let mut nets: Vec<(ipnet::Ipv4Net, Option<u16>)> = Vec::with_capacity(n);
    for (i, base) in [[198u8, 51, 100], [203, 0, 113]].iter().enumerate() {
        for k in 0..2u8 {
            let net = ipnet::Ipv4Net::new(Ipv4Addr::new(base[0], base[1], base[2], k * 128), 25)
                .expect("valid");
            let port = if (k + i as u8).is_multiple_of(2) {
                Some(PORT)
            } else {
                None
            };
            nets.push((net, port));
        }
    }
    while nets.len() < n {
        let (net, r) = rng.rule_net();
        let port = if r.is_multiple_of(5) {
            Some(1 + (r % 65535) as u16)
        } else {
            None
        };
        nets.push((net, port));
    }
    cidr_conf(nets)
}

/// Times `count` connect() calls (only the syscall) to rotating destinations.
fn measure(dsts: &[SocketAddr], count: usize) -> anyhow::Result<Vec<u64>> {
    let mut out = (0..count)
        .map(|i| timed_connect(dsts[i % dsts.len()]))
        .collect::<anyhow::Result<Vec<u64>>>()?;
    out.sort_unstable();
    Ok(out)
}

struct Row {
    label: String,
    p50: Vec<f64>,
    p99: Vec<f64>,
    /// Mean time inside connect4 per call (kernel BPF statistics), per round.
    prog_ns: Vec<f64>,
    /// Time inside sock_ops per connect (it runs for several events of each connection).
    sockops_ns: Vec<f64>,
    /// Mean time inside the egress backstop per packet.
    egress_ns: Vec<f64>,
}

/// Mean run time per run of program `name` between two readings of its statistics.
fn per_run(
    before: Option<(std::time::Duration, u64)>,
    after: Option<(std::time::Duration, u64)>,
) -> Option<f64> {
    let ((t0, n0), (t1, n1)) = (before?, after?);
    (n1 > n0).then(|| (t1 - t0).as_nanos() as f64 / (n1 - n0) as f64)
}

/// `setsockopt(TCP_NODELAY)` `n` times on one TCP socket.
fn setsockopts(n: usize) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    for i in 0..n {
        let v: libc::c_int = (i & 1) as libc::c_int;
        // SAFETY: a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        anyhow::ensure!(
            rc == 0,
            "setsockopt(TCP_NODELAY): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let which = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "all".into());
    if which == "bpf-log" {
        return bpf_log(&args);
    }
    if which != "all" && which != "connect" {
        anyhow::bail!("unknown bench {which:?}; one of: connect, bpf-log, all");
    }
    let rounds = if quick { 1 } else { 3 };
    let count = if quick { 3_000 } else { 30_000 };

    // A private netns with the destinations routed to lo, and this process inside it and
    // inside a test cgroup (the attachment point). The guards clean up on every exit path.
    let ns = BenchNs::new(&["198.51.100.0/24", "203.0.113.0/24"])?;
    ns.enter_current_thread()?;
    let listener = TcpListener::bind(("0.0.0.0", PORT))?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let cg = TestCgroup::new()?;
    let _back = MoveBack::into(&cg)?;

    // Kernel BPF run-time statistics while this fd is open (no sysctl is changed): the cost of
    // the program itself, free of the TCP handshake's noise that dominates connect() timings.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let dsts = destinations();
    measure(&dsts, count / 10)?; // warm up
    let mut rows: Vec<Row> = std::iter::once("no program".to_string())
        .chain(SIZES.iter().map(|n| format!("{n} CIDR matches")))
        .chain(std::iter::once(
            "100000 CIDR + 1 Domain (sock_ops on)".to_string(),
        ))
        .map(|label| Row {
            label,
            p50: vec![],
            p99: vec![],
            prog_ns: vec![],
            sockops_ns: vec![],
            egress_ns: vec![],
        })
        .collect();
    let mut compile_ms = vec![];
    let mut load_ms = vec![];
    let mut prog_load_ms = vec![];
    let mut setsockopt_ns = vec![];
    let mut confs: Vec<MergedConf> = SIZES.iter().map(|n| conf(*n)).collect();
    // The last row: a Domain match makes redirects possible, so sock_ops is attached too. Its
    // port differs from the benchmark's, so every connect is still allowed by a CIDR match.
    let mut with_domain = conf(100_000);
    with_domain.matches.push(Match {
        kind: MatchKind::Domain,
        value: "example.com".into(),
        net: None,
        port: Some(443),
        protocol: Protocol::Tls,
        origin: MatchOrigin {
            file: PathBuf::from("bench").into(),
            policy: "bench".into(),
            index: 100_000,
        },
    });
    confs.push(with_domain);
    for round in 0..rounds {
        for (i, row) in rows.iter_mut().enumerate() {
            let _kernel = if i == 0 {
                None
            } else {
                let t = Instant::now();
                let proxy = if i == confs.len() {
                    // No listener is needed: nothing is redirected, the flag only arms sock_ops.
                    passthrough_user::kernel::ProxySettings {
                        host_port: 1,
                        ..Default::default()
                    }
                } else {
                    Default::default()
                };
                let mut k = Kernel::load(Capacities::default(), 0, 0, proxy, None)?;
                let t_prog = t.elapsed();
                let t = Instant::now();
                let p = plan::compile(
                    k.next_generation(),
                    &[(cg.id(), &confs[i - 1])],
                    &PlanOptions::default(),
                );
                let t_compile = t.elapsed();
                let t = Instant::now();
                k.apply(p)?;
                let t_load = t.elapsed();
                k.attach(cg.path())?;
                if i - 1 < SIZES.len() && SIZES[i - 1] == 100_000 {
                    prog_load_ms.push(t_prog.as_secs_f64() * 1e3);
                    compile_ms.push(t_compile.as_secs_f64() * 1e3);
                    load_ms.push(t_load.as_secs_f64() * 1e3);
                }
                Some(k)
            };
            let before = _kernel
                .as_ref()
                .and_then(|k| k.program_stats("passthrough_connect4"));
            let before_ops = _kernel
                .as_ref()
                .and_then(|k| k.program_stats("passthrough_sock_ops"));
            let before_egress = _kernel
                .as_ref()
                .and_then(|k| k.program_stats("passthrough_skb_egress"));
            let samples = measure(&dsts, count)?;
            if let Some(k) = _kernel.as_ref() {
                if let Some(ns) = per_run(before_egress, k.program_stats("passthrough_skb_egress"))
                {
                    row.egress_ns.push(ns);
                }
                if i - 1 < SIZES.len() && SIZES[i - 1] == 100_000 {
                    let before = k.program_stats("passthrough_setsockopt");
                    setsockopts(count * 10)?;
                    if let Some(ns) = per_run(before, k.program_stats("passthrough_setsockopt")) {
                        setsockopt_ns.push(ns);
                    }
                }
            }
            if let (Some(k), Some((t0, n0))) = (_kernel.as_ref(), before) {
                if let Some((t1, n1)) = k.program_stats("passthrough_connect4")
                    && n1 > n0
                {
                    row.prog_ns
                        .push((t1 - t0).as_nanos() as f64 / (n1 - n0) as f64);
                }
                if let (Some((o0, _)), Some((o1, _))) =
                    (before_ops, k.program_stats("passthrough_sock_ops"))
                {
                    row.sockops_ns
                        .push((o1 - o0).as_nanos() as f64 / count as f64);
                }
            }
            row.p50.push(percentile(&samples, 0.5) as f64);
            row.p99.push(percentile(&samples, 0.99) as f64);
            eprintln!(
                "round {round}: {:<20} p50 {:>7} ns  p99 {:>7} ns",
                row.label,
                percentile(&samples, 0.5),
                percentile(&samples, 0.99)
            );
        }
    }
    drop(_back);

    let base50 = median(rows[0].p50.clone());
    let base99 = median(rows[0].p99.clone());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n## connect() on loopback, destinations rotating over 512 addresses ({rounds} interleaved rounds × {count} connects, medians)\n"
    )?;
    writeln!(
        out,
        "| configuration | p50 ns | p99 ns | p50 ratio to no program | added p50 ns | connect4 ns/connect | sock_ops ns/connect | egress ns/packet |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for row in &rows {
        let p50 = median(row.p50.clone());
        let p99 = median(row.p99.clone());
        // Added cost per round (same round's baseline), then the median across rounds.
        let added = median(
            row.p50
                .iter()
                .zip(&rows[0].p50)
                .map(|(a, b)| a - b)
                .collect(),
        );
        let prog = if row.prog_ns.is_empty() {
            "–".to_string()
        } else {
            format!("{:.0}", median(row.prog_ns.clone()))
        };
        let ops = if row.sockops_ns.is_empty() {
            "–".to_string()
        } else {
            format!("{:.0}", median(row.sockops_ns.clone()))
        };
        let egress = if row.egress_ns.is_empty() {
            "–".to_string()
        } else {
            format!("{:.0}", median(row.egress_ns.clone()))
        };
        writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.3} | {:+.0} | {prog} | {ops} | {egress} |",
            row.label,
            p50,
            p99,
            p50 / base50,
            added
        )?;
    }
    if !setsockopt_ns.is_empty() {
        writeln!(
            out,
            "\nsetsockopt program, 100,000 CIDR matches: {:.0} ns per setsockopt(TCP_NODELAY) (median of {rounds} rounds × {} calls)",
            median(setsockopt_ns.clone()),
            count * 10
        )?;
    }
    let _ = base99;
    writeln!(
        out,
        "\n## 100,000 CIDR matches: compile and load (median of {rounds})\n"
    )?;
    writeln!(out, "| step | ms |\n|---|---:|")?;
    writeln!(
        out,
        "| load + verify the programs | {:.1} |",
        median(prog_load_ms.clone())
    )?;
    writeln!(
        out,
        "| compile the plan (pure) | {:.1} |",
        median(compile_ms.clone())
    )?;
    writeln!(
        out,
        "| write the maps (bpf syscalls) | {:.1} |",
        median(load_ms.clone())
    )?;
    writeln!(
        out,
        "| compile + load total | {:.1} |",
        median(
            compile_ms
                .iter()
                .zip(&load_ms)
                .map(|(a, b)| a + b)
                .collect()
        )
    )?;
    drop(ns);
    Ok(())
}

/// `pt-bench bpf-log [--before-object PATH] [--quick]`: what aya-log costs the programs.
///
/// In one run, interleaved round by round, `connect4`'s time per call (kernel BPF statistics)
/// with 100,000 CIDR matches, for allowed connects (the log calls are never reached) and for
/// denied ones (the same networks for another port: each denial passes the `debug` call in the
/// denial path), with the embedded
/// programs at `--bpf-log-level off` and `debug`, and, with `--before-object`, an older build of
/// the programs without any log call (the "before"). Also the translated program size and the
/// instructions the verifier processed, which show whether the disabled calls were removed.
fn bpf_log(args: &[String]) -> anyhow::Result<()> {
    use passthrough_user::kernel::{BpfLogLevel, LoadOptions};
    let quick = args.iter().any(|a| a == "--quick");
    let before: Option<&'static [u8]> = match args.iter().position(|a| a == "--before-object") {
        Some(i) => {
            let path = args.get(i + 1).context("--before-object needs a path")?;
            let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
            // ELF parsing wants the object 8-byte aligned, as `include_bytes_aligned!` gives it.
            let words: &'static mut [u64] =
                Box::leak(vec![0u64; bytes.len().div_ceil(8)].into_boxed_slice());
            // SAFETY: the u64 buffer is at least `bytes.len()` bytes long.
            let buf = unsafe {
                std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes.len())
            };
            buf.copy_from_slice(&bytes);
            Some(buf)
        }
        None => None,
    };
    let rounds = if quick { 1 } else { 5 };
    let (allowed_count, denied_count) = if quick {
        (2_000, 5_000)
    } else {
        (20_000, 50_000)
    };

    let ns = BenchNs::new(&["198.51.100.0/24", "203.0.113.0/24"])?;
    ns.enter_current_thread()?;
    let listener = TcpListener::bind(("0.0.0.0", PORT))?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let cg = TestCgroup::new()?;
    let _back = MoveBack::into(&cg)?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;

    let conf = conf(100_000);
    let allowed = destinations();
    // Denials: the same 100,000 networks, every one for port 443 only, and connects to port
    // 9000 (the random port-less prefixes of `conf` cover the whole address space).
    let deny_conf = cidr_conf(conf.matches.iter().filter_map(|m| match m.net {
        Some(ipnet::IpNet::V4(n)) => Some((n, Some(443))),
        _ => None,
    }));
    let denied = allowed[0];

    struct Config {
        label: &'static str,
        object: Option<&'static [u8]>,
        level: BpfLogLevel,
    }
    let mut configs = Vec::new();
    if before.is_some() {
        configs.push(Config {
            label: "before: no log calls",
            object: before,
            level: BpfLogLevel::Off,
        });
    }
    configs.push(Config {
        label: "aya-log, level off",
        object: None,
        level: BpfLogLevel::Off,
    });
    configs.push(Config {
        label: "aya-log, level debug (no reader)",
        object: None,
        level: BpfLogLevel::Debug,
    });
    // (allowed ns per call, denied ns per call) per round, and sizes.
    let mut allowed_ns: Vec<Vec<f64>> = vec![vec![]; configs.len()];
    let mut denied_ns: Vec<Vec<f64>> = vec![vec![]; configs.len()];
    let mut sizes: Vec<(u32, u32)> = vec![(0, 0); configs.len()];
    measure(&allowed, allowed_count / 10)?; // warm up, no program
    for round in 0..rounds {
        for (i, c) in configs.iter().enumerate() {
            let mut k = Kernel::load_with(
                Capacities::default(),
                0,
                0,
                Default::default(),
                None,
                LoadOptions {
                    bpf_log_level: c.level,
                    object: c.object,
                },
            )?;
            let p = plan::compile(
                k.next_generation(),
                &[(cg.id(), &conf)],
                &PlanOptions::default(),
            );
            k.apply(p)?;
            k.attach(cg.path())?;
            if let Some(info) = k.program_info("passthrough_connect4") {
                sizes[i] = (
                    info.size_translated().unwrap_or(0) / 8,
                    info.verified_instruction_count().unwrap_or(0),
                );
            }
            let per_call = |k: &Kernel, f: &mut dyn FnMut() -> anyhow::Result<()>| {
                let (t0, n0) = k.program_stats("passthrough_connect4").unwrap_or_default();
                f()?;
                let (t1, n1) = k.program_stats("passthrough_connect4").unwrap_or_default();
                anyhow::ensure!(n1 > n0, "connect4 did not run");
                Ok::<f64, anyhow::Error>((t1 - t0).as_nanos() as f64 / (n1 - n0) as f64)
            };
            let a = per_call(&k, &mut || measure(&allowed, allowed_count).map(drop))?;
            let p = plan::compile(
                k.next_generation(),
                &[(cg.id(), &deny_conf)],
                &PlanOptions::default(),
            );
            k.apply(p)?;
            let d = per_call(&k, &mut || {
                for _ in 0..denied_count {
                    match passthrough_tests::bench::connect_once(denied)? {
                        Err((_, libc::EPERM)) => {}
                        other => anyhow::bail!("{denied}: expected EPERM, got {other:?}"),
                    }
                }
                Ok(())
            })?;
            eprintln!(
                "round {round}: {:<34} allowed {a:>6.1} ns/call, denied {d:>6.1} ns/call",
                c.label
            );
            allowed_ns[i].push(a);
            denied_ns[i].push(d);
        }
    }
    drop(_back);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n## aya-log in the programs: connect4 time per call, 100,000 CIDR matches ({rounds} interleaved rounds; {allowed_count} allowed and {denied_count} denied connects per round; medians, min–max)\n"
    )?;
    writeln!(
        out,
        "| programs | allowed ns/call | denied ns/call | connect4 instructions (translated) | instructions verified |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    let spread = |v: &Vec<f64>| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0f64, f64::max);
        format!("{:.1} ({lo:.1}–{hi:.1})", median(v.clone()))
    };
    for (i, c) in configs.iter().enumerate() {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            c.label,
            spread(&allowed_ns[i]),
            spread(&denied_ns[i]),
            sizes[i].0,
            sizes[i].1
        )?;
    }
    if before.is_some() {
        let ratio = |v: &Vec<Vec<f64>>| {
            median(
                v[1].iter()
                    .zip(&v[0])
                    .map(|(after, before)| after / before)
                    .collect(),
            )
        };
        writeln!(
            out,
            "\nlevel off ÷ before, median of per-round ratios: allowed {:.3}, denied {:.3}",
            ratio(&allowed_ns),
            ratio(&denied_ns)
        )?;
    }
    drop(ns);
    Ok(())
}
