//! Assertions on the outcome of one connection, checked at both ends: what the workload saw and
//! what the test host received.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{EPERM, Probe, TestNet, netns::normalize};

/// A denied `connect()` must fail at once; this is generous for a loaded 2-core machine.
pub const DENY_WITHIN: Duration = Duration::from_millis(1000);

static SEQ: AtomicU32 = AtomicU32::new(0);

fn parse(addr: &str) -> SocketAddr {
    crate::netns::sa(addr)
}

/// `addr` is allowed: TCP connect succeeds, an echo round trip works, and the host counted
/// exactly one more accepted connection for that destination.
pub fn assert_allowed(probe: &mut Probe, net: &TestNet, addr: &str) {
    let dst = parse(addr);
    let before = net.accepted(dst);
    let conn = match probe.connect(dst) {
        Ok(c) => c,
        Err(e) => panic!(
            "connect to {addr} should be allowed, failed with errno {e} ({})",
            errno_name(e)
        ),
    };
    let text = format!("ping-{}", SEQ.fetch_add(1, Ordering::Relaxed));
    match probe.echo(&conn, &text) {
        Ok(got) => assert_eq!(got, text, "echo through {addr} returned something else"),
        Err(e) => panic!(
            "connect to {addr} succeeded but echo failed with errno {e} ({})",
            errno_name(e)
        ),
    }
    probe.close(conn);
    let after = net.accepted(dst);
    assert_eq!(
        after,
        before + 1,
        "connect to {addr} succeeded but the test host counted {} new connections for {}",
        after - before,
        normalize(dst)
    );
}

/// `addr` is denied: TCP connect fails with `EPERM` at once, and nothing reached the host.
pub fn assert_denied(probe: &mut Probe, net: &TestNet, addr: &str) {
    let dst = parse(addr);
    let before = net.accepted(dst);
    let t0 = Instant::now();
    let res = probe.connect(dst);
    let took = t0.elapsed();
    match res {
        Ok(c) => {
            probe.close(c);
            panic!("connect to {addr} should be denied (EPERM), but it was allowed");
        }
        Err(e) => assert_eq!(
            e,
            EPERM,
            "connect to {addr} should fail with EPERM, got errno {e} ({})",
            errno_name(e)
        ),
    }
    assert!(
        took < DENY_WITHIN,
        "denied connect to {addr} took {took:?}: a denial must fail at once"
    );
    std::thread::sleep(Duration::from_millis(50));
    let after = net.accepted(dst);
    assert_eq!(
        after,
        before,
        "denied connect to {addr}, yet the test host accepted a connection for {}",
        normalize(dst)
    );
}

/// An unconnected UDP datagram to `addr` is sent and arrives.
pub fn assert_udp_allowed(probe: &mut Probe, net: &TestNet, addr: &str) {
    let dst = parse(addr);
    let before = net.datagrams(dst);
    if let Err(e) = probe.sendto(dst, "dgram") {
        panic!(
            "sendto {addr} should be allowed, failed with errno {e} ({})",
            errno_name(e)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while net.datagrams(dst) == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        net.datagrams(dst) > before,
        "sendto {addr} succeeded but no datagram arrived at {}",
        normalize(dst)
    );
}

/// An unconnected UDP datagram to `addr` fails with `EPERM` and nothing arrives.
pub fn assert_udp_denied(probe: &mut Probe, net: &TestNet, addr: &str) {
    let dst = parse(addr);
    let before = net.datagrams(dst);
    match probe.sendto(dst, "dgram") {
        Ok(()) => panic!("sendto {addr} should be denied (EPERM), but it was sent"),
        Err(e) => assert_eq!(
            e,
            EPERM,
            "sendto {addr} should fail with EPERM, got errno {e} ({})",
            errno_name(e)
        ),
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        net.datagrams(dst),
        before,
        "denied sendto {addr}, yet a datagram arrived"
    );
}

/// A short name for common errno values in failure messages.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EINVAL => "EINVAL",
        libc::ECONNRESET => "ECONNRESET",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        _ => "?",
    }
}
