//! `pt-sweep [--all]`: removes leftovers of crashed kernel-test runs (our prefixes only:
//! netns `ptc-*`/`pts-*`, cgroups and bpffs dirs `passthrough-test-*`). Without `--all`, only
//! those whose creating process is gone. Exit 1 when something could not be removed.

fn main() {
    let all = std::env::args().skip(1).any(|a| a == "--all");
    if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: pt-sweep [--all]\n  removes leftover test netns (ptc-*, pts-*), cgroups and bpffs dirs (passthrough-test-*)\n  --all  also those of live test processes"
        );
        return;
    }
    let report = passthrough_tests::sweep(all);
    print!("{report}");
    std::process::exit(if report.errors.is_empty() { 0 } else { 1 });
}
