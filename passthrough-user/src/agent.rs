//! `passthrough run`: the node agent in the foreground.
//!
//! Start-up order matters for safety: policies are read and validated, the programs loaded and
//! the first plan written *before* anything is attached, so a program never runs against empty
//! maps; any error before the last attach drops the [`Kernel`], which detaches what was attached.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use passthrough_common::AGENT_MARK;
use passthrough_policy::{
    self as policy, Mode, Resolver, Workload,
    plan::{self, PlanOptions},
};
use passthrough_proxy::{
    DomainDestination, Proxy, ProxyConfig, ProxyPolicy, kernel_relay::KernelRelay,
};

use crate::{
    admin::{self, AdminState},
    bpffs, cgroup,
    events::{self, Reporter},
    kernel::{BpfLogLevel, Capacities, Kernel, LoadOptions, ProxySettings},
    metrics::Metrics,
};

/// Arguments of `passthrough run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// MeshPassthrough policy files or directories (`*.yaml`, `*.yml`, `*.json`).
    #[arg(long, required_unless_present = "kubernetes", num_args = 1..)]
    pub policy: Vec<PathBuf>,
    /// A workload cgroup v2 directory (absolute, or relative to the cgroup2 mount); no labels.
    #[arg(long)]
    pub cgroup: Vec<PathBuf>,
    /// Workloads file: a YAML list of `{name, cgroup, labels}`.
    #[arg(long)]
    pub workloads: Option<PathBuf>,
    /// Cgroup(s) to attach the programs to. Default: the workload cgroups, minus those below
    /// another one. Every workload must be at or below an attachment.
    #[arg(long = "attach-cgroup")]
    pub attach_cgroup: Vec<PathBuf>,
    /// Only policies of this mesh are used.
    #[arg(long, default_value = "default")]
    pub mesh: String,
    /// Admin HTTP address (`/readyz`, `/healthz`).
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin_addr: SocketAddr,
    /// DNS resolver (`IP` or `IP:PORT`, `[IPv6]:PORT`; port 53 if none) that workloads may
    /// reach over UDP at that port in every mode, and that the proxy's destination check asks.
    /// Default: the nameservers of /etc/resolv.conf (port 53; the proxy then uses the system's
    /// resolver configuration).
    #[arg(long)]
    pub resolver: Vec<Resolver>,
    /// Pod/service ranges that are never egress (always allowed).
    #[arg(long = "internal-cidr")]
    pub internal_cidr: Vec<IpNet>,
    /// Mode for workloads no policy selects (and sockets in no workload).
    #[arg(long, default_value = "All", value_parser = parse_mode)]
    pub unselected_mode: Mode,
    /// Compute and count every decision, enforce none.
    #[arg(long)]
    pub audit: bool,
    /// Port of the proxy for redirected connections on 127.0.0.1 and `[::1]` (workloads in the
    /// host network namespace). 0 disables the proxy: Domain-only destinations are denied.
    #[arg(long, default_value_t = 15001)]
    pub proxy_port: u16,
    /// Proxy address for workloads in their own network namespace (pods), e.g. a link-local
    /// address on a dummy interface. Without it, pods' Domain-only destinations are denied.
    #[arg(long)]
    pub proxy_addr: Vec<SocketAddr>,
    /// What the proxy does with the address a client dialled when a Domain match allowed.
    #[arg(long, default_value = "verify", value_parser = domain_destination_parser())]
    pub domain_destination: DomainDestination,
    /// bpffs directory for the agent's pinned state (bpffs is mounted at /sys/fs/bpf if
    /// missing). Pins keep enforcement running if the agent dies; a restarted agent adopts them.
    #[arg(long, default_value = "/sys/fs/bpf/passthrough")]
    pub state_dir: PathBuf,
    /// On SIGTERM/SIGINT leave the programs attached and the maps pinned (rolling upgrades: the
    /// next agent adopts them with no window). Default: detach and unpin everything.
    #[arg(long)]
    pub keep_on_exit: bool,
    /// Rule entries per address family the maps hold, across both generations (a policy
    /// change needs room for the old and the new plan side by side). The IPv4 range array is
    /// preallocated for it: about 8.5 bytes per rule, 18 MiB at the default. Pinned maps keep
    /// the capacity they were created with.
    #[arg(long, default_value_t = Capacities::default().rules, value_parser = clap::value_parser!(u32).range(1_024..=1 << 26))]
    pub rule_capacity: u32,
    /// Do not attach the raw/ping socket backstop (`cgroup_skb/egress`, ~0.05–0.08 µs per
    /// packet of every workload): raw-socket packets and unconnected ping-socket sends are then
    /// not judged. Only for nodes whose workloads have no `CAP_NET_RAW` and no ping sockets
    /// (docs/security.md L1, L2).
    #[arg(long)]
    pub no_raw_socket_backstop: bool,
    /// Opt-in kernel relay: after this many userspace reads, an allowed TLS connection's bytes
    /// are moved by the kernel (sockmap) instead of the proxy. Raises requests/s of busy
    /// keep-alive TLS connections but costs the node more CPU per request (BENCHMARKS.md);
    /// `off` (default): always in userspace. See docs/design.md.
    #[arg(long, value_name = "READS|off", default_value = "off", value_parser = parse_kernel_relay)]
    pub kernel_relay_after: KernelRelayAfter,
    /// Diagnostics from the eBPF programs (aya-log), forwarded into this log under the target
    /// `passthrough::bpf`: `error` (map failures), `warn` (dropped deny events, refused
    /// redirects), `debug` (every denial). `off` (default) costs the programs nothing.
    #[arg(long, value_enum, default_value_t = BpfLogLevel::Off)]
    pub bpf_log_level: BpfLogLevel,
    /// Kubernetes mode: discover this node's pods, their identities and the MeshPassthrough
    /// resources from the API server (see docs/kubernetes.md) instead of files.
    #[arg(long, conflicts_with_all = ["policy", "cgroup", "workloads", "attach_cgroup"])]
    pub kubernetes: bool,
    #[command(flatten)]
    pub kube: crate::kube_agent::KubeArgs,
}

/// `--kernel-relay-after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelRelayAfter {
    /// No kernel relay.
    Off,
    /// Switch after this many userspace reads.
    Reads(u32),
}

fn parse_kernel_relay(s: &str) -> Result<KernelRelayAfter, String> {
    if s == "off" {
        return Ok(KernelRelayAfter::Off);
    }
    s.parse::<u32>()
        .map(KernelRelayAfter::Reads)
        .map_err(|_| format!("expected a number of reads or `off`, got `{s}`"))
}

/// `--domain-destination`'s values, with their help, from the proxy's list.
fn domain_destination_parser() -> impl clap::builder::TypedValueParser<Value = DomainDestination> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser as _};
    PossibleValuesParser::new(
        DomainDestination::ALL
            .iter()
            .map(|(_, name, help)| PossibleValue::new(*name).help(*help)),
    )
    .try_map(|s| s.parse::<DomainDestination>())
}

/// Parses `All | Matched | None` (case as Kuma writes them).
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "All" => Ok(Mode::All),
        "Matched" => Ok(Mode::Matched),
        "None" => Ok(Mode::None),
        _ => Err(format!("{s:?} is not a mode; one of All, Matched, None")),
    }
}

/// Everything one apply needs, read from disk and checked.
struct Inputs {
    policies: policy::PolicySet,
    workloads: Vec<(Workload, cgroup::CgroupDir)>,
}

fn read_inputs(args: &RunArgs, mount: &Path) -> anyhow::Result<Inputs> {
    let policies =
        policy::load_policies(&args.policy, &args.mesh).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut workloads: Vec<Workload> = args
        .cgroup
        .iter()
        .map(|p| Workload {
            name: p.file_name().map_or_else(
                || p.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            cgroup: p.clone(),
            labels: Default::default(),
        })
        .collect();
    if let Some(file) = &args.workloads {
        workloads.extend(policy::load_workloads(file).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    if workloads.is_empty() {
        bail!("no workloads: give --cgroup PATH or --workloads FILE");
    }
    let from_flags = args.cgroup.len();
    let mut resolved = Vec::with_capacity(workloads.len());
    for (i, w) in workloads.into_iter().enumerate() {
        match cgroup::resolve(&w.cgroup, mount) {
            Ok(dir) => resolved.push((w, dir)),
            // A workloads-file entry whose cgroup does not exist (a pod that is gone, or not yet
            // started): no socket can be in it, so it is skipped rather than failing the whole
            // apply — the file is regenerated from the node's pods and is often a step behind.
            // A `--cgroup` flag that names nothing is an operator error and stays one.
            Err(cgroup::CgroupError::Io { path, source })
                if i >= from_flags && source.kind() == std::io::ErrorKind::NotFound =>
            {
                warn!(workload = %w.name, cgroup = %path.display(), "workload cgroup does not exist; skipped");
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("workload {:?}", w.name))),
        }
    }
    if resolved.is_empty() {
        bail!("no workload cgroup exists (every workloads-file entry names a missing cgroup)");
    }
    Ok(Inputs {
        policies,
        workloads: resolved,
    })
}

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

/// Merges every workload's configuration once; the kernel plan and the proxy policy are both
/// built from it, so the two halves always decide with the same generation of policy.
///
/// Workloads selected by the same policies share one merged configuration (computed once).
fn merge_all(inputs: &Inputs, unselected: Mode) -> Merged {
    let (confs, of) = inputs
        .policies
        .merge_all(inputs.workloads.iter().map(|(w, _)| w), unselected);
    Merged {
        confs,
        of: inputs
            .workloads
            .iter()
            .map(|(_, dir)| dir.id)
            .zip(of)
            .collect(),
    }
}

/// Merged configurations and, per workload cgroup id, the index of its configuration.
struct Merged {
    confs: Vec<policy::MergedConf>,
    of: Vec<(u64, usize)>,
}

/// Compiles the plan for the kernel's next generation.
fn compile(kernel: &Kernel, merged: &Merged, opts: &PlanOptions) -> plan::KernelPlan {
    let refs: Vec<(u64, &policy::MergedConf)> = merged
        .of
        .iter()
        .map(|(id, i)| (*id, &merged.confs[*i]))
        .collect();
    plan::compile(kernel.next_generation(), &refs, opts)
}

/// The proxy's view of the same merged configuration.
fn proxy_policy(merged: &Merged, opts: &PlanOptions, unselected: Mode) -> ProxyPolicy {
    ProxyPolicy {
        workloads: merged
            .of
            .iter()
            .map(|(id, i)| (*id, merged.confs[*i].clone()))
            .collect(),
        unmatched: policy::MergedConf {
            mode: unselected,
            matches: Vec::new(),
            policies: Vec::new(),
        },
        decide: policy::DecideOptions {
            internal: opts.internal.clone(),
            resolvers: opts.resolvers.clone(),
        },
    }
}

pub(crate) fn proxy_settings(args: &RunArgs) -> anyhow::Result<ProxySettings> {
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

/// Picks attachment points: explicit ones, or the workload cgroups that have no workload
/// ancestor. Fails when a workload is not below any attachment.
fn attach_points(args: &RunArgs, mount: &Path, inputs: &Inputs) -> anyhow::Result<Vec<PathBuf>> {
    let points: Vec<PathBuf> = if args.attach_cgroup.is_empty() {
        let all: Vec<&PathBuf> = inputs.workloads.iter().map(|(_, d)| &d.path).collect();
        let mut pts: Vec<PathBuf> = all
            .iter()
            .filter(|p| !all.iter().any(|q| q != *p && p.starts_with(q)))
            .map(|p| (*p).clone())
            .collect();
        pts.sort();
        pts.dedup();
        pts
    } else {
        let mut pts = Vec::new();
        for p in &args.attach_cgroup {
            pts.push(
                cgroup::resolve(p, mount)
                    .with_context(|| "--attach-cgroup")?
                    .path,
            );
        }
        pts
    };
    for (w, dir) in &inputs.workloads {
        if !points.iter().any(|p| dir.path.starts_with(p)) {
            bail!(
                "workload {:?} ({}) is not at or below any --attach-cgroup",
                w.name,
                dir.path.display()
            );
        }
    }
    Ok(points)
}

/// Runs the agent until SIGTERM/SIGINT. SIGHUP re-reads policies and workloads.
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

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.kubernetes {
        return crate::kube_agent::run(args).await;
    }
    let nofile = raise_nofile_limit();
    info!(nofile, "open-files limit");
    let mount = cgroup::cgroup2_mount()?;
    let inputs = read_inputs(&args, &mount)?;
    let points = attach_points(&args, &mount, &inputs)?;
    let opts = plan_options(&args);

    let bpf_root = Path::new("/sys/fs/bpf");
    if bpffs::ensure_mounted(bpf_root).context("mounting bpffs at /sys/fs/bpf")? {
        info!(path = %bpf_root.display(), "mounted bpffs");
    }

    let admin_listener = admin::bind(args.admin_addr)
        .await
        .with_context(|| format!("--admin-addr {}", args.admin_addr))?;
    let flags = if args.audit {
        passthrough_common::flags::AUDIT
    } else {
        0
    };
    let proxy_listeners = bind_proxy(&args).await?;
    let mut kernel = Kernel::load_with(
        Capacities {
            rules: args.rule_capacity,
            ..Capacities::default()
        },
        flags,
        AGENT_MARK,
        proxy_settings(&args)?,
        Some(&args.state_dir),
        load_options(&args),
    )?;
    let _bpf_log_task = start_bpf_log(&mut kernel, args.bpf_log_level);
    kernel.set_raw_socket_backstop(!args.no_raw_socket_backstop);
    if kernel.adopted() {
        info!(state = %args.state_dir.display(), generation = kernel.policy_generation(), "adopted pinned state of a previous agent");
    }
    // obs: metrics and deny events (metrics.rs, events.rs).
    let metrics = Arc::new(Metrics::new());
    let reporter = Arc::new(Reporter::new(metrics.clone(), Default::default()));
    let events_task = start_deny_events(&mut kernel, &args.state_dir, &reporter);
    let merged = merge_all(&inputs, args.unselected_mode);
    let proxy_state = Arc::new(ArcSwap::from_pointee(proxy_policy(
        &merged,
        &opts,
        args.unselected_mode,
    )));
    let shutdown = CancellationToken::new();
    let proxy_tasks = start_proxy(
        &args,
        &mut kernel,
        proxy_listeners,
        &proxy_state,
        &reporter,
        &shutdown,
    )?;
    let (generation, (v4, v6)) = apply_plan(&mut kernel, &merged, &opts, &inputs, &metrics)?;
    for p in &points {
        kernel.attach(p)?;
        info!(cgroup = %p.display(), "attached");
    }
    for removed in kernel.retire_stale() {
        info!(pin = %removed.display(), "removed stale pinned state");
    }
    retire_previous(&mut kernel, &metrics);
    info!(
        generation,
        policies = inputs.policies.len(),
        workloads = inputs.workloads.len(),
        rules_v4 = v4,
        rules_v6 = v6,
        audit = args.audit,
        "policy applied"
    );

    let admin_state = Arc::new(AdminState {
        metrics: Some(metrics.clone()),
        ..AdminState::default()
    }); // obs
    admin_state.generation.store(generation, Ordering::Release);
    admin_state.ready.store(true, Ordering::Release);
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state.clone()));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Policy files and the workloads file are watched; a change reloads like SIGHUP.
    let mut watched: Vec<PathBuf> = args.policy.clone();
    watched.extend(args.workloads.clone());
    let (_watcher, mut changed) = crate::watch::watch(&watched).context("watching policy files")?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = async { tokio::select! { _ = hup.recv() => {}, _ = changed.recv() => {} } } => {
                let r = reload(&args, &mount, &points, &opts, &mut kernel, &proxy_state, &metrics);
                metrics.reload_result(&r); // obs
                match r {
                    Ok(g) => admin_state.generation.store(g, Ordering::Release),
                    Err(e) => error!(error = %format!("{e:#}"), "reload rejected; the previous policy stays in force"),
                }
            }
        }
    }
    info!("shutting down: detaching programs");
    admin_state.ready.store(false, Ordering::Release);
    admin_task.abort();
    events_task.abort(); // obs
    shutdown.cancel();
    for t in proxy_tasks {
        let _ = t.await;
    }
    let counters = kernel.counters();
    if args.keep_on_exit {
        info!("--keep-on-exit: programs stay attached, maps pinned");
    }
    kernel.shutdown(args.keep_on_exit)?;
    info!(?counters, "stopped");
    Ok(())
}

/// Starts the proxy on `listeners` (none: the proxy is off) with the kernel's orig-dst map and,
/// if asked for and available, the kernel relay. Returns the serving tasks.
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
        if let KernelRelayAfter::Reads(reads) = args.kernel_relay_after {
            // An accelerator, not a control: without it every byte still flows, in userspace.
            match kernel.take_relay_maps() {
                Ok(Some(maps)) => {
                    info!(
                        after_reads = reads,
                        "kernel relay on for allowed TLS connections"
                    );
                    proxy = proxy.with_kernel_relay(Arc::new(KernelRelay::new(maps, reads)));
                }
                Ok(None) => warn!("kernel relay maps already taken; relaying in userspace"),
                Err(e) => warn!(error = %e, "kernel relay unavailable; relaying in userspace"),
            }
        }
        let proxy = Arc::new(proxy);
        for l in proxy_listeners {
            info!(addr = %l.local_addr()?, "proxy listening");
            proxy_tasks.push(tokio::spawn(proxy.clone().serve(l, shutdown.clone())));
        }
    }
    Ok(proxy_tasks)
}

/// Compiles `merged` and flips the kernel to it (at start-up and on every reload); returns the
/// new generation and the (IPv4, IPv6) entry counts, and records both in the metrics.
fn apply_plan(
    kernel: &mut Kernel,
    merged: &Merged,
    opts: &PlanOptions,
    inputs: &Inputs,
    metrics: &Metrics,
) -> anyhow::Result<(u64, (usize, usize))> {
    let plan = compile(kernel, merged, opts);
    let counts = plan.entry_counts();
    let usage = plan.usage(); // obs
    let generation = kernel.apply(plan)?;
    let names = inputs.workloads.iter().map(|(w, d)| (d.id, w.name.clone())); // obs
    metrics.policy_applied(generation, names, usage, kernel.capacities().map_capacity()); // obs
    Ok((generation, counts))
}

fn reload(
    args: &RunArgs,
    mount: &Path,
    points: &[PathBuf],
    opts: &PlanOptions,
    kernel: &mut Kernel,
    proxy_state: &ArcSwap<ProxyPolicy>,
    metrics: &Metrics,
) -> anyhow::Result<u64> {
    let inputs = read_inputs(args, mount)?;
    for (w, dir) in &inputs.workloads {
        if !points.iter().any(|p| dir.path.starts_with(p)) {
            bail!(
                "workload {:?} ({}) is not below an attached cgroup; restart the agent to attach there",
                w.name,
                dir.path.display()
            );
        }
    }
    let merged = merge_all(&inputs, args.unselected_mode);
    let (generation, (v4, v6)) = apply_plan(kernel, &merged, opts, &inputs, metrics)?;
    // The proxy follows right after the kernel flip: a connection redirected under the new
    // plan is judged by the new policy.
    proxy_state.store(Arc::new(proxy_policy(&merged, opts, args.unselected_mode)));
    info!(
        generation,
        policies = inputs.policies.len(),
        workloads = inputs.workloads.len(),
        rules_v4 = v4,
        rules_v6 = v6,
        "policy applied"
    );
    retire_previous(kernel, metrics);
    Ok(generation)
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

/// The [`LoadOptions`] of `passthrough run`.
pub(crate) fn load_options(args: &RunArgs) -> LoadOptions {
    LoadOptions {
        bpf_log_level: args.bpf_log_level,
        ..LoadOptions::default()
    }
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
