//! Atomic policy swaps on the real kernel: a connect sees the old plan or the new one, never a
//! mix, and a retired plan is removed only once no program can still be reading it.
//!
//! - Connects run in a tight loop while plans are swapped again and again (each swap writes a
//!   plan of thousands of ranges into the half the last-but-one plan used, then retires the old
//!   one): an address both plans allow is never denied, one neither allows is always denied.
//! - A running program holds the old generation's view across a swap: the test-only program
//!   `passthrough_view_probe` (never loaded by the agent) reads the generation index, spins in
//!   `bpf_loop` for well over the old 50 ms grace timer, then looks up its workload's entry in
//!   the generation it read. Meanwhile the test flips to a new plan and retires the old one.
//!   The retire waits for the program (an RCU grace period, `ProgramBarrier`), so the entry is
//!   still there; with the timer it was deleted under the running program.
//!
//! The connects run in a private network namespace whose `lo` has `0.0.0.0/1` as a local route
//! and no listener: allowed connects are refused by the stack, denied ones fail with `EPERM`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    EbpfLoader,
    maps::{Array, MapData},
    programs::{SocketFilter, TestRun, TestRunOptions},
};
use ipnet::Ipv4Net;
use passthrough_common::VIEW_PROBE_WORKLOAD;
use passthrough_policy::plan::{self, PlanOptions};
use passthrough_tests::{
    EPERM, StateDirGuard, TestCgroup,
    bench::{BenchNs, MoveBack, Rng, cidr_conf, connect_once},
    require_kernel,
};
use passthrough_user::{
    kernel::{Capacities, EBPF_OBJECT, Kernel, LoadOptions},
    pins,
};

/// Allowed by every plan of the swap test.
const BOTH: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 1);
/// Allowed by no plan.
const NEITHER: Ipv4Addr = Ipv4Addr::new(100, 64, 2, 2);

/// `n` random /20–/32 networks in 10.0.0.0/8 (away from the two probe addresses) plus the
/// network of [`BOTH`].
fn plan_nets(rng: &mut Rng, n: usize) -> Vec<(Ipv4Net, Option<u16>)> {
    let mut v: Vec<(Ipv4Net, Option<u16>)> = (0..n)
        .map(|_| {
            let r = rng.next_u64();
            let addr = 0x0a00_0000 | ((r >> 8) as u32 & 0x00ff_ffff);
            let len = 20 + (r % 13) as u8;
            let net = Ipv4Net::new(Ipv4Addr::from(addr), len)
                .expect("len <= 32")
                .trunc();
            (net, None)
        })
        .collect();
    v.push((Ipv4Net::new(BOTH, 24).expect("/24"), None));
    v
}

#[test]
fn connects_see_the_old_or_the_new_plan_while_plans_are_swapped() {
    if !require_kernel() {
        return;
    }
    let ns = BenchNs::new(&["0.0.0.0/1"]).expect("netns");
    ns.enter_current_thread().expect("enter netns");
    let cg = TestCgroup::new().expect("test cgroup");
    let mut k = Kernel::load(LoadOptions::default()).expect("load");
    let mut rng = Rng(0x5a4b_0001);
    let compile = |k: &Kernel, rng: &mut Rng, n| {
        let conf = cidr_conf(plan_nets(rng, n));
        plan::compile(
            k.next_generation(),
            &[(cg.id(), &conf)],
            &PlanOptions::default(),
        )
    };
    k.apply(compile(&k, &mut rng, 4_000)).expect("apply");
    k.attach(cg.path()).expect("attach");

    // The connecting thread is created here, inside the namespace (threads inherit it), and
    // the whole process joins the workload cgroup (the swapping thread's bpf() calls are not
    // judged by the hooks).
    let _inside = MoveBack::into(&cg).expect("into the workload cgroup");
    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(AtomicU64::new(0));
    let connects = Arc::new(AtomicU64::new(0));
    let worker = {
        let (stop, violations, connects) = (stop.clone(), violations.clone(), connects.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (addr, allowed) in [(BOTH, true), (NEITHER, false)] {
                    let errno = match connect_once(SocketAddr::from((addr, 80))).expect("socket") {
                        Ok(_) => 0,
                        Err((_, errno)) => errno,
                    };
                    if (errno == EPERM) == allowed {
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                    connects.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let rounds = 16;
    for round in 0..rounds {
        // Sizes vary so each plan's range tables land differently in the half it reuses.
        let size = 2_000 + (round % 4) * 1_500;
        k.apply(compile(&k, &mut rng, size)).expect("apply");
        k.retire();
    }
    // Let the worker see the last plan for a moment too.
    let seen = connects.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while connects.load(Ordering::Relaxed) < seen + 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().expect("worker");
    let n = connects.load(Ordering::Relaxed);
    assert!(n >= 100, "only {n} connects ran during the swaps");
    assert_eq!(
        violations.load(Ordering::Relaxed),
        0,
        "a connect saw a plan that was neither the old nor the new one ({n} connects, {rounds} swaps)"
    );
    k.shutdown(false).expect("detach");
}

#[test]
fn a_running_program_keeps_its_generation_across_a_swap() {
    if !require_kernel() {
        return;
    }
    let state = StateDirGuard::new().expect("state dir");
    let caps = Capacities::default();
    let mut k = Kernel::load(LoadOptions {
        caps,
        state_dir: Some(state.path()),
        ..LoadOptions::default()
    })
    .expect("load");
    let conf = cidr_conf([(Ipv4Net::new(BOTH, 24).expect("/24"), None)]);
    let compile = |k: &Kernel| {
        plan::compile(
            k.next_generation(),
            &[(VIEW_PROBE_WORKLOAD, &conf)],
            &PlanOptions::default(),
        )
    };
    k.apply(compile(&k)).expect("first plan");
    let first = k.next_generation() ^ 1;

    // The probe, loaded from the same object, on the agent's CONFIG and WORKLOADS (their pins).
    let mut loader = EbpfLoader::new();
    loader.map_max_entries("WORKLOADS", caps.workloads);
    for name in ["CONFIG", "WORKLOADS"] {
        loader.map_pin_path(name, pins::map_pin(state.path(), name));
    }
    // The maps it does not use, as small as they may be.
    loader
        .map_max_entries("RANGES_V4", 2)
        .map_max_entries("RULES_V6", 16);
    let mut probe_obj = loader
        .load(EBPF_OBJECT.expect("built with its eBPF object"))
        .expect("load the probe's object");
    let started: Array<MapData, u32> =
        Array::try_from(probe_obj.take_map("VIEW_PROBE").expect("VIEW_PROBE")).expect("array");
    let runner = std::thread::spawn(move || {
        let prog: &mut SocketFilter = probe_obj
            .program_mut("passthrough_view_probe")
            .expect("probe program")
            .try_into()
            .expect("socket filter");
        prog.load().expect("verifier accepts the probe");
        let packet = [0u8; 64];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                ..TestRunOptions::new()
            })
            .expect("test run");
        (r.return_value, r.duration)
    });

    // Once the probe has read the generation index, swap to a new plan and retire the old one.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if started.get(&0, 0).unwrap_or(0) != 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the probe never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    k.apply(compile(&k)).expect("second plan");
    k.retire();
    let (ret, ran) = runner.join().expect("probe thread");
    let (seen, found) = (ret >> 1, ret & 1 == 1);
    assert_eq!(
        seen, first,
        "the probe read the generation in force when it started"
    );
    assert!(
        found,
        "the retired generation's entry was removed under a program still reading it (it ran {ran:?})"
    );
    // The check means something only if the probe outlasted the 50 ms timer this replaced.
    assert!(
        ran > Duration::from_millis(50),
        "the probe ran {ran:?}: too short to tell a barrier from the old timer"
    );
    drop(k);
}
