//! The objects the sources delivered, as the model reads them. Both sources
//! (manifests directory, API server) feed it the same [`SourceEvent`]s.
//!
//! What is kept of a Service or an `EndpointSlice` is a compact record
//! ([`ServiceRecord`], [`SliceRecord`]) built when the object arrives: the
//! fields the model, the Events and the metrics read, parsed (addresses,
//! protocols, timestamps), with what repeats across objects (namespaces,
//! port names, the origin; an endpoint's node name and hints) shared
//! through an [`Interner`]. Whatever the model reports a refusal about is
//! kept as given (an address that does not parse, an unknown protocol, an
//! out-of-range port), so a refusal names the same value with the same
//! text as it would from the whole object.
use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::model::{Cause, Protocol};

/// `namespace/name` of an object. Clones share the strings.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    #[must_use]
    pub fn new(namespace: &str, name: &str) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
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

    /// [`ObjectKey::of`] with the namespace shared through `strings`.
    fn interned(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, strings: &mut Interner) -> Self {
        Self {
            namespace: strings.get(meta.namespace.as_deref().unwrap_or("default")),
            name: meta.name.as_deref().unwrap_or("").into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Shares the values that repeat across objects — strings (namespaces,
/// port names, node and zone names, origins) and endpoint topologies —: one
/// allocation each, however many objects hold it. Values no object holds
/// any more are dropped when a table has doubled since its last sweep, so
/// a churn of namespaces or nodes does not grow it without bound.
#[derive(Debug, Default)]
pub struct Interner {
    strings: Table<str>,
    topologies: Table<Topology>,
}

#[derive(Debug)]
struct Table<T: ?Sized> {
    values: HashSet<Arc<T>>,
    sweep_at: usize,
}

impl<T: ?Sized> Default for Table<T> {
    fn default() -> Self {
        Self { values: HashSet::new(), sweep_at: 0 }
    }
}

impl<T: ?Sized + std::hash::Hash + Eq> Table<T> {
    fn find(&self, v: &T) -> Option<Arc<T>> {
        self.values.get(v).cloned()
    }

    fn insert(&mut self, a: Arc<T>) -> Arc<T> {
        if self.values.len() >= self.sweep_at {
            self.values.retain(|a| Arc::strong_count(a) > 1);
            self.sweep_at = (2 * self.values.len()).max(64);
        }
        self.values.insert(a.clone());
        a
    }
}

impl Interner {
    /// The shared copy of `s`.
    pub fn get(&mut self, s: &str) -> Arc<str> {
        self.strings.find(s).unwrap_or_else(|| self.strings.insert(Arc::from(s)))
    }

    fn opt(&mut self, s: Option<&str>) -> Option<Arc<str>> {
        s.map(|s| self.get(s))
    }

    /// The shared copy of `t`.
    fn topology(&mut self, t: Topology) -> Arc<Topology> {
        self.topologies.find(&t).unwrap_or_else(|| self.topologies.insert(Arc::new(t)))
    }
}

/// A metadata string (`uid`, `resourceVersion`) kept small: as the number
/// or the UUID it is when the text is that value's canonical form (decimal;
/// lowercase 8-4-4-4-12 hex), else as the text. Equal texts, equal values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaStr {
    Number(u64),
    /// The 16 bytes of a UUID.
    Uuid([u64; 2]),
    Text(Box<str>),
}

impl MetaStr {
    #[must_use]
    pub fn new(s: &str) -> Self {
        if let Ok(n) = s.parse::<u64>()
            && n.to_string() == s
        {
            return Self::Number(n);
        }
        let hex: String = s.split('-').collect();
        let dashes: Vec<usize> = s.split('-').map(str::len).collect();
        if dashes == [8, 4, 4, 4, 12] && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && let (Ok(hi), Ok(lo)) = (u64::from_str_radix(&hex[..16], 16), u64::from_str_radix(&hex[16..], 16))
        {
            return Self::Uuid([hi, lo]);
        }
        Self::Text(s.into())
    }
}

impl fmt::Display for MetaStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Uuid([hi, lo]) => {
                let h = format!("{hi:016x}{lo:016x}");
                write!(f, "{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
            }
            Self::Text(s) => f.write_str(s),
        }
    }
}

/// The metadata every record keeps: the key, where it came from (a file
/// path, or `apiserver`, so that a rejection can name both), `uid`
/// (Events) and `resourceVersion` (replays, Events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    pub key: ObjectKey,
    pub origin: Arc<str>,
    pub uid: Option<MetaStr>,
    pub resource_version: Option<MetaStr>,
}

impl RecordMeta {
    fn new(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, origin: Arc<str>, strings: &mut Interner) -> Self {
        Self {
            key: ObjectKey::interned(meta, strings),
            origin,
            uid: meta.uid.as_deref().map(MetaStr::new),
            resource_version: meta.resource_version.as_deref().map(MetaStr::new),
        }
    }
}

/// `spec.type` as the model tells types apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    /// `ClusterIP` (or unset), `ExternalName` or anything else: no node ports.
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// A Service port as the model reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortRecord {
    /// `""` when unnamed.
    pub name: Arc<str>,
    /// The protocol (unset: TCP), or why it is refused.
    pub protocol: Result<Protocol, Box<(Cause, String)>>,
    /// As given (the model refuses one out of range, naming it).
    pub port: i32,
    pub node_port: Option<i32>,
}

/// An address as given: parsed when its text is the address' canonical
/// form (then the text is the address printed), else the text (parsed
/// again where it is read: rare).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Address {
    Ip(IpAddr),
    Text(Box<str>),
}

impl Address {
    #[must_use]
    pub fn new(s: &str) -> Self {
        match s.parse::<IpAddr>() {
            Ok(a) if a.to_string() == s => Self::Ip(a),
            _ => Self::Text(s.into()),
        }
    }

    /// The address, as `str::parse` gives it from the text.
    pub fn parse(&self) -> Result<IpAddr, std::net::AddrParseError> {
        match self {
            Self::Ip(a) => Ok(*a),
            Self::Text(s) => s.parse(),
        }
    }

    /// The text as given.
    #[must_use]
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            Self::Ip(a) => Cow::Owned(a.to_string()),
            Self::Text(s) => Cow::Borrowed(s),
        }
    }
}

/// A Service as the model reads it.
#[derive(Clone, Debug, PartialEq)]
#[expect(clippy::struct_excessive_bools, reason = "independent fields of the Service, each read by the model")]
pub struct ServiceRecord {
    pub meta: RecordMeta,
    /// `creationTimestamp` (precedence among Services).
    pub created: Option<jiff::Timestamp>,
    /// Labelled `service.kubernetes.io/service-proxy-name`: another proxy's.
    pub other_proxy: bool,
    /// The cluster IPs (the first of each family); empty when the Service
    /// is not proxied (headless, `ExternalName`); or why they are refused
    /// (no spec, no clusterIP, an invalid one).
    pub cluster_ips: Result<Vec<IpAddr>, Box<(Cause, String)>>,
    pub type_: ServiceType,
    /// `type: LoadBalancer` with `externalTrafficPolicy: Local` and a port
    /// needs a health check port: this one (when in range).
    pub health_check_node_port: Option<u16>,
    pub ports: Box<[ServicePortRecord]>,
    pub external_ips: Box<[Address]>,
    /// `status.loadBalancer.ingress` IPs that parse, but those with
    /// `ipMode: Proxy` (the load balancer itself proxies to the nodes).
    pub ingress_ips: Box<[IpAddr]>,
    pub internal_local: bool,
    pub external_local: bool,
    /// `trafficDistribution: PreferSameNode`.
    pub prefer_same_node: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds (0: none).
    pub affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges` as given, when not empty.
    pub source_ranges: Option<Box<[Box<str>]>>,
}

impl ServiceRecord {
    /// What the model reads of `svc`.
    #[must_use]
    pub fn new(svc: &Service, origin: Arc<str>, strings: &mut Interner) -> Self {
        let meta = &svc.metadata;
        let spec = svc.spec.as_ref();
        let type_ = match spec.and_then(|s| s.type_.as_deref()) {
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            _ => ServiceType::ClusterIp,
        };
        let ports: Box<[ServicePortRecord]> = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .map(|p| ServicePortRecord {
                name: strings.get(p.name.as_deref().unwrap_or("")),
                protocol: crate::model::parse_protocol(p.protocol.as_deref()).map_err(Box::new),
                port: p.port,
                node_port: p.node_port,
            })
            .collect();
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        let policy = |p: Option<&String>| p.map(String::as_str) == Some("Local");
        Self {
            meta: RecordMeta::new(meta, origin, strings),
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
            other_proxy: meta.labels.as_ref().is_some_and(|l| l.contains_key(crate::model::LABEL_SERVICE_PROXY_NAME)),
            cluster_ips: crate::model::cluster_ips(svc).map_err(Box::new),
            type_,
            health_check_node_port: spec.and_then(|s| s.health_check_node_port).and_then(crate::model::port_in_range),
            ports,
            external_ips: spec.and_then(|s| s.external_ips.as_ref()).into_iter().flatten().map(|s| Address::new(s)).collect(),
            ingress_ips: ingress
                .into_iter()
                .flatten()
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.as_deref()?.parse().ok())
                .collect(),
            internal_local: policy(spec.and_then(|s| s.internal_traffic_policy.as_ref())),
            external_local: policy(spec.and_then(|s| s.external_traffic_policy.as_ref())),
            prefer_same_node: spec.and_then(|s| s.traffic_distribution.as_deref()) == Some("PreferSameNode"),
            affinity_timeout_s: crate::model::session_affinity_timeout(spec),
            source_ranges: spec
                .and_then(|s| s.load_balancer_source_ranges.as_ref())
                .filter(|r| !r.is_empty())
                .map(|r| r.iter().map(|s| s.as_str().into()).collect()),
        }
    }

    /// [`ServiceRecord::new`] with strings of its own (tests, one-offs).
    #[must_use]
    pub fn of(svc: &Service, origin: &str) -> Self {
        Self::new(svc, origin.into(), &mut Interner::default())
    }

    #[must_use]
    pub fn key(&self) -> &ObjectKey {
        &self.meta.key
    }
}

/// `addressType` as the model tells them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressType {
    IPv4,
    IPv6,
    Fqdn,
    /// Anything else: matches no family.
    Other,
}

impl AddressType {
    fn new(s: &str) -> Self {
        match s {
            "IPv4" => Self::IPv4,
            "IPv6" => Self::IPv6,
            "FQDN" => Self::Fqdn,
            _ => Self::Other,
        }
    }
}

/// A port of an `EndpointSlice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortRecord {
    /// `""` when unnamed.
    pub name: Arc<str>,
    /// `None`: a protocol that is not TCP or UDP (matches no Service port).
    pub protocol: Option<Protocol>,
    /// As given (a missing or out-of-range one is refused by name).
    pub port: Option<i32>,
}

/// Where an endpoint runs (`nodeName`) and its topology hints: one shared
/// value for all the endpoints that have the same (most endpoints of a
/// node), see [`Interner`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Topology {
    pub node_name: Option<Arc<str>>,
    /// `hints.forZones` names.
    pub zone_hints: Box<[Arc<str>]>,
    /// `hints.forNodes` names.
    pub node_hints: Box<[Arc<str>]>,
}

/// An endpoint as the model reads it, in 24 bytes (ten per slice: 500,000
/// of them at 50,000 Services): an IPv4 address and the three conditions
/// packed in one word, any other address (IPv6, or a text that is not an
/// address in canonical form) boxed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    /// The IPv4 address when [`ADDR_V4`] (host order).
    v4: u32,
    /// Bits 0–1: the address ([`ADDR_NONE`], [`ADDR_V4`], [`ADDR_OTHER`]);
    /// bits 2–3, 4–5, 6–7: `ready`, `serving`, `terminating` (0 unset,
    /// 1 false, 2 true).
    bits: u8,
    /// The address when [`ADDR_OTHER`].
    other: Option<Box<Address>>,
    /// `None`: no `nodeName` and no hints.
    pub topology: Option<Arc<Topology>>,
}

const ADDR_NONE: u8 = 0;
const ADDR_V4: u8 = 1;
const ADDR_OTHER: u8 = 2;

const _: () = assert!(std::mem::size_of::<EndpointRecord>() == 24);

impl EndpointRecord {
    /// `address`: the first address (`None`: none given); the conditions
    /// `ready`, `serving`, `terminating` as given.
    #[must_use]
    pub fn new(address: Option<Address>, ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>, topology: Option<Arc<Topology>>) -> Self {
        let cond = |c: Option<bool>| c.map_or(0, |b| 1 + u8::from(b));
        let conds = cond(ready) << 2 | cond(serving) << 4 | cond(terminating) << 6;
        let (kind, v4, other) = match address {
            None => (ADDR_NONE, 0, None),
            Some(Address::Ip(IpAddr::V4(a))) => (ADDR_V4, u32::from(a), None),
            Some(a) => (ADDR_OTHER, 0, Some(Box::new(a))),
        };
        Self { v4, bits: kind | conds, other, topology }
    }

    /// The first address (`None`: none given).
    #[must_use]
    pub fn address(&self) -> Option<Address> {
        match self.bits & 3 {
            ADDR_V4 => Some(Address::Ip(IpAddr::V4(std::net::Ipv4Addr::from(self.v4)))),
            ADDR_OTHER => self.other.as_deref().cloned(),
            _ => None,
        }
    }

    fn condition(&self, shift: u8) -> Option<bool> {
        match (self.bits >> shift) & 3 {
            0 => None,
            c => Some(c == 2),
        }
    }

    /// `conditions.ready` as given.
    #[must_use]
    pub fn ready(&self) -> Option<bool> {
        self.condition(2)
    }

    /// `conditions.serving` as given.
    #[must_use]
    pub fn serving(&self) -> Option<bool> {
        self.condition(4)
    }

    /// `conditions.terminating` as given.
    #[must_use]
    pub fn terminating(&self) -> Option<bool> {
        self.condition(6)
    }

    #[must_use]
    pub fn node_name(&self) -> Option<&str> {
        self.topology.as_ref()?.node_name.as_deref()
    }

    #[must_use]
    pub fn zone_hints(&self) -> &[Arc<str>] {
        self.topology.as_ref().map_or(&[], |t| &t.zone_hints)
    }

    #[must_use]
    pub fn node_hints(&self) -> &[Arc<str>] {
        self.topology.as_ref().map_or(&[], |t| &t.node_hints)
    }
}

/// An `EndpointSlice` as the model (and the metrics) read it.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceRecord {
    pub meta: RecordMeta,
    /// The `kubernetes.io/service-name` label: the Service it belongs to,
    /// in its namespace.
    pub service: Option<Arc<str>>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation
    /// (network programming latency), when it parses.
    pub trigger_time: Option<jiff::Timestamp>,
    pub address_type: AddressType,
    pub ports: Box<[SlicePortRecord]>,
    pub endpoints: Box<[EndpointRecord]>,
}

/// The one annotation the agent reads (`EndpointSlices`' network
/// programming latency).
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl SliceRecord {
    /// What the model reads of `slice`.
    #[must_use]
    pub fn new(slice: &EndpointSlice, origin: Arc<str>, strings: &mut Interner) -> Self {
        let meta = &slice.metadata;
        let names = |strings: &mut Interner, v: Option<Vec<&str>>| -> Box<[Arc<str>]> {
            v.into_iter().flatten().map(|n| strings.get(n)).collect()
        };
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .map(|ep| {
                let c = ep.conditions.as_ref();
                let h = ep.hints.as_ref();
                let topology = Topology {
                    node_name: strings.opt(ep.node_name.as_deref()),
                    zone_hints: names(strings, h.and_then(|h| h.for_zones.as_ref()).map(|z| z.iter().map(|z| z.name.as_str()).collect())),
                    node_hints: names(strings, h.and_then(|h| h.for_nodes.as_ref()).map(|n| n.iter().map(|n| n.name.as_str()).collect())),
                };
                EndpointRecord::new(
                    ep.addresses.first().map(|a| Address::new(a)),
                    c.and_then(|c| c.ready),
                    c.and_then(|c| c.serving),
                    c.and_then(|c| c.terminating),
                    (topology != Topology::default()).then(|| strings.topology(topology)),
                )
            })
            .collect();
        Self {
            meta: RecordMeta::new(meta, origin, strings),
            // (One name per Service: not worth sharing.)
            service: meta.labels.as_ref().and_then(|l| l.get(crate::model::LABEL_SERVICE_NAME)).map(|s| Arc::from(s.as_str())),
            trigger_time: meta.annotations.as_ref().and_then(|a| a.get(TRIGGER_TIME)).and_then(|t| t.parse().ok()),
            address_type: AddressType::new(&slice.address_type),
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePortRecord {
                    name: strings.get(p.name.as_deref().unwrap_or("")),
                    protocol: crate::model::parse_protocol(p.protocol.as_deref()).ok(),
                    port: p.port,
                })
                .collect(),
            endpoints,
        }
    }

    /// [`SliceRecord::new`] with strings of its own (tests, one-offs).
    #[must_use]
    pub fn of(slice: &EndpointSlice, origin: &str) -> Self {
        Self::new(slice, origin.into(), &mut Interner::default())
    }

    #[must_use]
    pub fn key(&self) -> &ObjectKey {
        &self.meta.key
    }

    /// The Service it belongs to.
    #[must_use]
    pub fn owner(&self) -> Option<ObjectKey> {
        Some(ObjectKey { namespace: self.meta.key.namespace.clone(), name: self.service.clone()? })
    }
}

/// What a source reports.
#[derive(Clone, Debug)]
pub enum SourceEvent {
    ServiceApplied(Box<ServiceRecord>),
    ServiceDeleted(ObjectKey),
    SliceApplied(Box<SliceRecord>),
    SliceDeleted(ObjectKey),
    /// The agent's own Node (its labels give the zone).
    NodeApplied(Box<Node>),
    NodeDeleted,
    /// The initial list of Services is complete.
    ServicesSynced,
    /// The initial list of `EndpointSlices` is complete.
    SlicesSynced,
}

impl SourceEvent {
    /// `svc` from `origin`, applied (tests, one-offs).
    #[must_use]
    pub fn service(svc: &Service, origin: &str) -> Self {
        Self::ServiceApplied(Box::new(ServiceRecord::of(svc, origin)))
    }

    /// `slice` from `origin`, applied (tests, one-offs).
    #[must_use]
    pub fn slice(slice: &EndpointSlice, origin: &str) -> Self {
        Self::SliceApplied(Box::new(SliceRecord::of(slice, origin)))
    }
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
    pub services: BTreeMap<ObjectKey, Box<ServiceRecord>>,
    /// Mutate through [`Store::apply`], which keeps `slices_by_service`.
    pub slices: BTreeMap<ObjectKey, Box<SliceRecord>>,
    /// (Service, slice) for the `EndpointSlices` of each Service (by their
    /// `kubernetes.io/service-name` label, in their namespace).
    slices_by_service: BTreeSet<(ObjectKey, ObjectKey)>,
    /// The agent's own Node, when the source knows it.
    pub node: Option<Node>,
    pub services_synced: bool,
    pub slices_synced: bool,
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
                let key = s.key().clone();
                self.services.insert(key.clone(), s);
                Change::Services(vec![key])
            }
            SourceEvent::ServiceDeleted(key) => match self.services.remove(&key) {
                Some(_) => Change::Services(vec![key]),
                None => Change::None,
            },
            SourceEvent::SliceApplied(mut s) => {
                // The Service's name, shared with the Service's key when it
                // is known (one allocation less per slice).
                if let Some(owner) = s.owner()
                    && let Some((k, _)) = self.services.get_key_value(&owner)
                {
                    s.service = Some(k.name.clone());
                }
                let key = s.key().clone();
                let new_owner = s.owner();
                let old = self.slices.insert(key.clone(), s);
                let old_owner = old.and_then(|o| o.owner());
                self.reindex(&key, old_owner.as_ref(), new_owner.as_ref());
                Change::Services(old_owner.into_iter().chain(new_owner).collect::<BTreeSet<_>>().into_iter().collect())
            }
            SourceEvent::SliceDeleted(key) => match self.slices.remove(&key) {
                Some(old) => {
                    let old_owner = old.owner();
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
    /// Objects that carry a `resourceVersion` are compared by it, others
    /// by what is kept of them.
    #[must_use]
    pub fn is_replay(&self, event: &SourceEvent) -> bool {
        fn same<T: PartialEq>(old: Option<&T>, new: &T, meta: impl Fn(&T) -> &RecordMeta) -> bool {
            old.is_some_and(|o| match (&meta(o).resource_version, &meta(new).resource_version) {
                (Some(a), Some(b)) => a == b,
                _ => o == new,
            })
        }
        match event {
            SourceEvent::ServiceApplied(s) => same(self.services.get(s.key()).map(AsRef::as_ref), s, |o| &o.meta),
            SourceEvent::SliceApplied(s) => same(self.slices.get(s.key()).map(AsRef::as_ref), s, |o| &o.meta),
            _ => false,
        }
    }

    fn first(flag: &mut bool) -> Change {
        if std::mem::replace(flag, true) { Change::None } else { Change::All }
    }

    fn reindex(&mut self, slice: &ObjectKey, old: Option<&ObjectKey>, new: Option<&ObjectKey>) {
        if let Some(o) = old {
            self.slices_by_service.remove(&(o.clone(), slice.clone()));
        }
        if let Some(n) = new {
            self.slices_by_service.insert((n.clone(), slice.clone()));
        }
    }

    /// The `EndpointSlices` of Service `service`.
    pub fn slices_of(&self, service: &ObjectKey) -> Vec<&SliceRecord> {
        self.slices_by_service
            .range((service.clone(), ObjectKey::default())..)
            .take_while(|(s, _)| s == service)
            .filter_map(|(_, k)| self.slices.get(k).map(AsRef::as_ref))
            .collect()
    }

    /// Rebuilds the maps from their ordered entries: filled in key order
    /// (as a list fills them), their nodes are about half full; built at
    /// once from sorted entries, full. For after the initial lists.
    pub fn compact(&mut self) {
        self.services = std::mem::take(&mut self.services).into_iter().collect();
        self.slices = std::mem::take(&mut self.slices).into_iter().collect();
        self.slices_by_service = std::mem::take(&mut self.slices_by_service).into_iter().collect();
    }

    /// kube-proxy programs nothing and prunes nothing before both initial
    /// lists are complete (`OnServiceSynced` + `OnEndpointSlicesSynced`).
    #[must_use]
    pub fn synced(&self) -> bool {
        self.services_synced && self.slices_synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_record_gives_back_every_address_and_condition_it_was_built_with() {
        let conds = [None, Some(false), Some(true)];
        let addrs = [None, Some(Address::new("10.244.0.1")), Some(Address::new("fd00::1")), Some(Address::new("banana")), Some(Address::new("010.1.1.1"))];
        for a in &addrs {
            for r in conds {
                for sv in conds {
                    for t in conds {
                        let e = EndpointRecord::new(a.clone(), r, sv, t, None);
                        assert_eq!((e.address(), e.ready(), e.serving(), e.terminating()), (a.clone(), r, sv, t));
                    }
                }
            }
        }
    }

    #[test]
    fn addresses_keep_their_text() {
        for s in ["10.0.0.1", "fd00::1"] {
            assert_eq!(Address::new(s), Address::Ip(s.parse().expect("ip")));
            assert_eq!(Address::new(s).text(), s);
        }
        // Not canonical, or not an address: the text, parsed again where read.
        for s in ["FD00::1", "fd00:0::1", "banana", "10.0.0.300", ""] {
            let a = Address::new(s);
            assert_eq!(a, Address::Text(s.into()));
            assert_eq!(a.text(), s);
            assert_eq!(a.parse().ok(), s.parse::<IpAddr>().ok());
        }
    }

    #[test]
    fn metadata_strings_keep_their_text() {
        for (s, number, uuid) in [
            ("42", true, false),
            ("0", true, false),
            ("042", false, false),
            ("18446744073709551616", false, false),
            ("", false, false),
            ("3f2a7c1e-9b4d-4e6f-8a2b-1c3d5e7f9a0b", false, true),
            ("3F2A7C1E-9B4D-4E6F-8A2B-1C3D5E7F9A0B", false, false),
            ("3f2a7c1e9b4d4e6f8a2b1c3d5e7f9a0b", false, false),
            ("3f2a7c1e-9b4d-4e6f-8a2b-1c3d5e7f9a0", false, false),
            ("3f2a7c1e-9b4d-4e6f-8a2b-1c3d5e7f9a0g", false, false),
            ("u1", false, false),
        ] {
            let m = MetaStr::new(s);
            assert_eq!(m.to_string(), s);
            assert_eq!((matches!(m, MetaStr::Number(_)), matches!(m, MetaStr::Uuid(_))), (number, uuid), "{s:?}");
        }
    }

    #[test]
    fn interned_strings_are_shared_and_unused_ones_swept() {
        let mut strings = Interner::default();
        let a = strings.get("default");
        assert!(Arc::ptr_eq(&a, &strings.get("default")));
        drop(a);
        for i in 0..200 {
            let _ = strings.get(&format!("ns{i}"));
        }
        assert!(strings.strings.values.len() < 200, "strings no one holds are swept: {}", strings.strings.values.len());

        // Endpoints on one node (without hints) share their topology.
        let mut slice = |name: &str| -> SliceRecord {
            let s: EndpointSlice = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "default"},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "n1"}, {"addresses": ["10.0.0.2"], "nodeName": "n1"},
                              {"addresses": ["10.0.0.3"], "nodeName": "n1", "hints": {"forZones": [{"name": "z"}]}}, {"addresses": ["10.0.0.4"]}],
            }))
            .expect("slice");
            SliceRecord::new(&s, "test".into(), &mut strings)
        };
        let (a, b) = (slice("a"), slice("b"));
        let t = |r: &SliceRecord, i: usize| r.endpoints[i].topology.clone().expect("topology");
        assert!(Arc::ptr_eq(&t(&a, 0), &t(&a, 1)) && Arc::ptr_eq(&t(&a, 0), &t(&b, 1)));
        assert!(!Arc::ptr_eq(&t(&a, 0), &t(&a, 2)), "hints make another topology");
        assert_eq!((a.endpoints[2].node_name(), &*a.endpoints[2].zone_hints()[0]), (Some("n1"), "z"));
        assert!(a.endpoints[3].topology.is_none() && a.endpoints[3].node_name().is_none());
    }

    #[test]
    fn slices_are_found_by_their_service() {
        let slice = |ns: &str, name: &str, svc: &str| {
            let s: EndpointSlice = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": ns, "labels": {crate::model::LABEL_SERVICE_NAME: svc}},
                "addressType": "IPv4", "endpoints": [],
            }))
            .expect("slice");
            SourceEvent::slice(&s, "test")
        };
        let mut store = Store::default();
        for (ns, name, svc) in [("a", "web-1", "web"), ("a", "web-2", "web"), ("a", "webx-1", "webx"), ("b", "web-1", "web")] {
            store.apply(slice(ns, name, svc));
        }
        let names = |store: &Store, ns: &str, svc: &str| -> Vec<String> {
            store.slices_of(&ObjectKey::new(ns, svc)).iter().map(|s| s.key().to_string()).collect()
        };
        assert_eq!(names(&store, "a", "web"), ["a/web-1", "a/web-2"]);
        assert_eq!(names(&store, "b", "web"), ["b/web-1"]);
        // A slice moving to another Service, then deleted.
        assert_eq!(store.apply(slice("a", "web-2", "webx")), Change::Services(vec![ObjectKey::new("a", "web"), ObjectKey::new("a", "webx")]));
        assert_eq!(names(&store, "a", "webx"), ["a/web-2", "a/webx-1"]);
        assert_eq!(store.apply(SourceEvent::SliceDeleted(ObjectKey::new("a", "web-1"))), Change::Services(vec![ObjectKey::new("a", "web")]));
        assert!(names(&store, "a", "web").is_empty());
    }
}
