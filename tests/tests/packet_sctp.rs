//! SCTP through the TC ingress program, packet by packet
//! (`BPF_PROG_TEST_RUN`): the CRC32c after a port rewrite checked against a
//! full recomputation, for both directions and several lengths; a zero
//! checksum (left to the device) kept zero; which packets may create a
//! flow; ABORT closing it; what is passed untranslated (fragments, IPv6
//! extension headers). End to end with real SCTP stacks: `sctp.rs`.
//!
//! Needs root (`BPF_PROG_TEST_RUN` on a `sched_cls` program).
use std::net::{Ipv4Addr, SocketAddrV4, SocketAddrV6};

use aya::{
    Ebpf,
    maps::HashMap,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use integration_tests::{
    packet::{FrameBuilder, L4, hex, parse, stats_by_reason},
    packet6::{Ext, Frame6, parse6},
};
use proxy_agent::{datapath::ebpf_object, pins::TcHook};
use proxy_common::{
    backend::{BACKEND_MAP, BACKEND6_MAP, Backend, Backend6},
    ct::{CT_DIR_SERVICE, CT_F_CLOSING, CT_MAP, CT_NEW_MAP, CtKey, CtValue},
    proto,
    sctp::{self, CHUNK_ABORT, CHUNK_DATA, CHUNK_INIT, CHUNK_INIT_ACK},
    stats,
    svc::{SVC_FLAG_CLUSTER_IP, SVC_MAP, SVC6_MAP, Svc6Key, SvcKey, SvcValue},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_NEXT: u32 = (-1_i32).cast_unsigned();
const INGRESS: &str = TcHook::Ingress.program();

const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 40000);
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 38), 3868);
const BACKENDS: [(u32, SocketAddrV4); 2] = [
    (1, SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 11), 13868)),
    (2, SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 12), 13868)),
];

fn client6() -> SocketAddrV6 {
    SocketAddrV6::new("2001:db8::2".parse().expect("ip"), 40000, 0, 0)
}
fn vip6() -> SocketAddrV6 {
    SocketAddrV6::new("fd00:96::38".parse().expect("ip"), 3868, 0, 0)
}
fn backend6() -> SocketAddrV6 {
    SocketAddrV6::new("fd00:244::11".parse().expect("ip"), 13868, 0, 0)
}

struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// The object with its TC ingress program loaded, [`VIP`] (SCTP) with
    /// two backends and [`vip6`] with one.
    fn new() -> Self {
        // SAFETY: geteuid has no preconditions.
        assert!(unsafe { libc::geteuid() } == 0, "BPF_PROG_TEST_RUN needs root");
        let mut ebpf = Ebpf::load(ebpf_object()).unwrap_or_else(|e| panic!("loading the object: {e:?}"));
        let prog: &mut SchedClassifier = ebpf.program_mut(INGRESS).expect("program").try_into().expect("sched_cls");
        prog.load().unwrap_or_else(|e| panic!("loading {INGRESS}: {e:?}"));
        let mut dp = Self { ebpf };
        {
            let mut be = HashMap::<_, u32, Backend>::try_from(dp.ebpf.map_mut(BACKEND_MAP).expect("be")).expect("be type");
            for (id, a) in BACKENDS {
                let b = Backend { addr_be: u32::from_ne_bytes(a.ip().octets()), port_be: a.port().to_be(), proto: proto::SCTP, flags: 0 };
                be.insert(id, b, 0).expect("backend");
            }
        }
        {
            let mut svc = HashMap::<_, SvcKey, SvcValue>::try_from(dp.ebpf.map_mut(SVC_MAP).expect("svc")).expect("svc type");
            let key = |slot: u16| SvcKey {
                addr_be: u32::from_ne_bytes(VIP.ip().octets()),
                port_be: VIP.port().to_be(),
                backend_slot: slot,
                proto: proto::SCTP,
                scope: 0,
                _pad: [0; 2],
            };
            for (slot, (id, _)) in (1..).zip(BACKENDS) {
                svc.insert(key(slot), SvcValue { backend_id: id, ..Default::default() }, 0).expect("slot");
            }
            let head = SvcValue { backend_id: 0, count: 2, flags: SVC_FLAG_CLUSTER_IP, svc_id: 7, affinity_timeout_s: 0 };
            svc.insert(key(0), head, 0).expect("frontend");
        }
        {
            let mut be = HashMap::<_, u32, Backend6>::try_from(dp.ebpf.map_mut(BACKEND6_MAP).expect("be6")).expect("be6 type");
            let b = Backend6 { addr: backend6().ip().octets(), port_be: backend6().port().to_be(), proto: proto::SCTP, flags: 0 };
            be.insert(3, b, 0).expect("backend6");
            let mut svc = HashMap::<_, Svc6Key, SvcValue>::try_from(dp.ebpf.map_mut(SVC6_MAP).expect("svc6")).expect("svc6 type");
            let key = |slot: u16| Svc6Key { addr: vip6().ip().octets(), port_be: vip6().port().to_be(), backend_slot: slot, proto: proto::SCTP, scope: 0, _pad: [0; 2] };
            svc.insert(key(1), SvcValue { backend_id: 3, ..Default::default() }, 0).expect("slot6");
            let head = SvcValue { backend_id: 0, count: 1, flags: SVC_FLAG_CLUSTER_IP, svc_id: 8, affinity_timeout_s: 0 };
            svc.insert(key(0), head, 0).expect("frontend6");
        }
        dp
    }

    fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let p: &SchedClassifier = self.ebpf.program(INGRESS).expect("program").try_into().expect("sched_cls");
        let mut out = vec![0u8; input.len() + 512];
        let r = p
            .test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..Default::default() })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e:?}\n{}", hex(input)));
        out.truncate(usize::try_from(r.data_size_out).expect("size"));
        (r.return_value, out)
    }

    fn count(&self, reason: u32) -> u64 {
        stats_by_reason(&self.ebpf)[&reason].packets
    }

    fn ct(&self, k: &CtKey) -> Option<CtValue> {
        [CT_MAP, CT_NEW_MAP].into_iter().find_map(|name| {
            let m = HashMap::<_, CtKey, CtValue>::try_from(self.ebpf.map(name).expect("ct")).expect("ct type");
            m.get(k, 0).ok()
        })
    }
}

/// An SCTP packet: common header (checksum computed unless `zero_csum`),
/// one chunk of `chunk` type with `body` bytes of value.
fn sctp_packet(sport: u16, dport: u16, chunk: u8, body: usize, zero_csum: bool) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(if chunk == CHUNK_INIT { 0u32 } else { 0x1234_5678 }).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    let len = u16::try_from(4 + body).expect("chunk length");
    p.extend_from_slice(&[chunk, 0]);
    p.extend_from_slice(&len.to_be_bytes());
    p.extend((0..body).map(|i| (i * 7 + 3) as u8));
    while p.len() % 4 != 0 {
        p.push(0);
    }
    if !zero_csum {
        let c = sctp::packet_csum(&p);
        p[8..12].copy_from_slice(&c.to_le_bytes());
    }
    p
}

fn frame4(src: SocketAddrV4, dst: SocketAddrV4, sctp: Vec<u8>) -> FrameBuilder {
    let mut f = FrameBuilder::udp(src, dst);
    f.l4 = L4::Other { proto: proto::SCTP };
    f.payload = sctp;
    f
}

fn frame6(src: SocketAddrV6, dst: SocketAddrV6, sctp: Vec<u8>) -> Frame6 {
    let mut f = Frame6::udp(src, dst);
    f.l4 = L4::Other { proto: proto::SCTP };
    f.upper = Some(proto::SCTP);
    f.payload = sctp;
    f
}

/// The SCTP packet's ports and whether its checksum is right (or zero).
fn sctp_of(seg: &[u8]) -> (u16, u16, u32, bool) {
    let csum = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
    (u16::from_be_bytes([seg[0], seg[1]]), u16::from_be_bytes([seg[2], seg[3]]), csum, csum == sctp::packet_csum(seg))
}

fn ct_key(src: SocketAddrV4, dst: SocketAddrV4, dir: u8) -> CtKey {
    CtKey {
        saddr_be: u32::from_ne_bytes(src.ip().octets()),
        daddr_be: u32::from_ne_bytes(dst.ip().octets()),
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto: proto::SCTP,
        dir,
        _pad: [0; 2],
    }
}

/// INITs of several sizes go to a backend with the port rewritten and a
/// right checksum; the backend's INIT ACK comes back from the frontend
/// with a right checksum too.
#[test]
fn init_and_its_answer_are_translated_with_the_crc32c_fixed() {
    // (BPF_PROG_TEST_RUN takes a frame of at most about a page.)
    for body in [16, 333, 1400, 3000] {
        let dp = Datapath::new();
        let input = frame4(CLIENT, VIP, sctp_packet(CLIENT.port(), VIP.port(), CHUNK_INIT, body, false)).build();
        let (verdict, out) = dp.run(&input);
        assert_eq!(verdict, TC_ACT_OK, "body {body}\n{}", hex(&out));
        let p = parse(&out).unwrap_or_else(|e| panic!("{e}"));
        p.verify_checksums().expect("IPv4 header checksum");
        let (sport, dport, _, ok) = sctp_of(&p.segment);
        assert!(ok, "body {body}: CRC32c wrong after the rewrite\n{}", hex(&out));
        assert_eq!((sport, dport), (CLIENT.port(), 13868), "body {body}");
        let backend = BACKENDS.iter().find(|(_, a)| *a.ip() == p.ip.dst).map(|(_, a)| *a).expect("sent to a backend");
        assert_eq!(dp.count(stats::DNAT_NEW), 1);

        let reply = frame4(backend, CLIENT, sctp_packet(backend.port(), CLIENT.port(), CHUNK_INIT_ACK, body / 2, false)).build();
        let (verdict, out) = dp.run(&reply);
        assert_eq!(verdict, TC_ACT_OK, "reply, body {body}\n{}", hex(&out));
        let p = parse(&out).unwrap_or_else(|e| panic!("{e}"));
        let (sport, dport, _, ok) = sctp_of(&p.segment);
        assert!(ok, "reply, body {body}: CRC32c wrong after the rewrite\n{}", hex(&out));
        assert_eq!((p.ip.src, sport, p.ip.dst, dport), (*VIP.ip(), VIP.port(), *CLIENT.ip(), CLIENT.port()));
        assert_eq!(dp.count(stats::REV_NAT), 1);
    }
}

/// A checksum field of zero is a CRC left to the device (Linux's SCTP on a
/// veth): the ports are rewritten, the field stays zero.
#[test]
fn a_zero_checksum_is_left_for_the_device() {
    let dp = Datapath::new();
    let input = frame4(CLIENT, VIP, sctp_packet(CLIENT.port(), VIP.port(), CHUNK_INIT, 100, true)).build();
    let (verdict, out) = dp.run(&input);
    assert_eq!(verdict, TC_ACT_OK);
    let p = parse(&out).expect("parse");
    let (_, dport, csum, _) = sctp_of(&p.segment);
    assert_eq!((dport, csum), (13868, 0), "{}", hex(&out));
}

/// Only an INIT creates a flow; a DATA chunk of no flow is dropped. ABORT
/// marks the flow closing; a DATA chunk of the flow goes to its backend.
#[test]
fn only_init_opens_a_flow_and_abort_closes_it() {
    let dp = Datapath::new();
    let data = frame4(CLIENT, VIP, sctp_packet(CLIENT.port(), VIP.port(), CHUNK_DATA, 40, false)).build();
    assert_eq!(dp.run(&data).0, TC_ACT_SHOT);
    assert_eq!(dp.count(stats::DROP_NO_FLOW), 1);

    let init = frame4(CLIENT, VIP, sctp_packet(CLIENT.port(), VIP.port(), CHUNK_INIT, 40, false)).build();
    let (v, out) = dp.run(&init);
    assert_eq!(v, TC_ACT_OK);
    let backend = parse(&out).expect("parse").ip.dst;
    let (v, out) = dp.run(&data);
    assert_eq!(v, TC_ACT_OK, "DATA of the flow");
    let p = parse(&out).expect("parse");
    assert_eq!(p.ip.dst, backend, "the flow keeps its backend");
    assert!(sctp_of(&p.segment).3, "CRC32c");
    assert_eq!(dp.count(stats::DNAT_ESTABLISHED), 1);

    let entry = |dp: &Datapath| dp.ct(&ct_key(CLIENT, VIP, CT_DIR_SERVICE)).expect("SERVICE entry");
    assert_eq!(entry(&dp).flags & CT_F_CLOSING, 0);
    let abort = frame4(CLIENT, VIP, sctp_packet(CLIENT.port(), VIP.port(), CHUNK_ABORT, 0, false)).build();
    assert_eq!(dp.run(&abort).0, TC_ACT_OK, "the ABORT reaches the backend");
    assert_ne!(entry(&dp).flags & CT_F_CLOSING, 0, "ABORT closes the flow");
}

/// SCTP in IP fragments is passed untranslated and counted (the checksum
/// fix needs the whole packet's length).
#[test]
fn sctp_fragments_pass_untranslated() {
    let dp = Datapath::new();
    let mut f = frame4(CLIENT, VIP, sctp_packet(CLIENT.port(), VIP.port(), CHUNK_INIT, 64, false));
    f.dont_fragment = false;
    let input = f.with_more_fragments().build();
    let (v, out) = dp.run(&input);
    assert_eq!((v, &out), (TC_NEXT, &input));
    assert_eq!(dp.count(stats::PASS_FRAGMENT), 1);
}

/// Over IPv6: translated with the checksum fixed; behind an extension
/// header passed untranslated and counted.
#[test]
fn ipv6_init_is_translated_and_sctp_behind_extension_headers_passes() {
    let dp = Datapath::new();
    let input = frame6(client6(), vip6(), sctp_packet(client6().port(), vip6().port(), CHUNK_INIT, 500, false)).build();
    let (v, out) = dp.run(&input);
    assert_eq!(v, TC_ACT_OK, "{}", hex(&out));
    let p = parse6(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.dst, *backend6().ip());
    let seg = &out[14 + 40..];
    let (_, dport, _, ok) = sctp_of(seg);
    assert!(ok, "CRC32c wrong after the rewrite\n{}", hex(&out));
    assert_eq!(dport, backend6().port());

    let ext = frame6(client6(), vip6(), sctp_packet(40001, vip6().port(), CHUNK_INIT, 64, false)).with_ext(Ext::DestOpts(vec![0; 4])).build();
    let (v, out) = dp.run(&ext);
    assert_eq!((v, &out), (TC_NEXT, &ext));
    assert_eq!(dp.count(stats::PASS_IPV6_EXT), 1);
}
