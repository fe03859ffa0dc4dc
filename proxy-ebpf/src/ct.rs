//! Conntrack: look up, refresh, create and close the two entries of a flow,
//! and allocate SNAT source ports.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns}};
use proxy_common::{
    ct::{
        CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_CLOSING, CT_F_SEEN_REPLY, CT_F_SNAT, CT_REFRESH_NS, CtKey, CtValue,
        SNAT_PORT_MAX, SNAT_PORT_MIN, timeout_ns,
    },
};

use crate::{maps::CT, parse::Packet};

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
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

#[inline(always)]
fn key(saddr_be: u32, daddr_be: u32, sport_be: u16, dport_be: u16, proto: u8, dir: u8) -> CtKey {
    CtKey { saddr_be, daddr_be, sport_be, dport_be, proto, dir, _pad: [0; 2] }
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
    // Why saturating: another CPU may refresh the entry after `now` was
    // read; a wrapped difference would make that live entry look expired.
    let age = now.saturating_sub(v.last_seen_ns);
    if age > timeout_ns(v.flags, key.proto) {
        return None;
    }
    if age > CT_REFRESH_NS {
        v.last_seen_ns = now;
    }
    Some(*v)
}

/// How a new flow is translated.
pub struct NewFlow {
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub backend_id: u32,
    /// The frontend slot the backend was chosen from.
    pub slot: u16,
    pub svc_id: u32,
    /// `CT_F_*` for both entries (without `CT_F_SNAT`, set by `snat_addr_be`).
    pub flags: u8,
    /// Source to NAT to, or 0 for none.
    pub snat_addr_be: u32,
}

/// Random ports tried for a new SNAT flow before giving up.
const SNAT_TRIES: u32 = 32;

/// Records a new flow: the SERVICE entry for the client's packets and the
/// REPLY entry for the backend's. With SNAT, a source port is allocated such
/// that the REPLY key is unique (tried a bounded number of times, random in
/// `SNAT_PORT_MIN..=SNAT_PORT_MAX`; an expired entry's port is reused).
/// Without SNAT, when the backend already answers this client address and
/// port for another frontend (one UDP socket talking to a Service's NodePort
/// and its LoadBalancer IP), the new flow keeps the client's address but gets
/// its own source port that way, as netfilter resolves such a clash — else
/// the replies of the first flow would come back from the second frontend.
/// Returns the SERVICE entry, or `None` when no port was free.
#[inline(always)]
pub fn create(p: &Packet, f: &NewFlow, now: u64) -> Option<CtValue> {
    if f.snat_addr_be != 0 {
        return create_snat(p, f, f.snat_addr_be, now);
    }
    let fwd = CtValue {
        nat_addr_be: f.backend_addr_be,
        nat_port_be: f.backend_port_be,
        flags: f.flags,
        _pad: 0,
        snat_addr_be: 0,
        snat_port_be: 0,
        slot: f.slot,
        backend_id: f.backend_id,
        svc_id: f.svc_id,
        last_seen_ns: now,
    };
    let rev = CtValue { nat_addr_be: p.daddr_be, nat_port_be: p.dport_be, slot: 0, ..fwd };
    let rk = key(f.backend_addr_be, p.saddr_be, f.backend_port_be, p.sport_be, p.proto, CT_DIR_REPLY);
    // Reply entry first: once the SERVICE entry exists, replies may follow.
    if !claim_reply(&rk, &rev, now) {
        return create_snat(p, f, p.saddr_be, now);
    }
    // Why: a retransmitted SYN or a new flow reusing the tuple overwrites
    // the SERVICE entry; no other flow has this key.
    let _ = CT.insert(&key_of(p, CT_DIR_SERVICE), &fwd, 0);
    Some(fwd)
}

/// Writes the REPLY entry of a flow without SNAT unless a live entry of
/// another flow holds its key: one through another frontend, or an SNAT
/// flow's (whose allocated port happens to be this client's port).
#[inline(always)]
fn claim_reply(rk: &CtKey, rev: &CtValue, now: u64) -> bool {
    if CT.insert(rk, rev, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    match lookup_live(rk, now) {
        // Expired: taken over atomically (see `claim_expired`).
        None => claim_expired(rk, rev),
        // The same frontend: a new connection reusing this tuple.
        Some(old) => {
            old.flags & CT_F_SNAT == 0
                && old.nat_addr_be == rev.nat_addr_be
                && old.nat_port_be == rev.nat_port_be
                && CT.insert(rk, rev, 0).is_ok()
        }
    }
}

/// Takes over a key whose entry has expired. Why delete-then-NOEXIST and
/// not an overwrite: two CPUs that both found it expired would both
/// overwrite it and both believe they own it (two flows sharing one SNAT
/// port, each getting the other's replies); with the delete, only one
/// NOEXIST insert succeeds.
#[inline(always)]
fn claim_expired(rk: &CtKey, v: &CtValue) -> bool {
    let _ = CT.remove(rk);
    CT.insert(rk, v, u64::from(BPF_NOEXIST)).is_ok()
}

/// [`create`] with the source translated to `snat_addr_be` and an allocated port.
#[inline(always)]
fn create_snat(p: &Packet, f: &NewFlow, snat_addr_be: u32, now: u64) -> Option<CtValue> {
    let mut fwd = CtValue {
        nat_addr_be: f.backend_addr_be,
        nat_port_be: f.backend_port_be,
        flags: f.flags | CT_F_SNAT,
        _pad: 0,
        snat_addr_be,
        snat_port_be: 0,
        slot: f.slot,
        backend_id: f.backend_id,
        svc_id: f.svc_id,
        last_seen_ns: now,
    };
    let rev = CtValue {
        nat_addr_be: p.daddr_be,
        nat_port_be: p.dport_be,
        snat_addr_be: p.saddr_be,
        snat_port_be: p.sport_be,
        slot: 0,
        ..fwd
    };
    let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    // Why the client's own port first: netfilter keeps the source port when
    // the translated tuple is free, so a client's port survives NAT. Only a
    // port inside the SNAT range is kept: one outside it may be the node's
    // own connection's port to that backend, which this map cannot see.
    let client_port = u16::from_be(p.sport_be);
    let keep = (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&client_port);
    // Why 32: ports stay taken for CT_CLOSING_TIMEOUT after a flow ends,
    // so under heavy connection churn most of a backend's range can be
    // in use; 32 random tries still find a free one unless more than
    // ~80% are taken (failure 0.8^32 < 0.1%), as Cilium's SNAT retries.
    for i in 0..SNAT_TRIES {
        let port = if i == 0 && keep {
            p.sport_be
        } else {
            // SAFETY: helper without arguments.
            let r = unsafe { bpf_get_prandom_u32() };
            (SNAT_PORT_MIN + (r % span) as u16).to_be()
        };
        let rk = key(f.backend_addr_be, snat_addr_be, f.backend_port_be, port, p.proto, CT_DIR_REPLY);
        // Why: NOEXIST makes the check-and-claim atomic against another
        // CPU picking the same port for the same backend; an expired
        // holder is removed first, then claimed the same way.
        let free = CT.insert(&rk, &rev, u64::from(BPF_NOEXIST)).is_ok()
            || (lookup_live(&rk, now).is_none() && claim_expired(&rk, &rev));
        if free {
            fwd.snat_port_be = port;
            let _ = CT.insert(&key_of(p, CT_DIR_SERVICE), &fwd, 0);
            return Some(fwd);
        }
    }
    None
}

#[inline(always)]
fn set_flag(k: &CtKey, flag: u8) {
    if let Some(ptr) = CT.get_ptr_mut(k) {
        // SAFETY: pointer from a successful lookup; a flag bit set twice is harmless.
        unsafe {
            if (*ptr).flags & flag == 0 {
                (*ptr).flags |= flag;
            }
        }
    }
}

#[inline(always)]
fn mark_closing(k: &CtKey) {
    set_flag(k, CT_F_CLOSING);
}

/// A reply-direction packet of the flow with REPLY entry `e` (key as the
/// packet has it): both entries are confirmed and get the long timeout.
/// Written once per flow.
#[inline(always)]
pub fn confirm_from_reply(p: &Packet, e: &CtValue) {
    if e.flags & CT_F_SEEN_REPLY != 0 {
        return;
    }
    set_flag(&key_of(p, CT_DIR_REPLY), CT_F_SEEN_REPLY);
    let (client, cport) = if e.flags & CT_F_SNAT != 0 { (e.snat_addr_be, e.snat_port_be) } else { (p.daddr_be, p.dport_be) };
    set_flag(&key(client, e.nat_addr_be, cport, e.nat_port_be, p.proto, CT_DIR_SERVICE), CT_F_SEEN_REPLY);
}

/// A FIN or RST on a SERVICE-direction packet with entry `e`: both entries
/// get the short timeout.
#[inline(always)]
pub fn close_from_service(p: &Packet, e: &CtValue) {
    mark_closing(&key_of(p, CT_DIR_SERVICE));
    let (src, sport) = if e.flags & CT_F_SNAT != 0 { (e.snat_addr_be, e.snat_port_be) } else { (p.saddr_be, p.sport_be) };
    mark_closing(&key(e.nat_addr_be, src, e.nat_port_be, sport, p.proto, CT_DIR_REPLY));
}

/// A FIN or RST on a REPLY-direction packet with entry `e`.
#[inline(always)]
pub fn close_from_reply(p: &Packet, e: &CtValue) {
    mark_closing(&key_of(p, CT_DIR_REPLY));
    let (client, cport) = if e.flags & CT_F_SNAT != 0 { (e.snat_addr_be, e.snat_port_be) } else { (p.daddr_be, p.dport_be) };
    mark_closing(&key(client, e.nat_addr_be, cport, e.nat_port_be, p.proto, CT_DIR_SERVICE));
}
