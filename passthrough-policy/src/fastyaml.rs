//! A fast reader for the plain subset of YAML that policy files are written in, used before
//! `serde_yaml` (which costs ~35 ms per MiB and dominated loading 100,000 matches).
//!
//! It is an optimisation only, never a second YAML dialect: it either produces the document
//! tree `serde_yaml` would produce, or gives up (`None`) and the caller parses the whole file
//! with `serde_yaml`, which then also reports any error with its position. It gives up on
//! anything outside this subset:
//!
//! - block mappings and block sequences (also a sequence at its key's indentation), spaces only;
//! - single-line flow mappings and sequences (`{type: IP, value: 1.2.3.4}`, `[a, b]`);
//! - scalars: `'single'` without `''` escapes, `"double"` without backslashes, and plain
//!   scalars that are unambiguous: decimal integers without leading zeros, and strings that no
//!   YAML 1.2 resolver reads as anything but a string (no null/bool/float look-alikes, no
//!   indicators such as `*`, `&`, `!`, `|`, `>`, no `: ` or ` #` inside);
//! - `#` comments, `---` document separators.
//!
//! Everything else (anchors, aliases, tags, block scalars, multi-line scalars or flow
//! collections, duplicate keys, tabs, CR, BOM, directives, `...`, mappings of more than
//! [`MAX_KEYS`] keys) makes it give up.
//!
//! The tree it builds ([`Node`]) borrows every key and scalar from the text, and [`NodeDe`]
//! deserializes the policy types straight from it: no string is copied until the policy type
//! itself owns it.

use serde::de::{
    Deserializer, IntoDeserializer, Visitor,
    value::{BorrowedStrDeserializer, Error as DeError, MapDeserializer, SeqDeserializer},
};

/// Mappings with more keys than this are left to `serde_yaml` (duplicate keys are found by a
/// linear scan, which must stay cheap).
pub const MAX_KEYS: usize = 64;

/// A document tree whose keys and scalars borrow from the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node<'a> {
    /// An empty value.
    Null,
    /// A decimal integer.
    Int(u64),
    /// A string (plain or quoted, without escapes: the text between the quotes).
    Str(&'a str),
    /// A sequence.
    Seq(Vec<Node<'a>>),
    /// A mapping, keys in the order written (no duplicates).
    Map(Vec<(&'a str, Node<'a>)>),
}

impl<'a> Node<'a> {
    /// The same tree as a `serde_json::Value` (what `serde_yaml` produces), for tests.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Node::Null => Value::Null,
            Node::Int(n) => Value::Number((*n).into()),
            Node::Str(s) => Value::String((*s).to_string()),
            Node::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Node::Map(pairs) => Value::Object(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

fn insert_key<'a>(map: &mut Vec<(&'a str, Node<'a>)>, key: &'a str, value: Node<'a>) -> Option<()> {
    // A duplicate key: let serde_yaml report it. Too many keys: give up rather than scan.
    if map.len() >= MAX_KEYS || map.iter().any(|(k, _)| *k == key) {
        return None;
    }
    map.push((key, value));
    Some(())
}

/// A serde `Deserializer` over a [`Node`], as `serde_json::Value`'s would read the same tree:
/// `Null` is `None` for options and unit otherwise, integers are `u64`, strings are borrowed.
#[derive(Debug, Clone, Copy)]
pub struct NodeDe<'a>(pub &'a Node<'a>);

impl<'de> IntoDeserializer<'de, DeError> for NodeDe<'de> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> Deserializer<'de> for NodeDe<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Node::Null => visitor.visit_unit(),
            Node::Int(n) => visitor.visit_u64(*n),
            Node::Str(s) => visitor.visit_borrowed_str(s),
            Node::Seq(items) => {
                let mut seq = SeqDeserializer::new(items.iter().map(NodeDe));
                let v = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(v)
            }
            Node::Map(pairs) => {
                let mut map = MapDeserializer::new(
                    pairs
                        .iter()
                        .map(|(k, v)| (BorrowedStrDeserializer::<DeError>::new(k), NodeDe(v))),
                );
                let v = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(v)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Node::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

/// The documents of `text`, or `None` when the text is outside the subset.
pub fn documents(text: &str) -> Option<Vec<Vec<Line<'_>>>> {
    if text.contains(['\r', '\t', '\u{feff}']) {
        return None;
    }
    let mut docs: Vec<Vec<Line>> = vec![Vec::new()];
    for raw in text.split('\n') {
        if raw.starts_with('%') || raw.starts_with("...") {
            return None;
        }
        if let Some(rest) = raw.strip_prefix("---") {
            if !rest.is_empty() && !rest.starts_with(' ') {
                // `---x` is content, not a marker: outside the subset at column 0 anyway.
                return None;
            }
            if !strip_comment(rest)?.trim().is_empty() {
                return None;
            }
            docs.push(Vec::new());
            continue;
        }
        let content = strip_comment(raw)?.trim_end();
        let body = content.trim_start();
        if body.is_empty() {
            continue;
        }
        let indent = content.len() - body.len();
        docs.last_mut()
            .expect("non-empty")
            .push(Line { indent, text: body });
    }
    // A leading `---` opens the first document: the empty one before it is not a document.
    if text
        .split('\n')
        .find(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        })
        .is_some_and(|l| l.starts_with("---"))
    {
        docs.remove(0);
    }
    Some(docs)
}

/// One non-empty line without its comment.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    indent: usize,
    text: &'a str,
}

/// The value of one document (`Null` when it is empty), or `None` outside the subset.
pub fn document_value<'a>(lines: &[Line<'a>]) -> Option<Node<'a>> {
    if lines.is_empty() {
        return Some(Node::Null);
    }
    let mut lines = lines.to_vec();
    let mut p = Parser {
        lines: &mut lines,
        pos: 0,
    };
    let indent = p.lines[0].indent;
    let v = p.node(indent)?;
    (p.pos == p.lines.len()).then_some(v)
}

/// Cuts a `#` comment (at the start or after a space, outside quotes).
fn strip_comment(line: &str) -> Option<&str> {
    let b = line.as_bytes();
    let mut quote: Option<u8> = None;
    for i in 0..b.len() {
        match (quote, b[i]) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, b'#') if i == 0 || b[i - 1] == b' ' => return Some(&line[..i]),
            // A quote opens a quoted scalar only at the start of a scalar; elsewhere (`it's`)
            // it is text. Plain scalars with quotes inside are outside the subset anyway, so
            // treating every quote as opening one is safe: at worst we give up later.
            (None, c @ (b'\'' | b'"')) => quote = Some(c),
            _ => {}
        }
    }
    // An unclosed quote would be a multi-line scalar.
    quote.is_none().then_some(line)
}

struct Parser<'l, 'a> {
    lines: &'l mut Vec<Line<'a>>,
    pos: usize,
}

fn is_seq_item(t: &str) -> bool {
    t == "-" || t.starts_with("- ")
}

impl<'a> Parser<'_, 'a> {
    fn peek(&self) -> Option<Line<'a>> {
        self.lines.get(self.pos).copied()
    }

    fn node(&mut self, indent: usize) -> Option<Node<'a>> {
        let line = self.peek()?;
        if line.indent != indent {
            return None;
        }
        if is_seq_item(line.text) {
            return self.sequence(indent);
        }
        if split_key(line.text).is_some() {
            return self.mapping(indent);
        }
        // A lone scalar or flow collection on one line.
        self.pos += 1;
        let v = inline(line.text)?;
        self.no_continuation(indent)?;
        Some(v)
    }

    /// The next line must not be more indented than `indent` (that would continue a scalar).
    fn no_continuation(&self, indent: usize) -> Option<()> {
        match self.peek() {
            Some(l) if l.indent > indent => None,
            _ => Some(()),
        }
    }

    fn mapping(&mut self, indent: usize) -> Option<Node<'a>> {
        let mut map = Vec::new();
        while let Some(line) = self.peek() {
            if line.indent < indent {
                break;
            }
            if line.indent > indent || is_seq_item(line.text) {
                return None;
            }
            let (key, rest) = split_key(line.text)?;
            self.pos += 1;
            let value = if rest.is_empty() {
                match self.peek() {
                    Some(l) if l.indent > indent => self.node(l.indent)?,
                    Some(l) if l.indent == indent && is_seq_item(l.text) => {
                        self.sequence(indent)?
                    }
                    _ => Node::Null,
                }
            } else {
                let v = inline(rest)?;
                self.no_continuation(indent)?;
                v
            };
            insert_key(&mut map, key, value)?;
        }
        Some(Node::Map(map))
    }

    fn sequence(&mut self, indent: usize) -> Option<Node<'a>> {
        let mut items = Vec::new();
        while let Some(line) = self.peek() {
            if line.indent != indent || !is_seq_item(line.text) {
                if line.indent > indent {
                    return None;
                }
                break;
            }
            let rest = line.text[1..].trim_start();
            if rest.is_empty() {
                self.pos += 1;
                match self.peek() {
                    Some(l) if l.indent > indent => items.push(self.node(l.indent)?),
                    _ => items.push(Node::Null),
                }
                continue;
            }
            if is_seq_item(rest) {
                return None;
            }
            let col = indent + (line.text.len() - rest.len());
            if split_key(rest).is_some() {
                // `- key: value` starts a mapping at the column of `key`.
                self.lines[self.pos] = Line {
                    indent: col,
                    text: rest,
                };
                items.push(self.mapping(col)?);
            } else {
                self.pos += 1;
                items.push(inline(rest)?);
                self.no_continuation(indent)?;
            }
        }
        Some(Node::Seq(items))
    }
}

/// `key: rest` or `key:` with a plain or quoted key that is a string.
fn split_key(t: &str) -> Option<(&str, &str)> {
    let (key, rest) = if let Some(q @ ('\'' | '"')) = t.chars().next() {
        let end = t[1..].find(q)? + 1;
        let rest = t[end + 1..].strip_prefix(':')?;
        (quoted(&t[..=end])?, rest)
    } else {
        let i = t
            .find(": ")
            .or_else(|| t.ends_with(':').then(|| t.len() - 1))?;
        let k = &t[..i];
        match plain(k)? {
            Node::Str(s) => (s, &t[i + 1..]),
            _ => return None,
        }
    };
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    Some((key, rest.trim()))
}

/// A scalar or a flow collection that makes up all of `s`.
fn inline(s: &str) -> Option<Node<'_>> {
    let s = s.trim();
    if s.starts_with(['{', '[']) {
        let mut f = Flow {
            s: s.as_bytes(),
            text: s,
            i: 0,
        };
        let v = f.value()?;
        f.ws();
        return (f.i == s.len()).then_some(v);
    }
    if s.starts_with(['\'', '"']) {
        return quoted(s).map(Node::Str);
    }
    plain(s)
}

/// A whole quoted scalar without escapes: the text between the quotes.
fn quoted(s: &str) -> Option<&str> {
    let q = s.chars().next()?;
    let inner = s.strip_prefix(q)?.strip_suffix(q)?;
    if s.len() < 2 || inner.contains(q) || inner.chars().any(|c| c.is_control()) {
        return None;
    }
    if q == '"' && inner.contains('\\') {
        return None;
    }
    Some(inner)
}

/// A plain scalar, resolved as YAML 1.2 (serde_yaml) would, or `None` when ambiguous.
fn plain(s: &str) -> Option<Node<'_>> {
    let first = *s.as_bytes().first()?;
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-' | b':' | b' '))
        || s.ends_with([':', ' '])
        || s.contains(": ")
        || matches!(first, b'-' | b':' | b' ')
    {
        return None;
    }
    const NOT_STRINGS: [&str; 12] = [
        "null", "true", "false", "yes", "no", "on", "off", "y", "n", "inf", "nan", "infinity",
    ];
    if s.len() <= 8 && NOT_STRINGS.iter().any(|w| s.eq_ignore_ascii_case(w)) {
        return None;
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        if s.len() > 1 && first == b'0' {
            return None;
        }
        return s.parse::<u64>().ok().map(Node::Int);
    }
    if first.is_ascii_digit() || first == b'.' {
        let dotted = s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && s.bytes().filter(|&b| b == b'.').count() >= 2;
        let v6 = s.contains(':')
            && (s.contains("::") || s.bytes().any(|b| b.is_ascii_alphabetic()))
            && s.split('/')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        if !(s.contains('/') || dotted || v6) {
            return None;
        }
    }
    Some(Node::Str(s))
}

/// A single-line flow collection.
struct Flow<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
}

impl<'a> Flow<'a> {
    fn ws(&mut self) {
        while self.s.get(self.i) == Some(&b' ') {
            self.i += 1;
        }
    }

    fn value(&mut self) -> Option<Node<'a>> {
        self.ws();
        match *self.s.get(self.i)? {
            b'{' => self.map(),
            b'[' => self.seq(),
            b'\'' | b'"' => {
                let q = self.s[self.i];
                let end = self.s[self.i + 1..].iter().position(|&c| c == q)? + self.i + 1;
                let v = quoted(&self.text[self.i..=end])?;
                self.i = end + 1;
                Some(Node::Str(v))
            }
            _ => {
                let start = self.i;
                while let Some(&c) = self.s.get(self.i) {
                    if matches!(c, b',' | b'}' | b']' | b'{' | b'[') {
                        break;
                    }
                    self.i += 1;
                }
                plain(self.text[start..self.i].trim_end())
            }
        }
    }

    /// After an item: `,` then another item, or the closing bracket.
    fn next(&mut self, close: u8) -> Option<bool> {
        self.ws();
        match *self.s.get(self.i)? {
            b',' => {
                self.i += 1;
                self.ws();
                // No trailing comma, no empty entry.
                (!matches!(self.s.get(self.i)?, b',' | b'}' | b']')).then_some(true)
            }
            c if c == close => {
                self.i += 1;
                Some(false)
            }
            _ => None,
        }
    }

    fn seq(&mut self) -> Option<Node<'a>> {
        self.i += 1;
        self.ws();
        let mut items = Vec::new();
        if self.s.get(self.i) == Some(&b']') {
            self.i += 1;
            return Some(Node::Seq(items));
        }
        loop {
            let start = self.i;
            let v = self.value()?;
            // `[a: b]` is a single-pair mapping in YAML: outside the subset.
            if self.text[start..self.i].contains(": ") || self.s.get(self.i) == Some(&b':') {
                return None;
            }
            items.push(v);
            if !self.next(b']')? {
                return Some(Node::Seq(items));
            }
        }
    }

    fn map(&mut self) -> Option<Node<'a>> {
        self.i += 1;
        self.ws();
        let mut map = Vec::new();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Some(Node::Map(map));
        }
        loop {
            let key = match *self.s.get(self.i)? {
                b'\'' | b'"' => match self.value()? {
                    Node::Str(k) => k,
                    _ => return None,
                },
                _ => {
                    let start = self.i;
                    let end = self.text[start..].find(": ")? + start;
                    let k = &self.text[start..end];
                    if k.contains([',', '{', '}', '[', ']']) {
                        return None;
                    }
                    self.i = end;
                    match plain(k.trim_end())? {
                        Node::Str(k) => k,
                        _ => return None,
                    }
                }
            };
            self.ws();
            if self.s.get(self.i) != Some(&b':') || self.s.get(self.i + 1) != Some(&b' ') {
                return None;
            }
            self.i += 2;
            self.ws();
            if matches!(self.s.get(self.i)?, b',' | b'}') {
                return None; // empty value: leave to serde_yaml
            }
            let v = self.value()?;
            insert_key(&mut map, key, v)?;
            if !self.next(b'}')? {
                return Some(Node::Map(map));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::Value;

    /// What serde_yaml makes of `text`, as JSON values (documents in order).
    fn slow(text: &str) -> Option<Vec<Value>> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).ok())
            .collect()
    }

    /// What the fast path makes of `text`, read through [`NodeDe`] (so the deserializer is
    /// checked too) and through [`Node::to_json`]; both must agree.
    fn fast(text: &str) -> Option<Vec<Value>> {
        documents(text)?
            .iter()
            .map(|d| {
                let node = document_value(d)?;
                let via_de = Value::deserialize(NodeDe(&node)).expect("a Value reads any node");
                assert_eq!(via_de, node.to_json(), "{text:?}");
                Some(via_de)
            })
            .collect()
    }

    #[track_caller]
    fn same(text: &str) {
        let f = fast(text).unwrap_or_else(|| panic!("fast path gave up on {text:?}"));
        assert_eq!(Some(f), slow(text), "{text:?}");
    }

    #[track_caller]
    fn gives_up(text: &str) {
        assert_eq!(fast(text), None, "{text:?}");
    }

    #[test]
    fn subset_reads_as_serde_yaml_does() {
        same("a: b\n");
        same("---\na: 1\n---\nb: [x, z]\n");
        same(
            "# c\n---\na: {x: '1.2.3.4', w: \"2001:db8::1\", z: 10.0.0.1/8}\n...\n"
                .trim_end_matches("...\n"),
        );
        same(
            "spec:\n  default:\n    appendMatch:\n    - type: IP\n      value: 10.1.2.3\n      port: 80\n    - {type: Domain, value: '*.example.com', port: 443, protocol: tls}\n",
        );
        same("a:\n  - x\n  -\n    b: c\n  -\n");
        same("a:\nb: \nc: {}\nd: []\n");
        same("metadata:\n  labels:\n    kuma.io/mesh: default # comment\n");
        same("a: 2001:db8::1\nb: '::ffff:1.2.3.4/120'\nc: 1.2.3.4\nd: v1alpha1\n");
        same("a: hello world\n");
        same("");
        same("---\n");
        same("# only a comment\n");
    }

    #[test]
    fn gives_up_outside_the_subset() {
        for t in [
            "a: *x\n",
            "a: &x b\n",
            "a: !!str b\n",
            "a: |\n  x\n",
            "a: >\n  x\n",
            "a: b\n  c\n",
            "a: 'it''s'\n",
            "a: \"x\\ny\"\n",
            "a: 1\na: 2\n",
            "a: {x: 1, x: 2}\n",
            "a: {x: 1,\n  y: 2}\n",
            "a:\tb\n",
            "a: b\r\n",
            "a: true\n",
            "a: null\n",
            "a: ~\n",
            "a: 1.5\n",
            "a: 010\n",
            "a: 0x10\n",
            "a: .inf\n",
            "a: 1e5\n",
            "1: a\n",
            "? a\n: b\n",
            "a: [b: c]\n",
            "%YAML 1.2\n---\na: b\n",
            "--- a: b\n",
            "a: b,c\n",
            "a: -1\n",
            "<<: {a: b}\n",
        ] {
            gives_up(t);
        }
    }

    proptest::proptest! {
        /// Whatever the fast path accepts, serde_yaml reads the same way.
        #[test]
        fn never_differs_from_serde_yaml(parts in proptest::collection::vec(proptest::sample::select(vec![
            "a", "b", "kuma.io/mesh", ":", ": ", " ", "  ", "\n", "\n  ", "\n    ", "- ", "-", "{", "}", "[", "]", ", ",
            ",", "'", "\"", "#", " #", "---\n", "1", "0", "10.0.0.1", "2001:db8::1", "::1", "1.5", "*", "*.x",
            "true", "null", "~", "&", "!", "|", ">", "x y", "e5", ".", "/24", "443", "65536", "99999999999999999999",
        ]), 0..40)) {
            let text: String = parts.concat();
            if let Some(f) = fast(&text) {
                proptest::prop_assert_eq!(Some(f), slow(&text), "{:?}", text);
            }
        }

        /// The same on line-structured input, which the fast path mostly accepts.
        #[test]
        fn lines_never_differ_from_serde_yaml(lines in proptest::collection::vec((
            0usize..4,
            proptest::bool::ANY,
            proptest::sample::select(vec!["a", "b", "kuma.io/mesh", "'q k'", "\"d\"", "1", "x y"]),
            proptest::sample::select(vec![
                "", "v", "10.0.0.1", "10.0.0.0/8", "2001:db8::1", "'2001:db8::/32'", "443", "0", "65536",
                "{type: IP, value: '1.2.3.4', port: 80}", "[a, b]", "[]", "{}", "'*.x.com'", "\"*\"",
                "a-b_c.d", "x # c", "v1alpha1", "1.2", "007", "'a'", "{a: {b: c}}", "[x, [z]]",
            ]),
        ), 0..12)) {
            let mut text = String::new();
            for (indent, item, key, value) in &lines {
                text.push_str(&"  ".repeat(*indent));
                if *item {
                    text.push_str("- ");
                }
                text.push_str(key);
                text.push(':');
                if !value.is_empty() {
                    text.push(' ');
                    text.push_str(value);
                }
                text.push('\n');
            }
            if let Some(f) = fast(&text) {
                proptest::prop_assert_eq!(Some(f), slow(&text), "{:?}", text);
            }
        }
    }
}
