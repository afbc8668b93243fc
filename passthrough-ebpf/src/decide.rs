//! The in-kernel rules of docs/decisions.md: rules 1 (non-egress), 2 (mode), 3 (IP/CIDR match), 5 (deny),
//! and for UDP the resolver exception. Pure lookups; the caller turns the verdict into a return
//! code.

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_sk_ancestor_cgroup_id, bpf_sk_cgroup_id,
    },
    maps::lpm_trie::Key,
};
use passthrough_common::{
    DenyEvent, DomainPortKey, GlobalConfig, MAX_CGROUP_DEPTH, RULE_KEY_FIXED_BITS, RangeTableKey,
    RuleKeyV6, WorkloadEntry, WorkloadKey, counter, flags, mode, ruleset,
};

use crate::{
    log::{bpf_debug, bpf_error, bpf_warn},
    maps::{
        CONFIG, DENY_EVENTS, DOMAIN_PORTS, RANGE_INDEX_V4, RANGES_V4, RULES_V6, WORKLOADS, count,
    },
};

/// A destination address of one family. The decision is generic over it, so each program is
/// monomorphised per family: an enum holding either a 4- or a 16-byte address made LLVM copy
/// the enum's uninitialised tail, which the verifier rejects ("!read_ok").
pub trait Dest: Copy {
    /// The address as 16 bytes, IPv4 as `::ffff:a.b.c.d` (for events).
    fn bytes16(&self) -> [u8; 16];
    /// Rule 1: loopback never leaves the host.
    fn is_loopback(&self) -> bool;
    /// Whether one rule set's entries at one port (0 = the port-less entries) cover the address.
    fn rule_hit(&self, rs: u32, port_be: u16) -> bool;
}

/// IPv4 address bytes in network order.
#[derive(Clone, Copy)]
pub struct V4(pub [u8; 4]);

/// IPv6 address bytes in network order (never v4-mapped: those become [`V4`]).
#[derive(Clone, Copy)]
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
    fn rule_hit(&self, rs: u32, port_be: u16) -> bool {
        // A table exists only for (rule set, port) pairs with IPv4 entries: most lookups end
        // at this one hash probe.
        let key = RangeTableKey {
            ruleset: rs,
            port: u32::from(u16::from_be(port_be)),
        };
        let Some(table) = (unsafe { RANGE_INDEX_V4.get(&key) }) else {
            return false;
        };
        passthrough_common::range_covers(table, u32::from_be_bytes(self.0), |i| RANGES_V4.get(i))
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
    fn rule_hit(&self, rs: u32, port_be: u16) -> bool {
        let key = Key::new(
            RULE_KEY_FIXED_BITS + 128,
            RuleKeyV6 {
                ruleset_be: rs.to_be(),
                port_be,
                addr: self.0,
            },
        );
        RULES_V6.get(&key).is_some()
    }
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

/// The IPv6 address bytes of `user_ip6` words.
#[inline(always)]
pub fn v6(words: [u32; 4]) -> V6 {
    V6(crate::addr::words_to_bytes(words))
}

/// Transport of the socket being checked.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
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
}

/// The task calling `connect()`/`sendmsg()`.
#[derive(Clone, Copy)]
pub struct Task;

impl Caller for Task {
    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        unsafe { bpf_get_current_cgroup_id() }
    }
    #[inline(always)]
    fn ancestor_cgroup_id(&self, level: i32) -> u64 {
        unsafe { bpf_get_current_ancestor_cgroup_id(level) }
    }
    #[inline(always)]
    fn process(&self) -> (u32, [u8; 16]) {
        (
            (bpf_get_current_pid_tgid() >> 32) as u32,
            bpf_get_current_comm().unwrap_or([0; 16]),
        )
    }
}

/// The socket a packet leaves from (a full socket from `bpf_sk_fullsock`): its cgroup is the
/// one of the task that created it.
#[derive(Clone, Copy)]
pub struct Socket(pub *mut bpf_sock);

impl Caller for Socket {
    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        unsafe { bpf_sk_cgroup_id(self.0 as *mut _) }
    }
    #[inline(always)]
    fn ancestor_cgroup_id(&self, level: i32) -> u64 {
        unsafe { bpf_sk_ancestor_cgroup_id(self.0 as *mut _, level) }
    }
    #[inline(always)]
    fn process(&self) -> (u32, [u8; 16]) {
        // Raw and ping sends run in the sender's context, but the pid/comm helpers are not
        // offered to cgroup_skb programs: the event names the cgroup only.
        (0, [0; 16])
    }
}

/// Return codes of `cgroup/*` sock_addr programs.
pub const PROCEED: i32 = 1;
/// Any other value makes the syscall fail with `EPERM` (we keep the kernel's default errno).
pub const REJECT: i32 = 0;

/// What [`decide`] concluded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the connection/datagram through unchanged.
    Allow,
    /// Fail the syscall.
    Deny,
    /// Rule 4: rewrite the destination to the proxy; `workload` is the cgroup id whose
    /// policy applied (0: none), recorded for the proxy.
    Redirect { workload: u64 },
}

/// Finds the workload of the calling task: its own cgroup first (the common case, one lookup),
/// then its ancestors, deepest first wins. This is what lets one attachment at a parent cgroup
/// serve many workloads with different policies.
///
/// Why the *task's* cgroup: sock_addr programs cannot read the socket's cgroup id, but they only
/// run for sockets whose cgroup is below an attachment, and the task calling connect()/sendmsg()
/// is the one whose policy should apply. A socket handed over by SCM_RIGHTS to a task outside
/// every workload is judged by `unmatched_mode` (see docs/security.md).
#[inline(always)]
fn find_workload<C: Caller>(caller: C, generation: u32) -> Option<(WorkloadEntry, u64)> {
    let own = WorkloadKey {
        generation,
        _pad: 0,
        cgroup_id: caller.cgroup_id(),
    };
    if let Some(entry) = unsafe { WORKLOADS.get(&own) } {
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
        if let Some(entry) = unsafe { WORKLOADS.get(&key) } {
            found = Some((*entry, id));
        }
        level += 1;
    }
    found
}

/// Decides one connection or datagram of the calling task and bumps a counter.
#[inline(always)]
pub fn decide<D: Dest>(dst: D, port_be: u16, transport: Transport, socket_mark: u32) -> Verdict {
    decide_for(Task, dst, port_be, transport, socket_mark)
}

/// [`decide`] for `caller`'s policy.
#[inline(always)]
pub fn decide_for<C: Caller, D: Dest>(
    caller: C,
    dst: D,
    port_be: u16,
    transport: Transport,
    socket_mark: u32,
) -> Verdict {
    // Rule 1: loopback never leaves the host.
    if dst.is_loopback() {
        count(counter::ALLOW_LOOPBACK);
        return Verdict::Allow;
    }
    let Some(cfg) = CONFIG.get(0) else {
        // Unreachable once loaded (array maps always have index 0); fail closed regardless.
        bpf_error!("CONFIG[0] missing: denied");
        return Verdict::Deny;
    };
    let cfg: GlobalConfig = *cfg;
    // Read the generation once: every lookup below uses the same one, so a concurrent policy
    // swap is seen either entirely or not at all.
    let generation = cfg.active_generation & 1;
    if dst.rule_hit(ruleset::id(generation, ruleset::INTERNAL), 0) {
        count(counter::ALLOW_INTERNAL);
        return Verdict::Allow;
    }

    // UDP to port 53 of a configured resolver is DNS: allowed in every mode (docs/decisions.md).
    if transport == Transport::Udp
        && port_be == 53u16.to_be()
        && dst.rule_hit(ruleset::id(generation, ruleset::RESOLVERS), port_be)
    {
        count(counter::ALLOW_DNS);
        return Verdict::Allow;
    }

    let found = find_workload(caller, generation);
    // Rule 1: the agent's own sockets (proxy upstreams, DNS) carry its SO_MARK. The mark is
    // honoured only for callers that belong to no workload: a workload process with
    // CAP_NET_ADMIN could set the same mark on its own sockets, and must not escape its policy
    // that way (the agent is never a workload; see docs/security.md).
    if found.is_none() && cfg.agent_mark != 0 && socket_mark == cfg.agent_mark {
        count(counter::ALLOW_AGENT);
        return Verdict::Allow;
    }
    let (rs, wl_mode, workload) = match found {
        Some((w, id)) => (w.ruleset, w.mode, id),
        None => (
            ruleset::id(generation, u32::MAX >> 1),
            if generation == 0 {
                cfg.unmatched_mode[0]
            } else {
                cfg.unmatched_mode[1]
            },
            0,
        ),
    };

    // Rule 2.
    if wl_mode == mode::ALL {
        count(counter::ALLOW_MODE_ALL);
        return Verdict::Allow;
    }
    let reason = if wl_mode == mode::MATCHED {
        // Rule 3: a port-specific entry, then the port-less ones. Two exact-port tries would
        // not do: the longest prefix at one port must not hide a shorter prefix at "any port".
        if dst.rule_hit(rs, port_be) || dst.rule_hit(rs, 0) {
            count(counter::ALLOW_MATCH);
            return Verdict::Allow;
        }
        // Rule 4: a Domain match could apply at this port → the proxy decides on SNI/Host.
        // Domain matches never cover UDP (QUIC clients fall back to TCP).
        let port = u16::from_be(port_be) as u32;
        if matches!(transport, Transport::Raw(..)) {
            // No port, no name: nothing for the proxy to judge.
            counter::DENY_NO_MATCH
        } else if has_domain_port(rs, port) {
            if transport == Transport::Tcp && cfg.flags & flags::PROXY != 0 {
                count(counter::REDIRECT_PROXY);
                return Verdict::Redirect { workload };
            }
            counter::DENY_NO_PROXY
        } else {
            counter::DENY_NO_MATCH
        }
    } else {
        counter::DENY_MODE_NONE
    };

    // Rule 5.
    count(reason);
    let audit = cfg.flags & flags::AUDIT != 0;
    report_denial(caller, &dst, port_be, transport, reason, workload, audit);
    if audit {
        count(counter::AUDIT_WOULD_DENY);
        return Verdict::Allow;
    }
    Verdict::Deny
}

/// One event per denial for the agent's log. Reserve-in-place (no copy through the stack);
/// a full ring buffer drops the event and counts it instead of blocking or allocating.
#[inline(always)]
fn report_denial<C: Caller, D: Dest>(
    caller: C,
    dst: &D,
    port_be: u16,
    transport: Transport,
    reason: u32,
    workload: u64,
    audit: bool,
) {
    let (pid, comm) = caller.process();
    let protocol = match transport {
        Transport::Tcp => 6,
        Transport::Udp => 17,
        Transport::Raw(p, _) => p,
    };
    bpf_debug!(
        "denied: reason {} workload {} pid {} dst {:i} port {} protocol {}",
        reason,
        workload,
        pid,
        dst.bytes16(),
        u16::from_be(port_be),
        protocol
    );
    let Some(mut slot) = DENY_EVENTS.reserve::<DenyEvent>(0) else {
        count(counter::EVENTS_DROPPED);
        bpf_warn!("deny event dropped: ring buffer full (reason {})", reason);
        return;
    };
    let ev = DenyEvent {
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        workload,
        cgroup: caller.cgroup_id(),
        addr: dst.bytes16(),
        port: u16::from_be(port_be),
        protocol,
        audit: audit as u8,
        reason,
        pid,
        socket_type: match transport {
            Transport::Raw(_, ty) => ty as u32,
            _ => 0,
        },
        comm,
    };
    slot.write(ev);
    slot.submit(0);
}

#[inline(always)]
fn has_domain_port(rs: u32, port: u32) -> bool {
    unsafe {
        DOMAIN_PORTS
            .get(&DomainPortKey { ruleset: rs, port })
            .is_some()
            || DOMAIN_PORTS
                .get(&DomainPortKey {
                    ruleset: rs,
                    port: 0,
                })
                .is_some()
    }
}
