//! The `check` and `explain` subcommands: their command-line arguments, turned into the policy
//! layer's inputs ([`passthrough_policy::report`]), which computes and formats the answer.

use std::{io::Write, net::SocketAddr, path::PathBuf};

use ipnet::IpNet;
use passthrough_policy::{
    L7, Mode, Resolver,
    report::{self, ExplainRequest},
};

/// `passthrough check PATH...`: validate policy files.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Policy files or directories (`*.yaml`, `*.yml`, `*.json`, walked recursively).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// The mesh the summary counts; policies of every mesh are validated.
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub mesh: String,
    /// A workloads file (`- {name, cgroup, labels}`); the summary then says how many are selected.
    #[arg(long, value_name = "FILE")]
    pub workloads: Option<PathBuf>,
}

impl CheckArgs {
    /// Runs the check; `Ok(true)` when valid (exit 0), `Ok(false)` when invalid (exit 1).
    pub fn run(&self, out: &mut impl Write) -> std::io::Result<bool> {
        report::check(&self.paths, &self.mesh, self.workloads.as_deref(), out)
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} is not k=v"))?;
    if k.is_empty() {
        return Err(format!("label {s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// `passthrough explain`: the decision for one connection, without touching the kernel.
#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {
    /// Policy files or directories.
    #[arg(long = "policy", required_unless_present = "kubernetes", num_args = 1.., value_name = "PATH")]
    pub policy: Vec<PathBuf>,
    /// Decide with the live cluster objects: the pod given by `--pod`, its namespace, Services
    /// and Node, and every MeshPassthrough (docs/kubernetes.md).
    #[arg(long, requires = "pod", conflicts_with_all = ["policy", "workload", "workloads", "labels"])]
    pub kubernetes: bool,
    /// With `--kubernetes`: the pod, `NAMESPACE/NAME`.
    #[arg(long, value_name = "NAMESPACE/NAME", requires = "kubernetes")]
    pub pod: Option<String>,
    /// With `--kubernetes`: the kubeconfig (default: in-cluster, else `$KUBECONFIG`).
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// With `--kubernetes`: Kuma's system namespace.
    #[arg(long, default_value = "kuma-system", value_name = "NAMESPACE")]
    pub system_namespace: String,
    /// With `--kubernetes`: Kuma's zone name.
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub zone: String,
    /// The destination, `IP:PORT` (`[IPv6]:PORT`).
    #[arg(long, value_name = "IP:PORT")]
    pub dst: SocketAddr,
    /// A UDP datagram rather than a TCP connection.
    #[arg(long)]
    pub udp: bool,
    /// The TLS SNI the client sends (decision at the proxy).
    #[arg(long, value_name = "NAME", conflicts_with = "host")]
    pub sni: Option<String>,
    /// The HTTP Host (decision at the proxy); HTTP/1.x unless `--h2c`.
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
    /// With `--host`: the request is HTTP/2 with prior knowledge (h2c). Either codec is matched
    /// by `http`, `http2` and `grpc` matches alike, as in Kuma.
    #[arg(long, requires = "host")]
    pub h2c: bool,
    /// The workload's name (what a `Dataplane` targetRef `name` selects).
    #[arg(long, value_name = "NAME")]
    pub workload: Option<String>,
    /// The workload's labels, `k=v,k=v`.
    #[arg(long, value_name = "K=V,...", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// A workloads file to look `--workload` up in (its labels are then used).
    #[arg(long, value_name = "FILE")]
    pub workloads: Option<PathBuf>,
    /// The mesh.
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub mesh: String,
    /// Ranges that are never egress (pod and service CIDRs).
    #[arg(long = "internal-cidr", value_name = "CIDR")]
    pub internal_cidr: Vec<IpNet>,
    /// DNS resolvers (`IP` or `IP:PORT`, `[IPv6]:PORT`; port 53 if none) that UDP may reach
    /// at exactly that port, as `run --resolver`.
    #[arg(long = "resolver", value_name = "IP[:PORT]")]
    pub resolver: Vec<Resolver>,
    /// The mode of a workload that no policy selects.
    #[arg(long = "unselected-mode", default_value = "All", value_name = "MODE")]
    pub unselected_mode: Mode,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl ExplainArgs {
    /// The policy layer's question.
    pub fn request(&self) -> ExplainRequest {
        let l7 = match (&self.sni, &self.host) {
            (Some(sni), _) => Some(L7::Tls(Some(sni.clone()))),
            (None, Some(h)) if self.h2c => Some(L7::H2c(h.clone())),
            (None, Some(h)) => Some(L7::Http1(h.clone())),
            (None, None) => None,
        };
        ExplainRequest {
            policy: self.policy.clone(),
            dst: self.dst,
            udp: self.udp,
            l7,
            workload: self.workload.clone(),
            labels: self.labels.clone(),
            workloads: self.workloads.clone(),
            mesh: self.mesh.clone(),
            internal_cidr: self.internal_cidr.clone(),
            resolvers: self.resolver.clone(),
            unselected_mode: self.unselected_mode,
        }
    }
}

/// Prints the decision for `args`: text, or one JSON object with `--json`.
pub fn run_explain(args: &ExplainArgs, out: &mut impl Write) -> anyhow::Result<()> {
    if args.kubernetes {
        return explain_pod(args, out);
    }
    let r = report::explain(&args.request())?;
    report::write_explain(&r, args.json, out)?;
    Ok(())
}

/// `explain --kubernetes --pod NS/NAME`: reads the pod and what decides for it from the API
/// server, then decides exactly as the agent on its node does.
fn explain_pod(args: &ExplainArgs, out: &mut impl Write) -> anyhow::Result<()> {
    use passthrough_kube::{
        cluster,
        kuma::{GovernRules, Governance, KumaConfig},
        node::{self, Settings},
    };
    use passthrough_policy::{Connection, DecideOptions, Workload, decide};
    let key = args.pod.clone().unwrap_or_default();
    let (ns, name) = key
        .split_once('/')
        .filter(|(n, p)| !n.is_empty() && !p.is_empty())
        .ok_or_else(|| anyhow::anyhow!("--pod {key:?}: expected NAMESPACE/NAME"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let snap = rt.block_on(async {
        let config = cluster::config(args.kubeconfig.as_deref()).await?;
        cluster::fetch_for_pod(config, ns, name).await
    })?;
    let settings = Settings {
        kuma: KumaConfig {
            system_namespace: args.system_namespace.clone(),
            zone: args.zone.clone(),
            ..KumaConfig::default()
        },
        govern: GovernRules {
            kuma_rules: true,
            ..Default::default()
        },
        unselected: args.unselected_mode,
        pending: Mode::None,
    };
    let e = node::explain_pod(&snap, &key, &settings)
        .ok_or_else(|| anyhow::anyhow!("pod {key} not found"))?;
    let req = args.request();
    let conn = Connection {
        dst: req.dst,
        udp: req.udp,
        l7: req.l7.clone(),
    };
    let opts = DecideOptions {
        internal: req.internal_cidr.clone(),
        resolvers: req.resolvers.clone(),
    };
    let workload = Workload {
        name: key.clone(),
        cgroup: PathBuf::new(),
        labels: e
            .dataplane
            .as_ref()
            .map(|d| d.labels.clone())
            .unwrap_or_default(),
    };
    let d = decide(&e.conf, &conn, &opts);
    let mut json = report::decision_json(&workload, &e.conf, &conn, &d);
    let governed = match &e.governance {
        Governance::Governed { mesh, why } => {
            serde_json::json!({"governed": true, "mesh": mesh, "why": why})
        }
        Governance::NotGoverned(why) => serde_json::json!({"governed": false, "why": why}),
        Governance::Invalid(why) => {
            serde_json::json!({"governed": false, "why": why, "invalid": true})
        }
    };
    json["pod"] = serde_json::json!(key);
    json["governance"] = governed.clone();
    json["inbounds"] = serde_json::json!(e.dataplane.as_ref().map(|d| d.inbounds.clone()));
    json["invalid_policies"] =
        serde_json::json!(e.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>());
    let r = report::ExplainReport {
        workload,
        conf: e.conf.clone(),
        conn,
        opts,
        json,
    };
    report::write_explain(&r, args.json, out)?;
    if !args.json {
        writeln!(
            out,
            "pod:      {key}: {}",
            match &e.governance {
                Governance::Governed { mesh, why } => format!("governed (mesh {mesh}; {why})"),
                Governance::NotGoverned(why) =>
                    format!("not governed ({why}), mode {}", e.conf.mode),
                Governance::Invalid(why) => format!("not governed: {why}"),
            }
        )?;
        if let Some(dp) = &e.dataplane {
            for (i, tags) in dp.inbounds.iter().enumerate() {
                let svc = tags
                    .get("kuma.io/service")
                    .map(String::as_str)
                    .unwrap_or("");
                writeln!(
                    out,
                    "inbound {i}: kuma.io/service={svc} ({} tags)",
                    tags.len()
                )?;
            }
        }
        for p in &e.problems {
            writeln!(out, "ignored:  {p}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(subcommand)]
        c: C,
    }
    #[derive(clap::Subcommand)]
    #[allow(clippy::large_enum_variant)]
    enum C {
        Check(CheckArgs),
        Explain(ExplainArgs),
    }

    #[test]
    fn clap_shapes() {
        use clap::CommandFactory;
        T::command().debug_assert();
        let t = T::try_parse_from([
            "x",
            "explain",
            "--policy",
            "a.yaml",
            "b.yaml",
            "--dst",
            "[2001:db8::1]:443",
            "--labels",
            "a=b,c=d",
            "--sni",
            "x.example.com",
            "--json",
        ])
        .unwrap();
        match t.c {
            C::Explain(e) => {
                assert_eq!(e.policy.len(), 2);
                assert_eq!(e.labels.len(), 2);
                assert!(e.json);
                assert_eq!(e.unselected_mode, Mode::All);
            }
            C::Check(_) => panic!(),
        }
        assert!(
            T::try_parse_from([
                "x",
                "explain",
                "--policy",
                "a",
                "--dst",
                "1.2.3.4:1",
                "--sni",
                "a",
                "--host",
                "b"
            ])
            .is_err()
        );
        assert!(T::try_parse_from(["x", "check"]).is_err());
    }
}
