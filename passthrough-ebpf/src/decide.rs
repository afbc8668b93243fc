//! The in-kernel part of SPEC §3: rules 1 (non-egress), 2 (mode), 3 (IP/CIDR match), 5 (deny),
//! and for UDP the resolver exception. Pure lookups; the caller turns the verdict into a return
//! code.

use aya_ebpf::{
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    maps::lpm_trie::Key,
};
use passthrough_common::{
    GlobalConfig, MAX_CGROUP_DEPTH, RULE_KEY_FIXED_BITS, RuleKeyV4, RuleKeyV6, WorkloadEntry,
    WorkloadKey, counter, flags, mode, ruleset,
};

use crate::maps::{CONFIG, RULES_V4, RULES_V6, WORKLOADS, count};

/// A destination as the programs see it: IPv4-mapped IPv6 has already been folded into `V4`.
#[derive(Clone, Copy)]
pub enum Dest {
    /// IPv4 address bytes in network order.
    V4([u8; 4]),
    /// IPv6 address bytes in network order.
    V6([u8; 16]),
}

/// Transport of the socket being checked.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Return codes of `cgroup/*` sock_addr programs.
pub const PROCEED: i32 = 1;
/// Any other value makes the syscall fail with `EPERM` (we keep the kernel's default errno).
pub const REJECT: i32 = 0;

/// Folds `::ffff:a.b.c.d` into IPv4, so a dual-stack socket cannot dodge the IPv4 rules
/// (kernel fact: an AF_INET6 socket dialling a v4-mapped address runs connect6, never connect4).
#[inline(always)]
pub fn dest_from_ip6(words: [u32; 4]) -> Dest {
    let w2 = words[2].to_ne_bytes();
    if words[0] == 0 && words[1] == 0 && w2 == [0, 0, 0xff, 0xff] {
        return Dest::V4(words[3].to_ne_bytes());
    }
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    Dest::V6(addr)
}

#[inline(always)]
fn is_loopback(dst: &Dest) -> bool {
    match dst {
        Dest::V4(a) => a[0] == 127,
        Dest::V6(a) => {
            let mut i = 0;
            while i < 15 {
                if a[i] != 0 {
                    return false;
                }
                i += 1;
            }
            a[15] == 1
        }
    }
}

/// Longest-prefix lookup of `dst` in one rule set at one port (0 = the port-less entries).
#[inline(always)]
fn rule_hit(dst: &Dest, rs: u32, port_be: u16) -> bool {
    match dst {
        Dest::V4(addr) => {
            let key = Key::new(
                RULE_KEY_FIXED_BITS + 32,
                RuleKeyV4 { ruleset_be: rs.to_be(), port_be, addr: *addr },
            );
            RULES_V4.get(&key).is_some()
        }
        Dest::V6(addr) => {
            let key = Key::new(
                RULE_KEY_FIXED_BITS + 128,
                RuleKeyV6 { ruleset_be: rs.to_be(), port_be, addr: *addr },
            );
            RULES_V6.get(&key).is_some()
        }
    }
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
fn find_workload(generation: u32) -> Option<WorkloadEntry> {
    let own = WorkloadKey { generation, _pad: 0, cgroup_id: unsafe { bpf_get_current_cgroup_id() } };
    if let Some(entry) = unsafe { WORKLOADS.get(&own) } {
        return Some(*entry);
    }
    let mut found = None;
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        let key = WorkloadKey { generation, _pad: 0, cgroup_id: id };
        if let Some(entry) = unsafe { WORKLOADS.get(&key) } {
            found = Some(*entry);
        }
        level += 1;
    }
    found
}

/// Decides one connection or datagram. Returns [`PROCEED`] or [`REJECT`] and bumps a counter.
#[inline(always)]
pub fn decide(dst: Dest, port_be: u16, transport: Transport, socket_mark: u32) -> i32 {
    // Rule 1: loopback never leaves the host.
    if is_loopback(&dst) {
        count(counter::ALLOW_LOOPBACK);
        return PROCEED;
    }
    let Some(cfg) = CONFIG.get(0) else {
        // Unreachable once loaded (array maps always have index 0); fail closed regardless.
        return REJECT;
    };
    let cfg: GlobalConfig = *cfg;
    // Rule 1: the agent's own sockets (proxy upstreams, DNS) carry its SO_MARK.
    if cfg.agent_mark != 0 && socket_mark == cfg.agent_mark {
        count(counter::ALLOW_AGENT);
        return PROCEED;
    }
    // Read the generation once: every lookup below uses the same one, so a concurrent policy
    // swap is seen either entirely or not at all.
    let generation = cfg.active_generation & 1;
    if rule_hit(&dst, ruleset::id(generation, ruleset::INTERNAL), 0) {
        count(counter::ALLOW_INTERNAL);
        return PROCEED;
    }

    let (rs, wl_mode) = match find_workload(generation) {
        Some(w) => (w.ruleset, w.mode),
        None => (
            ruleset::id(generation, u32::MAX >> 1),
            if generation == 0 { cfg.unmatched_mode[0] } else { cfg.unmatched_mode[1] },
        ),
    };

    // Rule 2.
    if wl_mode == mode::ALL {
        count(counter::ALLOW_MODE_ALL);
        return PROCEED;
    }
    let reason = if wl_mode == mode::MATCHED {
        // Rule 3: a port-specific entry, then the port-less ones. Two exact-port tries would
        // not do: the longest prefix at one port must not hide a shorter prefix at "any port".
        if rule_hit(&dst, rs, port_be) || rule_hit(&dst, rs, 0) {
            count(counter::ALLOW_MATCH);
            return PROCEED;
        }
        if transport == Transport::Udp
            && port_be == 53u16.to_be()
            && rule_hit(&dst, ruleset::id(generation, ruleset::RESOLVERS), port_be)
        {
            count(counter::ALLOW_DNS);
            return PROCEED;
        }
        counter::DENY_NO_MATCH
    } else {
        counter::DENY_MODE_NONE
    };

    // Rule 5.
    count(reason);
    if cfg.flags & flags::AUDIT != 0 {
        count(counter::AUDIT_WOULD_DENY);
        return PROCEED;
    }
    REJECT
}
