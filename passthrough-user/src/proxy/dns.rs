//! The destination check (SPEC §3): is the address the client dialled really the name it sent?
//!
//! [`DomainDestination::Verify`] resolves the concrete name (A and AAAA; also when a wildcard
//! matched) and allows only when the original IP is among the answers; `Resolve` connects to a
//! resolved address instead (the original one when it is among the answers, else the first one
//! of the same family, else the first); `Original` trusts the client and never resolves.
//!
//! Answers, positive and negative, are cached within their TTL by hickory's resolver cache.
//! Names are looked up as absolute names (no search domains).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
};
use thiserror::Error;

/// `--domain-destination`: what the proxy does with the address the client dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DomainDestination {
    /// Allow only when the dialled IP is among the name's DNS answers (default).
    #[default]
    Verify,
    /// Connect to an address the name resolves to, whatever the client dialled.
    Resolve,
    /// Trust the client: connect to the dialled address (Kuma ≤ 2.14).
    Original,
}

/// Why the destination check failed.
#[derive(Debug, Error)]
pub enum DestError {
    /// The lookup failed (no such name, no answer, resolver unreachable).
    #[error("DNS lookup of {name} failed: {message}")]
    Lookup {
        /// The name looked up.
        name: String,
        /// The resolver's error.
        message: String,
    },
    /// The dialled IP is not among the answers.
    #[error("{ip} is not an address of {name} (DNS answers: {answers:?})")]
    NotAnAddress {
        /// The name looked up.
        name: String,
        /// The dialled IP.
        ip: IpAddr,
        /// What DNS said.
        answers: Vec<IpAddr>,
    },
}

/// The destination check: mode plus resolver.
pub struct Destinations {
    mode: DomainDestination,
    resolver: Option<TokioResolver>,
}

impl std::fmt::Debug for Destinations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destinations")
            .field("mode", &self.mode)
            .finish()
    }
}

impl Destinations {
    /// A check in `mode`, resolving with the nameserver `resolver` (UDP, TCP fallback) or the
    /// system's (`/etc/resolv.conf`). `Original` builds no resolver.
    pub fn new(mode: DomainDestination, resolver: Option<SocketAddr>) -> anyhow::Result<Self> {
        if mode == DomainDestination::Original {
            return Ok(Destinations {
                mode,
                resolver: None,
            });
        }
        let provider = TokioRuntimeProvider::default();
        let mut builder = match resolver {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], vec![ns]),
                    provider,
                )
            }
            None => TokioResolver::builder(provider)
                .map_err(|e| anyhow::anyhow!("reading the system DNS configuration: {e}"))?,
        };
        let opts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = Duration::from_secs(3);
        opts.attempts = 2;
        opts.ndots = 0;
        let resolver = builder
            .build()
            .map_err(|e| anyhow::anyhow!("building the DNS resolver: {e}"))?;
        Ok(Destinations {
            mode,
            resolver: Some(resolver),
        })
    }

    /// The mode.
    pub fn mode(&self) -> DomainDestination {
        self.mode
    }

    /// Where to connect for a connection to `orig` that sent the (normalised) `name`.
    pub async fn target(&self, name: &str, orig: SocketAddr) -> Result<SocketAddr, DestError> {
        let Some(resolver) = &self.resolver else {
            return Ok(orig);
        };
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let answers: Vec<IpAddr> = match resolver.lookup_ip(fqdn.as_str()).await {
            Ok(l) => l.iter().map(|ip| ip.to_canonical()).collect(),
            Err(e) => {
                return Err(DestError::Lookup {
                    name: name.to_string(),
                    message: e.to_string(),
                });
            }
        };
        let ip = orig.ip().to_canonical();
        if answers.contains(&ip) {
            return Ok(orig);
        }
        match self.mode {
            DomainDestination::Resolve => {
                let pick = answers
                    .iter()
                    .find(|a| a.is_ipv4() == ip.is_ipv4())
                    .or(answers.first());
                match pick {
                    Some(a) => Ok(SocketAddr::new(*a, orig.port())),
                    None => Err(DestError::Lookup {
                        name: name.to_string(),
                        message: "no addresses".into(),
                    }),
                }
            }
            _ => Err(DestError::NotAnAddress {
                name: name.to_string(),
                ip,
                answers,
            }),
        }
    }
}
