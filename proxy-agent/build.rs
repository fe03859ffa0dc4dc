//! Builds the eBPF object (proxy-ebpf) so the agent can embed the very object
//! it was built with. The build runs from proxy-ebpf's own directory, so its
//! `.cargo/config.toml` (target, build-std, BTF flags) and
//! `rust-toolchain.toml` (nightly) apply — the same command `cargo xtask
//! build-ebpf` runs.
use std::{env, fs, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../proxy-ebpf");
    let common_dir = manifest_dir.join("../proxy-common");
    for p in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join(".cargo/config.toml"),
        common_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    // A prebuilt object instead (development: while proxy-ebpf is being
    // edited, the agent can still be built against a known-good object).
    println!("cargo:rerun-if-env-changed=PROXY_EBPF_OBJECT");
    if let Some(prebuilt) = env::var_os("PROXY_EBPF_OBJECT") {
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("proxy-ebpf.o");
        println!("cargo:rerun-if-changed={}", PathBuf::from(&prebuilt).display());
        fs::copy(&prebuilt, &out).unwrap_or_else(|e| panic!("copy PROXY_EBPF_OBJECT {}: {e}", PathBuf::from(&prebuilt).display()));
        return;
    }
    // The test-only next layout builds its own object, in its own directory.
    let next = env::var_os("CARGO_FEATURE_LAYOUT_NEXT").is_some();
    let target_dir = manifest_dir.join(if next { "../target/ebpf-layout-next" } else { "../target/ebpf" });
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&ebpf_dir);
    if next {
        cmd.args(["--features", "layout-next"]);
    }
    // The outer cargo's settings are for the host target: they must not leak
    // into the BPF build.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTUP_TOOLCHAIN",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(key);
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run `rustup run nightly cargo build` for proxy-ebpf: {e} (run `cargo xtask setup`)")
    });
    assert!(
        status.success(),
        "building proxy-ebpf failed ({status}); `cargo xtask setup` installs the nightly rust-src and bpf-linker it needs"
    );
    let object = target_dir.join("bpfel-unknown-none/release/proxy-ebpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("proxy-ebpf.o");
    fs::copy(&object, &out).unwrap_or_else(|e| panic!("copy {}: {e}", object.display()));
}
