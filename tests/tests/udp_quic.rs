//! Issue 6 point 1: UDP as docs/decisions.md says, end to end on the real kernel with the real agent.
//!
//! In `None`/`Matched` a datagram — connected UDP (connect4/6) or an unconnected send
//! (sendmsg4/6) — is allowed only to loopback, to a configured resolver at its port (53 unless
//! given), and to
//! `IP`/`CIDR` matches; IPv6 like IPv4, and IPv4-mapped IPv6 by the IPv4 rules. Domain matches
//! never cover UDP, so QUIC to a destination only a Domain match covers fails with `EPERM` and
//! the client's TCP fallback (redirected to the proxy, judged on the SNI) works.
//!
//! Every allowed case checks both ends: the workload's send (or connect + echo) succeeds and the
//! test host counted the datagram for that destination. Every denied case: `EPERM` at once and
//! nothing arrived.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use passthrough_tests::{
    Agent, AgentBuilder, EPERM, LOOPBACK_PORT, Probe, TestCgroup, World, assert_udp_allowed,
    assert_udp_denied,
    hostnet::HostNet,
    l7::{Dns, Pki, Servers, Service},
    netns::in_netns,
    require_kernel,
    sec::SEC_SLOT,
    write_policy,
};
use serde_json::json;

fn mesh_policy(mode: &str, matches: &[&str]) -> String {
    passthrough_tests::mesh_policy("udp", mode, matches)
}

/// Field order = drop order.
/// Allowed both ways: `sendto` arrives, and a connected UDP socket round-trips.
fn udp_ok(p: &mut Probe, w: &World, a: &str) {
    assert_udp_allowed(p, &w.net, a);
    let c = p
        .connect_udp(a)
        .unwrap_or_else(|e| panic!("connected UDP to {a} should be allowed, errno {e}"));
    assert_eq!(
        p.echo(&c, "quic?")
            .unwrap_or_else(|e| panic!("echo over connected UDP to {a}: errno {e}")),
        "quic?",
        "{a}"
    );
    p.close(c);
}

/// Denied both ways: `sendto` and `connect` fail with EPERM, nothing arrives.
fn udp_no(p: &mut Probe, w: &World, a: &str) {
    assert_udp_denied(p, &w.net, a);
    let before = w.net.datagrams(a.parse().unwrap());
    assert_eq!(
        p.connect_udp(a).err(),
        Some(EPERM),
        "connected UDP to {a} should fail with EPERM"
    );
    assert_eq!(w.net.datagrams(a.parse().unwrap()), before, "{a}");
}

const RESOLVERS: [&str; 2] = ["203.0.113.53", "2001:db8:200::53"];

fn with_resolvers(b: AgentBuilder) -> AgentBuilder {
    b.arg("--resolver")
        .arg(RESOLVERS[0])
        .arg("--resolver")
        .arg(&format!("[{}]:53", RESOLVERS[1]))
}

#[test]
fn matched_udp_ip_cidr_dns_and_domain_over_v4_v6_and_mapped() {
    if !require_kernel() {
        return;
    }
    let w = World::with(
        &mesh_policy(
            "Matched",
            &[
                "{type: CIDR, value: 198.51.100.0/24}",
                "{type: IP, value: \"2001:db8:100::7\", port: 8443}",
                "{type: IP, value: 203.0.113.7, port: 5432, protocol: tcp}",
                // Domain matches never cover UDP (QUIC cannot be peeked).
                "{type: Domain, value: quic.test, port: 443, protocol: tls}",
                "{type: Domain, value: \"*\", port: 8080, protocol: http}",
            ],
        ),
        with_resolvers,
    );
    let mut p = w.probe();
    for a in [
        // CIDR, any port, any family spelling.
        "198.51.100.9:5432",
        "198.51.100.9:443",
        "[::ffff:198.51.100.200]:8080",
        // IP with a port (the match's protocol does not matter for the kernel path).
        "[2001:db8:100::7]:8443",
        "203.0.113.7:5432",
        "[::ffff:203.0.113.7]:5432",
        // DNS to the configured resolvers (v4, mapped, v6).
        "203.0.113.53:53",
        "[::ffff:203.0.113.53]:53",
        "[2001:db8:200::53]:53",
    ] {
        udp_ok(&mut p, &w, a);
    }
    for a in [
        // IP match at another port / another address.
        "[2001:db8:100::7]:443",
        "[2001:db8:100::8]:8443",
        "203.0.113.7:443",
        "[::ffff:203.0.113.7]:8443",
        // Port 53 of something that is not a resolver; a resolver at another port.
        "203.0.113.54:53",
        "[::ffff:203.0.113.54]:53",
        "[2001:db8:200::54]:53",
        "203.0.113.53:5432",
        "[2001:db8:200::53]:443",
        // Only Domain matches cover these ports: UDP is never redirected, so denied.
        "203.0.113.9:443",
        "[2001:db8:200::9]:443",
        "[::ffff:203.0.113.9]:443",
        "203.0.113.9:8080",
    ] {
        udp_no(&mut p, &w, a);
    }
    // Loopback is not egress.
    assert_udp_allowed(&mut p, &w.net, &format!("127.0.0.1:{LOOPBACK_PORT}"));
    assert_udp_allowed(&mut p, &w.net, &format!("[::1]:{LOOPBACK_PORT}"));
    assert_udp_allowed(
        &mut p,
        &w.net,
        &format!("[::ffff:127.0.0.1]:{LOOPBACK_PORT}"),
    );
}

#[test]
fn none_mode_allows_only_dns_to_resolvers_and_all_mode_everything() {
    if !require_kernel() {
        return;
    }
    let w = World::with(
        &mesh_policy("None", &["{type: CIDR, value: 198.51.100.0/24}"]),
        with_resolvers,
    );
    let mut p = w.probe();
    for a in [
        "203.0.113.53:53",
        "[::ffff:203.0.113.53]:53",
        "[2001:db8:200::53]:53",
    ] {
        udp_ok(&mut p, &w, a);
    }
    for a in [
        "198.51.100.9:53",
        "198.51.100.9:5432",
        "[::ffff:198.51.100.9]:443",
        "203.0.113.54:53",
        "[2001:db8:100::1]:53",
        "203.0.113.53:443",
    ] {
        udp_no(&mut p, &w, a);
    }
    drop(p);
    drop(w);
    let w = World::with(&mesh_policy("All", &[]), |b| b);
    let mut p = w.probe();
    for a in [
        "203.0.113.9:443",
        "[2001:db8:200::9]:443",
        "[::ffff:198.51.100.9]:53",
    ] {
        udp_ok(&mut p, &w, a);
    }
}

/// A resolver given with a port is exempt at that port only, for every spelling of its
/// address: `run --resolver IP:PORT` compiles the resolver at PORT (it used to drop the port
/// and exempt 53, while `explain` and the proxy's DNS client used PORT).
#[test]
fn a_resolver_at_another_port_is_exempt_there_and_only_there() {
    if !require_kernel() {
        return;
    }
    let w = World::with(&mesh_policy("None", &[]), |b| {
        b.arg("--resolver")
            .arg(&format!("{}:5432", RESOLVERS[0]))
            .arg("--resolver")
            .arg(&format!("[{}]:8443", RESOLVERS[1]))
    });
    let mut p = w.probe();
    for a in [
        "203.0.113.53:5432",
        "[::ffff:203.0.113.53]:5432",
        "[2001:db8:200::53]:8443",
    ] {
        udp_ok(&mut p, &w, a);
    }
    for a in [
        "203.0.113.53:53",
        "[::ffff:203.0.113.53]:53",
        "[2001:db8:200::53]:53",
        "203.0.113.53:8443",
        "[2001:db8:200::53]:5432",
    ] {
        udp_no(&mut p, &w, a);
    }
}

// ----------------------------------------------------------------- QUIC and TCP fallback

/// A UDP listener in a netns that counts what arrives (a QUIC server that never answers).
struct UdpSink {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl UdpSink {
    fn start(ns: &str, port: u16) -> UdpSink {
        let socks: Vec<UdpSocket> = in_netns(ns, move || {
            let v4 = UdpSocket::bind(("0.0.0.0", port))?;
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)?;
            s.set_only_v6(true)?;
            s.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
            Ok(vec![v4, s.into()])
        })
        .unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        for s in socks {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let (count, stop) = (count.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut b = [0u8; 2048];
                while !stop.load(Ordering::SeqCst) {
                    if s.recv(&mut b).is_ok() {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        UdpSink { count, stop }
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One test at a time on the slot's host routes.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn quic_to_a_domain_only_destination_fails_and_the_tcp_fallback_works() {
    if !require_kernel() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = passthrough_tests::test_dir();
    let cg = TestCgroup::new().unwrap();
    let net = HostNet::new(SEC_SLOT).unwrap();
    let pki = Pki::new(&["quic.test"]).unwrap();
    let ca = pki.write_ca(dir.path()).unwrap();
    let servers = Servers::start(
        Some(net.server_ns()),
        &[(443, Service::TlsEcho)],
        Some(pki.server.clone()),
        1,
    )
    .unwrap();
    let sink = UdpSink::start(net.server_ns(), 443);
    let (a4, a6) = (SEC_SLOT.host4(1), SEC_SLOT.host6(0xa));
    let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
    names.insert("quic.test".into(), vec![a4, a6]);
    let dns = Dns::start(names, 300).unwrap();
    let policy = write_policy(
        dir.path(),
        &mesh_policy(
            "Matched",
            &["{type: Domain, value: quic.test, port: 443, protocol: tls}"],
        ),
    );
    let _agent = Agent::builder()
        .policy(&policy)
        .cgroup(cg.path())
        .arg("--resolver")
        .arg(&dns.addr.to_string())
        .start()
        .unwrap();
    // The workload runs in the host netns (the proxy is on loopback).
    let mut p = Probe::spawn_in(cg.path(), None).unwrap();
    let mapped = match a4 {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    };
    for ip in [a4, a6, mapped] {
        let dst = SocketAddr::new(ip, 443);
        // QUIC: the client's first flight is a UDP datagram to 443, connected or not.
        assert_eq!(
            p.sendto(dst, "quic-initial").err(),
            Some(EPERM),
            "sendto {dst}"
        );
        assert_eq!(p.connect_udp(dst).err(), Some(EPERM), "connect udp {dst}");
        // The TCP fallback: connect is not refused (redirected to the proxy, or direct once the
        // TLS fast path has the destination verified); the SNI is allowed and the real host
        // answers the handshake.
        let before = servers.accepted(dst);
        let r = p.json(
            &json!({"op": "tls", "addr": dst.to_string(), "sni": "quic.test",
            "ca": ca.display().to_string()}),
        );
        assert_eq!(r["ok"], true, "TCP fallback to {dst}: {r}");
        let shown = passthrough_tests::netns::normalize(dst);
        assert_eq!(r["greeting"], format!("local={shown} sni=quic.test"), "{r}");
        assert_eq!(r["peer"], dst.to_string(), "{r}");
        assert_eq!(servers.accepted(dst), before + 1);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        sink.count.load(Ordering::SeqCst),
        0,
        "no QUIC datagram may reach the host"
    );
}
