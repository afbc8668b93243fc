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
    #[arg(long = "policy", required = true, num_args = 1.., value_name = "PATH")]
    pub policy: Vec<PathBuf>,
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
    let r = report::explain(&args.request())?;
    report::write_explain(&r, args.json, out)?;
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
