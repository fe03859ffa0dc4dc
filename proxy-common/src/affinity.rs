//! Session affinity (`sessionAffinity: ClientIP`): client → backend, per
//! Service port (the affinity group in slot 0 of each of its frontends).
//!
//! An LRU hash, so stale entries of gone clients age out by themselves. An
//! entry is used only while it is younger than the frontend's timeout
//! (idle time since the client's last new flow, as kube-proxy's `recent`
//! match) *and* the frontend's slot it names still holds its backend: a
//! backend that left the Service is never chosen from an affinity entry.
//!
//! The client is its IPv4 address (a hash of its IPv6 address) on the
//! per-packet paths (TC, XDP); on the socket path, where the source address
//! is not chosen yet at `connect()`, it is the socket's network-namespace
//! cookie (one per pod, one for the host), as Cilium's socket LB does.

pub const AFFINITY_MAP: &str = "proxy_affinity_v1";
pub const AFFINITY_MAX_ENTRIES: u32 = 262_144;

/// [`AffinityKey::client`] is an IPv4 address (network order, low 32 bits).
pub const AFFINITY_CLIENT_ADDR: u8 = 0;
/// [`AffinityKey::client`] is a network-namespace cookie.
pub const AFFINITY_CLIENT_NETNS: u8 = 1;
/// [`AffinityKey::client`] is a socket cookie (the socket path's per-socket
/// stickiness of unconnected UDP).
pub const AFFINITY_CLIENT_SOCKET: u8 = 2;
/// [`AffinityKey::client`] is a 64-bit hash of an IPv6 client address (the
/// key has no room for the address; clients that collide share a backend,
/// which affinity allows).
pub const AFFINITY_CLIENT_ADDR6: u8 = 3;
/// [`AffinityKey::client`] is a network-namespace cookie, for an IPv6
/// frontend (the socket path). Why apart from [`AFFINITY_CLIENT_NETNS`]:
/// both families of a dual-stack Service port share the affinity group,
/// and a backend id names a backend of one family only; one entry for both
/// would make a client that uses both families lose its backend at every
/// switch. kube-proxy keeps the families apart too (a proxier per family).
pub const AFFINITY_CLIENT_NETNS6: u8 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: u64,
    /// The Service port's affinity group (slot 0's `backend_id`).
    pub group: u32,
    /// `AFFINITY_CLIENT_*`.
    pub client_kind: u8,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<AffinityKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// The frontend slot the backend was last chosen from.
    pub slot: u16,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: [u8; 2],
    /// `bpf_ktime_get_ns` of the client's last new flow to this group.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<AffinityValue>() == 16);

crate::pod!(AffinityKey, AffinityValue);
