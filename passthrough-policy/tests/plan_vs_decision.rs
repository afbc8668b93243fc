//! Issue 3 point 4, issue 17: the kernel's decision — `passthrough_common::decide::decide`, the
//! very code the eBPF programs run — over the compiled plan ([`PlanMaps`]) agrees with the pure
//! decision core ([`policy::decide`]) on verdict and reason.
//!
//! Random policies (IP/CIDR matches spelled as IPv4, IPv6 and IPv4-mapped IPv6, overlapping
//! prefixes, with and without ports, host bits set; Domain matches; random targetRefs and
//! modes) are written as YAML and go through the real parse → validate → merge pipeline.
//! Random workloads (some with identical labels, so they share one rule set), internal CIDRs,
//! resolvers with ports (53 and others, spelled as IPv4, IPv6 and IPv4-mapped), unselected mode
//! and plan generation, with a second random plan in the other generation (the one a flip just
//! retired), the proxy on or off and `--audit` on or off; random destinations biased to land
//! inside or just outside the generated prefixes and on the resolvers, plus loopback,
//! IPv4-mapped spellings and equal / unequal ports; TCP and UDP; cgroup paths with the workload
//! as the socket's own cgroup, as an ancestor, or absent.
//!
//! The property, per destination and cgroup path: the kernel allows with reason R exactly when
//! `decide` says `AllowKernel` with reason R; it redirects (workload id included) exactly when
//! `decide` says `RedirectToProxy` and the proxy is on, and denies with `no_proxy` when it is
//! off; it denies with reason R exactly when `decide` denies with R — and then it counted R
//! once, reported one event with R, and under `--audit` let it through instead.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use ipnet::IpNet;
use passthrough_common::{
    Reason, counter,
    decide::{Transport, Verdict as KernelVerdict},
    reason::Effect,
};
use passthrough_policy::{
    self as policy, Connection, DecideOptions, L7, MergedConf, Mode, Resolver, Verdict, Workload,
    plan::{self, KernelPlan, PlanOptions},
    plan_maps::{KernelSettings, PlanMaps},
    sni_plan::FastPathTables,
};
use passthrough_testhello::{Hello, TLS13};
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
            prop::sample::select(vec!["example.com", "*.example.com", "*", "api.example.org", "*.*.example.com"]),
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

/// One generation's inputs: what a plan is compiled from.
#[derive(Debug, Clone)]
struct GenPlan {
    policies: Vec<GenPolicy>,
    /// Workload i: label app (index into APPS or none).
    workloads: Vec<Option<u8>>,
    unselected: Mode,
    internal: Vec<(Anchor, Spelling, u8)>,
    /// Resolver address and port.
    resolvers: Vec<(Anchor, Spelling, u16)>,
}

/// A destination of a [`Case`]: address, spelling, port, UDP, workload pick, SNI (an index
/// into [`SNIS`]), the name it is a verified address of (an index into [`VERIFIED_NAMES`]).
type Dst = (Anchor, Spelling, u16, bool, u8, u8, Option<u8>);

#[derive(Debug, Clone)]
struct Case {
    generation: u32,
    active: GenPlan,
    /// The plan the last flip retired, in the other generation (`None`: never written).
    previous: Option<GenPlan>,
    proxy: bool,
    audit: bool,
    /// The destinations tried ([`Dst`]).
    dsts: Vec<Dst>,
    /// `--tls-fast-path=on`.
    tls_fast_path: bool,
    /// Someone watches: allowed egress decisions are reported too.
    monitor: bool,
    /// More verified destinations: (index into `dsts`, index into [`VERIFIED_NAMES`], another
    /// port than the destination's).
    verified: Vec<(u8, u8, Option<u16>)>,
}

/// How many ClientHellos the kernel's judge allowed and refused in [`check`] (the coverage
/// test's evidence that the TLS fast path is exercised both ways).
static SNI_ALLOWED: AtomicUsize = AtomicUsize::new(0);
static SNI_DENIED: AtomicUsize = AtomicUsize::new(0);

/// Names the proxy verified destinations for (valid host names, as it only learns allowed
/// ones): exact, under the generated wildcard, deeper, another domain, a trailing dot.
const VERIFIED_NAMES: [&str; 6] = [
    "example.com",
    "a.example.com",
    "b.a.example.com",
    "api.example.org",
    "example.org",
    "example.com.",
];

/// The SNI a client sends: any of those, other spellings, and what the judge refuses.
const SNIS: [Option<&str>; 10] = [
    Some("example.com"),
    Some("a.example.com"),
    Some("b.a.example.com"),
    Some("api.example.org"),
    Some("API.Example.ORG"),
    Some("example.com."),
    Some("other.test"),
    Some("192.0.2.1"),
    Some("bad..name"),
    None,
];

/// A TLS 1.3-shaped ClientHello record with `sni` as its `server_name` (none: no extension).
fn client_hello(sni: Option<&str>) -> Vec<u8> {
    let h = match sni {
        Some(n) => Hello::minimal().server_name(n.as_bytes()),
        None => Hello::minimal(),
    };
    h.supported_versions(&[TLS13]).record()
}

/// Ports of resolvers: mostly 53, some elsewhere (a port destinations also use, and one only
/// a resolver uses).
fn resolver_port() -> impl Strategy<Value = u16> {
    prop_oneof![3 => Just(53u16), 1 => Just(5353u16), 1 => Just(8080u16), 1 => 1u16..=65535]
}

fn gen_plan(anchors: Vec<Anchor>) -> impl Strategy<Value = GenPlan> {
    let a = prop::sample::select(anchors.clone());
    (
        prop::collection::vec(gen_policy(anchors), 0..5),
        prop::collection::vec(prop::option::of(0u8..4), 1..7),
        prop::sample::select(vec![Mode::All, Mode::Matched, Mode::None]),
        prop::collection::vec((a.clone(), spelling(), any::<u8>()), 0..3),
        prop::collection::vec((a, spelling(), resolver_port()), 0..3),
    )
        .prop_map(
            |(policies, workloads, unselected, internal, resolvers)| GenPlan {
                policies,
                workloads,
                unselected,
                internal,
                resolvers,
            },
        )
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
            4 => prop::sample::select(vec![0u16, 53, 80, 443, 3306, 5353, 8080]),
            1 => any::<u16>(),
        ];
        (
            0u32..2,
            gen_plan(anchors.clone()),
            prop::option::weighted(0.7, gen_plan(anchors)),
            any::<bool>(),
            prop::bool::weighted(0.2),
            prop::collection::vec(
                (
                    dst_anchor,
                    spelling(),
                    dst_port,
                    any::<bool>(),
                    any::<u8>(),
                    any::<u8>(),
                    prop::option::weighted(0.5, any::<u8>()),
                ),
                1..48,
            ),
            prop::bool::weighted(0.7),
            prop::bool::weighted(0.5),
            prop::collection::vec(
                (any::<u8>(), any::<u8>(), prop::option::weighted(0.2, prop::sample::select(vec![443u16, 8080, 8443]))),
                0..8,
            ),
        )
            .prop_map(|(generation, active, previous, proxy, audit, dsts, tls_fast_path, monitor, verified)| Case {
                generation,
                active,
                previous,
                proxy,
                audit,
                dsts,
                tls_fast_path,
                monitor,
                verified,
            })
    })
}

/// A generation compiled: the YAML, the merged configurations by workload id, the decide
/// options and the plan.
struct Compiled {
    yaml: String,
    merged: Vec<(u64, MergedConf)>,
    dopts: DecideOptions,
    plan: KernelPlan,
}

fn compile(g: &GenPlan, generation: u32) -> Result<Compiled, TestCaseError> {
    let mut yaml = String::new();
    for (i, p) in g.policies.iter().enumerate() {
        policy_yaml(&mut yaml, i, p);
    }
    let set = policy::load_policy_bytes(Path::new("gen.yaml"), yaml.as_bytes(), "default")
        .map_err(|e| TestCaseError::fail(format!("generated policy rejected: {e}\n{yaml}")))?;

    let workloads: Vec<(u64, Workload)> = g
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
        .map(|(id, w)| (*id, set.merge_for(w, g.unselected)))
        .collect();
    let refs: Vec<(u64, &MergedConf)> = merged.iter().map(|(id, m)| (*id, m)).collect();
    let internal: Vec<IpNet> = g
        .internal
        .iter()
        .map(|(a, s, p)| net_text(*a, *s, *p).parse().expect("generated CIDR parses"))
        .collect();
    let resolvers: Vec<Resolver> = g
        .resolvers
        .iter()
        .map(|(a, s, port)| Resolver::new(addr(*a, *s), *port))
        .collect();
    let plan = plan::compile(
        generation,
        &refs,
        &PlanOptions {
            internal: internal.clone(),
            resolvers: resolvers.clone(),
            unmatched_mode: Some(g.unselected),
        },
    );
    Ok(Compiled {
        yaml,
        merged,
        dopts: DecideOptions {
            internal,
            resolvers,
        },
        plan,
    })
}

fn check(c: &Case) -> Result<(), TestCaseError> {
    let active = compile(&c.active, c.generation)?;
    let previous = match &c.previous {
        Some(g) => Some(compile(g, c.generation ^ 1)?),
        None => None,
    };
    let mut maps = PlanMaps::new(
        &active.plan,
        previous.as_ref().map(|p| &p.plan),
        KernelSettings {
            proxy: c.proxy,
            audit: c.audit,
            agent_mark: 0,
            tls_fast_path: c.tls_fast_path,
        },
    )
    .with_monitor(c.monitor);
    // The TLS fast path's verified destinations, projected onto the active plan's rule sets
    // as the agent projects what the proxy learned: (destination, name) pairs.
    let name = |n: u8| VERIFIED_NAMES[usize::from(n) % VERIFIED_NAMES.len()];
    let verified: Vec<(SocketAddr, &str)> = c
        .dsts
        .iter()
        .filter_map(|(a, s, port, .., v)| {
            v.map(|n| (SocketAddr::new(addr(*a, *s).to_canonical(), *port), name(n)))
        })
        .chain(c.verified.iter().map(|(d, n, other_port)| {
            let (a, s, port, ..) = c.dsts[usize::from(*d) % c.dsts.len()];
            let port = other_port.unwrap_or(port);
            (SocketAddr::new(addr(a, s).to_canonical(), port), name(*n))
        }))
        .collect();
    let tables = FastPathTables::of(&active.plan);
    for (dst, name) in &verified {
        maps.verify(tables.keys(name, *dst));
    }
    let unselected = MergedConf {
        mode: c.active.unselected,
        matches: Vec::new(),
        policies: Vec::new(),
    };
    let merged = &active.merged;
    const OUTSIDE: u64 = 5; // a cgroup that is no workload (an unrelated ancestor or the socket's own)

    for (a, s, port, udp, pick, sni, _) in &c.dsts {
        let dst = SocketAddr::new(addr(*a, *s), *port);
        let sni = SNIS[usize::from(*sni) % SNIS.len()];
        // Every workload as the socket's own cgroup, as the nearest workload ancestor of a
        // non-workload cgroup (below another workload), and a path with no workload at all.
        // Paths run from the root's child down to the socket's own cgroup.
        let mut paths: Vec<(Vec<u64>, u64, &MergedConf)> = Vec::new();
        for (id, conf) in merged {
            paths.push((vec![OUTSIDE, *id], *id, conf));
        }
        let (wid, wconf) = &merged[usize::from(*pick) % merged.len()];
        paths.push((vec![merged[0].0, *wid, OUTSIDE + 1], *wid, wconf));
        paths.push((vec![OUTSIDE, OUTSIDE + 1], 0, &unselected));
        for (path, workload, conf) in paths {
            let d = policy::decide(
                conf,
                &Connection {
                    dst,
                    udp: *udp,
                    l7: None,
                },
                &active.dopts,
            );
            let transport = if *udp { Transport::Udp } else { Transport::Tcp };
            let before: Vec<u64> = (0..counter::COUNT).map(|i| maps.count(i)).collect();
            let k = maps.decide(&path, dst, transport, 0);
            let events = maps.take_events();
            let observed = maps.take_observed();
            let context = || {
                format!(
                    "dst {dst} udp={udp} path {path:?} proxy={} audit={}: decide says {:?} ({}), kernel says {k:?}\nmode {:?}, matches {:?}\nplan rules {:?}\nworkloads {:?}\n{}",
                    c.proxy,
                    c.audit,
                    d.verdict,
                    d.reason,
                    conf.mode,
                    conf.matches
                        .iter()
                        .map(|m| format!("{} {} {:?} {:?}", m.kind, m.value, m.net, m.port))
                        .collect::<Vec<_>>(),
                    active.plan.rules,
                    active.plan.workloads,
                    active.yaml
                )
            };
            // What the kernel must do, from what decide says.
            let tls = |name: Option<&str>| {
                policy::decide(
                    conf,
                    &Connection {
                        dst,
                        udp: *udp,
                        l7: Some(L7::Tls(name.map(str::to_string))),
                    },
                    &active.dopts,
                )
            };
            // The TLS fast path takes a redirected connection when the policy makes it a
            // candidate (only `tls` Domain matches could apply) and a name verified for this
            // destination is one the workload's policy allows here.
            let fast = c.tls_fast_path
                && !c.audit
                && !*udp
                && policy::decision::tls_fast_path_candidate(
                    &Connection {
                        dst,
                        udp: *udp,
                        l7: None,
                    },
                    &d,
                )
                && verified.iter().any(|(v, name)| {
                    *v == SocketAddr::new(dst.ip().to_canonical(), *port)
                        && tls(Some(name)).verdict == Verdict::AllowAtProxy
                });
            let (want, reason) = match d.verdict {
                Verdict::AllowKernel => (KernelVerdict::Allow, d.reason.reason()),
                Verdict::RedirectToProxy if c.proxy && fast => {
                    (KernelVerdict::KernelSni { workload }, d.reason.reason())
                }
                Verdict::RedirectToProxy if c.proxy => {
                    (KernelVerdict::Redirect { workload }, d.reason.reason())
                }
                Verdict::RedirectToProxy => (KernelVerdict::Deny, Reason::NoProxy),
                Verdict::Deny => (KernelVerdict::Deny, d.reason.reason()),
                Verdict::AllowAtProxy | Verdict::DenyAtProxy => {
                    return Err(TestCaseError::fail(format!(
                        "no L7 given, yet {}",
                        context()
                    )));
                }
            };
            let denied = want == KernelVerdict::Deny;
            let want = if denied && c.audit {
                KernelVerdict::Allow
            } else {
                want
            };
            prop_assert_eq!((k.verdict, k.reason), (want, reason), "{}", context());
            // Counted once, under the reason (a denial `--audit` let through in its own slot).
            let slot = if denied && c.audit {
                counter::audit_let_through(reason)
            } else if matches!(k.verdict, KernelVerdict::KernelSni { .. }) {
                counter::kernel_sni(reason)
            } else {
                counter::decided(reason)
            };
            for i in 0..counter::COUNT {
                let moved = maps.count(i) - before[i as usize];
                prop_assert_eq!(moved, u64::from(i == slot), "counter {} {}", i, context());
            }
            // One event per denial, naming the reason, the workload and the destination.
            if denied {
                prop_assert_eq!(events.len(), 1, "{}", context());
                let ev = &events[0];
                let ip = match dst.ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                prop_assert_eq!(
                    (
                        ev.reason,
                        ev.workload,
                        ev.addr,
                        ev.port,
                        ev.audit,
                        ev.protocol
                    ),
                    (
                        reason as u32,
                        workload,
                        ip.octets(),
                        *port,
                        u8::from(c.audit),
                        if *udp { 17 } else { 6 }
                    ),
                    "{}",
                    context()
                );
            } else {
                prop_assert!(events.is_empty(), "{}", context());
            }
            // On the TLS fast path, the kernel's judge of the ClientHello (the shared parser and
            // name tables) gives the decision core's verdict and reason for that SNI.
            if let KernelVerdict::KernelSni { workload: w } = k.verdict {
                let before: Vec<u64> = (0..counter::COUNT).map(|i| maps.count(i)).collect();
                let got = maps.judge_hello(w, *port, &client_hello(sni));
                let d2 = tls(sni);
                let want = match d2.verdict {
                    Verdict::AllowAtProxy | Verdict::DenyAtProxy => d2.reason.reason(),
                    v => {
                        return Err(TestCaseError::fail(format!(
                            "TLS {sni:?} to a candidate decided {v:?}; {}",
                            context()
                        )));
                    }
                };
                prop_assert_eq!(got, want, "SNI {:?}: {}", sni, context());
                let seen = if want.effect() == Effect::Allow {
                    &SNI_ALLOWED
                } else {
                    &SNI_DENIED
                };
                seen.fetch_add(1, Ordering::Relaxed);
                prop_assert_eq!(
                    want.effect() == Effect::Allow,
                    d2.verdict == Verdict::AllowAtProxy,
                    "{}",
                    context()
                );
                for i in 0..counter::COUNT {
                    let moved = maps.count(i) - before[i as usize];
                    prop_assert_eq!(
                        moved,
                        u64::from(i == counter::kernel_sni(want)),
                        "SNI counter {} {}",
                        i,
                        context()
                    );
                }
            }
            // While someone watches, one monitor event per allowed egress decision (an
            // address match or mode All), the same record a denial gets; none otherwise.
            let egress_allow = matches!(reason, Reason::AddressMatch | Reason::ModeAll);
            if c.monitor && egress_allow {
                prop_assert_eq!(observed.len(), 1, "{}", context());
                let ev = &observed[0];
                let ip = match dst.ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                prop_assert_eq!(
                    (
                        ev.reason,
                        ev.workload,
                        ev.addr,
                        ev.port,
                        ev.audit,
                        ev.protocol
                    ),
                    (
                        reason as u32,
                        workload,
                        ip.octets(),
                        *port,
                        0,
                        if *udp { 17 } else { 6 }
                    ),
                    "{}",
                    context()
                );
            } else {
                prop_assert!(observed.is_empty(), "{}", context());
            }
            // The watcher's lease: the same decision is reported up to the lease's last unit
            // of the clock and not after it (an agent that was killed stops renewing it).
            if c.monitor && egress_allow {
                for (clock_ns, reported) in [
                    (5u64 << 30, true),
                    ((6u64 << 30) - 1, true),
                    (6u64 << 30, false),
                    (u64::MAX, false),
                ] {
                    maps.set_monitor_lease(5, clock_ns);
                    let again = maps.decide(&path, dst, transport, 0);
                    prop_assert_eq!((again.verdict, again.reason), (k.verdict, k.reason));
                    prop_assert_eq!(
                        maps.take_observed().len(),
                        usize::from(reported),
                        "lease 5 at clock {}: {}",
                        clock_ns,
                        context()
                    );
                    prop_assert!(maps.take_events().is_empty(), "{}", context());
                }
                maps.set_monitor_lease(u32::MAX, 0);
            }
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
    fn kernel_decision_over_the_plan_agrees_with_decide(c in case()) {
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
    for _ in 0..600 {
        let c = strat.new_tree(&mut runner).unwrap().current();
        let mut yaml = String::new();
        for (i, p) in c.active.policies.iter().enumerate() {
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
        if c.previous.is_some() {
            seen.insert("previous generation");
        }
        let resolvers: Vec<Resolver> = c
            .active
            .resolvers
            .iter()
            .map(|(a, s, port)| Resolver::new(addr(*a, *s), *port))
            .collect();
        for (a, s, port, udp, ..) in &c.dsts {
            let dst = SocketAddr::new(addr(*a, *s), *port);
            if *udp
                && resolvers
                    .iter()
                    .any(|r| r.port() != 53 && r.port() == *port)
            {
                let d = policy::decide(
                    &conf,
                    &Connection {
                        dst,
                        udp: true,
                        l7: None,
                    },
                    &DecideOptions {
                        internal: Vec::new(),
                        resolvers: resolvers.clone(),
                    },
                );
                if d.reason.reason() == policy::Reason::Resolver {
                    seen.insert("resolver off port 53");
                }
            }
            let d = policy::decide(
                &conf,
                &Connection {
                    dst,
                    udp: *udp,
                    l7: None,
                },
                &DecideOptions::default(),
            );
            seen.insert(match d.verdict {
                Verdict::AllowKernel if d.reason == policy::ReasonDetail::AddressMatch => {
                    "address match"
                }
                Verdict::AllowKernel => "other allow",
                Verdict::RedirectToProxy => "redirect",
                Verdict::Deny => "deny",
                _ => "proxy verdict",
            });
        }
    }
    // The TLS fast path, through the property itself: some hellos allowed, some refused.
    let mut runner = TestRunner::new(Config::default());
    for _ in 0..300 {
        let c = strat.new_tree(&mut runner).unwrap().current();
        check(&c).unwrap();
    }
    eprintln!(
        "kernel-sni hellos: {} allowed, {} refused",
        SNI_ALLOWED.load(Ordering::Relaxed),
        SNI_DENIED.load(Ordering::Relaxed)
    );
    assert!(
        SNI_ALLOWED.load(Ordering::Relaxed) > 0 && SNI_DENIED.load(Ordering::Relaxed) > 0,
        "kernel-sni hellos: {} allowed, {} refused",
        SNI_ALLOWED.load(Ordering::Relaxed),
        SNI_DENIED.load(Ordering::Relaxed)
    );
    for want in [
        "previous generation",
        "resolver off port 53",
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
