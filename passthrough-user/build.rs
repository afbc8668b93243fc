//! Builds the eBPF object with the pinned nightly (aya-build) so `cargo build` of the agent always
//! embeds programs matching its sources. `AYA_BUILD_SKIP=1` skips it (pure-code work only; the
//! agent then refuses to start, see `kernel::EBPF_OBJECT`).
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Keep in sync with scripts/setup.sh.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

fn main() -> anyhow::Result<()> {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("passthrough-ebpf");
    let root_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rustc-cfg=ebpf_skipped");
    }
    println!("cargo::rustc-check-cfg=cfg(ebpf_skipped)");
    aya_build::build_ebpf(
        [Package {
            name: "passthrough-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
