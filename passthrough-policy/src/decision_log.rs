//! The decision record: one line of `passthrough monitor --json` and of the agent's on-disk
//! decision log (`passthrough run --decision-log DIR`), and what `passthrough suggest` reads.
//!
//! A record is one JSON object per line ([`DecisionRecord`]); a line that says how many
//! decisions were not recorded is a [`LostRecord`]. The log is a directory of segments
//! `decisions-<sequence>.jsonl` (sequence numbers in decimal, increasing); [`read`] takes
//! segments in sequence order and files as given (a saved `monitor --json` capture reads the
//! same). Lines that do not parse (a segment cut short by a crash, a future field type) are
//! counted and skipped, never fatal.
//!
//! Pure: reading uses `std::fs` only; the writer (rotation, the bound on disk) is the agent's.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// One decision, as `monitor --json` prints it and the decision log stores it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecisionRecord {
    /// When it was decided, RFC 3339 UTC (`2026-01-02T03:04:05.678Z`).
    pub time: String,
    /// The workload's name (`""`: a socket below an attachment in no workload).
    pub workload: String,
    /// Its cgroup id (0: none).
    #[serde(default)]
    pub workload_id: u64,
    /// `kernel` or `proxy`.
    pub path: String,
    /// `allow`, `deny` or `would_deny` (`--audit` let a denial through).
    pub verdict: String,
    /// The reason code (as in metrics, deny events and `explain --json`).
    pub reason: String,
    /// The destination the workload dialled (IPv4-mapped shown as IPv4).
    pub dst: SocketAddr,
    /// Kernel: `tcp`, `udp`, `ping`, `raw:<IP protocol>`; proxy: `tls`, `http1`, `h2c`,
    /// `grpc`, `unknown`.
    pub protocol: String,
    /// TLS SNI, when the proxy saw one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// HTTP Host / `:authority`, when the proxy saw one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The match that allowed it, when known (the proxy knows it; the kernel says
    /// `address_match` without naming the entry).
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
    /// The process that dialled (0 when unknown).
    #[serde(default)]
    pub pid: u32,
    /// Its command name.
    #[serde(default)]
    pub comm: String,
    /// Kernel allows reported while sampling: this record stands for `sampled` decisions
    /// (1 in `sampled` were reported). Absent: not sampled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled: Option<u32>,
}

/// Decisions that were made but not recorded (a full kernel ring buffer, a watcher or the log
/// writer that fell behind), so a reader knows what it is missing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LostRecord {
    /// When the loss was noticed.
    pub time: String,
    /// How many decisions were lost since the previous report.
    pub lost: u64,
    /// Where: `kernel` (ring buffer full, counted by the programs) or `agent` (a queue of the
    /// agent was full).
    pub at: String,
}

/// One line of a log or capture.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum LogLine {
    /// A decision.
    Decision(Box<DecisionRecord>),
    /// A loss report.
    Lost(LostRecord),
}

/// What [`read`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogContents {
    /// Every decision, in file order.
    pub records: Vec<DecisionRecord>,
    /// Decisions reported lost (sum of the [`LostRecord`]s).
    pub lost: u64,
    /// Lines that did not parse (skipped).
    pub bad_lines: usize,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

/// Prefix of a segment's file name.
pub const SEGMENT_PREFIX: &str = "decisions-";
/// Suffix of a segment's file name.
pub const SEGMENT_SUFFIX: &str = ".jsonl";

/// The file name of segment `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{seq}{SEGMENT_SUFFIX}")
}

/// The sequence number of a segment file name, if it is one.
pub fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?
        .parse()
        .ok()
}

/// The segments of a log directory, oldest first: `(sequence, path)`.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| Some((segment_seq(e.file_name().to_str()?)?, e.path())))
        .collect();
    out.sort();
    Ok(out)
}

/// Parses one line; `None` for a line that is neither a decision nor a loss report.
pub fn parse_line(line: &str) -> Option<LogLine> {
    serde_json::from_str(line.trim()).ok()
}

/// Reads decision logs and captures: each path is a log directory (its segments, oldest first)
/// or a file of JSON lines (`-` is stdin).
pub fn read(paths: &[PathBuf]) -> io::Result<LogContents> {
    let mut out = LogContents::default();
    for p in paths {
        if p.as_os_str() == "-" {
            read_lines(io::stdin().lock(), &mut out)?;
            out.files.push(p.clone());
        } else if p.is_dir() {
            for (_, f) in segments(p)? {
                read_file(&f, &mut out)?;
            }
        } else {
            read_file(p, &mut out)?;
        }
    }
    Ok(out)
}

fn read_file(path: &Path, out: &mut LogContents) -> io::Result<()> {
    let f = std::fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    read_lines(io::BufReader::new(f), out)?;
    out.files.push(path.to_path_buf());
    Ok(())
}

fn read_lines(r: impl io::BufRead, out: &mut LogContents) -> io::Result<()> {
    for line in r.split(b'\n') {
        let line = line?;
        let Ok(text) = std::str::from_utf8(&line) else {
            out.bad_lines += 1;
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        match parse_line(text) {
            Some(LogLine::Decision(d)) => out.records.push(*d),
            Some(LogLine::Lost(l)) => out.lost = out.lost.saturating_add(l.lost),
            None => out.bad_lines += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DecisionRecord {
        DecisionRecord {
            time: "2026-01-02T03:04:05.678Z".into(),
            workload: "web".into(),
            workload_id: 42,
            path: "proxy".into(),
            verdict: "allow".into(),
            reason: "domain_match".into(),
            dst: "203.0.113.7:443".parse().unwrap(),
            protocol: "tls".into(),
            sni: Some("api.example.com".into()),
            host: None,
            matched: Some("Domain api.example.com port 443 protocol tls".into()),
            pid: 7,
            comm: "curl".into(),
            sampled: None,
        }
    }

    #[test]
    fn records_round_trip_and_omit_what_is_unknown() {
        let r = record();
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.contains(r#""match":"Domain api.example.com"#),
            "{line}"
        );
        assert!(!line.contains("host"), "{line}");
        assert!(!line.contains("sampled"), "{line}");
        assert_eq!(parse_line(&line), Some(LogLine::Decision(Box::new(r))));
        let lost = r#"{"time":"2026-01-02T03:04:05.678Z","lost":12,"at":"kernel"}"#;
        assert!(matches!(parse_line(lost), Some(LogLine::Lost(l)) if l.lost == 12));
        // Minimal kernel record: optional fields absent.
        let k = r#"{"time":"t","workload":"w","path":"kernel","verdict":"would_deny","reason":"no_match","dst":"[2001:db8::1]:53","protocol":"udp"}"#;
        let Some(LogLine::Decision(d)) = parse_line(k) else {
            panic!("{k}")
        };
        assert_eq!(d.dst.port(), 53);
        assert_eq!(d.pid, 0);
        for bad in [
            "",
            "{}",
            "not json",
            r#"{"time":"t","workload":"w"}"#,
            "[1,2]",
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_name(12), "decisions-12.jsonl");
        assert_eq!(segment_seq("decisions-12.jsonl"), Some(12));
        for bad in [
            "decisions-.jsonl",
            "decisions-x.jsonl",
            "decisions-1.json",
            "x-1.jsonl",
        ] {
            assert_eq!(segment_seq(bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_segments_in_order_and_skips_bad_lines() {
        let dir = std::env::temp_dir().join(format!("pt-declog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = record();
        a.workload = "a".into();
        let mut b = record();
        b.workload = "b".into();
        // Sequence 10 sorts after 9 (numbers, not names).
        std::fs::write(
            dir.join(segment_name(10)),
            format!("{}\n", serde_json::to_string(&b).unwrap()),
        )
        .unwrap();
        std::fs::write(
            dir.join(segment_name(9)),
            format!(
                "{}\n{{\"time\":\"t\",\"lost\":3,\"at\":\"agent\"}}\n{{\"trunc",
                serde_json::to_string(&a).unwrap()
            ),
        )
        .unwrap();
        std::fs::write(dir.join("other.txt"), "ignored\n").unwrap();
        let got = read(std::slice::from_ref(&dir)).unwrap();
        let names: Vec<&str> = got.records.iter().map(|r| r.workload.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(got.lost, 3);
        assert_eq!(got.bad_lines, 1);
        assert_eq!(got.files.len(), 2);
        assert!(read(&[dir.join("missing")]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
