//! Diagnostics through aya-log: `passthrough run --bpf-log-level off|error|warn|info|debug|trace`
//! (default `off`); the agent forwards the records into its own log (target `passthrough::bpf`).
//!
//! The level is aya-log's read-only global (`AYA_LOG_LEVEL`, in `.rodata`), which the loader
//! sets before the programs are verified. The map holding it is frozen, so the verifier knows
//! the value: with logging off every call below is a branch it proves dead and removes. What is
//! left of a call is the load of the level and a jump (about 3 instructions); a connect passes
//! at most two, and its program time is the same as without the calls within noise
//! (`pt-bench bpf-log`, BENCHMARKS.md).
//!
//! Calls are few and off the hot path: denials (debug) and what should never happen — a
//! missing config entry, a failed map write, a full event ring (error/warn).

/// The log target of every record.
pub(crate) const TARGET: &str = "passthrough::bpf";

/// `error!` with our target. The context argument of aya-log's macros is unused.
macro_rules! bpf_error {
    ($($arg:tt)+) => { aya_log_ebpf::error!(&(), target: crate::log::TARGET, $($arg)+) };
}

/// `warn!` with our target.
macro_rules! bpf_warn {
    ($($arg:tt)+) => { aya_log_ebpf::warn!(&(), target: crate::log::TARGET, $($arg)+) };
}

/// `debug!` with our target.
macro_rules! bpf_debug {
    ($($arg:tt)+) => { aya_log_ebpf::debug!(&(), target: crate::log::TARGET, $($arg)+) };
}

pub(crate) use {bpf_debug, bpf_error, bpf_warn};
