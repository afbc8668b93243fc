//! The in-kernel side of the decision: `passthrough_common::decide` (docs/decisions.md: rules 1–5 and the
//! UDP resolver exemption, written once for the kernel and the user-space tests) over the real
//! maps ([`KernelMaps`]) and callers ([`Task`], [`Socket`]). The programs turn its verdict into
//! a return code.

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_sk_ancestor_cgroup_id,
        bpf_sk_cgroup_id,
    },
    maps::lpm_trie::Key,
};
use passthrough_common::{
    DenyEvent, DomainPortKey, GlobalConfig, RangeBlock, RangeTable, RangeTableKey, RuleKeyV6,
    WorkloadEntry, WorkloadKey, counter,
    decide::{Caller, Decision, Dest, Maps, RULE_KEY_V6_FULL_BITS},
};

pub use passthrough_common::decide::{Transport, V4, V6, Verdict, v4_mapped, v6};

use crate::{
    log::{self, L},
    maps::{
        CONFIG, DENY_EVENTS, DOMAIN_PORTS, MONITOR_DROPS, MONITOR_EVENTS, RANGE_INDEX_V4,
        RANGES_V4, RULES_V6, WORKLOADS, count,
    },
};

/// The programs' maps, as the shared decision reads them. A unit struct: the maps are statics.
#[derive(Clone, Copy)]
pub struct KernelMaps;

impl Maps for KernelMaps {
    #[inline(always)]
    fn config(&self) -> Option<&GlobalConfig> {
        CONFIG.get(0)
    }

    #[inline(always)]
    fn workload(&self, key: &WorkloadKey) -> Option<&WorkloadEntry> {
        // SAFETY: the value is read at once; the agent never updates an entry of the active
        // generation in place.
        unsafe { WORKLOADS.get(key) }
    }

    #[inline(always)]
    fn range_table(&self, key: &RangeTableKey) -> Option<&RangeTable> {
        // SAFETY: as above: descriptors of the active generation are never rewritten.
        unsafe { RANGE_INDEX_V4.get(key) }
    }

    #[inline(always)]
    fn range_block(&self, index: u32) -> Option<&RangeBlock> {
        RANGES_V4.get(index)
    }

    #[inline(always)]
    fn rule_v6(&self, key: &RuleKeyV6) -> bool {
        RULES_V6
            .get(&Key::new(RULE_KEY_V6_FULL_BITS, *key))
            .is_some()
    }

    #[inline(always)]
    fn domain_port(&self, key: &DomainPortKey) -> bool {
        // SAFETY: only presence is read.
        unsafe { DOMAIN_PORTS.get(key) }.is_some()
    }

    #[inline(always)]
    fn count(&self, index: u32) {
        count(index);
    }

    /// Reserve-in-place (no allocation); a full ring buffer drops the event and counts it
    /// instead of blocking.
    #[inline(always)]
    fn report(&self, mut event: DenyEvent) {
        if log::on(L::Debug) {
            log::denial_of(&event);
        }
        let Some(mut slot) = DENY_EVENTS.reserve::<DenyEvent>(0) else {
            count(counter::EVENTS_DROPPED);
            if log::on(L::Warn) {
                log::event_dropped(event.reason);
            }
            return;
        };
        event.ktime_ns = unsafe { bpf_ktime_get_ns() };
        slot.write(event);
        slot.submit(0);
    }

    /// Sampling by a random draw per decision (no shared state between CPUs), then the same
    /// reserve-in-place as [`KernelMaps::report`]; a full buffer counts in `MONITOR_DROPS`.
    /// Built with the `no-monitor` feature (the benchmark's baseline) it does nothing.
    #[inline(always)]
    fn observe(&self, mut event: DenyEvent, sample_shift: u32) {
        if cfg!(feature = "no-monitor") {
            return;
        }
        let mask = (1u32 << (sample_shift & 0xf)) - 1;
        if mask != 0 && unsafe { bpf_get_prandom_u32() } & mask != 0 {
            return;
        }
        let Some(mut slot) = MONITOR_EVENTS.reserve::<DenyEvent>(0) else {
            if let Some(n) = MONITOR_DROPS.get_ptr_mut(0) {
                // Per-CPU slot; programs are not preempted mid-run on one CPU.
                unsafe { *n += 1 };
            }
            return;
        };
        event.ktime_ns = unsafe { bpf_ktime_get_ns() };
        slot.write(event);
        slot.submit(0);
    }
}

/// The task calling `connect()`/`sendmsg()`.
#[derive(Clone, Copy)]
pub struct Task;

impl Caller for Task {
    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        unsafe { bpf_get_current_cgroup_id() }
    }
    #[inline(always)]
    fn ancestor_cgroup_id(&self, level: i32) -> u64 {
        unsafe { bpf_get_current_ancestor_cgroup_id(level) }
    }
    #[inline(always)]
    fn process(&self) -> (u32, [u8; 16]) {
        (
            (bpf_get_current_pid_tgid() >> 32) as u32,
            bpf_get_current_comm().unwrap_or([0; 16]),
        )
    }
}

/// The socket a packet leaves from (a full socket from `bpf_sk_fullsock`): its cgroup is the
/// one of the task that created it.
#[derive(Clone, Copy)]
pub struct Socket(pub *mut bpf_sock);

impl Caller for Socket {
    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        unsafe { bpf_sk_cgroup_id(self.0 as *mut _) }
    }
    #[inline(always)]
    fn ancestor_cgroup_id(&self, level: i32) -> u64 {
        unsafe { bpf_sk_ancestor_cgroup_id(self.0 as *mut _, level) }
    }
    #[inline(always)]
    fn process(&self) -> (u32, [u8; 16]) {
        // Raw and ping sends run in the sender's context, but the pid/comm helpers are not
        // offered to cgroup_skb programs: the event names the cgroup only.
        (0, [0; 16])
    }
}

/// Return codes of `cgroup/*` sock_addr programs.
pub const PROCEED: i32 = 1;
/// Any other value makes the syscall fail with `EPERM` (we keep the kernel's default errno).
pub const REJECT: i32 = 0;

/// Decides one connection or datagram of the calling task (counted, denials reported).
#[inline(always)]
pub fn decide<D: Dest>(dst: D, port_be: u16, transport: Transport, socket_mark: u32) -> Verdict {
    decide_for(Task, dst, port_be, transport, socket_mark)
}

/// [`decide`] for `caller`'s policy.
#[inline(always)]
pub fn decide_for<C: Caller, D: Dest>(
    caller: C,
    dst: D,
    port_be: u16,
    transport: Transport,
    socket_mark: u32,
) -> Verdict {
    let Decision { verdict, .. } = passthrough_common::decide::decide(
        &KernelMaps,
        caller,
        dst,
        port_be,
        transport,
        socket_mark,
    );
    verdict
}

/// A source route set on a socket or carried by a packet, for `caller`: allowed only in mode
/// `All` (`passthrough_common::decide::decide_source_route`; `setsockopt.rs`, `skb.rs`).
#[inline(always)]
pub fn decide_source_route<C: Caller, D: Dest>(
    caller: C,
    dst: D,
    protocol: u8,
    socket_type: u8,
) -> Verdict {
    passthrough_common::decide::decide_source_route(&KernelMaps, caller, dst, protocol, socket_type)
        .verdict
}

/// A kernel worker's connect of an MPTCP subflow with no recorded owner: denied (`mptcp.rs`).
#[inline(always)]
pub fn decide_unknown_owner<D: Dest>(dst: D, port_be: u16) -> Verdict {
    passthrough_common::decide::decide_unknown_owner(&KernelMaps, Task, dst, port_be).verdict
}
