//! IPv6 twin of [`crate::packet`]: a frame builder and a parser/checker for
//! `BPF_PROG_TEST_RUN` tests of the IPv6 path.
//!
//! [`Frame6`] makes Ethernet + IPv6 [+ extension headers] + TCP/UDP/ICMPv6
//! frames with correct L4 checksums over the IPv6 pseudo-header (RFC 8200
//! 8.1; ICMPv6 has one too, RFC 4443 2.3), with knobs for what an IPv6
//! datapath must survive: hop-by-hop, destination-options, routing and
//! fragment headers in any number and order, unknown next headers, a UDP
//! checksum of 0 (invalid in IPv6), a lying payload length. [`parse6`] reads
//! a frame back, walking the extension headers itself, and
//! [`Parsed6::verify_checksums`] recomputes every checksum from the bytes —
//! independently of the datapath's incremental updates.
//!
//! Plain Rust on byte vectors, like [`crate::packet`].
use std::net::{Ipv6Addr, SocketAddrV6};

use crate::packet::{CLIENT_MAC, ETH_HLEN, ETH_P_IPV6, NODE_MAC, L4, ethernet_header, fold, proto, sum_words};

/// Length of the fixed IPv6 header.
pub const IPV6_HLEN: usize = 40;
/// Next-header values.
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_ICMPV6: u8 = 58;
pub const NEXTHDR_NONE: u8 = 59;
pub const NEXTHDR_DEST: u8 = 60;
/// Mobility header: an extension header the datapath does not walk.
pub const NEXTHDR_MOBILITY: u8 = 135;

/// ICMPv6 types and codes (RFC 4443).
pub mod icmp6 {
    pub const DEST_UNREACH: u8 = 1;
    pub const PKT_TOOBIG: u8 = 2;
    pub const TIME_EXCEED: u8 = 3;
    pub const ECHO_REQUEST: u8 = 128;
    /// Destination unreachable code: port unreachable.
    pub const PORT_UNREACH: u8 = 4;
}

/// An extension header of a [`Frame6`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options; the options are padded (PadN) to a multiple of
    /// 8 bytes with the 2-byte header.
    HopByHop(Vec<u8>),
    /// Destination options, padded the same way.
    DestOpts(Vec<u8>),
    /// A routing header of `routing_type` with `segments_left` and
    /// `addresses` (type 0-style layout: 4 reserved bytes, then addresses).
    Routing { routing_type: u8, segments_left: u8, addresses: Vec<Ipv6Addr> },
    /// A fragment header: offset in 8-byte units, more-fragments flag, id.
    Fragment { offset: u16, more: bool, id: u32 },
    /// Any header by number, its bytes after the next-header byte given as
    /// they are (the length byte included).
    Raw { nexthdr: u8, body: Vec<u8> },
}

impl Ext {
    /// The next-header value that announces this header.
    #[must_use]
    pub fn number(&self) -> u8 {
        match self {
            Ext::HopByHop(_) => NEXTHDR_HOP,
            Ext::DestOpts(_) => NEXTHDR_DEST,
            Ext::Routing { .. } => NEXTHDR_ROUTING,
            Ext::Fragment { .. } => NEXTHDR_FRAGMENT,
            Ext::Raw { nexthdr, .. } => *nexthdr,
        }
    }

    /// The header's bytes with `next` as its next-header value.
    #[must_use]
    pub fn bytes(&self, next: u8) -> Vec<u8> {
        let options = |opts: &[u8]| {
            let mut b = vec![next, 0];
            b.extend_from_slice(opts);
            // PadN to a multiple of 8 (Pad1 for a single byte).
            let pad = (8 - b.len() % 8) % 8;
            match pad {
                0 => {}
                1 => b.push(0),
                n => {
                    b.push(1);
                    b.push(u8::try_from(n - 2).expect("pad"));
                    b.extend(std::iter::repeat_n(0, n - 2));
                }
            }
            b[1] = u8::try_from(b.len() / 8 - 1).expect("header length");
            b
        };
        match self {
            Ext::HopByHop(o) | Ext::DestOpts(o) => options(o),
            Ext::Routing { routing_type, segments_left, addresses } => {
                let mut b = vec![next, u8::try_from(addresses.len() * 2).expect("length"), *routing_type, *segments_left, 0, 0, 0, 0];
                for a in addresses {
                    b.extend_from_slice(&a.octets());
                }
                b
            }
            Ext::Fragment { offset, more, id } => {
                let fo = (offset << 3) | u16::from(*more);
                let mut b = vec![next, 0];
                b.extend_from_slice(&fo.to_be_bytes());
                b.extend_from_slice(&id.to_be_bytes());
                b
            }
            Ext::Raw { body, .. } => {
                let mut b = vec![next];
                b.extend_from_slice(body);
                b
            }
        }
    }
}

/// An Ethernet + IPv6 frame to build.
#[derive(Clone, Debug)]
pub struct Frame6 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ethertype: u16,
    pub traffic_class: u8,
    pub flow_label: u32,
    pub hop_limit: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub ext: Vec<Ext>,
    /// TCP, UDP, or ICMPv6 (as `L4::Icmp`), or another upper layer.
    pub l4: L4,
    pub payload: Vec<u8>,
    /// Written instead of the real payload length.
    pub payload_len: Option<u16>,
    /// The upper layer's number when `l4` is `L4::Other`, or to lie about it.
    pub upper: Option<u8>,
}

impl Frame6 {
    fn new(src: Ipv6Addr, dst: Ipv6Addr, l4: L4) -> Self {
        Self {
            dst_mac: NODE_MAC,
            src_mac: CLIENT_MAC,
            ethertype: ETH_P_IPV6,
            traffic_class: 0,
            flow_label: 0x12345,
            hop_limit: 64,
            src,
            dst,
            ext: Vec::new(),
            l4,
            payload: Vec::new(),
            payload_len: None,
            upper: None,
        }
    }

    /// A TCP segment with `flags` (see [`crate::packet::tcp_flags`]).
    #[must_use]
    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Self {
        let l4 = L4::Tcp { sport: src.port(), dport: dst.port(), flags, seq: 1000, ack: 0 };
        Self::new(*src.ip(), *dst.ip(), l4)
    }

    /// A UDP datagram with a checksum.
    #[must_use]
    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6) -> Self {
        let l4 = L4::Udp { sport: src.port(), dport: dst.port(), zero_checksum: false };
        Self::new(*src.ip(), *dst.ip(), l4).with_payload(b"hello")
    }

    /// An ICMPv6 message of `ty`/`code` with `rest` (the 4 bytes after the
    /// checksum) and `body` (for an error: the quoted packet).
    #[must_use]
    pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Self {
        Self::new(src, dst, L4::Icmp { ty, code, rest }).with_payload(body)
    }

    #[must_use]
    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    #[must_use]
    pub fn with_ext(mut self, ext: Ext) -> Self {
        self.ext.push(ext);
        self
    }

    #[must_use]
    pub fn with_macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    #[must_use]
    pub fn with_hop_limit(mut self, h: u8) -> Self {
        self.hop_limit = h;
        self
    }

    /// A UDP datagram sent with checksum 0 (invalid in IPv6).
    #[must_use]
    pub fn with_udp_zero_checksum(mut self) -> Self {
        match &mut self.l4 {
            L4::Udp { zero_checksum, .. } => *zero_checksum = true,
            other => panic!("with_udp_zero_checksum on {other:?}"),
        }
        self
    }

    #[must_use]
    pub fn with_tcp_seq(mut self, seq_no: u32, ack_no: u32) -> Self {
        match &mut self.l4 {
            L4::Tcp { seq, ack, .. } => {
                *seq = seq_no;
                *ack = ack_no;
            }
            other => panic!("with_tcp_seq on {other:?}"),
        }
        self
    }

    /// Replaces the source address and port.
    #[must_use]
    pub fn with_src(mut self, src: SocketAddrV6) -> Self {
        self.src = *src.ip();
        if let L4::Tcp { sport, .. } | L4::Udp { sport, .. } = &mut self.l4 {
            *sport = src.port();
        }
        self
    }

    /// Replaces the destination address and port.
    #[must_use]
    pub fn with_dst(mut self, dst: SocketAddrV6) -> Self {
        self.dst = *dst.ip();
        if let L4::Tcp { dport, .. } | L4::Udp { dport, .. } = &mut self.l4 {
            *dport = dst.port();
        }
        self
    }

    fn upper(&self) -> u8 {
        self.upper.unwrap_or(match self.l4 {
            L4::Icmp { .. } => NEXTHDR_ICMPV6,
            ref l4 => l4.proto(),
        })
    }

    /// The upper-layer header and payload with a correct checksum.
    fn l4_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self.l4 {
            L4::Tcp { sport, dport, flags, seq, ack } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(&ack.to_be_bytes());
                b.push(5 << 4);
                b.push(flags);
                b.extend_from_slice(&0xffff_u16.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]);
                b.extend_from_slice(&self.payload);
                let c = l4_checksum6(self.src, self.dst, proto::TCP, &b);
                b[16..18].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp { sport, dport, zero_checksum } => {
                let len = u16::try_from(8 + self.payload.len()).expect("UDP datagram too long");
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(&self.payload);
                if !zero_checksum {
                    let c = l4_checksum6(self.src, self.dst, proto::UDP, &b);
                    let c = if c == 0 { 0xffff } else { c };
                    b[6..8].copy_from_slice(&c.to_be_bytes());
                }
            }
            L4::Icmp { ty, code, rest } => {
                b.extend_from_slice(&[ty, code, 0, 0]);
                b.extend_from_slice(&rest);
                b.extend_from_slice(&self.payload);
                let c = l4_checksum6(self.src, self.dst, NEXTHDR_ICMPV6, &b);
                b[2..4].copy_from_slice(&c.to_be_bytes());
            }
            L4::Other { .. } => b.extend_from_slice(&self.payload),
        }
        b
    }

    /// The IPv6 packet (no Ethernet header).
    #[must_use]
    pub fn build_ip(&self) -> Vec<u8> {
        let mut ext = Vec::new();
        for (i, e) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or_else(|| self.upper(), Ext::number);
            ext.extend_from_slice(&e.bytes(next));
        }
        let l4 = self.l4_bytes();
        let plen = self.payload_len.unwrap_or_else(|| u16::try_from(ext.len() + l4.len()).expect("IPv6 payload too long"));
        let first_next = self.ext.first().map_or_else(|| self.upper(), Ext::number);
        let vtf = (6u32 << 28) | (u32::from(self.traffic_class) << 20) | (self.flow_label & 0xfffff);
        let mut ip = Vec::with_capacity(IPV6_HLEN + ext.len() + l4.len());
        ip.extend_from_slice(&vtf.to_be_bytes());
        ip.extend_from_slice(&plen.to_be_bytes());
        ip.push(first_next);
        ip.push(self.hop_limit);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&ext);
        ip.extend_from_slice(&l4);
        ip
    }

    /// The whole frame.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let mut f = ethernet_header(self.dst_mac, self.src_mac, self.ethertype);
        f.extend_from_slice(&self.build_ip());
        f
    }
}

/// Sum of the IPv6 pseudo-header (RFC 8200 8.1) for an upper-layer packet
/// of `len` bytes with next header `nh`.
#[must_use]
pub fn pseudo_header_sum6(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, len: usize) -> u32 {
    let mut ph = Vec::with_capacity(40);
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&u32::try_from(len).expect("length").to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, nh]);
    sum_words(&ph, 0)
}

/// The checksum of an upper-layer packet over the IPv6 pseudo-header: a
/// packet with a correct checksum yields 0.
#[must_use]
pub fn l4_checksum6(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, segment: &[u8]) -> u16 {
    !fold(sum_words(segment, pseudo_header_sum6(src, dst, nh, segment.len())))
}

// ---------------------------------------------------------------------------
// Parsing and checking
// ---------------------------------------------------------------------------

/// A parsed Ethernet (or bare) IPv6 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed6 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ethertype: u16,
    pub hop_limit: u8,
    pub payload_len: u16,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// The extension headers walked: (number, bytes).
    pub ext: Vec<(u8, Vec<u8>)>,
    /// The upper-layer protocol and its offset in the IPv6 packet.
    pub upper: u8,
    pub upper_off: usize,
    /// Fragment offset (8-byte units) and more-fragments, if a fragment.
    pub fragment: Option<(u16, bool)>,
    /// From the upper-layer header to the end of the payload.
    pub segment: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr6(b: &[u8], at: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(o)
}

/// Parses an Ethernet + IPv6 frame (see [`parse6_ip`]).
pub fn parse6(frame: &[u8]) -> Result<Parsed6, String> {
    if frame.len() < ETH_HLEN {
        return Err(format!("frame of {} bytes is shorter than Ethernet", frame.len()));
    }
    let ethertype = be16(frame, 12);
    if ethertype != ETH_P_IPV6 {
        return Err(format!("ethertype {ethertype:#06x} is not IPv6"));
    }
    let mut p = parse6_ip(&frame[ETH_HLEN..])?;
    p.dst_mac.copy_from_slice(&frame[0..6]);
    p.src_mac.copy_from_slice(&frame[6..12]);
    p.ethertype = ethertype;
    Ok(p)
}

/// Parses an IPv6 packet: the header, the extension headers (hop-by-hop,
/// routing, destination options, fragment; at most 16), and locates the
/// upper layer. Errors on anything cut short or past the payload length.
pub fn parse6_ip(b: &[u8]) -> Result<Parsed6, String> {
    if b.len() < IPV6_HLEN {
        return Err(format!("IPv6 header cut at {} bytes", b.len()));
    }
    if b[0] >> 4 != 6 {
        return Err(format!("IP version {}", b[0] >> 4));
    }
    let payload_len = be16(b, 4);
    let end = IPV6_HLEN + usize::from(payload_len);
    if end > b.len() {
        return Err(format!("payload length {payload_len} beyond the {} bytes", b.len()));
    }
    let mut next = b[6];
    let mut off = IPV6_HLEN;
    let mut ext = Vec::new();
    let mut fragment = None;
    for _ in 0..16 {
        let len = match next {
            NEXTHDR_HOP | NEXTHDR_DEST | NEXTHDR_ROUTING => {
                if off + 2 > end {
                    return Err("extension header cut short".into());
                }
                (usize::from(b[off + 1]) + 1) * 8
            }
            NEXTHDR_FRAGMENT => {
                if off + 8 > end {
                    return Err("fragment header cut short".into());
                }
                let fo = be16(b, off + 2);
                fragment = Some((fo >> 3, fo & 1 != 0));
                8
            }
            _ => break,
        };
        if off + len > end {
            return Err(format!("extension header {next} of {len} bytes beyond the payload"));
        }
        ext.push((next, b[off..off + len].to_vec()));
        next = b[off];
        off += len;
        if fragment.is_some_and(|(o, _)| o != 0) {
            break;
        }
    }
    Ok(Parsed6 {
        dst_mac: [0; 6],
        src_mac: [0; 6],
        ethertype: ETH_P_IPV6,
        hop_limit: b[7],
        payload_len,
        src: addr6(b, 8),
        dst: addr6(b, 24),
        ext,
        upper: next,
        upper_off: off,
        fragment,
        segment: b[off..end].to_vec(),
    })
}

impl Parsed6 {
    /// Source and destination ports (TCP/UDP), else (0, 0).
    #[must_use]
    pub fn ports(&self) -> (u16, u16) {
        if matches!(self.upper, proto::TCP | proto::UDP) && self.segment.len() >= 4 && !self.is_later_fragment() {
            (be16(&self.segment, 0), be16(&self.segment, 2))
        } else {
            (0, 0)
        }
    }

    #[must_use]
    pub fn is_later_fragment(&self) -> bool {
        self.fragment.is_some_and(|(o, _)| o != 0)
    }

    #[must_use]
    pub fn src_sa(&self) -> SocketAddrV6 {
        SocketAddrV6::new(self.src, self.ports().0, 0, 0)
    }

    #[must_use]
    pub fn dst_sa(&self) -> SocketAddrV6 {
        SocketAddrV6::new(self.dst, self.ports().1, 0, 0)
    }

    /// The upper-layer checksum field, at its offset in the segment.
    #[must_use]
    pub fn checksum_field(&self) -> Option<u16> {
        let at = match self.upper {
            proto::TCP => 16,
            proto::UDP => 6,
            NEXTHDR_ICMPV6 => 2,
            _ => return None,
        };
        (self.segment.len() >= at + 2).then(|| be16(&self.segment, at))
    }

    /// Recomputes the TCP, UDP or ICMPv6 checksum over the pseudo-header and
    /// the segment. A UDP checksum of 0 is an error (RFC 8200 8.1). `Ok` for
    /// other upper layers and later fragments (nothing to check).
    pub fn verify_checksums(&self) -> Result<(), String> {
        if self.is_later_fragment() || self.fragment.is_some_and(|(_, more)| more) {
            return Ok(());
        }
        let name = match self.upper {
            proto::TCP => "TCP",
            proto::UDP => "UDP",
            NEXTHDR_ICMPV6 => "ICMPv6",
            _ => return Ok(()),
        };
        let field = self.checksum_field().ok_or_else(|| format!("{name} header cut short"))?;
        if self.upper == proto::UDP && field == 0 {
            return Err("UDP checksum 0: invalid in IPv6".into());
        }
        let r = l4_checksum6(self.src, self.dst, self.upper, &self.segment);
        if r != 0 {
            return Err(format!("bad {name} checksum {field:#06x} (residual {r:#06x})"));
        }
        Ok(())
    }
}

/// Splits `ip` (an IPv6 packet without extension headers) into fragments
/// as a sender does (RFC 8200 4.5): a Fragment header with identification
/// `id` after each copy of the IPv6 header, `chunk` bytes (a multiple of 8)
/// of the upper-layer packet in each but the last.
#[must_use]
pub fn fragment6(ip: &[u8], id: u32, chunk: usize) -> Vec<Vec<u8>> {
    assert!(chunk % 8 == 0 && chunk > 0, "fragment size {chunk} is not a multiple of 8");
    let upper = ip[6];
    assert!(!matches!(upper, NEXTHDR_HOP | NEXTHDR_DEST | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT), "fragment6 takes no extension headers");
    let segment = &ip[IPV6_HLEN..];
    segment
        .chunks(chunk)
        .enumerate()
        .map(|(i, data)| {
            let offset = u16::try_from(i * chunk / 8).expect("offset");
            let more = (i + 1) * chunk < segment.len();
            let mut f = ip[..IPV6_HLEN].to_vec();
            f[4..6].copy_from_slice(&u16::try_from(8 + data.len()).expect("length").to_be_bytes());
            f[6] = NEXTHDR_FRAGMENT;
            f.extend_from_slice(&Ext::Fragment { offset, more, id }.bytes(upper));
            f.extend_from_slice(data);
            f
        })
        .collect()
}

/// A datagram put back together from its fragments (IPv6 packets, any
/// order): the addresses of the fragments (all the same), the upper-layer
/// protocol and packet. Errors on differing addresses, identifications or
/// protocols, a gap, an overlap or a missing last fragment.
pub fn reassemble6(fragments: &[Vec<u8>]) -> Result<(Ipv6Addr, Ipv6Addr, u8, Vec<u8>), String> {
    let mut parts = Vec::new();
    let mut key = None;
    for (i, f) in fragments.iter().enumerate() {
        let p = parse6_ip(f).map_err(|e| format!("fragment {i}: {e}"))?;
        let Some((offset, more)) = p.fragment else {
            return Err(format!("packet {i} is not a fragment"));
        };
        let (_, hdr) = p.ext.iter().find(|(n, _)| *n == NEXTHDR_FRAGMENT).ok_or("no fragment header")?;
        let id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        let k = (p.src, p.dst, id, hdr[0]);
        if *key.get_or_insert(k) != k {
            return Err(format!("fragment {i} is of another datagram: {k:?}, not {key:?}"));
        }
        parts.push((usize::from(offset) * 8, more, p.segment));
    }
    parts.sort_by_key(|(at, _, _)| *at);
    let mut whole = Vec::new();
    for (n, (at, more, data)) in parts.iter().enumerate() {
        if *at != whole.len() {
            return Err(format!("fragment at {at} after {} bytes", whole.len()));
        }
        if !more && n + 1 != parts.len() {
            return Err("fragments after the last".into());
        }
        whole.extend_from_slice(data);
    }
    if parts.last().is_none_or(|(_, more, _)| *more) {
        return Err("no last fragment".into());
    }
    let (src, dst, _, upper) = key.ok_or("no fragments")?;
    Ok((src, dst, upper, whole))
}

/// `ip` (an IPv6 packet) in an Ethernet frame with the default MACs.
#[must_use]
pub fn in_ethernet(ip: &[u8]) -> Vec<u8> {
    let mut f = ethernet_header(NODE_MAC, CLIENT_MAC, ETH_P_IPV6);
    f.extend_from_slice(ip);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::tcp_flags;

    fn sa(s: &str) -> SocketAddrV6 {
        s.parse().unwrap()
    }

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        let c = sa("[2001:db8::2]:40000");
        let v = sa("[fd00::10]:80");
        let frames = [
            Frame6::tcp(c, v, tcp_flags::SYN).build(),
            Frame6::udp(c, v).build(),
            Frame6::udp(c, v).with_payload(b"odd").build(),
            Frame6::tcp(c, v, tcp_flags::SYN).with_ext(Ext::HopByHop(vec![5, 2, 0, 0])).with_ext(Ext::DestOpts(vec![])).build(),
            Frame6::udp(c, v).with_ext(Ext::Fragment { offset: 0, more: true, id: 7 }).build(),
            Frame6::icmp6(*c.ip(), *v.ip(), icmp6::ECHO_REQUEST, 0, [0, 1, 0, 1], b"ping").build(),
        ];
        for f in &frames {
            let p = parse6(f).unwrap();
            assert_eq!(usize::from(p.payload_len) + IPV6_HLEN + ETH_HLEN, f.len());
            if p.fragment.is_none() {
                p.verify_checksums().unwrap_or_else(|e| panic!("{e}: {f:02x?}"));
            }
        }
        let p = parse6(&frames[3]).unwrap();
        assert_eq!(p.ext.len(), 2);
        assert_eq!(p.ext[0].1.len(), 8);
        assert_eq!(p.upper, proto::TCP);
        assert_eq!(p.upper_off, IPV6_HLEN + 16);
        assert_eq!(p.src_sa(), c);
        assert_eq!(p.dst_sa(), v);
    }

    #[test]
    fn fragments_reassemble_to_the_datagram() {
        let (c, v) = (sa("[2001:db8::2]:40000"), sa("[fd00::10]:80"));
        let ip = Frame6::udp(c, v).with_payload(&(0..=255).cycle().take(1000).collect::<Vec<u8>>()).build_ip();
        let frags = fragment6(&ip, 0xdead_beef, 400);
        assert_eq!(frags.len(), 3);
        let p = parse6_ip(&frags[1]).unwrap();
        assert_eq!((p.fragment, p.upper, p.segment.len()), (Some((50, true)), proto::UDP, 400));
        assert!(p.is_later_fragment());
        let mut shuffled = frags.clone();
        shuffled.swap(0, 2);
        let (src, dst, upper, seg) = reassemble6(&shuffled).unwrap();
        assert_eq!((src, dst, upper, &seg[..]), (*c.ip(), *v.ip(), proto::UDP, &ip[IPV6_HLEN..]));
        assert_eq!(l4_checksum6(src, dst, upper, &seg), 0);
        assert!(reassemble6(&frags[..2]).is_err(), "no last fragment");
        assert!(reassemble6(&[frags[0].clone(), frags[2].clone()]).is_err(), "a gap");
    }

    #[test]
    fn corruption_is_detected() {
        let f = Frame6::tcp(sa("[2001:db8::2]:40000"), sa("[fd00::10]:80"), tcp_flags::SYN).build();
        let mut bad = f.clone();
        bad[ETH_HLEN + 24 + 15] ^= 1; // destination, checksum not fixed
        assert!(parse6(&bad).unwrap().verify_checksums().is_err(), "the pseudo-header covers the address");
        let z = Frame6::udp(sa("[2001:db8::2]:1"), sa("[fd00::10]:2")).with_udp_zero_checksum().build();
        assert!(parse6(&z).unwrap().verify_checksums().unwrap_err().contains("invalid"));
    }
}
