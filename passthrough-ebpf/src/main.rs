//! passthrough's kernel side: cgroup `sock_addr` programs that decide MeshPassthrough egress at
//! `connect()` / `sendmsg()` time.
//!
//! One module per program type (`connect`, `sendmsg`, `getpeername`, `setsockopt`, `sock_ops`,
//! `skb`, `sni` (the TLS fast path's ClientHello judge), and the test-only `view_probe`, which
//! the agent never loads); the shared decision lives in `decide`, the maps in `maps`, the MPTCP subflow owner in `mptcp`,
//! diagnostics (aya-log, off by default) in `log`. The user side compiles policies into the
//! maps; nothing here knows YAML.
#![no_std]
#![no_main]
// aya-ebpf's map methods take `impl Borrow<K>`, and clippy asks for keys by value. They are
// passed by reference on purpose: the key then stays in the stack slot it was built in, the one
// the verifier tracked, instead of being copied into the helper call's argument; not worth
// churning verifier-sensitive code (the per-connect decision) for a style lint.
#![allow(clippy::needless_borrows_for_generic_args)]

mod addr;
mod connect;
mod decide;
mod getpeername;
mod log;
mod maps;
mod mptcp;
mod sendmsg;
mod setsockopt;
mod skb;
mod sni;
mod sock_ops;
mod view_probe;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier guarantees there is no panic path at run time; this only satisfies no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
