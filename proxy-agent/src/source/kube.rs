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
use k8s_openapi::api::{core::v1::{Node, Service}, discovery::v1::EndpointSlice};
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
    fn applied(s: Stored<Self>) -> SourceEvent;
    fn deleted(k: ObjectKey) -> SourceEvent;
    fn synced() -> Option<SourceEvent>;
    const NAME: &'static str;
}

impl Kind for Service {
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

/// Drops what the agent never reads, to save memory at scale.
fn strip<K: kube::Resource>(mut obj: K) -> K {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    obj
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
                    objs.push(strip(obj));
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
                vec![K::applied(Stored { object: strip(obj), origin: ORIGIN.to_owned() })]
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
