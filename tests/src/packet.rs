//! A small packet builder and checker for `BPF_PROG_TEST_RUN` tests.
//!
//! [`FrameBuilder`] makes Ethernet + IPv4 + TCP/UDP/ICMP frames with correct
//! IPv4 and L4 checksums (the L4 ones over the pseudo-header), with knobs for
//! the odd cases a datapath must survive: IP options or a lying IHL, fragment
//! flags and offsets, a UDP datagram without checksum (0). [`parse`] reads a
//! frame back into its headers, and [`Parsed::verify_checksums`] checks the
//! IPv4 header checksum, the TCP/UDP checksum (a UDP checksum of 0 means
//! "none" and is valid) and the ICMP checksum over the whole ICMP message.
//!
//! Plain Rust on byte vectors: nothing here needs root or BPF, but for
//! [`stats_by_reason`], which reads the counters of a loaded object.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
};

use aya::{Ebpf, maps::PerCpuArray};
pub use proxy_common::proto;
use proxy_common::stats::{FAMILIES, REASONS, STATS_MAP, StatCounter, stats_slot};

/// Length of an Ethernet header (no VLAN tag).
pub const ETH_HLEN: usize = 14;
/// Length of an IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// The MAC addresses test frames use by default: the client's and the node's.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// ICMP types and codes the tests look at.
pub mod icmp {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACH: u8 = 3;
    pub const PORT_UNREACH: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    /// Destination unreachable code: fragmentation needed and DF set.
    pub const FRAG_NEEDED: u8 = 4;
    pub const TIME_EXCEEDED: u8 = 11;
    /// Time exceeded code: TTL exceeded in transit.
    pub const TTL_EXCEEDED: u8 = 0;
}

// ---------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------

/// Adds `data` as big-endian 16-bit words to `sum` (an odd last byte is
/// padded with zero), without folding.
#[must_use]
pub fn sum_words(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// Folds a 32-bit one's-complement sum into 16 bits (not inverted).
#[must_use]
pub fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 significant bits.
    u16::try_from(sum).expect("folded sum fits in 16 bits")
}

/// The Internet checksum (RFC 1071) of `data`, as stored in a header.
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_words(data, 0))
}

/// Sum of the IPv4 pseudo-header for an L4 segment of `len` bytes.
#[must_use]
pub fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut ph = [0u8; 12];
    ph[0..4].copy_from_slice(&src.octets());
    ph[4..8].copy_from_slice(&dst.octets());
    ph[9] = proto;
    let len = u16::try_from(len).expect("L4 segment longer than 64 KiB");
    ph[10..12].copy_from_slice(&len.to_be_bytes());
    sum_words(&ph, 0)
}

/// TCP or UDP checksum of `segment` (its checksum field zeroed or not:
/// a segment with a correct checksum yields 0) over the IPv4 pseudo-header.
/// Returns the raw result; UDP senders transmit 0 as 0xffff.
#[must_use]
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    !fold(sum_words(
        segment,
        pseudo_header_sum(src, dst, proto, segment.len()),
    ))
}

fn udp_wire_checksum(c: u16) -> u16 {
    // RFC 768: a computed 0 is sent as all ones; 0 means "no checksum".
    if c == 0 { 0xffff } else { c }
}

// ---------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------

/// The L4 part of a frame built by [`FrameBuilder`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
    },
    /// `zero_checksum`: send the datagram without a checksum (field = 0).
    Udp {
        sport: u16,
        dport: u16,
        zero_checksum: bool,
    },
    /// `rest` is the 4 bytes after the checksum (id and sequence of an echo).
    Icmp { ty: u8, code: u8, rest: [u8; 4] },
    /// Another protocol: the payload is the whole L4 part, no checksum.
    Other { proto: u8 },
}

impl L4 {
    #[must_use]
    pub fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => proto::TCP,
            L4::Udp { .. } => proto::UDP,
            L4::Icmp { .. } => proto::ICMP,
            L4::Other { proto } => *proto,
        }
    }
}

/// An Ethernet + IPv4 frame to build. Fields are public for unusual cases;
/// the `with_*` methods cover the usual ones.
#[derive(Clone, Debug)]
pub struct FrameBuilder {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ethertype: u16,
    /// Value of the IPv4 version field (4 unless testing garbage).
    pub version: u8,
    /// Value written in the IHL field; `None` = derived from `options`.
    /// The header is always laid out as 20 bytes + `options`.
    pub ihl: Option<u8>,
    pub tos: u8,
    pub id: u16,
    pub ttl: u8,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    /// IPv4 options; the length must be a multiple of 4.
    pub options: Vec<u8>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl FrameBuilder {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            dst_mac: NODE_MAC,
            src_mac: CLIENT_MAC,
            ethertype: ETH_P_IP,
            version: 4,
            ihl: None,
            tos: 0,
            id: 0x1234,
            ttl: 64,
            dont_fragment: true,
            more_fragments: false,
            frag_offset: 0,
            options: Vec::new(),
            src,
            dst,
            l4,
            payload: Vec::new(),
        }
    }

    /// A TCP segment with `flags` (see [`tcp_flags`]).
    #[must_use]
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        let l4 = L4::Tcp {
            sport: src.port(),
            dport: dst.port(),
            flags,
            seq: 1000,
            ack: 0,
        };
        Self::new(*src.ip(), *dst.ip(), l4)
    }

    /// A UDP datagram with a checksum.
    #[must_use]
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        let l4 = L4::Udp {
            sport: src.port(),
            dport: dst.port(),
            zero_checksum: false,
        };
        Self::new(*src.ip(), *dst.ip(), l4).with_payload(b"hello")
    }

    /// An ICMP echo request.
    #[must_use]
    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        let l4 = L4::Icmp {
            ty: icmp::ECHO_REQUEST,
            code: 0,
            rest: [0x00, 0x2a, 0x00, 0x01],
        };
        Self::new(src, dst, l4).with_payload(b"ping")
    }

    #[must_use]
    pub fn with_macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    #[must_use]
    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// IPv4 options (padded with zeros, End of Option List, to 4 bytes).
    #[must_use]
    pub fn with_options(mut self, options: &[u8]) -> Self {
        let mut o = options.to_vec();
        while !o.len().is_multiple_of(4) {
            o.push(0);
        }
        assert!(o.len() <= 40, "IPv4 options are at most 40 bytes");
        self.options = o;
        self
    }

    /// Writes `ihl` in the IHL field whatever the real header length.
    #[must_use]
    pub fn with_ihl(mut self, ihl: u8) -> Self {
        self.ihl = Some(ihl);
        self
    }

    #[must_use]
    pub fn with_version(mut self, version: u8) -> Self {
        self.version = version;
        self
    }

    #[must_use]
    pub fn with_more_fragments(mut self) -> Self {
        self.more_fragments = true;
        self.dont_fragment = false;
        self
    }

    /// Fragment offset in 8-byte units.
    #[must_use]
    pub fn with_frag_offset(mut self, offset: u16) -> Self {
        assert!(offset < 0x2000, "fragment offset is 13 bits");
        self.frag_offset = offset;
        self.dont_fragment = false;
        self
    }

    /// A UDP datagram sent without checksum (field 0).
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

    /// Replaces source address and port (port ignored for ICMP/other).
    #[must_use]
    pub fn with_src(mut self, src: SocketAddrV4) -> Self {
        self.src = *src.ip();
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = src.port(),
            L4::Icmp { .. } | L4::Other { .. } => {}
        }
        self
    }

    /// Replaces destination address and port (port ignored for ICMP/other).
    #[must_use]
    pub fn with_dst(mut self, dst: SocketAddrV4) -> Self {
        self.dst = *dst.ip();
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = dst.port(),
            L4::Icmp { .. } | L4::Other { .. } => {}
        }
        self
    }

    /// The L4 header and payload with a correct checksum.
    fn l4_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
            } => {
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(&ack.to_be_bytes());
                b.push(5 << 4); // data offset: 5 words, no options
                b.push(flags);
                b.extend_from_slice(&0xffff_u16.to_be_bytes()); // window
                b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                b.extend_from_slice(&self.payload);
                let c = l4_checksum(self.src, self.dst, proto::TCP, &b);
                b[16..18].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp {
                sport,
                dport,
                zero_checksum,
            } => {
                let len =
                    u16::try_from(UDP_HLEN + self.payload.len()).expect("UDP datagram too long");
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(&self.payload);
                if !zero_checksum {
                    let c = udp_wire_checksum(l4_checksum(self.src, self.dst, proto::UDP, &b));
                    b[6..8].copy_from_slice(&c.to_be_bytes());
                }
            }
            L4::Icmp { ty, code, rest } => {
                b.extend_from_slice(&[ty, code, 0, 0]);
                b.extend_from_slice(&rest);
                b.extend_from_slice(&self.payload);
                let c = checksum(&b);
                b[2..4].copy_from_slice(&c.to_be_bytes());
            }
            L4::Other { .. } => b.extend_from_slice(&self.payload),
        }
        b
    }

    /// The IPv4 header (with options and checksum) for an L4 part of `l4_len`.
    fn ipv4_header(&self, l4_len: usize) -> Vec<u8> {
        assert!(
            self.options.len().is_multiple_of(4),
            "IPv4 options must be padded to 4 bytes"
        );
        let hlen = IPV4_HLEN + self.options.len();
        let ihl = self
            .ihl
            .unwrap_or_else(|| u8::try_from(hlen / 4).expect("IHL fits"));
        let total = u16::try_from(hlen + l4_len).expect("IPv4 packet too long");
        let mut frag = self.frag_offset;
        if self.dont_fragment {
            frag |= 0x4000;
        }
        if self.more_fragments {
            frag |= 0x2000;
        }
        let mut h = Vec::with_capacity(hlen);
        h.push((self.version << 4) | (ihl & 0x0f));
        h.push(self.tos);
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&frag.to_be_bytes());
        h.push(self.ttl);
        h.push(self.l4.proto());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    /// The whole frame.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let ip = self.ipv4_header(l4.len());
        let mut f = ethernet_header(self.dst_mac, self.src_mac, self.ethertype);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }
}

/// An Ethernet header.
#[must_use]
pub fn ethernet_header(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// A frame of any ethertype with `payload` after the Ethernet header.
#[must_use]
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = ethernet_header(dst, src, ethertype);
    f.extend_from_slice(payload);
    f
}

/// A broadcast ARP request: who has `target`? tell `sender`.
#[must_use]
pub fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&1_u16.to_be_bytes()); // hardware: Ethernet
    a.extend_from_slice(&ETH_P_IP.to_be_bytes());
    a.extend_from_slice(&[6, 4]);
    a.extend_from_slice(&1_u16.to_be_bytes()); // request
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    ethernet([0xff; 6], sender_mac, ETH_P_ARP, &a)
}

/// An IPv6 UDP datagram (correct checksum) in an Ethernet frame.
#[must_use]
pub fn ipv6_udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = u16::try_from(UDP_HLEN + payload.len()).expect("UDP datagram too long");
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut ph = Vec::with_capacity(40);
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&u32::from(udp_len).to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, proto::UDP]);
    let c = udp_wire_checksum(!fold(sum_words(&udp, sum_words(&ph, 0))));
    udp[6..8].copy_from_slice(&c.to_be_bytes());

    let mut ip = Vec::with_capacity(40 + udp.len());
    ip.extend_from_slice(&[0x60, 0, 0, 0]);
    ip.extend_from_slice(&udp_len.to_be_bytes());
    ip.push(proto::UDP);
    ip.push(64);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&udp);
    ethernet(NODE_MAC, CLIENT_MAC, ETH_P_IPV6, &ip)
}

// ---------------------------------------------------------------------------
// Parsing and checking
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ethernet {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ethertype: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub version: u8,
    pub ihl: u8,
    pub tos: u8,
    pub total_len: u16,
    pub id: u16,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    pub frag_offset: u16,
    pub ttl: u8,
    pub proto: u8,
    pub checksum: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// The whole header as on the wire (IHL * 4 bytes, options included).
    pub header: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub data_offset: u8,
    pub flags: u8,
    pub window: u16,
    pub checksum: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub checksum: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub ty: u8,
    pub code: u8,
    pub checksum: u16,
    /// The 4 bytes after the checksum (unused in a destination unreachable).
    pub rest: [u8; 4],
    /// What follows the 8-byte header (the quote of an error message).
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4Header {
    Tcp(Tcp),
    Udp(Udp),
    Icmp(Icmp),
    Other(u8),
}

/// A parsed Ethernet + IPv4 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub eth: Ethernet,
    pub ip: Ipv4,
    pub l4: L4Header,
    /// The L4 part: from the end of the IPv4 header to its total length.
    pub segment: Vec<u8>,
    /// The L4 payload after the TCP/UDP/ICMP header.
    pub payload: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn ipv4_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Parses an Ethernet + IPv4 (+ TCP/UDP/ICMP) frame. Errors on anything
/// else, a header shorter than it claims, or a first fragment without its
/// L4 header. A non-first fragment gets `L4Header::Other`.
pub fn parse(frame: &[u8]) -> Result<Parsed, String> {
    if frame.len() < ETH_HLEN {
        return Err(format!(
            "frame of {} bytes is shorter than Ethernet",
            frame.len()
        ));
    }
    let mut eth = Ethernet {
        dst_mac: [0; 6],
        src_mac: [0; 6],
        ethertype: be16(frame, 12),
    };
    eth.dst_mac.copy_from_slice(&frame[0..6]);
    eth.src_mac.copy_from_slice(&frame[6..12]);
    if eth.ethertype != ETH_P_IP {
        return Err(format!("ethertype {:#06x} is not IPv4", eth.ethertype));
    }
    let b = &frame[ETH_HLEN..];
    if b.len() < IPV4_HLEN {
        return Err(format!("IPv4 header cut at {} bytes", b.len()));
    }
    let version = b[0] >> 4;
    let ihl = b[0] & 0x0f;
    let hlen = usize::from(ihl) * 4;
    if version != 4 || hlen < IPV4_HLEN {
        return Err(format!("bad IPv4 version {version} / IHL {ihl}"));
    }
    if b.len() < hlen {
        return Err(format!("IPv4 header of {hlen} bytes cut at {}", b.len()));
    }
    let total_len = be16(b, 2);
    let end = usize::from(total_len);
    if end < hlen || end > b.len() {
        return Err(format!(
            "IPv4 total length {total_len} outside [{hlen}, {}]",
            b.len()
        ));
    }
    let frag = be16(b, 6);
    let ip = Ipv4 {
        version,
        ihl,
        tos: b[1],
        total_len,
        id: be16(b, 4),
        dont_fragment: frag & 0x4000 != 0,
        more_fragments: frag & 0x2000 != 0,
        frag_offset: frag & 0x1fff,
        ttl: b[8],
        proto: b[9],
        checksum: be16(b, 10),
        src: ipv4_at(b, 12),
        dst: ipv4_at(b, 16),
        header: b[..hlen].to_vec(),
    };
    let seg = &b[hlen..end];
    let (l4, hdr_len) = if ip.frag_offset != 0 {
        (L4Header::Other(ip.proto), 0)
    } else {
        parse_l4(ip.proto, seg)?
    };
    Ok(Parsed {
        eth,
        ip,
        l4,
        segment: seg.to_vec(),
        payload: seg[hdr_len..].to_vec(),
    })
}

/// The L4 header of a first fragment (or unfragmented packet) and its length.
fn parse_l4(proto: u8, seg: &[u8]) -> Result<(L4Header, usize), String> {
    let need = |n: usize, what: &str| {
        if seg.len() < n {
            Err(format!("{what} header cut at {} bytes", seg.len()))
        } else {
            Ok(())
        }
    };
    let parsed = match proto {
        proto::TCP => {
            need(TCP_HLEN, "TCP")?;
            let data_offset = seg[12] >> 4;
            let tcp = Tcp {
                sport: be16(seg, 0),
                dport: be16(seg, 2),
                seq: be32(seg, 4),
                ack: be32(seg, 8),
                data_offset,
                flags: seg[13],
                window: be16(seg, 14),
                checksum: be16(seg, 16),
            };
            let off = usize::from(data_offset) * 4;
            if off < TCP_HLEN || off > seg.len() {
                return Err(format!("TCP data offset {data_offset} outside the segment"));
            }
            (L4Header::Tcp(tcp), off)
        }
        proto::UDP => {
            need(UDP_HLEN, "UDP")?;
            let udp = Udp {
                sport: be16(seg, 0),
                dport: be16(seg, 2),
                len: be16(seg, 4),
                checksum: be16(seg, 6),
            };
            (L4Header::Udp(udp), UDP_HLEN)
        }
        proto::ICMP => {
            need(ICMP_HLEN, "ICMP")?;
            let icmp = Icmp {
                ty: seg[0],
                code: seg[1],
                checksum: be16(seg, 2),
                rest: [seg[4], seg[5], seg[6], seg[7]],
                data: seg[ICMP_HLEN..].to_vec(),
            };
            (L4Header::Icmp(icmp), ICMP_HLEN)
        }
        other => (L4Header::Other(other), 0),
    };
    Ok(parsed)
}

impl Parsed {
    /// Whether the IPv4 header checksum is correct.
    #[must_use]
    pub fn ip_checksum_ok(&self) -> bool {
        checksum(&self.ip.header) == 0
    }

    /// Whether the L4 checksum is correct: TCP and UDP over the pseudo-header
    /// (UDP 0 = no checksum = valid), ICMP over the whole ICMP message.
    /// `true` for other protocols and non-first fragments (nothing to check).
    #[must_use]
    pub fn l4_checksum_ok(&self) -> bool {
        match &self.l4 {
            L4Header::Tcp(_) => {
                l4_checksum(self.ip.src, self.ip.dst, proto::TCP, &self.segment) == 0
            }
            L4Header::Udp(u) => {
                u.checksum == 0
                    || l4_checksum(self.ip.src, self.ip.dst, proto::UDP, &self.segment) == 0
            }
            L4Header::Icmp(_) => checksum(&self.segment) == 0,
            L4Header::Other(_) => true,
        }
    }

    /// Both checks, with a message saying which one failed and why.
    pub fn verify_checksums(&self) -> Result<(), String> {
        if !self.ip_checksum_ok() {
            let mut h = self.ip.header.clone();
            h[10..12].fill(0);
            return Err(format!(
                "bad IPv4 header checksum {:#06x}, expected {:#06x}",
                self.ip.checksum,
                checksum(&h)
            ));
        }
        if !self.l4_checksum_ok() {
            let (name, at) = match self.l4 {
                L4Header::Tcp(_) => ("TCP", 16),
                L4Header::Udp(_) => ("UDP", 6),
                L4Header::Icmp(_) => ("ICMP", 2),
                L4Header::Other(_) => unreachable!("other protocols always pass"),
            };
            let mut s = self.segment.clone();
            s[at..at + 2].fill(0);
            let expected = match self.l4 {
                L4Header::Icmp(_) => checksum(&s),
                _ => l4_checksum(self.ip.src, self.ip.dst, self.ip.proto, &s),
            };
            return Err(format!(
                "bad {name} checksum {:#06x}, expected {expected:#06x}",
                be16(&self.segment, at)
            ));
        }
        Ok(())
    }

    /// Source address and port (port 0 when not TCP/UDP).
    #[must_use]
    pub fn src(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip.src, self.ports().0)
    }

    /// Destination address and port (port 0 when not TCP/UDP).
    #[must_use]
    pub fn dst(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip.dst, self.ports().1)
    }

    fn ports(&self) -> (u16, u16) {
        match &self.l4 {
            L4Header::Tcp(t) => (t.sport, t.dport),
            L4Header::Udp(u) => (u.sport, u.dport),
            L4Header::Icmp(_) | L4Header::Other(_) => (0, 0),
        }
    }

    /// The L4 checksum field as on the wire (0 for other protocols).
    #[must_use]
    pub fn l4_checksum_field(&self) -> u16 {
        match &self.l4 {
            L4Header::Tcp(t) => t.checksum,
            L4Header::Udp(u) => u.checksum,
            L4Header::Icmp(i) => i.checksum,
            L4Header::Other(_) => 0,
        }
    }
}

// ---------------------------------------------------------------------------
// ICMP errors and BPF_PROG_TEST_RUN contexts (north-south packet tests)
// ---------------------------------------------------------------------------

impl FrameBuilder {
    /// An ICMP error (destination unreachable, time exceeded, ...) from `src`
    /// to `dst` whose payload is `quote`: the start of the offending IPv4
    /// packet (see [`quote_of`]). `rest` is the 4 bytes after the checksum
    /// (the next-hop MTU of a fragmentation-needed in its last two).
    #[must_use]
    pub fn icmp_error(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ty: u8,
        code: u8,
        rest: [u8; 4],
        quote: &[u8],
    ) -> Self {
        Self::new(src, dst, L4::Icmp { ty, code, rest }).with_payload(quote)
    }

    #[must_use]
    pub fn with_ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }
}

/// What an ICMP error quotes of `frame` (an Ethernet + IPv4 frame): the
/// whole IPv4 header (IHL * 4 bytes) and the first `l4_bytes` bytes after it
/// (RFC 792 asks for 8), or less when the frame is shorter.
#[must_use]
pub fn quote_of(frame: &[u8], l4_bytes: usize) -> Vec<u8> {
    let ip = &frame[ETH_HLEN..];
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    ip[..(hlen + l4_bytes).min(ip.len())].to_vec()
}

/// Size of the kernel's `struct __sk_buff` (UAPI, `include/uapi/linux/bpf.h`).
pub const SK_BUFF_LEN: usize = 192;
/// Offsets of `ingress_ifindex` and `ifindex` in `struct __sk_buff`.
const SK_BUFF_INGRESS_IFINDEX: usize = 36;
const SK_BUFF_IFINDEX: usize = 40;

/// A `struct __sk_buff` for `BPF_PROG_TEST_RUN`'s `ctx_in` that puts the
/// packet on device `ifindex` (in the calling thread's network namespace):
/// the kernel then sets `skb->dev` to it, so `ctx->ifindex` and
/// `bpf_fib_lookup` see that device. Every other field is 0, as
/// `convert___skb_to_skb` requires.
#[must_use]
pub fn skb_ctx(ifindex: u32) -> Vec<u8> {
    let mut c = vec![0u8; SK_BUFF_LEN];
    c[SK_BUFF_INGRESS_IFINDEX..SK_BUFF_INGRESS_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    c[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

/// A `struct xdp_md` for `BPF_PROG_TEST_RUN`'s `ctx_in`: no metadata
/// (`data` 0, `data_end` the frame length, as the kernel requires) and the
/// frame received on `ingress_ifindex`, queue 0 (in the calling thread's
/// network namespace).
#[must_use]
pub fn xdp_md_ctx(frame_len: usize, ingress_ifindex: u32) -> Vec<u8> {
    let data_end = u32::try_from(frame_len).expect("frame length fits in u32");
    let mut c = Vec::with_capacity(24);
    c.extend_from_slice(&0_u32.to_ne_bytes()); // data
    c.extend_from_slice(&data_end.to_ne_bytes()); // data_end
    c.extend_from_slice(&0_u32.to_ne_bytes()); // data_meta
    c.extend_from_slice(&ingress_ifindex.to_ne_bytes());
    c.extend_from_slice(&0_u32.to_ne_bytes()); // rx_queue_index
    c.extend_from_slice(&0_u32.to_ne_bytes()); // egress_ifindex
    c
}

// ---------------------------------------------------------------------------
// Reading results back
// ---------------------------------------------------------------------------

/// `b` in hex, 16 bytes a line: a frame for a failure message.
#[must_use]
pub fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, x) in b.iter().enumerate() {
        if i > 0 && i % 16 == 0 {
            s.push('\n');
        }
        let _ = write!(s, "{x:02x} ");
    }
    s
}

/// Every exit-reason counter of the per-CPU stats map of a loaded object
/// (`proxy_stats_v3`), summed over CPUs and address families, by reason
/// index.
#[must_use]
pub fn stats_by_reason(ebpf: &Ebpf) -> BTreeMap<u32, StatCounter> {
    REASONS
        .iter()
        .map(|(idx, _)| {
            let sum = FAMILIES
                .iter()
                .map(|(f, _)| stats_of_family(ebpf, *f)[idx])
                .fold(StatCounter::default(), StatCounter::plus);
            (*idx, sum)
        })
        .collect()
}

/// Every exit-reason counter of one address family
/// (`proxy_common::stats::FAMILY_*`), summed over CPUs, by reason index.
#[must_use]
pub fn stats_of_family(ebpf: &Ebpf, family: u32) -> BTreeMap<u32, StatCounter> {
    let m = PerCpuArray::<_, StatCounter>::try_from(ebpf.map(STATS_MAP).expect("stats map"))
        .expect("stats map type");
    REASONS
        .iter()
        .map(|(idx, _)| {
            let per_cpu = m
                .get(&stats_slot(family, *idx), 0)
                .unwrap_or_else(|e| panic!("read stats {family}/{idx}: {e:?}"));
            let sum = per_cpu
                .iter()
                .fold(StatCounter::default(), |a, c| a.plus(*c));
            (*idx, sum)
        })
        .collect()
}

/// The reasons with packets counted under `family`: (name, packets).
#[must_use]
pub fn nonzero_of_family(ebpf: &Ebpf, family: u32) -> Vec<(&'static str, u64)> {
    let got = stats_of_family(ebpf, family);
    REASONS
        .iter()
        .filter(|(i, _)| got[i].packets != 0)
        .map(|(i, n)| (*n, got[i].packets))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_words(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_is_padded() {
        assert_eq!(sum_words(&[0x12, 0x34, 0x56], 0), 0x1234 + 0x5600);
    }

    #[test]
    fn known_ipv4_header_checksum() {
        // A classic example header (Wikipedia, "IPv4 header checksum").
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
    }

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        let c = sa("192.0.2.2:40000");
        let v = sa("10.96.0.10:80");
        let frames = [
            FrameBuilder::tcp(c, v, tcp_flags::SYN).build(),
            FrameBuilder::tcp(c, v, tcp_flags::ACK)
                .with_payload(b"GET / HTTP/1.1\r\n\r\n")
                .build(),
            FrameBuilder::tcp(c, v, tcp_flags::SYN)
                .with_options(&[1, 1, 1, 0])
                .build(),
            FrameBuilder::udp(c, v).build(),
            FrameBuilder::udp(c, v).with_payload(b"odd").build(),
            FrameBuilder::udp(c, v)
                .with_options(&[0x94, 0x04, 0, 0, 1, 1, 1, 1])
                .build(),
            FrameBuilder::icmp_echo(*c.ip(), *v.ip()).build(),
        ];
        for f in &frames {
            let p = parse(f).unwrap();
            p.verify_checksums()
                .unwrap_or_else(|e| panic!("{e}: {f:02x?}"));
            assert_eq!(usize::from(p.ip.total_len) + ETH_HLEN, f.len());
        }
        let p = parse(&frames[2]).unwrap();
        assert_eq!(p.ip.ihl, 6);
        assert_eq!(p.src(), c);
        assert_eq!(p.dst(), v);
        assert!(matches!(
            p.l4,
            L4Header::Tcp(Tcp {
                flags: tcp_flags::SYN,
                ..
            })
        ));
    }

    #[test]
    fn udp_zero_checksum_is_zero_and_valid() {
        let f = FrameBuilder::udp(sa("192.0.2.2:40000"), sa("10.96.0.10:80"))
            .with_udp_zero_checksum()
            .build();
        let p = parse(&f).unwrap();
        assert_eq!(p.l4_checksum_field(), 0);
        p.verify_checksums().unwrap();
    }

    #[test]
    fn corruption_is_detected() {
        let f =
            FrameBuilder::tcp(sa("192.0.2.2:40000"), sa("10.96.0.10:80"), tcp_flags::SYN).build();
        let mut bad_ip = f.clone();
        bad_ip[ETH_HLEN + 16] ^= 1; // daddr without fixing checksums
        let p = parse(&bad_ip).unwrap();
        assert!(!p.ip_checksum_ok());
        assert!(!p.l4_checksum_ok(), "the pseudo-header covers the address");
        let mut bad_port = f.clone();
        bad_port[ETH_HLEN + IPV4_HLEN + 2] ^= 1;
        let p = parse(&bad_port).unwrap();
        assert!(p.ip_checksum_ok());
        assert!(p.verify_checksums().unwrap_err().contains("TCP"));
    }

    #[test]
    fn builder_knobs_land_in_the_header() {
        let b = FrameBuilder::udp(sa("192.0.2.2:1"), sa("10.96.0.10:2"));
        let f = b.clone().with_more_fragments().build();
        let p = parse(&f).unwrap();
        assert!(p.ip.more_fragments && p.ip.frag_offset == 0);
        let f = b.clone().with_frag_offset(185).build();
        let p = parse(&f).unwrap();
        assert_eq!(p.ip.frag_offset, 185);
        assert!(matches!(p.l4, L4Header::Other(proto::UDP)));
        let f = b.clone().with_ihl(3).build();
        assert_eq!(f[ETH_HLEN], 0x43);
        assert!(parse(&f).is_err());
        let f = b.with_version(6).build();
        assert_eq!(f[ETH_HLEN], 0x65);
        assert!(
            parse(&arp_request(
                CLIENT_MAC,
                Ipv4Addr::new(192, 0, 2, 2),
                Ipv4Addr::new(192, 0, 2, 1)
            ))
            .is_err()
        );
        let v6 = ipv6_udp(Ipv6Addr::LOCALHOST, 1, Ipv6Addr::LOCALHOST, 2, b"x");
        assert_eq!(v6.len(), ETH_HLEN + 40 + 9);
    }
}
