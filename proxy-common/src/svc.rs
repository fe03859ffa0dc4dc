//! The service map: frontends in slots.
//!
//! For a frontend (VIP, port, protocol) the entry with `backend_slot == 0` is
//! the frontend itself: how many backends it has, its service id and flags.
//! Entries with `backend_slot` 1..=count hold one backend id each. The agent
//! writes backends first, then slots, then slot 0 with the new count, and
//! removes stale slots last, so a packet never reads a count that points at a
//! missing slot.

/// Pinned name of the service map (the suffix is the layout version).
pub const SVC_MAP: &str = "proxy_svc_v1";
/// Capacity of the service map (frontends + slots). Hash map without
/// preallocation: memory is used only for entries that exist.
pub const SVC_MAX_ENTRIES: u32 = 1_048_576;
/// Most backends one frontend may have (slots are `u16`).
pub const MAX_BACKENDS_PER_FRONTEND: u16 = 4096;

/// Frontend kinds, stored in [`SvcValue::flags`].
pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 0;
pub const SVC_FLAG_NODE_PORT: u16 = 1 << 1;
pub const SVC_FLAG_EXTERNAL_IP: u16 = 1 << 2;
pub const SVC_FLAG_LOAD_BALANCER: u16 = 1 << 3;
/// With count 0: drop instead of reject (the Service has endpoints, none
/// usable from this node: `internalTrafficPolicy: Local`), as kube-proxy does.
pub const SVC_FLAG_DROP_WHEN_EMPTY: u16 = 1 << 4;
/// External frontend with `externalTrafficPolicy: Cluster`: a backend on
/// another node gets the source `NATed` to this node's address.
pub const SVC_FLAG_SNAT_REMOTE: u16 = 1 << 5;
/// The frontend's traffic policy is Local (internalTrafficPolicy for a
/// `ClusterIP`, externalTrafficPolicy for external kinds); informational for
/// `proxy-agent services`, the backends are already chosen accordingly.
pub const SVC_FLAG_POLICY_LOCAL: u16 = 1 << 6;
/// A `LoadBalancer` frontend with `loadBalancerSourceRanges`: a new flow is
/// accepted only from a client inside one of its ranges in
/// [`SRC_RANGE_MAP`] (IPv4 frontends) or [`SRC_RANGE6_MAP`] (IPv6 ones); the
/// node's own addresses of the family are always listed.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 7;
/// Any external kind (`NodePort`, externalIP, `LoadBalancer`).
pub const SVC_FLAGS_EXTERNAL: u16 = SVC_FLAG_NODE_PORT | SVC_FLAG_EXTERNAL_IP | SVC_FLAG_LOAD_BALANCER;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    /// Frontend address, network byte order.
    pub addr_be: u32,
    /// Frontend port, network byte order.
    pub port_be: u16,
    /// 0 = the frontend entry, 1..=count = a backend slot.
    pub backend_slot: u16,
    /// IP protocol number ([`crate::proto`]).
    pub proto: u8,
    /// Reserved for traffic-policy scopes (internal/external); 0 for now.
    pub scope: u8,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SvcKey>() == 12);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcValue {
    /// In a slot entry: the backend id ([`crate::backend`]). In slot 0: the
    /// Service port's affinity group (a hash of `namespace/name:port/PROTO`,
    /// the same for all its frontends), which keys
    /// `sessionAffinity: ClientIP` so a client keeps its backend across the `ClusterIP`, node
    /// ports and external addresses of one Service port, as `kube-proxy`.
    pub backend_id: u32,
    /// In slot 0: how many backend slots follow. 0 = reject (no endpoints).
    pub count: u16,
    /// `SVC_FLAG_*`.
    pub flags: u16,
    /// Service id (one per frontend); names it in [`crate::names`] and in conntrack.
    pub svc_id: u32,
    /// In slot 0: `sessionAffinity: ClientIP` timeout in seconds
    /// (`sessionAffinityConfig.clientIP.timeoutSeconds`); 0 = no affinity.
    pub affinity_timeout_s: u32,
}
const _: () = assert!(size_of::<SvcValue>() == 16);

/// `loadBalancerSourceRanges` per frontend: an LPM trie whose key data is
/// `SrcRangeKey` and prefix length 32 + the range's (the service id always
/// matches whole). Value unused (1).
pub const SRC_RANGE_MAP: &str = "proxy_src_range_v1";
pub const SRC_RANGE_MAX_ENTRIES: u32 = 65_536;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeKey {
    /// The frontend's service id, network order (matched whole).
    pub svc_id_be: u32,
    /// The range's address, network order.
    pub addr_be: u32,
}
const _: () = assert!(size_of::<SrcRangeKey>() == 8);

crate::pod!(SvcKey, SvcValue, SrcRangeKey);

/// IPv6 frontends: the same slots and values as [`SVC_MAP`], keyed by an
/// IPv6 address (network byte order). Slot `backend_id`s name entries of
/// [`crate::backend::BACKEND6_MAP`].
pub const SVC6_MAP: &str = "proxy_svc6_v1";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Svc6Key {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub backend_slot: u16,
    pub proto: u8,
    pub scope: u8,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Svc6Key>() == 24);

crate::pod!(Svc6Key);

/// `loadBalancerSourceRanges` of IPv6 frontends: the twin of
/// [`SRC_RANGE_MAP`], an LPM trie whose key data is [`SrcRange6Key`] and
/// prefix length 32 + the range's. Value unused (1). A frontend's ranges
/// are those of its own family: an IPv4 range never admits an IPv6 client.
pub const SRC_RANGE6_MAP: &str = "proxy_src_range6_v1";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange6Key {
    /// The frontend's service id, network order (matched whole).
    pub svc_id_be: u32,
    /// The range's address, network order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<SrcRange6Key>() == 20);

crate::pod!(SrcRange6Key);
