//! The pure policy layer: reading Kuma `MeshPassthrough` resources, validating them exactly as
//! Kuma does, merging them per workload, deciding connections (docs/kuma.md), and compiling
//! the merged configurations into the entries of the kernel maps.
//!
//! Entry points: [`load_policies`] → [`PolicySet`] → [`PolicySet::merge_for`] →
//! [`decision::decide`]; [`plan::compile`] for the kernel; [`load_workloads`]; and the
//! `check` / `explain` reports in [`report`].
//!
//! Pure by construction: the crate depends on no async runtime, no socket or kernel library
//! and reads no clock (see its `Cargo.toml`), so everything here is a function of its inputs
//! and the agent, the proxy, `explain` and the tests all decide the same way.

pub mod decision;
pub mod decision_log;
pub mod error;
pub mod ip;
pub mod merge;
pub mod meta;
pub mod model;
pub mod outcome;
pub mod parse;
pub mod plan;
pub mod plan_maps;
pub mod ranges;
pub mod report;
pub mod resolver;
pub mod suggest;
pub mod validate;
pub mod workloads;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

// The per-match maps of loading and compiling hash with rustc's Fx hash, not SipHash (which
// showed up as the largest single cost there). Keys come from local policy files, not from the
// network, so HashDoS resistance is not needed.
use rustc_hash::FxHashMap;

pub use decision::{
    Connection, DecideOptions, Decision, L7, Reason, ReasonDetail, Verdict, decide,
};
pub use error::{PolicyError, Problem};
pub use meta::{Origin, PolicyMeta, Role};
pub use model::{Match, MatchKind, MatchOrigin, MergedConf, Mode, Protocol, Workload};
pub use resolver::Resolver;
pub use validate::{Policy, Target};
pub use workloads::load_workloads;

/// The validated policies of one mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    mesh: String,
    files: Vec<PathBuf>,
    policies: Vec<Policy>,
    notes: Vec<String>,
    shadow: Vec<String>,
}

impl PolicySet {
    /// A set from already validated policies (tests, benchmarks).
    pub fn from_policies(mesh: &str, policies: Vec<Policy>) -> Self {
        PolicySet {
            mesh: mesh.to_string(),
            policies,
            ..Default::default()
        }
    }

    /// The merged configuration for workload `w`; `unselected` when no policy selects it.
    pub fn merge_for(&self, w: &Workload, unselected: Mode) -> MergedConf {
        merge::merge(&self.policies, w, unselected)
    }

    /// The merged configurations of many workloads, computed once per distinct set of
    /// selecting policies: returns the distinct configurations and, for each workload, the
    /// index of its configuration. A node with a thousand pods of a few deployments merges a
    /// few times instead of a thousand (time and memory), and [`plan::compile`]
    /// recognises workloads that share a configuration without comparing their matches.
    pub fn merge_all<'w>(
        &self,
        workloads: impl IntoIterator<Item = &'w Workload>,
        unselected: Mode,
    ) -> (Vec<MergedConf>, Vec<usize>) {
        let mut confs = Vec::new();
        let mut index: FxHashMap<Vec<usize>, usize> = FxHashMap::default();
        let mut of = Vec::new();
        for w in workloads {
            let key = merge::ordered_indices(&self.policies, w);
            let i = *index.entry(key).or_insert_with_key(|key| {
                confs.push(merge::merge_indices(&self.policies, key, unselected));
                confs.len() - 1
            });
            of.push(i);
        }
        (confs, of)
    }

    /// The policies selecting `w`, least → most specific.
    pub fn selecting(&self, w: &Workload) -> Vec<&Policy> {
        merge::ordered_for(&self.policies, w)
    }

    /// Number of enforced policies (of the selected mesh, shadow ones left out).
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there is no policy.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Total number of `appendMatch` entries.
    pub fn match_count(&self) -> usize {
        self.policies.iter().map(|p| p.matches.len()).sum()
    }

    /// The policies, in input order (files in order, documents in order).
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The files read.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The mesh the set is for.
    pub fn mesh(&self) -> &str {
        &self.mesh
    }

    /// Informational notes (valid policies of other meshes, which are not enforced), one line
    /// each.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The names of the valid policies of this mesh labelled `kuma.io/effect: shadow`: Kuma
    /// does not enforce them, so they are not in [`PolicySet::policies`].
    pub fn shadow(&self) -> &[String] {
        &self.shadow
    }
}

/// Reads, parses and validates every policy file under `paths` (files, or directories walked
/// recursively for `*.yaml`, `*.yml`, `*.json`), keeping the policies of `mesh` that are not
/// shadow policies. Policies of every mesh are validated.
///
/// Any problem in any file rejects the whole input; the error lists every problem, one line
/// each (`FILE: spec.path: message`, `FILE:LINE:COL: message`).
pub fn load_policies(paths: &[PathBuf], mesh: &str) -> Result<PolicySet, PolicyError> {
    let mut problems = Vec::new();
    let files = parse::collect_files(paths, &mut problems);
    let mut parsed = Vec::new();
    for f in &files {
        parsed.extend(parse::parse_file(f, &mut problems));
    }
    build(mesh, files, parsed, problems)
}

/// Like [`load_policies`] for one in-memory file (`file` names it in messages and decides
/// JSON vs YAML by its extension).
pub fn load_policy_bytes(file: &Path, bytes: &[u8], mesh: &str) -> Result<PolicySet, PolicyError> {
    let mut problems = Vec::new();
    let parsed = parse::parse_bytes(file, bytes, &mut problems);
    build(mesh, vec![file.to_path_buf()], parsed, problems)
}

fn build(
    mesh: &str,
    files: Vec<PathBuf>,
    parsed: Vec<parse::ParsedPolicy>,
    mut problems: Vec<Problem>,
) -> Result<PolicySet, PolicyError> {
    let mut notes = Vec::new();
    let mut shadow = Vec::new();
    let mut policies = Vec::new();
    // Kuma keys a Universal resource by mesh and name, a Kubernetes one by namespace and name.
    let mut seen: HashMap<(Option<String>, Option<String>, String), PathBuf> = HashMap::new();
    for p in parsed {
        // Every policy is validated, whatever its mesh (Kuma validates every resource it is
        // given); only the decision selects by mesh.
        match validate::validate(&p) {
            Ok(pol) => {
                let key = (
                    pol.namespace.is_none().then(|| pol.mesh.clone()),
                    pol.namespace.clone(),
                    pol.name.clone(),
                );
                if let Some(first) = seen.get(&key) {
                    problems.push(Problem {
                        policy: Some(pol.name.clone()),
                        ..Problem::new(
                            &p.file,
                            format!(
                                "policy {} is defined twice (first in {})",
                                pol.name,
                                first.display()
                            ),
                        )
                    });
                    continue;
                }
                seen.insert(key, p.file.clone());
                if pol.mesh != mesh {
                    notes.push(format!(
                        "{}: policy {} is for mesh {:?}, not enforced (--mesh {mesh})",
                        p.file.display(),
                        p.name,
                        p.mesh
                    ));
                } else if pol.meta.is_shadow() {
                    shadow.push(pol.name.clone());
                } else {
                    policies.push(pol);
                }
            }
            Err(violations) => {
                for (field, message) in violations {
                    problems.push(Problem::violation(&p.file, &p.name, &field, message));
                }
            }
        }
    }
    if !problems.is_empty() {
        // Files in input order; within a file, parse problems then violations in Kuma's order.
        let order: HashMap<&Path, usize> = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.as_path(), i))
            .collect();
        problems.sort_by_key(|p| order.get(p.file.as_path()).copied().unwrap_or(0));
        return Err(PolicyError::Invalid(problems));
    }
    Ok(PolicySet {
        mesh: mesh.to_string(),
        files,
        policies,
        notes,
        shadow,
    })
}
