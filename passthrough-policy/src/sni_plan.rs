//! The TLS fast path's name tables: a rule set's `tls` Domain patterns at one port, compiled
//! into the entries of the `SNI_NAMES` LPM trie (see `passthrough_common::sni::SniNameKey`).
//!
//! Pure: no IO. [`table_entries`] compiles, [`lookup`] runs the trie's longest-prefix match
//! over the compiled entries the way the kernel does, and a property test holds it equal to
//! `policy::domain_matches` (the proxy's rule) over generated patterns and names.
//! [`FastPathTables`] projects verified destinations onto the rule sets that allow their names.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use passthrough_common::{
    SniLookup, VerifiedKey,
    sni::{SNI_KEY_NAME, SNI_KEY_TABLE_BITS, SniNameKey, SniNameValue, name_allowed},
};

use crate::{
    decision::{domain_matches, wildcard_prefix},
    plan::KernelPlan,
};

/// One `SNI_NAMES` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SniEntry {
    /// Prefix length in bits (table bits included).
    pub prefix_len: u32,
    /// Key data.
    pub key: SniNameKey,
    /// Value.
    pub value: SniNameValue,
}

/// A pattern split the way `decision::domain_matches` reads it: leading `*.` labels (a lone
/// `*` counts as one) and the rest, lower case (a trailing dot is part of it, as of names).
/// `None` for patterns that never match a name (a `*` inside the rest, an empty rest without
/// stars, names too long).
fn split(pattern: &str) -> Option<(u32, String)> {
    let p = pattern.to_ascii_lowercase();
    let (stars, rest) = wildcard_prefix(&p);
    // Names are at most 254 bytes (253 and a trailing dot); a wildcard's suffix is followed
    // by a `.` in its key.
    let max = if stars == 0 {
        SNI_KEY_NAME
    } else {
        SNI_KEY_NAME - 1
    };
    if rest.contains('*') || (stars == 0 && rest.is_empty()) || rest.len() > max {
        return None;
    }
    Some((u32::try_from(stars).ok()?, rest.to_string()))
}

/// The key of a name or suffix, reversed; `terminator` after it (0 for an exact name, `.` for
/// a wildcard's suffix). Returns the key and its prefix length in bits.
fn key(table: u16, name: &str, terminator: Option<u8>) -> (SniNameKey, u32) {
    let mut k = SniNameKey {
        table_be: table.to_be(),
        name: [0; SNI_KEY_NAME],
    };
    let bytes = name.as_bytes();
    for (i, b) in bytes.iter().rev().enumerate() {
        k.name[i] = *b;
    }
    let mut len = bytes.len();
    // A 254-byte name fills the key: no longer name exists, so it needs no terminator.
    if let Some(t) = terminator
        && len < SNI_KEY_NAME
    {
        k.name[len] = t;
        len += 1;
    }
    (k, SNI_KEY_TABLE_BITS + 8 * len as u32)
}

/// Compiles one table's patterns into trie entries (see `SniNameValue` for what the value
/// carries).
pub fn table_entries<'a>(table: u16, patterns: impl IntoIterator<Item = &'a str>) -> Vec<SniEntry> {
    // Exact names, and wildcards as (prefix, stars + suffix labels).
    let mut exact: Vec<SniEntry> = Vec::new();
    let mut wild: Vec<(SniNameKey, u32, u32)> = Vec::new();
    for p in patterns {
        let Some((stars, rest)) = split(p) else {
            continue;
        };
        if stars == 0 {
            let (k, len) = key(table, &rest, Some(0));
            exact.push(SniEntry {
                prefix_len: len,
                key: k,
                value: SniNameValue { min_labels: 0 },
            });
        } else if rest.is_empty() {
            let (k, len) = key(table, "", None);
            wild.push((k, len, stars));
        } else {
            let labels = rest.split('.').count() as u32;
            let (k, len) = key(table, &rest, Some(b'.'));
            wild.push((k, len, stars + labels));
        }
    }
    // Same prefix from several patterns: the least demanding one.
    wild.sort_by(|a, b| (a.1, a.0.name).cmp(&(b.1, b.0.name)).then(a.2.cmp(&b.2)));
    wild.dedup_by(|b, a| a.0 == b.0 && a.1 == b.1);
    let mut out = exact;
    out.sort_by_key(|a| (a.prefix_len, a.key.name));
    out.dedup_by(|b, a| a.key == b.key && a.prefix_len == b.prefix_len);
    for (i, (k, len, need)) in wild.iter().enumerate() {
        // The longest matching entry answers alone: carry the smallest need of every wildcard
        // entry that is a prefix of this one (they all match whatever this one matches).
        let min = wild[..=i]
            .iter()
            .filter(|(k2, len2, _)| *len2 <= *len && is_prefix(k2, *len2, k))
            .map(|(_, _, n)| *n)
            .min()
            .unwrap_or(*need);
        out.push(SniEntry {
            prefix_len: *len,
            key: *k,
            value: SniNameValue { min_labels: min },
        });
    }
    out
}

/// Whether the first `bits` of `prefix` equal those of `key` (whole bytes: every entry's
/// prefix is a whole number of bytes).
fn is_prefix(prefix: &SniNameKey, bits: u32, key: &SniNameKey) -> bool {
    if prefix.table_be != key.table_be {
        return false;
    }
    let bytes = ((bits - SNI_KEY_TABLE_BITS) / 8) as usize;
    prefix.name[..bytes] == key.name[..bytes]
}

/// What the `SNI_NAMES` trie answers for `lookup` (a key with its prefix length, as the
/// kernel's judge builds it): the value of the longest entry that is a prefix of it.
pub fn longest_match(entries: &[SniEntry], lookup: &SniLookup) -> Option<SniNameValue> {
    entries
        .iter()
        .filter(|e| {
            e.prefix_len <= lookup.prefix_len && is_prefix(&e.key, e.prefix_len, &lookup.key)
        })
        .max_by_key(|e| e.prefix_len)
        .map(|e| e.value)
}

/// The kernel's lookup for a normalised name (lower case, valid host-name syntax, a trailing
/// dot kept) in table `table`: the longest entry that is a prefix of the name's key, and
/// whether it allows the name.
pub fn lookup(entries: &[SniEntry], table: u16, name: &str) -> bool {
    if name.len() > SNI_KEY_NAME {
        return false;
    }
    let (k, bits) = key(table, name, Some(0));
    let best = entries
        .iter()
        .filter(|e| e.prefix_len <= bits && is_prefix(&e.key, e.prefix_len, &k))
        .max_by_key(|e| e.prefix_len);
    let labels = name.split('.').count() as u32;
    best.is_some_and(|e| name_allowed(labels, &e.value))
}

/// The port pre-warmed for a rule set's port-less `tls` matches.
pub const PREWARM_PORT: u16 = 443;

/// One plan's TLS fast path tables, as the agent's projection of verified destinations needs
/// them: a destination learned for a name is verified for every rule set that allows the name
/// at its port on the fast path (what the kernel's decision then looks up in `VERIFIED`).
#[derive(Debug, Default, Clone)]
pub struct FastPathTables {
    /// `(rule set, port)` → the `tls` patterns judged there (port 0: the port-less ones).
    pub patterns: BTreeMap<(u32, u16), Vec<Arc<str>>>,
    /// `(rule set, port)` with a non-`tls` Domain match: never direct.
    pub non_tls: BTreeSet<(u32, u16)>,
    /// The rule sets with a table.
    pub rulesets: BTreeSet<u32>,
}

impl FastPathTables {
    /// The tables of `plan`.
    pub fn of(plan: &KernelPlan) -> FastPathTables {
        FastPathTables {
            patterns: plan
                .sni_tables
                .iter()
                .map(|(k, t)| (*k, t.patterns.clone()))
                .collect(),
            non_tls: plan.non_tls_ports.clone(),
            rulesets: plan.sni_tables.keys().map(|(rs, _)| *rs).collect(),
        }
    }

    /// Whether rule set `rs` judges `name` allowed on the fast path at `port`, as the kernel
    /// would: its table at the port, else its port-less table.
    pub fn allows(&self, rs: u32, port: u16, name: &str) -> bool {
        if self.non_tls.contains(&(rs, port)) || self.non_tls.contains(&(rs, 0)) {
            return false;
        }
        let Some(patterns) = self
            .patterns
            .get(&(rs, port))
            .or_else(|| self.patterns.get(&(rs, 0)))
        else {
            return false;
        };
        patterns
            .iter()
            .any(|p| &**p == "*" || domain_matches(p, name))
    }

    /// The `VERIFIED` keys of one destination.
    pub fn keys(&self, name: &str, dst: SocketAddr) -> impl Iterator<Item = VerifiedKey> + '_ {
        let addr = match dst.ip().to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let port = dst.port();
        let name = name.to_string();
        self.rulesets
            .iter()
            .filter(move |rs| self.allows(**rs, port, &name))
            .map(move |rs| VerifiedKey {
                ruleset: *rs,
                port,
                _pad: 0,
                addr,
            })
    }

    /// The exact names to pre-warm, with the port each is judged at.
    pub fn exact_names(&self) -> BTreeSet<(Arc<str>, u16)> {
        let mut out = BTreeSet::new();
        for ((rs, port), patterns) in &self.patterns {
            let port = if *port == 0 { PREWARM_PORT } else { *port };
            if self.non_tls.contains(&(*rs, port)) {
                continue;
            }
            for p in patterns {
                if !p.contains('*') {
                    out.insert((Arc::from(p.to_ascii_lowercase()), port));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn allows(patterns: &[&str], name: &str) -> bool {
        lookup(&table_entries(7, patterns.iter().copied()), 7, name)
    }

    #[test]
    fn exact_and_wildcards_of_any_depth() {
        let p = [
            "api.example.com",
            "*.svc.test",
            "*.*.deep.test",
            "ONE.test.",
            "*.dot.test.",
        ];
        assert!(allows(&p, "api.example.com"));
        assert!(!allows(&p, "x.api.example.com"));
        assert!(!allows(&p, "example.com"));
        assert!(allows(&p, "a.svc.test"));
        assert!(allows(&p, "a.b.c.svc.test"));
        assert!(!allows(&p, "svc.test"));
        assert!(!allows(&p, "badsvc.test"));
        assert!(!allows(&p, "a.deep.test"));
        assert!(allows(&p, "a.b.deep.test"));
        // A trailing dot is part of the name.
        assert!(allows(&p, "one.test."));
        assert!(!allows(&p, "one.test"));
        assert!(!allows(&p, "api.example.com."));
        assert!(allows(&p, "a.dot.test."));
        assert!(!allows(&p, "a.dot.test"));
        assert!(allows(&["*.*"], "a."));
        assert!(allows(&["*"], "localhost"));
        assert!(!allows(&["*.*"], "localhost"));
        assert!(allows(&["*.*"], "a.b"));
        // The longest match needs more labels than the name has; a shorter one allows it.
        assert!(allows(
            &["*.example.com", "*.*.b.example.com"],
            "x.b.example.com"
        ));
        assert!(!allows(&["*.*.b.example.com"], "x.b.example.com"));
        assert!(!allows(&["**.example.com"], "a.example.com"));
        // Another table's entries never answer.
        let e = table_entries(1, ["a.test"]);
        assert!(!lookup(&e, 2, "a.test"));
    }

    fn label() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("ab".to_string()),
            Just("x-1".to_string()),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        (proptest::collection::vec(label(), 1..5), any::<bool>()).prop_map(|(l, dot)| {
            let mut n = l.join(".");
            if dot {
                n.push('.');
            }
            n
        })
    }

    fn pattern() -> impl Strategy<Value = String> {
        (
            0usize..3,
            proptest::collection::vec(label(), 0..4),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(stars, rest, upper, dot)| {
                let mut p = "*.".repeat(stars);
                p.push_str(&rest.join("."));
                if rest.is_empty() {
                    p = p.trim_end_matches('.').to_string();
                }
                if dot && !rest.is_empty() {
                    p.push('.');
                }
                if upper {
                    p = p.to_ascii_uppercase();
                }
                p
            })
    }

    proptest! {
        /// The compiled table answers exactly as the proxy's rule, for every name.
        #[test]
        fn table_agrees_with_domain_matches(
            patterns in proptest::collection::vec(pattern(), 0..6),
            names in proptest::collection::vec(name(), 1..8),
        ) {
            let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
            let entries = table_entries(3, refs.iter().copied());
            for n in &names {
                let want = refs.iter().any(|p| domain_matches(p, n));
                prop_assert_eq!(lookup(&entries, 3, n), want, "{:?} {}", refs, n);
            }
        }
    }

    #[test]
    fn the_kernel_table_choice_and_non_tls_ports() {
        let mut t = FastPathTables::default();
        t.patterns.insert((5, 443), vec![Arc::from("api.test")]);
        t.patterns.insert((5, 0), vec![Arc::from("*.any.test")]);
        t.patterns.insert((6, 443), vec![Arc::from("*")]);
        t.non_tls.insert((6, 8080));
        t.rulesets.extend([5, 6]);
        assert!(t.allows(5, 443, "api.test"));
        // A port with a table of its own does not fall back to the port-less one.
        assert!(!t.allows(5, 443, "x.any.test"));
        assert!(t.allows(5, 8443, "x.any.test"));
        assert!(t.allows(6, 443, "whatever.test"));
        assert!(!t.allows(6, 8080, "whatever.test"));
        let keys: Vec<_> = t
            .keys("api.test", "[2001:db8::1]:443".parse().unwrap())
            .collect();
        assert_eq!(keys.iter().map(|k| k.ruleset).collect::<Vec<_>>(), [5, 6]);
        assert_eq!(
            t.exact_names().into_iter().collect::<Vec<_>>(),
            [(Arc::from("api.test"), 443)]
        );
    }
}
