//! `proxy-agent run`: load and attach the datapath, adopt the pinned state,
//! follow the source (manifests directory or API server), and keep the maps
//! equal to the model — syncing when kube-proxy would (see [`crate::runner`]),
//! never before both initial lists are complete, and never flushing because
//! the source is unreachable.
//!
//! Exiting (SIGTERM, SIGINT, or being killed) leaves programs, links and maps
//! pinned: the kernel keeps forwarding, and the next start adopts them.
use std::{
    collections::{BTreeMap, BTreeSet},
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
    model::{NodeInfo, Rejection, Tracker},
    pins::Pins,
    reconcile::Reconciler,
    runner::SyncRunner,
    source,
    store::{Change, ObjectKey, SourceEvent, Store},
};

/// Where Services and `EndpointSlices` come from.
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
    pub nodeport_addresses: NodePortAddresses,
    /// Attach the XDP fast path too, in this mode.
    pub xdp: Option<datapath::XdpAttachMode>,
    /// `--socket-lb`.
    pub socket_lb: datapath::SocketLb,
    /// `--cgroup` (`None`: the cgroup v2 root).
    pub cgroup: Option<PathBuf>,
    /// `--conntrack-max`, `--conntrack-min`, `--conntrack-max-per-core`.
    pub conntrack: crate::conntrack::Sizing,
    /// `--lb-map-max`: entries of the service and backend maps.
    pub lb_map_max: u32,
    /// How often expired conntrack entries are deleted.
    pub conntrack_gc_interval: Duration,
    /// `--service-cidrs`: externalIPs inside are refused.
    pub service_cidrs: Vec<crate::model::Cidr>,
    /// `--external-ip-cidrs`: only externalIPs inside are served.
    pub external_ip_cidrs: Option<Vec<crate::model::Cidr>>,
}

/// Whether `net/len` holds `a` (same family only).
fn prefix_contains(net: std::net::IpAddr, len: u8, a: std::net::IpAddr) -> bool {
    let bits = |x: std::net::IpAddr| match x {
        std::net::IpAddr::V4(v) => (u128::from(u32::from(v)) << 96, true),
        std::net::IpAddr::V6(v) => (u128::from(v), false),
    };
    // (IPv4 sits in the top 32 bits, so a prefix length counts from the top in both.)
    let ((n, n4), (x, x4)) = (bits(net), bits(a));
    let len = u32::from(len).min(128);
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
    n4 == x4 && n & mask == x & mask
}

/// `--nodeport-addresses`, as kube-proxy's flag: a list of CIDRs, and
/// `NodePorts` are served on every address of the node inside one of them
/// (a family the list has no range of: every address of that family);
/// unset (or `primary`): the primary address of each family of each
/// `--devices` device (kube-proxy's nftables mode).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePortAddresses {
    cidrs: Option<Vec<(std::net::IpAddr, u8)>>,
}

impl NodePortAddresses {
    /// Parses `"10.0.0.0/8,fd00::/64"` (either family), `""` or `"primary"`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s == "primary" {
            return Ok(Self { cidrs: None });
        }
        let mut cidrs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (ip, len) = part.split_once('/').ok_or_else(|| format!("{part:?} is not a CIDR"))?;
            let ip: std::net::IpAddr = ip.parse().map_err(|_| format!("{part:?}: not an IP address"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u8 = len.parse().ok().filter(|l| *l <= max).ok_or_else(|| format!("{part:?}: bad prefix length"))?;
            cidrs.push((ip, len));
        }
        Ok(Self { cidrs: Some(cidrs) })
    }

    /// Unset (or `primary`): no CIDR list.
    #[must_use]
    pub fn is_default(&self) -> bool {
        self.cidrs.is_none()
    }

    /// The `NodePort` addresses among the node's `addrs`.
    #[must_use]
    pub fn select(&self, addrs: &[datapath::DeviceAddr], devices: &DeviceSelector) -> Vec<std::net::IpAddr> {
        let mut out: Vec<std::net::IpAddr> = match &self.cidrs {
            // One address per device and family, the one configured first:
            // IPv4's primary address is listed first, but the kernel lists
            // a device's IPv6 addresses newest first, so there the last.
            None => {
                let mut first: BTreeMap<(&str, bool), std::net::IpAddr> = BTreeMap::new();
                for a in addrs.iter().filter(|a| devices.matches(&a.device) && !a.addr.is_loopback()) {
                    let slot = first.entry((a.device.as_str(), a.addr.is_ipv4()));
                    match slot {
                        std::collections::btree_map::Entry::Vacant(v) => {
                            v.insert(a.addr);
                        }
                        std::collections::btree_map::Entry::Occupied(mut o) if a.addr.is_ipv6() => {
                            o.insert(a.addr);
                        }
                        std::collections::btree_map::Entry::Occupied(_) => {}
                    }
                }
                first.into_values().collect()
            }
            // As kube-proxy: a family the list has no range of is served on
            // every address of that family.
            Some(cidrs) => addrs
                .iter()
                .filter(|a| {
                    let mine: Vec<_> = cidrs.iter().filter(|(net, _)| net.is_ipv4() == a.addr.is_ipv4()).collect();
                    if mine.is_empty() {
                        !a.addr.is_loopback()
                    } else {
                        mine.iter().any(|(net, len)| prefix_contains(*net, *len, a.addr))
                    }
                })
                .map(|a| a.addr)
                .collect(),
        };
        out.sort();
        out.dedup();
        out
    }
}

/// What the HTTP endpoints read.
struct Shared {
    health: ProxierHealth,
    metrics: Metrics,
    pins: Pins,
}

type SharedState = Arc<Mutex<Shared>>;

async fn healthz(State(s): State<SharedState>) -> impl IntoResponse {
    let mut g = s.lock().expect("lock");
    let a = g.health.healthz(SystemTime::now());
    *g.metrics.healthz_total.entry(a.status).or_default() += 1;
    respond(a.status, a.body)
}

async fn livez(State(s): State<SharedState>) -> impl IntoResponse {
    let mut g = s.lock().expect("lock");
    let a = g.health.livez(SystemTime::now());
    *g.metrics.livez_total.entry(a.status).or_default() += 1;
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

#[expect(clippy::too_many_lines, reason = "start-up in order, then the one event loop; its steps are functions")]
pub async fn run(cfg: RunConfig) -> Result<()> {
    let started = SystemTime::now();
    let selector = DeviceSelector::parse(&cfg.devices)?;
    let pins = Pins::new(&cfg.bpffs);
    // Probed before anything is loaded or attached: a kernel without what
    // the datapath needs is one clear error naming it.
    for f in datapath::probe::probe(cfg.socket_lb != datapath::SocketLb::Off)? {
        warn!(feature = f.name, since = f.since, needed_for = f.needed_for, kernel = %datapath::kernel_release(), "kernel feature missing; that part is off");
    }
    let cgroup = socket_lb_cgroup(&cfg)?;
    let cpus = crate::conntrack::possible_cpus();
    let ct_entries = cfg.conntrack.map_entries(cpus);
    let ct_new_entries = cfg.conntrack.new_map_entries(cpus);
    info!(flows = cfg.conntrack.flows(cpus), entries = ct_entries, unconfirmed_entries = ct_new_entries, cpus, "conntrack size");
    let sizes = datapath::MapSizes { ct: ct_entries, ct_new: ct_new_entries, lb: cfg.lb_map_max };
    let mut dp = Datapath::load(&pins, cfg.socket_lb, sizes)?;
    dp.sync_socket_lb(cgroup.as_deref())?;
    if let Some(mode) = cfg.xdp {
        dp.enable_xdp(mode);
    }
    let attached = dp.sync_devices(&selector)?;
    if attached.is_empty() {
        warn!(devices = %cfg.devices, "no device matches --devices yet; will attach when one appears");
    }
    // The new programs run: entries the old ones created meanwhile are
    // carried over, then retired layouts unpinned.
    dp.finish_upgrade();
    // The capacities the maps really have (a pinned map keeps its size).
    let capacity = |name| crate::conntrack::pinned_capacity(&pins, name).unwrap_or(cfg.lb_map_max) as usize;
    let (svc_cap, backend_cap) = (capacity(crate::pins::SVC_MAP), capacity(crate::pins::BACKEND_MAP));
    let mut rec = Reconciler::new(dp.take_maps()?)?
        .with_capacity(svc_cap, backend_cap)
        .with_closed_reserve(crate::reconcile::closed_reserve(svc_cap));
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
    // Kubernetes Events about refused objects: in API server mode only.
    let events = match &cfg.source {
        SourceConfig::Manifests(dir) => {
            tokio::spawn(source::manifests::run(dir.clone(), cfg.poll_interval, tx));
            None
        }
        SourceConfig::ApiServer { kubeconfig } => {
            let client = source::kube::client(kubeconfig.as_deref()).await?;
            let counters = shared.lock().expect("lock").metrics.events.clone();
            let events = crate::events::Publisher::start(client.clone(), &cfg.node_name, counters);
            tokio::spawn(source::kube::run(client, cfg.node_name.clone(), tx));
            Some(events)
        }
    };

    let node_addrs = || -> Vec<std::net::IpAddr> {
        match datapath::list_addresses() {
            Ok(a) => cfg.nodeport_addresses.select(&a, &selector),
            Err(e) => {
                warn!(error = %e, "listing addresses failed");
                Vec::new()
            }
        }
    };
    // NodePorts on 127.0.0.1 from the node itself, as kube-proxy's iptables
    // mode (route_localnet) serves them when --nodeport-addresses is unset
    // (a list serves loopback only if it holds 127.0.0.1): only sockets
    // reach that address, so only the socket path can serve it.
    let loopback_nodeports = cfg.socket_lb != datapath::SocketLb::Off && cfg.nodeport_addresses.is_default();
    let mut node = NodeInfo {
        name: cfg.node_name.clone(),
        nodeport_addresses: node_addrs(),
        loopback_nodeports,
        service_cidrs: cfg.service_cidrs.clone(),
        external_ip_cidrs: cfg.external_ip_cidrs.clone(),
        ..NodeInfo::default()
    };
    info!(addresses = ?node.nodeport_addresses, "NodePort addresses");
    // healthCheckNodePort servers listen on the NodePort addresses (as
    // kube-proxy's do with --nodeport-addresses); the proxier's health is
    // what they report as serviceProxyHealthy.
    let bind_ips: Vec<std::net::IpAddr> = node.nodeport_addresses.iter().copied().map(Into::into).collect();
    let hc_shared = shared.clone();
    let mut svc_health = crate::svchealth::ServiceHealthServer::new(&bind_ips, move || {
        hc_shared.lock().expect("lock").health.healthy(SystemTime::now())
    });
    warn_if_snat_ports_overlap();
    let mut store = Store::default();
    let mut runner = SyncRunner::new(cfg.min_sync_period, cfg.sync_period, cfg.min_sync_period.max(Duration::from_secs(1)));
    let mut reported: BTreeSet<Rejection> = BTreeSet::new();
    let mut triggers: Vec<SystemTime> = Vec::new();
    let mut devices_tick = tokio::time::interval(cfg.device_interval);
    let mut gc_tick = tokio::time::interval(cfg.conntrack_gc_interval);
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .map_err(Error::io("install SIGTERM handler", ""))?;
    let mut was_synced = false;
    // What the next sync recomputes: the Services changed since the last
    // one, or everything (start, node facts, the periodic repair).
    let mut tracker = crate::model::Tracker::default();
    let mut dirty: BTreeSet<crate::store::ObjectKey> = BTreeSet::new();
    let mut full = true;
    let mut last_full = Instant::now();
    // When the oldest change not yet programmed arrived.
    let mut pending_since: Option<Instant> = None;

    loop {
        // Nothing is programmed or pruned before both initial lists are in.
        let next = if store.synced() { runner.next_run(Instant::now()) } else { None };
        let wait = next.map_or(Duration::from_hours(1), |t| t.saturating_duration_since(Instant::now()));
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                let mut g = shared.lock().expect("lock");
                for ev in batch {
                    note_change(&ev, &store, started, &mut g.metrics, &mut triggers);
                    let node_event = matches!(ev, SourceEvent::NodeApplied(_) | SourceEvent::NodeDeleted);
                    match store.apply(ev) {
                        Change::None => {}
                        change => {
                            match change {
                                Change::Services(keys) => dirty.extend(keys),
                                _ => full = true,
                            }
                            runner.request();
                            pending_since.get_or_insert_with(Instant::now);
                            let now = SystemTime::now();
                            g.health.queued_update(now);
                            g.metrics.last_queued_timestamp_seconds = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
                        }
                    }
                    if node_event {
                        g.health.node_changed(store.node.as_ref());
                        let addrs = std::mem::take(&mut node.nodeport_addresses);
                        node = NodeInfo {
                            nodeport_addresses: addrs,
                            loopback_nodeports,
                            service_cidrs: cfg.service_cidrs.clone(),
                            external_ip_cidrs: cfg.external_ip_cidrs.clone(),
                            ..NodeInfo::from_node(&cfg.node_name, store.node.as_ref())
                        };
                    }
                }
                if store.synced() && !was_synced {
                    was_synced = true;
                    store.compact();
                    info!(services = store.services.len(), endpointslices = store.slices.len(), "initial lists complete; programming");
                }
            }
            _ = devices_tick.tick() => {
                if let Err(e) = dp.sync_devices(&selector) {
                    warn!(error = %e, "listing devices failed");
                }
                let addrs = node_addrs();
                if addrs != node.nodeport_addresses {
                    info!(addresses = ?addrs, "NodePort addresses changed");
                    node.nodeport_addresses = addrs;
                    full = true;
                    runner.request();
                }
            }
            () = tokio::time::sleep(wait), if next.is_some() => {
                // The periodic sync (every --sync-period) recomputes and
                // compares everything, repairing drift; others only what changed.
                let is_full = full || last_full.elapsed() >= cfg.sync_period;
                let changed = if is_full { None } else { Some(std::mem::take(&mut dirty)) };
                let (ok, removed_udp) = sync_once(&store, &node, &mut rec, &mut tracker, changed, pending_since, &mut reported, events.as_ref(), &shared, &mut triggers);
                if is_full {
                    dirty.clear();
                    last_full = Instant::now();
                    release_free_memory();
                }
                full = !ok && is_full;
                if ok && let Some(t) = pending_since.take() {
                    shared.lock().expect("lock").metrics.change_programming.observe(t.elapsed().as_secs_f64());
                }
                runner.ran(Instant::now(), ok);
                // After the maps no longer hold them: a socket that
                // reconnects gets a backend that is there.
                if !removed_udp.is_empty() {
                    let backends: Vec<_> = removed_udp.into_iter().collect();
                    dp.destroy_udp_sockets(&backends);
                }
                // After the datapath, as kube-proxy's syncProxyRules does.
                let (hc_ports, local_ready) = tracker.health_checks();
                let _ = svc_health.sync_services(hc_ports).await;
                svc_health.sync_endpoints(&local_ready);
            }
            _ = gc_tick.tick() => {
                let p = pins.clone();
                match tokio::task::spawn_blocking(move || crate::conntrack::gc(&p)).await {
                    Ok(Ok(tables)) => {
                        let mut g = shared.lock().expect("lock");
                        g.metrics.ct_gc_runs_total += 1;
                        g.metrics.ct_gc_duration_seconds = 0.0;
                        for (name, r) in tables {
                            g.metrics.ct_gc_deleted_total += r.deleted;
                            g.metrics.ct_gc_duration_seconds += r.elapsed.as_secs_f64();
                            g.metrics.map_entries.insert(name, (r.entries - r.deleted, r.capacity));
                            if r.deleted > 0 {
                                tracing::debug!(map = name, deleted = r.deleted, entries = r.entries, "conntrack GC");
                            }
                        }
                    }
                    Ok(Err(e)) => warn!(error = %e, "conntrack GC failed"),
                    Err(e) => warn!(error = %e, "conntrack GC task failed"),
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("exiting; programs and maps stay pinned and keep forwarding");
    Ok(())
}

/// Gives the heap's free memory back to the system: what a full sync (and
/// before the first one, the initial lists) allocated for a while and
/// freed — decoded list pages, the previous desired state — stays in the
/// allocator's arenas otherwise, counted in the agent's RSS. (glibc's
/// `malloc_trim`: walks the free chunks, a few milliseconds at 50,000
/// Services; after a full sync only.)
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own
    // arenas to the kernel; it is thread-safe and touches no live object.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The cgroup the socket programs attach to (`None` with `--socket-lb
/// off`), checked before anything is loaded or attached: a bad `--cgroup`
/// is one clear error and nothing half-attached.
fn socket_lb_cgroup(cfg: &RunConfig) -> Result<Option<PathBuf>> {
    if cfg.socket_lb == datapath::SocketLb::Off {
        return Ok(None);
    }
    let dir = match &cfg.cgroup {
        Some(d) => d.clone(),
        None => datapath::cgroup2_root()?,
    };
    datapath::open_cgroup(&dir)?;
    Ok(Some(dir))
}

/// SNAT source ports (`proxy_common::ct::SNAT_PORT_MIN..=MAX`) must not be
/// ports the node hands out to its own connections.
fn warn_if_snat_ports_overlap() {
    use proxy_common::ct::{SNAT_PORT_MAX, SNAT_PORT_MIN};
    const _: () = assert!(SNAT_PORT_MAX == u16::MAX);
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let v: Vec<u16> = text.split_whitespace().filter_map(|n| n.parse().ok()).collect();
    // (SNAT_PORT_MAX is the top of the port space: only the upper bound matters.)
    if let [_lo, hi] = v[..]
        && hi >= SNAT_PORT_MIN {
            warn!(
                ip_local_port_range = %text.trim(),
                snat_ports = %format!("{SNAT_PORT_MIN}-{SNAT_PORT_MAX}"),
                "the node's ephemeral port range overlaps the SNAT port range; lower net.ipv4.ip_local_port_range's upper bound below {SNAT_PORT_MIN}"
            );
        }
}

/// Change counters and network-programming trigger times (the
/// `endpoints.kubernetes.io/last-change-trigger-time` annotation).
/// Counts real changes only: an object replayed as stored (a re-list) or
/// the deletion of one not stored is none. A trigger time is observed only
/// when it is new for the slice and not older than the agent (a start or a
/// re-list replays hours-old ones).
fn note_change(ev: &SourceEvent, store: &Store, started: SystemTime, m: &mut Metrics, triggers: &mut Vec<SystemTime>) {
    if store.is_replay(ev) {
        return;
    }
    match ev {
        SourceEvent::ServiceApplied(_) => {
            m.service_changes_pending += 1;
            m.service_changes_total += 1;
        }
        SourceEvent::ServiceDeleted(k) if store.services.contains_key(k) => {
            m.service_changes_pending += 1;
            m.service_changes_total += 1;
        }
        SourceEvent::SliceApplied(s) => {
            m.endpoint_changes_pending += 1;
            m.endpoint_changes_total += 1;
            // (The store keeps the annotation parsed: `trigger_time`.)
            let old = store.slices.get(s.key()).and_then(|o| o.trigger_time);
            let t = s.trigger_time.filter(|t| Some(*t) != old).map(SystemTime::from).filter(|t| *t >= started);
            if let Some(t) = t {
                triggers.push(t);
            }
        }
        SourceEvent::SliceDeleted(k) if store.slices.contains_key(k) => {
            m.endpoint_changes_pending += 1;
            m.endpoint_changes_total += 1;
        }
        _ => {}
    }
}

/// One sync: `changed` Services only (recomputed by the tracker, their
/// frontends compared and written), or, with `None`, everything.
/// `pending_since`: when the oldest change it programs arrived.
#[expect(clippy::too_many_arguments, reason = "the sync loop's state, passed explicitly")]
fn sync_once(
    store: &Store,
    node: &NodeInfo,
    rec: &mut Reconciler<BpfMaps>,
    tracker: &mut Tracker,
    changed: Option<BTreeSet<ObjectKey>>,
    pending_since: Option<Instant>,
    reported: &mut BTreeSet<Rejection>,
    events: Option<&crate::events::Publisher>,
    shared: &SharedState,
    triggers: &mut Vec<SystemTime>,
) -> (bool, BTreeSet<(std::net::IpAddr, u16)>) {
    let started = Instant::now();
    // How long the oldest change waited in the queue (0: none pending, a
    // periodic full sync).
    let queued = pending_since.map_or(Duration::ZERO, |t| started.saturating_duration_since(t));
    let keys = changed.map(|services| tracker.update(store, node, services));
    if keys.is_none() {
        tracker.rebuild(store, node);
    }
    // New refusals only: a standing one is logged (and published) once.
    // (Both sets are sorted: an unchanged set costs one walk, no copy.)
    if !tracker.rejection_set().eq(reported.iter()) {
        let now: BTreeSet<Rejection> = tracker.rejection_set().cloned().collect();
        for r in now.difference(reported) {
            warn!("skipping {r}");
            if let Some(events) = events {
                events.publish(r, store);
            }
        }
        *reported = now;
    }
    let desired = tracker.desired();
    let mut report = match &keys {
        None => rec.sync(desired),
        Some(keys) => rec.sync_keys(desired, keys),
    };
    let removed_udp = std::mem::take(&mut report.removed_udp_backends);
    for (key, e) in &report.errors {
        if report.closed.contains(key) {
            error!(frontend = %key, error = %e, "frontend not programmed; its traffic is rejected until it fits");
        } else {
            error!(frontend = %key, error = %e, "frontend not programmed");
        }
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
            full = keys.is_none(),
            queued_ms = queued.as_secs_f64() * 1e3,
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "synced"
        );
    }
    let wall = SystemTime::now();
    let mut g = shared.lock().expect("lock");
    let m = &mut g.metrics;
    m.sync_duration.observe(elapsed.as_secs_f64());
    if keys.is_some() { &mut m.sync_partial_duration } else { &mut m.sync_full_duration }.observe(elapsed.as_secs_f64());
    m.no_local_endpoints = tracker.no_local_endpoints();
    m.invalid_objects = reported.len() as u64;
    m.frontends_not_programmed = report.errors.len() as u64;
    g.health.set_not_programmed(report.errors.iter().filter(|(_, e)| matches!(e, Error::MapFull { .. })).count());
    let m = &mut g.metrics;
    m.frontends_programmed = rec.programmed_frontends() as u64;
    m.map_entries.extend(rec.occupancy());
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
    (!retriable, removed_udp)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::datapath::DeviceAddr;

    fn addrs() -> Vec<DeviceAddr> {
        let a = |d: &str, ip: [u8; 4]| DeviceAddr { device: d.into(), addr: Ipv4Addr::from(ip).into(), prefix_len: 24 };
        let b = |d: &str, ip: &str| DeviceAddr { device: d.into(), addr: ip.parse().expect("v6"), prefix_len: 64 };
        vec![
            a("lo", [127, 0, 0, 1]),
            b("lo", "::1"),
            // As the kernel lists them when .1 was configured before .10:
            // IPv4 primary first, IPv6 newest first.
            a("ext0", [198, 51, 100, 1]),
            a("ext0", [198, 51, 100, 10]),
            b("ext0", "2001:db8::10"),
            b("ext0", "2001:db8::1"),
            a("nodelink", [10, 0, 0, 1]),
            a("other", [172, 16, 0, 1]),
        ]
    }

    fn ips(v: &[&str]) -> Vec<std::net::IpAddr> {
        v.iter().map(|s| s.parse().expect("ip")).collect()
    }

    #[test]
    fn nodeport_addresses_default_to_the_primary_address_of_each_device() {
        let sel = DeviceSelector::parse("ext0,nodelink,lxc*").unwrap();
        let got = NodePortAddresses::parse("").unwrap().select(&addrs(), &sel);
        assert_eq!(got, ips(&["10.0.0.1", "198.51.100.1", "2001:db8::1"]), "the first configured of each family");
        assert_eq!(NodePortAddresses::parse("primary").unwrap().select(&addrs(), &sel), got);
    }

    #[test]
    fn nodeport_addresses_cidrs_select_every_address_inside_them() {
        let sel = DeviceSelector::parse("ext0").unwrap();
        let got = NodePortAddresses::parse("198.51.100.10/32, 172.16.0.0/12, 2001:db8::10/128").unwrap().select(&addrs(), &sel);
        assert_eq!(got, ips(&["172.16.0.1", "198.51.100.10", "2001:db8::10"]));
        let all = NodePortAddresses::parse("0.0.0.0/0").unwrap().select(&addrs(), &sel);
        assert_eq!(all.len(), 7, "every IPv4 address, and IPv6 (no range of its own) on all but loopback");
        let v6 = NodePortAddresses::parse("2001:db8::10/128").unwrap().select(&addrs(), &sel);
        assert_eq!(v6, ips(&["10.0.0.1", "172.16.0.1", "198.51.100.1", "198.51.100.10", "2001:db8::10"]));
    }

    #[test]
    fn nodeport_addresses_reject_bad_input() {
        assert!(NodePortAddresses::parse("10.0.0.0").is_err());
        assert!(NodePortAddresses::parse("10.0.0.0/33").is_err());
        assert!(NodePortAddresses::parse("fd00::/129").is_err());
        assert!(NodePortAddresses::parse("banana/8").is_err());
    }
}
