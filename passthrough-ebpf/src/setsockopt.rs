//! `cgroup/setsockopt`: refuses the socket options that source-route a workload's packets.
//!
//! Why this exists: connect4/6 and sendmsg4/6 judge the address given to `connect()` /
//! `sendmsg()`. A *sticky* source route changes where the packets of that socket go without
//! changing that address: the kernel sends them to the route's first hop, which forwards them
//! along the route, and the judged address is only the last stop.
//!
//! - `IPV6_RTHDR` needs no privilege at all. A segment routing header (type 4) listing a
//!   denied host, set on a UDP or TCP socket that then sends to, or connects to, an allowed
//!   address, `[::1]`, or a Domain-only address, puts the denied host as the IPv6
//!   destination on the wire (`fl6_update_dst`). Set on an established, allowed connection it
//!   diverts that connection's data too.
//! - `IPV6_2292PKTOPTIONS` (the RFC 2292 interface) sets the same sticky options from a
//!   control-message buffer (`ip6_datagram_send_ctl`); it is refused as a whole, whatever it
//!   carries, so its parsing need not be repeated here.
//! - `IP_OPTIONS` with a loose or strict source route (LSRR, SSRR) does the same for IPv4
//!   (`ip_route_connect` routes to the option's first hop). The kernel asks for `CAP_NET_RAW`,
//!   which container runtimes grant by default. It applies to AF_INET6 sockets too (their
//!   v4-mapped traffic), and the hook sees it there under the same level and name.
//!
//! What it does: for those three, outside mode `All` (the caller's workload, or the unmatched
//! mode), `setsockopt()` fails with `EPERM` and a `source_route` denial is reported with
//! the route's first hop when it can be read. Everything else returns at once after one
//! compare of the level; options that do not route (hop-by-hop and destination options, record
//! route, timestamps, `IP_PKTINFO`, `IPV6_NEXTHOP`, `SO_BINDTODEVICE`) are left to the kernel:
//! the destination they send to is still the judged one (docs/security.md).
//!
//! Not covered here: per-datagram control messages (`IP_RETOPTS`; on kernels with
//! `CONFIG_IPV6_MIP6`, a type 2 `IPV6_RTHDR`), which no setsockopt hook sees; `setsockopt`
//! through the 32-bit system call entry, for which the kernel runs no setsockopt program
//! (`do_sock_setsockopt`: `if (!compat)`); and options set before the programs were attached.
//! The egress backstop (`skb.rs`) drops those packets.
//! The caller decides, as for connect(): a socket passed to a task of another workload is
//! judged by that task.

use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};

use crate::decide::{Task, V4, V6, Verdict, decide_source_route};

const SOL_IP: i32 = 0;
const IP_OPTIONS: i32 = 4;
const SOL_IPV6: i32 = 41;
const IPV6_2292PKTOPTIONS: i32 = 6;
const IPV6_RTHDR: i32 = 57;

/// IPv4 option types (RFC 791): end of list, no-op, loose and strict source route.
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
const IPOPT_LSRR: u8 = 0x83;
const IPOPT_SSRR: u8 = 0x89;
/// The most option bytes an IPv4 header holds (and `ip_options_get` accepts).
const IP_OPTIONS_MAX: usize = 40;

/// Routing header type 4: segment routing (RFC 8754); the others list addresses from byte 8.
const IPV6_SRCRT_TYPE_4: u8 = 4;

/// Return codes of cgroup sockopt programs.
const PROCEED: i32 = 1;
const REJECT: i32 = 0;

/// What a refused option routes through first, for the denial event.
enum FirstHop {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[cgroup_sockopt(setsockopt)]
pub fn passthrough_setsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // Whole-field loads (the verifier refuses narrowed context accesses).
    let (level, optname, optlen) = unsafe {
        (
            core::ptr::read_volatile(&(*so).level),
            core::ptr::read_volatile(&(*so).optname),
            core::ptr::read_volatile(&(*so).optlen),
        )
    };
    // The common case first: every level but IP and IPv6 (SOL_SOCKET, TCP, ...).
    if level != SOL_IPV6 && level != SOL_IP {
        return PROCEED;
    }
    // An empty value removes a sticky option: always allowed.
    if optlen <= 0 {
        return PROCEED;
    }
    // The kernel's copy of the value (at most a page of it).
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*so).__bindgen_anon_2.optval) as usize,
            core::ptr::read_volatile(&(*so).__bindgen_anon_3.optval_end) as usize,
        )
    };
    let hop = if level == SOL_IPV6 && optname == IPV6_RTHDR {
        rthdr_first_hop(start, end)
    } else if level == SOL_IPV6 && optname == IPV6_2292PKTOPTIONS {
        FirstHop::V6([0; 16])
    } else if level == SOL_IP && optname == IP_OPTIONS {
        match ip_source_route(start, end, optlen as usize) {
            Some(hop) => FirstHop::V4(hop),
            None => return PROCEED,
        }
    } else {
        return PROCEED;
    };
    // For the event: the socket's protocol; socket type 0 marks a refused syscall (as for
    // connect4/6), not a dropped packet.
    let protocol = unsafe {
        let sk = core::ptr::read_volatile(&(*so).__bindgen_anon_1.sk);
        if sk.is_null() {
            0
        } else {
            core::ptr::read_volatile(&(*sk).protocol)
        }
    };
    let verdict = match hop {
        FirstHop::V4(a) => decide_source_route(Task, V4(a), protocol as u8, 0),
        FirstHop::V6(a) => decide_source_route(Task, V6(a), protocol as u8, 0),
    };
    if verdict == Verdict::Allow {
        PROCEED
    } else {
        REJECT
    }
}

/// The first address a routing header sends to (unspecified when it cannot be read): for
/// segment routing the segment at `segments_left`, for the older types the first address.
#[inline(always)]
fn rthdr_first_hop(start: usize, end: usize) -> FirstHop {
    let mut out = [0u8; 16];
    if start + 8 > end {
        return FirstHop::V6(out);
    }
    // SAFETY: bounds checked against the end of the value just above.
    let (ty, left) = unsafe { (*((start + 2) as *const u8), *((start + 3) as *const u8)) };
    let index = if ty == IPV6_SRCRT_TYPE_4 {
        usize::from(left)
    } else {
        0
    };
    let at = start + 8 + (index & 0x7f) * 16;
    if at + 16 > end {
        return FirstHop::V6(out);
    }
    let mut i = 0;
    while i < 16 {
        // SAFETY: `at + 16 <= end` checked above.
        out[i] = unsafe { *((at + i) as *const u8) };
        i += 1;
    }
    FirstHop::V6(out)
}

/// The first hop of an LSRR/SSRR option among `optlen` bytes of IPv4 options, or `None` when
/// they hold no source route. A route whose address cannot be read counts as one (0.0.0.0).
#[inline(always)]
fn ip_source_route(start: usize, end: usize, optlen: usize) -> Option<[u8; 4]> {
    let len = if optlen < IP_OPTIONS_MAX {
        optlen
    } else {
        IP_OPTIONS_MAX
    };
    let mut i = 0usize;
    // Each option consumes at least one byte of at most 40. No step counter: a precise one
    // makes every iteration a new verifier state (see skb.rs).
    loop {
        if i >= len || start + i + 1 > end {
            return None;
        }
        // SAFETY: `start + i < end` checked above.
        let ty = unsafe { *((start + i) as *const u8) };
        if ty == IPOPT_END {
            return None;
        }
        if ty == IPOPT_NOOP {
            i += 1;
            continue;
        }
        if ty == IPOPT_LSRR || ty == IPOPT_SSRR {
            // type, length, pointer, then the addresses.
            let mut hop = [0u8; 4];
            let at = start + i + 3;
            if at + 4 <= end && i + 7 <= len {
                let mut k = 0;
                while k < 4 {
                    // SAFETY: `at + 4 <= end` checked above.
                    hop[k] = unsafe { *((at + k) as *const u8) };
                    k += 1;
                }
            }
            return Some(hop);
        }
        if start + i + 2 > end {
            return None;
        }
        // SAFETY: `start + i + 1 < end` checked above.
        let olen = usize::from(unsafe { *((start + i + 1) as *const u8) });
        if olen < 2 {
            // Malformed: the kernel refuses the whole list (EINVAL).
            return None;
        }
        i += olen;
    }
}
