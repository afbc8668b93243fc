//! The common shape of a kernel test: a temp dir for files, a workload cgroup, netns test hosts,
//! and the real agent enforcing one policy file on that cgroup.

use std::path::PathBuf;

use tempfile::TempDir;

use crate::{Agent, AgentBuilder, Probe, TestCgroup, TestNet, write_policy};

/// A test's world. Field order = drop order: the agent first, then the test hosts, then the
/// cgroup, then the files.
pub struct World {
    /// The agent enforcing [`World::policy`] on [`World::cg`].
    pub agent: Agent,
    /// The test hosts.
    pub net: TestNet,
    /// The workload cgroup.
    pub cg: TestCgroup,
    /// The policy file (tests edit it to reload).
    pub policy: PathBuf,
    /// Holds the files.
    pub dir: TempDir,
}

impl World {
    /// The agent started with `yaml` as its policy and default flags.
    pub fn new(yaml: &str) -> World {
        Self::with(yaml, |b| b)
    }

    /// The agent started with `yaml` as its policy and the flags `f` adds.
    pub fn with(yaml: &str, f: impl FnOnce(AgentBuilder) -> AgentBuilder) -> World {
        let dir = crate::test_dir();
        let cg = TestCgroup::new().unwrap();
        let net = TestNet::new().unwrap();
        let policy = write_policy(dir.path(), yaml);
        let agent = f(Agent::builder().policy(&policy).cgroup(cg.path()))
            .start()
            .unwrap();
        World {
            agent,
            net,
            cg,
            policy,
            dir,
        }
    }

    /// A probe in the workload cgroup, in the client netns.
    pub fn probe(&self) -> Probe {
        Probe::spawn(&self.cg, &self.net).unwrap()
    }

    /// The workload's name (`--cgroup PATH` → the directory name).
    pub fn workload(&self) -> String {
        self.cg.name()
    }
}
