//! IPv4 fragments: only the first fragment of a datagram carries the ports,
//! so the datapath remembers them per datagram (source, destination, IP id,
//! protocol) and translates the later fragments alike, as Cilium's fragment
//! map does. An LRU; an entry is used for `FRAG_TIMEOUT_NS` (the kernel's
//! `ipfrag_time`), and a new first fragment with the same key replaces it.

pub const FRAG_MAP: &str = "proxy_frag_v1";
pub const FRAG_MAX_ENTRIES: u32 = 16_384;
/// Later fragments are matched for this long after the first (30 s, as
/// `net.ipv4.ipfrag_time`).
pub const FRAG_TIMEOUT_NS: u64 = 30 * 1_000_000_000;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    /// The IPv4 identification field, network order.
    pub id_be: u16,
    pub proto: u8,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: u8,
}
const _: () = assert!(size_of::<FragKey>() == 12);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    /// The ports of the first fragment, network order.
    pub sport_be: u16,
    pub dport_be: u16,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: u32,
    /// `bpf_ktime_get_ns` when the first fragment was seen.
    pub seen_ns: u64,
}
const _: () = assert!(size_of::<FragValue>() == 16);

crate::pod!(FragKey, FragValue);
