//! The kernel side, seen from user space: loads the programs, attaches them to cgroups, and
//! writes [`KernelPlan`]s into the maps with an atomic generation flip.
//!
//! # Atomic policy swap
//! Every map entry carries a generation (0 or 1): the workload key has it, the IPv6 trie keys
//! and the IPv4 range-table keys carry it in the high bit of the rule-set id, and each
//! generation's IPv4 range blocks live in their own half of `RANGES_V4`. A program reads
//! `CONFIG.active_generation` once and only looks at entries of that generation.
//! [`Kernel::apply`] therefore writes the whole new plan under the *inactive* generation, then
//! flips the index with one map update. The entries of the old generation are removed (or its
//! half of `RANGES_V4` overwritten) only after a [`ProgramBarrier`] wait after the flip: an RCU
//! grace period the kernel guarantees, after which no program that read the old index is still
//! running. So a connect sees the complete old rule set or the complete new one, never a mix.

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray, ProgramArray, RingBuf, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, CgroupSockopt,
        ProgramError, SkMsg, SockOps,
    },
};
use passthrough_common::{
    DomainPortKey, GlobalConfig, OrigDst, PeerKey, RangeBlock, RangeTable, RangeTableKey,
    RuleKeyV6, RuleValue, SniSock, TcpOffsets, VerifiedKey, VerifiedValue, WorkloadEntry,
    WorkloadKey,
    counter::Counter,
    sni::{SniNameKey, SniNameValue, SniTable, SniTableKey},
};

use passthrough_policy::plan::{KernelPlan, MapUsage};

use crate::barrier::ProgramBarrier;

/// The eBPF object built by `build.rs` (aya-build), embedded in the binary.
#[cfg(not(ebpf_skipped))]
pub static EBPF_OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/passthrough"
)));
/// Built with `AYA_BUILD_SKIP=1`: no programs in this binary.
#[cfg(ebpf_skipped)]
pub static EBPF_OBJECT: Option<&[u8]> = None;

/// The cgroup sock_addr programs in the object.
pub const PROGRAMS: [&str; 6] = [
    "passthrough_connect4",
    "passthrough_connect6",
    "passthrough_sendmsg4",
    "passthrough_sendmsg6",
    "passthrough_getpeername4",
    "passthrough_getpeername6",
];

/// The sock_ops program (re-keys redirected connections for the proxy).
pub const SOCK_OPS: &str = "passthrough_sock_ops";

/// The `cgroup/setsockopt` program: refuses source-routing socket options (`IPV6_RTHDR`,
/// `IPV6_2292PKTOPTIONS`, `IP_OPTIONS` with LSRR/SSRR) outside mode `All`
/// (docs/security.md, "Source routes").
pub const SETSOCKOPT: &str = "passthrough_setsockopt";

/// `BPF_CGROUP_SETSOCKOPT` (`enum bpf_attach_type`).
const BPF_CGROUP_SETSOCKOPT: u32 = 22;

/// The `cgroup_skb/egress` backstop for raw and ping sockets, which no sock_addr hook sees
/// (docs/security.md L1/L2).
pub const SKB_EGRESS: &str = "passthrough_skb_egress";

/// The `sk_msg` ClientHello judge of the TLS fast path, attached to `SNI_SOCKS`.
pub const SNI_JUDGE: &str = "passthrough_sni";

/// The judge's later phases, in `SNI_PROGS` order (reached by tail calls).
pub const SNI_PHASES: [&str; 2] = ["passthrough_sni_names", "passthrough_sni_name"];

/// Where the proxy listens, as the programs must know it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxySettings {
    /// Port of the host-netns listeners on 127.0.0.1 and ::1. 0 = no proxy: Domain
    /// candidates are denied.
    pub host_port: u16,
    /// `--proxy-addr` for workloads in their own network namespace (pods), IPv4.
    pub pod_v4: Option<std::net::SocketAddrV4>,
    /// `--proxy-addr` for pods, IPv6 (same port as the IPv4 one when both are set).
    pub pod_v6: Option<std::net::SocketAddrV6>,
}

/// `passthrough run --bpf-log-level`: how much the programs log through aya-log (into the
/// agent's log, target `passthrough::bpf`). `off` (default) costs nothing: the level is a
/// read-only global the verifier sees, so disabled calls are removed before the programs run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum BpfLogLevel {
    /// No records (default).
    #[default]
    Off,
    /// Failures that should never happen: a missing config entry, a failed map write.
    Error,
    /// Also: dropped deny events (ring full), redirects refused for want of a proxy address.
    Warn,
    /// Same as `warn` today.
    Info,
    /// Also: one record per denial (reason, workload, destination and port).
    Debug,
    /// Same as `debug` today.
    Trace,
}

impl BpfLogLevel {
    /// aya-log's level number (`aya_log::Level`: error 1 … trace 5; 0 = off).
    pub fn aya_level(self) -> u8 {
        match self {
            BpfLogLevel::Off => 0,
            BpfLogLevel::Error => aya_log::Level::Error as u8,
            BpfLogLevel::Warn => aya_log::Level::Warn as u8,
            BpfLogLevel::Info => aya_log::Level::Info as u8,
            BpfLogLevel::Debug => aya_log::Level::Debug as u8,
            BpfLogLevel::Trace => aya_log::Level::Trace as u8,
        }
    }

    /// The `tracing` filter directive that lets the forwarded records through, if any.
    pub fn filter_directive(self) -> Option<String> {
        let level = match self {
            BpfLogLevel::Off => return None,
            BpfLogLevel::Error => "error",
            BpfLogLevel::Warn => "warn",
            BpfLogLevel::Info => "info",
            BpfLogLevel::Debug => "debug",
            BpfLogLevel::Trace => "trace",
        };
        Some(format!("{}={level}", BPF_LOG_TARGET))
    }
}

/// The log target of the programs' records (set on the eBPF side).
pub const BPF_LOG_TARGET: &str = "passthrough::bpf";

/// Load-time choices ([`Kernel::load`]). The default: default capacities, no flags, no agent
/// mark, no proxy, nothing pinned, no eBPF log, the embedded programs (what a test that
/// applies plans directly needs).
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions<'a> {
    /// Map capacities (adopted maps keep theirs).
    pub caps: Capacities,
    /// `CONFIG.flags` (`passthrough_common::flags`); the monitor bits are
    /// [`Kernel::set_monitor`]'s.
    pub flags: u32,
    /// The agent's `SO_MARK` (its own sockets pass unjudged); 0: none.
    pub agent_mark: u32,
    /// Where the proxy listens, as the programs must know it.
    pub proxy: ProxySettings,
    /// Pin the maps and links under this directory, adopting compatible pins found there.
    pub state_dir: Option<&'a Path>,
    /// aya-log level of the programs.
    pub bpf_log_level: BpfLogLevel,
    /// Another eBPF object instead of the embedded one (benchmarks: a same-run A/B of two
    /// builds of the programs; 8-byte aligned).
    pub object: Option<&'a [u8]>,
}

/// Errors of the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The binary was built with `AYA_BUILD_SKIP=1`.
    #[error("this binary was built without its eBPF programs (AYA_BUILD_SKIP); rebuild it")]
    NoObject,
    /// The object could not be loaded (maps created, relocations).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program is missing from the object or of the wrong type.
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    /// The verifier or the kernel refused a program, or attaching failed.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What the kernel said (the verifier log is inside for load failures).
        source: ProgramError,
    },
    /// A map is missing or of the wrong type.
    #[error("map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    /// Opening the cgroup directory failed.
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Pinned state could not be read, created or removed.
    #[error("pinned state {path}: {source}")]
    Pin {
        /// The pin or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The barrier that waits out programs still using a retired generation failed (creating
    /// its map, or the update that waits).
    #[error("waiting for running programs (map-in-map barrier): {0}")]
    Barrier(#[source] std::io::Error),
    /// The plan does not fit in the maps.
    #[error("{what}: {needed} entries needed, capacity {capacity}")]
    Capacity {
        /// Which map.
        what: &'static str,
        /// Entries the plan needs (both generations count while swapping).
        needed: usize,
        /// The map's max_entries.
        capacity: u32,
    },
}

/// Map capacities (set at load time).
#[derive(Debug, Clone, Copy)]
pub struct Capacities {
    /// Rule entries of each family across both generations: the IPv6 trie's max_entries, and
    /// the size of the IPv4 range array (see [`Capacities::range_blocks`]).
    pub rules: u32,
    /// Workload entries across both generations.
    pub workloads: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            rules: 1 << 21,
            workloads: 1 << 16,
        }
    }
}

impl Capacities {
    /// Blocks of the IPv4 range array (both halves). A table of n disjoint intervals takes
    /// about n/8 blocks (starts and ends, 16 per block) plus a few for its upper levels and
    /// padding: `rules / 2` intervals per generation, plus 1/256 of `rules` (at least 64)
    /// for upper levels and small tables (each at least 2 blocks).
    pub fn range_blocks(&self) -> u32 {
        2 * ((self.rules / 2).div_ceil(8) + (self.rules / 256).max(64))
    }

    /// What the maps hold, as `passthrough_map_capacity` reports it: rule entries per family
    /// and workload entries across both generations, range blocks per generation (the half a
    /// plan is written into).
    pub fn map_capacity(&self) -> MapUsage {
        MapUsage {
            rules_v4: self.rules as usize,
            range_blocks_v4: (self.range_blocks() / 2) as usize,
            rules_v6: self.rules as usize,
            workloads: self.workloads as usize,
        }
    }
}

/// Tables the IPv4 range index holds, across both generations.
pub const RANGE_TABLES: u32 = 65_536;

/// Loaded programs and their maps.
pub struct Kernel {
    ebpf: Ebpf,
    config: Array<MapData, GlobalConfig>,
    workloads: HashMap<MapData, WorkloadKey, WorkloadEntry>,
    ranges_v4: RangeArray,
    range_index_v4: HashMap<MapData, RangeTableKey, RangeTable>,
    rules_v6: LpmTrie<MapData, RuleKeyV6, RuleValue>,
    counters: PerCpuArray<MapData, u64>,
    domain_ports: HashMap<MapData, DomainPortKey, u8>,
    verified: HashMap<MapData, VerifiedKey, VerifiedValue>,
    sni_tables: HashMap<MapData, SniTableKey, SniTable>,
    sni_names: LpmTrie<MapData, SniNameKey, SniNameValue>,
    /// With the TLS fast path on ([`Kernel::enable_tls_fast_path`]): `SNI_SOCKS` (the judge
    /// is attached to it), `SNI_PROGS` (its later phases) and the judge's attachment.
    sni: Option<(
        SockHash<MapData, u64>,
        ProgramArray<MapData>,
        aya::programs::sk_msg::SkMsgLink,
    )>,
    /// With the TLS fast path on: its verified destinations, projected onto each plan.
    fast_path: Option<std::sync::Arc<crate::fast_path::FastPath>>,
    /// The running kernel's `tcp_sock` offsets (all zero when its BTF could not be read: then
    /// the TLS fast path cannot be turned on).
    tcp_offsets: TcpOffsets,
    orig_by_peer: Option<HashMap<MapData, PeerKey, OrigDst>>,
    deny_events: Option<RingBuf<MapData>>,
    monitor_events: Option<RingBuf<MapData>>,
    monitor_drops: Option<PerCpuArray<MapData, u64>>,
    /// `flags::MONITOR` and its sampling shift, as last asked for by [`Kernel::set_monitor`].
    monitor: (bool, u32),
    caps: Capacities,
    /// What each generation currently has in the maps (so it can be removed exactly).
    written: [Option<KernelPlan>; 2],
    active: Option<u32>,
    /// Waits until no program can still be using a retired generation.
    barrier: ProgramBarrier,
    /// A flip (or an adopted predecessor's) happened after the last barrier wait: programs may
    /// still be reading the retired generation.
    readers_of_retired: bool,
    generation_counter: u64,
    attached: Vec<PathBuf>,
    /// sock_ops is (to be) attached: some plan could redirect.
    sock_ops_wanted: bool,
    /// Attach [`SKB_EGRESS`] (default true).
    raw_backstop: bool,
    /// Our links: pinned ones stay attached after we exit, owned ones detach on drop.
    links: Vec<LinkHold>,
    flags: u32,
    agent_mark: u32,
    proxy: ProxySettings,
    /// Where the state is pinned; `None` = nothing pinned (benchmarks): links die with us.
    state_dir: Option<PathBuf>,
    /// True when existing pinned maps were adopted: the inactive generation may hold entries
    /// this process did not write, so the first apply clears it by scanning.
    adopted: bool,
    /// Pinned state to remove once our programs are attached (other layouts, stale pins).
    retire_after_attach: Vec<PathBuf>,
}

/// Names of every map, in the object and under `<layout>/maps/`.
pub const MAPS: [&str; 17] = [
    "CONFIG",
    "WORKLOADS",
    "RANGES_V4",
    "RANGE_INDEX_V4",
    "RULES_V6",
    "COUNTERS",
    "DOMAIN_PORTS",
    "ORIG_BY_COOKIE",
    "ORIG_BY_PEER",
    "DENY_EVENTS",
    "MPTCP_OWNERS",
    "VERIFIED",
    "SNI_TABLES",
    "SNI_NAMES",
    "SNI_SOCKS",
    "SNI_STATE",
    "SNI_PROGS",
];

/// Key/value sizes each pinned map must have to be reused (map type is checked by aya when the
/// typed map is taken). A mismatch means the pins come from an incompatible build.
fn expected_shape(name: &str) -> (u32, u32) {
    use std::mem::size_of;
    let lpm = |k: usize| (4 + k) as u32;
    match name {
        "CONFIG" => (4, size_of::<GlobalConfig>() as u32),
        "WORKLOADS" => (
            size_of::<WorkloadKey>() as u32,
            size_of::<WorkloadEntry>() as u32,
        ),
        "RANGES_V4" => (4, size_of::<RangeBlock>() as u32),
        "RANGE_INDEX_V4" => (
            size_of::<RangeTableKey>() as u32,
            size_of::<RangeTable>() as u32,
        ),
        "RULES_V6" => (lpm(size_of::<RuleKeyV6>()), size_of::<RuleValue>() as u32),
        "COUNTERS" => (4, 8),
        "DOMAIN_PORTS" => (size_of::<DomainPortKey>() as u32, 1),
        "ORIG_BY_COOKIE" => (8, size_of::<OrigDst>() as u32),
        "ORIG_BY_PEER" => (size_of::<PeerKey>() as u32, size_of::<OrigDst>() as u32),
        "MPTCP_OWNERS" => (4, size_of::<passthrough_common::MptcpOwner>() as u32),
        "VERIFIED" => (
            size_of::<VerifiedKey>() as u32,
            size_of::<VerifiedValue>() as u32,
        ),
        "SNI_TABLES" => (
            size_of::<SniTableKey>() as u32,
            size_of::<SniTable>() as u32,
        ),
        "SNI_NAMES" => (
            lpm(size_of::<SniNameKey>()),
            size_of::<SniNameValue>() as u32,
        ),
        "SNI_SOCKS" => (8, 4),
        "SNI_STATE" => (4, size_of::<SniSock>() as u32),
        "SNI_PROGS" => (4, 4),
        _ => (0, 0), // ring buffer: no key/value
    }
}

/// What is pinned under `state_dir` for the current layout: `Ok(true)` when every map is there
/// with the expected shape, `Ok(false)` when nothing is, `Err(reason)` when it is incompatible.
pub fn check_pinned_layout(state_dir: &Path) -> Result<bool, String> {
    let mut present = 0;
    for name in MAPS {
        let pin = crate::pins::map_pin(state_dir, name);
        if !pin.exists() {
            continue;
        }
        present += 1;
        let map =
            aya::maps::MapData::from_pin(&pin).map_err(|e| format!("{}: {e}", pin.display()))?;
        let info = map.info().map_err(|e| format!("{}: {e}", pin.display()))?;
        let (k, v) = expected_shape(name);
        if (k, v) != (0, 0) && (info.key_size(), info.value_size()) != (k, v) {
            return Err(format!(
                "{}: key/value size {}/{} where this build needs {k}/{v}",
                pin.display(),
                info.key_size(),
                info.value_size()
            ));
        }
    }
    match present {
        0 => Ok(false),
        n if n == MAPS.len() => Ok(true),
        n => Err(format!("only {n} of {} maps are pinned", MAPS.len())),
    }
}

/// The object's program `name` as its type `T` (e.g. [`CgroupSockAddr`]).
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?
        .try_into()
        .map_err(|source| KernelError::Program { name, source })
}

/// Loads one program, retrying (up to 5 tries, as libbpf does) when the kernel answers `EAGAIN`:
/// the verifier gives up with `EAGAIN` when a signal is pending for the loading thread (a
/// `SIGCHLD` of a process the agent or a test spawned), which says nothing about the program.
fn load_program(
    name: &'static str,
    mut load: impl FnMut() -> Result<(), ProgramError>,
) -> Result<(), KernelError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 5 => {}
            r => return r.map_err(|source| KernelError::Program { name, source }),
        }
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::Map(
        name,
        aya::maps::MapError::InvalidName { name: name.into() },
    ))?;
    T::try_from(map).map_err(|e| KernelError::Map(name, e))
}

impl Kernel {
    /// Loads the object and every program (verifier included); attaches nothing.
    ///
    /// With `options.state_dir`, maps are pinned there (and existing compatible pins are
    /// adopted: the running enforcement continues while this agent takes over). Incompatible
    /// pins (another layout version, or maps of the wrong shape) are set aside and removed only
    /// after this agent's programs are attached, so the node is never left without a program.
    pub fn load(options: LoadOptions<'_>) -> Result<Self, KernelError> {
        let LoadOptions {
            mut caps,
            flags,
            agent_mark,
            proxy,
            state_dir,
            ..
        } = options;
        let object = match options.object {
            Some(o) => o,
            None => EBPF_OBJECT.ok_or(KernelError::NoObject)?,
        };
        let log_level = options.bpf_log_level.aya_level();
        let tcp_offsets = crate::btf::tcp_offsets().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no tcp_sock offsets from the kernel's BTF: the TLS fast path is unavailable");
            TcpOffsets::default()
        });
        let mut loader = EbpfLoader::new();
        loader
            // The running kernel's tcp_sock offsets for the TLS fast path (an older object may
            // not have the global: its programs have no fast path).
            .override_global(
                passthrough_common::TCP_OFFSETS_GLOBAL,
                &tcp_offsets,
                options.object.is_none(),
            )
            // aya-log's level, in the programs' read-only data: fixed before verification, so
            // disabled log calls are dead code to the verifier. Another object (a benchmark's
            // older build) may have no log calls at all.
            .override_global(aya_log::LEVEL, &log_level, options.object.is_none())
            .map_max_entries("RANGES_V4", caps.range_blocks())
            .map_max_entries("RANGE_INDEX_V4", RANGE_TABLES)
            .map_max_entries("RULES_V6", caps.rules)
            .map_max_entries("WORKLOADS", caps.workloads);
        let mut adopted = false;
        let mut retire_after_attach = Vec::new();
        let pin_paths: Vec<(&str, PathBuf)> = match state_dir {
            None => Vec::new(),
            Some(dir) => {
                retire_after_attach.extend(crate::pins::other_layouts(dir));
                let layout = crate::pins::layout_dir(dir);
                match check_pinned_layout(dir) {
                    Ok(found) => adopted = found,
                    Err(reason) => {
                        // Set the incompatible pins aside (a rename keeps them attached and
                        // enforcing) and start fresh beside them.
                        let aside = dir.join(format!(
                            "stale-{}-{}",
                            std::process::id(),
                            passthrough_common::LAYOUT_VERSION
                        ));
                        tracing::warn!(%reason, aside = %aside.display(), "pinned state is incompatible; replacing it");
                        std::fs::rename(&layout, &aside).map_err(|source| KernelError::Pin {
                            path: layout.clone(),
                            source,
                        })?;
                        retire_after_attach.push(aside);
                    }
                }
                let maps_dir = layout.join("maps");
                std::fs::create_dir_all(&maps_dir).map_err(|source| KernelError::Pin {
                    path: maps_dir.clone(),
                    source,
                })?;
                if adopted {
                    // Capacities are those of the adopted maps.
                    for (name, slot) in [
                        ("RULES_V6", &mut caps.rules),
                        ("WORKLOADS", &mut caps.workloads),
                    ] {
                        let pin = crate::pins::map_pin(dir, name);
                        if let Ok(info) = aya::maps::MapData::from_pin(&pin).and_then(|m| m.info())
                        {
                            *slot = info.max_entries();
                        }
                    }
                }
                MAPS.iter()
                    .map(|n| (*n, crate::pins::map_pin(dir, n)))
                    .collect()
            }
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object)?;
        for name in PROGRAMS {
            let prog = program::<CgroupSockAddr>(&mut ebpf, name)?;
            load_program(name, || prog.load())?;
        }
        let prog = program::<SockOps>(&mut ebpf, SOCK_OPS)?;
        load_program(SOCK_OPS, || prog.load())?;
        let prog = program::<CgroupSockopt>(&mut ebpf, SETSOCKOPT)?;
        load_program(SETSOCKOPT, || prog.load())?;
        let prog = program::<CgroupSkb>(&mut ebpf, SKB_EGRESS)?;
        load_program(SKB_EGRESS, || prog.load())?;
        let config = take(&mut ebpf, "CONFIG")?;
        let workloads = take(&mut ebpf, "WORKLOADS")?;
        let ranges_v4 = RangeArray::map(ebpf.take_map("RANGES_V4").ok_or(KernelError::Map(
            "RANGES_V4",
            aya::maps::MapError::InvalidName {
                name: "RANGES_V4".into(),
            },
        ))?)?;
        let range_index_v4 = take(&mut ebpf, "RANGE_INDEX_V4")?;
        let rules_v6 = take(&mut ebpf, "RULES_V6")?;
        let counters = take(&mut ebpf, "COUNTERS")?;
        let domain_ports = take(&mut ebpf, "DOMAIN_PORTS")?;
        let verified = take(&mut ebpf, "VERIFIED")?;
        let sni_tables = take(&mut ebpf, "SNI_TABLES")?;
        let sni_names = take(&mut ebpf, "SNI_NAMES")?;
        let orig_by_peer = Some(take(&mut ebpf, "ORIG_BY_PEER")?);
        let deny_events = Some(take(&mut ebpf, "DENY_EVENTS")?);
        let barrier = ProgramBarrier::new().map_err(KernelError::Barrier)?;
        // Optional: a build without the monitor's report (the benchmark's baseline) may not
        // have them; the monitor then shows no allowed kernel decision.
        let monitor_events = take(&mut ebpf, "MONITOR_EVENTS").ok();
        let monitor_drops = take(&mut ebpf, "MONITOR_DROPS").ok();
        Ok(Self {
            ebpf,
            config,
            workloads,
            ranges_v4,
            range_index_v4,
            rules_v6,
            counters,
            domain_ports,
            verified,
            sni_tables,
            sni_names,
            sni: None,
            fast_path: None,
            tcp_offsets,
            orig_by_peer,
            deny_events,
            monitor_events,
            monitor_drops,
            monitor: (false, 0),
            caps,
            written: [None, None],
            active: None,
            barrier,
            // An adopted predecessor may have flipped moments before it died.
            readers_of_retired: adopted,
            generation_counter: 0,
            attached: Vec::new(),
            sock_ops_wanted: false,
            raw_backstop: true,
            links: Vec::new(),
            flags,
            agent_mark,
            proxy,
            state_dir: state_dir.map(Path::to_path_buf),
            adopted,
            retire_after_attach,
        })
        .map(|mut k| {
            if k.adopted
                && let Ok(cfg) = k.config.get(&0, 0)
            {
                k.active = Some(cfg.active_generation & 1);
                k.generation_counter = cfg.policy_generation;
            }
            k
        })
    }

    /// The capacities of the maps in use (those of adopted maps after a restart).
    pub fn capacities(&self) -> Capacities {
        self.caps
    }

    /// True when this agent took over pinned state left by a previous one.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The reader of the programs' aya-log records (`--bpf-log-level`), which forwards them to
    /// the `log` facade (and so into the agent's `tracing` log). Taken once; `None` when taken
    /// already or the object has no log calls.
    pub fn take_bpf_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// The ring buffer of kernel denials ([`passthrough_common::DenyEvent`]). Taken once (the
    /// event reader owns it).
    pub fn take_deny_events(&mut self) -> Option<RingBuf<MapData>> {
        self.deny_events.take()
    }

    /// The ring buffer of allowed egress decisions the programs report while
    /// [`Kernel::set_monitor`] is on, and the per-CPU count of those a full buffer dropped.
    /// Taken once (the monitor's reader owns them).
    pub fn take_monitor(&mut self) -> Option<(RingBuf<MapData>, PerCpuArray<MapData, u64>)> {
        Some((self.monitor_events.take()?, self.monitor_drops.take()?))
    }

    /// Whether the programs report allowed egress decisions (`flags::MONITOR`), 1 in
    /// 2^`shift` of them. Written at once into `CONFIG` (one update of the value the programs
    /// read; nothing else in it changes) and kept by every later apply. While on, the report
    /// holds only as long as its lease (`GlobalConfig::monitor_lease`, about 11 s from now):
    /// call [`Kernel::renew_monitor`] every second or so, so that the flag of an agent that is
    /// killed (and cannot clear it) expires by itself.
    pub fn set_monitor(&mut self, on: bool, shift: u32) -> Result<(), KernelError> {
        self.monitor = (on, shift);
        if self.active.is_none() {
            // Nothing applied yet: the first apply writes the flags.
            return Ok(());
        }
        let mut cfg = self
            .config
            .get(&0, 0)
            .map_err(|e| KernelError::Map("CONFIG", e))?;
        cfg.flags = passthrough_common::flags::with_monitor(cfg.flags, on, shift);
        cfg.monitor_lease = self.monitor_lease();
        self.config
            .set(0, cfg, 0)
            .map_err(|e| KernelError::Map("CONFIG", e))
    }

    /// Renews the monitor's lease while the report is on (nothing otherwise, and nothing when
    /// the lease written last is still the one it would write: at most one `CONFIG` update per
    /// lease unit, about a second).
    pub fn renew_monitor(&mut self) -> Result<(), KernelError> {
        if !self.monitor.0 || self.active.is_none() {
            return Ok(());
        }
        let mut cfg = self
            .config
            .get(&0, 0)
            .map_err(|e| KernelError::Map("CONFIG", e))?;
        let lease = self.monitor_lease();
        if cfg.monitor_lease == lease {
            return Ok(());
        }
        cfg.monitor_lease = lease;
        self.config
            .set(0, cfg, 0)
            .map_err(|e| KernelError::Map("CONFIG", e))
    }

    /// The lease to write now: renewed from the monotonic clock (the programs' `ktime`) while
    /// the report is on, 0 (run out) while off.
    fn monitor_lease(&self) -> u32 {
        if !self.monitor.0 {
            return 0;
        }
        passthrough_common::flags::monitor_lease(crate::events::monotonic_ns())
    }

    /// The map the proxy looks accepted connections up in. Taken once (the proxy owns it).
    pub fn take_orig_dst_map(&mut self) -> Option<OrigDstMap> {
        self.orig_by_peer.take().map(|m| OrigDstMap(Mutex::new(m)))
    }

    /// The generation a new plan must be compiled for (the inactive one).
    pub fn next_generation(&self) -> u32 {
        self.active.map_or(0, |g| g ^ 1)
    }

    /// How many plans have been applied (the policy generation operators see).
    pub fn policy_generation(&self) -> u64 {
        self.generation_counter
    }

    /// Writes `plan` (compiled for [`Kernel::next_generation`]) and flips to it. On error the
    /// active generation is untouched: a connect never sees a half-applied plan.
    /// With the TLS fast path on, the destinations it knows are projected onto the new plan's
    /// rule sets and written with it ([`Kernel::apply_with_verified`]).
    pub fn apply(&mut self, plan: KernelPlan) -> Result<u64, KernelError> {
        let Some(fast) = self.fast_path.clone() else {
            return self.apply_with_verified(plan, &[]);
        };
        let verified = fast.project(&plan);
        let generation = self.apply_with_verified(plan, &verified)?;
        if let Some(active) = self.active_plan() {
            fast.activate(active, &verified);
        }
        Ok(generation)
    }

    /// [`Kernel::apply`], also writing `VERIFIED` entries for the new plan's rule sets before the
    /// flip (the TLS fast path's verified destinations, projected onto the new rule sets): a
    /// policy change keeps exactly the destinations the new policy still allows.
    pub fn apply_with_verified(
        &mut self,
        plan: KernelPlan,
        verified: &[(VerifiedKey, u64)],
    ) -> Result<u64, KernelError> {
        let g = self.next_generation();
        assert_eq!(plan.generation, g, "plan compiled for the wrong generation");
        self.check_capacity(&plan)?;
        // The inactive generation's old entries were retired by the previous flip: before they
        // are removed or overwritten, every program that read the old index must be done.
        self.wait_for_readers_of_retired()?;
        if let Some(old) = self.written[g as usize].take() {
            self.remove_entries(&old);
        } else if self.adopted {
            self.clear_generation_by_scan(g);
        }
        self.ensure_sock_ops(&plan)?;
        if let Err(e) = self
            .write_entries(&plan)
            .and_then(|()| self.write_verified(verified))
        {
            // Roll back what was written; the active generation never pointed at it.
            self.remove_entries(&plan);
            return Err(e);
        }
        let mut cfg = self
            .config
            .get(&0, 0)
            .map_err(|e| KernelError::Map("CONFIG", e))?;
        cfg.unmatched_mode[g as usize] = plan.unmatched_mode;
        cfg.flags = passthrough_common::flags::with_monitor(
            self.effective_flags(),
            self.monitor.0,
            self.monitor.1,
        );
        cfg.monitor_lease = self.monitor_lease();
        cfg.agent_mark = self.agent_mark;
        self.fill_proxy_config(&mut cfg);
        cfg.policy_generation = self.generation_counter + 1;
        // Write the new generation's settings first (no reader uses them yet), then flip.
        self.config
            .set(0, cfg, 0)
            .map_err(|e| KernelError::Map("CONFIG", e))?;
        cfg.active_generation = g;
        self.config
            .set(0, cfg, 0)
            .map_err(|e| KernelError::Map("CONFIG", e))?;
        self.active = Some(g);
        self.readers_of_retired = true;
        self.written[g as usize] = Some(plan);
        self.generation_counter += 1;
        Ok(self.generation_counter)
    }

    /// Adds, moves and removes workload entries **in the active generation**, without a
    /// generation flip: `set` gives each new (or changed) cgroup id the rule set and mode that
    /// cgroup `like` has in the active plan; `remove` deletes entries. Each entry is one map
    /// update, atomic for the programs; the rule sets themselves are untouched, so this is only
    /// for cgroups whose merged configuration some workload of the active plan already has
    /// (Kubernetes mode: a pod cgroup that appears or goes). Returns `false`, changing nothing,
    /// when there is no active plan or a `like` id is not in it.
    pub fn update_active_workloads(
        &mut self,
        set: &[(u64, u64)],
        remove: &[u64],
    ) -> Result<bool, KernelError> {
        let Some(g) = self.active else {
            return Ok(false);
        };
        let inactive = self.written[(g ^ 1) as usize]
            .as_ref()
            .map_or(0, |p| p.workloads.len());
        let Some(plan) = self.written[g as usize].as_mut() else {
            return Ok(false);
        };
        let mut entries = Vec::with_capacity(set.len());
        for (id, like) in set {
            let Some(&(ruleset, mode)) = plan.workloads.get(like) else {
                return Ok(false);
            };
            entries.push((*id, ruleset, mode));
        }
        if plan.workloads.len() + entries.len() + inactive > self.caps.workloads as usize {
            return Err(KernelError::Capacity {
                what: "WORKLOADS",
                needed: plan.workloads.len() + entries.len() + inactive,
                capacity: self.caps.workloads,
            });
        }
        for (id, ruleset, mode) in entries {
            let key = WorkloadKey {
                generation: g,
                _pad: 0,
                cgroup_id: id,
            };
            self.workloads
                .insert(key, WorkloadEntry { ruleset, mode }, 0)
                .map_err(|e| KernelError::Map("WORKLOADS", e))?;
            plan.workloads.insert(id, (ruleset, mode));
        }
        for id in remove {
            let key = WorkloadKey {
                generation: g,
                _pad: 0,
                cgroup_id: *id,
            };
            let _ = self.workloads.remove(&key);
            plan.workloads.remove(id);
        }
        Ok(true)
    }

    /// Removes the retired generation now (after the barrier wait for programs still reading it)
    /// instead of at the start of the next [`Kernel::apply`]. Returns how many rule entries
    /// were removed; when the barrier fails nothing is removed (the next apply waits again, and
    /// fails if it still cannot).
    ///
    /// Deleting a large retired plan takes about as long as writing it (a million trie
    /// entries: about a second here), so doing it right after a flip takes it off the critical
    /// path of the next policy change and halves the trie's steady-state memory. Connects are
    /// not stalled by it: lookups run lock-free under RCU while entries are deleted.
    ///
    /// After adopting pinned state the retired generation is the previous agent's plan, which
    /// this agent never saw: it is found by scanning the maps, once.
    pub fn retire(&mut self) -> usize {
        let Some(active) = self.active else { return 0 };
        let retired = (active ^ 1) as usize;
        let old = self.written[retired].take();
        if old.is_none() && !self.adopted {
            return 0;
        }
        if let Err(e) = self.wait_for_readers_of_retired() {
            tracing::warn!(error = %e, "retired plan kept: cannot wait for programs still reading it");
            self.written[retired] = old;
            return 0;
        }
        let removed = match old {
            Some(old) => {
                self.remove_entries(&old);
                old.rules.len()
            }
            None => {
                self.clear_generation_by_scan(retired as u32);
                0
            }
        };
        // Known empty now: the next apply into this generation has nothing to remove (and an
        // agent that adopted pins does not scan the maps for leftovers again).
        self.written[retired] = Some(KernelPlan {
            generation: retired as u32,
            ..KernelPlan::default()
        });
        removed
    }

    /// Returns once no program that read the retired generation's index can still be running:
    /// one [`ProgramBarrier`] wait per flip (none when nothing flipped since the last wait).
    fn wait_for_readers_of_retired(&mut self) -> Result<(), KernelError> {
        if self.readers_of_retired {
            self.barrier.wait().map_err(KernelError::Barrier)?;
            self.readers_of_retired = false;
        }
        Ok(())
    }

    /// Removes every entry of generation `g`, found by iterating the maps (used after adopting
    /// pins, when we do not know what the previous agent wrote).
    fn clear_generation_by_scan(&mut self, g: u32) {
        use passthrough_common::ruleset::generation;
        let v4: Vec<_> = self
            .range_index_v4
            .keys()
            .flatten()
            .filter(|k| generation(k.ruleset) == g)
            .collect();
        for k in v4 {
            let _ = self.range_index_v4.remove(&k);
        }
        let v6: Vec<_> = self
            .rules_v6
            .keys()
            .flatten()
            .filter(|k| generation(u32::from_be(k.data().ruleset_be)) == g)
            .collect();
        for k in v6 {
            let _ = self.rules_v6.remove(&k);
        }
        let wl: Vec<_> = self
            .workloads
            .keys()
            .flatten()
            .filter(|k| k.generation == g)
            .collect();
        for k in wl {
            let _ = self.workloads.remove(&k);
        }
        let dp: Vec<_> = self
            .domain_ports
            .keys()
            .flatten()
            .filter(|k| generation(k.ruleset) == g)
            .collect();
        for k in dp {
            let _ = self.domain_ports.remove(&k);
        }
        let st: Vec<_> = self
            .sni_tables
            .keys()
            .flatten()
            .filter(|k| generation(k.ruleset) == g)
            .collect();
        for k in st {
            let _ = self.sni_tables.remove(&k);
        }
        let names: Vec<_> = self
            .sni_names
            .keys()
            .flatten()
            .filter(|k| u32::from(u16::from_be(k.data().table_be) >> 15) == g)
            .collect();
        for k in names {
            let _ = self.sni_names.remove(&k);
        }
        self.forget_verified(g);
    }

    /// Removes the `VERIFIED` entries of generation `g` (its rule sets are gone or going).
    fn forget_verified(&mut self, g: u32) {
        use passthrough_common::ruleset::generation;
        let old: Vec<_> = self
            .verified
            .keys()
            .flatten()
            .filter(|k| generation(k.ruleset) == g)
            .collect();
        for k in old {
            let _ = self.verified.remove(&k);
        }
    }

    /// The `CONFIG` flags this kernel gets: the fast path only where it is available, and
    /// whether the egress program judges raw packets.
    fn effective_flags(&self) -> u32 {
        use passthrough_common::flags;
        let mut f = self.flags;
        if !self.tls_fast_path_available() || self.proxy.host_port == 0 {
            f &= !flags::TLS_FAST_PATH;
        }
        if !self.raw_backstop {
            f |= flags::RAW_BACKSTOP_OFF;
        }
        f
    }

    /// Turns the TLS fast path on (`--tls-fast-path=on`): loads the ClientHello judge and its
    /// phases, attaches the judge to `SNI_SOCKS`, and sets the flag the next [`Kernel::apply`]
    /// writes. Loaded only here, so an agent with the fast path off never needs what it uses.
    /// A program attached to a SOCKHASH stays attached as long as the map lives (pinned:
    /// beyond this agent); attaching again replaces it for sockets enrolled from then on, and
    /// sockets enrolled before keep the program they were enrolled with, whose tail calls go
    /// through `SNI_PROGS`, which now holds this agent's phases.
    pub fn enable_tls_fast_path(&mut self) -> Result<(), KernelError> {
        if self.sni.is_some() {
            return Ok(());
        }
        if !self.tls_fast_path_available() {
            return Err(KernelError::Map(
                "SNI_STATE",
                aya::maps::MapError::InvalidName {
                    name: "tcp_sock offsets (kernel BTF)".into(),
                },
            ));
        }
        let prog = program::<SkMsg>(&mut self.ebpf, SNI_JUDGE)?;
        load_program(SNI_JUDGE, || prog.load())?;
        let mut phases: ProgramArray<MapData> = take(&mut self.ebpf, "SNI_PROGS")?;
        for (i, name) in SNI_PHASES.into_iter().enumerate() {
            let prog = program::<SkMsg>(&mut self.ebpf, name)?;
            load_program(name, || prog.load())?;
            let fd = prog
                .fd()
                .map_err(|source| KernelError::Program { name, source })?;
            phases
                .set(i as u32, fd, 0)
                .map_err(|e| KernelError::Map("SNI_PROGS", e))?;
        }
        let socks: SockHash<MapData, u64> = take(&mut self.ebpf, "SNI_SOCKS")?;
        let judge = program::<SkMsg>(&mut self.ebpf, SNI_JUDGE)?;
        let err = |source| KernelError::Program {
            name: SNI_JUDGE,
            source,
        };
        // Owned here, not by the program: dropping it detaches the judge from `SNI_SOCKS`,
        // which `shutdown` must not do when the programs stay (see there).
        let link = judge
            .attach(socks.fd())
            .and_then(|id| judge.take_link(id))
            .map_err(err)?;
        self.sni = Some((socks, phases, link));
        self.fast_path = Some(std::sync::Arc::new(crate::fast_path::FastPath::new(
            self.verified_map()?,
        )));
        self.flags |= passthrough_common::flags::TLS_FAST_PATH;
        Ok(())
    }

    /// The TLS fast path's verified destinations (for the proxy to learn into and the
    /// pre-warmer), when it is on.
    pub fn fast_path(&self) -> Option<std::sync::Arc<crate::fast_path::FastPath>> {
        self.fast_path.clone()
    }

    /// A second handle on `VERIFIED`, for the agent's fast-path learner, which writes from the
    /// proxy's tasks while this `Kernel` stays on the agent's main thread.
    pub fn verified_map(
        &self,
    ) -> Result<HashMap<MapData, VerifiedKey, VerifiedValue>, KernelError> {
        let err = |e| KernelError::Map("VERIFIED", e);
        let id = aya::maps::IterableMap::map(&self.verified)
            .info()
            .map_err(err)?
            .id();
        let data = MapData::from_id(id).map_err(err)?;
        HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(err)
    }

    /// Whether the running kernel lets the TLS fast path be turned on (its BTF gave the
    /// `tcp_sock` offsets the programs read).
    pub fn tls_fast_path_available(&self) -> bool {
        self.tcp_offsets.write_seq != 0
            && self.tcp_offsets.fastopen_req != 0
            && self.tcp_offsets.fastopen_connect_byte != 0
    }

    /// Writes `VERIFIED` entries: each destination counts as verified for its rule set and
    /// port until its expiry (`CLOCK_MONOTONIC` nanoseconds).
    pub fn write_verified(&mut self, entries: &[(VerifiedKey, u64)]) -> Result<(), KernelError> {
        for (key, expires_ns) in entries {
            self.verified
                .insert(
                    *key,
                    VerifiedValue {
                        expires_ns: *expires_ns,
                    },
                    0,
                )
                .map_err(|e| KernelError::Map("VERIFIED", e))?;
        }
        Ok(())
    }

    /// Sockets enrolled for the ClientHello judge right now (connected directly, hello not
    /// yet allowed, or refused and still open).
    pub fn sni_pending_sockets(&self) -> usize {
        self.sni
            .as_ref()
            .map_or(0, |(socks, ..)| socks.keys().flatten().count())
    }

    /// The plan in force (what the programs see now), if any.
    pub fn active_plan(&self) -> Option<&KernelPlan> {
        self.active.and_then(|g| self.written[g as usize].as_ref())
    }

    fn check_capacity(&self, plan: &KernelPlan) -> Result<(), KernelError> {
        let (_, v6) = plan.entry_counts();
        let active = self.active.and_then(|g| self.written[g as usize].as_ref());
        let (_, av6) = active.map_or((0, 0), |p| p.entry_counts());
        if v6 + av6 > self.caps.rules as usize {
            return Err(KernelError::Capacity {
                what: "RULES_V6",
                needed: v6 + av6,
                capacity: self.caps.rules,
            });
        }
        let half = self.ranges_v4.half_blocks();
        if plan.ranges_v4.overflow || plan.ranges_v4.blocks.len() > half as usize {
            // An overflowing table alone would need more blocks than any half has.
            let needed = if plan.ranges_v4.overflow {
                usize::MAX
            } else {
                plan.ranges_v4.blocks.len()
            };
            return Err(KernelError::Capacity {
                what: "RANGES_V4 (blocks per generation)",
                needed,
                capacity: half,
            });
        }
        let tables = plan.ranges_v4.tables.len() + active.map_or(0, |p| p.ranges_v4.tables.len());
        if tables > RANGE_TABLES as usize {
            return Err(KernelError::Capacity {
                what: "RANGE_INDEX_V4",
                needed: tables,
                capacity: RANGE_TABLES,
            });
        }
        let needed = plan.workloads.len() + active.map_or(0, |p| p.workloads.len());
        if needed > self.caps.workloads as usize {
            return Err(KernelError::Capacity {
                what: "WORKLOADS",
                needed,
                capacity: self.caps.workloads,
            });
        }
        Ok(())
    }

    fn write_entries(&mut self, plan: &KernelPlan) -> Result<(), KernelError> {
        // Blocks first, into this generation's half (no descriptor points there yet), then the
        // descriptors: a program finds a table only once its blocks are complete.
        let offset = self
            .ranges_v4
            .write_half(plan.generation, &plan.ranges_v4.blocks);
        let (keys, tables): (Vec<RangeTableKey>, Vec<RangeTable>) =
            plan.ranges_v4.rebased(offset).unzip();
        write_batched(&mut self.range_index_v4, "RANGE_INDEX_V4", &keys, &tables)?;
        let (keys, values) = rule_keys(plan);
        write_batched(&mut self.rules_v6, "RULES_V6", &keys, &values)?;
        for (ruleset, port) in &plan.domain_ports {
            let key = DomainPortKey {
                ruleset: *ruleset,
                port: u32::from(*port),
            };
            let mut bits = passthrough_common::domain_port::ANY;
            if plan.non_tls_ports.contains(&(*ruleset, *port)) {
                bits |= passthrough_common::domain_port::NON_TLS;
            }
            self.domain_ports
                .insert(key, bits, 0)
                .map_err(|e| KernelError::Map("DOMAIN_PORTS", e))?;
        }
        // Names before tables: a program finds a table only once its names are in place.
        for table in plan.sni_tables.values() {
            let entries = table.entries();
            let keys: Vec<Key<SniNameKey>> = entries
                .iter()
                .map(|e| Key::new(e.prefix_len, e.key))
                .collect();
            let values: Vec<SniNameValue> = entries.iter().map(|e| e.value).collect();
            write_batched(&mut self.sni_names, "SNI_NAMES", &keys, &values)?;
        }
        for ((ruleset, port), table) in &plan.sni_tables {
            self.sni_tables
                .insert(
                    SniTableKey {
                        ruleset: *ruleset,
                        port: u32::from(*port),
                    },
                    SniTable {
                        id: table.id,
                        _pad: 0,
                    },
                    0,
                )
                .map_err(|e| KernelError::Map("SNI_TABLES", e))?;
        }
        for (cgroup_id, (ruleset, mode)) in &plan.workloads {
            let key = WorkloadKey {
                generation: plan.generation,
                _pad: 0,
                cgroup_id: *cgroup_id,
            };
            self.workloads
                .insert(
                    key,
                    WorkloadEntry {
                        ruleset: *ruleset,
                        mode: *mode,
                    },
                    0,
                )
                .map_err(|e| KernelError::Map("WORKLOADS", e))?;
        }
        Ok(())
    }

    fn fill_proxy_config(&self, cfg: &mut GlobalConfig) {
        use passthrough_common::flags;
        let p = &self.proxy;
        cfg.flags &= !(flags::PROXY | flags::POD_PROXY_V4 | flags::POD_PROXY_V6);
        if p.host_port == 0 {
            return;
        }
        cfg.flags |= flags::PROXY;
        cfg.proxy_port_be = p.host_port.to_be();
        cfg.host_netns_cookie = own_netns_cookie().unwrap_or(0);
        if let Some(v4) = p.pod_v4 {
            cfg.flags |= flags::POD_PROXY_V4;
            cfg.pod_proxy_v4 = v4.ip().octets();
            cfg.pod_proxy_port_be = v4.port().to_be();
        }
        if let Some(v6) = p.pod_v6 {
            cfg.flags |= flags::POD_PROXY_V6;
            cfg.pod_proxy_v6 = v6.ip().octets();
            cfg.pod_proxy_port_be = v6.port().to_be();
        }
    }

    fn remove_entries(&mut self, plan: &KernelPlan) {
        // Best effort: an entry that is already gone is fine.
        let keys: Vec<RangeTableKey> = plan.ranges_v4.tables.iter().map(|(k, _)| *k).collect();
        remove_batched(&mut self.range_index_v4, &keys);
        remove_batched(&mut self.rules_v6, &rule_keys(plan).0);
        for (ruleset, port) in &plan.domain_ports {
            let _ = self.domain_ports.remove(&DomainPortKey {
                ruleset: *ruleset,
                port: u32::from(*port),
            });
        }
        for (ruleset, port) in plan.sni_tables.keys() {
            let _ = self.sni_tables.remove(&SniTableKey {
                ruleset: *ruleset,
                port: u32::from(*port),
            });
        }
        for table in plan.sni_tables.values() {
            let keys: Vec<Key<SniNameKey>> = table
                .entries()
                .iter()
                .map(|e| Key::new(e.prefix_len, e.key))
                .collect();
            remove_batched(&mut self.sni_names, &keys);
        }
        self.forget_verified(plan.generation);
        for cgroup_id in plan.workloads.keys() {
            let key = WorkloadKey {
                generation: plan.generation,
                _pad: 0,
                cgroup_id: *cgroup_id,
            };
            let _ = self.workloads.remove(&key);
        }
    }

    /// Attaches every program to `cgroup`. Call after the first [`Kernel::apply`], so the
    /// programs never run against empty maps.
    ///
    /// With pinned state, each link is pinned under `links/<cgroup id>/<program>`; a link that
    /// is already pinned there (left by a previous agent) is switched to our program in place
    /// with `BPF_LINK_UPDATE` instead of attaching a second copy.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), KernelError> {
        let mut names: Vec<&'static str> = PROGRAMS.to_vec();
        names.push(SETSOCKOPT);
        // The TLS fast path needs the egress program too (its backstop for payload that did
        // not pass the judge); without the raw backstop it does only that.
        if self.raw_backstop
            || self.effective_flags() & passthrough_common::flags::TLS_FAST_PATH != 0
        {
            names.push(SKB_EGRESS);
        } else {
            self.unpin_link(cgroup, SKB_EGRESS)?;
        }
        if self.sock_ops_wanted || self.has_pinned_link(cgroup, SOCK_OPS) {
            names.push(SOCK_OPS);
        }
        self.attach_programs(cgroup, &names)?;
        self.attached.push(cgroup.to_path_buf());
        Ok(())
    }

    /// Whether [`Kernel::attach`] attaches the raw/ping socket backstop ([`SKB_EGRESS`]);
    /// default true. Off, a backstop link a previous agent pinned is removed at attach.
    pub fn set_raw_socket_backstop(&mut self, on: bool) {
        self.raw_backstop = on;
    }

    /// Removes the pinned link of `name` at `cgroup`, if a previous agent left one: detached
    /// first, so its program no longer runs when this returns (the kernel frees an unpinned
    /// link, and detaches it, only later).
    fn unpin_link(&self, cgroup: &Path, name: &str) -> Result<(), KernelError> {
        let Some(pin) = self.link_pin(cgroup, name) else {
            return Ok(());
        };
        crate::pins::detach_and_unpin(&pin).map_err(|source| KernelError::Pin { path: pin, source })
    }

    fn has_pinned_link(&self, cgroup: &Path, name: &str) -> bool {
        self.link_pin(cgroup, name).is_some_and(|p| p.exists())
    }

    /// Where the link of `name` at `cgroup` is pinned (`None` without pinned state or cgroup).
    fn link_pin(&self, cgroup: &Path, name: &str) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt as _;
        let ino = std::fs::metadata(cgroup).ok()?.ino();
        Some(crate::pins::link_dir(self.state_dir.as_deref()?, ino).join(name))
    }

    /// sock_ops only serves redirected connections (it re-keys their original destination),
    /// yet runs for several events of *every* TCP connection of the cgroup (~0.6 µs per
    /// connect measured here). So it is attached only once a plan can redirect: the proxy is
    /// on and some workload has a Domain match. Called before the flip that makes redirects
    /// possible.
    fn ensure_sock_ops(&mut self, plan: &KernelPlan) -> Result<(), KernelError> {
        if self.sock_ops_wanted || self.proxy.host_port == 0 || plan.domain_ports.is_empty() {
            return Ok(());
        }
        self.sock_ops_wanted = true;
        for cg in self.attached.clone() {
            if !self.has_pinned_link(&cg, SOCK_OPS) {
                self.attach_programs(&cg, &[SOCK_OPS])?;
            }
        }
        Ok(())
    }

    fn attach_programs(
        &mut self,
        cgroup: &Path,
        names: &[&'static str],
    ) -> Result<(), KernelError> {
        use std::os::unix::fs::MetadataExt as _;
        let file = File::open(cgroup).map_err(|source| KernelError::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        let cgroup_id = file
            .metadata()
            .map_err(|source| KernelError::Cgroup {
                path: cgroup.into(),
                source,
            })?
            .ino();
        let link_dir = self
            .state_dir
            .as_deref()
            .map(|d| crate::pins::link_dir(d, cgroup_id));
        if let Some(dir) = &link_dir {
            std::fs::create_dir_all(dir).map_err(|source| KernelError::Pin {
                path: dir.clone(),
                source,
            })?;
        }
        for &name in names {
            let pin = link_dir.as_ref().map(|d| d.join(name));
            let program = self
                .ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?;
            if let Some(pin) = pin.as_ref().filter(|p| p.exists()) {
                let fd = program
                    .fd()
                    .map_err(|source| KernelError::Program { name, source })?;
                crate::pins::link_update(pin, std::os::fd::AsFd::as_fd(fd)).map_err(|source| {
                    KernelError::Pin {
                        path: pin.clone(),
                        source,
                    }
                })?;
                continue;
            }
            // Single is the only mode the bpf_link path accepts (links are always multi).
            let err = |source| KernelError::Program { name, source };
            let fd_link = match name {
                SOCK_OPS => {
                    let p: &mut SockOps = program.try_into().map_err(err)?;
                    let id = p.attach(&file, CgroupAttachMode::Single).map_err(err)?;
                    into_fd_link(p.take_link(id).map_err(err)?, cgroup)?
                }
                SETSOCKOPT => {
                    // aya 0.14 cannot turn a sockopt link into an FdLink: made and pinned by hand.
                    let fd = program
                        .fd()
                        .map_err(|source| KernelError::Program { name, source })?;
                    let io = |source| KernelError::Pin {
                        path: pin.clone().unwrap_or_else(|| cgroup.into()),
                        source,
                    };
                    let link = crate::pins::cgroup_link_create(
                        std::os::fd::AsFd::as_fd(fd),
                        std::os::fd::AsFd::as_fd(&file),
                        BPF_CGROUP_SETSOCKOPT,
                    )
                    .map_err(io)?;
                    match &pin {
                        Some(path) => {
                            crate::pins::obj_pin(std::os::fd::AsFd::as_fd(&link), path)
                                .map_err(io)?;
                            let pinned = aya::programs::links::PinnedLink::from_pin(path)
                                .map_err(|e| io(std::io::Error::other(e)))?;
                            self.links.push(LinkHold::Pinned(pinned));
                        }
                        None => self.links.push(LinkHold::Raw(link)),
                    }
                    continue;
                }
                SKB_EGRESS => {
                    let p: &mut CgroupSkb = program.try_into().map_err(err)?;
                    let id = p
                        .attach(&file, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                        .map_err(err)?;
                    into_fd_link(p.take_link(id).map_err(err)?, cgroup)?
                }
                _ => {
                    let p: &mut CgroupSockAddr = program.try_into().map_err(err)?;
                    let id = p.attach(&file, CgroupAttachMode::Single).map_err(err)?;
                    into_fd_link(p.take_link(id).map_err(err)?, cgroup)?
                }
            };
            match pin {
                Some(pin) => {
                    let pinned = fd_link.pin(&pin).map_err(|e| KernelError::Pin {
                        path: pin.clone(),
                        source: std::io::Error::other(e),
                    })?;
                    self.links.push(LinkHold::Pinned(pinned));
                }
                None => self.links.push(LinkHold::Owned(fd_link)),
            }
        }
        Ok(())
    }

    /// After every wanted cgroup is attached: removes pinned links of attachment points no
    /// longer wanted, and pinned state of other layouts. Our programs are in place by now, so
    /// this never opens a window.
    pub fn retire_stale(&mut self) -> Vec<PathBuf> {
        use std::os::unix::fs::MetadataExt as _;
        let mut removed = Vec::new();
        let Some(state) = self.state_dir.clone() else {
            return removed;
        };
        let wanted: Vec<u64> = self
            .attached
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok().map(|m| m.ino()))
            .collect();
        for (id, dir) in crate::pins::pinned_attachments(&state) {
            if !wanted.contains(&id) {
                removed.extend(crate::pins::retire_tree(&dir).unwrap_or_default());
            }
        }
        for dir in std::mem::take(&mut self.retire_after_attach) {
            match crate::pins::retire_tree(&dir) {
                Ok(r) => removed.extend(r),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove old pinned state")
                }
            }
        }
        if !removed.is_empty() {
            // retire_tree detached the old links. A kernel without BPF_LINK_DETACH (before 5.9)
            // releases an unpinned link from a work queue instead: wait (bounded) until the old
            // programs are off our cgroups, so "replaced" means exactly one set attached.
            let ours = self.program_ids();
            let only_ours = |cg: &PathBuf| {
                crate::pins::OUR_ATTACH_TYPES.iter().all(|t| {
                    crate::pins::attached_prog_ids(cg, *t)
                        .is_ok_and(|ids| ids.iter().all(|id| ours.contains(id)))
                })
            };
            let deadline = Instant::now() + Duration::from_secs(2);
            while !self.attached.iter().all(only_ours) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        removed
    }

    /// Ids of this agent's attachable programs.
    fn program_ids(&self) -> Vec<u32> {
        PROGRAMS
            .iter()
            .chain([&SOCK_OPS, &SKB_EGRESS, &SETSOCKOPT])
            .filter_map(|n| self.ebpf.program(n)?.info().ok().map(|i| i.id()))
            .collect()
    }

    /// Shuts down. `keep`: leave programs attached and maps pinned (enforcement continues,
    /// a restarted agent adopts them). Otherwise detach everything and remove the pins.
    pub fn shutdown(mut self, keep: bool) -> Result<(), KernelError> {
        if keep {
            // The pinned sock_ops program goes on enrolling new fast-path sockets into the
            // pinned `SNI_SOCKS`; the judge's attachment to it is not a pinnable link, and
            // dropping it would detach the judge: every such socket would then be held by the
            // egress check with no verdict ever coming (allowed TLS hanging until the next
            // agent). Leaked, it stays attached for as long as the map lives, as after a
            // SIGKILL; the next agent attaches its own judge in its place, `uninstall` frees
            // it with the map.
            if let Some((_, _, link)) = self.sni.take() {
                std::mem::forget(link);
            }
            return Ok(());
        }
        let ours = self.program_ids();
        let attached = self.attached.clone();
        let links = std::mem::take(&mut self.links);
        if let Some(state) = self.state_dir.clone() {
            let layout = crate::pins::layout_dir(&state);
            crate::pins::retire_tree(&layout).map_err(|source| KernelError::Pin {
                path: layout.clone(),
                source,
            })?;
            let _ = std::fs::remove_dir(&state);
        }
        drop(links);
        drop(self);
        // Pinned links were detached by retire_tree. A link only held by its fd is freed (and
        // detached) when the fd closes, from a work queue on some kernels, as are pinned links
        // on kernels without BPF_LINK_DETACH: wait (bounded) so "the agent exited" really means
        // "nothing of ours is attached".
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let still = attached.iter().any(|cg| {
                crate::pins::OUR_ATTACH_TYPES.iter().any(|t| {
                    crate::pins::attached_prog_ids(cg, *t)
                        .is_ok_and(|ids| ids.iter().any(|id| ours.contains(id)))
                })
            });
            if !still {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Cumulative run time and run count of one program (kernel BPF statistics; they only
    /// advance while statistics are enabled, e.g. by `aya::sys::enable_stats`).
    pub fn program_stats(&self, name: &str) -> Option<(Duration, u64)> {
        let info = self.ebpf.program(name)?.info().ok()?;
        Some((info.run_time(), info.run_count()))
    }

    /// The kernel's information on one loaded program (sizes, instructions verified), for
    /// benchmarks.
    pub fn program_info(&self, name: &str) -> Option<aya::programs::ProgramInfo> {
        self.ebpf.program(name)?.info().ok()
    }

    /// Id and kernel-reported memory (`memlock` in the map's fdinfo: for the trie the nodes
    /// actually allocated, for the range array its whole preallocated size) of each rule map,
    /// for benchmarks and capacity planning.
    pub fn rule_maps_memory(&self) -> Vec<RuleMapMemory> {
        use aya::maps::IterableMap as _;
        [
            ("RANGES_V4", &self.ranges_v4.map),
            ("RANGE_INDEX_V4", self.range_index_v4.map()),
            ("RULES_V6", self.rules_v6.map()),
        ]
        .into_iter()
        .map(|(name, map)| RuleMapMemory {
            name,
            id: map.info().map(|i| i.id()).unwrap_or(0),
            bytes: fdinfo_memlock(map).unwrap_or(0),
        })
        .collect()
    }

    /// The cgroups the programs are attached to.
    pub fn attached(&self) -> &[PathBuf] {
        &self.attached
    }

    /// Sums the per-CPU counters, by name (`deny_no_match`, `allow_loopback`, …: see
    /// `passthrough_common::counter::Counter`).
    pub fn counters(&self) -> BTreeMap<String, u64> {
        Counter::all()
            .map(|(i, c)| {
                let total = self
                    .counters
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (c.to_string(), total)
            })
            .collect()
    }
}

/// One rule trie's id and memory, see [`Kernel::rule_maps_memory`].
#[derive(Debug, Clone, Copy)]
pub struct RuleMapMemory {
    /// Map name in the object.
    pub name: &'static str,
    /// Kernel map id (0 if unknown); the map is freed when no id lookup finds it any more.
    pub id: u32,
    /// Bytes the kernel accounts to the map (`memlock:` in fdinfo).
    pub bytes: u64,
}

/// The `memlock:` line of a map fd's fdinfo.
fn fdinfo_memlock(map: &MapData) -> Option<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = map.fd().as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A link this process created.
#[derive(Debug)]
enum LinkHold {
    /// Pinned: survives this process.
    Pinned(#[allow(dead_code, reason = "held for its lifetime")] aya::programs::links::PinnedLink),
    /// Not pinned (no state dir): detached when dropped.
    Owned(#[allow(dead_code, reason = "held for its lifetime")] aya::programs::links::FdLink),
    /// A link made by hand ([`SETSOCKOPT`]), not pinned: detached when closed.
    Raw(#[allow(dead_code, reason = "held for its lifetime")] std::os::fd::OwnedFd),
}

/// The trie keys and values of a plan's IPv6 entries, in the plan's (sorted) order.
type RuleKeys<K> = (Vec<Key<K>>, Vec<RuleValue>);

fn rule_keys(plan: &KernelPlan) -> RuleKeys<RuleKeyV6> {
    let mut v6: RuleKeys<RuleKeyV6> = Default::default();
    for (entry, id) in &plan.rules {
        if let Some((len, data)) = entry.v6_key() {
            v6.0.push(Key::new(len, data));
            v6.1.push(RuleValue { match_id: *id });
        }
    }
    v6
}

/// The `RANGES_V4` array, mapped into our address space (`BPF_F_MMAPABLE`): a generation's
/// blocks are written with one copy instead of one syscall or one trie node per entry.
struct RangeArray {
    map: MapData,
    ptr: std::ptr::NonNull<RangeBlock>,
    blocks: u32,
}

// SAFETY: the mapping is owned by this value and only written through `&mut self`.
unsafe impl Send for RangeArray {}
unsafe impl Sync for RangeArray {}

impl RangeArray {
    fn map(map: aya::maps::Map) -> Result<Self, KernelError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let aya::maps::Map::Array(map) = map else {
            return Err(KernelError::Map(
                "RANGES_V4",
                aya::maps::MapError::InvalidName {
                    name: "RANGES_V4 (not an array)".into(),
                },
            ));
        };
        let io = |e: std::io::Error| {
            KernelError::Map(
                "RANGES_V4",
                aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "mmap",
                    io_error: e,
                }),
            )
        };
        let blocks = map
            .info()
            .map_err(|e| KernelError::Map("RANGES_V4", e))?
            .max_entries();
        let len = blocks as usize * std::mem::size_of::<RangeBlock>();
        // SAFETY: a shared read-write mapping of a BPF_F_MMAPABLE array of exactly `len` bytes;
        // the kernel keeps the map alive while it is mapped.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io(std::io::Error::last_os_error()));
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<RangeBlock>())
            .ok_or_else(|| io(std::io::Error::other("mmap returned null")))?;
        Ok(Self { map, ptr, blocks })
    }

    /// Blocks each generation owns.
    fn half_blocks(&self) -> u32 {
        self.blocks / 2
    }

    /// Copies `blocks` to the start of generation `g`'s half; returns the half's first block.
    /// The caller has checked they fit and that no program still reads that half.
    fn write_half(&mut self, g: u32, blocks: &[RangeBlock]) -> u32 {
        let offset = (g & 1) * self.half_blocks();
        assert!(
            blocks.len() <= self.half_blocks() as usize,
            "range blocks exceed the half (capacity is checked first)"
        );
        // SAFETY: in bounds (asserted); the region is plain data shared with the programs, which
        // read this half only after the descriptors written next point at it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                blocks.as_ptr(),
                self.ptr.as_ptr().add(offset as usize),
                blocks.len(),
            )
        };
        offset
    }
}

impl Drop for RangeArray {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe {
            libc::munmap(
                self.ptr.as_ptr().cast(),
                self.blocks as usize * std::mem::size_of::<RangeBlock>(),
            )
        };
    }
}

/// A typed map the batched writes fall back to, element by element, on kernels without batch
/// ops for its type.
trait ElementMap<K, V> {
    /// The map itself, for the batch syscalls.
    fn data(&self) -> &MapData;
    /// One update.
    fn put(&mut self, key: &K, value: &V) -> Result<(), aya::maps::MapError>;
    /// One delete; an entry already gone is fine.
    fn delete(&mut self, key: &K);
}

impl<K: aya::Pod, V: aya::Pod> ElementMap<Key<K>, V> for LpmTrie<MapData, K, V> {
    fn data(&self) -> &MapData {
        aya::maps::IterableMap::map(self)
    }
    fn put(&mut self, key: &Key<K>, value: &V) -> Result<(), aya::maps::MapError> {
        self.insert(key, *value, 0)
    }
    fn delete(&mut self, key: &Key<K>) {
        let _ = self.remove(key);
    }
}

impl<K: aya::Pod, V: aya::Pod> ElementMap<K, V> for HashMap<MapData, K, V> {
    fn data(&self) -> &MapData {
        aya::maps::IterableMap::map(self)
    }
    fn put(&mut self, key: &K, value: &V) -> Result<(), aya::maps::MapError> {
        self.insert(key, value, 0)
    }
    fn delete(&mut self, key: &K) {
        let _ = self.remove(key);
    }
}

/// Writes entries with `BPF_MAP_UPDATE_BATCH` where the kernel has it for the map's type (one
/// syscall per [`batch::CHUNK`] entries instead of one per entry: at a million entries the
/// syscalls were most of the write time), else one update per entry.
fn write_batched<K, V>(
    map: &mut impl ElementMap<K, V>,
    name: &'static str,
    keys: &[K],
    values: &[V],
) -> Result<(), KernelError> {
    match batch::update(map.data(), keys, values) {
        Ok(()) => Ok(()),
        Err(batch::Error::Unsupported) => {
            for (key, value) in keys.iter().zip(values) {
                map.put(key, value).map_err(|e| KernelError::Map(name, e))?;
            }
            Ok(())
        }
        Err(batch::Error::Io(e)) => Err(KernelError::Map(
            name,
            aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error: e,
            }),
        )),
    }
}

/// Removes entries, best effort (entries already gone are skipped): `BPF_MAP_DELETE_BATCH`, or
/// one delete per entry.
fn remove_batched<K, V>(map: &mut impl ElementMap<K, V>, keys: &[K]) {
    if matches!(
        batch::delete(map.data(), keys),
        Err(batch::Error::Unsupported)
    ) {
        for key in keys {
            map.delete(key);
        }
    }
}

/// Raw `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` (aya has no wrapper). The kernel's
/// generic batch ops (which LPM tries use) run the per-element update/delete in a loop with
/// `cond_resched()` between elements, so a large batch neither holds a lock for long nor
/// stalls other CPUs: readers (the programs) keep running lock-free under RCU throughout.
mod batch {
    use std::os::fd::{AsFd as _, AsRawFd as _};

    use aya::maps::MapData;

    /// Entries per syscall: large enough that syscall overhead vanishes, small enough that a
    /// signal or an error is noticed soon.
    pub(super) const CHUNK: usize = 16_384;

    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
    /// The kernel's internal ENOTSUPP (no batch op for this map type).
    const ENOTSUPP: i32 = 524;

    /// `union bpf_attr`, batch variant.
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }

    pub(super) enum Error {
        /// The kernel has no batch op for this map: use the per-element path.
        Unsupported,
        Io(std::io::Error),
    }

    /// One batch syscall; returns how many elements the kernel processed and the error, if any.
    fn call<K, V>(
        cmd: libc::c_long,
        map: &MapData,
        keys: &[K],
        values: Option<&[V]>,
    ) -> (usize, Option<std::io::Error>) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.map_or(0, |v| v.as_ptr() as u64),
            count: keys.len() as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid bpf_attr prefix of the advertised size; `keys`/`values`
        // point at `count` initialised Pod elements of the map's key/value size and outlive
        // the call; the kernel writes back only `attr.count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let done = (attr.count as usize).min(keys.len());
        if rc == 0 {
            (keys.len(), None)
        } else {
            (done, Some(std::io::Error::last_os_error()))
        }
    }

    fn unsupported(e: &std::io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(ENOTSUPP) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
        )
    }

    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

    /// `union bpf_attr`, element variant.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (hash maps, Linux 5.14+): one syscall where a lookup
    /// and a delete take two. `Ok(None)`: no such key; `Err(Unsupported)`: use the two calls.
    pub(super) fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
        map: &MapData,
        key: &K,
    ) -> Result<Option<V>, Error> {
        let mut value = std::mem::MaybeUninit::<V>::zeroed();
        let mut attr = ElemAttr {
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: key as *const K as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` is a valid bpf_attr prefix; `key` and `value` point at the map's key
        // and value sizes (Pod types of the map) and outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_ELEM,
                &mut attr as *mut ElemAttr,
                std::mem::size_of::<ElemAttr>() as u32,
            )
        };
        if rc == 0 {
            // SAFETY: the kernel filled the value (Pod: every bit pattern is valid).
            return Ok(Some(unsafe { value.assume_init() }));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ if unsupported(&e) => Err(Error::Unsupported),
            _ => Err(Error::Io(e)),
        }
    }

    /// Inserts or overwrites every `keys[i] → values[i]`.
    pub(super) fn update<K, V>(map: &MapData, keys: &[K], values: &[V]) -> Result<(), Error> {
        for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
            if let (done, Some(e)) = call(BPF_MAP_UPDATE_BATCH, map, k, Some(v)) {
                if done == 0 && unsupported(&e) {
                    return Err(Error::Unsupported);
                }
                return Err(Error::Io(e));
            }
        }
        Ok(())
    }

    /// Deletes `keys`, skipping those that are not there.
    pub(super) fn delete<K>(map: &MapData, keys: &[K]) -> Result<(), Error> {
        let mut rest = keys;
        let mut first = true;
        while !rest.is_empty() {
            let n = rest.len().min(CHUNK);
            let (done, err) = call::<K, u8>(BPF_MAP_DELETE_BATCH, map, &rest[..n], None);
            match err {
                None => rest = &rest[n..],
                Some(e) if first && done == 0 && unsupported(&e) => return Err(Error::Unsupported),
                // The batch stops at the first missing key: skip it and go on.
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
                Some(e) => return Err(Error::Io(e)),
            }
            first = false;
        }
        Ok(())
    }
}

/// The network-namespace cookie of the calling thread's netns (`SO_NETNS_COOKIE`, Linux 5.14):
/// the programs compare it with each socket's to tell host-netns workloads from pods.
pub fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd and out-pointer of the advertised size.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The kernel's record of redirected connections, keyed by the client's address as the proxy
/// sees it (`ORIG_BY_PEER`). The proxy reads it through `passthrough_proxy::OrigDstSource`
/// ([`crate::proxy_maps`]).
pub struct OrigDstMap(Mutex<HashMap<MapData, PeerKey, OrigDst>>);

impl OrigDstMap {
    /// Looks up and removes the entry of the connection whose client is `peer`.
    pub fn take(&self, peer: std::net::SocketAddr) -> Option<OrigDst> {
        let addr = match peer.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        let key = PeerKey {
            addr,
            port: u32::from(peer.port()),
        };
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        {
            use aya::maps::IterableMap as _;
            match batch::lookup_and_delete::<PeerKey, OrigDst>(map.map(), &key) {
                Ok(found) => return found,
                Err(batch::Error::Io(_)) => return None,
                Err(batch::Error::Unsupported) => {}
            }
        }
        let found = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(found)
    }
}

/// A program's cgroup link as an `FdLink` (the kind that can be pinned).
fn into_fd_link<L>(link: L, cgroup: &Path) -> Result<aya::programs::links::FdLink, KernelError>
where
    L: TryInto<aya::programs::links::FdLink, Error = aya::programs::links::LinkError>,
{
    link.try_into().map_err(|e| KernelError::Pin {
        path: cgroup.into(),
        source: std::io::Error::other(e),
    })
}
