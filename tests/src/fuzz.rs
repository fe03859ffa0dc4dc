//! A packet fuzzer for the datapath's packet programs, through
//! `BPF_PROG_TEST_RUN`.
//!
//! One copy of the embedded object is loaded, a fixed set of frontends and
//! backends ([`Model::standard`]) is programmed into its maps, and packets
//! are run one at a time (`repeat: 1`) through the five packet programs:
//! `proxy_tc_ingress`, `proxy_tc_egress`, their `_l3` variants (the frame
//! with its Ethernet header stripped) and `proxy_xdp`. The cgroup socket
//! programs and the UDP iterator take no packets and are not fuzzed.
//!
//! Packets come from a corpus of valid frames built with [`crate::packet`]
//! (TCP SYN/ACK/FIN/RST and UDP to every frontend from every kind of client,
//! replies from every backend, ICMP errors quoting translated and
//! untranslated flows, ARP, IPv6, ICMP echo, other protocols), from frames
//! derived from the datapath's own outputs (the reply to a translated packet,
//! an ICMP error quoting it, the next segment of the flow: this is what
//! reaches the reverse-NAT and ICMP-translation paths), and from mutations of
//! both ([`Mutator`]: truncation at any offset, bit flips, random bytes,
//! random IPv4 total length / IHL / UDP length / TCP data offset, IP
//! options, fragment bits and offsets, random protocols and ethertypes, TTL
//! 0/1, ICMP errors quoting garbage, oversize and tiny frames, addresses and
//! ports swapped for other programmed ones). After a mutation the checksums
//! are recomputed with probability 2/3, so malformed packets with valid
//! checksums are common.
//!
//! The stream of inputs is a function of the seed and of the datapath's
//! answers; the datapath picks backends and SNAT ports with
//! `bpf_get_prandom_u32`, so a run is not bit-for-bit reproducible: a failure
//! prints the offending input and output in full, which is what matters.
//!
//! # Invariants
//!
//! Checked on every packet ([`check_packet`]):
//!
//! - **(d) test_run never fails.** The only accepted error is `EINVAL` for an
//!   input shorter than an Ethernet header (14 bytes), which the syscall
//!   rejects before running anything (`bpf_test_init`), and for TC an
//!   IPv4/IPv6 ethertype without room for its network header ([`syscall_rejects`]). Inputs are kept at
//!   most [`MAX_FRAME`] bytes, under the one-page limit of the syscall.
//! - **(a) Verdicts.** TC programs (all four): `TC_ACT_UNSPEC` (-1, "next"),
//!   `TC_ACT_OK`, `TC_ACT_SHOT`, `TC_ACT_REDIRECT`. XDP: `XDP_PASS`,
//!   `XDP_TX`, `XDP_REDIRECT` (it never drops nor aborts).
//! - **Pass-through is untouched.** `TC_ACT_UNSPEC` and `XDP_PASS` leave the
//!   frame byte for byte as it came.
//! - **(b) Translations** (`TC_ACT_OK`, `TC_ACT_REDIRECT`, `XDP_TX`,
//!   `XDP_REDIRECT` with an output as long as the input; on an `_l3` variant
//!   a redirected packet gets a 14-byte placeholder Ethernet header from
//!   `bpf_skb_change_head`, all zero but for ethertype 0x0800, stripped before
//!   comparing):
//!   - only these bytes may change: the MACs (XDP), the TTL, the IPv4
//!     checksum and addresses, the TCP/UDP ports and checksum; for an ICMP
//!     error: the outer destination, TTL and checksum, the ICMP checksum, the
//!     quoted addresses, checksum and ports; never the outer source.
//!   - the TTL is kept or decremented by one (by exactly one on XDP), never
//!     from 0 or 1.
//!   - checksums: the IPv4 header checksum, the TCP/UDP checksum (over the
//!     pseudo-header and the bytes from the L4 header to the end of the
//!     frame), the ICMP checksum and the quoted IPv4 header checksum keep
//!     their one's-complement residual: a valid checksum stays valid and an
//!     invalid one stays invalid by the same amount (incremental updates; the
//!     kernel does not fix what it did not break). `BPF_PROG_TEST_RUN` skbs
//!     are not `CHECKSUM_PARTIAL`, so these are the full checksums. A UDP
//!     checksum of 0 (none) stays 0, and a non-zero one never becomes 0. When
//!     the input parses and all its checksums are valid, the output must
//!     parse and verify ([`crate::packet::Parsed::verify_checksums`]).
//!   - addresses, TCP/UDP (`s → d` becomes `s' → d'`):
//!     - DNAT: `d` is a frontend with backends and `d'` one of *its*
//!       backends (address and port); `s' == s`, or SNAT: `s'` port in
//!       `SNAT_PORT_MIN..=SNAT_PORT_MAX` and address a node address or `s`'s
//!       own (the port-clash case of `ct::create`).
//!     - reverse NAT: `s` is a backend and `s'` a frontend that has it;
//!       `d' == d`, or (SNAT flow) `d` port in the SNAT range, address a node
//!       address or `d'`'s, and `d'` is the client the flow's REPLY entry
//!       records.
//!   - ICMP errors (type 3 or 11, quoting an IPv4 header without options and
//!     TCP/UDP ports): about a forward packet, the quoted destination goes
//!     from a backend to a frontend that has it, and with SNAT the quoted
//!     source from a node/SNAT-range source to the client, which becomes the
//!     outer destination; about a reply, the quoted source goes from a
//!     frontend to one of its backends, which becomes the outer destination,
//!     and with SNAT the quoted destination goes to a node/SNAT-range
//!     address. A `TC_ACT_OK` output must differ from its input.
//!   - XDP translates only TCP/UDP without IP options.
//! - **(b) Errors the datapath answers** (TC ingress, `TC_ACT_REDIRECT`,
//!   TCP/UDP in, ICMP out): destination unreachable, 56 bytes of IPv4 (TTL 64,
//!   valid checksums), quoting the first 28 bytes of the input's IPv4 packet,
//!   to the input's source; the MACs swapped on Ethernet. Code 3 (port
//!   unreachable) only from a frontend without backends that rejects (the
//!   input's destination); code 4 (fragmentation needed) only for an input
//!   with DF set, larger than the route's MTU, from the input's destination or
//!   (error about a reply) from a frontend address.
//! - **(c) State** ([`check_state`], every `state_check_every` packets and at
//!   the end): each conntrack table (`proxy_ct_v2`, and `proxy_ct_new_v1`
//!   when the object has it) and the affinity map hold at most their
//!   `max_entries`; every conntrack entry is TCP or UDP, direction SERVICE or REPLY,
//!   zero padding, known flags, a programmed backend id and service id of
//!   the same protocol with that backend among the frontend's; a SERVICE
//!   entry is keyed to its frontend, translates to its backend, names a slot
//!   of the frontend that holds it, and its SNAT source is in the range; a
//!   REPLY entry is keyed from its backend and restores its frontend; every
//!   affinity entry is an address client, names an affinity group of a
//!   programmed frontend and a slot of it that holds the backend.
//!
//! # IPv6
//!
//! The model programs IPv6 `ClusterIP` frontends too, the corpus has IPv6
//! frames (extension headers included) and derives replies and ICMPv6
//! errors from translated ones, and a mutator inserts extension headers
//! (chains past the bound, routing headers with segments left, later
//! fragments, headers the datapath does not walk) and lies about the
//! payload length and next header. An IPv6 frame (by the bytes the program
//! decides on) that is not passed is checked by its own rules (see the
//! IPv6 section): a packet the datapath must pass (see `walk6`) never is
//! translated; a translation changes only the addresses, the ports, the
//! L4 checksum (its residual kept over the IPv6 pseudo-header) and for
//! ICMPv6 the outer destination and the quote's addresses and ports; a
//! DNAT goes to one of the frontend's backends, a reverse NAT restores a
//! frontend that has the backend, a UDP checksum never becomes 0; the only
//! error built is a port unreachable from a frontend without backends,
//! byte for byte; the IPv6 conntrack is checked against the model. At the
//! end of a run no new flow may have found its SNAT ports exhausted.
//!
//! # Findings
//!
//! Two defects the fuzzer found, now fixed in the kernel code, keep their
//! own named checks so a regression is reported by name; like any other
//! violation they fail the run (`FUZZ_STRICT=0` only counts them, for
//! investigating an old object):
//!
//! **[`EGRESS_ICMP_NOT_V4`].** TC egress translated a frame with Ethertype
//! 0x0800, an IPv4 version other than 4 and protocol byte 1 as an ICMP
//! error (it checked the IHL, not the version).
//!
//! **[`BEYOND_TOTAL_LEN`].** The TC parser bounded its reads by the skb
//! length, not by the IPv4 total length, so a packet whose L4 header (or an
//! ICMP error whose quoted ports) lay past its total length was translated
//! from padding bytes and left with a checksum its receiver rejects.
//!
//! # The `_l3` variants under `BPF_PROG_TEST_RUN`
//!
//! The syscall always runs `eth_type_trans` over the first 14 bytes of a
//! `sched_cls` input, so for a stripped frame `skb->protocol` is read from
//! bytes 12-13 of the IPv4 header: the first two bytes of the source
//! address. The `_l3` programs decide "IPv4" by `skb->protocol`, so they see
//! a stripped packet as IPv4 only when its source starts with `8.0.`. The
//! fixture therefore has a client network (8.0.113.0/24) and a backend
//! (8.0.5.11) there; every other stripped packet exercises the "not IPv4"
//! path of the `_l3` programs.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    panic::resume_unwind,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use proxy_agent::{
    datapath::ebpf_object,
    pins::{TcHook, XDP_PROG},
};
use proxy_common::{
    affinity::{AFFINITY_CLIENT_ADDR, AFFINITY_CLIENT_ADDR6, AFFINITY_MAP, AFFINITY_MAX_ENTRIES, AffinityKey, AffinityValue},
    backend::{BACKEND_F_LOCAL, BACKEND_MAP, BACKEND6_MAP, Backend, Backend6},
    ct::{
        CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_CLOSING, CT_F_REDIRECT, CT_F_SEEN_REPLY, CT_F_SNAT, CT_MAP, CT6_MAP,
        CT6_NEW_MAP, Ct6Key, Ct6Value, CtKey, CtValue, SNAT_PORT_MAX, SNAT_PORT_MIN,
    },
    proto,
    stats::REASONS,
    svc::{
        SVC_FLAG_CLUSTER_IP, SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER,
        SVC_FLAG_NODE_PORT, SVC_FLAG_POLICY_LOCAL, SVC_FLAG_SNAT_REMOTE, SVC_FLAGS_EXTERNAL, SVC_MAP,
        SVC6_MAP, Svc6Key, SvcKey, SvcValue,
    },
};

use crate::{
    netns::{Netns, enter, require_root, unique_name},
    packet::{
        CLIENT_MAC, ETH_HLEN, ETH_P_IP, FrameBuilder, NODE_MAC, arp_request, checksum, fold, hex, icmp,
        ipv6_udp, parse, pseudo_header_sum, skb_ctx, stats_by_reason, sum_words, tcp_flags, xdp_md_ctx,
    },
    packet6::{Ext, Frame6, l4_checksum6, pseudo_header_sum6},
};

// ---------------------------------------------------------------------------
// Verdicts
// ---------------------------------------------------------------------------

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
/// `TC_ACT_UNSPEC` (-1) as `BPF_PROG_TEST_RUN` reports it.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Largest frame the fuzzer sends: under both syscall limits (one page
/// minus skb / XDP head- and tailroom: about 3.7 KiB for TC, 3.5 KiB for XDP).
pub const MAX_FRAME: usize = 3400;

/// The packet programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Prog {
    Ingress,
    Egress,
    IngressL3,
    EgressL3,
    Xdp,
}

pub const PROGS: [Prog; 5] = [Prog::Ingress, Prog::Egress, Prog::IngressL3, Prog::EgressL3, Prog::Xdp];

impl Prog {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Prog::Ingress => TcHook::Ingress.program(),
            Prog::Egress => TcHook::Egress.program(),
            Prog::IngressL3 => TcHook::Ingress.program_l3(),
            Prog::EgressL3 => TcHook::Egress.program_l3(),
            Prog::Xdp => XDP_PROG,
        }
    }

    /// Where the IPv4 header starts in this program's input.
    #[must_use]
    pub fn l3(self) -> usize {
        match self {
            Prog::IngressL3 | Prog::EgressL3 => 0,
            _ => ETH_HLEN,
        }
    }

    #[must_use]
    pub fn is_xdp(self) -> bool {
        self == Prog::Xdp
    }

    #[must_use]
    pub fn is_ingress(self) -> bool {
        matches!(self, Prog::Ingress | Prog::IngressL3)
    }

    /// The verdicts this program may return.
    #[must_use]
    pub fn allowed(self) -> &'static [u32] {
        if self.is_xdp() {
            &[XDP_PASS, XDP_TX, XDP_REDIRECT]
        } else {
            &[TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT]
        }
    }
}

#[must_use]
pub fn verdict_name(prog: Prog, v: u32) -> String {
    let s = if prog.is_xdp() {
        match v {
            XDP_ABORTED => "XDP_ABORTED",
            XDP_DROP => "XDP_DROP",
            XDP_PASS => "XDP_PASS",
            XDP_TX => "XDP_TX",
            XDP_REDIRECT => "XDP_REDIRECT",
            _ => return format!("XDP_{v}?"),
        }
    } else {
        match v {
            TC_ACT_UNSPEC => "TC_ACT_UNSPEC",
            TC_ACT_OK => "TC_ACT_OK",
            TC_ACT_SHOT => "TC_ACT_SHOT",
            TC_ACT_REDIRECT => "TC_ACT_REDIRECT",
            _ => return format!("TC_{}?", v.cast_signed()),
        }
    };
    s.to_owned()
}

// ---------------------------------------------------------------------------
// PRNG
// ---------------------------------------------------------------------------

/// `SplitMix64`: small, fast, deterministic for a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        // Slight modulo bias is irrelevant here.
        usize::try_from(self.next_u64() % (n as u64)).expect("fits")
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next_u64() % den < num
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64().to_le_bytes()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

// ---------------------------------------------------------------------------
// The model: what is programmed
// ---------------------------------------------------------------------------

const fn ip4(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::new(a[0], a[1], a[2], a[3])
}

const fn sa(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip4(a), port)
}

fn be_addr(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn from_be_addr(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

fn from_be(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(from_be_addr(addr), u16::from_be(port))
}

/// The node's devices, as the fuzzer puts packets on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dev {
    /// Uplink 192.0.2.1/24: external clients, node C.
    Ext,
    /// 172.18.0.1/24: node B.
    Int,
    /// 10.244.0.1/24: local pods.
    Lxc,
    /// A TUN device (no link-layer header): the `_l3` programs' device.
    Tun,
}

pub const NODE_EXT: Ipv4Addr = ip4([192, 0, 2, 1]);
pub const NODE_INT: Ipv4Addr = ip4([172, 18, 0, 1]);
pub const NODE_POD_GW: Ipv4Addr = ip4([10, 244, 0, 1]);
pub const ROUTER: Ipv4Addr = ip4([192, 0, 2, 254]);
pub const ROUTER_L3: Ipv4Addr = ip4([8, 0, 113, 1]);
pub const NODE_B: Ipv4Addr = ip4([172, 18, 0, 2]);

/// Clients and the device their packets arrive on.
pub const CLIENTS: [(SocketAddrV4, Dev); 7] = [
    (sa([203, 0, 113, 7], 40000), Dev::Ext),
    (sa([203, 0, 113, 8], 40000), Dev::Ext),
    (sa([8, 0, 113, 7], 40001), Dev::Ext),
    // A local pod that is also backend 1: hairpins.
    (sa([10, 244, 0, 11], 40002), Dev::Lxc),
    (sa([10, 244, 0, 50], 40003), Dev::Lxc),
    (sa([10, 244, 1, 50], 40004), Dev::Int),
    (sa([8, 0, 5, 50], 40005), Dev::Int),
];

/// A programmed backend.
#[derive(Clone, Copy, Debug)]
pub struct BackendDef {
    pub id: u32,
    pub addr: SocketAddrV4,
    pub proto: u8,
    pub local: bool,
    pub dev: Dev,
}

/// A programmed frontend.
#[derive(Clone, Debug)]
pub struct FrontendDef {
    pub name: &'static str,
    pub addr: SocketAddrV4,
    pub proto: u8,
    pub svc_id: u32,
    pub flags: u16,
    /// Backend ids, slot 1 first.
    pub backends: Vec<u32>,
    pub affinity_s: u32,
    /// The affinity group (slot 0's `backend_id`).
    pub group: u32,
}

/// Everything the fixture programs, and what the checker knows.
#[derive(Clone, Debug)]
pub struct Model {
    pub backends: BTreeMap<u32, BackendDef>,
    pub frontends: Vec<FrontendDef>,
    /// Addresses of the node: SNAT sources.
    pub node_addrs: Vec<Ipv4Addr>,
    /// The IPv6 frontends and backends (see the IPv6 section).
    pub backends6: BTreeMap<u32, Backend6Def>,
    pub frontends6: Vec<Frontend6Def>,
}

/// `(base id, address, local, device)`; TCP ids are these, UDP ids + 100.
const BACKENDS: [(u32, SocketAddrV4, bool, Dev); 8] = [
    (1, sa([10, 244, 0, 11], 8080), true, Dev::Lxc),
    (2, sa([10, 244, 0, 12], 8080), true, Dev::Lxc),
    (3, sa([10, 244, 1, 11], 8080), false, Dev::Int),
    (4, sa([10, 244, 2, 11], 8080), false, Dev::Ext),
    (5, sa([8, 0, 5, 11], 8080), false, Dev::Int),
    // Routed through a next hop without a neighbour entry.
    (6, sa([10, 244, 3, 11], 8080), false, Dev::Int),
    // No route at all.
    (7, sa([10, 99, 0, 11], 8080), false, Dev::Ext),
    // A second port of the local pod 10.244.0.11.
    (8, sa([10, 244, 0, 11], 9090), true, Dev::Lxc),
];

/// `(name, address, flags, base backend ids, affinity timeout)`.
const FRONTENDS: [(&str, SocketAddrV4, u16, &[u32], u32); 10] = [
    ("clusterip", sa([10, 96, 0, 10], 80), SVC_FLAG_CLUSTER_IP, &[1, 2, 3, 5], 0),
    ("clusterip-affinity", sa([10, 96, 0, 11], 80), SVC_FLAG_CLUSTER_IP, &[1, 3, 8], 10800),
    ("nodeport", sa([192, 0, 2, 1], 30080), SVC_FLAG_NODE_PORT | SVC_FLAG_SNAT_REMOTE, &[1, 3, 4, 6, 7], 0),
    ("nodeport-int", sa([172, 18, 0, 1], 30080), SVC_FLAG_NODE_PORT | SVC_FLAG_SNAT_REMOTE, &[1, 3, 4, 6, 7], 0),
    ("externalip", sa([198, 51, 100, 20], 80), SVC_FLAG_EXTERNAL_IP | SVC_FLAG_SNAT_REMOTE, &[2, 4, 5], 0),
    ("lb-local", sa([198, 51, 100, 30], 443), SVC_FLAG_LOAD_BALANCER | SVC_FLAG_POLICY_LOCAL, &[1, 2], 0),
    ("lb-affinity", sa([198, 51, 100, 31], 443), SVC_FLAG_LOAD_BALANCER | SVC_FLAG_SNAT_REMOTE, &[3, 4], 60),
    ("clusterip-empty", sa([10, 96, 0, 20], 80), SVC_FLAG_CLUSTER_IP, &[], 0),
    (
        "clusterip-drop",
        sa([10, 96, 0, 21], 80),
        SVC_FLAG_CLUSTER_IP | SVC_FLAG_DROP_WHEN_EMPTY | SVC_FLAG_POLICY_LOCAL,
        &[],
        0,
    ),
    ("nodeport-empty", sa([192, 0, 2, 1], 30099), SVC_FLAG_NODE_PORT | SVC_FLAG_SNAT_REMOTE, &[], 0),
];

fn in_snat_range(port: u16) -> bool {
    (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port)
}

impl Model {
    /// `ClusterIP` (with and without affinity), `NodePort` on two node
    /// addresses, externalIP, `LoadBalancer` (policy Local, and Cluster
    /// with affinity), frontends without backends (reject, drop), over TCP
    /// and UDP; local and remote backends, one behind a next hop without
    /// neighbour entry, one without route.
    #[must_use]
    pub fn standard() -> Self {
        let mut backends = BTreeMap::new();
        let mut frontends = Vec::new();
        for (pi, p) in [proto::TCP, proto::UDP].into_iter().enumerate() {
            let off = u32::try_from(pi).expect("0/1") * 100;
            for (id, addr, local, dev) in BACKENDS {
                backends.insert(id + off, BackendDef { id: id + off, addr, proto: p, local, dev });
            }
            for (i, (name, addr, flags, ids, affinity_s)) in FRONTENDS.iter().enumerate() {
                let svc_id = u32::try_from(i).expect("few") * 2 + 10 + u32::try_from(pi).expect("0/1");
                frontends.push(FrontendDef {
                    name,
                    addr: *addr,
                    proto: p,
                    svc_id,
                    flags: *flags,
                    backends: ids.iter().map(|id| id + off).collect(),
                    affinity_s: *affinity_s,
                    group: if *affinity_s == 0 { 0 } else { 5000 + svc_id },
                });
            }
        }
        let (backends6, frontends6) = standard6();
        Self { backends, frontends, node_addrs: vec![NODE_EXT, NODE_INT, NODE_POD_GW], backends6, frontends6 }
    }

    #[must_use]
    pub fn frontend(&self, a: SocketAddrV4, p: u8) -> Option<&FrontendDef> {
        self.frontends.iter().find(|f| f.addr == a && f.proto == p)
    }

    #[must_use]
    pub fn frontend_by_svc(&self, svc_id: u32) -> Option<&FrontendDef> {
        self.frontends.iter().find(|f| f.svc_id == svc_id)
    }

    /// Whether `a` (address and port) is a backend of `fe`.
    #[must_use]
    pub fn has_backend(&self, fe: &FrontendDef, a: SocketAddrV4) -> bool {
        fe.backends.iter().any(|id| self.backends[id].addr == a)
    }

    /// Frontends of protocol `p` that have backend `a`.
    pub fn frontends_with(&self, a: SocketAddrV4, p: u8) -> impl Iterator<Item = &FrontendDef> {
        self.frontends.iter().filter(move |f| f.proto == p && self.has_backend(f, a))
    }

    #[must_use]
    pub fn is_node(&self, a: Ipv4Addr) -> bool {
        self.node_addrs.contains(&a)
    }

    /// Every address:port the fixture knows (for mutations that swap them in).
    #[must_use]
    pub fn endpoints(&self) -> Vec<SocketAddrV4> {
        let mut v: BTreeSet<SocketAddrV4> = BTreeSet::new();
        v.extend(self.backends.values().map(|b| b.addr));
        v.extend(self.frontends.iter().map(|f| f.addr));
        v.extend(CLIENTS.iter().map(|c| c.0));
        v.extend(self.node_addrs.iter().map(|a| SocketAddrV4::new(*a, SNAT_PORT_MIN)));
        v.into_iter().collect()
    }
}

// ---------------------------------------------------------------------------
// Byte helpers
// ---------------------------------------------------------------------------

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// One's-complement residual of `sum` (folded; +0 and -0 are the same value).
fn residual(sum: u32) -> u16 {
    let r = fold(sum);
    if r == 0 { 0xffff } else { r }
}

/// Recomputes, where the headers allow it, the IPv4 header checksum and the
/// L4 checksum (TCP/UDP over the pseudo-header, ICMP over the message) of
/// the packet whose IPv4 header starts at `l3`. The L4 part ends at the IPv4
/// total length, or at the end of the frame when that lies.
pub fn fix_checksums(f: &mut [u8], l3: usize) {
    if f.len() >= l3 + 40 && f[l3] >> 4 == 6 {
        return fix_checksums6(f, l3);
    }
    if f.len() < l3 + 20 || f[l3] >> 4 != 4 {
        return;
    }
    let hl = usize::from(f[l3] & 0x0f) * 4;
    if hl < 20 || f.len() < l3 + hl {
        return;
    }
    f[l3 + 10..l3 + 12].fill(0);
    let c = checksum(&f[l3..l3 + hl]);
    f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    if be16(f, l3 + 6) & 0x1fff != 0 {
        return;
    }
    let tot = usize::from(be16(f, l3 + 2));
    let end = if tot >= hl && l3 + tot <= f.len() { l3 + tot } else { f.len() };
    let l4 = l3 + hl;
    let (src, dst, p) = (addr_at(f, l3 + 12), addr_at(f, l3 + 16), f[l3 + 9]);
    match p {
        proto::TCP if end >= l4 + 20 => {
            f[l4 + 16..l4 + 18].fill(0);
            let c = !fold(sum_words(&f[l4..end], pseudo_header_sum(src, dst, p, end - l4)));
            f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        }
        proto::UDP if end >= l4 + 8 => {
            if be16(f, l4 + 6) == 0 {
                return;
            }
            f[l4 + 6..l4 + 8].fill(0);
            let mut c = !fold(sum_words(&f[l4..end], pseudo_header_sum(src, dst, p, end - l4)));
            if c == 0 {
                c = 0xffff;
            }
            f[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
        }
        proto::ICMP if end >= l4 + 8 => {
            f[l4 + 2..l4 + 4].fill(0);
            let c = checksum(&f[l4..end]);
            f[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
        }
        _ => {}
    }
}

/// Recomputes the IPv4 total length (from the frame length) and checksums.
fn fix_lengths(f: &mut [u8], l3: usize) {
    if f.len() < l3 + 20 || f[l3] >> 4 != 4 {
        return;
    }
    let tot = u16::try_from(f.len() - l3).unwrap_or(u16::MAX);
    f[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
    let hl = usize::from(f[l3] & 0x0f) * 4;
    if f[l3 + 9] == proto::UDP && hl >= 20 && f.len() >= l3 + hl + 8 {
        let ul = u16::try_from(f.len() - l3 - hl).unwrap_or(u16::MAX);
        f[l3 + hl + 4..l3 + hl + 6].copy_from_slice(&ul.to_be_bytes());
    }
    fix_checksums(f, l3);
}

// ---------------------------------------------------------------------------
// The checker
// ---------------------------------------------------------------------------

/// Finding: a translation rewrote bytes past the input's IPv4 total length.
pub const BEYOND_TOTAL_LEN: &str = "rewrote bytes past the IPv4 total length";
/// Finding: TC egress translated an "ICMP" packet whose IPv4 version is not 4.
pub const EGRESS_ICMP_NOT_V4: &str = "tc egress translated an ICMP error whose IPv4 version field is not 4";

/// The conntrack lookup the checker uses to confirm a restored client.
pub type CtLookup<'a> = &'a dyn Fn(&CtKey) -> Option<CtValue>;

/// L4 residual over the pseudo-header and the bytes `l4..end` (`None` when
/// the L4 header is not there).
fn l4_residual(ip: &[u8], hl: usize, p: u8) -> u16 {
    let seg = &ip[hl..];
    let (src, dst) = (addr_at(ip, 12), addr_at(ip, 16));
    if p == proto::ICMP {
        residual(sum_words(seg, 0))
    } else {
        residual(sum_words(seg, pseudo_header_sum(src, dst, p, seg.len().min(0xffff))))
    }
}

/// Checks one run. `input` and `output` are as the program saw and left
/// them (for the `_l3` variants: from the IPv4 header on, but for the
/// placeholder Ethernet header a redirect adds). Returns what is wrong.
///
/// `Ok(Some(finding))`: a known datapath defect, tolerated and counted (see
/// "Findings" in the module documentation): [`BEYOND_TOTAL_LEN`] or
/// [`EGRESS_ICMP_NOT_V4`].
pub fn check_packet(model: &Model, prog: Prog, input: &[u8], verdict: u32, output: &[u8], ct: CtLookup<'_>) -> Result<Option<&'static str>, String> {
    check_packet_with(model, prog, input, verdict, output, ct, &|_| None)
}

/// [`check_packet`] with the IPv6 conntrack too (to confirm a client
/// restored on an IPv6 reply).
pub fn check_packet_with(model: &Model, prog: Prog, input: &[u8], verdict: u32, output: &[u8], ct: CtLookup<'_>, ct6: Ct6Lookup<'_>) -> Result<Option<&'static str>, String> {
    if !prog.allowed().contains(&verdict) {
        return Err(format!("verdict {} is not one {} may return", verdict_name(prog, verdict), prog.name()));
    }
    let pass = if prog.is_xdp() { verdict == XDP_PASS } else { verdict == TC_ACT_UNSPEC };
    if pass {
        if input != output {
            return Err("pass-through verdict, but the packet was modified".into());
        }
        return Ok(None);
    }
    if !prog.is_xdp() && verdict == TC_ACT_SHOT {
        return Ok(None);
    }
    // What the TC programs take for IPv6: the Ethertype, or for the `_l3`
    // variants `skb->protocol`, which `BPF_PROG_TEST_RUN` reads from the
    // same two bytes. XDP translates IPv4 only (checked below).
    if !prog.is_xdp() && input.len() >= ETH_HLEN && be16(input, 12) == 0x86dd {
        return check_forwarded6(model, prog, input, verdict, output, ct6).map(|()| None);
    }
    check_forwarded(model, prog, input, verdict, output, ct)
}

fn check_forwarded(model: &Model, prog: Prog, input: &[u8], verdict: u32, output: &[u8], ct: CtLookup<'_>) -> Result<Option<&'static str>, String> {
    let l3 = prog.l3();
    let mut out = output;
    if l3 == 0 && verdict == TC_ACT_REDIRECT && output.len() == input.len() + ETH_HLEN && output.first() == Some(&0) {
        if output[..12].iter().any(|b| *b != 0) || output[12..14] != [0x08, 0x00] {
            return Err("the placeholder Ethernet header of an L3 redirect is not zeros + 0x0800".into());
        }
        out = &output[ETH_HLEN..];
    }
    if !prog.is_ingress() && !prog.is_xdp() && input.len() > l3 + 9 && input[l3] >> 4 != 4 && input[l3] & 0x0f >= 5 && input[l3 + 9] == proto::ICMP {
        return Ok(Some(EGRESS_ICMP_NOT_V4));
    }
    if input.len() < l3 + 20 || input[l3] >> 4 != 4 || input[l3] & 0x0f < 5 {
        return Err("a non-IPv4 packet was forwarded (not passed)".into());
    }
    if l3 == ETH_HLEN && be16(input, 12) != ETH_P_IP {
        return Err("a non-IPv4 frame was forwarded (not passed)".into());
    }
    let a = &input[l3..];
    let in_proto = a[9];
    if !prog.is_xdp() && prog.is_ingress() && verdict == TC_ACT_REDIRECT && out.len() > l3 + 9 && out[l3 + 9] == proto::ICMP && in_proto != proto::ICMP {
        return check_generated_error(model, prog, input, out).map(|()| None);
    }
    if out.len() != input.len() {
        return Err(format!("translated packet changed length {} -> {}", input.len(), out.len()));
    }
    let b = &out[l3..];
    if l3 == ETH_HLEN && !prog.is_xdp() && input[..ETH_HLEN] != out[..ETH_HLEN] {
        return Err("TC changed the Ethernet header".into());
    }
    check_translation(model, prog, a, b, ct)?;
    let tot = usize::from(be16(a, 2));
    if (tot..a.len()).any(|i| a[i] != b[i]) {
        return Ok(Some(BEYOND_TOTAL_LEN));
    }
    // Whole-packet view: a fully valid input gives a fully valid output.
    let eth = |ip: &[u8]| {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        f.extend_from_slice(ip);
        f
    };
    if let Ok(pin) = parse(&eth(a))
        && pin.verify_checksums().is_ok()
    {
        let pout = parse(&eth(b)).map_err(|e| format!("a valid input became unparsable: {e}"))?;
        pout.verify_checksums().map_err(|e| format!("valid input, invalid output: {e}"))?;
    }
    Ok(None)
}

/// The reject / fragmentation-needed the datapath builds in place.
fn check_generated_error(model: &Model, prog: Prog, input: &[u8], out: &[u8]) -> Result<(), String> {
    let l3 = prog.l3();
    let a = &input[l3..];
    if out.len() != l3 + 56 {
        return Err(format!("generated ICMP error of {} bytes, expected {}", out.len(), l3 + 56));
    }
    let b = &out[l3..];
    if b[0] != 0x45 || be16(b, 2) != 56 || b[8] != 64 || b[9] != proto::ICMP {
        return Err("generated ICMP error: bad IPv4 header".into());
    }
    if checksum(&b[..20]) != 0 {
        return Err("generated ICMP error: bad IPv4 checksum".into());
    }
    if checksum(&b[20..]) != 0 {
        return Err("generated ICMP error: bad ICMP checksum".into());
    }
    if b[20] != icmp::DEST_UNREACH {
        return Err(format!("generated ICMP error of type {}", b[20]));
    }
    if a.len() < 28 || b[28..56] != a[..28] {
        return Err("generated ICMP error does not quote the input's first 28 bytes".into());
    }
    if a[0] != 0x45 {
        return Err("generated ICMP error for a packet with IP options".into());
    }
    if addr_at(b, 16) != addr_at(a, 12) {
        return Err("generated ICMP error is not addressed to the sender".into());
    }
    let (src, in_dst) = (addr_at(b, 12), SocketAddrV4::new(addr_at(a, 16), be16(a, 22)));
    let p = a[9];
    match b[21] {
        icmp::PORT_UNREACH => {
            let fe = model.frontend(in_dst, p).ok_or_else(|| format!("reject for {in_dst}, not a frontend"))?;
            if !fe.backends.is_empty() || fe.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0 {
                return Err(format!("reject for frontend {} ({}), which has backends or drops", fe.name, fe.addr));
            }
            if src != *in_dst.ip() {
                return Err("reject not sent from the frontend".into());
            }
        }
        icmp::FRAG_NEEDED => {
            if be16(a, 6) & 0x4000 == 0 {
                return Err("fragmentation needed for a packet without DF".into());
            }
            if src != *in_dst.ip() && !model.frontends.iter().any(|f| *f.addr.ip() == src) {
                return Err(format!("fragmentation needed from {src}: neither the destination nor a frontend"));
            }
            let mtu = usize::from(be16(b, 26));
            if mtu == 0 || a.len() <= mtu {
                return Err(format!("fragmentation needed with MTU {mtu} for a {}-byte packet", a.len()));
            }
        }
        c => return Err(format!("generated destination unreachable with code {c}")),
    }
    if l3 == ETH_HLEN && (out[0..6] != input[6..12] || out[6..12] != input[0..6] || be16(out, 12) != ETH_P_IP) {
        return Err("generated ICMP error: MACs not swapped".into());
    }
    Ok(())
}

/// Bytes (offsets in the IPv4 packet) a translation may change.
fn may_change(p: u8, hl: usize) -> Vec<std::ops::Range<usize>> {
    let mut r = vec![8..9, 10..12, 12..20];
    match p {
        proto::TCP => r.extend([hl..hl + 4, hl + 16..hl + 18]),
        proto::UDP => r.extend([hl..hl + 4, hl + 6..hl + 8]),
        _ => {
            // ICMP: the outer source is fixed; checked below.
            let inner = hl + 8;
            r.extend([hl + 2..hl + 4, inner + 10..inner + 12, inner + 12..inner + 20, inner + 20..inner + 24]);
        }
    }
    r
}

/// A later IPv4 fragment (offset > 0) has no L4 header: a translation may
/// change only the addresses, the TTL and the header checksum (whose
/// residual it keeps), never a byte of the payload; the new destination is
/// a backend's address or the old one, the new source a frontend's or a
/// node address or the old one (the ports live in the first fragment).
fn check_later_fragment(model: &Model, prog: Prog, a: &[u8], b: &[u8], hl: usize) -> Result<(), String> {
    if prog.is_xdp() {
        return Err("XDP translated a later fragment".into());
    }
    if hl > a.len() {
        return Err(format!("translated a later fragment whose {hl}-byte IPv4 header is cut short ({} bytes)", a.len()));
    }
    let allowed = [8..9, 10..12, 12..20];
    if let Some(i) = (0..a.len()).find(|i| a[*i] != b[*i] && !allowed.iter().any(|r| r.contains(i))) {
        return Err(format!("byte {i} of a later fragment changed ({:#04x} -> {:#04x}): only addresses, TTL, checksum may", a[i], b[i]));
    }
    if residual(sum_words(&a[..hl], 0)) != residual(sum_words(&b[..hl], 0)) {
        return Err("later fragment: IPv4 header checksum residual changed".into());
    }
    let (s, d, s2, d2) = (addr_at(a, 12), addr_at(a, 16), addr_at(b, 12), addr_at(b, 16));
    let backend = |x: Ipv4Addr| model.backends.values().any(|be| *be.addr.ip() == x);
    let frontend = |x: Ipv4Addr| model.frontends.iter().any(|f| *f.addr.ip() == x);
    // DNAT: to a backend; reverse NAT: the source becomes a frontend and,
    // when the flow was source-NATed, the destination (a node address)
    // becomes the client.
    let reverse = s2 != s && frontend(s2);
    if d2 != d && !backend(d2) && !(reverse && model.is_node(d)) {
        return Err(format!("later fragment to {d} readdressed to {d2}: not a backend, nor a client restored on a reply"));
    }
    if s2 != s && !frontend(s2) && !model.is_node(s2) {
        return Err(format!("later fragment from {s} readdressed from {s2}: not a frontend or node address"));
    }
    Ok(())
}

fn check_translation(model: &Model, prog: Prog, a: &[u8], b: &[u8], ct: CtLookup<'_>) -> Result<(), String> {
    let hl = usize::from(a[0] & 0x0f) * 4;
    let p = a[9];
    if b[0] != a[0] || b[9] != p {
        return Err("translation changed the IPv4 version/IHL or protocol".into());
    }
    if !matches!(p, proto::TCP | proto::UDP | proto::ICMP) {
        return Err(format!("translated a packet of protocol {p}"));
    }
    if prog.is_xdp() && (p == proto::ICMP || hl != 20) {
        return Err("XDP translated an ICMP packet or one with IP options".into());
    }
    if be16(a, 6) & 0x1fff != 0 {
        return check_later_fragment(model, prog, a, b, hl);
    }
    let allowed = may_change(p, hl);
    if let Some(i) = (0..a.len()).find(|i| a[*i] != b[*i] && !allowed.iter().any(|r| r.contains(i))) {
        return Err(format!("byte {i} of the IPv4 packet changed ({:#04x} -> {:#04x}), not an address/port/checksum/TTL", a[i], b[i]));
    }
    if a == b {
        return Err("forwarding verdict without any translation".into());
    }
    // TTL.
    let (t0, t1) = (a[8], b[8]);
    if prog.is_xdp() && !(t0 >= 2 && t1 == t0 - 1) {
        return Err(format!("XDP TTL {t0} -> {t1}"));
    }
    if t1 != t0 && !(t0 >= 2 && t1 == t0 - 1) {
        return Err(format!("TTL {t0} -> {t1}"));
    }
    // Checksums keep their residual.
    if residual(sum_words(&a[..hl], 0)) != residual(sum_words(&b[..hl], 0)) {
        let mut h = b[..hl].to_vec();
        h[10..12].fill(0);
        return Err(format!(
            "IPv4 header checksum residual changed: in {:#06x}, out {:#06x} (field {:#06x}, correct {:#06x})",
            residual(sum_words(&a[..hl], 0)),
            residual(sum_words(&b[..hl], 0)),
            be16(b, 10),
            checksum(&h)
        ));
    }
    if p == proto::UDP && be16(a, hl + 6) == 0 {
        if be16(b, hl + 6) != 0 {
            return Err("UDP without checksum got one".into());
        }
    } else {
        if p == proto::UDP && be16(b, hl + 6) == 0 {
            return Err("UDP checksum became 0 (none)".into());
        }
        let (ra, rb) = (l4_residual(a, hl, p), l4_residual(b, hl, p));
        if ra != rb {
            return Err(format!("{} checksum residual changed: in {ra:#06x}, out {rb:#06x}", proto_name(p)));
        }
    }
    if p == proto::ICMP {
        return check_icmp_translation(model, a, b, hl);
    }
    let s = SocketAddrV4::new(addr_at(a, 12), be16(a, hl));
    let d = SocketAddrV4::new(addr_at(a, 16), be16(a, hl + 2));
    let s2 = SocketAddrV4::new(addr_at(b, 12), be16(b, hl));
    let d2 = SocketAddrV4::new(addr_at(b, 16), be16(b, hl + 2));
    if d != d2 && model.frontend(d, p).is_some() {
        let fe = model.frontend(d, p).expect("checked");
        if !model.has_backend(fe, d2) {
            return Err(format!("DNAT of {d} (frontend {}) to {d2}, not one of its backends", fe.name));
        }
        if s != s2 && !(in_snat_range(s2.port()) && (model.is_node(*s2.ip()) || s2.ip() == s.ip())) {
            return Err(format!("DNAT with SNAT of {s} to {s2}: not a node address (or the client's) with a port in the SNAT range"));
        }
        return Ok(());
    }
    // Reverse NAT: s is a backend, s2 a frontend that has it.
    if s == s2 {
        return Err(format!("translation {s} -> {d} into {s2} -> {d2}: the destination {d} is not a frontend and the source was kept"));
    }
    if !model.frontends_with(s, p).any(|f| f.addr == s2) {
        return Err(format!("reverse NAT of {s} to {s2}: not a frontend that has backend {s}"));
    }
    if d != d2 {
        if !in_snat_range(d.port()) || !(model.is_node(*d.ip()) || d.ip() == d2.ip()) {
            return Err(format!("reverse NAT restored {d} to {d2}, but {d} is not an SNAT source"));
        }
        let key = CtKey { saddr_be: be_addr(*s.ip()), daddr_be: be_addr(*d.ip()), sport_be: s.port().to_be(), dport_be: d.port().to_be(), proto: p, dir: CT_DIR_REPLY, _pad: [0; 2] };
        match ct(&key) {
            Some(e) if e.flags & CT_F_SNAT != 0 && from_be(e.snat_addr_be, e.snat_port_be) == d2 && from_be(e.nat_addr_be, e.nat_port_be) == s2 => {}
            Some(e) => return Err(format!("reverse NAT to {s2} -> {d2} disagrees with the REPLY entry {e:?}")),
            None => return Err(format!("reverse NAT restored the client {d2} without a REPLY entry")),
        }
    }
    Ok(())
}

fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::ICMP => "ICMP",
        _ => "L4",
    }
}

fn check_icmp_translation(model: &Model, a: &[u8], b: &[u8], hl: usize) -> Result<(), String> {
    let inner = hl + 8;
    if a.len() < inner + 24 {
        return Err("ICMP translated with a quote shorter than IPv4 header + ports".into());
    }
    if !matches!(a[hl], icmp::DEST_UNREACH | icmp::TIME_EXCEEDED) || a[inner] != 0x45 {
        return Err("translated an ICMP message that is not an error quoting an IPv4 header without options".into());
    }
    let ip = a[inner + 9];
    if !matches!(ip, proto::TCP | proto::UDP) {
        return Err("translated an ICMP error quoting neither TCP nor UDP".into());
    }
    let q = |x: &[u8], at: usize, port: usize| SocketAddrV4::new(addr_at(x, inner + at), be16(x, inner + 20 + port));
    let (qs, qd, qs2, qd2) = (q(a, 12, 0), q(a, 16, 2), q(b, 12, 0), q(b, 16, 2));
    let (od, od2) = (addr_at(a, 16), addr_at(b, 16));
    if residual(sum_words(&a[inner..inner + 20], 0)) != residual(sum_words(&b[inner..inner + 20], 0)) {
        return Err("quoted IPv4 header checksum residual changed".into());
    }
    let about_reply = qs != qs2 && model.frontend(qs, ip).is_some_and(|f| model.has_backend(f, qs2));
    if about_reply {
        if od2 != *qs2.ip() {
            return Err(format!("ICMP error about a reply readdressed to {od2}, not to the backend {qs2}"));
        }
        if qd != qd2 && !(in_snat_range(qd2.port()) && (model.is_node(*qd2.ip()) || qd2.ip() == qd.ip())) {
            return Err(format!("ICMP error about a reply: quoted destination {qd} -> {qd2} is not an SNAT source"));
        }
        return Ok(());
    }
    if qd == qd2 {
        return Err(format!("ICMP error translated, but neither quoted frontend nor backend: {qs} -> {qd} became {qs2} -> {qd2}"));
    }
    if !model.frontends_with(qd, ip).any(|f| f.addr == qd2) {
        return Err(format!("ICMP error: quoted destination {qd} -> {qd2}, not a backend restored to a frontend that has it"));
    }
    if qs == qs2 {
        // Unchanged, or an SNAT flow whose SNAT source is the client's own
        // address and port (a node-address client whose port lies in the
        // SNAT range): the error then goes to that address.
        if od != od2 && od2 != *qs2.ip() {
            return Err("ICMP error readdressed without an SNAT flow".into());
        }
    } else {
        if !in_snat_range(qs.port()) || !(model.is_node(*qs.ip()) || qs.ip() == qs2.ip()) {
            return Err(format!("ICMP error: quoted source {qs} restored to {qs2}, but {qs} is not an SNAT source"));
        }
        if od2 != *qs2.ip() {
            return Err(format!("ICMP error of an SNAT flow sent to {od2}, not to the client {qs2}"));
        }
    }
    Ok(())
}

/// Checks the conntrack and affinity maps against the model.
///
/// `ct`: every conntrack table of the object (`proxy_ct_v2`, and the
/// unconfirmed table when the object has one) with its entries and its
/// `max_entries`; `aff`: the affinity map's entries and its bound.
pub fn check_state(model: &Model, ct: &[(&str, u32, Vec<(CtKey, CtValue)>)], aff: &[(AffinityKey, AffinityValue)], aff_max: u32) -> Result<(), String> {
    for (name, max, entries) in ct {
        if entries.len() > *max as usize {
            return Err(format!("{name}: {} entries, more than its {max}", entries.len()));
        }
        for (k, v) in entries {
            check_ct_entry(model, k, v).map_err(|e| format!("{name} entry {k:?} => {v:?}: {e}"))?;
        }
    }
    if aff.len() > aff_max as usize {
        return Err(format!("{} affinity entries, more than {aff_max}", aff.len()));
    }
    for (k, v) in aff {
        check_affinity_entry(model, k, v).map_err(|e| format!("affinity entry {k:?} => {v:?}: {e}"))?;
    }
    Ok(())
}

fn slot_holds(fe: &FrontendDef, slot: u16, id: u32) -> bool {
    slot >= 1 && fe.backends.get(usize::from(slot) - 1) == Some(&id)
}

fn check_ct_entry(model: &Model, k: &CtKey, v: &CtValue) -> Result<(), String> {
    if k._pad != [0; 2] || v._pad != 0 {
        return Err("non-zero padding".into());
    }
    if !matches!(k.proto, proto::TCP | proto::UDP) {
        return Err("protocol neither TCP nor UDP".into());
    }
    if v.flags & !(CT_F_SNAT | CT_F_REDIRECT | CT_F_CLOSING | CT_F_SEEN_REPLY) != 0 {
        return Err("unknown flags".into());
    }
    let be = model.backends.get(&v.backend_id).ok_or("backend id not programmed")?;
    let fe = model.frontend_by_svc(v.svc_id).ok_or("service id not programmed")?;
    if be.proto != k.proto || fe.proto != k.proto {
        return Err("backend or frontend of another protocol".into());
    }
    if !fe.backends.contains(&v.backend_id) {
        return Err(format!("backend {} is not one of frontend {}'s", v.backend_id, fe.name));
    }
    let snat = v.flags & CT_F_SNAT != 0;
    let external = fe.flags & SVC_FLAGS_EXTERNAL != 0;
    let nat = from_be(v.nat_addr_be, v.nat_port_be);
    let ks = from_be(k.saddr_be, k.sport_be);
    let kd = from_be(k.daddr_be, k.dport_be);
    let sn = from_be(v.snat_addr_be, v.snat_port_be);
    if !snat && (v.snat_addr_be != 0 || v.snat_port_be != 0) {
        return Err("SNAT fields set without CT_F_SNAT".into());
    }
    if external && v.flags & CT_F_REDIRECT == 0 {
        return Err("flow of an external frontend without CT_F_REDIRECT".into());
    }
    if !external && !snat && v.flags & CT_F_REDIRECT != 0 {
        return Err("CT_F_REDIRECT on a ClusterIP flow without SNAT".into());
    }
    match k.dir {
        CT_DIR_SERVICE => {
            if kd != fe.addr {
                return Err(format!("SERVICE entry keyed to {kd}, not its frontend {}", fe.addr));
            }
            if nat != be.addr {
                return Err(format!("SERVICE entry translates to {nat}, not its backend {}", be.addr));
            }
            if !slot_holds(fe, v.slot, v.backend_id) {
                return Err(format!("slot {} does not hold backend {}", v.slot, v.backend_id));
            }
            if snat && !(in_snat_range(sn.port()) && (model.is_node(*sn.ip()) || sn.ip() == ks.ip())) {
                return Err(format!("SNAT source {sn} is not a node address (or the client's) with a port in range"));
            }
        }
        CT_DIR_REPLY => {
            if ks != be.addr {
                return Err(format!("REPLY entry keyed from {ks}, not its backend {}", be.addr));
            }
            if nat != fe.addr {
                return Err(format!("REPLY entry restores {nat}, not its frontend {}", fe.addr));
            }
            if v.slot != 0 {
                return Err("REPLY entry with a slot".into());
            }
            if snat && !(in_snat_range(kd.port()) && (model.is_node(*kd.ip()) || kd.ip() == sn.ip())) {
                return Err(format!("SNAT REPLY entry keyed to {kd}: not an SNAT source"));
            }
        }
        d => return Err(format!("direction {d}")),
    }
    Ok(())
}

fn check_affinity_entry(model: &Model, k: &AffinityKey, v: &AffinityValue) -> Result<(), String> {
    if k._pad != [0; 3] || v._pad != [0; 2] {
        return Err("non-zero padding".into());
    }
    if k.client_kind == AFFINITY_CLIENT_ADDR6 {
        // A hash of an IPv6 client: only its group and slot can be checked.
        let fe = model.frontends6.iter().find(|f| f.affinity_s != 0 && f.group == k.group).ok_or("IPv6 client in a group of no IPv6 affinity frontend")?;
        if !(v.slot >= 1 && fe.backends.get(usize::from(v.slot) - 1) == Some(&v.backend_id)) {
            return Err(format!("slot {} of {} does not hold backend {}", v.slot, fe.name, v.backend_id));
        }
        return Ok(());
    }
    if k.client_kind != AFFINITY_CLIENT_ADDR || k.client >> 32 != 0 {
        return Err("client is not an IPv4 address".into());
    }
    let fe = model.frontends.iter().find(|f| f.affinity_s != 0 && f.group == k.group).ok_or("group of no affinity frontend")?;
    if !slot_holds(fe, v.slot, v.backend_id) {
        return Err(format!("slot {} of {} does not hold backend {}", v.slot, fe.name, v.backend_id));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The node (a network namespace per run) and the loaded datapath
// ---------------------------------------------------------------------------

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).expect("device name");
    // SAFETY: a valid C string; the call only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(i != 0, "no device {name} in this namespace");
    i
}

/// The node of `tests/tests/packet_northsouth.rs`, plus the 8.0.0.0/16
/// networks the `_l3` variants can see and a TUN device.
fn build_node(ns: &Netns) -> bool {
    for (dev, peer, m, addr) in [
        ("ext0", "ext0p", NODE_MAC, "192.0.2.1/24"),
        ("int0", "int0p", [0x02, 0, 0, 0, 0x01, 0x01], "172.18.0.1/24"),
        ("lxc0", "lxc0p", [0x02, 0, 0, 0, 0x02, 0x01], "10.244.0.1/24"),
    ] {
        ns.ip(&["link", "add", dev, "address", &mac(m), "type", "veth", "peer", "name", peer]);
        ns.ip(&["addr", "add", addr, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
        ns.ip(&["link", "set", peer, "up"]);
    }
    for (net, via, dev) in [
        ("203.0.113.0/24", "192.0.2.254", "ext0"),
        ("8.0.113.0/24", "192.0.2.254", "ext0"),
        ("10.244.1.0/24", "172.18.0.2", "int0"),
        ("8.0.5.0/24", "172.18.0.2", "int0"),
        ("10.244.2.0/24", "192.0.2.3", "ext0"),
        ("10.244.3.0/24", "172.18.0.9", "int0"),
    ] {
        ns.ip(&["route", "add", net, "via", via, "dev", dev]);
    }
    for (addr, m, dev) in [
        ("192.0.2.254", CLIENT_MAC, "ext0"),
        ("192.0.2.3", [0x02, 0, 0, 0, 0x00, 0x03], "ext0"),
        ("172.18.0.2", [0x02, 0, 0, 0, 0x01, 0x02], "int0"),
        ("10.244.0.11", [0x02, 0, 0, 0, 0x02, 0x02], "lxc0"),
        ("10.244.0.12", [0x02, 0, 0, 0, 0x02, 0x03], "lxc0"),
        ("10.244.0.50", [0x02, 0, 0, 0, 0x02, 0x04], "lxc0"),
    ] {
        ns.ip(&["neigh", "replace", addr, "lladdr", &mac(m), "dev", dev, "nud", "permanent"]);
    }
    ns.sysctl("net.ipv4.ip_forward", "1");
    // A TUN device for the `_l3` programs; without /dev/net/tun they run on ext0.
    let tun = std::process::Command::new("ip")
        .args(["-n", ns.name(), "tuntap", "add", "tun0", "mode", "tun"])
        .output()
        .is_ok_and(|o| o.status.success());
    if tun {
        ns.ip(&["link", "set", "tun0", "up"]);
    }
    tun
}

/// Device indexes in the node's namespace.
#[derive(Clone, Copy, Debug)]
struct Links {
    ext0: u32,
    int0: u32,
    lxc0: u32,
    tun0: u32,
}

impl Links {
    fn of(self, d: Dev) -> u32 {
        match d {
            Dev::Ext => self.ext0,
            Dev::Int => self.int0,
            Dev::Lxc => self.lxc0,
            Dev::Tun => self.tun0,
        }
    }
}

/// Builds the node in a new namespace and runs `f` on a thread inside it;
/// the namespace is deleted afterwards, also when `f` panics.
fn on_node<T: Send>(f: impl FnOnce(Links) -> T + Send) -> T {
    require_root();
    let ns = Netns::create(&unique_name("fz"));
    let tun = build_node(&ns);
    let path = ns.path();
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            enter(&path);
            let ext0 = ifindex("ext0");
            let links = Links { ext0, int0: ifindex("int0"), lxc0: ifindex("lxc0"), tun0: if tun { ifindex("tun0") } else { ext0 } };
            f(links)
        })
        .join()
    });
    drop(ns);
    r.unwrap_or_else(|p| resume_unwind(p))
}

/// Loads the object (the five packet programs) and programs `model`.
fn load(model: &Model) -> Ebpf {
    let mut ebpf = Ebpf::load(ebpf_object()).unwrap_or_else(|e| panic!("loading the embedded eBPF object: {e:?}"));
    for prog in PROGS {
        let name = prog.name();
        if prog.is_xdp() {
            let p: &mut Xdp = ebpf.program_mut(name).unwrap_or_else(|| panic!("no program {name}")).try_into().expect("xdp");
            p.load().unwrap_or_else(|e| panic!("loading {name}: {e:?}"));
        } else {
            let p: &mut SchedClassifier =
                ebpf.program_mut(name).unwrap_or_else(|| panic!("no program {name}")).try_into().expect("sched_cls");
            p.load().unwrap_or_else(|e| panic!("loading {name}: {e:?}"));
        }
    }
    {
        // The devices XDP may redirect to, as the agent fills it (called on
        // the node's own thread: these are the node's devices).
        let mut ports = aya::maps::DevMapHash::try_from(ebpf.map_mut(proxy_agent::pins::XDP_TX_MAP).expect("xdp tx map")).expect("devmap type");
        for d in proxy_agent::datapath::list_devices().expect("devices") {
            ports.insert(d.index, d.index, None, 0).unwrap_or_else(|e| panic!("devmap insert {}: {e:?}", d.name));
        }
    }
    {
        let mut m = HashMap::<_, u32, Backend>::try_from(ebpf.map_mut(BACKEND_MAP).expect("backend map")).expect("backend map type");
        for b in model.backends.values() {
            let v = Backend {
                addr_be: be_addr(*b.addr.ip()),
                port_be: b.addr.port().to_be(),
                proto: b.proto,
                flags: if b.local { BACKEND_F_LOCAL } else { 0 },
            };
            m.insert(b.id, v, 0).unwrap_or_else(|e| panic!("insert backend {b:?}: {e:?}"));
        }
    }
    let mut m = HashMap::<_, SvcKey, SvcValue>::try_from(ebpf.map_mut(SVC_MAP).expect("svc map")).expect("svc map type");
    for fe in &model.frontends {
        let key = |slot: u16| SvcKey {
            addr_be: be_addr(*fe.addr.ip()),
            port_be: fe.addr.port().to_be(),
            backend_slot: slot,
            proto: fe.proto,
            scope: 0,
            _pad: [0; 2],
        };
        for (slot, id) in (1..).zip(&fe.backends) {
            m.insert(key(slot), SvcValue { backend_id: *id, ..Default::default() }, 0).expect("insert slot");
        }
        let head = SvcValue {
            backend_id: fe.group,
            count: u16::try_from(fe.backends.len()).expect("count"),
            flags: fe.flags,
            svc_id: fe.svc_id,
            affinity_timeout_s: fe.affinity_s,
        };
        m.insert(key(0), head, 0).unwrap_or_else(|e| panic!("insert frontend {}: {e:?}", fe.name));
    }
    load6(model, &mut ebpf);
    ebpf
}

/// The conntrack tables: `proxy_ct_v2`, and the unconfirmed flows' table
/// when the object has one.
pub const CT_TABLES: [&str; 2] = [CT_MAP, "proxy_ct_new_v1"];

/// `max_entries` of a loaded hash map.
fn map_max(ebpf: &Ebpf, name: &str) -> Option<u32> {
    match ebpf.map(name)? {
        Map::HashMap(d) | Map::LruHashMap(d) => d.info().ok().map(|i| i.max_entries()),
        _ => None,
    }
}

fn ct_entries(ebpf: &Ebpf) -> Vec<(&'static str, u32, Vec<(CtKey, CtValue)>)> {
    CT_TABLES
        .iter()
        .filter_map(|name| {
            let m: HashMap<&MapData, CtKey, CtValue> = HashMap::try_from(ebpf.map(name)?).expect("ct map type");
            let max = map_max(ebpf, name).expect("ct map info");
            // An LRU entry may vanish between get_next_key and lookup: skip those.
            Some((*name, max, m.iter().filter_map(Result::ok).collect()))
        })
        .collect()
}

fn affinity_entries(ebpf: &Ebpf) -> Vec<(AffinityKey, AffinityValue)> {
    let m: HashMap<&MapData, AffinityKey, AffinityValue> =
        HashMap::try_from(ebpf.map(AFFINITY_MAP).expect("affinity map")).expect("affinity map type");
    m.iter().filter_map(Result::ok).collect()
}

// ---------------------------------------------------------------------------
// Corpus and mutators
// ---------------------------------------------------------------------------

/// A frame (always with its Ethernet header) and where it belongs.
#[derive(Clone, Debug)]
pub struct Seed {
    pub frame: Vec<u8>,
    pub prog: Prog,
    pub dev: Dev,
}

fn seed(frame: Vec<u8>, prog: Prog, dev: Dev) -> Seed {
    Seed { frame, prog, dev }
}

fn tcp_udp(p: u8, src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> FrameBuilder {
    if p == proto::TCP {
        let b = FrameBuilder::tcp(src, dst, flags).with_tcp_seq(1000, if flags & tcp_flags::ACK != 0 { 5001 } else { 0 });
        if flags & tcp_flags::PSH != 0 { b.with_payload(b"GET / HTTP/1.1\r\n\r\n") } else { b }
    } else {
        FrameBuilder::udp(src, dst)
    }
}

/// An ICMP error from `from` to `to` quoting `quoted` (an Ethernet frame) with
/// `l4` bytes of its L4 header.
fn icmp_error_quoting(from: Ipv4Addr, to: Ipv4Addr, ty: u8, code: u8, quoted: &[u8], l4: usize) -> Vec<u8> {
    let q = crate::packet::quote_of(quoted, l4);
    let rest = if code == icmp::FRAG_NEEDED { [0, 0, 0x05, 0xdc] } else { [0; 4] };
    FrameBuilder::icmp_error(from, to, ty, code, rest, &q).with_ttl(64).build()
}

/// The static corpus: valid frames of every kind the datapath handles.
#[must_use]
pub fn corpus(model: &Model) -> Vec<Seed> {
    let mut v = Vec::new();
    let tcp_kinds = [
        tcp_flags::SYN,
        tcp_flags::ACK | tcp_flags::PSH,
        tcp_flags::FIN | tcp_flags::ACK,
        tcp_flags::RST,
        tcp_flags::SYN | tcp_flags::ACK,
    ];
    for fe in &model.frontends {
        for (c, dev) in CLIENTS {
            let kinds: &[u8] = if fe.proto == proto::TCP { &tcp_kinds } else { &[0, 1] };
            for k in kinds {
                let mut b = tcp_udp(fe.proto, c, fe.addr, *k);
                if fe.proto == proto::UDP && *k == 1 {
                    b = b.with_udp_zero_checksum();
                }
                let f = b.build();
                v.push(seed(f.clone(), Prog::Ingress, dev));
                if *c.ip().octets().first().expect("4") == 8 {
                    v.push(seed(f.clone(), Prog::IngressL3, Dev::Tun));
                }
                if fe.flags & SVC_FLAGS_EXTERNAL != 0 {
                    v.push(seed(f, Prog::Xdp, dev));
                }
            }
            // An ICMP error about the untranslated packet (the client's router
            // complaining to the frontend) and about a translated one.
            let sent = tcp_udp(fe.proto, c, fe.addr, tcp_flags::SYN).build();
            v.push(seed(icmp_error_quoting(ROUTER, *fe.addr.ip(), icmp::DEST_UNREACH, icmp::FRAG_NEEDED, &sent, 8), Prog::Ingress, Dev::Ext));
            for id in &fe.backends {
                let be = model.backends[id];
                let fwd = tcp_udp(fe.proto, c, be.addr, tcp_flags::SYN).build();
                v.push(seed(icmp_error_quoting(NODE_B, *c.ip(), icmp::TIME_EXCEEDED, 0, &fwd, 8), Prog::Ingress, be.dev));
                v.push(seed(icmp_error_quoting(NODE_EXT, *c.ip(), icmp::DEST_UNREACH, icmp::FRAG_NEEDED, &fwd, 8), Prog::Egress, be.dev));
                // Replies from the backend to the client, and to a node address
                // with a port in the SNAT range.
                for k in [tcp_flags::SYN | tcp_flags::ACK, tcp_flags::ACK, tcp_flags::FIN | tcp_flags::ACK, tcp_flags::RST] {
                    let r = tcp_udp(fe.proto, be.addr, c, k).build();
                    v.push(seed(r.clone(), Prog::Ingress, be.dev));
                    v.push(seed(r, Prog::Egress, Dev::Lxc));
                }
                for n in &model.node_addrs {
                    let r = tcp_udp(fe.proto, be.addr, SocketAddrV4::new(*n, SNAT_PORT_MIN + 7), tcp_flags::ACK).build();
                    v.push(seed(r.clone(), Prog::Ingress, be.dev));
                    v.push(seed(r, Prog::Xdp, be.dev));
                }
            }
        }
    }
    for (c, dev) in CLIENTS {
        v.push(seed(FrameBuilder::icmp_echo(*c.ip(), *FRONTENDS[0].1.ip()).build(), Prog::Ingress, dev));
        let mut g = FrameBuilder::tcp(c, FRONTENDS[0].1, 0);
        g.l4 = crate::packet::L4::Other { proto: 47 };
        v.push(seed(g.with_payload(&[0; 24]).build(), Prog::Ingress, dev));
        v.push(seed(arp_request(CLIENT_MAC, *c.ip(), NODE_EXT), Prog::Ingress, dev));
    }
    v.push(seed(ipv6_udp(std::net::Ipv6Addr::LOCALHOST, 1, std::net::Ipv6Addr::LOCALHOST, 53, b"x"), Prog::Ingress, Dev::Ext));
    v.extend(corpus6(model));
    v
}

/// The mutations, one per variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutator {
    Truncate,
    FlipBits,
    RandomBytes,
    TotalLength,
    Ihl,
    UdpLength,
    TcpDataOffset,
    IpOptions,
    Fragment,
    Protocol,
    Ethertype,
    Ttl,
    TcpFlags,
    SwapEndpoints,
    RandomAddress,
    IcmpGarbageQuote,
    Oversize,
    Tiny,
    UdpZeroChecksum,
    Padding,
    /// IPv6 only: extension headers, payload length, next header.
    Ipv6,
}

pub const MUTATORS: [Mutator; 21] = [
    Mutator::Truncate,
    Mutator::FlipBits,
    Mutator::RandomBytes,
    Mutator::TotalLength,
    Mutator::Ihl,
    Mutator::UdpLength,
    Mutator::TcpDataOffset,
    Mutator::IpOptions,
    Mutator::Fragment,
    Mutator::Protocol,
    Mutator::Ethertype,
    Mutator::Ttl,
    Mutator::TcpFlags,
    Mutator::SwapEndpoints,
    Mutator::RandomAddress,
    Mutator::IcmpGarbageQuote,
    Mutator::Oversize,
    Mutator::Tiny,
    Mutator::UdpZeroChecksum,
    Mutator::Padding,
    Mutator::Ipv6,
];

/// Applies `m` to the Ethernet frame `f` (IPv4 header at 14).
#[allow(clippy::too_many_lines)]
pub fn mutate(m: Mutator, f: &mut Vec<u8>, rng: &mut Rng, endpoints: &[SocketAddrV4]) {
    const L3: usize = ETH_HLEN;
    let ip = f.len() >= L3 + 20;
    let hl = if ip { usize::from(f[L3] & 0x0f) * 4 } else { 20 };
    let l4 = L3 + hl.max(20);
    match m {
        Mutator::Truncate => {
            let n = rng.below(f.len() + 1);
            f.truncate(n);
        }
        Mutator::FlipBits => {
            for _ in 0..=rng.below(8) {
                if f.is_empty() {
                    break;
                }
                // Mostly in the headers.
                let span = if rng.chance(3, 4) { f.len().min(L3 + 60) } else { f.len() };
                let i = rng.below(span);
                f[i] ^= 1 << rng.below(8);
            }
        }
        Mutator::RandomBytes => {
            for _ in 0..=rng.below(4) {
                if f.is_empty() {
                    break;
                }
                let i = rng.below(f.len().min(L3 + 80));
                f[i] = rng.byte();
            }
        }
        Mutator::TotalLength if ip => {
            let real = u16::try_from(f.len() - L3).unwrap_or(u16::MAX);
            let v = match rng.below(4) {
                0 => rng.u16(),
                1 => real.wrapping_add(u16::try_from(rng.below(64)).expect("small")),
                2 => real.saturating_sub(u16::try_from(rng.below(64)).expect("small")),
                _ => u16::try_from(rng.below(40)).expect("small"),
            };
            f[L3 + 2..L3 + 4].copy_from_slice(&v.to_be_bytes());
        }
        Mutator::Ihl if ip => {
            f[L3] = (f[L3] & 0xf0) | u8::try_from(rng.below(16)).expect("nibble");
        }
        Mutator::UdpLength if f.len() >= l4 + 8 => {
            let v = if rng.chance(1, 2) { rng.u16() } else { u16::try_from(rng.below(40)).expect("small") };
            f[l4 + 4..l4 + 6].copy_from_slice(&v.to_be_bytes());
        }
        Mutator::TcpDataOffset if f.len() >= l4 + 20 => {
            f[l4 + 12] = (u8::try_from(rng.below(16)).expect("nibble") << 4) | (f[l4 + 12] & 0x0f);
        }
        Mutator::IpOptions if ip && hl == 20 => {
            let words = 1 + rng.below(10);
            let mut opts = match rng.below(4) {
                0 => vec![1; words * 4],                      // NOPs
                1 => {
                    // Record route.
                    let mut o = vec![7, u8::try_from(words * 4 - 1).expect("small"), 4];
                    o.resize(words * 4, 0);
                    o
                }
                2 => {
                    let mut o = vec![0x94, 4, 0, 0]; // router alert
                    o.resize(words * 4, 0);
                    o
                }
                _ => rng.bytes(words * 4),
            };
            opts.truncate(words * 4);
            let at = L3 + 20;
            f.splice(at..at, opts);
            f[L3] = (f[L3] & 0xf0) | u8::try_from(5 + words).expect("ihl");
            fix_lengths(f, L3);
        }
        Mutator::Fragment if ip => {
            let mut v = be16(f, L3 + 6);
            match rng.below(4) {
                0 => v |= 0x2000,
                1 => v = (v & 0xe000) | u16::try_from(1 + rng.below(0x1fff)).expect("13 bits"),
                2 => v = 0x2000 | u16::try_from(rng.below(0x2000)).expect("13 bits"),
                _ => v ^= 0x4000,
            }
            f[L3 + 6..L3 + 8].copy_from_slice(&v.to_be_bytes());
        }
        Mutator::Protocol if ip => {
            f[L3 + 9] = match rng.below(4) {
                0 => proto::TCP,
                1 => proto::UDP,
                2 => proto::ICMP,
                _ => rng.byte(),
            };
        }
        Mutator::Ethertype if f.len() >= L3 => {
            let t: u16 = *rng.pick(&[0x86dd, 0x0806, 0x8100, 0x88a8, 0x0000, 0xffff, 0x0801]);
            f[12..14].copy_from_slice(&t.to_be_bytes());
        }
        Mutator::Ttl if ip => f[L3 + 8] = u8::try_from(rng.below(3)).expect("small"),
        Mutator::TcpFlags if f.len() >= l4 + 20 => f[l4 + 13] = rng.byte(),
        Mutator::SwapEndpoints if f.len() >= l4 + 4 => {
            let e = *rng.pick(endpoints);
            let (a, p) = if rng.chance(1, 2) { (L3 + 12, l4) } else { (L3 + 16, l4 + 2) };
            f[a..a + 4].copy_from_slice(&e.ip().octets());
            let port = if rng.chance(1, 4) { SNAT_PORT_MIN + u16::try_from(rng.below(usize::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1)).expect("range") } else { e.port() };
            f[p..p + 2].copy_from_slice(&port.to_be_bytes());
        }
        Mutator::RandomAddress if ip => {
            let a = if rng.chance(1, 2) { L3 + 12 } else { L3 + 16 };
            let b = rng.bytes(4);
            f[a..a + 4].copy_from_slice(&b);
            if rng.chance(1, 2) {
                f[a] = 8;
                f[a + 1] = 0;
            }
        }
        Mutator::IcmpGarbageQuote => {
            let e1 = *rng.pick(endpoints);
            let e2 = *rng.pick(endpoints);
            let mut quote = match rng.below(3) {
                0 => {
                    let n = rng.below(64);
                    rng.bytes(n)
                }
                1 => {
                    // A plausible quote with random ports and protocol.
                    let mut q = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, *rng.pick(&[proto::TCP, proto::UDP, proto::ICMP, 47]), 0, 0];
                    q.extend_from_slice(&e1.ip().octets());
                    q.extend_from_slice(&e2.ip().octets());
                    q.extend_from_slice(&e1.port().to_be_bytes());
                    q.extend_from_slice(&e2.port().to_be_bytes());
                    let n = rng.below(20);
                    q.extend(rng.bytes(n));
                    let c = checksum(&q[..20]);
                    q[10..12].copy_from_slice(&c.to_be_bytes());
                    q
                }
                _ => {
                    // The frame's own IPv4 packet, cut anywhere.
                    let ipkt = f.get(L3..).unwrap_or_default().to_vec();
                    let n = rng.below(ipkt.len() + 1);
                    ipkt[..n].to_vec()
                }
            };
            if rng.chance(1, 4) && !quote.is_empty() {
                let i = rng.below(quote.len());
                quote[i] ^= 1 << rng.below(8);
            }
            let ty = *rng.pick(&[icmp::DEST_UNREACH, icmp::TIME_EXCEEDED, icmp::DEST_UNREACH, 12, 5]);
            let code = u8::try_from(rng.below(16)).expect("small");
            let from = *rng.pick(&[ROUTER, ROUTER_L3, NODE_B, NODE_EXT]);
            let to = *rng.pick(endpoints);
            *f = FrameBuilder::icmp_error(from, *to.ip(), ty, code, [0, 0, 0x05, 0xdc], &quote).build();
        }
        Mutator::Oversize => {
            let target = 1400 + rng.below(MAX_FRAME - 1400);
            if f.len() < target {
                let extra = target - f.len();
                f.extend(rng.bytes(extra));
            }
            if rng.chance(3, 4) {
                fix_lengths(f, L3);
            }
        }
        Mutator::Tiny => {
            let n = rng.below(ETH_HLEN + 21);
            f.truncate(n);
        }
        Mutator::UdpZeroChecksum if f.len() >= l4 + 8 => f[l4 + 6..l4 + 8].fill(0),
        Mutator::Padding => {
            // Ethernet padding / trailing bytes beyond the IPv4 total length.
            let n = 1 + rng.below(46);
            f.extend(std::iter::repeat_n(0, n));
        }
        Mutator::Ipv6 => mutate6(f, rng),
        _ => {}
    }
    f.truncate(MAX_FRAME);
}

/// Frames derived from a translated `output` (IPv4 at `l3`): the reply to
/// it, an ICMP error quoting it, the next packet of the flow (from `input`).
fn derive(model: &Model, prog: Prog, input: &[u8], output: &[u8], rng: &mut Rng, out: &mut Vec<Seed>) {
    let l3 = prog.l3();
    if output.get(l3).is_some_and(|v| v >> 4 == 6) && input.len() >= ETH_HLEN && be16(input, 12) == 0x86dd {
        return derive6(model, prog, input, output, rng, out);
    }
    let mut eth = vec![0u8; 12];
    eth.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let frame = |ip: &[u8]| {
        let mut f = if l3 == 0 { eth.clone() } else { Vec::new() };
        f.extend_from_slice(ip);
        f
    };
    let (fo, fi) = (frame(output), frame(input));
    let Ok(po) = parse(&fo) else { return };
    if !matches!(po.ip.proto, proto::TCP | proto::UDP) || po.ip.ihl != 5 {
        return;
    }
    let (src, dst) = (po.src(), po.dst());
    let back_dev = model.backends.values().find(|b| b.addr == dst).map_or(Dev::Ext, |b| b.dev);
    let to_backend = model.backends.values().any(|b| b.addr == dst);
    let flags = match &po.l4 {
        crate::packet::L4Header::Tcp(t) => t.flags,
        _ => 0,
    };
    if to_backend {
        // The backend answers.
        let k = if flags & tcp_flags::SYN != 0 { tcp_flags::SYN | tcp_flags::ACK } else { *rng.pick(&[tcp_flags::ACK, tcp_flags::FIN | tcp_flags::ACK, tcp_flags::RST, tcp_flags::ACK | tcp_flags::PSH]) };
        let r = tcp_udp(po.ip.proto, dst, src, k).build();
        let p = if rng.chance(1, 4) { Prog::Egress } else if rng.chance(1, 3) { Prog::Xdp } else { Prog::Ingress };
        out.push(seed(r.clone(), p, back_dev));
        if src.ip().octets()[0] == 8 || dst.ip().octets()[0] == 8 {
            out.push(seed(r, Prog::IngressL3, Dev::Tun));
        }
        // A router on the way to the backend complains, quoting the translated packet.
        let (ty, code) = *rng.pick(&[(icmp::DEST_UNREACH, icmp::FRAG_NEEDED), (icmp::TIME_EXCEEDED, 0), (icmp::DEST_UNREACH, icmp::PORT_UNREACH)]);
        let e = icmp_error_quoting(*rng.pick(&[NODE_B, ROUTER, ROUTER_L3]), *src.ip(), ty, code, &fo, *rng.pick(&[8, 8, 4, 20]));
        out.push(seed(e.clone(), if rng.chance(1, 3) { Prog::Egress } else { Prog::Ingress }, back_dev));
        if rng.chance(1, 4) {
            out.push(seed(e, Prog::IngressL3, Dev::Tun));
        }
        // The client's next packet of the flow.
        if let Ok(pi) = parse(&fi) {
            let k = *rng.pick(&[tcp_flags::ACK | tcp_flags::PSH, tcp_flags::FIN | tcp_flags::ACK, tcp_flags::RST, tcp_flags::SYN]);
            out.push(seed(tcp_udp(pi.ip.proto, pi.src(), pi.dst(), k).build(), Prog::Ingress, Dev::Ext));
        }
    } else {
        // A reply translated back: an error about it from the client's side.
        let e = icmp_error_quoting(*rng.pick(&[ROUTER, ROUTER_L3]), *src.ip(), icmp::DEST_UNREACH, icmp::FRAG_NEEDED, &fo, 8);
        out.push(seed(e.clone(), Prog::Ingress, Dev::Ext));
        out.push(seed(e, Prog::Egress, Dev::Ext));
        // The client answers the reply.
        let k = *rng.pick(&[tcp_flags::ACK, tcp_flags::FIN | tcp_flags::ACK, tcp_flags::RST]);
        out.push(seed(tcp_udp(po.ip.proto, dst, src, k).build(), Prog::Ingress, Dev::Ext));
    }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct FuzzConfig {
    pub packets: u64,
    pub seed: u64,
    /// Progress line interval (`None`: quiet).
    pub progress: Option<Duration>,
    /// Check the conntrack and affinity maps every this many packets.
    pub state_check_every: u64,
    /// Fail on the named findings too (the default; `FUZZ_STRICT=0` counts them).
    pub strict: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub packets: u64,
    pub elapsed: Duration,
    /// Per program, per verdict name: packets.
    pub verdicts: BTreeMap<&'static str, BTreeMap<String, u64>>,
    /// Inputs the syscall rejects (EINVAL) as expected: see [`syscall_rejects`].
    pub rejected_short: u64,
    /// Translated outputs checked as translations / generated errors.
    pub translations: u64,
    /// Of which IPv6.
    pub translations6: u64,
    pub state_checks: u64,
    /// Known datapath defects seen (tolerated unless strict), by name.
    pub findings: BTreeMap<&'static str, u64>,
    pub max_ct_entries: usize,
    pub max_affinity_entries: usize,
    /// Datapath exit-reason counters at the end.
    pub reasons: Vec<(&'static str, u64)>,
}

impl Summary {
    #[must_use]
    pub fn rate(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    #[must_use]
    pub fn report(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "fuzz: {} packets in {:.1} s: {:.0} packets/s", self.packets, self.elapsed.as_secs_f64(), self.rate());
        let _ = writeln!(
            s,
            "fuzz: {} translations/generated errors checked ({} IPv6), {} short inputs rejected by the syscall (EINVAL), {} state checks (max {} conntrack, {} affinity entries)",
            self.translations, self.translations6, self.rejected_short, self.state_checks, self.max_ct_entries, self.max_affinity_entries
        );
        for (f, n) in &self.findings {
            let _ = writeln!(s, "fuzz: FINDING x{n}: {f}");
        }
        for (p, v) in &self.verdicts {
            let total: u64 = v.values().sum();
            let parts: Vec<String> = v.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(s, "fuzz:   {p:<20} {total:>9}: {}", parts.join(", "));
        }
        let parts: Vec<String> = self.reasons.iter().filter(|(_, n)| *n > 0).map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(s, "fuzz: datapath reasons: {}", parts.join(", "));
        s
    }
}

/// The failure report: seed, packet, program, input and output in hex.
fn fail(cfg: &FuzzConfig, n: u64, prog: Prog, dev: Dev, input: &[u8], verdict: Option<u32>, output: &[u8], why: &str) -> ! {
    panic!(
        "fuzz invariant violated: {why}\nseed {} packet #{n}, program {}, device {dev:?}, verdict {}\ninput ({} bytes):\n{}\noutput ({} bytes):\n{}",
        cfg.seed,
        prog.name(),
        verdict.map_or_else(|| "-".to_owned(), |v| verdict_name(prog, v)),
        input.len(),
        hex(input),
        output.len(),
        hex(output)
    )
}

/// Runs the fuzzer: builds the node, loads and programs one object, sends
/// `cfg.packets` packets and checks every invariant; panics on the first
/// violation with everything needed to look at it.
#[must_use]
pub fn run(cfg: &FuzzConfig) -> Summary {
    on_node(|links| run_on_node(cfg, links))
}

#[allow(clippy::too_many_lines)]
fn run_on_node(cfg: &FuzzConfig, links: Links) -> Summary {
    let model = Model::standard();
    let ebpf = load(&model);
    let tc: BTreeMap<Prog, &SchedClassifier> = PROGS
        .iter()
        .filter(|p| !p.is_xdp())
        .map(|p| (*p, ebpf.program(p.name()).expect("program").try_into().expect("sched_cls")))
        .collect();
    let xdp: &Xdp = ebpf.program(XDP_PROG).expect("program").try_into().expect("xdp");
    let ct_maps: Vec<HashMap<&MapData, CtKey, CtValue>> =
        CT_TABLES.iter().filter_map(|n| ebpf.map(n)).map(|m| HashMap::try_from(m).expect("ct map type")).collect();
    let ct_get = |k: &CtKey| ct_maps.iter().find_map(|m| m.get(k, 0).ok());
    let ct6_maps: Vec<HashMap<&MapData, Ct6Key, Ct6Value>> =
        CT6_TABLES.iter().filter_map(|n| ebpf.map(n)).map(|m| HashMap::try_from(m).expect("ct6 map type")).collect();
    let ct6_get = |k: &Ct6Key| ct6_maps.iter().find_map(|m| m.get(k, 0).ok());

    let endpoints = model.endpoints();
    let corpus = corpus(&model);
    let mut pool: Vec<Seed> = Vec::with_capacity(4096);
    let mut pool_next = 0usize;
    let mut rng = Rng::new(cfg.seed);
    let mut out = vec![0u8; 8192];
    let mut sum = Summary::default();
    let start = Instant::now();
    let mut last_progress = (start, 0u64);
    let mut derived = Vec::new();

    for n in 0..cfg.packets {
        // Pick a seed: the static corpus or a derived frame.
        let s = if !pool.is_empty() && rng.chance(1, 2) { pool[rng.below(pool.len())].clone() } else { corpus[rng.below(corpus.len())].clone() };
        let mut frame = s.frame;
        let mut prog = s.prog;
        let mut dev = s.dev;
        if rng.chance(3, 5) {
            for _ in 0..=rng.below(3) {
                mutate(*rng.pick(&MUTATORS), &mut frame, &mut rng, &endpoints);
            }
            if rng.chance(2, 3) {
                fix_checksums(&mut frame, ETH_HLEN);
            }
        }
        if rng.chance(1, 4) {
            prog = *rng.pick(&PROGS);
            dev = *rng.pick(&[Dev::Ext, Dev::Int, Dev::Lxc]);
        }
        if matches!(prog, Prog::IngressL3 | Prog::EgressL3) {
            dev = Dev::Tun;
        } else if dev == Dev::Tun {
            dev = Dev::Ext;
        }
        let input: &[u8] = if prog.l3() == 0 { frame.get(ETH_HLEN..).unwrap_or_default() } else { &frame };
        let ifindex = links.of(dev);
        let r = if prog.is_xdp() {
            let ctx = xdp_md_ctx(input.len(), ifindex);
            xdp.test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ctx_in: Some(&ctx), repeat: 1, ..Default::default() })
        } else {
            let ctx = skb_ctx(ifindex);
            tc[&prog].test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ctx_in: Some(&ctx), repeat: 1, ..Default::default() })
        };
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                if syscall_rejects(prog, input) && os_error(&e) == Some(libc::EINVAL) {
                    sum.rejected_short += 1;
                    *sum.verdicts.entry(prog.name()).or_default().entry("EINVAL (syscall: too short)".into()).or_default() += 1;
                    continue;
                }
                fail(cfg, n, prog, dev, input, None, &[], &format!("BPF_PROG_TEST_RUN failed: {e:?}"));
            }
        };
        let olen = usize::try_from(r.data_size_out).expect("size");
        let output = &out[..olen.min(out.len())];
        let verdict = r.return_value;
        *sum.verdicts.entry(prog.name()).or_default().entry(verdict_name(prog, verdict)).or_default() += 1;
        match check_packet_with(&model, prog, input, verdict, output, &ct_get, &ct6_get) {
            Err(why) => fail(cfg, n, prog, dev, input, Some(verdict), output, &why),
            Ok(Some(finding)) => {
                if cfg.strict {
                    fail(cfg, n, prog, dev, input, Some(verdict), output, finding);
                }
                let count = sum.findings.entry(finding).or_default();
                if *count == 0 {
                    eprintln!(
                        "fuzz: FINDING (FUZZ_STRICT=0: counted, not fatal): {finding}\n{}, seed {} packet #{n}, verdict {}\ninput ({} bytes):\n{}\noutput ({} bytes):\n{}",
                        prog.name(), cfg.seed, verdict_name(prog, verdict), input.len(), hex(input), output.len(), hex(output)
                    );
                }
                *count += 1;
            }
            Ok(None) => {}
        }
        let forwarded = if prog.is_xdp() { matches!(verdict, XDP_TX | XDP_REDIRECT) } else { matches!(verdict, TC_ACT_OK | TC_ACT_REDIRECT) };
        if forwarded {
            sum.translations += 1;
            if !prog.is_xdp() && input.len() >= ETH_HLEN && be16(input, 12) == 0x86dd {
                sum.translations6 += 1;
            }
            let o = if prog.l3() == 0 && output.first() == Some(&0) && output.len() > ETH_HLEN { &output[ETH_HLEN..] } else { output };
            if o.len() == input.len() {
                derived.clear();
                derive(&model, prog, input, o, &mut rng, &mut derived);
                for d in derived.drain(..) {
                    if pool.len() < 4096 {
                        pool.push(d);
                    } else {
                        pool[pool_next] = d;
                        pool_next = (pool_next + 1) % 4096;
                    }
                }
            }
        }
        if (n + 1) % cfg.state_check_every == 0 {
            state_check(cfg, &model, &ebpf, &mut sum, n);
        }
        if let Some(every) = cfg.progress {
            let now = Instant::now();
            if now.duration_since(last_progress.0) >= every {
                let recent = (n + 1 - last_progress.1) as f64 / now.duration_since(last_progress.0).as_secs_f64();
                let total = (n + 1) as f64 / now.duration_since(start).as_secs_f64();
                eprintln!("fuzz: {} / {} packets, {recent:.0} packets/s (overall {total:.0}/s), {} translations", n + 1, cfg.packets, sum.translations);
                last_progress = (now, n + 1);
            }
        }
    }
    sum.packets = cfg.packets;
    sum.elapsed = start.elapsed();
    state_check(cfg, &model, &ebpf, &mut sum, cfg.packets);
    let stats = stats_by_reason(&ebpf);
    sum.reasons = REASONS.iter().map(|(i, name)| (*name, stats[i].packets)).collect();
    // Liveness of the SNAT port search: the model's flows take a few
    // hundred of each backend's 4,536 ports at most, so 32 random tries
    // always find one. A search that never succeeds (found once: the
    // compiler kept a stale "not found" across `bpf_loop`) only shows as
    // drops, which no per-packet invariant can fault.
    let exhausted = stats[&proxy_common::stats::DROP_SNAT_EXHAUSTED].packets;
    assert!(exhausted == 0, "fuzz (seed {}): {exhausted} new flows found no free SNAT port among thousands", cfg.seed);
    sum
}

fn state_check(cfg: &FuzzConfig, model: &Model, ebpf: &Ebpf, sum: &mut Summary, n: u64) {
    let ct = ct_entries(ebpf);
    let ct6 = ct6_entries(ebpf);
    let aff = affinity_entries(ebpf);
    let aff_max = map_max(ebpf, AFFINITY_MAP).unwrap_or(AFFINITY_MAX_ENTRIES);
    sum.state_checks += 1;
    sum.max_ct_entries = sum.max_ct_entries.max(ct.iter().map(|t| t.2.len()).sum::<usize>() + ct6.iter().map(|t| t.2.len()).sum::<usize>());
    sum.max_affinity_entries = sum.max_affinity_entries.max(aff.len());
    if let Err(e) = check_state(model, &ct, &aff, aff_max).and_then(|()| check_state6(model, &ct6)) {
        panic!("fuzz state invariant violated after packet #{n} (seed {}): {e}", cfg.seed);
    }
}

/// Whether `BPF_PROG_TEST_RUN` refuses `input` before running the program:
/// shorter than an Ethernet header (`bpf_test_init`), or (`sched_cls`) an
/// IPv4 / IPv6 ethertype without room for that network header after it —
/// the ethertype as `eth_type_trans` reads it: bytes 12-13, which for a
/// stripped `_l3` input are the first two bytes of the source address.
#[must_use]
pub fn syscall_rejects(prog: Prog, input: &[u8]) -> bool {
    if input.len() < ETH_HLEN {
        return true;
    }
    if prog.is_xdp() {
        return false;
    }
    match be16(input, 12) {
        0x0800 => input.len() < ETH_HLEN + 20,
        0x86dd => input.len() < ETH_HLEN + 40,
        _ => false,
    }
}

fn os_error(e: &ProgramError) -> Option<i32> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        src = s.source();
    }
    None
}

/// `FUZZ_PACKETS` / `FUZZ_SEED` from the environment, with defaults.
#[must_use]
pub fn config_from_env(default_packets: u64) -> FuzzConfig {
    let packets = std::env::var("FUZZ_PACKETS").ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default_packets);
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    let strict = !std::env::var("FUZZ_STRICT").is_ok_and(|v| v == "0");
    FuzzConfig { packets, seed, progress: Some(Duration::from_secs(10)), state_check_every: (packets / 10).clamp(5_000, 1_000_000), strict }
}

// ---------------------------------------------------------------------------
// IPv6
// ---------------------------------------------------------------------------
//
// The model also programs IPv6 frontends (`proxy_svc6_v1`, `proxy_be6_v1`):
// `ClusterIP`s with and without affinity and without backends (reject,
// drop), over TCP and UDP, with local backends and one on node B. No
// external IPv6 frontend and no IPv6 route in the node's namespace, so the
// IPv6 path never source-NATs to the node nor redirects by FIB (a hairpin,
// which would need the route, is dropped as `fib_no_route`): every IPv6
// translation the checker sees is a DNAT, a reverse NAT, an ICMPv6 error
// translated back, or a reject it can check byte for byte. The one source
// NAT it can see is the port clash of `ct::create` (the client's own
// address, a port from the SNAT range).
//
// Every IPv6 address the fixture uses has `86dd` in bytes 4-5, so that a
// stripped packet is IPv6 to the `_l3` programs under `BPF_PROG_TEST_RUN`
// (see "The `_l3` variants" above: there, bytes 12-13 of the IPv6 header,
// bytes 4-5 of its source address, become `skb->protocol`).

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().expect("IPv6 literal")
}

fn sa6(s: &str, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip6(s), port, 0, 0)
}

/// IPv6 clients and the device their packets arrive on (the local pod
/// `fd00:244:86dd::11` is also backend 201: hairpins).
#[must_use]
pub fn clients6() -> Vec<(SocketAddrV6, Dev)> {
    vec![
        (sa6("2001:db8:86dd::7", 40010), Dev::Ext),
        (sa6("2001:db8:86dd::8", 40010), Dev::Ext),
        (sa6("fd00:244:86dd::50", 40011), Dev::Lxc),
        (sa6("fd00:244:86dd::11", 40012), Dev::Lxc),
    ]
}

/// A programmed IPv6 backend.
#[derive(Clone, Copy, Debug)]
pub struct Backend6Def {
    pub id: u32,
    pub addr: SocketAddrV6,
    pub proto: u8,
    pub dev: Dev,
}

/// A programmed IPv6 frontend.
#[derive(Clone, Debug)]
pub struct Frontend6Def {
    pub name: &'static str,
    pub addr: SocketAddrV6,
    pub proto: u8,
    pub svc_id: u32,
    pub flags: u16,
    pub backends: Vec<u32>,
    pub affinity_s: u32,
    pub group: u32,
}

/// `(base id, address, device)`: TCP ids are these, UDP ids + 100 (one id
/// space with the IPv4 backends, as the agent allocates them).
fn backends6_def() -> [(u32, SocketAddrV6, Dev); 3] {
    [
        (201, sa6("fd00:244:86dd::11", 8080), Dev::Lxc),
        (202, sa6("fd00:244:86dd::12", 8080), Dev::Lxc),
        (203, sa6("fd00:245:86dd::11", 8080), Dev::Int),
    ]
}

/// `(name, address, flags, base backend ids, affinity timeout)`.
fn frontends6_def() -> [(&'static str, SocketAddrV6, u16, &'static [u32], u32); 4] {
    [
        ("clusterip6", sa6("fd00::10", 80), SVC_FLAG_CLUSTER_IP, &[201, 202, 203], 0),
        ("clusterip6-affinity", sa6("fd00::11", 80), SVC_FLAG_CLUSTER_IP, &[201, 203], 10800),
        ("clusterip6-empty", sa6("fd00::20", 80), SVC_FLAG_CLUSTER_IP, &[], 0),
        ("clusterip6-drop", sa6("fd00::21", 80), SVC_FLAG_CLUSTER_IP | SVC_FLAG_DROP_WHEN_EMPTY | SVC_FLAG_POLICY_LOCAL, &[], 0),
    ]
}

/// The IPv6 half of [`Model::standard`].
fn standard6() -> (BTreeMap<u32, Backend6Def>, Vec<Frontend6Def>) {
    let mut backends = BTreeMap::new();
    let mut frontends = Vec::new();
    for (pi, p) in [proto::TCP, proto::UDP].into_iter().enumerate() {
        let off = u32::try_from(pi).expect("0/1") * 100;
        for (id, addr, dev) in backends6_def() {
            backends.insert(id + off, Backend6Def { id: id + off, addr, proto: p, dev });
        }
        for (i, (name, addr, flags, ids, affinity_s)) in frontends6_def().into_iter().enumerate() {
            let svc_id = u32::try_from(i).expect("few") * 2 + 60 + u32::try_from(pi).expect("0/1");
            frontends.push(Frontend6Def {
                name,
                addr,
                proto: p,
                svc_id,
                flags,
                backends: ids.iter().map(|id| id + off).collect(),
                affinity_s,
                group: if affinity_s == 0 { 0 } else { 5000 + svc_id },
            });
        }
    }
    (backends, frontends)
}

impl Model {
    #[must_use]
    pub fn frontend6(&self, a: SocketAddrV6, p: u8) -> Option<&Frontend6Def> {
        self.frontends6.iter().find(|f| f.addr == a && f.proto == p)
    }

    #[must_use]
    pub fn has_backend6(&self, fe: &Frontend6Def, a: SocketAddrV6) -> bool {
        fe.backends.iter().any(|id| self.backends6[id].addr == a)
    }

    pub fn frontends6_with(&self, a: SocketAddrV6, p: u8) -> impl Iterator<Item = &Frontend6Def> {
        self.frontends6.iter().filter(move |f| f.proto == p && self.has_backend6(f, a))
    }
}

fn addr6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(o)
}

fn sa6_at(b: &[u8], addr: usize, port: usize) -> SocketAddrV6 {
    SocketAddrV6::new(addr6_at(b, addr), be16(b, port), 0, 0)
}

/// An IPv6 packet as the datapath may translate it: the rules of
/// `parse::walk_ipv6` and `parse_ipv6_ports`, written again from RFC 8200.
struct Walk6 {
    /// The upper-layer protocol and where it starts (in the IPv6 packet).
    next: u8,
    l4: usize,
    /// The end of the payload (40 + payload length).
    end: usize,
    /// A fragment header with offset 0 and more fragments.
    first_fragment: bool,
    /// A fragment after the first (offset > 0) of TCP or UDP: no upper-layer
    /// header, `l4` is where its data starts; TC may translate it with the
    /// ports its first fragment left in `proxy_frag6_v1`.
    later_fragment: bool,
}

/// `None` when the datapath must pass the packet untouched: not version 6,
/// an extension chain longer than 6 or with a header it does not walk, a
/// routing header with segments left, a later fragment of anything but TCP
/// or UDP, headers cut short or beyond the payload length, a UDP checksum
/// of 0.
fn walk6(a: &[u8]) -> Option<Walk6> {
    if a.len() < 40 || a[0] >> 4 != 6 {
        return None;
    }
    let end = 40 + usize::from(be16(a, 4));
    let mut next = a[6];
    let mut off = 40;
    let mut first_fragment = false;
    for _ in 0..6 {
        match next {
            0 | 43 | 60 => {
                let h = a.get(off..off + 4)?;
                if next == 43 && h[3] != 0 {
                    return None;
                }
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            44 => {
                let h = a.get(off..off + 4)?;
                let fo = u16::from_be_bytes([h[2], h[3]]);
                next = h[0];
                off += 8;
                if fo & 0xfff8 != 0 {
                    // Data follows, not headers.
                    if !matches!(next, proto::TCP | proto::UDP) || off > end {
                        return None;
                    }
                    return Some(Walk6 { next, l4: off, end, first_fragment: false, later_fragment: true });
                }
                first_fragment |= fo & 1 != 0;
            }
            _ => break,
        }
        if off > end {
            return None;
        }
    }
    if matches!(next, 0 | 43 | 44 | 60 | 135 | 139 | 140 | 253 | 254) {
        return None;
    }
    let min = match next {
        proto::TCP => 20,
        proto::UDP => 8,
        _ => 0,
    };
    if min > 0 && (a.len() < off + min || end < off + min || (next == proto::UDP && be16(a, off + 6) == 0)) {
        return None;
    }
    Some(Walk6 { next, l4: off, end, first_fragment, later_fragment: false })
}

/// L4 residual over the IPv6 pseudo-header and the bytes `l4..` of `ip`.
fn l4_residual6(ip: &[u8], l4: usize, nh: u8) -> u16 {
    let seg = &ip[l4..];
    residual(sum_words(seg, pseudo_header_sum6(addr6_at(ip, 8), addr6_at(ip, 24), nh, seg.len())))
}

/// Recomputes the TCP, UDP or ICMPv6 checksum of the IPv6 packet at `l3`
/// (walking its extension headers; up to the payload length, or the frame's
/// end when that lies). A UDP checksum of 0 is left 0.
fn fix_checksums6(f: &mut [u8], l3: usize) {
    let Some(a) = f.get(l3..) else { return };
    if a.len() < 40 || a[0] >> 4 != 6 {
        return;
    }
    let Ok(p) = crate::packet6::parse6_ip(a) else { return };
    if p.is_later_fragment() || p.fragment.is_some_and(|(_, more)| more) {
        return;
    }
    let end = (40 + usize::from(p.payload_len)).min(a.len());
    let l4 = l3 + p.upper_off;
    let end = l3 + end;
    let at = match p.upper {
        proto::TCP if end >= l4 + 20 => 16,
        proto::UDP if end >= l4 + 8 => {
            if be16(f, l4 + 6) == 0 {
                return;
            }
            6
        }
        58 if end >= l4 + 8 => 2,
        _ => return,
    };
    f[l4 + at..l4 + at + 2].fill(0);
    let mut c = l4_checksum6(p.src, p.dst, p.upper, &f[l4..end]);
    if p.upper == proto::UDP && c == 0 {
        c = 0xffff;
    }
    f[l4 + at..l4 + at + 2].copy_from_slice(&c.to_be_bytes());
}

/// The IPv6 conntrack lookup the checker uses to confirm a restored client.
pub type Ct6Lookup<'a> = &'a dyn Fn(&Ct6Key) -> Option<Ct6Value>;

/// Checks an IPv6 packet (as the program saw it: bytes 12-13 said IPv6)
/// that was not passed: a reject the datapath built, or a translation.
fn check_forwarded6(model: &Model, prog: Prog, input: &[u8], verdict: u32, out: &[u8], ct6: Ct6Lookup<'_>) -> Result<(), String> {
    let l3 = prog.l3();
    let a = input.get(l3..).unwrap_or_default();
    let w = walk6(a).ok_or("an IPv6 packet the datapath must pass untouched (unwalkable, a later fragment of neither TCP nor UDP, malformed) was not passed")?;
    if w.later_fragment {
        if prog.is_xdp() {
            return Err("XDP translated an IPv6 later fragment".into());
        }
        if verdict != TC_ACT_OK {
            return Err(format!("IPv6 later fragment {}: only a translation may forward one", verdict_name(prog, verdict)));
        }
        return check_later_fragment6(model, a, out.get(l3..).unwrap_or_default(), &w);
    }
    // An error built in place of the packet: ICMPv6 out, TCP/UDP in (the
    // length alone does not tell: a padded frame can have the error's).
    if verdict == TC_ACT_REDIRECT && prog.is_ingress() && out.len() > l3 + 40 && out[l3 + 6] == 58 && w.next != 58 {
        return check_generated6(model, prog, input, &w, out);
    }
    if verdict != TC_ACT_OK {
        return Err(format!("IPv6 {} without an error built: no IPv6 flow of the model is redirected", verdict_name(prog, verdict)));
    }
    if out.len() != input.len() {
        return Err(format!("translated IPv6 packet changed length {} -> {}", input.len(), out.len()));
    }
    if l3 == ETH_HLEN && input[..ETH_HLEN] != out[..ETH_HLEN] {
        return Err("TC changed the Ethernet header of an IPv6 packet".into());
    }
    let b = &out[l3..];
    let p = w.next;
    let l4 = w.l4;
    let mut allowed = vec![7..8, 8..40];
    match p {
        proto::TCP => allowed.extend([l4..l4 + 4, l4 + 16..l4 + 18]),
        proto::UDP => allowed.extend([l4..l4 + 4, l4 + 6..l4 + 8]),
        58 => {
            let inner = l4 + 8;
            allowed = vec![24..40, l4 + 2..l4 + 4, inner + 8..inner + 40, inner + 40..inner + 44];
        }
        other => return Err(format!("translated an IPv6 packet of upper layer {other}")),
    }
    if let Some(i) = (0..a.len()).find(|i| a[*i] != b[*i] && !allowed.iter().any(|r| r.contains(i))) {
        return Err(format!("byte {i} of the IPv6 packet changed ({:#04x} -> {:#04x}): not an address, port, checksum or hop limit", a[i], b[i]));
    }
    if a == b {
        return Err("IPv6 forwarding verdict without any translation".into());
    }
    if b[7] != a[7] && !(a[7] >= 2 && b[7] == a[7] - 1) {
        return Err(format!("hop limit {} -> {}", a[7], b[7]));
    }
    let (ra, rb) = (l4_residual6(a, l4, p), l4_residual6(b, l4, p));
    if ra != rb {
        return Err(format!("IPv6 {} checksum residual changed: in {ra:#06x}, out {rb:#06x}", if p == 58 { "ICMPv6" } else { proto_name(p) }));
    }
    if p == proto::UDP && be16(b, l4 + 6) == 0 {
        return Err("IPv6 UDP checksum became 0".into());
    }
    if p == 58 {
        check_icmp6_translation(model, a, b, &w)?;
    } else {
        check_translation6(model, a, b, &w, ct6)?;
    }
    // Whole-packet view: a fully valid input gives a fully valid output.
    if let Ok(pin) = crate::packet6::parse6_ip(a)
        && pin.verify_checksums().is_ok()
    {
        let pout = crate::packet6::parse6_ip(b).map_err(|e| format!("a valid IPv6 input became unparsable: {e}"))?;
        pout.verify_checksums().map_err(|e| format!("valid IPv6 input, invalid output: {e}"))?;
    }
    Ok(())
}

/// An IPv6 fragment after the first has no ports (they live in the first
/// fragment): TC may change only the addresses and the hop limit, never a
/// byte of the extension headers or the data; the new destination is a
/// backend of a frontend at the old one, or a new source is a frontend
/// that has the old one as a backend (a reply). XDP passes it to TC.
fn check_later_fragment6(model: &Model, a: &[u8], b: &[u8], w: &Walk6) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("translated IPv6 later fragment changed length {} -> {}", a.len(), b.len()));
    }
    if let Some(i) = (0..a.len()).find(|i| a[*i] != b[*i] && !(7..40).contains(i)) {
        return Err(format!("byte {i} of an IPv6 later fragment changed ({:#04x} -> {:#04x}): only addresses and hop limit may", a[i], b[i]));
    }
    if a == b {
        return Err("IPv6 later fragment forwarded without any translation".into());
    }
    if b[7] != a[7] && !(a[7] >= 2 && b[7] == a[7] - 1) {
        return Err(format!("later fragment: hop limit {} -> {}", a[7], b[7]));
    }
    let p = w.next;
    let (s, d, s2, d2) = (addr6_at(a, 8), addr6_at(a, 24), addr6_at(b, 8), addr6_at(b, 24));
    let frontends = |x: Ipv6Addr| model.frontends6.iter().filter(move |f| f.proto == p && *f.addr.ip() == x);
    let backend_of = |f: &Frontend6Def, x: Ipv6Addr| f.backends.iter().any(|id| *model.backends6[id].addr.ip() == x);
    if d2 != d && !frontends(d).any(|f| backend_of(f, d2)) {
        return Err(format!("IPv6 later fragment to {d} readdressed to {d2}: not a backend of a frontend at {d}"));
    }
    if s2 != s && !frontends(s2).any(|f| backend_of(f, s)) {
        return Err(format!("IPv6 later fragment from {s} readdressed from {s2}: not a frontend that has backend {s}"));
    }
    Ok(())
}

/// TCP/UDP: a DNAT to one of the frontend's backends, or a reverse NAT to
/// a frontend that has the backend.
fn check_translation6(model: &Model, a: &[u8], b: &[u8], w: &Walk6, ct6: Ct6Lookup<'_>) -> Result<(), String> {
    let (p, l4) = (w.next, w.l4);
    let (s, d) = (sa6_at(a, 8, l4), sa6_at(a, 24, l4 + 2));
    let (s2, d2) = (sa6_at(b, 8, l4), sa6_at(b, 24, l4 + 2));
    if d != d2 && let Some(fe) = model.frontend6(d, p) {
        if !model.has_backend6(fe, d2) {
            return Err(format!("DNAT of {d} (frontend {}) to {d2}, not one of its backends", fe.name));
        }
        // The port clash of `ct::create`: the client's address, a port of
        // the SNAT range.
        if s != s2 && !(s2.ip() == s.ip() && in_snat_range(s2.port())) {
            return Err(format!("IPv6 DNAT rewrote the source {s} to {s2}"));
        }
        return Ok(());
    }
    if s == s2 {
        return Err(format!("IPv6 translation {s} -> {d} into {s2} -> {d2}: {d} is no frontend and the source was kept"));
    }
    if !model.frontends6_with(s, p).any(|f| f.addr == s2) {
        return Err(format!("IPv6 reverse NAT of {s} to {s2}: not a frontend that has backend {s}"));
    }
    if d != d2 {
        if !(d.ip() == d2.ip() && in_snat_range(d.port())) {
            return Err(format!("IPv6 reverse NAT restored {d} to {d2}, but {d} is not an SNAT source"));
        }
        let key = Ct6Key { saddr: s.ip().octets(), daddr: d.ip().octets(), sport_be: s.port().to_be(), dport_be: d.port().to_be(), proto: p, dir: CT_DIR_REPLY, _pad: [0; 2] };
        match ct6(&key) {
            Some(e) if e.flags & CT_F_SNAT != 0 && e.snat_addr == d2.ip().octets() && u16::from_be(e.snat_port_be) == d2.port() => {}
            Some(e) => return Err(format!("IPv6 reverse NAT to {s2} -> {d2} disagrees with the REPLY entry {e:?}")),
            None => return Err(format!("IPv6 reverse NAT restored the client {d2} without a REPLY entry")),
        }
    }
    let _ = w.first_fragment;
    Ok(())
}

/// An ICMPv6 error about a translated flow, translated back.
fn check_icmp6_translation(model: &Model, a: &[u8], b: &[u8], w: &Walk6) -> Result<(), String> {
    let l4 = w.l4;
    let inner = l4 + 8;
    if w.first_fragment {
        return Err("translated a fragmented ICMPv6 error".into());
    }
    if a.len() < inner + 44 || w.end < inner + 44 {
        return Err("ICMPv6 translated with a quote shorter than IPv6 header + ports".into());
    }
    if !matches!(a[l4], 1..=3) || a[inner] >> 4 != 6 {
        return Err(format!("translated an ICMPv6 message of type {} quoting {:#04x}", a[l4], a[inner]));
    }
    let ip = a[inner + 6];
    if !matches!(ip, proto::TCP | proto::UDP) {
        return Err("translated an ICMPv6 error quoting neither TCP nor UDP".into());
    }
    let q = |x: &[u8], at: usize, port: usize| sa6_at(x, inner + at, inner + 40 + port);
    let (qs, qd, qs2, qd2) = (q(a, 8, 0), q(a, 24, 2), q(b, 8, 0), q(b, 24, 2));
    let (od, od2) = (addr6_at(a, 24), addr6_at(b, 24));
    let about_reply = qs != qs2 && model.frontend6(qs, ip).is_some_and(|f| model.has_backend6(f, qs2));
    if about_reply {
        if od2 != *qs2.ip() {
            return Err(format!("ICMPv6 error about a reply readdressed to {od2}, not to the backend {qs2}"));
        }
        if qd != qd2 && !(qd2.ip() == qd.ip() && in_snat_range(qd2.port())) {
            return Err(format!("ICMPv6 error about a reply: quoted destination {qd} -> {qd2}"));
        }
        return Ok(());
    }
    if qd == qd2 || !model.frontends6_with(qd, ip).any(|f| f.addr == qd2) {
        return Err(format!("ICMPv6 error: quoted destination {qd} -> {qd2}, not a backend restored to a frontend that has it"));
    }
    if qs != qs2 && !(qs.ip() == qs2.ip() && in_snat_range(qs.port())) {
        return Err(format!("ICMPv6 error: quoted source {qs} restored to {qs2}, but {qs} is not an SNAT source"));
    }
    if od != od2 && od2 != *qs2.ip() {
        return Err("ICMPv6 error readdressed without an SNAT flow".into());
    }
    Ok(())
}

/// The ICMPv6 port unreachable the datapath builds for a frontend without
/// backends (no other IPv6 error can be built in this model).
fn check_generated6(model: &Model, prog: Prog, input: &[u8], w: &Walk6, out: &[u8]) -> Result<(), String> {
    let l3 = prog.l3();
    let a = &input[l3..];
    let qlen = w.l4 + 8;
    if !matches!(w.next, proto::TCP | proto::UDP) {
        return Err("an ICMPv6 error built for a packet that is neither TCP nor UDP".into());
    }
    if out.len() != l3 + 48 + qlen {
        return Err(format!("ICMPv6 error of {} bytes, expected {}", out.len(), l3 + 48 + qlen));
    }
    let b = &out[l3..];
    if b[0] >> 4 != 6 || usize::from(be16(b, 4)) != 8 + qlen || b[6] != 58 || b[7] != 64 {
        return Err("generated ICMPv6 error: bad IPv6 header".into());
    }
    if addr6_at(b, 24) != addr6_at(a, 8) {
        return Err("generated ICMPv6 error is not addressed to the sender".into());
    }
    if l4_checksum6(addr6_at(b, 8), addr6_at(b, 24), 58, &b[40..]) != 0 {
        return Err("generated ICMPv6 error: bad checksum".into());
    }
    if b[48..] != a[..qlen] {
        return Err("generated ICMPv6 error does not quote the IPv6 header, its extension headers and 8 bytes of L4".into());
    }
    let dst = sa6_at(a, 24, w.l4 + 2);
    match (b[40], b[41]) {
        (1, 4) => {
            let fe = model.frontend6(dst, w.next).ok_or_else(|| format!("ICMPv6 reject for {dst}, not a frontend"))?;
            if !fe.backends.is_empty() || fe.flags & SVC_FLAG_DROP_WHEN_EMPTY != 0 {
                return Err(format!("ICMPv6 reject for frontend {} ({}), which has backends or drops", fe.name, fe.addr));
            }
            if addr6_at(b, 8) != *dst.ip() {
                return Err("ICMPv6 reject not sent from the frontend".into());
            }
            if b[44..48] != [0; 4] {
                return Err("ICMPv6 reject with its unused field set".into());
            }
        }
        (t, c) => return Err(format!("generated ICMPv6 type {t} code {c}: not possible in this model")),
    }
    if l3 == ETH_HLEN && (out[0..6] != input[6..12] || out[6..12] != input[0..6] || be16(out, 12) != 0x86dd) {
        return Err("generated ICMPv6 error: MACs not swapped".into());
    }
    Ok(())
}

/// Checks the IPv6 conntrack against the model.
/// A conntrack table: its name, `max_entries` and entries.
pub type Ct6Table<'a> = (&'a str, u32, Vec<(Ct6Key, Ct6Value)>);

pub fn check_state6(model: &Model, ct6: &[Ct6Table<'_>]) -> Result<(), String> {
    for (name, max, entries) in ct6 {
        if entries.len() > *max as usize {
            return Err(format!("{name}: {} entries, more than its {max}", entries.len()));
        }
        for (k, v) in entries {
            check_ct6_entry(model, k, v).map_err(|e| format!("{name} entry {k:?} => {v:?}: {e}"))?;
        }
    }
    Ok(())
}

fn check_ct6_entry(model: &Model, k: &Ct6Key, v: &Ct6Value) -> Result<(), String> {
    if k._pad != [0; 2] || v._pad != 0 {
        return Err("non-zero padding".into());
    }
    if !matches!(k.proto, proto::TCP | proto::UDP) {
        return Err("protocol neither TCP nor UDP".into());
    }
    if v.flags & !(CT_F_SNAT | CT_F_REDIRECT | CT_F_CLOSING | CT_F_SEEN_REPLY) != 0 {
        return Err("unknown flags".into());
    }
    if v.flags & CT_F_REDIRECT != 0 {
        return Err("CT_F_REDIRECT on an IPv6 flow of this model (no external frontend, no SNAT to the node)".into());
    }
    let be = model.backends6.get(&v.backend_id).ok_or("backend id not programmed (IPv6)")?;
    let fe = model.frontends6.iter().find(|f| f.svc_id == v.svc_id).ok_or("service id not programmed (IPv6)")?;
    if be.proto != k.proto || fe.proto != k.proto || !fe.backends.contains(&v.backend_id) {
        return Err(format!("backend {} is not one of frontend {}'s", v.backend_id, fe.name));
    }
    let snat = v.flags & CT_F_SNAT != 0;
    let s6 = |a: [u8; 16], port_be: u16| SocketAddrV6::new(Ipv6Addr::from(a), u16::from_be(port_be), 0, 0);
    let (ks, kd, nat, sn) = (s6(k.saddr, k.sport_be), s6(k.daddr, k.dport_be), s6(v.nat_addr, v.nat_port_be), s6(v.snat_addr, v.snat_port_be));
    if !snat && (v.snat_addr != [0; 16] || v.snat_port_be != 0) {
        return Err("SNAT fields set without CT_F_SNAT".into());
    }
    match k.dir {
        CT_DIR_SERVICE => {
            if kd != fe.addr || nat != be.addr {
                return Err(format!("SERVICE entry {ks} -> {kd} translates to {nat}: not frontend {} to backend {}", fe.addr, be.addr));
            }
            if !(v.slot >= 1 && fe.backends.get(usize::from(v.slot) - 1) == Some(&v.backend_id)) {
                return Err(format!("slot {} does not hold backend {}", v.slot, v.backend_id));
            }
            if snat && !(sn.ip() == ks.ip() && in_snat_range(sn.port())) {
                return Err(format!("SNAT source {sn}: not the client's address with a port in range"));
            }
        }
        CT_DIR_REPLY => {
            if ks != be.addr || nat != fe.addr || v.slot != 0 {
                return Err(format!("REPLY entry {ks} -> {kd} restores {nat}: not backend {} to frontend {}", be.addr, fe.addr));
            }
            if snat && !(kd.ip() == sn.ip() && in_snat_range(kd.port())) {
                return Err(format!("SNAT REPLY entry keyed to {kd}: not an SNAT source"));
            }
        }
        d => return Err(format!("direction {d}")),
    }
    Ok(())
}

/// The IPv6 conntrack tables.
pub const CT6_TABLES: [&str; 2] = [CT6_MAP, CT6_NEW_MAP];

fn ct6_entries(ebpf: &Ebpf) -> Vec<Ct6Table<'static>> {
    CT6_TABLES
        .iter()
        .filter_map(|name| {
            let m: HashMap<&MapData, Ct6Key, Ct6Value> = HashMap::try_from(ebpf.map(name)?).expect("ct6 map type");
            let max = map_max(ebpf, name).expect("ct6 map info");
            Some((*name, max, m.iter().filter_map(Result::ok).collect()))
        })
        .collect()
}

/// Programs the IPv6 half of `model`.
fn load6(model: &Model, ebpf: &mut Ebpf) {
    {
        let mut m = HashMap::<_, u32, Backend6>::try_from(ebpf.map_mut(BACKEND6_MAP).expect("be6 map")).expect("be6 map type");
        for b in model.backends6.values() {
            let v = Backend6 { addr: b.addr.ip().octets(), port_be: b.addr.port().to_be(), proto: b.proto, flags: BACKEND_F_LOCAL * u8::from(b.dev == Dev::Lxc) };
            m.insert(b.id, v, 0).unwrap_or_else(|e| panic!("insert backend {b:?}: {e:?}"));
        }
    }
    let mut m = HashMap::<_, Svc6Key, SvcValue>::try_from(ebpf.map_mut(SVC6_MAP).expect("svc6 map")).expect("svc6 map type");
    for fe in &model.frontends6 {
        let key = |slot: u16| Svc6Key { addr: fe.addr.ip().octets(), port_be: fe.addr.port().to_be(), backend_slot: slot, proto: fe.proto, scope: 0, _pad: [0; 2] };
        for (slot, id) in (1..).zip(&fe.backends) {
            m.insert(key(slot), SvcValue { backend_id: *id, ..Default::default() }, 0).expect("insert slot");
        }
        let head = SvcValue {
            backend_id: fe.group,
            count: u16::try_from(fe.backends.len()).expect("count"),
            flags: fe.flags,
            svc_id: fe.svc_id,
            affinity_timeout_s: fe.affinity_s,
        };
        m.insert(key(0), head, 0).unwrap_or_else(|e| panic!("insert frontend {}: {e:?}", fe.name));
    }
}

fn tcp_udp6(p: u8, src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Frame6 {
    if p == proto::TCP {
        let f = Frame6::tcp(src, dst, flags).with_tcp_seq(1000, if flags & tcp_flags::ACK != 0 { 5001 } else { 0 });
        if flags & tcp_flags::PSH != 0 { f.with_payload(b"GET / HTTP/1.1\r\n\r\n") } else { f }
    } else {
        Frame6::udp(src, dst)
    }
}

/// An ICMPv6 error from `from` to `to` quoting the first `n` bytes of the
/// IPv6 packet `quoted`.
fn icmp6_error_quoting(from: Ipv6Addr, to: Ipv6Addr, ty: u8, quoted: &[u8], n: usize) -> Vec<u8> {
    let rest = if ty == 2 { 1280u32.to_be_bytes() } else { [0; 4] };
    let code = if ty == 1 { 3 } else { 0 };
    Frame6::icmp6(from, to, ty, code, rest, &quoted[..n.min(quoted.len())]).build()
}

/// The IPv6 part of the static corpus.
fn corpus6(model: &Model) -> Vec<Seed> {
    let mut v = Vec::new();
    let tcp_kinds = [tcp_flags::SYN, tcp_flags::ACK | tcp_flags::PSH, tcp_flags::FIN | tcp_flags::ACK, tcp_flags::RST];
    let exts = [
        vec![],
        vec![Ext::HopByHop(vec![5, 2, 0, 0])],
        vec![Ext::HopByHop(vec![]), Ext::DestOpts(vec![1, 4, 0, 0, 0, 0])],
        vec![Ext::Fragment { offset: 0, more: true, id: 7 }],
        vec![Ext::Routing { routing_type: 4, segments_left: 0, addresses: vec![ip6("2001:db8:86dd::99")] }],
    ];
    for fe in &model.frontends6 {
        for (c, dev) in clients6() {
            let kinds: &[u8] = if fe.proto == proto::TCP { &tcp_kinds } else { &[0] };
            for k in kinds {
                for e in &exts {
                    let mut f = tcp_udp6(fe.proto, c, fe.addr, *k);
                    for x in e {
                        f = f.with_ext(x.clone());
                    }
                    let frame = f.build();
                    v.push(seed(frame.clone(), Prog::Ingress, dev));
                    if e.is_empty() {
                        v.push(seed(frame, Prog::IngressL3, Dev::Tun));
                    }
                }
            }
            for id in &fe.backends {
                let be = model.backends6[id];
                // Replies, and an error about the translated packet.
                for k in [tcp_flags::SYN | tcp_flags::ACK, tcp_flags::ACK, tcp_flags::FIN | tcp_flags::ACK] {
                    let r = tcp_udp6(fe.proto, be.addr, c, k).build();
                    v.push(seed(r.clone(), Prog::Ingress, be.dev));
                    v.push(seed(r, Prog::Egress, Dev::Lxc));
                }
                let fwd = tcp_udp6(fe.proto, c, be.addr, tcp_flags::SYN).build();
                v.push(seed(icmp6_error_quoting(ip6("fd00:244:86dd::1"), *c.ip(), 2, &fwd[ETH_HLEN..], 1232), Prog::Ingress, be.dev));
            }
        }
    }
    let mut long = Frame6::tcp(clients6()[0].0, model.frontends6[0].addr, tcp_flags::SYN);
    for _ in 0..7 {
        long = long.with_ext(Ext::DestOpts(vec![]));
    }
    v.push(seed(long.build(), Prog::Ingress, Dev::Ext));
    v.push(seed(Frame6::icmp6(*clients6()[0].0.ip(), *model.frontends6[0].addr.ip(), 128, 0, [0, 1, 0, 1], b"ping").build(), Prog::Ingress, Dev::Ext));
    v
}

/// Frames derived from a translated IPv6 `output` (at `l3`): the reply to
/// it, an ICMPv6 error quoting it, the next packet of the flow.
fn derive6(model: &Model, prog: Prog, input: &[u8], output: &[u8], rng: &mut Rng, out: &mut Vec<Seed>) {
    let l3 = prog.l3();
    let (Some(a), Some(b)) = (input.get(l3..), output.get(l3..)) else { return };
    let Some(w) = walk6(b) else { return };
    if !matches!(w.next, proto::TCP | proto::UDP) || w.first_fragment || !b[40..w.l4].is_empty() && rng.chance(1, 2) {
        return;
    }
    let (src, dst) = (sa6_at(b, 8, w.l4), sa6_at(b, 24, w.l4 + 2));
    let p = w.next;
    let backend = model.backends6.values().find(|x| x.addr == dst);
    if let Some(be) = backend {
        let k = if p == proto::TCP && b[w.l4 + 13] & tcp_flags::SYN != 0 { tcp_flags::SYN | tcp_flags::ACK } else { *rng.pick(&[tcp_flags::ACK, tcp_flags::FIN | tcp_flags::ACK, tcp_flags::RST]) };
        let r = tcp_udp6(p, dst, src, k);
        out.push(seed(r.build(), if rng.chance(1, 4) { Prog::Egress } else { Prog::Ingress }, be.dev));
        out.push(seed(r.build(), Prog::IngressL3, Dev::Tun));
        let ty = *rng.pick(&[1u8, 2, 3]);
        let n = *rng.pick(&[44usize, 48, 60, 1232]);
        out.push(seed(icmp6_error_quoting(ip6("fd00:244:86dd::1"), *src.ip(), ty, b, n), if rng.chance(1, 3) { Prog::Egress } else { Prog::Ingress }, be.dev));
        if let Some(wa) = walk6(a) {
            let (cs, cd) = (sa6_at(a, 8, wa.l4), sa6_at(a, 24, wa.l4 + 2));
            let k = *rng.pick(&[tcp_flags::ACK | tcp_flags::PSH, tcp_flags::FIN | tcp_flags::ACK, tcp_flags::RST, tcp_flags::SYN]);
            out.push(seed(tcp_udp6(p, cs, cd, k).build(), Prog::Ingress, Dev::Ext));
        }
    } else {
        // A reply translated back: an error about it from the client's side.
        let ty = *rng.pick(&[1u8, 2, 3]);
        out.push(seed(icmp6_error_quoting(ip6("2001:db8:86dd::1"), *src.ip(), ty, b, 48), Prog::Ingress, Dev::Ext));
        let k = *rng.pick(&[tcp_flags::ACK, tcp_flags::FIN | tcp_flags::ACK, tcp_flags::RST]);
        out.push(seed(tcp_udp6(p, dst, src, k).build(), Prog::Ingress, Dev::Ext));
    }
}

/// IPv6 mutations (no-ops on other frames): extension headers inserted
/// (up to a chain past the bound, a routing header with segments left, a
/// later fragment, a header the datapath does not walk), a random payload
/// length, a random next header.
fn mutate6(f: &mut Vec<u8>, rng: &mut Rng) {
    const L3: usize = ETH_HLEN;
    if f.len() < L3 + 40 || be16(f, 12) != 0x86dd {
        return;
    }
    match rng.below(3) {
        0 => {
            let count = 1 + rng.below(7);
            let mut hdrs = Vec::new();
            let mut first_next = f[L3 + 6];
            for _ in 0..count {
                let e = match rng.below(6) {
                    0 => {
                        let n = rng.below(14);
                        Ext::HopByHop(rng.bytes(n))
                    }
                    1 => Ext::DestOpts(vec![]),
                    2 => Ext::Routing { routing_type: 4, segments_left: u8::try_from(rng.below(2)).expect("0/1"), addresses: vec![ip6("2001:db8:86dd::99")] },
                    3 => Ext::Fragment { offset: u16::try_from(rng.below(3)).expect("small"), more: rng.chance(1, 2), id: 9 },
                    4 => Ext::Raw { nexthdr: *rng.pick(&[135u8, 139, 253, 51, 50]), body: vec![0; 7] },
                    _ => Ext::DestOpts(rng.bytes(6)),
                };
                hdrs.push(e);
            }
            // Chain them in front of the current first header.
            let mut bytes = Vec::new();
            for (i, e) in hdrs.iter().enumerate() {
                let next = hdrs.get(i + 1).map_or(first_next, Ext::number);
                bytes.extend(e.bytes(next));
            }
            first_next = hdrs[0].number();
            let at = L3 + 40;
            f.splice(at..at, bytes);
            f[L3 + 6] = first_next;
            let plen = u16::try_from(f.len() - L3 - 40).unwrap_or(u16::MAX);
            f[L3 + 4..L3 + 6].copy_from_slice(&plen.to_be_bytes());
        }
        1 => {
            let real = u16::try_from(f.len() - L3 - 40).unwrap_or(u16::MAX);
            let v = match rng.below(3) {
                0 => rng.u16(),
                1 => real.saturating_sub(u16::try_from(rng.below(24)).expect("small")),
                _ => real.wrapping_add(u16::try_from(rng.below(24)).expect("small")),
            };
            f[L3 + 4..L3 + 6].copy_from_slice(&v.to_be_bytes());
        }
        _ => {
            let any = rng.byte();
            f[L3 + 6] = *rng.pick(&[proto::TCP, proto::UDP, 58, 0, 43, 44, 60, 59, any]);
        }
    }
    f.truncate(MAX_FRAME);
}

#[cfg(test)]
mod tests6 {
    //! The IPv6 checker has teeth: a correct translation passes, broken
    //! ones are each rejected (no BPF needed).
    use super::*;

    fn client() -> SocketAddrV6 {
        sa6("2001:db8:86dd::7", 40010)
    }

    fn clusterip6() -> SocketAddrV6 {
        sa6("fd00::10", 80)
    }

    fn check(input: &[u8], verdict: u32, output: &[u8]) -> Result<(), String> {
        let model = Model::standard();
        check_packet_with(&model, Prog::Ingress, input, verdict, output, &|_| None, &|_| None).map(|_| ())
    }

    #[test]
    fn a_correct_dnat_passes_and_broken_ones_do_not() {
        let b1 = sa6("fd00:244:86dd::11", 8080);
        let syn = Frame6::tcp(client(), clusterip6(), tcp_flags::SYN).with_ext(Ext::HopByHop(vec![]));
        let input = syn.build();
        let good = syn.clone().with_dst(b1).build();
        check(&input, TC_ACT_OK, &good).expect("a correct DNAT");
        check(&input, TC_ACT_UNSPEC, &input).expect("passed untouched");
        assert!(check(&input, TC_ACT_UNSPEC, &good).is_err(), "a pass that changed the packet");
        let not_a_backend = syn.clone().with_dst(sa6("fd00:244:86dd::99", 8080)).build();
        assert!(check(&input, TC_ACT_OK, &not_a_backend).is_err(), "DNAT to a non-backend");
        let mut bad_csum = good.clone();
        let l4 = ETH_HLEN + 40 + 8;
        bad_csum[l4 + 17] ^= 1;
        assert!(check(&input, TC_ACT_OK, &bad_csum).is_err(), "checksum broken");
        let mut payload = good.clone();
        payload[ETH_HLEN + 40 + 2] ^= 1;
        assert!(check(&input, TC_ACT_OK, &payload).is_err(), "extension header byte changed");
        let mut hops = good.clone();
        hops[ETH_HLEN + 7] = 1;
        assert!(check(&input, TC_ACT_OK, &hops).is_err(), "hop limit changed by more than one");
        let mut long = Frame6::tcp(client(), clusterip6(), tcp_flags::SYN);
        for _ in 0..7 {
            long = long.with_ext(Ext::DestOpts(vec![]));
        }
        assert!(check(&long.build(), TC_ACT_OK, &long.clone().with_dst(b1).build()).is_err(), "an unwalkable chain translated");
        // A later fragment: TC may readdress it to a backend of the frontend
        // (its first fragment's ports are remembered), nothing more.
        let later = Frame6::udp(client(), clusterip6()).with_ext(Ext::Fragment { offset: 3, more: false, id: 1 }).build();
        // The builder would fill in a checksum; a later fragment has none.
        let readdress = |to: Ipv6Addr| {
            let mut f = later.clone();
            f[ETH_HLEN + 24..ETH_HLEN + 40].copy_from_slice(&to.octets());
            f
        };
        check(&later, TC_ACT_OK, &readdress(*b1.ip())).expect("a later fragment readdressed to a backend");
        assert!(check(&later, TC_ACT_OK, &readdress(ip6("fd00:244:86dd::99"))).is_err(), "a later fragment readdressed to a non-backend");
        let mut data = readdress(*b1.ip());
        let last = data.len() - 1;
        data[last] ^= 1;
        assert!(check(&later, TC_ACT_OK, &data).is_err(), "a later fragment's data changed");
        let model = Model::standard();
        let xdp = check_packet_with(&model, Prog::Xdp, &later, XDP_TX, &readdress(*b1.ip()), &|_| None, &|_| None);
        assert!(xdp.is_err(), "XDP translated a later fragment");
        let zero = Frame6::udp(client(), clusterip6()).with_udp_zero_checksum();
        assert!(check(&zero.build(), TC_ACT_OK, &zero.clone().with_dst(sa6("fd00:244:86dd::11", 8080)).build()).is_err(), "UDP without checksum translated");
    }

    #[test]
    fn rejects_and_replies_are_checked() {
        let b1 = sa6("fd00:244:86dd::11", 8080);
        let reply = Frame6::tcp(b1, client(), tcp_flags::SYN | tcp_flags::ACK);
        check(&reply.build(), TC_ACT_OK, &reply.clone().with_src(clusterip6()).build()).expect("a correct reverse NAT");
        assert!(check(&reply.build(), TC_ACT_OK, &reply.clone().with_src(sa6("fd00::20", 80)).build()).is_err(), "reverse NAT to a frontend without that backend");

        // A reject from the empty frontend, built by hand.
        let empty = sa6("fd00::20", 80);
        let syn = Frame6::tcp(client(), empty, tcp_flags::SYN).build();
        let quote = &syn[ETH_HLEN..ETH_HLEN + 48];
        let err = Frame6::icmp6(*empty.ip(), *client().ip(), 1, 4, [0; 4], quote).with_macs(NODE_MAC, CLIENT_MAC);
        let mut err = err;
        err.flow_label = 0;
        err.hop_limit = 64;
        let out = err.build();
        check(&syn, TC_ACT_REDIRECT, &out).expect("a correct reject");
        let to_full = Frame6::tcp(client(), clusterip6(), tcp_flags::SYN).build();
        let mut wrong = err.clone();
        wrong.src = *clusterip6().ip();
        wrong.payload = to_full[ETH_HLEN..ETH_HLEN + 48].to_vec();
        assert!(check(&to_full, TC_ACT_REDIRECT, &wrong.build()).is_err(), "a reject for a frontend with backends");
        let mut bad = out.clone();
        bad[ETH_HLEN + 42] ^= 1;
        assert!(check(&syn, TC_ACT_REDIRECT, &bad).is_err(), "reject with a bad checksum");
    }
}
