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

pub const CT_MAP: &str = "proxy_ct_v2";
pub const CT_MAX_ENTRIES: u32 = 262_144;

pub const CT_DIR_SERVICE: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// A TCP flow not seen for this long is forgotten (new backend selection).
pub const CT_TCP_TIMEOUT_NS: u64 = 6 * 3600 * 1_000_000_000;
/// A UDP flow not seen for this long is forgotten.
pub const CT_UDP_TIMEOUT_NS: u64 = 180 * 1_000_000_000;
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
}
const _: () = assert!(size_of::<CtValue>() == 32);

crate::pod!(CtKey, CtValue);
