//! The command line of `passthrough run`, both modes: the file-driven agent ([`crate::agent`])
//! and the Kubernetes agent ([`crate::kube_agent`]) read the same [`RunArgs`].

use std::{net::SocketAddr, path::PathBuf};

use ipnet::IpNet;
use passthrough_kube::labelsel::Selector;
use passthrough_policy::{Mode, Resolver};
use passthrough_proxy::DomainDestination;

use crate::kernel::{BpfLogLevel, Capacities};

/// Arguments of `passthrough run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// MeshPassthrough policy files or directories (`*.yaml`, `*.yml`, `*.json`).
    #[arg(long, required_unless_present = "kubernetes", num_args = 1..)]
    pub policy: Vec<PathBuf>,
    /// A workload cgroup v2 directory (absolute, or relative to the cgroup2 mount); no labels.
    #[arg(long)]
    pub cgroup: Vec<PathBuf>,
    /// Workloads file: a YAML list of `{name, cgroup, labels}`.
    #[arg(long)]
    pub workloads: Option<PathBuf>,
    /// Cgroup(s) to attach the programs to. Default: the workload cgroups, minus those below
    /// another one. Every workload must be at or below an attachment.
    #[arg(long = "attach-cgroup")]
    pub attach_cgroup: Vec<PathBuf>,
    /// Only policies of this mesh are used.
    #[arg(long, default_value = "default")]
    pub mesh: String,
    /// Admin HTTP address (`/readyz`, `/healthz`).
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin_addr: SocketAddr,
    /// DNS resolver (`IP` or `IP:PORT`, `[IPv6]:PORT`; port 53 if none) that workloads may
    /// reach over UDP at that port in every mode, and that the proxy's destination check asks.
    /// Default: the nameservers of /etc/resolv.conf (port 53; the proxy then uses the system's
    /// resolver configuration).
    #[arg(long)]
    pub resolver: Vec<Resolver>,
    /// Pod/service ranges that are never egress (always allowed).
    #[arg(long = "internal-cidr")]
    pub internal_cidr: Vec<IpNet>,
    /// Mode for workloads no policy selects (and sockets in no workload).
    #[arg(long, default_value = "All", value_parser = parse_mode)]
    pub unselected_mode: Mode,
    /// Compute and count every decision, enforce none.
    #[arg(long)]
    pub audit: bool,
    /// Port of the proxy for redirected connections on 127.0.0.1 and `[::1]` (workloads in the
    /// host network namespace). 0 disables the proxy: Domain-only destinations are denied.
    #[arg(long, default_value_t = 15001)]
    pub proxy_port: u16,
    /// Proxy address for workloads in their own network namespace (pods), e.g. a link-local
    /// address on a dummy interface. Without it, pods' Domain-only destinations are denied.
    #[arg(long)]
    pub proxy_addr: Vec<SocketAddr>,
    /// What the proxy does with the address a client dialled when a Domain match allowed.
    #[arg(long, default_value = "verify", value_parser = domain_destination_parser())]
    pub domain_destination: DomainDestination,
    /// bpffs directory for the agent's pinned state (bpffs is mounted at /sys/fs/bpf if
    /// missing). Pins keep enforcement running if the agent dies; a restarted agent adopts them.
    #[arg(long, default_value = "/sys/fs/bpf/passthrough")]
    pub state_dir: PathBuf,
    /// On SIGTERM/SIGINT leave the programs attached and the maps pinned (rolling upgrades: the
    /// next agent adopts them with no window). Default: detach and unpin everything.
    #[arg(long)]
    pub keep_on_exit: bool,
    /// Rule entries per address family the maps hold, across both generations (a policy
    /// change needs room for the old and the new plan side by side). The IPv4 range array is
    /// preallocated for it: about 8.5 bytes per rule, 18 MiB at the default. Pinned maps keep
    /// the capacity they were created with.
    #[arg(long, default_value_t = Capacities::default().rules, value_parser = clap::value_parser!(u32).range(1_024..=1 << 26))]
    pub rule_capacity: u32,
    /// Do not attach the egress backstop (`cgroup_skb/egress`, ~0.05–0.08 µs per packet of
    /// every workload). Without it, these packets are not judged: raw-socket packets,
    /// unconnected ping-socket sends, per-datagram source routes (IPv4 `IP_RETOPTS` with
    /// `CAP_NET_RAW`; a type 2 IPv6 routing header, which needs no privilege on kernels built
    /// with `CONFIG_IPV6_MIP6`, as most distribution kernels are), source routes set through
    /// the 32-bit system call entry (no setsockopt program runs for it; no privilege needed on
    /// kernels with IA32 emulation) or before the agent attached. Only for nodes whose kernel
    /// has neither and whose workloads have no `CAP_NET_RAW`, no ping sockets and no sockets
    /// older than the agent (docs/security.md L1, L2, "Source routes"). With the TLS fast path
    /// on (the default) the program stays attached for it alone: it holds back the payload of
    /// fast-path connections whose ClientHello was not allowed, and lets everything else pass
    /// unread; `--tls-fast-path off` as well detaches it.
    #[arg(long)]
    pub no_raw_socket_backstop: bool,
    /// TLS fast path (`on`, default): a connection that only `tls` Domain matches at its port
    /// could allow goes directly to a destination already verified for an allowed name
    /// (learned from the proxy, pre-warmed from the policies' exact names), and its ClientHello
    /// is judged in the kernel before any byte leaves; everything else takes the proxy. `off`:
    /// every such connection takes the proxy (as under `--audit`). See docs/design.md.
    #[arg(long, value_name = "off|on", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub tls_fast_path: bool,
    /// Diagnostics from the eBPF programs (aya-log), forwarded into this log under the target
    /// `passthrough::bpf`: `error` (map failures), `warn` (dropped deny events, refused
    /// redirects), `debug` (every denial). `off` (default) costs the programs nothing.
    #[arg(long, value_enum, default_value_t = BpfLogLevel::Off)]
    pub bpf_log_level: BpfLogLevel,
    /// Keep a log of what the agent observes (allowed egress decisions, denials and `--audit`
    /// would-be denials; each distinct one once per segment) in DIR, bounded and kept across
    /// restarts, for `passthrough suggest`. Default DIR: /var/lib/passthrough/decisions. While
    /// it runs, the programs report allowed egress decisions as they do for a watcher.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = crate::cli::DEFAULT_DECISION_LOG)]
    pub decision_log: Option<PathBuf>,
    /// Most bytes the decision log directory holds (its oldest segment is deleted beyond).
    #[arg(long, value_name = "BYTES", default_value_t = crate::recorder::DEFAULT_MAX_BYTES)]
    pub decision_log_max_bytes: u64,
    /// Kubernetes mode: discover this node's pods, their identities and the MeshPassthrough
    /// resources from the API server (see docs/kubernetes.md) instead of files.
    #[arg(long, conflicts_with_all = ["policy", "cgroup", "workloads", "attach_cgroup"])]
    pub kubernetes: bool,
    #[command(flatten)]
    pub kube: KubeArgs,
}

pub(crate) fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected `on` or `off`, got `{s}`")),
    }
}

/// `--domain-destination`'s values, with their help, from the proxy's list.
fn domain_destination_parser() -> impl clap::builder::TypedValueParser<Value = DomainDestination> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser as _};
    PossibleValuesParser::new(
        DomainDestination::ALL
            .iter()
            .map(|(_, name, help)| PossibleValue::new(*name).help(*help)),
    )
    .try_map(|s| s.parse::<DomainDestination>())
}

/// Parses `All | Matched | None` (case as Kuma writes them).
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "All" => Ok(Mode::All),
        "Matched" => Ok(Mode::Matched),
        "None" => Ok(Mode::None),
        _ => Err(format!("{s:?} is not a mode; one of All, Matched, None")),
    }
}

/// Flags of `passthrough run --kubernetes`.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// Kubeconfig to reach the API server. Default: the in-cluster service account, else
    /// `$KUBECONFIG` / `~/.kube/config`.
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (the pods watched are those with this `spec.nodeName`). Default:
    /// `$NODE_NAME` (set it from the downward API's `spec.nodeName`).
    #[arg(long, value_name = "NAME", requires = "kubernetes")]
    pub node_name: Option<String>,
    /// The agent's own pod, `NAMESPACE/NAME`, never governed. Default: `$POD_NAMESPACE/$POD_NAME`.
    #[arg(
        long = "own-pod",
        value_name = "NAMESPACE/NAME",
        requires = "kubernetes"
    )]
    pub own_pod: Option<String>,
    /// Kuma's system namespace: MeshPassthrough resources there select pods of every namespace;
    /// those of any other namespace only that namespace's pods.
    #[arg(long, default_value = "kuma-system", value_name = "NAMESPACE")]
    pub system_namespace: String,
    /// Kuma zone name (`kuma.io/zone` on Dataplanes and policies); Kuma's default is `default`.
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub zone: String,
    /// Also govern pods matching this label selector (repeatable).
    #[arg(long = "pod-selector", value_name = "SELECTOR", value_parser = parse_selector)]
    pub pod_selector: Vec<Selector>,
    /// Also govern the pods of namespaces matching this label selector (repeatable).
    #[arg(long = "namespace-selector", value_name = "SELECTOR", value_parser = parse_selector)]
    pub namespace_selector: Vec<Selector>,
    /// Do not apply Kuma's injection rules (`kuma.io/sidecar-injection`); only the selectors
    /// decide which pods are governed.
    #[arg(long)]
    pub no_kuma_injection_rules: bool,
    /// Where the host's cgroup2 hierarchy is mounted (in a pod: a hostPath of the node's
    /// /sys/fs/cgroup). Default: the first cgroup2 mount of /proc/self/mountinfo.
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// The kubelet's pod cgroup parent (absolute, or relative to the cgroup root). Default:
    /// `kubepods.slice` (systemd driver) or `kubepods` (cgroupfs) below the cgroup root.
    #[arg(long, value_name = "PATH")]
    pub kubepods_cgroup: Option<PathBuf>,
    /// Mode of a pod cgroup the agent cannot name yet (its pod not yet seen from the API server).
    #[arg(long, default_value = "None", value_parser = parse_mode)]
    pub pending_mode: Mode,
    /// Where the agent writes the governed pods after every apply (read by `passthrough status`).
    #[arg(
        long,
        default_value = "/run/passthrough/kubernetes.json",
        value_name = "FILE"
    )]
    pub status_file: PathBuf,
}

fn parse_selector(s: &str) -> Result<Selector, String> {
    s.parse()
}
