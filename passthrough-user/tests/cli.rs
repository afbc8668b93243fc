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
        tls_fast_path: false,
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

/// With `--tls-fast-path=on`, a connection that only `tls` Domain matches at its port could
/// allow names the `kernel-sni` path (with a note: when its destination is verified), whatever
/// the verdict on the name; a port that also has an `http` match keeps `proxy`, and so does
/// every connection with the fast path off.
#[test]
fn explain_names_the_tls_fast_path() {
    let fast = |dst: &str, sni: Option<&str>| {
        explain_json(&ExplainArgs {
            sni: sni.map(str::to_string),
            tls_fast_path: true,
            ..explain_args(dst)
        })
    };
    let j = fast("203.0.113.50:443", Some("api.example.com"));
    assert_eq!(
        (j["verdict"].as_str(), j["path"].as_str()),
        (Some("allow"), Some("kernel-sni"))
    );
    assert!(j["path_note"].as_str().unwrap().contains("verified"), "{j}");
    let j = fast("203.0.113.50:443", Some("evil.example.com"));
    assert_eq!(
        (j["verdict"].as_str(), j["path"].as_str()),
        (Some("deny"), Some("kernel-sni"))
    );
    let j = fast("203.0.113.50:443", None);
    assert_eq!(j["path"], "kernel-sni");
    // HTTP port: per request, on the proxy.
    let j = fast("203.0.113.50:80", None);
    assert_eq!(j["path"], "proxy");
    // Kernel decisions stay kernel ones.
    assert_eq!(fast("192.0.2.11:443", None)["path"], "kernel");
    assert_eq!(fast("203.0.113.50:25", None)["path"], "kernel");
    // Off: proxy.
    let j = explain_json(&ExplainArgs {
        sni: Some("api.example.com".into()),
        ..explain_args("203.0.113.50:443")
    });
    assert_eq!(j["path"], "proxy");
    assert!(j["path_note"].is_null());
}

/// `passthrough explain` itself (the binary, its own argument parsing): without
/// `--tls-fast-path` it answers as the agent does by default, fast path on (`kernel-sni` for an
/// allowed TLS name on a TLS-only port, in text and in JSON); `--tls-fast-path off` answers
/// `proxy`, as an agent run with it off takes such a connection.
#[test]
fn explain_defaults_to_the_tls_fast_path() {
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_passthrough"))
            .arg("explain")
            .arg("--policy")
            .arg(data("explain/policies.yaml"))
            .arg("--workloads")
            .arg(data("explain/workloads.yaml"))
            .args(["--workload", "app", "--dst", "203.0.113.50:443"])
            .args(["--sni", "api.example.com"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "explain {extra:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let text = run(&[]);
    assert!(
        text.starts_with("verdict: allow (path: kernel-sni)\n"),
        "{text}"
    );
    let j: serde_json::Value = serde_json::from_str(&run(&["--json"])).unwrap();
    assert_eq!(
        (j["verdict"].as_str(), j["path"].as_str()),
        (Some("allow"), Some("kernel-sni")),
        "{j}"
    );
    assert!(j["path_note"].as_str().unwrap().contains("verified"), "{j}");
    assert_eq!(j, {
        let on = run(&["--json", "--tls-fast-path", "on"]);
        serde_json::from_str::<serde_json::Value>(&on).unwrap()
    });
    let text = run(&["--tls-fast-path", "off"]);
    assert!(text.starts_with("verdict: allow (path: proxy)\n"), "{text}");
    let j: serde_json::Value =
        serde_json::from_str(&run(&["--json", "--tls-fast-path=off"])).unwrap();
    assert_eq!(
        (j["verdict"].as_str(), j["path"].as_str()),
        (Some("allow"), Some("proxy")),
        "{j}"
    );
    assert!(j["path_note"].is_null(), "{j}");
}

#[test]
fn explain_l7_follows_kumas_listener() {
    // An h2c request meets an `http` match; an HTTP/1 request meets a `grpc` match.
    let j = explain_json(&ExplainArgs {
        host: Some("web.example.com".into()),
        h2c: true,
        ..explain_args("203.0.113.50:80")
    });
    assert_eq!(
        (j["verdict"].as_str(), j["l7"].as_str()),
        (Some("allow"), Some("h2c"))
    );
    assert_eq!(j["match"]["protocol"], "http");
    let j = explain_json(&ExplainArgs {
        host: Some("grpc.example.com".into()),
        ..explain_args("203.0.113.50:9000")
    });
    assert_eq!(j["verdict"], "allow");
    assert_eq!(j["match"]["protocol"], "grpc");
    // A Host naming another port than the dialled one: denied, and the reason names it.
    let j = explain_json(&ExplainArgs {
        host: Some("Web.example.com:8080".into()),
        ..explain_args("203.0.113.50:80")
    });
    assert_eq!(
        (j["verdict"].as_str(), j["rule"].as_str()),
        (Some("deny"), Some("no_domain_match"))
    );
    assert!(
        j["reason"]
            .as_str()
            .unwrap()
            .contains("web.example.com:8080"),
        "{j}"
    );
    // A trailing dot makes another name.
    let j = explain_json(&ExplainArgs {
        sni: Some("api.example.com.".into()),
        ..explain_args("203.0.113.50:443")
    });
    assert_eq!(j["verdict"], "deny");
    assert!(
        j["reason"].as_str().unwrap().contains("api.example.com."),
        "{j}"
    );
}

#[test]
fn the_kuma_parity_example_decides_as_its_comments_say() {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kuma-parity.yaml");
    let mut out = Vec::new();
    let ok = CheckArgs {
        paths: vec![ex.clone()],
        mesh: "default".into(),
        workloads: None,
    }
    .run(&mut out)
    .unwrap();
    assert!(ok);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "valid: 2 policies, 2 matches in mesh \"default\" (1 file); 1 shadow (kuma.io/effect), not enforced\n"
    );
    let web = |dst: &str| ExplainArgs {
        policy: vec![ex.clone()],
        workload: None,
        workloads: None,
        labels: vec![("app".into(), "web".into())],
        ..explain_args(dst)
    };
    let j = explain_json(&ExplainArgs {
        host: Some("api.example.com".into()),
        h2c: true,
        ..web("203.0.113.10:80")
    });
    assert_eq!(j["verdict"], "allow", "{j}");
    assert_eq!(j["mode"], "Matched", "{j}");
    assert_eq!(
        j["policies"],
        serde_json::json!(["a-allow-api", "b-zone-web"])
    );
    let j = explain_json(&ExplainArgs {
        host: Some("api.example.com:8080".into()),
        ..web("203.0.113.10:80")
    });
    assert_eq!(j["verdict"], "deny", "{j}");
    let j = explain_json(&ExplainArgs {
        sni: Some("dl.pkg.example.com".into()),
        ..web("203.0.113.10:443")
    });
    assert_eq!(j["verdict"], "allow", "{j}");
    // Not app=web: no policy (the shadow one is not enforced) → --unselected-mode.
    let j = explain_json(&ExplainArgs {
        unselected_mode: Mode::None,
        labels: vec![],
        ..web("203.0.113.10:443")
    });
    assert_eq!(
        (j["verdict"].as_str(), j["mode"].as_str()),
        (Some("deny"), Some("None"))
    );
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
            data("validate/other-mesh-valid.yaml"),
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
        "valid: 1 policy, 6 matches in mesh \"default\" (2 files); 2 of other meshes also valid\n"
    );

    // Every mesh is validated: an invalid policy of another mesh fails the check (Kuma would
    // refuse it), and a shadow policy is counted apart (valid, not enforced).
    let mut out = Vec::new();
    let f = data("validate/other-mesh.yaml");
    let ok = CheckArgs {
        paths: vec![data("validate/kuma-valid.yaml"), f.clone()],
        mesh: "default".into(),
        workloads: None,
    }
    .run(&mut out)
    .unwrap();
    assert!(!ok);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "{}: spec.default.appendMatch[0].value: provided IP has incorrect value\n",
            f.display()
        )
    );
    let dir = tempfile::tempdir().unwrap();
    let shadow = dir.path().join("shadow.yaml");
    std::fs::write(
        &shadow,
        "type: MeshPassthrough\nname: s\nlabels: {kuma.io/effect: shadow}\nspec: {}\n",
    )
    .unwrap();
    let mut out = Vec::new();
    assert!(
        CheckArgs {
            paths: vec![data("validate/kuma-valid.yaml"), shadow],
            mesh: "default".into(),
            workloads: None,
        }
        .run(&mut out)
        .unwrap()
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "valid: 1 policy, 6 matches in mesh \"default\" (2 files); 1 shadow (kuma.io/effect), not enforced\n"
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

/// `run --resolver` and `explain --resolver` mean the same thing, and the kernel decides what
/// `explain` says: UDP to a resolver is allowed at the resolver's own port, in every mode.
/// Before issue 17 they disagreed: `explain` allowed UDP to `198.51.100.53:5353` while `run`
/// dropped the port and compiled the resolver at port 53, so the kernel denied it.
#[test]
fn run_and_explain_agree_on_a_resolver_at_another_port() {
    use clap::Parser;
    use passthrough_common::{
        Reason,
        decide::{Transport, Verdict as KernelVerdict},
    };
    use passthrough_policy::{
        Workload, load_policies,
        plan::compile,
        plan_maps::{KernelSettings, PlanMaps},
    };
    use passthrough_user::agent::{RunArgs, plan_options};

    #[derive(Parser)]
    struct Run {
        #[command(flatten)]
        run: RunArgs,
    }

    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("none.yaml");
    std::fs::write(
        &policy,
        "type: MeshPassthrough\nname: none\nmesh: default\nspec:\n  targetRef: {kind: Mesh}\n  default:\n    passthroughMode: None\n",
    )
    .unwrap();
    let resolver = "198.51.100.53:5353";
    let run = Run::try_parse_from([
        "run",
        "--policy",
        policy.to_str().unwrap(),
        "--cgroup",
        "/sys/fs/cgroup/app",
        "--resolver",
        resolver,
    ])
    .unwrap()
    .run;
    let set = load_policies(&run.policy, &run.mesh).unwrap();
    let conf = set.merge_for(
        &Workload {
            name: "app".into(),
            cgroup: "/sys/fs/cgroup/app".into(),
            labels: Default::default(),
        },
        run.unselected_mode,
    );
    const APP: u64 = 4242;
    let plan = compile(0, &[(APP, &conf)], &plan_options(&run));
    let kernel = PlanMaps::new(
        &plan,
        None,
        KernelSettings {
            proxy: true,
            ..Default::default()
        },
    );
    for (dst, allowed) in [
        ("198.51.100.53:5353", true),
        ("[::ffff:198.51.100.53]:5353", true),
        // Port 53 of a resolver configured at another port is no resolver.
        ("198.51.100.53:53", false),
        ("198.51.100.54:5353", false),
    ] {
        let j = explain_json(&ExplainArgs {
            policy: vec![policy.clone()],
            dst: dst.parse().unwrap(),
            udp: true,
            workload: None,
            workloads: None,
            resolver: vec![resolver.parse().unwrap()],
            ..explain_args(dst)
        });
        let k = kernel.decide(&[APP], dst.parse().unwrap(), Transport::Udp, 0);
        let (verdict, rule, kernel_verdict) = if allowed {
            ("allow", Reason::Resolver, KernelVerdict::Allow)
        } else {
            ("deny", Reason::ModeNone, KernelVerdict::Deny)
        };
        assert_eq!(
            (j["verdict"].as_str(), j["rule"].as_str()),
            (Some(verdict), Some(rule.code())),
            "explain {dst}: {j}"
        );
        assert_eq!(
            (k.verdict, k.reason),
            (kernel_verdict, rule),
            "kernel {dst}"
        );
    }
}
