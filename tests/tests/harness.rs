//! Self-checks of the test harness, without the agent: netns test hosts, probes in cgroups,
//! IPv4/IPv6/IPv4-mapped connects, loopback, UDP, and that cleanup leaves nothing behind.

use std::{net::SocketAddr, path::Path};

use passthrough_tests::{
    LOOPBACK_PORT, Probe, TestCgroup, TestNet, assert_allowed, assert_udp_allowed, cgroup2_mount,
    netns::sa, require_kernel, run,
};

#[test]
fn cgroup_create_child_id_and_cleanup() {
    if !require_kernel() {
        return;
    }
    let root = cgroup2_mount().unwrap();
    let cg = TestCgroup::new().unwrap();
    assert!(cg.path().starts_with(&root));
    assert!(cg.path().join("cgroup.procs").exists());
    let child = cg.child("a").unwrap();
    let grandchild = child.child("b").unwrap();
    assert_ne!(cg.id(), 0);
    assert_ne!(cg.id(), child.id());
    let p = Probe::spawn_in(grandchild.path(), None).unwrap();
    assert_eq!(
        grandchild.procs(),
        vec![p.pid() as i32],
        "the probe runs in the grandchild cgroup"
    );
    // The probe's own view of its cgroup agrees.
    let cgfile = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid())).unwrap();
    let rel = grandchild.path().strip_prefix(&root).unwrap();
    assert!(
        cgfile
            .lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&format!("/{}", rel.display()))),
        "{cgfile}"
    );
    let dir = cg.path().to_path_buf();
    // Dropping the top-level cgroup kills the probe and removes the tree, even with a probe alive.
    drop(grandchild);
    drop(child);
    drop(cg);
    assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    drop(p);
}

#[test]
fn netns_hosts_ipv4_ipv6_mapped_and_loopback() {
    if !require_kernel() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let net = TestNet::new().unwrap();
    let client = net.client_ns().to_string();
    let server = net.server_ns().to_string();
    let listed = run("ip", &["netns", "list"]).unwrap();
    assert!(
        listed.contains(&client) && listed.contains(&server),
        "{listed}"
    );

    let mut p = Probe::spawn(&cg, &net).unwrap();
    for addr in [
        "198.51.100.9:8080",
        "203.0.113.7:80",
        "192.0.2.2:443",
        "[2001:db8:100::9]:8080",
        "[2001:db8:200::1]:443",
        "[2001:db8::2]:80",
        "[::ffff:198.51.100.9]:8080",
        "[::ffff:203.0.113.200]:5432",
    ] {
        assert_allowed(&mut p, &net, addr);
    }
    // The v4-mapped dial arrived as IPv4.
    assert_eq!(net.accepted(sa("198.51.100.9:8080")), 2);

    // Loopback inside the client netns.
    for addr in [
        format!("127.0.0.1:{LOOPBACK_PORT}"),
        format!("[::1]:{LOOPBACK_PORT}"),
        format!("[::ffff:127.0.0.1]:{LOOPBACK_PORT}"),
    ] {
        assert_allowed(&mut p, &net, &addr);
    }
    assert_eq!(net.accepted_on_port(LOOPBACK_PORT), 3);

    // A port nobody listens on: refused by the host, not EPERM.
    assert_eq!(p.connect("198.51.100.9:9").unwrap_err(), libc::ECONNREFUSED);

    // An established connection keeps echoing across other connects.
    let c = p.connect("198.51.100.1:80").unwrap();
    assert_allowed(&mut p, &net, "198.51.100.2:80");
    assert_eq!(p.echo(&c, "still here").unwrap(), "still here");
    p.close(c);

    // The probe is isolated from the host: it cannot reach the host's loopback agent port space
    // (its 127.0.0.1 is the client netns' own); the only thing listening there is ours.
    let own: SocketAddr = format!("127.0.0.1:{}", LOOPBACK_PORT + 1).parse().unwrap();
    assert_eq!(p.connect(own).unwrap_err(), libc::ECONNREFUSED);

    drop(p);
    drop(net);
    let listed = run("ip", &["netns", "list"]).unwrap();
    assert!(
        !listed.contains(&client) && !listed.contains(&server),
        "netns left behind: {listed}"
    );
    assert!(!Path::new("/run/netns").join(&client).exists());
}

#[test]
fn udp_sendto_and_connected_echo() {
    if !require_kernel() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let net = TestNet::new().unwrap();
    let mut p = Probe::spawn(&cg, &net).unwrap();
    for addr in [
        "198.51.100.9:53",
        "[2001:db8:100::53]:53",
        "[::ffff:203.0.113.5]:53",
        "127.0.0.1:7777",
        "[::1]:7777",
    ] {
        assert_udp_allowed(&mut p, &net, addr);
    }
    for addr in [
        "198.51.100.9:8080",
        "[2001:db8:100::9]:8080",
        "[::ffff:198.51.100.10]:8080",
    ] {
        let c = p.connect_udp(addr).unwrap();
        assert_eq!(
            p.echo(&c, "udp hello").unwrap(),
            "udp hello",
            "connected UDP echo via {addr}"
        );
        p.close(c);
    }
}

#[test]
fn parallel_nets_are_independent() {
    if !require_kernel() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let a = TestNet::new().unwrap();
    let b = TestNet::with_ports(&[80]).unwrap();
    let mut pa = Probe::spawn(&cg, &a).unwrap();
    let mut pb = Probe::spawn(&cg, &b).unwrap();
    assert_allowed(&mut pa, &a, "198.51.100.9:80");
    assert_allowed(&mut pb, &b, "198.51.100.9:80");
    assert_eq!(a.accepted(sa("198.51.100.9:80")), 1);
    assert_eq!(b.accepted(sa("198.51.100.9:80")), 1);
    assert_eq!(
        pb.connect("198.51.100.9:8080").unwrap_err(),
        libc::ECONNREFUSED
    );
}
