//! Compiles merged per-workload configurations into the entries of the kernel maps.
//!
//! Pure: no IO, no clock. The loader writes a [`KernelPlan`] into the maps; tests run the
//! kernel's own decision (`passthrough_common::decide`) over plans through
//! [`crate::plan_maps::PlanMaps`] to check them against the decision core.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net};
use passthrough_common::{RULE_KEY_FIXED_BITS, RangeTableKey, RuleKeyV6, mode, ruleset};
use rustc_hash::FxHashMap;

use crate::{MatchKind, MergedConf, Mode, ranges::RangeImage, resolver::Resolver};

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
            Some(v4) => IpNet::V4(
                Ipv4Net::new(v4, n.prefix_len() - 96)
                    .expect("<= 32")
                    .trunc(),
            ),
            None => IpNet::V6(n.trunc()),
        },
        other => other.trunc(),
    }
}

/// One rule entry: rule set, port (0 = any) and network (IPv4 entries become range tables,
/// IPv6 entries trie entries).
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
    /// The IPv6 trie key (prefix length, data), if this is an IPv6 entry.
    pub fn v6_key(&self) -> Option<(u32, RuleKeyV6)> {
        match self.net {
            IpNet::V6(n) => Some((
                RULE_KEY_FIXED_BITS + u32::from(n.prefix_len()),
                RuleKeyV6 {
                    ruleset_be: self.ruleset.to_be(),
                    port_be: self.port.to_be(),
                    addr: n.addr().octets(),
                },
            )),
            IpNet::V4(_) => None,
        }
    }
}

/// What a match id (the value of a trie entry) stands for: explanations, logs and metrics
/// print it. Cheap to build (shared strings, no formatting until displayed), because a plan of
/// 100,000 matches builds 100,000 of them on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchLabel {
    /// An `--internal-cidr` range.
    Internal(IpNet),
    /// A DNS resolver (UDP to its address and port allowed in every mode).
    Resolver(Resolver),
    /// A policy's `appendMatch` entry.
    Match {
        /// The policy's name.
        policy: Arc<str>,
        /// The index in its `appendMatch`.
        index: usize,
        /// IP or CIDR.
        kind: MatchKind,
        /// The value as written.
        value: Arc<str>,
        /// The port, if any.
        port: Option<u16>,
    },
}

impl fmt::Display for MatchLabel {
    /// `internal-cidr 10.0.0.0/8`, `resolver 10.96.0.10:53`, `egress[3] Cidr 10.0.0.0/8:443`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MatchLabel::Internal(net) => write!(f, "internal-cidr {net}"),
            MatchLabel::Resolver(r) => write!(f, "resolver {r}"),
            MatchLabel::Match {
                policy,
                index,
                kind,
                value,
                port,
            } => {
                write!(f, "{policy}[{index}] {kind:?} {value}")?;
                match port {
                    Some(p) => write!(f, ":{p}"),
                    None => Ok(()),
                }
            }
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
    /// Rule entries → match id (index into `match_labels`).
    pub rules: BTreeMap<RuleEntry, u32>,
    /// The IPv4 entries as range tables, one per (rule set, port), as the programs search them.
    pub ranges_v4: RangeImage,
    /// Mode code for sockets below an attachment but in no workload.
    pub unmatched_mode: u32,
    /// What each match id stands for (for explanations and metrics).
    pub match_labels: Vec<MatchLabel>,
    /// `(rule set, port)` pairs with a Domain match (port 0 = every port): docs/decisions.md rule 4
    /// candidates, redirected to the proxy when no IP/CIDR match allows.
    pub domain_ports: BTreeSet<(u32, u16)>,
}

/// Map entries per map: what one plan puts in the kernel maps ([`KernelPlan::usage`]), or what
/// the maps can hold (the loader's capacities, in the same shape for the metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapUsage {
    /// IPv4 rule entries (compiled into the range tables).
    pub rules_v4: usize,
    /// `RANGES_V4` blocks the plan's range tables take (of one generation's half).
    pub range_blocks_v4: usize,
    /// `RULES_V6` entries.
    pub rules_v6: usize,
    /// `WORKLOADS` entries.
    pub workloads: usize,
}

/// Inputs of [`compile`] besides the workloads.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// `--internal-cidr` ranges.
    pub internal: Vec<IpNet>,
    /// DNS resolvers UDP may reach (each at its own port).
    pub resolvers: Vec<Resolver>,
    /// `--unselected-mode`, also used for sockets in no workload.
    pub unmatched_mode: Option<Mode>,
}

/// What makes two workloads' rule sets identical: their canonical (network, port) IP/CIDR
/// entries and their Domain ports, both sorted and deduplicated.
type RuleSetShape = (Vec<(u16, IpNet)>, Vec<u16>);

/// Builds the plan of one generation. Workloads with identical IP/CIDR match sets share one
/// rule set, so a thousand pods of one deployment cost one set of trie entries.
///
/// Where the same (rule set, port, network) comes from several matches, the first match of the
/// workload's configuration (least specific policy first) labels it.
pub fn compile(
    generation: u32,
    workloads: &[(u64, &MergedConf)],
    opts: &PlanOptions,
) -> KernelPlan {
    let generation = generation & 1;
    let mut plan = KernelPlan {
        generation,
        unmatched_mode: mode_code(opts.unmatched_mode.unwrap_or(Mode::All)),
        ..KernelPlan::default()
    };
    // Entries are collected in a vector and turned into the ordered map once at the end (a
    // bulk build from sorted input), instead of hundreds of thousands of tree inserts.
    let mut rules: Vec<(RuleEntry, u32)> = Vec::new();
    let internal_rs = ruleset::id(generation, ruleset::INTERNAL);
    for net in &opts.internal {
        let id = plan.label(MatchLabel::Internal(*net));
        rules.push((
            RuleEntry {
                ruleset: internal_rs,
                port: 0,
                net: canonical_net(*net),
            },
            id,
        ));
    }
    // Each resolver at its own port: the programs look the resolver rule set up at the
    // datagram's exact port only, so `10.0.0.53:5353` exempts port 5353 and nothing else.
    let resolvers_rs = ruleset::id(generation, ruleset::RESOLVERS);
    for r in &opts.resolvers {
        let id = plan.label(MatchLabel::Resolver(*r));
        rules.push((
            RuleEntry {
                ruleset: resolvers_rs,
                port: r.port(),
                net: canonical_net(IpNet::from(r.ip())),
            },
            id,
        ));
    }

    // Workloads share a rule set when their kernel-relevant content (IP/CIDR entries and
    // Domain ports) is identical. Workloads given the very same `MergedConf` (see
    // `PolicySet::merge_all`) are recognised by address first, without building the shape.
    let mut rulesets: FxHashMap<RuleSetShape, u32> = FxHashMap::default();
    let mut by_conf: FxHashMap<*const MergedConf, u32> = FxHashMap::default();
    // One label (match id) per match, however many rule sets it appears in. A match is known by
    // its policy (the name is one shared allocation per policy) and its index there.
    let mut labels: FxHashMap<(*const u8, usize), u32> = FxHashMap::default();
    let mut next_index = ruleset::FIRST_WORKLOAD;
    for (cgroup_id, conf) in workloads {
        let conf: &MergedConf = conf;
        if let Some(rs) = by_conf.get(&(conf as *const MergedConf)) {
            plan.workloads
                .insert(*cgroup_id, (*rs, mode_code(conf.mode)));
            continue;
        }
        // (port, network, position in the configuration): sorted with the position as the last
        // key, so deduplication keeps the first match that wrote each (port, network). Port
        // before network is `RuleEntry`'s order within a rule set, so the entries of the rule
        // sets, numbered in push order, come out already sorted for the final sort.
        let mut kernel: Vec<(u16, IpNet, u32)> = conf
            .matches
            .iter()
            .enumerate()
            .filter(|(_, m)| matches!(m.kind, MatchKind::Ip | MatchKind::Cidr))
            .filter_map(|(i, m)| {
                m.net
                    .map(|n| (m.port.unwrap_or(0), canonical_net(n), i as u32))
            })
            .collect();
        kernel.sort_unstable();
        kernel.dedup_by(|b, a| (a.0, a.1) == (b.0, b.1));
        let mut domain_ports: Vec<u16> = conf
            .matches
            .iter()
            .filter(|m| m.kind == MatchKind::Domain)
            .map(|m| m.port.unwrap_or(0))
            .collect();
        domain_ports.sort_unstable();
        domain_ports.dedup();
        let shape = (
            kernel.iter().map(|&(p, n, _)| (p, n)).collect::<Vec<_>>(),
            domain_ports,
        );
        let rs = match rulesets.get(&shape) {
            Some(rs) => *rs,
            None => {
                let rs = ruleset::id(generation, next_index);
                next_index += 1;
                rules.reserve(kernel.len());
                for &(port, net, i) in &kernel {
                    let m = &conf.matches[i as usize];
                    let key = (Arc::as_ptr(&m.origin.policy) as *const u8, m.origin.index);
                    let id = match labels.get(&key) {
                        Some(id) => *id,
                        None => {
                            let id = plan.label(MatchLabel::Match {
                                policy: Arc::clone(&m.origin.policy),
                                index: m.origin.index,
                                kind: m.kind,
                                value: Arc::clone(&m.value),
                                port: m.port,
                            });
                            labels.insert(key, id);
                            id
                        }
                    };
                    rules.push((
                        RuleEntry {
                            ruleset: rs,
                            port,
                            net,
                        },
                        id,
                    ));
                }
                for port in &shape.1 {
                    plan.domain_ports.insert((rs, *port));
                }
                rulesets.insert(shape, rs);
                rs
            }
        };
        by_conf.insert(conf as *const MergedConf, rs);
        plan.workloads
            .insert(*cgroup_id, (rs, mode_code(conf.mode)));
    }
    // Stable sort: of equal entries (a repeated --internal-cidr) the first keeps its label.
    // Nearly sorted already (see above), which the standard sort handles in about linear time.
    rules.sort_by_key(|(e, _)| *e);
    rules.dedup_by_key(|(e, _)| *e);
    plan.ranges_v4 = ranges_v4(&rules);
    plan.rules = rules.into_iter().collect();
    plan
}

/// The IPv4 range tables of sorted rule entries: entries of one (rule set, port) are adjacent,
/// IPv4 networks first.
fn ranges_v4(rules: &[(RuleEntry, u32)]) -> RangeImage {
    let mut image = RangeImage::default();
    let v4 = |e: &RuleEntry| match e.net {
        IpNet::V4(n) => Some(n),
        IpNet::V6(_) => None,
    };
    let mut i = 0;
    while i < rules.len() {
        let (rs, port) = (rules[i].0.ruleset, rules[i].0.port);
        let mut j = i;
        while j < rules.len() && rules[j].0.ruleset == rs && rules[j].0.port == port {
            j += 1;
        }
        image.push_table(
            RangeTableKey {
                ruleset: rs,
                port: u32::from(port),
            },
            rules[i..j].iter().filter_map(|(e, _)| v4(e)),
        );
        i = j;
    }
    image
}

impl KernelPlan {
    fn label(&mut self, l: MatchLabel) -> u32 {
        self.match_labels.push(l);
        (self.match_labels.len() - 1) as u32
    }

    /// What this plan puts in the maps (take it before the loader consumes the plan).
    pub fn usage(&self) -> MapUsage {
        let (rules_v4, rules_v6) = self.entry_counts();
        MapUsage {
            rules_v4,
            range_blocks_v4: self.ranges_v4.blocks.len(),
            rules_v6,
            workloads: self.workloads.len(),
        }
    }

    /// Number of IPv4 and IPv6 trie entries.
    pub fn entry_counts(&self) -> (usize, usize) {
        let v4 = self.rules.keys().filter(|e| e.net.addr().is_ipv4()).count();
        (v4, self.rules.len() - v4)
    }
}
