//! The per-packet path (TC ingress and egress on every `--devices` match):
//! DNAT of packets to a frontend, reverse NAT of replies, rejects, SNAT for
//! external frontends, ICMP errors. The decisions come from [`crate::lb`].
//!
//! `L3` is where the IP header starts: `ETH_HLEN` on Ethernet devices
//! (pod veths, uplinks, VXLAN), 0 on L3 devices without a link-layer header
//! (IPIP, WireGuard, GRE, TUN), which get their own program variant.
//!
//! Both families take the same path ([`ingress`], [`handle_reply`],
//! [`forward`], generic over [`Family`]); only parsing and ICMP differ.
//! Each family's handler is its own BPF subprogram (`#[inline(never)]`):
//! the verifier then bounds the stack per call chain, so the IPv6 path's
//! larger addresses never share a frame with the IPv4 path's, and each
//! stays within the 512-byte limit (see also `ct::Work`).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{
    ct::{CT_DIR_REPLY, CT_F_REDIRECT, CT_F_SNAT},
    proto, stats,
    svc::SVC_FLAGS_EXTERNAL,
};

use crate::{
    TC_NEXT, ct,
    family::{CtEntry, Family, V4, V6},
    fib,
    lb::{self, Client, Empty, Frontend},
    nat,
    parse::{IP_PROTO, NEXTHDR_ICMPV6, Pkt, is_ipv6, parse_ipv4_l4, parse_ipv6_l4, parse_ipv6_ports, walk_ipv6},
    stats::{count, count_in},
};

/// What the IPv6 handlers return for an ICMPv6 message: not a verdict, a
/// request to run the ICMPv6 subprogram ([`icmp6`]).
const ICMP6: i32 = i32::MIN;
/// What [`ingress`] returns for a packet that starts a new flow to a
/// frontend with backends: not a verdict, a request to run [`new_flow`].
const NEW_FLOW: i32 = i32::MIN + 1;

/// TC ingress: IPv6 to its handler, everything else to the IPv4 one (which
/// passes what is not IPv4, as before there was an IPv6 path).
///
/// Why the ICMPv6 handler and the creation of a new IPv6 flow are called
/// from here and not from `ingress6`: the verifier sums the stack frames
/// along a call chain (512 bytes in all); each IPv6 stage is close to half
/// of that, side by side they fit. The new-flow stage parses the packet
/// again (the first packet of a flow only).
#[inline(always)]
pub fn handle_ingress<const L3: usize>(ctx: &TcContext) -> i32 {
    if is_ipv6(ctx, L3) {
        let v = ingress6::<L3>(TcContext::new(ctx.skb.skb));
        if v == ICMP6 {
            return icmp6::<L3>(TcContext::new(ctx.skb.skb), false);
        }
        if v == NEW_FLOW {
            return new_flow6::<L3>(TcContext::new(ctx.skb.skb));
        }
        return v;
    }
    ingress4::<L3>(TcContext::new(ctx.skb.skb))
}

/// TC egress, dispatched the same way.
#[inline(always)]
pub fn handle_egress<const L3: usize>(ctx: &TcContext) -> i32 {
    if is_ipv6(ctx, L3) {
        let v = egress6::<L3>(TcContext::new(ctx.skb.skb));
        if v == ICMP6 {
            return icmp6::<L3>(TcContext::new(ctx.skb.skb), true);
        }
        return v;
    }
    egress4::<L3>(TcContext::new(ctx.skb.skb))
}

/// An ICMPv6 message ([`crate::icmp6::handle`]), walked again (cheap: the
/// walk found it before).
#[inline(never)]
fn icmp6<const L3: usize>(ctx: TcContext, egress: bool) -> i32 {
    match walk_ipv6(&ctx, L3) {
        Ok(h) => crate::icmp6::handle(&ctx, L3, &h, egress),
        Err(_) => TC_NEXT,
    }
}

#[inline(never)]
fn ingress4<const L3: usize>(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let p = match parse_ipv4_l4(&ctx, L3) {
        Ok(p) => p,
        Err(stats::PASS_OTHER_PROTO) => return other_proto(&ctx, L3, len),
        Err(reason) => {
            // Why these two are family `other`: `parse_ipv4_l4` turns away
            // what is not IPv4 (`pass_not_ipv4`) and a frame too short to
            // hold an Ethertype (`malformed_truncated`, `len < L3`) before
            // it looks at an IPv4 header; every other reason is about one.
            let no_family = reason == stats::PASS_NOT_IPV4 || len < L3 as u32;
            let family = if no_family { stats::FAMILY_OTHER } else { stats::FAMILY_IPV4 };
            count_in(family, reason, len);
            return TC_NEXT;
        }
    };
    match ingress::<V4>(&ctx, &p, len) {
        Ok(NEW_FLOW) => match new_flow::<V4>(&ctx, &p, len) {
            Ok(v) | Err(v) => v,
        },
        Ok(v) | Err(v) => v,
    }
}

#[inline(never)]
fn ingress6<const L3: usize>(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let h = match walk_ipv6(&ctx, L3) {
        Ok(h) => h,
        Err(reason) => {
            count::<V6>(reason, len);
            return TC_NEXT;
        }
    };
    if h.next == NEXTHDR_ICMPV6 {
        return ICMP6;
    }
    let p = match parse_ipv6_l4(&ctx, L3, &h) {
        Ok(p) => p,
        Err(reason) => {
            count::<V6>(reason, len);
            return TC_NEXT;
        }
    };
    match ingress::<V6>(&ctx, &p, len) {
        Ok(v) | Err(v) => v,
    }
}

/// The second IPv6 ingress stage: a packet [`ingress`] found to start a
/// new flow (see [`handle_ingress`]); never a later fragment, and a first
/// fragment's ports were remembered by the first stage.
#[inline(never)]
fn new_flow6<const L3: usize>(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let Ok(p) = walk_ipv6(&ctx, L3).and_then(|h| parse_ipv6_ports(&ctx, L3, &h)) else {
        return TC_NEXT;
    };
    match new_flow::<V6>(&ctx, &p, len) {
        Ok(v) | Err(v) => v,
    }
}

/// A TCP/UDP/SCTP packet at ingress: to a frontend (DNAT of a tracked flow,
/// reject, drop), or a reply of a translated flow, or not ours. A packet
/// that may start a new flow to a frontend with backends is `NEW_FLOW`:
/// the caller runs [`new_flow`].
#[inline(always)]
fn ingress<F: Family>(ctx: &TcContext, p: &Pkt<F>, len: u32) -> Result<i32, i32> {
    let fe = Frontend::of(p);
    let Some(svc) = lb::lookup_service(&fe) else {
        return handle_reply(ctx, p, len);
    };
    if !p.has_l4() {
        // A later fragment follows its first fragment's flow; it never
        // starts one (nor is it rejected: the first fragment was).
        let Some(entry) = ct::service_entry(p, ct::now_ns(), len) else {
            count::<F>(stats::PASS_FRAGMENT, len);
            return Ok(TC_NEXT);
        };
        return forward(ctx, p, entry, len, stats::FRAGMENT_TRANSLATED);
    }
    // Why the flow first: an established connection keeps its backend
    // while the Service has no usable endpoint for a moment (readiness
    // flapping); kube-proxy rejects only new connections then.
    let now = ct::now_ns();
    if let Some(entry) = ct::service_entry(p, now, len)
        && lb::flow_keeps_backend(p, &svc, entry, len)
    {
        if lb::closes(p) {
            ct::close_from_service(p, entry);
        }
        return forward(ctx, p, entry, len, stats::DNAT_ESTABLISHED);
    }
    if svc.count == 0 {
        if lb::when_empty(&svc) == Empty::Drop {
            count::<F>(stats::DROP_NO_LOCAL_BACKEND, len);
            return Err(TC_ACT_SHOT as i32);
        }
        return Ok(F::port_unreachable(ctx, p, len));
    }
    Ok(NEW_FLOW)
}

/// A packet to a frontend with backends that is not of a tracked flow
/// (keeping its backend): the backend chosen, the flow recorded (with SNAT
/// when needed), the packet translated.
#[inline(always)]
fn new_flow<F: Family>(ctx: &TcContext, p: &Pkt<F>, len: u32) -> Result<i32, i32> {
    let fe = Frontend::of(p);
    // Looked up again (not passed along): for IPv6 this runs in another
    // subprogram. A frontend emptied in between has no slot to choose
    // from (`drop_backend_missing`).
    let Some(svc) = lb::lookup_service(&fe) else {
        count::<F>(F::PASS_NO_SERVICE, len);
        return Ok(TC_NEXT);
    };
    let now = ct::now_ns();
    if !lb::may_create_flow(p) {
        count::<F>(stats::DROP_NO_FLOW, len);
        return Err(TC_ACT_SHOT as i32);
    }
    if !lb::source_allowed::<F>(&svc, p.saddr_be) {
        count::<F>(stats::DROP_SOURCE_RANGE, len);
        return Err(TC_ACT_SHOT as i32);
    }
    let Some(chosen) = lb::select_backend(&fe, &svc, Client::Addr(p.saddr_be), now, len) else {
        count::<F>(stats::DROP_BACKEND_MISSING, len);
        return Err(TC_ACT_SHOT as i32);
    };
    let backend = chosen.backend;
    let external = svc.flags & SVC_FLAGS_EXTERNAL != 0;
    // Why the redirect flag: the reply of an external frontend may carry a
    // node address as source once translated back (NodePort): send it out
    // directly.
    let mut flow = ct::NewFlow::to(&chosen, svc.svc_id, if external { CT_F_REDIRECT } else { 0 });
    if lb::needs_snat(p.saddr_be, &svc, &backend) {
        // The address the kernel would masquerade to for this route.
        let Some(src) = fib::masquerade_src::<F>(ctx, p.proto, p.saddr_be, backend.addr) else {
            count::<F>(stats::FIB_NO_ROUTE, len);
            return Err(TC_ACT_SHOT as i32);
        };
        flow.snat_addr_be = src;
        flow.flags |= CT_F_REDIRECT;
    }
    let Some(entry) = ct::create(p, &flow, now, len) else {
        count::<F>(stats::DROP_SNAT_EXHAUSTED, len);
        return Err(TC_ACT_SHOT as i32);
    };
    forward(ctx, p, entry, len, stats::DNAT_NEW)
}

/// The IPv4 header length, when the packet is IPv4 with protocol `want`.
#[inline(always)]
fn ipv4_ihl_if(ctx: &TcContext, l3: usize, want: u8) -> Option<usize> {
    let is = ctx.load::<u8>(l3 + IP_PROTO).is_ok_and(|p| p == want);
    let vihl = ctx.load::<u8>(l3).unwrap_or(0);
    let ihl = usize::from(vihl & 0x0f) * 4;
    // Why the version too: the Ethertype (or skb->protocol) can say IPv4
    // over a header that is not (found by the fuzzer on egress).
    (is && vihl >> 4 == 4 && ihl >= 20).then_some(ihl)
}

/// Not TCP/UDP/SCTP: an ICMP error about a translated flow is translated back;
/// anything else passes.
#[inline(always)]
fn other_proto(ctx: &TcContext, l3: usize, len: u32) -> i32 {
    if let Some(ihl) = ipv4_ihl_if(ctx, l3, proto::ICMP) {
        return crate::icmp::handle(ctx, l3, ihl, false);
    }
    count::<V4>(stats::PASS_OTHER_PROTO, len);
    TC_NEXT
}

#[inline(never)]
fn egress4<const L3: usize>(ctx: TcContext) -> i32 {
    let p = match parse_ipv4_l4(&ctx, L3) {
        Ok(p) => p,
        Err(stats::PASS_OTHER_PROTO) => {
            return match ipv4_ihl_if(&ctx, L3, proto::ICMP) {
                Some(ihl) => crate::icmp::handle(&ctx, L3, ihl, true),
                None => TC_NEXT,
            };
        }
        Err(_) => return TC_NEXT,
    };
    egress(&ctx, &p)
}

#[inline(never)]
fn egress6<const L3: usize>(ctx: TcContext) -> i32 {
    let Ok(h) = walk_ipv6(&ctx, L3) else {
        return TC_NEXT;
    };
    if h.next == NEXTHDR_ICMPV6 {
        return ICMP6;
    }
    match parse_ipv6_l4(&ctx, L3, &h) {
        Ok(p) => egress(&ctx, &p),
        Err(_) => TC_NEXT,
    }
}

/// TC egress: ICMP errors the node sends about translated flows, and
/// replies the node itself sends for a flow that was translated to one of
/// its own addresses (a hostNetwork endpoint on this node: `kubernetes.default`
/// on a control-plane node, an ingress controller on hostNetwork). Such a
/// reply never enters through a device, so ingress cannot restore its
/// source; it is restored here, on its way out. Packets of no tracked flow
/// pass uncounted (egress sees everything the node sends).
#[inline(always)]
fn egress<F: Family>(ctx: &TcContext, p: &Pkt<F>) -> i32 {
    let Some(e) = ct::lookup_packet(p, CT_DIR_REPLY, ct::now_ns()) else {
        return TC_NEXT;
    };
    // Already routed: it leaves by this device as it is.
    match rev_nat(ctx, p, e, ctx.len()) {
        Ok(()) => TC_ACT_OK as i32,
        Err(v) => v,
    }
}

/// Translates a reply with REPLY entry `e` back: source restored to the
/// frontend, with SNAT the destination to the client; the flow confirmed,
/// closed on FIN/RST. Counted.
#[inline(always)]
fn rev_nat<F: Family>(ctx: &TcContext, p: &Pkt<F>, e: &F::CtValue, len: u32) -> Result<(), i32> {
    ct::confirm_from_reply(p, e);
    if lb::closes(p) {
        ct::close_from_reply(p, e);
    }
    if nat::snat(ctx, p, e.nat_addr(), e.nat_port()).is_err()
        || (e.flags() & CT_F_SNAT != 0 && nat::dnat(ctx, p, e.snat_addr(), e.snat_port()).is_err())
        || crate::sctp::fix_csum(ctx, p).is_err()
    {
        count::<F>(stats::DROP_REWRITE_FAILED, len);
        return Err(TC_ACT_SHOT as i32);
    }
    count::<F>(if p.has_l4() { stats::REV_NAT } else { stats::FRAGMENT_TRANSLATED }, len);
    Ok(())
}

/// Applies a SERVICE entry: DNAT, SNAT when the flow has it, and the FIB
/// redirect when the source is now a local address.
///
/// Why the MTU check comes first: a redirected packet bypasses the stack's
/// forwarding (no fragmentation, no "fragmentation needed"), so a packet
/// too big for the egress device is answered here, while it still is what
/// the client sent: the error quotes it and comes from the frontend.
#[inline(always)]
fn forward<F: Family>(ctx: &TcContext, p: &Pkt<F>, e: &F::CtValue, len: u32, reason: u32) -> Result<i32, i32> {
    let mut out = fib::Egress::NoRoute;
    if e.flags() & CT_F_SNAT != 0 {
        out = fib::egress::<F>(ctx, p.proto, e.snat_addr(), e.nat_addr());
        if let fib::Egress::TooBig(mtu) = out {
            return Ok(F::too_big(ctx, p, p.daddr_be, mtu, len));
        }
    }
    let snat = e.flags() & CT_F_SNAT != 0;
    if nat::dnat(ctx, p, e.nat_addr(), e.nat_port()).is_err()
        || (snat && nat::snat(ctx, p, e.snat_addr(), e.snat_port()).is_err())
        || crate::sctp::fix_csum(ctx, p).is_err()
    {
        count::<F>(stats::DROP_REWRITE_FAILED, len);
        return Err(TC_ACT_SHOT as i32);
    }
    count::<F>(reason, len);
    if !snat {
        return Ok(TC_ACT_OK as i32);
    }
    Ok(fib::send::<F>(ctx, p.l3_off, out))
}

/// A packet that is not addressed to a frontend: a reply of a translated
/// flow gets its source (and with SNAT its destination) restored; anything
/// else passes untouched.
#[inline(always)]
fn handle_reply<F: Family>(ctx: &TcContext, p: &Pkt<F>, len: u32) -> Result<i32, i32> {
    let Some(e) = ct::lookup_packet(p, CT_DIR_REPLY, ct::now_ns()) else {
        count::<F>(if p.has_l4() { F::PASS_NO_SERVICE } else { stats::PASS_FRAGMENT }, len);
        return Ok(TC_NEXT);
    };
    let snat = e.flags() & CT_F_SNAT != 0;
    let dst = if snat { e.snat_addr() } else { p.daddr_be };
    // As in `forward`: checked before translation. The error goes back to
    // the backend, quoting its packet, from the address it sent to (the
    // node's SNAT address; the frontend when the client's own address is
    // the destination).
    let mut out = fib::Egress::NoRoute;
    if e.flags() & CT_F_REDIRECT != 0 {
        out = fib::egress::<F>(ctx, p.proto, e.nat_addr(), dst);
        if let fib::Egress::TooBig(mtu) = out {
            return Ok(F::too_big(ctx, p, if snat { p.daddr_be } else { e.nat_addr() }, mtu, len));
        }
    }
    rev_nat(ctx, p, e, len)?;
    if e.flags() & CT_F_REDIRECT != 0 {
        return Ok(fib::send::<F>(ctx, p.l3_off, out));
    }
    Ok(TC_ACT_OK as i32)
}
