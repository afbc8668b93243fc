//! Compiled plans seen as the kernel's maps, so the kernel's own decision
//! (`passthrough_common::decide::decide`, the code the eBPF programs run) can be run in user
//! space: by the property test that holds it equal to [`crate::decision`], and by the tests of
//! `run`'s settings.
//!
//! [`PlanMaps`] holds one plan per generation, laid out as the loader lays them out: each
//! generation's IPv4 range blocks in its own half of one block array (so the table
//! descriptors are rebased exactly as `Kernel::apply` rebases them), the IPv6 entries keyed by
//! rule set (generation bit included) and port, workloads keyed by generation. A lookup can
//! therefore only find the other generation's entries if the keys are wrong — which is what
//! testing with both generations filled checks.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use ipnet::{IpNet, Ipv6Net};
use passthrough_common::{
    DenyEvent, DomainPortKey, GlobalConfig, RangeBlock, RangeTable, RangeTableKey, Reason,
    RuleKeyV6, SniLookup, VerifiedKey, WorkloadEntry, WorkloadKey, counter,
    decide::{self, Caller, Decision, Maps, Transport, V4, V6},
    domain_port, flags,
    sni::{self, KERNEL_LIMITS, SNI_KEY_NAME, SniNameKey, SniNameValue, SniTable, SniTableKey},
};

use crate::{
    plan::KernelPlan,
    sni_plan::{SniEntry, longest_match},
};

/// Blocks per generation half in [`PlanMaps`]' block array (the loader sizes its halves by
/// `--rule-capacity`; here any size that holds the plans will do).
const HALF: u32 = 1 << 24;

/// Settings the loader writes into `CONFIG` besides the plans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelSettings {
    /// The proxy is running (`flags::PROXY`): Domain candidates are redirected, else denied.
    pub proxy: bool,
    /// `--audit` (`flags::AUDIT`).
    pub audit: bool,
    /// The agent's `SO_MARK` (0: none).
    pub agent_mark: u32,
    /// `--tls-fast-path=on` (`flags::TLS_FAST_PATH`).
    pub tls_fast_path: bool,
}

/// One or two compiled plans as the kernel's maps (see the module doc). Counts and denial
/// events are recorded for inspection.
#[derive(Debug)]
pub struct PlanMaps<'p> {
    config: GlobalConfig,
    plans: [Option<&'p KernelPlan>; 2],
    workloads: BTreeMap<(u32, u64), WorkloadEntry>,
    tables: BTreeMap<RangeTableKey, RangeTable>,
    v6: BTreeMap<(u32, u16), Vec<Ipv6Net>>,
    /// `SNI_NAMES`: every table's entries, of both generations (told apart by table id).
    sni_names: Vec<SniEntry>,
    /// `VERIFIED` (none expires here).
    verified: BTreeSet<(u32, u16, [u8; 16])>,
    counts: RefCell<Vec<u64>>,
    events: RefCell<Vec<DenyEvent>>,
    observed: RefCell<Vec<DenyEvent>>,
    /// What [`Maps::clock_ns`] answers.
    clock_ns: u64,
}

impl<'p> PlanMaps<'p> {
    /// `active` in force, `previous` (compiled for the other generation) still in the maps, as
    /// right after a flip.
    pub fn new(
        active: &'p KernelPlan,
        previous: Option<&'p KernelPlan>,
        settings: KernelSettings,
    ) -> Self {
        let g = active.generation & 1;
        let mut plans = [None, None];
        plans[g as usize] = Some(active);
        if let Some(p) = previous {
            plans[(p.generation & 1) as usize] = Some(p);
        }
        let mut config = GlobalConfig {
            active_generation: g,
            flags: if settings.proxy { flags::PROXY } else { 0 }
                | if settings.audit { flags::AUDIT } else { 0 }
                | if settings.tls_fast_path {
                    flags::TLS_FAST_PATH
                } else {
                    0
                },
            agent_mark: settings.agent_mark,
            ..GlobalConfig::default()
        };
        let mut workloads = BTreeMap::new();
        let mut tables = BTreeMap::new();
        let mut v6: BTreeMap<(u32, u16), Vec<Ipv6Net>> = BTreeMap::new();
        let mut sni_names = Vec::new();
        for plan in plans.iter().flatten() {
            for table in plan.sni_tables.values() {
                sni_names.extend(table.entries());
            }
            let pg = plan.generation & 1;
            config.unmatched_mode[pg as usize] = plan.unmatched_mode;
            for (cgroup, (ruleset, mode)) in &plan.workloads {
                workloads.insert(
                    (pg, *cgroup),
                    WorkloadEntry {
                        ruleset: *ruleset,
                        mode: *mode,
                    },
                );
            }
            tables.extend(plan.ranges_v4.rebased(pg * HALF));
            for entry in plan.rules.keys() {
                if let IpNet::V6(n) = entry.net {
                    v6.entry((entry.ruleset, entry.port)).or_default().push(n);
                }
            }
        }
        PlanMaps {
            config,
            plans,
            workloads,
            tables,
            v6,
            sni_names,
            verified: BTreeSet::new(),
            counts: RefCell::new(vec![0; counter::COUNT as usize]),
            events: RefCell::new(Vec::new()),
            observed: RefCell::new(Vec::new()),
            clock_ns: 0,
        }
    }

    /// The maps as while someone watches (`flags::MONITOR` set, no sampling, a lease that
    /// never runs out) or not: allowed egress decisions are then recorded
    /// ([`PlanMaps::take_observed`]).
    pub fn with_monitor(mut self, on: bool) -> Self {
        self.config.flags = flags::with_monitor(self.config.flags, on, 0);
        self.config.monitor_lease = if on { u32::MAX } else { 0 };
        self
    }

    /// Sets the monitor's lease ([`GlobalConfig::monitor_lease`]) and the clock the decision
    /// reads (pure: no real clock here), for testing the lease.
    pub fn set_monitor_lease(&mut self, lease: u32, clock_ns: u64) {
        self.config.monitor_lease = lease;
        self.clock_ns = clock_ns;
    }

    /// The allowed decisions reported to watchers so far (and forgets them).
    pub fn take_observed(&self) -> Vec<DenyEvent> {
        std::mem::take(&mut self.observed.borrow_mut())
    }

    /// The kernel's decision for a socket whose cgroup path (root's child first, the socket's
    /// own cgroup last) is `cgroup_path`, dialling `dst`. A v4-mapped destination is judged as
    /// IPv4, as connect6/sendmsg6 fold it.
    pub fn decide(
        &self,
        cgroup_path: &[u64],
        dst: SocketAddr,
        transport: Transport,
        socket_mark: u32,
    ) -> Decision {
        let caller = CgroupPath(cgroup_path);
        let port_be = dst.port().to_be();
        let ip = match dst.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(a) => decide::decide(
                self,
                caller,
                V4(a.octets()),
                port_be,
                transport,
                socket_mark,
            ),
            IpAddr::V6(a) => decide::decide(
                self,
                caller,
                V6(a.octets()),
                port_be,
                transport,
                socket_mark,
            ),
        }
    }

    /// Adds `VERIFIED` entries (as the agent projects them, `sni_plan::FastPathTables::keys`).
    pub fn verify(&mut self, keys: impl IntoIterator<Item = VerifiedKey>) {
        self.verified
            .extend(keys.into_iter().map(|k| (k.ruleset, k.port, k.addr)));
    }

    /// The kernel's ClientHello judge (path `kernel-sni`) on the first bytes `hello` of a
    /// connection the decision sent there (`Verdict::KernelSni { workload }`) to `port`: the
    /// shared parser (`passthrough_common::sni`, as the `sk_msg` programs run it whole), then
    /// [`decide::judge_name`] over these maps. Counted as the programs count it. A hello that
    /// is still incomplete is judged as the programs judge one that never completes.
    pub fn judge_hello(&self, workload: u64, port: u16, hello: &[u8]) -> Reason {
        let mut lookup = SniLookup {
            prefix_len: 0,
            key: SniNameKey {
                table_be: 0,
                name: [0; SNI_KEY_NAME],
            },
        };
        let reason = match sni::parse(hello, KERNEL_LIMITS, &mut lookup.key.name) {
            Ok(h) => decide::judge_name(self, workload, port, h.name, &mut lookup),
            Err(stop) => decide::stop_reason(stop),
        };
        decide::kernel_sni_decided(self, reason);
        reason
    }

    /// Counter `index` so far.
    pub fn count(&self, index: u32) -> u64 {
        self.counts
            .borrow()
            .get(index as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The denial events reported so far (and forgets them).
    pub fn take_events(&self) -> Vec<DenyEvent> {
        std::mem::take(&mut self.events.borrow_mut())
    }

    fn block_of(&self, index: u32) -> Option<&RangeBlock> {
        let plan = self.plans[(index / HALF) as usize % 2]?;
        plan.ranges_v4.blocks.get((index % HALF) as usize)
    }
}

impl Maps for PlanMaps<'_> {
    fn config(&self) -> Option<&GlobalConfig> {
        Some(&self.config)
    }

    fn workload(&self, key: &WorkloadKey) -> Option<&WorkloadEntry> {
        self.workloads.get(&(key.generation, key.cgroup_id))
    }

    fn range_table(&self, key: &RangeTableKey) -> Option<&RangeTable> {
        self.tables.get(key)
    }

    fn range_block(&self, index: u32) -> Option<&RangeBlock> {
        self.block_of(index)
    }

    fn rule_v6(&self, key: &RuleKeyV6) -> bool {
        let (ruleset, port) = (u32::from_be(key.ruleset_be), u16::from_be(key.port_be));
        let addr = Ipv6Addr::from(key.addr);
        self.v6
            .get(&(ruleset, port))
            .is_some_and(|nets| nets.iter().any(|n| n.contains(&addr)))
    }

    fn domain_port(&self, key: &DomainPortKey) -> Option<u8> {
        let generation = passthrough_common::ruleset::generation(key.ruleset);
        let port = u16::try_from(key.port).ok()?;
        let plan = self.plans[generation as usize]?;
        plan.domain_ports.contains(&(key.ruleset, port)).then(|| {
            domain_port::ANY
                | if plan.non_tls_ports.contains(&(key.ruleset, port)) {
                    domain_port::NON_TLS
                } else {
                    0
                }
        })
    }

    fn verified(&self, key: &VerifiedKey) -> bool {
        self.verified.contains(&(key.ruleset, key.port, key.addr))
    }

    fn sni_table(&self, key: &SniTableKey) -> Option<SniTable> {
        let generation = passthrough_common::ruleset::generation(key.ruleset);
        let port = u16::try_from(key.port).ok()?;
        let table = self.plans[generation as usize]?
            .sni_tables
            .get(&(key.ruleset, port))?;
        Some(SniTable {
            id: table.id,
            _pad: 0,
        })
    }

    fn sni_name(&self, lookup: &SniLookup) -> Option<SniNameValue> {
        longest_match(&self.sni_names, lookup)
    }

    fn count(&self, index: u32) {
        if let Some(c) = self.counts.borrow_mut().get_mut(index as usize) {
            *c += 1;
        }
    }

    fn report(&self, event: DenyEvent) {
        self.events.borrow_mut().push(event);
    }

    /// The clock set by [`PlanMaps::set_monitor_lease`] (0 by default).
    fn clock_ns(&self) -> u64 {
        self.clock_ns
    }

    /// Every observed decision (`sample_shift` is the kernel's random draw; not emulated).
    fn observe(&self, event: DenyEvent, _sample_shift: u32) {
        self.observed.borrow_mut().push(event);
    }
}

/// A caller given by its cgroup path: ancestors from the root's child down, its own cgroup
/// last (what `bpf_get_current_ancestor_cgroup_id(level)` returns for level 1, 2, …).
#[derive(Debug, Clone, Copy)]
pub struct CgroupPath<'a>(pub &'a [u64]);

impl Caller for CgroupPath<'_> {
    fn cgroup_id(&self) -> u64 {
        self.0.last().copied().unwrap_or(0)
    }

    fn ancestor_cgroup_id(&self, level: i32) -> u64 {
        usize::try_from(level)
            .ok()
            .and_then(|l| l.checked_sub(1))
            .and_then(|i| self.0.get(i))
            .copied()
            .unwrap_or(0)
    }

    fn process(&self) -> (u32, [u8; 16]) {
        (0, [0; 16])
    }
}
