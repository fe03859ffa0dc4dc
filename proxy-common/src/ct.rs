//! Connection tracking (LRU hash).
//!
//! A translated flow has two entries:
//! - `CT_DIR_SERVICE`, keyed by the packet as the client sent it
//!   (client → VIP:port): `nat_*` is the chosen backend address and port.
//! - `CT_DIR_REPLY`, keyed by the reply as the backend sends it
//!   (backend → client): `nat_*` is the VIP and port to restore as source.
//!
//! Both carry the backend id, never a slot, so reshuffling slots does not move
//! a flow.

pub const CT_MAP: &str = "proxy_ct_v1";
pub const CT_MAX_ENTRIES: u32 = 262_144;

pub const CT_DIR_SERVICE: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// A TCP flow not seen for this long is forgotten (new backend selection).
pub const CT_TCP_TIMEOUT_NS: u64 = 6 * 3600 * 1_000_000_000;
/// A UDP flow not seen for this long is forgotten.
pub const CT_UDP_TIMEOUT_NS: u64 = 180 * 1_000_000_000;
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

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// Address written by the translation (backend for SERVICE, VIP for REPLY).
    pub nat_addr_be: u32,
    /// Port written by the translation.
    pub nat_port_be: u16,
    pub flags: u8,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: u8,
    pub backend_id: u32,
    pub svc_id: u32,
    /// `bpf_ktime_get_ns` when last refreshed.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<CtValue>() == 24);

crate::pod!(CtKey, CtValue);
