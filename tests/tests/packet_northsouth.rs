//! North-south translations (`NodePort`, `externalIP`, `LoadBalancer`), packet by
//! packet through `BPF_PROG_TEST_RUN`: the TC ingress program, the TC egress
//! program and the XDP fast path.
//!
//! Source NAT to a backend on another node needs `bpf_fib_lookup` (the
//! address MASQUERADE would pick, the egress device), and under `test_run` the
//! helper answers from the routing of the *calling thread's* network
//! namespace, through the device the run's context names. So every test
//! builds a node in a namespace of its own and runs the programs on a thread
//! inside it:
//!
//! ```text
//!  clients 203.0.113.0/24 ── router 192.0.2.254 ──┐
//!  node C 192.0.2.3 (pods 10.244.2.0/24) ─────────┤ ext0 192.0.2.1/24   (NodePort address)
//!                                                 │
//!  node B 172.18.0.2 (pods 10.244.1.0/24) ──────── int0 172.18.0.1/24
//!  local pod 10.244.0.11 ───────────────────────── lxc0 10.244.0.1/24
//!  (10.244.3.0/24 via 172.18.0.9: a next hop without a neighbour entry)
//! ```
//!
//! The devices are veth pairs whose peers stay in the namespace; forwarding
//! is on (`bpf_fib_lookup` answers `FWD_DISABLED` otherwise); the next hops
//! the XDP path must resolve have permanent neighbour entries. Each packet
//! is put on the device it would arrive on (`__sk_buff.ifindex`,
//! `xdp_md.ingress_ifindex`). Nothing is attached and no packet leaves the
//! test: under `test_run` a redirect is only a verdict, and the frame that
//! would have been sent is the run's output, which the tests compare byte
//! for byte with the frame they expect (built from scratch, so every
//! checksum is checked too), together with the conntrack entries and the
//! exit-reason counters.
//!
//! Needs root (namespaces, `BPF_PROG_TEST_RUN`).
use std::{
    collections::{BTreeMap, HashSet},
    ffi::CString,
    net::{Ipv4Addr, SocketAddrV4},
    panic::resume_unwind,
};

use aya::{
    Ebpf,
    maps::HashMap,
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use integration_tests::{
    netns::{Netns, enter, require_root, unique_name},
    packet::{
        CLIENT_MAC, ETH_HLEN, FrameBuilder, IPV4_HLEN, L4, NODE_MAC, Parsed, arp_request, checksum,
        hex, icmp, parse, quote_of, skb_ctx, stats_by_reason, tcp_flags, xdp_md_ctx,
    },
};
use proxy_agent::{
    datapath::ebpf_object,
    pins::{TcHook, XDP_PROG},
};
use proxy_common::{
    backend::{BACKEND_F_LOCAL, BACKEND_MAP, Backend},
    ct::{
        CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_CLOSING, CT_F_REDIRECT, CT_F_SNAT, CT_MAP, CT_NEW_MAP, CtKey,
        CtValue, SNAT_PORT_MAX, SNAT_PORT_MIN,
    },
    proto,
    stats::{self, REASONS, StatCounter},
    svc::{
        SVC_FLAG_CLUSTER_IP, SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_EXTERNAL_IP,
        SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT, SVC_FLAG_POLICY_LOCAL, SVC_FLAG_SNAT_REMOTE,
        SVC_MAP, SvcKey, SvcValue,
    },
};

// Verdicts as BPF_PROG_TEST_RUN reports them.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// `TC_ACT_UNSPEC` (-1): TCX "next", the pass-through verdict.
const TC_NEXT: u32 = (-1_i32).cast_unsigned();
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

// ---------------------------------------------------------------------------
// The node
// ---------------------------------------------------------------------------

const fn ip4(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::new(a[0], a[1], a[2], a[3])
}

const fn sa(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip4(a), port)
}

/// ext0's address: the `NodePort` address, and the SNAT source towards node C.
const NODE_EXT: Ipv4Addr = ip4([192, 0, 2, 1]);
/// int0's address: the SNAT source towards node B.
const NODE_INT: Ipv4Addr = ip4([172, 18, 0, 1]);
/// lxc0's address: the SNAT source of a hairpin.
const NODE_POD_GW: Ipv4Addr = ip4([10, 244, 0, 1]);
const ROUTER: Ipv4Addr = ip4([192, 0, 2, 254]);
const NODE_B: Ipv4Addr = ip4([172, 18, 0, 2]);

const CLIENT: SocketAddrV4 = sa([203, 0, 113, 7], 40000);
/// Another client with the same source port.
const CLIENT2: SocketAddrV4 = sa([203, 0, 113, 8], 40000);

const LOCAL_POD: SocketAddrV4 = sa([10, 244, 0, 11], 8080);
const LOCAL_POD2: SocketAddrV4 = sa([10, 244, 0, 12], 8080);
/// On node B, behind int0.
const POD_B: SocketAddrV4 = sa([10, 244, 1, 11], 8080);
/// On node C, behind ext0 (the device clients come in on).
const POD_C: SocketAddrV4 = sa([10, 244, 2, 11], 8080);
/// Routed through a next hop whose MAC is unknown.
const POD_NO_NEIGH: SocketAddrV4 = sa([10, 244, 3, 11], 8080);
/// No route at all.
const POD_UNROUTED: SocketAddrV4 = sa([10, 99, 0, 11], 8080);

const EXT0_MAC: [u8; 6] = NODE_MAC;
const INT0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const LXC0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
const ROUTER_MAC: [u8; 6] = CLIENT_MAC;
const NODE_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
const NODE_C_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0x03];
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The node's devices, by ifindex in its namespace.
#[derive(Clone, Debug)]
struct Links {
    ns_path: String,
    ext0: u32,
    int0: u32,
    lxc0: u32,
}

fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).expect("device name");
    // SAFETY: a valid C string; the call only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(i != 0, "no device {name} in this namespace");
    i
}

fn build_node(ns: &Netns) {
    for (dev, peer, m, addr) in [
        ("ext0", "ext0p", EXT0_MAC, "192.0.2.1/24"),
        ("int0", "int0p", INT0_MAC, "172.18.0.1/24"),
        ("lxc0", "lxc0p", LXC0_MAC, "10.244.0.1/24"),
    ] {
        ns.ip(&[
            "link",
            "add",
            dev,
            "address",
            &mac(m),
            "type",
            "veth",
            "peer",
            "name",
            peer,
        ]);
        ns.ip(&["addr", "add", addr, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
        ns.ip(&["link", "set", peer, "up"]);
    }
    for (net, via, dev) in [
        ("203.0.113.0/24", "192.0.2.254", "ext0"),
        ("10.244.1.0/24", "172.18.0.2", "int0"),
        ("10.244.2.0/24", "192.0.2.3", "ext0"),
        ("10.244.3.0/24", "172.18.0.9", "int0"),
    ] {
        ns.ip(&["route", "add", net, "via", via, "dev", dev]);
    }
    for (addr, m, dev) in [
        ("192.0.2.254", ROUTER_MAC, "ext0"),
        ("192.0.2.3", NODE_C_MAC, "ext0"),
        ("172.18.0.2", NODE_B_MAC, "int0"),
        ("10.244.0.11", POD_MAC, "lxc0"),
    ] {
        ns.ip(&[
            "neigh",
            "replace",
            addr,
            "lladdr",
            &mac(m),
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
    }
    ns.sysctl("net.ipv4.ip_forward", "1");
}

/// Builds the node in a new namespace and runs `f` on a thread inside it;
/// the namespace is deleted afterwards, also when `f` panics.
fn on_node<T: Send>(f: impl FnOnce(&Links) -> T + Send) -> T {
    require_root();
    let ns = Netns::create(&unique_name("pns"));
    build_node(&ns);
    let path = ns.path();
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            enter(&path);
            let links = Links {
                ns_path: path.clone(),
                ext0: ifindex("ext0"),
                int0: ifindex("int0"),
                lxc0: ifindex("lxc0"),
            };
            f(&links)
        })
        .join()
    });
    drop(ns);
    r.unwrap_or_else(|p| resume_unwind(p))
}

// ---------------------------------------------------------------------------
// Frontends, as the agent programs them (model.rs, reconcile.rs)
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Frontend {
    name: &'static str,
    addr: SocketAddrV4,
    kind: u16,
}

const NODE_PORT: Frontend = Frontend {
    name: "NodePort",
    addr: sa([192, 0, 2, 1], 30080),
    kind: SVC_FLAG_NODE_PORT,
};
const EXTERNAL_IP: Frontend = Frontend {
    name: "externalIP",
    addr: sa([198, 51, 100, 20], 80),
    kind: SVC_FLAG_EXTERNAL_IP,
};
const LOAD_BALANCER: Frontend = Frontend {
    name: "LoadBalancer",
    addr: sa([198, 51, 100, 30], 443),
    kind: SVC_FLAG_LOAD_BALANCER,
};
const FRONTENDS: [Frontend; 3] = [NODE_PORT, EXTERNAL_IP, LOAD_BALANCER];
const CLUSTER_IP: SocketAddrV4 = sa([10, 96, 0, 10], 80);

/// externalTrafficPolicy Cluster.
const fn cluster(fe: Frontend) -> u16 {
    fe.kind | SVC_FLAG_SNAT_REMOTE
}

/// externalTrafficPolicy Local (only local backends are programmed).
const fn local(fe: Frontend) -> u16 {
    fe.kind | SVC_FLAG_POLICY_LOCAL
}

const SVC_ID: u32 = 7;
const PROTOS: [(&str, u8); 2] = [("TCP", proto::TCP), ("UDP", proto::UDP)];

/// A backend to program: id, address, on this node.
#[derive(Clone, Copy, Debug)]
struct Be(u32, SocketAddrV4, bool);

const BE_LOCAL: Be = Be(1, LOCAL_POD, true);
const BE_LOCAL2: Be = Be(2, LOCAL_POD2, true);
const BE_B: Be = Be(3, POD_B, false);
const BE_C: Be = Be(4, POD_C, false);
const BE_NO_NEIGH: Be = Be(5, POD_NO_NEIGH, false);
const BE_UNROUTED: Be = Be(6, POD_UNROUTED, false);

/// The first packet of a flow from `client` to `to`: a TCP SYN or a UDP datagram.
fn first(proto: u8, client: SocketAddrV4, to: SocketAddrV4) -> FrameBuilder {
    if proto == proto::TCP {
        FrameBuilder::tcp(client, to, tcp_flags::SYN)
    } else {
        FrameBuilder::udp(client, to)
    }
}

/// A later packet of the flow in the client's direction.
fn next(proto: u8, client: SocketAddrV4, to: SocketAddrV4) -> FrameBuilder {
    if proto == proto::TCP {
        FrameBuilder::tcp(client, to, tcp_flags::ACK)
            .with_tcp_seq(1001, 5001)
            .with_payload(b"GET / HTTP/1.1\r\n\r\n")
    } else {
        FrameBuilder::udp(client, to).with_payload(b"again")
    }
}

/// A reply from `from` (a backend) to `to`.
fn reply(proto: u8, from: SocketAddrV4, to: SocketAddrV4) -> FrameBuilder {
    if proto == proto::TCP {
        FrameBuilder::tcp(from, to, tcp_flags::SYN | tcp_flags::ACK).with_tcp_seq(5000, 1001)
    } else {
        FrameBuilder::udp(from, to).with_payload(b"answer")
    }
}

// ---------------------------------------------------------------------------
// The datapath
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prog {
    Ingress,
    Egress,
    Xdp,
}

/// One loaded copy of the object (all three programs) with its own maps.
struct Datapath {
    ebpf: Ebpf,
}

fn be(a: SocketAddrV4) -> (u32, u16) {
    (u32::from_ne_bytes(a.ip().octets()), a.port().to_be())
}

fn ct_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, dir: u8) -> CtKey {
    CtKey {
        saddr_be: be(src).0,
        daddr_be: be(dst).0,
        sport_be: be(src).1,
        dport_be: be(dst).1,
        proto,
        dir,
        _pad: [0; 2],
    }
}

/// A conntrack value as the datapath writes it (`last_seen_ns` left 0).
fn ct_value(
    nat: SocketAddrV4,
    flags: u8,
    snat: Option<SocketAddrV4>,
    backend_id: u32,
    svc_id: u32,
) -> CtValue {
    let s = snat.map_or((0, 0), be);
    CtValue {
        nat_addr_be: be(nat).0,
        nat_port_be: be(nat).1,
        flags,
        _pad: 0,
        snat_addr_be: s.0,
        snat_port_be: s.1,
        slot: 0,
        backend_id,
        svc_id,
        last_seen_ns: 0,
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    u64::try_from(ts.tv_sec).expect("secs") * 1_000_000_000 + u64::try_from(ts.tv_nsec).expect("ns")
}

impl Datapath {
    fn new() -> Self {
        let mut ebpf = Ebpf::load(ebpf_object())
            .unwrap_or_else(|e| panic!("loading the embedded eBPF object: {e:?}"));
        for name in [TcHook::Ingress.program(), TcHook::Egress.program()] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("no program {name}"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is not sched_cls: {e:?}"));
            p.load().unwrap_or_else(|e| panic!("loading {name}: {e:?}"));
        }
        let x: &mut Xdp = ebpf
            .program_mut(XDP_PROG)
            .unwrap_or_else(|| panic!("no program {XDP_PROG}"))
            .try_into()
            .unwrap_or_else(|e| panic!("{XDP_PROG} is not xdp: {e:?}"));
        x.load()
            .unwrap_or_else(|e| panic!("loading {XDP_PROG}: {e:?}"));
        // The devices XDP may redirect to (the agent fills this with the
        // devices it attached XDP to): every device of the test node.
        let mut ports = aya::maps::DevMapHash::try_from(ebpf.map_mut(proxy_agent::pins::XDP_TX_MAP).expect("xdp tx map"))
            .expect("devmap type");
        for d in proxy_agent::datapath::list_devices().expect("devices") {
            ports.insert(d.index, d.index, None, 0).unwrap_or_else(|e| panic!("devmap insert {}: {e:?}", d.name));
        }
        Self { ebpf }
    }

    fn add_backend(&mut self, b: Be, proto: u8) {
        let mut m = HashMap::<_, u32, Backend>::try_from(
            self.ebpf.map_mut(BACKEND_MAP).expect("backend map"),
        )
        .expect("backend map type");
        let (addr_be, port_be) = be(b.1);
        let v = Backend {
            addr_be,
            port_be,
            proto,
            flags: if b.2 { BACKEND_F_LOCAL } else { 0 },
        };
        m.insert(b.0, v, 0)
            .unwrap_or_else(|e| panic!("insert backend {b:?}: {e:?}"));
    }

    /// Backends, then slots 1..=n, then slot 0 (the agent's order).
    fn add_service(
        &mut self,
        fe: SocketAddrV4,
        proto: u8,
        svc_id: u32,
        flags: u16,
        backends: &[Be],
    ) {
        for b in backends {
            self.add_backend(*b, proto);
        }
        let mut m =
            HashMap::<_, SvcKey, SvcValue>::try_from(self.ebpf.map_mut(SVC_MAP).expect("svc map"))
                .expect("svc map type");
        let key = |slot: u16| SvcKey {
            addr_be: be(fe).0,
            port_be: be(fe).1,
            backend_slot: slot,
            proto,
            scope: 0,
            _pad: [0; 2],
        };
        for (slot, b) in (1..).zip(backends) {
            m.insert(
                key(slot),
                SvcValue {
                    backend_id: b.0,
                    ..Default::default()
                },
                0,
            )
            .unwrap_or_else(|e| panic!("insert slot {slot}: {e:?}"));
        }
        let count = u16::try_from(backends.len()).expect("count");
        let head = SvcValue {
            backend_id: 0,
            count,
            flags,
            svc_id,
            affinity_timeout_s: 0,
        };
        m.insert(key(0), head, 0)
            .unwrap_or_else(|e| panic!("insert frontend {fe}: {e:?}"));
    }

    /// Runs `prog` once on `input` arriving on (TC egress: leaving by)
    /// device `ifindex` of the calling thread's namespace.
    fn try_run(
        &self,
        prog: Prog,
        input: &[u8],
        ifindex: u32,
    ) -> Result<(u32, Vec<u8>), ProgramError> {
        let mut out = vec![0u8; input.len() + 512];
        let r = match prog {
            Prog::Ingress | Prog::Egress => {
                let hook = if prog == Prog::Ingress {
                    TcHook::Ingress
                } else {
                    TcHook::Egress
                };
                let name = hook.program();
                let p: &SchedClassifier = self
                    .ebpf
                    .program(name)
                    .expect("program")
                    .try_into()
                    .expect("sched_cls");
                let ctx = skb_ctx(ifindex);
                p.test_run(TestRunOptions {
                    data_in: Some(input),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..Default::default()
                })?
            }
            Prog::Xdp => {
                let p: &Xdp = self
                    .ebpf
                    .program(XDP_PROG)
                    .expect("program")
                    .try_into()
                    .expect("xdp");
                let ctx = xdp_md_ctx(input.len(), ifindex);
                p.test_run(TestRunOptions {
                    data_in: Some(input),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..Default::default()
                })?
            }
        };
        out.truncate(usize::try_from(r.data_size_out).expect("size"));
        Ok((r.return_value, out))
    }

    fn run(&self, prog: Prog, input: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        self.try_run(prog, input, ifindex).unwrap_or_else(|e| {
            panic!(
                "BPF_PROG_TEST_RUN of {prog:?} failed: {e:?}\ninput:\n{}",
                hex(input)
            )
        })
    }

    fn ingress(&self, input: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        self.run(Prog::Ingress, input, ifindex)
    }

    fn xdp(&self, input: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        self.run(Prog::Xdp, input, ifindex)
    }

    fn stats(&self) -> BTreeMap<u32, StatCounter> {
        stats_by_reason(&self.ebpf)
    }

    /// Exactly these reasons counted these numbers of packets, every other none.
    fn check_stats(&self, expected: &[(u32, u64)]) -> Result<(), String> {
        let got = self.stats();
        let errors: Vec<String> = REASONS
            .iter()
            .filter_map(|(idx, name)| {
                let want = expected
                    .iter()
                    .filter(|(r, _)| r == idx)
                    .map(|(_, n)| *n)
                    .sum::<u64>();
                (got[idx].packets != want)
                    .then(|| format!("{name}: {} packets, expected {want}", got[idx].packets))
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("counters: {}", errors.join("; ")))
        }
    }

    fn assert_stats(&self, expected: &[(u32, u64)]) {
        self.check_stats(expected).unwrap_or_else(|e| panic!("{e}"));
    }

    fn ct_map(&self, name: &str) -> HashMap<&aya::maps::MapData, CtKey, CtValue> {
        HashMap::try_from(self.ebpf.map(name).expect("ct map")).expect("ct map type")
    }

    /// Both conntrack tables (confirmed and unconfirmed flows).
    fn ct(&self) -> Vec<(CtKey, CtValue)> {
        [CT_MAP, CT_NEW_MAP]
            .into_iter()
            .flat_map(|name| self.ct_map(name).iter().collect::<Vec<_>>())
            .map(|r| r.unwrap_or_else(|e| panic!("read ct: {e:?}")))
            .collect()
    }

    /// The entry of `key`, confirmed table first (as the datapath looks).
    fn ct_get(&self, key: &CtKey) -> Option<CtValue> {
        [CT_MAP, CT_NEW_MAP].into_iter().find_map(|name| self.ct_map(name).get(key, 0).ok())
    }

    fn ct_put(&mut self, key: CtKey, value: CtValue) {
        let mut m =
            HashMap::<_, CtKey, CtValue>::try_from(self.ebpf.map_mut(CT_MAP).expect("ct map"))
                .expect("ct map type");
        m.insert(key, value, 0)
            .unwrap_or_else(|e| panic!("insert ct {key:?}: {e:?}"));
    }

    /// The entry under `key` equals `want` but for a non-zero `last_seen_ns`.
    fn check_ct(&self, what: &str, key: &CtKey, want: &CtValue) -> Result<(), String> {
        let Some(mut got) = self.ct_get(key) else {
            return Err(format!(
                "{what}: no conntrack entry {key:?}; entries: {:#?}",
                self.ct()
            ));
        };
        if got.last_seen_ns == 0 {
            return Err(format!("{what}: last_seen_ns is 0"));
        }
        got.last_seen_ns = 0;
        // A SERVICE entry the datapath made records the slot its backend
        // came from (any of the frontend's); `want` leaves it 0.
        if key.dir == proxy_common::ct::CT_DIR_SERVICE && want.slot == 0 {
            got.slot = 0;
        }
        if got != *want {
            return Err(format!(
                "{what}: conntrack entry\n{got:?}\nexpected\n{want:?}"
            ));
        }
        Ok(())
    }

    fn assert_ct(&self, what: &str, key: &CtKey, want: &CtValue) {
        self.check_ct(what, key, want)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn assert_ct_len(&self, n: usize, what: &str) {
        let got = self.ct().len();
        assert_eq!(got, n, "{what}: {got} conntrack entries, expected {n}");
    }
}

/// `got` must be `want` byte for byte.
fn assert_frame(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let why = match parse(got) {
            Ok(p) => p.verify_checksums().err().unwrap_or_default(),
            Err(e) => e,
        };
        panic!(
            "{what}: frame differs {why}\noutput:\n{}\nexpected:\n{}",
            hex(got),
            hex(want)
        );
    }
}

fn parsed(what: &str, frame: &[u8]) -> Parsed {
    let p = parse(frame)
        .unwrap_or_else(|e| panic!("{what}: output does not parse: {e}\n{}", hex(frame)));
    p.verify_checksums()
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", hex(frame)));
    p
}

fn ttl_minus_1(b: &FrameBuilder) -> u8 {
    b.ttl - 1
}

/// The source port of `frame` (checksums checked), which must be in the SNAT range.
fn snat_port(what: &str, frame: &[u8]) -> u16 {
    let port = parsed(what, frame).src().port();
    assert!(
        (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port),
        "{what}: SNAT port {port} outside {SNAT_PORT_MIN}..={SNAT_PORT_MAX}"
    );
    port
}

/// Runs the first packet of a flow that must be translated (DNAT and SNAT) to
/// `backend` from `node` and redirected: checks the frame byte for byte and
/// returns the SNAT port.
fn open_snat_flow(
    dp: &Datapath,
    first: &FrameBuilder,
    ifindex: u32,
    node: Ipv4Addr,
    backend: SocketAddrV4,
) -> u16 {
    let what = format!("{}:{} → {}", first.src, first.l4.proto(), first.dst);
    let (verdict, out) = dp.ingress(&first.build(), ifindex);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "{what}: verdict\noutput:\n{}",
        hex(&out)
    );
    let port = snat_port(&what, &out);
    let want = first
        .clone()
        .with_src(SocketAddrV4::new(node, port))
        .with_dst(backend)
        .with_ttl(ttl_minus_1(first))
        .build();
    assert_frame(&what, &out, &want);
    port
}

/// The SERVICE and REPLY entries a flow from `client` through `fe` to
/// backend `b` must have: `snat` the node's address and port towards the
/// backend (None without SNAT), `flags` the flags of both.
fn flow_ct(
    proto: u8,
    client: SocketAddrV4,
    fe: SocketAddrV4,
    b: Be,
    snat: Option<SocketAddrV4>,
    flags: u8,
) -> [(&'static str, CtKey, CtValue); 2] {
    [
        (
            "SERVICE entry",
            ct_key(client, fe, proto, CT_DIR_SERVICE),
            ct_value(b.1, flags, snat, b.0, SVC_ID),
        ),
        (
            "REPLY entry",
            ct_key(b.1, snat.unwrap_or(client), proto, CT_DIR_REPLY),
            ct_value(fe, flags, snat.map(|_| client), b.0, SVC_ID),
        ),
    ]
}

/// The two conntrack entries of a flow with SNAT.
fn assert_snat_ct(
    dp: &Datapath,
    proto: u8,
    client: SocketAddrV4,
    fe: SocketAddrV4,
    b: Be,
    snat: SocketAddrV4,
) {
    let flags = CT_F_SNAT | CT_F_REDIRECT;
    for (entry, k, v) in flow_ct(proto, client, fe, b, Some(snat), flags) {
        dp.assert_ct(entry, &k, &v);
    }
}

/// The two conntrack entries of a flow with DNAT only (client source kept).
fn assert_dnat_ct(
    dp: &Datapath,
    what: &str,
    proto: u8,
    client: SocketAddrV4,
    fe: SocketAddrV4,
    b: Be,
) {
    for (entry, k, v) in flow_ct(proto, client, fe, b, None, CT_F_REDIRECT) {
        dp.assert_ct(&format!("{what}: {entry}"), &k, &v);
    }
}

/// `f` with its destination translated to `backend` and its source to
/// `snat`, one hop later.
fn snated(f: &FrameBuilder, snat: SocketAddrV4, backend: SocketAddrV4) -> FrameBuilder {
    f.clone().with_src(snat).with_dst(backend).with_ttl(63)
}

/// `r` (a reply) translated back: from frontend `fe` to `client`, one hop later.
fn rev_nated(r: &FrameBuilder, fe: SocketAddrV4, client: SocketAddrV4) -> FrameBuilder {
    r.clone().with_src(fe).with_dst(client).with_ttl(63)
}

/// `f` arriving on `ifindex` has its destination translated to the local
/// `backend` and nothing else (the stack routes it to the pod: `TC_ACT_OK`, TTL untouched).
fn assert_dnat_only(
    dp: &Datapath,
    what: &str,
    f: &FrameBuilder,
    ifindex: u32,
    backend: SocketAddrV4,
) {
    let (v, out) = dp.ingress(&f.build(), ifindex);
    assert_eq!(v, TC_ACT_OK, "{what}: verdict");
    assert_frame(what, &out, &f.clone().with_dst(backend).build());
}

/// Reply `r` arriving on `ifindex` comes back from frontend `fe` to
/// `client`, sent out by FIB redirect.
fn assert_reply_translated(
    dp: &Datapath,
    what: &str,
    r: &FrameBuilder,
    ifindex: u32,
    fe: SocketAddrV4,
    client: SocketAddrV4,
) {
    let (v, out) = dp.ingress(&r.build(), ifindex);
    assert_eq!(v, TC_ACT_REDIRECT, "{what}: reply verdict");
    assert_frame(
        &format!("{what}: reply"),
        &out,
        &rev_nated(r, fe, client).build(),
    );
}

/// A later packet of `CLIENT`'s flow to `fe` through TC: same backend, same
/// SNAT port, and still the flow's two conntrack entries.
fn assert_later_packet_snated(
    dp: &Datapath,
    what: &str,
    l: &Links,
    proto: u8,
    fe: SocketAddrV4,
    snat: SocketAddrV4,
    backend: SocketAddrV4,
) {
    let n = next(proto, CLIENT, fe);
    let (v, out) = dp.ingress(&n.build(), l.ext0);
    assert_eq!(v, TC_ACT_REDIRECT, "{what}: established verdict");
    assert_frame(what, &out, &snated(&n, snat, backend).build());
    dp.assert_ct_len(2, what);
}

/// A fresh datapath with the `NodePort` over `proto` (Cluster policy) to `backends`.
fn node_port_datapath(proto: u8, backends: &[Be]) -> Datapath {
    let mut dp = Datapath::new();
    dp.add_service(NODE_PORT.addr, proto, SVC_ID, cluster(NODE_PORT), backends);
    dp
}

/// Opens `client`'s flow through the `NodePort` to `POD_B` (SNAT to int0's
/// address, checked byte for byte); returns the SNAT port.
fn open_flow_to_pod_b(dp: &Datapath, l: &Links, proto: u8, client: SocketAddrV4) -> u16 {
    let syn = first(proto, client, NODE_PORT.addr);
    open_snat_flow(dp, &syn, l.ext0, NODE_INT, POD_B)
}

/// The two conntrack entries of `client`'s flow through the `NodePort` to
/// `POD_B`, with the source translated to int0's address and `port`.
fn assert_pod_b_ct(dp: &Datapath, proto: u8, client: SocketAddrV4, port: u16) {
    let snat = SocketAddrV4::new(NODE_INT, port);
    assert_snat_ct(dp, proto, client, NODE_PORT.addr, BE_B, snat);
}

/// Each entry of `held` is still there as written (but for `last_seen_ns`).
fn assert_held_untouched(dp: &Datapath, held: &[(CtKey, CtValue)]) {
    for (k, v) in held {
        let mut got = dp.ct_get(k).expect("held entry");
        got.last_seen_ns = v.last_seen_ns;
        assert_eq!(got, *v, "a held port was taken over");
    }
}

/// Fails with every case's failure, if any of the `cases` failed.
fn assert_no_failures(failures: &[String], cases: usize) {
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Local backends: DNAT only
// ---------------------------------------------------------------------------

#[test]
fn external_frontend_to_a_local_backend_is_dnated_with_the_client_source_kept() {
    on_node(|l| {
        for fe in FRONTENDS {
            for (pname, proto) in PROTOS {
                let what = format!("{} {pname}", fe.name);
                let mut dp = Datapath::new();
                dp.add_service(fe.addr, proto, SVC_ID, cluster(fe), &[BE_LOCAL]);

                // Client → frontend: destination rewritten, nothing else.
                let syn = first(proto, CLIENT, fe.addr);
                assert_dnat_only(&dp, &what, &syn, l.ext0, LOCAL_POD);
                assert_dnat_ct(&dp, &what, proto, CLIENT, fe.addr, BE_LOCAL);
                dp.assert_ct_len(2, &what);

                // The pod's reply: source back to the frontend, then sent
                // out by FIB redirect (its source may be a node address).
                let r = reply(proto, LOCAL_POD, CLIENT).with_macs(POD_MAC, LXC0_MAC);
                assert_reply_translated(&dp, &what, &r, l.lxc0, fe.addr, CLIENT);

                // A later packet keeps the backend.
                let n = next(proto, CLIENT, fe.addr);
                assert_dnat_only(&dp, &format!("{what}: established"), &n, l.ext0, LOCAL_POD);
                dp.assert_stats(&[
                    (stats::DNAT_NEW, 1),
                    (stats::REV_NAT, 1),
                    (stats::DNAT_ESTABLISHED, 1),
                    // Reply seen, then the client again: confirmed.
                    (stats::CT_CONFIRMED, 1),
                ]);
                dp.assert_ct_len(2, &what);
            }
        }
    });
}

#[test]
fn udp_without_checksum_to_a_local_backend_keeps_checksum_zero() {
    on_node(|l| {
        let dp = node_port_datapath(proto::UDP, &[BE_LOCAL]);
        let d = FrameBuilder::udp(CLIENT, NODE_PORT.addr).with_udp_zero_checksum();
        assert_dnat_only(&dp, "datagram", &d, l.ext0, LOCAL_POD);
        let r = FrameBuilder::udp(LOCAL_POD, CLIENT).with_udp_zero_checksum();
        assert_reply_translated(&dp, "datagram", &r, l.lxc0, NODE_PORT.addr, CLIENT);
    });
}

// ---------------------------------------------------------------------------
// Remote backends under externalTrafficPolicy Cluster: DNAT + SNAT
// ---------------------------------------------------------------------------

#[test]
fn external_frontend_to_a_remote_backend_is_snated_to_the_node_and_replies_translated_back() {
    on_node(|l| {
        // POD_B is behind int0 (SNAT to int0's address, out of another
        // device), POD_C behind ext0 (SNAT to ext0's, back out of ext0).
        for (b, node, back_dev) in [(BE_B, NODE_INT, l.int0), (BE_C, NODE_EXT, l.ext0)] {
            for fe in FRONTENDS {
                for (pname, proto) in PROTOS {
                    let what = format!("{} {pname} to {}", fe.name, b.1);
                    let mut dp = Datapath::new();
                    dp.add_service(fe.addr, proto, SVC_ID, cluster(fe), &[b]);

                    let syn = first(proto, CLIENT, fe.addr);
                    let port = open_snat_flow(&dp, &syn, l.ext0, node, b.1);
                    let snat = SocketAddrV4::new(node, port);
                    assert_snat_ct(&dp, proto, CLIENT, fe.addr, b, snat);
                    dp.assert_ct_len(2, &what);

                    // The backend answers the node's address and port: back
                    // to frontend → client, sent out by FIB redirect.
                    let r = reply(proto, b.1, snat);
                    assert_reply_translated(&dp, &what, &r, back_dev, fe.addr, CLIENT);

                    // A later packet of the flow: same backend, same port.
                    assert_later_packet_snated(&dp, &what, l, proto, fe.addr, snat, b.1);
                    dp.assert_stats(&[
                        (stats::DNAT_NEW, 1),
                        (stats::REV_NAT, 1),
                        (stats::DNAT_ESTABLISHED, 1),
                        // Reply seen, then the client again: confirmed.
                        (stats::CT_CONFIRMED, 1),
                    ]);
                }
            }
        }
    });
}

#[test]
fn fin_and_rst_mark_both_entries_of_a_snat_flow_closing() {
    on_node(|l| {
        for (name, closer_is_client, flags) in [
            ("client FIN", true, tcp_flags::FIN | tcp_flags::ACK),
            ("client RST", true, tcp_flags::RST),
            ("backend FIN", false, tcp_flags::FIN | tcp_flags::ACK),
            ("backend RST", false, tcp_flags::RST | tcp_flags::ACK),
        ] {
            let dp = node_port_datapath(proto::TCP, &[BE_B]);
            let port = open_flow_to_pod_b(&dp, l, proto::TCP, CLIENT);
            let snat = SocketAddrV4::new(NODE_INT, port);
            let (pkt, dev) = if closer_is_client {
                (FrameBuilder::tcp(CLIENT, NODE_PORT.addr, flags), l.ext0)
            } else {
                (FrameBuilder::tcp(POD_B, snat, flags), l.int0)
            };
            let (v, out) = dp.ingress(&pkt.build(), dev);
            assert_eq!(v, TC_ACT_REDIRECT, "{name}: verdict");
            let want = if closer_is_client {
                snated(&pkt, snat, POD_B)
            } else {
                rev_nated(&pkt, NODE_PORT.addr, CLIENT)
            };
            assert_frame(name, &out, &want.build());
            // A closing packet from the backend is a reply: it confirms the flow too.
            let seen = if closer_is_client { 0 } else { proxy_common::ct::CT_F_SEEN_REPLY };
            let flags = CT_F_SNAT | CT_F_REDIRECT | CT_F_CLOSING | seen;
            let entries = flow_ct(proto::TCP, CLIENT, NODE_PORT.addr, BE_B, Some(snat), flags);
            for (entry, k, v) in entries {
                dp.assert_ct(&format!("{name}: {entry}"), &k, &v);
            }
        }
    });
}

#[test]
fn remote_backend_without_a_route_is_dropped_and_counted() {
    on_node(|l| {
        for (pname, proto) in PROTOS {
            let dp = node_port_datapath(proto, &[BE_UNROUTED]);
            let input = first(proto, CLIENT, NODE_PORT.addr).build();
            let (v, out) = dp.ingress(&input, l.ext0);
            assert_eq!(v, TC_ACT_SHOT, "{pname}: verdict");
            assert_frame(pname, &out, &input);
            dp.assert_ct_len(0, pname);
            dp.assert_stats(&[(stats::FIB_NO_ROUTE, 1)]);
        }
    });
}

#[test]
fn snat_flow_over_ip_options_is_translated() {
    on_node(|l| {
        let dp = node_port_datapath(proto::TCP, &[BE_B]);
        // Router Alert (IHL 6) and 40 bytes of NOPs (IHL 15).
        for (i, opts) in [vec![0x94, 0x04, 0, 0], vec![1; 40]]
            .into_iter()
            .enumerate()
        {
            let client = SocketAddrV4::new(*CLIENT.ip(), 41000 + u16::try_from(i).expect("small"));
            let syn = first(proto::TCP, client, NODE_PORT.addr).with_options(&opts);
            let port = open_snat_flow(&dp, &syn, l.ext0, NODE_INT, POD_B);
            assert_pod_b_ct(&dp, proto::TCP, client, port);
            let snat = SocketAddrV4::new(NODE_INT, port);
            let r = reply(proto::TCP, POD_B, snat).with_options(&opts);
            assert_reply_translated(&dp, "with options", &r, l.int0, NODE_PORT.addr, client);
        }
        dp.assert_stats(&[(stats::DNAT_NEW, 2), (stats::REV_NAT, 2)]);
    });
}

// ---------------------------------------------------------------------------
// externalTrafficPolicy Local
// ---------------------------------------------------------------------------

#[test]
fn policy_local_without_a_local_backend_drops_and_counts() {
    on_node(|l| {
        for fe in FRONTENDS {
            for (pname, proto) in PROTOS {
                let what = format!("{} {pname}", fe.name);
                let mut dp = Datapath::new();
                // Endpoints exist, none on this node: count 0, drop flag.
                dp.add_service(
                    fe.addr,
                    proto,
                    SVC_ID,
                    local(fe) | SVC_FLAG_DROP_WHEN_EMPTY,
                    &[],
                );
                let input = first(proto, CLIENT, fe.addr).build();
                let (v, out) = dp.xdp(&input, l.ext0);
                assert_eq!(v, XDP_PASS, "{what}: XDP leaves it to TC");
                assert_frame(&what, &out, &input);
                dp.assert_stats(&[]);
                let (v, out) = dp.ingress(&input, l.ext0);
                assert_eq!(v, TC_ACT_SHOT, "{what}: verdict");
                assert_frame(&what, &out, &input);
                dp.assert_ct_len(0, &what);
                dp.assert_stats(&[(stats::DROP_NO_LOCAL_BACKEND, 1)]);
                assert_eq!(
                    dp.stats()[&stats::DROP_NO_LOCAL_BACKEND].bytes,
                    input.len() as u64,
                    "{what}: bytes"
                );
            }
        }
    });
}

#[test]
fn policy_local_with_a_local_backend_keeps_the_client_source() {
    on_node(|l| {
        for fe in FRONTENDS {
            for (pname, proto) in PROTOS {
                let what = format!("{} {pname}", fe.name);
                let mut dp = Datapath::new();
                dp.add_service(fe.addr, proto, SVC_ID, local(fe), &[BE_LOCAL, BE_LOCAL2]);
                let syn = first(proto, CLIENT, fe.addr);
                let (v, xout) = dp.xdp(&syn.build(), l.ext0);
                assert_eq!(v, XDP_PASS, "{what}: XDP leaves Local policy to TC");
                assert_frame(&what, &xout, &syn.build());
                dp.assert_ct_len(0, &what);
                let (v, out) = dp.ingress(&syn.build(), l.ext0);
                assert_eq!(v, TC_ACT_OK, "{what}: verdict");
                let p = parsed(&what, &out);
                let b = [BE_LOCAL, BE_LOCAL2]
                    .into_iter()
                    .find(|b| b.1 == p.dst())
                    .unwrap_or_else(|| panic!("{what}: sent to {}, not a local backend", p.dst()));
                assert_frame(&what, &out, &syn.clone().with_dst(b.1).build());
                assert_dnat_ct(&dp, &what, proto, CLIENT, fe.addr, b);
                let r = reply(proto, b.1, CLIENT);
                assert_reply_translated(&dp, &what, &r, l.lxc0, fe.addr, CLIENT);
                dp.assert_stats(&[(stats::DNAT_NEW, 1), (stats::REV_NAT, 1)]);
            }
        }
    });
}

// ---------------------------------------------------------------------------
// SNAT ports
// ---------------------------------------------------------------------------

#[test]
fn two_clients_with_the_same_source_port_get_distinct_snat_ports() {
    on_node(|l| {
        for (pname, proto) in PROTOS {
            let dp = node_port_datapath(proto, &[BE_B]);
            let p1 = open_flow_to_pod_b(&dp, l, proto, CLIENT);
            let p2 = open_flow_to_pod_b(&dp, l, proto, CLIENT2);
            assert_ne!(p1, p2, "{pname}: both flows got SNAT port {p1}");
            assert_pod_b_ct(&dp, proto, CLIENT, p1);
            assert_pod_b_ct(&dp, proto, CLIENT2, p2);
            dp.assert_ct_len(4, pname);
            // Each reply reaches its own client.
            for (port, client) in [(p2, CLIENT2), (p1, CLIENT)] {
                let r = reply(proto, POD_B, SocketAddrV4::new(NODE_INT, port));
                assert_reply_translated(&dp, pname, &r, l.int0, NODE_PORT.addr, client);
            }
            dp.assert_stats(&[(stats::DNAT_NEW, 2), (stats::REV_NAT, 2)]);
        }
    });
}

#[test]
fn concurrent_new_flows_on_two_cpus_never_share_a_snat_port() {
    // Why this shape: the port is drawn with bpf_get_prandom_u32, which a
    // test cannot steer, so a given collision cannot be forced. Instead a
    // third of the range is held by live flows of another client, so a
    // third of all draws hit a taken port, and 2 x 150 new flows to the same
    // backend run at the same time from two threads (two CPUs), also racing
    // each other for the rest: each taken port must be detected by the
    // BPF_NOEXIST insert and redrawn, no flow may get a port another holds.
    // With at most 40% of the range taken, all of ct.rs' 32 draws fail with
    // a chance below 1e-12 per flow: a drop here is a bug, not bad luck.
    const PER_THREAD: u16 = 150;
    on_node(|l| {
        let mut dp = node_port_datapath(proto::TCP, &[BE_B]);
        let held = fill_snat_ports(
            &mut dp,
            (SNAT_PORT_MIN..=SNAT_PORT_MAX).step_by(3),
            0,
            monotonic_ns(),
        );
        let dp = &dp;
        let flows: Vec<(SocketAddrV4, u16)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..2_u8)
                .map(|t| {
                    let path = l.ns_path.clone();
                    let ext0 = l.ext0;
                    s.spawn(move || {
                        enter(&path);
                        (0..PER_THREAD)
                            .map(|i| {
                                let client = sa([203, 0, 113, 100 + t], 20000 + i);
                                let syn = FrameBuilder::tcp(client, NODE_PORT.addr, tcp_flags::SYN);
                                let (v, out) = dp.ingress(&syn.build(), ext0);
                                assert_eq!(v, TC_ACT_REDIRECT, "flow {client}: verdict");
                                (client, parsed("flow", &out).src().port())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_else(|p| resume_unwind(p)))
                .collect()
        });
        let ports: HashSet<u16> = flows.iter().map(|(_, p)| *p).collect();
        assert_eq!(ports.len(), flows.len(), "SNAT ports shared between flows");
        assert_held_untouched(dp, &held);
        for (client, port) in &flows {
            assert_pod_b_ct(dp, proto::TCP, *client, *port);
        }
        dp.assert_ct_len(held.len() + 4 * usize::from(PER_THREAD), "two per flow");
        dp.assert_stats(&[(stats::DNAT_NEW, 2 * u64::from(PER_THREAD))]);
    });
}

/// Occupies `ports` towards `POD_B` (TCP) with REPLY entries of another
/// flow; returns the keys and values written.
fn fill_snat_ports(
    dp: &mut Datapath,
    ports: impl IntoIterator<Item = u16>,
    flags: u8,
    last_seen_ns: u64,
) -> Vec<(CtKey, CtValue)> {
    let ghost = sa([203, 0, 113, 200], 1);
    let mut written = Vec::new();
    for port in ports {
        let key = ct_key(
            POD_B,
            SocketAddrV4::new(NODE_INT, port),
            proto::TCP,
            CT_DIR_REPLY,
        );
        let mut v = ct_value(
            NODE_PORT.addr,
            CT_F_SNAT | CT_F_REDIRECT | flags,
            Some(ghost),
            BE_B.0,
            99,
        );
        v.last_seen_ns = last_seen_ns;
        dp.ct_put(key, v);
        written.push((key, v));
    }
    written
}

#[test]
fn all_snat_ports_taken_drops_and_counts_without_stealing_one() {
    on_node(|l| {
        let mut dp = node_port_datapath(proto::TCP, &[BE_B]);
        let held = fill_snat_ports(&mut dp, SNAT_PORT_MIN..=SNAT_PORT_MAX, 0, monotonic_ns());
        let input = first(proto::TCP, CLIENT, NODE_PORT.addr).build();
        // XDP gives up without touching the packet; TC drops it.
        let (v, out) = dp.xdp(&input, l.ext0);
        assert_eq!(v, XDP_PASS, "XDP verdict");
        assert_frame("XDP", &out, &input);
        let (v, out) = dp.ingress(&input, l.ext0);
        assert_eq!(v, TC_ACT_SHOT, "TC verdict");
        assert_frame("TC", &out, &input);
        dp.assert_stats(&[(stats::DROP_SNAT_EXHAUSTED, 1)]);
        dp.assert_ct_len(held.len(), "only the flows that hold the ports");
        assert_held_untouched(&dp, &held);
    });
}

#[test]
fn expired_snat_port_is_reused() {
    on_node(|l| {
        let mut dp = node_port_datapath(proto::TCP, &[BE_B]);
        // Every port held by a flow that closed (FIN/RST) 11 s ago: expired
        // after the 10 s closing timeout.
        let now = monotonic_ns();
        assert!(now > 20_000_000_000, "uptime too short for this test");
        let held = fill_snat_ports(
            &mut dp,
            SNAT_PORT_MIN..=SNAT_PORT_MAX,
            CT_F_CLOSING,
            now - 11_000_000_000,
        );
        let port = open_flow_to_pod_b(&dp, l, proto::TCP, CLIENT);
        assert_pod_b_ct(&dp, proto::TCP, CLIENT, port);
        dp.assert_ct_len(
            held.len() + 1,
            "the reused REPLY entry and a new SERVICE entry",
        );
        dp.assert_stats(&[(stats::DNAT_NEW, 1)]);
    });
}

#[test]
fn retransmitted_syn_keeps_its_snat_port_and_a_syn_after_close_is_a_new_flow() {
    on_node(|l| {
        let dp = node_port_datapath(proto::TCP, &[BE_B]);
        let syn = first(proto::TCP, CLIENT, NODE_PORT.addr);
        let port = open_snat_flow(&dp, &syn, l.ext0, NODE_INT, POD_B);
        let snat = SocketAddrV4::new(NODE_INT, port);
        // The same SYN again (its SYN-ACK was lost or is late), through TC
        // and through XDP: the flow, and its SNAT port, stay as they were.
        for _ in 0..3 {
            let again = open_snat_flow(&dp, &syn, l.ext0, NODE_INT, POD_B);
            assert_eq!(
                again, port,
                "a retransmitted SYN moved the flow to another SNAT port"
            );
        }
        let (v, out) = dp.xdp(&syn.build(), l.ext0);
        assert_eq!(v, XDP_REDIRECT, "XDP verdict");
        let want = snated(&syn, snat, POD_B).with_macs(INT0_MAC, NODE_B_MAC);
        assert_frame("retransmission through XDP", &out, &want.build());
        assert_pod_b_ct(&dp, proto::TCP, CLIENT, port);
        dp.assert_ct_len(2, "no entry for a retransmission");
        dp.assert_stats(&[
            (stats::DNAT_NEW, 1),
            (stats::DNAT_ESTABLISHED, 3),
            (stats::XDP_FORWARD, 1),
        ]);

        // The connection ends (RST): a SYN on the same tuple is a new flow.
        let (v, _) = dp.ingress(
            &FrameBuilder::tcp(CLIENT, NODE_PORT.addr, tcp_flags::RST).build(),
            l.ext0,
        );
        assert_eq!(v, TC_ACT_REDIRECT);
        let new_port = open_snat_flow(&dp, &syn, l.ext0, NODE_INT, POD_B);
        assert_pod_b_ct(&dp, proto::TCP, CLIENT, new_port);
        if new_port != port {
            // The old port's entry is left to expire (closing: 10 s).
            let old = dp
                .ct_get(&ct_key(POD_B, snat, proto::TCP, CT_DIR_REPLY))
                .expect("old REPLY entry");
            assert_ne!(
                old.flags & CT_F_CLOSING,
                0,
                "the old port's entry is not closing: {old:?}"
            );
        }
        dp.assert_stats(&[
            (stats::DNAT_NEW, 2),
            (stats::DNAT_ESTABLISHED, 4),
            (stats::XDP_FORWARD, 1),
        ]);
    });
}

#[test]
fn same_client_port_to_two_frontends_of_one_local_backend() {
    on_node(|l| {
        let mut dp = Datapath::new();
        dp.add_service(
            NODE_PORT.addr,
            proto::UDP,
            SVC_ID,
            cluster(NODE_PORT),
            &[BE_LOCAL],
        );
        dp.add_service(
            LOAD_BALANCER.addr,
            proto::UDP,
            SVC_ID,
            cluster(LOAD_BALANCER),
            &[BE_LOCAL],
        );
        // One UDP socket (behind an endpoint-independent NAT, say) talks to
        // the NodePort first, then to the LoadBalancer address.
        let (v, _) = dp.ingress(&FrameBuilder::udp(CLIENT, NODE_PORT.addr).build(), l.ext0);
        assert_eq!(v, TC_ACT_OK);
        let (v, out) = dp.ingress(
            &FrameBuilder::udp(CLIENT, LOAD_BALANCER.addr).build(),
            l.ext0,
        );
        assert!(
            v == TC_ACT_OK || v == TC_ACT_REDIRECT,
            "second flow: verdict {v}"
        );
        let second = parsed("second flow", &out);
        // The pod answers the first flow (pod:8080 → client:40000): it must
        // come back from the NodePort. Unless the second flow was given
        // another tuple towards the pod, its REPLY entry replaced the first.
        let r = FrameBuilder::udp(LOCAL_POD, CLIENT);
        let (v, out) = dp.ingress(&r.build(), l.lxc0);
        assert_eq!(v, TC_ACT_REDIRECT);
        let src = parsed("reply", &out).src();
        assert_eq!(
            src,
            NODE_PORT.addr,
            "the first flow's reply comes back from {src}: the second flow ({} → {}) took its REPLY entry {:?}",
            second.src(),
            second.dst(),
            ct_key(LOCAL_POD, CLIENT, proto::UDP, CT_DIR_REPLY)
        );
        // The second flow kept the client's address but got its own port
        // (netfilter's clash resolution), and its reply comes back from the
        // LoadBalancer address to the client's real port.
        assert_eq!(*second.src().ip(), *CLIENT.ip(), "second flow's source address");
        assert_ne!(second.src().port(), CLIENT.port(), "second flow kept the clashing port");
        assert_eq!(second.dst(), LOCAL_POD, "second flow's backend");
        let (v, out) = dp.ingress(&FrameBuilder::udp(LOCAL_POD, second.src()).build(), l.lxc0);
        assert!(v == TC_ACT_OK || v == TC_ACT_REDIRECT, "second reply: verdict {v}");
        let back = parsed("second reply", &out);
        assert_eq!((back.src(), back.dst()), (LOAD_BALANCER.addr, CLIENT), "second flow's reply");
    });
}

// ---------------------------------------------------------------------------
// Hairpin
// ---------------------------------------------------------------------------

#[test]
fn hairpin_to_its_own_service_is_masqueraded() {
    on_node(|l| {
        let pod_client = SocketAddrV4::new(*LOCAL_POD.ip(), 50000);
        for (name, fe, flags) in [
            ("ClusterIP", CLUSTER_IP, SVC_FLAG_CLUSTER_IP),
            ("NodePort", NODE_PORT.addr, cluster(NODE_PORT)),
            ("NodePort, policy Local", NODE_PORT.addr, local(NODE_PORT)),
        ] {
            for (pname, proto) in PROTOS {
                let what = format!("{name} {pname}");
                let mut dp = Datapath::new();
                dp.add_service(fe, proto, SVC_ID, flags, &[BE_LOCAL]);
                // The pod's packet to its own Service: source NATed to the
                // node's address towards the pod (lxc0's), sent back out.
                let syn = first(proto, pod_client, fe).with_macs(POD_MAC, LXC0_MAC);
                let port = open_snat_flow(&dp, &syn, l.lxc0, NODE_POD_GW, LOCAL_POD);
                let snat = SocketAddrV4::new(NODE_POD_GW, port);
                assert_snat_ct(&dp, proto, pod_client, fe, BE_LOCAL, snat);
                dp.assert_ct_len(2, &what);
                // Its answer to the node's address goes back to it from the frontend.
                let r = reply(proto, LOCAL_POD, snat).with_macs(POD_MAC, LXC0_MAC);
                assert_reply_translated(&dp, &what, &r, l.lxc0, fe, pod_client);
                dp.assert_stats(&[(stats::DNAT_NEW, 1), (stats::REV_NAT, 1)]);
            }
        }
    });
}

#[test]
fn pod_to_its_service_with_another_local_backend_is_not_masqueraded() {
    on_node(|l| {
        let pod_client = SocketAddrV4::new(*LOCAL_POD.ip(), 50000);
        let dp = node_port_datapath(proto::TCP, &[BE_LOCAL2]);
        let syn = first(proto::TCP, pod_client, NODE_PORT.addr);
        assert_dnat_only(&dp, "to the other pod", &syn, l.lxc0, LOCAL_POD2);
        dp.assert_ct(
            "SERVICE",
            &ct_key(pod_client, NODE_PORT.addr, proto::TCP, CT_DIR_SERVICE),
            &ct_value(LOCAL_POD2, CT_F_REDIRECT, None, BE_LOCAL2.0, SVC_ID),
        );
    });
}

// ---------------------------------------------------------------------------
// ICMP errors
// ---------------------------------------------------------------------------

/// `quote` (an IPv4 header and what follows) with its addresses and ports
/// set to `src` → `dst` and its header checksum recomputed: what a quote
/// translated back must read. Bytes after the ports are left as they are.
fn requote(quote: &[u8], src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut q = quote.to_vec();
    let hlen = usize::from(q[0] & 0x0f) * 4;
    q[12..16].copy_from_slice(&src.ip().octets());
    q[16..20].copy_from_slice(&dst.ip().octets());
    q[10..12].fill(0);
    let c = checksum(&q[..hlen]);
    q[10..12].copy_from_slice(&c.to_be_bytes());
    if q.len() >= hlen + 2 {
        q[hlen..hlen + 2].copy_from_slice(&src.port().to_be_bytes());
    }
    if q.len() >= hlen + 4 {
        q[hlen + 2..hlen + 4].copy_from_slice(&dst.port().to_be_bytes());
    }
    q
}

const MTU_1400: [u8; 4] = [0, 0, 0x05, 0x78];

/// Fragmentation needed (next-hop MTU 1400) from `from` to `to`, quoting `quote`.
fn frag_needed(from: Ipv4Addr, to: Ipv4Addr, quote: &[u8]) -> FrameBuilder {
    FrameBuilder::icmp_error(
        from,
        to,
        icmp::DEST_UNREACH,
        icmp::FRAG_NEEDED,
        MTU_1400,
        quote,
    )
}

#[test]
fn icmp_errors_about_a_snat_flow_are_translated_back_to_the_client() {
    on_node(|l| {
        for (pname, proto) in PROTOS {
            for (ename, ty, code, rest) in [
                (
                    "fragmentation needed",
                    icmp::DEST_UNREACH,
                    icmp::FRAG_NEEDED,
                    MTU_1400,
                ),
                (
                    "time exceeded",
                    icmp::TIME_EXCEEDED,
                    icmp::TTL_EXCEEDED,
                    [0; 4],
                ),
                (
                    "port unreachable from the backend",
                    icmp::DEST_UNREACH,
                    icmp::PORT_UNREACH,
                    [0; 4],
                ),
            ] {
                let what = format!("{pname} {ename}");
                let dp = node_port_datapath(proto, &[BE_B]);
                let syn = first(proto, CLIENT, NODE_PORT.addr);
                let port = open_snat_flow(&dp, &syn, l.ext0, NODE_INT, POD_B);
                let snat = SocketAddrV4::new(NODE_INT, port);
                // The offending packet as it left the node: for time
                // exceeded one with TTL 2, which leaves with 1.
                let offending = if ty == icmp::TIME_EXCEEDED {
                    let n = next(proto, CLIENT, NODE_PORT.addr).with_ttl(2);
                    let (v, out) = dp.ingress(&n.build(), l.ext0);
                    assert_eq!(v, TC_ACT_REDIRECT, "{what}: TTL 2 packet");
                    out
                } else {
                    snated(&syn, snat, POD_B).build()
                };
                let from = if code == icmp::PORT_UNREACH {
                    *POD_B.ip()
                } else {
                    NODE_B
                };
                let quote = quote_of(&offending, 8);
                let err = FrameBuilder::icmp_error(from, NODE_INT, ty, code, rest, &quote)
                    .with_macs(NODE_B_MAC, INT0_MAC);
                let (v, out) = dp.ingress(&err.build(), l.int0);
                assert_eq!(v, TC_ACT_REDIRECT, "{what}: verdict\n{}", hex(&out));
                let want = FrameBuilder::icmp_error(
                    from,
                    *CLIENT.ip(),
                    ty,
                    code,
                    rest,
                    &requote(&quote, CLIENT, NODE_PORT.addr),
                )
                .with_macs(NODE_B_MAC, INT0_MAC)
                .with_ttl(63);
                assert_frame(&what, &out, &want.build());
                let n_fwd = u64::from(ty == icmp::TIME_EXCEEDED);
                dp.assert_stats(&[
                    (stats::DNAT_NEW, 1),
                    (stats::DNAT_ESTABLISHED, n_fwd),
                    (stats::ICMP_ERROR_TRANSLATED, 1),
                ]);
                assert_snat_ct(&dp, proto, CLIENT, NODE_PORT.addr, BE_B, snat);
            }
        }
    });
}

#[test]
fn icmp_error_about_a_local_backend_flow_is_translated_back() {
    on_node(|l| {
        let dp = node_port_datapath(proto::UDP, &[BE_LOCAL]);
        let d = FrameBuilder::udp(CLIENT, NODE_PORT.addr);
        let (v, translated) = dp.ingress(&d.build(), l.ext0);
        assert_eq!(v, TC_ACT_OK);
        // The pod has nothing on that port.
        let quote = quote_of(&translated, 8);
        let port_unreach = |q: &[u8]| {
            FrameBuilder::icmp_error(
                *LOCAL_POD.ip(),
                *CLIENT.ip(),
                icmp::DEST_UNREACH,
                icmp::PORT_UNREACH,
                [0; 4],
                q,
            )
            .with_macs(POD_MAC, LXC0_MAC)
        };
        let (v, out) = dp.ingress(&port_unreach(&quote).build(), l.lxc0);
        assert_eq!(v, TC_ACT_REDIRECT, "verdict\n{}", hex(&out));
        let want = port_unreach(&requote(&quote, CLIENT, NODE_PORT.addr)).with_ttl(63);
        assert_frame("port unreachable", &out, &want.build());
        dp.assert_stats(&[(stats::DNAT_NEW, 1), (stats::ICMP_ERROR_TRANSLATED, 1)]);
    });
}

#[test]
fn icmp_error_sent_by_the_node_is_translated_at_egress() {
    on_node(|l| {
        let dp = node_port_datapath(proto::TCP, &[BE_LOCAL]);
        let syn = FrameBuilder::tcp(CLIENT, NODE_PORT.addr, tcp_flags::SYN).with_payload(&[0; 100]);
        let (v, translated) = dp.ingress(&syn.build(), l.ext0);
        assert_eq!(v, TC_ACT_OK);
        // Forwarding it to the pod, the node finds it too big for lxc0.
        let quote = quote_of(&translated, 8);
        let err = frag_needed(NODE_EXT, *CLIENT.ip(), &quote).with_macs(EXT0_MAC, ROUTER_MAC);
        let (v, out) = dp.run(Prog::Egress, &err.build(), l.ext0);
        assert_eq!(v, TC_ACT_OK, "egress verdict");
        let q = requote(&quote, CLIENT, NODE_PORT.addr);
        let want = frag_needed(NODE_EXT, *CLIENT.ip(), &q).with_macs(EXT0_MAC, ROUTER_MAC);
        assert_frame("egress frag needed", &out, &want.build());
        dp.assert_stats(&[(stats::DNAT_NEW, 1), (stats::ICMP_ERROR_TRANSLATED, 1)]);

        // Anything else leaves egress untouched and uncounted.
        for other in [
            FrameBuilder::tcp(NODE_PORT.addr, CLIENT, tcp_flags::ACK).build(),
            FrameBuilder::udp(SocketAddrV4::new(NODE_EXT, 5000), CLIENT).build(),
            arp_request(EXT0_MAC, NODE_EXT, *CLIENT.ip()),
        ] {
            let (v, out) = dp.run(Prog::Egress, &other, l.ext0);
            assert_eq!(v, TC_NEXT);
            assert_frame("egress pass", &out, &other);
        }
        dp.assert_stats(&[(stats::DNAT_NEW, 1), (stats::ICMP_ERROR_TRANSLATED, 1)]);
    });
}

#[test]
fn icmp_error_about_an_unknown_flow_passes_unchanged() {
    on_node(|l| {
        let dp = node_port_datapath(proto::TCP, &[BE_B]);
        let port = open_flow_to_pod_b(&dp, l, proto::TCP, CLIENT);
        // Same backend, another SNAT port; another backend; an untranslated packet.
        let other_port = if port == SNAT_PORT_MAX {
            port - 1
        } else {
            port + 1
        };
        for (name, offending) in [
            (
                "another SNAT port",
                first(proto::TCP, SocketAddrV4::new(NODE_INT, other_port), POD_B),
            ),
            (
                "another backend",
                first(proto::TCP, SocketAddrV4::new(NODE_INT, port), POD_C),
            ),
            (
                "the node's own flow",
                first(proto::TCP, SocketAddrV4::new(NODE_INT, 33000), POD_B),
            ),
            (
                "UDP on the TCP flow's ports",
                first(proto::UDP, SocketAddrV4::new(NODE_INT, port), POD_B),
            ),
        ] {
            let input = frag_needed_to_node(&quote_of(&offending.build(), 8)).build();
            let (v, out) = dp.ingress(&input, l.int0);
            assert_eq!(v, TC_NEXT, "{name}: verdict");
            assert_frame(name, &out, &input);
        }
        dp.assert_stats(&[(stats::DNAT_NEW, 1), (stats::PASS_OTHER_PROTO, 4)]);
        dp.assert_ct_len(2, "no entry added");
    });
}

#[test]
fn icmp_error_about_a_reply_is_translated_to_the_backend() {
    on_node(|l| {
        let dp = node_port_datapath(proto::TCP, &[BE_B]);
        let port = open_flow_to_pod_b(&dp, l, proto::TCP, CLIENT);
        let snat = SocketAddrV4::new(NODE_INT, port);
        // The backend's answer as it left the node (from the frontend), too
        // big for a link on the way to the client: the router there answers
        // the frontend address (the node).
        let answer = FrameBuilder::tcp(NODE_PORT.addr, CLIENT, tcp_flags::ACK)
            .with_payload(&[0; 1400])
            .with_ttl(63);
        let quote = quote_of(&answer.build(), 8);
        let err = frag_needed(ROUTER, NODE_EXT, &quote);
        let (v, out) = dp.ingress(&err.build(), l.ext0);
        // What netfilter does for kube-proxy: the error goes to the backend,
        // quoting its packet as it sent it (backend → node:SNAT port).
        let want = frag_needed(ROUTER, *POD_B.ip(), &requote(&quote, POD_B, snat)).with_ttl(63);
        assert_eq!(v, TC_ACT_REDIRECT, "verdict; output:\n{}", hex(&out));
        assert_frame("error to the backend", &out, &want.build());
    });
}

// ---------------------------------------------------------------------------
// Malformed packets
// ---------------------------------------------------------------------------

struct Case {
    name: &'static str,
    input: Vec<u8>,
    /// TC ingress verdict; the frame must come out unchanged.
    verdict: u32,
    /// The one reason counting it under TC.
    counted: Option<u32>,
}

fn cut(f: &FrameBuilder, len: usize) -> Vec<u8> {
    let mut b = f.build();
    assert!(len < b.len());
    b.truncate(len);
    b
}

/// Each case on a fresh datapath with the `NodePort` (TCP and UDP, Cluster
/// policy, remote backend): TC passes or drops it unchanged, counts it once,
/// writes no conntrack entry; XDP passes it unchanged, uncounted.
fn run_unchanged_cases(l: &Links, cases: &[Case]) {
    let mut failures = Vec::new();
    for c in cases {
        let mut dp = Datapath::new();
        for proto in [proto::TCP, proto::UDP] {
            dp.add_service(NODE_PORT.addr, proto, SVC_ID, cluster(NODE_PORT), &[BE_B]);
        }
        let check = || -> Result<(), String> {
            let (v, out) = dp
                .try_run(Prog::Xdp, &c.input, l.ext0)
                .map_err(|e| format!("XDP run: {e:?}"))?;
            if v != XDP_PASS || out != c.input {
                return Err(format!("XDP: verdict {v}, output\n{}", hex(&out)));
            }
            dp.check_stats(&[]).map_err(|e| format!("XDP {e}"))?;
            let (v, out) = dp
                .try_run(Prog::Ingress, &c.input, l.ext0)
                .map_err(|e| format!("TC run: {e:?}"))?;
            if v != c.verdict {
                return Err(format!("TC verdict {v:#x}, expected {:#x}", c.verdict));
            }
            if out != c.input {
                return Err(format!("TC changed the frame:\n{}", hex(&out)));
            }
            let n = dp.ct().len();
            if n != 0 {
                return Err(format!("{n} conntrack entries"));
            }
            dp.check_stats(&c.counted.iter().map(|r| (*r, 1)).collect::<Vec<_>>())
        };
        if let Err(e) = check() {
            failures.push(format!("--- {}: {e}\ninput:\n{}", c.name, hex(&c.input)));
        }
    }
    assert_no_failures(&failures, cases.len());
}

#[test]
fn malformed_packets_to_a_node_port_pass_unchanged_and_are_counted() {
    on_node(|l| {
        let syn = first(proto::TCP, CLIENT, NODE_PORT.addr);
        let udp = first(proto::UDP, CLIENT, NODE_PORT.addr);
        let l4 = ETH_HLEN + IPV4_HLEN;
        let trunc = Some(stats::MALFORMED_TRUNCATED);
        let bad_ihl = Some(stats::MALFORMED_BAD_IHL);
        let frag = Some(stats::PASS_FRAGMENT);
        let pass = |name, input, counted| Case {
            name,
            input,
            verdict: TC_NEXT,
            counted,
        };
        run_unchanged_cases(
            l,
            &[
                pass("IPv4 header, no TCP header", cut(&syn, l4), trunc),
                pass(
                    "TCP header cut at 4 bytes (ports only)",
                    cut(&syn, l4 + 4),
                    trunc,
                ),
                pass("TCP header cut at 10 bytes", cut(&syn, l4 + 10), trunc),
                pass(
                    "TCP header cut at 16 bytes (before its checksum)",
                    cut(&syn, l4 + 16),
                    trunc,
                ),
                pass("TCP header cut at 19 bytes", cut(&syn, l4 + 19), trunc),
                pass("UDP header cut at 6 bytes", cut(&udp, l4 + 6), trunc),
                pass("UDP header cut at 7 bytes", cut(&udp, l4 + 7), trunc),
                pass(
                    "TCP header cut after IP options (IHL 7)",
                    cut(&syn.clone().with_options(&[1; 8]), l4 + 8 + 12),
                    trunc,
                ),
                pass(
                    "IHL 15 on a 20-byte header",
                    syn.clone().with_ihl(15).build(),
                    trunc,
                ),
                pass("IHL 4", syn.clone().with_ihl(4).build(), bad_ihl),
                pass("IHL 0", udp.clone().with_ihl(0).build(), bad_ihl),
                pass(
                    "version 6 in an IPv4 frame",
                    syn.clone().with_version(6).build(),
                    bad_ihl,
                ),
                // (First fragments are translated like whole packets: see
                // packet.rs.) A later one whose first was not seen passes.
                pass(
                    "UDP last fragment, its first not seen",
                    udp.clone().with_frag_offset(185).build(),
                    frag,
                ),
                pass(
                    "ICMP echo to the NodePort address",
                    FrameBuilder::icmp_echo(*CLIENT.ip(), NODE_EXT).build(),
                    Some(stats::PASS_OTHER_PROTO),
                ),
            ],
        );
    });
}

/// A UDP flow from `CLIENT` through the `NodePort` to `POD_B`: the datapath,
/// the SNAT address and the datagram as it left for the backend.
fn snat_udp_flow(l: &Links) -> (Datapath, SocketAddrV4, Vec<u8>) {
    let dp = node_port_datapath(proto::UDP, &[BE_B]);
    let d = first(proto::UDP, CLIENT, NODE_PORT.addr).with_payload(&[0x5a; 32]);
    let port = open_snat_flow(&dp, &d, l.ext0, NODE_INT, POD_B);
    let snat = SocketAddrV4::new(NODE_INT, port);
    let sent = snated(&d, snat, POD_B).build();
    (dp, snat, sent)
}

/// The conntrack map without the timestamps.
fn ct_snapshot(dp: &Datapath) -> BTreeMap<(u8, u32, u16, u32, u16, u8), CtValue> {
    dp.ct()
        .into_iter()
        .map(|(k, mut v)| {
            v.last_seen_ns = 0;
            (
                (
                    k.dir, k.saddr_be, k.sport_be, k.daddr_be, k.dport_be, k.proto,
                ),
                v,
            )
        })
        .collect()
}

/// Fragmentation needed from node B to the node's SNAT address.
fn frag_needed_to_node(quote: &[u8]) -> FrameBuilder {
    frag_needed(NODE_B, NODE_INT, quote)
}

/// The same error translated back: to the client, quoting what it sent,
/// one hop later.
fn frag_needed_to_client(quote: &[u8]) -> FrameBuilder {
    let q = requote(quote, CLIENT, NODE_PORT.addr);
    frag_needed(NODE_B, *CLIENT.ip(), &q).with_ttl(63)
}

#[test]
fn malformed_icmp_errors_about_a_snat_flow_pass_unchanged_and_are_counted() {
    on_node(|l| {
        let (dp, snat, sent) = snat_udp_flow(l);
        let ct_before = ct_snapshot(&dp);
        let err = frag_needed_to_node;
        let with_options = first(proto::UDP, snat, POD_B)
            .with_options(&[1, 1, 1, 1])
            .build();
        let echo = FrameBuilder::icmp_echo(NODE_INT, *POD_B.ip()).build();
        let mut icmp_hdr_cut = err(&[]).build();
        icmp_hdr_cut.truncate(ETH_HLEN + IPV4_HLEN + 4);
        let mut echo_reply = err(&quote_of(&sent, 8));
        echo_reply.l4 = L4::Icmp {
            ty: icmp::ECHO_REPLY,
            code: 0,
            rest: [0; 4],
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("quote of 10 bytes", err(&quote_of(&sent, 8)[..10]).build()),
            (
                "quote of the IPv4 header only",
                err(&quote_of(&sent, 0)).build(),
            ),
            (
                "quote with 2 bytes of UDP",
                err(&quote_of(&sent, 2)).build(),
            ),
            ("ICMP header cut at 4 bytes", icmp_hdr_cut),
            (
                "quoted header with IP options",
                err(&quote_of(&with_options, 8)).build(),
            ),
            ("quote of an ICMP echo", err(&quote_of(&echo, 8)).build()),
            ("echo reply with a quote-like payload", echo_reply.build()),
        ];
        for (name, input) in &cases {
            let (v, out) = dp.ingress(input, l.int0);
            assert_eq!(v, TC_NEXT, "{name}: verdict\n{}", hex(&out));
            assert_frame(name, &out, input);
        }
        let n = u64::try_from(cases.len()).expect("count");
        dp.assert_stats(&[(stats::DNAT_NEW, 1), (stats::PASS_OTHER_PROTO, n)]);
        assert_eq!(ct_snapshot(&dp), ct_before, "conntrack changed");
    });
}

#[test]
fn icmp_error_with_only_the_ports_quoted_or_outer_options_is_translated() {
    on_node(|l| {
        let (dp, _, sent) = snat_udp_flow(l);
        let ct_before = ct_snapshot(&dp);
        // The ports are all a translation needs.
        let q4 = quote_of(&sent, 4);
        let (v, out) = dp.ingress(&frag_needed_to_node(&q4).build(), l.int0);
        assert_eq!(v, TC_ACT_REDIRECT, "4-byte quote");
        assert_frame("4-byte quote", &out, &frag_needed_to_client(&q4).build());
        // Options in the outer header move the ICMP header, not the fields
        // rewritten in the outer header.
        let q8 = quote_of(&sent, 8);
        let opts = [0x94, 0x04, 0, 0];
        let (v, out) = dp.ingress(
            &frag_needed_to_node(&q8).with_options(&opts).build(),
            l.int0,
        );
        assert_eq!(v, TC_ACT_REDIRECT, "outer options");
        assert_frame(
            "outer options",
            &out,
            &frag_needed_to_client(&q8).with_options(&opts).build(),
        );
        dp.assert_stats(&[(stats::DNAT_NEW, 1), (stats::ICMP_ERROR_TRANSLATED, 2)]);
        assert_eq!(ct_snapshot(&dp), ct_before, "conntrack changed");
    });
}

// ---------------------------------------------------------------------------
// XDP
// ---------------------------------------------------------------------------

#[test]
fn xdp_translates_snat_flows_and_their_replies() {
    on_node(|l| {
        // (backend, node address, egress device MAC, next hop MAC, device
        // back to the client, forward verdict, reply verdict)
        for (b, node, out_mac, hop_mac, back_dev, fwd_v, rev_v) in [
            (
                BE_B,
                NODE_INT,
                INT0_MAC,
                NODE_B_MAC,
                l.int0,
                XDP_REDIRECT,
                XDP_REDIRECT,
            ),
            (BE_C, NODE_EXT, EXT0_MAC, NODE_C_MAC, l.ext0, XDP_TX, XDP_TX),
        ] {
            for fe in FRONTENDS {
                for (pname, proto) in PROTOS {
                    let what = format!("XDP {} {pname} to {}", fe.name, b.1);
                    let mut dp = Datapath::new();
                    dp.add_service(fe.addr, proto, SVC_ID, cluster(fe), &[b]);
                    let syn = first(proto, CLIENT, fe.addr);
                    let (v, out) = dp.xdp(&syn.build(), l.ext0);
                    assert_eq!(v, fwd_v, "{what}: verdict\n{}", hex(&out));
                    let snat = SocketAddrV4::new(node, snat_port(&what, &out));
                    let want = snated(&syn, snat, b.1).with_macs(out_mac, hop_mac);
                    assert_frame(&what, &out, &want.build());
                    // The same conntrack entries TC writes.
                    assert_snat_ct(&dp, proto, CLIENT, fe.addr, b, snat);
                    dp.assert_ct_len(2, &what);

                    let r = reply(proto, b.1, snat).with_macs(hop_mac, out_mac);
                    let (v, out) = dp.xdp(&r.build(), back_dev);
                    assert_eq!(v, rev_v, "{what}: reply verdict\n{}", hex(&out));
                    let want = rev_nated(&r, fe.addr, CLIENT).with_macs(EXT0_MAC, ROUTER_MAC);
                    assert_frame(&format!("{what}: reply"), &out, &want.build());

                    // TC carries on with the flow XDP started.
                    assert_later_packet_snated(&dp, &what, l, proto, fe.addr, snat, b.1);
                    dp.assert_stats(&[
                        (stats::XDP_FORWARD, 1),
                        (stats::XDP_REVERSE, 1),
                        (stats::DNAT_ESTABLISHED, 1),
                        // Reply seen, then the client again: confirmed.
                        (stats::CT_CONFIRMED, 1),
                    ]);
                }
            }
        }
    });
}

#[test]
fn xdp_carries_on_a_flow_that_tc_started() {
    on_node(|l| {
        let dp = node_port_datapath(proto::UDP, &[BE_B]);
        let port = open_flow_to_pod_b(&dp, l, proto::UDP, CLIENT);
        let snat = SocketAddrV4::new(NODE_INT, port);
        let n = next(proto::UDP, CLIENT, NODE_PORT.addr);
        let (v, out) = dp.xdp(&n.build(), l.ext0);
        assert_eq!(v, XDP_REDIRECT);
        let want = snated(&n, snat, POD_B).with_macs(INT0_MAC, NODE_B_MAC);
        assert_frame("XDP forward", &out, &want.build());
        let r = reply(proto::UDP, POD_B, snat).with_udp_zero_checksum();
        let (v, out) = dp.xdp(&r.build(), l.int0);
        assert_eq!(v, XDP_REDIRECT);
        let want = rev_nated(&r, NODE_PORT.addr, CLIENT).with_macs(EXT0_MAC, ROUTER_MAC);
        assert_frame("XDP reply, UDP checksum 0 kept", &out, &want.build());
        dp.assert_ct_len(2, "shared entries");
        dp.assert_stats(&[
            (stats::DNAT_NEW, 1),
            (stats::XDP_FORWARD, 1),
            (stats::XDP_REVERSE, 1),
        ]);
    });
}

struct XdpCase {
    name: &'static str,
    setup: fn(&mut Datapath),
    input: Vec<u8>,
    ifindex: u32,
    /// XDP records the flow it chose a local backend for (TC then keeps
    /// that choice): its two conntrack entries and `xdp_local_flow`.
    records_local_flow: bool,
}

/// The `NodePort` over TCP and UDP (Cluster policy) with backend `b`.
fn node_port_to(dp: &mut Datapath, b: Be) {
    for proto in [proto::TCP, proto::UDP] {
        dp.add_service(NODE_PORT.addr, proto, SVC_ID, cluster(NODE_PORT), &[b]);
    }
}

fn xdp_pass_cases(l: &Links) -> Vec<XdpCase> {
    let syn = first(proto::TCP, CLIENT, NODE_PORT.addr);
    let udp = first(proto::UDP, CLIENT, NODE_PORT.addr);
    let case = |name, setup: fn(&mut Datapath), input, ifindex| XdpCase {
        name,
        setup,
        input,
        ifindex,
        records_local_flow: name == "local backend",
    };
    vec![
        case(
            "local backend",
            |dp| node_port_to(dp, BE_LOCAL),
            syn.build(),
            l.ext0,
        ),
        // A device XDP may not redirect to (no XDP attached by the agent:
        // it may lack ndo_xdp_xmit, and the kernel would drop the frame).
        case(
            "remote backend behind a device not in proxy_xdp_tx_v1",
            |dp| {
                node_port_to(dp, BE_B);
                let mut ports = aya::maps::DevMapHash::try_from(dp.ebpf.map_mut(proxy_agent::pins::XDP_TX_MAP).expect("xdp tx map"))
                    .expect("devmap type");
                let keys: Vec<u32> = ports.keys().filter_map(Result::ok).collect();
                for k in keys {
                    ports.remove(k).expect("devmap remove");
                }
            },
            syn.build(),
            l.ext0,
        ),
        case(
            "policy Local, local backend",
            |dp| {
                dp.add_service(
                    NODE_PORT.addr,
                    proto::TCP,
                    SVC_ID,
                    local(NODE_PORT),
                    &[BE_LOCAL],
                );
            },
            syn.build(),
            l.ext0,
        ),
        case(
            "frontend without backends",
            |dp| {
                dp.add_service(NODE_PORT.addr, proto::TCP, SVC_ID, cluster(NODE_PORT), &[]);
            },
            syn.build(),
            l.ext0,
        ),
        case(
            "ClusterIP frontend, remote backend",
            |dp| {
                dp.add_service(CLUSTER_IP, proto::TCP, SVC_ID, SVC_FLAG_CLUSTER_IP, &[BE_B]);
            },
            first(proto::TCP, CLIENT, CLUSTER_IP).build(),
            l.ext0,
        ),
        case(
            "next hop without neighbour entry",
            |dp| node_port_to(dp, BE_NO_NEIGH),
            syn.build(),
            l.ext0,
        ),
        case(
            "no route to the backend",
            |dp| node_port_to(dp, BE_UNROUTED),
            udp.build(),
            l.ext0,
        ),
        case(
            "IP options",
            |dp| node_port_to(dp, BE_B),
            syn.clone().with_options(&[0x94, 0x04, 0, 0]).build(),
            l.ext0,
        ),
        case(
            "first fragment",
            |dp| node_port_to(dp, BE_B),
            udp.clone().with_more_fragments().build(),
            l.ext0,
        ),
        case(
            "TCP header cut at 19 bytes",
            |dp| node_port_to(dp, BE_B),
            cut(&syn, ETH_HLEN + IPV4_HLEN + 19),
            l.ext0,
        ),
        case(
            "FIN opening nothing",
            |dp| node_port_to(dp, BE_B),
            FrameBuilder::tcp(CLIENT, NODE_PORT.addr, tcp_flags::FIN | tcp_flags::ACK).build(),
            l.ext0,
        ),
        case(
            "reply-shaped packet without a flow",
            |dp| node_port_to(dp, BE_B),
            reply(proto::TCP, POD_B, SocketAddrV4::new(NODE_INT, 61001)).build(),
            l.int0,
        ),
        case(
            "ARP",
            |dp| node_port_to(dp, BE_B),
            arp_request(ROUTER_MAC, ROUTER, NODE_EXT),
            l.ext0,
        ),
    ]
}

#[test]
fn xdp_passes_untouched_what_tc_must_handle() {
    on_node(|l| {
        let cases = xdp_pass_cases(l);
        let mut failures = Vec::new();
        for c in &cases {
            let mut dp = Datapath::new();
            (c.setup)(&mut dp);
            let (v, out) = dp.xdp(&c.input, c.ifindex);
            let n = dp.ct().len();
            let (want_ct, stats) = if c.records_local_flow {
                (2, dp.check_stats(&[(stats::XDP_LOCAL_FLOW, 1)]))
            } else {
                (0, dp.check_stats(&[]))
            };
            if v != XDP_PASS || out != c.input || n != want_ct || stats.is_err() {
                failures.push(format!(
                    "--- {}: verdict {v}, {n} ct entries, {stats:?}, output\n{}",
                    c.name,
                    hex(&out)
                ));
            }
        }
        assert_no_failures(&failures, cases.len());
    });
}

#[test]
fn xdp_leaves_flow_ends_and_local_replies_to_tc() {
    on_node(|l| {
        let mut dp = node_port_datapath(proto::TCP, &[BE_B]);
        dp.add_service(
            EXTERNAL_IP.addr,
            proto::TCP,
            SVC_ID + 1,
            cluster(EXTERNAL_IP),
            &[BE_LOCAL],
        );
        let (v, _) = dp.xdp(&first(proto::TCP, CLIENT, NODE_PORT.addr).build(), l.ext0);
        assert_eq!(v, XDP_REDIRECT);
        let snat_port = dp
            .ct_get(&ct_key(CLIENT, NODE_PORT.addr, proto::TCP, CT_DIR_SERVICE))
            .expect("flow")
            .snat_port_be;
        let snat = SocketAddrV4::new(NODE_INT, u16::from_be(snat_port));
        let (v, _) = dp.ingress(&first(proto::TCP, CLIENT, EXTERNAL_IP.addr).build(), l.ext0);
        assert_eq!(v, TC_ACT_OK, "local backend flow through TC");
        let before = dp.ct().len();
        for (name, input, dev) in [
            (
                "client FIN",
                FrameBuilder::tcp(CLIENT, NODE_PORT.addr, tcp_flags::FIN | tcp_flags::ACK).build(),
                l.ext0,
            ),
            (
                "client RST",
                FrameBuilder::tcp(CLIENT, NODE_PORT.addr, tcp_flags::RST).build(),
                l.ext0,
            ),
            (
                "backend FIN",
                FrameBuilder::tcp(POD_B, snat, tcp_flags::FIN | tcp_flags::ACK).build(),
                l.int0,
            ),
            (
                "local backend's reply",
                reply(proto::TCP, LOCAL_POD, CLIENT).build(),
                l.lxc0,
            ),
        ] {
            let (v, out) = dp.xdp(&input, dev);
            assert_eq!(v, XDP_PASS, "{name}");
            assert_frame(name, &out, &input);
        }
        dp.assert_ct_len(before, "nothing written");
        dp.assert_stats(&[(stats::XDP_FORWARD, 1), (stats::DNAT_NEW, 1)]);
        // None of it marked the flow closing: that is TC's job.
        let e = dp
            .ct_get(&ct_key(CLIENT, NODE_PORT.addr, proto::TCP, CT_DIR_SERVICE))
            .expect("flow");
        assert_eq!(e.flags & CT_F_CLOSING, 0);
    });
}
