//! `cargo xtask`: project tasks that need more than one cargo call.
//!
//! - `setup`: install toolchains, LLVM and bpf-linker (idempotent; `scripts/setup.sh`).
//! - `build`: build the agent (the eBPF object is built by passthrough-user's build.rs).
//! - `run -- ARGS`: build the eBPF programs and the agent, then run `passthrough ARGS` (aya's
//!   template convention: one command loads changed programs).
//! - `test`: `cargo fmt --all --check`, `cargo clippy` (the workspace, and the eBPF crate for
//!   the BPF target with the pinned nightly) and `cargo doc` with warnings denied, then every
//!   test, kernel tests included (root needed; under `CI=true` they never skip).
//! - `bench`: benchmarks (`connect` = kernel-path connect() cost and compile+load time, and the
//!   monitor's report against programs built without it; `monitor` = the agent's CPU for one
//!   watcher; `kube` = Kubernetes mode with 1,000 pods).
//! - `demo`: the out-of-the-box demo (workload cgroup, netns test hosts, example policy).
//! - `sweep`: remove test namespaces/cgroups left by a crashed run.
//! - `fuzz`: run every cargo-fuzz target in `fuzz/` for `--seconds N` each (pinned nightly;
//!   installs cargo-fuzz on first use). `test` ends with a short bounded run of each
//!   (`PASSTHROUGH_FUZZ_SECONDS`, default 10; 0 skips).
//!
//! `--workspace` always excludes `passthrough-ebpf`: it only builds for the BPF target, which
//! passthrough-user's build.rs does with the pinned nightly.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod report;

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
    /// Build the eBPF programs and the agent, then run `passthrough ARGS` (e.g.
    /// `cargo xtask run -- run --policy examples/ --cgroup system.slice/app.service`). The
    /// agent's exit status is this command's.
    Run {
        /// Release profile.
        #[arg(long)]
        release: bool,
        /// Arguments for `passthrough` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run all tests, kernel tests included.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run benchmarks.
    Bench {
        /// Which: `connect` (kernel path: connect() cost, compile + load, the monitor's report
        /// against programs built without it), `monitor` (the agent's CPU for one watcher at
        /// 10,000 decisions/s), `policy` (parse, validate, merge, compile of 100,000 matches),
        /// `proxy` (proxy path vs direct), `kube` (Kubernetes mode, 1,000 pods on one node),
        /// `bpf-log` (what the programs' aya-log calls cost, level off and debug, against
        /// `--before-object`; not part of `all`).
        /// Default: all.
        #[arg(default_value = "all")]
        which: String,
        /// Shorter runs (smoke check of the bench itself).
        #[arg(long)]
        quick: bool,
        /// Side by side with the peers (issue 7): installs them (`scripts/setup-peers.sh`), runs
        /// the kernel-path, proxy-path and scaling comparisons and writes their tables and plots
        /// into BENCHMARKS.md and docs/bench/. `which` picks one: `l4`, `proxy`, `scale`, `all`.
        #[arg(long)]
        compare: bool,
        /// Interleaved rounds for `--compare` (default: each bench's own, at least 3).
        #[arg(long)]
        rounds: Option<u32>,
        /// Only re-render BENCHMARKS.md and the plots from the last `--compare` measurements.
        #[arg(long)]
        report_only: bool,
        /// `bpf-log`: the eBPF object of a build without log calls (e.g. main's before aya-log:
        /// `target/release/build/passthrough-user-*/out/passthrough`), measured in the same
        /// rounds as the baseline.
        #[arg(long, value_name = "PATH")]
        before_object: Option<PathBuf>,
    },
    /// Run the demo: a workload cgroup, netns test hosts, an example policy.
    Demo,
    /// Remove leftover test namespaces and cgroups (only ours, by name prefix).
    Sweep,
    /// Run the fuzz targets (cargo-fuzz, pinned nightly), each for --seconds.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (default: every target in fuzz/).
        #[arg(long)]
        target: Option<String>,
        /// cargo-fuzz sanitizer: `none` (default: the code under test is safe Rust, and the
        /// build is several times faster) or `address`.
        #[arg(long, default_value = "none")]
        sanitizer: String,
    },
}

/// The nightly the fuzz build and the eBPF crate's clippy use (sanitizers and build-std need
/// nightly); the eBPF build pins the same one.
const NIGHTLY_TOOLCHAIN: &str = "nightly-2026-07-01";

/// Runs every fuzz target (or `only`) for `seconds` each, seeded from `fuzz/seeds/<target>`; the
/// growing corpus lives in `fuzz/corpus/<target>` and crashes in `fuzz/artifacts/<target>`
/// (both ignored by git). A crash fails the run: turn its input into a regression unit test.
fn fuzz(seconds: u64, only: Option<&str>, sanitizer: &str) -> anyhow::Result<()> {
    let has_cargo_fuzz = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_fuzz {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz_dir = root().join("fuzz");
    let targets: Vec<String> = match only {
        Some(t) => vec![t.to_string()],
        None => std::fs::read_dir(fuzz_dir.join("fuzz_targets"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.path()
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    // `cargo +toolchain` goes through rustup's cargo, not the one running xtask. The fuzz
    // crate depends on the policy and proxy crates only, so no eBPF object is built.
    let nightly = || {
        let mut c = Command::new("cargo");
        c.arg(format!("+{NIGHTLY_TOOLCHAIN}"))
            .env_remove("RUSTC")
            .env_remove("CARGO");
        c
    };
    run(nightly()
        .args(["fuzz", "build", "--sanitizer", sanitizer, "--fuzz-dir"])
        .arg(&fuzz_dir))?;
    for t in &targets {
        let corpus = fuzz_dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(t);
        let mut c = nightly();
        c.args(["fuzz", "run", "--sanitizer", sanitizer, "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(t)
            .arg(&corpus);
        if seeds.is_dir() {
            c.arg(&seeds);
        }
        c.args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-rss_limit_mb=2048",
            "-timeout=10",
            "-print_final_stats=1",
        ]);
        run(&mut c).with_context(|| {
            format!("fuzz target {t} failed: the crashing input is in fuzz/artifacts/{t}/; add it as a regression test")
        })?;
    }
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("[xtask] {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds every binary of the workspace but the eBPF crate (which `passthrough-user`'s build
/// script builds): the agent, the test helpers and the bench binaries.
fn build_bins(release: bool) -> anyhow::Result<()> {
    let mut c = cargo();
    c.args([
        "build",
        "--workspace",
        "--exclude",
        "passthrough-ebpf",
        "--bins",
    ]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

/// Builds the eBPF programs with the `no-monitor` feature (the monitor's report of allowed
/// decisions compiled out), as passthrough-user's build script builds the real ones (aya-build:
/// the pinned nightly, `build-std=core`, BTF), into a target directory of its own. The
/// connect bench loads it beside the embedded object to measure what the disabled report
/// costs. Returns the object's path.
fn build_ebpf_without_monitor() -> anyhow::Result<PathBuf> {
    let dir = target_dir().join("ebpf-no-monitor");
    let mut c = Command::new("cargo");
    c.arg(format!("+{NIGHTLY_TOOLCHAIN}"))
        .args([
            "build",
            "--package",
            "passthrough-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--features",
            "no-monitor",
            "--target-dir",
        ])
        .arg(&dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!(
                "--cfg=bpf_target_arch=\"{}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
                std::env::consts::ARCH
            ),
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO");
    run(&mut c)?;
    Ok(dir.join("bpfel-unknown-none/release/passthrough"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn sweep() -> anyhow::Result<()> {
    let bin = target_dir().join("debug").join("pt-sweep");
    if bin.exists() {
        run(&mut Command::new(bin))?;
    } else {
        run(cargo().args([
            "run",
            "--quiet",
            "-p",
            "passthrough-tests",
            "--bin",
            "pt-sweep",
        ]))?;
    }
    Ok(())
}

/// The comparison benchmarks: (name, binary, output file).
const COMPARE_PARTS: [(&str, &str, &str); 3] = [
    ("l4", "pt-bench-compare-l4", "compare-l4.jsonl"),
    ("proxy", "pt-bench-compare-proxy", "compare-proxy.jsonl"),
    ("scale", "pt-bench-scale", "compare-scale.jsonl"),
];

/// `bench --compare`: install the peers, run each comparison (a failing one does not stop the
/// others), then render whatever was measured into BENCHMARKS.md and docs/bench/*.svg.
fn compare(which: &str, quick: bool, rounds: Option<u32>, report_only: bool) -> anyhow::Result<()> {
    let parts: Vec<_> = COMPARE_PARTS
        .iter()
        .filter(|(n, ..)| which == "all" || which == *n)
        .collect();
    if parts.is_empty() {
        bail!("unknown comparison {which:?}: one of l4, proxy, scale, all");
    }
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let mut result = Ok(());
    if !report_only {
        run(Command::new("bash").arg("scripts/setup-peers.sh"))?;
        build_bins(true)?;
        for (name, bin, file) in &parts {
            let mut c = Command::new(target_dir().join("release").join(bin));
            c.arg("--out").arg(out_dir.join(file));
            if quick {
                c.arg("--quick");
            }
            if let Some(r) = rounds {
                c.args(["--rounds", &r.to_string()]);
            }
            let r = run(&mut c).with_context(|| format!("comparison {name}"));
            if let Err(e) = &r {
                eprintln!("[xtask] {e:#}");
            }
            result = result.and(r);
            sweep()?;
        }
    }
    // Render every part measured so far (not only the ones just run), so one part can be re-run.
    let files: Vec<PathBuf> = COMPARE_PARTS
        .iter()
        .map(|(_, _, f)| out_dir.join(f))
        .collect();
    let samples = report::load(&files)?;
    let section = report::render(&samples, &root().join("docs/bench"), "docs/bench")?;
    report::splice(&root().join("BENCHMARKS.md"), &section)?;
    eprintln!(
        "[xtask] wrote BENCHMARKS.md (comparison section) and docs/bench/*.svg from {} measurements",
        samples.len()
    );
    result
}

/// `run`: builds `passthrough` (its build script builds the eBPF object it embeds, so the
/// programs always match their sources), then replaces this process with `passthrough ARGS`
/// (`exec`, as `cargo run` does): signals (Ctrl-C, SIGTERM, SIGHUP to reload) reach the agent
/// itself, its exit status is the command's, and relative paths are read from the caller's
/// working directory. Returns only if the exec failed.
fn run_agent(release: bool, args: &[String]) -> anyhow::Error {
    let mut c = cargo();
    c.args(["build", "-p", "passthrough-user", "--bin", "passthrough"]);
    if release {
        c.arg("--release");
    }
    if let Err(e) = run(&mut c) {
        return e;
    }
    let bin = target_dir()
        .join(if release { "release" } else { "debug" })
        .join("passthrough");
    eprintln!("[xtask] exec {} {}", bin.display(), args.join(" "));
    use std::os::unix::process::CommandExt as _;
    let e = Command::new(&bin).args(args).exec();
    anyhow::Error::new(e).context(format!("exec {}", bin.display()))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run { release, args } => Err(run_agent(release, &args)),
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
            // Formatting first: cheap, and a failure names the files (`cargo fmt --all` fixes).
            run(cargo().args(["fmt", "--all", "--check"]))?;
            // Lints and docs with warnings denied, so nobody lands code that adds either.
            run(cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "passthrough-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            // The eBPF crate builds only for the BPF target, with the pinned nightly and
            // build-std: lint it there (a check, no bpf-linker), in its own target dir so the
            // two toolchains do not invalidate each other's builds.
            run(Command::new("cargo")
                .arg(format!("+{NIGHTLY_TOOLCHAIN}"))
                .env_remove("RUSTC")
                .env_remove("CARGO")
                .env(
                    "RUSTFLAGS",
                    format!("--cfg bpf_target_arch=\"{}\"", std::env::consts::ARCH),
                )
                .args([
                    "clippy",
                    "-p",
                    "passthrough-ebpf",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--target-dir",
                ])
                .arg(target_dir().join("ebpf-clippy"))
                .args(["--", "-D", "warnings"]))?;
            run(cargo()
                .args([
                    "doc",
                    "--workspace",
                    "--exclude",
                    "passthrough-ebpf",
                    "--no-deps",
                ])
                .env("RUSTDOCFLAGS", "-D warnings"))?;
            // Binaries first: kernel tests spawn the real `passthrough` and the probe.
            build_bins(false)?;
            sweep()?;
            let bin = target_dir().join("debug").join("passthrough");
            let result = run(cargo()
                .args(["test", "--workspace", "--exclude", "passthrough-ebpf"])
                .env("PASSTHROUGH_BIN", &bin)
                .arg("--")
                .args(&args));
            // Whatever happened, leave no namespaces or cgroups behind.
            let swept = sweep();
            // Then each fuzz target for a short bounded time (issue 6: CI fuzzes too).
            let secs: u64 = std::env::var("PASSTHROUGH_FUZZ_SECONDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(10);
            let fuzzed = if result.is_ok() && secs > 0 {
                fuzz(secs, None, "none")
            } else {
                Ok(())
            };
            result.and(swept).and(fuzzed)
        }
        Cmd::Bench {
            which,
            quick,
            compare: true,
            rounds,
            report_only,
            ..
        } => compare(&which, quick, rounds, report_only),
        Cmd::Bench {
            which,
            quick,
            before_object,
            ..
        } => {
            let all = which == "all";
            if !all
                && !["connect", "monitor", "policy", "proxy", "kube", "bpf-log"]
                    .contains(&which.as_str())
            {
                bail!(
                    "unknown bench {which:?}: one of connect, monitor, policy, proxy, kube, bpf-log, all"
                );
            }
            if before_object.is_some() && which != "bpf-log" {
                bail!("--before-object is for `bpf-log`");
            }
            let mut result = Ok(());
            if which == "bpf-log" {
                // connect4's time per call (BPF_ENABLE_STATS) with aya-log off and at debug,
                // and the object without log calls, interleaved round by round.
                run(cargo().args([
                    "build",
                    "--release",
                    "-p",
                    "passthrough-tests",
                    "--bin",
                    "pt-bench",
                ]))?;
                let mut c = Command::new(target_dir().join("release").join("pt-bench"));
                c.arg("bpf-log");
                if let Some(o) = &before_object {
                    c.arg("--before-object").arg(o);
                }
                if quick {
                    c.arg("--quick");
                }
                result = run(&mut c);
                let swept = sweep();
                result = result.and(swept);
            }
            if all || which == "policy" {
                // parse + validate + merge + compile of 100,000 matches (criterion; --figures
                // prints medians and peak RSS). No kernel needed: the policy crate builds no
                // eBPF object.
                result = run(cargo().args([
                    "bench",
                    "-p",
                    "passthrough-policy",
                    "--bench",
                    "policy_pipeline",
                    "--",
                    "--figures",
                ]));
            }
            if result.is_ok() && (all || which == "connect") {
                build_bins(true)?;
                let baseline = build_ebpf_without_monitor()?;
                let mut c = Command::new(target_dir().join("release").join("pt-bench"));
                c.arg("connect").arg("--baseline-object").arg(baseline);
                if quick {
                    c.arg("--quick");
                }
                result = run(&mut c);
                let swept = sweep();
                result = result.and(swept);
            }
            if result.is_ok() && (all || which == "monitor") {
                // The real agent, one watcher, 10,000 allowed decisions/s: the agent's CPU.
                build_bins(true)?;
                let mut c = Command::new(target_dir().join("release").join("pt-bench"));
                c.arg("monitor").env(
                    "PASSTHROUGH_BIN",
                    target_dir().join("release").join("passthrough"),
                );
                if quick {
                    c.arg("--quick");
                }
                result = run(&mut c);
                let swept = sweep();
                result = result.and(swept);
            }
            if result.is_ok() && (all || which == "proxy") {
                // Proxy path vs direct: TLS keep-alive, new connection per request, bulk,
                // HTTP/1.1, open-loop latency, memory per idle relayed connection.
                build_bins(true)?;
                let mut c = Command::new(target_dir().join("release").join("pt-bench-proxy"));
                if quick {
                    c.arg("--quick");
                }
                result = run(&mut c);
                let swept = sweep();
                result = result.and(swept);
            }
            if result.is_ok() && (all || which == "kube") {
                // Kubernetes mode, 1,000 pods on one node: pod cgroup -> enforced, policy change
                // -> all pods, agent RSS, API requests per kind (local API server).
                build_bins(true)?;
                let mut c = Command::new(target_dir().join("release").join("pt-bench-kube"));
                c.env(
                    "PASSTHROUGH_BIN",
                    target_dir().join("release").join("passthrough"),
                );
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
            build_bins(false)?;
            let result = run(
                Command::new(target_dir().join("debug").join("pt-demo")).env(
                    "PASSTHROUGH_BIN",
                    target_dir().join("debug").join("passthrough"),
                ),
            );
            let swept = sweep();
            result.and(swept)
        }
        Cmd::Sweep => sweep(),
        Cmd::Fuzz {
            seconds,
            target,
            sanitizer,
        } => fuzz(seconds, target.as_deref(), &sanitizer),
    }
}
