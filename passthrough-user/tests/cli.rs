//! `passthrough check` and `passthrough explain` through their command-line arguments: the
//! JSON and text forms and the check summary, on the policy layer's fixtures
//! (`passthrough-policy/tests/data/policy`).

use std::path::{Path, PathBuf};

use passthrough_policy::Mode;
use passthrough_user::cli::{self, CheckArgs, ExplainArgs};

fn data(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../passthrough-policy/tests/data/policy")
        .join(p)
}

fn explain_args(dst: &str) -> ExplainArgs {
    ExplainArgs {
        policy: vec![data("explain/policies.yaml")],
        kubernetes: false,
        pod: None,
        kubeconfig: None,
        system_namespace: "kuma-system".into(),
        zone: "default".into(),
        dst: dst.parse().unwrap(),
        udp: false,
        sni: None,
        host: None,
        h2c: false,
        workload: Some("app".into()),
        labels: vec![],
        workloads: Some(data("explain/workloads.yaml")),
        mesh: "default".into(),
        internal_cidr: vec![],
        resolver: vec![],
        unselected_mode: Mode::All,
        json: true,
    }
}

fn explain_json(a: &ExplainArgs) -> serde_json::Value {
    let mut out = Vec::new();
    cli::run_explain(a, &mut out).unwrap();
    let s = String::from_utf8(out).unwrap();
    assert_eq!(s.lines().count(), 1, "one JSON object on one line: {s}");
    serde_json::from_str(&s).unwrap()
}

#[test]
fn explain_json_shape() {
    let j = explain_json(&explain_args("192.0.2.11:443"));
    assert_eq!(j["verdict"], "allow");
    assert_eq!(j["path"], "kernel");
    assert_eq!(j["match"]["type"], "IP");
    assert_eq!(j["match"]["value"], "192.0.2.11");
    assert_eq!(j["match"]["port"], 443);
    assert_eq!(j["match"]["policy"], "app-egress");
    assert!(j["reason"].as_str().unwrap().contains("IP/CIDR"));
    assert_eq!(j["rule"], "address_match");

    let j = explain_json(&explain_args("203.0.113.50:443"));
    assert_eq!(
        (j["verdict"].as_str(), j["path"].as_str()),
        (Some("proxy"), Some("proxy"))
    );
    assert!(j["match"].is_null());
    assert!(!j["candidates"].as_array().unwrap().is_empty());

    let j = explain_json(&ExplainArgs {
        sni: Some("api.example.com".into()),
        ..explain_args("203.0.113.50:443")
    });
    assert_eq!(
        (j["verdict"].as_str(), j["path"].as_str()),
        (Some("allow"), Some("proxy"))
    );
    assert_eq!(j["match"]["value"], "api.example.com");

    let j = explain_json(&ExplainArgs {
        host: Some("nope.example.com".into()),
        ..explain_args("203.0.113.50:80")
    });
    assert_eq!(
        (j["verdict"].as_str(), j["path"].as_str()),
        (Some("deny"), Some("proxy"))
    );
    assert!(j["match"].is_null());

    let j = explain_json(&explain_args("203.0.113.50:25"));
    assert_eq!(
        (j["verdict"].as_str(), j["path"].as_str()),
        (Some("deny"), Some("kernel"))
    );
    assert!(
        j["reason"]
            .as_str()
            .unwrap()
            .contains("no MeshPassthrough match")
    );

    // Labels instead of a workloads file: `locked` policy selects app=locked.
    let j = explain_json(&ExplainArgs {
        workload: None,
        workloads: None,
        labels: vec![("app".into(), "locked".into())],
        ..explain_args("192.0.2.10:443")
    });
    assert_eq!(j["verdict"], "deny");
    assert_eq!(j["mode"], "None");

    // UDP and internal ranges from the command line.
    let j = explain_json(&ExplainArgs {
        udp: true,
        ..explain_args("203.0.113.50:443")
    });
    assert_eq!(j["verdict"], "deny");
    let j = explain_json(&ExplainArgs {
        internal_cidr: vec!["203.0.113.0/24".parse().unwrap()],
        ..explain_args("203.0.113.50:443")
    });
    assert_eq!(j["verdict"], "allow");
}

#[test]
fn explain_text() {
    let mut out = Vec::new();
    cli::run_explain(
        &ExplainArgs {
            json: false,
            sni: Some("a.svc.example.com".into()),
            ..explain_args("203.0.113.50:443")
        },
        &mut out,
    )
    .unwrap();
    let s = String::from_utf8(out).unwrap();
    assert!(s.starts_with("verdict: allow (path: proxy)\n"), "{s}");
    assert!(
        s.contains("match:   Domain *.svc.example.com port 443 protocol tls (policy app-egress"),
        "{s}"
    );
    let mut out = Vec::new();
    assert!(
        cli::run_explain(
            &ExplainArgs {
                policy: vec![data("validate/domains.yaml")],
                ..explain_args("1.2.3.4:1")
            },
            &mut out
        )
        .is_err()
    );
}

#[test]
fn check_output() {
    let mut out = Vec::new();
    let ok = CheckArgs {
        paths: vec![
            data("validate/kuma-valid.yaml"),
            data("validate/other-mesh.yaml"),
        ],
        mesh: "default".into(),
        workloads: None,
    }
    .run(&mut out)
    .unwrap();
    let s = String::from_utf8(out).unwrap();
    assert!(ok);
    assert_eq!(
        s,
        "valid: 1 policy, 6 matches in mesh \"default\" (2 files); 2 of other meshes skipped\n"
    );

    let mut out = Vec::new();
    let args = CheckArgs {
        paths: vec![data("explain/policies.yaml")],
        mesh: "default".into(),
        workloads: Some(data("explain/workloads.yaml")),
    };
    assert!(args.run(&mut out).unwrap());
    let s = String::from_utf8(out).unwrap();
    assert!(
        s.ends_with("workloads selected\n") && s.lines().count() == 1,
        "{s}"
    );

    let mut out = Vec::new();
    let f = data("validate/kuma-full-invalid.yaml");
    let ok = CheckArgs {
        paths: vec![f.clone(), data("validate/ports.yaml")],
        mesh: "default".into(),
        workloads: None,
    }
    .run(&mut out)
    .unwrap();
    assert!(!ok);
    let s = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 15 + 7, "{s}");
    assert_eq!(
        lines[0],
        format!(
            "{}: spec.default.appendMatch[0].port: port must be a valid (1-65535)",
            f.display()
        )
    );
    assert!(
        lines[21].contains(
            "ports.yaml: spec.default.appendMatch[8].value: value 192.0.2.1 is already defiend"
        ),
        "{s}"
    );
}
