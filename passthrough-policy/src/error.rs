//! Errors of the policy layer.

use std::{fmt, path::PathBuf};

/// One problem found in a policy input: a read error, a syntax/type error with its position, a
/// document-level error, or one validation violation with its `spec.…` field path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line and column, for syntax and type errors.
    pub position: Option<(usize, usize)>,
    /// The field path rooted at `spec` (`spec.default.appendMatch[3].port`), for violations.
    pub field: Option<String>,
    /// The policy's name, when known.
    pub policy: Option<String>,
    /// What is wrong, in Kuma's words where Kuma has words for it.
    pub message: String,
}

impl Problem {
    /// A problem with neither position nor field.
    pub fn new(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Problem {
            file: file.into(),
            position: None,
            field: None,
            policy: None,
            message: message.into(),
        }
    }

    /// A syntax or type error at a 1-based line and column.
    pub fn at(
        file: impl Into<PathBuf>,
        line: usize,
        column: usize,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            position: Some((line, column)),
            ..Problem::new(file, message)
        }
    }

    /// A validation violation of `field`.
    pub fn violation(
        file: impl Into<PathBuf>,
        policy: &str,
        field: &str,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            field: Some(field.to_string()),
            policy: Some(policy.to_string()),
            ..Problem::new(file, message)
        }
    }
}

impl fmt::Display for Problem {
    /// `FILE: spec.path: message`, `FILE:LINE:COLUMN: message` or `FILE: message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Errors of the policy layer.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Policy input was rejected; every problem found, files in order, violations in Kuma's order.
    #[error("{}", lines(.0))]
    Invalid(Vec<Problem>),
    /// The workloads file is unreadable or malformed.
    #[error("{}", lines(.0))]
    Workloads(Vec<Problem>),
}

impl PolicyError {
    /// Every problem carried by the error.
    pub fn problems(&self) -> &[Problem] {
        match self {
            PolicyError::Invalid(p) | PolicyError::Workloads(p) => p,
        }
    }
}

fn lines(problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&p.to_string());
    }
    out
}
