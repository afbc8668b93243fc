//! A test-only program, never loaded by the agent: it holds one generation's view of the maps
//! for a long time, so a kernel test can check that a policy swap never removes entries a
//! running program still reads (`tests/tests/range_index.rs`,
//! `a_running_program_keeps_its_generation_across_a_swap`).
//!
//! Run with `BPF_PROG_TEST_RUN` (socket filters run under `rcu_read_lock()` there, as the
//! cgroup programs do when attached): it reads `CONFIG.active_generation` like the decision
//! does, tells the test which generation it read (`VIEW_PROBE[0] = generation + 1`), spins in
//! `bpf_loop` for a few hundred milliseconds, then looks up the workload
//! `passthrough_common::VIEW_PROBE_WORKLOAD` in the generation it read. It returns `generation << 1 | found`.

use core::ffi::c_void;

use aya_ebpf::{helpers::generated::bpf_loop, macros::socket_filter, programs::SkBuffContext};
use passthrough_common::{VIEW_PROBE_WORKLOAD, WorkloadKey};

use crate::maps::{CONFIG, VIEW_PROBE, WORKLOADS};

/// Iterations of the spin (the kernel's maximum for `bpf_loop` is 1 << 23).
const SPINS: u32 = 1 << 23;

/// One spin iteration: a hash lookup (of a key no plan has), so the loop cannot be optimised
/// away and takes real time: some tens of nanoseconds, a few hundred milliseconds in all.
extern "C" fn spin(index: u64, _ctx: *mut c_void) -> i64 {
    let key = WorkloadKey {
        generation: 2,
        _pad: 0,
        cgroup_id: index,
    };
    // SAFETY: only presence is read.
    i64::from(unsafe { WORKLOADS.get(&key) }.is_some())
}

#[socket_filter]
pub fn passthrough_view_probe(_ctx: SkBuffContext) -> i64 {
    let Some(cfg) = CONFIG.get(0) else {
        return 0;
    };
    let generation = cfg.active_generation & 1;
    if let Some(slot) = VIEW_PROBE.get_ptr_mut(0) {
        // SAFETY: a valid pointer into the array's only slot.
        unsafe { *slot = generation + 1 };
    }
    // SAFETY: `spin` is a BPF subprogram taking (index, ctx); no context is passed.
    unsafe { bpf_loop(SPINS, spin as *mut c_void, core::ptr::null_mut(), 0) };
    let key = WorkloadKey {
        generation,
        _pad: 0,
        cgroup_id: VIEW_PROBE_WORKLOAD,
    };
    // SAFETY: only presence is read.
    let found = unsafe { WORKLOADS.get(&key) }.is_some();
    i64::from(generation << 1 | u32::from(found))
}
