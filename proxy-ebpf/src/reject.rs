//! ICMP errors the datapath answers itself, built in place of the packet
//! and sent back out of the device it came in on:
//!
//! - reject for frontends without backends, as kube-proxy's
//!   `REJECT --reject-with icmp-port-unreachable` does: destination
//!   unreachable (port) from the frontend address to the client. The
//!   client's connect() fails at once with ECONNREFUSED instead of timing
//!   out.
//! - fragmentation needed (destination unreachable, code 4, with the
//!   next-hop MTU) for a packet with DF set that does not fit the device
//!   the FIB redirect would send it out of — what a Linux router's
//!   `ip_forward` answers, so the client's path-MTU discovery works. It is
//!   built before the packet is translated, so it quotes what the sender
//!   sent and comes from the address the sender targeted.
//!
//! For IPv6 the same two errors are ICMPv6 destination unreachable, code 4
//! (port unreachable), and packet too big (RFC 4443) — any IPv6 packet too
//! big is answered, IPv6 routers never fragment. They are built in place:
//! the quote (IPv6 header, extension headers, 8 bytes of L4) is moved 48
//! bytes on and the new headers written in front of it, so it needs no
//! buffer whatever the extension headers' length.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{
    proto,
    stats::{self, ICMP_BURST, ICMP_PER_SEC},
};

use crate::{
    csum::{fold, sum6},
    family::{In6, V4, V6},
    maps::ICMP_RL,
    parse::{ETH_HLEN, IP_FRAG_OFF, IP6_DADDR, IP6_HLEN, IP6_SADDR, NEXTHDR_ICMPV6, Packet, Pkt},
    stats::count,
};

/// What the ICMP error quotes: the original IPv4 header and 8 bytes of L4.
const QUOTE_LEN: usize = 20 + 8;
/// New IPv4 header + ICMP header + quote.
const IP_PKT_LEN: usize = 20 + 8 + QUOTE_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// The DF bit of the IPv4 flags/fragment-offset field, in network order.
const IP_DF_BE: u16 = 0x4000_u16.to_be();
/// IPTOS_PREC_INTERNETCONTROL, what Linux's icmp_send uses.
const TOS_INTERNETCONTROL: u8 = 0xc0;

#[inline(always)]
fn word(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[2 * i], b[2 * i + 1]])
}

/// Rewrites the packet into the ICMP error and redirects it; returns the
/// verdict. Counted as `REJECT_NO_BACKEND`, or `DROP_NO_BACKEND` when the
/// reply cannot be built (IP options in the original header).
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, p: &Packet, len: u32) -> i32 {
    if !icmp_allowed() {
        count::<V4>(stats::ICMP_RATE_LIMITED, len);
        return TC_ACT_SHOT as i32;
    }
    match build(ctx, p, p.daddr_be, ICMP_PORT_UNREACH, 0) {
        Ok(()) => {
            count::<V4>(stats::REJECT_NO_BACKEND, len);
            back_out(ctx)
        }
        Err(()) => {
            count::<V4>(stats::DROP_NO_BACKEND, len);
            TC_ACT_SHOT as i32
        }
    }
}

/// The (untranslated) packet does not fit the egress device's `mtu`. With
/// DF set it is rewritten into ICMP fragmentation needed from `from_be`
/// (the address the sender targeted) and sent back (`icmp_frag_needed`).
/// Without DF — the kernel would fragment it, but a packet that leaves by
/// the FIB redirect never reaches `ip_fragment`, and the stack drops it once
/// translated (local source) — or when the error cannot be built (IP
/// options), it is dropped (`drop_too_big`).
#[inline(always)]
pub fn frag_needed(ctx: &TcContext, p: &Packet, from_be: u32, mtu: u32, len: u32) -> i32 {
    let df = ctx.load::<u16>(p.l3_off + IP_FRAG_OFF).is_ok_and(|f| f & IP_DF_BE != 0);
    let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
    if df && !icmp_allowed() {
        count::<V4>(stats::ICMP_RATE_LIMITED, len);
        return TC_ACT_SHOT as i32;
    }
    if df && build(ctx, p, from_be, ICMP_FRAG_NEEDED, mtu).is_ok() {
        count::<V4>(stats::ICMP_FRAG_NEEDED, len);
        return back_out(ctx);
    }
    count::<V4>(stats::DROP_TOO_BIG, len);
    TC_ACT_SHOT as i32
}

/// The per-CPU rate limit of the errors built here (a reflector must not be
/// made of a Service without endpoints): a token bucket refilled with the
/// time that passes, `ICMP_PER_SEC` per second, `ICMP_BURST` deep. The
/// bucket is this CPU's alone while the program runs.
#[inline(always)]
fn icmp_allowed() -> bool {
    const COST_NS: u64 = 1_000_000_000 / ICMP_PER_SEC;
    let Some(b) = ICMP_RL.get_ptr_mut(0) else {
        return true;
    };
    let now = crate::ct::now_ns();
    // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
    let b = unsafe { &mut *b };
    let credit = (b.credit_ns + now.saturating_sub(b.last_ns)).min(ICMP_BURST * COST_NS);
    b.last_ns = now;
    if credit < COST_NS {
        b.credit_ns = credit;
        return false;
    }
    b.credit_ns = credit - COST_NS;
    true
}

/// Redirects the rewritten packet out of the device it came in on.
#[inline(always)]
fn back_out(ctx: &TcContext) -> i32 {
    // SAFETY: reading the ingress ifindex of the skb we were given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Rewrites the packet into ICMP destination unreachable with `code` (and
/// `mtu` in the next-hop MTU field, 0 for other codes) from `from_be` to the
/// packet's source, quoting the packet's IPv4 header and 8 bytes of L4.
#[inline(always)]
fn build(ctx: &TcContext, p: &Packet, from_be: u32, code: u8, mtu: u16) -> Result<(), ()> {
    // Why: the quote must hold the whole original header; with options it is
    // longer than our fixed buffer, and such packets are rare enough to drop.
    if p.ihl_len != 20 {
        return Err(());
    }
    let l3 = p.l3_off;
    let quote: [u8; QUOTE_LEN] = ctx.load(l3).map_err(|_| ())?;

    let mut pkt = [0u8; IP_PKT_LEN];
    // IPv4 header: 0x45, TOS, total length, id 0, no fragment, TTL 64, ICMP.
    pkt[0] = 0x45;
    pkt[1] = TOS_INTERNETCONTROL;
    pkt[2..4].copy_from_slice(&(IP_PKT_LEN as u16).to_be_bytes());
    pkt[8] = 64;
    pkt[9] = proto::ICMP;
    // From the address the client tried to reach, back to the client.
    pkt[12..16].copy_from_slice(&from_be.to_ne_bytes());
    pkt[16..20].copy_from_slice(&p.saddr_be.to_ne_bytes());
    // ICMP header: type, code, checksum, 2 unused bytes, the next-hop MTU
    // (RFC 1191; 0 = unused for other codes); then the quote.
    pkt[20] = ICMP_DEST_UNREACH;
    pkt[21] = code;
    pkt[26..28].copy_from_slice(&mtu.to_be_bytes());
    pkt[28..].copy_from_slice(&quote);

    let mut ip_words = [0u16; 10];
    for (i, w) in ip_words.iter_mut().enumerate() {
        *w = word(&pkt, i);
    }
    pkt[10..12].copy_from_slice(&fold(&ip_words).to_ne_bytes());
    let mut icmp_words = [0u16; (IP_PKT_LEN - 20) / 2];
    for (i, w) in icmp_words.iter_mut().enumerate() {
        *w = word(&pkt, 10 + i);
    }
    pkt[22..24].copy_from_slice(&fold(&icmp_words).to_ne_bytes());

    // Why: on an L3 device (IPIP, WireGuard, TUN) there is no Ethernet
    // header to turn around; the packet starts with the IPv4 header.
    if l3 == ETH_HLEN {
        let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
        let mut eth = [0u8; ETH_HLEN];
        eth[0..6].copy_from_slice(&macs[6..12]);
        eth[6..12].copy_from_slice(&macs[0..6]);
        eth[12] = 0x08;
        // SAFETY: resizing the skb we own; later accesses go through helpers
        // that check bounds again.
        let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + IP_PKT_LEN) as u32, 0) };
        if rc != 0 {
            return Err(());
        }
        ctx.store(0, &eth, 0).map_err(|_| ())?;
        ctx.store(ETH_HLEN, &pkt, 0).map_err(|_| ())?;
    } else {
        // SAFETY: as above.
        let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, IP_PKT_LEN as u32, 0) };
        if rc != 0 {
            return Err(());
        }
        ctx.store(0, &pkt, 0).map_err(|_| ())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// ICMPv6
// ---------------------------------------------------------------------------

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// IPv6 header + ICMPv6 header.
const ICMP6_HDRS: usize = 40 + 8;
/// The longest quote built: the IPv6 header, its extension headers and 8
/// bytes of L4 (the ports, which the client's stack needs to find the
/// socket the error is about). A packet with longer extension headers gets
/// no error (dropped, as IPv4 packets with options).
const QUOTE6_MAX: usize = 256;
/// The hop limit of the errors built here (Linux's default).
const ICMP6_HOPS: u8 = 64;

/// [`port_unreachable`] for IPv6: ICMPv6 destination unreachable, code 4,
/// from the frontend to the client.
#[inline(always)]
pub fn port_unreachable6(ctx: &TcContext, p: &Pkt<V6>, len: u32) -> i32 {
    if !icmp_allowed() {
        count::<V6>(stats::ICMP_RATE_LIMITED, len);
        return TC_ACT_SHOT as i32;
    }
    match build6(ctx, p, &p.daddr_be, u16::from_be_bytes([ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH]), 0) {
        Ok(()) => {
            count::<V6>(stats::REJECT_NO_BACKEND, len);
            back_out(ctx)
        }
        Err(()) => {
            count::<V6>(stats::DROP_NO_BACKEND, len);
            TC_ACT_SHOT as i32
        }
    }
}

/// [`frag_needed`] for IPv6: ICMPv6 packet too big with the egress
/// device's `mtu`, from `from` (the address the sender targeted).
#[inline(always)]
pub fn packet_too_big6(ctx: &TcContext, p: &Pkt<V6>, from: In6, mtu: u32, len: u32) -> i32 {
    if !icmp_allowed() {
        count::<V6>(stats::ICMP_RATE_LIMITED, len);
        return TC_ACT_SHOT as i32;
    }
    if build6(ctx, p, &from, u16::from_be_bytes([ICMPV6_PKT_TOOBIG, 0]), mtu).is_ok() {
        count::<V6>(stats::ICMP_FRAG_NEEDED, len);
        return back_out(ctx);
    }
    count::<V6>(stats::DROP_TOO_BIG, len);
    TC_ACT_SHOT as i32
}

/// Rewrites the packet into an ICMPv6 error of `type_code` (type in the
/// high byte) with `info` in its 4-byte field (the MTU of a packet too
/// big), from `from` to the packet's source, quoting the IPv6 header, its
/// extension headers and 8 bytes of L4. A subprogram: it may be reached
/// from several paths, and is written field by field, without a header
/// buffer, to keep its stack frame small.
#[inline(never)]
fn build6(ctx: &TcContext, p: &Pkt<V6>, from: &In6, type_code: u16, info: u32) -> Result<(), ()> {
    let l3 = p.l3_off;
    let qlen = p.ihl_len + 8;
    if qlen > QUOTE6_MAX {
        return Err(());
    }
    // The packet becomes [IPv6 + ICMPv6 header][its first `qlen` bytes]:
    // its length set first (the quote is never cut: the new length is 48
    // bytes more than it), then the quote moved 48 bytes on, last word
    // first so nothing is overwritten before it is read. The headers are
    // multiples of 8 bytes long, so 8-byte words cover the quote. Moved by
    // loads and stores rather than by inserting room in front
    // (`bpf_skb_adjust_room`): that inserts after the link-layer header as
    // the skb has it, which is what an L3 device has, but not what a
    // `BPF_PROG_TEST_RUN` of the `_l3` program has; this way both are the
    // same, as the IPv4 reject is.
    // SAFETY: resizing the skb we own; every access below goes through
    // helpers that check bounds again.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (l3 + ICMP6_HDRS + qlen) as u32, 0) } != 0 {
        return Err(());
    }
    let words = qlen / 8;
    // The quote's share of the ICMPv6 checksum, summed as it moves. Words
    // are summed as they lie in memory; so is everything below, and the
    // result is stored the same way.
    let mut sum = 0u32;
    for j in 0..QUOTE6_MAX / 8 {
        if j >= words {
            break;
        }
        let at = (words - 1 - j) * 8;
        let w: u64 = ctx.load(l3 + at).map_err(|_| ())?;
        sum += (w & 0xffff) as u32 + ((w >> 16) & 0xffff) as u32 + ((w >> 32) & 0xffff) as u32 + (w >> 48) as u32;
        ctx.store(l3 + ICMP6_HDRS + at, &w, 0).map_err(|_| ())?;
    }
    let plen = (8 + qlen) as u16;
    // IPv6: version 6, traffic class and flow label 0, payload length, next
    // header ICMPv6, hop limit; then from the address the client tried to
    // reach, back to the client.
    let mut first = [0u8; 8];
    first[0] = 0x60;
    first[4..6].copy_from_slice(&plen.to_be_bytes());
    first[6] = NEXTHDR_ICMPV6;
    first[7] = ICMP6_HOPS;
    // ICMPv6: type, code, checksum, then the MTU (packet too big) or 0.
    let mut icmph = [0u8; 8];
    icmph[0..2].copy_from_slice(&type_code.to_be_bytes());
    icmph[4..8].copy_from_slice(&info.to_be_bytes());
    // The checksum covers a pseudo-header (both addresses, the upper-layer
    // length, next header 58), the ICMPv6 header and the quote.
    let word = |b: [u8; 2]| u32::from(u16::from_ne_bytes(b));
    sum += sum6(*from) + sum6(p.saddr_be);
    sum += word(plen.to_be_bytes()) + word([0, NEXTHDR_ICMPV6]);
    sum += word([icmph[0], icmph[1]]) + word([icmph[4], icmph[5]]) + word([icmph[6], icmph[7]]);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    icmph[2..4].copy_from_slice(&(!(sum as u16)).to_ne_bytes());

    ctx.store(l3, &first, 0).map_err(|_| ())?;
    ctx.store(l3 + IP6_SADDR, &from.0, 0).map_err(|_| ())?;
    ctx.store(l3 + IP6_DADDR, &p.saddr_be.0, 0).map_err(|_| ())?;
    ctx.store(l3 + IP6_HLEN, &icmph, 0).map_err(|_| ())?;
    if l3 == ETH_HLEN {
        let dst: [u8; 6] = ctx.load(0).map_err(|_| ())?;
        let src: [u8; 6] = ctx.load(6).map_err(|_| ())?;
        ctx.store(0, &src, 0).map_err(|_| ())?;
        ctx.store(6, &dst, 0).map_err(|_| ())?;
    }
    Ok(())
}
