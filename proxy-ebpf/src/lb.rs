//! The load-balancing library: frontend lookup, backend choice (random,
//! or by session affinity), whether a tracked flow keeps its backend, and
//! the SNAT decision. Every program is a thin caller: TC ([`crate::tc`]),
//! XDP ([`crate::xdp`]) and the cgroup socket programs ([`crate::sock`])
//! decide the same way from `(frontend address, port, protocol, client)`,
//! so a new path or a new selection algorithm is one new caller, not
//! another copy (Cilium's `lb4_lookup_service` / `lb4_select_backend`
//! play this role).
//!
//! Every function is generic over the address family
//! ([`crate::family::Family`]): IPv4 and IPv6 frontends are looked up in
//! their own maps (`proxy_svc_v1` / `proxy_svc6_v1`, `proxy_be_v1` /
//! `proxy_be6_v1`) and decided by the same code.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    affinity::{AffinityKey, AffinityValue},
    backend::BACKEND_F_LOCAL,
    ct::CT_F_CLOSING,
    proto, stats,
    svc::{SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_SNAT_REMOTE, SVC_FLAG_SOURCE_RANGES, SvcValue},
};

use crate::{
    family::{Be, CtEntry, Family},
    maps::AFFINITY,
    parse::Pkt,
    stats::count,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A frontend as a packet or a socket call addresses it.
pub struct Frontend<F: Family> {
    pub addr_be: F::Addr,
    pub port_be: u16,
    pub proto: u8,
}

impl<F: Family> Frontend<F> {
    /// The destination of a packet (client → frontend).
    #[inline(always)]
    pub fn of(p: &Pkt<F>) -> Self {
        Self { addr_be: p.daddr_be, port_be: p.dport_be, proto: p.proto }
    }

    #[inline(always)]
    fn key(&self, slot: u16) -> F::SvcKey {
        F::svc_key(self.addr_be, self.port_be, self.proto, slot)
    }
}

/// Who is asking, for session affinity.
pub enum Client<F: Family> {
    /// The client's address (per-packet paths).
    Addr(F::Addr),
    /// A network-namespace cookie (socket path: the source address is not
    /// chosen yet at `connect()`).
    Netns(u64),
}

/// The frontend entry (slot 0), if `fe` is one.
#[inline(always)]
pub fn lookup_service<F: Family>(fe: &Frontend<F>) -> Option<SvcValue> {
    F::svc(&fe.key(0))
}


/// Whether slot `slot` of `fe` still holds backend `id` (the backend is
/// still an endpoint of this frontend).
#[inline(always)]
pub fn slot_holds<F: Family>(fe: &Frontend<F>, svc: &SvcValue, slot: u16, id: u32) -> bool {
    if slot == 0 || slot > svc.count {
        return false;
    }
    F::svc(&fe.key(slot)).is_some_and(|v| v.backend_id == id)
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
pub struct Chosen<A> {
    pub id: u32,
    pub backend: Be<A>,
    /// The slot it was chosen from (recorded in conntrack and affinity).
    pub slot: u16,
}

/// Uniformly at random among the frontend's slots.
///
/// Why random and not a hash of the source port: Linux hands out even
/// ephemeral ports to `connect()`, so a modulo of the port skews badly.
#[inline(always)]
fn random_slot<F: Family>(fe: &Frontend<F>, svc: &SvcValue) -> Option<Chosen<F::Addr>> {
    // Callers check the count; a subprogram's verifier cannot see that.
    if svc.count == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    let slot = (r % u32::from(svc.count)) as u16 + 1;
    let id = F::svc(&fe.key(slot))?.backend_id;
    Some(Chosen { id, backend: F::backend(id)?, slot })
}

/// The affinity key of `client` for the frontend's Service port.
#[inline(always)]
fn affinity_key<F: Family>(svc: &SvcValue, client: Client<F>) -> AffinityKey {
    let (c, kind) = match client {
        Client::Addr(a) => F::affinity_client(a),
        Client::Netns(n) => (n, F::AFFINITY_NETNS),
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
pub fn select_backend<F: Family>(fe: &Frontend<F>, svc: &SvcValue, client: Client<F>, now: u64, len: u32) -> Option<Chosen<F::Addr>> {
    if svc.affinity_timeout_s == 0 {
        return random_slot(fe, svc);
    }
    let key = affinity_key(svc, client);
    let timeout = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
    if let Some(c) = remembered(fe, svc, &key, timeout, 0, now) {
        count::<F>(stats::AFFINITY_HIT, len);
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
pub fn remembered<F: Family>(fe: &Frontend<F>, svc: &SvcValue, key: &AffinityKey, timeout_ns: u64, refresh_ns: u64, now: u64) -> Option<Chosen<F::Addr>> {
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
    let backend = F::backend(a.backend_id)?;
    if age > refresh_ns {
        a.last_seen_ns = now;
    }
    Some(Chosen { id: a.backend_id, backend, slot: a.slot })
}

/// Records `c` as the backend of `key`, used now.
#[inline(always)]
pub fn remember<A>(key: &AffinityKey, c: &Chosen<A>, now: u64) {
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
pub fn flow_keeps_backend<F: Family>(p: &Pkt<F>, svc: &SvcValue, entry: &F::CtValue, len: u32) -> bool {
    // SCTP: the same, by its first chunk (INIT is a SYN: see `Pkt::tcp_flags`).
    if proto::is_connected(p.proto) {
        let syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if !syn {
            return true;
        }
        if entry.flags() & CT_F_CLOSING != 0 {
            return false;
        }
    }
    let present = match F::backend(entry.backend_id()) {
        Some(b) => b.addr == entry.nat_addr() && b.port_be == entry.nat_port(),
        None => false,
    };
    if p.proto == proto::UDP && present && entry.slot() != 0 && !slot_holds(&Frontend::of(p), svc, entry.slot(), entry.backend_id()) {
        count::<F>(stats::UDP_FLOW_MOVED, len);
        return false;
    }
    present
}

/// Whether `client_be` may start a flow to `svc`: anyone, unless it is a
/// `LoadBalancer` frontend with `loadBalancerSourceRanges`, whose client
/// must lie in one of them (the agent lists the node's own addresses too,
/// so health checks and hairpin traffic pass, as with kube-proxy).
#[inline(always)]
pub fn source_allowed<F: Family>(svc: &SvcValue, client_be: F::Addr) -> bool {
    if svc.flags & SVC_FLAG_SOURCE_RANGES == 0 {
        return true;
    }
    F::source_in_ranges(svc.svc_id, client_be)
}

/// Whether this packet may create a flow: any UDP datagram, and for TCP
/// only a SYN (without ACK), for SCTP only an INIT. Other TCP and SCTP
/// packets of no tracked flow create nothing (see `stats::DROP_NO_FLOW`).
#[inline(always)]
pub fn may_create_flow<F: Family>(p: &Pkt<F>) -> bool {
    !proto::is_connected(p.proto) || p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

#[inline(always)]
pub fn closes<F: Family>(p: &Pkt<F>) -> bool {
    // SCTP: ABORT, SHUTDOWN COMPLETE.
    proto::is_connected(p.proto) && p.tcp_flags & (TCP_FIN | TCP_RST) != 0
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
pub fn needs_snat<A: PartialEq>(client_be: A, svc: &SvcValue, backend: &Be<A>) -> bool {
    backend.addr == client_be || (svc.flags & SVC_FLAG_SNAT_REMOTE != 0 && backend.flags & BACKEND_F_LOCAL == 0)
}
