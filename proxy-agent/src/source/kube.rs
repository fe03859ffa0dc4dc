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
//! the difference from an ordinary update. While the API server is
//! unreachable nothing is sent: the datapath keeps the last known state.
use std::{collections::BTreeSet, path::Path};

use futures::TryStreamExt as _;
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
    store::{ObjectKey, SourceEvent, Stored},
};

/// kube-proxy's label selector for Services and `EndpointSlices`.
pub const LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// Where objects from the API server say they came from.
pub const ORIGIN: &str = "apiserver";

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
    /// Drops what the agent never reads, before the object is kept (see
    /// [`strip_meta`]).
    fn strip(self) -> Self;
    fn applied(s: Stored<Self>) -> SourceEvent;
    fn deleted(k: ObjectKey) -> SourceEvent;
    fn synced() -> Option<SourceEvent>;
    const NAME: &'static str;
}

impl Kind for Service {
    fn strip(mut self) -> Self {
        strip_meta(&mut self.metadata);
        // The model reads `status.loadBalancer` only.
        if let Some(st) = self.status.as_mut() {
            st.conditions = None;
        }
        self
    }
    fn applied(s: Stored<Self>) -> SourceEvent {
        SourceEvent::ServiceApplied(s)
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
    fn strip(mut self) -> Self {
        strip_meta(&mut self.metadata);
        // The model reads `addresses`, `conditions`, `hints` and `nodeName`
        // of an endpoint; `zone` is kept as well (small, and the field
        // topology-aware routing is about).
        for ep in self.endpoints.iter_mut().flatten() {
            ep.target_ref = None;
            ep.hostname = None;
            ep.deprecated_topology = None;
        }
        self
    }
    fn applied(s: Stored<Self>) -> SourceEvent {
        SourceEvent::SliceApplied(s)
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
    fn strip(mut self) -> Self {
        strip_meta(&mut self.metadata);
        // Labels (the zone), `deletionTimestamp` and `spec.taints` are read;
        // the status (images, conditions, addresses) is not.
        self.status = None;
        self
    }
    fn applied(s: Stored<Self>) -> SourceEvent {
        SourceEvent::NodeApplied(Box::new(s.object))
    }
    fn deleted(_: ObjectKey) -> SourceEvent {
        SourceEvent::NodeDeleted
    }
    fn synced() -> Option<SourceEvent> {
        None
    }
    const NAME: &'static str = "Node";
}

/// The one annotation the agent reads (`EndpointSlices`' network
/// programming latency).
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Drops the metadata the agent never reads, so that what it keeps of
/// tens of thousands of objects is what the model needs: `managedFields`,
/// every annotation but [`TRIGGER_TIME`] (kubectl's
/// `last-applied-configuration` repeats the whole object),
/// `ownerReferences`, `finalizers`, `generateName`. Kept: name, namespace,
/// `uid` (Events), `resourceVersion` (replays), `creationTimestamp`
/// (precedence), labels (selectors, the zone), `deletionTimestamp`.
fn strip_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.retain(|k, _| k == TRIGGER_TIME);
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

fn key_of<K: kube::Resource>(obj: &K) -> ObjectKey {
    let m = obj.meta();
    ObjectKey::new(m.namespace.as_deref().unwrap_or(""), m.name.as_deref().unwrap_or(""))
}

/// Follows one kind until the receiver is gone.
async fn follow<K>(api: Api<K>, config: watcher::Config, tx: mpsc::Sender<Vec<SourceEvent>>)
where
    K: Kind + kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let mut known: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut relist: Option<(Vec<K>, BTreeSet<ObjectKey>)> = None;
    let mut synced = false;
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    loop {
        let ev = match stream.try_next().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return,
            Err(e) => {
                // Why: keep the last known state; the watcher retries with backoff.
                warn!(kind = K::NAME, error = %e, "watch failed; keeping the last known state and retrying");
                continue;
            }
        };
        let batch = match ev {
            Event::Init => {
                relist = Some((Vec::new(), BTreeSet::new()));
                continue;
            }
            Event::InitApply(obj) => {
                if let Some((objs, keys)) = relist.as_mut() {
                    keys.insert(key_of(&obj));
                    objs.push(obj.strip());
                }
                continue;
            }
            Event::InitDone => {
                let (objs, keys) = relist.take().unwrap_or_default();
                let mut batch: Vec<SourceEvent> = objs
                    .into_iter()
                    .map(|o| K::applied(Stored { object: o, origin: ORIGIN.to_owned() }))
                    .collect();
                batch.extend(known.difference(&keys).cloned().map(K::deleted));
                info!(kind = K::NAME, objects = keys.len(), "listed");
                known = keys;
                if !synced {
                    synced = true;
                    batch.extend(K::synced());
                }
                batch
            }
            Event::Apply(obj) => {
                known.insert(key_of(&obj));
                vec![K::applied(Stored { object: obj.strip(), origin: ORIGIN.to_owned() })]
            }
            Event::Delete(obj) => {
                let key = key_of(&obj);
                known.remove(&key);
                vec![K::deleted(key)]
            }
        };
        if tx.send(batch).await.is_err() {
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

    #[test]
    fn stripping_keeps_what_the_model_reads() {
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
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
            "status": {
                "loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]},
                "conditions": [{"type": "T", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "R", "message": "m"}],
            },
        }))
        .expect("service");
        let s = svc.strip();
        let m = &s.metadata;
        assert_eq!((m.name.as_deref(), m.namespace.as_deref(), m.uid.as_deref(), m.resource_version.as_deref()), (Some("web"), Some("default"), Some("u1"), Some("7")));
        assert!(m.creation_timestamp.is_some());
        assert_eq!(m.labels.as_ref().map(std::collections::BTreeMap::len), Some(2), "labels are kept");
        assert!(m.annotations.is_none() && m.owner_references.is_none() && m.finalizers.is_none() && m.managed_fields.is_none() && m.generate_name.is_none());
        assert_eq!(s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()), Some("10.96.0.1"));
        let st = s.status.as_ref().expect("status");
        assert!(st.conditions.is_none());
        assert_eq!(st.load_balancer.as_ref().and_then(|l| l.ingress.as_ref()).map(Vec::len), Some(1));

        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-abcde", "namespace": "default", "resourceVersion": "8",
                "labels": {"kubernetes.io/service-name": "web"},
                "annotations": {TRIGGER_TIME: "2026-01-01T00:00:00.5Z", "other": "y"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u1"}],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}],
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{
                "addresses": ["10.244.0.1"], "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "n1", "zone": "z1", "hostname": "h", "deprecatedTopology": {"a": "b"},
                "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]},
                "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "default", "uid": "p1"},
            }],
        }))
        .expect("slice");
        let s = slice.strip();
        let a = s.metadata.annotations.as_ref().expect("the trigger time is kept");
        assert_eq!(a.keys().collect::<Vec<_>>(), vec![TRIGGER_TIME]);
        assert!(s.metadata.owner_references.is_none() && s.metadata.managed_fields.is_none());
        assert_eq!(s.metadata.labels.as_ref().and_then(|l| l.get(crate::model::LABEL_SERVICE_NAME)).map(String::as_str), Some("web"));
        let ep = &s.endpoints.as_ref().expect("endpoints")[0];
        assert_eq!(ep.addresses, vec!["10.244.0.1".to_owned()]);
        assert_eq!(ep.conditions.as_ref().and_then(|c| c.serving), Some(true));
        assert_eq!((ep.node_name.as_deref(), ep.zone.as_deref()), (Some("n1"), Some("z1")));
        assert!(ep.hints.as_ref().is_some_and(|h| h.for_zones.is_some() && h.for_nodes.is_some()));
        assert!(ep.target_ref.is_none() && ep.hostname.is_none() && ep.deprecated_topology.is_none());
        assert_eq!(s.ports.as_ref().map(Vec::len), Some(1));

        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}, "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
            "status": {"images": [{"names": ["a"], "sizeBytes": 1}]},
        }))
        .expect("node");
        let n = node.strip();
        assert!(n.status.is_none() && n.metadata.deletion_timestamp.is_some() && n.spec.and_then(|s| s.taints).is_some());
        assert!(n.metadata.labels.is_some_and(|l| l.contains_key("topology.kubernetes.io/zone")));
    }
}
