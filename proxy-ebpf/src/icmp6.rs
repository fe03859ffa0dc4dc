//! ICMPv6 errors about translated flows, translated back: destination
//! unreachable, packet too big (so path-MTU discovery works through a
//! Service: IPv6 routers never fragment, PMTUD is all there is) and time
//! exceeded. The same two directions as [`crate::icmp`] for IPv4:
//!
//! - an error about a packet of the client's direction (it quotes client
//!   or node → backend) is found by the flow's REPLY entry; its quote is
//!   rewritten to what the client sent (client → frontend) and with SNAT
//!   the error is readdressed to the client;
//! - an error about a reply (it quotes frontend → client) is found by the
//!   flow's SERVICE entry; the quote becomes what the backend sent and the
//!   error goes to the backend.
//!
//! Checksums: IPv6 has no header checksum, and the ICMPv6 checksum covers
//! a pseudo-header and the whole message, the quote included: every quoted
//! address and port change, and the outer destination change, goes into
//! it. The quoted L4 checksum is left alone (no receiver checks it).
//!
//! Only quotes whose IPv6 header is followed directly by TCP, UDP or SCTP are
//! translated (fixed offsets, as the IPv4 side does without IP options);
//! anything else passes untouched.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{
    ct::{CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_REDIRECT, CT_F_SNAT},
    proto, stats,
};

use crate::{
    TC_NEXT, ct,
    csum::{diff6, l4_pseudo_diff6},
    family::{CtEntry, Family, In6, V6},
    fib,
    parse::{FRAG_NONE, IP6_DADDR, IP6_HLEN, IP6_SADDR, Ip6, NEXTHDR_ICMPV6},
    stats::count,
};

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_CSUM: usize = 2;

/// Handles an ICMPv6 packet (`h`: its IPv6 header walked) at ingress, or
/// at egress for errors the node itself sends. Returns the verdict;
/// anything that is not an error about a tracked flow passes untouched
/// (counted as `pass_other_proto`).
#[inline(always)]
pub fn handle(ctx: &TcContext, l3: usize, h: &Ip6, egress: bool) -> i32 {
    let len = ctx.len();
    match translate(ctx, l3, h, egress) {
        Some(v) => v,
        None => {
            count::<V6>(stats::PASS_OTHER_PROTO, len);
            TC_NEXT
        }
    }
}

/// The quoted packet's addresses and ports, and where they are.
struct Quote {
    icmp: usize,
    inner: usize,
    proto: u8,
    src: In6,
    dst: In6,
    ports: [u16; 2],
}

#[inline(always)]
fn translate(ctx: &TcContext, l3: usize, h: &Ip6, egress: bool) -> Option<i32> {
    // A fragmented error: its checksum covers fragments this program never
    // sees together; rare enough to leave to the stack.
    if h.frag != FRAG_NONE {
        return None;
    }
    let icmp = h.l4_off;
    let inner = icmp + 8;
    // The quote (IPv6 header and the ports) must lie within the outer
    // payload length, not in link-layer padding.
    if h.end < inner + IP6_HLEN + 4 {
        return None;
    }
    let ty: u8 = ctx.load(icmp).ok()?;
    if ty != ICMPV6_DEST_UNREACH && ty != ICMPV6_PKT_TOOBIG && ty != ICMPV6_TIME_EXCEED {
        return None;
    }
    let v: u8 = ctx.load(inner).ok()?;
    let iproto: u8 = ctx.load(inner + 6).ok()?;
    if v >> 4 != 6 || (iproto != proto::TCP && iproto != proto::UDP && iproto != proto::SCTP) {
        return None;
    }
    let q = Quote {
        icmp,
        inner,
        proto: iproto,
        src: In6(ctx.load(inner + IP6_SADDR).ok()?),
        dst: In6(ctx.load(inner + IP6_DADDR).ok()?),
        ports: ctx.load(inner + IP6_HLEN).ok()?,
    };
    // The quoted packet went from its source to the backend: the flow's
    // REPLY entry is keyed the other way round.
    let Some(e) = ct::lookup_live::<V6>(&V6::ct_key(q.dst, q.src, q.ports[1], q.ports[0], q.proto, CT_DIR_REPLY), ct::now_ns()) else {
        return about_reply(ctx, l3, h, &q);
    };
    let len = ctx.len();
    let fail = || {
        count::<V6>(stats::DROP_REWRITE_FAILED, len);
        Some(TC_ACT_SHOT as i32)
    };
    // Quoted destination: backend → frontend.
    if rewrite_quoted_addr(ctx, icmp, inner + IP6_DADDR, q.dst, e.nat_addr()).is_none()
        || rewrite_quoted_port(ctx, icmp, inner + IP6_HLEN + 2, q.ports[1], e.nat_port()).is_none()
    {
        return fail();
    }
    let mut outer_dst = h.daddr;
    if e.flags() & CT_F_SNAT != 0 {
        // Quoted source: node:allocated port → the client; and the error
        // goes to the client instead of the node.
        if rewrite_quoted_addr(ctx, icmp, inner + IP6_SADDR, q.src, e.snat_addr()).is_none()
            || rewrite_quoted_port(ctx, icmp, inner + IP6_HLEN, q.ports[0], e.snat_port()).is_none()
            || readdress(ctx, l3, icmp, outer_dst, e.snat_addr()).is_none()
        {
            return fail();
        }
        outer_dst = e.snat_addr();
    }
    count::<V6>(stats::ICMP_ERROR_TRANSLATED, len);
    // On egress the packet already leaves by its route.
    if e.flags() & CT_F_REDIRECT != 0 && !egress {
        return Some(fib::redirect::<V6>(ctx, l3, NEXTHDR_ICMPV6, h.saddr, outer_dst));
    }
    Some(TC_ACT_OK as i32)
}

/// An error about a reply (the quote goes frontend → client): found by the
/// flow's SERVICE entry (client → frontend), the quote becomes what the
/// backend sent and the error goes to the backend.
#[inline(always)]
fn about_reply(ctx: &TcContext, l3: usize, h: &Ip6, q: &Quote) -> Option<i32> {
    let e = ct::lookup_live::<V6>(&V6::ct_key(q.dst, q.src, q.ports[1], q.ports[0], q.proto, CT_DIR_SERVICE), ct::now_ns())?;
    let len = ctx.len();
    let fail = || {
        count::<V6>(stats::DROP_REWRITE_FAILED, len);
        Some(TC_ACT_SHOT as i32)
    };
    // Quoted source: frontend → backend; the error goes to the backend.
    if rewrite_quoted_addr(ctx, q.icmp, q.inner + IP6_SADDR, q.src, e.nat_addr()).is_none()
        || rewrite_quoted_port(ctx, q.icmp, q.inner + IP6_HLEN, q.ports[0], e.nat_port()).is_none()
        || readdress(ctx, l3, q.icmp, h.daddr, e.nat_addr()).is_none()
    {
        return fail();
    }
    // Quoted destination, with SNAT: the client → node:allocated port.
    if e.flags() & CT_F_SNAT != 0
        && (rewrite_quoted_addr(ctx, q.icmp, q.inner + IP6_DADDR, q.dst, e.snat_addr()).is_none()
            || rewrite_quoted_port(ctx, q.icmp, q.inner + IP6_HLEN + 2, q.ports[1], e.snat_port()).is_none())
    {
        return fail();
    }
    count::<V6>(stats::ICMP_ERROR_TRANSLATED, len);
    if e.flags() & CT_F_REDIRECT != 0 {
        return Some(fib::redirect::<V6>(ctx, l3, NEXTHDR_ICMPV6, h.saddr, e.nat_addr()));
    }
    Some(TC_ACT_OK as i32)
}

/// The outer destination `old` → `new`: in the ICMPv6 checksum's
/// pseudo-header.
#[inline(always)]
fn readdress(ctx: &TcContext, l3: usize, icmp: usize, old: In6, new: In6) -> Option<()> {
    let diff = diff6(old, new);
    l4_pseudo_diff6(ctx, icmp + ICMPV6_CSUM, diff, 0).ok()?;
    ctx.store(l3 + IP6_DADDR, &new.0, 0).ok()
}

/// A quoted address: part of the ICMPv6 message, so its difference goes
/// into the checksum without the pseudo-header flag.
#[inline(always)]
fn rewrite_quoted_addr(ctx: &TcContext, icmp: usize, off: usize, old: In6, new: In6) -> Option<()> {
    let diff = diff6(old, new);
    ctx.l4_csum_replace(icmp + ICMPV6_CSUM, 0, u64::from(diff), 0).ok()?;
    ctx.store(off, &new.0, 0).ok()
}

#[inline(always)]
fn rewrite_quoted_port(ctx: &TcContext, icmp: usize, off: usize, old: u16, new: u16) -> Option<()> {
    ctx.l4_csum_replace(icmp + ICMPV6_CSUM, u64::from(old), u64::from(new), 2).ok()?;
    ctx.store(off, &new, 0).ok()
}
