//! The TLS fast path's name tables: a rule set's `tls` Domain patterns at one port, compiled
//! into the entries of the `SNI_NAMES` LPM trie (see `passthrough_common::sni::SniNameKey`).
//!
//! Pure: no IO. [`table_entries`] compiles, [`lookup`] runs the trie's longest-prefix match
//! over the compiled entries the way the kernel does, and a property test holds it equal to
//! `policy::domain_matches` (the proxy's rule) over generated patterns and names.

use passthrough_common::sni::{
    SNI_KEY_NAME, SNI_KEY_TABLE_BITS, SniNameKey, SniNameValue, name_allowed,
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

/// A pattern split the way `policy::domain_matches` reads it: leading `*.` labels (a lone `*`
/// counts as one) and the rest, lower case, one trailing dot removed. `None` for patterns that
/// never match a name (a `*` inside the rest, an empty rest without stars, names too long).
fn split(pattern: &str) -> Option<(u32, String)> {
    let p = pattern.to_ascii_lowercase();
    let p = p.strip_suffix('.').unwrap_or(&p);
    let mut rest = p;
    let mut stars = 0u32;
    loop {
        if rest == "*" {
            stars += 1;
            rest = "";
            break;
        }
        match rest.strip_prefix("*.") {
            Some(r) => {
                stars += 1;
                rest = r;
            }
            None => break,
        }
    }
    if rest.contains('*') || (stars == 0 && rest.is_empty()) || rest.len() > 253 {
        return None;
    }
    Some((stars, rest.to_string()))
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
    if let Some(t) = terminator {
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
    out.sort_by(|a, b| (a.prefix_len, a.key.name).cmp(&(b.prefix_len, b.key.name)));
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

/// The kernel's lookup for a normalised name (lower case, no trailing dot, valid host-name
/// syntax) in table `table`: the longest entry that is a prefix of the name's key, and
/// whether it allows the name.
pub fn lookup(entries: &[SniEntry], table: u16, name: &str) -> bool {
    if name.len() > 253 {
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

/// Compares the kernel's ClientHello judge (`passthrough_common::sni::parse`, the code the
/// `sk_msg` programs run) with the proxy's reader and name rules on the same first bytes.
/// `Ok` when they agree: the same class of answer (need more bytes, not TLS, invalid, a
/// hello), and for a hello the same name verdict (absent, an IP literal, not a host name, or
/// the very same normalised name) and ECH flag. Past the kernel's limits the kernel refuses
/// (`TooLarge`) whatever the proxy says; that is not a disagreement. Used by a property test
/// and by the `client_hello_kernel` fuzz target.
pub fn compare_with_proxy(first: &[u8]) -> Result<(), String> {
    use passthrough_common::sni::{self, Name, Stop};

    use crate::{
        policy::{Reason, decision::normalize_name},
        proxy::tls::{Parse, parse_client_hello},
    };
    let mut out = [0u8; SNI_KEY_NAME];
    let kernel = sni::parse(first, sni::KERNEL_LIMITS, &mut out);
    let proxy = parse_client_hello(first);
    let bad = || Err(format!("kernel {kernel:?}, proxy {proxy:?}"));
    match (&kernel, &proxy) {
        (Err(Stop::TooLarge), _) => Ok(()),
        (Err(Stop::NeedMore(t)), Parse::NeedMore) if *t as usize > first.len() => Ok(()),
        (Err(Stop::NotTls), Parse::NotTls) => Ok(()),
        (Err(Stop::Invalid(_)), Parse::Invalid(_)) => Ok(()),
        (Ok(h), Parse::Hello(p)) => {
            if h.ech != p.ech || h.record_bytes as usize != p.record_bytes {
                return bad();
            }
            let agree = match (&h.name, p.sni.as_deref().map(|s| normalize_name(s, false))) {
                (Name::Absent, None) => true,
                (Name::IpLiteral, Some(Err(Reason::IpLiteral { .. }))) => true,
                (Name::Bad, Some(Err(Reason::BadName { .. }))) => true,
                // Two documented corners where only the reason differs (both refuse): the
                // kernel does not parse IPv6 literals (a `:` is simply not a host-name byte),
                // and an IPv4 literal followed by more than 16 dots (`sni::ipv4_literal`).
                (Name::Bad, Some(Err(Reason::IpLiteral { name })))
                    if name.contains(':') || name.len() - name.trim_end_matches('.').len() > 16 =>
                {
                    true
                }
                (Name::Valid { len, labels }, Some(Ok(n))) => {
                    let mut k = out[..*len as usize].to_vec();
                    k.reverse();
                    k == n.as_bytes() && *labels as usize == n.split('.').count()
                }
                _ => false,
            };
            if agree { Ok(()) } else { bad() }
        }
        _ => bad(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::policy::decision::domain_matches;

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
        assert!(allows(&p, "one.test"));
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
        proptest::collection::vec(label(), 1..5).prop_map(|l| l.join("."))
    }

    fn pattern() -> impl Strategy<Value = String> {
        (
            0usize..3,
            proptest::collection::vec(label(), 0..4),
            any::<bool>(),
        )
            .prop_map(|(stars, rest, upper)| {
                let mut p = "*.".repeat(stars);
                p.push_str(&rest.join("."));
                if rest.is_empty() {
                    p = p.trim_end_matches('.').to_string();
                }
                if upper {
                    p = p.to_ascii_uppercase();
                }
                p
            })
    }

    /// ClientHello bytes from pieces: names that are valid, odd, IP-like or hostile, other
    /// extensions, records of any size, and a cut or a flipped byte anywhere.
    fn hello_bytes() -> impl Strategy<Value = Vec<u8>> {
        let names = prop_oneof![
            Just(b"api.test".to_vec()),
            Just(b"API.Test.".to_vec()),
            Just(b"1.2.3.4".to_vec()),
            Just(b"01.2.3.4".to_vec()),
            Just(b"1.2.3.4..".to_vec()),
            Just(b"a..b".to_vec()),
            Just(b" a.b".to_vec()),
            Just(b".".to_vec()),
            Just(b"a_b-c.d".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..70),
            proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'.'), Just(b'1')], 1..260),
        ];
        (
            proptest::collection::vec(names, 0..3),
            proptest::collection::vec(
                (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..40)),
                0..6,
            ),
            1usize..400,
            any::<bool>(),
            any::<(u16, u8)>(),
            any::<u16>(),
        )
            .prop_map(|(sni, others, chunk, ech, (flip_at, flip), cut)| {
                use crate::proxy::tls::build;
                let mut exts: Vec<Vec<u8>> = Vec::new();
                if !sni.is_empty() {
                    let refs: Vec<&[u8]> = sni.iter().map(Vec::as_slice).collect();
                    exts.push(build::sni(&refs));
                }
                for (ty, d) in others {
                    exts.push(build::ext(ty, &d));
                }
                if ech {
                    exts.push(build::ext(0xfe0d, b"e"));
                }
                let mut b = build::records(&build::hello(&exts), chunk);
                if flip_at as usize % 8 == 0 {
                    let i = flip_at as usize % b.len();
                    b[i] = flip;
                }
                if cut % 5 == 0 {
                    b.truncate(cut as usize % (b.len() + 1));
                }
                b
            })
    }

    /// Inputs the `client_hello_kernel` fuzz target found: a later record's header cut short
    /// (the proxy waits for all five bytes before it reads the type), an IPv6 literal as the
    /// name (a reason corner, see `compare_with_proxy`), and text that is not TLS.
    #[test]
    fn fuzz_regressions() {
        for hex in [
            "160301004a010000460303070707070707071707070707070707070707070707070707070707070707070700000213010100001b0000000e000c0000093a3a352e302e302e31002b0005040707070707",
            "1603010052010000b2f3570000000000000007070707070707070707070707070707070707010707310707070000021301010000230000001600140000116170692e6578616d706c652e4c00746573742e002b00ed050403040303",
            "30303030303030303a2031363033203031303020353230312030303030206232663320353730302030303030203030303020202e2e2e2e522e2e2e2e2e572e2e2e2e2e0a30303030303031303a2030303030203037303720303730372030373037203037303720303730372030373037203037303720202e2e2e2e2e2e2e2e2e2e2e2e2e2e2e2e0a30303030303032303a2030373037203037303720303730312030373037203331303720303730372030303030203032313320202e2e2e2e2e2e2e2e312e2e2e2e2e2e2e0a30303030303033303a2030313031203030303020323330302030303030203136303020313430302030303131203631373020202e2e2e2e232e2e2e2e2e2e2e2e2e61700a30303030303034303a203639326520363537382036313664203730366320363532652034633030203734363520373337342020692e6578616d706c652e4c2e746573740a30303030303035303a2032653030203262303020656430352030343033203034303320303320202020202020202020202020202e2e2b2e2e2e2e2e2e2e2e0a",
        ] {
            let b: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            assert_eq!(compare_with_proxy(&b), Ok(()), "{hex}");
            for k in 0..b.len() {
                assert_eq!(compare_with_proxy(&b[..k]), Ok(()), "{hex} cut at {k}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The kernel's judge and the proxy's reader agree on every generated hello.
        #[test]
        fn kernel_judge_agrees_with_the_proxy(b in hello_bytes()) {
            prop_assert_eq!(compare_with_proxy(&b), Ok(()));
        }

        /// And on random bytes behind a handshake record header.
        #[test]
        fn kernel_judge_agrees_on_random_bytes(mut b in proptest::collection::vec(any::<u8>(), 0..300)) {
            if b.len() > 3 {
                b[0] = 22;
                b[1] = 3;
            }
            prop_assert_eq!(compare_with_proxy(&b), Ok(()));
        }
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
}
