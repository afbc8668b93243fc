//! Issue 3 point 7: parse + validate + merge + compile of a policy set with 100,000 matches.
//! Target: ≤ 300 ms and ≤ 200 MiB peak memory (release).
//!
//! The same 10 policies of 10,000 `appendMatch` entries each (4 `Mesh`, 3 `MeshSubset`, 3
//! `Dataplane`; a mix of IPv4 IPs with ports, IPv4 CIDRs with and without ports, IPv6 IPs and
//! CIDRs, and `Domain` matches, `tls`/`http`, exact and wildcard) are read in the shapes users
//! feed the agent, generated in memory:
//!
//! - `generated`: the original bench input, Kubernetes spelling, half block and half flow style;
//! - `kubectl-yaml`: `kubectl get meshpassthroughs -A -o yaml` — a `v1` `List`, keys sorted,
//!   each item with the metadata the API server and Kuma's webhook add (`managedFields`,
//!   `resourceVersion`, `uid`, labels); applied server-side, since the client-side
//!   `last-applied-configuration` annotation cannot hold 10,000 matches (256 KiB limit);
//! - `kubectl-json`: the same as `kubectl get -o json` writes it;
//! - `kumactl-yaml`: `kumactl export` / `kumactl get -o yaml` (Universal spelling, one document
//!   per resource, a header comment, read-only `creationTime`/`kri` fields).
//!
//! Each is merged for 24 workloads (8 label sets, so several workloads share a configuration
//! and a kernel rule set) and compiled into one plan. Two small real-world sets are parsed too
//! (200 policies of 20 matches): `kubectl-yaml-small` (applied client-side: the whole spec again
//! as one long JSON line in an annotation) and `handwritten` (comments, folded block scalars,
//! anchors and aliases, flow mappings, both quote styles).
//!
//! - `cargo bench -p passthrough-policy --bench policy_pipeline`: criterion, whole pipeline and
//!   each stage;
//! - `cargo bench -p passthrough-policy --bench policy_pipeline -- --figures` (what
//!   `cargo xtask bench policy` runs): in a fresh process, the whole pipeline's median of 11
//!   runs and peak RSS (`VmHWM`) — the two numbers the issue asks for — on `generated`, then
//!   parse + validate (thread CPU time, median of 11) on every input; no criterion.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    hint::black_box,
    path::Path,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group};
use passthrough_policy::{
    self as policy, MergedConf, Mode, PolicySet, Workload,
    plan::{self, KernelPlan, PlanOptions},
};

const POLICIES: usize = 10;
const MATCHES: usize = 100_000;
const WORKLOADS: usize = 24;
const APPS: [&str; 4] = ["web", "api", "db", "batch"];

/// One `appendMatch` entry: type, value, port, protocol.
struct M {
    ty: &'static str,
    value: String,
    port: Option<u32>,
    proto: &'static str,
}

/// The `n`th match of every input (1-based).
fn nth_match(n: u32) -> M {
    let (a, b, c) = ((n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff);
    let (ty, value, port, proto): (&str, String, Option<u32>, &str) = match n % 20 {
        0..=7 => ("IP", format!("10.{a}.{b}.{c}"), Some(1 + n % 60_000), "tcp"),
        8..=10 => (
            "CIDR",
            format!("172.{}.{b}.{}/28", 16 + a % 16, c & 0xf0),
            None,
            "tcp",
        ),
        11..=12 => ("CIDR", format!("100.{a}.{b}.{c}/30"), Some(443), "tls"),
        13 => (
            "IP",
            format!("2001:db8:{a:x}::{b:x}:{c:x}"),
            Some(8443),
            "tcp",
        ),
        14 => ("CIDR", format!("2001:db8:{a:x}:{b:x}::/64"), None, "tcp"),
        15..=16 => ("Domain", format!("svc-{n}.example.com"), Some(443), "tls"),
        17 => (
            "Domain",
            format!("*.team-{n}.example.org"),
            Some(443),
            "tls",
        ),
        18 => ("Domain", format!("api-{n}.example.net"), Some(80), "http"),
        _ => ("Domain", format!("cdn-{n}.example.com"), None, "tls"),
    };
    M {
        ty,
        value,
        port,
        proto,
    }
}

/// `generated`: the original bench input.
fn policy_yaml() -> String {
    let per = MATCHES / POLICIES;
    let mut y = String::with_capacity(MATCHES * 64);
    let mut n = 0u32;
    for p in 0..POLICIES {
        let target = match p {
            0..=3 => "{kind: Mesh}".to_string(),
            4..=6 => format!("{{kind: MeshSubset, tags: {{app: {}}}}}", APPS[p - 4]),
            _ => format!("{{kind: Dataplane, name: w{}}}", p - 7),
        };
        let mode = if p == 0 {
            "\n    passthroughMode: Matched"
        } else {
            ""
        };
        let _ = write!(
            y,
            "---\napiVersion: kuma.io/v1alpha1\nkind: MeshPassthrough\nmetadata:\n  name: egress-{p}\n  namespace: kuma-system\n  labels:\n    kuma.io/mesh: default\nspec:\n  targetRef: {target}\n  default:{mode}\n    appendMatch:\n"
        );
        let block = p % 2 == 0;
        for _ in 0..per {
            n += 1;
            let M {
                ty,
                value,
                port,
                proto,
            } = nth_match(n);
            if block {
                let _ = write!(y, "    - type: {ty}\n      value: \"{value}\"\n");
                if let Some(port) = port {
                    let _ = writeln!(y, "      port: {port}");
                }
                let _ = writeln!(y, "      protocol: {proto}");
            } else {
                let _ = write!(y, "    - {{type: {ty}, value: '{value}'");
                if let Some(port) = port {
                    let _ = write!(y, ", port: {port}");
                }
                let _ = writeln!(y, ", protocol: {proto}}}");
            }
        }
    }
    y
}

/// Policy `p`'s targetRef as block YAML lines at indentation `ind`, and as JSON.
fn target(p: usize, ind: &str) -> (String, String) {
    match p % POLICIES {
        0..=3 => (format!("{ind}kind: Mesh\n"), r#"{"kind":"Mesh"}"#.into()),
        q @ 4..=6 => (
            format!(
                "{ind}kind: MeshSubset\n{ind}tags:\n{ind}  app: {}\n",
                APPS[q - 4]
            ),
            format!(
                r#"{{"kind":"MeshSubset","tags":{{"app":"{}"}}}}"#,
                APPS[q - 4]
            ),
        ),
        q => (
            format!("{ind}kind: Dataplane\n{ind}name: w{}\n", q - 7),
            format!(r#"{{"kind":"Dataplane","name":"w{}"}}"#, q - 7),
        ),
    }
}

/// A value as Go's YAML encoder writes it: quoted only where a plain scalar would not do.
fn go_yaml_str(v: &str) -> String {
    if v.starts_with('*') {
        format!("'{v}'")
    } else {
        v.to_string()
    }
}

/// Matches `first..first+count` as a block sequence at indentation `ind`, keys sorted.
fn matches_block(y: &mut String, first: u32, count: usize, ind: &str) {
    for n in first..first + count as u32 {
        let m = nth_match(n);
        let mut lead = "-";
        if let Some(port) = m.port {
            let _ = writeln!(y, "{ind}{lead} port: {port}");
            lead = " ";
        }
        let _ = writeln!(y, "{ind}{lead} protocol: {}", m.proto);
        let _ = writeln!(y, "{ind}  type: {}", m.ty);
        let _ = writeln!(y, "{ind}  value: {}", go_yaml_str(&m.value));
    }
}

/// Matches `first..first+count` as a JSON array, keys sorted; `pretty`: one field a line at
/// indentation `ind` (kubectl's `-o json`), else on one line.
fn matches_json(first: u32, count: usize, pretty: Option<&str>) -> String {
    let mut j = String::from("[");
    for n in first..first + count as u32 {
        let m = nth_match(n);
        if n > first {
            j.push(',');
        }
        let mut fields = Vec::new();
        if let Some(port) = m.port {
            fields.push(format!(r#""port": {port}"#));
        }
        fields.push(format!(r#""protocol": "{}""#, m.proto));
        fields.push(format!(r#""type": "{}""#, m.ty));
        fields.push(format!(r#""value": "{}""#, m.value));
        match pretty {
            Some(ind) => {
                let _ = write!(
                    j,
                    "\n{ind}    {{\n{ind}        {}\n{ind}    }}",
                    fields.join(&format!(",\n{ind}        "))
                );
            }
            None => {
                let _ = write!(j, "{{{}}}", fields.join(",").replace(": ", ":"));
            }
        }
    }
    if let Some(ind) = pretty {
        let _ = write!(j, "\n{ind}");
    }
    j.push(']');
    j
}

/// `kubectl get meshpassthroughs -A -o yaml` of `policies` policies of `per` matches.
/// `client_side`: applied with `kubectl apply` (the spec again as one JSON line in the
/// `last-applied-configuration` annotation); else with `kubectl apply --server-side`.
fn kubectl_yaml(policies: usize, per: usize, client_side: bool) -> String {
    let mut y = String::with_capacity(policies * per * 90 + 4096);
    y.push_str("apiVersion: v1\nitems:\n");
    let mut first = 1u32;
    for p in 0..policies {
        let matched = p == 0;
        y.push_str("- apiVersion: kuma.io/v1alpha1\n  kind: MeshPassthrough\n  metadata:\n");
        if client_side {
            let mode = if matched {
                r#","passthroughMode":"Matched""#
            } else {
                ""
            };
            let _ = write!(
                y,
                "    annotations:\n      kubectl.kubernetes.io/last-applied-configuration: |\n        {{\"apiVersion\":\"kuma.io/v1alpha1\",\"kind\":\"MeshPassthrough\",\"metadata\":{{\"annotations\":{{}},\"labels\":{{\"kuma.io/mesh\":\"default\"}},\"name\":\"egress-{p}\",\"namespace\":\"kuma-system\"}},\"spec\":{{\"default\":{{\"appendMatch\":{}{mode}}},\"targetRef\":{}}}}}\n",
                matches_json(first, per, None),
                target(p, "").1
            );
        }
        let _ = write!(
            y,
            "    creationTimestamp: \"2026-11-20T10:{:02}:31Z\"\n    generation: {}\n    labels:\n      k8s.kuma.io/namespace: kuma-system\n      kuma.io/env: kubernetes\n      kuma.io/mesh: default\n      kuma.io/origin: zone\n      kuma.io/policy-role: system\n      kuma.io/zone: zone-1\n    managedFields:\n    - apiVersion: kuma.io/v1alpha1\n      fieldsType: FieldsV1\n      fieldsV1:\n        f:metadata:\n",
            p % 60,
            1 + p % 3
        );
        if client_side {
            y.push_str("          f:annotations:\n            .: {}\n            f:kubectl.kubernetes.io/last-applied-configuration: {}\n");
        }
        let (manager, operation) = if client_side {
            ("kubectl-client-side-apply", "Update")
        } else {
            ("kubectl", "Apply")
        };
        let _ = write!(
            y,
            "          f:labels:\n            .: {{}}\n            f:kuma.io/mesh: {{}}\n        f:spec:\n          .: {{}}\n          f:default:\n            .: {{}}\n            f:appendMatch: {{}}\n{}          f:targetRef:\n            .: {{}}\n            f:kind: {{}}\n      manager: {manager}\n      operation: {operation}\n      time: \"2026-11-20T10:12:31Z\"\n",
            if matched {
                "            f:passthroughMode: {}\n"
            } else {
                ""
            }
        );
        let _ = write!(
            y,
            "    - apiVersion: kuma.io/v1alpha1\n      fieldsType: FieldsV1\n      fieldsV1:\n        f:metadata:\n          f:labels:\n            f:k8s.kuma.io/namespace: {{}}\n            f:kuma.io/env: {{}}\n            f:kuma.io/origin: {{}}\n            f:kuma.io/policy-role: {{}}\n            f:kuma.io/zone: {{}}\n      manager: kuma-control-plane\n      operation: Update\n      time: \"2026-11-20T10:12:32Z\"\n    name: egress-{p}\n    namespace: kuma-system\n    resourceVersion: \"{}\"\n    uid: 6f0d8c38-3d0b-4a5e-9b7c-{:012x}\n  spec:\n    default:\n      appendMatch:\n",
            184_467 + p,
            0x1a2b_3c4d_5e00_u64 + p as u64
        );
        matches_block(&mut y, first, per, "      ");
        if matched {
            y.push_str("      passthroughMode: Matched\n");
        }
        y.push_str("    targetRef:\n");
        y.push_str(&target(p, "      ").0);
        first += per as u32;
    }
    y.push_str("kind: List\nmetadata:\n  resourceVersion: \"\"\n");
    y
}

/// `kubectl get meshpassthroughs -A -o json` of `policies` policies of `per` matches
/// (server-side applied).
fn kubectl_json(policies: usize, per: usize) -> String {
    let mut j = String::with_capacity(policies * per * 150 + 4096);
    j.push_str("{\n    \"apiVersion\": \"v1\",\n    \"items\": [");
    let mut first = 1u32;
    for p in 0..policies {
        if p > 0 {
            j.push(',');
        }
        let mode = if p == 0 {
            ",\n                    \"passthroughMode\": \"Matched\""
        } else {
            ""
        };
        let _ = write!(
            j,
            "\n        {{\n            \"apiVersion\": \"kuma.io/v1alpha1\",\n            \"kind\": \"MeshPassthrough\",\n            \"metadata\": {{\n                \"creationTimestamp\": \"2026-11-20T10:{:02}:31Z\",\n                \"generation\": 1,\n                \"labels\": {{\n                    \"k8s.kuma.io/namespace\": \"kuma-system\",\n                    \"kuma.io/env\": \"kubernetes\",\n                    \"kuma.io/mesh\": \"default\",\n                    \"kuma.io/origin\": \"zone\",\n                    \"kuma.io/policy-role\": \"system\",\n                    \"kuma.io/zone\": \"zone-1\"\n                }},\n                \"managedFields\": [\n                    {{\n                        \"apiVersion\": \"kuma.io/v1alpha1\",\n                        \"fieldsType\": \"FieldsV1\",\n                        \"fieldsV1\": {{\n                            \"f:spec\": {{\n                                \".\": {{}},\n                                \"f:default\": {{\n                                    \".\": {{}},\n                                    \"f:appendMatch\": {{}}\n                                }},\n                                \"f:targetRef\": {{\n                                    \".\": {{}},\n                                    \"f:kind\": {{}}\n                                }}\n                            }}\n                        }},\n                        \"manager\": \"kubectl\",\n                        \"operation\": \"Apply\",\n                        \"time\": \"2026-11-20T10:12:31Z\"\n                    }}\n                ],\n                \"name\": \"egress-{p}\",\n                \"namespace\": \"kuma-system\",\n                \"resourceVersion\": \"{}\",\n                \"uid\": \"6f0d8c38-3d0b-4a5e-9b7c-{:012x}\"\n            }},\n            \"spec\": {{\n                \"default\": {{\n                    \"appendMatch\": {}{mode}\n                }},\n                \"targetRef\": {}\n            }}\n        }}",
            p % 60,
            184_467 + p,
            0x1a2b_3c4d_5e00_u64 + p as u64,
            matches_json(first, per, Some("                    ")),
            target(p, "").1
        );
        first += per as u32;
    }
    j.push_str("\n    ],\n    \"kind\": \"List\",\n    \"metadata\": {\n        \"resourceVersion\": \"\"\n    }\n}\n");
    j
}

/// `kumactl export` (Universal): a header comment, one document per resource, keys sorted.
fn kumactl_yaml(policies: usize, per: usize) -> String {
    let mut y = String::with_capacity(policies * per * 80 + 4096);
    y.push_str("# Product: Kuma, Version: 2.14.3, Hostname: kuma-cp-0, ClusterId: 3f1c2a, InstanceId: kuma-cp-0-5f7\n");
    let mut first = 1u32;
    for p in 0..policies {
        let _ = write!(
            y,
            "---\ncreationTime: \"2026-11-20T10:12:31.123456Z\"\nkri: kri_mp_default_zone-1__egress-{p}_\nlabels:\n  kuma.io/mesh: default\n  kuma.io/origin: zone\n  kuma.io/zone: zone-1\nmesh: default\nmodificationTime: \"2026-11-20T10:12:31.123456Z\"\nname: egress-{p}\nspec:\n  default:\n    appendMatch:\n"
        );
        matches_block(&mut y, first, per, "    ");
        if p == 0 {
            y.push_str("    passthroughMode: Matched\n");
        }
        y.push_str("  targetRef:\n");
        y.push_str(&target(p, "    ").0);
        y.push_str("type: MeshPassthrough\n");
        first += per as u32;
    }
    y
}

/// Policies as people write them: comments, a folded block scalar, an anchor and its aliases,
/// flow mappings, both quote styles.
fn handwritten_yaml(policies: usize, per: usize) -> String {
    let mut y = String::new();
    let mut first = 1u32;
    for p in 0..policies {
        let _ = write!(
            y,
            "# Egress of team {p}.\n---\napiVersion: kuma.io/v1alpha1\nkind: MeshPassthrough\nmetadata:\n  name: egress-{p}\n  namespace: kuma-system\n  labels:\n    kuma.io/mesh: default\n  annotations:\n    description: >-\n      The partner APIs, the CDN and the package\n      mirrors team {p} needs.\n    owner: \"team-{p}@example.com\"\nspec:\n  targetRef:\n{}  default:\n    appendMatch:\n      - {{type: Domain, value: \"first-{p}.example.com\", port: 443, protocol: &tls tls}}\n",
            target(p, "    ").0
        );
        for (i, n) in (first..first + per as u32 - 1).enumerate() {
            let m = nth_match(n);
            let port = m.port.map(|p| format!("port: {p}"));
            match i % 3 {
                0 => {
                    let _ = writeln!(
                        y,
                        "      - {{ type: {}, value: '{}'{}, protocol: {} }}",
                        m.ty,
                        m.value,
                        port.map(|p| format!(", {p}")).unwrap_or_default(),
                        m.proto
                    );
                }
                1 => {
                    let _ = write!(
                        y,
                        "      - type: {}  # {}\n        value: \"{}\"\n",
                        m.ty,
                        m.ty.to_lowercase(),
                        m.value
                    );
                    if let Some(port) = port {
                        let _ = writeln!(y, "        {port}");
                    }
                    let _ = writeln!(y, "        protocol: {}", m.proto);
                }
                _ => {
                    let _ = write!(
                        y,
                        "      - type: {}\n        value: {}\n",
                        m.ty,
                        go_yaml_str(&m.value)
                    );
                    if let Some(port) = port {
                        let _ = writeln!(y, "        {port}");
                    }
                    let proto = if m.proto == "tls" { "*tls" } else { m.proto };
                    let _ = writeln!(y, "        protocol: {proto}");
                }
            }
        }
        first += per as u32;
    }
    y
}

/// The inputs: (name, file name, text). The file name's extension picks YAML or JSON.
fn inputs() -> Vec<(&'static str, &'static str, String)> {
    let per = MATCHES / POLICIES;
    vec![
        ("generated", "bench.yaml", policy_yaml()),
        (
            "kubectl-yaml",
            "kubectl.yaml",
            kubectl_yaml(POLICIES, per, false),
        ),
        ("kubectl-json", "kubectl.json", kubectl_json(POLICIES, per)),
        ("kumactl-yaml", "kumactl.yaml", kumactl_yaml(POLICIES, per)),
        (
            "kubectl-yaml-small",
            "small.yaml",
            kubectl_yaml(200, 20, true),
        ),
        ("handwritten", "hand.yaml", handwritten_yaml(200, 20)),
    ]
}

fn workloads() -> Vec<(u64, Workload)> {
    (0..WORKLOADS)
        .map(|i| {
            let mut labels = BTreeMap::new();
            if i % 8 < 4 {
                labels.insert("app".to_string(), APPS[i % 4].to_string());
            }
            labels.insert("k8s.kuma.io/namespace".to_string(), format!("ns{}", i % 8));
            let w = Workload {
                name: format!("w{i}"),
                cgroup: format!("/kubepods/pod{i}").into(),
                labels,
            };
            (10_000 + i as u64, w)
        })
        .collect()
}

fn plan_options() -> PlanOptions {
    PlanOptions {
        internal: vec![
            "10.96.0.0/12".parse().unwrap(),
            "fd00:10::/64".parse().unwrap(),
        ],
        resolvers: vec!["10.96.0.10".parse().unwrap()],
        unmatched_mode: Some(Mode::All),
    }
}

fn load(file: &str, text: &str) -> PolicySet {
    policy::load_policy_bytes(Path::new(file), text.as_bytes(), "default")
        .expect("valid policy set")
}

/// Merges as the agent should: once per distinct set of selecting policies.
fn merge(set: &PolicySet, ws: &[(u64, Workload)]) -> (Vec<MergedConf>, Vec<usize>) {
    set.merge_all(ws.iter().map(|(_, w)| w), Mode::All)
}

fn compile(
    merged: &(Vec<MergedConf>, Vec<usize>),
    ws: &[(u64, Workload)],
    opts: &PlanOptions,
) -> KernelPlan {
    let (confs, of) = merged;
    let refs: Vec<(u64, &MergedConf)> = ws
        .iter()
        .zip(of)
        .map(|((id, _), i)| (*id, &confs[*i]))
        .collect();
    plan::compile(0, &refs, opts)
}

/// The whole pipeline, as the agent runs it on a (re)load.
fn pipeline(file: &str, text: &str, ws: &[(u64, Workload)], opts: &PlanOptions) -> KernelPlan {
    let set = load(file, text);
    let merged = merge(&set, ws);
    compile(&merged, ws, opts)
}

fn benches(c: &mut Criterion) {
    let inputs = inputs();
    let (_, file, yaml) = &inputs[0];
    let ws = workloads();
    let opts = plan_options();
    let mut g = c.benchmark_group("policy_pipeline_100k");
    g.sample_size(10);
    g.bench_function("parse_validate_merge_compile", |b| {
        b.iter(|| black_box(pipeline(file, black_box(yaml), &ws, &opts)))
    });
    g.bench_function("parse_validate", |b| {
        b.iter(|| black_box(load(file, black_box(yaml))))
    });
    let set = load(file, yaml);
    g.bench_function("merge", |b| b.iter(|| black_box(merge(&set, &ws))));
    let merged = merge(&set, &ws);
    g.bench_function("compile", |b| {
        b.iter(|| black_box(compile(&merged, &ws, &opts)))
    });
    for (name, file, text) in &inputs[1..] {
        g.bench_function(format!("parse_validate/{name}"), |b| {
            b.iter(|| black_box(load(file, black_box(text))))
        });
    }
    g.finish();
}

/// CPU time of this thread: the figure that does not depend on what else the machine runs.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `--figures`: median time and peak RSS, printed for the report.
fn figures() {
    let file = "bench.yaml";
    let yaml = policy_yaml();
    let ws = workloads();
    let opts = plan_options();
    let before_kib = status_kib("VmRSS:");
    // The first run alone sets the peak (later runs reuse freed memory).
    let (t, c) = (Instant::now(), thread_cpu());
    let plan = pipeline(file, &yaml, &ws, &opts);
    let first = t.elapsed();
    let mut cpu = vec![thread_cpu() - c];
    let peak_kib = status_kib("VmHWM:");
    let (v4, v6) = plan.entry_counts();
    drop(plan);
    let mut times = vec![first];
    for _ in 0..10 {
        let (t, c) = (Instant::now(), thread_cpu());
        black_box(pipeline(file, &yaml, &ws, &opts));
        times.push(t.elapsed());
        cpu.push(thread_cpu() - c);
    }
    times.sort();
    cpu.sort();
    let t = Instant::now();
    let set = load(file, &yaml);
    let t_load = t.elapsed();
    let t = Instant::now();
    let merged = merge(&set, &ws);
    let t_merge = t.elapsed();
    let t = Instant::now();
    black_box(compile(&merged, &ws, &opts));
    let t_compile = t.elapsed();
    println!(
        "stages (one run): parse+validate {:.1} ms, merge {:.1} ms, compile {:.1} ms",
        t_load.as_secs_f64() * 1e3,
        t_merge.as_secs_f64() * 1e3,
        t_compile.as_secs_f64() * 1e3
    );
    println!(
        "policy_pipeline: {} policies, {} matches, {} workloads, YAML {:.1} MiB -> {} IPv4 rule entries (range tables) + {} IPv6 trie entries",
        set.len(),
        set.match_count(),
        ws.len(),
        yaml.len() as f64 / 1048576.0,
        v4,
        v6
    );
    println!(
        "time: median {:.1} ms (min {:.1} ms, max {:.1} ms, {} runs)",
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        times.len()
    );
    println!(
        "cpu time: median {:.1} ms (min {:.1} ms, max {:.1} ms)",
        cpu[cpu.len() / 2].as_secs_f64() * 1e3,
        cpu[0].as_secs_f64() * 1e3,
        cpu[cpu.len() - 1].as_secs_f64() * 1e3
    );
    println!(
        "peak RSS (VmHWM): {:.1} MiB for the process; {:.1} MiB above the RSS before the first run (input text and workloads already built)",
        peak_kib as f64 / 1024.0,
        peak_kib.saturating_sub(before_kib) as f64 / 1024.0
    );
    drop(set);
    drop(merged);
    by_input(&ws, &opts);
}

/// The median of `runs` calls of `f`: (thread CPU time, wall time).
fn median(runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    let (mut cpu, mut wall) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (t, c) = (Instant::now(), thread_cpu());
        f();
        cpu.push(thread_cpu() - c);
        wall.push(t.elapsed());
    }
    cpu.sort();
    wall.sort();
    (cpu[runs / 2], wall[runs / 2])
}

/// Parse + validate of every input and, for the 100,000-match ones, the whole pipeline.
fn by_input(ws: &[(u64, Workload)], opts: &PlanOptions) {
    println!(
        "by input (thread CPU time, median of 11; pipeline = parse+validate+merge+compile, median of 5):"
    );
    println!(
        "  {:<20} {:>9} {:>9} {:>20} {:>16}",
        "input", "MiB", "matches", "parse+validate ms", "pipeline ms"
    );
    for (name, file, text) in inputs() {
        let set = load(file, &text);
        let (parse, _) = median(11, || {
            black_box(load(file, black_box(&text)));
        });
        let pipeline_ms = if set.match_count() == MATCHES {
            let (cpu, _) = median(5, || {
                black_box(pipeline(file, black_box(&text), ws, opts));
            });
            format!("{:.1}", cpu.as_secs_f64() * 1e3)
        } else {
            "-".to_string()
        };
        println!(
            "  {:<20} {:>9.2} {:>9} {:>20.1} {:>16}",
            name,
            text.len() as f64 / 1048576.0,
            set.match_count(),
            parse.as_secs_f64() * 1e3,
            pipeline_ms
        );
    }
}

criterion_group!(policy_pipeline, benches);

fn main() {
    if std::env::args().any(|a| a == "--figures") {
        figures();
        return;
    }
    policy_pipeline();
    Criterion::default().configure_from_args().final_summary();
}
