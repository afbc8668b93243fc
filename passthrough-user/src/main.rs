//! `passthrough`: enforces Kuma MeshPassthrough egress policy with eBPF.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use passthrough_user::{agent, cli, status};

#[derive(Debug, Parser)]
#[command(
    name = "passthrough",
    version,
    about = "Enforce Kuma MeshPassthrough egress policy with eBPF"
)]
struct Cli {
    /// Log format: `text` (human) or `json`.
    #[arg(long, global = true, default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent in the foreground (SIGTERM/SIGINT: detach and exit; SIGHUP: reload).
    Run(Box<agent::RunArgs>),
    /// Validate policy files: one line per violation `FILE: spec.path: message`; exit 1 if any.
    Check(cli::CheckArgs),
    /// The decision for one connection and the match that made it, without touching the kernel.
    Explain(Box<cli::ExplainArgs>),
    /// The running agent's decisions, live (kernel and proxy, allowed and denied), one line
    /// each; `--json` for JSON lines.
    Monitor(cli::MonitorArgs),
    /// MeshPassthrough policies, one per workload, allowing what the agent observed (its
    /// decision log, or `monitor --json` lines).
    Suggest(cli::SuggestArgs),
    /// What is attached where, the policy generation and counters (from pinned state).
    Status(status::StatusArgs),
    /// Detach and unpin everything passthrough left in the kernel (refused while an agent runs
    /// with it, unless --force).
    Uninstall(status::UninstallArgs),
}

/// `bpf`: the directive that lets the programs' records through (`--bpf-log-level`), added to
/// `RUST_LOG` (default `info`) unless that names their target itself.
fn init_logging(format: &str, bpf: Option<String>) {
    let env = std::env::var("RUST_LOG").ok();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if let Some(d) = bpf
        && !env.is_some_and(|e| e.contains(passthrough_user::kernel::BPF_LOG_TARGET))
        && let Ok(d) = d.parse()
    {
        filter = filter.add_directive(d);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let parsed = Cli::parse();
    let bpf_log = match &parsed.command {
        Command::Run(args) => args.bpf_log_level.filter_directive(),
        _ => None,
    };
    init_logging(&parsed.log_format, bpf_log);
    let result = match parsed.command {
        Command::Check(args) => match args.run(&mut std::io::stdout().lock()) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e.into()),
        },
        Command::Explain(args) => cli::run_explain(&args, &mut std::io::stdout().lock()),
        Command::Monitor(args) => cli::run_monitor(
            &args,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        ),
        Command::Suggest(args) => cli::run_suggest(
            &args,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        ),
        Command::Status(args) => status::run_status(&args, &mut std::io::stdout().lock()),
        Command::Uninstall(args) => status::run_uninstall(&args, &mut std::io::stdout().lock()),
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(agent::run(*args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("passthrough: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
