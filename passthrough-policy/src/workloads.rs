//! The workloads file: a YAML (or JSON) list of `{name, cgroup, labels}`.
//!
//! ```yaml
//! - name: web
//!   cgroup: /sys/fs/cgroup/system.slice/web.service
//!   labels: {app: web, team: a}
//! - name: ci-job
//!   cgroup: ci.slice/job-1   # relative to the cgroup2 mount
//! ```
//! Strict: unknown fields, wrong types, empty or duplicate names are errors with position.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{PolicyError, error::Problem, model::Workload, parse::Scalar};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: Scalar,
    cgroup: PathBuf,
    #[serde(default)]
    labels: BTreeMap<String, Scalar>,
}

/// Reads a workloads file.
pub fn load_workloads(path: &Path) -> Result<Vec<Workload>, PolicyError> {
    let bytes = std::fs::read(path).map_err(|e| {
        PolicyError::Workloads(vec![Problem::new(path, format!("cannot read: {e}"))])
    })?;
    parse_workloads(path, &bytes)
}

/// Parses the content of a workloads file (`file` is only used in messages).
pub fn parse_workloads(file: &Path, bytes: &[u8]) -> Result<Vec<Workload>, PolicyError> {
    let err = |p: Problem| PolicyError::Workloads(vec![p]);
    let text = std::str::from_utf8(bytes).map_err(|_| err(Problem::new(file, "invalid UTF-8")))?;
    let raw: Option<Vec<RawWorkload>> =
        yaml_serde::from_str(text).map_err(|e| err(super::parse::yaml_problem(file, &e)))?;
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, w) in raw.unwrap_or_default().into_iter().enumerate() {
        if w.name.0.is_empty() {
            problems.push(Problem {
                field: Some(format!("[{i}].name")),
                ..Problem::new(file, "must be defined")
            });
            continue;
        }
        if w.cgroup.as_os_str().is_empty() {
            problems.push(Problem {
                field: Some(format!("[{i}].cgroup")),
                ..Problem::new(file, "must be defined")
            });
            continue;
        }
        if !seen.insert(w.name.0.clone()) {
            problems.push(Problem {
                field: Some(format!("[{i}].name")),
                ..Problem::new(file, format!("duplicate workload name {:?}", w.name.0))
            });
            continue;
        }
        out.push(Workload {
            name: w.name.0,
            cgroup: w.cgroup,
            labels: w.labels.into_iter().map(|(k, v)| (k, v.0)).collect(),
        });
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(PolicyError::Workloads(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let w = parse_workloads(
            Path::new("w.yaml"),
            b"- name: web\n  cgroup: /sys/fs/cgroup/web\n  labels: {app: web, v: 2}\n- name: ci\n  cgroup: ci.slice\n",
        )
        .unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].labels.get("v").map(String::as_str), Some("2"));
        assert!(w[1].labels.is_empty());
        assert!(
            parse_workloads(Path::new("w.yaml"), b"")
                .unwrap()
                .is_empty()
        );
        let e = parse_workloads(
            Path::new("w.yaml"),
            b"- name: a\n  cgroup: x\n  label: {}\n",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("w.yaml:3:"), "{e}");
        let e = parse_workloads(
            Path::new("w.yaml"),
            b"- {name: a, cgroup: x}\n- {name: a, cgroup: y}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
        assert!(parse_workloads(Path::new("w.yaml"), b"name: a\n").is_err());
    }
}
