//! What `passthrough check` and `passthrough explain` report (docs/cli.md), as pure functions of
//! their inputs: the agent's CLI (`passthrough-user`, `cli.rs`) parses the command line into an
//! [`ExplainRequest`] or check inputs and prints what these functions write.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde_json::{Value, json};

use super::{
    Connection, DecideOptions, Decision, L7, Match, MergedConf, Mode, PolicyError, PolicySet,
    Resolver, Workload, decide, load_policies, load_workloads,
};

/// Validates every policy in every file under `paths`, whatever its mesh: writes one line per
/// problem (`FILE: spec.path: message`, all files, all violations) and returns `Ok(false)`, or
/// writes a one-line summary of the policies of `mesh` (and how many of other meshes, and how
/// many shadow ones, were valid but are not enforced) and returns `Ok(true)`. With `workloads`, the summary also says how many of
/// that file's workloads some policy selects (a broken workloads file is reported like a
/// broken policy file).
pub fn check(
    paths: &[PathBuf],
    mesh: &str,
    workloads: Option<&Path>,
    out: &mut impl Write,
) -> io::Result<bool> {
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
    if !set.shadow().is_empty() {
        line.push_str(&format!(
            "; {} shadow (kuma.io/effect), not enforced",
            set.shadow().len()
        ));
    }
    if !set.notes().is_empty() {
        line.push_str(&format!(
            "; {} of other meshes also valid",
            set.notes().len()
        ));
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

/// What `explain` is asked: one connection of one workload under a set of policy files.
#[derive(Debug, Clone)]
pub struct ExplainRequest {
    /// Policy files or directories.
    pub policy: Vec<PathBuf>,
    /// The destination.
    pub dst: SocketAddr,
    /// A UDP datagram rather than a TCP connection.
    pub udp: bool,
    /// What the proxy would read (SNI / Host); `None`: the kernel's view only.
    pub l7: Option<L7>,
    /// The workload's name (what a `Dataplane` targetRef `name` selects).
    pub workload: Option<String>,
    /// The workload's labels (added to, and overriding, those of the workloads file).
    pub labels: Vec<(String, String)>,
    /// A workloads file to look `workload` up in (its labels and cgroup are then used).
    pub workloads: Option<PathBuf>,
    /// The mesh.
    pub mesh: String,
    /// Ranges that are never egress.
    pub internal_cidr: Vec<IpNet>,
    /// DNS resolvers UDP may reach.
    pub resolvers: Vec<Resolver>,
    /// The mode of a workload that no policy selects.
    pub unselected_mode: Mode,
}

/// Why `explain` could not decide.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The policy files are invalid (every problem, one per line).
    #[error("{0}")]
    Policies(PolicyError),
    /// The workloads file is invalid.
    #[error("{0}")]
    Workloads(PolicyError),
    /// A workloads file was given without the workload's name.
    #[error("--workloads needs --workload NAME")]
    NoWorkloadName,
    /// The named workload is not in the workloads file.
    #[error("workload {name:?} is not in {}", file.display())]
    UnknownWorkload {
        /// The name asked for.
        name: String,
        /// The workloads file.
        file: PathBuf,
    },
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
    /// The internal ranges and resolvers it was decided with.
    pub opts: DecideOptions,
    /// The JSON object `explain --json` prints (also used for the text form).
    pub json: Value,
}

/// Computes the decision for `req` (loads policies and, if given, the workloads file).
pub fn explain(req: &ExplainRequest) -> Result<ExplainReport, ExplainError> {
    let set: PolicySet = load_policies(&req.policy, &req.mesh).map_err(ExplainError::Policies)?;
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    let mut name = req.workload.clone().unwrap_or_default();
    let mut cgroup = PathBuf::new();
    if let Some(wf) = &req.workloads {
        let ws = load_workloads(wf).map_err(ExplainError::Workloads)?;
        let wanted = req
            .workload
            .as_deref()
            .ok_or(ExplainError::NoWorkloadName)?;
        let w = ws.into_iter().find(|w| w.name == wanted).ok_or_else(|| {
            ExplainError::UnknownWorkload {
                name: wanted.to_string(),
                file: wf.clone(),
            }
        })?;
        labels = w.labels;
        name = w.name;
        cgroup = w.cgroup;
    }
    labels.extend(req.labels.iter().cloned());
    let workload = Workload {
        name,
        cgroup,
        labels,
    };
    let conf = set.merge_for(&workload, req.unselected_mode);
    let conn = Connection {
        dst: req.dst,
        udp: req.udp,
        l7: req.l7.clone(),
    };
    let opts = DecideOptions {
        internal: req.internal_cidr.clone(),
        resolvers: req.resolvers.clone(),
    };
    let d = decide(&conf, &conn, &opts);
    let json = decision_json(&workload, &conf, &conn, &d);
    Ok(ExplainReport {
        workload,
        conf: conf.clone(),
        conn,
        opts,
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

/// The `explain --json` object for a decision.
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

/// Writes an explanation: one JSON object on one line (`json`), or the text form.
pub fn write_explain(r: &ExplainReport, json: bool, out: &mut impl Write) -> io::Result<()> {
    if json {
        return writeln!(out, "{}", r.json);
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
    let decided = decide(conf, &r.conn, &r.opts);
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
