//! The TC programs on IPv6, packet by packet, through `BPF_PROG_TEST_RUN`.
//!
//! The IPv6 twin of `packet.rs`: every test loads its own copy of the
//! embedded object (nothing pinned, nothing attached), fills the IPv6 maps
//! (`proxy_svc6_v1`, `proxy_be6_v1`) as the agent does, runs frames built by
//! `integration_tests::packet6` and checks the verdict, the frame that comes
//! out (byte for byte against a frame built from scratch, and every
//! checksum recomputed by the test), the IPv6 conntrack (`proxy_ct6_v1`,
//! `proxy_ct6_new_v1`) and the exit-reason counters.
//!
//! Needs root (`BPF_PROG_TEST_RUN` on a `sched_cls` program).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
};

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, lpm_trie},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use integration_tests::{
    netns::{Netns, enter, require_root, unique_name},
    packet::{CLIENT_MAC, ETH_HLEN, FrameBuilder, L4, NODE_MAC, hex, nonzero_of_family, parse, skb_ctx, stats_by_reason, stats_of_family, tcp_flags, xdp_md_ctx},
    packet6::{
        Ext, Frame6, IPV6_HLEN, NEXTHDR_ICMPV6, NEXTHDR_MOBILITY, Parsed6, fragment6, icmp6, in_ethernet, l4_checksum6, parse6, parse6_ip,
        reassemble6,
    },
};
use proxy_agent::{
    datapath::ebpf_object,
    pins::{TcHook, XDP_PROG, XDP_TX_MAP},
};
use proxy_common::{
    affinity::{AFFINITY_CLIENT_ADDR6, AFFINITY_MAP, AffinityKey, AffinityValue},
    backend::{BACKEND_F_LOCAL, BACKEND_MAP, BACKEND6_MAP, Backend, Backend6},
    ct::{
        CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_REDIRECT, CT_F_SNAT, CT_MAP, CT_NEW_MAP, CT6_MAP, CT6_NEW_MAP, Ct6Key, Ct6Value, CtKey,
        CtValue, SNAT_PORT_MAX, SNAT_PORT_MIN,
    },
    proto,
    stats::{self, REASONS, StatCounter},
    sock::SOCK_DESTROY6_MAP,
    svc::{
        SRC_RANGE_MAP, SRC_RANGE6_MAP, SVC_FLAG_CLUSTER_IP, SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT,
        SVC_FLAG_SNAT_REMOTE, SVC_FLAG_SOURCE_RANGES, SVC_MAP, SVC6_MAP, SrcRange6Key, SrcRangeKey, Svc6Key, SvcKey, SvcValue,
    },
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// `TC_ACT_UNSPEC` (-1): TCX "next", the pass-through verdict.
const TC_NEXT: u32 = (-1_i32).cast_unsigned();

// ---------------------------------------------------------------------------
// The fixture
// ---------------------------------------------------------------------------

/// Why `86dd` in the client's and backends' addresses: under `test_run` a
/// frame given to an `_l3` program (no Ethernet header) still goes through
/// `eth_type_trans`, which reads `skb->protocol` from bytes 12-13 of what it
/// takes for an Ethernet header — bytes 4-5 of the IPv6 source address. With
/// `86dd` there, the `_l3` program sees IPv6 as it would on a real L3 device.
fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("IPv6 literal")
}

fn sa6(a: &str, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(v6(a), port, 0, 0)
}

fn client() -> SocketAddrV6 {
    sa6("2001:db8:86dd::2", 40000)
}

fn vip() -> SocketAddrV6 {
    sa6("fd00::10", 80)
}

fn empty_vip() -> SocketAddrV6 {
    sa6("fd00::20", 80)
}

const TCP_SVC: u32 = 1;
const UDP_SVC: u32 = 2;

fn tcp_backends() -> Vec<(u32, SocketAddrV6)> {
    vec![(1, sa6("fd00:244:86dd::11", 8080)), (2, sa6("fd00:244:86dd::12", 8080))]
}

fn udp_backends() -> Vec<(u32, SocketAddrV6)> {
    vec![(3, sa6("fd00:244:86dd::11", 8080)), (4, sa6("fd00:244:86dd::12", 8080))]
}

/// An IPv4 frontend in the same object, with ids next to the IPv6 ones.
const VIP4: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const CLIENT4: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 40000);
const VIP4_SVC: u32 = 5;
const VIP4_BACKENDS: [(u32, SocketAddrV4); 1] = [(9, SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 11), 8080))];

fn ingress() -> &'static str {
    TcHook::Ingress.program()
}

fn ingress_l3() -> &'static str {
    TcHook::Ingress.program_l3()
}

fn egress() -> &'static str {
    TcHook::Egress.program()
}

fn be6(a: &Ipv6Addr) -> [u8; 16] {
    a.octets()
}

struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// The object with its TC programs loaded and the maps empty.
    fn empty() -> Self {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert!(euid == 0, "the packet tests use BPF_PROG_TEST_RUN: run them as root (euid is {euid})");
        let mut ebpf = Ebpf::load(ebpf_object()).unwrap_or_else(|e| panic!("loading the embedded eBPF object: {e:?}"));
        for name in [ingress(), ingress_l3(), egress()] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("no program {name}"))
                .try_into()
                .expect("sched_cls");
            prog.load().unwrap_or_else(|e| panic!("loading {name}: {e:?}"));
        }
        Self { ebpf }
    }

    /// `[fd00::10]:80` over TCP and UDP with two backends each.
    fn standard() -> Self {
        let mut dp = Self::empty();
        dp.add_service(vip(), proto::TCP, TCP_SVC, &tcp_backends());
        dp.add_service(vip(), proto::UDP, UDP_SVC, &udp_backends());
        dp
    }

    fn add_backend(&mut self, id: u32, a: SocketAddrV6, proto: u8) {
        let mut m = HashMap::<_, u32, Backend6>::try_from(self.ebpf.map_mut(BACKEND6_MAP).expect("be6 map")).expect("be6 type");
        let b = Backend6 { addr: be6(a.ip()), port_be: a.port().to_be(), proto, flags: 0 };
        m.insert(id, b, 0).unwrap_or_else(|e| panic!("insert backend {id}: {e:?}"));
    }

    /// Slots 1..=n, then slot 0 (the agent's order).
    fn add_frontend(&mut self, fe: SocketAddrV6, proto: u8, svc_id: u32, ids: &[u32], flags: u16, affinity_s: u32) {
        let mut m = HashMap::<_, Svc6Key, SvcValue>::try_from(self.ebpf.map_mut(SVC6_MAP).expect("svc6 map")).expect("svc6 type");
        let key = |slot: u16| Svc6Key { addr: be6(fe.ip()), port_be: fe.port().to_be(), backend_slot: slot, proto, scope: 0, _pad: [0; 2] };
        for (slot, id) in (1..).zip(ids) {
            m.insert(key(slot), SvcValue { backend_id: *id, ..Default::default() }, 0).expect("insert slot");
        }
        let head = SvcValue {
            backend_id: svc_id + 1000,
            count: u16::try_from(ids.len()).expect("count"),
            flags,
            svc_id,
            affinity_timeout_s: affinity_s,
        };
        m.insert(key(0), head, 0).unwrap_or_else(|e| panic!("insert frontend {fe}: {e:?}"));
    }

    fn add_service(&mut self, fe: SocketAddrV6, proto: u8, svc_id: u32, backends: &[(u32, SocketAddrV6)]) {
        for (id, a) in backends {
            self.add_backend(*id, *a, proto);
        }
        let ids: Vec<u32> = backends.iter().map(|(id, _)| *id).collect();
        self.add_frontend(fe, proto, svc_id, &ids, SVC_FLAG_CLUSTER_IP, 0);
    }

    /// The IPv4 frontend [`VIP4`] (TCP, one backend).
    fn add_ipv4_service(&mut self) {
        {
            let mut m = HashMap::<_, u32, Backend>::try_from(self.ebpf.map_mut(BACKEND_MAP).expect("be map")).expect("be type");
            let (id, a) = VIP4_BACKENDS[0];
            let b = Backend { addr_be: u32::from_ne_bytes(a.ip().octets()), port_be: a.port().to_be(), proto: proto::TCP, flags: 0 };
            m.insert(id, b, 0).expect("insert v4 backend");
        }
        let mut m = HashMap::<_, SvcKey, SvcValue>::try_from(self.ebpf.map_mut(SVC_MAP).expect("svc map")).expect("svc type");
        let key = |slot: u16| SvcKey {
            addr_be: u32::from_ne_bytes(VIP4.ip().octets()),
            port_be: VIP4.port().to_be(),
            backend_slot: slot,
            proto: proto::TCP,
            scope: 0,
            _pad: [0; 2],
        };
        m.insert(key(1), SvcValue { backend_id: VIP4_BACKENDS[0].0, ..Default::default() }, 0).expect("slot");
        let head = SvcValue { backend_id: 0, count: 1, flags: SVC_FLAG_CLUSTER_IP, svc_id: VIP4_SVC, affinity_timeout_s: 0 };
        m.insert(key(0), head, 0).expect("frontend");
    }

    /// `loadBalancerSourceRanges` entry `addr/len` of service `svc_id`, as
    /// the agent writes it.
    fn add_range6(&mut self, svc_id: u32, addr: Ipv6Addr, len: u8) {
        let mut m = LpmTrie::<_, SrcRange6Key, u32>::try_from(self.ebpf.map_mut(SRC_RANGE6_MAP).expect("range6 map")).expect("lpm type");
        let key = lpm_trie::Key::new(32 + u32::from(len), SrcRange6Key { svc_id_be: svc_id.to_be(), addr: addr.octets() });
        m.insert(&key, 1, 0).unwrap_or_else(|e| panic!("insert range {addr}/{len}: {e:?}"));
    }

    /// Runs program `prog` once: (verdict, output).
    fn run_on(&self, prog: &str, input: &[u8]) -> (u32, Vec<u8>) {
        self.run_with(prog, input, None)
    }

    /// [`Datapath::run_on`], the packet arriving on device `ifindex` of the
    /// calling thread's namespace (FIB lookups see that node).
    fn run_with(&self, prog: &str, input: &[u8], ifindex: Option<u32>) -> (u32, Vec<u8>) {
        let p: &SchedClassifier = self.ebpf.program(prog).expect("program").try_into().expect("sched_cls");
        let mut out = vec![0u8; input.len() + 512];
        let ctx = ifindex.map(skb_ctx);
        let r = p
            .test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ctx_in: ctx.as_deref(), ..Default::default() })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {prog} failed: {e:?}\ninput:\n{}", hex(input)));
        out.truncate(usize::try_from(r.data_size_out).expect("size"));
        (r.return_value, out)
    }

    fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(ingress(), input)
    }

    /// Runs a frame that must be translated (`TC_ACT_OK`, every checksum
    /// valid); returns the output and its parse.
    fn run_translated(&self, input: &[u8]) -> (Vec<u8>, Parsed6) {
        let (verdict, out) = self.run(input);
        assert_eq!(verdict, TC_ACT_OK, "verdict\ninput:\n{}\noutput:\n{}", hex(input), hex(&out));
        let p = parse6(&out).unwrap_or_else(|e| panic!("output does not parse: {e}\n{}", hex(&out)));
        p.verify_checksums().unwrap_or_else(|e| panic!("{e}\noutput:\n{}", hex(&out)));
        (out, p)
    }

    fn stats(&self) -> BTreeMap<u32, StatCounter> {
        stats_by_reason(&self.ebpf)
    }

    /// Exactly these reasons counted these packets, every other none; all
    /// of them in the IPv6 counters, none in the IPv4 or family-less ones.
    fn check_stats(&self, expected: &[(u32, u64)]) {
        for family in [stats::FAMILY_IPV4, stats::FAMILY_OTHER] {
            let moved = nonzero_of_family(&self.ebpf, family);
            assert!(moved.is_empty(), "IPv6 packets counted under family {family}: {moved:?}");
        }
        let got = stats_of_family(&self.ebpf, stats::FAMILY_IPV6);
        let errors: Vec<String> = REASONS
            .iter()
            .filter_map(|(idx, name)| {
                let want = expected.iter().find(|(r, _)| r == idx).map_or(0, |(_, n)| *n);
                (got[idx].packets != want).then(|| format!("{name}: {} packets, expected {want}", got[idx].packets))
            })
            .collect();
        assert!(errors.is_empty(), "counters: {}", errors.join("; "));
    }

    /// Both IPv6 conntrack tables.
    fn ct6(&self) -> Vec<(Ct6Key, Ct6Value)> {
        [CT6_MAP, CT6_NEW_MAP]
            .into_iter()
            .flat_map(|name| {
                let m = HashMap::<_, Ct6Key, Ct6Value>::try_from(self.ebpf.map(name).expect("ct6 map")).expect("ct6 type");
                m.iter().map(|r| r.expect("read ct6")).collect::<Vec<_>>()
            })
            .collect()
    }

    fn ct6_get(&self, k: &Ct6Key) -> Option<Ct6Value> {
        [CT6_MAP, CT6_NEW_MAP].into_iter().find_map(|name| {
            let m = HashMap::<_, Ct6Key, Ct6Value>::try_from(self.ebpf.map(name).expect("ct6 map")).expect("ct6 type");
            m.get(k, 0).ok()
        })
    }

    /// Both IPv4 conntrack tables' entries.
    fn ct4_len(&self) -> usize {
        [CT_MAP, CT_NEW_MAP]
            .into_iter()
            .map(|name| HashMap::<_, CtKey, CtValue>::try_from(self.ebpf.map(name).expect("ct map")).expect("ct type").keys().count())
            .sum()
    }
}

fn ct6_key(src: SocketAddrV6, dst: SocketAddrV6, proto: u8, dir: u8) -> Ct6Key {
    Ct6Key { saddr: be6(src.ip()), daddr: be6(dst.ip()), sport_be: src.port().to_be(), dport_be: dst.port().to_be(), proto, dir, _pad: [0; 2] }
}

/// The two entries of a new flow `client` → `fe` sent to backend `(id, at)`,
/// and no others.
fn check_flow(dp: &Datapath, client: SocketAddrV6, fe: SocketAddrV6, proto: u8, svc_id: u32, (id, at): (u32, SocketAddrV6)) {
    let fwd = dp.ct6_get(&ct6_key(client, fe, proto, CT_DIR_SERVICE)).unwrap_or_else(|| panic!("no SERVICE entry for {client} -> {fe}"));
    let rev = dp.ct6_get(&ct6_key(at, client, proto, CT_DIR_REPLY)).unwrap_or_else(|| panic!("no REPLY entry for {at} -> {client}"));
    for (what, v, to) in [("SERVICE", fwd, at), ("REPLY", rev, fe)] {
        assert_eq!(v.nat_addr, be6(to.ip()), "{what} entry translates to {:?}", Ipv6Addr::from(v.nat_addr));
        assert_eq!(v.nat_port_be, to.port().to_be(), "{what} entry port");
        assert_eq!((v.backend_id, v.svc_id), (id, svc_id), "{what} entry backend/service");
        assert_eq!((v.snat_addr, v.snat_port_be), ([0; 16], 0), "{what} entry has SNAT");
        assert!(v.last_seen_ns != 0, "{what} entry without a time");
    }
    assert_ne!(fwd.slot, 0, "SERVICE entry without its slot");
    assert_eq!(rev.slot, 0, "REPLY entry with a slot");
    assert_eq!(dp.ct6().len(), 2, "conntrack entries: {:?}", dp.ct6());
}

fn backend_of(dst: SocketAddrV6, backends: &[(u32, SocketAddrV6)]) -> Option<u32> {
    backends.iter().find(|(_, a)| *a == dst).map(|(id, _)| *id)
}

fn syn() -> Frame6 {
    Frame6::tcp(client(), vip(), tcp_flags::SYN)
}

fn udp() -> Frame6 {
    Frame6::udp(client(), vip())
}

/// Sends the first packet of a flow; returns the backend it went to.
fn open_flow(dp: &Datapath, first: &Frame6, backends: &[(u32, SocketAddrV6)]) -> (u32, SocketAddrV6) {
    let (_, p) = dp.run_translated(&first.build());
    let dst = p.dst_sa();
    (backend_of(dst, backends).unwrap_or_else(|| panic!("first packet sent to {dst}, not a backend")), dst)
}

// ---------------------------------------------------------------------------
// DNAT
// ---------------------------------------------------------------------------

#[test]
fn tcp_and_udp_to_a_frontend_are_dnated_with_valid_checksums() {
    for (name, first, backends, svc, p) in [
        ("TCP SYN", syn(), tcp_backends(), TCP_SVC, proto::TCP),
        ("TCP SYN with payload", syn().with_payload(&[7; 33]), tcp_backends(), TCP_SVC, proto::TCP),
        ("UDP", udp(), udp_backends(), UDP_SVC, proto::UDP),
        ("UDP, odd length", udp().with_payload(b"odd"), udp_backends(), UDP_SVC, proto::UDP),
    ] {
        let dp = Datapath::standard();
        let input = first.build();
        let (out, parsed) = dp.run_translated(&input);
        let at = parsed.dst_sa();
        let id = backend_of(at, &backends).unwrap_or_else(|| panic!("{name}: sent to {at}, not a backend"));
        // Everything but the destination (and so the checksum) as built.
        let want = first.clone().with_dst(at).build();
        assert!(out == want, "{name}: output differs from the input DNATed to {at}\nexpected:\n{}\noutput:\n{}", hex(&want), hex(&out));
        check_flow(&dp, client(), vip(), p, svc, (id, at));
        dp.check_stats(&[(stats::DNAT_NEW, 1)]);
        assert_eq!(dp.stats()[&stats::DNAT_NEW].bytes, input.len() as u64, "{name}: bytes counted");
    }
}

/// `prefix` and two payload bytes that make the UDP checksum of `src` →
/// `dst` compute to 0: the datapath must send 0xffff (0 is invalid in IPv6).
fn zero_checksum_payload(src: SocketAddrV6, dst: SocketAddrV6, prefix: &[u8]) -> Vec<u8> {
    assert!(prefix.len().is_multiple_of(2), "the two bytes must be a word");
    let mut payload = prefix.to_vec();
    payload.extend_from_slice(&[0, 0]);
    let probe = Frame6::udp(src, dst).with_payload(&payload).with_udp_zero_checksum().build_ip();
    let seg = &probe[IPV6_HLEN..];
    let r = l4_checksum6(*src.ip(), *dst.ip(), proto::UDP, seg);
    // Adding `r` as a word makes the sum 0xffff: the checksum computes to 0.
    let n = payload.len();
    payload[n - 2..].copy_from_slice(&r.to_be_bytes());
    payload
}

#[test]
fn a_udp_checksum_that_computes_to_zero_goes_out_as_ffff() {
    let backend = sa6("fd00:244:86dd::13", 53);
    let dns = sa6("fd00::53", 53);
    let mut dp = Datapath::empty();
    dp.add_service(dns, proto::UDP, 7, &[(7, backend)]);
    let first = Frame6::udp(client(), dns).with_payload(&zero_checksum_payload(client(), backend, &[]));
    let (out, p) = dp.run_translated(&first.build());
    assert_eq!(p.dst_sa(), backend);
    assert_eq!(p.checksum_field(), Some(0xffff), "translated UDP checksum\n{}", hex(&out));
}

#[test]
fn extension_headers_are_skipped_and_the_rewrite_lands_after_them() {
    let chains: Vec<(&str, Vec<Ext>)> = vec![
        ("hop-by-hop + destination options", vec![Ext::HopByHop(vec![5, 2, 0, 0]), Ext::DestOpts(vec![1, 4, 0, 0, 0, 0])]),
        ("hop-by-hop, routing (no segments left), destination options", vec![
            Ext::HopByHop(vec![]),
            Ext::Routing { routing_type: 4, segments_left: 0, addresses: vec![v6("2001:db8::99")] },
            Ext::DestOpts(vec![]),
        ]),
        ("an atomic fragment (offset 0, no more fragments)", vec![Ext::Fragment { offset: 0, more: false, id: 0x1234_5678 }]),
        ("six destination options (the bound)", vec![Ext::DestOpts(vec![]); 6]),
        ("a long hop-by-hop (40 bytes of options)", vec![Ext::HopByHop(vec![0x1e, 38].into_iter().chain([0; 38]).collect())]),
    ];
    for (name, chain) in chains {
        for (first, backends) in [(syn(), tcp_backends()), (udp(), udp_backends())] {
            let mut first = first;
            for e in &chain {
                first = first.with_ext(e.clone());
            }
            let dp = Datapath::standard();
            let input = first.build();
            let (out, p) = dp.run_translated(&input);
            assert_eq!(p.ext.len(), chain.len(), "{name}: extension headers in the output");
            let at = p.dst_sa();
            assert!(backend_of(at, &backends).is_some(), "{name}: sent to {at}");
            let want = first.clone().with_dst(at).build();
            assert!(out == want, "{name}: output differs from the input DNATed to {at}\nexpected:\n{}\noutput:\n{}", hex(&want), hex(&out));
            dp.check_stats(&[(stats::DNAT_NEW, 1)]);
        }
    }
}

/// A fragment after the first of a UDP datagram from `src` to `dst`:
/// `data` after a Fragment header (no UDP header).
fn later_fragment(src: SocketAddrV6, dst: SocketAddrV6, offset: u16, more: bool, id: u32, data: &[u8]) -> Frame6 {
    let mut f = Frame6::udp(src, dst).with_payload(data).with_ext(Ext::Fragment { offset, more, id });
    f.l4 = L4::Other { proto: proto::UDP };
    f
}

/// `frame` with its source or destination address replaced, nothing else
/// (a later fragment holds no checksum that covers them).
fn with_addr(frame: &[u8], at: usize, a: &Ipv6Addr) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[ETH_HLEN + at..ETH_HLEN + at + 16].copy_from_slice(&a.octets());
    f
}

/// The later fragments of a datagram follow its first (remembered in
/// `proxy_frag6_v1` by source, destination, identification and protocol):
/// same backend, only the destination address rewritten. Fragments of a
/// datagram whose first fragment was not seen pass untouched.
#[test]
fn later_fragments_follow_their_first_fragment() {
    let dp = Datapath::standard();
    let first = udp().with_payload(&[3; 64]).with_ext(Ext::Fragment { offset: 0, more: true, id: 77 });
    let (out, p) = dp.run_translated(&first.build());
    let at = p.dst_sa();
    assert!(backend_of(at, &udp_backends()).is_some(), "first fragment to {at}\n{}", hex(&out));
    for (what, later) in [
        ("middle", later_fragment(client(), vip(), 9, true, 77, &[4; 72])),
        ("last", later_fragment(client(), vip(), 18, false, 77, &[5; 13])),
        ("behind a hop-by-hop header", {
            let mut f = udp().with_payload(&[6; 8]).with_ext(Ext::HopByHop(vec![])).with_ext(Ext::Fragment { offset: 27, more: false, id: 77 });
            f.l4 = L4::Other { proto: proto::UDP };
            f
        }),
    ] {
        let input = later.build();
        let (verdict, out) = dp.run(&input);
        assert_eq!(verdict, TC_ACT_OK, "{what} fragment verdict\n{}", hex(&out));
        let want = with_addr(&input, 24, at.ip());
        assert!(out == want, "{what} fragment: only the destination rewritten\nexpected\n{}\noutput\n{}", hex(&want), hex(&out));
    }
    for (what, later) in [
        ("another identification", later_fragment(client(), vip(), 9, false, 78, &[4; 8])),
        ("another source", later_fragment(sa6("2001:db8:86dd::3", 40000), vip(), 9, false, 77, &[4; 8])),
        ("TCP with the same identification", {
            let mut f = later_fragment(client(), vip(), 9, false, 77, &[4; 8]);
            f.l4 = L4::Other { proto: proto::TCP };
            f
        }),
        ("of another upper layer (ESP)", {
            let mut f = later_fragment(client(), vip(), 9, false, 77, &[4; 8]);
            f.l4 = L4::Other { proto: 50 };
            f
        }),
    ] {
        let input = later.build();
        let (verdict, out) = dp.run(&input);
        assert_eq!(verdict, TC_NEXT, "{what}: verdict");
        assert_eq!(out, input, "{what}: passed untouched");
    }
    dp.check_stats(&[(stats::DNAT_NEW, 1), (stats::FRAGMENT_TRANSLATED, 3), (stats::PASS_FRAGMENT, 4)]);
}

/// A 1,200-byte datagram in fragments both ways, each fragment through the
/// datapath on its own: the fragments put back together hold the datagram
/// with the translated addresses and a valid UDP checksum (the first
/// fragment's update covers the whole datagram); the backend's fragmented
/// answer gets the frontend as source, on ingress and on egress alike.
#[test]
fn a_datagram_in_fragments_is_translated_both_ways() {
    let dp = Datapath::standard();
    let data: Vec<u8> = (0..=255).cycle().take(1200).collect();
    let frags = fragment6(&udp().with_payload(&data).build_ip(), 0x8765_4321, 512);
    assert_eq!(frags.len(), 3);
    let out: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| {
            let (verdict, out) = dp.run(&in_ethernet(f));
            assert_eq!(verdict, TC_ACT_OK, "verdict\n{}", hex(&out));
            out[ETH_HLEN..].to_vec()
        })
        .collect();
    let (src, dst, upper, seg) = reassemble6(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((src, upper), (*client().ip(), proto::UDP));
    let at = SocketAddrV6::new(dst, u16::from_be_bytes([seg[2], seg[3]]), 0, 0);
    assert!(backend_of(at, &udp_backends()).is_some(), "datagram sent to {at}, not a backend");
    assert_eq!(l4_checksum6(src, dst, upper, &seg), 0, "UDP checksum of the reassembled datagram");
    assert_eq!(seg[8..], data[..], "payload");

    let answer: Vec<u8> = data.iter().rev().copied().collect();
    let reply = Frame6::udp(at, client()).with_payload(&answer).build_ip();
    for prog in [ingress(), egress()] {
        let out: Vec<Vec<u8>> = fragment6(&reply, 0x0bad_cafe, 256)
            .iter()
            .map(|f| {
                let (verdict, out) = dp.run_on(prog, &in_ethernet(f));
                assert_eq!(verdict, TC_ACT_OK, "{prog}: reply verdict\n{}", hex(&out));
                out[ETH_HLEN..].to_vec()
            })
            .collect();
        let (src, dst, upper, seg) = reassemble6(&out).unwrap_or_else(|e| panic!("{prog}: {e}"));
        assert_eq!((src, dst, u16::from_be_bytes([seg[0], seg[1]])), (*vip().ip(), *client().ip(), vip().port()), "{prog}: reply");
        assert_eq!(l4_checksum6(src, dst, upper, &seg), 0, "{prog}: UDP checksum of the reassembled reply");
        assert_eq!(seg[8..], answer[..], "{prog}: reply payload");
    }
    // Datagram: 1 new flow + 2 later fragments; reply (5 fragments), twice:
    // 1 + 4 each.
    dp.check_stats(&[(stats::DNAT_NEW, 1), (stats::FRAGMENT_TRANSLATED, 2 + 2 * 4), (stats::REV_NAT, 2)]);
}

// ---------------------------------------------------------------------------
// Packets passed untouched
// ---------------------------------------------------------------------------

/// Runs `input` on a fresh standard datapath: passed byte for byte,
/// counted once under `reason`, no conntrack entry.
fn check_passes(name: &str, input: &[u8], reason: u32) {
    let dp = Datapath::standard();
    let (verdict, out) = dp.run(input);
    assert_eq!(verdict, TC_NEXT, "{name}: verdict\n{}", hex(input));
    assert_eq!(out, input, "{name}: passed frame changed");
    assert!(dp.ct6().is_empty(), "{name}: conntrack written");
    let want = REASONS.iter().find(|(i, _)| *i == reason).expect("reason").1;
    assert_eq!(nonzero_of_family(&dp.ebpf, stats::FAMILY_IPV6), [(want, 1)], "{name}: counted as IPv6");
    for family in [stats::FAMILY_IPV4, stats::FAMILY_OTHER] {
        assert_eq!(nonzero_of_family(&dp.ebpf, family), [], "{name}: counted under family {family}");
    }
}

#[test]
fn unwalkable_extension_chains_pass_untouched_and_are_counted() {
    let ext = stats::PASS_IPV6_EXT;
    let mut seven = syn();
    for _ in 0..7 {
        seven = seven.with_ext(Ext::DestOpts(vec![]));
    }
    check_passes("seven destination-options headers (one past the bound)", &seven.build(), ext);
    let mut long = udp().with_ext(Ext::HopByHop(vec![]));
    for _ in 0..6 {
        long = long.with_ext(Ext::DestOpts(vec![1, 2, 0, 0]));
    }
    check_passes("hop-by-hop then six destination options", &long.build(), ext);
    check_passes(
        "a routing header with segments left (the destination is not the final one)",
        &syn().with_ext(Ext::Routing { routing_type: 4, segments_left: 1, addresses: vec![v6("2001:db8::99")] }).build(),
        ext,
    );
    check_passes(
        "a mobility header (not walked)",
        &syn().with_ext(Ext::Raw { nexthdr: NEXTHDR_MOBILITY, body: vec![0, 0, 0, 0, 0, 0, 0] }).build(),
        ext,
    );
}

#[test]
fn other_ipv6_packets_pass_untouched_and_are_counted() {
    let mut to_nowhere = syn();
    to_nowhere.dst = v6("fd00::99");
    check_passes("TCP to an address that is no frontend", &to_nowhere.build(), stats::PASS_NOT_IPV4);
    check_passes("TCP to the frontend on another port", &syn().with_dst(sa6("fd00::10", 81)).build(), stats::PASS_NOT_IPV4);
    check_passes(
        "a reply-shaped packet from a backend without a flow",
        &Frame6::tcp(tcp_backends()[0].1, client(), tcp_flags::SYN | tcp_flags::ACK).build(),
        stats::PASS_NOT_IPV4,
    );
    check_passes(
        "ICMPv6 echo request to the frontend",
        &Frame6::icmp6(*client().ip(), *vip().ip(), icmp6::ECHO_REQUEST, 0, [0, 1, 0, 1], b"ping").build(),
        stats::PASS_OTHER_PROTO,
    );
    let mut esp = syn();
    esp.l4 = integration_tests::packet::L4::Other { proto: 50 };
    let esp = esp.with_payload(&[0; 24]);
    check_passes("ESP to the frontend", &esp.build(), stats::PASS_OTHER_PROTO);
    check_passes("UDP without a checksum (invalid in IPv6)", &udp().with_udp_zero_checksum().build(), stats::MALFORMED_UDP6_NO_CSUM);
    let mut short = udp();
    short.payload_len = Some(6);
    check_passes("payload length ends inside the UDP header", &short.build(), stats::MALFORMED_TRUNCATED);
    let cut = syn().build();
    check_passes("TCP header cut at 10 bytes", &cut[..ETH_HLEN + IPV6_HLEN + 10], stats::MALFORMED_TRUNCATED);
    let mut v4_in_v6 = syn().build();
    v4_in_v6[ETH_HLEN] = 0x45;
    check_passes("version 4 behind the IPv6 ethertype", &v4_in_v6, stats::MALFORMED_BAD_IHL);
    let cut_ext = syn().with_ext(Ext::HopByHop(vec![0x1e, 38].into_iter().chain([0; 38]).collect())).build();
    check_passes("hop-by-hop header cut short", &cut_ext[..ETH_HLEN + IPV6_HLEN + 20], stats::MALFORMED_TRUNCATED);
}

// ---------------------------------------------------------------------------
// Replies, flows, balance
// ---------------------------------------------------------------------------

#[test]
fn replies_get_the_frontend_as_source_on_every_program() {
    for (name, first, backends) in [("TCP", syn(), tcp_backends()), ("UDP", udp(), udp_backends())] {
        let dp = Datapath::standard();
        let (_, at) = open_flow(&dp, &first, &backends);
        let replies: Vec<Frame6> = if first.l4.proto() == proto::TCP {
            vec![
                Frame6::tcp(at, client(), tcp_flags::SYN | tcp_flags::ACK).with_tcp_seq(5000, 1001),
                Frame6::tcp(at, client(), tcp_flags::ACK | tcp_flags::PSH).with_tcp_seq(5001, 1001).with_payload(b"HTTP/1.1 200 OK\r\n\r\n"),
                Frame6::tcp(at, client(), tcp_flags::ACK).with_tcp_seq(5020, 1001).with_ext(Ext::DestOpts(vec![])),
            ]
        } else {
            // At least 6 payload bytes: `BPF_PROG_TEST_RUN` wants 14 + 40
            // bytes of a packet it takes for IPv6, even for an `_l3` program.
            vec![
                Frame6::udp(at, client()).with_payload(b"answer"),
                // The checksum computes to 0 once the source is the frontend.
                Frame6::udp(at, client()).with_payload(&zero_checksum_payload(vip(), client(), b"0123")),
            ]
        };
        let mut n = 0;
        for reply in &replies {
            let reply = reply.clone().with_macs(NODE_MAC, CLIENT_MAC);
            let want = reply.clone().with_src(vip());
            for prog in [ingress(), ingress_l3(), egress()] {
                let l3 = prog == ingress_l3();
                let input = if l3 { reply.build_ip() } else { reply.build() };
                let (verdict, out) = dp.run_on(prog, &input);
                assert_eq!(verdict, TC_ACT_OK, "{name} on {prog}: verdict\n{}", hex(&out));
                let (p, want) = if l3 { (parse6_ip(&out), want.build_ip()) } else { (parse6(&out), want.build()) };
                let p = p.unwrap_or_else(|e| panic!("{name} on {prog}: {e}"));
                p.verify_checksums().unwrap_or_else(|e| panic!("{name} on {prog}: {e}\n{}", hex(&out)));
                assert!(out == want, "{name} on {prog}: reply differs from the input with source {}\nexpected:\n{}\noutput:\n{}", vip(), hex(&want), hex(&out));
                n += 1;
            }
        }
        dp.check_stats(&[(stats::DNAT_NEW, 1), (stats::REV_NAT, n)]);
    }
}

#[test]
fn a_flow_keeps_its_backend_and_new_flows_are_spread() {
    let dp = Datapath::standard();
    let (id, at) = open_flow(&dp, &syn(), &tcp_backends());
    let reply = Frame6::tcp(at, client(), tcp_flags::SYN | tcp_flags::ACK).with_tcp_seq(5000, 1001).build();
    assert_eq!(dp.run(&reply).0, TC_ACT_OK);
    for i in 0..20u32 {
        let pkt = Frame6::tcp(client(), vip(), tcp_flags::ACK | tcp_flags::PSH).with_tcp_seq(1001 + i, 5001).with_payload(b"data");
        let (_, p) = dp.run_translated(&pkt.build());
        assert_eq!(p.dst_sa(), at, "packet {i} of the flow went elsewhere");
    }
    check_flow(&dp, client(), vip(), proto::TCP, TCP_SVC, (id, at));
    let confirmed = HashMap::<_, Ct6Key, Ct6Value>::try_from(dp.ebpf.map(CT6_MAP).expect("ct6")).expect("type").keys().count();
    assert_eq!(confirmed, 2, "the flow is confirmed (its reply was seen, then the client again)");
    dp.check_stats(&[(stats::DNAT_NEW, 1), (stats::REV_NAT, 1), (stats::DNAT_ESTABLISHED, 20), (stats::CT_CONFIRMED, 1)]);

    // Many new flows: both backends get some.
    let dp = Datapath::standard();
    let mut seen = BTreeSet::new();
    for port in 0..64u16 {
        let c = SocketAddrV6::new(*client().ip(), 30000 + port, 0, 0);
        let (_, p) = dp.run_translated(&Frame6::tcp(c, vip(), tcp_flags::SYN).build());
        seen.insert(backend_of(p.dst_sa(), &tcp_backends()).expect("a backend"));
    }
    assert_eq!(seen.len(), 2, "64 new flows all went to backends {seen:?}");
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend() {
    let mut dp = Datapath::empty();
    for (id, a) in tcp_backends() {
        dp.add_backend(id, a, proto::TCP);
    }
    dp.add_frontend(vip(), proto::TCP, TCP_SVC, &[1, 2], SVC_FLAG_CLUSTER_IP, 600);
    let (_, first) = open_flow(&dp, &syn(), &tcp_backends());
    for port in 1..16u16 {
        let c = SocketAddrV6::new(*client().ip(), 40000 + port, 0, 0);
        let (_, p) = dp.run_translated(&Frame6::tcp(c, vip(), tcp_flags::SYN).build());
        assert_eq!(p.dst_sa(), first, "new flow {port} of the same client left its backend");
    }
    let aff = HashMap::<_, AffinityKey, AffinityValue>::try_from(dp.ebpf.map(AFFINITY_MAP).expect("affinity")).expect("type");
    let keys: Vec<AffinityKey> = aff.keys().map(|k| k.expect("key")).collect();
    assert_eq!(keys.len(), 1, "one affinity entry: {keys:?}");
    assert_eq!(keys[0].client_kind, AFFINITY_CLIENT_ADDR6);
    assert_eq!(keys[0].group, TCP_SVC + 1000);
}

// ---------------------------------------------------------------------------
// Frontends without backends
// ---------------------------------------------------------------------------

/// The ICMPv6 destination unreachable (port) the datapath must build for
/// `input` (an Ethernet frame, or a bare IPv6 packet with `l3`).
fn check_port_unreachable(input: &[u8], out: &[u8], l3: bool) {
    let off = if l3 { 0 } else { ETH_HLEN };
    let orig = parse6_ip(&input[off..]).expect("input");
    let p = parse6_ip(&out[off..]).unwrap_or_else(|e| panic!("reject does not parse: {e}\n{}", hex(out)));
    if !l3 {
        assert_eq!(out[0..6], input[6..12], "destination MAC: the sender's");
        assert_eq!(out[6..12], input[0..6], "source MAC: the node's");
        assert_eq!(out[12..14], [0x86, 0xdd], "ethertype");
    }
    assert_eq!(p.src, orig.dst, "ICMPv6 from {}, expected the frontend {}", p.src, orig.dst);
    assert_eq!(p.dst, orig.src, "ICMPv6 to {}, expected the client {}", p.dst, orig.src);
    assert_eq!((p.upper, p.ext.len()), (NEXTHDR_ICMPV6, 0), "an ICMPv6 message without extension headers");
    assert_eq!(p.hop_limit, 64);
    assert_eq!(out[off] >> 4, 6);
    p.verify_checksums().unwrap_or_else(|e| panic!("{e}\n{}", hex(out)));
    let seg = &p.segment;
    assert_eq!((seg[0], seg[1]), (icmp6::DEST_UNREACH, icmp6::PORT_UNREACH), "ICMPv6 type/code");
    assert_eq!(seg[4..8], [0; 4], "unused bytes");
    // The quote: the IPv6 header, the extension headers and 8 bytes of L4.
    let quote_len = orig.upper_off + 8;
    let quote = &input[off..off + quote_len];
    assert_eq!(&seg[8..], quote, "quote");
    assert_eq!(out.len(), off + IPV6_HLEN + 8 + quote_len, "reject length");
}

#[test]
fn a_frontend_without_backends_rejects_with_icmpv6_port_unreachable() {
    for (name, frame) in [
        ("TCP SYN", Frame6::tcp(client(), empty_vip(), tcp_flags::SYN)),
        ("UDP", Frame6::udp(client(), empty_vip()).with_payload(&[5; 100])),
        ("TCP SYN behind a hop-by-hop header", Frame6::tcp(client(), empty_vip(), tcp_flags::SYN).with_ext(Ext::HopByHop(vec![5, 2, 0, 0]))),
    ] {
        for prog in [ingress(), ingress_l3()] {
            let l3 = prog == ingress_l3();
            let mut dp = Datapath::standard();
            dp.add_frontend(empty_vip(), proto::TCP, 10, &[], SVC_FLAG_CLUSTER_IP, 0);
            dp.add_frontend(empty_vip(), proto::UDP, 11, &[], SVC_FLAG_CLUSTER_IP, 0);
            let input = if l3 { frame.build_ip() } else { frame.build() };
            let (verdict, out) = dp.run_on(prog, &input);
            assert_eq!(verdict, TC_ACT_REDIRECT, "{name} on {prog}: verdict\n{}", hex(&out));
            check_port_unreachable(&input, &out, l3);
            dp.check_stats(&[(stats::REJECT_NO_BACKEND, 1)]);
            assert!(dp.ct6().is_empty(), "{name}: a reject records no flow");
        }
    }
}

#[test]
fn a_frontend_with_only_remote_endpoints_drops() {
    for frame in [Frame6::tcp(client(), empty_vip(), tcp_flags::SYN), Frame6::udp(client(), empty_vip())] {
        let mut dp = Datapath::standard();
        dp.add_frontend(empty_vip(), frame.l4.proto(), 10, &[], SVC_FLAG_CLUSTER_IP | SVC_FLAG_DROP_WHEN_EMPTY, 0);
        let input = frame.build();
        let (verdict, out) = dp.run(&input);
        assert_eq!((verdict, &out), (TC_ACT_SHOT, &input));
        dp.check_stats(&[(stats::DROP_NO_LOCAL_BACKEND, 1)]);
    }
}

// ---------------------------------------------------------------------------
// ICMPv6 errors about translated flows
// ---------------------------------------------------------------------------

#[test]
fn icmpv6_errors_about_a_translated_flow_are_translated_back() {
    for (ty, code, rest) in [
        (icmp6::PKT_TOOBIG, 0, 1280u32.to_be_bytes()),
        (icmp6::DEST_UNREACH, 3, [0; 4]),
        (icmp6::TIME_EXCEED, 0, [0; 4]),
    ] {
        let dp = Datapath::standard();
        let first = syn().with_payload(&[1; 40]);
        let (sent, p) = dp.run_translated(&first.build());
        let at = p.dst_sa();
        // A router between the node and the backend complains to the
        // client about the packet as translated.
        let router = v6("fd00:244:86dd::1");
        let quoted = &sent[ETH_HLEN..ETH_HLEN + IPV6_HLEN + 28];
        let err = Frame6::icmp6(router, *client().ip(), ty, code, rest, quoted);
        let (verdict, out) = dp.run(&err.build());
        assert_eq!(verdict, TC_ACT_OK, "type {ty}: verdict\n{}", hex(&out));
        let o = parse6(&out).expect("output");
        o.verify_checksums().unwrap_or_else(|e| panic!("type {ty}: {e}\n{}", hex(&out)));
        // What the client sent, quoted back to it; the quoted TCP checksum
        // stays the translated packet's (no receiver checks it, as for IPv4).
        let original = first.build();
        let mut quote = original[ETH_HLEN..ETH_HLEN + IPV6_HLEN + 28].to_vec();
        quote[IPV6_HLEN + 16..IPV6_HLEN + 18].copy_from_slice(&quoted[IPV6_HLEN + 16..IPV6_HLEN + 18]);
        let want = Frame6::icmp6(router, *client().ip(), ty, code, rest, &quote).build();
        assert!(out == want, "type {ty}: the quote is not what the client sent\nexpected:\n{}\noutput:\n{}", hex(&want), hex(&out));
        assert_ne!(at, vip());
        // The same error sent by the node itself (it forwards the
        // translated packet, and answers it), on its way out.
        let (verdict, out) = dp.run_on(egress(), &err.build());
        assert!(verdict == TC_ACT_OK && out == want, "type {ty} at egress: verdict {verdict}\n{}", hex(&out));

        // An error about the reply (frontend → client), from the client's
        // side: readdressed to the backend, quoting what the backend sent.
        let reply = Frame6::tcp(at, client(), tcp_flags::SYN | tcp_flags::ACK).with_tcp_seq(5000, 1001);
        let (translated, _) = dp.run_translated(&reply.build());
        let near_client = v6("2001:db8:86dd::1");
        let err = Frame6::icmp6(near_client, *vip().ip(), ty, code, rest, &translated[ETH_HLEN..ETH_HLEN + IPV6_HLEN + 20]);
        let (verdict, out) = dp.run(&err.build());
        assert_eq!(verdict, TC_ACT_OK, "type {ty} about the reply: verdict\n{}", hex(&out));
        let o = parse6(&out).expect("output");
        o.verify_checksums().unwrap_or_else(|e| panic!("type {ty} about the reply: {e}\n{}", hex(&out)));
        let backend_sent = reply.build();
        let mut quote = backend_sent[ETH_HLEN..ETH_HLEN + IPV6_HLEN + 20].to_vec();
        quote[IPV6_HLEN + 16..IPV6_HLEN + 18].copy_from_slice(&translated[ETH_HLEN + IPV6_HLEN + 16..ETH_HLEN + IPV6_HLEN + 18]);
        let want = Frame6::icmp6(near_client, *at.ip(), ty, code, rest, &quote).build();
        assert!(out == want, "type {ty} about the reply\nexpected:\n{}\noutput:\n{}", hex(&want), hex(&out));
        dp.check_stats(&[(stats::DNAT_NEW, 1), (stats::REV_NAT, 1), (stats::ICMP_ERROR_TRANSLATED, 3)]);
    }
}

#[test]
fn an_icmpv6_error_about_an_untracked_packet_passes() {
    let dp = Datapath::standard();
    let quoted = Frame6::tcp(client(), sa6("fd00:244:86dd::77", 8080), tcp_flags::SYN).build_ip();
    let err = Frame6::icmp6(v6("fd00:244:86dd::1"), *client().ip(), icmp6::PKT_TOOBIG, 0, 1280u32.to_be_bytes(), &quoted).build();
    let (verdict, out) = dp.run(&err);
    assert_eq!((verdict, &out), (TC_NEXT, &err));
    dp.check_stats(&[(stats::PASS_OTHER_PROTO, 1)]);
}

// ---------------------------------------------------------------------------
// IPv4 beside IPv6
// ---------------------------------------------------------------------------

#[test]
fn ipv4_is_translated_as_before_beside_ipv6() {
    let mut dp = Datapath::standard();
    dp.add_ipv4_service();
    let v4 = FrameBuilder::tcp(CLIENT4, VIP4, tcp_flags::SYN);
    let (verdict, out) = dp.run(&v4.build());
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out).expect("IPv4 output");
    p.verify_checksums().expect("IPv4 checksums");
    assert_eq!(out, v4.clone().with_dst(VIP4_BACKENDS[0].1).build());
    assert_eq!(dp.ct4_len(), 2, "an IPv4 flow in the IPv4 conntrack");
    assert!(dp.ct6().is_empty(), "and nothing in the IPv6 one");
    let (_, p6) = dp.run_translated(&syn().build());
    assert!(backend_of(p6.dst_sa(), &tcp_backends()).is_some());
    assert_eq!((dp.ct4_len(), dp.ct6().len()), (2, 2), "one flow in each family's conntrack");
    // One new flow in each family's counters, with each packet's bytes.
    assert_eq!(dp.stats()[&stats::DNAT_NEW].packets, 2, "the sum over families");
    let (v4c, v6c) = (stats_of_family(&dp.ebpf, stats::FAMILY_IPV4), stats_of_family(&dp.ebpf, stats::FAMILY_IPV6));
    assert_eq!(nonzero_of_family(&dp.ebpf, stats::FAMILY_IPV4), [("dnat_new_flow", 1)]);
    assert_eq!(nonzero_of_family(&dp.ebpf, stats::FAMILY_IPV6), [("dnat_new_flow", 1)]);
    assert_eq!(nonzero_of_family(&dp.ebpf, stats::FAMILY_OTHER), []);
    assert_eq!(v4c[&stats::DNAT_NEW].bytes, v4.build().len() as u64, "IPv4 bytes");
    assert_eq!(v6c[&stats::DNAT_NEW].bytes, syn().build().len() as u64, "IPv6 bytes");
}

// ---------------------------------------------------------------------------
// North-south: SNAT to a backend on another node, by FIB, in a node namespace
// ---------------------------------------------------------------------------
//
// As in `packet_northsouth.rs`: `bpf_fib_lookup` answers from the calling
// thread's namespace, so these tests build a node and run there.
//
// ```text
//  clients 2001:db8:86dd::/64 ── router …:1::fe ── ext0 2001:db8:86dd:1::1/64 (the NodePort address)
//  node B fd00:18:86dd::2 (pods fd00:245:86dd::/64) ── int0 fd00:18:86dd::1/64
// ```

const EXT0_MAC: [u8; 6] = NODE_MAC;
const INT0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const NODE_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];

fn node_ext6() -> Ipv6Addr {
    v6("2001:db8:86dd:1::1")
}

fn node_int6() -> Ipv6Addr {
    v6("fd00:18:86dd::1")
}

fn node_port6() -> SocketAddrV6 {
    SocketAddrV6::new(node_ext6(), 30080, 0, 0)
}

fn pod_b6() -> SocketAddrV6 {
    sa6("fd00:245:86dd::11", 8080)
}

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("device name");
    // SAFETY: a valid C string; the call only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(i != 0, "no device {name} in this namespace");
    i
}

/// The node's devices (ext0, int0) by ifindex.
struct Links {
    ext0: u32,
    int0: u32,
}

/// Builds the node in a namespace and runs `f` on a thread inside it; the
/// namespace is deleted afterwards, also when `f` panics. `int0_mtu`: the
/// MTU of the device towards node B.
fn on_node6<T: Send>(int0_mtu: u32, f: impl FnOnce(&Links) -> T + Send) -> T {
    require_root();
    let ns = Netns::create(&unique_name("p6"));
    for (dev, peer, m, addr) in [("ext0", "ext0p", EXT0_MAC, "2001:db8:86dd:1::1/64"), ("int0", "int0p", INT0_MAC, "fd00:18:86dd::1/64")] {
        ns.ip(&["link", "add", dev, "address", &mac(m), "type", "veth", "peer", "name", peer]);
        // Why nodad: a tentative address is never chosen as a source.
        ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
        ns.ip(&["link", "set", dev, "up"]);
        ns.ip(&["link", "set", peer, "up"]);
    }
    ns.ip(&["link", "set", "int0", "mtu", &int0_mtu.to_string()]);
    ns.ip(&["-6", "route", "add", "2001:db8:86dd::/64", "via", "2001:db8:86dd:1::fe", "dev", "ext0"]);
    ns.ip(&["-6", "route", "add", "fd00:245:86dd::/64", "via", "fd00:18:86dd::2", "dev", "int0"]);
    for (addr, m, dev) in [("2001:db8:86dd:1::fe", CLIENT_MAC, "ext0"), ("fd00:18:86dd::2", NODE_B_MAC, "int0")] {
        ns.ip(&["-6", "neigh", "replace", addr, "lladdr", &mac(m), "dev", dev, "nud", "permanent"]);
    }
    ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    let path = ns.path();
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            enter(&path);
            f(&Links { ext0: ifindex("ext0"), int0: ifindex("int0") })
        })
        .join()
    });
    drop(ns);
    r.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

// ---------------------------------------------------------------------------
// XDP: the fast path on IPv6, in the same node namespace
// ---------------------------------------------------------------------------

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

impl Datapath {
    /// Also loads the XDP program, and lists every device of the calling
    /// thread's namespace in `proxy_xdp_tx_v1` (what the agent does for the
    /// devices it attaches XDP to).
    fn load_xdp(&mut self) {
        let x: &mut Xdp = self.ebpf.program_mut(XDP_PROG).expect("xdp program").try_into().expect("xdp");
        x.load().unwrap_or_else(|e| panic!("loading {XDP_PROG}: {e:?}"));
        let mut ports = aya::maps::DevMapHash::try_from(self.ebpf.map_mut(XDP_TX_MAP).expect("xdp tx map")).expect("devmap");
        for d in proxy_agent::datapath::list_devices().expect("devices") {
            ports.insert(d.index, d.index, None, 0).unwrap_or_else(|e| panic!("devmap insert {}: {e:?}", d.name));
        }
    }

    /// Runs the XDP program on `input` arriving on device `ifindex`.
    fn xdp(&self, input: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        let p: &Xdp = self.ebpf.program(XDP_PROG).expect("program").try_into().expect("xdp");
        let mut out = vec![0u8; input.len() + 512];
        let ctx = xdp_md_ctx(input.len(), ifindex);
        let r = p
            .test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ctx_in: Some(&ctx), ..Default::default() })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {XDP_PROG} failed: {e:?}\ninput:\n{}", hex(input)));
        out.truncate(usize::try_from(r.data_size_out).expect("size"));
        (r.return_value, out)
    }
}

/// [`node_port_datapath`] with the XDP program loaded.
fn xdp_node_port_datapath(proto: u8) -> Datapath {
    let mut dp = node_port_datapath(proto);
    dp.load_xdp();
    dp
}

/// The extension headers the fast path walks past: none, and a hop-by-hop
/// plus destination-options chain (as on TC, the rewrite lands after them).
fn walkable_chains() -> Vec<(&'static str, Vec<Ext>)> {
    vec![
        ("no extension headers", vec![]),
        ("hop-by-hop + destination options", vec![Ext::HopByHop(vec![1, 2, 0, 0]), Ext::DestOpts(vec![1, 4, 0, 0, 0, 0])]),
    ]
}

#[test]
fn xdp_translates_ipv6_snat_flows_and_their_replies_past_extension_headers() {
    on_node6(1500, |l| {
        for (chain, exts) in walkable_chains() {
            for (pname, proto) in [("TCP", proto::TCP), ("UDP", proto::UDP)] {
                let what = format!("XDP {pname}, {chain}");
                let dp = xdp_node_port_datapath(proto);
                let mut syn = first6(proto, client(), node_port6());
                for e in &exts {
                    syn = syn.with_ext(e.clone());
                }
                // Out of int0 towards node B (another device: a redirect),
                // source NATed to int0's address, one hop later, MACs of
                // the route.
                let (v, out) = dp.xdp(&syn.build(), l.ext0);
                assert_eq!(v, XDP_REDIRECT, "{what}: verdict\n{}", hex(&out));
                let p = parse6(&out).unwrap_or_else(|e| panic!("{what}: {e}\n{}", hex(&out)));
                p.verify_checksums().unwrap_or_else(|e| panic!("{what}: {e}\n{}", hex(&out)));
                let port = p.src_sa().port();
                assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port), "{what}: SNAT port {port}");
                let snat = SocketAddrV6::new(node_int6(), port, 0, 0);
                let want = syn.clone().with_src(snat).with_dst(pod_b6()).with_hop_limit(63).with_macs(INT0_MAC, NODE_B_MAC).build();
                assert!(out == want, "{what}: expected\n{}\noutput\n{}", hex(&want), hex(&out));
                // The conntrack entries TC writes (TC carries on with them).
                let fwd = dp.ct6_get(&ct6_key(client(), node_port6(), proto, CT_DIR_SERVICE)).expect("SERVICE entry");
                assert_eq!(fwd.flags & (CT_F_SNAT | CT_F_REDIRECT), CT_F_SNAT | CT_F_REDIRECT, "{what}: flags");
                assert_eq!((fwd.snat_addr, u16::from_be(fwd.snat_port_be)), (node_int6().octets(), port), "{what}");
                assert_eq!(dp.ct6().len(), 2, "{what}: one flow");

                // The backend's answer, on int0: back to the client by ext0.
                let mut reply = if proto == proto::TCP {
                    Frame6::tcp(pod_b6(), snat, tcp_flags::SYN | tcp_flags::ACK).with_tcp_seq(5000, 1001)
                } else {
                    Frame6::udp(pod_b6(), snat).with_payload(b"answer")
                }
                .with_macs(NODE_B_MAC, INT0_MAC);
                for e in &exts {
                    reply = reply.with_ext(e.clone());
                }
                let (v, out) = dp.xdp(&reply.build(), l.int0);
                assert_eq!(v, XDP_REDIRECT, "{what}: reply verdict\n{}", hex(&out));
                let want = reply.clone().with_src(node_port6()).with_dst(client()).with_hop_limit(63).with_macs(EXT0_MAC, CLIENT_MAC).build();
                assert!(out == want, "{what}: reply expected\n{}\noutput\n{}", hex(&want), hex(&out));
                parse6(&out).expect("reply").verify_checksums().unwrap_or_else(|e| panic!("{what}: reply {e}"));

                // A later packet of the client keeps the backend and port.
                let again = if proto == proto::TCP {
                    Frame6::tcp(client(), node_port6(), tcp_flags::ACK).with_tcp_seq(1001, 5001).with_payload(b"GET /")
                } else {
                    Frame6::udp(client(), node_port6()).with_payload(b"again")
                };
                let (v, out) = dp.xdp(&again.build(), l.ext0);
                assert_eq!(v, XDP_REDIRECT, "{what}: later packet verdict");
                let want = again.clone().with_src(snat).with_dst(pod_b6()).with_hop_limit(63).with_macs(INT0_MAC, NODE_B_MAC).build();
                assert!(out == want, "{what}: later packet expected\n{}\noutput\n{}", hex(&want), hex(&out));
                dp.check_stats(&[(stats::XDP_FORWARD, 2), (stats::XDP_REVERSE, 1), (stats::CT_CONFIRMED, 1)]);
            }
        }
    });
}

/// A new flow XDP gives a backend on this node is recorded there and
/// passed: TC finds the entry and keeps XDP's choice (`dnat_established`,
/// never a second choice).
#[test]
fn xdp_records_a_flow_to_a_local_backend_and_tc_keeps_its_choice() {
    on_node6(1500, |l| {
        for (pname, proto) in [("TCP", proto::TCP), ("UDP", proto::UDP)] {
            let mut dp = Datapath::empty();
            let local = sa6("fd00:244:86dd::11", 8080);
            dp.add_backend(5, local, proto);
            {
                let mut m = HashMap::<_, u32, Backend6>::try_from(dp.ebpf.map_mut(BACKEND6_MAP).expect("be6 map")).expect("be6 type");
                let b = Backend6 { addr: local.ip().octets(), port_be: local.port().to_be(), proto, flags: BACKEND_F_LOCAL };
                m.insert(5, b, 0).expect("local backend");
            }
            dp.add_frontend(node_port6(), proto, 7, &[5], SVC_FLAG_NODE_PORT | SVC_FLAG_SNAT_REMOTE, 0);
            dp.load_xdp();
            let first = first6(proto, client(), node_port6());
            let (v, out) = dp.xdp(&first.build(), l.ext0);
            assert_eq!((v, out == first.build()), (XDP_PASS, true), "{pname}: passed untouched\n{}", hex(&out));
            let fwd = dp.ct6_get(&ct6_key(client(), node_port6(), proto, CT_DIR_SERVICE)).expect("SERVICE entry made by XDP");
            assert_eq!((fwd.nat_addr, fwd.flags & CT_F_SNAT), (local.ip().octets(), 0), "{pname}: to the local backend, no SNAT");
            let (v, out) = dp.run_with(ingress(), &first.build(), Some(l.ext0));
            assert_eq!(v, TC_ACT_OK, "{pname}: TC verdict\n{}", hex(&out));
            let p = parse6(&out).expect("TC output");
            assert_eq!(p.dst_sa(), local, "{pname}: TC keeps XDP's backend");
            dp.check_stats(&[(stats::XDP_LOCAL_FLOW, 1), (stats::DNAT_ESTABLISHED, 1)]);
        }
    });
}

#[test]
fn a_udp_checksum_that_computes_to_zero_leaves_xdp_as_ffff() {
    on_node6(1500, |l| {
        let dp = xdp_node_port_datapath(proto::UDP);
        let syn = Frame6::udp(client(), node_port6());
        // Find the SNAT port XDP picks for this client, then choose a
        // payload whose translated checksum is 0 (in the same flow, the
        // same translation).
        let (v, out) = dp.xdp(&syn.build(), l.ext0);
        assert_eq!(v, XDP_REDIRECT, "first datagram\n{}", hex(&out));
        let snat = SocketAddrV6::new(node_int6(), parse6(&out).expect("out").src_sa().port(), 0, 0);
        let payload = zero_checksum_payload(snat, pod_b6(), b"zero");
        let dgram = Frame6::udp(client(), node_port6()).with_payload(&payload);
        let (v, out) = dp.xdp(&dgram.build(), l.ext0);
        assert_eq!(v, XDP_REDIRECT, "second datagram\n{}", hex(&out));
        let p = parse6(&out).expect("out");
        assert_eq!(p.checksum_field(), Some(0xffff), "a computed 0 goes out as 0xffff (0 is invalid in IPv6)\n{}", hex(&out));
        p.verify_checksums().unwrap_or_else(|e| panic!("{e}\n{}", hex(&out)));
    });
}

#[test]
fn xdp_passes_untouched_and_uncounted_what_tc_must_handle_on_ipv6() {
    on_node6(1500, |l| {
        let np = node_port6();
        let syn = || Frame6::tcp(client(), np, tcp_flags::SYN);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("a mobility header (not walked)", syn().with_ext(Ext::Raw { nexthdr: NEXTHDR_MOBILITY, body: vec![0, 0, 0, 0, 0, 0, 0] }).build()),
            (
                "a routing header with segments left",
                syn().with_ext(Ext::Routing { routing_type: 4, segments_left: 1, addresses: vec![v6("fd00::99")] }).build(),
            ),
            (
                "more extension headers than the walk takes",
                (0..=stats::IPV6_MAX_EXT_HDRS).fold(syn(), |f, _| f.with_ext(Ext::DestOpts(vec![1, 4, 0, 0, 0, 0]))).build(),
            ),
            ("a first fragment", syn().with_ext(Ext::Fragment { offset: 0, more: true, id: 7 }).build()),
            ("a later fragment", syn().with_ext(Ext::Fragment { offset: 8, more: false, id: 7 }).build()),
            ("ICMPv6", Frame6::icmp6(*client().ip(), node_ext6(), icmp6::ECHO_REQUEST, 0, [0, 1, 0, 1], b"ping").build()),
            ("UDP without checksum", Frame6::udp(client(), np).with_udp_zero_checksum().build()),
            ("a TCP segment of no flow (not a SYN)", Frame6::tcp(client(), np, tcp_flags::ACK).build()),
            ("a FIN (TC marks the flow closing)", Frame6::tcp(client(), np, tcp_flags::FIN | tcp_flags::ACK).build()),
            ("hop limit 1 (TC counts it expiring)", syn().with_hop_limit(1).build()),
            ("not to a frontend", Frame6::tcp(client(), SocketAddrV6::new(node_ext6(), 22, 0, 0), tcp_flags::SYN).build()),
            ("truncated", syn().build()[..ETH_HLEN + IPV6_HLEN + 10].to_vec()),
        ];
        for (name, input) in cases {
            let dp = xdp_node_port_datapath(proto::TCP);
            let (v, out) = dp.xdp(&input, l.ext0);
            assert_eq!(v, XDP_PASS, "{name}: verdict\n{}", hex(&out));
            assert!(out == input, "{name}: the frame must pass untouched\ninput\n{}\noutput\n{}", hex(&input), hex(&out));
            // Counted once, by TC, which walks it again.
            dp.check_stats(&[]);
        }
        // A frontend without the SNAT flag (a ClusterIP): the stack's
        // business (TC translates it), not the fast path's.
        let mut dp = Datapath::standard();
        dp.load_xdp();
        let input = Frame6::tcp(client(), vip(), tcp_flags::SYN).build();
        let (v, out) = dp.xdp(&input, l.ext0);
        assert_eq!((v, out == input), (XDP_PASS, true), "ClusterIP\n{}", hex(&out));
        assert!(dp.ct6().is_empty(), "XDP made no flow for a ClusterIP");
    });
}

/// A `NodePort` on ext0's address (externalTrafficPolicy Cluster) whose
/// one backend is on node B.
fn node_port_datapath(proto: u8) -> Datapath {
    let mut dp = Datapath::empty();
    dp.add_backend(3, pod_b6(), proto);
    dp.add_frontend(node_port6(), proto, 7, &[3], SVC_FLAG_NODE_PORT | SVC_FLAG_SNAT_REMOTE, 0);
    dp
}

fn first6(proto: u8, from: SocketAddrV6, to: SocketAddrV6) -> Frame6 {
    if proto == proto::TCP { Frame6::tcp(from, to, tcp_flags::SYN) } else { Frame6::udp(from, to) }
}

#[test]
fn an_external_frontend_to_a_remote_backend_is_snated_to_the_node_and_replies_translated_back() {
    on_node6(1500, |l| {
        for (name, proto) in [("TCP", proto::TCP), ("UDP", proto::UDP)] {
            let dp = node_port_datapath(proto);
            // The client's packet: source NATed to int0's address (the one
            // the route to node B prefers) and a port of the SNAT range,
            // sent out by FIB redirect, one hop later.
            let syn = first6(proto, client(), node_port6());
            let (v, out) = dp.run_with(ingress(), &syn.build(), Some(l.ext0));
            assert_eq!(v, TC_ACT_REDIRECT, "{name}: verdict\n{}", hex(&out));
            let p = parse6(&out).unwrap_or_else(|e| panic!("{name}: {e}"));
            p.verify_checksums().unwrap_or_else(|e| panic!("{name}: {e}"));
            let port = p.src_sa().port();
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port), "{name}: SNAT port {port}");
            let snat = SocketAddrV6::new(node_int6(), port, 0, 0);
            let want = syn.clone().with_src(snat).with_dst(pod_b6()).with_hop_limit(63).build();
            assert!(out == want, "{name}: expected\n{}\noutput\n{}", hex(&want), hex(&out));
            let fwd = dp.ct6_get(&ct6_key(client(), node_port6(), proto, CT_DIR_SERVICE)).expect("SERVICE entry");
            assert_eq!(fwd.flags & (CT_F_SNAT | CT_F_REDIRECT), CT_F_SNAT | CT_F_REDIRECT, "{name}: flags");
            assert_eq!((fwd.snat_addr, u16::from_be(fwd.snat_port_be)), (node_int6().octets(), port));
            let rev = dp.ct6_get(&ct6_key(pod_b6(), snat, proto, CT_DIR_REPLY)).expect("REPLY entry");
            assert_eq!((rev.snat_addr, u16::from_be(rev.snat_port_be)), (client().ip().octets(), client().port()), "{name}: REPLY restores the client");

            // The backend answers the node: back to frontend → client,
            // sent out by FIB redirect too.
            let reply = if proto == proto::TCP {
                Frame6::tcp(pod_b6(), snat, tcp_flags::SYN | tcp_flags::ACK).with_tcp_seq(5000, 1001)
            } else {
                Frame6::udp(pod_b6(), snat).with_payload(b"answer")
            }
            .with_macs(NODE_B_MAC, INT0_MAC);
            let (v, out) = dp.run_with(ingress(), &reply.build(), Some(l.int0));
            assert_eq!(v, TC_ACT_REDIRECT, "{name}: reply verdict");
            let want = reply.clone().with_src(node_port6()).with_dst(client()).with_hop_limit(63).build();
            assert!(out == want, "{name}: reply expected\n{}\noutput\n{}", hex(&want), hex(&out));
            parse6(&out).expect("reply").verify_checksums().unwrap_or_else(|e| panic!("{name}: reply {e}"));

            // A later packet keeps the backend and the port.
            let again = if proto == proto::TCP {
                Frame6::tcp(client(), node_port6(), tcp_flags::ACK).with_tcp_seq(1001, 5001).with_payload(b"GET /")
            } else {
                Frame6::udp(client(), node_port6()).with_payload(b"again")
            };
            let (v, out) = dp.run_with(ingress(), &again.build(), Some(l.ext0));
            assert_eq!(v, TC_ACT_REDIRECT, "{name}: later packet verdict");
            let want = again.clone().with_src(snat).with_dst(pod_b6()).with_hop_limit(63).build();
            assert!(out == want, "{name}: later packet expected\n{}\noutput\n{}", hex(&want), hex(&out));
            dp.check_stats(&[(stats::DNAT_NEW, 1), (stats::REV_NAT, 1), (stats::DNAT_ESTABLISHED, 1), (stats::CT_CONFIRMED, 1)]);
        }
    });
}

#[test]
fn a_packet_too_big_for_the_redirect_is_answered_with_icmpv6_packet_too_big() {
    on_node6(1280, |l| {
        let dp = node_port_datapath(proto::UDP);
        let big = Frame6::udp(client(), node_port6()).with_payload(&[7; 1300]);
        let input = big.build();
        let (v, out) = dp.run_with(ingress(), &input, Some(l.ext0));
        assert_eq!(v, TC_ACT_REDIRECT, "verdict\n{}", hex(&out));
        let p = parse6(&out).unwrap_or_else(|e| panic!("{e}\n{}", hex(&out)));
        p.verify_checksums().unwrap_or_else(|e| panic!("{e}\n{}", hex(&out)));
        assert_eq!((p.src, p.dst), (node_ext6(), *client().ip()), "from the address the client sent to, back to it");
        assert_eq!((p.upper, p.segment[0], p.segment[1]), (NEXTHDR_ICMPV6, icmp6::PKT_TOOBIG, 0));
        assert_eq!(p.segment[4..8], 1280u32.to_be_bytes(), "the egress device's MTU");
        assert_eq!(&p.segment[8..], &input[ETH_HLEN..ETH_HLEN + IPV6_HLEN + 8], "quotes the untranslated packet");
        assert_eq!(out[0..6], input[6..12], "MACs swapped");
        dp.check_stats(&[(stats::ICMP_FRAG_NEEDED, 1)]);
    });
}

// ---------------------------------------------------------------------------
// BTF: bpftool prints the IPv6 maps with field names
// ---------------------------------------------------------------------------

/// A directory in bpffs, removed with everything pinned in it.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn bpftool_prints_the_ipv6_maps_with_field_names() {
    let mut dp = Datapath::standard();
    let (_, _) = dp.run_translated(&syn().build());
    dp.add_range6(TCP_SVC, v6("2001:db8::"), 32);
    {
        let mut m = HashMap::<_, Backend6, u32>::try_from(dp.ebpf.map_mut(SOCK_DESTROY6_MAP).expect("destroy6 map")).expect("hash type");
        m.insert(Backend6 { addr: v6("fd00:244::11").octets(), port_be: 53u16.to_be(), proto: proto::UDP, flags: 0 }, 0, 0).expect("insert");
    }
    let dir = PinDir(std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("p6btf"))));
    std::fs::create_dir_all(&dir.0).unwrap_or_else(|e| panic!("mkdir {} (is bpffs mounted?): {e}", dir.0.display()));
    let dump = |map: &str| {
        let path = dir.0.join(map);
        dp.ebpf.map(map).unwrap_or_else(|| panic!("no map {map}")).pin(&path).unwrap_or_else(|e| panic!("pin {map}: {e:?}"));
        integration_tests::netns::run("bpftool", &["map", "dump", "pinned", &path.to_string_lossy()])
    };
    for (map, fields) in [
        (SVC6_MAP, &["\"addr\"", "\"port_be\"", "\"backend_slot\"", "\"count\"", "\"svc_id\""][..]),
        (BACKEND6_MAP, &["\"addr\"", "\"port_be\"", "\"proto\"", "\"flags\""][..]),
        (CT6_NEW_MAP, &["\"saddr\"", "\"daddr\"", "\"nat_addr\"", "\"snat_port_be\"", "\"backend_id\"", "\"last_seen_ns\""][..]),
        (SRC_RANGE6_MAP, &["\"svc_id_be\"", "\"addr\""][..]),
        (SOCK_DESTROY6_MAP, &["\"addr\"", "\"port_be\"", "\"proto\""][..]),
    ] {
        let out = dump(map);
        for f in fields {
            assert!(out.contains(f), "bpftool dump of {map} lacks {f}:\n{out}");
        }
    }
}

// ---------------------------------------------------------------------------
// loadBalancerSourceRanges on an IPv6 LoadBalancer frontend
// ---------------------------------------------------------------------------

/// An IPv6 LB frontend flagged `SVC_FLAG_SOURCE_RANGES` admits a new flow
/// only from a client inside one of its ranges in `proxy_src_range6_v1`
/// (longest prefix, service id matched whole): a client inside a /48 is
/// translated; one outside it, one inside a range of another service id,
/// and one inside an IPv4 range of this service id (the other family's
/// trie) are dropped and counted. No flow is created for them.
#[test]
fn an_ipv6_lb_frontend_with_source_ranges_admits_only_clients_inside_them() {
    let mut dp = Datapath::empty();
    for (id, a) in tcp_backends() {
        dp.add_backend(id, a, proto::TCP);
    }
    dp.add_frontend(vip(), proto::TCP, TCP_SVC, &[1, 2], SVC_FLAG_LOAD_BALANCER | SVC_FLAG_SOURCE_RANGES, 0);
    dp.add_range6(TCP_SVC, v6("2001:db8:86dd::"), 48);
    dp.add_range6(TCP_SVC + 7, v6("2001:db8:aaaa::"), 48);
    {
        // 0.0.0.0/0 of this service id in the IPv4 trie: not for IPv6 clients.
        let mut m = LpmTrie::<_, SrcRangeKey, u32>::try_from(dp.ebpf.map_mut(SRC_RANGE_MAP).expect("range map")).expect("lpm type");
        m.insert(&lpm_trie::Key::new(32, SrcRangeKey { svc_id_be: TCP_SVC.to_be(), addr_be: 0 }), 1, 0).expect("insert v4 range");
    }
    let (_, p) = dp.run_translated(&syn().build());
    assert!(backend_of(p.dst_sa(), &tcp_backends()).is_some(), "inside the range: to a backend, got {}", p.dst_sa());
    for outsider in ["2001:db8:86de::2", "2001:db8:aaaa::2", "2001:db7::2"] {
        let (verdict, out) = dp.run(&Frame6::tcp(sa6(outsider, 40000), vip(), tcp_flags::SYN).build());
        assert_eq!(verdict, TC_ACT_SHOT, "{outsider} is outside the ranges\n{}", hex(&out));
    }
    dp.check_stats(&[(stats::DNAT_NEW, 1), (stats::DROP_SOURCE_RANGE, 3)]);
    assert_eq!(dp.ct6().len(), 2, "only the admitted flow is tracked: {:?}", dp.ct6());
}
