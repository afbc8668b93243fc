//! `cgroup/connect4` and `cgroup/connect6`: TCP connects and connected UDP sockets.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::decide::{Transport, V4, decide, v4_mapped, v6};

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
pub(crate) fn transport(ctx: &SockAddrContext) -> Transport {
    let ty = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).type_) };
    if ty == 2 /* SOCK_DGRAM */ { Transport::Udp } else { Transport::Tcp }
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

#[inline(always)]
pub(crate) fn user_ip4(ctx: &SockAddrContext) -> [u8; 4] {
    unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip4) }.to_ne_bytes()
}

#[cgroup_sock_addr(connect4)]
pub fn passthrough_connect4(ctx: SockAddrContext) -> i32 {
    decide(V4(user_ip4(&ctx)), port_be(&ctx), transport(&ctx), socket_mark(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn passthrough_connect6(ctx: SockAddrContext) -> i32 {
    let words = user_ip6(&ctx);
    match v4_mapped(words) {
        Some(v4) => decide(v4, port_be(&ctx), transport(&ctx), socket_mark(&ctx)),
        None => decide(v6(words), port_be(&ctx), transport(&ctx), socket_mark(&ctx)),
    }
}
