//! The `check` and `explain` subcommands (SPEC §5) as library functions; `main.rs` embeds the
//! clap argument structs and calls [`CheckArgs::run`] / [`run_explain`].

use std::{collections::BTreeMap, io::Write, net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use ipnet::IpNet;
use serde_json::{Value, json};

use super::{
    Connection, DecideOptions, Decision, L7, Match, MergedConf, Mode, PolicySet, Workload, decide,
    load_policies, load_workloads,
};

/// `passthrough check PATH...`: validate policy files.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Policy files or directories (`*.yaml`, `*.yml`, `*.json`, walked recursively).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// The mesh whose policies are checked; policies of other meshes are skipped.
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub mesh: String,
    /// A workloads file (`- {name, cgroup, labels}`); the summary then says how many are selected.
    #[arg(long, value_name = "FILE")]
    pub workloads: Option<PathBuf>,
}

impl CheckArgs {
    /// Runs the check; `Ok(true)` when valid (exit 0), `Ok(false)` when invalid (exit 1).
    pub fn run(&self, out: &mut impl Write) -> anyhow::Result<bool> {
        check(&self.paths, &self.mesh, self.workloads.as_deref(), out)
    }
}

/// Validates every file under `paths`; prints one line per problem (`FILE: spec.path: message`,
/// all files, all violations) and returns `Ok(false)`, or prints a one-line summary and returns
/// `Ok(true)`.
pub fn run_check(paths: &[PathBuf], mesh: &str, out: &mut impl Write) -> anyhow::Result<bool> {
    check(paths, mesh, None, out)
}

fn check(
    paths: &[PathBuf],
    mesh: &str,
    workloads: Option<&std::path::Path>,
    out: &mut impl Write,
) -> anyhow::Result<bool> {
    let set = match load_policies(paths, mesh) {
        Ok(s) => s,
        Err(e) => {
            for p in e.problems() {
                writeln!(out, "{p}")?;
            }
            return Ok(false);
        }
    };
    let mut line = format!(
        "valid: {} {}, {} {} in mesh {:?} ({} {})",
        set.len(),
        plural(set.len(), "policy", "policies"),
        set.match_count(),
        plural(set.match_count(), "match", "matches"),
        set.mesh(),
        set.files().len(),
        plural(set.files().len(), "file", "files"),
    );
    if !set.notes().is_empty() {
        line.push_str(&format!("; {} of other meshes skipped", set.notes().len()));
    }
    if let Some(wf) = workloads {
        match load_workloads(wf) {
            Ok(ws) => {
                let selected = ws.iter().filter(|w| !set.selecting(w).is_empty()).count();
                line.push_str(&format!("; {selected} of {} workloads selected", ws.len()));
            }
            Err(e) => {
                for p in e.problems() {
                    writeln!(out, "{p}")?;
                }
                return Ok(false);
            }
        }
    }
    writeln!(out, "{line}")?;
    Ok(true)
}

fn plural(n: usize, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
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
    /// With `--host`: the request is HTTP/2 with prior knowledge (matched by `http2`/`grpc`).
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
    /// DNS resolvers (`IP:PORT`) that UDP may reach.
    #[arg(long = "resolver", value_name = "ADDR:PORT")]
    pub resolver: Vec<SocketAddr>,
    /// The mode of a workload that no policy selects.
    #[arg(long = "unselected-mode", default_value = "All", value_name = "MODE")]
    pub unselected_mode: Mode,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The result of `explain`, before printing.
#[derive(Debug, Clone)]
pub struct ExplainReport {
    /// The workload decided for.
    pub workload: Workload,
    /// Its merged configuration.
    pub conf: MergedConf,
    /// The connection.
    pub conn: Connection,
    /// The JSON object SPEC §5 describes (also used for the text form).
    pub json: Value,
}

/// Computes the decision for `args` (loads policies and, if given, the workloads file).
pub fn explain(args: &ExplainArgs) -> anyhow::Result<ExplainReport> {
    let set: PolicySet =
        load_policies(&args.policy, &args.mesh).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    let mut name = args.workload.clone().unwrap_or_default();
    let mut cgroup = PathBuf::new();
    if let Some(wf) = &args.workloads {
        let ws = load_workloads(wf).map_err(|e| anyhow::anyhow!("{e}"))?;
        let wanted = args
            .workload
            .as_deref()
            .context("--workloads needs --workload NAME")?;
        let w = ws
            .into_iter()
            .find(|w| w.name == wanted)
            .with_context(|| format!("workload {wanted:?} is not in {}", wf.display()))?;
        labels = w.labels;
        name = w.name;
        cgroup = w.cgroup;
    }
    labels.extend(args.labels.iter().cloned());
    let workload = Workload {
        name,
        cgroup,
        labels,
    };
    let conf = set.merge_for(&workload, args.unselected_mode);
    let l7 = match (&args.sni, &args.host) {
        (Some(sni), _) => Some(L7::Tls(Some(sni.clone()))),
        (None, Some(h)) if args.h2c => Some(L7::H2c(h.clone())),
        (None, Some(h)) => Some(L7::Http1(h.clone())),
        (None, None) => None,
    };
    let conn = Connection {
        dst: args.dst,
        udp: args.udp,
        l7,
    };
    let opts = DecideOptions {
        internal: args.internal_cidr.clone(),
        resolvers: args.resolver.clone(),
    };
    let d = decide(&conf, &conn, &opts);
    let json = decision_json(&workload, &conf, &conn, &d);
    Ok(ExplainReport {
        workload,
        conf: conf.clone(),
        conn,
        json,
    })
}

/// One match as JSON: `type`, `value`, `port` (null = all), `protocol`, `net`, `policy`,
/// `file`, `index`.
pub fn match_json(m: &Match) -> Value {
    json!({
        "type": m.kind.as_str(),
        "value": m.value,
        "port": m.port,
        "protocol": m.protocol.as_str(),
        "net": m.net.map(|n| n.to_string()),
        "policy": m.origin.policy,
        "file": m.origin.file.display().to_string(),
        "index": m.origin.index,
    })
}

/// The SPEC §5 JSON object for a decision.
pub fn decision_json(
    w: &Workload,
    conf: &MergedConf,
    conn: &Connection,
    d: &Decision<'_>,
) -> Value {
    let (proto, name) = match &conn.l7 {
        None => (None, None),
        Some(L7::Tls(n)) => (Some("tls"), n.clone()),
        Some(L7::Http1(h)) => (Some("http"), Some(h.clone())),
        Some(L7::H2c(h)) => (Some("h2c"), Some(h.clone())),
    };
    json!({
        "verdict": d.verdict.word(),
        "path": d.verdict.path(),
        "decision": d.verdict,
        "reason": d.reason.to_string(),
        "rule": d.reason.code(),
        "match": d.matched.map(match_json),
        "candidates": d.candidates.iter().map(|m| match_json(m)).collect::<Vec<_>>(),
        "destination": conn.dst.to_string(),
        "transport": if conn.udp { "udp" } else { "tcp" },
        "l7": proto,
        "name": name,
        "workload": { "name": w.name, "labels": w.labels },
        "mode": conf.mode.as_str(),
        "policies": conf.policies,
    })
}

/// Prints the decision for `args`: text, or one JSON object with `--json`.
pub fn run_explain(args: &ExplainArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let r = explain(args)?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&r.json)?)?;
        return Ok(());
    }
    let j = &r.json;
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    writeln!(
        out,
        "verdict: {} (path: {})",
        s(&j["verdict"]),
        s(&j["path"])
    )?;
    writeln!(out, "reason:  {}", s(&j["reason"]))?;
    let conf = &r.conf;
    let decided = decide(
        conf,
        &r.conn,
        &DecideOptions {
            internal: args.internal_cidr.clone(),
            resolvers: args.resolver.clone(),
        },
    );
    match decided.matched {
        Some(m) => writeln!(out, "match:   {}", describe(m))?,
        None => writeln!(out, "match:   none")?,
    }
    for m in &decided.candidates {
        if Some(*m) != decided.matched {
            writeln!(out, "candidate: {}", describe(m))?;
        }
    }
    let who = if r.workload.name.is_empty() {
        "(unnamed)".to_string()
    } else {
        r.workload.name.clone()
    };
    if conf.policies.is_empty() {
        writeln!(
            out,
            "workload: {who}: selected by no policy, mode {} (--unselected-mode)",
            conf.mode
        )?;
    } else {
        writeln!(
            out,
            "workload: {who}: mode {}, {} matches from {} (least → most specific)",
            conf.mode,
            conf.matches.len(),
            conf.policies.join(", ")
        )?;
    }
    Ok(())
}

fn describe(m: &Match) -> String {
    m.to_string()
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
