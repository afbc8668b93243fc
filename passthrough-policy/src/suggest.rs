//! `passthrough suggest`: a `MeshPassthrough` policy per workload that allows what the agent
//! observed ([`DecisionRecord`]s from the decision log or a `monitor --json` capture).
//!
//! What becomes which match:
//!
//! | observed | match |
//! |---|---|
//! | the proxy read an SNI / Host, or the TLS fast path's judge in the kernel an SNI (path `kernel-sni`), and the name was not refused for its address | `Domain` name, dialled port, protocol `tls` (TLS), `http` (HTTP/1), `http2` (h2c), `grpc`; plaintext HTTP of several kinds on one port: `http` (Kuma allows one HTTP protocol per port, and each of them takes any plaintext HTTP) |
//! | anything else (the connect programs' decisions, proxy or fast-path connections without a usable name, names whose address failed the destination check) | `IP` (or `CIDR`, see below) with the dialled port, protocol `tcp` (MeshPassthrough has no UDP protocol: an IP/CIDR match covers UDP too) |
//! | raw and ping sockets (no port) | `IP` without a port (only port-less matches cover them) |
//!
//! Names are kept exact unless the user names a suffix to collapse (`wildcard_suffixes`):
//! names below it (not the suffix itself) seen on one port and protocol become `*.suffix` when
//! at least `wildcard_threshold` distinct ones were seen. Addresses are kept exact unless
//! aggregation is allowed (`aggregate_v4` / `aggregate_v6` < 32 / 128): the addresses of one
//! port that share a `/aggregate` network become the smallest CIDR covering them, never wider.
//!
//! Which records count: allowed and would-be-denied (`--audit`) decisions of named workloads;
//! enforced denials only with `include_denied` (by default a denial is taken as intended).
//! Decisions that are not egress (loopback, internal ranges, DNS resolvers, the agent's own
//! sockets) are never written into a policy.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;

use super::{L7, Protocol, decision_log::DecisionRecord, validate::is_dns_name};

/// How records become matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuggestOptions {
    /// The mesh the policies are for (`kuma.io/mesh` label).
    pub mesh: String,
    /// Suffixes whose names may be collapsed into `*.suffix`.
    pub wildcard_suffixes: Vec<String>,
    /// Distinct names below a suffix (on one port and protocol) needed to collapse them.
    pub wildcard_threshold: usize,
    /// Widest IPv4 aggregate (32: none).
    pub aggregate_v4: u8,
    /// Widest IPv6 aggregate (128: none).
    pub aggregate_v6: u8,
    /// Also allow what was denied under enforcement.
    pub include_denied: bool,
    /// Only these workloads (empty: all).
    pub workloads: Vec<String>,
}

impl Default for SuggestOptions {
    fn default() -> Self {
        Self {
            mesh: "default".into(),
            wildcard_suffixes: Vec::new(),
            wildcard_threshold: 3,
            aggregate_v4: 32,
            aggregate_v6: 128,
            include_denied: false,
            workloads: Vec::new(),
        }
    }
}

/// What one record asks the policy to allow.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Seen {
    /// A name the proxy judged.
    Domain {
        /// The name as the policy must write it (lowercase; a Host's `:port` removed).
        name: String,
        /// The dialled port.
        port: u16,
        /// Its protocol: `Tls`, or plaintext HTTP (`Http`, `Http2`, `Grpc`).
        protocol: Protocol,
    },
    /// An address (and port; `None` for raw and ping sockets, which have none).
    Address {
        /// The dialled address (IPv4-mapped as IPv4).
        ip: IpAddr,
        /// The dialled port.
        port: Option<u16>,
    },
}

/// Why a record was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Skipped {
    /// The socket belonged to no workload.
    NoWorkload,
    /// Not egress (loopback, internal, resolver, the agent's own).
    NotEgress,
    /// An enforced denial (without `include_denied`).
    Denied,
    /// A workload that was not asked for.
    OtherWorkload,
    /// A verdict or path this version does not know.
    Unknown,
}

impl Skipped {
    /// A few words for the summary.
    pub fn describe(self) -> &'static str {
        match self {
            Skipped::NoWorkload => "in no workload",
            Skipped::NotEgress => "not egress (loopback, internal, resolver, agent)",
            Skipped::Denied => "denied under enforcement (--include-denied to allow them)",
            Skipped::OtherWorkload => "of other workloads",
            Skipped::Unknown => "of an unknown verdict",
        }
    }
}

/// Reasons of decisions that are not egress and never go into a policy (current codes and the
/// kernel counter names of earlier versions).
const NOT_EGRESS: [&str; 8] = [
    "loopback",
    "internal",
    "resolver",
    "agent",
    "allow_loopback",
    "allow_internal",
    "allow_dns",
    "allow_agent",
];

/// What `record` asks for, or why it is not used.
pub fn seen(record: &DecisionRecord, opts: &SuggestOptions) -> Result<Seen, Skipped> {
    if record.workload.is_empty() {
        return Err(Skipped::NoWorkload);
    }
    if !opts.workloads.is_empty() && !opts.workloads.contains(&record.workload) {
        return Err(Skipped::OtherWorkload);
    }
    if NOT_EGRESS.contains(&record.reason.as_str()) {
        return Err(Skipped::NotEgress);
    }
    match record.verdict.as_str() {
        "allow" | "would_deny" => {}
        "deny" if opts.include_denied => {}
        "deny" => return Err(Skipped::Denied),
        _ => return Err(Skipped::Unknown),
    }
    let ip = match record.dst.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let address = Seen::Address {
        ip,
        port: (!is_portless(&record.protocol)).then_some(record.dst.port()),
    };
    // The names come from the proxy and from the TLS fast path's judge in the kernel
    // (`kernel-sni`), which judges the same ClientHello under the same Domain matches.
    if !matches!(record.path.as_str(), "proxy" | "kernel-sni")
        || record.reason == "destination_check"
    {
        // A name refused because the dialled address is not one of its addresses would be
        // refused again under a Domain match: only the address itself can allow it.
        return Ok(address);
    }
    let Some((name, protocol)) = proxy_name(record) else {
        return Ok(address);
    };
    Ok(Seen::Domain {
        name,
        port: record.dst.port(),
        protocol,
    })
}

/// Raw and ping sockets: the backstop judges their packets without a port.
fn is_portless(protocol: &str) -> bool {
    protocol == "ping" || protocol.starts_with("raw")
}

/// The name a Domain match must carry for a proxy record, and the protocol it is judged
/// under; `None` when the record has no name a Domain match can allow.
fn proxy_name(record: &DecisionRecord) -> Option<(String, Protocol)> {
    let (raw, protocol) = match record.protocol.as_str() {
        "tls" => (record.sni.as_deref()?, Protocol::Tls),
        "http1" => (record.host.as_deref()?, Protocol::Http),
        "h2c" => (record.host.as_deref()?, Protocol::Http2),
        "grpc" => (record.host.as_deref()?, Protocol::Grpc),
        _ => return None,
    };
    let mut name = raw.to_ascii_lowercase();
    if protocol != Protocol::Tls {
        // A Host's port must be the dialled one to match a named Domain match; drop it.
        if let Some((h, p)) = name.rsplit_once(':') {
            if p.parse::<u16>().ok() != Some(record.dst.port()) || h.contains(':') {
                return None;
            }
            name = h.to_string();
        }
    }
    is_dns_name(&name).then_some((name, protocol))
}

/// One suggested policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    /// The workload it selects.
    pub workload: String,
    /// `metadata.name`.
    pub name: String,
    /// The matches, in the order written.
    pub matches: Vec<SuggestedMatch>,
    /// Records it was made from.
    pub records: usize,
    /// Earliest and latest record time.
    pub span: (String, String),
    /// The YAML document.
    pub yaml: String,
}

/// One `appendMatch` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SuggestedMatch {
    /// `Domain`, `IP` or `CIDR`.
    pub kind: &'static str,
    /// The value.
    pub value: String,
    /// The port (`None`: every port).
    pub port: Option<u16>,
    /// The protocol.
    pub protocol: Protocol,
    /// How many distinct observed names or addresses it stands for.
    pub covers: usize,
}

/// Everything [`suggest`] produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuggestReport {
    /// One per workload, by workload name.
    pub policies: Vec<Suggestion>,
    /// Records not used, by why.
    pub skipped: BTreeMap<Skipped, usize>,
}

/// The policies allowing what `records` saw.
pub fn suggest(records: &[DecisionRecord], opts: &SuggestOptions) -> SuggestReport {
    let mut report = SuggestReport::default();
    struct Acc {
        seen: BTreeSet<Seen>,
        records: usize,
        first: String,
        last: String,
    }
    let mut per: BTreeMap<&str, Acc> = BTreeMap::new();
    for r in records {
        match seen(r, opts) {
            Ok(s) => {
                let a = per.entry(r.workload.as_str()).or_insert_with(|| Acc {
                    seen: BTreeSet::new(),
                    records: 0,
                    first: r.time.clone(),
                    last: r.time.clone(),
                });
                a.seen.insert(s);
                a.records += 1;
                if r.time < a.first {
                    a.first = r.time.clone();
                }
                if r.time > a.last {
                    a.last = r.time.clone();
                }
            }
            Err(why) => *report.skipped.entry(why).or_default() += 1,
        }
    }
    for (workload, acc) in per {
        let matches = matches_for(&acc.seen, opts);
        let name = policy_name(workload);
        let yaml = render(
            workload,
            &name,
            &matches,
            acc.records,
            (&acc.first, &acc.last),
            opts,
        );
        report.policies.push(Suggestion {
            workload: workload.to_string(),
            name,
            matches,
            records: acc.records,
            span: (acc.first, acc.last),
            yaml,
        });
    }
    report
}

/// The matches allowing `seen`: names (collapsed as asked), then addresses (aggregated as
/// allowed).
fn matches_for(seen: &BTreeSet<Seen>, opts: &SuggestOptions) -> Vec<SuggestedMatch> {
    // Names by (port, TLS or plaintext HTTP), with the HTTP protocols seen on the port.
    type Names<'a> = BTreeMap<(u16, bool), (BTreeSet<&'a str>, BTreeSet<Protocol>)>;
    let mut names: Names = BTreeMap::new();
    let mut addrs: BTreeMap<Option<u16>, BTreeSet<IpAddr>> = BTreeMap::new();
    for s in seen {
        match s {
            Seen::Domain {
                name,
                port,
                protocol,
            } => {
                let e = names
                    .entry((*port, *protocol == Protocol::Tls))
                    .or_default();
                e.0.insert(name);
                e.1.insert(*protocol);
            }
            Seen::Address { ip, port } => {
                addrs.entry(*port).or_default().insert(*ip);
            }
        }
    }
    let suffixes: Vec<String> = opts
        .wildcard_suffixes
        .iter()
        .map(|s| {
            s.trim_start_matches("*.")
                .trim_matches('.')
                .to_ascii_lowercase()
        })
        .filter(|s| !s.is_empty())
        .collect();
    let mut out = Vec::new();
    for ((port, tls), (set, protocols)) in names {
        let protocol = if tls {
            Protocol::Tls
        } else if protocols.len() == 1 {
            *protocols.iter().next().expect("one")
        } else {
            Protocol::Http
        };
        // Each name under its longest listed suffix; collapse groups at the threshold.
        let mut groups: BTreeMap<Option<&str>, Vec<&str>> = BTreeMap::new();
        for n in &set {
            let under = suffixes
                .iter()
                .filter(|s| n.len() > s.len() + 1 && n.ends_with(&format!(".{s}")))
                .max_by_key(|s| s.len())
                .map(String::as_str);
            groups.entry(under).or_default().push(n);
        }
        for (suffix, members) in groups {
            match suffix {
                Some(s) if members.len() >= opts.wildcard_threshold.max(1) => {
                    out.push(SuggestedMatch {
                        kind: "Domain",
                        value: format!("*.{s}"),
                        port: Some(port),
                        protocol,
                        covers: members.len(),
                    })
                }
                _ => out.extend(members.into_iter().map(|n| SuggestedMatch {
                    kind: "Domain",
                    value: n.to_string(),
                    port: Some(port),
                    protocol,
                    covers: 1,
                })),
            }
        }
    }
    for (port, ips) in addrs {
        for (net, covers) in aggregate(&ips, opts.aggregate_v4, opts.aggregate_v6) {
            let host = net.prefix_len() == net.max_prefix_len();
            out.push(SuggestedMatch {
                kind: if host { "IP" } else { "CIDR" },
                value: if host {
                    net.addr().to_string()
                } else {
                    net.to_string()
                },
                port,
                protocol: Protocol::Tcp,
                covers,
            });
        }
    }
    out
}

/// The addresses as networks: those sharing a `/v4` (`/v6`) network become the smallest network
/// covering them (never wider than that), each with how many addresses it stands for.
fn aggregate(ips: &BTreeSet<IpAddr>, v4: u8, v6: u8) -> Vec<(IpNet, usize)> {
    let mut groups: BTreeMap<IpNet, Vec<IpAddr>> = BTreeMap::new();
    for ip in ips {
        let widest = match ip {
            IpAddr::V4(_) => v4.min(32),
            IpAddr::V6(_) => v6.min(128),
        };
        let key = IpNet::new(*ip, widest)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(*ip));
        groups.entry(key).or_default().push(*ip);
    }
    groups
        .into_iter()
        .map(|(outer, members)| {
            let (lo, hi) = (members[0], members[members.len() - 1]);
            let common = match (lo, hi) {
                (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) ^ u32::from(b)).leading_zeros(),
                (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a) ^ u128::from(b)).leading_zeros(),
                _ => 0,
            } as u8;
            let len = common.max(outer.prefix_len());
            let net = IpNet::new(lo, len).map(|n| n.trunc()).unwrap_or(outer);
            (net, members.len())
        })
        .collect()
}

/// `metadata.name` for a workload: `passthrough-suggested-<name>` in the characters Kubernetes
/// names allow (lowercase alphanumerics, `-`, `.`; at most 253), the namespace of a
/// `namespace/name` workload left out (it goes to `metadata.namespace`).
pub fn policy_name(workload: &str) -> String {
    let base = workload.rsplit('/').next().unwrap_or(workload);
    let mut s = String::from("passthrough-suggested-");
    for c in base.chars() {
        let c = c.to_ascii_lowercase();
        s.push(if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
            c
        } else {
            '-'
        });
    }
    s.truncate(253);
    while s.ends_with(['-', '.']) {
        s.pop();
    }
    s
}

/// A YAML double-quoted scalar.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render(
    workload: &str,
    name: &str,
    matches: &[SuggestedMatch],
    records: usize,
    span: (&str, &str),
    opts: &SuggestOptions,
) -> String {
    let mut y = String::new();
    let (namespace, dataplane) = match workload.split_once('/') {
        Some((ns, pod)) => (Some(ns), pod),
        None => (None, workload),
    };
    let _ = writeln!(
        y,
        "# Suggested by `passthrough suggest` for workload {workload:?} from {records} observed \
         decision{} ({:?} .. {:?}).",
        if records == 1 { "" } else { "s" },
        span.0,
        span.1
    );
    let _ = writeln!(
        y,
        "# It allows exactly what was seen: review it, then enforce it (README, \"From audit to policy\")."
    );
    if namespace.is_some() {
        let _ = writeln!(
            y,
            "# A pod name changes with every rollout: for a Deployment, select its pods by labels instead."
        );
    }
    y.push_str("apiVersion: kuma.io/v1alpha1\nkind: MeshPassthrough\nmetadata:\n");
    let _ = writeln!(y, "  name: {}", quoted(name));
    if let Some(ns) = namespace {
        let _ = writeln!(y, "  namespace: {}", quoted(ns));
    }
    let _ = writeln!(y, "  labels:\n    kuma.io/mesh: {}", quoted(&opts.mesh));
    y.push_str("spec:\n  targetRef:\n    kind: Dataplane\n");
    let _ = writeln!(y, "    name: {}", quoted(dataplane));
    y.push_str("  default:\n    passthroughMode: Matched\n");
    if matches.is_empty() {
        y.push_str("    appendMatch: []\n");
        return y;
    }
    y.push_str("    appendMatch:\n");
    for m in matches {
        let _ = writeln!(y, "      - type: {}", m.kind);
        let _ = writeln!(y, "        value: {}", quoted(&m.value));
        if let Some(p) = m.port {
            let _ = writeln!(y, "        port: {p}");
        }
        let _ = write!(y, "        protocol: {}", m.protocol.as_str());
        if m.covers > 1 {
            let what = if m.kind == "Domain" {
                "names"
            } else {
                "addresses"
            };
            let _ = write!(y, "  # {} {what} seen", m.covers);
        }
        y.push('\n');
    }
    y
}

/// The connection `explain` should allow for a record that [`seen`] used: the destination, UDP
/// or not, and what the proxy read.
pub fn explain_question(record: &DecisionRecord) -> (SocketAddr, bool, Option<L7>) {
    let udp = record.protocol == "udp";
    let l7 = match record.protocol.as_str() {
        "tls" => Some(L7::Tls(record.sni.clone())),
        "http1" => record.host.clone().map(L7::Http1),
        "h2c" | "grpc" => record.host.clone().map(L7::H2c),
        _ => None,
    };
    (record.dst, udp, l7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Connection, DecideOptions, Mode, Workload, decide, load_policy_bytes};

    fn rec(workload: &str, path: &str, verdict: &str, reason: &str, dst: &str) -> DecisionRecord {
        DecisionRecord {
            time: "2026-01-02T03:04:05.000Z".into(),
            workload: workload.into(),
            workload_id: 1,
            path: path.into(),
            verdict: verdict.into(),
            reason: reason.into(),
            dst: dst.parse().unwrap(),
            protocol: "tcp".into(),
            sni: None,
            host: None,
            matched: None,
            pid: 1,
            comm: "x".into(),
            sampled: None,
        }
    }

    fn tls(workload: &str, sni: &str, dst: &str, verdict: &str, reason: &str) -> DecisionRecord {
        DecisionRecord {
            protocol: "tls".into(),
            sni: Some(sni.into()),
            ..rec(workload, "proxy", verdict, reason, dst)
        }
    }

    fn http(workload: &str, proto: &str, host: &str, dst: &str) -> DecisionRecord {
        DecisionRecord {
            protocol: proto.into(),
            host: Some(host.into()),
            ..rec(workload, "proxy", "would_deny", "no_domain_match", dst)
        }
    }

    /// A ClientHello the TLS fast path's judge allowed in the kernel (path `kernel-sni`) asks
    /// for its name as the proxy's does, not for the address it was dialled at; one it refused
    /// before reading a name asks for the address.
    #[test]
    fn kernel_sni_records_ask_for_their_names() {
        let records = vec![
            DecisionRecord {
                path: "kernel-sni".into(),
                ..tls(
                    "web",
                    "Fast.Example.com",
                    "[::ffff:203.0.113.20]:443",
                    "allow",
                    "domain_match",
                )
            },
            DecisionRecord {
                path: "kernel-sni".into(),
                ..tls(
                    "web",
                    "fast.example.com",
                    "[2001:db8::20]:8443",
                    "allow",
                    "domain_match",
                )
            },
            DecisionRecord {
                path: "kernel-sni".into(),
                protocol: "tls".into(),
                ..rec("web", "kernel-sni", "deny", "unjudged", "203.0.113.21:443")
            },
        ];
        let opts = SuggestOptions {
            include_denied: true,
            ..SuggestOptions::default()
        };
        let report = assert_allows_all(&records, &opts);
        let web = &report.policies[0];
        let got: Vec<String> = web
            .matches
            .iter()
            .map(|m| format!("{} {} {:?} {}", m.kind, m.value, m.port, m.protocol))
            .collect();
        assert_eq!(
            got,
            [
                "Domain fast.example.com Some(443) tls",
                "Domain fast.example.com Some(8443) tls",
                "IP 203.0.113.21 Some(443) tcp",
            ],
            "{}",
            web.yaml
        );
    }

    /// The proof the CLI test makes on recorded traffic, on the pure layer: every suggestion
    /// validates, and the decision core allows every record it was made from.
    fn assert_allows_all(records: &[DecisionRecord], opts: &SuggestOptions) -> SuggestReport {
        let report = suggest(records, opts);
        for s in &report.policies {
            let set = load_policy_bytes(
                std::path::Path::new("s.yaml"),
                s.yaml.as_bytes(),
                &opts.mesh,
            )
            .unwrap_or_else(|e| panic!("{e}\n{}", s.yaml));
            let w = Workload {
                name: s.workload.clone(),
                cgroup: Default::default(),
                labels: Default::default(),
            };
            let conf = set.merge_for(&w, Mode::None);
            assert_eq!(conf.mode, Mode::Matched, "{}", s.yaml);
            for r in records
                .iter()
                .filter(|r| r.workload == s.workload && seen(r, opts).is_ok())
            {
                let (dst, udp, l7) = explain_question(r);
                let d = decide(
                    &conf,
                    &Connection { dst, udp, l7 },
                    &DecideOptions::default(),
                );
                assert!(
                    d.verdict.allowed(),
                    "{r:?} not allowed ({:?}) by\n{}",
                    d,
                    s.yaml
                );
            }
        }
        report
    }

    #[test]
    fn names_addresses_ports_and_protocols_as_observed() {
        let records = vec![
            tls(
                "web",
                "API.example.com",
                "203.0.113.7:443",
                "allow",
                "domain_match",
            ),
            tls(
                "web",
                "api.example.com",
                "203.0.113.8:443",
                "allow",
                "domain_match",
            ),
            tls(
                "web",
                "other.test",
                "203.0.113.9:8443",
                "would_deny",
                "no_domain_match",
            ),
            http("web", "http1", "web.test:80", "203.0.113.7:80"),
            http("web", "h2c", "h2.test", "203.0.113.7:8080"),
            rec(
                "web",
                "kernel",
                "allow",
                "address_match",
                "198.51.100.7:5432",
            ),
            rec(
                "web",
                "kernel",
                "would_deny",
                "no_match",
                "[::ffff:198.51.100.8]:5432",
            ),
            DecisionRecord {
                protocol: "udp".into(),
                ..rec(
                    "web",
                    "kernel",
                    "would_deny",
                    "udp_not_covered",
                    "[2001:db8::53]:5353",
                )
            },
            DecisionRecord {
                protocol: "ping".into(),
                ..rec("web", "kernel", "would_deny", "no_match", "192.0.2.9:0")
            },
            // A spoofed name: only its address can allow it.
            tls(
                "web",
                "api.example.com",
                "203.0.113.66:443",
                "would_deny",
                "destination_check",
            ),
            // No SNI: its address.
            DecisionRecord {
                protocol: "tls".into(),
                ..rec("web", "proxy", "would_deny", "no_sni", "203.0.113.10:443")
            },
            // A Host whose port is not the dialled one matches no Domain match: its address.
            http("web", "http1", "web.test:9999", "203.0.113.11:80"),
            // Not used.
            rec("web", "kernel", "deny", "no_match", "203.0.113.99:22"),
            rec("", "kernel", "would_deny", "no_match", "203.0.113.98:22"),
            rec("web", "kernel", "allow", "internal", "10.0.0.1:22"),
            rec(
                "db",
                "kernel",
                "would_deny",
                "mode_none",
                "203.0.113.50:443",
            ),
        ];
        let report = assert_allows_all(&records, &SuggestOptions::default());
        assert_eq!(report.policies.len(), 2);
        let web = report
            .policies
            .iter()
            .find(|p| p.workload == "web")
            .unwrap();
        let got: Vec<String> = web
            .matches
            .iter()
            .map(|m| {
                format!(
                    "{} {} {} {}",
                    m.kind,
                    m.value,
                    m.port.map_or("any".into(), |p| p.to_string()),
                    m.protocol
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                "Domain web.test 80 http",
                "Domain api.example.com 443 tls",
                "Domain h2.test 8080 http2",
                "Domain other.test 8443 tls",
                "IP 192.0.2.9 any tcp",
                "IP 203.0.113.11 80 tcp",
                "IP 203.0.113.10 443 tcp",
                "IP 203.0.113.66 443 tcp",
                "IP 2001:db8::53 5353 tcp",
                "IP 198.51.100.7 5432 tcp",
                "IP 198.51.100.8 5432 tcp",
            ]
        );
        assert_eq!(web.records, 12);
        assert_eq!(report.skipped.get(&Skipped::Denied), Some(&1));
        assert_eq!(report.skipped.get(&Skipped::NoWorkload), Some(&1));
        assert_eq!(report.skipped.get(&Skipped::NotEgress), Some(&1));
        // With --include-denied the enforced denial is allowed too.
        let all = assert_allows_all(
            &records,
            &SuggestOptions {
                include_denied: true,
                ..Default::default()
            },
        );
        let web = all.policies.iter().find(|p| p.workload == "web").unwrap();
        assert!(web.matches.iter().any(|m| m.value == "203.0.113.99"));
    }

    #[test]
    fn wildcards_only_where_asked_and_at_the_threshold() {
        let records: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| {
                tls(
                    "w",
                    &format!("{n}.s3.example.com"),
                    "203.0.113.7:443",
                    "allow",
                    "domain_match",
                )
            })
            .chain([
                tls(
                    "w",
                    "s3.example.com",
                    "203.0.113.7:443",
                    "allow",
                    "domain_match",
                ),
                tls(
                    "w",
                    "x.y.other.com",
                    "203.0.113.7:443",
                    "allow",
                    "domain_match",
                ),
                tls(
                    "w",
                    "z.other.com",
                    "203.0.113.7:443",
                    "allow",
                    "domain_match",
                ),
            ])
            .collect();
        let values = |opts: &SuggestOptions| -> Vec<String> {
            assert_allows_all(&records, opts).policies[0]
                .matches
                .iter()
                .map(|m| m.value.clone())
                .collect()
        };
        // Not asked: every name exact.
        assert_eq!(values(&SuggestOptions::default()).len(), 6);
        let asked = SuggestOptions {
            wildcard_suffixes: vec!["s3.example.com".into(), "*.other.com".into()],
            ..Default::default()
        };
        // Three below s3.example.com collapse (the apex stays); two below other.com do not.
        assert_eq!(
            values(&asked),
            [
                "s3.example.com",
                "x.y.other.com",
                "z.other.com",
                "*.s3.example.com"
            ]
        );
        let lower = SuggestOptions {
            wildcard_threshold: 2,
            ..asked
        };
        assert_eq!(
            values(&lower),
            ["s3.example.com", "*.other.com", "*.s3.example.com"]
        );
    }

    #[test]
    fn addresses_aggregate_only_as_far_as_allowed() {
        let records: Vec<_> = [
            "198.51.100.1:443",
            "198.51.100.2:443",
            "198.51.100.130:443",
            "203.0.113.5:443",
            "198.51.100.1:80",
            "[2001:db8::1]:443",
            "[2001:db8::ff]:443",
        ]
        .iter()
        .map(|d| rec("w", "kernel", "would_deny", "no_match", d))
        .collect();
        let values = |v4, v6| -> Vec<String> {
            assert_allows_all(
                &records,
                &SuggestOptions {
                    aggregate_v4: v4,
                    aggregate_v6: v6,
                    ..Default::default()
                },
            )
            .policies[0]
                .matches
                .iter()
                .map(|m| format!("{}:{}", m.value, m.port.unwrap_or(0)))
                .collect()
        };
        assert_eq!(values(32, 128).len(), 7);
        // /25: .1 and .2 share 198.51.100.0/25 → the smallest cover, /30; .130 is alone.
        assert_eq!(
            values(25, 128),
            [
                "198.51.100.1:80",
                "198.51.100.0/30:443",
                "198.51.100.130:443",
                "203.0.113.5:443",
                "2001:db8::1:443",
                "2001:db8::ff:443"
            ]
        );
        // /24: all three of 198.51.100.x at 443 → /24; IPv6 /120 → 2001:db8::/120.
        assert_eq!(
            values(24, 120),
            [
                "198.51.100.1:80",
                "198.51.100.0/24:443",
                "203.0.113.5:443",
                "2001:db8::/120:443"
            ]
        );
    }

    #[test]
    fn kubernetes_workloads_and_odd_names() {
        let records = vec![
            tls(
                "shop/web-7d9f",
                "api.test",
                "203.0.113.7:443",
                "allow",
                "domain_match",
            ),
            tls(
                "Weird Name@x",
                "api.test",
                "203.0.113.7:443",
                "allow",
                "domain_match",
            ),
            // Names a Domain match cannot carry: addresses instead.
            tls(
                "Weird Name@x",
                "1.2.3.4",
                "203.0.113.8:443",
                "would_deny",
                "ip_literal",
            ),
            tls(
                "Weird Name@x",
                "bad name",
                "203.0.113.9:443",
                "would_deny",
                "bad_name",
            ),
            // A trailing dot is part of the name.
            tls(
                "Weird Name@x",
                "api.test.",
                "203.0.113.7:443",
                "would_deny",
                "no_domain_match",
            ),
        ];
        let report = suggest(&records, &SuggestOptions::default());
        let k8s = &report.policies[1];
        assert_eq!(k8s.workload, "shop/web-7d9f");
        assert!(k8s.yaml.contains("  namespace: \"shop\"\n"), "{}", k8s.yaml);
        assert!(
            k8s.yaml.contains("    name: \"web-7d9f\"\n"),
            "{}",
            k8s.yaml
        );
        assert_eq!(k8s.name, "passthrough-suggested-web-7d9f");
        load_policy_bytes(
            std::path::Path::new("k.yaml"),
            k8s.yaml.as_bytes(),
            "default",
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", k8s.yaml));
        let odd = &report.policies[0];
        assert_eq!(odd.name, "passthrough-suggested-weird-name-x");
        let values: Vec<&str> = odd.matches.iter().map(|m| m.value.as_str()).collect();
        assert_eq!(
            values,
            ["api.test", "api.test.", "203.0.113.8", "203.0.113.9"]
        );
        // explain, by name, against the suggestion: the workloads file form is tested by the CLI.
        assert_allows_all(&records[1..], &SuggestOptions::default());
    }

    #[test]
    fn mixed_plaintext_http_on_one_port_is_one_protocol() {
        let records = vec![
            http("w", "http1", "a.test", "203.0.113.7:8080"),
            http("w", "h2c", "b.test", "203.0.113.7:8080"),
            http("w", "grpc", "c.test", "203.0.113.7:50051"),
        ];
        let report = assert_allows_all(&records, &SuggestOptions::default());
        let protos: Vec<String> = report.policies[0]
            .matches
            .iter()
            .map(|m| format!("{} {}", m.value, m.protocol))
            .collect();
        assert_eq!(protos, ["a.test http", "b.test http", "c.test grpc"]);
    }

    #[test]
    fn nothing_seen_is_no_policy_and_hostile_text_is_quoted() {
        assert!(suggest(&[], &SuggestOptions::default()).policies.is_empty());
        let r = tls(
            "w\"\n: x",
            "api.test",
            "203.0.113.7:443",
            "allow",
            "domain_match",
        );
        let report = assert_allows_all(std::slice::from_ref(&r), &SuggestOptions::default());
        assert!(
            report.policies[0].yaml.contains(r#"name: "w\"\u000a: x""#),
            "{}",
            report.policies[0].yaml
        );
    }
}
