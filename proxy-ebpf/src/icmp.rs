//! ICMP errors about translated flows, translated back (what netfilter's
//! ICMP NAT does for kube-proxy): destination unreachable (fragmentation
//! needed included, so path-MTU discovery works through a Service) and time
//! exceeded. The error quotes the packet as translated (client or node →
//! backend); its quote is rewritten to what the client sent (client →
//! frontend), and with SNAT the error is readdressed to the client.
//!
//! The other direction too: an error about a *reply* (frontend → client,
//! say fragmentation needed from a router near the client for a large
//! answer) is addressed to the frontend; it is matched to the flow's SERVICE
//! entry, its quote rewritten to the packet the backend sent (backend →
//! client, or → the node's SNAT address and port) and it is readdressed to
//! the backend, so the backend's path-MTU discovery works too.
//!
//! Checksums: the quoted IPv4 header's checksum is fixed with each address
//! change; the quoted header then still sums to 0xffff, so the ICMP checksum
//! only needs the port changes. The quoted L4 checksum is left alone (no
//! receiver checks it; the quote may not even hold it).
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{
    ct::{CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_REDIRECT, CT_F_SNAT, CtKey},
    proto, stats,
};

use crate::{
    TC_NEXT, ct,
    family::V4,
    fib,
    parse::{IP_CSUM, IP_DADDR, IP_SADDR},
    stats::count,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_CSUM: usize = 2;

/// Handles an ICMP packet whose outer IPv4 header is `ihl_len` long, at
/// ingress, or at egress for errors the node itself sends (fragmentation
/// needed while forwarding a translated packet).
/// Returns the verdict; anything that is not an error about a tracked flow
/// passes untouched (counted as `pass_other_proto`).
#[inline(always)]
pub fn handle(ctx: &TcContext, l3: usize, ihl_len: usize, egress: bool) -> i32 {
    let len = ctx.len();
    match translate(ctx, l3, ihl_len, egress) {
        Some(v) => v,
        None => {
            count::<V4>(stats::PASS_OTHER_PROTO, len);
            TC_NEXT
        }
    }
}

#[inline(always)]
fn translate(ctx: &TcContext, l3: usize, ihl_len: usize, egress: bool) -> Option<i32> {
    let icmp = l3 + ihl_len;
    // The quote (IPv4 header and the ports) must lie within the outer
    // packet's total length, not in link-layer padding.
    let tot_len: u16 = ctx.load(l3 + 2).ok()?;
    if usize::from(u16::from_be(tot_len)) < ihl_len + 8 + 20 + 4 {
        return None;
    }
    // A later fragment of the outer packet holds no ICMP header (found by
    // the fuzzer): only offset 0 is an ICMP message.
    let frag: u16 = ctx.load(l3 + 6).ok()?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return None;
    }
    let ty: u8 = ctx.load(icmp).ok()?;
    if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner = icmp + 8;
    let vihl: u8 = ctx.load(inner).ok()?;
    // Why: a quote with IP options is rare; fixed offsets keep this simple.
    if vihl != 0x45 {
        return None;
    }
    let iproto: u8 = ctx.load(inner + 9).ok()?;
    // Why no SCTP checksum fix: a quote is cut short, nobody checks its
    // checksum (the ICMP checksum, fixed below, covers it).
    if iproto != proto::TCP && iproto != proto::UDP && iproto != proto::SCTP {
        return None;
    }
    let isrc: u32 = ctx.load(inner + IP_SADDR).ok()?;
    let idst: u32 = ctx.load(inner + IP_DADDR).ok()?;
    let ports: [u16; 2] = ctx.load(inner + 20).ok()?;
    // The quoted packet went from isrc to the backend idst: the flow's
    // REPLY entry is keyed the other way round.
    let Some(e) = ct::lookup_live::<V4>(&reversed_quote_key(isrc, idst, ports, iproto, CT_DIR_REPLY), ct::now_ns()) else {
        return about_reply(ctx, l3, icmp, inner, iproto, isrc, idst, ports);
    };
    let len = ctx.len();
    let fail = || {
        count::<V4>(stats::DROP_REWRITE_FAILED, len);
        Some(aya_ebpf::bindings::TC_ACT_SHOT as i32)
    };
    // Quoted destination: backend → frontend.
    if rewrite_quoted_addr(ctx, inner + IP_DADDR, inner, idst, e.nat_addr_be).is_none()
        || rewrite_quoted_port(ctx, icmp, inner + 22, ports[1], e.nat_port_be).is_none()
    {
        return fail();
    }
    let mut outer_dst: u32 = ctx.load(l3 + IP_DADDR).ok()?;
    if e.flags & CT_F_SNAT != 0 {
        // Quoted source: node:allocated port → the client; and the error
        // goes to the client instead of the node.
        if rewrite_quoted_addr(ctx, inner + IP_SADDR, inner, isrc, e.snat_addr_be).is_none()
            || rewrite_quoted_port(ctx, icmp, inner + 20, ports[0], e.snat_port_be).is_none()
            || ctx.l3_csum_replace(l3 + IP_CSUM, u64::from(outer_dst), u64::from(e.snat_addr_be), 4).is_err()
            || ctx.store(l3 + IP_DADDR, &e.snat_addr_be, 0).is_err()
        {
            return fail();
        }
        outer_dst = e.snat_addr_be;
    }
    count::<V4>(stats::ICMP_ERROR_TRANSLATED, len);
    // On egress the packet already leaves by its route.
    if e.flags & CT_F_REDIRECT != 0 && !egress {
        let outer_src: u32 = ctx.load(l3 + IP_SADDR).ok()?;
        return Some(fib::redirect4(ctx, l3, proto::ICMP, outer_src, outer_dst));
    }
    Some(TC_ACT_OK as i32)
}

/// An error about a reply (the quote goes frontend → client): found by the
/// flow's SERVICE entry (client → frontend), the quote becomes what the
/// backend sent and the error goes to the backend (sent out by FIB redirect
/// when the flow's packets are, else forwarded by the stack).
#[inline(always)]
fn about_reply(ctx: &TcContext, l3: usize, icmp: usize, inner: usize, iproto: u8, isrc: u32, idst: u32, ports: [u16; 2]) -> Option<i32> {
    let e = ct::lookup_live::<V4>(&reversed_quote_key(isrc, idst, ports, iproto, CT_DIR_SERVICE), ct::now_ns())?;
    let len = ctx.len();
    let fail = || {
        count::<V4>(stats::DROP_REWRITE_FAILED, len);
        Some(aya_ebpf::bindings::TC_ACT_SHOT as i32)
    };
    let outer_dst: u32 = ctx.load(l3 + IP_DADDR).ok()?;
    // Quoted source: frontend → backend; the error goes to the backend.
    if rewrite_quoted_addr(ctx, inner + IP_SADDR, inner, isrc, e.nat_addr_be).is_none()
        || rewrite_quoted_port(ctx, icmp, inner + 20, ports[0], e.nat_port_be).is_none()
        || ctx.l3_csum_replace(l3 + IP_CSUM, u64::from(outer_dst), u64::from(e.nat_addr_be), 4).is_err()
        || ctx.store(l3 + IP_DADDR, &e.nat_addr_be, 0).is_err()
    {
        return fail();
    }
    // Quoted destination, with SNAT: the client → node:allocated port.
    if e.flags & CT_F_SNAT != 0
        && (rewrite_quoted_addr(ctx, inner + IP_DADDR, inner, idst, e.snat_addr_be).is_none()
            || rewrite_quoted_port(ctx, icmp, inner + 22, ports[1], e.snat_port_be).is_none())
    {
        return fail();
    }
    count::<V4>(stats::ICMP_ERROR_TRANSLATED, len);
    // A flow whose packets the datapath sends out itself: so is its error.
    if e.flags & CT_F_REDIRECT != 0 {
        let outer_src: u32 = ctx.load(l3 + IP_SADDR).ok()?;
        return Some(fib::redirect4(ctx, l3, proto::ICMP, outer_src, e.nat_addr_be));
    }
    Some(TC_ACT_OK as i32)
}

/// The conntrack key of the packet answering the quoted one (`isrc:ports[0]
/// → idst:ports[1]` reversed), in direction `dir`.
#[inline(always)]
fn reversed_quote_key(isrc: u32, idst: u32, ports: [u16; 2], iproto: u8, dir: u8) -> CtKey {
    CtKey { saddr_be: idst, daddr_be: isrc, sport_be: ports[1], dport_be: ports[0], proto: iproto, dir, _pad: [0; 2] }
}

#[inline(always)]
fn rewrite_quoted_addr(ctx: &TcContext, off: usize, inner: usize, old: u32, new: u32) -> Option<()> {
    ctx.l3_csum_replace(inner + IP_CSUM, u64::from(old), u64::from(new), 4).ok()?;
    ctx.store(off, &new, 0).ok()
}

#[inline(always)]
fn rewrite_quoted_port(ctx: &TcContext, icmp: usize, off: usize, old: u16, new: u16) -> Option<()> {
    ctx.l4_csum_replace(icmp + ICMP_CSUM, u64::from(old), u64::from(new), 2).ok()?;
    ctx.store(off, &new, 0).ok()
}
