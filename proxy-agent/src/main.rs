//! `proxy-agent`: thin CLI over the library.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use proxy_agent::{
    agent::{self, NodePortAddresses, RunConfig, SourceConfig},
    datapath::{self, BpfMaps, ServiceMaps as _, SocketLb, XdpAttachMode},
    inspect,
    pins::{DEFAULT_BPFFS, Pins},
};

#[derive(Parser)]
#[command(name = "proxy-agent", version, about = "eBPF replacement for kube-proxy: node agent")]
struct Cli {
    /// Directory on a bpffs where maps and links are pinned.
    #[arg(long, global = true, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Program the datapath and keep it in sync with the Services.
    Run {
        /// Read Services and `EndpointSlices` from this directory of manifests
        /// (YAML/JSON) instead of the API server.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// Kubeconfig of the API server (default: $KUBECONFIG, ~/.kube/config, then in-cluster).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Devices to attach to: comma-separated names or globs (e.g. "eth0,lxc*").
        #[arg(long)]
        devices: String,
        /// This node's name (default: $`NODE_NAME`, else the hostname).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Least time between two syncs; bursts of changes are coalesced (kube-proxy's minSyncPeriod).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        min_sync_period: Duration,
        /// A sync runs at least this often (kube-proxy's syncPeriod); twice this is the health timeout.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        sync_period: Duration,
        /// Address for /healthz and /livez ("" disables).
        #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_bind)]
        healthz_bind_address: Bind,
        /// Address for /metrics ("" disables).
        #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_bind)]
        metrics_bind_address: Bind,
        /// CIDRs whose node addresses serve `NodePorts` (default: the primary
        /// address of each --devices device; "primary" says the same).
        #[arg(long, default_value = "", value_parser = NodePortAddresses::parse)]
        nodeport_addresses: NodePortAddresses,
        /// Also attach the XDP fast path for north-south traffic to remote backends.
        #[arg(long)]
        xdp: bool,
        /// XDP mode: auto (native, but generic on veth, whose frames native
        /// XDP cannot translate correctly), native (forced; devices without it
        /// keep the TC path) or generic.
        #[arg(long, value_enum, default_value = "auto", requires = "xdp")]
        xdp_mode: XdpAttachMode,
        /// Socket-level load balancing: all sockets in --cgroup, only those in
        /// the host network namespace (host-only), or none (off: the
        /// per-packet path carries everything).
        #[arg(long, value_enum, default_value = "all")]
        socket_lb: SocketLb,
        /// The cgroup v2 directory the socket programs attach to (default:
        /// the cgroup v2 root, found in /proc/mounts).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Flows the conntrack holds (two map entries each); 0 or unset:
        /// max(--conntrack-min, --conntrack-max-per-core × CPUs), as kube-proxy.
        #[arg(long)]
        conntrack_max: Option<u32>,
        /// Least flows the conntrack holds (kube-proxy's default).
        #[arg(long, default_value_t = proxy_common::ct::CONNTRACK_MIN_DEFAULT)]
        conntrack_min: u32,
        /// Flows per CPU (kube-proxy's default).
        #[arg(long, default_value_t = proxy_common::ct::CONNTRACK_MAX_PER_CORE_DEFAULT)]
        conntrack_max_per_core: u32,
        /// Entries of the service map (one per frontend — Service port ×
        /// address — plus one per backend of each) and of the backend map
        /// (one per endpoint address:port:protocol). 1/64 of the service
        /// map is held back for frontends that do not fit: those are served
        /// closed (rejected) until they fit.
        #[arg(long, default_value_t = proxy_common::svc::SVC_MAX_ENTRIES, value_parser = clap::value_parser!(u32).range(8..))]
        lb_map_max: u32,
        /// The Service CIDRs (the API server's --service-cluster-ip-range):
        /// externalIPs inside them are refused.
        #[arg(long, default_value = "", value_parser = proxy_agent::model::parse_cidrs)]
        service_cidrs: Cidrs,
        /// Serve only externalIPs inside these CIDRs (default: all, as
        /// kube-proxy); others are refused with a warning.
        #[arg(long, value_parser = proxy_agent::model::parse_cidrs)]
        external_ip_cidrs: Option<Cidrs>,
    },
    /// Tracked flows (list, the default) or remove them (flush), from the pinned map.
    Conntrack {
        #[command(subcommand)]
        action: Option<CtAction>,
        #[arg(short, long, value_enum, default_value = "table", global = true)]
        output: Output,
    },
    /// Frontends and their backends, read from the pinned maps.
    Services {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Datapath counters (per-CPU, summed), read from the pinned map.
    Stats {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Detach everything and remove the pins.
    Cleanup,
}

#[derive(Subcommand)]
enum CtAction {
    /// Flows: client, frontend, backend, SNAT, state, age.
    List,
    /// Remove flows (both directions): all, or those to one frontend.
    Flush {
        /// Only flows to this frontend: ADDR:PORT[/TCP|UDP].
        #[arg(long)]
        frontend: Option<proxy_agent::conntrack::FrontendFilter>,
    },
}

/// A list of CIDRs (clap needs a named type for a parsed `Vec`).
type Cidrs = Vec<proxy_agent::model::Cidr>;

/// A bind address, or none ("" disables the server).
#[derive(Clone, Copy, Debug)]
struct Bind(Option<std::net::SocketAddr>);

fn parse_bind(s: &str) -> Result<Bind, String> {
    if s.is_empty() {
        return Ok(Bind(None));
    }
    s.parse().map(|a| Bind(Some(a))).map_err(|e| format!("invalid address {s:?}: {e}"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let pins = Pins::new(&cli.bpffs);
    match cli.command {
        Command::Run {
            manifests,
            kubeconfig,
            devices,
            node_name,
            min_sync_period,
            sync_period,
            healthz_bind_address,
            metrics_bind_address,
            nodeport_addresses,
            xdp,
            xdp_mode,
            socket_lb,
            cgroup,
            conntrack_max,
            conntrack_min,
            conntrack_max_per_core,
            lb_map_max,
            service_cidrs,
            external_ip_cidrs,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            let source = match manifests {
                Some(dir) => SourceConfig::Manifests(dir),
                None => SourceConfig::ApiServer { kubeconfig },
            };
            let cfg = RunConfig {
                source,
                devices,
                bpffs: cli.bpffs,
                node_name: node_name.unwrap_or_else(hostname),
                min_sync_period,
                sync_period,
                poll_interval: Duration::from_millis(250),
                device_interval: Duration::from_secs(1),
                healthz_bind_address: healthz_bind_address.0,
                metrics_bind_address: metrics_bind_address.0,
                nodeport_addresses,
                xdp: xdp.then_some(xdp_mode),
                socket_lb,
                cgroup,
                conntrack: proxy_agent::conntrack::Sizing { max: conntrack_max, min: conntrack_min, max_per_core: conntrack_max_per_core },
                lb_map_max,
                conntrack_gc_interval: Duration::from_secs(10),
                service_cidrs,
                external_ip_cidrs,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(agent::run(cfg))?;
        }
        Command::Services { output } => {
            let maps = BpfMaps::open_pinned(&pins)
                .with_context(|| format!("reading the maps pinned under {} (is the agent set up?)", pins.root().display()))?;
            let view = inspect::services_view(&maps.dump()?);
            match output {
                Output::Table => print!("{}", inspect::services_table(&view)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&view)?),
            }
        }
        Command::Stats { output } => {
            let counters = datapath::read_stats(&pins)
                .with_context(|| format!("reading the stats map pinned under {}", pins.root().display()))?;
            let view = inspect::stats_view(&counters);
            match output {
                Output::Table => print!("{}", inspect::stats_table(&view)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&view)?),
            }
        }
        Command::Conntrack { action, output } => match action.unwrap_or(CtAction::List) {
            CtAction::List => {
                let flows = proxy_agent::conntrack::list(&pins)
                    .with_context(|| format!("reading the conntrack map pinned under {}", pins.root().display()))?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&flows)?),
                    Output::Table => print!("{}", inspect::conntrack_table(&flows)),
                }
            }
            CtAction::Flush { frontend } => {
                let n = proxy_agent::conntrack::flush(&pins, frontend)
                    .with_context(|| format!("flushing the conntrack map pinned under {}", pins.root().display()))?;
                match output {
                    Output::Json => println!("{}", serde_json::json!({ "flows_removed": n })),
                    Output::Table => println!("removed {n} flow(s)"),
                }
            }
        },
        Command::Cleanup => {
            let removed = datapath::cleanup(&pins)?;
            if removed.is_empty() {
                println!("nothing pinned under {}", pins.root().display());
            } else {
                for r in &removed {
                    println!("removed {}/{r}", pins.root().display());
                }
            }
        }
    }
    Ok(())
}
