//! The `check`, `explain` and `suggest` subcommands: their command-line arguments, turned into
//! the policy layer's inputs ([`passthrough_policy::report`], [`passthrough_policy::suggest`]),
//! which compute the answer.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use passthrough_policy::{
    L7, Mode, Resolver, decision_log,
    report::{self, ExplainRequest},
    suggest::{SuggestOptions, suggest},
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
    /// Decide with the live cluster objects: the pod given by `--pod`, its namespace, Services,
    /// EndpointSlices, owning ReplicaSet or Job and Node, and every MeshPassthrough
    /// (docs/kubernetes.md).
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
    /// As the agent's `--tls-fast-path`: `on` (default) names the path of the TLS fast path
    /// (`kernel-sni`) where it could take the connection; `off`: `proxy` there, as for an agent
    /// run with `--tls-fast-path off`.
    #[arg(long, value_name = "off|on", default_value = "on", value_parser = crate::run_args::parse_on_off, action = clap::ArgAction::Set)]
    pub tls_fast_path: bool,
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
            tls_fast_path: self.tls_fast_path,
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

/// Where the agent keeps its decision log unless told otherwise (`run --decision-log`), and
/// where `suggest` reads it.
pub const DEFAULT_DECISION_LOG: &str = "/var/lib/passthrough/decisions";

/// `passthrough suggest`: MeshPassthrough policies allowing what the agent observed.
#[derive(Debug, Clone, clap::Args)]
pub struct SuggestArgs {
    /// Decision logs (`run --decision-log DIR`) or files of `monitor --json` lines (`-`:
    /// stdin).
    #[arg(long = "log", value_name = "PATH", default_value = DEFAULT_DECISION_LOG, num_args = 1..)]
    pub log: Vec<PathBuf>,
    /// Write one file per workload (`<policy name>.yaml`) into this directory instead of all
    /// of them to stdout.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Only these workloads (repeatable; default: every workload seen).
    #[arg(long = "workload", value_name = "NAME")]
    pub workload: Vec<String>,
    /// Collapse names below SUFFIX into one `*.SUFFIX` match when at least
    /// `--wildcard-threshold` distinct ones were seen on a port (repeatable; default: every
    /// name stays exact).
    #[arg(long = "wildcard", value_name = "SUFFIX")]
    pub wildcard: Vec<String>,
    /// Distinct names below a `--wildcard` suffix needed to collapse them.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub wildcard_threshold: u32,
    /// Widest IPv4 network addresses of one port may be aggregated into (32: every address
    /// exact).
    #[arg(long, default_value_t = 32, value_name = "LEN", value_parser = clap::value_parser!(u8).range(0..=32))]
    pub aggregate_v4: u8,
    /// Widest IPv6 network addresses of one port may be aggregated into (128: exact).
    #[arg(long, default_value_t = 128, value_name = "LEN", value_parser = clap::value_parser!(u8).range(0..=128))]
    pub aggregate_v6: u8,
    /// Also allow what was denied while enforcing (default: allowed and `--audit` would-be
    /// denied decisions only).
    #[arg(long)]
    pub include_denied: bool,
    /// The mesh the policies are for.
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub mesh: String,
}

impl SuggestArgs {
    /// The policy layer's options.
    pub fn options(&self) -> SuggestOptions {
        SuggestOptions {
            mesh: self.mesh.clone(),
            wildcard_suffixes: self.wildcard.clone(),
            wildcard_threshold: self.wildcard_threshold as usize,
            aggregate_v4: self.aggregate_v4,
            aggregate_v6: self.aggregate_v6,
            include_denied: self.include_denied,
            workloads: self.workload.clone(),
        }
    }
}

/// Reads the logs, writes the suggested policies (to `out`, or into `--out DIR`) and a summary
/// to `summary`. Every policy is validated before it is written; one that is not valid is an
/// error (a bug here), never a file `check` would refuse.
pub fn run_suggest(
    args: &SuggestArgs,
    out: &mut impl Write,
    summary: &mut impl Write,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let log = decision_log::read(&args.log).context("reading the decision log")?;
    let report = suggest(&log.records, &args.options());
    for p in &report.policies {
        let file = Path::new(&p.name).with_extension("yaml");
        passthrough_policy::load_policy_bytes(&file, p.yaml.as_bytes(), &args.mesh).map_err(
            |e| anyhow::anyhow!("suggested policy for {:?} is not valid: {e}", p.workload),
        )?;
    }
    match &args.out {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
            for p in &report.policies {
                let path = dir.join(format!("{}.yaml", p.name));
                std::fs::write(&path, &p.yaml).with_context(|| format!("{}", path.display()))?;
                writeln!(summary, "wrote {}", path.display())?;
            }
        }
        None => {
            for (i, p) in report.policies.iter().enumerate() {
                if i > 0 {
                    writeln!(out, "---")?;
                }
                out.write_all(p.yaml.as_bytes())?;
            }
        }
    }
    let used: usize = report.policies.iter().map(|p| p.records).sum();
    let matches: usize = report.policies.iter().map(|p| p.matches.len()).sum();
    writeln!(
        summary,
        "{} {} ({matches} {}) from {used} of {} decisions in {} {}",
        report.policies.len(),
        if report.policies.len() == 1 {
            "policy"
        } else {
            "policies"
        },
        if matches == 1 { "match" } else { "matches" },
        log.records.len(),
        log.files.len(),
        if log.files.len() == 1 {
            "file"
        } else {
            "files"
        },
    )?;
    for (why, n) in &report.skipped {
        writeln!(summary, "  {n} not used: {}", why.describe())?;
    }
    if log.bad_lines > 0 {
        writeln!(
            summary,
            "  {} lines could not be read (skipped)",
            log.bad_lines
        )?;
    }
    if log.lost > 0 {
        writeln!(
            summary,
            "warning: {} decisions were made but not recorded (the log says where); destinations \
             seen only then are missing from the suggestion",
            log.lost
        )?;
    }
    Ok(())
}

/// `passthrough monitor`: the running agent's decisions, live.
#[derive(Debug, Clone, clap::Args)]
pub struct MonitorArgs {
    /// The agent's admin address (`run --admin-addr`).
    #[arg(long, default_value = "127.0.0.1:9901", value_name = "ADDR:PORT")]
    pub admin_addr: SocketAddr,
    /// One JSON object per line (the decision log's format; `suggest --log` reads it).
    #[arg(long)]
    pub json: bool,
    /// Only this workload (repeatable).
    #[arg(long = "workload", value_name = "NAME")]
    pub workload: Vec<String>,
    /// Only this verdict (repeatable).
    #[arg(long = "verdict", value_parser = crate::monitor::VERDICTS)]
    pub verdict: Vec<String>,
    /// Only this path (repeatable).
    #[arg(long = "path", value_parser = crate::monitor::PATHS)]
    pub path: Vec<String>,
    /// Only destinations in this CIDR (or this address; repeatable).
    #[arg(long = "dst", value_name = "CIDR", value_parser = crate::monitor::parse_net)]
    pub dst: Vec<IpNet>,
    /// Stop after this many decisions (default: until interrupted).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

impl MonitorArgs {
    /// The filter the agent applies.
    pub fn filter(&self) -> crate::monitor::Filter {
        crate::monitor::Filter {
            workloads: self.workload.clone(),
            verdicts: self.verdict.clone(),
            paths: self.path.clone(),
            dsts: self.dst.clone(),
        }
    }
}

/// Streams the agent's decisions to `out` (a line each) until interrupted, `--count` lines,
/// or the agent closes the stream; notes go to `note`. A reader that went away (`| head`)
/// ends it quietly.
pub fn run_monitor(
    args: &MonitorArgs,
    out: &mut impl Write,
    note: &mut impl Write,
) -> anyhow::Result<()> {
    use anyhow::{Context as _, bail};
    use std::io::{BufRead as _, Read as _};
    let mut stream = std::net::TcpStream::connect(args.admin_addr).with_context(|| {
        format!(
            "connecting to the agent's admin address {}",
            args.admin_addr
        )
    })?;
    let query = args.filter().to_query();
    // HTTP/1.0: the agent's answer is the stream itself, up to its end (no chunked framing).
    write!(
        stream,
        "GET /monitor?{query} HTTP/1.0\r\nHost: {}\r\n\r\n",
        args.admin_addr
    )?;
    let mut r = std::io::BufReader::new(stream);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code = status.split_whitespace().nth(1).unwrap_or("");
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    if code != "200" {
        let mut body = String::new();
        let _ = r.take(4096).read_to_string(&mut body);
        bail!("{}: {} {}", args.admin_addr, status.trim(), body.trim());
    }
    let mut shown = 0u64;
    let mut line = String::new();
    let quiet_pipe = |e: std::io::Error| -> anyhow::Result<bool> {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Ok(true)
        } else {
            Err(e.into())
        }
    };
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("the agent closed the stream");
        }
        if line.trim_end() == crate::monitor::HELLO.trim_end() {
            writeln!(
                note,
                "watching the decisions of the agent at {} (Ctrl-C to stop)",
                args.admin_addr
            )?;
            if !args.json {
                let header = crate::monitor::text_header();
                if let Err(e) = writeln!(out, "{header}").and_then(|_| out.flush()) {
                    return quiet_pipe(e).map(|_| ());
                }
            }
            continue;
        }
        let is_decision = matches!(
            passthrough_policy::decision_log::parse_line(&line),
            Some(passthrough_policy::decision_log::LogLine::Decision(_))
        );
        let Some(text) = crate::monitor::render_line(&line, args.json) else {
            continue;
        };
        if let Err(e) = writeln!(out, "{text}").and_then(|_| out.flush()) {
            return quiet_pipe(e).map(|_| ());
        }
        if is_decision {
            shown += 1;
        }
        if args.count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
    }
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
