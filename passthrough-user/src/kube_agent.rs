//! `passthrough run --kubernetes`: the DaemonSet agent.
//!
//! Start-up: watch the API server (one list + watch per kind, `passthrough_kube::cluster`) and
//! wait for the first complete list of every kind — meanwhile pinned state of a previous agent,
//! if any, keeps enforcing untouched; start watching the kubepods cgroup tree (watches set
//! before listing, so no pod cgroup is missed); compute this node's workloads
//! (`passthrough_kube::node`); load the programs and write that plan; attach once at the
//! kubepods root. Then every API change, every pod cgroup that appears or goes, and SIGHUP
//! recompute the model and, when the maps would change, apply it as one atomic generation flip
//! (the proxy follows right after).
//!
//! While the API server is unreachable the last applied state stays in force and `/readyz`
//! answers 503 saying since when; pod cgroups that appear meanwhile still get entries — the
//! pending mode unless the pod was already known.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use arc_swap::ArcSwap;
use passthrough_kube::{
    cgroups::{CgroupEvent, KubepodsRoot, KubepodsWatcher},
    cluster::Snapshot,
    cluster::{self, WatchOptions},
    kuma::{GovernRules, KumaConfig},
    node::{self, Cgroups, Model, Settings},
};
use passthrough_policy::{self as policy, Mode, plan::PlanOptions};
use passthrough_proxy::ProxyPolicy;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    admin::{self, AdminState},
    bpffs, cgroup,
    events::Reporter,
    kernel::Kernel,
    metrics::Metrics,
    run_args::RunArgs,
    startup,
};

fn settings(args: &RunArgs) -> anyhow::Result<(Settings, String)> {
    let k = &args.kube;
    let node_name = k
        .node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
        .filter(|n| !n.is_empty())
        .context("--kubernetes needs the node name: --node-name or $NODE_NAME")?;
    let own_pod = k.own_pod.clone().or_else(|| {
        match (std::env::var("POD_NAMESPACE"), std::env::var("POD_NAME")) {
            (Ok(ns), Ok(n)) if !ns.is_empty() && !n.is_empty() => Some(format!("{ns}/{n}")),
            _ => None,
        }
    });
    if own_pod.is_none() {
        warn!(
            "own pod unknown (--own-pod or $POD_NAMESPACE/$POD_NAME): if the agent runs in a pod it may be governed"
        );
    }
    Ok((
        Settings {
            kuma: KumaConfig {
                system_namespace: k.system_namespace.clone(),
                zone: k.zone.clone(),
                ..KumaConfig::default()
            },
            govern: GovernRules {
                kuma_rules: !k.no_kuma_injection_rules,
                pod_selectors: k.pod_selector.clone(),
                namespace_selectors: k.namespace_selector.clone(),
                own_pod,
            },
            unselected: args.unselected_mode,
            pending: k.pending_mode,
        },
        node_name,
    ))
}

/// The proxy's view of `model`. A workload id the proxy does not know gets `unknown` — the
/// pending mode: in Kubernetes mode every socket below the attachment has an entry (the QoS
/// parents at least), so an unknown id is a pod the proxy has not been told about yet.
fn proxy_policy(model: &Model, opts: &PlanOptions, unknown: Mode) -> ProxyPolicy {
    let shared: Vec<Arc<policy::MergedConf>> = model.confs.iter().cloned().map(Arc::new).collect();
    ProxyPolicy {
        workloads: model
            .entries
            .iter()
            .map(|e| (e.id, shared[e.conf].clone()))
            .collect(),
        unmatched: policy::MergedConf {
            mode: unknown,
            matches: Vec::new(),
            policies: Vec::new(),
        },
        decide: policy::DecideOptions {
            internal: opts.internal.clone(),
            resolvers: opts.resolvers.clone(),
        },
    }
}

fn apply(
    kernel: &mut Kernel,
    model: &Model,
    opts: &PlanOptions,
    metrics: &Metrics,
) -> anyhow::Result<u64> {
    let refs: Vec<(u64, &policy::MergedConf)> = model
        .entries
        .iter()
        .map(|e| (e.id, &model.confs[e.conf]))
        .collect();
    let plan = policy::plan::compile(kernel.next_generation(), &refs, opts);
    let usage = plan.usage();
    let generation = kernel.apply(plan)?;
    metrics.policy_applied(
        generation,
        model.names(),
        usage,
        kernel.capacities().map_capacity(),
    );
    startup::retire_previous(kernel, metrics);
    Ok(generation)
}

/// The entries to add (each with an entry of the active model that has the same merged
/// configuration, whose rule set it then shares) and to remove, when `next` differs from `cur`
/// only by such entries; `None` when a full apply is needed (a configuration that no workload
/// has yet, e.g. a policy change).
/// Cgroup ids to set (`(id, like)`) and to remove.
type InPlace = (Vec<(u64, u64)>, Vec<u64>);

fn incremental(cur: &Model, next: &Model) -> Option<InPlace> {
    // Old entry id with each old configuration.
    let mut like_of_conf: Vec<Option<u64>> = vec![None; cur.confs.len()];
    for e in &cur.entries {
        like_of_conf[e.conf].get_or_insert(e.id);
    }
    let old_conf_of_new: Vec<Option<usize>> = next
        .confs
        .iter()
        .map(|c| cur.confs.iter().position(|o| o == c))
        .collect();
    let cur_by_id: std::collections::HashMap<u64, usize> =
        cur.entries.iter().map(|e| (e.id, e.conf)).collect();
    let mut set = Vec::new();
    for e in &next.entries {
        let old_conf = old_conf_of_new[e.conf]?;
        if cur_by_id.get(&e.id) == Some(&old_conf) {
            continue;
        }
        set.push((e.id, like_of_conf[old_conf]?));
    }
    let next_ids: BTreeSet<u64> = next.entries.iter().map(|e| e.id).collect();
    let remove = cur
        .entries
        .iter()
        .filter(|e| !next_ids.contains(&e.id))
        .map(|e| e.id)
        .collect();
    Some((set, remove))
}

/// Logs problems not reported before (and forgets those that went away).
fn report(model: &Model, seen: &mut BTreeSet<String>) {
    let now: BTreeSet<String> = model
        .policies
        .problems
        .iter()
        .map(|p| p.to_string())
        .chain(model.pod_problems.iter().map(|p| format!("Pod {p}")))
        .collect();
    for p in now.difference(seen) {
        warn!(problem = %p, "ignored (invalid); everything else applies");
    }
    *seen = now;
}

/// The JSON `passthrough status` shows: every pod cgroup with its state and mode.
fn write_status(path: &Path, node_name: &str, generation: u64, model: &Model) {
    let pods: Vec<serde_json::Value> = model
        .entries
        .iter()
        .map(|e| {
            let conf = &model.confs[e.conf];
            serde_json::json!({
                "name": e.name, "uid": e.uid, "cgroup": e.cgroup, "cgroup_id": e.id,
                "state": e.state, "mode": conf.mode.as_str(), "matches": conf.matches.len(),
                "rule_set": e.conf,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "node": node_name, "generation": generation, "pods": pods,
        "policies": model.policies.policies.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
        "shadow_policies": model.policies.shadow,
        "invalid_policies": model.policies.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
    });
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        debug!(file = %path.display(), error = %e, "status file not written");
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn log_cgroup_events(evs: &[CgroupEvent]) {
    for e in evs {
        match e {
            CgroupEvent::Appeared(p) => {
                debug!(uid = %p.uid, qos = node::qos_word(p.qos), cgroup = %p.path.display(), "pod cgroup appeared")
            }
            CgroupEvent::Gone { uid, .. } => debug!(%uid, "pod cgroup removed"),
            CgroupEvent::QosDir { path, .. } => debug!(cgroup = %path.display(), "QoS cgroup"),
            CgroupEvent::Overflow => warn!("inotify queue overflow; rescanned the kubepods tree"),
        }
    }
}

/// What the pod-cgroup thread and the event loop share, under one lock: the kernel (whose
/// active plan the thread extends in place), the model that plan was written from (only the
/// event loop replaces it, together with the plan, so the two always agree), and the pod
/// cgroups that exist.
struct Shared {
    kernel: Kernel,
    model: Arc<Model>,
    cgroups: Cgroups,
}

/// The pod-cgroup thread: blocks in the kubepods inotify watch and, the moment the kernel wakes
/// it, enforces each new pod cgroup whose configuration the active plan already has (one map
/// update, [`node::like_for`]), records every change in `shared.cgroups` and wakes the event
/// loop, which recomputes the model. On a thread of its own so that a pod's first connection
/// never waits for the event loop (a model recomputation, an API event, a status write) nor for
/// the async runtime's own wake-ups. Returns when `stop`'s other end closes.
fn cgroup_thread(
    mut watcher: KubepodsWatcher,
    stop: OwnedFd,
    shared: Arc<Mutex<Shared>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    settings: Settings,
    changed: Arc<Notify>,
) {
    loop {
        let evs = match watcher.wait(stop.as_fd()) {
            Ok(Some(evs)) => evs,
            Ok(None) => return,
            Err(e) => {
                error!(error = %e, "watching the kubepods cgroups failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let read_us = monotonic_us();
        let snap = snapshots.borrow().clone();
        let (early, written_us) = {
            let mut sh = lock(&shared);
            let early: Vec<(u64, u64)> = evs
                .iter()
                .filter_map(|e| match e {
                    CgroupEvent::Appeared(p) => {
                        node::like_for(&sh.model, &snap, p, &settings).map(|like| (p.id, like))
                    }
                    _ => None,
                })
                .collect();
            // A cgroup this thread enforced that went before the model learnt of it: only this
            // thread knows its entry.
            let gone: Vec<u64> = evs
                .iter()
                .filter_map(|e| match e {
                    CgroupEvent::Gone { path, .. } => sh.cgroups.pods.get(path).map(|p| p.id),
                    _ => None,
                })
                .filter(|id| !sh.model.entries.iter().any(|e| e.id == *id))
                .collect();
            if (!early.is_empty() || !gone.is_empty())
                && let Err(e) = sh.kernel.update_active_workloads(&early, &gone)
            {
                warn!(error = %e, "early pod cgroup update failed");
            }
            let written_us = monotonic_us();
            sh.cgroups.apply(&evs);
            (early, written_us)
        };
        changed.notify_one();
        for (id, _) in &early {
            debug!(target: "passthrough::pod_timing", cgroup_id = id, read_us, written_us, "pod cgroup enforced from its inotify event");
        }
        log_cgroup_events(&evs);
    }
}

/// A pipe whose write end, dropped, stops [`cgroup_thread`].
fn stop_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors this function then owns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd as _;
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `CLOCK_MONOTONIC` in µs: the clock other processes (a benchmark) read too, so the agent's
/// timing log lines line up with theirs.
fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

fn since(t: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(t)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    format!("{secs}s")
}

/// Runs the Kubernetes agent until SIGTERM/SIGINT.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let nofile = startup::raise_nofile_limit();
    info!(nofile, "open-files limit");
    let (settings, node_name) = settings(&args)?;
    let mount = match &args.kube.cgroup_root {
        Some(r) => r.clone(),
        None => cgroup::cgroup2_mount()?,
    };
    let root = match &args.kube.kubepods_cgroup {
        Some(p) => KubepodsRoot::at(
            &cgroup::resolve(p, &mount)
                .context("--kubepods-cgroup")?
                .path,
        ),
        None => KubepodsRoot::find(&mount).with_context(|| {
            format!(
                "no kubepods cgroup (kubepods.slice or kubepods) below {}; give --kubepods-cgroup",
                mount.display()
            )
        })?,
    };
    info!(cgroup = %root.path.display(), driver = ?root.driver, node = %node_name, "Kubernetes mode");
    let opts = startup::plan_options(&args);
    let bpf_root = Path::new("/sys/fs/bpf");
    if bpffs::ensure_mounted(bpf_root).context("mounting bpffs at /sys/fs/bpf")? {
        info!(path = %bpf_root.display(), "mounted bpffs");
    }
    let metrics = Arc::new(Metrics::new());
    let monitor = crate::monitor::Monitor::new(metrics.clone());
    let admin_state = Arc::new(AdminState {
        metrics: Some(metrics.clone()),
        monitor: Some(monitor.clone()),
        ..AdminState::default()
    });
    *admin_state.degraded.write().unwrap() =
        Some("waiting for the first list from the API server".into());
    let admin_listener = admin::bind(args.admin_addr)
        .await
        .with_context(|| format!("--admin-addr {}", args.admin_addr))?;
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state.clone()));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;

    let config = cluster::config(args.kube.kubeconfig.as_deref()).await?;
    let cluster = cluster::start(
        config,
        &WatchOptions {
            node_name: node_name.clone(),
            watch_timeout: 290,
        },
    )?;
    let mut snapshots = cluster.snapshots.clone();
    let mut health = cluster.health.clone();
    // Nothing is loaded or attached before the first complete list: a previous agent's
    // pinned state keeps enforcing meanwhile.
    info!("waiting for the first list of every kind");
    let snap = tokio::select! {
        s = snapshots.wait_for(|s| s.complete()) => s.map(|s| s.clone()).context("watchers stopped")?,
        _ = term.recv() => { admin_task.abort(); return Ok(()) }
        _ = int.recv() => { admin_task.abort(); return Ok(()) }
    };
    let (watcher, evs) = KubepodsWatcher::start(root.clone())
        .with_context(|| format!("watching {}", root.path.display()))?;
    let mut cgroups = Cgroups::default();
    cgroups.apply(&evs);
    let model = node::build(&snap, &cgroups, &settings);
    let mut seen_problems = BTreeSet::new();
    report(&model, &mut seen_problems);

    let proxy_listeners = startup::bind_proxy(&args).await?;
    let mut kernel = Kernel::load(startup::load_options(&args)?)?;
    let _bpf_log_task = startup::start_bpf_log(&mut kernel, args.bpf_log_level);
    startup::set_backstop(&mut kernel, &args);
    startup::enable_tls_fast_path(&args, &mut kernel);
    if kernel.adopted() {
        info!(state = %args.state_dir.display(), generation = kernel.policy_generation(), "adopted pinned state of a previous agent");
    }
    let reporter = Arc::new(Reporter::new(metrics.clone(), Default::default()));
    let events_task = startup::start_deny_events(&mut kernel, &args.state_dir, &reporter);
    let proxy_state = Arc::new(ArcSwap::from_pointee(proxy_policy(
        &model,
        &opts,
        args.kube.pending_mode,
    )));
    let monitor_tasks =
        startup::start_monitor(&args, &mut kernel, &reporter, &monitor, &proxy_state)?;
    let mut kernel_wanted = monitor.kernel_wanted();
    let wanted = *kernel_wanted.borrow_and_update();
    kernel.set_monitor(wanted.on, u32::from(wanted.shift))?;
    let shutdown = CancellationToken::new();
    let proxy_tasks = startup::start_proxy(
        &args,
        &mut kernel,
        proxy_listeners,
        &proxy_state,
        &reporter,
        &shutdown,
    )?;
    let mut generation = apply(&mut kernel, &model, &opts, &metrics)?;
    kernel.attach(&root.path)?;
    info!(cgroup = %root.path.display(), "attached");
    for removed in kernel.retire_stale() {
        info!(pin = %removed.display(), "removed stale pinned state");
    }
    info!(
        generation,
        pods = model.entries.len(),
        policies = model.policies.policies.len(),
        "policy applied"
    );
    write_status(&args.kube.status_file, &node_name, generation, &model);
    admin_state.generation.store(generation, Ordering::Release);
    admin_state.ready.store(true, Ordering::Release);
    *admin_state.degraded.write().unwrap() = None;

    // From here the kernel is shared with the pod-cgroup thread (events queued since the watch
    // was set are read by it first).
    let mut model = Arc::new(model);
    let shared = Arc::new(Mutex::new(Shared {
        kernel,
        model: model.clone(),
        cgroups,
    }));
    let changed = Arc::new(Notify::new());
    let cgroup_thread_ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop_rx, stop_tx) = stop_pipe().context("pipe")?;
    let cgroup_thread = std::thread::Builder::new()
        .name("pod-cgroups".into())
        .spawn({
            let shared = shared.clone();
            let snapshots = snapshots.clone();
            let settings = settings.clone();
            let changed = changed.clone();
            let ended = cgroup_thread_ended.clone();
            move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    cgroup_thread(
                        watcher,
                        stop_rx,
                        shared,
                        snapshots,
                        settings,
                        changed.clone(),
                    )
                }));
                if r.is_err() {
                    error!("the pod-cgroup thread panicked");
                }
                ended.store(true, Ordering::Release);
                changed.notify_one();
            }
        })
        .context("starting the pod-cgroup thread")?;

    // The status file is rewritten at most twice a second (it lists every pod; writing it on
    // every cgroup event would delay the next event).
    let mut status_tick = tokio::time::interval(Duration::from_millis(500));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_dirty = false;
    let mut lease_tick = startup::monitor_lease_tick();
    loop {
        let mut force = false;
        tokio::select! {
            _ = status_tick.tick() => {
                if status_dirty {
                    write_status(&args.kube.status_file, &node_name, generation, &model);
                    status_dirty = false;
                }
                continue;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => force = true,
            // The sender lives in `monitor`, which outlives this loop: never an error here.
            r = kernel_wanted.changed() => {
                if r.is_ok() {
                    let w = *kernel_wanted.borrow_and_update();
                    startup::apply_monitor(&mut lock(&shared).kernel, w);
                }
                continue;
            }
            _ = lease_tick.tick() => {
                startup::renew_monitor(&mut lock(&shared).kernel);
                continue;
            }
            r = snapshots.changed() => {
                if r.is_err() {
                    bail!("API watchers stopped");
                }
            }
            // The pod-cgroup thread changed the cgroups (and enforced the new ones it could).
            _ = changed.notified() => {
                // It only ends when told to, after this loop: without it no new pod would be
                // named any more. Exit (the pinned state keeps enforcing) and be restarted.
                if cgroup_thread_ended.load(Ordering::Acquire) {
                    bail!("the pod-cgroup thread stopped; new pods would stay pending");
                }
            }
            r = health.changed() => {
                if r.is_ok() {
                    let h = health.borrow_and_update().clone();
                    let why = h.worst().map(|(kind, t, msg)| {
                        format!("API server unreachable for {kind} since {} ago ({msg}); the last good state stays in force", since(t))
                    });
                    *admin_state.degraded.write().unwrap() = why;
                }
                continue;
            }
        }
        let t = Instant::now();
        let snap = snapshots.borrow_and_update().clone();
        let cgroups = lock(&shared).cgroups.clone();
        let next = node::build_from(&snap, &cgroups, &settings, Some(&model));
        report(&next, &mut seen_problems);
        // What to write is decided before taking the lock; the model and the plan then change
        // together under it (the pod-cgroup thread always sees the model the active plan was
        // written from), and the proxy's table is rebuilt after it is released. Cgroups the
        // thread handles meanwhile wake this loop again.
        let same = !force && next.same_plan(&model);
        // A pod cgroup that appears or goes, with a configuration some workload already has:
        // one map update in the active generation, no flip. The proxy learns right after; a
        // connection redirected for the new pod in between gets the proxy's unknown-id mode,
        // the pending mode (fail closed).
        let in_place = if force || same {
            None
        } else {
            incremental(&model, &next)
        };
        let mut sh = lock(&shared);
        if same {
            model = Arc::new(next);
            sh.model = model.clone();
            continue;
        }
        if let Some((set, remove)) = in_place {
            match sh.kernel.update_active_workloads(&set, &remove) {
                Ok(true) => {
                    model = Arc::new(next);
                    sh.model = model.clone();
                    drop(sh);
                    proxy_state.store(Arc::new(proxy_policy(
                        &model,
                        &opts,
                        args.kube.pending_mode,
                    )));
                    metrics.set_workload_names(model.names());
                    debug!(
                        added = set.len(),
                        removed = remove.len(),
                        us = t.elapsed().as_micros() as u64,
                        "pod cgroups updated in the active generation"
                    );
                    status_dirty = true;
                    continue;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "in-place update failed; applying a full plan"),
            }
        }
        match apply(&mut sh.kernel, &next, &opts, &metrics) {
            Ok(g) => {
                model = Arc::new(next);
                sh.model = model.clone();
                drop(sh);
                generation = g;
                proxy_state.store(Arc::new(proxy_policy(
                    &model,
                    &opts,
                    args.kube.pending_mode,
                )));
                admin_state.generation.store(g, Ordering::Release);
                info!(
                    generation,
                    pods = model.entries.len(),
                    policies = model.policies.policies.len(),
                    us = t.elapsed().as_micros() as u64,
                    "policy applied"
                );
                status_dirty = true;
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), "apply failed; the previous plan stays in force")
            }
        }
    }
    info!("shutting down: detaching programs");
    admin_state.ready.store(false, Ordering::Release);
    admin_task.abort();
    events_task.abort();
    for t in &monitor_tasks {
        t.abort();
    }
    // Programs left attached (--keep-on-exit) must not go on reporting allowed decisions into
    // a ring nobody reads any more: the next agent switches the report on again if it wants.
    startup::apply_monitor(&mut lock(&shared).kernel, Default::default());
    shutdown.cancel();
    for t in proxy_tasks {
        let _ = t.await;
    }
    drop(cluster);
    drop(stop_tx);
    let _ = cgroup_thread.join();
    let kernel = Arc::try_unwrap(shared)
        .map_err(|_| anyhow::anyhow!("the kernel is still shared at shutdown"))?
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .kernel;
    if args.keep_on_exit {
        info!("--keep-on-exit: programs stay attached, maps pinned");
    }
    kernel.shutdown(args.keep_on_exit)?;
    info!("stopped");
    Ok(())
}
