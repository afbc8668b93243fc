//! Rule 3 (docs/decisions.md) at scale, on the real kernel: the IPv4 range index the programs search
//! (`passthrough_common::range_covers`) allows exactly what the CIDR matches cover, for tens of
//! thousands of overlapping, nested and port-specific matches (multi-level search trees), at
//! every interval edge and one address past it, through real `connect()` calls.
//!
//! The plans are applied three times, so both halves of the range array are written and the
//! first half is then *reused* by a smaller plan: an address only the old, larger plan covered
//! must be denied (stale blocks must never leak into a new table).
//!
//! The connects run in a private network namespace whose `lo` has `0.0.0.0/1` as a local route
//! and no listener: an allowed connect is refused by the stack (`ECONNREFUSED`) or has no route
//! (`ENETUNREACH`, 128.0.0.0/1), a denied one fails with `EPERM` in the hook. No packet leaves
//! the namespace.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
};

use ipnet::Ipv4Net;
use passthrough_policy::plan::{self, PlanOptions};
use passthrough_tests::{
    EPERM, TestCgroup,
    bench::{BenchNs, MoveBack, Rng, cidr_conf, connect_once},
    require_kernel,
};
use passthrough_user::kernel::{Kernel, LoadOptions};

/// The port some matches are restricted to.
const PORT_SPECIFIC: u16 = 443;

/// One plan's matches: (network, port or every port).
type Matches = Vec<(Ipv4Net, Option<u16>)>;

/// /16–/32 networks (shorter ones would cover nearly everything at these counts), a third of
/// them inside 100.64.0.0/10 so that they nest and overlap; a quarter at one port only.
fn matches(rng: &mut Rng, n: usize) -> Matches {
    (0..n)
        .map(|_| {
            let r = rng.next_u64();
            let len = 16 + (r % 17) as u8;
            let mut addr = (r >> 24) as u32;
            if r.is_multiple_of(3) {
                addr = (addr & 0x003f_ffff) | 0x6440_0000;
            }
            let net = Ipv4Net::new(Ipv4Addr::from(addr), len)
                .expect("len <= 32")
                .trunc();
            (
                net,
                if (r >> 8).is_multiple_of(4) {
                    Some(PORT_SPECIFIC)
                } else {
                    None
                },
            )
        })
        .collect()
}

/// The oracle, independent of the range code: some match of any prefix length contains `addr`
/// at this port or at every port.
fn covered(set: &HashSet<(Ipv4Net, Option<u16>)>, addr: Ipv4Addr, port: u16) -> bool {
    (0..=32u8).any(|len| {
        let net = Ipv4Net::new(addr, len).expect("len <= 32").trunc();
        set.contains(&(net, None)) || set.contains(&(net, Some(port)))
    })
}

/// Every edge of a sample of networks (first, last, one before, one after) plus random
/// addresses; loopback and 0/8 are left out (never judged by the rules).
fn probes(rng: &mut Rng, nets: &[&Matches], per_plan: usize) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for m in nets {
        for _ in 0..per_plan {
            let (net, _) = m[(rng.next_u64() % m.len() as u64) as usize];
            let (s, e) = (u32::from(net.network()), u32::from(net.broadcast()));
            out.extend([s, e, s.wrapping_sub(1), e.wrapping_add(1)].map(Ipv4Addr::from));
        }
    }
    out.extend((0..per_plan).map(|_| Ipv4Addr::from(rng.next_u64() as u32)));
    out.retain(|a| !a.is_loopback() && a.octets()[0] != 0);
    out
}

#[test]
fn large_overlapping_rule_sets_are_enforced_at_every_edge_across_replaces() {
    if !require_kernel() {
        return;
    }
    let ns = BenchNs::new(&["0.0.0.0/1"]).expect("netns");
    ns.enter_current_thread().expect("enter netns");
    let cg = TestCgroup::new().expect("test cgroup");
    let mut k = Kernel::load(LoadOptions::default()).expect("load");
    let mut rng = Rng(0x7a11_e5ed);
    let mut earlier: Vec<Matches> = Vec::new();
    // Generation 0, 1, then 0 again with a smaller plan.
    for (round, size) in [50_000usize, 30_000, 5_000].into_iter().enumerate() {
        let current = matches(&mut rng, size);
        let conf = cidr_conf(current.iter().copied());
        let p = plan::compile(
            k.next_generation(),
            &[(cg.id(), &conf)],
            &PlanOptions::default(),
        );
        assert!(
            p.ranges_v4.tables.iter().any(|(_, t)| t.levels >= 3),
            "round {round}: a multi-level table"
        );
        k.apply(p).expect("apply");
        if round == 0 {
            k.attach(cg.path()).expect("attach");
        }
        k.retire();

        let set: HashSet<_> = current.iter().copied().collect();
        // The edges of every earlier plan too: the last round reuses the first round's half.
        let mut sample: Vec<&Matches> = vec![&current];
        sample.extend(earlier.iter());
        let addrs = probes(&mut rng, &sample, 300);
        let back = MoveBack::into(&cg).expect("into the workload cgroup");
        let mut checked = [0usize; 2];
        for addr in &addrs {
            for port in [PORT_SPECIFIC, 80] {
                let errno = match connect_once(SocketAddr::from((*addr, port))).expect("socket") {
                    Ok(_) => 0,
                    Err((_, errno)) => errno,
                };
                let allowed = covered(&set, *addr, port);
                if allowed {
                    assert_ne!(
                        errno, EPERM,
                        "round {round}: {addr}:{port} is covered but was denied"
                    );
                } else {
                    assert_eq!(
                        errno, EPERM,
                        "round {round}: {addr}:{port} is not covered but was not denied"
                    );
                }
                checked[allowed as usize] += 1;
            }
        }
        drop(back);
        // Both outcomes were exercised in every round.
        assert!(
            checked[0] > 100 && checked[1] > 100,
            "round {round}: denied/allowed probes {checked:?}"
        );
        earlier.push(current);
    }
    k.shutdown(false).expect("detach");
}
