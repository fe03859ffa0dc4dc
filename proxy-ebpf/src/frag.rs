//! Later fragments, for either family: the first fragment of a datagram
//! carries the ports; they are remembered per datagram in the family's
//! fragment map (`proxy_frag_v1`, `proxy_frag6_v1`; see
//! `proxy_common::frag`) and recalled for the fragments after it, which
//! then take the datagram's flow (translated without an L4 header to
//! rewrite). A later fragment whose first was not seen (or seen longer than
//! `FRAG_TIMEOUT_NS` ago) is passed untouched.
use proxy_common::frag::{FRAG_TIMEOUT_NS, FragValue};

use crate::family::Family;

/// Remembers the ports of the first fragment of datagram `id_be` (see
/// [`Family::frag_key`]).
#[inline(always)]
pub fn remember<F: Family>(saddr: F::Addr, daddr: F::Addr, id_be: u32, proto: u8, ports: [u16; 2]) {
    let v = FragValue { sport_be: ports[0], dport_be: ports[1], _pad: 0, seen_ns: crate::ct::now_ns() };
    F::frag_insert(&F::frag_key(saddr, daddr, id_be, proto), &v);
}

/// The ports of datagram `id_be`, when its first fragment was seen within
/// `FRAG_TIMEOUT_NS`.
#[inline(always)]
pub fn recall<F: Family>(saddr: F::Addr, daddr: F::Addr, id_be: u32, proto: u8) -> Option<[u16; 2]> {
    let f = F::frag_get(&F::frag_key(saddr, daddr, id_be, proto))?;
    if crate::ct::now_ns().saturating_sub(f.seen_ns) > FRAG_TIMEOUT_NS {
        return None;
    }
    Some([f.sport_be, f.dport_be])
}
