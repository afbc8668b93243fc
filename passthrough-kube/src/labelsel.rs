//! Kubernetes label selectors in their string form (`kubectl -l`, `--pod-selector`):
//! `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`, joined by commas, every
//! requirement must hold (the grammar of apimachinery's `labels.Parse`).

use std::collections::BTreeMap;

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key in (values)` (also `key=value`, `key==value`).
    In(String, Vec<String>),
    /// `key notin (values)` (also `key!=value`): true when the key is absent too.
    NotIn(String, Vec<String>),
    /// `key`: the key is present.
    Exists(String),
    /// `!key`: the key is absent.
    DoesNotExist(String),
}

/// A parsed selector; the empty selector selects everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(pub Vec<Requirement>);

impl Selector {
    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

impl std::str::FromStr for Selector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse(s)
    }
}

/// Parses a selector; errors name the offending part.
pub fn parse(s: &str) -> Result<Selector, String> {
    let mut out = Vec::new();
    for part in split_top(s)? {
        let part = part.trim();
        if part.is_empty() {
            if s.trim().is_empty() {
                continue;
            }
            return Err(format!("selector {s:?}: empty requirement"));
        }
        out.push(requirement(part).map_err(|e| format!("selector {s:?}: {e}"))?);
    }
    Ok(Selector(out))
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("selector {s:?}: unbalanced `)`"));
                }
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("selector {s:?}: unbalanced `(`"));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn requirement(p: &str) -> Result<Requirement, String> {
    if let Some(k) = p.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(key(k.trim())?));
    }
    if let Some((k, v)) = p.split_once("!=") {
        return Ok(Requirement::NotIn(key(k.trim())?, vec![value(v.trim())?]));
    }
    if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
        return Ok(Requirement::In(key(k.trim())?, vec![value(v.trim())?]));
    }
    for (word, notin) in [(" notin ", true), (" in ", false)] {
        if let Some((k, rest)) = p.split_once(word) {
            let rest = rest.trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| {
                    format!("{p:?}: expected `({})` after `{}`", "v1,v2", word.trim())
                })?;
            let values = inner
                .split(',')
                .map(|v| value(v.trim()))
                .collect::<Result<Vec<_>, _>>()?;
            let k = key(k.trim())?;
            return Ok(if notin {
                Requirement::NotIn(k, values)
            } else {
                Requirement::In(k, values)
            });
        }
    }
    Ok(Requirement::Exists(key(p)?))
}

fn key(k: &str) -> Result<String, String> {
    let ok = !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!("{k:?} is not a label key"))
    }
}

fn value(v: &str) -> Result<String, String> {
    let ok = v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!("{v:?} is not a label value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn grammar_and_matching() {
        let s = parse("app=web, tier in (a,b),!legacy,team, env!=prod").unwrap();
        assert_eq!(s.0.len(), 5);
        assert!(s.matches(&l(&[("app", "web"), ("tier", "b"), ("team", "x")])));
        assert!(!s.matches(&l(&[("app", "web"), ("tier", "c"), ("team", "x")])));
        assert!(!s.matches(&l(&[
            ("app", "web"),
            ("tier", "a"),
            ("team", "x"),
            ("legacy", "")
        ])));
        assert!(!s.matches(&l(&[
            ("app", "web"),
            ("tier", "a"),
            ("team", "x"),
            ("env", "prod")
        ])));
        assert!(!s.matches(&l(&[("app", "web"), ("tier", "a")])));
        let n = parse("x notin (1,2)").unwrap();
        assert!(n.matches(&l(&[])));
        assert!(!n.matches(&l(&[("x", "1")])));
        assert!(parse("a==b").unwrap().matches(&l(&[("a", "b")])));
        assert!(parse("").unwrap().matches(&l(&[])));
        for bad in ["a in b", "a in (b", "=b", "a=b c", "a,,b", "a=(x)"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
