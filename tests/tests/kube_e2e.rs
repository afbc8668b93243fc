//! Opt-in: against a real cluster where the DaemonSet runs (docs/deploy.md, "Testing against a
//! real cluster"). Skipped unless `PASSTHROUGH_E2E_KUBECONFIG` names a kubeconfig.
//!
//! Creates a namespace labelled for injection with a MeshPassthrough allowing `1.1.1.1:443`
//! only, starts a curl pod in it, checks that a denied destination fails with `EPERM` ("Operation
//! not permitted") while the allowed one is not refused by the filter, and that the agent on the
//! pod's node lists the pod as governed in its status file. Deletes the namespace at the end,
//! also when an assertion fails.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

fn kubectl() -> PathBuf {
    std::env::var_os("PASSTHROUGH_KUBECTL")
        .map(PathBuf::from)
        .or_else(|| {
            let p = Path::new("/usr/local/lib/passthrough-tools/kubectl");
            p.is_file().then(|| p.to_path_buf())
        })
        .unwrap_or_else(|| PathBuf::from("kubectl"))
}

struct Cluster {
    kubeconfig: String,
    ns: String,
}

impl Cluster {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        use std::io::Write as _;
        let mut cmd = Command::new(kubectl());
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl");
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        } else {
            drop(child.stdin.take());
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let (ok, out, err) = self.run(args, stdin);
        assert!(ok, "kubectl {args:?} failed:\n{out}{err}");
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.run(&["delete", "namespace", &self.ns, "--wait=false"], None);
    }
}

#[test]
fn real_cluster_enforces_a_namespace_policy() {
    let Ok(kubeconfig) = std::env::var("PASSTHROUGH_E2E_KUBECONFIG") else {
        eprintln!("skipped: set PASSTHROUGH_E2E_KUBECONFIG to run against a real cluster");
        return;
    };
    let ns = format!("passthrough-e2e-{}", std::process::id());
    let c = Cluster { kubeconfig, ns };
    let ns = c.ns.clone();
    c.ok(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"apiVersion: v1
kind: Namespace
metadata:
  name: {ns}
  labels: {{kuma.io/sidecar-injection: enabled}}
---
apiVersion: kuma.io/v1alpha1
kind: MeshPassthrough
metadata:
  name: only-one
  namespace: {ns}
  labels: {{kuma.io/mesh: default}}
spec:
  targetRef: {{kind: Mesh}}
  default:
    passthroughMode: Matched
    appendMatch:
      - {{type: IP, value: 1.1.1.1, port: 443}}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: {ns}
spec:
  containers:
    - name: curl
      image: curlimages/curl:8.10.1
      command: [sleep, "3600"]
"#
        )),
    );
    c.ok(
        &[
            "-n",
            &ns,
            "wait",
            "--for=condition=Ready",
            "pod/client",
            "--timeout=180s",
        ],
        None,
    );
    let curl = |url: &str| {
        c.run(
            &[
                "-n",
                &ns,
                "exec",
                "client",
                "-c",
                "curl",
                "--",
                "curl",
                "-sS",
                "-m",
                "5",
                "-o",
                "/dev/null",
                url,
            ],
            None,
        )
    };
    // Allow the agent a moment to apply after the pod became ready (it is enforced from the
    // pod's first connection; the policy above is applied as soon as it is listed).
    let deadline = Instant::now() + Duration::from_secs(30);
    let denied = loop {
        let (_, _, err) = curl("https://8.8.8.8/");
        if err.contains("Operation not permitted") || Instant::now() > deadline {
            break err;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(
        denied.contains("Operation not permitted"),
        "8.8.8.8:443 must be refused by the filter (EPERM): {denied}"
    );
    let (_, _, err) = curl("https://1.1.1.1/");
    assert!(
        !err.contains("Operation not permitted"),
        "1.1.1.1:443 is allowed by the policy: {err}"
    );
    // The agent on the pod's node lists it as governed.
    let node = c.ok(
        &[
            "-n",
            &ns,
            "get",
            "pod",
            "client",
            "-o",
            "jsonpath={.spec.nodeName}",
        ],
        None,
    );
    let agent = c.ok(
        &[
            "-n",
            "passthrough-system",
            "get",
            "pod",
            "-l",
            "app.kubernetes.io/name=passthrough",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
        None,
    );
    let status = c.ok(
        &[
            "-n",
            "passthrough-system",
            "exec",
            &agent,
            "-c",
            "agent",
            "--",
            "passthrough",
            "status",
            "--json",
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let me = format!("{ns}/client");
    let pod = v["pods"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == me.as_str()))
        .unwrap_or_else(|| panic!("{me} not in the agent's status: {status}"));
    assert!(pod["state"]["Governed"].is_object(), "{pod}");
}
