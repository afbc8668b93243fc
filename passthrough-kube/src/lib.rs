//! Kubernetes mode of `passthrough`: which pods of this node are workloads, with which
//! identity Kuma gives them, and where their cgroups are.
//!
//! - [`kuma`]: Kuma 2.14's rules for pods (mesh membership, the pod → Dataplane conversion)
//!   and for MeshPassthrough resources on Kubernetes (webhook labels, namespace-scoped
//!   selection, merge order);
//! - [`cgroups`]: the kubelet's pod cgroups for both cgroup drivers, found and watched;
//! - [`labelsel`]: label selectors (`--pod-selector`);
//! - [`cluster`]: the API watchers (one list + watch per kind);
//! - [`node`]: this node's workloads from the cluster snapshot and the pod cgroups.

pub mod cgroups;
pub mod cluster;
pub mod kuma;
pub mod labelsel;
pub mod node;
