//! passthrough's agent: the kernel glue ([`kernel`] loader and atomic apply, [`barrier`], [`pins`],
//! [`bpffs`], [`cgroup`]), the agent loop ([`agent`]), its observability ([`metrics`],
//! [`events`], [`admin`], [`status`]), file watching ([`watch`]) and the `check` / `explain`
//! command line ([`cli`]).
//!
//! The policy layer (parse, validate, merge, decide, compile) is `passthrough-policy`; the
//! proxy is `passthrough-proxy`, which reaches the kernel's maps and the agent's metrics and
//! event log only through the traits [`proxy_maps`] and [`events`] implement.

pub mod admin;
pub mod agent;
pub mod barrier;
pub mod bpffs;
pub mod cgroup;
pub mod cli;
pub mod events;
pub mod kernel;
pub mod kube_agent;
pub mod metrics;
pub mod monitor;
pub mod pins;
pub mod proxy_maps;
pub mod recorder;
pub mod run_args;
pub mod startup;
pub mod status;
pub mod watch;
