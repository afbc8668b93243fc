# syntax=docker/dockerfile:1
# The passthrough agent image: `docker build -t passthrough:0.1.0 .` (BuildKit, the default).
# Multi-stage: the builder has the same toolchains as a developer machine (scripts/setup.sh is
# run as is, so the two cannot drift); the runtime image has the binary, CA certificates (the
# proxy's upstream TLS checks and DNS-over-anything later) and iproute2 (the DaemonSet's
# initContainer creates the proxy's dummy interface with `ip`, from this same image).

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Host toolchain (rust-toolchain.toml), the pinned eBPF nightly with rust-src, Debian's LLVM 22
# and bpf-linker built against it, iproute2/bpftool: a layer cached until either file changes.
COPY rust-toolchain.toml ./
COPY scripts/setup.sh scripts/setup.sh
RUN bash scripts/setup.sh
COPY . .
# passthrough-user's build.rs builds the eBPF object with the pinned nightly (aya-build) and
# embeds it in the agent.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p passthrough-user \
 && install -D -m 0755 target/release/passthrough /out/passthrough

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/passthrough /usr/local/bin/passthrough
# Runs as root: loading and attaching BPF programs needs CAP_BPF/CAP_NET_ADMIN/CAP_SYS_ADMIN,
# which the DaemonSet grants with `privileged: true` (see docs/deploy.md).
ENTRYPOINT ["/usr/local/bin/passthrough"]
CMD ["--help"]
