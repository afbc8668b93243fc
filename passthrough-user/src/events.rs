//! Outcomes into metrics and logs. Both paths hand over the same record
//! (`passthrough_policy::outcome::Outcome`): the kernel's denials (the `DENY_EVENTS` ring
//! buffer, turned into outcomes by [`kernel_outcome`]) and every unit the proxy handles
//! ([`Reporter::record`]). Every denial becomes one structured `tracing` event, target
//! `passthrough::deny`, level WARN, with these fields (JSON with `--log-format json`):
//!
//! | field | meaning |
//! |---|---|
//! | `path` | `kernel`, `proxy`, or `kernel-sni` (the TLS fast path's ClientHello judge) |
//! | `time` | when the decision was made (RFC 3339 UTC; the kernel's clock for kernel events) |
//! | `workload`, `workload_id` | workload name (`""` = none) and its cgroup id (0 = none) |
//! | `cgroup_id` | kernel only: the cgroup of the calling task |
//! | `pid`, `comm` | the process that called `connect()`/`sendmsg()` |
//! | `dst` | the destination it dialled (`ip:port`, IPv4-mapped shown as IPv4) |
//! | `protocol` | kernel: `tcp`/`udp`; from the raw/ping backstop `ping` or `raw:<IP protocol>` (`raw:udp`, `raw:icmp`, `raw:47`); proxy: `tls`, `http1`, `h2c`, `grpc`, `unknown` |
//! | `sni` / `host` | proxy only, when known: the TLS SNI or the HTTP authority |
//! | `peer` | proxy only: the client address as the proxy saw it |
//! | `reason`, `detail` | the [`Reason`] code (`no_match`, `mode_none`, `no_domain_match`, `peek_timeout`, …; one vocabulary for both paths) and text |
//! | `audit` | `true` when `--audit` let the connection through (message says "would be denied") |
//!
//! **Rate limit.** Every denial is counted in the metrics, but only a bounded number are
//! logged: a [`Limiter`] (token buckets: global and per (workload, reason)) decides; the rest
//! are counted in `passthrough_deny_events_suppressed_total` and summed up in one
//! "suppressed N denial events" line per [`SUPPRESSED_LOG_EVERY`]. The kernel side is bounded by
//! its ring buffer (overflow counted in `events_dropped`); the reader drains it in batches,
//! yields between batches and pauses `COALESCE_PAUSE` after a busy wake-up, so a flood costs
//! a bounded number of wake-ups per second plus one parse and a few counter updates per event.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{MapData, MapInfo, RingBuf};
use passthrough_common::{DenyEvent, Reason, SniDenyEvent};
use passthrough_policy::outcome::{DecisionPath, Outcome, OutcomeVerdict};
use passthrough_proxy::ProxyReport;
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use crate::metrics::{KernelCounters, Metrics};

/// Target of deny events.
pub const TARGET: &str = "passthrough::deny";
/// How often a "suppressed N denial events" line is logged (when N > 0).
pub const SUPPRESSED_LOG_EVERY: Duration = Duration::from_secs(10);
/// Most kernel events handled before the reader yields to other tasks.
const BATCH: usize = 1024;
/// A wake-up that found at least this many events means a busy ring: pause before the next.
const COALESCE_AFTER: usize = 16;
/// How long the reader lets a busy ring fill before reading again.
const COALESCE_PAUSE: Duration = Duration::from_millis(10);

/// A token bucket on an explicit clock (`now` = time since any fixed origin), so it is pure
/// and testable with a fake clock.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// `rate` tokens per second, at most `burst` saved; starts full at `now`.
    pub fn new(rate: f64, burst: f64, now: Duration) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Duration) {
        if now > self.last {
            self.tokens =
                (self.tokens + (now - self.last).as_secs_f64() * self.rate).min(self.burst);
            self.last = now;
        }
    }

    /// Whether a token is available now (and takes it).
    pub fn try_take(&mut self, now: Duration) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a token is available now, without taking it.
    pub fn has_token(&mut self, now: Duration) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }
}

/// Limits of a [`Limiter`].
#[derive(Debug, Clone, Copy)]
pub struct LimiterConfig {
    /// Events per second over all keys.
    pub global_rate: f64,
    /// Burst over all keys.
    pub global_burst: f64,
    /// Events per second for one key (one noisy workload cannot use the whole budget).
    pub key_rate: f64,
    /// Burst for one key.
    pub key_burst: f64,
    /// Most keys tracked; beyond, new keys share the global bucket only.
    pub max_keys: usize,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self {
            global_rate: 100.0,
            global_burst: 200.0,
            key_rate: 20.0,
            key_burst: 50.0,
            max_keys: 4096,
        }
    }
}

/// Decides which events are logged: a global token bucket plus one per key. Pure: the caller
/// passes the time. Memory is bounded by [`LimiterConfig::max_keys`].
#[derive(Debug)]
pub struct Limiter<K> {
    cfg: LimiterConfig,
    global: TokenBucket,
    keys: HashMap<K, TokenBucket>,
    suppressed: u64,
}

impl<K: std::hash::Hash + Eq> Limiter<K> {
    /// A limiter whose buckets start full at `now`.
    pub fn new(cfg: LimiterConfig, now: Duration) -> Self {
        Self {
            cfg,
            global: TokenBucket::new(cfg.global_rate, cfg.global_burst, now),
            keys: HashMap::new(),
            suppressed: 0,
        }
    }

    /// Whether an event of `key` at `now` may be logged; if not it is counted as suppressed.
    pub fn allow(&mut self, key: K, now: Duration) -> bool {
        if !self.global.has_token(now) {
            self.suppressed += 1;
            return false;
        }
        if self.keys.len() >= self.cfg.max_keys && !self.keys.contains_key(&key) {
            // Forget buckets that are full again (idle keys); they would start full anyway.
            let cfg = self.cfg;
            self.keys.retain(|_, b| {
                b.refill(now);
                b.tokens < cfg.key_burst
            });
        }
        let ok = if self.keys.len() < self.cfg.max_keys || self.keys.contains_key(&key) {
            self.keys
                .entry(key)
                .or_insert_with(|| TokenBucket::new(self.cfg.key_rate, self.cfg.key_burst, now))
                .try_take(now)
        } else {
            true
        };
        if ok && self.global.try_take(now) {
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Events suppressed since the last call.
    pub fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }

    /// Keys currently tracked.
    pub fn tracked_keys(&self) -> usize {
        self.keys.len()
    }
}

/// The reason and text of a kernel denial (`DenyEvent::reason`, a [`Reason`] number). A number
/// this build does not know (only pins of another layout could hold one; they are never
/// adopted) is reported as `no_match` with the number in the text.
pub fn kernel_reason(reason: u32) -> (Reason, String) {
    match Reason::from_u32(reason) {
        Some(r) => (r, r.text().to_string()),
        None => (
            Reason::NoMatch,
            format!("denied by the kernel program (unknown reason number {reason})"),
        ),
    }
}

/// The reason and text of a TLS fast path denial (`SniDenyEvent`'s reason, a [`Reason`]
/// number): the proxy's reasons for the same refusals, so a name refused in the kernel and one
/// refused by the proxy read alike; the texts say what is particular to the kernel's judge.
pub fn kernel_sni_reason(reason: u32) -> (Reason, String) {
    let (r, text) = kernel_reason(reason);
    let text = match r {
        Reason::TooLarge => format!(
            "{text} (the kernel's judge reads a ClientHello of at most {} bytes in {} records)",
            passthrough_common::sni::KERNEL_LIMITS.max_bytes,
            passthrough_common::sni::MAX_RECORDS
        ),
        Reason::Unjudged => format!(
            "{text} (a send during connect(), or bytes queued before the hello): nothing left, the connection is reset"
        ),
        Reason::ModeNone => format!("{text} (the policy changed since the connect)"),
        _ => text,
    };
    (r, text)
}

/// The `destination` label of `passthrough_denied_destinations_total`: `name:port` when the
/// proxy saw an SNI or Host (a port in the Host is dropped: the dialled port is the one that
/// counts), else the dialled `ip:port`.
pub fn denied_destination(d: &Outcome) -> String {
    let name = d.sni.as_deref().or(d.host.as_deref()).map(|n| {
        // `[v6]:port` / `name:port` → the host part; a bare IPv6 literal stays whole.
        match n.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && h.ends_with(']') => h,
            _ => n,
        }
    });
    match name {
        Some(n) if !n.is_empty() => format!("{n}:{}", d.dst.port()),
        _ => d.dst.to_string(),
    }
}

/// A kernel event's destination (IPv4-mapped addresses shown as IPv4).
pub fn event_dst(ev: &DenyEvent) -> SocketAddr {
    let v6 = Ipv6Addr::from(ev.addr);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, ev.port)
}

/// A kernel event's command name (up to the first NUL, lossy UTF-8).
pub fn comm_str(comm: &[u8; 16]) -> String {
    let n = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..n]).into_owned()
}

/// Counts and logs denials (rate-limited). Shared by the kernel event reader and the proxy.
pub struct Reporter {
    metrics: Arc<Metrics>,
    limiter: Mutex<Limiter<(u64, Reason)>>,
    origin: Instant,
    pending: [AtomicU64; 2],
    monitor: std::sync::OnceLock<Arc<crate::monitor::Monitor>>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter").finish_non_exhaustive()
    }
}

impl Default for Reporter {
    fn default() -> Self {
        Self::new(Arc::new(Metrics::new()), LimiterConfig::default())
    }
}

fn path_index(path: DecisionPath) -> usize {
    match path {
        DecisionPath::Kernel | DecisionPath::KernelSni => 0,
        DecisionPath::Proxy => 1,
    }
}

impl Reporter {
    /// A reporter counting into `metrics`, logging within `limits`.
    pub fn new(metrics: Arc<Metrics>, limits: LimiterConfig) -> Self {
        Self {
            metrics,
            limiter: Mutex::new(Limiter::new(limits, Duration::ZERO)),
            origin: Instant::now(),
            pending: [AtomicU64::new(0), AtomicU64::new(0)],
            monitor: std::sync::OnceLock::new(),
        }
    }

    /// Also publishes decisions to `monitor`'s watchers (once; later calls are ignored).
    pub fn set_monitor(&self, monitor: Arc<crate::monitor::Monitor>) {
        let _ = self.monitor.set(monitor);
    }

    /// The metrics it counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Turns one unit's [`Outcome`] (kernel or proxy) into metrics and log lines:
    /// - a denial or would-be denial is counted in `decisions` (for the proxy also in
    ///   `proxy_decisions`) and logged, rate-limited, at target `passthrough::deny`;
    /// - an allowed proxy decision is counted the same way and logged at debug level (target
    ///   `passthrough::proxy`, message `decision`): the opt-in access log. A line per allowed
    ///   connection costs ~9 µs of a ~140 µs relayed TLS connection, and an access log is
    ///   opt-in on the peers too (`RUST_LOG=passthrough::proxy=debug`);
    /// - a request that reused an earlier judgement made no decision: only its bytes count;
    /// - bytes and upstream failures go to their metrics, failures also to a
    ///   warning (target `passthrough::proxy`).
    pub fn record(&self, o: &Outcome) {
        let workload = self.metrics.workload_name(o.workload);
        if let Some(b) = o.bytes {
            let (up, down) = self.metrics.bytes_counters(&workload);
            up.inc_by(b.up);
            down.inc_by(b.down);
        }
        if let Some(f) = &o.upstream_failure {
            if f.connect {
                self.metrics.upstream_connect_error(&workload);
            }
            warn!(
                target: "passthrough::proxy",
                workload = %workload, workload_id = o.workload, pid = o.pid, comm = %o.comm,
                peer = o.peer.map(|p| p.to_string()).as_deref(), dst = %o.dst,
                target = %f.target, host = o.host.as_deref(), error = %f.error,
                "{}",
                if f.connect {
                    "upstream unreachable; closing the client connection"
                } else {
                    "upstream failed"
                }
            );
        }
        if o.reused {
            return;
        }
        if let Some(m) = self.monitor.get().filter(|m| m.watching()) {
            m.publish(crate::monitor::Item::Decision(Arc::new(
                crate::monitor::record_of(o, workload.clone(), None),
            )));
        }
        let verdict = o.verdict.as_str();
        match o.path {
            DecisionPath::Kernel | DecisionPath::KernelSni => {
                self.metrics
                    .decision(o.path.as_str(), verdict, o.reason, &workload)
            }
            DecisionPath::Proxy => {
                self.metrics
                    .proxy_decision(&o.protocol, verdict, o.reason, &workload)
            }
        }
        if !o.verdict.is_denial() {
            debug!(
                target: "passthrough::proxy",
                workload = %workload, workload_id = o.workload, pid = o.pid, comm = %o.comm,
                peer = o.peer.map(|p| p.to_string()).as_deref(), dst = %o.dst,
                protocol = %o.protocol, sni = o.sni.as_deref(), host = o.host.as_deref(),
                ech = o.ech, verdict, reason = o.reason.code(), detail = %o.detail,
                matched = o.matched.as_deref().unwrap_or(""),
                upstream = o.upstream.map(|u| u.to_string()).as_deref(),
                decide_us = o.decide_time.map(|d| d.as_micros() as u64),
                "decision"
            );
            return;
        }
        self.metrics
            .denied_destination(&workload, &denied_destination(o));
        let ok = {
            let mut l = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
            l.allow((o.workload, o.reason), self.origin.elapsed())
        };
        if !ok {
            self.metrics.suppressed(o.path.as_str(), 1);
            self.pending[path_index(o.path)].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let audit = o.verdict == OutcomeVerdict::WouldDeny;
        let message = if audit {
            "would be denied (audit mode: let through)"
        } else {
            "denied"
        };
        warn!(
            target: TARGET,
            path = o.path.as_str(),
            time = %rfc3339(o.time),
            workload = %workload,
            workload_id = o.workload,
            cgroup_id = o.cgroup,
            pid = o.pid,
            comm = %o.comm,
            dst = %o.dst,
            protocol = %o.protocol,
            sni = o.sni.as_deref(),
            host = o.host.as_deref(),
            peer = o.peer.map(|p| p.to_string()).as_deref(),
            reason = o.reason.code(),
            detail = %o.detail,
            audit,
            "{message}"
        );
    }

    /// Logs "suppressed N denial events" for what the rate limit held back since the last call.
    pub fn log_suppressed(&self) {
        let kernel = self.pending[0].swap(0, Ordering::Relaxed);
        let proxy = self.pending[1].swap(0, Ordering::Relaxed);
        // Keep the limiter's own tally from growing; the per-path numbers above are what we report.
        let _ = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_suppressed();
        let n = kernel + proxy;
        if n > 0 {
            warn!(
                target: TARGET,
                suppressed = n,
                kernel,
                proxy,
                every_secs = SUPPRESSED_LOG_EVERY.as_secs(),
                "suppressed {n} denial events (log rate limit; all are counted in the metrics)"
            );
        }
    }

    /// Turns a kernel event into an [`Outcome`] ([`kernel_outcome`]) and records it;
    /// `now_wall` and `now_mono_ns` convert the kernel's monotonic clock.
    pub fn report_kernel(&self, ev: &DenyEvent, now_wall: SystemTime, now_mono_ns: u64) {
        self.record(&kernel_outcome(ev, now_wall, now_mono_ns));
    }
}

/// The [`Outcome`] of a kernel event: a denial (or would-be denial), or an allowed decision the
/// monitor's ring reported. `now_wall`/`now_mono_ns` convert the kernel's
/// monotonic clock (`bpf_ktime_get_ns`) into wall time.
pub fn kernel_outcome(ev: &DenyEvent, now_wall: SystemTime, now_mono_ns: u64) -> Outcome {
    let (reason, text) = kernel_reason(ev.reason);
    let age = Duration::from_nanos(now_mono_ns.saturating_sub(ev.ktime_ns));
    let mut o = Outcome::new(
        DecisionPath::Kernel,
        now_wall.checked_sub(age).unwrap_or(now_wall),
        event_dst(ev),
    );
    o.verdict = if kernel_allows(ev.reason) {
        // An allowed decision from the monitor's ring.
        OutcomeVerdict::Allow
    } else if ev.audit != 0 {
        OutcomeVerdict::WouldDeny
    } else {
        OutcomeVerdict::Deny
    };
    o.reason = reason;
    o.detail = text;
    o.workload = ev.workload;
    o.cgroup = Some(ev.cgroup);
    o.pid = ev.pid;
    o.comm = comm_str(&ev.comm);
    o.protocol = event_protocol(ev).into();
    o
}

impl Reporter {
    /// Turns a TLS fast path event into an [`Outcome`] ([`kernel_sni_outcome`], path
    /// `kernel-sni`) and records it, then resets the connection (not under `--audit`, where the
    /// judge let it through): nothing of it left and no send on it can succeed, so the
    /// application learns at once.
    pub fn report_kernel_sni(&self, ev: &SniDenyEvent, now_wall: SystemTime, now_mono_ns: u64) {
        let o = kernel_sni_outcome(ev, now_wall, now_mono_ns);
        self.record(&o);
        let base = &ev.base;
        if base.audit == 0 && ev.local_port != 0 {
            let local = SocketAddr::new(
                match Ipv6Addr::from(ev.local_addr).to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(Ipv6Addr::from(ev.local_addr)),
                },
                ev.local_port,
            );
            let dst = o.dst;
            if let Err(e) = crate::sockdiag::destroy_tcp(local, dst, ev.sock_family == 6) {
                // Already closed by the application: nothing to reset.
                if e.raw_os_error() != Some(libc::ENOENT) {
                    debug!(error = %e, %local, %dst, "resetting a refused fast-path connection");
                }
            }
        }
    }
}

/// The [`Outcome`] of a TLS fast path denial event (path `kernel-sni`, protocol `tls`, the
/// SNI the judge read, if any).
pub fn kernel_sni_outcome(ev: &SniDenyEvent, now_wall: SystemTime, now_mono_ns: u64) -> Outcome {
    let mut o = kernel_outcome(&ev.base, now_wall, now_mono_ns);
    o.path = DecisionPath::KernelSni;
    let (reason, text) = kernel_sni_reason(ev.base.reason);
    o.reason = reason;
    o.detail = text;
    o.protocol = "tls".into();
    o.sni = (ev.sni_len > 0).then(|| {
        let n = (ev.sni_len as usize).min(ev.sni.len());
        let mut b = ev.sni[..n].to_vec();
        b.reverse();
        String::from_utf8_lossy(&b).into_owned()
    });
    o
}

/// The proxy's outcomes go where the kernel's do: [`Reporter::record`]; the open-connection
/// gauge and the first-bytes counts are updated as they happen.
impl ProxyReport for Reporter {
    fn connection_opened(&self) {
        self.metrics.proxy_connection_opened();
    }

    fn connection_closed(&self) {
        self.metrics.proxy_connection_closed();
    }

    fn connection_classified(&self, kind: &'static str, peek: Option<Duration>) {
        if let Some(peek) = peek {
            self.metrics.peek_time(peek);
        }
        self.metrics.proxy_connection(kind);
    }

    fn outcome(&self, outcome: Outcome) {
        self.record(&outcome);
    }
}

/// `CLOCK_MONOTONIC` in ns (`bpf_ktime_get_ns`' clock).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The `protocol` field of a kernel denial.
pub fn event_protocol(ev: &DenyEvent) -> String {
    let name = match ev.protocol {
        1 | 58 => "icmp".to_string(),
        6 => "tcp".to_string(),
        17 => "udp".to_string(),
        p => p.to_string(),
    };
    // socket_type 0: a refused syscall (sock_addr or setsockopt hook); otherwise a packet the
    // egress backstop dropped, with its socket's type.
    match (ev.socket_type, ev.protocol) {
        (2, 1 | 58) => "ping".into(),
        (3, _) => format!("raw:{name}"),
        _ => name,
    }
}

/// Reads the kernel's deny events until the task is dropped, reporting each; also logs the
/// suppressed-events summary every [`SUPPRESSED_LOG_EVERY`].
pub async fn read_kernel_events(ring: RingBuf<MapData>, reporter: Arc<Reporter>) {
    // SAFETY: the RingBuf owns its map fd for its whole life and always returns that fd; the
    // AsyncFd owns the RingBuf.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut afd = match registered {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "deny events: cannot poll the ring buffer; kernel denials will not be logged");
            return log_suppressed_forever(reporter).await;
        }
    };
    let mut tick = tokio::time::interval(SUPPRESSED_LOG_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => reporter.log_suppressed(),
            r = afd.readable_mut() => {
                let mut guard = match r {
                    Ok(g) => g,
                    Err(e) => {
                        warn!(error = %e, "deny events: polling the ring buffer failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (wall, mono) = (SystemTime::now(), monotonic_ns());
                let ring = guard.get_inner_mut();
                let mut n = 0;
                let mut full_batch = false;
                while let Some(item) = ring.next() {
                    if item.len() >= std::mem::size_of::<SniDenyEvent>() {
                        // SAFETY: as below, a SniDenyEvent (the only larger record).
                        let ev: SniDenyEvent =
                            unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                        drop(item);
                        reporter.report_kernel_sni(&ev, wall, mono);
                    } else if item.len() >= std::mem::size_of::<DenyEvent>() {
                        // SAFETY: the kernel wrote a DenyEvent (plain data) at the start of the
                        // item; read_unaligned copes with any alignment.
                        let ev: DenyEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                        drop(item);
                        reporter.report_kernel(&ev, wall, mono);
                    } else {
                        debug!(len = item.len(), "deny events: short record ignored");
                    }
                    n += 1;
                    if n >= BATCH {
                        full_batch = true;
                        break;
                    }
                }
                if !full_batch {
                    guard.clear_ready();
                }
                drop(guard);
                if full_batch {
                    tokio::task::yield_now().await;
                } else if n >= COALESCE_AFTER {
                    // A busy ring: let events accumulate instead of waking per event, so a flood
                    // costs a bounded number of wake-ups per second (the ring holds ~3 000
                    // events; at this pause it would take > 300 000 denials/s to overflow it).
                    tokio::time::sleep(COALESCE_PAUSE).await;
                }
            }
        }
    }
}

/// Without a pollable ring buffer: still log the proxy's suppressed summaries.
pub async fn log_suppressed_forever(reporter: Arc<Reporter>) {
    let mut tick = tokio::time::interval(SUPPRESSED_LOG_EVERY);
    loop {
        tick.tick().await;
        reporter.log_suppressed();
    }
}

/// Finds the `COUNTERS` map that belongs to the same loaded object as `ring` (the programs
/// that reference this ring buffer also reference their counters) and opens a second handle
/// on it, so metrics can read the kernel counters without the `Kernel`.
pub fn counters_beside(ring: &RingBuf<MapData>) -> anyhow::Result<KernelCounters> {
    let fd = ring.as_fd().try_clone_to_owned()?;
    let ring_id = MapData::from_fd(fd)?.info()?.id();
    for prog in aya::programs::loaded_programs().flatten() {
        let Ok(Some(ids)) = prog.map_ids() else {
            continue;
        };
        if !ids.contains(&ring_id) {
            continue;
        }
        for id in ids {
            if MapInfo::from_id(id)
                .ok()
                .as_ref()
                .and_then(|i| i.name_as_str())
                == Some("COUNTERS")
            {
                return Ok(KernelCounters::new(MapData::from_id(id)?)?);
            }
        }
    }
    anyhow::bail!(
        "no loaded program references both the deny-event ring buffer (map id {ring_id}) and a COUNTERS map"
    )
}

/// An event's time as RFC 3339 UTC with milliseconds (`2026-01-02T03:04:05.678Z`). A time
/// outside years 1970–9999 (a clock gone wrong) is shown as the nearest end of that range.
/// `t` as RFC 3339 UTC with milliseconds, the time format of events and decision records.
pub fn rfc3339_string(t: SystemTime) -> String {
    rfc3339(t).to_string()
}

/// Now, as [`rfc3339_string`].
pub fn now_rfc3339() -> String {
    rfc3339_string(SystemTime::now())
}

/// Whether a kernel event's reason number is one that lets the connection through (the
/// monitor's allowed decisions; denials and would-be denials are not).
pub fn kernel_allows(reason: u32) -> bool {
    Reason::from_u32(reason)
        .is_some_and(|r| r.effect() == passthrough_common::reason::Effect::Allow)
}

fn rfc3339(t: SystemTime) -> humantime::Rfc3339Timestamp {
    // 9999-12-31T23:59:59.999Z, the last instant the formatter writes.
    let last = UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
    humantime::format_rfc3339_millis(t.clamp(UNIX_EPOCH, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn event_protocol_names_the_hook_and_the_packet() {
        let ev = |socket_type, protocol| DenyEvent {
            socket_type,
            protocol,
            ..Default::default()
        };
        // A refused syscall (connect/sendmsg, setsockopt).
        assert_eq!(event_protocol(&ev(0, 6)), "tcp");
        assert_eq!(event_protocol(&ev(0, 17)), "udp");
        // Packets the backstop dropped: ping (IPv4 and IPv6), raw, and a TCP or UDP socket's
        // source-routed packet (named by its protocol, not as raw).
        assert_eq!(event_protocol(&ev(2, 1)), "ping");
        assert_eq!(event_protocol(&ev(2, 58)), "ping");
        assert_eq!(event_protocol(&ev(3, 17)), "raw:udp");
        assert_eq!(event_protocol(&ev(3, 47)), "raw:47");
        assert_eq!(event_protocol(&ev(1, 6)), "tcp");
        assert_eq!(event_protocol(&ev(2, 17)), "udp");
        assert_eq!(
            kernel_reason(Reason::SourceRoute as u32).0.code(),
            "source_route"
        );
        assert_eq!(
            kernel_reason(Reason::SubflowOwnerUnknown as u32).0.code(),
            "subflow_owner_unknown"
        );
    }

    #[test]
    fn event_time_is_rfc3339_utc_millis() {
        assert_eq!(rfc3339(UNIX_EPOCH).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_709_251_199_123)).to_string(),
            "2024-02-29T23:59:59.123Z"
        );
        // Out of range: clamped, never a panic.
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(1)).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(300_000_000_000)).to_string(),
            "9999-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn bucket_refills_at_rate_up_to_burst() {
        let mut b = TokenBucket::new(10.0, 3.0, Duration::ZERO);
        assert!((0..3).all(|_| b.try_take(Duration::ZERO)));
        assert!(!b.try_take(Duration::ZERO));
        assert!(!b.try_take(50 * MS));
        assert!(b.try_take(100 * MS));
        assert!(!b.try_take(100 * MS));
        // A long pause refills only up to the burst.
        let t = Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.try_take(t)).count(), 3);
        // Time going backwards does not mint tokens.
        assert!(!b.try_take(Duration::from_secs(1)));
    }

    #[test]
    fn global_limit_holds_over_a_flood() {
        let cfg = LimiterConfig {
            key_rate: 1e9,
            key_burst: 1e9,
            ..LimiterConfig::default()
        };
        let mut l = Limiter::new(cfg, Duration::ZERO);
        // 10 s of 100 000 events/s from 50 keys.
        let mut logged = 0u64;
        let total = 1_000_000u64;
        for i in 0..total {
            let now = Duration::from_micros(i * 10);
            if l.allow(i % 50, now) {
                logged += 1;
            }
        }
        // burst 200 + 100/s × 10 s.
        assert!((1190..=1201).contains(&logged), "logged {logged}");
        assert_eq!(l.take_suppressed(), total - logged);
        assert_eq!(l.take_suppressed(), 0);
    }

    #[test]
    fn one_noisy_key_cannot_take_the_whole_budget() {
        let mut l = Limiter::new(LimiterConfig::default(), Duration::ZERO);
        let mut noisy = 0;
        for i in 0..10_000u64 {
            if l.allow("noisy", Duration::from_micros(i * 100)) {
                noisy += 1;
            }
        }
        // 1 s: burst 50 + 20/s.
        assert!((69..=71).contains(&noisy), "noisy logged {noisy}");
        // Another key still gets through right away.
        assert!(l.allow("quiet", Duration::from_secs(1)));
    }

    #[test]
    fn key_table_is_bounded() {
        let cfg = LimiterConfig {
            max_keys: 16,
            global_rate: 1e9,
            global_burst: 1e9,
            ..LimiterConfig::default()
        };
        let mut l = Limiter::new(cfg, Duration::ZERO);
        for k in 0..10_000u64 {
            l.allow(k, Duration::ZERO);
            assert!(l.tracked_keys() <= 16);
        }
        // Idle keys are forgotten once they are full again.
        assert!(l.allow(123_456, Duration::from_secs(10)));
        assert!(l.tracked_keys() <= 16);
    }

    #[test]
    fn kernel_event_fields() {
        let mut ev = DenyEvent {
            reason: Reason::NoMatch as u32,
            port: 443,
            protocol: 6,
            pid: 7,
            ..Default::default()
        };
        ev.addr = std::net::Ipv4Addr::new(203, 0, 113, 7)
            .to_ipv6_mapped()
            .octets();
        ev.comm[..4].copy_from_slice(b"curl");
        assert_eq!(event_dst(&ev), "203.0.113.7:443".parse().unwrap());
        assert_eq!(comm_str(&ev.comm), "curl");
        assert_eq!(kernel_reason(ev.reason).0.code(), "no_match");
        assert_eq!(kernel_reason(99).0, Reason::NoMatch);
        assert!(kernel_reason(99).1.contains("99"));
        ev.addr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(event_dst(&ev), "[2001:db8::1]:443".parse().unwrap());
    }

    #[test]
    fn denied_destination_names_what_was_dialled() {
        let d = |sni: Option<&str>, host: Option<&str>, dst: &str| {
            let mut o = Outcome::new(
                DecisionPath::Proxy,
                SystemTime::UNIX_EPOCH,
                dst.parse().unwrap(),
            );
            o.sni = sni.map(str::to_string);
            o.host = host.map(str::to_string);
            o
        };
        assert_eq!(
            denied_destination(&d(None, None, "203.0.113.7:80")),
            "203.0.113.7:80"
        );
        assert_eq!(
            denied_destination(&d(None, None, "[2001:db8::1]:443")),
            "[2001:db8::1]:443"
        );
        assert_eq!(
            denied_destination(&d(Some("api.test"), None, "203.0.113.7:443")),
            "api.test:443"
        );
        assert_eq!(
            denied_destination(&d(None, Some("web.test:8080"), "203.0.113.7:80")),
            "web.test:80"
        );
        assert_eq!(
            denied_destination(&d(None, Some("[2001:db8::5]:80"), "203.0.113.7:80")),
            "[2001:db8::5]:80"
        );
        assert_eq!(
            denied_destination(&d(Some(""), None, "203.0.113.7:443")),
            "203.0.113.7:443"
        );
    }

    #[test]
    fn reporter_counts_everything_and_suppresses_logs() {
        let metrics = Arc::new(Metrics::new());
        metrics.policy_applied(
            1,
            [(9, "web".to_string())],
            Default::default(),
            Default::default(),
        );
        let cfg = LimiterConfig {
            global_rate: 0.0,
            global_burst: 2.0,
            ..LimiterConfig::default()
        };
        let r = Reporter::new(metrics.clone(), cfg);
        let ev = DenyEvent {
            workload: 9,
            reason: Reason::ModeNone as u32,
            port: 80,
            protocol: 17,
            ..Default::default()
        };
        for _ in 0..5 {
            r.report_kernel(&ev, SystemTime::now(), monotonic_ns());
        }
        let text = metrics.render();
        let find = |name: &str, want: &[(&str, &str)]| {
            crate::metrics::parse_text(&text)
                .into_iter()
                .find(|(n, l, _)| {
                    n == name
                        && want
                            .iter()
                            .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|s| s.2)
        };
        assert_eq!(
            find(
                "passthrough_decisions_total",
                &[
                    ("path", "kernel"),
                    ("workload", "web"),
                    ("reason", "mode_none")
                ]
            ),
            Some(5.0)
        );
        assert_eq!(
            find(
                "passthrough_deny_events_suppressed_total",
                &[("path", "kernel")]
            ),
            Some(3.0)
        );
        assert_eq!(r.pending[0].load(Ordering::Relaxed), 3);
        r.log_suppressed();
        assert_eq!(r.pending[0].load(Ordering::Relaxed), 0);
    }
}
