//! Header parsing with bounded loads (`bpf_skb_load_bytes`), so every read is
//! checked against the packet length by the helper and never trips the
//! verifier on a short packet.
use aya_ebpf::programs::TcContext;
use proxy_common::{
    frag::{FRAG_TIMEOUT_NS, FragKey, FragValue},
    proto, stats,
};

use crate::maps::FRAG;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP_BE: u16 = 0x0800_u16.to_be();
/// Offsets inside the IPv4 header.
pub const IP_FRAG_OFF: usize = 6;
pub const IP_PROTO: usize = 9;
pub const IP_CSUM: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;
/// Checksum offset inside the L4 header.
pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;
/// Host-order masks of the flags/fragment-offset field.
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
pub const IP_ID: usize = 4;

/// The IPv4 and L4 fields the load balancer decides on.
pub struct Packet {
    /// Offset of the IPv4 header: `ETH_HLEN` on Ethernet devices, 0 on L3
    /// devices (IPIP, WireGuard, GRE, TUN), which have no link-layer header.
    pub l3_off: usize,
    /// Offset of the L4 header (14 + IHL * 4).
    pub l4_off: usize,
    pub ihl_len: usize,
    pub proto: u8,
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    /// TCP flags byte (0 for UDP and later fragments).
    pub tcp_flags: u8,
    /// `FRAG_NONE`, `FRAG_FIRST`, or `FRAG_LATER` (no L4 header: the ports
    /// are the first fragment's, from `proxy_frag_v1`).
    pub frag: u8,
}

pub const FRAG_NONE: u8 = 0;
pub const FRAG_FIRST: u8 = 1;
pub const FRAG_LATER: u8 = 2;

impl Packet {
    /// Whether the packet holds its L4 header (not a later fragment).
    #[inline(always)]
    pub fn has_l4(&self) -> bool {
        self.frag != FRAG_LATER
    }
}

impl Packet {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + if self.proto == proto::TCP { TCP_CSUM } else { UDP_CSUM }
    }
}

/// Why a packet is not parsed into a [`Packet`]: the stats reason to count.
pub type Skip = u32;

/// Whether the packet is IPv4: by the Ethertype on an Ethernet device
/// (`l3 == ETH_HLEN`), by `skb->protocol` on an L3 device (`l3 == 0`).
#[inline(always)]
fn is_ipv4(ctx: &TcContext, l3: usize) -> bool {
    if l3 == 0 {
        // SAFETY: reading a field of our own context.
        let proto = unsafe { (*ctx.skb.skb).protocol };
        return proto == u32::from(ETH_P_IP_BE);
    }
    ctx.load::<u16>(12).is_ok_and(|t| t == ETH_P_IP_BE)
}

/// Parses [Ethernet +] IPv4 + TCP/UDP ports; the IPv4 header starts at
/// `l3` (see [`Packet::l3_off`]). `Err(reason)` = not for us.
#[inline(always)]
pub fn parse_ipv4_l4(ctx: &TcContext, l3: usize) -> Result<Packet, Skip> {
    if l3 == ETH_HLEN && ctx.load::<u16>(12).is_err() {
        return Err(stats::MALFORMED_TRUNCATED);
    }
    if !is_ipv4(ctx, l3) {
        return Err(stats::PASS_NOT_IPV4);
    }
    let vihl: u8 = ctx.load(l3).map_err(|_| stats::MALFORMED_TRUNCATED)?;
    let ihl_len = usize::from(vihl & 0x0f) * 4;
    // Why: version must be 4 and IHL >= 5 (RFC 791); the kernel's ip_rcv drops
    // such packets too, we only count them and let it.
    if vihl >> 4 != 4 || ihl_len < 20 {
        return Err(stats::MALFORMED_BAD_IHL);
    }
    let proto: u8 = ctx.load(l3 + IP_PROTO).map_err(|_| stats::MALFORMED_TRUNCATED)?;
    if proto != proto::TCP && proto != proto::UDP {
        return Err(stats::PASS_OTHER_PROTO);
    }
    let frag_word = u16::from_be(ctx.load::<u16>(l3 + IP_FRAG_OFF).map_err(|_| stats::MALFORMED_TRUNCATED)?);
    let saddr_be: u32 = ctx.load(l3 + IP_SADDR).map_err(|_| stats::MALFORMED_TRUNCATED)?;
    let daddr_be: u32 = ctx.load(l3 + IP_DADDR).map_err(|_| stats::MALFORMED_TRUNCATED)?;
    let l4_off = l3 + ihl_len;
    let id_be: u16 = ctx.load(l3 + IP_ID).map_err(|_| stats::MALFORMED_TRUNCATED)?;
    let fkey = FragKey { saddr_be, daddr_be, id_be, proto, _pad: 0 };
    let tot_len = usize::from(u16::from_be(ctx.load::<u16>(l3 + 2).map_err(|_| stats::MALFORMED_TRUNCATED)?));
    let (ports, tcp_flags, frag) = if frag_word & IP_OFFSET_MASK != 0 {
        // A later fragment: no L4 header; translated with its first
        // fragment's ports, or passed when that was not seen. Its IPv4
        // header must be all there (found by the fuzzer).
        if (ctx.len() as usize) < l4_off || tot_len < ihl_len {
            return Err(stats::MALFORMED_TRUNCATED);
        }
        // SAFETY: the value is copied out at once.
        let Some(f) = (unsafe { FRAG.get(&fkey).copied() }) else {
            return Err(stats::PASS_FRAGMENT);
        };
        if crate::ct::now_ns().saturating_sub(f.seen_ns) > FRAG_TIMEOUT_NS {
            return Err(stats::PASS_FRAGMENT);
        }
        ([f.sport_be, f.dport_be], 0, FRAG_LATER)
    } else {
        let ports: [u16; 2] = ctx.load(l4_off).map_err(|_| stats::MALFORMED_TRUNCATED)?;
        let (l4_min, tcp_flags) = if proto == proto::TCP {
            // Why: the checksum we rewrite sits at offset 16 of a 20-byte
            // header; the load fails on a packet cut short before it.
            let flags: u8 = ctx.load(l4_off + 13).map_err(|_| stats::MALFORMED_TRUNCATED)?;
            (20, flags)
        } else {
            (8, 0)
        };
        // Why the IPv4 total length too: bytes past it are link-layer
        // padding, not headers; a packet whose L4 header lies beyond its
        // total length is dropped by the stack as truncated, and must not be
        // translated from whatever padding holds (found by the fuzzer).
        if (ctx.len() as usize) < l4_off + l4_min || tot_len < ihl_len + l4_min {
            return Err(stats::MALFORMED_TRUNCATED);
        }
        let mut frag = FRAG_NONE;
        if frag_word & IP_MF != 0 {
            // The first fragment: its ports are the datagram's.
            let v = FragValue { sport_be: ports[0], dport_be: ports[1], _pad: 0, seen_ns: crate::ct::now_ns() };
            let _ = FRAG.insert(&fkey, &v, 0);
            frag = FRAG_FIRST;
        }
        (ports, tcp_flags, frag)
    };
    Ok(Packet {
        l3_off: l3,
        l4_off,
        ihl_len,
        proto,
        saddr_be,
        daddr_be,
        sport_be: ports[0],
        dport_be: ports[1],
        tcp_flags,
        frag,
    })
}
