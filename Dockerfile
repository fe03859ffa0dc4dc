# syntax=docker/dockerfile:1
#
# The proxy-agent image:
#   docker build -t REGISTRY/proxy-agent:TAG . && docker push REGISTRY/proxy-agent:TAG
# then set it in deploy/kustomization.yaml (`images`).
#
# The agent embeds the eBPF object it was built with (proxy-agent/build.rs
# builds proxy-ebpf with the nightly), so the builder needs what
# `cargo xtask setup` installs: the nightly with rust-src, and bpf-linker
# built against the nightly's own LLVM.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder

# bpf-linker must support the nightly's LLVM major version (0.13.0 has
# llvm-22 for the nightlies of 2026). If a newer nightly moves to an LLVM that
# this version lacks, raise it (and the one in xtask/src/setup.rs).
ARG BPF_LINKER_VERSION=0.13.0

# proxy-ebpf/rust-toolchain.toml and build.rs use the toolchain named `nightly`.
RUN rustup toolchain install nightly --profile minimal --component rust-src

# As xtask/src/setup.rs does: a permanent directory whose lib/ links to the
# nightly sysroot's libLLVM, and bpf-linker built with the matching llvm-NN
# feature against it (its RUNPATH points there, so the directory stays).
RUN set -eux; \
    sysroot="$(rustup run nightly rustc --print sysroot)"; \
    llvm_major="$(rustup run nightly rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"; \
    test -n "$llvm_major"; \
    prefix="${CARGO_HOME}/bpf-linker-llvm"; \
    mkdir -p "$prefix/lib"; \
    for lib in "$sysroot"/lib/libLLVM*.so*; do ln -sf "$lib" "$prefix/lib/$(basename "$lib")"; done; \
    ln -sf "$(ls "$sysroot"/lib/libLLVM-"$llvm_major"*.so* | head -n 1)" "$prefix/lib/libLLVM.so"; \
    LLVM_PREFIX="$prefix" cargo install --locked bpf-linker --version "=${BPF_LINKER_VERSION}" \
        --no-default-features --features "llvm-${llvm_major}"; \
    bpf-linker --version

WORKDIR /src
COPY . .
# The target directory is a cache mount, so the binary is copied out of it in
# the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p proxy-agent \
    && install -D -m 0755 target/release/proxy-agent /out/proxy-agent \
    && ln -s proxy-agent /out/kube-proxy

FROM debian:bookworm-slim
# The binary only: it carries its eBPF object, talks to the kernel through
# bpf(2) and netlink and to the API server with the service account's CA, so
# it needs no bpftool, iproute2 or CA bundle. It runs as root with only the
# capabilities the DaemonSet grants (deploy/daemonset.yaml).
# /usr/local/bin/kube-proxy is a link to it: invoked by that name the agent
# takes kube-proxy's command line (`kube-proxy --config=FILE
# --hostname-override=NAME` means `proxy-agent run ...`), so kubeadm's
# kube-proxy DaemonSet runs this image with nothing else changed
# (docs/replacing-kube-proxy.md). A directory copy keeps the link a link.
COPY --from=builder /out/ /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/proxy-agent"]
