//! Reading `MeshPassthrough` resources from files and directories.
//!
//! Accepted inputs: YAML (one or many documents per file) and JSON (one or many concatenated
//! values), in the Kubernetes spelling (`apiVersion: kuma.io/v1alpha1`, `kind: MeshPassthrough`,
//! `metadata`, `spec`) or the Universal one (`type: MeshPassthrough`, `name`, `mesh`, `spec`). A
//! Kubernetes `kind: List` with `items` is unpacked. Parsing is strict: unknown fields, wrong
//! types, duplicate fields and syntax errors are problems with file, line and column.
//!
//! Like Kubernetes (`sigs.k8s.io/yaml`), a scalar written where a string is expected is taken as
//! its text (`protocol: 1` is the string `"1"`, which the validator then rejects), so Kuma's own
//! fixtures read the same here.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use serde::{
    Deserialize, Deserializer,
    de::{self, IgnoredAny, Visitor},
};

use super::{error::Problem, meta::DISPLAY_NAME_LABEL};

/// A string field that, like Kubernetes' YAML reader, also accepts a number or boolean scalar
/// and keeps its text.
#[derive(Debug, Clone, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Scalar(pub String);

impl Scalar {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string-to-string map (labels, tags).
pub type StrMap = BTreeMap<String, Scalar>;

/// `spec.targetRef`, every field Kuma 2.14's `TargetRef` has.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTargetRef {
    /// `Mesh`, `MeshSubset`, `Dataplane` (others are rejected by the validator).
    pub kind: Option<Scalar>,
    /// Dataplane name.
    pub name: Option<Scalar>,
    /// Dataplane namespace (Kubernetes).
    pub namespace: Option<Scalar>,
    /// Reserved by Kuma; must not be set.
    pub mesh: Option<Scalar>,
    /// MeshSubset tags.
    pub tags: Option<StrMap>,
    /// Dataplane labels. Present-but-empty differs from absent, as in Kuma.
    pub labels: Option<StrMap>,
    /// `Sidecar` / `Gateway`.
    pub proxy_types: Option<Vec<Scalar>>,
    /// Only for inbound policies; rejected here.
    pub section_name: Option<Scalar>,
}

/// One `spec.default.appendMatch[]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    /// `Domain`, `IP` or `CIDR`.
    #[serde(rename = "type")]
    pub kind: Scalar,
    /// The value.
    pub value: Scalar,
    /// The port (Kuma: uint32; the validator enforces 1–65535).
    pub port: Option<u32>,
    /// The protocol; absent means `tcp` (the CRD / OpenAPI default).
    pub protocol: Option<Scalar>,
}

/// `spec.default`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawConf {
    /// `All`, `Matched`, `None`; unset or empty = `Matched`.
    pub passthrough_mode: Option<Scalar>,
    /// The matches.
    pub append_match: Option<Vec<RawMatch>>,
}

/// `spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSpec {
    /// Absent = `Mesh`.
    pub target_ref: Option<RawTargetRef>,
    /// The configuration.
    pub default: Option<RawConf>,
}

// The ignored fields exist so that `deny_unknown_fields` accepts them.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMeta {
    name: Option<Scalar>,
    namespace: Option<Scalar>,
    labels: Option<StrMap>,
    annotations: Option<StrMap>,
    // Read-only ObjectMeta fields found in `kubectl get -o yaml` output; ignored.
    uid: Option<IgnoredAny>,
    resource_version: Option<IgnoredAny>,
    generation: Option<IgnoredAny>,
    creation_timestamp: Option<IgnoredAny>,
    deletion_timestamp: Option<IgnoredAny>,
    deletion_grace_period_seconds: Option<IgnoredAny>,
    managed_fields: Option<IgnoredAny>,
    owner_references: Option<IgnoredAny>,
    finalizers: Option<IgnoredAny>,
    generate_name: Option<IgnoredAny>,
    self_link: Option<IgnoredAny>,
}

/// Every top-level field of both spellings; which ones may appear together is checked in
/// [`Document::try_from`], inside deserialization, so errors carry a position.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDoc {
    api_version: Option<Scalar>,
    kind: Option<Scalar>,
    metadata: Option<RawMeta>,
    #[serde(rename = "type")]
    type_: Option<Scalar>,
    name: Option<Scalar>,
    mesh: Option<Scalar>,
    labels: Option<StrMap>,
    creation_time: Option<IgnoredAny>,
    modification_time: Option<IgnoredAny>,
    // Universal read-only field `kumactl get`/`export` writes (the resource identifier).
    kri: Option<IgnoredAny>,
    spec: Option<RawSpec>,
    status: Option<IgnoredAny>,
    items: Option<Vec<Option<Document>>>,
}

/// One resource document, its spelling checked.
#[derive(Debug, Deserialize)]
#[serde(try_from = "RawDoc")]
enum Document {
    /// A `MeshPassthrough`.
    Policy(Box<DocPolicy>),
    /// A Kubernetes `List`.
    List(Vec<Option<Document>>),
}

#[derive(Debug)]
struct DocPolicy {
    name: String,
    namespace: Option<String>,
    mesh: String,
    labels: BTreeMap<String, String>,
    spec: RawSpec,
}

fn plain_labels(m: Option<StrMap>) -> BTreeMap<String, String> {
    m.unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

const API_VERSION: &str = "kuma.io/v1alpha1";
const KIND: &str = "MeshPassthrough";
const MESH_LABEL: &str = "kuma.io/mesh";

impl TryFrom<RawDoc> for Document {
    type Error = String;

    fn try_from(d: RawDoc) -> Result<Self, String> {
        let k8s = d.api_version.is_some() || d.kind.is_some() || d.metadata.is_some();
        let universal =
            d.type_.is_some() || d.name.is_some() || d.mesh.is_some() || d.labels.is_some();
        if k8s && universal {
            return Err("mixes Kubernetes fields (apiVersion, kind, metadata) with Universal fields (type, name, mesh, labels)".into());
        }
        if d.items.is_some() && d.kind.as_ref().map(Scalar::as_str) != Some("List") {
            return Err("field `items` is only allowed with kind List".into());
        }
        if k8s {
            let kind = d.kind.map(|k| k.0).unwrap_or_default();
            if kind == "List" {
                // `kubectl get -o yaml|json` always writes the List's own `metadata`
                // (`resourceVersion: ""`); it says nothing about the items and is ignored.
                if d.spec.is_some() {
                    return Err("kind List takes only apiVersion, kind, metadata and items".into());
                }
                return Ok(Document::List(d.items.unwrap_or_default()));
            }
            if kind != KIND {
                return Err(format!(
                    "unsupported kind {kind:?}: only {KIND} (apiVersion {API_VERSION}) is accepted"
                ));
            }
            let api = d.api_version.map(|a| a.0).unwrap_or_default();
            if api != API_VERSION {
                return Err(format!(
                    "unsupported apiVersion {api:?} for {KIND}: expected {API_VERSION}"
                ));
            }
            let meta = d.metadata.ok_or("metadata.name must be defined")?;
            let name = meta.name.map(|n| n.0).unwrap_or_default();
            if name.is_empty() {
                return Err("metadata.name must be defined".into());
            }
            let mesh = meta
                .labels
                .as_ref()
                .and_then(|l| l.get(MESH_LABEL))
                .map(|m| m.0.clone())
                .unwrap_or_else(|| "default".into());
            // As Kuma reads a Kubernetes object (`pkg/plugins/resources/k8s/store.go`,
            // `GetLabels`): the display name is the annotation of that name, else the name,
            // whatever a label of that name says.
            let mut labels = plain_labels(meta.labels);
            let display = meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(DISPLAY_NAME_LABEL))
                .map_or_else(|| name.clone(), |d| d.0.clone());
            labels.insert(DISPLAY_NAME_LABEL.to_string(), display);
            return Ok(Document::Policy(Box::new(DocPolicy {
                name,
                namespace: meta.namespace.map(|n| n.0),
                mesh,
                labels,
                spec: d.spec.unwrap_or_default(),
            })));
        }
        if universal {
            let ty = d.type_.map(|t| t.0).unwrap_or_default();
            if ty != KIND {
                return Err(format!("unsupported type {ty:?}: only {KIND} is accepted"));
            }
            let name = d.name.map(|n| n.0).unwrap_or_default();
            if name.is_empty() {
                return Err("name must be defined".into());
            }
            let mesh = d
                .mesh
                .map(|m| m.0)
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "default".into());
            return Ok(Document::Policy(Box::new(DocPolicy {
                name,
                namespace: None,
                mesh,
                labels: plain_labels(d.labels),
                spec: d.spec.unwrap_or_default(),
            })));
        }
        Err(format!(
            "not a {KIND} resource: expected `kind: {KIND}` (Kubernetes) or `type: {KIND}` (Universal)"
        ))
    }
}

/// A policy as read from a file, not yet validated.
#[derive(Debug, Clone)]
pub struct ParsedPolicy {
    /// The file it came from.
    pub file: PathBuf,
    /// 0-based index of the resource in the file (after unpacking lists).
    pub index: usize,
    /// `metadata.name` or `name`.
    pub name: String,
    /// `metadata.namespace` (Kubernetes).
    pub namespace: Option<String>,
    /// The mesh (`kuma.io/mesh` label or `mesh`; `default` when absent).
    pub mesh: String,
    /// `metadata.labels` (Kubernetes, with `kuma.io/display-name` set as Kuma derives it) or
    /// `labels` (Universal).
    pub labels: BTreeMap<String, String>,
    /// The spec as written.
    pub spec: RawSpec,
}

/// Whether a path is a policy file by its extension (`.yaml`, `.yml`, `.json`).
pub fn is_policy_file(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("yaml" | "yml" | "json")
    )
}

/// Expands files and directories (recursively, sorted, skipping names that start with `.`
/// such as Kubernetes ConfigMap `..data` links) into the list of policy files.
pub fn collect_files(paths: &[PathBuf], problems: &mut Vec<Problem>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => walk(p, &mut out, problems, 0),
            Ok(_) => out.push(p.clone()),
            Err(e) => problems.push(Problem::new(p, format!("cannot read: {e}"))),
        }
    }
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, problems: &mut Vec<Problem>, depth: usize) {
    if depth > 32 {
        problems.push(Problem::new(
            dir,
            "directory nesting too deep (symlink loop?)",
        ));
        return;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(Problem::new(dir, format!("cannot read directory: {e}")));
            return;
        }
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    for e in entries {
        match e {
            Ok(e) => {
                if e.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                paths.push(e.path());
            }
            Err(e) => problems.push(Problem::new(dir, format!("cannot read directory: {e}"))),
        }
    }
    paths.sort();
    for p in paths {
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => walk(&p, out, problems, depth + 1),
            Ok(_) if is_policy_file(&p) => out.push(p),
            Ok(_) => {}
            Err(e) => problems.push(Problem::new(&p, format!("cannot read: {e}"))),
        }
    }
}

/// Reads and parses one file. Problems are appended; the policies read before the first syntax
/// error of a file are returned too (the caller rejects the whole input on any problem).
pub fn parse_file(file: &Path, problems: &mut Vec<Problem>) -> Vec<ParsedPolicy> {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => {
            problems.push(Problem::new(file, format!("cannot read: {e}")));
            return Vec::new();
        }
    };
    parse_bytes(file, &bytes, problems)
}

/// Parses the content of one file; JSON when the name ends in `.json`, YAML otherwise.
pub fn parse_bytes(file: &Path, bytes: &[u8], problems: &mut Vec<Problem>) -> Vec<ParsedPolicy> {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let (line, col) = line_col(bytes, e.valid_up_to());
            problems.push(Problem::at(file, line, col, "invalid UTF-8"));
            return Vec::new();
        }
    };
    let json = file
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let docs = if json {
        parse_json(file, text, problems)
    } else {
        parse_yaml(file, text, problems)
    };
    let mut out = Vec::new();
    for d in docs {
        flatten(file, d, &mut out, problems, 0);
    }
    out
}

fn flatten(
    file: &Path,
    d: Document,
    out: &mut Vec<ParsedPolicy>,
    problems: &mut Vec<Problem>,
    depth: usize,
) {
    match d {
        Document::Policy(p) => {
            let p = *p;
            out.push(ParsedPolicy {
                file: file.to_path_buf(),
                index: out.len(),
                name: p.name,
                namespace: p.namespace,
                mesh: p.mesh,
                labels: p.labels,
                spec: p.spec,
            })
        }
        Document::List(items) => {
            if depth > 0 {
                problems.push(Problem::new(file, "a List inside a List is not supported"));
                return;
            }
            for item in items.into_iter().flatten() {
                flatten(file, item, out, problems, depth + 1);
            }
        }
    }
}

/// The 1-based line where each YAML document starts: a `---` line, or the first content line of
/// an implicit first document. Used for errors the YAML reader reports without a position (those
/// raised after a document was read, such as an unsupported `kind`).
fn yaml_doc_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let marker = line
            .strip_prefix("---")
            .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t']));
        if marker {
            starts.push(i + 1);
        } else if starts.is_empty() {
            let t = line.trim_start();
            if !t.is_empty() && !t.starts_with('#') && !line.starts_with('%') {
                starts.push(i + 1);
            }
        }
    }
    starts
}

fn parse_yaml(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Vec<Document> {
    let mut docs = Vec::new();
    let starts = yaml_doc_starts(text);
    for (i, de) in yaml_serde::Deserializer::from_str(text).enumerate() {
        match Option::<Document>::deserialize(de) {
            Ok(Some(d)) => docs.push(d),
            Ok(None) => {}
            Err(e) => {
                let mut p = yaml_problem(file, &e);
                if p.position.is_none() {
                    p.position = starts.get(i).map(|&l| (l, 1));
                }
                problems.push(p);
                // The parser cannot resynchronise reliably after an error: one per file.
                break;
            }
        }
    }
    docs
}

/// A YAML error as a problem: its position in front (`FILE:LINE:COLUMN: message`), taken out
/// of the message, where the reader writes it (" at line L column C", at the end or before a
/// ", while parsing …" context).
pub(crate) fn yaml_problem(file: &Path, e: &yaml_serde::Error) -> Problem {
    let mut msg = e.to_string();
    match e.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            if let Some(pos) = msg.find(&suffix) {
                msg.replace_range(pos..pos + suffix.len(), "");
            }
            Problem::at(file, loc.line(), loc.column(), msg)
        }
        None => Problem::new(file, msg),
    }
}

fn parse_json(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Vec<Document> {
    let mut docs = Vec::new();
    for r in serde_json::Deserializer::from_str(text).into_iter::<Option<Document>>() {
        match r {
            Ok(Some(d)) => docs.push(d),
            Ok(None) => {}
            Err(e) => {
                let mut msg = e.to_string();
                let suffix = format!(" at line {} column {}", e.line(), e.column());
                if let Some(pos) = msg.find(&suffix) {
                    msg.replace_range(pos..pos + suffix.len(), "");
                }
                problems.push(Problem::at(file, e.line(), e.column(), msg));
                break;
            }
        }
    }
    docs
}

fn line_col(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> (Vec<ParsedPolicy>, Vec<Problem>) {
        let mut problems = Vec::new();
        let p = parse_bytes(Path::new(name), text.as_bytes(), &mut problems);
        (p, problems)
    }

    #[test]
    fn both_spellings_multi_doc() {
        let (p, e) = parse(
            "a.yaml",
            "apiVersion: kuma.io/v1alpha1\nkind: MeshPassthrough\nmetadata:\n  name: k\n  namespace: kuma-system\n  labels:\n    kuma.io/mesh: m1\nspec: {}\n---\n---\ntype: MeshPassthrough\nname: u\nmesh: m2\nspec:\n  default:\n    passthroughMode: All\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].name.as_str(), p[0].mesh.as_str()), ("k", "m1"));
        assert_eq!(
            (p[1].name.as_str(), p[1].mesh.as_str(), p[1].index),
            ("u", "m2", 1)
        );
    }

    #[test]
    fn unknown_field_has_position() {
        let (_, e) = parse(
            "a.yaml",
            "type: MeshPassthrough\nname: u\nspec:\n  default:\n    appendMatch:\n    - type: IP\n      value: 1.2.3.4\n      prot: tcp\n",
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].position.map(|p| p.0), Some(8), "{}", e[0]);
        assert!(e[0].message.contains("unknown field `prot`"), "{}", e[0]);
    }

    #[test]
    fn doc_errors_have_position() {
        let (_, e) = parse(
            "a.yaml",
            "type: MeshPassthrough\nname: u\n---\nkind: Foo\napiVersion: v1\nmetadata: {name: x}\n",
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].position, Some((3, 1)), "{}", e[0]);
        assert!(e[0].message.contains("unsupported kind"), "{}", e[0]);
    }

    #[test]
    fn json_and_scalars() {
        let (p, e) = parse(
            "a.json",
            r#"{"type":"MeshPassthrough","name":"j","spec":{"default":{"appendMatch":[{"type":"IP","value":"1.2.3.4","protocol":1}]}}}"#,
        );
        assert!(e.is_empty(), "{e:?}");
        let m = &p[0]
            .spec
            .default
            .as_ref()
            .unwrap()
            .append_match
            .as_ref()
            .unwrap()[0];
        assert_eq!(m.protocol.as_ref().unwrap().as_str(), "1");
        let (_, e) = parse(
            "a.json",
            r#"{"type":"MeshPassthrough","name":"j","spec":{"default":{"appendMatch":[{"type":"IP","value":"1.2.3.4","port":"80"}]}}}"#,
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].position.map(|p| p.0), Some(1));
    }

    #[test]
    fn kubectl_and_kumactl_read_only_fields() {
        // `kubectl get meshpassthroughs -o yaml`: the List has metadata, each item the fields
        // the API server adds.
        let (p, e) = parse(
            "a.yaml",
            "apiVersion: v1\nitems:\n- apiVersion: kuma.io/v1alpha1\n  kind: MeshPassthrough\n  metadata:\n    annotations:\n      kubectl.kubernetes.io/last-applied-configuration: |\n        {\"kind\":\"MeshPassthrough\"}\n    creationTimestamp: \"2026-11-20T10:12:31Z\"\n    generation: 1\n    managedFields:\n    - manager: kubectl\n      fieldsV1:\n        f:spec:\n          .: {}\n    name: a\n    namespace: kuma-system\n    resourceVersion: \"184467\"\n    uid: 6f0d8c38-3d0b-4a5e-9b7c-1a2b3c4d5e6f\n  spec: {}\nkind: List\nmetadata:\n  resourceVersion: \"\"\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.len(), 1);
        // `kumactl get meshpassthrough NAME -o yaml` (Universal) writes `kri`.
        let (p, e) = parse(
            "a.yaml",
            "creationTime: \"2026-11-20T10:12:31Z\"\nkri: kri_mp_default___egress_\nmesh: default\nmodificationTime: \"2026-11-20T10:12:31Z\"\nname: egress\nspec: {}\ntype: MeshPassthrough\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.len(), 1);
        // A List still takes no spec.
        let (_, e) = parse(
            "a.yaml",
            "apiVersion: v1\nkind: List\nitems: []\nspec: {}\n",
        );
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("kind List takes only"), "{}", e[0]);
    }

    #[test]
    fn list_kind() {
        let (p, e) = parse(
            "a.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: kuma.io/v1alpha1\n  kind: MeshPassthrough\n  metadata: {name: a}\n  spec: {}\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.len(), 1);
    }
}
