//! The two-node topology itself, with plain kernel routing (no agent, no
//! Service addresses): the client reaches pods on both nodes through node A
//! and the pods see the client's own address; the nodes reach each other's
//! pods; the node addresses answer on their legs; everything is gone after
//! drop, also after a panic. Every request has a timeout; no traffic starts
//! in the root namespace.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use integration_tests::{
    client::{http_get, udp_request},
    cluster::{
        CLIENT_IP, CLIENT_IP_B, Cluster, NODE_A_IP, NODE_A_IP2, NODE_A_LINK_IP, NODE_B_IP, NODE_B_LINK_IP, NodeId, Seen,
        http_peer_server, pod_ip_a, pod_ip_b, udp_peer_echo_at,
    },
    netns::{Netns, ip},
};

const T: Duration = Duration::from_secs(2);
const HTTP: u16 = 8080;
const UDP: u16 = 5353;

/// One HTTP request and one UDP datagram from `from` to `to`; what the
/// server answered for each.
fn ask(from: &Netns, to: Ipv4Addr) -> (Seen, Seen) {
    from.run(move || {
        let h = http_get(SocketAddr::from((to, HTTP)), T).unwrap_or_else(|e| panic!("HTTP to {to}: {e}"));
        let u = udp_request(SocketAddr::from((to, UDP)), "ping", T).unwrap_or_else(|e| panic!("UDP to {to}: {e}"));
        let parse = |s: &str| Seen::parse(s).unwrap_or_else(|| panic!("bad peer answer {s:?}"));
        (parse(&h), parse(&u))
    })
}

fn assert_seen(seen: &(Seen, Seen), pod: &str, src: Ipv4Addr) {
    for (what, s) in [("HTTP", &seen.0), ("UDP", &seen.1)] {
        assert_eq!(s.pod, pod, "{what}: answered by the wrong server: {s:?}");
        assert_eq!(s.peer_ip(), src, "{what}: {pod} saw the wrong source: {s:?}");
    }
    assert_eq!(seen.1.payload, "ping");
}

/// The route `ns` takes to `dst` (`ip route get`).
fn route_get(ns: &Netns, dst: Ipv4Addr) -> String {
    ns.ip(&["route", "get", &dst.to_string()])
}

#[test]
fn client_reaches_pods_on_both_nodes_through_node_a_with_its_own_source() {
    let mut c = Cluster::new("ctc", 2, 2);
    c.serve_http_peer(HTTP);
    c.serve_udp_peer(UDP);
    assert!(c.client.ip(&["route", "show", "default"]).trim().is_empty(), "the client must have no default route");
    let via_a = format!("via {NODE_A_IP} dev eth0");
    for p in c.pods() {
        let r = route_get(&c.client, p.ip);
        assert!(r.contains(&via_a), "client route to {} is not through node A: {r}", p.ip);
        assert_seen(&ask(&c.client, p.ip), &p.name, CLIENT_IP);
    }
    // Node B's pods were reached over the node link.
    let r = route_get(&c.a.ns, pod_ip_b(1));
    assert!(r.contains(&format!("via {NODE_B_LINK_IP} dev nodelink")), "node A's route to node B's pods: {r}");
    // Every pod answered both requests.
    assert_eq!(c.pods().count(), 4);
    assert_eq!(c.pods_a().iter().map(|p| p.ip).collect::<Vec<_>>(), [pod_ip_a(1), pod_ip_a(2)]);
    assert_eq!(c.pods_b().iter().map(|p| p.ip).collect::<Vec<_>>(), [pod_ip_b(1), pod_ip_b(2)]);
}

#[test]
fn nodes_and_pods_reach_each_others_pods_across_the_node_link() {
    let mut c = Cluster::new("ctn", 1, 1);
    c.serve_http_peer(HTTP);
    c.serve_udp_peer(UDP);
    let (a1, b1) = (&c.pods_a()[0], &c.pods_b()[0]);
    assert_seen(&ask(&c.a.ns, b1.ip), &b1.name, NODE_A_LINK_IP);
    assert_seen(&ask(&c.b.ns, a1.ip), &a1.name, NODE_B_LINK_IP);
    assert_seen(&ask(&a1.ns, b1.ip), &b1.name, a1.ip);
    assert_seen(&ask(&b1.ns, a1.ip), &a1.name, b1.ip);
    // Each node reaches its own pods directly (from whichever address the
    // kernel picks: the pod veths have none).
    for (node, pod) in [(&c.a.ns, a1), (&c.b.ns, b1)] {
        let (h, u) = ask(node, pod.ip);
        assert_eq!((h.pod.as_str(), u.pod.as_str()), (pod.name.as_str(), pod.name.as_str()));
    }
}

#[test]
fn node_addresses_answer_on_their_client_legs() {
    let mut c = Cluster::new("cte", 1, 1);
    // Servers in the node namespaces (what a NodePort will be reached on).
    // UDP bound per address: a wildcard socket would answer from the
    // primary address, which the client's connected socket ignores.
    let mut servers = Vec::new();
    for (ns, udp) in [(&c.a.ns, NODE_A_IP), (&c.a.ns, NODE_A_IP2), (&c.b.ns, NODE_B_IP)] {
        servers.push(udp_peer_echo_at(ns, SocketAddrV4::new(udp, UDP), "node"));
    }
    servers.push(http_peer_server(&c.a.ns, HTTP, "node"));
    servers.push(http_peer_server(&c.b.ns, HTTP, "node"));
    for s in servers {
        c.keep_server(s);
    }
    assert_seen(&ask(&c.client, NODE_A_IP), "node", CLIENT_IP);
    assert_seen(&ask(&c.client, NODE_A_IP2), "node", CLIENT_IP);
    assert_seen(&ask(&c.client, NODE_B_IP), "node", CLIENT_IP_B);
    let r = route_get(&c.client, NODE_B_IP);
    assert!(r.contains("dev eth1"), "client reaches node B on its own leg: {r}");
    // externalIP / LB range routed to node A, nothing routed to Services.
    let r = route_get(&c.client, integration_tests::cluster::EXTERNAL_IP);
    assert!(r.contains(&format!("via {NODE_A_IP} dev eth0")), "{r}");
    // Pods reach both nodes' external addresses and the other pods' node.
    let (a1, b1) = (&c.pods_a()[0], &c.pods_b()[0]);
    assert_seen(&ask(&a1.ns, NODE_A_IP), "node", a1.ip);
    assert_seen(&ask(&b1.ns, NODE_A_IP), "node", b1.ip);
    assert_seen(&ask(&a1.ns, NODE_B_IP), "node", a1.ip);
    // Names and layout as documented.
    assert_eq!((c.a.name(), c.b.name()), ("node-a", "node-b"));
    assert_eq!((a1.name.as_str(), b1.name.as_str(), a1.veth.as_str()), ("pod-a1", "pod-b1", "lxc1"));
    assert_eq!((a1.node, b1.node), (NodeId::A, NodeId::B));
    let ext0 = c.a.ns.ip(&["-4", "-o", "addr", "show", "dev", "ext0"]);
    let primary = ext0.lines().find(|l| !l.contains("secondary")).unwrap_or_default();
    assert!(primary.contains(&format!("{NODE_A_IP}/24")), "node A's primary ext0 address: {ext0}");
    assert!(ext0.contains(&format!("{NODE_A_IP2}/24")), "{ext0}");
}

/// Everything a cluster owns outside the process: namespaces, bpffs
/// directories, the work directory.
fn footprint(c: &Cluster) -> (Vec<String>, Vec<PathBuf>) {
    (c.netns_names(), vec![c.a.bpffs.clone(), c.b.bpffs.clone(), c.workdir.clone()])
}

fn assert_gone((names, paths): &(Vec<String>, Vec<PathBuf>)) {
    let list = ip(&["netns", "list"]);
    let left: Vec<&str> = list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| names.iter().any(|m| m == n)).collect();
    assert!(left.is_empty(), "namespaces left after drop: {left:?}");
    for p in paths {
        assert!(!p.exists(), "{} left after drop", p.display());
    }
}

#[test]
fn topology_is_removed_on_drop_and_on_panic() {
    let c = Cluster::new("ctd", 2, 1);
    let fp = footprint(&c);
    assert_eq!(fp.0.len(), 6);
    std::fs::create_dir_all(&c.a.bpffs).expect("bpffs dir a");
    std::fs::create_dir_all(&c.b.bpffs).expect("bpffs dir b");
    let list = ip(&["netns", "list"]);
    for n in &fp.0 {
        assert!(list.lines().any(|l| l.split_whitespace().next() == Some(n)), "{n} missing while alive");
    }
    drop(c);
    assert_gone(&fp);

    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::thread::spawn(move || {
        let mut c = Cluster::new("ctp", 1, 1);
        c.serve_http_peer(HTTP);
        std::fs::create_dir_all(&c.a.bpffs).expect("bpffs dir");
        tx.send(footprint(&c)).expect("send");
        panic!("deliberate panic with a live cluster");
    })
    .join();
    assert!(r.is_err(), "the thread should have panicked");
    assert_gone(&rx.recv_timeout(T).expect("footprint"));
}
