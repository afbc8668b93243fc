//! Pieces the benchmark binaries share: a private network namespace with AnyIP destinations,
//! moving the process into a cgroup and back, CPU pinning, timing helpers and the JSON-lines
//! measurement writer that `cargo xtask bench --compare` renders.

use std::{
    fs::File,
    io::{BufWriter, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    CLIENT_NS_PREFIX, TestCgroup, cgroup::cgroup2_mount, netns::netns_path, run, unique_suffix,
};

/// A network namespace whose `lo` is up and has the given prefixes routed to it as local
/// (AnyIP): every address in them is a local destination, so connections never leave the
/// namespace and nothing touches the host's network. Deleted on drop.
pub struct BenchNs(String);

impl BenchNs {
    /// Creates the namespace with `local_routes` (e.g. `198.51.100.0/24`) on `lo`.
    pub fn new(local_routes: &[&str]) -> anyhow::Result<Self> {
        let name = format!("{CLIENT_NS_PREFIX}{}", unique_suffix());
        run("ip", &["netns", "add", &name])?;
        let ns = BenchNs(name);
        run("ip", &["-n", &ns.0, "link", "set", "lo", "up"])?;
        for r in local_routes {
            run(
                "ip",
                &["-n", &ns.0, "route", "add", "local", r, "dev", "lo"],
            )?;
        }
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Runs `cmd args` inside the namespace (`ip netns exec`), optionally feeding `stdin` from
    /// a file; returns its stdout, or an error with its stderr.
    pub fn exec(&self, cmd: &str, args: &[&str], stdin: Option<&Path>) -> anyhow::Result<String> {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.0, cmd]).args(args);
        if let Some(p) = stdin {
            c.stdin(File::open(p).with_context(|| format!("opening {}", p.display()))?);
        }
        let out = c.output().with_context(|| format!("running {cmd}"))?;
        if !out.status.success() {
            anyhow::bail!(
                "{cmd} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Moves the calling thread into the namespace (threads and processes it creates later
    /// start there too).
    pub fn enter_current_thread(&self) -> anyhow::Result<()> {
        use std::os::fd::AsRawFd as _;
        let f = File::open(netns_path(&self.0))?;
        // SAFETY: a valid netns fd; affects the calling thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(())
    }
}

impl Drop for BenchNs {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

/// Moves this process into a cgroup and, on drop, back to where it was (the test cgroup's own
/// drop kills whatever is still inside, which must not be us).
pub struct MoveBack(PathBuf);

impl MoveBack {
    /// Moves this process into `cg`.
    pub fn into(cg: &TestCgroup) -> anyhow::Result<Self> {
        Self::into_path(cg.path())
    }

    /// Moves this process into the cgroup directory `dir`.
    pub fn into_path(dir: &Path) -> anyhow::Result<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 line")?
            .trim()
            .to_string();
        let back = cgroup2_mount()?.join(rel.trim_start_matches('/'));
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("moving into {}", dir.display()))?;
        Ok(MoveBack(back))
    }
}

impl Drop for MoveBack {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.procs"), std::process::id().to_string());
    }
}

/// A tiny deterministic PRNG (xorshift64*): rule sets and destination orders are the same in
/// every run.
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A random IPv4 prefix (/8–/32) for rule sets, a third of them inside 198.0.0.0/8 and
    /// 203.0.0.0/8 so lookups walk deep trie paths next to the benchmarks' destinations; with
    /// the random word it came from (for deriving more, such as a port).
    pub fn rule_net(&mut self) -> (ipnet::Ipv4Net, u64) {
        let r = self.next_u64();
        let len = 8 + (r % 25) as u8;
        let mut addr = (r >> 16) as u32;
        if r.is_multiple_of(3) {
            addr = (addr & 0x00ff_ffff) | if r & 8 == 0 { 198 << 24 } else { 203 << 24 };
        }
        (
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(addr), len)
                .expect("len <= 32")
                .trunc(),
            r,
        )
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Pins the calling thread to one CPU (load generator and servers on different CPUs).
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

/// CPU time of the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec pointer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Raises the soft open-files limit to the hard one (held connections need descriptors).
pub fn raise_nofile() -> anyhow::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit");
        }
        r.rlim_cur = r.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit");
        }
    }
    Ok(r.rlim_cur)
}

/// The median of per-round figures (the upper one of an even count; NaN when there is none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Open-loop pacing: waits for request `i`'s slot (`start + i × interval`) and returns the
/// instant its latency counts from — the slot itself when it is already due (a late start is
/// the system's latency, not the client's), else the actual wake-up (timer slack is not).
pub async fn open_loop_slot(
    start: tokio::time::Instant,
    interval: Duration,
    i: usize,
) -> tokio::time::Instant {
    let at = start + interval * i as u32;
    if tokio::time::Instant::now() >= at {
        return at;
    }
    tokio::time::sleep_until(at).await;
    tokio::time::Instant::now()
}

/// The value at quantile `q` (0..=1) of sorted samples.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Times one blocking `connect()` (only the syscall) and closes with RST (`SO_LINGER{1,0}`: no
/// TIME_WAIT pile-up over hundreds of thousands of connects). Returns the nanoseconds.
pub fn timed_connect(dst: SocketAddr) -> anyhow::Result<u64> {
    let t = std::time::Instant::now();
    let s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2))
        .with_context(|| format!("connect {dst}"))?;
    let ns = t.elapsed().as_nanos() as u64;
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    drop(s);
    Ok(ns)
}

/// One timed `connect()`: Ok(ns) if it connected, Err((ns, errno)) if it failed.
pub fn connect_once(dst: SocketAddr) -> anyhow::Result<Result<u64, (u64, i32)>> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .context("socket")?;
    // A lost SYN would otherwise block for two minutes of retransmissions.
    sock.set_write_timeout(Some(Duration::from_secs(3)))
        .context("SO_SNDTIMEO")?;
    let addr = socket2::SockAddr::from(dst);
    let t = std::time::Instant::now();
    let r = sock.connect(&addr);
    let ns = t.elapsed().as_nanos() as u64;
    match r {
        Ok(()) => {
            // RST on close: no TIME_WAIT pile-up across millions of connects.
            sock.set_linger(Some(Duration::ZERO)).context("SO_LINGER")?;
            Ok(Ok(ns))
        }
        Err(e) => Ok(Err((ns, e.raw_os_error().unwrap_or(0)))),
    }
}

/// Writes measurements as JSON lines: `{"part","table","row","size","round","metric","value"}`,
/// the input of `cargo xtask bench --compare`'s report.
pub struct JsonOut {
    part: &'static str,
    out: BufWriter<File>,
}

impl JsonOut {
    /// Creates (truncates) `path`, creating its directory.
    pub fn create(part: &'static str, path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(JsonOut {
            part,
            out: BufWriter::new(f),
        })
    }

    /// Records one measurement (flushed at once, so a crash keeps what was measured).
    pub fn record(
        &mut self,
        table: &str,
        row: &str,
        size: Option<u64>,
        round: usize,
        metric: &str,
        value: f64,
    ) -> anyhow::Result<()> {
        let line = serde_json::json!({
            "part": self.part, "table": table, "row": row, "size": size,
            "round": round, "metric": metric, "value": value,
        });
        writeln!(self.out, "{line}")?;
        self.out.flush()?;
        Ok(())
    }
}

/// A `Matched` configuration of one CIDR match per `(network, port)` (port `None` = every
/// port), as the policy layer would produce it, for driving [`passthrough_policy::plan::compile`]
/// directly.
pub fn cidr_conf(
    nets: impl IntoIterator<Item = (ipnet::Ipv4Net, Option<u16>)>,
) -> passthrough_policy::MergedConf {
    use passthrough_policy::{Match, MatchKind, MatchOrigin, MergedConf, Mode, Protocol};
    let file: std::sync::Arc<Path> = Path::new("bench").into();
    let policy: std::sync::Arc<str> = "bench".into();
    let matches = nets
        .into_iter()
        .enumerate()
        .map(|(index, (net, port))| Match {
            kind: MatchKind::Cidr,
            value: net.to_string().into(),
            net: Some(ipnet::IpNet::V4(net)),
            port,
            protocol: Protocol::Tcp,
            origin: MatchOrigin {
                file: file.clone(),
                policy: policy.clone(),
                index,
            },
        })
        .collect();
    MergedConf {
        mode: Mode::Matched,
        matches,
        policies: vec![policy.to_string()],
    }
}
