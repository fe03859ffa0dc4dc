//! Command line of the bench binary (what `cargo xtask bench` passes on).
use std::{path::PathBuf, time::Duration};

use super::{program::IptBackend, services::Family};

#[derive(Clone, Debug)]
pub struct Args {
    pub quick: bool,
    /// Numbers of Services for the data-path cases (none: `--services 0`).
    pub services: Vec<usize>,
    /// The address families the data-path cases run over (`--families
    /// ipv4,ipv6`, default both; the flood modes run over IPv4 only).
    pub families: Vec<Family>,
    /// The numbers of Services (out of `services`) the IPv6 cases run at
    /// (default: all of them; `--quick`: the smallest).
    pub ipv6_services: Vec<usize>,
    /// Length of each load phase.
    pub duration: Duration,
    pub out: PathBuf,
    pub agent: PathBuf,
    /// Runs of each case (median and spread over them).
    pub reps: usize,
    /// Client threads for the connection, keep-alive and UDP phases.
    pub clients: usize,
    /// Numbers of Services for the control-plane figures.
    pub cp_services: Vec<usize>,
    /// Where "apply one added Service" is measured (0: nowhere).
    pub add_one_at: usize,
    pub ipt_backend: IptBackend,
    /// Services per iptables-restore / nft -f transaction.
    pub ipt_chunk: usize,
    pub nft_chunk: usize,
    /// Upper bound for programming one set of Services.
    pub program_timeout: Duration,
    /// Modes to run (default: all).
    pub modes: Vec<String>,
    /// How the load generator of every mode but `ebpf-sock` runs
    /// (`ebpf-sock`'s always runs as a process in the agent's cgroup).
    pub generator: Generator,
    /// Packets/s of the spoofed flood of the flood modes (`np-tc-flood`,
    /// `np-iptables-flood`); 0: no flood cases.
    pub flood_pps: u32,
    /// Numbers of Services the flood cases run at (default: the smallest
    /// of `services`).
    pub flood_services: Vec<usize>,
    /// Numbers of Services for the control-plane case through the test API
    /// server (`apiserver`; 2 ports and 10 endpoints each).
    pub api_services: Vec<usize>,
    /// Changes of each kind (add a Service, flip an endpoint's readiness,
    /// delete a Service) measured one by one in the `apiserver` case.
    pub api_changes: usize,
    /// More environment for the agent of the `apiserver` case (`K=V`, e.g.
    /// `MALLOC_ARENA_MAX=2`), for experiments.
    pub api_agent_env: Vec<(String, String)>,
    /// More `run` flags for the agent of the `apiserver` case.
    pub api_agent_args: Vec<String>,
    /// The command line, for the report.
    pub command_line: String,
}

/// Where the load generator runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generator {
    /// A process per phase (the bench binary re-executed), in a cgroup of
    /// its own: the same as `ebpf-sock`'s, so the ratios compare datapaths.
    Process,
    /// Threads of the bench process (`ebpf-sock` still uses a process).
    Thread,
}

impl Generator {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Thread => "thread",
        }
    }
}

pub const USAGE: &str = "usage: bench [--quick] [--services N,...] [--families ipv4,ipv6] [--ipv6-services N,...] \
[--duration S] [--out DIR] [--agent PATH] \
[--reps N] [--clients N] [--cp-services N,...] [--add-one-at N] [--iptables-backend nft|legacy] \
[--ipt-chunk N] [--nft-chunk N] [--program-timeout S] [--generator process|thread] \
[--flood-pps N (0: no flood cases)] [--flood-services N,...] \
[--api-services N,...] [--api-changes N] [--api-agent-env K=V,...] [--api-agent-args 'FLAGS'] \
[--modes direct,iptables,nftables,ipvs,ebpf,ebpf-sock,np-direct,np-iptables,np-tc,np-xdp,np-iptables-flood,np-tc-flood,apiserver]
--services 0: no data-path cases (e.g. the control plane alone: --services 0 --modes iptables,nftables,ebpf,apiserver)
--families: the data-path modes run over each (default both; the flood modes over IPv4 only) at --services, IPv6 at
--ipv6-services (out of --services; default all of them, with --quick the smallest)";

fn list(v: &str) -> Vec<usize> {
    v.split(',')
        .map(|n| n.trim().replace('_', "").parse().unwrap_or_else(|_| panic!("not a number: {n:?}\n{USAGE}")))
        .collect()
}

fn secs(v: &str) -> Duration {
    Duration::from_secs_f64(v.parse().unwrap_or_else(|_| panic!("not a number of seconds: {v:?}\n{USAGE}")))
}

impl Args {
    /// Whether `mode` is to be run.
    #[must_use]
    pub fn wants(&self, mode: &str) -> bool {
        self.modes.is_empty() || self.modes.iter().any(|m| m == mode)
    }

    /// Whether the flood cases run at `services` Services.
    #[must_use]
    pub fn floods_at(&self, services: usize) -> bool {
        self.flood_pps > 0 && self.flood_services.contains(&services) && self.families.contains(&Family::V4)
    }

    /// The families the data-path cases run over at `services` Services.
    #[must_use]
    pub fn families_at(&self, services: usize) -> Vec<Family> {
        self.families.iter().copied().filter(|&f| f == Family::V4 || self.ipv6_services.contains(&services)).collect()
    }

    #[must_use]
    #[expect(clippy::too_many_lines, reason = "one flag per arm, read top to bottom")]
    pub fn parse(argv: &[String]) -> Self {
        let quick = argv.iter().any(|a| a == "--quick");
        let mut a = Self {
            quick,
            services: vec![1, 10_000],
            families: Family::ALL.to_vec(),
            ipv6_services: Vec::new(),
            duration: Duration::from_secs(if quick { 1 } else { 2 }),
            out: PathBuf::from("target/bench"),
            agent: PathBuf::from("target/release/proxy-agent"),
            reps: if quick { 1 } else { 5 },
            clients: 4,
            cp_services: Vec::new(),
            add_one_at: 0,
            ipt_backend: IptBackend::Nft,
            ipt_chunk: 100,
            nft_chunk: 500,
            program_timeout: Duration::from_secs(if quick { 60 } else { 100 }),
            modes: Vec::new(),
            generator: Generator::Process,
            flood_pps: 20_000,
            flood_services: Vec::new(),
            api_services: Vec::new(),
            api_changes: if quick { 10 } else { 100 },
            api_agent_env: Vec::new(),
            api_agent_args: Vec::new(),
            command_line: argv.join(" "),
        };
        let mut cp_given = false;
        let mut add_given = false;
        let mut services_given = false;
        let mut flood_services_given = false;
        let mut api_given = false;
        let mut ipv6_given = false;
        let mut it = argv.iter().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--quick" {
                continue;
            }
            if flag == "-h" || flag == "--help" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let v = it.next().unwrap_or_else(|| panic!("{flag} needs a value\n{USAGE}"));
            match flag.as_str() {
                "--services" => {
                    a.services = list(v);
                    services_given = true;
                }
                "--families" => {
                    a.families = v
                        .split(',')
                        .filter(|f| !f.is_empty())
                        .map(|f| Family::parse(f).unwrap_or_else(|| panic!("--families ipv4,ipv6: {f:?}\n{USAGE}")))
                        .collect();
                }
                "--ipv6-services" => {
                    a.ipv6_services = list(v);
                    ipv6_given = true;
                }
                "--duration" => a.duration = secs(v),
                "--out" => a.out = PathBuf::from(v),
                "--agent" => a.agent = PathBuf::from(v),
                "--reps" => a.reps = list(v)[0].max(1),
                "--clients" => a.clients = list(v)[0].max(1),
                "--cp-services" => {
                    a.cp_services = list(v);
                    cp_given = true;
                }
                "--add-one-at" => {
                    a.add_one_at = list(v)[0];
                    add_given = true;
                }
                "--iptables-backend" => a.ipt_backend = IptBackend::parse(v).unwrap_or_else(|| panic!("nft or legacy\n{USAGE}")),
                "--ipt-chunk" => a.ipt_chunk = list(v)[0].max(1),
                "--nft-chunk" => a.nft_chunk = list(v)[0].max(1),
                "--program-timeout" => a.program_timeout = secs(v),
                "--generator" => {
                    a.generator = match v.as_str() {
                        "process" => Generator::Process,
                        "thread" => Generator::Thread,
                        _ => panic!("--generator process or thread\n{USAGE}"),
                    }
                }
                "--modes" => a.modes = v.split(',').map(str::to_owned).collect(),
                "--flood-pps" => a.flood_pps = u32::try_from(list(v)[0]).unwrap_or_else(|_| panic!("--flood-pps too large\n{USAGE}")),
                "--flood-services" => {
                    a.flood_services = list(v);
                    flood_services_given = true;
                }
                "--api-services" => {
                    a.api_services = list(v);
                    api_given = true;
                }
                "--api-changes" => a.api_changes = list(v)[0].max(1),
                "--api-agent-env" => {
                    a.api_agent_env = v
                        .split(',')
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("--api-agent-env K=V,...: {kv:?}\n{USAGE}"));
                            (k.to_owned(), v.to_owned())
                        })
                        .collect();
                }
                "--api-agent-args" => a.api_agent_args = v.split_whitespace().map(str::to_owned).collect(),
                other => panic!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        if quick && !services_given {
            a.services = vec![1, 1000];
        }
        a.services.retain(|&n| n > 0);
        a.services.sort_unstable();
        a.services.dedup();
        a.families.sort_unstable();
        a.families.dedup();
        let largest = a.services.iter().copied().max().unwrap_or(1);
        if ipv6_given {
            a.ipv6_services.retain(|&n| n > 0);
            for n in &a.ipv6_services {
                assert!(a.services.contains(n), "--ipv6-services {n} is not one of --services {:?}\n{USAGE}", a.services);
            }
        } else {
            a.ipv6_services = if quick { a.services.first().copied().into_iter().collect() } else { a.services.clone() };
        }
        a.ipv6_services.sort_unstable();
        a.ipv6_services.dedup();
        if !flood_services_given {
            a.flood_services = a.services.first().copied().into_iter().collect();
        }
        if !cp_given {
            a.cp_services = if quick { vec![largest] } else { vec![1000, 10_000, 50_000] };
        }
        a.cp_services.retain(|&n| n > 0);
        a.cp_services.sort_unstable();
        a.cp_services.dedup();
        if !add_given {
            a.add_one_at = if quick { largest } else { 10_000 };
        }
        if !api_given {
            a.api_services = if quick { vec![largest] } else { vec![1000, 10_000, 50_000] };
        }
        a.api_services.retain(|&n| n > 0);
        a.api_services.sort_unstable();
        a.api_services.dedup();
        a
    }
}
