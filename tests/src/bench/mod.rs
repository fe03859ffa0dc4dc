//! `cargo xtask bench` (issues 5 and 4): the `ClusterIP` datapath of this
//! project's agent side by side with direct routing and kube-proxy's
//! iptables, nftables and IPVS rule shapes; the `NodePort` datapath (client →
//! node A → backend on node B) of its TC and XDP paths side by side with
//! kube-proxy's iptables `NodePort` rules and a direct route to the pods;
//! the TC path and the iptables shape again while a spoofed flood arrives
//! at node A (new connections, keep-alive requests, established flows
//! kept, conntrack occupancy); plus control-plane timings — programming S
//! Services from nothing and one more, and (`apiserver`) the agent following
//! the test API server: initial sync, per-change latency, CPU and memory —
//! measured in one run in network namespaces the bench creates. The
//! `ClusterIP` and `NodePort` cases run over IPv4 and IPv6 (`--families`),
//! each family's ratios against its own direct baseline. Writes `BENCHMARKS.md`,
//! `bench.json` and `bench.svg` to `--out` and the Markdown to stdout.
//!
//! Modules: [`services`] (the Services every mode gets), [`rules`]
//! (kube-proxy's iptables and nftables shapes), [`program`] (loading them,
//! or running the agent, timed), [`traffic`] (servers and load generators),
//! [`flood`] (the spoofed flood and what it must not break),
//! [`run`] (the cases), [`controlplane`] (the agent following the test API
//! server), [`report`] (Markdown, JSON, SVG).
pub mod args;
pub mod controlplane;
pub mod flood;
pub mod program;
pub mod report;
pub mod rules;
pub mod run;
pub mod services;
pub mod traffic;

use std::time::Instant;

use self::{
    args::Args,
    report::{Machine, Report},
    run::{FLOOD_MODES, MODES, Mode, NP_MODES, prepare, progress, run_program_only},
    services::Family,
};

/// Runs the benchmark for `command_line` (the program name included).
pub fn main(command_line: &[String]) {
    // A load generator process (see `traffic::run_phase_process`).
    if command_line.get(1).map(String::as_str) == Some(traffic::PHASE_SUBCOMMAND) {
        traffic::phase_main(&command_line[2..]);
        return;
    }
    let args = Args::parse(command_line);
    crate::netns::require_root();
    assert!(
        args.agent.exists(),
        "agent binary {} not found (cargo xtask bench builds it: cargo build --release -p proxy-agent)",
        args.agent.display()
    );
    std::fs::create_dir_all(&args.out).unwrap_or_else(|e| panic!("create {}: {e}", args.out.display()));
    let start = Instant::now();
    let machine = Machine::read();
    progress(&format!(
        "{} on {} cores, kernel {}; Services {:?} over {:?} (IPv6 at {:?}), {} s phases, {} run(s); control plane at {:?}, through the API server at {:?}; flood cases: {} packets/s at {:?}",
        machine.cpu,
        machine.cores,
        machine.kernel,
        args.services,
        args.families.iter().map(|f| f.name()).collect::<Vec<_>>(),
        args.ipv6_services,
        args.duration.as_secs_f64(),
        args.reps,
        args.cp_services,
        args.api_services,
        args.flood_pps,
        args.flood_services
    ));
    let mut cases = Vec::new();
    // The cases of one (S, family) exist side by side and their runs are
    // interleaved; the families one after the other, so no more sandboxes
    // are up at once than with one family.
    for &n in &args.services {
        for family in args.families_at(n) {
            let mut live: Vec<_> = MODES
                .into_iter()
                .chain(NP_MODES)
                .chain(FLOOD_MODES)
                .filter(|m| args.wants(&m.to_string()) && m.runs_over(family) && (!m.is_flood() || args.floods_at(n)))
                .map(|m| prepare(&args, m, family, n))
                .collect();
            for l in &mut live {
                l.ready(&args);
            }
            for rep in 0..args.reps {
                for l in &mut live {
                    l.measure(&args, rep);
                }
            }
            cases.extend(live.into_iter().map(|l| l.finish(&args)));
        }
    }
    let mut program_cases = Vec::new();
    for &n in args.cp_services.iter().filter(|&&n| n > 0) {
        for mode in [Mode::Iptables, Mode::Nftables, Mode::Ebpf].into_iter().filter(|m| args.wants(&m.to_string())) {
            let covered = cases.iter().any(|c| c.mode == mode && c.family == Family::V4 && c.services == n && c.program.is_some());
            if !covered {
                program_cases.push(run_program_only(&args, mode, n));
            }
        }
    }
    let add_measured = |mode| {
        cases.iter().chain(&program_cases).any(|case: &run::Case| {
            case.mode == mode && case.family == Family::V4 && case.services == args.add_one_at && case.add_one.is_some()
        })
    };
    // `--add-one-at 0`: not measured.
    let missing: Vec<Mode> = [Mode::Iptables, Mode::Nftables, Mode::Ebpf]
        .into_iter()
        .filter(|m| args.add_one_at > 0 && !add_measured(*m) && args.wants(&m.to_string()))
        .collect();
    for mode in missing {
        program_cases.push(run_program_only(&args, mode, args.add_one_at));
    }
    let api_cases: Vec<controlplane::ApiCase> =
        if args.wants("apiserver") { args.api_services.iter().map(|&n| controlplane::run(&args, n)).collect() } else { Vec::new() };
    let report = Report { args: &args, machine, cases, program_cases, api_cases, elapsed: start.elapsed() };
    let md = report.markdown();
    println!("{md}");
    let write = |name: &str, content: &str| {
        let p = args.out.join(name);
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    };
    write("BENCHMARKS.md", &md);
    write("bench.json", &serde_json::to_string_pretty(&report.json()).expect("json"));
    if let Err(e) = report.svg(&args.out.join("bench.svg")) {
        eprintln!("bench: cannot draw the chart: {e}");
    }
    progress(&format!("wrote {}/BENCHMARKS.md, bench.json, bench.svg", args.out.display()));
}
