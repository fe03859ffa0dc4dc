//! `cargo xtask`: set-up, build, test, demo.
//!
//! Kept free of the project's own crates so that it builds on a fresh
//! machine before the eBPF toolchain exists (`setup` installs it).
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks: setup, build-ebpf, test, demo, bench")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (nightly rust-src, bpf-linker, bpftool, iproute2, ...). Idempotent.
    Setup,
    /// Build the eBPF object (what CI pipelines run).
    BuildEbpf,
    /// Set up, build, and run every test (root-only ones included).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the sandboxed `ClusterIP` demo.
    Demo {
        /// Leave the sandbox running and print how to look inside.
        #[arg(long)]
        keep: bool,
        /// How many requests the client sends to the `ClusterIP`.
        #[arg(long, default_value_t = 90)]
        requests: u32,
    },
    /// Set up, build in release mode, and run the side-by-side benchmark
    /// (`ClusterIP`: direct, iptables, nftables, ipvs, ebpf, ebpf-sock; `NodePort`:
    /// np-direct, np-iptables, np-tc, np-xdp — each over IPv4 and IPv6, `--
    /// --families ipv4` for IPv4 only; control plane: programming S
    /// Services, and apiserver: the agent following a test API server);
    /// writes BENCHMARKS.md, bench.json and bench.svg to --out. The control
    /// plane alone: `--services 0 -- --modes iptables,nftables,ebpf,apiserver`.
    Bench {
        /// A smoke check in under 3 minutes (one short run per case).
        #[arg(long)]
        quick: bool,
        /// Numbers of Services for the data-path cases (default 1,10000; --quick: 1,1000; 0: none).
        #[arg(long, value_delimiter = ',')]
        services: Vec<usize>,
        /// Seconds per load phase (default 2; --quick: 1).
        #[arg(long)]
        duration: Option<f64>,
        /// Output directory.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// More options for the bench binary (see `target/release/bench --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build in release mode, and fuzz the packet programs through
    /// BPF_PROG_TEST_RUN (tests/src/fuzz.rs): random and mutated packets,
    /// every invariant checked; progress every ~10 s, then the rate and the
    /// verdicts per program. Needs root.
    Fuzz {
        /// How many packets.
        #[arg(long, default_value_t = 10_000_000)]
        packets: u64,
        /// PRNG seed (default: the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs a command, failing with its name when it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot start {desc}"))?;
    if !status.success() {
        bail!("{desc} failed ({status})");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and ends with one summary line
/// over every test binary: `summary: N passed, N failed, N ignored`.
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::BufRead as _;
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().context("cannot start cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(&[';', '.'][..]) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) {
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("summary: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn step(msg: &str) {
    eprintln!("\x1b[1m==> {msg}\x1b[0m");
}

/// Builds proxy-ebpf from its own directory, the same way proxy-agent's
/// build.rs does (its .cargo/config.toml and rust-toolchain.toml apply).
fn build_ebpf() -> Result<PathBuf> {
    let dir = target_dir().join("ebpf");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--target-dir"])
        .arg(&dir)
        .current_dir(root().join("proxy-ebpf"));
    for key in ["RUSTC", "RUSTC_WRAPPER", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "RUSTUP_TOOLCHAIN"] {
        cmd.env_remove(key);
    }
    run(&mut cmd)?;
    let object = dir.join("bpfel-unknown-none/release/proxy-ebpf");
    let size = std::fs::metadata(&object).with_context(|| format!("{} missing", object.display()))?.len();
    eprintln!("eBPF object: {} ({} KiB, with BTF)", object.display(), size / 1024);
    Ok(object)
}

/// The agent built with the test-only next map layout (feature
/// `layout-next`), copied beside the real one, for the upgrade tests.
/// Built before [`build_agent`]: cargo then puts the real binary back in
/// place.
fn build_agent_layout_next() -> Result<PathBuf> {
    run(cargo().args(["build", "-p", "proxy-agent", "--features", "layout-next"]).current_dir(root()))?;
    let out = target_dir().join("debug/proxy-agent-layout-next");
    std::fs::copy(target_dir().join("debug/proxy-agent"), &out).with_context(|| format!("copy to {}", out.display()))?;
    Ok(out)
}

fn build_agent() -> Result<PathBuf> {
    run(cargo().args(["build", "-p", "proxy-agent", "-p", "integration-tests"]).current_dir(root()))?;
    Ok(target_dir().join("debug/proxy-agent"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => {
            setup::setup()?;
            build_ebpf().map(|_| ())
        }
        Task::Test { args } => {
            step("setup");
            setup::setup()?;
            step("build the eBPF object");
            build_ebpf()?;
            step("build the agent with the next map layout (upgrade tests)");
            let next = build_agent_layout_next()?;
            step("build the agent");
            let agent = build_agent()?;
            step("run every test (unit, packet, network-namespace)");
            let mut cmd = cargo();
            // Doc tests are left out: there are none, and their empty
            // "0 passed" summary would be the run's last line.
            cmd.args(["test", "--workspace", "--no-fail-fast", "--lib", "--bins", "--tests"])
                .current_dir(root())
                .env("PROXY_AGENT_BIN", &agent)
                .env("PROXY_AGENT_LAYOUT_NEXT_BIN", &next);
            if !args.is_empty() {
                cmd.arg("--").args(&args);
            }
            run_tests(&mut cmd)
        }
        Task::Demo { keep, requests } => {
            step("setup");
            setup::setup()?;
            step("build the agent (embeds the eBPF object)");
            let agent = build_agent()?;
            step("run the demo");
            let mut cmd = Command::new(target_dir().join("debug/demo"));
            cmd.arg("--agent").arg(&agent).arg("--requests").arg(requests.to_string());
            if keep {
                cmd.arg("--keep");
            }
            run(&mut cmd)
        }
        Task::Bench { quick, services, duration, out, args } => {
            step("setup");
            setup::setup()?;
            step("build the agent and the bench (release)");
            run(cargo().args(["build", "--release", "-p", "proxy-agent", "-p", "integration-tests"]).current_dir(root()))?;
            step("run the benchmark");
            let mut cmd = Command::new(target_dir().join("release/bench"));
            cmd.arg("--agent").arg(target_dir().join("release/proxy-agent")).arg("--out").arg(root().join(out));
            if quick {
                cmd.arg("--quick");
            }
            if !services.is_empty() {
                let list: Vec<String> = services.iter().map(ToString::to_string).collect();
                cmd.arg("--services").arg(list.join(","));
            }
            if let Some(d) = duration {
                cmd.arg("--duration").arg(d.to_string());
            }
            run(cmd.args(&args).current_dir(root()))
        }
        Task::Fuzz { packets, seed } => {
            step("setup");
            setup::setup()?;
            step("build the fuzzer (release; proxy-agent's build.rs builds and embeds the eBPF object)");
            run(cargo().args(["test", "--release", "-p", "integration-tests", "--test", "fuzz", "--no-run"]).current_dir(root()))?;
            step(&format!("fuzz {packets} packets"));
            let mut cmd = cargo();
            cmd.args(["test", "--release", "-p", "integration-tests", "--test", "fuzz", "--", "--ignored", "--exact", "fuzz_full_run", "--nocapture"])
                .current_dir(root())
                .env("FUZZ_PACKETS", packets.to_string());
            if let Some(s) = seed {
                cmd.env("FUZZ_SEED", s.to_string());
            }
            run(&mut cmd)
        }
    }
}
