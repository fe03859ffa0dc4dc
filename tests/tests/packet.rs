//! The TC ingress program, packet by packet, through `BPF_PROG_TEST_RUN`.
//!
//! Every test loads its own copy of the embedded object (nothing pinned,
//! nothing attached), fills the maps, runs frames built by
//! `integration_tests::packet` through the program and checks the verdict,
//! the frame that comes out, the conntrack map and the exit-reason counters.
//!
//! Single-packet behaviour is written as tables of [`Case`]s (katran style:
//! description, setup, input, expected verdict, expected output, expected
//! counter); flows that need several packets have their own tests.
//!
//! Needs root (`BPF_PROG_TEST_RUN` on a `sched_cls` program).
use std::{collections::BTreeMap, fmt::Write as _, net::{Ipv4Addr, Ipv6Addr, SocketAddrV4}};

use aya::{
    Ebpf,
    maps::{HashMap, PerCpuArray},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
};
use integration_tests::packet::{
    CLIENT_MAC, ETH_HLEN, ETH_P_IP, FrameBuilder, IPV4_HLEN, L4, L4Header, NODE_MAC, arp_request, icmp, ipv6_udp,
    parse, tcp_flags,
};
use proxy_agent::{datapath::EBPF_OBJECT, pins::TC_INGRESS_PROG};
use proxy_common::{
    backend::{BACKEND_MAP, Backend},
    ct::{CT_DIR_REPLY, CT_DIR_SERVICE, CT_MAP, CtKey, CtValue},
    proto,
    stats::{self, REASONS, STATS_MAP, StatCounter},
    svc::{SVC_FLAG_CLUSTER_IP, SVC_MAP, SvcKey, SvcValue},
};

// Verdicts as BPF_PROG_TEST_RUN reports them (the program's i32 as u32).
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// `TC_ACT_UNSPEC` (-1): TCX "next", the pass-through verdict.
const TC_ACT_UNSPEC: u32 = (-1_i32).cast_unsigned();

// ---------------------------------------------------------------------------
// The standard fixture
// ---------------------------------------------------------------------------

const CLIENT: SocketAddrV4 = addr([192, 0, 2, 2], 40000);
/// TCP and UDP frontend with two backends each.
const VIP: SocketAddrV4 = addr([10, 96, 0, 10], 80);
const TCP_SVC_ID: u32 = 1;
const TCP_BACKENDS: [(u32, SocketAddrV4); 2] = [(1, addr([10, 244, 0, 11], 8080)), (2, addr([10, 244, 0, 12], 8080))];
const UDP_SVC_ID: u32 = 2;
const UDP_BACKENDS: [(u32, SocketAddrV4); 2] = [(3, addr([10, 244, 0, 11], 8080)), (4, addr([10, 244, 0, 12], 8080))];
/// UDP-only frontend (DNS-like), for protocol mismatches.
const DNS_VIP: SocketAddrV4 = addr([10, 96, 0, 10], 53);
const DNS_SVC_ID: u32 = 3;
const DNS_BACKENDS: [(u32, SocketAddrV4); 1] = [(5, addr([10, 244, 0, 13], 53))];
/// Frontends that individual cases set up.
const EMPTY_VIP: SocketAddrV4 = addr([10, 96, 0, 20], 80);
const BROKEN_VIP: SocketAddrV4 = addr([10, 96, 0, 30], 80);
const MISSING_BACKEND_ID: u32 = 99;

const fn addr(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]), port)
}

fn be_addr(a: SocketAddrV4) -> u32 {
    u32::from_ne_bytes(a.ip().octets())
}

fn ct_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, dir: u8) -> CtKey {
    CtKey {
        saddr_be: be_addr(src),
        daddr_be: be_addr(dst),
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto,
        dir,
        _pad: [0; 2],
    }
}

fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, x) in b.iter().enumerate() {
        if i > 0 && i % 16 == 0 {
            s.push('\n');
        }
        let _ = write!(s, "{x:02x} ");
    }
    s
}

/// One loaded copy of the datapath with its own maps.
struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the object and the program; the maps are empty.
    fn empty() -> Self {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert!(
            euid == 0,
            "the packet tests load eBPF programs and use BPF_PROG_TEST_RUN: run them as root (euid is {euid})"
        );
        let mut ebpf = Ebpf::load(EBPF_OBJECT).unwrap_or_else(|e| panic!("loading the embedded eBPF object: {e:?}"));
        let prog: &mut SchedClassifier = ebpf
            .program_mut(TC_INGRESS_PROG)
            .unwrap_or_else(|| panic!("no program {TC_INGRESS_PROG} in the object"))
            .try_into()
            .unwrap_or_else(|e| panic!("{TC_INGRESS_PROG} is not a sched_cls program: {e:?}"));
        prog.load().unwrap_or_else(|e| panic!("loading {TC_INGRESS_PROG}: {e:?}"));
        Self { ebpf }
    }

    /// The standard fixture: VIP:80 over TCP and UDP with two backends each,
    /// and a UDP-only frontend on VIP:53.
    fn standard() -> Self {
        let mut dp = Self::empty();
        dp.add_service(VIP, proto::TCP, TCP_SVC_ID, &TCP_BACKENDS);
        dp.add_service(VIP, proto::UDP, UDP_SVC_ID, &UDP_BACKENDS);
        dp.add_service(DNS_VIP, proto::UDP, DNS_SVC_ID, &DNS_BACKENDS);
        dp
    }

    fn add_backend(&mut self, id: u32, a: SocketAddrV4, proto: u8) {
        let mut m = HashMap::<_, u32, Backend>::try_from(self.ebpf.map_mut(BACKEND_MAP).expect("backend map"))
            .expect("backend map type");
        let b = Backend { addr_be: be_addr(a), port_be: a.port().to_be(), proto, flags: 0 };
        m.insert(id, b, 0).unwrap_or_else(|e| panic!("insert backend {id}: {e:?}"));
    }

    /// Writes slots 1..=n with `backend_ids`, then slot 0 with count n (the
    /// agent's order). Backend ids need not exist.
    fn add_frontend(&mut self, vip: SocketAddrV4, proto: u8, svc_id: u32, backend_ids: &[u32]) {
        let mut m = HashMap::<_, SvcKey, SvcValue>::try_from(self.ebpf.map_mut(SVC_MAP).expect("svc map"))
            .expect("svc map type");
        let key = |slot: u16| SvcKey {
            addr_be: be_addr(vip),
            port_be: vip.port().to_be(),
            backend_slot: slot,
            proto,
            scope: 0,
            _pad: [0; 2],
        };
        for (slot, id) in (1..).zip(backend_ids) {
            let v = SvcValue { backend_id: *id, ..Default::default() };
            m.insert(key(slot), v, 0).unwrap_or_else(|e| panic!("insert slot {slot}: {e:?}"));
        }
        let count = u16::try_from(backend_ids.len()).expect("slot count");
        let v = SvcValue { backend_id: 0, count, flags: SVC_FLAG_CLUSTER_IP, svc_id, affinity_timeout_s: 0 };
        m.insert(key(0), v, 0).unwrap_or_else(|e| panic!("insert frontend {vip}: {e:?}"));
    }

    fn add_service(&mut self, vip: SocketAddrV4, proto: u8, svc_id: u32, backends: &[(u32, SocketAddrV4)]) {
        for (id, a) in backends {
            self.add_backend(*id, *a, proto);
        }
        let ids: Vec<u32> = backends.iter().map(|(id, _)| *id).collect();
        self.add_frontend(vip, proto, svc_id, &ids);
    }

    /// Runs the program once on `input`: (verdict, output frame).
    fn try_run(&self, input: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(TC_INGRESS_PROG)
            .expect("program")
            .try_into()
            .expect("sched_cls");
        // Room for a reject (70 bytes) built from a smaller packet.
        let mut out = vec![0u8; input.len() + 512];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        out.truncate(usize::try_from(r.data_size_out).expect("size"));
        Ok((r.return_value, out))
    }

    fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(input)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN failed: {e:?}\ninput:\n{}", hex(input)))
    }

    /// Runs a packet that must be DNATed; returns the output parsed.
    fn run_translated(&self, input: &[u8]) -> integration_tests::packet::Parsed {
        let (verdict, out) = self.run(input);
        assert_eq!(verdict, TC_ACT_OK, "verdict\ninput:\n{}\noutput:\n{}", hex(input), hex(&out));
        let p = parse(&out).unwrap_or_else(|e| panic!("output does not parse: {e}\n{}", hex(&out)));
        p.verify_checksums().unwrap_or_else(|e| panic!("{e}\noutput:\n{}", hex(&out)));
        p
    }

    /// Every counter, summed over CPUs, by reason index.
    fn stats(&self) -> BTreeMap<u32, StatCounter> {
        let m = PerCpuArray::<_, StatCounter>::try_from(self.ebpf.map(STATS_MAP).expect("stats map"))
            .expect("stats map type");
        REASONS
            .iter()
            .map(|(idx, _)| {
                let per_cpu = m.get(idx, 0).unwrap_or_else(|e| panic!("read stats {idx}: {e:?}"));
                let sum = per_cpu.iter().fold(StatCounter::default(), |a, c| StatCounter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                });
                (*idx, sum)
            })
            .collect()
    }

    fn stat(&self, reason: u32) -> StatCounter {
        self.stats()[&reason]
    }

    /// Checks that exactly the given reasons counted the given numbers of
    /// packets and every other reason counted none.
    fn check_stats(&self, expected: &[(u32, u64)]) -> Result<(), String> {
        let got = self.stats();
        let mut errors = Vec::new();
        for (idx, name) in REASONS {
            let want = expected.iter().find(|(r, _)| r == idx).map_or(0, |(_, n)| *n);
            if got[idx].packets != want {
                errors.push(format!("{name}: {} packets, expected {want}", got[idx].packets));
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(format!("counters: {}", errors.join("; "))) }
    }

    fn ct(&self) -> BTreeMap<(u8, u32, u16, u32, u16, u8), CtValue> {
        let m = HashMap::<_, CtKey, CtValue>::try_from(self.ebpf.map(CT_MAP).expect("ct map")).expect("ct map type");
        m.iter()
            .map(|r| {
                let (k, v) = r.unwrap_or_else(|e| panic!("read ct: {e:?}"));
                ((k.dir, k.saddr_be, k.sport_be, k.daddr_be, k.dport_be, k.proto), v)
            })
            .collect()
    }

    fn ct_get(&self, key: &CtKey) -> Option<CtValue> {
        let m = HashMap::<_, CtKey, CtValue>::try_from(self.ebpf.map(CT_MAP).expect("ct map")).expect("ct map type");
        m.get(key, 0).ok()
    }
}

/// Which backend of `backends` the packet was sent to.
fn backend_of(dst: SocketAddrV4, backends: &[(u32, SocketAddrV4)]) -> Option<u32> {
    backends.iter().find(|(_, a)| *a == dst).map(|(id, _)| *id)
}

/// Checks the two conntrack entries of a new flow `client` → `vip` sent to
/// backend `id` at `backend`, and that there are no others.
fn check_ct_flow(
    dp: &Datapath,
    client: SocketAddrV4,
    vip: SocketAddrV4,
    proto: u8,
    svc_id: u32,
    (id, backend): (u32, SocketAddrV4),
) -> Result<(), String> {
    let fwd_key = ct_key(client, vip, proto, CT_DIR_SERVICE);
    let rev_key = ct_key(backend, client, proto, CT_DIR_REPLY);
    let fwd = dp.ct_get(&fwd_key).ok_or_else(|| format!("no CT_DIR_SERVICE entry {fwd_key:?}"))?;
    let rev = dp.ct_get(&rev_key).ok_or_else(|| format!("no CT_DIR_REPLY entry {rev_key:?}"))?;
    let ok = |v: &CtValue, to: SocketAddrV4| {
        v.nat_addr_be == be_addr(to)
            && v.nat_port_be == to.port().to_be()
            && v.backend_id == id
            && v.svc_id == svc_id
            && v.last_seen_ns != 0
    };
    if !ok(&fwd, backend) {
        return Err(format!("CT_DIR_SERVICE entry {fwd:?}, expected nat {backend} backend {id} svc {svc_id}"));
    }
    if !ok(&rev, vip) {
        return Err(format!("CT_DIR_REPLY entry {rev:?}, expected nat {vip} backend {id} svc {svc_id}"));
    }
    let n = dp.ct().len();
    if n != 2 {
        return Err(format!("{n} conntrack entries, expected 2"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Single-packet cases
// ---------------------------------------------------------------------------

enum Input {
    /// A well-formed frame (kept as a builder so the expected output can be
    /// built the same way).
    Frame(FrameBuilder),
    Raw(Vec<u8>),
}

impl Input {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Input::Frame(b) => b.build(),
            Input::Raw(r) => r.clone(),
        }
    }
}

enum Expect {
    /// The kernel refuses the input (`BPF_PROG_TEST_RUN` fails).
    KernelError,
    /// This verdict, the frame unchanged, no conntrack entry.
    Unchanged(u32),
    /// `TC_ACT_OK`, destination rewritten to one of these backends, all else
    /// as built, both conntrack entries written with the service id.
    Dnat { backends: &'static [(u32, SocketAddrV4)], svc_id: u32 },
    /// `TC_ACT_REDIRECT` with an ICMP port unreachable to the client.
    IcmpPortUnreachable,
}

struct Case {
    name: &'static str,
    /// Map contents on top of [`Datapath::standard`].
    setup: fn(&mut Datapath),
    input: Input,
    expect: Expect,
    /// The reason that must count the packet (every other reason stays 0).
    counted: Option<u32>,
}

fn no_setup(_: &mut Datapath) {}

fn empty_frontends(dp: &mut Datapath) {
    dp.add_frontend(EMPTY_VIP, proto::TCP, 10, &[]);
    dp.add_frontend(EMPTY_VIP, proto::UDP, 11, &[]);
}

fn broken_frontend(dp: &mut Datapath) {
    dp.add_frontend(BROKEN_VIP, proto::TCP, 12, &[MISSING_BACKEND_ID]);
    dp.add_frontend(BROKEN_VIP, proto::UDP, 13, &[MISSING_BACKEND_ID]);
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// The ICMP error the datapath must build for `input`.
fn check_port_unreachable(input: &[u8], out: &[u8]) -> Result<(), String> {
    let orig = parse(input)?;
    let p = parse(out)?;
    ensure!(out.len() == ETH_HLEN + IPV4_HLEN + 8 + IPV4_HLEN + 8, "reject of {} bytes, expected 70", out.len());
    ensure!(
        p.eth.dst_mac == orig.eth.src_mac && p.eth.src_mac == orig.eth.dst_mac,
        "MACs not swapped: {:02x?}",
        p.eth
    );
    ensure!(p.eth.ethertype == ETH_P_IP, "ethertype {:#06x}", p.eth.ethertype);
    ensure!(p.ip.version == 4 && p.ip.ihl == 5, "IPv4 version/IHL {}/{}", p.ip.version, p.ip.ihl);
    ensure!(p.ip.proto == proto::ICMP, "protocol {}", p.ip.proto);
    ensure!(p.ip.src == orig.ip.dst, "ICMP from {}, expected the VIP {}", p.ip.src, orig.ip.dst);
    ensure!(p.ip.dst == orig.ip.src, "ICMP to {}, expected the client {}", p.ip.dst, orig.ip.src);
    ensure!(usize::from(p.ip.total_len) == out.len() - ETH_HLEN, "IPv4 total length {}", p.ip.total_len);
    ensure!(p.ip.ttl > 0, "TTL 0");
    ensure!(!p.ip.more_fragments && p.ip.frag_offset == 0, "ICMP error is a fragment");
    p.verify_checksums()?;
    let L4Header::Icmp(m) = &p.l4 else {
        return Err(format!("not ICMP: {:?}", p.l4));
    };
    ensure!(
        m.ty == icmp::DEST_UNREACH && m.code == icmp::PORT_UNREACH,
        "ICMP type {} code {}, expected 3/3",
        m.ty,
        m.code
    );
    ensure!(m.rest == [0; 4], "unused ICMP bytes {:02x?}", m.rest);
    let quote = &input[ETH_HLEN..ETH_HLEN + IPV4_HLEN + 8];
    ensure!(m.data == quote, "quote {:02x?}, expected {:02x?}", m.data, quote);
    Ok(())
}

fn check_case(case: &Case) -> Result<(), String> {
    let mut dp = Datapath::standard();
    (case.setup)(&mut dp);
    let input = case.input.bytes();
    let (verdict, out) = match (dp.try_run(&input), &case.expect) {
        (Err(_), Expect::KernelError) => return dp.check_stats(&[]),
        (Err(e), _) => return Err(format!("BPF_PROG_TEST_RUN failed: {e:?}")),
        (Ok((v, _)), Expect::KernelError) => return Err(format!("the kernel ran it: verdict {v:#x}")),
        (Ok(r), _) => r,
    };
    let ctx = || format!("\ninput:\n{}\noutput:\n{}", hex(&input), hex(&out));
    let want_verdict = match case.expect {
        Expect::KernelError => unreachable!(),
        Expect::Unchanged(v) => v,
        Expect::Dnat { .. } => TC_ACT_OK,
        Expect::IcmpPortUnreachable => TC_ACT_REDIRECT,
    };
    ensure!(verdict == want_verdict, "verdict {verdict:#x}, expected {want_verdict:#x}{}", ctx());
    match &case.expect {
        Expect::KernelError => unreachable!(),
        Expect::Unchanged(_) => ensure!(out == input, "frame changed{}", ctx()),
        Expect::IcmpPortUnreachable => check_port_unreachable(&input, &out).map_err(|e| e + &ctx())?,
        Expect::Dnat { backends, svc_id } => {
            let Input::Frame(b) = &case.input else {
                return Err("a DNAT case needs a built frame".into());
            };
            let p = parse(&out).map_err(|e| e + &ctx())?;
            p.verify_checksums().map_err(|e| e + &ctx())?;
            let id = backend_of(p.dst(), backends)
                .ok_or_else(|| format!("sent to {}, not a backend{}", p.dst(), ctx()))?;
            let backend = p.dst();
            // Everything but the destination (and the checksums) as built.
            let want = b.clone().with_dst(backend).build();
            ensure!(out == want, "output differs from the input DNATed to {backend}; expected:\n{}{}", hex(&want), ctx());
            if let L4::Udp { zero_checksum: true, .. } = b.l4 {
                ensure!(p.l4_checksum_field() == 0, "UDP checksum 0 became {:#06x}", p.l4_checksum_field());
            }
            let client = SocketAddrV4::new(b.src, p.src().port());
            let vip = parse(&input)?.dst();
            check_ct_flow(&dp, client, vip, b.l4.proto(), *svc_id, (id, backend))?;
        }
    }
    if !matches!(case.expect, Expect::Dnat { .. }) {
        let n = dp.ct().len();
        ensure!(n == 0, "{n} conntrack entries, expected none");
    }
    if let Some(reason) = case.counted {
        let c = dp.stat(reason);
        ensure!(c.bytes == input.len() as u64, "counted {} bytes, expected {}", c.bytes, input.len());
    }
    let counted: Vec<(u32, u64)> = case.counted.iter().map(|r| (*r, 1)).collect();
    dp.check_stats(&counted)
}

/// Runs every case (each on a fresh datapath) and reports all failures.
fn run_cases(cases: &[Case]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| check_case(c).err().map(|e| format!("--- {}: {e}", c.name)))
        .collect();
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

fn tcp_syn(dst: SocketAddrV4) -> FrameBuilder {
    FrameBuilder::tcp(CLIENT, dst, tcp_flags::SYN)
}

fn udp(dst: SocketAddrV4) -> FrameBuilder {
    FrameBuilder::udp(CLIENT, dst)
}

fn cut(b: &FrameBuilder, len: usize) -> Input {
    let mut f = b.build();
    assert!(len < f.len());
    f.truncate(len);
    Input::Raw(f)
}

/// IPv4 Router Alert (RFC 2113), 4 bytes.
const OPT_ROUTER_ALERT: [u8; 4] = [0x94, 0x04, 0x00, 0x00];

#[test]
fn new_flows_are_dnated_to_a_backend() {
    let tcp = Expect::Dnat { backends: &TCP_BACKENDS, svc_id: TCP_SVC_ID };
    let udp_ = || Expect::Dnat { backends: &UDP_BACKENDS, svc_id: UDP_SVC_ID };
    let dnat = Some(stats::DNAT_NEW);
    let opts8 = [OPT_ROUTER_ALERT, [1, 1, 1, 0]].concat();
    run_cases(&[
        Case { name: "TCP SYN", setup: no_setup, input: Input::Frame(tcp_syn(VIP)), expect: tcp, counted: dnat },
        Case {
            name: "TCP SYN with data",
            setup: no_setup,
            input: Input::Frame(tcp_syn(VIP).with_payload(&[0xab; 333])),
            expect: Expect::Dnat { backends: &TCP_BACKENDS, svc_id: TCP_SVC_ID },
            counted: dnat,
        },
        Case { name: "UDP with checksum", setup: no_setup, input: Input::Frame(udp(VIP)), expect: udp_(), counted: dnat },
        Case {
            name: "UDP with checksum 0 (none) keeps 0",
            setup: no_setup,
            input: Input::Frame(udp(VIP).with_udp_zero_checksum()),
            expect: udp_(),
            counted: dnat,
        },
        Case {
            name: "UDP without payload",
            setup: no_setup,
            input: Input::Frame(udp(VIP).with_payload(&[])),
            expect: udp_(),
            counted: dnat,
        },
        Case {
            name: "UDP to the UDP-only frontend",
            setup: no_setup,
            input: Input::Frame(udp(DNS_VIP)),
            expect: Expect::Dnat { backends: &DNS_BACKENDS, svc_id: DNS_SVC_ID },
            counted: dnat,
        },
        Case {
            name: "TCP SYN with IP options (IHL 6)",
            setup: no_setup,
            input: Input::Frame(tcp_syn(VIP).with_options(&OPT_ROUTER_ALERT)),
            expect: Expect::Dnat { backends: &TCP_BACKENDS, svc_id: TCP_SVC_ID },
            counted: dnat,
        },
        Case {
            name: "TCP SYN with IP options (IHL 7)",
            setup: no_setup,
            input: Input::Frame(tcp_syn(VIP).with_options(&opts8)),
            expect: Expect::Dnat { backends: &TCP_BACKENDS, svc_id: TCP_SVC_ID },
            counted: dnat,
        },
        Case {
            name: "TCP SYN with 40 bytes of IP options (IHL 15)",
            setup: no_setup,
            input: Input::Frame(tcp_syn(VIP).with_options(&[1; 40])),
            expect: Expect::Dnat { backends: &TCP_BACKENDS, svc_id: TCP_SVC_ID },
            counted: dnat,
        },
        Case {
            name: "UDP with IP options (IHL 6)",
            setup: no_setup,
            input: Input::Frame(udp(VIP).with_options(&OPT_ROUTER_ALERT)),
            expect: udp_(),
            counted: dnat,
        },
        Case {
            name: "UDP checksum 0 with IP options (IHL 7)",
            setup: no_setup,
            input: Input::Frame(udp(VIP).with_options(&opts8).with_udp_zero_checksum()),
            expect: udp_(),
            counted: dnat,
        },
    ]);
}

#[test]
fn frontend_without_backends_rejects_with_icmp_port_unreachable() {
    let reject = Some(stats::REJECT_NO_BACKEND);
    run_cases(&[
        Case {
            name: "TCP SYN",
            setup: empty_frontends,
            input: Input::Frame(tcp_syn(EMPTY_VIP)),
            expect: Expect::IcmpPortUnreachable,
            counted: reject,
        },
        Case {
            name: "TCP SYN with 1000 bytes of data (frame shrinks)",
            setup: empty_frontends,
            input: Input::Frame(tcp_syn(EMPTY_VIP).with_payload(&[7; 1000])),
            expect: Expect::IcmpPortUnreachable,
            counted: reject,
        },
        Case {
            name: "UDP",
            setup: empty_frontends,
            input: Input::Frame(udp(EMPTY_VIP)),
            expect: Expect::IcmpPortUnreachable,
            counted: reject,
        },
        Case {
            name: "UDP, checksum 0, no payload (42-byte frame grows to 70)",
            setup: empty_frontends,
            input: Input::Frame(udp(EMPTY_VIP).with_payload(&[]).with_udp_zero_checksum()),
            expect: Expect::IcmpPortUnreachable,
            counted: reject,
        },
        Case {
            name: "TCP SYN with IP options: no reject built, dropped",
            setup: empty_frontends,
            input: Input::Frame(tcp_syn(EMPTY_VIP).with_options(&OPT_ROUTER_ALERT)),
            expect: Expect::Unchanged(TC_ACT_SHOT),
            counted: Some(stats::DROP_NO_BACKEND),
        },
    ]);
}

#[test]
fn packets_not_for_a_frontend_pass_unchanged() {
    let no_svc = Some(stats::PASS_NO_SERVICE);
    let pass = || Expect::Unchanged(TC_ACT_UNSPEC);
    let gre = FrameBuilder { l4: L4::Other { proto: 47 }, ..FrameBuilder::icmp_echo(*CLIENT.ip(), *VIP.ip()) };
    run_cases(&[
        Case {
            name: "TCP to another address",
            setup: no_setup,
            input: Input::Frame(tcp_syn(addr([10, 96, 0, 99], 80))),
            expect: pass(),
            counted: no_svc,
        },
        Case {
            name: "TCP to the VIP on another port",
            setup: no_setup,
            input: Input::Frame(tcp_syn(addr([10, 96, 0, 10], 81))),
            expect: pass(),
            counted: no_svc,
        },
        Case {
            name: "TCP to a UDP-only frontend",
            setup: no_setup,
            input: Input::Frame(tcp_syn(DNS_VIP)),
            expect: pass(),
            counted: no_svc,
        },
        Case {
            name: "UDP to the VIP on another port",
            setup: no_setup,
            input: Input::Frame(udp(addr([10, 96, 0, 10], 443))),
            expect: pass(),
            counted: no_svc,
        },
        Case {
            name: "reply-shaped packet from a backend without a conntrack entry",
            setup: no_setup,
            input: Input::Frame(FrameBuilder::tcp(TCP_BACKENDS[0].1, CLIENT, tcp_flags::SYN | tcp_flags::ACK)),
            expect: pass(),
            counted: no_svc,
        },
        Case {
            name: "ARP request",
            setup: no_setup,
            input: Input::Raw(arp_request(CLIENT_MAC, *CLIENT.ip(), *VIP.ip())),
            expect: pass(),
            counted: Some(stats::PASS_NOT_IPV4),
        },
        Case {
            name: "IPv6 UDP",
            setup: no_setup,
            input: Input::Raw(ipv6_udp(
                "2001:db8::2".parse::<Ipv6Addr>().expect("v6"),
                40000,
                "fd00::10".parse::<Ipv6Addr>().expect("v6"),
                80,
                b"hi",
            )),
            expect: pass(),
            counted: Some(stats::PASS_NOT_IPV4),
        },
        Case {
            name: "ICMP echo to the VIP",
            setup: no_setup,
            input: Input::Frame(FrameBuilder::icmp_echo(*CLIENT.ip(), *VIP.ip())),
            expect: pass(),
            counted: Some(stats::PASS_OTHER_PROTO),
        },
        Case {
            name: "GRE (protocol 47) to the VIP",
            setup: no_setup,
            input: Input::Frame(gre.with_payload(&[0; 8])),
            expect: pass(),
            counted: Some(stats::PASS_OTHER_PROTO),
        },
    ]);
}

#[test]
fn malformed_packets_pass_unchanged_and_are_counted() {
    let trunc = Some(stats::MALFORMED_TRUNCATED);
    let bad_ihl = Some(stats::MALFORMED_BAD_IHL);
    let frag = Some(stats::PASS_FRAGMENT);
    let pass = || Expect::Unchanged(TC_ACT_UNSPEC);
    let syn = tcp_syn(VIP);
    let l4 = ETH_HLEN + IPV4_HLEN;
    run_cases(&[
        Case {
            name: "13 bytes: shorter than Ethernet, refused by the kernel",
            setup: no_setup,
            input: cut(&syn, ETH_HLEN - 1),
            expect: Expect::KernelError,
            counted: None,
        },
        Case { name: "Ethernet header only", setup: no_setup, input: cut(&syn, ETH_HLEN), expect: pass(), counted: trunc },
        Case {
            name: "IPv4 header cut at 10 bytes",
            setup: no_setup,
            input: cut(&syn, ETH_HLEN + 10),
            expect: pass(),
            counted: trunc,
        },
        Case {
            name: "IPv4 header cut at 19 bytes",
            setup: no_setup,
            input: cut(&syn, ETH_HLEN + 19),
            expect: pass(),
            counted: trunc,
        },
        Case { name: "no L4 header", setup: no_setup, input: cut(&syn, l4), expect: pass(), counted: trunc },
        Case {
            name: "TCP header cut at 10 bytes (before the flags)",
            setup: no_setup,
            input: cut(&syn, l4 + 10),
            expect: pass(),
            counted: trunc,
        },
        Case {
            name: "TCP header cut at 16 bytes (before the checksum)",
            setup: no_setup,
            input: cut(&syn, l4 + 16),
            expect: pass(),
            counted: trunc,
        },
        Case {
            name: "TCP header cut at 19 bytes",
            setup: no_setup,
            input: cut(&syn, l4 + 19),
            expect: pass(),
            counted: trunc,
        },
        Case {
            name: "UDP header cut at 6 bytes",
            setup: no_setup,
            input: cut(&udp(VIP), l4 + 6),
            expect: pass(),
            counted: trunc,
        },
        Case {
            name: "IHL 15 on a 20-byte header: L4 beyond the end",
            setup: no_setup,
            input: Input::Frame(syn.clone().with_ihl(15)),
            expect: pass(),
            counted: trunc,
        },
        Case {
            name: "IHL 3",
            setup: no_setup,
            input: Input::Frame(syn.clone().with_ihl(3)),
            expect: pass(),
            counted: bad_ihl,
        },
        Case {
            name: "IHL 0",
            setup: no_setup,
            input: Input::Frame(syn.clone().with_ihl(0)),
            expect: pass(),
            counted: bad_ihl,
        },
        Case {
            name: "version 6 with the IPv4 ethertype",
            setup: no_setup,
            input: Input::Frame(syn.clone().with_version(6)),
            expect: pass(),
            counted: bad_ihl,
        },
        Case {
            name: "TCP first fragment (MF) to the VIP",
            setup: no_setup,
            input: Input::Frame(syn.clone().with_payload(&[1; 64]).with_more_fragments()),
            expect: pass(),
            counted: frag,
        },
        Case {
            name: "UDP first fragment (MF) to the VIP",
            setup: no_setup,
            input: Input::Frame(udp(VIP).with_more_fragments()),
            expect: pass(),
            counted: frag,
        },
        Case {
            name: "UDP last fragment (offset 185) to the VIP",
            setup: no_setup,
            input: Input::Frame(udp(VIP).with_frag_offset(185)),
            expect: pass(),
            counted: frag,
        },
        Case {
            name: "UDP middle fragment (MF, offset 1) to the VIP",
            setup: no_setup,
            input: Input::Frame(udp(VIP).with_more_fragments().with_frag_offset(1)),
            expect: pass(),
            counted: frag,
        },
    ]);
}

#[test]
fn slot_pointing_at_a_missing_backend_drops() {
    let missing = Some(stats::DROP_BACKEND_MISSING);
    run_cases(&[
        Case {
            name: "TCP SYN",
            setup: broken_frontend,
            input: Input::Frame(tcp_syn(BROKEN_VIP)),
            expect: Expect::Unchanged(TC_ACT_SHOT),
            counted: missing,
        },
        Case {
            name: "UDP",
            setup: broken_frontend,
            input: Input::Frame(udp(BROKEN_VIP)),
            expect: Expect::Unchanged(TC_ACT_SHOT),
            counted: missing,
        },
    ]);
}

// ---------------------------------------------------------------------------
// Flows
// ---------------------------------------------------------------------------

/// Sends the first packet of a flow; returns the backend it went to.
fn open_flow(dp: &Datapath, first: &FrameBuilder, backends: &[(u32, SocketAddrV4)]) -> (u32, SocketAddrV4) {
    let p = dp.run_translated(&first.build());
    let dst = p.dst();
    let id = backend_of(dst, backends).unwrap_or_else(|| panic!("first packet sent to {dst}, not a backend"));
    (id, dst)
}

#[test]
fn replies_get_the_frontend_as_source() {
    for (name, proto, backends, svc_id) in [
        ("TCP", proto::TCP, &TCP_BACKENDS, TCP_SVC_ID),
        ("UDP", proto::UDP, &UDP_BACKENDS, UDP_SVC_ID),
    ] {
        let dp = Datapath::standard();
        let first = if proto == proto::TCP { tcp_syn(VIP) } else { udp(VIP) };
        let (id, backend) = open_flow(&dp, &first, backends);
        check_ct_flow(&dp, CLIENT, VIP, proto, svc_id, (id, backend)).unwrap_or_else(|e| panic!("{name}: {e}"));

        let replies = if proto == proto::TCP {
            vec![
                FrameBuilder::tcp(backend, CLIENT, tcp_flags::SYN | tcp_flags::ACK).with_tcp_seq(5000, 1001),
                FrameBuilder::tcp(backend, CLIENT, tcp_flags::ACK).with_tcp_seq(5001, 1001),
                FrameBuilder::tcp(backend, CLIENT, tcp_flags::ACK | tcp_flags::PSH)
                    .with_tcp_seq(5001, 1001)
                    .with_payload(b"HTTP/1.1 200 OK\r\n\r\n"),
                FrameBuilder::tcp(backend, CLIENT, tcp_flags::FIN | tcp_flags::ACK).with_tcp_seq(5020, 1001),
            ]
        } else {
            vec![
                FrameBuilder::udp(backend, CLIENT).with_payload(b"answer"),
                FrameBuilder::udp(backend, CLIENT).with_payload(b"answer").with_udp_zero_checksum(),
            ]
        };
        for reply in &replies {
            let reply = reply.clone().with_macs(NODE_MAC, CLIENT_MAC);
            let input = reply.build();
            let p = dp.run_translated(&input);
            assert_eq!(p.src(), VIP, "{name}: reply source not restored");
            assert_eq!(p.dst(), CLIENT, "{name}: reply destination changed");
            let want = reply.clone().with_src(VIP).build();
            let out = dp.run_translated(&input); // idempotent: same input, same output
            assert_eq!(out, p);
            assert!(
                parse(&want).expect("built") == p,
                "{name}: reply differs from the input with source {VIP}\nexpected:\n{}\ninput:\n{}",
                hex(&want),
                hex(&input)
            );
            if let L4::Udp { zero_checksum: true, .. } = reply.l4 {
                assert_eq!(p.l4_checksum_field(), 0, "{name}: UDP checksum 0 changed");
            }
        }
        let n = u64::try_from(replies.len() * 2).expect("count");
        dp.check_stats(&[(stats::DNAT_NEW, 1), (stats::REV_NAT, n)])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn established_tcp_flow_keeps_its_backend() {
    let dp = Datapath::standard();
    let (id, backend) = open_flow(&dp, &tcp_syn(VIP), &TCP_BACKENDS);
    for i in 0..50_u32 {
        let pkt = FrameBuilder::tcp(CLIENT, VIP, tcp_flags::ACK | if i % 2 == 0 { 0 } else { tcp_flags::PSH })
            .with_tcp_seq(1001 + i * 10, 5001)
            .with_payload(&vec![u8::try_from(i).expect("byte"); usize::try_from(i % 2 * 10).expect("len")]);
        let p = dp.run_translated(&pkt.build());
        assert_eq!(p.dst(), backend, "packet {i} of the flow moved from backend {id} to {}", p.dst());
        assert_eq!(parse(&pkt.with_dst(backend).build()).expect("built"), p, "packet {i}");
    }
    check_ct_flow(&dp, CLIENT, VIP, proto::TCP, TCP_SVC_ID, (id, backend)).unwrap_or_else(|e| panic!("{e}"));
    dp.check_stats(&[(stats::DNAT_NEW, 1), (stats::DNAT_ESTABLISHED, 50)])
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn udp_flow_keeps_its_backend() {
    let dp = Datapath::standard();
    let (id, backend) = open_flow(&dp, &udp(VIP), &UDP_BACKENDS);
    for i in 0..50_u8 {
        let mut pkt = udp(VIP).with_payload(&[i; 7]);
        if i % 3 == 0 {
            pkt = pkt.with_udp_zero_checksum();
        }
        let p = dp.run_translated(&pkt.build());
        assert_eq!(p.dst(), backend, "datagram {i} of the flow moved from backend {id} to {}", p.dst());
        assert_eq!(parse(&pkt.with_dst(backend).build()).expect("built"), p, "datagram {i}");
    }
    check_ct_flow(&dp, CLIENT, VIP, proto::UDP, UDP_SVC_ID, (id, backend)).unwrap_or_else(|e| panic!("{e}"));
    dp.check_stats(&[(stats::DNAT_NEW, 1), (stats::DNAT_ESTABLISHED, 50)])
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn new_tcp_flows_are_spread_over_the_backends() {
    const FLOWS: u16 = 200;
    let dp = Datapath::standard();
    let mut hits: BTreeMap<u32, u32> = BTreeMap::new();
    for sport in 40000..40000 + FLOWS {
        let client = SocketAddrV4::new(*CLIENT.ip(), sport);
        let (id, _) = open_flow(&dp, &FrameBuilder::tcp(client, VIP, tcp_flags::SYN), &TCP_BACKENDS);
        *hits.entry(id).or_default() += 1;
    }
    for (id, a) in TCP_BACKENDS {
        let n = hits.get(&id).copied().unwrap_or(0);
        assert!(n >= 20, "backend {id} ({a}) got {n} of {FLOWS} new flows: {hits:?}");
    }
    assert_eq!(dp.ct().len(), 2 * usize::from(FLOWS), "two conntrack entries per flow");
    dp.check_stats(&[(stats::DNAT_NEW, u64::from(FLOWS))]).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn counters_sum_bytes_over_packets() {
    let dp = Datapath::standard();
    let a = tcp_syn(VIP).build();
    let b = tcp_syn(addr([10, 96, 0, 99], 80)).with_payload(&[0; 100]).build();
    dp.run(&a);
    dp.run(&b);
    dp.run(&b);
    let dnat = dp.stat(stats::DNAT_NEW);
    let pass = dp.stat(stats::PASS_NO_SERVICE);
    assert_eq!((dnat.packets, dnat.bytes), (1, a.len() as u64));
    assert_eq!((pass.packets, pass.bytes), (2, 2 * b.len() as u64));
}
