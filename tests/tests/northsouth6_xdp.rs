//! The XDP fast path over IPv6 on two nodes (the dual-stack topology of
//! `northsouth6.rs`, [`Cluster::enable_ipv6`]), as `northsouth.rs` runs the
//! IPv4 one: an IPv6 `NodePort` on node A with a local and a remote
//! backend, with `--xdp` in generic mode and in native mode on veths made
//! to behave like wires (full checksums, NAPI: what a NIC gives XDP). The
//! results must be those of the TC path (the remote backend sees node A's
//! IPv6 link address with a SNAT port, the local one the client), and
//! XDP's own counters must show it carried the remote flows both ways.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use integration_tests::{
    agent::{agent_bin, wait_programmed},
    client::{http_get, udp_request},
    cluster::{CLIENT_IP6, Cluster, NODE_A_IP6, NODE_A_LINK_IP6, SeenAny, pod_ip6_a, pod_ip6_b},
    manifests::{web6_yaml, write_atomic},
};
use proxy_common::ct::{SNAT_PORT_MAX, SNAT_PORT_MIN};

const T: Duration = Duration::from_secs(2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;

/// An IPv6-only `NodePort` `web` (HTTP 80→8080 on 30080, UDP 53→5353 on
/// 30053, externalTrafficPolicy Cluster) with one endpoint per node.
fn web6() -> String {
    web6_yaml("NodePort", VIP6, "", None, &[(pod_ip6_a(1), "node-a", ""), (pod_ip6_b(1), "node-b", "")])
}

#[test]
fn xdp_generic_ipv6_nodeport_reaches_local_and_remote_backends_and_remote_ones_see_the_node() {
    ipv6_nodeport_over_xdp("generic");
}

#[test]
fn xdp_native_ipv6_nodeport_reaches_local_and_remote_backends_and_remote_ones_see_the_node() {
    ipv6_nodeport_over_xdp("native");
}

fn ipv6_nodeport_over_xdp(mode: &str) {
    let mut c = Cluster::new(&format!("nx6{}", &mode[..1]), 1, 1);
    c.enable_ipv6();
    c.serve_peer_dual(8080, 5353);
    if mode == "native" {
        c.make_wire_like();
    }
    write_atomic(&c.manifests, "web.yaml", &web6());
    c.start_agent_a(&agent_bin(), &["--xdp", "--xdp-mode", mode]);
    wait_programmed(&c.a.bpffs, Duration::from_secs(20), "the IPv6 NodePorts", |v| {
        v.iter().filter(|f| f.address == NODE_A_IP6.to_string() && f.kind == "NodePort" && f.backends.len() == 2).count() == 2
    });
    assert!(c.a.agent_log().contains("XDP fast path attached"), "{}", c.a.agent_log());
    // Warm-up, not counted: node A resolves node B's link address (XDP
    // needs a resolved neighbour and passes until then, so TC makes the
    // first remote flow), and the first flows of a fresh node take the TC
    // path while it settles.
    for _ in 0..6 {
        let _ = c.client.run(|| http_get(SocketAddr::new(IpAddr::V6(NODE_A_IP6), NODE_PORT), T));
        let _ = c.client.run(|| udp_request(SocketAddr::new(IpAddr::V6(NODE_A_IP6), UDP_NODE_PORT), "w", T));
    }
    let (fwd0, rev0, new0, local0) = (c.a.stat("xdp_forward"), c.a.stat("xdp_reverse"), c.a.stat("dnat_new_flow"), c.a.stat("xdp_local_flow"));

    let mut remote = 0;
    for proto in ["TCP", "UDP"] {
        let mut seen = BTreeSet::new();
        for _ in 0..40 {
            let s = c.client.run(move || {
                let body = if proto == "TCP" {
                    http_get(SocketAddr::new(IpAddr::V6(NODE_A_IP6), NODE_PORT), T)?
                } else {
                    udp_request(SocketAddr::new(IpAddr::V6(NODE_A_IP6), UDP_NODE_PORT), "q", T)?
                };
                SeenAny::parse(&body).ok_or_else(|| std::io::Error::other(format!("bad answer {body:?}")))
            });
            let s = s.unwrap_or_else(|e| panic!("IPv6 NodePort {proto} over XDP ({mode}) failed: {e}\n{}", c.a.agent_log()));
            // The remote backend sees node A (SNAT, so its reply comes back
            // through node A), the local one the client.
            let want = if s.pod == "pod-a1" { IpAddr::V6(CLIENT_IP6) } else { IpAddr::V6(NODE_A_LINK_IP6) };
            assert_eq!(s.peer_ip(), want, "{proto} {s:?}");
            if s.pod == "pod-b1" {
                assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&s.peer.port()), "SNAT port {s:?}");
                remote += 1;
            }
            seen.insert(s.pod);
        }
        assert_eq!(seen.len(), 2, "both backends used over {proto}: {seen:?}");
    }
    let (fwd, rev, local) = (c.a.stat("xdp_forward") - fwd0, c.a.stat("xdp_reverse") - rev0, c.a.stat("xdp_local_flow") - local0);
    let counters = c.a.counters(&agent_bin());
    // Every exchange with the remote backend: at least one packet
    // forwarded and one reply translated back by XDP.
    assert!(fwd >= remote && rev >= remote, "XDP ({mode}) carried {fwd} forward, {rev} reverse for {remote} remote exchanges\n{counters:?}");
    assert!(local > 0, "XDP recorded no flow to the local backend: {counters:?}");
    // XDP makes every flow (the local ones too, recorded for TC).
    let by_tc = c.a.stat("dnat_new_flow") - new0;
    assert_eq!(by_tc, 0, "TC made {by_tc} of the flows, XDP should have made all: {counters:?}");
}
