//! Prometheus metrics of the agent, served on the admin server's `GET /metrics`.
//!
//! One [`Metrics`] per agent, shared (`Arc`) by the proxy, the deny-event reader, the agent loop
//! and the admin server. Everything is a `prometheus-client` metric in one [`Registry`] (prefix
//! `passthrough_`), except the kernel's global counters, which a [`Collector`] reads from the
//! per-CPU `COUNTERS` map at scrape time through a second handle on that map
//! ([`KernelCounters`]), so the admin server never needs the `Kernel`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `passthrough_decisions_total` | counter | `path` (kernel/proxy), `verdict` (allow/deny/would_deny), `reason`, `workload` |
//! | `passthrough_kernel_decisions_total` | counter (scrape time) | `path` (kernel/kernel-sni), `verdict` (allow/redirect/deny/would_deny; `direct` on the TLS fast path), `reason` |
//! | `passthrough_kernel_deny_events_dropped_total` | counter (scrape time) | — |
//! | `passthrough_deny_events_suppressed_total` | counter | `path` |
//! | `passthrough_denied_destinations_total` | counter | `workload`, `destination` (`ip:port`, or `name:port` when the proxy saw an SNI/Host; at most [`DENIED_DESTINATION_SERIES`] pairs, later ones counted as `other`) |
//! | `passthrough_proxy_connections_total` | counter | `protocol` (tls/http1/h2c/unknown/…) |
//! | `passthrough_proxy_connections_active` | gauge | — |
//! | `passthrough_proxy_decisions_total` | counter | `protocol`, `verdict`, `reason`, `workload` |
//! | `passthrough_proxy_bytes_total` | counter | `direction` (up/down), `workload` |
//! | `passthrough_proxy_peek_seconds` | histogram | — |
//! | `passthrough_proxy_upstream_connect_errors_total` | counter | `workload` |
//! | `passthrough_monitor_watchers` | gauge | — (subscribers: `monitor` clients and the decision log) |
//! | `passthrough_monitor_kernel_sample_rate` | gauge | — (allowed kernel decisions are reported 1 in N; 0: not reported, nobody watches) |
//! | `passthrough_monitor_lost_total` | counter | `at` (`kernel`: the monitor ring was full; `agent`: a watcher fell behind) |
//! | `passthrough_policy_generation` | gauge | — |
//! | `passthrough_policy_reloads_total` | counter | `result` (success/failure) |
//! | `passthrough_policy_last_reload_success_timestamp_seconds` | gauge | — |
//! | `passthrough_map_entries` | gauge | `map` (rules_v4/rules_v6/workloads/range_blocks_v4), `set` (active/previous) |
//! | `passthrough_map_capacity` | gauge | `map` (range_blocks_v4: blocks per generation) |
//!
//! Every `reason` label value is a `passthrough_common::Reason` code — one vocabulary for the
//! kernel, the proxy, deny events and `explain` (docs/design.md, "Reasons").
//!
//! `passthrough_decisions_total{path="kernel"}` only has denials (and audit would-be denials):
//! the kernel counts allows globally, not per workload, and reports each denial as an event;
//! when the ring buffer overflows, events are lost (counted in
//! `passthrough_kernel_deny_events_dropped_total`), so the exact global numbers are
//! `passthrough_kernel_decisions_total`. In the proxy, `decisions` are per TLS connection and
//! per HTTP request. Everything but the connection gauge, the first-bytes counts and the peek
//! time comes from the proxy's outcome records (`passthrough_policy::outcome::Outcome`, one per
//! TLS connection, HTTP/1 request or h2c stream, recorded when it ends), so `proxy_bytes` are
//! added when a relayed TLS connection ends, per HTTP/1 exchange, and per h2c stream (the DATA
//! bytes of its request and response bodies; HTTP/2 framing is not counted). `workload` is the workload's name; `""` = no
//! workload (a socket below an attachment but in no workload cgroup), `cgroup-<id>` = a cgroup
//! id no longer configured.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Map, MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use passthrough_common::{Reason, counter::Counter as KernelCounter};
pub use passthrough_policy::plan::MapUsage;

/// Reads the kernel's global counters ([`KernelCounter`]: what each index of `COUNTERS` counts).
pub trait CounterSource: Send + Sync + 'static {
    /// Current totals (summed over CPUs), by counter.
    fn read(&self) -> Vec<(KernelCounter, u64)>;
}

impl<F> CounterSource for F
where
    F: Fn() -> Vec<(KernelCounter, u64)> + Send + Sync + 'static,
{
    fn read(&self) -> Vec<(KernelCounter, u64)> {
        self()
    }
}

/// A second handle on the kernel's per-CPU `COUNTERS` array (the `Kernel` keeps its own).
pub struct KernelCounters(PerCpuArray<MapData, u64>);

impl KernelCounters {
    /// Wraps a handle on the `COUNTERS` map (from `MapData::from_id`, `from_pin` or `from_fd`).
    pub fn new(map: MapData) -> Result<Self, aya::maps::MapError> {
        Ok(Self(PerCpuArray::try_from(Map::PerCpuArray(map))?))
    }

    /// Opens the pinned `COUNTERS` map at `path`.
    pub fn from_pin(path: &std::path::Path) -> Result<Self, aya::maps::MapError> {
        Self::new(MapData::from_pin(path)?)
    }
}

impl CounterSource for KernelCounters {
    fn read(&self) -> Vec<(KernelCounter, u64)> {
        KernelCounter::all()
            .map(|(i, c)| (c, self.0.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0)))
            .collect()
    }
}

/// Labels of `passthrough_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `kernel` or `proxy`.
    pub path: &'static str,
    /// `allow`, `deny` or `would_deny` (`--audit`).
    pub verdict: &'static str,
    /// Why ([`Reason::code`]).
    pub reason: &'static str,
    /// Workload name.
    pub workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyDecisionLabels {
    protocol: String,
    verdict: &'static str,
    reason: &'static str,
    workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    direction: &'static str,
    workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabels {
    workload: String,
    destination: String,
}

/// Most (workload, destination) series of `passthrough_denied_destinations_total`: a workload
/// scanning the address space must not grow the agent's memory and every scrape without bound.
/// Pairs seen after the limit is reached are counted under `destination="other"`.
pub const DENIED_DESTINATION_SERIES: usize = 1000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadLabels {
    workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AtLabels {
    at: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapSetLabels {
    map: &'static str,
    set: &'static str,
}

/// Scrape-time reader of the kernel counters.
#[derive(Default)]
struct KernelCollector {
    source: RwLock<Option<Box<dyn CounterSource>>>,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelCollector").finish_non_exhaustive()
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let guard = self.source.read().unwrap_or_else(|e| e.into_inner());
        let Some(source) = guard.as_ref() else {
            return Ok(());
        };
        let values = source.read();
        drop(guard);
        {
            let family = ConstCounter::new(0u64);
            let mut m = encoder.encode_descriptor(
                "kernel_decisions",
                "Decisions of the kernel programs by path (kernel: connect/sendmsg/egress; kernel-sni: the TLS fast path, a Domain candidate connected directly and the verdict on its ClientHello), verdict (allow, redirect, deny, would_deny under --audit, direct) and reason (global, all workloads; read from the per-CPU COUNTERS map at scrape time)",
                None,
                family.metric_type(),
            )?;
            for (c, v) in &values {
                let (Some(path), Some(verdict), Some(r)) = (c.path(), c.verdict(), c.reason())
                else {
                    continue;
                };
                let labels = [("path", path), ("verdict", verdict), ("reason", r.code())];
                ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
            }
        }
        let dropped = values
            .iter()
            .find(|(c, _)| *c == KernelCounter::EventsDropped)
            .map_or(0, |(_, v)| *v);
        let dropped = ConstCounter::new(dropped);
        let m = encoder.encode_descriptor(
            "kernel_deny_events_dropped",
            "Deny events the kernel could not report because the ring buffer was full",
            None,
            dropped.metric_type(),
        )?;
        dropped.encode(m)
    }
}

/// The agent's metrics. Cheap to share (`Arc`); every method takes `&self`.
pub struct Metrics {
    registry: Registry,
    kernel: Arc<KernelCollector>,
    names: RwLock<Arc<HashMap<u64, String>>>,
    decisions: Family<DecisionLabels, Counter>,
    suppressed: Family<PathLabels, Counter>,
    denied_destinations: Family<DestinationLabels, Counter>,
    destination_series: Mutex<std::collections::HashSet<DestinationLabels>>,
    proxy_connections: Family<ProtocolLabels, Counter>,
    proxy_active: Gauge,
    proxy_decisions: Family<ProxyDecisionLabels, Counter>,
    proxy_bytes: Family<BytesLabels, Counter>,
    peek: Histogram,
    connect_errors: Family<WorkloadLabels, Counter>,
    generation: Gauge,
    monitor_watchers: Gauge,
    monitor_sample_rate: Gauge,
    monitor_lost: Family<AtLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    last_reload: Gauge<f64, std::sync::atomic::AtomicU64>,
    map_entries: Family<MapSetLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    last_usage: Mutex<Option<MapUsage>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `Content-Type` of the Prometheus text format (0.0.4).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Metrics {
    /// Every metric registered, at zero; no kernel counter source yet.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("passthrough");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Connection decisions by path (kernel: denials from deny events; proxy: per TLS connection or HTTP request), verdict, reason and workload",
            decisions.clone(),
        );
        let suppressed = Family::<PathLabels, Counter>::default();
        registry.register(
            "deny_events_suppressed",
            "Deny events counted but not logged because the log rate limit was exceeded",
            suppressed.clone(),
        );
        for path in ["kernel", "proxy"] {
            let _ = suppressed.get_or_create(&PathLabels { path });
        }
        let denied_destinations = Family::<DestinationLabels, Counter>::default();
        registry.register(
            "denied_destinations",
            "Denials and would-be denials by workload and destination (ip:port, or name:port when the proxy saw an SNI/Host); after the first 1000 pairs, new pairs count as destination=\"other\"",
            denied_destinations.clone(),
        );
        let proxy_connections = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "proxy_connections",
            "Connections accepted by the proxy, by what their first bytes were",
            proxy_connections.clone(),
        );
        let proxy_active = Gauge::default();
        registry.register(
            "proxy_connections_active",
            "Connections the proxy holds open",
            proxy_active.clone(),
        );
        let proxy_decisions = Family::<ProxyDecisionLabels, Counter>::default();
        registry.register(
            "proxy_decisions",
            "Proxy decisions (per TLS connection, per HTTP request) by protocol, verdict, reason and workload",
            proxy_decisions.clone(),
        );
        let proxy_bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "proxy_bytes",
            "Bytes the proxy relayed: up = client to upstream, down = upstream to client",
            proxy_bytes.clone(),
        );
        let peek = Histogram::new(exponential_buckets(0.0005, 4.0, 8));
        registry.register(
            "proxy_peek_seconds",
            "Time from accept until the first bytes were classified (or the peek gave up)",
            peek.clone(),
        );
        let connect_errors = Family::<WorkloadLabels, Counter>::default();
        registry.register(
            "proxy_upstream_connect_errors",
            "Upstream connections the proxy could not establish",
            connect_errors.clone(),
        );
        let generation = Gauge::default();
        registry.register(
            "policy_generation",
            "Policy generation in force (applies since start)",
            generation.clone(),
        );
        let monitor_watchers = Gauge::default();
        registry.register(
            "monitor_watchers",
            "Subscribers of the live decision stream: passthrough monitor clients and the decision log",
            monitor_watchers.clone(),
        );
        let monitor_sample_rate = Gauge::default();
        registry.register(
            "monitor_kernel_sample_rate",
            "Allowed kernel decisions are reported to watchers 1 in this many (0: not reported, nobody watches)",
            monitor_sample_rate.clone(),
        );
        let monitor_lost = Family::<AtLabels, Counter>::default();
        registry.register(
            "monitor_lost",
            "Decisions not delivered to a watcher: at=kernel the monitor ring buffer was full, at=agent a watcher fell behind",
            monitor_lost.clone(),
        );
        for at in ["kernel", "agent"] {
            let _ = monitor_lost.get_or_create(&AtLabels { at });
        }
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads by result",
            reloads.clone(),
        );
        for result in ["success", "failure"] {
            let _ = reloads.get_or_create(&ResultLabels { result });
        }
        let last_reload = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "policy_last_reload_success_timestamp_seconds",
            "Unix time of the last successful policy apply",
            last_reload.clone(),
        );
        let map_entries = Family::<MapSetLabels, Gauge>::default();
        registry.register(
            "map_entries",
            "Kernel map entries: set=active is the plan in force, set=previous the retired plan while it is still in the maps (the agent removes it right after each flip: 0 in steady state)",
            map_entries.clone(),
        );
        let map_capacity = Family::<MapLabels, Gauge>::default();
        registry.register(
            "map_capacity",
            "Kernel map capacity (max_entries); an apply needs active + new entries to fit",
            map_capacity.clone(),
        );
        let kernel = Arc::new(KernelCollector::default());
        registry.register_collector(Box::new(kernel.clone()));
        Self {
            registry,
            kernel,
            names: RwLock::new(Arc::new(HashMap::new())),
            decisions,
            suppressed,
            denied_destinations,
            destination_series: Mutex::new(Default::default()),
            proxy_connections,
            proxy_active,
            proxy_decisions,
            proxy_bytes,
            peek,
            connect_errors,
            generation,
            monitor_watchers,
            monitor_sample_rate,
            monitor_lost,
            reloads,
            last_reload,
            map_entries,
            map_capacity,
            last_usage: Mutex::new(None),
        }
    }

    /// Where `passthrough_kernel_decisions_total` comes from (replaces any earlier source).
    pub fn set_kernel_counters(&self, source: impl CounterSource) {
        *self
            .kernel
            .source
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(source));
    }

    /// The name of workload `id` for labels and logs: `""` for 0 (no workload), `cgroup-<id>`
    /// for an id that is not (or no longer) configured.
    pub fn workload_name(&self, id: u64) -> String {
        if id == 0 {
            return String::new();
        }
        let names = self.names.read().unwrap_or_else(|e| e.into_inner()).clone();
        names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("cgroup-{id}"))
    }

    /// Call after every successful `Kernel::apply` (start-up and reloads): the generation now in
    /// force, the workloads (cgroup id, name) it covers, what the plan put in the maps and what
    /// they can hold (`capacity`: entries per map, range blocks per generation).
    pub fn policy_applied(
        &self,
        generation: u64,
        workloads: impl IntoIterator<Item = (u64, String)>,
        usage: MapUsage,
        capacity: MapUsage,
    ) {
        let names: HashMap<u64, String> = workloads.into_iter().collect();
        // Every workload's per-workload counters exist from the start, at 0: `rate()` and
        // `increase()` then see a workload's first upstream failure or first relayed byte
        // (a series born at 1 has no earlier sample to rise from).
        for name in names.values() {
            let _ = self.connect_errors.get_or_create(&WorkloadLabels {
                workload: name.clone(),
            });
            let _ = self.bytes_counters(name);
        }
        *self.names.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(names);
        self.generation.set(generation as i64);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        self.last_reload.set(now.as_secs_f64());
        let previous = self
            .last_usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(usage)
            .unwrap_or_default();
        for (map, active, prev, cap) in [
            (
                "rules_v4",
                usage.rules_v4,
                previous.rules_v4,
                capacity.rules_v4,
            ),
            (
                "rules_v6",
                usage.rules_v6,
                previous.rules_v6,
                capacity.rules_v6,
            ),
            (
                "range_blocks_v4",
                usage.range_blocks_v4,
                previous.range_blocks_v4,
                capacity.range_blocks_v4,
            ),
            (
                "workloads",
                usage.workloads,
                previous.workloads,
                capacity.workloads,
            ),
        ] {
            self.map_entries
                .get_or_create(&MapSetLabels { map, set: "active" })
                .set(active as i64);
            self.map_entries
                .get_or_create(&MapSetLabels {
                    map,
                    set: "previous",
                })
                .set(prev as i64);
            self.map_capacity
                .get_or_create(&MapLabels { map })
                .set(cap as i64);
        }
    }

    /// Subscribers of the decision stream now.
    pub fn monitor_watchers(&self, n: usize) {
        self.monitor_watchers.set(n as i64);
    }

    /// Allowed kernel decisions are reported 1 in `n` (0: not at all).
    pub fn monitor_sample_rate(&self, n: u64) {
        self.monitor_sample_rate.set(n as i64);
    }

    /// `n` decisions did not reach a watcher (`at`: `kernel` or `agent`).
    pub fn monitor_lost(&self, at: &'static str, n: u64) {
        self.monitor_lost.get_or_create(&AtLabels { at }).inc_by(n);
    }

    /// A reload (SIGHUP or file change) was applied.
    pub fn reload_succeeded(&self) {
        self.reloads
            .get_or_create(&ResultLabels { result: "success" })
            .inc();
    }

    /// Replaces the workload names (cgroup id → name) without a new policy generation
    /// (Kubernetes mode: a pod cgroup added to or removed from the active plan).
    pub fn set_workload_names(&self, workloads: impl IntoIterator<Item = (u64, String)>) {
        *self.names.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(workloads.into_iter().collect());
    }

    /// Call after `Kernel::retire`: the retired plan's entries are gone from the maps.
    pub fn previous_retired(&self) {
        for map in ["rules_v4", "rules_v6", "workloads", "range_blocks_v4"] {
            self.map_entries
                .get_or_create(&MapSetLabels {
                    map,
                    set: "previous",
                })
                .set(0);
        }
    }

    /// A reload was rejected (the previous policy stays).
    pub fn reload_failed(&self) {
        self.reloads
            .get_or_create(&ResultLabels { result: "failure" })
            .inc();
    }

    /// Counts a reload's outcome.
    pub fn reload_result<T, E>(&self, r: &Result<T, E>) {
        match r {
            Ok(_) => self.reload_succeeded(),
            Err(_) => self.reload_failed(),
        }
    }

    /// One decision (`verdict`: `allow`, `deny` or `would_deny`).
    pub fn decision(
        &self,
        path: &'static str,
        verdict: &'static str,
        reason: Reason,
        workload: &str,
    ) {
        self.decisions
            .get_or_create(&DecisionLabels {
                path,
                verdict,
                reason: reason.code(),
                workload: workload.into(),
            })
            .inc();
    }

    /// One proxy decision: counted in `proxy_decisions` and `decisions{path="proxy"}`.
    pub fn proxy_decision(
        &self,
        protocol: &str,
        verdict: &'static str,
        reason: Reason,
        workload: &str,
    ) {
        self.proxy_decisions
            .get_or_create(&ProxyDecisionLabels {
                protocol: protocol.into(),
                verdict,
                reason: reason.code(),
                workload: workload.into(),
            })
            .inc();
        self.decision("proxy", verdict, reason, workload);
    }

    /// One denial (or would-be denial) of `workload` to `destination`, in its own series while
    /// fewer than [`DENIED_DESTINATION_SERIES`] exist, else under `destination="other"`.
    pub fn denied_destination(&self, workload: &str, destination: &str) {
        let labels = DestinationLabels {
            workload: workload.into(),
            destination: destination.into(),
        };
        let admitted = {
            let mut seen = self
                .destination_series
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            seen.contains(&labels)
                || (seen.len() < DENIED_DESTINATION_SERIES && seen.insert(labels.clone()))
        };
        let labels = if admitted {
            labels
        } else {
            DestinationLabels {
                workload: labels.workload,
                destination: "other".into(),
            }
        };
        self.denied_destinations.get_or_create(&labels).inc();
    }

    /// Deny events not logged (rate limit), by path.
    pub fn suppressed(&self, path: &'static str, n: u64) {
        self.suppressed
            .get_or_create(&PathLabels { path })
            .inc_by(n);
    }

    /// The proxy accepted a connection whose first bytes were `protocol`.
    pub fn proxy_connection(&self, protocol: &'static str) {
        self.proxy_connections
            .get_or_create(&ProtocolLabels { protocol })
            .inc();
    }

    /// The proxy opened a connection (`passthrough_proxy_connections_active` + 1).
    pub fn proxy_connection_opened(&self) {
        self.proxy_active.inc();
    }

    /// A connection counted by [`Metrics::proxy_connection_opened`] ended.
    pub fn proxy_connection_closed(&self) {
        self.proxy_active.dec();
    }

    /// How long classifying the first bytes took.
    pub fn peek_time(&self, d: Duration) {
        self.peek.observe(d.as_secs_f64());
    }

    /// Counters of bytes relayed for `workload`: (up, down).
    pub fn bytes_counters(&self, workload: &str) -> (Counter, Counter) {
        let get = |direction| {
            self.proxy_bytes.get_or_create_owned(&BytesLabels {
                direction,
                workload: workload.into(),
            })
        };
        (get("up"), get("down"))
    }

    /// An upstream connect of the proxy failed.
    pub fn upstream_connect_error(&self, workload: &str) {
        self.connect_errors
            .get_or_create(&WorkloadLabels {
                workload: workload.into(),
            })
            .inc();
    }

    /// The Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// The OpenMetrics text format (ends with `# EOF`).
    pub fn render_openmetrics(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Rendered for a request's `Accept` header: (content type, body).
    pub fn render_for(&self, accept: Option<&str>) -> (&'static str, String) {
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            (OPENMETRICS_TEXT, self.render_openmetrics())
        } else {
            (PROMETHEUS_TEXT, self.render())
        }
    }
}

/// A minimal parser of the Prometheus text format, for tests: `(name, labels, value)` per sample.
pub fn parse_text(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
            None => (head, BTreeMap::new()),
        };
        out.push((name.to_string(), labels, value));
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((k, after)) = rest.split_once("=\"") {
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => val.push(c),
            }
        }
        out.insert(k.trim_start_matches(',').trim().to_string(), val);
        rest = &after[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::Capacities;

    fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        parse_text(text)
            .into_iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let m = Metrics::new();
        // No kernel source yet: no kernel families (rather than zeros that would lie).
        assert!(!m.render().contains("passthrough_kernel_decisions"));
        m.decision("kernel", "deny", Reason::NoMatch, "w");
        m.suppressed("kernel", 1);
        m.proxy_connection("tls");
        m.proxy_decision("tls", "deny", Reason::NoMatch, "w");
        m.bytes_counters("w").0.inc();
        m.upstream_connect_error("w");
        m.policy_applied(
            1,
            [],
            MapUsage::default(),
            Capacities::default().map_capacity(),
        );
        let text = m.render();
        for name in [
            "passthrough_decisions_total",
            "passthrough_deny_events_suppressed_total",
            "passthrough_proxy_connections_total",
            "passthrough_proxy_connections_active",
            "passthrough_proxy_decisions_total",
            "passthrough_proxy_bytes_total",
            "passthrough_proxy_peek_seconds",
            "passthrough_proxy_upstream_connect_errors_total",
            "passthrough_policy_generation",
            "passthrough_policy_reloads_total",
            "passthrough_map_entries",
            "passthrough_map_capacity",
        ] {
            let base = name.trim_end_matches("_total");
            assert!(
                text.contains(&format!("# TYPE {base}")),
                "{name} missing:\n{text}"
            );
            assert!(
                text.contains(&format!("# HELP {base}")),
                "{name} has no HELP:\n{text}"
            );
        }
        assert_eq!(
            sample(
                &text,
                "passthrough_policy_reloads_total",
                &[("result", "failure")]
            ),
            Some(0.0)
        );
    }

    #[test]
    fn counts_decisions_reloads_and_map_usage() {
        let m = Metrics::new();
        m.policy_applied(
            3,
            [(42, "web".to_string())],
            MapUsage {
                rules_v4: 10,
                range_blocks_v4: 4,
                rules_v6: 2,
                workloads: 1,
            },
            Capacities {
                rules: 100,
                workloads: 8,
            }
            .map_capacity(),
        );
        m.policy_applied(
            4,
            [(42, "web".to_string())],
            MapUsage {
                rules_v4: 7,
                range_blocks_v4: 3,
                rules_v6: 2,
                workloads: 1,
            },
            Capacities {
                rules: 100,
                workloads: 8,
            }
            .map_capacity(),
        );
        m.reload_succeeded();
        m.reload_result::<(), ()>(&Err(()));
        m.reload_failed();
        let web = m.workload_name(42);
        assert_eq!(web, "web");
        assert_eq!(m.workload_name(0), "");
        assert_eq!(m.workload_name(7), "cgroup-7");
        m.decision("kernel", "deny", Reason::NoMatch, &web);
        m.decision("kernel", "deny", Reason::NoMatch, &web);
        m.proxy_decision("tls", "allow", Reason::DomainMatch, &web);
        m.proxy_decision("http1", "would_deny", Reason::NoMatch, "");
        m.suppressed("kernel", 5);
        m.peek_time(Duration::from_millis(3));
        let (up, down) = m.bytes_counters(&web);
        up.inc_by(100);
        down.inc_by(2000);
        m.upstream_connect_error(&web);
        let text = m.render();
        let s = |n, l: &[(&str, &str)]| sample(&text, n, l);
        assert_eq!(s("passthrough_policy_generation", &[]), Some(4.0));
        assert_eq!(
            s("passthrough_policy_reloads_total", &[("result", "success")]),
            Some(1.0)
        );
        assert_eq!(
            s("passthrough_policy_reloads_total", &[("result", "failure")]),
            Some(2.0)
        );
        assert_eq!(
            s(
                "passthrough_map_entries",
                &[("map", "rules_v4"), ("set", "active")]
            ),
            Some(7.0)
        );
        assert_eq!(
            s(
                "passthrough_map_entries",
                &[("map", "rules_v4"), ("set", "previous")]
            ),
            Some(10.0)
        );
        assert_eq!(
            s("passthrough_map_capacity", &[("map", "workloads")]),
            Some(8.0)
        );
        assert_eq!(
            s(
                "passthrough_map_entries",
                &[("map", "range_blocks_v4"), ("set", "active")]
            ),
            Some(3.0)
        );
        // 100 rules: 50 per generation / 8 per block, plus the minimum slack of 64 blocks.
        assert_eq!(
            s("passthrough_map_capacity", &[("map", "range_blocks_v4")]),
            Some(71.0)
        );
        assert_eq!(
            s(
                "passthrough_decisions_total",
                &[
                    ("path", "kernel"),
                    ("verdict", "deny"),
                    ("reason", "no_match"),
                    ("workload", "web")
                ]
            ),
            Some(2.0)
        );
        assert_eq!(
            s(
                "passthrough_decisions_total",
                &[("path", "proxy"), ("verdict", "would_deny")]
            ),
            Some(1.0)
        );
        assert_eq!(
            s(
                "passthrough_proxy_decisions_total",
                &[
                    ("protocol", "tls"),
                    ("verdict", "allow"),
                    ("workload", "web")
                ]
            ),
            Some(1.0)
        );
        assert_eq!(
            s(
                "passthrough_deny_events_suppressed_total",
                &[("path", "kernel")]
            ),
            Some(5.0)
        );
        assert_eq!(
            s(
                "passthrough_proxy_bytes_total",
                &[("direction", "down"), ("workload", "web")]
            ),
            Some(2000.0)
        );
        assert_eq!(
            s(
                "passthrough_proxy_upstream_connect_errors_total",
                &[("workload", "web")]
            ),
            Some(1.0)
        );
        assert_eq!(s("passthrough_proxy_peek_seconds_count", &[]), Some(1.0));
        assert!(
            s(
                "passthrough_policy_last_reload_success_timestamp_seconds",
                &[]
            )
            .unwrap()
                > 1.7e9
        );
        // OpenMetrics flavour: same samples, EOF marker.
        let om = m.render_openmetrics();
        assert!(om.trim_end().ends_with("# EOF"));
        assert_eq!(sample(&om, "passthrough_policy_generation", &[]), Some(4.0));
        assert_eq!(
            m.render_for(Some("application/openmetrics-text; version=1.0.0"))
                .0,
            OPENMETRICS_TEXT
        );
        assert_eq!(m.render_for(None).0, PROMETHEUS_TEXT);
    }

    #[test]
    fn kernel_counters_are_read_at_scrape_time() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let m = Metrics::new();
        let n = Arc::new(AtomicU64::new(1));
        let n2 = n.clone();
        m.set_kernel_counters(move || {
            KernelCounter::all()
                .map(|(_, c)| {
                    (
                        c,
                        match c {
                            KernelCounter::Decided(Reason::NoMatch) => n2.load(Ordering::Relaxed),
                            KernelCounter::KernelSni(Reason::DomainCandidates) => 3,
                            KernelCounter::KernelSni(Reason::NoSni) => 2,
                            _ => 0,
                        },
                    )
                })
                .collect::<Vec<_>>()
        });
        let t1 = m.render();
        assert_eq!(
            sample(
                &t1,
                "passthrough_kernel_decisions_total",
                &[("verdict", "deny"), ("reason", "no_match")]
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t1,
                "passthrough_kernel_decisions_total",
                &[("verdict", "allow"), ("reason", "address_match")]
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &t1,
                "passthrough_kernel_decisions_total",
                &[("reason", "events_dropped")]
            ),
            None
        );
        // The TLS fast path's counters, told apart by their path.
        assert_eq!(
            sample(
                &t1,
                "passthrough_kernel_decisions_total",
                &[
                    ("path", "kernel-sni"),
                    ("verdict", "direct"),
                    ("reason", "domain_candidates")
                ]
            ),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &t1,
                "passthrough_kernel_decisions_total",
                &[
                    ("path", "kernel"),
                    ("verdict", "redirect"),
                    ("reason", "domain_candidates")
                ]
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &t1,
                "passthrough_kernel_decisions_total",
                &[
                    ("path", "kernel-sni"),
                    ("verdict", "deny"),
                    ("reason", "no_sni")
                ]
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(&t1, "passthrough_kernel_deny_events_dropped_total", &[]),
            Some(0.0)
        );
        n.store(5, Ordering::Relaxed);
        let t2 = m.render();
        assert_eq!(
            sample(
                &t2,
                "passthrough_kernel_decisions_total",
                &[("verdict", "deny"), ("reason", "no_match")]
            ),
            Some(5.0)
        );
        assert!(
            t2.contains("# TYPE passthrough_kernel_decisions_total counter"),
            "{t2}"
        );
    }

    #[test]
    fn denied_destination_series_are_bounded() {
        let m = Metrics::new();
        m.denied_destination("web", "203.0.113.7:80");
        m.denied_destination("web", "203.0.113.7:80");
        for i in 0..DENIED_DESTINATION_SERIES + 10 {
            m.denied_destination("scan", &format!("198.51.{}.{}:443", i / 256, i % 256));
        }
        let text = m.render();
        let series: Vec<_> = parse_text(&text)
            .into_iter()
            .filter(|(n, _, _)| n == "passthrough_denied_destinations_total")
            .collect();
        // The limit, plus the one `other` series of the workload that went past it.
        assert_eq!(series.len(), DENIED_DESTINATION_SERIES + 1);
        assert_eq!(
            sample(
                &text,
                "passthrough_denied_destinations_total",
                &[("workload", "web"), ("destination", "203.0.113.7:80")]
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                "passthrough_denied_destinations_total",
                &[("workload", "scan"), ("destination", "other")]
            ),
            Some(11.0)
        );
        // A pair admitted before the limit keeps its own series.
        m.denied_destination("web", "203.0.113.7:80");
        assert_eq!(
            sample(
                &m.render(),
                "passthrough_denied_destinations_total",
                &[("workload", "web"), ("destination", "203.0.113.7:80")]
            ),
            Some(3.0)
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.decision("kernel", "deny", Reason::NoMatch, "we\"ird\\name");
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                "passthrough_decisions_total",
                &[("workload", "we\"ird\\name")]
            ),
            Some(1.0)
        );
    }
}
