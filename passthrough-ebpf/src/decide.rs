//! The in-kernel side of the decision: `passthrough_common::decide` (docs/decisions.md: rules 1–5 and the
//! UDP resolver exemption, written once for the kernel and the user-space tests) over the real
//! maps ([`KernelMaps`]) and callers ([`Task`], [`Socket`]). The programs turn its verdict into
//! a return code.

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_sk_ancestor_cgroup_id, bpf_sk_cgroup_id,
    },
    maps::lpm_trie::Key,
};
use core::{ffi::c_void, ptr};

use aya_ebpf::helpers::generated::bpf_map_lookup_elem;
use passthrough_common::{
    DenyEvent, DomainPortKey, GlobalConfig, RangeBlock, RangeTable, RangeTableKey, RuleKeyV6,
    SniLookup, VerifiedKey, WorkloadEntry, WorkloadKey, counter,
    decide::{Caller, Decision, Dest, Maps, RULE_KEY_V6_FULL_BITS},
    sni::{SniNameValue, SniTable, SniTableKey},
};

pub use passthrough_common::decide::{Transport, V4, V6, Verdict, v4_mapped, v6};

use crate::{
    log::{self, L},
    maps::{
        CONFIG, DENY_EVENTS, DOMAIN_PORTS, RANGE_INDEX_V4, RANGES_V4, RULES_V6, SNI_NAMES,
        SNI_TABLES, VERIFIED, WORKLOADS, count, monitor_slot,
    },
    sni,
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

    /// The value is read at once, volatile: LLVM otherwise merges the null checks of the
    /// decision's two lookups (port, port-less) into one OR of the pointers, which the
    /// verifier refuses.
    #[inline(always)]
    fn domain_port(&self, key: &DomainPortKey) -> Option<u8> {
        // SAFETY: a map value, read once.
        unsafe { DOMAIN_PORTS.get(key).map(|v| ptr::read_volatile(v)) }
    }

    #[inline(always)]
    fn verified(&self, key: &VerifiedKey) -> bool {
        // SAFETY: a map value, read once (the agent rewrites an entry's expiry in place; a
        // torn read is impossible for an aligned u64).
        match unsafe { VERIFIED.get(key) } {
            Some(v) => {
                let expires = unsafe { ptr::read_volatile(&v.expires_ns) };
                expires > unsafe { bpf_ktime_get_ns() }
            }
            None => false,
        }
    }

    #[inline(always)]
    fn sni_table(&self, key: &SniTableKey) -> Option<SniTable> {
        // SAFETY: a map value, copied at once.
        unsafe { SNI_TABLES.get(key).copied() }
    }

    /// The key lives in the socket's storage (`SniSock::lookup`): at 260 bytes it is more than
    /// the judge's stack can spare, and the helper takes it by pointer as it is.
    #[inline(always)]
    fn sni_name(&self, lookup: &SniLookup) -> Option<SniNameValue> {
        // SAFETY: an LPM trie lookup; `SniLookup` has the layout of the trie's key (prefix
        // length, then the data).
        let value = unsafe {
            bpf_map_lookup_elem(
                ptr::from_ref(&SNI_NAMES).cast_mut().cast(),
                ptr::from_ref(lookup).cast(),
            )
        } as *const SniNameValue;
        if value.is_null() {
            None
        } else {
            // SAFETY: a non-null map value.
            Some(unsafe { *value })
        }
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
        let Some(mut slot) = monitor_slot::<DenyEvent>(sample_shift) else {
            return;
        };
        event.ktime_ns = unsafe { bpf_ktime_get_ns() };
        slot.write(event);
        slot.submit(0);
    }

    #[inline(always)]
    fn clock_ns(&self) -> u64 {
        unsafe { bpf_ktime_get_ns() }
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

/// The task calling `connect()` on socket `sk`: [`Task`], plus what the TLS fast path must know
/// of the socket (whether it would send data in its SYN).
#[derive(Clone, Copy)]
pub struct Connecting(pub *mut c_void);

impl Caller for Connecting {
    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        Task.cgroup_id()
    }
    #[inline(always)]
    fn ancestor_cgroup_id(&self, level: i32) -> u64 {
        Task.ancestor_cgroup_id(level)
    }
    #[inline(always)]
    fn process(&self) -> (u32, [u8; 16]) {
        Task.process()
    }
    #[inline(always)]
    fn sends_in_syn(&self) -> bool {
        // An MPTCP subflow counts too: MPTCP builds its segments itself (not through the
        // subflow's sendmsg), so the judge's sk_msg program would never see its bytes.
        sni::uses_fast_open(self.0) || crate::mptcp::is_subflow(self.0)
    }
}

/// Return codes of `cgroup/*` sock_addr programs.
pub const PROCEED: i32 = 1;
/// Any other value makes the syscall fail with `EPERM` (we keep the kernel's default errno).
pub const REJECT: i32 = 0;

/// Decides one datagram of the calling task (counted, denials reported).
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
