//! The policy layer end to end: validator fixtures (Kuma's own, restated, and edge cases),
//! parsing errors, merge order, the decision rules (docs/decisions.md), and fuzz-style robustness of the
//! parser. (`check` and `explain` through the command line: `passthrough-user/tests/cli.rs`.)
//!
//! Validator fixtures live in `tests/data/policy/validate/`: each `X.yaml`/`X.json` has an
//! `X.yaml.expected`/`X.json.expected` with the expected problem lines, the file name removed
//! (`spec.path: message` or `LINE:COL: message`); an empty expected file means valid. Run with
//! `POLICY_BLESS=1` to rewrite the expected files (then review the diff).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use passthrough_policy::{
    self as policy, Connection, DecideOptions, L7, MergedConf, Mode, PolicySet, Verdict, Workload,
    decide, load_policies, load_policy_bytes,
};
use proptest::prelude::*;

fn data(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/policy")
        .join(p)
}

fn problem_lines(path: &Path, r: Result<PolicySet, policy::PolicyError>) -> Vec<String> {
    let prefix = path.display().to_string();
    match r {
        Ok(_) => Vec::new(),
        Err(e) => e
            .problems()
            .iter()
            .map(|p| {
                let s = p.to_string();
                let rest = s.strip_prefix(&prefix).unwrap_or(&s);
                rest.trim_start_matches(':').trim_start().to_string()
            })
            .collect(),
    }
}

#[test]
fn validator_fixtures() {
    let dir = data("validate");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| policy::parse::is_policy_file(p))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "fixtures missing in {}", dir.display());
    let bless = std::env::var_os("POLICY_BLESS").is_some();
    let mut failures = Vec::new();
    for f in &files {
        let got = problem_lines(f, load_policies(std::slice::from_ref(f), "default"));
        let exp_path = PathBuf::from(format!("{}.expected", f.display()));
        let mut got_text = got.join("\n");
        if !got_text.is_empty() {
            got_text.push('\n');
        }
        if bless {
            std::fs::write(&exp_path, &got_text).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&exp_path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with POLICY_BLESS=1)", exp_path.display()));
        if expected != got_text {
            failures.push(format!(
                "{}:\n--- expected\n{expected}--- got\n{got_text}",
                f.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn directory_reports_every_file() {
    // The whole directory at once: every problem of every file, files in sorted order.
    let dir = data("validate");
    let err = load_policies(std::slice::from_ref(&dir), "default").unwrap_err();
    let mut files_with_problems: Vec<String> = err
        .problems()
        .iter()
        .map(|p| p.file.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let sorted = {
        let mut s = files_with_problems.clone();
        s.sort();
        s
    };
    assert_eq!(files_with_problems, sorted);
    files_with_problems.dedup();
    for f in [
        "kuma-full-invalid.yaml",
        "domains.yaml",
        "addresses.yaml",
        "parse-syntax.json",
        "target-refs.yaml",
        "other-mesh.yaml",
    ] {
        assert!(
            files_with_problems.iter().any(|x| x == f),
            "{f} missing from {files_with_problems:?}"
        );
    }
    for f in ["kuma-valid.yaml", "other-mesh-valid.yaml"] {
        assert!(
            !files_with_problems.iter().any(|x| x == f),
            "{f} has problems"
        );
    }
    // Display: one line per problem.
    assert_eq!(err.to_string().lines().count(), err.problems().len());
}

#[test]
fn kuma_full_invalid_in_kuma_order() {
    // Stated here too so that the expected file cannot drift from Kuma's fixture unnoticed.
    let f = data("validate/kuma-full-invalid.yaml");
    let got = problem_lines(&f, load_policies(std::slice::from_ref(&f), "default"));
    let p = "spec.default.appendMatch";
    let expected = vec![
        format!("{p}[0].port: port must be a valid (1-65535)"),
        format!(
            r#"{p}[0].protocol: "protocol" must be one of ["tcp", "tls", "grpc", "http", "http2", "mysql"]"#
        ),
        format!(
            "{p}[0].type: provided type test is not supported, one of Domain, IP, or CIDR is supported"
        ),
        format!("{p}[1].protocol: protocol tcp is not supported for a domain"),
        format!("{p}[1].value: provided DNS has incorrect value"),
        format!("{p}[2].value: provided IP has incorrect value"),
        format!("{p}[3].protocol: protocol tcp is not supported for a domain"),
        format!("{p}[4].value: provided CIDR has incorrect value"),
        format!(
            "{p}[6].port: using the same port in multiple matches requires the same protocol for the following protocols: [grpc http http2]"
        ),
        format!(
            "{p}[7].value: provided DNS has incorrect value, partial wildcard is currently not supported"
        ),
        format!("{p}[9].value: value google.com is already defiend for this port and protocol"),
        format!("{p}[10].port: wildcard domains doesn't work for all ports and layer 7 protocol"),
        format!("{p}[11].protocol: protocol mysql is not supported for a domain"),
        format!("{p}[12].port: port must be defined for Mysql protocol"),
        format!("{p}[13].value: provided DNS has incorrect value"),
    ];
    assert_eq!(got, expected);
}

#[test]
fn valid_policies_are_canonicalised() {
    let f = data("validate/kuma-valid.yaml");
    let set = load_policies(std::slice::from_ref(&f), "default").unwrap();
    assert_eq!((set.len(), set.match_count()), (1, 6));
    let m = &set.policies()[0].matches;
    assert_eq!(&*m[2].value, "1.2.3.4/24");
    assert_eq!(m[2].net.unwrap().to_string(), "1.2.3.0/24");
    assert_eq!(m[0].net.unwrap().to_string(), "192.168.1.1/32");
    assert_eq!(m[1].port, None);

    let yaml = "type: MeshPassthrough\nname: v6\nspec:\n  default:\n    appendMatch:\n    - {type: IP, value: '::ffff:192.0.2.1'}\n    - {type: CIDR, value: '::ffff:198.51.100.9/120'}\n    - {type: CIDR, value: '2001:db8::7/32'}\n    - {type: IP, value: '0:0:0:0:0:0:0:1'}\n";
    let set = load_policy_bytes(Path::new("v6.yaml"), yaml.as_bytes(), "default").unwrap();
    let nets: Vec<String> = set.policies()[0]
        .matches
        .iter()
        .map(|m| m.net.unwrap().to_string())
        .collect();
    assert_eq!(
        nets,
        [
            "192.0.2.1/32",
            "198.51.100.0/24",
            "2001:db8::/32",
            "::1/128"
        ]
    );
}

#[test]
fn policies_of_every_mesh_are_validated_only_one_mesh_is_enforced() {
    // An invalid policy of another mesh is a problem whatever mesh is selected (Kuma validates
    // every resource it is given).
    let f = data("validate/other-mesh.yaml");
    for mesh in ["default", "other-mesh"] {
        let lines = problem_lines(&f, load_policies(std::slice::from_ref(&f), mesh));
        assert_eq!(
            lines,
            ["spec.default.appendMatch[0].value: provided IP has incorrect value"],
            "--mesh {mesh}"
        );
    }
    // Valid policies of other meshes are noted, not enforced.
    let yaml = "type: MeshPassthrough\nname: a\nmesh: m1\nspec: {default: {passthroughMode: None}}\n---\ntype: MeshPassthrough\nname: a\nspec: {default: {passthroughMode: All}}\n";
    let set = load_policy_bytes(Path::new("m.yaml"), yaml.as_bytes(), "default").unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(set.policies()[0].mesh, "default");
    assert_eq!(set.notes().len(), 1);
    assert!(set.notes()[0].contains("mesh \"m1\""), "{:?}", set.notes());
    let set = load_policy_bytes(Path::new("m.yaml"), yaml.as_bytes(), "m1").unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(set.policies()[0].mode, Some(Mode::None));
    // The same Universal name in two meshes is two resources; the same Kubernetes
    // namespace/name twice is one, whatever its mesh label.
    let k8s = |mesh: &str| {
        format!(
            "---\napiVersion: kuma.io/v1alpha1\nkind: MeshPassthrough\nmetadata: {{name: k, namespace: kuma-system, labels: {{kuma.io/mesh: {mesh}}}}}\nspec: {{}}\n"
        )
    };
    let yaml = k8s("a") + &k8s("b");
    let err = load_policy_bytes(Path::new("k.yaml"), yaml.as_bytes(), "a").unwrap_err();
    assert!(err.to_string().contains("defined twice"), "{err}");
}

#[test]
fn duplicate_names_and_missing_paths() {
    let f = data("validate/kuma-valid.yaml");
    let err = load_policies(&[f.clone(), f.clone()], "default").unwrap_err();
    assert!(err.to_string().contains("defined twice"), "{err}");
    let err = load_policies(&[data("does-not-exist.yaml")], "default").unwrap_err();
    assert!(err.to_string().contains("cannot read"), "{err}");
}

#[test]
fn directories_are_walked_recursively_skipping_dot_entries() {
    let tmp = std::env::temp_dir().join(format!("pt-policy-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("sub")).unwrap();
    std::fs::create_dir_all(tmp.join("..data")).unwrap();
    let pol = |n: &str| format!("type: MeshPassthrough\nname: {n}\nspec: {{}}\n");
    std::fs::write(tmp.join("a.yaml"), pol("a")).unwrap();
    std::fs::write(tmp.join("sub/b.yml"), pol("b")).unwrap();
    std::fs::write(
        tmp.join("sub/c.json"),
        r#"{"type":"MeshPassthrough","name":"c"}"#,
    )
    .unwrap();
    std::fs::write(tmp.join("..data/a.yaml"), pol("a")).unwrap();
    std::fs::write(tmp.join("notes.txt"), "not a policy").unwrap();
    let set = load_policies(std::slice::from_ref(&tmp), "default").unwrap();
    let names: Vec<&str> = set.policies().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    std::fs::remove_dir_all(&tmp).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Merging (docs/policy.md)

fn wl(name: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        name: name.into(),
        cgroup: PathBuf::from(format!("/sys/fs/cgroup/{name}")),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn set_of(yaml: &str) -> PolicySet {
    load_policy_bytes(Path::new("merge.yaml"), yaml.as_bytes(), "default")
        .unwrap_or_else(|e| panic!("{e}"))
}

fn mp(name: &str, target: &str, mode: Option<&str>, ip: &str) -> String {
    let mode = mode
        .map(|m| format!("    passthroughMode: {m}\n"))
        .unwrap_or_default();
    format!(
        "---\ntype: MeshPassthrough\nname: {name}\nspec:\n  targetRef: {target}\n  default:\n{mode}    appendMatch:\n    - {{type: IP, value: {ip}}}\n"
    )
}

fn merged(set: &PolicySet, w: &Workload) -> (Mode, Vec<String>, Vec<String>) {
    let c = set.merge_for(w, Mode::All);
    (
        c.mode,
        c.policies,
        c.matches.iter().map(|m| m.value.to_string()).collect(),
    )
}

#[test]
fn merge_selection() {
    let set = set_of(
        &[
            mp("mesh", "{kind: Mesh}", None, "192.0.2.1"),
            mp(
                "subset",
                "{kind: MeshSubset, tags: {app: web, team: a}}",
                None,
                "192.0.2.2",
            ),
            mp(
                "dp-name",
                "{kind: Dataplane, name: web-1}",
                None,
                "192.0.2.3",
            ),
            mp(
                "dp-labels",
                "{kind: Dataplane, labels: {app: web}}",
                None,
                "192.0.2.4",
            ),
            mp("dp-all", "{kind: Dataplane}", None, "192.0.2.5"),
            mp(
                "gateway-only",
                "{kind: Mesh, proxyTypes: [Gateway]}",
                None,
                "192.0.2.6",
            ),
        ]
        .concat(),
    );
    let names = |w: &Workload| {
        let mut n = set.merge_for(w, Mode::All).policies;
        n.sort();
        n
    };
    assert_eq!(
        names(&wl("web-1", &[("app", "web"), ("team", "a")])),
        ["dp-all", "dp-labels", "dp-name", "mesh", "subset"]
    );
    assert_eq!(
        names(&wl("web-2", &[("app", "web")])),
        ["dp-all", "dp-labels", "mesh"]
    );
    assert_eq!(names(&wl("other", &[])), ["dp-all", "mesh"]);
}

#[test]
fn merge_order_by_kind_mesh_dataplane_meshsubset() {
    // Kuma 2.14: Mesh < Dataplane < MeshSubset, whatever the input order and names.
    let set = set_of(
        &[
            mp(
                "a-subset",
                "{kind: MeshSubset, tags: {app: web}}",
                Some("None"),
                "192.0.2.3",
            ),
            mp(
                "b-dataplane",
                "{kind: Dataplane, name: web}",
                Some("All"),
                "192.0.2.2",
            ),
            mp("c-mesh", "{kind: Mesh}", Some("Matched"), "192.0.2.1"),
        ]
        .concat(),
    );
    let (mode, pols, vals) = merged(&set, &wl("web", &[("app", "web")]));
    assert_eq!(pols, ["c-mesh", "b-dataplane", "a-subset"]);
    assert_eq!(vals, ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
    assert_eq!(mode, Mode::None, "the most specific policy's mode wins");
}

#[test]
fn merge_dataplane_by_name_beats_by_labels() {
    let set = set_of(
        &[
            mp(
                "a-name",
                "{kind: Dataplane, name: web}",
                Some("None"),
                "192.0.2.1",
            ),
            mp(
                "b-labels",
                "{kind: Dataplane, labels: {app: web}}",
                Some("All"),
                "192.0.2.2",
            ),
        ]
        .concat(),
    );
    let (mode, pols, _) = merged(&set, &wl("web", &[("app", "web")]));
    // By name is more specific even though "a-name" < "b-labels" would otherwise make... the
    // name tie-break is only reached when the targetRefs are equally specific.
    assert_eq!(pols, ["b-labels", "a-name"]);
    assert_eq!(mode, Mode::None);
}

#[test]
fn merge_name_tie_break_smaller_name_wins() {
    // Same kind: the lexicographically smaller name sorts later and wins (Kuma e2e:
    // `allow-specified` beats `disable-passthrough`).
    let set = set_of(
        &[
            mp(
                "allow-specified",
                "{kind: Mesh}",
                Some("Matched"),
                "192.0.2.1",
            ),
            mp(
                "disable-passthrough",
                "{kind: Mesh}",
                Some("None"),
                "192.0.2.2",
            ),
        ]
        .concat(),
    );
    let (mode, pols, vals) = merged(&set, &wl("w", &[]));
    assert_eq!(pols, ["disable-passthrough", "allow-specified"]);
    assert_eq!(vals, ["192.0.2.2", "192.0.2.1"]);
    assert_eq!(mode, Mode::Matched);
}

/// A Universal policy with `labels` (a flow map) and one IP match.
fn mp_labels(name: &str, labels: &str, target: &str, mode: &str, ip: &str) -> String {
    format!(
        "---\ntype: MeshPassthrough\nname: {name}\nlabels: {labels}\nspec:\n  targetRef: {target}\n  default:\n    passthroughMode: {mode}\n    appendMatch:\n    - {{type: IP, value: {ip}}}\n"
    )
}

#[test]
fn merge_origin_before_name_within_a_kind() {
    // By name alone `a-global` would win (the smaller name sorts later); Kuma orders by origin
    // first: global < no label < zone. Input order does not matter.
    let policies = [
        mp_labels(
            "a-global",
            "{kuma.io/origin: global}",
            "{kind: Mesh}",
            "None",
            "192.0.2.1",
        ),
        mp_labels(
            "c-zone",
            "{kuma.io/origin: zone}",
            "{kind: Mesh}",
            "All",
            "192.0.2.3",
        ),
        mp_labels("b-unlabelled", "{}", "{kind: Mesh}", "Matched", "192.0.2.2"),
    ];
    for rot in 0..3 {
        let mut v = policies.to_vec();
        v.rotate_left(rot);
        let (mode, pols, vals) = merged(&set_of(&v.concat()), &wl("w", &[]));
        assert_eq!(
            pols,
            ["a-global", "b-unlabelled", "c-zone"],
            "rotation {rot}"
        );
        assert_eq!(vals, ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        assert_eq!(mode, Mode::All, "the zone policy's mode wins");
    }
    // Kubernetes spelling: metadata.labels. The kind still comes first: a MeshSubset policy
    // synced from global beats a zone Mesh policy.
    let k8s = |name: &str, origin: &str, target: &str, mode: &str| {
        format!(
            "---\napiVersion: kuma.io/v1alpha1\nkind: MeshPassthrough\nmetadata: {{name: {name}, namespace: kuma-system, labels: {{kuma.io/origin: {origin}}}}}\nspec: {{targetRef: {target}, default: {{passthroughMode: {mode}}}}}\n"
        )
    };
    let set = set_of(
        &[
            k8s(
                "z-subset",
                "global",
                "{kind: MeshSubset, tags: {app: web}}",
                "None",
            ),
            k8s("a-mesh", "zone", "{kind: Mesh}", "All"),
        ]
        .concat(),
    );
    let (mode, pols, _) = merged(&set, &wl("w", &[("app", "web")]));
    assert_eq!(pols, ["a-mesh", "z-subset"]);
    assert_eq!(mode, Mode::None);
}

#[test]
fn merge_compares_display_names_where_set() {
    // Policies synced from global carry hashed names; Kuma compares their display names
    // (Universal: the `kuma.io/display-name` label; Kubernetes: the annotation of that name,
    // else metadata.name, whatever a label says).
    let set = set_of(
        &[
            mp_labels(
                "allow-5c7f8",
                "{kuma.io/display-name: allow}",
                "{kind: Mesh}",
                "Matched",
                "192.0.2.1",
            ),
            mp_labels(
                "a-deny-9d3e1",
                "{kuma.io/display-name: deny}",
                "{kind: Mesh}",
                "None",
                "192.0.2.2",
            ),
        ]
        .concat(),
    );
    // By resource name `a-deny-9d3e1` would win; by display name `allow` wins.
    let (mode, pols, _) = merged(&set, &wl("w", &[]));
    assert_eq!(pols, ["a-deny-9d3e1", "allow-5c7f8"]);
    assert_eq!(mode, Mode::Matched);

    let k8s = |name: &str, meta_extra: &str, mode: &str| {
        format!(
            "---\napiVersion: kuma.io/v1alpha1\nkind: MeshPassthrough\nmetadata: {{name: {name}, namespace: kuma-system{meta_extra}}}\nspec: {{default: {{passthroughMode: {mode}}}}}\n"
        )
    };
    let set = set_of(
        &[
            // Display name "zz" from the annotation: loses to "m".
            k8s("a", ", annotations: {kuma.io/display-name: zz}", "None"),
            // A display-name *label* is replaced by metadata.name ("m") on Kubernetes.
            k8s("m", ", labels: {kuma.io/display-name: a}", "All"),
        ]
        .concat(),
    );
    let (mode, pols, _) = merged(&set, &wl("w", &[]));
    assert_eq!(pols, ["a", "m"]);
    assert_eq!(mode, Mode::All);
    let meta = &set.policies().iter().find(|p| p.name == "a").unwrap().meta;
    assert_eq!(meta.display_name(), "zz");
}

#[test]
fn shadow_policies_are_validated_but_not_enforced() {
    let shadow = mp_labels(
        "a-shadow",
        "{kuma.io/effect: shadow}",
        "{kind: Mesh}",
        "None",
        "192.0.2.9",
    );
    let set = set_of(
        &[
            mp("mesh", "{kind: Mesh}", Some("All"), "192.0.2.1"),
            shadow.clone(),
        ]
        .concat(),
    );
    assert_eq!(set.len(), 1);
    assert_eq!(set.shadow(), ["a-shadow"]);
    let (mode, pols, vals) = merged(&set, &wl("w", &[]));
    assert_eq!(
        (mode, pols, vals),
        (
            Mode::All,
            vec!["mesh".to_string()],
            vec!["192.0.2.1".to_string()]
        )
    );
    // Alone, a shadow policy selects nothing: the unselected mode applies.
    let set = set_of(&shadow);
    assert_eq!(set.merge_for(&wl("w", &[]), Mode::None).policies.len(), 0);
    // Still validated.
    let bad = shadow.replace("192.0.2.9", "not-an-ip");
    assert!(load_policy_bytes(Path::new("s.yaml"), bad.as_bytes(), "default").is_err());
}

#[test]
fn role_and_zone_labels_limit_selection() {
    // A consumer / workload-owner policy selects only workloads of its own
    // k8s.kuma.io/namespace; a zone policy does not select another zone's Dataplanes.
    let set = set_of(
        &[
            mp_labels(
                "owner",
                "{kuma.io/policy-role: workload-owner, k8s.kuma.io/namespace: shop}",
                "{kind: Mesh}",
                "None",
                "192.0.2.1",
            ),
            mp_labels(
                "zone-a",
                "{kuma.io/origin: zone, kuma.io/zone: a}",
                "{kind: Mesh}",
                "All",
                "192.0.2.2",
            ),
        ]
        .concat(),
    );
    let names = |w: &Workload| set.merge_for(w, Mode::Matched).policies;
    // (zone-a is more specific: origin zone beats no origin before roles are compared.)
    assert_eq!(
        names(&wl("w", &[("k8s.kuma.io/namespace", "shop")])),
        ["owner", "zone-a"]
    );
    assert_eq!(
        names(&wl("w", &[("k8s.kuma.io/namespace", "bank")])),
        ["zone-a"]
    );
    assert_eq!(
        names(&wl(
            "w",
            &[("kuma.io/origin", "zone"), ("kuma.io/zone", "b")]
        )),
        Vec::<String>::new()
    );
    assert_eq!(
        names(&wl(
            "w",
            &[("kuma.io/origin", "zone"), ("kuma.io/zone", "a")]
        )),
        ["zone-a"]
    );
}

#[test]
fn merge_mode_last_set_wins_and_unset_inherits() {
    // Mesh-level None + a more specific policy without a mode → None (its matches are ignored
    // by the decision, but still concatenated).
    let set = set_of(
        &[
            mp("mesh", "{kind: Mesh}", Some("None"), "192.0.2.1"),
            mp(
                "subset",
                "{kind: MeshSubset, tags: {app: web}}",
                None,
                "192.0.2.2",
            ),
        ]
        .concat(),
    );
    let (mode, _, vals) = merged(&set, &wl("w", &[("app", "web")]));
    assert_eq!(mode, Mode::None);
    assert_eq!(vals.len(), 2);
    // No policy sets a mode → Matched (Kuma ≥ 2.10).
    let set = set_of(&mp("mesh", "{kind: Mesh}", None, "192.0.2.1"));
    assert_eq!(set.merge_for(&wl("w", &[]), Mode::All).mode, Mode::Matched);
    // An empty mode is refused, as Kuma's schema refuses it (the enum is All, Matched, None).
    let yaml = mp("a", "{kind: Mesh}", Some("''"), "192.0.2.2");
    let err = load_policy_bytes(Path::new("m.yaml"), yaml.as_bytes(), "default").unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"m.yaml: spec.default.passthroughMode: "passthroughMode" must be one of ["All", "Matched", "None"]"#
    );
}

#[test]
fn merge_unselected_mode() {
    let set = set_of(&mp(
        "subset",
        "{kind: MeshSubset, tags: {app: web}}",
        Some("Matched"),
        "192.0.2.1",
    ));
    for m in [Mode::All, Mode::None, Mode::Matched] {
        let c = set.merge_for(&wl("db", &[("app", "db")]), m);
        assert_eq!(
            c,
            MergedConf {
                mode: m,
                matches: vec![],
                policies: vec![]
            }
        );
    }
    let empty = PolicySet::default();
    assert_eq!(empty.merge_for(&wl("x", &[]), Mode::All).mode, Mode::All);
}

#[test]
fn workloads_file() {
    let ws = policy::load_workloads(&data("merge/workloads.yaml")).unwrap();
    assert_eq!(ws.len(), 3);
    assert_eq!(ws[0].labels.get("app").map(String::as_str), Some("web"));
    let set = load_policies(&[data("merge/policies.yaml")], "default").unwrap();
    let modes: Vec<Mode> = ws
        .iter()
        .map(|w| set.merge_for(w, Mode::All).mode)
        .collect();
    assert_eq!(modes, [Mode::Matched, Mode::None, Mode::All]);
}

// ---------------------------------------------------------------------------------------------
// Decisions (docs/decisions.md) through the pure core

struct Row {
    what: &'static str,
    workload: &'static str,
    dst: &'static str,
    udp: bool,
    l7: Option<L7>,
    verdict: Verdict,
    /// The deciding match's value (and port) or "" for none.
    matched: &'static str,
}

fn row(
    what: &'static str,
    workload: &'static str,
    dst: &'static str,
    verdict: Verdict,
    matched: &'static str,
) -> Row {
    Row {
        what,
        workload,
        dst,
        udp: false,
        l7: None,
        verdict,
        matched,
    }
}

fn sni(s: &str) -> Option<L7> {
    Some(L7::Tls(Some(s.into())))
}

fn host(s: &str) -> Option<L7> {
    Some(L7::Http1(s.into()))
}

#[test]
fn decision_table() {
    use Verdict::*;
    let set = load_policies(&[data("explain/policies.yaml")], "default").unwrap();
    let ws = policy::load_workloads(&data("explain/workloads.yaml")).unwrap();
    let opts = DecideOptions {
        internal: vec![
            "10.96.0.0/12".parse().unwrap(),
            "fd00:10::/64".parse().unwrap(),
        ],
        resolvers: vec![
            "10.0.0.10:53".parse().unwrap(),
            "[2001:db8:53::53]:53".parse().unwrap(),
        ],
    };
    let rows = vec![
        // Rule 1: not egress.
        row("loopback v4", "app", "127.0.0.1:9", AllowKernel, ""),
        row("loopback 127/8", "app", "127.8.9.10:9", AllowKernel, ""),
        row("loopback v6", "app", "[::1]:9", AllowKernel, ""),
        row(
            "loopback v4-mapped",
            "app",
            "[::ffff:127.0.0.1]:9",
            AllowKernel,
            "",
        ),
        row(
            "loopback in mode None",
            "locked",
            "127.0.0.1:9",
            AllowKernel,
            "",
        ),
        row("internal v4", "locked", "10.96.0.1:443", AllowKernel, ""),
        row("internal v6", "locked", "[fd00:10::1]:443", AllowKernel, ""),
        row(
            "internal v4-mapped",
            "locked",
            "[::ffff:10.100.0.1]:443",
            AllowKernel,
            "",
        ),
        Row {
            udp: true,
            ..row("dns to resolver", "locked", "10.0.0.10:53", AllowKernel, "")
        },
        Row {
            udp: true,
            ..row(
                "dns to resolver v6",
                "app",
                "[2001:db8:53::53]:53",
                AllowKernel,
                "",
            )
        },
        Row {
            udp: true,
            ..row("udp 53 elsewhere", "app", "192.0.2.200:53", Deny, "")
        },
        Row {
            udp: false,
            ..row(
                "tcp to resolver not covered by the DNS rule",
                "locked",
                "10.0.0.10:53",
                Deny,
                "",
            )
        },
        // Rule 2: modes.
        row("mode All", "open", "203.0.113.99:1234", AllowKernel, ""),
        row("mode None", "locked", "192.0.2.10:443", Deny, ""),
        row(
            "unselected → --unselected-mode All",
            "stranger",
            "203.0.113.1:1",
            AllowKernel,
            "",
        ),
        // Rule 3: address matches, any protocol, port fits.
        row(
            "IP any port",
            "app",
            "192.0.2.10:1",
            AllowKernel,
            "192.0.2.10",
        ),
        row(
            "IP with port",
            "app",
            "192.0.2.11:443",
            AllowKernel,
            "192.0.2.11:443",
        ),
        row("IP wrong port", "app", "192.0.2.11:444", Deny, ""),
        row(
            "CIDR host bits",
            "app",
            "198.51.100.200:5432",
            AllowKernel,
            "198.51.100.7/24:5432",
        ),
        row("CIDR outside", "app", "198.51.101.1:5432", Deny, ""),
        row(
            "http IP allowed in kernel (any protocol)",
            "app",
            "192.0.2.12:8080",
            AllowKernel,
            "192.0.2.12:8080",
        ),
        row(
            "mysql CIDR",
            "app",
            "203.0.113.5:3306",
            AllowKernel,
            "203.0.113.0/28:3306",
        ),
        row(
            "v6 IP",
            "app",
            "[2001:db8::10]:443",
            AllowKernel,
            "2001:db8::10:443",
        ),
        row(
            "v6 CIDR",
            "app",
            "[2001:db8:1::99]:22",
            AllowKernel,
            "2001:db8:1::/48",
        ),
        row(
            "v4-mapped dst judged by v4 rules",
            "app",
            "[::ffff:192.0.2.10]:7",
            AllowKernel,
            "192.0.2.10",
        ),
        row(
            "v4-mapped IP match covers plain v4",
            "app",
            "192.0.2.13:80",
            AllowKernel,
            "::ffff:192.0.2.13",
        ),
        row(
            "v6 ::/0 does not cover v4-mapped",
            "v6all",
            "[::ffff:203.0.113.77]:443",
            Deny,
            "",
        ),
        row(
            "v6 ::/0 covers v6",
            "v6all",
            "[2001:db8:ff::1]:443",
            AllowKernel,
            "::/0",
        ),
        row(
            "any match allows: IP match after domains on same port",
            "app",
            "192.0.2.11:443",
            AllowKernel,
            "192.0.2.11:443",
        ),
        Row {
            udp: true,
            ..row(
                "UDP to IP match",
                "app",
                "192.0.2.10:443",
                AllowKernel,
                "192.0.2.10",
            )
        },
        // Rule 4/5: domain candidates → proxy; otherwise deny.
        row(
            "domain port → proxy",
            "app",
            "203.0.113.50:443",
            RedirectToProxy,
            "",
        ),
        row(
            "port-less domain → proxy on any port",
            "portless",
            "203.0.113.50:8443",
            RedirectToProxy,
            "",
        ),
        row(
            "no domain on this port → deny",
            "app",
            "203.0.113.50:25",
            Deny,
            "",
        ),
        Row {
            udp: true,
            ..row(
                "UDP never covered by domains (QUIC)",
                "app",
                "203.0.113.50:443",
                Deny,
                "",
            )
        },
        row(
            "Matched, no matches → deny",
            "empty",
            "203.0.113.50:443",
            Deny,
            "",
        ),
        // At the proxy: TLS.
        Row {
            l7: sni("api.example.com"),
            ..row(
                "sni exact",
                "app",
                "203.0.113.50:443",
                AllowAtProxy,
                "api.example.com:443",
            )
        },
        Row {
            l7: sni("API.Example.COM"),
            ..row(
                "sni case",
                "app",
                "203.0.113.50:443",
                AllowAtProxy,
                "api.example.com:443",
            )
        },
        // A trailing dot makes another name (Envoy: no filter chain for it).
        Row {
            l7: sni("api.example.com."),
            ..row(
                "sni trailing dot is another name",
                "app",
                "203.0.113.50:443",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: sni("a.svc.example.com."),
            ..row(
                "sni trailing dot, wildcard",
                "app",
                "203.0.113.50:443",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: sni("Dot.Example.Net."),
            ..row(
                "a match written with a trailing dot matches that name",
                "l7",
                "203.0.113.50:443",
                AllowAtProxy,
                "dot.example.net.:443",
            )
        },
        Row {
            l7: sni("dot.example.net"),
            ..row(
                "… and not the name without it",
                "l7",
                "203.0.113.50:443",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: sni("example.com"),
            ..row(
                "wildcard excludes apex",
                "app",
                "203.0.113.50:443",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: sni("a.svc.example.com"),
            ..row(
                "wildcard one level",
                "app",
                "203.0.113.50:443",
                AllowAtProxy,
                "*.svc.example.com:443",
            )
        },
        Row {
            l7: sni("x.y.z.svc.example.com"),
            ..row(
                "wildcard any depth",
                "app",
                "203.0.113.50:443",
                AllowAtProxy,
                "*.svc.example.com:443",
            )
        },
        Row {
            l7: sni("notsvc.example.com"),
            ..row(
                "wildcard is label-aligned",
                "app",
                "203.0.113.50:443",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: sni("anything.test"),
            ..row(
                "port-less tls domain",
                "portless",
                "203.0.113.50:8443",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: sni("portless.example.net"),
            ..row(
                "port-less tls domain on any port",
                "portless",
                "203.0.113.50:8443",
                AllowAtProxy,
                "portless.example.net",
            )
        },
        Row {
            l7: sni("api.example.com"),
            ..row(
                "port mismatch: no domain on this port, kernel denies",
                "app",
                "203.0.113.50:8443",
                Deny,
                "",
            )
        },
        Row {
            l7: sni("api.example.com"),
            ..row(
                "port mismatch at proxy",
                "portless",
                "203.0.113.50:8443",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: Some(L7::Tls(None)),
            ..row("no SNI", "app", "203.0.113.50:443", DenyAtProxy, "")
        },
        Row {
            l7: sni("203.0.113.50"),
            ..row("IP literal SNI", "app", "203.0.113.50:443", DenyAtProxy, "")
        },
        Row {
            l7: sni("web.example.com"),
            ..row(
                "http match does not allow TLS",
                "app",
                "203.0.113.50:80",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: sni("anything.at.all"),
            ..row(
                "* matches everything",
                "star",
                "203.0.113.50:443",
                AllowAtProxy,
                "*",
            )
        },
        // At the proxy: HTTP/1 and h2c.
        Row {
            l7: host("web.example.com"),
            ..row(
                "http host",
                "app",
                "203.0.113.50:80",
                AllowAtProxy,
                "web.example.com:80",
            )
        },
        Row {
            l7: host("WEB.example.com:80"),
            ..row(
                "http host with port, case",
                "app",
                "203.0.113.50:80",
                AllowAtProxy,
                "web.example.com:80",
            )
        },
        Row {
            l7: host("api.example.com"),
            ..row(
                "tls match does not allow http",
                "app",
                "203.0.113.50:443",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: host("other.example.com"),
            ..row(
                "http other host → 503",
                "app",
                "203.0.113.50:80",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: Some(L7::H2c("grpc.example.com".into())),
            ..row(
                "h2c → grpc",
                "app",
                "203.0.113.50:9000",
                AllowAtProxy,
                "grpc.example.com:9000",
            )
        },
        // Either codec meets every L7 match (Kuma's listener: codec AUTO, ALPN http/1.1 + h2c).
        Row {
            l7: Some(L7::H2c("web.example.com".into())),
            ..row(
                "h2c → http",
                "app",
                "203.0.113.50:80",
                AllowAtProxy,
                "web.example.com:80",
            )
        },
        Row {
            l7: Some(L7::H2c("h2.example.com".into())),
            ..row(
                "h2c → http2",
                "app",
                "203.0.113.50:9001",
                AllowAtProxy,
                "h2.example.com:9001",
            )
        },
        Row {
            l7: host("grpc.example.com"),
            ..row(
                "http/1 → grpc",
                "app",
                "203.0.113.50:9000",
                AllowAtProxy,
                "grpc.example.com:9000",
            )
        },
        Row {
            l7: host("h2.example.com:9001"),
            ..row(
                "http/1 → http2",
                "app",
                "203.0.113.50:9001",
                AllowAtProxy,
                "h2.example.com:9001",
            )
        },
        Row {
            l7: Some(L7::H2c("api.example.com".into())),
            ..row("h2c → not tls", "app", "203.0.113.50:443", DenyAtProxy, "")
        },
        // The Host's port must be the dialled port (Kuma's virtual hosts: `d`, `d:port`).
        Row {
            l7: host("web.example.com:8080"),
            ..row(
                "host names another port → 503",
                "app",
                "203.0.113.50:80",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: Some(L7::H2c("web.example.com:81".into())),
            ..row(
                ":authority names another port → 503",
                "app",
                "203.0.113.50:80",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: host("web.example.com:080"),
            ..row(
                "host port with a leading zero",
                "app",
                "203.0.113.50:80",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: host("web.example.com:"),
            ..row(
                "host with an empty port",
                "app",
                "203.0.113.50:80",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: host("portless.example.net:8443"),
            ..row(
                "port-less match: host port = dialled port",
                "l7",
                "203.0.113.50:8443",
                AllowAtProxy,
                "portless.example.net",
            )
        },
        Row {
            l7: host("portless.example.net:9443"),
            ..row(
                "port-less match: host port ≠ dialled port",
                "l7",
                "203.0.113.50:8443",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: host("anything.test:9999"),
            ..row(
                "`*` (Envoy's catch-all host) takes any Host port",
                "l7",
                "203.0.113.50:8080",
                AllowAtProxy,
                "*:8080",
            )
        },
        Row {
            l7: host("anything.test."),
            ..row(
                "`*` takes trailing-dot names",
                "l7",
                "203.0.113.50:8080",
                AllowAtProxy,
                "*:8080",
            )
        },
        // Trailing dots in Host.
        Row {
            l7: host("web.example.com."),
            ..row(
                "host trailing dot is another name",
                "app",
                "203.0.113.50:80",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: host("web.example.com.:80"),
            ..row(
                "host trailing dot with port",
                "app",
                "203.0.113.50:80",
                DenyAtProxy,
                "",
            )
        },
        Row {
            l7: Some(L7::H2c("dot.example.net.:80".into())),
            ..row(
                "h2c trailing dot written in the match",
                "l7",
                "203.0.113.50:80",
                AllowAtProxy,
                "dot.example.net.:80",
            )
        },
    ];
    let mut failures = Vec::new();
    for r in &rows {
        let w = ws
            .iter()
            .find(|w| w.name == r.workload)
            .cloned()
            .unwrap_or_else(|| wl(r.workload, &[]));
        let conf = set.merge_for(&w, Mode::All);
        let conn = Connection {
            dst: r.dst.parse::<SocketAddr>().unwrap(),
            udp: r.udp,
            l7: r.l7.clone(),
        };
        let d = decide(&conf, &conn, &opts);
        let matched = d
            .matched
            .map(|m| match m.port {
                Some(p) => format!("{}:{p}", m.value),
                None => m.value.to_string(),
            })
            .unwrap_or_default();
        if d.verdict != r.verdict || matched != r.matched {
            failures.push(format!(
                "{}: got {:?} ({}) match {matched:?}; want {:?} match {:?}",
                r.what, d.verdict, d.reason, r.verdict, r.matched
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Robustness: truncated and random input never panics; broken JSON is always an error.

fn all_fixture_bytes() -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    for sub in ["validate", "explain", "merge"] {
        for e in std::fs::read_dir(data(sub)).unwrap() {
            let p = e.unwrap().path();
            if policy::parse::is_policy_file(&p) {
                let b = std::fs::read(&p).unwrap();
                v.push((p, b));
            }
        }
    }
    v
}

#[test]
fn truncated_fixtures_never_panic() {
    for (p, bytes) in all_fixture_bytes() {
        let json = p.extension().is_some_and(|e| e == "json");
        let full_ok = load_policy_bytes(&p, &bytes, "default").is_ok();
        for cut in 0..bytes.len() {
            let r = load_policy_bytes(&p, &bytes[..cut], "default");
            let _ = r.as_ref().map_err(|e| e.to_string());
            if json && full_ok && cut > 0 && !bytes[..cut].iter().all(u8::is_ascii_whitespace) {
                // A proper prefix of one JSON object is never valid JSON, except when the cut
                // falls in whitespace after a complete value.
                let trimmed = String::from_utf8_lossy(&bytes[..cut]);
                if !trimmed.trim_end().ends_with('}') {
                    assert!(
                        r.is_err(),
                        "{}: prefix of {cut} bytes accepted",
                        p.display()
                    );
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), json in any::<bool>()) {
        let name = if json { "fuzz.json" } else { "fuzz.yaml" };
        let r = load_policy_bytes(Path::new(name), &bytes, "default");
        // Random bytes are almost never a policy; whatever they are, no panic and a printable result.
        if let Err(e) = &r {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn mutated_fixtures_never_panic(idx in any::<prop::sample::Index>(), edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let fixtures = all_fixture_bytes();
        let (p, bytes) = &fixtures[idx.index(fixtures.len())];
        let mut b = bytes.clone();
        for (at, byte) in edits {
            if b.is_empty() { break; }
            let i = at.index(b.len());
            b[i] = byte;
        }
        let _ = load_policy_bytes(p, &b, "default").map_err(|e| e.to_string());
    }

    #[test]
    fn random_yaml_values_never_panic(v in yaml_value()) {
        let text = serde_json::to_string(&v).unwrap();
        let _ = load_policy_bytes(Path::new("v.json"), text.as_bytes(), "default");
        let wrapped = serde_json::json!({"type": "MeshPassthrough", "name": "x", "spec": {"default": {"appendMatch": [v]}}});
        let _ = load_policy_bytes(Path::new("w.json"), wrapped.to_string().as_bytes(), "default");
    }

    #[test]
    fn random_matches_validate_without_panic(
        kind in prop::sample::select(vec!["Domain", "IP", "CIDR", "x", ""]),
        value in "[*a-z0-9.:/%_-]{0,24}",
        port in proptest::option::of(0u32..70000),
        protocol in proptest::option::of(prop::sample::select(vec!["tcp", "tls", "http", "http2", "grpc", "mysql", "udp"])),
    ) {
        let mut m = serde_json::json!({"type": kind, "value": value});
        if let Some(p) = port { m["port"] = p.into(); }
        if let Some(p) = protocol { m["protocol"] = p.into(); }
        let doc = serde_json::json!({"type": "MeshPassthrough", "name": "x", "spec": {"default": {"appendMatch": [m]}}});
        match load_policy_bytes(Path::new("m.json"), doc.to_string().as_bytes(), "default") {
            Ok(set) => {
                // A valid match is usable: IP/CIDR have a network, ports are in range.
                let m = &set.policies()[0].matches[0];
                prop_assert_eq!(m.net.is_some(), kind != "Domain");
                prop_assert!(m.port.is_none_or(|p| p >= 1));
            }
            Err(e) => prop_assert!(e.to_string().contains("spec.")),
        }
    }
}

fn yaml_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        "[a-zA-Z*.:/0-9]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop::sample::select(vec![
                    "type", "value", "port", "protocol", "spec", "name", "kind", "x"
                ])
                .prop_map(String::from),
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// 100,000 matches parse, validate and merge (timing is the benchmark's job; this shows the
/// path works at that size). `cargo test --release -- --ignored large_policy_set` for a figure.
#[test]
#[ignore = "slow in debug builds"]
fn large_policy_set() {
    let mut y =
        String::from("type: MeshPassthrough\nname: big\nspec:\n  default:\n    appendMatch:\n");
    for i in 0..100_000u32 {
        let (a, b) = (i / 256, i % 256);
        match i % 4 {
            0 => y.push_str(&format!(
                "    - {{type: IP, value: 10.{}.{}.{b}, port: {}}}\n",
                i % 200,
                a % 256,
                1 + i % 60000
            )),
            1 => y.push_str(&format!(
                "    - {{type: CIDR, value: 172.16.{}.{b}/28}}\n",
                a % 256
            )),
            2 => y.push_str(&format!(
                "    - {{type: Domain, value: h{i}.example.com, port: 443, protocol: tls}}\n"
            )),
            _ => y.push_str(&format!(
                "    - {{type: IP, value: '2001:db8::{a:x}:{b:x}', port: 8443}}\n"
            )),
        }
    }
    let t = std::time::Instant::now();
    let set = load_policy_bytes(Path::new("big.yaml"), y.as_bytes(), "default").unwrap();
    let conf = set.merge_for(&wl("w", &[]), Mode::All);
    eprintln!("100k matches: {:?}", t.elapsed());
    assert_eq!(conf.matches.len(), 100_000);
}
