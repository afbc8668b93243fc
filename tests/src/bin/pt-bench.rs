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
//! setsockopt program per `setsockopt(TCP_NODELAY)` (an option it lets through), and inside the
//! backstop per UDP datagram to loopback: plain IPv4 and IPv6 ones, and ones carrying an IPv4
//! option or an IPv6 extension header that does not route (which the backstop walks).
//!
//! Two more rows at 1,000 matches measure the monitor's report of allowed decisions in the
//! same interleaved rounds: the programs built without it (`--baseline-object`, the
//! `no-monitor` build `cargo xtask bench connect` makes) against the normal ones with nobody
//! watching (the "1000 CIDR matches" row), and with a watcher (the `CONFIG` flag on, every
//! decision reported into the ring, which a thread drains).
//!
//! `monitor`: the agent's cost of one watcher. The real agent enforces a policy on a test
//! cgroup; this process, inside it and inside a private network namespace, makes 10,000
//! allowed decisions a second (connected UDP sockets to AnyIP addresses: one connect4 run each,
//! no handshake); rounds alternate no watcher / one watcher reading `GET /monitor`, and the
//! agent's CPU time (utime + stime) is read around each. Then a flood, as fast as one thread
//! goes, with a watcher: what was delivered, sampled and lost.
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
use passthrough_user::kernel::{Kernel, LoadOptions, ProxySettings};

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

/// What one row of the connect bench loads.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// No program attached.
    None,
    /// `confs[i]` with the normal programs (nobody watching).
    Conf(usize),
    /// `confs[i]` with the programs built without the monitor's report (`--baseline-object`).
    Baseline(usize),
    /// `confs[i]` with a watcher: `flags::MONITOR` on, the ring drained by a thread.
    Watched(usize),
}

struct Row {
    label: String,
    kind: Kind,
    p50: Vec<f64>,
    p99: Vec<f64>,
    /// Mean time inside connect4 per call (kernel BPF statistics), per round.
    prog_ns: Vec<f64>,
    /// Time inside sock_ops per connect (it runs for several events of each connection).
    sockops_ns: Vec<f64>,
    /// Monitor events a watched row's drain thread received, per round.
    observed: Vec<u64>,
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

/// The datagrams [`datagrams`] sends: plain ones (the common packet) and ones with options or
/// extension headers that do not route (the backstop walks them and lets them pass).
const DATAGRAMS: [&str; 4] = [
    "UDP/IPv4, no options",
    "UDP/IPv4, record route option",
    "UDP/IPv6, no extension header",
    "UDP/IPv6, destination options header",
];

/// Sends `n` datagrams of kind `DATAGRAMS[kind]` to a loopback receiver (loopback is exempt
/// from the decision, so sendmsg4/6 allow it and every datagram reaches the egress backstop).
fn datagrams(kind: usize, n: usize) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let v6 = kind >= 2;
    let (domain, local): (socket2::Domain, SocketAddr) = if v6 {
        (socket2::Domain::IPV6, "[::1]:0".parse()?)
    } else {
        (socket2::Domain::IPV4, "127.0.0.1:0".parse()?)
    };
    let rx = std::net::UdpSocket::bind(local)?;
    let to = socket2::SockAddr::from(rx.local_addr()?);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    let (level, name, val): (i32, i32, &[u8]) = match kind {
        // Record route with one slot, padded with end-of-list.
        1 => (
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            &[7, 7, 4, 0, 0, 0, 0, 0],
        ),
        // One PadN option (needs CAP_NET_RAW: the bench runs as root).
        3 => (
            libc::IPPROTO_IPV6,
            libc::IPV6_DSTOPTS,
            &[0, 0, 1, 4, 0, 0, 0, 0],
        ),
        _ => (0, 0, &[]),
    };
    if !val.is_empty() {
        // SAFETY: a live buffer and its length.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                name,
                val.as_ptr().cast(),
                val.len() as u32,
            )
        };
        anyhow::ensure!(
            rc == 0,
            "setsockopt for {}: {}",
            DATAGRAMS[kind],
            std::io::Error::last_os_error()
        );
    }
    let mut buf = [0u8; 64];
    rx.set_nonblocking(true)?;
    for _ in 0..n {
        s.send_to(b"pt-bench", &to)?;
        // Keep the receive queue short (drops would not matter, but this stays realistic).
        while rx.recv(&mut buf).is_ok() {}
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let baseline = args
        .iter()
        .position(|a| a == "--baseline-object")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let which = args
        .iter()
        .enumerate()
        .find(|(i, a)| {
            // Not the value of an option that takes one.
            !a.starts_with("--")
                && (*i == 0
                    || !["--baseline-object", "--before-object"].contains(&args[i - 1].as_str()))
        })
        .map(|(_, a)| a.clone())
        .unwrap_or_else(|| "all".into());
    match which.as_str() {
        "all" => {
            connect(quick, baseline.as_deref())?;
            monitor(quick)
        }
        "connect" => connect(quick, baseline.as_deref()),
        "monitor" => monitor(quick),
        "bpf-log" => bpf_log(&args),
        _ => anyhow::bail!("unknown bench {which:?}; one of: connect, monitor, bpf-log, all"),
    }
}

/// The eBPF object at `path`, in memory aligned for the ELF parser.
fn read_object(path: &std::path::Path) -> anyhow::Result<&'static [u8]> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: the u64 buffer is at least as long as `bytes` and u8-writable.
    let dst =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes.len()) };
    dst.copy_from_slice(&bytes);
    let len = bytes.len();
    let words: &'static mut [u64] = words.leak();
    // SAFETY: as above; leaked, so 'static.
    Ok(unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), len) })
}

/// Drains a monitor ring in a thread until `stop`; returns how many events it read.
fn drain(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut ring = ring;
        let mut n = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut got = false;
            while let Some(item) = ring.next() {
                drop(item);
                n += 1;
                got = true;
            }
            if !got {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        while ring.next().is_some() {
            n += 1;
        }
        n
    })
}

fn connect(quick: bool, baseline: Option<&std::path::Path>) -> anyhow::Result<()> {
    let rounds = if quick { 1 } else { 3 };
    let count = if quick { 3_000 } else { 30_000 };
    let baseline = baseline.map(read_object).transpose()?;

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
    let one_k = SIZES
        .iter()
        .position(|n| *n == 1_000)
        .expect("a 1,000-match size");
    let mut kinds: Vec<(String, Kind)> = vec![("no program".into(), Kind::None)];
    kinds.extend(
        SIZES
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("{n} CIDR matches"), Kind::Conf(i))),
    );
    kinds.push((
        "100000 CIDR + 1 Domain (sock_ops on)".into(),
        Kind::Conf(SIZES.len()),
    ));
    if baseline.is_some() {
        kinds.push((
            "1000 CIDR, built without the monitor".into(),
            Kind::Baseline(one_k),
        ));
    }
    kinds.push((
        "1000 CIDR, one watcher (every decision reported)".into(),
        Kind::Watched(one_k),
    ));
    let mut rows: Vec<Row> = kinds
        .into_iter()
        .map(|(label, kind)| Row {
            label,
            kind,
            p50: vec![],
            p99: vec![],
            prog_ns: vec![],
            sockops_ns: vec![],
            egress_ns: vec![],
            observed: vec![],
        })
        .collect();
    let mut compile_ms = vec![];
    let mut load_ms = vec![];
    let mut prog_load_ms = vec![];
    let mut setsockopt_ns = vec![];
    let mut datagram_ns: Vec<Vec<f64>> = vec![vec![]; DATAGRAMS.len()];
    for round in 0..rounds {
        for row in rows.iter_mut() {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut drainer = None;
            let _kernel = match row.kind {
                Kind::None => None,
                Kind::Conf(i) | Kind::Baseline(i) | Kind::Watched(i) => {
                    let t = Instant::now();
                    let proxy = if i == SIZES.len() {
                        // No listener is needed: nothing is redirected, the flag only arms
                        // sock_ops.
                        ProxySettings {
                            host_port: 1,
                            ..Default::default()
                        }
                    } else {
                        Default::default()
                    };
                    let object = match row.kind {
                        Kind::Baseline(_) => baseline,
                        _ => None,
                    };
                    let mut k = Kernel::load(LoadOptions {
                        proxy,
                        object,
                        ..LoadOptions::default()
                    })?;
                    let t_prog = t.elapsed();
                    let t = Instant::now();
                    let p = plan::compile(
                        k.next_generation(),
                        &[(cg.id(), &confs[i])],
                        &PlanOptions::default(),
                    );
                    let t_compile = t.elapsed();
                    let t = Instant::now();
                    k.apply(p)?;
                    let t_load = t.elapsed();
                    if row.kind == Kind::Watched(i) {
                        let (ring, _drops) = k.take_monitor().context("monitor ring")?;
                        drainer = Some(drain(ring, stop.clone()));
                        k.set_monitor(true, 0)?;
                    }
                    k.attach(cg.path())?;
                    if row.kind == Kind::Conf(i) && i < SIZES.len() && SIZES[i] == 100_000 {
                        prog_load_ms.push(t_prog.as_secs_f64() * 1e3);
                        compile_ms.push(t_compile.as_secs_f64() * 1e3);
                        load_ms.push(t_load.as_secs_f64() * 1e3);
                    }
                    Some(k)
                }
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
                if matches!(row.kind, Kind::Conf(i) if i < SIZES.len() && SIZES[i] == 100_000) {
                    let before = k.program_stats("passthrough_setsockopt");
                    setsockopts(count * 10)?;
                    if let Some(ns) = per_run(before, k.program_stats("passthrough_setsockopt")) {
                        setsockopt_ns.push(ns);
                    }
                    for (kind, out) in datagram_ns.iter_mut().enumerate() {
                        let before = k.program_stats("passthrough_skb_egress");
                        datagrams(kind, count * 2)?;
                        if let Some(ns) = per_run(before, k.program_stats("passthrough_skb_egress"))
                        {
                            out.push(ns);
                        }
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
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(d) = drainer {
                row.observed.push(d.join().unwrap_or(0));
            }
            row.p50.push(percentile(&samples, 0.5) as f64);
            row.p99.push(percentile(&samples, 0.99) as f64);
            eprintln!(
                "round {round}: {:<50} p50 {:>7} ns  p99 {:>7} ns  connect4 {:>5.0} ns",
                row.label,
                percentile(&samples, 0.5),
                percentile(&samples, 0.99),
                row.prog_ns.last().copied().unwrap_or(0.0),
            );
        }
    }
    drop(_back);

    let base50 = median(rows[0].p50.clone());
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
    if datagram_ns.iter().all(|v| !v.is_empty()) {
        writeln!(
            out,
            "\negress backstop per datagram to loopback, 100,000 CIDR matches (median of {rounds} rounds × {} datagrams):\n",
            count * 2
        )?;
        writeln!(out, "| datagram | egress ns/packet |\n|---|---:|")?;
        for (label, v) in DATAGRAMS.iter().zip(&datagram_ns) {
            writeln!(out, "| {label} | {:.0} |", median(v.clone()))?;
        }
    }
    // The monitor's report: connect4 per connect with the programs built without it, against
    // the same plan with the normal programs and nobody watching, round by round.
    let find = |k: Kind| rows.iter().find(|r| r.kind == k);
    if let (Some(base), Some(off), Some(on)) = (
        find(Kind::Baseline(one_k)),
        find(Kind::Conf(one_k)),
        find(Kind::Watched(one_k)),
    ) {
        let diffs: Vec<f64> = off
            .prog_ns
            .iter()
            .zip(&base.prog_ns)
            .map(|(a, b)| a - b)
            .collect();
        let on_diffs: Vec<f64> = on
            .prog_ns
            .iter()
            .zip(&base.prog_ns)
            .map(|(a, b)| a - b)
            .collect();
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{lo:+.1} … {hi:+.1}")
        };
        writeln!(
            out,
            "\n## The monitor's report of allowed decisions: connect4 ns per connect at 1,000 matches ({rounds} interleaved rounds × {count} connects)\n"
        )?;
        writeln!(
            out,
            "| programs | connect4 ns/connect (median) | minus built without the monitor, per round: median (range) | events reported per round |"
        )?;
        writeln!(out, "|---|---:|---:|---:|")?;
        writeln!(
            out,
            "| built without the monitor | {:.1} | – | – |",
            median(base.prog_ns.clone())
        )?;
        writeln!(
            out,
            "| normal, nobody watching | {:.1} | {:+.1} ({}) | 0 |",
            median(off.prog_ns.clone()),
            median(diffs.clone()),
            range(&diffs)
        )?;
        writeln!(
            out,
            "| normal, one watcher | {:.1} | {:+.1} ({}) | {:.0} |",
            median(on.prog_ns.clone()),
            median(on_diffs.clone()),
            range(&on_diffs),
            median(on.observed.iter().map(|n| *n as f64).collect())
        )?;
    }
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
    use passthrough_user::kernel::BpfLogLevel;
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
            let mut k = Kernel::load(LoadOptions {
                bpf_log_level: c.level,
                object: c.object,
                ..LoadOptions::default()
            })?;
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

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// One allowed decision: a connected UDP socket (connect4 runs once, nothing is sent).
fn udp_connect(dst: SocketAddr) -> anyhow::Result<()> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect(dst).with_context(|| format!("connect {dst}"))?;
    Ok(())
}

/// `rate` decisions a second (0: as fast as possible) for `secs`; returns how many were made.
fn load(dsts: &[SocketAddr], rate: u64, secs: f64) -> anyhow::Result<u64> {
    let start = Instant::now();
    let end = std::time::Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while start.elapsed() < end {
        if rate > 0 {
            // Batches of one millisecond's worth, then wait for the next millisecond.
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            if n >= due {
                std::thread::sleep(std::time::Duration::from_micros(500));
                continue;
            }
            let until = due.min(n + rate / 100 + 1);
            while n < until {
                udp_connect(dsts[n as usize % dsts.len()])?;
                n += 1;
            }
        } else {
            udp_connect(dsts[n as usize % dsts.len()])?;
            n += 1;
        }
    }
    Ok(n)
}

/// What a watcher got: decision lines, lines marked sampled (and the factor), lost reports.
#[derive(Default, Debug, Clone, Copy)]
struct Seen {
    decisions: u64,
    sampled_weight: u64,
    lost: u64,
    /// The largest sampling factor a record carried (1: none sampled).
    max_sampled: u64,
}

/// A watcher reading `GET /monitor` in a thread until stopped.
struct BenchWatcher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Seen>>,
}

impl BenchWatcher {
    fn start(admin: SocketAddr) -> anyhow::Result<Self> {
        use std::io::{BufRead as _, Write as _};
        let mut s = std::net::TcpStream::connect(admin)?;
        write!(s, "GET /monitor HTTP/1.0\r\nHost: bench\r\n\r\n")?;
        s.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
        let mut r = std::io::BufReader::new(s);
        // Status, headers, the hello line: the subscription is live once it arrived.
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line)?;
            if line.starts_with("{\"monitor\"") {
                break;
            }
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                let v: serde_json::Value = match serde_json::from_str(line.trim()) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                if let Some(n) = v["lost"].as_u64() {
                    seen.lost += n;
                } else if v["dst"].is_string() {
                    seen.decisions += 1;
                    let weight = v["sampled"].as_u64().unwrap_or(1);
                    seen.sampled_weight += weight;
                    seen.max_sampled = seen.max_sampled.max(weight);
                }
            }
            Ok(seen)
        });
        Ok(Self { stop, thread })
    }

    fn finish(self) -> anyhow::Result<Seen> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("watcher thread panicked"))?
    }
}

/// Allowed kernel decisions counted by the programs (`address_match`), from `/metrics`.
fn kernel_allowed(agent: &passthrough_tests::Agent) -> f64 {
    agent.metric(
        "passthrough_kernel_decisions_total",
        "reason=\"address_match\"",
    )
}

fn monitor(quick: bool) -> anyhow::Result<()> {
    const RATE: u64 = 10_000;
    let rounds = if quick { 1 } else { 5 };
    let secs = if quick { 2.0 } else { 5.0 };
    let dir = tempfile::tempdir()?;
    let policy = passthrough_tests::write_policy(
        dir.path(),
        "apiVersion: kuma.io/v1alpha1\nkind: MeshPassthrough\nmetadata: {name: bench, labels: {kuma.io/mesh: default}}\nspec:\n  targetRef: {kind: Mesh}\n  default:\n    passthroughMode: Matched\n    appendMatch:\n      - {type: CIDR, value: 198.51.100.0/24}\n",
    );
    let ns = BenchNs::new(&["198.51.100.0/24"])?;
    let cg = TestCgroup::new()?;
    // The agent first (it must not be in the workload cgroup), then this process moves in.
    let agent = passthrough_tests::Agent::builder()
        .policy(&policy)
        .cgroup(cg.path())
        .arg("--proxy-port")
        .arg("0")
        .start()?;
    let pid = agent.pid();
    let admin = agent.admin_addr();
    let dsts: Vec<SocketAddr> = (1..=254u8)
        .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, i)), 9))
        .collect();
    // The load runs in threads inside the namespace; this thread stays in the host's, where
    // the agent's admin address is.
    let _back = MoveBack::into(&cg)?;
    let run_load = |rate: u64, secs: f64| -> anyhow::Result<u64> {
        std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter_current_thread()?;
                load(&dsts, rate, secs)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?
        })
    };
    run_load(RATE, 0.5)?; // warm up

    struct Phase {
        made: u64,
        wall: f64,
        cpu: f64,
        seen: Option<Seen>,
    }
    let mut quiet: Vec<Phase> = Vec::new();
    let mut watched: Vec<Phase> = Vec::new();
    for round in 0..rounds {
        for with_watcher in [false, true] {
            let w = if with_watcher {
                let w = BenchWatcher::start(admin)?;
                Some(w)
            } else {
                None
            };
            let c0 = cpu_seconds(pid)?;
            let t = Instant::now();
            let made = run_load(RATE, secs)?;
            // Let the agent deliver what is in flight before stopping the clock.
            std::thread::sleep(std::time::Duration::from_millis(200));
            let cpu = cpu_seconds(pid)? - c0;
            let wall = t.elapsed().as_secs_f64();
            let seen = w.map(BenchWatcher::finish).transpose()?;
            eprintln!(
                "round {round}: watcher {with_watcher:<5} {made} decisions in {wall:.2} s, agent CPU {:.2} % of a core{}",
                100.0 * cpu / wall,
                seen.map(|s| format!(", watcher got {} (lost {})", s.decisions, s.lost))
                    .unwrap_or_default()
            );
            let p = Phase {
                made,
                wall,
                cpu,
                seen,
            };
            if with_watcher {
                watched.push(p);
            } else {
                quiet.push(p);
            }
        }
    }

    // A flood with one watcher: as fast as this thread goes.
    let w = BenchWatcher::start(admin)?;
    let k0 = kernel_allowed(&agent);
    let c0 = cpu_seconds(pid)?;
    let t = Instant::now();
    let made = run_load(0, secs)?;
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let cpu = cpu_seconds(pid)? - c0;
    let wall = t.elapsed().as_secs_f64();
    let seen = w.finish()?;
    let counted = kernel_allowed(&agent) - k0;
    drop(_back);

    let pct = |v: &[Phase]| median(v.iter().map(|p| 100.0 * p.cpu / p.wall).collect());
    let rate = |v: &[Phase]| median(v.iter().map(|p| p.made as f64 / p.wall).collect());
    let added: Vec<f64> = watched
        .iter()
        .zip(&quiet)
        .map(|(w, q)| 100.0 * (w.cpu / w.wall - q.cpu / q.wall))
        .collect();
    // The watcher's CPU per decision: what the watched phase spent beyond the quiet phase's
    // rate over the same wall time, divided by the decisions made.
    let per_decision_us: Vec<f64> = watched
        .iter()
        .zip(&quiet)
        .map(|(w, q)| 1e6 * (w.cpu - q.cpu / q.wall * w.wall) / w.made.max(1) as f64)
        .collect();
    let delivered: Vec<f64> = watched
        .iter()
        .filter_map(|p| p.seen.map(|s| s.decisions as f64 / p.made.max(1) as f64))
        .collect();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n## The agent's cost of one watcher ({rounds} interleaved rounds × {secs} s at {RATE} allowed decisions/s, medians)\n"
    )?;
    writeln!(
        out,
        "| phase | decisions/s made | agent CPU, % of one core | delivered to the watcher |"
    )?;
    writeln!(out, "|---|---:|---:|---:|")?;
    writeln!(
        out,
        "| no watcher | {:.0} | {:.2} | – |",
        rate(&quiet),
        pct(&quiet)
    )?;
    writeln!(
        out,
        "| one watcher (`GET /monitor`, every record) | {:.0} | {:.2} | {:.1} % |",
        rate(&watched),
        pct(&watched),
        100.0 * median(delivered)
    )?;
    writeln!(
        out,
        "| **added by the watcher** (per round: watched − quiet) | | **{:.2}** (range {:.2} … {:.2}) | |",
        median(added.clone()),
        added.iter().copied().fold(f64::INFINITY, f64::min),
        added.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )?;
    writeln!(
        out,
        "| **agent CPU per decision for the watcher** (per round) | | **{:.2} µs** (range {:.2} … {:.2}) | |",
        median(per_decision_us.clone()),
        per_decision_us
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min),
        per_decision_us
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max),
    )?;
    writeln!(
        out,
        "\n## Flood with one watcher ({secs} s, one thread as fast as it goes)\n"
    )?;
    writeln!(out, "| figure | value |\n|---|---:|")?;
    writeln!(
        out,
        "| allowed decisions made (this process) | {made} ({:.0}/s) |",
        made as f64 / wall
    )?;
    writeln!(
        out,
        "| allowed decisions counted by the programs | {counted:.0} |"
    )?;
    writeln!(
        out,
        "| records delivered to the watcher | {} |",
        seen.decisions
    )?;
    writeln!(
        out,
        "| decisions those records stand for (sampling weight) | {} |",
        seen.sampled_weight
    )?;
    writeln!(
        out,
        "| reported lost (ring full, watcher behind) | {} |",
        seen.lost
    )?;
    writeln!(
        out,
        "| sparsest sampling a record carried: 1 in | {} |",
        seen.max_sampled
    )?;
    writeln!(
        out,
        "| agent CPU, % of one core | {:.1} |",
        100.0 * cpu / wall
    )?;
    drop(agent);
    drop(cg);
    drop(ns);
    Ok(())
}
