//! docs/cli.md's reference section is the binary's own `--help`, for the top level and every
//! subcommand: this test regenerates it from the built `passthrough` and fails when the file
//! differs, so the reference never drifts from clap. `CLI_REFERENCE_BLESS=1` rewrites it.

use std::{path::Path, process::Command};

const BEGIN: &str =
    "<!-- cli:begin (generated from `passthrough --help`; edits here are overwritten) -->";
const END: &str = "<!-- cli:end -->";

/// `passthrough ARGS --help`, with no environment (so no `[env: …]` value can leak in).
fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_passthrough"))
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .expect("run passthrough --help");
    assert!(out.status.success(), "passthrough {args:?} --help: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The subcommands listed under `Commands:` (without `help`).
fn subcommands(top: &str) -> Vec<String> {
    top.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("    "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

fn reference() -> String {
    let top = help(&[]);
    let mut md = String::new();
    md.push_str(&format!(
        "{BEGIN}\n\n## `passthrough`\n\n```text\n{}```\n",
        top
    ));
    let cmds = subcommands(&top);
    assert!(cmds.len() >= 5, "subcommands not found in:\n{top}");
    for c in cmds {
        md.push_str(&format!(
            "\n## `passthrough {c}`\n\n```text\n{}```\n",
            help(&[c.as_str()])
        ));
    }
    md.push_str(&format!("\n{END}"));
    md
}

#[test]
fn cli_reference_matches_the_binary() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md");
    let text = std::fs::read_to_string(&path).expect("docs/cli.md");
    let begin = text.find(BEGIN).expect("docs/cli.md: cli:begin marker");
    let end = text.find(END).expect("docs/cli.md: cli:end marker") + END.len();
    let want = reference();
    if text[begin..end] == want {
        return;
    }
    if std::env::var_os("CLI_REFERENCE_BLESS").is_some() {
        let mut new = text[..begin].to_string();
        new.push_str(&want);
        new.push_str(&text[end..]);
        std::fs::write(&path, new).expect("write docs/cli.md");
        return;
    }
    panic!(
        "docs/cli.md's reference differs from `passthrough --help`; run\n  CLI_REFERENCE_BLESS=1 cargo test -p passthrough-user --test cli_reference\nand review the diff"
    );
}
