//! `cargo xtask`: project tasks that need more than one cargo call.
//!
//! - `setup`: install toolchains, LLVM and bpf-linker (idempotent; `scripts/setup.sh`).
//! - `build`: build the agent (the eBPF object is built by passthrough-user's build.rs).
//! - `test`: every test, kernel tests included (root needed; under `CI=true` they never skip).
//! - `bench`: benchmarks (`connect` = kernel-path connect() cost and compile+load time).
//! - `demo`: the out-of-the-box demo (workload cgroup, netns test hosts, example policy).
//! - `sweep`: remove test namespaces/cgroups left by a crashed run.
//!
//! `--workspace` always excludes `passthrough-ebpf`: it only builds for the BPF target, which
//! passthrough-user's build.rs does with the pinned nightly.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and tests need (idempotent).
    Setup,
    /// Build the agent and its eBPF programs (debug unless --release).
    Build {
        /// Release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run all tests, kernel tests included.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run benchmarks.
    Bench {
        /// Which: `connect` (kernel path: connect() cost, compile + load), `policy` (parse,
        /// validate, merge, compile of 100,000 matches). Default: all.
        #[arg(default_value = "all")]
        which: String,
        /// Shorter runs (smoke check of the bench itself).
        #[arg(long)]
        quick: bool,
    },
    /// Run the demo: a workload cgroup, netns test hosts, an example policy.
    Demo,
    /// Remove leftover test namespaces and cgroups (only ours, by name prefix).
    Sweep,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("[xtask] {cmd:?}");
    let status = cmd.current_dir(root()).status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

fn sweep() -> anyhow::Result<()> {
    let bin = target_dir().join("debug").join("pt-sweep");
    if bin.exists() {
        run(&mut Command::new(bin))?;
    } else {
        run(cargo().args(["run", "--quiet", "-p", "passthrough-tests", "--bin", "pt-sweep"]))?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => run(Command::new("bash").arg("scripts/setup.sh")),
        Cmd::Build { release } => {
            let mut c = cargo();
            c.args(["build", "-p", "passthrough-user", "--bins"]);
            if release {
                c.arg("--release");
            }
            run(&mut c)
        }
        Cmd::Test { args } => {
            // Binaries first: kernel tests spawn the real `passthrough` and the probe.
            run(cargo().args(["build", "--workspace", "--exclude", "passthrough-ebpf", "--bins"]))?;
            sweep()?;
            let bin = target_dir().join("debug").join("passthrough");
            let result = run(cargo()
                .args(["test", "--workspace", "--exclude", "passthrough-ebpf"])
                .env("PASSTHROUGH_BIN", &bin)
                .arg("--")
                .args(&args));
            // Whatever happened, leave no namespaces or cgroups behind.
            let swept = sweep();
            result.and(swept)
        }
        Cmd::Bench { which, quick } => {
            let all = which == "all";
            if !all && !["connect", "policy"].contains(&which.as_str()) {
                bail!("unknown bench {which:?}: one of connect, policy, all");
            }
            let mut result = Ok(());
            if all || which == "policy" {
                // parse + validate + merge + compile of 100,000 matches (criterion; --figures
                // prints medians and peak RSS). No kernel needed.
                result = run(cargo()
                    .args(["bench", "-p", "passthrough-user", "--bench", "policy_pipeline", "--", "--figures"])
                    .env("AYA_BUILD_SKIP", "1"));
            }
            if result.is_ok() && (all || which == "connect") {
                run(cargo().args(["build", "--release", "--workspace", "--exclude", "passthrough-ebpf", "--bins"]))?;
                let mut c = Command::new(target_dir().join("release").join("pt-bench"));
                c.arg("connect");
                if quick {
                    c.arg("--quick");
                }
                result = run(&mut c);
                let swept = sweep();
                result = result.and(swept);
            }
            result
        }
        Cmd::Demo => {
            run(cargo().args(["build", "--workspace", "--exclude", "passthrough-ebpf", "--bins"]))?;
            let result = run(Command::new(target_dir().join("debug").join("pt-demo"))
                .env("PASSTHROUGH_BIN", target_dir().join("debug").join("passthrough")));
            let swept = sweep();
            result.and(swept)
        }
        Cmd::Sweep => sweep(),
    }
}
