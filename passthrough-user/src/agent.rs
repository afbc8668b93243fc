//! `passthrough run`: the node agent in the foreground.
//!
//! Start-up order matters for safety: policies are read and validated, the programs loaded and
//! the first plan written *before* anything is attached, so a program never runs against empty
//! maps; any error before the last attach drops the [`Kernel`], which detaches what was attached.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context as _, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use passthrough_policy::{
    self as policy, Mode, Workload,
    plan::{self, PlanOptions},
};
use passthrough_proxy::ProxyPolicy;

use crate::{
    admin::{self, AdminState},
    bpffs, cgroup,
    events::Reporter,
    kernel::Kernel,
    metrics::Metrics,
    monitor::Monitor,
    startup::{
        apply_monitor, bind_proxy, enable_tls_fast_path, load_options, monitor_lease_tick,
        raise_nofile_limit, renew_monitor, retire_previous, set_backstop, start_bpf_log,
        start_deny_events, start_monitor, start_proxy,
    },
};

// Where these lived before the two agents shared them; kept so callers need not know.
pub use crate::run_args::{RunArgs, parse_mode};
pub use crate::startup::plan_options;

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
    let shared: Vec<Arc<policy::MergedConf>> = merged.confs.iter().cloned().map(Arc::new).collect();
    ProxyPolicy {
        workloads: merged
            .of
            .iter()
            .map(|(id, i)| (*id, shared[*i].clone()))
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
    let proxy_listeners = bind_proxy(&args).await?;
    let mut kernel = Kernel::load(load_options(&args)?)?;
    let _bpf_log_task = start_bpf_log(&mut kernel, args.bpf_log_level);
    set_backstop(&mut kernel, &args);
    enable_tls_fast_path(&args, &mut kernel);
    if kernel.adopted() {
        info!(state = %args.state_dir.display(), generation = kernel.policy_generation(), "adopted pinned state of a previous agent");
    }
    // obs: metrics and deny events (metrics.rs, events.rs), the decision stream (monitor.rs).
    let metrics = Arc::new(Metrics::new());
    let reporter = Arc::new(Reporter::new(metrics.clone(), Default::default()));
    let events_task = start_deny_events(&mut kernel, &args.state_dir, &reporter);
    let monitor = Monitor::new(metrics.clone());
    let monitor_tasks = start_monitor(&args, &mut kernel, &reporter, &monitor)?;
    let mut kernel_wanted = monitor.kernel_wanted();
    let wanted = *kernel_wanted.borrow_and_update();
    kernel.set_monitor(wanted.on, u32::from(wanted.shift))?;
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
        monitor: Some(monitor.clone()),
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
    let mut lease_tick = monitor_lease_tick();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = lease_tick.tick() => renew_monitor(&mut kernel),
            // The sender lives in `monitor`, which outlives this loop: never an error here.
            r = kernel_wanted.changed() => {
                if r.is_ok() {
                    let w = *kernel_wanted.borrow_and_update();
                    apply_monitor(&mut kernel, w);
                }
            }
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
    for t in &monitor_tasks {
        t.abort();
    }
    // Programs left attached (--keep-on-exit) must not go on reporting allowed decisions into
    // a ring nobody reads any more: the next agent switches the report on again if it wants.
    apply_monitor(&mut kernel, Default::default());
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
