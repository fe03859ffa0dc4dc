//! Reject for frontends without backends, as kube-proxy's
//! `REJECT --reject-with icmp-port-unreachable` does: the packet is turned
//! into an ICMP destination-unreachable (port) from the frontend address to
//! the client and sent back out of the device it came in on. The client's
//! connect() fails at once with ECONNREFUSED instead of timing out.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{proto, stats};

use crate::{
    csum::fold,
    parse::{ETH_HLEN, Packet},
    stats::count,
};

/// What the ICMP error quotes: the original IPv4 header and 8 bytes of L4.
const QUOTE_LEN: usize = 20 + 8;
/// New IPv4 header + ICMP header + quote.
const IP_PKT_LEN: usize = 20 + 8 + QUOTE_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
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
    match build(ctx, p) {
        Ok(()) => {
            count(stats::REJECT_NO_BACKEND, len);
            // SAFETY: reading the ingress ifindex of the skb we were given.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            // SAFETY: plain helper call; returns TC_ACT_REDIRECT.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        Err(()) => {
            count(stats::DROP_NO_BACKEND, len);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn build(ctx: &TcContext, p: &Packet) -> Result<(), ()> {
    // Why: the quote must hold the whole original header; with options it is
    // longer than our fixed buffer, and such packets are rare enough to drop.
    if p.ihl_len != 20 {
        return Err(());
    }
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let quote: [u8; QUOTE_LEN] = ctx.load(ETH_HLEN).map_err(|_| ())?;

    let mut pkt = [0u8; IP_PKT_LEN];
    // IPv4 header: 0x45, TOS, total length, id 0, no fragment, TTL 64, ICMP.
    pkt[0] = 0x45;
    pkt[1] = TOS_INTERNETCONTROL;
    pkt[2..4].copy_from_slice(&(IP_PKT_LEN as u16).to_be_bytes());
    pkt[8] = 64;
    pkt[9] = proto::ICMP;
    // From the frontend the client tried to reach, back to the client.
    pkt[12..16].copy_from_slice(&p.daddr_be.to_ne_bytes());
    pkt[16..20].copy_from_slice(&p.saddr_be.to_ne_bytes());
    // ICMP header: type, code, checksum, 4 unused bytes; then the quote.
    pkt[20] = ICMP_DEST_UNREACH;
    pkt[21] = ICMP_PORT_UNREACH;
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
    Ok(())
}
