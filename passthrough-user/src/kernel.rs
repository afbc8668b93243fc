//! The kernel side, seen from user space: loads the programs, attaches them to cgroups, and
//! writes [`KernelPlan`]s into the maps with an atomic generation flip.
//!
//! # Atomic policy swap
//! Every map entry carries a generation (0 or 1): the workload key has it, and the trie keys
//! carry it in the high bit of the rule-set id. A program reads `CONFIG.active_generation` once
//! and only looks at entries of that generation. [`Kernel::apply`] therefore writes the whole
//! new plan under the *inactive* generation, then flips the index with one map update. The
//! entries of the old generation stay in place until the next apply (at least
//! [`MIN_GRACE`] later), so a program that read the old index just before the flip still finds
//! a complete old rule set.

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, lpm_trie::{Key, LpmTrie}},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps},
};
use passthrough_common::{
    DomainPortKey, GlobalConfig, OrigDst, PeerKey, RuleKeyV4, RuleKeyV6, RuleValue, WorkloadEntry,
    WorkloadKey, counter,
};

use crate::plan::{KernelPlan, RuleEntry};

/// The eBPF object built by `build.rs` (aya-build), embedded in the binary.
#[cfg(not(ebpf_skipped))]
pub static EBPF_OBJECT: Option<&[u8]> =
    Some(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/passthrough")));
/// Built with `AYA_BUILD_SKIP=1`: no programs in this binary.
#[cfg(ebpf_skipped)]
pub static EBPF_OBJECT: Option<&[u8]> = None;

/// Shortest time the entries of a retired generation are kept after the flip.
pub const MIN_GRACE: Duration = Duration::from_millis(50);

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
    /// Entries of each rule trie (IPv4 and IPv6), across both generations.
    pub rules: u32,
    /// Workload entries across both generations.
    pub workloads: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self { rules: 1 << 21, workloads: 1 << 16 }
    }
}

/// Loaded programs and their maps.
pub struct Kernel {
    ebpf: Ebpf,
    config: Array<MapData, GlobalConfig>,
    workloads: HashMap<MapData, WorkloadKey, WorkloadEntry>,
    rules_v4: LpmTrie<MapData, RuleKeyV4, RuleValue>,
    rules_v6: LpmTrie<MapData, RuleKeyV6, RuleValue>,
    counters: PerCpuArray<MapData, u64>,
    domain_ports: HashMap<MapData, DomainPortKey, u8>,
    orig_by_peer: Option<HashMap<MapData, PeerKey, OrigDst>>,
    deny_events: Option<RingBuf<MapData>>,
    caps: Capacities,
    /// What each generation currently has in the maps (so it can be removed exactly).
    written: [Option<KernelPlan>; 2],
    active: Option<u32>,
    flipped_at: Option<Instant>,
    generation_counter: u64,
    attached: Vec<PathBuf>,
    flags: u32,
    agent_mark: u32,
    proxy: ProxySettings,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(KernelError::Map(name, aya::maps::MapError::InvalidName { name: name.into() }))?;
    T::try_from(map).map_err(|e| KernelError::Map(name, e))
}

impl Kernel {
    /// Loads the object and every program (verifier included); attaches nothing.
    pub fn load(caps: Capacities, flags: u32, agent_mark: u32, proxy: ProxySettings) -> Result<Self, KernelError> {
        let object = EBPF_OBJECT.ok_or(KernelError::NoObject)?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("RULES_V4", caps.rules)
            .map_max_entries("RULES_V6", caps.rules)
            .map_max_entries("WORKLOADS", caps.workloads)
            .load(object)?;
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?
                .try_into()
                .map_err(|source| KernelError::Program { name, source })?;
            prog.load().map_err(|source| KernelError::Program { name, source })?;
        }
        let sock_ops: &mut SockOps = ebpf
            .program_mut(SOCK_OPS)
            .ok_or(KernelError::MissingProgram(SOCK_OPS))?
            .try_into()
            .map_err(|source| KernelError::Program { name: SOCK_OPS, source })?;
        sock_ops.load().map_err(|source| KernelError::Program { name: SOCK_OPS, source })?;
        let config = take(&mut ebpf, "CONFIG")?;
        let workloads = take(&mut ebpf, "WORKLOADS")?;
        let rules_v4 = take(&mut ebpf, "RULES_V4")?;
        let rules_v6 = take(&mut ebpf, "RULES_V6")?;
        let counters = take(&mut ebpf, "COUNTERS")?;
        let domain_ports = take(&mut ebpf, "DOMAIN_PORTS")?;
        let orig_by_peer = Some(take(&mut ebpf, "ORIG_BY_PEER")?);
        let deny_events = Some(take(&mut ebpf, "DENY_EVENTS")?);
        Ok(Self {
            ebpf,
            config,
            workloads,
            rules_v4,
            rules_v6,
            counters,
            domain_ports,
            orig_by_peer,
            deny_events,
            caps,
            written: [None, None],
            active: None,
            flipped_at: None,
            generation_counter: 0,
            attached: Vec::new(),
            flags,
            agent_mark,
            proxy,
        })
    }

    /// The ring buffer of kernel denials ([`passthrough_common::DenyEvent`]). Taken once (the
    /// event reader owns it).
    pub fn take_deny_events(&mut self) -> Option<RingBuf<MapData>> {
        self.deny_events.take()
    }

    /// The map the proxy looks accepted connections up in. Taken once (the proxy owns it).
    pub fn take_orig_dst_map(&mut self) -> Option<OrigDstMap> {
        self.orig_by_peer.take().map(|m| OrigDstMap(std::sync::Mutex::new(m)))
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
    pub fn apply(&mut self, plan: KernelPlan) -> Result<u64, KernelError> {
        let g = self.next_generation();
        assert_eq!(plan.generation, g, "plan compiled for the wrong generation");
        self.check_capacity(&plan)?;
        // The inactive generation's old entries were retired by the previous flip; give any
        // program that read the old index right before that flip time to finish.
        if let Some(at) = self.flipped_at {
            let since = at.elapsed();
            if since < MIN_GRACE {
                std::thread::sleep(MIN_GRACE - since);
            }
        }
        if let Some(old) = self.written[g as usize].take() {
            self.remove_entries(&old);
        }
        if let Err(e) = self.write_entries(&plan) {
            // Roll back what was written; the active generation never pointed at it.
            self.remove_entries(&plan);
            return Err(e);
        }
        let mut cfg = self.config.get(&0, 0).map_err(|e| KernelError::Map("CONFIG", e))?;
        cfg.unmatched_mode[g as usize] = plan.unmatched_mode;
        cfg.flags = self.flags;
        cfg.agent_mark = self.agent_mark;
        self.fill_proxy_config(&mut cfg);
        // Write the new generation's settings first (no reader uses them yet), then flip.
        self.config.set(0, cfg, 0).map_err(|e| KernelError::Map("CONFIG", e))?;
        cfg.active_generation = g;
        self.config.set(0, cfg, 0).map_err(|e| KernelError::Map("CONFIG", e))?;
        self.active = Some(g);
        self.flipped_at = Some(Instant::now());
        self.written[g as usize] = Some(plan);
        self.generation_counter += 1;
        Ok(self.generation_counter)
    }

    fn check_capacity(&self, plan: &KernelPlan) -> Result<(), KernelError> {
        let (v4, v6) = plan.entry_counts();
        let active = self.active.and_then(|g| self.written[g as usize].as_ref());
        let (av4, av6) = active.map_or((0, 0), |p| p.entry_counts());
        for (what, needed) in [("RULES_V4", v4 + av4), ("RULES_V6", v6 + av6)] {
            if needed > self.caps.rules as usize {
                return Err(KernelError::Capacity { what, needed, capacity: self.caps.rules });
            }
        }
        let needed = plan.workloads.len() + active.map_or(0, |p| p.workloads.len());
        if needed > self.caps.workloads as usize {
            return Err(KernelError::Capacity { what: "WORKLOADS", needed, capacity: self.caps.workloads });
        }
        Ok(())
    }

    fn write_entries(&mut self, plan: &KernelPlan) -> Result<(), KernelError> {
        for (entry, id) in &plan.rules {
            let value = RuleValue { match_id: *id };
            if let Some((len, data)) = entry.v4_key() {
                self.rules_v4.insert(&Key::new(len, data), value, 0).map_err(|e| KernelError::Map("RULES_V4", e))?;
            } else if let Some((len, data)) = entry.v6_key() {
                self.rules_v6.insert(&Key::new(len, data), value, 0).map_err(|e| KernelError::Map("RULES_V6", e))?;
            }
        }
        for (ruleset, port) in &plan.domain_ports {
            let key = DomainPortKey { ruleset: *ruleset, port: u32::from(*port) };
            self.domain_ports.insert(key, 1, 0).map_err(|e| KernelError::Map("DOMAIN_PORTS", e))?;
        }
        for (cgroup_id, (ruleset, mode)) in &plan.workloads {
            let key = WorkloadKey { generation: plan.generation, _pad: 0, cgroup_id: *cgroup_id };
            self.workloads
                .insert(key, WorkloadEntry { ruleset: *ruleset, mode: *mode }, 0)
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
        for entry in plan.rules.keys() {
            remove_rule(&mut self.rules_v4, &mut self.rules_v6, entry);
        }
        for (ruleset, port) in &plan.domain_ports {
            let _ = self.domain_ports.remove(&DomainPortKey { ruleset: *ruleset, port: u32::from(*port) });
        }
        for cgroup_id in plan.workloads.keys() {
            let key = WorkloadKey { generation: plan.generation, _pad: 0, cgroup_id: *cgroup_id };
            let _ = self.workloads.remove(&key);
        }
    }

    /// Attaches every program to `cgroup`. Call after the first [`Kernel::apply`], so the
    /// programs never run against empty maps.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), KernelError> {
        let file = File::open(cgroup).map_err(|source| KernelError::Cgroup { path: cgroup.into(), source })?;
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?
                .try_into()
                .map_err(|source| KernelError::Program { name, source })?;
            // Single is the only mode the bpf_link path accepts (links are always multi).
            prog.attach(&file, CgroupAttachMode::Single).map_err(|source| KernelError::Program { name, source })?;
        }
        let sock_ops: &mut SockOps = self
            .ebpf
            .program_mut(SOCK_OPS)
            .ok_or(KernelError::MissingProgram(SOCK_OPS))?
            .try_into()
            .map_err(|source| KernelError::Program { name: SOCK_OPS, source })?;
        sock_ops
            .attach(&file, CgroupAttachMode::Single)
            .map_err(|source| KernelError::Program { name: SOCK_OPS, source })?;
        self.attached.push(cgroup.to_path_buf());
        Ok(())
    }

    /// The cgroups the programs are attached to.
    pub fn attached(&self) -> &[PathBuf] {
        &self.attached
    }

    /// Sums the per-CPU counters, by name.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let total = self.counters.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
            out.insert(*name, total);
        }
        out
    }

    /// Detaches everything and unloads (also what `Drop` does; this makes it explicit).
    pub fn detach_all(self) {
        drop(self);
    }
}

fn remove_rule(
    v4: &mut LpmTrie<MapData, RuleKeyV4, RuleValue>,
    v6: &mut LpmTrie<MapData, RuleKeyV6, RuleValue>,
    entry: &RuleEntry,
) {
    if let Some((len, data)) = entry.v4_key() {
        let _ = v4.remove(&Key::new(len, data));
    } else if let Some((len, data)) = entry.v6_key() {
        let _ = v6.remove(&Key::new(len, data));
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
/// sees it (`ORIG_BY_PEER`).
pub struct OrigDstMap(std::sync::Mutex<HashMap<MapData, PeerKey, OrigDst>>);

impl OrigDstMap {
    /// Looks up and removes the entry of the connection whose client is `peer`.
    pub fn take(&self, peer: std::net::SocketAddr) -> Option<OrigDst> {
        let addr = match peer.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        let key = PeerKey { addr, port: u32::from(peer.port()) };
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let found = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(found)
    }
}

impl crate::proxy::OrigDstSource for OrigDstMap {
    fn take(&self, peer: std::net::SocketAddr, _local: std::net::SocketAddr) -> Option<crate::proxy::Redirected> {
        let o = OrigDstMap::take(self, peer)?;
        let v6 = std::net::Ipv6Addr::from(o.addr);
        let ip = match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(v6),
        };
        let comm_len = o.comm.iter().position(|b| *b == 0).unwrap_or(o.comm.len());
        Some(crate::proxy::Redirected {
            dst: std::net::SocketAddr::new(ip, u16::from_be(o.port_be)),
            workload: o.workload,
            pid: o.pid,
            comm: String::from_utf8_lossy(&o.comm[..comm_len]).into_owned(),
        })
    }
}
