//! Why a connection was allowed, redirected or denied: the one vocabulary of the project.
//!
//! Every place that names a reason derives it from [`Reason`]: the kernel counts decisions in
//! `COUNTERS` at [`crate::counter::decided`] (the reason's number), reports denials with the
//! number in [`crate::DenyEvent::reason`], and the agent turns the number back into the
//! [`Reason`] whose [`Reason::code`] is the `reason` label of every metric, the `reason` field of
//! every deny event and the `rule` of `explain --json`. The proxy's reasons are variants of the
//! same enum, so a denial reads the same whichever path made it.

/// What a reason means for the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Effect {
    /// The connection (or datagram) goes through.
    Allow,
    /// The kernel hands it to the proxy, which decides on the SNI / Host.
    Redirect,
    /// It is refused (unless `--audit` lets it through as a would-be denial).
    Deny,
}

impl Effect {
    /// `allow`, `redirect` or `deny`.
    pub const fn word(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Redirect => "redirect",
            Effect::Deny => "deny",
        }
    }
}

/// Why. The numbers are part of the pinned-map layout (kernel counter indices and
/// [`crate::DenyEvent::reason`]): the kernel's reasons come first, `0..KERNEL_REASONS`; append
/// new reasons, never renumber (or bump [`crate::LAYOUT_VERSION`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Rule 1: a loopback destination (`127.0.0.0/8`, `::1`, their v4-mapped forms).
    Loopback = 0,
    /// Rule 1: inside an `--internal-cidr` range.
    Internal = 1,
    /// Rule 1: the agent's own socket (its `SO_MARK`, from no workload).
    Agent = 2,
    /// Rule 2: mode `All`.
    ModeAll = 3,
    /// Rule 3: an IP/CIDR match covers the address and port.
    AddressMatch = 4,
    /// UDP to a configured DNS resolver (its address and port).
    Resolver = 5,
    /// Rule 2: mode `None`.
    ModeNone = 6,
    /// Rule 5: mode `Matched`, and no match covers the address and port (nor can a Domain
    /// match apply there).
    NoMatch = 7,
    /// Rule 4: only a Domain match could allow it; the proxy decides on the SNI / Host.
    DomainCandidates = 8,
    /// Rule 4 without a proxy: only a Domain match could allow it, but the connection cannot
    /// go through the proxy (proxy off, or no `--proxy-addr` for its network namespace).
    NoProxy = 9,
    /// UDP that no IP/CIDR match covers (Domain matches never cover UDP).
    UdpNotCovered = 10,
    /// A source route (an IPv6 routing header, an IPv4 LSRR/SSRR option) outside mode `All`:
    /// refused at `setsockopt()`, or its packet dropped by the egress backstop.
    SourceRoute = 11,
    /// A kernel worker connecting an MPTCP subflow of a connection with no recorded owner
    /// (opened before the agent attached, or accepted by a workload's MPTCP server).
    SubflowOwnerUnknown = 12,
    /// Proxy: a Domain match allows the SNI / Host.
    DomainMatch = 13,
    /// Proxy: no Domain match of this protocol and port allows the name.
    NoDomainMatch = 14,
    /// Proxy: a TLS ClientHello without SNI.
    NoSni = 15,
    /// Proxy: the SNI / Host is an IP literal.
    IpLiteral = 16,
    /// Proxy: the SNI / Host is empty or malformed.
    BadName = 17,
    /// Proxy: a Domain match allowed the name, but the dialled address is not the name's
    /// (`--domain-destination verify`), or the name did not resolve.
    DestinationCheck = 18,
    /// Proxy: the kernel recorded no original destination for the accepted connection.
    NoOriginalDestination = 19,
    /// Proxy: the ClientHello could not be parsed.
    BadClientHello = 20,
    /// Proxy: the first bytes are neither TLS nor HTTP.
    UnknownProtocol = 21,
    /// Proxy: no decision within the peek size limit.
    TooLarge = 22,
    /// Proxy: no decision within the peek time limit.
    PeekTimeout = 23,
    /// Proxy: an HTTP request without an authority to judge.
    NoAuthority = 24,
    /// Proxy: an HTTP `CONNECT` (tunnels are not proxied).
    Connect = 25,
    /// Proxy: an HTTP protocol upgrade (not proxied).
    Upgrade = 26,
    /// Proxy: an h2c request whose `:authority` and `Host` disagree, or that carries userinfo.
    MalformedAuthority = 27,
}

/// Reasons the kernel programs give: `Reason as u32 < KERNEL_REASONS`.
pub const KERNEL_REASONS: u32 = 13;

impl Reason {
    /// Every reason, in number order.
    pub const ALL: [Reason; 28] = [
        Reason::Loopback,
        Reason::Internal,
        Reason::Agent,
        Reason::ModeAll,
        Reason::AddressMatch,
        Reason::Resolver,
        Reason::ModeNone,
        Reason::NoMatch,
        Reason::DomainCandidates,
        Reason::NoProxy,
        Reason::UdpNotCovered,
        Reason::SourceRoute,
        Reason::SubflowOwnerUnknown,
        Reason::DomainMatch,
        Reason::NoDomainMatch,
        Reason::NoSni,
        Reason::IpLiteral,
        Reason::BadName,
        Reason::DestinationCheck,
        Reason::NoOriginalDestination,
        Reason::BadClientHello,
        Reason::UnknownProtocol,
        Reason::TooLarge,
        Reason::PeekTimeout,
        Reason::NoAuthority,
        Reason::Connect,
        Reason::Upgrade,
        Reason::MalformedAuthority,
    ];

    /// The reason numbered `n` (a counter index or [`crate::DenyEvent::reason`]).
    pub const fn from_u32(n: u32) -> Option<Reason> {
        if (n as usize) < Self::ALL.len() {
            Some(Self::ALL[n as usize])
        } else {
            None
        }
    }

    /// The stable snake_case code: metric label values, event fields, `explain`'s `rule`.
    pub const fn code(self) -> &'static str {
        match self {
            Reason::Loopback => "loopback",
            Reason::Internal => "internal",
            Reason::Agent => "agent",
            Reason::ModeAll => "mode_all",
            Reason::AddressMatch => "address_match",
            Reason::Resolver => "resolver",
            Reason::ModeNone => "mode_none",
            Reason::NoMatch => "no_match",
            Reason::DomainCandidates => "domain_candidates",
            Reason::NoProxy => "no_proxy",
            Reason::UdpNotCovered => "udp_not_covered",
            Reason::SourceRoute => "source_route",
            Reason::SubflowOwnerUnknown => "subflow_owner_unknown",
            Reason::DomainMatch => "domain_match",
            Reason::NoDomainMatch => "no_domain_match",
            Reason::NoSni => "no_sni",
            Reason::IpLiteral => "ip_literal",
            Reason::BadName => "bad_name",
            Reason::DestinationCheck => "destination_check",
            Reason::NoOriginalDestination => "no_original_destination",
            Reason::BadClientHello => "bad_client_hello",
            Reason::UnknownProtocol => "unknown_protocol",
            Reason::TooLarge => "too_large",
            Reason::PeekTimeout => "peek_timeout",
            Reason::NoAuthority => "no_authority",
            Reason::Connect => "connect",
            Reason::Upgrade => "upgrade",
            Reason::MalformedAuthority => "malformed_authority",
        }
    }

    /// What the reason does to the connection.
    pub const fn effect(self) -> Effect {
        match self {
            Reason::Loopback
            | Reason::Internal
            | Reason::Agent
            | Reason::ModeAll
            | Reason::AddressMatch
            | Reason::Resolver
            | Reason::DomainMatch => Effect::Allow,
            Reason::DomainCandidates => Effect::Redirect,
            _ => Effect::Deny,
        }
    }

    /// Whether the kernel programs give this reason (it has a counter).
    pub const fn is_kernel(self) -> bool {
        (self as u32) < KERNEL_REASONS
    }

    /// One sentence for logs and `explain` when nothing more specific is known.
    pub const fn text(self) -> &'static str {
        match self {
            Reason::Loopback => "loopback destination (not egress)",
            Reason::Internal => "internal range (not egress)",
            Reason::Agent => "the agent's own socket",
            Reason::ModeAll => "passthroughMode All",
            Reason::AddressMatch => "an IP/CIDR match covers the address and port",
            Reason::Resolver => "UDP to a configured DNS resolver",
            Reason::ModeNone => "passthroughMode None denies every egress destination",
            Reason::NoMatch => {
                "passthroughMode Matched: no IP/CIDR match allows this destination and no Domain match applies to its port"
            }
            Reason::DomainCandidates => {
                "Domain matches could apply on this port; the proxy decides on the SNI/Host"
            }
            Reason::NoProxy => {
                "only a Domain match could allow it, and the connection cannot go through the proxy (proxy off, no --proxy-addr for this network namespace, or an MPTCP subflow)"
            }
            Reason::UdpNotCovered => {
                "UDP: no IP/CIDR match covers the address and port; Domain matches never cover UDP"
            }
            Reason::SourceRoute => {
                "a source route (IPv6 routing header, IPv4 LSRR/SSRR option) is allowed only in passthroughMode All: its hops could forward the packet anywhere"
            }
            Reason::SubflowOwnerUnknown => {
                "an MPTCP subflow the kernel opened for a connection whose owner was never recorded (opened before the agent attached, or accepted by an MPTCP server)"
            }
            Reason::DomainMatch => "a Domain match allows the name",
            Reason::NoDomainMatch => {
                "no MeshPassthrough Domain match allows the name with this protocol and port"
            }
            Reason::NoSni => "TLS ClientHello without SNI",
            Reason::IpLiteral => "the name is an IP literal",
            Reason::BadName => "the name is not a valid host name",
            Reason::DestinationCheck => "the dialled address is not an address of the name",
            Reason::NoOriginalDestination => "no recorded original destination",
            Reason::BadClientHello => "the TLS ClientHello could not be parsed",
            Reason::UnknownProtocol => "neither TLS nor HTTP",
            Reason::TooLarge => "no decision within the peek size limit",
            Reason::PeekTimeout => "no decision within the peek time limit",
            Reason::NoAuthority => "an HTTP request without an authority",
            Reason::Connect => "CONNECT is not proxied",
            Reason::Upgrade => "protocol upgrades are not proxied",
            Reason::MalformedAuthority => "the request's authority is malformed",
        }
    }
}

impl core::fmt::Display for Reason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::{self, Counter};

    #[test]
    fn numbers_codes_and_counters_are_one_table() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?} out of order in ALL");
            assert_eq!(Reason::from_u32(i as u32), Some(*r));
        }
        assert_eq!(Reason::from_u32(Reason::ALL.len() as u32), None);
        for (i, a) in Reason::ALL.iter().enumerate() {
            for b in &Reason::ALL[i + 1..] {
                assert_ne!(a.code(), b.code());
            }
        }
        // Every kernel reason has its counter; audit slots exist only for denying reasons.
        for r in Reason::ALL.iter().filter(|r| r.is_kernel()) {
            assert_eq!(
                Counter::at(counter::decided(*r)),
                Some(Counter::Decided(*r))
            );
            let audit = Counter::at(counter::audit_let_through(*r));
            assert_eq!(
                audit.is_some(),
                r.effect() == Effect::Deny,
                "{r:?}: {audit:?}"
            );
        }
        assert_eq!(
            Counter::at(counter::EVENTS_DROPPED),
            Some(Counter::EventsDropped)
        );
        assert_eq!(Counter::at(counter::COUNT), None);
    }
}
