//! Connection tracking (LRU hash).
//!
//! A translated flow has two entries:
//! - `CT_DIR_SERVICE`, keyed by the packet as the client sent it
//!   (client → frontend): `nat_*` is the chosen backend address and port;
//!   with `CT_F_SNAT`, `snat_*` is the source written as well (node address
//!   and allocated port).
//! - `CT_DIR_REPLY`, keyed by the reply as the backend sends it
//!   (backend → client, or → node address:allocated port with SNAT): `nat_*`
//!   is the frontend to restore as source; with `CT_F_SNAT`, `snat_*` is the
//!   client to restore as destination.
//!
//! Both carry the backend id, never a slot, so reshuffling slots does not move
//! a flow.
//!
//! Two tables, so that no flood can push an established flow out: a new
//! flow's entries go to `proxy_ct_new_v1` (unconfirmed, short timeouts,
//! its own LRU), and move to `proxy_ct_v2` once the flow is confirmed — a
//! reply was seen and then another packet from the client (for TCP: the
//! handshake's ACK). A spoofed source never answers, so spoofed SYNs and
//! datagrams only ever churn the unconfirmed table.

#[cfg(not(feature = "layout-next"))]
pub const CT_MAP: &str = "proxy_ct_v2";
/// The test-only next layout (feature `layout-next`): [`CtValue`] has
/// `created_ns`.
#[cfg(feature = "layout-next")]
pub const CT_MAP: &str = "proxy_ct_v3";
/// The first releases' conntrack: one table, 24-byte values without SNAT
/// (`CtValue` up to `_pad`, then `backend_id`, `svc_id`, `last_seen_ns`).
/// The agent migrates its entries into [`CT_MAP`] on start.
pub const CT_MAP_V1: &str = "proxy_ct_v1";
/// [`CT_MAP`] and [`CT_NEW_MAP`] of the shipped layout, retired by the
/// test-only next layout.
pub const CT_MAP_V2: &str = "proxy_ct_v2";
pub const CT_NEW_MAP_V1: &str = "proxy_ct_new_v1";
/// Capacity compiled into the object; the agent sets the real one at load
/// from `--conntrack-max` (two entries per flow).
pub const CT_MAX_ENTRIES: u32 = 262_144;
/// The unconfirmed flows' table (LRU, same key and value).
#[cfg(not(feature = "layout-next"))]
pub const CT_NEW_MAP: &str = "proxy_ct_new_v1";
#[cfg(feature = "layout-next")]
pub const CT_NEW_MAP: &str = "proxy_ct_new_v2";
/// Compiled-in capacity; the agent sets a quarter of the conntrack's.
pub const CT_NEW_MAX_ENTRIES: u32 = 65_536;
/// An unconfirmed TCP flow whose SNAT port was claimed this long ago may
/// lose it to a new flow when the backend's range runs short: a handshake
/// completes within a round trip, so a SYN still unconfirmed after 2 s
/// (past its first retransmission) is most likely spoofed (its source
/// never sends the ACK). A real client that was that slow retries with a
/// new port.
pub const CT_SYN_RECLAIM_NS: u64 = 2 * 1_000_000_000;
/// kube-proxy's `--conntrack-min` default (flows).
pub const CONNTRACK_MIN_DEFAULT: u32 = 131_072;
/// kube-proxy's `--conntrack-max-per-core` default (flows).
pub const CONNTRACK_MAX_PER_CORE_DEFAULT: u32 = 32_768;

pub const CT_DIR_SERVICE: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// An established TCP or SCTP flow (a reply was seen) not seen for this
/// long is forgotten (new backend selection). netfilter's TCP established
/// timeout is 5 days; kube-proxy keeps it; 6 h bounds what a silent peer
/// holds. (netfilter's SCTP one is 210 s, which SCTP's heartbeats, every
/// 30 s by default, keep alive; an association without heartbeats keeps
/// its backend here as a TCP connection does.)
pub const CT_TCP_TIMEOUT_NS: u64 = 6 * 3600 * 1_000_000_000;
/// A UDP flow that has seen a reply, not seen for this long, is forgotten
/// (netfilter's `udp_timeout_stream`).
pub const CT_UDP_TIMEOUT_NS: u64 = 180 * 1_000_000_000;
/// A TCP flow that has only seen its SYN (an SCTP one its INIT; no reply
/// yet): netfilter's
/// `tcp_timeout_syn_sent` is 120 s; 60 s here so spoofed SYNs free their
/// entries and SNAT ports quickly.
pub const CT_SYN_TIMEOUT_NS: u64 = 60 * 1_000_000_000;
/// A UDP flow without a reply yet (netfilter's `udp_timeout`: 30 s).
pub const CT_UDP_UNREPLIED_TIMEOUT_NS: u64 = 30 * 1_000_000_000;
/// A TCP flow that saw a FIN or RST is forgotten after this long idle; its
/// SNAT port is then free again.
pub const CT_CLOSING_TIMEOUT_NS: u64 = 10 * 1_000_000_000;
/// `last_seen_ns` is refreshed at most this often, to save map writes.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// `CT_DIR_SERVICE` or `CT_DIR_REPLY`.
    pub dir: u8,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<CtKey>() == 16);

/// The flow is source-NATed (remote backend of an external frontend, or hairpin).
pub const CT_F_SNAT: u8 = 1 << 0;
/// After translation the packet is sent out by a FIB lookup and
/// `bpf_redirect_neigh`, not through the stack's input path (its source is
/// then a local address, which the stack would drop as martian).
pub const CT_F_REDIRECT: u8 = 1 << 1;
/// A FIN or RST was seen: short timeout.
pub const CT_F_CLOSING: u8 = 1 << 2;
/// A packet of the reply direction was seen (set on both entries); the
/// next packet from the client then confirms the flow (moves it to the
/// confirmed table, long timeouts).
pub const CT_F_SEEN_REPLY: u8 = 1 << 3;

/// The idle timeout of an entry with `flags` for `proto`, in ns:
/// `confirmed` = the entry is in the confirmed table (`CT_MAP`).
#[must_use]
pub const fn timeout_ns(flags: u8, proto: u8, confirmed: bool) -> u64 {
    if flags & CT_F_CLOSING != 0 {
        CT_CLOSING_TIMEOUT_NS
    } else if crate::proto::is_connected(proto) {
        if confirmed { CT_TCP_TIMEOUT_NS } else { CT_SYN_TIMEOUT_NS }
    } else if confirmed {
        CT_UDP_TIMEOUT_NS
    } else {
        CT_UDP_UNREPLIED_TIMEOUT_NS
    }
}

/// SNAT source ports are allocated in this range: above Linux's default
/// `ip_local_port_range` (32768-60999), so they never collide with the
/// node's own connections (the agent warns when the range overlaps).
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// Address written by the translation (backend for SERVICE, frontend for REPLY).
    pub nat_addr_be: u32,
    /// Port written by the translation.
    pub nat_port_be: u16,
    /// `CT_F_*`.
    pub flags: u8,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: u8,
    /// With `CT_F_SNAT`: SERVICE: the source written (node address); REPLY:
    /// the destination restored (the client).
    pub snat_addr_be: u32,
    pub snat_port_be: u16,
    /// SERVICE entry: the frontend slot the backend was chosen from, so a
    /// UDP flow can check that its backend still is an endpoint of the
    /// frontend (`svc[frontend, slot].backend_id == backend_id`); 0 = not
    /// known (REPLY entries, flows from before this field).
    pub slot: u16,
    pub backend_id: u32,
    pub svc_id: u32,
    /// `bpf_ktime_get_ns` when last refreshed.
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_ns` when the flow was created (test-only next layout).
    #[cfg(feature = "layout-next")]
    pub created_ns: u64,
}
#[cfg(not(feature = "layout-next"))]
const _: () = assert!(size_of::<CtValue>() == 32);
#[cfg(feature = "layout-next")]
const _: () = assert!(size_of::<CtValue>() == 40);

crate::pod!(CtKey, CtValue);

/// IPv6 conntrack: the same two tables, entries and timeouts as the IPv4
/// ones ([`CT_MAP`], [`CT_NEW_MAP`]), keyed by IPv6 addresses (network byte
/// order).
pub const CT6_MAP: &str = "proxy_ct6_v1";
pub const CT6_NEW_MAP: &str = "proxy_ct6_new_v1";
/// Compiled-in capacities; the agent sets the real ones at load.
pub const CT6_MAX_ENTRIES: u32 = 65_536;
pub const CT6_NEW_MAX_ENTRIES: u32 = 16_384;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct6Key {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// `CT_DIR_SERVICE` or `CT_DIR_REPLY`.
    pub dir: u8,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Ct6Key>() == 40);

/// [`CtValue`] with IPv6 addresses; the fields mean the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct6Value {
    pub nat_addr: [u8; 16],
    pub snat_addr: [u8; 16],
    pub nat_port_be: u16,
    pub snat_port_be: u16,
    pub flags: u8,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: u8,
    pub slot: u16,
    pub backend_id: u32,
    pub svc_id: u32,
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<Ct6Value>() == 56);

crate::pod!(Ct6Key, Ct6Value);
