//! Conntrack: look up, refresh, create, confirm and close the two entries
//! of a flow across the unconfirmed and confirmed tables (see
//! `proxy_common::ct`), and allocate SNAT source ports.
//!
//! Generic over the address family ([`crate::family::Family`]): IPv4 flows
//! live in `proxy_ct_v2` / `proxy_ct_new_v1`, IPv6 flows in `proxy_ct6_v1` /
//! `proxy_ct6_new_v1`, with the same entries, flags and timeouts.
//!
//! The keys and entries a function builds for the map helpers live in a
//! per-CPU work area ([`Work`], in `maps::CT_SCRATCH`), not on the stack:
//! an IPv6 key is 40 bytes and an entry 56, and a new flow needs two of
//! each plus the keys of the entries it replaces — more than the 512-byte
//! BPF stack holds beside the rest of the packet path. Entries that are
//! only read (an older flow's, a port's holder) are read in the map, by
//! pointer, never copied. The entry a lookup or a new flow yields for the
//! caller to apply is copied to a per-CPU slot of its own
//! (`maps::CT_ENTRY`) and handed out by reference: the packet path keeps
//! it no longer than the packet, and never two at once.
use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop};
use proxy_common::{
    ct::{
        CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_CLOSING, CT_F_SEEN_REPLY, CT_F_SNAT, CT_REFRESH_NS, CT_SYN_RECLAIM_NS,
        SNAT_PORT_MAX, SNAT_PORT_MIN, timeout_ns,
    },
    proto, stats,
};

use crate::{
    family::{CtEntry, CtInit, Family, V4, V6},
    maps::{CT_ENTRY, CT_SCRATCH, CtEntrySlot, CtScratch},
    parse::Pkt,
    stats::count,
};

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The per-CPU work area of the conntrack functions: keys and entries
/// being built. Only one program runs on a CPU at a time (TC and XDP run in
/// softirq context and do not nest), and every public function here sets
/// what it reads before reading it: nothing survives from one call to the
/// next.
pub struct Work<F: Family> {
    /// A REPLY key (the flow's reply, the SNAT port being claimed).
    rk: F::CtKey,
    /// A SERVICE key.
    sk: F::CtKey,
    /// A new flow's SERVICE and REPLY entries.
    fwd: F::CtValue,
    rev: F::CtValue,
    /// The SNAT port search's state (see [`try_port`]).
    search: Search<F>,
}

/// What a try of the SNAT port search needs. In the work area, not on the
/// stack: `bpf_loop`'s callback then needs no context, and the frame that
/// calls it stays small.
struct Search<F: Family> {
    backend_addr: F::Addr,
    snat_addr: F::Addr,
    now: u64,
    len: u32,
    backend_port_be: u16,
    client_port_be: u16,
    proto: u8,
    /// Try the client's own port first.
    keep: bool,
    /// The port was claimed (`fwd` holds it).
    found: bool,
}

const _: () = assert!(size_of::<Work<V4>>() <= size_of::<CtScratch>());
const _: () = assert!(size_of::<Work<V6>>() <= size_of::<CtScratch>());
const _: () = assert!(size_of::<proxy_common::ct::CtValue>() <= size_of::<CtEntrySlot>());
const _: () = assert!(size_of::<proxy_common::ct::Ct6Value>() <= size_of::<CtEntrySlot>());

/// This CPU's work area, by pointer.
#[inline(always)]
fn work_ptr<F: Family>() -> Option<*mut Work<F>> {
    Some(CT_SCRATCH.get_ptr_mut(0)?.cast::<Work<F>>())
}

/// This CPU's work area.
#[inline(always)]
fn work<F: Family>() -> Option<&'static mut Work<F>> {
    // SAFETY: the map value is larger than `Work<F>` (asserted above) and
    // 8-byte aligned, as every field wants; every bit pattern is a valid
    // key or entry (integers only); this CPU's slot is ours while the
    // program runs, and callers hold one reference at a time (none across
    // the SNAT port search's `bpf_loop`, whose callback takes its own).
    Some(unsafe { &mut *work_ptr::<F>()? })
}

/// Copies `v` to this CPU's entry slot, for the caller to apply.
#[inline(always)]
fn handed_out<F: Family>(v: &F::CtValue) -> Option<&'static F::CtValue> {
    let p = CT_ENTRY.get_ptr_mut(0)?;
    // SAFETY: as in `work`: large enough (asserted), aligned, integers
    // only, this CPU's; the previous entry handed out is dead by the time
    // the next is (see the module documentation).
    let slot = unsafe { &mut *p.cast::<F::CtValue>() };
    *slot = *v;
    Some(slot)
}

/// The key of the packet as it is on the wire, in direction `dir`.
#[inline(always)]
pub fn key_of<F: Family>(p: &Pkt<F>, dir: u8) -> F::CtKey {
    F::ct_key(p.saddr_be, p.daddr_be, p.sport_be, p.dport_be, p.proto, dir)
}

#[inline(always)]
fn key<F: Family>(saddr_be: F::Addr, daddr_be: F::Addr, sport_be: u16, dport_be: u16, proto: u8, dir: u8) -> F::CtKey {
    F::ct_key(saddr_be, daddr_be, sport_be, dport_be, proto, dir)
}

/// A live entry (in the entry slot) and the table it is in.
pub struct Found<V: 'static> {
    pub v: &'static V,
    pub confirmed: bool,
}

/// The live entry of `key` in `confirmed`'s table, in the map; refreshes
/// `last_seen_ns` at most once per `CT_REFRESH_NS`. An expired entry counts
/// as absent.
#[inline(always)]
fn live_ptr<F: Family>(confirmed: bool, key: &F::CtKey, now: u64) -> Option<*mut F::CtValue> {
    let ptr = F::ct_ptr(confirmed, key)?;
    // SAFETY: the pointer comes from a successful lookup; a concurrent
    // writer can at worst make us read a torn last_seen, which only affects
    // when the entry is refreshed.
    let v = unsafe { &mut *ptr };
    // Why saturating: another CPU may refresh the entry after `now` was
    // read; a wrapped difference would make that live entry look expired.
    let age = now.saturating_sub(v.last_seen());
    if age > timeout_ns(v.flags(), F::ct_key_proto(key), confirmed) {
        return None;
    }
    // Why not for an unconfirmed flow's replies: only its client keeps it
    // alive until it is confirmed. A spoofed SYN's backend retransmits its
    // SYN-ACK for a minute; that must not keep the SNAT port it holds.
    if age > CT_REFRESH_NS && (confirmed || F::ct_key_dir(key) == CT_DIR_SERVICE) {
        v.set_last_seen(now);
    }
    Some(ptr)
}

/// [`live_ptr`], copied to the entry slot.
#[inline(always)]
fn live_in<F: Family>(confirmed: bool, key: &F::CtKey, now: u64) -> Option<&'static F::CtValue> {
    let p = live_ptr::<F>(confirmed, key, now)?;
    // SAFETY: a pointer from a successful lookup.
    handed_out::<F>(unsafe { &*p })
}

/// The live entry of `key`: confirmed table first.
#[inline(always)]
pub fn lookup<F: Family>(key: &F::CtKey, now: u64) -> Option<Found<F::CtValue>> {
    if let Some(v) = live_in::<F>(true, key, now) {
        return Some(Found { v, confirmed: true });
    }
    live_in::<F>(false, key, now).map(|v| Found { v, confirmed: false })
}

/// [`lookup`] without the table.
#[inline(always)]
pub fn lookup_live<F: Family>(key: &F::CtKey, now: u64) -> Option<&'static F::CtValue> {
    lookup::<F>(key, now).map(|f| f.v)
}

/// The live entry of packet `p` as it is on the wire, in direction `dir`
/// ([`lookup_live`] of [`key_of`], the key built in the work area).
#[inline(always)]
pub fn lookup_packet<F: Family>(p: &Pkt<F>, dir: u8, now: u64) -> Option<&'static F::CtValue> {
    let w = work::<F>()?;
    w.rk = key_of(p, dir);
    lookup_live::<F>(&w.rk, now)
}

/// The REPLY key of the flow whose SERVICE entry is `e`, for a packet `p`
/// of the client's direction.
#[inline(always)]
fn reply_key<F: Family>(p: &Pkt<F>, e: &F::CtValue) -> F::CtKey {
    let (src, sport) = if e.flags() & CT_F_SNAT != 0 { (e.snat_addr(), e.snat_port()) } else { (p.saddr_be, p.sport_be) };
    key::<F>(e.nat_addr(), src, e.nat_port(), sport, p.proto, CT_DIR_REPLY)
}

/// The SERVICE entry for a client-direction packet `p`, if its flow is
/// live and still its own: an unconfirmed SNAT flow whose port was
/// reclaimed (see `CT_SYN_RECLAIM_NS`) is gone. A packet that confirms the
/// flow (a reply was seen; for TCP anything but a SYN) moves it to the
/// confirmed table.
#[inline(always)]
pub fn service_entry<F: Family>(p: &Pkt<F>, now: u64, len: u32) -> Option<&'static F::CtValue> {
    let w = work::<F>()?;
    w.sk = key_of(p, CT_DIR_SERVICE);
    let f = lookup::<F>(&w.sk, now)?;
    if f.confirmed {
        return Some(f.v);
    }
    let e = f.v;
    w.rk = reply_key(p, e);
    if e.flags() & CT_F_SNAT != 0 {
        // SAFETY: a pointer from a successful lookup, read at once.
        let owner = unsafe { &*F::ct_ptr(false, &w.rk)? };
        if owner.snat_addr() != p.saddr_be || owner.snat_port() != p.sport_be {
            return None;
        }
    }
    let syn = proto::is_connected(p.proto) && p.tcp_flags & 0x02 != 0;
    if e.flags() & CT_F_SEEN_REPLY != 0 && e.flags() & CT_F_CLOSING == 0 && !syn {
        promote::<F>(w, e, len);
    }
    Some(e)
}

/// Moves a flow's two entries (`w.sk`, `w.rk`) to the confirmed table:
/// confirmed entries first (readers look there first, and find the same
/// values), then the unconfirmed ones removed.
#[inline(always)]
fn promote<F: Family>(w: &Work<F>, e: &F::CtValue, len: u32) {
    let Some(rv) = F::ct_ptr(false, &w.rk) else {
        return;
    };
    // SAFETY: a pointer from a successful lookup: the helper copies the
    // value straight from the unconfirmed table's element.
    if !F::ct_insert(true, &w.rk, unsafe { &*rv }, false) || !F::ct_insert(true, &w.sk, e, false) {
        count::<F>(stats::CT_INSERT_FAILED, len);
        return;
    }
    F::ct_remove(false, &w.sk);
    F::ct_remove(false, &w.rk);
    count::<F>(stats::CT_CONFIRMED, len);
}

/// How a new flow is translated.
pub struct NewFlow<F: Family> {
    pub backend_addr_be: F::Addr,
    pub backend_port_be: u16,
    pub backend_id: u32,
    /// The frontend slot the backend was chosen from.
    pub slot: u16,
    pub svc_id: u32,
    /// `CT_F_*` for both entries (without `CT_F_SNAT`, set by `snat_addr_be`).
    pub flags: u8,
    /// Source to NAT to, or the zero address for none.
    pub snat_addr_be: F::Addr,
}

impl<F: Family> NewFlow<F> {
    /// A flow to the backend `c` chose, of frontend `svc_id`, without SNAT
    /// (set `snat_addr_be` for it).
    #[inline(always)]
    pub fn to(c: &crate::lb::Chosen<F::Addr>, svc_id: u32, flags: u8) -> Self {
        Self {
            backend_addr_be: c.backend.addr,
            backend_port_be: c.backend.port_be,
            backend_id: c.id,
            slot: c.slot,
            svc_id,
            flags,
            snat_addr_be: F::ZERO,
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
pub fn create<F: Family>(p: &Pkt<F>, f: &NewFlow<F>, now: u64, len: u32) -> Option<&'static F::CtValue> {
    let wp = work_ptr::<F>()?;
    let snat_addr = if f.snat_addr_be != F::ZERO {
        f.snat_addr_be
    } else {
        // SAFETY: see `work`; the reference ends with the call.
        if create_plain(unsafe { &mut *wp }, p, f, now) {
            // SAFETY: as above.
            return handed_out::<F>(unsafe { &(*wp).fwd });
        }
        p.saddr_be
    };
    // Why one call site: `create_snat` is the larger part (its port
    // search); inlined twice it would not fit the stack of an IPv6 program.
    // SAFETY: as above, read after the search wrote it.
    if create_snat(wp, p, f, snat_addr, now, len) { handed_out::<F>(unsafe { &(*wp).fwd }) } else { None }
}

/// [`create`] without SNAT, into `w.fwd`: `false` when the REPLY key is
/// taken (the caller then gives the flow its own source port).
#[inline(always)]
fn create_plain<F: Family>(w: &mut Work<F>, p: &Pkt<F>, f: &NewFlow<F>, now: u64) -> bool {
    let mut init = CtInit {
        nat_addr: f.backend_addr_be,
        nat_port_be: f.backend_port_be,
        flags: f.flags,
        snat_addr: F::ZERO,
        snat_port_be: 0,
        slot: f.slot,
        backend_id: f.backend_id,
        svc_id: f.svc_id,
        now,
    };
    w.fwd = F::ct_value(&init);
    init.nat_addr = p.daddr_be;
    init.nat_port_be = p.dport_be;
    init.slot = 0;
    w.rev = F::ct_value(&init);
    w.rk = key::<F>(f.backend_addr_be, p.saddr_be, f.backend_port_be, p.sport_be, p.proto, CT_DIR_REPLY);
    // Reply entry first: once the SERVICE entry exists, replies may follow.
    if !claim_reply::<F>(&w.rk, &w.rev, now) {
        return false;
    }
    set_service(w, p);
    true
}

/// Writes a new flow's SERVICE entry (`w.fwd`). Why the confirmed table is
/// cleared first: a new connection reusing the tuple of a closing confirmed
/// flow would otherwise keep finding the old entry, which is looked up
/// first. A retransmitted SYN or such a reuse overwrites the unconfirmed
/// entry; no other flow has this key. Uses `w.sk` and `w.rk`.
#[inline(always)]
fn set_service<F: Family>(w: &mut Work<F>, p: &Pkt<F>) {
    w.sk = key_of(p, CT_DIR_SERVICE);
    if let Some(old) = F::ct_ptr(true, &w.sk) {
        // SAFETY: a pointer from a successful lookup, read before the
        // entry is removed.
        w.rk = reply_key(p, unsafe { &*old });
        F::ct_remove(true, &w.rk);
        F::ct_remove(true, &w.sk);
    }
    let _ = F::ct_insert(false, &w.sk, &w.fwd, false);
}

/// Writes the REPLY entry of a flow without SNAT unless a live entry of
/// another flow holds its key: one through another frontend, or an SNAT
/// flow's (whose allocated port happens to be this client's port).
#[inline(always)]
fn claim_reply<F: Family>(rk: &F::CtKey, rev: &F::CtValue, now: u64) -> bool {
    // The same frontend: a new connection reusing this tuple (its
    // translation is the same, so either entry answers it right).
    let reuse = |old: *mut F::CtValue| {
        // SAFETY: a pointer from a successful lookup, read at once.
        let old = unsafe { &*old };
        old.flags() & CT_F_SNAT == 0 && old.nat_addr() == rev.nat_addr() && old.nat_port() == rev.nat_port()
    };
    if let Some(old) = live_ptr::<F>(true, rk, now) {
        return reuse(old) && F::ct_insert(false, rk, rev, false);
    }
    if F::ct_insert(false, rk, rev, true) {
        return true;
    }
    match live_ptr::<F>(false, rk, now) {
        // Expired: taken over atomically (see `claim_expired`).
        None => claim_expired::<F>(rk, rev),
        Some(old) => reuse(old) && F::ct_insert(false, rk, rev, false),
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
fn claim_port<F: Family>(rk: &F::CtKey, rev: &F::CtValue, now: u64, len: u32) -> bool {
    let mut ok = F::ct_insert(false, rk, rev, true);
    if !ok {
        match live_ptr::<F>(false, rk, now) {
            None => ok = claim_expired::<F>(rk, rev),
            Some(old) => {
                // REPLY entries of unconfirmed flows are not refreshed by
                // replies (see `live_in`): this is the age of the SYN.
                // SAFETY: a pointer from a successful lookup, read at once.
                let seen = unsafe { (*old).last_seen() };
                let stale_syn = proto::is_connected(F::ct_key_proto(rk)) && now.saturating_sub(seen) > CT_SYN_RECLAIM_NS;
                if stale_syn {
                    ok = claim_expired::<F>(rk, rev);
                    if ok {
                        count::<F>(stats::SNAT_PORT_RECLAIMED, len);
                    }
                }
            }
        }
    }
    if !ok {
        return false;
    }
    if live_ptr::<F>(true, rk, now).is_some() {
        F::ct_remove(false, rk);
        return false;
    }
    // An expired confirmed holder: gone for good (it would only shadow ours
    // for readers of the maps).
    F::ct_remove(true, rk);
    true
}

/// Takes over a key whose entry has expired (or may be reclaimed). Why
/// delete-then-NOEXIST and not an overwrite: two CPUs that both found it
/// free would both overwrite it and both believe they own it (two flows
/// sharing one SNAT port, each getting the other's replies); with the
/// delete, only one NOEXIST insert succeeds.
#[inline(always)]
fn claim_expired<F: Family>(rk: &F::CtKey, v: &F::CtValue) -> bool {
    F::ct_remove(false, rk);
    F::ct_insert(false, rk, v, true)
}

/// [`create`] with the source translated to `snat_addr_be` and an
/// allocated port, into the work area's `fwd`.
///
/// Why the work area is held by pointer here, not by reference: the port
/// search's callback writes it (`search.found`, `fwd`'s port, `rk`)
/// during `bpf_loop`. A `&mut` held across that call would let the compiler
/// assume nothing else wrote it and keep the values from before the call
/// (which it did: every search looked failed).
#[inline(always)]
fn create_snat<F: Family>(wp: *mut Work<F>, p: &Pkt<F>, f: &NewFlow<F>, snat_addr_be: F::Addr, now: u64, len: u32) -> bool {
    // SAFETY: see `work`; this reference ends before `bpf_loop`.
    let w = unsafe { &mut *wp };
    let mut init = CtInit {
        nat_addr: f.backend_addr_be,
        nat_port_be: f.backend_port_be,
        flags: f.flags | CT_F_SNAT,
        snat_addr: snat_addr_be,
        snat_port_be: 0,
        slot: f.slot,
        backend_id: f.backend_id,
        svc_id: f.svc_id,
        now,
    };
    w.fwd = F::ct_value(&init);
    init.nat_addr = p.daddr_be;
    init.nat_port_be = p.dport_be;
    init.snat_addr = p.saddr_be;
    init.snat_port_be = p.sport_be;
    init.slot = 0;
    w.rev = F::ct_value(&init);
    // Why the client's own port first: netfilter keeps the source port when
    // the translated tuple is free, so a client's port survives NAT. Only a
    // port inside the SNAT range is kept: one outside it may be the node's
    // own connection's port to that backend, which this map cannot see.
    let client_port = u16::from_be(p.sport_be);
    w.search = Search {
        backend_addr: f.backend_addr_be,
        snat_addr: snat_addr_be,
        now,
        len,
        backend_port_be: f.backend_port_be,
        client_port_be: p.sport_be,
        proto: p.proto,
        keep: (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&client_port),
        found: false,
    };
    // Why 32: ports stay taken for CT_CLOSING_TIMEOUT after a flow ends,
    // so under heavy connection churn most of a backend's range can be
    // in use; 32 random tries still find a free one unless more than
    // ~80% are taken (failure 0.8^32 < 0.1%), as Cilium's SNAT retries.
    //
    // Why `bpf_loop` and not a loop: the verifier walks a loop's body once
    // per try, with every state the previous try can leave, which made the
    // port search most of the TC program's verification (and would not
    // leave room for the IPv6 path's); a `bpf_loop` callback is verified
    // until its states converge, about once.
    // SAFETY: the callback is `try_port::<F>`, which takes no context.
    unsafe {
        bpf_loop(SNAT_TRIES, try_port::<F> as *mut c_void, core::ptr::null_mut(), 0);
    }
    // SAFETY: the work area, read again after the callback wrote it.
    if unsafe { core::ptr::read_volatile(&raw const (*wp).search.found) } {
        // SAFETY: as above.
        set_service(unsafe { &mut *wp }, p);
        return true;
    }
    false
}

/// One try of the SNAT port search (a `bpf_loop` callback, on the work
/// area's `search`): a port (the client's on the first try when `keep`,
/// else random in the SNAT range) claimed for the REPLY key. Returns 1
/// (stop) once one is.
extern "C" fn try_port<F: Family>(i: u64, _ctx: *mut c_void) -> i64 {
    let Some(w) = work::<F>() else {
        return 1;
    };
    let s = &w.search;
    let port = if i == 0 && s.keep {
        s.client_port_be
    } else {
        let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
        // SAFETY: helper without arguments.
        let r = unsafe { bpf_get_prandom_u32() };
        (SNAT_PORT_MIN + (r % span) as u16).to_be()
    };
    let (now, len) = (s.now, s.len);
    w.rk = key::<F>(s.backend_addr, s.snat_addr, s.backend_port_be, port, s.proto, CT_DIR_REPLY);
    // Why: NOEXIST makes the check-and-claim atomic against another CPU
    // picking the same port for the same backend; an expired holder is
    // removed first, then claimed the same way.
    if claim_port::<F>(&w.rk, &w.rev, now, len) {
        w.fwd.set_snat_port(port);
        w.search.found = true;
        return 1;
    }
    0
}

#[inline(always)]
fn set_flag<F: Family>(k: &F::CtKey, flag: u8) {
    for confirmed in [true, false] {
        if let Some(ptr) = F::ct_ptr(confirmed, k) {
            // SAFETY: pointer from a successful lookup; a flag bit set twice is harmless.
            let f = unsafe { (*ptr).flags_mut() };
            if *f & flag == 0 {
                *f |= flag;
            }
        }
    }
}

/// Sets `flag` on both entries of a flow: the one of packet `p` in
/// direction `dir` (as on the wire), and the other direction's, keyed
/// `(client, cport) ↔ e.nat` (`dir` SERVICE: the REPLY key from the
/// backend; REPLY: the SERVICE key to the frontend).
#[inline(always)]
fn flag_flow<F: Family>(p: &Pkt<F>, e: &F::CtValue, dir: u8, flag: u8) {
    let Some(w) = work::<F>() else {
        return;
    };
    w.rk = key_of(p, dir);
    set_flag::<F>(&w.rk, flag);
    let snat = e.flags() & CT_F_SNAT != 0;
    w.sk = if dir == CT_DIR_SERVICE {
        let (src, sport) = if snat { (e.snat_addr(), e.snat_port()) } else { (p.saddr_be, p.sport_be) };
        key::<F>(e.nat_addr(), src, e.nat_port(), sport, p.proto, CT_DIR_REPLY)
    } else {
        let (client, cport) = if snat { (e.snat_addr(), e.snat_port()) } else { (p.daddr_be, p.dport_be) };
        key::<F>(client, e.nat_addr(), cport, e.nat_port(), p.proto, CT_DIR_SERVICE)
    };
    set_flag::<F>(&w.sk, flag);
}

/// A reply-direction packet of the flow with REPLY entry `e` (key as the
/// packet has it): both entries are confirmed and get the long timeout.
/// Written once per flow.
#[inline(always)]
pub fn confirm_from_reply<F: Family>(p: &Pkt<F>, e: &F::CtValue) {
    if e.flags() & CT_F_SEEN_REPLY != 0 {
        return;
    }
    flag_flow(p, e, CT_DIR_REPLY, CT_F_SEEN_REPLY);
}

/// A FIN or RST on a SERVICE-direction packet with entry `e`: both entries
/// get the short timeout.
#[inline(always)]
pub fn close_from_service<F: Family>(p: &Pkt<F>, e: &F::CtValue) {
    flag_flow(p, e, CT_DIR_SERVICE, CT_F_CLOSING);
}

/// A FIN or RST on a REPLY-direction packet with entry `e`.
#[inline(always)]
pub fn close_from_reply<F: Family>(p: &Pkt<F>, e: &F::CtValue) {
    flag_flow(p, e, CT_DIR_REPLY, CT_F_CLOSING);
}
