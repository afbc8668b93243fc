//! The kernel's decision (docs/decisions.md: rules 1–5 and the UDP resolver exemption), written once.
//!
//! [`decide`] is generic over everything it reads: the maps ([`Maps`]: configuration,
//! workloads, IPv4 range tables, the IPv6 trie, Domain ports, counters, the denial report),
//! the caller ([`Caller`]: cgroup ids and process) and the destination's family ([`Dest`]).
//! The eBPF programs (`passthrough-ebpf/src/decide.rs`) implement the traits over the real maps
//! and helpers; `passthrough-policy` implements [`Maps`] over a compiled plan, so user-space
//! tests run this very code against the pure decision core (`passthrough-policy`'s
//! `decision.rs`) instead of an emulation of it.
//!
//! Everything is `#[inline(always)]` and free of trait objects: each program gets one
//! monomorphised copy per family, which is what the verifier sees (see [`Dest`] on why the
//! family is a type parameter, and [`crate::range_covers`] on the branch-free search).

use crate::{
    DenyEvent, DomainPortKey, GlobalConfig, MAX_CGROUP_DEPTH, RULE_KEY_FIXED_BITS, RangeBlock,
    RangeTable, RangeTableKey, RuleKeyV6, SniLookup, VerifiedKey, WorkloadEntry, WorkloadKey,
    counter, domain_port, flags, mode, range_covers,
    reason::{Effect, Reason},
    ruleset,
    sni::{Name, SNI_KEY_TABLE_BITS, SniNameValue, SniTable, SniTableKey, Stop, name_allowed},
};

/// The maps (and the event sink) the decision reads and writes.
pub trait Maps {
    /// `CONFIG[0]`; `None` only if the array is missing it (the decision then denies).
    fn config(&self) -> Option<&GlobalConfig>;
    /// `WORKLOADS[key]`.
    fn workload(&self, key: &WorkloadKey) -> Option<&WorkloadEntry>;
    /// `RANGE_INDEX_V4[key]`: where a rule set's IPv4 table at one port lives.
    fn range_table(&self, key: &RangeTableKey) -> Option<&RangeTable>;
    /// `RANGES_V4[index]`.
    fn range_block(&self, index: u32) -> Option<&RangeBlock>;
    /// Whether `RULES_V6` has an entry covering `key` (`key` holds a full address; the trie
    /// finds the longest prefix of the same rule set and port).
    fn rule_v6(&self, key: &RuleKeyV6) -> bool;
    /// `DOMAIN_PORTS[key]`: its [`domain_port`] bits, `None` when there is no entry.
    fn domain_port(&self, key: &DomainPortKey) -> Option<u8>;
    /// Whether `VERIFIED` holds an unexpired entry for `key` (the TLS fast path: an address of
    /// a name the rule set allows at the port, as DNS answered it).
    fn verified(&self, key: &VerifiedKey) -> bool;
    /// `SNI_TABLES[key]`: the rule set's `tls` Domain name table at a port (0: port-less).
    fn sni_table(&self, key: &SniTableKey) -> Option<SniTable>;
    /// `SNI_NAMES`' longest-prefix match for `lookup` (a reversed name with its table id).
    fn sni_name(&self, lookup: &SniLookup) -> Option<SniNameValue>;
    /// Adds one to counter `index` ([`counter`]).
    fn count(&self, index: u32);
    /// Reports a denial; `event.ktime_ns` is left for the implementation to stamp. A full
    /// report channel drops the event and counts [`counter::EVENTS_DROPPED`].
    fn report(&self, event: DenyEvent);
    /// Reports an allowed egress decision to a watcher (called only while `CONFIG` has
    /// [`flags::MONITOR`] and the watcher's lease holds): keeps 1 in 2^`sample_shift` of them
    /// (at random), and drops the event, counting it, when the channel is full. Never waits.
    fn observe(&self, event: DenyEvent, sample_shift: u32);
    /// The monotonic clock in nanoseconds (`bpf_ktime_get_ns`), read only while `CONFIG` has
    /// [`flags::MONITOR`], to check the watcher's lease ([`flags::monitor_live`]).
    fn clock_ns(&self) -> u64;
}

/// A destination address of one family. The decision is generic over it, so each program is
/// monomorphised per family: an enum holding either a 4- or a 16-byte address made LLVM copy
/// the enum's uninitialised tail, which the verifier rejects ("!read_ok").
pub trait Dest: Copy {
    /// The address as 16 bytes, IPv4 as `::ffff:a.b.c.d` (for events).
    fn bytes16(&self) -> [u8; 16];
    /// Rule 1: loopback never leaves the host.
    fn is_loopback(&self) -> bool;
    /// Whether one rule set's entries at one port (0 = the port-less entries) cover the address.
    fn rule_hit<M: Maps>(&self, maps: &M, rs: u32, port_be: u16) -> bool;
}

/// IPv4 address bytes in network order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V4(pub [u8; 4]);

/// IPv6 address bytes in network order (never v4-mapped: those become [`V4`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V6(pub [u8; 16]);

impl Dest for V4 {
    #[inline(always)]
    fn bytes16(&self) -> [u8; 16] {
        let a = self.0;
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
        ]
    }

    #[inline(always)]
    fn is_loopback(&self) -> bool {
        self.0[0] == 127
    }

    #[inline(always)]
    fn rule_hit<M: Maps>(&self, maps: &M, rs: u32, port_be: u16) -> bool {
        // A table exists only for (rule set, port) pairs with IPv4 entries: most lookups end
        // at this one hash probe.
        let key = RangeTableKey {
            ruleset: rs,
            port: u32::from(u16::from_be(port_be)),
        };
        let Some(table) = maps.range_table(&key) else {
            return false;
        };
        range_covers(table, u32::from_be_bytes(self.0), |i| maps.range_block(i))
    }
}

impl Dest for V6 {
    #[inline(always)]
    fn bytes16(&self) -> [u8; 16] {
        self.0
    }

    #[inline(always)]
    fn is_loopback(&self) -> bool {
        let a = &self.0;
        let mut acc = 0u8;
        let mut i = 0;
        while i < 15 {
            acc |= a[i];
            i += 1;
        }
        acc == 0 && a[15] == 1
    }

    #[inline(always)]
    fn rule_hit<M: Maps>(&self, maps: &M, rs: u32, port_be: u16) -> bool {
        maps.rule_v6(&RuleKeyV6 {
            ruleset_be: rs.to_be(),
            port_be,
            addr: self.0,
        })
    }
}

/// Prefix length of a [`RuleKeyV6`] that holds a full address (rule set, port, 128 bits).
pub const RULE_KEY_V6_FULL_BITS: u32 = RULE_KEY_FIXED_BITS + 128;

/// `user_ip6`/`local_ip6` words (network byte order, as the contexts give them) → bytes.
#[inline(always)]
pub fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The IPv4 address inside `::ffff:a.b.c.d`, if `words` (as read from `user_ip6`) is one.
/// Folding these into IPv4 means a dual-stack socket cannot dodge the IPv4 rules (kernel fact:
/// an AF_INET6 socket dialling a v4-mapped address runs connect6, never connect4).
#[inline(always)]
pub fn v4_mapped(words: [u32; 4]) -> Option<V4> {
    if words[0] == 0 && words[1] == 0 && words[2].to_ne_bytes() == [0, 0, 0xff, 0xff] {
        Some(V4(words[3].to_ne_bytes()))
    } else {
        None
    }
}

/// The IPv6 address of `user_ip6` words.
#[inline(always)]
pub fn v6(words: [u32; 4]) -> V6 {
    V6(words_to_bytes(words))
}

/// Transport of the socket being checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A TCP connect.
    Tcp,
    /// An MPTCP subflow the kernel opens for a connection, judged for the connection's owner
    /// (`passthrough-ebpf/src/mptcp.rs`): TCP that is never redirected (the proxy cannot join
    /// an MPTCP connection), so a Domain-only destination is denied (`NoProxy`).
    Subflow,
    /// A UDP connect or send.
    Udp,
    /// A raw or ping socket's packet (its IP protocol, the socket type): no ports, never
    /// redirected; only port-less matches can allow it (`skb.rs`).
    Raw(u8, u8),
}

/// Whose policy applies and who is reported: the calling task (sock_addr programs) or the
/// sending socket (cgroup_skb, where the task is not a helper's business).
pub trait Caller: Copy {
    /// The caller's own cgroup id.
    fn cgroup_id(&self) -> u64;
    /// Its ancestor cgroup id at `level` (1 = the root's child, …); 0 past the leaf.
    fn ancestor_cgroup_id(&self, level: i32) -> u64;
    /// Thread-group id and command of the caller, for the denial event (0 / empty if unknown).
    fn process(&self) -> (u32, [u8; 16]);
    /// Whether the connecting socket would carry data in its SYN (TCP Fast Open), or is an
    /// MPTCP subflow (MPTCP sends without the subflow's `sendmsg`): its first bytes would leave
    /// without the kernel's ClientHello judge seeing them, so the TLS fast path must not take
    /// it. Only a connect knows (false elsewhere).
    fn sends_in_syn(&self) -> bool {
        false
    }
}

/// What [`decide`] concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let the connection/datagram through unchanged.
    Allow,
    /// Fail the syscall.
    Deny,
    /// Rule 4: rewrite the destination to the proxy; `workload` is the cgroup id whose
    /// policy applied (0: none), recorded for the proxy.
    Redirect {
        /// The workload's cgroup id (0: none).
        workload: u64,
    },
    /// Rule 4 on the TLS fast path (path `kernel-sni`): connect directly; the kernel judges
    /// the ClientHello before any byte leaves ([`judge_name`]).
    KernelSni {
        /// The workload's cgroup id (0: none), whose policy judges the name.
        workload: u64,
    },
}

/// A verdict and the reason it was counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// What happens (under `--audit` a denial is [`Verdict::Allow`]).
    pub verdict: Verdict,
    /// Why: the counter it bumped, the reason of its denial event.
    pub reason: Reason,
}

/// Finds the workload of the caller: its own cgroup first (the common case, one lookup), then
/// its ancestors, deepest first wins. This is what lets one attachment at a parent cgroup serve
/// many workloads with different policies.
///
/// Why the *task's* cgroup in sock_addr programs: they cannot read the socket's cgroup id, but
/// they only run for sockets whose cgroup is below an attachment, and the task calling
/// connect()/sendmsg() is the one whose policy should apply. A socket handed over by SCM_RIGHTS
/// to a task outside every workload is judged by `unmatched_mode` (see docs/security.md).
#[inline(always)]
fn find_workload<M: Maps, C: Caller>(
    maps: &M,
    caller: C,
    generation: u32,
) -> Option<(WorkloadEntry, u64)> {
    let own = WorkloadKey {
        generation,
        _pad: 0,
        cgroup_id: caller.cgroup_id(),
    };
    if let Some(entry) = maps.workload(&own) {
        return Some((*entry, own.cgroup_id));
    }
    let mut found = None;
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        let id = caller.ancestor_cgroup_id(level as i32);
        if id == 0 {
            break;
        }
        let key = WorkloadKey {
            generation,
            _pad: 0,
            cgroup_id: id,
        };
        if let Some(entry) = maps.workload(&key) {
            found = Some((*entry, id));
        }
        level += 1;
    }
    found
}

/// The rule set, mode and workload id (0: none) that judge a caller: those of its workload
/// (`found`: the entry and its cgroup id, as [`find_workload`] returns them), else the
/// unmatched rule set and the generation's `unmatched_mode`. Used by [`decide`],
/// [`decide_source_route`] and [`judge_name`].
#[inline(always)]
fn judged_by(
    cfg: &GlobalConfig,
    generation: u32,
    found: Option<(WorkloadEntry, u64)>,
) -> (u32, u32, u64) {
    match found {
        Some((w, id)) => (w.ruleset, w.mode, id),
        None => (
            ruleset::id(generation, u32::MAX >> 1),
            // Not `unmatched_mode[generation]`: a variable index into the copied array is a
            // variable stack offset, which the verifier refuses.
            if generation == 0 {
                cfg.unmatched_mode[0]
            } else {
                cfg.unmatched_mode[1]
            },
            0,
        ),
    }
}

/// Counts `reason` and returns `verdict` for it.
#[inline(always)]
fn decided<M: Maps>(maps: &M, verdict: Verdict, reason: Reason) -> Decision {
    maps.count(counter::decided(reason));
    Decision { verdict, reason }
}

/// Decides one connection or datagram of `caller` to `dst`, counts it, and reports it when
/// denied. `socket_mark` is the socket's `SO_MARK` (0 when unknown).
#[inline(always)]
pub fn decide<M: Maps, C: Caller, D: Dest>(
    maps: &M,
    caller: C,
    dst: D,
    port_be: u16,
    transport: Transport,
    socket_mark: u32,
) -> Decision {
    // Rule 1: loopback never leaves the host.
    if dst.is_loopback() {
        return decided(maps, Verdict::Allow, Reason::Loopback);
    }
    let Some(cfg) = maps.config() else {
        // Unreachable once loaded (array maps always have index 0); fail closed regardless.
        return Decision {
            verdict: Verdict::Deny,
            reason: Reason::NoMatch,
        };
    };
    let mut cfg: GlobalConfig = *cfg;
    // The monitor's flag holds only while the watcher's lease does (an agent that was killed
    // cannot clear the flag; its lease runs out). Read here, on the copy, where the decision
    // has the fewest values live: the clock costs no stack, and only while the flag is set.
    if cfg.flags & flags::MONITOR != 0 && !flags::monitor_live(cfg.monitor_lease, maps.clock_ns()) {
        cfg.flags &= !flags::MONITOR;
    }
    // Read the generation once: every lookup below uses the same one, so a concurrent policy
    // swap is seen either entirely or not at all.
    let generation = cfg.active_generation & 1;
    if dst.rule_hit(maps, ruleset::id(generation, ruleset::INTERNAL), 0) {
        return decided(maps, Verdict::Allow, Reason::Internal);
    }

    // UDP to a configured resolver is DNS: allowed in every mode (docs/decisions.md). The resolver
    // rule set holds each resolver's address at its own port (53 unless configured
    // otherwise), so the exact-port lookup is the whole check.
    if transport == Transport::Udp
        && dst.rule_hit(maps, ruleset::id(generation, ruleset::RESOLVERS), port_be)
    {
        return decided(maps, Verdict::Allow, Reason::Resolver);
    }

    let found = find_workload(maps, caller, generation);
    // Rule 1: the agent's own sockets (proxy upstreams, DNS) carry its SO_MARK. The mark is
    // honoured only for callers that belong to no workload: a workload process with
    // CAP_NET_ADMIN could set the same mark on its own sockets, and must not escape its policy
    // that way (the agent is never a workload; see docs/security.md).
    if found.is_none() && cfg.agent_mark != 0 && socket_mark == cfg.agent_mark {
        return decided(maps, Verdict::Allow, Reason::Agent);
    }
    let (rs, wl_mode, workload) = judged_by(&cfg, generation, found);

    // Rule 2.
    let (allow, reason) = if wl_mode == mode::ALL {
        (true, Reason::ModeAll)
    } else if wl_mode == mode::MATCHED {
        // Rule 3: a port-specific entry, then the port-less ones. Two exact-port tries would
        // not do: the longest prefix at one port must not hide a shorter prefix at "any port".
        if dst.rule_hit(maps, rs, port_be) || dst.rule_hit(maps, rs, 0) {
            (true, Reason::AddressMatch)
        } else {
            let reason = match transport {
                // Domain matches never cover UDP (QUIC clients fall back to TCP).
                Transport::Udp => Reason::UdpNotCovered,
                // No port, no name: nothing for the proxy to judge.
                Transport::Raw(..) => Reason::NoMatch,
                // Rule 4: a Domain match could apply at this port → the proxy decides on
                // SNI/Host, or the kernel does on the TLS fast path.
                Transport::Tcp => {
                    let port = u16::from_be(port_be);
                    match domain_port_bits(maps, rs, u32::from(port)) {
                        Some(bits) if cfg.flags & flags::PROXY != 0 => {
                            if tls_fast_path(maps, &cfg, caller, &dst, rs, port, bits) {
                                maps.count(counter::kernel_sni(Reason::DomainCandidates));
                                return Decision {
                                    verdict: Verdict::KernelSni { workload },
                                    reason: Reason::DomainCandidates,
                                };
                            }
                            return decided(
                                maps,
                                Verdict::Redirect { workload },
                                Reason::DomainCandidates,
                            );
                        }
                        Some(_) => Reason::NoProxy,
                        None => Reason::NoMatch,
                    }
                }
                Transport::Subflow
                    if has_domain_port(maps, rs, u32::from(u16::from_be(port_be))) =>
                {
                    Reason::NoProxy
                }
                Transport::Subflow => Reason::NoMatch,
            };
            (false, reason)
        }
    } else {
        // Mode `None`, and (fail closed) any mode code that is not a mode, like the 0 of a
        // never-written entry.
        (false, Reason::ModeNone)
    };

    // Rules 2 and 3 allow; rule 5 denies. One tail for both, so the one event is built in one
    // place (a program inlines this function several times; one event each keeps the stack
    // inside the BPF limit): a denial is always reported, an allowed egress decision only while
    // someone watches ([`flags::MONITOR`]: one bit of the configuration already read, nothing
    // else, when nobody does). The audit flag only moves a denial's counter to the reason's
    // audit slot (arithmetic, not a branch) and picks the verdict at the end.
    let audit = !allow && cfg.flags & flags::AUDIT != 0;
    maps.count(counter::decided(reason) + u32::from(audit) * counter::AUDIT_OFFSET);
    if !allow || cfg.flags & flags::MONITOR != 0 {
        let ev = event(caller, &dst, port_be, transport, reason, workload, audit);
        if allow {
            maps.observe(ev, flags::monitor_shift(cfg.flags));
        } else {
            maps.report(ev);
        }
    }
    Decision {
        verdict: if allow || audit {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        reason,
    }
}

/// Rule 5 for `reason`. One path for both outcomes: the audit flag only moves the counter to
/// the reason's audit slot (arithmetic, not a branch) and picks the verdict at the end, so the
/// event code is not duplicated per outcome.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn deny<M: Maps, C: Caller, D: Dest>(
    maps: &M,
    cfg: &GlobalConfig,
    caller: C,
    dst: &D,
    port_be: u16,
    transport: Transport,
    reason: Reason,
    workload: u64,
) -> Decision {
    let audit = cfg.flags & flags::AUDIT != 0;
    maps.count(counter::decided(reason) + u32::from(audit) * counter::AUDIT_OFFSET);
    report_denial(
        maps, caller, dst, port_be, transport, reason, workload, audit,
    );
    Decision {
        verdict: if audit { Verdict::Allow } else { Verdict::Deny },
        reason,
    }
}

/// A source route (an IPv6 routing header, an IPv4 LSRR/SSRR option) for `caller`: being set
/// on a socket (`dst` = the route's first hop, or unspecified) or carried by a packet (`dst` =
/// the packet's destination on the wire). `protocol`/`socket_type` are for the event.
///
/// Allowed only in mode `All` ([`Reason::ModeAll`]), else [`Reason::SourceRoute`]. A routed
/// packet visits every address of its route, and each hop may forward it on: the address that
/// connect()/sendmsg() judged is only the last one, and judging every hop would still let a hop
/// that is a router (any allowed address can be one) forward it further. Loopback, internal
/// ranges and the agent's mark do not apply: the node forwards a source-routed packet sent to
/// one of its own addresses.
#[inline(always)]
pub fn decide_source_route<M: Maps, C: Caller, D: Dest>(
    maps: &M,
    caller: C,
    dst: D,
    protocol: u8,
    socket_type: u8,
) -> Decision {
    let Some(cfg) = maps.config() else {
        return Decision {
            verdict: Verdict::Deny,
            reason: Reason::SourceRoute,
        };
    };
    let cfg: GlobalConfig = *cfg;
    let generation = cfg.active_generation & 1;
    let (_, wl_mode, workload) =
        judged_by(&cfg, generation, find_workload(maps, caller, generation));
    if wl_mode == mode::ALL {
        return decided(maps, Verdict::Allow, Reason::ModeAll);
    }
    deny(
        maps,
        &cfg,
        caller,
        &dst,
        0,
        Transport::Raw(protocol, socket_type),
        Reason::SourceRoute,
        workload,
    )
}

/// A kernel worker connecting an MPTCP subflow of a connection whose owner was never recorded
/// (`passthrough-ebpf/src/mptcp.rs`): nobody's policy can be applied, and the unmatched mode
/// must not be, so it is denied ([`Reason::SubflowOwnerUnknown`]; `--audit` reports it).
#[inline(always)]
pub fn decide_unknown_owner<M: Maps, C: Caller, D: Dest>(
    maps: &M,
    caller: C,
    dst: D,
    port_be: u16,
) -> Decision {
    let Some(cfg) = maps.config() else {
        return Decision {
            verdict: Verdict::Deny,
            reason: Reason::SubflowOwnerUnknown,
        };
    };
    let cfg: GlobalConfig = *cfg;
    deny(
        maps,
        &cfg,
        caller,
        &dst,
        port_be,
        Transport::Subflow,
        Reason::SubflowOwnerUnknown,
        0,
    )
}

/// One event per denial for the agent's log.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn report_denial<M: Maps, C: Caller, D: Dest>(
    maps: &M,
    caller: C,
    dst: &D,
    port_be: u16,
    transport: Transport,
    reason: Reason,
    workload: u64,
    audit: bool,
) {
    maps.report(event(
        caller, dst, port_be, transport, reason, workload, audit,
    ));
}

/// The event of one decision (`ktime_ns` left for [`Maps`] to stamp).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn event<C: Caller, D: Dest>(
    caller: C,
    dst: &D,
    port_be: u16,
    transport: Transport,
    reason: Reason,
    workload: u64,
    audit: bool,
) -> DenyEvent {
    let (pid, comm) = caller.process();
    DenyEvent {
        ktime_ns: 0,
        workload,
        cgroup: caller.cgroup_id(),
        addr: dst.bytes16(),
        port: u16::from_be(port_be),
        protocol: match transport {
            Transport::Tcp | Transport::Subflow => 6,
            Transport::Udp => 17,
            Transport::Raw(p, _) => p,
        },
        audit: audit as u8,
        reason: reason as u32,
        pid,
        socket_type: match transport {
            Transport::Raw(_, ty) => ty as u32,
            _ => 0,
        },
        comm,
    }
}

/// Whether the rule set has a Domain match at `port` or a port-less one. Two lookups in turn:
/// not [`domain_port_bits`]`.is_some()`, which LLVM turns into an OR of the two map-value
/// pointers, an operation the verifier refuses (`pointer |= pointer prohibited`).
#[inline(always)]
fn has_domain_port<M: Maps>(maps: &M, rs: u32, port: u32) -> bool {
    maps.domain_port(&DomainPortKey { ruleset: rs, port })
        .is_some()
        || maps
            .domain_port(&DomainPortKey {
                ruleset: rs,
                port: 0,
            })
            .is_some()
}

/// The [`domain_port`] bits of the rule set's Domain matches at `port` and its port-less ones
/// together, `None` when it has neither.
#[inline(always)]
fn domain_port_bits<M: Maps>(maps: &M, rs: u32, port: u32) -> Option<u8> {
    let at_port = maps.domain_port(&DomainPortKey { ruleset: rs, port });
    let portless = maps.domain_port(&DomainPortKey {
        ruleset: rs,
        port: 0,
    });
    match (at_port, portless) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) | b.unwrap_or(0) | domain_port::ANY),
    }
}

/// Whether a rule-4 TCP connection takes the TLS fast path (docs/design.md, "The TLS fast
/// path"): the fast path is on (and `--audit` off: would-be denials are the proxy's to
/// report), every Domain match that could apply at the port is `tls` (so the first bytes
/// decide, once, on the SNI — `passthrough_policy::decision::tls_fast_path_candidate` says the
/// same of the policy), the destination is a verified address of a name the rule set allows
/// there, and the socket sends nothing in its SYN.
#[inline(always)]
fn tls_fast_path<M: Maps, C: Caller, D: Dest>(
    maps: &M,
    cfg: &GlobalConfig,
    caller: C,
    dst: &D,
    rs: u32,
    port: u16,
    bits: u8,
) -> bool {
    cfg.flags & (flags::TLS_FAST_PATH | flags::AUDIT) == flags::TLS_FAST_PATH
        && bits & domain_port::NON_TLS == 0
        && maps.verified(&VerifiedKey {
            ruleset: rs,
            port,
            _pad: 0,
            addr: dst.bytes16(),
        })
        && !caller.sends_in_syn()
}

/// The TLS fast path's verdict on a connection's ClientHello name (path `kernel-sni`), under
/// the policy in force when the hello is sent (as the proxy judges with the policy current
/// when the hello arrives): [`Reason::DomainMatch`] or [`Reason::ModeAll`] let its bytes go,
/// any other reason refuses the connection. `workload` is the cgroup id recorded at connect
/// (0: none, the unmatched rule set), `port` the destination port. `lookup.key.name` holds the
/// name reversed, as [`crate::sni::name`] leaves it; its table id and prefix length are
/// written here.
#[inline(always)]
pub fn judge_name<M: Maps>(
    maps: &M,
    workload: u64,
    port: u16,
    name: Name,
    lookup: &mut SniLookup,
) -> Reason {
    let Some(cfg) = maps.config() else {
        return Reason::NoDomainMatch;
    };
    let generation = cfg.active_generation & 1;
    let entry = if workload == 0 {
        None
    } else {
        maps.workload(&WorkloadKey {
            generation,
            _pad: 0,
            cgroup_id: workload,
        })
    };
    let (rs, wl_mode, _) = judged_by(cfg, generation, entry.map(|e| (*e, workload)));
    if wl_mode == mode::ALL {
        return Reason::ModeAll;
    }
    if wl_mode != mode::MATCHED {
        return Reason::ModeNone;
    }
    let (len, labels) = match name {
        Name::Absent => return Reason::NoSni,
        Name::IpLiteral => return Reason::IpLiteral,
        Name::Bad => return Reason::BadName,
        Name::Valid { len, labels } => (len, labels),
    };
    // The port's table holds its own patterns and the port-less ones; without one, the
    // port-less table alone.
    let table = match maps.sni_table(&SniTableKey {
        ruleset: rs,
        port: u32::from(port),
    }) {
        Some(t) => Some(t),
        None => maps.sni_table(&SniTableKey {
            ruleset: rs,
            port: 0,
        }),
    };
    let Some(table) = table else {
        return Reason::NoDomainMatch;
    };
    lookup.key.table_be = table.id.to_be();
    // The name and the terminating 0 after it: an exact entry is the whole name, a wildcard's
    // suffix ends at a `.`.
    lookup.prefix_len = SNI_KEY_TABLE_BITS + (len + 1) * 8;
    match maps.sni_name(lookup) {
        Some(value) if name_allowed(labels, &value) => Reason::DomainMatch,
        _ => Reason::NoDomainMatch,
    }
}

/// The reason of a ClientHello judge that stopped before a name.
#[inline(always)]
pub fn stop_reason(stop: Stop) -> Reason {
    match stop {
        Stop::NotTls => Reason::UnknownProtocol,
        Stop::Invalid(_) => Reason::BadClientHello,
        // More bytes than the judge may wait for (the proxy's peek size limit reads the same).
        Stop::TooLarge | Stop::NeedMore(_) => Reason::TooLarge,
    }
}

/// Counts a TLS fast path verdict ([`counter::kernel_sni`]); true when its bytes may go.
#[inline(always)]
pub fn kernel_sni_decided<M: Maps>(maps: &M, reason: Reason) -> bool {
    maps.count(counter::kernel_sni(reason));
    matches!(reason.effect(), Effect::Allow)
}
