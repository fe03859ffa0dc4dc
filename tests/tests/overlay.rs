//! Cross-node Service traffic when the nodes are joined by an overlay
//! ([`integration_tests::overlay`]): flannel's VXLAN layout (`flannel.1`),
//! and an L3 device without an Ethernet header (`tun0`, as `WireGuard` or
//! IPIP look to the datapath). A Service `web` (`ClusterIP` + `NodePort`)
//! has its only endpoints on node B; traffic starts on node A:
//!
//! - a pod on node A (not in any cgroup: the TC path) to the `ClusterIP`:
//!   DNAT at `lxc1` ingress, out through the overlay, the reply translated
//!   back at the overlay device's ingress;
//! - a node-local client process in node A's cgroup (the socket path): the
//!   socket is connected to the backend, `getpeername` shows the
//!   `ClusterIP`;
//! - the external client to node A's `NodePort`: DNAT + SNAT to node A's
//!   overlay address, FIB-redirected into the overlay, the reply translated
//!   at the overlay device's ingress and redirected out of `ext0`.
//!
//! Every request must be answered, by node B's pods.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{agent_bin, wait_programmed},
    client::{http_get, udp_request},
    cluster::{NODE_A_IP, NodeId, Seen, pod_ip_a},
    inspect_backends,
    manifests::{web_yaml, write_atomic},
    netns,
    overlay::{Overlay, OverlayKind, TunRelay, overlay_ip},
};
use proxy_agent::pins::{Pins, TcHook};
use proxy_common::ct::{SNAT_PORT_MAX, SNAT_PORT_MIN};

/// Per-request timeout.
const T: Duration = Duration::from_secs(2);
/// Requests per kind of traffic (each is bounded by [`T`]).
const N: usize = 20;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const REMOTE_PODS: usize = 2;

/// `web`: type `NodePort`, HTTP 80→8080 (nodePort 30080) and UDP 53→5353
/// (nodePort 30053), endpoints: node B's pods only.
fn web() -> String {
    let eps: Vec<(Ipv4Addr, &str)> = (1..=REMOTE_PODS).map(|i| (NodeId::B.pod_ip(i), "node-b")).collect();
    web_yaml("NodePort", VIP, "  externalTrafficPolicy: Cluster\n", None, &eps)
}

fn remote_pods() -> BTreeSet<String> {
    (1..=REMOTE_PODS).map(|i| format!("pod-b{i}")).collect()
}

/// The topology with servers in every pod, `web` written, both agents
/// started (with `extra`) and the frontends programmed on both nodes.
fn setup(prefix: &str, kind: OverlayKind, extra: &[&str]) -> Overlay {
    let mut o = Overlay::new(prefix, kind, 1, REMOTE_PODS);
    o.serve_http_peer(8080);
    o.serve_udp_peer(5353);
    write_atomic(&o.manifests, "web.yaml", &web());
    o.start_agents(&agent_bin(), extra);
    let want = REMOTE_PODS;
    for n in [&o.a, &o.b] {
        wait_programmed(&n.bpffs, Duration::from_secs(20), &format!("web on {}", n.name()), |v| {
            inspect_backends(v, VIP, 80).len() == want && inspect_backends(v, VIP, 53).len() == want
        });
    }
    wait_programmed(&o.a.bpffs, Duration::from_secs(20), "NodePorts on node A", |v| {
        inspect_backends(v, NODE_A_IP, NODE_PORT).len() == want && inspect_backends(v, NODE_A_IP, UDP_NODE_PORT).len() == want
    });
    let dev = kind.device();
    for n in [&o.a, &o.b] {
        assert!(attached_line(&n.agent_log(), dev).is_some(), "{}: TC not attached to {dev}:\n{}", n.name(), n.agent_log());
    }
    o
}

/// The agent's log line saying TC was attached to `dev`.
fn attached_line(log: &str, dev: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("TC ingress and egress attached") && l.split_whitespace().any(|w| w == format!("device={dev}")))
        .map(str::to_owned)
}

/// The name of the program node A's agent attached to `dev` at `hook`:
/// the pinned link (by the device's index) → its program, read with
/// bpftool (the BTF name, not the 15-character kernel name).
fn tc_program(o: &Overlay, dev: &str, hook: TcHook) -> String {
    let link: serde_json::Value = serde_json::from_str(&netns::run("ip", &["-n", o.a.ns.name(), "-j", "link", "show", dev])).expect("ip -j");
    let ifindex = link[0]["ifindex"].as_u64().and_then(|i| u32::try_from(i).ok()).unwrap_or_else(|| panic!("ifindex of {dev}: {link}"));
    let pin = Pins::new(&o.a.bpffs).tc_link(hook, dev, ifindex);
    let link: serde_json::Value =
        serde_json::from_str(&netns::run("bpftool", &["-j", "link", "show", "pinned", &pin.to_string_lossy()])).expect("bpftool link json");
    let id = link["prog_id"].as_u64().unwrap_or_else(|| panic!("no prog_id in {link}")).to_string();
    let prog: serde_json::Value = serde_json::from_str(&netns::run("bpftool", &["-j", "prog", "show", "id", &id])).expect("bpftool prog json");
    prog["name"].as_str().unwrap_or_else(|| panic!("no name in {prog}")).to_owned()
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, reason: &str) -> u64 {
    let get = |m: &BTreeMap<String, u64>| m.get(reason).copied().unwrap_or_else(|| panic!("no counter {reason} in {m:?}"));
    get(after) - get(before)
}

/// `N` HTTP and `N` UDP requests from pod-a1 to the `ClusterIP`: every
/// one answered by a node B pod that saw pod-a1's own address (no SNAT on
/// the pod-to-Service path). Returns the packets node A's datapath
/// translated back (`rev_nat_reply`) meanwhile.
fn pod_to_clusterip(o: &Overlay) -> u64 {
    let before = o.a.counters();
    let pod = &o.a.pods[0];
    let start = Instant::now();
    let mut seen = BTreeSet::new();
    for i in 0..N {
        let r = pod.ns.run(move || http_get(SocketAddr::from((VIP, 80)), T));
        let body = r.unwrap_or_else(|e| panic!("HTTP {i} pod-a1 → {VIP}:80 failed: {e}\n{}", o.diag()));
        let s = Seen::parse(&body).unwrap_or_else(|| panic!("bad answer {body:?}"));
        assert!(remote_pods().contains(&s.pod), "HTTP {i} answered by {s:?}, not a node B pod");
        assert_eq!(s.peer_ip(), pod_ip_a(1), "HTTP {i}: the backend must see the pod itself: {s:?}");
        seen.insert(s.pod);
    }
    for i in 0..N {
        let msg = format!("q{i}");
        let m = msg.clone();
        let r = pod.ns.run(move || udp_request(SocketAddr::from((VIP, 53)), &m, T));
        let body = r.unwrap_or_else(|e| panic!("UDP {i} pod-a1 → {VIP}:53 failed: {e}\n{}", o.diag()));
        let s = Seen::parse(&body).unwrap_or_else(|| panic!("bad answer {body:?}"));
        assert!(remote_pods().contains(&s.pod), "UDP {i} answered by {s:?}, not a node B pod");
        assert_eq!((s.peer_ip(), s.payload.as_str()), (pod_ip_a(1), msg.as_str()), "UDP {i}: {s:?}");
        seen.insert(s.pod);
    }
    assert_eq!(seen, remote_pods(), "every remote backend used");
    eprintln!("pod → ClusterIP over {:?}: {} requests in {:?}", o.kind, 2 * N, start.elapsed());
    let after = o.a.counters();
    // The Service packets were translated on node A (TC, not sockets).
    // (A UDP request whose ephemeral port repeats an earlier one's within
    // its flow's lifetime is that flow again: established, not new.)
    let translated = delta(&before, &after, "dnat_new_flow") + delta(&before, &after, "dnat_established");
    assert!(translated >= 2 * N as u64 && delta(&before, &after, "dnat_new_flow") >= N as u64, "DNAT on node A's TC path: {after:?}");
    delta(&before, &after, "rev_nat_reply")
}

/// `N` HTTP and `N` UDP requests from the external client to node A's
/// `NodePort`s: answered by node B's pods, which see node A's overlay
/// address with an SNAT port. Returns node A's `rev_nat_reply` delta.
fn client_to_nodeport(o: &Overlay) -> u64 {
    let before = o.a.counters();
    let start = Instant::now();
    let snat_src = overlay_ip(NodeId::A);
    let mut seen = BTreeSet::new();
    for i in 0..N {
        let r = o.client.run(|| http_get(SocketAddr::from((NODE_A_IP, NODE_PORT)), T));
        let body = r.unwrap_or_else(|e| panic!("HTTP {i} client → {NODE_A_IP}:{NODE_PORT} failed: {e}\n{}", o.diag()));
        let s = Seen::parse(&body).unwrap_or_else(|| panic!("bad answer {body:?}"));
        assert!(remote_pods().contains(&s.pod), "NodePort HTTP {i} answered by {s:?}");
        assert_eq!(s.peer_ip(), snat_src, "NodePort HTTP {i}: SNAT to node A's overlay address: {s:?}");
        assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&s.peer.port()), "SNAT port: {s:?}");
        seen.insert(s.pod);
    }
    for i in 0..N {
        let msg = format!("n{i}");
        let m = msg.clone();
        let r = o.client.run(move || udp_request(SocketAddr::from((NODE_A_IP, UDP_NODE_PORT)), &m, T));
        let body = r.unwrap_or_else(|e| panic!("UDP {i} client → {NODE_A_IP}:{UDP_NODE_PORT} failed: {e}\n{}", o.diag()));
        let s = Seen::parse(&body).unwrap_or_else(|| panic!("bad answer {body:?}"));
        assert!(remote_pods().contains(&s.pod), "NodePort UDP {i} answered by {s:?}");
        assert_eq!((s.peer_ip(), s.payload.as_str()), (snat_src, msg.as_str()), "NodePort UDP {i}: {s:?}");
        seen.insert(s.pod);
    }
    assert_eq!(seen, remote_pods(), "every remote backend used");
    eprintln!("client → NodePort over {:?}: {} requests in {:?}", o.kind, 2 * N, start.elapsed());
    delta(&before, &o.a.counters(), "rev_nat_reply")
}

/// sockclient in node A's namespace and cgroup (the socket path): `N`
/// HTTP requests (a connection each) and `N` datagrams on a connected UDP
/// socket to the `ClusterIP`; every one answered by a node B pod (which
/// sees node A's overlay address: the socket was connected to it), and the
/// socket API shows the `ClusterIP` as the peer.
fn node_local_to_clusterip(o: &Overlay) {
    let bin = Path::new(env!("CARGO_BIN_EXE_sockclient"));
    let before = o.a.counters();
    let start = Instant::now();
    let mut seen = BTreeSet::new();
    for (mode, port) in [("http", 80), ("udp", 53)] {
        let vip = format!("{VIP}:{port}");
        // Bounded: sockclient gives each request 2 s.
        let out = o.a.cgroup.command(&o.a.ns, bin, &[mode, &vip, &N.to_string()]).output().expect("run sockclient");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "sockclient {mode}: {}\n{text}{}", out.status, String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), N, "sockclient {mode}: one line per request:\n{text}");
        for l in lines {
            // "<pod> <peer-ip> <peer-port>[ <payload>] <getpeername>"
            assert!(!l.starts_with("ERR"), "sockclient {mode} → {vip}: {l}\n{text}\n{}", o.diag());
            let (body, peer) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l:?}"));
            let s = Seen::parse(body).unwrap_or_else(|| panic!("bad answer {l:?}"));
            assert!(remote_pods().contains(&s.pod), "{mode}: answered by {s:?}");
            assert_eq!(s.peer_ip(), overlay_ip(NodeId::A), "{mode}: the backend sees node A's overlay address: {l}");
            assert_eq!(peer, vip, "{mode}: getpeername must show the ClusterIP: {l}");
            seen.insert(s.pod);
        }
    }
    assert_eq!(seen, remote_pods(), "every remote backend used");
    eprintln!("node-local → ClusterIP over {:?}: {} requests in {:?}", o.kind, 2 * N, start.elapsed());
    let after = o.a.counters();
    // One per TCP connect, one for the connect of the UDP socket.
    assert!(delta(&before, &after, "sock_translated") > N as u64, "socket path translated: {after:?}");
    assert!(delta(&before, &after, "sock_rev_translated") >= N as u64, "getpeername/recvmsg translated: {after:?}");
    assert_eq!(delta(&before, &after, "dnat_new_flow"), 0, "the socket path leaves nothing to TC: {after:?}");
}

#[test]
fn vxlan_pod_to_clusterip_reaches_remote_pods_and_replies_are_translated_on_flannel_1() {
    let o = setup("ovp", OverlayKind::Vxlan, &[]);
    let rev = pod_to_clusterip(&o);
    assert!(rev >= 2 * N as u64, "replies translated back on node A: {rev}");
}

#[test]
fn vxlan_pod_to_clusterip_with_socket_lb_off() {
    let o = setup("ovo", OverlayKind::Vxlan, &["--socket-lb", "off"]);
    let rev = pod_to_clusterip(&o);
    assert!(rev >= 2 * N as u64, "replies translated back on node A: {rev}");
}

#[test]
fn vxlan_node_local_client_on_the_socket_path_reaches_remote_pods() {
    let o = setup("ovs", OverlayKind::Vxlan, &[]);
    node_local_to_clusterip(&o);
}

#[test]
fn vxlan_nodeport_snats_into_the_overlay_and_the_reply_comes_back_through_it() {
    let o = setup("ovn", OverlayKind::Vxlan, &[]);
    let rev = client_to_nodeport(&o);
    assert!(rev >= 2 * N as u64, "replies translated back on node A: {rev}");
}

/// Counters that must not move on node A while traffic crosses the L3
/// overlay: a packet parsed at the wrong offset is malformed, a failed
/// rewrite or FIB lookup is counted.
fn assert_clean(o: &Overlay, before: &BTreeMap<String, u64>) {
    let after = o.a.counters();
    for bad in ["malformed_truncated", "malformed_bad_ihl", "drop_rewrite_failed", "fib_no_route"] {
        assert_eq!(delta(before, &after, bad), 0, "{bad} on node A: {after:?}");
    }
}

#[test]
fn l3_tun_pod_to_clusterip_reaches_remote_pods_and_replies_are_translated_on_tun0() {
    let o = setup("ovt", OverlayKind::Tun, &[]);
    let line = attached_line(&o.a.agent_log(), "tun0").expect("checked in setup");
    eprintln!("node A: {line}");
    // The variants for devices without an Ethernet header run there.
    for hook in TcHook::ALL {
        assert_eq!(tc_program(&o, "tun0", hook), hook.program_l3(), "{hook:?} on tun0");
        assert_eq!(tc_program(&o, "ext0", hook), hook.program(), "{hook:?} on ext0");
    }
    let before = o.a.counters();
    // Replies from node B's pods reach node A only through tun0: what is
    // translated back is translated there, by the L3 program variant.
    let rev = pod_to_clusterip(&o);
    assert!(rev >= 2 * N as u64, "replies arriving on tun0 translated back: {rev}\n{}", o.diag());
    assert_clean(&o, &before);
    let relayed = o.relay.as_ref().map_or(0, TunRelay::relayed);
    assert!(relayed >= 6 * N as u64, "the traffic went through the tun relay: {relayed} packets");
}

#[test]
fn l3_tun_nodeport_snats_into_tun0_and_the_reply_comes_back_through_it() {
    let o = setup("ovr", OverlayKind::Tun, &[]);
    let before = o.a.counters();
    // The reply arrives on tun0 (no Ethernet header), is translated back to
    // the NodePort and must be sent out of ext0.
    let rev = client_to_nodeport(&o);
    assert!(rev >= 2 * N as u64, "replies arriving on tun0 translated back: {rev}\n{}", o.diag());
    assert_clean(&o, &before);
}

#[test]
fn l3_tun_node_local_client_on_the_socket_path_reaches_remote_pods() {
    let o = setup("ovu", OverlayKind::Tun, &[]);
    node_local_to_clusterip(&o);
}
