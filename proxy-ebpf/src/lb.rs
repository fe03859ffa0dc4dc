//! Service lookup, backend selection and the ingress decision.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use proxy_common::{
    backend::{BACKEND_F_LOCAL, Backend},
    ct::{CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_CLOSING, CT_F_REDIRECT, CT_F_SNAT, CtValue},
    proto, stats,
    svc::{SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_SNAT_REMOTE, SVC_FLAGS_EXTERNAL, SvcKey, SvcValue},
};

use crate::{
    TC_NEXT, ct, fib,
    maps::{BACKEND, SVC},
    nat,
    parse::{Packet, parse_ipv4_l4},
    reject,
    stats::count,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[inline(always)]
fn svc_key(p: &Packet, slot: u16) -> SvcKey {
    SvcKey {
        addr_be: p.daddr_be,
        port_be: p.dport_be,
        backend_slot: slot,
        proto: p.proto,
        scope: 0,
        _pad: [0; 2],
    }
}

/// The frontend entry (slot 0) for the packet's destination, if any.
#[inline(always)]
pub fn lookup_service(p: &Packet) -> Option<SvcValue> {
    // SAFETY: the value is copied out at once.
    unsafe { SVC.get(svc_key(p, 0)).copied() }
}

#[inline(always)]
fn lookup_backend(id: u32) -> Option<Backend> {
    // SAFETY: the value is copied out at once.
    unsafe { BACKEND.get(id).copied() }
}

/// Picks a backend uniformly at random among the frontend's slots.
#[inline(always)]
pub fn select_backend(p: &Packet, svc: &SvcValue) -> Option<(u32, Backend)> {
    // SAFETY: helper without arguments.
    let r = unsafe { bpf_get_prandom_u32() };
    let slot = (r % u32::from(svc.count)) as u16 + 1;
    // SAFETY: the value is copied out at once.
    let id = unsafe { SVC.get(svc_key(p, slot)) }?.backend_id;
    Some((id, lookup_backend(id)?))
}

/// Whether a tracked flow may keep its backend.
///
/// Why: a TCP SYN on a closing entry starts a new connection reusing the
/// tuple (port reuse), so it is balanced anew; a SYN on an open entry is a
/// retransmission of the flow's first packet (its SYN-ACK was lost or slow)
/// and keeps the flow — balancing it anew would leave the first attempt's
/// entries, and with SNAT its source port, taken until they time out, as
/// conntrack keeps a SYN_SENT entry for a retransmitted SYN. An established
/// TCP flow keeps its backend even after the backend left the Service, as
/// kube-proxy's conntrack does; a UDP flow, or a SYN whose backend is gone,
/// moves (kube-proxy deletes UDP conntrack entries of removed endpoints).
#[inline(always)]
pub fn flow_keeps_backend(p: &Packet, entry: &CtValue) -> bool {
    if p.proto == proto::TCP {
        let syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if !syn {
            return true;
        }
        if entry.flags & CT_F_CLOSING != 0 {
            return false;
        }
    }
    match lookup_backend(entry.backend_id) {
        Some(b) => b.addr_be == entry.nat_addr_be && b.port_be == entry.nat_port_be,
        None => false,
    }
}

#[inline(always)]
pub fn closes(p: &Packet) -> bool {
    p.proto == proto::TCP && p.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// Whether a new flow to `backend` through `svc` needs its source NATed.
///
/// Why: a reply must come back through this node to be translated back.
/// That holds by itself for a backend on this node and for cluster-internal
/// clients; an external client's packets to a backend on another node
/// (externalTrafficPolicy Cluster) need the node as source. A hairpin (the
/// client is the backend) needs it too: a pod drops a packet from its own
/// address, so kube-proxy masquerades it.
#[inline(always)]
fn lb4_needs_snat(p: &Packet, svc: &SvcValue, backend: &Backend) -> bool {
    backend.addr_be == p.saddr_be
        || (svc.flags & SVC_FLAG_SNAT_REMOTE != 0 && backend.flags & BACKEND_F_LOCAL == 0)
}

#[inline(always)]
pub fn handle_ingress(ctx: &TcContext) -> Result<i32, i32> {
    let len = ctx.len();
    let p = match parse_ipv4_l4(ctx) {
        Ok(p) => p,
        Err(stats::PASS_OTHER_PROTO) => return Ok(other_proto(ctx, len)),
        Err(reason) => {
            count(reason, len);
            return Ok(TC_NEXT);
        }
    };

    let Some(svc) = lookup_service(&p) else {
        return handle_reply(ctx, &p, len);
    };
    if svc.count == 0 {
        // Why: kube-proxy rejects when a Service has no endpoints at all, but
        // drops when it has some and none is usable from this node.
        if svc.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0 {
            count(stats::DROP_NO_LOCAL_BACKEND, len);
            return Err(TC_ACT_SHOT as i32);
        }
        return Ok(reject::port_unreachable(ctx, &p, len));
    }

    let now = ct::now_ns();
    let fwd_key = ct::key_of(&p, CT_DIR_SERVICE);
    if let Some(entry) = ct::lookup_live(&fwd_key, now) {
        if flow_keeps_backend(&p, &entry) {
            if closes(&p) {
                ct::close_from_service(&p, &entry);
            }
            return forward(ctx, &p, &entry, len, stats::DNAT_ESTABLISHED);
        }
    }

    let Some((backend_id, backend)) = select_backend(&p, &svc) else {
        count(stats::DROP_BACKEND_MISSING, len);
        return Err(TC_ACT_SHOT as i32);
    };
    let external = svc.flags & SVC_FLAGS_EXTERNAL != 0;
    let mut flow = ct::NewFlow {
        backend_addr_be: backend.addr_be,
        backend_port_be: backend.port_be,
        backend_id,
        svc_id: svc.svc_id,
        // Why: the reply of an external frontend may carry a node address
        // as source once translated back (NodePort): send it out directly.
        flags: if external { CT_F_REDIRECT } else { 0 },
        snat_addr_be: 0,
    };
    if lb4_needs_snat(&p, &svc, &backend) {
        // The address the kernel would masquerade to for this route.
        let Some(route) = fib::lookup(ctx, p.proto, p.saddr_be, backend.addr_be) else {
            count(stats::FIB_NO_ROUTE, len);
            return Err(TC_ACT_SHOT as i32);
        };
        flow.snat_addr_be = route.src_be;
        flow.flags |= CT_F_REDIRECT;
    }
    let Some(entry) = ct::create(&p, &flow, now) else {
        count(stats::DROP_SNAT_EXHAUSTED, len);
        return Err(TC_ACT_SHOT as i32);
    };
    forward(ctx, &p, &entry, len, stats::DNAT_NEW)
}

/// Not TCP/UDP: an ICMP error about a translated flow is translated back;
/// anything else passes.
#[inline(always)]
fn other_proto(ctx: &TcContext, len: u32) -> i32 {
    let is_icmp = ctx.load::<u8>(crate::parse::ETH_HLEN + crate::parse::IP_PROTO).is_ok_and(|p| p == proto::ICMP);
    let ihl = ctx.load::<u8>(crate::parse::ETH_HLEN).map_or(0, |v| usize::from(v & 0x0f) * 4);
    if is_icmp && ihl >= 20 {
        return crate::icmp::handle(ctx, ihl, false);
    }
    count(stats::PASS_OTHER_PROTO, len);
    TC_NEXT
}

/// TC egress: only ICMP errors the node sends about translated flows.
#[inline(always)]
pub fn handle_egress(ctx: &TcContext) -> i32 {
    let is_ipv4 = ctx.load::<u16>(12).is_ok_and(|t| t == crate::parse::ETH_P_IP_BE);
    let is_icmp = ctx.load::<u8>(crate::parse::ETH_HLEN + crate::parse::IP_PROTO).is_ok_and(|p| p == proto::ICMP);
    let ihl = ctx.load::<u8>(crate::parse::ETH_HLEN).map_or(0, |v| usize::from(v & 0x0f) * 4);
    if is_ipv4 && is_icmp && ihl >= 20 {
        return crate::icmp::handle(ctx, ihl, true);
    }
    TC_NEXT
}

/// Applies a SERVICE entry: DNAT, SNAT when the flow has it, and the FIB
/// redirect when the source is now a local address.
///
/// Why the MTU check comes first: a redirected packet bypasses the stack's
/// forwarding (no fragmentation, no "fragmentation needed"), so a packet
/// too big for the egress device is answered here, while it still is what
/// the client sent: the error quotes it and comes from the frontend.
#[inline(always)]
fn forward(ctx: &TcContext, p: &Packet, e: &CtValue, len: u32, reason: u32) -> Result<i32, i32> {
    let mut out = fib::Egress::NoRoute;
    if e.flags & CT_F_SNAT != 0 {
        out = fib::egress(ctx, p.proto, e.snat_addr_be, e.nat_addr_be);
        if let fib::Egress::TooBig(mtu) = out {
            return Ok(reject::frag_needed(ctx, p, p.daddr_be, mtu, len));
        }
    }
    if nat::dnat(ctx, p, e.nat_addr_be, e.nat_port_be).is_err() {
        count(stats::DROP_REWRITE_FAILED, len);
        return Err(TC_ACT_SHOT as i32);
    }
    count(reason, len);
    if e.flags & CT_F_SNAT == 0 {
        return Ok(TC_ACT_OK as i32);
    }
    if nat::snat(ctx, p, e.snat_addr_be, e.snat_port_be).is_err() {
        count(stats::DROP_REWRITE_FAILED, len);
        return Err(TC_ACT_SHOT as i32);
    }
    Ok(fib::send(ctx, out))
}

/// A packet that is not addressed to a frontend: a reply of a translated
/// flow gets its source (and with SNAT its destination) restored; anything
/// else passes untouched.
#[inline(always)]
fn handle_reply(ctx: &TcContext, p: &Packet, len: u32) -> Result<i32, i32> {
    let key = ct::key_of(p, CT_DIR_REPLY);
    let Some(e) = ct::lookup_live(&key, ct::now_ns()) else {
        count(stats::PASS_NO_SERVICE, len);
        return Ok(TC_NEXT);
    };
    let snat = e.flags & CT_F_SNAT != 0;
    let dst = if snat { e.snat_addr_be } else { p.daddr_be };
    // As in `forward`: checked before translation. The error goes back to
    // the backend, quoting its packet, from the address it sent to (the
    // node's SNAT address; the frontend when the client's own address is
    // the destination).
    let mut out = fib::Egress::NoRoute;
    if e.flags & CT_F_REDIRECT != 0 {
        out = fib::egress(ctx, p.proto, e.nat_addr_be, dst);
        if let fib::Egress::TooBig(mtu) = out {
            return Ok(reject::frag_needed(ctx, p, if snat { p.daddr_be } else { e.nat_addr_be }, mtu, len));
        }
    }
    if closes(p) {
        ct::close_from_reply(p, &e);
    }
    if nat::snat(ctx, p, e.nat_addr_be, e.nat_port_be).is_err() {
        count(stats::DROP_REWRITE_FAILED, len);
        return Err(TC_ACT_SHOT as i32);
    }
    if snat && nat::dnat(ctx, p, e.snat_addr_be, e.snat_port_be).is_err() {
        count(stats::DROP_REWRITE_FAILED, len);
        return Err(TC_ACT_SHOT as i32);
    }
    count(stats::REV_NAT, len);
    if e.flags & CT_F_REDIRECT != 0 {
        return Ok(fib::send(ctx, out));
    }
    Ok(TC_ACT_OK as i32)
}
