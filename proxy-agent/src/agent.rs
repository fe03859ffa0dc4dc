//! `proxy-agent run`: load and attach the datapath, adopt the pinned state,
//! follow the source (manifests directory or API server), and keep the maps
//! equal to the model — syncing when kube-proxy would (see [`crate::runner`]),
//! never before both initial lists are complete, and never flushing because
//! the source is unreachable.
//!
//! Exiting (SIGTERM, SIGINT, or being killed) leaves programs, links and maps
//! pinned: the kernel keeps forwarding, and the next start adopts them.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use tokio::{signal::unix::SignalKind, sync::mpsc};
use tracing::{error, info, warn};

use crate::{
    datapath::{self, BpfMaps, Datapath, DeviceSelector},
    error::{Error, Result},
    health::ProxierHealth,
    metrics::Metrics,
    model::{NodeInfo, Rejection, desired_state},
    pins::Pins,
    reconcile::Reconciler,
    runner::SyncRunner,
    source,
    store::{SourceEvent, Store},
};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests (standalone and demo mode).
    Manifests(PathBuf),
    /// The API server, found from this kubeconfig, else `$KUBECONFIG`,
    /// `~/.kube/config`, or the in-cluster config.
    ApiServer { kubeconfig: Option<PathBuf> },
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub devices: String,
    pub bpffs: PathBuf,
    pub node_name: String,
    /// Least time between two syncs (bursts of changes are coalesced).
    pub min_sync_period: Duration,
    /// A sync runs at least this often; 2× this is the health timeout.
    pub sync_period: Duration,
    /// How often the manifests directory is read.
    pub poll_interval: Duration,
    /// How often devices are listed to attach new matching ones.
    pub device_interval: Duration,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
}

/// What the HTTP endpoints read.
struct Shared {
    health: ProxierHealth,
    metrics: Metrics,
    pins: Pins,
}

type SharedState = Arc<Mutex<Shared>>;

async fn healthz(State(s): State<SharedState>) -> impl IntoResponse {
    let a = s.lock().expect("lock").health.healthz(SystemTime::now());
    respond(a.status, a.body)
}

async fn livez(State(s): State<SharedState>) -> impl IntoResponse {
    let a = s.lock().expect("lock").health.livez(SystemTime::now());
    respond(a.status, a.body)
}

fn respond(status: u16, body: String) -> impl IntoResponse {
    (
        axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")],
        body,
    )
}

async fn metrics(State(s): State<SharedState>) -> impl IntoResponse {
    let (metrics, pins) = {
        let g = s.lock().expect("lock");
        (g.metrics.clone(), g.pins.clone())
    };
    let stats = tokio::task::spawn_blocking(move || datapath::read_stats(&pins).unwrap_or_default())
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render(&stats))
}

async fn serve(what: &'static str, addr: SocketAddr, router: Router) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { what, addr, source })?;
    info!(what, %addr, "listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            error!(what, error = %e, "HTTP server stopped");
        }
    });
    Ok(())
}

pub async fn run(cfg: RunConfig) -> Result<()> {
    let selector = DeviceSelector::parse(&cfg.devices)?;
    let pins = Pins::new(&cfg.bpffs);
    let mut dp = Datapath::load(&pins)?;
    let attached = dp.sync_devices(&selector)?;
    if attached.is_empty() {
        warn!(devices = %cfg.devices, "no device matches --devices yet; will attach when one appears");
    }
    let mut rec = Reconciler::new(dp.take_maps()?)?;
    info!(
        bpffs = %cfg.bpffs.display(),
        frontends = rec.programmed_frontends(),
        "datapath loaded; adopted the pinned state"
    );

    let shared: SharedState = Arc::new(Mutex::new(Shared {
        health: ProxierHealth::new(2 * cfg.sync_period),
        metrics: Metrics::default(),
        pins: pins.clone(),
    }));
    if let Some(addr) = cfg.healthz_bind_address {
        let r = Router::new().route("/healthz", get(healthz)).route("/livez", get(livez)).with_state(shared.clone());
        serve("healthz", addr, r).await?;
    }
    if let Some(addr) = cfg.metrics_bind_address {
        let r = Router::new().route("/metrics", get(metrics)).with_state(shared.clone());
        serve("metrics", addr, r).await?;
    }

    let (tx, mut rx) = mpsc::channel(256);
    match &cfg.source {
        SourceConfig::Manifests(dir) => {
            tokio::spawn(source::manifests::run(dir.clone(), cfg.poll_interval, tx));
        }
        SourceConfig::ApiServer { kubeconfig } => {
            let client = source::kube::client(kubeconfig.as_deref()).await?;
            tokio::spawn(source::kube::run(client, cfg.node_name.clone(), tx));
        }
    }

    let mut node = NodeInfo { name: cfg.node_name.clone(), ..NodeInfo::default() };
    let mut store = Store::default();
    let mut runner = SyncRunner::new(cfg.min_sync_period, cfg.sync_period, cfg.min_sync_period.max(Duration::from_secs(1)));
    let mut reported: BTreeSet<Rejection> = BTreeSet::new();
    let mut triggers: Vec<SystemTime> = Vec::new();
    let mut devices_tick = tokio::time::interval(cfg.device_interval);
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .map_err(Error::io("install SIGTERM handler", ""))?;
    let mut was_synced = false;

    loop {
        // Nothing is programmed or pruned before both initial lists are in.
        let next = if store.synced() { runner.next_run(Instant::now()) } else { None };
        let wait = next.map_or(Duration::from_secs(3600), |t| t.saturating_duration_since(Instant::now()));
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                let mut g = shared.lock().expect("lock");
                for ev in batch {
                    note_change(&ev, &mut g.metrics, &mut triggers);
                    let node_event = matches!(ev, SourceEvent::NodeApplied(_) | SourceEvent::NodeDeleted);
                    if store.apply(ev) {
                        runner.request();
                        g.health.queued_update(SystemTime::now());
                    }
                    if node_event {
                        g.health.node_changed(store.node.as_ref());
                        node = NodeInfo::from_node(&cfg.node_name, store.node.as_ref());
                    }
                }
                if store.synced() && !was_synced {
                    was_synced = true;
                    info!(services = store.services.len(), endpointslices = store.slices.len(), "initial lists complete; programming");
                }
            }
            _ = devices_tick.tick() => {
                if let Err(e) = dp.sync_devices(&selector) {
                    warn!(error = %e, "listing devices failed");
                }
            }
            () = tokio::time::sleep(wait), if next.is_some() => {
                let ok = sync_once(&store, &node, &mut rec, &mut reported, &shared, &mut triggers);
                runner.ran(Instant::now(), ok);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("exiting; programs and maps stay pinned and keep forwarding");
    Ok(())
}

/// Change counters and network-programming trigger times (the
/// `endpoints.kubernetes.io/last-change-trigger-time` annotation).
fn note_change(ev: &SourceEvent, m: &mut Metrics, triggers: &mut Vec<SystemTime>) {
    match ev {
        SourceEvent::ServiceApplied(_) | SourceEvent::ServiceDeleted(_) => {
            m.service_changes_pending += 1;
            m.service_changes_total += 1;
        }
        SourceEvent::SliceApplied(s) => {
            m.endpoint_changes_pending += 1;
            m.endpoint_changes_total += 1;
            let t = s
                .object
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("endpoints.kubernetes.io/last-change-trigger-time"))
                .and_then(|v| v.parse::<jiff::Timestamp>().ok());
            if let Some(t) = t {
                triggers.push(SystemTime::from(t));
            }
        }
        SourceEvent::SliceDeleted(_) => {
            m.endpoint_changes_pending += 1;
            m.endpoint_changes_total += 1;
        }
        _ => {}
    }
}

fn sync_once(
    store: &Store,
    node: &NodeInfo,
    rec: &mut Reconciler<BpfMaps>,
    reported: &mut BTreeSet<Rejection>,
    shared: &SharedState,
    triggers: &mut Vec<SystemTime>,
) -> bool {
    let started = Instant::now();
    let (desired, rejections) = desired_state(store, node);
    let now: BTreeSet<Rejection> = rejections.into_iter().collect();
    for r in now.difference(reported) {
        warn!("skipping {r}");
    }
    *reported = now;
    let report = rec.sync(&desired);
    for (key, e) in &report.errors {
        error!(frontend = %key, error = %e, "frontend not programmed");
    }
    for e in &report.other_errors {
        error!(error = %e, "sync error; will retry");
    }
    let retriable = report.errors.iter().any(|(_, e)| !matches!(e, Error::MapFull { .. })) || !report.other_errors.is_empty();
    let elapsed = started.elapsed();
    if report.changed() || !report.errors.is_empty() {
        info!(
            frontends = desired.frontends.len(),
            writes = report.writes,
            deletes = report.deletes,
            errors = report.errors.len(),
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "synced"
        );
    }
    let wall = SystemTime::now();
    let mut g = shared.lock().expect("lock");
    let m = &mut g.metrics;
    m.sync_duration.observe(elapsed.as_secs_f64());
    m.invalid_objects = reported.len() as u64;
    m.frontends_not_programmed = report.errors.len() as u64;
    m.frontends_programmed = rec.programmed_frontends() as u64;
    m.map_entries = rec.occupancy();
    if retriable {
        m.sync_errors_total += 1;
    } else {
        m.last_sync_timestamp_seconds = wall.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        m.endpoint_changes_pending = 0;
        m.service_changes_pending = 0;
        for t in triggers.drain(..) {
            m.network_programming.observe(wall.duration_since(t).unwrap_or_default().as_secs_f64());
        }
        g.health.updated(wall);
    }
    !retriable
}
