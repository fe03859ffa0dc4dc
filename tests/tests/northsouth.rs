//! North-south traffic on two nodes: `NodePort`, externalIPs and `LoadBalancer`
//! IPs, SNAT to remote backends, externalTrafficPolicy Local with the
//! client's address kept, healthCheckNodePort, --nodeport-addresses,
//! hairpin, and SNAT ports under many concurrent flows. The agent runs on
//! node A; a client namespace sends real traffic; pods answer with the
//! source address they see.
//!
//! Every test runs on the TC path and again with the XDP fast path in
//! generic mode (`--xdp --xdp-mode generic`), which must give the same
//! results; where flows go to node B, XDP's own counters must show it
//! carried them. The main `NodePort` test also runs with native XDP on the
//! veths (made to behave like wires, [`Cluster::make_wire_like`]).
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use integration_tests::{
    agent::{agent_bin, programmed, wait_programmed},
    client::{http_get, udp_request},
    cluster::{CLIENT_IP, Cluster, EXTERNAL_IP, LB_IP, NODE_A_IP, NODE_A_IP2, NODE_A_LINK_IP, Seen, pod_ip_a, pod_ip_b},
    manifests::{web_yaml, write_atomic},
};
use proxy_common::ct::{CT_DIR_REPLY, CT_F_CLOSING, CT_F_SNAT, CtKey, CtValue, SNAT_PORT_MAX, SNAT_PORT_MIN};

const T: Duration = Duration::from_secs(2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const HC_PORT: u16 = 32000;

/// Which datapath carries the north-south traffic on node A.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Tc,
    XdpGeneric,
    XdpNative,
    /// Native XDP with node A behind XDP wires: it receives frames, not
    /// skbs, as from a NIC ([`Cluster::new_wired`]).
    XdpNativeWired,
}

impl Path {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Self::Tc => &[],
            Self::XdpGeneric => &["--xdp", "--xdp-mode", "generic"],
            Self::XdpNative | Self::XdpNativeWired => &["--xdp", "--xdp-mode", "native"],
        }
    }

    fn xdp(self) -> bool {
        self != Self::Tc
    }
}

/// Starts the agent on node A on `path`; for XDP, checks it attached.
fn start(c: &mut Cluster, path: Path, extra: &[&str]) {
    if path == Path::XdpNative {
        c.make_wire_like();
    }
    let mut flags = path.flags().to_vec();
    flags.extend_from_slice(extra);
    c.start_agent_a(&agent_bin(), &flags);
}

/// After traffic to node B: XDP forwarded and reverse-translated packets
/// (on the XDP paths), or did not run at all (TC).
fn check_xdp_carried(c: &Cluster, path: Path) {
    let (fwd, rev) = (c.a.stat("xdp_forward"), c.a.stat("xdp_reverse"));
    if path.xdp() {
        assert!(c.a.agent_log().contains("XDP fast path attached"), "{}", c.a.agent_log());
        assert!(fwd > 0, "no packet forwarded by XDP");
        assert!(rev > 0, "no reply translated by XDP");
    } else {
        assert_eq!((fwd, rev), (0, 0), "XDP counters moved without --xdp");
    }
}

/// A Service `web` (type `kind`, externalTrafficPolicy `etp`) with HTTP
/// 80→8080 (nodePort 30080) and UDP 53→5353 (nodePort 30053), externalIP
/// and `LoadBalancer` IP, and an `EndpointSlice` with `endpoints` (ip, node).
fn web(etp: &str, endpoints: &[(Ipv4Addr, &str)]) -> String {
    let extra = format!("  externalIPs: [{EXTERNAL_IP}]\n  externalTrafficPolicy: {etp}\n  healthCheckNodePort: {HC_PORT}\n");
    web_yaml("LoadBalancer", VIP, &extra, Some(LB_IP), endpoints)
}

fn cluster(prefix: &str, a: usize, b: usize) -> Cluster {
    serve(Cluster::new(prefix, a, b))
}

fn serve(mut c: Cluster) -> Cluster {
    c.serve_http_peer(8080);
    c.serve_udp_peer(5353);
    c
}

fn get(c: &Cluster, addr: Ipv4Addr, port: u16) -> std::io::Result<Seen> {
    c.client.run(move || {
        let body = http_get(SocketAddr::from((addr, port)), T)?;
        Seen::parse(&body).ok_or_else(|| std::io::Error::other(format!("bad answer {body:?}")))
    })
}

fn udp(c: &Cluster, addr: Ipv4Addr, port: u16, msg: &'static str) -> std::io::Result<Seen> {
    c.client.run(move || {
        let body = udp_request(SocketAddr::from((addr, port)), msg, T)?;
        Seen::parse(&body).ok_or_else(|| std::io::Error::other(format!("bad answer {body:?}")))
    })
}

fn health(c: &Cluster, addr: Ipv4Addr, port: u16) -> std::io::Result<(u16, String)> {
    c.client_http_status(SocketAddr::from((addr, port)), T)
}

#[test]
fn nodeport_reaches_local_and_remote_backends_and_remote_ones_see_the_node() {
    nodeport_local_and_remote(Path::Tc);
}

#[test]
fn xdp_generic_nodeport_reaches_local_and_remote_backends_and_remote_ones_see_the_node() {
    nodeport_local_and_remote(Path::XdpGeneric);
}

#[test]
fn xdp_native_nodeport_reaches_local_and_remote_backends_and_remote_ones_see_the_node() {
    nodeport_local_and_remote(Path::XdpNative);
}

#[test]
fn xdp_native_behind_nic_like_wires_nodeport_reaches_local_and_remote_backends() {
    nodeport_local_and_remote(Path::XdpNativeWired);
}

fn nodeport_local_and_remote(path: Path) {
    let mut c = if path == Path::XdpNativeWired { serve(Cluster::new_wired("nsw", 1, 1)) } else { cluster("nsc", 1, 1) };
    write_atomic(&c.manifests, "web.yaml", &web("Cluster", &[(pod_ip_a(1), "node-a"), (pod_ip_b(1), "node-b")]));
    start(&mut c, path, &[]);
    c.wait_frontends(6);

    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let s = get(&c, NODE_A_IP, NODE_PORT).unwrap_or_else(|e| panic!("NodePort TCP failed: {e}\n{}", c.a.agent_log()));
        // The backend on node A sees the client; the one on node B sees
        // node A (SNAT), so its reply comes back through node A.
        let want = if s.pod == "pod-a1" { CLIENT_IP } else { NODE_A_LINK_IP };
        assert_eq!(s.peer_ip(), want, "{s:?}");
        if s.pod == "pod-b1" {
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&s.peer.port()), "SNAT port {s:?}");
        }
        seen.insert(s.pod);
    }
    assert_eq!(seen.len(), 2, "both backends used over TCP: {seen:?}");
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let s = udp(&c, NODE_A_IP, UDP_NODE_PORT, "q").unwrap_or_else(|e| panic!("NodePort UDP failed: {e}\n{}", c.a.agent_log()));
        assert_eq!(s.peer_ip(), if s.pod == "pod-a1" { CLIENT_IP } else { NODE_A_LINK_IP }, "{s:?}");
        assert_eq!(s.payload, "q");
        seen.insert(s.pod);
    }
    assert_eq!(seen.len(), 2, "both backends used over UDP: {seen:?}");
    // externalIP and LoadBalancer IP frontends, on the Service port.
    for addr in [EXTERNAL_IP, LB_IP] {
        let s = get(&c, addr, 80).unwrap_or_else(|e| panic!("{addr}:80 failed: {e}"));
        assert!(s.pod == "pod-a1" || s.pod == "pod-b1");
    }
    let v = programmed(&c.a.bpffs);
    let kinds: BTreeSet<&str> = v.iter().map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["ClusterIP", "ExternalIP", "LoadBalancer", "NodePort"].into_iter().collect());
    check_xdp_carried(&c, path);
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_health_checks_say_where() {
    external_traffic_policy_local(Path::Tc);
}

#[test]
fn xdp_generic_external_traffic_policy_local_keeps_the_client_address_and_health_checks_say_where() {
    external_traffic_policy_local(Path::XdpGeneric);
}

fn external_traffic_policy_local(path: Path) {
    let mut c = cluster("nsl", 1, 1);
    // Only a remote endpoint: node A must drop, and say 503.
    write_atomic(&c.manifests, "web.yaml", &web("Local", &[(pod_ip_b(1), "node-b")]));
    start(&mut c, path, &[]);
    // The ClusterIP frontends have the remote backend; the external ones none.
    c.wait_frontends(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        match health(&c, NODE_A_IP, HC_PORT) {
            Ok(r) => break r,
            Err(e) => assert!(Instant::now() < deadline, "healthCheckNodePort not answering: {e}\n{}", c.a.agent_log()),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["localEndpoints"], 0, "{body}");
    assert_eq!(v["service"]["name"], "web");
    let r = c.client.run(|| http_get(SocketAddr::from((NODE_A_IP, NODE_PORT)), Duration::from_millis(500)));
    assert!(r.is_err(), "a node without local endpoints must not forward: {r:?}");
    let stats = integration_tests::netns::run(&agent_bin().to_string_lossy(), &["--bpffs", &c.a.bpffs.to_string_lossy(), "stats"]);
    assert!(integration_tests::agent::stats_table_cell(&stats, "drop_no_local_backend", "PACKETS") > 0, "{stats}");

    // A local endpoint appears: it answers and sees the client itself.
    write_atomic(&c.manifests, "web.yaml", &web("Local", &[(pod_ip_a(1), "node-a"), (pod_ip_b(1), "node-b")]));
    c.wait_frontends(10);
    for addr_port in [(NODE_A_IP, NODE_PORT), (EXTERNAL_IP, 80), (LB_IP, 80)] {
        for _ in 0..10 {
            let s = get(&c, addr_port.0, addr_port.1).unwrap_or_else(|e| panic!("{addr_port:?}: {e}"));
            assert_eq!(s.pod, "pod-a1", "Local uses only this node's endpoint");
            assert_eq!(s.peer_ip(), CLIENT_IP, "the client's address is kept under Local");
        }
    }
    let s = udp(&c, NODE_A_IP, UDP_NODE_PORT, "x").expect("UDP NodePort under Local");
    assert_eq!((s.pod.as_str(), s.peer_ip()), ("pod-a1", CLIENT_IP));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = health(&c, NODE_A_IP, HC_PORT).expect("health");
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            assert_eq!(v["localEndpoints"], 1, "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "health check never turned 200: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn nodeport_addresses_narrow_where_node_ports_answer() {
    nodeport_addresses_narrow(Path::Tc);
}

#[test]
fn xdp_generic_nodeport_addresses_narrow_where_node_ports_answer() {
    nodeport_addresses_narrow(Path::XdpGeneric);
}

fn nodeport_addresses_narrow(path: Path) {
    let mut c = cluster("nsn", 1, 1);
    write_atomic(&c.manifests, "web.yaml", &web("Cluster", &[(pod_ip_b(1), "node-b")]));
    start(&mut c, path, &["--nodeport-addresses", &format!("{NODE_A_IP2}/32")]);
    c.wait_frontends(5);
    let s = get(&c, NODE_A_IP2, NODE_PORT).expect("NodePort on the listed address");
    assert_eq!((s.pod.as_str(), s.peer_ip()), ("pod-b1", NODE_A_LINK_IP));
    let r = get(&c, NODE_A_IP, NODE_PORT);
    assert!(r.is_err(), "NodePort answered on an address outside --nodeport-addresses: {r:?}");
    let v = programmed(&c.a.bpffs);
    let np: Vec<&str> = v.iter().filter(|f| f.kind == "NodePort").map(|f| f.address.as_str()).collect();
    assert_eq!(np, vec![NODE_A_IP2.to_string().as_str(); 2], "{v:#?}");
    check_xdp_carried(&c, path);
}

#[test]
fn a_pod_reaching_its_own_service_gets_itself_through_hairpin() {
    hairpin(Path::Tc);
}

#[test]
fn xdp_generic_a_pod_reaching_its_own_service_gets_itself_through_hairpin() {
    hairpin(Path::XdpGeneric);
}

fn hairpin(path: Path) {
    let mut c = cluster("nsh", 1, 0);
    write_atomic(&c.manifests, "web.yaml", &web("Cluster", &[(pod_ip_a(1), "node-a")]));
    start(&mut c, path, &[]);
    c.wait_frontends(5);
    let pod = &c.pods_a()[0];
    for _ in 0..10 {
        let body = pod.ns.run(|| http_get(SocketAddr::from((VIP, 80)), T)).unwrap_or_else(|e| panic!("hairpin failed: {e}\n{}", c.a.agent_log()));
        let s = Seen::parse(&body).expect("answer");
        assert_eq!(s.pod, "pod-a1");
        assert_ne!(s.peer_ip(), pod_ip_a(1), "hairpin traffic is masqueraded, as kube-proxy does");
    }
}

fn ct_entries(c: &Cluster) -> Vec<(CtKey, CtValue)> {
    let data = MapData::from_pin(c.a.bpffs.join("proxy_ct_v2")).expect("pinned ct map");
    let map: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(data)).expect("ct map");
    map.iter().filter_map(Result::ok).collect()
}

#[test]
fn snat_ports_never_collide_under_many_concurrent_flows_and_are_released() {
    snat_ports(Path::Tc);
}

#[test]
fn xdp_generic_snat_ports_never_collide_under_many_concurrent_flows_and_are_released() {
    snat_ports(Path::XdpGeneric);
}

fn snat_ports(path: Path) {
    let mut c = cluster("nss", 0, 1);
    write_atomic(&c.manifests, "web.yaml", &web("Cluster", &[(pod_ip_b(1), "node-b")]));
    start(&mut c, path, &[]);
    c.wait_frontends(6);
    // 200 connections open at once from one client to the remote backend.
    let seen: Vec<SocketAddrV4> = c.client.run(|| {
        let mut conns = Vec::new();
        for _ in 0..200 {
            let s = TcpStream::connect_timeout(&SocketAddr::from((NODE_A_IP, NODE_PORT)), T).expect("connect");
            s.set_read_timeout(Some(T)).expect("timeout");
            conns.push(s);
        }
        let mut seen = Vec::new();
        for s in &mut conns {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).expect("answer");
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            seen.push(Seen::parse(&body).unwrap_or_else(|| panic!("bad answer {text:?}")).peer);
        }
        seen
    });
    let unique: BTreeSet<SocketAddrV4> = seen.iter().copied().collect();
    assert_eq!(unique.len(), 200, "two flows shared a SNAT address:port");
    assert!(seen.iter().all(|p| *p.ip() == NODE_A_LINK_IP && (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&p.port())));
    // The flows ended (closed above): every SNAT entry is closing, so its
    // port is free again once idle for CT_CLOSING_TIMEOUT.
    std::thread::sleep(Duration::from_millis(500));
    let snat: Vec<(CtKey, CtValue)> = ct_entries(&c)
        .into_iter()
        .filter(|(k, v)| k.dir == CT_DIR_REPLY && v.flags & CT_F_SNAT != 0)
        .collect();
    assert_eq!(snat.len(), 200, "one SNAT reply entry per flow");
    let open: Vec<_> = snat.iter().filter(|(_, v)| v.flags & CT_F_CLOSING == 0).collect();
    assert!(open.is_empty(), "{} SNAT entries still open after their flows ended", open.len());
    check_xdp_carried(&c, path);
}


/// The backend XDP chooses is the one used, local ones included: with one
/// local and three remote backends, the local one gets about a quarter of
/// new flows (choosing again in TC would give it (1/4)² = 6%). Also: plain
/// `--xdp` (mode auto) on veths picks generic mode by itself and works.
#[test]
fn xdp_keeps_its_choice_of_a_local_backend_and_auto_mode_works_on_veth() {
    let mut c = cluster("xdpbal", 1, 3);
    let eps = [(pod_ip_a(1), "node-a"), (pod_ip_b(1), "node-b"), (pod_ip_b(2), "node-b"), (pod_ip_b(3), "node-b")];
    write_atomic(&c.manifests, "web.yaml", &web("Cluster", &eps));
    c.start_agent_a(&agent_bin(), &["--xdp"]);
    c.wait_frontends(5);
    assert!(c.a.agent_log().contains("XDP in generic mode"), "auto mode on a veth: {}", c.a.agent_log());
    const N: usize = 400;
    let answers: Vec<String> = c.client.run(|| {
        (0..N)
            .map(|_| http_get(SocketAddr::from((NODE_A_IP, NODE_PORT)), T).map_or_else(|e| format!("error: {e}"), |b| Seen::parse(&b).map(|s| s.pod).unwrap_or(b)))
            .collect()
    });
    assert!(answers.iter().all(|a| a.starts_with("pod-")), "every request answered: {answers:?}");
    let local = answers.iter().filter(|a| *a == "pod-a1").count();
    let share = local as f64 / N as f64;
    println!("local backend share: {local}/{N} = {:.1}% (L/N = 25%)", share * 100.0);
    // 25% ± 8 points: over 4 standard deviations of a 400-draw binomial.
    assert!((0.17..=0.33).contains(&share), "local share {share:.3}, expected about 0.25 (counters: {:?})", c.a.counters(&agent_bin()));
    assert!(c.a.stat("xdp_local_flow") > 0 && c.a.stat("xdp_forward") > 0, "XDP chose both kinds of backend");
}

/// A 4,000-byte UDP datagram to a NodePort whose backend is on node B: its
/// fragments are DNATed and SNATed alike and sent by the FIB redirect, and
/// so are the reply's on the way back.
#[test]
fn a_fragmented_udp_datagram_to_a_node_port_reaches_a_remote_backend_and_back() {
    let mut c = cluster("npfrag", 0, 1);
    write_atomic(&c.manifests, "web.yaml", &web("Cluster", &[(pod_ip_b(1), "node-b")]));
    start(&mut c, Path::Tc, &[]);
    c.wait_frontends(4);
    let payload = "g".repeat(4000);
    let sent = payload.clone();
    let got = c.client.run(move || udp_request(SocketAddr::from((NODE_A_IP, UDP_NODE_PORT)), &sent, T));
    let got = got.unwrap_or_else(|e| panic!("no answer to a fragmented datagram: {e}\n{}", c.a.agent_log()));
    let s = Seen::parse(&got).unwrap_or_else(|| panic!("bad answer {:?}", &got[..got.len().min(80)]));
    assert_eq!((s.pod.as_str(), s.peer_ip()), ("pod-b1", NODE_A_LINK_IP), "SNAT to node A as for any NodePort flow");
    assert!(s.payload == payload, "the whole datagram, both ways: {} of {} bytes", s.payload.len(), payload.len());
    assert!(c.a.stat("fragment_translated") >= 4, "{:?}", c.a.counters(&agent_bin()));
}

/// `sessionAffinity: ClientIP` holds on the XDP path too: every new
/// connection of one client to the NodePort goes to one of three remote
/// backends, chosen in XDP (the affinity entry is shared with TC and the
/// socket path).
#[test]
fn session_affinity_holds_on_the_xdp_path() {
    let mut c = cluster("xdpaff", 0, 3);
    let eps = [(pod_ip_b(1), "node-b"), (pod_ip_b(2), "node-b"), (pod_ip_b(3), "node-b")];
    let yaml = web("Cluster", &eps).replace("  externalTrafficPolicy: Cluster\n", "  externalTrafficPolicy: Cluster\n  sessionAffinity: ClientIP\n");
    write_atomic(&c.manifests, "web.yaml", &yaml);
    start(&mut c, Path::XdpGeneric, &[]);
    c.wait_frontends(5);
    let pods: Vec<String> = c.client.run(|| {
        (0..20)
            .map(|_| http_get(SocketAddr::from((NODE_A_IP, NODE_PORT)), T).map_or_else(|e| format!("error: {e}"), |b| Seen::parse(&b).map(|s| s.pod).unwrap_or(b)))
            .collect()
    });
    let distinct: std::collections::BTreeSet<&String> = pods.iter().collect();
    assert_eq!(distinct.len(), 1, "one backend for one client: {pods:?}");
    assert!(pods[0].starts_with("pod-b"), "{pods:?}");
    assert!(c.a.stat("xdp_forward") > 0, "the flows went through XDP");
    assert!(c.a.stat("affinity_hit") >= 19, "{:?}", c.a.counters(&agent_bin()));
}

/// `loadBalancerSourceRanges` as kube-proxy enforces it, on the LB IP only:
/// a client inside a range connects, one outside is dropped (counted)
/// while the NodePort stays open to it; node-local sockets (node addresses,
/// always allowed) reach the LB IP; a range that does not parse serves the
/// LB IP closed, never open, and is reported by name.
#[test]
fn load_balancer_source_ranges_are_enforced_on_the_lb_ip() {
    let mut c = cluster("lbsr", 0, 1);
    let with_ranges = |ranges: &str| {
        web("Cluster", &[(pod_ip_b(1), "node-b")])
            .replace("  externalTrafficPolicy: Cluster\n", &format!("  externalTrafficPolicy: Cluster\n  loadBalancerSourceRanges: [{ranges}]\n"))
    };
    write_atomic(&c.manifests, "web.yaml", &with_ranges("\"198.51.100.0/24\""));
    start(&mut c, Path::Tc, &[]);
    c.wait_frontends(5);
    let lb = programmed(&c.a.bpffs).into_iter().find(|f| f.address == LB_IP.to_string() && f.port == 80).expect("LB frontend");
    assert!(lb.source_ranges.as_ref().is_some_and(|r| r.contains(&"198.51.100.0/24".to_owned())), "{lb:?}");
    get(&c, LB_IP, 80).expect("a client inside the range reaches the LB IP");

    // Narrowed to a range without the client: new connections dropped.
    write_atomic(&c.manifests, "web.yaml", &with_ranges("\"192.0.2.0/24\""));
    wait_programmed(&c.a.bpffs, Duration::from_secs(15), "the new range", |v| {
        v.iter().any(|f| f.address == LB_IP.to_string() && f.source_ranges.as_ref().is_some_and(|r| r.contains(&"192.0.2.0/24".to_owned())))
    });
    let before = c.a.stat("drop_source_range");
    assert!(get(&c, LB_IP, 80).is_err(), "a client outside the ranges must not reach the LB IP");
    assert!(c.a.stat("drop_source_range") > before, "the drop is counted");
    get(&c, NODE_A_IP, NODE_PORT).expect("the NodePort is not restricted by the LB's ranges");
    // The node itself (its addresses are always allowed), on the socket path.
    let out = c.a.cgroup.command(&c.a.ns, std::path::Path::new(env!("CARGO_BIN_EXE_sockclient")), &["http", &format!("{LB_IP}:80"), "3"]).output().expect("sockclient");
    let lines = String::from_utf8_lossy(&out.stdout);
    assert!(lines.lines().count() == 3 && !lines.contains("ERR"), "node-local clients reach the LB IP: {lines}");

    // A range that does not parse: closed, reported.
    write_atomic(&c.manifests, "web.yaml", &with_ranges("\"banana\""));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !c.a.agent_log().contains("loadBalancerSourceRanges \\\"banana\\\"") && !c.a.agent_log().contains("loadBalancerSourceRanges \"banana\"") {
        assert!(Instant::now() < deadline, "the bad range is not reported:\n{}", c.a.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_programmed(&c.a.bpffs, Duration::from_secs(15), "closed", |v| {
        v.iter().any(|f| f.address == LB_IP.to_string() && f.source_ranges.as_ref().is_some_and(|r| r.iter().all(|x| x.ends_with("/32"))))
    });
    assert!(get(&c, LB_IP, 80).is_err(), "an invalid range serves the LB IP closed, not open");
}
