//! passthrough's agent library: policy model and validation ([`policy`]), the kernel plan
//! compiler ([`plan`]), the loader ([`kernel`]) and the agent ([`agent`]).

pub mod admin;
pub mod agent;
pub mod bpffs;
pub mod btf;
pub mod cgroup;
pub mod events;
pub mod kernel;
pub mod metrics;
pub mod pins;
pub mod plan;
pub mod policy;
pub mod proxy;
pub mod ranges;
pub mod sni_plan;
pub mod status;
pub mod watch;
