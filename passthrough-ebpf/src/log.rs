//! Diagnostics through aya-log: `passthrough run --bpf-log-level off|error|warn|info|debug|trace`
//! (default `off`); the agent forwards the records into its own log (target `passthrough::bpf`).
//!
//! The level is aya-log's read-only global (`AYA_LOG_LEVEL`, in `.rodata`), which the loader
//! sets before the programs are verified. The map holding it is frozen, so the verifier knows
//! the value: with logging off every call below is a branch it proves dead and removes. What is
//! left of a call site is the load of the level and a jump (about 3 instructions); a connect
//! passes at most two, and its program time is the same as without the calls within noise
//! (`pt-bench bpf-log`, BENCHMARKS.md).
//!
//! Each record is written by its own function, never inlined, called only once the level is
//! checked at the call site: aya-log builds a record's fields on the stack, and inlined into
//! `connect6` (whose decision is verified for the caller and for an MPTCP connection's owner)
//! they would take its stack past the verifier's 512 bytes whenever logging is on. Out of line,
//! the record's frame exists only while it is written.
//!
//! Calls are few and off the hot path: denials (debug) and what should never happen — a
//! missing config entry, a failed map write, a full event ring (error/warn).

use aya_log_ebpf::macro_support::{Level, level_enabled};
use passthrough_common::DenyEvent;

/// The log target of every record.
const TARGET: &str = "passthrough::bpf";

/// Whether records of `level` are on (a constant to the verifier).
#[inline(always)]
pub(crate) fn on(level: Level) -> bool {
    level_enabled(level)
}

pub(crate) use aya_log_ebpf::macro_support::Level as L;

/// debug: one denial (the reason, workload, destination and port; its deny event has the rest).
/// Its fields come in registers, so the caller never gives the event an address on its stack for
/// a record that is off, and the record's own frame stays small: `connect6`'s frame is close to
/// the verifier's 512 bytes for a whole call chain.
#[inline(never)]
pub(crate) fn denial(workload: u64, reason_port: u64, addr_hi: u64, addr_lo: u64) {
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&addr_hi.to_be_bytes());
    addr[8..].copy_from_slice(&addr_lo.to_be_bytes());
    aya_log_ebpf::debug!(
        &(),
        target: TARGET,
        "denied: reason {} workload {} dst {:i} port {}",
        reason_port as u32,
        workload,
        addr,
        (reason_port >> 32) as u16
    );
}

/// [`denial`] for `event`.
#[inline(always)]
pub(crate) fn denial_of(event: &DenyEvent) {
    let a = &event.addr;
    denial(
        event.workload,
        u64::from(event.reason) | u64::from(event.port) << 32,
        u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    );
}

/// warn: a deny event the full ring buffer dropped.
#[inline(never)]
pub(crate) fn event_dropped(reason: u32) {
    aya_log_ebpf::warn!(&(), target: TARGET, "deny event dropped: ring buffer full (reason {})", reason);
}

/// error: the config entry is missing.
#[inline(never)]
pub(crate) fn config_missing() {
    aya_log_ebpf::error!(&(), target: TARGET, "CONFIG[0] missing: redirect refused");
}

/// warn: a pod's redirect has no proxy address of its destination's family.
#[inline(never)]
pub(crate) fn no_proxy_addr(v4_dest: bool, workload: u64) {
    aya_log_ebpf::warn!(
        &(),
        target: TARGET,
        "redirect refused: no --proxy-addr for a pod's IPv{} destination (workload {})",
        if v4_dest { 4u8 } else { 6u8 },
        workload
    );
}

/// error: recording a redirected connection's original destination failed.
#[inline(never)]
pub(crate) fn orig_insert_failed(errno: i32) {
    aya_log_ebpf::error!(&(), target: TARGET, "ORIG_BY_COOKIE insert failed ({}): redirect refused", errno);
}

/// error: re-keying a redirected connection by its peer failed.
#[inline(never)]
pub(crate) fn orig_peer_insert_failed(errno: i32, port: u32) {
    aya_log_ebpf::error!(&(), target: TARGET, "ORIG_BY_PEER insert failed ({}) for port {}", errno, port);
}
