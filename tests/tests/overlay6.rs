//! IPv6 Service traffic across an overlay ([`integration_tests::overlay`]
//! with [`Overlay::enable_ipv6`]): flannel's VXLAN device carrying IPv6
//! pods' frames over the IPv4 underlay, and an L3 `tun0` carrying IPv6
//! packets without an Ethernet header. An IPv6-only `NodePort` Service has
//! its only endpoints on node B; from node A:
//!
//! - a pod (the TC path) to the IPv6 `ClusterIP`: DNAT at `lxc1`, out
//!   through the overlay, the reply translated back at the overlay
//!   device's ingress; the backend sees the pod's own IPv6 address;
//! - a node-local process in node A's cgroup (the socket path): connected
//!   to the backend, `getpeername` shows the `ClusterIP`;
//! - the external client to node A's IPv6 `NodePort`: DNAT + SNAT to node
//!   A's IPv6 overlay address, into the overlay, the reply translated at
//!   the overlay device's ingress and sent out of `ext0`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
};

use integration_tests::{
    agent::{agent_bin, wait_programmed},
    client::{http_get, udp_request},
    cluster::{NODE_A_IP6, NodeId, SeenAny},
    manifests::{web6_yaml, write_atomic},
    overlay::{Overlay, OverlayKind, TunRelay, overlay_ip6},
};
use proxy_common::ct::{SNAT_PORT_MAX, SNAT_PORT_MIN};

const T: std::time::Duration = std::time::Duration::from_secs(2);
/// Requests per kind of traffic (each bounded by [`T`]).
const N: usize = 20;
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const REMOTE_PODS: usize = 2;

fn remote_pods() -> BTreeSet<String> {
    (1..=REMOTE_PODS).map(|i| format!("pod-b{i}")).collect()
}

/// Node A's frontend `addr:port` with `n` backends.
fn has(v: &[proxy_agent::inspect::FrontendView], addr: IpAddr, port: u16, n: usize) -> bool {
    v.iter().any(|f| f.address == addr.to_string() && f.port == port && f.backends.len() == n)
}

/// The overlay with IPv6, servers on `[::]` in every pod, the IPv6-only
/// `web` written (endpoints: node B's pods), both agents started and the
/// frontends programmed.
fn setup(prefix: &str, kind: OverlayKind) -> Overlay {
    let mut o = Overlay::new(prefix, kind, 1, REMOTE_PODS);
    o.enable_ipv6();
    o.serve_peer_dual(8080, 5353);
    let eps: Vec<(Ipv6Addr, &str, &str)> = (1..=REMOTE_PODS).map(|i| (NodeId::B.pod_ip6(i), "node-b", "")).collect();
    write_atomic(&o.manifests, "web.yaml", &web6_yaml("NodePort", VIP6, "  externalTrafficPolicy: Cluster\n", None, &eps));
    o.start_agents(&agent_bin(), &[]);
    let vip = IpAddr::V6(VIP6);
    for n in [&o.a, &o.b] {
        wait_programmed(&n.bpffs, T * 10, &format!("web over IPv6 on {}", n.name()), |v| {
            has(v, vip, 80, REMOTE_PODS) && has(v, vip, 53, REMOTE_PODS)
        });
    }
    let np = IpAddr::V6(NODE_A_IP6);
    wait_programmed(&o.a.bpffs, T * 10, "IPv6 NodePorts on node A", |v| {
        has(v, np, NODE_PORT, REMOTE_PODS) && has(v, np, UDP_NODE_PORT, REMOTE_PODS)
    });
    o
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, reason: &str) -> u64 {
    after.get(reason).copied().unwrap_or(0) - before.get(reason).copied().unwrap_or(0)
}

/// `N` HTTP and `N` UDP requests to `to` from `ns`'s `run`: each answered
/// by a node B pod that saw `want_src` (and, when `snat`, a port of the
/// SNAT range); every remote pod used.
fn requests(o: &Overlay, from: &integration_tests::netns::Netns, to: IpAddr, ports: (u16, u16), want_src: IpAddr, snat: bool) {
    let mut seen = BTreeSet::new();
    let check = |what: &str, body: &str, payload: Option<&str>| -> String {
        let s = SeenAny::parse(body).unwrap_or_else(|| panic!("{what}: bad answer {body:?}"));
        assert!(remote_pods().contains(&s.pod), "{what}: answered by {s:?}, not a node B pod");
        assert_eq!(s.peer_ip(), want_src, "{what}: the backend saw {s:?}");
        if snat {
            assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&s.peer.port()), "{what}: SNAT port: {s:?}");
        }
        if let Some(p) = payload {
            assert_eq!(s.payload, p, "{what}: {s:?}");
        }
        s.pod
    };
    for i in 0..N {
        let t = SocketAddr::new(to, ports.0);
        let body = from.run(move || http_get(t, T)).unwrap_or_else(|e| panic!("HTTP {i} → {t}: {e}\n{}", o.diag()));
        seen.insert(check(&format!("HTTP {i} → {t}"), &body, None));
        let t = SocketAddr::new(to, ports.1);
        let msg = format!("q{i}");
        let m = msg.clone();
        let body = from.run(move || udp_request(t, &m, T)).unwrap_or_else(|e| panic!("UDP {i} → {t}: {e}\n{}", o.diag()));
        seen.insert(check(&format!("UDP {i} → {t}"), &body, Some(&msg)));
    }
    assert_eq!(seen, remote_pods(), "every remote backend used");
}

/// The socket path from node A: sockclient in node A's namespace and
/// cgroup, `N` connections and `N` datagrams on a connected UDP socket;
/// the backend sees node A's IPv6 overlay address, `getpeername` the
/// `ClusterIP`, and nothing is left to TC.
fn node_local(o: &Overlay) {
    let bin = Path::new(env!("CARGO_BIN_EXE_sockclient"));
    let before = o.a.counters();
    for (mode, port) in [("http", 80), ("udp", 53)] {
        let vip = SocketAddr::new(IpAddr::V6(VIP6), port).to_string();
        let out = o.a.cgroup.command(&o.a.ns, bin, &[mode, &vip, &N.to_string()]).output().expect("run sockclient");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "sockclient {mode}: {}\n{text}{}", out.status, String::from_utf8_lossy(&out.stderr));
        assert_eq!(text.lines().count(), N, "sockclient {mode}: one line per request:\n{text}");
        for l in text.lines() {
            assert!(!l.starts_with("ERR"), "sockclient {mode} → {vip}: {l}\n{text}\n{}", o.diag());
            let (body, peer) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l:?}"));
            let s = SeenAny::parse(body).unwrap_or_else(|| panic!("bad answer {l:?}"));
            assert!(remote_pods().contains(&s.pod), "{mode}: answered by {s:?}");
            assert_eq!(s.peer_ip(), IpAddr::V6(overlay_ip6(NodeId::A)), "{mode}: the backend sees node A's IPv6 overlay address: {l}");
            assert_eq!(peer, vip, "{mode}: getpeername must show the ClusterIP: {l}");
        }
    }
    let after = o.a.counters();
    assert!(delta(&before, &after, "sock_translated") > N as u64, "socket path translated: {after:?}");
    assert_eq!(delta(&before, &after, "dnat_new_flow"), 0, "the socket path leaves nothing to TC: {after:?}");
}

/// Everything over `kind`: the pod's TC path, the socket path, the
/// `NodePort` with SNAT; node A's datapath translated the replies back
/// where they arrived, and nothing was counted malformed or unroutable.
fn all_paths(prefix: &str, kind: OverlayKind) -> Overlay {
    let o = setup(prefix, kind);
    let pod = &o.a.pods[0];
    let c0 = o.a.counters();
    requests(&o, &pod.ns, IpAddr::V6(VIP6), (80, 53), IpAddr::V6(NodeId::A.pod_ip6(1)), false);
    let c1 = o.a.counters();
    assert!(delta(&c0, &c1, "dnat_new_flow") >= N as u64, "DNAT on node A's TC path: {c1:?}");
    assert!(delta(&c0, &c1, "rev_nat_reply") >= 2 * N as u64, "replies translated back on node A: {c1:?}\n{}", o.diag());

    node_local(&o);

    let c2 = o.a.counters();
    requests(&o, &o.client, IpAddr::V6(NODE_A_IP6), (NODE_PORT, UDP_NODE_PORT), IpAddr::V6(overlay_ip6(NodeId::A)), true);
    let c3 = o.a.counters();
    assert!(delta(&c2, &c3, "rev_nat_reply") >= 2 * N as u64, "NodePort replies translated back on node A: {c3:?}\n{}", o.diag());
    for bad in ["malformed_truncated", "malformed_bad_ihl", "drop_rewrite_failed", "fib_no_route"] {
        assert_eq!(delta(&c0, &c3, bad), 0, "{bad} on node A: {c3:?}");
    }
    o
}

#[test]
fn vxlan_ipv6_pod_node_local_and_nodeport_traffic_reaches_remote_pods_through_flannel_1() {
    all_paths("ov6v", OverlayKind::Vxlan);
}

#[test]
fn l3_tun_ipv6_pod_node_local_and_nodeport_traffic_reaches_remote_pods_through_tun0() {
    let o = all_paths("ov6t", OverlayKind::Tun);
    let relayed = o.relay.as_ref().map_or(0, TunRelay::relayed);
    assert!(relayed >= 8 * N as u64, "the IPv6 traffic went through the tun relay: {relayed} packets");
}
