//! Conntrack: look up, refresh and create the two entries of a flow.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use proxy_common::{
    ct::{CT_DIR_REPLY, CT_DIR_SERVICE, CT_REFRESH_NS, CT_TCP_TIMEOUT_NS, CT_UDP_TIMEOUT_NS, CtKey, CtValue},
    proto,
};

use crate::{maps::CT, parse::Packet};

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn timeout_ns(proto: u8) -> u64 {
    if proto == proto::TCP { CT_TCP_TIMEOUT_NS } else { CT_UDP_TIMEOUT_NS }
}

/// The key of the packet as it is on the wire, in direction `dir`.
#[inline(always)]
pub fn key_of(p: &Packet, dir: u8) -> CtKey {
    CtKey {
        saddr_be: p.saddr_be,
        daddr_be: p.daddr_be,
        sport_be: p.sport_be,
        dport_be: p.dport_be,
        proto: p.proto,
        dir,
        _pad: [0; 2],
    }
}

/// Looks up a live entry; refreshes its `last_seen_ns` at most once per
/// `CT_REFRESH_NS`. An expired entry counts as absent.
#[inline(always)]
pub fn lookup_live(key: &CtKey, now: u64) -> Option<CtValue> {
    let ptr = CT.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup; a concurrent
    // writer can at worst make us read a torn last_seen, which only affects
    // when the entry is refreshed.
    let v = unsafe { &mut *ptr };
    let age = now.wrapping_sub(v.last_seen_ns);
    if age > timeout_ns(key.proto) {
        return None;
    }
    if age > CT_REFRESH_NS {
        v.last_seen_ns = now;
    }
    Some(*v)
}

/// Records a new flow: the SERVICE entry for the client's packets and the
/// REPLY entry for the backend's. Returns false if either insert failed.
#[inline(always)]
pub fn create(p: &Packet, backend_addr_be: u32, backend_port_be: u16, backend_id: u32, svc_id: u32, now: u64) -> bool {
    let fwd = CtValue {
        nat_addr_be: backend_addr_be,
        nat_port_be: backend_port_be,
        flags: 0,
        _pad: 0,
        backend_id,
        svc_id,
        last_seen_ns: now,
    };
    let rev_key = CtKey {
        saddr_be: backend_addr_be,
        daddr_be: p.saddr_be,
        sport_be: backend_port_be,
        dport_be: p.sport_be,
        proto: p.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let rev = CtValue {
        nat_addr_be: p.daddr_be,
        nat_port_be: p.dport_be,
        ..fwd
    };
    // Reply entry first: once the SERVICE entry exists, replies may follow.
    let a = CT.insert(&rev_key, &rev, 0).is_ok();
    let b = CT.insert(&key_of(p, CT_DIR_SERVICE), &fwd, 0).is_ok();
    a && b
}
