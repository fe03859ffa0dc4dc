//! `proxy-agent run`: load and attach the datapath, adopt the pinned state,
//! follow the source, and keep the maps equal to the model.
//!
//! Exiting (SIGTERM, SIGINT, or being killed) leaves programs, links and maps
//! pinned: the kernel keeps forwarding, and the next start adopts them.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::{signal::unix::SignalKind, sync::mpsc};
use tracing::{error, info, warn};

use crate::{
    datapath::{Datapath, DeviceSelector},
    error::Result,
    model::{NodeInfo, Rejection, desired_state},
    pins::Pins,
    reconcile::Reconciler,
    source::manifests,
    store::Store,
};

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub manifests: PathBuf,
    pub devices: String,
    pub bpffs: PathBuf,
    pub node_name: String,
    /// Least time between two syncs (bursts of changes are coalesced).
    pub min_sync_period: Duration,
    /// How often the manifests directory is read.
    pub poll_interval: Duration,
    /// How often devices are listed to attach new matching ones.
    pub device_interval: Duration,
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

    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(manifests::run(cfg.manifests.clone(), cfg.poll_interval, tx));

    let node = NodeInfo { name: cfg.node_name.clone() };
    let mut store = Store::default();
    let mut dirty = false;
    let mut last_sync: Option<Instant> = None;
    let mut reported: BTreeSet<Rejection> = BTreeSet::new();
    let mut devices_tick = tokio::time::interval(cfg.device_interval);
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .map_err(crate::Error::io("install SIGTERM handler", ""))?;

    loop {
        let wait = match (dirty && store.synced(), last_sync) {
            (true, Some(t)) => cfg.min_sync_period.saturating_sub(t.elapsed()),
            (true, None) => Duration::ZERO,
            (false, _) => Duration::from_hours(1),
        };
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                for ev in batch {
                    dirty |= store.apply(ev);
                }
            }
            _ = devices_tick.tick() => {
                if let Err(e) = dp.sync_devices(&selector) {
                    warn!(error = %e, "listing devices failed");
                }
            }
            () = tokio::time::sleep(wait), if dirty && store.synced() => {
                dirty = false;
                last_sync = Some(Instant::now());
                sync_once(&store, &node, &mut rec, &mut reported);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("exiting; programs and maps stay pinned and keep forwarding");
    Ok(())
}

fn sync_once(
    store: &Store,
    node: &NodeInfo,
    rec: &mut Reconciler<crate::datapath::BpfMaps>,
    reported: &mut BTreeSet<Rejection>,
) {
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
    if report.changed() || !report.errors.is_empty() {
        info!(
            frontends = desired.frontends.len(),
            writes = report.writes,
            deletes = report.deletes,
            errors = report.errors.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "synced"
        );
    }
}
