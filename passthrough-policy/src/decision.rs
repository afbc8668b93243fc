//! The decision core (README "Decisions", docs/kuma.md): pure, no IO, no clock. Given a
//! workload's merged configuration and one connection it says what happens and which match (or
//! which rule) decided it.
//!
//! Kernel rules, in order:
//! 1. loopback (`127.0.0.0/8`, `::1`, their IPv4-mapped forms) and `--internal-cidr` ranges →
//!    allow; for UDP also the configured DNS resolvers (exact address and port, see
//!    [`Resolver`]);
//! 2. mode `All` → allow, `None` → deny;
//! 3. `Matched`: the first `IP`/`CIDR` match (any protocol) covering the address with a fitting
//!    port → allow in the kernel;
//! 4. UDP stops here → deny (domains never cover UDP);
//! 5. a `Domain` match with a fitting port exists → redirect to the proxy;
//! 6. otherwise deny.
//!
//! IPv4-mapped IPv6 destinations are judged as IPv4 (so IPv6 CIDRs never cover them).
//!
//! At the proxy (when the connection carries an SNI/Host), a `Domain` match allows when its
//! port fits, its protocol fits the traffic and its name matches, as the listener Kuma 2.14
//! generates for the policy decides:
//! - protocol: TLS → `tls`; plaintext HTTP, HTTP/1.x or h2c alike → `http`, `http2` or `grpc`
//!   (Kuma serves every L7 match with one HTTP connection manager whose codec is `AUTO`, on a
//!   filter chain matching the application protocols `http/1.1` and `h2c`:
//!   `pkg/plugins/policies/meshpassthrough/plugin/xds/listeners_filter_chain.go`,
//!   `pkg/xds/envoy/listeners/v3/http_connection_manager_configurer.go`);
//! - a port in the Host / `:authority` must be the dialled port, written as Envoy compares it
//!   (`name:443`, no leading zeros); another port, or an empty one, matches no named Domain
//!   match (Kuma's virtual hosts list `d` and `d:port` only, everything else gets the `503`
//!   `no_match` host). The `*` match is Envoy's catch-all virtual host and takes any Host;
//! - names: case-insensitive; a trailing dot is part of the name (`example.com.` is not
//!   `example.com`: Envoy compares virtual-host domains and TLS server names as written);
//!   `example.com` only itself, `*.example.com` any name below it at any depth (not the apex),
//!   `*` every name. A pattern with several leading `*.` labels (`*.*.example.com`, which
//!   Kuma's validator accepts) needs at least that many labels in front.
//!
//! A missing SNI, an IP literal or a malformed name is denied. Any allowing match allows (no
//! Envoy-style pruning).

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
pub use passthrough_common::Reason;

use super::{
    ip,
    model::{Match, MatchKind, MergedConf, Mode, Protocol},
    resolver::Resolver,
};

/// What the proxy saw in the first bytes of a redirected connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L7 {
    /// A TLS ClientHello; `None` when it carried no SNI.
    Tls(Option<String>),
    /// Plaintext HTTP/1.x with this `Host` (a `:port` suffix must be the dialled port).
    Http1(String),
    /// HTTP/2 with prior knowledge (h2c) with this `:authority` (a `:port` suffix must be the
    /// dialled port).
    H2c(String),
}

/// One connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The destination as dialled.
    pub dst: SocketAddr,
    /// UDP (connected or `sendmsg`) rather than TCP.
    pub udp: bool,
    /// For a decision at the proxy: what it read. `None` = the kernel's view only.
    pub l7: Option<L7>,
}

/// Settings that are not policy: internal ranges and DNS resolvers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecideOptions {
    /// `--internal-cidr` ranges (pod and service CIDRs), always allowed.
    pub internal: Vec<IpNet>,
    /// The configured DNS resolvers; UDP to exactly their address and port is allowed.
    pub resolvers: Vec<Resolver>,
}

/// The outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Allowed by the kernel program; no proxy.
    AllowKernel,
    /// The kernel redirects it to the proxy; the answer depends on SNI/Host.
    RedirectToProxy,
    /// Refused by the kernel program at `connect()`/`sendmsg()`.
    Deny,
    /// Redirected, and the proxy lets it through.
    AllowAtProxy,
    /// Redirected, and the proxy refuses it.
    DenyAtProxy,
}

impl Verdict {
    /// `explain`'s `verdict` (docs/cli.md): `allow`, `deny` or `proxy` (undecided until the proxy sees a name).
    pub fn word(self) -> &'static str {
        match self {
            Verdict::AllowKernel | Verdict::AllowAtProxy => "allow",
            Verdict::Deny | Verdict::DenyAtProxy => "deny",
            Verdict::RedirectToProxy => "proxy",
        }
    }

    /// `explain`'s `path`: `kernel` or `proxy`.
    pub fn path(self) -> &'static str {
        match self {
            Verdict::AllowKernel | Verdict::Deny => "kernel",
            Verdict::RedirectToProxy | Verdict::AllowAtProxy | Verdict::DenyAtProxy => "proxy",
        }
    }

    /// Whether the connection goes through.
    pub fn allowed(self) -> bool {
        matches!(self, Verdict::AllowKernel | Verdict::AllowAtProxy)
    }
}

/// Why, with the particulars `explain` prints (the range, the name). Its [`Reason`] — the one
/// vocabulary the kernel counters, metrics and events use too — is [`ReasonDetail::reason`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum ReasonDetail {
    /// Loopback destination (not egress).
    Loopback,
    /// Inside an `--internal-cidr` range.
    Internal {
        /// The range.
        #[serde(serialize_with = "ser_display")]
        cidr: IpNet,
    },
    /// UDP to a configured DNS resolver.
    Resolver,
    /// Mode `All`.
    ModeAll,
    /// Mode `None`.
    ModeNone,
    /// An `IP`/`CIDR` match covers it.
    AddressMatch,
    /// UDP with no address match (domains never cover UDP).
    UdpNotCovered,
    /// `Domain` matches could apply on this port; the proxy decides on SNI/Host.
    DomainCandidates {
        /// How many.
        count: usize,
    },
    /// Mode `Matched` and nothing matches this address and port.
    NoMatch,
    /// A `Domain` match allows the SNI/Host.
    DomainMatch,
    /// The SNI/Host is matched by no `Domain` match of the right protocol and port.
    NoDomainMatch {
        /// The normalised name.
        name: String,
    },
    /// TLS without SNI.
    NoSni,
    /// The name is an IP literal.
    IpLiteral {
        /// The name as received.
        name: String,
    },
    /// The name is empty or malformed.
    BadName {
        /// The name as received.
        name: String,
    },
}

fn ser_display<S: serde::Serializer>(v: &IpNet, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl ReasonDetail {
    /// The reason without its particulars.
    pub fn reason(&self) -> Reason {
        match self {
            ReasonDetail::Loopback => Reason::Loopback,
            ReasonDetail::Internal { .. } => Reason::Internal,
            ReasonDetail::Resolver => Reason::Resolver,
            ReasonDetail::ModeAll => Reason::ModeAll,
            ReasonDetail::ModeNone => Reason::ModeNone,
            ReasonDetail::AddressMatch => Reason::AddressMatch,
            ReasonDetail::UdpNotCovered => Reason::UdpNotCovered,
            ReasonDetail::DomainCandidates { .. } => Reason::DomainCandidates,
            ReasonDetail::NoMatch => Reason::NoMatch,
            ReasonDetail::DomainMatch => Reason::DomainMatch,
            ReasonDetail::NoDomainMatch { .. } => Reason::NoDomainMatch,
            ReasonDetail::NoSni => Reason::NoSni,
            ReasonDetail::IpLiteral { .. } => Reason::IpLiteral,
            ReasonDetail::BadName { .. } => Reason::BadName,
        }
    }

    /// The stable snake_case code of [`ReasonDetail::reason`] (`loopback`, `address_match`,
    /// `no_match`, …).
    pub fn code(&self) -> &'static str {
        self.reason().code()
    }
}

impl std::fmt::Display for ReasonDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReasonDetail::Loopback => f.write_str("loopback destination (not egress)"),
            ReasonDetail::Internal { cidr } => write!(f, "internal range {cidr} (not egress)"),
            ReasonDetail::Resolver => f.write_str("UDP to a configured DNS resolver"),
            ReasonDetail::ModeAll => f.write_str("passthroughMode All"),
            ReasonDetail::ModeNone => f.write_str("passthroughMode None"),
            ReasonDetail::AddressMatch => {
                f.write_str("an IP/CIDR match covers the address and port")
            }
            ReasonDetail::UdpNotCovered => f.write_str(
                "UDP: no IP/CIDR match covers the address and port; Domain matches never cover UDP",
            ),
            ReasonDetail::DomainCandidates { count } => write!(
                f,
                "{count} Domain match(es) could apply on this port; the proxy decides on the SNI/Host"
            ),
            ReasonDetail::NoMatch => {
                f.write_str("no MeshPassthrough match allows this address and port")
            }
            ReasonDetail::DomainMatch => f.write_str("a Domain match allows the name"),
            ReasonDetail::NoDomainMatch { name } => {
                write!(
                    f,
                    "no MeshPassthrough Domain match allows {name} with this protocol and port"
                )
            }
            ReasonDetail::NoSni => f.write_str("TLS ClientHello without SNI"),
            ReasonDetail::IpLiteral { name } => write!(f, "the name {name} is an IP literal"),
            ReasonDetail::BadName { name } => {
                write!(f, "the name {name:?} is not a valid host name")
            }
        }
    }
}

/// A decision and what made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'a> {
    /// The outcome.
    pub verdict: Verdict,
    /// The rule that decided.
    pub reason: ReasonDetail,
    /// The deciding match, when a match decided.
    pub matched: Option<&'a Match>,
    /// For a redirect: the `Domain` matches that could apply.
    pub candidates: Vec<&'a Match>,
}

/// The TLS fast path's part of the decision (`--tls-fast-path=on`): whether a TCP connection
/// that rule 4 sends to the proxy may instead go directly, its ClientHello judged in the
/// kernel (path `kernel-sni`): every `Domain` match that could apply at its port (port-less
/// ones included) is `tls`, so its first bytes decide, once, on the SNI. HTTP, h2c and gRPC
/// matches are judged per request and keep their port on the proxy. The kernel applies the
/// same rule (the plan's `non_tls_ports`, a bit of `DOMAIN_PORTS`), and one more condition
/// that is runtime state, not policy: the destination must be a verified address of an allowed
/// name. The verdict on the name is the same on both paths.
pub fn tls_fast_path_candidate(conn: &Connection, d: &Decision<'_>) -> bool {
    !conn.udp
        && matches!(
            d.verdict,
            Verdict::RedirectToProxy | Verdict::AllowAtProxy | Verdict::DenyAtProxy
        )
        && !d.candidates.is_empty()
        && d.candidates.iter().all(|m| m.protocol == Protocol::Tls)
}

impl<'a> Decision<'a> {
    fn new(verdict: Verdict, reason: ReasonDetail) -> Self {
        Decision {
            verdict,
            reason,
            matched: None,
            candidates: Vec::new(),
        }
    }
}

/// Whether an address is loopback (IPv4-mapped included).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip::canonical_ip(ip).is_loopback()
}

fn in_net(net: &IpNet, ip: IpAddr) -> bool {
    let net = ip::canonical_net(net.addr(), net.prefix_len()).unwrap_or(*net);
    net.contains(&ip)
}

/// Decides one connection for a workload whose merged configuration is `conf`.
pub fn decide<'a>(conf: &'a MergedConf, conn: &Connection, opts: &DecideOptions) -> Decision<'a> {
    decide_inner(conf, conn, opts, true)
}

/// The proxy's decision for a connection the kernel already redirected: as [`decide`], but
/// rule 1 (loopback, internal ranges) is not applied again, since the kernel only redirects
/// egress. (This also lets the proxy be tested against loopback upstreams.)
pub fn decide_at_proxy<'a>(
    conf: &'a MergedConf,
    conn: &Connection,
    opts: &DecideOptions,
) -> Decision<'a> {
    decide_inner(conf, conn, opts, false)
}

fn decide_inner<'a>(
    conf: &'a MergedConf,
    conn: &Connection,
    opts: &DecideOptions,
    local_rules: bool,
) -> Decision<'a> {
    let ip = ip::canonical_ip(conn.dst.ip());
    let port = conn.dst.port();
    if local_rules && ip.is_loopback() {
        return Decision::new(Verdict::AllowKernel, ReasonDetail::Loopback);
    }
    if let Some(cidr) = opts.internal.iter().find(|n| local_rules && in_net(n, ip)) {
        return Decision::new(Verdict::AllowKernel, ReasonDetail::Internal { cidr: *cidr });
    }
    if conn.udp
        && opts
            .resolvers
            .iter()
            .any(|r| ip::canonical_ip(r.ip()) == ip && r.port() == port)
    {
        return Decision::new(Verdict::AllowKernel, ReasonDetail::Resolver);
    }
    match conf.mode {
        Mode::All => return Decision::new(Verdict::AllowKernel, ReasonDetail::ModeAll),
        Mode::None => return Decision::new(Verdict::Deny, ReasonDetail::ModeNone),
        Mode::Matched => {}
    }
    if let Some(m) = conf.matches.iter().find(|m| {
        matches!(m.kind, MatchKind::Ip | MatchKind::Cidr)
            && m.port_fits(port)
            && m.net.is_some_and(|n| n.contains(&ip))
    }) {
        return Decision {
            matched: Some(m),
            ..Decision::new(Verdict::AllowKernel, ReasonDetail::AddressMatch)
        };
    }
    if conn.udp {
        return Decision::new(Verdict::Deny, ReasonDetail::UdpNotCovered);
    }
    let candidates: Vec<&Match> = conf
        .matches
        .iter()
        .filter(|m| m.kind == MatchKind::Domain && m.port_fits(port))
        .collect();
    if candidates.is_empty() {
        return Decision::new(Verdict::Deny, ReasonDetail::NoMatch);
    }
    let Some(l7) = &conn.l7 else {
        return Decision {
            candidates: candidates.clone(),
            ..Decision::new(
                Verdict::RedirectToProxy,
                ReasonDetail::DomainCandidates {
                    count: candidates.len(),
                },
            )
        };
    };
    let (raw, protocols, authority): (&str, &[Protocol], bool) = match l7 {
        L7::Tls(None) => {
            return Decision {
                candidates,
                ..Decision::new(Verdict::DenyAtProxy, ReasonDetail::NoSni)
            };
        }
        L7::Tls(Some(sni)) => (sni, &[Protocol::Tls], false),
        // Either codec meets every L7 match (see the module doc).
        L7::Http1(host) | L7::H2c(host) => (host, L7_PROTOCOLS, true),
    };
    let name = match normalize_name(raw, authority) {
        Ok(n) => n,
        Err(reason) => {
            return Decision {
                candidates,
                ..Decision::new(Verdict::DenyAtProxy, reason)
            };
        }
    };
    // Kuma's virtual hosts for a Domain `d` on port P are `d` and `d:P`
    // (`listeners_filter_chain.go`): a Host naming another port reaches the `no_match` host.
    let host_port = if authority { authority_port(raw) } else { None };
    let port_fits = host_port.is_none_or(|p| p == port.to_string());
    match candidates.iter().find(|m| {
        protocols.contains(&m.protocol)
            && (&*m.value == "*" || (port_fits && domain_matches(&m.value, &name)))
    }) {
        Some(m) => Decision {
            matched: Some(*m),
            candidates: candidates.clone(),
            ..Decision::new(Verdict::AllowAtProxy, ReasonDetail::DomainMatch)
        },
        None => {
            let name = match host_port {
                Some(p) => format!("{name}:{p}"),
                None => name,
            };
            Decision {
                candidates,
                ..Decision::new(Verdict::DenyAtProxy, ReasonDetail::NoDomainMatch { name })
            }
        }
    }
}

/// The protocols of the matches that plaintext HTTP (HTTP/1.x or h2c) is judged against.
const L7_PROTOCOLS: &[Protocol] = &[Protocol::Http, Protocol::Http2, Protocol::Grpc];

/// The port text of an HTTP authority (`host:port`, `[v6]:port`), when it has a `:`; `Some("")`
/// for a bare `host:`.
pub fn authority_port(raw: &str) -> Option<&str> {
    let s = raw.trim();
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once("]:").map(|(_, p)| p);
    }
    match s.rsplit_once(':') {
        Some((host, p)) if !host.contains(':') => Some(p),
        _ => None,
    }
}

/// Normalises an SNI or Host: strips a `:port` (Host only; [`authority_port`] reads it),
/// lower-cases; a trailing dot stays (it makes another name); rejects IP literals, empty and
/// malformed names (empty labels, characters outside `[A-Za-z0-9_-]`).
///
/// An SNI is taken as sent: a `server_name` with a space, tab or other whitespace around the
/// name is not a host name (a server would not read it as one either), and the kernel's judge
/// (`passthrough_common::sni`) refuses it the same way. A Host has its surrounding whitespace
/// stripped.
pub fn normalize_name(raw: &str, strip_port: bool) -> Result<String, ReasonDetail> {
    let mut s = if strip_port { raw.trim() } else { raw };
    if strip_port {
        if let Some(rest) = s.strip_prefix('[') {
            // [v6]:port or [v6]
            let inner = rest.split(']').next().unwrap_or(rest);
            if ip::parse_go_ip(inner).is_some() {
                return Err(ReasonDetail::IpLiteral {
                    name: raw.to_string(),
                });
            }
            return Err(ReasonDetail::BadName {
                name: raw.to_string(),
            });
        }
        if let Some((host, p)) = s.rsplit_once(':')
            && !host.contains(':')
            && (p.is_empty() || p.bytes().all(|b| b.is_ascii_digit()))
        {
            s = host;
        }
    }
    if ip::parse_go_ip(s).is_some() || ip::parse_go_ip(s.trim_end_matches('.')).is_some() {
        return Err(ReasonDetail::IpLiteral {
            name: raw.to_string(),
        });
    }
    let labels = s.strip_suffix('.').unwrap_or(s);
    let ok = !labels.is_empty()
        && labels.len() <= 253
        && labels.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(ReasonDetail::BadName {
            name: raw.to_string(),
        });
    }
    Ok(s.to_ascii_lowercase())
}

/// A Domain pattern's leading wildcard labels (`*.` each; a lone `*` counts as one) and the
/// rest. The kernel's SNI tables (`sni_plan`) split patterns here too, so both read alike.
pub(crate) fn wildcard_prefix(pattern: &str) -> (usize, &str) {
    let mut rest = pattern;
    let mut stars = 0;
    loop {
        if rest == "*" {
            return (stars + 1, "");
        }
        match rest.strip_prefix("*.") {
            Some(r) => {
                stars += 1;
                rest = r;
            }
            None => return (stars, rest),
        }
    }
}

/// Whether a `Domain` match value matches a normalised name (see the module doc): ASCII case
/// aside, a trailing dot on either side must be on both.
pub fn domain_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let name = name.to_ascii_lowercase();
    if name.is_empty() {
        return false;
    }
    let (stars, rest) = wildcard_prefix(&pattern);
    let name_labels: Vec<&str> = name.split('.').collect();
    let rest_labels: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('.').collect()
    };
    if rest_labels.iter().any(|l| l.contains('*')) {
        return false;
    }
    if stars == 0 {
        return name_labels == rest_labels;
    }
    name_labels.len() >= stars + rest_labels.len() && name_labels.ends_with(&rest_labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(domain_matches("example.com", "example.com"));
        assert!(domain_matches("EXAMPLE.com.", "Example.COM."));
        // A trailing dot makes another name, on either side (Envoy compares them as written).
        assert!(!domain_matches("example.com", "example.com."));
        assert!(!domain_matches("example.com.", "example.com"));
        assert!(!domain_matches("*.example.com", "a.example.com."));
        assert!(domain_matches("*.example.com.", "a.example.com."));
        assert!(!domain_matches("*.example.com.", "example.com."));
        assert!(domain_matches("*", "example.com."));
        assert!(!domain_matches("example.com", "a.example.com"));
        assert!(domain_matches("*.example.com", "a.example.com"));
        assert!(domain_matches("*.example.com", "a.b.c.example.com"));
        assert!(!domain_matches("*.example.com", "example.com"));
        assert!(!domain_matches("*.example.com", "badexample.com"));
        assert!(domain_matches("*", "anything.at.all"));
        assert!(domain_matches("*", "localhost"));
        assert!(domain_matches("*.*.example.com", "a.b.example.com"));
        assert!(!domain_matches("*.*.example.com", "a.example.com"));
        assert!(!domain_matches("**.example.com", "a.example.com"));
    }

    #[test]
    fn authority_ports() {
        assert_eq!(authority_port("a.test"), None);
        assert_eq!(authority_port("a.test:80"), Some("80"));
        assert_eq!(authority_port("a.test:"), Some(""));
        assert_eq!(authority_port("a.test.:0080"), Some("0080"));
        assert_eq!(authority_port("[2001:db8::1]:443"), Some("443"));
        assert_eq!(authority_port("[2001:db8::1]"), None);
        assert_eq!(authority_port("2001:db8::1"), None);
    }

    #[test]
    fn name_normalisation() {
        assert_eq!(
            normalize_name("Example.COM:8080", true).unwrap(),
            "example.com"
        );
        // The trailing dot stays: it is part of the name.
        assert_eq!(
            normalize_name("Example.com.", false).unwrap(),
            "example.com."
        );
        assert_eq!(
            normalize_name("example.com.:80", true).unwrap(),
            "example.com."
        );
        assert!(matches!(
            normalize_name("example.com..", false),
            Err(ReasonDetail::BadName { .. })
        ));
        assert!(matches!(
            normalize_name(".", false),
            Err(ReasonDetail::BadName { .. })
        ));
        let long = format!("{}.", vec!["a".repeat(63); 4].join(".").get(..253).unwrap());
        assert!(normalize_name(&long, false).is_ok(), "253 bytes and a dot");
        assert!(normalize_name(&long[1..], false).is_ok());
        assert!(matches!(
            normalize_name(&format!("b.{long}"), false),
            Err(ReasonDetail::BadName { .. })
        ));
        assert!(matches!(
            normalize_name("1.2.3.4", false),
            Err(ReasonDetail::IpLiteral { .. })
        ));
        assert!(matches!(
            normalize_name("1.2.3.4:80", true),
            Err(ReasonDetail::IpLiteral { .. })
        ));
        assert!(matches!(
            normalize_name("[::1]:80", true),
            Err(ReasonDetail::IpLiteral { .. })
        ));
        assert!(matches!(
            normalize_name("::1", false),
            Err(ReasonDetail::IpLiteral { .. })
        ));
        assert!(matches!(
            normalize_name("", false),
            Err(ReasonDetail::BadName { .. })
        ));
        assert!(matches!(
            normalize_name("a..b", false),
            Err(ReasonDetail::BadName { .. })
        ));
        assert!(matches!(
            normalize_name("a b", false),
            Err(ReasonDetail::BadName { .. })
        ));
        assert!(matches!(
            normalize_name("example.com:443", false),
            Err(ReasonDetail::BadName { .. })
        ));
        // An SNI is not trimmed (a Host is).
        assert!(matches!(
            normalize_name(" example.com", false),
            Err(ReasonDetail::BadName { .. })
        ));
        assert!(matches!(
            normalize_name("example.com\u{3000}", false),
            Err(ReasonDetail::BadName { .. })
        ));
        assert_eq!(
            normalize_name(" example.com ", true).unwrap(),
            "example.com"
        );
    }
}
