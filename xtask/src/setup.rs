//! `cargo xtask setup`: installs what is missing, and nothing else, so it is
//! quick when everything is present. Everything here works on a fresh Debian
//! machine with only the base image (stable + nightly Rust, root).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::run;

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn have(bin: &str) -> bool {
    if bin.starts_with('/') {
        return std::path::Path::new(bin).exists();
    }
    ok(Command::new("sh").args(["-c", &format!("command -v {bin}")]))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
        PathBuf::from,
    )
}

/// Debian packages the tests and the demo use, by the command (or, for a
/// path, the file) that proves each is installed.
const DEBIAN: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("curl", "curl"),
    ("mountpoint", "util-linux"),
    ("kubectl", "kubernetes-client"),
    ("iptables-nft-restore", "iptables"),
    ("nft", "nftables"),
    ("ethtool", "ethtool"),
    // The SCTP tests' endpoints (tests/sctp/sctp_peer.c): usrsctp, as the
    // test kernel may have no SCTP, and a C compiler to build them.
    ("/usr/include/usrsctp.h", "libusrsctp-dev"),
    ("cc", "gcc"),
];

pub fn setup() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    bpffs()?;
    eprintln!("setup: everything present");
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    if !ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        bail!(
            "the nightly toolchain is missing; this machine kind ships one (it cannot be downloaded here). \
             Install a nightly whose LLVM matches bpf-linker's with `rustup toolchain install nightly`"
        );
    }
    let sysroot = output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    if Path::new(&sysroot).join("lib/rustlib/src/rust/library/core").exists() {
        return Ok(());
    }
    eprintln!("setup: installing rust-src for nightly (needed for -Z build-std=core)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker must link against the nightly's own LLVM: point `LLVM_PREFIX` at
/// a permanent directory of symlinks to the nightly sysroot's libLLVM and
/// build bpf-linker with the matching `llvm-NN` feature.
fn bpf_linker() -> Result<()> {
    let bin = cargo_home().join("bin/bpf-linker");
    if bin.exists() && ok(Command::new(&bin).arg("--version")) {
        return Ok(());
    }
    let sysroot = PathBuf::from(output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?);
    let rustc_v = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?;
    let llvm_major = rustc_v
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("cannot read the nightly's LLVM version")?
        .to_owned();
    let prefix = cargo_home().join("bpf-linker-llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    let mut found = false;
    for entry in std::fs::read_dir(sysroot.join("lib"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM") && name.contains(".so") {
            let _ = std::fs::remove_file(lib.join(&name));
            std::os::unix::fs::symlink(entry.path(), lib.join(&name))?;
            if name.starts_with(&format!("libLLVM-{llvm_major}")) {
                let _ = std::fs::remove_file(lib.join("libLLVM.so"));
                std::os::unix::fs::symlink(entry.path(), lib.join("libLLVM.so"))?;
                found = true;
            }
        }
    }
    if !found {
        bail!("no libLLVM-{llvm_major}*.so in {}/lib", sysroot.display());
    }
    eprintln!("setup: building bpf-linker against the nightly's LLVM {llvm_major} (about a minute)");
    run(Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["install", "--locked", "bpf-linker", "--version", "=0.13.0", "--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major}"))
        .env("LLVM_PREFIX", &prefix))
}

fn debian_packages() -> Result<()> {
    let mut missing: Vec<&str> = DEBIAN.iter().filter(|(bin, _)| !have(bin)).map(|(_, pkg)| *pkg).collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// bpffs is not always mounted at /sys/fs/bpf on a fresh machine.
fn bpffs() -> Result<()> {
    if ok(Command::new("mountpoint").args(["-q", "/sys/fs/bpf"])) {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs at /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
