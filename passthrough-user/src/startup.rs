//! Start-up and run-time plumbing both agents share (the file-driven [`crate::agent`] and the
//! Kubernetes [`crate::kube_agent`]): the open-files limit, the resolvers and plan options, the
//! proxy's listeners and the proxy itself, the deny-event reader, retiring the previous plan.

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::{Context as _, bail};
use arc_swap::ArcSwap;
use passthrough_policy::{Resolver, plan::PlanOptions};
use passthrough_proxy::{Proxy, ProxyConfig, ProxyPolicy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    events::{self, Reporter},
    kernel::{BpfLogLevel, Capacities, Kernel, LoadOptions, ProxySettings},
    metrics::Metrics,
    monitor::{KernelMonitor, Monitor},
    run_args::RunArgs,
};

/// The resolvers UDP may reach: `--resolver`, else the nameservers of `/etc/resolv.conf`.
pub(crate) fn resolvers(args: &RunArgs) -> Vec<Resolver> {
    if !args.resolver.is_empty() {
        return args.resolver.clone();
    }
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    Resolver::from_resolv_conf(&text)
}

/// What `run` compiles its plans with besides the policies: internal ranges, resolvers (each
/// at its port, exactly as the proxy's destination check and `explain` see them) and the
/// unselected mode.
pub fn plan_options(args: &RunArgs) -> PlanOptions {
    PlanOptions {
        internal: args.internal_cidr.clone(),
        resolvers: resolvers(args),
        unmatched_mode: Some(args.unselected_mode),
    }
}

fn proxy_settings(args: &RunArgs) -> anyhow::Result<ProxySettings> {
    let mut s = ProxySettings {
        host_port: args.proxy_port,
        ..Default::default()
    };
    for a in &args.proxy_addr {
        match a {
            SocketAddr::V4(v4) => s.pod_v4 = Some(*v4),
            SocketAddr::V6(v6) => s.pod_v6 = Some(*v6),
        }
    }
    if let (Some(v4), Some(v6)) = (s.pod_v4, s.pod_v6)
        && v4.port() != v6.port()
    {
        bail!("--proxy-addr: the IPv4 and IPv6 addresses must use the same port");
    }
    if args.proxy_port == 0 && !args.proxy_addr.is_empty() {
        bail!("--proxy-addr needs the proxy (--proxy-port must not be 0)");
    }
    Ok(s)
}

/// Binds the proxy listeners: loopback for the host netns (IPv6 only where the host has ::1),
/// plus every `--proxy-addr`. Bound before anything is attached, so a redirect never finds
/// nobody listening.
pub(crate) async fn bind_proxy(args: &RunArgs) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    if args.proxy_port == 0 {
        return Ok(out);
    }
    let v4 = SocketAddr::from(([127, 0, 0, 1], args.proxy_port));
    out.push(proxy_listener(v4).with_context(|| format!("proxy listener {v4}"))?);
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, args.proxy_port));
    match proxy_listener(v6) {
        Ok(l) => out.push(l),
        Err(e) => warn!(addr = %v6, error = %e, "no IPv6 loopback proxy listener"),
    }
    for a in &args.proxy_addr {
        out.push(proxy_listener(*a).with_context(|| format!("--proxy-addr {a}"))?);
    }
    Ok(out)
}

/// Accept queue length of the proxy listeners (the kernel caps it at `net.core.somaxconn`,
/// 4096 by default). tokio's `TcpListener::bind` asks for 1024, which a burst of new
/// connections fills; a SYN dropped by a full queue waits the 1 s retransmission timeout.
const PROXY_BACKLOG: i32 = 4096;

/// A non-blocking listener on `addr` with [`PROXY_BACKLOG`], otherwise as
/// `TcpListener::bind` makes it (`SO_REUSEADDR`, the system's `IPV6_V6ONLY` default).
fn proxy_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(PROXY_BACKLOG)?;
    TcpListener::from_std(s.into())
}

/// Raises the soft open-files limit to the hard one: every relayed connection holds six
/// descriptors (two sockets, two splice pipes), so the usual soft limit of 1,024 would cap the
/// proxy at ~170 connections. Returns the limit now in force.
pub(crate) fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: valid in-pointer; raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// `--tls-fast-path=on` (the default): turns the fast path on in the kernel (before the first
/// plan, which then carries its flag). It needs the proxy (the first connection to a
/// destination, and every unverified one, takes it) and this kernel's `tcp_sock` offsets;
/// without either the agent runs with the fast path off and says why: every TLS connection
/// then takes the proxy, which judges it the same way. `--audit` also keeps it off.
pub(crate) fn enable_tls_fast_path(args: &RunArgs, kernel: &mut Kernel) {
    if !args.tls_fast_path {
        return;
    }
    if args.proxy_port == 0 {
        // On by default: not a warning when the operator turned the proxy off on purpose.
        info!("TLS fast path off: it needs the proxy, which --proxy-port 0 turns off");
        return;
    }
    if args.audit {
        // The kernel's decision skips the fast path under --audit (its judge never lets a
        // refused hello through); the proxy reports would-be denials as usual.
        info!(
            "TLS fast path off under --audit: every TLS connection takes the proxy, which reports would-be denials"
        );
        return;
    }
    if let Err(e) = kernel.enable_tls_fast_path() {
        warn!(error = %e, "TLS fast path unavailable on this kernel: every TLS connection takes the proxy");
    }
}

/// Starts the proxy on `listeners` (none: the proxy is off) with the kernel's orig-dst map and,
/// if on, the TLS fast path's learner. Returns the serving tasks.
pub(crate) fn start_proxy(
    args: &RunArgs,
    kernel: &mut Kernel,
    proxy_listeners: Vec<TcpListener>,
    proxy_state: &Arc<ArcSwap<ProxyPolicy>>,
    reporter: &Arc<Reporter>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut proxy_tasks = Vec::new();
    if !proxy_listeners.is_empty() {
        let orig = kernel
            .take_orig_dst_map()
            .context("orig-dst map already taken")?;
        let cfg = ProxyConfig {
            domain_destination: args.domain_destination,
            // Only explicit resolvers: without them hickory reads the system configuration
            // itself (options and search domains included).
            resolvers: args.resolver.clone(),
            audit: args.audit,
            ..ProxyConfig::default()
        };
        let mut proxy =
            Proxy::new(Arc::new(orig), proxy_state.clone(), cfg)?.with_report(reporter.clone());
        let fast = kernel.fast_path();
        if let Some(f) = &fast {
            proxy = proxy.with_fast_path(f.clone());
        }
        let proxy = Arc::new(proxy);
        if let Some(f) = fast {
            info!(
                "TLS fast path on: verified destinations go direct, ClientHellos are judged in the kernel"
            );
            let p = proxy.clone();
            let stop = shutdown.clone();
            proxy_tasks.push(tokio::spawn(async move {
                f.prewarm(p.destinations(), stop).await;
            }));
        }
        for l in proxy_listeners {
            info!(addr = %l.local_addr()?, "proxy listening");
            proxy_tasks.push(tokio::spawn(proxy.clone().serve(l, shutdown.clone())));
        }
    }
    Ok(proxy_tasks)
}

/// Removes the plan the last flip retired, right away rather than at the start of the next
/// apply: the next policy change does not pay for deleting it (about a second at a million
/// entries), and the tries hold one plan instead of two between changes. This runs on the
/// runtime's `block_on` thread, not a worker, so the proxy keeps serving meanwhile; connects
/// are not stalled either (lookups are lock-free while entries are deleted).
pub(crate) fn retire_previous(kernel: &mut Kernel, metrics: &Metrics) {
    let t = std::time::Instant::now();
    let removed = kernel.retire();
    metrics.previous_retired(); // obs
    tracing::debug!(
        removed,
        ms = t.elapsed().as_millis() as u64,
        "retired the previous plan"
    );
}

/// The [`LoadOptions`] of `passthrough run` (both modes): `--rule-capacity`, `--audit`, the
/// agent's mark, the proxy's addresses, `--state-dir`, `--bpf-log-level`.
pub(crate) fn load_options(args: &RunArgs) -> anyhow::Result<LoadOptions<'_>> {
    Ok(LoadOptions {
        caps: Capacities {
            rules: args.rule_capacity,
            ..Capacities::default()
        },
        flags: if args.audit {
            passthrough_common::flags::AUDIT
        } else {
            0
        },
        agent_mark: passthrough_common::AGENT_MARK,
        proxy: proxy_settings(args)?,
        state_dir: Some(&args.state_dir),
        bpf_log_level: args.bpf_log_level,
        object: None,
    })
}

/// Agent start-up: with `--bpf-log-level` other than `off`, spawns the reader of the programs'
/// aya-log records (into the `log` facade, which the agent's subscriber forwards to its log).
/// The task runs until aborted or dropped with the runtime.
pub(crate) fn start_bpf_log(
    kernel: &mut Kernel,
    level: BpfLogLevel,
) -> Option<tokio::task::JoinHandle<()>> {
    if level == BpfLogLevel::Off {
        return None;
    }
    let Some(logger) = kernel.take_bpf_logger() else {
        warn!("--bpf-log-level: the programs' log buffer is unavailable; no eBPF diagnostics");
        return None;
    };
    Some(tokio::spawn(async move {
        // SAFETY: the logger owns its ring buffer's map fd for its whole life and always
        // returns that fd; the AsyncFd owns the logger.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "--bpf-log-level: cannot poll the programs' log buffer");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

/// Attaches the egress backstop unless `--no-raw-socket-backstop`, and says plainly what is
/// then left unjudged.
pub(crate) fn set_backstop(kernel: &mut Kernel, args: &RunArgs) {
    kernel.set_raw_socket_backstop(!args.no_raw_socket_backstop);
    if args.no_raw_socket_backstop {
        warn!(
            "--no-raw-socket-backstop: raw and ping sockets, per-datagram source routes (IP_RETOPTS; type 2 IPv6 routing headers, unprivileged on kernels with CONFIG_IPV6_MIP6), source routes set through the 32-bit syscall entry or before the agent attached are not judged (docs/security.md)"
        );
    }
}

/// Agent start-up: takes the kernel's deny-event ring buffer, points the metrics at the
/// kernel counters (the pinned `COUNTERS` map under `state_dir`, else the map beside the ring
/// buffer) and spawns the event reader ([`events::read_kernel_events`]). The returned task runs
/// until aborted.
pub(crate) fn start_deny_events(
    kernel: &mut Kernel,
    state_dir: &Path,
    reporter: &Arc<Reporter>,
) -> tokio::task::JoinHandle<()> {
    let ring = kernel.take_deny_events();
    let pinned = crate::pins::map_pin(state_dir, "COUNTERS");
    let counters = crate::metrics::KernelCounters::from_pin(&pinned)
        .map_err(anyhow::Error::from)
        .or_else(|e| match &ring {
            Some(r) => events::counters_beside(r).map_err(|e2| e.context(e2)),
            None => Err(e),
        });
    match counters {
        Ok(c) => reporter.metrics().set_kernel_counters(c),
        Err(e) => warn!(error = %format!("{e:#}"), "metrics: kernel counters unavailable"),
    }
    match ring {
        Some(ring) => tokio::spawn(events::read_kernel_events(ring, reporter.clone())),
        None => {
            warn!("deny events: ring buffer already taken; kernel denials will not be logged");
            tokio::spawn(events::log_suppressed_forever(reporter.clone()))
        }
    }
}
/// Agent start-up: publishes kernel denials to `monitor`, spawns the reader of the programs'
/// monitor ring ([`crate::monitor::read_kernel_monitor`]) and, with `--decision-log`, the
/// decision log ([`crate::recorder`], a subscriber from now on). Returns the tasks (they run
/// until aborted).
pub(crate) fn start_monitor(
    args: &RunArgs,
    kernel: &mut Kernel,
    reporter: &Arc<Reporter>,
    monitor: &Arc<Monitor>,
    proxy_state: &Arc<ArcSwap<ProxyPolicy>>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    reporter.set_monitor(monitor.clone());
    let mut tasks = Vec::new();
    match kernel.take_monitor() {
        Some((ring, drops)) => tasks.push(tokio::spawn(crate::monitor::read_kernel_monitor(
            ring,
            drops,
            monitor.clone(),
            proxy_state.clone(),
        ))),
        None => {
            warn!("monitor: ring buffer already taken; allowed kernel decisions will not be shown")
        }
    }
    if let Some(dir) = &args.decision_log {
        tasks.push(
            crate::recorder::start(monitor, dir, args.decision_log_max_bytes)
                .with_context(|| format!("--decision-log {}", dir.display()))?,
        );
    }
    Ok(tasks)
}

/// The agent loop's once-a-second tick that renews the kernel report's lease
/// ([`renew_monitor`]).
pub(crate) fn monitor_lease_tick() -> tokio::time::Interval {
    let mut t = tokio::time::interval(std::time::Duration::from_secs(1));
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// Renews the kernel report's lease while someone watches ([`Kernel::renew_monitor`]): the
/// flag of an agent that is killed expires instead of staying on until the next agent starts.
pub(crate) fn renew_monitor(kernel: &mut Kernel) {
    if let Err(e) = kernel.renew_monitor() {
        warn!(error = %e, "monitor: could not renew the kernel report's lease");
    }
}

/// Writes what the monitor wants the programs to report into `CONFIG` (logged if it fails:
/// watchers then miss allowed kernel decisions; enforcement is not affected).
pub(crate) fn apply_monitor(kernel: &mut Kernel, w: KernelMonitor) {
    match kernel.set_monitor(w.on, u32::from(w.shift)) {
        Ok(()) => tracing::debug!(
            on = w.on,
            sample = 1u32 << w.shift,
            "monitor: kernel reporting"
        ),
        Err(e) => warn!(error = %e, "monitor: could not switch the kernel's reporting"),
    }
}
