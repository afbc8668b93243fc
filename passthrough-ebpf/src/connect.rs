//! `cgroup/connect4` and `cgroup/connect6`: TCP connects and connected UDP sockets. Allowed
//! connections proceed unchanged; rule-4 candidates are rewritten to the proxy, with the
//! original destination recorded by socket cookie. MPTCP subflows that the kernel opens are
//! judged for the connection's owner (`mptcp.rs`).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use passthrough_common::{GlobalConfig, OrigDst, flags};

use crate::{
    addr::{bytes_to_words, words_to_bytes},
    decide::{
        PROCEED, REJECT, Transport, V4, Verdict, decide, decide_for, decide_unknown_owner,
        v4_mapped, v6,
    },
    log::{self, L},
    maps::{CONFIG, ORIG_BY_COOKIE},
    mptcp::{self, Subject},
};

/// Reads what every sock_addr program needs from the context.
///
/// `user_port` is read as a full 32-bit volatile load: narrower or offset loads of it are
/// rejected by some verifiers ("invalid bpf_context access"), and LLVM likes to narrow them.
#[inline(always)]
pub(crate) fn port_be(ctx: &SockAddrContext) -> u16 {
    let raw = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_port) };
    raw as u16
}

#[inline(always)]
fn transport(ctx: &SockAddrContext) -> Transport {
    let ty = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).type_) };
    if ty == 2
    /* SOCK_DGRAM */
    {
        Transport::Udp
    } else {
        Transport::Tcp
    }
}

/// The socket's `SO_MARK`, through `ctx->sk` (always set for sock_addr programs).
#[inline(always)]
pub(crate) fn socket_mark(ctx: &SockAddrContext) -> u32 {
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() {
            return 0;
        }
        core::ptr::read_volatile(&(*sk).mark)
    }
}

/// IPv6 words are copied one 32-bit load at a time (Cilium's `ctx_get_v6_address` pattern):
/// the verifier refuses wider or pointer-arithmetic accesses to `user_ip6`.
#[inline(always)]
pub(crate) fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    unsafe {
        let p = &(*ctx.sock_addr).user_ip6;
        [
            core::ptr::read_volatile(&p[0]),
            core::ptr::read_volatile(&p[1]),
            core::ptr::read_volatile(&p[2]),
            core::ptr::read_volatile(&p[3]),
        ]
    }
}

/// Writes `user_ip6` word by word (same verifier constraint as reading).
#[inline(always)]
pub(crate) fn set_user_ip6(ctx: &SockAddrContext, words: [u32; 4]) {
    unsafe {
        let p = &mut (*ctx.sock_addr).user_ip6;
        core::ptr::write_volatile(&mut p[0], words[0]);
        core::ptr::write_volatile(&mut p[1], words[1]);
        core::ptr::write_volatile(&mut p[2], words[2]);
        core::ptr::write_volatile(&mut p[3], words[3]);
    }
}

#[inline(always)]
pub(crate) fn set_user_ip4(ctx: &SockAddrContext, addr: [u8; 4]) {
    unsafe { core::ptr::write_volatile(&mut (*ctx.sock_addr).user_ip4, u32::from_ne_bytes(addr)) };
}

#[inline(always)]
pub(crate) fn set_port_be(ctx: &SockAddrContext, port_be: u16) {
    unsafe { core::ptr::write_volatile(&mut (*ctx.sock_addr).user_port, port_be as u32) };
}

#[inline(always)]
pub(crate) fn user_ip4(ctx: &SockAddrContext) -> [u8; 4] {
    unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip4) }.to_ne_bytes()
}

/// `::ffff:a.b.c.d` as `user_ip6` words.
#[inline(always)]
pub(crate) fn mapped_words(v4: [u8; 4]) -> [u32; 4] {
    [
        0,
        0,
        u32::from_ne_bytes([0, 0, 0xff, 0xff]),
        u32::from_ne_bytes(v4),
    ]
}

/// Where a redirected connection goes, by the socket's family as written by the client.
enum ProxyTarget {
    V4([u8; 4], u16),
    V6([u32; 4], u16),
}

/// Picks the proxy address. A socket in the host network namespace goes to loopback; a
/// socket in another namespace (a pod) cannot use loopback (it would reach the pod's own),
/// so it goes to `--proxy-addr`, or is denied when none is configured for its family.
/// `v6_socket` with a v4 `dest_v4` means a v4-mapped dial: the target must be v4-mapped too
/// (the family of a socket cannot change under connect).
#[inline(always)]
fn proxy_target(
    ctx: &SockAddrContext,
    cfg: &GlobalConfig,
    v6_socket: bool,
    v4_dest: bool,
) -> Option<ProxyTarget> {
    let in_host = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.host_netns_cookie;
    if in_host {
        return Some(if !v6_socket {
            ProxyTarget::V4([127, 0, 0, 1], cfg.proxy_port_be)
        } else if v4_dest {
            ProxyTarget::V6(mapped_words([127, 0, 0, 1]), cfg.proxy_port_be)
        } else {
            ProxyTarget::V6(
                [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
                cfg.proxy_port_be,
            )
        });
    }
    if v4_dest {
        if cfg.flags & flags::POD_PROXY_V4 == 0 {
            return None;
        }
        Some(if v6_socket {
            ProxyTarget::V6(mapped_words(cfg.pod_proxy_v4), cfg.pod_proxy_port_be)
        } else {
            ProxyTarget::V4(cfg.pod_proxy_v4, cfg.pod_proxy_port_be)
        })
    } else {
        if cfg.flags & flags::POD_PROXY_V6 == 0 {
            return None;
        }
        Some(ProxyTarget::V6(
            bytes_to_words(&cfg.pod_proxy_v6),
            cfg.pod_proxy_port_be,
        ))
    }
}

/// Rule 4: records the original destination under the socket cookie, then rewrites the
/// destination to the proxy. Recording first means the proxy can never accept a redirected
/// connection it cannot attribute.
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    orig_words: [u32; 4],
    port_be: u16,
    family: u16,
    workload: u64,
    v6_socket: bool,
    v4_dest: bool,
) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        if log::on(L::Error) {
            log::config_missing();
        }
        return REJECT;
    };
    let Some(target) = proxy_target(ctx, cfg, v6_socket, v4_dest) else {
        if log::on(L::Warn) {
            log::no_proxy_addr(v4_dest, workload);
        }
        return REJECT;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: words_to_bytes(orig_words),
        port_be,
        family,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        workload,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if let Err(errno) = ORIG_BY_COOKIE.insert(&cookie, &orig, 0) {
        if log::on(L::Error) {
            log::orig_insert_failed(errno);
        }
        return REJECT;
    }
    match target {
        ProxyTarget::V4(addr, port) => {
            set_user_ip4(ctx, addr);
            set_port_be(ctx, port);
        }
        ProxyTarget::V6(words, port) => {
            set_user_ip6(ctx, words);
            set_port_be(ctx, port);
        }
    }
    PROCEED
}

/// The verdict for a subflow judged for its connection's owner, or for no one.
#[inline(always)]
fn subflow_code(v: Verdict) -> i32 {
    // decide never redirects a Subflow; anything but Allow rejects.
    if v == Verdict::Allow { PROCEED } else { REJECT }
}

#[cgroup_sock_addr(connect4)]
pub fn passthrough_connect4(ctx: SockAddrContext) -> i32 {
    let addr = user_ip4(&ctx);
    let port = port_be(&ctx);
    match mptcp::subject(&ctx) {
        Subject::Task => {}
        Subject::Owner(owner) => {
            return subflow_code(decide_for(
                owner,
                V4(addr),
                port,
                Transport::Subflow,
                socket_mark(&ctx),
            ));
        }
        Subject::Unknown => return subflow_code(decide_unknown_owner(V4(addr), port)),
    }
    let code = match decide(V4(addr), port, transport(&ctx), socket_mark(&ctx)) {
        Verdict::Allow => PROCEED,
        Verdict::Deny => REJECT,
        Verdict::Redirect { workload } => {
            redirect(&ctx, mapped_words(addr), port, 4, workload, false, true)
        }
    };
    if code == REJECT {
        mptcp::forget_owner(&ctx);
    }
    code
}

#[cgroup_sock_addr(connect6)]
pub fn passthrough_connect6(ctx: SockAddrContext) -> i32 {
    let words = user_ip6(&ctx);
    let port = port_be(&ctx);
    match mptcp::subject(&ctx) {
        Subject::Task => {}
        Subject::Owner(owner) => {
            let mark = socket_mark(&ctx);
            return subflow_code(match v4_mapped(words) {
                Some(v4) => decide_for(owner, v4, port, Transport::Subflow, mark),
                None => decide_for(owner, v6(words), port, Transport::Subflow, mark),
            });
        }
        Subject::Unknown => {
            return subflow_code(match v4_mapped(words) {
                Some(v4) => decide_unknown_owner(v4, port),
                None => decide_unknown_owner(v6(words), port),
            });
        }
    }
    let (verdict, v4_dest) = match v4_mapped(words) {
        Some(v4) => (decide(v4, port, transport(&ctx), socket_mark(&ctx)), true),
        None => (
            decide(v6(words), port, transport(&ctx), socket_mark(&ctx)),
            false,
        ),
    };
    let code = match verdict {
        Verdict::Allow => PROCEED,
        Verdict::Deny => REJECT,
        Verdict::Redirect { workload } => redirect(&ctx, words, port, 6, workload, true, v4_dest),
    };
    if code == REJECT {
        mptcp::forget_owner(&ctx);
    }
    code
}
