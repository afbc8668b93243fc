//! Live decisions: the hub behind `passthrough monitor` (admin endpoint `GET /monitor`) and
//! the decision log (`run --decision-log`).
//!
//! # Where decisions come from
//!
//! | source | what | when |
//! |---|---|---|
//! | kernel, `DENY_EVENTS` ring | denials and `--audit` would-be denials | always (the deny-event log reads them) |
//! | kernel, `MONITOR_EVENTS` ring | allowed egress decisions (`address_match`, `mode_all`), and ClientHellos the TLS fast path's judge allowed (path `kernel-sni`, with the SNI) | only while someone watches: the agent sets `flags::MONITOR` in `CONFIG` |
//! | proxy | every TLS connection and HTTP request it judged | the proxy's outcome record |
//!
//! Loopback, internal ranges, resolvers and the agent's own sockets are not egress decisions
//! and are not reported (the kernel counters count them).
//!
//! # Backpressure: enforcement never waits for a watcher
//!
//! - **No watcher**: the programs test one bit of the `CONFIG` value they already read and
//!   report nothing; the agent builds no record (`Monitor::watching` is one atomic load).
//! - **Kernel → agent**: the programs reserve a slot in `MONITOR_EVENTS` (512 KiB); when it is
//!   full the decision is counted in `MONITOR_DROPS` instead (a failed reserve, nothing waits).
//!   The agent reports every drop as a `lost` line (`at: kernel`) and in
//!   `passthrough_monitor_lost_total{at="kernel"}`.
//! - **Sampling**: once a second the reader compares what it received with
//!   [`KERNEL_RATE_BUDGET`]; above it (or after drops) it halves the share of allowed kernel
//!   decisions the programs report (1 in 2, 4, …, per CPU, by `bpf_get_prandom_u32`), below a
//!   quarter of it it doubles the share again. Records reported while sampling carry
//!   `sampled: N` (each stands for N). Denials and proxy decisions are never sampled.
//! - **Agent → watchers**: one broadcast ring of [`CHANNEL`] records; a watcher that falls
//!   further behind loses the oldest ones and gets a `lost` line (`at: agent`) saying how many
//!   (`passthrough_monitor_lost_total{at="agent"}`); the others, the proxy and the kernel are
//!   not slowed.

use std::{
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use ipnet::IpNet;
use passthrough_policy::{
    decision_log::{DecisionRecord, LostRecord},
    outcome::Outcome,
};
use tokio::sync::{broadcast, mpsc, watch};

use crate::metrics::Metrics;

/// Records the agent holds for watchers (a slower watcher loses the oldest, counted).
pub const CHANNEL: usize = 8192;
/// Allowed kernel decisions per second the agent takes before it asks the programs to sample.
pub const KERNEL_RATE_BUDGET: u64 = 20_000;
/// Largest sampling shift (1 in 2^15).
pub const MAX_SAMPLE_SHIFT: u8 = 15;
/// A watcher that received nothing for this long gets an empty line (so a client that went
/// away is noticed and its subscription ends).
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// One item of the stream.
#[derive(Debug, Clone)]
pub enum Item {
    /// A decision.
    Decision(Arc<DecisionRecord>),
    /// Decisions lost before they reached the agent (`at: kernel`).
    Lost(LostRecord),
}

/// What the programs are asked to report: the `CONFIG` flag and the sampling shift.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelMonitor {
    /// Report allowed egress decisions.
    pub on: bool,
    /// Report 1 in 2^`shift` of them.
    pub shift: u8,
}

/// The hub: producers publish, watchers and the decision log subscribe.
pub struct Monitor {
    tx: broadcast::Sender<Item>,
    subscribers: AtomicUsize,
    kernel: watch::Sender<KernelMonitor>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("subscribers", &self.subscribers.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Monitor {
    /// A hub with no subscriber.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(CHANNEL);
        let (kernel, _) = watch::channel(KernelMonitor::default());
        Arc::new(Self {
            tx,
            subscribers: AtomicUsize::new(0),
            kernel,
            metrics,
        })
    }

    /// Whether anyone listens: producers build no record otherwise.
    #[inline]
    pub fn watching(&self) -> bool {
        self.subscribers.load(Ordering::Relaxed) > 0
    }

    /// Publishes one item (dropped when nobody listens; never waits).
    pub fn publish(&self, item: Item) {
        let _ = self.tx.send(item);
    }

    /// What the programs should report; the agent's main loop applies changes to `CONFIG`.
    pub fn kernel_wanted(&self) -> watch::Receiver<KernelMonitor> {
        self.kernel.subscribe()
    }

    /// Sets the sampling shift (kept while someone watches).
    pub fn set_sample_shift(&self, shift: u8) {
        let shift = shift.min(MAX_SAMPLE_SHIFT);
        self.kernel.send_if_modified(|k| {
            let changed = k.shift != shift;
            k.shift = shift;
            changed
        });
        self.refresh();
    }

    /// The current sampling shift.
    pub fn sample_shift(&self) -> u8 {
        self.kernel.borrow().shift
    }

    /// Sets the kernel flag from the number of subscribers. The count is read under the
    /// channel's lock, so of a subscription and an unsubscription racing, the last one to get
    /// there sees the final count: the flag never stays off while someone watches.
    fn refresh(&self) {
        self.kernel.send_if_modified(|k| {
            let on = self.subscribers.load(Ordering::Acquire) > 0;
            let changed = k.on != on;
            k.on = on;
            self.metrics
                .monitor_sample_rate(if on { 1u64 << k.shift } else { 0 });
            changed
        });
    }

    /// A new subscriber: receives every item published from now on until dropped.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        let rx = self.tx.subscribe();
        let n = self.subscribers.fetch_add(1, Ordering::AcqRel) + 1;
        self.metrics.monitor_watchers(n);
        self.refresh();
        Subscription {
            rx,
            monitor: self.clone(),
        }
    }

    /// The metrics (lost counts).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// A subscription; the last one dropped switches the kernel's reporting off.
pub struct Subscription {
    rx: broadcast::Receiver<Item>,
    monitor: Arc<Monitor>,
}

impl Subscription {
    /// The next item, or how many were lost because this subscriber fell behind.
    pub async fn recv(&mut self) -> Result<Item, u64> {
        loop {
            match self.rx.recv().await {
                Ok(i) => return Ok(i),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.monitor.metrics.monitor_lost("agent", n);
                    return Err(n);
                }
                // The hub lives as long as the agent; a closed channel only happens at exit.
                Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    }

    /// An item already waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<Item, u64>> {
        match self.rx.try_recv() {
            Ok(i) => Some(Ok(i)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                self.monitor.metrics.monitor_lost("agent", n);
                Some(Err(n))
            }
            Err(_) => None,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let left = self.monitor.subscribers.fetch_sub(1, Ordering::AcqRel) - 1;
        self.monitor.metrics.monitor_watchers(left);
        self.monitor.refresh();
    }
}

/// Which decisions a watcher wants (`GET /monitor?workload=…&verdict=…&path=…&dst=CIDR`;
/// a repeated key is any of its values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Workload names.
    pub workloads: Vec<String>,
    /// Verdicts (`allow`, `deny`, `would_deny`).
    pub verdicts: Vec<String>,
    /// Paths (`kernel`, `kernel-sni`, `proxy`).
    pub paths: Vec<String>,
    /// Destination networks.
    pub dsts: Vec<IpNet>,
}

/// The verdicts and paths a filter may name.
pub const VERDICTS: [&str; 3] = ["allow", "deny", "would_deny"];
/// See [`VERDICTS`].
pub const PATHS: [&str; 3] = ["kernel", "kernel-sni", "proxy"];

impl Filter {
    /// Whether `r` passes.
    pub fn matches(&self, r: &DecisionRecord) -> bool {
        (self.workloads.is_empty() || self.workloads.contains(&r.workload))
            && (self.verdicts.is_empty() || self.verdicts.contains(&r.verdict))
            && (self.paths.is_empty() || self.paths.contains(&r.path))
            && (self.dsts.is_empty() || {
                let ip = unmapped(r.dst.ip());
                self.dsts.iter().any(|n| n.contains(&ip))
            })
    }

    /// Parses a query string; unknown keys and values are errors (a typo must not silently
    /// show everything).
    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut f = Filter::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| format!("{k}: bad percent-encoding"))?;
            match percent_decode(k).as_deref() {
                Some("workload") => f.workloads.push(v),
                Some("verdict") if VERDICTS.contains(&v.as_str()) => f.verdicts.push(v),
                Some("verdict") => {
                    return Err(format!("verdict {v:?}: one of {}", VERDICTS.join(", ")));
                }
                Some("path") if PATHS.contains(&v.as_str()) => f.paths.push(v),
                Some("path") => return Err(format!("path {v:?}: one of {}", PATHS.join(", "))),
                Some("dst") => f.dsts.push(parse_net(&v)?),
                _ => return Err(format!("unknown filter {k:?}")),
            }
        }
        Ok(f)
    }

    /// The query string for this filter (the CLI's request).
    pub fn to_query(&self) -> String {
        let mut parts = Vec::new();
        for (k, vs) in [
            ("workload", &self.workloads),
            ("verdict", &self.verdicts),
            ("path", &self.paths),
        ] {
            parts.extend(vs.iter().map(|v| format!("{k}={}", percent_encode(v))));
        }
        parts.extend(
            self.dsts
                .iter()
                .map(|n| format!("dst={}", percent_encode(&n.to_string()))),
        );
        parts.join("&")
    }
}

/// A CIDR, or one address (a host network).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("dst {s:?}: not a CIDR or an address"))
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The first line of every stream: tells the client the subscription is live.
pub const HELLO: &str = "{\"monitor\":\"watching\"}\n";

/// A streaming response body fed by a channel of byte chunks.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// Starts one watcher: subscribes now (so nothing published after this call is missed) and
/// returns the body streaming the matching records as JSON lines, in batches; the task ends
/// when the client goes away.
pub fn watch(monitor: &Arc<Monitor>, filter: Filter) -> ChannelBody {
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let mut sub = monitor.subscribe();
    tokio::spawn(async move {
        if tx.send(Bytes::from_static(HELLO.as_bytes())).await.is_err() {
            return;
        }
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        loop {
            let first = tokio::select! {
                r = sub.recv() => r,
                _ = tokio::time::sleep(HEARTBEAT) => {
                    if tx.send(Bytes::from_static(b"\n")).await.is_err() {
                        return;
                    }
                    continue;
                }
                _ = tx.closed() => return,
            };
            write_item(&mut buf, first, &filter);
            // Whatever else is already waiting goes into the same write.
            while buf.len() < 64 * 1024 {
                match sub.try_recv() {
                    Some(r) => write_item(&mut buf, r, &filter),
                    None => break,
                }
            }
            if buf.is_empty() {
                continue;
            }
            let chunk = Bytes::copy_from_slice(&buf);
            buf.clear();
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    ChannelBody(rx)
}

/// Appends one stream line for `item` (a record passing `filter`, or a loss report).
fn write_item(buf: &mut Vec<u8>, item: Result<Item, u64>, filter: &Filter) {
    let line = match item {
        Ok(Item::Decision(r)) if filter.matches(&r) => serde_json::to_writer(&mut *buf, &*r),
        Ok(Item::Decision(_)) => return,
        Ok(Item::Lost(l)) => serde_json::to_writer(&mut *buf, &l),
        Err(n) => serde_json::to_writer(
            &mut *buf,
            &LostRecord {
                time: crate::events::now_rfc3339(),
                lost: n,
                at: "agent".into(),
            },
        ),
    };
    if line.is_ok() {
        buf.push(b'\n');
    }
}

/// One line of `passthrough monitor` (text): time, workload, protocol, destination, SNI/Host,
/// verdict, path, then the match (when known) or the reason.
pub fn text_line(r: &DecisionRecord) -> String {
    let name = r.sni.as_deref().or(r.host.as_deref()).unwrap_or("-");
    let workload = if r.workload.is_empty() {
        "-"
    } else {
        &r.workload
    };
    let why = match &r.matched {
        Some(m) => format!("{} [{m}]", r.reason),
        None => r.reason.clone(),
    };
    let sampled = r
        .sampled
        .map(|n| format!(" (1 in {n} shown)"))
        .unwrap_or_default();
    format!(
        "{} {workload:<24} {:<6} {:<40} {name:<28} {:<10} {:<6} {why}{sampled}",
        r.time,
        r.protocol,
        sanitize(&r.dst.to_string()),
        r.verdict,
        r.path,
    )
    .chars()
    .map(|c| if c.is_control() { '?' } else { c })
    .collect()
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The text line of a loss report.
pub fn text_lost(l: &LostRecord) -> String {
    let why = match l.at.as_str() {
        "kernel" => "the kernel's monitor ring buffer was full",
        "agent" => "this watcher fell behind",
        _ => "",
    };
    sanitize(&format!(
        "{} -- {} decisions not shown ({}: {why})",
        l.time, l.lost, l.at
    ))
}

/// The record watchers and the decision log get for one outcome (kernel or proxy):
/// `workload` is its name, `sampled` the sampling factor a kernel allow was reported under.
pub fn record_of(o: &Outcome, workload: String, sampled: Option<u32>) -> DecisionRecord {
    DecisionRecord {
        time: crate::events::rfc3339_string(o.time),
        workload,
        workload_id: o.workload,
        path: o.path.as_str().into(),
        verdict: o.verdict.as_str().into(),
        reason: o.reason.code().into(),
        dst: o.dst,
        protocol: o.protocol.to_string(),
        sni: o.sni.clone(),
        host: o.host.clone(),
        matched: o.matched.clone(),
        pid: o.pid,
        comm: o.comm.clone(),
        sampled,
    }
}

/// Most kernel events handled before the reader yields to other tasks.
const BATCH: usize = 1024;
/// A wake-up that found at least this many events means a busy ring: pause before the next.
const COALESCE_AFTER: usize = 16;
/// How long the reader lets a busy ring fill before reading again.
const COALESCE_PAUSE: Duration = Duration::from_millis(10);

/// The next sampling shift, from what the last second brought: `received` events and
/// `dropped` ones (the ring was full). Above [`KERNEL_RATE_BUDGET`] or after drops: report half
/// as many; below a quarter of it: twice as many again.
pub fn next_shift(shift: u8, received: u64, dropped: u64) -> u8 {
    if dropped > 0 || received > KERNEL_RATE_BUDGET {
        (shift + 1).min(MAX_SAMPLE_SHIFT)
    } else if received < KERNEL_RATE_BUDGET / 4 {
        shift.saturating_sub(1)
    } else {
        shift
    }
}

/// Reads the programs' `MONITOR_EVENTS` ring (allowed egress decisions, only written while
/// someone watches) until the task is dropped: each event becomes a record for the
/// subscribers. Once a second it reports what a full ring dropped (`MONITOR_DROPS`) and moves
/// the sampling shift ([`next_shift`]).
///
/// A hello the TLS fast path's judge allowed carries its name, not the match that allowed it:
/// the record's `match` is the one that allows it under `policy` (the proxy's policy, as the
/// agent holds it when it reads the record).
pub async fn read_kernel_monitor(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    drops: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    monitor: Arc<Monitor>,
    policy: Arc<arc_swap::ArcSwap<passthrough_proxy::ProxyPolicy>>,
) {
    use tokio::io::unix::AsyncFd;
    let read_drops = |d: &aya::maps::PerCpuArray<aya::maps::MapData, u64>| -> u64 {
        d.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
    };
    // SAFETY: the RingBuf owns its map fd for its whole life and always returns that fd; the
    // AsyncFd owns the RingBuf.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut afd = match registered {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "monitor: cannot poll the kernel's monitor ring; allowed kernel decisions will not be shown");
            return;
        }
    };
    let mut seen_drops = read_drops(&drops);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut received = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let total = read_drops(&drops);
                let dropped = total.saturating_sub(seen_drops);
                seen_drops = total;
                if dropped > 0 {
                    monitor.metrics().monitor_lost("kernel", dropped);
                    monitor.publish(Item::Lost(LostRecord {
                        time: crate::events::now_rfc3339(),
                        lost: dropped,
                        at: "kernel".into(),
                    }));
                }
                let shift = monitor.sample_shift();
                let next = if monitor.watching() { next_shift(shift, received, dropped) } else { 0 };
                if next != shift {
                    tracing::info!(sample = 1u64 << next, received, dropped, "monitor: allowed kernel decisions now reported 1 in {}", 1u64 << next);
                    monitor.set_sample_shift(next);
                }
                received = 0;
            }
            r = afd.readable_mut() => {
                let mut guard = match r {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(error = %e, "monitor: polling the kernel's monitor ring failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (wall, mono) = (SystemTime::now(), crate::events::monotonic_ns());
                let shift = monitor.sample_shift();
                let sampled = (shift > 0).then_some(1u32 << shift);
                let ring = guard.get_inner_mut();
                let mut n = 0;
                let mut full_batch = false;
                while let Some(item) = ring.next() {
                    let len = item.len();
                    let outcome = if len >= std::mem::size_of::<passthrough_common::SniDenyEvent>()
                    {
                        // SAFETY: as below, a SniDenyEvent (the only larger record): a
                        // ClientHello the TLS fast path's judge allowed.
                        let ev: passthrough_common::SniDenyEvent =
                            unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                        drop(item);
                        monitor.watching().then(|| {
                            let mut o = crate::events::kernel_sni_outcome(&ev, wall, mono);
                            if let Some(sni) = o.sni.as_deref() {
                                o.matched = policy.load().tls_match(o.workload, o.dst, sni);
                            }
                            o
                        })
                    } else if len >= std::mem::size_of::<passthrough_common::DenyEvent>() {
                        // SAFETY: the kernel wrote a DenyEvent (plain data) at the start of
                        // the item; read_unaligned copes with any alignment.
                        let ev: passthrough_common::DenyEvent =
                            unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                        drop(item);
                        monitor
                            .watching()
                            .then(|| crate::events::kernel_outcome(&ev, wall, mono))
                    } else {
                        None
                    };
                    if let Some(o) = outcome {
                        let name = monitor.metrics().workload_name(o.workload);
                        monitor.publish(Item::Decision(Arc::new(record_of(&o, name, sampled))));
                    }
                    n += 1;
                    if n >= BATCH {
                        full_batch = true;
                        break;
                    }
                }
                received += n as u64;
                if !full_batch {
                    guard.clear_ready();
                }
                drop(guard);
                if full_batch {
                    tokio::task::yield_now().await;
                } else if n >= COALESCE_AFTER {
                    tokio::time::sleep(COALESCE_PAUSE).await;
                }
            }
        }
    }
}

/// What a client of `GET /monitor` prints for one line of the stream: `None` for the hello and
/// heartbeat lines; JSON mode passes records and loss reports through as they came.
pub fn render_line(line: &str, json: bool) -> Option<String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() || line == HELLO.trim_end() {
        return None;
    }
    use passthrough_policy::decision_log::{LogLine, parse_line};
    match parse_line(line)? {
        _ if json => Some(line.to_string()),
        LogLine::Decision(r) => Some(text_line(&r)),
        LogLine::Lost(l) => Some(text_lost(&l)),
    }
}

/// The header of the text output.
pub fn text_header() -> String {
    format!(
        "{:<24} {:<24} {:<6} {:<40} {:<28} {:<10} {:<6} {}",
        "time", "workload", "proto", "destination", "sni/host", "verdict", "path", "reason [match]"
    )
}

/// Where decisions went for an address: used by tests and the demo to find a record.
pub fn same_dst(a: SocketAddr, b: SocketAddr) -> bool {
    unmapped(a.ip()) == unmapped(b.ip()) && a.port() == b.port()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(workload: &str, verdict: &str, path: &str, dst: &str) -> DecisionRecord {
        DecisionRecord {
            time: "2026-01-02T03:04:05.678Z".into(),
            workload: workload.into(),
            workload_id: 1,
            path: path.into(),
            verdict: verdict.into(),
            reason: "no_match".into(),
            dst: dst.parse().unwrap(),
            protocol: "tcp".into(),
            sni: None,
            host: None,
            matched: None,
            pid: 1,
            comm: "c".into(),
            sampled: None,
        }
    }

    #[test]
    fn filters_parse_match_and_round_trip() {
        let f = Filter::from_query(
            "workload=ns%2Fweb&workload=db&verdict=deny&path=kernel&dst=203.0.113.0%2F24&dst=2001:db8::1",
        )
        .unwrap();
        assert_eq!(f.workloads, ["ns/web", "db"]);
        assert_eq!(f.dsts.len(), 2);
        assert!(f.matches(&rec("db", "deny", "kernel", "203.0.113.7:80")));
        assert!(f.matches(&rec("ns/web", "deny", "kernel", "[::ffff:203.0.113.7]:80")));
        assert!(f.matches(&rec("db", "deny", "kernel", "[2001:db8::1]:443")));
        assert!(!f.matches(&rec("other", "deny", "kernel", "203.0.113.7:80")));
        assert!(!f.matches(&rec("db", "allow", "kernel", "203.0.113.7:80")));
        assert!(!f.matches(&rec("db", "deny", "proxy", "203.0.113.7:80")));
        assert!(!f.matches(&rec("db", "deny", "kernel-sni", "203.0.113.7:80")));
        // The TLS fast path's judge has a path of its own.
        let sni = Filter::from_query("path=kernel-sni").unwrap();
        assert!(sni.matches(&rec("db", "deny", "kernel-sni", "203.0.113.7:443")));
        assert!(!sni.matches(&rec("db", "deny", "kernel", "203.0.113.7:443")));
        assert_eq!(Filter::from_query(&sni.to_query()).unwrap(), sni);
        assert!(!f.matches(&rec("db", "deny", "kernel", "198.51.100.7:80")));
        assert_eq!(Filter::from_query(&f.to_query()).unwrap(), f);
        assert!(Filter::default().matches(&rec("", "allow", "proxy", "192.0.2.1:1")));
        for bad in [
            "verdict=denied",
            "path=xdp",
            "dst=foo",
            "colour=red",
            "workload=%zz",
        ] {
            assert!(Filter::from_query(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Filter::from_query("workload=a+b%20c").unwrap().workloads,
            ["a b c"]
        );
    }

    #[tokio::test]
    async fn subscriptions_switch_the_kernel_flag_and_slow_watchers_lose_counted_items() {
        let m = Monitor::new(Arc::new(Metrics::new()));
        let mut wanted = m.kernel_wanted();
        assert!(!m.watching());
        assert!(!wanted.borrow_and_update().on);
        let mut a = m.subscribe();
        let b = m.subscribe();
        assert!(m.watching());
        assert!(wanted.has_changed().unwrap());
        assert!(wanted.borrow_and_update().on);
        drop(b);
        assert!(m.watching() && !wanted.has_changed().unwrap());
        // `a` reads nothing while CHANNEL + 10 items are published: it lost 10.
        for i in 0..CHANNEL + 10 {
            m.publish(Item::Decision(Arc::new(rec(
                &i.to_string(),
                "allow",
                "kernel",
                "192.0.2.1:1",
            ))));
        }
        assert_eq!(a.recv().await.unwrap_err(), 10);
        match a.recv().await.unwrap() {
            Item::Decision(r) => assert_eq!(r.workload, "10"),
            other => panic!("{other:?}"),
        }
        let text = m.metrics().render();
        assert!(
            text.contains("passthrough_monitor_lost_total{at=\"agent\"} 10"),
            "{text}"
        );
        drop(a);
        assert!(!m.watching());
        assert!(!wanted.borrow_and_update().on);
    }

    #[tokio::test]
    async fn a_watcher_streams_filtered_json_lines() {
        use http_body_util::BodyExt as _;
        let m = Monitor::new(Arc::new(Metrics::new()));
        let mut body = watch(
            &m,
            Filter {
                verdicts: vec!["deny".into()],
                ..Default::default()
            },
        );
        let hello = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(hello, HELLO.as_bytes());
        m.publish(Item::Decision(Arc::new(rec(
            "w",
            "allow",
            "kernel",
            "192.0.2.1:1",
        ))));
        m.publish(Item::Decision(Arc::new(rec(
            "w",
            "deny",
            "kernel",
            "192.0.2.2:2",
        ))));
        m.publish(Item::Lost(LostRecord {
            time: "t".into(),
            lost: 3,
            at: "kernel".into(),
        }));
        let mut text = String::new();
        while text.lines().count() < 2 {
            let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("\"dst\":\"192.0.2.2:2\""), "{text}");
        assert_eq!(
            render_line(lines[1], false).unwrap(),
            "t -- 3 decisions not shown (kernel: the kernel's monitor ring buffer was full)"
        );
        let shown = render_line(lines[0], false).unwrap();
        assert!(
            shown.contains("192.0.2.2:2") && shown.contains("deny"),
            "{shown}"
        );
        assert_eq!(render_line(lines[0], true).unwrap(), lines[0]);
        assert_eq!(render_line(HELLO, false), None);
        assert_eq!(render_line("\n", true), None);
        assert_eq!(render_line("garbage", false), None);
        // The client goes away: the subscription ends and the kernel flag goes off.
        assert!(m.watching());
        drop(body);
        for _ in 0..100 {
            if !m.watching() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!m.watching());
    }

    #[test]
    fn sampling_follows_the_rate_and_drops() {
        assert_eq!(next_shift(0, 1_000, 0), 0);
        assert_eq!(next_shift(0, 1_000, 1), 1, "a drop halves the share");
        assert_eq!(next_shift(0, KERNEL_RATE_BUDGET + 1, 0), 1);
        assert_eq!(
            next_shift(3, KERNEL_RATE_BUDGET / 2, 0),
            3,
            "inside the band: kept"
        );
        assert_eq!(next_shift(3, KERNEL_RATE_BUDGET / 8, 0), 2);
        assert_eq!(next_shift(MAX_SAMPLE_SHIFT, u64::MAX, 5), MAX_SAMPLE_SHIFT);
        // A steady 1,000,000 decisions/s settles where what is reported fits the budget.
        let mut s = 0u8;
        for _ in 0..40 {
            s = next_shift(s, 1_000_000 >> s, 0);
        }
        let reported = 1_000_000u64 >> s;
        assert!(
            (KERNEL_RATE_BUDGET / 4..=KERNEL_RATE_BUDGET).contains(&reported),
            "{s}: {reported}/s"
        );
    }

    #[test]
    fn text_lines_never_carry_control_characters() {
        let mut r = rec("w\nx", "deny", "proxy", "192.0.2.1:443");
        r.sni = Some("evil\r\n.test".into());
        r.matched = Some("m\u{1b}[31m".into());
        let line = text_line(&r);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
    }
}
