//! `pt-bench-compare-l4`: the kernel path side by side (issue 7, point 2).
//!
//! Method. Everything runs in a private network namespace whose `lo` carries AnyIP local routes
//! for `0.0.0.0/1` (so every destination is a local listener; nft, iptables and ipset state is
//! per namespace and never touches the host). An accept-and-close server thread is pinned to
//! CPU0; the client (this process's main thread, inside a test cgroup v2 directory) is pinned to
//! CPU1 and times only the blocking `connect()` syscall, then closes with `SO_LINGER{1,0}` (RST,
//! no TIME_WAIT). Every filter does the same job: an **allow list** of N IPv4 CIDRs (N = 10 …
//! 1,000,000), TCP to anything else is refused. The prefixes are /24–/32 (nine lengths), one per
//! distinct random /24 of 1–126.x.x.x (10/8 excluded), so they never overlap (nft interval sets
//! refuse overlaps). Destinations are hosts inside prefixes of the set: `fixed` = one host in the
//! prefix loaded *last* (a linear rule list walks all N rules, as for a deny-list miss);
//! `rotating` = one host in each of min(N, 65,536) prefixes, visited in shuffled order (lookups
//! walk different trie paths: the cache-cold case). The deny path connects to `10.0.0.1`.
//! Modes: `none`; `ours` (the real loader, `Kernel::apply`, workload in `Matched` mode: N
//! port-less CIDR matches); `nft-set` (`ip daddr != @allow meta l4proto tcp reject with tcp
//! reset`, interval set); `nft-set-ct` (same table plus `ct state established,related accept`
//! first: only a connection's first packet consults the set, every packet pays conntrack);
//! `nft-linear` (one `ip daddr P accept` per prefix, then the reject); `ipt-linear`
//! (iptables-legacy, one `-d P -j ACCEPT` per prefix, then `REJECT --reject-with tcp-reset`);
//! `ipset` (hash:net + one iptables-legacy `! --match-set` rule). The rejects spare RSTs: on
//! loopback a refused connection's source address is the refused destination itself, so the
//! filter would otherwise drop its own reset and the client would hang in SYN-SENT. Netfilter filters sit on
//! OUTPUT, which a loopback connection crosses 4 times (SYN, SYN-ACK, ACK, RST); ours runs once
//! per connect. Rounds are interleaved (none, then every mode at every size), the `none`
//! baseline is measured in every round. Linear modes get fewer connects at 10,000+ rules and
//! are skipped at 1,000,000 (minutes per connect batch and per load). CPU per connect is the
//! client thread's `CLOCK_THREAD_CPUTIME_ID` (the loopback softirq work of the handshake runs in
//! the connecting thread and is included unless the kernel accounts IRQ time separately).
//! Load = time until the full set is enforced (ours: plan compile + map writes + generation
//! flip; nft `-f`; `ipset restore` + rule; `iptables-legacy-restore`); replace = swapping in a
//! different set of the same size that keeps the destination prefixes, while a second thread
//! (CPU1) keeps connecting: its max/p99 connect latency during the replace shows stalls. Ours
//! replaces twice and reports the second; `replace_ms` is until the new set is enforced
//! (compile + batched map writes + flip), `retire_ms` the deletion of the old generation right
//! after (`Kernel::retire`); also how long the kernel takes to free the tries at exit.
//! BPF ns/run (connect4, `BPF_ENABLE_STATS`) is a separate pass. Map memory: ours = the rule
//! tries' kernel `memlock` accounting; ipset = `ipset list -t` "Size in memory".
//!
//! Output: JSON lines `{"part":"l4","table","row","size","round","metric","value"}` to `--out`
//! (default `target/bench/compare-l4.jsonl`, truncated at start); a summary on stderr.
//! Flags: `--quick` (sizes 10 and 1,000, one round, few connects), `--rounds N`, `--out PATH`,
//! `--sizes a,b,c`, `--modes ours,nft-set,…` (a subset of the filters).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::Ipv4Net;
use passthrough_policy::plan::{self, PlanOptions};
use passthrough_tests::{
    TestCgroup,
    bench::{
        BenchNs, JsonOut, MoveBack, Rng, cidr_conf, connect_once, median, pin_to_cpu, thread_cpu_ns,
    },
    unique_suffix,
};
use passthrough_user::kernel::{Kernel, LoadOptions};

const PORT: u16 = 9000;
const DENY_DST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const FULL_SIZES: [usize; 5] = [10, 1_000, 10_000, 100_000, 1_000_000];
const QUICK_SIZES: [usize; 2] = [10, 1_000];
/// Most rotating destinations (distinct prefixes visited).
const MAX_ROTATING: usize = 65_536;
/// Linear rule lists above this size are skipped (a batch of connects and one load take minutes).
const LINEAR_MAX: usize = 100_000;

/// The filters compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Ours,
    NftSet,
    NftSetCt,
    NftLinear,
    IptLinear,
    Ipset,
}

impl Mode {
    const FILTERS: [Mode; 6] = [
        Mode::Ours,
        Mode::NftSet,
        Mode::NftSetCt,
        Mode::NftLinear,
        Mode::IptLinear,
        Mode::Ipset,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Ours => "ours",
            Mode::NftSet => "nft-set",
            Mode::NftSetCt => "nft-set-ct",
            Mode::NftLinear => "nft-linear",
            Mode::IptLinear => "ipt-linear",
            Mode::Ipset => "ipset",
        }
    }

    fn linear(self) -> bool {
        matches!(self, Mode::NftLinear | Mode::IptLinear)
    }
}

/// Command-line settings.
struct Args {
    quick: bool,
    rounds: usize,
    out: PathBuf,
    sizes: Vec<usize>,
    /// Filters to compare (`none` is always measured).
    modes: Vec<Mode>,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Args {
            quick: false,
            rounds: 3,
            out: PathBuf::from("target/bench/compare-l4.jsonl"),
            sizes: FULL_SIZES.to_vec(),
            modes: Mode::FILTERS.to_vec(),
        };
        let mut rounds_set = false;
        let mut sizes_set = false;
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => args.quick = true,
                "--rounds" => {
                    args.rounds = it
                        .next()
                        .context("--rounds N")?
                        .parse()
                        .context("--rounds N")?;
                    rounds_set = true;
                }
                "--out" => args.out = PathBuf::from(it.next().context("--out PATH")?),
                "--sizes" => {
                    args.sizes = it
                        .next()
                        .context("--sizes a,b,c")?
                        .split(',')
                        .map(|s| s.trim().replace('_', "").parse::<usize>())
                        .collect::<Result<_, _>>()
                        .context("--sizes a,b,c")?;
                    sizes_set = true;
                }
                "--modes" => {
                    let list = it.next().context("--modes a,b")?;
                    args.modes = list
                        .split(',')
                        .map(|name| {
                            Mode::FILTERS
                                .into_iter()
                                .find(|m| m.name() == name.trim())
                                .with_context(|| format!("unknown mode {name:?}"))
                        })
                        .collect::<anyhow::Result<_>>()?;
                }
                other => bail!(
                    "unknown argument {other:?}; flags: --quick, --rounds N, --out PATH, --sizes a,b,c, --modes a,b"
                ),
            }
        }
        if args.quick {
            if !rounds_set {
                args.rounds = 1;
            }
            if !sizes_set {
                args.sizes = QUICK_SIZES.to_vec();
            }
        }
        if args.rounds == 0 || args.sizes.iter().any(|n| *n == 0 || *n > 4_000_000) {
            bail!("--rounds must be ≥ 1 and sizes within 1..=4,000,000");
        }
        Ok(args)
    }

    /// Connects per (mode, size, destination kind) measurement.
    fn connects(&self, mode: Mode, size: usize) -> usize {
        let base = if self.quick { 500 } else { 20_000 };
        if mode.linear() && size > 1_000 {
            // ~18 ns (nft) / ~3.4 ns (iptables) per rule per packet, 4 packets per connect.
            (base * 1_000 / size).max(100)
        } else {
            base
        }
    }

    fn deny_connects(&self) -> usize {
        if self.quick { 100 } else { 2_000 }
    }
}

/// JSON-lines writer for the renderer (rows are modes).
struct Output(JsonOut);

impl Output {
    fn create(path: &Path) -> anyhow::Result<Self> {
        Ok(Output(JsonOut::create("l4", path)?))
    }

    fn record(
        &mut self,
        table: &str,
        mode: Mode,
        size: Option<usize>,
        round: usize,
        metric: &str,
        value: f64,
    ) -> anyhow::Result<()> {
        self.0.record(
            table,
            mode.name(),
            size.map(|s| s as u64),
            round,
            metric,
            value,
        )
    }
}

/// Index of a /24 slot usable for prefixes: 1–126.x.y.0, 10/8 excluded (the deny destination).
fn slot_ok(slot: u32) -> bool {
    let first = slot >> 16;
    (1..=126).contains(&first) && first != 10
}

/// `n` non-overlapping prefixes (/24–/32, each in its own /24), in load order. `keep` are
/// included first (then the order is shuffled).
fn prefixes(n: usize, seed: u64, keep: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let mut rng = Rng(seed | 1);
    let mut used = vec![0u64; (1 << 24) / 64];
    let mut out = Vec::with_capacity(n);
    for p in keep {
        let slot = u32::from(p.addr()) >> 8;
        used[slot as usize / 64] |= 1 << (slot % 64);
        out.push(*p);
    }
    while out.len() < n {
        let r = rng.next_u64();
        let slot = (r >> 40) as u32 & 0x00ff_ffff;
        if !slot_ok(slot) || used[slot as usize / 64] & (1 << (slot % 64)) != 0 {
            continue;
        }
        used[slot as usize / 64] |= 1 << (slot % 64);
        let len = 24 + (r % 9) as u8;
        let host_bits = 32 - u32::from(len);
        let offset = ((r >> 8) as u32 & 0xff) >> host_bits << host_bits;
        let net = Ipv4Net::new(Ipv4Addr::from((slot << 8) | offset), len).expect("len ≤ 32");
        out.push(net);
    }
    rng.shuffle(&mut out);
    out
}

/// A host inside `net` (not its network address when there is room).
fn host_in(net: Ipv4Net) -> SocketAddr {
    let base = u32::from(net.addr());
    let ip = if net.prefix_len() < 32 {
        base + 1
    } else {
        base
    };
    SocketAddr::from((Ipv4Addr::from(ip), PORT))
}

/// One prefix set and the destinations measured against it.
struct Workload {
    nets: Vec<Ipv4Net>,
    fixed: SocketAddr,
    rotating: Vec<SocketAddr>,
    /// The prefixes holding the destinations (kept by the replacement set).
    dest_nets: Vec<Ipv4Net>,
}

impl Workload {
    fn new(n: usize) -> Self {
        let nets = prefixes(n, 0x9e37_79b9_7f4a_7c15 ^ n as u64, &[]);
        let mut rng = Rng(0x5151 ^ n as u64);
        let last = nets[n - 1];
        let mut dest_nets: Vec<Ipv4Net> = if n <= MAX_ROTATING {
            nets.clone()
        } else {
            let mut idx: Vec<usize> = (0..n - 1).collect();
            rng.shuffle(&mut idx);
            idx.truncate(MAX_ROTATING - 1);
            idx.into_iter()
                .map(|i| nets[i])
                .chain(std::iter::once(last))
                .collect()
        };
        rng.shuffle(&mut dest_nets);
        Workload {
            fixed: host_in(last),
            rotating: dest_nets.iter().map(|n| host_in(*n)).collect(),
            nets,
            dest_nets,
        }
    }

    /// A different set of the same size that still allows every destination.
    fn replacement(&self, seed: u64) -> Vec<Ipv4Net> {
        prefixes(self.nets.len(), seed, &self.dest_nets)
    }
}

/// Results of one batch of connects.
struct Batch {
    sorted_ns: Vec<u64>,
    conn_per_s: f64,
    cpu_ns_per_connect: f64,
    /// Connects whose outcome was not the expected one (allowed failed / denied connected).
    unexpected: usize,
    /// errno of the first failure, for messages.
    first_errno: i32,
}

impl Batch {
    fn pct(&self, p: f64) -> f64 {
        self.sorted_ns[((self.sorted_ns.len() - 1) as f64 * p).round() as usize] as f64
    }
}

fn run_batch(dsts: &[SocketAddr], count: usize, expect_allowed: bool) -> anyhow::Result<Batch> {
    let mut ns = Vec::with_capacity(count);
    let mut unexpected = 0;
    let mut first_errno = 0;
    let cpu0 = thread_cpu_ns();
    let t = Instant::now();
    for i in 0..count {
        match connect_once(dsts[i % dsts.len()])? {
            Ok(v) => {
                ns.push(v);
                unexpected += usize::from(!expect_allowed);
            }
            Err((v, errno)) => {
                ns.push(v);
                unexpected += usize::from(expect_allowed);
                if first_errno == 0 {
                    first_errno = errno;
                }
            }
        }
    }
    let wall = t.elapsed().as_secs_f64();
    let cpu = thread_cpu_ns() - cpu0;
    ns.sort_unstable();
    Ok(Batch {
        sorted_ns: ns,
        conn_per_s: count as f64 / wall,
        cpu_ns_per_connect: cpu as f64 / count as f64,
        unexpected,
        first_errno,
    })
}

/// Connect latencies seen by a second thread while `f` runs (the replace-stall probe).
fn connecting_during<T>(
    dst: SocketAddr,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Vec<u64>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let prober = {
        let (stop, started) = (stop.clone(), started.clone());
        std::thread::spawn(move || -> anyhow::Result<Vec<u64>> {
            pin_to_cpu(1)?;
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = connect_once(dst)?;
                if started.load(Ordering::Relaxed) {
                    lat.push(match r {
                        Ok(ns) | Err((ns, _)) => ns,
                    });
                }
            }
            Ok(lat)
        })
    };
    // The replacer leaves CPU1 to the probe (children such as nft inherit this affinity).
    pin_to_cpu(0)?;
    std::thread::sleep(Duration::from_millis(20));
    started.store(true, Ordering::Relaxed);
    let r = f();
    stop.store(true, Ordering::Relaxed);
    let lat = prober
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))?;
    pin_to_cpu(1)?;
    let mut lat = lat?;
    lat.sort_unstable();
    Ok((r?, lat))
}

/// A loaded filter.
enum Loaded {
    Ours(Box<Kernel>),
    /// nft table name.
    Nft(String),
    Iptables,
    /// ipset set name (and the iptables rule referencing it).
    Ipset(String),
}

/// Timings of one full replace.
struct Replaced {
    /// Until the new set is enforced.
    enforced: Duration,
    /// Ours: the part of `enforced` spent compiling the plan (the rest: map writes and flip).
    compiled: Option<Duration>,
    /// Ours: deleting the retired generation after the flip ([`Kernel::retire`]).
    retired: Option<Duration>,
}

/// Everything the modes share: namespace, cgroup, scratch directory.
struct Bench {
    ns: BenchNs,
    cg: TestCgroup,
    tmp: tempfile::TempDir,
    name: String,
}

impl Bench {
    /// nft-set-ct: `ct state established,related accept` in front of the set's rule in `table`,
    /// so only a connection's first packet consults the set.
    fn gate_on_conntrack(&self, table: &str) -> anyhow::Result<()> {
        let rule = [
            "insert",
            "rule",
            "ip",
            table,
            "out",
            "ct",
            "state",
            "established,related",
            "accept",
        ];
        self.ns.exec("nft", &rule, None)?;
        Ok(())
    }

    fn file(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let p = self.tmp.path().join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }

    fn ours_plan(&self, k: &Kernel, nets: &[Ipv4Net]) -> plan::KernelPlan {
        let conf = cidr_conf(nets.iter().map(|n| (*n, None)));
        plan::compile(
            k.next_generation(),
            &[(self.cg.id(), &conf)],
            &PlanOptions::default(),
        )
    }

    fn nft_set_text(&self, table: &str, nets: &[Ipv4Net], replace: bool) -> String {
        let mut s = String::with_capacity(nets.len() * 20 + 512);
        if replace {
            s.push_str(&format!("flush set ip {table} allow\n"));
        } else {
            s.push_str(&format!(
                "add table ip {table}\nadd chain ip {table} out {{ type filter hook output priority 0; policy accept; }}\n\
                 add set ip {table} allow {{ type ipv4_addr; flags interval; }}\n\
                 add rule ip {table} out ip daddr != @allow meta l4proto tcp tcp flags & rst != rst reject with tcp reset\n"
            ));
        }
        for chunk in nets.chunks(5_000) {
            s.push_str(&format!("add element ip {table} allow {{ "));
            for (i, n) in chunk.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                s.push_str(&n.to_string());
            }
            s.push_str(" }\n");
        }
        s
    }

    fn nft_linear_text(&self, table: &str, nets: &[Ipv4Net], replace: bool) -> String {
        let mut s = String::with_capacity(nets.len() * 48 + 512);
        if replace {
            s.push_str(&format!("flush chain ip {table} out\n"));
        } else {
            s.push_str(&format!("add table ip {table}\nadd chain ip {table} out {{ type filter hook output priority 0; policy accept; }}\n"));
        }
        for n in nets {
            s.push_str(&format!("add rule ip {table} out ip daddr {n} accept\n"));
        }
        s.push_str(&format!("add rule ip {table} out meta l4proto tcp tcp flags & rst != rst reject with tcp reset\n"));
        s
    }

    fn ipt_text(&self, nets: &[Ipv4Net]) -> String {
        let mut s = String::with_capacity(nets.len() * 40 + 256);
        s.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        for n in nets {
            s.push_str(&format!("-A OUTPUT -d {n} -j ACCEPT\n"));
        }
        s.push_str(
            "-A OUTPUT -p tcp ! --tcp-flags RST RST -j REJECT --reject-with tcp-reset\nCOMMIT\n",
        );
        s
    }

    fn ipset_text(&self, set: &str, nets: &[Ipv4Net]) -> String {
        let mut s = String::with_capacity(nets.len() * 30 + 128);
        s.push_str(&format!(
            "create {set} hash:net family inet hashsize 65536 maxelem {}\n",
            (nets.len() * 2).max(65_536)
        ));
        for n in nets {
            s.push_str(&format!("add {set} {n}\n"));
        }
        s
    }

    /// Loads `mode` with `nets`; returns the handle and the time until the set was enforced.
    fn load(&self, mode: Mode, nets: &[Ipv4Net]) -> anyhow::Result<(Loaded, Duration)> {
        match mode {
            Mode::Ours => {
                let mut k = Kernel::load(LoadOptions::default())?;
                let t = Instant::now();
                let p = self.ours_plan(&k, nets);
                k.apply(p)?;
                let took = t.elapsed();
                k.attach(self.cg.path())?;
                Ok((Loaded::Ours(Box::new(k)), took))
            }
            Mode::NftSet | Mode::NftSetCt | Mode::NftLinear => {
                let table = format!("ptb_{}", self.name);
                let text = if mode == Mode::NftLinear {
                    self.nft_linear_text(&table, nets, false)
                } else {
                    self.nft_set_text(&table, nets, false)
                };
                let f = self.file("load.nft", &text)?;
                let t = Instant::now();
                self.ns.exec("nft", &["-f", &f.to_string_lossy()], None)?;
                let took = t.elapsed();
                if mode == Mode::NftSetCt {
                    self.gate_on_conntrack(&table)?;
                }
                Ok((Loaded::Nft(table), took))
            }
            Mode::IptLinear => {
                let f = self.file("load.ipt", &self.ipt_text(nets))?;
                let t = Instant::now();
                self.ns.exec("iptables-legacy-restore", &[], Some(&f))?;
                Ok((Loaded::Iptables, t.elapsed()))
            }
            Mode::Ipset => {
                let set = format!("ptb_{}", self.name);
                let f = self.file("load.ipset", &self.ipset_text(&set, nets))?;
                let t = Instant::now();
                self.ns.exec("ipset", &["restore"], Some(&f))?;
                self.ns.exec(
                    "iptables-legacy",
                    &[
                        "-A",
                        "OUTPUT",
                        "-p",
                        "tcp",
                        "-m",
                        "set",
                        "!",
                        "--match-set",
                        &set,
                        "dst",
                        "-m",
                        "tcp",
                        "!",
                        "--tcp-flags",
                        "RST",
                        "RST",
                        "-j",
                        "REJECT",
                        "--reject-with",
                        "tcp-reset",
                    ],
                    None,
                )?;
                Ok((Loaded::Ipset(set), t.elapsed()))
            }
            Mode::None => bail!("nothing to load for mode none"),
        }
    }

    /// Replaces the whole set atomically (ours: then deletes the retired generation).
    fn replace(
        &self,
        mode: Mode,
        loaded: &mut Loaded,
        nets: &[Ipv4Net],
    ) -> anyhow::Result<Replaced> {
        // Scratch files are written before the clock starts: only the tool's run is timed.
        let (cmd, args, stdin): (&str, Vec<String>, Option<PathBuf>) = match loaded {
            Loaded::Ours(k) => {
                let t = Instant::now();
                let p = self.ours_plan(k, nets);
                let compiled = t.elapsed();
                k.apply(p)?;
                let enforced = t.elapsed();
                let t = Instant::now();
                k.retire();
                return Ok(Replaced {
                    enforced,
                    compiled: Some(compiled),
                    retired: Some(t.elapsed()),
                });
            }
            Loaded::Nft(table) => {
                let text = if mode == Mode::NftLinear {
                    self.nft_linear_text(table, nets, true)
                } else {
                    self.nft_set_text(table, nets, true)
                };
                let f = self.file("replace.nft", &text)?;
                (
                    "nft",
                    vec!["-f".into(), f.to_string_lossy().into_owned()],
                    None,
                )
            }
            Loaded::Iptables => (
                "iptables-legacy-restore",
                vec![],
                Some(self.file("replace.ipt", &self.ipt_text(nets))?),
            ),
            Loaded::Ipset(set) => {
                let next = format!("{set}_n");
                let mut text = self.ipset_text(&next, nets);
                text.push_str(&format!("swap {set} {next}\ndestroy {next}\n"));
                (
                    "ipset",
                    vec!["restore".into()],
                    Some(self.file("replace.ipset", &text)?),
                )
            }
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = Instant::now();
        self.ns.exec(cmd, &args, stdin.as_deref())?;
        Ok(Replaced {
            enforced: t.elapsed(),
            compiled: None,
            retired: None,
        })
    }

    /// Removes the filter; for ours, returns how long the kernel took to free the tries.
    fn unload(&self, loaded: Loaded) -> anyhow::Result<Option<Duration>> {
        match loaded {
            Loaded::Ours(k) => {
                let ids: Vec<u32> = k
                    .rule_maps_memory()
                    .iter()
                    .map(|m| m.id)
                    .filter(|id| *id != 0)
                    .collect();
                let t = Instant::now();
                k.shutdown(false)?;
                // Map teardown runs in a kernel work queue after the last reference is gone:
                // wait for it, so the next measurement does not share the CPU with it.
                let deadline = Instant::now() + Duration::from_secs(120);
                while ids
                    .iter()
                    .any(|id| aya::maps::MapInfo::from_id(*id).is_ok())
                {
                    if Instant::now() > deadline {
                        bail!("rule maps {ids:?} still not freed after 120 s");
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(Some(t.elapsed()))
            }
            Loaded::Nft(table) => {
                self.ns
                    .exec("nft", &["delete", "table", "ip", &table], None)?;
                Ok(None)
            }
            Loaded::Iptables => {
                self.ns.exec("iptables-legacy", &["-F", "OUTPUT"], None)?;
                Ok(None)
            }
            Loaded::Ipset(set) => {
                self.ns.exec("iptables-legacy", &["-F", "OUTPUT"], None)?;
                self.ns.exec("ipset", &["destroy", &set], None)?;
                Ok(None)
            }
        }
    }

    fn memory_bytes(&self, loaded: &Loaded) -> anyhow::Result<Option<f64>> {
        match loaded {
            Loaded::Ours(k) => Ok(Some(
                k.rule_maps_memory().iter().map(|m| m.bytes as f64).sum(),
            )),
            Loaded::Ipset(set) => {
                let text = self.ns.exec("ipset", &["list", "-t", set], None)?;
                Ok(text
                    .lines()
                    .find_map(|l| l.strip_prefix("Size in memory:"))
                    .and_then(|v| v.trim().parse::<f64>().ok()))
            }
            _ => Ok(None),
        }
    }
}

/// (mode, size, table) of a summary cell.
type CellKey = (&'static str, usize, &'static str);

/// Medians for the stderr summary: per cell, each round's p50 and that round's baseline p50.
#[derive(Default)]
struct Summary(HashMap<CellKey, Vec<(f64, f64)>>);

impl Summary {
    fn add(&mut self, mode: Mode, size: usize, table: &'static str, p50: f64, base: f64) {
        self.0
            .entry((mode.name(), size, table))
            .or_default()
            .push((p50, base));
    }

    fn print(&self, sizes: &[usize]) {
        eprintln!(
            "\n{:<11} {:>9} {:>12} {:>12} {:>12} {:>12}",
            "mode", "size", "fixed p50", "added", "rot. p50", "added"
        );
        for mode in Mode::FILTERS {
            for &size in sizes {
                let cell = |table| {
                    self.0.get(&(mode.name(), size, table)).map(|v| {
                        let p50 = median(v.iter().map(|x| x.0).collect());
                        let added = median(v.iter().map(|x| x.0 - x.1).collect());
                        (p50, added)
                    })
                };
                let (Some(f), Some(r)) = (cell("connect-fixed"), cell("connect-rotating")) else {
                    continue;
                };
                eprintln!(
                    "{:<11} {:>9} {:>10.0}ns {:>+10.0}ns {:>10.0}ns {:>+10.0}ns",
                    mode.name(),
                    size,
                    f.0,
                    f.1,
                    r.0,
                    r.1
                );
            }
        }
    }
}

fn record_batch(
    out: &mut Output,
    table: &str,
    mode: Mode,
    size: Option<usize>,
    round: usize,
    b: &Batch,
) -> anyhow::Result<()> {
    out.record(table, mode, size, round, "p50_ns", b.pct(0.5))?;
    out.record(table, mode, size, round, "p99_ns", b.pct(0.99))?;
    out.record(table, mode, size, round, "conn_per_s", b.conn_per_s)?;
    out.record(
        table,
        mode,
        size,
        round,
        "cpu_ns_per_connect",
        b.cpu_ns_per_connect,
    )?;
    Ok(())
}

fn check(b: &Batch, what: &str) -> anyhow::Result<()> {
    if b.unexpected > 0 {
        bail!(
            "{what}: {} of {} connects had the wrong outcome (first errno {})",
            b.unexpected,
            b.sorted_ns.len(),
            b.first_errno
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let started = Instant::now();
    let mut out = Output::create(&args.out)?;
    let ns = BenchNs::new(&["0.0.0.0/1"])?;
    ns.enter_current_thread()?;
    // Backlog 4096: a full accept queue drops SYNs (1 s retransmit) whenever the server
    // thread is briefly starved, which would show up as a filter stall.
    let listener = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)).into())
            .context("bind the accept server")?;
        s.listen(4096)?;
        TcpListener::from(s)
    };
    std::thread::spawn(move || {
        if let Err(e) = pin_to_cpu(0) {
            eprintln!("server: {e:#}");
        }
        for s in listener.incoming() {
            drop(s);
        }
    });
    pin_to_cpu(1)?;
    let bench = Bench {
        ns,
        cg: TestCgroup::new()?,
        tmp: tempfile::tempdir()?,
        name: unique_suffix().replace('-', "_"),
    };
    // Declared after `bench`, so dropped first on every exit path: the test cgroup's drop kills
    // whatever is still inside it, which must not be us.
    let back = MoveBack::into(&bench.cg)?;

    eprintln!("generating prefix sets {:?}", args.sizes);
    let workloads: Vec<(usize, Workload)> =
        args.sizes.iter().map(|n| (*n, Workload::new(*n))).collect();
    let deny = [SocketAddr::from((DENY_DST, PORT))];
    let mut summary = Summary::default();
    // Warm up the path (route cache, listener, allocator).
    run_batch(&workloads[0].1.rotating, 1_000, true)?;

    for round in 0..args.rounds {
        let (base_fixed, base_rot) = {
            let w = &workloads[0].1;
            let fixed = run_batch(&[w.fixed], args.connects(Mode::None, 0), true)?;
            let rot = run_batch(&w.rotating, args.connects(Mode::None, 0), true)?;
            // No filter: the deny destination is reachable; time the same connects anyway.
            let d = run_batch(&deny, args.deny_connects(), true)?;
            record_batch(&mut out, "connect-fixed", Mode::None, None, round, &fixed)?;
            record_batch(&mut out, "connect-rotating", Mode::None, None, round, &rot)?;
            out.record("deny", Mode::None, None, round, "p50_ns", d.pct(0.5))?;
            out.record("deny", Mode::None, None, round, "p99_ns", d.pct(0.99))?;
            eprintln!(
                "round {round} none: fixed p50 {:.0} ns, rotating p50 {:.0} ns",
                fixed.pct(0.5),
                rot.pct(0.5)
            );
            (fixed.pct(0.5), rot.pct(0.5))
        };
        for (size, w) in &workloads {
            let size = *size;
            let mut nft_set: Option<(Loaded, Duration)> = None;
            for mode in args.modes.iter().copied() {
                if mode.linear() && size > LINEAR_MAX {
                    if round == 0 {
                        eprintln!(
                            "{} at {size}: skipped (linear rules above {LINEAR_MAX})",
                            mode.name()
                        );
                    }
                    continue;
                }
                // nft-set-ct is the nft-set table plus one rule in front: reuse the loaded set.
                let (mut loaded, load_time) = match (mode, nft_set.take()) {
                    (Mode::NftSetCt, Some((Loaded::Nft(table), _))) => {
                        bench.gate_on_conntrack(&table)?;
                        (Loaded::Nft(table), None)
                    }
                    (_, leftover) => {
                        if let Some((l, _)) = leftover {
                            bench.unload(l)?;
                        }
                        let (l, t) = bench.load(mode, &w.nets)?;
                        (l, Some(t))
                    }
                };
                let count = args.connects(mode, size);
                let fixed = run_batch(&[w.fixed], count, true)?;
                check(&fixed, &format!("{} {size} fixed", mode.name()))?;
                let rot = run_batch(&w.rotating, count, true)?;
                check(&rot, &format!("{} {size} rotating", mode.name()))?;
                let d = run_batch(&deny, args.deny_connects(), false)?;
                check(&d, &format!("{} {size} deny", mode.name()))?;
                record_batch(&mut out, "connect-fixed", mode, Some(size), round, &fixed)?;
                record_batch(&mut out, "connect-rotating", mode, Some(size), round, &rot)?;
                out.record("deny", mode, Some(size), round, "p50_ns", d.pct(0.5))?;
                out.record("deny", mode, Some(size), round, "p99_ns", d.pct(0.99))?;
                summary.add(mode, size, "connect-fixed", fixed.pct(0.5), base_fixed);
                summary.add(mode, size, "connect-rotating", rot.pct(0.5), base_rot);
                if let Some(bytes) = bench.memory_bytes(&loaded)? {
                    out.record("memory", mode, Some(size), round, "bytes", bytes)?;
                }
                let mut line = format!(
                    "round {round} {:<10} {size:>8}: fixed p50 {:>7.0} ns, rotating p50 {:>7.0} ns ({count} connects), deny p50 {:>6.0} ns",
                    mode.name(),
                    fixed.pct(0.5),
                    rot.pct(0.5),
                    d.pct(0.5)
                );
                if let Some(t) = load_time {
                    out.record(
                        "load",
                        mode,
                        Some(size),
                        round,
                        "load_ms",
                        t.as_secs_f64() * 1e3,
                    )?;
                    // Ours replaces twice: the second one runs with a full retired generation
                    // in the trie (steady state of a long-running agent).
                    let replaces = if mode == Mode::Ours { 2 } else { 1 };
                    let mut result = None;
                    for i in 0..replaces {
                        let nets = w.replacement(0xabcd_0000 + (round * 2 + i) as u64);
                        result = Some(connecting_during(w.fixed, || {
                            bench.replace(mode, &mut loaded, &nets)
                        })?);
                    }
                    if let Some((r, lat)) = result {
                        let took = r.enforced;
                        out.record(
                            "load",
                            mode,
                            Some(size),
                            round,
                            "replace_ms",
                            took.as_secs_f64() * 1e3,
                        )?;
                        if let Some(c) = r.compiled {
                            out.record(
                                "load",
                                mode,
                                Some(size),
                                round,
                                "replace_compile_ms",
                                c.as_secs_f64() * 1e3,
                            )?;
                        }
                        if let Some(d) = r.retired {
                            out.record(
                                "load",
                                mode,
                                Some(size),
                                round,
                                "retire_ms",
                                d.as_secs_f64() * 1e3,
                            )?;
                        }
                        if !lat.is_empty() {
                            let p99 =
                                lat[((lat.len() - 1) as f64 * 0.99).round() as usize] as f64 / 1e3;
                            let max = *lat.last().unwrap_or(&0) as f64 / 1e3;
                            out.record(
                                "load",
                                mode,
                                Some(size),
                                round,
                                "replace_p99_connect_us",
                                p99,
                            )?;
                            out.record(
                                "load",
                                mode,
                                Some(size),
                                round,
                                "replace_max_connect_us",
                                max,
                            )?;
                        }
                        line += &format!(
                            ", load {:.1} ms, replace {:.1} ms",
                            t.as_secs_f64() * 1e3,
                            took.as_secs_f64() * 1e3
                        );
                    }
                }
                eprintln!("{line}");
                if mode == Mode::NftSet {
                    nft_set = Some((loaded, Duration::ZERO));
                } else if let Some(free) = bench.unload(loaded)? {
                    out.record(
                        "load",
                        mode,
                        Some(size),
                        round,
                        "free_ms",
                        free.as_secs_f64() * 1e3,
                    )?;
                }
            }
            if let Some((l, _)) = nft_set.take() {
                bench.unload(l)?;
            }
        }
    }

    // BPF run time of connect4 (kernel statistics, enabled only for this pass: they add cost).
    {
        let _stats =
            aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
        for (size, w) in &workloads {
            let (loaded, _) = bench.load(Mode::Ours, &w.nets)?;
            let Loaded::Ours(k) = &loaded else {
                bail!("ours did not load as ours")
            };
            for (metric, dsts) in [
                ("ns_per_run_fixed", std::slice::from_ref(&w.fixed)),
                ("ns_per_run", &w.rotating[..]),
            ] {
                let before = k
                    .program_stats("passthrough_connect4")
                    .context("connect4 stats")?;
                run_batch(dsts, args.connects(Mode::Ours, *size), true)?;
                let after = k
                    .program_stats("passthrough_connect4")
                    .context("connect4 stats")?;
                let runs = after.1.saturating_sub(before.1).max(1);
                let ns = (after.0.saturating_sub(before.0)).as_nanos() as f64 / runs as f64;
                out.record("bpf", Mode::Ours, Some(*size), 0, metric, ns)?;
                eprintln!("bpf connect4 {size:>8} {metric}: {ns:.0} ns");
            }
            bench.unload(loaded)?;
        }
    }
    drop(back);
    summary.print(&args.sizes);
    eprintln!(
        "\n{} rounds in {:.0} s; results in {}",
        args.rounds,
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
