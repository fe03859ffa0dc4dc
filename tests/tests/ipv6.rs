//! IPv6 and dual-stack Services end to end on the real kernel: a sandbox
//! with IPv6 on the client/node link and on every pod (no default routes),
//! the agent as a real process, real clients and servers of both
//! families: the per-packet (TC) path, the socket path (node-local clients
//! in the agent's `--cgroup`, IPv6 sockets and IPv4-mapped destinations),
//! and the XDP fast path (`NodePort` over IPv6 with SNAT).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use integration_tests::{
    agent::{agent_bin, counters_of_family, wait_programmed},
    client::{http_get, udp_request},
    manifests::write_atomic,
    agent::AgentSource,
    sandbox::{CLIENT_IP6, DEVICES, NODE_IP6, NODE_LINK_IP6, REMOTE_DEVICE, REMOTE_POD_IP6, Sandbox, pod_ip, pod_ip6},
};
use proxy_common::{
    ct::{CT_F_SNAT, CT6_MAP, CT6_NEW_MAP, Ct6Key, Ct6Value},
    sock::{SOCK_REV_MAP, SOCK_REV6_MAP, SockRev6Key, SockRev6Value, SockRevKey, SockRevValue},
};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
const T: Duration = Duration::from_secs(2);
const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;

/// A dual-stack Service `name` (IPv4 and IPv6 cluster IPs; HTTP 80→8080,
/// DNS 53→5353/UDP) with one slice per family holding `pods`.
fn dual_stack_yaml(name: &str, vip4: Ipv4Addr, vip6: Ipv6Addr, pods: &[usize]) -> String {
    service_yaml(name, "ClusterIP", vip4, vip6, pods)
}

/// [`dual_stack_yaml`] of type `ty`; a `NodePort` gets nodePorts
/// `NODE_PORT` (HTTP) and `UDP_NODE_PORT` (DNS), externalTrafficPolicy
/// Cluster. The endpoints name no node: to the agent they are on another
/// node (remote backends, source-NATed from external frontends).
fn service_yaml(name: &str, ty: &str, vip4: Ipv4Addr, vip6: Ipv6Addr, pods: &[usize]) -> String {
    let np = |p: u16| if ty == "NodePort" { format!(", nodePort: {p}") } else { String::new() };
    let mut y = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: {ty}
  clusterIP: {vip4}
  clusterIPs: [{vip4}, '{vip6}']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP{}}}
  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP{}}}
",
        np(NODE_PORT),
        np(UDP_NODE_PORT),
    );
    for (family, addrs) in [
        ("IPv4", pods.iter().map(|i| pod_ip(*i).to_string()).collect::<Vec<_>>()),
        ("IPv6", pods.iter().map(|i| pod_ip6(*i).to_string()).collect()),
    ] {
        let eps: Vec<String> = addrs.iter().map(|a| format!("  - addresses: ['{a}']")).collect();
        let _ = write!(
            y,
            "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-{}
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: {family}
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:{}
{}
",
            family.to_lowercase(),
            if eps.is_empty() { " []" } else { "" },
            eps.join("\n")
        );
    }
    y
}

/// A dual-stack Service reached over IPv6 and IPv4 from a client namespace:
/// every backend of each family answers, TCP and UDP; replies come back
/// from the cluster IP; a Service without endpoints refuses IPv6 clients
/// (`ICMPv6` port unreachable); `services -o json` shows both families.
#[test]
fn a_dual_stack_cluster_ip_serves_both_families_on_the_tc_path() {
    let mut sb = Sandbox::new("ip6", 3);
    sb.enable_ipv6();
    sb.serve_http_dual(8080);
    sb.serve_udp_dual(5353);
    write_atomic(&sb.manifests, "web.yaml", &dual_stack_yaml("web", VIP4, VIP6, &[1, 2, 3]));
    write_atomic(&sb.manifests, "empty.yaml", &dual_stack_yaml("empty", Ipv4Addr::new(10, 96, 0, 11), EMPTY6, &[]));
    sb.start_agent(&agent_bin());
    let v = wait_programmed(&sb.bpffs, Duration::from_secs(15), "both families of web", |v| {
        v.iter().filter(|f| f.service.starts_with("default/web") && f.backends.len() == 3).count() == 4
    });
    assert!(v.iter().any(|f| f.family == "IPv6" && f.address == VIP6.to_string()), "{v:#?}");

    // The counters of both families after each family's requests.
    let marks = |sb: &Sandbox| (counters_of_family(&agent_bin(), &sb.bpffs, "ipv4"), counters_of_family(&agent_bin(), &sb.bpffs, "ipv6"));
    let mut at = vec![marks(&sb)];
    for vip in [IpAddr::V6(VIP6), IpAddr::V4(VIP4)] {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < 3 {
            let r = sb.client.run(move || http_get(SocketAddr::new(vip, 80), T));
            match r {
                Ok(pod) => *seen.entry(pod).or_default() += 1,
                Err(e) => panic!("HTTP to {vip}: {e}\n{}", sb.agent_log()),
            }
            assert!(Instant::now() < deadline, "not every backend answered on {vip}: {seen:?}");
        }
        let udp = sb.client.run(move || udp_request(SocketAddr::new(vip, 53), "hi", T));
        assert!(udp.as_deref().is_ok_and(|r| r.starts_with("pod") && r.ends_with(":hi")), "UDP to {vip}: {udp:?}");
        at.push(marks(&sb));
    }
    // The IPv6 requests moved the IPv6 counters and not the IPv4 ones; the
    // IPv4 requests the other way round (`stats -o json`'s `families`).
    let moved = |from: &BTreeMap<String, u64>, to: &BTreeMap<String, u64>, k: &str| to.get(k).copied().unwrap_or(0) - from.get(k).copied().unwrap_or(0);
    let translated = ["dnat_new_flow", "dnat_established", "rev_nat_reply"];
    for (phase, (mine, other), (mine_name, other_name)) in [(1, (1, 0), ("IPv6", "IPv4")), (2, (0, 1), ("IPv4", "IPv6"))] {
        let by = |m: &(BTreeMap<String, u64>, BTreeMap<String, u64>), family: usize| if family == 0 { m.0.clone() } else { m.1.clone() };
        let (a, b) = (&at[phase - 1], &at[phase]);
        // At least 3 TCP connections and 1 UDP exchange, each a new flow.
        assert!(moved(&by(a, mine), &by(b, mine), "dnat_new_flow") >= 4, "{mine_name} requests: {mine_name} dnat_new_flow did not move: {:?} → {:?}", by(a, mine), by(b, mine));
        assert!(moved(&by(a, mine), &by(b, mine), "rev_nat_reply") >= 4, "{mine_name} requests: {mine_name} rev_nat_reply did not move");
        for k in translated {
            assert_eq!(moved(&by(a, other), &by(b, other), k), 0, "{mine_name} requests moved the {other_name} counter {k}: {:?} → {:?}", by(a, other), by(b, other));
        }
    }

    // `conntrack -o json` shows the flows of both families, with the family.
    let ct = integration_tests::netns::run(&agent_bin().to_string_lossy(), &["--bpffs", &sb.bpffs.to_string_lossy(), "conntrack", "-o", "json"]);
    let flows: serde_json::Value = serde_json::from_str(&ct).unwrap_or_else(|e| panic!("conntrack json: {e}: {ct}"));
    for (family, frontend) in [("IPv6", format!("[{VIP6}]:53")), ("IPv4", format!("{VIP4}:53"))] {
        assert!(
            flows.as_array().into_iter().flatten().any(|f| f["family"] == family && f["frontend"] == frontend.as_str()),
            "no {family} flow to {frontend} in conntrack -o json: {ct}"
        );
    }

    // Refused, not timed out. (Linux aborts an IPv6 connect on the ICMPv6
    // port unreachable that answers the retransmitted SYN, ~1 s in; the
    // same with ip6tables' REJECT and no proxy at all.)
    let started = Instant::now();
    let err = sb.client.run(|| http_get(SocketAddr::new(IpAddr::V6(EMPTY6), 80), Duration::from_secs(5))).expect_err("no endpoints: refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "refused, not by timeout: {:?}", started.elapsed());
    let counters = sb.counters(&agent_bin());
    assert!(counters.get("reject_no_backend").copied().unwrap_or_default() >= 1, "{counters:?}");
    let (c4, c6) = marks(&sb);
    assert!(c6.get("reject_no_backend").copied().unwrap_or_default() >= 1, "an IPv6 reject in the IPv6 counters: {c6:?}");
    assert_eq!(c4.get("reject_no_backend").copied().unwrap_or_default(), 0, "no IPv4 client was refused: {c4:?}");
}

/// A 4,000-byte UDP datagram to an IPv6 cluster IP crosses the 1,500-byte
/// links in three fragments (the client fragments it: IPv6 routers never
/// do); only the first carries the ports. Both directions must be
/// translated alike (the later fragments through the ports the first left
/// in `proxy_frag6_v1`), or the pod (and then the client) cannot reassemble
/// the datagram. The IPv6 twin of the IPv4 test in `clusterip.rs`.
#[test]
fn a_4000_byte_udp_datagram_through_an_ipv6_cluster_ip_is_translated_in_fragments_both_ways() {
    let mut sb = Sandbox::new("frag6", 2);
    sb.enable_ipv6();
    sb.serve_udp_dual(5353);
    write_atomic(&sb.manifests, "dns.yaml", &dual_stack_yaml("dns", VIP4, VIP6, &[1, 2]));
    sb.start_agent(&agent_bin());
    wait_programmed(&sb.bpffs, Duration::from_secs(15), "both families of dns", |v| {
        v.iter().filter(|f| f.service.starts_with("default/dns") && f.backends.len() == 2).count() == 4
    });
    let payload = "f".repeat(4000);
    let sent = payload.clone();
    let got = sb.client.run(move || udp_request(SocketAddr::new(IpAddr::V6(VIP6), 53), &sent, T));
    let got = got.unwrap_or_else(|e| panic!("no answer to a fragmented IPv6 datagram: {e}\n{}", sb.agent_log()));
    let (pod, echoed) = got.split_once(':').expect("<pod>:<payload>");
    assert!(pod.starts_with("pod"), "{pod}");
    assert!(echoed == payload, "the whole datagram came back: {} of {} bytes", echoed.len(), payload.len());
    let c = sb.counters(&agent_bin());
    // Two later fragments each way.
    assert!(c.get("fragment_translated").copied().unwrap_or(0) >= 4, "{c:?}");
}

// ---------------------------------------------------------------------------
// The socket path: IPv6 sockets and IPv4-mapped destinations
// ---------------------------------------------------------------------------

fn sockclient() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sockclient"))
}

/// `name peer` lines → the names, asserting every peer is `want_peer` (the
/// Service address as `getpeername`/`recvfrom` show it).
fn names_with_peer(lines: &[String], want_peer: &str, what: &str) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let (name, peer) = l.split_once(' ').unwrap_or_else(|| panic!("{what}: unexpected line {l:?} in {lines:?}"));
            assert!(!name.starts_with("ERR"), "{what}: request failed: {l}");
            assert!(name.starts_with("pod"), "{what}: answered by {name:?}: {lines:?}");
            assert_eq!(peer, want_peer, "{what}: the socket API must show the Service address, not the backend: {lines:?}");
            name.to_owned()
        })
        .collect()
}

/// Every entry of a pinned map.
fn pinned_entries<K: aya::Pod, V: aya::Pod>(bpffs: &Path, name: &str) -> Vec<(K, V)> {
    let data = MapData::from_pin(bpffs.join(name)).unwrap_or_else(|e| panic!("open pinned {name}: {e}"));
    let map = Map::LruHashMap(data);
    let m = HashMap::<_, K, V>::try_from(&map).unwrap_or_else(|e| panic!("{name}: {e}"));
    m.iter().map(|r| r.unwrap_or_else(|e| panic!("read {name}: {e}"))).collect()
}

/// A node-local process in the agent's cgroup reaches a dual-stack
/// Service through the socket programs with IPv6 sockets: TCP, connected
/// and unconnected UDP to the IPv6 cluster IP, spread over the backends,
/// `getpeername`/`recvfrom` showing the cluster IP; a frontend without
/// endpoints refuses `connect()`; an IPv6 socket to the IPv4 cluster IP as
/// an IPv4-mapped address (`::ffff:10.96.0.10`) is translated through the
/// IPv4 maps and shown that mapped address. No packet needs per-packet NAT,
/// and the reverse maps hold what was translated.
#[test]
fn node_local_ipv6_sockets_are_translated_at_connect_and_see_the_cluster_ip() {
    let mut sb = Sandbox::new("ip6slb", 3);
    sb.enable_ipv6();
    sb.serve_http_dual(8080);
    sb.serve_udp_dual(5353);
    write_atomic(&sb.manifests, "web.yaml", &dual_stack_yaml("web", VIP4, VIP6, &[1, 2, 3]));
    write_atomic(&sb.manifests, "empty.yaml", &dual_stack_yaml("empty", Ipv4Addr::new(10, 96, 0, 11), EMPTY6, &[]));
    sb.start_agent(&agent_bin());
    wait_programmed(&sb.bpffs, Duration::from_secs(15), "both families of web", |v| {
        v.iter().filter(|f| f.service.starts_with("default/web") && f.backends.len() == 3).count() == 4
    });
    let before = sb.counters(&agent_bin());
    let before6 = counters_of_family(&agent_bin(), &sb.bpffs, "ipv6");
    let c = sockclient();
    let http6 = SocketAddr::new(IpAddr::V6(VIP6), 80).to_string();
    let dns6 = SocketAddr::new(IpAddr::V6(VIP6), 53).to_string();

    let lines = sb.cgroup_client(&sb.node, c, &["http", &http6, "20"]);
    let names = names_with_peer(&lines, &http6, "IPv6 ClusterIP over TCP");
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert!(distinct.len() >= 2, "20 connections used only {distinct:?}");
    let lines = sb.cgroup_client(&sb.node, c, &["udp", &dns6, "10"]);
    names_with_peer(&lines, &dns6, "IPv6 connected UDP");
    let lines = sb.cgroup_client(&sb.node, c, &["udp-sendto", &dns6, "10"]);
    let names: BTreeSet<String> = names_with_peer(&lines, &dns6, "IPv6 unconnected UDP").into_iter().collect();
    assert_eq!(names.len(), 1, "one unconnected UDP socket keeps its backend: {lines:?}");
    let empty = SocketAddr::new(IpAddr::V6(EMPTY6), 80).to_string();
    let lines = sb.cgroup_client(&sb.node, c, &["http", &empty, "1"]);
    assert!(lines[0].contains("os error 111"), "no endpoints: connect() must fail with ECONNREFUSED, got {lines:?}");
    let mid = sb.counters(&agent_bin());
    let mid4 = counters_of_family(&agent_bin(), &sb.bpffs, "ipv4");
    let mid6 = counters_of_family(&agent_bin(), &sb.bpffs, "ipv6");

    // An IPv6 socket to the IPv4 Service address, IPv4-mapped.
    let mapped = |port: u16| SocketAddr::new(IpAddr::V6(VIP4.to_ipv6_mapped()), port).to_string();
    let lines = sb.cgroup_client(&sb.node, c, &["http", &mapped(80), "10"]);
    names_with_peer(&lines, &mapped(80), "IPv4-mapped TCP");
    let lines = sb.cgroup_client(&sb.node, c, &["udp", &mapped(53), "5"]);
    names_with_peer(&lines, &mapped(53), "IPv4-mapped connected UDP");
    let lines = sb.cgroup_client(&sb.node, c, &["udp-sendto", &mapped(53), "5"]);
    names_with_peer(&lines, &mapped(53), "IPv4-mapped unconnected UDP (sendmsg4, recvmsg6)");

    let after = sb.counters(&agent_bin());
    let d = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    // By family: the IPv6 sockets to the IPv6 cluster IP count as IPv6
    // (the first phase moved no IPv4 socket counter), the IPv4-mapped ones
    // as IPv4, the family of the frontend they reach (the second phase
    // moved no IPv6 socket counter).
    let (after4, after6) = (counters_of_family(&agent_bin(), &sb.bpffs, "ipv4"), counters_of_family(&agent_bin(), &sb.bpffs, "ipv6"));
    let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let sock = ["sock_translated", "sock_rev_translated", "sock_rejected"];
    for k in sock {
        assert_eq!(get(&mid, k), get(&mid4, k) + get(&mid6, k), "{k}: the families sum to the total");
        assert_eq!(get(&after6, k), get(&mid6, k), "IPv4-mapped sockets moved the IPv6 counter {k}: {mid6:?} → {after6:?}");
    }
    assert!(get(&mid6, "sock_translated") - get(&before6, "sock_translated") >= 20 + 1 + 10, "IPv6 sock_translated: {mid6:?}");
    assert_eq!(get(&mid6, "sock_rejected") - get(&before6, "sock_rejected"), 1, "the refused IPv6 connect() in the IPv6 counters: {mid6:?}");
    assert_eq!(get(&mid4, "sock_translated"), 0, "IPv6 sockets to the IPv6 cluster IP moved the IPv4 counters: {mid4:?}");
    assert!(get(&after4, "sock_translated") - get(&mid4, "sock_translated") >= 10 + 1 + 5, "IPv4-mapped sockets count as IPv4: {after4:?}");
    assert!(get(&after4, "sock_rev_translated") - get(&mid4, "sock_rev_translated") >= 10, "IPv4-mapped peers shown back count as IPv4: {after4:?}");
    // connect() per TCP connection and per connected UDP socket, sendmsg()
    // per unconnected datagram.
    let want = 20 + 1 + 10 + 10 + 1 + 5;
    assert!(d("sock_translated") >= want, "sock_translated moved by {}, expected at least {want}: {after:?}", d("sock_translated"));
    assert!(d("sock_rev_translated") >= 20 + 10 + 10, "getpeername/recvmsg translated back {} times", d("sock_rev_translated"));
    assert_eq!(d("sock_rejected"), 1, "{after:?}");
    assert_eq!(d("dnat_new_flow"), 0, "node-local traffic must not need per-packet NAT: {after:?}");

    // What the socket path remembered: IPv6 in its own map, the mapped
    // IPv4 flows in the IPv4 one.
    let rev6: Vec<(SockRev6Key, SockRev6Value)> = pinned_entries(&sb.bpffs, SOCK_REV6_MAP);
    let fronts6: BTreeSet<u16> = rev6.iter().filter(|(_, v)| v.addr == VIP6.octets()).map(|(_, v)| u16::from_be(v.port_be)).collect();
    assert_eq!(fronts6, [53, 80].into_iter().collect(), "{SOCK_REV6_MAP}: {rev6:?}");
    let backends6: BTreeSet<[u8; 16]> = (1..=3).map(|i| pod_ip6(i).octets()).collect();
    assert!(rev6.iter().all(|(k, _)| backends6.contains(&k.addr)), "{SOCK_REV6_MAP} keys are backends: {rev6:?}");
    let rev4: Vec<(SockRevKey, SockRevValue)> = pinned_entries(&sb.bpffs, SOCK_REV_MAP);
    let vip4_be = u32::from_ne_bytes(VIP4.octets());
    assert!(rev4.iter().any(|(_, v)| v.addr_be == vip4_be && u16::from_be(v.port_be) == 80), "{SOCK_REV_MAP}: {rev4:?}");
    assert!(rev4.iter().any(|(_, v)| v.addr_be == vip4_be && u16::from_be(v.port_be) == 53), "{SOCK_REV_MAP}: {rev4:?}");
}

/// Where a connected UDP socket of the node sends, at each line of a
/// `sockclient udp-stream` run: `(ms, reply name or "ERR", rest)`.
fn stream_lines(lines: &[String]) -> Vec<(u64, String, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut w = l.splitn(3, ' ');
            Some((w.next()?.parse().ok()?, w.next()?.to_owned(), w.next().unwrap_or("").to_owned()))
        })
        .collect()
}

/// The IPv6 twin of `socketlb.rs`'s connected-UDP test: a node-local
/// process's connected IPv6 UDP socket to the IPv6 cluster IP (translated
/// at `connect()`) whose endpoint leaves the Service port (the pod stays an
/// endpoint of another Service, so its backend stays in the maps) is
/// destroyed by the agent: the process sees the socket aborted
/// (ECONNABORTED, or EDESTADDRREQ when its next call is a send), connects
/// the same socket again and is answered by another endpoint within a
/// second. A socket the process connected to that pod's address directly
/// is left alone: answered by the pod throughout, never aborted.
#[test]
fn a_connected_ipv6_udp_socket_is_destroyed_when_its_endpoint_leaves_and_one_connected_to_the_pod_is_not() {
    const OTHER4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
    const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x12);
    let mut sb = Sandbox::new("ip6destroy", 3);
    sb.enable_ipv6();
    sb.serve_udp_dual(5353);
    write_atomic(&sb.manifests, "web.yaml", &dual_stack_yaml("web", VIP4, VIP6, &[1, 2, 3]));
    write_atomic(&sb.manifests, "other.yaml", &dual_stack_yaml("other", OTHER4, OTHER6, &[1, 2, 3]));
    sb.start_agent(&agent_bin());
    wait_programmed(&sb.bpffs, Duration::from_secs(15), "web and other", |v| {
        v.iter().filter(|f| f.family == "IPv6" && f.port == 53 && f.backends.len() == 3).count() == 2
    });
    let dns6 = SocketAddr::new(IpAddr::V6(VIP6), 53).to_string();
    // 40 datagrams at 100 ms: 4 s; the endpoint is removed after ~1 s.
    let mut cmd = sb.cgroup.command(&sb.node, sockclient(), &["udp-stream", &dns6, "100", "40"]);
    let t0 = Instant::now();
    let stream = std::thread::spawn(move || {
        let out = cmd.output().expect("udp-stream");
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect::<Vec<String>>()
    });
    // The backend the socket path connected it to, from its reverse entry.
    let deadline = Instant::now() + Duration::from_secs(3);
    let busy = loop {
        let rev6: Vec<(SockRev6Key, SockRev6Value)> = pinned_entries(&sb.bpffs, SOCK_REV6_MAP);
        let to = rev6.iter().find(|(_, v)| v.addr == VIP6.octets() && u16::from_be(v.port_be) == 53).map(|(k, _)| k.addr);
        if let Some(i) = to.and_then(|a| (1..=3).find(|&i| pod_ip6(i).octets() == a)) {
            break i;
        }
        assert!(Instant::now() < deadline, "no {SOCK_REV6_MAP} entry for the stream: {rev6:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed()));
    let gone_name = format!("pod{busy}");
    // Connected to that pod directly (no translation): 30 datagrams, 3 s.
    let direct_to = SocketAddr::new(IpAddr::V6(pod_ip6(busy)), 5353).to_string();
    let mut direct_cmd = sb.cgroup.command(&sb.node, sockclient(), &["udp-stream", &direct_to, "100", "30"]);
    let direct = std::thread::spawn(move || {
        let out = direct_cmd.output().expect("direct udp-stream");
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect::<Vec<String>>()
    });
    std::thread::sleep(Duration::from_millis(300));
    let rest: Vec<usize> = (1..=3).filter(|&i| i != busy).collect();
    write_atomic(&sb.manifests, "web.yaml", &dual_stack_yaml("web", VIP4, VIP6, &rest));
    wait_programmed(&sb.bpffs, Duration::from_secs(10), "web's IPv6 DNS port without the endpoint", |v| {
        v.iter().any(|f| f.address == VIP6.to_string() && f.port == 53 && f.backends.len() == 2)
    });
    let programmed_ms = u64::try_from(t0.elapsed().as_millis()).expect("ms");
    let lines = stream.join().expect("stream thread");
    let direct = direct.join().expect("direct stream thread");
    let parsed = stream_lines(&lines);
    let log = sb.agent_log();
    assert!(parsed.len() >= 35, "udp-stream output: {lines:?}");
    assert!(parsed.iter().any(|(_, n, _)| *n == gone_name), "the stream talked to {gone_name}: {lines:?}");
    let late: Vec<&(u64, String, String)> = parsed.iter().filter(|(t, _, _)| *t > programmed_ms + 1000).collect();
    assert!(!late.is_empty(), "the stream outlived the removal by a second: {lines:?}");
    assert!(
        late.iter().all(|(_, n, peer)| n.starts_with("pod") && *n != gone_name && *peer == dns6),
        "a second after the removal ({programmed_ms} ms) only other endpoints answer, on the same socket, shown as the cluster IP: {lines:?}\n{log}"
    );
    let errs: Vec<&(u64, String, String)> = parsed.iter().filter(|(_, n, _)| n == "ERR").collect();
    assert!(!errs.is_empty() && errs.len() <= 2, "the socket is aborted once (one or two failed calls): {lines:?}");
    assert!(
        errs.iter().any(|(_, _, e)| e.contains(&format!("os error {}", libc::ECONNABORTED)) || e.contains(&format!("os error {}", libc::EDESTADDRREQ))),
        "aborted by the agent, not timed out: {lines:?}"
    );
    assert!(log.contains("destroyed connected UDP sockets"), "agent log: {log}");

    let direct = stream_lines(&direct);
    assert!(direct.len() >= 25, "direct udp-stream output: {direct:?}");
    let want_peer = direct_to.clone();
    assert!(
        direct.iter().all(|(_, n, peer)| *n == gone_name && *peer == want_peer),
        "a socket connected to the pod itself is never destroyed nor moved: {direct:?}"
    );
    let c = sb.counters(&agent_bin());
    assert_eq!(c.get("dnat_new_flow").copied().unwrap_or(0), 0, "socket path: no per-packet NAT: {c:?}");
}

/// `sessionAffinity: ClientIP` on the socket path, where the client is the
/// socket's network namespace: a node-local process keeps one backend over
/// IPv6 and one over IPv4, also when its connections alternate between
/// the families (both families of the Service port share one affinity
/// group; their entries are kept apart, as kube-proxy keeps a proxier per
/// family).
#[test]
fn session_affinity_holds_for_ipv6_sockets_beside_ipv4_ones() {
    let mut sb = Sandbox::new("ip6aff", 3);
    sb.enable_ipv6();
    sb.serve_http_dual(8080);
    sb.serve_udp_dual(5353);
    let yaml = dual_stack_yaml("web", VIP4, VIP6, &[1, 2, 3]).replacen(
        "  ipFamilyPolicy: RequireDualStack\n",
        "  ipFamilyPolicy: RequireDualStack\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
        1,
    );
    write_atomic(&sb.manifests, "web.yaml", &yaml);
    sb.start_agent(&agent_bin());
    wait_programmed(&sb.bpffs, Duration::from_secs(15), "both families of web with affinity", |v| {
        v.iter().filter(|f| f.service.starts_with("default/web") && f.backends.len() == 3 && f.affinity_timeout_s == 600).count() == 4
    });
    let (t6, t4) = (SocketAddr::new(IpAddr::V6(VIP6), 80).to_string(), SocketAddr::new(IpAddr::V4(VIP4), 80).to_string());
    let (mut by6, mut by4) = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..6 {
        by6.extend(names_with_peer(&sb.cgroup_client(&sb.node, sockclient(), &["http", &t6, "2"]), &t6, "IPv6 with affinity"));
        by4.extend(names_with_peer(&sb.cgroup_client(&sb.node, sockclient(), &["http", &t4, "2"]), &t4, "IPv4 with affinity"));
    }
    assert_eq!(by6.len(), 1, "one backend for the node's IPv6 sockets: {by6:?}");
    assert_eq!(by4.len(), 1, "one backend for the node's IPv4 sockets: {by4:?}");
    let c = sb.counters(&agent_bin());
    assert!(c.get("affinity_hit").copied().unwrap_or(0) >= 2 * 11, "affinity_hit: {c:?}");
}

// ---------------------------------------------------------------------------
// The XDP fast path over IPv6
// ---------------------------------------------------------------------------

/// Both IPv6 conntrack tables.
fn ct6(bpffs: &Path) -> Vec<(Ct6Key, Ct6Value)> {
    let mut v: Vec<(Ct6Key, Ct6Value)> = pinned_entries(bpffs, CT6_MAP);
    v.extend(pinned_entries::<Ct6Key, Ct6Value>(bpffs, CT6_NEW_MAP));
    v
}

/// An IPv6-only `NodePort` (externalTrafficPolicy Cluster) with one
/// endpoint on this node (`pod1`) and one on another node (behind
/// [`REMOTE_DEVICE`]).
fn node_port6_yaml() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: np6, namespace: default}}
spec:
  type: NodePort
  clusterIP: '{VIP6}'
  clusterIPs: ['{VIP6}']
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: {NODE_PORT}}}
  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP, nodePort: {UDP_NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: np6-a, namespace: default, labels: {{kubernetes.io/service-name: np6}}}}
addressType: IPv6
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:
- {{addresses: ['{}'], nodeName: {NODE}}}
- {{addresses: ['{REMOTE_POD_IP6}'], nodeName: other-node}}
",
        pod_ip6(1)
    )
}

const NODE: &str = "node-a";

/// An IPv6 `NodePort` reached from outside (the client namespace, on the
/// node's IPv6 address) with the XDP fast path on in generic mode, as the
/// IPv4 XDP tests run it: a flow to the backend on the other node is
/// translated by XDP (destination to it, source to the node) and sent out
/// of the link to that node, its replies translated back by XDP; a flow
/// given the local backend is recorded by XDP and passed to TC, which
/// keeps XDP's choice. TC creates no flow at all. TCP and UDP; both
/// backends answer.
#[test]
fn an_ipv6_node_port_is_carried_by_the_xdp_fast_path_with_snat() {
    let mut sb = Sandbox::new("ip6xdp", 1);
    sb.enable_ipv6();
    sb.serve_http_dual(8080);
    sb.serve_udp_dual(5353);
    let remote = sb.add_remote_node6();
    let remote_servers = [
        integration_tests::servers::http_server_dual(remote, 8080, "remote"),
        // Bound to the pod's address: a wildcard socket would answer from
        // the link's address (the longer prefix match to the node's).
        integration_tests::servers::udp_echo_with(remote, SocketAddr::from((REMOTE_POD_IP6, 5353)), |_, payload| {
            let mut reply = b"remote:".to_vec();
            reply.extend_from_slice(payload);
            reply
        }),
    ];
    sb.servers.extend(remote_servers);
    write_atomic(&sb.manifests, "np6.yaml", &node_port6_yaml());
    let manifests = sb.manifests.clone();
    let devices = format!("{DEVICES},{REMOTE_DEVICE}");
    sb.start_agent_on(&agent_bin(), AgentSource::Manifests(&manifests), &devices, Some(NODE), &["--xdp", "--xdp-mode", "generic"]);
    wait_programmed(&sb.bpffs, Duration::from_secs(15), "the IPv6 NodePorts", |v| {
        v.iter().filter(|f| f.address == NODE_IP6.to_string() && f.kind == "NodePort" && f.backends.len() == 2).count() == 2
    });
    let log = sb.agent_log();
    assert!(log.contains("XDP fast path attached device=ext0") && log.contains(&format!("XDP fast path attached device={REMOTE_DEVICE}")), "{log}");
    let np = SocketAddr::new(IpAddr::V6(NODE_IP6), NODE_PORT);
    let unp = SocketAddr::new(IpAddr::V6(NODE_IP6), UDP_NODE_PORT);
    // Warm-up, not counted (as in `northsouth6_xdp.rs`: the first flows of
    // a fresh node may take the TC path while it settles).
    for _ in 0..4 {
        let _ = sb.client.run(move || http_get(np, T));
        let _ = sb.client.run(move || udp_request(unp, "w", T));
    }
    let before = sb.counters(&agent_bin());

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..20 {
        let pod = sb.client.run(move || http_get(np, T)).unwrap_or_else(|e| panic!("HTTP to {np}: {e}\n{}", sb.agent_log()));
        *seen.entry(pod).or_default() += 1;
    }
    assert_eq!(seen.keys().map(String::as_str).collect::<Vec<_>>(), ["pod1", "remote"], "both backends answer over TCP: {seen:?}");
    let mut seen_udp = BTreeSet::new();
    for i in 0..20 {
        let msg = format!("q{i}");
        let r = sb.client.run(move || udp_request(unp, &msg, T)).unwrap_or_else(|e| panic!("UDP to {unp}: {e}"));
        let (name, echo) = r.split_once(':').unwrap_or_else(|| panic!("UDP answer {r:?}"));
        assert_eq!(echo, format!("q{i}"), "UDP answer {r:?}");
        seen_udp.insert(name.to_owned());
    }
    assert_eq!(seen_udp.len(), 2, "both backends answer over UDP: {seen_udp:?}");

    let after = sb.counters(&agent_bin());
    let d = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    let (remote_http, local_http) = (seen["remote"] as u64, seen["pod1"] as u64);
    // Each HTTP exchange to the remote backend: SYN, ACK and the request
    // forwarded, SYN-ACK and the response translated back (at least).
    assert!(d("xdp_forward") >= remote_http * 3, "xdp_forward moved by {}: {after:?}\n{}", d("xdp_forward"), sb.agent_log());
    assert!(d("xdp_reverse") >= remote_http * 2, "xdp_reverse moved by {}: {after:?}", d("xdp_reverse"));
    assert!(d("xdp_local_flow") >= local_http, "xdp_local_flow moved by {}: {after:?}", d("xdp_local_flow"));
    assert_eq!(d("dnat_new_flow"), 0, "every flow was made by XDP, none by TC: {after:?}");
    // All of it IPv6: the XDP counters of the IPv4 family never moved.
    let (c4, c6) = (counters_of_family(&agent_bin(), &sb.bpffs, "ipv4"), counters_of_family(&agent_bin(), &sb.bpffs, "ipv6"));
    for k in ["xdp_forward", "xdp_reverse", "xdp_local_flow"] {
        assert_eq!(c4.get(k).copied().unwrap_or(0), 0, "IPv6 XDP traffic counted as IPv4 {k}: {c4:?}");
        assert_eq!(c6.get(k).copied().unwrap_or(0), after.get(k).copied().unwrap_or(0), "{k}: IPv6 holds it all: {c6:?}");
    }
    // The remote flows are SNATed to the node's address on the link (the
    // source the route to the other node prefers): SERVICE entries NAT the
    // client to it, REPLY entries restore the client.
    let snat: Vec<(Ct6Key, Ct6Value)> = ct6(&sb.bpffs).into_iter().filter(|(_, v)| v.flags & CT_F_SNAT != 0).collect();
    assert!(snat.iter().any(|(k, v)| k.saddr == CLIENT_IP6.octets() && v.snat_addr == NODE_LINK_IP6.octets() && v.nat_addr == REMOTE_POD_IP6.octets()), "no flow SNATed to the node: {snat:?}");
}
