//! The deployment files under `deploy/` are checked like code, so a typo fails CI instead of a
//! rollout:
//!
//! - every YAML document in `deploy/kubernetes/*.yaml` is deserialized into its typed
//!   Kubernetes object (k8s-openapi) by `apiVersion`/`kind`, then serialized back and compared
//!   with the original: k8s-openapi ignores unknown fields, so a field that did not survive the
//!   round trip (`imagePullPolicyy`, a mis-indented key) is reported with its path;
//! - the kustomization lists exactly the manifests that exist;
//! - the ConfigMap's policies load through the agent's own parser and validator;
//! - the DaemonSet's references hang together (volumes, ConfigMap, ServiceAccount, probes on the
//!   admin address, cgroup paths below the mounted host cgroup2, bpffs with Bidirectional
//!   propagation, the proxy address set up by the init container);
//! - the agent arguments, in the DaemonSet and in the systemd unit, parse with the real
//!   `passthrough run` CLI; flags the README documents but the agent does not have yet are checked for
//!   their value's shape and reported;
//! - the systemd unit runs `passthrough run` with a `--policy` directory and `--workloads` file
//!   that exist in the documented layout (`deploy/systemd/etc/passthrough/` = `/etc/passthrough/`)
//!   and are valid.
//!
//! No cluster, no Docker engine and no root needed: it only reads files.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use clap::{Args as _, FromArgMatches as _};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    serde::{Serialize, de::DeserializeOwned},
};
use passthrough_policy as policy;
use passthrough_user::agent::RunArgs;
use serde::Deserialize;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn k8s_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

// ---------------------------------------------------------------------------------------------
// Typed parsing with a round trip.

/// Where a document came from, for messages.
struct Doc {
    file: PathBuf,
    index: usize,
    value: Value,
}

impl Doc {
    fn at(&self) -> String {
        format!("{} (document {})", self.file.display(), self.index + 1)
    }
    fn kind(&self) -> &str {
        self.value.get("kind").and_then(Value::as_str).unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// Every non-empty YAML document of every `*.yaml`/`*.yml` in `deploy/kubernetes` except the
/// kustomization, as JSON values.
fn manifests() -> Vec<Doc> {
    let mut out = Vec::new();
    for file in manifest_files() {
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (index, de) in yaml_serde::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(de).unwrap_or_else(|e| {
                panic!("{} (document {}): not YAML: {e}", file.display(), index + 1)
            });
            if !value.is_null() {
                out.push(Doc {
                    file: file.clone(),
                    index,
                    value,
                });
            }
        }
    }
    assert!(!out.is_empty(), "no manifests in {}", k8s_dir().display());
    out
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .expect("deploy/kubernetes")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .filter(|p| !is_kustomization(p))
        .collect();
    files.sort();
    files
}

fn is_kustomization(p: &Path) -> bool {
    matches!(
        p.file_name().and_then(|n| n.to_str()),
        Some("kustomization.yaml" | "kustomization.yml" | "Kustomization")
    )
}

/// Deserializes `doc` as `T`, serializes it back and reports every field of the original that
/// did not come back, or came back different (k8s-openapi drops unknown fields silently).
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let obj: T = serde_json::from_value(doc.clone()).map_err(|e| format!("does not parse: {e}"))?;
    let back = serde_json::to_value(&obj).map_err(|e| format!("does not serialize: {e}"))?;
    let mut lost = Vec::new();
    diff(doc, &back, String::new(), &mut lost);
    if lost.is_empty() {
        Ok(obj)
    } else {
        Err(format!(
            "fields lost or changed in the typed round trip (typo? wrong place?): {}",
            lost.join(", ")
        ))
    }
}

fn diff(orig: &Value, back: &Value, path: String, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => diff(v, w, p, out),
                    // An explicit null/empty that the typed object leaves out is not a typo.
                    None if v.is_null() => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                diff(v, w, format!("{path}[{i}]"), out);
            }
        }
        // Numbers may come back as another JSON number type (1 vs 1.0); compare by value.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path} ({a} became {b})")),
    }
}

/// The typed objects of the deployment, by kind.
#[derive(Default)]
struct Objects {
    daemonsets: Vec<(String, DaemonSet)>,
    configmaps: Vec<(String, ConfigMap)>,
    service_accounts: Vec<ServiceAccount>,
    namespaces: Vec<Namespace>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
}

fn parse_all(docs: &[Doc]) -> Objects {
    let mut objs = Objects::default();
    let mut errors = Vec::new();
    for d in docs {
        let api = d
            .value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let r: Result<(), String> = match (api, d.kind()) {
            ("apps/v1", "DaemonSet") => {
                typed::<DaemonSet>(&d.value).map(|o| objs.daemonsets.push((d.at(), o)))
            }
            ("v1", "ConfigMap") => {
                typed::<ConfigMap>(&d.value).map(|o| objs.configmaps.push((d.at(), o)))
            }
            ("v1", "ServiceAccount") => {
                typed::<ServiceAccount>(&d.value).map(|o| objs.service_accounts.push(o))
            }
            ("v1", "Namespace") => typed::<Namespace>(&d.value).map(|o| objs.namespaces.push(o)),
            ("v1", "Service") => typed::<Service>(&d.value).map(drop),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                typed::<ClusterRole>(&d.value).map(|o| objs.cluster_roles.push(o))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                typed::<ClusterRoleBinding>(&d.value).map(|o| objs.cluster_role_bindings.push(o))
            }
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                typed::<CustomResourceDefinition>(&d.value).map(drop)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => typed::<Role>(&d.value).map(drop),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                typed::<RoleBinding>(&d.value).map(drop)
            }
            (api, kind) => Err(format!(
                "unexpected apiVersion/kind {api:?}/{kind:?} (add it to parse_all)"
            )),
        };
        if let Err(e) = r {
            errors.push(format!("{} {} {:?}: {e}", d.at(), d.kind(), d.name()));
        }
        if d.name().is_empty() {
            errors.push(format!("{}: metadata.name is missing", d.at()));
        }
    }
    assert!(errors.is_empty(), "manifest errors:\n{}", errors.join("\n"));
    objs
}

#[test]
fn every_manifest_is_a_typed_kubernetes_object() {
    let docs = manifests();
    let objs = parse_all(&docs);
    assert_eq!(objs.daemonsets.len(), 1, "exactly one DaemonSet");
    assert!(!objs.service_accounts.is_empty(), "a ServiceAccount");
    assert_eq!(
        objs.cluster_roles.len(),
        1,
        "one ClusterRole (what the agent reads)"
    );
    // Names are unique per kind.
    let mut seen = BTreeSet::new();
    for d in &docs {
        assert!(
            seen.insert((d.kind().to_owned(), d.name().to_owned())),
            "{}: duplicate {} {}",
            d.at(),
            d.kind(),
            d.name()
        );
    }
}

/// The checker itself: a misspelt field must be caught, not silently dropped.
#[test]
fn the_round_trip_catches_a_misspelt_field() {
    let good: Value = yaml_serde::from_str(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x, namespace: y}\nautomountServiceAccountToken: false\n",
    )
    .unwrap();
    typed::<ServiceAccount>(&good).expect("valid");
    let bad: Value = yaml_serde::from_str(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers:\n        - name: c\n          image: i\n          imagePullPolicyy: Always\n",
    )
    .unwrap();
    let err = typed::<DaemonSet>(&bad).expect_err("typo must fail");
    assert!(
        err.contains(".spec.template.spec.containers[0].imagePullPolicyy"),
        "{err}"
    );
    // A value in the wrong type fails the typed parse itself.
    let wrong: Value =
        yaml_serde::from_str("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: [a]\n")
            .unwrap();
    assert!(typed::<ConfigMap>(&wrong).is_err());
}

// ---------------------------------------------------------------------------------------------
// Kustomization.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Kustomization {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<KustomizeImage>,
    #[serde(default)]
    labels: Vec<Value>,
    #[serde(default)]
    patches: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct KustomizeImage {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
    digest: Option<String>,
}

fn kustomization() -> Kustomization {
    let path = k8s_dir().join("kustomization.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/kubernetes/kustomization.yaml");
    yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn kustomization_lists_every_manifest() {
    let k = kustomization();
    assert_eq!(k.api_version, "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k.kind, "Kustomization");
    let listed: BTreeSet<PathBuf> = k.resources.iter().map(|r| k8s_dir().join(r)).collect();
    assert_eq!(
        listed.len(),
        k.resources.len(),
        "a resource is listed twice"
    );
    for r in &listed {
        assert!(
            r.is_file(),
            "kustomization lists {} which does not exist",
            r.display()
        );
    }
    let present: BTreeSet<PathBuf> = manifest_files().into_iter().collect();
    let unlisted: Vec<_> = present.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "manifests missing from kustomization.yaml: {unlisted:?}"
    );

    // Every namespaced object is in the kustomization's namespace, so `kubectl apply -f` of the
    // files alone lands in the same place as `kubectl apply -k`.
    let docs = manifests();
    let images: Vec<String> = docs
        .iter()
        .filter(|d| d.kind() == "DaemonSet")
        .flat_map(|d| containers_of(&d.value))
        .filter_map(|c| c.get("image").and_then(Value::as_str).map(str::to_owned))
        .collect();
    if let Some(ns) = &k.namespace {
        for d in docs
            .iter()
            .filter(|d| d.kind() != "Namespace" && !d.kind().starts_with("Cluster"))
        {
            let got = d
                .value
                .pointer("/metadata/namespace")
                .and_then(Value::as_str);
            assert_eq!(got, Some(ns.as_str()), "{}: metadata.namespace", d.at());
        }
        if docs.iter().any(|d| d.kind() == "Namespace") {
            assert!(
                docs.iter()
                    .any(|d| d.kind() == "Namespace" && d.name() == ns),
                "Namespace {ns} is not defined"
            );
        }
    }
    // An `images:` override must name an image the manifests use, or it silently does nothing.
    for i in &k.images {
        assert!(
            images.iter().any(|img| img == &i.name
                || img.starts_with(&format!("{}:", i.name))
                || img.starts_with(&format!("{}@", i.name))),
            "kustomization images: {} is used by no container ({images:?})",
            i.name
        );
    }
}

fn containers_of(ds: &Value) -> Vec<&Value> {
    [
        "/spec/template/spec/initContainers",
        "/spec/template/spec/containers",
    ]
    .iter()
    .filter_map(|p| ds.pointer(p).and_then(Value::as_array))
    .flatten()
    .collect()
}

// ---------------------------------------------------------------------------------------------
// The agent's command line.

/// Every flag the README gives `passthrough run` (`--log-format` is global); docs/cli.md is
/// generated from the binary itself (`passthrough-user/tests/cli_reference.rs`).
const DOCUMENTED_RUN_FLAGS: &[&str] = &[
    "policy",
    "cgroup",
    "workloads",
    "attach-cgroup",
    "mesh",
    "proxy-addr",
    "admin-addr",
    "resolver",
    "internal-cidr",
    "unselected-mode",
    "domain-destination",
    "audit",
    "state-dir",
    "log-format",
];

/// Checks the value of a flag the README documents but the agent does not implement yet (so clap
/// cannot); `None` for a flag that takes no value.
fn pending_flag_value(flag: &str, value: Option<&str>) -> Result<(), String> {
    let v = || value.ok_or_else(|| format!("--{flag} needs a value"));
    match flag {
        "proxy-addr" => v()?
            .parse::<SocketAddr>()
            .map(drop)
            .map_err(|e| format!("--proxy-addr: {e}")),
        "domain-destination" => match v()? {
            "verify" | "resolve" | "original" => Ok(()),
            other => Err(format!(
                "--domain-destination {other:?}: one of verify, resolve, original"
            )),
        },
        "admin-addr" | "resolver" => v().map(drop),
        "audit" => match value {
            None => Ok(()),
            Some(_) => Err("--audit takes no value".into()),
        },
        _ => v().map(drop),
    }
}

/// The `run` command as the agent defines it, plus the global `--log-format`.
fn run_command() -> clap::Command {
    let cmd = RunArgs::augment_args(clap::Command::new("passthrough-run").no_binary_name(true));
    if cmd
        .get_arguments()
        .any(|a| a.get_long() == Some("log-format"))
    {
        return cmd;
    }
    cmd.arg(
        clap::Arg::new("log-format")
            .long("log-format")
            .value_parser(["text", "json"]),
    )
}

/// Flag name (without `--`) → every value given for it.
type FlagValues = BTreeMap<String, Vec<String>>;

/// Parses `passthrough run` arguments (without the leading `run`). Returns the flag values by
/// name (both `--f v` and `--f=v`) and notes about documented flags the agent does not have yet.
fn check_run_args(args: &[String]) -> Result<(FlagValues, Vec<String>), String> {
    let cmd = run_command();
    let known: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    let takes_value = |f: &str| {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(f))
            .map(|a| a.get_action().takes_values())
            .unwrap_or(f != "audit")
    };
    let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut for_clap = Vec::new();
    let mut notes = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let tok = &args[i];
        let Some(flag) = tok.strip_prefix("--") else {
            return Err(format!("unexpected positional argument {tok:?}"));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (flag.to_owned(), None),
        };
        if !DOCUMENTED_RUN_FLAGS.contains(&name.as_str()) && !known.contains(&name) {
            return Err(format!(
                "--{name} is not a flag of `passthrough run` (README, docs/cli.md)"
            ));
        }
        let mut consumed = vec![tok.clone()];
        let value = match inline {
            Some(v) => Some(v),
            None if takes_value(&name) => {
                let v = args
                    .get(i + 1)
                    .filter(|v| !v.starts_with("--"))
                    .ok_or_else(|| format!("--{name} needs a value"))?;
                consumed.push(v.clone());
                i += 1;
                Some(v.clone())
            }
            None => None,
        };
        i += 1;
        values
            .entry(name.clone())
            .or_default()
            .extend(value.clone());
        if known.contains(&name) {
            for_clap.extend(consumed);
        } else {
            pending_flag_value(&name, value.as_deref())?;
            notes.push(format!(
                "--{name}: documented, not in the agent yet (value shape checked only)"
            ));
        }
    }
    let matches = cmd
        .try_get_matches_from(&for_clap)
        .map_err(|e| format!("the agent's CLI rejects {for_clap:?}:\n{e}"))?;
    RunArgs::from_arg_matches(&matches).map_err(|e| e.to_string())?;
    Ok((values, notes))
}

#[test]
fn the_argument_checker_rejects_what_the_agent_would() {
    let ok = |a: &[&str]| check_run_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    ok(&[
        "--policy",
        "/p",
        "--admin-addr=127.0.0.1:9901",
        "--audit",
        "--proxy-addr=169.254.20.11:15001",
    ])
    .expect("valid");
    assert!(
        ok(&["--policy=/p", "--admin-adr=127.0.0.1:9901"]).is_err(),
        "misspelt flag"
    );
    assert!(
        ok(&["--policy=/p", "--admin-addr=localhost"]).is_err(),
        "not a socket address"
    );
    assert!(
        ok(&["--policy=/p", "--unselected-mode=matched"]).is_err(),
        "modes are spelt as Kuma does"
    );
    assert!(
        ok(&["--policy=/p", "--internal-cidr=10.0.0.0/33"]).is_err(),
        "bad CIDR"
    );
    assert!(
        ok(&["--policy=/p", "--domain-destination=trust"]).is_err(),
        "bad mode"
    );
    assert!(
        ok(&["--admin-addr=127.0.0.1:9901"]).is_err(),
        "--policy is required"
    );
    assert!(ok(&["--policy=/p", "--log-format=yaml"]).is_err());
}

// ---------------------------------------------------------------------------------------------
// The DaemonSet.

fn under(path: &str, dir: &str) -> bool {
    Path::new(path).starts_with(dir)
}

#[test]
fn daemonset_hangs_together() {
    let docs = manifests();
    let objs = parse_all(&docs);
    let (at, ds) = &objs.daemonsets[0];
    let spec = &ds.spec;
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let mut problems: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: &str| {
        if !ok {
            problems.push(what.to_owned());
        }
    };

    // Selector selects the template.
    let tmpl_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in spec.selector.match_labels.clone().unwrap_or_default() {
        check(
            tmpl_labels.get(&k) == Some(&v),
            &format!("selector {k}={v} does not match the pod template"),
        );
    }
    check(
        pod.host_network == Some(true),
        "hostNetwork: true (proxy on a node address, admin on the node's loopback)",
    );
    check(
        pod.tolerations
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "a toleration `operator: Exists` so every node runs the agent",
    );
    let sa = pod.service_account_name.as_deref().unwrap_or("default");
    check(
        objs.service_accounts
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(sa)),
        &format!("ServiceAccount {sa} is not defined"),
    );

    let volumes = pod.volumes.clone().unwrap_or_default();
    let vol = |name: &str| volumes.iter().find(|v| v.name == name);
    let host_path_of = |name: &str| {
        vol(name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };

    let containers: Vec<&Container> = pod
        .init_containers
        .iter()
        .flatten()
        .chain(pod.containers.iter())
        .collect();
    for c in &containers {
        let res = c.resources.as_ref();
        let requests = res.and_then(|r| r.requests.clone()).unwrap_or_default();
        check(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            &format!("container {}: resources.requests cpu and memory", c.name),
        );
        let limits = res.and_then(|r| r.limits.clone()).unwrap_or_default();
        check(
            limits.contains_key("cpu"),
            &format!("container {}: resources.limits.cpu", c.name),
        );
        for m in c.volume_mounts.iter().flatten() {
            check(
                vol(&m.name).is_some(),
                &format!("container {}: volumeMount {} has no volume", c.name, m.name),
            );
        }
        check(c.image.is_some(), &format!("container {}: image", c.name));
    }
    for v in &volumes {
        if let Some(cm) = &v.config_map {
            check(
                objs.configmaps
                    .iter()
                    .any(|(_, o)| o.metadata.name.as_deref() == Some(cm.name.as_str())),
                &format!("volume {}: ConfigMap {} is not defined", v.name, cm.name),
            );
        }
    }

    let agent = pod.containers.iter().find(|c| {
        c.args
            .as_deref()
            .unwrap_or_default()
            .first()
            .map(String::as_str)
            == Some("run")
    });
    let Some(agent) = agent else {
        panic!("{at}: no container runs `passthrough run` (args: [run, ...])")
    };
    // Not privileged: explicit capabilities (docs/kubernetes.md says which and why).
    let sc = agent.security_context.clone().unwrap_or_default();
    check(sc.privileged != Some(true), "agent: not privileged");
    let caps = sc.capabilities.clone().unwrap_or_default();
    check(
        caps.drop.as_deref() == Some(&["ALL".to_string()][..]),
        "agent: capabilities.drop [ALL]",
    );
    let added: BTreeSet<String> = caps.add.clone().unwrap_or_default().into_iter().collect();
    let want: BTreeSet<String> = ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    check(
        added == want,
        &format!("agent: capabilities.add {want:?}, got {added:?}"),
    );
    // No memory limit by default: an OOM kill would stop the proxy (docs/kubernetes.md).
    check(
        !agent
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some_and(|l| l.contains_key("memory")),
        "agent: no default memory limit",
    );
    check(
        agent
            .startup_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .is_some_and(|g| g.path.as_deref() == Some("/readyz")),
        "agent: a startupProbe on /readyz",
    );
    // The downward API gives the node and the agent's own pod.
    let env: BTreeMap<String, String> = agent
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let f = e.value_from.as_ref()?.field_ref.as_ref()?;
            Some((e.name.clone(), f.field_path.clone()))
        })
        .collect();
    for (name, path) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        check(
            env.get(name).map(String::as_str) == Some(path),
            &format!("agent: env {name} from the downward API's {path}"),
        );
    }
    // RBAC: get/list/watch on exactly what the agent reads, bound to its ServiceAccount.
    let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
    for role in &objs.cluster_roles {
        for r in role.rules.iter().flatten() {
            for g in r.api_groups.iter().flatten() {
                for res in r.resources.iter().flatten() {
                    for v in &r.verbs {
                        granted.insert((g.clone(), res.clone(), v.clone()));
                    }
                }
            }
        }
    }
    let mut wanted = BTreeSet::new();
    for (g, res) in [
        ("", "pods"),
        ("", "nodes"),
        ("", "namespaces"),
        ("", "services"),
        ("kuma.io", "meshpassthroughs"),
        ("discovery.k8s.io", "endpointslices"),
        ("apps", "replicasets"),
        ("batch", "jobs"),
    ] {
        for v in ["get", "list", "watch"] {
            wanted.insert((g.to_string(), res.to_string(), v.to_string()));
        }
    }
    check(
        granted == wanted,
        &format!("ClusterRole grants {granted:?}, the agent needs exactly {wanted:?}"),
    );
    check(
        objs.cluster_role_bindings.iter().any(|b| {
            b.subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == sa
                    && s.namespace.as_deref() == ds.metadata.namespace.as_deref()
            }) && objs
                .cluster_roles
                .iter()
                .any(|r| r.metadata.name.as_deref() == Some(b.role_ref.name.as_str()))
        }),
        &format!("a ClusterRoleBinding of the ClusterRole to ServiceAccount {sa}"),
    );
    check(
        pod.automount_service_account_token != Some(false),
        "the agent needs its ServiceAccount token",
    );
    let mounts = agent.volume_mounts.clone().unwrap_or_default();
    let mount_of = |dest: &str| {
        mounts
            .iter()
            .filter(|m| under(dest, &m.mount_path))
            .max_by_key(|m| m.mount_path.len())
    };

    // bpffs at /sys/fs/bpf from the host. Bidirectional propagation (so a bpffs mounted in
    // the pod is the host's) needs a privileged container: the init container mounts it; the
    // agent sees it with HostToContainer.
    let bpf = mounts.iter().find(|m| m.mount_path == "/sys/fs/bpf");
    check(
        bpf.is_some_and(|m| m.mount_propagation.as_deref() == Some("HostToContainer")),
        "agent: /sys/fs/bpf mounted with mountPropagation: HostToContainer",
    );
    check(
        pod.init_containers.iter().flatten().any(|c| {
            c.security_context.as_ref().and_then(|s| s.privileged) == Some(true)
                && c.volume_mounts.iter().flatten().any(|m| {
                    m.mount_propagation.as_deref() == Some("Bidirectional")
                        && host_path_of(&m.name).as_deref() == Some("/sys/fs/bpf")
                })
                && c.command
                    .iter()
                    .flatten()
                    .any(|l| l.contains("mount -t bpf"))
        }),
        "a privileged init container mounts bpffs on the host's /sys/fs/bpf (Bidirectional)",
    );
    check(
        bpf.and_then(|m| host_path_of(&m.name)).as_deref() == Some("/sys/fs/bpf"),
        "agent: /sys/fs/bpf is the host's /sys/fs/bpf",
    );

    // The arguments.
    let args = agent.args.clone().unwrap_or_default();
    let (flags, notes) =
        check_run_args(&args[1..]).unwrap_or_else(|e| panic!("{at}: agent args: {e}"));
    for n in notes {
        eprintln!("note: {at}: {n}");
    }
    let one = |f: &str| flags.get(f).and_then(|v| v.last()).cloned();

    // Cgroup paths: absolute, below the host cgroup2 mount (a hostPath of /sys/fs/cgroup or its
    // hybrid /sys/fs/cgroup/unified).
    let cgroup_mounts: Vec<&str> = mounts
        .iter()
        .filter(|m| {
            host_path_of(&m.name)
                .is_some_and(|p| p == "/sys/fs/cgroup" || p == "/sys/fs/cgroup/unified")
        })
        .map(|m| m.mount_path.as_str())
        .collect();
    check(
        !cgroup_mounts.is_empty(),
        "agent: the host's cgroup2 (/sys/fs/cgroup) mounted from a hostPath",
    );
    check(
        flags.contains_key("kubernetes"),
        "agent: --kubernetes (pods and policies from the API server)",
    );
    for root in flags.get("cgroup-root").into_iter().flatten() {
        check(
            cgroup_mounts.contains(&root.as_str()),
            &format!("--cgroup-root {root} must be the host cgroup2 mount {cgroup_mounts:?}"),
        );
    }
    check(
        flags.contains_key("cgroup-root") || flags.contains_key("kubepods-cgroup"),
        "agent: --cgroup-root (the host's cgroup2) or --kubepods-cgroup",
    );
    let attach = flags.get("attach-cgroup").cloned().unwrap_or_default();
    for p in attach
        .iter()
        .chain(flags.get("kubepods-cgroup").into_iter().flatten())
        .chain(flags.get("cgroup").into_iter().flatten())
    {
        check(
            cgroup_mounts.iter().any(|m| under(p, m) && p != m),
            &format!(
                "cgroup path {p} must be absolute and below the host cgroup2 mount {cgroup_mounts:?}"
            ),
        );
        let leaf = Path::new(p)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        check(
            matches!(leaf, "kubepods.slice" | "kubepods"),
            &format!(
                "--attach-cgroup {p}: the kubelet's pod parent is kubepods.slice (systemd driver) or kubepods (cgroupfs)"
            ),
        );
    }

    // --policy: the ConfigMap's mount; its policies load through the agent's parser.
    let policy_dirs = flags.get("policy").cloned().unwrap_or_default();
    let mesh = one("mesh").unwrap_or_else(|| "default".into());
    for p in &policy_dirs {
        let m = mount_of(p).unwrap_or_else(|| panic!("--policy {p} is on no volume mount"));
        let cm_name = vol(&m.name)
            .and_then(|v| v.config_map.as_ref())
            .map(|c| c.name.clone());
        let Some(cm_name) = cm_name else {
            panic!("--policy {p} is not a ConfigMap mount")
        };
        let (cm_at, cm) = objs
            .configmaps
            .iter()
            .find(|(_, o)| o.metadata.name.as_deref() == Some(cm_name.as_str()))
            .expect("checked above");
        let n = check_policies(cm_at, cm, &mesh);
        check(
            n > 0,
            &format!("ConfigMap {cm_name}: no policy for mesh {mesh}"),
        );
    }

    // --workloads: on a mounted volume.
    for w in flags.get("workloads").into_iter().flatten() {
        check(
            mount_of(w).is_some(),
            &format!("--workloads {w} is on no volume mount"),
        );
    }

    // Probes on the admin server.
    let admin: SocketAddr = one("admin-addr")
        .unwrap_or_else(|| "127.0.0.1:9901".into())
        .parse()
        .expect("checked by clap");
    for (probe, path) in [
        (agent.readiness_probe.as_ref(), "/readyz"),
        (agent.liveness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe.and_then(|p| p.http_get.as_ref());
        check(
            get.is_some_and(|g| g.path.as_deref() == Some(path)),
            &format!("agent: a probe with httpGet {path}"),
        );
        if let Some(g) = get {
            let port_ok = match g.port.clone() {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => {
                    p == i32::from(admin.port())
                }
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(_) => false,
            };
            check(
                port_ok,
                &format!(
                    "probe {path}: port must be the --admin-addr port {}",
                    admin.port()
                ),
            );
            // On loopback the kubelet must be told the host; on any other address the pod IP
            // (the node's, hostNetwork) must be what the agent listens on.
            if admin.ip().is_loopback() {
                check(
                    g.host.as_deref().and_then(|h| h.parse::<IpAddr>().ok()) == Some(admin.ip()),
                    &format!("probe {path}: host {} (admin is on loopback)", admin.ip()),
                );
            }
        }
    }

    // The proxy address: link-local (or loopback for host-only use), created by the init
    // container on a dummy interface.
    if let Some(proxy) = one("proxy-addr") {
        let addr: SocketAddr = proxy.parse().expect("checked");
        let link_local = match addr.ip() {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        check(
            link_local,
            &format!(
                "--proxy-addr {proxy}: pods need a node-local link-local address, not loopback (a pod's 127.0.0.1 is its own netns)"
            ),
        );
        let setup: String = pod
            .init_containers
            .iter()
            .flatten()
            .flat_map(|c| c.command.iter().flatten().chain(c.args.iter().flatten()))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        check(
            setup.contains("type dummy"),
            "an init container creates the dummy interface",
        );
        check(
            setup.contains(&format!("{}/", addr.ip())),
            &format!("an init container assigns {} to it", addr.ip()),
        );
    }

    assert!(problems.is_empty(), "{at}:\n{}", problems.join("\n"));
}

/// Loads every policy of a ConfigMap with the agent's parser, one key at a time (so a message
/// names the key) and all together (so cross-file duplicates fail as they would in the agent).
/// Returns the number of policies.
fn check_policies(at: &str, cm: &ConfigMap, mesh: &str) -> usize {
    let data = cm.data.clone().unwrap_or_default();
    assert!(
        cm.binary_data.is_none(),
        "{at}: binaryData is not read as policies"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for (key, text) in &data {
        assert!(
            policy::parse::is_policy_file(Path::new(key)),
            "{at}: key {key}: the agent only reads *.yaml, *.yml, *.json"
        );
        let set = policy::load_policy_bytes(Path::new(key), text.as_bytes(), mesh)
            .unwrap_or_else(|e| panic!("{at}: key {key}: invalid policy:\n{e}"));
        assert!(
            !set.is_empty(),
            "{at}: key {key}: no MeshPassthrough for mesh {mesh}"
        );
        assert!(set.notes().is_empty(), "{at}: key {key}: {:?}", set.notes());
        std::fs::write(dir.path().join(key), text).expect("write");
    }
    let all = policy::load_policies(&[dir.path().to_path_buf()], mesh)
        .unwrap_or_else(|e| panic!("{at}: policies together:\n{e}"));
    all.len()
}

// ---------------------------------------------------------------------------------------------
// systemd.

/// `[Section] Key=Value` with `\` continuations; repeated keys keep every value.
fn parse_unit(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    let mut logical = String::new();
    for raw in text.lines() {
        let line = raw.trim_end();
        if logical.is_empty()
            && (line.trim_start().starts_with('#') || line.trim_start().starts_with(';'))
        {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            logical.push_str(cont);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let l = std::mem::take(&mut logical);
        let l = l.trim();
        if l.is_empty() {
            continue;
        }
        if l.starts_with('[') && l.ends_with(']') {
            section = l[1..l.len() - 1].to_owned();
            continue;
        }
        let (k, v) = l
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line without `=`: {l:?}"));
        out.entry(section.clone())
            .or_default()
            .entry(k.trim().to_owned())
            .or_default()
            .push(v.trim().to_owned());
    }
    out
}

/// `deploy/systemd/etc/...` holds what goes to `/etc/...` on the host.
fn in_layout(host_path: &str) -> PathBuf {
    let rel = host_path
        .strip_prefix("/etc/")
        .unwrap_or_else(|| panic!("{host_path}: the documented layout is below /etc/passthrough"));
    repo().join("deploy/systemd/etc").join(rel)
}

#[test]
fn systemd_unit_runs_the_agent_on_the_documented_layout() {
    let path = repo().join("deploy/systemd/passthrough.service");
    let unit =
        parse_unit(&std::fs::read_to_string(&path).expect("deploy/systemd/passthrough.service"));
    let service = unit.get("Service").expect("[Service]");
    let get = |k: &str| service.get(k).and_then(|v| v.last()).map(String::as_str);
    assert!(
        unit.contains_key("Unit") && unit.contains_key("Install"),
        "[Unit] and [Install]"
    );
    assert!(
        matches!(get("Type"), Some("exec" | "simple")),
        "Type=exec or simple"
    );
    assert_eq!(get("Restart"), Some("always"));
    assert!(
        get("ExecReload").is_some_and(|r| r.contains("-HUP")),
        "ExecReload sends SIGHUP"
    );

    let exec = service.get("ExecStart").expect("ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart");
    let tokens: Vec<String> = exec[0].split_whitespace().map(str::to_owned).collect();
    assert!(
        tokens[0].starts_with('/') && tokens[0].ends_with("/passthrough"),
        "ExecStart runs the passthrough binary by absolute path: {}",
        tokens[0]
    );
    assert_eq!(
        tokens.get(1).map(String::as_str),
        Some("run"),
        "ExecStart is `passthrough run ...`"
    );
    let (flags, notes) = check_run_args(&tokens[2..])
        .unwrap_or_else(|e| panic!("{}: ExecStart: {e}", path.display()));
    for n in notes {
        eprintln!("note: {}: {n}", path.display());
    }
    let admin = flags
        .get("admin-addr")
        .and_then(|v| v.last())
        .expect("--admin-addr");
    assert!(
        admin.parse::<SocketAddr>().unwrap().ip().is_loopback(),
        "admin on loopback"
    );
    assert!(
        flags.contains_key("attach-cgroup")
            || flags.contains_key("cgroup")
            || flags.contains_key("workloads"),
        "something to attach to"
    );

    let mesh = flags
        .get("mesh")
        .and_then(|v| v.last())
        .cloned()
        .unwrap_or_else(|| "default".into());
    let policies = flags.get("policy").expect("--policy");
    for p in policies {
        let local = in_layout(p);
        assert!(
            local.exists(),
            "--policy {p}: {} is missing from the documented layout",
            local.display()
        );
        let set = policy::load_policies(std::slice::from_ref(&local), &mesh)
            .unwrap_or_else(|e| panic!("{}:\n{e}", local.display()));
        assert!(
            !set.is_empty() && set.notes().is_empty(),
            "{}: policies for mesh {mesh}: {:?}",
            local.display(),
            set.notes()
        );
    }
    for w in flags.get("workloads").into_iter().flatten() {
        let local = in_layout(w);
        let ws = policy::workloads::load_workloads(&local)
            .unwrap_or_else(|e| panic!("{}:\n{e}", local.display()));
        assert!(!ws.is_empty(), "{}: an example workload", local.display());
        // Relative workload cgroups resolve against the cgroup2 mount; each must be at or below
        // an --attach-cgroup, as the agent requires.
        for wl in &ws {
            let c = wl.cgroup.to_string_lossy();
            let covered = flags.get("attach-cgroup").is_none_or(|a| {
                a.iter().any(|a| {
                    under(
                        c.trim_start_matches("/sys/fs/cgroup/"),
                        a.trim_start_matches("/sys/fs/cgroup/"),
                    )
                })
            });
            assert!(
                covered,
                "{}: workload {} ({c}) is below no --attach-cgroup",
                local.display(),
                wl.name
            );
        }
    }
    // The docs describe the same layout.
    let docs = std::fs::read_to_string(repo().join("docs/deploy.md")).expect("docs/deploy.md");
    for p in policies {
        assert!(
            docs.contains(p.as_str()),
            "docs/deploy.md does not mention {p}"
        );
    }

    // Capabilities: only what loading/attaching BPF and mounting bpffs needs.
    const ALLOWED: &[&str] = &[
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_SYS_RESOURCE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_RAW",
    ];
    let caps: Vec<&str> = get("CapabilityBoundingSet")
        .expect("CapabilityBoundingSet")
        .split_whitespace()
        .collect();
    for c in &caps {
        assert!(
            ALLOWED.contains(c),
            "CapabilityBoundingSet: {c} is not needed"
        );
    }
    for need in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"] {
        assert!(caps.contains(&need), "CapabilityBoundingSet lacks {need}");
    }
    // Hardening that breaks BPF pinning/attaching must stay off.
    for (k, bad) in [("ProtectKernelTunables", "yes"), ("PrivateNetwork", "yes")] {
        assert_ne!(
            get(k),
            Some(bad),
            "{k}={bad} breaks the agent (see the unit's comments)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering with the real tools: `kubectl kustomize` and `helm template` / `helm lint`.

/// A real `helm` / `kubectl` binary: `$PASSTHROUGH_HELM` / `$PASSTHROUGH_KUBECTL`, else the ones
/// scripts/setup.sh installs in /usr/local/lib/passthrough-tools, else `$PATH`. `None` (test
/// skipped) when there is none, except under `CI=true`, where that fails.
fn tool(name: &str) -> Option<PathBuf> {
    let env = format!("PASSTHROUGH_{}", name.to_ascii_uppercase());
    let candidates = std::env::var_os(&env)
        .map(PathBuf::from)
        .into_iter()
        .chain([Path::new("/usr/local/lib/passthrough-tools").join(name)])
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(name))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        );
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    assert!(
        std::env::var("CI").is_err(),
        "{name} not found (${env}, /usr/local/lib/passthrough-tools, PATH): run scripts/setup.sh"
    );
    eprintln!("skipped: no {name} (run scripts/setup.sh)");
    None
}

fn run_tool(bin: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} {args:?}: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{}{}",
        bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Rendered YAML → documents, each checked strictly against its Kubernetes type.
fn rendered(what: &str, yaml: &str) -> BTreeMap<(String, String), Value> {
    let mut docs = Vec::new();
    for (index, de) in yaml_serde::Deserializer::from_str(yaml).enumerate() {
        let value = Value::deserialize(de).unwrap_or_else(|e| panic!("{what}: not YAML: {e}"));
        if !value.is_null() {
            docs.push(Doc {
                file: PathBuf::from(what),
                index,
                value,
            });
        }
    }
    parse_all(&docs);
    docs.into_iter()
        .map(|d| ((d.kind().to_owned(), d.name().to_owned()), d.value))
        .collect()
}

fn chart() -> PathBuf {
    repo().join("deploy/helm/passthrough")
}

#[test]
fn helm_chart_and_kustomization_render_the_same_valid_objects() {
    let (Some(helm), Some(kubectl)) = (tool("helm"), tool("kubectl")) else {
        return;
    };
    let kust = rendered(
        "kubectl kustomize",
        &run_tool(&kubectl, &["kustomize", &k8s_dir().display().to_string()]),
    );
    let chart = chart().display().to_string();
    run_tool(&helm, &["lint", "--strict", &chart]);
    let helm_default = rendered(
        "helm template",
        &run_tool(
            &helm,
            &[
                "template",
                "passthrough",
                &chart,
                "--namespace",
                "passthrough-system",
            ],
        ),
    );
    let keys = |m: &BTreeMap<(String, String), Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&helm_default), keys(&kust), "the same objects");
    for (k, v) in &kust {
        assert_eq!(
            &helm_default[k], v,
            "{k:?}: the chart's default values must render what deploy/kubernetes holds"
        );
    }
    // The optional CRD, both ways.
    let crd_file = k8s_dir().join("optional/meshpassthrough-crd.yaml");
    let crd = rendered("optional CRD", &std::fs::read_to_string(&crd_file).unwrap());
    let with_crd = rendered(
        "helm template --set installCRD=true",
        &run_tool(
            &helm,
            &[
                "template",
                "passthrough",
                &chart,
                "--set",
                "installCRD=true",
            ],
        ),
    );
    let key = (
        "CustomResourceDefinition".to_string(),
        "meshpassthroughs.kuma.io".to_string(),
    );
    assert_eq!(
        with_crd.get(&key),
        crd.get(&key),
        "the chart's CRD is the optional file's"
    );
}

#[test]
fn helm_values_reach_the_agent() {
    let Some(helm) = tool("helm") else {
        return;
    };
    let chart = chart().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        "governance:\n  kumaInjectionRules: false\n  podSelectors: [\"app=web,tier in (a,b)\"]\n  namespaceSelectors: [team=shop]\n",
    )
    .unwrap();
    let values = values.display().to_string();
    let out = rendered(
        "helm template (values)",
        &run_tool(
            &helm,
            &[
                "template",
                "passthrough",
                &chart,
                "--values",
                &values,
                "--set",
                "proxy.address=169.254.30.1",
                "--set",
                "proxy.port=15555",
                "--set",
                "kuma.zone=east",
                "--set",
                "pendingMode=All",
                "--set",
                "resources.limits.memory=512Mi",
                "--set",
                "cgroup.hostPath=/sys/fs/cgroup/unified",
                "--set",
                "namespace.create=false",
                "--set",
                "proxy.tlsFastPath=false",
            ],
        ),
    );
    assert!(!out.keys().any(|(k, _)| k == "Namespace"));
    let ds = &out[&("DaemonSet".to_string(), "passthrough".to_string())];
    let agent = containers_of(ds)
        .into_iter()
        .find(|c| c["name"] == "agent")
        .expect("agent container");
    let args: Vec<String> = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let (flags, _) = check_run_args(&args[1..]).unwrap_or_else(|e| panic!("{e}"));
    assert!(flags.contains_key("no-kuma-injection-rules"), "{args:?}");
    assert_eq!(flags["pod-selector"], ["app=web,tier in (a,b)"]);
    assert_eq!(flags["namespace-selector"], ["team=shop"]);
    assert_eq!(flags["proxy-addr"], ["169.254.30.1:15555"]);
    assert_eq!(flags["zone"], ["east"]);
    assert_eq!(flags["pending-mode"], ["All"]);
    assert_eq!(flags["tls-fast-path"], ["off"]);
    assert_eq!(agent["resources"]["limits"]["memory"], "512Mi");
    assert_eq!(
        ds.pointer("/spec/template/spec/volumes/0/hostPath/path"),
        Some(&json!("/sys/fs/cgroup/unified"))
    );
    let init = containers_of(ds)
        .into_iter()
        .find(|c| c["name"] == "node-setup")
        .unwrap();
    assert!(
        init["command"][2]
            .as_str()
            .unwrap()
            .contains("169.254.30.1/32")
    );
    // The default turns the fast path on, explicitly (what deploy/kubernetes passes too).
    let out = rendered(
        "helm template (defaults)",
        &run_tool(&helm, &["template", "passthrough", &chart]),
    );
    let ds = &out[&("DaemonSet".to_string(), "passthrough".to_string())];
    let agent = containers_of(ds)
        .into_iter()
        .find(|c| c["name"] == "agent")
        .expect("agent container");
    assert!(
        agent["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--tls-fast-path=on")),
        "{agent}"
    );
    // Anything but a boolean is refused at render time, not passed on as `on`.
    let bad = std::process::Command::new(&helm)
        .args(["template", "passthrough", &chart])
        .args(["--set", "proxy.tlsFastPath=off"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("proxy.tlsFastPath must be true or false, got off"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
