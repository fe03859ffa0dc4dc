//! Conntrack: look up, refresh, create, confirm and close the two entries
//! of a flow across the unconfirmed and confirmed tables (see
//! `proxy_common::ct`), and allocate SNAT source ports.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns}};
use proxy_common::{
    ct::{
        CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_CLOSING, CT_F_SEEN_REPLY, CT_F_SNAT, CT_REFRESH_NS, CT_SYN_RECLAIM_NS, CtKey,
        CtValue, SNAT_PORT_MAX, SNAT_PORT_MIN, timeout_ns,
    },
    proto, stats,
};

use crate::{
    maps::{CT, CT_NEW},
    parse::Packet,
    stats::count,
};

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

/// The entry of `key` in the confirmed (`true`) or unconfirmed table.
#[inline(always)]
fn ptr(confirmed: bool, key: &CtKey) -> Option<*mut CtValue> {
    if confirmed { CT.get_ptr_mut(key) } else { CT_NEW.get_ptr_mut(key) }
}

/// A live entry and the table it is in.
#[derive(Clone, Copy)]
pub struct Found {
    pub v: CtValue,
    pub confirmed: bool,
}

/// Looks up a live entry in `confirmed`'s table; refreshes `last_seen_ns`
/// at most once per `CT_REFRESH_NS`. An expired entry counts as absent.
#[inline(always)]
fn live_in(confirmed: bool, key: &CtKey, now: u64) -> Option<CtValue> {
    let ptr = ptr(confirmed, key)?;
    // SAFETY: the pointer comes from a successful lookup; a concurrent
    // writer can at worst make us read a torn last_seen, which only affects
    // when the entry is refreshed.
    let v = unsafe { &mut *ptr };
    // Why saturating: another CPU may refresh the entry after `now` was
    // read; a wrapped difference would make that live entry look expired.
    let age = now.saturating_sub(v.last_seen_ns);
    if age > timeout_ns(v.flags, key.proto, confirmed) {
        return None;
    }
    // Why not for an unconfirmed flow's replies: only its client keeps it
    // alive until it is confirmed. A spoofed SYN's backend retransmits its
    // SYN-ACK for a minute; that must not keep the SNAT port it holds.
    if age > CT_REFRESH_NS && (confirmed || key.dir == CT_DIR_SERVICE) {
        v.last_seen_ns = now;
    }
    Some(*v)
}

/// The live entry of `key`: confirmed table first.
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<Found> {
    if let Some(v) = live_in(true, key, now) {
        return Some(Found { v, confirmed: true });
    }
    live_in(false, key, now).map(|v| Found { v, confirmed: false })
}

/// [`lookup`] without the table.
#[inline(always)]
pub fn lookup_live(key: &CtKey, now: u64) -> Option<CtValue> {
    lookup(key, now).map(|f| f.v)
}

/// The REPLY key of the flow whose SERVICE entry is `e`, for a packet `p`
/// of the client's direction.
#[inline(always)]
fn reply_key(p: &Packet, e: &CtValue) -> CtKey {
    let (src, sport) = if e.flags & CT_F_SNAT != 0 { (e.snat_addr_be, e.snat_port_be) } else { (p.saddr_be, p.sport_be) };
    key(e.nat_addr_be, src, e.nat_port_be, sport, p.proto, CT_DIR_REPLY)
}

/// The SERVICE entry for a client-direction packet `p`, if its flow is
/// live and still its own: an unconfirmed SNAT flow whose port was
/// reclaimed (see `CT_SYN_RECLAIM_NS`) is gone. A packet that confirms the
/// flow (a reply was seen; for TCP anything but a SYN) moves it to the
/// confirmed table.
#[inline(always)]
pub fn service_entry(p: &Packet, now: u64, len: u32) -> Option<CtValue> {
    let f = lookup(&key_of(p, CT_DIR_SERVICE), now)?;
    if f.confirmed {
        return Some(f.v);
    }
    let e = f.v;
    let rk = reply_key(p, &e);
    if e.flags & CT_F_SNAT != 0 {
        // SAFETY: the value is read at once.
        let owner = unsafe { CT_NEW.get(&rk) }?;
        if owner.snat_addr_be != p.saddr_be || owner.snat_port_be != p.sport_be {
            return None;
        }
    }
    let syn = p.proto == proto::TCP && p.tcp_flags & 0x02 != 0;
    if e.flags & CT_F_SEEN_REPLY != 0 && e.flags & CT_F_CLOSING == 0 && !syn {
        promote(&key_of(p, CT_DIR_SERVICE), &rk, &e, len);
    }
    Some(e)
}

/// Moves a flow's two entries to the confirmed table: confirmed entries
/// first (readers look there first, and find the same values), then the
/// unconfirmed ones removed.
#[inline(always)]
fn promote(sk: &CtKey, rk: &CtKey, e: &CtValue, len: u32) {
    // SAFETY: the value is copied out at once.
    let Some(rv) = (unsafe { CT_NEW.get(rk).copied() }) else {
        return;
    };
    if CT.insert(rk, &rv, 0).is_err() || CT.insert(sk, e, 0).is_err() {
        count(stats::CT_INSERT_FAILED, len);
        return;
    }
    let _ = CT_NEW.remove(sk);
    let _ = CT_NEW.remove(rk);
    count(stats::CT_CONFIRMED, len);
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

impl NewFlow {
    /// A flow to the backend `c` chose, of frontend `svc_id`, without SNAT
    /// (set `snat_addr_be` for it).
    #[inline(always)]
    pub fn to(c: &crate::lb::Chosen, svc_id: u32, flags: u8) -> Self {
        Self {
            backend_addr_be: c.backend.addr_be,
            backend_port_be: c.backend.port_be,
            backend_id: c.id,
            slot: c.slot,
            svc_id,
            flags,
            snat_addr_be: 0,
        }
    }
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
pub fn create(p: &Packet, f: &NewFlow, now: u64, len: u32) -> Option<CtValue> {
    if f.snat_addr_be != 0 {
        return create_snat(p, f, f.snat_addr_be, now, len);
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
        #[cfg(feature = "layout-next")]
        created_ns: now,
    };
    let rev = CtValue { nat_addr_be: p.daddr_be, nat_port_be: p.dport_be, slot: 0, ..fwd };
    let rk = key(f.backend_addr_be, p.saddr_be, f.backend_port_be, p.sport_be, p.proto, CT_DIR_REPLY);
    // Reply entry first: once the SERVICE entry exists, replies may follow.
    if !claim_reply(&rk, &rev, now) {
        return create_snat(p, f, p.saddr_be, now, len);
    }
    set_service(p, &fwd);
    Some(fwd)
}

/// Writes a new flow's SERVICE entry. Why the confirmed table is cleared
/// first: a new connection reusing the tuple of a closing confirmed flow
/// would otherwise keep finding the old entry, which is looked up first.
/// A retransmitted SYN or such a reuse overwrites the unconfirmed entry; no
/// other flow has this key.
#[inline(always)]
fn set_service(p: &Packet, fwd: &CtValue) {
    let sk = key_of(p, CT_DIR_SERVICE);
    // SAFETY: the value is copied out at once.
    if let Some(old) = unsafe { CT.get(&sk).copied() } {
        let _ = CT.remove(&reply_key(p, &old));
        let _ = CT.remove(&sk);
    }
    let _ = CT_NEW.insert(&sk, fwd, 0);
}

/// Writes the REPLY entry of a flow without SNAT unless a live entry of
/// another flow holds its key: one through another frontend, or an SNAT
/// flow's (whose allocated port happens to be this client's port).
#[inline(always)]
fn claim_reply(rk: &CtKey, rev: &CtValue, now: u64) -> bool {
    // The same frontend: a new connection reusing this tuple (its
    // translation is the same, so either entry answers it right).
    let reuse = |old: &CtValue| old.flags & CT_F_SNAT == 0 && old.nat_addr_be == rev.nat_addr_be && old.nat_port_be == rev.nat_port_be;
    if let Some(old) = live_in(true, rk, now) {
        return reuse(&old) && CT_NEW.insert(rk, rev, 0).is_ok();
    }
    if CT_NEW.insert(rk, rev, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    match live_in(false, rk, now) {
        // Expired: taken over atomically (see `claim_expired`).
        None => claim_expired(rk, rev),
        Some(old) => reuse(&old) && CT_NEW.insert(rk, rev, 0).is_ok(),
    }
}

/// Claims REPLY key `rk` (an SNAT port) for a new flow: atomically in the
/// unconfirmed table, then given back if a confirmed flow holds it (the
/// key is in at least one table throughout a flow's move between them, so
/// the check after the claim cannot miss a live holder). An expired holder
/// is replaced; so is an unconfirmed TCP flow whose client has not been
/// heard of for `CT_SYN_RECLAIM_NS` (a spoofed SYN: its source never
/// completes the handshake), counted `snat_port_reclaimed`.
#[inline(always)]
fn claim_port(rk: &CtKey, rev: &CtValue, now: u64, len: u32) -> bool {
    let mut ok = CT_NEW.insert(rk, rev, u64::from(BPF_NOEXIST)).is_ok();
    if !ok {
        match live_in(false, rk, now) {
            None => ok = claim_expired(rk, rev),
            Some(old) => {
                // REPLY entries of unconfirmed flows are not refreshed by
                // replies (see `live_in`): this is the age of the SYN.
                let stale_syn = rk.proto == proto::TCP && now.saturating_sub(old.last_seen_ns) > CT_SYN_RECLAIM_NS;
                if stale_syn {
                    ok = claim_expired(rk, rev);
                    if ok {
                        count(stats::SNAT_PORT_RECLAIMED, len);
                    }
                }
            }
        }
    }
    if !ok {
        return false;
    }
    if live_in(true, rk, now).is_some() {
        let _ = CT_NEW.remove(rk);
        return false;
    }
    // An expired confirmed holder: gone for good (it would only shadow ours
    // for readers of the maps).
    let _ = CT.remove(rk);
    true
}

/// Takes over a key whose entry has expired (or may be reclaimed). Why
/// delete-then-NOEXIST and not an overwrite: two CPUs that both found it
/// free would both overwrite it and both believe they own it (two flows
/// sharing one SNAT port, each getting the other's replies); with the
/// delete, only one NOEXIST insert succeeds.
#[inline(always)]
fn claim_expired(rk: &CtKey, v: &CtValue) -> bool {
    let _ = CT_NEW.remove(rk);
    CT_NEW.insert(rk, v, u64::from(BPF_NOEXIST)).is_ok()
}

/// [`create`] with the source translated to `snat_addr_be` and an allocated port.
#[inline(always)]
fn create_snat(p: &Packet, f: &NewFlow, snat_addr_be: u32, now: u64, len: u32) -> Option<CtValue> {
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
        #[cfg(feature = "layout-next")]
        created_ns: now,
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
        if claim_port(&rk, &rev, now, len) {
            fwd.snat_port_be = port;
            set_service(p, &fwd);
            return Some(fwd);
        }
    }
    None
}

#[inline(always)]
fn set_flag(k: &CtKey, flag: u8) {
    for confirmed in [true, false] {
        if let Some(ptr) = ptr(confirmed, k) {
            // SAFETY: pointer from a successful lookup; a flag bit set twice is harmless.
            unsafe {
                if (*ptr).flags & flag == 0 {
                    (*ptr).flags |= flag;
                }
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
