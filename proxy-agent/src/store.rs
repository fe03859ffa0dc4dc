//! The objects the sources delivered, as the model reads them. Both sources
//! (manifests directory, API server) feed it the same [`SourceEvent`]s.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// `namespace/name` of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    #[must_use]
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The key of an object's metadata (`default` namespace when unset, as
    /// kubectl applies it).
    #[must_use]
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or(""),
        )
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An object and where it came from (a file path, or `apiserver`), so that
/// a rejection can name both.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored<T> {
    pub object: T,
    pub origin: String,
}

/// What a source reports.
#[derive(Clone, Debug)]
#[expect(clippy::large_enum_variant, reason = "short-lived, moved once into the store")]
pub enum SourceEvent {
    ServiceApplied(Stored<Service>),
    ServiceDeleted(ObjectKey),
    SliceApplied(Stored<EndpointSlice>),
    SliceDeleted(ObjectKey),
    /// The agent's own Node (its labels give the zone).
    NodeApplied(Box<Node>),
    NodeDeleted,
    /// The initial list of Services is complete.
    ServicesSynced,
    /// The initial list of `EndpointSlices` is complete.
    SlicesSynced,
}

/// What an applied event may change in the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing the datapath shows (a Node change that moves no zone).
    None,
    /// The frontends of these Services.
    Services(Vec<ObjectKey>),
    /// Anything (the node's zone; the initial lists completing).
    All,
}

impl Change {
    #[must_use]
    pub fn any(&self) -> bool {
        *self != Self::None
    }
}

#[derive(Clone, Debug, Default)]
pub struct Store {
    pub services: BTreeMap<ObjectKey, Stored<Service>>,
    /// Mutate through [`Store::apply`], which keeps `slices_by_service`.
    pub slices: BTreeMap<ObjectKey, Stored<EndpointSlice>>,
    /// The `EndpointSlices` of each Service (by their
    /// `kubernetes.io/service-name` label, in their namespace).
    slices_by_service: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// The agent's own Node, when the source knows it.
    pub node: Option<Node>,
    pub services_synced: bool,
    pub slices_synced: bool,
}

/// The Service a slice belongs to.
fn owner(key: &ObjectKey, slice: &EndpointSlice) -> Option<ObjectKey> {
    let name = slice.metadata.labels.as_ref()?.get(crate::model::LABEL_SERVICE_NAME)?;
    Some(ObjectKey::new(&key.namespace, name))
}

/// The zone label of a Node (what the model reads of it).
fn zone(node: Option<&Node>) -> Option<&String> {
    node?.metadata.labels.as_ref()?.get("topology.kubernetes.io/zone")
}

impl Store {
    /// Applies one event; returns what in the desired state it may change
    /// (as kube-proxy's change trackers: the Services touched, so a sync
    /// recomputes only those).
    pub fn apply(&mut self, event: SourceEvent) -> Change {
        if self.is_replay(&event) {
            return Change::None;
        }
        match event {
            SourceEvent::ServiceApplied(s) => {
                let key = ObjectKey::of(&s.object.metadata);
                self.services.insert(key.clone(), s);
                Change::Services(vec![key])
            }
            SourceEvent::ServiceDeleted(key) => match self.services.remove(&key) {
                Some(_) => Change::Services(vec![key]),
                None => Change::None,
            },
            SourceEvent::SliceApplied(s) => {
                let key = ObjectKey::of(&s.object.metadata);
                let new_owner = owner(&key, &s.object);
                let old = self.slices.insert(key.clone(), s);
                let old_owner = old.and_then(|o| owner(&key, &o.object));
                self.reindex(&key, old_owner.as_ref(), new_owner.as_ref());
                Change::Services(old_owner.into_iter().chain(new_owner).collect::<BTreeSet<_>>().into_iter().collect())
            }
            SourceEvent::SliceDeleted(key) => match self.slices.remove(&key) {
                Some(old) => {
                    let old_owner = owner(&key, &old.object);
                    self.reindex(&key, old_owner.as_ref(), None);
                    Change::Services(old_owner.into_iter().collect())
                }
                None => Change::None,
            },
            SourceEvent::NodeApplied(n) => {
                let moved = zone(self.node.as_ref()) != zone(Some(&n));
                self.node = Some(*n);
                if moved { Change::All } else { Change::None }
            }
            SourceEvent::NodeDeleted => {
                let moved = zone(self.node.as_ref()).is_some();
                self.node = None;
                if moved { Change::All } else { Change::None }
            }
            SourceEvent::ServicesSynced => Self::first(&mut self.services_synced),
            SourceEvent::SlicesSynced => Self::first(&mut self.slices_synced),
        }
    }

    /// Whether `event` applies an object exactly as stored (a re-list or
    /// a resync replaying it): nothing to recompute, no change to count.
    #[must_use]
    pub fn is_replay(&self, event: &SourceEvent) -> bool {
        fn same<T: PartialEq>(old: Option<&Stored<T>>, new: &Stored<T>, rv: impl Fn(&T) -> Option<&String>) -> bool {
            old.is_some_and(|o| match (rv(&o.object), rv(&new.object)) {
                (Some(a), Some(b)) => a == b,
                _ => o.object == new.object,
            })
        }
        match event {
            SourceEvent::ServiceApplied(s) => {
                same(self.services.get(&ObjectKey::of(&s.object.metadata)), s, |o| o.metadata.resource_version.as_ref())
            }
            SourceEvent::SliceApplied(s) => {
                same(self.slices.get(&ObjectKey::of(&s.object.metadata)), s, |o| o.metadata.resource_version.as_ref())
            }
            _ => false,
        }
    }

    fn first(flag: &mut bool) -> Change {
        if std::mem::replace(flag, true) { Change::None } else { Change::All }
    }

    fn reindex(&mut self, slice: &ObjectKey, old: Option<&ObjectKey>, new: Option<&ObjectKey>) {
        if let Some(o) = old
            && let Some(set) = self.slices_by_service.get_mut(o) {
                set.remove(slice);
                if set.is_empty() {
                    self.slices_by_service.remove(o);
                }
            }
        if let Some(n) = new {
            self.slices_by_service.entry(n.clone()).or_default().insert(slice.clone());
        }
    }

    /// The `EndpointSlices` of Service `service`.
    pub fn slices_of(&self, service: &ObjectKey) -> Vec<&Stored<EndpointSlice>> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .collect()
    }

    /// kube-proxy programs nothing and prunes nothing before both initial
    /// lists are complete (`OnServiceSynced` + `OnEndpointSlicesSynced`).
    #[must_use]
    pub fn synced(&self) -> bool {
        self.services_synced && self.slices_synced
    }
}
