//! Issue 3 point 4: the compiled kernel plan, looked up the way the eBPF program looks it up
//! ([`KernelPlan::lookup`]), agrees with the pure decision core ([`policy::decide`]).
//!
//! Random policies (IP/CIDR matches spelled as IPv4, IPv6 and IPv4-mapped IPv6, overlapping
//! prefixes, with and without ports, host bits set; Domain matches; random targetRefs and
//! modes) are written as YAML and go through the real parse → validate → merge pipeline.
//! Random workloads (some with identical labels, so they share one rule set), internal CIDRs,
//! resolvers, unselected mode and plan generation; random destinations biased to land inside
//! or just outside the generated prefixes, plus loopback, IPv4-mapped spellings and equal /
//! unequal ports; TCP and UDP; cgroup chains with the workload as the socket's own cgroup, as
//! an ancestor, or absent.
//!
//! The properties: `lookup(..).is_some() == (decide(..).verdict == AllowKernel)` (so a
//! `RedirectToProxy` decision is never allowed by the kernel lookup), and
//! `redirects(..) == (decide(..).verdict == RedirectToProxy)` (docs/decisions.md rule 4).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use passthrough_policy::{
    self as policy, Connection, DecideOptions, MergedConf, Mode, Verdict, Workload,
    plan::{self, PlanOptions},
};
use proptest::prelude::*;

/// An address family anchor: destinations and matches are generated around these so that
/// prefixes overlap and destinations land inside / next to them.
#[derive(Debug, Clone, Copy)]
enum Anchor {
    V4(u32),
    V6(u128),
}

fn anchor() -> impl Strategy<Value = Anchor> {
    prop_oneof![
        // Documentation ranges (as the tests use) and anything at all.
        (0u32..256 * 256).prop_map(|x| Anchor::V4(
            u32::from(Ipv4Addr::new(192, 0, 2, 0)) & 0xffff_ff00 | (x & 0xff)
        )),
        (0u32..=u32::MAX).prop_map(|x| Anchor::V4(0xcb00_7100 | (x & 0xff))), // 203.0.113.x
        any::<u32>().prop_map(Anchor::V4),
        any::<u16>().prop_map(|x| Anchor::V6(
            u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)) | u128::from(x)
        )),
        any::<u128>().prop_map(Anchor::V6),
    ]
}

/// How an address is spelled in a policy or dialled.
#[derive(Debug, Clone, Copy)]
enum Spelling {
    Plain,
    /// IPv4 as `::ffff:a.b.c.d` (ignored for IPv6).
    Mapped,
}

fn spelling() -> impl Strategy<Value = Spelling> {
    prop_oneof![3 => Just(Spelling::Plain), 1 => Just(Spelling::Mapped)]
}

/// `anchor` with its low `flip_bits` bits xor-ed with `noise`.
fn near(a: Anchor, flip_bits: u32, noise: u128) -> Anchor {
    match a {
        Anchor::V4(x) => {
            let mask = if flip_bits >= 32 {
                u32::MAX
            } else {
                (1u32 << flip_bits) - 1
            };
            Anchor::V4(x ^ (noise as u32 & mask))
        }
        Anchor::V6(x) => {
            let mask = if flip_bits >= 128 {
                u128::MAX
            } else {
                (1u128 << flip_bits) - 1
            };
            Anchor::V6(x ^ (noise & mask))
        }
    }
}

fn addr(a: Anchor, s: Spelling) -> IpAddr {
    match (a, s) {
        (Anchor::V4(x), Spelling::Plain) => IpAddr::V4(Ipv4Addr::from(x)),
        (Anchor::V4(x), Spelling::Mapped) => IpAddr::V6(Ipv4Addr::from(x).to_ipv6_mapped()),
        (Anchor::V6(x), _) => IpAddr::V6(Ipv6Addr::from(x)),
    }
}

/// An IP/CIDR value as text: `(value, is_cidr)`.
fn net_text(a: Anchor, s: Spelling, prefix_frac: u8) -> String {
    let ip = addr(a, s);
    let width: u32 = match (a, s) {
        (Anchor::V4(_), Spelling::Plain) => 32,
        (Anchor::V4(_), Spelling::Mapped) => 128,
        (Anchor::V6(_), _) => 128,
    };
    // For a mapped v4 spelling keep the prefix inside the mapped range most of the time, but
    // sometimes go below 96 (an IPv6 range that then covers no IPv4 destination).
    let len = match (a, s) {
        // The edges of the mapped range (`/96` is all of IPv4) are worth more than their share.
        (Anchor::V4(_), Spelling::Mapped) if prefix_frac % 16 == 1 => 96,
        (Anchor::V4(_), Spelling::Mapped) if prefix_frac % 16 == 2 => 128,
        (Anchor::V4(_), Spelling::Mapped) if !prefix_frac.is_multiple_of(8) => {
            96 + u32::from(prefix_frac) * 32 / 255
        }
        _ => u32::from(prefix_frac) * width / 255,
    };
    format!("{ip}/{len}")
}

#[derive(Debug, Clone)]
enum GenMatch {
    Ip {
        a: Anchor,
        s: Spelling,
        port: Option<u16>,
        proto: &'static str,
    },
    Cidr {
        a: Anchor,
        s: Spelling,
        prefix: u8,
        port: Option<u16>,
        proto: &'static str,
    },
    Domain {
        name: &'static str,
        port: Option<u16>,
        proto: &'static str,
    },
}

fn port_opt() -> impl Strategy<Value = Option<u16>> {
    prop_oneof![
        2 => Just(None),
        3 => prop::sample::select(vec![53u16, 80, 443, 8080]).prop_map(Some),
        1 => (1u16..=65535).prop_map(Some),
    ]
}

fn gen_match(anchors: Vec<Anchor>) -> impl Strategy<Value = GenMatch> {
    let a = prop::sample::select(anchors);
    let kernel_proto = prop::sample::select(vec!["tcp", "tcp", "tls", "http", "mysql"]);
    prop_oneof![
        3 => (a.clone(), spelling(), 0u32..=16, any::<u128>(), port_opt(), kernel_proto.clone()).prop_map(
            |(a, s, bits, noise, port, proto)| GenMatch::Ip { a: near(a, bits, noise), s, port, proto }
        ),
        4 => (a, spelling(), any::<u8>(), 0u32..=16, any::<u128>(), port_opt(), kernel_proto).prop_map(
            |(a, s, prefix, bits, noise, port, proto)| GenMatch::Cidr { a: near(a, bits, noise), s, prefix, port, proto }
        ),
        2 => (
            prop::sample::select(vec!["example.com", "*.example.com", "*", "api.example.org"]),
            port_opt(),
            prop::sample::select(vec!["tls", "http"]),
        )
            .prop_map(|(name, port, proto)| GenMatch::Domain { name, port, proto }),
    ]
}

#[derive(Debug, Clone)]
struct GenPolicy {
    target: u8,
    mode: Option<Mode>,
    matches: Vec<GenMatch>,
}

fn gen_policy(anchors: Vec<Anchor>) -> impl Strategy<Value = GenPolicy> {
    (
        0u8..8,
        prop::option::of(prop::sample::select(vec![
            Mode::All,
            Mode::Matched,
            Mode::None,
        ])),
        prop::collection::vec(gen_match(anchors), 0..12),
    )
        .prop_map(|(target, mode, matches)| GenPolicy {
            target,
            mode,
            matches,
        })
}

const APPS: [&str; 3] = ["a", "b", "c"];

/// The YAML of one policy; matches that the validator would reject as duplicates or protocol
/// clashes are made valid (L7 domains get their own port, mysql gets a port, etc.).
fn policy_yaml(out: &mut String, i: usize, p: &GenPolicy) {
    let _ = writeln!(out, "---\ntype: MeshPassthrough\nname: p{i}\nspec:");
    match p.target {
        0..=2 => {} // no targetRef = Mesh
        3 => out.push_str("  targetRef: {kind: Mesh}\n"),
        4..=5 => {
            let _ = writeln!(
                out,
                "  targetRef: {{kind: MeshSubset, tags: {{app: {}}}}}",
                APPS[usize::from(p.target) % 3]
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "  targetRef: {{kind: Dataplane, name: w{}}}",
                p.target % 4
            );
        }
    }
    out.push_str("  default:\n");
    if let Some(m) = p.mode {
        let _ = writeln!(out, "    passthroughMode: {m}");
    }
    out.push_str(if p.matches.is_empty() {
        "    appendMatch: []\n"
    } else {
        "    appendMatch:\n"
    });
    let mut seen = BTreeSet::new();
    for m in &p.matches {
        let (ty, value, mut port, mut proto) = match m {
            GenMatch::Ip { a, s, port, proto } => ("IP", addr(*a, *s).to_string(), *port, *proto),
            GenMatch::Cidr {
                a,
                s,
                prefix,
                port,
                proto,
            } => ("CIDR", net_text(*a, *s, *prefix), *port, *proto),
            GenMatch::Domain { name, port, proto } => ("Domain", name.to_string(), *port, *proto),
        };
        // L7 protocols own a port: keep http on port 80 only (wildcards need a port with L7).
        if proto == "http" {
            port = Some(80);
        } else if port == Some(80) {
            port = Some(8080);
        }
        if proto == "mysql" && port.is_none() {
            port = Some(3306);
        }
        if ty == "Domain" && proto == "mysql" {
            proto = "tls";
        }
        if !seen.insert((value.clone(), port, proto)) {
            continue;
        }
        let _ = write!(
            out,
            "    - {{type: {ty}, value: '{value}', protocol: {proto}"
        );
        if let Some(p) = port {
            let _ = write!(out, ", port: {p}");
        }
        out.push_str("}\n");
    }
}

#[derive(Debug, Clone)]
struct Case {
    generation: u32,
    policies: Vec<GenPolicy>,
    /// Workload i: label app (index into APPS or none).
    workloads: Vec<Option<u8>>,
    unselected: Mode,
    internal: Vec<(Anchor, Spelling, u8)>,
    resolvers: Vec<(Anchor, Spelling)>,
    dsts: Vec<(Anchor, Spelling, u16, bool, u8)>,
}

fn case() -> impl Strategy<Value = Case> {
    prop::collection::vec(anchor(), 1..5).prop_flat_map(|anchors| {
        let a = prop::sample::select(anchors.clone());
        let dst_anchor = prop_oneof![
            6 => (a.clone(), 0u32..=24, any::<u128>()).prop_map(|(a, bits, noise)| near(a, bits, noise)),
            1 => anchor(),
            1 => prop_oneof![
                any::<u32>().prop_map(|x| Anchor::V4(0x7f00_0000 | (x & 0x00ff_ffff))),
                Just(Anchor::V6(1)),
            ],
        ];
        let dst_port = prop_oneof![
            4 => prop::sample::select(vec![0u16, 53, 80, 443, 3306, 8080]),
            1 => any::<u16>(),
        ];
        (
            0u32..2,
            prop::collection::vec(gen_policy(anchors.clone()), 0..5),
            prop::collection::vec(prop::option::of(0u8..4), 1..7),
            prop::sample::select(vec![Mode::All, Mode::Matched, Mode::None]),
            prop::collection::vec((a.clone(), spelling(), any::<u8>()), 0..3),
            prop::collection::vec((a, spelling()), 0..3),
            prop::collection::vec((dst_anchor, spelling(), dst_port, any::<bool>(), any::<u8>()), 1..48),
        )
            .prop_map(|(generation, policies, workloads, unselected, internal, resolvers, dsts)| Case {
                generation,
                policies,
                workloads,
                unselected,
                internal,
                resolvers,
                dsts,
            })
    })
}

fn check(c: &Case) -> Result<(), TestCaseError> {
    let mut yaml = String::new();
    for (i, p) in c.policies.iter().enumerate() {
        policy_yaml(&mut yaml, i, p);
    }
    let set = policy::load_policy_bytes(Path::new("gen.yaml"), yaml.as_bytes(), "default")
        .map_err(|e| TestCaseError::fail(format!("generated policy rejected: {e}\n{yaml}")))?;

    let workloads: Vec<(u64, Workload)> = c
        .workloads
        .iter()
        .enumerate()
        .map(|(i, app)| {
            let mut labels = BTreeMap::new();
            if let Some(a) = app.and_then(|a| APPS.get(usize::from(a))) {
                labels.insert("app".to_string(), a.to_string());
            }
            let w = Workload {
                name: format!("w{i}"),
                cgroup: PathBuf::from(format!("/w{i}")),
                labels,
            };
            (1000 + i as u64 * 7, w)
        })
        .collect();
    let merged: Vec<(u64, MergedConf)> = workloads
        .iter()
        .map(|(id, w)| (*id, set.merge_for(w, c.unselected)))
        .collect();
    let refs: Vec<(u64, &MergedConf)> = merged.iter().map(|(id, m)| (*id, m)).collect();

    let internal: Vec<IpNet> = c
        .internal
        .iter()
        .map(|(a, s, p)| net_text(*a, *s, *p).parse().expect("generated CIDR parses"))
        .collect();
    let resolvers: Vec<IpAddr> = c.resolvers.iter().map(|(a, s)| addr(*a, *s)).collect();
    let plan = plan::compile(
        c.generation,
        &refs,
        &PlanOptions {
            internal: internal.clone(),
            resolvers: resolvers.clone(),
            unmatched_mode: Some(c.unselected),
        },
    );
    let dopts = DecideOptions {
        internal,
        resolvers: resolvers
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect(),
    };
    let unselected = MergedConf {
        mode: c.unselected,
        matches: Vec::new(),
        policies: Vec::new(),
    };
    const OUTSIDE: u64 = 5; // a cgroup that is no workload (an unrelated ancestor or the socket's own)

    for (a, s, port, udp, pick) in &c.dsts {
        let dst = addr(*a, *s);
        // Every workload as the socket's own cgroup, as the nearest workload ancestor of a
        // non-workload cgroup, and a chain with no workload at all.
        let mut chains: Vec<(Vec<u64>, &MergedConf)> = Vec::new();
        for (id, conf) in &merged {
            chains.push((vec![*id, OUTSIDE], conf));
        }
        let (wid, wconf) = &merged[usize::from(*pick) % merged.len()];
        chains.push((vec![OUTSIDE + 1, *wid, merged[0].0], wconf));
        chains.push((vec![OUTSIDE + 1, OUTSIDE], &unselected));
        for (chain, conf) in chains {
            let d = policy::decide(
                conf,
                &Connection {
                    dst: SocketAddr::new(dst, *port),
                    udp: *udp,
                    l7: None,
                },
                &dopts,
            );
            let got = plan.lookup(&chain, dst, *port, *udp);
            prop_assert_eq!(
                got.is_some(),
                d.verdict == Verdict::AllowKernel,
                "dst {}:{} udp={} chain {:?}: decide says {:?} ({}), plan says {:?}\nmode {:?}, matches {:?}\nplan rules {:?}\nworkloads {:?}\n{}",
                dst,
                port,
                udp,
                chain,
                d.verdict,
                d.reason,
                got.map(|id| plan
                    .match_labels
                    .get(id as usize)
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "builtin".into())),
                conf.mode,
                conf.matches
                    .iter()
                    .map(|m| format!("{} {} {:?} {:?}", m.kind, m.value, m.net, m.port))
                    .collect::<Vec<_>>(),
                plan.rules,
                plan.workloads,
                yaml
            );
            // Rule 4: what the kernel redirects to the proxy is exactly what decide redirects.
            prop_assert_eq!(
                plan.redirects(&chain, dst, *port, *udp),
                d.verdict == Verdict::RedirectToProxy,
                "redirect: dst {}:{} udp={} chain {:?}: decide says {:?} ({})\n{}",
                dst,
                port,
                udp,
                chain,
                d.verdict,
                d.reason,
                yaml
            );
        }
    }
    Ok(())
}

proptest! {
    // PROPTEST_CASES=20000 for a longer run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn plan_lookup_agrees_with_decide(c in case()) {
        check(&c)?;
    }
}

/// The generator produces what it is meant to: every case kind shows up (guards against a
/// strategy that silently stopped covering, say, IPv4-mapped matches or allowed decisions).
#[test]
fn generator_covers_the_interesting_cases() {
    use proptest::{
        strategy::ValueTree,
        test_runner::{Config, TestRunner},
    };
    let mut runner = TestRunner::new(Config::default());
    let strat = case();
    let mut seen: BTreeSet<&'static str> = BTreeSet::new();
    for _ in 0..400 {
        let c = strat.new_tree(&mut runner).unwrap().current();
        let mut yaml = String::new();
        for (i, p) in c.policies.iter().enumerate() {
            policy_yaml(&mut yaml, i, p);
        }
        if yaml.contains("'::ffff:") {
            seen.insert("mapped match");
        }
        if yaml.contains("type: Domain") {
            seen.insert("domain match");
        }
        let set =
            policy::load_policy_bytes(Path::new("gen.yaml"), yaml.as_bytes(), "default").unwrap();
        let unselected = MergedConf {
            mode: Mode::Matched,
            matches: Vec::new(),
            policies: Vec::new(),
        };
        let w = Workload {
            name: "w0".into(),
            cgroup: "/w0".into(),
            labels: BTreeMap::new(),
        };
        let conf = set.merge_for(&w, Mode::Matched);
        let conf = if conf.mode == Mode::Matched {
            conf
        } else {
            unselected
        };
        for (a, s, port, udp, _) in &c.dsts {
            let d = policy::decide(
                &conf,
                &Connection {
                    dst: SocketAddr::new(addr(*a, *s), *port),
                    udp: *udp,
                    l7: None,
                },
                &DecideOptions::default(),
            );
            seen.insert(match d.verdict {
                Verdict::AllowKernel if d.reason == policy::Reason::AddressMatch => "address match",
                Verdict::AllowKernel => "other allow",
                Verdict::RedirectToProxy => "redirect",
                Verdict::Deny => "deny",
                _ => "proxy verdict",
            });
        }
    }
    for want in [
        "mapped match",
        "domain match",
        "address match",
        "other allow",
        "redirect",
        "deny",
    ] {
        assert!(
            seen.contains(want),
            "never generated: {want} (saw {seen:?})"
        );
    }
}
