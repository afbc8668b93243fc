//! The destination check (docs/decisions.md, "At the proxy"): is the address the client dialled really the name it sent?
//!
//! [`DomainDestination::Verify`] resolves the concrete name (A and AAAA; also when a wildcard
//! matched) and allows only when the original IP is among the answers; `Resolve` connects to a
//! resolved address instead (the original one when it is among the answers, else the first one
//! of the same family, else the first); `Original` trusts the client and never resolves.
//!
//! Answers, positive and negative, are cached within their TTL by hickory's resolver cache.
//! Positive answers are also kept in [`AnswerCache`], a plain map in front of hickory: a cached
//! name costs one hash lookup per connection instead of hickory's lookup machinery (name parsing,
//! the hosts table, two record sets merged and cloned), which was 5.5% of the agent's CPU per
//! new TLS connection (BENCHMARKS.md). An entry lives no longer than hickory's own (`valid_until`, the
//! smaller TTL of the A and AAAA answers). Names are looked up as absolute names (no search
//! domains).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
};
use passthrough_policy::Resolver;
use thiserror::Error;

/// `--domain-destination`: what the proxy does with the address the client dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DomainDestination {
    /// Allow only when the dialled IP is among the name's DNS answers (default).
    #[default]
    Verify,
    /// Connect to an address the name resolves to, whatever the client dialled.
    Resolve,
    /// Trust the client: connect to the dialled address (Kuma ≤ 2.14).
    Original,
}

impl DomainDestination {
    /// Every mode with its command-line name and what it does (for the CLI's help).
    pub const ALL: [(DomainDestination, &'static str, &'static str); 3] = [
        (
            DomainDestination::Verify,
            "verify",
            "Allow only when the dialled IP is among the name's DNS answers (default)",
        ),
        (
            DomainDestination::Resolve,
            "resolve",
            "Connect to an address the name resolves to, whatever the client dialled",
        ),
        (
            DomainDestination::Original,
            "original",
            "Trust the client: connect to the dialled address (Kuma <= 2.14)",
        ),
    ];

    /// The command-line name (`verify`, `resolve`, `original`).
    pub fn name(self) -> &'static str {
        match self {
            DomainDestination::Verify => "verify",
            DomainDestination::Resolve => "resolve",
            DomainDestination::Original => "original",
        }
    }
}

impl std::fmt::Display for DomainDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DomainDestination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .find(|(_, name, _)| *name == s)
            .map(|(d, _, _)| *d)
            .ok_or_else(|| format!("{s:?} is not one of verify, resolve, original"))
    }
}

/// Why the destination check's DNS resolver could not be built.
#[derive(Debug, Error)]
pub enum ResolverSetupError {
    /// `/etc/resolv.conf` could not be read or understood.
    #[error("reading the system DNS configuration: {0}")]
    SystemConfig(String),
    /// The resolver refused its configuration.
    #[error("building the DNS resolver: {0}")]
    Build(String),
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
    answers: AnswerCache,
}

/// Positive DNS answers by name, each until the instant its TTL ends. Pure: the caller passes
/// the clock. Bounded: an insert into a full cache first drops expired entries and, if none
/// expired, every entry (a workload cycling through names under an allowed wildcard cannot
/// grow it; a dropped name only costs a trip through hickory's cache again). A read-write
/// lock: lookups, the per-connection path, do not wait for each other; only a miss writes.
#[derive(Debug)]
pub struct AnswerCache {
    entries: RwLock<HashMap<Box<str>, CachedAnswer>>,
    capacity: usize,
}

#[derive(Debug, Clone)]
struct CachedAnswer {
    ips: Arc<[IpAddr]>,
    valid_until: Instant,
}

impl AnswerCache {
    /// The default bound on cached names.
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// An empty cache holding at most `capacity` names.
    pub fn new(capacity: usize) -> Self {
        AnswerCache {
            entries: RwLock::new(HashMap::new()),
            capacity,
        }
    }

    /// The answers for `name` if they are still valid at `now`.
    pub fn get(&self, name: &str, now: Instant) -> Option<Arc<[IpAddr]>> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .get(name)
            .filter(|a| now < a.valid_until)
            .map(|a| a.ips.clone())
    }

    /// Keeps `ips` for `name` until `valid_until` (nothing if that is not after `now`).
    pub fn insert(&self, name: &str, ips: Arc<[IpAddr]>, valid_until: Instant, now: Instant) {
        if valid_until <= now || self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity && !entries.contains_key(name) {
            entries.retain(|_, a| now < a.valid_until);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(name.into(), CachedAnswer { ips, valid_until });
    }

    /// Number of names held (expired ones included until they are dropped).
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Destinations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destinations")
            .field("mode", &self.mode)
            .finish()
    }
}

impl Destinations {
    /// A check in `mode`, resolving with the name servers `resolvers` (each at its port; UDP,
    /// TCP fallback) or, when there are none, the system's (`/etc/resolv.conf`). `Original`
    /// builds no resolver.
    pub fn new(
        mode: DomainDestination,
        resolvers: &[Resolver],
    ) -> Result<Self, ResolverSetupError> {
        if mode == DomainDestination::Original {
            return Ok(Destinations {
                mode,
                resolver: None,
                answers: AnswerCache::new(0),
            });
        }
        let provider = TokioRuntimeProvider::default();
        let mut builder = if resolvers.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|e| ResolverSetupError::SystemConfig(e.to_string()))?
        } else {
            let servers = resolvers
                .iter()
                .map(|r| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = r.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = r.port();
                    NameServerConfig::new(r.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], servers),
                provider,
            )
        };
        let opts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = Duration::from_secs(3);
        opts.attempts = 2;
        opts.ndots = 0;
        let resolver = builder
            .build()
            .map_err(|e| ResolverSetupError::Build(e.to_string()))?;
        Ok(Destinations {
            mode,
            resolver: Some(resolver),
            answers: AnswerCache::new(AnswerCache::DEFAULT_CAPACITY),
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
        let name = name.trim_end_matches('.');
        let answers = match self.answers.get(name, Instant::now()) {
            Some(cached) => cached,
            None => match resolver.lookup_ip(format!("{name}.").as_str()).await {
                Ok(l) => {
                    let ips: Arc<[IpAddr]> = l.iter().map(|ip| ip.to_canonical()).collect();
                    self.answers
                        .insert(name, ips.clone(), l.valid_until(), Instant::now());
                    ips
                }
                Err(e) => {
                    return Err(DestError::Lookup {
                        name: name.to_string(),
                        message: e.to_string(),
                    });
                }
            },
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
                answers: answers.to_vec(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Arc<[IpAddr]> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn an_answer_is_served_until_its_ttl_ends_and_not_after() {
        let cache = AnswerCache::new(8);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(30);
        cache.insert("bench.test", ips(&["198.51.100.7"]), t0 + ttl, t0);
        assert_eq!(
            cache
                .get("bench.test", t0 + ttl - Duration::from_millis(1))
                .as_deref(),
            Some(&ips(&["198.51.100.7"])[..])
        );
        assert_eq!(cache.get("bench.test", t0 + ttl), None);
        assert_eq!(cache.get("other.test", t0), None);
        // A fresh answer replaces the old one.
        cache.insert("bench.test", ips(&["203.0.113.9"]), t0 + 2 * ttl, t0 + ttl);
        assert_eq!(
            cache.get("bench.test", t0 + ttl).as_deref(),
            Some(&ips(&["203.0.113.9"])[..])
        );
    }

    #[test]
    fn an_answer_already_expired_is_not_kept() {
        let cache = AnswerCache::new(8);
        let t0 = Instant::now();
        cache.insert("a.test", ips(&["198.51.100.1"]), t0, t0);
        assert!(cache.is_empty());
        let off = AnswerCache::new(0);
        off.insert(
            "a.test",
            ips(&["198.51.100.1"]),
            t0 + Duration::from_secs(5),
            t0,
        );
        assert!(off.is_empty());
    }

    #[test]
    fn a_full_cache_drops_expired_names_first_and_never_grows_past_its_bound() {
        let cache = AnswerCache::new(3);
        let t0 = Instant::now();
        let short = t0 + Duration::from_secs(1);
        let long = t0 + Duration::from_secs(60);
        cache.insert("a.test", ips(&["198.51.100.1"]), short, t0);
        cache.insert("b.test", ips(&["198.51.100.2"]), long, t0);
        cache.insert("c.test", ips(&["198.51.100.3"]), long, t0);
        // At t0 + 2 s a.test has expired: it makes room, b and c stay.
        let t2 = t0 + Duration::from_secs(2);
        cache.insert("d.test", ips(&["198.51.100.4"]), long, t2);
        assert_eq!(cache.len(), 3);
        assert!(cache.get("b.test", t2).is_some());
        assert!(cache.get("c.test", t2).is_some());
        assert!(cache.get("d.test", t2).is_some());
        // Nothing expired: the cache starts over rather than grow.
        cache.insert("e.test", ips(&["198.51.100.5"]), long, t2);
        assert_eq!(cache.len(), 1);
        assert!(cache.get("e.test", t2).is_some());
        // Replacing a held name in a full cache keeps the others.
        let full = AnswerCache::new(2);
        full.insert("x.test", ips(&["198.51.100.8"]), long, t0);
        full.insert("y.test", ips(&["198.51.100.9"]), long, t0);
        full.insert("x.test", ips(&["203.0.113.8"]), long, t0);
        assert_eq!(full.len(), 2);
        for i in 0..1000 {
            full.insert(&format!("n{i}.test"), ips(&["198.51.100.10"]), long, t0);
            assert!(full.len() <= 2);
        }
    }
}
