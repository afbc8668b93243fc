//! `cgroup_skb/egress`: the backstop that judges where packets really go, for what no
//! sock_addr or setsockopt hook sees (docs/security.md L1, L2, "Source routes").
//!
//! Why this exists: connect4/6 and sendmsg4/6 judge TCP and UDP at the syscall, on the address
//! given to it. Three things send a workload's packets elsewhere without passing them:
//!
//! - a raw socket (`SOCK_RAW`, with `CAP_NET_RAW`, which container runtimes grant by default)
//!   sends a hand-made packet to any address, and an unconnected ping socket's `sendto()` runs
//!   no sock_addr hook (`ping_v4_sendmsg`, `ping_v6_sendmsg`);
//! - a source route given per datagram as a control message: `IP_RETOPTS` with LSRR/SSRR
//!   (`CAP_NET_RAW`), and on kernels built with `CONFIG_IPV6_MIP6` a type 2 `IPV6_RTHDR`,
//!   which needs no privilege; no setsockopt hook sees those (`setsockopt.rs` refuses the
//!   sticky forms), nor a raw packet that carries its own options or extension headers;
//! - a sticky source route set before the programs were attached, or through the 32-bit
//!   system call entry, for which the kernel runs no setsockopt program (`do_sock_setsockopt`:
//!   `if (!compat)`; unprivileged for a routing header, on kernels with IA32 emulation).
//!
//! All of them leave through the IP output path, where this program sees every packet of the
//! cgroup (with the socket's cgroup as the workload: the creator's, not the current task's).
//!
//! What it does, cheapest first:
//! 1. One read of the IP header byte that says whether more headers follow (IPv4 header
//!    length, IPv6 next header). Only a packet with IPv4 options, or with an IPv6 next header
//!    other than TCP and UDP, is looked at further: an IPv4 LSRR/SSRR option or an IPv6
//!    routing header makes it a source-routed packet, which leaves only in mode `All`
//!    (`decide::decide_source_route`): the route's hops may forward it anywhere.
//! 2. Packets of TCP sockets and of UDP (and UDP-Lite) sockets then pass: their sockets were
//!    judged at `connect()`/`sendmsg()`. A packet without a full socket (a SYN-ACK, a reset
//!    from a time-wait socket) is the kernel's own and passes too.
//! 3. Any other socket's packet (raw, ping, and protocols without sock_addr hooks such as
//!    SCTP) is judged on its IP destination like a connection without a port: loopback,
//!    internal CIDRs, mode `All` and port-less IP/CIDR matches allow it.
//!
//! A dropped packet makes a datagram `sendmsg()` fail with `EPERM` (a TCP segment is dropped
//! and retransmitted, then the connection times out). Exception: `ping_v6_sendmsg` ignores the
//! error and reports success, though nothing is sent (docs/security.md L2).
//!
//! Not covered: `AF_PACKET` sockets, which leave below IP and never reach a cgroup hook
//! (dropping `CAP_NET_RAW` closes that).

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};

use passthrough_common::decide::Caller;

use crate::decide::{Socket, Transport, V4, V6, Verdict, decide_for, decide_source_route};

const SOCK_DGRAM: u32 = 2;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_UDPLITE: u32 = 136;

/// IPv6 next-header values the extension-header walk knows.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_TCP: u8 = 6;
const NEXTHDR_UDP: u8 = 17;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up (the kernel itself builds at most four before a
/// routing header: hop-by-hop, destination options, routing, fragment).
const MAX_EXT_HEADERS: u32 = 8;

/// IPv4 option types (RFC 791).
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
const IPOPT_LSRR: u8 = 0x83;
const IPOPT_SSRR: u8 = 0x89;

/// Return codes of cgroup_skb programs.
const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn passthrough_skb_egress(ctx: SkBuffContext) -> i32 {
    // Step 1: the one extra header read every packet pays.
    let routed = match more_headers(&ctx) {
        MoreHeaders::No => false,
        MoreHeaders::V4Options(ihl) => v4_source_routed(&ctx, ihl),
        MoreHeaders::V6Next(nh) => v6_source_routed(&ctx, nh),
    };
    // SAFETY: `sk` is a context field the verifier lets cgroup_skb read (possibly null).
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    // SAFETY: the helper checks the pointer; null when not a full socket.
    let full = if sk.is_null() {
        core::ptr::null_mut()
    } else {
        unsafe { bpf_sk_fullsock(sk) }
    };
    if routed {
        return source_routed(&ctx, full);
    }
    if full.is_null() {
        return PASS;
    }
    // SAFETY: non-null result of bpf_sk_fullsock.
    let (ty, protocol, mark) = unsafe { ((*full).type_, (*full).protocol, (*full).mark) };
    // Step 2: TCP, and UDP datagram sockets.
    if (ty == SOCK_STREAM && protocol == IPPROTO_TCP)
        || (ty == SOCK_DGRAM && (protocol == IPPROTO_UDP || protocol == IPPROTO_UDPLITE))
    {
        return PASS;
    }
    // Step 3.
    judge(&ctx, Socket(full), ty as u8, mark)
}

/// What the first header byte(s) said.
enum MoreHeaders {
    /// IPv4 without options, IPv6 carrying TCP or UDP right after its header (or not IP).
    No,
    /// IPv4 with options; the header length in 32-bit words.
    V4Options(u8),
    /// IPv6 whose next header is neither TCP nor UDP.
    V6Next(u8),
}

/// Reads the IPv4 header length or the IPv6 next header, straight from the packet (no helper
/// call: cgroup_skb data starts at the network header, which is in the linear part).
#[inline(always)]
fn more_headers(ctx: &SkBuffContext) -> MoreHeaders {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // SAFETY: context fields the verifier turns into packet pointers; every read below is
    // bounds-checked against `end` first.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    let (first, next) = if data + 7 <= end {
        unsafe { (*(data as *const u8), *((data + 6) as *const u8)) }
    } else {
        // Not in the linear part (never seen for locally built packets): the helper.
        match (ctx.load::<u8>(0), ctx.load::<u8>(6)) {
            (Ok(f), Ok(n)) => (f, n),
            (Ok(f), Err(_)) => (f, NEXTHDR_TCP),
            _ => return MoreHeaders::No,
        }
    };
    match first >> 4 {
        4 if first & 0x0f != 5 => MoreHeaders::V4Options(first & 0x0f),
        6 if next != NEXTHDR_TCP && next != NEXTHDR_UDP => MoreHeaders::V6Next(next),
        _ => MoreHeaders::No,
    }
}

/// Whether the IPv4 options (after the 20-byte header, `ihl` words in all) hold a loose or
/// strict source route. Options that cannot be read, or a malformed list, count as one: a
/// packet the program cannot read leaves only where source routes may.
///
/// Never inlined: as a BPF-to-BPF call only its result reaches the caller, so the verifier
/// does not walk the rest of the program once per path through this loop.
#[inline(never)]
fn v4_source_routed(ctx: &SkBuffContext, ihl: u8) -> bool {
    if ihl < 5 {
        // Malformed; the kernel never builds it.
        return true;
    }
    let len = usize::from(ihl - 5) * 4;
    let mut i = 0usize;
    // `i` grows by at least one byte per option and the list is at most 40 bytes. No separate
    // step counter: a precise counter makes every iteration a new verifier state, and the
    // verifier then gives up (1M instructions); `i` alone lets states be pruned. The constant
    // bound is for the verifier too: it cannot bound `i` by `len`, a value read from the packet.
    loop {
        if i >= 40 || i >= len {
            return false;
        }
        let Ok(ty) = ctx.load::<u8>(20 + i) else {
            return true;
        };
        if ty == IPOPT_END {
            return false;
        }
        if ty == IPOPT_NOOP {
            i += 1;
            continue;
        }
        if ty == IPOPT_LSRR || ty == IPOPT_SSRR {
            return true;
        }
        let Ok(olen) = ctx.load::<u8>(20 + i + 1) else {
            return true;
        };
        if olen < 2 {
            return true;
        }
        i += usize::from(olen);
    }
}

/// Whether the IPv6 extension headers starting with next header `nh` hold a routing header
/// (any type: type 0 and 2 list addresses, type 4 segments; all send the packet on to them).
/// Headers that cannot be read count as one, as above. Never inlined, as above.
#[inline(never)]
fn v6_source_routed(ctx: &SkBuffContext, mut nh: u8) -> bool {
    let mut off = 40usize;
    let mut n = 0;
    while n < MAX_EXT_HEADERS {
        n += 1;
        let len = match nh {
            NEXTHDR_ROUTING => return true,
            NEXTHDR_HOP | NEXTHDR_DEST => {
                let Ok(h) = ctx.load::<[u8; 2]>(off) else {
                    return true;
                };
                nh = h[0];
                (usize::from(h[1]) + 1) * 8
            }
            NEXTHDR_AUTH => {
                let Ok(h) = ctx.load::<[u8; 2]>(off) else {
                    return true;
                };
                nh = h[0];
                (usize::from(h[1]) + 2) * 4
            }
            NEXTHDR_FRAGMENT => {
                let Ok(h) = ctx.load::<[u8; 4]>(off) else {
                    return true;
                };
                // A later fragment holds no headers; a routing header belongs before the
                // fragment header (RFC 8200) and the first fragment carries it.
                if (u16::from_be_bytes([h[2], h[3]]) & 0xfff8) != 0 {
                    return false;
                }
                nh = h[0];
                8
            }
            // TCP, UDP, ICMPv6, ESP, no next header, anything else: no routing header.
            _ => return false,
        };
        off += len;
    }
    // More headers than any sender needs: treat as hiding a routing header.
    true
}

/// A source-routed packet: mode `All` only (`decide_source_route`), judged for the sending
/// socket's cgroup (for a SYN-ACK, the listener's).
#[inline(always)]
fn source_routed(ctx: &SkBuffContext, full: *mut aya_ebpf::bindings::bpf_sock) -> i32 {
    let (protocol, ty) = if full.is_null() {
        (0u8, 0u8)
    } else {
        // SAFETY: non-null result of bpf_sk_fullsock.
        unsafe { ((*full).protocol as u8, (*full).type_ as u8) }
    };
    let caller = SkbOwner(ctx.skb.skb);
    let verdict = match ctx.load::<u8>(0) {
        Ok(b) if b >> 4 == 4 => match ctx.load::<[u8; 4]>(16) {
            Ok(dst) => decide_source_route(caller, V4(dst), protocol, ty),
            Err(_) => return DROP,
        },
        Ok(_) => match ctx.load::<[u8; 16]>(24) {
            Ok(dst) => decide_source_route(caller, V6(dst), protocol, ty),
            Err(_) => return DROP,
        },
        Err(_) => return DROP,
    };
    if verdict == Verdict::Allow {
        PASS
    } else {
        DROP
    }
}

/// The cgroup of a packet's socket (its full socket: a request socket's listener), as the
/// kernel attributes the packet to this cgroup's programs.
#[derive(Clone, Copy)]
struct SkbOwner(*mut __sk_buff);

impl Caller for SkbOwner {
    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        unsafe { bpf_skb_cgroup_id(self.0) }
    }
    #[inline(always)]
    fn ancestor_cgroup_id(&self, level: i32) -> u64 {
        unsafe { bpf_skb_ancestor_cgroup_id(self.0, level) }
    }
    #[inline(always)]
    fn process(&self) -> (u32, [u8; 16]) {
        // As for Socket: no pid/comm helpers in cgroup_skb.
        (0, [0; 16])
    }
}

/// A raw or ping socket's packet: judged on the IP header's destination, no port.
#[inline(always)]
fn judge(ctx: &SkBuffContext, sock: Socket, ty: u8, mark: u32) -> i32 {
    // cgroup_skb data starts at the network header.
    let Ok(first) = ctx.load::<u8>(0) else {
        return DROP;
    };
    let verdict = match first >> 4 {
        4 => {
            let (Ok(proto), Ok(dst)) = (ctx.load::<u8>(9), ctx.load::<[u8; 4]>(16)) else {
                return DROP;
            };
            decide_for(sock, V4(dst), 0, Transport::Raw(proto, ty), mark)
        }
        6 => {
            let (Ok(proto), Ok(dst)) = (ctx.load::<u8>(6), ctx.load::<[u8; 16]>(24)) else {
                return DROP;
            };
            decide_for(sock, V6(dst), 0, Transport::Raw(proto, ty), mark)
        }
        // Neither IPv4 nor IPv6 from an IP socket: nothing we can judge, so nothing leaves.
        _ => return DROP,
    };
    if verdict == Verdict::Allow {
        PASS
    } else {
        DROP
    }
}
