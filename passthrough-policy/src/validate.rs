//! Validation identical to Kuma 2.14's `MeshPassthrough` validator
//! (`pkg/plugins/policies/meshpassthrough/api/v1alpha1/validator.go` and
//! `mesh.ValidateTargetRef`): the same rules in the same order, the same field paths rooted at
//! `spec`, the same message texts (including Kuma's "defiend"). Kuma's resource schema
//! (`rest.yaml` / the CRD) adds enums its Go validator leaves out; they are checked here too:
//! `passthroughMode` is `All`, `Matched` or `None` (an empty string is refused, as the schema
//! refuses it) and every `targetRef.proxyTypes` entry is `Sidecar` or `Gateway`. A
//! `kuma.io/origin` label other than `global` or `zone` is refused as Kuma's API server and
//! admission webhook refuse it.
//!
//! One deliberate difference (docs/kuma.md): "using the same port in multiple matches requires
//! the same protocol…" is order-independent: on one port, `tcp`, `tls` and **one** of
//! `http`/`http2`/`grpc` may be mixed in any order. The first L7 protocol written for a port
//! owns it; every later match on that port with a different L7 protocol gets the violation
//! (Kuma's own fixture gives the same output).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustc_hash::{FxHashMap, FxHashSet};

use super::{
    ip,
    meta::{ORIGIN_LABEL, PolicyMeta},
    model::{Match, MatchKind, MatchOrigin, Mode, Protocol},
    parse::{ParsedPolicy, RawConf, RawTargetRef, Scalar, StrMap},
};

/// A `(field, message)` violation, the field rooted at `spec`.
pub type Violation = (String, String);

/// What a policy's `spec.targetRef` selects.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind")]
pub enum Target {
    /// Every workload in the mesh.
    Mesh {
        /// `proxyTypes`, when given (workloads are sidecars: `Sidecar` must be listed).
        proxy_types: Option<Vec<String>>,
    },
    /// Workloads whose labels include all these tags.
    MeshSubset {
        /// The tags.
        tags: BTreeMap<String, String>,
        /// `proxyTypes`, when given.
        proxy_types: Option<Vec<String>>,
    },
    /// Workloads by name, or by labels; with neither, every workload.
    Dataplane {
        /// The workload name.
        name: Option<String>,
        /// The namespace (Kubernetes), kept for display.
        namespace: Option<String>,
        /// Labels; `Some(empty)` is "selected by labels" with no label to check.
        labels: Option<BTreeMap<String, String>>,
    },
}

impl Target {
    /// The Kuma kind name.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Mesh { .. } => "Mesh",
            Target::MeshSubset { .. } => "MeshSubset",
            Target::Dataplane { .. } => "Dataplane",
        }
    }
}

/// One validated policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Policy {
    /// `metadata.name` / `name`.
    pub name: String,
    /// `metadata.namespace`, if any.
    pub namespace: Option<String>,
    /// The mesh.
    pub mesh: String,
    /// The file it was read from.
    pub file: PathBuf,
    /// What it selects.
    pub target: Target,
    /// Its name, namespace and labels (origin, role, display name, effect…), which decide its
    /// place in the merge order.
    pub meta: PolicyMeta,
    /// `passthroughMode` when set.
    pub mode: Option<Mode>,
    /// The matches in written order.
    pub matches: Vec<Match>,
}

fn s(v: &Option<Scalar>) -> &str {
    v.as_ref().map(Scalar::as_str).unwrap_or("")
}

fn plain(m: &Option<StrMap>) -> Option<BTreeMap<String, String>> {
    m.as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
}

/// Validates a parsed policy: every violation in Kuma's order, or the validated policy.
pub fn validate(p: &ParsedPolicy) -> Result<Policy, Vec<Violation>> {
    let mut v: Vec<Violation> = Vec::new();
    let meta = PolicyMeta {
        name: p.name.clone(),
        namespace: p.namespace.clone().unwrap_or_default(),
        labels: p.labels.clone(),
    };
    if let Some(problem) = meta.origin_problem() {
        // Kuma's path for it, from its API server and its admission webhook alike.
        v.push((format!("labels[{}]", go_quote(ORIGIN_LABEL)), problem));
    }
    let target = match &p.spec.target_ref {
        None => Some(Target::Mesh { proxy_types: None }),
        Some(t) => validate_target_ref(t, &mut v),
    };
    let empty = RawConf::default();
    let conf = p.spec.default.as_ref().unwrap_or(&empty);
    let mode = match conf.passthrough_mode.as_ref().map(Scalar::as_str) {
        None => None,
        Some("Matched") => Some(Mode::Matched),
        Some("All") => Some(Mode::All),
        Some("None") => Some(Mode::None),
        Some(_) => {
            v.push((
                "spec.default.passthroughMode".into(),
                r#""passthroughMode" must be one of ["All", "Matched", "None"]"#.into(),
            ));
            None
        }
    };
    let matches = validate_matches(p, conf.append_match.as_deref().unwrap_or(&[]), &mut v);
    match target {
        Some(target) if v.is_empty() => Ok(Policy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            mesh: p.mesh.clone(),
            file: p.file.clone(),
            target,
            meta,
            mode,
            matches,
        }),
        _ => Err(v),
    }
}

fn validate_target_ref(t: &RawTargetRef, v: &mut Vec<Violation>) -> Option<Target> {
    const P: &str = "spec.targetRef";
    let kind = s(&t.kind);
    let mut add = |field: &str, msg: String| v.push((format!("{P}.{field}"), msg));
    if kind.is_empty() {
        add("kind", "must be defined".into());
        return None;
    }
    if !matches!(kind, "Mesh" | "MeshSubset" | "Dataplane") {
        add("kind", format!("value '{kind}' is not supported"));
        return None;
    }
    let set = |x: &Option<Scalar>| !s(x).is_empty();
    let set_map = |x: &Option<StrMap>| x.as_ref().is_some_and(|m| !m.is_empty());
    let set_list = |x: &Option<Vec<Scalar>>| x.as_ref().is_some_and(|l| !l.is_empty());
    let not_set = |field: &str| {
        (
            field.to_string(),
            format!("must not be set with kind {kind}"),
        )
    };
    let proxy_types = t
        .proxy_types
        .as_ref()
        .map(|l| l.iter().map(|x| x.0.clone()).collect::<Vec<_>>());
    let mut out: Vec<Violation> = Vec::new();
    let target = match kind {
        "Mesh" => {
            if set(&t.name) {
                out.push((
                    "name".into(),
                    format!("using name with kind {kind} is not yet supported"),
                ));
            }
            for (f, is) in [
                ("mesh", set(&t.mesh)),
                ("tags", set_map(&t.tags)),
                ("labels", set_map(&t.labels)),
                ("namespace", set(&t.namespace)),
                ("sectionName", set(&t.section_name)),
            ] {
                if is {
                    out.push(not_set(f));
                }
            }
            if t.proxy_types.as_ref().is_some_and(|l| l.is_empty()) {
                out.push((
                    "proxyTypes".into(),
                    "must be undefined or have at least one element".into(),
                ));
            }
            Target::Mesh { proxy_types }
        }
        "Dataplane" => {
            for (f, is) in [
                ("tags", set_map(&t.tags)),
                ("mesh", set(&t.mesh)),
                ("proxyTypes", set_list(&t.proxy_types)),
            ] {
                if is {
                    out.push(not_set(f));
                }
            }
            if set_map(&t.labels) && (set(&t.name) || set(&t.namespace)) {
                out.push((
                    "labels".into(),
                    "either labels or name and namespace must be specified".into(),
                ));
            }
            if set(&t.section_name) {
                out.push((
                    "sectionName".into(),
                    "can only be used with inbound policies".into(),
                ));
            }
            Target::Dataplane {
                name: Some(s(&t.name).to_string()).filter(|n| !n.is_empty()),
                namespace: Some(s(&t.namespace).to_string()).filter(|n| !n.is_empty()),
                labels: plain(&t.labels),
            }
        }
        _ => {
            // MeshSubset
            for (f, is) in [("name", set(&t.name)), ("mesh", set(&t.mesh))] {
                if is {
                    out.push(not_set(f));
                }
            }
            let tags = plain(&t.tags).unwrap_or_default();
            validate_tags(&tags, &mut out);
            for (f, is) in [
                ("labels", set_map(&t.labels)),
                ("namespace", set(&t.namespace)),
                ("sectionName", set(&t.section_name)),
            ] {
                if is {
                    out.push(not_set(f));
                }
            }
            if t.proxy_types.as_ref().is_some_and(|l| l.is_empty()) {
                out.push((
                    "proxyTypes".into(),
                    "must be undefined or have at least one element".into(),
                ));
            }
            Target::MeshSubset { tags, proxy_types }
        }
    };
    // The schema's enum (`TargetRefProxyType`: `+kubebuilder:validation:Enum=Sidecar;Gateway`
    // in `api/common/v1alpha1/targetref.go`), for every kind.
    for (i, pt) in t.proxy_types.iter().flatten().enumerate() {
        if !matches!(pt.as_str(), "Sidecar" | "Gateway") {
            out.push((
                format!("proxyTypes[{i}]"),
                r#""proxyTypes" must be one of ["Sidecar", "Gateway"]"#.into(),
            ));
        }
    }
    let ok = out.is_empty();
    for (f, m) in out {
        // Kuma's concat: `[` elements attach directly, fields get a dot.
        let field = if f.starts_with('[') {
            format!("{P}{f}")
        } else {
            format!("{P}.{f}")
        };
        v.push((field, m));
    }
    ok.then_some(target)
}

/// Kuma's `ValidateTags` (tag names/values character sets), keys in sorted order.
fn validate_tags(tags: &BTreeMap<String, String>, out: &mut Vec<Violation>) {
    let name_ok = |k: &str| {
        k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:/".contains(&b))
    };
    let value_ok = |k: &str| {
        k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
    };
    for (k, val) in tags {
        let key_path = format!("tags[{}]", go_quote(k));
        if k.is_empty() {
            out.push(("tags".into(), "tag name must be non-empty".into()));
        }
        if !name_ok(k) {
            out.push((key_path.clone(), "tag name must consist of alphanumeric characters, dots, dashes, slashes and underscores".into()));
        }
        if val.is_empty() {
            out.push((key_path.clone(), "tag value must be non-empty".into()));
        }
        if !value_ok(val) {
            out.push((
                key_path,
                "tag value must consist of alphanumeric characters, dots, dashes and underscores"
                    .into(),
            ));
        }
    }
}

/// Go's `%q` for the strings that matter here (printable ASCII kept, `"` and `\` escaped,
/// everything else as `\u`/`\x` escapes — close enough for non-ASCII tag names).
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_ascii_graphic() || c == ' ' => out.push(c),
            c if !c.is_control() => out.push(c),
            c => out.push_str(&format!("\\u{:04x}", c as u32)),
        }
    }
    out.push('"');
    out
}

fn validate_matches(
    p: &ParsedPolicy,
    list: &[super::parse::RawMatch],
    v: &mut Vec<Violation>,
) -> Vec<Match> {
    // Order-independent L7-per-port rule: the first L7 protocol written for a port owns it.
    let mut l7_owner: FxHashMap<u32, &str> = FxHashMap::default();
    for m in list {
        let proto = m.protocol.as_ref().map(Scalar::as_str).unwrap_or("tcp");
        if let (Some(port), true) = (m.port, matches!(proto, "grpc" | "http" | "http2")) {
            l7_owner.entry(port).or_insert(proto);
        }
    }
    let mut seen_values: FxHashMap<(u32, &str), FxHashSet<&str>> = FxHashMap::default();
    let mut out = Vec::with_capacity(list.len());
    let file: Arc<Path> = Arc::from(p.file.as_path());
    let policy: Arc<str> = Arc::from(p.name.as_str());
    for (i, m) in list.iter().enumerate() {
        let before = v.len();
        let at = |field: &str| format!("spec.default.appendMatch[{i}].{field}");
        let proto = m.protocol.as_ref().map(Scalar::as_str).unwrap_or("tcp");
        let value = m.value.as_str();
        let kind = m.kind.as_str();
        // V1
        if proto == "mysql" && m.port.is_none() {
            v.push((at("port"), "port must be defined for Mysql protocol".into()));
        }
        // V2
        if let Some(port) = m.port
            && (port == 0 || port > 65535)
        {
            v.push((at("port"), "port must be a valid (1-65535)".into()));
        }
        // V3 (order-independent, see the module doc)
        if let Some(port) = m.port
            && matches!(proto, "grpc" | "http" | "http2")
            && l7_owner.get(&port).is_some_and(|o| *o != proto)
        {
            v.push((
                at("port"),
                "using the same port in multiple matches requires the same protocol for the following protocols: [grpc http http2]".into(),
            ));
        }
        // V4
        if let Some(port) = m.port
            && !seen_values.entry((port, proto)).or_default().insert(value)
        {
            v.push((
                at("value"),
                format!("value {value} is already defiend for this port and protocol"),
            ));
        }
        // V5
        let protocol = Protocol::from_policy(proto);
        if protocol.is_none() {
            v.push((
                at("protocol"),
                r#""protocol" must be one of ["tcp", "tls", "grpc", "http", "http2", "mysql"]"#
                    .into(),
            ));
        }
        let mut net = None;
        let mk = match kind {
            "CIDR" => {
                // V6
                match ip::parse_go_cidr(value).and_then(|(a, l)| ip::canonical_net(a, l)) {
                    Some(n) => net = Some(n),
                    None => v.push((at("value"), "provided CIDR has incorrect value".into())),
                }
                Some(MatchKind::Cidr)
            }
            "IP" => {
                // V7
                match ip::parse_go_ip(value) {
                    Some(a) => net = Some(ip::host_net(a)),
                    None => v.push((at("value"), "provided IP has incorrect value".into())),
                }
                Some(MatchKind::Ip)
            }
            "Domain" => {
                // V8
                if proto == "tcp" || proto == "mysql" {
                    v.push((
                        at("protocol"),
                        format!("protocol {proto} is not supported for a domain"),
                    ));
                }
                // V9: `^\*[^.]+`
                if value.starts_with('*') && value[1..].chars().next().is_some_and(|c| c != '.') {
                    v.push((at("value"), "provided DNS has incorrect value, partial wildcard is currently not supported".into()));
                }
                // V10
                if m.port.is_none()
                    && value.starts_with('*')
                    && matches!(proto, "grpc" | "http" | "http2")
                {
                    v.push((
                        at("port"),
                        "wildcard domains doesn't work for all ports and layer 7 protocol".into(),
                    ));
                }
                // V11
                let rest = value.strip_prefix("*.").unwrap_or(value);
                if !rest.starts_with('*') && !is_dns_name(rest) {
                    v.push((at("value"), "provided DNS has incorrect value".into()));
                }
                Some(MatchKind::Domain)
            }
            _ => {
                // V12
                v.push((at("type"), format!("provided type {kind} is not supported, one of Domain, IP, or CIDR is supported")));
                None
            }
        };
        if v.len() == before
            && let (Some(kind), Some(protocol)) = (mk, protocol)
        {
            out.push(Match {
                kind,
                value: value.into(),
                net,
                port: m.port.and_then(|p| u16::try_from(p).ok()),
                protocol,
                origin: MatchOrigin {
                    file: Arc::clone(&file),
                    policy: Arc::clone(&policy),
                    index: i,
                },
            });
        }
    }
    out
}

/// govalidator's `IsDNSName`: non-empty, at most 255 bytes without dots, not an IP, labels of
/// 1–63 chars from `[A-Za-z0-9_-]` not starting with `-`, one optional trailing `.` or `_`.
pub fn is_dns_name(s: &str) -> bool {
    if s.is_empty() || s.bytes().filter(|&b| b != b'.').count() > 255 {
        return false;
    }
    if ip::parse_go_ip(s).is_some() {
        return false;
    }
    fn labels_ok(s: &str) -> bool {
        !s.is_empty()
            && s.split('.').all(|l| {
                let b = l.as_bytes();
                !b.is_empty()
                    && b.len() <= 63
                    && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
                    && b.iter()
                        .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
            })
    }
    labels_ok(s) || ((s.ends_with('.') || s.ends_with('_')) && labels_ok(&s[..s.len() - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        for ok in [
            "example.com",
            "EXAMPLE.com",
            "a_b.example.com",
            "example.com.",
            "localhost",
            "a-",
            "x_",
            "_a",
        ] {
            assert!(is_dns_name(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "-a.com",
            "a..b",
            ".",
            "example.com:443",
            "1.2.3.4",
            "hello@world",
            long.as_str(),
            "é.com",
        ] {
            assert!(!is_dns_name(bad), "{bad}");
        }
        assert!(is_dns_name(&format!("{}_", "a".repeat(63))));
    }
}
