//! The API server source: kube-rs watchers for v1 Services,
//! discovery.k8s.io/v1 `EndpointSlices` and the agent's own v1 Node.
//!
//! As kube-proxy does, Services and `EndpointSlices` are listed with the label
//! selector `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`,
//! so objects of other proxies and of headless Services never reach the agent.
//! Each watcher lists, then watches from the list's resourceVersion; on a
//! dropped watch it resumes, on 410 Gone it lists again, with kube-rs'
//! default backoff on errors. A re-list is turned into the applies and
//! deletes that bring the store to the new list, so nothing downstream sees
//! the difference from an ordinary update: it is streamed as it arrives —
//! each listed object is sent as an apply (one the store holds unchanged is
//! a replay, which writes nothing), and once the list is complete the
//! objects it did not show are deleted — so the new list is never held
//! beside the store. While the API server is unreachable nothing is sent:
//! the datapath keeps the last known state (deletes come only from a
//! complete list or a watch event).
//!
//! What is kept of a Service or `EndpointSlice` is its record
//! ([`crate::store::ServiceRecord`], [`crate::store::SliceRecord`]), built as
//! the object arrives; the decoded object is dropped at once.
use std::{collections::BTreeMap, path::Path, sync::Arc};

use futures::{FutureExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    store::{Interner, ObjectKey, ServiceRecord, SliceRecord, SourceEvent},
};

/// kube-proxy's label selector for Services and `EndpointSlices`.
pub const LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// Where objects from the API server say they came from.
pub const ORIGIN: &str = "apiserver";
/// Most listed objects sent in one batch (a list page is sent as soon as
/// the next one has to be fetched).
const BATCH: usize = 100;

/// Finds the API server the way kubectl does: `--kubeconfig`, else
/// `$KUBECONFIG` / `~/.kube/config`, else the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| Error::Kubeconfig { path: path.to_owned(), source };
            let kc = Kubeconfig::read_from(path).map_err(err)?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(err)?
        }
        None => Config::infer().await.map_err(|e| Error::InferConfig(Box::new(e)))?,
    };
    Client::try_from(config).map_err(|e| Error::Kube(Box::new(e)))
}

trait Kind: kube::Resource + Clone + Sized {
    /// The applied event for `obj`, as the store keeps it, and its key.
    fn applied(obj: Self, origin: &Arc<str>, strings: &mut Interner) -> (ObjectKey, SourceEvent);
    fn deleted(k: ObjectKey) -> SourceEvent;
    fn synced() -> Option<SourceEvent>;
    const NAME: &'static str;
}

impl Kind for Service {
    fn applied(obj: Self, origin: &Arc<str>, strings: &mut Interner) -> (ObjectKey, SourceEvent) {
        let r = ServiceRecord::new(&obj, origin.clone(), strings);
        (r.key().clone(), SourceEvent::ServiceApplied(Box::new(r)))
    }
    fn deleted(k: ObjectKey) -> SourceEvent {
        SourceEvent::ServiceDeleted(k)
    }
    fn synced() -> Option<SourceEvent> {
        Some(SourceEvent::ServicesSynced)
    }
    const NAME: &'static str = "Services";
}

impl Kind for EndpointSlice {
    fn applied(obj: Self, origin: &Arc<str>, strings: &mut Interner) -> (ObjectKey, SourceEvent) {
        let r = SliceRecord::new(&obj, origin.clone(), strings);
        (r.key().clone(), SourceEvent::SliceApplied(Box::new(r)))
    }
    fn deleted(k: ObjectKey) -> SourceEvent {
        SourceEvent::SliceDeleted(k)
    }
    fn synced() -> Option<SourceEvent> {
        Some(SourceEvent::SlicesSynced)
    }
    const NAME: &'static str = "EndpointSlices";
}

impl Kind for Node {
    fn applied(mut obj: Self, _: &Arc<str>, _: &mut Interner) -> (ObjectKey, SourceEvent) {
        // Labels (the zone), `deletionTimestamp` and `spec.taints` are read;
        // the status (images, conditions, addresses) and the metadata of
        // other tools are not.
        strip_meta(&mut obj.metadata);
        obj.status = None;
        (key_of(&obj), SourceEvent::NodeApplied(Box::new(obj)))
    }
    fn deleted(_: ObjectKey) -> SourceEvent {
        SourceEvent::NodeDeleted
    }
    fn synced() -> Option<SourceEvent> {
        None
    }
    const NAME: &'static str = "Node";
}

/// Drops the metadata of the Node the agent never reads: `managedFields`,
/// annotations, `ownerReferences`, `finalizers`, `generateName`.
fn strip_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    meta.annotations = None;
}

/// The key of an object as the store keys it (`default` namespace when
/// unset; the API server always sets it on namespaced objects).
fn key_of<K: kube::Resource>(obj: &K) -> ObjectKey {
    ObjectKey::of(obj.meta())
}

/// What [`follow`] does with the watcher's events, apart from the I/O:
/// turns them into batches of [`SourceEvent`]s, a list streamed as it
/// arrives (see the module documentation).
struct Follower<K> {
    origin: Arc<str>,
    strings: Interner,
    /// What the store holds of this kind (applied, not deleted since), with
    /// the number of the last list that showed each.
    known: BTreeMap<ObjectKey, u64>,
    /// The number of the list under way (or of the last one).
    list: u64,
    listing: bool,
    synced: bool,
    batch: Vec<SourceEvent>,
    kind: std::marker::PhantomData<K>,
}

impl<K: Kind> Follower<K> {
    fn new() -> Self {
        Self {
            origin: ORIGIN.into(),
            strings: Interner::default(),
            known: BTreeMap::new(),
            list: 0,
            listing: false,
            synced: false,
            batch: Vec::new(),
            kind: std::marker::PhantomData,
        }
    }

    /// Takes one event; `true` when the batch is to be sent now (listed
    /// objects wait for more, up to [`BATCH`]).
    fn event(&mut self, ev: Event<K>) -> bool {
        match ev {
            Event::Init => {
                // (A list that failed half-way starts again: what it sent
                // stays applied, as the newer state of those objects.)
                self.list += 1;
                self.listing = true;
                false
            }
            Event::InitApply(obj) => {
                let (key, ev) = K::applied(obj, &self.origin, &mut self.strings);
                self.known.insert(key, self.list);
                self.batch.push(ev);
                self.batch.len() >= BATCH
            }
            Event::InitDone => {
                // What the list did not show is gone. (The map is rebuilt
                // from its sorted entries: full nodes.)
                let (list, listing) = (self.list, self.listing);
                let (kept, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.known).into_iter().partition(|(_, l)| !listing || *l == list);
                self.batch.extend(gone.into_iter().map(|(k, _)| K::deleted(k)));
                self.known = kept.into_iter().collect();
                self.listing = false;
                info!(kind = K::NAME, objects = self.known.len(), "listed");
                if !self.synced {
                    self.synced = true;
                    self.batch.extend(K::synced());
                }
                true
            }
            Event::Apply(obj) => {
                let (key, ev) = K::applied(obj, &self.origin, &mut self.strings);
                self.known.insert(key, self.list);
                self.batch.push(ev);
                true
            }
            Event::Delete(obj) => {
                let key = key_of(&obj);
                self.known.remove(&key);
                self.batch.push(K::deleted(key));
                true
            }
        }
    }

    /// The batch so far.
    fn take(&mut self) -> Vec<SourceEvent> {
        std::mem::take(&mut self.batch)
    }
}

/// Follows one kind until the receiver is gone.
async fn follow<K>(api: Api<K>, config: watcher::Config, tx: mpsc::Sender<Vec<SourceEvent>>)
where
    K: Kind + kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let mut f = Follower::<K>::new();
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    loop {
        // Listed objects go in batches: what the watcher has at hand (a
        // page) is sent before it waits for more.
        let next = if let Some(next) = stream.try_next().now_or_never() {
            next
        } else {
            if !f.batch.is_empty() && tx.send(f.take()).await.is_err() {
                return;
            }
            stream.try_next().await
        };
        let ev = match next {
            Ok(Some(ev)) => ev,
            Ok(None) => return,
            Err(e) => {
                // Why: keep the last known state; the watcher retries with backoff.
                warn!(kind = K::NAME, error = %e, "watch failed; keeping the last known state and retrying");
                continue;
            }
        };
        if f.event(ev) && tx.send(f.take()).await.is_err() {
            return;
        }
    }
}

/// Runs the three watchers, sending their events into `tx`.
pub async fn run(client: Client, node_name: String, tx: mpsc::Sender<Vec<SourceEvent>>) {
    let labels = watcher::Config::default().labels(LABEL_SELECTOR);
    let svc = follow::<Service>(Api::all(client.clone()), labels.clone(), tx.clone());
    let eps = follow::<EndpointSlice>(Api::all(client.clone()), labels, tx.clone());
    let node_cfg = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let node = follow::<Node>(Api::all(client), node_cfg, tx);
    let _ = futures::future::join3(svc, eps, node).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Address, AddressType, ServiceType};

    fn svc(name: &str, rv: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
        }))
        .expect("service")
    }

    /// The events of a batch, as `+name@rv` (applied), `-name` (deleted)
    /// and `synced`.
    fn shown(batch: &[SourceEvent]) -> Vec<String> {
        batch
            .iter()
            .map(|e| match e {
                SourceEvent::ServiceApplied(s) => {
                    format!("+{}@{}", s.key().name, s.meta.resource_version.as_ref().map(ToString::to_string).unwrap_or_default())
                }
                SourceEvent::ServiceDeleted(k) => format!("-{}", k.name),
                SourceEvent::ServicesSynced => "synced".to_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// A list is streamed as it arrives — every listed object is an apply
    /// (the store skips those it holds unchanged), in batches of at most
    /// [`BATCH`] — and nothing is deleted until the list is complete: then
    /// exactly what it did not show. A list that fails half-way and starts
    /// again deletes nothing it showed the second time.
    #[test]
    fn lists_stream_as_applies_and_delete_what_they_did_not_show_once_complete() {
        let mut f = Follower::<Service>::new();
        assert!(!f.event(Event::Init));
        assert!(!f.event(Event::InitApply(svc("a", "1"))));
        assert!(!f.event(Event::InitApply(svc("b", "2"))));
        assert!(f.event(Event::InitDone));
        assert_eq!(shown(&f.take()), ["+a@1", "+b@2", "synced"]);
        assert!(f.event(Event::Apply(svc("c", "3"))));
        assert_eq!(shown(&f.take()), ["+c@3"]);

        // A re-list (after 410): b changed, a is gone, d is new; nothing is
        // deleted before InitDone.
        assert!(!f.event(Event::Init));
        for (name, rv) in [("b", "4"), ("c", "3"), ("d", "5")] {
            assert!(!f.event(Event::InitApply(svc(name, rv))));
        }
        assert_eq!(shown(&f.take()), ["+b@4", "+c@3", "+d@5"], "sent as they come, no delete yet");
        assert!(f.event(Event::InitDone));
        assert_eq!(shown(&f.take()), ["-a"], "what the list did not show, once it is complete");

        // A list that fails half-way (the watcher starts it again with
        // Init): what the second one shows stays.
        assert!(!f.event(Event::Init));
        assert!(!f.event(Event::InitApply(svc("b", "4"))));
        assert!(!f.event(Event::Init));
        for name in ["c", "d"] {
            assert!(!f.event(Event::InitApply(svc(name, if name == "c" { "3" } else { "5" }))));
        }
        assert!(f.event(Event::InitDone));
        assert_eq!(shown(&f.take()), ["+b@4", "+c@3", "+d@5", "-b"], "b was not in the complete list");

        // A long list goes in batches of BATCH.
        assert!(!f.event(Event::Init));
        let mut batches = Vec::new();
        for i in 0..=2 * BATCH {
            if f.event(Event::InitApply(svc(&format!("s{i}"), "9"))) {
                batches.push(f.take().len());
            }
        }
        assert_eq!(batches, [BATCH, BATCH]);
        assert!(f.event(Event::InitDone));
        let last = shown(&f.take());
        assert_eq!(last.len(), 1 + 2, "the rest, then the deletes of c and d: {last:?}");
        assert_eq!(last[1..], ["-c", "-d"]);
        assert!(f.event(Event::Delete(svc("s0", "10"))));
        assert_eq!(shown(&f.take()), ["-s0"]);
    }

    /// A Service and a slice as a real cluster stores them (kubectl's
    /// last-applied annotation, managed fields, owner references): the
    /// records keep what the model, the Events and the metrics read.
    #[test]
    fn records_keep_what_the_model_reads() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "default", "uid": "u1", "resourceVersion": "7",
                "creationTimestamp": "2026-01-01T00:00:00Z", "generateName": "web-",
                "labels": {"app": "web", "service.kubernetes.io/service-proxy-name": "x"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "other": "y"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o", "uid": "u0"}],
                "finalizers": ["f"],
                "managedFields": [{"manager": "kubectl", "operation": "Update"}],
            },
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.96.0.1", "externalIPs": ["203.0.113.9", "banana"],
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}, {"port": 53, "protocol": "SCTP"}],
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                "sessionAffinity": "ClientIP", "loadBalancerSourceRanges": ["10.0.0.0/8"],
            },
            "status": {
                "loadBalancer": {"ingress": [{"ip": "203.0.113.1"}, {"ip": "203.0.113.2", "ipMode": "Proxy"}]},
                "conditions": [{"type": "T", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "R", "message": "m"}],
            },
        }))
        .expect("service");
        let (key, ev) = Service::applied(svc, &ORIGIN.into(), &mut Interner::default());
        assert_eq!(key, ObjectKey::new("default", "web"));
        let SourceEvent::ServiceApplied(r) = ev else { panic!("a Service") };
        let m = &r.meta;
        let text = |s: &Option<crate::store::MetaStr>| s.as_ref().map(ToString::to_string);
        assert_eq!((text(&m.uid).as_deref(), text(&m.resource_version).as_deref(), &*m.origin), (Some("u1"), Some("7"), ORIGIN));
        assert_eq!(r.created, Some("2026-01-01T00:00:00Z".parse().expect("time")));
        assert!(r.other_proxy, "the service-proxy-name label is kept");
        assert_eq!(r.cluster_ips.as_ref().ok(), Some(&vec!["10.96.0.1".parse().expect("ip")]));
        assert_eq!(r.type_, ServiceType::LoadBalancer);
        assert_eq!((r.external_local, r.internal_local, r.health_check_node_port), (true, false, Some(31000)));
        assert_eq!(r.affinity_timeout_s, crate::model::DEFAULT_AFFINITY_TIMEOUT_S);
        assert_eq!(r.external_ips[..], [Address::Ip("203.0.113.9".parse().expect("ip")), Address::Text("banana".into())]);
        assert_eq!(r.ingress_ips[..], ["203.0.113.1".parse::<std::net::IpAddr>().expect("ip")], "ipMode Proxy is left out");
        assert_eq!(r.source_ranges.as_deref().map(<[Box<str>]>::len), Some(1));
        assert_eq!((&*r.ports[0].name, r.ports[0].port, r.ports[0].node_port), ("http", 80, Some(30080)));
        assert_eq!(r.ports[1].protocol.as_ref().ok(), Some(&crate::model::Protocol::Sctp));

        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-abcde", "namespace": "default", "resourceVersion": "8", "uid": "u2",
                "labels": {"kubernetes.io/service-name": "web"},
                "annotations": {crate::store::TRIGGER_TIME: "2026-01-01T00:00:00.5Z", "other": "y"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u1"}],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}],
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "x", "protocol": "SCTP"}],
            "endpoints": [{
                "addresses": ["10.244.0.1", "10.244.0.2"], "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "n1", "zone": "z1", "hostname": "h", "deprecatedTopology": {"a": "b"},
                "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]},
                "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "default", "uid": "p1"},
            }, {"addresses": ["banana"]}],
        }))
        .expect("slice");
        let (key, ev) = EndpointSlice::applied(slice, &ORIGIN.into(), &mut Interner::default());
        assert_eq!(key, ObjectKey::new("default", "web-abcde"));
        let SourceEvent::SliceApplied(s) = ev else { panic!("a slice") };
        assert_eq!((text(&s.meta.uid).as_deref(), text(&s.meta.resource_version).as_deref()), (Some("u2"), Some("8")));
        assert_eq!(s.owner(), Some(ObjectKey::new("default", "web")));
        assert_eq!(s.trigger_time, Some("2026-01-01T00:00:00.5Z".parse().expect("time")));
        assert_eq!(s.address_type, AddressType::IPv4);
        assert_eq!((&*s.ports[0].name, s.ports[0].protocol, s.ports[0].port), ("http", Some(crate::model::Protocol::Tcp), Some(8080)));
        assert_eq!((s.ports[1].protocol, s.ports[1].port), (Some(crate::model::Protocol::Sctp), None));
        let ep = &s.endpoints[0];
        assert_eq!(ep.address(), Some(Address::Ip("10.244.0.1".parse().expect("ip"))), "the first address");
        assert_eq!((ep.ready(), ep.serving(), ep.terminating()), (Some(true), Some(true), Some(false)));
        assert_eq!(ep.node_name(), Some("n1"));
        assert_eq!((&*ep.zone_hints()[0], &*ep.node_hints()[0]), ("z1", "n1"));
        assert_eq!(s.endpoints[1].address(), Some(Address::Text("banana".into())), "kept as given, refused by the model");
        assert!(s.endpoints[1].topology.is_none() && s.endpoints[1].ready().is_none());

        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}, "deletionTimestamp": "2026-01-01T00:00:00Z",
                         "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
            "status": {"images": [{"names": ["a"], "sizeBytes": 1}]},
        }))
        .expect("node");
        let (_, ev) = Node::applied(node, &ORIGIN.into(), &mut Interner::default());
        let SourceEvent::NodeApplied(n) = ev else { panic!("a Node") };
        assert!(n.status.is_none() && n.metadata.managed_fields.is_none() && n.metadata.deletion_timestamp.is_some());
        assert!(n.spec.and_then(|s| s.taints).is_some());
        assert!(n.metadata.labels.is_some_and(|l| l.contains_key("topology.kubernetes.io/zone")));
    }
}
