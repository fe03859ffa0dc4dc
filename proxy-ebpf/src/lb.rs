//! The load-balancing library: frontend lookup, backend choice (random,
//! or by session affinity), whether a tracked flow keeps its backend, and
//! the SNAT decision. Every program is a thin caller: TC ([`crate::tc`]),
//! XDP ([`crate::xdp`]) and the cgroup socket programs ([`crate::sock`])
//! decide the same way from `(frontend address, port, protocol, client)`,
//! so a new path or a new selection algorithm is one new caller, not
//! another copy (Cilium's `lb4_lookup_service` / `lb4_select_backend`
//! play this role).
use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::{BACKEND_F_LOCAL, Backend},
    ct::{CT_F_CLOSING, CtValue},
    proto, stats,
    svc::{SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_SNAT_REMOTE, SVC_FLAG_SOURCE_RANGES, SvcKey, SvcValue},
};

use crate::{
    maps::{AFFINITY, BACKEND, SRC_RANGES, SVC},
    parse::Packet,
    stats::count,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A frontend as a packet or a socket call addresses it.
#[derive(Clone, Copy)]
pub struct Frontend {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
}

impl Frontend {
    /// The destination of a packet (client → frontend).
    #[inline(always)]
    pub fn of(p: &Packet) -> Self {
        Self { addr_be: p.daddr_be, port_be: p.dport_be, proto: p.proto }
    }

    #[inline(always)]
    fn key(&self, slot: u16) -> SvcKey {
        SvcKey { addr_be: self.addr_be, port_be: self.port_be, backend_slot: slot, proto: self.proto, scope: 0, _pad: [0; 2] }
    }
}

/// Who is asking, for session affinity.
#[derive(Clone, Copy)]
pub enum Client {
    /// The client's IPv4 address (per-packet paths).
    Addr(u32),
    /// A network-namespace cookie (socket path: the source address is not
    /// chosen yet at `connect()`).
    Netns(u64),
}

/// The frontend entry (slot 0), if `fe` is one.
#[inline(always)]
pub fn lookup_service(fe: &Frontend) -> Option<SvcValue> {
    // SAFETY: the value is copied out at once.
    unsafe { SVC.get(fe.key(0)).copied() }
}

#[inline(always)]
pub fn lookup_backend(id: u32) -> Option<Backend> {
    // SAFETY: the value is copied out at once.
    unsafe { BACKEND.get(id).copied() }
}

/// Whether slot `slot` of `fe` still holds backend `id` (the backend is
/// still an endpoint of this frontend).
#[inline(always)]
pub fn slot_holds(fe: &Frontend, svc: &SvcValue, slot: u16, id: u32) -> bool {
    if slot == 0 || slot > svc.count {
        return false;
    }
    // SAFETY: the value is read at once.
    unsafe { SVC.get(fe.key(slot)) }.is_some_and(|v| v.backend_id == id)
}

/// What a frontend without usable backends does with a new flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Empty {
    /// No endpoints at all: refused (ICMP port unreachable / ECONNREFUSED),
    /// as kube-proxy's REJECT rule.
    Reject,
    /// Endpoints exist, none usable from this node (`internalTrafficPolicy:
    /// Local`): dropped, as kube-proxy does.
    Drop,
}

#[inline(always)]
pub fn when_empty(svc: &SvcValue) -> Empty {
    if svc.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0 { Empty::Drop } else { Empty::Reject }
}

/// The backend a new flow gets.
pub struct Chosen {
    pub id: u32,
    pub backend: Backend,
    /// The slot it was chosen from (recorded in conntrack and affinity).
    pub slot: u16,
}

/// Uniformly at random among the frontend's slots.
///
/// Why random and not a hash of the source port: Linux hands out even
/// ephemeral ports to `connect()`, so a modulo of the port skews badly.
#[inline(always)]
fn random_slot(fe: &Frontend, svc: &SvcValue) -> Option<Chosen> {
    // SAFETY: helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    let slot = (r % u32::from(svc.count)) as u16 + 1;
    // SAFETY: the value is copied out at once.
    let id = unsafe { SVC.get(fe.key(slot)) }?.backend_id;
    Some(Chosen { id, backend: lookup_backend(id)?, slot })
}

/// The affinity key of `client` for the frontend's Service port.
#[inline(always)]
fn affinity_key(svc: &SvcValue, client: Client) -> AffinityKey {
    let (c, kind) = match client {
        Client::Addr(a) => (u64::from(a), proxy_common::affinity::AFFINITY_CLIENT_ADDR),
        Client::Netns(n) => (n, proxy_common::affinity::AFFINITY_CLIENT_NETNS),
    };
    AffinityKey { client: c, group: svc.backend_id, client_kind: kind, _pad: [0; 3] }
}

/// Picks the backend for a new flow of `client` to `fe` (count > 0).
///
/// With `sessionAffinity: ClientIP` (`affinity_timeout_s != 0`), a client
/// seen within the timeout gets the backend it had, provided the slot it
/// came from still holds it (a backend that left the Service is never
/// chosen from an affinity entry; a backend moved to another slot by a
/// removal loses its clients' affinity once); the entry is refreshed by
/// every new flow, so the timeout counts idle time, as kube-proxy's.
#[inline(always)]
pub fn select_backend(fe: &Frontend, svc: &SvcValue, client: Client, now: u64, len: u32) -> Option<Chosen> {
    if svc.affinity_timeout_s == 0 {
        return random_slot(fe, svc);
    }
    let key = affinity_key(svc, client);
    let timeout = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
    if let Some(c) = remembered(fe, svc, &key, timeout, 0, now) {
        count(stats::AFFINITY_HIT, len);
        return Some(c);
    }
    let c = random_slot(fe, svc)?;
    remember(&key, &c, now);
    Some(c)
}

/// The backend an affinity entry (`proxy_affinity_v1`) remembers for `key`,
/// if it was used within `timeout_ns` and the slot it came from still holds
/// it; its last use is refreshed when older than `refresh_ns`.
#[inline(always)]
pub fn remembered(fe: &Frontend, svc: &SvcValue, key: &AffinityKey, timeout_ns: u64, refresh_ns: u64, now: u64) -> Option<Chosen> {
    let ptr = AFFINITY.get_ptr_mut(key)?;
    // SAFETY: pointer from a successful lookup; a racing refresh can only
    // make last_seen newer.
    let a = unsafe { &mut *ptr };
    // Why saturating: another CPU may have refreshed the entry after `now`
    // was read; that entry is fresh, not 584 years old.
    let age = now.saturating_sub(a.last_seen_ns);
    if age > timeout_ns || !slot_holds(fe, svc, a.slot, a.backend_id) {
        return None;
    }
    let backend = lookup_backend(a.backend_id)?;
    if age > refresh_ns {
        a.last_seen_ns = now;
    }
    Some(Chosen { id: a.backend_id, backend, slot: a.slot })
}

/// Records `c` as the backend of `key`, used now.
#[inline(always)]
pub fn remember(key: &AffinityKey, c: &Chosen, now: u64) {
    let v = AffinityValue { backend_id: c.id, slot: c.slot, _pad: [0; 2], last_seen_ns: now };
    let _ = AFFINITY.insert(key, &v, 0);
}

/// Whether a tracked flow (SERVICE entry `entry`, packet `p` to frontend
/// `fe`) may keep its backend.
///
/// Why: a TCP SYN on a closing entry starts a new connection reusing the
/// tuple (port reuse), so it is balanced anew; a SYN on an open entry is a
/// retransmission of the flow's first packet (its SYN-ACK was lost or slow)
/// and keeps the flow — balancing it anew would leave the first attempt's
/// entries, and with SNAT its source port, taken until they time out, as
/// conntrack keeps a SYN_SENT entry for a retransmitted SYN. An established
/// TCP flow keeps its backend even after the backend left the Service, as
/// kube-proxy's conntrack does. A UDP flow moves as soon as its backend is
/// no longer an endpoint of this frontend (its slot no longer holds it),
/// even while other Services still use that backend — kube-proxy deletes
/// the UDP conntrack entries of an endpoint that leaves a Service port.
#[inline(always)]
pub fn flow_keeps_backend(p: &Packet, svc: &SvcValue, entry: &CtValue, len: u32) -> bool {
    if p.proto == proto::TCP {
        let syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if !syn {
            return true;
        }
        if entry.flags & CT_F_CLOSING != 0 {
            return false;
        }
    }
    let present = match lookup_backend(entry.backend_id) {
        Some(b) => b.addr_be == entry.nat_addr_be && b.port_be == entry.nat_port_be,
        None => false,
    };
    if p.proto == proto::UDP && present && entry.slot != 0 && !slot_holds(&Frontend::of(p), svc, entry.slot, entry.backend_id) {
        count(stats::UDP_FLOW_MOVED, len);
        return false;
    }
    present
}

/// Whether `client_be` may start a flow to `svc`: anyone, unless it is a
/// `LoadBalancer` frontend with `loadBalancerSourceRanges`, whose client
/// must lie in one of them (the agent lists the node's own addresses too,
/// so health checks and hairpin traffic pass, as with kube-proxy).
#[inline(always)]
pub fn source_allowed(svc: &SvcValue, client_be: u32) -> bool {
    if svc.flags & SVC_FLAG_SOURCE_RANGES == 0 {
        return true;
    }
    SRC_RANGES.get(&crate::maps::src_range_key(svc.svc_id, client_be)).is_some()
}

/// Whether this packet may create a flow: any UDP datagram, and for TCP
/// only a SYN (without ACK). Other TCP packets of no tracked flow create
/// nothing (see `stats::DROP_NO_FLOW`).
#[inline(always)]
pub fn may_create_flow(p: &Packet) -> bool {
    p.proto != proto::TCP || p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

#[inline(always)]
pub fn closes(p: &Packet) -> bool {
    p.proto == proto::TCP && p.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// Whether a new flow from `client_be` to `backend` through `svc` needs its
/// source NATed.
///
/// Why: a reply must come back through this node to be translated back.
/// That holds by itself for a backend on this node and for cluster-internal
/// clients; an external client's packets to a backend on another node
/// (externalTrafficPolicy Cluster) need the node as source. A hairpin (the
/// client is the backend) needs it too: a pod drops a packet from its own
/// address, so kube-proxy masquerades it.
#[inline(always)]
pub fn needs_snat(client_be: u32, svc: &SvcValue, backend: &Backend) -> bool {
    backend.addr_be == client_be || (svc.flags & SVC_FLAG_SNAT_REMOTE != 0 && backend.flags & BACKEND_F_LOCAL == 0)
}
