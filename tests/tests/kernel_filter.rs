//! The in-kernel IP/CIDR/port filter, end to end: the real `passthrough run` attaches its
//! programs to test cgroups; probes in those cgroups connect to netns test hosts.
//! Allowed → connect + echo work and the host counts the connection; denied → `EPERM` at once and
//! the host counts nothing.
//!
//! Test hosts (see `passthrough_tests::netns`): the server answers on every address of
//! `198.51.100.0/24`, `203.0.113.0/24`, `2001:db8:100::/40`, `2001:db8:200::/40` on ports
//! 53, 80, 443, 5432, 8080, 8443; the client netns has an echo listener on loopback port 7777.

use std::path::Path;

use passthrough_tests::{
    Agent, EPERM, LOOPBACK_PORT, Probe, TestCgroup, TestNet, World, assert_allowed, assert_denied,
    assert_udp_allowed, assert_udp_denied, cgroup::attached_programs, policy_yaml, require_kernel,
    write_file, write_policy,
};

fn mesh_policy(mode: &str, matches: &[&str]) -> String {
    passthrough_tests::mesh_policy("test-policy", mode, matches)
}

fn allowed(w: &World, p: &mut Probe, addrs: &[&str]) {
    for a in addrs {
        assert_allowed(p, &w.net, a);
    }
}

fn denied(w: &World, p: &mut Probe, addrs: &[&str]) {
    for a in addrs {
        assert_denied(p, &w.net, a);
    }
}

fn loopback() -> Vec<String> {
    vec![
        format!("127.0.0.1:{LOOPBACK_PORT}"),
        format!("[::1]:{LOOPBACK_PORT}"),
        format!("[::ffff:127.0.0.1]:{LOOPBACK_PORT}"),
    ]
}

#[test]
fn mode_all_allows_everything() {
    if !require_kernel() {
        return;
    }
    let w = World::new(&mesh_policy("All", &[]));
    let mut p = w.probe();
    allowed(
        &w,
        &mut p,
        &[
            "198.51.100.9:8080",
            "203.0.113.7:443",
            "[2001:db8:200::1]:80",
            "[2001:db8:100::1]:5432",
            "[::ffff:203.0.113.9]:80",
        ],
    );
}

#[test]
fn mode_none_denies_everything_but_loopback() {
    if !require_kernel() {
        return;
    }
    // Matches are ignored in mode None.
    let w = World::new(&mesh_policy(
        "None",
        &[
            "{type: CIDR, value: 198.51.100.0/24}",
            "{type: CIDR, value: \"2001:db8:100::/40\"}",
        ],
    ));
    let mut p = w.probe();
    denied(
        &w,
        &mut p,
        &[
            "198.51.100.9:8080",
            "203.0.113.7:443",
            "[2001:db8:100::1]:80",
            "[::ffff:198.51.100.9]:8080",
        ],
    );
    for a in loopback() {
        assert_allowed(&mut p, &w.net, &a);
    }
}

#[test]
fn matched_without_matches_denies_and_only_the_attached_cgroup_is_filtered() {
    if !require_kernel() {
        return;
    }
    let mut w = World::new(&mesh_policy("Matched", &[]));
    let mut p = w.probe();
    denied(
        &w,
        &mut p,
        &[
            "198.51.100.9:80",
            "203.0.113.7:443",
            "[2001:db8:100::1]:8080",
            "[::ffff:203.0.113.7]:443",
        ],
    );
    // `passthroughMode` unset means Matched (Kuma >= 2.10).
    let unset = policy_yaml(
        "test-policy",
        "{kind: Mesh}",
        None,
        &["{type: IP, value: 203.0.113.7}"],
    );
    w.agent.update_policy(&w.policy, &unset).unwrap();
    denied(&w, &mut p, &["198.51.100.9:80"]);
    allowed(&w, &mut p, &["203.0.113.7:443"]);

    // A process in another cgroup (not below the attachment) is not filtered.
    let other = TestCgroup::new().unwrap();
    let mut q = Probe::spawn(&other, &w.net).unwrap();
    allowed(&w, &mut q, &["198.51.100.9:80", "[2001:db8:100::1]:8080"]);
}

#[test]
fn matched_cidr_and_ip_with_and_without_port() {
    if !require_kernel() {
        return;
    }
    let w = World::new(&mesh_policy(
        "Matched",
        &[
            "{type: CIDR, value: 198.51.100.0/24, port: 8080}",
            "{type: IP, value: 203.0.113.7}",
            "{type: CIDR, value: \"2001:db8:100::/64\"}",
            "{type: IP, value: \"2001:db8:200::7\", port: 443}",
        ],
    ));
    let mut p = w.probe();
    allowed(
        &w,
        &mut p,
        &[
            "198.51.100.9:8080",
            "198.51.100.255:8080",
            "203.0.113.7:80",
            "203.0.113.7:443",
            "203.0.113.7:5432",
            "[2001:db8:100::9]:80",
            "[2001:db8:100::ffff]:8080",
            "[2001:db8:200::7]:443",
        ],
    );
    denied(
        &w,
        &mut p,
        &[
            "198.51.100.9:80",
            "198.51.100.9:8443",
            "203.0.113.8:80",
            "203.0.113.6:443",
            "[2001:db8:100:1::9]:80",
            "[2001:db8:200::7]:80",
            "[2001:db8:200::8]:443",
        ],
    );
}

#[test]
fn overlapping_prefixes_do_not_hide_shorter_port_rules() {
    if !require_kernel() {
        return;
    }
    let w = World::new(&mesh_policy(
        "Matched",
        &[
            "{type: CIDR, value: 203.0.113.0/24, port: 80}",
            "{type: CIDR, value: 203.0.113.0/26}",
            "{type: CIDR, value: 203.0.113.0/28, port: 443}",
            "{type: CIDR, value: 203.0.113.128/25, port: 8080}",
            "{type: IP, value: 203.0.113.130, port: 443}",
            "{type: CIDR, value: \"2001:db8:200::/40\", port: 80}",
            "{type: CIDR, value: \"2001:db8:200::/48\"}",
            "{type: CIDR, value: \"2001:db8:200::/64\", port: 443}",
            "{type: IP, value: \"2001:db8:200::1\", port: 8443}",
        ],
    ));
    let mut p = w.probe();
    allowed(
        &w,
        &mut p,
        &[
            // Inside /28 (443): /26 any-port and /24 port 80 still apply.
            "203.0.113.5:443",
            "203.0.113.5:5432",
            "203.0.113.5:80",
            // Inside /26 only.
            "203.0.113.40:5432",
            // Inside /24 only: port 80.
            "203.0.113.70:80",
            // /32 port 443 inside /25 port 8080 inside /24 port 80.
            "203.0.113.130:443",
            "203.0.113.130:8080",
            "203.0.113.130:80",
            "203.0.113.200:8080",
            "203.0.113.200:80",
            // IPv6, same shape.
            "[2001:db8:200::1]:8443",
            "[2001:db8:200::1]:443",
            "[2001:db8:200::1]:5432",
            "[2001:db8:200::1]:80",
            "[2001:db8:200:0:1::1]:5432",
            "[2001:db8:2ff::1]:80",
            // IPv4-mapped, judged by the v4 rules.
            "[::ffff:203.0.113.70]:80",
            "[::ffff:203.0.113.130]:8080",
        ],
    );
    denied(
        &w,
        &mut p,
        &[
            "203.0.113.70:443",
            "203.0.113.70:5432",
            "203.0.113.130:5432",
            "203.0.113.200:443",
            "[2001:db8:2ff::1]:443",
            "[2001:db8:201::1]:5432",
            "[::ffff:203.0.113.70]:443",
            "[::ffff:203.0.113.200]:443",
        ],
    );
}

#[test]
fn port_specific_next_to_portless() {
    if !require_kernel() {
        return;
    }
    let w = World::new(&mesh_policy(
        "Matched",
        &[
            "{type: CIDR, value: 198.51.100.0/25, port: 8080}",
            "{type: CIDR, value: 198.51.100.0/25}",
            "{type: IP, value: 198.51.100.200, port: 443}",
            "{type: IP, value: 198.51.100.200, port: 8443}",
            "{type: CIDR, value: \"2001:db8:100::/64\", port: 443}",
            "{type: CIDR, value: \"2001:db8:100::/64\"}",
            "{type: IP, value: \"2001:db8:100:1::5\", port: 443}",
            "{type: IP, value: \"2001:db8:100:1::5\", port: 8443}",
        ],
    ));
    let mut p = w.probe();
    allowed(
        &w,
        &mut p,
        &[
            "198.51.100.9:80",
            "198.51.100.9:8080",
            "198.51.100.9:5432",
            "198.51.100.200:443",
            "198.51.100.200:8443",
            "[2001:db8:100::9]:80",
            "[2001:db8:100::9]:443",
            "[2001:db8:100:1::5]:443",
            "[2001:db8:100:1::5]:8443",
            "[::ffff:198.51.100.9]:5432",
            "[::ffff:198.51.100.200]:8443",
        ],
    );
    denied(
        &w,
        &mut p,
        &[
            "198.51.100.200:80",
            "198.51.100.201:443",
            "[2001:db8:100:1::5]:80",
            "[::ffff:198.51.100.200]:80",
        ],
    );
}

#[test]
fn ipv4_mapped_ipv6_is_judged_by_the_ipv4_rules() {
    if !require_kernel() {
        return;
    }
    let w = World::new(&mesh_policy(
        "Matched",
        &[
            "{type: CIDR, value: 198.51.100.0/24, port: 8080}",
            "{type: CIDR, value: \"2001:db8:100::/40\"}",
        ],
    ));
    let mut p = w.probe();
    allowed(
        &w,
        &mut p,
        &[
            "198.51.100.9:8080",
            "[::ffff:198.51.100.9]:8080",
            "[::ffff:198.51.100.77]:8080",
        ],
    );
    denied(
        &w,
        &mut p,
        &[
            "[::ffff:198.51.100.9]:80",
            "[::ffff:203.0.113.9]:8080",
            "198.51.100.9:80",
        ],
    );
}

#[test]
fn two_workloads_with_different_policies_under_one_attachment() {
    if !require_kernel() {
        return;
    }
    let dir = passthrough_tests::test_dir();
    let parent = TestCgroup::new().unwrap();
    let a = parent.child("a").unwrap();
    let b = parent.child("b").unwrap();
    let a_sub = a.child("sub").unwrap();
    let other = parent.child("other").unwrap();
    let net = TestNet::new().unwrap();
    let workloads = dir.path().join("workloads.yaml");
    write_file(
        &workloads,
        &format!(
            "- {{name: a, cgroup: {}, labels: {{app: a}}}}\n- {{name: b, cgroup: {}, labels: {{app: b}}}}\n",
            a.path().display(),
            b.path().display()
        ),
    );
    let pa = write_policy(
        dir.path(),
        &policy_yaml(
            "for-a",
            "{kind: Dataplane, name: a}",
            Some("Matched"),
            &[
                "{type: CIDR, value: 198.51.100.0/24}",
                "{type: CIDR, value: \"2001:db8:100::/40\", port: 443}",
            ],
        ),
    );
    let pb = write_policy(
        dir.path(),
        &policy_yaml(
            "for-b",
            "{kind: MeshSubset, tags: {app: b}}",
            Some("Matched"),
            &[
                "{type: CIDR, value: 203.0.113.0/24, port: 80}",
                "{type: CIDR, value: \"2001:db8:200::/40\"}",
            ],
        ),
    );
    let _agent = Agent::builder()
        .policy(&pa)
        .policy(&pb)
        .workloads(&workloads)
        .attach_cgroup(parent.path())
        .start()
        .unwrap();

    let mut p_a = Probe::spawn(&a, &net).unwrap();
    let mut p_b = Probe::spawn(&b, &net).unwrap();
    // A process in a sub-cgroup of a workload belongs to it (ancestor walk).
    let mut p_a_sub = Probe::spawn(&a_sub, &net).unwrap();
    // Below the attachment but in no workload: --unselected-mode (default All).
    let mut p_other = Probe::spawn(&other, &net).unwrap();

    for p in [&mut p_a, &mut p_a_sub] {
        assert_allowed(p, &net, "198.51.100.9:5432");
        assert_allowed(p, &net, "[2001:db8:100::1]:443");
        assert_allowed(p, &net, "[::ffff:198.51.100.9]:80");
        assert_denied(p, &net, "203.0.113.9:80");
        assert_denied(p, &net, "[2001:db8:100::1]:80");
        assert_denied(p, &net, "[2001:db8:200::1]:80");
    }
    assert_allowed(&mut p_b, &net, "203.0.113.9:80");
    assert_allowed(&mut p_b, &net, "[2001:db8:200::1]:5432");
    assert_denied(&mut p_b, &net, "203.0.113.9:443");
    assert_denied(&mut p_b, &net, "198.51.100.9:5432");
    assert_denied(&mut p_b, &net, "[2001:db8:100::1]:443");
    assert_denied(&mut p_b, &net, "[::ffff:198.51.100.9]:80");
    for addr in [
        "198.51.100.9:5432",
        "203.0.113.9:443",
        "[2001:db8:100::1]:80",
    ] {
        assert_allowed(&mut p_other, &net, addr);
    }
}

#[test]
fn loopback_and_internal_cidrs_are_always_allowed() {
    if !require_kernel() {
        return;
    }
    let w = World::with(&mesh_policy("None", &[]), |b| {
        b.internal_cidr("203.0.113.0/25")
            .internal_cidr("2001:db8:200::/48")
    });
    let mut p = w.probe();
    for a in loopback() {
        assert_allowed(&mut p, &w.net, &a);
    }
    allowed(
        &w,
        &mut p,
        &[
            "203.0.113.9:80",
            "203.0.113.127:5432",
            "[2001:db8:200::9]:443",
            "[2001:db8:200:ffff::1]:8080",
            "[::ffff:203.0.113.10]:8080",
        ],
    );
    denied(
        &w,
        &mut p,
        &[
            "203.0.113.128:80",
            "198.51.100.9:80",
            "[2001:db8:201::1]:80",
            "[2001:db8:100::1]:80",
            "[::ffff:203.0.113.200]:80",
        ],
    );
}

#[test]
fn policy_change_applies_to_new_connections_and_keeps_established_ones() {
    if !require_kernel() {
        return;
    }
    let mut w = World::new(&mesh_policy(
        "Matched",
        &["{type: CIDR, value: 198.51.100.0/24}"],
    ));
    let mut p = w.probe();
    let established = p
        .connect("198.51.100.9:8080")
        .expect("allowed by the first policy");
    let established6 = p.connect("[2001:db8:100::9]:443");
    assert_eq!(
        established6.clone().unwrap_err(),
        EPERM,
        "v6 not allowed yet"
    );
    assert_eq!(p.echo(&established, "before").unwrap(), "before");
    denied(&w, &mut p, &["203.0.113.9:80"]);

    let g1 = w
        .agent
        .update_policy(
            &w.policy,
            &mesh_policy(
                "Matched",
                &[
                    "{type: CIDR, value: 203.0.113.0/24}",
                    "{type: CIDR, value: \"2001:db8:100::/40\"}",
                ],
            ),
        )
        .unwrap();
    denied(
        &w,
        &mut p,
        &[
            "198.51.100.9:8080",
            "198.51.100.10:80",
            "[::ffff:198.51.100.9]:8080",
        ],
    );
    allowed(&w, &mut p, &["203.0.113.9:80", "[2001:db8:100::9]:443"]);
    assert_eq!(
        p.echo(&established, "after first change").unwrap(),
        "after first change"
    );
    let kept6 = p.connect("[2001:db8:100::9]:443").unwrap();

    let g2 = w
        .agent
        .update_policy(&w.policy, &mesh_policy("None", &[]))
        .unwrap();
    assert!(g2 > g1, "generation must grow: {g1} then {g2}");
    denied(
        &w,
        &mut p,
        &[
            "203.0.113.9:80",
            "[2001:db8:100::9]:443",
            "198.51.100.9:8080",
        ],
    );
    assert_eq!(
        p.echo(&established, "after second change").unwrap(),
        "after second change"
    );
    assert_eq!(p.echo(&kept6, "v6 kept").unwrap(), "v6 kept");

    // An invalid policy is rejected whole: the previous one (None) stays, the agent keeps
    // running, and the error names the file.
    write_file(
        &w.policy,
        &mesh_policy("All", &["{type: CIDR, value: 203.0.113.0/33}"]),
    );
    let rejected = w.agent.reload_rejected().unwrap();
    assert!(
        rejected.contains(&w.policy.display().to_string()),
        "the reload error does not name {}:\n{rejected}",
        w.policy.display()
    );
    assert!(
        w.agent.is_running(),
        "an invalid reload must not stop the agent"
    );
    denied(&w, &mut p, &["203.0.113.9:80"]);
    assert_eq!(p.echo(&established, "still").unwrap(), "still");

    // Back to All via the same file.
    w.agent
        .update_policy(&w.policy, &mesh_policy("All", &[]))
        .unwrap();
    allowed(&w, &mut p, &["198.51.100.9:8080", "[2001:db8:200::1]:80"]);
    p.close(established);
    p.close(kept6);
}

#[test]
fn udp_datagrams_follow_the_ip_rules() {
    if !require_kernel() {
        return;
    }
    let w = World::with(
        &mesh_policy(
            "Matched",
            &[
                "{type: CIDR, value: 198.51.100.0/24}",
                "{type: CIDR, value: \"2001:db8:100::/40\", port: 53}",
            ],
        ),
        |b| b.arg("--resolver").arg("203.0.113.53"),
    );
    let mut p = w.probe();
    for a in [
        "198.51.100.9:53",
        "198.51.100.9:5432",
        "[2001:db8:100::1]:53",
        "[::ffff:198.51.100.9]:53",
        "203.0.113.53:53",
    ] {
        assert_udp_allowed(&mut p, &w.net, a);
    }
    for a in [
        "203.0.113.54:53",
        "203.0.113.53:5432",
        "[2001:db8:100::1]:5432",
        "[2001:db8:200::1]:53",
        "[::ffff:203.0.113.9]:53",
    ] {
        assert_udp_denied(&mut p, &w.net, a);
    }
    assert_udp_allowed(&mut p, &w.net, &format!("127.0.0.1:{LOOPBACK_PORT}"));
    // Connected UDP goes through the connect hooks.
    assert_eq!(p.connect_udp("203.0.113.54:53").unwrap_err(), EPERM);
    let c = p.connect_udp("198.51.100.9:53").unwrap();
    assert_eq!(p.echo(&c, "udp").unwrap(), "udp");
}

#[test]
fn sigterm_detaches_and_exits_zero() {
    if !require_kernel() {
        return;
    }
    let mut w = World::new(&mesh_policy("None", &[]));
    let mut p = w.probe();
    denied(&w, &mut p, &["198.51.100.9:80"]);
    if let Some(progs) = attached_programs(w.cg.path()) {
        assert!(
            !progs.is_empty(),
            "bpftool shows nothing attached to {} while the agent runs",
            w.cg.path().display()
        );
    }
    w.agent.stop().unwrap();
    if let Some(progs) = attached_programs(w.cg.path()) {
        assert!(
            progs.is_empty(),
            "still attached to {} after SIGTERM: {progs:?}",
            w.cg.path().display()
        );
    }
    allowed(&w, &mut p, &["198.51.100.9:80"]);
}

// ---- bad input: a clear error naming what and where, non-zero exit, nothing half-attached ----

fn assert_nothing_attached(cg: &TestCgroup, net: &TestNet, what: &str) {
    if let Some(progs) = attached_programs(cg.path()) {
        assert!(
            progs.is_empty(),
            "{what}: programs left attached to {}: {progs:?}",
            cg.path().display()
        );
    }
    let mut p = Probe::spawn(cg, net).unwrap();
    for a in [
        "198.51.100.9:80",
        "203.0.113.9:443",
        "[2001:db8:100::1]:8080",
        "[::ffff:198.51.100.9]:80",
    ] {
        assert_allowed(&mut p, net, a);
    }
}

fn assert_mentions(out: &str, needle: &Path, what: &str, cmd: &str) {
    let n = needle.display().to_string();
    assert!(
        out.contains(&n),
        "{what}: the error does not name {n}\ncommand: {cmd}\noutput:\n{out}"
    );
}

#[test]
fn bad_cidr_is_rejected_and_nothing_is_attached() {
    if !require_kernel() {
        return;
    }
    let dir = passthrough_tests::test_dir();
    let cg = TestCgroup::new().unwrap();
    let net = TestNet::new().unwrap();
    let bad = write_policy(
        dir.path(),
        &mesh_policy("None", &["{type: CIDR, value: 198.51.100.0/33}"]),
    );
    let f = Agent::builder()
        .policy(&bad)
        .cgroup(cg.path())
        .run_expect_failure()
        .unwrap();
    assert!(
        !f.status.success(),
        "bad CIDR: agent exited {}\n{}",
        f.status,
        f.output
    );
    assert_mentions(&f.output, &bad, "bad CIDR", &f.cmdline);
    assert!(
        f.output.contains("provided CIDR has incorrect value"),
        "bad CIDR: the error does not say what is wrong\n{}",
        f.output
    );
    assert_nothing_attached(&cg, &net, "bad CIDR");
}

#[test]
fn unreadable_policy_file_is_rejected_and_nothing_is_attached() {
    if !require_kernel() {
        return;
    }
    let dir = passthrough_tests::test_dir();
    let cg = TestCgroup::new().unwrap();
    let net = TestNet::new().unwrap();
    let good = write_policy(dir.path(), &mesh_policy("None", &[]));
    let missing = dir.path().join("does-not-exist.yaml");
    let f = Agent::builder()
        .policy(&good)
        .policy(&missing)
        .cgroup(cg.path())
        .run_expect_failure()
        .unwrap();
    assert!(
        !f.status.success(),
        "missing policy: agent exited {}\n{}",
        f.status,
        f.output
    );
    assert_mentions(&f.output, &missing, "missing policy file", &f.cmdline);
    assert_nothing_attached(&cg, &net, "missing policy file");

    // A policy "file" that cannot be read as one (a FIFO would block; a directory of garbage).
    let garbage = dir.path().join("garbage.yaml");
    std::fs::write(&garbage, b"\xff\xfe\x00not yaml: [").unwrap();
    let f = Agent::builder()
        .policy(&good)
        .policy(&garbage)
        .cgroup(cg.path())
        .run_expect_failure()
        .unwrap();
    assert!(
        !f.status.success(),
        "garbage policy: agent exited {}\n{}",
        f.status,
        f.output
    );
    assert_mentions(&f.output, &garbage, "garbage policy file", &f.cmdline);
    assert_nothing_attached(&cg, &net, "garbage policy file");
}

#[test]
fn cgroup_not_on_cgroup2_is_rejected_and_nothing_is_attached() {
    if !require_kernel() {
        return;
    }
    let dir = passthrough_tests::test_dir();
    let cg = TestCgroup::new().unwrap();
    let net = TestNet::new().unwrap();
    let good = write_policy(dir.path(), &mesh_policy("None", &[]));
    let not_cgroup = dir.path().join("not-a-cgroup");
    std::fs::create_dir(&not_cgroup).unwrap();
    // The valid cgroup first: a loader that attaches as it goes would leave it attached.
    let f = Agent::builder()
        .policy(&good)
        .cgroup(cg.path())
        .cgroup(&not_cgroup)
        .run_expect_failure()
        .unwrap();
    assert!(
        !f.status.success(),
        "non-cgroup2 path: agent exited {}\n{}",
        f.status,
        f.output
    );
    assert_mentions(&f.output, &not_cgroup, "non-cgroup2 path", &f.cmdline);
    assert_nothing_attached(&cg, &net, "non-cgroup2 path");

    // And with --attach-cgroup pointing outside cgroup v2.
    let f = Agent::builder()
        .policy(&good)
        .cgroup(cg.path())
        .attach_cgroup(cg.path())
        .attach_cgroup(&not_cgroup)
        .run_expect_failure()
        .unwrap();
    assert!(
        !f.status.success(),
        "non-cgroup2 attach path: agent exited {}\n{}",
        f.status,
        f.output
    );
    assert_mentions(
        &f.output,
        &not_cgroup,
        "non-cgroup2 attach path",
        &f.cmdline,
    );
    assert_nothing_attached(&cg, &net, "non-cgroup2 attach path");
}
