//! The validated, source-independent policy model shared by the merge step, the decision
//! core and the kernel-plan compiler. Nothing here does IO.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

/// `spec.default.passthroughMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    /// Every egress destination is allowed.
    All,
    /// Only destinations an `appendMatch` entry allows.
    Matched,
    /// No egress destination is allowed.
    None,
}

/// `appendMatch[].type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum MatchKind {
    /// A DNS name, exact or wildcard (`*.example.com`, `*`); decided by the proxy.
    Domain,
    /// One address; decided in the kernel.
    Ip,
    /// An address range; decided in the kernel.
    Cidr,
}

/// `appendMatch[].protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Protocol {
    /// Plain TCP (the default).
    Tcp,
    /// TLS, matched on SNI for domains.
    Tls,
    /// HTTP/1.x, matched on Host.
    Http,
    /// HTTP/2 (h2c with prior knowledge), matched on `:authority`.
    Http2,
    /// gRPC over HTTP/2, matched on `:authority`.
    Grpc,
    /// MySQL (IP/CIDR only).
    Mysql,
}

/// Where a match came from, for explanations, logs and error messages.
///
/// The file and policy name are shared (`Arc`) by every match of a policy: merging copies
/// matches into each workload's configuration, and 100,000 matches × several configurations
/// would otherwise copy the same two strings hundreds of thousands of times.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct MatchOrigin {
    /// The file the policy was read from.
    pub file: Arc<Path>,
    /// The policy's name (`metadata.name` or `name`).
    pub policy: Arc<str>,
    /// The index in `spec.default.appendMatch`.
    pub index: usize,
}

/// One validated `appendMatch` entry. `value` is kept exactly as written; the parsed
/// network for IP/CIDR matches is in `net`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Match {
    /// Domain, IP or CIDR.
    pub kind: MatchKind,
    /// The value as written in the policy (shared by the copies merging makes).
    pub value: Arc<str>,
    /// The parsed network of an IP (`/32`, `/128`) or CIDR match; `None` for domains.
    /// Host bits are cleared (Kuma accepts `1.2.3.4/24` and means `1.2.3.0/24`).
    #[serde(skip)]
    pub net: Option<ipnet::IpNet>,
    /// `None` = every port.
    pub port: Option<u16>,
    /// The protocol (default `tcp`).
    pub protocol: Protocol,
    /// Where it came from.
    pub origin: MatchOrigin,
}

/// A workload: a cgroup v2 directory with a name and labels.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Workload {
    /// The name a `Dataplane` targetRef selects by.
    pub name: String,
    /// The cgroup v2 directory (absolute, or relative to the cgroup2 mount).
    pub cgroup: PathBuf,
    /// Labels `MeshSubset` tags and `Dataplane` labels select by.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The configuration in force for one workload after merging every policy that selects it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MergedConf {
    /// The effective mode.
    pub mode: Mode,
    /// Every match, concatenated least → most specific policy.
    pub matches: Vec<Match>,
    /// Names of the policies that selected the workload, least → most specific.
    pub policies: Vec<String>,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::All => "All",
            Mode::Matched => "Matched",
            Mode::None => "None",
        })
    }
}

impl Mode {
    /// The spelling used in policies (`All`, `Matched`, `None`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::All => "All",
            Mode::Matched => "Matched",
            Mode::None => "None",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    /// Parses `All`, `Matched` or `None` (case-insensitive, for command-line use).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "all" => Ok(Mode::All),
            "matched" => Ok(Mode::Matched),
            "none" => Ok(Mode::None),
            _ => Err(format!("unknown mode {s:?}: expected All, Matched or None")),
        }
    }
}

impl MatchKind {
    /// The spelling used in policies (`Domain`, `IP`, `CIDR`).
    pub fn as_str(self) -> &'static str {
        match self {
            MatchKind::Domain => "Domain",
            MatchKind::Ip => "IP",
            MatchKind::Cidr => "CIDR",
        }
    }
}

impl fmt::Display for MatchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Protocol {
    /// The spelling used in policies (`tcp`, `tls`, `http`, `http2`, `grpc`, `mysql`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Mysql => "mysql",
        }
    }

    /// Parses the exact (case-sensitive) policy spelling, as Kuma does.
    pub fn from_policy(s: &str) -> Option<Protocol> {
        Some(match s {
            "tcp" => Protocol::Tcp,
            "tls" => Protocol::Tls,
            "http" => Protocol::Http,
            "http2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "mysql" => Protocol::Mysql,
            _ => return None,
        })
    }

    /// `http`, `http2` and `grpc`: the protocols the proxy sees as HTTP.
    pub fn is_l7(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Match {
    /// Whether this match's port is unset or equal to `port`.
    pub fn port_fits(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}

impl fmt::Display for Match {
    /// `Domain *.example.com port 443 protocol tls (policy NAME, appendMatch[2], FILE)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} port ", self.kind, self.value)?;
        match self.port {
            Some(p) => write!(f, "{p}")?,
            None => f.write_str("any")?,
        }
        write!(
            f,
            " protocol {} (policy {}, appendMatch[{}], {})",
            self.protocol,
            self.origin.policy,
            self.origin.index,
            self.origin.file.display()
        )
    }
}
