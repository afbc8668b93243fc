//! `sk_skb/stream_verdict` on `RELAY_SOCKS`: the kernel relay for allowed TLS connections.
//!
//! Why this exists: once the proxy has judged a ClientHello and connected upstream, it has
//! nothing left to decide for that connection — every later byte is ciphertext. Relaying them in
//! userspace costs a wake-up of the agent and two copies per record. With both sockets in
//! `RELAY_SOCKS`, this program runs as each segment arrives and redirects it to the other
//! socket's send path, and the agent wakes only for the connection's end.
//!
//! Why the gate: the agent switches a connection over while bytes may be in flight. A segment
//! that arrives before the switch is complete is *passed* (it stays readable for the agent,
//! which forwards it itself). Redirecting the next segment while the agent still holds an
//! earlier one would reorder the stream, so a segment is redirected only when the agent has
//! forwarded every passed byte (`RelayPeer::drained == RelayCounts::passed`). The counters are
//! per socket and a socket's segments are processed one at a time under its lock, so plain
//! adds are enough.
//!
//! Why a failed redirect passes: when the peer has left the map (closed, or the agent is
//! tearing the pair down) the segment is handed to the agent instead of dropped, so the agent
//! sees it and every byte stays accounted for.

use aya_ebpf::{
    bindings::sk_action, helpers::bpf_get_socket_cookie, macros::stream_verdict,
    programs::SkBuffContext,
};

use crate::maps::{RELAY_COUNTS, RELAY_PEERS, RELAY_SOCKS};

#[stream_verdict]
pub fn passthrough_relay(ctx: SkBuffContext) -> u32 {
    // SAFETY: sk_skb programs may call bpf_get_socket_cookie on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(counts) = RELAY_COUNTS.get_ptr_mut(&cookie) else {
        // Not set up by the agent (it creates the counts before inserting the socket): pass.
        return sk_action::SK_PASS;
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN is handed to the verdict as an empty segment. Redirected, the peer's
        // send work would count a zero-byte send as a broken pipe; the FIN itself is already
        // recorded on the socket, where the agent sees it. Nothing to forward: drop it.
        return sk_action::SK_DROP;
    }
    // SAFETY: a pointer into a map value, valid for this run; see the module doc on why the
    // adds need no atomics.
    let counts = unsafe { &mut *counts };
    if let Some(peer) = unsafe { RELAY_PEERS.get(&cookie) }
        && peer.drained == counts.passed
        && RELAY_SOCKS.redirect_skb(&ctx, peer.peer, 0) == i64::from(sk_action::SK_PASS)
    {
        counts.redirected += len;
        return sk_action::SK_PASS;
    }
    counts.passed += len;
    sk_action::SK_PASS
}
