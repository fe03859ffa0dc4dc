//! Kubernetes Events about refused objects (API server mode only).
//!
//! Every new [`Rejection`] — the same set difference as its warning, so a
//! standing refusal is published once, not on every sync — becomes one
//! `events.k8s.io/v1` Event of type `Warning`:
//! - `regarding`: the refused Service or `EndpointSlice` (with its uid and
//!   resourceVersion when the store has them), so `kubectl describe svc`
//!   shows it;
//! - `related`: for a lost claim, the Service that keeps the frontend;
//! - `reason`: the [`Cause`](crate::model::Cause) code (`FrontendConflict`,
//!   `ExternalIPRefused`, `InvalidSourceRange`, `TooManyEndpoints`,
//!   `Unsupported`, `Invalid`);
//! - `note`: the warning's text (a conflict names both Services);
//! - `action` `Program`, `reportingController` `proxy-agent` (the
//!   `DaemonSet`'s name), `reportingInstance` `proxy-agent-<node name>`.
//!
//! The sync loop never waits for the API server: [`Publisher::publish`]
//! puts the request into a bounded queue ([`QUEUE`]) drained by one task,
//! and a full queue drops it (`proxy_events_dropped_total`). A failed
//! publish (403 without the RBAC rule, the API server down, no answer
//! within [`TIMEOUT`]) is counted (`proxy_events_failed_total`) and logged
//! at warn once, then not again until a publish succeeds; nothing else is
//! affected, and the refusal is still in the log and in
//! `proxy_invalid_objects`.
//!
//! Why not kube-runtime's `Recorder`: it folds every event with the same
//! object, reason and action into one series whatever its note, so two
//! different refusals of one Service (two externalIPs refused) would show
//! the first text only. Here the series key includes the note: the same
//! refusal seen again within [`SERIES_WINDOW`] (one that comes and goes)
//! bumps the first Event's `series` with a merge patch, as client-go and the
//! `Recorder` do, instead of creating another Event.
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    metrics::EventCounters,
    model::{Cause, Rejection},
    store::{ObjectKey, Store},
};

/// `reportingController`: the `DaemonSet` and `ServiceAccount` name.
pub const REPORTING_CONTROLLER: &str = "proxy-agent";
/// `action`: what was not done for the object.
pub const ACTION: &str = "Program";
/// Requests waiting to be published; more are dropped and counted.
pub const QUEUE: usize = 256;
/// How long one API request may take before it counts as failed.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The same refusal again within this time updates the first Event's
/// series (kube-runtime's `Recorder` uses the same 6 minutes).
pub const SERIES_WINDOW: Duration = Duration::from_mins(6);
/// The API server refuses a longer `note` (1 kB).
const NOTE_LIMIT: usize = 1024;

/// One Event to publish, built on the sync path (no I/O).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub regarding: ObjectReference,
    pub related: Option<ObjectReference>,
    pub reason: &'static str,
    pub note: String,
}

/// A reference to a stored object of the kind a [`Rejection`] names.
fn reference(kind: &str, key: &ObjectKey, store: &Store) -> ObjectReference {
    let (api_version, meta) = match kind {
        "Service" => ("v1", store.services.get(key).map(|s| &s.meta)),
        "EndpointSlice" => ("discovery.k8s.io/v1", store.slices.get(key).map(|s| &s.meta)),
        _ => ("v1", None),
    };
    ObjectReference {
        api_version: Some(api_version.to_owned()),
        kind: Some(kind.to_owned()),
        namespace: Some(key.namespace.to_string()),
        name: Some(key.name.to_string()),
        uid: meta.and_then(|m| m.uid.as_ref().map(ToString::to_string)),
        resource_version: meta.and_then(|m| m.resource_version.as_ref().map(ToString::to_string)),
        field_path: None,
    }
}

/// The Event request for a rejection: on the refused object, naming the
/// winner as `related` for a lost claim.
#[must_use]
pub fn request_for(r: &Rejection, store: &Store) -> Request {
    let related = match &r.cause {
        Cause::FrontendConflict { owner } => Some(reference("Service", owner, store)),
        _ => None,
    };
    let mut note = r.to_string();
    if note.len() > NOTE_LIMIT {
        let mut end = NOTE_LIMIT - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    Request { regarding: reference(r.kind, &r.object, store), related, reason: r.cause.code(), note }
}

/// The Event for `req`, first seen `now`, named `<object>.<nanos in hex>`
/// as client-go and kube-runtime name them.
#[must_use]
pub fn event(req: &Request, instance: &str, now: Timestamp, nanos: i128) -> Event {
    let namespace = req.regarding.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".to_owned());
    let object = req.regarding.name.as_deref().unwrap_or(REPORTING_CONTROLLER);
    Event {
        metadata: ObjectMeta { name: Some(format!("{object}.{nanos:x}")), namespace: Some(namespace), ..ObjectMeta::default() },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".to_owned()),
        reason: Some(req.reason.to_owned()),
        note: Some(req.note.clone()),
        action: Some(ACTION.to_owned()),
        reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
        reporting_instance: Some(instance.to_owned()),
        regarding: Some(req.regarding.clone()),
        related: req.related.clone(),
        ..Event::default()
    }
}

/// `reportingInstance` for this node (at most 128 characters, as the API
/// server requires).
#[must_use]
pub fn reporting_instance(node_name: &str) -> String {
    let mut s = format!("{REPORTING_CONTROLLER}-{node_name}");
    s.truncate(128);
    s
}

/// The sync loop's end of the queue.
pub struct Publisher {
    tx: mpsc::Sender<Request>,
    counters: Arc<EventCounters>,
    /// A full queue was logged (once until the queue has room again).
    full_logged: AtomicBool,
}

impl Publisher {
    /// Starts the task that publishes with `client`; it ends when the
    /// publisher is dropped.
    #[must_use]
    pub fn start(client: Client, node_name: &str, counters: Arc<EventCounters>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(drain(client, reporting_instance(node_name), rx, counters.clone()));
        Self { tx, counters, full_logged: AtomicBool::new(false) }
    }

    /// Queues an Event for `r` without waiting: a full queue drops it (and
    /// counts it).
    pub fn publish(&self, r: &Rejection, store: &Store) {
        match self.tx.try_send(request_for(r, store)) {
            Ok(()) => self.full_logged.store(false, Ordering::Relaxed),
            Err(mpsc::error::TrySendError::Full(req)) => {
                EventCounters::add(&self.counters.dropped);
                if !self.full_logged.swap(true, Ordering::Relaxed) {
                    warn!(queue = QUEUE, reason = req.reason, "Kubernetes Event queue full; dropping Events (counted in proxy_events_dropped_total)");
                }
            }
            // The task is gone (runtime shutting down): nothing to do.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// What identifies "the same refusal again".
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
    reason: &'static str,
    note: String,
}

impl SeriesKey {
    fn of(req: &Request) -> Self {
        Self {
            namespace: req.regarding.namespace.clone(),
            name: req.regarding.name.clone(),
            uid: req.regarding.uid.clone(),
            reason: req.reason,
            note: req.note.clone(),
        }
    }
}

/// An Event already created, for its series.
struct Sent {
    namespace: String,
    name: String,
    count: i32,
    last: Timestamp,
}

/// Publishes queued requests one at a time until the queue closes.
async fn drain(client: Client, instance: String, mut rx: mpsc::Receiver<Request>, counters: Arc<EventCounters>) {
    let mut sent: HashMap<SeriesKey, Sent> = HashMap::new();
    let mut failing = false;
    let mut last_nanos: i128 = 0;
    let window = i64::try_from(SERIES_WINDOW.as_secs()).unwrap_or(i64::MAX);
    while let Some(req) = rx.recv().await {
        let now = Timestamp::now();
        sent.retain(|_, s| now.as_second() - s.last.as_second() < window);
        let key = SeriesKey::of(&req);
        let bumped = match sent.get_mut(&key) {
            Some(s) => match bump_series(&client, s, now).await {
                Ok(()) => {
                    s.count += 1;
                    s.last = now;
                    Some(Ok(()))
                }
                // Its Event is gone (expired, deleted): a new one.
                Err(Failure::Api(kube::Error::Api(status))) if status.is_not_found() => None,
                Err(e) => Some(Err(e)),
            },
            None => None,
        };
        let result = if let Some(r) = bumped {
            r
        } else {
            // Distinct names even when the clock does not move.
            last_nanos = now.as_nanosecond().max(last_nanos + 1);
            create(&client, &event(&req, &instance, now, last_nanos)).await.map(|s| {
                sent.insert(key, s);
            })
        };
        match result {
            Ok(()) => {
                EventCounters::add(&counters.published);
                if std::mem::take(&mut failing) {
                    info!("publishing Kubernetes Events works again");
                }
                debug!(regarding = ?req.regarding.name, reason = req.reason, "Kubernetes Event published");
            }
            Err(e) => {
                EventCounters::add(&counters.failed);
                if std::mem::replace(&mut failing, true) {
                    debug!(error = %e, reason = req.reason, "publishing a Kubernetes Event failed");
                } else {
                    warn!(
                        error = %e,
                        reason = req.reason,
                        "publishing a Kubernetes Event failed (is create/patch on events.k8s.io events allowed?); refusals are still logged; further failures are counted in proxy_events_failed_total, and not logged until one succeeds"
                    );
                }
            }
        }
    }
}

#[derive(Debug)]
enum Failure {
    Api(kube::Error),
    Timeout,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The Status in one line (kube's Display adds its Debug form).
            Self::Api(kube::Error::Api(s)) => write!(f, "{} {}: {}", s.code, s.reason, s.message),
            Self::Api(e) => e.fmt(f),
            Self::Timeout => write!(f, "no answer within {TIMEOUT:?}"),
        }
    }
}

/// One API request, bounded by [`TIMEOUT`].
async fn bounded<T>(request: impl Future<Output = kube::Result<T>>) -> Result<T, Failure> {
    match tokio::time::timeout(TIMEOUT, request).await {
        Ok(r) => r.map_err(Failure::Api),
        Err(_) => Err(Failure::Timeout),
    }
}

async fn create(client: &Client, ev: &Event) -> Result<Sent, Failure> {
    let namespace = ev.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
    bounded(api.create(&PostParams::default(), ev)).await?;
    let last = ev.event_time.as_ref().map_or_else(Timestamp::now, |t| t.0);
    Ok(Sent { namespace, name: ev.metadata.name.clone().unwrap_or_default(), count: 1, last })
}

/// The same refusal again: the first Event's series counts it.
async fn bump_series(client: &Client, s: &Sent, now: Timestamp) -> Result<(), Failure> {
    let api: Api<Event> = Api::namespaced(client.clone(), &s.namespace);
    let patch = serde_json::json!({ "series": { "count": s.count + 1, "lastObservedTime": MicroTime(now) } });
    bounded(api.patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch))).await.map(drop)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;

    use super::*;
    use crate::store::SourceEvent;

    fn store_with(name: &str, uid: &str) -> Store {
        let mut store = Store::default();
        let mut svc = Service::default();
        svc.metadata.name = Some(name.to_owned());
        svc.metadata.namespace = Some("default".to_owned());
        svc.metadata.uid = Some(uid.to_owned());
        svc.metadata.resource_version = Some("42".to_owned());
        store.apply(SourceEvent::service(&svc, "apiserver"));
        store
    }

    fn conflict() -> Rejection {
        Rejection {
            kind: "Service",
            object: ObjectKey::new("default", "young"),
            origin: "apiserver".to_owned(),
            reason: "frontend 203.0.113.9:80/TCP is already used by Service default/old (externalIP wins over externalIP: ClusterIPs first, then the oldest Service)".to_owned(),
            cause: Cause::FrontendConflict { owner: ObjectKey::new("default", "old") },
        }
    }

    #[test]
    fn a_lost_claim_is_a_warning_on_the_loser_related_to_the_winner() {
        let mut store = store_with("young", "uid-young");
        store.apply(SourceEvent::ServiceApplied(store_with("old", "uid-old").services.into_values().next().expect("old")));
        let req = request_for(&conflict(), &store);
        assert_eq!(req.reason, "FrontendConflict");
        assert_eq!(req.note, conflict().to_string(), "the note is the warning's text");
        assert!(req.note.contains("default/young") && req.note.contains("default/old"), "{}", req.note);
        assert_eq!(req.regarding.uid.as_deref(), Some("uid-young"));
        assert_eq!(req.regarding.kind.as_deref(), Some("Service"));
        assert_eq!(req.regarding.api_version.as_deref(), Some("v1"));
        assert_eq!(req.related.as_ref().and_then(|r| r.name.as_deref()), Some("old"));
        assert_eq!(req.related.as_ref().and_then(|r| r.uid.as_deref()), Some("uid-old"));

        let now = Timestamp::now();
        let ev = event(&req, &reporting_instance("node-a"), now, 0xabc);
        assert_eq!(ev.metadata.name.as_deref(), Some("young.abc"));
        assert_eq!(ev.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.action.as_deref(), Some(ACTION));
        assert_eq!(ev.reporting_controller.as_deref(), Some("proxy-agent"));
        assert_eq!(ev.reporting_instance.as_deref(), Some("proxy-agent-node-a"));
        assert_eq!(ev.event_time, Some(MicroTime(now)));
        assert!(ev.series.is_none() && ev.deprecated_count.is_none(), "a new Event has no series");
    }

    #[test]
    fn an_unknown_object_has_no_uid_and_a_slice_its_group() {
        let mut r = conflict();
        r.cause = Cause::Invalid;
        r.kind = "EndpointSlice";
        let req = request_for(&r, &Store::default());
        assert_eq!(req.reason, "Invalid");
        assert!(req.regarding.uid.is_none() && req.related.is_none());
        assert_eq!(req.regarding.api_version.as_deref(), Some("discovery.k8s.io/v1"));
    }

    #[test]
    fn a_long_note_is_cut_to_the_api_limit() {
        let mut r = conflict();
        r.reason = "é".repeat(2000);
        let req = request_for(&r, &Store::default());
        assert!(req.note.len() <= NOTE_LIMIT && req.note.ends_with('…'), "{}", req.note.len());
        assert!(reporting_instance(&"n".repeat(300)).len() <= 128);
    }

    /// The queue never blocks the caller: when nothing drains it, the
    /// requests beyond [`QUEUE`] are dropped and counted.
    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(EventCounters::default());
        let p = Publisher { tx, counters: counters.clone(), full_logged: AtomicBool::new(false) };
        let store = Store::default();
        for _ in 0..QUEUE + 5 {
            p.publish(&conflict(), &store);
        }
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 5);
    }
}
