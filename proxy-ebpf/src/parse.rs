//! Header parsing with bounded loads (`bpf_skb_load_bytes`), so every read is
//! checked against the packet length by the helper and never trips the
//! verifier on a short packet.
use aya_ebpf::{
    cty::c_long,
    helpers::bpf_xdp_load_bytes,
    programs::{TcContext, XdpContext},
};
use proxy_common::{proto, sctp, stats};

use crate::{
    family::{Family, In6, V4, V6},
    frag,
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP_BE: u16 = 0x0800_u16.to_be();
pub const ETH_P_IPV6_BE: u16 = 0x86dd_u16.to_be();
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

/// The L3 and L4 fields the load balancer decides on, for family `F`.
pub struct Pkt<F: Family> {
    /// Offset of the IP header: `ETH_HLEN` on Ethernet devices, 0 on L3
    /// devices (IPIP, WireGuard, GRE, TUN), which have no link-layer header.
    pub l3_off: usize,
    /// Offset of the L4 header (`l3_off + ihl_len`).
    pub l4_off: usize,
    /// Length of the L3 headers: IPv4 IHL * 4; IPv6 40 + extension headers.
    pub ihl_len: usize,
    /// The upper-layer protocol (after any IPv6 extension headers).
    pub proto: u8,
    /// Network order (both families).
    pub saddr_be: F::Addr,
    pub daddr_be: F::Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    /// TCP flags byte; for SCTP the flags its first chunk stands for
    /// (`proxy_common::sctp::as_tcp_flags`: INIT is a SYN...); 0 for UDP
    /// and later fragments.
    pub tcp_flags: u8,
    /// `FRAG_NONE`, `FRAG_FIRST`, or `FRAG_LATER` (no L4 header: the ports
    /// are the first fragment's, from `proxy_frag_v1` / `proxy_frag6_v1`).
    pub frag: u8,
}

pub const FRAG_NONE: u8 = 0;
pub const FRAG_FIRST: u8 = 1;
pub const FRAG_LATER: u8 = 2;

/// An IPv4 packet (what XDP, ICMP and the socket-independent IPv4 code use).
pub type Packet = Pkt<V4>;

impl<F: Family> Pkt<F> {
    /// Whether the packet holds its L4 header (not a later fragment).
    #[inline(always)]
    pub fn has_l4(&self) -> bool {
        self.frag != FRAG_LATER
    }

    /// Offset of the L4 checksum field (TCP, UDP: the Internet checksums;
    /// SCTP's CRC32c is rewritten by `crate::sctp`).
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off + if self.proto == proto::TCP { TCP_CSUM } else { UDP_CSUM }
    }
}

/// Why a packet is not parsed into a [`Packet`]: the stats reason to count.
pub type Skip = u32;

/// Reads of a packet through the program type's load helper, which checks
/// the offset against the packet's length (`bpf_skb_load_bytes` for TC,
/// `bpf_xdp_load_bytes` for XDP): no direct packet access whose bounds the
/// verifier would have to follow through a variable offset (the IPv6
/// extension-header walk). The walk is written once over it, for both.
pub trait Bytes {
    /// The `T` at `off`, or the helper's error (past the end).
    fn load<T>(&self, off: usize) -> Result<T, c_long>;
    /// The packet's length (from its first byte; linear data for XDP).
    fn pkt_len(&self) -> usize;
}

impl Bytes for TcContext {
    #[inline(always)]
    fn load<T>(&self, off: usize) -> Result<T, c_long> {
        TcContext::load(self, off)
    }

    #[inline(always)]
    fn pkt_len(&self) -> usize {
        self.len() as usize
    }
}

impl Bytes for XdpContext {
    #[inline(always)]
    fn load<T>(&self, off: usize) -> Result<T, c_long> {
        let mut v = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes size_of::<T>() bytes into `v` or fails.
        let rc = unsafe { bpf_xdp_load_bytes(self.ctx, off as u32, v.as_mut_ptr().cast(), size_of::<T>() as u32) };
        if rc < 0 {
            return Err(rc);
        }
        // SAFETY: filled by the helper; every T loaded here is plain integers.
        Ok(unsafe { v.assume_init() })
    }

    #[inline(always)]
    fn pkt_len(&self) -> usize {
        self.data_end() - self.data()
    }
}

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
    if proto != proto::TCP && proto != proto::UDP && proto != proto::SCTP {
        return Err(stats::PASS_OTHER_PROTO);
    }
    let frag_word = u16::from_be(ctx.load::<u16>(l3 + IP_FRAG_OFF).map_err(|_| stats::MALFORMED_TRUNCATED)?);
    // Why SCTP fragments pass: a port rewrite must fix the CRC32c, which
    // takes the whole SCTP packet's length (`crate::sctp`), unknown from a
    // first fragment. SCTP fragments its own messages to the path MTU, so
    // IP fragments of it are rare.
    if proto == proto::SCTP && frag_word & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Err(stats::PASS_FRAGMENT);
    }
    let saddr_be: u32 = ctx.load(l3 + IP_SADDR).map_err(|_| stats::MALFORMED_TRUNCATED)?;
    let daddr_be: u32 = ctx.load(l3 + IP_DADDR).map_err(|_| stats::MALFORMED_TRUNCATED)?;
    let l4_off = l3 + ihl_len;
    let id_be = u32::from(ctx.load::<u16>(l3 + IP_ID).map_err(|_| stats::MALFORMED_TRUNCATED)?);
    let tot_len = usize::from(u16::from_be(ctx.load::<u16>(l3 + 2).map_err(|_| stats::MALFORMED_TRUNCATED)?));
    let (ports, tcp_flags, frag) = if frag_word & IP_OFFSET_MASK != 0 {
        // A later fragment: no L4 header; translated with its first
        // fragment's ports, or passed when that was not seen. Its IPv4
        // header must be all there (found by the fuzzer).
        if (ctx.len() as usize) < l4_off || tot_len < ihl_len {
            return Err(stats::MALFORMED_TRUNCATED);
        }
        let ports = frag::recall::<V4>(saddr_be, daddr_be, id_be, proto).ok_or(stats::PASS_FRAGMENT)?;
        (ports, 0, FRAG_LATER)
    } else {
        let ports: [u16; 2] = ctx.load(l4_off).map_err(|_| stats::MALFORMED_TRUNCATED)?;
        let (l4_min, tcp_flags) = l4_header(ctx, proto, l4_off)?;
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
            frag::remember::<V4>(saddr_be, daddr_be, id_be, proto, ports);
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

/// The least length of `proto`'s header that the datapath reads or
/// rewrites, and its TCP flags (see [`Pkt::tcp_flags`]).
///
/// Why these lengths: TCP's checksum sits at offset 16 of a 20-byte header;
/// SCTP's first chunk type follows its 12-byte common header (the chunk
/// header is 4 bytes); a load fails on a packet cut short before them.
#[inline(always)]
fn l4_header<C: Bytes>(ctx: &C, proto: u8, l4_off: usize) -> Result<(usize, u8), Skip> {
    if proto == proto::TCP {
        let flags: u8 = ctx.load(l4_off + 13).map_err(|_| stats::MALFORMED_TRUNCATED)?;
        Ok((20, flags))
    } else if proto == proto::SCTP {
        let chunk: u8 = ctx.load(l4_off + sctp::HDR_LEN).map_err(|_| stats::MALFORMED_TRUNCATED)?;
        Ok((sctp::MIN_LEN, sctp::as_tcp_flags(chunk)))
    } else {
        Ok((8, 0))
    }
}

// ---------------------------------------------------------------------------
// IPv6
// ---------------------------------------------------------------------------

/// Offsets inside the IPv6 header.
pub const IP6_PLEN: usize = 4;
pub const IP6_NEXT: usize = 6;
pub const IP6_HOPS: usize = 7;
pub const IP6_SADDR: usize = 8;
pub const IP6_DADDR: usize = 24;
pub const IP6_HLEN: usize = 40;

/// Next-header values (IANA "IPv6 Extension Header Types" and the
/// upper-layer protocols that matter here).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Mobility, HIP, Shim6 and the two experimental values: extension headers
/// this parser does not walk (their payload is not the upper layer).
const NEXTHDR_UNWALKED: [u8; 5] = [135, 139, 140, 253, 254];
pub const NEXTHDR_ICMPV6: u8 = 58;

/// Whether the packet is IPv6 (by the Ethertype, or `skb->protocol` on an
/// L3 device; see [`is_ipv4`]).
#[inline(always)]
pub fn is_ipv6(ctx: &TcContext, l3: usize) -> bool {
    if l3 == 0 {
        // SAFETY: reading a field of our own context.
        let proto = unsafe { (*ctx.skb.skb).protocol };
        return proto == u32::from(ETH_P_IPV6_BE);
    }
    ctx.load::<u16>(12).is_ok_and(|t| t == ETH_P_IPV6_BE)
}

/// An IPv6 header with its extension headers walked.
pub struct Ip6 {
    pub saddr: In6,
    pub daddr: In6,
    /// The upper-layer protocol and where its header starts.
    pub next: u8,
    pub l4_off: usize,
    /// The end of the IPv6 packet (`l3 + 40 + payload length`): bytes past
    /// it are link-layer padding.
    pub end: usize,
    /// `FRAG_NONE`, `FRAG_FIRST`, or `FRAG_LATER`: a fragment after the
    /// first, of TCP or UDP (`next`), whose data starts at `l4_off` (no
    /// upper-layer header there).
    pub frag: u8,
    /// The Fragment header's identification, network order (0 when not a
    /// fragment).
    pub frag_id: u32,
}

/// Walks the IPv6 header at `l3` and its extension headers (hop-by-hop,
/// routing, fragment, destination options) up to the upper-layer header,
/// at most `IPV6_MAX_EXT_HDRS` of them.
///
/// `Err`: a chain that is longer, or holds a header this walk does not know
/// how to skip (mobility, HIP, shim6, experimental), or a routing header
/// with segments left — the destination is then an intermediate hop and
/// the L4 checksum covers the final one, so a rewrite would be wrong — is
/// `PASS_IPV6_EXT`; a later fragment (no upper-layer header) ends the walk
/// at its Fragment header: `FRAG_LATER` when that names TCP or UDP, else
/// `PASS_FRAGMENT`; a header cut short or beyond the payload length is
/// `MALFORMED_TRUNCATED`. All of them are passed untouched by the callers.
#[inline(always)]
pub fn walk_ipv6<C: Bytes>(ctx: &C, l3: usize) -> Result<Ip6, Skip> {
    let first: u8 = ctx.load(l3).map_err(|_| stats::MALFORMED_TRUNCATED)?;
    // Why: the Ethertype (or skb->protocol) can say IPv6 over a header that
    // is not; the stack drops it (ipv6_rcv), we count it and let it.
    if first >> 4 != 6 {
        return Err(stats::MALFORMED_BAD_IHL);
    }
    let plen = usize::from(u16::from_be(ctx.load::<u16>(l3 + IP6_PLEN).map_err(|_| stats::MALFORMED_TRUNCATED)?));
    let mut next: u8 = ctx.load(l3 + IP6_NEXT).map_err(|_| stats::MALFORMED_TRUNCATED)?;
    let saddr = In6(ctx.load(l3 + IP6_SADDR).map_err(|_| stats::MALFORMED_TRUNCATED)?);
    let daddr = In6(ctx.load(l3 + IP6_DADDR).map_err(|_| stats::MALFORMED_TRUNCATED)?);
    let skb_len = ctx.pkt_len();
    // Why the skb length when the payload length is 0: a BIG TCP (GRO/GSO
    // beyond 64 KiB) IPv6 packet carries payload length 0 inside the stack.
    // An ordinary packet with payload length 0 has no upper-layer header.
    let end = if plen == 0 && skb_len > l3 + IP6_HLEN + 0xffff { skb_len } else { l3 + IP6_HLEN + plen };
    let mut off = l3 + IP6_HLEN;
    let mut frag = FRAG_NONE;
    let mut frag_id = 0;
    for _ in 0..stats::IPV6_MAX_EXT_HDRS {
        if next == NEXTHDR_HOP || next == NEXTHDR_DEST || next == NEXTHDR_ROUTING {
            // Next header, length in 8-octet units not counting the first
            // 8, and for routing: type and segments left.
            let h: [u8; 4] = ctx.load(off).map_err(|_| stats::MALFORMED_TRUNCATED)?;
            if next == NEXTHDR_ROUTING && h[3] != 0 {
                return Err(stats::PASS_IPV6_EXT);
            }
            next = h[0];
            off += (usize::from(h[1]) + 1) * 8;
        } else if next == NEXTHDR_FRAGMENT {
            // Next header, reserved, then offset (13 bits) | res | M, then
            // the identification.
            let h: [u8; 4] = ctx.load(off).map_err(|_| stats::MALFORMED_TRUNCATED)?;
            frag_id = ctx.load(off + 4).map_err(|_| stats::MALFORMED_TRUNCATED)?;
            let fo = u16::from_be_bytes([h[2], h[3]]);
            next = h[0];
            off += 8;
            if fo & 0xfff8 != 0 {
                // A later fragment: what follows is data, not headers. Its
                // next header is the first header of the fragmentable part;
                // only TCP and UDP are translated (their ports remembered
                // from the first fragment), anything else is passed.
                if next != proto::TCP && next != proto::UDP {
                    return Err(stats::PASS_FRAGMENT);
                }
                if off > end {
                    return Err(stats::MALFORMED_TRUNCATED);
                }
                return Ok(Ip6 { saddr, daddr, next, l4_off: off, end, frag: FRAG_LATER, frag_id });
            }
            // M clear with offset 0: an atomic fragment (RFC 6946), a whole
            // datagram.
            if fo & 1 != 0 {
                frag = FRAG_FIRST;
            }
        } else {
            break;
        }
        if off > end {
            return Err(stats::MALFORMED_TRUNCATED);
        }
    }
    if next == NEXTHDR_HOP
        || next == NEXTHDR_DEST
        || next == NEXTHDR_ROUTING
        || next == NEXTHDR_FRAGMENT
        || NEXTHDR_UNWALKED.contains(&next)
    {
        return Err(stats::PASS_IPV6_EXT);
    }
    Ok(Ip6 { saddr, daddr, next, l4_off: off, end, frag, frag_id })
}

/// Parses the TCP/UDP ports of an IPv6 packet whose header `h` at `l3` was
/// walked ([`walk_ipv6`]). `Err(reason)` = not for us (`PASS_OTHER_PROTO`
/// for an upper layer other than TCP/UDP, `PASS_FRAGMENT` for a later
/// fragment: see [`parse_ipv6_l4`]). No map is read or written: XDP uses it.
#[inline(always)]
pub fn parse_ipv6_ports<C: Bytes>(ctx: &C, l3: usize, h: &Ip6) -> Result<Pkt<V6>, Skip> {
    let proto = h.next;
    if proto != proto::TCP && proto != proto::UDP && proto != proto::SCTP {
        return Err(stats::PASS_OTHER_PROTO);
    }
    // SCTP: a first fragment too (see `parse_ipv4_l4`).
    if h.frag == FRAG_LATER || (proto == proto::SCTP && h.frag != FRAG_NONE) {
        return Err(stats::PASS_FRAGMENT);
    }
    // Why SCTP only right after the fixed header: its checksum is fixed
    // by `crate::sctp`, which finds the header again on its own, without
    // walking extension headers. Passed untranslated and counted.
    if proto == proto::SCTP && h.l4_off != l3 + IP6_HLEN {
        return Err(stats::PASS_IPV6_EXT);
    }
    let l4_off = h.l4_off;
    let ports: [u16; 2] = ctx.load(l4_off).map_err(|_| stats::MALFORMED_TRUNCATED)?;
    let (l4_min, tcp_flags) = l4_header(ctx, proto, l4_off)?;
    // As for IPv4: the L4 header must lie within the payload length, not in
    // padding, and be all there (the checksum we rewrite included).
    if ctx.pkt_len() < l4_off + l4_min || h.end < l4_off + l4_min {
        return Err(stats::MALFORMED_TRUNCATED);
    }
    if proto == proto::UDP {
        // Why: a zero UDP checksum means "none" in IPv4 only; in IPv6 it is
        // invalid (RFC 8200 8.1) and the stack drops the datagram. An
        // incremental update of 0 would make it a wrong non-zero checksum:
        // it is left as it came.
        let c: u16 = ctx.load(l4_off + UDP_CSUM).map_err(|_| stats::MALFORMED_TRUNCATED)?;
        if c == 0 {
            return Err(stats::MALFORMED_UDP6_NO_CSUM);
        }
    }
    Ok(Pkt {
        l3_off: l3,
        l4_off,
        ihl_len: l4_off - l3,
        proto,
        saddr_be: h.saddr,
        daddr_be: h.daddr,
        sport_be: ports[0],
        dport_be: ports[1],
        tcp_flags,
        frag: h.frag,
    })
}

/// [`parse_ipv6_ports`] on TC, with fragments as for IPv4: a first
/// fragment's ports are remembered (`proxy_frag6_v1`), a later fragment
/// takes them (`Err(PASS_FRAGMENT)` when its first was not seen).
#[inline(always)]
pub fn parse_ipv6_l4(ctx: &TcContext, l3: usize, h: &Ip6) -> Result<Pkt<V6>, Skip> {
    if h.frag != FRAG_LATER {
        let p = parse_ipv6_ports(ctx, l3, h)?;
        if p.frag == FRAG_FIRST {
            frag::remember::<V6>(h.saddr, h.daddr, h.frag_id, p.proto, [p.sport_be, p.dport_be]);
        }
        return Ok(p);
    }
    let ports = frag::recall::<V6>(h.saddr, h.daddr, h.frag_id, h.next).ok_or(stats::PASS_FRAGMENT)?;
    Ok(Pkt {
        l3_off: l3,
        l4_off: h.l4_off,
        ihl_len: h.l4_off - l3,
        proto: h.next,
        saddr_be: h.saddr,
        daddr_be: h.daddr,
        sport_be: ports[0],
        dport_be: ports[1],
        tcp_flags: 0,
        frag: FRAG_LATER,
    })
}
