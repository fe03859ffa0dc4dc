//! `proxy-agent`: thin CLI over the library.
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use proxy_agent::{
    agent,
    config::{self, RunArgs},
    datapath::{self, BpfMaps, ServiceMaps as _},
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
    /// Program the datapath and keep it in sync with the Services. Implied
    /// when the binary is invoked as `kube-proxy`, or with a flag first
    /// (kube-proxy's command line: `--config=FILE --hostname-override=NAME`).
    Run(Box<RunArgs>),
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
    /// Datapath counters by exit reason (per-CPU, summed), split by address
    /// family (IPv4, IPv6, other) with the totals, read from the pinned map.
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

fn main() -> Result<()> {
    limit_malloc_arenas();
    // kube-proxy's command line (`kube-proxy --config=... --hostname-override=...`) means `run`.
    let args = config::implied_run(std::env::args_os().collect());
    let matches = Cli::command().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let pins = Pins::new(&cli.bpffs);
    match cli.command {
        Command::Run(run) => {
            let run_matches = matches.subcommand_matches("run").expect("the run subcommand was parsed");
            let resolved = run.resolve(run_matches, cli.bpffs)?;
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(resolved.log_filter)),
                )
                .with_writer(std::io::stderr)
                .init();
            if let Some(file) = &resolved.file {
                tracing::info!(file = %file.display(), "read kube-proxy's configuration; flags given on the command line override it");
            }
            for w in &resolved.warnings {
                tracing::warn!("{w}");
            }
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(agent::run(resolved.config))?;
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

/// One glibc malloc arena for the whole process, unless `MALLOC_ARENA_MAX`
/// says otherwise. Why: glibc gives each thread that meets a locked arena
/// another one (up to 8 per core), and memory freed into one arena serves
/// only that arena's threads. The agent builds its state on one thread
/// (the sync) from objects decoded on others (the watches): with an arena
/// each, the room freed by a re-list or a full sync in one arena is not
/// reused by the others, and the resident set stays above the live heap
/// (measured at 50,000 Services: 345 MiB with the default arenas, 323 MiB
/// with one). The agent allocates from a handful of threads, so one
/// arena's lock costs little. Called first, before any thread exists.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other
        // thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
