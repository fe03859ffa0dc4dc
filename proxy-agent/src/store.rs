//! The objects the sources delivered, as the model reads them. Both sources
//! (manifests directory, API server) feed it the same [`SourceEvent`]s.
use std::{collections::BTreeMap, fmt};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// `namespace/name` of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

#[derive(Clone, Debug, Default)]
pub struct Store {
    pub services: BTreeMap<ObjectKey, Stored<Service>>,
    pub slices: BTreeMap<ObjectKey, Stored<EndpointSlice>>,
    /// The agent's own Node, when the source knows it.
    pub node: Option<Node>,
    pub services_synced: bool,
    pub slices_synced: bool,
}

impl Store {
    /// Applies one event; returns whether the desired state may have changed.
    pub fn apply(&mut self, event: SourceEvent) -> bool {
        match event {
            SourceEvent::ServiceApplied(s) => {
                let key = ObjectKey::of(&s.object.metadata);
                self.services.insert(key, s);
                true
            }
            SourceEvent::ServiceDeleted(key) => self.services.remove(&key).is_some(),
            SourceEvent::SliceApplied(s) => {
                let key = ObjectKey::of(&s.object.metadata);
                self.slices.insert(key, s);
                true
            }
            SourceEvent::SliceDeleted(key) => self.slices.remove(&key).is_some(),
            SourceEvent::NodeApplied(n) => {
                let changed = self.node.as_ref() != Some(&*n);
                self.node = Some(*n);
                changed
            }
            SourceEvent::NodeDeleted => self.node.take().is_some(),
            SourceEvent::ServicesSynced => !std::mem::replace(&mut self.services_synced, true),
            SourceEvent::SlicesSynced => !std::mem::replace(&mut self.slices_synced, true),
        }
    }

    /// kube-proxy programs nothing and prunes nothing before both initial
    /// lists are complete (`OnServiceSynced` + `OnEndpointSlicesSynced`).
    #[must_use]
    pub fn synced(&self) -> bool {
        self.services_synced && self.slices_synced
    }
}
