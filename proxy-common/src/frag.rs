//! Fragments: only the first fragment of a datagram carries the ports, so
//! the datapath remembers them per datagram (source, destination,
//! identification, protocol) and translates the later fragments alike, as
//! Cilium's fragment maps do. One map per family: IPv4 (`FRAG_MAP`, the
//! 16-bit IP id) and IPv6 (`FRAG6_MAP`, the 32-bit identification of the
//! Fragment extension header). LRUs; an entry is used for
//! `FRAG_TIMEOUT_NS` (the kernel's `ipfrag_time`), and a new first fragment
//! with the same key replaces it. The value is the same for both.

pub const FRAG_MAP: &str = "proxy_frag_v1";
pub const FRAG6_MAP: &str = "proxy_frag6_v1";
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

/// The IPv6 key (`FRAG6_MAP`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frag6Key {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The Fragment header's identification, network order.
    pub id_be: u32,
    /// The upper-layer protocol (the Fragment header's next header).
    pub proto: u8,
    #[expect(clippy::pub_underscore_fields, reason = "explicit padding, part of the map layout")]
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<Frag6Key>() == 40);

crate::pod!(FragKey, FragValue, Frag6Key);
