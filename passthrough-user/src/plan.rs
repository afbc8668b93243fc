//! Compiles merged per-workload configurations into the entries of the kernel maps.
//!
//! Pure: no IO, no clock. The loader writes a [`KernelPlan`] into the maps; tests (and the
//! property test of the policy layer) use [`KernelPlan::lookup`], which looks entries up exactly
//! the way `passthrough-ebpf/src/decide.rs` does, to check the plan against the decision core.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net};
use passthrough_common::{RULE_KEY_FIXED_BITS, RuleKeyV4, RuleKeyV6, mode, ruleset};

use crate::policy::{FxHashMap, MatchKind, MergedConf, Mode};

/// The kernel's number for a [`Mode`].
pub fn mode_code(m: Mode) -> u32 {
    match m {
        Mode::All => mode::ALL,
        Mode::Matched => mode::MATCHED,
        Mode::None => mode::NONE,
    }
}

/// Folds an IPv4-mapped IPv6 network (`::ffff:a.b.c.d/96+n`) into IPv4, as the programs fold
/// v4-mapped destinations; clears host bits. Other networks are returned truncated.
pub fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, n.prefix_len() - 96).expect("<= 32").trunc()),
            None => IpNet::V6(n.trunc()),
        },
        other => other.trunc(),
    }
}

/// One trie entry: rule set, port (0 = any) and network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleEntry {
    /// Rule set id including the generation bit.
    pub ruleset: u32,
    /// Destination port, 0 = every port.
    pub port: u16,
    /// Canonical network.
    pub net: IpNet,
}

impl RuleEntry {
    /// The IPv4 trie key (prefix length, data), if this is an IPv4 entry.
    pub fn v4_key(&self) -> Option<(u32, RuleKeyV4)> {
        match self.net {
            IpNet::V4(n) => Some((
                RULE_KEY_FIXED_BITS + u32::from(n.prefix_len()),
                RuleKeyV4 { ruleset_be: self.ruleset.to_be(), port_be: self.port.to_be(), addr: n.addr().octets() },
            )),
            IpNet::V6(_) => None,
        }
    }

    /// The IPv6 trie key (prefix length, data), if this is an IPv6 entry.
    pub fn v6_key(&self) -> Option<(u32, RuleKeyV6)> {
        match self.net {
            IpNet::V6(n) => Some((
                RULE_KEY_FIXED_BITS + u32::from(n.prefix_len()),
                RuleKeyV6 { ruleset_be: self.ruleset.to_be(), port_be: self.port.to_be(), addr: n.addr().octets() },
            )),
            IpNet::V4(_) => None,
        }
    }
}

/// Everything one generation puts into the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelPlan {
    /// Generation (0 or 1) the entries are keyed with.
    pub generation: u32,
    /// cgroup id → (rule set, mode code).
    pub workloads: BTreeMap<u64, (u32, u32)>,
    /// Trie entries → match id (index into `match_labels`).
    pub rules: BTreeMap<RuleEntry, u32>,
    /// Mode code for sockets below an attachment but in no workload.
    pub unmatched_mode: u32,
    /// Human-readable description of each match id (for explanations and metrics).
    pub match_labels: Vec<String>,
    /// `(rule set, port)` pairs with a Domain match (port 0 = every port): SPEC §3 rule 4
    /// candidates, redirected to the proxy when no IP/CIDR match allows.
    pub domain_ports: BTreeSet<(u32, u16)>,
}

/// Inputs of [`compile`] besides the workloads.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// `--internal-cidr` ranges.
    pub internal: Vec<IpNet>,
    /// DNS resolvers UDP may reach on port 53.
    pub resolvers: Vec<IpAddr>,
    /// `--unselected-mode`, also used for sockets in no workload.
    pub unmatched_mode: Option<Mode>,
}

/// What makes two workloads' rule sets identical: their canonical (network, port) IP/CIDR
/// entries and their Domain ports, both sorted and deduplicated.
type RuleSetShape = (Vec<(IpNet, u16)>, Vec<u16>);

/// Identifies one match for its label: policy, file, index, value, port.
type LabelKey<'a> = (&'a str, &'a std::path::Path, usize, &'a str, Option<u16>);

/// Builds the plan of one generation. Workloads with identical IP/CIDR match sets share one
/// rule set, so a thousand pods of one deployment cost one set of trie entries.
pub fn compile(generation: u32, workloads: &[(u64, &MergedConf)], opts: &PlanOptions) -> KernelPlan {
    let generation = generation & 1;
    let mut plan = KernelPlan {
        generation,
        unmatched_mode: mode_code(opts.unmatched_mode.unwrap_or(Mode::All)),
        ..KernelPlan::default()
    };
    let internal_rs = ruleset::id(generation, ruleset::INTERNAL);
    for net in &opts.internal {
        let id = plan.label(format!("internal-cidr {net}"));
        plan.rules.entry(RuleEntry { ruleset: internal_rs, port: 0, net: canonical_net(*net) }).or_insert(id);
    }
    let resolvers_rs = ruleset::id(generation, ruleset::RESOLVERS);
    for ip in &opts.resolvers {
        let id = plan.label(format!("resolver {ip}"));
        let net = canonical_net(IpNet::from(*ip));
        plan.rules.entry(RuleEntry { ruleset: resolvers_rs, port: 53, net }).or_insert(id);
    }

    // Workloads share a rule set when their kernel-relevant content (IP/CIDR entries and
    // Domain ports) is identical. Workloads given the very same `MergedConf` (see
    // `PolicySet::merge_all`) are recognised by address first, without building the shape.
    let mut rulesets: FxHashMap<RuleSetShape, u32> = FxHashMap::default();
    let mut by_conf: FxHashMap<*const MergedConf, u32> = FxHashMap::default();
    // One label (match id) per match, however many rule sets it appears in.
    let mut labels: FxHashMap<LabelKey<'_>, u32> = FxHashMap::default();
    let mut next_index = ruleset::FIRST_WORKLOAD;
    for (cgroup_id, conf) in workloads {
        let conf: &MergedConf = conf;
        if let Some(rs) = by_conf.get(&(conf as *const MergedConf)) {
            plan.workloads.insert(*cgroup_id, (*rs, mode_code(conf.mode)));
            continue;
        }
        let mut kernel_matches: Vec<(IpNet, u16)> = conf
            .matches
            .iter()
            .filter(|m| matches!(m.kind, MatchKind::Ip | MatchKind::Cidr))
            .filter_map(|m| m.net.map(|n| (canonical_net(n), m.port.unwrap_or(0))))
            .collect();
        kernel_matches.sort_unstable();
        kernel_matches.dedup();
        let mut domain_ports: Vec<u16> = conf
            .matches
            .iter()
            .filter(|m| m.kind == MatchKind::Domain)
            .map(|m| m.port.unwrap_or(0))
            .collect();
        domain_ports.sort_unstable();
        domain_ports.dedup();
        let shape = (kernel_matches, domain_ports);
        let rs = match rulesets.get(&shape) {
            Some(rs) => *rs,
            None => {
                let rs = ruleset::id(generation, next_index);
                next_index += 1;
                for m in conf.matches.iter().filter(|m| matches!(m.kind, MatchKind::Ip | MatchKind::Cidr)) {
                    let Some(net) = m.net else { continue };
                    let entry = RuleEntry { ruleset: rs, port: m.port.unwrap_or(0), net: canonical_net(net) };
                    if let std::collections::btree_map::Entry::Vacant(v) = plan.rules.entry(entry) {
                        let key = (m.origin.policy.as_str(), m.origin.file.as_path(), m.origin.index, m.value.as_str(), m.port);
                        let id = match labels.get(&key) {
                            Some(id) => *id,
                            None => {
                                let label = format!(
                                    "{}[{}] {:?} {}{}",
                                    m.origin.policy,
                                    m.origin.index,
                                    m.kind,
                                    m.value,
                                    m.port.map(|p| format!(":{p}")).unwrap_or_default()
                                );
                                plan.match_labels.push(label);
                                let id = (plan.match_labels.len() - 1) as u32;
                                labels.insert(key, id);
                                id
                            }
                        };
                        v.insert(id);
                    }
                }
                for port in &shape.1 {
                    plan.domain_ports.insert((rs, *port));
                }
                rulesets.insert(shape, rs);
                rs
            }
        };
        by_conf.insert(conf as *const MergedConf, rs);
        plan.workloads.insert(*cgroup_id, (rs, mode_code(conf.mode)));
    }
    plan
}

impl KernelPlan {
    fn label(&mut self, s: String) -> u32 {
        self.match_labels.push(s);
        (self.match_labels.len() - 1) as u32
    }

    /// Number of IPv4 and IPv6 trie entries.
    pub fn entry_counts(&self) -> (usize, usize) {
        let v4 = self.rules.keys().filter(|e| e.net.addr().is_ipv4()).count();
        (v4, self.rules.len() - v4)
    }

    /// Emulates rule 4 in the programs: true when a TCP connection that [`KernelPlan::lookup`]
    /// denies would be redirected to the proxy instead (a Domain match could apply).
    pub fn redirects(&self, cgroup_chain: &[u64], dst: IpAddr, port: u16, udp: bool) -> bool {
        if udp || self.lookup(cgroup_chain, dst, port, udp).is_some() {
            return false;
        }
        let rs = cgroup_chain
            .iter()
            .find_map(|c| self.workloads.get(c).copied())
            .map(|(rs, m)| (rs, m == mode::MATCHED));
        match rs {
            Some((rs, true)) => self.domain_ports.contains(&(rs, port)) || self.domain_ports.contains(&(rs, 0)),
            _ => false,
        }
    }

    fn lpm_hit(&self, rs: u32, port: u16, ip: IpAddr) -> Option<u32> {
        // Longest prefix within (rule set, port), like the kernel trie. Linear: tests only.
        self.rules
            .iter()
            .filter(|(e, _)| e.ruleset == rs && e.port == port && e.net.contains(&ip))
            .max_by_key(|(e, _)| e.net.prefix_len())
            .map(|(_, id)| *id)
    }

    /// Emulates the programs' decision for a socket whose cgroup chain (own id first, then
    /// ancestors nearest first) is `cgroup_chain`. Returns `Some(match_id or u32::MAX)` when
    /// allowed, `None` when denied.
    pub fn lookup(&self, cgroup_chain: &[u64], dst: IpAddr, port: u16, udp: bool) -> Option<u32> {
        let dst = match dst {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        if dst.is_loopback() || dst == IpAddr::V6(Ipv6Addr::LOCALHOST) {
            return Some(u32::MAX);
        }
        let g = self.generation;
        if let Some(id) = self.lpm_hit(ruleset::id(g, ruleset::INTERNAL), 0, dst) {
            return Some(id);
        }
        // UDP to a configured resolver's port 53 is DNS, allowed in every mode (SPEC §3 "UDP:
        // in None/Matched, a datagram is allowed ... to DNS (port 53) on the configured
        // resolvers"), so it is checked before the mode, like the internal ranges.
        if udp
            && port == 53
            && let Some(id) = self.lpm_hit(ruleset::id(g, ruleset::RESOLVERS), 53, dst)
        {
            return Some(id);
        }
        let (rs, m) = cgroup_chain
            .iter()
            .find_map(|c| self.workloads.get(c).copied())
            .unwrap_or((ruleset::id(g, u32::MAX >> 1), self.unmatched_mode));
        if m == mode::ALL {
            return Some(u32::MAX);
        }
        if m != mode::MATCHED {
            return None;
        }
        self.lpm_hit(rs, port, dst).or_else(|| self.lpm_hit(rs, 0, dst))
    }
}
