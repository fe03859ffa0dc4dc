//! North-south traffic over IPv6 on two nodes (the topology of
//! `northsouth.rs`, dual-stack: [`Cluster::enable_ipv6`]): `NodePort`s on
//! node A's IPv6 addresses, IPv6 externalIPs and `LoadBalancer` IPs, SNAT
//! to a remote backend over the node link, externalTrafficPolicy Local with
//! the client's IPv6 address kept, healthCheckNodePort answering on node
//! A's IPv6 address, `--nodeport-addresses` with an IPv6 CIDR, hairpin,
//! session affinity, internalTrafficPolicy / terminating endpoints on an
//! IPv6 `ClusterIP`, and `loadBalancerSourceRanges` on an IPv6 LB IP. The agent runs on node A (TC path); pods answer with
//! the source address they see.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{agent_bin, programmed, wait_programmed},
    client::{http_get, http_get_from, udp_request, udp_request_from},
    cluster::{CLIENT_IP6, CLIENT_IP6_B, Cluster, EXTERNAL_IP6, LB_IP6, NODE_A_IP6, NODE_A_IP6_2, NODE_A_LINK_IP6, SeenAny, pod_ip6_a, pod_ip6_b},
    manifests::{web6_yaml, write_atomic},
};
use proxy_common::ct::{SNAT_PORT_MAX, SNAT_PORT_MIN};

const T: Duration = Duration::from_secs(2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const HC_PORT: u16 = 32000;

/// An IPv6-only Service `web` of type `LoadBalancer` (HTTP 80→8080 on node
/// port 30080, UDP 53→5353 on 30053), externalTrafficPolicy `etp`, an IPv6
/// externalIP and load-balancer IP, `spec_extra` appended to the spec, and
/// an `addressType: IPv6` slice of `endpoints` (address, node, extra
/// endpoint fields).
fn web6(etp: &str, spec_extra: &str, endpoints: &[(Ipv6Addr, &str, &str)]) -> String {
    let extra = format!("  externalIPs: ['{EXTERNAL_IP6}']\n  externalTrafficPolicy: {etp}\n  healthCheckNodePort: {HC_PORT}\n{spec_extra}");
    web6_yaml("LoadBalancer", VIP6, &extra, Some(LB_IP6), endpoints)
}

fn cluster(prefix: &str, a: usize, b: usize) -> Cluster {
    let mut c = Cluster::new(prefix, a, b);
    c.enable_ipv6();
    c.serve_peer_dual(8080, 5353);
    c
}

fn get(c: &Cluster, addr: Ipv6Addr, port: u16) -> std::io::Result<SeenAny> {
    c.client.run(move || {
        let body = http_get(SocketAddr::from((addr, port)), T)?;
        SeenAny::parse(&body).ok_or_else(|| std::io::Error::other(format!("bad answer {body:?}")))
    })
}

fn udp(c: &Cluster, addr: Ipv6Addr, port: u16, msg: &'static str) -> std::io::Result<SeenAny> {
    c.client.run(move || {
        let body = udp_request(SocketAddr::from((addr, port)), msg, T)?;
        SeenAny::parse(&body).ok_or_else(|| std::io::Error::other(format!("bad answer {body:?}")))
    })
}

fn health(c: &Cluster, addr: Ipv6Addr, port: u16) -> std::io::Result<(u16, String)> {
    c.client_http_status(SocketAddr::from((addr, port)), T)
}

/// The health check's answer, waiting (bounded) until it has `status`.
fn health_until(c: &Cluster, addr: Ipv6Addr, status: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = health(c, addr, HC_PORT);
        if let Ok((s, body)) = &r
            && *s == status
        {
            return serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body {body:?}: {e}"));
        }
        assert!(Instant::now() < deadline, "[{addr}]:{HC_PORT} never answered {status}: {r:?}\n{}", c.a.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `NodePort` on node A's IPv6 address reaches a local and a remote
/// backend over TCP and UDP; the remote one sees node A's IPv6 address on
/// the node link with a SNAT port (so its reply comes back through node
/// A), the local one the client; the IPv6 externalIP and `LoadBalancer` IP
/// answer on the Service port; `services` shows every kind in IPv6.
#[test]
fn an_ipv6_nodeport_reaches_local_and_remote_backends_and_remote_ones_see_the_node() {
    let mut c = cluster("ns6c", 1, 1);
    write_atomic(&c.manifests, "web.yaml", &web6("Cluster", "", &[(pod_ip6_a(1), "node-a", ""), (pod_ip6_b(1), "node-b", "")]));
    c.start_agent_a(&agent_bin(), &[]);
    c.wait_frontends(6);

    for proto in ["TCP", "UDP"] {
        let mut seen = BTreeSet::new();
        for _ in 0..40 {
            let s = if proto == "TCP" { get(&c, NODE_A_IP6, NODE_PORT) } else { udp(&c, NODE_A_IP6, UDP_NODE_PORT, "q") };
            let s = s.unwrap_or_else(|e| panic!("IPv6 NodePort {proto} failed: {e}\n{}", c.a.agent_log()));
            let want = if s.pod == "pod-a1" { IpAddr::V6(CLIENT_IP6) } else { IpAddr::V6(NODE_A_LINK_IP6) };
            assert_eq!(s.peer_ip(), want, "{proto} {s:?}");
            if s.pod == "pod-b1" {
                assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&s.peer.port()), "SNAT port {s:?}");
            }
            if proto == "UDP" {
                assert_eq!(s.payload, "q");
            }
            seen.insert(s.pod);
        }
        assert_eq!(seen.len(), 2, "both backends used over {proto}: {seen:?}");
    }
    for addr in [EXTERNAL_IP6, LB_IP6] {
        let s = get(&c, addr, 80).unwrap_or_else(|e| panic!("[{addr}]:80 failed: {e}\n{}", c.a.agent_log()));
        assert!(s.pod == "pod-a1" || s.pod == "pod-b1", "{s:?}");
    }
    let v = programmed(&c.a.bpffs);
    let kinds: BTreeSet<&str> = v.iter().filter(|f| f.family == "IPv6").map(|f| f.kind.as_str()).collect();
    assert_eq!(kinds, ["ClusterIP", "ExternalIP", "LoadBalancer", "NodePort"].into_iter().collect(), "{v:#?}");
    assert!(v.iter().all(|f| f.family == "IPv6"), "an IPv6-only Service programs no IPv4 frontend: {v:#?}");
    let counters = c.a.counters(&agent_bin());
    assert_eq!(counters.get("pass_ipv6_ext").copied().unwrap_or_default(), 0, "{counters:?}");
}

/// externalTrafficPolicy Local over IPv6: with only a remote endpoint node
/// A drops and its health check (on its IPv6 address) says 503 with 0 local
/// endpoints; once a local endpoint appears it alone answers, sees the
/// client's own IPv6 address, and the health check says 200 with 1.
#[test]
fn external_traffic_policy_local_over_ipv6_keeps_the_client_address_and_health_checks_answer_on_ipv6() {
    let mut c = cluster("ns6l", 1, 1);
    write_atomic(&c.manifests, "web.yaml", &web6("Local", "", &[(pod_ip6_b(1), "node-b", "")]));
    c.start_agent_a(&agent_bin(), &[]);
    c.wait_frontends(2);
    let v = health_until(&c, NODE_A_IP6, 503);
    assert_eq!((v["localEndpoints"].as_u64(), v["service"]["name"].as_str()), (Some(0), Some("web")), "{v}");
    let r = c.client.run(|| http_get(SocketAddr::from((NODE_A_IP6, NODE_PORT)), Duration::from_millis(500)));
    assert!(r.is_err(), "a node without local endpoints must not forward: {r:?}");
    assert!(c.a.stat("drop_no_local_backend") > 0, "{:?}", c.a.counters(&agent_bin()));

    write_atomic(&c.manifests, "web.yaml", &web6("Local", "", &[(pod_ip6_a(1), "node-a", ""), (pod_ip6_b(1), "node-b", "")]));
    c.wait_frontends(10);
    for (addr, port) in [(NODE_A_IP6, NODE_PORT), (EXTERNAL_IP6, 80), (LB_IP6, 80)] {
        for _ in 0..10 {
            let s = get(&c, addr, port).unwrap_or_else(|e| panic!("[{addr}]:{port}: {e}\n{}", c.a.agent_log()));
            assert_eq!(s.pod, "pod-a1", "Local uses only this node's endpoint");
            assert_eq!(s.peer_ip(), IpAddr::V6(CLIENT_IP6), "the client's address is kept under Local");
        }
    }
    let s = udp(&c, NODE_A_IP6, UDP_NODE_PORT, "x").expect("UDP NodePort under Local");
    assert_eq!((s.pod.as_str(), s.peer_ip()), ("pod-a1", IpAddr::V6(CLIENT_IP6)));
    let v = health_until(&c, NODE_A_IP6, 200);
    assert_eq!(v["localEndpoints"].as_u64(), Some(1), "{v}");
}

/// `--nodeport-addresses` with an IPv6 /128 (beside an IPv4 one): node
/// ports answer on that IPv6 address only, and the health check listens
/// there too.
#[test]
fn an_ipv6_nodeport_address_narrows_where_node_ports_and_health_checks_answer() {
    let mut c = cluster("ns6n", 1, 1);
    write_atomic(&c.manifests, "web.yaml", &web6("Local", "", &[(pod_ip6_a(1), "node-a", "")]));
    let narrow = format!("198.51.100.1/32,{NODE_A_IP6_2}/128");
    c.start_agent_a(&agent_bin(), &["--nodeport-addresses", &narrow]);
    c.wait_frontends(5);
    let s = get(&c, NODE_A_IP6_2, NODE_PORT).unwrap_or_else(|e| panic!("NodePort on the listed address: {e}\n{}", c.a.agent_log()));
    assert_eq!((s.pod.as_str(), s.peer_ip()), ("pod-a1", IpAddr::V6(CLIENT_IP6)));
    let r = get(&c, NODE_A_IP6, NODE_PORT);
    assert!(r.is_err(), "NodePort answered on an IPv6 address outside --nodeport-addresses: {r:?}");
    let v = health_until(&c, NODE_A_IP6_2, 200);
    assert_eq!(v["localEndpoints"].as_u64(), Some(1), "{v}");
    let r = health(&c, NODE_A_IP6, HC_PORT);
    assert!(r.is_err(), "health check answered outside --nodeport-addresses: {r:?}");
    let v = programmed(&c.a.bpffs);
    let np: BTreeSet<&str> = v.iter().filter(|f| f.kind == "NodePort").map(|f| f.address.as_str()).collect();
    assert_eq!(np, [NODE_A_IP6_2.to_string().as_str()].into_iter().collect(), "{v:#?}");
}

/// A pod reaching its own Service's IPv6 `ClusterIP` gets itself back
/// (hairpin), masqueraded as kube-proxy does; `sessionAffinity: ClientIP`
/// keeps one IPv6 client on one of three remote backends.
#[test]
fn ipv6_hairpin_and_session_affinity() {
    let mut c = cluster("ns6h", 1, 3);
    write_atomic(&c.manifests, "web.yaml", &web6("Cluster", "", &[(pod_ip6_a(1), "node-a", "")]));
    c.start_agent_a(&agent_bin(), &[]);
    c.wait_frontends(5);
    let pod = &c.pods_a()[0];
    for _ in 0..10 {
        let body = pod.ns.run(|| http_get(SocketAddr::from((VIP6, 80)), T)).unwrap_or_else(|e| panic!("hairpin failed: {e}\n{}", c.a.agent_log()));
        let s = SeenAny::parse(&body).expect("answer");
        assert_eq!(s.pod, "pod-a1");
        assert_ne!(s.peer_ip(), IpAddr::V6(pod_ip6_a(1)), "hairpin traffic is masqueraded");
    }

    let eps = [(pod_ip6_b(1), "node-b", ""), (pod_ip6_b(2), "node-b", ""), (pod_ip6_b(3), "node-b", "")];
    write_atomic(&c.manifests, "web.yaml", &web6("Cluster", "  sessionAffinity: ClientIP\n", &eps));
    wait_programmed(&c.a.bpffs, Duration::from_secs(20), "three remote backends with affinity", |v| {
        v.iter().filter(|f| f.backends.len() == 3).count() >= 5
    });
    let pods: Vec<String> = c.client.run(|| {
        (0..20)
            .map(|_| http_get(SocketAddr::from((NODE_A_IP6, NODE_PORT)), T).map_or_else(|e| format!("error: {e}"), |b| SeenAny::parse(&b).map(|s| s.pod).unwrap_or(b)))
            .collect()
    });
    let distinct: BTreeSet<&String> = pods.iter().collect();
    assert_eq!(distinct.len(), 1, "one backend for one client under ClientIP affinity: {pods:?}");
    assert!(pods[0].starts_with("pod-b"), "{pods:?}");
}

/// internalTrafficPolicy Local on an IPv6 `ClusterIP` uses only node A's
/// endpoint (a pod on node A reaches it; with only a remote endpoint the
/// traffic is dropped, not rejected), and when every endpoint is
/// terminating the serving ones are used (KEP-1669).
#[test]
fn ipv6_internal_traffic_policy_local_and_terminating_fallback() {
    let mut c = cluster("ns6i", 2, 1);
    let itp = "  internalTrafficPolicy: Local\n";
    write_atomic(&c.manifests, "web.yaml", &web6("Cluster", itp, &[(pod_ip6_a(1), "node-a", ""), (pod_ip6_b(1), "node-b", "")]));
    c.start_agent_a(&agent_bin(), &[]);
    c.wait_frontends(2);
    let client_pod = &c.pods_a()[1];
    for _ in 0..10 {
        let body = client_pod.ns.run(|| http_get(SocketAddr::from((VIP6, 80)), T)).unwrap_or_else(|e| panic!("iTP Local: {e}\n{}", c.a.agent_log()));
        assert_eq!(SeenAny::parse(&body).expect("answer").pod, "pod-a1", "iTP Local uses this node's endpoint only");
    }
    write_atomic(&c.manifests, "web.yaml", &web6("Cluster", itp, &[(pod_ip6_b(1), "node-b", "")]));
    wait_programmed(&c.a.bpffs, Duration::from_secs(20), "the ClusterIP without a local backend", |v| {
        v.iter().any(|f| f.kind == "ClusterIP" && f.backends.is_empty()) && v.iter().filter(|f| f.kind == "NodePort" && !f.backends.is_empty()).count() >= 2
    });
    let started = Instant::now();
    let r = c.pods_a()[1].ns.run(|| http_get(SocketAddr::from((VIP6, 80)), Duration::from_millis(800)));
    let err = r.expect_err("no local endpoint under iTP Local");
    assert_ne!(err.kind(), std::io::ErrorKind::ConnectionRefused, "dropped, not rejected: {err}");
    assert!(started.elapsed() >= Duration::from_millis(700), "{err} after {:?}", started.elapsed());

    let terminating = ", conditions: {ready: false, serving: true, terminating: true}";
    write_atomic(&c.manifests, "web.yaml", &web6("Cluster", "", &[(pod_ip6_a(1), "node-a", terminating), (pod_ip6_b(1), "node-b", terminating)]));
    wait_programmed(&c.a.bpffs, Duration::from_secs(20), "both terminating endpoints", |v| {
        v.iter().filter(|f| f.kind == "NodePort" && f.backends.len() == 2).count() >= 2
    });
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let s = get(&c, NODE_A_IP6, NODE_PORT).unwrap_or_else(|e| panic!("terminating fallback: {e}\n{}", c.a.agent_log()));
        seen.insert(s.pod);
    }
    assert_eq!(seen.len(), 2, "both serving-terminating endpoints used: {seen:?}");
}

/// A 4,000-byte UDP datagram to an IPv6 `NodePort` whose backend is on
/// node B: the client sends it in three fragments (IPv6 routers never
/// fragment), only the first with the ports; every fragment is DNATed and
/// SNATed alike (the later ones through `proxy_frag6_v1`) and sent by the
/// FIB redirect, and so are the fragments of the reply on the way back.
/// The IPv6 twin of the IPv4 test in `northsouth.rs`.
#[test]
fn a_fragmented_udp_datagram_to_an_ipv6_node_port_reaches_a_remote_backend_and_back() {
    let mut c = cluster("ns6frag", 0, 1);
    write_atomic(&c.manifests, "web.yaml", &web6("Cluster", "", &[(pod_ip6_b(1), "node-b", "")]));
    c.start_agent_a(&agent_bin(), &[]);
    c.wait_frontends(6);
    let payload = "g".repeat(4000);
    let sent = payload.clone();
    let got = c.client.run(move || udp_request(SocketAddr::from((NODE_A_IP6, UDP_NODE_PORT)), &sent, T));
    let got = got.unwrap_or_else(|e| panic!("no answer to a fragmented IPv6 datagram: {e}\n{}", c.a.agent_log()));
    let s = SeenAny::parse(&got).unwrap_or_else(|| panic!("bad answer {:?}", &got[..got.len().min(80)]));
    assert_eq!((s.pod.as_str(), s.peer_ip()), ("pod-b1", IpAddr::V6(NODE_A_LINK_IP6)), "SNAT to node A as for any NodePort flow");
    assert!(s.payload == payload, "the whole datagram, both ways: {} of {} bytes", s.payload.len(), payload.len());
    assert!(c.a.stat("fragment_translated") >= 4, "{:?}", c.a.counters(&agent_bin()));
}

/// From the client's other address (`CLIENT_IP6_B`, its leg to node B),
/// still through node A: client "B" beside client "A" (`CLIENT_IP6`).
fn get_from_b(c: &Cluster, addr: Ipv6Addr, port: u16, timeout: Duration) -> std::io::Result<SeenAny> {
    c.client.run(move || {
        let body = http_get_from(IpAddr::V6(CLIENT_IP6_B), SocketAddr::from((addr, port)), timeout)?;
        SeenAny::parse(&body).ok_or_else(|| std::io::Error::other(format!("bad answer {body:?}")))
    })
}

/// `loadBalancerSourceRanges` on an IPv6 LB IP, as on an IPv4 one
/// (`northsouth.rs`): with a range admitting client A's IPv6 address and
/// not client B's (B's IPv4 leg is listed: a range of the other family
/// admits nobody here), A connects over TCP and UDP and B's connections
/// are dropped (counted) while the `NodePort` stays open to B; `services`
/// shows the IPv6 ranges with node A's own IPv6 addresses (always allowed)
/// and no IPv4 one. Narrowed to B's range, B connects and A is dropped.
#[test]
fn load_balancer_source_ranges_are_enforced_on_an_ipv6_lb_ip() {
    let mut c = cluster("ns6sr", 1, 0);
    let with_ranges = |ranges: &str| web6("Cluster", &format!("  loadBalancerSourceRanges: [{ranges}]\n"), &[(pod_ip6_a(1), "node-a", "")]);
    write_atomic(&c.manifests, "web.yaml", &with_ranges("'2001:db8:100::/64', '198.51.101.0/24'"));
    c.start_agent_a(&agent_bin(), &[]);
    let range_a = "2001:db8:100::/64".to_owned();
    let v = wait_programmed(&c.a.bpffs, Duration::from_secs(20), "the IPv6 LB IP with its ranges", |v| {
        v.iter().any(|f| f.address == LB_IP6.to_string() && f.source_ranges.as_ref().is_some_and(|r| r.contains(&range_a)))
    });
    let lb = v.iter().find(|f| f.address == LB_IP6.to_string() && f.port == 80).expect("LB frontend");
    let ranges = lb.source_ranges.clone().unwrap_or_default();
    assert!(ranges.contains(&format!("{NODE_A_IP6}/128")), "node A's own addresses are listed: {ranges:?}");
    assert!(ranges.iter().all(|r| r.contains(':')), "only IPv6 ranges on an IPv6 frontend: {ranges:?}");
    let np = v.iter().find(|f| f.address == NODE_A_IP6.to_string() && f.port == NODE_PORT).expect("NodePort frontend");
    assert_eq!(np.source_ranges, None, "the NodePort is not restricted: {np:?}");

    let s = get(&c, LB_IP6, 80).unwrap_or_else(|e| panic!("client A is inside the range: {e}\n{}", c.a.agent_log()));
    assert_eq!((s.pod.as_str(), s.peer_ip()), ("pod-a1", IpAddr::V6(CLIENT_IP6)));
    let s = udp(&c, LB_IP6, 53, "a").unwrap_or_else(|e| panic!("client A over UDP: {e}"));
    assert_eq!((s.pod.as_str(), s.payload.as_str()), ("pod-a1", "a"));

    let before = c.a.stat("drop_source_range");
    let r = get_from_b(&c, LB_IP6, 80, Duration::from_millis(800));
    assert!(r.is_err(), "client B is outside the ranges: {r:?}");
    let r = c.client.run(|| udp_request_from(IpAddr::V6(CLIENT_IP6_B), SocketAddr::from((LB_IP6, 53)), "b", Duration::from_millis(500)));
    assert!(r.is_err(), "client B over UDP: {r:?}");
    let dropped = c.a.stat("drop_source_range") - before;
    assert!(dropped >= 2, "B's SYN and datagram are dropped and counted: {dropped}");
    // B's address works through node A (the drop is the range's, not the wiring's).
    let s = get_from_b(&c, NODE_A_IP6, NODE_PORT, T).unwrap_or_else(|e| panic!("the NodePort is open to B: {e}\n{}", c.a.agent_log()));
    assert_eq!((s.pod.as_str(), s.peer_ip()), ("pod-a1", IpAddr::V6(CLIENT_IP6_B)));

    // Narrowed to B: the old range is gone from the trie.
    write_atomic(&c.manifests, "web.yaml", &with_ranges("'2001:db8:101::/64'"));
    let range_b = "2001:db8:101::/64".to_owned();
    wait_programmed(&c.a.bpffs, Duration::from_secs(20), "B's range alone", |v| {
        v.iter().any(|f| f.address == LB_IP6.to_string() && f.source_ranges.as_ref().is_some_and(|r| r.contains(&range_b) && !r.contains(&range_a)))
    });
    let s = get_from_b(&c, LB_IP6, 80, T).unwrap_or_else(|e| panic!("client B is inside the new range: {e}\n{}", c.a.agent_log()));
    assert_eq!(s.pod, "pod-a1");
    let before = c.a.stat("drop_source_range");
    let r = c.client.run(|| http_get(SocketAddr::from((LB_IP6, 80)), Duration::from_millis(800)));
    assert!(r.is_err(), "client A is outside the new range: {r:?}");
    assert!(c.a.stat("drop_source_range") > before, "counted");
}
